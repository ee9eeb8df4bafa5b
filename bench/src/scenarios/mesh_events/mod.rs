//! Cross-node events, ham beside nats-server: a publisher on node b, a subscriber on
//! node a (127.0.0.3 → 127.0.0.2), the same 64-byte payload carrying the sequence
//! number and the send time (CLOCK_MONOTONIC ns).
//!
//! - ham: two `hamd` nodes meshed over QUIC with mutual TLS. The publisher streams
//!   raises to b's socket (`RaiseStream`, one stream); the subscriber, on a's socket, subscribes with the
//!   `ham-node: b` metadata (`ham --node b events --follow --entity bench --kind
//!   raise`), so a forwards the subscription to b over the mesh and b's events come
//!   back that way.
//! - nats-server: two servers clustered with routes on the same two addresses; the
//!   publisher PUBs to b's, the subscriber SUBs on a's.
//!
//! Latency = arrival at the subscriber − send time, one event at a time, samples
//! interleaved (ham, nats, ham, …) so drift hits both alike. Throughput = events that
//! arrive per second while the publishers go as fast as they can, rounds interleaved
//! too. Publishers pause while more than [`WINDOW`] events are in flight, so neither
//! side drops events (ham's per-subscriber buffer holds 4,096 events, nats-server cuts
//! slow consumers off); what was lost anyway is counted.

mod ham_side;
mod nats_side;

use super::Ctx;
use crate::cluster::Cluster;
use crate::nats;
use crate::report::{Row, Unit, Value, Versus};
use crate::stats::Samples;
use crate::sys::CpuWatch;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How the mesh scenarios are set up, for the report.
pub const SETUP: &str = "Mesh scenarios: every node on its own loopback address (127.0.0.2, .3, …), all on this one machine. ham: `hamd` nodes meshed over QUIC with mutual TLS (certificates from `ham cert`), SWIM membership (foca: probe every 150 ms, probe RTT 100 ms, suspect → down after 350 ms). nats-server: two servers clustered with routes (`--cluster`, `--routes`), plain TCP without TLS, default limits; its clients are the harness's own minimal text-protocol client (CONNECT with verbose off and no echo; PUB, SUB, MSG, PING, PONG).";

/// Bytes of payload per event.
pub const PAYLOAD: usize = 64;
/// At most this many events in flight (published, not yet arrived) in a flood.
pub const WINDOW: u64 = 2_000;
/// How long a single event may take to arrive before the scenario fails.
pub const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(10);

/// The payload of event `seq` sent at `t_ns`: both numbers, padded to [`PAYLOAD`].
pub fn payload(seq: u64, t_ns: u64) -> String {
    let mut p = format!("{seq} {t_ns} ");
    while p.len() < PAYLOAD {
        p.push('.');
    }
    p
}

