//! Feeds remote entities (`remote = "web@b"`): for every entity of another node that a
//! remote entity here watches, one subscription to that node's events for that entity
//! over the mesh, resumed after the last sequence number seen (the publisher replays
//! what was missed, or says `gap`). Each event becomes an `Input::Remote` for the
//! engine, which fires the watching entities' conditions of that kind.

use crate::node::Msg;
use futures_util::StreamExt;
use ham_core::Input;
use ham_overlay::{Mesh, NodeName};
use ham_proto as pb;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// How often the set of watched entities is compared with the engine's.
const RESCAN: Duration = Duration::from_secs(1);
/// How long to wait before subscribing again after a stream ended or failed.
const RETRY: Duration = Duration::from_millis(250);

/// An entity on another node: (node, entity).
pub type Target = (String, String);

/// Starts the watcher; it ends when the node loop does.
pub fn spawn(mesh: Mesh, node: mpsc::Sender<Msg>) {
    tokio::spawn(async move {
        let mut following: HashMap<Target, JoinHandle<()>> = HashMap::new();
        loop {
            let (reply, rx) = oneshot::channel();
            if node.send(Msg::RemoteTargets { reply }).await.is_err() {
                break;
            }
            let Ok(targets) = rx.await else { break };
            following.retain(|t, task| {
                let keep = targets.contains(t);
                if !keep {
                    task.abort();
                }
                keep
            });
            for t in targets {
                following
                    .entry(t.clone())
                    .or_insert_with(|| tokio::spawn(follow(mesh.clone(), node.clone(), t)));
            }
            tokio::time::sleep(RESCAN).await;
        }
        for task in following.values() {
            task.abort();
        }
    });
}

/// Follows one remote entity's events for as long as it is watched.
async fn follow(mesh: Mesh, node: mpsc::Sender<Msg>, (there, entity): Target) {
    let Ok(name) = NodeName::new(there.clone()) else {
        return;
    };
    // 0 = only new events; then always the one after the last seen.
    let mut from_seq = 0u64;
    loop {
        // A node that was down may come back with a fresh store (numbers start over),
        // and its death was told already (`death` on node-down): start from new events.
        if !mesh.is_up(&name) {
            from_seq = 0;
        }
        if mesh.is_up(&name) {
            let req = pb::SubscribeRequest {
                entities: vec![entity.clone()],
                from_seq,
                follow: true,
                ..Default::default()
            };
            match crate::feed::follow(&mesh, &name, req).await {
                Ok(mut events) => {
                    while let Some(Ok(ev)) = events.next().await {
                        if ev.kind == "gap" {
                            tracing::warn!(node = %there, entity = %entity, "remote events lost: {}", ev.detail);
                            continue;
                        }
                        if ev.entity != entity {
                            continue;
                        }
                        from_seq = ev.seq + 1;
                        let input = Input::Remote {
                            node: there.clone(),
                            entity: entity.clone(),
                            kind: ev.kind,
                            detail: ev.detail,
                        };
                        if node.send(Msg::Remote(input)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(s) => {
                    tracing::debug!(node = %there, entity = %entity, "remote subscription: {}", s.message())
                }
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// The entities of other nodes that `records` watch.
pub fn targets<'a>(
    records: impl Iterator<Item = &'a ham_core::spec::EntitySpec>,
) -> BTreeSet<Target> {
    records
        .filter_map(|s| match &s.kind {
            ham_core::spec::EntityKind::Remote { node, entity } => {
                Some((node.clone(), entity.clone()))
            }
            _ => None,
        })
        .collect()
}
