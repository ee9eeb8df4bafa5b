//! The HAM's side of the HAM/Guardian pair: it spawns its Guardian (the same binary
//! in the other role), hands it the control socket's listener and every watched pidfd,
//! watches it through a pidfd, spawns a new one at once when it dies, and stops it
//! first on shutdown. Waiting for a new Guardian to connect happens off the node loop,
//! so a HAM that has just taken over answers requests meanwhile.

use crate::process::ProcessHandle;
use guardian::pair::{GUARDIAN_ENV, HamEnd, Hello, PairListener};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// How long a new Guardian may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long pidfd hand-overs and hand-backs wait before they go to the Guardian, all
/// together. Sent at once, each woke the Guardian in the middle of a restart: on the
/// HAM's CPU it preempted the HAM for ~60 µs between the death and the spawn, and its
/// work then competed with the new process's start (see BENCHMARKS.md). A takeover
/// within this time loses nothing: the new HAM opens a process it was not handed by
/// its PID and start time, and drops a handed pidfd whose process the store no longer
/// names.
pub const HAND_OVER_AFTER_MS: u64 = 5;

/// A change to the Guardian's copy of the watched pidfds, not sent yet.
enum Handed {
    /// An entity's process is watched (replacing any earlier one).
    Watched(u32, Arc<ProcessHandle>),
    /// An entity's process is no longer watched.
    Unwatched(u32),
}

/// How to start a Guardian: this executable with the node's resolved settings.
#[derive(Clone, Debug)]
pub struct GuardianCommand {
    /// The `hamd` executable.
    pub exe: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
}

/// What the pair reports to the node loop.
pub enum PairEvent {
    /// A Guardian process exited (`pid`), or a respawn is due (`0`).
    Exited(i32),
    /// A Guardian process was started (or could not be), replacing the one whose
    /// PID is given (0 for none).
    Launched(std::io::Result<Arc<ProcessHandle>>, i32),
    /// A launched Guardian connected (or failed to).
    Connected(i32, std::io::Result<HamEnd>),
    /// Every watched pidfd was handed to the Guardian `pid` (or could not be), off the
    /// loop (see [`Pair::hand_over_all`]).
    HandedOver(i32, std::io::Result<()>),
}

struct Guardian {
    handle: Arc<ProcessHandle>,
    end: Option<HamEnd>,
    watch: AbortHandle,
}

impl Guardian {
    /// Kills a Guardian that failed the HAM (`why`); its death brings a new one.
    fn replace(&self, why: std::fmt::Arguments<'_>) {
        tracing::warn!("{why}: replacing it");
        let _ = self.handle.signal(9);
    }
}

/// The pair as the HAM sees it.
pub struct Pair {
    listener: Arc<PairListener>,
    control: Arc<OwnedFd>,
    watch_set: Arc<OwnedFd>,
    command: GuardianCommand,
    current: Option<Guardian>,
    /// A Guardian is being started.
    launching: bool,
    /// Stopped for good: a Guardian started late is killed.
    stopped: bool,
    events: mpsc::UnboundedSender<PairEvent>,
    /// Hand-overs and hand-backs not sent yet, oldest first.
    queued: Vec<Handed>,
    /// When they are due (monotonic ms).
    due_ms: Option<u64>,
    /// The whole set is on its way to a new Guardian ([`Pair::hand_over_all`]).
    handing_over: bool,
}

impl Pair {
    /// Binds the pair socket beside the control socket. `control` is a duplicate of
    /// the control socket's listener, `watch_set` of the watcher's epoll set (each
    /// Guardian holds both); `events` receives the Guardians' news.
    pub fn new(
        control_socket: &Path,
        control: OwnedFd,
        watch_set: OwnedFd,
        command: GuardianCommand,
        events: mpsc::UnboundedSender<PairEvent>,
    ) -> std::io::Result<Pair> {
        let listener = PairListener::bind(&guardian::pair::pair_socket_path(control_socket))?;
        Ok(Pair {
            listener: Arc::new(listener),
            control: Arc::new(control),
            watch_set: Arc::new(watch_set),
            command,
            current: None,
            launching: false,
            stopped: false,
            events,
            queued: Vec::new(),
            due_ms: None,
            handing_over: false,
        })
    }

    /// The PID of the Guardian, once it is connected and holds every watched pidfd
    /// (until then a takeover would have to find the missing ones itself).
    pub fn guardian_pid(&self) -> Option<i32> {
        self.current
            .as_ref()
            .filter(|g| g.end.is_some() && !self.handing_over)
            .map(|g| g.handle.proc.pid)
    }

