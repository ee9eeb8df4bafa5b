//! Multistage recovery: condition runs, their lanes, and the execution of actions.
//!
//! A run is a snapshot of a condition's action list plus a cursor. The cursor is a
//! stack of frames: frame 0 walks the condition's actions, frame k+1 walks the fail
//! actions of the action frame k stands on. Runs of one entity share a FIFO lane
//! (no-wait conditions have a fast lane, independent ones a lane each), so one
//! entity's slow recovery never holds up another's.

use super::state::{AfterStop, Frame, Lane, Pending, Phase, Run, RunWait};
use super::{Command, Engine, Occurrence, RemoteOp, SignalDest};
use crate::event::EventKind;
use crate::ids::{EntityId, RunId};
use crate::spec::{ActionKind, ActionSpec, ConditionKind, ConditionSpec, EntityKind, SignalTarget};

/// What starting an action led to.
enum Started {
    /// It finished at once.
    Done(Result<String, String>),
    /// It waits for a result, a timer or the entity.
    Blocked,
}

impl Engine {
    /// Publishes an occurrence and starts a run for every condition it matches.
    pub(super) fn fire(
        &mut self,
        id: EntityId,
        kind: ConditionKind,
        detail: String,
        occ: Occurrence,
    ) {
        let Some(rec) = self.entities.get(&id) else {
            return;
        };
        let name = rec.spec.name.clone();
        let matching: Vec<ConditionSpec> = rec
            .spec
            .conditions
            .iter()
            .filter(|c| c.kind == kind || (c.kind == ConditionKind::Any && !kind.is_node_kind()))
            .filter(|c| match &occ {
                Occurrence::Node { node } => c.node.as_ref().is_none_or(|n| n == node),
                Occurrence::Raise { severity } => *severity >= c.min_severity,
                Occurrence::State { from, to } => {
                    c.from_state.as_ref().is_none_or(|f| f == from)
                        && c.to_state.as_ref().is_none_or(|t| t == to)
                }
                Occurrence::Plain => true,
            })
            .filter(|c| !c.actions.is_empty())
            .cloned()
            .collect();
        self.emit(&name, kind.as_str(), detail.clone());
        for c in matching {
            let actions = c.actions.clone();
            self.start_run(id, &c, detail.clone(), actions);
        }
    }

    /// Queues a run of `actions` for condition `cond`.
    pub(super) fn start_run(
        &mut self,
        id: EntityId,
        cond: &ConditionSpec,
        trigger: String,
        actions: Vec<ActionSpec>,
    ) {
        let run = RunId(self.node.next_run);
        self.node.next_run += 1;
        self.node_dirty = true;
        let lane = if cond.flags.independent {
            Lane::Independent
        } else if cond.flags.no_wait {
            Lane::NoWait
        } else {
            Lane::Shared
        };
        if let Some(rec) = self.entities.get_mut(&id) {
            rec.runs.push(Run {
                id: run,
                condition: cond.name.clone(),
                lane,
                trigger,
                actions,
                frames: vec![Frame {
                    index: 0,
                    done: 0,
                    delayed: false,
                }],
                wait: RunWait::Ready,
                step: 0,
            });
            self.dirty.insert(id);
        }
    }

    /// Advances every run of the entity that heads its lane, until all are blocked.
    pub(super) fn drive(&mut self, id: EntityId) {
        loop {
            let Some(rec) = self.entities.get(&id) else {
                return;
            };
            let ready: Vec<RunId> = rec
                .runs
                .iter()
                .enumerate()
                .filter(|(i, r)| {
                    r.wait == RunWait::Ready
                        && (r.lane == Lane::Independent
                            || !rec.runs[..*i].iter().any(|o| o.lane == r.lane))
                })
                .map(|(_, r)| r.id)
                .collect();
            if ready.is_empty() {
                return;
            }
            for run in ready {
                self.step_run(id, run);
            }
        }
    }

    fn run_mut(&mut self, id: EntityId, run: RunId) -> Option<&mut Run> {
        self.entities
            .get_mut(&id)?
            .runs
            .iter_mut()
            .find(|r| r.id == run)
    }

    /// The action the run's innermost frame stands on, or `None` if that list is done.
    fn current_action(run: &Run) -> Option<&ActionSpec> {
        let mut list = &run.actions;
        let depth = run.frames.len();
        for (i, f) in run.frames.iter().enumerate() {
            let a = list.get(f.index)?;
            if i + 1 == depth {
                return Some(a);
            }
            list = &a.on_fail;
        }
        None
    }

