//! Corrupt state must never wedge a host (issue 12 §6). A state file that
//! does not parse (a disk error, a hand edit, a truncated write on a
//! filesystem that lies about fsync) used to stop every run with the same
//! error and no remedy. Now each kind gets the treatment its meaning
//! allows:
//!
//! - **Caches**: `last-run.json` is deleted and rewritten by the next run;
//!   `quick.json`'s loader already treats an unreadable record as absent
//!   (a full sync instead of a quick one).
//! - **The inventory**: moved aside and rebuilt from the host and the
//!   commit being applied: every file of the commit is taken over again
//!   (already-saved originals are kept). What is lost: files the
//!   repository stopped managing since are left in place, not pruned.
//! - **The marks** (bad commits, the halt): moved aside, and the agent
//!   halts, because the list of commits known to break this host is gone
//!   and guessing would re-apply one. The message names the command.
//! - **The anti-rollback floor** is never guessed: the run refuses and
//!   says how to resolve it (see [`crate::effects::state::floor::load`]).
//! - **A file of a newer format** (written by a newer driftless, see
//!   [`crate::effects::state::NewerFormat`]) is not corrupt: it may record
//!   what only that agent can undo. Nothing is repaired then, not even the
//!   other files: the run refuses, naming the file, and leaves the state
//!   directory as it is until the agent is upgraded. (The interrupted
//!   transactions' journals are refused the same way by `apply::recover`.)
//!
//! `driftless state check` reports all of this without changing anything;
//! `driftless state repair` does the repair now (every run also does it
//! first, under the lock).

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::marks::{self, Halt, Marks};
use crate::effects::state::{floor, is_newer_format, read_json_large, StateDir};

/// One state file and what is (or would be) done about it.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub file: PathBuf,
    /// Why it is unusable.
    pub problem: String,
    /// What repair does (or did).
    pub remedy: String,
    /// Written by a newer driftless: repair refuses to touch anything.
    #[serde(skip)]
    pub newer: bool,
    /// Reading it failed, not its content (a disk or permission error):
    /// repair leaves it where it is.
    #[serde(skip)]
    pub leave: bool,
}

/// What a newer-format file gets instead of a repair.
const REFUSED_NEWER: &str = "not repaired (neither moved aside nor rebuilt): it was written by a newer driftless and may record what only that version can undo; upgrade the agent";

fn corrupt<T: serde::de::DeserializeOwned>(path: &Path) -> Option<anyhow::Error> {
    read_json_large::<T>(path).err()
}

/// A finding for `file`, whose problem is `e`, repaired by `remedy`
/// unless `e` is a newer format.
fn finding(file: PathBuf, e: &anyhow::Error, remedy: &str) -> Finding {
    let newer = is_newer_format(e);
    Finding {
        file,
        problem: format!("{e:#}"),
        remedy: if newer { REFUSED_NEWER } else { remedy }.to_string(),
        newer,
        leave: false,
    }
}

/// The finding for `file`, unusable for `e`: repaired by `remedy` when
/// `e` is about what the file is or holds; left where it is when reading
/// it failed (EIO, a permission or MAC denial: nothing is known about its
/// content), `meanwhile` saying what happens until it reads.
fn judged(file: PathBuf, e: &anyhow::Error, remedy: &str, meanwhile: &str) -> Finding {
    if !crate::effects::state::read_failed(e) {
        return finding(file, e, remedy);
    }
    Finding {
        leave: true,
        ..finding(
            file,
            e,
            &format!("not repaired: reading it failed, not its content (a disk or permission error?); check the disk and the file's permissions; {meanwhile}. If it stays unreadable, move it away (`mv` it to a name ending in .bad): the next run treats it as missing"),
        )
    }
}

