//! The pure core, second half: desired state + what is on the host + what
//! was applied last → the exact list of changes.
//!
//! The planner never reads the disk: `effects::observe` gathers an
//! [`Observed`] map first. Same inputs, same plan, which is what makes
//! `driftless plan` print exactly what `sync` will do.

pub mod accounts;
pub mod diff;
pub mod dirs;
pub mod inventory;
pub mod links;
pub mod packages;
pub mod quick;

use std::collections::BTreeMap;

use serde::Serialize;
use zeroize::Zeroizing;

use crate::desired::render::{Desired, DesiredFile};
use crate::desired::spec::{
    Check, Hook, HookRun, Principal, TargetPath, UnitAction, UnitActionKind,
};
use crate::desired::Diagnostics;
use inventory::{Inventory, ManagedEntry, Original};

/// What is at a target path right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    Missing,
    File(FileState),
    /// Not a regular file: `kind` is "symlink", "directory", ...
    Other {
        kind: &'static str,
    },
    /// A symlink, read (never followed) at a path of a kind that manages
    /// or removes links (`[[links]]`, `[[absent]]`); file paths see a
    /// symlink as `Other`.
    Link {
        target: String,
        uid: u32,
        gid: u32,
    },
    /// A directory, at a path of `[[dirs]]` (file paths see a directory
    /// as `Other`).
    Dir {
        mode: u32,
        uid: u32,
        gid: u32,
    },
}

/// A regular file on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileState {
    pub content: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

// File contents may be secrets: wipe them when dropped.
impl Drop for FileState {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.content);
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.content);
    }
}

impl Drop for OldFile {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.content);
    }
}

/// Observations of every path the plan may touch.
pub type Observed = BTreeMap<TargetPath, Observation>;

/// User and group ids for the principals the repository names, resolved
/// on the target system (its `/etc/passwd` under `--root`).
#[derive(Debug, Clone, Default)]
pub struct Ids {
    pub users: BTreeMap<String, u32>,
    pub groups: BTreeMap<String, u32>,
    /// False when not running as root: ownership is neither compared nor
    /// applied (files keep the invoking user's ids).
    pub apply_ownership: bool,
    /// The ids new files get when ownership is not applied.
    pub own_uid: u32,
    pub own_gid: u32,
    /// Per-host key for hashing sensitive content (HMAC-SHA256), so a plan,
    /// status or inventory never shows a digest that could be brute-forced
    /// back to a short secret. Empty: plain SHA-256 (tests).
    pub hash_key: Vec<u8>,
}

