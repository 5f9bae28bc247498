//! Getting the desired commit of the config repository into an object
//! database, and reading files out of it.
//!
//! Everything here uses gix in-process; no `git` binary is needed on the
//! host. Two kinds of source behave differently, on purpose:
//!
//! - **Local repositories** (a path or `file://` URL) are opened with
//!   [`gix::open_opts`] and read **in place**. gix's `file://` *transport*
//!   would spawn `git-upload-pack`, which needs git installed; opening the
//!   repository directly spawns nothing, costs nothing (no copy), and always
//!   sees the current tip. The repository is opened isolated
//!   ([`gix::open::Options::isolated`]): no global or system git config and no
//!   `GIT_*` environment variables influence what the agent applies.
//! - **Remote repositories** (https, http, ssh, git, scp-like) are fetched
//!   incrementally into a bare *mirror* under the agent's state directory.
//!   Only the configured ref is fetched, forced (`+`), into
//!   `refs/remotes/origin/<branch>`; refusing non-fast-forward updates is
//!   the caller's policy (see [`is_ancestor`]), not the transport's. The
//!   mirror is created atomically (init in a temporary sibling, then
//!   rename) and gix writes packs before moving refs, so a failed fetch
//!   leaves the previous commit readable.
//!
//! Files are read from the commit's tree straight out of the object
//! database ([`read_tree`]) into a [`Snapshot`]; no worktree is checked out.
//!
//! gix's networking is blocking: call [`fetch`] from a synchronous context
//! (or `spawn_blocking`). HTTPS needs a rustls crypto provider installed in
//! the process: call [`install_tls_provider`] first. Server certificates are
//! checked against the system roots, read by `rustls-native-certs` through
//! reqwest's platform verifier. If `SSL_CERT_FILE` (a PEM bundle) or
//! `SSL_CERT_DIR` is set, those roots *replace* the system store: to add a
//! private CA, point `SSL_CERT_FILE` at a bundle holding the system roots
//! plus that CA. Proxies come from `HTTPS_PROXY`/`NO_PROXY` as usual.

mod blobs;
#[doc(hidden)]
pub use blobs::inflate_blob as inflate_loose_blob;
mod location;
/// The `source` of an air-gapped host: signed bundles imported from a stick.
pub const BUNDLE_SOURCE: &str = location::BUNDLES;
mod mirror;
mod tree;
mod workdir;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::desired::snapshot::Snapshot;

/// Where the config repository comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A repository on this host, read in place.
    Local(PathBuf),
    /// A URL as given by the user, fetched into the mirror.
    Remote(String),
    /// `bundle:`: an air-gapped host. Nothing is fetched over the network;
    /// `driftless bundle import` indexes signed bundles into the mirror and
    /// sync reads the mirror's ref.
    Bundles,
}

impl Location {
    /// Parses the `source` setting.
    ///
    /// - a plain path, or a `file://` URL (converted to a path): [`Location::Local`];
    /// - `https://`, `http://`, `ssh://`, `git://` URLs and scp-like
    ///   `user@host:path`: [`Location::Remote`];
    /// - `bundle:`: [`Location::Bundles`] (air-gapped; fed by bundles);
    /// - any other `scheme://`: an error.
    pub fn parse(s: &str) -> Result<Location> {
        location::parse(s)
    }
}

impl std::fmt::Display for Location {
    /// Paths as they are; URLs with any password replaced by `***`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::Remote(u) => f.write_str(&redact(u)),
            Location::Bundles => f.write_str(location::BUNDLES),
        }
    }
}

/// How to reach ssh remotes. Both default to ssh's own behaviour
/// (`~/.ssh/id_*`, `~/.ssh/known_hosts`). ssh always runs with
/// `BatchMode=yes`: it never prompts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SshOptions {
    /// Private key to authenticate with (`ssh -i`); only this key is offered.
    pub key: Option<PathBuf>,
    /// known_hosts file to check the server against; with it, unknown or
    /// changed host keys are refused (`StrictHostKeyChecking=yes`).
    pub known_hosts: Option<PathBuf>,
}

/// The repository, the ref to follow in it, and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSpec {
    pub location: Location,
    /// A branch name like `main`, or a full ref like `refs/heads/x` or
    /// `refs/tags/v1`.
    pub branch: String,
    pub ssh: SshOptions,
}

