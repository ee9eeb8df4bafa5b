//! Engine specifications: a virtual clock, a simulated store, no processes.

use super::state::{ExitStatus, Origin};
use super::*;
use crate::spec::*;
use std::collections::BTreeMap;

/// Drives an engine like `hamd` does, keeping the persisted records like the store.
struct Sim {
    engine: Engine,
    now: u64,
    node: Option<Vec<u8>>,
    records: BTreeMap<u32, Vec<u8>>,
    events: Vec<Event>,
    commands: Vec<Command>,
    beats: BTreeSet<EntityId>,
    next_pid: i32,
}

impl BeatProbe for BTreeSet<EntityId> {
    fn observe(&mut self, entity: EntityId) -> bool {
        self.remove(&entity)
    }
}

impl Sim {
    fn new() -> Sim {
        Sim {
            engine: Engine::new(64),
            now: 1_000,
            node: None,
            records: BTreeMap::new(),
            events: Vec::new(),
            commands: Vec::new(),
            beats: BTreeSet::new(),
            next_pid: 100,
        }
    }

    fn apply(&mut self, step: Step) {
        if let Some(n) = step.persist.node {
            self.node = Some(n);
        }
        for (slot, bytes) in step.persist.entities {
            match bytes {
                Some(b) => self.records.insert(slot, b),
                None => self.records.remove(&slot),
            };
        }
        // Events are persisted exactly as published.
        let published: Vec<u64> = step.events.iter().map(|e| e.seq.0).collect();
        let stored: Vec<u64> = step.persist.events.iter().map(|(s, _)| *s).collect();
        assert_eq!(published, stored);
        self.events.extend(step.events);
        self.commands.extend(step.commands);
    }

    fn request(&mut self, req: Request) -> Result<Reply, EngineError> {
        let (step, r) = self.engine.handle_request(Now::at(self.now), req);
        if r.is_err() {
            assert!(
                step.persist.is_empty() && step.commands.is_empty(),
                "{step:?}"
            );
        }
        self.apply(step);
        r
    }

    fn input(&mut self, input: Input) {
        let step = self.engine.handle_input(Now::at(self.now), input);
        self.apply(step);
    }

    /// Advances the clock to `to`, firing every timer on the way at its own time.
    fn advance_to(&mut self, to: u64) {
        while let Some(t) = self.engine.next_deadline() {
            if t > to {
                break;
            }
            self.now = self.now.max(t);
            let step = self.engine.tick(Now::at(self.now), &mut self.beats);
            self.apply(step);
        }
        self.now = to;
    }

    fn advance(&mut self, ms: u64) {
        self.advance_to(self.now + ms);
    }

    fn take_commands(&mut self) -> Vec<Command> {
        std::mem::take(&mut self.commands)
    }

    /// Completes every pending spawn successfully; returns the new processes.
    fn complete_spawns(&mut self) -> Vec<ProcessRef> {
        let mut started = Vec::new();
        for c in self.take_commands() {
            if let Command::Spawn { entity, nonce, .. } = c {
                self.next_pid += 1;
                let proc = ProcessRef {
                    pid: self.next_pid,
                    start_time: self.now,
                };
                started.push(proc);
                self.input(Input::Spawned {
                    entity,
                    nonce,
                    result: Ok(proc),
                });
            }
        }
        started
    }

    fn pid(&self, name: &str) -> ProcessRef {
        self.engine
            .entity(name)
            .and_then(|r| r.rt.phase.process())
            .expect("has a process")
    }

    fn id(&self, name: &str) -> EntityId {
        self.engine.entity(name).expect("exists").id
    }

    fn kill(&mut self, name: &str, status: ExitStatus) {
        let proc = self.pid(name);
        let entity = self.id(name);
        self.input(Input::Exited {
            entity,
            proc,
            status,
        });
    }

    fn kinds(&self) -> Vec<String> {
        self.events.iter().map(|e| e.kind.clone()).collect()
    }

    fn count(&self, kind: &str) -> usize {
        self.events.iter().filter(|e| e.kind == kind).count()
    }