    /// Executes the run until it blocks or ends.
    fn step_run(&mut self, id: EntityId, run_id: RunId) {
        let now = self.now.mono_ms;
        loop {
            let Some(run) = self.run_mut(id, run_id) else {
                return;
            };
            if run.wait != RunWait::Ready {
                return;
            }
            let Some(action) = Self::current_action(run).cloned() else {
                // This list is finished: pop its frame.
                run.frames.pop();
                if run.frames.is_empty() {
                    self.entities
                        .get_mut(&id)
                        .expect("run found")
                        .runs
                        .retain(|r| r.id != run_id);
                    self.dirty.insert(id);
                    return;
                }
                // The parent stands on the action whose fail list just ran.
                let parent = Self::current_action(run).cloned();
                let frame = run.frames.last_mut().expect("non-empty");
                match parent {
                    Some(p) if p.flags.break_on_fail => frame.index = usize::MAX,
                    _ => {
                        frame.index += 1;
                        frame.done = 0;
                        frame.delayed = false;
                    }
                }
                continue;
            };
            let frame = run.frames.last_mut().expect("non-empty");
            if action.delay_ms > 0 && !frame.delayed {
                frame.delayed = true;
                run.wait = RunWait::Until(now + action.delay_ms);
                self.dirty.insert(id);
                return;
            }
            frame.delayed = false;
            self.dirty.insert(id);
            match self.start_action(id, run_id, &action) {
                Started::Done(outcome) => self.action_finished(id, run_id, &action, outcome),
                Started::Blocked => return,
            }
        }
    }

    /// Starts the action; quick actions finish at once, others block the run.
    fn start_action(&mut self, id: EntityId, run_id: RunId, action: &ActionSpec) -> Started {
        let now = self.now.mono_ms;
        let name = self.entities[&id].spec.name.clone();
        match &action.kind {
            // A remote entity is restarted by its own node.
            ActionKind::Restart => match &self.entities[&id].spec.kind {
                EntityKind::Remote { node, entity } => {
                    let op = RemoteOp::Restart {
                        node: node.clone(),
                        entity: entity.clone(),
                    };
                    self.remote(id, run_id, op)
                }
                _ => self.begin_restart(id, run_id),
            },
            ActionKind::Execute(cmd) => {
                let (condition, trigger) = {
                    let run = self.run_mut(id, run_id).expect("running");
                    (run.condition.clone(), run.trigger.clone())
                };
                let step = self.dispatch(id, run_id, Pending::Execute);
                self.out.commands.push(Command::Execute {
                    entity: id,
                    run: run_id,
                    step,
                    command: cmd.clone(),
                    context: vec![
                        ("HAM_ENTITY".into(), name),
                        ("HAM_CONDITION".into(), condition),
                        ("HAM_ACTION".into(), action.name.clone()),
                        ("HAM_TRIGGER".into(), trigger),
                    ],
                });
                Started::Blocked
            }
            ActionKind::Notify { message } => {
                self.emit(&name, EventKind::Notify.as_str(), message.clone());
                Started::Done(Ok("notified".into()))
            }
            ActionKind::Signal { target, signal } => {
                let dest = match target {
                    SignalTarget::Pid(p) => SignalDest::Pid(*p),
                    SignalTarget::Entity(n) => {
                        let target_name = if n.is_empty() { &name } else { n };
                        let proc = self
                            .names
                            .get(target_name)
                            .and_then(|t| self.entities.get(t))
                            .and_then(|r| r.rt.phase.process().map(|p| (r.id, p)));
                        match proc {
                            Some((tid, p)) => SignalDest::Process(tid, p),
                            None => {
                                return Started::Done(Err(format!(
                                    "entity {target_name} has no running process to signal"
                                )));
                            }
                        }
                    }
                };
                let step = self.dispatch(id, run_id, Pending::Signal);
                self.out.commands.push(Command::Signal {
                    target: dest,
                    signal: *signal,
                    report: Some((id, run_id, step)),
                });
                Started::Blocked
            }
            ActionKind::Waitfor { path, timeout_ms } => {
                let deadline_ms = now + timeout_ms;
                let step = self.dispatch(
                    id,
                    run_id,
                    Pending::Waitfor {
                        path: path.clone(),
                        deadline_ms,
                    },
                );
                self.out.commands.push(Command::Waitfor {
                    entity: id,
                    run: run_id,
                    step,
                    path: path.clone(),
                    deadline_ms,
                });
                Started::Blocked
            }
            ActionKind::HeartbeatHealthy => {
                self.heartbeat_healthy(id);
                Started::Done(Ok("heartbeat state reset".into()))
            }
            ActionKind::Log { message, level } => {
                self.out.commands.push(Command::Log {
                    level: *level,
                    entity: name,
                    message: message.clone(),
                });
                Started::Done(Ok("logged".into()))
            }
            ActionKind::RemoteRestart { node, entity } => self.remote(
                id,
                run_id,
                RemoteOp::Restart {
                    node: node.clone(),
                    entity: entity.clone(),
                },
            ),
            ActionKind::RemoteExecute { node, command } => self.remote(
                id,
                run_id,
                RemoteOp::Execute {
                    node: node.clone(),
                    command: command.clone(),
                },
            ),
            ActionKind::Failover { entity, candidates } => self.remote(
                id,
                run_id,
                RemoteOp::Failover {
                    entity: entity.clone(),
                    candidates: candidates.clone(),
                },
            ),
        }
    }

