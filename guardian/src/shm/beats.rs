//! The heartbeat table: one cache line per entity that clients map and beat.
//!
//! A slot holds the owner's token, a beat counter that clients increment, and the
//! counter value the HAM saw last. A beat is one atomic add: no system call.

use super::StoreError;
use super::region::Region;
use std::fs::OpenOptions;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::Ordering;

const MAGIC: &[u8; 8] = b"HAMBEAT1";
const VERSION: u32 = 1;
const HEADER: usize = 64;
const SLOT: usize = 64;

/// The mapped heartbeat table.
pub struct BeatTable {
    region: Region,
    slots: u32,
}

impl BeatTable {
    fn size(slots: u32) -> usize {
        HEADER + slots as usize * SLOT
    }

    /// The HAM's side: creates the table (mode 0660) or reuses a valid existing one.
    pub fn open_or_create(path: &Path, slots: u32) -> Result<BeatTable, StoreError> {
        if path.exists() {
            if let Ok(t) = BeatTable::open(path)
                && t.slots >= slots
            {
                return Ok(t);
            }
            std::fs::remove_file(path).map_err(|source| StoreError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let io = |source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o660)
            .open(path)
            .map_err(io)?;
        // The umask may have cleared group bits: clients in the group need them.
        file.set_permissions(std::fs::Permissions::from_mode(0o660))
            .map_err(io)?;
        file.set_len(Self::size(slots) as u64).map_err(io)?;
        let region = Region::map(&file).map_err(io)?;
        let mut h = [0u8; 16];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&slots.to_le_bytes());
        region.write(0, &h);
        Ok(BeatTable { region, slots })
    }

    /// The client's side: maps an existing table read-write and checks its header.
    pub fn open(path: &Path) -> Result<BeatTable, StoreError> {
        let super::Mapped { region, len, .. } = super::map_checked(path, MAGIC, VERSION, HEADER)?;
        let h = region.read(0, 16);
        let slots = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"));
        if len < Self::size(slots) {
            return Err(StoreError::Params {
                path: path.to_path_buf(),
                reason: format!(
                    "{slots} slots need {} bytes, the file has {len}",
                    Self::size(slots)
                ),
            });
        }
        Ok(BeatTable { region, slots })
    }

    /// Number of slots.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    fn at(&self, slot: u32, field: usize) -> Option<&std::sync::atomic::AtomicU64> {
        (slot < self.slots).then(|| {
            self.region
                .u64_at(HEADER + slot as usize * SLOT + field * 8)
        })
    }

    /// The HAM gives a slot to a new owner and resets its counters.
    pub fn claim(&self, slot: u32, token: u64) {
        if let (Some(o), Some(b), Some(s)) = (self.at(slot, 0), self.at(slot, 1), self.at(slot, 2))
        {
            o.store(0, Ordering::Release);
            b.store(0, Ordering::Relaxed);
            s.store(0, Ordering::Relaxed);
            o.store(token, Ordering::Release);
        }
    }

    /// The HAM frees a slot.
    pub fn release(&self, slot: u32) {
        if let Some(o) = self.at(slot, 0) {
            o.store(0, Ordering::Release);
        }
    }

    /// The slot's owner token (0: free or out of range).
    pub fn owner(&self, slot: u32) -> u64 {
        self.at(slot, 0).map_or(0, |o| o.load(Ordering::Acquire))
    }

    /// The HAM's check: true if the counter moved since the last call.
    pub fn observe(&self, slot: u32) -> bool {
        let (Some(b), Some(s)) = (self.at(slot, 1), self.at(slot, 2)) else {
            return false;
        };
        let beats = b.load(Ordering::Relaxed);
        if beats != s.load(Ordering::Relaxed) {
            s.store(beats, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// One beat on behalf of the slot's owner (the API path).
    pub fn beat(&self, slot: u32) {
        if let Some(b) = self.at(slot, 1) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A client's handle on its slot, if the slot belongs to `token`.
    pub fn handle(&self, slot: u32, token: u64) -> Result<BeatHandle<'_>, StoreError> {
        if token == 0 || self.owner(slot) != token {
            return Err(StoreError::NotOwner { slot });
        }
        Ok(BeatHandle {
            table: self,
            slot,
            token,
        })
    }
}

/// A client's handle on its heartbeat slot.
pub struct BeatHandle<'a> {
    table: &'a BeatTable,
    slot: u32,
    token: u64,
}

impl BeatHandle<'_> {
    /// One heartbeat: an atomic add in shared memory. False if the slot was given to
    /// someone else meanwhile.
    #[inline]
    pub fn beat(&self) -> bool {
        if self.table.owner(self.slot) != self.token {
            return false;
        }
        self.table.beat(self.slot);
        true
    }
}
