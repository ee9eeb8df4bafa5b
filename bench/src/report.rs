//! The report: one table of figures (ham beside each peer, with ratios), the machine it
//! ran on, and BENCHMARKS.md, whose generated part sits between two markers so that
//! hand-written notes around it survive the next run.

use crate::stats::{Samples, fmt_ns, ratio};
use anyhow::Context;
use std::path::Path;

/// The unit of a figure, which decides how it is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Nanoseconds, printed as ns, µs, ms or s.
    Ns,
    /// Kibibytes, printed as MiB (as KiB below 1 MiB).
    KiB,
    /// A percentage of one CPU.
    Percent,
    /// Events per second.
    PerSec,
    /// A plain count.
    Count,
}

/// One measured value: a median (or single value) and, for distributions, a p99.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Value {
    /// The median, or the value.
    pub median: f64,
    /// The 99th percentile, for distributions.
    pub p99: Option<f64>,
}

impl Value {
    /// A single value.
    pub fn one(v: f64) -> Value {
        Value {
            median: v,
            p99: None,
        }
    }

    /// The median and p99 of samples.
    pub fn of(s: &Samples) -> Value {
        Value {
            median: s.median() as f64,
            p99: Some(s.p99() as f64),
        }
    }
}

/// What ham is compared with on one row.
#[derive(Clone, Debug, PartialEq)]
pub enum Versus {
    /// A peer (or the floor) measured in the same run.
    Peer(String, Value),
    /// No comparison; the text says why (e.g. "no peer has one") or gives the goal.
    Nothing(String),
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// What is measured.
    pub figure: String,
    /// Its unit.
    pub unit: Unit,
    /// ham's value.
    pub ham: Value,
    /// What it is compared with.
    pub versus: Versus,
    /// A short note: sample count, goal, caveat.
    pub note: String,
}

fn fmt(unit: Unit, v: f64) -> String {
    match unit {
        Unit::Ns => fmt_ns(v),
        Unit::KiB if v.abs() < 1024.0 => format!("{v:.0} KiB"),
        Unit::KiB => format!("{:.1} MiB", v / 1024.0),
        Unit::Percent => format!("{v:.2} %"),
        Unit::PerSec if v >= 1e6 => format!("{:.2} M/s", v / 1e6),
        Unit::PerSec if v >= 1e3 => format!("{:.1} k/s", v / 1e3),
        Unit::PerSec => format!("{v:.0} /s"),
        Unit::Count => format!("{v:.0}"),
    }
}

fn fmt_opt(unit: Unit, v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| fmt(unit, v))
}

/// Renders rows as a Markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| figure | ham median | ham p99 | compared with | its median | its p99 | ham/it median | ham/it p99 | note |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let (peer, pm, pp, rm, rp) = match &r.versus {
            Versus::Peer(name, v) => (
                name.clone(),
                fmt(r.unit, v.median),
                fmt_opt(r.unit, v.p99),
                ratio(Some(r.ham.median), Some(v.median)),
                ratio(r.ham.p99, v.p99),
            ),
            Versus::Nothing(why) => (why.clone(), "-".into(), "-".into(), "-".into(), "-".into()),
        };
        t.push_str(&format!(
            "| {} | {} | {} | {peer} | {pm} | {pp} | {rm} | {rp} | {} |\n",
            r.figure,
            fmt(r.unit, r.ham.median),
            fmt_opt(r.unit, r.ham.p99),
            r.note
        ));
    }
    t
}

fn first_line_value(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// The machine: CPUs, CPU model, kernel, memory, and the peers' versions.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = first_line_value(&cpuinfo, "model name").unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = first_line_value(&meminfo, "MemTotal")
        .and_then(|v| {
            v.split_whitespace()
                .next()
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or_else(
            || "unknown".into(),
            |kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0),
        );
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let versions = std::process::Command::new("dpkg-query")
        .args([
            "-W",
            "-f",
            "${Package} ${Version}, ",
            "s6",
            "runit",
            "supervisor",
            "nats-server",
        ])
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .trim_end_matches(',')
                .to_string()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "none installed".into());
    format!(
        "- CPUs (nproc): {nproc}\n- CPU model: {model}\n- kernel: Linux {}\n- memory: {mem_gib}\n- peers (Debian packages): {versions}\n",
        kernel.trim()
    )
}

/// How an executable is linked: "static" without a program interpreter (no
/// `PT_INTERP` header: nothing loaded at start), else "dynamically linked".
pub fn linkage(exe: &std::path::Path) -> anyhow::Result<&'static str> {
    const PT_INTERP: u32 = 3;
    /// The headers sit at the start; the executable is tens of megabytes.
    const HEADERS: u64 = 64 * 1024;
    let mut elf = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(
            std::fs::File::open(exe).with_context(|| format!("cannot open {}", exe.display()))?,
            HEADERS,
        ),
        &mut elf,
    )
    .with_context(|| format!("cannot read {}", exe.display()))?;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let word = |o: usize, n: usize| {
        elf.get(o..o + n)
            .map(|b| b.iter().rev().fold(0u64, |v, &x| (v << 8) | u64::from(x)))
    };
    anyhow::ensure!(
        elf.starts_with(b"\x7fELF\x02\x01"),
        "{} is not a 64-bit little-endian ELF file",
        exe.display()
    );
    let (Some(phoff), Some(size), Some(count)) = (word(0x20, 8), u16_at(0x36), u16_at(0x38)) else {
        anyhow::bail!("{}: truncated ELF header", exe.display());
    };
    anyhow::ensure!(
        phoff as usize + usize::from(count) * usize::from(size) <= elf.len(),
        "{}: program headers beyond the first {HEADERS} bytes",
        exe.display()
    );
    let interp = (0..usize::from(count))
        .any(|i| word(phoff as usize + i * usize::from(size), 4) == Some(u64::from(PT_INTERP)));
    Ok(if interp {
        "dynamically linked"
    } else {
        "static"
    })
}

/// The markers around the generated part of BENCHMARKS.md.
const BEGIN: &str = "<!-- ham-bench:begin (generated by `cargo run --release -p ham-bench -- all`; edits inside are overwritten) -->";
const END: &str = "<!-- ham-bench:end -->";

/// Writes `generated` into `path` between the markers, keeping everything outside
/// them; a file without markers is replaced by a title and the generated part.
pub fn write_markdown(path: &Path, generated: &str) -> anyhow::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{BEGIN}\n{generated}\n{END}");
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{block}{}", &old[..b], &old[e + END.len()..])
        }
        _ => format!("# ham benchmarks\n\n{block}\n"),
    };
    std::fs::write(path, new).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_part_is_replaced_and_the_rest_kept() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("ham-bench-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let p = dir.join("B.md");
        write_markdown(&p, "one")?;
        let first = std::fs::read_to_string(&p)?;
        std::fs::write(&p, format!("intro\n{first}notes\n"))?;
        write_markdown(&p, "two")?;
        let second = std::fs::read_to_string(&p)?;
        assert!(second.starts_with("intro\n"));
        assert!(second.contains("two") && !second.contains("one"));
        assert!(second.ends_with("notes\n"));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn rows_show_ratios() {
        let row = Row {
            figure: "f".into(),
            unit: Unit::Ns,
            ham: Value {
                median: 2000.0,
                p99: Some(4000.0),
            },
            versus: Versus::Peer(
                "p".into(),
                Value {
                    median: 1000.0,
                    p99: Some(1000.0),
                },
            ),
            note: String::new(),
        };
        let t = table(&[row]);
        assert!(t.contains("| 2.00× | 4.00× |"), "{t}");
    }
}
