//! Load: turn a repository snapshot and a host name into that host's
//! configuration: which host file applies, which roles, the merged
//! variables, and the declared files and checks.
//!
//! Variable precedence, lowest first (later wins, tables merge key by key):
//!
//! 1. `driftless.toml` `[vars]`
//! 2. each role's `[vars]`, in the order the roles are listed
//!    (`driftless.toml` roles first, then the host's)
//! 3. the host file's `[vars]`
//!
//! A host without `hosts/<name>.toml` uses `hosts/default.toml`; if that is
//! missing too, loading fails. A host never silently manages nothing.
//!
//! Errors are collected, not stopped at the first: `validate` shows every
//! problem of a repository in one run.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::model::{
    AbsentSpec, CheckSpec, DirSpec, FileSpec, HookSpec, HostFile, HttpCheckSpec, LinkSpec,
    RepoFile, RoleFile, UnitSpec,
};
use super::snapshot::Snapshot;
use super::spec::{
    parse_duration, validate_unit_name, Check, Hook, HookRun, HookWhen, Mode, Principal, Probe,
    TargetPath, UnitAction, UnitActionKind,
};
use super::targets::Targets;
use super::toml_file;
use super::Diagnostics;

pub const REPO_FILE: &str = "driftless.toml";
pub const DEFAULT_HOST: &str = "default";

/// Options that come from the agent, not from the repository.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Every target must lie under one of these.
    pub allowed_roots: Vec<TargetPath>,
    /// Paths the agent itself owns (its config, trust anchors, floor,
    /// state, runtime dir), each with what it is: no target may be one,
    /// lie below one, or be a directory above one.
    pub reserved: Vec<(TargetPath, String)>,
}

/// Where a managed file's content comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum ContentRef {
    /// A Tera template, by repository path.
    Template(String),
    /// A static file copied verbatim, by repository path.
    Source(String),
    /// A whole SOPS file, decrypted and written in `format`.
    Secret {
        path: String,
        #[serde(with = "store_name")]
        format: crate::secrets::Store,
    },
    /// Content driftless makes from a role's declarations (the sysusers.d
    /// fragment of `[[users]]`/`[[groups]]`); `from` is the repository
    /// path it is made of.
    Generated { bytes: Vec<u8>, from: String },
}

impl ContentRef {
    /// The repository file whose content alone makes this one (a template,
    /// a source file, what a file was generated from); `None` for a secret,
    /// whose content is also the key's.
    pub fn own_source(&self) -> Option<&str> {
        match self {
            ContentRef::Template(p)
            | ContentRef::Source(p)
            | ContentRef::Generated { from: p, .. } => Some(p),
            ContentRef::Secret { .. } => None,
        }
    }
}

/// One file the host must have, as declared (not yet rendered).
///
/// The configuration cache stores it as a `FileRow` (below).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(from = "FileRow", into = "FileRow")]
pub struct FileDecl {
    pub path: TargetPath,
    pub role: String,
    pub content: ContentRef,
    pub mode: Mode,
    /// The role set `mode` (otherwise sensitive files get 0600).
    pub mode_explicit: bool,
    /// Mode of the parent directories created for it.
    pub dir_mode: Mode,
    pub owner: Principal,
    pub group: Principal,
    pub on_change: Vec<UnitAction>,
    /// A change to it needs a reboot (`reboot = true`).
    pub reboot: bool,
    /// Where it was declared, for error messages: `roles/web/role.toml:9 files[2]`
    /// (the line of the entry's `[[files]]` table).
    pub origin: String,
}

/// A [`FileDecl`] as the configuration cache stores it: its fields in
/// order, without their names. At 10,000 files the names were 40% of the
/// cache's bytes, and decoding it is a sync's largest cost after a
/// one-file change. (A cache is only ever read by the build that wrote
/// it, see `effects::state::config_cache`, so the order cannot drift.)
#[derive(Serialize, Deserialize)]
struct FileRow(
    TargetPath,
    String,
    ContentRef,
    Mode,
    bool,
    Mode,
    Principal,
    Principal,
    Vec<UnitAction>,
    bool,
    String,
);

impl From<FileDecl> for FileRow {
    fn from(f: FileDecl) -> FileRow {
        FileRow(
            f.path,
            f.role,
            f.content,
            f.mode,
            f.mode_explicit,
            f.dir_mode,
            f.owner,
            f.group,
            f.on_change,
            f.reboot,
            f.origin,
        )
    }
}

impl From<FileRow> for FileDecl {
    fn from(r: FileRow) -> FileDecl {
        let FileRow(
            path,
            role,
            content,
            mode,
            mode_explicit,
            dir_mode,
            owner,
            group,
            on_change,
            reboot,
            origin,
        ) = r;
        FileDecl {
            path,
            role,
            content,
            mode,
            mode_explicit,
            dir_mode,
            owner,
            group,
            on_change,
            reboot,
            origin,
        }
    }
}

/// One symlink the host must have (`[[links]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkDecl {
    pub path: TargetPath,
    pub role: String,
    /// The link's content, verbatim: never resolved, never normalised.
    pub target: String,
    /// Mode of the parent directories created for it (the role's).
    pub dir_mode: Mode,
    /// `roles/web/role.toml:9 links[0]`.
    pub origin: String,
}

/// One path that must not exist (`[[absent]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbsentDecl {
    pub path: TargetPath,
    pub role: String,
    /// `roles/web/role.toml:9 absent[0]`.
    pub origin: String,
}

/// One directory the host must have (`[[dirs]]`), with mode and owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirDecl {
    pub path: TargetPath,
    pub role: String,
    pub mode: Mode,
    pub owner: Principal,
    pub group: Principal,
    /// Mode of the parent directories created for it (the role's).
    pub dir_mode: Mode,
    /// Entries no role manages are removed (`purge = true`)...
    pub purge: bool,
    /// ...except these names (`keep`).
    pub keep: BTreeSet<String>,
    /// `roles/web/role.toml:9 dirs[0]`.
    pub origin: String,
}

/// Everything the repository says about one host.
///
/// Serialisable for the configuration cache only
/// (`effects::state::config_cache`): every field, secrets' values never
/// among them (SOPS files are decrypted when rendered, not loaded).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    pub name: String,
    /// The host file used: `hosts/<name>.toml` or `hosts/default.toml`.
    pub host_file: String,
    pub roles: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub vars: Json,
    pub files: Vec<FileDecl>,
    pub checks: Vec<Check>,
    pub units: Vec<UnitSpec>,
    /// Every declared hook, in role order, then declaration order.
    #[serde(with = "super::spec::hooks_in_full")]
    pub hooks: Vec<Hook>,
    /// Managed symlinks, sorted by path.
    pub links: Vec<LinkDecl>,
    /// Paths that must not exist, sorted by path.
    pub absent: Vec<AbsentDecl>,
    /// Managed directories, sorted by path (parents before children).
    pub dirs: Vec<DirDecl>,
    /// Declared system users and groups.
    pub accounts: super::accounts::Accounts,
    /// Declared packages, in role order, then declaration order.
    pub packages: Vec<super::packages::PackageDecl>,
}

/// A SOPS store by its name (`yaml`, `json`, …), as the cache keeps it.
mod store_name {
    use crate::secrets::Store;

