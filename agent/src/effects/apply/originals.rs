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
//! target is switched). A restore reads only a verified copy; a damaged,
//! unrecorded or missing one refuses the transaction, leaving the host as
//! it is, with a message that says what to do.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::effects::failpoint;
use crate::effects::rootfs::TARGET_READ_MAX_BYTES;
use crate::effects::state::{
    create_temp, fsync_dir, read_json, remove_stale_temps, write_json_atomic, StateDir,
};

const CHUNK: usize = 1 << 20;

/// What the sidecar records about a saved original.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The target path it was saved from.
    pub path: String,
    pub size: u64,
    pub sha256: String,
    /// The file's mode and owner when it was saved (none in a record of
    /// an older driftless): what a restore gives it back. The inventory
    /// holds them too, but a rebuilt inventory holds the values
    /// driftless wrote (a 0600 file managed as 0644 came back 0644).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<SavedMeta>,
}

/// Mode and owner of a saved original.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedMeta {
    pub gid: u32,
    pub mode: u32,
    pub uid: u32,
}

/// Whether `stored` is a name driftless gives a saved original: the
/// sha256 of its target path, in hex. The name comes back from the
/// inventory and the journal, both untrusted: `../` in it would reach
/// outside `originals/` (a retire removing any file).
fn plain_name(stored: &str) -> bool {
    stored.len() == 64
        && stored
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn sidecar(dir: &Path, stored: &str) -> PathBuf {
    dir.join(format!("{stored}.json"))
}

/// Where a record offered in a message leaves the checksum for the user
/// to fill in (see `read_verified`).
const SHA256_PLACEHOLDER: &str = "<sha256sum>";

/// The sha256 and size of a file, read in chunks, up to one byte more
/// than `max` (a larger file cannot match a record of `max` bytes, and
/// one that says so by its size is refused unread). Not
/// through a link, and only a regular file: the state directory is
/// untrusted, and a link to `/dev/zero` there was hashed forever.
fn digest_file(path: &Path, max: u64) -> Result<(u64, String)> {
    let (f, meta) = crate::effects::state::open_nofollow(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if meta.len() > max {
        bail!("{} bytes, more than {max}", meta.len());
    }
    let mut f = f.take(max.saturating_add(1));
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

/// Whether the copy `stored` of `path` exists and matches its sidecar
/// (which must name `path`).
pub fn verify(state: &StateDir, stored: &str, path: &str) -> Result<Option<Record>> {
    let dir = state.originals();
    let Some(rec) = read_json::<Record>(&sidecar(&dir, stored)).ok().flatten() else {
        return Ok(None);
    };
    if rec.path != path {
        return Ok(None);
    }
    match digest_file(&dir.join(stored), rec.size) {
        Ok((size, sha)) if size == rec.size && sha == rec.sha256 => Ok(Some(rec)),
        _ => Ok(None),
    }
}

/// Saves `content` (the untouched target `path`) as the original
/// `stored`, unless a verified copy of exactly this content is already
/// there (a retried take-over); an unverified one (no sidecar, or not
/// matching it) is made again, and so is a verified copy of other content:
/// a file is only taken over while unmanaged, so such a copy is left from
/// an earlier take-over whose restore did not retire it, and the file as
/// it is now is the original to keep (restoring the old copy lost an
/// admin's edit). Except with `keep_saved` (no commit recorded: the
/// inventory was rebuilt or deleted, and every file is taken over again
/// as driftless wrote it): a verified copy is kept then. Without that, the
/// true originals were overwritten with driftless's own content. Durable
/// and verified on return. Call under the state lock.
pub fn save(
    state: &StateDir,
    stored: &str,
    path: &str,
    content: &[u8],
    meta: Option<SavedMeta>,
    keep_saved: bool,
) -> Result<()> {
    if !plain_name(stored) {
        bail!("{stored:?} is not a name for a saved original");
    }
    if let Some(rec) = verify(state, stored, path)? {
        if rec.size == content.len() as u64 && rec.sha256 == hex::encode(Sha256::digest(content)) {
            // The same content, its mode or owner changed since (a copy
            // left by an undone take-over, then a chmod): recorded anew.
            if meta.is_some() && rec.meta != meta && !keep_saved {
                let dir = state.originals();
                write_json_atomic(&sidecar(&dir, stored), &Record { meta, ..rec })?;
            }
            return Ok(());
        }
        // No commit is recorded (the inventory was rebuilt or deleted):
        // every file is taken over again as it is now, which is what
        // driftless wrote, not the original.
        if keep_saved {
            tracing::info!(
                path = %crate::desired::spec::shown(path),
                "no commit recorded (inventory rebuilt?): the verified original saved before is kept"
            );
            return Ok(());
        }
    }
    let dir = state.originals();
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Leftovers of copies (and sidecars) that died: any file's, since the
    // file they were for may never be taken over again.
    remove_stale_temps(&dir);
    let fin = dir.join(stored);
    // `.<stored>.tmp-<pid>`: O_EXCL, O_NOFOLLOW, 0600.
    let (tmp, mut f) = create_temp(&fin)?;
    for chunk in content.chunks(CHUNK) {
        f.write_all(chunk)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        failpoint::hit("originals.chunk")?;
    }
    f.sync_all()
        .with_context(|| format!("cannot flush {}", tmp.display()))?;
    drop(f);
    fs::rename(&tmp, &fin).with_context(|| format!("cannot rename into {}", fin.display()))?;
    fsync_dir(&dir)?;
    failpoint::hit("originals.renamed")?;
    let rec = Record {
        path: path.to_string(),
        size: content.len() as u64,
        sha256: hex::encode(Sha256::digest(content)),
        meta,
    };
    write_json_atomic(&sidecar(&dir, stored), &rec)?;
    failpoint::hit("originals.recorded")?;
    if verify(state, stored, path)?.is_none() {
        bail!(
            "the saved original of {path} ({}) does not read back as written: the state directory's disk may be failing; nothing was changed",
            fin.display()
        );
    }
    Ok(())
}

/// The mode and owner recorded with the verified original `stored` of
/// `path`, if its record has them.
pub fn saved_meta(state: &StateDir, stored: &str, path: &str) -> Option<SavedMeta> {
    if !plain_name(stored) {
        return None;
    }
    let rec = read_json::<Record>(&sidecar(&state.originals(), stored)).ok()??;
    (rec.path == path).then_some(rec.meta).flatten()
}

/// Removes the copy `stored` and its sidecar once its restore committed
/// (best effort: a copy left behind is refreshed by the next take-over).
pub fn retire(state: &StateDir, stored: &str) {
    if !plain_name(stored) {
        return;
    }
    let dir = state.originals();
    let _ = fs::remove_file(sidecar(&dir, stored));
    let _ = fs::remove_file(dir.join(stored));
}

/// The saved original `stored` of `path` (shown as `display`), for a
/// restore: only a copy that matches its sidecar. Anything else (no copy,
/// no sidecar, a damaged copy) refuses, naming the file and what to do:
/// a copy that cannot be checked may be one cut short, and restoring it
/// would lose data.
pub fn read_verified(state: &StateDir, stored: &str, path: &str, display: &str) -> Result<Vec<u8>> {
    if !plain_name(stored) {
        bail!(
            "the inventory names the saved original of {display} {:?}, which is not a name driftless gives one: \
             the state directory was tampered with; refusing to restore it, so nothing was changed. Keep {} in the repository",
            stored,
            crate::desired::spec::shown(path)
        );
    }
    let dir = state.originals();
    let file = dir.join(stored);
    let side = sidecar(&dir, stored);
    // `path` is the target's (a repository's, or an older inventory's):
    // shown escaped, and as JSON where a record is to be written.
    let (keep, path_json) = (
        crate::desired::spec::shown(path),
        serde_json::to_string(path).context("cannot serialise a path")?,
    );
    let cannot_read = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "cannot read the saved original of {display} from {} ({e}): refusing to remove the file without its original; nothing was changed. \
             Keep {keep} in the repository, or put the original in {} and describe it in {} as {{\"path\":{path_json},\"size\":<bytes>,\"sha256\":\"<sha256sum>\"}}",
            file.display(),
            file.display(),
            side.display()
        )
    };
    // What a refusal offers to write into the record: the copy's size,
    // and where its checksum goes. Not the checksum itself: a message goes
    // to the journal, the history and webhooks, and the original of a
    // secret's file may be a secret too (a short one is found from its
    // sha256). Sized by its metadata, never read (the state directory is
    // untrusted, and a sparse terabyte there was): a link or a special
    // file is refused, and a copy larger than any original is, as before.
    let vouch = || -> Result<String> {
        let (_, meta) = crate::effects::state::open_nofollow(&file)
            .map_err(|e| cannot_read(&format_args!("cannot read {}: {e}", file.display())))?;
        let size = meta.len();
        if size > TARGET_READ_MAX_BYTES {
            return Err(cannot_read(&format_args!(
                "{size} bytes, more than {TARGET_READ_MAX_BYTES}"
            )));
        }
        let found = Record {
            path: path.to_string(),
            size,
            sha256: SHA256_PLACEHOLDER.into(),
            meta: None,
        };
        serde_json::to_string(&found).context("cannot serialise a record")
    };
    let rec = match read_json::<Record>(&side) {
        Ok(Some(rec)) => rec,
        Ok(None) => bail!(
            "the saved original of {display} ({}) has no record of its size and checksum ({} is missing): it may be a copy \
             cut short (saved by an older driftless, or interrupted), so it is not restored; nothing was changed. \
             Check {}; if it is the complete original, record it by writing {} to {} (with {SHA256_PLACEHOLDER} replaced \
             by what `sha256sum {}` prints), then sync again. Otherwise keep {keep} in the repository",
            file.display(),
            side.display(),
            file.display(),
            vouch()?,
            side.display(),
            file.display()
        ),
        Err(e) => bail!(
            "the record {} of the saved original of {display} is unreadable ({e:#}): refusing to restore {} unverified; \
             nothing was changed. If {} is the complete original, replace the record with {} (with {SHA256_PLACEHOLDER} \
             replaced by what `sha256sum {}` prints), then sync again",
            side.display(),
            file.display(),
            file.display(),
            vouch()?,
            file.display()
        ),
    };
    if rec.path != path {
        bail!(
            "the record {} of the saved original of {display} names another file ({:?}): refusing to restore it; nothing was changed",
            side.display(),
            rec.path
        );
    }
    // An original was read whole from its target when saved, so no true
    // one is larger than a managed file may be: a record that says so was
    // not written by driftless, and its copy is not read.
    if rec.size > TARGET_READ_MAX_BYTES {
        bail!(
            "the record {} of the saved original of {display} gives {} bytes, more than any original driftless saves \
             ({} bytes at most): refusing to restore it; nothing was changed. Keep {keep} in the repository",
            side.display(),
            rec.size,
            TARGET_READ_MAX_BYTES
        );
    }
    // Read up to the size its record gives: a larger copy is damaged and
    // refused unread.
    let content =
        crate::effects::state::read_nofollow_up_to(&file, rec.size).map_err(|e| cannot_read(&e))?;
    let sha = hex::encode(Sha256::digest(&content));
    if content.len() as u64 != rec.size || sha != rec.sha256 {
        bail!(
            "the saved original of {display} ({}) is damaged: {} bytes where {} were saved{}. \
             Refusing to restore it, so nothing was changed. Keep {keep} in the repository, or put the complete original \
             in {} (it must match {}), then sync again",
            file.display(),
            content.len(),
            rec.size,
            if content.len() as u64 == rec.size {
                ", and its sha256 differs from the saved one"
            } else {
                ""
            },
            file.display(),
            side.display()
        );
    }
    Ok(content)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// The name of the saved original of /etc/x (any 64 hex digits).
    const K: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn state() -> (tempfile::TempDir, StateDir) {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        (d, s)
    }

    fn read(s: &StateDir) -> Result<Vec<u8>> {
        read_verified(s, K, "/etc/x", "/etc/x")
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_saved_original_is_kept_for_a_retry_and_refreshed_by_a_new_take_over() {
        let (_d, s) = state();
        save(&s, K, "/etc/x", b"first", None, false).unwrap();
        let ino = |s: &StateDir| {
            std::os::unix::fs::MetadataExt::ino(&fs::metadata(s.originals().join(K)).unwrap())
        };
        let before = ino(&s);
        // A retried take-over (same content): the verified copy stays.
        save(&s, K, "/etc/x", b"first", None, false).unwrap();
        assert_eq!(ino(&s), before);
        assert_eq!(read(&s).unwrap(), b"first");
        let rec = verify(&s, K, "/etc/x").unwrap().unwrap();
        assert_eq!(rec.size, 5);
        assert_eq!(rec.sha256, hex::encode(Sha256::digest(b"first")));
        // A new take-over of a file that changed since: the file as it is.
        save(&s, K, "/etc/x", b"second", None, false).unwrap();
        assert_eq!(read(&s).unwrap(), b"second");
        retire(&s, K);
        assert!(fs::read_dir(s.originals()).unwrap().next().is_none());
    }

    #[test]
    fn the_copy_and_its_record_are_private() {
        let (_d, s) = state();
        save(&s, K, "/etc/shadow", b"secret", None, false).unwrap();
        assert_eq!(mode(&s.originals().join(K)), 0o600);
        assert_eq!(mode(&s.originals().join(format!("{K}.json"))), 0o600);
    }

    /// The state directory is untrusted: a link planted at a saved copy
    /// was followed (a link to `/dev/zero` was hashed forever, under the
    /// lock), and a copy longer than its record was read whole before it
    /// was found damaged.
    #[test]
    fn a_planted_link_or_an_overlong_copy_is_refused_not_read() {
        let (_d, s) = state();
        save(&s, K, "/etc/x", b"the original", None, false).unwrap();
        let copy = s.originals().join(K);
        let elsewhere = s.path().join("elsewhere");
        fs::write(&elsewhere, b"the original").unwrap();
        fs::remove_file(&copy).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &copy).unwrap();
        assert!(verify(&s, K, "/etc/x").unwrap().is_none());
        assert!(read(&s).is_err());
        fs::remove_file(&copy).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &copy).unwrap();
        assert!(verify(&s, K, "/etc/x").unwrap().is_none());
        assert!(read(&s).is_err());
        fs::remove_file(&copy).unwrap();
        fs::File::create(&copy).unwrap().set_len(1 << 40).unwrap();
        assert!(verify(&s, K, "/etc/x").unwrap().is_none());
        let err = format!("{:#}", read(&s).unwrap_err());
        assert!(
            err.contains(&format!("{} bytes, more than 12", 1u64 << 40)),
            "{err}"
        );
    }

    /// The name of a saved original comes back from the untrusted
    /// inventory and journal: one reaching outside `originals/` is
    /// refused, and a retire of it removes nothing.
    #[test]
    fn a_saved_original_named_outside_its_directory_is_refused_and_never_removed() {
        let (d, s) = state();
        let victim = d.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        fs::write(d.path().join("victim.json"), "{}").unwrap();
        let outside = "../victim";
        let err = format!(
            "{:#}",
            read_verified(&s, outside, "/etc/x", "/etc/x").unwrap_err()
        );
        assert!(
            err.contains("tampered") && err.contains("nothing was changed"),
            "{err}"
        );
        retire(&s, outside);
        assert!(victim.exists() && d.path().join("victim.json").exists());
        assert!(save(&s, outside, "/etc/x", b"x", None, false).is_err());
        assert!(save(&s, &K.to_uppercase(), "/etc/x", b"x", None, false).is_err());
    }

    /// The size bound of a restore came from the record: a planted record
    /// claiming a terabyte beside a sparse copy of that size (its checksum
    /// is easy to compute) was read into memory until the agent was
    /// killed. No original driftless saves is larger than a managed file
    /// may be, so such a record is refused, and a copy without a record is
    /// hashed (for the record the error offers) only up to that size.
    #[test]
    fn a_planted_record_of_a_sparse_terabyte_is_refused_not_read() {
        let (_d, s) = state();
        save(&s, K, "/etc/x", b"the original", None, false).unwrap();
        let copy = s.originals().join(K);
        fs::remove_file(&copy).unwrap();
        fs::File::create(&copy).unwrap().set_len(1 << 40).unwrap();
        let rec = Record {
            path: "/etc/x".into(),
            size: 1 << 40,
            sha256: "0".repeat(64),
            meta: None,
        };
        write_json_atomic(&s.originals().join(format!("{K}.json")), &rec).unwrap();
        let err = format!("{:#}", read(&s).unwrap_err());
        assert!(
            err.contains("more than any original") && err.contains("nothing was changed"),
            "{err}"
        );
        fs::remove_file(s.originals().join(format!("{K}.json"))).unwrap();
        let err = format!("{:#}", read(&s).unwrap_err());
        assert!(
            err.contains(&format!("{} bytes, more than", 1u64 << 40))
                && err.contains("nothing was changed"),
            "{err}"
        );
        let rec = Record {
            size: u64::MAX,
            ..rec
        };
        write_json_atomic(&s.originals().join(format!("{K}.json")), &rec).unwrap();
        assert!(format!("{:#}", read(&s).unwrap_err()).contains("more than any original"));
    }

    /// A copy spanning several chunks reads back whole.
    #[test]
    fn a_copy_larger_than_a_chunk_is_complete() {
        let (_d, s) = state();
        let big: Vec<u8> = (0..(CHUNK * 2 + 17)).map(|i| (i * 7 % 251) as u8).collect();
        save(&s, K, "/etc/x", &big, None, false).unwrap();
        assert!(read(&s).unwrap() == big);
    }

    /// Issue 12 §3: a copy cut short by a kill was restored truncated.
    #[test]
    fn a_truncated_copy_is_redone_from_the_target_and_never_restored() {
        let (_d, s) = state();
        save(&s, K, "/etc/x", b"the whole original", None, false).unwrap();
        fs::write(s.originals().join(K), b"the who").unwrap();
        assert!(verify(&s, K, "/etc/x").unwrap().is_none());
        let err = format!("{:#}", read(&s).unwrap_err());
        assert!(
            err.contains("damaged") && err.contains("nothing was changed"),
            "{err}"
        );
        assert!(
            err.contains("/etc/x") && err.contains(&format!("originals/{K}")),
            "{err}"
        );
        // Taking the file over again (the target is still the original)
        // makes a good copy.
        save(&s, K, "/etc/x", b"the whole original", None, false).unwrap();
        assert_eq!(read(&s).unwrap(), b"the whole original");
    }

    /// A kill after the rename, before the record: the copy is unverified,
    /// so taking the file over again redoes it; stale temps of any file go.
    #[test]
    fn a_copy_without_its_record_is_redone_and_stale_temps_are_removed() {
        let (_d, s) = state();
        let dir = s.originals();
        fs::write(dir.join(K), b"partial").unwrap();
        fs::write(dir.join(".k.tmp-1"), b"stale").unwrap();
        fs::write(dir.join(".other.tmp-2"), b"stale").unwrap();
        fs::write(dir.join(".other.json.tmp-3"), b"stale").unwrap();
        save(&s, K, "/etc/x", b"complete", None, false).unwrap();
        assert_eq!(read(&s).unwrap(), b"complete");
        let left: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// A copy with no record (an older driftless's, maybe cut short) is
    /// never restored; the message gives the record to write once the
    /// copy is checked, and writing it lets the restore go through.
    #[test]
    fn a_copy_without_its_record_is_never_restored_unchecked() {
        let (_d, s) = state();
        fs::write(s.originals().join(K), b"maybe whole").unwrap();
        let err = format!("{:#}", read(&s).unwrap_err());
        assert!(
            err.contains("no record") && err.contains("nothing was changed"),
            "{err}"
        );
        // No checksum of the copy in the message (it may be a secret's):
        // the user computes it.
        let sha = hex::encode(Sha256::digest(b"maybe whole"));
        assert!(!err.contains(&sha[..12]), "{err}");
        let vouch = err
            .split_once("by writing ")
            .and_then(|(_, r)| r.split_once(" to "))
            .map(|(j, _)| j.replace(SHA256_PLACEHOLDER, &sha))
            .expect("the record to write");
        assert!(err.contains("sha256sum "), "{err}");
        fs::write(s.originals().join(format!("{K}.json")), vouch).unwrap();
        assert_eq!(read(&s).unwrap(), b"maybe whole");
    }

    #[test]
    fn a_missing_copy_refuses_the_restore() {
        let (_d, s) = state();
        let err = format!("{:#}", read(&s).unwrap_err());
        assert!(
            err.contains("/etc/x") && err.contains("nothing was changed"),
            "{err}"
        );
    }

    /// The sidecar is the user's to edit: odd content is refused, not a
    /// panic, and a record naming another file does not verify.
    #[test]
    fn a_hand_edited_record_is_refused_without_panicking() {
        let (_d, s) = state();
        save(&s, K, "/etc/x", b"whole", None, false).unwrap();
        let side = s.originals().join(format!("{K}.json"));
        fs::write(
            &side,
            r#"{"path":"/etc/x","size":5,"sha256":"aéééééééééé"}"#,
        )
        .unwrap();
        let err = format!("{:#}", read(&s).unwrap_err());
        assert!(err.contains("damaged"), "{err}");
        fs::write(&side, "not json").unwrap();
        assert!(format!("{:#}", read(&s).unwrap_err()).contains("unreadable"));
        let rec = Record {
            path: "/etc/y".into(),
            size: 5,
            sha256: hex::encode(Sha256::digest(b"whole")),
            meta: None,
        };
        write_json_atomic(&side, &rec).unwrap();
        assert!(verify(&s, K, "/etc/x").unwrap().is_none());
        assert!(format!("{:#}", read(&s).unwrap_err()).contains("another file"));
    }
}
