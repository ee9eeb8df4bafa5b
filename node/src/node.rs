//! The node loop: the one task that owns the engine, the store and the heartbeat
//! table. It feeds the engine its inputs, writes each step to the store *before*
//! carrying out its commands, and publishes the step's events.

use crate::pair::{GuardianCommand, Pair, PairEvent};
use crate::process::{self, ProcessHandle};
use crate::time::now;
use crate::watch::Watcher;
use anyhow::Context;
use guardian::pair::HandedProcess;
use guardian::shm::pair_lock::{PairLock, Taken};
use guardian::shm::{BeatTable, Store, StoreParams, Txn};
use ham_core::engine::state::ExitStatus;
use ham_core::engine::{Command, EntityStatus, Persist, RemoteOp, SignalDest, Step};
use ham_core::error::EngineError;
use ham_core::spec::EntitySpec;
use ham_core::{BeatProbe, Engine, EntityId, Event, EventSeq, Input, Reply, Request};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};

/// Room the queue of immediate inputs keeps once drained.
const IMMEDIATE_KEPT: usize = 64;
/// While the node works, it looks this often at the heap it holds free (see
/// `heap::HeapTrim`); an idle node does not look.
const TRIM_AFTER_MS: u64 = 1_000;
/// Live events a subscriber may fall behind by before it gets a gap (and the rest
/// from the replay buffer, as it would after a reconnection).
const LIVE_EVENTS: usize = 4096;

/// A message to the node loop from the API.
pub enum Msg {
    /// A request for the engine.
    Request {
        /// The request.
        req: Box<Request>,
        /// Where the answer goes, once the change is in the store.
        reply: oneshot::Sender<Result<Reply, EngineError>>,
    },
    /// Requests for the engine, handled in order with one store commit; stops at the
    /// first that fails.
    Batch {
        /// The requests.
        reqs: Vec<Request>,
        /// How many were handled, and the error that stopped the batch, once the
        /// change is in the store.
        reply: oneshot::Sender<(usize, Option<EngineError>)>,
    },
    /// A status snapshot.
    Status {
        /// Where it goes.
        reply: oneshot::Sender<StatusSnapshot>,
    },
    /// One entity's status and definition.
    Describe {
        /// The entity.
        name: String,
        /// Where it goes.
        reply: oneshot::Sender<Option<(EntityStatus, EntitySpec)>>,
    },
    /// A new subscriber.
    Subscribe {
        /// Replay from this sequence number (0 = only new events).
        from_seq: u64,
        /// The time of event `from_seq - 1` as the subscriber saw it (0 = unknown).
        seen_time_ms: u64,
        /// Where the subscription goes.
        reply: oneshot::Sender<Subscription>,
    },
    /// A mesh member changed state.
    Member(ham_overlay::MeshEvent),
    /// The failover singletons the entities declare now.
    Singletons {
        /// Where they go.
        reply: oneshot::Sender<Vec<ham_core::singleton::Singleton>>,
    },
    /// The entities of other nodes that remote entities here watch.
    RemoteTargets {
        /// Where they go.
        reply: oneshot::Sender<std::collections::BTreeSet<crate::remote_watch::Target>>,
    },
    /// An event of a watched entity on another node.
    Remote(Input),
    /// Publish an event about an entity (the singleton reconciler's decisions).
    Note {
        /// The entity.
        entity: String,
        /// The event's kind.
        kind: ham_core::EventKind,
        /// What happened.
        detail: String,
    },
    /// Stop the node.
    Shutdown {
        /// Stop every entity's process first.
        kill_entities: bool,
        /// Answered when the node is about to exit.
        reply: oneshot::Sender<()>,
    },
}

/// What `status` shows.
pub struct StatusSnapshot {
    /// Every entity.
    pub entities: Vec<EntityStatus>,
    /// The next event's sequence number.
    pub next_event_seq: EventSeq,
    /// How many entities fit.
    pub capacity: u32,
    /// Timer lateness over the recent wake-ups.
    pub lateness: LatenessSummary,
    /// The Guardian's PID, if one runs.
    pub guardian_pid: Option<i32>,
    /// Takeovers so far.
    pub generation: u64,
    /// Wall-clock time of the last takeover (0 if none).
    pub last_takeover_ms: u64,
    /// When this process's takeover finished (monotonic ns) and how long it took (µs).
    pub takeover: Option<(u64, u64)>,
}

/// Percentiles of how late timers ran after their deadline, in microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct LatenessSummary {
    /// Wake-ups measured (all time).
    pub samples: u64,
    /// Median of the recent ones.
    pub p50_us: u64,
    /// 99th percentile of the recent ones.
    pub p99_us: u64,
    /// Largest of the recent ones.
    pub max_us: u64,
}

/// The last wake-ups' lateness, for `status`.
#[derive(Default)]
struct LatenessLog {
    recent: VecDeque<u64>,
    total: u64,
}

