//! Conversions between the API's protobuf messages and `ham-core`'s model, and the
//! one place where engine errors become gRPC statuses.

use ham_core::engine::EntityStatus;
use ham_core::error::EngineError;
use ham_core::spec::{
    ActionFlags, ActionKind, ActionSpec, CommandSpec, ConditionFlags, ConditionKind, ConditionSpec,
    EntityKind, EntitySpec, HeartbeatSpec, RestartPolicy, SignalTarget, StopSpec,
};
use ham_core::{Event, EventSeq};
use ham_proto as pb;
use tonic::Status;

/// Maps an engine error to the status code the API promises.
pub fn status_of(e: EngineError) -> Status {
    match e {
        EngineError::InvalidArgument(m) => Status::invalid_argument(m),
        EngineError::NotFound(m) => Status::not_found(m),
        EngineError::AlreadyExists(m) => Status::already_exists(m),
        EngineError::FailedPrecondition(m) => Status::failed_precondition(m),
    }
}

fn invalid(m: impl Into<String>) -> Status {
    Status::invalid_argument(m)
}

/// A command line from the API.
pub fn command(c: pb::CommandLine) -> CommandSpec {
    CommandSpec {
        argv: c.argv,
        env: c.env.into_iter().collect(),
        cwd: (!c.cwd.is_empty()).then_some(c.cwd),
    }
}

fn command_out(c: &CommandSpec) -> pb::CommandLine {
    pb::CommandLine {
        argv: c.argv.clone(),
        env: c.env.clone().into_iter().collect(),
        cwd: c.cwd.clone().unwrap_or_default(),
    }
}

/// A heartbeat contract from the API (`None` if the period is 0).
pub fn heartbeat(h: Option<pb::HeartbeatDef>) -> Option<HeartbeatSpec> {
    h.filter(|h| h.period_ms > 0).map(|h| HeartbeatSpec {
        period_ms: h.period_ms,
        low: h.low.max(1),
        high: if h.high == 0 { h.low.max(1) } else { h.high },
    })
}

/// An entity definition from the API. Validation is the engine's job.
pub fn entity(d: pb::EntityDef) -> Result<EntitySpec, Status> {
    use pb::entity_def::Kind;
    let kind = match d.kind {
        Some(Kind::Command(c)) => EntityKind::Started(command(c)),
        Some(Kind::Attach(a)) => EntityKind::Attached {
            pid: a.pid,
            restart_command: a.restart_command.map(command),
        },
        Some(Kind::Global(true)) => EntityKind::Global,
        Some(Kind::Remote(r)) => ham_core::config::parse_remote(&r)
            .map_err(|e| invalid(format!("entity {}: {e}", d.name)))?,
        Some(Kind::Global(false)) | None => {
            return Err(invalid(format!(
                "entity {}: give a command, a pid to attach, global, or remote",
                d.name
            )));
        }
    };
    let mut spec = EntitySpec::new(d.name, kind);
    spec.autostart = d.autostart.unwrap_or(true);
    spec.heartbeat = heartbeat(d.heartbeat);
    if let Some(p) = d.restart_policy {
        spec.restart_policy = RestartPolicy {
            max_restarts: p.max_restarts,
            window_ms: p.window_ms,
            backoff_initial_ms: p.backoff_initial_ms,
            backoff_max_ms: p.backoff_max_ms,
        };
    }
    spec.stop = StopSpec {
        signal: if d.stop_signal == 0 {
            StopSpec::default().signal
        } else {
            d.stop_signal
        },
        timeout_ms: if d.stop_timeout_ms == 0 {
            StopSpec::default().timeout_ms
        } else {
            d.stop_timeout_ms
        },
    };
    spec.conditions = d
        .conditions
        .into_iter()
        .map(condition)
        .collect::<Result<_, _>>()?;
    Ok(spec)
}

/// A condition from the API.
pub fn condition(c: pb::ConditionDef) -> Result<ConditionSpec, Status> {
    let kind = ConditionKind::parse(&c.kind).ok_or_else(|| {
        invalid(format!(
            "condition kind {:?} is not one of {}",
            c.kind,
            ConditionKind::names()
        ))
    })?;
    let name = if c.name.is_empty() {
        c.kind.clone()
    } else {
        c.name
    };
    let mut spec = ConditionSpec::new(name, kind, actions(c.actions)?);
    spec.flags = ConditionFlags {
        rearm: c.rearm.unwrap_or(true),
        no_wait: c.no_wait,
        independent: c.independent,
    };
    spec.min_severity = c.min_severity;
    spec.from_state = (!c.from_state.is_empty()).then_some(c.from_state);
    spec.to_state = (!c.to_state.is_empty()).then_some(c.to_state);
    spec.node = (!c.node.is_empty()).then_some(c.node);
    Ok(spec)
}

