//! The benchmark's supervised process. At its first instructions it reads
//! CLOCK_MONOTONIC and writes "PID NANOS\n" to the FIFO named by `$HAM_BENCH_FIFO`
//! (or, without it, by its first argument); then, if `$HAM_BENCH_NOTIFY_FD` names a
//! descriptor, it writes a newline there (s6's readiness notification); then it sleeps
//! until killed, or, if `$HAM_BENCH_THEN_EXEC` holds a command line (words split on
//! whitespace, e.g. `sleep 1000000`), execs that in its place. Every supervisor under
//! test runs this same binary.

use std::io::Write;
use std::os::unix::process::CommandExt;

fn main() {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let nanos = t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64;
    // The variable first: s6-supervise gives `./run` the service's name as argument.
    let fifo = std::env::var_os("HAM_BENCH_FIFO").or_else(|| std::env::args_os().nth(1));
    if let Some(fifo) = fifo
        && let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(fifo)
    {
        // One write of less than PIPE_BUF bytes: atomic even with other writers.
        let _ = f.write_all(format!("{} {nanos}\n", std::process::id()).as_bytes());
    }
    if let Some(fd) = std::env::var("HAM_BENCH_NOTIFY_FD")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/self/fd/{fd}"))
    {
        let _ = f.write_all(b"\n");
    }
    if let Some(line) = std::env::var_os("HAM_BENCH_THEN_EXEC") {
        let line = line.to_string_lossy().into_owned();
        let mut words = line.split_whitespace();
        if let Some(program) = words.next() {
            let err = std::process::Command::new(program).args(words).exec();
            eprintln!("ham-bench-child: cannot exec {line:?}: {err}");
            std::process::exit(127);
        }
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
