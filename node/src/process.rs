//! Processes: spawning entities, identifying them by (PID, start time), watching
//! them through pidfds (children and non-children alike), and signalling them.

use ham_core::engine::state::ExitStatus;
use ham_core::ids::ProcessRef;
use ham_core::spec::CommandSpec;
use rustix::process::{
    Pid, PidfdFlags, Signal, WaitId, WaitIdOptions, pidfd_open, pidfd_send_signal, waitid,
};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use tokio::io::unix::AsyncFd;

/// Reads a process's start time (field 22 of `/proc/PID/stat`, clock ticks since boot).
pub fn start_time(pid: i32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: skip past it.
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc stat"))?;
    // After ')' come fields 3, 4, …; the start time is field 22, the 20th of them.
    after
        .split_whitespace()
        .nth(19)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc stat"))
}

/// Identifies a running process: its PID and start time.
pub fn identify(pid: i32) -> io::Result<ProcessRef> {
    if pid <= 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "pid must be positive",
        ));
    }
    Ok(ProcessRef {
        pid,
        start_time: start_time(pid)?,
    })
}

/// A pidfd that is known to refer to the process in `proc` (not a reused PID).
pub struct ProcessHandle {
    /// The process.
    pub proc: ProcessRef,
    fd: OwnedFd,
}

impl ProcessHandle {
    /// Opens a pidfd for `pid`, a child of this process that nobody has reaped: its
    /// PID cannot have been reused, so no start time is read (`start_time` is 0).
    /// Reading it would wait while the child is still in `exec`, which can take
    /// milliseconds when the kernel is busy with the shared libraries it maps.
    /// (`spawn` fills the start time in where the clock can tell it.)
    pub fn own_child(pid: i32) -> io::Result<ProcessHandle> {
        let raw = Pid::from_raw(pid)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "pid must be positive"))?;
        Ok(ProcessHandle {
            proc: ProcessRef { pid, start_time: 0 },
            fd: pidfd_open(raw, PidfdFlags::empty())?,
        })
    }

    /// Opens a pidfd for `proc`, then checks the start time: a PID that was reused
    /// by another process since is refused (`NotFound`).
    pub fn open(proc: ProcessRef) -> io::Result<ProcessHandle> {
        let pid = Pid::from_raw(proc.pid)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "pid must be positive"))?;
        let fd = pidfd_open(pid, PidfdFlags::empty())?;
        // The pidfd pins the process it was opened for; if that process still has the
        // start time we recorded, it is ours.
        match start_time(proc.pid) {
            Ok(t) if t == proc.start_time => Ok(ProcessHandle { proc, fd }),
            _ => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "process {} is gone (its PID was reused or it exited)",
                    proc.pid
                ),
            )),
        }
    }

    /// A pidfd the previous HAM opened and verified, handed over at takeover: no
    /// `/proc` read, and no window in which the PID could have been reused.
    pub fn from_handed(proc: ProcessRef, fd: OwnedFd) -> ProcessHandle {
        ProcessHandle { proc, fd }
    }

    /// The pidfd.
    pub fn pidfd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Sends a signal through the pidfd (never reaches a process that reused the PID).
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        let sig = Signal::from_named_raw(signal)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "unknown signal"))?;
        pidfd_send_signal(self.fd.as_fd(), sig).map_err(io::Error::from)
    }

    /// Waits until the process ends and returns how, reaping it if it is our child.
    pub async fn wait(self: Arc<Self>) -> ExitStatus {
        // `AsyncFd::with_interest` is deprecated because it cannot check I/O safety;
        // here the fd is owned by the `ProcessHandle` the `Arc` keeps alive for the
        // whole life of the `AsyncFd`, and `as_raw_fd` always returns that same fd.
        // (The replacement, `register_with_interest`, is `unsafe`, which this crate
        // does not allow.)
        #[allow(deprecated)]
        let registered = AsyncFd::with_interest(self.clone(), tokio::io::Interest::READABLE);
        let Ok(afd) = registered else {
            // Another waiter registered this pidfd already: poll its readiness instead.
            loop {
                if self.has_exited() {
                    return self.reap().unwrap_or(ExitStatus::Unknown);
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        };
        loop {
            let Ok(mut guard) = afd.readable().await else {
                return ExitStatus::Unknown;
            };
            match self.reap() {
                Some(status) => return status,
                None => guard.clear_ready(),
            }
        }
    }

    /// True once the process has exited (its pidfd is readable).
    pub fn has_exited(&self) -> bool {
        let mut fds = [rustix::event::PollFd::new(
            &self.fd,
            rustix::event::PollFlags::IN,
        )];
        let zero = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
    }

    /// The exit status if the process has ended: read from `waitid` for our children,
    /// `Unknown` for others (only the parent can learn it).
    pub fn reap(&self) -> Option<ExitStatus> {
        match waitid(
            WaitId::PidFd(self.fd.as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
        ) {
            Ok(Some(st)) => Some(if let Some(code) = st.exit_status() {
                ExitStatus::Code(code)
            } else if let Some(signal) = st.terminating_signal() {
                ExitStatus::Signal {
                    signal,
                    core: st.dumped(),
                }
            } else {
                ExitStatus::Unknown
            }),
            Ok(None) => {
                // Our child, still running: a spurious wake-up.
                None
            }
            // Not our child: the pidfd became readable, so it has exited.
            Err(_) => Some(ExitStatus::Unknown),
        }
    }
}

impl std::os::fd::AsRawFd for ProcessHandle {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.fd)
    }
}

