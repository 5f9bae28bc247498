//! `quick.json` and `quick.delta`: the record of the last sync that left
//! the host as desired (see [`crate::plan::quick`] for why a stamp
//! comparison is sound).
//!
//! It is a cache, so it is written without fsync: after a crash it may be
//! missing, old or torn, and each of those only costs one full sync. It is
//! invalidated before any transaction touches a file, so it never
//! describes a host that is half way through a change.
//!
//! Why two files: the record holds one line per managed file, 1 MB at
//! 10,000 files, and rewriting it whole was a tenth of a one-file change
//! (issue #18). So the file lines live in a base, `quick.json`, written
//! only when it is first made or when the changes since outgrow it; the
//! record itself is `quick.delta`: its header (commit, inputs, stamps of
//! the inventory, links, directories, units) and the file lines that
//! differ from the base, which it names by a random id. The record is
//! the base with the delta applied, and there is one only while the delta
//! exists and names the base that is there:
//!
//! - invalidating it removes the delta (a few hundred bytes; the base is
//!   kept for the next record to build on);
//! - a base written anew gets a new id, so a delta left from an older
//!   base is refused, whatever order a crash cut the writes in;
//! - each file is replaced by rename, never edited in place, and a torn
//!   or damaged one fails its `end N` count or its format: no record.

mod delta;
mod format;
#[cfg(test)]
mod tests;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};

use super::StateDir;
use crate::desired::spec::TargetPath;
use crate::effects::rootfs::stamp_path;
use crate::plan::quick::{QuickRecord, Stamp};
use delta::{apply, compose, Change};
pub(crate) use format::decode;
use format::{decode_base, decode_delta, encode_base, encode_delta, DeltaHeader};

/// The base: the file lines of some earlier record.
const FILE: &str = "quick.json";
/// The record: its header and how its files differ from the base.
const DELTA: &str = "quick.delta";

/// A delta is written while it holds at most this many changed files, or
/// an eighth of the record's files if that is more; past that, a new base.
const DELTA_MIN_LINES: usize = 64;

/// A larger delta is refused unread: one holds at most an eighth of the
/// files (12 MB at a million) and the header's links and directories.
const DELTA_MAX_BYTES: u64 = 64 << 20;

/// What the last [`load`] read, kept for the next load (the daemon reads
/// the record on every poll) and for [`save`] to build the next delta on.
struct Loaded {
    dir: PathBuf,
    base_stamp: Stamp,
    /// `None` once a clear or a save replaced the delta this read: the
    /// record is then read again, never served from here (a new file may
    /// get the old one's inode, and a coarse clock its times), but it is
    /// still what the next delta is built on (it is still the base's).
    delta_stamp: Option<Stamp>,
    base_id: String,
    changes: Vec<Change>,
    record: Arc<QuickRecord>,
}

/// One per state directory (an agent has one; the unit tests, many).
static CACHE: std::sync::Mutex<Vec<Loaded>> = std::sync::Mutex::new(Vec::new());
const CACHED_DIRS: usize = 16;

fn remember(cache: &mut Vec<Loaded>, loaded: Loaded) {
    cache.retain(|l| l.dir != loaded.dir);
    if cache.len() >= CACHED_DIRS {
        cache.remove(0);
    }
    cache.push(loaded);
}

/// The delta of `dir` is being replaced or removed: its cached record is
/// no longer served (see [`Loaded::delta_stamp`]).
fn forget(dir: &Path) {
    if let Ok(mut cache) = CACHE.lock() {
        for l in cache.iter_mut().filter(|l| l.dir == dir) {
            l.delta_stamp = None;
        }
    }
}

