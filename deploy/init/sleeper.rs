//! `sleeper`: the monitored process of the container image (std only; built like
//! `init`). A FROM-scratch image has no shell or `sleep`, so this stands in for a
//! service: it prints a line every few seconds until it is killed.
//!
//!     sleeper [LABEL] [SECONDS]      (defaults: "sleeper", 5)

use std::io::Write;
use std::time::Duration;

fn main() {
    let mut args = std::env::args().skip(1);
    let label = args.next().unwrap_or_else(|| "sleeper".to_string());
    let secs = match args.next().map(|s| s.parse::<u64>()) {
        None => 5,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("usage: sleeper [LABEL] [SECONDS > 0]");
            std::process::exit(2);
        }
    };
    let pid = std::process::id();
    for tick in 1u64.. {
        // A closed stdout must not end the service: ignore write errors.
        let _ = writeln!(std::io::stdout(), "{label}: pid {pid} tick {tick}");
        std::thread::sleep(Duration::from_secs(secs));
    }
}
