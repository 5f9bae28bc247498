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

/// `f` over `items` cut into `threads` contiguous parts, each on a thread
/// of its own: each part with its result, in the parts' order. A part whose thread cannot
/// be started (`Scope::spawn` would panic then) runs on the caller's; one
/// whose thread panicked gives `Err`. Every thread is joined before this
/// returns.
pub fn map_parts<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&[T]) -> R + Sync,
) -> Vec<(&[T], std::thread::Result<R>)> {
    if items.is_empty() {
        return Vec::new();
    }
    let chunk = items.len().div_ceil(threads.max(1));
    let f = &f;
    std::thread::scope(|scope| {
        let parts: Vec<_> = items
            .chunks(chunk)
            .map(|part| {
                let thread = std::thread::Builder::new().spawn_scoped(scope, move || f(part));
                (part, thread)
            })
            .collect();
        parts
            .into_iter()
            .map(|(part, thread)| match thread {
                Ok(thread) => (part, thread.join()),
                Err(_) => (part, Ok(f(part))),
            })
            .collect()
    })
}
