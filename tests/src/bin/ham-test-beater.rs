//! A test entity: beats its shared-memory heartbeat `COUNT` times every `PERIOD_MS`,
//! then goes silent (but stays alive) so that missed-heartbeat conditions fire.

fn main() {
    let mut args = std::env::args().skip(1);
    let period: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(50);
    let count: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(u64::MAX);
    let hb = match ham::Heartbeat::from_env() {
        Ok(Some(hb)) => hb,
        Ok(None) => {
            eprintln!("ham-test-beater: not started by hamd (no HAM_BEAT_* in the environment)");
            std::process::exit(2);
        }
        Err(e) => {
            eprintln!("ham-test-beater: {e}");
            std::process::exit(2);
        }
    };
    for _ in 0..count {
        hb.beat();
        std::thread::sleep(std::time::Duration::from_millis(period));
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
