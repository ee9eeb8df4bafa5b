//! The engine's persistent state: one record per entity plus one node record.
//!
//! Everything here is serialised into the shared-memory store after every step, so
//! that a Guardian (or a restarted `hamd`) resumes exactly where the engine stood.

use crate::ids::{EntityId, EntityUid, ProcessRef, RunId};
use crate::spec::{ActionSpec, EntitySpec};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Counters that belong to the node rather than to one entity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The next event sequence number to hand out.
    pub next_seq: u64,
    /// The next run number.
    pub next_run: u64,
    /// The next entity incarnation number.
    pub next_uid: u64,
    /// The next spawn nonce.
    pub next_nonce: u64,
    /// Takeovers so far: how many times a Guardian became the HAM.
    pub generation: u64,
    /// Wall-clock time of the last takeover (0 if none).
    pub last_takeover_ms: u64,
}

/// Where the entity came from: config entities are what `reload` reconciles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    /// Declared in the config file.
    Config,
    /// Added through the API or the CLI.
    Api,
}

/// One entity's record: what was declared, where it stands, what recovery is running.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EntityRecord {
    /// Its slot in the store and the heartbeat table.
    pub id: EntityId,
    /// This incarnation's token.
    pub uid: EntityUid,
    /// Config or API.
    pub origin: Origin,
    /// What the user declared (conditions pruned by restarts are gone from here).
    pub spec: EntitySpec,
    /// Where it stands.
    pub rt: Runtime,
    /// Recovery runs in flight, oldest first.
    pub runs: Vec<Run>,
}

/// An entity's run-time state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Runtime {
    /// The process lifecycle phase.
    pub phase: Phase,
    /// Restarts done by restart actions, in total.
    pub restarts: u32,
    /// Deaths seen (exits the HAM did not cause).
    pub deaths: u32,
    /// Monotonic times of the restarts inside the current intensity window.
    pub recent_restarts: Vec<u64>,
    /// How the last process ended.
    pub last_exit: Option<ExitStatus>,
    /// The user state set by `set_state` (empty until set).
    pub user_state: String,
    /// Heartbeat bookkeeping.
    pub heartbeat: HeartbeatState,
    /// Monotonic time the current process started or was attached.
    pub since_ms: u64,
    /// A config reload changed the command; applies at the next start.
    pub pending_note: Option<String>,
}

impl Runtime {
    pub(crate) fn new(now_ms: u64) -> Runtime {
        Runtime {
            phase: Phase::Idle,
            restarts: 0,
            deaths: 0,
            recent_restarts: Vec::new(),
            last_exit: None,
            user_state: String::new(),
            heartbeat: HeartbeatState::default(),
            since_ms: now_ms,
            pending_note: None,
        }
    }
}

/// The process lifecycle of an entity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Phase {
    /// No process: a global entity, or one not started yet.
    Idle,
    /// A spawn was requested and its result is awaited.
    Starting {
        /// Identifies the spawn (also in the child's environment).
        nonce: u64,
        /// The run whose restart action asked for it, if any.
        run: Option<RunId>,
        /// A restart (not the first start): fires `restart` when it succeeds.
        restart: bool,
    },
    /// A process runs and is watched.
    Running {
        /// The process.
        proc: ProcessRef,
    },
    /// The HAM asked the process to stop and awaits its exit.
    Stopping {
        /// The process.
        proc: ProcessRef,
        /// When SIGKILL follows.
        kill_at_ms: u64,
        /// Whether SIGKILL was sent already.
        killed: bool,
        /// What happens after the exit.
        then: AfterStop,
    },
    /// The process died and nothing restarted it (yet).
    Dead,
    /// Stopped by an operator.
    Stopped,
    /// The restart limit was reached, or the process could not be started.
    Failed {
        /// Why.
        reason: String,
    },
}

