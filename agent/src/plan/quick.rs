//! The quick check: proving "nothing to do" from `lstat` alone.
//!
//! A poll on an idle host is the common case (every minute, on every
//! host), so its cost is the agent's cost. The full pipeline reads the tree,
//! renders every template and reads every managed file back to compare
//! bytes: correct, but it grows with the number of files, not with what
//! changed. After a sync that left the host exactly as desired, the agent
//! records a [`QuickRecord`]: what the result was derived from (commit,
//! settings, facts, account databases, agent version: the [`Inputs`]
//! digest) and the `lstat` stamp of every managed file and of the
//! inventory. The next poll that fetches the same commit with the same
//! inputs and finds the same stamps knows the host still matches, without
//! rendering or reading a single file.
//!
//! Why a stamp proves "unchanged": any write, truncate, chmod, chown,
//! rename or link changes a file's ctime (or its inode), and userspace
//! cannot set ctime. The one hole is the timestamp granularity: a change in
//! the same clock tick as the apply keeps the same ctime. As git does for
//! its index ("racy git"), a file whose ctime is not strictly older than
//! the moment the stamps were taken (`taken_at`, read from the same
//! filesystem clock) is not trusted, and that poll takes the full path.
//!
//! What the quick check cannot see, by design: changes that do not come
//! from the commit, the settings, the facts or the local account files,
//! such as a user id that moved in a remote (LDAP) user database. Those are
//! picked up by the next commit, or at once by `driftless plan` and by a
//! sync after `systemctl reload driftless` (which takes the full path, see
//! `sync`).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::desired::model::UnitSpec;
use crate::desired::spec::TargetPath;

/// 2: a record names the inventory's commit (a commit that changes no file
/// on the host is recorded in the inventory too, see
/// `sync::deploy::adopt_unchanged`); a record of 1 may name a newer one, and
/// is a miss (one full sync).
pub const QUICK_VERSION: u32 = 2;

/// What `lstat` says about a path: enough to notice any change to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub dev: u64,
    pub ino: u64,
    /// File type and permission bits (`st_mode`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

/// Recorded after a sync that left the host exactly as desired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuickRecord {
    pub version: u32,
    /// Digest of the [`Inputs`] the result was derived from.
    pub inputs: String,
    pub commit: String,
    /// The inventory file (replaced atomically by every transaction that
    /// writes it whole).
    pub inventory: Stamp,
    /// `inventory.delta` (appended to by the other transactions of a large
    /// inventory), if there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_log: Option<Stamp>,
    /// Filesystem time just before the stamps were taken, in ns.
    pub taken_at_ns: i128,
    /// Every managed file, in inventory order, with its stamp and whether
    /// it is self-contained (stored one per line after the JSON header,
    /// see `effects::state::quick`).
    #[serde(skip)]
    pub files: Vec<(TargetPath, Stamp, bool)>,
    /// Declared unit states, still converged on every poll.
    #[serde(default)]
    pub units: Vec<UnitSpec>,
    /// Every managed symlink with its `lstat` stamp (a retarget replaces
    /// the link: another inode and ctime).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<(TargetPath, Stamp)>,
    /// Every absent path: each must still be missing for a hit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub absent: Vec<TargetPath>,
    /// Every managed directory with its `lstat` stamp: a mode or owner
    /// change moves its ctime, an entry added or removed its mtime.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub directories: Vec<(TargetPath, Stamp)>,
    /// Other paths whose change means a full sync, with their stamps:
    /// dpkg's status file when packages are declared (a package removed
    /// by hand changes no managed file).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub watched: Vec<(TargetPath, Stamp)>,
    /// The name of the configuration cache that holds this commit's
    /// loaded configuration (`effects::state::config_cache`), if saved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// What the commit's tree holds, as far as a sync that reads only a
    /// few of its entries must know (see [`Tree`]); `None` if unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree: Option<Tree>,
}

