//! Reading a commit's tree into a [`Snapshot`] without a worktree.

use anyhow::{bail, Context, Result};
use gix::objs::tree::EntryKind;

use std::sync::{Arc, Mutex};

use crate::desired::snapshot::{BlobSource, Snapshot};

pub(super) fn read(
    repo: &gix::Repository,
    commit: gix::ObjectId,
    sub_path: &str,
) -> Result<Snapshot> {
    let sub_path = normalise_sub_path(sub_path)?;
    let root_tree = repo
        .find_commit(commit)
        .with_context(|| {
            format!(
                "cannot read commit {commit} from {}",
                repo.git_dir().display()
            )
        })?
        .tree_id()
        .with_context(|| format!("commit {commit} has no readable tree"))?
        .detach();

    let start = if sub_path.is_empty() {
        root_tree
    } else {
        let tree = repo
            .find_tree(root_tree)
            .with_context(|| format!("cannot read the tree of commit {commit}"))?;
        let entry = tree
            .lookup_entry_by_path(&sub_path)
            .with_context(|| format!("cannot look up {sub_path:?} in commit {commit}"))?
            .with_context(|| {
                format!("the configured path {sub_path:?} does not exist in commit {commit}: check `path` (relative to the repository root)")
            })?;
        if !entry.mode().is_tree() {
            bail!("the configured path {sub_path:?} is not a directory in commit {commit}: check `path`");
        }
        entry.object_id()
    };

    let mut snapshot = Snapshot::lazy(Arc::new(Blobs {
        repo: Mutex::new(repo.clone()),
    }));
    // (tree id, path of that tree relative to sub_path)
    let mut pending = vec![(start, String::new())];
    while let Some((tree_id, dir)) = pending.pop() {
        let tree = repo.find_tree(tree_id).with_context(|| {
            format!(
                "cannot read directory {} of commit {commit}",
                shown(&sub_path, &dir)
            )
        })?;
        let decoded = tree.decode().with_context(|| {
            format!(
                "cannot decode directory {} of commit {commit}",
                shown(&sub_path, &dir)
            )
        })?;
        for entry in decoded.entries {
            let name = std::str::from_utf8(entry.filename).with_context(|| {
                format!(
                    "{}/{}: file names must be UTF-8 (commit {commit})",
                    shown(&sub_path, &dir),
                    entry.filename
                )
            })?;
            let path = if dir.is_empty() {
                name.to_string()
            } else {
                format!("{dir}/{name}")
            };
            let oid = entry.oid.to_owned();
            match entry.mode.kind() {
                EntryKind::Tree => pending.push((oid, path)),
                kind @ (EntryKind::Blob | EntryKind::BlobExecutable) => {
                    snapshot.insert_blob(path, oid.as_bytes().to_vec(), kind == EntryKind::BlobExecutable);
                }
                EntryKind::Link => {
                    let blob = repo
                        .find_blob(oid)
                        .with_context(|| format!("cannot read symlink {} in commit {commit}", full(&sub_path, &path)))?;
                    let target = std::str::from_utf8(&blob.data)
                        .with_context(|| {
                            format!("symlink {}: link target must be UTF-8 (commit {commit})", full(&sub_path, &path))
                        })?
                        .to_string();
                    snapshot.insert_symlink(path, target);
                }
                EntryKind::Commit => bail!(
                    "{} is a git submodule (commit {commit}); submodules are not supported: vendor its files into the repository instead",
                    full(&sub_path, &path)
                ),
            }
        }
    }
    Ok(snapshot)
}

/// Reads file contents for a lazy [`Snapshot`]: only the files a sync
/// actually uses are inflated.
struct Blobs {
    repo: Mutex<gix::Repository>,
}

impl BlobSource for Blobs {
    fn read(&self, id: &[u8]) -> Result<Vec<u8>> {
        let id = gix::ObjectId::try_from(id).context("invalid object id")?;
        let repo = self
            .repo
            .lock()
            .map_err(|_| anyhow::anyhow!("the repository handle is poisoned"))?;
        let blob = repo
            .find_blob(id)
            .with_context(|| format!("cannot read object {id}"))?
            .detach();
        Ok(blob.data)
    }
}

/// Accepts `""`, `"."`, `"a/b"`, `"/a/b/"`; refuses `..` and empty
/// components in the middle.
fn normalise_sub_path(sub_path: &str) -> Result<String> {
    let trimmed = sub_path.trim_matches('/');
    if trimmed.is_empty() || trimmed == "." {
        return Ok(String::new());
    }
    let parts: Vec<&str> = trimmed.split('/').filter(|p| *p != ".").collect();
    if parts.iter().any(|p| p.is_empty() || *p == "..") {
        bail!("the configured path {sub_path:?} must be a plain relative directory inside the repository (no `..`, no `//`)");
    }
    Ok(parts.join("/"))
}

/// Repository-relative path of `rel` (relative to `sub_path`).
fn full(sub_path: &str, rel: &str) -> String {
    match (sub_path.is_empty(), rel.is_empty()) {
        (true, _) => rel.to_string(),
        (false, true) => sub_path.to_string(),
        (false, false) => format!("{sub_path}/{rel}"),
    }
}

fn shown(sub_path: &str, dir: &str) -> String {
    let p = full(sub_path, dir);
    if p.is_empty() {
        "/".to_string()
    } else {
        p
    }
}
