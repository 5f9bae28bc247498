//! The rollout decision: may this host apply commit C now?
//!
//! Pure: the caller reads the fleet's state (from etcd) into a
//! [`FleetView`] and passes the time, so every branch is tested without a
//! store or a clock. The semaphore check here is advisory (it explains a
//! wait); the permit itself is taken atomically by the store afterwards.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::policy::{Policy, Select};
use crate::plan::diff::short;
/// Re-exported for callers that build a [`ThisHost`] without naming jiff.
pub use jiff::tz::TimeZone;

/// This host, as the decision sees it.
#[derive(Debug, Clone)]
pub struct ThisHost<'a> {
    pub name: &'a str,
    pub group: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    /// The commit it has applied, if any.
    pub current: Option<&'a str>,
    /// Its local time zone, for maintenance windows written without one.
    pub tz: &'a jiff::tz::TimeZone,
}

/// What one host last reported (its status key in the store).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub host: String,
    pub group: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The commit applied and verified on the host.
    pub commit: Option<String>,
    /// Its checks passed the last time they ran.
    pub healthy: bool,
    /// When `commit` was applied (its checks passed then), seconds since
    /// the epoch, by the host's clock.
    pub since: Option<i64>,
}

/// Everything the decision needs to know about the fleet.
#[derive(Debug, Clone, Default)]
pub struct FleetView {
    /// Live hosts (their status keys have not expired).
    pub reports: Vec<Report>,
    /// Per commit, the hosts that reverted it (with why).
    pub bad: BTreeMap<String, BTreeMap<String, String>>,
    /// Per group, the hosts holding a permit.
    pub permits: BTreeMap<String, BTreeSet<String>>,
    /// Suspended rollouts: per group, or [`ALL_GROUPS`] for every group.
    pub suspended: BTreeMap<String, Suspension>,
}

/// The key of [`FleetView::suspended`] that suspends every group.
pub const ALL_GROUPS: &str = "*";

/// An operator's `driftless suspend`: no host of the group applies a new
/// commit until `driftless resume`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspension {
    /// Who suspended (user@host of the operator's command).
    pub by: String,
    pub reason: String,
    /// Seconds since the epoch.
    pub since: i64,
}

/// The answer, with the reason a person reads in the log and in
/// `driftless fleet status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead (taking a permit of the host's group first).
    Apply { wave: usize, reason: String },
    /// Keep the current state; ask again next run.
    Wait { wave: usize, reason: String },
    /// The commit's rollout is halted: never apply it (a newer commit, or
    /// an operator clearing the marks, resumes).
    Halt { reason: String },
}

impl Decision {
    pub fn reason(&self) -> &str {
        match self {
            Decision::Apply { reason, .. }
            | Decision::Wait { reason, .. }
            | Decision::Halt { reason } => reason,
        }
    }
}

/// Buckets of the host-name hash space: percentages are cut at 1/100 of
/// a percent.
pub const BUCKETS: u64 = 10_000;

/// The host's place in the hash space, `0..BUCKETS`: the first 8 bytes of
/// SHA-256 over a fixed tag and the name. Stable across runs, releases
/// and machines (unlike `std`'s hasher), and spread evenly, so `percent`
/// waves get close to their share.
pub fn bucket(host: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(b"driftless-rollout\0");
    h.update(host.as_bytes());
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_be_bytes(first) % BUCKETS
}

/// The index of the wave a host belongs to: the first whose selector it
/// matches. Validation guarantees a last `percent = 100` wave, so every
/// host has one; `None` only for a policy built by hand without it.
pub fn wave_of(policy: &Policy, host: &str, labels: &BTreeMap<String, String>) -> Option<usize> {
    let b = bucket(host);
    policy.waves.iter().position(|w| match &w.select {
        Select::Labels(want) => want.iter().all(|(k, v)| labels.get(k) == Some(v)),
        Select::Percent(p) => b < u64::from(*p) * BUCKETS / 100,
    })
}

/// How far a wave has got with a commit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WaveProgress {
    /// Live hosts of the wave.
    pub hosts: usize,
    /// Of those, on the commit.
    pub applied: usize,
    /// Of those, healthy.
    pub healthy: usize,
    /// When the `min_healthy`-th healthy host applied it.
    pub healthy_enough_at: Option<i64>,
}

/// Per wave, the progress of `commit` among the live hosts.
pub fn progress(policy: &Policy, view: &FleetView, commit: &str) -> Vec<WaveProgress> {
    let mut out = vec![WaveProgress::default(); policy.waves.len()];
    let mut since: Vec<Vec<i64>> = vec![Vec::new(); policy.waves.len()];
    for r in &view.reports {
        let Some(w) = wave_of(policy, &r.host, &r.labels) else {
            continue;
        };
        let (Some(p), Some(s)) = (out.get_mut(w), since.get_mut(w)) else {
            continue;
        };
        p.hosts += 1;
        if r.commit.as_deref() == Some(commit) {
            p.applied += 1;
            if r.healthy {
                p.healthy += 1;
                s.push(r.since.unwrap_or(i64::MAX));
            }
        }
    }
    for ((p, s), w) in out.iter_mut().zip(since.iter_mut()).zip(&policy.waves) {
        s.sort_unstable();
        let need = w.min_healthy.max(1) as usize;
        p.healthy_enough_at = s.get(need - 1).copied().filter(|t| *t != i64::MAX);
    }
    out
}

