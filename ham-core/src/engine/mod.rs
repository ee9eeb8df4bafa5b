//! The recovery engine: a deterministic state machine with no I/O.
//!
//! The driver feeds it [`Input`]s (a request, a process exit, a command's result, the
//! passing of time) together with the current time, and gets back a [`Step`]: the
//! records to write to the store *first* (write-ahead), then the [`Command`]s to carry
//! out and the events to publish. Because every piece of state is in those records,
//! [`Engine::restore`] rebuilds the exact engine from the store after a crash.

mod recovery;
mod slots;
pub mod state;
mod timers;

use crate::error::EngineError;
use crate::event::{Event, EventKind, clip_detail};
use crate::ids::{EntityId, EntityUid, EventSeq, Now, ProcessRef, RunId};
use crate::record;
use crate::spec::{
    ActionSpec, CommandSpec, ConditionKind, ConditionSpec, EntityKind, EntitySpec, validate_name,
};
use slots::Slots;
use state::{AfterStop, EntityRecord, ExitStatus, NodeRecord, Origin, Phase, RunWait, Runtime};
use std::collections::{BTreeSet, HashMap};
use timers::{Timer, Timers};

/// An input to the engine.
#[derive(Clone, Debug)]
pub enum Input {
    /// A request from the API.
    Request(Request),
    /// A spawn finished: the process started, or could not.
    Spawned {
        /// The entity.
        entity: EntityId,
        /// The spawn's nonce, as in [`Command::Spawn`].
        nonce: u64,
        /// The process, or why it could not start.
        result: Result<ProcessRef, String>,
    },
    /// A watched process ended.
    Exited {
        /// The entity.
        entity: EntityId,
        /// The process that ended.
        proc: ProcessRef,
        /// How it ended.
        status: ExitStatus,
    },
    /// A mesh node changed state: fires `node-down` / `node-up` conditions.
    Node {
        /// The node's name.
        node: String,
        /// Up (true) or down (false).
        up: bool,
        /// Where it listens, for the event's detail.
        addr: String,
    },
    /// An event of an entity on another node that remote entities here watch.
    Remote {
        /// The node it happened on.
        node: String,
        /// The entity there.
        entity: String,
        /// The event's kind there (`death`, `restart`, `raise` …); kinds that are not
        /// condition kinds are ignored.
        kind: String,
        /// The event's detail there.
        detail: String,
    },
    /// A dispatched action (execute, signal, waitfor) finished.
    ActionDone {
        /// The entity.
        entity: EntityId,
        /// The run.
        run: RunId,
        /// The run's step number when it was dispatched.
        step: u64,
        /// Success with a detail, or failure with a reason.
        outcome: Result<String, String>,
    },
}

/// A request from the API. Each is validated in full before anything changes.
#[derive(Clone, Debug)]
pub enum Request {
    /// Add an entity. `proc` is the verified process for attached kinds.
    AddEntity {
        /// The entity.
        spec: EntitySpec,
        /// The process to watch (attached and self-attached kinds).
        proc: Option<ProcessRef>,
        /// Config or API.
        origin: Origin,
    },
    /// Remove an entity; `stop` stops its process first (started entities).
    RemoveEntity {
        /// Its name.
        name: String,
        /// Stop the process before removing it.
        stop: bool,
    },
    /// An operator's restart: stops the process if it runs, starts it again, and
    /// clears a failed state and the restart window.
    Restart {
        /// Its name.
        name: String,
    },
    /// Stop the process; no condition fires, no restart follows.
    Stop {
        /// Its name.
        name: String,
    },
    /// Start a stopped, dead or failed entity.
    Start {
        /// Its name.
        name: String,
    },
    /// A heartbeat through the API path.
    Heartbeat {
        /// Its name.
        name: String,
    },
    /// A detector reports something about an entity.
    Raise {
        /// Its name.
        name: String,
        /// The detector's severity.
        severity: u32,
        /// The detector's message.
        message: String,
    },
    /// Set an entity's user state.
    SetState {
        /// Its name.
        name: String,
        /// The new state.
        state: String,
    },
    /// A process attaches itself (turns a global placeholder of that name into it).
    AttachSelf {
        /// The entity as the process declares it.
        spec: EntitySpec,
        /// The verified process.
        proc: ProcessRef,
    },
    /// An attached process leaves monitoring, alive.
    Detach {
        /// Its name.
        name: String,
    },
    /// Add a condition to an entity.
    AddCondition {
        /// The entity.
        entity: String,
        /// The condition.
        condition: ConditionSpec,
    },
    /// Remove a condition.
    RemoveCondition {
        /// The entity.
        entity: String,
        /// The condition's name.
        condition: String,
    },
    /// Add an action at the end of a condition's list (`do_now` runs it once now).
    AddAction {
        /// The entity.
        entity: String,
        /// The condition's name.
        condition: String,
        /// The action.
        action: ActionSpec,
    },
    /// Remove an action from a condition.
    RemoveAction {
        /// The entity.
        entity: String,
        /// The condition's name.
        condition: String,
        /// The action's name.
        action: String,
    },
    /// Reconcile config entities with a new config: add, update and remove.
    Reload {
        /// Every entity of the new config.
        specs: Vec<EntitySpec>,
        /// The verified processes of attached kinds, by entity name.
        procs: HashMap<String, ProcessRef>,
    },
}

/// How the engine comes back from the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// A new `hamd` adopted the store (the previous pair stopped or both died).
    Adopted,
    /// The Guardian became the HAM: the generation goes up.
    Takeover,
}

/// A successful request's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Done.
    Done,
    /// An entity was attached: where its heartbeat slot is.
    Attached {
        /// The heartbeat slot.
        slot: u32,
        /// The slot's token.
        token: u64,
    },
    /// A reload: what changed.
    Reloaded {
        /// Entities added.
        added: Vec<String>,
        /// Entities whose declaration changed.
        changed: Vec<String>,
        /// Entities removed.
        removed: Vec<String>,
    },
}

