//! Test harness for real-process tests: starts `hamd` on a private socket and state
//! file, runs the real `ham` CLI against it, and cleans up everything it started.

pub use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The directory holding the workspace's binaries (`hamd`, `ham`, helpers).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HAM_BIN_DIR") {
        return PathBuf::from(d);
    }
    // target/<profile>/deps/<test-binary> → target/<profile>
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .to_path_buf();
    for b in ["hamd", "ham"] {
        assert!(
            dir.join(b).exists(),
            "{} is missing: build the binaries first (cargo build --workspace --bins; scripts/test does it)",
            dir.join(b).display()
        );
    }
    dir
}

/// A binary of the workspace.
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A private scratch directory, removed on drop.
pub struct Scratch {
    /// Its path.
    pub path: PathBuf,
}

impl Scratch {
    /// Makes a fresh directory under the system's temp dir.
    pub fn new(tag: &str) -> Scratch {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("ham-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("scratch dir");
        Scratch { path }
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A running `hamd` with its own socket and state; stopped and cleaned up on drop,
/// including every entity process it knew of.
pub struct TestNode {
    /// The node's name.
    pub name: String,
    /// Its scratch directory.
    pub dir: Scratch,
    /// The control socket.
    pub socket: PathBuf,
    /// The state store.
    pub state: PathBuf,
    /// The config file, if any.
    pub config: Option<PathBuf>,
    /// Extra `hamd` flags (e.g. the mesh's).
    pub extra_args: Vec<String>,
    child: Option<Child>,
    pids_seen: Vec<i32>,
}

impl TestNode {
    /// Starts `hamd` with no config.
    pub fn start(tag: &str) -> TestNode {
        Self::start_with(tag, None)
    }

    /// Starts `hamd` with a config file holding `config`.
    pub fn start_with_config(tag: &str, config: &str) -> TestNode {
        Self::start_with(tag, Some(config))
    }

    fn start_with(tag: &str, config: Option<&str>) -> TestNode {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("t{}-{n}", std::process::id());
        Self::start_custom(tag, name, config, Vec::new())
    }

    /// Starts `hamd` named `name`, with an optional config and extra flags.
    pub fn start_custom(
        tag: &str,
        name: String,
        config: Option<&str>,
        extra_args: Vec<String>,
    ) -> TestNode {
        let dir = Scratch::new(tag);
        let socket = dir.join("ham.sock");
        let state = PathBuf::from(format!("/dev/shm/ham-test-{name}.state"));
        let config = config.map(|text| {
            let p = dir.join("ham.toml");
            std::fs::write(&p, text).expect("config written");
            p
        });
        let mut node = TestNode {
            name,
            dir,
            socket,
            state,
            config,
            extra_args,
            child: None,
            pids_seen: Vec::new(),
        };
        node.launch().expect("hamd starts");
        node
    }

    /// The `hamd` command line for this node.
    pub fn hamd_command(&self) -> Command {
        let mut c = Command::new(bin("hamd"));
        c.arg("--socket")
            .arg(&self.socket)
            .arg("--state")
            .arg(&self.state)
            .arg("--name")
            .arg(&self.name)
            .arg("--capacity")
            .arg("256")
            .env(
                "RUST_LOG",
                std::env::var("HAM_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            );
        if let Some(cfg) = &self.config {
            c.arg("--config").arg(cfg);
        }
        c.args(&self.extra_args);
        c
    }

    /// SIGKILLs both the HAM and its Guardian: the node is gone, as when its machine
    /// dies. Entity processes stay (they are cleaned up on drop). Both are stopped
    /// first: killed one after the other, the survivor would step in (a HAM spawns a
    /// new Guardian within milliseconds, a Guardian takes over), and the node would
    /// live on.
    pub fn kill_node(&mut self) {
        let (ham, guardian, _) = self.pair();
        signal_all(&[ham, guardian], "STOP");
        signal_all(&[ham, guardian], "KILL");
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        wait_until("the node's processes exit", 10, || {
            !alive(ham) && !alive(guardian)
        });
    }

    /// (Re)starts `hamd` and waits until it answers; Err(stderr) if it exits first.
    pub fn launch(&mut self) -> Result<(), String> {
        let mut child = self
            .hamd_command()
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("hamd spawns");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                let out = child.wait_with_output().expect("hamd output");
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
            // Up means serving with a connected Guardian: only then is a HAM's death
            // taken over.
            let out = self.try_ham(&["status", "--json"]);
            let guarded = serde_json::from_slice::<Value>(&out.stdout)
                .is_ok_and(|v| v["pair"]["guardian_pid"].as_i64().is_some_and(|g| g > 0));
            if guarded {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let out = child.wait_with_output().expect("hamd output");
                panic!(
                    "hamd did not come up in 10 s; its log:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Drain stderr in the background so hamd never blocks on a full pipe.
        if let Some(mut err) = child.stderr.take() {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = std::io::Read::read_to_end(&mut err, &mut buf);
                if std::env::var_os("HAM_TEST_LOG").is_some() {
                    eprintln!("{}", String::from_utf8_lossy(&buf));
                }
            });
        }
        self.child = Some(child);
        Ok(())
    }

    /// The pair as `status` reports it: (HAM pid, Guardian pid, generation).
    pub fn pair(&mut self) -> (i32, i32, u64) {
        let p = self.status()["pair"].clone();
        (
            p["ham_pid"].as_i64().unwrap_or(0) as i32,
            p["guardian_pid"].as_i64().unwrap_or(0) as i32,
            p["generation"].as_u64().unwrap_or(0),
        )
    }

    /// Waits until the pair has a Guardian and the generation is `generation`.
    pub fn wait_pair(&mut self, generation: u64) -> (i32, i32, u64) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let p = self.pair();
            if p.1 > 0 && p.2 == generation && alive(p.0) && alive(p.1) {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "pair never reached generation {generation}: {p:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs the HAM and waits until its Guardian has taken over; returns the new pair.
    pub fn kill_ham(&mut self) -> (i32, i32, u64) {
        let generation = self.pair().2;
        let (ham, _, generation) = self.wait_pair(generation);
        kill(ham, 9);
        if self.child.as_ref().is_some_and(|c| c.id() as i32 == ham) {
            let _ = self.child.take().map(|mut c| c.wait());
        }
        self.wait_pair(generation + 1)
    }

    /// Stops `hamd` and its entities, discards its state store, and starts it again
    /// on `config` (written over its config file): a node whose event numbers start
    /// over at 1.
    pub fn restart_with_new_store(&mut self, config: &str) {
        self.stop_discarding_store();
        self.relaunch_with_config(config);
    }

    /// Stops `hamd` and its entities and discards its state store (see
    /// [`TestNode::relaunch_with_config`]).
    pub fn stop_discarding_store(&mut self) {
        self.ham(&["stop", "--kill-entities"]);
        self.wait_exit();
        let _ = std::fs::remove_file(&self.state);
        let _ = std::fs::remove_file(self.state.with_extension("beats"));
    }

    /// Starts a stopped `hamd` again on `config` (written over its config file).
    pub fn relaunch_with_config(&mut self, config: &str) {
        let path = self.config.as_ref().expect("the node has a config file");
        std::fs::write(path, config).expect("config written");
        self.launch().expect("hamd starts again");
    }

    /// Waits for `hamd` to exit by itself (after `ham stop`).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            assert!(Instant::now() < deadline, "hamd did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `ham` against this node; returns the raw output.
    pub fn try_ham(&self, args: &[&str]) -> Output {
        Command::new(bin("ham"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("ham runs")
    }

    /// Runs `ham` with `input` on its standard input; returns the raw output.
    pub fn try_ham_with_input(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = Command::new(bin("ham"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ham runs");
        let mut stdin = child.stdin.take().expect("stdin");
        let input = input.to_vec();
        let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &input));
        let out = child.wait_with_output().expect("ham output");
        let _ = writer.join();
        out
    }

    /// Runs `ham` and requires success; returns stdout.
    pub fn ham(&self, args: &[&str]) -> String {
        let out = self.try_ham(args);
        assert!(
            out.status.success(),
            "ham {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `ham` and requires failure; returns stderr.
    pub fn ham_fails(&self, args: &[&str]) -> String {
        let out = self.try_ham(args);
        assert!(!out.status.success(), "ham {args:?} should have failed");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `ham status --json`, parsed.
    pub fn status(&mut self) -> Value {
        let v: Value = serde_json::from_str(&self.ham(&["status", "--json"])).expect("json");
        for e in v["entities"].as_array().into_iter().flatten() {
            // Remember entity processes to kill on cleanup, never this test itself.
            if let Some(p) = e["pid"].as_i64()
                && p as u32 != std::process::id()
                && !self.pids_seen.contains(&(p as i32))
            {
                self.pids_seen.push(p as i32);
            }
        }
        v
    }

    /// One entity's status object.
    pub fn entity(&mut self, name: &str) -> Value {
        self.status()["entities"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["name"] == name).cloned())
            .unwrap_or_else(|| panic!("no entity {name}"))
    }

    /// Polls an entity until `pred` holds; returns its status.
    pub fn wait_entity(&mut self, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let e = self.entity(name);
            if pred(&e) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: {what} never happened: {e}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every buffered event, parsed.
    pub fn events(&self) -> Vec<Value> {
        self.ham(&["events", "--json"])
            .lines()
            .map(|l| serde_json::from_str(l).expect("event json"))
            .collect()
    }

    /// The kinds of an entity's events, in order.
    pub fn kinds_of(&self, entity: &str) -> Vec<String> {
        self.events()
            .iter()
            .filter(|e| e["entity"] == entity)
            .map(|e| e["kind"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Polls events until `pred` holds for the list.
    pub fn wait_events(&self, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ev = self.events();
            if pred(&ev) {
                return ev;
            }
            assert!(Instant::now() < deadline, "{what} never happened: {ev:#?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Remembers a PID to kill on cleanup.
    pub fn track(&mut self, pid: i32) {
        self.pids_seen.push(pid);
    }

    /// Stops the pair for good: `ham stop`, then SIGKILL for whatever is left (the
    /// Guardian first, so that the HAM's death is not a takeover).
    fn stop_pair(&mut self) {
        let mut pair = Vec::new();
        if self.socket.exists() {
            let out = self.try_ham(&["status", "--json"]);
            if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) {
                for k in ["guardian_pid", "ham_pid"] {
                    if let Some(p) = v["pair"][k].as_i64() {
                        pair.push(p as i32);
                    }
                }
                let _ = self.status();
            }
            let _ = self.try_ham(&["stop"]);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while pair.iter().any(|p| alive(*p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for p in &pair {
            kill(*p, 9);
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.stop_pair();
        for pid in &self.pids_seen {
            kill(*pid, 9);
        }
        let _ = std::fs::remove_file(&self.state);
        let _ = std::fs::remove_file(self.state.with_extension("beats"));
    }
}

/// Sends a signal to a PID (ignores errors: it may be gone).
pub fn kill(pid: i32, sig: i32) {
    if pid > 0 {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .stderr(Stdio::null())
            .status();
    }
}

/// A one-thread runtime for a test that talks to hamd through the client library.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Sends signal `sig` (a name: `STOP`, `KILL` …) to every PID, from one `kill`.
pub fn signal_all(pids: &[i32], sig: &str) {
    let pids: Vec<String> = pids
        .iter()
        .filter(|p| **p > 0)
        .map(i32::to_string)
        .collect();
    if !pids.is_empty() {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .args(&pids)
            .stderr(Stdio::null())
            .status();
    }
}

/// True if a process with this PID exists.
pub fn alive(pid: i32) -> bool {
    // A zombie is dead for our purposes.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                .is_some_and(|state| state != "Z")
        })
        .unwrap_or(false)
}

/// Waits until `pred` holds or panics after `secs` seconds.
pub fn wait_until(what: &str, secs: u64, pred: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !pred() {
        assert!(Instant::now() < deadline, "{what} never happened");
        std::thread::sleep(Duration::from_millis(10));
    }
}
