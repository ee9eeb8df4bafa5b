//! The crash-consistent state store: opaque records and an event ring in a mapped
//! file, committed many records at a time by one atomic store.
//!
//! Each record slot has two copies stamped with the id of the transaction that wrote
//! them. A transaction writes fresh blobs into the arena and the *older* copy of each
//! slot it touches, then stores its id in `committed_txn` (Release). A reader takes,
//! per slot, the newest copy whose id ≤ `committed_txn` and whose checksums verify, so
//! a writer killed at any instruction leaves every record fully old or fully new.

use super::StoreError;
use super::region::Region;
use rustix::fs::{FlockOperation, flock};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

const MAGIC: &[u8; 8] = b"HAMSTOR1";
/// Layout version 2: the pair lock at `pair_lock::OFFSET`.
const VERSION: u32 = 2;
const HEADER: usize = 4096;
const COMMITTED_AT: usize = 64;
const SLOT: usize = 64;
const COPY: usize = 32;
const EVENT_HEAD: usize = 24;
const GRANULE: u64 = 64;
const TOMBSTONE: u32 = 1;

/// The store's dimensions, fixed when it is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreParams {
    /// Entity record slots (slot 0, the node record, comes on top).
    pub entity_slots: u32,
    /// Bytes for record blobs.
    pub arena_bytes: u64,
    /// Entries of the event ring.
    pub event_slots: u32,
    /// Bytes per event entry, header included.
    pub event_entry_bytes: u32,
}

impl Default for StoreParams {
    fn default() -> Self {
        StoreParams {
            entity_slots: 16_384,
            arena_bytes: 64 << 20,
            event_slots: 4096,
            event_entry_bytes: 512,
        }
    }
}

/// Where each area starts.
#[derive(Clone, Copy, Debug)]
struct Layout {
    params: StoreParams,
    directory: usize,
    events: usize,
    arena: usize,
    total: usize,
}

impl Layout {
    fn new(p: StoreParams) -> Result<Layout, String> {
        if p.entity_slots == 0 || p.event_slots == 0 || p.arena_bytes < GRANULE {
            return Err("store dimensions must be positive".into());
        }
        if (p.event_entry_bytes as usize) < EVENT_HEAD + 8 || !p.event_entry_bytes.is_multiple_of(8)
        {
            return Err("event entries must be a multiple of 8 and hold a payload".into());
        }
        let directory = HEADER;
        let events = directory + (p.entity_slots as usize + 1) * SLOT;
        let ring = p.event_slots as usize * p.event_entry_bytes as usize;
        let arena = (events + ring).div_ceil(4096) * 4096;
        let total = arena + p.arena_bytes.div_ceil(GRANULE) as usize * GRANULE as usize;
        Ok(Layout {
            params: p,
            directory,
            events,
            arena,
            total,
        })
    }

    fn copy_at(&self, slot: u32, copy: usize) -> usize {
        self.directory + slot as usize * SLOT + copy * COPY
    }

    fn event_at(&self, seq: u64) -> usize {
        let i = (seq % u64::from(self.params.event_slots)) as usize;
        self.events + i * self.params.event_entry_bytes as usize
    }
}

/// One copy of a record slot, as stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct CopyMeta {
    txn: u64,
    offset: u64,
    len: u32,
    crc: u32,
    flags: u32,
}

/// A slot's in-memory directory entry: both copies' metadata, and which copy is the
/// committed current one.
type SlotDir = ([CopyMeta; 2], Option<usize>);

impl CopyMeta {
    fn encode(&self) -> [u8; COPY] {
        let mut b = [0u8; COPY];
        b[0..8].copy_from_slice(&self.txn.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..20].copy_from_slice(&self.len.to_le_bytes());
        b[20..24].copy_from_slice(&self.crc.to_le_bytes());
        b[24..28].copy_from_slice(&self.flags.to_le_bytes());
        let meta_crc = crc32fast::hash(&b[0..28]);
        b[28..32].copy_from_slice(&meta_crc.to_le_bytes());
        b
    }

