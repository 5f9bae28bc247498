//! The fleet's coordination store: etcd (issue 17).
//!
//! Why etcd: the hosts of a fleet need a shared, consistent view (who
//! runs what, who may apply now) and a way for a dead host's claims to
//! disappear by themselves. etcd's leases and revision-guarded
//! transactions give both without a home-made coordination server, and
//! every agent talks to it directly.
//!
//! Keys, under the configured prefix `P` (`[fleet] prefix`):
//!
//! ```text
//! P/hosts/<host>             this host's status (JSON, [`HostStatus`]), bound to a
//!                            lease of ~3 poll intervals: a dead host's entry expires
//! P/permits/<group>/<host>   a permit of the group's semaphore, bound to a lease of
//!                            `lease_ttl`, kept alive while the host applies; or,
//!                            held across a reboot (`[fleet] reboot = true`), without
//!                            a lease, its value JSON with `reboot` (`sync::reboot`)
//! P/bad/<commit>/<host>      the host reverted the commit (no lease: it stays until an
//!                            operator deletes it, or a newer commit supersedes it)
//! P/policy/<commit>          the commit's validated rollout policy (JSON), written once
//!                            by the first host that judges the commit, for
//!                            `driftless fleet status`
//! P/suspend/<group>          an operator's `driftless suspend [--group G]` (JSON,
//!                            [`crate::rollout::decide::Suspension`]; `*` for every
//!                            group): no host of the group applies a new commit until
//!                            `driftless resume` deletes it
//! ```
//!
//! The semaphore: a host takes a permit by reading the group's permits
//! (count `n` at revision `R`) and, if `n < max_concurrent`, putting its
//! key in a transaction guarded by "no key under the group's prefix was
//! modified after `R`". Two hosts racing for the last permit both read
//! `R`; the first put moves the group's newest modification past `R`, so
//! the second transaction fails and that host reads again (and waits).
//! Deletions (released or expired permits) only lower the count, so they
//! need no guard.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod fleetlock;
pub mod slots;
#[cfg(feature = "etcd")]
mod store;
#[cfg(feature = "etcd")]
pub use store::{Acquired, Permit, SlotTaken, Store};

/// The key layout under a prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }
    pub fn hosts(&self) -> String {
        format!("{}/hosts/", self.prefix)
    }
    pub fn host(&self, host: &str) -> String {
        format!("{}/hosts/{host}", self.prefix)
    }
    pub fn permits(&self, group: &str) -> String {
        format!("{}/permits/{group}/", self.prefix)
    }
    pub fn all_permits(&self) -> String {
        format!("{}/permits/", self.prefix)
    }
    pub fn permit(&self, group: &str, host: &str) -> String {
        format!("{}/permits/{group}/{host}", self.prefix)
    }
    pub fn all_bad(&self) -> String {
        format!("{}/bad/", self.prefix)
    }
    pub fn bad(&self, commit: &str) -> String {
        format!("{}/bad/{commit}/", self.prefix)
    }
    pub fn bad_mark(&self, commit: &str, host: &str) -> String {
        format!("{}/bad/{commit}/{host}", self.prefix)
    }
    pub fn policies(&self) -> String {
        format!("{}/policy/", self.prefix)
    }
    pub fn policy(&self, commit: &str) -> String {
        format!("{}/policy/{commit}", self.prefix)
    }
    pub fn all_suspended(&self) -> String {
        format!("{}/suspend/", self.prefix)
    }
    pub fn suspended(&self, group: &str) -> String {
        format!("{}/suspend/{group}", self.prefix)
    }
}

/// What a host publishes about itself after every run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    pub host: String,
    pub group: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The agent's version.
    pub version: String,
    /// The commit applied and verified on the host (its inventory's).
    pub commit: Option<String>,
    /// When `commit` was applied (its checks passed then), by the host's
    /// clock; restarts when a host's entry had expired.
    pub since: Option<i64>,
    /// No check failed the last time checks ran.
    pub healthy: bool,
    /// The last run's outcome: applied, unchanged, waiting, halted,
    /// skipped, reverted, failed.
    pub result: String,
    /// Checks that failed in the last run, by name.
    #[serde(default)]
    pub failing_checks: Vec<String>,
    /// When the last run ended.
    pub last_run: i64,
    /// Set while a new commit waits for this host's turn (or is halted).
    #[serde(default)]
    pub waiting: Option<Waiting>,
}

