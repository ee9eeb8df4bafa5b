//! Supervisors under test. Each is started with a [`Workload`] (N copies of one
//! program) and seen through one trait, [`Supervisor`]: its own processes (whose memory
//! and CPU are its footprint), the processes it supervises, how to crash one, and how
//! to stop everything it started. Adding a peer is one module here and one arm in
//! [`start`].

mod floor;
pub mod ham;
mod runit;
mod s6;
mod supervisord;

use crate::hamd::Bins;
use crate::sys::{Proc, SIGKILL, all_procs, descendants, kill, kill_all, wait_gone};
use anyhow::{Context, bail};
use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The kinds of supervisor the benchmarks know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// ham (`hamd`, the HAM and its Guardian).
    Ham,
    /// The floor: this harness as a bare parent (kill, waitpid, spawn the next child).
    Floor,
    /// s6: `s6-svscan` and one `s6-supervise` per service.
    S6,
    /// runit: `runsvdir` and one `runsv` per service.
    Runit,
    /// supervisord (Python), one process for all programs.
    Supervisord,
}

impl Kind {
    /// The peers, in report order.
    pub const PEERS: [Kind; 3] = [Kind::S6, Kind::Runit, Kind::Supervisord];

    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Ham => "ham",
            Kind::Floor => "fork+exec+wait floor",
            Kind::S6 => "s6-supervise",
            Kind::Runit => "runsv",
            Kind::Supervisord => "supervisord",
        }
    }

    /// The Debian package a peer comes from and the programs it must provide.
    pub fn package(self) -> Option<(&'static str, &'static [&'static str])> {
        match self {
            Kind::S6 => Some(("s6", &["s6-svscan", "s6-supervise"])),
            Kind::Runit => Some(("runit", &["runsvdir", "runsv"])),
            Kind::Supervisord => Some(("supervisor", &["supervisord"])),
            Kind::Ham | Kind::Floor => None,
        }
    }

    /// What makes up "the supervisor" for the footprint figures.
    pub fn whose_footprint(self) -> &'static str {
        match self {
            Kind::Ham => "the HAM + its Guardian",
            Kind::Floor => "-",
            Kind::S6 => "s6-svscan + every s6-supervise",
            Kind::Runit => "runsvdir + every runsv",
            Kind::Supervisord => "the supervisord process",
        }
    }

    /// Its restart pacing and how it is configured here, in plain words.
    pub fn pacing(self) -> &'static str {
        match self {
            Kind::Ham => {
                "ham: no pacing unless configured (`backoff`); entities declared with `restart = true`."
            }
            Kind::Floor => {
                "floor: the harness itself kills the child, waits for it (waitpid) and spawns the next one; no supervisor."
            }
            Kind::S6 => {
                "s6-supervise: at least 1 s between two starts of `./run` unless the service has been *ready* for more than 1 s; with no readiness notification every restart waits 1 s (the ≈1.0 s measured before). Configured with `notification-fd` (the child writes its readiness line at once), so a child killed after 1 s of life restarts immediately. `./run` is the child binary itself (a symlink), no shell."
            }
            Kind::Runit => {
                "runsv: sleeps 1 s before restarting a `./run` that lived less than 1 s (hard-coded, no knob). Every child killed here has lived more than 1 s, so no pacing applies. `./run` is the child binary itself (a symlink), no shell."
            }
            Kind::Supervisord => {
                "supervisord: a dead program is restarted only on the next pass of its main loop, which waits up to 1 s in poll() (hard-coded timeout, no knob); SIGCHLD does not wake it (Python retries poll after a signal). So every restart takes ≈1 s. Configured with autorestart=true, startsecs=0, loglevel=error, no log capture."
            }
        }
    }

    /// True if every restart waits for a timer of about a second (quick mode then takes
    /// only a few samples).
    pub fn timer_paced(self) -> bool {
        self == Kind::Supervisord
    }
}