/// Every unusable state file, read-only.
pub fn check(state: &StateDir, root: &Path) -> Vec<Finding> {
    let mut out = Vec::new();
    for (dir, e) in crate::effects::state::sharing_problems(state.path()) {
        out.push(finding(
            dir,
            &e,
            "not repaired: `state repair` does not change ownership or modes; run the chown/chmod above (every run refuses this state directory until then)",
        ));
    }
    // (`quick.json` is a cache in its own format, which its loader already
    // treats as absent when unreadable.)
    for (path, problem) in [(
        state.last_run_path(),
        corrupt::<serde_json::Value>(&state.last_run_path()),
    )] {
        if let Some(e) = problem {
            out.push(finding(
                path,
                &e,
                "a cache: deleted and rebuilt by the next run",
            ));
        }
    }
    let inv = state.inventory_path();
    // (`inventory()` decodes the base and its delta, checks both, and is
    // cached for the run that follows: no second decode of a large base.)
    if let Some(e) = state.inventory().err().or_else(|| behind_a_commit(state)) {
        out.push(judged(inv, &e, "moved aside and rebuilt from the host: the next sync takes over every file of the commit again (files the repository stopped managing since are left in place, not pruned)", "the run stops until it reads"));
    }
    // Unreadable lines are skipped; the file itself is unreadable only
    // when planted or damaged (a link, over the cap of a state file), and
    // then it would never be trimmed again.
    // A read that failed (EIO, a MAC denial) says nothing about the
    // file: moving it aside would lose the record for a passing error.
    if let Err(e) = state.history() {
        out.push(judged(
            state.history_path(),
            &e,
            "a record of past runs: moved aside, and the next run starts it afresh (`driftless history` and `rollback` without `--to` see only runs from then on)",
            "runs go on without the record of past runs",
        ));
    }
    let m = state.path().join("marks.json");
    if let Some(e) = corrupt::<Marks>(&m) {
        out.push(judged(m, &e, "moved aside; the agent halts, since the list of commits that broke this host is lost: check `driftless history` for reverted commits, then `driftless sync --retry`", "the run stops until it reads"));
    }
    // Transactions' journals are recovery's business (`apply::recover`),
    // which refuses a newer one: listed here so that `state check` says so.
    for journal in transaction_files(state) {
        if let Some(e) = corrupt::<serde_json::Value>(&journal).filter(is_newer_format) {
            out.push(finding(journal, &e, ""));
        }
    }
    let f = floor::path(root);
    if let Err(e) = floor::load(root) {
        out.push(Finding {
            file: f.clone(),
            problem: format!("{e:#}"),
            remedy: format!(
                "not repaired automatically (guessing would allow a downgrade): restore it from a backup, or `rm {}` to accept the next commit that descends from the applied one",
                f.display()
            ),
            newer: false,
            leave: true,
        });
    }
    out
}

/// An inventory that reads but is older than a transaction committed
/// after it: every commit names itself in the inventory (`txid`) and
/// keeps its transaction directory until the next commit, so a kept
/// committed transaction that the inventory does not name, beside no
/// directory of the one it does name, means the inventory lost records.
/// That is `inventory.delta` deleted (its base alone still reads as a
/// whole, older inventory) or an older `inventory.json` put back. Believed,
/// it would silently forget every file those commits wrote or removed.
///
/// A crash between a commit's record and its mark leaves the previous
/// committed transaction beside the new one, which the inventory names:
/// not stale. An empty inventory (none yet, or repaired) names none.
fn behind_a_commit(state: &StateDir) -> Option<anyhow::Error> {
    let inv = state.inventory().ok()?;
    if inv.txid.is_empty() {
        return None;
    }
    let mut dirs: Vec<(String, PathBuf)> = std::fs::read_dir(state.tx_dir())
        .ok()?
        .flatten()
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        // (`<txid>.removed`: a pruned transaction half deleted)
        .filter(|(txid, _)| !txid.contains('.'))
        .collect();
    if dirs.iter().any(|(txid, _)| *txid == inv.txid) {
        return None;
    }
    // A committed transaction whose journal was corrupt is moved aside by
    // recovery, not pruned: the inventory still names it, and only a
    // committed transaction after it (txids begin with the time) says the
    // inventory is stale. (Exempting every other one let a deleted
    // `inventory.delta` go unnoticed once the base named such a txid.)
    let set_aside = state
        .path()
        .join(format!("tx-corrupt-{}", inv.txid))
        .exists();
    dirs.retain(|(txid, _)| !set_aside || txid_order(txid) > txid_order(&inv.txid));
    dirs.sort();
    let (txid, path) = dirs.into_iter().find(|(_, path)| {
        matches!(
            crate::effects::apply::load_journal(path),
            Ok(Some(j)) if j.state == crate::effects::apply::journal::TxState::Committed
        )
    })?;
    // `state check` runs without the lock: a sync may have committed (and
    // pruned the transaction the inventory named) since it was read.
    if state.inventory().ok()?.txid != inv.txid {
        return None;
    }
    Some(anyhow::anyhow!(
        "{} records transaction {}, but transaction {txid} ({}) was committed after it and is not in it: the inventory lost its latest records ({} deleted, or an older {} put back?)",
        state.inventory_path().display(),
        inv.txid,
        path.display(),
        crate::effects::state::inventory_log::LOG,
        state.inventory_path().display(),
    ))
}

