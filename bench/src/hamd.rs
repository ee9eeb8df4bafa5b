//! A `hamd` under test: private socket, name and shared-memory store, a client, and
//! full cleanup on drop (the pair stopped, every entity process killed, the store
//! files removed), also when a scenario fails half-way.

use crate::sys::{Proc, SIGKILL, Scratch, alive, descendants, kill, kill_all, wait_gone};
use anyhow::{Context, bail};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Where the workspace's binaries are.
#[derive(Clone, Debug)]
pub struct Bins {
    /// The directory holding `ham` and `ham-bench-child`.
    pub dir: PathBuf,
    /// The `hamd` under test: in a full run the production build (static-pie, made by
    /// `scripts/build-static`), else the one in `dir`.
    pub hamd: PathBuf,
}

impl Bins {
    /// A binary's path.
    pub fn get(&self, name: &str) -> PathBuf {
        if name == "hamd" {
            self.hamd.clone()
        } else {
            self.dir.join(name)
        }
    }
}

/// A running `hamd` (the HAM and its Guardian).
pub struct Hamd {
    /// Its control socket.
    pub socket: PathBuf,
    state: PathBuf,
    log: PathBuf,
    name: String,
    child: Option<Child>,
    ham: PathBuf,
    /// The runtime for client calls.
    pub rt: tokio::runtime::Runtime,
}

static INSTANCE: AtomicU32 = AtomicU32::new(0);

/// How to start a `hamd` beyond what [`Hamd::start`] chooses by itself.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    /// Its node name (a DNS label); also names its socket, config, log and store.
    pub name: String,
    /// Its config (TOML text, may be empty).
    pub config: String,
    /// Room for this many entities.
    pub capacity: usize,
    /// Added to its environment (and so its entities').
    pub env: Vec<(String, String)>,
    /// More flags, e.g. the mesh's.
    pub args: Vec<String>,
}

impl Hamd {
    /// Starts `hamd` in `dir` with `config` (TOML text, may be empty), room for
    /// `capacity` entities and `env` added to its environment (and so its entities'),
    /// and waits until it answers.
    pub fn start(
        bins: &Bins,
        dir: &Scratch,
        config: &str,
        capacity: usize,
        env: &[(String, String)],
    ) -> anyhow::Result<Hamd> {
        let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
        let launch = Launch {
            name: format!("bench{}-{n}", std::process::id()),
            config: config.to_string(),
            capacity,
            env: env.to_vec(),
            args: Vec::new(),
        };
        let mut h = Hamd::spawn(bins, dir, &launch)?;
        h.wait_ready(Duration::from_secs(60))?;
        Ok(h)
    }

    /// Starts `hamd` as `launch` says, without waiting for it (see
    /// [`Hamd::wait_ready`]): several can then boot at once.
    pub fn spawn(bins: &Bins, dir: &Scratch, launch: &Launch) -> anyhow::Result<Hamd> {
        let name = &launch.name;
        let socket = dir.join(&format!("{name}.sock"));
        let state = PathBuf::from(format!("/dev/shm/ham-bench-{name}.state"));
        let _ = std::fs::remove_file(&state);
        let _ = std::fs::remove_file(state.with_extension("beats"));
        let cfg = dir.join(&format!("{name}.toml"));
        std::fs::write(&cfg, &launch.config)
            .with_context(|| format!("cannot write {}", cfg.display()))?;
        let log = dir.join(&format!("{name}.log"));
        let log_file = std::fs::File::create(&log)?;
        let child = Command::new(bins.get("hamd"))
            .arg("--socket")
            .arg(&socket)
            .arg("--state")
            .arg(&state)
            .arg("--name")
            .arg(name)
            .arg("--capacity")
            .arg(launch.capacity.to_string())
            .arg("--config")
            .arg(&cfg)
            .arg("--log")
            .arg("error")
            .args(&launch.args)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot start {}", bins.get("hamd").display()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Hamd {
            socket,
            state,
            log,
            name: name.clone(),
            child: Some(child),
            ham: bins.get("ham"),
            rt,
        })
    }

    /// Waits until it answers on its socket, up to `timeout`; an error (with its log)
    /// if it exits first.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.client().is_err() {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!(
                    "hamd {} exited at start ({status}): {}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("hamd {} did not come up within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// A fresh client connection.
    pub fn client(&self) -> anyhow::Result<ham::Client> {
        let socket = self.socket.clone();
        Ok(self
            .rt
            .block_on(async move { ham::Client::connect(socket).await })?)
    }

    /// The PID of the `hamd` this harness started (the first HAM), if still held.
    pub fn started_pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Runs the `ham` CLI against this node; Err with its stderr if it fails.
    pub fn ham(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.ham)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .with_context(|| format!("cannot run {}", self.ham.display()))?;
        if !out.status.success() {
            bail!(
                "ham {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The node's status.
    pub fn status(&self) -> anyhow::Result<ham::ham_proto::StatusReply> {
        let mut c = self.client()?;
        Ok(self.rt.block_on(async move { c.status().await })?)
    }

    /// The PIDs of the running entities' processes, once `n` entities run.
    pub fn wait_running(&self, n: usize, timeout: Duration) -> anyhow::Result<Vec<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.status()?;
            let pids: Vec<i32> = st
                .entities
                .iter()
                .filter(|e| e.state == "running")
                .map(|e| e.pid)
                .collect();
            if pids.len() >= n {
                return Ok(pids);
            }
            if Instant::now() > deadline {
                bail!("only {} of {n} entities came up", pids.len());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The PIDs of the HAM and the Guardian, once the Guardian is connected (only then
    /// can a HAM's death be taken over).
    pub fn pair(&self) -> anyhow::Result<(i32, i32)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let p = self.status()?.pair.unwrap_or_default();
            if p.guardian_pid > 0 {
                return Ok((p.ham_pid, p.guardian_pid));
            }
            if Instant::now() > deadline {
                bail!("no Guardian connected within 30 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Hamd {
    fn drop(&mut self) {
        // What to kill if the orderly stop leaves anything behind.
        let mut leftovers: Vec<Proc> = Vec::new();
        let pair = self.pair().ok();
        if let Some((h, g)) = pair {
            leftovers.extend([h, g].into_iter().filter_map(Proc::read));
            leftovers.extend(descendants(h));
        }
        if let Ok(st) = self.status() {
            leftovers.extend(st.entities.iter().filter_map(|e| Proc::read(e.pid)));
        }
        let _ = self.ham(&["stop", "--kill-entities"]);
        if let Some((h, g)) = pair {
            let deadline = Instant::now() + Duration::from_secs(30);
            while (alive(h) || alive(g)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(mut c) = self.child.take() {
            if let Ok(None) = c.try_wait() {
                kill(c.id() as i32, SIGKILL);
            }
            let _ = c.wait();
        }
        if !wait_gone(&leftovers, Duration::from_secs(5)) {
            kill_all(&leftovers);
            wait_gone(&leftovers, Duration::from_secs(5));
        }
        let _ = std::fs::remove_file(&self.state);
        let _ = std::fs::remove_file(self.state.with_extension("beats"));
        let _ = std::fs::remove_file(&self.socket);
    }
}
