//! CPU load: threads that spin until dropped, so a scenario can run on a busy
//! machine.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

/// Busy-looping threads; dropping it stops and joins them.
pub struct Burner {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Burner {
    /// Starts `n` threads that each keep one CPU busy.
    pub fn start(n: usize) -> anyhow::Result<Burner> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut b = Burner {
            stop: stop.clone(),
            threads: Vec::new(),
        };
        for i in 0..n {
            let stop = stop.clone();
            b.threads.push(
                std::thread::Builder::new()
                    .name(format!("burner-{i}"))
                    .spawn(move || {
                        let mut x = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            for _ in 0..10_000 {
                                x = std::hint::black_box(x.wrapping_mul(6364136223846793005) + 1);
                            }
                        }
                    })?,
            );
        }
        Ok(b)
    }
}

impl Drop for Burner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
