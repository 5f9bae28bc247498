//! An immutable, in-memory view of one commit of the config repository.
//!
//! Everything the pure core needs from the repository comes through a
//! [`Snapshot`]: the loader reads `driftless.toml`, host and role files from
//! it, the renderer reads templates and static sources from it. Keeping the
//! repository in memory means the core never touches the disk or git, so it
//! can be tested with hand-built snapshots and the same code validates a
//! working directory (`driftless validate DIR`) and a fetched commit.
//!
//! Paths are repository-relative, `/`-separated, without a leading `/`, and
//! already relative to the configured sub-path.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};

/// One entry of the repository tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A regular file (git mode 100644 or 100755).
    File { content: Content, executable: bool },
    /// A symbolic link (git mode 120000); `target` is the link text.
    Symlink { target: String },
}

/// What a path is in one tree, as far as comparing two trees needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    File,
    Symlink,
}

/// A path whose entry differs between two trees: added (`before` is
/// `None`), removed (`after` is `None`), or another content, mode or link
/// target. Directories are not entries: a directory replaced by a file
/// is each of its files removed and the file added.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Changed {
    pub path: String,
    pub before: Option<Kind>,
    pub after: Option<Kind>,
}

impl Entry {
    /// A regular file whose bytes are read from the snapshot's source
    /// (by object id `id`) when first needed.
    pub fn blob(id: Vec<u8>, executable: bool) -> Entry {
        Entry::File {
            content: Content {
                key: Some(Key::Object(id)),
                bytes: OnceLock::new(),
            },
            executable,
        }
    }

    /// A regular file of a working directory, read from the snapshot's
    /// source by `place` (its path there) when first needed. Unlike an
    /// object id, a place says nothing about the bytes: two such entries
    /// are equal only once both are read and their bytes are.
    pub fn at_place(place: Vec<u8>, executable: bool) -> Entry {
        Entry::File {
            content: Content {
                key: Some(Key::Place(place)),
                bytes: OnceLock::new(),
            },
            executable,
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Entry::File { .. } => Kind::File,
            Entry::Symlink { .. } => Kind::Symlink,
        }
    }
}

/// A file's bytes, read from the repository on first use.
///
/// A commit's tree lists every file, but most syncs need few of them:
/// repairing one drifted file, or applying a commit that changed one
/// template, reads the configuration and that template, not the thousand
/// others. The object id identifies the content without reading it.
#[derive(Debug, Clone, Default)]
pub struct Content {
    /// What the snapshot's source reads the bytes by (`None`: they were
    /// given, see [`Snapshot::insert_file`]).
    key: Option<Key>,
    bytes: OnceLock<Vec<u8>>,
}

/// How a source finds a file's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    /// A git object id: it names the content (equal ids, equal bytes).
    Object(Vec<u8>),
    /// A path in a working directory: it names only where the bytes are.
    Place(Vec<u8>),
}

impl Content {
    /// The git object id (`None` for a working directory's files).
    pub fn id(&self) -> Option<&[u8]> {
        match &self.key {
            Some(Key::Object(id)) => Some(id),
            _ => None,
        }
    }

    fn source_key(&self) -> Option<&[u8]> {
        match &self.key {
            Some(Key::Object(k) | Key::Place(k)) => Some(k),
            None => None,
        }
    }
}

impl PartialEq for Content {
    fn eq(&self, other: &Self) -> bool {
        if let (Some(a), Some(b)) = (self.id(), other.id()) {
            return a == b;
        }
        match (self.bytes.get(), other.bytes.get()) {
            (Some(a), Some(b)) => a == b,
            // A working directory's file not read yet: nothing says what
            // it holds, so it equals only itself (a shared entry of two
            // clones of one snapshot).
            _ => std::ptr::eq(self, other),
        }
    }
}

impl Eq for Content {}

/// Where a lazy snapshot reads its files from (the effects side: gix's
/// object database, or a working directory).
pub trait BlobSource: Send + Sync {
    /// The bytes `key` names (a git object id, or a place: see
    /// [`Entry::blob`] and [`Entry::at_place`]).
    fn read(&self, key: &[u8]) -> Result<Vec<u8>>;
}