/// Finds a live process whose environment holds every `(name, value)` pair (the
/// variables `hamd` gives the processes it starts). Only other-than-zombie processes
/// of this user are readable; the scan is for the rare interrupted start.
pub fn find_by_env(vars: &[(&str, &str)]) -> Option<ProcessRef> {
    let wanted: Vec<Vec<u8>> = vars
        .iter()
        .map(|(k, v)| format!("{k}={v}").into_bytes())
        .collect();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let found: Vec<&[u8]> = env.split(|b| *b == 0).collect();
        if wanted.iter().all(|w| found.contains(&w.as_slice()))
            && let Ok(proc) = identify(pid)
        {
            return Some(proc);
        }
    }
    None
}

/// Sends a signal to a bare PID (a signal action's fixed target).
pub fn signal_pid(pid: i32, signal: i32) -> io::Result<()> {
    let pid = Pid::from_raw(pid)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "pid must be positive"))?;
    let sig = Signal::from_named_raw(signal)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "unknown signal"))?;
    rustix::process::kill_process(pid, sig).map_err(io::Error::from)
}

/// Builds the `std` command for a command line, in its own process group (so a
/// terminal's Ctrl-C to `hamd` does not reach the entities), stdin from /dev/null.
pub fn command(spec: &CommandSpec, extra_env: &[(String, String)]) -> std::process::Command {
    let mut cmd = std::process::Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .envs(&spec.env)
        .envs(extra_env.iter().map(|(k, v)| (k, v)))
        // A Guardian-turned-HAM still carries the variable that made it a Guardian.
        .env_remove(guardian::pair::GUARDIAN_ENV)
        .stdin(Stdio::null())
        .process_group(0);
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    cmd
}