/// Why `group` may not apply a new commit at `now` because of the
/// policy's maintenance windows: `None` when no window holds for the group
/// or one of them is open. Used by [`decide`] and, with etcd unreachable,
/// by the agent alone (`on_unreachable = "apply-alone"` never applies
/// outside a window).
pub fn outside_window(
    policy: &Policy,
    group: &str,
    now: i64,
    tz: &jiff::tz::TimeZone,
) -> Option<String> {
    let rules: Vec<_> = policy
        .windows
        .iter()
        .filter(|r| r.holds_for(group))
        .collect();
    if rules.is_empty() || rules.iter().any(|r| r.window.open_until(now, tz).is_some()) {
        return None;
    }
    let which: Vec<String> = rules
        .iter()
        .map(|r| {
            format!(
                "{:?} for {}",
                r.window.calendar.to_string(),
                humantime::format_duration(std::time::Duration::from_secs(r.window.length))
            )
        })
        .collect();
    let next = rules
        .iter()
        .filter_map(|r| r.window.next_open(now, tz))
        .min();
    Some(format!(
        "group {group:?} is outside its maintenance window ({}); {}",
        which.join(", "),
        match next {
            Some(t) => format!(
                "the next opens at {} ({}s from now)",
                crate::time::time_str(t),
                t.saturating_sub(now)
            ),
            None => "none of them opens again: fix the policy".to_string(),
        }
    ))
}

/// If an operator suspended rollouts for `group` (or for all groups).
pub fn suspension<'a>(view: &'a FleetView, group: &str) -> Option<(&'a str, &'a Suspension)> {
    view.suspended
        .get_key_value(group)
        .or_else(|| view.suspended.get_key_value(ALL_GROUPS))
        .map(|(k, v)| (k.as_str(), v))
}

/// May `host` apply `commit` at `now`?
///
/// In order: a commit reverted by `max_failures` hosts is halted; a host
/// already on the commit just converges; an operator's suspension of the
/// host's group holds every new commit; every earlier wave must have
/// `min_healthy` healthy reports and have baked `bake` since the
/// `min_healthy`-th; the group's maintenance window (if any) must be
/// open; and the host's group must have a free permit (or the host holds
/// one already).
pub fn decide(
    policy: &Policy,
    host: &ThisHost,
    view: &FleetView,
    commit: &str,
    now: i64,
) -> Decision {
    let c = short(commit);
    if let Some(bad) = view.bad.get(commit) {
        if bad.len() >= policy.max_failures as usize {
            let who: Vec<String> = bad
                .iter()
                .take(3)
                .map(|(h, why)| format!("{h} ({why})"))
                .collect();
            return Decision::Halt {
                reason: format!(
                    "rollout of {c} is halted: {} host(s) reverted it (max_failures = {}): {}{}; a newer commit resumes",
                    bad.len(),
                    policy.max_failures,
                    who.join("; "),
                    if bad.len() > 3 { "; …" } else { "" }
                ),
            };
        }
    }
    let Some(wave) = wave_of(policy, host.name, host.labels) else {
        return Decision::Wait {
            wave: policy.waves.len(),
            reason: format!(
                "host {} matches no wave of the rollout policy of {c} (its last wave should be percent = 100)",
                host.name
            ),
        };
    };
    let wave_name = policy.waves.get(wave).map_or("?", |w| w.name.as_str());
    if host.current == Some(commit) {
        return Decision::Apply {
            wave,
            reason: format!("already on {c}"),
        };
    }
    if let Some((key, s)) = suspension(view, host.group) {
        let scope = if key == ALL_GROUPS {
            "every group".to_string()
        } else {
            format!("group {key:?}")
        };
        return Decision::Wait {
            wave,
            reason: format!(
                "rollouts are suspended for {scope} by {} since {}{}; `driftless resume{}` lets {c} go on",
                s.by,
                crate::time::time_str(s.since),
                if s.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", s.reason)
                },
                if key == ALL_GROUPS {
                    String::new()
                } else {
                    format!(" --group {key}")
                }
            ),
        };
    }
    let progress = progress(policy, view, commit);
    for (j, (w, p)) in policy.waves.iter().zip(&progress).enumerate().take(wave) {
        if w.min_healthy == 0 {
            continue;
        }
        if p.healthy < w.min_healthy as usize {
            return Decision::Wait {
                wave,
                reason: format!(
                    "wave {wave_name:?} waits for wave {j} {:?}: {} of {} healthy report(s) of {c} ({} live host(s) in it, {} on {c})",
                    w.name, p.healthy, w.min_healthy, p.hosts, p.applied
                ),
            };
        }
        let ready = p.healthy_enough_at.map_or(i64::MAX, |t| {
            t.saturating_add(i64::try_from(w.bake).unwrap_or(i64::MAX))
        });
        if now < ready {
            return Decision::Wait {
                wave,
                reason: format!(
                    "wave {wave_name:?} waits for wave {j} {:?} to bake until {} ({}s more)",
                    w.name,
                    crate::time::time_str(ready),
                    ready.saturating_sub(now)
                ),
            };
        }
    }
    if let Some(reason) = outside_window(policy, host.group, now, host.tz) {
        return Decision::Wait { wave, reason };
    }
    let empty = BTreeSet::new();
    let held = view.permits.get(host.group).unwrap_or(&empty);
    if !held.contains(host.name) && held.len() >= policy.max_concurrent as usize {
        let who: Vec<&str> = held.iter().map(String::as_str).take(5).collect();
        return Decision::Wait {
            wave,
            reason: format!(
                "group {:?} has all {} permit(s) taken (by {}): at most max_concurrent = {} host(s) apply at once",
                host.group,
                held.len(),
                who.join(", "),
                policy.max_concurrent
            ),
        };
    }
    Decision::Apply {
        wave,
        reason: format!("wave {wave} {wave_name:?} may apply {c}"),
    }
}