    /// `None` if the copy is blank or torn.
    fn decode(b: &[u8]) -> Option<CopyMeta> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if b.iter().all(|x| *x == 0) || crc32fast::hash(&b[0..28]) != u32_at(28) {
            return None;
        }
        Some(CopyMeta {
            txn: u64_at(0),
            offset: u64_at(8),
            len: u32_at(16),
            crc: u32_at(20),
            flags: u32_at(24),
        })
    }

    fn is_tombstone(&self) -> bool {
        self.flags & TOMBSTONE != 0
    }

    /// The arena extent the blob occupies (an empty blob still takes one granule).
    fn extent(&self) -> Option<(u64, u64)> {
        (!self.is_tombstone()).then(|| (self.offset, granules(u64::from(self.len))))
    }
}

/// What `open` found: committed state only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// The last committed transaction.
    pub committed_txn: u64,
    /// The node record.
    pub node: Option<Vec<u8>>,
    /// Entity records by slot (1-based), ascending; without those in `unchanged`.
    pub entities: Vec<(u32, Vec<u8>)>,
    /// Slots whose record the opener already had (see [`Store::open_known`]): neither
    /// read nor checked again.
    pub unchanged: Vec<u32>,
    /// Events by sequence number, ascending.
    pub events: Vec<(u64, Vec<u8>)>,
}

/// Identifies one stored copy of a record: a record that changed has another key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyKey {
    /// The transaction that wrote it.
    pub txn: u64,
    /// Its blob's checksum.
    pub crc: u32,
}

/// What [`Peeker::peek`] saw.
#[derive(Debug, Default)]
pub struct Peek {
    /// The transaction committed when it looked.
    pub committed: u64,
    /// Every entity slot that held a readable committed record, with its key.
    pub present: Vec<(u32, CopyKey)>,
    /// The records among them whose key the caller did not know, with their blobs.
    pub changed: Vec<(u32, CopyKey, Vec<u8>)>,
}

/// Reads a store another process holds, without its lock: for a Guardian that keeps a
/// decoded copy of the HAM's state warm. What it reads may be a moment old or torn;
/// torn copies fail their checksums and are left out, and the takeover's locked
/// [`Store::open_known`] re-reads whatever the copy does not match.
pub struct Peeker {
    _file: File,
    region: Region,
    layout: Layout,
}

impl Peeker {
    /// Maps the store at `path` (validated like [`Store::open`], not locked).
    pub fn open(path: &Path) -> Result<Peeker, StoreError> {
        let (file, region, layout) = map_valid(path)?;
        Ok(Peeker {
            _file: file,
            region,
            layout,
        })
    }

    /// How many entity slots the store has.
    pub fn entity_slots(&self) -> u32 {
        self.layout.params.entity_slots
    }

    /// The committed transaction now.
    pub fn committed(&self) -> u64 {
        self.region.u64_at(COMMITTED_AT).load(Ordering::Acquire)
    }

    /// Every committed entity record; the blobs of those for which `known` is false.
    pub fn peek(&self, known: impl Fn(u32, CopyKey) -> bool) -> Peek {
        let committed = self.committed();
        let mut out = Peek {
            committed,
            ..Peek::default()
        };
        for slot in slots_with_data(&self._file, &self.layout, 1) {
            let best = (0..2)
                .filter_map(|c| {
                    CopyMeta::decode(&self.region.read(self.layout.copy_at(slot, c), COPY))
                })
                .filter(|m| m.txn <= committed)
                .max_by_key(|m| m.txn);
            let Some(m) = best.filter(|m| !m.is_tombstone()) else {
                continue;
            };
            let key = CopyKey {
                txn: m.txn,
                crc: m.crc,
            };
            if known(slot, key) {
                out.present.push((slot, key));
                continue;
            }
            if m.offset + u64::from(m.len) > self.layout.params.arena_bytes {
                continue;
            }
            let blob = self
                .region
                .read(self.layout.arena + m.offset as usize, m.len as usize);
            if crc32fast::hash(&blob) == m.crc {
                out.present.push((slot, key));
                out.changed.push((slot, key, blob));
            }
        }
        out
    }
}

