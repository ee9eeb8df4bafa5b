//! ham's side: raises on node b's socket over one `RaiseStream` (the way a detector
//! reports at a high rate: no round trip per event, one store commit per batch), a
//! subscriber on node a's socket that follows b's events through the mesh.

use super::{ARRIVAL_TIMEOUT, Carrier, Flood, WINDOW, parse, payload, settle};
use crate::cluster::Cluster;
use crate::sys::mono_ns;
use crate::tap::{Tap, gap_size};
use anyhow::Context;
use ham::ham_proto::SubscribeRequest;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The publishing node's HAM, in the CPU figures.
pub const PUBLISHER_NODE: &str = "b's HAM";

/// The entity the events are raised on (global, declared on every node).
const ENTITY: &str = "bench";

/// ham, publishing on b and subscribed on a.
pub struct HamSide {
    tap: Tap,
    /// Publishes the floods, its connection driven by a worker thread of `rt`.
    publisher: ham::RaiseStream,
    rt: tokio::runtime::Runtime,
    /// Publishes the latency samples, from the harness's own thread (see [`send_now`]).
    single: ham::RaiseStream,
    single_rt: tokio::runtime::Runtime,
    hams: [i32; 2],
}

/// How many times [`send_now`] lets the connection's tasks run: enough for the
/// request body's pipe task and the HTTP/2 connection task to write the frame.
const DRIVE_TURNS: usize = 1;

/// Sends one raise and drives the connection's tasks on this very thread until the
/// frame is on the socket, then returns: as the nats client writes its PUB from the
/// harness's thread, with no hand-over to another thread first. If the turns were too
/// few the frame would wait for the next sample, and this one would time out.
fn send_now(
    rt: &tokio::runtime::Runtime,
    publisher: &mut ham::RaiseStream,
    msg: &str,
) -> anyhow::Result<()> {
    rt.block_on(async {
        publisher.raise(ENTITY, 0, msg).await?;
        for _ in 0..DRIVE_TURNS {
            tokio::task::yield_now().await;
        }
        Ok(())
    })
}

impl HamSide {
    /// Subscribes on node 0 (a) to node 1's (b's) `raise` events of the entity, and
    /// connects a publisher to b.
    pub fn open(cluster: &Cluster) -> anyhow::Result<HamSide> {
        let a = cluster.node(0)?;
        let b = cluster.node(1)?;
        let tap = Tap::open(
            &a.socket,
            Some(cluster.name(1)),
            SubscribeRequest {
                entities: vec![ENTITY.into()],
                kinds: vec!["raise".into()],
                follow: true,
                ..Default::default()
            },
        )?;
        // A worker of its own: the stream is sent by the connection's task, which must
        // run while the harness waits for arrivals outside the runtime.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let connect = |rt: &tokio::runtime::Runtime| {
            let socket = b.socket.clone();
            rt.block_on(async move {
                let mut c = ham::Client::connect(socket).await?;
                c.raise_stream().await
            })
        };
        let publisher = connect(&rt)?;
        let single_rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let single = connect(&single_rt)?;
        Ok(HamSide {
            tap,
            publisher,
            rt,
            single,
            single_rt,
            hams: [a.pair()?.0, b.pair()?.0],
        })
    }
}

/// The message of a `Raise`; the event's detail is "severity 0: MESSAGE".
fn message_of(detail: &str) -> &str {
    detail.split_once(": ").map_or(detail, |(_, m)| m)
}

impl Carrier for HamSide {
    fn name(&self) -> &'static str {
        "ham"
    }

    fn processes(&self) -> Vec<(&'static str, i32)> {
        vec![
            (PUBLISHER_NODE, self.hams[1]),
            ("a's HAM", self.hams[0]),
            ("harness", std::process::id() as i32),
        ]
    }

    fn one(&mut self, seq: u64) -> anyhow::Result<u64> {
        let t = mono_ns();
        let msg = payload(seq, t);
        send_now(&self.single_rt, &mut self.single, &msg)?;
        let deadline = Instant::now() + ARRIVAL_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let a = self
                .tap
                .recv(left)
                .with_context(|| format!("ham: event {seq} did not arrive at a"))?;
            if parse(message_of(&a.event.detail)).is_some_and(|(s, _)| s == seq) {
                return Ok(a.at_ns.saturating_sub(t));
            }
        }
    }

    fn flood(&mut self, first: u64, d: Duration) -> anyhow::Result<Flood> {
        self.tap.drain();
        let arrived = self.tap.accounted();
        let base = arrived.load(Ordering::Relaxed);
        let t0 = mono_ns();
        let end = Instant::now() + d;
        let publisher = &mut self.publisher;
        let before = publisher.sent();
        let mut seq = first;
        self.rt.block_on(async {
            while Instant::now() < end {
                let in_flight = (publisher.sent() - before)
                    .saturating_sub(arrived.load(Ordering::Relaxed) - base);
                if in_flight > WINDOW {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                publisher.raise(ENTITY, 0, &payload(seq, mono_ns())).await?;
                seq += 1;
            }
            Ok::<_, anyhow::Error>(())
        })?;
        let sent = publisher.sent() - before;
        settle(&arrived, base, sent);
        let mut f = Flood {
            sent,
            ..Flood::default()
        };
        let mut last = t0;
        for a in self.tap.drain() {
            if a.event.kind == "gap" {
                f.lost += gap_size(&a.event);
            } else if parse(message_of(&a.event.detail)).is_some_and(|(s, _)| s >= first) {
                f.received += 1;
                last = last.max(a.at_ns);
            }
        }
        f.lost = f.lost.max(sent.saturating_sub(f.received));
        f.secs = (last - t0) as f64 / 1e9;
        Ok(f)
    }
}