/// Starts an entity's process and returns a handle on it. The child is left unreaped
/// (its pidfd watcher reaps it with its exit status), so its pidfd, opened here, is
/// known to refer to it.
///
/// Its start time is not read from `/proc` when the clock can tell it: reading
/// `/proc/PID/stat` waits for the child's `exec` to let go of its exec lock, and when
/// it does, the HAM, woken, takes the CPU from the child in the middle of its restart
/// (seen in scheduler traces of the restart benchmark: one restart in five).
pub fn spawn(spec: &CommandSpec, extra_env: &[(String, String)]) -> io::Result<ProcessHandle> {
    let before = boot_ns();
    let child = command(spec, extra_env).spawn()?;
    let after = boot_ns();
    let pid = child.id() as i32;
    // Dropping `Child` neither kills nor waits: the pidfd watcher owns the reaping.
    drop(child);
    let mut handle = ProcessHandle::own_child(pid)?;
    handle.proc.start_time = match start_tick_between(before, after) {
        Some(tick) if clock_agrees_with_proc(pid, tick) => tick,
        _ => start_time(pid)?,
    };
    Ok(handle)
}

/// Lets a process just started run before the HAM goes on, if they share a CPU.
///
/// The kernel wakes the HAM from its `vfork` wait while the child is still in `exec`,
/// and usually on the child's CPU, where the HAM, having slept, takes the CPU from it:
/// the new process then waits for the HAM's bookkeeping of the spawn (its store write,
/// events, watch) before it finishes starting. In scheduler traces of the restart
/// benchmark a new process waited so in a third to a half of restarts, 27 µs on
/// average and 645 µs at the 99th percentile; yielding here, 18 µs and 162 µs. When
/// the child runs on the other CPU, this returns at once. The node yields only for
/// the restart of a lone death: after each of many, it would give up a time slice a
/// restart.
pub fn give_way() {
    rustix::thread::sched_yield();
}

/// Nanoseconds on `CLOCK_BOOTTIME`, the clock the kernel stamps a new process with.
fn boot_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// How close to a tick's edge the clock is not trusted to name the tick.
const TICK_EDGE_NS: u64 = 50_000;

/// The start time (in clock ticks, as `/proc/PID/stat` shows it) of a process forked
/// between `before` and `after` (`CLOCK_BOOTTIME` ns), if both fall well inside one
/// tick. The kernel stamps a process with `CLOCK_BOOTTIME` when it forks it and
/// `/proc` shows that stamp in whole ticks, rounded down (proc(5), field 22), so a
/// fork bracketed inside one tick started in that tick. One spawn in fifty or so
/// straddles an edge and is read from `/proc` instead.
fn start_tick_between(before: u64, after: u64) -> Option<u64> {
    let hz = rustix::param::clock_ticks_per_second();
    if hz == 0 || 1_000_000_000 % hz != 0 {
        return None;
    }
    let tick_ns = 1_000_000_000 / hz;
    let first = before.checked_sub(TICK_EDGE_NS)? / tick_ns;
    let last = (after + TICK_EDGE_NS) / tick_ns;
    (first == last).then_some(first)
}

/// Whether the start time the clock gives agrees with `/proc` on this kernel: checked
/// on the first spawn that has one (a kernel that stamped processes differently
/// would otherwise record wrong identities), and trusted from then on.
fn clock_agrees_with_proc(pid: i32, tick: u64) -> bool {
    static AGREES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if let Some(agrees) = AGREES.get() {
        return *agrees;
    }
    let Ok(read) = start_time(pid) else {
        return false;
    };
    let agrees = read == tick;
    if !agrees {
        tracing::warn!(
            "this kernel's process start times do not follow CLOCK_BOOTTIME ({tick} ticks by the clock, {read} in /proc): read from /proc from now on"
        );
    }
    *AGREES.get_or_init(|| agrees)
}