/// What a supervisor runs: `count` copies of one program.
#[derive(Clone, Debug)]
pub struct Workload {
    /// How many supervised processes.
    pub count: usize,
    /// The program (absolute path or name on PATH) and its arguments.
    pub argv: Vec<String>,
    /// Variables added to the supervisor's environment, which its processes inherit.
    pub env: Vec<(String, String)>,
    /// The program signals readiness: it writes a newline to the descriptor named by
    /// `$HAM_BENCH_NOTIFY_FD` when set (s6's `notification-fd`).
    pub readiness: bool,
}

/// A supervisor under test, running its workload.
pub trait Supervisor {
    /// Which supervisor it is.
    fn kind(&self) -> Kind;

    /// Its own processes: their memory and CPU are its footprint.
    fn own_pids(&self) -> anyhow::Result<Vec<i32>>;

    /// The processes it supervises now.
    fn supervised(&self) -> anyhow::Result<Vec<i32>>;

    /// Crashes one supervised process with SIGKILL (the floor also replaces it, since
    /// it is its own supervisor).
    fn crash(&mut self, pid: i32) -> anyhow::Result<()> {
        kill(pid, SIGKILL);
        Ok(())
    }

    /// Stops the supervisor and every process it started. Also done on drop; calling
    /// it first reports errors.
    fn stop(&mut self) -> anyhow::Result<()>;
}

/// Starts a supervisor of `kind` with workload `w`. It returns once the supervisor
/// runs; its processes may still be starting (see [`wait_supervised`]).
pub fn start(kind: Kind, bins: &Bins, w: &Workload) -> anyhow::Result<Box<dyn Supervisor>> {
    Ok(match kind {
        Kind::Ham => Box::new(ham::HamSut::start(bins, w)?),
        Kind::Floor => Box::new(floor::Floor::start(w)?),
        Kind::S6 => Box::new(s6::S6::start(w)?),
        Kind::Runit => Box::new(runit::Runit::start(w)?),
        Kind::Supervisord => Box::new(supervisord::Supervisord::start(w)?),
    })
}

