//! The clocks the engine is driven by.

use ham_core::Now;
use rustix::time::{ClockId, clock_gettime};

/// Nanoseconds on `CLOCK_MONOTONIC`, shared by every process of the machine.
pub fn mono_ns() -> u64 {
    let t = clock_gettime(ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The current time for the engine.
pub fn now() -> Now {
    let wall_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Now {
        mono_ms: mono_ns() / 1_000_000,
        wall_ms,
    }
}

/// A precise one-shot timer on `CLOCK_MONOTONIC` (a timerfd): tokio's own timers
/// round deadlines up to whole milliseconds, which would make missed-heartbeat
/// detection up to a millisecond late.
pub struct DeadlineTimer {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    armed: Option<u64>,
}

impl DeadlineTimer {
    /// A disarmed timer, registered with the runtime.
    pub fn new() -> std::io::Result<DeadlineTimer> {
        use rustix::time::{TimerfdClockId, TimerfdFlags, timerfd_create};
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        // `AsyncFd::new` is deprecated because it cannot check I/O safety; the timerfd
        // is owned by the `AsyncFd` itself for its whole life, so it is sound here (the
        // `unsafe` replacement is not allowed in this crate).
        #[allow(deprecated)]
        let fd = tokio::io::unix::AsyncFd::new(fd)?;
        Ok(DeadlineTimer { fd, armed: None })
    }

    /// Arms the timer for a deadline in monotonic milliseconds (`None` disarms it).
    pub fn set(&mut self, deadline_ms: Option<u64>) {
        use rustix::time::{Itimerspec, TimerfdTimerFlags, Timespec, timerfd_settime};
        if self.armed == deadline_ms {
            return;
        }
        self.armed = deadline_ms;
        let value = match deadline_ms {
            // A zero it_value disarms; an absolute deadline of 0 would too, so use 1 ns.
            Some(ms) => Timespec {
                tv_sec: (ms / 1000) as i64,
                tv_nsec: ((ms % 1000) * 1_000_000).max(1) as i64,
            },
            None => Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
        };
        let spec = Itimerspec {
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        if let Err(e) = timerfd_settime(self.fd.get_ref(), TimerfdTimerFlags::ABSTIME, &spec) {
            tracing::error!("cannot arm the timer: {e}");
        }
    }

    /// Waits until the armed deadline passes (forever if disarmed).
    pub async fn expired(&mut self) {
        if self.armed.is_none() {
            return std::future::pending().await;
        }
        loop {
            let Ok(mut guard) = self.fd.readable().await else {
                return std::future::pending().await;
            };
            let mut buf = [0u8; 8];
            match rustix::io::read(self.fd.get_ref(), &mut buf) {
                Ok(8) => {
                    self.armed = None;
                    return;
                }
                _ => guard.clear_ready(),
            }
        }
    }
}
