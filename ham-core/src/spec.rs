//! The model users declare: entities, their conditions, and the actions those run.
//!
//! These types are what the config file, the API and the store all describe. They
//! are validated once, by [`EntitySpec::validate`], before the engine accepts them.

use crate::error::EngineError;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Longest entity, condition or action name accepted.
pub const MAX_NAME_LEN: usize = 64;
/// Shortest heartbeat period accepted, in milliseconds.
pub const MIN_HEARTBEAT_MS: u64 = 5;
/// Most restarts a restart limit may name (their times are kept in the entity's record).
pub const MAX_RESTART_LIMIT: u32 = 64;
/// Longest action list (including fail actions) per condition.
pub const MAX_ACTIONS: usize = 32;

/// Everything about one monitored entity that a user declares.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EntitySpec {
    /// Unique name on this node.
    pub name: String,
    /// How the entity comes to exist.
    pub kind: EntityKind,
    /// Heartbeat contract, if the entity promises to beat.
    pub heartbeat: Option<HeartbeatSpec>,
    /// Restart intensity and backoff, used by every restart action of this entity.
    pub restart_policy: RestartPolicy,
    /// Signal sent to stop the entity, and how long to wait before SIGKILL.
    pub stop: StopSpec,
    /// Conditions, each with its actions.
    pub conditions: Vec<ConditionSpec>,
    /// Start the process when the entity is added (false: it waits, stopped, for
    /// `ham entity start` or a failover).
    #[serde(default = "yes")]
    pub autostart: bool,
}

fn yes() -> bool {
    true
}

/// The four kinds of entity of the QNX model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum EntityKind {
    /// The HAM starts the process from a command line, and restarts it from it.
    Started(CommandSpec),
    /// A running process the HAM did not start, attached by PID. The optional
    /// command line is what a restart runs.
    Attached {
        /// The process to watch.
        pid: i32,
        /// What a restart action starts in its place.
        restart_command: Option<CommandSpec>,
    },
    /// A process that attached itself through the client library.
    SelfAttached {
        /// The process that attached.
        pid: i32,
    },
    /// A name with no process: a target for detector-raised conditions.
    Global,
    /// An entity of another mesh node, watched from here: its events there (death,
    /// restart, missed heartbeats, raised conditions, states) fire this entity's
    /// conditions here, its node going down fires `death`, and a `restart` action
    /// restarts it there.
    Remote {
        /// The node it lives on.
        node: String,
        /// Its name there.
        entity: String,
    },
}

impl EntityKind {
    /// The kind's name as shown to users.
    pub fn label(&self) -> &'static str {
        match self {
            EntityKind::Started(_) => "started",
            EntityKind::Attached { .. } => "attached",
            EntityKind::SelfAttached { .. } => "self",
            EntityKind::Global => "global",
            EntityKind::Remote { .. } => "remote",
        }
    }

    /// The command a restart runs, if this kind has one.
    pub fn restart_command(&self) -> Option<&CommandSpec> {
        match self {
            EntityKind::Started(c) => Some(c),
            EntityKind::Attached {
                restart_command, ..
            } => restart_command.as_ref(),
            _ => None,
        }
    }
}

/// A command line to run: program, arguments, environment and working directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandSpec {
    /// Program and arguments; `argv[0]` is looked up on `PATH` if it has no slash.
    pub argv: Vec<String>,
    /// Extra environment variables, added to the HAM's own environment.
    pub env: BTreeMap<String, String>,
    /// Working directory; the HAM's own if unset.
    pub cwd: Option<String>,
}

impl CommandSpec {
    /// A command with arguments and nothing else.
    pub fn new<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> CommandSpec {
        CommandSpec {
            argv: argv.into_iter().map(Into::into).collect(),
            env: BTreeMap::new(),
            cwd: None,
        }
    }

