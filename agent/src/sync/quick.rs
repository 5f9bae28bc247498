//! The quick check in the pipeline: after the fetch, before reading the
//! tree. When the commit, the inputs and every managed file's stamp are
//! what the last successful sync recorded, the poll ends there: no tree
//! read, no rendering, no file read (see [`crate::plan::quick`]).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value as Json;
use tracing::debug;

use crate::config::Settings;
use crate::desired::model::UnitSpec;
use crate::desired::spec::TargetPath;
use crate::effects::rootfs::{stamp_path, RootFs};
use crate::effects::state::{quick as store, StateDir};
use crate::plan::quick::{self, Inputs, QuickRecord, Stamp, QUICK_VERSION};
use crate::plan::{CarriedContained, Plan};

/// The digest of everything besides the commit that rendering depends on.
pub fn inputs(settings: &Settings, facts: &Json) -> String {
    // Only what rendering depends on: the daemon and `sync --once` from
    // cron run with different intervals and must share one record.
    let settings_text = format!(
        "{:?}",
        (
            &settings.source,
            &settings.branch,
            &settings.path,
            &settings.host,
            &settings.root,
            &settings.allowed_roots,
            &settings.age_keys,
            &settings.ssh_host_keys,
            settings.live,
        )
    );
    let facts_text = facts.to_string();
    let accounts = account_stamps(&settings.root);
    Inputs {
        agent_version: env!("CARGO_PKG_VERSION"),
        settings: &settings_text,
        facts: &facts_text,
        ownership: super::ownership_applied(),
        accounts: &accounts,
    }
    .digest()
}

/// Owner and group names resolve through these (under `--root`, or on the
/// live system through NSS, whose configuration is stamped too).
fn account_stamps(root: &Path) -> Vec<Option<Stamp>> {
    ["etc/passwd", "etc/group", "etc/nsswitch.conf"]
        .iter()
        .map(|p| stamp_path(&root.join(p)))
        .collect()
}

/// The record, if there is one and no transaction ran since it was taken
/// (the inventory is the one it stamped).
pub fn current(state: &StateDir) -> Option<Arc<QuickRecord>> {
    let _t = crate::timings::stage("quick-load");
    let record = store::load(state)?;
    let log = state.log_path();
    (stamp_path(&state.inventory_path()) == Some(record.inventory)
        && stamp_path(&log) == record.inventory_log)
        .then_some(record)
}

/// What the stamps say about the host.
pub enum Assessment {
    /// It provably still matches the commit: an empty plan listing the
    /// declared units (still converged on every poll).
    Hit(Box<Plan>),
    /// It matches the record's commit except for the `drifted` files; the
    /// fetched commit may be another one (see `repair`).
    Partial {
        record: Arc<QuickRecord>,
        drifted: BTreeSet<TargetPath>,
    },
    /// Something else changed: the full pipeline must run.
    Miss,
}

/// Compares the host with the record (taken by [`current`]). `drifted`
/// is called as soon as a file is seen changed, possibly from another
/// thread and more than once, while the stamping goes on: the caller
/// starts reading what the repair will need (the inventory: at 10,000
/// files a few ms of CPU, which would otherwise start after the last
/// stamp, with little left to overlap it when only files drifted).
///
/// Another commit alone does not call it: comparing the trees and loading
/// the configuration, after the stamping, then leave the other core idle
/// for long enough, and reading the inventory during the stamping only
/// slowed the stamping down (`bench/ab --workload edit`).
pub fn assess(
    settings: &Settings,
    fs: &RootFs,
    record: Arc<QuickRecord>,
    commit: &str,
    inputs: &str,
    drifted: &(dyn Fn() + Sync),
) -> Assessment {
    let _t = crate::timings::stage("quick-check");
    let watched = fs.stamps(record.watched.iter().map(|(p, _)| p));
    if record
        .watched
        .iter()
        .zip(watched)
        .any(|((_, was), now)| now != Some(*was))
    {
        debug!("quick check: a watched path changed (dpkg's status); full sync");
        return Assessment::Miss;
    }
    let links = fs.stamps(record.links.iter().map(|(p, _)| p));
    let dirs = fs.stamps(record.directories.iter().map(|(p, _)| p));
    if let Err(miss) = quick::check_paths(&record, &links, &dirs, |p| !fs.confirms_absent(p)) {
        debug!("quick check: {miss}; full sync");
        return Assessment::Miss;
    }
    let taken_at = record.taken_at_ns;
    let files = fs.stamps_noting(
        &record.files,
        &|(path, _, _)| path,
        &|(_, then, _), now| quick::file_changed(then, now, taken_at),
        drifted,
    );
    // `current` checked the inventory stamp under the same lock.
    match quick::changed_files(&record, inputs, Some(record.inventory), &files) {
        Err(miss) => {
            debug!("quick check: {miss}; full sync");
            Assessment::Miss
        }
        Ok(changed) if changed.is_empty() && record.commit == commit => {
            Assessment::Hit(Box::new(Plan {
                host: settings.host.clone(),
                commit: Some(record.commit.clone()),
                unchanged: record.files.len(),
                units: record.units.clone(),
                ownership_applied: super::ownership_applied(),
                ..Plan::default()
            }))
        }
        Ok(changed) => {
            debug!(
                files = changed.len(),
                new_commit = record.commit != commit,
                "quick check: updating only what changed"
            );
            Assessment::Partial {
                record,
                drifted: changed.into_iter().collect(),
            }
        }
    }
}

