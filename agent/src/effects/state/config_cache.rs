//! `config.cache`: the host's loaded configuration, kept so that a sync
//! which provably loads the same configuration again does not parse it
//! again.
//!
//! Why: at 10,000 managed files, loading (parsing the role file of 10,000
//! `[[files]]` tables and checking each entry) is the largest cost left in
//! a sync that repairs one drifted file or applies a commit that changed
//! one template: ~40 ms, where decoding this file costs a few (issue #18).
//!
//! When it is used, and why that is sound: the quick-check record names
//! the cache (by a name made unique when it was encoded) that holds the configuration of
//! the commit it records, A. The caller (`sync::repair`) uses it only when
//! the commit to apply, B, is A, or differs from A in nothing but the
//! content of files under `roles/<role>/files/` that exist, as regular
//! files, in both. Loading reads only `driftless.toml`, the host files and
//! `roles/<role>/role.toml` (never a file under `files/`), and otherwise
//! asks only whether paths exist; both answers are the same for A and B,
//! so B's configuration is A's.
//!
//! The key binds it to what loading depends on besides the repository:
//! the host name, the load options (allowed roots, reserved paths) and
//! this very binary (its version, and the identity of its executable
//! file, so that a rebuilt agent never reads a cache an older build
//! wrote). Anything unexpected (another key, a checksum that does not
//! match, data that does not decode, a path that fails the target checks)
//! is a miss: the configuration is loaded from the repository, as without
//! a cache.
//!
//! Only the file declarations a sync needs are read: after the
//! configuration comes an index, one fixed-size record per declaration
//! (a hash of its target path and of its own source in the repository,
//! the length of its line and the line's checksum), then the
//! declarations, one line each, prefixed with that path and source. The
//! caller names the paths and sources it needs (the drifted files, the
//! ones whose template changed); the index says which lines may be those,
//! and only they are read (`pread`), checked against their checksum and
//! decoded. At 10,000 files a one-file sync read all 2.3 MB, checksummed
//! and split it (2.2 ms); it now reads the head and the 160 KB index. That
//! the cached declarations are exactly the files the quick record holds
//! is checked with a digest of their sorted paths, kept in the header.
//!
//! It is a cache, so it is written without fsync: a torn or old file is a
//! miss. The header's checksum covers the configuration and the index,
//! each line's record its line, and the file must be exactly as long as
//! the index says. (A line that is not read is not checked: nothing of it
//! is used.) It holds what the repository says (variables, hook
//! environments) and never a decrypted secret: SOPS files are decrypted when rendered.
//! Like every state file it is 0600 in a 0700 directory. Its paths pass
//! the same target checks as loaded ones, but nothing else loading checks
//! is checked again (unit names, hooks, directory modes, the rules between
//! entries): a forged cache, with a forged `quick.json` naming it, can
//! declare what the repository does not. The cache is only as trustworthy
//! as the state directory, which is why the agent refuses a state
//! directory that anyone but its own user can write (`StateDir::open`).

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::FileExt;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::StateDir;
use crate::desired::load::{FileDecl, HostConfig, LoadOptions};
use crate::desired::spec::TargetPath;
use crate::desired::targets::Targets;

const FILE: &str = "config.cache";
/// A larger file is a miss, never read (10,000 declarations take 1.7 MB):
/// a damaged or sparse file must not cost an allocation of its size.
const MAX_BYTES: u64 = 256 << 20;
const MAGIC: &str = "driftless-config 4";
/// The bytes of one index record: the path's hash, the source's hash, the
/// line's length and its checksum, each a little-endian `u32`.
const RECORD: usize = 16;
/// The first read: the magic line, the header and, for most hosts, the
/// configuration and the index too.
const HEAD_READ: u64 = 64 << 10;
/// More wanted lines than this are read with the whole of the lines,
/// in one read, rather than one `pread` each.
const LINE_READS: usize = 64;

/// What the cached configuration depends on besides the repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key(String);

impl Key {
    /// The key for loading `host` with `opts` by this binary; `None` when
    /// the binary cannot be identified (then nothing is cached).
    pub fn new(host: &str, opts: &LoadOptions) -> Option<Key> {
        let exe = std::fs::metadata("/proc/self/exe").ok()?;
        Some(Key::of(host, opts, &executable_identity(&exe)))
    }

    fn of(host: &str, opts: &LoadOptions, binary: &str) -> Key {
        let text = format!(
            "{}\n{binary}\n{host:?}\n{:?}\n{:?}",
            env!("CARGO_PKG_VERSION"),
            opts.allowed_roots,
            opts.reserved
        );
        Key(hex::encode(sha2::Sha256::digest(text.as_bytes())))
    }
}

