//! The anti-rollback floor: a second record of the last applied commit,
//! kept **outside** the state directory.
//!
//! Every new tip must descend from the last applied commit, so a
//! compromised server (or an old bundle on a stick) cannot downgrade a host
//! by serving an older, validly signed commit. The inventory in the state
//! directory already names that commit, but "wipe `/var/lib/driftless` and
//! let it re-sync" is a common repair, and it would silently lift the
//! protection. So the commit (with its committer time and branch) is also
//! written to `etc/driftless/applied-commit.json` **in the managed root**
//! (`/etc/driftless/applied-commit.json` on a live host), which lives and
//! dies with the host's configuration, not with the agent's cache.
//!
//! A sync checks the new tip against *both* records: a state directory
//! restored from an old backup cannot lower the floor either.
//!
//! Limits, honestly: root on the host can delete both files (then the next
//! sync accepts any validly signed commit, as on a fresh install); a host
//! re-imaged from scratch starts with no floor; and the operator lowers it
//! on purpose with `driftless rollback` (or `allow_non_fast_forward`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::desired::spec::TargetPath;
use crate::effects::rootfs::{read_file_in, replace_in, RootFs};

/// Relative to the managed root.
pub const FLOOR_FILE: &str = "etc/driftless/applied-commit.json";
const FLOOR_DIR: &str = "etc/driftless";
const FILE_NAME: &str = "applied-commit.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Floor {
    /// The last applied commit (full hex id).
    pub commit: String,
    /// Its committer time, seconds since the epoch.
    pub commit_time: i64,
    /// The full ref it was applied from.
    pub branch: String,
    /// When it was recorded, seconds since the epoch.
    pub recorded_at: i64,
    /// Commits the operator rolled back from (newest last): not applied
    /// again without `sync --retry`. Kept here, beside the floor, because
    /// the marks in the state directory do not survive its wipe.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rolled_back: Vec<String>,
}

/// Rolled-back commits remembered, at most.
pub const MAX_ROLLED_BACK: usize = 16;

impl Floor {
    /// `rolled_back` without `commit` (applied again on purpose).
    pub fn rolled_back_without(&self, commit: &str) -> Vec<String> {
        self.rolled_back
            .iter()
            .filter(|c| *c != commit)
            .cloned()
            .collect()
    }
}

pub fn path(root: &Path) -> PathBuf {
    root.join(FLOOR_FILE)
}

/// Largest floor record read (it is a few hundred bytes).
const MAX_FLOOR: u64 = 64 * 1024;

fn target() -> TargetPath {
    TargetPath::parse(&format!("/{FLOOR_FILE}")).expect("FLOOR_FILE is a valid target path")
}

/// The recorded floor, if any. A corrupt file is an error: silently
/// ignoring it would disable the protection. Read through a handle on the
/// root: a symlink at `etc`, `etc/driftless` or the file itself is refused
/// (a hostile image could otherwise point the floor at any host file).
pub fn load(root: &Path) -> Result<Option<Floor>> {
    let p = path(root);
    let remedy = "restore it, or remove it to accept the next commit as a new start";
    if !root.exists() {
        // A --root prefix nothing was applied to yet.
        return Ok(None);
    }
    let fs = RootFs::open(root)?;
    let Some(dir) = fs
        .open_parent(&target(), None)
        .with_context(|| format!("the anti-rollback record {} is unreachable", p.display()))?
    else {
        return Ok(None);
    };
    let Some(bytes) = read_file_in(&dir, FILE_NAME, MAX_FLOOR).with_context(|| {
        format!(
            "the anti-rollback record {} is unreadable: {remedy}",
            p.display()
        )
    })?
    else {
        return Ok(None);
    };
    super::decode_state(&bytes)
        .map(Some)
        .with_context(|| format!("{} is corrupt", p.display()))
        .with_context(|| {
            format!(
                "the anti-rollback record {} is unreadable: {remedy}",
                p.display()
            )
        })
}

/// Records `floor` (atomically, durably; mode 0600, directory 0755),
/// through a handle on the root as [`load`] reads it.
pub fn save(root: &Path, floor: &Floor) -> Result<()> {
    let p = path(root);
    let bytes = super::encode_state(floor, super::STATE_FORMAT)?;
    let fs = RootFs::open(root)?;
    let dir_target =
        TargetPath::parse(&format!("/{}", FLOOR_DIR)).map_err(|e| anyhow::anyhow!(e))?;
    let dir = fs.ensure_dir(&dir_target, 0o755)?;
    replace_in(&dir, FILE_NAME, &bytes, 0o600, true)
        .with_context(|| format!("cannot record the applied commit in {}", p.display()))
}

/// A floor record written to its temp name beside the record, not yet in
/// place: the commit makes its content durable with the inventory's, and
/// renames it in right after the inventory (see
/// [`crate::effects::apply::commit`]). Dropped without [`Pending::install`],
/// the temp file is removed.
pub struct Pending {
    dir: std::os::fd::OwnedFd,
    tmp: String,
    installed: bool,
}

impl Pending {
    /// The record's directory (`etc/driftless` under the root).
    pub fn dir(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.dir)
    }

    /// A second handle on the record's directory.
    pub fn dir_fd(&self) -> Result<std::os::fd::OwnedFd> {
        self.dir
            .try_clone()
            .context("cannot duplicate a directory handle")
    }

    /// Renames the record into place (no barrier: the caller's).
    pub fn install(mut self) -> Result<()> {
        nix::fcntl::renameat(&self.dir, self.tmp.as_str(), &self.dir, FILE_NAME)
            .context("cannot put the anti-rollback record in place")?;
        self.installed = true;
        Ok(())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.installed {
            let _ = nix::unistd::unlinkat(
                &self.dir,
                self.tmp.as_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}

/// Writes `floor` to its temp name (mode 0600, directory 0755, through a
/// handle on the root as [`save`]), without a barrier or a rename.
pub fn stage(root: &Path, floor: &Floor) -> Result<Pending> {
    let p = path(root);
    let bytes = super::encode_state(floor, super::STATE_FORMAT)?;
    let fs = RootFs::open(root)?;
    let dir_target =
        TargetPath::parse(&format!("/{}", FLOOR_DIR)).map_err(|e| anyhow::anyhow!(e))?;
    let dir = fs.ensure_dir(&dir_target, 0o755)?;
    let (tmp, _) = crate::effects::rootfs::write_temp_in(&dir, FILE_NAME, &bytes, 0o600)
        .with_context(|| format!("cannot record the applied commit in {}", p.display()))?;
    Ok(Pending {
        dir,
        tmp,
        installed: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let f = Floor {
            commit: "a".repeat(40),
            commit_time: 5,
            branch: "refs/heads/main".into(),
            recorded_at: 6,
            rolled_back: vec!["b".repeat(40)],
        };
        save(dir.path(), &f).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(f));
        std::fs::write(path(dir.path()), "{").unwrap();
        let err = format!("{:#}", load(dir.path()).unwrap_err());
        assert!(err.contains("applied-commit.json"), "{err}");
    }
}
