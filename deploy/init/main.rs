//! `init`: the container image's PID 1 (std only, no crates; built by
//! deploy/build-image.sh with `rustc -C opt-level=2 -C target-feature=+crt-static`).
//!
//!     init PROGRAM [ARGS…]
//!
//! It starts PROGRAM (the service), forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1
//! and SIGUSR2 to it, reaps every child (orphans re-parented to it included) and, once
//! the service is gone, stops what is left and exits with the service's status
//! (its exit code, or 128 + the signal that killed it).
//!
//! "The service" is every live descendant running PROGRAM's executable, not only the
//! process init started: `hamd` is a HAM/Guardian pair of one binary, and when the HAM
//! dies its Guardian (re-parented to init) takes over. So init carries on while any
//! process of that executable lives, and forwards signals to those that are its own
//! children (the current HAM; a Guardian's parent is its HAM).
//!
//! Signals are blocked and taken with `sigtimedwait`: a PID 1 only receives signals it
//! does not leave at their default action, and blocked signals are never dropped.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

// The few libc functions std does not wrap (glibc, x86_64 Linux layouts).
#[derive(Clone, Copy)]
#[repr(C)]
struct SigSet([u64; 16]); // glibc's sigset_t: 1024 bits; signal n is bit n - 1.
#[repr(C)]
struct Timespec {
    tv_sec: i64,
    tv_nsec: i64,
}
extern "C" {
    fn sigprocmask(how: i32, set: *const SigSet, old: *mut SigSet) -> i32;
    fn sigtimedwait(set: *const SigSet, info: *mut u8, timeout: *const Timespec) -> i32;
    fn waitpid(pid: i32, status: *mut i32, options: i32) -> i32;
    fn kill(pid: i32, sig: i32) -> i32;
    fn prctl(option: i32, ...) -> i32;
}
const SIG_BLOCK: i32 = 0;
const SIG_UNBLOCK: i32 = 1;
const WNOHANG: i32 = 1;
const PR_SET_CHILD_SUBREAPER: i32 = 36;
const SIGHUP: i32 = 1;
const SIGINT: i32 = 2;
const SIGQUIT: i32 = 3;
const SIGKILL: i32 = 9;
const SIGUSR1: i32 = 10;
const SIGUSR2: i32 = 12;
const SIGTERM: i32 = 15;
const SIGCHLD: i32 = 17;
const FORWARDED: [i32; 6] = [SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGTERM];
/// How long the processes left after the service get between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(3);

fn say(msg: &str) {
    eprintln!("init: {msg}");
}

/// Waits up to `timeout` for one of the blocked signals; None on timeout.
fn next_signal(set: &SigSet, timeout: Duration) -> Option<i32> {
    let ts = Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: timeout.subsec_nanos() as i64,
    };
    // SAFETY: `set` and `ts` are valid for the call; a null info is allowed.
    let sig = unsafe { sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

/// Reaps every exited child; returns (pid, status) of each.
fn reap() -> Vec<(i32, i32)> {
    let mut out = Vec::new();
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer.
        let pid = unsafe { waitpid(-1, &mut status, WNOHANG) };
        if pid <= 0 {
            return out; // 0: none exited yet; -1: no children (ECHILD)
        }
        out.push((pid, status));
    }
}

/// True while init has any child at all, exited or not.
fn has_children() -> bool {
    let mut status = 0;
    // SAFETY: as in reap(); WNOHANG never blocks. A child reaped here is not lost
    // information: only the service's status matters and it is taken before this.
    let pid = unsafe { waitpid(-1, &mut status, WNOHANG) };
    pid >= 0
}

/// A wait status as a shell would report it.
fn exit_code(status: i32) -> i32 {
    let sig = status & 0x7f;
    if sig == 0 {
        (status >> 8) & 0xff
    } else {
        128 + sig
    }
}

fn describe(status: i32) -> String {
    let sig = status & 0x7f;
    if sig == 0 {
        format!("exit {}", (status >> 8) & 0xff)
    } else {
        format!("signal {sig}")
    }
}

/// The executable's identity: (device, inode) of /proc/PID/exe.
fn exe_of(pid: i32) -> Option<(u64, u64)> {
    let m = std::fs::metadata(format!("/proc/{pid}/exe")).ok()?;
    Some((m.dev(), m.ino()))
}