fn executable_identity(m: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "{} {} {} {}.{} {}.{}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    )
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    /// The CRC-32 of the fields below, the configuration's line and the
    /// index ([`checksum`]): a torn or damaged file is a miss. (Not a
    /// sha256: it guards against no forger, since whoever can write the
    /// cache can write the record that names it.)
    crc32: u32,
    key: String,
    /// The cache's name in the quick record: unique to this encoding, so a
    /// cache written for another commit (with a record naming it lost in
    /// a crash) is never taken for the one the record names.
    name: String,
    /// The bytes of the configuration's line, its line break included.
    config: u64,
    /// How many file declarations (index records, lines) follow it.
    files: usize,
    /// [`paths_digest`] of their target paths.
    paths: String,
}

/// One declaration's index record.
#[derive(Debug, Clone, Copy)]
struct Record {
    path: u32,
    source: u32,
    len: u32,
    crc32: u32,
}

impl Record {
    fn of(path: &str, source: Option<&str>, line: &[u8]) -> Result<Record> {
        Ok(Record {
            path: hash(Some(path)),
            source: hash(source),
            len: u32::try_from(line.len()).context("a declaration of more than 4 GB")?,
            crc32: crc32fast::hash(line),
        })
    }

    fn write(&self, out: &mut Vec<u8>) {
        for n in [self.path, self.source, self.len, self.crc32] {
            out.extend_from_slice(&n.to_le_bytes());
        }
    }

    fn read(bytes: &[u8]) -> Record {
        let n = |i: usize| {
            let mut b = [0; 4];
            b.copy_from_slice(&bytes[4 * i..4 * i + 4]);
            u32::from_le_bytes(b)
        };
        Record {
            path: n(0),
            source: n(1),
            len: n(2),
            crc32: n(3),
        }
    }
}

/// The index's hash of a path or source (`None`: no source). Only a
/// filter: a line it lets through is read and selected by its own prefix,
/// so a collision costs one more line read, never a wrong declaration.
fn hash(text: Option<&str>) -> u32 {
    text.map_or(0, |t| crc32fast::hash(t.as_bytes()))
}

/// The file declarations a caller needs.
pub struct Want<'a> {
    /// [`paths_digest`] of the files the caller holds as declared (the
    /// quick record's): a cache that declares others is a miss.
    pub declared: String,
    /// The target paths whose declarations are needed.
    pub paths: &'a BTreeSet<&'a str>,
    /// The repository files whose declarations are needed: those whose
    /// own source (template, source file, or what a file was generated
    /// from; a secret has none) is one of them.
    pub sources: &'a BTreeSet<&'a str>,
}

impl Want<'_> {
    /// Whether the declaration of `path`, whose own source is `source`,
    /// is needed.
    pub fn selects(&self, path: &str, source: Option<&str>) -> bool {
        self.paths.contains(path) || source.is_some_and(|s| self.sources.contains(s))
    }
}

/// The digest of a set of target paths, given in sorted order.
pub fn paths_digest<'a>(sorted: impl IntoIterator<Item = &'a TargetPath>) -> String {
    let mut h = sha2::Sha256::new();
    for p in sorted {
        h.update(p.as_str().as_bytes());
        // Target paths hold no NUL (`TargetPath::parse`): unambiguous.
        h.update([0]);
    }
    hex::encode(h.finalize())
}

/// A cache as a plan carries it to the quick-check record: its name, and
/// its bytes while they are not written yet. They are written only when
/// the run records what it applied, so a run that fails or skips a bad
/// commit neither spends the write nor replaces the cache the last
/// record names.
#[derive(Debug, Clone)]
pub struct Pending {
    name: String,
    unwritten: Option<std::sync::Arc<Vec<u8>>>,
}

impl Pending {
    /// The cache named `name`, already in the state directory.
    pub fn existing(name: &str) -> Self {
        Pending {
            name: name.to_string(),
            unwritten: None,
        }
    }

    /// `config` encoded as the cache for `key`, not written yet.
    pub fn new(key: &Key, config: &mut HostConfig) -> Result<Self> {
        let (bytes, name) = encode(key, config)?;
        Ok(Pending {
            name,
            unwritten: Some(std::sync::Arc::new(bytes)),
        })
    }

    /// Writes it (if it is not yet) and returns its name for the
    /// quick-check record.
    pub fn write(&self, state: &StateDir) -> Result<&str> {
        if let Some(bytes) = &self.unwritten {
            super::write_replace(&state.path().join(FILE), bytes)?;
        }
        Ok(&self.name)
    }
}

