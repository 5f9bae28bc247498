//! The signed manifest beside a bundle, and checking a bundle against it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::header::{self, Header, MAX_HEADER};
use crate::trust::{self, AllowedSigners, Verified};

pub const FORMAT: &str = "driftless-bundle/1";
pub const MANIFEST_SUFFIX: &str = ".manifest";
pub const SIGNATURE_SUFFIX: &str = ".manifest.sig";

/// What the signer vouches for. Everything an importer decides on is in
/// here, so nothing unsigned steers an import.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    /// Where the commits came from (URL passwords redacted); informative.
    pub source: String,
    /// The full ref the bundle carries, e.g. `refs/heads/main`.
    pub branch: String,
    /// The commit `branch` points to.
    pub tip: String,
    /// Committer time of the tip, seconds since the epoch.
    pub tip_time: i64,
    /// Commits the receiving host must already have (empty: a full bundle).
    pub prerequisites: Vec<String>,
    /// When the bundle was made, seconds since the epoch; the signing key's
    /// validity window is checked at this time.
    pub created_at: i64,
    pub bundle_sha256: String,
    pub bundle_size: u64,
}

pub fn manifest_path(bundle: &Path) -> PathBuf {
    with_suffix(bundle, MANIFEST_SUFFIX)
}

pub fn signature_path(bundle: &Path) -> PathBuf {
    with_suffix(bundle, SIGNATURE_SUFFIX)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// Reads the manifest and checks its signature. Reads nothing of the
/// bundle itself.
pub fn verify_manifest(bundle: &Path, signers: &AllowedSigners) -> Result<(Manifest, Verified)> {
    let mpath = manifest_path(bundle);
    let spath = signature_path(bundle);
    let bytes = read_small(&mpath, "manifest")?;
    let sig = read_small(&spath, "signature")?;
    let sig = String::from_utf8(sig)
        .with_context(|| format!("{} is not a text SSH signature", spath.display()))?;
    // The signature is checked before the JSON is even parsed, but its
    // validity window needs created_at: parse leniently first, then trust.
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a driftless bundle manifest", mpath.display()))?;
    let signer = trust::verify_detached(
        signers,
        trust::BUNDLE_NAMESPACE,
        &bytes,
        &sig,
        manifest.created_at,
    )
    .with_context(|| {
        format!(
            "the signature {} does not vouch for {}",
            spath.display(),
            mpath.display()
        )
    })?;
    if manifest.format != FORMAT {
        bail!(
            "{}: format {:?} is not supported by this driftless (expects {FORMAT:?})",
            mpath.display(),
            manifest.format
        );
    }
    Ok((manifest, signer))
}

/// Reads the bundle once, hashing it and (with `copy_to`) writing a
/// private copy, then checks hash, size and header against the signed
/// manifest. The copy is what gets imported.
pub fn check_contents(
    bundle: &Path,
    manifest: &Manifest,
    copy_to: Option<&Path>,
    max_size: u64,
) -> Result<Header> {
    if manifest.bundle_size > max_size {
        bail!(
            "{}: its manifest says {} bytes, more than max_bundle_size ({} bytes); refused unread (raise max_bundle_size in agent.toml if it is genuine)",
            bundle.display(),
            manifest.bundle_size,
            max_size
        );
    }
    let mut input = open_untrusted(bundle, "bundle")?;
    let len = input
        .metadata()
        .with_context(|| format!("cannot examine bundle {}", bundle.display()))?
        .len();
    if len > max_size {
        bail!(
            "{} is {len} bytes, more than max_bundle_size ({max_size} bytes); refused unread",
            bundle.display()
        );
    }
    // Before a byte is copied: an old signed manifest is no secret, and
    // beside a file padded to max_bundle_size it had each such file
    // copied and hashed into the state directory before the refusal.
    if len != manifest.bundle_size {
        bail!(
            "{} does not match its signed manifest: it is {len} bytes, the manifest says {}; refused unread. \
             The bundle is truncated, damaged or replaced: copy it again from the connected side",
            bundle.display(),
            manifest.bundle_size
        );
    }
    // A file that grows while it is read is cut one byte past its size
    // (and then refused by the size below).
    let mut input = (&mut input).take(manifest.bundle_size.saturating_add(1));
    let mut copy = match copy_to {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(p)
                .with_context(|| format!("cannot create {}", p.display()))?,
        ),
        None => None,
    };
    let mut hasher = Sha256::new();
    let mut head = Vec::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = input
            .read(&mut buf)
            .with_context(|| format!("cannot read bundle {}", bundle.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
        if head.len() < MAX_HEADER + 4 {
            let take = n.min(MAX_HEADER + 4 - head.len());
            head.extend_from_slice(&buf[..take]);
        }
        if let (Some(f), Some(p)) = (copy.as_mut(), copy_to) {
            f.write_all(&buf[..n])
                .with_context(|| format!("cannot write {}", p.display()))?;
        }
    }
    if let (Some(f), Some(p)) = (copy.as_mut(), copy_to) {
        f.sync_all()
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    let digest = hex::encode(hasher.finalize());
    if size != manifest.bundle_size || digest != manifest.bundle_sha256 {
        bail!(
            "{} does not match its signed manifest (size {size}, sha256 {digest}; the manifest says size {}, sha256 {}): the bundle is truncated, damaged or replaced. Copy it again from the connected side",
            bundle.display(),
            manifest.bundle_size,
            manifest.bundle_sha256
        );
    }
    let header = header::parse(&head)
        .with_context(|| format!("{} is not a usable git bundle", bundle.display()))?;
    let tip = header.tip_of(&manifest.branch);
    if tip.map(|t| t.to_string()).as_deref() != Some(manifest.tip.as_str()) {
        bail!(
            "{}: the bundle's {} is {}, but its manifest says {}: refusing an inconsistent bundle",
            bundle.display(),
            manifest.branch,
            tip.map_or("missing".to_string(), |t| t.to_string()),
            manifest.tip
        );
    }
    let mut in_header: Vec<String> = header.prerequisites.iter().map(|p| p.to_string()).collect();
    let mut in_manifest = manifest.prerequisites.clone();
    in_header.sort();
    in_manifest.sort();
    if in_header != in_manifest {
        bail!(
            "{}: the bundle's prerequisites differ from its manifest's: refusing an inconsistent bundle",
            bundle.display()
        );
    }
    Ok(header)
}

/// Opens a file of a bundle (on a stick: untrusted) for reading: never
/// through a symlink, only a regular file (a FIFO would hang the agent
/// while it holds the lock; a device could be anything).
pub fn open_untrusted(path: &Path, what: &str) -> Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(nix::libc::ELOOP) {
                anyhow::anyhow!(
                    "{} is a symlink: bundle files are never read through a link",
                    path.display()
                )
            } else {
                anyhow::Error::new(e).context(format!(
                    "cannot read the {what} {}: a driftless bundle is FILE, FILE{MANIFEST_SUFFIX} and FILE{SIGNATURE_SUFFIX}, made by `driftless bundle create`",
                    path.display()
                ))
            }
        })?;
    let meta = f
        .metadata()
        .with_context(|| format!("cannot examine {}", path.display()))?;
    if !meta.is_file() {
        bail!(
            "{} is not a regular file (a directory, FIFO or device): refused",
            path.display()
        );
    }
    Ok(f)
}

/// Manifests and signatures are tiny; refuse to slurp anything large.
fn read_small(path: &Path, what: &str) -> Result<Vec<u8>> {
    const LIMIT: u64 = 64 * 1024;
    let f = open_untrusted(path, &format!("bundle's {what}"))?;
    let mut bytes = Vec::new();
    f.take(LIMIT + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > LIMIT {
        bail!(
            "{} is larger than {LIMIT} bytes: not a bundle {what}",
            path.display()
        );
    }
    Ok(bytes)
}