    fn restored(&self) -> Engine {
        let recs: Vec<(u32, Vec<u8>)> = self.records.iter().map(|(k, v)| (*k, v.clone())).collect();
        Engine::restore(64, self.node.as_deref(), &recs).expect("restores")
    }
}

fn started(name: &str) -> EntitySpec {
    EntitySpec::new(
        name,
        EntityKind::Started(CommandSpec::new(["/bin/sleep", "100"])),
    )
}

fn add(sim: &mut Sim, spec: EntitySpec) {
    sim.request(Request::AddEntity {
        spec,
        proc: None,
        origin: Origin::Api,
    })
    .expect("added");
    sim.complete_spawns();
}

const SIGKILL: ExitStatus = ExitStatus::Signal {
    signal: 9,
    core: false,
};

#[test]
fn killed_entity_is_restarted_once_with_events_in_order() {
    let mut sim = Sim::new();
    add(&mut sim, started("web").with_restart_on_death());
    let first = sim.pid("web");
    sim.kill("web", SIGKILL);
    let spawned = sim.complete_spawns();
    assert_eq!(spawned.len(), 1, "exactly one replacement");
    assert_ne!(sim.pid("web"), first);
    assert_eq!(
        sim.kinds(),
        [
            "entity-added",
            "started",
            "attach",
            "death",
            "abnormal-death",
            "started",
            "restart",
            "action-ok"
        ]
    );
    let seqs: Vec<u64> = sim.events.iter().map(|e| e.seq.0).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "contiguous from 1"
    );
    let st = &sim.engine.status(Now::at(sim.now))[0];
    assert_eq!((st.state, st.restarts, st.deaths), ("running", 1, 1));
}

#[test]
fn normal_exit_fires_death_but_not_abnormal_death() {
    let mut sim = Sim::new();
    add(&mut sim, started("job"));
    sim.kill("job", ExitStatus::Code(0));
    assert_eq!(sim.count("death"), 1);
    assert_eq!(sim.count("abnormal-death"), 0);
    add(&mut sim, started("bad"));
    sim.kill("bad", ExitStatus::Code(3));
    assert_eq!(sim.count("abnormal-death"), 1);
    assert!(
        sim.events
            .last()
            .expect("event")
            .detail
            .contains("exit code 3")
    );
}

#[test]
fn a_stale_exit_of_an_earlier_process_is_ignored() {
    let mut sim = Sim::new();
    add(&mut sim, started("web").with_restart_on_death());
    let first = sim.pid("web");
    sim.kill("web", SIGKILL);
    sim.complete_spawns();
    let id = sim.id("web");
    let before = sim.events.len();
    // The same PID with another start time is another process: no effect.
    sim.input(Input::Exited {
        entity: id,
        proc: first,
        status: SIGKILL,
    });
    assert_eq!(sim.events.len(), before);
    assert_eq!(
        sim.engine.entity("web").expect("e").rt.phase.label(),
        "running"
    );
}

#[test]
fn ladder_restarts_three_times_in_the_window_then_escalates_once() {
    let mut sim = Sim::new();
    let mut spec = started("flaky");
    spec.restart_policy = RestartPolicy {
        max_restarts: 3,
        window_ms: 10_000,
        ..Default::default()
    };
    let mut restart = ActionSpec::new("restart", ActionKind::Restart);
    restart.on_fail = vec![ActionSpec::new(
        "escalate",
        ActionKind::Execute(CommandSpec::new(["/bin/true"])),
    )];
    spec.conditions.push(ConditionSpec::new(
        "died",
        ConditionKind::Death,
        vec![restart],
    ));
    add(&mut sim, spec);
    let mut spawns = 0;
    let mut escalations = Vec::new();
    for _ in 0..5 {
        if sim
            .engine
            .entity("flaky")
            .expect("e")
            .rt
            .phase
            .process()
            .is_none()
        {
            break;
        }
        sim.advance(100);
        sim.kill("flaky", ExitStatus::Code(1));
        for c in sim.take_commands() {
            match c {
                Command::Spawn { entity, nonce, .. } => {
                    spawns += 1;
                    sim.next_pid += 1;
                    let proc = ProcessRef {
                        pid: sim.next_pid,
                        start_time: 0,
                    };
                    sim.input(Input::Spawned {
                        entity,
                        nonce,
                        result: Ok(proc),
                    });
                }
                Command::Execute { .. } => escalations.push(c),
                _ => {}
            }
        }
    }
    assert_eq!(spawns, 3, "three restarts");
    assert_eq!(escalations.len(), 1, "then one escalation");
    assert_eq!(sim.count("restart-limit"), 1);
    let rec = sim.engine.entity("flaky").expect("e");
    assert_eq!(rec.rt.phase.label(), "failed");
    assert_eq!(rec.rt.restarts, 3);
}

