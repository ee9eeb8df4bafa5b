//! The Guardian's warm copy of the HAM's state: an engine rebuilt ahead of time from
//! the shared-memory store (read without its lock) and kept current while the HAM
//! runs, so that a takeover only applies what changed since the last look.

use guardian::shm::{CopyKey, Peeker, Recovered, StoreError};
use ham_core::engine::{Engine, RestoreError};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// An engine holding the records last seen, with the key of each one's stored copy.
pub struct Warm {
    peeker: Peeker,
    /// The committed transaction last looked at.
    seen: u64,
    engine: Engine,
    keys: HashMap<u32, CopyKey>,
}

impl Warm {
    /// Maps the store at `path` and decodes every record in it; stops early (with a
    /// partial copy, which is still correct: the takeover reads the rest) once
    /// `abandon` is set.
    pub fn open(path: &Path, abandon: &AtomicBool) -> Result<Warm, StoreError> {
        let peeker = Peeker::open(path)?;
        let mut w = Warm {
            engine: Engine::new(peeker.entity_slots()),
            peeker,
            seen: u64::MAX,
            keys: HashMap::new(),
        };
        w.catch_up(abandon);
        Ok(w)
    }

    /// Catches up with the store if the HAM committed since the last look: decodes the
    /// records that changed, drops those that are gone. Cheap when nothing changed.
    /// Returns how many records changed.
    pub fn refresh(&mut self) -> usize {
        self.catch_up(&AtomicBool::new(false))
    }

    /// [`Warm::refresh`], giving up as soon as `abandon` is set.
    fn catch_up(&mut self, abandon: &AtomicBool) -> usize {
        if self.peeker.committed() == self.seen {
            return 0;
        }
        let keys = &self.keys;
        // Abandoned, every record counts as known: nothing more is read.
        let peek = self
            .peeker
            .peek(|slot, key| keys.get(&slot) == Some(&key) || abandon.load(Ordering::Relaxed));
        let changed = peek.changed.len();
        for (slot, key, blob) in peek.changed {
            if abandon.load(Ordering::Relaxed) {
                self.keys.remove(&slot);
                self.engine.drop_record(slot);
                continue;
            }
            self.put(slot, key, &blob);
        }
        let present: HashSet<u32> = peek.present.iter().map(|(s, _)| *s).collect();
        self.drop_absent(&present);
        self.seen = peek.committed;
        changed
    }

    /// Decodes and puts one record; one that does not decode is left for the takeover
    /// to read under the lock (and report).
    fn put(&mut self, slot: u32, key: CopyKey, blob: &[u8]) {
        match Engine::decode_record(slot, blob) {
            Ok(rec) => {
                if let Some(evicted) = self.engine.put_record(rec) {
                    self.keys.remove(&evicted);
                }
                self.keys.insert(slot, key);
            }
            Err(_) => {
                self.engine.drop_record(slot);
                self.keys.remove(&slot);
            }
        }
    }

    fn drop_absent(&mut self, present: &HashSet<u32>) {
        let gone: Vec<u32> = self
            .keys
            .keys()
            .filter(|s| !present.contains(s))
            .copied()
            .collect();
        for slot in gone {
            self.engine.drop_record(slot);
            self.keys.remove(&slot);
        }
    }

    /// True if the copy holds the record stored in `slot` under `key`.
    pub fn knows(&self, slot: u32, key: CopyKey) -> bool {
        self.keys.get(&slot) == Some(&key)
    }

    /// How many records the copy holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The engine for what the locked read of the store found: the warm records it
    /// listed as unchanged stay, the others are decoded now, the rest dropped.
    pub fn into_engine(mut self, recovered: &Recovered) -> Result<Engine, RestoreError> {
        // Only the records the locked read vouched for stay; then the others go in, so
        // that a name moving between two changed slots is no conflict.
        let unchanged: HashSet<u32> = recovered.unchanged.iter().copied().collect();
        self.drop_absent(&unchanged);
        for (slot, bytes) in &recovered.entities {
            let rec = Engine::decode_record(*slot, bytes)?;
            let name = rec.spec.name.clone();
            if self.engine.put_record(rec).is_some() {
                return Err(RestoreError::DuplicateName(name));
            }
        }
        if let Some(bytes) = &recovered.node {
            self.engine.set_node_record(bytes)?;
        }
        Ok(self.engine)
    }
}
