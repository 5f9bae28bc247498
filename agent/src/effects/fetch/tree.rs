//! Reading a commit's tree into a [`Snapshot`] without a worktree.

use anyhow::{bail, Context, Result};
use gix::objs::tree::EntryKind;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::desired::snapshot::{Changed, Entry, Kind, Snapshot, TreeSource};

/// The tree of `commit` at `sub_path` (normalised).
fn start(repo: &gix::Repository, commit: gix::ObjectId, sub_path: &str) -> Result<gix::ObjectId> {
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
            .lookup_entry_by_path(sub_path)
            .with_context(|| format!("cannot look up {sub_path:?} in commit {commit}"))?
            .with_context(|| {
                format!("the configured path {sub_path:?} does not exist in commit {commit}: check `path` (relative to the repository root)")
            })?;
        if !entry.mode().is_tree() {
            bail!("the configured path {sub_path:?} is not a directory in commit {commit}: check `path`");
        }
        entry.object_id()
    };
    Ok(start)
}

pub(super) fn read(
    repo: &gix::Repository,
    commit: gix::ObjectId,
    sub_path: &str,
    max_file: u64,
) -> Result<Snapshot> {
    read_at_most(repo, commit, sub_path, max_file, MAX_ENTRIES)
}

/// [`read`] holding at most `max_entries` files and symlinks.
pub(super) fn read_at_most(
    repo: &gix::Repository,
    commit: gix::ObjectId,
    sub_path: &str,
    max_file: u64,
    max_entries: usize,
) -> Result<Snapshot> {
    let sub_path = normalise_sub_path(sub_path)?;
    let start = start(repo, commit, sub_path.as_str())?;
    let entries = read_below(repo, commit, &sub_path, start, String::new(), max_entries)?;
    let source = Arc::new(super::blobs::Blobs::new(repo, max_file));
    Ok(Snapshot::lazy_from(source, entries))
}

/// The files and links below tree `start` (the directory `dir`, relative
/// to `sub_path`), at most `max_entries` of them, every tree on the way
/// checked (see [`items`]).
fn read_below(
    repo: &gix::Repository,
    commit: gix::ObjectId,
    sub_path: &str,
    start: gix::ObjectId,
    dir: String,
    max_entries: usize,
) -> Result<Vec<(String, Entry)>> {
    let mut entries = Vec::new();
    // (tree id, path of that tree relative to sub_path)
    let mut pending = vec![(start, dir)];
    while let Some((tree_id, dir)) = pending.pop() {
        let tree = find_tree(repo, tree_id).with_context(|| {
            format!(
                "cannot read directory {} of commit {commit}",
                shown(sub_path, &dir)
            )
        })?;
        let items = items(&tree, repo.object_hash())
            .with_context(|| format!("directory {} of commit {commit}", shown(sub_path, &dir)))?;
        for entry in items {
            let name = std::str::from_utf8(entry.name).with_context(|| {
                format!(
                    "{}/{}: file names must be UTF-8 (commit {commit})",
                    shown(sub_path, &dir),
                    String::from_utf8_lossy(entry.name)
                )
            })?;
            let path = if dir.is_empty() {
                name.to_string()
            } else {
                // Not `format!`: its machinery was a third of reading a
                // 10,000-entry tree.
                let mut p = String::with_capacity(dir.len() + 1 + name.len());
                p.push_str(&dir);
                p.push('/');
                p.push_str(name);
                p
            };
            let oid = entry.oid.to_owned();
            match entry.kind {
                EntryKind::Tree => pending.push((oid, path)),
                _ if entries.len() >= max_entries => bail!(
                    "commit {commit} has more than {max_entries} files below {}: driftless reads configuration repositories, not data; set `path` to the configuration's directory",
                    shown(sub_path, "")
                ),
                kind => {
                    let entry = leaf(repo, commit, sub_path, kind, oid, &path)?;
                    entries.push((path, entry));
                }
            }
        }
    }
    Ok(entries)
}

