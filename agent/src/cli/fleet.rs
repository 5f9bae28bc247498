//! `driftless fleet status`: one view of a fleet's rollouts, read from
//! etcd (`[fleet]` in agent.toml): per commit and wave, how many live
//! hosts applied it, are healthy, failed (reverted it) or wait, and why
//! each waiting host waits.
//!
//! The summary is computed by [`summarize`] (pure, tested) from the
//! store's [`Snapshot`]; each commit is judged by its own rollout policy,
//! which the first host to see the commit wrote next to it.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;

use serde::Serialize;
use serde_json::json;

use super::output::{print_json, API_VERSION};
use super::Format;
use crate::config::Settings;
use crate::effects::fleet::Snapshot;
use crate::exit::{Error, Failure};
use crate::plan::diff::short;
use crate::rollout::decide::wave_of;
use crate::rollout::Policy;

/// One commit's rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommitSummary {
    pub commit: String,
    /// False: no host recorded the commit's policy; the default one
    /// (one wave) is shown.
    pub policy_known: bool,
    /// Hosts that reverted it (host → why).
    pub reverted_by: BTreeMap<String, String>,
    /// `max_failures` reached: no host applies it any more.
    pub halted: bool,
    /// "halted", "rolling out" (some host waits for it) or "settled".
    pub state: &'static str,
    pub max_concurrent: u32,
    pub waves: Vec<WaveSummary>,
    /// The policy's maintenance windows (empty: none).
    pub windows: Vec<crate::rollout::policy::WindowRule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WaveSummary {
    pub name: String,
    /// Live hosts of the wave.
    pub hosts: usize,
    pub applied: usize,
    pub healthy: usize,
    /// Hosts of the wave that reverted the commit.
    pub failed: usize,
    pub waiting: usize,
    /// Waiting host → why.
    pub waits: BTreeMap<String, String>,
}

/// Per commit (those hosts are on, wait for, or reverted), per wave.
/// Commits some host waits for come first (the rollouts in progress).
pub fn summarize(snap: &Snapshot) -> Vec<CommitSummary> {
    let mut commits: BTreeSet<String> = BTreeSet::new();
    for s in &snap.statuses {
        commits.extend(s.commit.iter().cloned());
        commits.extend(s.waiting.iter().map(|w| w.commit.clone()));
    }
    commits.extend(snap.bad.keys().cloned());
    let default = Policy::default_policy();
    let mut out: Vec<CommitSummary> = commits
        .into_iter()
        .map(|commit| {
            let (policy, known) = match snap.policies.get(&commit) {
                Some(p) => (p, true),
                None => (&default, false),
            };
            let mut waves: Vec<WaveSummary> = policy
                .waves
                .iter()
                .map(|w| WaveSummary {
                    name: w.name.clone(),
                    hosts: 0,
                    applied: 0,
                    healthy: 0,
                    failed: 0,
                    waiting: 0,
                    waits: BTreeMap::new(),
                })
                .collect();
            let no_labels = BTreeMap::new();
            for s in &snap.statuses {
                let Some(w) = wave_of(policy, &s.host, &s.labels).and_then(|i| waves.get_mut(i))
                else {
                    continue;
                };
                w.hosts += 1;
                if s.commit.as_deref() == Some(commit.as_str()) {
                    w.applied += 1;
                    if s.healthy {
                        w.healthy += 1;
                    }
                } else if let Some(wait) = s.waiting.as_ref().filter(|w| w.commit == commit) {
                    w.waiting += 1;
                    w.waits.insert(s.host.clone(), wait.reason.clone());
                }
            }
            let reverted_by = snap.bad.get(&commit).cloned().unwrap_or_default();
            for host in reverted_by.keys() {
                let labels = snap
                    .statuses
                    .iter()
                    .find(|s| &s.host == host)
                    .map_or(&no_labels, |s| &s.labels);
                if let Some(w) = wave_of(policy, host, labels).and_then(|i| waves.get_mut(i)) {
                    w.failed += 1;
                }
            }
            let halted = reverted_by.len() >= policy.max_failures as usize;
            let state = if halted {
                "halted"
            } else if waves.iter().any(|w| w.waiting > 0) {
                "rolling out"
            } else {
                "settled"
            };
            CommitSummary {
                halted,
                state,
                windows: policy.windows.clone(),
                max_concurrent: policy.max_concurrent,
                commit,
                policy_known: known,
                reverted_by,
                waves,
            }
        })
        .collect();
    out.sort_by_key(|c| {
        let waiting: usize = c.waves.iter().map(|w| w.waiting).sum();
        (waiting == 0, c.commit.clone())
    });
    out
}