/// The slots, from `first` on, whose directory entries may hold something: those
/// that do not lie wholly in a hole of the file. A store is created sparse and a slot
/// is written only once used; reading the metadata of all 16,384 slots of a default
/// store through the shared mapping would make tmpfs allocate every page of the
/// directory (1 MiB of memory) just to read zeros. Holes are found with `SEEK_DATA` and
/// `SEEK_HOLE`, two calls per run of used pages; a file system without them (or any
/// error) makes every slot a candidate, which is only slower.
fn slots_with_data(file: &File, layout: &Layout, first: u32) -> Vec<u32> {
    use rustix::fs::{SeekFrom, seek};
    let last = layout.params.entity_slots;
    let mut out = Vec::new();
    // Offsets below `data_end` are known to be data; below `hole_end`, a hole.
    let (mut data_end, mut hole_end) = (0usize, 0usize);
    for slot in first..=last {
        let at = layout.copy_at(slot, 0);
        if at >= data_end {
            if at + SLOT <= hole_end {
                continue;
            }
            match seek(file, SeekFrom::Data(at as u64)) {
                Ok(d) if d as usize > at => {
                    hole_end = d as usize;
                    if at + SLOT <= hole_end {
                        continue;
                    }
                }
                Ok(_) => {}
                // Nothing but holes from here to the end of the file.
                Err(rustix::io::Errno::NXIO) => break,
                Err(_) => data_end = usize::MAX,
            }
            if data_end <= at {
                data_end = seek(file, SeekFrom::Hole(at as u64))
                    .map_or(usize::MAX, |h| (h as usize).max(at + SLOT));
            }
        }
        out.push(slot);
    }
    out
}

/// Maps a valid store file (for its pair lock).
pub(super) fn map_region(path: &Path) -> Result<Region, StoreError> {
    map_valid(path).map(|(_, region, _)| region)
}

/// Opens and maps a store file and validates its header and size.
fn map_valid(path: &Path) -> Result<(File, Region, Layout), StoreError> {
    let super::Mapped { file, region, len } = super::map_checked(path, MAGIC, VERSION, HEADER)?;
    let h = region.read(0, 48);
    if crc32fast::hash(&h[16..48]) != u32::from_le_bytes(h[12..16].try_into().expect("4")) {
        return Err(StoreError::HeaderChecksum(path.to_path_buf()));
    }
    let params = StoreParams {
        entity_slots: u32::from_le_bytes(h[16..20].try_into().expect("4")),
        event_slots: u32::from_le_bytes(h[20..24].try_into().expect("4")),
        arena_bytes: u64::from_le_bytes(h[24..32].try_into().expect("8")),
        event_entry_bytes: u32::from_le_bytes(h[32..36].try_into().expect("4")),
    };
    let layout = Layout::new(params).map_err(|reason| StoreError::Params {
        path: path.to_path_buf(),
        reason,
    })?;
    if layout.total != len {
        return Err(StoreError::Params {
            path: path.to_path_buf(),
            reason: format!("file is {len} bytes, its layout needs {}", layout.total),
        });
    }
    Ok((file, region, layout))
}

/// A store file, validated and exclusively locked, not yet read.
pub struct LockedStore {
    path: PathBuf,
    file: File,
    region: Region,
    layout: Layout,
}

impl LockedStore {
    /// Keeps the store's `flock` until this process exits (the lock goes with the
    /// process, as the kernel releases it).
    pub fn hold_for_life(self) {
        std::mem::forget(self.file);
    }
}

