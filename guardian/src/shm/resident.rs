//! Giving back the pages a process mapped only to start.
//!
//! Starting a daemon runs much code that never runs again (argument and config
//! parsing, runtime and server set-up), and the kernel maps 64 KiB of page cache
//! around every code fault: a HAM's resident set is then mostly start-up code. Once
//! up, [`release_file_pages`] unmaps the pages of every read-only private file mapping
//! (the executable's and the shared libraries' code and constants) that holds no
//! private copy. The page cache keeps them; those that run again are mapped back on
//! first use, by a minor fault, exactly as after the kernel reclaims them under memory
//! pressure, which it may do at any time.

use std::io::{self, BufRead};

/// Gives the C allocator's free memory back to the kernel (glibc's `malloc_trim`):
/// the top of every arena and each free page inside them. Starting frees more than it
/// keeps (the config's parse, the start's bursts), and glibc keeps freed memory mapped
/// for reuse; a daemon that stays up for months should not carry its start-up peak.
/// Returns whether anything was given back.
pub fn release_free_heap() -> bool {
    // SAFETY: `malloc_trim` is glibc's own entry point, safe to call at any time from
    // any thread: it takes each arena's lock and only unmaps or `MADV_DONTNEED`s
    // chunks that are free, so no live allocation is touched.
    unsafe { libc::malloc_trim(0) != 0 }
}

/// Below this, glibc keeps freed memory at the top of a heap, and allocations come
/// from the heap rather than a mapping of their own: its default (128 KiB).
const FIXED_THRESHOLD: libc::c_int = 128 * 1024;

/// Makes the C allocator give back what is freed at the top of a heap as it goes. By
/// default glibc raises both thresholds whenever a large block is freed (to twice its
/// size), so after one multi-megabyte vector grows or goes, it keeps up to that much
/// free memory in every heap for good, and `malloc_trim` never shrinks another
/// thread's heap. Setting them fixes them at their defaults.
pub fn fix_heap_thresholds() {
    // SAFETY: `mallopt` is glibc's own entry point; it takes the main arena's lock and
    // only changes two parameters of the allocator, valid at any time.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, FIXED_THRESHOLD);
        libc::mallopt(libc::M_MMAP_THRESHOLD, FIXED_THRESHOLD);
    }
}

/// Bytes the C allocator holds free (glibc's `mallinfo2().fordblks`, every arena):
/// freed memory it keeps for reuse, resident or given back already.
pub fn free_heap_bytes() -> usize {
    // SAFETY: `mallinfo2` is glibc's own entry point, safe to call at any time from any
    // thread: it takes each arena's lock, only reads the allocator's bookkeeping, and
    // returns a plain struct by value.
    unsafe { libc::mallinfo2().fordblks }
}

/// What [`release_file_pages`] gave back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    /// Mappings released.
    pub mappings: usize,
    /// Resident KiB they held.
    pub kib: u64,
}

/// One mapping of `/proc/self/smaps`, as far as the release needs it.
#[derive(Debug, Default)]
struct Mapping {
    start: usize,
    end: usize,
    /// Read-only, private and backed by a file (inode ≠ 0).
    read_only_file: bool,
    rss_kib: u64,
    /// KiB of private copies (written pages); the mapping is left alone unless 0.
    anonymous_kib: Option<u64>,
    locked: bool,
}

impl Mapping {
    fn releasable(&self) -> bool {
        self.read_only_file && self.anonymous_kib == Some(0) && !self.locked && self.rss_kib > 0
    }
}

/// Parses `/proc/self/smaps` text into the mappings it describes.
fn parse(smaps: impl BufRead) -> io::Result<Vec<Mapping>> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let line = line?;
        let mut words = line.split_ascii_whitespace();
        let Some(first) = words.next() else { continue };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            )
        {
            let perms = words.next().unwrap_or("");
            let inode = words.nth(2).unwrap_or("0");
            out.push(Mapping {
                start,
                end,
                read_only_file: perms.as_bytes().get(1) == Some(&b'-')
                    && perms.as_bytes().get(3) == Some(&b'p')
                    && inode != "0",
                ..Mapping::default()
            });
            continue;
        }
        let Some(m) = out.last_mut() else { continue };
        let kib = || words.clone().next().and_then(|v| v.parse::<u64>().ok());
        match first {
            "Rss:" => m.rss_kib = kib().unwrap_or(0),
            "Anonymous:" => m.anonymous_kib = kib(),
            "VmFlags:" => m.locked = words.any(|f| f == "lo"),
            _ => {}
        }
    }
    Ok(out)
}