/// The record, or `None` when there is none or it cannot be read (a
/// corrupt cache is not an error: the full path rebuilds it).
///
/// The last one decoded is kept in memory and reused while both files'
/// stamps (inode, size, times) are the same: they are only ever replaced
/// by rename, never edited in place.
pub fn load(state: &StateDir) -> Option<Arc<QuickRecord>> {
    let dir = state.path();
    let (delta_path, base_path) = (dir.join(DELTA), dir.join(FILE));
    let delta_stamp = stamp_path(&delta_path)?;
    let base_stamp = stamp_path(&base_path)?;
    let mut cache = CACHE.lock().ok()?;
    if let Some(l) = cache.iter().find(|l| l.dir == dir) {
        if l.delta_stamp == Some(delta_stamp) && l.base_stamp == base_stamp {
            return Some(Arc::clone(&l.record));
        }
    }
    // (Not following a link planted there, and bounded: untrusted input.)
    // Read after the stamps: if a file was replaced in between, its stamp
    // is older than its content and the next load reads again.
    let read = || -> Result<Loaded> {
        let delta = super::read_nofollow_up_to(&delta_path, DELTA_MAX_BYTES).context(DELTA)?;
        let (header, changes) = decode_delta(&delta).context(DELTA)?;
        let base = super::read_nofollow(&base_path).context(FILE)?;
        let (id, files) = decode_base(&base).context(FILE)?;
        anyhow::ensure!(
            id == header.base,
            "{DELTA} names base {:?}, {FILE} is {id:?}",
            header.base
        );
        let mut record = header.record;
        record.files = apply(files, &changes).context(DELTA)?;
        Ok(Loaded {
            dir: dir.to_path_buf(),
            base_stamp,
            delta_stamp: Some(delta_stamp),
            base_id: id,
            changes,
            record: Arc::new(record),
        })
    };
    match read() {
        Ok(l) => {
            let record = Arc::clone(&l.record);
            remember(&mut cache, l);
            Some(record)
        }
        Err(e) => {
            tracing::debug!("ignoring an unreadable quick-check record: {e:#}");
            None
        }
    }
}

/// Removes the record, durably. Called before a transaction touches a
/// file: from then on, an existing record means no transaction started
/// after it was taken, even across a power loss. (The base stays: alone,
/// it is no record.)
pub fn clear(state: &StateDir) -> Result<()> {
    forget(state.path());
    if state.remove_file(DELTA)? {
        super::fsync_dir(state.path())?;
    }
    Ok(())
}

/// Removes the record without a barrier of its own: for a transaction,
/// whose first flush (a `syncfs` of the state's filesystem, before any
/// target is touched) makes the removal durable. The order that matters
/// (no record survives a power loss once a target may have changed) is
/// kept: the flush precedes the first rename.
pub fn clear_unsynced(state: &StateDir) -> Result<()> {
    forget(state.path());
    state.remove_file(DELTA).map(drop)
}

/// Writes a new record. `build` receives the filesystem's current time
/// (the mtime of the freshly created temp file), taken before it stamps
/// the files: the racy-stamp rule needs a time from the same clock. It
/// gives the record (its `files` left empty) and its files in path order.
/// When `build` gives `None`, nothing is written.
///
/// The files go into a delta on the base the last [`load`] read, if that
/// base is still there and the delta stays small; otherwise into a new
/// base, with an empty delta.
pub fn save<'a>(
    state: &StateDir,
    build: impl FnOnce(i128) -> Option<(QuickRecord, Vec<(&'a TargetPath, Stamp, bool)>)>,
) -> Result<()> {
    let dir = state.path();
    forget(dir);
    let path = dir.join(DELTA);
    let (tmp, mut f) = super::create_temp(&path)?;
    let st = nix::sys::stat::fstat(&f).with_context(|| format!("cannot stat {}", tmp.display()))?;
    let now = i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec);
    let Some((record, files)) = build(now) else {
        drop(f);
        let _ = fs::remove_file(&tmp);
        return Ok(());
    };
    let written = delta_on_loaded_base(dir, &files)
        .map_or_else(|| new_base(dir, &files).map(|id| (id, Vec::new())), Ok)
        .and_then(|(base, changes)| encode_delta(&DeltaHeader { base, record }, &changes))
        .and_then(|bytes| {
            f.write_all(&bytes)
                .with_context(|| format!("cannot write {}", tmp.display()))
        })
        .and_then(|()| {
            fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))
        });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// The base id and changes for `files` on the base the last [`load`]
/// read, if it is still there and the delta would stay small.
fn delta_on_loaded_base(
    dir: &Path,
    files: &[(&TargetPath, Stamp, bool)],
) -> Option<(String, Vec<Change>)> {
    let cache = CACHE.lock().ok()?;
    let prev = cache.iter().find(|l| l.dir == dir)?;
    if stamp_path(&dir.join(FILE)) != Some(prev.base_stamp) {
        return None;
    }
    let changes = compose(&prev.record.files, &prev.changes, files)?;
    (changes.len() <= DELTA_MIN_LINES.max(files.len() / 8)).then(|| (prev.base_id.clone(), changes))
}

/// Writes `files` as a new base under a new id, and returns the id.
fn new_base(dir: &Path, files: &[(&TargetPath, Stamp, bool)]) -> Result<String> {
    let mut id = [0u8; 16];
    rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut id)
        .context("cannot draw an id for the quick-check record")?;
    let id = hex::encode(id);
    let bytes = encode_base(&id, files.iter().map(|(p, s, c)| (*p, *s, *c)))?;
    super::write_replace(&dir.join(FILE), &bytes)?;
    Ok(id)
}
