//! The mesh: one QUIC endpoint per node, one connection per peer, and the task that
//! owns the membership and carries out its effects.
//!
//! Connections are made on demand (SWIM asks to send to a member we are not
//! connected to), from seeds at start, and again with backoff while no seed answers.
//! A connection carries SWIM datagrams, gRPC streams and event feeds (framed
//! streams); nothing else is accepted.

use crate::NodeName;
use crate::frames::FrameStream;
use crate::grpc::MeshStream;
use crate::identity::{IdentityError, IdentityFiles, TlsIdentity, verify_peer_name};
use crate::membership::{
    Effects, MemberInfo, MemberState, Membership, MeshId, SwimTimer, SwimTuning,
};
use crate::wire::{self, Hello, close};
use bytes::Bytes;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How long a handshake plus hello may take.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an accepted stream may take to say what it carries.
const TAG_TIMEOUT: Duration = Duration::from_secs(5);
/// Datagrams kept for a member while its connection is being made.
const PENDING_PER_PEER: usize = 32;
/// Seeds are retried this often at first, doubling up to [`SEED_RETRY_MAX`].
const SEED_RETRY_MIN: Duration = Duration::from_millis(250);
const SEED_RETRY_MAX: Duration = Duration::from_secs(5);
/// A node alone announces itself to the members it saw before this often.
const FORMER_ANNOUNCE_PERIOD: Duration = Duration::from_secs(1);
/// A member is not redialled more often than this.
const REDIAL_MIN: Duration = Duration::from_millis(200);

/// Everything a node needs to join the mesh.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// This node's name; its certificate must be for it.
    pub name: NodeName,
    /// The UDP address to listen on.
    pub listen: SocketAddr,
    /// Where others reach this node (`host:port`); default: the listen address, or
    /// the host name and listen port when listening on every interface.
    pub advertise: Option<String>,
    /// Nodes to join through (`host:port`, resolved at every attempt).
    pub seeds: Vec<String>,
    /// Certificate, key and cluster CA.
    pub identity: IdentityFiles,
    /// SWIM timing.
    pub swim: SwimTuning,
    /// Datagrams per second a peer may send before it is cut off.
    pub max_datagrams_per_sec: u32,
}

/// Why the mesh could not start.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// Certificates or keys.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The UDP socket.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A node that is not a connected member.
    #[error("node {0} is not reachable")]
    Unreachable(NodeName),
}

/// A membership change, for the node's engine and subscribers.
#[derive(Clone, Debug)]
pub struct MeshEvent {
    /// The member.
    pub node: NodeName,
    /// Its new state.
    pub state: MemberState,
    /// Where it listens.
    pub addr: String,
}

/// What other nodes bring to this one, returned by [`Mesh::start`].
pub struct MeshIncoming {
    /// Membership changes.
    pub members: mpsc::UnboundedReceiver<MeshEvent>,
    /// gRPC streams other nodes open, to serve with the control API.
    pub grpc: mpsc::Receiver<MeshStream>,
    /// Event feeds other nodes open (framed streams), to serve with this node's events.
    pub feeds: mpsc::Receiver<FrameStream>,
}

/// Commands to the mesh task.
enum Cmd {
    /// A connection passed the hello both ways.
    Connected {
        hello: Hello,
        conn: quinn::Connection,
        /// What this node dialled, if it dialled.
        dialed: Option<DialTarget>,
    },
    /// A connection ended.
    Closed { node: NodeName, id: usize },
    /// A SWIM datagram arrived.
    Datagram {
        node: NodeName,
        id: usize,
        data: Bytes,
    },
    /// A SWIM timer fired.
    Timer(SwimTimer),
    /// Time to retry the seeds that have not answered.
    RetrySeeds,
    /// A dial ended without a connection.
    DialFailed { target: DialTarget },
    /// `ham nodes`.
    Members {
        reply: oneshot::Sender<Vec<MemberInfo>>,
    },
    /// Leave the cluster and close everything.
    Shutdown { reply: oneshot::Sender<()> },
}

/// What a dial aims at: a seed (name unknown) or a member.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum DialTarget {
    Seed(String),
    Member(NodeName),
}