/// A txid (`<unix seconds>-<nanoseconds>-<pid>`) as a key in time
/// order: the seconds as a number (a clock near 1970, on a board without
/// a real-time clock, has fewer digits, and as text sorted after today's).
fn txid_order(txid: &str) -> (u64, &str) {
    match txid.split_once('-') {
        Some((secs, rest)) => secs.parse().map_or((0, txid), |s| (s, rest)),
        None => (0, txid),
    }
}

/// `journal.json` and `intent.json` of every transaction directory.
fn transaction_files(state: &StateDir) -> Vec<PathBuf> {
    let Ok(dirs) = std::fs::read_dir(state.tx_dir()) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = dirs
        .flatten()
        .flat_map(|d| ["journal.json", "intent.json"].map(|f| d.path().join(f)))
        .filter(|p| p.exists())
        .collect();
    out.sort();
    out
}

/// Repairs what can be repaired (see the module docs). Call under the
/// lock. Returns what was done; the floor is left to the operator. A file
/// of a newer format fails the repair before anything is touched.
pub fn repair(state: &StateDir, root: &Path, now: i64) -> anyhow::Result<Vec<Finding>> {
    let findings = check(state, root);
    if let Some(f) = findings.iter().find(|f| f.newer) {
        anyhow::bail!(
            "{} (the state directory {} was left as it is)",
            f.problem,
            state.path().display()
        );
    }
    for f in &findings {
        if f.leave {
            tracing::warn!(file = %f.file.display(), problem = %f.problem, "unusable state file: {}", f.remedy);
            continue;
        }
        let name = f
            .file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        match name {
            "last-run.json" => match std::fs::remove_file(&f.file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            },
            "inventory.json" => {
                aside(&f.file, now)?;
                // Its log goes with it (after it: a crash in between
                // leaves no base, as the repair intends, never the base
                // without the records that follow it).
                let log = f
                    .file
                    .with_file_name(crate::effects::state::inventory_log::LOG);
                if std::fs::symlink_metadata(&log).is_ok() {
                    aside(&log, now)?;
                }
            }
            "history.jsonl" => {
                aside(&f.file, now)?;
            }
            "marks.json" => {
                let moved = aside(&f.file, now)?;
                let halted = Marks {
                    halted: Some(Halt {
                        time: now,
                        commit: None,
                        reason: format!(
                            "the marks file was corrupt ({}) and was moved to {}: the list of commits that failed on this host is lost. Check `driftless history` for reverted commits, then run `driftless sync --retry`",
                            f.problem,
                            moved.display()
                        ),
                        lifted_by: None,
                    }),
                    ..Marks::default()
                };
                marks::save(state, &halted)?;
            }
            _ => {}
        }
        tracing::warn!(file = %f.file.display(), problem = %f.problem, "corrupt state file: {}", f.remedy);
    }
    Ok(findings)
}

