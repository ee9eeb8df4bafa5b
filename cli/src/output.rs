//! How the CLI prints: aligned tables for people, JSON for machines.

use ham_proto as pb;
use serde_json::{Value, json};

/// The status code's name as the CLI prints it.
pub fn code_name(c: tonic::Code) -> &'static str {
    match c {
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::NotFound => "not found",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::FailedPrecondition => "failed precondition",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::DeadlineExceeded => "deadline exceeded",
        _ => "error",
    }
}

fn uptime(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

fn entity_json(e: &pb::EntityStatus) -> Value {
    json!({
        "name": e.name,
        "kind": e.kind,
        "state": e.state,
        "pid": if e.pid > 0 { json!(e.pid) } else { Value::Null },
        "restarts": e.restarts,
        "deaths": e.deaths,
        "uptime_ms": e.uptime_ms,
        "last_exit": if e.last_exit.is_empty() { Value::Null } else { json!(e.last_exit) },
        "user_state": e.user_state,
        "missed_beats": e.missed_beats,
        "conditions": e.conditions,
        "runs": e.runs,
        "reason": if e.reason.is_empty() { Value::Null } else { json!(e.reason) },
    })
}

/// `ham status`.
pub fn status(s: &pb::StatusReply, as_json: bool) {
    if as_json {
        let v = json!({
            "node": s.node,
            "hamd_pid": s.hamd_pid,
            "capacity": s.capacity,
            "next_event_seq": s.next_event_seq,
            "pair": s.pair.map(|p| json!({
                "ham_pid": p.ham_pid,
                "guardian_pid": if p.guardian_pid > 0 { json!(p.guardian_pid) } else { Value::Null },
                "generation": p.generation,
                "last_takeover_ms": if p.last_takeover_ms > 0 { json!(p.last_takeover_ms) } else { Value::Null },
                "takeover_us": if p.takeover_us > 0 { json!(p.takeover_us) } else { Value::Null },
            })),
            "timer_lateness": s.timer_lateness.map(|l| json!({
                "samples": l.samples, "p50_us": l.p50_us, "p99_us": l.p99_us, "max_us": l.max_us })),
            "entities": s.entities.iter().map(entity_json).collect::<Vec<_>>(),
        });
        println!("{v}");
        return;
    }
    let pair = s.pair.unwrap_or_default();
    let guardian = if pair.guardian_pid > 0 {
        pair.guardian_pid.to_string()
    } else {
        "none".into()
    };
    let last = if pair.last_takeover_ms > 0 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        format!(
            ", last {} ago",
            uptime(now.saturating_sub(pair.last_takeover_ms))
        )
    } else {
        String::new()
    };
    println!(
        "node {}  HAM pid {}  Guardian pid {guardian}  generation {}{last}",
        s.node, pair.ham_pid, pair.generation
    );
    println!(
        "{} entities  next event {}",
        s.entities.len(),
        s.next_event_seq
    );
    let rows: Vec<[String; 8]> = s
        .entities
        .iter()
        .map(|e| {
            [
                e.name.clone(),
                e.kind.clone(),
                e.state.clone(),
                if e.pid > 0 {
                    e.pid.to_string()
                } else {
                    "-".into()
                },
                e.restarts.to_string(),
                e.deaths.to_string(),
                uptime(e.uptime_ms),
                if !e.reason.is_empty() {
                    e.reason.clone()
                } else if let Some(m) = e.missed_beats.filter(|m| *m > 0) {
                    format!("{m} beats missed")
                } else {
                    e.last_exit.clone()
                },
            ]
        })
        .collect();
    table(
        [
            "NAME", "KIND", "STATE", "PID", "RESTARTS", "DEATHS", "UPTIME", "LAST",
        ],
        &rows,
    );
}

