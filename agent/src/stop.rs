//! SIGTERM in a one-pass run (`sync --once`, `bundle stick`, the sync of
//! `bundle import`): a
//! transaction under way is finished, then the run stops; outside one, the
//! run stops at once, as before.
//!
//! Why: systemd stops a unit with SIGTERM (`systemctl stop`, a shutdown,
//! and for `driftless-usb@.service` the stick being pulled out, through
//! `BindsTo=`). Its default action killed the run wherever it was, in the
//! middle of a transaction or its health checks: crash-safe (the next run
//! recovers it), but on a host driven only by sticks that next run may be
//! weeks away, with the host half switched until then. So while a
//! transaction is under way ([`critical`]: an apply, with its checks and
//! any revert; a recovery), a one-pass run records SIGTERM, finishes
//! (commits or reverts) what it started and starts nothing new; the units
//! give it the time (`KillMode=mixed`, `TimeoutStopSec=`), and SIGKILL
//! still ends it after that. Anywhere else (a fetch that hangs, planning,
//! an import) SIGTERM ends the run at once, by the signal's own default
//! action: nothing there is half done, and a stop should not wait on a
//! slow server. SIGINT (an operator's Ctrl-C) keeps its default: crash-safe,
//! and what they asked. The daemon (`run`) handles its signals itself
//! (see `daemon`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// How many [`Critical`] sections are open.
static CRITICAL: AtomicUsize = AtomicUsize::new(0);

/// A transaction under way: SIGTERM waits for it (see the module docs).
#[must_use = "the section ends when this is dropped"]
pub struct Critical(());

impl Drop for Critical {
    fn drop(&mut self) {
        CRITICAL.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Opens a section that SIGTERM does not cut short, until the returned
/// guard is dropped.
pub fn critical() -> Critical {
    CRITICAL.fetch_add(1, Ordering::SeqCst);
    Critical(())
}

/// From now on, SIGTERM asks this process to stop once the current
/// transaction is done, instead of killing it (see the module docs).
pub fn defer_sigterm(rt: &tokio::runtime::Handle) {
    use tokio::signal::unix::{signal, SignalKind};
    let _entered = rt.enter();
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            rt.spawn(async move {
                while term.recv().await.is_some() {
                    REQUESTED.store(true, Ordering::SeqCst);
                    if CRITICAL.load(Ordering::SeqCst) == 0 {
                        terminate_now();
                    }
                    tracing::warn!(
                        "SIGTERM: finishing the transaction under way (committed or reverted), then stopping"
                    );
                }
            });
        }
        // Then SIGTERM kills the run, as before: crash-safe.
        Err(e) => tracing::debug!("SIGTERM not deferred: {e}"),
    }
}

/// Whether SIGTERM asked this run to stop: nothing new may start.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Ends the process as SIGTERM's default action does (what a run did
/// before it deferred the signal, and what systemd expects of a stop). A
/// section opened at this very instant is cut short like a `kill -9`
/// there: the transaction is crash-safe, and the next run recovers it.
fn terminate_now() {
    // SAFETY: resetting a signal's disposition and raising it are
    // async-signal-safe libc calls with no memory effects on this process.
    unsafe {
        libc::signal(libc::SIGTERM, libc::SIG_DFL);
        libc::kill(libc::getpid(), libc::SIGTERM);
    }
    // The signal is delivered before kill returns to the last thread
    // able to take it; should it not be (all threads blocking it), leave
    // with its exit status.
    std::process::exit(128 + libc::SIGTERM);
}