impl LatenessLog {
    const KEEP: usize = 4096;

    fn record(&mut self, us: u64) {
        if self.recent.len() == Self::KEEP {
            self.recent.pop_front();
        }
        self.recent.push_back(us);
        self.total += 1;
    }

    fn summary(&self) -> LatenessSummary {
        let mut v: Vec<u64> = self.recent.iter().copied().collect();
        v.sort_unstable();
        let at = |q: f64| {
            v.get(((v.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        LatenessSummary {
            samples: self.total,
            p50_us: at(0.5),
            p99_us: at(0.99),
            max_us: v.last().copied().unwrap_or(0),
        }
    }
}

/// A subscriber's start: the replayed events, a gap if some are gone, then live ones.
pub struct Subscription {
    /// Events from the replay buffer, oldest first.
    pub backlog: Vec<Arc<Event>>,
    /// `(from, to)`: requested events no longer available.
    pub gap: Option<(u64, u64)>,
    /// The subscriber asked for a number this store never reached: it knew this node
    /// before its store was made afresh (a new container, `--discard-state`). The
    /// numbers started over; it gets everything of this store, after a `gap`.
    pub renumbered: Option<u64>,
    /// Events published from now on.
    pub live: broadcast::Receiver<Arc<Event>>,
}

/// Where a node keeps things.
#[derive(Clone, Debug)]
pub struct NodePaths {
    /// The shared-memory state store.
    pub state: PathBuf,
    /// The shared-memory heartbeat table.
    pub beats: PathBuf,
    /// The control socket.
    pub socket: PathBuf,
}

/// The heartbeat table, seen by the engine.
struct Probe<'a>(&'a BeatTable);

impl BeatProbe for Probe<'_> {
    fn observe(&mut self, entity: EntityId) -> bool {
        self.0.observe(entity.0)
    }
}

/// The node loop's state.
pub struct Node {
    name: String,
    engine: Engine,
    store: Store,
    beats: BeatTable,
    paths: NodePaths,
    watcher: Watcher,
    inputs_tx: mpsc::UnboundedSender<Input>,
    inputs_rx: mpsc::UnboundedReceiver<Input>,
    /// Results known at once (a spawn's outcome), handled before anything else.
    immediate: VecDeque<Input>,
    /// When to look at the free heap next (monotonic ms).
    trim_at: Option<u64>,
    /// Work was done since the last look.
    worked: bool,
    /// Gives the free heap back after bursts.
    heap: crate::heap::HeapTrim,
    /// Live events to subscribers: made for the first subscriber, dropped once the last
    /// has gone, so that a node nobody follows keeps no ring of [`LIVE_EVENTS`] slots
    /// (128 KiB, most of an idle HAM's heap).
    events_tx: Option<broadcast::Sender<Arc<Event>>>,
    recent: VecDeque<Arc<Event>>,
    /// Events found in the store at start, older than `recent`, still encoded.
    undecoded: Vec<(u64, Vec<u8>)>,
    recent_cap: usize,
    lateness: LatenessLog,
    pair: Option<Pair>,
    pair_tx: mpsc::UnboundedSender<PairEvent>,
    pair_rx: mpsc::UnboundedReceiver<PairEvent>,
    /// Pidfds the previous HAM handed over, by entity slot (a takeover only).
    handed: HashMap<u32, HandedProcess>,
    /// Processes this HAM has just started, with their pidfds, until the engine
    /// watches them: nothing is read from `/proc` on a restart's path.
    spawned: HashMap<EntityId, ProcessHandle>,
    /// Set while the HAM handles the only death it saw this time round: a restart
    /// it starts then yields the CPU to the new process (see `apply`).
    lone_death: bool,
    /// When this process's takeover finished (monotonic ns) and how long it took (µs).
    takeover: Option<(u64, u64)>,
    /// The mesh, if this node runs one.
    mesh: Option<ham_overlay::Mesh>,
    /// What the singleton reconciler needs to hear (with a mesh only).
    singleton_hints: Option<Arc<crate::singleton::Hints>>,
}

/// What `open` found in the store.
pub struct Opened {
    /// The node, ready to run.
    pub node: Node,
    /// Entities adopted from an existing store (0 when it was created).
    pub adopted: usize,
    /// Whether the store was created fresh.
    pub created: bool,
}

/// Takes the pair lock of the store at `path` (whose `flock` the caller holds) for
/// the calling thread; an error if a live process holds it.
fn take_pair_lock(path: &std::path::Path) -> anyhow::Result<PairLock> {
    let lock = PairLock::open(path)?;
    match lock
        .try_lock()
        .with_context(|| format!("store {}: its pair lock", path.display()))?
    {
        Some(Taken::Free) => {}
        Some(Taken::OwnerDied) => tracing::debug!("the store's last HAM died holding it"),
        None => match lock.holder() {
            Some(tid) if Path::new(&format!("/proc/{tid}")).exists() => anyhow::bail!(
                "store {} is in use: a live HAM (thread {tid}) holds its pair lock",
                path.display()
            ),
            holder => {
                tracing::warn!(
                    "store {}: its pair lock was held by thread {holder:?}, which is gone: made anew",
                    path.display()
                );
                lock.remake()?;
                if lock.try_lock()?.is_none() {
                    anyhow::bail!("store {}: its pair lock cannot be taken", path.display());
                }
            }
        },
    }
    Ok(lock)
}

impl Node {
    /// Opens (or creates) the store and the heartbeat table, takes the store's pair
    /// lock for the calling thread (which must be the one that runs the node: a HAM's
    /// main thread) and rebuilds the engine. A takeover brings the store already
    /// locked and read, and the pair lock held (`opened`).
    pub fn open(
        name: String,
        paths: NodePaths,
        capacity: u32,
        opened: Option<(Store, guardian::shm::Recovered, PairLock)>,
        warm: Option<crate::warm::Warm>,
        (handed, watch_set): (HashMap<u32, HandedProcess>, Option<crate::watch::WatchSet>),
    ) -> anyhow::Result<Opened> {
        let params = StoreParams {
            entity_slots: capacity,
            ..StoreParams::default()
        };
        let t0 = std::time::Instant::now();
        let (store, recovered, created, pair_lock) = match opened {
            Some((s, r, lock)) => (s, r, false, lock),
            None => {
                let (s, r, created) = Store::open_or_create(&paths.state, params)?;
                (s, r, created, take_pair_lock(&paths.state)?)
            }
        };
        // This (the main) thread holds it for the process's life.
        pair_lock.hold_for_life();
        let capacity = store.params().entity_slots;
        let beats = BeatTable::open_or_create(&paths.beats, capacity + 1)?;
        let t_store = t0.elapsed();
        let engine = match warm {
            Some(w) => w.into_engine(&recovered),
            None => Engine::restore(capacity, recovered.node.as_deref(), &recovered.entities),
        }
        .map_err(|e| anyhow::anyhow!("store {}: {e}", paths.state.display()))?;
        tracing::debug!(
            store_us = t_store.as_micros() as u64,
            restore_us = (t0.elapsed() - t_store).as_micros() as u64,
            entities = engine.len(),
            "state loaded"
        );
        let recent_cap = store.params().event_slots as usize;
        let recent = VecDeque::with_capacity(recent_cap);
        // The stored events are decoded when a subscriber first needs them, not here:
        // a takeover must not wait for thousands of them.
        let undecoded = recovered.events;
        let (inputs_tx, inputs_rx) = mpsc::unbounded_channel();
        let (pair_tx, pair_rx) = mpsc::unbounded_channel();
        let adopted = engine.len();
        Ok(Opened {
            node: Node {
                name,
                engine,
                store,
                beats,
                paths,
                watcher: Watcher::new(watch_set, handed.len())?,
                inputs_tx,
                inputs_rx,
                immediate: VecDeque::new(),
                trim_at: None,
                worked: true,
                heap: Default::default(),
                events_tx: None,
                recent,
                undecoded,
                recent_cap,
                lateness: LatenessLog::default(),
                pair: None,
                pair_tx,
                pair_rx,
                handed,
                spawned: HashMap::new(),
                lone_death: false,
                takeover: None,
                mesh: None,
                singleton_hints: None,
            },
            adopted,
            created,
        })
    }

    /// Gives the node its mesh (for remote actions and failover).
    pub fn set_mesh(&mut self, mesh: ham_overlay::Mesh, hints: Arc<crate::singleton::Hints>) {
        self.mesh = Some(mesh);
        self.singleton_hints = Some(hints);
    }

    /// Records that this process's takeover finished; `noticed` is when the HAM's death
    /// was seen.
    pub fn takeover_done(&mut self, noticed: std::time::Instant) {
        self.takeover = Some((crate::time::mono_ns(), noticed.elapsed().as_micros() as u64));
    }

    /// Resumes what the store held: re-watches processes, re-arms timers.
    pub fn resume(&mut self, how: ham_core::Resume, note: &str) {
        let t0 = std::time::Instant::now();
        let step = self.engine.resume(now(), how, note);
        let t_engine = t0.elapsed();
        self.apply(step);
        self.drain_immediate();
        // Pidfds handed over for processes the engine no longer watches leave the set.
        for (_, h) in self.handed.drain() {
            let leftover = ProcessHandle::from_handed(
                ham_core::ProcessRef {
                    pid: h.pid,
                    start_time: h.start_time,
                },
                h.pidfd,
            );
            self.watcher.forget_prepared(&leftover);
        }
        tracing::debug!(
            engine_us = t_engine.as_micros() as u64,
            apply_us = (t0.elapsed() - t_engine).as_micros() as u64,
            "resumed"
        );
    }

    /// Starts the pair: binds the pair socket; the node loop spawns the Guardian as
    /// soon as it runs (after the server is up, so a takeover answers first), or,
    /// without `launch_now`, once [`Node::guardian_launcher`]'s launcher is called.
    pub fn start_pair(
        &mut self,
        control_socket: &Path,
        control: std::os::fd::OwnedFd,
        command: GuardianCommand,
        launch_now: bool,
    ) -> anyhow::Result<()> {
        let watch_set = self.watcher.set().try_clone_to_owned()?;
        let pair = Pair::new(
            control_socket,
            control,
            watch_set,
            command,
            self.pair_tx.clone(),
        )?;
        self.pair = Some(pair);
        if launch_now {
            let _ = self.pair_tx.send(PairEvent::Exited(0));
        }
        Ok(())
    }

    /// Has the first Guardian launched when called, from any thread (for a pair
    /// started with `launch_now` false).
    pub fn guardian_launcher(&self) -> impl FnOnce() + Send + 'static {
        let tx = self.pair_tx.clone();
        move || {
            let _ = tx.send(PairEvent::Exited(0));
        }
    }

    fn on_pair_event(&mut self, ev: PairEvent) {
        match ev {
            PairEvent::Exited(pid) => self.on_guardian_exit(pid),
            PairEvent::Launched(started, replaces) => self.on_guardian_launched(started, replaces),
            PairEvent::Connected(pid, result) => {
                let Some(pair) = self.pair.as_mut() else {
                    return;
                };
                if pair.connected(pid, result) {
                    tracing::debug!(guardian = pid, "Guardian connected");
                    // The new Guardian gets every pidfd watched so far.
                    let procs: Vec<_> =
                        self.watcher.iter().map(|(e, h)| (e.0, h.clone())).collect();
                    pair.hand_over_all(procs);
                }
            }
            PairEvent::HandedOver(pid, result) => {
                if let Some(pair) = self.pair.as_mut() {
                    pair.handed_over(pid, result, now().mono_ms);
                }
            }
        }
    }

    /// A Guardian died (or a respawn is due, `pid` 0): start a new one at once.
    fn on_guardian_exit(&mut self, pid: i32) {
        let Some(pair) = self.pair.as_mut() else {
            return;
        };
        if pid != 0 && !pair.forget(pid) {
            return;
        }
        if pair.has_guardian() {
            return;
        }
        pair.launch(self.engine.generation().0, pid);
    }

    /// A Guardian process was started (or not), replacing `replaces` (0 for none).
    fn on_guardian_launched(
        &mut self,
        started: std::io::Result<Arc<ProcessHandle>>,
        replaces: i32,
    ) {
        let Some(pair) = self.pair.as_mut() else {
            return;
        };
        match started {
            Ok(handle) => {
                let new = handle.proc.pid;
                pair.launched(handle);
                if replaces == 0 {
                    tracing::info!(guardian = new, "Guardian started");
                } else {
                    let detail = format!("Guardian pid {replaces} died; new Guardian pid {new}");
                    tracing::warn!("{detail}");
                    let step = self
                        .engine
                        .note(now(), "", ham_core::EventKind::Pair, detail);
                    self.apply(step);
                }
            }
            Err(e) => {
                pair.launch_failed();
                // Keep trying: the HAM must not stay without a Guardian.
                tracing::error!("cannot start a Guardian: {e}; retrying in 1 s");
                let tx = self.pair_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let _ = tx.send(PairEvent::Exited(0));
                });
            }
        }
    }

    /// Hands a request to the engine outside the loop (the initial config load).
    pub fn request(&mut self, req: Request) -> Result<Reply, EngineError> {
        let (step, reply) = self.engine.handle_request(now(), req);
        self.apply(step);
        self.drain_immediate();
        reply
    }

    /// Runs until a shutdown message arrives or the channel closes.
    pub async fn run(mut self, mut msgs: mpsc::Receiver<Msg>) {
        let mut timer = match crate::time::DeadlineTimer::new() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("cannot create the timer: {e}; exiting");
                std::process::exit(70);
            }
        };
        loop {
            if self.trim_at.is_none() && self.worked {
                self.trim_at = Some(now().mono_ms + TRIM_AFTER_MS);
            }
            self.worked = true;
            let deadline = self.engine.next_deadline();
            let hand_over_at = self.pair.as_ref().and_then(Pair::due_ms);
            timer.set(
                [deadline, self.trim_at, hand_over_at]
                    .into_iter()
                    .flatten()
                    .min(),
            );
            tokio::select! {
                biased;
                Some(input) = self.inputs_rx.recv() => self.handle_input(input),
                Some(ev) = self.pair_rx.recv() => self.on_pair_event(ev),
                exits = self.watcher.exits() => {
                    self.lone_death = exits.len() == 1;
                    for (entity, proc, status) in exits {
                        if let Some(pair) = &mut self.pair {
                            pair.hand_back(entity.0, now().mono_ms);
                        }
                        self.handle_input(Input::Exited { entity, proc, status });
                    }
                    self.lone_death = false;
                }
                _ = timer.expired() => {
                    let at = now();
                    self.worked = false;
                    if let Some(pair) = self.pair.as_mut().filter(|p| p.due_ms().is_some_and(|d| d <= at.mono_ms)) {
                        pair.flush();
                    }
                    if self.trim_at.is_some_and(|t| t <= at.mono_ms) {
                        self.trim_at = None;
                        self.heap.look();
                    }
                    if let Some(d) = deadline.filter(|d| *d <= at.mono_ms) {
                        self.worked = true;
                        let late_ns = crate::time::mono_ns().saturating_sub(d * 1_000_000);
                        self.lateness.record(late_ns / 1_000);
                        let step = self.engine.tick(at, &mut Probe(&self.beats));
                        self.apply(step);
                        self.drain_immediate();
                    }
                }
                msg = msgs.recv() => match msg {
                    Some(Msg::Shutdown { kill_entities, reply }) => {
                        self.shutdown(kill_entities).await;
                        let _ = reply.send(());
                        return;
                    }
                    Some(msg) => self.handle_msg(msg),
                    None => return,
                },
            }
        }
    }

    fn handle_input(&mut self, input: Input) {
        let step = self.engine.handle_input(now(), input);
        self.apply(step);
        self.drain_immediate();
    }

    fn drain_immediate(&mut self) {
        while let Some(input) = self.immediate.pop_front() {
            let step = self.engine.handle_input(now(), input);
            self.apply(step);
        }
        // Starting 10,000 entities queues 10,000 spawn results at once; the queue
        // need not keep that room for the node's life.
        if self.immediate.capacity() > IMMEDIATE_KEPT {
            self.immediate.shrink_to(IMMEDIATE_KEPT);
        }
    }

    fn handle_msg(&mut self, msg: Msg) {
        match msg {
            Msg::Request { req, reply } => {
                let r = self.request(*req);
                let _ = reply.send(r);
            }
            Msg::Batch { reqs, reply } => {
                let (step, handled, err) = self.engine.handle_batch(now(), reqs);
                self.apply(step);
                self.drain_immediate();
                let _ = reply.send((handled, err));
            }
            Msg::Status { reply } => {
                let _ = reply.send(StatusSnapshot {
                    entities: self.engine.status(now()),
                    next_event_seq: self.engine.next_event_seq(),
                    capacity: self.engine.capacity(),
                    lateness: self.lateness.summary(),
                    guardian_pid: self.pair.as_ref().and_then(Pair::guardian_pid),
                    generation: self.engine.generation().0,
                    last_takeover_ms: self.engine.generation().1,
                    takeover: self.takeover,
                });
            }
            Msg::Describe { name, reply } => {
                let found = self
                    .engine
                    .status_of_entity(&name, now())
                    .zip(self.engine.entity(&name).map(|r| r.spec.clone()));
                let _ = reply.send(found);
            }
            Msg::Subscribe {
                from_seq,
                seen_time_ms,
                reply,
            } => {
                let _ = reply.send(self.subscribe(from_seq, seen_time_ms));
            }
            Msg::Singletons { reply } => {
                let _ = reply.send(ham_core::singleton::singletons(
                    self.engine.records().map(|r| &r.spec),
                ));
            }
            Msg::RemoteTargets { reply } => {
                let _ = reply.send(crate::remote_watch::targets(
                    self.engine.records().map(|r| &r.spec),
                ));
            }
            Msg::Remote(input) => {
                let step = self.engine.handle_input(now(), input);
                self.apply(step);
                self.drain_immediate();
            }
            Msg::Note {
                entity,
                kind,
                detail,
            } => {
                let step = self.engine.note(now(), &entity, kind, detail);
                self.apply(step);
                self.drain_immediate();
            }
            Msg::Member(e) => {
                if let Some(h) = &self.singleton_hints {
                    h.membership_changed();
                }
                use ham_overlay::MemberState;
                let step = match e.state {
                    MemberState::Suspect => self.engine.note(
                        now(),
                        "",
                        ham_core::EventKind::NodeSuspect,
                        format!("node {} ({})", e.node, e.addr),
                    ),
                    state => self.engine.handle_input(
                        now(),
                        Input::Node {
                            node: e.node.to_string(),
                            up: state == MemberState::Up,
                            addr: e.addr,
                        },
                    ),
                };
                self.apply(step);
                self.drain_immediate();
            }
            Msg::Shutdown { .. } => unreachable!("handled in run"),
        }
    }

    /// Decodes the events found in the store, once, in front of the newer ones.
    fn decode_backlog(&mut self) {
        if self.undecoded.is_empty() {
            return;
        }
        let mut all: VecDeque<Arc<Event>> = VecDeque::with_capacity(self.recent_cap);
        for (seq, bytes) in std::mem::take(&mut self.undecoded) {
            match ham_core::record::decode_event(&bytes) {
                Ok(e) => all.push_back(Arc::new(e)),
                Err(e) => tracing::warn!("stored event {seq} is unreadable: {e}"),
            }
        }
        all.extend(self.recent.drain(..));
        while all.len() > self.recent_cap {
            all.pop_front();
        }
        self.recent = all;
    }

    fn subscribe(&mut self, from_seq: u64, seen_time_ms: u64) -> Subscription {
        self.decode_backlog();
        let live = self
            .events_tx
            .get_or_insert_with(|| broadcast::channel(LIVE_EVENTS).0)
            .subscribe();
        if from_seq == 0 {
            return Subscription {
                backlog: Vec::new(),
                gap: None,
                renumbered: None,
                live,
            };
        }
        let next = self.engine.next_event_seq().0;
        // Numbers started over since the subscriber's last event if they are now
        // behind it, or if the event it saw last is not the one held under its number.
        let seen_elsewhere = seen_time_ms != 0
            && self
                .recent
                .iter()
                .find(|e| e.seq.0 + 1 == from_seq)
                .is_some_and(|e| e.time_ms != seen_time_ms);
        let renumbered = (from_seq > next || seen_elsewhere).then_some(from_seq);
        let from_seq = if renumbered.is_some() { 1 } else { from_seq };
        let oldest = self.recent.front().map_or(next, |e| e.seq.0);
        let gap = (from_seq < oldest).then(|| (from_seq, oldest - 1));
        let backlog = self
            .recent
            .iter()
            .filter(|e| e.seq.0 >= from_seq)
            .cloned()
            .collect();
        Subscription {
            backlog,
            gap,
            renumbered,
            live,
        }
    }

    // ----- carrying out a step -------------------------------------------------

    /// Write-ahead: the step's records reach the store before any command runs.
    fn apply(&mut self, step: Step) {
        if !step.persist.is_empty()
            && let Err(e) = self.store.commit(&txn_of(step.persist))
        {
            // The engine moved on but the store did not: continuing would break the
            // write-ahead rule. Exit so that the state is rebuilt from the store.
            tracing::error!("cannot write the state store: {e}; exiting");
            std::process::exit(70);
        }
        for e in step.events {
            self.publish(e);
        }
        // The restart of a lone death is one spawn: the new process then gets the
        // CPU before the HAM's bookkeeping (see `process::give_way`). Many deaths at
        // once, or a step that starts many processes, do not wait on each one.
        let give_way = self.lone_death
            && step
                .commands
                .iter()
                .filter(|c| matches!(c, Command::Spawn { .. }))
                .count()
                == 1;
        for c in step.commands {
            let spawn = matches!(c, Command::Spawn { .. });
            self.execute(c);
            if spawn && give_way {
                process::give_way();
            }
        }
    }

    fn publish(&mut self, e: Event) {
        if self.recent.len() >= self.recent_cap {
            self.decode_backlog();
        }
        let who = if e.entity.is_empty() {
            "node"
        } else {
            &e.entity
        };
        // Detectors' raises can come by the hundred thousand a second (`RaiseStream`):
        // they are data, logged at debug; what they set off is logged at info.
        if e.kind == ham_core::spec::ConditionKind::Raise.as_str() {
            tracing::debug!(target: "ham::event", seq = e.seq.0, "{who} {}: {}", e.kind, e.detail);
        } else {
            tracing::info!(target: "ham::event", seq = e.seq.0, "{who} {}: {}", e.kind, e.detail);
        }
        let e = Arc::new(e);
        if self.recent.len() >= self.recent_cap {
            self.recent.pop_front();
        }
        self.recent.push_back(e.clone());
        if let Some(tx) = &self.events_tx
            && tx.send(e).is_err()
        {
            tracing::debug!("no subscriber left: the live-event channel is dropped");
            self.events_tx = None;
        }
    }

    fn execute(&mut self, c: Command) {
        match c {
            Command::Spawn {
                entity,
                name,
                token,
                nonce,
                command,
                resumed,
            } => {
                if resumed
                    && let Some(proc) = process::find_by_env(&[
                        ("HAM_NODE", self.name.as_str()),
                        ("HAM_SPAWN_NONCE", nonce.to_string().as_str()),
                    ])
                {
                    tracing::info!(entity = %name, pid = proc.pid, "adopted the process of an interrupted start");
                    self.immediate.push_back(Input::Spawned {
                        entity,
                        nonce,
                        result: Ok(proc),
                    });
                    return;
                }
                let env = vec![
                    ("HAM_ENTITY".to_string(), name.clone()),
                    ("HAM_NODE".into(), self.name.clone()),
                    ("HAM_SOCKET".into(), self.paths.socket.display().to_string()),
                    (
                        "HAM_BEAT_FILE".into(),
                        self.paths.beats.display().to_string(),
                    ),
                    ("HAM_BEAT_SLOT".into(), entity.0.to_string()),
                    ("HAM_BEAT_TOKEN".into(), token.0.to_string()),
                    ("HAM_SPAWN_NONCE".into(), nonce.to_string()),
                ];
                let result = match process::spawn(&command, &env) {
                    Ok(handle) => {
                        let proc = handle.proc;
                        self.spawned.insert(entity, handle);
                        Ok(proc)
                    }
                    Err(e) => {
                        tracing::warn!(entity = %name, "cannot start {command}: {e}");
                        Err(e.to_string())
                    }
                };
                self.immediate.push_back(Input::Spawned {
                    entity,
                    nonce,
                    result,
                });
            }
            Command::Watch { entity, proc } => {
                if self.watcher.get(entity).is_some_and(|h| h.proc == proc) {
                    return;
                }
                self.unwatch(entity);
                // A takeover adopts the pidfd the previous HAM handed over (it is in the
                // watch set already); otherwise the process is opened and checked.
                if let Some(h) = self.handed.remove(&entity.0) {
                    let handle = ProcessHandle::from_handed(
                        ham_core::ProcessRef {
                            pid: h.pid,
                            start_time: h.start_time,
                        },
                        h.pidfd,
                    );
                    if handle.proc == proc {
                        self.watcher.adopt(entity, Arc::new(handle));
                        return;
                    }
                    self.watcher.forget_prepared(&handle);
                }
                let just_spawned = self.spawned.remove(&entity).filter(|h| h.proc == proc);
                match just_spawned.map_or_else(|| ProcessHandle::open(proc), Ok) {
                    Ok(h) => {
                        let h = Arc::new(h);
                        if let Err(e) = self.watcher.add(entity, h.clone()) {
                            tracing::error!("cannot watch pid {}: {e}", proc.pid);
                        }
                        if let Some(pair) = &mut self.pair {
                            pair.hand_over(entity.0, h, now().mono_ms);
                        }
                    }
                    Err(_) => self.immediate.push_back(Input::Exited {
                        entity,
                        proc,
                        status: ExitStatus::Unknown,
                    }),
                }
            }
            Command::Unwatch { entity } => {
                self.spawned.remove(&entity);
                self.unwatch(entity);
            }
            Command::Signal {
                target,
                signal,
                report,
            } => {
                let result = match target {
                    SignalDest::Process(entity, proc) => match self.watcher.get(entity) {
                        Some(h) if h.proc == proc => h.signal(signal),
                        _ => ProcessHandle::open(proc).and_then(|h| h.signal(signal)),
                    }
                    .map(|_| format!("signal {signal} sent to pid {}", proc.pid)),
                    SignalDest::Pid(pid) => process::signal_pid(pid, signal)
                        .map(|_| format!("signal {signal} sent to pid {pid}")),
                };
                if let Err(e) = &result {
                    tracing::debug!("signal {signal}: {e}");
                }
                if let Some((entity, run, step)) = report {
                    self.immediate.push_back(Input::ActionDone {
                        entity,
                        run,
                        step,
                        outcome: result.map_err(|e| e.to_string()),
                    });
                }
            }
            Command::Execute {
                entity,
                run,
                step,
                command,
                context,
            } => {
                let tx = self.inputs_tx.clone();
                let mut cmd = tokio::process::Command::from(process::command(&command, &context));
                tokio::spawn(async move {
                    let outcome = match cmd.status().await {
                        Ok(st) if st.success() => Ok("exit code 0".to_string()),
                        Ok(st) => Err(match st.code() {
                            Some(c) => format!("{command}: exit code {c}"),
                            None => format!("{command}: killed by a signal"),
                        }),
                        Err(e) => Err(format!("{command}: cannot run: {e}")),
                    };
                    let _ = tx.send(Input::ActionDone {
                        entity,
                        run,
                        step,
                        outcome,
                    });
                });
            }
            Command::Waitfor {
                entity,
                run,
                step,
                path,
                deadline_ms,
            } => {
                let tx = self.inputs_tx.clone();
                tokio::spawn(async move {
                    let outcome = wait_for_path(Path::new(&path), deadline_ms).await;
                    let _ = tx.send(Input::ActionDone {
                        entity,
                        run,
                        step,
                        outcome,
                    });
                });
            }
            Command::Remote {
                entity,
                run,
                step,
                op,
            } => self.remote(entity, run, step, op),
            Command::Log {
                level,
                entity,
                message,
            } => match level {
                0 => tracing::error!(target: "ham::action", entity = %entity, "{message}"),
                1 => tracing::warn!(target: "ham::action", entity = %entity, "{message}"),
                2 => tracing::info!(target: "ham::action", entity = %entity, "{message}"),
                _ => tracing::debug!(target: "ham::action", entity = %entity, "{message}"),
            },
            Command::ClaimBeatSlot { entity, token } => self.beats.claim(entity.0, token.0),
            Command::ReleaseBeatSlot { entity } => self.beats.release(entity.0),
            Command::Beat { entity } => self.beats.beat(entity.0),
        }
    }

    /// Carries out an action on the mesh and reports its outcome.
    fn remote(&mut self, entity: EntityId, run: ham_core::RunId, step: u64, op: RemoteOp) {
        let report = move |outcome| Input::ActionDone {
            entity,
            run,
            step,
            outcome,
        };
        // A failover that lands here is a local start, done at once.
        if let (RemoteOp::Failover { entity: what, .. }, Some(h)) = (&op, &self.singleton_hints) {
            h.placed(what);
        }
        let op = match op {
            RemoteOp::Failover {
                entity: what,
                candidates,
            } => match crate::remote::place(&self.name, self.mesh.as_ref(), &candidates) {
                Err(e) => {
                    self.immediate.push_back(report(Err(e)));
                    return;
                }
                Ok(chosen) if chosen == self.name => {
                    let outcome = match self.request(Request::Start { name: what.clone() }) {
                        Ok(_) => Ok(format!("started {what} here")),
                        Err(e) if e.to_string().contains("already") => {
                            Ok(format!("{what} runs here already"))
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    self.immediate.push_back(report(outcome));
                    return;
                }
                Ok(chosen) => crate::remote::Call::Start {
                    node: chosen,
                    entity: what,
                },
            },
            RemoteOp::Restart { node, entity } => crate::remote::Call::Restart { node, entity },
            RemoteOp::Execute { node, command } => crate::remote::Call::Execute { node, command },
        };
        let tx = self.inputs_tx.clone();
        let mesh = self.mesh.clone();
        tokio::spawn(async move {
            let outcome = crate::remote::call(mesh.as_ref(), op).await;
            let _ = tx.send(report(outcome));
        });
    }

    fn unwatch(&mut self, entity: EntityId) {
        if self.watcher.remove(entity).is_some()
            && let Some(pair) = &mut self.pair
        {
            pair.hand_back(entity.0, now().mono_ms);
        }
    }

    /// Stops the node. With `kill_entities`, every process is stopped first and the
    /// store is removed (nothing is left to adopt); otherwise entities keep running and
    /// the store stays, so the next `hamd` adopts them.
    async fn shutdown(&mut self, kill_entities: bool) {
        // The Guardian goes first: with it gone, the HAM's exit is not a takeover.
        if let Some(pair) = self.pair.as_mut() {
            pair.stop_guardian().await;
        }
        if !kill_entities {
            tracing::info!("stopping; entities keep running and will be adopted by the next hamd");
            return;
        }
        let procs: Vec<(Arc<ProcessHandle>, i32, u64)> = self
            .engine
            .records()
            .filter_map(|r| {
                let proc = r.rt.phase.process()?;
                let h = self.watcher.get(r.id)?;
                (h.proc == proc).then(|| (h.clone(), r.spec.stop.signal, r.spec.stop.timeout_ms))
            })
            .collect();
        tracing::info!("stopping {} entities, then hamd", procs.len());
        let mut waits = Vec::new();
        for (h, sig, timeout) in procs {
            let _ = h.signal(sig);
            waits.push(tokio::spawn(async move {
                if tokio::time::timeout(Duration::from_millis(timeout), h.clone().wait())
                    .await
                    .is_err()
                {
                    let _ = h.signal(9);
                    h.wait().await;
                }
            }));
        }
        for w in waits {
            let _ = w.await;
        }
        for p in [&self.paths.state, &self.paths.beats] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Converts the engine's records into one store transaction.
fn txn_of(p: Persist) -> Txn {
    let mut txn = Txn::new();
    if let Some(n) = p.node {
        txn.put_node(n);
    }
    for (slot, bytes) in p.entities {
        match bytes {
            Some(b) => txn.put_entity(slot, b),
            None => txn.delete_entity(slot),
        }
    }
    for (seq, bytes) in p.events {
        txn.push_event(seq, bytes);
    }
    txn
}

/// Polls for a path until the deadline (monotonic ms).
async fn wait_for_path(path: &Path, deadline_ms: u64) -> Result<String, String> {
    let started = crate::time::mono_ns() / 1_000_000;
    loop {
        if path.exists() {
            return Ok(format!("{} appeared", path.display()));
        }
        let now_ms = crate::time::mono_ns() / 1_000_000;
        if now_ms >= deadline_ms {
            return Err(format!(
                "{} did not appear within {} ms",
                path.display(),
                deadline_ms.saturating_sub(started)
            ));
        }
        tokio::time::sleep(Duration::from_millis(10.min(deadline_ms - now_ms))).await;
    }
}