/// The snapshot entry of a file or link of the tree (`path`, relative to
/// `sub_path`, for messages): a file's bytes are read when used, a link's
/// target now.
fn leaf(
    repo: &gix::Repository,
    commit: gix::ObjectId,
    sub_path: &str,
    kind: EntryKind,
    oid: gix::ObjectId,
    path: &str,
) -> Result<Entry> {
    match kind {
        EntryKind::Blob | EntryKind::BlobExecutable => Ok(Entry::blob(
            oid.as_bytes().to_vec(),
            kind == EntryKind::BlobExecutable,
        )),
        EntryKind::Link => {
            let size = repo.find_header(oid).map_or(0, |h| h.size());
            if size > MAX_LINK_TARGET {
                bail!(
                    "symlink {} in commit {commit}: its target is {size} bytes, longer than a path can be ({MAX_LINK_TARGET})",
                    full(sub_path, path)
                );
            }
            let blob = repo
                .find_blob(oid)
                .with_context(|| format!("cannot read symlink {} in commit {commit}", full(sub_path, path)))?;
            let target = std::str::from_utf8(&blob.data)
                .with_context(|| {
                    format!("symlink {}: link target must be UTF-8 (commit {commit})", full(sub_path, path))
                })?
                .to_string();
            Ok(Entry::Symlink { target })
        }
        EntryKind::Commit => bail!(
            "{} is a git submodule (commit {commit}); submodules are not supported: vendor its files into the repository instead",
            full(sub_path, path)
        ),
        EntryKind::Tree => bail!("{} is a directory, not a file", full(sub_path, path)),
    }
}

/// A commit's tree read as a [`Snapshot`] is used (see
/// `Snapshot::lazy_tree`): a lookup reads the trees on its path (not
/// checked again: see [`LazyTree::find`]), a walk the directory's trees,
/// checked as the whole read checks them.
pub(super) struct LazyTree {
    commit: gix::ObjectId,
    sub_path: String,
    start: gix::ObjectId,
    /// One lookup or walk at a time: gix's handle is not shared between
    /// threads, and the trees read so far belong with it.
    reader: Mutex<Reader>,
}

struct Reader {
    repo: gix::Repository,
    /// Each tree read so far: a sync looks up a few entries of one
    /// directory of 10,000, or (a changed partial included everywhere)
    /// each of them.
    listings: HashMap<gix::ObjectId, Listing>,
}

/// A tree object's data, and an index of it by name once it is asked
/// for more than a few names: scanning 10,000 entries for each of 10,000
/// lookups would take seconds, while indexing costs a millisecond that a
/// lookup or two should not pay.
struct Listing {
    data: Vec<u8>,
    lookups: usize,
    index: Option<HashMap<Box<[u8]>, Found>>,
}

/// What a tree holds under a name: a tree's id, or a leaf's kind and id.
type Found = (EntryKind, gix::ObjectId);

/// Lookups of one tree answered by scanning it before it is indexed.
const SCANS_BEFORE_INDEX: usize = 4;

impl Listing {
    /// A tree object's data, not yet looked up in.
    fn new(data: Vec<u8>) -> Self {
        Listing {
            data,
            lookups: 0,
            index: None,
        }
    }

    fn get(&mut self, name: &[u8], hash: gix::hash::Kind) -> Result<Option<Found>> {
        let entries = || gix::objs::TreeRefIter::from_bytes(&self.data, hash);
        if self.index.is_none() && self.lookups >= SCANS_BEFORE_INDEX {
            let mut index = HashMap::new();
            for entry in entries() {
                let entry = entry?;
                index
                    .entry(Box::from(entry.filename.as_ref()))
                    .or_insert((entry.mode.kind(), entry.oid.to_owned()));
            }
            self.index = Some(index);
        }
        self.lookups += 1;
        if let Some(index) = &self.index {
            return Ok(index.get(name).copied());
        }
        for entry in entries() {
            let entry = entry?;
            if entry.filename == name {
                return Ok(Some((entry.mode.kind(), entry.oid.to_owned())));
            }
        }
        Ok(None)
    }
}

/// [`read`], lazily: for a commit known to read whole without error.
pub(super) fn read_lazily(
    repo: &gix::Repository,
    commit: gix::ObjectId,
    sub_path: &str,
    max_file: u64,
    known: Vec<(gix::ObjectId, Vec<u8>)>,
) -> Result<Snapshot> {
    let sub_path = normalise_sub_path(sub_path)?;
    let start = start(repo, commit, sub_path.as_str())?;
    let source = Arc::new(super::blobs::Blobs::new(repo, max_file));
    let tree = LazyTree {
        commit,
        sub_path,
        start,
        reader: Mutex::new(Reader {
            repo: repo.clone(),
            listings: known
                .into_iter()
                .map(|(id, data)| (id, Listing::new(data)))
                .collect(),
        }),
    };
    Ok(Snapshot::lazy_tree(source, Box::new(tree)))
}

