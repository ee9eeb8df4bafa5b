//! A 16-node mesh on one machine: 16 `hamd` nodes (127.0.0.2 … 127.0.0.17) started at
//! once, every one seeded with the first; the figure is start → every node sees all
//! 16 up. Then the memory each peer costs a node: the mean HAM RSS of a node in the
//! 16-node mesh, minus a lone mesh node's, over its 15 peers. No peer.

use super::Ctx;
use crate::cluster::Cluster;
use crate::report::{Row, Unit, Value, Versus};
use crate::stats::Samples;
use crate::sys::Mem;
use anyhow::bail;
use std::time::{Duration, Instant};

/// How long a mesh runs whole before its memory is read (connections made, buffers
/// warm), in a full run and in quick mode.
const SETTLE: [Duration; 2] = [Duration::from_secs(3), Duration::from_secs(1)];

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    let n = ctx.pick(16, 4);
    let rounds = ctx.pick(3, 1);
    let settle = ctx.pick(SETTLE[0], SETTLE[1]);
    let lone = {
        let c = Cluster::start(&ctx.bins, "mesh-lone", 1, "")?;
        std::thread::sleep(settle);
        Mem::sum(&c.ham_pids()?).rss
    };
    let all: Vec<usize> = (0..n).collect();
    let mut boot = Samples::default();
    let mut mesh_rss = 0;
    for round in 0..rounds {
        let mut c = Cluster::prepare(&ctx.bins, "mesh-scale", n, "")?;
        let t0 = Instant::now();
        c.boot()?;
        let mut seen: Vec<Option<Duration>> = vec![None; n];
        while seen.iter().any(Option::is_none) {
            for (i, seen) in seen.iter_mut().enumerate() {
                if seen.is_none() && c.sees_up(i, &all)? {
                    *seen = Some(t0.elapsed());
                }
            }
            if t0.elapsed() > Duration::from_secs(120) {
                bail!("round {round}: the {n}-node mesh did not come up within 120 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let whole = seen.iter().flatten().max().copied().unwrap_or_default();
        eprintln!("   round {round}: all {n} nodes see all up after {whole:?}");
        boot.push(whole.as_nanos() as u64);
        if round + 1 == rounds {
            std::thread::sleep(settle);
            c.wait_all_up(Duration::from_secs(10))?;
            mesh_rss = Mem::sum(&c.ham_pids()?).rss;
        }
    }
    let mean = mesh_rss as f64 / n as f64;
    let per_peer = (mean - lone as f64) / (n - 1) as f64;
    let none = "no peer";
    let cpus = std::thread::available_parallelism().map_or(0, |c| c.get());
    Ok(vec![
        Row {
            figure: format!("{n}-node mesh on one machine: start → every node sees all {n} up"),
            unit: Unit::Ns,
            ham: Value::one(boot.median() as f64),
            versus: Versus::Nothing(none.into()),
            note: format!(
                "median of {rounds} boots; {n} hamd (HAM + Guardian each) started at once on 127.0.0.2…, each seeded with the first; polled every 20 ms (`Nodes`); {cpus} CPUs for all"
            ),
        },
        Row {
            figure: format!("{n}-node mesh: HAM memory (RSS) per peer"),
            unit: Unit::KiB,
            ham: Value::one(per_peer),
            versus: Versus::Nothing(none.into()),
            note: format!(
                "(mean HAM RSS of a node with {} peers {:.1} MiB − a lone mesh node's {:.1} MiB) / {}; {settle:?} after all up",
                n - 1,
                mean / 1024.0,
                lone as f64 / 1024.0,
                n - 1
            ),
        },
    ])
}
