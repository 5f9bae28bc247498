//! Where a sync's commit comes from: the configured source, the fetch of
//! its head (signatures verified, fast-forward and the anti-rollback
//! floor enforced), and the read of its tree, whole or lazily.

use anyhow::{anyhow, Context};
use tracing::{debug, warn};

use crate::config::Settings;
use crate::effects::fetch::{self, Location, SourceSpec, SshOptions};
use crate::effects::state::{floor, StateDir};
use crate::exit::{Classify, Error, Failure};
use crate::plan::diff::short;
use crate::timings;

use super::Fetched;

/// The configured repository: where it is, its branch, and the SSH key
/// and known hosts to reach it with.
pub fn source_spec(settings: &Settings) -> Result<SourceSpec, Error> {
    let source = settings.source.as_deref().ok_or_else(|| {
        Error::new(
            Failure::Config,
            anyhow!(
                "no repository configured: set `source` in {} or pass --source",
                crate::config::MAIN_CONFIG
            ),
        )
    })?;
    Ok(SourceSpec {
        location: Location::parse(source).kind(Failure::Config)?,
        branch: settings.branch.clone(),
        ssh: SshOptions {
            key: settings.ssh_key.clone(),
            known_hosts: settings.ssh_known_hosts.clone(),
        },
    })
}

/// Fetches the configured commit and reads its tree (see [`fetch_head`]).
pub fn fetch(settings: &Settings, state: &StateDir, applied: &[String]) -> Result<Fetched, Error> {
    let head = fetch_head(settings, state, applied)?;
    read_snapshot(settings, head)
}

/// The bound of the object cache of a fetched repository handle (a
/// directory of 10,000 files is a tree object of ~400 KB).
pub(super) const TREE_CACHE_BYTES: usize = 8 << 20;

/// The commit to apply, fetched and trusted, its tree not read yet.
pub struct Head {
    pub(super) repo: gix::Repository,
    pub(super) id: gix::ObjectId,
    pub commit: String,
    pub commit_time: i64,
    pub summary: String,
}

/// What changed in the tree since an earlier commit (the one the
/// quick-check record vouches for), without reading any file; `None` if
/// the trees cannot be compared.
pub(super) fn read_changes(
    settings: &Settings,
    head: &Head,
    commit: &str,
) -> Option<fetch::TreeChanges> {
    let _t = timings::stage("tree-diff");
    let id = gix::ObjectId::from_hex(commit.as_bytes()).ok()?;
    fetch::tree_changes(&head.repo, id, head.id, &settings.path)
        .map_err(|e| debug!("cannot compare the trees of {commit} and the new commit: {e:#}"))
        .ok()
}

/// Reads the configured sub-tree of the fetched commit.
pub fn read_snapshot(settings: &Settings, head: Head) -> Result<Fetched, Error> {
    let _t = timings::stage("read-tree");
    let snapshot = fetch::read_tree(&head.repo, head.id, &settings.path, settings.limits.file)
        .kind(Failure::InvalidRepo)?;
    Ok(Fetched {
        commit: head.commit,
        commit_time: head.commit_time,
        summary: head.summary,
        snapshot,
    })
}

/// [`read_snapshot`] read as it is used (see `run::lazy_tree` for when
/// that is sound); the head is kept for a whole read after all.
/// `known`: trees of the head's commit read already (see
/// [`fetch::read_tree_lazily`]).
pub(super) fn read_snapshot_lazily(
    settings: &Settings,
    head: &Head,
    known: Vec<(gix::ObjectId, Vec<u8>)>,
) -> Result<Fetched, Error> {
    let snapshot = fetch::read_tree_lazily(
        &head.repo,
        head.id,
        &settings.path,
        settings.limits.file,
        known,
    )
    .kind(Failure::InvalidRepo)?;
    Ok(Fetched {
        commit: head.commit.clone(),
        commit_time: head.commit_time,
        summary: head.summary.clone(),
        snapshot,
    })
}

/// A plan made from a snapshot read lazily is only as good as its reads:
/// an error if one failed (an entry then read as missing).
pub(super) fn fully_read(fetched: &Fetched) -> Result<(), Error> {
    match fetched.snapshot.failure() {
        None => Ok(()),
        Some(why) => Err(anyhow!(
            "cannot read the tree of commit {}: {why}",
            short(&fetched.commit)
        ))
        .kind(Failure::InvalidRepo),
    }
}

