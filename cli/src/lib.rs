//! The ham client library: talk to the local `hamd`, attach a process to it, beat
//! its heartbeat through shared memory, raise conditions, and subscribe to events.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ham::ClientError> {
//! let mut client = ham::Client::connect_default().await?;
//! let me = client
//!     .attach_self("worker", Some(ham::HeartbeatContract::every_ms(500, 2, 4)))
//!     .await?;
//! loop {
//!     // ... do a unit of work ...
//!     me.heartbeat().beat(); // one atomic add in shared memory, no syscall
//! #   break;
//! }
//! # Ok(()) }
//! ```

use guardian::shm::BeatTable;
use ham_proto as pb;
use ham_proto::ham_client::HamClient;
use ham_proto::socket::UnixStream;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio_stream::{Stream, StreamExt};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};

pub use feed::EventFeed;
pub use ham_proto;
pub use raise::RaiseStream;

mod feed;
mod raise;

/// What can go wrong talking to `hamd`.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The control socket could not be reached.
    #[error("cannot reach hamd at {}: {reason}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why, in one line (the innermost cause).
        reason: String,
    },
    /// `hamd` refused or failed the request; the status code says why.
    #[error("{}", .0.message())]
    Status(#[from] tonic::Status),
    /// The shared-memory heartbeat slot could not be used.
    #[error("heartbeat slot: {0}")]
    Heartbeat(String),
}

/// A heartbeat contract: beat at least every `period_ms`; `low`/`high` missed periods
/// fire `heartbeat-missed-low` / `-high`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeartbeatContract {
    /// The period in milliseconds.
    pub period_ms: u64,
    /// Missed periods before `heartbeat-missed-low`.
    pub low: u32,
    /// Missed periods before `heartbeat-missed-high`.
    pub high: u32,
}

impl HeartbeatContract {
    /// A contract with the given period and thresholds.
    pub fn every_ms(period_ms: u64, low: u32, high: u32) -> HeartbeatContract {
        HeartbeatContract {
            period_ms,
            low,
            high,
        }
    }
}

/// The fast heartbeat path: a slot in `hamd`'s shared-memory heartbeat table.
pub struct Heartbeat {
    table: BeatTable,
    slot: u32,
    token: u64,
}

impl Heartbeat {
    /// Maps the heartbeat table and checks that the slot belongs to `token`.
    pub fn open(file: &Path, slot: u32, token: u64) -> Result<Heartbeat, ClientError> {
        let table = BeatTable::open(file).map_err(|e| ClientError::Heartbeat(e.to_string()))?;
        table
            .handle(slot, token)
            .map_err(|e| ClientError::Heartbeat(e.to_string()))?;
        Ok(Heartbeat { table, slot, token })
    }

    /// The slot `hamd` gave a process it started (`HAM_BEAT_FILE`, `HAM_BEAT_SLOT`,
    /// `HAM_BEAT_TOKEN` in its environment); `None` outside such a process.
    pub fn from_env() -> Result<Option<Heartbeat>, ClientError> {
        let (Some(file), Some(slot), Some(token)) = (
            std::env::var_os("HAM_BEAT_FILE"),
            std::env::var("HAM_BEAT_SLOT").ok(),
            std::env::var("HAM_BEAT_TOKEN").ok(),
        ) else {
            return Ok(None);
        };
        let bad = |what: &str| {
            ClientError::Heartbeat(format!("{what} in the environment is not a number"))
        };
        let slot = slot.parse().map_err(|_| bad("HAM_BEAT_SLOT"))?;
        let token = token.parse().map_err(|_| bad("HAM_BEAT_TOKEN"))?;
        Heartbeat::open(Path::new(&file), slot, token).map(Some)
    }

    /// One heartbeat: an atomic add in shared memory, no system call. Returns false if
    /// the slot no longer belongs to this entity (it was removed or re-added).
    #[inline]
    pub fn beat(&self) -> bool {
        self.table
            .handle(self.slot, self.token)
            .map(|h| h.beat())
            .unwrap_or(false)
    }
}

impl std::fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heartbeat")
            .field("slot", &self.slot)
            .field("token", &self.token)
            .finish()
    }
}

/// A process attached to `hamd` as a self-attached entity.
#[derive(Debug)]
pub struct SelfAttachment {
    name: String,
    heartbeat: Heartbeat,
}

impl SelfAttachment {
    /// The entity's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The shared-memory heartbeat of this entity.
    pub fn heartbeat(&self) -> &Heartbeat {
        &self.heartbeat
    }
}

