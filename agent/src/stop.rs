//! SIGTERM in a one-pass run (`sync --once`, `bundle stick`, `bundle
//! import`): the transaction under way is finished, then the run stops.
//!
//! Why: systemd stops a unit with SIGTERM (`systemctl stop`, a shutdown,
//! and for `driftless-usb@.service` the stick being pulled out, through
//! `BindsTo=`). Its default action killed the run wherever it was, in the
//! middle of a transaction or its health checks: crash-safe (the next run
//! recovers it), but on a host driven only by sticks that next run may be
//! weeks away, with the host half switched until then. So a one-pass run
//! records SIGTERM instead, finishes (commits or reverts) what it started,
//! and starts nothing new; the units give it the time (`KillMode=mixed`,
//! `TimeoutStopSec=`), and SIGKILL still ends it after that. SIGINT (an
//! operator's Ctrl-C) keeps its default: crash-safe, and what they asked.
//! The daemon (`run`) handles its signals itself (see `daemon`).

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// From now on, SIGTERM asks this process to stop once the current
/// transaction is done, instead of killing it (see the module docs).
pub fn defer_sigterm(rt: &tokio::runtime::Handle) {
    use tokio::signal::unix::{signal, SignalKind};
    let _entered = rt.enter();
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            rt.spawn(async move {
                while term.recv().await.is_some() {
                    REQUESTED.store(true, Ordering::Relaxed);
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
    REQUESTED.load(Ordering::Relaxed)
}
