//! ham's side: `Raise` on node b's socket, a subscriber on node a's socket that follows
//! b's events through the mesh.

use super::{ARRIVAL_TIMEOUT, Carrier, Flood, WINDOW, parse, payload, settle};
use crate::cluster::Cluster;
use crate::sys::mono_ns;
use crate::tap::{Tap, gap_size};
use anyhow::Context;
use ham::ham_proto::SubscribeRequest;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Concurrent publisher connections in a flood (each `Raise` is one round trip).
pub const PUBLISHERS: usize = 8;

/// The publishing node's HAM, in the CPU figures.
pub const PUBLISHER_NODE: &str = "b's HAM";

/// The entity the events are raised on (global, declared on every node).
const ENTITY: &str = "bench";

/// ham, publishing on b and subscribed on a.
pub struct HamSide {
    tap: Tap,
    publisher: ham::Client,
    b_socket: PathBuf,
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
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let socket = b.socket.clone();
        let publisher = rt.block_on(ham::Client::connect(socket))?;
        Ok(HamSide {
            tap,
            publisher,
            b_socket: b.socket.clone(),
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
        let next = Arc::new(AtomicU64::new(first));
        let sent = Arc::new(AtomicU64::new(0));
        let t0 = mono_ns();
        let end = Instant::now() + d;
        self.rt.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..PUBLISHERS {
                let (next, sent, arrived) = (next.clone(), sent.clone(), arrived.clone());
                let socket = self.b_socket.clone();
                tasks.push(tokio::spawn(async move {
                    let mut c = ham::Client::connect(socket).await?;
                    while Instant::now() < end {
                        let in_flight = sent
                            .load(Ordering::Relaxed)
                            .saturating_sub(arrived.load(Ordering::Relaxed) - base);
                        if in_flight > WINDOW {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            continue;
                        }
                        let seq = next.fetch_add(1, Ordering::Relaxed);
                        c.raise(ENTITY, 0, &payload(seq, mono_ns())).await?;
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok::<_, ham::ClientError>(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            Ok::<_, anyhow::Error>(())
        })?;
        let sent = sent.load(Ordering::Relaxed);
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
