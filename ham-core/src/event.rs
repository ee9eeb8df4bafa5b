//! Events: the record of every condition that fires and every action result.

use crate::ids::EventSeq;
use serde::{Deserialize, Serialize};

/// Longest event detail kept; longer details are cut (with a trailing `…`) so that an
/// event always fits one entry of the store's event ring.
pub const MAX_DETAIL_LEN: usize = 320;

/// One event: `(node, seq, time, entity, kind, detail)`. The node name is added by the
/// node that publishes it; inside one node the sequence number says it all.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Per-node sequence number, contiguous from 1.
    pub seq: EventSeq,
    /// Wall-clock time in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The entity it concerns (empty for node-wide events).
    pub entity: String,
    /// What happened: a condition kind (`death`, `raise` …) or an engine event
    /// (`action-ok`, `action-failed`, `started`, `exited` …); see [`EventKind`].
    pub kind: String,
    /// Human-readable detail.
    pub detail: String,
}

/// The kinds of events the engine emits besides condition kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// An entity was added.
    EntityAdded,
    /// An entity was removed.
    EntityRemoved,
    /// A process was started for an entity.
    Started,
    /// A process the HAM stopped on purpose exited (not a death).
    Exited,
    /// A process could not be started.
    StartFailed,
    /// An action succeeded.
    ActionOk,
    /// An action failed (its fail actions run next).
    ActionFailed,
    /// A `notify` action's message.
    Notify,
    /// The configuration was reloaded.
    Reloaded,
    /// A restart was refused: the entity exceeded its restart intensity.
    RestartLimit,
    /// A new `hamd` adopted the state it found in the store.
    Resumed,
    /// The Guardian took over from a HAM that died.
    Takeover,
    /// Something happened to the HAM/Guardian pair (a Guardian was respawned).
    Pair,
}

impl EventKind {
    /// The kind's name as subscribers see it.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::EntityAdded => "entity-added",
            EventKind::EntityRemoved => "entity-removed",
            EventKind::Started => "started",
            EventKind::Exited => "exited",
            EventKind::StartFailed => "start-failed",
            EventKind::ActionOk => "action-ok",
            EventKind::ActionFailed => "action-failed",
            EventKind::Notify => "notify",
            EventKind::Reloaded => "reloaded",
            EventKind::RestartLimit => "restart-limit",
            EventKind::Resumed => "resumed",
            EventKind::Takeover => "takeover",
            EventKind::Pair => "pair",
        }
    }
}

/// Cuts a detail to [`MAX_DETAIL_LEN`] bytes on a character boundary.
pub fn clip_detail(mut s: String) -> String {
    if s.len() > MAX_DETAIL_LEN {
        let mut end = MAX_DETAIL_LEN - '…'.len_utf8();
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// A subscriber's filter: empty lists match everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Entity names to match.
    pub entities: Vec<String>,
    /// Event kinds to match.
    pub kinds: Vec<String>,
}

impl EventFilter {
    /// True if the event passes the filter.
    pub fn matches(&self, e: &Event) -> bool {
        (self.entities.is_empty() || self.entities.contains(&e.entity))
            && (self.kinds.is_empty() || self.kinds.contains(&e.kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_details_are_clipped_on_a_char_boundary() {
        let s = "é".repeat(400);
        let c = clip_detail(s);
        assert!(c.len() <= MAX_DETAIL_LEN);
        assert!(c.ends_with('…'));
    }

    #[test]
    fn empty_filter_matches_all_and_lists_restrict() {
        let e = Event {
            seq: EventSeq(1),
            time_ms: 0,
            entity: "web".into(),
            kind: "death".into(),
            detail: String::new(),
        };
        assert!(EventFilter::default().matches(&e));
        let f = EventFilter {
            entities: vec!["db".into()],
            kinds: vec![],
        };
        assert!(!f.matches(&e));
        let f = EventFilter {
            entities: vec!["web".into()],
            kinds: vec!["death".into(), "restart".into()],
        };
        assert!(f.matches(&e));
    }
}