    pub fn serialize<S: serde::Serializer>(store: &Store, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(store.name())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Store, D::Error> {
        let name = <String as serde::Deserialize>::deserialize(d)?;
        Store::from_name(&name).map_err(|e| serde::de::Error::custom(e.to_string()))
    }
}

/// Names of all hosts with their own file (excluding `default`), sorted.
pub fn host_names(snap: &Snapshot) -> Vec<String> {
    snap.walk("hosts")
        .filter_map(|(p, _)| p.strip_prefix("hosts/")?.strip_suffix(".toml"))
        .filter(|n| !n.contains('/') && *n != DEFAULT_HOST)
        .map(str::to_string)
        .collect()
}

/// Loads the configuration of `host` from `snap`.
pub fn load_host(
    snap: &Snapshot,
    host: &str,
    opts: &LoadOptions,
) -> Result<HostConfig, Diagnostics> {
    let mut diags = Diagnostics::default();
    let opts = &Targets::new(opts);

    let repo: RepoFile = match read_toml(snap, REPO_FILE) {
        Ok(Some(r)) => r,
        Ok(None) => {
            diags.push(format!(
                "{REPO_FILE}: not found at the repository root (or the configured --path); \
                 is this a driftless config repository?"
            ));
            return Err(diags);
        }
        Err(e) => {
            diags.push(e);
            return Err(diags);
        }
    };
    // The rollout policy: its syntax was checked above, its meaning
    // (ordered percentages, reachable waves, …) here, so `validate` shows
    // both.
    if repo.rollout.is_some() {
        if let Err(e) = crate::rollout::policy::load(snap) {
            diags.push(e);
        }
    }

    let own = format!("hosts/{host}.toml");
    let fallback = format!("hosts/{DEFAULT_HOST}.toml");
    let (host_file_path, host_file) = match read_toml::<HostFile>(snap, &own) {
        Ok(Some(h)) => (own, h),
        Ok(None) => match read_toml::<HostFile>(snap, &fallback) {
            Ok(Some(h)) => (fallback, h),
            Ok(None) => {
                diags.push(format!(
                    "host {host:?} has no {own} and the repository has no {fallback}: \
                     add one of them (a host never manages nothing silently)"
                ));
                return Err(diags);
            }
            Err(e) => {
                diags.push(e);
                return Err(diags);
            }
        },
        Err(e) => {
            diags.push(e);
            return Err(diags);
        }
    };

    // Roles: repo-wide first, then the host's; duplicates keep the first.
    let mut roles: Vec<String> = Vec::new();
    for (origin, role) in repo
        .roles
        .iter()
        .map(|r| (REPO_FILE, r))
        .chain(host_file.roles.iter().map(|r| (host_file_path.as_str(), r)))
    {
        if !roles.contains(role) {
            if let Err(e) = check_role_name(snap, role) {
                diags.push(format!("{origin}: {e}"));
                continue;
            }
            roles.push(role.clone());
        }
    }

    let mut vars = Json::Object(Default::default());
    merge(&mut vars, toml_to_json(toml::Value::Table(repo.vars)));

    let mut files: Vec<FileDecl> = Vec::new();
    let mut checks: Vec<Check> = Vec::new();
    let mut units: Vec<UnitSpec> = Vec::new();
    let mut hooks: Vec<Hook> = Vec::new();
    let mut links: Vec<LinkDecl> = Vec::new();
    let mut absent: Vec<AbsentDecl> = Vec::new();
    let mut dirs: Vec<DirDecl> = Vec::new();
    let mut accounts = super::accounts::Accounts::default();
    let mut packages: Vec<super::packages::PackageDecl> = Vec::new();
    let mut user_origin: BTreeMap<String, String> = BTreeMap::new();
    let mut group_origin: BTreeMap<String, String> = BTreeMap::new();
    let mut unit_origin: BTreeMap<String, String> = BTreeMap::new();
    let mut claimed: BTreeMap<TargetPath, String> = BTreeMap::new();
    for role in &roles {
        let role_path = format!("roles/{role}/role.toml");
        let (role_file, role_text): (RoleFile, &str) = match read_toml_text(snap, &role_path) {
            Ok(Some(r)) => r,
            Ok(None) => (unreachable_role(&mut diags, &role_path), ""),
            Err(e) => {
                diags.push(e);
                continue;
            }
        };
        // `roles/a/role.toml:12 files[0]`: the line of the entry's table.
        let lines = toml_file::LineIndex::new(role_text);
        let at = |key: &str, i: usize, span: std::ops::Range<usize>| {
            let line = lines.line(span.start);
            format!("{role_path}:{line} {key}[{i}]")
        };
        merge(&mut vars, toml_to_json(toml::Value::Table(role_file.vars)));
        let role_dir_mode = match &role_file.dir_mode {
            None => Mode::DEFAULT_DIR,
            Some(m) => match parse_dir_mode(m.get_ref()) {
                Ok(m) => m,
                Err(e) => {
                    let line = lines.line(m.span().start);
                    diags.push(format!("{role_path}:{line}: {e}"));
                    Mode::DEFAULT_DIR
                }
            },
        };
        for (i, spec) in role_file.files.into_iter().enumerate() {
            let origin = at("files", i, spec.span());
            let spec = spec.into_inner();
            match file_decl(snap, role, &origin, spec, role_dir_mode, opts) {
                Ok(decl) => {
                    if claim(
                        &mut claimed,
                        &mut diags,
                        &origin,
                        &decl.path,
                        "a path can belong to one role only",
                    ) {
                        files.push(decl);
                    }
                }
                Err(e) => diags.push(format!("{origin}: {e}")),
            }
        }
        for (i, spec) in role_file.links.into_iter().enumerate() {
            let origin = at("links", i, spec.span());
            match link_decl(role, &origin, spec.into_inner(), role_dir_mode, opts) {
                Ok(decl) => {
                    if claim(
                        &mut claimed,
                        &mut diags,
                        &origin,
                        &decl.path,
                        "a path can belong to one entry only",
                    ) {
                        links.push(decl);
                    }
                }
                Err(e) => diags.push(format!("{origin}: {e}")),
            }
        }
        for (i, spec) in role_file.absent.into_iter().enumerate() {
            let origin = at("absent", i, spec.span());
            match absent_decl(role, &origin, spec.into_inner(), opts) {
                Ok(decl) => {
                    if claim(
                        &mut claimed,
                        &mut diags,
                        &origin,
                        &decl.path,
                        "a path cannot be both managed and absent (remove one of the two entries)",
                    ) {
                        absent.push(decl);
                    }
                }
                Err(e) => diags.push(format!("{origin}: {e}")),
            }
        }
        for (i, spec) in role_file.dirs.into_iter().enumerate() {
            let origin = at("dirs", i, spec.span());
            match dir_decl(role, &origin, spec.into_inner(), role_dir_mode, opts) {
                Ok(decl) => {
                    if claim(
                        &mut claimed,
                        &mut diags,
                        &origin,
                        &decl.path,
                        "a path can belong to one entry only (remove one of the two)",
                    ) {
                        dirs.push(decl);
                    }
                }
                Err(e) => diags.push(format!("{origin}: {e}")),
            }
        }
        let (mut role_groups, mut role_users) = (Vec::new(), Vec::new());
        let mut first_account: Option<String> = None;
        for (i, spec) in role_file.groups.into_iter().enumerate() {
            let origin = at("groups", i, spec.span());
            first_account.get_or_insert_with(|| origin.clone());
            match super::accounts::group_decl(role, &origin, spec.into_inner()) {
                Ok(g) => {
                    if claim_name(&mut group_origin, &mut diags, &origin, "group", &g.name) {
                        role_groups.push(g);
                    }
                }
                Err(e) => diags.push(format!("{origin}: {e}")),
            }
        }
        for (i, spec) in role_file.users.into_iter().enumerate() {
            let origin = at("users", i, spec.span());
            first_account.get_or_insert_with(|| origin.clone());
            match super::accounts::user_decl(role, &origin, spec.into_inner()) {
                Ok(u) => {
                    if claim_name(&mut user_origin, &mut diags, &origin, "user", &u.name) {
                        role_users.push(u);
                    }
                }
                Err(e) => diags.push(format!("{origin}: {e}")),
            }
        }
        if let Some(origin) = first_account {
            match account_fragment(
                role,
                &origin,
                &role_groups,
                &role_users,
                role_dir_mode,
                opts,
            ) {
                Ok(decl) => {
                    if claim(
                        &mut claimed,
                        &mut diags,
                        &origin,
                        &decl.path,
                        "the sysusers.d fragment of a role's accounts is driftless's to write",
                    ) {
                        files.push(decl);
                    }
                }
                Err(e) => diags.push(format!("{origin}: {e}")),
            }
            accounts.groups.extend(role_groups);
            accounts.users.extend(role_users);
        }
        for (i, spec) in role_file.packages.into_iter().enumerate() {
            let origin = at("packages", i, spec.span());
            match super::packages::package_decl(role, &origin, spec.into_inner()) {
                Ok(p) => {
                    if let Some(other) = packages.iter().find(|o| o.name == p.name) {
                        let state = |present: bool| if present { "present" } else { "absent" };
                        diags.push(if other.present == p.present {
                            format!(
                                "{origin}: package {} is already declared by {}; declare a package in one role only",
                                p.name, other.origin
                            )
                        } else {
                            format!(
                                "{origin}: package {} is {} here but {} in {}; remove one of the two",
                                p.name,
                                state(p.present),
                                state(other.present),
                                other.origin
                            )
                        });
                        continue;
                    }
                    packages.push(p);
                }
                Err(e) => diags.push(format!("{origin}: {e}")),
            }
        }
        for (i, spec) in role_file.units.into_iter().enumerate() {
            let origin = at("units", i, spec.span());
            let spec = spec.into_inner();
            if let Err(e) = validate_unit_name(&spec.name) {
                diags.push(format!("{origin}: key `name`: {e}"));
                continue;
            }
            if let Some(other) = unit_origin.get(&spec.name) {
                diags.push(format!(
                    "{origin}: unit {} is already declared by {other}; declare a unit in one role only",
                    spec.name
                ));
                continue;
            }
            unit_origin.insert(spec.name.clone(), origin);
            units.push(spec);
        }
        for (i, spec) in role_file.quadlets.into_iter().enumerate() {
            let origin = at("quadlets", i, spec.span());
            let (file, unit) = match super::quadlet::desugar(spec.into_inner()) {
                Ok(pair) => pair,
                Err(e) => {
                    diags.push(format!("{origin}: {e}"));
                    continue;
                }
            };
            match file_decl(snap, role, &origin, file, role_dir_mode, opts) {
                Ok(decl) => {
                    if !claim(
                        &mut claimed,
                        &mut diags,
                        &origin,
                        &decl.path,
                        "a path can belong to one role only",
                    ) {
                        continue;
                    }
                    files.push(decl);
                }
                Err(e) => {
                    diags.push(format!("{origin}: {e}"));
                    continue;
                }
            }
            if let Some(other) = unit_origin.get(&unit.name) {
                diags.push(format!(
                    "{origin}: unit {} (generated from the quadlet) is already declared by {other}; \
                     leave the generated unit to the quadlet entry (`started`, `on_change`)",
                    unit.name
                ));
                continue;
            }
            unit_origin.insert(unit.name.clone(), origin);
            units.push(unit);
        }
        for (i, spec) in role_file.checks.into_iter().enumerate() {
            let origin = at("checks", i, spec.span());
            match check(role, spec.into_inner()) {
                Ok(c) => checks.push(c),
                Err(e) => diags.push(format!("{origin}: {e}")),
            }
        }
        for (i, spec) in role_file.hooks.into_iter().enumerate() {
            let origin = at("hooks", i, spec.span());
            match hook(role, &origin, spec.into_inner()) {
                Ok(h) => hooks.push(h),
                Err(e) => diags.push(format!("{origin}: {e}")),
            }
        }
    }
    merge(&mut vars, toml_to_json(toml::Value::Table(host_file.vars)));
    // A link or an absent path above another entry's path: the link
    // would have to be followed (driftless never does), the absent path
    // is a directory holding managed files.
    for (path, origin, what) in links
        .iter()
        .map(|l| (&l.path, &l.origin, "a symlink"))
        .chain(absent.iter().map(|a| (&a.path, &a.origin, "absent")))
    {
        for (below, other) in &claimed {
            if below != path && below.is_under(path) {
                diags.push(format!(
                    "{origin}: {path} is {what}, but {other} manages {below} below it; \
                     driftless never writes through a symlink and absent removes no directory: \
                     remove one of the two entries"
                ));
            }
        }
    }

    // What the repository itself contradicts about a purged directory.
    for d in dirs.iter().filter(|d| d.purge) {
        for k in &d.keep {
            let kept = TargetPath::parse(&format!("{}/{k}", d.path.as_str()));
            if let Some(other) = kept.ok().and_then(|p| claimed.get(&p)) {
                diags.push(format!(
                    "{}: keep entry {k:?} of {} is declared by {other}: it is managed, not kept; drop it from keep",
                    d.origin, d.path
                ));
            }
        }
        for o in dirs
            .iter()
            .filter(|o| o.purge && o.path != d.path && o.path.is_under(&d.path) && o.role != d.role)
        {
            diags.push(format!(
                "{}: {} is purged, but it is inside {}, which {} purges too: whose purge wins? \
                 Declare both in one role, or drop one of the two purges",
                o.origin, o.path, d.path, d.origin
            ));
        }
        for a in absent
            .iter()
            .filter(|a| a.path != d.path && a.path.is_under(&d.path))
        {
            diags.push(format!(
                "{}: {} is inside {}, which {} purges: the purge removes it already; drop this entry (say it once)",
                a.origin, a.path, d.path, d.origin
            ));
        }
    }

    if !accounts.is_empty() {
        let mut uses: Vec<(&str, &str, &str, &str)> = Vec::new();
        for f in &files {
            uses.push((&f.role, &f.origin, "user", &f.owner.0));
            uses.push((&f.role, &f.origin, "group", &f.group.0));
        }
        for d in &dirs {
            uses.push((&d.role, &d.origin, "user", &d.owner.0));
            uses.push((&d.role, &d.origin, "group", &d.group.0));
        }
        for h in &hooks {
            if let Some(u) = &h.user {
                uses.push((&h.role, &h.origin, "user", &u.0));
            }
        }
        for u in &accounts.users {
            if let Some(g) = &u.group {
                uses.push((&u.role, &u.origin, "group", g));
            }
            for g in &u.members_of {
                uses.push((&u.role, &u.origin, "group", g));
            }
        }
        check_account_order(&roles, &accounts, &uses, &mut diags);
    }

    if !diags.is_empty() {
        return Err(diags);
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    links.sort_by(|a, b| a.path.cmp(&b.path));
    absent.sort_by(|a, b| a.path.cmp(&b.path));
    dirs.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(HostConfig {
        name: host.to_string(),
        host_file: host_file_path,
        roles,
        labels: host_file.labels,
        vars,
        files,
        checks,
        units,
        hooks,
        links,
        absent,
        dirs,
        accounts,
        packages,
    })
}

/// The managed file holding one role's sysusers.d lines.
fn account_fragment(
    role: &str,
    origin: &str,
    groups: &[super::accounts::GroupDecl],
    users: &[super::accounts::UserDecl],
    role_dir_mode: Mode,
    opts: &Targets,
) -> Result<FileDecl, String> {
    let path = opts.check(&super::accounts::fragment_path(role))?;
    Ok(FileDecl {
        path,
        role: role.to_string(),
        content: ContentRef::Generated {
            bytes: super::accounts::fragment(role, groups, users),
            from: format!("roles/{role}/role.toml"),
        },
        mode: Mode::DEFAULT_FILE,
        mode_explicit: true,
        dir_mode: role_dir_mode,
        owner: Principal::root(),
        group: Principal::root(),
        on_change: Vec::new(),
        reboot: false,
        origin: origin.to_string(),
    })
}

/// A principal used by a role before the role that declares it: `owner`
/// or `group` of a file or directory, a hook's `user`, a user's `group` or
/// `members_of`. Execution order would not care (accounts are created
/// first), but a role that depends on a later one cannot be read on its
/// own: list the declaring role first.
fn check_account_order(
    roles: &[String],
    accounts: &super::accounts::Accounts,
    uses: &[(&str, &str, &str, &str)],
    diags: &mut Diagnostics,
) {
    let rank = |role: &str| roles.iter().position(|r| r == role);
    for (role, origin, kind, name) in uses {
        let declared = if *kind == "user" {
            accounts
                .users
                .iter()
                .find(|u| u.name == *name)
                .map(|u| (&u.role, &u.origin))
        } else {
            accounts
                .groups
                .iter()
                .map(|g| (&g.role, &g.origin, g.name.as_str()))
                .chain(
                    accounts
                        .users
                        .iter()
                        .filter_map(|u| Some((&u.role, &u.origin, u.implicit_group()?))),
                )
                .find(|(_, _, n)| n == name)
                .map(|(r, o, _)| (r, o))
        };
        if let Some((by, at)) = declared {
            if rank(by) > rank(role) {
                diags.push(format!(
                    "{origin}: {kind} {name:?} is declared later, in {at}; list role {by} before {role}"
                ));
            }
        }
    }
}

/// Records that the entry at `origin` manages `path`; `false`, with the
/// error, when another entry does already (`why` says what to do for
/// this kind of entry).
fn claim(
    claimed: &mut BTreeMap<TargetPath, String>,
    diags: &mut Diagnostics,
    origin: &str,
    path: &TargetPath,
    why: &str,
) -> bool {
    if let Some(other) = claimed.get(path) {
        diags.push(format!(
            "{origin}: {path} is already managed by {other}; {why}"
        ));
        return false;
    }
    claimed.insert(path.clone(), origin.to_string());
    true
}

/// Records that the entry at `origin` declares the account `name` of
/// `kind`; `false`, with the error, if another entry did already.
fn claim_name(
    claimed: &mut BTreeMap<String, String>,
    diags: &mut Diagnostics,
    origin: &str,
    kind: &str,
    name: &str,
) -> bool {
    if let Some(other) = claimed.get(name) {
        diags.push(format!(
            "{origin}: {kind} {name} is already declared by {other}; declare an account in one role only"
        ));
        return false;
    }
    claimed.insert(name.to_string(), origin.to_string());
    true
}

// A role whose role.toml vanished between check_role_name and reading it
// cannot happen with an immutable snapshot; report it rather than panic.
fn unreachable_role(diags: &mut Diagnostics, role_path: &str) -> RoleFile {
    diags.push(format!("{role_path}: not found"));
    RoleFile::default()
}

fn check_role_name(snap: &Snapshot, role: &str) -> Result<(), String> {
    if role.is_empty()
        || !role
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || role.starts_with('.')
    {
        return Err(format!(
            "role name {role:?} may only use letters, digits, '-', '_' and '.'"
        ));
    }
    if snap.contains(&format!("roles/{role}/role.toml")) {
        return Ok(());
    }
    let known: BTreeSet<&str> = snap
        .walk("roles")
        .filter_map(|(p, _)| p.strip_prefix("roles/")?.strip_suffix("/role.toml"))
        .filter(|n| !n.contains('/'))
        .collect();
    let known: Vec<&str> = known.into_iter().collect();
    let hint = match toml_file::closest(role, &known) {
        Some(best) => format!(" (did you mean `{best}`?)"),
        None => String::new(),
    };
    Err(format!(
        "role `{role}` does not exist: roles/{role}/role.toml not found{hint}"
    ))
}

/// The longest link target accepted (`PATH_MAX` less its NUL).
const MAX_LINK_TARGET: usize = 4095;

fn link_decl(
    role: &str,
    origin: &str,
    spec: LinkSpec,
    role_dir_mode: Mode,
    opts: &Targets,
) -> Result<LinkDecl, String> {
    let path = opts.check(&spec.path)?;
    if spec.target.is_empty() {
        return Err(format!(
            "{path}: key `target` is empty: give what the link points to, e.g. \"../sites-available/app\""
        ));
    }
    if spec.target.contains('\0') {
        return Err(format!("{path}: key `target` contains a NUL byte"));
    }
    if let Some(c) = spec.target.chars().find(|&c| super::spec::unprintable(c)) {
        return Err(format!(
            "{path}: key `target` {:?} contains the character U+{:04X}, which a link target may not: it would reach logs and terminals as is; rename what it points to",
            spec.target,
            c as u32
        ));
    }
    if spec.target.len() > MAX_LINK_TARGET {
        return Err(format!(
            "{path}: key `target` is {} bytes long; a symlink holds at most {MAX_LINK_TARGET}",
            spec.target.len()
        ));
    }
    Ok(LinkDecl {
        path,
        role: role.to_string(),
        target: spec.target,
        dir_mode: role_dir_mode,
        origin: origin.to_string(),
    })
}

fn dir_decl(
    role: &str,
    origin: &str,
    spec: DirSpec,
    role_dir_mode: Mode,
    opts: &Targets,
) -> Result<DirDecl, String> {
    let path = opts.check(&spec.path)?;
    let mode = match &spec.mode {
        None => Mode::DEFAULT_DIR,
        Some(m) => {
            let mode = Mode::parse(m).map_err(|e| format!("{path}: key `mode`: {e}"))?;
            if mode.0 & 0o700 != 0o700 {
                return Err(format!(
                    "{path}: key `mode`: {:04o} does not give the owner rwx; driftless could not manage what is in it (use e.g. \"0755\" or \"0750\")",
                    mode.0
                ));
            }
            if mode.0 & 0o4000 != 0 {
                return Err(format!(
                    "{path}: key `mode`: {:04o} is setuid, which means nothing on a directory; drop the 4 (setgid \"2775\" and sticky \"1777\" are accepted)",
                    mode.0
                ));
            }
            mode
        }
    };
    if !spec.keep.is_empty() && !spec.purge {
        return Err(format!(
            "{path}: key `keep` only goes with `purge = true`: add it, or drop `keep`"
        ));
    }
    let mut keep = BTreeSet::new();
    for k in spec.keep {
        if k.is_empty() || k == "." || k == ".." || k.contains('/') || k.contains('\0') {
            return Err(format!(
                "{path}: key `keep`: {k:?} is not the name of an entry of the directory (a plain name such as \"README\", no '/')"
            ));
        }
        keep.insert(k);
    }
    Ok(DirDecl {
        purge: spec.purge,
        keep,
        path: path.clone(),
        role: role.to_string(),
        mode,
        owner: principal(spec.owner, "owner").map_err(|e| format!("{path}: {e}"))?,
        group: principal(spec.group, "group").map_err(|e| format!("{path}: {e}"))?,
        dir_mode: role_dir_mode,
        origin: origin.to_string(),
    })
}

fn absent_decl(
    role: &str,
    origin: &str,
    spec: AbsentSpec,
    opts: &Targets,
) -> Result<AbsentDecl, String> {
    Ok(AbsentDecl {
        path: opts.check(&spec.path)?,
        role: role.to_string(),
        origin: origin.to_string(),
    })
}

fn file_decl(
    snap: &Snapshot,
    role: &str,
    origin: &str,
    spec: FileSpec,
    role_dir_mode: Mode,
    opts: &Targets,
) -> Result<FileDecl, String> {
    let path = opts.check(&spec.path)?;
    let files_dir = format!("roles/{role}/files");
    if spec.format.is_some() && spec.secret.is_none() {
        return Err("key `format` only goes with `secret`".into());
    }
    let content = match (spec.template, spec.source, spec.secret) {
        (Some(t), None, None) => {
            ContentRef::Template(repo_relative(snap, &files_dir, &t, "template")?)
        }
        (None, Some(s), None) => ContentRef::Source(repo_relative(snap, &files_dir, &s, "source")?),
        (None, None, Some(s)) => {
            let path = repo_relative(snap, "", &s, "secret")?;
            let format = match &spec.format {
                Some(f) => {
                    crate::secrets::Store::from_name(f).map_err(|e| format!("key `format`: {e}"))?
                }
                None => crate::secrets::Store::from_path(&path),
            };
            ContentRef::Secret { path, format }
        }
        (None, None, None) => {
            return Err(format!(
                "{path}: set `template` (a Tera template), `source` (copied verbatim, both relative to {files_dir}/) or `secret` (a SOPS file, relative to the repository root)"
            ));
        }
        _ => return Err("set only one of `template`, `source` and `secret`".into()),
    };
    let mode_explicit = spec.mode.is_some();
    let mode = match spec.mode {
        Some(m) => Mode::parse(&m).map_err(|e| format!("key `mode`: {e}"))?,
        None => Mode::DEFAULT_FILE,
    };
    if !spec.allow_special_mode {
        refuse_special_mode(mode, "mode").map_err(|e| format!("{path}: {e}"))?;
    }
    let dir_mode = match &spec.dir_mode {
        Some(m) => parse_dir_mode(m)?,
        None => role_dir_mode,
    };
    let owner = principal(spec.owner, "owner")?;
    let group = principal(spec.group, "group")?;
    let mut on_change = Vec::new();
    for (kind, units) in [
        (UnitActionKind::Reload, spec.on_change.reload),
        (UnitActionKind::Restart, spec.on_change.restart),
        (UnitActionKind::TryRestart, spec.on_change.try_restart),
        (
            UnitActionKind::ReloadOrRestart,
            spec.on_change.reload_or_restart,
        ),
    ] {
        for unit in units {
            validate_unit_name(&unit).map_err(|e| format!("on_change.{kind}: {e}"))?;
            on_change.push(UnitAction { unit, action: kind });
        }
    }
    Ok(FileDecl {
        path,
        role: role.to_string(),
        content,
        mode,
        mode_explicit,
        dir_mode,
        owner,
        group,
        on_change,
        reboot: spec.reboot,
        origin: origin.to_string(),
    })
}

/// A setuid, setgid, sticky or world-writable `mode` needs the entry's
/// `allow_special_mode = true`: one careless commit would open the host.
fn refuse_special_mode(mode: Mode, key: &str) -> Result<(), String> {
    let special = mode.0 & 0o7002;
    if special == 0 {
        return Ok(());
    }
    let what: Vec<&str> = [
        (0o4000, "setuid"),
        (0o2000, "setgid"),
        (0o1000, "sticky"),
        (0o0002, "world-writable"),
    ]
    .into_iter()
    .filter(|(bit, _)| special & bit != 0)
    .map(|(_, name)| name)
    .collect();
    Err(format!(
        "key `{key}`: {:04o} is {}; such a mode is refused unless the entry says so with \
         `allow_special_mode = true`",
        mode.0,
        what.join(" and ")
    ))
}

/// `dir_mode` (of a file entry or a role): a directory must stay
/// traversable by its owner, and is never setuid, sticky or world-writable
/// (setgid, for shared group directories, is allowed).
fn parse_dir_mode(s: &str) -> Result<Mode, String> {
    let mode = Mode::parse(s).map_err(|e| format!("key `dir_mode`: {e}"))?;
    if mode.0 & 0o700 != 0o700 {
        return Err(format!(
            "key `dir_mode`: {:04o} does not give the owner rwx; driftless could not manage files in it (use e.g. \"0755\" or \"0750\")",
            mode.0
        ));
    }
    if mode.0 & 0o5002 != 0 {
        return Err(format!(
            "key `dir_mode`: {:04o} is setuid, sticky or world-writable, which driftless never creates for a directory",
            mode.0
        ));
    }
    Ok(mode)
}

fn principal(value: Option<String>, key: &str) -> Result<Principal, String> {
    match value {
        None => Ok(Principal::root()),
        Some(v)
            if !v.is_empty()
                && v.len() <= 32
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '$')) =>
        {
            Ok(Principal(v))
        }
        Some(v) => Err(format!(
            "key `{key}`: {v:?} is not a user/group name or number"
        )),
    }
}