/// Fetches the configured commit and enforces the trust policy: the new
/// tip must descend from every commit in `applied` (the inventory's commit
/// and the anti-rollback floor, see [`floor`]), and with `require_signed`
/// the new commits must carry valid signatures. A refusal changes nothing.
pub fn fetch_head(
    settings: &Settings,
    state: &StateDir,
    applied: &[String],
) -> Result<Head, Error> {
    let spec = source_spec(settings)?;
    fetch::install_tls_provider();
    let timing = timings::stage("fetch");
    let got = fetch::fetch(&spec, &state.mirror()).kind(Failure::Failed)?;
    drop(timing);
    let commit = got.commit.to_string();
    let mut base = None;
    for prev in applied {
        let prev_id = gix::ObjectId::from_hex(prev.as_bytes())
            .with_context(|| format!("the state names an invalid commit {prev:?}"))
            .kind(Failure::Failed)?;
        if prev == &commit || settings.allow_non_fast_forward {
            base = base.or(Some(prev_id));
            continue;
        }
        if !fetch::is_ancestor(&got.repo, prev_id, got.commit).kind(Failure::Failed)? {
            let older = fetch::is_ancestor(&got.repo, got.commit, prev_id).unwrap_or(false);
            let why = if older {
                "which is older than (an ancestor of) the applied commit: applying it would downgrade the host"
            } else {
                "which does not descend from the applied commit (judged by ancestry through the whole history, not by commit dates): its history was rewritten (force-push?) or the source changed"
            };
            return Err(Error::new(
                Failure::Refused,
                anyhow!(
                    "branch {} now points to {}, {why} {}. Nothing applied. If this is intended, \
                     run `driftless rollback --to {}` or pass --allow-non-fast-forward (allow_non_fast_forward = true)",
                    settings.branch,
                    short(&commit),
                    short(prev),
                    short(&commit)
                ),
            ));
        }
        base = Some(prev_id);
    }
    if settings.require_signed {
        let _t = timings::stage("signatures");
        verify_signatures(settings, &got.repo, base, got.commit)?;
    }
    let mut repo = got.repo;
    // The new commit's trees are read twice when a sync compares them
    // with the recorded commit's first (`read_changes`, then
    // `read_snapshot`): decoded objects are kept, up to a bound, so the
    // second read of a large directory is a copy, not another inflate.
    repo.object_cache_size_if_unset(TREE_CACHE_BYTES);
    Ok(Head {
        repo,
        id: got.commit,
        commit,
        commit_time: got.commit_time,
        summary: got.summary,
    })
}

/// The signers file, as a refusal-class error when missing or invalid.
pub fn allowed_signers(settings: &Settings) -> Result<crate::trust::AllowedSigners, Error> {
    crate::trust::AllowedSigners::load(&settings.allowed_signers).map_err(|e| {
        Error::new(
            Failure::Config,
            e.context(format!(
                "cannot use the allowed signers file {} (`allowed_signers`)",
                settings.allowed_signers.display()
            )),
        )
    })
}

/// `require_signed`: the commits new since `base` (or only the tip, on a
/// first sync) must be signed by an allowed key.
pub(super) fn verify_signatures(
    settings: &Settings,
    repo: &gix::Repository,
    base: Option<gix::ObjectId>,
    tip: gix::ObjectId,
) -> Result<(), Error> {
    let signers = allowed_signers(settings)?;
    let verified =
        crate::trust::verify_history(repo, base, tip, &signers, settings.signature_policy)
            .map_err(|e| {
                Error::new(
                    Failure::Refused,
                    e.context(format!(
                        "refusing {}: require_signed is on and a commit fails signature verification. Nothing applied",
                        short(&tip.to_string())
                    )),
                )
            })?;
    for (id, v) in &verified {
        tracing::debug!(commit = %short(&id.to_string()), principal = %v.principal, key = %v.fingerprint, "signature verified");
    }
    Ok(())
}

/// The commits a new tip must descend from: the inventory's and the
/// anti-rollback floor's (the same one, normally).
pub fn applied_commits(settings: &Settings, state: &StateDir) -> Result<Vec<String>, Error> {
    let inventory = state.inventory().kind(Failure::Failed)?;
    applied_commits_from(settings, inventory.commit.clone())
}

/// [`applied_commits`] when the inventory's commit is already known.
pub(super) fn applied_commits_from(
    settings: &Settings,
    inventory_commit: Option<String>,
) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    if let Some(c) = inventory_commit {
        out.push(c);
    }
    if let Some(f) = floor::load(&settings.root).kind(Failure::Failed)? {
        if !out.contains(&f.commit) {
            out.push(f.commit);
        }
    }
    Ok(out)
}

/// Raises the anti-rollback floor to `fetched` after it was applied (or
/// found already in place).
pub(super) fn raise_floor(settings: &Settings, fetched_commit: &str, commit_time: i64, now: i64) {
    let Some(record) = floor_to_raise(settings, fetched_commit, commit_time, now) else {
        return;
    };
    if let Err(e) = floor::save(&settings.root, &record) {
        warn!("cannot record the anti-rollback floor: {e:#}");
    }
}

/// The anti-rollback record that applying `fetched_commit` should leave,
/// or `None` when the current one already says so. The commit writes it
/// with the inventory (see `apply::commit`); [`raise_floor`] afterwards
/// finds it in place, or writes it if that failed.
pub(super) fn floor_to_raise(
    settings: &Settings,
    fetched_commit: &str,
    commit_time: i64,
    now: i64,
) -> Option<floor::Floor> {
    let full_ref =
        fetch::full_ref_name(&settings.branch).unwrap_or_else(|_| settings.branch.clone());
    let current = floor::load(&settings.root).ok().flatten();
    if current.as_ref().is_some_and(|f| {
        f.commit == fetched_commit
            && f.branch == full_ref
            && !f.rolled_back.iter().any(|c| c == fetched_commit)
    }) {
        return None;
    }
    Some(floor::Floor {
        commit: fetched_commit.to_string(),
        commit_time,
        branch: full_ref,
        recorded_at: now,
        rolled_back: current.map_or_else(Vec::new, |f| f.rolled_back_without(fetched_commit)),
    })
}
