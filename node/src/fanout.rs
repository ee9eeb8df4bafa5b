//! `ham events --node all`: one stream of every node's events. This node subscribes
//! to each node that is up (and each that comes up later) with the caller's filter,
//! so events cross the mesh only where someone listens; each node's stream keeps its
//! order and, after a broken connection, resumes after its last sequence number (or
//! says `gap` when the events it missed are gone).

use crate::service::HamService;
use ham_overlay::{Mesh, NodeName};
use ham_proto as pb;
use ham_proto::ham_server::Ham;
use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

type Events = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

/// The last event a subscriber got from a node: its number, and its time, which tells
/// it from another event under the same number after the node's numbers started over.
#[derive(Debug, Clone, Copy)]
struct Seen {
    seq: u64,
    time_ms: u64,
}

/// How often the set of nodes is checked for newcomers.
const RESCAN: Duration = Duration::from_millis(250);

/// Merges this node's events with every other node's.
pub fn cluster_stream(local: HamService, mesh: Option<Mesh>, req: pb::SubscribeRequest) -> Events {
    let (tx, rx) = mpsc::channel::<Result<pb::Event, Status>>(1024);
    let follow = req.follow;
    let me = local.node_name().to_string();
    // This node's own stream, through the ordinary subscription.
    {
        let tx = tx.clone();
        let mut own = req.clone();
        own.nodes = String::new();
        if let Some(&next) = req.resume.get(&me) {
            own.from_seq = next;
            own.seen_time_ms = req.resume_time_ms.get(&me).copied().unwrap_or(0);
        }
        tokio::spawn(async move {
            match local.subscribe(tonic::Request::new(own)).await {
                Ok(r) => pump(r.into_inner(), &tx, None).await,
                Err(s) => {
                    let _ = tx.send(Err(s)).await;
                }
            }
        });
    }
    if let Some(mesh) = mesh {
        let tx = tx.clone();
        tokio::spawn(async move {
            let last: Arc<Mutex<HashMap<String, Seen>>> = Arc::new(Mutex::new(
                req.resume
                    .iter()
                    .filter(|(n, s)| **n != me && **s > 0)
                    .map(|(n, s)| {
                        let seen = Seen {
                            seq: s - 1,
                            time_ms: req.resume_time_ms.get(n).copied().unwrap_or(0),
                        };
                        (n.clone(), seen)
                    })
                    .collect(),
            ));
            let active: Arc<Mutex<HashSet<NodeName>>> = Arc::default();
            loop {
                for node in mesh.live_nodes() {
                    if node.as_str() == me
                        || !active
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(node.clone())
                    {
                        continue;
                    }
                    let (mesh, tx, req, last, active) = (
                        mesh.clone(),
                        tx.clone(),
                        req.clone(),
                        last.clone(),
                        active.clone(),
                    );
                    tokio::spawn(async move {
                        follow_node(&mesh, &node, req, &tx, &last).await;
                        active
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&node);
                    });
                }
                if !follow || tx.is_closed() {
                    return;
                }
                tokio::time::sleep(RESCAN).await;
            }
        });
    }
    drop(tx);
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Follows one node while it is up, resuming after the last event seen.
async fn follow_node(
    mesh: &Mesh,
    node: &NodeName,
    req: pb::SubscribeRequest,
    tx: &mpsc::Sender<Result<pb::Event, Status>>,
    last: &Mutex<HashMap<String, Seen>>,
) {
    loop {
        let seen = last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node.as_str())
            .copied();
        let mut r = req.clone();
        r.nodes = String::new();
        r.resume.clear();
        r.resume_time_ms.clear();
        r.from_seq = seen.map_or(req.from_seq, |s| s.seq + 1);
        // Lets a node that restarted with a new store, and has numbered past it
        // since, tell that the event under that number is another one.
        r.seen_time_ms = seen.map_or(0, |s| s.time_ms);
        if let Ok(events) = crate::feed::follow(mesh, node, r).await {
            pump(events, tx, Some((node.as_str(), last))).await;
        }
        if !req.follow || tx.is_closed() || !mesh.is_up(node) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Copies a stream of events into the merged one, noting the last sequence number.
async fn pump(
    mut events: impl Stream<Item = Result<pb::Event, Status>> + Unpin,
    tx: &mpsc::Sender<Result<pb::Event, Status>>,
    track: Option<(&str, &Mutex<HashMap<String, Seen>>)>,
) {
    while let Some(item) = events.next().await {
        let Ok(e) = item else {
            return;
        };
        if let Some((node, last)) = track
            && e.kind != "gap"
        {
            let seen = Seen {
                seq: e.seq,
                time_ms: e.time_ms,
            };
            last.lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(node.to_string(), seen);
        }
        if tx.send(Ok(e)).await.is_err() {
            return;
        }
    }
}