/// Writes `config` as the cache for `key`; returns its name.
#[cfg(test)]
pub fn save(state: &StateDir, key: &Key, config: &mut HostConfig) -> Result<String> {
    Ok(Pending::new(key, config)?.write(state)?.to_string())
}

/// The cached configuration named `name` for `key` and `opts`, with the
/// file declarations `want` selects (all without it), or `None` (a miss:
/// load from the repository).
pub fn load(
    state: &StateDir,
    key: &Key,
    name: &str,
    opts: &LoadOptions,
    want: Option<&Want>,
) -> Option<HostConfig> {
    let path = state.path().join(FILE);
    let file = match super::open_nofollow(&path) {
        Ok((f, meta)) if meta.len() <= MAX_BYTES => Opened { f, len: meta.len() },
        Ok((_, meta)) => {
            tracing::debug!("configuration cache not used: {} bytes", meta.len());
            return None;
        }
        Err(e) => {
            tracing::debug!("no configuration cache: {e}");
            return None;
        }
    };
    match decode(&file, key, name, opts, want) {
        Ok(config) => Some(config),
        Err(e) => {
            tracing::debug!("configuration cache not used: {e:#}");
            None
        }
    }
}

/// What a cache is read from: the open file (by `pread`), or, in tests
/// and the fuzz target, its bytes.
trait Source {
    fn len(&self) -> u64;
    /// `len` bytes from `at`; fewer is an error (torn, or changed since).
    fn read_at(&self, at: u64, len: u64) -> Result<Cow<'_, [u8]>>;
}

struct Opened {
    f: std::fs::File,
    len: u64,
}

impl Source for Opened {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, at: u64, len: u64) -> Result<Cow<'_, [u8]>> {
        anyhow::ensure!(
            at.saturating_add(len) <= self.len,
            "torn: shorter than its index"
        );
        let mut buf = vec![0; usize::try_from(len)?];
        self.f.read_exact_at(&mut buf, at).context("cannot read")?;
        Ok(Cow::Owned(buf))
    }
}

impl Source for [u8] {
    fn len(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, at: u64, len: u64) -> Result<Cow<'_, [u8]>> {
        let end = at.checked_add(len).context("torn")?;
        let range = usize::try_from(at)?..usize::try_from(end)?;
        self.get(range)
            .map(Cow::Borrowed)
            .context("torn: shorter than its index")
    }
}

/// The file's bytes and its name. `config` is given back as it came (its
/// files are set aside while the rest is written).
fn encode(key: &Key, config: &mut HostConfig) -> Result<(Vec<u8>, String)> {
    let files = std::mem::take(&mut config.files);
    let head = serde_json::to_vec(&*config).context("cannot serialise the configuration");
    config.files = files;
    let mut head = head?;
    head.push(b'\n');
    let mut sorted: Vec<&TargetPath> = config.files.iter().map(|f| &f.path).collect();
    sorted.sort_unstable();
    let paths = paths_digest(sorted);
    let mut index = Vec::with_capacity(config.files.len() * RECORD);
    let mut lines = Vec::with_capacity(config.files.len() * 192);
    for f in &config.files {
        let start = lines.len();
        let source = f.content.own_source();
        // JSON strings hold no raw tab or line break: the separators are
        // unambiguous.
        serde_json::to_writer(&mut lines, f.path.as_str())?;
        lines.push(b'\t');
        serde_json::to_writer(&mut lines, &source)?;
        lines.push(b'\t');
        serde_json::to_writer(&mut lines, f)?;
        lines.push(b'\n');
        Record::of(f.path.as_str(), source, &lines[start..])?.write(&mut index);
    }
    let crc32 = checksum(head.len() as u64, config.files.len(), &paths, &head, &index);
    let name = unique_name(crc32, head.len() + index.len() + lines.len());
    let mut out = Vec::with_capacity(head.len() + index.len() + lines.len() + 512);
    writeln!(out, "{MAGIC}")?;
    serde_json::to_writer(
        &mut out,
        &Header {
            crc32,
            key: key.0.clone(),
            name: name.clone(),
            config: head.len() as u64,
            files: config.files.len(),
            paths,
        },
    )?;
    out.push(b'\n');
    out.extend_from_slice(&head);
    out.extend_from_slice(&index);
    out.extend_from_slice(&lines);
    Ok((out, name))
}

/// The header's checksum: of its other fields (but the key and name,
/// which are compared), the configuration's line and the index.
fn checksum(config: u64, files: usize, paths: &str, head: &[u8], index: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(format!("{config} {files} {paths}\n").as_bytes());
    crc.update(head);
    crc.update(index);
    crc.finalize()
}

