//! Heartbeat cost on the entity's side: the shared-memory fast path
//! (`ham::Heartbeat::beat`, one atomic add, no syscall) in a tight loop, and the API path
//! (`ham::Client::heartbeat`, one gRPC round trip over the Unix socket) per call.
//! No peer has heartbeats (systemd's `WatchdogSec` is the nearest thing, and none of
//! s6, runit or supervisord has one).

use super::Ctx;
use crate::hamd::Hamd;
use crate::report::{Row, Unit, Value, Versus};
use crate::stats::Samples;
use crate::sys::Scratch;
use std::time::Instant;

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    let dir = Scratch::new("beat")?;
    let hamd = Hamd::start(&ctx.bins, &dir, "", 64, &[])?;
    let mut client = hamd.client()?;
    let me = hamd.rt.block_on(async {
        client
            .attach_self("bench", Some(ham::HeartbeatContract::every_ms(1000, 5, 10)))
            .await
    })?;
    let beats: u64 = ctx.pick(10_000_000, 100_000);
    let hb = me.heartbeat();
    let t0 = Instant::now();
    for _ in 0..beats {
        std::hint::black_box(hb.beat());
    }
    let per_beat = t0.elapsed().as_nanos() as f64 / beats as f64;
    let calls = ctx.pick(2000, 100);
    let mut api = Samples::default();
    for _ in 0..calls {
        let t = Instant::now();
        hamd.rt.block_on(client.heartbeat("bench"))?;
        api.push(t.elapsed().as_nanos() as u64);
    }
    // This process is an entity now: leave before hamd stops its entities.
    hamd.rt.block_on(client.detach("bench"))?;
    let none = "no peer has one (s6, runit, supervisord: no heartbeat)";
    Ok(vec![
        Row {
            figure: "heartbeat cost, shared-memory fast path (`Heartbeat::beat`)".into(),
            unit: Unit::Ns,
            ham: Value::one(per_beat),
            versus: Versus::Nothing(none.into()),
            note: format!("mean over {beats} beats in a tight loop; goal ≤ 50 ns per beat"),
        },
        Row {
            figure: "heartbeat cost, API path (`Client::heartbeat`)".into(),
            unit: Unit::Ns,
            ham: Value::of(&api),
            versus: Versus::Nothing(none.into()),
            note: format!("{calls} calls, each one gRPC round trip over the Unix socket"),
        },
    ])
}