fn table<const N: usize>(head: [&str; N], rows: &[[String; N]]) {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == N {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(head.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// `ham status NAME`.
pub fn describe(d: &pb::EntityDetail, as_json: bool) {
    let st = d.status.clone().unwrap_or_default();
    let def = d.definition.clone().unwrap_or_default();
    if as_json {
        let conditions: Vec<Value> = def.conditions.iter().map(condition_json).collect();
        let mut v = entity_json(&st);
        v["conditions"] = json!(conditions);
        v["heartbeat"] = json!(def.heartbeat.map(|h| json!({
            "period_ms": h.period_ms, "low": h.low, "high": h.high })));
        v["restart_policy"] = json!(def.restart_policy.map(|p| json!({
            "max_restarts": p.max_restarts, "window_ms": p.window_ms,
            "backoff_initial_ms": p.backoff_initial_ms, "backoff_max_ms": p.backoff_max_ms })));
        println!("{v}");
        return;
    }
    println!("{} ({}): {}", st.name, st.kind, st.state);
    if st.pid > 0 {
        println!("  pid {}  up {}", st.pid, uptime(st.uptime_ms));
    }
    println!("  restarts {}  deaths {}", st.restarts, st.deaths);
    if !st.last_exit.is_empty() {
        println!("  last exit: {}", st.last_exit);
    }
    if !st.reason.is_empty() {
        println!("  failed: {}", st.reason);
    }
    if let Some(h) = def.heartbeat {
        println!(
            "  heartbeat every {} ms, low {} high {}, missed now {}",
            h.period_ms,
            h.low,
            h.high,
            st.missed_beats.unwrap_or(0)
        );
    }
    if !st.user_state.is_empty() {
        println!("  state: {}", st.user_state);
    }
    for c in &def.conditions {
        println!("  condition {} on {}", c.name, c.kind);
        for a in &c.actions {
            print_action(a, 4);
        }
    }
}

fn print_action(a: &pb::ActionDef, indent: usize) {
    let kind = action_kind(a);
    let mut extra = String::new();
    if a.delay_ms > 0 {
        extra.push_str(&format!(" delay {} ms", a.delay_ms));
    }
    if a.repeat > 1 {
        extra.push_str(&format!(" x{}", a.repeat));
    }
    println!("{:indent$}action {} ({kind}){extra}", "", a.name);
    for f in &a.on_fail {
        println!("{:width$}on fail:", "", width = indent + 2);
        print_action(f, indent + 4);
    }
}

fn action_kind(a: &pb::ActionDef) -> String {
    use pb::action_def::Kind;
    match &a.kind {
        Some(Kind::Restart(_)) => "restart".into(),
        Some(Kind::Execute(c)) => format!("execute {}", c.argv.join(" ")),
        Some(Kind::Notify(m)) => format!("notify {m:?}"),
        Some(Kind::Signal(s)) => format!("signal {}", s.signal),
        Some(Kind::Waitfor(w)) => format!("waitfor {} within {} ms", w.path, w.timeout_ms),
        Some(Kind::HeartbeatHealthy(_)) => "heartbeat-healthy".into(),
        Some(Kind::Log(l)) => format!("log {:?}", l.message),
        Some(Kind::RemoteRestart(r)) => format!("restart {} on {}", r.entity, r.node),
        Some(Kind::RemoteExecute(r)) => format!(
            "execute {} on {}",
            r.command
                .as_ref()
                .map(|c| c.argv.join(" "))
                .unwrap_or_default(),
            r.node
        ),
        Some(Kind::Failover(f)) => {
            format!(
                "failover {} to the first up of {}",
                f.entity,
                f.candidates.join(", ")
            )
        }
        None => "?".into(),
    }
}

fn condition_json(c: &pb::ConditionDef) -> Value {
    json!({
        "name": c.name,
        "kind": c.kind,
        "rearm": c.rearm.unwrap_or(true),
        "no_wait": c.no_wait,
        "independent": c.independent,
        "actions": c.actions.iter().map(action_json).collect::<Vec<_>>(),
    })
}

fn action_json(a: &pb::ActionDef) -> Value {
    json!({
        "name": a.name,
        "kind": action_kind(a),
        "delay_ms": a.delay_ms,
        "repeat": a.repeat,
        "on_fail": a.on_fail.iter().map(action_json).collect::<Vec<_>>(),
    })
}

/// One event of `ham events`.
pub fn event(e: &pb::Event, as_json: bool) {
    if as_json {
        println!(
            "{}",
            json!({"node": e.node, "seq": e.seq, "time_ms": e.time_ms,
                   "entity": e.entity, "kind": e.kind, "detail": e.detail})
        );
    } else {
        let secs = e.time_ms / 1000;
        let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
        println!(
            "{:>6} {h:02}:{m:02}:{s:02}.{:03} {} {:<12} {:<22} {}",
            e.seq,
            e.time_ms % 1000,
            e.node,
            if e.entity.is_empty() { "-" } else { &e.entity },
            e.kind,
            e.detail
        );
    }
}

/// `ham reload`.
pub fn reload(r: &pb::ReloadReply, as_json: bool) {
    if as_json {
        println!(
            "{}",
            json!({"added": r.added, "changed": r.changed, "removed": r.removed})
        );
    } else {
        println!(
            "reloaded: {} added, {} changed, {} removed",
            r.added.len(),
            r.changed.len(),
            r.removed.len()
        );
        for (what, names) in [
            ("added", &r.added),
            ("changed", &r.changed),
            ("removed", &r.removed),
        ] {
            for n in names {
                println!("  {what} {n}");
            }
        }
    }
}

/// `ham nodes`: the mesh's members as this node sees them.
pub fn nodes(r: &pb::NodesReply, as_json: bool) {
    if as_json {
        let nodes: Vec<Value> = r
            .nodes
            .iter()
            .map(|n| {
                json!({
                    "name": n.name,
                    "state": n.state,
                    "addr": n.addr,
                    "rtt_us": n.rtt_us,
                    "last_contact_ms": n.last_contact_ms,
                    "self": n.is_self,
                })
            })
            .collect();
        println!(
            "{}",
            json!({ "node": r.node, "mesh": r.mesh, "nodes": nodes })
        );
        return;
    }
    if !r.mesh {
        println!(
            "node {} runs without a mesh (start hamd with --mesh-listen)",
            r.node
        );
    }
    println!(
        "{:<20} {:<8} {:<24} {:>10} {:>14}",
        "NODE", "STATE", "ADDRESS", "RTT", "LAST CONTACT"
    );
    for n in &r.nodes {
        let name = if n.is_self {
            format!("{} (self)", n.name)
        } else {
            n.name.clone()
        };
        let rtt = n.rtt_us.map_or("-".to_string(), |us| {
            format!("{:.2} ms", us as f64 / 1000.0)
        });
        let last = n
            .last_contact_ms
            .map_or("-".to_string(), |ms| format!("{ms} ms ago"));
        println!(
            "{:<20} {:<8} {:<24} {:>10} {:>14}",
            name, n.state, n.addr, rtt, last
        );
    }
}