/// Something for the driver to carry out, after the step's records are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Start a process and report [`Input::Spawned`].
    Spawn {
        /// The entity.
        entity: EntityId,
        /// Its name (for the child's environment).
        name: String,
        /// Its heartbeat slot token.
        token: EntityUid,
        /// Identifies this spawn.
        nonce: u64,
        /// What to run.
        command: CommandSpec,
        /// This spawn was interrupted by the death of the previous HAM: adopt the
        /// process carrying `nonce` if it exists, and start one only if not.
        resumed: bool,
    },
    /// Watch a process and report [`Input::Exited`] when it ends.
    Watch {
        /// The entity.
        entity: EntityId,
        /// The process.
        proc: ProcessRef,
    },
    /// Stop watching the entity's process (it was detached or removed).
    Unwatch {
        /// The entity.
        entity: EntityId,
    },
    /// Send a signal; report [`Input::ActionDone`] if `report` is set.
    Signal {
        /// The receiver.
        target: SignalDest,
        /// The signal number.
        signal: i32,
        /// The run and step to report to.
        report: Option<(EntityId, RunId, u64)>,
    },
    /// Run a command to completion; report [`Input::ActionDone`].
    Execute {
        /// The entity whose condition runs it.
        entity: EntityId,
        /// The run.
        run: RunId,
        /// The step.
        step: u64,
        /// What to run.
        command: CommandSpec,
        /// Environment describing the trigger (`HAM_ENTITY`, `HAM_CONDITION` …).
        context: Vec<(String, String)>,
    },
    /// Wait for a path until the deadline; report [`Input::ActionDone`].
    Waitfor {
        /// The entity.
        entity: EntityId,
        /// The run.
        run: RunId,
        /// The step.
        step: u64,
        /// The path.
        path: String,
        /// Monotonic deadline.
        deadline_ms: u64,
    },
    /// Carry out an action on the mesh; report [`Input::ActionDone`].
    Remote {
        /// The entity whose condition runs it.
        entity: EntityId,
        /// The run.
        run: RunId,
        /// The step.
        step: u64,
        /// What to do.
        op: RemoteOp,
    },
    /// Write a line to the HAM's log.
    Log {
        /// 0 error, 1 warn, 2 info, 3 debug.
        level: u8,
        /// The entity it concerns.
        entity: String,
        /// The line.
        message: String,
    },
    /// Give an entity's heartbeat slot to a new owner token (resets its counters).
    ClaimBeatSlot {
        /// The entity (= the slot).
        entity: EntityId,
        /// The owner token.
        token: EntityUid,
    },
    /// Free an entity's heartbeat slot.
    ReleaseBeatSlot {
        /// The entity (= the slot).
        entity: EntityId,
    },
    /// Count one heartbeat in the entity's slot (the API path).
    Beat {
        /// The entity (= the slot).
        entity: EntityId,
    },
}

/// An action that needs the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteOp {
    /// Restart `entity` on `node`.
    Restart {
        /// The node.
        node: String,
        /// The entity there.
        entity: String,
    },
    /// Run `command` on `node`.
    Execute {
        /// The node.
        node: String,
        /// The command.
        command: CommandSpec,
    },
    /// Start `entity` on the first live node of `candidates`.
    Failover {
        /// The entity.
        entity: String,
        /// The nodes, in order of preference.
        candidates: Vec<String>,
    },
}

/// The receiver of a signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignalDest {
    /// A watched process (signalled through its pidfd).
    Process(EntityId, ProcessRef),
    /// A bare PID (a signal action's fixed target).
    Pid(i32),
}

/// The records a step changed: write them to the store, commit, then act.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Persist {
    /// The node record, if it changed.
    pub node: Option<Vec<u8>>,
    /// Entity records written (`Some`) or deleted (`None`), by slot.
    pub entities: Vec<(u32, Option<Vec<u8>>)>,
    /// New events, encoded, by sequence number.
    pub events: Vec<(u64, Vec<u8>)>,
}

impl Persist {
    /// True if nothing needs writing.
    pub fn is_empty(&self) -> bool {
        self.node.is_none() && self.entities.is_empty() && self.events.is_empty()
    }
}

/// The outcome of one input: what to persist, then what to do and publish.
#[derive(Clone, Debug, Default)]
pub struct Step {
    /// Write these first.
    pub persist: Persist,
    /// Then carry these out, in order.
    pub commands: Vec<Command>,
    /// And publish these.
    pub events: Vec<Event>,
}

/// Tells the engine whether an entity beat since it last asked (the driver reads the
/// shared-memory heartbeat slot).
pub trait BeatProbe {
    /// True if the entity's heartbeat counter moved since the previous call.
    fn observe(&mut self, entity: EntityId) -> bool;
}

/// Why the store's content could not be turned back into an engine.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A record did not decode.
    #[error("record in slot {slot}: {reason}")]
    BadRecord {
        /// The slot.
        slot: u32,
        /// Why.
        reason: String,
    },
    /// Two records claim the same entity name.
    #[error("two records are named {0:?}")]
    DuplicateName(String),
}

/// A read-only view of one entity for `status`.
#[derive(Clone, Debug, PartialEq)]
pub struct EntityStatus {
    /// Its name.
    pub name: String,
    /// Its kind label.
    pub kind: &'static str,
    /// Its phase label.
    pub state: &'static str,
    /// Its process ID, if a process runs.
    pub pid: Option<i32>,
    /// Restarts done by restart actions.
    pub restarts: u32,
    /// Deaths seen.
    pub deaths: u32,
    /// Milliseconds since the current process started (or the entity was added).
    pub uptime_ms: u64,
    /// How the last process ended.
    pub last_exit: Option<String>,
    /// The user state.
    pub user_state: String,
    /// Missed heartbeat periods in a row, if it has a heartbeat.
    pub missed_beats: Option<u32>,
    /// Number of conditions.
    pub conditions: usize,
    /// Recovery runs in flight.
    pub runs: usize,
    /// Why it failed, if it did.
    pub reason: Option<String>,
}

/// The engine: all entities, their runs, and the node's counters.
pub struct Engine {
    capacity: u32,
    node: NodeRecord,
    /// Held inline, by slot: no tree-node slack (~300 bytes per entity in a B-tree of
    /// 400-byte values), and in order for the takeover's walk (boxing them instead
    /// scattered them: ~1 ms more at 10,000, measured).
    entities: Slots<EntityRecord>,
    names: HashMap<String, EntityId>,
    timers: Timers,
    /// Last heartbeat period index checked, per entity (derived, not persisted).
    beat_checked: HashMap<EntityId, u64>,
    now: Now,
    out: Step,
    dirty: BTreeSet<EntityId>,
    deleted: BTreeSet<EntityId>,
    node_dirty: bool,
}

impl Engine {
    /// An empty engine with room for `capacity` entities.
    pub fn new(capacity: u32) -> Engine {
        Engine {
            capacity,
            node: NodeRecord {
                next_seq: 1,
                next_run: 1,
                next_uid: 1,
                next_nonce: 1,
                generation: 0,
                last_takeover_ms: 0,
            },
            entities: Slots::default(),
            names: HashMap::new(),
            timers: Timers::default(),
            beat_checked: HashMap::new(),
            now: Now::at(0),
            out: Step::default(),
            dirty: BTreeSet::new(),
            deleted: BTreeSet::new(),
            node_dirty: false,
        }
    }

    /// Rebuilds an engine from the store's records.
    pub fn restore(
        capacity: u32,
        node: Option<&[u8]>,
        entities: &[(u32, Vec<u8>)],
    ) -> Result<Engine, RestoreError> {
        let records = entities
            .iter()
            .map(|(slot, bytes)| Self::decode_record(*slot, bytes))
            .collect::<Result<Vec<_>, _>>()?;
        Self::restore_records(capacity, node, records)
    }

    /// Decodes the entity record stored in `slot`.
    pub fn decode_record(slot: u32, bytes: &[u8]) -> Result<EntityRecord, RestoreError> {
        let rec = record::decode_entity(bytes)
            .map_err(|reason| RestoreError::BadRecord { slot, reason })?;
        if rec.id.0 != slot {
            return Err(RestoreError::BadRecord {
                slot,
                reason: format!("record says it belongs in slot {}", rec.id.0),
            });
        }
        Ok(rec)
    }

