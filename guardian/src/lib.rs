//! The HAM/Guardian pair's foundation: the shared-memory region that holds all of the
//! HAM's state, crash-consistent at every instruction, and the heartbeat table.
//!
//! Invariant: [`shm`] is the only module of the workspace allowed `unsafe` code.

pub mod pair;
#[allow(unsafe_code)]
pub mod shm;