#[cfg(test)]
impl QuickRecord {
    /// A record for tests: of commit `c` and inputs `i`, holding `files`
    /// and nothing else.
    pub fn example(files: Vec<(TargetPath, Stamp, bool)>) -> Self {
        QuickRecord {
            version: QUICK_VERSION,
            inputs: "i".into(),
            commit: "c".into(),
            inventory: Stamp {
                dev: 1,
                ino: 2,
                mode: 0o100600,
                uid: 0,
                gid: 0,
                size: 3,
                mtime_ns: 4,
                ctime_ns: 5,
            },
            inventory_log: None,
            taken_at_ns: 6,
            files,
            units: Vec::new(),
            links: Vec::new(),
            absent: Vec::new(),
            directories: Vec::new(),
            watched: Vec::new(),
            config: None,
            tree: None,
        }
    }
}

/// Two facts about a commit's whole tree (below `path`) that a sync
/// reading only some of its entries (`Snapshot::lazy_tree`) needs: how
/// many files and links it holds (a tree over the limit is refused), and
/// whether any is a link (a tree with links is loaded again rather than
/// from the configuration cache). A commit that changed only regular
/// files has its predecessor's links, and its count follows from what
/// was added and removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tree {
    pub entries: usize,
    pub links: bool,
}

/// Everything, besides the commit, that the rendered result depends on.
pub struct Inputs<'a> {
    pub agent_version: &'a str,
    /// A stable rendering of the effective settings.
    pub settings: &'a str,
    /// The facts as templates see them (JSON).
    pub facts: &'a str,
    /// Whether owners are applied (running as root).
    pub ownership: bool,
    /// Stamps of the account databases owner names resolve through.
    pub accounts: &'a [Option<Stamp>],
}

impl Inputs<'_> {
    /// A digest that changes when any input changes.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for part in [
            self.agent_version.as_bytes(),
            self.settings.as_bytes(),
            self.facts.as_bytes(),
        ] {
            // Length-prefixed, so no two different inputs collide by
            // shifting bytes from one part into the next.
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.update([u8::from(self.ownership)]);
        for s in self.accounts {
            match s {
                None => h.update([0]),
                Some(s) => {
                    h.update([1]);
                    h.update(s.dev.to_le_bytes());
                    h.update(s.ino.to_le_bytes());
                    h.update(s.size.to_le_bytes());
                    h.update(s.mtime_ns.to_le_bytes());
                    h.update(s.ctime_ns.to_le_bytes());
                }
            }
        }
        hex::encode(h.finalize())
    }
}

/// The links, directories and absent paths of `record` against the host:
/// `links` and `dirs` are their stamps now, in the record's order, and
/// `present` names the
/// absent paths that exist now (or cannot be shown missing). Any
/// difference takes the full path, which repairs it (a partial update
/// renders files only).
pub fn check_paths(
    record: &QuickRecord,
    links: &[Option<Stamp>],
    dirs: &[Option<Stamp>],
    present: impl Fn(&TargetPath) -> bool,
) -> Result<(), Miss> {
    if links.len() != record.links.len() || dirs.len() != record.directories.len() {
        return Err(Miss::Inventory);
    }
    let stamped = record.links.iter().chain(&record.directories);
    for ((path, then), now) in stamped.zip(links.iter().chain(dirs)) {
        if let Some(miss) = file_miss(path, then, now, record.taken_at_ns) {
            return Err(miss);
        }
    }
    match record.absent.iter().find(|p| present(p)) {
        Some(p) => Err(Miss::Present(p.clone())),
        None => Ok(()),
    }
}

/// Why the quick check did not hold (logged at debug level).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    Version,
    Commit,
    Inputs,
    Inventory,
    /// The file is missing, replaced or changed since it was applied.
    Changed(TargetPath),
    /// The file changed in the same clock tick as the record was taken.
    Racy(TargetPath),
    /// A path that must be absent exists.
    Present(TargetPath),
}

impl std::fmt::Display for Miss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Miss::Version => write!(f, "recorded by another format version"),
            Miss::Commit => write!(f, "another commit"),
            Miss::Inputs => write!(f, "settings, facts or account files changed"),
            Miss::Inventory => write!(f, "the inventory changed"),
            Miss::Changed(p) => write!(f, "{p} changed on disk"),
            Miss::Present(p) => write!(f, "{p} must be absent and exists"),
            Miss::Racy(p) => write!(
                f,
                "{p} changed too close to the last check to trust its stamp"
            ),
        }
    }
}