    /// Puts a decoded record in its slot, replacing what was there (a warm copy of the
    /// state catching up). A record of the same name in another slot is dropped, and
    /// its slot returned: the copy may have caught that slot mid-change.
    pub fn put_record(&mut self, rec: EntityRecord) -> Option<u32> {
        if let Some(old) = self.entities.remove(&rec.id) {
            self.names.remove(&old.spec.name);
        }
        let evicted = self.names.get(&rec.spec.name).copied();
        if let Some(other) = evicted {
            self.entities.remove(&other);
        }
        self.names.insert(rec.spec.name.clone(), rec.id);
        self.entities.insert(rec.id, rec);
        evicted.map(|id| id.0)
    }

    /// Drops the record in `slot`, if any (a warm copy catching up).
    pub fn drop_record(&mut self, slot: u32) {
        if let Some(old) = self.entities.remove(&EntityId(slot)) {
            self.names.remove(&old.spec.name);
        }
    }

    /// Replaces the node record (a warm copy catching up).
    pub fn set_node_record(&mut self, bytes: &[u8]) -> Result<(), RestoreError> {
        self.node = record::decode_node(bytes)
            .map_err(|reason| RestoreError::BadRecord { slot: 0, reason })?;
        Ok(())
    }

    /// Rebuilds an engine from the node record and entity records decoded already
    /// (a warm Guardian decodes them before the HAM dies).
    pub fn restore_records(
        capacity: u32,
        node: Option<&[u8]>,
        records: Vec<EntityRecord>,
    ) -> Result<Engine, RestoreError> {
        let mut engine = Engine::new(capacity);
        if let Some(bytes) = node {
            engine.node = record::decode_node(bytes)
                .map_err(|reason| RestoreError::BadRecord { slot: 0, reason })?;
        }
        for rec in records {
            if engine.names.insert(rec.spec.name.clone(), rec.id).is_some() {
                return Err(RestoreError::DuplicateName(rec.spec.name));
            }
            engine.entities.insert(rec.id, rec);
        }
        Ok(engine)
    }

    /// Picks up after a restore: re-watches live processes, re-issues pending waits,
    /// fails commands whose outcome was lost, and re-arms every timer. `note` goes
    /// into the `resumed` (or, for a takeover, `takeover`) event.
    pub fn resume(&mut self, now: Now, how: Resume, note: &str) -> Step {
        self.now = now;
        let kind = match how {
            Resume::Adopted => EventKind::Resumed,
            Resume::Takeover => {
                self.node.generation += 1;
                self.node.last_takeover_ms = now.wall_ms;
                EventKind::Takeover
            }
        };
        self.emit("", kind.as_str(), note.to_string());
        // One pass watches every running process again; the few entities with more to
        // resume (a start in flight, heartbeats, recovery runs, a stop) come after.
        let mut more = Vec::new();
        for (id, rec) in self.entities.iter() {
            if let Phase::Running { proc } | Phase::Stopping { proc, .. } = &rec.rt.phase {
                self.out.commands.push(Command::Watch {
                    entity: id,
                    proc: *proc,
                });
            }
            if matches!(
                rec.rt.phase,
                Phase::Starting { .. } | Phase::Stopping { .. }
            ) || rec.rt.heartbeat.active
                || !rec.runs.is_empty()
            {
                more.push(id);
            }
        }
        for id in more {
            self.resume_entity(id);
        }
        self.finish()
    }

    /// Resumes what an entity has beyond its watched process (see [`Engine::resume`]).
    fn resume_entity(&mut self, id: EntityId) {
        let Some(rec) = self.entities.get(&id) else {
            return;
        };
        // The heartbeat table lives in shared memory too: slots keep their owners.
        match rec.rt.phase.clone() {
            Phase::Running { .. } | Phase::Stopping { .. } => {}
            Phase::Starting { nonce, .. } => {
                // The spawn's outcome was lost with the old HAM. Its process may exist:
                // the driver adopts it by its nonce, or starts it if it does not.
                let rec = &self.entities[&id];
                if let Some(command) = rec.spec.kind.restart_command().cloned() {
                    self.out.commands.push(Command::Spawn {
                        entity: id,
                        name: rec.spec.name.clone(),
                        token: rec.uid,
                        nonce,
                        command,
                        resumed: true,
                    });
                }
            }
            _ => {}
        }
        let Some(rec) = self.entities.get(&id) else {
            return;
        };
        let (beats, runs) = (rec.rt.heartbeat.active, !rec.runs.is_empty());
        if beats {
            self.init_beat_index(id);
        }
        if runs {
            self.resume_runs(id);
        }
        // Nothing changed unless a step above said so: only the timers are rebuilt, for
        // the entities that have any (most of 10,000 have none: a takeover skips them).
        let stopping = self
            .entities
            .get(&id)
            .is_some_and(|r| matches!(r.rt.phase, Phase::Stopping { .. }));
        if beats || runs || stopping {
            self.reschedule(id);
        }
    }

    // ----- getters -------------------------------------------------------------

    /// How many entities fit.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Number of entities.
    pub fn len(&self) -> usize {
        self.entities.len()
    }

    /// True if there are no entities.
    pub fn is_empty(&self) -> bool {
        self.entities.is_empty()
    }

    /// Takeovers so far and the wall-clock time of the last one (0 if none).
    pub fn generation(&self) -> (u64, u64) {
        (self.node.generation, self.node.last_takeover_ms)
    }

    /// The sequence number the next event will get.
    pub fn next_event_seq(&self) -> EventSeq {
        EventSeq(self.node.next_seq)
    }

    /// The entity's record, by name.
    pub fn entity(&self, name: &str) -> Option<&EntityRecord> {
        self.names.get(name).and_then(|id| self.entities.get(id))
    }

    /// The entity's record, by slot.
    pub fn entity_by_id(&self, id: EntityId) -> Option<&EntityRecord> {
        self.entities.get(&id)
    }

    /// Every entity's record, by slot.
    pub fn records(&self) -> impl Iterator<Item = &EntityRecord> {
        self.entities.values()
    }