/// Where a lazy snapshot finds its entries (the effects side: a commit's
/// trees in gix's object database).
pub trait TreeSource: Send + Sync {
    /// The entry at `path` (relative, normalised), without following
    /// symlinks; `None` if there is none (or a directory is there).
    fn entry(&self, path: &str) -> Result<Option<Entry>>;
    /// Every entry below `dir` (`""`: all of them), in path order.
    fn walk(&self, dir: &str) -> Result<Vec<(String, Entry)>>;
}

/// The files of one commit (or one directory), keyed by relative path.
/// Cloning is cheap: the entries are shared.
#[derive(Clone, Default)]
pub struct Snapshot {
    entries: Arc<BTreeMap<String, Entry>>,
    source: Option<Arc<dyn BlobSource>>,
    /// Set for a snapshot whose entries are read from its tree when asked
    /// for (`entries` is then empty).
    lazy: Option<Arc<Lazy>>,
    /// The failure of a lazy snapshot since made whole (see `make_whole`).
    failed: Option<Arc<str>>,
}

/// A snapshot read as it is used: most syncs of a large repository need
/// a few entries of it, not its 10,000 (issue #18).
///
/// A point lookup reads the trees on that path; a walk of a directory
/// reads that directory's tree; anything about the whole snapshot (its
/// size, whether it holds a link, a comparison) reads it all, once. What
/// each read found stays where it was put (`elsa`'s append-only maps),
/// so the references handed out live as long as the snapshot.
///
/// A read that fails (a damaged object) cannot be an error where the
/// interface has none (`entry`, `walk`): the entry reads as missing and
/// the failure is kept; [`Snapshot::failure`] tells the caller that what
/// it made from the snapshot cannot be trusted.
struct Lazy {
    tree: Box<dyn TreeSource>,
    found: elsa::sync::FrozenMap<String, Box<(String, Option<Entry>)>>,
    walked: elsa::sync::FrozenMap<String, Vec<(String, Entry)>>,
    all: OnceLock<BTreeMap<String, Entry>>,
    failure: OnceLock<String>,
}

impl Lazy {
    fn fail(&self, e: &anyhow::Error) {
        let _ = self.failure.set(format!("{e:#}"));
    }

    fn all(&self) -> &BTreeMap<String, Entry> {
        self.all.get_or_init(|| match self.tree.walk("") {
            Ok(entries) => entries.into_iter().collect(),
            Err(e) => {
                self.fail(&e);
                BTreeMap::new()
            }
        })
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("entries", self.all())
            .finish_non_exhaustive()
    }
}

impl PartialEq for Snapshot {
    fn eq(&self, other: &Self) -> bool {
        self.all() == other.all()
    }
}

impl Eq for Snapshot {}

/// How many symlinks a single lookup may traverse before it is a loop.
const MAX_SYMLINK_HOPS: usize = 16;

impl Snapshot {
    pub fn new() -> Self {
        Self::default()
    }

    /// A snapshot of `entries` (relative, normalised paths; a path given
    /// twice keeps its last entry, as inserting them one by one would)
    /// whose files are read from `source` on first use. Built in one pass
    /// from the sorted entries: inserting 10,000 paths with a long common
    /// prefix one by one searched the tree from its root each time.
    pub fn lazy_from(source: Arc<dyn BlobSource>, entries: Vec<(String, Entry)>) -> Self {
        Snapshot {
            entries: Arc::new(entries.into_iter().collect()),
            source: Some(source),
            lazy: None,
            failed: None,
        }
    }

    /// A snapshot whose entries are read from `tree` when asked for, and
    /// their bytes from `source` (see `Lazy`). Only for a tree already
    /// known to read without error: check [`Snapshot::failure`] after
    /// using it.
    pub fn lazy_tree(source: Arc<dyn BlobSource>, tree: Box<dyn TreeSource>) -> Self {
        Snapshot {
            entries: Arc::default(),
            source: Some(source),
            lazy: Some(Arc::new(Lazy {
                tree,
                found: elsa::sync::FrozenMap::new(),
                walked: elsa::sync::FrozenMap::new(),
                all: OnceLock::new(),
                failure: OnceLock::new(),
            })),
            failed: None,
        }
    }

