//! One subscriber's way through this node's events: a `gap` event first if some of
//! what it asked for is gone, the replayed events, then live events as they are
//! published (with a `gap` whenever it fell too far behind to keep up). The same
//! cursor feeds a gRPC subscription on the socket and an event feed on the mesh.

use crate::convert;
use crate::node::Subscription;
use ham_core::{Event, EventFilter};
use ham_proto as pb;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

/// Where a subscriber is in this node's events (see the module docs).
pub struct EventCursor {
    node: String,
    filter: EventFilter,
    /// Notices to give before anything else (the subscriber's `gap` events).
    notices: VecDeque<pb::Event>,
    /// Replayed events not yet given.
    backlog: std::vec::IntoIter<Arc<Event>>,
    /// Live events; `None` for a subscription that does not follow, or once closed.
    live: Option<broadcast::Receiver<Arc<Event>>>,
    /// The sequence number of the last event passed (given or filtered out).
    last: u64,
}

impl EventCursor {
    /// A cursor over `sub` for node `node`'s events that match `filter`; without
    /// `follow` it ends after the replay.
    pub fn new(node: String, filter: EventFilter, sub: Subscription, follow: bool) -> Self {
        let Subscription {
            backlog,
            gap,
            renumbered,
            live,
        } = sub;
        let now_ms = crate::time::now().wall_ms;
        let mut notices = VecDeque::new();
        if let Some(asked) = renumbered {
            notices.push_back(convert::renumbered_event(&node, asked, now_ms));
        }
        if let Some((from, to)) = gap {
            notices.push_back(convert::gap_event(&node, from, to, now_ms));
        }
        EventCursor {
            node,
            filter,
            notices,
            backlog: backlog.into_iter(),
            live: follow.then_some(live),
            last: 0,
        }
    }

    /// The next event for this subscriber, waiting for it if need be; `None` when the
    /// subscription is over (the replay of one that does not follow is done, or the
    /// node stops publishing).
    pub async fn next(&mut self) -> Option<pb::Event> {
        loop {
            if let Some(e) = self.next_replayed() {
                return Some(e);
            }
            let got = self.live.as_mut()?.recv().await;
            if let Some(e) = self.take(got) {
                return Some(e);
            }
        }
    }

    /// A notice or a replayed event that matches, if any is left.
    fn next_replayed(&mut self) -> Option<pb::Event> {
        if let Some(n) = self.notices.pop_front() {
            return Some(n);
        }
        for e in self.backlog.by_ref() {
            self.last = e.seq.0;
            if self.filter.matches(&self.node, &e) {
                return Some(convert::event_out(&self.node, &e));
            }
        }
        None
    }

    /// What a live event means for this subscriber: the event, a gap, or nothing
    /// (filtered out, given already by the replay, or the end).
    fn take(&mut self, got: Result<Arc<Event>, RecvError>) -> Option<pb::Event> {
        match got {
            Ok(e) => {
                if e.seq.0 <= self.last {
                    return None; // given already by the replay
                }
                self.last = e.seq.0;
                self.filter
                    .matches(&self.node, &e)
                    .then(|| convert::event_out(&self.node, &e))
            }
            Err(RecvError::Lagged(n)) => {
                let gap = convert::gap_event(
                    &self.node,
                    self.last + 1,
                    self.last + n,
                    crate::time::now().wall_ms,
                );
                self.last += n;
                Some(gap)
            }
            Err(RecvError::Closed) => {
                self.live = None;
                None
            }
        }
    }
}