/// Decides whether the host still matches the recorded sync.
///
/// `files` are the current stamps, in the record's order (`None`: the path
/// is missing or unreadable).
pub fn check(
    record: &QuickRecord,
    commit: &str,
    inputs: &str,
    inventory: Option<Stamp>,
    files: &[Option<Stamp>],
) -> Result<(), Miss> {
    if record.version == QUICK_VERSION && record.commit != commit {
        return Err(Miss::Commit);
    }
    check_global(record, inputs, inventory, files)?;
    for ((path, then, _), now) in record.files.iter().zip(files) {
        match file_miss(path, then, now, record.taken_at_ns) {
            Some(miss) => return Err(miss),
            None => continue,
        }
    }
    Ok(())
}

/// Like [`check`] without the commit, and when everything except some
/// files holds, names all those files (changed, missing, or too recent to
/// trust): the host then still matches the record's commit everywhere
/// else, and rendering just those files (and what a new commit changed)
/// brings it up to date. `Ok(empty)` with the same commit is a hit.
pub fn changed_files(
    record: &QuickRecord,
    inputs: &str,
    inventory: Option<Stamp>,
    files: &[Option<Stamp>],
) -> Result<Vec<TargetPath>, Miss> {
    check_global(record, inputs, inventory, files)?;
    Ok(record
        .files
        .iter()
        .zip(files)
        .filter(|((path, then, _), now)| file_miss(path, then, now, record.taken_at_ns).is_some())
        .map(|((path, _, _), _)| path.clone())
        .collect())
}

fn file_miss(
    path: &TargetPath,
    then: &Stamp,
    now: &Option<Stamp>,
    taken_at_ns: i128,
) -> Option<Miss> {
    if *now != Some(*then) {
        return Some(Miss::Changed(path.clone()));
    }
    if then.ctime_ns >= taken_at_ns {
        return Some(Miss::Racy(path.clone()));
    }
    None
}

/// Whether [`changed_files`] will list a file recorded with `then` and
/// stamped `now` (what `file_miss` says, without building the reason).
pub fn file_changed(then: &Stamp, now: &Option<Stamp>, taken_at_ns: i128) -> bool {
    *now != Some(*then) || then.ctime_ns >= taken_at_ns
}