#[test]
fn restarts_spaced_beyond_the_window_are_not_limited() {
    let mut sim = Sim::new();
    let mut spec = started("slow").with_restart_on_death();
    spec.restart_policy = RestartPolicy {
        max_restarts: 2,
        window_ms: 1_000,
        ..Default::default()
    };
    add(&mut sim, spec);
    for _ in 0..6 {
        sim.advance(600);
        sim.kill("slow", SIGKILL);
        assert_eq!(sim.complete_spawns().len(), 1);
    }
    assert_eq!(sim.count("restart-limit"), 0);
}

#[test]
fn backoff_doubles_up_to_its_cap() {
    let mut sim = Sim::new();
    let mut spec = started("b").with_restart_on_death();
    spec.restart_policy = RestartPolicy {
        max_restarts: 10,
        window_ms: 60_000,
        backoff_initial_ms: 100,
        backoff_max_ms: 300,
    };
    add(&mut sim, spec);
    let mut delays = Vec::new();
    for _ in 0..4 {
        sim.kill("b", SIGKILL);
        let t0 = sim.now;
        assert!(
            sim.take_commands()
                .iter()
                .all(|c| !matches!(c, Command::Spawn { .. }))
        );
        let spawn_at = sim.engine.next_deadline().expect("backoff timer");
        sim.advance_to(spawn_at);
        assert_eq!(sim.complete_spawns().len(), 1);
        delays.push(spawn_at - t0);
    }
    assert_eq!(delays, [100, 200, 300, 300]);
}

#[test]
fn heartbeat_missed_low_and_high_fire_at_their_thresholds() {
    let mut sim = Sim::new();
    let mut spec = started("hb");
    spec.heartbeat = Some(HeartbeatSpec {
        period_ms: 100,
        low: 2,
        high: 4,
    });
    add(&mut sim, spec);
    let t0 = sim.now;
    let id = sim.id("hb");
    // Beats in periods 1 and 2, then silence.
    sim.beats.insert(id);
    sim.advance_to(t0 + 100);
    sim.beats.insert(id);
    sim.advance_to(t0 + 200);
    assert_eq!(sim.count("heartbeat-missed-low"), 0);
    sim.advance_to(t0 + 399);
    assert_eq!(sim.count("heartbeat-missed-low"), 0, "one miss only at 300");
    sim.advance_to(t0 + 400);
    assert_eq!(sim.count("heartbeat-missed-low"), 1, "second miss at 400");
    let low_at = sim
        .events
        .iter()
        .find(|e| e.kind == "heartbeat-missed-low")
        .expect("low")
        .time_ms;
    assert_eq!(
        low_at,
        Now::at(t0 + 400).wall_ms,
        "detected exactly at the deadline"
    );
    sim.advance_to(t0 + 599);
    assert_eq!(sim.count("heartbeat-missed-high"), 0);
    sim.advance_to(t0 + 600);
    assert_eq!(sim.count("heartbeat-missed-high"), 1);
    sim.advance_to(t0 + 2000);
    assert_eq!(
        sim.count("heartbeat-missed-low"),
        1,
        "latched until healthy"
    );
    assert_eq!(sim.count("heartbeat-missed-high"), 1);
}