    /// True if a Guardian runs, is connecting or is being started.
    pub fn has_guardian(&self) -> bool {
        self.current.is_some() || self.launching
    }

    /// Starts a Guardian process off the loop (a spawn waits while the child execs,
    /// which with thousands of descriptors to close takes milliseconds); reported as
    /// [`PairEvent::Launched`], then its connection as [`PairEvent::Connected`] and
    /// its death as [`PairEvent::Exited`]. `replaces` is the PID of the Guardian that
    /// died (0 for none).
    pub fn launch(&mut self, generation: u64, replaces: i32) {
        self.launching = true;
        let mut command = std::process::Command::new(&self.command.exe);
        command
            .args(&self.command.args)
            .env(GUARDIAN_ENV, self.listener.path())
            .stdin(Stdio::null())
            // Its own process group: a terminal's Ctrl-C is for the HAM, which then
            // stops its Guardian itself.
            .process_group(0);
        let (listener, control, watch_set, events) = (
            self.listener.clone(),
            self.control.clone(),
            self.watch_set.clone(),
            self.events.clone(),
        );
        let hello = Hello {
            ham_pid: std::process::id() as i32,
            generation,
        };
        tokio::task::spawn_blocking(move || {
            let started = command.spawn().and_then(|child| {
                let pid = child.id() as i32;
                drop(child);
                ProcessHandle::own_child(pid).map(Arc::new)
            });
            let pid = started.as_ref().map_or(0, |h| h.proc.pid);
            let _ = events.send(PairEvent::Launched(started, replaces));
            if pid != 0 {
                let r = listener.accept_guardian(
                    CONNECT_TIMEOUT,
                    hello,
                    control.as_fd(),
                    watch_set.as_fd(),
                );
                let _ = events.send(PairEvent::Connected(pid, r));
            }
        });
    }

    /// A Guardian process was started (reported by [`Pair::launch`]): it becomes the
    /// current one, watched for its death. A pair stopped meanwhile kills it.
    pub fn launched(&mut self, handle: Arc<ProcessHandle>) {
        self.launching = false;
        if self.stopped {
            let _ = handle.signal(9);
            return;
        }
        let pid = handle.proc.pid;
        let events = self.events.clone();
        let waiter = handle.clone();
        let watch = tokio::spawn(async move {
            waiter.wait().await;
            let _ = events.send(PairEvent::Exited(pid));
        })
        .abort_handle();
        self.current = Some(Guardian {
            handle,
            end: None,
            watch,
        });
    }

    /// A Guardian could not be started.
    pub fn launch_failed(&mut self) {
        self.launching = false;
    }

    /// A launched Guardian connected: true if it is the current one and now holds the
    /// channel (the caller then hands it every watched pidfd).
    pub fn connected(&mut self, pid: i32, result: std::io::Result<HamEnd>) -> bool {
        let Some(g) = self.current.as_mut().filter(|g| g.handle.proc.pid == pid) else {
            return false;
        };
        match result {
            Ok(end) => {
                g.end = Some(end);
                true
            }
            Err(e) => {
                // Its death brings a new one.
                tracing::warn!("Guardian pid {pid} did not connect: {e}");
                let _ = g.handle.signal(9);
                false
            }
        }
    }

    /// Hands every watched process's pidfd to a Guardian that has just connected, at
    /// once; what was queued for the Guardian before is part of it, and dropped. The
    /// packets (one per 64 pidfds) go from a thread of their own: a Guardian just
    /// started drains 10,000 of them slower than they are sent, and the loop (with
    /// every API answer) would wait for it. Changes queued meanwhile are held back
    /// until that is done ([`PairEvent::HandedOver`]), so they follow the whole set.
    /// A Guardian that cannot take them is broken: it is killed, and its death brings
    /// a new one.
    pub fn hand_over_all(&mut self, procs: Vec<(u32, Arc<ProcessHandle>)>) {
        self.queued.clear();
        self.due_ms = None;
        let Some(g) = &self.current else { return };
        let Some(end) = &g.end else { return };
        if procs.is_empty() {
            return;
        }
        let pid = g.handle.proc.pid;
        let sender = match end.try_clone() {
            Ok(sender) => sender,
            Err(e) => {
                g.replace(format_args!("cannot hand pidfds to the Guardian ({e})"));
                return;
            }
        };
        self.handing_over = true;
        let events = self.events.clone();
        tokio::task::spawn_blocking(move || {
            let fds: Vec<_> = procs
                .iter()
                .map(|(e, h)| (*e, h.proc.pid, h.proc.start_time, h.pidfd()))
                .collect();
            let _ = events.send(PairEvent::HandedOver(pid, sender.send_watched(&fds)));
        });
    }