/// A set of record writes and events committed together.
#[derive(Clone, Debug, Default)]
pub struct Txn {
    node: Option<Vec<u8>>,
    puts: Vec<(u32, Option<Vec<u8>>)>,
    events: Vec<(u64, Vec<u8>)>,
}

impl Txn {
    /// An empty transaction.
    pub fn new() -> Txn {
        Txn::default()
    }
    /// Writes the node record.
    pub fn put_node(&mut self, bytes: Vec<u8>) {
        self.node = Some(bytes);
    }
    /// Writes an entity record.
    pub fn put_entity(&mut self, slot: u32, bytes: Vec<u8>) {
        self.puts.push((slot, Some(bytes)));
    }
    /// Deletes an entity record.
    pub fn delete_entity(&mut self, slot: u32) {
        self.puts.push((slot, None));
    }
    /// Appends an event (ring index `seq % event_slots`).
    pub fn push_event(&mut self, seq: u64, bytes: Vec<u8>) {
        self.events.push((seq, bytes));
    }
    /// True if it writes nothing.
    pub fn is_empty(&self) -> bool {
        self.node.is_none() && self.puts.is_empty() && self.events.is_empty()
    }
}

/// Bytes an allocation of `len` takes: whole granules, at least one.
fn granules(len: u64) -> u64 {
    len.max(1).div_ceil(GRANULE) * GRANULE
}

/// The arena's free space, kept only in memory and rebuilt on open.
#[derive(Debug)]
struct Allocator {
    free: BTreeMap<u64, u64>,
    used: u64,
}

impl Allocator {
    fn new(size: u64) -> Allocator {
        let mut free = BTreeMap::new();
        free.insert(0, size);
        Allocator { free, used: 0 }
    }

    fn alloc(&mut self, len: u64) -> Option<u64> {
        let len = granules(len);
        let (&at, &size) = self.free.iter().find(|(_, s)| **s >= len)?;
        self.free.remove(&at);
        if size > len {
            self.free.insert(at + len, size - len);
        }
        self.used += len;
        Some(at)
    }

    /// The arena's size.
    fn capacity(&self) -> u64 {
        self.free.values().sum::<u64>() + self.used
    }

    /// The allocator of an arena of `size` whose used extents are `used` (offset,
    /// length, owner), sorted here; the owner of an extent that overlaps another or
    /// the arena's end is the error.
    fn from_used(size: u64, used: &mut [(u64, u64, u32)]) -> Result<Allocator, u32> {
        used.sort_unstable();
        let mut free = Vec::with_capacity(used.len() + 1);
        let (mut at, mut total) = (0u64, 0u64);
        for &(off, len, owner) in used.iter() {
            if off < at || off + len > size {
                return Err(owner);
            }
            if off > at {
                free.push((at, off - at));
            }
            at = off + len;
            total += len;
        }
        if size > at {
            free.push((at, size - at));
        }
        Ok(Allocator {
            free: free.into_iter().collect(),
            used: total,
        })
    }

    fn release(&mut self, at: u64, len: u64) {
        self.used -= len;
        let mut start = at;
        let mut size = len;
        if let Some((&p, &ps)) = self.free.range(..at).next_back()
            && p + ps == at
        {
            self.free.remove(&p);
            start = p;
            size += ps;
        }
        if let Some(&ns) = self.free.get(&(at + len)) {
            self.free.remove(&(at + len));
            size += ns;
        }
        self.free.insert(start, size);
    }
}

/// The open store: the mapping, its lock, and the in-memory allocator and directory.
pub struct Store {
    path: PathBuf,
    _file: File,
    region: Region,
    layout: Layout,
    /// Per slot: both copies' metadata and which one is the committed current one.
    /// Only as long as the highest slot in use: a slot past its end has never been
    /// written (a store has room for 16,384 entities by default, 1.3 MB of directory
    /// that a node with a handful of entities never needs).
    dir: Vec<SlotDir>,
    alloc: Allocator,
    committed: u64,
}