#[test]
fn heartbeat_healthy_rearms_the_missed_conditions() {
    let mut sim = Sim::new();
    let mut spec = started("hb");
    spec.heartbeat = Some(HeartbeatSpec {
        period_ms: 100,
        low: 1,
        high: 3,
    });
    spec.conditions.push(ConditionSpec::new(
        "low",
        ConditionKind::HeartbeatMissedLow,
        vec![
            ActionSpec::new(
                "note",
                ActionKind::Notify {
                    message: "late".into(),
                },
            ),
            ActionSpec::new("healthy", ActionKind::HeartbeatHealthy),
        ],
    ));
    add(&mut sim, spec);
    let t0 = sim.now;
    sim.advance_to(t0 + 100);
    assert_eq!(sim.count("heartbeat-missed-low"), 1);
    sim.advance_to(t0 + 200);
    assert_eq!(
        sim.count("heartbeat-missed-low"),
        2,
        "re-armed by heartbeat-healthy"
    );
    assert_eq!(
        sim.count("heartbeat-missed-high"),
        0,
        "healthy reset the count"
    );
}

#[test]
fn a_failed_action_runs_its_fail_actions_and_break_on_fail_stops_the_list() {
    let mut sim = Sim::new();
    let mut spec = EntitySpec::new("g", EntityKind::Global);
    let mut wait = ActionSpec::new(
        "wait",
        ActionKind::Waitfor {
            path: "/nonexistent".into(),
            timeout_ms: 50,
        },
    );
    wait.flags.break_on_fail = true;
    wait.on_fail = vec![
        ActionSpec::new(
            "fallback",
            ActionKind::Execute(CommandSpec::new(["/bin/false"])),
        ),
        ActionSpec::new(
            "say",
            ActionKind::Notify {
                message: "gave up".into(),
            },
        ),
    ];
    spec.conditions.push(ConditionSpec::new(
        "r",
        ConditionKind::Raise,
        vec![
            wait,
            ActionSpec::new(
                "after",
                ActionKind::Notify {
                    message: "after".into(),
                },
            ),
        ],
    ));
    add(&mut sim, spec);
    sim.request(Request::Raise {
        name: "g".into(),
        severity: 1,
        message: "x".into(),
    })
    .expect("raised");
    let Some(Command::Waitfor {
        entity, run, step, ..
    }) = sim.take_commands().pop()
    else {
        panic!("waitfor dispatched");
    };
    sim.input(Input::ActionDone {
        entity,
        run,
        step,
        outcome: Err("timed out".into()),
    });
    let Some(Command::Execute { run, step, .. }) = sim.take_commands().pop() else {
        panic!("fallback dispatched");
    };
    sim.input(Input::ActionDone {
        entity,
        run,
        step,
        outcome: Err("exit code 1".into()),
    });
    let notes: Vec<&str> = sim
        .events
        .iter()
        .filter(|e| e.kind == "notify")
        .map(|e| e.detail.as_str())
        .collect();
    assert_eq!(
        notes,
        ["gave up"],
        "fail list ran on, break skipped 'after'"
    );
    assert_eq!(sim.count("action-failed"), 2);
    assert!(
        sim.engine.entity("g").expect("g").runs.is_empty(),
        "run finished"
    );
}

#[test]
fn without_keep_on_fail_a_failed_action_leaves_its_condition() {
    let mut sim = Sim::new();
    let mut spec = EntitySpec::new("g", EntityKind::Global);
    let mut sig = ActionSpec::new(
        "poke",
        ActionKind::Signal {
            target: SignalTarget::Entity("nobody".into()),
            signal: 10,
        },
    );
    sig.flags.keep_on_fail = false;
    spec.conditions
        .push(ConditionSpec::new("r", ConditionKind::Raise, vec![sig]));
    add(&mut sim, spec);
    sim.request(Request::Raise {
        name: "g".into(),
        severity: 0,
        message: String::new(),
    })
    .expect("raised");
    assert_eq!(sim.count("action-failed"), 1);
    assert!(
        sim.engine.entity("g").expect("g").spec.conditions[0]
            .actions
            .is_empty()
    );
}

