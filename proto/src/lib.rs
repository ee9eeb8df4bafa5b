//! ham's control API, generated from `proto/ham.proto` with prost and tonic.
//!
//! Invariant: only this crate holds prost types; the engine's own model lives in
//! `ham-core` and the node converts at its edge.

#![allow(missing_docs, clippy::all)]

/// Version 1 of the API (package `ham.v1`).
pub mod v1 {
    tonic::include_proto!("ham.v1");
}

pub use v1::*;

/// Encoding and decoding of these messages outside gRPC (the mesh's event feeds).
pub use prost::Message;

pub mod socket;

/// A status carried in a frame (event feeds, raise streams) as the caller's status; a
/// code it does not know is `Unknown`.
impl From<FeedStatus> for tonic::Status {
    fn from(s: FeedStatus) -> tonic::Status {
        tonic::Status::new(tonic::Code::from_i32(s.code), s.message)
    }
}

/// A status as a frame carries it.
impl From<&tonic::Status> for FeedStatus {
    fn from(s: &tonic::Status) -> FeedStatus {
        FeedStatus {
            code: s.code() as i32,
            message: s.message().to_string(),
        }
    }
}

/// Default locations shared by `hamd` and its clients.
pub mod defaults {
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;

    /// The control socket: `/run/ham/ham.sock` for root, else under the user's runtime
    /// directory (`$XDG_RUNTIME_DIR/ham/ham.sock`, or `/tmp/ham-UID/ham.sock`).
    pub fn socket_path() -> PathBuf {
        let uid = std::fs::metadata("/proc/self")
            .map(|m| m.uid())
            .unwrap_or(0);
        if uid == 0 {
            return PathBuf::from("/run/ham/ham.sock");
        }
        match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(d) if !d.is_empty() => PathBuf::from(d).join("ham").join("ham.sock"),
            _ => PathBuf::from(format!("/tmp/ham-{uid}/ham.sock")),
        }
    }
}
