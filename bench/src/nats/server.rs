//! `nats-server` processes under test: two servers clustered with routes, one per
//! loopback address, killed and reaped on drop.

use super::client::Conn;
use super::tap::NatsTap;
use crate::net::{free_port, host};
use crate::sys::Scratch;
use anyhow::{Context, bail};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One running `nats-server`.
pub struct NatsServer {
    child: Child,
    /// Where clients connect.
    pub addr: SocketAddr,
    log: PathBuf,
}

impl NatsServer {
    /// Starts `bin` named `name` for clients on `host:port`, for routes on
    /// `host:cluster_port`, with routes to `routes`; returns once it accepts clients.
    pub fn start(
        bin: &Path,
        dir: &Scratch,
        name: &str,
        host: Ipv4Addr,
        port: u16,
        cluster_port: u16,
        routes: &[SocketAddr],
    ) -> anyhow::Result<NatsServer> {
        let log = dir.join(&format!("{name}.log"));
        let log_file = std::fs::File::create(&log)?;
        let routes: Vec<String> = routes.iter().map(|r| format!("nats://{r}")).collect();
        let child = Command::new(bin)
            .args(["--name", name, "--addr", &host.to_string()])
            .args(["--port", &port.to_string()])
            .args(["--cluster_name", "ham-bench"])
            .args(["--cluster", &format!("nats://{host}:{cluster_port}")])
            .args(["--routes", &routes.join(",")])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut s = NatsServer {
            child,
            addr: SocketAddr::from((host, port)),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Conn::connect(s.addr).is_err() {
            if let Ok(Some(status)) = s.child.try_wait() {
                bail!(
                    "nats-server {name} exited at start ({status}): {}",
                    std::fs::read_to_string(&s.log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("nats-server {name} did not accept clients within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(s)
    }
}

impl NatsServer {
    /// Its PID.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two servers clustered with routes: `a` on 127.0.0.2 and `b` on 127.0.0.3.
pub struct NatsPair {
    /// The server on 127.0.0.2.
    pub a: NatsServer,
    /// The server on 127.0.0.3.
    pub b: NatsServer,
}

impl NatsPair {
    /// Starts both (each routed to the other) in `dir`.
    pub fn start(bin: &Path, dir: &Scratch) -> anyhow::Result<NatsPair> {
        let hosts = [host(0), host(1)];
        let port = free_port(&hosts)?;
        let cport = free_port(&hosts)?;
        let route = |i: usize| SocketAddr::from((hosts[i], cport));
        let id = std::process::id();
        let a = NatsServer::start(
            bin,
            dir,
            &format!("a{id}"),
            hosts[0],
            port,
            cport,
            &[route(1)],
        )?;
        let b = NatsServer::start(
            bin,
            dir,
            &format!("b{id}"),
            hosts[1],
            port,
            cport,
            &[route(0)],
        )?;
        Ok(NatsPair { a, b })
    }

    /// Waits until a message published on `b` to `subject` reaches `tap` (subscribed
    /// on `a`): the route is up and the subscription has spread to `b`. The probes'
    /// payload is `probe`; those that arrive are drained.
    pub fn wait_routed(&self, tap: &NatsTap, subject: &str) -> anyhow::Result<()> {
        let mut publisher = Conn::connect(self.b.addr)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            publisher.publish(subject, b"probe")?;
            publisher.flush()?;
            if tap.recv(Duration::from_millis(100)).is_some() {
                std::thread::sleep(Duration::from_millis(100));
                tap.drain();
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("messages published on nats-server b never reached a's subscriber");
            }
        }
    }
}