/// Unmaps from this process the resident pages of its read-only private file
/// mappings that hold no private copy (see the module's documentation); returns what
/// it gave back. Safe to call at any time from any thread.
pub fn release_file_pages() -> io::Result<Released> {
    let smaps = io::BufReader::new(std::fs::File::open("/proc/self/smaps")?);
    let mut released = Released::default();
    for m in parse(smaps)?.iter().filter(|m| m.releasable()) {
        // SAFETY: `MADV_DONTNEED` on a private file mapping only drops this process's
        // page-table entries; a page touched again is read back from the same file
        // (the kernel may do the same under memory pressure at any time). What it
        // would lose are private copies of written pages, and this mapping has none:
        // smaps counts none (`Anonymous: 0 kB`) and it is not writable, so no write
        // can make one. The range is exactly a mapping the kernel listed, so nothing
        // outside it is touched; a mapping gone or changed since is at worst an error.
        let done = unsafe {
            rustix::mm::madvise(
                m.start as *mut std::ffi::c_void,
                m.end - m.start,
                rustix::mm::Advice::LinuxDontNeed,
            )
        };
        if done.is_ok() {
            released.mappings += 1;
            released.kib += m.rss_kib;
        }
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0400000 r-xp 00100000 fd:01 1234 /usr/bin/hamd
Rss:                3396 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
55d0c0400000-55d0c0500000 r--p 00500000 fd:01 1234 /usr/bin/hamd
Rss:                 280 kB
Anonymous:           280 kB
VmFlags: rd mr mw me ac
55d0c0500000-55d0c0510000 rw-p 00600000 fd:01 1234 /usr/bin/hamd
Rss:                  20 kB
Anonymous:            20 kB
VmFlags: rd wr mr mw me ac
7f0000000000-7f0000100000 rw-s 00000000 00:1a 99 /dev/shm/ham.state
Rss:                  12 kB
Anonymous:             0 kB
VmFlags: rd wr sh mr mw me ms
7f0000200000-7f0000300000 r-xp 00000000 fd:01 77 /usr/lib/libc.so.6
Rss:                1160 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me lo
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]
Rss:                   4 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me de sd
";

    #[test]
    fn only_unwritten_read_only_private_file_mappings_are_released() {
        let maps = parse(SMAPS.as_bytes()).expect("parses");
        assert_eq!(maps.len(), 6);
        let releasable: Vec<usize> = maps
            .iter()
            .enumerate()
            .filter(|(_, m)| m.releasable())
            .map(|(i, _)| i)
            .collect();
        // The code (0); not the relocated constants (1, private copies), the data (2,
        // writable), the store (3, shared), locked code (4), nor the vDSO (5, no file).
        assert_eq!(releasable, vec![0]);
        assert_eq!(
            (maps[0].start, maps[0].end),
            (0x55d0c0000000, 0x55d0c0400000)
        );
        assert_eq!(maps[0].rss_kib, 3396);
    }

    #[test]
    fn a_mapping_whose_private_copies_are_not_reported_is_left_alone() {
        let maps = parse("00400000-00500000 r-xp 0 fd:01 5 /bin/x\nRss: 8 kB\n".as_bytes())
            .expect("parses");
        assert!(!maps[0].releasable());
    }

    #[test]
    fn releasing_keeps_the_process_running_and_lowers_its_resident_code() {
        fn file_rss_kib() -> u64 {
            let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
            parse(smaps.as_bytes())
                .expect("parses")
                .iter()
                .filter(|m| m.releasable())
                .map(|m| m.rss_kib)
                .sum()
        }
        let before = file_rss_kib();
        let released = release_file_pages().expect("released");
        assert!(released.mappings > 0 && released.kib > 0, "{released:?}");
        // The code still runs (faulted back in), and far less of it is resident.
        let after = file_rss_kib();
        assert!(
            after < before,
            "resident file pages {before} KiB → {after} KiB"
        );
        // Constants read back from the page cache are intact.
        assert_eq!(format!("{}", 6 * 7), "42");
    }
}
