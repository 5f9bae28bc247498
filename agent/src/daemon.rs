//! `driftless run`: the long-running agent under systemd (`Type=notify`).
//!
//! - polls every `interval` plus a random share of `splay` (so ten thousand
//!   hosts do not hit the git server in the same second);
//! - `SIGHUP` (`systemctl reload driftless`) syncs now;
//! - `SIGTERM`/`SIGINT` let the current sync finish (a transaction is never
//!   cut in half), then exit;
//! - sd_notify: `READY=1` once started, `STATUS=` lines saying what it does,
//!   `WATCHDOG=1` from the main loop, `STOPPING=1`.
//!
//! The watchdog is fed by the loop itself, not by a side thread: a hung
//! loop stops the pings and systemd restarts the agent. A sync that runs
//! longer than [`MAX_SYNC`] also stops them.
//!
//! Each sync takes the same lock as `sync --once` from a timer or cron;
//! when the lock is busy the poll is skipped, never queued.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::config::Settings;
use crate::exit::{Classify, Error, Failure};
use crate::plan::diff::short;
use crate::sync::{self, SyncOptions};

/// A sync running longer than this is considered hung: the watchdog is no
/// longer fed.
pub const MAX_SYNC: Duration = Duration::from_secs(15 * 60);

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!("sd_notify failed: {e}");
    }
}

fn status(text: &str) {
    notify(&[NotifyState::Status(text)]);
}

/// A pseudo-random fraction in [0, 1): enough to spread polls; not crypto.
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let mut x = nanos ^ ((std::process::id() as u64) << 32) ^ 0x9E37_79B9_7F4A_7C15;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    (x % 1_000_000) as f64 / 1_000_000.0
}

pub fn run(settings: Settings, opts: SyncOptions) -> Result<(), Error> {
    crate::memory::limit_arenas();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .kind(Failure::Failed)?;
    rt.block_on(main_loop(Arc::new(settings), opts))
}

async fn main_loop(settings: Arc<Settings>, opts: SyncOptions) -> Result<(), Error> {
    let mut hup = signal(SignalKind::hangup()).kind(Failure::Failed)?;
    let mut term = signal(SignalKind::terminate()).kind(Failure::Failed)?;
    let mut int = signal(SignalKind::interrupt()).kind(Failure::Failed)?;
    // Refuse to start on a broken setup rather than loop: the state
    // directory must be usable.
    crate::sync::open_state(&settings).kind(Failure::Config)?;
    let ping_every = sd_notify::watchdog_enabled()
        .map(|d| d / 2)
        .unwrap_or(Duration::from_secs(3600));
    let mut ticker = tokio::time::interval(ping_every);
    notify(&[NotifyState::Ready, NotifyState::Status("started")]);
    info!(
        interval = ?settings.interval,
        splay = ?settings.splay,
        "driftless agent started"
    );
    // Debug builds only (what the tests run), like the failpoints.
    if cfg!(debug_assertions) && std::env::var_os("DRIFTLESS_TEST_HANG").is_some() {
        // Test hook: a hung main loop. Blocks the runtime's only worker so
        // nothing feeds the watchdog.
        warn!("test hook: hanging the main loop");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    // The commit the last pass said "nothing to do" for (see
    // `SyncOptions::idle_logged`); any other outcome in between forgets it.
    let mut idle_logged: Option<String> = None;
    loop {
        status(&format!(
            "syncing {} ({})",
            // STATUS= is readable by every local user (`systemctl status`).
            settings
                .source
                .as_deref()
                .map_or_else(|| "?".into(), crate::effects::fetch::redact),
            settings.branch
        ));
        let s = settings.clone();
        let o = SyncOptions {
            wait: Duration::ZERO,
            idle_logged: idle_logged.take(),
            ..opts.clone()
        };
        let handle = tokio::runtime::Handle::current();
        let mut task = tokio::task::spawn_blocking(move || {
            let now = crate::time::now();
            sync::sync_once(&s, &o, now, &handle)
        });
        let started = tokio::time::Instant::now();
        let mut stopping = false;
        let result = loop {
            tokio::select! {
                r = &mut task => break r,
                _ = ticker.tick() => {
                    if started.elapsed() < MAX_SYNC {
                        notify(&[NotifyState::Watchdog]);
                    } else {
                        warn!("sync running for more than {MAX_SYNC:?}: no longer feeding the watchdog");
                    }
                }
                _ = term.recv() => { stopping = true; status("stopping after the current sync"); }
                _ = int.recv() => { stopping = true; status("stopping after the current sync"); }
            }
        };
        // Only after a full sync: an idle poll allocates little, and
        // trimming after it would hand pages back that the next poll
        // faults in again.
        if !matches!(&result, Ok(Ok(r)) if r.quick) {
            crate::memory::release();
        }
        let when = crate::time::time_str(crate::time::now());
        match result {
            Ok(Ok(report)) => {
                if report.idle() {
                    idle_logged = Some(report.commit.clone());
                }
                let what = match (&report.applied, report.skipped_bad) {
                    _ if report.waiting.is_some() => {
                        format!("{} waits for its turn in the fleet", short(&report.commit))
                    }
                    (Some(a), _) => format!(
                        "applied {} (+{} ~{} -{})",
                        short(&report.commit),
                        a.created,
                        a.changed,
                        a.removed
                    ),
                    (None, true) => format!("{} is marked bad, not applied", short(&report.commit)),
                    (None, false) => format!("{} up to date", short(&report.commit)),
                };
                status(&format!("idle since {when}; last sync: {what}"));
            }
            Ok(Err(e)) if e.kind == Failure::Busy => {
                status(&format!(
                    "idle since {when}; last poll skipped: another run held the lock"
                ));
            }
            Ok(Err(e)) if e.kind == Failure::Config => {
                notify(&[NotifyState::Stopping]);
                return Err(e);
            }
            Ok(Err(e)) => {
                warn!("sync failed: {e}");
                let first = e
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .chars()
                    .take(200)
                    .collect::<String>();
                status(&format!("idle since {when}; last sync failed: {first}"));
            }
            Err(join) => {
                warn!("sync task panicked: {join}");
                status(&format!("idle since {when}; last sync crashed"));
            }
        }
        if stopping {
            break;
        }
        let delay = settings
            .interval
            .saturating_add(settings.splay.mul_f64(jitter()));
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        let stop = loop {
            tokio::select! {
                _ = &mut sleep => break false,
                _ = hup.recv() => { info!("SIGHUP: syncing now"); break false; }
                _ = term.recv() => break true,
                _ = int.recv() => break true,
                _ = ticker.tick() => notify(&[NotifyState::Watchdog]),
            }
        };
        if stop {
            break;
        }
    }
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    info!("driftless agent stopped");
    Ok(())
}