    /// Checks the command line (`what` names it in errors).
    pub fn validate(&self, what: &str) -> Result<(), EngineError> {
        match self.argv.first() {
            None => Err(EngineError::invalid(format!(
                "{what}: the command is empty"
            ))),
            Some(p) if p.is_empty() => Err(EngineError::invalid(format!(
                "{what}: the program name is empty"
            ))),
            Some(_) => {
                if self.argv.iter().any(|a| a.contains('\0')) {
                    return Err(EngineError::invalid(format!(
                        "{what}: an argument contains a NUL byte"
                    )));
                }
                if self.env.keys().any(|k| k.is_empty() || k.contains('=')) {
                    return Err(EngineError::invalid(format!(
                        "{what}: environment names must be non-empty and contain no '='"
                    )));
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for CommandSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.argv.join(" "))
    }
}

/// A heartbeat contract: beat at least once every `period_ms`; after `low` missed
/// periods `heartbeat-missed-low` fires, after `high` `heartbeat-missed-high`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatSpec {
    /// The period in milliseconds.
    pub period_ms: u64,
    /// Missed periods before `heartbeat-missed-low`.
    pub low: u32,
    /// Missed periods before `heartbeat-missed-high` (≥ `low`).
    pub high: u32,
}

/// How often an entity may be restarted and how restarts are paced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    /// At most this many restarts within `window_ms`; 0 means no limit. The restart
    /// that would exceed it fails instead, so the action's fail actions escalate.
    pub max_restarts: u32,
    /// The window of the intensity limit, in milliseconds.
    pub window_ms: u64,
    /// Delay before the first restart of a burst; 0 disables backoff.
    pub backoff_initial_ms: u64,
    /// The backoff doubles with each restart inside the window, up to this cap.
    pub backoff_max_ms: u64,
}

impl RestartPolicy {
    /// The delay before a restart when `recent` restarts already happened in the window.
    pub fn backoff_ms(&self, recent: u32) -> u64 {
        if self.backoff_initial_ms == 0 {
            return 0;
        }
        let factor = 1u64.checked_shl(recent.min(32)).unwrap_or(u64::MAX);
        let cap = self.backoff_max_ms.max(self.backoff_initial_ms);
        self.backoff_initial_ms.saturating_mul(factor).min(cap)
    }
}

/// How an entity is stopped: a signal, then SIGKILL after a timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopSpec {
    /// The signal number sent first (SIGTERM by default).
    pub signal: i32,
    /// Milliseconds to wait for the exit before SIGKILL.
    pub timeout_ms: u64,
}

impl Default for StopSpec {
    fn default() -> Self {
        StopSpec {
            signal: 15,
            timeout_ms: 5_000,
        }
    }
}

/// The kinds of condition, with the QNX names users know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ConditionKind {
    /// The entity's process died, for any reason the HAM did not cause.
    Death,
    /// It died abnormally: a non-zero exit code or a signal.
    AbnormalDeath,
    /// The entity was detached (it left monitoring, alive).
    Detach,
    /// The entity joined: monitoring began.
    Attach,
    /// The entity was restarted by a restart action.
    Restart,
    /// `low` heartbeat periods were missed.
    HeartbeatMissedLow,
    /// `high` heartbeat periods were missed.
    HeartbeatMissedHigh,
    /// A detector raised an event on the entity.
    Raise,
    /// The entity's user state changed.
    State,
    /// Matches every other kind of the entity (not the node kinds below).
    Any,
    /// A mesh node was declared down (filter `node`).
    NodeDown,
    /// A mesh node came up, or back (filter `node`).
    NodeUp,
}

impl ConditionKind {
    /// Every kind, in a stable order.
    pub const ALL: [ConditionKind; 12] = [
        ConditionKind::Death,
        ConditionKind::AbnormalDeath,
        ConditionKind::Detach,
        ConditionKind::Attach,
        ConditionKind::Restart,
        ConditionKind::HeartbeatMissedLow,
        ConditionKind::HeartbeatMissedHigh,
        ConditionKind::Raise,
        ConditionKind::State,
        ConditionKind::Any,
        ConditionKind::NodeDown,
        ConditionKind::NodeUp,
    ];