/// What a successful sync left under management, for [`record`].
pub struct Managed<'a> {
    pub files: &'a [&'a TargetPath],
    /// The files whose content depends only on their own source (of
    /// those planned, when `carried` is given).
    pub self_contained: &'a BTreeSet<TargetPath>,
    /// Where the flags of the files a repair did not plan are (see
    /// `Plan::contained_carried`).
    pub carried: Option<&'a CarriedContained>,
    pub links: &'a [&'a TargetPath],
    /// Every declared absent path.
    pub absent: &'a [TargetPath],
    /// Every managed directory.
    pub directories: &'a [&'a TargetPath],
    /// Other paths whose change means a full sync.
    pub watched: &'a [TargetPath],
    /// The configuration cache of this commit (see `Plan::config_cache`).
    pub config: Option<&'a crate::effects::state::config_cache::Pending>,
    /// This run's quick check, if it ran and found only `drifted` files.
    pub verified: Option<&'a Verified>,
    /// The files this transaction wrote (or changed the owner or mode of).
    pub written: &'a BTreeSet<&'a TargetPath>,
    /// What the commit's tree holds (see [`quick::Tree`]), if known.
    pub tree: Option<quick::Tree>,
}

/// What the quick check at the start of a run proved: every file of
/// `record` but the `drifted` ones still had its recorded stamp.
pub struct Verified {
    pub record: Arc<QuickRecord>,
    pub drifted: BTreeSet<TargetPath>,
}

/// What [`file_lines`] holds for a file until its `lstat`.
const UNSTAMPED: Stamp = Stamp {
    dev: 0,
    ino: 0,
    mode: 0,
    uid: 0,
    gid: 0,
    size: 0,
    mtime_ns: 0,
    ctime_ns: 0,
};