/// Resolves a `template`/`source` value to a repository path that exists.
fn repo_relative(snap: &Snapshot, files_dir: &str, rel: &str, key: &str) -> Result<String, String> {
    if rel.starts_with('/')
        || rel
            .split('/')
            .any(|c| c == ".." || c == "." || c.is_empty())
    {
        return Err(format!(
            "key `{key}`: {rel:?} must be a plain relative path inside {files_dir}/"
        ));
    }
    let full = if files_dir.is_empty() {
        rel.to_string()
    } else {
        format!("{files_dir}/{rel}")
    };
    match snap.file_exists(&full) {
        Ok(true) => Ok(full),
        Ok(false) => Err(format!(
            "key `{key}`: {full} does not exist in the repository"
        )),
        Err(e) => Err(format!("key `{key}`: {e:#}")),
    }
}

fn check(role: &str, spec: CheckSpec) -> Result<Check, String> {
    let mut probes = Vec::new();
    if let Some(h) = spec.http {
        validate_http(&h)?;
        probes.push(Probe::Http(h));
    }
    if let Some(t) = spec.tcp {
        probes.push(Probe::Tcp(t));
    }
    if let Some(c) = spec.command {
        if c.argv.is_empty() {
            return Err("command.argv is empty: give the program and its arguments".into());
        }
        probes.push(Probe::Command(c));
    }
    if let Some(u) = spec.unit {
        validate_unit_name(&u.name).map_err(|e| format!("unit.name: {e}"))?;
        if let Some(s) = &u.settle {
            let settle = parse_duration(s).map_err(|e| format!("unit.settle: {e}"))?;
            if settle > std::time::Duration::from_secs(600) {
                return Err("unit.settle: more than 10 minutes; a check waits that long while the host runs the new commit unverified".into());
            }
        }
        probes.push(Probe::Unit(u));
    }
    if probes.len() != 1 {
        return Err(format!(
            "a check needs exactly one of `http`, `tcp`, `command`, `unit` (found {})",
            probes.len()
        ));
    }
    let probe = probes.remove(0);
    let interval = parse_duration(spec.interval.as_deref().unwrap_or("2s"))
        .map_err(|e| format!("key `interval`: {e}"))?;
    let timeout = parse_duration(spec.timeout.as_deref().unwrap_or("5s"))
        .map_err(|e| format!("key `timeout`: {e}"))?;
    let delay = match spec.delay.as_deref() {
        None => std::time::Duration::ZERO,
        Some(d) => parse_duration(d).map_err(|e| format!("key `delay`: {e}"))?,
    };
    if delay > std::time::Duration::from_secs(600) {
        return Err("key `delay`: more than 10 minutes; a check waits that long while the host runs the new commit unverified".into());
    }
    Ok(Check {
        name: spec.name.unwrap_or_else(|| probe.describe()),
        role: role.to_string(),
        probe,
        retries: spec.retries.unwrap_or(5),
        interval,
        timeout,
        delay,
    })
}

