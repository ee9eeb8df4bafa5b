//! `hamd`: the ham daemon. Runs in the foreground (systemd-friendly), keeps its state
//! in shared memory, and serves the control API on a Unix socket.

mod cluster;
mod control_socket;
mod convert;
mod cursor;
mod fanout;
mod feed;
mod forward;
mod heap;
mod node;
mod pair;
mod process;
mod raise_stream;
mod remote;
mod remote_watch;
mod service;
mod singleton;
mod time;
mod warm;
mod watch;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use node::{Msg, Node, NodePaths};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tracing_subscriber::{EnvFilter, prelude::*, reload};

/// The ham daemon: a HAM monitoring entities and running their recovery.
#[derive(Parser, Debug)]
#[command(name = "hamd", version, about)]
struct Args {
    /// The control socket.
    #[arg(long, env = "HAM_SOCKET")]
    socket: Option<PathBuf>,
    /// A TOML config with [node] settings and [[entity]] declarations.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This node's name (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// The shared-memory state file (default: /dev/shm/ham-NAME.state).
    #[arg(long)]
    state: Option<PathBuf>,
    /// How many entities the state store holds (used when the store is created).
    #[arg(long)]
    capacity: Option<u32>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter (overridden by RUST_LOG), e.g. info, debug, hamd=debug. Release
    /// builds carry no trace-level messages.
    #[arg(long, default_value = "info")]
    log: String,
    /// Delete the state store first and start fresh from the config.
    #[arg(long)]
    discard_state: bool,
    /// Mesh settings.
    #[command(flatten)]
    mesh: cluster::MeshFlags,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

type FilterHandle = reload::Handle<EnvFilter, tracing_subscriber::Registry>;

fn init_logging(args: &Args) -> FilterHandle {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&args.log));
    let (filter, handle) = reload::Layer::new(filter);
    // Colours only on a terminal: journald, docker logs and files get plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour);
    let registry = tracing_subscriber::registry().with(filter);
    match args.log_format {
        LogFormat::Text => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.json()).init(),
    }
    handle
}

fn host_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// Binds the control socket with mode 0660, replacing a stale socket file but never
/// one another live `hamd` answers on.
fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("another hamd is listening on {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// Tells systemd we are ready, if it asked (`Type=notify`).
fn notify_ready() {
    use std::os::linux::net::SocketAddrExt;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name),
        None => std::os::unix::net::SocketAddr::from_pathname(&path),
    };
    if let Ok(addr) = addr {
        let _ = sock.send_to_addr(b"READY=1", &addr);
    }
}

/// Raises the soft limit on open files to the hard one: hamd holds a pidfd per
/// watched process, so thousands of entities need thousands of descriptors.
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        lim.current = lim.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            tracing::warn!("cannot raise the open-file limit: {e}");
        }
    }
}

fn main() {
    guardian::shm::resident::fix_heap_thresholds();
    let args = Args::parse();
    let filter = init_logging(&args);
    raise_fd_limit();
    let result = match std::env::var_os(guardian::pair::GUARDIAN_ENV) {
        Some(pair) => run_guardian(args, filter, PathBuf::from(pair)),
        None => runtime().and_then(|rt| rt.block_on(run(args, filter, None))),
    };
    if let Err(e) = result {
        eprintln!("hamd: {e:#}");
        std::process::exit(1);
    }
}

/// The runtime a HAM runs on: one thread.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // A blocking-pool thread left idling makes the HAM multithreaded when it is
        // killed, and the kernel then searches every child for a new owner of the
        // address space (milliseconds with 10,000 entities) before the Guardian can
        // take over: idle threads go quickly.
        .thread_keep_alive(std::time::Duration::from_millis(100))
        .build()?)
}

/// What a Guardian brings to its takeover.
struct Takeover {
    /// The control socket's listener, received from the HAM.
    listener: std::os::fd::OwnedFd,
    /// The HAM that died.
    ham_pid: i32,
    /// When its death was noticed.
    noticed: std::time::Instant,
    /// The pidfds the HAM handed over, by entity slot.
    handed: std::collections::HashMap<u32, guardian::pair::HandedProcess>,
    /// The epoll set holding all of them, registered with the runtime.
    watch_set: Option<watch::WatchSet>,
    /// The dead HAM's own watch set, closed once the takeover is done.
    dead_ham_watch_set: Option<std::os::fd::OwnedFd>,
    /// The store, read, with its pair lock held by this (the main) thread.
    store: Option<(
        guardian::shm::Store,
        guardian::shm::Recovered,
        guardian::shm::pair_lock::PairLock,
    )>,
    /// The thread that takes the store's `flock` once the dead HAM's files close.
    flock: Option<
        std::thread::JoinHandle<Result<guardian::shm::LockedStore, guardian::shm::StoreError>>,
    >,
    /// How long after `noticed` the store was read.
    store_ready: std::time::Duration,
    /// The records the Guardian decoded while it waited.
    warm: Option<warm::Warm>,
}

