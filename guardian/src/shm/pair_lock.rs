//! The pair lock: a robust, process-shared mutex in the store's header that the HAM's
//! main thread holds for its whole life.
//!
//! It tells a Guardian that its HAM died at the earliest moment the kernel knows it:
//! when a thread dies holding a robust mutex, the kernel marks the mutex "owner died"
//! and wakes a waiter as the very first step of tearing the thread down (before it
//! unmaps the dead process's memory or closes its files, which the store's `flock`
//! and the pidfd wait for). Unmapping can take tens of milliseconds when a kernel
//! thread walking page mappings (DAMON, reclaim, compaction) holds a shared library's
//! mapping lock, so the Guardian must not wait for it.
//!
//! The HAM's main thread is the only one that commits to the store or answers a
//! client, so once the lock reports its owner dead, nothing the dead HAM did after the
//! last commit the Guardian reads can have been acknowledged.

use super::region::Region;
use std::io;
use std::mem::MaybeUninit;

/// Where the mutex lives in the store's header (outside its checksummed part).
pub(super) const OFFSET: usize = 128;
/// Bytes reserved for it.
pub(super) const RESERVED: usize = 64;

/// Makes a new, unlocked pair lock at [`OFFSET`] of `region` (a store being created,
/// which nobody else can use yet).
pub(super) fn init(region: &Region) -> io::Result<()> {
    let mutex = raw(region);
    let mut attr = MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
    // SAFETY: `attr` is initialised by `pthread_mutexattr_init` before any other use
    // and destroyed once the mutex is made. `mutex` points to RESERVED bytes of our
    // mapping, 8-aligned and large enough (checked in `raw`), which no other process
    // uses yet: the store is being created under its exclusive `flock`.
    unsafe {
        check(libc::pthread_mutexattr_init(attr.as_mut_ptr()))?;
        let a = attr.as_mut_ptr();
        let made = check(libc::pthread_mutexattr_setpshared(
            a,
            libc::PTHREAD_PROCESS_SHARED,
        ))
        .and_then(|()| {
            check(libc::pthread_mutexattr_setrobust(
                a,
                libc::PTHREAD_MUTEX_ROBUST,
            ))
        })
        .and_then(|()| check(libc::pthread_mutex_init(mutex, a)));
        libc::pthread_mutexattr_destroy(a);
        made
    }
}

fn raw(region: &Region) -> *mut libc::pthread_mutex_t {
    const _: () = assert!(std::mem::size_of::<libc::pthread_mutex_t>() <= RESERVED);
    region
        .raw_at(
            OFFSET,
            RESERVED,
            std::mem::align_of::<libc::pthread_mutex_t>(),
        )
        .cast()
}

fn check(code: libc::c_int) -> io::Result<()> {
    match code {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// A store's pair lock, mapped. The mapping must outlive any hold: the kernel finds
/// a dead holder's lock through the holder's address space.
pub struct PairLock {
    region: Region,
}

/// What taking the lock found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// It was free.
    Free,
    /// Its last holder died holding it.
    OwnerDied,
}

impl PairLock {
    /// Opens the pair lock of the store at `path` (validated like the store).
    pub fn open(path: &std::path::Path) -> Result<PairLock, super::StoreError> {
        Ok(PairLock {
            region: super::store::map_region(path)?,
        })
    }

    fn taken(&self, code: libc::c_int) -> io::Result<Taken> {
        match code {
            0 => Ok(Taken::Free),
            libc::EOWNERDEAD => {
                // SAFETY: we hold the mutex (EOWNERDEAD hands it over locked); the
                // pointer is as in `raw`.
                check(unsafe { libc::pthread_mutex_consistent(raw(&self.region)) })?;
                Ok(Taken::OwnerDied)
            }
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }

    /// Takes the lock for the calling thread, waiting while a live thread holds it.
    /// The thread then holds it until it unlocks it or dies.
    pub fn lock(&self) -> io::Result<Taken> {
        // SAFETY: the mutex was made by `init` when the store was created (the layout
        // version says so) and lives in our mapping, which `self` keeps; other
        // processes use it only through these same calls.
        let code = unsafe { libc::pthread_mutex_lock(raw(&self.region)) };
        self.taken(code)
    }

    /// Takes the lock if no live thread holds it; `None` if one does.
    pub fn try_lock(&self) -> io::Result<Option<Taken>> {
        // SAFETY: as in `lock`.
        let code = unsafe { libc::pthread_mutex_trylock(raw(&self.region)) };
        if code == libc::EBUSY {
            return Ok(None);
        }
        self.taken(code).map(Some)
    }

    /// The thread that holds the lock, if one does: the owner TID the kernel's robust
    /// futex protocol keeps in the mutex's first word (glibc's layout; read for a
    /// diagnosis, racy by nature).
    pub fn holder(&self) -> Option<i32> {
        const FUTEX_TID_MASK: u32 = 0x3fff_ffff;
        let word = self.region.read(OFFSET, 4);
        let tid = u32::from_ne_bytes(word.try_into().expect("4 bytes")) & FUTEX_TID_MASK;
        (tid != 0).then_some(tid as i32)
    }

    /// Makes the lock anew, unlocked: only for a caller that holds the store's `flock`
    /// and has found the lock held by a thread that no longer exists (a holder whose
    /// mapping was gone when it died, so the kernel could not mark it).
    pub fn remake(&self) -> io::Result<()> {
        init(&self.region)
    }

    /// Keeps the lock's mapping until this process exits, so that the kernel can mark
    /// the lock when its holder dies: a lock unmapped while held stays held by a dead
    /// thread for good.
    pub fn hold_for_life(self) {
        std::mem::forget(self);
    }

    /// Releases the lock, which the calling thread holds.
    pub fn unlock(&self) -> io::Result<()> {
        // SAFETY: as in `lock`; unlocking a mutex this thread does not hold is an
        // error (EPERM) for a robust mutex, not undefined behaviour.
        check(unsafe { libc::pthread_mutex_unlock(raw(&self.region)) })
    }
}
