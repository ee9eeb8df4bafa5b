//! Takeover: SIGKILL of the HAM → (a) the first API answer (on a new connection, which
//! waits in the listener's backlog) and (b) every entity watched again (reported by
//! the new HAM on the shared monotonic clock), with N idle entities. Checks that no
//! entity was restarted. ham only: no peer has a HAM/Guardian pair.

use super::Ctx;
use crate::hamd::Hamd;
use crate::report::{Row, Unit, Value, Versus};
use crate::stats::Samples;
use crate::sut::ham::entities_config;
use crate::sys::{SIGKILL, Scratch, kill, mono_ns};
use anyhow::bail;
use std::time::{Duration, Instant};

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    let plan: &[(usize, usize)] = if ctx.quick {
        &[(100, 10)]
    } else {
        &[(100, 200), (1000, 100), (10_000, 50)]
    };
    let sleep = ["sleep".to_string(), "1000000".to_string()];
    let mut rows = Vec::new();
    for &(entities, samples) in plan {
        eprintln!("   {entities} entities, {samples} takeovers");
        let dir = Scratch::new("takeover")?;
        let config = entities_config(entities, &sleep, false);
        let hamd = Hamd::start(&ctx.bins, &dir, &config, entities + 16, &[])?;
        let pids = hamd.wait_running(entities, Duration::from_secs(600))?;
        let (mut first, mut watched) = (Samples::default(), Samples::default());
        for round in 0..samples {
            let (ham, _) = hamd.pair()?;
            let t0 = mono_ns();
            kill(ham, SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let socket = hamd.socket.clone();
                let ok = hamd.rt.block_on(async move {
                    let mut c = ham::Client::connect(socket).await?;
                    c.set_retry_for(Duration::ZERO);
                    c.api()
                        .describe(ham::ham_proto::EntityRef { name: "e1".into() })
                        .await
                        .map_err(ham::ClientError::from)
                });
                if ok.is_ok() {
                    first.push(mono_ns() - t0);
                    break;
                }
                if Instant::now() > deadline {
                    bail!("no answer after the takeover in round {round}");
                }
            }
            // Wait for the new pair (with its own Guardian) before the next round.
            let st = loop {
                let st = hamd.status()?;
                let p = st.pair.unwrap_or_default();
                if p.generation == round as u64 + 1 && p.guardian_pid > 0 {
                    break st;
                }
                if Instant::now() > deadline {
                    bail!("the pair did not settle in round {round}");
                }
                std::thread::sleep(Duration::from_millis(2));
            };
            let p = st.pair.unwrap_or_default();
            watched.push(p.takeover_done_mono_ns.saturating_sub(t0));
            let mut now: Vec<i32> = st.entities.iter().map(|e| e.pid).collect();
            let mut before = pids.clone();
            now.sort_unstable();
            before.sort_unstable();
            if now != before || st.entities.iter().any(|e| e.restarts > 0) {
                bail!("round {round}: an entity was restarted or lost across the takeover");
            }
        }
        let goal = "goal: p99 ≤ 20 ms at 10,000 entities";
        let why = "no peer has a HAM/Guardian pair";
        rows.push(Row {
            figure: format!("takeover, {entities} entities: kill -9 of the HAM → first API answer"),
            unit: Unit::Ns,
            ham: Value::of(&first),
            versus: Versus::Nothing(why.into()),
            note: format!("{samples} takeovers, no entity restarted (checked); {goal}"),
        });
        rows.push(Row {
            figure: format!(
                "takeover, {entities} entities: kill -9 of the HAM → every entity watched again"
            ),
            unit: Unit::Ns,
            ham: Value::of(&watched),
            versus: Versus::Nothing(why.into()),
            note: format!("{samples} takeovers; {goal}"),
        });
    }
    Ok(rows)
}