    /// Why a lazy snapshot may have answered wrongly: the first read of
    /// its tree that failed (an entry then read as missing). `None` for
    /// every snapshot read whole.
    pub fn failure(&self) -> Option<&str> {
        match &self.lazy {
            Some(lazy) => lazy.failure.get().map(String::as_str),
            None => self.failed.as_deref(),
        }
    }

    /// Whether this is a lazy snapshot that has not read its whole tree.
    pub fn is_partly_read(&self) -> bool {
        self.lazy.as_ref().is_some_and(|l| l.all.get().is_none())
    }

    /// The whole map: a lazy snapshot reads its tree (once).
    fn all(&self) -> &BTreeMap<String, Entry> {
        match &self.lazy {
            Some(lazy) => lazy.all(),
            None => &self.entries,
        }
    }

    /// The entry at exactly `path`, with the key it is stored under.
    fn get_key_value(&self, path: &str) -> Option<(&str, &Entry)> {
        let Some(lazy) = &self.lazy else {
            return self
                .entries
                .get_key_value(path)
                .map(|(k, e)| (k.as_str(), e));
        };
        if let Some(all) = lazy.all.get() {
            return all.get_key_value(path).map(|(k, e)| (k.as_str(), e));
        }
        let found = match lazy.found.get(path) {
            Some(found) => found,
            None => {
                let entry = lazy.tree.entry(path).unwrap_or_else(|e| {
                    lazy.fail(&e);
                    None
                });
                lazy.found
                    .insert(path.to_string(), Box::new((path.to_string(), entry)))
            }
        };
        found.1.as_ref().map(|e| (found.0.as_str(), e))
    }

    /// Makes a lazy snapshot an ordinary one (before it is changed).
    fn make_whole(&mut self) {
        if let Some(lazy) = self.lazy.take() {
            self.entries = Arc::new(lazy.all().clone());
            self.failed = lazy.failure.get().map(|f| Arc::from(f.as_str()));
        }
    }

    /// Adds a regular file. `path` must be relative and normalised.
    pub fn insert_file(&mut self, path: impl Into<String>, bytes: Vec<u8>, executable: bool) {
        self.make_whole();
        let content = Content {
            key: None,
            bytes: OnceLock::from(bytes),
        };
        Arc::make_mut(&mut self.entries).insert(
            path.into(),
            Entry::File {
                content,
                executable,
            },
        );
    }

    /// Adds a symbolic link with the given link text.
    pub fn insert_symlink(&mut self, path: impl Into<String>, target: impl Into<String>) {
        self.make_whole();
        Arc::make_mut(&mut self.entries).insert(
            path.into(),
            Entry::Symlink {
                target: target.into(),
            },
        );
    }

    /// Whether any entry is a symbolic link.
    pub fn has_symlinks(&self) -> bool {
        self.all()
            .values()
            .any(|e| matches!(e, Entry::Symlink { .. }))
    }

    pub fn len(&self) -> usize {
        self.all().len()
    }

    pub fn is_empty(&self) -> bool {
        self.all().is_empty()
    }

    /// The raw entry at `path`, without following symlinks.
    pub fn entry(&self, path: &str) -> Option<&Entry> {
        self.get_key_value(path).map(|(_, e)| e)
    }

    /// True if `path` names a file or symlink in the snapshot.
    pub fn contains(&self, path: &str) -> bool {
        self.get_key_value(path).is_some()
    }

    /// Reads the file at `path`, following symlinks that stay inside the
    /// repository. `Ok(None)` if nothing is there; an error if a symlink
    /// escapes the repository, dangles, or loops.
    pub fn read(&self, path: &str) -> Result<Option<&[u8]>> {
        match self.resolve(path)? {
            Some((at, content)) => self.load(at, content).map(Some),
            None => Ok(None),
        }
    }

