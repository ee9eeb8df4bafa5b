//! The scenarios, one module each. Each takes the run's [`Ctx`] and returns rows for the
//! report; each stops by itself and cleans up what it started, also on error (the
//! supervisors, hamd and scratch directories are guards that clean up on drop).

pub mod footprint;
pub mod heartbeat;
pub mod lateness;
pub mod restart;
pub mod takeover;

use crate::hamd::Bins;
use crate::sut::Kind;

/// What a scenario needs to know about the run.
#[derive(Clone, Debug)]
pub struct Ctx {
    /// Where `hamd`, `ham` and `ham-bench-child` are.
    pub bins: Bins,
    /// Quick mode: a few seconds in all, for CI.
    pub quick: bool,
    /// The peers installed, in report order.
    pub peers: Vec<Kind>,
}

impl Ctx {
    /// `full` in a full run, `quick` in quick mode.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }
}