/// The sequence number and send time in a payload.
pub fn parse(p: &str) -> Option<(u64, u64)> {
    let mut it = p.split_whitespace();
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// What a flood measured.
#[derive(Clone, Debug, Default)]
pub struct Flood {
    /// Events published.
    pub sent: u64,
    /// Events that arrived.
    pub received: u64,
    /// Events reported lost (`gap`) or never arrived.
    pub lost: u64,
    /// From the first send to the last arrival.
    pub secs: f64,
    /// Seconds the CPU use below was measured over.
    pub wall: f64,
    /// CPU seconds used by each process of [`Carrier::processes`].
    pub cpu: Vec<(&'static str, f64)>,
}

impl Flood {
    /// Events that arrived per second.
    pub fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.received as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// One system carrying events from b to a.
pub trait Carrier {
    /// Its name in the report.
    fn name(&self) -> &'static str;

    /// Its processes (a name for the report, a PID), whose CPU a flood measures.
    fn processes(&self) -> Vec<(&'static str, i32)>;

    /// Publishes event `seq` and waits for it at the subscriber: the latency in ns.
    fn one(&mut self, seq: u64) -> anyhow::Result<u64>;

    /// Publishes as fast as it can for `d` (sequence numbers from `first`), waits for
    /// the stragglers, and says what arrived.
    fn flood(&mut self, first: u64, d: Duration) -> anyhow::Result<Flood>;
}

/// Waits until `arrived` − `base` reaches `sent`, or nothing more arrives for 2 s.
pub fn settle(arrived: &AtomicU64, base: u64, sent: u64) {
    let mut last = arrived.load(Ordering::Relaxed);
    let mut moved = Instant::now();
    while arrived.load(Ordering::Relaxed).saturating_sub(base) < sent {
        std::thread::sleep(Duration::from_millis(5));
        let now = arrived.load(Ordering::Relaxed);
        if now != last {
            last = now;
            moved = Instant::now();
        } else if moved.elapsed() > Duration::from_secs(2) {
            return;
        }
    }
}

/// The config of every node: the global entity the publisher raises events on.
const CONFIG: &str = "[[entity]]\nname = \"bench\"\nglobal = true\n";

/// The second latency pass takes its samples in runs of this many per carrier.
const BLOCK: usize = 100;

/// `n` latency samples of every carrier, interleaved in runs of `block` samples:
/// A B A B … for 1, A×100 B×100 … for 100. Event by event, each sample follows the
/// other carrier's: its processes were idle, their caches left to the other's code.
/// In blocks, a system is measured warm, as it runs when events come in a stream.
fn latency_pass(
    carriers: &mut [Box<dyn Carrier>],
    n: usize,
    block: usize,
    seq: &mut u64,
) -> anyhow::Result<Vec<Samples>> {
    let mut lat: Vec<Samples> = carriers.iter().map(|_| Samples::default()).collect();
    let block = block.max(1);
    let mut done = 0;
    let mut first = 0;
    while done < n {
        let run = block.min(n - done);
        for j in 0..carriers.len() {
            let k = (first + j) % carriers.len();
            for _ in 0..run {
                lat[k].push(carriers[k].one(*seq)?);
                *seq += 1;
            }
        }
        done += run;
        first += 1;
    }
    Ok(lat)
}

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    let (nats_bin, skipped) = if ctx.wants_peer(nats::PACKAGE) {
        (nats::find(!ctx.quick), "SKIPPED (not installed)")
    } else {
        (None, "left out (--peers)")
    };
    let cluster = Cluster::start(&ctx.bins, "mesh-events", 2, CONFIG)?;
    cluster.wait_all_up(Duration::from_secs(30))?;
    let mut carriers: Vec<Box<dyn Carrier>> = vec![Box::new(ham_side::HamSide::open(&cluster)?)];
    if let Some(bin) = &nats_bin {
        carriers.push(Box::new(nats_side::NatsSide::open(bin)?));
    }
    // `HAM_BENCH_LATENCY_SAMPLES` lengthens the latency phase, e.g. to profile it.
    let n = std::env::var("HAM_BENCH_LATENCY_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ctx.pick(1000, 50));
    let rounds = ctx.pick(3, 1);
    let flood_for = ctx.pick(Duration::from_secs(3), Duration::from_millis(500));
    eprintln!("   latency: {n} events each, interleaved event by event, then in blocks of {BLOCK}");
    let mut seq = 1u64;
    let lat = latency_pass(&mut carriers, n, 1, &mut seq)?;
    let lat_blocks = latency_pass(&mut carriers, n, BLOCK, &mut seq)?;
    eprintln!("   throughput: {rounds} rounds of {flood_for:?} each, interleaved");
    let mut floods: Vec<Vec<Flood>> = carriers.iter().map(|_| Vec::new()).collect();
    for r in 0..rounds {
        for j in 0..carriers.len() {
            let k = (r + j) % carriers.len();
            let watch = CpuWatch::start(&carriers[k].processes());
            let mut f = carriers[k].flood(seq, flood_for)?;
            (f.wall, f.cpu) = watch.stop();
            anyhow::ensure!(
                f.received > 0,
                "{}: none of {} events arrived at a",
                carriers[k].name(),
                f.sent
            );
            eprintln!(
                "   {}: {:.0} events/s ({} sent, {} arrived, {} lost)",
                carriers[k].name(),
                f.rate(),
                f.sent,
                f.received,
                f.lost
            );
            seq += f.sent + 1;
            floods[k].push(f);
        }
    }
    drop(carriers);
    drop(cluster);
    Ok(rows(&lat, &lat_blocks, &floods, n, flood_for, skipped))
}

/// The median rate of a carrier's floods, and its totals.
fn summary(floods: &[Flood]) -> (f64, Flood) {
    let mut rates: Vec<f64> = floods.iter().map(Flood::rate).collect();
    rates.sort_by(f64::total_cmp);
    let median = rates.get(rates.len() / 2).copied().unwrap_or(0.0);
    let mut total = Flood::default();
    for f in floods {
        total.sent += f.sent;
        total.received += f.received;
        total.lost += f.lost;
        total.secs += f.secs;
        total.wall += f.wall;
        for &(name, cpu) in &f.cpu {
            match total.cpu.iter_mut().find(|(n, _)| *n == name) {
                Some((_, c)) => *c += cpu,
                None => total.cpu.push((name, cpu)),
            }
        }
    }
    (median, total)
}

/// "sent, arrived, lost; CPU: NAME x% (y µs/event), …" over a carrier's floods.
fn describe(name: &str, how: &str, t: &Flood) -> String {
    let cpu: Vec<String> = t
        .cpu
        .iter()
        .map(|&(n, c)| {
            format!(
                "{n} {:.0}% ({:.1} µs/event)",
                100.0 * c / t.wall.max(1e-9),
                1e6 * c / (t.received.max(1) as f64)
            )
        })
        .collect();
    format!(
        "{name}: {how}, {} sent, {} arrived, {} lost; CPU (share of one core, per event arrived): {}",
        t.sent,
        t.received,
        t.lost,
        cpu.join(", ")
    )
}

fn rows(
    lat: &[Samples],
    lat_blocks: &[Samples],
    floods: &[Vec<Flood>],
    n: usize,
    flood_for: Duration,
    why_no_peer: &str,
) -> Vec<Row> {
    let skipped = || Versus::Nothing(format!("{} {why_no_peer}", nats::PACKAGE));
    let how = format!(
        "{PAYLOAD}-byte payload; ham: a `RaiseStream` to b's socket → a subscriber on a's socket following b (`ham-node: b`, forwarded over the QUIC mesh, mTLS); nats: PUB to server b → route → SUB on server a"
    );
    let lat_versus = |lat: &[Samples]| {
        lat.get(1).map_or_else(skipped, |s| {
            Versus::Peer(nats::PACKAGE.into(), Value::of(s))
        })
    };
    let (ham_rate, ham_total) = summary(&floods[0]);
    let rate_versus = floods.get(1).map_or_else(skipped, |f| {
        Versus::Peer(nats::PACKAGE.into(), Value::one(summary(f).0))
    });
    let peer_total = floods.get(1).map(|f| summary(f).1);
    let cpus = std::thread::available_parallelism().map_or(0, |c| c.get());
    let b_cost = ham_total
        .cpu
        .iter()
        .find(|(n, _)| *n == ham_side::PUBLISHER_NODE)
        .map_or(0.0, |&(_, c)| 1e6 * c / ham_total.received.max(1) as f64);
    let goal = if ham_rate >= 100_000.0 {
        "goal ≥ 100,000 events/s per node: met".to_string()
    } else {
        format!(
            "goal ≥ 100,000 events/s per node: NOT met ({:.0} %): the {cpus} CPUs are shared by both nodes and the publishers, and {} spends {b_cost:.0} µs of CPU per event (reading the stream, the engine step, the store commit per batch, the stream to a)",
            ham_rate / 1000.0,
            ham_side::PUBLISHER_NODE,
        )
    };
    let ham_how = "1 `RaiseStream`";
    let mut note = format!(
        "median of {} rounds of {flood_for:?}, interleaved; at most {WINDOW} events in flight; {}",
        floods[0].len(),
        describe("ham", ham_how, &ham_total)
    );
    if let Some(t) = &peer_total {
        note.push_str(&format!("; {}", describe("nats", "1 connection", t)));
    }
    note.push_str(&format!("; {goal}"));
    vec![
        Row {
            figure: "cross-node event latency: publish on node b → subscriber on node a".into(),
            unit: Unit::Ns,
            ham: Value::of(&lat[0]),
            versus: lat_versus(lat),
            note: format!("{n} + {n} events, one at a time, interleaved event by event; {how}"),
        },
        Row {
            figure: "cross-node event latency, in blocks: publish on node b → subscriber on node a"
                .into(),
            unit: Unit::Ns,
            ham: Value::of(&lat_blocks[0]),
            versus: lat_versus(lat_blocks),
            note: format!(
                "{n} + {n} events, one at a time, interleaved in blocks of {BLOCK} (each system warm, the other idle); {how}"
            ),
        },
        Row {
            figure: "cross-node event throughput: events/s arriving at node a".into(),
            unit: Unit::PerSec,
            ham: Value::one(ham_rate),
            versus: rate_versus,
            note,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_carry_sequence_and_time() {
        let p = payload(42, 123_456_789);
        assert_eq!(p.len(), PAYLOAD);
        assert_eq!(parse(&p), Some((42, 123_456_789)));
        assert_eq!(parse("probe"), None);
    }
}