impl LazyTree {
    fn reader(&self) -> Result<std::sync::MutexGuard<'_, Reader>> {
        self.reader
            .lock()
            .map_err(|_| anyhow::anyhow!("a reader of the tree panicked"))
    }

    /// What is at `path`: a tree's id, or a leaf's kind and id; `None`
    /// if nothing is.
    ///
    /// The trees on the way are not checked again as a whole read checks
    /// a tree ([`items`]): every tree of a commit read this way was
    /// checked before, by the sync that read the recorded commit (whole,
    /// or by this same argument), or by the comparison that found it
    /// changed since (see `sync::run::lazy_tree`). What such a check
    /// refuses (a name twice, a `/` in a name) would have refused the
    /// commit then.
    fn find(&self, reader: &mut Reader, path: &str) -> Result<Option<Found>> {
        let Reader { repo, listings } = reader;
        let mut at = (EntryKind::Tree, self.start);
        let mut dir = String::new();
        for name in path.split('/').filter(|_| !path.is_empty()) {
            if at.0 != EntryKind::Tree {
                return Ok(None);
            }
            let shown = || shown(&self.sub_path, &dir);
            let listing = match listings.entry(at.1) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let tree = find_tree(repo, at.1).with_context(|| {
                        format!(
                            "cannot read directory {} of commit {}",
                            shown(),
                            self.commit
                        )
                    })?;
                    e.insert(Listing::new(tree.detach().data))
                }
            };
            let found = listing
                .get(name.as_bytes(), repo.object_hash())
                .with_context(|| {
                    format!(
                        "cannot decode directory {} of commit {}",
                        shown(),
                        self.commit
                    )
                })?;
            let Some(found) = found else {
                return Ok(None);
            };
            at = found;
            if !dir.is_empty() {
                dir.push('/');
            }
            dir.push_str(name);
        }
        Ok(Some(at))
    }
}

impl TreeSource for LazyTree {
    fn entry(&self, path: &str) -> Result<Option<Entry>> {
        let mut reader = self.reader()?;
        match self.find(&mut reader, path)? {
            None | Some((EntryKind::Tree, _)) => Ok(None),
            Some((kind, oid)) => {
                leaf(&reader.repo, self.commit, &self.sub_path, kind, oid, path).map(Some)
            }
        }
    }

    fn walk(&self, dir: &str) -> Result<Vec<(String, Entry)>> {
        let mut reader = self.reader()?;
        let Some((EntryKind::Tree, id)) = self.find(&mut reader, dir)? else {
            return Ok(Vec::new());
        };
        let mut entries = read_below(
            &reader.repo,
            self.commit,
            &self.sub_path,
            id,
            dir.to_string(),
            MAX_ENTRIES,
        )?;
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(entries)
    }
}

/// The entries that differ between the trees of `before` and `after` below
/// `sub_path`: what [`Snapshot::changes`] says of their snapshots, found
/// without reading either tree whole. Equal subtrees (the same object id)
/// are skipped, so a commit that changed one file of 10,000 reads the
/// trees on that file's path, not 10,000 entries twice.
///
/// Entries are merged in git's tree order (a directory sorts as if its
/// name ended in `/`); a tree whose entries are out of that order (only a
/// hand-crafted object has them) is an error rather than a wrong answer,
/// as is a submodule.
pub(super) fn changes(
    repo: &gix::Repository,
    before: gix::ObjectId,
    after: gix::ObjectId,
    sub_path: &str,
) -> Result<super::TreeChanges> {
    let sub_path = normalise_sub_path(sub_path)?;
    let a = start(repo, before, &sub_path)?;
    let b = start(repo, after, &sub_path)?;
    let mut out = super::TreeChanges::default();
    diff(repo, Some(a), Some(b), "", 0, &mut out)?;
    out.changed.sort();
    Ok(out)
}

/// The largest tree object read (a directory of about a million
/// entries): a hostile commit's tree is refused by the size in its
/// header, before it is inflated.
const MAX_TREE_BYTES: u64 = 32 << 20;

/// The most files (and symlinks) a snapshot holds.
pub const MAX_ENTRIES: usize = 1_000_000;

fn find_tree(repo: &gix::Repository, id: gix::ObjectId) -> Result<gix::Tree<'_>> {
    let size = repo.find_header(id)?.size();
    if size > MAX_TREE_BYTES {
        bail!(
            "its tree object is {size} bytes, more than the {} a directory of a configuration repository may take",
            crate::desired::guard::size_str(MAX_TREE_BYTES)
        );
    }
    Ok(repo.find_tree(id)?)
}

/// How deep [`changes`] follows nested directories (it recurses; a tree
/// crafted ten thousand levels deep must not overflow the stack). Deeper
/// is an error, and the caller reads the trees whole, iteratively.
const MAX_DEPTH: usize = 256;