    /// The kind's name in configs, the CLI and events.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionKind::Death => "death",
            ConditionKind::AbnormalDeath => "abnormal-death",
            ConditionKind::Detach => "detach",
            ConditionKind::Attach => "attach",
            ConditionKind::Restart => "restart",
            ConditionKind::HeartbeatMissedLow => "heartbeat-missed-low",
            ConditionKind::HeartbeatMissedHigh => "heartbeat-missed-high",
            ConditionKind::Raise => "raise",
            ConditionKind::State => "state",
            ConditionKind::Any => "any",
            ConditionKind::NodeDown => "node-down",
            ConditionKind::NodeUp => "node-up",
        }
    }

    /// True for the kinds about mesh nodes rather than the entity.
    pub fn is_node_kind(self) -> bool {
        matches!(self, ConditionKind::NodeDown | ConditionKind::NodeUp)
    }

    /// Parses a kind's name.
    pub fn parse(s: &str) -> Option<ConditionKind> {
        ConditionKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The names of every kind, for error messages.
    pub fn names() -> String {
        ConditionKind::ALL
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for ConditionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A condition: a named trigger on an entity with an ordered list of actions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConditionSpec {
    /// Unique within the entity.
    pub name: String,
    /// What it reacts to.
    pub kind: ConditionKind,
    /// Lane and lifetime flags.
    pub flags: ConditionFlags,
    /// For `raise`: only events with at least this severity.
    pub min_severity: u32,
    /// For `state`: only transitions from this state (any if unset).
    pub from_state: Option<String>,
    /// For `state`: only transitions to this state (any if unset).
    pub to_state: Option<String>,
    /// For `node-down` / `node-up`: only this node (any if unset).
    #[serde(default)]
    pub node: Option<String>,
    /// Run in order when the condition fires.
    pub actions: Vec<ActionSpec>,
}

impl ConditionSpec {
    /// A condition with default flags and no filter.
    pub fn new(name: impl Into<String>, kind: ConditionKind, actions: Vec<ActionSpec>) -> Self {
        ConditionSpec {
            name: name.into(),
            kind,
            flags: ConditionFlags::default(),
            min_severity: 0,
            from_state: None,
            to_state: None,
            node: None,
            actions,
        }
    }
}

/// Condition flags with the QNX semantics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConditionFlags {
    /// Keep the condition after the entity is restarted (QNX `HREARMAFTERRESTART`).
    /// Unlike QNX, declared conditions default to rearm; set `false` for one-shot ones.
    pub rearm: bool,
    /// Holds no `waitfor` and runs in the entity's fast lane (QNX `HCONDNOWAIT`).
    pub no_wait: bool,
    /// Runs in a lane of its own, so its delays hold up nothing else (QNX `HCONDINDEPENDENT`).
    pub independent: bool,
}

impl Default for ConditionFlags {
    fn default() -> Self {
        ConditionFlags {
            rearm: true,
            no_wait: false,
            independent: false,
        }
    }
}

/// One action: what to do, when, how often, and what to do if it fails.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActionSpec {
    /// Unique within its condition.
    pub name: String,
    /// What the action does.
    pub kind: ActionKind,
    /// Wait this long before each execution.
    pub delay_ms: u64,
    /// How many times the action runs (at least 1), each after `delay_ms`.
    pub repeat: u32,
    /// How a failure affects the rest.
    pub flags: ActionFlags,
    /// Run in order if this action fails (the QNX action-fail list).
    pub on_fail: Vec<ActionSpec>,
}

impl ActionSpec {
    /// An action with no delay, run once, default flags and no fail actions.
    pub fn new(name: impl Into<String>, kind: ActionKind) -> Self {
        ActionSpec {
            name: name.into(),
            kind,
            delay_ms: 0,
            repeat: 1,
            flags: ActionFlags::default(),
            on_fail: Vec::new(),
        }
    }
}