/// How long after start (or takeover) a process gives back the pages it mapped only to
/// start (see [`release_start_up_pages`]).
const RELEASE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Gives back the code and constant pages mapped only while starting
/// (`guardian::shm::resident`): a daemon's resident set then shows what it runs.
/// The free heap goes back on its own schedule (`heap::HeapTrim`).
fn release_start_up_pages(role: &str) {
    match guardian::shm::resident::release_file_pages() {
        Ok(r) => tracing::debug!(
            role,
            mappings = r.mappings,
            kib = r.kib,
            "start-up pages given back"
        ),
        Err(e) => tracing::debug!(role, "cannot give back start-up pages: {e}"),
    }
}

/// How often a waiting Guardian catches up with the HAM's committed state.
const WARM_REFRESH: std::time::Duration = std::time::Duration::from_millis(250);

/// The Guardian: waits (its runtime made but idle) until its HAM asks it to stop or
/// dies; then becomes the HAM.
fn run_guardian(args: Args, filter: FilterHandle, pair: PathBuf) -> anyhow::Result<()> {
    let mut end = guardian::pair::GuardianEnd::connect(&pair)
        .with_context(|| format!("the Guardian cannot reach its HAM at {}", pair.display()))?;
    tracing::debug!(ham = end.hello.ham_pid, "Guardian ready");
    // The runtime this Guardian will run on as the HAM, made now only so that its watch
    // set is registered with it while still empty (see `watch::register`); it does not
    // run before the takeover.
    let rt = runtime()?;
    let watch_set = {
        let _in = rt.enter();
        watch::register(end.watch_set().try_clone_to_owned()?)?
    };
    // The store's lock is the surest and earliest sign of the HAM's death: a thread
    // waits for it from the start, and the kernel grants it the moment the dying HAM's
    // store descriptor closes (its first, before thousands of pidfds).
    let state = settings(&args, None)?.paths.state;
    // A warm copy of the HAM's state, decoded beside the wait (a HAM dying meanwhile
    // must not wait for it: the takeover then reads the store cold) and kept current
    // while waiting, so a takeover decodes only what changed since the last look.
    let abandon = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut warming = Some(std::thread::spawn({
        let (state, abandon) = (state.clone(), abandon.clone());
        move || warm::Warm::open(&state, &abandon)
    }));
    let mut warm: Option<warm::Warm> = None;
    let (started, mut released) = (std::time::Instant::now(), false);
    let (mut heap, mut refreshing) = (heap::HeapTrim::default(), true);
    let granted = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?;
    let signal = granted.try_clone()?;
    // The earliest sign of all is the pair lock, which the HAM's main thread holds for
    // life: the kernel hands it over as the first step of that thread's death, before
    // the dying HAM unmaps its memory (tens of milliseconds when something else holds
    // a shared library's mapping lock) and closes its files (which frees the flock).
    // Mapped now, locked by this thread at the takeover (not a step on its path).
    let pair_lock = guardian::shm::pair_lock::PairLock::open(&state)?;
    let pair_signal = granted.try_clone()?;
    let pair_path = state.clone();
    std::thread::spawn(move || {
        let waited = guardian::shm::pair_lock::PairLock::open(&pair_path)
            .map_err(std::io::Error::other)
            .and_then(|lock| lock.lock().and_then(|_| lock.unlock()));
        match waited {
            Ok(()) => {
                let _ = rustix::io::write(&pair_signal, &1u64.to_ne_bytes());
            }
            Err(e) => tracing::warn!("the Guardian cannot wait on the pair lock: {e}"),
        }
    });
    let lock_path = state.clone();
    let locker = std::thread::spawn(move || {
        let locked = guardian::shm::Store::wait_lock(&lock_path);
        // Only a granted lock is a sign of death; a failure to wait is not.
        if locked.is_ok() {
            let _ = rustix::io::write(&signal, &1u64.to_ne_bytes());
        }
        locked
    });
    loop {
        let period = (warming.is_some() || warm.is_some()).then_some(WARM_REFRESH);
        match end.wait(Some(std::os::fd::AsFd::as_fd(&granted)), period) {
            guardian::pair::Wake::Idle => {
                if warming.as_ref().is_some_and(|t| t.is_finished()) {
                    match warming.take().map(std::thread::JoinHandle::join) {
                        Some(Ok(Ok(w))) => warm = Some(w),
                        Some(Ok(Err(e))) => {
                            tracing::warn!("the Guardian keeps no warm copy of the state: {e}")
                        }
                        _ => tracing::warn!("the Guardian's warm copy failed"),
                    }
                }
                if let Some(w) = warm.as_mut() {
                    // Once the HAM's burst of changes is read, its garbage goes back.
                    let changed = w.refresh();
                    if std::mem::replace(&mut refreshing, changed > 0) && changed == 0 {
                        heap.look();
                    }
                }
                if !released && started.elapsed() >= RELEASE_AFTER && warming.is_none() {
                    released = true;
                    release_start_up_pages("Guardian");
                }
            }
            guardian::pair::Wake::Stop => {
                tracing::debug!("Guardian stopping at the HAM's request");
                // The locker thread still waits for the lock: exiting ends it.
                std::process::exit(0);
            }
            guardian::pair::Wake::HamDied => {
                let noticed = std::time::Instant::now();
                // A copy still being made is of no use now.
                abandon.store(true, std::sync::atomic::Ordering::Relaxed);
                let ham_pid = end.hello.ham_pid;
                tracing::warn!("the HAM (pid {ham_pid}) died: the Guardian takes over");
                // Held by this thread from now on (the waiter only passed through it);
                // the dead HAM's flock follows when its files close.
                pair_lock.lock()?;
                let locked = guardian::shm::Store::claim(&state)?;
                let known = |slot, key| warm.as_ref().is_some_and(|w| w.knows(slot, key));
                let (store, recovered) = guardian::shm::Store::open_known(locked, &known)?;
                let store = (store, recovered, pair_lock);
                tracing::debug!(
                    warm = warm.as_ref().map_or(0, warm::Warm::len),
                    unchanged = store.1.unchanged.len(),
                    read = store.1.entities.len(),
                    "store read under the lock"
                );
                let store_ready = noticed.elapsed();
                let kit = end.into_takeover();
                let takeover = Takeover {
                    store_ready,
                    // The same epoll set, already registered (`kit.watch_set` closes).
                    watch_set: Some(watch_set),
                    dead_ham_watch_set: kit.dead_ham_watch_set,
                    listener: kit.control_listener,
                    ham_pid,
                    noticed,
                    handed: kit.handed,
                    store: Some(store),
                    flock: Some(locker),
                    warm,
                };
                drop(kit.watch_set);
                return rt.block_on(run(args, filter, Some(takeover)));
            }
        }
    }
}