/// State shared with connectors and handlers: the live connection of each peer.
struct Shared {
    name: NodeName,
    conns: RwLock<HashMap<NodeName, quinn::Connection>>,
    channels: Mutex<HashMap<NodeName, tonic::transport::Channel>>,
    up: RwLock<HashSet<NodeName>>,
}

/// A handle on the running mesh; cheap to clone.
#[derive(Clone)]
pub struct Mesh {
    shared: Arc<Shared>,
    cmd: mpsc::UnboundedSender<Cmd>,
    local_addr: SocketAddr,
}

fn lock_err<T>(e: std::sync::PoisonError<T>) -> T {
    e.into_inner()
}

impl Mesh {
    /// Starts the endpoint and the mesh task. Returns the handle and what other nodes
    /// bring: membership changes, gRPC streams and event feeds.
    pub async fn start(cfg: MeshConfig) -> Result<(Mesh, MeshIncoming), MeshError> {
        let id = TlsIdentity::load(&cfg.identity)?;
        id.check_own_name(&cfg.name)?;
        let server = quinn::crypto::rustls::QuicServerConfig::try_from(id.server_config()?)
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        let client = quinn::crypto::rustls::QuicClientConfig::try_from(id.client_config()?)
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        let transport = Arc::new(transport_config());
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
        server.transport_config(transport.clone());
        let mut client = quinn::ClientConfig::new(Arc::new(client));
        client.transport_config(transport);
        let mut endpoint =
            quinn::Endpoint::server(server, cfg.listen).map_err(|source| MeshError::Bind {
                addr: cfg.listen,
                source,
            })?;
        endpoint.set_default_client_config(client);
        let local_addr = endpoint.local_addr().map_err(|source| MeshError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let advertise = cfg.advertise.clone().unwrap_or_else(|| {
            if local_addr.ip().is_unspecified() {
                format!("{}:{}", host_name(), local_addr.port())
            } else {
                local_addr.to_string()
            }
        });
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1);
        let me = MeshId {
            name: cfg.name.clone(),
            addr: advertise.clone(),
            incarnation,
        };
        let shared = Arc::new(Shared {
            name: cfg.name.clone(),
            conns: RwLock::new(HashMap::new()),
            channels: Mutex::new(HashMap::new()),
            up: RwLock::new(HashSet::new()),
        });
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (grpc_tx, grpc_rx) = mpsc::channel(64);
        let (feeds_tx, feeds_rx) = mpsc::channel(64);
        let hello = Hello {
            version: wire::VERSION,
            name: cfg.name.to_string(),
            advertise,
            incarnation,
        };
        let net = Net {
            endpoint: endpoint.clone(),
            hello: Arc::new(hello),
            cmd: cmd_tx.clone(),
            grpc: grpc_tx,
            feeds: feeds_tx,
            max_datagrams_per_sec: cfg.max_datagrams_per_sec.max(1),
            me: cfg.name.clone(),
        };
        tokio::spawn(accept_loop(net.clone()));
        // A node may list itself among the seeds (one config for all): skip it.
        let seeds = cfg
            .seeds
            .iter()
            .filter(|s| **s != net.hello.advertise && s.parse().ok() != Some(local_addr))
            .map(|s| (s.clone(), SEED_RETRY_MIN))
            .collect();
        let task = MeshTask {
            membership: Membership::new(me, cfg.swim),
            shared: shared.clone(),
            net,
            events: events_tx,
            seeds,
            seed_names: HashMap::new(),
            pending: HashMap::new(),
            dialing: HashMap::new(),
            last_seen: HashMap::new(),
            seed_retry_armed: false,
            former_announced: None,
        };
        tokio::spawn(task.run(cmd_rx));
        let _ = cmd_tx.send(Cmd::RetrySeeds);
        tracing::info!(node = %cfg.name, listen = %local_addr, "mesh started");
        Ok((
            Mesh {
                shared,
                cmd: cmd_tx,
                local_addr,
            },
            MeshIncoming {
                members: events_rx,
                grpc: grpc_rx,
                feeds: feeds_rx,
            },
        ))
    }

    /// This node's name.
    pub fn name(&self) -> &NodeName {
        &self.shared.name
    }

