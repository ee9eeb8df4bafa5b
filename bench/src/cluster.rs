//! A private mesh of `hamd` nodes on loopback, with real certificates (`ham cert`):
//! node i listens on 127.0.0.(2+i), all on one port of this run, and joins through
//! the first. Nodes can be killed (SIGKILL of the HAM and its Guardian) and started
//! again; everything is stopped and removed on drop, also when a scenario fails.

use crate::hamd::{Bins, Hamd, Launch};
use crate::net::{free_port, host};
use crate::sys::{SIGKILL, SIGSTOP, Scratch, kill, mono_ns};
use anyhow::{Context, bail};
use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

/// How long a node may take to answer on its socket.
const BOOT: Duration = Duration::from_secs(60);

/// A running mesh (see the module docs).
pub struct Cluster {
    nodes: Vec<Option<Hamd>>,
    launches: Vec<Launch>,
    bins: Bins,
    dir: Scratch,
}

/// The name of node `i` of a mesh: a letter and this process's PID (a DNS label,
/// unique to this run).
pub fn node_name(i: usize) -> String {
    let letter = (b'a' + (i % 26) as u8) as char;
    let round = if i >= 26 {
        (i / 26).to_string()
    } else {
        String::new()
    };
    format!("{letter}{round}x{}", std::process::id())
}

fn ham_cert(bins: &Bins, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(bins.get("ham"))
        .arg("cert")
        .args(args)
        .output()
        .context("cannot run ham cert")?;
    if !out.status.success() {
        bail!(
            "ham cert {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Cluster {
    /// Makes a CA and `n` node certificates, then starts `n` nodes at once with
    /// `config` and waits until each answers on its socket (not until they see each
    /// other: [`Cluster::wait_all_up`]).
    pub fn start(bins: &Bins, tag: &str, n: usize, config: &str) -> anyhow::Result<Cluster> {
        let mut c = Cluster::prepare(bins, tag, n, config)?;
        c.boot()?;
        Ok(c)
    }

    /// Makes a CA and `n` node certificates, and the nodes' flags; starts nothing.
    pub fn prepare(bins: &Bins, tag: &str, n: usize, config: &str) -> anyhow::Result<Cluster> {
        let dir = Scratch::new(tag)?;
        let certs = dir.subdir("certs")?;
        let d = certs.display().to_string();
        ham_cert(bins, &["init-ca", "--dir", &d])?;
        let hosts: Vec<_> = (0..n).map(host).collect();
        let port = free_port(&hosts)?;
        let mut launches = Vec::new();
        for i in 0..n {
            let name = node_name(i);
            ham_cert(bins, &["issue", &name, "--dir", &d])?;
            let file = |f: String| certs.join(f).display().to_string();
            let mut args = vec![
                "--mesh-listen".to_string(),
                format!("{}:{port}", host(i)),
                "--mesh-cert".into(),
                file(format!("{name}.crt")),
                "--mesh-key".into(),
                file(format!("{name}.key")),
                "--mesh-ca".into(),
                file("ca.crt".into()),
            ];
            if i > 0 {
                args.push("--mesh-seed".into());
                args.push(format!("{}:{port}", host(0)));
            }
            launches.push(Launch {
                name,
                config: config.to_string(),
                capacity: 64,
                env: Vec::new(),
                args,
            });
        }
        Ok(Cluster {
            nodes: Vec::new(),
            launches,
            bins: bins.clone(),
            dir,
        })
    }

    /// Starts every node at once and waits until each answers on its socket.
    pub fn boot(&mut self) -> anyhow::Result<()> {
        for l in &self.launches {
            self.nodes
                .push(Some(Hamd::spawn(&self.bins, &self.dir, l)?));
        }
        for n in self.nodes.iter_mut().flatten() {
            n.wait_ready(BOOT)?;
        }
        Ok(())
    }

    /// How many nodes it has (running or killed).
    pub fn len(&self) -> usize {
        self.launches.len()
    }

    /// Node `i`, if it runs.
    pub fn node(&self, i: usize) -> anyhow::Result<&Hamd> {
        self.nodes
            .get(i)
            .and_then(Option::as_ref)
            .with_context(|| format!("node {i} does not run"))
    }

    /// The name of node `i`.
    pub fn name(&self, i: usize) -> &str {
        &self.launches[i].name
    }

    /// The members node `i` knows, by name, with their state (`up`, `suspect`, `down`).
    pub fn view(&self, i: usize) -> anyhow::Result<HashMap<String, String>> {
        let n = self.node(i)?;
        let mut c = n.client()?;
        let reply = n.rt.block_on(async move {
            c.api()
                .nodes(ham::ham_proto::NodesRequest {})
                .await
                .map_err(ham::ClientError::from)
        })?;
        Ok(reply
            .into_inner()
            .nodes
            .into_iter()
            .map(|m| (m.name, m.state))
            .collect())
    }

    /// True if node `i` sees every node of `of` up.
    pub fn sees_up(&self, i: usize, of: &[usize]) -> anyhow::Result<bool> {
        let v = self.view(i)?;
        Ok(of
            .iter()
            .all(|&j| j == i || v.get(self.name(j)).is_some_and(|s| s == "up")))
    }

    /// Waits until every node sees every other node up.
    pub fn wait_all_up(&self, timeout: Duration) -> anyhow::Result<()> {
        let all: Vec<usize> = (0..self.len()).collect();
        let deadline = Instant::now() + timeout;
        loop {
            let mut ok = true;
            for &i in &all {
                if !self.sees_up(i, &all)? {
                    ok = false;
                    break;
                }
            }
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                let views: Vec<String> = all
                    .iter()
                    .map(|&i| format!("{}: {:?}", self.name(i), self.view(i).unwrap_or_default()))
                    .collect();
                bail!(
                    "the mesh did not come up within {timeout:?}: {}",
                    views.join("; ")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The PIDs of every running node's HAM.
    pub fn ham_pids(&self) -> anyhow::Result<Vec<i32>> {
        self.nodes
            .iter()
            .flatten()
            .map(|n| Ok(n.pair()?.0))
            .collect()
    }

    /// SIGKILLs node `i`'s HAM and Guardian, both stopped first (so neither can take
    /// over from or respawn the other); returns the time of the first stop.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<u64> {
        let (ham, guardian) = self.node(i)?.pair()?;
        // The node is gone from the first stop on.
        let t0 = mono_ns();
        kill(ham, SIGSTOP);
        kill(guardian, SIGSTOP);
        kill(ham, SIGKILL);
        kill(guardian, SIGKILL);
        Ok(t0)
    }

    /// Starts node `i` again (after [`Cluster::kill`]): the dead node's leftovers are
    /// cleaned up, and a fresh `hamd` with the same name, address and store path
    /// starts and answers on its socket.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        drop(self.nodes[i].take());
        let mut n = Hamd::spawn(&self.bins, &self.dir, &self.launches[i])?;
        n.wait_ready(BOOT)?;
        self.nodes[i] = Some(n);
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Each node stops itself on drop; all at once, so a big mesh stops quickly.
        let nodes = std::mem::take(&mut self.nodes);
        std::thread::scope(|s| {
            for n in nodes.into_iter().flatten() {
                s.spawn(move || drop(n));
            }
        });
    }
}