/// One tree entry as the merge needs it.
struct Item<'a> {
    name: &'a [u8],
    tree: bool,
    kind: EntryKind,
    oid: &'a gix::oid,
}

/// A tree's entries, checked for what `git fsck` refuses and git never
/// writes (not its NTFS/HFS spellings of `.git`: tree names here are keys
/// of the repository's snapshot, never paths on the host): a hand-crafted
/// object (a hostile repository; a fetch does not run fsck) must not turn
/// into paths git itself could never check out.
///
/// Refused: a name that is empty, `.`, `..`, `.git` in any case, or holds
/// a `/` (then `a/b` or `files/../role.toml` would be one entry); entries
/// out of git's order, a name twice, or a file and a directory of one
/// name. Git writes none of these; each would make a path mean two
/// things, or let the comparison of two commits and the whole read of one
/// see different trees.
fn items<'a>(tree: &'a gix::Tree<'_>, hash: gix::hash::Kind) -> Result<Vec<Item<'a>>> {
    let decoded = gix::objs::TreeRefIter::from_bytes(&tree.data, hash);
    let mut out: Vec<Item<'_>> = Vec::new();
    for entry in decoded {
        let entry = entry.context("cannot decode a tree")?;
        let item = Item {
            name: entry.filename.as_ref(),
            tree: entry.mode.is_tree(),
            kind: entry.mode.kind(),
            oid: entry.oid,
        };
        let name = item.name;
        let bad = |why: &str| {
            anyhow::anyhow!(
                "entry {:?} {why}; git never writes this (a hand-crafted object? `git fsck` names it)",
                String::from_utf8_lossy(name)
            )
        };
        if name.is_empty() || name == b"." || name == b".." {
            return Err(bad("is not a file name"));
        }
        if memchr::memchr(b'/', name).is_some() {
            return Err(bad("holds a `/`"));
        }
        if name.eq_ignore_ascii_case(b".git") {
            return Err(bad("is git's own directory"));
        }
        if let Some(prev) = out.last() {
            if git_order(prev, &item) != std::cmp::Ordering::Less {
                return Err(bad(if prev.name != name {
                    "is out of git's order"
                } else if prev.tree != item.tree {
                    "is both a file and a directory"
                } else {
                    "appears twice"
                }));
            }
        }
        if item.tree {
            // A file of the same name sorts before the directory, with at
            // most names continuing it with a byte below `/` between.
            for prev in out.iter().rev() {
                match prev.name.strip_prefix(name) {
                    Some([]) => return Err(bad("is both a file and a directory")),
                    Some([next, ..]) if *next < b'/' => continue,
                    _ => break,
                }
            }
        }
        out.push(item);
    }
    Ok(out)
}

/// Git's tree order: names compared bytewise, a tree's as if followed by `/`.
///
/// The common length is compared as slices (`memcmp`); only what is left
/// (at most one name's tail, and the `/`s) byte by byte: comparing whole
/// names through iterators was half of comparing two 10,000-entry trees.
fn git_order(a: &Item<'_>, b: &Item<'_>) -> std::cmp::Ordering {
    let n = a.name.len().min(b.name.len());
    a.name[..n].cmp(&b.name[..n]).then_with(|| {
        fn rest<'a>(i: &Item<'a>, n: usize) -> impl Iterator<Item = u8> + 'a {
            i.name[n..].iter().copied().chain(i.tree.then_some(b'/'))
        }
        rest(a, n).cmp(rest(b, n))
    })
}

fn leaf_kind(kind: EntryKind, path: &str) -> Result<Kind> {
    match kind {
        EntryKind::Blob | EntryKind::BlobExecutable => Ok(Kind::File),
        EntryKind::Link => Ok(Kind::Symlink),
        EntryKind::Commit => bail!("{path} is a git submodule"),
        EntryKind::Tree => bail!("{path} is a tree where a file was expected"),
    }
}