    /// Hands an action to the mesh; its outcome comes back as an action result.
    fn remote(&mut self, id: EntityId, run_id: RunId, op: RemoteOp) -> Started {
        let step = self.dispatch(id, run_id, Pending::Remote);
        self.out.commands.push(Command::Remote {
            entity: id,
            run: run_id,
            step,
            op,
        });
        Started::Blocked
    }

    /// Marks the run as waiting for a dispatched command and returns the step number.
    fn dispatch(&mut self, id: EntityId, run_id: RunId, what: Pending) -> u64 {
        let run = self.run_mut(id, run_id).expect("running");
        run.step += 1;
        run.wait = RunWait::Result { what };
        run.step
    }

    /// Records an action's outcome and moves the cursor: next repetition, next
    /// action, into the fail list, or out of the list on break-on-fail.
    fn action_finished(
        &mut self,
        id: EntityId,
        run_id: RunId,
        action: &ActionSpec,
        outcome: Result<String, String>,
    ) {
        let name = self.entities[&id].spec.name.clone();
        let Some(run) = self.run_mut(id, run_id) else {
            return;
        };
        let cond = run.condition.clone();
        let top_level = run.frames.len() == 1;
        run.wait = RunWait::Ready;
        match outcome {
            Ok(detail) => {
                let frame = run.frames.last_mut().expect("non-empty");
                frame.done += 1;
                if frame.done >= action.repeat {
                    frame.index += 1;
                    frame.done = 0;
                }
                frame.delayed = false;
                self.dirty.insert(id);
                self.emit(
                    &name,
                    EventKind::ActionOk.as_str(),
                    format!(
                        "{cond}/{} ({}): {detail}",
                        action.name,
                        action.kind.as_str()
                    ),
                );
            }
            Err(reason) => {
                if action.on_fail.is_empty() {
                    let frame = run.frames.last_mut().expect("non-empty");
                    if action.flags.break_on_fail {
                        frame.index = usize::MAX;
                    } else {
                        frame.index += 1;
                        frame.done = 0;
                        frame.delayed = false;
                    }
                } else {
                    run.frames.push(Frame {
                        index: 0,
                        done: 0,
                        delayed: false,
                    });
                }
                self.dirty.insert(id);
                self.emit(
                    &name,
                    EventKind::ActionFailed.as_str(),
                    format!(
                        "{cond}/{} ({}): {reason}",
                        action.name,
                        action.kind.as_str()
                    ),
                );
                if top_level && !action.flags.keep_on_fail {
                    // QNX semantics: a failed action leaves its condition.
                    if let Some(c) = self
                        .entities
                        .get_mut(&id)
                        .and_then(|r| r.spec.conditions.iter_mut().find(|c| c.name == cond))
                    {
                        c.actions.retain(|a| a.name != action.name);
                    }
                }
            }
        }
    }

    // ----- restart actions -----------------------------------------------------

    /// A run's restart action: applies the intensity limit, stops a live process,
    /// waits out the backoff, and spawns.
    fn begin_restart(&mut self, id: EntityId, run_id: RunId) -> Started {
        let now = self.now.mono_ms;
        let rec = self.entities.get_mut(&id).expect("exists");
        if rec.spec.kind.restart_command().is_none() {
            return Started::Done(Err("the entity has no command to restart it with".into()));
        }
        let policy = rec.spec.restart_policy;
        if policy.window_ms > 0 {
            let horizon = now.saturating_sub(policy.window_ms);
            rec.rt.recent_restarts.retain(|t| *t > horizon);
        } else {
            rec.rt.recent_restarts.clear();
        }
        if policy.max_restarts > 0 && rec.rt.recent_restarts.len() as u32 >= policy.max_restarts {
            let reason = format!(
                "restart limit reached: {} restarts within {} ms",
                policy.max_restarts, policy.window_ms
            );
            if rec.rt.phase.process().is_none() {
                rec.rt.phase = Phase::Failed {
                    reason: reason.clone(),
                };
            }
            let name = rec.spec.name.clone();
            self.dirty.insert(id);
            self.emit(&name, EventKind::RestartLimit.as_str(), reason.clone());
            return Started::Done(Err(reason));
        }
        if policy.window_ms > 0 {
            rec.rt.recent_restarts.push(now);
        }
        self.dirty.insert(id);
        match rec.rt.phase.clone() {
            Phase::Running { .. } => {
                self.run_mut(id, run_id).expect("running").wait = RunWait::Entity;
                self.begin_stop(id, AfterStop::Restart(Some(run_id)));
                Started::Blocked
            }
            Phase::Stopping { .. } => {
                if let Phase::Stopping { then, .. } =
                    &mut self.entities.get_mut(&id).expect("exists").rt.phase
                {
                    *then = AfterStop::Restart(Some(run_id));
                }
                self.run_mut(id, run_id).expect("running").wait = RunWait::Entity;
                Started::Blocked
            }
            Phase::Starting { .. } => Started::Done(Ok("a start was already under way".into())),
            Phase::Idle | Phase::Dead | Phase::Stopped | Phase::Failed { .. } => {
                self.restart_after_stop(id, run_id);
                Started::Blocked
            }
        }
    }