/// `[fleet]` with the etcd backend: every command here reads or writes
/// etcd.
pub(super) fn fleet_of(s: &Settings) -> Result<&crate::config::FleetSettings, Error> {
    let fleet = s.fleet.as_ref().ok_or_else(|| {
        Error::new(
            Failure::Config,
            anyhow::anyhow!(
                "no [fleet] section in the agent config: add one with `endpoints` (and the fleet's `prefix`) to reach a fleet"
            ),
        )
    })?;
    if let Some(url) = &fleet.fleetlock {
        return Err(Error::new(
            Failure::Config,
            anyhow::anyhow!(
                "[fleet] uses the FleetLock server {url}, which keeps no fleet view, suspensions or permits to show; \
                 run this where [fleet] endpoints names the fleet's etcd (with --config FILE)"
            ),
        ));
    }
    Ok(fleet)
}

/// A group name as a key part: what `[fleet] group` allows.
fn check_group(group: &str) -> Result<(), Error> {
    if group.is_empty()
        || group == crate::rollout::decide::ALL_GROUPS
        || group.contains('/')
        || group.contains(char::is_whitespace)
    {
        return Err(Error::new(
            Failure::Usage,
            anyhow::anyhow!(
                "--group {group:?}: not a group name (a `[fleet] group` has no '/', spaces or '*'); leave --group out for every group"
            ),
        ));
    }
    Ok(())
}

/// Who runs this command, for the suspension record: the user who ran
/// sudo, or the user, at this host.
fn operator(s: &Settings) -> String {
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| format!("uid {}", nix::unistd::getuid()));
    format!("{user}@{}", s.host)
}