/// Checks before an entity is added that its program and working directory exist,
/// so that `ham entity add` reports a typo at once instead of a failed start later.
pub fn check_runnable(spec: &CommandSpec) -> Result<(), String> {
    let prog = &spec.argv[0];
    let found = if prog.contains('/') {
        is_executable(Path::new(prog))
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| is_executable(&d.join(prog))))
            .unwrap_or(false)
    };
    if !found {
        return Err(format!("program {prog:?} not found or not executable"));
    }
    if let Some(cwd) = &spec.cwd
        && !Path::new(cwd).is_dir()
    {
        return Err(format!("working directory {cwd:?} does not exist"));
    }
    Ok(())
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_self_is_stable_and_differs_from_init() {
        let me = std::process::id() as i32;
        let a = start_time(me).expect("own stat");
        assert_eq!(a, start_time(me).expect("again"));
        assert!(identify(-1).is_err());
    }

    #[tokio::test]
    async fn a_child_is_watched_with_its_exit_code() {
        let spec = CommandSpec::new(["/bin/sh", "-c", "exit 7"]);
        let h = Arc::new(spawn(&spec, &[]).expect("spawns"));
        assert_eq!(h.wait().await, ExitStatus::Code(7));
    }

    #[tokio::test]
    async fn a_killed_child_reports_its_signal() {
        let h = Arc::new(spawn(&CommandSpec::new(["/bin/sleep", "30"]), &[]).expect("spawns"));
        h.signal(9).expect("signals");
        assert_eq!(
            h.clone().wait().await,
            ExitStatus::Signal {
                signal: 9,
                core: false
            }
        );
    }

    #[test]
    fn the_clock_tells_a_tick_only_well_inside_it() {
        let tick = 1_000_000_000 / rustix::param::clock_ticks_per_second();
        let (start, mid) = (7 * tick, 7 * tick + tick / 2);
        assert_eq!(start_tick_between(mid, mid + 100_000), Some(7));
        // Near either edge of the tick, or across one: not told.
        assert_eq!(start_tick_between(start + 10_000, start + 20_000), None);
        assert_eq!(start_tick_between(mid, start + tick - 10_000), None);
        assert_eq!(start_tick_between(mid, start + tick + 10_000), None);
        assert_eq!(start_tick_between(0, 10), None);
    }

    #[test]
    fn start_times_told_by_the_clock_are_those_proc_shows() {
        let mut told = 0;
        for _ in 0..200 {
            let before = boot_ns();
            let mut child = std::process::Command::new("/bin/true")
                .spawn()
                .expect("spawns");
            let after = boot_ns();
            let pid = child.id() as i32;
            if let Some(tick) = start_tick_between(before, after) {
                assert_eq!(tick, start_time(pid).expect("stat"), "pid {pid}");
                told += 1;
            }
            child.wait().expect("reaps");
        }
        // Only spawns that straddle a tick's edge (a few in a hundred) are not told.
        assert!(told > 100, "the clock told only {told} of 200 start times");
        let h = spawn(&CommandSpec::new(["/bin/true"]), &[]).expect("spawns");
        assert_eq!(h.proc, identify(h.proc.pid).expect("identifies"));
        while !h.has_exited() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(h.reap(), Some(ExitStatus::Code(0)));
    }

    #[test]
    fn a_wrong_start_time_is_refused() {
        let me = identify(std::process::id() as i32).expect("self");
        let wrong = ProcessRef {
            pid: me.pid,
            start_time: me.start_time + 1,
        };
        assert!(ProcessHandle::open(wrong).is_err());
    }

    #[test]
    fn a_process_is_found_by_its_environment() {
        let mut child = command(
            &CommandSpec::new(["sleep", "5"]),
            &[(
                "HAM_TEST_MARK".into(),
                format!("find-{}", std::process::id()),
            )],
        )
        .spawn()
        .expect("spawns");
        let mark = format!("find-{}", std::process::id());
        let found = find_by_env(&[("HAM_TEST_MARK", mark.as_str())]).expect("found");
        assert_eq!(found.pid, child.id() as i32);
        assert!(find_by_env(&[("HAM_TEST_MARK", "nobody")]).is_none());
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn missing_programs_are_caught_before_adding() {
        assert!(check_runnable(&CommandSpec::new(["sh"])).is_ok());
        assert!(check_runnable(&CommandSpec::new(["no-such-program-xyz"])).is_err());
        assert!(check_runnable(&CommandSpec::new(["/etc/passwd"])).is_err());
    }
}