/// What to subscribe to.
#[derive(Clone, Debug, Default)]
pub struct Subscription {
    /// Entity names (empty: all).
    pub entities: Vec<String>,
    /// Event kinds (empty: all).
    pub kinds: Vec<String>,
    /// Replay from this sequence number (0: only new events).
    pub from_seq: u64,
    /// Keep following new events.
    pub follow: bool,
    /// `""`: the node this client talks to; `"all"`: every node of the mesh.
    pub nodes: String,
    /// A pattern over `NODE/ENTITY/KIND` (`*` matches anything); empty: all.
    pub topic: String,
}

/// Where a following subscription stands in one node's numbered events: the number to
/// resume from, and the time of the event before it as delivered (0: none yet). The
/// time lets a node restarted with a new store, numbered past `next` since, tell that
/// its events are other ones and replay them from 1.
#[derive(Clone, Copy, Debug, Default)]
struct StreamPosition {
    next: u64,
    seen_time_ms: u64,
}

/// Where a following subscription stands, for its resume after a broken stream.
#[derive(Clone, Debug, Default)]
struct Resume {
    /// In the stream of the node this client talks to (a single-node subscription).
    next: u64,
    /// The time of the event before `next`, as delivered (0: none yet).
    seen_time_ms: u64,
    /// Per publishing node, for a cluster-wide subscription.
    nodes: HashMap<String, StreamPosition>,
}

impl Resume {
    /// Notes event `e` as delivered; `all` for a cluster-wide subscription, which
    /// resumes per node only.
    fn delivered(&mut self, e: &pb::Event, all: bool) {
        if e.seq == 0 {
            return;
        }
        if !all {
            self.next = e.seq + 1;
            self.seen_time_ms = e.time_ms;
        }
        let at = StreamPosition {
            next: e.seq + 1,
            seen_time_ms: e.time_ms,
        };
        self.nodes.insert(e.node.clone(), at);
    }
}

/// The deepest cause of an error, which is the one that says what happened.
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// True for errors that mean "hamd is not answering right now" (a takeover is under
/// way, or hamd restarts): the call is worth retrying.
fn is_transient(s: &tonic::Status) -> bool {
    match s.code() {
        tonic::Code::Unavailable => true,
        tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled => {
            let m = s.message().to_ascii_lowercase();
            [
                "transport",
                "connection",
                "broken pipe",
                "reset",
                "h2 protocol",
                "stream",
            ]
            .iter()
            .any(|w| m.contains(w))
        }
        _ => false,
    }
}

/// True when nobody listens on the socket any more (refused, or the socket file is
/// gone). A takeover never looks like this (the Guardian holds the listener from the
/// start), so it means hamd is not running: worth an error now, not a retry.
fn nobody_listens(s: &tonic::Status) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            );
        }
        cur = e.source();
    }
    false
}

/// True for a connection that was made and then broken (not for "nobody listens").
fn is_broken_connection(reason: &str) -> bool {
    let m = reason.to_ascii_lowercase();
    ["broken pipe", "reset", "eof", "closed"]
        .iter()
        .any(|w| m.contains(w))
}

/// A raise of `name` (fires its `raise` conditions), for `Raise` and `RaiseStream`.
fn raise_request(name: &str, severity: u32, message: &str) -> pb::RaiseRequest {
    pb::RaiseRequest {
        name: name.to_string(),
        severity,
        message: message.to_string(),
    }
}

/// The generated client, over a channel that can name the node a call is for.
pub type Api = HamClient<InterceptedService<Channel, NodeTarget>>;

/// Adds the `ham-node` metadata that makes the local `hamd` forward a call to
/// another node of the mesh.
#[derive(Clone, Default)]
pub struct NodeTarget(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for NodeTarget {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("ham-node", v.clone());
        }
        Ok(req)
    }
}

/// A boxed future of a unary call's response.
pub type CallFuture<T> =
    Pin<Box<dyn Future<Output = Result<tonic::Response<T>, tonic::Status>> + Send>>;

/// A connection to a `hamd`. Calls that hit a takeover (the HAM died, its Guardian is
/// taking over) are retried until they succeed or `retry_for` runs out.
#[derive(Clone)]
pub struct Client {
    api: Api,
    channel: Channel,
    socket: PathBuf,
    /// The node calls are for (`set_target`); `None`: the local one.
    target: Option<String>,
    retry_for: Duration,
}

impl Client {
    /// Connects to the `hamd` listening on `socket`.
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Client, ClientError> {
        let path = socket.as_ref().to_path_buf();
        let retry_for = Duration::from_secs(10);
        let deadline = Instant::now() + retry_for;
        let mut pause = Duration::from_millis(5);
        loop {
            match Self::dial(&path).await {
                Ok(channel) => {
                    return Ok(Client {
                        api: HamClient::with_interceptor(channel.clone(), NodeTarget::default()),
                        channel,
                        socket: path,
                        target: None,
                        retry_for,
                    });
                }
                // A connection the dying HAM had accepted breaks: the Guardian, which
                // holds the same listener, answers the next one.
                Err(reason) if is_broken_connection(&reason) && Instant::now() < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                Err(reason) => return Err(ClientError::Connect { path, reason }),
            }
        }
    }

