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

/// Reads the fleet and prints the summary.
pub(crate) fn status(s: &Settings, format: Format) -> Result<ExitCode, Error> {
    let Some(fleet) = s.fleet.as_ref() else {
        return Err(Error::new(
            Failure::Config,
            anyhow::anyhow!(
                "no [fleet] section in the agent config: add one with `endpoints` (and the fleet's `prefix`) to read a fleet"
            ),
        ));
    };
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
            let list: Vec<&str> = hosts.iter().map(String::as_str).collect();
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
        assert_eq!(sum[1].commit, "old");
        assert_eq!(sum[1].waves[0].applied, 2);
    }
}