fn actions(list: Vec<pb::ActionDef>) -> Result<Vec<ActionSpec>, Status> {
    let mut out: Vec<ActionSpec> = Vec::new();
    for (i, a) in list.into_iter().enumerate() {
        let mut spec = action(a)?;
        if spec.name.is_empty() {
            let base = spec.kind.as_str().to_string();
            spec.name = if out.iter().any(|o| o.name == base) {
                format!("{base}-{}", i + 1)
            } else {
                base
            };
        }
        out.push(spec);
    }
    Ok(out)
}

/// An action from the API.
pub fn action(a: pb::ActionDef) -> Result<ActionSpec, Status> {
    use pb::action_def::Kind;
    let kind = match a.kind {
        Some(Kind::Restart(_)) => ActionKind::Restart,
        Some(Kind::Execute(c)) => ActionKind::Execute(command(c)),
        Some(Kind::Notify(message)) => ActionKind::Notify { message },
        Some(Kind::Signal(s)) => ActionKind::Signal {
            signal: s.signal,
            target: match s.target {
                Some(pb::signal_def::Target::Pid(p)) => SignalTarget::Pid(p),
                Some(pb::signal_def::Target::Entity(e)) => SignalTarget::Entity(e),
                None => SignalTarget::Entity(String::new()),
            },
        },
        Some(Kind::Waitfor(w)) => ActionKind::Waitfor {
            path: w.path,
            timeout_ms: w.timeout_ms,
        },
        Some(Kind::HeartbeatHealthy(_)) => ActionKind::HeartbeatHealthy,
        Some(Kind::RemoteRestart(r)) => ActionKind::RemoteRestart {
            node: r.node,
            entity: r.entity,
        },
        Some(Kind::RemoteExecute(r)) => ActionKind::RemoteExecute {
            node: r.node,
            command: command(r.command.unwrap_or_default()),
        },
        Some(Kind::Failover(f)) => ActionKind::Failover {
            entity: f.entity,
            candidates: f.candidates,
        },
        Some(Kind::Log(l)) => ActionKind::Log {
            message: l.message,
            level: l.level.min(255) as u8,
        },
        None => return Err(invalid(format!("action {:?} has no kind", a.name))),
    };
    Ok(ActionSpec {
        name: a.name,
        kind,
        delay_ms: a.delay_ms,
        repeat: a.repeat.max(1),
        flags: ActionFlags {
            break_on_fail: a.break_on_fail,
            keep_on_fail: a.keep_on_fail.unwrap_or(true),
            do_now: a.do_now,
        },
        on_fail: actions(a.on_fail)?,
    })
}

/// An entity definition for the API (for `describe`).
pub fn entity_out(s: &EntitySpec) -> pb::EntityDef {
    use pb::entity_def::Kind;
    pb::EntityDef {
        name: s.name.clone(),
        kind: Some(match &s.kind {
            EntityKind::Started(c) => Kind::Command(command_out(c)),
            EntityKind::Attached {
                pid,
                restart_command,
            } => Kind::Attach(pb::AttachPid {
                pid: *pid,
                restart_command: restart_command.as_ref().map(command_out),
            }),
            EntityKind::SelfAttached { pid } => Kind::Attach(pb::AttachPid {
                pid: *pid,
                restart_command: None,
            }),
            EntityKind::Global => Kind::Global(true),
            EntityKind::Remote { node, entity } => Kind::Remote(format!("{entity}@{node}")),
        }),
        heartbeat: s.heartbeat.map(|h| pb::HeartbeatDef {
            period_ms: h.period_ms,
            low: h.low,
            high: h.high,
        }),
        restart_policy: Some(pb::RestartPolicy {
            max_restarts: s.restart_policy.max_restarts,
            window_ms: s.restart_policy.window_ms,
            backoff_initial_ms: s.restart_policy.backoff_initial_ms,
            backoff_max_ms: s.restart_policy.backoff_max_ms,
        }),
        stop_signal: s.stop.signal,
        stop_timeout_ms: s.stop.timeout_ms,
        conditions: s.conditions.iter().map(condition_out).collect(),
        autostart: Some(s.autostart),
    }
}

fn condition_out(c: &ConditionSpec) -> pb::ConditionDef {
    pb::ConditionDef {
        name: c.name.clone(),
        kind: c.kind.as_str().into(),
        rearm: Some(c.flags.rearm),
        no_wait: c.flags.no_wait,
        independent: c.flags.independent,
        min_severity: c.min_severity,
        from_state: c.from_state.clone().unwrap_or_default(),
        to_state: c.to_state.clone().unwrap_or_default(),
        actions: c.actions.iter().map(action_out).collect(),
        node: c.node.clone().unwrap_or_default(),
    }
}

