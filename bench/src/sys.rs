//! Small safe wrappers over the operating system: the shared monotonic clock, signals,
//! `/proc` (process trees, memory, CPU time), scratch directories and FIFOs.

use anyhow::{Context, bail};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The monotonic clock every process of the machine shares, in nanoseconds.
pub fn mono_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Sends a signal by number (errors ignored: the process may be gone).
pub fn kill(pid: i32, sig: i32) {
    if let (Some(p), Some(s)) = (
        rustix::process::Pid::from_raw(pid),
        rustix::process::Signal::from_named_raw(sig),
    ) {
        let _ = rustix::process::kill_process(p, s);
    }
}

/// While it lives, this process is a child subreaper: the processes its children
/// orphan become its children, and [`Subreaper::reap`] collects them. A HAM's
/// generations are such orphans (each new HAM is a child of the one that died); left
/// to this machine's PID 1, their deaths cost it milliseconds of CPU each, in the
/// middle of the takeover being measured. A service manager that starts `hamd` is its
/// subreaper in life.
pub struct Subreaper(());

impl Subreaper {
    /// Makes this process a child subreaper.
    pub fn new() -> anyhow::Result<Subreaper> {
        rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
            .context("PR_SET_CHILD_SUBREAPER")?;
        Ok(Subreaper(()))
    }

    /// Reaps `pid` (a child, or an orphan adopted), waiting up to `timeout` for it
    /// to exit; false if it did not.
    pub fn reap(&self, pid: i32, timeout: Duration) -> bool {
        let Some(p) = rustix::process::Pid::from_raw(pid) else {
            return false;
        };
        let deadline = Instant::now() + timeout;
        loop {
            match rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG) {
                Ok(Some(_)) | Err(_) => return true,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Ok(None) => return false,
            }
        }
    }
}

impl Drop for Subreaper {
    fn drop(&mut self) {
        let _ = rustix::process::set_child_subreaper(None);
    }
}

/// SIGKILL.
pub const SIGKILL: i32 = 9;
/// SIGSTOP.
pub const SIGSTOP: i32 = 19;
/// SIGTERM.
pub const SIGTERM: i32 = 15;
/// SIGHUP.
pub const SIGHUP: i32 = 1;

/// One process as `/proc/PID/stat` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proc {
    /// Its PID.
    pub pid: i32,
    /// Its parent's PID.
    pub ppid: i32,
    /// Its command name (at most 15 bytes).
    pub comm: String,
    /// Its state letter (`R`, `S`, `Z`, …).
    pub state: char,
    /// Its start time in clock ticks since boot (with the PID, its identity).
    pub start: u64,
    /// User plus system CPU time in clock ticks.
    pub cpu_ticks: u64,
}

impl Proc {
    /// Reads one process; `None` if it is gone.
    pub fn read(pid: i32) -> Option<Proc> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let comm = stat.get(open + 1..close)?.to_string();
        // Fields after the command: state is field 3, ppid 4, utime 14, stime 15, start 22.
        let rest: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
        let field = |n: usize| rest.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        Some(Proc {
            pid,
            ppid: field(4)? as i32,
            comm,
            state: rest.first()?.chars().next()?,
            start: field(22)?,
            cpu_ticks: field(14)? + field(15)?,
        })
    }

    /// True if it is still the same process (same start time) and not a zombie.
    pub fn still_alive(&self) -> bool {
        Proc::read(self.pid).is_some_and(|p| p.start == self.start && p.state != 'Z')
    }
}

/// True if the process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    Proc::read(pid).is_some_and(|p| p.state != 'Z')
}

/// Every process of the machine, by PID.
pub fn all_procs() -> HashMap<i32, Proc> {
    let mut out = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok())
                && let Some(p) = Proc::read(pid)
            {
                out.insert(pid, p);
            }
        }
    }
    out
}

/// The descendants of `root` (not `root` itself), parents before children.
pub fn descendants(root: i32) -> Vec<Proc> {
    let all = all_procs();
    let mut children: HashMap<i32, Vec<&Proc>> = HashMap::new();
    for p in all.values() {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        for c in children.get(&pid).map(Vec::as_slice).unwrap_or_default() {
            out.push((*c).clone());
            todo.push(c.pid);
        }
    }
    out
}

/// SIGKILLs every process of `procs` that is still the same process.
pub fn kill_all(procs: &[Proc]) {
    for p in procs {
        if p.still_alive() {
            kill(p.pid, SIGKILL);
        }
    }
}