#[test]
fn delays_and_repeats_run_in_order_in_one_lane() {
    let mut sim = Sim::new();
    let mut spec = EntitySpec::new("g", EntityKind::Global);
    let mut a = ActionSpec::new(
        "a",
        ActionKind::Notify {
            message: "a".into(),
        },
    );
    a.delay_ms = 100;
    a.repeat = 2;
    spec.conditions
        .push(ConditionSpec::new("r", ConditionKind::Raise, vec![a]));
    add(&mut sim, spec);
    let t0 = sim.now;
    for _ in 0..2 {
        sim.request(Request::Raise {
            name: "g".into(),
            severity: 0,
            message: String::new(),
        })
        .expect("raised");
    }
    sim.advance_to(t0 + 1000);
    let times: Vec<u64> = sim
        .events
        .iter()
        .filter(|e| e.kind == "notify")
        .map(|e| e.time_ms - Now::at(t0).wall_ms)
        .collect();
    assert_eq!(
        times,
        [100, 200, 300, 400],
        "second run waits for the first"
    );
}

#[test]
fn independent_conditions_do_not_wait_for_the_shared_lane() {
    let mut sim = Sim::new();
    let mut spec = EntitySpec::new("g", EntityKind::Global);
    let mut slow = ActionSpec::new(
        "slow",
        ActionKind::Notify {
            message: "slow".into(),
        },
    );
    slow.delay_ms = 500;
    spec.conditions
        .push(ConditionSpec::new("s", ConditionKind::Raise, vec![slow]));
    let mut fast = ConditionSpec::new(
        "f",
        ConditionKind::Raise,
        vec![ActionSpec::new(
            "fast",
            ActionKind::Notify {
                message: "fast".into(),
            },
        )],
    );
    fast.flags.independent = true;
    spec.conditions.push(fast);
    add(&mut sim, spec);
    sim.request(Request::Raise {
        name: "g".into(),
        severity: 0,
        message: String::new(),
    })
    .expect("raised");
    assert_eq!(sim.count("notify"), 1, "fast ran at once");
    sim.advance(500);
    assert_eq!(sim.count("notify"), 2);
}

#[test]
fn raise_and_state_conditions_filter_on_severity_and_transition() {
    let mut sim = Sim::new();
    let mut spec = EntitySpec::new("g", EntityKind::Global);
    let mut hi = ConditionSpec::new(
        "hi",
        ConditionKind::Raise,
        vec![ActionSpec::new(
            "n",
            ActionKind::Notify {
                message: "severe".into(),
            },
        )],
    );
    hi.min_severity = 5;
    let mut deg = ConditionSpec::new(
        "deg",
        ConditionKind::State,
        vec![ActionSpec::new(
            "n",
            ActionKind::Notify {
                message: "degraded".into(),
            },
        )],
    );
    deg.to_state = Some("degraded".into());
    spec.conditions.extend([hi, deg]);
    add(&mut sim, spec);
    for sev in [1, 5] {
        sim.request(Request::Raise {
            name: "g".into(),
            severity: sev,
            message: String::new(),
        })
        .expect("raise");
    }
    for st in ["ok", "degraded"] {
        sim.request(Request::SetState {
            name: "g".into(),
            state: st.into(),
        })
        .expect("state");
    }
    let notes: Vec<&str> = sim
        .events
        .iter()
        .filter(|e| e.kind == "notify")
        .map(|e| e.detail.as_str())
        .collect();
    assert_eq!(notes, ["severe", "degraded"]);
    let st = sim
        .events
        .iter()
        .rfind(|e| e.kind == "state")
        .expect("state event");
    assert_eq!(st.detail, "ok -> degraded");
}

#[test]
fn operator_stop_fires_no_death_and_escalates_to_sigkill() {
    let mut sim = Sim::new();
    add(&mut sim, started("web").with_restart_on_death());
    sim.request(Request::Stop { name: "web".into() })
        .expect("stop");
    let cmds = sim.take_commands();
    assert!(
        cmds.iter()
            .any(|c| matches!(c, Command::Signal { signal: 15, .. }))
    );
    sim.advance(5_000);
    assert!(
        sim.take_commands()
            .iter()
            .any(|c| matches!(c, Command::Signal { signal: 9, .. }))
    );
    sim.kill("web", SIGKILL);
    assert_eq!(sim.count("death"), 0);
    assert_eq!(sim.count("exited"), 1);
    assert_eq!(
        sim.engine.entity("web").expect("web").rt.phase.label(),
        "stopped"
    );
    assert!(sim.take_commands().is_empty(), "no restart");
}