/// Waits until `sup` supervises `n` processes that run `comm`; returns their PIDs.
pub fn wait_supervised(
    sup: &dyn Supervisor,
    n: usize,
    comm: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<i32>> {
    let deadline = Instant::now() + timeout;
    loop {
        let pids: Vec<i32> = sup
            .supervised()?
            .into_iter()
            .filter(|&p| Proc::read(p).is_some_and(|p| p.comm == comm && p.state != 'Z'))
            .collect();
        if pids.len() >= n {
            return Ok(pids);
        }
        if Instant::now() > deadline {
            bail!(
                "{}: only {} of {n} supervised processes run {comm} after {timeout:?}",
                sup.kind().name(),
                pids.len()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True if every program of a peer's package is on PATH.
pub fn installed(kind: Kind) -> bool {
    kind.package()
        .is_none_or(|(_, progs)| progs.iter().all(|p| on_path(p)))
}

/// True if `prog` is a file in a directory of `$PATH`.
pub fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(prog).is_file()))
}

/// The peers that can run. With `install`, missing ones are installed from Debian
/// (`apt-get install -y s6 runit supervisor`, after `apt-get update` if that fails);
/// without, or if that fails, each missing one is skipped with a loud line.
pub fn available_peers(install: bool) -> Vec<Kind> {
    let missing: Vec<Kind> = Kind::PEERS.into_iter().filter(|&k| !installed(k)).collect();
    if install && !missing.is_empty() {
        let pkgs: Vec<&str> = missing
            .iter()
            .filter_map(|k| k.package().map(|(p, _)| p))
            .collect();
        eprintln!(
            "installing {}: apt-get install -y {}",
            pkgs.join(", "),
            pkgs.join(" ")
        );
        apt_install(&pkgs);
    }
    Kind::PEERS
        .into_iter()
        .filter(|&k| {
            let ok = installed(k);
            if !ok {
                let (pkg, _) = k.package().unwrap_or(("?", &[]));
                eprintln!(
                    "SKIPPED {}: not installed (Debian package {pkg}; `cargo run --release -p ham-bench -- all` installs it)",
                    k.name()
                );
            }
            ok
        })
        .collect()
}

/// Installs Debian packages (`apt-get install -y`, after `apt-get update` if that
/// fails); true if it worked.
pub fn apt_install(pkgs: &[&str]) -> bool {
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let mut args = vec!["install", "-y"];
    args.extend(pkgs);
    if apt(&args) {
        return true;
    }
    eprintln!("apt-get install failed; running apt-get update and trying again");
    let _ = apt(&["update"]);
    let ok = apt(&args);
    if !ok {
        eprintln!("apt-get install failed again");
    }
    ok
}

/// A peer that is one process tree under a root process this harness started
/// (`s6-svscan`, `runsvdir`, `supervisord`). Its own processes are the root and the
/// descendants whose command is one of `own_comms`; it supervises their other
/// children.
pub struct Tree {
    root: Option<Child>,
    own_comms: &'static [&'static str],
    stop_signal: i32,
}

impl Tree {
    /// Spawns the root: `cmd` with the workload's environment, its output to `log`.
    /// `stop_signal` makes the root stop its services and exit.
    pub fn spawn(
        mut cmd: Command,
        w: &Workload,
        log: &Path,
        own_comms: &'static [&'static str],
        stop_signal: i32,
    ) -> anyhow::Result<Tree> {
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let child = cmd
            .envs(w.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        Ok(Tree {
            root: Some(child),
            own_comms,
            stop_signal,
        })
    }

    fn root_pid(&self) -> anyhow::Result<i32> {
        self.root
            .as_ref()
            .map(|c| c.id() as i32)
            .context("the supervisor was stopped")
    }

    /// The root and its descendants named in `own_comms`.
    pub fn own_pids(&self) -> anyhow::Result<Vec<i32>> {
        let root = self.root_pid()?;
        let mut own = vec![root];
        own.extend(
            descendants(root)
                .into_iter()
                .filter(|p| self.own_comms.contains(&p.comm.as_str()))
                .map(|p| p.pid),
        );
        Ok(own)
    }

    /// The children of its own processes that are not its own.
    pub fn supervised(&self) -> anyhow::Result<Vec<i32>> {
        let own: HashSet<i32> = self.own_pids()?.into_iter().collect();
        Ok(all_procs()
            .into_values()
            .filter(|p| own.contains(&p.ppid) && !own.contains(&p.pid) && p.state != 'Z')
            .map(|p| p.pid)
            .collect())
    }

    /// The stop signal to the root (which then stops its services and exits), then
    /// SIGKILL to whatever of the tree is left after 10 s; an error if anything was.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut root) = self.root.take() else {
            return Ok(());
        };
        let pid = root.id() as i32;
        let tree = descendants(pid);
        kill(pid, self.stop_signal);
        let deadline = Instant::now() + Duration::from_secs(10);
        while root.try_wait()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let clean = wait_gone(&tree, Duration::from_secs(2));
        if root.try_wait()?.is_none() {
            kill(pid, SIGKILL);
        }
        root.wait()?;
        if !clean {
            kill_all(&tree);
            wait_gone(&tree, Duration::from_secs(5));
            bail!(
                "pid {pid} left processes behind after signal {}; killed them",
                self.stop_signal
            );
        }
        Ok(())
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Writes a service's `run`: a symlink to the program when it takes no arguments
/// (no shell between the supervisor and the program), else a `/bin/sh` script that
/// `exec`s it.
pub fn write_run(dir: &Path, argv: &[String]) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let run = dir.join("run");
    let prog = argv.first().context("empty command")?;
    if argv.len() == 1 && prog.starts_with('/') {
        std::os::unix::fs::symlink(prog, &run)
            .with_context(|| format!("cannot link {}", run.display()))?;
    } else {
        let quoted: Vec<String> = argv
            .iter()
            .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
            .collect();
        std::fs::write(&run, format!("#!/bin/sh\nexec {}\n", quoted.join(" ")))
            .with_context(|| format!("cannot write {}", run.display()))?;
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}