impl Ids {
    fn uid(&self, p: &Principal) -> Option<u32> {
        p.numeric().or_else(|| self.users.get(&p.0).copied())
    }
    fn gid(&self, p: &Principal) -> Option<u32> {
        p.numeric().or_else(|| self.groups.get(&p.0).copied())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Create,
    Update,
    Remove,
    /// A pre-existing file already as desired: nothing is written, but a
    /// copy is saved so pruning it later puts it back.
    Adopt,
}

/// The state a file will have after the change.
#[derive(Debug, Clone, Serialize)]
pub struct NewFile {
    #[serde(skip)]
    pub content: Vec<u8>,
    pub sha256: String,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Mode of the parent directories created for it.
    #[serde(skip)]
    pub dir_mode: u32,
}

/// The state a file had before the change (for display and the journal).
#[derive(Debug, Clone, Serialize)]
pub struct OldFile {
    #[serde(skip)]
    pub content: Vec<u8>,
    pub sha256: String,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileChange {
    pub path: TargetPath,
    pub kind: ChangeKind,
    /// Role that manages (or managed, for removals) the file.
    pub role: String,
    pub content_changed: bool,
    pub mode_changed: bool,
    pub owner_changed: bool,
    pub before: Option<OldFile>,
    pub after: Option<NewFile>,
    pub sensitive: bool,
    pub on_change: Vec<UnitAction>,
    /// A pre-existing unmanaged file is being taken over: save it once.
    pub adopt_original: bool,
    /// A pruned file that existed before driftless: put it back.
    pub restore_original: Option<Original>,
    /// The file has `reboot = true` (for a removal: had), and this change
    /// writes it: the host needs a reboot once the transaction commits.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reboot: bool,
}

/// The files a repair plan carried over without planning them
/// (`sync::repair`) keep the self-contained flag the quick record gave
/// them: the record, and the files that were planned (whose flags are the
/// plan's own, in `Plan::self_contained`). Copying the record's 10,000
/// flags into the plan's set cost a one-file sync at 10,000 files about a
/// millisecond (issue #18).
#[derive(Debug, Clone)]
pub struct CarriedContained {
    pub record: std::sync::Arc<quick::QuickRecord>,
    pub planned: std::collections::BTreeSet<TargetPath>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Plan {
    pub host: String,
    pub commit: Option<String>,
    pub changes: Vec<FileChange>,
    /// Managed files already as desired.
    pub unchanged: usize,
    /// Merged unit actions: one per unit, strongest wins, sorted by unit.
    pub unit_actions: Vec<UnitAction>,
    /// Health checks of the host's roles, run after the unit actions.
    pub checks: Vec<Check>,
    /// Declared unit states, converged on every sync on the live system.
    pub units: Vec<crate::desired::model::UnitSpec>,
    /// The hooks this transaction runs (pre and post, in role order, then
    /// declaration order): those of the roles with a change, and every
    /// `run = "always"` one; none when nothing changes. They are not
    /// changes: they only ride along with a transaction, and are never
    /// undone.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<Hook>,
    /// The changed files that ask for a reboot once this transaction
    /// commits (`reboot = true`). Like hooks, not changes of their own.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reboot_required: Vec<TargetPath>,
    /// Changes to managed symlinks (`[[links]]`), by path; switched in
    /// after the files.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<links::LinkChange>,
    /// Absent paths to remove (`[[absent]]`), by path; after the links.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub absent: Vec<links::AbsentChange>,
    /// Changes to managed directories (`[[dirs]]`), parents first;
    /// created before the files are staged.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dirs: Vec<dirs::DirChange>,
    /// Users, groups and memberships to create (`[[users]]`,
    /// `[[groups]]`), before anything is staged.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub accounts: Vec<accounts::AccountChange>,
    /// The sysusers lines of every declared account (what the accounts
    /// stage runs).
    #[serde(skip)]
    pub account_lines: Vec<String>,
    /// Accounts are declared but not managed (not running as root).
    #[serde(skip)]
    pub accounts_skipped: bool,
    /// Existing accounts unlike their declaration (never changed).
    #[serde(skip)]
    pub account_notes: Vec<String>,
    /// Packages to install, change or remove (`[[packages]]`), after the
    /// accounts, before anything is staged.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<packages::PackageChange>,
    /// Declared packages with `reboot = true` that this plan changes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reboot_packages: Vec<String>,
    /// What the packages stage runs, and what it replaces.
    #[serde(skip)]
    pub package_record: packages::PackagesRecord,
    /// Packages are declared but not managed (under `--root`, or not
    /// running as root): read, never changed.
    #[serde(skip)]
    pub packages_skipped: bool,
    /// The commit declares packages (the quick check watches dpkg).
    #[serde(skip)]
    pub packages_declared: bool,
    /// Every declared absent path: the quick check proves each still
    /// missing.
    #[serde(skip)]
    pub absent_paths: Vec<TargetPath>,
    /// False when running unprivileged: owners were not compared and
    /// will not be applied.
    pub ownership_applied: bool,
    /// The inventory that applying this plan records.
    #[serde(skip)]
    pub next_inventory: Inventory,
    /// Managed files whose content depends only on their own template or
    /// source (see `DesiredFile::self_contained`).
    #[serde(skip)]
    pub self_contained: std::collections::BTreeSet<TargetPath>,
    /// When the plan was made for only some files (`sync::repair`): the
    /// quick record whose self-contained flags hold for every other one.
    #[serde(skip)]
    pub contained_carried: Option<CarriedContained>,
    /// Changes to files that differ from what driftless last wrote (set
    /// by the sync, which knows the inventory; for the metrics).
    #[serde(skip)]
    pub drifted: usize,
    /// SOPS files decrypted to render this plan (for the metrics).
    #[serde(skip)]
    pub secrets_decrypted: usize,
    /// The configuration cache holding the configuration this plan was
    /// made from, for the quick-check record (`None`: there is none).
    #[serde(skip)]
    pub config_cache: Option<crate::effects::state::config_cache::Pending>,
}

impl Plan {
    /// Wipes and frees the file contents the plan holds: the changes',
    /// before and after, and those of the files it removes as absent or
    /// purged. `effects::apply` calls it once every new file is staged and
    /// every old one backed up: from then on the transaction works from
    /// the files on disk, and a cold apply of 10,000 templates no longer
    /// carries their 17 MB of rendered text (secrets among it) through
    /// the switch, the checks and the commit (issue #18). A diff needs
    /// the contents: render it before applying.
    pub fn release_contents(&mut self) {
        let changes = self.changes.iter_mut().flat_map(|c| {
            let before = c.before.as_mut().map(|b| &mut b.content);
            let after = c.after.as_mut().map(|a| &mut a.content);
            before.into_iter().chain(after)
        });
        let removed = self
            .absent
            .iter_mut()
            .filter_map(|a| a.file.as_mut().map(|f| &mut f.content));
        for content in changes.chain(removed) {
            zeroize::Zeroize::zeroize(content);
            *content = Vec::new();
        }
    }

