//! `ham-bench`: measures ham side by side with its peers (s6, runit, supervisord) and a
//! bare fork+exec+wait floor, in one run, and reports medians, p99s and ratios.
//!
//! `cargo run --release -p ham-bench -- all` installs missing peers from Debian, runs
//! every scenario and rewrites the generated part of BENCHMARKS.md;
//! `-- all --quick` is the few-second run CI does so the harness never rots (missing
//! peers are skipped, BENCHMARKS.md is left alone).
//!
//! Layout: `sut` (the supervisors under test, one trait), `scenarios` (one module per
//! scenario), `stats` (median, p99, ratio), `report` (table, machine, BENCHMARKS.md),
//! `hamd` (a private hamd), `sys` (clock, signals, /proc, FIFOs); for the mesh:
//! `cluster` (hamd nodes meshed on loopback), `tap` (a timestamping event
//! subscriber), `nats` (nats-server and a minimal client), `net` (addresses, ports),
//! `load` (busy CPUs).

mod cluster;
mod hamd;
mod load;
mod nats;
mod net;
mod report;
mod scenarios;
mod stats;
mod sut;
mod sys;
mod tap;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use hamd::Bins;
use report::Row;
use scenarios::Ctx;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The exact command of a full run.
const FULL_COMMAND: &str = "cargo run --release -p ham-bench -- all";

/// Benchmarks for ham, beside s6, runit, supervisord and a bare fork+exec floor.
#[derive(Parser, Debug)]
#[command(name = "ham-bench", about)]
struct Args {
    /// What to run (`all` for everything).
    #[arg(value_enum, required = true)]
    what: Vec<Scenario>,
    /// A few seconds in all: fewer samples, missing peers skipped, BENCHMARKS.md untouched.
    #[arg(long)]
    quick: bool,
    /// Where hamd, ham and ham-bench-child are (default: beside this executable).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The hamd to measure. Default: in a release run under cargo, the production
    /// build (static-pie, `scripts/build-static`, built first); else the one in the
    /// binaries' directory.
    #[arg(long)]
    hamd: Option<PathBuf>,
    /// Only these peers (by package: s6, runit, supervisor, nats-server), e.g.
    /// `--peers s6,runit` to profile without supervisord's 1 s restarts. A full `all`
    /// uses every peer.
    #[arg(long, value_delimiter = ',')]
    peers: Option<Vec<String>>,
    /// How long `node-soak` keeps its mesh running under load, in minutes (default:
    /// 10, or 5 s with --quick).
    #[arg(long)]
    soak_minutes: Option<f64>,
    /// Only these entity counts in `takeover` (default 100, 1000, 10000), e.g.
    /// `--takeover-sizes 10000` to study the largest.
    #[arg(long, value_delimiter = ',')]
    takeover_sizes: Option<Vec<usize>>,
    /// Where a full run of `all` writes its report.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../BENCHMARKS.md"))]
    out: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Every scenario below.
    All,
    /// Restart latency: ham, the floor and each peer, interleaved.
    Restart,
    /// Memory, idle CPU and start time with 1, 100, 1,000 (and for ham 10,000) children.
    Footprint,
    /// Missed-heartbeat detection lateness.
    Lateness,
    /// Heartbeat cost: shared-memory fast path and API path.
    Heartbeat,
    /// HAM → Guardian takeover.
    Takeover,
    /// Every mesh scenario below.
    Mesh,
    /// Cross-node event latency and throughput, beside nats-server.
    MeshEvents,
    /// Node failure → `node-down` at another node.
    NodeDown,
    /// False `node-down`/`node-suspect` events of a mesh left running under CPU load.
    NodeSoak,
    /// A 16-node mesh: time to full membership, memory per peer.
    MeshScale,
}

/// The mesh scenarios, in order.
const MESH: [Scenario; 4] = [
    Scenario::MeshEvents,
    Scenario::NodeDown,
    Scenario::NodeSoak,
    Scenario::MeshScale,
];

const EVERY: [Scenario; 9] = [
    Scenario::Restart,
    Scenario::Footprint,
    Scenario::Lateness,
    Scenario::Heartbeat,
    Scenario::Takeover,
    Scenario::MeshEvents,
    Scenario::NodeDown,
    Scenario::NodeSoak,
    Scenario::MeshScale,
];

/// The workspace's root.
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// Under `cargo run`, builds `hamd` and `ham` in the same profile first, so the one
/// documented command never measures stale or missing binaries. A release run also
/// builds the production `hamd` (static-pie, `scripts/build-static`) and returns its
/// path: that is the one measured.
fn build_siblings(dir: &std::path::Path) -> anyhow::Result<Option<PathBuf>> {
    let Some(cargo) = std::env::var_os("CARGO") else {
        return Ok(None);
    };
    let release = dir.ends_with("release");
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "-q", "-p", "ham-node", "-p", "ham"])
        .current_dir(ROOT);
    if release {
        cmd.arg("--release");
    }
    eprintln!("building hamd and ham: {cmd:?}");
    let ok = cmd.status().context("cannot run cargo")?.success();
    anyhow::ensure!(ok, "building hamd and ham failed");
    if !release {
        return Ok(None);
    }
    let mut cmd = std::process::Command::new(format!("{ROOT}/scripts/build-static"));
    cmd.arg("-q").current_dir(ROOT);
    eprintln!("building the production hamd: {cmd:?}");
    let ok = cmd
        .status()
        .context("cannot run scripts/build-static")?
        .success();
    anyhow::ensure!(ok, "scripts/build-static failed");
    let hamd = PathBuf::from(ROOT).join("target/static/x86_64-unknown-linux-gnu/release/hamd");
    Ok(Some(std::fs::canonicalize(&hamd).with_context(|| {
        format!("scripts/build-static made no {}", hamd.display())
    })?))
}