/// Appends the changed leaves below `dir` between trees `a` and `b` (`None`:
/// the directory does not exist on that side).
fn diff(
    repo: &gix::Repository,
    a: Option<gix::ObjectId>,
    b: Option<gix::ObjectId>,
    dir: &str,
    depth: usize,
    out: &mut super::TreeChanges,
) -> Result<()> {
    if depth > MAX_DEPTH {
        bail!("{dir}: directories nested deeper than {MAX_DEPTH} levels");
    }
    let find = |id: Option<gix::ObjectId>| -> Result<Option<gix::Tree<'_>>> {
        id.map(|id| find_tree(repo, id).with_context(|| format!("cannot read directory {dir:?}")))
            .transpose()
    };
    let (ta, tb) = (find(a)?, find(b)?);
    let hash = repo.object_hash();
    let shown = if dir.is_empty() { "the top" } else { dir };
    let ia = ta
        .as_ref()
        .map(|t| items(t, hash))
        .transpose()
        .with_context(|| format!("directory {shown} of the applied commit"))?
        .unwrap_or_default();
    let ib = tb
        .as_ref()
        .map(|t| items(t, hash))
        .transpose()
        .with_context(|| format!("directory {shown} of the new commit"))?
        .unwrap_or_default();
    let path_of = |name: &[u8]| -> Result<String> {
        let name = std::str::from_utf8(name).with_context(|| {
            format!(
                "directory {shown}: file name {:?} is not UTF-8",
                String::from_utf8_lossy(name)
            )
        })?;
        Ok(if dir.is_empty() {
            name.to_string()
        } else {
            format!("{dir}/{name}")
        })
    };
    let (mut x, mut y) = (ia.iter().peekable(), ib.iter().peekable());
    loop {
        let order = match (x.peek(), y.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(p), Some(q)) => git_order(p, q),
        };
        let (l, r) = match order {
            std::cmp::Ordering::Less => (x.next(), None),
            std::cmp::Ordering::Greater => (None, y.next()),
            std::cmp::Ordering::Equal => {
                let (l, r) = (x.next(), y.next());
                if let (Some(l), Some(r)) = (l, r) {
                    if l.oid == r.oid && l.kind == r.kind {
                        continue;
                    }
                }
                (l, r)
            }
        };
        let Some(name) = l.or(r).map(|i| i.name) else {
            break;
        };
        let path = path_of(name)?;
        if l.or(r).is_some_and(|i| i.tree) {
            diff(
                repo,
                l.map(|i| i.oid.to_owned()),
                r.map(|i| i.oid.to_owned()),
                &path,
                depth + 1,
                out,
            )?;
        } else {
            out.changed.push(Changed {
                before: l.map(|i| leaf_kind(i.kind, &path)).transpose()?,
                after: r.map(|i| leaf_kind(i.kind, &path)).transpose()?,
                path,
            });
        }
    }
    // The new commit's tree, checked above (`items`): a lazy read of that
    // commit need not read it again.
    drop((ia, ib));
    if let Some(tree) = tb {
        let tree = tree.detach();
        out.trees.push((tree.id, tree.data));
    }
    Ok(())
}

/// The longest symlink target read from a tree (Linux's `PATH_MAX`).
const MAX_LINK_TARGET: u64 = 4096;

/// Accepts `""`, `"."`, `"a/b"`, `"/a/b/"`; refuses `..` and empty
/// components in the middle.
pub(super) fn normalise_sub_path(sub_path: &str) -> Result<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Git's order as first written: whole keys compared through iterators.
    fn git_order_reference(a: &Item<'_>, b: &Item<'_>) -> std::cmp::Ordering {
        fn key<'a>(i: &Item<'a>) -> impl Iterator<Item = &'a u8> {
            i.name.iter().chain(i.tree.then_some(&b'/'))
        }
        key(a).cmp(key(b))
    }

    #[test]
    fn git_order_orders_every_pair_of_short_names_as_the_reference_does() {
        // Every name of up to 3 bytes from those that matter around `/`
        // (one below, `/` itself, one above, and a high byte), as a tree
        // and as a file.
        let bytes = [b'.', b'/', b'0', b'a', 0xff];
        let mut names: Vec<Vec<u8>> = vec![Vec::new()];
        for len in 1..=3 {
            let mut more = Vec::new();
            for n in names.iter().filter(|n| n.len() == len - 1) {
                for b in bytes {
                    let mut m = n.clone();
                    m.push(b);
                    more.push(m);
                }
            }
            names.extend(more);
        }
        let oid = gix::ObjectId::null(gix::hash::Kind::Sha1);
        let items: Vec<Item<'_>> = names
            .iter()
            .flat_map(|n| {
                [true, false].map(|tree| Item {
                    name: n,
                    tree,
                    kind: if tree {
                        EntryKind::Tree
                    } else {
                        EntryKind::Blob
                    },
                    oid: &oid,
                })
            })
            .collect();
        for a in &items {
            for b in &items {
                assert_eq!(
                    git_order(a, b),
                    git_order_reference(a, b),
                    "{:?}/{} vs {:?}/{}",
                    a.name,
                    a.tree,
                    b.name,
                    b.tree
                );
            }
        }
        assert!(items.len() > 300);
    }
}
