//! nats-server's side: two clustered servers, PUB to b's, SUB on a's.

use super::{ARRIVAL_TIMEOUT, Carrier, Flood, WINDOW, parse, payload, settle};
use crate::nats::client::Conn;
use crate::nats::server::NatsPair;
use crate::nats::tap::NatsTap;
use crate::sys::{Scratch, mono_ns};
use anyhow::Context;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The subject every message goes to.
const SUBJECT: &str = "ham.bench";

/// nats-server, publishing on b and subscribed on a. Field order is drop order: the
/// connections close before the servers stop, and the scratch directory goes last.
pub struct NatsSide {
    tap: NatsTap,
    publisher: Conn,
    servers: NatsPair,
    _dir: Scratch,
}

impl NatsSide {
    /// Starts the two servers, subscribes on a and waits until b's messages reach it.
    pub fn open(bin: &Path) -> anyhow::Result<NatsSide> {
        let dir = Scratch::new("nats")?;
        let servers = NatsPair::start(bin, &dir)?;
        let tap = NatsTap::open(servers.a.addr, SUBJECT)?;
        servers.wait_routed(&tap, SUBJECT)?;
        let publisher = Conn::connect(servers.b.addr)?;
        Ok(NatsSide {
            tap,
            publisher,
            servers,
            _dir: dir,
        })
    }
}

fn seq_of(payload: &[u8]) -> Option<(u64, u64)> {
    parse(std::str::from_utf8(payload).ok()?)
}

impl Carrier for NatsSide {
    fn name(&self) -> &'static str {
        "nats-server"
    }

    fn processes(&self) -> Vec<(&'static str, i32)> {
        vec![
            ("server b", self.servers.b.pid()),
            ("server a", self.servers.a.pid()),
            ("harness", std::process::id() as i32),
        ]
    }

    fn one(&mut self, seq: u64) -> anyhow::Result<u64> {
        let t = mono_ns();
        self.publisher
            .publish(SUBJECT, payload(seq, t).as_bytes())?;
        self.publisher.send()?;
        let deadline = Instant::now() + ARRIVAL_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let d = self
                .tap
                .recv(left)
                .with_context(|| format!("nats: message {seq} did not arrive at a"))?;
            if seq_of(&d.payload).is_some_and(|(s, _)| s == seq) {
                return Ok(d.at_ns.saturating_sub(t));
            }
        }
    }

    fn flood(&mut self, first: u64, d: Duration) -> anyhow::Result<Flood> {
        self.tap.drain();
        let arrived = self.tap.received();
        let base = arrived.load(Ordering::Relaxed);
        let t0 = mono_ns();
        let end = Instant::now() + d;
        let mut sent = 0u64;
        while Instant::now() < end {
            let in_flight = sent.saturating_sub(arrived.load(Ordering::Relaxed) - base);
            if in_flight > WINDOW {
                self.publisher.send()?;
                std::thread::sleep(Duration::from_micros(20));
                continue;
            }
            let p = payload(first + sent, mono_ns());
            self.publisher.publish(SUBJECT, p.as_bytes())?;
            sent += 1;
        }
        self.publisher.send()?;
        settle(&arrived, base, sent);
        let mut f = Flood {
            sent,
            ..Flood::default()
        };
        let mut last = t0;
        for d in self.tap.drain() {
            if seq_of(&d.payload).is_some_and(|(s, _)| s >= first) {
                f.received += 1;
                last = last.max(d.at_ns);
            }
        }
        f.lost = sent.saturating_sub(f.received);
        f.secs = (last - t0) as f64 / 1e9;
        Ok(f)
    }
}
