//! False positives of failure detection: a 3-node mesh left running (nothing killed)
//! while every CPU of the machine is kept busy by spinning threads; a subscriber on
//! each node counts that node's `node-suspect` and `node-down` events. Every one is
//! false. At the end each subscriber must still receive a `raise` made on its node,
//! so a subscription that broke cannot pass for a quiet one. No peer; the membership
//! protocol and its tuning are `node_down::TUNING`.

use super::Ctx;
use super::node_down::TUNING;
use crate::cluster::Cluster;
use crate::load::Burner;
use crate::report::{Row, Unit, Value, Versus};
use crate::tap::Tap;
use anyhow::Context;
use ham::ham_proto::SubscribeRequest;
use std::time::{Duration, Instant};

/// Every node's config: a global entity to raise the final liveness check on.
const CONFIG: &str = "[[entity]]\nname = \"probe\"\nglobal = true\n";

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    let cluster = Cluster::start(&ctx.bins, "node-soak", 3, CONFIG)?;
    cluster.wait_all_up(Duration::from_secs(30))?;
    let mut taps = Vec::new();
    for i in 0..cluster.len() {
        taps.push(Tap::open(
            &cluster.node(i)?.socket,
            None,
            SubscribeRequest {
                kinds: vec!["node-suspect".into(), "node-down".into(), "raise".into()],
                follow: true,
                ..Default::default()
            },
        )?);
    }
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let soak = ctx.soak;
    eprintln!("   {soak:?} with {cpus} busy-looping threads");
    let started = Instant::now();
    {
        let _load = Burner::start(cpus)?;
        let mut minute = 1;
        while started.elapsed() < soak {
            std::thread::sleep(
                soak.saturating_sub(started.elapsed())
                    .min(Duration::from_secs(1)),
            );
            if started.elapsed() >= Duration::from_secs(60 * minute) {
                eprintln!("   {minute} min");
                minute += 1;
            }
        }
    }
    // Every subscriber still works: it gets a raise made on its node now.
    let (mut downs, mut suspects) = (0u64, 0u64);
    for (i, tap) in taps.iter().enumerate() {
        let node = cluster.node(i)?;
        let mut c = node.client()?;
        node.rt.block_on(c.raise("probe", 0, "soak over"))?;
        loop {
            let a = tap
                .recv(Duration::from_secs(10))
                .with_context(|| format!("the subscriber on {} stopped", cluster.name(i)))?;
            if a.event.kind == "raise" {
                break;
            }
            eprintln!(
                "   false at {}: {} {}",
                cluster.name(i),
                a.event.kind,
                a.event.detail
            );
            if a.event.kind == "node-down" {
                downs += 1;
            } else {
                suspects += 1;
            }
        }
    }
    let whole = cluster.wait_all_up(Duration::from_secs(10)).is_ok();
    let minutes = soak.as_secs_f64() / 60.0;
    let what = format!(
        "3 nodes on loopback, none killed, {minutes:.2} min with {cpus} busy-looping threads (every CPU)"
    );
    let versus = Versus::Nothing(format!("no peer; {TUNING}"));
    Ok(vec![
        Row {
            figure: "false node-down events, idle mesh under CPU load".into(),
            unit: Unit::Count,
            ham: Value::one(downs as f64),
            versus: versus.clone(),
            note: format!(
                "{what}; counted by a subscriber on every node (each shown alive at the end by a `raise`); mesh whole at the end: {}; goal 0",
                if whole { "yes" } else { "NO" }
            ),
        },
        Row {
            figure: "false node-suspect events, idle mesh under CPU load".into(),
            unit: Unit::Count,
            ham: Value::one(suspects as f64),
            versus,
            note: format!(
                "{what}; a suspect that answers in time is not declared down (not a failure, but a sign of margin)"
            ),
        },
    ])
}
