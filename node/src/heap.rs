//! Giving the free heap back after bursts of work. Starting or reloading thousands of
//! entities, or a flood of events, frees far more than it keeps, and glibc keeps what
//! is freed below the top of a heap mapped for reuse; a daemon that stays up for
//! months should not carry its peaks. A steady load frees and reuses about as much as
//! it allocates, and is left alone.

use guardian::shm::resident::{free_heap_bytes, release_free_heap};

/// Free heap that grew by more than this since the least seen is given back.
const GROWTH: usize = 1 << 20;

/// Watches the free heap and gives it back when it grew (see the module docs).
#[derive(Default)]
pub struct HeapTrim {
    /// The least free heap seen since the last trim; `None` before the first look,
    /// which always gives back (the start's garbage).
    floor: Option<usize>,
}

impl HeapTrim {
    /// Looks at the free heap (cheap: the allocator's counters); gives it back at the
    /// first look, and then if it grew by more than [`GROWTH`] since the least seen.
    /// Returns whether it did.
    pub fn look(&mut self) -> bool {
        let free = free_heap_bytes();
        match self.floor {
            Some(floor) if free <= floor + GROWTH => {
                self.floor = Some(floor.min(free));
                false
            }
            _ => {
                let trimmed = release_free_heap();
                tracing::debug!(free, trimmed, "free heap given back");
                // What was given back still counts as free: the floor starts from here.
                self.floor = Some(free_heap_bytes());
                true
            }
        }
    }
}
