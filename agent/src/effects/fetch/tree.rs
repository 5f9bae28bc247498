//! Reading a commit's tree into a [`Snapshot`] without a worktree.

use anyhow::{bail, Context, Result};
use gix::objs::tree::EntryKind;

use crate::desired::snapshot::Snapshot;

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

    let mut snapshot = Snapshot::new();
    let mut blobs: Vec<(String, gix::ObjectId, bool)> = Vec::new();
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
                    blobs.push((path, oid, kind == EntryKind::BlobExecutable));
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
    for (path, bytes, executable) in read_blobs(repo, commit, &sub_path, blobs)? {
        snapshot.insert_file(path, bytes, executable);
    }
    Ok(snapshot)
}

/// Reads the blobs (one thread: gix shares one object store between
/// repository handles, and two threads reading loose objects were slower
/// than one when measured, see BENCHMARKS.md).
fn read_blobs(
    repo: &gix::Repository,
    commit: gix::ObjectId,
    sub_path: &str,
    blobs: Vec<(String, gix::ObjectId, bool)>,
) -> Result<Vec<(String, Vec<u8>, bool)>> {
    blobs
        .into_iter()
        .map(|(path, oid, executable)| {
            let blob = repo.find_blob(oid).with_context(|| {
                format!("cannot read {} in commit {commit}", full(sub_path, &path))
            })?;
            Ok((path, blob.detach().data, executable))
        })
        .collect()
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