    /// The UDP address the endpoint is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Every member, this node first, for `ham nodes`.
    pub async fn members(&self) -> Vec<MemberInfo> {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Members { reply: tx }).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// True if `node` is this node or a member that is up.
    pub fn is_up(&self, node: &NodeName) -> bool {
        node == &self.shared.name
            || self
                .shared
                .up
                .read()
                .unwrap_or_else(lock_err)
                .contains(node)
    }

    /// This node and every member that is up, sorted by name.
    pub fn live_nodes(&self) -> Vec<NodeName> {
        let mut v: Vec<NodeName> = self
            .shared
            .up
            .read()
            .unwrap_or_else(lock_err)
            .iter()
            .cloned()
            .collect();
        v.push(self.shared.name.clone());
        v.sort();
        v
    }

    /// A gRPC channel to `node`'s control API over the mesh. It connects lazily and
    /// reconnects through whatever connection to `node` is current.
    pub fn channel(&self, node: &NodeName) -> Result<tonic::transport::Channel, MeshError> {
        if !self.is_up(node) || node == &self.shared.name {
            return Err(MeshError::Unreachable(node.clone()));
        }
        let mut channels = self.shared.channels.lock().unwrap_or_else(lock_err);
        if let Some(c) = channels.get(node) {
            return Ok(c.clone());
        }
        let shared = self.shared.clone();
        let target = node.clone();
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let shared = shared.clone();
            let target = target.clone();
            async move {
                let conn = shared
                    .conns
                    .read()
                    .unwrap_or_else(lock_err)
                    .get(&target)
                    .filter(|c| c.close_reason().is_none())
                    .cloned()
                    .ok_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::NotConnected,
                            format!("node {target} is not connected"),
                        )
                    })?;
                let (mut send, recv) = conn.open_bi().await.map_err(std::io::Error::other)?;
                send.write_all(&[wire::TAG_GRPC])
                    .await
                    .map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(MeshStream::new(
                    send, recv, target,
                )))
            }
        });
        let channel = tonic::transport::Endpoint::from_static("http://mesh.invalid")
            .connect_timeout(Duration::from_secs(3))
            .connect_with_connector_lazy(connector);
        channels.insert(node.clone(), channel.clone());
        Ok(channel)
    }

    /// Opens an event feed to `node`: a framed stream that `node` serves with its
    /// events (what the feed asks for is the caller's first frame).
    pub async fn open_feed(&self, node: &NodeName) -> Result<FrameStream, MeshError> {
        let conn = self.connection(node)?;
        let unreachable = |e: &dyn std::fmt::Display| {
            tracing::debug!(peer = %node, "cannot open an event feed: {e}");
            MeshError::Unreachable(node.clone())
        };
        let (mut send, recv) = conn.open_bi().await.map_err(|e| unreachable(&e))?;
        send.write_all(&[wire::TAG_FEED])
            .await
            .map_err(|e| unreachable(&e))?;
        Ok(FrameStream::new(send, recv, conn, node.clone()))
    }

    /// The live connection to `node`, if it is up and connected.
    fn connection(&self, node: &NodeName) -> Result<quinn::Connection, MeshError> {
        if !self.is_up(node) || node == &self.shared.name {
            return Err(MeshError::Unreachable(node.clone()));
        }
        self.shared
            .conns
            .read()
            .unwrap_or_else(lock_err)
            .get(node)
            .filter(|c| c.close_reason().is_none())
            .cloned()
            .ok_or_else(|| MeshError::Unreachable(node.clone()))
    }

    /// Leaves the cluster (the others see this node down at once) and closes the
    /// endpoint.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Shutdown { reply: tx }).is_ok() {
            let _ = tokio::time::timeout(Duration::from_millis(500), rx).await;
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Bounds on what one peer may make this node hold.
fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(64u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window((1u32 << 20).into());
    t.receive_window((8u32 << 20).into());
    t.datagram_receive_buffer_size(Some(256 * 1024));
    t.keep_alive_interval(Some(Duration::from_millis(500)));
    t.ack_frequency_config(Some(ack_frequency()));
    t.max_idle_timeout(Some(
        Duration::from_secs(5)
            .try_into()
            .unwrap_or(quinn::IdleTimeout::from(quinn::VarInt::from_u32(5_000))),
    ));
    t
}