fn check_global(
    record: &QuickRecord,
    inputs: &str,
    inventory: Option<Stamp>,
    files: &[Option<Stamp>],
) -> Result<(), Miss> {
    if record.version != QUICK_VERSION {
        return Err(Miss::Version);
    }
    if record.inputs != inputs {
        return Err(Miss::Inputs);
    }
    if inventory != Some(record.inventory) {
        return Err(Miss::Inventory);
    }
    debug_assert_eq!(files.len(), record.files.len());
    if files.len() != record.files.len() {
        return Err(Miss::Inventory);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(ino: u64, ctime_ns: i128) -> Stamp {
        Stamp {
            dev: 1,
            ino,
            mode: 0o100644,
            uid: 0,
            gid: 0,
            size: 10,
            mtime_ns: ctime_ns,
            ctime_ns,
        }
    }

    fn path(p: &str) -> TargetPath {
        TargetPath::parse(p).unwrap()
    }

    fn record() -> QuickRecord {
        QuickRecord {
            version: QUICK_VERSION,
            inputs: "in".into(),
            commit: "c1".into(),
            inventory: stamp(1, 100),
            inventory_log: None,
            taken_at_ns: 1_000,
            links: Vec::new(),
            absent: Vec::new(),
            directories: Vec::new(),
            watched: Vec::new(),
            files: vec![
                (path("/etc/a"), stamp(2, 500), true),
                (path("/etc/b"), stamp(3, 600), true),
            ],
            units: vec![],
            config: None,
            tree: None,
        }
    }

    fn current() -> Vec<Option<Stamp>> {
        vec![Some(stamp(2, 500)), Some(stamp(3, 600))]
    }

    /// `file_changed` decides, during the stamping, whether to start
    /// reading the inventory: it must agree with what `changed_files`
    /// lists, racy stamps included.
    #[test]
    fn file_changed_agrees_with_changed_files() {
        let rec = record();
        let cases = [
            Some(stamp(2, 500)),
            Some(stamp(9, 500)),
            Some(stamp(2, 999)),
            Some(stamp(2, 1_000)),
            None,
        ];
        for then_ctime in [500, 1_000, 2_000] {
            let mut rec = rec.clone();
            rec.files[0].1 = stamp(2, then_ctime);
            for now in &cases {
                let files = vec![*now, Some(stamp(3, 600))];
                let listed = changed_files(&rec, "in", Some(stamp(1, 100)), &files)
                    .unwrap()
                    .contains(&path("/etc/a"));
                assert_eq!(
                    file_changed(&rec.files[0].1, now, rec.taken_at_ns),
                    listed,
                    "{then_ctime} {now:?}"
                );
            }
        }
    }

    #[test]
    fn same_commit_inputs_and_stamps_hold() {
        assert_eq!(
            check(&record(), "c1", "in", Some(stamp(1, 100)), &current()),
            Ok(())
        );
    }

    #[test]
    fn any_difference_is_a_miss_that_names_it() {
        let r = record();
        let inv = Some(stamp(1, 100));
        assert_eq!(check(&r, "c2", "in", inv, &current()), Err(Miss::Commit));
        assert_eq!(check(&r, "c1", "other", inv, &current()), Err(Miss::Inputs));
        assert_eq!(
            check(&r, "c1", "in", Some(stamp(9, 100)), &current()),
            Err(Miss::Inventory)
        );
        assert_eq!(
            check(&r, "c1", "in", None, &current()),
            Err(Miss::Inventory)
        );
        let mut gone = current();
        gone[1] = None;
        assert_eq!(
            check(&r, "c1", "in", inv, &gone),
            Err(Miss::Changed(path("/etc/b")))
        );
        let mut edited = current();
        edited[0] = Some(Stamp {
            size: 11,
            ..stamp(2, 500)
        });
        assert_eq!(
            check(&r, "c1", "in", inv, &edited),
            Err(Miss::Changed(path("/etc/a")))
        );
        let mut old = r.clone();
        old.version = 0;
        assert_eq!(check(&old, "c1", "in", inv, &current()), Err(Miss::Version));
    }

    /// An edit in the same clock tick as the apply keeps size, mtime and
    /// ctime: the stamp cannot prove such a file unchanged.
    #[test]
    fn a_file_changed_in_the_tick_the_stamps_were_taken_is_not_trusted() {
        let mut r = record();
        r.files[1].1 = stamp(3, 1_000);
        let mut now = current();
        now[1] = Some(stamp(3, 1_000));
        assert_eq!(
            check(&r, "c1", "in", Some(stamp(1, 100)), &now),
            Err(Miss::Racy(path("/etc/b")))
        );
    }

    #[test]
    fn changed_files_names_every_changed_file_but_only_when_the_rest_holds() {
        let r = record();
        let inv = Some(stamp(1, 100));
        assert_eq!(changed_files(&r, "in", inv, &current()), Ok(vec![]));
        let mut both = current();
        both[0] = None;
        both[1] = Some(stamp(9, 600));
        assert_eq!(
            changed_files(&r, "in", inv, &both),
            Ok(vec![path("/etc/a"), path("/etc/b")])
        );
        assert_eq!(changed_files(&r, "x", inv, &both), Err(Miss::Inputs));
        let mut racy = r.clone();
        racy.files[0].1 = stamp(2, 1_000);
        let mut now = current();
        now[0] = Some(stamp(2, 1_000));
        assert_eq!(
            changed_files(&racy, "in", inv, &now),
            Ok(vec![path("/etc/a")])
        );
    }

    #[test]
    fn the_inputs_digest_separates_parts_and_sees_every_field() {
        let base = Inputs {
            agent_version: "1",
            settings: "ab",
            facts: "c",
            ownership: false,
            accounts: &[None],
        };
        let shifted = Inputs {
            settings: "a",
            facts: "bc",
            ..base
        };
        assert_ne!(base.digest(), shifted.digest());
        let root = Inputs {
            ownership: true,
            ..base
        };
        assert_ne!(base.digest(), root.digest());
        let passwd = [Some(stamp(5, 1))];
        let accounts = Inputs {
            accounts: &passwd,
            ..base
        };
        assert_ne!(base.digest(), accounts.digest());
        assert_eq!(base.digest(), Inputs { ..base }.digest());
    }
}
