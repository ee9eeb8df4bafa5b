//! Missed-heartbeat detection lateness: an entity that never beats, with a 20 ms
//! period, `low = 1` and a `heartbeat-missed-low` condition that re-arms itself with
//! `heartbeat-healthy`, so hamd checks it every period. `ham status` reports
//! `timer_lateness`: how late hamd's timer wake-ups ran after their deadlines, which is
//! how late a missed beat is detected. None of s6, runit or supervisord has a heartbeat
//! or watchdog (systemd's `WatchdogSec` is the nearest peer, not measured here).

use super::Ctx;
use crate::hamd::Hamd;
use crate::report::{Row, Unit, Value, Versus};
use crate::sys::Scratch;
use anyhow::bail;
use std::time::{Duration, Instant};

const CONFIG: &str = r#"[[entity]]
name = "hb"
command = ["sleep", "1000000"]
heartbeat = { period = "20ms", low = 1, high = 1000000 }
[[entity.condition]]
on = "heartbeat-missed-low"
action = [{ do = "heartbeat-healthy" }]
"#;

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    let dir = Scratch::new("late")?;
    let hamd = Hamd::start(&ctx.bins, &dir, CONFIG, 64, &[])?;
    let want = ctx.pick(1100, 100);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let l = hamd.status()?.timer_lateness.unwrap_or_default();
        if l.samples >= want {
            return Ok(vec![Row {
                figure: "missed-heartbeat detection lateness: deadline → check".into(),
                unit: Unit::Ns,
                ham: Value {
                    median: l.p50_us as f64 * 1e3,
                    p99: Some(l.p99_us as f64 * 1e3),
                },
                versus: Versus::Nothing(
                    "no peer has one (s6, runit, supervisord: no heartbeat or watchdog)".into(),
                ),
                note: format!(
                    "{} timer wake-ups (20 ms period); max {:.2} ms; goal ≤ 1 ms",
                    l.samples,
                    l.max_us as f64 / 1e3
                ),
            }]);
        }
        if Instant::now() > deadline {
            bail!("only {} timer samples after 120 s", l.samples);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