/// `driftless suspend [--group G] [--reason R]`.
pub(crate) fn suspend(s: &Settings, group: Option<&str>, reason: &str) -> Result<ExitCode, Error> {
    let fleet = fleet_of(s)?;
    if let Some(g) = group {
        check_group(g)?;
    }
    let key = group.unwrap_or(crate::rollout::decide::ALL_GROUPS);
    let sus = crate::rollout::decide::Suspension {
        by: operator(s),
        reason: reason.to_string(),
        since: crate::time::now(),
    };
    change(fleet, Change::Suspend(key, &sus))?;
    match group {
        Some(g) => outln!(
            "suspended new rollouts for group {g:?}; `driftless resume --group {g}` lifts it"
        ),
        None => outln!("suspended new rollouts for every group; `driftless resume` lifts it"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `driftless resume [--group G | --commit C]`.
pub(crate) fn resume(
    s: &Settings,
    group: Option<&str>,
    commit: Option<&str>,
) -> Result<ExitCode, Error> {
    let fleet = fleet_of(s)?;
    if let Some(c) = commit {
        // Commit ids are stored lowercase.
        let c = &c.to_ascii_lowercase();
        if c.len() != 40 || !c.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::new(
                Failure::Usage,
                anyhow::anyhow!(
                    "--commit {c:?}: give the full 40-character commit id (as `driftless fleet status --format json` lists it)"
                ),
            ));
        }
        let hosts = change(fleet, Change::ClearBad(c))?;
        if hosts.is_empty() {
            outln!("commit {} has no bad marks: nothing to resume", short(c));
        } else {
            outln!(
                "resumed the rollout of {}: removed the bad marks of {}",
                short(c),
                hosts.join(", ")
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(g) = group {
        check_group(g)?;
    }
    let key = group.unwrap_or(crate::rollout::decide::ALL_GROUPS);
    let lifted = !change(fleet, Change::Resume(key))?.is_empty();
    match (group, lifted) {
        (Some(g), true) => outln!("resumed rollouts for group {g:?}"),
        (None, true) => outln!("resumed rollouts for every group"),
        (Some(g), false) => outln!("group {g:?} was not suspended (a fleet-wide suspension is lifted by `driftless resume` without --group)"),
        (None, false) => outln!("no fleet-wide suspension (a group's is lifted with --group G)"),
    }
    Ok(ExitCode::SUCCESS)
}

// Without etcd, `change` refuses before reading any of them.
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
enum Change<'a> {
    Suspend(&'a str, &'a crate::rollout::decide::Suspension),
    Resume(&'a str),
    ClearBad(&'a str),
}

/// Carries out `c` against the store; the names it affected.
#[cfg(feature = "etcd")]
fn change(fleet: &crate::config::FleetSettings, c: Change) -> Result<Vec<String>, Error> {
    use crate::exit::Classify;
    let rt = super::runtime()?;
    rt.block_on(async {
        let mut store = crate::effects::fleet::Store::connect(fleet).await?;
        match c {
            Change::Suspend(g, s) => store.suspend(g, s).await.map(|()| vec![g.to_string()]),
            Change::Resume(g) => Ok(if store.resume(g).await? {
                vec![g.to_string()]
            } else {
                Vec::new()
            }),
            Change::ClearBad(commit) => store.clear_bad(commit).await,
        }
    })
    .kind(Failure::Failed)
}

#[cfg(not(feature = "etcd"))]
fn change(_fleet: &crate::config::FleetSettings, _c: Change) -> Result<Vec<String>, Error> {
    Err(Error::new(
        Failure::Config,
        anyhow::anyhow!("this driftless was built without etcd support (cargo feature `etcd`)"),
    ))
}

/// Reads the fleet and prints the summary.
pub(crate) fn status(s: &Settings, format: Format) -> Result<ExitCode, Error> {
    let fleet = fleet_of(s)?;
    let snap = read(s, fleet)?;
    let summary = summarize(&snap);
    match format {
        Format::Json => print_json(&json!({
            "apiVersion": API_VERSION,
            "kind": "FleetStatus",
            "spec": { "endpoints": fleet.endpoints, "prefix": fleet.prefix },
            "status": {
                "commits": summary,
                "permits": snap.permits,
                "reboot_permits": snap.reboot_permits,
                "fleetlock_slots": snap.fleetlock_slots,
                "suspended": snap.suspended,
                "hosts": snap.statuses,
                "unreadable": snap.unreadable,
            }
        }))?,
        Format::Text => print_text(&snap, &summary),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "etcd")]
fn read(s: &Settings, fleet: &crate::config::FleetSettings) -> Result<Snapshot, Error> {
    use crate::exit::Classify;
    let rt = super::runtime()?;
    let _ = s;
    rt.block_on(async {
        let mut store = crate::effects::fleet::Store::connect(fleet).await?;
        store.snapshot().await
    })
    .kind(Failure::Failed)
}

#[cfg(not(feature = "etcd"))]
fn read(_s: &Settings, _fleet: &crate::config::FleetSettings) -> Result<Snapshot, Error> {
    Err(Error::new(
        Failure::Config,
        anyhow::anyhow!("this driftless was built without etcd support (cargo feature `etcd`)"),
    ))
}

fn print_text(snap: &Snapshot, summary: &[CommitSummary]) {
    outln!("{} live host(s)", snap.statuses.len());
    for (group, s) in &snap.suspended {
        let scope = if group == crate::rollout::decide::ALL_GROUPS {
            "every group".to_string()
        } else {
            format!("group {group}")
        };
        outln!(
            "SUSPENDED: {scope}, by {} since {}{}",
            s.by,
            crate::time::time_str(s.since),
            if s.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", s.reason)
            }
        );
    }
    if summary.is_empty() {
        outln!("no commit reported yet");
    }
    for c in summary {
        let state = if c.halted { "HALTED" } else { c.state };
        outln!(
            "\ncommit {}  {state}{}",
            short(&c.commit),
            if c.policy_known {
                ""
            } else {
                "  (no policy recorded: default, one wave)"
            }
        );
        outln!(
            "  {:<16} {:>6} {:>8} {:>8} {:>7} {:>8}",
            "WAVE",
            "HOSTS",
            "APPLIED",
            "HEALTHY",
            "FAILED",
            "WAITING"
        );
        for w in &c.waves {
            outln!(
                "  {:<16} {:>6} {:>8} {:>8} {:>7} {:>8}",
                w.name,
                w.hosts,
                w.applied,
                w.healthy,
                w.failed,
                w.waiting
            );
        }
        let tz = jiff::tz::TimeZone::system();
        let now = crate::time::now();
        for w in &c.windows {
            let groups = if w.groups.is_empty() {
                "every group".to_string()
            } else {
                format!("group(s) {}", w.groups.join(", "))
            };
            let state = match (w.window.open_until(now, &tz), w.window.next_open(now, &tz)) {
                (Some(until), _) => format!("open until {}", crate::time::time_str(until)),
                (None, Some(next)) => format!("closed, opens {}", crate::time::time_str(next)),
                (None, None) => "never opens again".to_string(),
            };
            outln!(
                "  window for {groups}: {:?} for {}: {state} (in this machine's time zone; each host reads it in its own)",
                w.window.calendar.to_string(),
                humantime::format_duration(std::time::Duration::from_secs(w.window.length))
            );
        }
        for (host, why) in &c.reverted_by {
            outln!("  reverted by {host}: {why}");
        }
        for w in &c.waves {
            for (host, why) in &w.waits {
                outln!("  {host} ({}) waits: {why}", w.name);
            }
        }
    }
    if !snap.permits.is_empty() {
        outln!("\npermits held:");
        for (group, hosts) in &snap.permits {
            let rebooting = snap.reboot_permits.get(group);
            let slots = snap.fleetlock_slots.get(group);
            let list: Vec<String> = hosts
                .iter()
                .map(|h| {
                    if slots.is_some_and(|r| r.contains(h)) {
                        format!("{h} (fleetlock)")
                    } else if rebooting.is_some_and(|r| r.contains(h)) {
                        format!("{h} (reboot)")
                    } else {
                        h.clone()
                    }
                })
                .collect();
            outln!("  {group}: {}", list.join(", "));
        }
    }
    for u in &snap.unreadable {
        outln!("unreadable key: {u}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effects::fleet::{HostStatus, Waiting};

    fn status(host: &str, commit: &str, waiting: Option<&str>) -> HostStatus {
        HostStatus {
            host: host.into(),
            group: "g".into(),
            labels: BTreeMap::new(),
            version: "0".into(),
            commit: Some(commit.into()),
            since: Some(1),
            healthy: true,
            result: "unchanged".into(),
            failing_checks: Vec::new(),
            last_run: 1,
            waiting: waiting.map(|c| Waiting {
                commit: c.into(),
                wave: Some("all".into()),
                reason: "permits taken".into(),
                halted: false,
            }),
        }
    }

    #[test]
    fn summary_counts_per_commit_and_wave() {
        let mut snap = Snapshot::default();
        snap.statuses.push(status("a", "new", None));
        snap.statuses.push(status("b", "old", Some("new")));
        snap.statuses.push(status("c", "old", Some("new")));
        snap.bad
            .entry("new".into())
            .or_default()
            .insert("d".into(), "check failed".into());
        let sum = summarize(&snap);
        assert_eq!(sum[0].commit, "new", "the commit in progress first");
        assert!(!sum[0].policy_known);
        assert!(sum[0].halted, "default max_failures is 1");
        assert_eq!(sum[0].state, "halted");
        assert_eq!(sum[1].state, "settled");
        let w = &sum[0].waves[0];
        assert_eq!(
            (w.hosts, w.applied, w.healthy, w.failed, w.waiting),
            (3, 1, 1, 1, 2)
        );
        assert_eq!(w.waits.get("b").map(String::as_str), Some("permits taken"));
        assert!(sum[0].windows.is_empty(), "the default policy has none");
        assert_eq!(sum[1].commit, "old");
        assert_eq!(sum[1].waves[0].applied, 2);
    }
}
