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
    publisher: ham::RaiseStream,
    rt: tokio::runtime::Runtime,
    hams: [i32; 2],
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
        let socket = b.socket.clone();
        let publisher = rt.block_on(async move {
            let mut c = ham::Client::connect(socket).await?;
            c.raise_stream().await
        })?;
        Ok(HamSide {
            tap,
            publisher,
            rt,
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
        self.rt.block_on(self.publisher.raise(ENTITY, 0, &msg))?;
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