/// Renames `path` to `path.corrupt-<now>` (kept for a post-mortem).
fn aside(path: &Path, now: i64) -> anyhow::Result<PathBuf> {
    let mut to = path.as_os_str().to_owned();
    to.push(format!(".corrupt-{now}"));
    let to = PathBuf::from(to);
    std::fs::rename(path, &to)?;
    crate::effects::state::fsync_dir(path.parent().unwrap_or(Path::new(".")))?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> (tempfile::TempDir, StateDir, tempfile::TempDir) {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        (d, s, tempfile::tempdir().unwrap())
    }

    #[test]
    fn txids_are_ordered_by_their_seconds_as_numbers() {
        assert!(txid_order("999-0000000a-1") < txid_order("1700000000-00000001-1"));
        assert!(txid_order("1700000000-00000001-9") < txid_order("1700000000-00000002-1"));
        assert!(txid_order("garbage") < txid_order("1-0-0"));
    }

    /// The bug: a txid took its seconds from the run's start and its
    /// nanoseconds from the moment the transaction was staged, so a run
    /// that began in one second and staged in the next sorted before a
    /// transaction of that first second, and `state check` missed the
    /// deleted `inventory.delta` that the later commit gives away (a CI
    /// run under load). Ids made from one reading sort by time, across a
    /// second's boundary, and whatever the process ids.
    #[test]
    fn a_later_transaction_has_a_later_txid_across_a_second_boundary() {
        use crate::effects::apply::txid_at;
        use std::time::Duration;
        let times = [
            Duration::new(1_700_000_000, 500_000_000),
            Duration::new(1_700_000_000, 999_999_999),
            Duration::new(1_700_000_001, 0),
            Duration::new(1_700_000_001, 50_000_000),
            Duration::new(1_700_000_010, 1),
        ];
        for pair in times.windows(2) {
            let (a, b) = (txid_at(pair[0]), txid_at(pair[1]));
            assert!(txid_order(&a) < txid_order(&b), "{a} then {b}");
        }
    }

    #[test]
    fn a_clean_state_has_no_findings() {
        let (_d, s, root) = state();
        assert!(check(&s, root.path()).is_empty());
    }

    /// `history.jsonl`, `inventory.json` and `marks.json` were moved aside
    /// on any error reading them, so a passing EIO or a MAC denial threw
    /// away the record of past runs, had every file taken over again, or
    /// lost the list of bad commits. Only what the file is (a link, a
    /// socket, not a regular file, over the cap) or holds marks it
    /// planted or damaged; an OS error of the read leaves it in place.
    #[test]
    fn a_state_file_is_moved_aside_for_what_it_is_not_for_a_read_that_failed() {
        use anyhow::Context;
        let wrap = |e: std::io::Error| {
            Err::<(), _>(e)
                .context("cannot read history.jsonl")
                .unwrap_err()
        };
        for code in [nix::libc::EIO, nix::libc::EACCES, nix::libc::EPERM] {
            let e = wrap(std::io::Error::from_raw_os_error(code));
            assert!(crate::effects::state::read_failed(&e), "{e:#}");
        }
        for code in [nix::libc::ELOOP, nix::libc::ENXIO, nix::libc::ENODEV] {
            let e = wrap(std::io::Error::from_raw_os_error(code));
            assert!(!crate::effects::state::read_failed(&e), "{e:#}");
        }
        let e = wrap(std::io::Error::other("not a regular file"));
        assert!(!crate::effects::state::read_failed(&e));
        let e = anyhow::anyhow!("checksum mismatch").context("inventory.json");
        assert!(!crate::effects::state::read_failed(&e));
        let (_d, s, root) = state();
        std::os::unix::fs::symlink("/etc/passwd", s.history_path()).unwrap();
        let found = check(&s, root.path());
        assert!(found.len() == 1 && !found[0].leave, "{found:?}");
        std::fs::remove_file(s.history_path()).unwrap();
        std::fs::create_dir(s.history_path()).unwrap();
        let found = check(&s, root.path());
        assert!(found.len() == 1 && !found[0].leave, "{found:?}");
        repair(&s, root.path(), 9).unwrap();
        assert!(s.path().join("history.jsonl.corrupt-9").is_dir());
        // A socket cannot even be opened (ENXIO): planted, moved aside.
        let _sock = std::os::unix::net::UnixListener::bind(s.history_path()).unwrap();
        let found = check(&s, root.path());
        assert!(found.len() == 1 && !found[0].leave, "{found:?}");
    }

    /// The state directory is untrusted: a sparse `inventory.json` or
    /// marks file of terabytes was read whole into memory (the agent
    /// killed by the OOM killer on every run). Refused by its size now,
    /// and repaired like any corrupt file.
    #[test]
    fn a_huge_sparse_state_file_is_refused_by_its_size_and_repaired_not_read() {
        let (_d, s, root) = state();
        for name in ["inventory.json", "marks.json", "history.jsonl"] {
            std::fs::File::create(s.path().join(name))
                .unwrap()
                .set_len(1 << 40)
                .unwrap();
        }
        let found = check(&s, root.path());
        assert_eq!(found.len(), 3, "{found:?}");
        for f in &found {
            assert!(
                f.problem
                    .contains(&format!("{} bytes, more than", 1u64 << 40)),
                "{f:?}"
            );
        }
        repair(&s, root.path(), 7).unwrap();
        assert!(s.path().join("inventory.json.corrupt-7").exists());
        assert!(s.path().join("marks.json.corrupt-7").exists());
        assert!(s.path().join("history.jsonl.corrupt-7").exists());
        assert!(s.history().unwrap().is_empty());
        assert!(s.inventory().unwrap().files.is_empty());
    }

    /// Issue 12 §6: a corrupt marks file stopped the agent forever.
    #[test]
    fn corrupt_marks_are_moved_aside_and_the_agent_halts_with_the_remedy() {
        let (_d, s, root) = state();
        std::fs::write(s.path().join("marks.json"), "{not json").unwrap();
        let done = repair(&s, root.path(), 42).unwrap();
        assert_eq!(done.len(), 1);
        assert!(s.path().join("marks.json.corrupt-42").exists());
        let m = marks::load(&s).unwrap();
        let h = m.halted.expect("halted");
        assert!(h.reason.contains("sync --retry"), "{}", h.reason);
        assert!(check(&s, root.path()).is_empty());
    }

    #[test]
    fn a_corrupt_inventory_is_moved_aside_and_caches_are_dropped() {
        let (_d, s, root) = state();
        std::fs::write(s.inventory_path(), "\0\0\0").unwrap();
        std::fs::write(s.last_run_path(), "{").unwrap();
        let done = repair(&s, root.path(), 7).unwrap();
        assert_eq!(done.len(), 2);
        assert!(s.path().join("inventory.json.corrupt-7").exists());
        assert!(s.inventory().unwrap().files.is_empty());
        assert!(!s.last_run_path().exists());
        assert!(check(&s, root.path()).is_empty());
    }

    /// A newer agent's inventory is not corrupt: refused, never moved
    /// aside, and nothing else is repaired either.
    #[test]
    fn a_newer_format_is_refused_and_nothing_is_touched() {
        for (envelope, version) in [(5, 1), (1, 2)] {
            let (_d, s, root) = state();
            let data = serde_json::json!({"version": version, "commit": "c", "files": {}});
            let inv = serde_json::to_vec(&serde_json::json!({
                "driftless_state": envelope,
                "sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(serde_json::to_vec(&data).unwrap())),
                "data": data,
            }))
            .unwrap();
            std::fs::write(s.inventory_path(), &inv).unwrap();
            std::fs::write(s.last_run_path(), "{").unwrap();
            let found = check(&s, root.path());
            let f = found.iter().find(|f| f.file == s.inventory_path()).unwrap();
            assert!(f.newer && f.remedy.contains("upgrade the agent"), "{f:?}");
            let err = format!("{:#}", repair(&s, root.path(), 7).unwrap_err());
            assert!(err.contains("written by a newer driftless"), "{err}");
            assert_eq!(std::fs::read(s.inventory_path()).unwrap(), inv);
            assert_eq!(std::fs::read(s.last_run_path()).unwrap(), b"{");
            assert!(!s.path().join("inventory.json.corrupt-7").exists());
        }
    }

    #[test]
    fn a_corrupt_floor_is_reported_never_repaired() {
        let (_d, s, root) = state();
        let f = floor::path(root.path());
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, "garbage").unwrap();
        let done = repair(&s, root.path(), 1).unwrap();
        assert_eq!(done.len(), 1);
        assert!(done[0].remedy.contains("rm "), "{}", done[0].remedy);
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "garbage");
    }
}