    /// The entity is down: wait out the backoff if any, then spawn.
    pub(super) fn restart_after_stop(&mut self, id: EntityId, run_id: RunId) {
        let now = self.now.mono_ms;
        let rec = &self.entities[&id];
        let recent = rec.rt.recent_restarts.len().saturating_sub(1) as u32;
        let delay = rec.spec.restart_policy.backoff_ms(recent);
        let Some(run) = self.run_mut(id, run_id) else {
            self.spawn(id, None, true);
            return;
        };
        if delay > 0 {
            run.wait = RunWait::Backoff(now + delay);
            self.dirty.insert(id);
        } else {
            run.wait = RunWait::Entity;
            self.spawn(id, Some(run_id), true);
        }
    }

    /// The entity a restart action waited for has started (or could not).
    pub(super) fn finish_entity_wait(
        &mut self,
        id: EntityId,
        run_id: RunId,
        outcome: Result<String, String>,
    ) {
        let Some(run) = self.run_mut(id, run_id) else {
            return;
        };
        if run.wait != RunWait::Entity {
            return;
        }
        let Some(action) = Self::current_action(run).cloned() else {
            return;
        };
        self.action_finished(id, run_id, &action, outcome);
    }

    /// A dispatched command reported back.
    pub(super) fn on_action_done(
        &mut self,
        id: EntityId,
        run_id: RunId,
        step: u64,
        outcome: Result<String, String>,
    ) {
        let Some(run) = self.run_mut(id, run_id) else {
            return;
        };
        if run.step != step || !matches!(run.wait, RunWait::Result { .. }) {
            return;
        }
        let Some(action) = Self::current_action(run).cloned() else {
            return;
        };
        self.action_finished(id, run_id, &action, outcome);
        self.drive(id);
    }

    /// A run's delay or backoff elapsed.
    pub(super) fn wake_run(&mut self, id: EntityId, run_id: RunId) {
        let now = self.now.mono_ms;
        let Some(run) = self.run_mut(id, run_id) else {
            return;
        };
        match run.wait {
            RunWait::Until(t) if t <= now => {
                run.wait = RunWait::Ready;
                self.dirty.insert(id);
                self.drive(id);
            }
            RunWait::Backoff(t) if t <= now => {
                run.wait = RunWait::Entity;
                self.dirty.insert(id);
                self.spawn(id, Some(run_id), true);
            }
            _ => {}
        }
    }

    /// After a restore: re-issue waits whose deadline is still ahead, and fail the
    /// commands whose outcome was lost with the previous HAM.
    pub(super) fn resume_runs(&mut self, id: EntityId) {
        let now = self.now.mono_ms;
        let Some(rec) = self.entities.get(&id) else {
            return;
        };
        let pending: Vec<(RunId, u64, Pending)> = rec
            .runs
            .iter()
            .filter_map(|r| match &r.wait {
                RunWait::Result { what } => Some((r.id, r.step, what.clone())),
                _ => None,
            })
            .collect();
        for (run, step, what) in pending {
            match what {
                Pending::Waitfor { path, deadline_ms } if deadline_ms > now => {
                    self.out.commands.push(Command::Waitfor {
                        entity: id,
                        run,
                        step,
                        path,
                        deadline_ms,
                    });
                }
                Pending::Waitfor { .. } => {
                    self.on_action_done(id, run, step, Err("timed out".into()));
                }
                Pending::Execute | Pending::Signal | Pending::Remote => {
                    self.on_action_done(
                        id,
                        run,
                        step,
                        Err("outcome lost: the HAM was replaced while it ran".into()),
                    );
                }
            }
        }
        self.drive(id);
    }
}