impl Phase {
    /// The phase's name as `ham status` shows it.
    pub fn label(&self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Starting { .. } => "starting",
            Phase::Running { .. } => "running",
            Phase::Stopping { .. } => "stopping",
            Phase::Dead => "dead",
            Phase::Stopped => "stopped",
            Phase::Failed { .. } => "failed",
        }
    }

    /// The live process, if any.
    pub fn process(&self) -> Option<ProcessRef> {
        match self {
            Phase::Running { proc } | Phase::Stopping { proc, .. } => Some(*proc),
            _ => None,
        }
    }
}

/// What follows a stop the HAM asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AfterStop {
    /// Stay stopped.
    Stay,
    /// Start again: for a run's restart action, or an operator's restart.
    Restart(Option<RunId>),
    /// Remove the entity.
    Remove,
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it; `core` if it dumped core.
    Signal {
        /// The signal number.
        signal: i32,
        /// Whether a core was dumped.
        core: bool,
    },
    /// It was not the HAM's child (or the HAM was replaced): the status is unknowable.
    Unknown,
}

impl ExitStatus {
    /// Abnormal: a non-zero exit or death by a signal. Unknown is not abnormal.
    pub fn is_abnormal(self) -> bool {
        match self {
            ExitStatus::Code(c) => c != 0,
            ExitStatus::Signal { .. } => true,
            ExitStatus::Unknown => false,
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal { signal, core } => {
                write!(f, "killed by signal {signal}")?;
                if *core {
                    write!(f, " (core dumped)")?;
                }
                Ok(())
            }
            ExitStatus::Unknown => write!(f, "exit status unknown (not a child of this HAM)"),
        }
    }
}

/// Heartbeat bookkeeping: periods are counted from `anchor_ms`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatState {
    /// Whether checks are running (a process is up).
    pub active: bool,
    /// Start of period 0 (monotonic ms); deadlines are `anchor + k * period`.
    pub anchor_ms: u64,
    /// Consecutive periods without a beat.
    pub missed: u32,
    /// `heartbeat-missed-low` fired and awaits `heartbeat-healthy` or a restart.
    pub low_fired: bool,
    /// `heartbeat-missed-high` fired and awaits `heartbeat-healthy` or a restart.
    pub high_fired: bool,
}

/// The lane a run executes in (per entity, see the crate docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Lane {
    /// The entity's FIFO lane shared by ordinary conditions.
    Shared,
    /// The entity's fast lane for no-wait conditions.
    NoWait,
    /// A lane of its own.
    Independent,
}

/// One firing of a condition: a snapshot of its actions and a cursor into them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// The run's number.
    pub id: RunId,
    /// The condition that fired (its name).
    pub condition: String,
    /// Its lane.
    pub lane: Lane,
    /// Why it fired.
    pub trigger: String,
    /// The actions, as they were when the condition fired.
    pub actions: Vec<ActionSpec>,
    /// Position: one frame per nested fail-action list.
    pub frames: Vec<Frame>,
    /// What the run waits for.
    pub wait: RunWait,
    /// Numbers dispatched commands, so stale results are recognised.
    pub step: u64,
}

/// A position in one action list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    /// Index of the current action.
    pub index: usize,
    /// Executions of it done so far.
    pub done: u32,
    /// Whether its delay has elapsed for the next execution.
    pub delayed: bool,
}

/// What a run is waiting for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunWait {
    /// Nothing: it can go on (if it heads its lane).
    Ready,
    /// An action's delay, until this time.
    Until(u64),
    /// A restart's backoff, until this time; the spawn follows.
    Backoff(u64),
    /// The result of a dispatched command (execute, signal, waitfor).
    Result {
        /// What was dispatched, to re-issue or fail it after a resume.
        what: Pending,
    },
    /// Its restart action waits for the entity to stop or start.
    Entity,
}

/// A dispatched command awaiting its result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pending {
    /// A command runs.
    Execute,
    /// A signal is being sent.
    Signal,
    /// A request runs on another node (or a failover is being placed).
    Remote,
    /// A path is awaited until the deadline.
    Waitfor {
        /// The path.
        path: String,
        /// Monotonic deadline.
        deadline_ms: u64,
    },
}
