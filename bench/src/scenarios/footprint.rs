//! Supervision footprint: resident memory of each supervisor with N idle supervised
//! processes (`sleep 1000000`), the CPU it uses while nothing happens (utime + stime
//! over an idle window: busy polling shows here), and how long it took to start them.
//!
//! All supervisors of one size run at once, so the idle window is the same for all.
//! For runit and s6 "the supervisor" is the sum over every `runsv` / `s6-supervise`
//! plus `runsvdir` / `s6-svscan`; for ham the HAM plus its Guardian. VmRSS counts
//! shared library pages in each process; PSS (in the notes) divides them.

use super::Ctx;
use crate::report::{Row, Unit, Value, Versus};
use crate::sut::{self, Kind, Supervisor, Workload};
use crate::sys::{Mem, cpu_ticks, ticks_per_second};
use anyhow::Context;
use std::time::{Duration, Instant};

/// What was measured of one supervisor.
struct Measured {
    kind: Kind,
    mem: Mem,
    /// Per-process memory, for ham's note (HAM, Guardian).
    parts: Vec<Mem>,
    processes: usize,
    cpu_percent: f64,
    startup_ns: f64,
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    let sizes: &[usize] = if ctx.quick {
        &[1, 100]
    } else {
        &[1, 100, 1000, 10_000]
    };
    let idle = ctx.pick(Duration::from_secs(10), Duration::from_secs(2));
    let mut rows = Vec::new();
    for &n in sizes {
        // The peers up to 1,000 (runsvdir's limit); ham alone beyond.
        let mut kinds = vec![Kind::Ham];
        if n <= 1000 {
            kinds.extend(&ctx.peers);
        }
        let w = Workload {
            count: n,
            argv: vec!["sleep".into(), "1000000".into()],
            env: Vec::new(),
            readiness: false,
        };
        let mut running: Vec<(Box<dyn Supervisor>, f64)> = Vec::new();
        for &kind in &kinds {
            eprintln!("   {} with {n} idle processes", kind.name());
            let t = Instant::now();
            let sup = sut::start(kind, &ctx.bins, &w)?;
            sut::wait_supervised(sup.as_ref(), n, "sleep", Duration::from_secs(600))?;
            running.push((sup, t.elapsed().as_nanos() as f64));
        }
        std::thread::sleep(Duration::from_secs(1));
        let own: Vec<Vec<i32>> = running
            .iter()
            .map(|(s, _)| s.own_pids())
            .collect::<anyhow::Result<_>>()?;
        let before: Vec<u64> = own.iter().map(|p| cpu_ticks(p)).collect();
        std::thread::sleep(idle);
        let after: Vec<u64> = own.iter().map(|p| cpu_ticks(p)).collect();
        let mut measured = Vec::new();
        for (i, (sup, startup_ns)) in running.iter().enumerate() {
            let used = after[i].saturating_sub(before[i]) as f64 / ticks_per_second();
            measured.push(Measured {
                kind: sup.kind(),
                mem: Mem::sum(&own[i]),
                parts: own[i].iter().map(|&p| Mem::of(p)).collect(),
                processes: own[i].len(),
                cpu_percent: used / idle.as_secs_f64() * 100.0,
                startup_ns: *startup_ns,
            });
        }
        for (mut sup, _) in running {
            let name = sup.kind().name();
            sup.stop().with_context(|| format!("stopping {name}"))?;
        }
        rows.extend(rows_for(n, idle, &measured));
    }
    Ok(rows)
}

fn rows_for(n: usize, idle: Duration, m: &[Measured]) -> Vec<Row> {
    let Some(ham) = m.iter().find(|x| x.kind == Kind::Ham) else {
        return Vec::new();
    };
    let ham_note = format!(
        "ham = HAM {} (RssShmem {}) + Guardian {}; PSS {}",
        mib(ham.parts.first().map_or(0, |p| p.rss)),
        mib(ham.parts.first().map_or(0, |p| p.shmem)),
        mib(ham.parts.get(1).map_or(0, |p| p.rss)),
        mib(ham.mem.pss)
    );
    let peers: Vec<&Measured> = m.iter().filter(|x| x.kind != Kind::Ham).collect();
    let mut rows = Vec::new();
    let mut add = |figure: String,
                   unit: Unit,
                   f: &dyn Fn(&Measured) -> f64,
                   note: &dyn Fn(&Measured) -> String| {
        if peers.is_empty() {
            rows.push(Row {
                figure: figure.clone(),
                unit,
                ham: Value::one(f(ham)),
                versus: Versus::Nothing("no peer at this size".into()),
                note: note(ham),
            });
        }
        for p in &peers {
            rows.push(Row {
                figure: figure.clone(),
                unit,
                ham: Value::one(f(ham)),
                versus: Versus::Peer(p.kind.name().into(), Value::one(f(p))),
                note: note(p),
            });
        }
    };
    add(
        format!("footprint, {n} idle children: RSS of the supervisor"),
        Unit::KiB,
        &|x| x.mem.rss as f64,
        &|x| {
            if x.kind == Kind::Ham {
                format!("{ham_note}; goal ≤ 15 MB idle")
            } else {
                format!(
                    "{ham_note}; {} = {} ({} processes), PSS {}",
                    x.kind.name(),
                    x.kind.whose_footprint(),
                    x.processes,
                    mib(x.mem.pss)
                )
            }
        },
    );
    add(
        format!("footprint, {n} idle children: private memory (USS) of the supervisor"),
        Unit::KiB,
        &|x| x.mem.uss as f64,
        &|x| {
            format!(
                "Private_Clean + Private_Dirty summed over {} process(es): the memory it \
                 alone costs; RSS also counts shared text and libc pages, which the kernel \
                 maps 64 KiB around every code fault",
                x.processes
            )
        },
    );
    add(
        format!(
            "footprint, {n} idle children: CPU while idle ({} s)",
            idle.as_secs()
        ),
        Unit::Percent,
        &|x| x.cpu_percent,
        &|_| "utime+stime of the supervisor's processes / wall time; goal 0".into(),
    );
    add(
        format!("footprint, {n} idle children: start → all running"),
        Unit::Ns,
        &|x| x.startup_ns,
        &|_| "supervisor started with its config → every child exec'd `sleep`".into(),
    );
    rows
}