#[test]
fn non_rearm_conditions_are_pruned_by_a_restart() {
    let mut sim = Sim::new();
    let mut spec = started("w").with_restart_on_death();
    let mut once = ConditionSpec::new(
        "once",
        ConditionKind::Death,
        vec![ActionSpec::new(
            "n",
            ActionKind::Notify {
                message: "x".into(),
            },
        )],
    );
    once.flags.rearm = false;
    spec.conditions.push(once);
    add(&mut sim, spec);
    sim.kill("w", SIGKILL);
    sim.complete_spawns();
    let names: Vec<String> = sim
        .engine
        .entity("w")
        .expect("w")
        .spec
        .conditions
        .iter()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(names, ["restart-on-death"]);
}

#[test]
fn api_misuse_gets_the_right_error_kind_and_changes_nothing() {
    let mut sim = Sim::new();
    add(&mut sim, started("web"));
    let before = (sim.records.clone(), sim.events.len());
    let e = sim
        .request(Request::Restart {
            name: "nope".into(),
        })
        .unwrap_err();
    assert!(matches!(e, EngineError::NotFound(_)), "{e}");
    let e = sim
        .request(Request::AddEntity {
            spec: started("web"),
            proc: None,
            origin: Origin::Api,
        })
        .unwrap_err();
    assert!(matches!(e, EngineError::AlreadyExists(_)), "{e}");
    let e = sim
        .request(Request::AddEntity {
            spec: started("bad name"),
            proc: None,
            origin: Origin::Api,
        })
        .unwrap_err();
    assert!(matches!(e, EngineError::InvalidArgument(_)), "{e}");
    let e = sim
        .request(Request::Heartbeat { name: "web".into() })
        .unwrap_err();
    assert!(matches!(e, EngineError::FailedPrecondition(_)), "{e}");
    let e = sim
        .request(Request::Start { name: "web".into() })
        .unwrap_err();
    assert!(matches!(e, EngineError::FailedPrecondition(_)), "{e}");
    assert_eq!((sim.records.clone(), sim.events.len()), before);
}

#[test]
fn a_global_placeholder_becomes_the_process_that_attaches_itself() {
    let mut sim = Sim::new();
    let mut g = EntitySpec::new("svc", EntityKind::Global);
    g.conditions.push(ConditionSpec::new(
        "d",
        ConditionKind::Death,
        vec![ActionSpec::new(
            "n",
            ActionKind::Notify {
                message: "svc died".into(),
            },
        )],
    ));
    add(&mut sim, g);
    let proc = ProcessRef {
        pid: 4242,
        start_time: 7,
    };
    let reply = sim
        .request(Request::AttachSelf {
            spec: EntitySpec::new("svc", EntityKind::SelfAttached { pid: 4242 }),
            proc,
        })
        .expect("attached");
    assert!(
        matches!(reply, Reply::Attached { slot: 1, .. }),
        "{reply:?}"
    );
    sim.kill("svc", ExitStatus::Unknown);
    assert_eq!(
        sim.count("abnormal-death"),
        0,
        "unknown status is not abnormal"
    );
    assert!(sim.events.iter().any(|e| e.detail == "svc died"));
}