/// The commit at the tip of the followed ref, and the object database
/// holding it.
pub struct Fetched {
    /// The object database to read the commit from: the local repository
    /// itself, or the mirror.
    pub repo: gix::Repository,
    pub commit: gix::ObjectId,
    /// Committer time, seconds since the epoch.
    pub commit_time: i64,
    /// First line of the commit message.
    pub summary: String,
}

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetched")
            .field("repo", &self.repo.git_dir())
            .field("commit", &self.commit)
            .field("commit_time", &self.commit_time)
            .field("summary", &self.summary)
            .finish()
    }
}

/// Installs rustls' `ring` crypto provider as the process default, which
/// reqwest (gix's HTTPS transport) needs. Safe to call any number of times.
pub fn install_tls_provider() {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Brings the commit at the tip of `spec.branch` into a local object
/// database and returns it.
///
/// Local sources are read in place; remote sources are fetched into the
/// bare mirror at `mirror_dir` (created on first use). See the module docs.
pub fn fetch(spec: &SourceSpec, mirror_dir: &Path) -> Result<Fetched> {
    let full_ref = full_ref_name(&spec.branch)?;
    match &spec.location {
        Location::Local(path) => {
            let repo = open_local(path)?;
            let commit = resolve_local_ref(&repo, &full_ref, path)?;
            fetched(repo, commit, &spec.location, &full_ref)
        }
        Location::Remote(url) => {
            let (repo, commit) = mirror::fetch(url, &full_ref, &spec.ssh, mirror_dir)?;
            fetched(repo, commit, &spec.location, &full_ref)
        }
        Location::Bundles => {
            let repo = mirror::open_for_bundles(mirror_dir, &spec.ssh)?;
            let commit = mirror::bundle_tip(&repo, &full_ref, mirror_dir)?;
            fetched(repo, commit, &spec.location, &full_ref)
        }
    }
}

/// Uncommitted changes in the working tree of a local source: files
/// modified, staged, deleted or untracked (not ignored), counted once per
/// path. Only when the followed branch is the one checked out there (edits
/// on another branch say nothing about it). `None` for remote, bundle and
/// bare sources, and when the status cannot be read: this feeds a note,
/// never a decision. driftless applies commits; a user who edits the
/// working copy and runs `sync` is told why nothing changed.
pub fn uncommitted_changes(spec: &SourceSpec) -> Option<usize> {
    let Location::Local(path) = &spec.location else {
        return None;
    };
    let repo = open_local_uncached(path).ok()?;
    repo.workdir()?;
    let full_ref = full_ref_name(&spec.branch).ok()?;
    let head = repo.head_name().ok()??;
    if head.as_bstr() != full_ref.as_str() {
        return None;
    }
    let iter = repo
        .status(gix::progress::Discard)
        .ok()?
        .into_iter(Vec::<gix::bstr::BString>::new())
        .ok()?;
    let mut paths = std::collections::BTreeSet::new();
    for item in iter {
        paths.insert(item.ok()?.location().to_owned());
    }
    Some(paths.len())
}

/// Opens the object database of an earlier [`fetch`] again (for status or
/// history): the local repository itself, or the mirror for remote sources.
pub fn open(spec: &SourceSpec, mirror_dir: &Path) -> Result<gix::Repository> {
    match &spec.location {
        Location::Local(path) => open_local(path),
        Location::Remote(url) => mirror::open(url, &spec.ssh, mirror_dir),
        Location::Bundles => mirror::open_for_bundles(mirror_dir, &spec.ssh),
    }
}

/// Opens (creating if needed) the mirror that `driftless bundle import`
/// indexes bundles into. Local sources have no mirror: they are read in
/// place, and importing into the operator's own repository would be a
/// surprise.
pub fn mirror_for_import(spec: &SourceSpec, mirror_dir: &Path) -> Result<gix::Repository> {
    match &spec.location {
        Location::Local(path) => bail!(
            "the source is the local repository {}, which is read in place: bundles are imported into the mirror of a `bundle:` or remote source. Set `source = \"bundle:\"` on an air-gapped host (or fetch the bundle into {} with git)",
            path.display(),
            path.display()
        ),
        Location::Remote(_) | Location::Bundles => mirror::open_for_import(mirror_dir, &spec.ssh),
    }
}

/// The ref in the mirror that holds the fetched (or imported) tip of
/// `full_ref`.
pub fn tracking_ref(full_ref: &str) -> String {
    mirror::tracking_ref(full_ref)
}

/// How far commit times may go backwards along history (clock skew between
/// committers) for the fast walk of [`is_ancestor`].
const CLOCK_SKEW_SLACK_SECS: i64 = 7 * 24 * 3600;

/// True if `ancestor` is `descendant` or one of its ancestors. Ancestry
/// decides, never dates.
///
/// A missing `ancestor` (e.g. the previously applied commit was force-pushed
/// away and never fetched into this mirror) gives `Ok(false)`. The first
/// walk goes newest-first from `descendant` and stops at commits older than
/// `ancestor`'s committer time minus a week of slack, so its cost follows
/// the distance between the two. Commit dates can lie (a committer's clock
/// off by more than the slack made a genuine fast-forward look like
/// rewritten history), so a miss is confirmed by a walk of the whole
/// history before it is believed: only a refusal pays for it.
pub fn is_ancestor(
    repo: &gix::Repository,
    ancestor: gix::ObjectId,
    descendant: gix::ObjectId,
) -> Result<bool> {
    let Some(object) = repo
        .try_find_object(ancestor)
        .with_context(|| format!("cannot read object {ancestor} from {}", repo_name(repo)))?
    else {
        return Ok(false);
    };
    let ancestor_commit = object.try_into_commit().map_err(|_| {
        anyhow!(
            "{ancestor} in {} is not a commit; the recorded previous commit is wrong (remove it from the state directory)",
            repo_name(repo)
        )
    })?;
    if ancestor == descendant {
        return Ok(true);
    }
    let cutoff = ancestor_commit
        .time()
        .with_context(|| format!("cannot read the committer time of {ancestor}"))?
        .seconds
        .saturating_sub(CLOCK_SKEW_SLACK_SECS);
    Ok(reaches(repo, ancestor, descendant, Some(cutoff))?
        || reaches(repo, ancestor, descendant, None)?)
}

/// Walks the history of `descendant` (newest first, down to `cutoff` if
/// given) looking for `ancestor`.
fn reaches(
    repo: &gix::Repository,
    ancestor: gix::ObjectId,
    descendant: gix::ObjectId,
    cutoff: Option<i64>,
) -> Result<bool> {
    let sorting = match cutoff {
        Some(seconds) => gix::revision::walk::Sorting::ByCommitTimeCutoff {
            order: gix::traverse::commit::simple::CommitTimeOrder::NewestFirst,
            seconds,
        },
        None => gix::revision::walk::Sorting::BreadthFirst,
    };
    let walk = repo
        .rev_walk([descendant])
        .sorting(sorting)
        .all()
        .with_context(|| format!("cannot walk the history of {descendant}"))?;
    for info in walk {
        let info = info.with_context(|| {
            format!(
                "cannot walk the history of {descendant} in {}",
                repo_name(repo)
            )
        })?;
        if info.id == ancestor {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Reads the tree of `commit` below `sub_path` into a [`Snapshot`], straight
/// from the object database.
///
/// `sub_path` is `""` for the whole repository, or `"a/b"` for that subtree
/// only, with snapshot paths relative to it. Regular files (with the
/// executable bit) and symlinks (their link text) are read; submodules are an
/// error naming their path, as is a `sub_path` that does not exist.
pub fn read_tree(
    repo: &gix::Repository,
    commit: gix::ObjectId,
    sub_path: &str,
    max_file: u64,
) -> Result<Snapshot> {
    tree::read(repo, commit, sub_path, max_file)
}

/// [`read_tree`], read as it is used (`Snapshot::lazy_tree`): only for a
/// commit whose tree is known to read whole without error (see
/// `sync::run`), since a read that fails then is no error of its own.
///
/// `known`: trees of that commit already read and checked, by id (from
/// [`TreeChanges::trees`]), not read again.
pub fn read_tree_lazily(
    repo: &gix::Repository,
    commit: gix::ObjectId,
    sub_path: &str,
    max_file: u64,
    known: Vec<(gix::ObjectId, Vec<u8>)>,
) -> Result<Snapshot> {
    tree::read_lazily(repo, commit, sub_path, max_file, known)
}

/// The most files and links a commit's tree may hold (below `path`).
pub const MAX_TREE_ENTRIES: usize = tree::MAX_ENTRIES;

/// Reads a working directory (`dir`, below it `sub_path`) into a
/// [`Snapshot`] as untrusted as a commit's: files read when used, refused
/// over `max_file` bytes, links never followed (see `workdir`).
pub fn read_dir(dir: &Path, sub_path: &str, max_file: u64) -> Result<Snapshot> {
    workdir::read(dir, sub_path, max_file)
}

/// What [`tree_changes`] found.
#[derive(Debug, Default)]
pub struct TreeChanges {
    /// The entries that differ, in path order.
    pub changed: Vec<crate::desired::snapshot::Changed>,
    /// The trees of the new commit it read (each one that differs), by
    /// id, as read and checked: a lazy read of that commit starts with
    /// them ([`read_tree_lazily`]) instead of inflating them again (a
    /// directory of 10,000 files is a 450 KB object).
    pub trees: Vec<(gix::ObjectId, Vec<u8>)>,
}

/// The entries that differ between the trees of two commits below
/// `sub_path`, without reading either tree whole (see `tree::changes`).
pub fn tree_changes(
    repo: &gix::Repository,
    before: gix::ObjectId,
    after: gix::ObjectId,
    sub_path: &str,
) -> Result<TreeChanges> {
    tree::changes(repo, before, after, sub_path)
}

/// `main` -> `refs/heads/main`; full refs (`refs/...`) stay as they are.
pub fn full_ref_name(branch: &str) -> Result<String> {
    let branch = branch.trim();
    if branch.is_empty() {
        bail!("the branch to follow is empty: set `branch` to a branch name like `main` or a full ref like `refs/tags/v1`");
    }
    let full = if branch.starts_with("refs/") {
        branch.to_string()
    } else {
        format!("refs/heads/{branch}")
    };
    gix::refs::FullName::try_from(full.as_str())
        .with_context(|| format!("branch {branch:?} is not a valid git ref name"))?;
    Ok(full)
}

/// The daemon opens the same local repository on every poll; opening
/// (config files, paths) is most of an idle poll's fetch. The handle is
/// kept and reused: refs are read from disk on every lookup, and the
/// object store rescans for new packs when an object is not found, so a
/// kept handle sees new commits and repacks like a fresh one.
static LOCAL: std::sync::Mutex<Option<(std::path::PathBuf, gix::ThreadSafeRepository)>> =
    std::sync::Mutex::new(None);

fn open_local(path: &Path) -> Result<gix::Repository> {
    if let Ok(cache) = LOCAL.lock() {
        if let Some((p, repo)) = cache.as_ref() {
            if p == path {
                return Ok(repo.to_thread_local());
            }
        }
    }
    let repo = open_local_uncached(path)?;
    if let Ok(mut cache) = LOCAL.lock() {
        *cache = Some((path.to_path_buf(), repo.clone().into_sync()));
    }
    Ok(repo)
}

fn open_local_uncached(path: &Path) -> Result<gix::Repository> {
    gix::open_opts(path, gix::open::Options::isolated()).with_context(|| {
        format!(
            "cannot open the git repository at {}: `source` must be a git working copy or bare repository",
            path.display()
        )
    })
}

fn resolve_local_ref(repo: &gix::Repository, full_ref: &str, path: &Path) -> Result<gix::ObjectId> {
    let reference = repo
        .try_find_reference(full_ref)
        .with_context(|| format!("cannot read {full_ref} in {}", path.display()))?;
    let Some(mut reference) = reference else {
        let branches = local_branches(repo);
        bail!(
            "{full_ref} does not exist in the repository at {}; branches there: {}. Check `branch`",
            path.display(),
            if branches.is_empty() {
                "none".to_string()
            } else {
                branches.join(", ")
            }
        );
    };
    let commit = reference.peel_to_commit().with_context(|| {
        format!(
            "{full_ref} in {} does not point to a commit",
            path.display()
        )
    })?;
    Ok(commit.id)
}

/// Up to 20 local branch names, for error messages.
fn local_branches(repo: &gix::Repository) -> Vec<String> {
    let Ok(platform) = repo.references() else {
        return Vec::new();
    };
    let Ok(iter) = platform.local_branches() else {
        return Vec::new();
    };
    iter.filter_map(Result::ok)
        .map(|r| r.name().shorten().to_string())
        .take(20)
        .collect()
}

fn fetched(
    repo: gix::Repository,
    commit: gix::ObjectId,
    location: &Location,
    full_ref: &str,
) -> Result<Fetched> {
    let (commit_time, summary) = {
        let c = repo
            .find_commit(commit)
            .with_context(|| format!("cannot read commit {commit} ({full_ref} of {location})"))?;
        let time = c
            .time()
            .with_context(|| {
                format!("cannot read the committer time of {commit} ({full_ref} of {location})")
            })?
            .seconds;
        let summary = c
            .message()
            .with_context(|| {
                format!("cannot read the message of {commit} ({full_ref} of {location})")
            })?
            .summary()
            .to_string();
        (time, summary)
    };
    Ok(Fetched {
        repo,
        commit,
        commit_time,
        summary,
    })
}

fn repo_name(repo: &gix::Repository) -> String {
    repo.git_dir().display().to_string()
}

/// `text` (a message about `url`, from a library that may quote it) with
/// `url`'s password replaced by `***`, as [`redact`] does to the URL
/// itself: as written and percent-decoded (gix and reqwest decode and
/// re-encode URLs), wherever it follows a `:` and precedes an `@`, and
/// anywhere at all once it is 4 characters or more (a shorter one, found
/// everywhere, would only garble the message).
pub(crate) fn redact_in(text: &str, url: &str) -> String {
    let mut out = text.to_string();
    // The longest first: hiding a shorter one first would break up the
    // longer one it is a part of.
    let mut spans = secret_spans(url);
    spans.sort_by_key(|s| std::cmp::Reverse(s.range.len()));
    for span in spans {
        let written = &url[span.range];
        if written.is_empty() {
            continue;
        }
        let decoded = percent_encoding::percent_decode_str(written).decode_utf8_lossy();
        for secret in [written, decoded.as_ref()] {
            let (before, anywhere_from) = if span.user { ("//", 16) } else { (":", 4) };
            out = out.replace(&format!("{before}{secret}@"), &format!("{before}***@"));
            if secret.chars().count() >= anywhere_from {
                out = out.replace(secret, "***");
            }
        }
    }
    out
}

/// `err` with `url`'s password taken out of every message of its chain
/// (see [`redact_in`]); unchanged, chain and all, when it holds none.
pub(crate) fn redact_error(err: anyhow::Error, url: &str) -> anyhow::Error {
    let text = format!("{err:#}");
    let redacted = redact_in(&text, url);
    if redacted == text {
        err
    } else {
        anyhow::anyhow!(redacted)
    }
}

/// Where a secret of `url` may be: its password, and over http(s) a user
/// name without one (a token used as the user name, as in
/// `https://<token>@github.com/...`, is the usual way to clone with one).
struct SecretSpan {
    range: std::ops::Range<usize>,
    /// A user name, not a password: found in messages after `//` (or
    /// anywhere, from 16 characters on: a token's length, not a name's).
    user: bool,
}

/// Where the password of `scheme://user:password@host/...` may be in
/// `url`: the well-formed reading's span first, then a longer one if the
/// URL allows it; and, over http(s), a user name without a password.
///
/// A well-formed URL's authority ends at the first `/`, and its userinfo
/// at the last `@` before that. A password with an unencoded `/` or `@`
/// (`https://bot:pa/ss@host/x`, `https://bot:p@ss/word@host/x`: invalid,
/// but a user may write them, and they are quoted in messages all the
/// same) reads otherwise: as a host `bot` with port `pa`, or a password
/// `p`. So whenever a `:` comes before the last `@` of the whole URL, the
/// span from that `:` to that `@` is a candidate too. That errs on the
/// side of hiding: an unusual URL such as `https://host:8443/users/@me`
/// shows as `https://host:***@me`, and `https://bot@host` as
/// `https://***@host`.
fn secret_spans(url: &str) -> Vec<SecretSpan> {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return Vec::new();
    };
    let rest = &url[start..];
    let password = |userinfo: &str| {
        userinfo.find(':').map(|colon| SecretSpan {
            range: start + colon + 1..start + userinfo.len(),
            user: false,
        })
    };
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let mut spans: Vec<SecretSpan> = Vec::new();
    let userinfo = authority.rsplit_once('@').map(|(u, _)| u);
    if let Some(s) = userinfo.and_then(password) {
        spans.push(s);
    }
    if let Some(long) = rest.rsplit_once('@').and_then(|(u, _)| password(u)) {
        if !spans.iter().any(|s| s.range == long.range) {
            spans.push(long);
        }
    }
    let scheme = &url[..start - 3];
    let http = scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https");
    if let Some(user) = userinfo.filter(|u| http && spans.is_empty() && !u.is_empty()) {
        spans.push(SecretSpan {
            range: start..start + user.len(),
            user: true,
        });
    }
    spans
}

/// Replaces the password of `scheme://user:password@host/...` (over
/// http(s), a lone user name too) by `***`, so URLs can go into messages
/// and logs: from the first candidate's start to the furthest candidate's
/// end (see [`secret_spans`]).
pub(crate) fn redact(url: &str) -> String {
    let spans = secret_spans(url);
    match (
        spans.iter().map(|s| s.range.start).min(),
        spans.iter().map(|s| s.range.end).max(),
    ) {
        (Some(from), Some(to)) => format!("{}***{}", &url[..from], &url[to..]),
        _ => url.to_string(),
    }
}
