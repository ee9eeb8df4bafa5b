//! Actions that run on other nodes: calls to their control API over the mesh, and
//! the deterministic placement of a failover.

use ham_core::spec::CommandSpec;
use ham_overlay::{Mesh, NodeName};
use ham_proto as pb;
use std::time::Duration;

/// How long a remote action may take before it fails.
const REMOTE_DEADLINE: Duration = Duration::from_secs(30);

/// A call to another node.
pub enum Call {
    /// Restart an entity there.
    Restart {
        /// The node.
        node: String,
        /// The entity.
        entity: String,
    },
    /// Run a command there.
    Execute {
        /// The node.
        node: String,
        /// The command.
        command: CommandSpec,
    },
    /// Start an entity there (a failover placed on it); "already running" is success.
    Start {
        /// The node.
        node: String,
        /// The entity.
        entity: String,
    },
}

/// The node a failover starts on: the first candidate that is up. Every node applies
/// the same rule to the same membership, so while the cluster is healthy they all pick
/// the same one.
pub fn place(me: &str, mesh: Option<&Mesh>, candidates: &[String]) -> Result<String, String> {
    let up = |c: &str| match mesh {
        Some(m) => NodeName::new(c).is_ok_and(|n| m.is_up(&n)),
        None => c == me,
    };
    candidates
        .iter()
        .find(|c| up(c))
        .cloned()
        .ok_or_else(|| format!("no candidate is up among {}", candidates.join(", ")))
}

fn deadline<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(REMOTE_DEADLINE);
    r
}

/// Makes the call and returns the action's outcome.
pub async fn call(mesh: Option<&Mesh>, call: Call) -> Result<String, String> {
    let node = match &call {
        Call::Restart { node, .. } | Call::Execute { node, .. } | Call::Start { node, .. } => {
            node.clone()
        }
    };
    let mesh = mesh.ok_or_else(|| format!("this node runs without a mesh: cannot reach {node}"))?;
    let name = NodeName::new(node.clone()).map_err(|e| e.to_string())?;
    let channel = mesh.channel(&name).map_err(|e| e.to_string())?;
    let mut api = pb::ham_client::HamClient::new(channel);
    match call {
        Call::Restart { entity, .. } => api
            .restart(deadline(pb::EntityRef {
                name: entity.clone(),
            }))
            .await
            .map(|_| format!("restarted {entity} on {node}"))
            .map_err(|s| format!("restart of {entity} on {node}: {}", s.message())),
        Call::Start { entity, .. } => match api
            .start_entity(deadline(pb::EntityRef {
                name: entity.clone(),
            }))
            .await
        {
            Ok(_) => Ok(format!("started {entity} on {node}")),
            Err(s)
                if s.code() == tonic::Code::FailedPrecondition
                    && s.message().contains("already") =>
            {
                Ok(format!("{entity} runs on {node} already"))
            }
            Err(s) => Err(format!("start of {entity} on {node}: {}", s.message())),
        },
        Call::Execute { command, .. } => {
            let shown = command.to_string();
            let req = pb::ExecuteRequest {
                command: Some(pb::CommandLine {
                    argv: command.argv,
                    env: command.env.into_iter().collect(),
                    cwd: command.cwd.unwrap_or_default(),
                }),
                timeout_ms: REMOTE_DEADLINE.as_millis() as u64,
            };
            match api.execute(deadline(req)).await {
                Ok(r) => {
                    let r = r.into_inner();
                    if r.exit_code == 0 {
                        Ok(format!("{shown} on {node}: {}", r.detail))
                    } else {
                        Err(format!("{shown} on {node}: {}", r.detail))
                    }
                }
                Err(s) => Err(format!("{shown} on {node}: {}", s.message())),
            }
        }
    }
}
