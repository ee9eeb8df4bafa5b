//! Keeps failover singletons single: after membership changes (a partition healing, a
//! node leaving) and every few seconds, asks each live candidate whether it holds the
//! singleton and applies [`ham_core::singleton::verdict`]: a surplus local copy is
//! stopped, a placed singleton that no live candidate holds is started again.

use crate::node::Msg;
use ham_core::singleton::{Singleton, Verdict, verdict};
use ham_core::{EventKind, Request};
use ham_overlay::{Mesh, NodeName};
use ham_proto as pb;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot};

/// How long membership may keep changing before a check runs.
const SETTLE: Duration = Duration::from_millis(300);
/// A check runs at least this often.
const PERIOD: Duration = Duration::from_secs(5);
/// How long a candidate may take to say whether it holds a singleton.
const ASK_DEADLINE: Duration = Duration::from_secs(2);

/// What the node loop tells the reconciler.
#[derive(Default)]
pub struct Hints {
    changed: Notify,
    placed: Mutex<BTreeSet<String>>,
}

impl Hints {
    /// Membership changed: check soon.
    pub fn membership_changed(&self) {
        self.changed.notify_one();
    }

    /// A failover placed `entity`: from now on it must run on some live candidate.
    /// Only news wakes the reconciler (a check that sees a holder says so too, and
    /// must not start the next check at once).
    pub fn placed(&self, entity: &str) {
        let new = self
            .placed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(entity.to_string());
        if new {
            self.changed.notify_one();
        }
    }

    fn is_placed(&self, entity: &str) -> bool {
        self.placed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(entity)
    }
}

/// True if an entity in this state holds its singleton: it runs, is being started, or
/// died with a recovery under way.
pub fn holds(state: &str, runs: usize) -> bool {
    matches!(state, "running" | "starting") || (state == "dead" && runs > 0)
}

/// Starts the reconciler of node `me`; it ends when the node loop does.
pub fn spawn(me: String, mesh: Mesh, node: mpsc::Sender<Msg>, hints: Arc<Hints>) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = hints.changed.notified() => {
                    tokio::time::sleep(SETTLE).await;
                }
                () = tokio::time::sleep(PERIOD) => {}
            }
            let (reply, rx) = oneshot::channel();
            if node.send(Msg::Singletons { reply }).await.is_err() {
                return;
            }
            let Ok(singletons) = rx.await else { return };
            for s in singletons {
                if let Err(e) = check(&me, &mesh, &node, &hints, &s).await {
                    tracing::debug!(entity = %s.entity, "singleton check: {e}");
                }
            }
        }
    });
}

/// Checks one singleton and acts on the verdict.
async fn check(
    me: &str,
    mesh: &Mesh,
    node: &mpsc::Sender<Msg>,
    hints: &Hints,
    s: &Singleton,
) -> Result<(), String> {
    let is_up = |c: &str| c == me || NodeName::new(c).is_ok_and(|n| mesh.is_up(&n));
    let mut held = BTreeMap::new();
    let mut unsure = false;
    for c in s.candidates.iter().filter(|c| is_up(c)) {
        let answer = if c == me {
            held_here(node, &s.entity).await
        } else {
            held_there(mesh, c, &s.entity).await
        };
        match answer {
            Ok(h) => {
                held.insert(c.clone(), h);
            }
            Err(e) => {
                tracing::debug!(node = %c, entity = %s.entity, "cannot tell: {e}");
                unsure = true;
            }
        }
    }
    if held.values().any(|h| *h) {
        hints.placed(&s.entity);
    }
    let holds = |c: &str| held.get(c).copied().unwrap_or(false);
    match verdict(me, s, is_up, holds, hints.is_placed(&s.entity)) {
        Verdict::Steady => Ok(()),
        Verdict::Yield { winner } => {
            let why =
                format!("stopped here: {winner} holds the singleton and ranks before this node");
            tracing::warn!(entity = %s.entity, "{why}");
            note(node, &s.entity, why).await;
            ask_engine(
                node,
                Request::Stop {
                    name: s.entity.clone(),
                },
            )
            .await
        }
        // Someone may hold it who did not answer: starting now could make two.
        Verdict::Restore { .. } if unsure => Ok(()),
        Verdict::Restore { on } => {
            let why = format!("no live candidate holds it: starting it on {on}");
            tracing::warn!(entity = %s.entity, "{why}");
            note(node, &s.entity, why).await;
            if on == me {
                match ask_engine(
                    node,
                    Request::Start {
                        name: s.entity.clone(),
                    },
                )
                .await
                {
                    Err(e) if e.contains("already") => Ok(()),
                    r => r,
                }
            } else {
                let call = crate::remote::Call::Start {
                    node: on,
                    entity: s.entity.clone(),
                };
                crate::remote::call(Some(mesh), call).await.map(|_| ())
            }
        }
    }
}

async fn held_here(node: &mpsc::Sender<Msg>, entity: &str) -> Result<bool, String> {
    let (reply, rx) = oneshot::channel();
    node.send(Msg::Describe {
        name: entity.to_string(),
        reply,
    })
    .await
    .map_err(|_| "the node is stopping".to_string())?;
    let found = rx.await.map_err(|_| "the node is stopping".to_string())?;
    Ok(found.is_some_and(|(st, _)| holds(st.state, st.runs)))
}

async fn held_there(mesh: &Mesh, node: &str, entity: &str) -> Result<bool, String> {
    let name = NodeName::new(node).map_err(|e| e.to_string())?;
    let channel = mesh.channel(&name).map_err(|e| e.to_string())?;
    let mut api = pb::ham_client::HamClient::new(channel);
    let mut req = tonic::Request::new(pb::EntityRef {
        name: entity.to_string(),
    });
    req.set_timeout(ASK_DEADLINE);
    match api.describe(req).await {
        Ok(d) => Ok(d
            .into_inner()
            .status
            .is_some_and(|st| holds(&st.state, st.runs as usize))),
        // Not declared there: it holds nothing.
        Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
        Err(s) => Err(s.message().to_string()),
    }
}

async fn ask_engine(node: &mpsc::Sender<Msg>, req: Request) -> Result<(), String> {
    let (reply, rx) = oneshot::channel();
    node.send(Msg::Request {
        req: Box::new(req),
        reply,
    })
    .await
    .map_err(|_| "the node is stopping".to_string())?;
    match rx.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the node is stopping".to_string()),
    }
}

async fn note(node: &mpsc::Sender<Msg>, entity: &str, detail: String) {
    let _ = node
        .send(Msg::Note {
            entity: entity.to_string(),
            kind: EventKind::Singleton,
            detail,
        })
        .await;
}