/// `path` relative to the workspace, when it lies in it (as the report shows it).
fn workspace_relative(path: &std::path::Path) -> PathBuf {
    std::fs::canonicalize(ROOT)
        .ok()
        .and_then(|root| path.strip_prefix(root).ok().map(PathBuf::from))
        .unwrap_or_else(|| path.to_path_buf())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = match args.bin_dir.clone() {
        Some(d) => d,
        None => std::env::current_exe()
            .context("cannot find this executable")?
            .parent()
            .context("no executable directory")?
            .to_path_buf(),
    };
    let built = if args.bin_dir.is_none() {
        build_siblings(&dir)?
    } else {
        None
    };
    let hamd = args
        .hamd
        .clone()
        .or(built)
        .unwrap_or_else(|| dir.join("hamd"));
    let bins = Bins { dir, hamd };
    for b in ["hamd", "ham", "ham-bench-child"] {
        anyhow::ensure!(
            bins.get(b).is_file(),
            "{} is missing: cargo build --release -p ham-node -p ham -p ham-bench (or --bin-dir)",
            bins.get(b).display()
        );
    }
    let all = args.what.contains(&Scenario::All);
    let what: Vec<Scenario> = if all {
        EVERY.to_vec()
    } else {
        let mut w = Vec::new();
        for &s in &args.what {
            let group = if s == Scenario::Mesh { &MESH[..] } else { &[s] };
            for &g in group {
                if !w.contains(&g) {
                    w.push(g);
                }
            }
        }
        w
    };
    let needs_peers = what
        .iter()
        .any(|s| matches!(s, Scenario::Restart | Scenario::Footprint));
    let mut peers = if needs_peers {
        sut::available_peers(!args.quick)
    } else {
        Vec::new()
    };
    if let Some(only) = &args.peers {
        peers.retain(|k| {
            k.package()
                .is_some_and(|(p, _)| only.iter().any(|o| o == p))
        });
    }
    let soak = match args.soak_minutes {
        Some(m) if m.is_finite() && m > 0.0 => Duration::from_secs_f64(m * 60.0),
        Some(m) => anyhow::bail!("--soak-minutes {m}: give a positive number"),
        None if args.quick => Duration::from_secs(5),
        None => Duration::from_secs(600),
    };
    let ctx = Ctx {
        bins,
        quick: args.quick,
        peers,
        only_peers: args.peers.clone(),
        soak,
        takeover_sizes: args.takeover_sizes.clone(),
    };
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    for &s in &what {
        eprintln!("== {s:?}");
        let t = Instant::now();
        let r = match s {
            Scenario::Restart => scenarios::restart::run(&ctx),
            Scenario::Footprint => scenarios::footprint::run(&ctx),
            Scenario::Lateness => scenarios::lateness::run(&ctx),
            Scenario::Heartbeat => scenarios::heartbeat::run(&ctx),
            Scenario::Takeover => scenarios::takeover::run(&ctx),
            Scenario::MeshEvents => scenarios::mesh_events::run(&ctx),
            Scenario::NodeDown => scenarios::node_down::run(&ctx),
            Scenario::NodeSoak => scenarios::node_soak::run(&ctx),
            Scenario::MeshScale => scenarios::mesh_scale::run(&ctx),
            Scenario::All | Scenario::Mesh => unreachable!("expanded above"),
        }
        .with_context(|| format!("scenario {s:?}"))?;
        eprintln!("   done in {:.1} s", t.elapsed().as_secs_f64());
        rows.extend(r);
    }
    let table = report::table(&rows);
    let skipped: Vec<&str> = sut::Kind::PEERS
        .iter()
        .filter(|k| needs_peers && !ctx.peers.contains(k))
        .map(|k| k.name())
        .collect();
    let pacing: String = [sut::Kind::Ham, sut::Kind::Floor]
        .iter()
        .chain(&ctx.peers)
        .map(|k| format!("- {}\n", k.pacing()))
        .collect();
    let mesh = if what.iter().any(|s| MESH.contains(s)) {
        format!("{}\n\n", scenarios::mesh_events::SETUP)
    } else {
        String::new()
    };
    let body = format!(
        "Command: `{FULL_COMMAND}` (this run: `{}`, {:.0} s).\n\n\
         Machine:\n{}\n\
         hamd measured: `{}` ({}).\n\n\
         {table}\n\
         {}\
         {mesh}\
         Restart pacing and configuration of each supervisor:\n{pacing}",
        std::env::args().collect::<Vec<_>>().join(" "),
        started.elapsed().as_secs_f64(),
        report::machine(),
        workspace_relative(&ctx.bins.get("hamd")).display(),
        report::linkage(&ctx.bins.get("hamd"))?,
        if skipped.is_empty() {
            String::new()
        } else {
            format!("SKIPPED (not installed): {}\n\n", skipped.join(", "))
        },
    );
    println!("{body}");
    if all && !args.quick && args.peers.is_none() {
        report::write_markdown(&args.out, &body)?;
        eprintln!("wrote {}", args.out.display());
    }
    Ok(())
}