/// Waits until no process of `procs` is alive (as itself), up to `timeout`.
pub fn wait_gone(procs: &[Proc], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !procs.iter().any(Proc::still_alive) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Memory of one process, in KiB: resident (VmRSS), its shared-memory part (RssShmem)
/// and proportional (Pss, shared pages divided among their users).
#[derive(Clone, Copy, Debug, Default)]
pub struct Mem {
    /// VmRSS.
    pub rss: u64,
    /// RssShmem.
    pub shmem: u64,
    /// Pss.
    pub pss: u64,
    /// Anonymous: heap, stacks and written copies of data, which no other process or
    /// cache holds (unlike code and constants, pages of files in the page cache).
    pub anon: u64,
}

impl Mem {
    /// Reads a process's memory (zeros if it is gone).
    pub fn of(pid: i32) -> Mem {
        let field = |text: &str, name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rollup =
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        Mem {
            rss: field(&status, "VmRSS:"),
            shmem: field(&status, "RssShmem:"),
            pss: field(&rollup, "Pss:"),
            anon: field(&rollup, "Anonymous:"),
        }
    }

    /// The sum over several processes.
    pub fn sum(pids: &[i32]) -> Mem {
        pids.iter()
            .map(|&p| Mem::of(p))
            .fold(Mem::default(), |a, b| Mem {
                rss: a.rss + b.rss,
                // Processes that share memory map the same files: counted once.
                shmem: a.shmem.max(b.shmem),
                pss: a.pss + b.pss,
                anon: a.anon + b.anon,
            })
    }
}

/// CPU time used so far by several processes, in clock ticks (utime + stime).
pub fn cpu_ticks(pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|&p| Proc::read(p))
        .map(|p| p.cpu_ticks)
        .sum()
}

/// A scratch directory on tmpfs (`/dev/shm`), removed on drop unless `HAM_BENCH_KEEP`
/// is set (then its path is printed, to read the nodes' logs after a run).
pub struct Scratch(PathBuf);

impl Scratch {
    /// A fresh directory named after `tag` and this process.
    pub fn new(tag: &str) -> anyhow::Result<Scratch> {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let p = base.join(format!("ham-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).with_context(|| format!("cannot create {}", p.display()))?;
        Ok(Scratch(p))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A new subdirectory.
    pub fn subdir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let p = self.join(name);
        std::fs::create_dir_all(&p).with_context(|| format!("cannot create {}", p.display()))?;
        Ok(p)
    }

    /// Makes a FIFO inside it.
    pub fn fifo(&self, name: &str) -> anyhow::Result<PathBuf> {
        let p = self.join(name);
        let ok = Command::new("mkfifo")
            .arg(&p)
            .status()
            .context("cannot run mkfifo")?
            .success();
        if !ok {
            bail!("mkfifo {} failed", p.display());
        }
        Ok(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("HAM_BENCH_KEEP").is_some() {
            eprintln!("   kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A reader of "PID NANOS" lines from a FIFO, which it holds open for reading and
/// writing (so it never sees end-of-file between two writers).
pub struct FifoReader {
    file: std::fs::File,
    buf: Vec<u8>,
    path: PathBuf,
}

impl FifoReader {
    /// Opens the FIFO.
    pub fn open(path: &Path) -> anyhow::Result<FifoReader> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(FifoReader {
            file,
            buf: Vec::new(),
            path: path.to_path_buf(),
        })
    }

    /// The next "PID NANOS" line, waiting at most `timeout`.
    pub fn next(&mut self, timeout: Duration) -> anyhow::Result<(i32, u64)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let mut it = line.split_whitespace();
                let pid = it.next().and_then(|p| p.parse().ok());
                let ns = it.next().and_then(|n| n.parse().ok());
                return match (pid, ns) {
                    (Some(p), Some(n)) => Ok((p, n)),
                    _ => bail!("malformed line from the child: {line:?}"),
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no line on {} within {:?}: the replacement did not start",
                    self.path.display(),
                    timeout
                );
            }
            let ts = rustix::time::Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            let mut fds = [rustix::event::PollFd::new(
                &self.file,
                rustix::event::PollFlags::IN,
            )];
            match rustix::event::poll(&mut fds, Some(&ts)) {
                Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(e).context("poll on the FIFO"),
            }
            let mut chunk = [0u8; 256];
            let n = self.file.read(&mut chunk).context("read from the FIFO")?;
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The clock ticks per second of `/proc/PID/stat` times.
pub fn ticks_per_second() -> f64 {
    rustix::param::clock_ticks_per_second() as f64
}

/// The CPU that some processes use over a stretch of time.
pub struct CpuWatch {
    procs: Vec<(&'static str, i32)>,
    start: Vec<u64>,
    t0: Instant,
}

impl CpuWatch {
    /// Starts watching `procs` (a name for the report, a PID).
    pub fn start(procs: &[(&'static str, i32)]) -> CpuWatch {
        CpuWatch {
            procs: procs.to_vec(),
            start: procs.iter().map(|&(_, p)| cpu_ticks(&[p])).collect(),
            t0: Instant::now(),
        }
    }

    /// The seconds elapsed since the start, and the CPU seconds each process used.
    pub fn stop(&self) -> (f64, Vec<(&'static str, f64)>) {
        let wall = self.t0.elapsed().as_secs_f64();
        let used = self
            .procs
            .iter()
            .zip(&self.start)
            .map(|(&(name, pid), &s)| {
                let ticks = cpu_ticks(&[pid]).saturating_sub(s);
                (name, ticks as f64 / ticks_per_second())
            })
            .collect();
        (wall, used)
    }
}