/// Action flags with the QNX semantics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionFlags {
    /// If it fails, skip the rest of the condition's actions (after its fail actions).
    pub break_on_fail: bool,
    /// Keep the action after it fails; if `false` it is removed from its condition,
    /// as QNX does by default. ham keeps it by default.
    pub keep_on_fail: bool,
    /// Also run it once, now, when it is added.
    pub do_now: bool,
}

impl Default for ActionFlags {
    fn default() -> Self {
        ActionFlags {
            break_on_fail: false,
            keep_on_fail: true,
            do_now: false,
        }
    }
}

/// What an action does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ActionKind {
    /// Restart the entity (stop it first if it runs), within its restart policy.
    Restart,
    /// Run a command; it fails if the command exits non-zero or cannot start.
    Execute(CommandSpec),
    /// Publish an event of kind `notify` with this message to subscribers.
    Notify {
        /// The event's detail.
        message: String,
    },
    /// Send a signal to a process: a PID, or the current process of an entity.
    Signal {
        /// Whom to signal.
        target: SignalTarget,
        /// The signal number.
        signal: i32,
    },
    /// Wait until a path exists; fail after the timeout.
    Waitfor {
        /// The path to wait for.
        path: String,
        /// Milliseconds before it fails.
        timeout_ms: u64,
    },
    /// Reset the entity's heartbeat state and re-arm its missed-heartbeat conditions.
    HeartbeatHealthy,
    /// Write a line to the HAM's log.
    Log {
        /// The line.
        message: String,
        /// 0 error, 1 warn, 2 info, 3 debug.
        level: u8,
    },
    /// Restart an entity on another node of the mesh.
    RemoteRestart {
        /// The node.
        node: String,
        /// The entity there.
        entity: String,
    },
    /// Run a command on another node of the mesh.
    RemoteExecute {
        /// The node.
        node: String,
        /// What to run there.
        command: CommandSpec,
    },
    /// Start `entity` on the first of `candidates` that is up, as every node sees the
    /// same membership: one start while the cluster is healthy.
    Failover {
        /// The entity (declared on every candidate, usually `autostart = false`).
        entity: String,
        /// The nodes that may run it, in order of preference.
        candidates: Vec<String>,
    },
}

impl ActionKind {
    /// The action kind's name in configs and events.
    pub fn as_str(&self) -> &'static str {
        match self {
            ActionKind::Restart => "restart",
            ActionKind::Execute(_) => "execute",
            ActionKind::Notify { .. } => "notify",
            ActionKind::Signal { .. } => "signal",
            ActionKind::Waitfor { .. } => "waitfor",
            ActionKind::HeartbeatHealthy => "heartbeat-healthy",
            ActionKind::Log { .. } => "log",
            ActionKind::RemoteRestart { .. } => "remote-restart",
            ActionKind::RemoteExecute { .. } => "remote-execute",
            ActionKind::Failover { .. } => "failover",
        }
    }
}

/// The receiver of a signal action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignalTarget {
    /// A fixed process ID.
    Pid(i32),
    /// The current process of the named entity (this one if empty).
    Entity(String),
}

/// Checks a mesh node's name: a DNS label (1–63 lowercase letters, digits and '-',
/// not at either end), as in its certificate.
pub fn validate_node_name(here: &str, name: &str) -> Result<(), EngineError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(EngineError::invalid(format!(
            "{here}: {name:?} is not a node name (lowercase letters, digits and '-')"
        )))
    }
}