/// How often a peer acknowledges what this node sends (the QUIC ACK frequency
/// extension). By default QUIC acknowledges every other packet at once: with events
/// sent one by one, every other event made the receiving node send an ACK and woke the
/// sender to read it, on the path of the event to its subscriber (~40 µs each, in the
/// scheduler trace of BENCHMARKS.md). A peer now acknowledges after 32 packets, after
/// 5 ms, or at once on a gap (a loss), which is what loss detection needs.
fn ack_frequency() -> quinn::AckFrequencyConfig {
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(31u32.into())
        .max_ack_delay(Some(Duration::from_millis(5)));
    acks
}

/// What the networking tasks share.
#[derive(Clone)]
struct Net {
    endpoint: quinn::Endpoint,
    hello: Arc<Hello>,
    cmd: mpsc::UnboundedSender<Cmd>,
    grpc: mpsc::Sender<MeshStream>,
    feeds: mpsc::Sender<FrameStream>,
    max_datagrams_per_sec: u32,
    me: NodeName,
}

/// Accepts connections: handshake (the CA checks the chain), then the hello.
async fn accept_loop(net: Net) {
    while let Some(incoming) = net.endpoint.accept().await {
        let net = net.clone();
        tokio::spawn(async move {
            let from = incoming.remote_address();
            let result = tokio::time::timeout(HELLO_TIMEOUT, async {
                let conn = incoming
                    .await
                    .map_err(|e| format!("handshake failed: {e}"))?;
                let (mut send, mut recv) = conn
                    .accept_bi()
                    .await
                    .map_err(|e| format!("no hello stream: {e}"))?;
                let hello = match Hello::read(&mut recv).await {
                    Ok(h) => h,
                    Err(e) => {
                        conn.close(close::PROTOCOL.into(), b"bad hello");
                        return Err(e.to_string());
                    }
                };
                check_peer(&net, &conn, &hello)?;
                send.write_all(&net.hello.encode())
                    .await
                    .map_err(|e| format!("cannot answer the hello: {e}"))?;
                let _ = send.finish();
                Ok((conn, hello))
            })
            .await
            .unwrap_or_else(|_| Err("no hello in time".to_string()));
            match result {
                Ok((conn, hello)) => connected(&net, conn, hello, None),
                Err(why) => tracing::warn!(peer = %from, "refused a mesh connection: {why}"),
            }
        });
    }
}

/// The peer's certificate must be for the name in its hello, and not ours.
fn check_peer(net: &Net, conn: &quinn::Connection, hello: &Hello) -> Result<(), String> {
    let name = match NodeName::new(hello.name.clone()) {
        Ok(n) => n,
        Err(e) => {
            conn.close(close::PROTOCOL.into(), b"bad name");
            return Err(e.to_string());
        }
    };
    if name == net.me {
        conn.close(close::IDENTITY.into(), b"same name");
        return Err(format!("peer claims this node's own name {name}"));
    }
    if let Err(e) = verify_peer_name(conn, &name) {
        conn.close(close::IDENTITY.into(), b"certificate not for this name");
        return Err(format!("peer claims to be {name}, but {e}"));
    }
    Ok(())
}

/// Dials `addr`, expecting `expect` (if known); reports the result to the mesh task.
async fn dial(net: Net, target: DialTarget, addr: String) {
    let result = tokio::time::timeout(HELLO_TIMEOUT, async {
        let sockaddr = tokio::net::lookup_host(&addr)
            .await
            .map_err(|e| format!("cannot resolve {addr}: {e}"))?
            .next()
            .ok_or_else(|| format!("{addr} resolves to nothing"))?;
        let conn = net
            .endpoint
            .connect(sockaddr, "ham-mesh")
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?
            .await
            .map_err(|e| format!("handshake with {addr} failed: {e}"))?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| format!("no hello stream to {addr}: {e}"))?;
        send.write_all(&net.hello.encode())
            .await
            .map_err(|e| format!("cannot send the hello to {addr}: {e}"))?;
        let _ = send.finish();
        let hello = Hello::read(&mut recv).await.map_err(|e| {
            conn.close(close::PROTOCOL.into(), b"bad hello");
            format!("{addr}: {e}")
        })?;
        check_peer(&net, &conn, &hello)?;
        if let DialTarget::Member(expected) = &target
            && expected.as_str() != hello.name
        {
            conn.close(close::IDENTITY.into(), b"unexpected name");
            return Err(format!("{addr} is {}, not {expected}", hello.name));
        }
        Ok((conn, hello))
    })
    .await
    .unwrap_or_else(|_| Err(format!("{addr}: no answer in time")));
    match result {
        Ok((conn, hello)) => connected(&net, conn, hello, Some(target)),
        Err(why) => {
            tracing::debug!("dial failed: {why}");
            let _ = net.cmd.send(Cmd::DialFailed { target });
        }
    }
}

