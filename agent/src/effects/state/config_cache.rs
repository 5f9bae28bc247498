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
//! Only the file declarations a sync needs are decoded: the file holds
//! one line per declaration, prefixed with its target path and its own
//! source in the repository, and the caller selects by those (the drifted
//! files, the ones whose template changed). The other 9,999 lines of a
//! one-file change are hashed, never parsed. That the cached declarations
//! are exactly the files the quick record holds is checked with a digest
//! of their sorted paths, kept in the file.
//!
//! It is a cache, so it is written without fsync: a torn or old file is a
//! miss. It holds what the repository says (variables, hook environments)
//! and never a decrypted secret: SOPS files are decrypted when rendered.
//! Like every state file it is 0600 in a 0700 directory. Its paths pass
//! the same target checks as loaded ones, but nothing else loading checks
//! is checked again (unit names, hooks, directory modes, the rules between
//! entries): a forged cache, with a forged `quick.json` naming it, can
//! declare what the repository does not. The cache is only as trustworthy
//! as the state directory, which is why the agent refuses a state
//! directory that anyone but its own user can write (`StateDir::open`).

use std::io::Write;

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
const MAGIC: &str = "driftless-config 3";

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
    /// The CRC-32 of everything after the header: a torn or damaged file
    /// is a miss. (Not a sha256: at 10,000 files that cost 1.5 ms of a
    /// one-file sync, and it guards against no forger: whoever can write
    /// the cache can write the record that names it.)
    crc32: u32,
    key: String,
    /// The cache's name in the quick record: unique to this encoding, so a
    /// cache written for another commit (with a record naming it lost in
    /// a crash) is never taken for the one the record names.
    name: String,
}

/// The line after the configuration's: how many file lines follow, and
/// the digest of their sorted target paths ([`paths_digest`]).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Index {
    files: usize,
    paths: String,
}

/// The file declarations a caller needs.
pub struct Want<'a> {
    /// [`paths_digest`] of the files the caller holds as declared (the
    /// quick record's): a cache that declares others is a miss.
    pub declared: String,
    /// Whether the declaration of a target path, whose own source in the
    /// repository (template, source file, or what a file was generated
    /// from; none for a secret) is the second argument, is needed.
    pub select: &'a dyn Fn(&str, Option<&str>) -> bool,
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
    let bytes = match super::read_nofollow_up_to(&path, MAX_BYTES) {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!("no configuration cache: {e}");
            return None;
        }
    };
    match decode(&bytes, key, name, opts, want) {
        Ok(config) => Some(config),
        Err(e) => {
            tracing::debug!("configuration cache not used: {e:#}");
            None
        }
    }
}