/// The files of the new record, in `managed`'s order: each path, its
/// stamp, and whether it is self-contained. The stamp is the verified one
/// for every file this run neither wrote nor found drifted, a fresh
/// `lstat` for the rest; `None` if a file cannot be stamped (see
/// [`record`]).
///
/// Why an old stamp is as good as a fresh one: it matched at the start of
/// this run, and its ctime is older than the old record's `taken_at`,
/// hence older than the new one's. Any later change to the file gives it a
/// newer ctime, so the next quick check sees a different stamp, exactly as
/// with a stamp taken now. And a file something rewrote during this run
/// (a hook, a restarted service) keeps the stamp of the content that was
/// verified, so the next poll repairs it instead of vouching for it.
///
/// One list, built in one pass (at 10,000 files a list of stamps built
/// first and zipped in after cost a megabyte of fresh memory and a
/// millisecond of a one-file sync, issue #18).
fn file_lines<'p>(
    fs: &RootFs,
    managed: &[&'p TargetPath],
    (self_contained, carried): (&BTreeSet<TargetPath>, Option<&CarriedContained>),
    verified: Option<&Verified>,
    written: &BTreeSet<&TargetPath>,
) -> Option<Vec<(&'p TargetPath, Stamp, bool)>> {
    // Both in path order: one merge, not 10,000 searches of the set (a
    // path out of order is looked up).
    let mut contained = self_contained.iter().peekable();
    let mut last: Option<&'p TargetPath> = None;
    // A carried file's flag is the record's, found by a merge too (the
    // record is in path order; a path it does not hold where the merge
    // looks reads as not self-contained, which only makes the next
    // commit render it again).
    let mut carried = carried.map(|c| (c.record.files.iter().peekable(), &c.planned));
    let mut is_contained = |p: &'p TargetPath| {
        if let Some((record, _)) = carried.as_mut().filter(|(_, planned)| !planned.contains(p)) {
            while record.next_if(|(q, _, _)| q < p).is_some() {}
            return record
                .next_if(|(q, _, _)| q == p)
                .is_some_and(|(_, _, c)| *c);
        }
        let yes = if last.is_some_and(|l| l >= p) {
            self_contained.contains(p)
        } else {
            while contained.next_if(|q| *q < p).is_some() {}
            contained.peek() == Some(&p)
        };
        // Forward only: after a path out of order, the merge goes on from
        // the furthest path it reached.
        last = last.max(Some(p));
        yes
    };
    let Some(verified) = verified else {
        return managed
            .iter()
            .zip(fs.stamps(managed.iter().copied()))
            .map(|(&p, s)| s.map(|s| (p, s, is_contained(p))))
            .collect();
    };
    let mut old = verified.record.files.iter().peekable();
    let mut out = crate::memory::vec_prefaulted(managed.len());
    let mut missing = Vec::new();
    for path in managed {
        // Both lists are in path order (the inventory's); a path found out
        // of order is simply stamped again.
        while old.next_if(|(p, _, _)| p < *path).is_some() {}
        let reuse = old
            .next_if(|(p, _, _)| p == *path)
            .filter(|_| !written.contains(path) && !verified.drifted.contains(*path))
            .map(|(_, stamp, _)| *stamp);
        // A stamp to be taken below holds a placeholder until then (every
        // one is replaced, or the list is dropped).
        let stamp = reuse.unwrap_or_else(|| {
            missing.push(out.len());
            UNSTAMPED
        });
        out.push((*path, stamp, is_contained(path)));
    }
    let fresh = fs.stamps(missing.iter().map(|&i| managed[i]));
    for (i, stamp) in missing.into_iter().zip(fresh) {
        out[i].1 = stamp?;
    }
    Some(out)
}

