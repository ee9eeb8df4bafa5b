//! `kill`: sends a signal to processes (std only; built like `init`). The image has
//! no shell and no procps; the cluster tests use this to SIGKILL a monitored process
//! inside a container (`docker exec C kill -9 PID`).
//!
//!     kill [-SIGNAL] PID…            (SIGNAL: a number or a name, default TERM)

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

fn signal(s: &str) -> Option<i32> {
    let s = s.to_ascii_uppercase();
    let name = s.strip_prefix("SIG").unwrap_or(&s);
    let known = [
        ("HUP", 1),
        ("INT", 2),
        ("QUIT", 3),
        ("KILL", 9),
        ("USR1", 10),
        ("USR2", 12),
        ("TERM", 15),
        ("CONT", 18),
        ("STOP", 19),
    ];
    known
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, v)| v)
        .or_else(|| name.parse().ok())
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut sig = 15;
    if let Some(first) = args.first().and_then(|a| a.strip_prefix('-')) {
        match signal(first) {
            Some(s) => sig = s,
            None => {
                eprintln!("kill: {first:?} is not a signal");
                std::process::exit(2);
            }
        }
        args.remove(0);
    }
    if args.is_empty() {
        eprintln!("usage: kill [-SIGNAL] PID…");
        std::process::exit(2);
    }
    let mut failed = false;
    for a in &args {
        let Ok(pid) = a.parse::<i32>() else {
            eprintln!("kill: {a:?} is not a PID");
            failed = true;
            continue;
        };
        // SAFETY: kill(2) has no memory effects.
        if unsafe { kill(pid, sig) } != 0 {
            eprintln!("kill: {pid}: {}", std::io::Error::last_os_error());
            failed = true;
        }
    }
    std::process::exit(i32::from(failed));
}
