//! The process watcher: every watched process's pidfd in one epoll set, itself one
//! descriptor in the runtime. Adding a process is one `epoll_ctl`, not a task; and a
//! Guardian fills its own set as the HAM hands it pidfds, so that at a takeover the
//! new HAM's watcher is complete before it serves its first request.

use crate::process::ProcessHandle;
use ham_core::EntityId;
use ham_core::engine::state::ExitStatus;
use ham_core::ids::ProcessRef;
use rustix::event::epoll::{self, CreateFlags, Event, EventData, EventFlags};
use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use tokio::io::unix::AsyncFd;

/// An epoll set of pidfds, registered with the runtime's reactor.
pub type WatchSet = AsyncFd<OwnedFd>;

/// Registers an epoll set with the current runtime's reactor. The kernel checks every
/// file in a set for wake-up loops when the set is added to another epoll: with
/// 10,000 pidfds that is ~3 ms, so a Guardian registers its set before any arrive.
pub fn register(set: OwnedFd) -> io::Result<WatchSet> {
    // `AsyncFd::new` is deprecated because it cannot check I/O safety; the epoll fd is
    // owned by the `AsyncFd` for its whole life, so it is sound here (the `unsafe`
    // replacement is not allowed in this crate).
    #[allow(deprecated)]
    AsyncFd::with_interest(set, tokio::io::Interest::READABLE)
}

/// Watched processes by entity.
pub struct Watcher {
    epoll: WatchSet,
    procs: HashMap<EntityId, Arc<ProcessHandle>>,
}

impl Watcher {
    /// A watcher over `prepared` (an epoll set a Guardian filled) or a new, empty set.
    /// `expected` processes are about to be watched (those a takeover adopts).
    pub fn new(prepared: Option<WatchSet>, expected: usize) -> io::Result<Watcher> {
        let epoll = match prepared {
            Some(set) => set,
            None => register(epoll::create(CreateFlags::CLOEXEC)?)?,
        };
        Ok(Watcher {
            epoll,
            procs: HashMap::with_capacity(expected),
        })
    }

    /// The epoll set itself (the Guardian holds a duplicate, so that this process's
    /// death does not tear the set down; see `guardian::pair`).
    pub fn set(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self.epoll.get_ref())
    }

    /// The process watched for an entity.
    pub fn get(&self, entity: EntityId) -> Option<&Arc<ProcessHandle>> {
        self.procs.get(&entity)
    }

    /// Every watched process.
    pub fn iter(&self) -> impl Iterator<Item = (EntityId, &Arc<ProcessHandle>)> {
        self.procs.iter().map(|(e, h)| (*e, h))
    }

    /// Starts watching a process for an entity (replacing an earlier one).
    pub fn add(&mut self, entity: EntityId, handle: Arc<ProcessHandle>) -> io::Result<()> {
        self.remove(entity);
        epoll::add(
            self.epoll.get_ref(),
            handle.pidfd(),
            EventData::new_u64(u64::from(entity.0)),
            EventFlags::IN,
        )?;
        self.procs.insert(entity, handle);
        Ok(())
    }

    /// Records a process whose pidfd is already in the set (handed over at takeover).
    pub fn adopt(&mut self, entity: EntityId, handle: Arc<ProcessHandle>) {
        self.procs.insert(entity, handle);
    }

    /// Removes a pidfd that is in the set but watched for nobody (takeover leftovers).
    pub fn forget_prepared(&self, handle: &ProcessHandle) {
        let _ = epoll::delete(self.epoll.get_ref(), handle.pidfd());
    }

    /// Stops watching an entity's process.
    pub fn remove(&mut self, entity: EntityId) -> Option<Arc<ProcessHandle>> {
        let h = self.procs.remove(&entity)?;
        let _ = epoll::delete(self.epoll.get_ref(), h.pidfd());
        Some(h)
    }

    /// Waits until watched processes have exited; returns them, reaped where they are
    /// our children, and no longer watched.
    pub async fn exits(&mut self) -> Vec<(EntityId, ProcessRef, ExitStatus)> {
        loop {
            let Ok(mut guard) = self.epoll.readable().await else {
                return std::future::pending().await;
            };
            let mut events: Vec<Event> = Vec::with_capacity(256);
            let zero = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            let _ = epoll::wait(
                self.epoll.get_ref(),
                rustix::buffer::spare_capacity(&mut events),
                Some(&zero),
            );
            if events.is_empty() {
                guard.clear_ready();
                continue;
            }
            drop(guard);
            let mut out = Vec::new();
            for ev in &events {
                let entity = EntityId(ev.data.u64() as u32);
                // An event may be for a pidfd since replaced: check the current one.
                let Some(h) = self.procs.get(&entity).cloned() else {
                    continue;
                };
                if h.has_exited() {
                    let status = h.reap().unwrap_or(ExitStatus::Unknown);
                    self.remove(entity);
                    out.push((entity, h.proc, status));
                }
            }
            if !out.is_empty() {
                return out;
            }
        }
    }
}
