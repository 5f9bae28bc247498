//! How many threads the agent's parallel stages use.
//!
//! `std::thread::available_parallelism` reads `/proc/self/cgroup` and the
//! cgroup's CPU quota files on every call (three opens and reads): a
//! one-file sync asked seven times, for about half a millisecond of a
//! 40 ms run. Asked once per process: a quota changed while the agent
//! runs only takes effect at its next start, as for most programs.

use std::sync::OnceLock;

/// The CPUs this process may use (at least 1), taken once.
pub fn cpus() -> usize {
    static CPUS: OnceLock<usize> = OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
