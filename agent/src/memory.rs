//! How the process uses glibc's allocator: tuned one way for a run that
//! exits when its pass is done, another for the daemon that lives on.
//!
//! Why: at 10,000 managed files a one-file sync reads and writes state
//! files of megabytes (the inventory, the quick-check record, the cached
//! configuration), and every fresh page it touches is a page fault:
//! about 6,700 of them in such a sync (issue #18). By default glibc maps
//! each allocation above 128 KiB
//! on its own and unmaps it when freed, and gives the top of the heap
//! back whenever 128 KiB of it are free, so the next buffer faults its
//! pages in again. A run that exits in milliseconds gains nothing from
//! giving memory back early: it keeps what it freed for its next buffer.
//! The daemon instead hands freed memory back after every pass
//! ([`release`]), so that it idles small.

/// For a run that exits after one pass (`sync --once`, `plan`, ...):
/// buffers up to 32 MiB from the heap, and its top given back only when
/// more than 32 MiB of it are free. (Measured at 10,000 files: a one-file
/// sync's page faults 6,700 -> 5,300 and 1-3 ms less CPU, `bench/ab`; a
/// cold apply's peak RSS within the spread of runs either way; never
/// trimming at all faulted no less.)
pub fn tune_for_one_pass() -> bool {
    ONE_PASS.store(true, std::sync::atomic::Ordering::Relaxed);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes tuning parameters of the allocator,
    // under the allocator's own lock; it returns 0 for a value it refuses.
    unsafe {
        // 32 MiB is the largest threshold glibc accepts on 64-bit; above
        // it, allocations are still mapped on their own.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20) == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// Whether this process exits after its one pass (see
/// [`tune_for_one_pass`]).
static ONE_PASS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Ends the use of `value`: freed in the daemon, left to the kernel in a
/// run that exits after its one pass.
///
/// Why: at 10,000 managed files, freeing a run's inventories, quick-check
/// record and plan (tens of thousands of allocations) took about 1.2 ms of
/// a one-file sync's last milliseconds (issue #18), and the kernel takes
/// the whole heap back at exit in one go. Only for plain data: nothing
/// whose drop does work that matters (closes a lock, removes a file,
/// zeroizes a secret) may come here.
pub fn discard<T>(value: T) {
    discard_if(ONE_PASS.load(std::sync::atomic::Ordering::Relaxed), value);
}

fn discard_if<T>(one_pass: bool, value: T) {
    if one_pass {
        std::mem::forget(value);
    } else {
        drop(value);
    }
}

/// At most two malloc arenas from now on: every thread that allocates
/// for the first time (the sync thread, the render workers, tokio's
/// blocking pool) would otherwise get an arena of its own, each holding
/// on to its peak. The daemon sets it at start; a one-pass run before a
/// full render (a cold apply of 10,000 templates: 77 -> 64 MiB peak RSS,
/// the same time; one arena made it 45 % slower), not at start, where
/// the inventory reader and the stamp helpers of a one-file sync would
/// contend for the two.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a tuning parameter; glibc reads this
    // one unlocked when a thread first needs an arena (a benign race: at
    // worst that thread gets one more arena). Threads that have an arena
    // keep it.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Maps the pages of `buf`'s spare capacity in one call, before they
/// are filled: a `Vec` sized for a state file or for one entry per
/// managed file (hundreds of KB to MBs at 10,000 files).
///
/// Why: each fresh page otherwise faults on its first write, one at a
/// time, in the middle of the `read` or the loop that fills it; asking
/// the kernel for them at once (`MADV_POPULATE_WRITE`, Linux 5.14) was
/// about 1 ms less of a one-file sync at 10,000 files, most of it in the
/// reads of the state files (issue #18, `bench/ab`). Nothing is written:
/// the bytes stay what they were. Below 256 KiB, or where the kernel
/// refuses (older than 5.14), it does nothing and the pages fault as
/// before. Returns whether the kernel mapped them.
pub fn prefault<T>(buf: &mut Vec<T>) -> bool {
    let page = page_size();
    let spare = buf.spare_capacity_mut();
    let bytes = std::mem::size_of_val(spare);
    if bytes < (256 << 10) {
        return false;
    }
    let start = spare.as_mut_ptr() as usize;
    let first = start.div_ceil(page) * page;
    let end = (start + bytes) / page * page;
    if end <= first {
        return false;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: the range lies inside `buf`'s own allocation, which lives
    // across the call; populating maps its pages writable and changes no
    // byte of it.
    unsafe {
        libc::madvise(
            first as *mut libc::c_void,
            end - first,
            libc::MADV_POPULATE_WRITE,
        ) == 0
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// The size of a memory page (4 KiB on x86-64, up to 64 KiB on arm64).
fn page_size() -> usize {
    // SAFETY: sysconf only reads a constant of the process.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// `Vec::with_capacity(n)`, its pages mapped ahead (see [`prefault`]).
pub fn vec_prefaulted<T>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    prefault(&mut v);
    v
}

/// Hands memory freed by the last sync back to the kernel.
///
/// A cold apply of a thousand templates peaks at tens of MB; glibc keeps
/// freed memory in its arenas, so without this the daemon would stay that
/// large for its whole life, though an idle poll needs a few MB.
pub fn release() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it
    // takes the arena locks itself and is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    /// The daemon must free what a pass discards (it lives on for
    /// thousands of passes); only a one-pass run leaves it to the kernel.
    #[test]
    fn a_discarded_value_is_freed_unless_the_process_exits_after_its_pass() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        struct Counted<'a>(&'a AtomicUsize);
        impl Drop for Counted<'_> {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let drops = AtomicUsize::new(0);
        super::discard_if(false, Counted(&drops));
        assert_eq!(drops.load(Ordering::Relaxed), 1, "the daemon's pass leaks");
        super::discard_if(true, Counted(&drops));
        assert_eq!(drops.load(Ordering::Relaxed), 1, "a one-pass run frees");
    }

    /// `prefault` must map the pages it is given (a wrong range or advice
    /// would fault them one by one again, silently) and write nothing.
    #[test]
    #[cfg(target_os = "linux")]
    fn prefault_maps_every_page_of_the_spare_capacity_and_changes_no_byte() {
        let page = super::page_size();
        let mut v: Vec<u8> = Vec::with_capacity(4 << 20);
        v.extend_from_slice(b"kept");
        assert!(
            super::prefault(&mut v),
            "the kernel refused MADV_POPULATE_WRITE (it needs Linux 5.14 or later)"
        );
        assert_eq!(v, b"kept");
        let spare = v.spare_capacity_mut();
        let start = (spare.as_mut_ptr() as usize).div_ceil(page) * page;
        let end = (spare.as_mut_ptr() as usize + spare.len()) / page * page;
        let mut resident = vec![0u8; (end - start) / page];
        // SAFETY: the range is inside `v`'s allocation; mincore only
        // reports which of its pages are in memory.
        let r = unsafe {
            libc::mincore(
                start as *mut libc::c_void,
                end - start,
                resident.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        let missing = resident.iter().filter(|&&b| b & 1 == 0).count();
        assert_eq!(
            missing,
            0,
            "{missing} of {} pages not mapped",
            resident.len()
        );
        // Small buffers are left alone.
        assert!(!super::prefault(&mut Vec::<u8>::with_capacity(64 << 10)));
    }

    /// The bug this guards against: glibc ignores a threshold above its
    /// maximum (it returns 0 and changes nothing), so a value that looked
    /// right would silently tune nothing.
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_accepts_the_one_pass_tuning() {
        assert!(super::tune_for_one_pass());
        // The rest of the test process frees what it discards.
        super::ONE_PASS.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}
