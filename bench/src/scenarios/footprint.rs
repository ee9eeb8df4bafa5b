//! Supervision footprint: resident memory of each supervisor with N idle supervised
//! processes (`sleep 1000000`), the CPU it uses while nothing happens (utime + stime
//! over an idle window: busy polling shows here), and how long it took to start them:
//! each child is `ham-bench-child`, which stamps its exec time into a FIFO and then
//! execs `sleep`, so the start-up figure does not depend on how often anyone polls.
//!
//! Then one child of each is killed and, once replaced, the resident memory is read
//! again: a supervisor that has done its job once shows the code its work runs (ham
//! gives back the pages it mapped only to start, one second after start).
//!
//! With one child, the start is also timed over repeated starts of each supervisor,
//! interleaved (a start of a few milliseconds is at the mercy of the scheduler).
//!
//! All supervisors of one size run at once, so the idle window is the same for all.
//! For runit and s6 "the supervisor" is the sum over every `runsv` / `s6-supervise`
//! plus `runsvdir` / `s6-svscan`; for ham the HAM plus its Guardian. VmRSS counts
//! shared library pages in each process; PSS (in the notes) divides them.

use super::Ctx;
use crate::report::{Row, Unit, Value, Versus};
use crate::stats::Samples;
use crate::sut::{self, Kind, Supervisor, Workload};
use crate::sys::{FifoReader, Mem, Scratch, cpu_ticks, mono_ns, ticks_per_second};
use anyhow::Context;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What was measured of one supervisor.
struct Measured {
    kind: Kind,
    mem: Mem,
    /// Per-process memory, for ham's note (HAM, Guardian).
    parts: Vec<Mem>,
    /// Memory once one child was killed and replaced.
    after_restart: Mem,
    processes: usize,
    cpu_percent: f64,
    /// Start → the last child exec'd: one start, or repeated ones (median, p99).
    startup: Value,
}

/// How many times each supervisor is started once more with one child, to time the
/// start.
const START_ROUNDS: (usize, usize) = (20, 2);

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
    let dir = Scratch::new("footprint")?;
    let mut rows = Vec::new();
    for &n in sizes {
        // The peers up to 1,000 (runsvdir's limit); ham alone beyond.
        let mut kinds = vec![Kind::Ham];
        if n <= 1000 {
            kinds.extend(&ctx.peers);
        }
        let mut running: Vec<(Box<dyn Supervisor>, f64, FifoReader)> = Vec::new();
        for &kind in &kinds {
            eprintln!("   {} with {n} idle processes", kind.name());
            let (sup, startup_ns, fifo) = start_timed(ctx, &dir, kind, n, "")?;
            running.push((sup, startup_ns as f64, fifo));
        }
        std::thread::sleep(Duration::from_secs(1));
        let own: Vec<Vec<i32>> = running
            .iter()
            .map(|(s, _, _)| s.own_pids())
            .collect::<anyhow::Result<_>>()?;
        let before: Vec<u64> = own.iter().map(|p| cpu_ticks(p)).collect();
        std::thread::sleep(idle);
        let after: Vec<u64> = own.iter().map(|p| cpu_ticks(p)).collect();
        let idle_mem: Vec<(Mem, Vec<Mem>)> = own
            .iter()
            .map(|p| (Mem::sum(p), p.iter().map(|&p| Mem::of(p)).collect()))
            .collect();
        for (sup, _, _) in running.iter_mut() {
            restart_one(sup.as_mut(), n)?;
        }
        std::thread::sleep(Duration::from_millis(500));
        let mut measured = Vec::new();
        for (i, ((sup, startup_ns, _), (mem, parts))) in running.iter().zip(idle_mem).enumerate() {
            let used = after[i].saturating_sub(before[i]) as f64 / ticks_per_second();
            measured.push(Measured {
                kind: sup.kind(),
                mem,
                parts,
                after_restart: Mem::sum(&sup.own_pids()?),
                processes: own[i].len(),
                cpu_percent: used / idle.as_secs_f64() * 100.0,
                startup: Value::one(*startup_ns),
            });
        }
        // The FIFOs stay open until the supervisors stop: a replacement child opening
        // one with no reader would block before it execs `sleep`.
        for (mut sup, _, _fifo) in running {
            let name = sup.kind().name();
            sup.stop().with_context(|| format!("stopping {name}"))?;
        }
        if n == 1 {
            let rounds = ctx.pick(START_ROUNDS.0, START_ROUNDS.1);
            eprintln!("   each started {rounds} more times with 1 child, interleaved");
            let starts = start_rounds(ctx, &dir, &kinds, rounds)?;
            for (m, s) in measured.iter_mut().zip(&starts) {
                m.startup = Value::of(s);
            }
        }
        rows.extend(rows_for(n, idle, &measured));
    }
    Ok(rows)
}

/// Starts `kind` with `n` children (`ham-bench-child`, which then execs `sleep`) and
/// waits until all run; returns it, the time from its start to the last child's exec,
/// and the children's FIFO, which must stay open until it stops (a replacement child
/// opening it with no reader would block before it execs `sleep`).
fn start_timed(
    ctx: &Ctx,
    dir: &Scratch,
    kind: Kind,
    n: usize,
    round: &str,
) -> anyhow::Result<(Box<dyn Supervisor>, u64, FifoReader)> {
    let fifo = dir.fifo(&format!("{kind:?}-{n}{round}.fifo"))?;
    // Open before any child starts, so no child blocks opening it.
    let stamps = ExecStamps::collect(FifoReader::open(&fifo)?, n);
    let w = Workload {
        count: n,
        argv: vec![ctx.bins.get("ham-bench-child").display().to_string()],
        env: vec![
            ("HAM_BENCH_FIFO".into(), fifo.display().to_string()),
            ("HAM_BENCH_THEN_EXEC".into(), "sleep 1000000".into()),
        ],
        readiness: false,
    };
    let t0 = mono_ns();
    let sup = sut::start(kind, &ctx.bins, &w)?;
    let (fifo, last_exec) = stamps
        .finish()
        .with_context(|| format!("{}: starting {n} children", kind.name()))?;
    sut::wait_supervised(sup.as_ref(), n, "sleep", Duration::from_secs(600))?;
    Ok((sup, last_exec.saturating_sub(t0), fifo))
}