/// A connection passed the hello: start its readers and tell the mesh task.
fn connected(net: &Net, conn: quinn::Connection, mut hello: Hello, dialed: Option<DialTarget>) {
    // A node listening on every interface advertises `0.0.0.0:port`: use the address
    // it was seen from instead.
    if let Ok(sa) = hello.advertise.parse::<SocketAddr>()
        && sa.ip().is_unspecified()
    {
        hello.advertise = SocketAddr::new(conn.remote_address().ip(), sa.port()).to_string();
    }
    let Ok(name) = NodeName::new(hello.name.clone()) else {
        return;
    };
    tokio::spawn(read_datagrams(net.clone(), conn.clone(), name.clone()));
    tokio::spawn(accept_streams(net.clone(), conn.clone(), name));
    let _ = net.cmd.send(Cmd::Connected {
        hello,
        conn,
        dialed,
    });
}

/// Reads SWIM datagrams, within the peer's rate limit.
async fn read_datagrams(net: Net, conn: quinn::Connection, node: NodeName) {
    let id = conn.stable_id();
    let mut window = Instant::now();
    let mut count = 0u32;
    let why = loop {
        match conn.read_datagram().await {
            Ok(data) => {
                if window.elapsed() >= Duration::from_secs(1) {
                    window = Instant::now();
                    count = 0;
                }
                count += 1;
                if count > net.max_datagrams_per_sec {
                    conn.close(close::RATE.into(), b"datagram rate exceeded");
                    tracing::warn!(peer = %node, "cut off: more than {} datagrams/s", net.max_datagrams_per_sec);
                    break "rate limit".to_string();
                }
                let _ = net.cmd.send(Cmd::Datagram {
                    node: node.clone(),
                    id,
                    data,
                });
            }
            Err(e) => break e.to_string(),
        }
    };
    tracing::debug!(peer = %node, "connection closed: {why}");
    let _ = net.cmd.send(Cmd::Closed { node, id });
}

/// Accepts the peer's streams: each must start with a known tag.
async fn accept_streams(net: Net, conn: quinn::Connection, node: NodeName) {
    while let Ok((send, mut recv)) = conn.accept_bi().await {
        let net = net.clone();
        let conn = conn.clone();
        let node = node.clone();
        tokio::spawn(async move {
            let mut tag = [0u8; 1];
            match tokio::time::timeout(TAG_TIMEOUT, recv.read_exact(&mut tag)).await {
                Ok(Ok(())) if tag[0] == wire::TAG_GRPC => {
                    let _ = net.grpc.send(MeshStream::new(send, recv, node)).await;
                }
                Ok(Ok(())) if tag[0] == wire::TAG_FEED => {
                    let stream = FrameStream::new(send, recv, conn, node);
                    let _ = net.feeds.send(stream).await;
                }
                Ok(Ok(())) => {
                    tracing::warn!(peer = %node, "cut off: unknown stream tag {:#04x}", tag[0]);
                    conn.close(close::PROTOCOL.into(), b"unknown stream tag");
                }
                _ => {}
            }
        });
    }
}

/// The task that owns the membership.
struct MeshTask {
    membership: Membership,
    shared: Arc<Shared>,
    net: Net,
    events: mpsc::UnboundedSender<MeshEvent>,
    /// Seed addresses not yet answered, with their next backoff.
    seeds: HashMap<String, Duration>,
    /// Seeds that answered, by address.
    seed_names: HashMap<String, NodeName>,
    /// Datagrams waiting for a connection, by member.
    pending: HashMap<NodeName, VecDeque<Bytes>>,
    /// Dials under way or recently failed, by target, with when they started.
    dialing: HashMap<DialTarget, Instant>,
    last_seen: HashMap<NodeName, Instant>,
    seed_retry_armed: bool,
    /// When a node alone last announced itself to its former members.
    former_announced: Option<Instant>,
}