    /// [`Snapshot::read`] without keeping what it read: bytes already
    /// read are borrowed, others are read from the source and handed
    /// over. For what is read once and copied anyway (a template's text,
    /// a `source =` file's bytes): a cold sync of 10,000 templates kept
    /// every template's bytes in the snapshot to the end, next to their
    /// copies.
    pub fn read_uncached(&self, path: &str) -> Result<Option<std::borrow::Cow<'_, [u8]>>> {
        let Some((at, content)) = self.resolve(path)? else {
            return Ok(None);
        };
        if let Some(bytes) = content.bytes.get() {
            return Ok(Some(std::borrow::Cow::Borrowed(bytes)));
        }
        let (Some(source), Some(key)) = (&self.source, content.source_key()) else {
            bail!("{at}: the file's content is not available");
        };
        let bytes = source
            .read(key)
            .with_context(|| format!("cannot read {at} from the repository"))?;
        Ok(Some(std::borrow::Cow::Owned(bytes)))
    }

    /// Follows symlinks like [`Snapshot::read`] and says whether a file is
    /// there, without reading it.
    pub fn file_exists(&self, path: &str) -> Result<bool> {
        Ok(self.resolve(path)?.is_some())
    }

    fn resolve(&self, path: &str) -> Result<Option<(&str, &Content)>> {
        // Borrowed until a symlink is followed: most lookups are direct.
        let mut current = std::borrow::Cow::Borrowed(path);
        for _ in 0..MAX_SYMLINK_HOPS {
            match self.get_key_value(current.as_ref()) {
                None => {
                    if current.as_ref() == path {
                        return Ok(None);
                    }
                    bail!("{path}: symlink points to {current}, which does not exist in the repository");
                }
                Some((at, Entry::File { content, .. })) => return Ok(Some((at, content))),
                Some((_, Entry::Symlink { target })) => {
                    current = std::borrow::Cow::Owned(resolve_link(&current, target).with_context(|| {
                        format!("{path}: symlink target {target:?} leaves the repository; only links inside the repository are followed")
                    })?);
                }
            }
        }
        bail!("{path}: too many levels of symbolic links (a loop?)")
    }

    /// The bytes of a file entry, read from the source on first use.
    fn load<'a>(&'a self, path: &str, content: &'a Content) -> Result<&'a [u8]> {
        if let Some(bytes) = content.bytes.get() {
            return Ok(bytes);
        }
        let (Some(source), Some(id)) = (&self.source, content.source_key()) else {
            bail!("{path}: the file's content is not available");
        };
        let bytes = source
            .read(id)
            .with_context(|| format!("cannot read {path} from the repository"))?;
        Ok(content.bytes.get_or_init(move || bytes))
    }

    /// The bytes of the file entry at exactly `path` (no symlink
    /// following); `Ok(None)` if it is not a regular file.
    pub fn read_file(&self, path: &str) -> Result<Option<&[u8]>> {
        match self.entry(path) {
            Some(Entry::File { content, .. }) => self.load(path, content).map(Some),
            _ => Ok(None),
        }
    }

    /// The entries that differ between `self` (before) and `other`
    /// (after), in path order. Compares object ids, so nothing is read.
    /// (A sync compares two commits' trees without reading them whole:
    /// `effects::fetch::tree_changes`; this is its reference.)
    pub fn changes(&self, other: &Snapshot) -> Vec<Changed> {
        let kind = |s: &Snapshot, p: &str| s.all().get(p).map(Entry::kind);
        self.changed_paths(other)
            .into_iter()
            .map(|path| Changed {
                before: kind(self, &path),
                after: kind(other, &path),
                path,
            })
            .collect()
    }

    /// The paths whose entry differs between `self` and `other` (added,
    /// removed, or different content or link), in order. Compares object
    /// ids, so nothing is read.
    pub fn changed_paths(&self, other: &Snapshot) -> Vec<String> {
        let mut out = Vec::new();
        let (mut a, mut b) = (self.all().iter().peekable(), other.all().iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some((pa, _)), None) => {
                    out.push(pa.to_string());
                    a.next();
                }
                (None, Some((pb, _))) => {
                    out.push(pb.to_string());
                    b.next();
                }
                (Some((pa, ea)), Some((pb, eb))) => match pa.cmp(pb) {
                    std::cmp::Ordering::Less => {
                        out.push(pa.to_string());
                        a.next();
                    }
                    std::cmp::Ordering::Greater => {
                        out.push(pb.to_string());
                        b.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if ea != eb {
                            out.push(pa.to_string());
                        }
                        a.next();
                        b.next();
                    }
                },
            }
        }
        out
    }

    /// All entries whose path starts with `dir/` (recursively), in order.
    pub fn walk<'a>(&'a self, dir: &str) -> Box<dyn Iterator<Item = (&'a str, &'a Entry)> + 'a> {
        let dir = dir.trim_end_matches('/');
        // (A lazy walk of everything reads the whole tree once, as `all`.)
        if let Some(lazy) = self
            .lazy
            .as_ref()
            .filter(|l| l.all.get().is_none() && !dir.is_empty())
        {
            let walked = match lazy.walked.get(dir) {
                Some(walked) => walked,
                None => {
                    let entries = lazy.tree.walk(dir).unwrap_or_else(|e| {
                        lazy.fail(&e);
                        Vec::new()
                    });
                    lazy.walked.insert(dir.to_string(), entries)
                }
            };
            return Box::new(walked.iter().map(|(k, v)| (k.as_str(), v)));
        }
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        Box::new(
            self.all()
                .range(prefix.clone()..)
                .take_while(move |(k, _)| k.starts_with(&prefix))
                .map(|(k, v)| (k.as_str(), v)),
        )
    }
}

