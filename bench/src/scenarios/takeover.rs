//! Takeover: SIGKILL of the HAM → (a) the first API answer (on a new connection, which
//! waits in the listener's backlog) and (b) every entity watched again (reported by
//! the new HAM on the shared monotonic clock), with N idle entities. Checks that no
//! entity was restarted. ham only: no peer has a HAM/Guardian pair.
//!
//! Each kill comes [`SETTLE`] after the previous takeover, when the new Guardian has
//! made its warm copy of the state (as it has in life: a HAM is not killed again within
//! a second of its takeover). A kill within that time takes the cold path, which reads
//! and decodes the whole store: `takeover, N entities, cold` rows.

use super::Ctx;
use crate::hamd::Hamd;
use crate::report::{Row, Unit, Value, Versus};
use crate::stats::Samples;
use crate::sut::ham::entities_config;
use crate::sys::{SIGKILL, Scratch, Subreaper, kill, mono_ns};
use anyhow::bail;
use std::time::{Duration, Instant};

/// How long after a takeover the next kill comes: the new Guardian is warm by then.
const SETTLE: Duration = Duration::from_millis(600);

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    let mut plan: Vec<(usize, usize)> = if ctx.quick {
        vec![(100, 10)]
    } else {
        vec![(100, 200), (1000, 100), (10_000, 60)]
    };
    if let Some(sizes) = &ctx.takeover_sizes {
        plan = sizes.iter().map(|&n| (n, ctx.pick(60, 10))).collect();
    }
    let sleep = ["sleep".to_string(), "1000000".to_string()];
    let reaper = Subreaper::new()?;
    let mut rows = Vec::new();
    for (entities, samples) in plan {
        eprintln!("   {entities} entities, {samples} takeovers");
        let dir = Scratch::new("takeover")?;
        let config = entities_config(entities, &sleep, false);
        let hamd = Hamd::start(&ctx.bins, &dir, &config, entities + 16, &[])?;
        let pids = hamd.wait_running(entities, Duration::from_secs(600))?;
        let (mut first, mut watched) = (Samples::default(), Samples::default());
        let (mut cold_first, mut cold_watched) = (Samples::default(), Samples::default());
        // Where the time goes (warm rounds): kill → the Guardian notices (the store
        // lock is granted), and notice → every entity watched.
        let (mut notice, mut notice_watched) = (Samples::default(), Samples::default());
        // Major page faults of the Guardian while it takes over (warm rounds): code or
        // data read back from disk on the takeover's path.
        let mut major_faults: Vec<u64> = Vec::new();
        for round in 0..samples {
            // Even rounds wait for a warm Guardian, odd ones kill at once (cold).
            let cold = round % 2 == 1;
            if !cold {
                std::thread::sleep(SETTLE);
            }
            let (first, watched) = if cold {
                (&mut cold_first, &mut cold_watched)
            } else {
                (&mut first, &mut watched)
            };
            let (ham, guardian) = hamd.pair()?;
            let faults_before = major_faults_of(guardian);
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
            if !cold {
                let noticed = p.takeover_done_mono_ns - p.takeover_us * 1000;
                notice.push(noticed.saturating_sub(t0));
                notice_watched.push(p.takeover_us * 1000);
                if let (Some(a), Some(b)) = (faults_before, major_faults_of(guardian)) {
                    major_faults.push(b.saturating_sub(a));
                }
            }
            let mut now: Vec<i32> = st.entities.iter().map(|e| e.pid).collect();
            let mut before = pids.clone();
            now.sort_unstable();
            before.sort_unstable();
            if now != before || st.entities.iter().any(|e| e.restarts > 0) {
                bail!("round {round}: an entity was restarted or lost across the takeover");
            }
            reaper.reap(ham, Duration::from_secs(10));
        }
        let last = hamd.pair().ok();
        drop(hamd);
        for pid in last.into_iter().flat_map(|(h, g)| [h, g]) {
            reaper.reap(pid, Duration::from_secs(5));
        }
        let goal = "goal: p99 ≤ 20 ms at 10,000 entities";
        let why = "no peer has a HAM/Guardian pair";
        let ms = |ns: u64| ns as f64 / 1e6;
        let split = format!(
            "; warm rounds split (median / p99): kill → noticed {:.1} / {:.1} ms, noticed → watched {:.1} / {:.1} ms; major page faults of the Guardian taking over: {} in {} rounds (at most {} in one)",
            ms(notice.median()),
            ms(notice.p99()),
            ms(notice_watched.median()),
            ms(notice_watched.p99()),
            major_faults.iter().sum::<u64>(),
            major_faults.len(),
            major_faults.iter().max().copied().unwrap_or(0)
        );
        eprintln!("  {entities} entities{split}");
        for (how, first, watched) in [
            ("warm Guardian", &first, &watched),
            ("cold: killed again at once", &cold_first, &cold_watched),
        ] {
            let n = first.len();
            rows.push(Row {
                figure: format!(
                    "takeover, {entities} entities, {how}: kill -9 of the HAM → first API answer"
                ),
                unit: Unit::Ns,
                ham: Value::of(first),
                versus: Versus::Nothing(why.into()),
                note: format!("{n} takeovers, no entity restarted (checked); {goal}"),
            });
            rows.push(Row {
                figure: format!(
                    "takeover, {entities} entities, {how}: kill -9 of the HAM → every entity watched again"
                ),
                unit: Unit::Ns,
                ham: Value::of(watched),
                versus: Versus::Nothing(why.into()),
                note: if how.starts_with("warm") {
                    format!("{n} takeovers; {goal}{split}")
                } else {
                    format!("{n} takeovers; {goal}")
                },
            });
        }
    }
    Ok(rows)
}

/// A process's major page faults so far (`/proc/PID/stat`, field 12).
fn major_faults_of(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(9)?.parse().ok()
}