impl MeshTask {
    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        while let Some(cmd) = cmds.recv().await {
            match cmd {
                Cmd::Connected {
                    hello,
                    conn,
                    dialed,
                } => self.on_connected(hello, conn, dialed),
                Cmd::Closed { node, id } => {
                    let mut conns = self.shared.conns.write().unwrap_or_else(lock_err);
                    if conns.get(&node).is_some_and(|c| c.stable_id() == id) {
                        conns.remove(&node);
                    }
                }
                Cmd::Datagram { node, id, data } => {
                    self.last_seen.insert(node.clone(), Instant::now());
                    match self.membership.handle_data(&data) {
                        Ok(fx) => self.apply(fx),
                        Err(e) if e.is_malformed() => {
                            tracing::warn!(peer = %node, "cut off: malformed SWIM datagram: {e}");
                            self.close_conn(&node, id, close::PROTOCOL, b"malformed datagram");
                        }
                        Err(e) => tracing::trace!(peer = %node, "SWIM ignored a datagram: {e}"),
                    }
                }
                Cmd::Timer(t) => match self.membership.handle_timer(t) {
                    Ok(fx) => self.apply(fx),
                    Err(e) => tracing::trace!("SWIM timer: {e}"),
                },
                Cmd::RetrySeeds => {
                    self.seed_retry_armed = false;
                    self.retry_seeds();
                }
                Cmd::DialFailed { target } => {
                    if let DialTarget::Member(n) = &target {
                        self.pending.remove(n);
                    }
                    if let DialTarget::Seed(_) = &target {
                        self.arm_seed_retry();
                    }
                }
                Cmd::Members { reply } => {
                    let _ = reply.send(self.member_infos());
                }
                Cmd::Shutdown { reply } => {
                    let fx = self.membership.leave();
                    self.apply(fx);
                    // Give the goodbye datagrams a moment to leave.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    self.net.endpoint.close(close::SHUTDOWN.into(), b"shutdown");
                    let _ = reply.send(());
                    return;
                }
            }
        }
    }

    fn close_conn(&self, node: &NodeName, id: usize, code: u32, why: &[u8]) {
        let mut conns = self.shared.conns.write().unwrap_or_else(lock_err);
        if let Some(c) = conns.get(node).filter(|c| c.stable_id() == id) {
            c.close(code.into(), why);
            conns.remove(node);
        }
    }

    fn on_connected(&mut self, hello: Hello, conn: quinn::Connection, dialed: Option<DialTarget>) {
        let Ok(name) = NodeName::new(hello.name.clone()) else {
            return;
        };
        tracing::debug!(peer = %name, addr = %hello.advertise, "mesh connection up");
        self.last_seen.insert(name.clone(), Instant::now());
        self.dialing.remove(&DialTarget::Member(name.clone()));
        // The newest connection carries what this node sends; older ones keep
        // delivering until they close.
        self.shared
            .conns
            .write()
            .unwrap_or_else(lock_err)
            .insert(name.clone(), conn.clone());
        if let Some(queue) = self.pending.remove(&name) {
            for d in queue {
                let _ = conn.send_datagram(d);
            }
        }
        // A seed that answered, or a node SWIM does not know yet: announce ourselves.
        if let Some(DialTarget::Seed(addr)) = &dialed {
            self.dialing.remove(&DialTarget::Seed(addr.clone()));
            self.seeds.remove(addr);
            self.seed_names.insert(addr.clone(), name.clone());
        }
        if matches!(dialed, Some(DialTarget::Seed(_))) || self.membership.state_of(&name).is_none()
        {
            let id = MeshId {
                name,
                addr: hello.advertise,
                incarnation: hello.incarnation,
            };
            match self.membership.announce(id) {
                Ok(fx) => self.apply(fx),
                Err(e) => tracing::debug!("announce: {e}"),
            }
        }
    }

    fn retry_seeds(&mut self) {
        // Once the node has members, seeds only matter again if it loses them all.
        let alone = self
            .membership
            .members()
            .all(|(_, s)| s == MemberState::Down);
        if !alone {
            self.arm_seed_retry();
            return;
        }
        // Alone, SWIM starts afresh and knows no one: announce to every member seen
        // before (once a second), as well as to the seeds.
        let due = self
            .former_announced
            .is_none_or(|t| t.elapsed() >= FORMER_ANNOUNCE_PERIOD);
        let former: Vec<MeshId> = if due {
            self.former_announced = Some(Instant::now());
            self.membership.down_members().cloned().collect()
        } else {
            Vec::new()
        };
        for id in former {
            match self.membership.announce(id) {
                Ok(fx) => self.apply(fx),
                Err(e) => tracing::debug!("announce: {e}"),
            }
        }
        if self.seeds.is_empty() {
            for (addr, _) in self.seed_names.drain() {
                self.seeds.insert(addr, SEED_RETRY_MIN);
            }
        }
        let seeds: Vec<(String, Duration)> =
            self.seeds.iter().map(|(a, d)| (a.clone(), *d)).collect();
        for (addr, backoff) in seeds {
            let target = DialTarget::Seed(addr.clone());
            if self
                .dialing
                .get(&target)
                .is_some_and(|t| t.elapsed() < backoff)
            {
                continue;
            }
            self.seeds
                .insert(addr.clone(), (backoff * 2).min(SEED_RETRY_MAX));
            self.dialing.insert(target.clone(), Instant::now());
            tokio::spawn(dial(self.net.clone(), target, addr));
        }
        self.arm_seed_retry();
    }

    fn arm_seed_retry(&mut self) {
        if self.seed_retry_armed {
            return;
        }
        self.seed_retry_armed = true;
        let tx = self.net.cmd.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SEED_RETRY_MIN).await;
            let _ = tx.send(Cmd::RetrySeeds);
        });
    }

    /// Carries out SWIM's effects.
    fn apply(&mut self, fx: Effects) {
        for (to, data) in fx.send {
            self.send(to, data);
        }
        for (after, t) in fx.timers {
            let tx = self.net.cmd.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = tx.send(Cmd::Timer(t));
            });
        }
        if !fx.changes.is_empty() {
            let mut up = self.shared.up.write().unwrap_or_else(lock_err);
            for (id, state) in &fx.changes {
                if *state == MemberState::Down {
                    up.remove(&id.name);
                } else {
                    up.insert(id.name.clone());
                }
            }
        }
        for (id, state) in fx.changes {
            tracing::info!(node = %id.name, addr = %id.addr, "member {}", state.as_str());
            let _ = self.events.send(MeshEvent {
                node: id.name,
                state,
                addr: id.addr,
            });
        }
    }

    /// Sends a datagram to a member, connecting first if need be.
    fn send(&mut self, to: MeshId, data: Bytes) {
        let conn = self
            .shared
            .conns
            .read()
            .unwrap_or_else(lock_err)
            .get(&to.name)
            .filter(|c| c.close_reason().is_none())
            .cloned();
        if let Some(c) = conn {
            if let Err(e) = c.send_datagram(data) {
                tracing::debug!(peer = %to.name, "datagram not sent: {e}");
            }
            return;
        }
        let q = self.pending.entry(to.name.clone()).or_default();
        if q.len() < PENDING_PER_PEER {
            q.push_back(data);
        }
        let target = DialTarget::Member(to.name.clone());
        if self
            .dialing
            .get(&target)
            .is_some_and(|t| t.elapsed() < REDIAL_MIN)
        {
            return;
        }
        self.dialing.insert(target.clone(), Instant::now());
        tokio::spawn(dial(self.net.clone(), target, to.addr));
    }

    fn member_infos(&self) -> Vec<MemberInfo> {
        let conns = self.shared.conns.read().unwrap_or_else(lock_err);
        let mut out = vec![MemberInfo {
            name: self.shared.name.clone(),
            state: MemberState::Up,
            addr: self.membership.me().addr.clone(),
            rtt: None,
            last_contact: None,
            is_self: true,
        }];
        for (id, state) in self.membership.members() {
            out.push(MemberInfo {
                name: id.name.clone(),
                state,
                addr: id.addr.clone(),
                rtt: conns
                    .get(&id.name)
                    .filter(|c| c.close_reason().is_none() && state != MemberState::Down)
                    .map(|c| c.rtt()),
                last_contact: self.last_seen.get(&id.name).map(|t| t.elapsed()),
                is_self: false,
            });
        }
        out
    }
}