/// The time limit of a hook without `timeout`.
pub const DEFAULT_HOOK_TIMEOUT: &str = "30s";

/// Validates a `[[hooks]]` entry. What needs the host (does the program
/// exist, does the user) is the run's business, reported then.
fn hook(role: &str, origin: &str, spec: HookSpec) -> Result<Hook, String> {
    let when = match spec.when.as_str() {
        "pre" => HookWhen::Pre,
        "post" => HookWhen::Post,
        other => {
            return Err(format!(
                "key `when`: {other:?} is neither \"pre\" (before the files switch) nor \"post\" (after the unit actions, before the checks)"
            ))
        }
    };
    let run = match spec.run.as_deref() {
        None | Some("on-change") => HookRun::OnChange,
        Some("always") => HookRun::Always,
        Some(other) => {
            return Err(format!(
                "key `run`: {other:?} is neither \"on-change\" (when the role has changes) nor \"always\" (whenever anything changes)"
            ))
        }
    };
    let Some(program) = spec.argv.first() else {
        return Err(
            "key `argv` is empty: give the program (an absolute path) and its arguments".into(),
        );
    };
    if !program.starts_with('/') {
        return Err(format!(
            "key `argv`: the program {program:?} must be an absolute path (hooks run without a shell and without a search path; write e.g. \"/usr/bin/{}\")",
            program.rsplit('/').next().unwrap_or(program)
        ));
    }
    if let Some(a) = spec.argv.iter().find(|a| a.contains('\0')) {
        return Err(format!("key `argv`: {a:?} contains a NUL byte"));
    }
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains(['=', '\0']) {
            return Err(format!(
                "key `env`: {k:?} is not an environment variable name (empty, or with '=' or NUL)"
            ));
        }
        if v.contains('\0') {
            return Err(format!("key `env.{k}`: the value contains a NUL byte"));
        }
    }
    let timeout_text = spec.timeout.as_deref().unwrap_or(DEFAULT_HOOK_TIMEOUT);
    let timeout = parse_duration(timeout_text).map_err(|e| format!("key `timeout`: {e}"))?;
    if timeout.is_zero() {
        return Err("key `timeout`: must be more than 0s".into());
    }
    let user = match spec.user {
        None => None,
        Some(u) => Some(principal(Some(u), "user")?),
    };
    Ok(Hook {
        role: role.to_string(),
        when,
        argv: spec.argv,
        user,
        timeout,
        env: spec.env,
        run,
        origin: origin.to_string(),
    })
}

