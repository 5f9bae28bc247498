//! The one-time copies of files that existed before driftless took them
//! over (`state_dir/originals/`), put back if the repository ever stops
//! managing the file.
//!
//! Why this much care (issue 12 §3): the copy was written in place and
//! never checked, so a process killed mid-copy left a truncated original
//! that a later prune restored over the file: a 300 MiB file came back
//! cut short. Now a copy is written to a temp name, fsynced and renamed,
//! then described by a sidecar (`<name>.json`: path, size, sha256) written
//! after it. A copy without a sidecar or not matching it is unverified: it
//! is made again from the target, which is still the untouched original
//! when a file is taken over (the copy happens in `prepare`, before any
//! target is switched). A restore reads only a verified copy; a damaged
//! one refuses the transaction, leaving the host as it is.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::effects::failpoint;
use crate::effects::state::{fsync_dir, read_json, write_json_atomic, StateDir};

const CHUNK: usize = 1 << 20;

/// What the sidecar records about a saved original.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The target path it was saved from.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

fn sidecar(dir: &Path, stored: &str) -> PathBuf {
    dir.join(format!("{stored}.json"))
}

/// The sha256 and size of a file, read in chunks.
fn digest_file(path: &Path) -> Result<(u64, String)> {
    let mut f = fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((size, hex::encode(h.finalize())))
}

/// Whether the copy `stored` exists and matches its sidecar.
pub fn verify(state: &StateDir, stored: &str) -> Result<Option<Record>> {
    let dir = state.originals();
    let Some(rec) = read_json::<Record>(&sidecar(&dir, stored)).ok().flatten() else {
        return Ok(None);
    };
    match digest_file(&dir.join(stored)) {
        Ok((size, sha)) if size == rec.size && sha == rec.sha256 => Ok(Some(rec)),
        _ => Ok(None),
    }
}

/// Saves `content` (the untouched target `path`) as the original
/// `stored`, unless a verified copy is already there. Durable and
/// verified on return.
pub fn save(state: &StateDir, stored: &str, path: &str, content: &[u8]) -> Result<()> {
    if verify(state, stored)?.is_some() {
        return Ok(());
    }
    let dir = state.originals();
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(".{stored}.tmp-{}", std::process::id()));
    // Leftovers of a copy that died: this one, or another process's.
    remove_temps(&dir, stored);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    for chunk in content.chunks(CHUNK) {
        f.write_all(chunk)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        failpoint::hit("originals.chunk")?;
    }
    f.sync_all()
        .with_context(|| format!("cannot flush {}", tmp.display()))?;
    drop(f);
    let fin = dir.join(stored);
    fs::rename(&tmp, &fin).with_context(|| format!("cannot rename into {}", fin.display()))?;
    fsync_dir(&dir)?;
    failpoint::hit("originals.renamed")?;
    let rec = Record {
        path: path.to_string(),
        size: content.len() as u64,
        sha256: hex::encode(Sha256::digest(content)),
    };
    write_json_atomic(&sidecar(&dir, stored), &rec)?;
    failpoint::hit("originals.recorded")?;
    if verify(state, stored)?.is_none() {
        bail!(
            "the saved original of {path} ({}) does not read back as written: the state directory's disk may be failing; nothing was changed",
            fin.display()
        );
    }
    Ok(())
}

fn remove_temps(dir: &Path, stored: &str) {
    let prefix = format!(".{stored}.tmp-");
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// The saved original `stored` of `display`, for a restore: only a copy
/// that matches its sidecar. A copy saved before sidecars existed is used
/// with a warning; a damaged one refuses.
pub fn read_verified(state: &StateDir, stored: &str, target: &str) -> Result<Vec<u8>> {
    let dir = state.originals();
    let file = dir.join(stored);
    let content = fs::read(&file).with_context(|| {
        format!(
            "cannot read the saved original of {target} from {}",
            file.display()
        )
    })?;
    match read_json::<Record>(&sidecar(&dir, stored)) {
        Ok(Some(rec)) => {
            let sha = hex::encode(Sha256::digest(&content));
            if content.len() as u64 != rec.size || sha != rec.sha256 {
                bail!(
                    "the saved original of {target} ({}) is damaged: {} bytes, sha256 {}, where {} bytes, sha256 {} were saved. \
                     Refusing to restore it, so nothing was changed; put the original back by hand (or keep the file managed), \
                     then remove {} and its .json",
                    file.display(),
                    content.len(),
                    &sha[..12],
                    rec.size,
                    &rec.sha256[..rec.sha256.len().min(12)],
                    file.display()
                );
            }
        }
        Ok(None) => tracing::warn!(
            "the saved original of {} ({}) has no size and checksum record (saved by an older driftless): restoring it unverified",
            target,
            file.display()
        ),
        Err(e) => bail!(
            "the record of the saved original of {target} is unreadable ({e:#}): refusing to restore it unverified; nothing was changed"
        ),
    }
    Ok(content)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> (tempfile::TempDir, StateDir) {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        (d, s)
    }

    #[test]
    fn a_saved_original_is_verified_and_never_overwritten() {
        let (_d, s) = state();
        save(&s, "k", "/etc/x", b"first").unwrap();
        save(&s, "k", "/etc/x", b"second").unwrap();
        assert_eq!(read_verified(&s, "k", "/etc/x").unwrap(), b"first");
    }

    /// Issue 12 §3: a copy cut short by a kill was restored truncated.
    #[test]
    fn a_truncated_copy_is_redone_from_the_target_and_never_restored() {
        let (_d, s) = state();
        save(&s, "k", "/etc/x", b"the whole original").unwrap();
        std::fs::write(s.originals().join("k"), b"the who").unwrap();
        let err = format!("{:#}", read_verified(&s, "k", "/etc/x").unwrap_err());
        assert!(
            err.contains("damaged") && err.contains("nothing was changed"),
            "{err}"
        );
        // Taking the file over again (the target is still the original)
        // makes a good copy.
        save(&s, "k", "/etc/x", b"the whole original").unwrap();
        assert_eq!(
            read_verified(&s, "k", "/etc/x").unwrap(),
            b"the whole original"
        );
    }

    #[test]
    fn a_copy_without_its_record_is_redone() {
        let (_d, s) = state();
        std::fs::create_dir_all(s.originals()).unwrap();
        std::fs::write(s.originals().join("k"), b"partial").unwrap();
        std::fs::write(s.originals().join(".k.tmp-1"), b"stale").unwrap();
        save(&s, "k", "/etc/x", b"complete").unwrap();
        assert_eq!(read_verified(&s, "k", "/etc/x").unwrap(), b"complete");
        assert!(!s.originals().join(".k.tmp-1").exists());
    }
}