/// A name no other encoding gets: the time, the process, the checksum
/// and the size, hashed.
fn unique_name(crc32: u32, len: usize) -> String {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let seed = format!("{now} {} {n} {crc32} {len}", std::process::id());
    hex::encode(sha2::Sha256::digest(seed.as_bytes()))
}

/// A JSON string of a line's prefix, without allocating when it holds no
/// escape; `null` is `None`.
fn prefix_string(text: &str) -> Result<Option<Cow<'_, str>>> {
    if text == "null" {
        return Ok(None);
    }
    if let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        if memchr::memchr2(b'"', b'\\', inner.as_bytes()).is_none() {
            return Ok(Some(inner.into()));
        }
    }
    let owned: String = serde_json::from_str(text).context("bad line prefix")?;
    Ok(Some(owned.into()))
}

fn decode<S: Source + ?Sized>(
    src: &S,
    key: &Key,
    name: &str,
    opts: &LoadOptions,
    want: Option<&Want>,
) -> Result<HostConfig> {
    let first = src.read_at(0, src.len().min(HEAD_READ))?;
    let rest = first
        .strip_prefix(MAGIC.as_bytes())
        .and_then(|r| r.strip_prefix(b"\n"))
        .context("unknown format")?;
    let split = memchr::memchr(b'\n', rest).context("no header")?;
    let header: Header = serde_json::from_slice(&rest[..split]).context("bad header")?;
    anyhow::ensure!(
        header.key == key.0,
        "written for another host, options or agent build"
    );
    anyhow::ensure!(header.name == name, "not the cache the quick record names");
    if let Some(want) = want {
        anyhow::ensure!(
            header.paths == want.declared,
            "it declares other files than the quick record holds"
        );
    }
    // The configuration's line and the index, from the first read when
    // they are in it.
    let head_at = (MAGIC.len() + 1 + split + 1) as u64;
    let index_len = u64::try_from(header.files)
        .ok()
        .and_then(|n| n.checked_mul(RECORD as u64))
        .context("bad header")?;
    let meta_len = header.config.checked_add(index_len).context("bad header")?;
    let lines_at = head_at.checked_add(meta_len).context("bad header")?;
    anyhow::ensure!(lines_at <= src.len(), "torn: shorter than its index");
    let meta = match usize::try_from(lines_at)
        .ok()
        .and_then(|end| first.get(usize::try_from(head_at).ok()?..end))
    {
        Some(within) => Cow::Borrowed(within),
        None => src.read_at(head_at, meta_len)?,
    };
    let (head, index) = meta.split_at(usize::try_from(header.config)?);
    anyhow::ensure!(
        checksum(header.config, header.files, &header.paths, head, index) == header.crc32,
        "checksum mismatch"
    );
    let head = head.strip_suffix(b"\n").context("torn: no configuration")?;
    let mut config: HostConfig = serde_json::from_slice(head).context("data does not decode")?;
    anyhow::ensure!(config.files.is_empty(), "files outside their lines");
    // Two passes over the index, no list of its records (a damaged
    // header can claim millions): the first finds where the lines end,
    // which must be the file's end, and how many are wanted; the second
    // reads those.
    let records = || index.chunks_exact(RECORD).map(Record::read);
    let (paths, sources): (BTreeSet<u32>, BTreeSet<u32>) = match want {
        Some(w) => (
            w.paths.iter().map(|p| hash(Some(p))).collect(),
            w.sources.iter().map(|s| hash(Some(s))).collect(),
        ),
        None => Default::default(),
    };
    let wanted =
        |r: &Record| want.is_none() || paths.contains(&r.path) || sources.contains(&r.source);
    let mut end = lines_at;
    let mut count = 0usize;
    for r in records() {
        end = end.checked_add(u64::from(r.len)).context("bad index")?;
        count += usize::from(wanted(&r));
    }
    anyhow::ensure!(
        end == src.len(),
        "torn: {} bytes where the index says {end}",
        src.len()
    );
    // Many lines: all of them in one read.
    let all = if count > LINE_READS {
        Some(src.read_at(lines_at, end - lines_at)?)
    } else {
        None
    };
    let mut from = lines_at;
    for (i, r) in records().enumerate() {
        let at = from;
        from += u64::from(r.len);
        if !wanted(&r) {
            continue;
        }
        let line = match &all {
            Some(all) => {
                let at = usize::try_from(at - lines_at)?;
                Cow::Borrowed(&all[at..at + r.len as usize])
            }
            None => src.read_at(at, u64::from(r.len))?,
        };
        let n = i + 1;
        anyhow::ensure!(
            crc32fast::hash(&line) == r.crc32,
            "line {n} of the files: checksum mismatch"
        );
        let line = std::str::from_utf8(&line).context("not UTF-8")?;
        let line = line
            .strip_suffix('\n')
            .with_context(|| format!("line {n} of the files: no line break"))?;
        // Split with `memchr` (SIMD; `str::split` is compiled for size
        // with the rest of the agent). The tabs are ASCII: every part is
        // a `str`.
        let tab = |from: usize| memchr::memchr(b'\t', &line.as_bytes()[from..]).map(|i| from + i);
        let Some((t1, t2)) = tab(0).and_then(|t1| Some((t1, tab(t1 + 1)?))) else {
            anyhow::bail!("line {n} of the files is short");
        };
        let (path, source, row) = (&line[..t1], &line[t1 + 1..t2], &line[t2 + 1..]);
        let path = prefix_string(path)?.context("a file without a path")?;
        let source = prefix_string(source)?;
        anyhow::ensure!(
            r.path == hash(Some(&path)) && r.source == hash(source.as_deref()),
            "line {n} of the files: its prefix is not its index record"
        );
        if want.is_some_and(|w| !w.selects(&path, source.as_deref())) {
            continue;
        }
        let decl: FileDecl = serde_json::from_str(row).context("data does not decode")?;
        anyhow::ensure!(
            decl.path.as_str() == path && decl.content.own_source() == source.as_deref(),
            "line {n} of the files: its prefix is not its declaration"
        );
        config.files.push(decl);
    }
    check_targets(&config, opts)?;
    Ok(config)
}