    /// The status of every entity, sorted by name.
    pub fn status(&self, now: Now) -> Vec<EntityStatus> {
        let mut v: Vec<EntityStatus> = self
            .entities
            .values()
            .map(|r| Self::status_of(r, now))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The status of one entity, if it exists.
    pub fn status_of_entity(&self, name: &str, now: Now) -> Option<EntityStatus> {
        self.entity(name).map(|r| Self::status_of(r, now))
    }

    fn status_of(r: &EntityRecord, now: Now) -> EntityStatus {
        EntityStatus {
            name: r.spec.name.clone(),
            kind: r.spec.kind.label(),
            state: if matches!(r.spec.kind, EntityKind::Global) {
                "global"
            } else if matches!(r.spec.kind, EntityKind::Remote { .. }) {
                "remote"
            } else {
                r.rt.phase.label()
            },
            pid: r.rt.phase.process().map(|p| p.pid),
            restarts: r.rt.restarts,
            deaths: r.rt.deaths,
            uptime_ms: now.mono_ms.saturating_sub(r.rt.since_ms),
            last_exit: r.rt.last_exit.map(|e| e.to_string()),
            user_state: r.rt.user_state.clone(),
            missed_beats: r.spec.heartbeat.map(|_| r.rt.heartbeat.missed),
            conditions: r.spec.conditions.len(),
            runs: r.runs.len(),
            reason: match &r.rt.phase {
                Phase::Failed { reason } => Some(reason.clone()),
                _ => None,
            },
        }
    }

    /// When [`Engine::tick`] must next be called, if ever.
    pub fn next_deadline(&self) -> Option<u64> {
        self.timers.next()
    }

    // ----- inputs ----------------------------------------------------------------

    /// Handles a request. On error nothing changed and the step is empty.
    pub fn handle_request(&mut self, now: Now, req: Request) -> (Step, Result<Reply, EngineError>) {
        self.now = now;
        match self.request(req) {
            Ok(reply) => (self.finish(), Ok(reply)),
            Err(e) => {
                debug_assert!(self.out.commands.is_empty() && self.dirty.is_empty());
                (self.finish(), Err(e))
            }
        }
    }

    /// Handles requests in order as one step, so one store commit covers them all.
    /// Stops at the first that fails (which changed nothing, as in
    /// [`Engine::handle_request`]); returns the step, how many succeeded and that error.
    pub fn handle_batch(
        &mut self,
        now: Now,
        reqs: impl IntoIterator<Item = Request>,
    ) -> (Step, usize, Option<EngineError>) {
        self.now = now;
        let mut handled = 0;
        for req in reqs {
            if let Err(e) = self.request(req) {
                return (self.finish(), handled, Some(e));
            }
            handled += 1;
        }
        (self.finish(), handled, None)
    }

    /// Handles a process exit, a spawn result or an action result.
    pub fn handle_input(&mut self, now: Now, input: Input) -> Step {
        self.now = now;
        match input {
            Input::Request(r) => {
                let (step, _) = self.handle_request(now, r);
                return step;
            }
            Input::Spawned {
                entity,
                nonce,
                result,
            } => self.on_spawned(entity, nonce, result),
            Input::Exited {
                entity,
                proc,
                status,
            } => self.on_exited(entity, proc, status),
            Input::ActionDone {
                entity,
                run,
                step,
                outcome,
            } => self.on_action_done(entity, run, step, outcome),
            Input::Node { node, up, addr } => self.on_node(node, up, addr),
            Input::Remote {
                node,
                entity,
                kind,
                detail,
            } => self.on_remote(&node, &entity, &kind, detail),
        }
        self.finish()
    }

    /// An event of entity `entity` on node `node`: the conditions of that kind of every
    /// remote entity watching it fire (`detail` says what happened there).
    fn on_remote(&mut self, node: &str, entity: &str, kind: &str, detail: String) {
        let Some(kind) = ConditionKind::parse(kind).filter(|k| !k.is_node_kind()) else {
            return;
        };
        for id in self.remote_watchers(node, Some(entity)) {
            self.fire(id, kind, format!("on {node}: {detail}"), Occurrence::Plain);
            self.drive(id);
        }
    }

    /// The remote entities watching `entity` on `node` (any of that node's: `None`).
    fn remote_watchers(&self, node: &str, entity: Option<&str>) -> Vec<EntityId> {
        self.entities
            .values()
            .filter(|r| match &r.spec.kind {
                EntityKind::Remote { node: n, entity: e } => {
                    n == node && entity.is_none_or(|x| x == e)
                }
                _ => false,
            })
            .map(|r| r.id)
            .collect()
    }

    /// A mesh node went down or came up: one event, then the matching conditions of
    /// every entity fire; a node going down is the death of its remote entities.
    fn on_node(&mut self, node: String, up: bool, addr: String) {
        if !up {
            for id in self.remote_watchers(&node, None) {
                self.fire(
                    id,
                    ConditionKind::Death,
                    format!("node {node} is down"),
                    Occurrence::Plain,
                );
                self.drive(id);
            }
        }
        let kind = if up {
            ConditionKind::NodeUp
        } else {
            ConditionKind::NodeDown
        };
        let detail = format!("node {node} ({addr})");
        let watchers: Vec<EntityId> = self
            .entities
            .values()
            .filter(|r| r.spec.conditions.iter().any(|c| c.kind == kind))
            .map(|r| r.id)
            .collect();
        if watchers.is_empty() {
            self.emit("", kind.as_str(), detail);
            return;
        }
        for id in watchers {
            self.fire(
                id,
                kind,
                detail.clone(),
                Occurrence::Node { node: node.clone() },
            );
            self.drive(id);
        }
    }

    /// Publishes a node-level event (the pair's life: a Guardian respawned …).
    pub fn note(&mut self, now: Now, entity: &str, kind: EventKind, detail: String) -> Step {
        self.now = now;
        self.emit(entity, kind.as_str(), detail);
        self.finish()
    }

    /// Runs every timer due at `now`: delays, backoffs, stop timeouts, heartbeat checks.
    pub fn tick(&mut self, now: Now, probe: &mut dyn BeatProbe) -> Step {
        self.now = now;
        while let Some(timer) = self.timers.pop_due(now.mono_ms) {
            match timer {
                Timer::Heartbeat(id) => self.check_heartbeat(id, probe),
                Timer::StopKill(id) => self.stop_timeout(id),
                Timer::RunWake(id, run) => self.wake_run(id, run),
            }
        }
        self.finish()
    }

    // ----- request handling ----------------------------------------------------

    fn request(&mut self, req: Request) -> Result<Reply, EngineError> {
        match req {
            Request::AddEntity { spec, proc, origin } => {
                self.check_new_entity(&spec, proc)?;
                self.add_entity(spec, proc, origin);
                Ok(Reply::Done)
            }
            Request::RemoveEntity { name, stop } => {
                let id = self.id_of(&name)?;
                self.remove_entity(id, stop);
                Ok(Reply::Done)
            }
            Request::Restart { name } => {
                let id = self.id_of(&name)?;
                self.operator_restart(id)?;
                Ok(Reply::Done)
            }
            Request::Stop { name } => {
                let id = self.id_of(&name)?;
                self.operator_stop(id)?;
                Ok(Reply::Done)
            }
            Request::Start { name } => {
                let id = self.id_of(&name)?;
                self.operator_start(id)?;
                Ok(Reply::Done)
            }
            Request::Heartbeat { name } => {
                let id = self.id_of(&name)?;
                if self.entities[&id].spec.heartbeat.is_none() {
                    return Err(EngineError::precondition(format!(
                        "entity {name} has no heartbeat configured"
                    )));
                }
                self.out.commands.push(Command::Beat { entity: id });
                Ok(Reply::Done)
            }
            Request::Raise {
                name,
                severity,
                message,
            } => {
                let id = self.id_of(&name)?;
                let detail = format!("severity {severity}: {message}");
                self.fire(
                    id,
                    ConditionKind::Raise,
                    detail,
                    Occurrence::Raise { severity },
                );
                self.drive(id);
                Ok(Reply::Done)
            }
            Request::SetState { name, state } => {
                let id = self.id_of(&name)?;
                if state.is_empty() || state.len() > 64 {
                    return Err(EngineError::invalid("a state must be 1 to 64 characters"));
                }
                let rec = self.entities.get_mut(&id).expect("id_of found it");
                let from = std::mem::replace(&mut rec.rt.user_state, state.clone());
                self.dirty.insert(id);
                let detail = format!("{} -> {state}", if from.is_empty() { "-" } else { &from });
                self.fire(
                    id,
                    ConditionKind::State,
                    detail,
                    Occurrence::State { from, to: state },
                );
                self.drive(id);
                Ok(Reply::Done)
            }
            Request::AttachSelf { spec, proc } => self.attach_self(spec, proc),
            Request::Detach { name } => {
                let id = self.id_of(&name)?;
                let rec = &self.entities[&id];
                if matches!(
                    rec.spec.kind,
                    EntityKind::Global | EntityKind::Remote { .. }
                ) {
                    return Err(EngineError::precondition(format!(
                        "entity {name} is {}: it has no process here to detach",
                        rec.spec.kind.label()
                    )));
                }
                self.fire(
                    id,
                    ConditionKind::Detach,
                    "detached".into(),
                    Occurrence::Plain,
                );
                self.out.commands.push(Command::Unwatch { entity: id });
                self.delete_entity(id, "detached");
                Ok(Reply::Done)
            }
            Request::AddCondition { entity, condition } => {
                let id = self.id_of(&entity)?;
                let rec = &self.entities[&id];
                if rec.spec.conditions.iter().any(|c| c.name == condition.name) {
                    return Err(EngineError::exists(format!(
                        "entity {entity} already has a condition named {}",
                        condition.name
                    )));
                }
                let mut spec = rec.spec.clone();
                spec.conditions.push(condition.clone());
                spec.validate()?;
                let do_now: Vec<ActionSpec> = condition
                    .actions
                    .iter()
                    .filter(|a| a.flags.do_now)
                    .cloned()
                    .collect();
                self.entities.get_mut(&id).expect("exists").spec = spec;
                self.dirty.insert(id);
                if !do_now.is_empty() {
                    self.start_run(id, &condition, "do-now".into(), do_now);
                    self.drive(id);
                }
                Ok(Reply::Done)
            }
            Request::RemoveCondition { entity, condition } => {
                let id = self.id_of(&entity)?;
                let rec = self.entities.get_mut(&id).expect("exists");
                let before = rec.spec.conditions.len();
                rec.spec.conditions.retain(|c| c.name != condition);
                if rec.spec.conditions.len() == before {
                    return Err(EngineError::not_found(format!(
                        "entity {entity} has no condition named {condition}"
                    )));
                }
                self.dirty.insert(id);
                Ok(Reply::Done)
            }
            Request::AddAction {
                entity,
                condition,
                action,
            } => {
                let id = self.id_of(&entity)?;
                let rec = &self.entities[&id];
                let mut spec = rec.spec.clone();
                let Some(cond) = spec.conditions.iter_mut().find(|c| c.name == condition) else {
                    return Err(EngineError::not_found(format!(
                        "entity {entity} has no condition named {condition}"
                    )));
                };
                if cond.actions.iter().any(|a| a.name == action.name) {
                    return Err(EngineError::exists(format!(
                        "condition {condition} of {entity} already has an action named {}",
                        action.name
                    )));
                }
                cond.actions.push(action.clone());
                let cond = cond.clone();
                spec.validate()?;
                self.entities.get_mut(&id).expect("exists").spec = spec;
                self.dirty.insert(id);
                if action.flags.do_now {
                    self.start_run(id, &cond, "do-now".into(), vec![action]);
                    self.drive(id);
                }
                Ok(Reply::Done)
            }
            Request::RemoveAction {
                entity,
                condition,
                action,
            } => {
                let id = self.id_of(&entity)?;
                let rec = self.entities.get_mut(&id).expect("exists");
                let Some(cond) = rec.spec.conditions.iter_mut().find(|c| c.name == condition)
                else {
                    return Err(EngineError::not_found(format!(
                        "entity {entity} has no condition named {condition}"
                    )));
                };
                let before = cond.actions.len();
                cond.actions.retain(|a| a.name != action);
                if cond.actions.len() == before {
                    return Err(EngineError::not_found(format!(
                        "condition {condition} of {entity} has no action named {action}"
                    )));
                }
                self.dirty.insert(id);
                Ok(Reply::Done)
            }
            Request::Reload { specs, procs } => self.reload(specs, procs),
        }
    }

    fn id_of(&self, name: &str) -> Result<EntityId, EngineError> {
        self.names
            .get(name)
            .copied()
            .ok_or_else(|| EngineError::not_found(format!("no entity named {name}")))
    }

    fn free_slot(&self) -> Option<EntityId> {
        Some(EntityId(self.entities.first_free(1))).filter(|id| id.0 <= self.capacity)
    }

    fn check_new_entity(
        &self,
        spec: &EntitySpec,
        proc: Option<ProcessRef>,
    ) -> Result<(), EngineError> {
        spec.validate()?;
        if self.names.contains_key(&spec.name) {
            return Err(EngineError::exists(format!(
                "an entity named {} already exists",
                spec.name
            )));
        }
        let needs_proc = matches!(
            spec.kind,
            EntityKind::Attached { .. } | EntityKind::SelfAttached { .. }
        );
        if needs_proc && proc.is_none() {
            return Err(EngineError::invalid(format!(
                "entity {}: an attached entity needs its process",
                spec.name
            )));
        }
        if self.entities.len() as u32 >= self.capacity {
            return Err(EngineError::precondition(format!(
                "this node is full: {} entities is the capacity",
                self.capacity
            )));
        }
        Ok(())
    }

    fn add_entity(
        &mut self,
        mut spec: EntitySpec,
        proc: Option<ProcessRef>,
        origin: Origin,
    ) -> EntityId {
        let id = self.free_slot().expect("capacity checked");
        spec.shrink_to_fit();
        let uid = EntityUid(self.node.next_uid);
        self.node.next_uid += 1;
        self.node_dirty = true;
        let name = spec.name.clone();
        let do_now: Vec<(ConditionSpec, Vec<ActionSpec>)> = spec
            .conditions
            .iter()
            .map(|c| {
                let acts: Vec<ActionSpec> = c
                    .actions
                    .iter()
                    .filter(|a| a.flags.do_now)
                    .cloned()
                    .collect();
                (c.clone(), acts)
            })
            .filter(|(_, a)| !a.is_empty())
            .collect();
        let kind = spec.kind.clone();
        let autostart = spec.autostart;
        self.entities.insert(
            id,
            EntityRecord {
                id,
                uid,
                origin,
                spec,
                rt: Runtime::new(self.now.mono_ms),
                runs: Vec::new(),
            },
        );
        self.names.insert(name.clone(), id);
        self.dirty.insert(id);
        self.out.commands.push(Command::ClaimBeatSlot {
            entity: id,
            token: uid,
        });
        self.emit(
            &name,
            EventKind::EntityAdded.as_str(),
            kind.label().to_string(),
        );
        match kind {
            EntityKind::Started(_) if autostart => self.spawn(id, None, false),
            EntityKind::Started(_) => {
                if let Some(rec) = self.entities.get_mut(&id) {
                    rec.rt.phase = Phase::Stopped;
                }
            }
            EntityKind::Attached { .. } | EntityKind::SelfAttached { .. } => {
                let proc = proc.expect("checked");
                self.set_running(id, proc);
                self.fire(
                    id,
                    ConditionKind::Attach,
                    format!("pid {}", proc.pid),
                    Occurrence::Plain,
                );
            }
            EntityKind::Global => {
                self.fire(
                    id,
                    ConditionKind::Attach,
                    "global".into(),
                    Occurrence::Plain,
                );
            }
            // Watched through its node's events: nothing to start or attach here.
            EntityKind::Remote { .. } => {}
        }
        for (cond, acts) in do_now {
            self.start_run(id, &cond, "do-now".into(), acts);
        }
        self.drive(id);
        id
    }

    fn attach_self(&mut self, spec: EntitySpec, proc: ProcessRef) -> Result<Reply, EngineError> {
        spec.validate()?;
        if let Some(&id) = self.names.get(&spec.name) {
            // A global placeholder of that name becomes the process, keeping its conditions.
            let rec = &self.entities[&id];
            if !matches!(rec.spec.kind, EntityKind::Global) {
                return Err(EngineError::exists(format!(
                    "an entity named {} already exists",
                    spec.name
                )));
            }
            let mut merged = rec.spec.clone();
            merged.kind = spec.kind;
            merged.heartbeat = spec.heartbeat;
            for c in spec.conditions {
                if !merged.conditions.iter().any(|m| m.name == c.name) {
                    merged.conditions.push(c);
                }
            }
            merged.validate()?;
            let token = rec.uid;
            self.entities.get_mut(&id).expect("exists").spec = merged;
            self.dirty.insert(id);
            self.set_running(id, proc);
            self.fire(
                id,
                ConditionKind::Attach,
                format!("pid {}", proc.pid),
                Occurrence::Plain,
            );
            self.drive(id);
            return Ok(Reply::Attached {
                slot: id.0,
                token: token.0,
            });
        }
        self.check_new_entity(&spec, Some(proc))?;
        let id = self.add_entity(spec, Some(proc), Origin::Api);
        let token = self.entities[&id].uid;
        Ok(Reply::Attached {
            slot: id.0,
            token: token.0,
        })
    }

    fn operator_restart(&mut self, id: EntityId) -> Result<(), EngineError> {
        let rec = &self.entities[&id];
        if rec.spec.kind.restart_command().is_none() {
            return Err(EngineError::precondition(format!(
                "entity {} is {} and has no command to restart it with",
                rec.spec.name,
                rec.spec.kind.label()
            )));
        }
        match rec.rt.phase {
            Phase::Starting { .. } => Err(EngineError::precondition(format!(
                "entity {} is starting already",
                rec.spec.name
            ))),
            Phase::Running { .. } => {
                self.entities
                    .get_mut(&id)
                    .expect("exists")
                    .rt
                    .recent_restarts
                    .clear();
                self.begin_stop(id, AfterStop::Restart(None));
                Ok(())
            }
            Phase::Stopping { .. } => {
                if let Phase::Stopping { then, .. } =
                    &mut self.entities.get_mut(&id).expect("exists").rt.phase
                {
                    *then = AfterStop::Restart(None);
                }
                self.dirty.insert(id);
                Ok(())
            }
            _ => {
                self.entities
                    .get_mut(&id)
                    .expect("exists")
                    .rt
                    .recent_restarts
                    .clear();
                self.spawn(id, None, true);
                Ok(())
            }
        }
    }

    fn operator_stop(&mut self, id: EntityId) -> Result<(), EngineError> {
        let rec = &self.entities[&id];
        match rec.rt.phase {
            Phase::Running { .. } => {
                self.begin_stop(id, AfterStop::Stay);
                Ok(())
            }
            Phase::Stopping { .. } => Ok(()),
            _ => Err(EngineError::precondition(format!(
                "entity {} has no running process ({})",
                rec.spec.name,
                rec.rt.phase.label()
            ))),
        }
    }

    fn operator_start(&mut self, id: EntityId) -> Result<(), EngineError> {
        let rec = &self.entities[&id];
        if rec.spec.kind.restart_command().is_none() {
            return Err(EngineError::precondition(format!(
                "entity {} is {} and has no command to start",
                rec.spec.name,
                rec.spec.kind.label()
            )));
        }
        match rec.rt.phase {
            Phase::Dead | Phase::Stopped | Phase::Failed { .. } | Phase::Idle => {
                self.entities
                    .get_mut(&id)
                    .expect("exists")
                    .rt
                    .recent_restarts
                    .clear();
                self.spawn(id, None, false);
                Ok(())
            }
            _ => Err(EngineError::precondition(format!(
                "entity {} is {} already",
                rec.spec.name,
                rec.rt.phase.label()
            ))),
        }
    }

    fn remove_entity(&mut self, id: EntityId, stop: bool) {
        let rec = &self.entities[&id];
        let started = matches!(rec.spec.kind, EntityKind::Started(_));
        match rec.rt.phase {
            Phase::Running { .. } if stop && started => self.begin_stop(id, AfterStop::Remove),
            Phase::Stopping { .. } => {
                if let Phase::Stopping { then, .. } =
                    &mut self.entities.get_mut(&id).expect("exists").rt.phase
                {
                    *then = AfterStop::Remove;
                }
                self.dirty.insert(id);
            }
            _ => {
                self.out.commands.push(Command::Unwatch { entity: id });
                self.delete_entity(id, "removed");
            }
        }
    }

    fn delete_entity(&mut self, id: EntityId, why: &str) {
        if let Some(rec) = self.entities.remove(&id) {
            self.names.remove(&rec.spec.name);
            self.timers.clear_entity(id);
            self.beat_checked.remove(&id);
            self.dirty.remove(&id);
            self.deleted.insert(id);
            self.out
                .commands
                .push(Command::ReleaseBeatSlot { entity: id });
            self.emit(
                &rec.spec.name,
                EventKind::EntityRemoved.as_str(),
                why.to_string(),
            );
        }
    }

    fn reload(
        &mut self,
        specs: Vec<EntitySpec>,
        procs: HashMap<String, ProcessRef>,
    ) -> Result<Reply, EngineError> {
        // Validate everything before touching anything: a reload applies whole or not at all.
        let mut seen = BTreeSet::new();
        for s in &specs {
            s.validate()?;
            if !seen.insert(s.name.clone()) {
                return Err(EngineError::invalid(format!(
                    "entity {} is declared twice",
                    s.name
                )));
            }
            if let Some(id) = self.names.get(&s.name) {
                if self.entities[id].origin == Origin::Api {
                    return Err(EngineError::exists(format!(
                        "entity {} exists already (added through the API); remove it first",
                        s.name
                    )));
                }
            } else if matches!(s.kind, EntityKind::Attached { .. }) && !procs.contains_key(&s.name)
            {
                return Err(EngineError::invalid(format!(
                    "entity {}: its process was not found",
                    s.name
                )));
            }
        }
        let removed: Vec<String> = self
            .entities
            .values()
            .filter(|r| r.origin == Origin::Config && !seen.contains(&r.spec.name))
            .map(|r| r.spec.name.clone())
            .collect();
        let adds = specs
            .iter()
            .filter(|s| !self.names.contains_key(&s.name))
            .count();
        if self.entities.len() - removed.len() + adds > self.capacity as usize {
            return Err(EngineError::precondition(format!(
                "the new config holds more entities than the capacity of {}",
                self.capacity
            )));
        }
        for name in &removed {
            let id = self.names[name];
            self.remove_entity(id, true);
        }
        let (mut added, mut changed) = (Vec::new(), Vec::new());
        for s in specs {
            match self.names.get(&s.name).copied() {
                Some(id) => {
                    let rec = self.entities.get_mut(&id).expect("exists");
                    if rec.spec != s {
                        if rec.spec.kind != s.kind {
                            rec.rt.pending_note =
                                Some("new command applies at the next start".into());
                        }
                        rec.spec = s.clone();
                        self.dirty.insert(id);
                        changed.push(s.name);
                    }
                }
                None => {
                    let proc = procs.get(&s.name).copied();
                    added.push(s.name.clone());
                    self.add_entity(s, proc, Origin::Config);
                }
            }
        }
        self.emit(
            "",
            EventKind::Reloaded.as_str(),
            format!(
                "{} added, {} changed, {} removed",
                added.len(),
                changed.len(),
                removed.len()
            ),
        );
        Ok(Reply::Reloaded {
            added,
            changed,
            removed,
        })
    }

    // ----- process lifecycle -----------------------------------------------------

    fn spawn(&mut self, id: EntityId, run: Option<RunId>, restart: bool) {
        let nonce = self.node.next_nonce;
        self.node.next_nonce += 1;
        self.node_dirty = true;
        let rec = self.entities.get_mut(&id).expect("exists");
        let Some(command) = rec.spec.kind.restart_command().cloned() else {
            return;
        };
        rec.rt.phase = Phase::Starting {
            nonce,
            run,
            restart,
        };
        rec.rt.heartbeat.active = false;
        rec.rt.pending_note = None;
        self.dirty.insert(id);
        let (name, token) = (rec.spec.name.clone(), rec.uid);
        self.out.commands.push(Command::Spawn {
            entity: id,
            name,
            token,
            nonce,
            command,
            resumed: false,
        });
    }

    fn set_running(&mut self, id: EntityId, proc: ProcessRef) {
        let now = self.now.mono_ms;
        let rec = self.entities.get_mut(&id).expect("exists");
        rec.rt.phase = Phase::Running { proc };
        rec.rt.since_ms = now;
        rec.rt.heartbeat = state::HeartbeatState {
            active: rec.spec.heartbeat.is_some(),
            anchor_ms: now,
            ..Default::default()
        };
        self.dirty.insert(id);
        self.beat_checked.insert(id, 0);
        self.out.commands.push(Command::Watch { entity: id, proc });
    }

    fn on_spawned(&mut self, id: EntityId, nonce: u64, result: Result<ProcessRef, String>) {
        let Some(rec) = self.entities.get(&id) else {
            return;
        };
        let Phase::Starting {
            nonce: expected,
            run,
            restart,
        } = rec.rt.phase
        else {
            return;
        };
        if expected != nonce {
            return;
        }
        let name = rec.spec.name.clone();
        match result {
            Ok(proc) => {
                self.set_running(id, proc);
                self.emit(
                    &name,
                    EventKind::Started.as_str(),
                    format!("pid {}", proc.pid),
                );
                if restart {
                    let rec = self.entities.get_mut(&id).expect("exists");
                    rec.rt.restarts += 1;
                    // Conditions without rearm are pruned by a restart, as in QNX.
                    rec.spec.conditions.retain(|c| c.flags.rearm);
                    let n = rec.rt.restarts;
                    self.fire(
                        id,
                        ConditionKind::Restart,
                        format!("restart {n}, pid {}", proc.pid),
                        Occurrence::Plain,
                    );
                } else {
                    self.fire(
                        id,
                        ConditionKind::Attach,
                        format!("pid {}", proc.pid),
                        Occurrence::Plain,
                    );
                }
                if let Some(run) = run {
                    self.finish_entity_wait(id, run, Ok(format!("restarted, pid {}", proc.pid)));
                }
            }
            Err(reason) => {
                let rec = self.entities.get_mut(&id).expect("exists");
                rec.rt.phase = Phase::Failed {
                    reason: format!("cannot start: {reason}"),
                };
                self.dirty.insert(id);
                self.emit(&name, EventKind::StartFailed.as_str(), reason.clone());
                if let Some(run) = run {
                    self.finish_entity_wait(id, run, Err(format!("cannot start: {reason}")));
                }
            }
        }
        self.drive(id);
    }

    fn on_exited(&mut self, id: EntityId, proc: ProcessRef, status: ExitStatus) {
        let Some(rec) = self.entities.get_mut(&id) else {
            return;
        };
        if rec.rt.phase.process() != Some(proc) {
            return; // a stale report about an earlier process
        }
        rec.rt.last_exit = Some(status);
        rec.rt.heartbeat.active = false;
        let name = rec.spec.name.clone();
        self.dirty.insert(id);
        match rec.rt.phase.clone() {
            Phase::Running { .. } => {
                rec.rt.phase = Phase::Dead;
                rec.rt.deaths += 1;
                rec.rt.since_ms = self.now.mono_ms;
                let detail = format!("pid {}: {status}", proc.pid);
                self.fire(id, ConditionKind::Death, detail.clone(), Occurrence::Plain);
                if status.is_abnormal() {
                    self.fire(id, ConditionKind::AbnormalDeath, detail, Occurrence::Plain);
                }
            }
            Phase::Stopping { then, .. } => {
                self.timers.cancel(Timer::StopKill(id));
                self.emit(
                    &name,
                    EventKind::Exited.as_str(),
                    format!("pid {}: {status}", proc.pid),
                );
                match then {
                    AfterStop::Stay => {
                        let rec = self.entities.get_mut(&id).expect("exists");
                        rec.rt.phase = Phase::Stopped;
                        rec.rt.since_ms = self.now.mono_ms;
                    }
                    AfterStop::Remove => self.delete_entity(id, "removed"),
                    AfterStop::Restart(None) => self.spawn(id, None, true),
                    AfterStop::Restart(Some(run)) => {
                        self.entities.get_mut(&id).expect("exists").rt.phase = Phase::Dead;
                        self.restart_after_stop(id, run);
                    }
                }
            }
            _ => {}
        }
        self.drive(id);
    }

    fn begin_stop(&mut self, id: EntityId, then: AfterStop) {
        let now = self.now.mono_ms;
        let rec = self.entities.get_mut(&id).expect("exists");
        let Some(proc) = rec.rt.phase.process() else {
            return;
        };
        let kill_at_ms = now + rec.spec.stop.timeout_ms;
        let signal = rec.spec.stop.signal;
        rec.rt.phase = Phase::Stopping {
            proc,
            kill_at_ms,
            killed: false,
            then,
        };
        rec.rt.heartbeat.active = false;
        self.dirty.insert(id);
        self.out.commands.push(Command::Signal {
            target: SignalDest::Process(id, proc),
            signal,
            report: None,
        });
    }

    fn stop_timeout(&mut self, id: EntityId) {
        let Some(rec) = self.entities.get_mut(&id) else {
            return;
        };
        if let Phase::Stopping { proc, killed, .. } = &mut rec.rt.phase
            && !*killed
        {
            *killed = true;
            let proc = *proc;
            let name = rec.spec.name.clone();
            self.dirty.insert(id);
            self.out.commands.push(Command::Signal {
                target: SignalDest::Process(id, proc),
                signal: 9,
                report: None,
            });
            self.out.commands.push(Command::Log {
                level: 1,
                entity: name,
                message: format!("pid {} did not stop in time: SIGKILL", proc.pid),
            });
        }
    }

    // ----- heartbeats ----------------------------------------------------------

    fn init_beat_index(&mut self, id: EntityId) {
        let rec = &self.entities[&id];
        if let Some(hb) = rec.spec.heartbeat {
            let k = self.now.mono_ms.saturating_sub(rec.rt.heartbeat.anchor_ms) / hb.period_ms;
            self.beat_checked.insert(id, k);
        }
    }

    fn check_heartbeat(&mut self, id: EntityId, probe: &mut dyn BeatProbe) {
        let Some(rec) = self.entities.get(&id) else {
            return;
        };
        let (Some(spec), true) = (rec.spec.heartbeat, rec.rt.heartbeat.active) else {
            return;
        };
        let k_now = self.now.mono_ms.saturating_sub(rec.rt.heartbeat.anchor_ms) / spec.period_ms;
        let k_last = self.beat_checked.get(&id).copied().unwrap_or(0);
        let periods = k_now.saturating_sub(k_last);
        if periods == 0 {
            self.schedule_heartbeat(id);
            return;
        }
        self.beat_checked.insert(id, k_now);
        let beat = probe.observe(id);
        let rec = self.entities.get_mut(&id).expect("exists");
        let hb = &mut rec.rt.heartbeat;
        let before = *hb;
        if beat {
            hb.missed = 0;
        } else {
            hb.missed = hb
                .missed
                .saturating_add(periods.min(u32::MAX as u64) as u32);
        }
        let fire_low = !hb.low_fired && hb.missed >= spec.low;
        let fire_high = !hb.high_fired && hb.missed >= spec.high;
        hb.low_fired |= fire_low;
        hb.high_fired |= fire_high;
        let missed = hb.missed;
        if *hb != before {
            self.dirty.insert(id);
        }
        if fire_low {
            let d = format!("{missed} heartbeats missed (low threshold {})", spec.low);
            self.fire(id, ConditionKind::HeartbeatMissedLow, d, Occurrence::Plain);
        }
        if fire_high {
            let d = format!("{missed} heartbeats missed (high threshold {})", spec.high);
            self.fire(id, ConditionKind::HeartbeatMissedHigh, d, Occurrence::Plain);
        }
        self.drive(id);
        self.schedule_heartbeat(id);
    }

    fn schedule_heartbeat(&mut self, id: EntityId) {
        let Some(rec) = self.entities.get(&id) else {
            return;
        };
        match (rec.spec.heartbeat, rec.rt.heartbeat.active) {
            (Some(spec), true) => {
                let anchor = rec.rt.heartbeat.anchor_ms;
                let k = self.now.mono_ms.saturating_sub(anchor) / spec.period_ms + 1;
                self.timers
                    .set(Timer::Heartbeat(id), anchor + k * spec.period_ms);
            }
            _ => self.timers.cancel(Timer::Heartbeat(id)),
        }
    }

    fn heartbeat_healthy(&mut self, id: EntityId) {
        let now = self.now.mono_ms;
        if let Some(rec) = self.entities.get_mut(&id) {
            let active = rec.rt.heartbeat.active;
            rec.rt.heartbeat = state::HeartbeatState {
                active,
                anchor_ms: now,
                ..Default::default()
            };
            self.beat_checked.insert(id, 0);
            self.dirty.insert(id);
        }
    }

    // ----- events and persistence ------------------------------------------------

    fn emit(&mut self, entity: &str, kind: &str, detail: String) {
        let seq = EventSeq(self.node.next_seq);
        self.node.next_seq += 1;
        self.node_dirty = true;
        self.out.events.push(Event {
            seq,
            time_ms: self.now.wall_ms,
            entity: entity.to_string(),
            kind: kind.to_string(),
            detail: clip_detail(detail),
        });
    }

    /// Closes the step: re-arms the timers of changed entities and encodes records.
    fn finish(&mut self) -> Step {
        let dirty = std::mem::take(&mut self.dirty);
        for id in &dirty {
            self.reschedule(*id);
        }
        let mut step = std::mem::take(&mut self.out);
        if std::mem::take(&mut self.node_dirty) {
            step.persist.node = Some(record::encode_node(&self.node));
        }
        for id in dirty {
            if let Some(rec) = self.entities.get(&id) {
                step.persist
                    .entities
                    .push((id.0, Some(record::encode_entity(rec))));
            }
        }
        for id in std::mem::take(&mut self.deleted) {
            if !self.entities.contains_key(&id) {
                step.persist.entities.push((id.0, None));
            }
        }
        for e in &step.events {
            step.persist.events.push((e.seq.0, record::encode_event(e)));
        }
        step
    }

    /// Derives an entity's timers from its state.
    fn reschedule(&mut self, id: EntityId) {
        self.timers.clear_entity(id);
        let Some(rec) = self.entities.get(&id) else {
            return;
        };
        if let Phase::Stopping {
            kill_at_ms,
            killed: false,
            ..
        } = rec.rt.phase
        {
            self.timers.set(Timer::StopKill(id), kill_at_ms);
        }
        let wakes: Vec<(RunId, u64)> = rec
            .runs
            .iter()
            .filter_map(|r| match r.wait {
                RunWait::Until(t) | RunWait::Backoff(t) => Some((r.id, t)),
                _ => None,
            })
            .collect();
        for (run, t) in wakes {
            self.timers.set(Timer::RunWake(id, run), t);
        }
        self.schedule_heartbeat(id);
    }
}

/// Extra facts about an occurrence that condition filters look at.
#[derive(Clone, Debug)]
enum Occurrence {
    Plain,
    Node { node: String },
    Raise { severity: u32 },
    State { from: String, to: String },
}

/// Validates a node-local name; re-exported for the driver's checks.
pub fn check_name(what: &str, name: &str) -> Result<(), EngineError> {
    validate_name(what, name)
}

#[cfg(test)]
mod tests;
