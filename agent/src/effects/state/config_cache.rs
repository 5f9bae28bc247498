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
//! the cache (by the sha256 of its data) that holds the configuration of
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
//! It is a cache, so it is written without fsync: a torn or old file is a
//! miss. It holds what the repository says (variables, hook environments)
//! and never a decrypted secret: SOPS files are decrypted when rendered.
//! Like every state file it is 0600 in a 0700 directory. A forged cache
//! gains nothing that forging the inventory or the backups beside it would
//! not; its paths pass the same target checks as loaded ones.

use std::io::Write;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::StateDir;
use crate::desired::load::{HostConfig, LoadOptions};
use crate::desired::targets::Targets;

const FILE: &str = "config.cache";
const MAGIC: &str = "driftless-config 1";

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
    key: String,
    /// The sha256 of the data line: the cache's name in the quick record.
    sha256: String,
}

/// Writes `config` as the cache for `key`; returns its name (the sha256
/// of its data) for the quick-check record.
pub fn save(state: &StateDir, key: &Key, config: &HostConfig) -> Result<String> {
    let (bytes, name) = encode(key, config)?;
    super::write_replace(&state.path().join(FILE), &bytes)?;
    Ok(name)
}

/// The cached configuration named `name` for `key` and `opts`, or `None`
/// (a miss: load from the repository).
pub fn load(state: &StateDir, key: &Key, name: &str, opts: &LoadOptions) -> Option<HostConfig> {
    let path = state.path().join(FILE);
    let bytes = match super::read_nofollow(&path) {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!("no configuration cache: {e}");
            return None;
        }
    };
    match decode(&bytes, key, name, opts) {
        Ok(config) => Some(config),
        Err(e) => {
            tracing::debug!("configuration cache not used: {e:#}");
            None
        }
    }
}

/// The file's bytes and its name.
fn encode(key: &Key, config: &HostConfig) -> Result<(Vec<u8>, String)> {
    let data = serde_json::to_vec(config).context("cannot serialise the configuration")?;
    let name = hex::encode(sha2::Sha256::digest(&data));
    let mut out = Vec::with_capacity(data.len() + 256);
    writeln!(out, "{MAGIC}")?;
    serde_json::to_writer(
        &mut out,
        &Header {
            key: key.0.clone(),
            sha256: name.clone(),
        },
    )?;
    out.push(b'\n');
    out.extend_from_slice(&data);
    out.push(b'\n');
    Ok((out, name))
}

fn decode(bytes: &[u8], key: &Key, name: &str, opts: &LoadOptions) -> Result<HostConfig> {
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
    anyhow::ensure!(
        header.sha256 == name,
        "not the cache the quick record names"
    );
    let data = rest[split + 1..]
        .strip_suffix(b"\n")
        .context("torn (no final newline)")?;
    anyhow::ensure!(
        hex::encode(sha2::Sha256::digest(data)) == name,
        "checksum mismatch"
    );
    let config: HostConfig = serde_json::from_slice(data).context("data does not decode")?;
    check_targets(&config, opts)?;
    Ok(config)
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