    async fn dial(path: &Path) -> Result<Channel, String> {
        let target = path.to_path_buf();
        // The URI is required by the API but unused: the connector dials the socket.
        Endpoint::from_static("http://hamd.local")
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let target = target.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(target).await?)) }
            }))
            .await
            .map_err(|e| innermost(&e))
    }

    /// How long calls are retried while hamd does not answer (default 10 s).
    pub fn set_retry_for(&mut self, d: Duration) {
        self.retry_for = d;
    }

    /// Runs a unary call, retrying it while hamd is unreachable. `f` makes the call on a
    /// fresh handle each time: `client.call(|mut api| Box::pin(async move { api.status(req).await }))`.
    pub async fn call<T>(
        &mut self,
        mut f: impl FnMut(Api) -> CallFuture<T>,
    ) -> Result<T, ClientError> {
        let deadline = Instant::now() + self.retry_for;
        let mut pause = Duration::from_millis(5);
        loop {
            match f(self.api.clone()).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s)
                    if is_transient(&s)
                        && !nobody_listens(&s)
                        && Instant::now() + pause < deadline =>
                {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                Err(s) => return Err(s.into()),
            }
        }
    }

    /// Connects to `$HAM_SOCKET`, or the default socket.
    pub async fn connect_default() -> Result<Client, ClientError> {
        let path = std::env::var_os("HAM_SOCKET")
            .map(PathBuf::from)
            .unwrap_or_else(ham_proto::defaults::socket_path);
        Client::connect(path).await
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The full generated API, for everything this wrapper does not cover.
    pub fn api(&mut self) -> &mut Api {
        &mut self.api
    }

    /// Sends every later call to node `node` of the mesh, through the local `hamd`
    /// (`ham --node NAME`); `None` talks to the local node again.
    pub fn set_target(&mut self, node: Option<&str>) -> Result<(), ClientError> {
        let value = match node {
            None => None,
            Some(n) => Some(n.parse().map_err(|_| {
                ClientError::Status(tonic::Status::invalid_argument(format!(
                    "{n:?} is not a node name"
                )))
            })?),
        };
        self.api = HamClient::with_interceptor(self.channel.clone(), NodeTarget(value));
        self.target = node.map(str::to_string);
        Ok(())
    }

    /// The node's status table.
    pub async fn status(&mut self) -> Result<pb::StatusReply, ClientError> {
        self.call(|mut api| Box::pin(async move { api.status(pb::StatusRequest {}).await }))
            .await
    }

    /// Attaches the calling process as a self-attached entity (a global placeholder of
    /// that name becomes this process) and maps its heartbeat slot.
    pub async fn attach_self(
        &mut self,
        name: &str,
        heartbeat: Option<HeartbeatContract>,
    ) -> Result<SelfAttachment, ClientError> {
        let req = pb::AttachSelfRequest {
            name: name.to_string(),
            pid: std::process::id() as i32,
            heartbeat: heartbeat.map(|h| pb::HeartbeatDef {
                period_ms: h.period_ms,
                low: h.low,
                high: h.high,
            }),
            conditions: Vec::new(),
        };
        let reply = self
            .call(move |mut api| {
                let req = req.clone();
                Box::pin(async move { api.attach_self(req).await })
            })
            .await?;
        let heartbeat = Heartbeat::open(Path::new(&reply.beat_file), reply.slot, reply.token)?;
        Ok(SelfAttachment {
            name: name.to_string(),
            heartbeat,
        })
    }

    /// Leaves monitoring, alive (fires `detach`).
    pub async fn detach(&mut self, name: &str) -> Result<(), ClientError> {
        let r = pb::EntityRef {
            name: name.to_string(),
        };
        self.call(move |mut api| {
            let r = r.clone();
            Box::pin(async move { api.detach(r).await })
        })
        .await?;
        Ok(())
    }

    /// One heartbeat through the API (for scripts; processes use [`Heartbeat::beat`]).
    pub async fn heartbeat(&mut self, name: &str) -> Result<(), ClientError> {
        let r = pb::EntityRef {
            name: name.to_string(),
        };
        self.call(move |mut api| {
            let r = r.clone();
            Box::pin(async move { api.heartbeat(r).await })
        })
        .await?;
        Ok(())
    }

    /// Reports a detector's event about an entity (fires `raise`).
    pub async fn raise(
        &mut self,
        name: &str,
        severity: u32,
        message: &str,
    ) -> Result<(), ClientError> {
        let r = raise_request(name, severity, message);
        self.call(move |mut api| {
            let r = r.clone();
            Box::pin(async move { api.raise(r).await })
        })
        .await?;
        Ok(())
    }

    /// Opens a stream of raises ([`RaiseStream`]), for a detector that reports at a
    /// high rate: no round trip per raise, one store commit per batch. Not retried
    /// across a takeover: after an error, [`RaiseStream::handled`] says what took effect.
    pub async fn raise_stream(&mut self) -> Result<RaiseStream, ClientError> {
        if self.target.is_none() {
            return RaiseStream::framed(&self.socket)
                .await
                .map_err(|e| ClientError::Connect {
                    path: self.socket.clone(),
                    reason: e.to_string(),
                });
        }
        let (tx, rx) = RaiseStream::channel();
        let progress = self
            .api
            .raise_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(RaiseStream::new(tx, progress))
    }

    /// Sets an entity's user state (fires `state`).
    pub async fn set_state(&mut self, name: &str, state: &str) -> Result<(), ClientError> {
        let r = pb::SetStateRequest {
            name: name.to_string(),
            state: state.to_string(),
        };
        self.call(move |mut api| {
            let r = r.clone();
            Box::pin(async move { api.set_state(r).await })
        })
        .await?;
        Ok(())
    }

    /// Subscribes to events; the stream ends when `follow` is false and the replay is
    /// done. A following subscription survives a takeover: it reconnects and resumes
    /// after the last event it delivered (hamd replays from its buffer, or sends an
    /// explicit `gap` event when those events are gone).
    pub async fn subscribe(
        &mut self,
        s: Subscription,
    ) -> Result<impl Stream<Item = Result<pb::Event, ClientError>> + use<>, ClientError> {
        let mut from = s.from_seq;
        let all = s.nodes == "all";
        if s.follow && from == 0 && !all {
            // Pin "from now on" to a sequence number so that a resume knows where it was.
            from = self.status().await?.next_event_seq;
        }
        let mut at = Resume {
            next: from,
            ..Resume::default()
        };
        let first = self.open_events(&s, &at).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let mut client = self.clone();
        tokio::spawn(async move {
            let mut stream = first;
            loop {
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(e) => {
                            at.delivered(&e, all);
                            if tx.send(Ok(e)).await.is_err() {
                                return;
                            }
                        }
                        Err(status) if s.follow && is_transient(&status) => break,
                        Err(status) => {
                            let _ = tx.send(Err(status.into())).await;
                            return;
                        }
                    }
                }
                if !s.follow {
                    return;
                }
                // The stream broke (or ended): hamd is changing hands. Resume.
                stream = match client.reopen_events(&s, &at).await {
                    Ok(st) => st,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    /// Opens one event feed as `req` asks, on the node this client talks to: the events
    /// as hamd sends them, on a framed connection of their own (no HTTP/2 on the way),
    /// with no resume across a takeover (that is [`Client::subscribe`]). Opening is
    /// retried while hamd does not answer, as calls are.
    pub async fn feed(&mut self, req: pb::SubscribeRequest) -> Result<EventFeed, ClientError> {
        let node = self.target.clone().unwrap_or_default();
        let deadline = Instant::now() + self.retry_for;
        let mut pause = Duration::from_millis(5);
        loop {
            match feed::open(&self.socket, &node, req.clone()).await {
                Ok(events) => return Ok(events),
                Err(feed::OpenError::NobodyListens(reason)) => {
                    return Err(ClientError::Connect {
                        path: self.socket.clone(),
                        reason,
                    });
                }
                Err(feed::OpenError::Status(s))
                    if is_transient(&s) && Instant::now() + pause < deadline =>
                {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                Err(feed::OpenError::Status(s)) => return Err(s.into()),
            }
        }
    }

    async fn open_events(
        &mut self,
        s: &Subscription,
        at: &Resume,
    ) -> Result<EventFeed, ClientError> {
        let req = pb::SubscribeRequest {
            entities: s.entities.clone(),
            kinds: s.kinds.clone(),
            from_seq: at.next,
            follow: s.follow,
            nodes: s.nodes.clone(),
            topic: s.topic.clone(),
            resume: at.nodes.iter().map(|(n, p)| (n.clone(), p.next)).collect(),
            seen_time_ms: at.seen_time_ms,
            resume_time_ms: at
                .nodes
                .iter()
                .map(|(n, p)| (n.clone(), p.seen_time_ms))
                .collect(),
        };
        self.feed(req).await
    }

    async fn reopen_events(
        &mut self,
        s: &Subscription,
        at: &Resume,
    ) -> Result<EventFeed, ClientError> {
        let deadline = Instant::now() + self.retry_for;
        loop {
            match self.open_events(s, at).await {
                Ok(st) => return Ok(st),
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