/// The settings a node runs with, resolved from flags, config and defaults.
struct Settings {
    name: String,
    socket: PathBuf,
    paths: NodePaths,
    capacity: u32,
    mesh: Option<cluster::MeshFlags>,
}

fn settings(args: &Args, cfg: Option<&ham_core::config::Config>) -> anyhow::Result<Settings> {
    let node = cfg.map(|c| c.node.clone()).unwrap_or_default();
    let name = args.name.clone().or(node.name).unwrap_or_else(host_name);
    ham_core::engine::check_name("node", &name)?;
    let socket = args
        .socket
        .clone()
        .or(node.socket.map(PathBuf::from))
        .unwrap_or_else(ham_proto::defaults::socket_path);
    let state = args
        .state
        .clone()
        .or(node.state.map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(format!("/dev/shm/ham-{name}.state")));
    let beats = PathBuf::from(format!(
        "{}.beats",
        state.display().to_string().trim_end_matches(".state")
    ));
    let mesh = args.mesh.resolve(cfg.map(|c| &c.mesh))?;
    if mesh.is_some() {
        ham_overlay::NodeName::new(name.clone())
            .context("a mesh node's name must be a DNS label (set --name)")?;
    }
    Ok(Settings {
        mesh,
        name,
        capacity: args.capacity.or(node.capacity).unwrap_or(16_384),
        paths: NodePaths {
            state,
            beats,
            socket: socket.clone(),
        },
        socket,
    })
}

