//! `ham --node NAME`: a call carrying the metadata `ham-node: NAME` is answered by
//! node NAME. This layer sits in front of the gRPC service and forwards such calls,
//! untouched, over the mesh to NAME's own service; statuses, deadlines
//! (`grpc-timeout`) and streams travel end to end. `Subscribe` is the exception: it
//! passes to the service, which follows NAME's events over an event feed (`feed`).

use ham_overlay::{Mesh, NodeName};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::body::Body;
use tonic::codegen::http;
use tower::Service;

/// The metadata key that names the node a call is for.
pub const NODE_HEADER: &str = "ham-node";

/// The path of the call that is not forwarded (see the module docs).
const SUBSCRIBE_PATH: &str = "/ham.v1.Ham/Subscribe";

/// How long a forwarded call may wait for the remote node's answer to begin when the
/// caller set no deadline.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// Wraps a service so that calls for other nodes are forwarded.
#[derive(Clone)]
pub struct ForwardLayer {
    /// This node's name.
    pub me: String,
    /// The mesh, if this node runs one.
    pub mesh: Option<Mesh>,
}

impl<S> tower::Layer<S> for ForwardLayer {
    type Service = Forward<S>;

    fn layer(&self, inner: S) -> Forward<S> {
        Forward {
            inner,
            me: self.me.clone(),
            mesh: self.mesh.clone(),
        }
    }
}

/// The forwarding service (see the module docs).
#[derive(Clone)]
pub struct Forward<S> {
    inner: S,
    me: String,
    mesh: Option<Mesh>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<http::Request<Body>> for Forward<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let target = if req.uri().path() == SUBSCRIBE_PATH {
            Ok(None)
        } else {
            let value = req.headers().get(NODE_HEADER);
            target_node(value.map(|v| v.as_bytes()), &self.me)
        };
        let node = match target {
            Ok(Some(node)) => node,
            Ok(None) => {
                // Take the service that was polled ready; leave a fresh clone behind.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                return Box::pin(async move { inner.call(req).await });
            }
            Err(status) => return ready(status),
        };
        let channel = match mesh_to(&self.me, self.mesh.as_ref(), &node).and_then(|mesh| {
            mesh.channel(&node)
                .map_err(|e| tonic::Status::unavailable(e.to_string()))
        }) {
            Ok(c) => c,
            Err(status) => return ready(status),
        };
        let deadline = grpc_timeout(req.headers()).unwrap_or(DEFAULT_DEADLINE);
        Box::pin(async move {
            let mut channel = channel;
            let call = async {
                std::future::poll_fn(|cx| channel.poll_ready(cx)).await?;
                channel.call(req).await
            };
            match tokio::time::timeout(deadline, call).await {
                Ok(Ok(resp)) => Ok(resp),
                Ok(Err(e)) => Ok(tonic::Status::unavailable(format!(
                    "node {node} did not answer: {}",
                    innermost(&e)
                ))
                .into_http()),
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "node {node} did not answer within {deadline:?}"
                ))
                .into_http()),
            }
        })
    }
}

/// The node a call is for, from its `ham-node` metadata: `None` for this node (no
/// metadata, empty, or this node's name).
pub fn target_node(value: Option<&[u8]>, me: &str) -> Result<Option<NodeName>, tonic::Status> {
    let Some(value) = value else {
        return Ok(None);
    };
    let name = std::str::from_utf8(value)
        .map_err(|_| tonic::Status::invalid_argument("ham-node is not a node name"))?;
    if name.is_empty() || name == me {
        return Ok(None);
    }
    NodeName::new(name.to_string())
        .map(Some)
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))
}

/// The mesh through which this node (`me`) reaches `node`.
pub fn mesh_to<'a>(
    me: &str,
    mesh: Option<&'a Mesh>,
    node: &NodeName,
) -> Result<&'a Mesh, tonic::Status> {
    mesh.ok_or_else(|| {
        tonic::Status::failed_precondition(format!(
            "node {me} runs without a mesh: it cannot reach node {node}"
        ))
    })
}

fn ready(status: tonic::Status) -> BoxFuture<Result<http::Response<Body>, Infallible>> {
    Box::pin(std::future::ready(Ok(status.into_http())))
}

fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// The caller's deadline from the `grpc-timeout` header (`<digits><unit>`).
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_read_in_every_unit() {
        let mut h = http::HeaderMap::new();
        for (v, d) in [
            ("5S", Duration::from_secs(5)),
            ("250m", Duration::from_millis(250)),
            ("2M", Duration::from_secs(120)),
            ("7u", Duration::from_micros(7)),
        ] {
            h.insert("grpc-timeout", http::HeaderValue::from_static(v));
            assert_eq!(grpc_timeout(&h), Some(d), "{v}");
        }
        h.insert("grpc-timeout", http::HeaderValue::from_static("x"));
        assert_eq!(grpc_timeout(&h), None);
    }
}
