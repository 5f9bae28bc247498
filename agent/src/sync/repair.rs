//! Updating only what changed, without re-rendering the whole host.
//!
//! The quick-check record says the host matched commit A (every file's
//! stamp, and which files are *self-contained*: their content depends on
//! nothing in the repository but their own template or source file, the
//! shared `templates/` and the variables). When the inputs (settings,
//! facts, account files) are the same, a sync of commit B only has to
//! render:
//!
//! - the files whose stamps changed on the host (drift), and
//! - if B is not A: the files whose own template or source changed, and
//!   every file that is not self-contained.
//!
//! Every other file is provably as B wants it already: same template bytes
//! (same object id), same variables, same facts, and the same stamp as
//! when it was verified. Their inventory entries are carried over. The
//! result is the plan the full pipeline would make, at the cost of the
//! files that changed.
//!
//! This holds only while B changes nothing but role files: a change to
//! `driftless.toml`, a host or role file, `templates/`, secrets, anything
//! else, or a symlink anywhere in the change, takes the full path. So does
//! any error or doubt (`None`): the full pipeline is always correct and
//! reports errors properly.
//!
//! The configuration itself is not parsed again when B provably loads to
//! A's (only the content of role files changed, each a regular file in
//! both trees, and B holds no symbolic link through which loading could
//! read one of them): the one loaded for A is read from the configuration
//! cache the record names (`effects::state::config_cache`).

use std::collections::BTreeSet;
use std::sync::Arc;

use tracing::debug;

use super::Fetched;
use crate::config::Settings;
use crate::desired::snapshot::{Changed, Kind};
use crate::desired::spec::TargetPath;
use crate::effects::rootfs::RootFs;
use crate::effects::state::{config_cache, StateDir};
use crate::plan::quick::QuickRecord;
use crate::plan::{CarriedContained, Plan};

/// The plan that brings the host from the record's commit to the fetched
/// commit (`changes`: what differs between their trees, when they are not
/// the same commit), or `None` to take the full path.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    settings: &Settings,
    state: &StateDir,
    fs: &RootFs,
    fetched: &Fetched,
    facts: &serde_json::Value,
    record: &Arc<QuickRecord>,
    drifted: &BTreeSet<TargetPath>,
    changes: Option<&[Changed]>,
) -> Option<Plan> {
    let result = plan_inner(
        settings, state, fs, fetched, facts, record, drifted, changes,
    );
    if let Err(e) = &result {
        debug!("updating only what changed is not possible ({e:#}); full sync");
    }
    result.ok()
}

/// Whether a repository path is a file inside a role's `files/`.
fn is_role_file(path: &str) -> bool {
    let mut parts = path.splitn(4, '/');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some("roles"), Some(_), Some("files"), Some(_))
    )
}

#[allow(clippy::too_many_arguments)]
fn plan_inner(
    settings: &Settings,
    state: &StateDir,
    fs: &RootFs,
    fetched: &Fetched,
    facts: &serde_json::Value,
    record: &Arc<QuickRecord>,
    drifted: &BTreeSet<TargetPath>,
    changes: Option<&[Changed]>,
) -> anyhow::Result<Plan> {
    let snap = &fetched.snapshot;
    // Whether B loads to A's configuration: it changed nothing but the
    // content of role files that are regular files in both (loading reads
    // none of them, and every path exists in B exactly when it did in A).
    let mut same_config = true;
    let changed_in_repo: BTreeSet<String> = match changes {
        Some(changes) if record.commit != fetched.commit => {
            for c in changes {
                let p = &c.path;
                anyhow::ensure!(is_role_file(p), "{p} changed and is not a role file");
                for kind in [c.before, c.after] {
                    anyhow::ensure!(kind != Some(Kind::Symlink), "{p} is a symlink");
                    same_config &= kind == Some(Kind::File);
                }
            }
            changes.iter().map(|c| c.path.clone()).collect()
        }
        Some(_) => BTreeSet::new(),
        None => {
            anyhow::ensure!(
                record.commit == fetched.commit,
                "the trees were not compared"
            );
            BTreeSet::new()
        }
    };
    // Whose declarations are needed: the drifted files, the files whose
    // own template or source changed, and, when anything changed, every
    // file that is not self-contained. From the cache, only those are
    // decoded; loaded, they are picked from all.
    let changed = !changed_in_repo.is_empty();
    let not_contained = record
        .files
        .iter()
        .filter(|(_, _, contained)| !contained)
        .map(|(p, _, _)| p.as_str());
    let mut wanted_paths: BTreeSet<&str> = drifted.iter().map(TargetPath::as_str).collect();
    if changed {
        wanted_paths.extend(not_contained);
    }
    let wanted_sources: BTreeSet<&str> = changed_in_repo.iter().map(String::as_str).collect();
    let want = config_cache::Want {
        declared: config_cache::paths_digest(record.files.iter().map(|(p, _, _)| p)),
        paths: &wanted_paths,
        sources: &wanted_sources,
    };
    let needed = |path: &str, own: Option<&str>| want.selects(path, own);
    // Loading reads through symbolic links: a `role.toml` (or host file,
    // or `driftless.toml`) that links to a file under `files/` changes
    // with it. So a tree with any link is loaded again (links in a
    // configuration repository are rare; precision is not worth the risk).
    // (Read lazily, the tree's links are the recorded commit's: see
    // `run::lazy_tree`.)
    let links = match record.tree.filter(|_| snap.is_partly_read()) {
        Some(tree) => tree.links,
        None => snap.has_symlinks(),
    };
    let same_config = same_config && !links;
    let reuse = record
        .config
        .as_deref()
        .filter(|_| same_config)
        .map(|name| (name, &want));
    let (config, cache, partial) =
        super::load_config_cached(settings, state, snap, reuse).map_err(|e| e.error)?;
    let declared: BTreeSet<&TargetPath> = config.files.iter().map(|f| &f.path).collect();
    if !partial {
        let recorded: BTreeSet<&TargetPath> = record.files.iter().map(|(p, _, _)| p).collect();
        anyhow::ensure!(
            declared == recorded,
            "the declared files differ from the recorded ones"
        );
    }
    let affected: BTreeSet<TargetPath> = config
        .files
        .iter()
        .filter(|decl| needed(decl.path.as_str(), decl.content.own_source()))
        .map(|decl| decl.path.clone())
        .collect();
    // Every drifted file is declared (the cache checked the set of paths):
    // one that were not would be pruned below as undeclared.
    anyhow::ensure!(
        drifted.iter().all(|d| declared.contains(d)),
        "a drifted file is not declared"
    );
    let mut plan = super::plan_files(
        settings,
        state,
        fs,
        fetched,
        facts,
        &config,
        Some(&affected),
    )
    .map_err(|e| e.error)?;
    plan.config_cache = cache;
    plan.contained_carried = Some(CarriedContained {
        record: record.clone(),
        planned: affected,
    });
    Ok(plan)
}