/// How to start this node's Guardian: the same executable and resolved settings.
fn guardian_command(args: &Args, s: &Settings) -> anyhow::Result<pair::GuardianCommand> {
    let mut a = vec![
        "--socket".to_string(),
        s.socket.display().to_string(),
        "--state".into(),
        s.paths.state.display().to_string(),
        "--name".into(),
        s.name.clone(),
        "--capacity".into(),
        s.capacity.to_string(),
        "--log".into(),
        args.log.clone(),
        "--log-format".into(),
        match args.log_format {
            LogFormat::Text => "text".into(),
            LogFormat::Json => "json".into(),
        },
    ];
    if let Some(c) = &args.config {
        a.push("--config".into());
        a.push(c.display().to_string());
    }
    if let Some(m) = &s.mesh {
        a.extend(m.to_args());
    }
    Ok(pair::GuardianCommand {
        exe: std::env::current_exe().context("cannot find the hamd executable")?,
        args: a,
    })
}

async fn run(
    args: Args,
    filter: FilterHandle,
    mut takeover: Option<Takeover>,
) -> anyhow::Result<()> {
    // Read the config first: a bad config must change nothing, not even the store.
    // A takeover has its settings as flags and continues the state as it is.
    let cfg = match (&args.config, &takeover) {
        (Some(path), None) => Some(service::read_config(path).map_err(anyhow::Error::msg)?),
        _ => None,
    };
    let s = settings(&args, cfg.as_ref())?;
    let name = s.name.clone();
    // The config's entities, as the request that applies them; the parsed config is
    // not kept (with 10,000 entities it is megabytes).
    let apply_config = match (&args.config, cfg) {
        (Some(path), Some(cfg)) => {
            Some(service::config_request(path, cfg).map_err(anyhow::Error::msg)?)
        }
        _ => None,
    };

    let listener = match &takeover {
        Some(t) => {
            let std_listener = std::os::unix::net::UnixListener::from(t.listener.try_clone()?);
            std_listener.set_nonblocking(true)?;
            UnixListener::from_std(std_listener)?
        }
        None => {
            if args.discard_state {
                for p in [&s.paths.state, &s.paths.beats] {
                    match std::fs::remove_file(p) {
                        Ok(()) => tracing::warn!("discarded {}", p.display()),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e).context(format!("cannot remove {}", p.display())),
                    }
                }
            }
            bind_socket(&s.socket)?
        }
    };
    let control_dup = std::os::fd::AsFd::as_fd(&listener).try_clone_to_owned()?;

    let handed = takeover
        .as_mut()
        .map(|t| (std::mem::take(&mut t.handed), t.watch_set.take()))
        .unwrap_or_default();
    let store = takeover.as_mut().and_then(|t| t.store.take());
    let warm = takeover.as_mut().and_then(|t| t.warm.take());
    let dead_ham_watch_set = takeover.as_mut().and_then(|t| t.dead_ham_watch_set.take());
    let flock = takeover.as_mut().and_then(|t| t.flock.take());
    let opening = std::time::Instant::now();
    let opened = Node::open(
        name.clone(),
        s.paths.clone(),
        s.capacity,
        store,
        warm,
        handed,
    )?;
    let mut node = opened.node;
    if let Some(t) = &takeover {
        let note = format!(
            "took over from HAM pid {} with {} entities",
            t.ham_pid, opened.adopted
        );
        let resuming = std::time::Instant::now();
        node.resume(ham_core::Resume::Takeover, &note);
        node.takeover_done(t.noticed);
        tracing::warn!(
            node = %name,
            store_us = t.store_ready.as_micros() as u64,
            open_us = (resuming - opening).as_micros() as u64,
            resume_us = resuming.elapsed().as_micros() as u64,
            "{note} in {} µs",
            t.noticed.elapsed().as_micros()
        );
    } else if opened.created {
        tracing::info!(node = %name, state = %s.paths.state.display(), "created a new state store");
    } else {
        let note = format!(
            "adopted {} entities from {}",
            opened.adopted,
            s.paths.state.display()
        );
        node.resume(ham_core::Resume::Adopted, &note);
        tracing::info!(node = %name, "{note}");
    }
    // A takeover continues the state as it was; only a start applies the config.
    if let (Some(path), Some(req)) = (&args.config, apply_config) {
        node.request(req)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    // The Guardian is started by the node loop, so a takeover answers requests first.
    // After a takeover, not before this HAM holds the store's flock: a new Guardian
    // waiting for the flock beside this HAM's own waiter could be granted it when the
    // dead HAM's files close, and take a live HAM for dead (seen at 10,000 entities,
    // whose pidfds take the dying HAM a while to close).
    node.start_pair(
        &s.socket,
        control_dup,
        guardian_command(&args, &s)?,
        flock.is_none(),
    )?;
    if takeover.is_some() {
        let launch_guardian = node.guardian_launcher();
        // Closing the dead HAM's watch set unregisters every pidfd in it: kernel work
        // done beside the loop rather than in the dying HAM during the takeover. The
        // same thread waits for the dead HAM's flock first, keeps it, then has the
        // first Guardian launched.
        let retire = std::thread::Builder::new().name("ham-retire".into());
        let retired = retire.spawn(move || {
            // Cleanup: it yields the CPUs to the new HAM's first answers (the calling
            // thread alone is reniced: `None` is the caller, a thread on Linux).
            let _ = rustix::process::setpriority_process(None, 19);
            match flock.map(std::thread::JoinHandle::join) {
                Some(Ok(Ok(locked))) => locked.hold_for_life(),
                Some(Ok(Err(e))) => tracing::warn!("the store's flock: {e}"),
                Some(Err(_)) => tracing::warn!("the store's flock thread panicked"),
                None => {}
            }
            launch_guardian();
            drop(dead_ham_watch_set);
        });
        if retired.is_err() {
            tracing::warn!("cannot start the thread that retires the dead HAM's resources");
        }
    }

    // The mesh starts before serving, so that the first answers can already reach
    // other nodes; its task runs beside the node loop.
    let singleton_hints = Arc::new(singleton::Hints::default());
    let mesh = match &s.mesh {
        Some(m) => {
            let (mesh, incoming) = cluster::start(m.config(&name)?).await?;
            node.set_mesh(mesh.clone(), singleton_hints.clone());
            Some((mesh, incoming))
        }
        None => None,
    };
    let (tx, rx) = mpsc::channel::<Msg>(1024);
    let verbose: service::VerboseHook = Arc::new(move |level: &str| {
        let f = EnvFilter::try_new(level).map_err(|e| format!("bad log level {level:?}: {e}"))?;
        filter.reload(f).map_err(|e| e.to_string())
    });
    let svc = service::HamService::new(
        name.clone(),
        tx.clone(),
        args.config.clone(),
        s.paths.beats.clone(),
        verbose,
    );
    let svc = svc.with_mesh(mesh.as_ref().map(|(m, _)| m.clone()));
    let forward = forward::ForwardLayer {
        me: name.clone(),
        mesh: mesh.as_ref().map(|(m, _)| m.clone()),
    };
    let mesh_handle = mesh.as_ref().map(|(m, _)| m.clone());
    if let Some((mesh, incoming)) = mesh {
        cluster::forward_members(incoming.members, tx.clone());
        feed::serve(incoming.feeds, svc.clone());
        singleton::spawn(name.clone(), mesh.clone(), tx.clone(), singleton_hints);
        remote_watch::spawn(mesh, tx.clone());
        // Other nodes call this node's API over mesh streams: the same service.
        let incoming =
            tokio_stream::wrappers::ReceiverStream::new(incoming.grpc).map(Ok::<_, std::io::Error>);
        let server = tonic::transport::Server::builder()
            .layer(forward.clone())
            .add_service(ham_proto::ham_server::HamServer::new(svc.clone()))
            .serve_with_incoming(incoming);
        tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!("the mesh API stopped: {e}");
            }
        });
    }
    let node_task = tokio::spawn(node.run(rx));

    // SIGTERM and SIGINT stop hamd the way `ham stop` does: entities keep running.
    let signal_tx = tx.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let (reply, _rx) = oneshot::channel();
        let _ = signal_tx
            .send(Msg::Shutdown {
                kill_entities: false,
                reply,
            })
            .await;
    });

    tracing::info!(node = %name, socket = %s.socket.display(), "hamd is serving");
    notify_ready();
    tokio::spawn(async {
        tokio::time::sleep(RELEASE_AFTER).await;
        release_start_up_pages("HAM");
    });
    // Event feeds are served apart; gRPC connections come out of `incoming`, registered
    // for readable edges only (see `ham_proto::socket`).
    let incoming = control_socket::accept(listener, svc.clone());
    let (stopped_tx, stopped_rx) = oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .layer(forward)
        .add_service(ham_proto::ham_server::HamServer::new(svc))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = node_task.await;
            let _ = stopped_tx.send(());
        });
    // Once the node has stopped, clients get a moment to finish, not forever: an idle
    // client connection must not keep hamd alive.
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r?,
        _ = async {
            let _ = stopped_rx.await;
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        } => tracing::debug!("closing the connections still open"),
    }
    if let Some(m) = mesh_handle {
        m.shutdown().await;
    }
    let _ = std::fs::remove_file(&s.socket);
    tracing::info!("hamd stopped");
    Ok(())
}