/// For the fuzz target (`fuzz_entry::state_file`): `body` read as a
/// cache's data behind a header that holds (see [`fuzz_cache`]), with
/// and without a selection of files.
pub(crate) fn fuzz_body(body: &[u8]) {
    let Some((bytes, key, opts)) = fuzz_cache(body) else {
        return;
    };
    let whole = decode(bytes.as_slice(), &key, "n", &opts, None);
    // With a selection: every other file the whole read found (so that
    // the index's filter lets lines through), and a source.
    let found: Vec<String> = whole
        .map(|c| {
            c.files
                .iter()
                .step_by(2)
                .map(|f| f.path.to_string())
                .collect()
        })
        .unwrap_or_default();
    let paths: BTreeSet<&str> = found.iter().map(String::as_str).collect();
    let sources: BTreeSet<&str> = ["roles/r/files/a"].into_iter().collect();
    let want = Want {
        declared: "d".into(),
        paths: &paths,
        sources: &sources,
    };
    drop(decode(bytes.as_slice(), &key, "n", &opts, Some(&want)));
}

/// `body` (its first byte the number of files, then the configuration's
/// line, the index and the lines) behind a header that holds: its
/// checksum computed, the key, name ("n") and digest ("d") those the
/// fuzz target expects. So the fuzzer reaches the parser behind the
/// checksum.
fn fuzz_cache(body: &[u8]) -> Option<(Vec<u8>, Key, LoadOptions)> {
    let (&files, body) = body.split_first()?;
    let files = usize::from(files);
    let config = memchr::memchr(b'\n', body).map_or(body.len(), |i| i + 1);
    let meta = body.get(..config + files * RECORD).unwrap_or(body);
    let (head, index) = meta.split_at(config.min(meta.len()));
    let key = Key("k".into());
    let header = Header {
        crc32: checksum(config as u64, files, "d", head, index),
        key: key.0.clone(),
        name: "n".into(),
        config: config as u64,
        files,
        paths: "d".into(),
    };
    let mut bytes = format!("{MAGIC}\n").into_bytes();
    serde_json::to_writer(&mut bytes, &header).ok()?;
    bytes.push(b'\n');
    bytes.extend_from_slice(body);
    let opts = LoadOptions {
        allowed_roots: ["/etc", "/srv"]
            .into_iter()
            .filter_map(|p| TargetPath::parse(p).ok())
            .collect(),
        reserved: Vec::new(),
    };
    Some((bytes, key, opts))
}

/// Every path passes the checks loading applies (under an allowed root,
/// not the agent's own).
fn check_targets(config: &HostConfig, opts: &LoadOptions) -> Result<()> {
    let targets = Targets::new(opts);
    let paths = config
        .files
        .iter()
        .map(|f| &f.path)
        .chain(config.links.iter().map(|l| &l.path))
        .chain(config.absent.iter().map(|a| &a.path))
        .chain(config.dirs.iter().map(|d| &d.path));
    for p in paths {
        targets.admit(p).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