/// What can be checked without the host: the URL's scheme and that
/// `ca_file` is an absolute path (whether it exists is the host's business,
/// reported when the check runs).
fn validate_http(h: &HttpCheckSpec) -> Result<(), String> {
    let rest = ["http://", "https://"].iter().find_map(|scheme| {
        h.url
            .get(..scheme.len())
            .filter(|s| s.eq_ignore_ascii_case(scheme))
            .and_then(|_| h.url.get(scheme.len()..))
    });
    match rest {
        Some(rest) if !rest.is_empty() && !rest.starts_with('/') => {}
        _ => {
            return Err(format!(
                "http.url: {:?} is not an http:// or https:// URL with a host",
                h.url
            ))
        }
    }
    if let Some(ca) = &h.ca_file {
        if !ca.is_absolute() {
            return Err(format!(
                "http.ca_file: {:?} must be an absolute path on the host",
                ca.display().to_string()
            ));
        }
    }
    Ok(())
}

fn read_toml<T: serde::de::DeserializeOwned>(
    snap: &Snapshot,
    path: &str,
) -> Result<Option<T>, String> {
    read_toml_text(snap, path).map(|r| r.map(|(t, _)| t))
}

/// [`read_toml`], also returning the text (for the line of a span).
fn read_toml_text<'s, T: serde::de::DeserializeOwned>(
    snap: &'s Snapshot,
    path: &str,
) -> Result<Option<(T, &'s str)>, String> {
    let bytes = match snap.read(path) {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(None),
        Err(e) => return Err(format!("{e:#}")),
    };
    let text = std::str::from_utf8(bytes).map_err(|e| format!("{path}: not valid UTF-8: {e}"))?;
    toml_file::parse(path, text).map(|t| Some((t, text)))
}

/// Converts TOML to JSON for the template context. Datetimes become strings.
pub fn toml_to_json(v: toml::Value) -> Json {
    match v {
        toml::Value::String(s) => Json::String(s),
        toml::Value::Integer(i) => Json::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number),
        toml::Value::Boolean(b) => Json::Bool(b),
        toml::Value::Datetime(d) => Json::String(d.to_string()),
        toml::Value::Array(a) => Json::Array(a.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => {
            Json::Object(t.into_iter().map(|(k, v)| (k, toml_to_json(v))).collect())
        }
    }
}

