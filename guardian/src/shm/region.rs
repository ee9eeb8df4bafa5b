//! A mapped file and the only raw access to it: aligned atomics and byte copies.
//!
//! Another process may write the same memory at any time, so no Rust reference to
//! plain bytes of the map ever exists; every access goes through a raw pointer.

use memmap2::MmapRaw;
use std::fs::File;
use std::sync::atomic::AtomicU64;

/// A shared, writable mapping of a whole file.
pub struct Region {
    map: MmapRaw,
}

impl Region {
    /// Maps the whole file read-write and shared.
    pub fn map(file: &File) -> std::io::Result<Region> {
        Ok(Region {
            map: MmapRaw::map_raw(file)?,
        })
    }

    fn check(&self, offset: usize, len: usize, align: usize) {
        assert!(
            offset
                .checked_add(len)
                .is_some_and(|end| end <= self.map.len()),
            "shared-memory access out of bounds: {offset}+{len} > {}",
            self.map.len()
        );
        assert_eq!(
            offset % align,
            0,
            "misaligned shared-memory access at {offset}"
        );
    }

    /// The atomic u64 at `offset` (8-aligned, in bounds, or this panics).
    pub fn u64_at(&self, offset: usize) -> &AtomicU64 {
        self.check(offset, 8, 8);
        // SAFETY: the range is inside the mapping (checked) and 8-aligned (checked; the
        // map itself is page-aligned). The mapping lives as long as `self`, which bounds
        // the returned lifetime. An `AtomicU64` may alias memory other processes write
        // concurrently: all our accesses to it are atomic.
        unsafe { &*(self.map.as_mut_ptr().add(offset) as *const AtomicU64) }
    }

    /// A raw pointer to `len` bytes at `offset` (`align`-aligned and in bounds, or
    /// this panics), for an object that other processes use through the same
    /// pointer-based calls (the pair lock's mutex). Using it is `unsafe` for the caller.
    pub fn raw_at(&self, offset: usize, len: usize, align: usize) -> *mut u8 {
        self.check(offset, len, align);
        // SAFETY: in bounds (checked): the pointer stays inside the mapping.
        unsafe { self.map.as_mut_ptr().add(offset) }
    }

    /// Copies `bytes` into the map at `offset`.
    pub fn write(&self, offset: usize, bytes: &[u8]) {
        self.check(offset, bytes.len(), 1);
        // SAFETY: the destination range is inside the mapping (checked) and cannot
        // overlap `bytes`, a Rust slice outside the map. Concurrent readers of this
        // range may see a torn copy; the store's checksums and commit protocol are what
        // make torn data harmless.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.as_mut_ptr().add(offset),
                bytes.len(),
            )
        }
    }

    /// Copies `len` bytes out of the map at `offset`.
    pub fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.read_into(offset, &mut out);
        out
    }

    /// Fills `out` with the bytes of the map at `offset`.
    pub fn read_into(&self, offset: usize, out: &mut [u8]) {
        self.check(offset, out.len(), 1);
        // SAFETY: the source range is inside the mapping (checked); `out` is a Rust
        // buffer of exactly that length, outside the map, so they cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            )
        }
    }

    /// Flushes nothing (tmpfs) but orders our writes before later atomics.
    pub fn fence(&self) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
    }
}