/// Starts and stops each of `kinds` with one child `rounds` times, interleaved (A B A
/// B …); the start → exec times, in `kinds`' order.
fn start_rounds(
    ctx: &Ctx,
    dir: &Scratch,
    kinds: &[Kind],
    rounds: usize,
) -> anyhow::Result<Vec<Samples>> {
    let mut samples: Vec<Samples> = kinds.iter().map(|_| Samples::default()).collect();
    for round in 0..rounds {
        for (&kind, s) in kinds.iter().zip(samples.iter_mut()) {
            let (mut sup, ns, _fifo) = start_timed(ctx, dir, kind, 1, &format!("-{round}"))?;
            s.push(ns);
            sup.stop()
                .with_context(|| format!("stopping {}", kind.name()))?;
        }
    }
    Ok(samples)
}

/// Kills one of `sup`'s `n` children and waits until it is replaced.
fn restart_one(sup: &mut dyn Supervisor, n: usize) -> anyhow::Result<()> {
    let name = sup.kind().name();
    let before = sut::wait_supervised(sup, n, "sleep", Duration::from_secs(60))?;
    let victim = before[0];
    sup.crash(victim)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = sut::wait_supervised(sup, n, "sleep", Duration::from_secs(30))?;
        if !now.contains(&victim) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{name}: child {victim} not replaced within 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The exec times of a supervisor's first `n` children, read from their FIFO on a
/// thread of its own while the supervisor starts (a FIFO holds 64 KiB: thousands of
/// children would block on it if nobody read).
struct ExecStamps {
    reader: JoinHandle<anyhow::Result<(FifoReader, u64)>>,
}

impl ExecStamps {
    /// Starts reading `n` "PID NANOS" lines from `fifo`.
    fn collect(mut fifo: FifoReader, n: usize) -> ExecStamps {
        let reader = std::thread::spawn(move || {
            let mut last = 0;
            for _ in 0..n {
                let (_, ns) = fifo.next(Duration::from_secs(600))?;
                last = last.max(ns);
            }
            Ok((fifo, last))
        });
        ExecStamps { reader }
    }

    /// Waits for all `n` lines; returns the FIFO (still open) and the latest exec time.
    fn finish(self) -> anyhow::Result<(FifoReader, u64)> {
        self.reader
            .join()
            .map_err(|_| anyhow::anyhow!("the FIFO reader panicked"))?
    }
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
                   f: &dyn Fn(&Measured) -> Value,
                   note: &dyn Fn(&Measured) -> String| {
        if peers.is_empty() {
            rows.push(Row {
                figure: figure.clone(),
                unit,
                ham: f(ham),
                versus: Versus::Nothing("no peer at this size".into()),
                note: note(ham),
            });
        }
        for p in &peers {
            rows.push(Row {
                figure: figure.clone(),
                unit,
                ham: f(ham),
                versus: Versus::Peer(p.kind.name().into(), f(p)),
                note: note(p),
            });
        }
    };
    add(
        format!("footprint, {n} idle children: RSS of the supervisor"),
        Unit::KiB,
        &|x| Value::one(x.mem.rss as f64),
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
        format!("footprint, {n} children: RSS of the supervisor after one restart"),
        Unit::KiB,
        &|x| Value::one(x.after_restart.rss as f64),
        &|x| {
            format!(
                "one child killed and replaced, then 0.5 s; PSS {}, private {}",
                mib(x.after_restart.pss),
                mib(x.after_restart.anon + x.after_restart.shmem)
            )
        },
    );
    add(
        format!("footprint, {n} idle children: private memory of the supervisor"),
        Unit::KiB,
        &|x| Value::one((x.mem.anon + x.mem.shmem) as f64),
        &|x| {
            format!(
                "Anonymous summed over {} process(es), plus shared memory once (ham's store \
                 and heartbeat table: {}): the memory it alone costs. RSS also counts code \
                 and constants, pages of files held by the page cache, which the kernel \
                 maps 64 KiB around every code fault",
                x.processes,
                mib(x.mem.shmem)
            )
        },
    );
    add(
        format!(
            "footprint, {n} idle children: CPU while idle ({} s)",
            idle.as_secs()
        ),
        Unit::Percent,
        &|x| Value::one(x.cpu_percent),
        &|_| "utime+stime of the supervisor's processes / wall time; goal 0".into(),
    );
    add(
        format!("footprint, {n} idle children: start → all running"),
        Unit::Ns,
        &|x| x.startup,
        &|_| {
            let rounds = if n == 1 {
                "; median and p99 of starts interleaved with the other supervisors'"
            } else {
                "; one start"
            };
            format!(
                "supervisor started with its config → the last child exec'd (each child stamps \
                 CLOCK_MONOTONIC at its first instruction into a FIFO, then execs `sleep`){rounds}"
            )
        },
    );
    rows
}