#[test]
fn reload_adds_changes_and_removes_config_entities_only() {
    let mut sim = Sim::new();
    for n in ["a", "b"] {
        sim.request(Request::AddEntity {
            spec: started(n),
            proc: None,
            origin: Origin::Config,
        })
        .expect("add");
    }
    add(&mut sim, started("api-one"));
    sim.complete_spawns();
    let mut b2 = started("b");
    b2.stop.timeout_ms = 1;
    let reply = sim
        .request(Request::Reload {
            specs: vec![b2, started("c")],
            procs: HashMap::new(),
        })
        .expect("reload");
    assert_eq!(
        reply,
        Reply::Reloaded {
            added: vec!["c".into()],
            changed: vec!["b".into()],
            removed: vec!["a".into()],
        }
    );
    assert!(sim.engine.entity("api-one").is_some());
    // A reload that clashes with an API entity changes nothing.
    let before = sim.records.clone();
    let e = sim
        .request(Request::Reload {
            specs: vec![started("api-one")],
            procs: HashMap::new(),
        })
        .unwrap_err();
    assert!(matches!(e, EngineError::AlreadyExists(_)));
    assert_eq!(sim.records, before);
}

#[test]
fn a_restored_engine_equals_the_original_and_resumes_mid_recovery() {
    let mut sim = Sim::new();
    let mut spec = started("web");
    spec.heartbeat = Some(HeartbeatSpec {
        period_ms: 100,
        low: 1,
        high: 2,
    });
    let mut wait = ActionSpec::new(
        "wait",
        ActionKind::Notify {
            message: "delayed".into(),
        },
    );
    wait.delay_ms = 1_000;
    spec.conditions
        .push(ConditionSpec::new("r", ConditionKind::Raise, vec![wait]));
    add(&mut sim, spec);
    sim.request(Request::Raise {
        name: "web".into(),
        severity: 0,
        message: String::new(),
    })
    .expect("raise");
    sim.advance(250);
    let mut restored = sim.restored();
    let a: Vec<&EntityRecord> = sim.engine.records().collect();
    let b: Vec<&EntityRecord> = restored.records().collect();
    assert_eq!(a, b);
    assert_eq!(restored.next_event_seq(), sim.engine.next_event_seq());
    // The restored engine re-watches the process and fires the delayed action on time.
    let step = restored.resume(Now::at(sim.now), Resume::Takeover, "test");
    assert!(
        step.commands
            .iter()
            .any(|c| matches!(c, Command::Watch { .. }))
    );
    assert_eq!(
        step.events[0].seq,
        sim.engine.next_event_seq(),
        "no gap, no repeat"
    );
    assert_eq!(step.events[0].kind, "takeover");
    assert_eq!(restored.generation().0, 1);
    sim.engine = restored;
    sim.apply(step);
    sim.advance(1_000);
    assert_eq!(sim.count("notify"), 1);
}

#[test]
fn record_codec_round_trips_every_entity_record() {
    let mut sim = Sim::new();
    add(&mut sim, started("x").with_restart_on_death());
    for rec in sim.engine.records() {
        let bytes = record::encode_entity(rec);
        assert_eq!(&record::decode_entity(&bytes).expect("decodes"), rec);
        let mut wrong = bytes.clone();
        wrong[0] = 99;
        assert!(
            record::decode_entity(&wrong)
                .unwrap_err()
                .contains("format 99")
        );
    }
}

#[test]
fn a_spawn_interrupted_by_a_takeover_is_resumed_with_the_same_nonce() {
    let mut sim = Sim::new();
    sim.request(Request::AddEntity {
        spec: started("web"),
        proc: None,
        origin: Origin::Api,
    })
    .expect("added");
    let Some(Command::Spawn { nonce, .. }) = sim
        .take_commands()
        .into_iter()
        .find(|c| matches!(c, Command::Spawn { .. }))
    else {
        panic!("spawn");
    };
    // The HAM dies before the spawn's result is recorded.
    let mut restored = sim.restored();
    let step = restored.resume(Now::at(sim.now), Resume::Takeover, "test");
    let resumed: Vec<&Command> = step
        .commands
        .iter()
        .filter(|c| matches!(c, Command::Spawn { .. }))
        .collect();
    assert_eq!(
        resumed,
        [&Command::Spawn {
            entity: EntityId(1),
            name: "web".into(),
            token: EntityUid(1),
            nonce,
            command: CommandSpec::new(["/bin/sleep", "100"]),
            resumed: true,
        }]
    );
}
