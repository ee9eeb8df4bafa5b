//! ham's pure logic: the model, the recovery engine as a state machine, and the codec
//! of the records it keeps in the shared-memory store.
//!
//! Invariant: this crate does no I/O. It never touches a socket, a clock, a file or a
//! process; time comes in as an argument and effects go out as [`engine::Command`]s.

pub mod config;
pub mod engine;
pub mod error;
pub mod event;
pub mod ids;
pub mod record;
pub mod singleton;
pub mod spec;

pub use engine::{BeatProbe, Command, Engine, Input, Reply, Request, Resume, Step};
pub use error::EngineError;
pub use event::{Event, EventFilter, EventKind};
pub use ids::{EntityId, EventSeq, Now, ProcessRef, RunId};
