//! The engine's timers: derived from state, never persisted, rebuilt on restore.

use crate::ids::{EntityId, RunId};
use std::collections::{BTreeSet, HashMap};

/// What a timer wakes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timer {
    /// Check an entity's heartbeat.
    Heartbeat(EntityId),
    /// A stop timed out: send SIGKILL.
    StopKill(EntityId),
    /// A run's delay or backoff elapsed.
    RunWake(EntityId, RunId),
}

impl Timer {
    fn entity(self) -> EntityId {
        match self {
            Timer::Heartbeat(e) | Timer::StopKill(e) | Timer::RunWake(e, _) => e,
        }
    }
}

/// A deadline queue keyed by timer, one deadline per timer.
#[derive(Default)]
pub struct Timers {
    queue: BTreeSet<(u64, Timer)>,
    by_timer: HashMap<Timer, u64>,
    by_entity: HashMap<EntityId, Vec<Timer>>,
}

impl Timers {
    /// Sets (or moves) a timer.
    pub fn set(&mut self, timer: Timer, at_ms: u64) {
        if let Some(old) = self.by_timer.insert(timer, at_ms) {
            self.queue.remove(&(old, timer));
        } else {
            self.by_entity
                .entry(timer.entity())
                .or_default()
                .push(timer);
        }
        self.queue.insert((at_ms, timer));
    }

    /// Cancels a timer if set.
    pub fn cancel(&mut self, timer: Timer) {
        if let Some(old) = self.by_timer.remove(&timer) {
            self.queue.remove(&(old, timer));
            if let Some(v) = self.by_entity.get_mut(&timer.entity()) {
                v.retain(|t| *t != timer);
            }
        }
    }

    /// Cancels every timer of an entity.
    pub fn clear_entity(&mut self, id: EntityId) {
        for t in self.by_entity.remove(&id).unwrap_or_default() {
            if let Some(at) = self.by_timer.remove(&t) {
                self.queue.remove(&(at, t));
            }
        }
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<u64> {
        self.queue.first().map(|(at, _)| *at)
    }

    /// Removes and returns a timer due at `now`, earliest first.
    pub fn pop_due(&mut self, now_ms: u64) -> Option<Timer> {
        let &(at, timer) = self.queue.first()?;
        if at > now_ms {
            return None;
        }
        self.cancel(timer);
        Some(timer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_pop_in_deadline_order_and_move_when_reset() {
        let mut t = Timers::default();
        t.set(Timer::Heartbeat(EntityId(1)), 30);
        t.set(Timer::StopKill(EntityId(2)), 10);
        t.set(Timer::Heartbeat(EntityId(1)), 5);
        assert_eq!(t.next(), Some(5));
        assert_eq!(t.pop_due(20), Some(Timer::Heartbeat(EntityId(1))));
        assert_eq!(t.pop_due(20), Some(Timer::StopKill(EntityId(2))));
        assert_eq!(t.pop_due(20), None);
    }

    #[test]
    fn clearing_an_entity_cancels_only_its_timers() {
        let mut t = Timers::default();
        t.set(Timer::Heartbeat(EntityId(1)), 5);
        t.set(Timer::RunWake(EntityId(1), RunId(3)), 6);
        t.set(Timer::Heartbeat(EntityId(2)), 7);
        t.clear_entity(EntityId(1));
        assert_eq!(t.next(), Some(7));
    }
}
