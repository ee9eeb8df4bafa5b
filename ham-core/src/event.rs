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
    /// A mesh node missed its probes; the cluster is checking it.
    NodeSuspect,
    /// A failover singleton was reconciled: a surplus copy stopped, or a lost one
    /// started again (see [`crate::singleton`]).
    Singleton,
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
            EventKind::NodeSuspect => "node-suspect",
            EventKind::Singleton => "singleton",
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
    /// A pattern over the topic `NODE/ENTITY/KIND` (see [`topic_matches`]); empty
    /// matches all.
    pub topic: String,
}

impl EventFilter {
    /// True if the event, published by `node`, passes the filter.
    pub fn matches(&self, node: &str, e: &Event) -> bool {
        (self.entities.is_empty() || self.entities.contains(&e.entity))
            && (self.kinds.is_empty() || self.kinds.contains(&e.kind))
            && (self.topic.is_empty()
                || topic_matches(&self.topic, &format!("{node}/{}/{}", e.entity, e.kind)))
    }
}

/// Matches a topic against a pattern in which `*` stands for any run of characters
/// (possibly empty, `/` included) and every other character for itself.
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), topic.as_bytes());
    // Greedy matching with backtracking to the last star: linear in practice.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns_match_like_globs() {
        for (p, t) in [
            ("b/web/death", "b/web/death"),
            ("b/*", "b/web/death"),
            ("*/*/node-down", "a//node-down"),
            ("*", ""),
            ("*web*", "b/web/restart"),
            ("b/w*b/*h", "b/web/death"),
        ] {
            assert!(topic_matches(p, t), "{p} ~ {t}");
        }
        for (p, t) in [
            ("b/web/death", "b/web/deaths"),
            ("a/*", "b/web/death"),
            ("*/db/*", "b/web/death"),
            ("b/web", "b/web/death"),
        ] {
            assert!(!topic_matches(p, t), "{p} !~ {t}");
        }
    }

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
        assert!(EventFilter::default().matches("a", &e));
        let f = EventFilter {
            entities: vec!["db".into()],
            ..EventFilter::default()
        };
        assert!(!f.matches("a", &e));
        let f = EventFilter {
            entities: vec!["web".into()],
            kinds: vec!["death".into(), "restart".into()],
            ..EventFilter::default()
        };
        assert!(f.matches("a", &e));
        let f = EventFilter {
            topic: "b/*".into(),
            ..EventFilter::default()
        };
        assert!(!f.matches("a", &e));
        assert!(f.matches("b", &e));
    }
}