fn err_at(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Store {
    /// Creates a new store file (it must not exist), locked.
    pub fn create(path: &Path, params: StoreParams) -> Result<Store, StoreError> {
        let layout = Layout::new(params).map_err(|reason| StoreError::Params {
            path: path.to_path_buf(),
            reason,
        })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(err_at(path))?;
        lock(&file, path, false)?;
        file.set_len(layout.total as u64).map_err(err_at(path))?;
        let region = Region::map(&file).map_err(err_at(path))?;
        let mut h = [0u8; 48];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[16..20].copy_from_slice(&params.entity_slots.to_le_bytes());
        h[20..24].copy_from_slice(&params.event_slots.to_le_bytes());
        h[24..32].copy_from_slice(&params.arena_bytes.to_le_bytes());
        h[32..36].copy_from_slice(&params.event_entry_bytes.to_le_bytes());
        let crc = crc32fast::hash(&h[16..48]);
        h[12..16].copy_from_slice(&crc.to_le_bytes());
        region.write(0, &h);
        super::pair_lock::init(&region).map_err(err_at(path))?;
        region.u64_at(COMMITTED_AT).store(0, Ordering::Release);
        Ok(Store {
            path: path.to_path_buf(),
            _file: file,
            region,
            layout,
            dir: Vec::new(),
            alloc: Allocator::new(params.arena_bytes.div_ceil(GRANULE) * GRANULE),
            committed: 0,
        })
    }

    /// Opens an existing store, locked (fails if another process holds it).
    pub fn open(path: &Path) -> Result<(Store, Recovered), StoreError> {
        Self::open_locked(path, false)
    }

    /// Opens an existing store, waiting for the lock (until its holder dies).
    pub fn open_blocking(path: &Path) -> Result<(Store, Recovered), StoreError> {
        Self::open_locked(path, true)
    }

    /// Opens the store if the file exists, else creates it; `true` when created.
    pub fn open_or_create(
        path: &Path,
        params: StoreParams,
    ) -> Result<(Store, Recovered, bool), StoreError> {
        if path.exists() {
            let (s, r) = Self::open(path)?;
            Ok((s, r, false))
        } else {
            let s = Self::create(path, params)?;
            Ok((s, Recovered::default(), true))
        }
    }

    fn open_locked(path: &Path, wait: bool) -> Result<(Store, Recovered), StoreError> {
        Self::open_known(Self::lock_file(path, wait)?, &|_, _| false)
    }

    /// Validates the store at `path`, then waits for its lock (until its holder dies).
    pub fn wait_lock(path: &Path) -> Result<LockedStore, StoreError> {
        Self::lock_file(path, true)
    }

    fn lock_file(path: &Path, wait: bool) -> Result<LockedStore, StoreError> {
        // Validated first, so a foreign file says so whoever holds it; then the lock.
        let (file, region, layout) = map_valid(path)?;
        lock(&file, path, wait)?;
        Ok(LockedStore {
            path: path.to_path_buf(),
            file,
            region,
            layout,
        })
    }

    /// Validates and maps the store for a Guardian whose HAM died holding the pair
    /// lock, which the caller's thread now holds ([`super::pair_lock`]): the dying
    /// HAM still holds the `flock` until its files close, and the caller takes it
    /// then ([`Store::wait_lock`], [`LockedStore::hold_for_life`]).
    pub fn claim(path: &Path) -> Result<LockedStore, StoreError> {
        let (file, region, layout) = map_valid(path)?;
        Ok(LockedStore {
            path: path.to_path_buf(),
            file,
            region,
            layout,
        })
    }

    /// Reads a locked store. Records for which `known(slot, key)` holds are the ones
    /// the caller has already (a warm Guardian): they are listed in
    /// [`Recovered::unchanged`], not read again.
    pub fn open_known(
        locked: LockedStore,
        known: &dyn Fn(u32, CopyKey) -> bool,
    ) -> Result<(Store, Recovered), StoreError> {
        let LockedStore {
            path,
            file,
            region,
            layout,
        } = locked;
        let params = layout.params;
        let committed = region.u64_at(COMMITTED_AT).load(Ordering::Acquire);
        let mut store = Store {
            path,
            _file: file,
            region,
            layout,
            dir: Vec::new(),
            alloc: Allocator::new(params.arena_bytes.div_ceil(GRANULE) * GRANULE),
            committed,
        };
        let recovered = store.recover(known)?;
        Ok((store, recovered))
    }

    /// Reads the committed state, wipes uncommitted copies and events, rebuilds the
    /// allocator and the in-memory directory.
    fn recover(&mut self, known: &dyn Fn(u32, CopyKey) -> bool) -> Result<Recovered, StoreError> {
        let mut rec = Recovered {
            committed_txn: self.committed,
            ..Default::default()
        };
        let slots = self.layout.params.entity_slots;
        // Records' metadata and events' heads are read into buffers on the stack:
        // thousands of allocations would cost more than the bytes.
        let mut slot_bytes = [0u8; SLOT];
        let mut used: Vec<(u64, u64, u32)> = Vec::with_capacity(slots as usize + 1);
        let candidates = slots_with_data(&self._file, &self.layout, 0);
        // Room for the directory at once: grown by doubling, it cost a takeover at
        // 10,000 entities ~2 ms of copies and page faults.
        self.dir
            .reserve_exact(candidates.last().map_or(0, |s| *s as usize + 1));
        for slot in candidates {
            let mut metas = [CopyMeta::default(); 2];
            let mut best: Option<usize> = None;
            self.region
                .read_into(self.layout.copy_at(slot, 0), &mut slot_bytes);
            for c in 0..2 {
                match CopyMeta::decode(&slot_bytes[c * COPY..(c + 1) * COPY]) {
                    Some(m) if m.txn > self.committed => self
                        .region
                        .write(self.layout.copy_at(slot, c), &[0u8; COPY]),
                    Some(m) => {
                        metas[c] = m;
                        if best.is_none_or(|b| metas[b].txn < m.txn) {
                            best = Some(c);
                        }
                    }
                    None => {}
                }
            }
            if let Some(b) = best {
                let m = metas[b];
                if let Some((off, len)) = m.extent() {
                    if off + u64::from(m.len) > self.layout.params.arena_bytes {
                        return Err(self.overlap(slot));
                    }
                    used.push((off, len, slot));
                    let key = CopyKey {
                        txn: m.txn,
                        crc: m.crc,
                    };
                    if slot > 0 && known(slot, key) {
                        rec.unchanged.push(slot);
                        self.set_slot_dir(slot, (metas, best));
                        continue;
                    }
                    let blob = self
                        .region
                        .read(self.layout.arena + off as usize, m.len as usize);
                    if crc32fast::hash(&blob) != m.crc {
                        return Err(StoreError::Corrupt {
                            path: self.path.clone(),
                            slot,
                            reason: "blob checksum mismatch".into(),
                        });
                    }
                    if slot == 0 {
                        rec.node = Some(blob);
                    } else {
                        rec.entities.push((slot, blob));
                    }
                }
            }
            self.set_slot_dir(slot, (metas, best));
        }
        let in_use = self
            .dir
            .iter()
            .rposition(|d| *d != SlotDir::default())
            .map_or(0, |last| last + 1);
        self.dir.truncate(in_use);
        self.alloc = Allocator::from_used(self.alloc.capacity(), &mut used)
            .map_err(|slot| self.overlap(slot))?;
        let entry = self.layout.params.event_entry_bytes as usize;
        let mut head = [0u8; EVENT_HEAD];
        for i in 0..self.layout.params.event_slots as usize {
            let at = self.layout.events + i * entry;
            self.region.read_into(at, &mut head);
            if head.iter().all(|b| *b == 0) {
                continue;
            }
            let seq = u64::from_le_bytes(head[0..8].try_into().expect("8"));
            let txn = u64::from_le_bytes(head[8..16].try_into().expect("8"));
            let len = u32::from_le_bytes(head[16..20].try_into().expect("4")) as usize;
            let crc = u32::from_le_bytes(head[20..24].try_into().expect("4"));
            let fits = len <= entry - EVENT_HEAD;
            let payload = if fits && txn <= self.committed {
                self.region.read(at + EVENT_HEAD, len)
            } else {
                Vec::new()
            };
            if txn > self.committed || !fits || event_crc(&head[0..20], &payload) != crc {
                self.region.write(at, &[0u8; EVENT_HEAD]);
                continue;
            }
            rec.events.push((seq, payload));
        }
        rec.events.sort_by_key(|(s, _)| *s);
        Ok(rec)
    }

    fn overlap(&self, slot: u32) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            slot,
            reason: "its blob lies outside the arena or overlaps another".into(),
        }
    }

    /// Writes and commits a transaction; validates first and writes nothing if invalid.
    pub fn commit(&mut self, txn: &Txn) -> Result<u64, StoreError> {
        let limit = self.layout.params.event_entry_bytes as usize - EVENT_HEAD;
        for (slot, _) in &txn.puts {
            if *slot == 0 || *slot > self.layout.params.entity_slots {
                return Err(StoreError::Invalid(format!(
                    "entity slot {slot} is out of range"
                )));
            }
        }
        for (seq, bytes) in &txn.events {
            if bytes.len() > limit {
                return Err(StoreError::Invalid(format!(
                    "event {seq} is {} bytes; an entry holds {limit}",
                    bytes.len()
                )));
            }
        }
        let t = self.committed + 1;
        let writes: Vec<(u32, Option<&Vec<u8>>)> = txn
            .node
            .iter()
            .map(|b| (0, Some(b)))
            .chain(txn.puts.iter().map(|(s, b)| (*s, b.as_ref())))
            .collect();
        // Allocate everything first, so that a full arena fails before any write.
        let mut extents = Vec::with_capacity(writes.len());
        for (_, bytes) in &writes {
            match bytes {
                Some(b) => match self.alloc.alloc(b.len() as u64) {
                    Some(at) => extents.push(Some(at)),
                    None => {
                        for (at, (_, b)) in extents.iter().zip(&writes) {
                            if let (Some(at), Some(b)) = (at, b) {
                                self.alloc.release(*at, granules(b.len() as u64));
                            }
                        }
                        return Err(StoreError::Full(self.path.clone()));
                    }
                },
                None => extents.push(None),
            }
        }
        let mut touched: BTreeSet<u32> = BTreeSet::new();
        let mut superseded = Vec::new();
        for ((slot, bytes), at) in writes.iter().zip(extents) {
            let (metas, current) = self.slot_dir(*slot);
            let target = if touched.contains(slot) {
                // Written earlier in this transaction: overwrite that copy again.
                let c = current.map_or(0, |c| 1 - c);
                if let Some((off, len)) = metas[c].extent() {
                    self.alloc.release(off, len);
                }
                c
            } else {
                touched.insert(*slot);
                if let Some(e) = current.and_then(|c| metas[c].extent()) {
                    superseded.push(e);
                }
                current.map_or(0, |c| 1 - c)
            };
            let meta = match (bytes, at) {
                (Some(b), Some(off)) => {
                    self.region.write(self.layout.arena + off as usize, b);
                    CopyMeta {
                        txn: t,
                        offset: off,
                        len: b.len() as u32,
                        crc: crc32fast::hash(b),
                        flags: 0,
                    }
                }
                _ => CopyMeta {
                    txn: t,
                    flags: TOMBSTONE,
                    ..Default::default()
                },
            };
            self.region
                .write(self.layout.copy_at(*slot, target), &meta.encode());
            self.slot_dir_mut(*slot).0[target] = meta;
        }
        for (seq, bytes) in &txn.events {
            let mut head = [0u8; EVENT_HEAD];
            head[0..8].copy_from_slice(&seq.to_le_bytes());
            head[8..16].copy_from_slice(&t.to_le_bytes());
            head[16..20].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
            let crc = event_crc(&head[0..20], bytes);
            head[20..24].copy_from_slice(&crc.to_le_bytes());
            let at = self.layout.event_at(*seq);
            self.region.write(at + EVENT_HEAD, bytes);
            self.region.write(at, &head);
        }
        // The commit point: one atomic store makes the whole transaction visible.
        self.region.fence();
        self.region.u64_at(COMMITTED_AT).store(t, Ordering::Release);
        self.committed = t;
        for slot in touched {
            let entry = self.slot_dir_mut(slot);
            entry.1 = Some(entry.1.map_or(0, |c| 1 - c));
        }
        for (off, len) in superseded {
            self.alloc.release(off, len);
        }
        Ok(t)
    }

    /// A slot's directory entry (all empty past the end of the directory).
    fn slot_dir(&self, slot: u32) -> SlotDir {
        self.dir.get(slot as usize).copied().unwrap_or_default()
    }

    /// Sets a slot's directory entry; an empty one past the end leaves the directory
    /// as it is.
    fn set_slot_dir(&mut self, slot: u32, entry: SlotDir) {
        if entry != SlotDir::default() || (slot as usize) < self.dir.len() {
            *self.slot_dir_mut(slot) = entry;
        }
    }

    /// A slot's directory entry, the directory grown to hold it.
    fn slot_dir_mut(&mut self, slot: u32) -> &mut SlotDir {
        let i = slot as usize;
        if i >= self.dir.len() {
            self.dir.resize(i + 1, SlotDir::default());
        }
        &mut self.dir[i]
    }

    /// The store's dimensions.
    pub fn params(&self) -> StoreParams {
        self.layout.params
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Arena bytes in use.
    pub fn arena_used(&self) -> u64 {
        self.alloc.used
    }

    /// Writes the first `stop_after` records of a transaction and its events, scribbles
    /// `junk` over the copies it wrote, and stops before the commit point, as a writer
    /// killed mid-way would. Consumes the store: reopen it to see what survived (tests).
    #[doc(hidden)]
    pub fn commit_torn(mut self, txn: &Txn, stop_after: usize, junk: &[u8]) {
        let mut partial = Txn::new();
        partial.node = txn.node.clone();
        partial.puts = txn.puts.iter().take(stop_after).cloned().collect();
        partial.events = txn.events.clone();
        let before = self.committed;
        let slots: Vec<u32> = partial
            .node
            .iter()
            .map(|_| 0)
            .chain(partial.puts.iter().map(|(s, _)| *s))
            .collect();
        if self.commit(&partial).is_ok() {
            // Undo the commit point: everything above was written but never committed.
            self.region
                .u64_at(COMMITTED_AT)
                .store(before, Ordering::Release);
            for slot in slots {
                let current = self.slot_dir(slot).1.unwrap_or(0);
                if !junk.is_empty() {
                    let at = self.layout.copy_at(slot, current);
                    self.region.write(at, &junk[..junk.len().min(COPY)]);
                }
            }
        }
    }
}

fn event_crc(head: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(head);
    h.update(payload);
    h.finalize()
}

fn lock(file: &File, path: &Path, wait: bool) -> Result<(), StoreError> {
    let op = if wait {
        FlockOperation::LockExclusive
    } else {
        FlockOperation::NonBlockingLockExclusive
    };
    flock(file, op).map_err(|e| {
        if e == rustix::io::Errno::WOULDBLOCK {
            StoreError::Locked(path.to_path_buf())
        } else {
            StoreError::Io {
                path: path.to_path_buf(),
                source: e.into(),
            }
        }
    })
}