/// Records the host as matching `commit` after a successful sync that
/// left exactly `managed` under management. A failure here only costs the
/// next poll a full sync.
pub fn record(
    state: &StateDir,
    fs: &RootFs,
    commit: &str,
    inputs: &str,
    units: &[UnitSpec],
    managed: Managed<'_>,
) {
    let _t = crate::timings::stage("quick-record");
    let Managed {
        files: managed,
        self_contained,
        carried,
        links,
        absent,
        directories,
        watched,
        verified,
        written,
        config,
        tree,
    } = managed;
    let Some(inventory_stamp) = stamp_path(&state.inventory_path()) else {
        return;
    };
    let log_stamp = stamp_path(&state.log_path());
    let saved = store::save(state, |taken_at_ns| {
        // A managed file that cannot be stamped right after a successful
        // sync is odd: record nothing, so the next poll looks properly.
        let files = file_lines(fs, managed, (self_contained, carried), verified, written)?;
        // Likewise a link; and an absent path that exists right after
        // the sync (re-created at once) is simply not recorded as held.
        let links = links
            .iter()
            .zip(fs.stamps(links.iter().copied()))
            .map(|(p, s)| s.map(|s| ((*p).clone(), s)))
            .collect::<Option<Vec<_>>>()?;
        let directories = directories
            .iter()
            .zip(fs.stamps(directories.iter().copied()))
            .map(|(p, s)| s.map(|s| ((*p).clone(), s)))
            .collect::<Option<Vec<_>>>()?;
        let watched = watched
            .iter()
            .zip(fs.stamps(watched))
            .map(|(p, s)| s.map(|s| (p.clone(), s)))
            .collect::<Option<Vec<_>>>()?;
        if !absent.iter().all(|p| fs.confirms_absent(p)) {
            return None;
        }
        // Written only now that there is a record to name it: a run that
        // records nothing leaves the cache the last record names alone.
        let config = config.and_then(|c| {
            c.write(state)
                .map_err(|e| debug!("configuration cache not saved: {e:#}"))
                .ok()
        });
        let record = QuickRecord {
            version: QUICK_VERSION,
            inputs: inputs.to_string(),
            commit: commit.to_string(),
            inventory: inventory_stamp,
            inventory_log: log_stamp,
            taken_at_ns,
            files: Vec::new(),
            units: units.to_vec(),
            links,
            absent: absent.to_vec(),
            directories,
            watched,
            config: config.map(str::to_string),
            tree,
        };
        Some((record, files))
    });
    if let Err(e) = saved {
        debug!("quick check not recorded: {e:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(names: &[&str]) -> Vec<TargetPath> {
        names
            .iter()
            .map(|p| TargetPath::parse(p).expect("a valid target path"))
            .collect()
    }

    /// The new record vouches for a written or drifted file only with the
    /// stamp of what is on disk now, for every other file with the stamp
    /// the run verified (which no file on disk has here, so a fresh
    /// `lstat` would show), and keeps each file's self-contained flag.
    #[test]
    fn the_new_record_keeps_verified_stamps_and_stamps_written_drifted_and_new_files() {
        let root = tempfile::tempdir().expect("a temporary directory");
        std::fs::create_dir(root.path().join("etc")).expect("etc/");
        for name in ["a", "b", "c", "d", "e"] {
            std::fs::write(root.path().join("etc").join(name), name).expect("a file");
        }
        let fs = RootFs::open(root.path()).expect("the root");
        let all = paths(&["/etc/a", "/etc/b", "/etc/c", "/etc/d", "/etc/e"]);
        let now = fs.stamps(all.iter());
        let verified_stamp = Stamp {
            ino: 7,
            ..UNSTAMPED
        };
        // /etc/e is new: the old record does not have it.
        let old = all[..4]
            .iter()
            .map(|p| (p.clone(), verified_stamp, false))
            .collect();
        let verified = Verified {
            record: Arc::new(QuickRecord::example(old)),
            drifted: BTreeSet::from([all[2].clone()]),
        };
        let written = BTreeSet::from([&all[1]]);
        let self_contained = BTreeSet::from([all[3].clone()]);
        let managed: Vec<&TargetPath> = all.iter().collect();

        let lines = file_lines(
            &fs,
            &managed,
            (&self_contained, None),
            Some(&verified),
            &written,
        )
        .expect("every file can be stamped");
        // An entry of the old record no longer managed is skipped.
        let mut with_gone = verified.record.as_ref().clone();
        with_gone.files.insert(
            0,
            (paths(&["/etc/0-gone"])[0].clone(), verified_stamp, false),
        );
        let skipping = Verified {
            record: Arc::new(with_gone),
            drifted: verified.drifted.clone(),
        };
        assert_eq!(
            file_lines(
                &fs,
                &managed,
                (&self_contained, None),
                Some(&skipping),
                &written
            )
            .as_ref(),
            Some(&lines)
        );
        let want = |i: usize, stamp: Option<Stamp>, contained: bool| {
            (
                &all[i],
                stamp.expect("a stamp of a file on disk"),
                contained,
            )
        };
        assert_eq!(
            lines,
            vec![
                want(0, Some(verified_stamp), false),
                want(1, now[1], false),
                want(2, now[2], false),
                want(3, Some(verified_stamp), true),
                want(4, now[4], false),
            ]
        );

        // Without a verified record, every stamp is fresh.
        let fresh = file_lines(&fs, &managed, (&self_contained, None), None, &written)
            .expect("every file can be stamped");
        let stamps: Vec<Option<Stamp>> = fresh.iter().map(|(_, s, _)| Some(*s)).collect();
        assert_eq!(stamps, now);
        assert!(fresh[3].2 && !fresh[0].2);
    }

    /// A repair plans only some files: the others keep the record's
    /// flags, the planned ones take the plan's (which may differ from the
    /// record's), and a file the record does not hold is not flagged.
    #[test]
    fn files_a_repair_carried_keep_the_records_flags_and_planned_ones_the_plans() {
        let root = tempfile::tempdir().expect("a temporary directory");
        std::fs::create_dir(root.path().join("etc")).expect("etc/");
        for name in ["a", "b", "c", "d", "e", "f"] {
            std::fs::write(root.path().join("etc").join(name), name).expect("a file");
        }
        let fs = RootFs::open(root.path()).expect("the root");
        let all = paths(&["/etc/a", "/etc/b", "/etc/c", "/etc/d", "/etc/e", "/etc/f"]);
        let managed: Vec<&TargetPath> = all.iter().collect();
        // The record: a, c, d and f self-contained; e not in it.
        let record = QuickRecord::example(
            [(0, true), (1, false), (2, true), (3, true), (5, true)]
                .into_iter()
                .map(|(i, c)| (all[i].clone(), UNSTAMPED, c))
                .collect(),
        );
        // Planned: c (no longer self-contained) and b (now it is).
        let carried = CarriedContained {
            record: Arc::new(record),
            planned: BTreeSet::from([all[1].clone(), all[2].clone()]),
        };
        let self_contained = BTreeSet::from([all[1].clone()]);
        let written = BTreeSet::new();
        let lines = file_lines(
            &fs,
            &managed,
            (&self_contained, Some(&carried)),
            None,
            &written,
        )
        .expect("every file can be stamped");
        let flags: Vec<bool> = lines.iter().map(|(_, _, c)| *c).collect();
        assert_eq!(flags, [true, true, false, true, false, true]);
    }

    /// A list out of path order (the inventory's is in order; this is the
    /// fallback) still flags exactly the self-contained files.
    #[test]
    fn self_contained_flags_hold_for_paths_out_of_order() {
        let root = tempfile::tempdir().expect("a temporary directory");
        std::fs::create_dir(root.path().join("etc")).expect("etc/");
        for name in ["a", "b", "c", "d"] {
            std::fs::write(root.path().join("etc").join(name), name).expect("a file");
        }
        let fs = RootFs::open(root.path()).expect("the root");
        let all = paths(&["/etc/b", "/etc/d", "/etc/a", "/etc/c"]);
        let managed: Vec<&TargetPath> = all.iter().collect();
        let self_contained = BTreeSet::from([all[3].clone(), all[0].clone()]);
        let lines = file_lines(
            &fs,
            &managed,
            (&self_contained, None),
            None,
            &BTreeSet::new(),
        )
        .expect("every file can be stamped");
        let flags: Vec<(&str, bool)> = lines.iter().map(|(p, _, c)| (p.as_str(), *c)).collect();
        assert_eq!(
            flags,
            [
                ("/etc/b", true),
                ("/etc/d", false),
                ("/etc/a", false),
                ("/etc/c", true)
            ]
        );
    }

    /// A managed file that is gone right after the sync is not recorded
    /// with the placeholder it held: nothing is recorded at all.
    #[test]
    fn a_managed_file_that_cannot_be_stamped_leaves_no_record() {
        let root = tempfile::tempdir().expect("a temporary directory");
        std::fs::create_dir(root.path().join("etc")).expect("etc/");
        std::fs::write(root.path().join("etc/a"), "a").expect("a file");
        let fs = RootFs::open(root.path()).expect("the root");
        let all = paths(&["/etc/a", "/etc/gone"]);
        let old = all
            .iter()
            .map(|p| {
                (
                    p.clone(),
                    Stamp {
                        ino: 7,
                        ..UNSTAMPED
                    },
                    false,
                )
            })
            .collect();
        let verified = Verified {
            record: Arc::new(QuickRecord::example(old)),
            drifted: BTreeSet::new(),
        };
        let managed: Vec<&TargetPath> = all.iter().collect();
        let written = BTreeSet::from([&all[1]]);
        let none = BTreeSet::new();
        assert_eq!(
            file_lines(&fs, &managed, (&none, None), Some(&verified), &written),
            None
        );
        assert_eq!(
            file_lines(&fs, &managed, (&none, None), None, &written),
            None
        );
    }
}
