//! The scenarios, one module each. Each takes the run's [`Ctx`] and returns rows for the
//! report; each stops by itself and cleans up what it started, also on error (the
//! supervisors, hamd and scratch directories are guards that clean up on drop).

pub mod footprint;
pub mod heartbeat;
pub mod lateness;
pub mod mesh_events;
pub mod mesh_scale;
pub mod node_down;
pub mod node_soak;
pub mod restart;
pub mod takeover;

use crate::hamd::Bins;
use crate::sut::Kind;
use std::time::Duration;

/// What a scenario needs to know about the run.
#[derive(Clone, Debug)]
pub struct Ctx {
    /// Where `hamd`, `ham` and `ham-bench-child` are.
    pub bins: Bins,
    /// Quick mode: a few seconds in all, for CI.
    pub quick: bool,
    /// The peers installed, in report order.
    pub peers: Vec<Kind>,
    /// `--peers`: only these peers (by Debian package), if given.
    pub only_peers: Option<Vec<String>>,
    /// How long the false-positive soak keeps the mesh running.
    pub soak: Duration,
    /// `--takeover-sizes`: only these entity counts in `takeover`, if given.
    pub takeover_sizes: Option<Vec<usize>>,
}

impl Ctx {
    /// `full` in a full run, `quick` in quick mode.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }

    /// True unless `--peers` leaves out the peer from Debian package `package`.
    pub fn wants_peer(&self, package: &str) -> bool {
        self.only_peers
            .as_ref()
            .is_none_or(|only| only.iter().any(|p| p == package))
    }
}
