//! Shared memory: the crash-consistent state store and the heartbeat table.
//!
//! This is the only module of the workspace with `unsafe` code, all of it in
//! [`region`] (raw access to shared maps), [`pair_lock`] (a robust process-shared
//! mutex) and [`resident`] (giving back start-up pages), each block justified by a
//! `// SAFETY:` comment.

pub mod beats;
pub mod pair_lock;
mod region;
pub mod resident;
pub mod store;

pub use beats::{BeatHandle, BeatTable};
pub use store::{CopyKey, LockedStore, Peek, Peeker, Recovered, Store, StoreParams, Txn};

use std::path::PathBuf;

/// Why a shared-memory file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be opened, sized, mapped or locked.
    #[error("store {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a ham store (or heartbeat table).
    #[error("store {}: bad magic (not a ham store)", .0.display())]
    BadMagic(PathBuf),
    /// The file was written by an unknown layout version.
    #[error("store {}: layout version {found} is unknown (this hamd understands {known})", path.display())]
    UnknownVersion {
        /// The file.
        path: PathBuf,
        /// The version found.
        found: u32,
        /// The version this build writes.
        known: u32,
    },
    /// The header's checksum does not match.
    #[error("store {}: header checksum mismatch", .0.display())]
    HeaderChecksum(PathBuf),
    /// The dimensions are impossible or do not match the file.
    #[error("store {}: {reason}", path.display())]
    Params {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A committed record fails its checks: the store cannot be trusted.
    #[error("store {}: record {slot} is corrupt: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The record slot.
        slot: u32,
        /// What is wrong.
        reason: String,
    },
    /// Another process holds the store's lock.
    #[error("store {} is locked by another hamd", .0.display())]
    Locked(PathBuf),
    /// The arena has no room for the transaction.
    #[error("store {}: the arena is full", .0.display())]
    Full(PathBuf),
    /// The transaction is malformed; nothing was written.
    #[error("invalid transaction: {0}")]
    Invalid(String),
    /// A heartbeat slot is not (or no longer) the caller's.
    #[error("heartbeat slot {slot} does not belong to this entity")]
    NotOwner {
        /// The slot.
        slot: u32,
    },
}

/// A shared-memory file opened read-write and mapped, whose first 12 bytes say it is
/// what its reader expects: `magic`, then `version` (little-endian u32).
struct Mapped {
    file: std::fs::File,
    region: region::Region,
    len: usize,
}

/// Opens and maps `path` and checks its magic and version; `header` is the least size
/// a valid file has.
fn map_checked(
    path: &std::path::Path,
    magic: &[u8; 8],
    version: u32,
    header: usize,
) -> Result<Mapped, StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io)?;
    let len = file.metadata().map_err(io)?.len() as usize;
    if len < header {
        return Err(StoreError::BadMagic(path.to_path_buf()));
    }
    let region = region::Region::map(&file).map_err(io)?;
    let h = region.read(0, 12);
    if &h[0..8] != magic {
        return Err(StoreError::BadMagic(path.to_path_buf()));
    }
    let found = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if found != version {
        return Err(StoreError::UnknownVersion {
            path: path.to_path_buf(),
            found,
            known: version,
        });
    }
    Ok(Mapped { file, region, len })
}