/// Deep merge: objects merge key by key, anything else is replaced.
pub fn merge(base: &mut Json, over: Json) {
    match (base, over) {
        (Json::Object(b), Json::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn opts() -> LoadOptions {
        LoadOptions {
            allowed_roots: vec![TargetPath::parse("/etc").unwrap()],
            reserved: vec![(
                TargetPath::parse("/etc/driftless").unwrap(),
                "the agent's configuration".into(),
            )],
        }
    }

    fn repo(files: &[(&str, &str)]) -> Snapshot {
        let mut s = Snapshot::new();
        for (p, c) in files {
            s.insert_file(*p, c.as_bytes().to_vec(), false);
        }
        s
    }

    #[test]
    fn vars_merge_repo_then_roles_then_host() {
        let s = repo(&[
            (
                "driftless.toml",
                "roles = [\"a\"]\n[vars]\nx = 1\ny = 1\nz = 1\nt = { p = 1, q = 1 }\n",
            ),
            ("roles/a/role.toml", "[vars]\ny = 2\nz = 2\nt = { q = 2 }\n"),
            ("roles/b/role.toml", "[vars]\nz = 3\n"),
            ("hosts/h.toml", "roles = [\"b\"]\n[vars]\nw = 4\n"),
        ]);
        let h = load_host(&s, "h", &opts()).unwrap();
        assert_eq!(h.roles, vec!["a", "b"]);
        assert_eq!(
            h.vars,
            json!({"x": 1, "y": 2, "z": 3, "w": 4, "t": {"p": 1, "q": 2}})
        );
    }

    #[test]
    fn host_without_file_uses_default() {
        let s = repo(&[("driftless.toml", ""), ("hosts/default.toml", "")]);
        let h = load_host(&s, "nobody", &opts()).unwrap();
        assert_eq!(h.host_file, "hosts/default.toml");
    }

    #[test]
    fn host_without_file_and_without_default_is_an_error() {
        let s = repo(&[("driftless.toml", ""), ("hosts/web1.toml", "")]);
        let err = load_host(&s, "db9", &opts()).unwrap_err().to_string();
        assert!(
            err.contains("hosts/db9.toml") && err.contains("hosts/default.toml"),
            "{err}"
        );
    }

    #[test]
    fn unknown_role_suggests_the_closest() {
        let s = repo(&[
            ("driftless.toml", ""),
            ("hosts/h.toml", "roles = [\"wbe\"]"),
            ("roles/web/role.toml", ""),
        ]);
        let err = load_host(&s, "h", &opts()).unwrap_err().to_string();
        assert!(
            err.contains("hosts/h.toml: role `wbe` does not exist"),
            "{err}"
        );
        assert!(err.contains("did you mean `web`?"), "{err}");
    }

    #[test]
    fn two_roles_claiming_one_path_is_an_error() {
        let f = "[[files]]\npath = \"/etc/x\"\nsource = \"x\"\n";
        let s = repo(&[
            ("driftless.toml", "roles = [\"a\", \"b\"]"),
            ("hosts/default.toml", ""),
            ("roles/a/role.toml", f),
            ("roles/a/files/x", ""),
            ("roles/b/role.toml", f),
            ("roles/b/files/x", ""),
        ]);
        let err = load_host(&s, "h", &opts()).unwrap_err().to_string();
        assert!(
            err.contains(
                "roles/b/role.toml:1 files[0]: /etc/x is already managed by roles/a/role.toml:1 files[0]"
            ),
            "{err}"
        );
    }

    /// Step 0 of docs/design/resources.md: a semantic error names the
    /// line of its entry (the `[[files]]` header, or the inline table),
    /// whatever comes before it: comments, blank lines, multi-line strings,
    /// other kinds of entries.
    #[test]
    fn semantic_errors_name_the_line_of_their_entry() {
        let role = concat!(
            "# the app\n",                                 // 1
            "description = \"\"\"\nmulti\nline\n\"\"\"\n", // 2-5
            "\n",                                          // 6
            "[[files]]\n",                                 // 7
            "path = \"/etc/ok\"\n",                        // 8
            "source = \"x\"\n",                            // 9
            "\n",                                          // 10
            "[[checks]]\n",                                // 11
            "name = \"none\"\n",                           // 12
            "\n",                                          // 13
            "  [[files]]   # indented, with a comment\n",  // 14
            "path = \"/etc/bad\"\n",                       // 15
            "source = \"x\"\n",                            // 16
            "mode = \"0999\"\n",                           // 17
            "[[units]]\n",                                 // 18
            "name = \"bad unit\"\n",                       // 19
            "[[files]]\n",                                 // 20
            "path = \"/etc/ok\"\n",                        // 21
            "source = \"x\"\n",                            // 22
        );
        let s = repo(&[
            ("driftless.toml", "roles = [\"a\"]"),
            ("hosts/default.toml", ""),
            ("roles/a/role.toml", role),
            ("roles/a/files/x", ""),
        ]);
        let err = load_host(&s, "h", &opts()).unwrap_err().to_string();
        for want in [
            "roles/a/role.toml:11 checks[0]: a check needs exactly one",
            "roles/a/role.toml:14 files[1]: key `mode`",
            "roles/a/role.toml:18 units[0]: key `name`",
            "roles/a/role.toml:20 files[2]: /etc/ok is already managed by roles/a/role.toml:7 files[0]",
        ] {
            assert!(err.contains(want), "{want:?} not in {err}");
        }

        // Entries of an inline array name their own line.
        let s = repo(&[
            ("driftless.toml", "roles = [\"a\"]"),
            ("hosts/default.toml", ""),
            (
                "roles/a/role.toml",
                "files = [\n  { path = \"/etc/x\", source = \"x\" },\n  { path = \"rel\", source = \"x\" },\n]\n",
            ),
            ("roles/a/files/x", ""),
        ]);
        let err = load_host(&s, "h", &opts()).unwrap_err().to_string();
        assert!(err.contains("roles/a/role.toml:3 files[1]: "), "{err}");
    }

    fn hooks_of(role: &str) -> Result<Vec<Hook>, String> {
        let s = repo(&[
            ("driftless.toml", "roles = [\"a\"]"),
            ("hosts/default.toml", ""),
            ("roles/a/role.toml", role),
        ]);
        load_host(&s, "h", &opts())
            .map(|h| h.hooks)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn hooks_parse_with_defaults() {
        let hooks = hooks_of(
            "[[hooks]]\nwhen = \"pre\"\nargv = [\"/bin/true\"]\n\n[[hooks]]\nwhen = \"post\"\nargv = [\"/usr/local/bin/m\", \"a; b\"]\nuser = \"app\"\ntimeout = \"60s\"\nenv = { A = \"1\" }\nrun = \"always\"\n",
        )
        .unwrap();
        assert_eq!(hooks.len(), 2);
        assert_eq!(hooks[0].when, HookWhen::Pre);
        assert_eq!(hooks[0].run, HookRun::OnChange);
        assert_eq!(hooks[0].timeout, std::time::Duration::from_secs(30));
        assert_eq!(hooks[0].user, None);
        assert_eq!(hooks[0].origin, "roles/a/role.toml:1 hooks[0]");
        assert_eq!(hooks[1].when, HookWhen::Post);
        assert_eq!(hooks[1].run, HookRun::Always);
        assert_eq!(hooks[1].argv, vec!["/usr/local/bin/m", "a; b"]);
        assert_eq!(hooks[1].user, Some(Principal("app".into())));
        assert_eq!(hooks[1].timeout, std::time::Duration::from_secs(60));
        assert_eq!(hooks[1].env.get("A").map(String::as_str), Some("1"));
        assert_eq!(hooks[1].origin, "roles/a/role.toml:5 hooks[1]");
    }

    #[test]
    fn bad_hooks_name_role_line_and_key() {
        for (body, want) in [
            (
                "when = \"post\"\nargv = [\"rel\"]",
                "hooks[0]: key `argv`: the program \"rel\" must be an absolute path",
            ),
            (
                "when = \"post\"\nargv = []",
                "hooks[0]: key `argv` is empty",
            ),
            (
                "when = \"post\"\nargv = [\"/x\"]\ntimeout = \"x\"",
                "hooks[0]: key `timeout`",
            ),
            (
                "when = \"post\"\nargv = [\"/x\"]\ntimeout = \"0s\"",
                "hooks[0]: key `timeout`: must be more than 0s",
            ),
            (
                "when = \"later\"\nargv = [\"/x\"]",
                "hooks[0]: key `when`: \"later\" is neither",
            ),
            (
                "when = \"pre\"\nargv = [\"/x\"]\nrun = \"often\"",
                "hooks[0]: key `run`: \"often\" is neither",
            ),
            (
                "when = \"pre\"\nargv = [\"/x\"]\nuser = \"a b\"",
                "hooks[0]: key `user`",
            ),
            (
                "when = \"pre\"\nargv = [\"/x\"]\nenv = { \"A=B\" = \"1\" }",
                "hooks[0]: key `env`",
            ),
            (
                "when = \"pre\"\nargv = [\"/x\\u0000\"]",
                "hooks[0]: key `argv`",
            ),
        ] {
            let err = hooks_of(&format!("\n\n[[hooks]]\n{body}\n")).unwrap_err();
            assert!(
                err.contains(&format!("roles/a/role.toml:3 {want}")),
                "{want:?} not in {err}"
            );
        }
        let err =
            hooks_of("[[hooks]]\nwhen = \"pre\"\nargv = [\"/x\"]\ncommand = \"x\"\n").unwrap_err();
        assert!(
            err.contains("roles/a/role.toml:4:1: unknown field `command`"),
            "{err}"
        );
        let err = hooks_of("[[hooks]]\nargv = [\"/x\"]\n").unwrap_err();
        assert!(err.contains("missing field `when`"), "{err}");
    }

    #[test]
    fn a_quadlet_is_a_file_and_its_generated_unit_naming_its_line() {
        let s = repo(&[
            ("driftless.toml", "roles = [\"a\", \"b\"]"),
            ("hosts/default.toml", ""),
            (
                "roles/a/role.toml",
                "\n[[quadlets]]\nname = \"app.container\"\ntemplate = \"app.container.tera\"\n",
            ),
            ("roles/a/files/app.container.tera", "[Container]\nImage=x\n"),
            ("roles/b/role.toml", ""),
        ]);
        let h = load_host(&s, "h", &opts()).unwrap();
        assert_eq!(h.files.len(), 1);
        let f = &h.files[0];
        assert_eq!(f.path.as_str(), "/etc/containers/systemd/app.container");
        assert_eq!(f.origin, "roles/a/role.toml:2 quadlets[0]");
        assert_eq!(
            f.on_change,
            [UnitAction {
                unit: "app.service".into(),
                action: UnitActionKind::Restart
            }]
        );
        assert_eq!(h.units.len(), 1);
        assert_eq!(
            (h.units[0].name.as_str(), h.units[0].started),
            ("app.service", Some(true))
        );

        // The generated unit declared again, a file at the quadlet's path,
        // a bad name: each names its role, line and key.
        let s = repo(&[
            ("driftless.toml", "roles = [\"a\", \"b\"]"),
            ("hosts/default.toml", ""),
            (
                "roles/a/role.toml",
                "[[quadlets]]\nname = \"app.container\"\nsource = \"q\"\n\n[[quadlets]]\nname = \"x.service\"\nsource = \"q\"\n",
            ),
            ("roles/a/files/q", ""),
            (
                "roles/b/role.toml",
                "[[units]]\nname = \"app.service\"\nstarted = true\n\n[[files]]\npath = \"/etc/containers/systemd/app.container\"\nsource = \"q\"\n",
            ),
            ("roles/b/files/q", ""),
        ]);
        let err = load_host(&s, "h", &opts()).unwrap_err().to_string();
        for want in [
            "roles/a/role.toml:5 quadlets[1]: key `name`: \"x.service\": .service is not a quadlet type",
            "roles/b/role.toml:1 units[0]: unit app.service is already declared by roles/a/role.toml:1 quadlets[0]",
            "roles/b/role.toml:5 files[0]: /etc/containers/systemd/app.container is already managed by roles/a/role.toml:1 quadlets[0]",
        ] {
            assert!(err.contains(want), "{want:?} not in\n{err}");
        }
    }

    #[test]
    fn a_check_delay_is_a_duration_of_at_most_ten_minutes() {
        let role = |delay: &str| {
            repo(&[
                ("driftless.toml", "roles = [\"a\"]"),
                ("hosts/default.toml", ""),
                (
                    "roles/a/role.toml",
                    &format!(
                        "[[checks]]\ntcp = {{ address = \"127.0.0.1:1\" }}\ndelay = {delay:?}\n"
                    ),
                ),
            ])
        };
        let h = load_host(&role("1500ms"), "h", &opts()).unwrap();
        assert_eq!(h.checks[0].delay, std::time::Duration::from_millis(1500));
        for (bad, want) in [
            ("soon", "key `delay`: \"soon\" is not a duration"),
            ("1h", "more than 10 minutes"),
        ] {
            let e = load_host(&role(bad), "h", &opts()).unwrap_err().to_string();
            assert!(
                e.contains("roles/a/role.toml:1 checks[0]") && e.contains(want),
                "{e}"
            );
        }
    }

    /// A unit check's `settle` had no bound: "300000000000y" parsed, and
    /// adding it to the clock panicked after the files were switched in.
    #[test]
    fn a_unit_check_settle_is_at_most_ten_minutes() {
        for settle in ["11m", "300000000000y"] {
            let s = repo(&[
                ("driftless.toml", "roles = [\"a\"]"),
                ("hosts/default.toml", ""),
                (
                    "roles/a/role.toml",
                    &format!(
                        "[[checks]]\nunit = {{ name = \"x.service\", settle = {settle:?} }}\n"
                    ),
                ),
            ]);
            let e = load_host(&s, "h", &opts()).unwrap_err().to_string();
            assert!(
                e.contains("unit.settle") && e.contains("more than 10 minutes"),
                "{settle}: {e}"
            );
        }
    }

    #[test]
    fn target_outside_allowed_roots_is_refused() {
        let s = repo(&[
            ("driftless.toml", "roles = [\"a\"]"),
            ("hosts/default.toml", ""),
            (
                "roles/a/role.toml",
                "[[files]]\npath = \"/usr/bin/x\"\nsource = \"x\"\n",
            ),
            ("roles/a/files/x", ""),
        ]);
        let err = load_host(&s, "h", &opts()).unwrap_err().to_string();
        assert!(err.contains("outside the allowed roots"), "{err}");
    }

    /// The whole error of a path with an escape sequence, a line break
    /// or a text-reordering character shows it escaped, with its role
    /// file and entry, for every kind of entry.
    #[test]
    fn a_target_path_with_a_control_character_is_refused_and_shown_escaped() {
        let evil = "\"/etc/a\\u001b[2J\\nb\\u202e\"";
        for (kind, path, extra) in [
            ("files", evil, "source = \"x\"\n"),
            ("links", evil, "target = \"/etc/y\"\n"),
            (
                "links",
                "\"/etc/l\"",
                "target = \"/etc/y\\u001b[2J\\n\\u202e\"\n",
            ),
            ("absent", evil, ""),
            ("dirs", evil, ""),
        ] {
            let role = format!("[[{kind}]]\npath = {path}\n{extra}");
            let s = repo(&[
                ("driftless.toml", "roles = [\"a\"]"),
                ("hosts/default.toml", ""),
                ("roles/a/role.toml", &role),
                ("roles/a/files/x", ""),
            ]);
            let err = format!("{:#}", load_host(&s, "h", &opts()).unwrap_err());
            assert!(
                err.contains("roles/a/role.toml:1")
                    && err.contains("U+001B")
                    && err.contains("rename"),
                "{kind}: {err}"
            );
            assert!(
                !err.chars().any(|c| c.is_control() || c == '\u{202e}'),
                "{kind}: unescaped: {err:?}"
            );
        }
    }

    #[test]
    fn all_errors_are_reported_together() {
        let s = repo(&[
            ("driftless.toml", "roles = [\"a\"]"),
            ("hosts/default.toml", ""),
            (
                "roles/a/role.toml",
                "[[files]]\npath = \"rel\"\nsource = \"x\"\n[[files]]\npath = \"/etc/y\"\nsource = \"missing\"\nmode = \"999\"\n",
            ),
            ("roles/a/files/x", ""),
        ]);
        let err = load_host(&s, "h", &opts()).unwrap_err();
        assert_eq!(err.len(), 2, "{err}");
    }

    #[test]
    fn unit_declared_twice_or_without_suffix_is_an_error() {
        let s = repo(&[
            ("driftless.toml", "roles = [\"a\", \"b\"]"),
            ("hosts/default.toml", ""),
            (
                "roles/a/role.toml",
                "[[units]]\nname = \"app.service\"\nstarted = true\n[[units]]\nname = \"app\"\n",
            ),
            (
                "roles/b/role.toml",
                "[[units]]\nname = \"app.service\"\nenabled = false\n",
            ),
        ]);
        let err = load_host(&s, "h", &opts()).unwrap_err().to_string();
        assert!(
            err.contains("roles/a/role.toml:4 units[1]: key `name`"),
            "{err}"
        );
        assert!(err.contains("did you mean \"app.service\""), "{err}");
        assert!(err.contains("roles/b/role.toml:1 units[0]: unit app.service is already declared by roles/a/role.toml:1 units[0]"), "{err}");
    }

    #[test]
    fn check_needs_exactly_one_probe() {
        let s = repo(&[
            ("driftless.toml", "roles = [\"a\"]"),
            ("hosts/default.toml", ""),
            ("roles/a/role.toml", "[[checks]]\nname = \"x\"\n"),
        ]);
        let err = load_host(&s, "h", &opts()).unwrap_err().to_string();
        assert!(
            err.contains("roles/a/role.toml:1 checks[0]: a check needs exactly one"),
            "{err}"
        );
    }

    /// Loads a repository whose role `a` has one check,
    /// `http = { <http> }`.
    fn one_http_check(http: &str) -> Result<HostConfig, String> {
        let role = format!("[[checks]]\nhttp = {{ {http} }}\n");
        let s = repo(&[
            ("driftless.toml", "roles = [\"a\"]"),
            ("hosts/default.toml", ""),
            ("roles/a/role.toml", &role),
        ]);
        load_host(&s, "h", &opts()).map_err(|e| e.to_string())
    }

    #[test]
    fn http_check_fields_parse_with_defaults() {
        let host = one_http_check(r#"url = "http://127.0.0.1/""#).unwrap();
        let Probe::Http(h) = &host.checks[0].probe else {
            panic!("{:?}", host.checks[0].probe)
        };
        assert_eq!(h.status, 200);
        assert!(!h.follow_redirects && h.ca_file.is_none() && h.body_contains.is_none());

        let host = one_http_check(
            r#"url = "HTTPS://db.example/health", status = 204, follow_redirects = true, ca_file = "/etc/ssl/private-ca.pem""#,
        )
        .unwrap();
        let Probe::Http(h) = &host.checks[0].probe else {
            panic!("{:?}", host.checks[0].probe)
        };
        assert_eq!(h.status, 204);
        assert!(h.follow_redirects);
        assert_eq!(
            h.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/ssl/private-ca.pem"))
        );
    }

    #[test]
    fn http_check_url_scheme_ca_file_and_unknown_keys_are_checked() {
        for (keys, want) in [
            (
                r#"url = "ftp://x/""#,
                "http.url: \"ftp://x/\" is not an http:// or https://",
            ),
            (r#"url = "127.0.0.1:80/""#, "is not an http:// or https://"),
            (r#"url = "http:///x""#, "with a host"),
            (
                r#"url = "https://x/", ca_file = "ca.pem""#,
                "http.ca_file: \"ca.pem\" must be an absolute path",
            ),
            (
                r#"url = "http://x/", follow_redirect = true"#,
                "follow_redirect",
            ),
        ] {
            let err = one_http_check(keys).unwrap_err();
            assert!(err.contains("roles/a/role.toml"), "{keys}: {err}");
            assert!(err.contains(want), "{keys}: {want:?} not in {err}");
        }
    }

    /// Loads a repository whose role `a` manages `path` with `extra` keys.
    fn one_file(path: &str, extra: &str) -> Result<HostConfig, String> {
        let role = format!("[[files]]\npath = \"{path}\"\nsource = \"x\"\n{extra}");
        let s = repo(&[
            ("driftless.toml", "roles = [\"a\"]"),
            ("hosts/default.toml", ""),
            ("roles/a/role.toml", &role),
            ("roles/a/files/x", ""),
        ]);
        load_host(&s, "h", &opts()).map_err(|e| e.to_string())
    }

    #[test]
    fn reboot_is_a_strict_boolean_naming_role_line_and_key() {
        let h = one_file("/etc/default/grub", "reboot = true\n").unwrap();
        assert!(h.files[0].reboot);
        assert!(!one_file("/etc/default/grub", "").unwrap().files[0].reboot);
        for bad in ["reboot = \"yes\"", "reboot = 1", "reboot = \"fleet-lock\""] {
            let err = one_file("/etc/default/grub", &format!("{bad}\n")).unwrap_err();
            assert!(
                err.contains("roles/a/role.toml:4") && err.contains("reboot"),
                "{bad}: {err}"
            );
        }
        let err = one_file("/etc/default/grub", "reboots = true\n").unwrap_err();
        assert!(
            err.contains("roles/a/role.toml:4") && err.contains("unknown field `reboots`"),
            "{err}"
        );
    }

    #[test]
    fn dir_mode_defaults_to_0755_and_a_file_entry_beats_its_role() {
        let dir_mode = |role_toml: &str| -> Result<u32, String> {
            let s = repo(&[
                ("driftless.toml", "roles = [\"a\"]"),
                ("hosts/default.toml", ""),
                ("roles/a/role.toml", role_toml),
                ("roles/a/files/x", ""),
            ]);
            load_host(&s, "h", &opts())
                .map(|h| h.files[0].dir_mode.0)
                .map_err(|e| e.to_string())
        };
        let file = "[[files]]\npath = \"/etc/a/x\"\nsource = \"x\"\n";
        assert_eq!(dir_mode(file), Ok(0o755));
        assert_eq!(dir_mode(&format!("dir_mode = \"0750\"\n{file}")), Ok(0o750));
        assert_eq!(
            dir_mode(&format!("dir_mode = \"0750\"\n{file}dir_mode = \"2770\"\n")),
            Ok(0o2770)
        );
        let err = dir_mode(&format!("dir_mode = \"0644\"\n{file}")).unwrap_err();
        assert!(
            err.contains("roles/a/role.toml:1: key `dir_mode`: 0644 does not give the owner rwx"),
            "{err}"
        );
    }

    #[test]
    fn a_world_writable_or_sticky_dir_mode_is_refused() {
        for mode in ["0777", "1755", "4755"] {
            let err = one_file("/etc/a/x", &format!("dir_mode = \"{mode}\"\n")).unwrap_err();
            assert!(
                err.contains("roles/a/role.toml:1 files[0]: key `dir_mode`")
                    && err.contains("setuid, sticky or world-writable"),
                "{mode}: {err}"
            );
        }
    }

    #[test]
    fn a_reserved_path_its_contents_and_its_parents_are_refused() {
        for target in [
            "/etc/driftless",
            "/etc/driftless/applied-commit.json",
            "/etc/driftless/allowed_signers",
            "/etc/driftless/conf.d/x.toml",
            "/etc",
        ] {
            let err = one_file(target, "").unwrap_err();
            for want in [
                "roles/a/role.toml:1 files[0]",
                target,
                "reserved for the agent",
                "/etc/driftless holds the agent's configuration",
            ] {
                assert!(err.contains(want), "{target}: {want:?} not in {err}");
            }
        }
    }

    #[test]
    fn a_sibling_sharing_the_reserved_prefix_is_allowed() {
        for target in ["/etc/driftless.d/x", "/etc/driftlessx", "/etc/drift"] {
            assert!(one_file(target, "").is_ok(), "{target}");
        }
    }

    #[test]
    fn special_modes_need_allow_special_mode() {
        for (mode, what) in [
            ("4755", "setuid"),
            ("2755", "setgid"),
            ("1777", "sticky and world-writable"),
            ("0666", "world-writable"),
            ("6755", "setuid and setgid"),
        ] {
            let err = one_file("/etc/app", &format!("mode = \"{mode}\"\n")).unwrap_err();
            assert!(err.contains("roles/a/role.toml:1 files[0]"), "{err}");
            assert!(err.contains(&format!("is {what};")), "{mode}: {err}");
            assert!(err.contains("allow_special_mode = true"), "{err}");
            let ok = one_file(
                "/etc/app",
                &format!("mode = \"{mode}\"\nallow_special_mode = true\n"),
            )
            .unwrap();
            assert_eq!(format!("{:04o}", ok.files[0].mode.0), mode);
        }
        // Ordinary modes need nothing; 0664 is group- not world-writable.
        for mode in ["0644", "0600", "0755", "0664", "0640"] {
            assert!(one_file("/etc/app", &format!("mode = \"{mode}\"\n")).is_ok());
        }
    }

    #[test]
    fn allow_special_mode_is_known_and_a_misspelling_is_not() {
        assert!(one_file("/etc/app", "allow_special_mode = false\n").is_ok());
        let err =
            one_file("/etc/app", "mode = \"4755\"\nallow_special_modes = true\n").unwrap_err();
        assert!(err.contains("allow_special_modes"), "{err}");
    }
}