    /// The whole set was handed to Guardian `pid` (or could not be): what was queued
    /// meanwhile is now due; a Guardian that did not take the set is killed.
    pub fn handed_over(&mut self, pid: i32, result: std::io::Result<()>, now_ms: u64) {
        let Some(g) = self.current.as_ref().filter(|g| g.handle.proc.pid == pid) else {
            return;
        };
        self.handing_over = false;
        if let Err(e) = result {
            g.replace(format_args!("the Guardian does not take pidfds ({e})"));
            return;
        }
        if !self.queued.is_empty() {
            self.due_ms = Some(now_ms);
        }
    }

    /// Queues a watched process's pidfd for the Guardian (sent by [`Pair::flush`]).
    pub fn hand_over(&mut self, entity: u32, handle: Arc<ProcessHandle>, now_ms: u64) {
        self.queue(Handed::Watched(entity, handle), now_ms);
    }

    /// Queues word for the Guardian that an entity's process is no longer watched.
    pub fn hand_back(&mut self, entity: u32, now_ms: u64) {
        self.queue(Handed::Unwatched(entity), now_ms);
    }

    fn queue(&mut self, change: Handed, now_ms: u64) {
        // With no Guardian connected there is nobody to tell: the next one gets the
        // whole set when it connects.
        if self.current.as_ref().is_some_and(|g| g.end.is_some()) {
            self.queued.push(change);
            // While the whole set is on its way, nothing is due: it comes after.
            if !self.handing_over {
                self.due_ms.get_or_insert(now_ms + HAND_OVER_AFTER_MS);
            }
        }
    }

    /// When the queued hand-overs are due (monotonic ms), if any are queued.
    pub fn due_ms(&self) -> Option<u64> {
        self.due_ms
    }

    /// Sends what is queued, in order: consecutive hand-overs in one message.
    pub fn flush(&mut self) {
        self.due_ms = None;
        let queued = std::mem::take(&mut self.queued);
        let mut watched: Vec<(u32, i32, u64, BorrowedFd<'_>)> = Vec::new();
        for change in &queued {
            match change {
                Handed::Watched(entity, h) => {
                    watched.push((*entity, h.proc.pid, h.proc.start_time, h.pidfd()));
                }
                Handed::Unwatched(entity) => {
                    self.send_watched(&std::mem::take(&mut watched));
                    self.send_unwatched(*entity);
                }
            }
        }
        self.send_watched(&watched);
    }

    fn send_watched(&self, procs: &[(u32, i32, u64, BorrowedFd<'_>)]) {
        if !procs.is_empty()
            && let Some(g) = &self.current
            && let Some(end) = &g.end
            && let Err(e) = end.send_watched(procs)
        {
            g.replace(format_args!("the Guardian does not take pidfds ({e})"));
        }
    }

    fn send_unwatched(&self, entity: u32) {
        if let Some(g) = &self.current
            && let Some(end) = &g.end
            && let Err(e) = end.send_unwatched(entity)
        {
            g.replace(format_args!("the Guardian does not listen ({e})"));
        }
    }

    /// A Guardian died: forget it if it is the current one (true then).
    pub fn forget(&mut self, pid: i32) -> bool {
        if self
            .current
            .as_ref()
            .is_some_and(|g| g.handle.proc.pid == pid)
        {
            self.current = None;
            // The next Guardian gets the whole set when it connects.
            self.queued.clear();
            self.due_ms = None;
            self.handing_over = false;
            true
        } else {
            false
        }
    }

    /// Stops the Guardian: asks it, waits for its exit, SIGKILLs it after a timeout.
    pub async fn stop_guardian(&mut self) {
        self.stopped = true;
        let Some(mut g) = self.current.take() else {
            return;
        };
        g.watch.abort();
        let asked = g.end.as_mut().is_some_and(|e| e.request_stop().is_ok());
        if !asked {
            let _ = g.handle.signal(9);
        }
        if tokio::time::timeout(Duration::from_secs(5), g.handle.clone().wait())
            .await
            .is_err()
        {
            tracing::warn!("the Guardian did not stop in time: SIGKILL");
            let _ = g.handle.signal(9);
            g.handle.wait().await;
        }
    }
}