fn action_out(a: &ActionSpec) -> pb::ActionDef {
    use pb::action_def::Kind;
    pb::ActionDef {
        name: a.name.clone(),
        kind: Some(match &a.kind {
            ActionKind::Restart => Kind::Restart(pb::Empty {}),
            ActionKind::Execute(c) => Kind::Execute(command_out(c)),
            ActionKind::Notify { message } => Kind::Notify(message.clone()),
            ActionKind::Signal { target, signal } => Kind::Signal(pb::SignalDef {
                signal: *signal,
                target: Some(match target {
                    SignalTarget::Pid(p) => pb::signal_def::Target::Pid(*p),
                    SignalTarget::Entity(e) => pb::signal_def::Target::Entity(e.clone()),
                }),
            }),
            ActionKind::Waitfor { path, timeout_ms } => Kind::Waitfor(pb::WaitforDef {
                path: path.clone(),
                timeout_ms: *timeout_ms,
            }),
            ActionKind::HeartbeatHealthy => Kind::HeartbeatHealthy(pb::Empty {}),
            ActionKind::RemoteRestart { node, entity } => {
                Kind::RemoteRestart(pb::RemoteRestartDef {
                    node: node.clone(),
                    entity: entity.clone(),
                })
            }
            ActionKind::RemoteExecute { node, command } => {
                Kind::RemoteExecute(pb::RemoteExecuteDef {
                    node: node.clone(),
                    command: Some(command_out(command)),
                })
            }
            ActionKind::Failover { entity, candidates } => Kind::Failover(pb::FailoverDef {
                entity: entity.clone(),
                candidates: candidates.clone(),
            }),
            ActionKind::Log { message, level } => Kind::Log(pb::LogDef {
                message: message.clone(),
                level: u32::from(*level),
            }),
        }),
        delay_ms: a.delay_ms,
        repeat: a.repeat,
        break_on_fail: a.flags.break_on_fail,
        keep_on_fail: Some(a.flags.keep_on_fail),
        do_now: a.flags.do_now,
        on_fail: a.on_fail.iter().map(action_out).collect(),
    }
}

/// An entity's status for the API.
pub fn status_out(s: EntityStatus) -> pb::EntityStatus {
    pb::EntityStatus {
        name: s.name,
        kind: s.kind.into(),
        state: s.state.into(),
        pid: s.pid.unwrap_or(0),
        restarts: s.restarts,
        deaths: s.deaths,
        uptime_ms: s.uptime_ms,
        last_exit: s.last_exit.unwrap_or_default(),
        user_state: s.user_state,
        missed_beats: s.missed_beats,
        conditions: s.conditions as u32,
        runs: s.runs as u32,
        reason: s.reason.unwrap_or_default(),
    }
}

/// An event for the API, stamped with the node's name.
pub fn event_out(node: &str, e: &Event) -> pb::Event {
    pb::Event {
        node: node.to_string(),
        seq: e.seq.0,
        time_ms: e.time_ms,
        entity: e.entity.clone(),
        kind: e.kind.clone(),
        detail: e.detail.clone(),
    }
}

/// The explicit gap event a subscriber gets when events it asked for are gone.
pub fn gap_event(node: &str, from: u64, to: u64, time_ms: u64) -> pb::Event {
    pb::Event {
        node: node.to_string(),
        seq: 0,
        time_ms,
        entity: String::new(),
        kind: "gap".into(),
        detail: format!("events {from}..{to} are no longer available"),
    }
}

/// The gap event of a subscriber who knew this node's events before its store was made
/// afresh: the numbers started over, and it is given this store's events from 1.
pub fn renumbered_event(node: &str, asked: u64, time_ms: u64) -> pb::Event {
    pb::Event {
        node: node.to_string(),
        seq: 0,
        time_ms,
        entity: String::new(),
        kind: "gap".into(),
        detail: format!(
            "event numbers started over (a new state store): events from {asked} of the \
             previous store are gone; this store's events follow from 1"
        ),
    }
}

/// An event sequence number as the API carries it.
pub fn seq(s: EventSeq) -> u64 {
    s.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entity_survives_the_round_trip_through_the_api() {
        let text = r#"
[[entity]]
name = "web"
command = ["/bin/sleep", "5"]
heartbeat = { period = "1s", low = 2, high = 3 }
restart = { limit = 3, within = "10s", backoff = "1s", escalate = [{ do = "execute", command = "true" }] }
stop_signal = "SIGINT"
[[entity.condition]]
on = "raise"
severity = 2
rearm = false
action = [
  { do = "signal", entity = "web", signal = "USR1", delay = "1s", repeat = 2 },
  { do = "waitfor", path = "/tmp/x", timeout = "1s", break_on_fail = true, keep_on_fail = false, on_fail = [{ do = "log", message = "m", level = "warn" }] },
  { do = "notify", message = "n" },
  { do = "heartbeat-healthy" },
]
"#;
        let cfg = ham_core::config::parse("t.toml", text).expect("parses");
        let spec = &cfg.entities[0];
        let back = entity(entity_out(spec)).expect("converts back");
        assert_eq!(&back, spec);
    }

    #[test]
    fn unknown_condition_kinds_are_invalid_arguments() {
        let e = condition(pb::ConditionDef {
            kind: "dying".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }
}