/// Resolves a symlink's text relative to the link's directory, refusing
/// absolute targets and anything that climbs above the repository root.
fn resolve_link(link_path: &str, target: &str) -> Result<String> {
    if target.starts_with('/') {
        bail!("absolute symlink target");
    }
    let mut parts: Vec<&str> = link_path.split('/').collect();
    parts.pop(); // the link's own name
    for comp in target.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    bail!("symlink climbs above the repository root");
                }
            }
            other => parts.push(other),
        }
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlink_inside_repo_is_followed() {
        let mut s = Snapshot::new();
        s.insert_file("roles/a/files/real", b"x".to_vec(), false);
        s.insert_symlink("roles/a/files/link", "real");
        s.insert_symlink("roles/b/files/up", "../../a/files/real");
        assert_eq!(s.read("roles/a/files/link").unwrap(), Some(&b"x"[..]));
        assert_eq!(s.read("roles/b/files/up").unwrap(), Some(&b"x"[..]));
    }

    #[test]
    fn symlink_escaping_repo_is_refused() {
        let mut s = Snapshot::new();
        s.insert_symlink("a", "../../etc/shadow");
        s.insert_symlink("b", "/etc/shadow");
        let err = format!("{:#}", s.read("a").unwrap_err());
        assert!(err.contains("leaves the repository"), "{err}");
        assert!(s.read("b").is_err());
    }

    #[test]
    fn symlink_loop_is_an_error() {
        let mut s = Snapshot::new();
        s.insert_symlink("a", "b");
        s.insert_symlink("b", "a");
        let err = format!("{:#}", s.read("a").unwrap_err());
        assert!(err.contains("too many levels"), "{err}");
    }

    #[test]
    fn walk_lists_only_the_subtree() {
        let mut s = Snapshot::new();
        s.insert_file("roles/a/x", vec![], false);
        s.insert_file("roles/a/y/z", vec![], false);
        s.insert_file("roles/ab", vec![], false);
        let got: Vec<_> = s.walk("roles/a").map(|(p, _)| p).collect();
        assert_eq!(got, vec!["roles/a/x", "roles/a/y/z"]);
    }
}
