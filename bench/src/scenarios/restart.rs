//! Restart latency: SIGKILL of a supervised process → its replacement has exec'd.
//!
//! Every supervisor (ham, the floor, each peer) supervises the same K copies of
//! `ham-bench-child`, which writes "PID NANOS" (CLOCK_MONOTONIC at its first
//! instructions) to its supervisor's FIFO. A sample takes t0 just before the SIGKILL
//! and reads the replacement's line: latency = NANOS − t0. Samples are interleaved
//! round by round (ham, floor, s6, runsv, supervisord, the starting one rotating), so
//! drift hits all alike; every supervisor keeps running across samples. The victim is
//! always the oldest child and has lived at least [`MIN_AGE_NS`], so the peers'
//! "restarted too quickly" pacing never applies (see `Kind::pacing`).

use super::Ctx;
use crate::report::{Row, Unit, Value, Versus};
use crate::stats::Samples;
use crate::sut::{self, Kind, Supervisor, Workload};
use crate::sys::{FifoReader, Scratch, mono_ns};
use anyhow::{Context, bail, ensure};
use std::collections::VecDeque;
use std::time::Duration;

/// How many children each supervisor has.
const CHILDREN: usize = 50;
/// How long a child has lived, at least, when it is killed.
pub const MIN_AGE_NS: u64 = 1_100_000_000;
/// How long a replacement may take before the scenario fails.
const REPLACEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// One supervisor being sampled.
struct Lane {
    sup: Box<dyn Supervisor>,
    fifo: FifoReader,
    /// Its children, oldest first: (PID, exec time).
    children: VecDeque<(i32, u64)>,
    samples: Samples,
    target: usize,
}

impl Lane {
    fn start(ctx: &Ctx, dir: &Scratch, kind: Kind, target: usize) -> anyhow::Result<Lane> {
        let path = dir.fifo(&format!("{kind:?}.fifo"))?;
        // Open before any child starts, so no child blocks opening it.
        let mut fifo = FifoReader::open(&path)?;
        let w = Workload {
            count: CHILDREN,
            argv: vec![ctx.bins.get("ham-bench-child").display().to_string()],
            env: vec![("HAM_BENCH_FIFO".into(), path.display().to_string())],
            readiness: true,
        };
        let sup = sut::start(kind, &ctx.bins, &w)?;
        let mut children = Vec::new();
        for _ in 0..CHILDREN {
            children.push(
                fifo.next(Duration::from_secs(60))
                    .with_context(|| format!("{}: the children did not start", kind.name()))?,
            );
        }
        children.sort_by_key(|&(_, ns)| ns);
        Ok(Lane {
            sup,
            fifo,
            children: children.into(),
            samples: Samples::default(),
            target,
        })
    }

    /// Kills the oldest child (once it is old enough) and times its replacement.
    fn sample(&mut self) -> anyhow::Result<()> {
        let name = self.sup.kind().name();
        let (pid, born) = self.children.pop_front().context("no children")?;
        let age = mono_ns().saturating_sub(born);
        if age < MIN_AGE_NS {
            std::thread::sleep(Duration::from_nanos(MIN_AGE_NS - age));
        }
        let t0 = mono_ns();
        self.sup.crash(pid)?;
        let (new, t1) = self
            .fifo
            .next(REPLACEMENT_TIMEOUT)
            .with_context(|| format!("{name}: after killing pid {pid}"))?;
        ensure!(
            t1 > t0 && new != pid && !self.children.iter().any(|&(p, _)| p == new),
            "{name}: a line from pid {new} at {t1} that is not the replacement of {pid} killed at {t0}"
        );
        self.samples.push(t1 - t0);
        self.children.push_back((new, t1));
        Ok(())
    }
}

/// Runs the scenario: rows of ham against the floor and each peer.
pub fn run(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    // A p99 is set by its slowest hundredth: 3,000 samples put 30 there, not 10.
    let n = ctx.pick(3000, 50);
    let dir = Scratch::new("restart")?;
    let mut kinds = vec![Kind::Ham, Kind::Floor];
    kinds.extend(&ctx.peers);
    let mut lanes = Vec::new();
    for &kind in &kinds {
        // A peer that restarts on a 1 s poll gives the same figure every time: fewer
        // samples of it (each costs a second) say as much.
        let target = match (ctx.quick, kind.timer_paced()) {
            (true, true) => 3,
            (false, true) => 200,
            _ => n,
        };
        eprintln!(
            "   starting {} with {CHILDREN} children ({target} samples)",
            kind.name()
        );
        lanes.push(Lane::start(ctx, &dir, kind, target)?);
    }
    let mut round = 0usize;
    while lanes.iter().any(|l| l.samples.len() < l.target) {
        let count = lanes.len();
        for j in 0..count {
            let lane = &mut lanes[(round + j) % count];
            if lane.samples.len() < lane.target {
                lane.sample()?;
            }
        }
        round += 1;
        if round.is_multiple_of(100) {
            eprintln!("   {round} rounds");
        }
    }
    // ham counted every restart, and only those.
    if let Some(ham) = lanes.iter().find(|l| l.sup.kind() == Kind::Ham) {
        let supervised = ham.sup.supervised()?;
        ensure!(
            supervised.len() == CHILDREN,
            "ham supervises {} processes, not {CHILDREN}",
            supervised.len()
        );
    }
    for lane in &mut lanes {
        lane.sup
            .stop()
            .with_context(|| format!("stopping {}", lane.sup.kind().name()))?;
    }
    let Some(ham) = lanes.iter().find(|l| l.sup.kind() == Kind::Ham) else {
        bail!("no ham lane");
    };
    let ham_v = Value::of(&ham.samples);
    Ok(lanes
        .iter()
        .filter(|l| l.sup.kind() != Kind::Ham)
        .map(|l| Row {
            figure: "restart latency: kill -9 → replacement exec'd".into(),
            unit: Unit::Ns,
            ham: ham_v,
            versus: Versus::Peer(l.sup.kind().name().into(), Value::of(&l.samples)),
            note: format!(
                "{} + {} samples, interleaved; {CHILDREN} children each, the oldest killed{}",
                ham.samples.len(),
                l.samples.len(),
                if l.sup.kind().timer_paced() {
                    "; ≈1 s is supervisord's poll timeout"
                } else {
                    ""
                }
            ),
        })
        .collect())
}
