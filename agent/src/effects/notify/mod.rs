//! Notifications: webhooks on the main events of a run (applied,
//! reverted, degraded, refused, drift repaired, halted).
//!
//! Every event is first written to the spool in the state directory
//! ([`spool`]), then delivered ([`deliver`]): a signed JSON POST per event,
//! per webhook strictly in order, retried with backoff within a small time
//! budget at the end of the run. What is not delivered stays spooled and is
//! retried at the next run (every poll of the daemon, timer or cron), so
//! an offline period, a receiver down or a restart of the agent loses
//! nothing; an air-gapped host simply keeps them (the USB stick carries
//! them in its report).
//!
//! Summaries come from run outcomes (counts, the run's error message, the
//! names of failed checks), never from rendered content; the key is read
//! from its file at delivery and never logged; URLs are logged without
//! their query.
//!
//! Repeating conditions (the same refusal on every poll, a halted agent
//! refusing every poll) are notified once, until a run gets past them.

pub mod config;
pub mod deliver;
pub mod event;
pub mod spool;

use std::time::Duration;

use tokio::runtime::Handle;
use tracing::warn;

use crate::config::Settings;
use crate::effects::state::StateDir;
use crate::exit::{Error, Failure};
use crate::plan::diff::short;
use crate::sync::Report;
use event::{Event, EventKind};
use spool::Spool;

/// How long the end of a run may spend delivering (new attempts start
/// only before it runs out; one in flight may take its `timeout`).
pub const DELIVERY_BUDGET: Duration = Duration::from_secs(3);

/// Longest summary sent.
const MAX_SUMMARY: usize = 2000;

/// After a run under the lock: the event of its outcome, if any, is
/// spooled, then everything spooled is delivered within the budget.
pub fn run_finished(
    settings: &Settings,
    state: &StateDir,
    rt: &Handle,
    now: i64,
    result: &Result<Report, Error>,
) {
    if settings.webhooks.is_empty() {
        return;
    }
    let spool = Spool::new(state.path());
    let event = event_of(settings, state, now, result);
    match event {
        Some((event, repeat)) => spool_event(settings, &spool, event, repeat),
        None => {
            // A run got past a refusal or a halt: the next one is news.
            if let Err(e) = spool.set_repeat(None) {
                warn!("webhooks: {e:#}");
            }
        }
    }
    deliver_all(settings, &spool, rt);
}

/// A run found the agent halted and refused to go on: the `halted` event,
/// once per halt.
pub fn halted(
    settings: &Settings,
    state: &StateDir,
    rt: &Handle,
    now: i64,
    since: i64,
    commit: Option<&str>,
    reason: &str,
) {
    if settings.webhooks.is_empty() {
        return;
    }
    let spool = Spool::new(state.path());
    let mut e = Event::new(&settings.host, EventKind::Halted, now, &since.to_string());
    e.commit = commit.map(str::to_string);
    e.summary = summary(&format!(
        "halted since {}: {reason}; run `driftless sync --retry` once the host is repaired",
        crate::time::time_str(since)
    ));
    spool_event(settings, &spool, e, Some(format!("halted:{since}")));
    deliver_all(settings, &spool, rt);
}

/// Events still spooled (for the USB stick's report).
pub fn pending(settings: &Settings) -> Vec<Event> {
    if settings.webhooks.is_empty() {
        return Vec::new();
    }
    Spool::new(&settings.state_dir).pending()
}

fn summary(text: &str) -> String {
    let mut s: String = text.chars().take(MAX_SUMMARY).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    s
}

/// Spools `event` for every webhook that wants it. `repeat`: an id of the
/// condition, for events that would otherwise repeat on every poll.
fn spool_event(settings: &Settings, spool: &Spool, event: Event, repeat: Option<String>) {
    if let Some(r) = &repeat {
        if spool.last_repeat().as_deref() == Some(r.as_str()) {
            return;
        }
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    for hook in settings.webhooks.iter().filter(|h| h.wants(event.event)) {
        if let Err(e) = spool.push(&hook.queue(), &hook.url, &event, now_ms) {
            warn!(
                "webhook {}: the {} event is lost: {e:#}",
                deliver::display_url(&hook.url),
                event.event.name()
            );
        }
    }
    if let Err(e) = spool.set_repeat(repeat.as_deref()) {
        warn!("webhooks: {e:#}");
    }
}

/// Delivers every webhook's queue (concurrently, each in order).
fn deliver_all(settings: &Settings, spool: &Spool, rt: &Handle) {
    let deadline = tokio::time::Instant::now() + DELIVERY_BUDGET;
    rt.block_on(futures_util::future::join_all(
        settings
            .webhooks
            .iter()
            .map(|h| deliver::deliver(spool, h, deadline)),
    ));
}

/// The event of a run's result, and the id of its condition when it
/// repeats on every poll until fixed (a refusal).
fn event_of(
    settings: &Settings,
    state: &StateDir,
    now: i64,
    result: &Result<Report, Error>,
) -> Option<(Event, Option<String>)> {
    let host = &settings.host;
    match result {
        Ok(r) => {
            let a = r.applied.as_ref()?;
            let before = crate::effects::apply::inventory_before(state, &a.txid)
                .ok()
                .flatten()
                .unwrap_or_default();
            let drifted = crate::sync::stick::drifted(&r.plan, &before);
            let kind = if before.commit.as_deref() == Some(r.commit.as_str()) {
                EventKind::DriftRepaired
            } else {
                EventKind::Applied
            };
            let mut e = Event::new(host, kind, now, &a.txid);
            e.commit = Some(r.commit.clone());
            e.txid = Some(a.txid.clone());
            e.summary = match kind {
                EventKind::DriftRepaired => format!(
                    "repaired {} file(s) changed on the host, at commit {} (+{} ~{} -{})",
                    drifted.len(),
                    short(&r.commit),
                    a.created,
                    a.changed,
                    a.removed
                ),
                _ => format!(
                    "applied {} (+{} ~{} -{})",
                    short(&r.commit),
                    a.created,
                    a.changed,
                    a.removed
                ),
            };
            e.drifted = drifted;
            Some((e, None))
        }
        Err(err) => {
            let message = format!("{:#}", err.error);
            let reverted = err.error.downcast_ref::<crate::sync::Reverted>();
            let kind = match err.kind {
                Failure::InvalidRepo | Failure::Refused => EventKind::Refused,
                Failure::Degraded => EventKind::Degraded,
                _ if reverted.is_some() => EventKind::Reverted,
                _ => return None,
            };
            let commit = reverted.map(|r| r.commit.clone());
            let (id, repeat) = match kind {
                EventKind::Refused => {
                    use sha2::Digest;
                    let h = hex::encode(&sha2::Sha256::digest(message.as_bytes())[..8]);
                    (format!("{h}@{now}"), Some(format!("refused:{h}")))
                }
                _ => (format!("{}@{now}", commit.as_deref().unwrap_or("-")), None),
            };
            let mut e = Event::new(host, kind, now, &id);
            e.failing_checks = event::failing_checks(&message);
            e.commit = commit;
            e.summary = summary(&message);
            Some((e, repeat))
        }
    }
}
