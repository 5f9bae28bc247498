//! The main events of a run, for journald: one entry per run outcome with
//! a `MESSAGE_ID` (so `journalctl MESSAGE_ID=…` finds every revert on a
//! fleet), its priority (`journalctl -p warning` shows what needs a look)
//! and structured fields (`COMMIT`, `RESULT`, `TXID`). The message catalog
//! `packaging/catalog/driftless.catalog` explains each one.
//!
//! Why only under journald: on a terminal or in cron the ordinary log
//! lines already say the same; these entries exist for the journal's
//! fields. The CLI switches them on when stderr is the journal.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::effects::state::history::Outcome;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Emit the events (the journald layer is installed).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// A commit was applied (files switched in, unit actions and checks passed).
pub const APPLIED: &str = "dc4f518f980d411791ac0cf77abea1f2";
/// A commit failed its unit actions or checks and was reverted.
pub const REVERTED: &str = "5f47ac0642484fdca9681f92be52f29a";
/// The revert failed its checks too: the agent halted.
pub const DEGRADED: &str = "56984016e1cb4de38a44d00fd9f8f611";
/// A commit or bundle was refused (signature, history, invalid repository).
pub const REFUSED: &str = "8abb56db3cb04b0cbf32077ce8c0509d";
/// A run failed; the host keeps its previous state.
pub const FAILED: &str = "904ae774990c45e98033baa2c18b60c0";
/// An interrupted transaction was rolled back at start-up.
pub const RECOVERED: &str = "ae6cf5ed3765488ea4ff47bd9bad10bf";

/// Files changed on the host (not by a commit) were put back.
pub const DRIFT_REPAIRED: &str = "70401d6b840c4021a5a73f86e7c7b569";
/// A run found the agent halted and changed nothing.
pub const HALTED: &str = "cba3cbb1d405476fa68db49aa15275cd";
/// The agent asked systemd to reboot the host (`[fleet] reboot = true`).
pub const REBOOTING: &str = "0f5b1c9e4d2a4e8b9c7a6d3e2f1b0a94";

/// The id and what the entry says, for an outcome worth an event
/// (nothing for "unchanged" and "skipped": every idle poll would log one).
pub fn id_of(outcome: &Outcome) -> Option<(&'static str, &'static str)> {
    Some(match outcome {
        Outcome::Applied => (APPLIED, "applied"),
        Outcome::Reverted => (REVERTED, "reverted"),
        Outcome::Degraded => (DEGRADED, "degraded: halted"),
        Outcome::Refused => (REFUSED, "refused"),
        Outcome::Failed => (FAILED, "failed"),
        Outcome::Recovered => (RECOVERED, "recovered an interrupted transaction"),
        Outcome::Unchanged | Outcome::Skipped | Outcome::Outdated => return None,
    })
}

/// Logs the event of a run's `outcome`, at its priority.
pub fn outcome(outcome: Outcome, commit: Option<&str>, txid: Option<&str>, message: Option<&str>) {
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    let Some((id, what)) = id_of(&outcome) else {
        return;
    };
    let commit = commit.unwrap_or("");
    let txid = txid.unwrap_or("");
    let detail = message.unwrap_or("");
    let result = format!("{outcome:?}").to_lowercase();
    match outcome {
        Outcome::Degraded | Outcome::Failed => tracing::error!(
            message_id = id,
            commit,
            txid,
            result,
            "{what} {commit}: {detail}"
        ),
        Outcome::Reverted | Outcome::Refused | Outcome::Recovered => tracing::warn!(
            message_id = id,
            commit,
            txid,
            result,
            "{what} {commit}: {detail}"
        ),
        _ => tracing::info!(message_id = id, commit, txid, result, "{what} {commit}"),
    }
}

/// Logs that a run rewrote `files` managed files someone had changed on
/// the host (whether or not it also applied a new commit).
pub fn drift_repaired(commit: &str, txid: &str, files: usize) {
    if !ENABLED.load(Ordering::Relaxed) || files == 0 {
        return;
    }
    tracing::warn!(
        message_id = DRIFT_REPAIRED,
        commit,
        txid,
        result = "drift_repaired",
        "drift repaired at {commit}: {files} managed file(s) changed on the host were restored"
    );
}

/// Logs that the agent is rebooting the host, holding a fleet permit
/// (always: it is the run's last word, no other line says it).
pub fn rebooting(commit: &str, reasons: &str) {
    tracing::warn!(
        message_id = REBOOTING,
        commit,
        result = "rebooting",
        "rebooting the host for commit {commit}: {reasons}"
    );
}

/// Logs that a run was refused because the agent is halted.
pub fn halted(commit: Option<&str>, since: &str, reason: &str) {
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    let commit = commit.unwrap_or("");
    tracing::error!(
        message_id = HALTED,
        commit,
        result = "halted",
        "halted since {since}: {reason}; nothing changed (`driftless sync --retry` once repaired)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_distinct_128_bit_hex() {
        let ids = [
            APPLIED,
            REVERTED,
            DEGRADED,
            REFUSED,
            REBOOTING,
            FAILED,
            RECOVERED,
            DRIFT_REPAIRED,
            HALTED,
        ];
        for id in ids {
            assert_eq!(id.len(), 32);
            assert!(id
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        }
        let mut sorted = ids.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len());
    }

    /// Every id has its entry in the shipped catalog.
    #[test]
    fn the_catalog_explains_every_message_id() {
        let catalog = include_str!("../../packaging/catalog/driftless.catalog");
        for id in [
            APPLIED,
            REVERTED,
            DEGRADED,
            REFUSED,
            FAILED,
            RECOVERED,
            DRIFT_REPAIRED,
            HALTED,
        ] {
            assert!(catalog.contains(&format!("-- {id}\n")), "{id}");
        }
    }
}