/// Why a host does not apply a commit yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    pub commit: String,
    /// The host's wave for that commit, by name.
    pub wave: Option<String>,
    pub reason: String,
    /// The commit's rollout is halted (not just waiting for a turn).
    #[serde(default)]
    pub halted: bool,
}

impl HostStatus {
    /// The part of a status the rollout decision reads.
    pub fn as_report(&self) -> crate::rollout::Report {
        crate::rollout::Report {
            host: self.host.clone(),
            group: self.group.clone(),
            labels: self.labels.clone(),
            commit: self.commit.clone(),
            healthy: self.healthy,
            since: self.since,
        }
    }
}

/// Everything under the prefix, for `driftless fleet status`.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub statuses: Vec<HostStatus>,
    /// commit → host → reason.
    pub bad: BTreeMap<String, BTreeMap<String, String>>,
    /// group → hosts.
    pub permits: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// group → the hosts among `permits` holding theirs across a reboot
    /// (`[fleet] reboot = true`: no lease, given back by a healthy run of
    /// the new boot).
    pub reboot_permits: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// group → the ids among `permits` holding a FleetLock slot
    /// (`driftless fleet serve-fleetlock`: zincati hosts, or driftless
    /// hosts with `[fleet] fleetlock`).
    pub fleetlock_slots: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// commit → policy.
    pub policies: BTreeMap<String, crate::rollout::Policy>,
    /// group (or `*`) → the operator's suspension.
    pub suspended: BTreeMap<String, crate::rollout::decide::Suspension>,
    /// Keys that could not be read (not JSON, unexpected layout).
    pub unreadable: Vec<String>,
}

impl Snapshot {
    /// The view the decision for `commit` needs.
    pub fn view(&self) -> crate::rollout::FleetView {
        crate::rollout::FleetView {
            reports: self.statuses.iter().map(HostStatus::as_report).collect(),
            bad: self.bad.clone(),
            permits: self.permits.clone(),
            suspended: self.suspended.clone(),
        }
    }
}

/// Splits `key` (under `prefix`) into its path parts after the prefix.
pub fn parts<'a>(prefix: &str, key: &'a str) -> Option<Vec<&'a str>> {
    Some(key.strip_prefix(prefix)?.split('/').collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_layout() {
        let k = Keys::new("/fleet/");
        assert_eq!(k.host("web1"), "/fleet/hosts/web1");
        assert_eq!(k.permit("db", "web1"), "/fleet/permits/db/web1");
        assert!(k.permit("db", "web1").starts_with(&k.permits("db")));
        assert_eq!(k.bad_mark("abc", "web1"), "/fleet/bad/abc/web1");
        assert!(k.bad_mark("abc", "web1").starts_with(&k.bad("abc")));
        assert_eq!(k.policy("abc"), "/fleet/policy/abc");
        assert_eq!(k.suspended("*"), "/fleet/suspend/*");
        assert!(k.suspended("db").starts_with(&k.all_suspended()));
        assert_eq!(
            parts(&k.all_permits(), "/fleet/permits/db/web1"),
            Some(vec!["db", "web1"])
        );
    }

    #[test]
    fn a_status_reads_back_and_tolerates_missing_optional_fields() {
        let s: HostStatus = serde_json::from_str(
            r#"{"host":"h","group":"g","version":"0.1.0","commit":null,"since":null,
                "healthy":true,"result":"unchanged","last_run":5}"#,
        )
        .unwrap();
        assert!(s.labels.is_empty() && s.waiting.is_none());
        let r = s.as_report();
        assert_eq!((r.host.as_str(), r.healthy), ("h", true));
    }
}
