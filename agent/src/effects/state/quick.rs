//! `quick.json`: the record of the last sync that left the host as desired
//! (see [`crate::plan::quick`] for why a stamp comparison is sound).
//!
//! It is a cache, so it is written without fsync: after a crash it may be
//! missing, old or torn, and each of those only costs one full sync. It is
//! removed before any transaction touches a file, so it never describes a
//! host that is half way through a change.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use anyhow::{Context, Result};

use super::StateDir;
use crate::plan::quick::QuickRecord;

const FILE: &str = "quick.json";

/// The record, or `None` when there is none or it cannot be read (a
/// corrupt cache is not an error: the full path rebuilds it).
pub fn load(state: &StateDir) -> Option<QuickRecord> {
    let bytes = fs::read(state.path().join(FILE)).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::debug!("ignoring an unreadable {FILE}: {e}");
            None
        }
    }
}

/// Removes the record, durably. Called before a transaction touches a
/// file: from then on, an existing record means no transaction started
/// after it was taken, even across a power loss.
pub fn clear(state: &StateDir) -> Result<()> {
    match fs::remove_file(state.path().join(FILE)) {
        Ok(()) => super::fsync_dir(state.path()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| {
            format!(
                "cannot remove {}; remove it by hand",
                state.path().join(FILE).display()
            )
        }),
    }
}

/// Writes a new record. `build` receives the filesystem's current time
/// (the mtime of the freshly created temp file), taken before it stamps
/// the files: the racy-stamp rule needs a time from the same clock.
/// When `build` gives `None`, nothing is written.
pub fn save(state: &StateDir, build: impl FnOnce(i128) -> Option<QuickRecord>) -> Result<()> {
    let path = state.path().join(FILE);
    let tmp = state
        .path()
        .join(format!(".{FILE}.tmp-{}", std::process::id()));
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    let st = nix::sys::stat::fstat(&f).with_context(|| format!("cannot stat {}", tmp.display()))?;
    let now = i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec);
    let Some(record) = build(now) else {
        drop(f);
        let _ = fs::remove_file(&tmp);
        return Ok(());
    };
    let bytes = serde_json::to_vec(&record).context("cannot serialise the quick-check record")?;
    let written = f
        .write_all(&bytes)
        .with_context(|| format!("cannot write {}", tmp.display()))
        .and_then(|()| {
            fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))
        });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}
