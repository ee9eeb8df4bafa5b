//! Node-failure detection: three nodes a, b, c; a subscriber on a follows a's own
//! `node-down` events; both processes of c (the HAM and its Guardian) are SIGKILLed
//! one right after the other, and the figure is kill → `node-down` of c at the
//! subscriber. Then c starts again (a new incarnation), the mesh is whole again, and
//! the next round begins. A `node-down` of any other node meanwhile is a false one
//! and fails the scenario. No peer: membership is SWIM (the `foca` crate) with ham's
//! tuning, see [`TUNING`].

use super::Ctx;
use crate::cluster::Cluster;
use crate::report::{Row, Unit, Value, Versus};
use crate::stats::Samples;
use crate::tap::Tap;
use anyhow::{Context, bail};
use ham::ham_proto::SubscribeRequest;
use std::time::{Duration, Instant};

/// ham's SWIM tuning (`ham_overlay::SwimTuning::default()`).
pub const TUNING: &str = "SWIM (foca): probe every 150 ms, probe RTT 100 ms, 2 indirect probes, suspect → down after 350 ms";

/// How long the mesh is left whole before the next kill.
const SETTLE: Duration = Duration::from_millis(500);

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    let rounds = ctx.pick(20, 1);
    let mut cluster = Cluster::start(&ctx.bins, "node-down", 3, "")?;
    cluster.wait_all_up(Duration::from_secs(30))?;
    let tap = Tap::open(
        &cluster.node(0)?.socket,
        None,
        SubscribeRequest {
            kinds: vec!["node-down".into()],
            follow: true,
            ..Default::default()
        },
    )?;
    let victim = 2;
    let down_of = |name: &str| format!("node {name} ");
    let mut samples = Samples::default();
    for round in 0..rounds {
        std::thread::sleep(SETTLE);
        // A late repeat about c's previous life is not a false one; any other is.
        if let Some(e) = tap
            .drain()
            .iter()
            .find(|e| !e.event.detail.starts_with(&down_of(cluster.name(victim))))
        {
            bail!("round {round}: a false node-down: {}", e.event.detail);
        }
        let t0 = cluster.kill(victim)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let a = tap
                .recv(left)
                .with_context(|| format!("round {round}: no node-down of c within 10 s"))?;
            if !a.event.detail.starts_with(&down_of(cluster.name(victim))) {
                bail!("round {round}: a false node-down: {}", a.event.detail);
            }
            // One that came before the kill is about c's previous life.
            if a.at_ns > t0 {
                samples.push(a.at_ns - t0);
                break;
            }
        }
        cluster.restart(victim)?;
        cluster.wait_all_up(Duration::from_secs(30))?;
        if round % 5 == 4 {
            eprintln!("   {} rounds", round + 1);
        }
    }
    Ok(vec![Row {
        figure:
            "node failure: kill -9 of a node's HAM and Guardian → `node-down` event at another node"
                .into(),
        unit: Unit::Ns,
        ham: Value::of(&samples),
        versus: Versus::Nothing(format!("no peer; {TUNING}")),
        note: format!(
            "{} kills of node c in a 3-node mesh on loopback, c restarted and rejoined between kills; no false node-down of a or b (checked); goal ≤ 1 s",
            samples.len()
        ),
    }])
}