/// The file's bytes and its name. `config` is given back as it came (its
/// files are set aside while the rest is written).
fn encode(key: &Key, config: &mut HostConfig) -> Result<(Vec<u8>, String)> {
    let files = std::mem::take(&mut config.files);
    let head = serde_json::to_vec(&*config).context("cannot serialise the configuration");
    config.files = files;
    let mut data = head?;
    data.push(b'\n');
    let mut sorted: Vec<&TargetPath> = config.files.iter().map(|f| &f.path).collect();
    sorted.sort_unstable();
    serde_json::to_writer(
        &mut data,
        &Index {
            files: config.files.len(),
            paths: paths_digest(sorted),
        },
    )?;
    data.push(b'\n');
    for f in &config.files {
        // JSON strings hold no raw tab or line break: the separators are
        // unambiguous.
        serde_json::to_writer(&mut data, f.path.as_str())?;
        data.push(b'\t');
        serde_json::to_writer(&mut data, &f.content.own_source())?;
        data.push(b'\t');
        serde_json::to_writer(&mut data, f)?;
        data.push(b'\n');
    }
    let crc32 = crc32fast::hash(&data);
    let name = unique_name(crc32, data.len());
    let mut out = Vec::with_capacity(data.len() + 256);
    writeln!(out, "{MAGIC}")?;
    serde_json::to_writer(
        &mut out,
        &Header {
            crc32,
            key: key.0.clone(),
            name: name.clone(),
        },
    )?;
    out.push(b'\n');
    out.extend_from_slice(&data);
    Ok((out, name))
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
fn prefix_string(text: &str) -> Result<Option<std::borrow::Cow<'_, str>>> {
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

fn decode(
    bytes: &[u8],
    key: &Key,
    name: &str,
    opts: &LoadOptions,
    want: Option<&Want>,
) -> Result<HostConfig> {
    let rest = bytes
        .strip_prefix(MAGIC.as_bytes())
        .and_then(|r| r.strip_prefix(b"\n"))
        .context("unknown format")?;
    let split = rest.iter().position(|&b| b == b'\n').context("no header")?;
    let header: Header = serde_json::from_slice(&rest[..split]).context("bad header")?;
    anyhow::ensure!(
        header.key == key.0,
        "written for another host, options or agent build"
    );
    anyhow::ensure!(header.name == name, "not the cache the quick record names");
    let data = &rest[split + 1..];
    anyhow::ensure!(crc32fast::hash(data) == header.crc32, "checksum mismatch");
    let data = std::str::from_utf8(data).context("not UTF-8")?;
    let mut lines = super::Lines::new(data);
    let mut config: HostConfig = serde_json::from_str(lines.next().context("no configuration")?)
        .context("data does not decode")?;
    anyhow::ensure!(config.files.is_empty(), "files outside their lines");
    let index: Index =
        serde_json::from_str(lines.next().context("no index")?).context("bad index")?;
    if let Some(want) = want {
        anyhow::ensure!(
            index.paths == want.declared,
            "it declares other files than the quick record holds"
        );
    }
    let mut count = 0;
    for line in lines.by_ref() {
        count += 1;
        // Split with `memchr` (SIMD; `str::split` is compiled for size
        // with the rest of the agent and took 3 ms at 10,000 lines). The
        // tabs are ASCII: every part is a `str`.
        let tab = |from: usize| memchr::memchr(b'\t', &line.as_bytes()[from..]).map(|i| from + i);
        let Some((t1, t2)) = tab(0).and_then(|t1| Some((t1, tab(t1 + 1)?))) else {
            anyhow::bail!("line {count} of the files is short");
        };
        let (path, source, row) = (&line[..t1], &line[t1 + 1..t2], &line[t2 + 1..]);
        let path = prefix_string(path)?.context("a file without a path")?;
        let source = prefix_string(source)?;
        if want.is_some_and(|w| !(w.select)(&path, source.as_deref())) {
            continue;
        }
        let decl: FileDecl = serde_json::from_str(row).context("data does not decode")?;
        anyhow::ensure!(
            decl.path.as_str() == path && decl.content.own_source() == source.as_deref(),
            "line {count} of the files: its prefix is not its declaration"
        );
        config.files.push(decl);
    }
    anyhow::ensure!(lines.rest().is_empty(), "torn: no final line break");
    anyhow::ensure!(
        count == index.files,
        "torn: {count} of {} files",
        index.files
    );
    check_targets(&config, opts)?;
    Ok(config)
}

/// For the fuzz target (`fuzz_entry::state_file`): `body` read as a
/// cache's body behind a header that holds (its checksum computed, the
/// key and name expected), so that the fuzzer reaches the parser behind
/// the checksum, with and without a selection of files.
pub(crate) fn fuzz_body(body: &[u8]) {
    let key = Key("k".into());
    let mut bytes = format!("{MAGIC}\n").into_bytes();
    let header = Header {
        crc32: crc32fast::hash(body),
        key: key.0.clone(),
        name: "n".into(),
    };
    if serde_json::to_writer(&mut bytes, &header).is_err() {
        return;
    }
    bytes.push(b'\n');
    bytes.extend_from_slice(body);
    let opts = LoadOptions {
        allowed_roots: TargetPath::parse("/etc").into_iter().collect(),
        reserved: Vec::new(),
    };
    drop(decode(&bytes, &key, "n", &opts, None));
    // With a selection: the declared digest the body's own index gives
    // (so the selection is reached), every other file wanted.
    let declared = super::Lines::new(&String::from_utf8_lossy(body))
        .nth(1)
        .and_then(|l| serde_json::from_str::<Index>(l).ok())
        .map(|i| i.paths)
        .unwrap_or_default();
    let select = |path: &str, _: Option<&str>| path.len().is_multiple_of(2);
    let want = Want {
        declared,
        select: &select,
    };
    drop(decode(&bytes, &key, "n", &opts, Some(&want)));
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