/// Checks a name: 1–64 characters of `[A-Za-z0-9._-]`, `@` excluded (it names nodes).
pub fn validate_name(what: &str, name: &str) -> Result<(), EngineError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(EngineError::invalid(format!(
            "{what} name {name:?} must be 1 to {MAX_NAME_LEN} characters"
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(EngineError::invalid(format!(
            "{what} name {name:?} has {c:?}; use letters, digits, '.', '_' and '-'"
        )));
    }
    Ok(())
}

impl EntitySpec {
    /// An entity of the given kind with defaults and no conditions.
    pub fn new(name: impl Into<String>, kind: EntityKind) -> EntitySpec {
        EntitySpec {
            name: name.into(),
            kind,
            heartbeat: None,
            restart_policy: RestartPolicy::default(),
            stop: StopSpec::default(),
            conditions: Vec::new(),
            autostart: true,
        }
    }

    /// Adds the usual "on death, restart it" condition (the CLI's `--restart`).
    pub fn with_restart_on_death(mut self) -> EntitySpec {
        self.conditions.push(ConditionSpec::new(
            "restart-on-death",
            ConditionKind::Death,
            vec![ActionSpec::new("restart", ActionKind::Restart)],
        ));
        self
    }

    /// Gives back the room its lists reserved and do not use: a spec lives as long as
    /// its entity, and there may be tens of thousands of them.
    pub fn shrink_to_fit(&mut self) {
        self.conditions.shrink_to_fit();
        for c in &mut self.conditions {
            c.actions.shrink_to_fit();
            for a in &mut c.actions {
                a.on_fail.shrink_to_fit();
            }
        }
        if let EntityKind::Started(c) = &mut self.kind {
            c.argv.shrink_to_fit();
        }
    }

    /// Checks everything a user can get wrong; the message names the culprit.
    pub fn validate(&self) -> Result<(), EngineError> {
        validate_name("entity", &self.name)?;
        let me = format!("entity {}", self.name);
        match &self.kind {
            EntityKind::Started(c) => c.validate(&me)?,
            EntityKind::Attached {
                pid,
                restart_command,
            } => {
                if *pid <= 0 {
                    return Err(EngineError::invalid(format!(
                        "{me}: pid {pid} is not valid"
                    )));
                }
                if let Some(c) = restart_command {
                    c.validate(&me)?;
                }
            }
            EntityKind::SelfAttached { pid } if *pid <= 0 => {
                return Err(EngineError::invalid(format!(
                    "{me}: pid {pid} is not valid"
                )));
            }
            EntityKind::SelfAttached { .. } | EntityKind::Global => {}
            EntityKind::Remote { node, entity } => {
                validate_node_name(&me, node)?;
                validate_name("remote entity", entity)?;
            }
        }
        if let Some(hb) = &self.heartbeat {
            if hb.period_ms < MIN_HEARTBEAT_MS {
                return Err(EngineError::invalid(format!(
                    "{me}: heartbeat period {} ms is below the minimum of {MIN_HEARTBEAT_MS} ms",
                    hb.period_ms
                )));
            }
            if hb.low == 0 || hb.high < hb.low {
                return Err(EngineError::invalid(format!(
                    "{me}: heartbeat thresholds need 1 <= low <= high (got low {} high {})",
                    hb.low, hb.high
                )));
            }
        }
        let rp = &self.restart_policy;
        if rp.max_restarts > MAX_RESTART_LIMIT {
            return Err(EngineError::invalid(format!(
                "{me}: restart limit {} is above the maximum of {MAX_RESTART_LIMIT}",
                rp.max_restarts
            )));
        }
        if rp.max_restarts > 0 && rp.window_ms == 0 {
            return Err(EngineError::invalid(format!(
                "{me}: a restart limit needs a window (within = \"10s\")"
            )));
        }
        if !(1..=64).contains(&self.stop.signal) {
            return Err(EngineError::invalid(format!(
                "{me}: stop signal {} is not a signal number",
                self.stop.signal
            )));
        }
        let mut names = BTreeSet::new();
        for c in &self.conditions {
            if !names.insert(c.name.as_str()) {
                return Err(EngineError::invalid(format!(
                    "{me}: two conditions are named {:?}",
                    c.name
                )));
            }
            c.validate(&me, self)?;
        }
        Ok(())
    }
}

impl ConditionSpec {
    /// Checks the condition and its actions in the context of their entity.
    pub fn validate(&self, me: &str, entity: &EntitySpec) -> Result<(), EngineError> {
        validate_name("condition", &self.name)?;
        let here = format!("{me}, condition {}", self.name);
        if (self.from_state.is_some() || self.to_state.is_some())
            && self.kind != ConditionKind::State
        {
            return Err(EngineError::invalid(format!(
                "{here}: from/to filters apply only to state conditions"
            )));
        }
        let mut names = BTreeSet::new();
        let mut count = 0;
        for a in &self.actions {
            if !names.insert(a.name.as_str()) {
                return Err(EngineError::invalid(format!(
                    "{here}: two actions are named {:?}",
                    a.name
                )));
            }
            a.validate(&here, self, entity, false, &mut count)?;
        }
        Ok(())
    }
}

impl ActionSpec {
    fn validate(
        &self,
        here: &str,
        cond: &ConditionSpec,
        entity: &EntitySpec,
        in_fail_list: bool,
        count: &mut usize,
    ) -> Result<(), EngineError> {
        validate_name("action", &self.name)?;
        *count += 1;
        if *count > MAX_ACTIONS {
            return Err(EngineError::invalid(format!(
                "{here}: more than {MAX_ACTIONS} actions"
            )));
        }
        let here = format!("{here}, action {}", self.name);
        if self.repeat == 0 {
            return Err(EngineError::invalid(format!(
                "{here}: repeat must be at least 1"
            )));
        }
        match &self.kind {
            ActionKind::Restart => {
                if in_fail_list {
                    return Err(EngineError::invalid(format!(
                        "{here}: restart cannot be a fail action"
                    )));
                }
                // A remote entity is restarted by its own node.
                if entity.kind.restart_command().is_none()
                    && !matches!(entity.kind, EntityKind::Remote { .. })
                {
                    return Err(EngineError::invalid(format!(
                        "{here}: the entity is {} and has no command to restart it with",
                        entity.kind.label()
                    )));
                }
            }
            ActionKind::Execute(c) => c.validate(&here)?,
            ActionKind::Waitfor { path, .. } => {
                if cond.flags.no_wait {
                    return Err(EngineError::invalid(format!(
                        "{here}: a no-wait condition cannot hold a waitfor"
                    )));
                }
                if path.is_empty() {
                    return Err(EngineError::invalid(format!("{here}: the path is empty")));
                }
            }
            ActionKind::Signal { signal, target } => {
                if !(1..=64).contains(signal) {
                    return Err(EngineError::invalid(format!(
                        "{here}: {signal} is not a signal number"
                    )));
                }
                if let SignalTarget::Pid(p) = target
                    && *p <= 0
                {
                    return Err(EngineError::invalid(format!(
                        "{here}: pid {p} is not valid"
                    )));
                }
            }
            ActionKind::Log { level, .. } if *level > 3 => {
                return Err(EngineError::invalid(format!(
                    "{here}: log level {level} is not 0..3"
                )));
            }
            ActionKind::RemoteRestart { node, entity } => {
                validate_node_name(&here, node)?;
                validate_name("entity", entity)?;
            }
            ActionKind::RemoteExecute { node, command } => {
                validate_node_name(&here, node)?;
                command.validate(&here)?;
            }
            ActionKind::Failover { entity, candidates } => {
                validate_name("entity", entity)?;
                if candidates.is_empty() {
                    return Err(EngineError::invalid(format!("{here}: no candidates")));
                }
                for c in candidates {
                    validate_node_name(&here, c)?;
                }
            }
            ActionKind::Notify { .. } | ActionKind::HeartbeatHealthy | ActionKind::Log { .. } => {}
        }
        let mut names = BTreeSet::new();
        for f in &self.on_fail {
            if !names.insert(f.name.as_str()) {
                return Err(EngineError::invalid(format!(
                    "{here}: two fail actions are named {:?}",
                    f.name
                )));
            }
            f.validate(&here, cond, entity, true, count)?;
        }
        Ok(())
    }
}