    /// Takes the file part (files, links, absent paths, directories, the
    /// next inventory, unit actions) of `again`, a plan of the same commit
    /// made after the packages stage; keeps accounts, packages, hooks and
    /// checks. Returns how the file part differs (`/etc/x.conf: Create ->
    /// Adopt`), for the log: what a package brought is then visible.
    pub fn replace_files(&mut self, again: Plan) -> Vec<String> {
        let kinds = |p: &Plan| -> BTreeMap<String, String> {
            p.changes
                .iter()
                .map(|c| (c.path.as_str().to_string(), format!("{:?}", c.kind)))
                .chain(
                    p.links
                        .iter()
                        .map(|c| (c.path.as_str().to_string(), format!("link {:?}", c.action))),
                )
                .chain(
                    p.absent
                        .iter()
                        .map(|c| (c.path.as_str().to_string(), "Absent".to_string())),
                )
                .chain(
                    p.dirs
                        .iter()
                        .map(|c| (c.path.as_str().to_string(), format!("dir {:?}", c.action))),
                )
                .collect()
        };
        let (was, now) = (kinds(self), kinds(&again));
        let differences = was
            .keys()
            .chain(now.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .filter(|p| was.get(*p) != now.get(*p))
            .map(|p| {
                let or_none = |k: Option<&String>| k.map_or("nothing".to_string(), String::clone);
                format!(
                    "{}: {} -> {}",
                    crate::desired::spec::shown(p),
                    or_none(was.get(p)),
                    or_none(now.get(p))
                )
            })
            .collect();
        self.changes = again.changes;
        self.unchanged = again.unchanged;
        self.unit_actions = again.unit_actions;
        self.reboot_required = again.reboot_required;
        self.links = again.links;
        self.absent = again.absent;
        self.dirs = again.dirs;
        self.absent_paths = again.absent_paths;
        self.next_inventory = again.next_inventory;
        self.packages_declared = again.packages_declared;
        self.self_contained = again.self_contained;
        self.contained_carried = again.contained_carried;
        differences
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
            && self.accounts.is_empty()
            && self.packages.is_empty()
            && self.links.is_empty()
            && self.absent.is_empty()
            && self.dirs.is_empty()
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// HMAC-SHA256 (RFC 2104) as hex; the digest shown for sensitive files.
pub fn keyed_hex(key: &[u8], bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(bytes);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    format!("hmac:{}", hex::encode(outer.finalize()))
}

fn digest(ids: &Ids, sensitive: bool, bytes: &[u8]) -> String {
    if sensitive && !ids.hash_key.is_empty() {
        keyed_hex(&ids.hash_key, bytes)
    } else {
        sha256_hex(bytes)
    }
}

/// Computes the plan. Errors name the path and what to do.
pub fn plan(
    desired: &Desired,
    commit: Option<&str>,
    observed: &Observed,
    previous: &Inventory,
    ids: &Ids,
) -> Result<Plan, Diagnostics> {
    let contents = desired
        .files
        .iter()
        .map(|f| Zeroizing::new(f.content.clone()))
        .collect();
    plan_taking(desired, contents, commit, observed, previous, ids)
}

/// The rendered contents of `desired`'s files, moved out (each left
/// empty), in order: for [`plan_taking`].
pub fn take_contents(desired: &mut Desired) -> Vec<Zeroizing<Vec<u8>>> {
    desired
        .files
        .iter_mut()
        .map(|f| Zeroizing::new(std::mem::take(&mut f.content)))
        .collect()
}

/// [`plan`] with the files' contents moved in rather than copied:
/// `contents[i]` is the content of `desired.files[i]` (see
/// [`take_contents`]). A cold sync of 10,000 files held both copies at
/// once, about 17 MB of its peak.
pub fn plan_taking(
    desired: &Desired,
    contents: Vec<Zeroizing<Vec<u8>>>,
    commit: Option<&str>,
    observed: &Observed,
    previous: &Inventory,
    ids: &Ids,
) -> Result<Plan, Diagnostics> {
    assert_eq!(
        contents.len(),
        desired.files.len(),
        "one content per desired file"
    );
    let mut diags = Diagnostics::default();
    let mut changes = Vec::new();
    let mut unchanged = 0;
    let mut next = Inventory {
        version: inventory::INVENTORY_VERSION,
        txid: String::new(),
        commit: commit.map(str::to_string),
        applied_at: 0,
        files: BTreeMap::new(),
        dirs: previous.dirs.clone(),
        // Merged with this transaction's request (and dropped once the
        // host rebooted) when it commits: that needs the boot id.
        reboot: previous.reboot.clone(),
        links: BTreeMap::new(),
        directories: BTreeMap::new(),
    };

    for (f, mut content) in desired.files.iter().zip(contents) {
        let (uid, gid) = if ids.apply_ownership {
            match (ids.uid(&f.owner), ids.gid(&f.group)) {
                (Some(u), Some(g)) => (u, g),
                (u, g) => {
                    if u.is_none() {
                        diags.push(format!(
                            "{} ({}): user {:?} does not exist on this host; create it first or use a numeric uid",
                            f.path, f.origin, f.owner.0
                        ));
                    }
                    if g.is_none() {
                        diags.push(format!(
                            "{} ({}): group {:?} does not exist on this host; create it first or use a numeric gid",
                            f.path, f.origin, f.group.0
                        ));
                    }
                    continue;
                }
            }
        } else {
            (ids.own_uid, ids.own_gid)
        };
        let prev = previous.files.get(&f.path);
        let obs = observed.get(&f.path).unwrap_or(&Observation::Missing);
        let content = std::mem::take(&mut *content);
        let new = NewFile {
            sha256: digest(ids, f.sensitive, &content),
            size: content.len() as u64,
            content,
            mode: f.mode.0,
            uid,
            gid,
            dir_mode: f.dir_mode.0,
        };
        let mut original = prev.and_then(|p| p.original.clone());
        let change = match obs {
            Observation::Dir { .. } => {
                diags.push(format!(
                    "{} ({}): the target is a directory; driftless never replaces a directory: remove it, or manage another path",
                    f.path, f.origin
                ));
                continue;
            }
            Observation::Other { kind } => {
                diags.push(format!(
                    "{} ({}): the target is a {kind}; driftless never follows or replaces a {kind}: remove it, or manage the real path",
                    f.path, f.origin
                ));
                continue;
            }
            Observation::Link { .. } => {
                diags.push(format!(
                    "{} ({}): the target is a symlink; driftless never follows or replaces a symlink: remove it, or manage the real path",
                    f.path, f.origin
                ));
                continue;
            }
            Observation::Missing => Some(FileChange {
                path: f.path.clone(),
                kind: ChangeKind::Create,
                role: f.role.clone(),
                content_changed: true,
                mode_changed: false,
                owner_changed: false,
                before: None,
                // Set below, moved.
                after: None,
                sensitive: f.sensitive,
                on_change: f.on_change.clone(),
                adopt_original: false,
                restore_original: None,
                reboot: f.reboot,
            }),
            Observation::File(cur) => {
                // A change is sensitive if either side is: a file that stops
                // being a secret must not show the secret it held, and one
                // that becomes one must not show its digest unkeyed.
                let sensitive = f.sensitive || prev.is_some_and(|p| p.sensitive);
                let content_changed = cur.content != new.content;
                let mode_changed = cur.mode != new.mode;
                let owner_changed = ids.apply_ownership && (cur.uid != uid || cur.gid != gid);
                let adopt = prev.is_none();
                if adopt {
                    original = Some(Original {
                        stored: sha256_hex(f.path.as_str().as_bytes()),
                        mode: cur.mode,
                        uid: cur.uid,
                        gid: cur.gid,
                    });
                }
                if content_changed || mode_changed || owner_changed || adopt {
                    let kind = if content_changed || mode_changed || owner_changed {
                        ChangeKind::Update
                    } else {
                        ChangeKind::Adopt
                    };
                    Some(FileChange {
                        path: f.path.clone(),
                        kind,
                        role: f.role.clone(),
                        content_changed,
                        mode_changed,
                        owner_changed,
                        before: Some(old_file(cur, digest(ids, sensitive, &cur.content))),
                        // Set below, moved.
                        after: None,
                        sensitive,
                        on_change: if kind == ChangeKind::Adopt {
                            Vec::new()
                        } else {
                            f.on_change.clone()
                        },
                        adopt_original: adopt,
                        restore_original: None,
                        // An adoption writes nothing.
                        reboot: f.reboot && kind != ChangeKind::Adopt,
                    })
                } else {
                    None
                }
            }
        };
        next.files
            .insert(f.path.clone(), managed_entry(f, &new, original));
        match change {
            Some(mut c) => {
                let mut after = new;
                if c.sensitive != f.sensitive {
                    after.sha256 = digest(ids, c.sensitive, &after.content);
                }
                c.after = Some(after);
                changes.push(c);
            }
            None => unchanged += 1,
        }
    }

    let absent_paths: std::collections::BTreeSet<&TargetPath> =
        desired.absent.iter().map(|a| &a.path).collect();
    for (path, entry) in &previous.files {
        // A pruned file now declared absent: the absent entry removes it
        // (backed up), nothing is restored.
        if next.files.contains_key(path) || absent_paths.contains(path) {
            continue;
        }
        match observed.get(path).unwrap_or(&Observation::Missing) {
            Observation::File(cur) => changes.push(FileChange {
                path: path.clone(),
                kind: ChangeKind::Remove,
                role: entry.role.clone(),
                content_changed: true,
                mode_changed: false,
                owner_changed: false,
                before: Some(old_file(cur, digest(ids, entry.sensitive, &cur.content))),
                after: None,
                sensitive: entry.sensitive,
                on_change: entry.on_change.clone(),
                adopt_original: false,
                restore_original: entry.original.clone(),
                reboot: entry.reboot,
            }),
            // Already gone, or replaced by something that is not ours:
            // forget it, touch nothing.
            Observation::Missing
            | Observation::Other { .. }
            | Observation::Link { .. }
            | Observation::Dir { .. } => {}
        }
    }

    let claimed_elsewhere: std::collections::BTreeSet<&TargetPath> = desired
        .files
        .iter()
        .map(|f| &f.path)
        .chain(absent_paths.iter().copied())
        .chain(desired.dirs.iter().map(|d| &d.path))
        .collect();
    let (link_changes, next_links) = links::diff_links(
        &desired.links,
        observed,
        &previous.links,
        &claimed_elsewhere,
        &mut diags,
    );
    next.links = next_links;
    // A file declared absent that was a managed secret keeps its keyed
    // digest: the plan shows the content it removes by that digest.
    let absent = links::diff_absent(
        &desired.absent,
        observed,
        &|path, bytes| {
            let sensitive = previous.files.get(path).is_some_and(|e| e.sensitive);
            digest(ids, sensitive, bytes)
        },
        &mut diags,
    );

    let claimed_by_others: std::collections::BTreeSet<&TargetPath> = desired
        .files
        .iter()
        .map(|f| &f.path)
        .chain(desired.links.iter().map(|l| &l.path))
        .chain(absent_paths.iter().copied())
        .collect();
    let (dir_changes, next_dirs) = dirs::diff_dirs(
        &desired.dirs,
        observed,
        &previous.directories,
        &previous.dirs,
        &claimed_by_others,
        ids,
        &mut diags,
    );
    next.directories = next_dirs;
    let mut absent = absent;
    if desired.dirs.iter().any(|d| d.purge) {
        let managed: std::collections::BTreeSet<&TargetPath> = claimed_by_others
            .iter()
            .copied()
            .chain(desired.dirs.iter().map(|d| &d.path))
            .chain(previous.files.keys())
            .chain(previous.links.keys())
            .collect();
        absent.extend(dirs::diff_purge(
            &desired.dirs,
            observed,
            &managed,
            &|bytes| digest(ids, false, bytes),
            &mut diags,
        ));
    }
    // A directory that left the repository and that driftless created is
    // handed over to the directories created for files: removed after
    // the commit once empty, and tried again after each later commit.
    for c in &dir_changes {
        if c.action == dirs::DirAction::Remove {
            next.dirs.insert(c.path.clone());
        }
    }

    if !diags.is_empty() {
        return Err(diags);
    }
    // In place: the paths are unique (one change per desired file, plus
    // removals of paths no longer desired), so an unstable sort gives the
    // same order, and a stable one took a scratch copy of every change
    // (2.6 MB of a cold apply's peak at 10,000 files, issue #18).
    changes.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    let unit_actions = merge_actions(changes.iter().flat_map(|c| c.on_change.iter()));
    let mut hooks = hooks_to_run(&desired.hooks, &changes);
    if !link_changes.is_empty() || !absent.is_empty() || !dir_changes.is_empty() {
        let roles: std::collections::BTreeSet<&str> = link_changes
            .iter()
            .map(|c| c.role.as_str())
            .chain(absent.iter().map(|c| c.role.as_str()))
            .chain(dir_changes.iter().map(|c| c.role.as_str()))
            .collect();
        hooks = desired
            .hooks
            .iter()
            .filter(|h| {
                hooks.contains(h) || h.run == HookRun::Always || roles.contains(h.role.as_str())
            })
            .cloned()
            .collect();
    }
    let reboot_required = changes
        .iter()
        .filter(|c| c.reboot)
        .map(|c| c.path.clone())
        .collect();
    Ok(Plan {
        host: desired.host.clone(),
        commit: commit.map(str::to_string),
        changes,
        unchanged,
        unit_actions,
        checks: desired.checks.clone(),
        units: desired.units.clone(),
        hooks,
        reboot_required,
        reboot_packages: Vec::new(),
        links: link_changes,
        absent,
        dirs: dir_changes,
        accounts: Vec::new(),
        account_lines: desired.accounts.lines(),
        accounts_skipped: !ids.apply_ownership && !desired.accounts.is_empty(),
        account_notes: Vec::new(),
        packages: Vec::new(),
        package_record: Default::default(),
        packages_skipped: false,
        packages_declared: !desired.packages.is_empty(),
        absent_paths: desired.absent.iter().map(|a| a.path.clone()).collect(),
        ownership_applied: ids.apply_ownership,
        next_inventory: next,
        self_contained: desired
            .files
            .iter()
            .filter(|f| f.self_contained)
            .map(|f| f.path.clone())
            .collect(),
        contained_carried: None,
        drifted: 0,
        secrets_decrypted: 0,
        config_cache: None,
    })
}

/// The hooks a transaction of `changes` runs: none without a change;
/// `always` ones; `on-change` ones of a role with a change that writes
/// (an adoption writes nothing, so it does not count).
pub fn hooks_to_run(hooks: &[Hook], changes: &[FileChange]) -> Vec<Hook> {
    if changes.is_empty() {
        return Vec::new();
    }
    let changed: std::collections::BTreeSet<&str> = changes
        .iter()
        .filter(|c| c.kind != ChangeKind::Adopt)
        .map(|c| c.role.as_str())
        .collect();
    hooks
        .iter()
        .filter(|h| match h.run {
            HookRun::Always => true,
            HookRun::OnChange => changed.contains(h.role.as_str()),
        })
        .cloned()
        .collect()
}

fn old_file(cur: &FileState, sha256: String) -> OldFile {
    OldFile {
        content: cur.content.clone(),
        sha256,
        size: cur.content.len() as u64,
        mode: cur.mode,
        uid: cur.uid,
        gid: cur.gid,
    }
}

fn managed_entry(f: &DesiredFile, new: &NewFile, original: Option<Original>) -> ManagedEntry {
    ManagedEntry {
        role: f.role.clone(),
        sha256: new.sha256.clone(),
        size: new.size,
        mode: new.mode,
        uid: new.uid,
        gid: new.gid,
        on_change: f.on_change.clone(),
        sensitive: f.sensitive,
        original,
        reboot: f.reboot,
    }
}

/// One action per unit, the strongest requested, sorted by unit name.
pub fn merge_actions<'a>(actions: impl Iterator<Item = &'a UnitAction>) -> Vec<UnitAction> {
    let mut by_unit: BTreeMap<&str, UnitActionKind> = BTreeMap::new();
    for a in actions {
        let e = by_unit.entry(a.unit.as_str()).or_insert(a.action);
        if a.action > *e {
            *e = a.action;
        }
    }
    by_unit
        .into_iter()
        .map(|(unit, action)| UnitAction {
            unit: unit.to_string(),
            action,
        })
        .collect()
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod hmac_tests {
    #[test]
    fn hmac_matches_rfc4231_case_2() {
        assert_eq!(
            super::keyed_hex(b"Jefe", b"what do ya want for nothing?"),
            "hmac:5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