/// The parent PID of a live process.
fn ppid_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) STATE PPID …": COMM may hold anything, so split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// True if `pid` descends from `me` (`docker exec`'d processes do not: their parent
/// is outside the container, PID 0 in it).
fn descends_from(mut pid: i32, me: i32) -> bool {
    for _ in 0..64 {
        match ppid_of(pid) {
            Some(p) if p == me => return true,
            Some(p) if p > 1 => pid = p,
            _ => return false,
        }
    }
    false
}

/// Our live descendants running the service's executable (zombies have no exe).
fn service_pids(exe: (u64, u64), me: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me && exe_of(pid) == Some(exe) && descends_from(pid, me))
        .collect()
}

fn main() {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.is_empty() {
        say("usage: init PROGRAM [ARGS…]");
        std::process::exit(2);
    }
    let me = std::process::id() as i32;
    let mut set = SigSet([0; 16]);
    for sig in FORWARDED.iter().chain(&[SIGCHLD]) {
        set.0[0] |= 1 << (sig - 1);
    }
    // SAFETY: plain libc calls on valid pointers. Blocking before the spawn means no
    // signal is lost.
    unsafe {
        sigprocmask(SIG_BLOCK, &set, std::ptr::null_mut());
        if me != 1 {
            // Not PID 1 (e.g. tried on a host): adopt orphans all the same.
            prctl(PR_SET_CHILD_SUBREAPER, 1u64, 0u64, 0u64, 0u64);
        }
    }
    let mut command = std::process::Command::new(&args[0]);
    command.args(&args[1..]);
    // The mask survives exec and std does not reset it: unblock in the child.
    // SAFETY: sigprocmask is async-signal-safe; the closure touches only its copy.
    unsafe {
        command.pre_exec(move || {
            sigprocmask(SIG_UNBLOCK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    let main_pid = match command.spawn() {
        Ok(child) => child.id() as i32, // reaped below by waitpid(-1), never by std
        Err(e) => {
            say(&format!("cannot start {}: {e}", args[0].to_string_lossy()));
            std::process::exit(if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            });
        }
    };
    let Some(mut exe) = exe_of(main_pid) else {
        say("the service exited at once");
        let status = reap()
            .into_iter()
            .find(|&(p, _)| p == main_pid)
            .map_or(1, |(_, s)| exit_code(s));
        std::process::exit(status);
    };
    // Our children that run the service: they get forwarded signals and their status.
    let mut leaders = vec![main_pid];
    let mut status = 0;
    loop {
        // A periodic look as well as SIGCHLD, so nothing can leave init waiting forever.
        match next_signal(&set, Duration::from_secs(5)) {
            Some(SIGCHLD) | None => {}
            Some(sig) => {
                for &pid in &leaders {
                    // SAFETY: kill has no memory effects.
                    unsafe { kill(pid, sig) };
                }
            }
        }
        for (pid, st) in reap() {
            if leaders.contains(&pid) {
                status = st;
                let others = service_pids(exe, me);
                if !others.is_empty() {
                    say(&format!(
                        "pid {pid} exited ({}); pid {others:?} of the same program carries on",
                        describe(st)
                    ));
                }
            }
        }
        // A leader may have exec'd another program since (a wrapper script's `exec`).
        if let Some(e) = leaders.iter().find_map(|&p| exe_of(p)) {
            exe = e;
        }
        let alive = service_pids(exe, me);
        if alive.is_empty() {
            break;
        }
        // Normally exactly one: the HAM. Should none be our child yet, signal them all.
        let ours: Vec<i32> = alive
            .iter()
            .copied()
            .filter(|&p| ppid_of(p) == Some(me))
            .collect();
        leaders = if ours.is_empty() { alive } else { ours };
    }
    // The service is gone: stop what it left behind, then exit with its status.
    let everyone = |sig: i32| {
        if me == 1 {
            // SAFETY: kill(-1) from a namespace's PID 1 signals every other process in it.
            unsafe { kill(-1, sig) };
        } else if let Ok(dir) = std::fs::read_dir("/proc") {
            for pid in dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
                if ppid_of(pid) == Some(me) {
                    // SAFETY: as above.
                    unsafe { kill(pid, sig) };
                }
            }
        }
    };
    if has_children() {
        everyone(SIGTERM);
        let deadline = Instant::now() + GRACE;
        while has_children() && Instant::now() < deadline {
            match next_signal(&set, Duration::from_millis(100)) {
                Some(SIGTERM) | Some(SIGINT) => break,
                _ => {
                    reap();
                }
            }
        }
        everyone(SIGKILL);
        reap();
    }
    std::process::exit(exit_code(status));
}
