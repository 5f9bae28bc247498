//! `inventory.delta`: a large inventory kept as a base (`inventory.json`)
//! and the transactions committed since, one line each.
//!
//! Why: at 10,000 managed files the inventory is 2 MB. Rewriting it for
//! every commit (encoding it, its checksum, writing it and making 2 MB
//! durable) was the largest part of a one-file commit (issue #18).
//! Appended to a log, a one-file commit writes and syncs one line of a
//! few hundred bytes.
//!
//! Only inventories of at least [`LOG_FROM_FILES`] files are kept this
//! way. Their base is written in envelope format
//! [`STATE_FORMAT_LOGGED`]: an older agent refuses it as newer instead of
//! reading the base without the log and forgetting transactions. A
//! smaller inventory is written whole, as every agent so far wrote it (a
//! downgrade stays possible where it was).
//!
//! Each line is a compact, checksummed state envelope holding a
//! [`Record`]: the base it applies to (the sha256 in the base's
//! envelope), its sequence number (1, 2, ...), the inventory's header
//! (commit, transaction, time, reboot request) and what changed in each
//! collection. Reading is the base, then every record in order. What
//! makes that crash-safe:
//!
//! - A record is appended with one write and made durable before its
//!   transaction counts as committed. A power loss can only tear the last
//!   line: a last line that is incomplete or fails its checksum is a
//!   write that did not finish (its transaction is uncommitted, and
//!   recovery reverts it), and the next append first cuts it off.
//! - Any other damage (a bad line with lines after it, a gap in the
//!   sequence, records of two bases) is an error naming the line: reading
//!   past it would silently forget committed transactions.
//! - Records name their base. When the base is replaced (the log grew
//!   past its bound, a revert, an inventory that shrank below the
//!   threshold), the new base is made durable first and the log removed
//!   after; a crash in between leaves a log that names the old base, and
//!   it is ignored.
//!
//! Compaction: when a record would take the log past [`LOG_MAX_BYTES`] or
//! a quarter of the base, the inventory is written whole as a new base.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use super::{EnvelopeMeta, STATE_FORMAT_LOGGED};
use crate::desired::spec::TargetPath;
use crate::plan::inventory::{DirectoryEntry, Inventory, LinkEntry, ManagedEntry, RebootRequest};

/// The log's name, beside `inventory.json`.
pub const LOG: &str = "inventory.delta";

/// Inventories with at least this many files are kept as base and log;
/// smaller ones are written whole (200 KB at 1,000 files).
pub const LOG_FROM_FILES: usize = 1_000;

/// The log is compacted into a new base before it grows past this, or a
/// quarter of the base if that is larger.
pub const LOG_MAX_BYTES: u64 = 256 * 1024;

/// A log larger than this is refused unread (compaction keeps it far
/// below; a state file must not make the agent allocate without bound).
pub const READ_MAX_BYTES: u64 = 256 << 20;

/// [`LOG_FROM_FILES`], which debug builds (the test suite) may lower with
/// `DRIFTLESS_TEST_INVENTORY_LOG_FROM` so that small test hosts take the
/// log's paths; release builds ignore the variable.
pub fn log_from() -> usize {
    crate::effects::failpoint::test_knob("DRIFTLESS_TEST_INVENTORY_LOG_FROM")
        .unwrap_or(LOG_FROM_FILES)
}

/// One committed change of the inventory. Fields in name order: the
/// record is written as canonical JSON without a tree of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub applied_at: i64,
    /// The sha256 of the base this record applies to.
    pub base: String,
    pub commit: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub del_directories: BTreeSet<TargetPath>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub del_dirs: BTreeSet<TargetPath>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub del_files: BTreeSet<TargetPath>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub del_links: BTreeSet<TargetPath>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub directories: BTreeMap<TargetPath, DirectoryEntry>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub dirs: BTreeSet<TargetPath>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<TargetPath, ManagedEntry>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub links: BTreeMap<TargetPath, LinkEntry>,
    pub reboot: Option<RebootRequest>,
    /// 1 for the first record after the base, then 2, 3, ...
    pub seq: u64,
    pub txid: String,
    pub version: u32,
}

/// What reading a base and its log found: enough to append the next
/// record or to decide to write the inventory whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogState {
    /// The base's checksum when a log may follow it (its format is
    /// [`STATE_FORMAT_LOGGED`]); `None`: the inventory is written whole.
    pub base: Option<String>,
    /// The base's size in bytes.
    pub base_len: u64,
    /// The length of the log's valid records: an append writes there,
    /// cutting off a torn tail.
    pub valid_len: u64,
    /// The sequence number of the next record.
    pub next_seq: u64,
}

/// How a log's lines are judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// The live log: an unfinished last line is an append a crash cut
    /// short (its transaction uncommitted), and ignored.
    Live,
    /// A transaction's copy (`inventory.before.delta`), written whole and
    /// made durable before the transaction touched anything: every line
    /// must be intact.
    Copy,
}

/// Applies the log read from `path` (`bytes`, `None` when there is no
/// such file) to `inv`, read from a base described by `meta` (`base_len`
/// bytes). Only a base in [`STATE_FORMAT_LOGGED`] has a log; for any
/// other, a file at `path` is a leftover and ignored.
pub fn apply_log(
    path: &Path,
    bytes: Option<&[u8]>,
    meta: &EnvelopeMeta,
    base_len: u64,
    inv: &mut Inventory,
    reading: Reading,
) -> Result<LogState> {
    let mut state = LogState {
        base: None,
        base_len,
        valid_len: 0,
        next_seq: 1,
    };
    if meta.format != STATE_FORMAT_LOGGED {
        return Ok(state);
    }
    state.base = Some(meta.sha256.clone());
    let Some(bytes) = bytes else {
        return Ok(state);
    };
    let damaged = |line: usize, why: String| {
        let remedy = match reading {
            Reading::Live => "and reading on would forget committed transactions; run `driftless state repair` (it moves the inventory and this file aside, and the next sync takes the files over again)".to_string(),
            Reading::Copy => format!(
                "so the inventory this transaction started from is unknown; restore {} from a backup, or remove its transaction directory (the transaction's files are then left as they are, and the next sync takes them over)",
                path.display()
            ),
        };
        anyhow::anyhow!("{} is corrupt: line {line} {why}, {remedy}", path.display())
    };
    let mut pos = 0usize;
    let mut line_no = 0usize;
    while pos < bytes.len() {
        line_no += 1;
        let Some(len) = memchr::memchr(b'\n', &bytes[pos..]) else {
            if reading == Reading::Copy {
                return Err(damaged(line_no, "is unfinished".into()));
            }
            // An append that did not finish: not committed.
            tracing::debug!("{}: ignoring an unfinished last line", path.display());
            break;
        };
        let end = pos + len + 1;
        let line = &bytes[pos..end];
        let record: Record = match super::decode_state(line) {
            Ok(r) => r,
            Err(e) if super::is_newer_format(&e) => {
                return Err(e.context(path.display().to_string()))
            }
            // Torn: the last line, and its checksum does not hold. A line
            // whose checksum holds but which does not read is no torn
            // write (a newer agent's record, say): refused, not skipped.
            Err(_)
                if reading == Reading::Live
                    && end == bytes.len()
                    && !super::envelope_intact(line) =>
            {
                tracing::debug!("{}: ignoring a torn last line", path.display());
                break;
            }
            Err(e) => return Err(damaged(line_no, format!("does not read ({e:#})"))),
        };
        if record.base != meta.sha256 {
            if line_no == 1 {
                // Left from before the base was replaced: nothing in it
                // applies (the next append starts the log afresh).
                return Ok(state);
            }
            return Err(damaged(line_no, "names another base than line 1".into()));
        }
        // Checked here, not only after the whole inventory is read, so
        // that the error names this file and line rather than the base.
        let known = crate::plan::inventory::INVENTORY_VERSION;
        if record.version > known {
            return Err(anyhow::Error::new(super::NewerFormat {
                what: "inventory",
                format: record.version.into(),
                known: known.into(),
            })
            .context(format!("{} line {line_no}", path.display())));
        }
        if record.seq != state.next_seq {
            return Err(damaged(
                line_no,
                format!("is record {} where {} was due", record.seq, state.next_seq),
            ));
        }
        apply(inv, record);
        state.next_seq += 1;
        pos = end;
        state.valid_len = pos as u64;
    }
    Ok(state)
}

/// `inv` with `record` applied.
fn apply(inv: &mut Inventory, r: Record) {
    inv.applied_at = r.applied_at;
    inv.commit = r.commit;
    inv.reboot = r.reboot;
    inv.txid = r.txid;
    inv.version = r.version;
    for p in &r.del_files {
        inv.files.remove(p);
    }
    inv.files.extend(r.files);
    for p in &r.del_dirs {
        inv.dirs.remove(p);
    }
    inv.dirs.extend(r.dirs);
    for p in &r.del_directories {
        inv.directories.remove(p);
    }
    inv.directories.extend(r.directories);
    for p in &r.del_links {
        inv.links.remove(p);
    }
    inv.links.extend(r.links);
}

/// The record that turns `prev` into `next`.
pub fn record(prev: &Inventory, next: &Inventory, base: &str, seq: u64) -> Record {
    record_hinted(prev, next, base, seq, None)
}

/// [`record`], told that file entries can differ between `prev` and
/// `next` only at the paths in `changed` (a repair's planned files: every
/// other entry was carried over as `prev` holds it). Only those are
/// compared, not 10,000 (about half a millisecond of a one-file commit,
/// issue #18). Where the counts of entries say otherwise, every entry is
/// compared, as without the hint; debug builds (the test suite, the kill
/// campaigns) compare every entry always and check that both agree.
pub fn record_hinted(
    prev: &Inventory,
    next: &Inventory,
    base: &str,
    seq: u64,
    changed: Option<&BTreeSet<TargetPath>>,
) -> Record {
    let (files, del_files) = changed
        .and_then(|changed| map_delta_at(&prev.files, &next.files, changed))
        .inspect(|hinted| {
            debug_assert!(
                *hinted == map_delta(&prev.files, &next.files),
                "the hinted delta differs from the whole one"
            );
        })
        .unwrap_or_else(|| map_delta(&prev.files, &next.files));
    let (directories, del_directories) = map_delta(&prev.directories, &next.directories);
    let (links, del_links) = map_delta(&prev.links, &next.links);
    let dirs = next.dirs.difference(&prev.dirs).cloned().collect();
    let del_dirs = prev.dirs.difference(&next.dirs).cloned().collect();
    Record {
        applied_at: next.applied_at,
        base: base.to_string(),
        commit: next.commit.clone(),
        del_directories,
        del_dirs,
        del_files,
        del_links,
        directories,
        dirs,
        files,
        links,
        reboot: next.reboot.clone(),
        seq,
        txid: next.txid.clone(),
        version: next.version,
    }
}

/// The entries of `next` that `prev` lacks or holds otherwise, and the
/// keys of `prev` that `next` lacks.
type Delta<V> = (BTreeMap<TargetPath, V>, BTreeSet<TargetPath>);

/// The [`Delta`] of two maps: one merge of the two sorted maps.
fn map_delta<V: Clone + PartialEq>(
    prev: &BTreeMap<TargetPath, V>,
    next: &BTreeMap<TargetPath, V>,
) -> Delta<V> {
    let mut set = BTreeMap::new();
    let mut del = BTreeSet::new();
    let mut a = prev.iter().peekable();
    let mut b = next.iter().peekable();
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some((k, _)), None) => {
                del.insert((*k).clone());
                a.next();
            }
            (None, Some((k, v))) => {
                set.insert((*k).clone(), (*v).clone());
                b.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    del.insert((*ka).clone());
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    set.insert((*kb).clone(), (*vb).clone());
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if va != vb {
                        set.insert((*kb).clone(), (*vb).clone());
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
    (set, del)
}

/// [`map_delta`] when entries can differ only at the keys in `changed`;
/// `None` when the counts show they differ elsewhere too.
fn map_delta_at<V: Clone + PartialEq>(
    prev: &BTreeMap<TargetPath, V>,
    next: &BTreeMap<TargetPath, V>,
    changed: &BTreeSet<TargetPath>,
) -> Option<Delta<V>> {
    let mut set = BTreeMap::new();
    let mut del = BTreeSet::new();
    let (mut prev_len, mut next_len) = (prev.len(), next.len());
    for k in changed {
        let (a, b) = (prev.get(k), next.get(k));
        prev_len -= usize::from(a.is_some());
        next_len -= usize::from(b.is_some());
        match (a, b) {
            (_, Some(b)) if a != Some(b) => {
                set.insert(k.clone(), b.clone());
            }
            (Some(_), None) => {
                del.insert(k.clone());
            }
            _ => {}
        }
    }
    // The entries outside `changed`, carried: as many on both sides.
    (prev_len == next_len).then_some((set, del))
}

/// The line of `record` as the log holds it.
pub fn encode(record: &Record) -> Result<Vec<u8>> {
    super::encode_state_line(record, STATE_FORMAT_LOGGED)
}

/// Whether a record of `len` bytes may be appended to the log `state`
/// describes, rather than the inventory written whole.
pub fn fits(state: &LogState, len: usize) -> bool {
    state.base.is_some() && state.valid_len + len as u64 <= LOG_MAX_BYTES.max(state.base_len / 4)
}

/// Appends `line` to the log in the directory `dir` after the valid
/// records `state` counted (a torn tail is cut off first; a log that
/// holds no valid record, left from an older base, is replaced by a new
/// file). Not durable yet: the caller syncs the returned file and, when
/// the second value says so (the file is new, or may be), the directory.
/// On error the log is cut back to its valid records, as far as that is
/// possible. `shown` names the log in errors.
pub fn append(dir: &OwnedFd, state: &LogState, line: &[u8], shown: &Path) -> Result<(File, bool)> {
    let open = |flags: OFlag| {
        openat(
            dir,
            LOG,
            OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | flags,
            Mode::from_bits_truncate(0o600),
        )
    };
    let create = || {
        open(OFlag::O_CREAT | OFlag::O_EXCL)
            .with_context(|| format!("cannot create {}", shown.display()))
    };
    let (fd, created) = match open(OFlag::empty()) {
        Ok(fd) => (fd, false),
        Err(Errno::ENOENT) => (create()?, true),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", shown.display())),
    };
    let mut file = File::from(fd);
    let mut meta = file
        .metadata()
        .with_context(|| format!("cannot stat {}", shown.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file: move it away", shown.display());
    }
    if meta.len() < state.valid_len {
        bail!(
            "{} is shorter than when it was read ({} bytes, {} expected): another process changed it; try again",
            shown.display(),
            meta.len(),
            state.valid_len
        );
    }
    if state.valid_len == 0 && meta.len() > 0 && !created {
        // Left from an older base: a new file rather than one truncated
        // and rewritten in place, whose old lines a crash could leave
        // behind the new one.
        nix::unistd::unlinkat(dir, LOG, nix::unistd::UnlinkatFlags::NoRemoveDir)
            .with_context(|| format!("cannot remove the old {}", shown.display()))?;
        file = File::from(create()?);
        meta = file
            .metadata()
            .with_context(|| format!("cannot stat {}", shown.display()))?;
    }
    let written = (|| -> std::io::Result<()> {
        if meta.len() != state.valid_len {
            file.set_len(state.valid_len)?;
        }
        file.write_all_at(line, state.valid_len)
    })();
    if let Err(e) = written {
        let _ = file.set_len(state.valid_len);
        return Err(e).with_context(|| format!("cannot append to {}", shown.display()));
    }
    // A log with no record before this one may have been created by an
    // append that failed before its directory was synced.
    Ok((file, state.valid_len == 0))
}

/// Empties the log (the base already holds what it would say): not
/// durable yet, the caller syncs the returned file, if there is one.
pub fn truncate(dir: &OwnedFd, shown: &Path) -> Result<Option<File>> {
    match openat(
        dir,
        LOG,
        OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => {
            let file = File::from(fd);
            file.set_len(0)
                .with_context(|| format!("cannot empty {}", shown.display()))?;
            Ok(Some(file))
        }
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot open {}", shown.display())),
    }
}

/// Removes the log beside a base that was just written whole (it names
/// the old base, so it is ignored if this does not happen).
pub fn remove(dir: &impl AsFd) {
    match nix::unistd::unlinkat(dir.as_fd(), LOG, nix::unistd::UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => {}
        Err(e) => tracing::debug!("cannot remove the old inventory log: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effects::state::{StateDir, STATE_FORMAT_LOGGED};
    use crate::plan::inventory::INVENTORY_VERSION;

    fn entry(i: usize) -> ManagedEntry {
        ManagedEntry::example(i)
    }

    fn path(i: usize) -> TargetPath {
        TargetPath::parse(&format!("/etc/app/f{i:05}")).unwrap()
    }

    fn inventory_of(entries: impl IntoIterator<Item = (usize, usize)>) -> Inventory {
        Inventory {
            version: INVENTORY_VERSION,
            files: entries
                .into_iter()
                .map(|(p, e)| (path(p), entry(e)))
                .collect(),
            ..Default::default()
        }
    }

    /// A repair names the files it planned: the record made from those
    /// alone is the one every entry's comparison makes, for a change, an
    /// addition and a removal among them; a hint the counts contradict (an
    /// entry added outside it) falls back to comparing every entry.
    #[test]
    fn a_record_from_the_planned_files_is_the_record_of_every_file() {
        let prev = inventory_of((0..50).map(|i| (i, i)));
        let mut next = prev.clone();
        next.files.insert(path(3), entry(1003));
        next.files.remove(&path(7));
        next.files.insert(path(60), entry(60));
        let whole = record(&prev, &next, "b", 1);
        assert_eq!(whole.files.len(), 2);
        assert_eq!(whole.del_files.len(), 1);
        let planned: BTreeSet<TargetPath> = [3, 7, 60, 10].into_iter().map(path).collect();
        let hinted = record_hinted(&prev, &next, "b", 1, Some(&planned));
        assert_eq!(format!("{hinted:?}"), format!("{whole:?}"));
        // An addition outside the hint: the counts differ, all compared.
        next.files.insert(path(70), entry(70));
        let whole = record(&prev, &next, "b", 1);
        let hinted = record_hinted(&prev, &next, "b", 1, Some(&planned));
        assert_eq!(format!("{hinted:?}"), format!("{whole:?}"));
        assert!(hinted.files.contains_key(&path(70)));
    }

    /// The hint's promise (nothing changed outside it) is checked in debug
    /// builds, where the whole suite runs: a broken promise panics there
    /// instead of silently losing a change.
    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "the hinted delta differs")]
    fn a_hint_that_misses_a_changed_entry_fails_in_debug_builds() {
        let prev = inventory_of((0..10).map(|i| (i, i)));
        let mut next = prev.clone();
        next.files.insert(path(4), entry(1004));
        let planned: BTreeSet<TargetPath> = [path(5)].into_iter().collect();
        record_hinted(&prev, &next, "b", 1, Some(&planned));
    }

    /// An inventory of `n` files, committed by `txid`.
    fn inventory(n: usize, txid: &str) -> Inventory {
        Inventory {
            applied_at: 1,
            commit: Some("c0".into()),
            files: (0..n).map(|i| (path(i), entry(i))).collect(),
            txid: txid.into(),
            version: INVENTORY_VERSION,
            ..Default::default()
        }
    }

    /// `inv` after a commit `txid` that changed file 3, removed file 4,
    /// added one, and created a directory.
    fn next(inv: &Inventory, txid: &str) -> Inventory {
        let mut n = inv.clone();
        n.txid = txid.into();
        n.applied_at += 1;
        n.commit = Some(format!("c-{txid}"));
        n.files.get_mut(&path(3)).unwrap().size += 1000;
        n.files.remove(&path(4));
        n.files.insert(path(90_000 + n.files.len()), entry(7));
        n.dirs
            .insert(TargetPath::parse(&format!("/srv/{txid}")).unwrap());
        n
    }

    fn fresh(state: &StateDir) -> (std::sync::Arc<Inventory>, LogState) {
        // Another handle: no cache, everything read from disk.
        StateDir::open(state.path())
            .unwrap()
            .inventory_and_log()
            .unwrap()
    }

    /// A state directory with a base of [`LOG_FROM_FILES`] files (`t0`)
    /// and `commits` records after it (`t1`, ...): every inventory, the
    /// base's first.
    fn committed(commits: usize) -> (tempfile::TempDir, StateDir, Vec<Inventory>) {
        let d = tempfile::tempdir().unwrap();
        let state = StateDir::open(d.path()).unwrap();
        let mut all = vec![inventory(LOG_FROM_FILES, "t0")];
        state.save_inventory(&all[0]).unwrap();
        for i in 1..=commits {
            let n = next(&all[i - 1], &format!("t{i}"));
            state.save_inventory(&n).unwrap();
            all.push(n);
        }
        (d, state, all)
    }

    fn log_len(state: &StateDir) -> u64 {
        std::fs::metadata(state.path().join(LOG)).map_or(0, |m| m.len())
    }

    #[test]
    fn a_large_inventory_is_a_base_then_one_line_per_commit_and_reads_back_whole() {
        let d = tempfile::tempdir().unwrap();
        let state = StateDir::open(d.path()).unwrap();
        let mut inv = inventory(LOG_FROM_FILES, "t0");
        state.save_inventory(&inv).unwrap();
        let base = std::fs::read(state.inventory_path()).unwrap();
        assert_eq!(log_len(&state), 0, "the first write is a base");
        for i in 1..=5 {
            inv = next(&inv, &format!("t{i}"));
            state.save_inventory(&inv).unwrap();
            assert_eq!(*fresh(&state).0, inv, "after commit {i}");
        }
        assert_eq!(
            std::fs::read(state.inventory_path()).unwrap(),
            base,
            "the base is untouched"
        );
        let log = std::fs::read_to_string(state.path().join(LOG)).unwrap();
        assert_eq!(log.lines().count(), 5);
        assert!(
            log.len() < 5 * 2048,
            "one short line per commit: {} bytes",
            log.len()
        );
        let (_, st) = fresh(&state);
        assert_eq!((st.next_seq, st.valid_len), (6, log.len() as u64));
        // The base says it is followed by a log: an older agent refuses it.
        let text = String::from_utf8(base).unwrap();
        assert!(text.contains(&format!("\"driftless_state\":{STATE_FORMAT_LOGGED}")));
    }

    #[test]
    fn a_small_inventory_is_written_whole_in_the_format_older_agents_read() {
        let d = tempfile::tempdir().unwrap();
        let state = StateDir::open(d.path()).unwrap();
        let mut inv = inventory(10, "t0");
        state.save_inventory(&inv).unwrap();
        inv = next(&inv, "t1");
        state.save_inventory(&inv).unwrap();
        assert!(!state.path().join(LOG).exists());
        let text = std::fs::read_to_string(state.inventory_path()).unwrap();
        assert!(text.contains("\"driftless_state\": 1"), "{text}");
        assert_eq!(*fresh(&state).0, inv);
    }

    /// A power loss during an append leaves part of the line: that commit
    /// did not happen (recovery reverts it), the ones before it did, and
    /// the next append cuts the torn part off instead of writing after it
    /// (where a reader would never get to it).
    #[test]
    fn a_torn_last_line_is_an_uncommitted_record_and_the_next_append_replaces_it() {
        let (d, state, v) = committed(1);
        let v1 = v[1].clone();
        let one = log_len(&state);
        state.save_inventory(&next(&v1, "t2")).unwrap();
        let full = std::fs::read(state.path().join(LOG)).unwrap();
        let second = full.len() - one as usize;
        for cut in [1, second / 2, second - 1] {
            std::fs::write(state.path().join(LOG), &full[..one as usize + cut]).unwrap();
            assert_eq!(*fresh(&state).0, v1, "cut {cut} bytes into the second line");
        }
        // Complete but damaged (its page lost): still the last line, torn.
        let mut bad = full.clone();
        bad[one as usize + 40] ^= 1;
        std::fs::write(state.path().join(LOG), &bad).unwrap();
        assert_eq!(*fresh(&state).0, v1);
        // Zeros where the line was (a size extended, its data lost).
        let mut zeros = full[..one as usize].to_vec();
        zeros.extend(std::iter::repeat_n(0u8, second));
        std::fs::write(state.path().join(LOG), &zeros).unwrap();
        let state = StateDir::open(d.path()).unwrap();
        assert_eq!(*state.inventory().unwrap(), v1);
        let v2b = next(&v1, "t2b");
        state.save_inventory(&v2b).unwrap();
        assert_eq!(*fresh(&state).0, v2b);
        assert_eq!(
            std::fs::read_to_string(state.path().join(LOG))
                .unwrap()
                .lines()
                .count(),
            2,
            "the torn line was cut off"
        );
    }

    /// Damage anywhere but at the end is not a torn write: skipping it
    /// would silently forget committed transactions.
    #[test]
    fn damage_before_the_last_line_is_an_error_naming_the_line_and_the_remedy() {
        let (d, state, _) = committed(3);
        let good = std::fs::read(state.path().join(LOG)).unwrap();
        let mut bad = good.clone();
        bad[60] ^= 1;
        std::fs::write(state.path().join(LOG), &bad).unwrap();
        let e = StateDir::open(d.path()).unwrap().inventory().unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("inventory.delta is corrupt: line 1"), "{msg}");
        assert!(msg.contains("driftless state repair"), "{msg}");
        // A line missing from the middle: a gap in the sequence.
        let text = String::from_utf8(good).unwrap();
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        std::fs::write(state.path().join(LOG), [lines[0], lines[2]].concat()).unwrap();
        let msg = format!(
            "{:#}",
            StateDir::open(d.path()).unwrap().inventory().unwrap_err()
        );
        assert!(msg.contains("line 2 is record 3 where 2 was due"), "{msg}");
    }

    /// The base is replaced first and the log removed after: a crash in
    /// between leaves a log whose records name the old base, ignored.
    #[test]
    fn a_log_left_beside_a_new_base_is_ignored_and_the_next_append_starts_it_afresh() {
        let (_d, state, v) = committed(1);
        let v1 = &v[1];
        let old_log = std::fs::read(state.path().join(LOG)).unwrap();
        // A new base (as a compaction or a revert writes it) ...
        let mut v2 = next(v1, "t2");
        v2.files.insert(path(50_000), entry(1));
        crate::effects::state::write_inventory_atomic(&state.inventory_path(), &v2).unwrap();
        // ... and the crash before the log was removed.
        std::fs::write(state.path().join(LOG), &old_log).unwrap();
        let (inv, st) = fresh(&state);
        assert_eq!(*inv, v2);
        assert_eq!((st.valid_len, st.next_seq), (0, 1));
        let v3 = next(&v2, "t3");
        state.save_inventory(&v3).unwrap();
        assert_eq!(*fresh(&state).0, v3);
        assert_eq!(
            std::fs::read_to_string(state.path().join(LOG))
                .unwrap()
                .lines()
                .count(),
            1
        );
    }

    #[test]
    fn the_log_is_compacted_into_a_new_base_before_it_outgrows_its_bound() {
        let d = tempfile::tempdir().unwrap();
        let state = StateDir::open(d.path()).unwrap();
        let mut inv = inventory(LOG_FROM_FILES, "t0");
        state.save_inventory(&inv).unwrap();
        let base_len = std::fs::metadata(state.inventory_path()).unwrap().len();
        let bound = LOG_MAX_BYTES.max(base_len / 4);
        let mut compacted = false;
        for i in 1..2000 {
            // Every file changed: each record is about as large as the
            // base, so the bound is reached within a few commits.
            let mut n = inv.clone();
            n.txid = format!("t{i}");
            for e in n.files.values_mut() {
                e.size += 1;
            }
            state.save_inventory(&n).unwrap();
            inv = n;
            assert!(log_len(&state) <= bound);
            if !state.path().join(LOG).exists() {
                compacted = true;
                break;
            }
        }
        assert!(compacted, "never compacted");
        assert_eq!(*fresh(&state).0, inv);
    }

    #[test]
    fn a_record_changes_what_changed_and_nothing_else() {
        let prev = inventory(20, "t0");
        let mut n = next(&prev, "t1");
        n.reboot = None;
        let r = record(&prev, &n, "b", 1);
        assert_eq!(r.files.keys().collect::<Vec<_>>().len(), 2);
        assert_eq!(r.del_files, [path(4)].into_iter().collect());
        let mut applied = prev.clone();
        apply(&mut applied, r);
        assert_eq!(applied, n);
        // And back: the other direction removes what was added.
        let back = record(&n, &prev, "b", 2);
        let mut undone = n.clone();
        apply(&mut undone, back);
        assert_eq!(undone, prev);
    }

    #[test]
    fn a_planted_link_at_the_log_is_refused_not_followed() {
        let (d, state, v) = committed(0);
        let v0 = &v[0];
        let elsewhere = d.path().join("elsewhere");
        std::fs::write(&elsewhere, "precious").unwrap();
        std::os::unix::fs::symlink(&elsewhere, state.path().join(LOG)).unwrap();
        // The append itself does not follow it either.
        let dir: OwnedFd = std::fs::File::open(d.path()).unwrap().into();
        let line = encode(&record(v0, &next(v0, "t1"), "b", 1)).unwrap();
        assert!(append(&dir, &LogState::default(), &line, &state.log_path()).is_err());
        // Opening the state directory refuses it, naming the file ...
        let e = StateDir::open(d.path()).expect_err("refused");
        assert!(format!("{e:#}").contains("inventory.delta"), "{e:#}");
        // ... and a handle opened before the link appeared reads and
        // writes nothing through it.
        assert!(state.inventory().is_err());
        assert!(state.save_inventory(&next(v0, "t1")).is_err());
        assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "precious");
    }

    /// The bug: a base rewritten with the very bytes it had (a revert to
    /// the inventory the log's records were appended to, when the record
    /// undoing them did not fit) kept its checksum, so the records beside
    /// it still applied, and the transaction they named read as
    /// committed. Now the log is emptied instead.
    #[test]
    fn writing_back_the_base_itself_empties_the_log_instead_of_leaving_it_valid() {
        let (_d, state, mut v) = committed(0);
        let v0 = v.remove(0);
        let base = std::fs::read(state.inventory_path()).unwrap();
        let bound = LOG_MAX_BYTES.max(base.len() as u64 / 4);
        let mut inv = v0.clone();
        let mut i = 0;
        while log_len(&state) + 4096 < bound {
            i += 1;
            inv = next(&inv, &format!("t{i}"));
            state.save_inventory(&inv).unwrap();
        }
        assert_eq!(std::fs::read(state.inventory_path()).unwrap(), base);
        // Undoing all of them takes a record larger than the room left.
        let undo = encode(&record(&inv, &v0, "x", 1)).unwrap();
        assert!(log_len(&state) + undo.len() as u64 > bound, "{} commits", i);
        // (Replaced whole, the log would stay valid until its removal,
        // which a crash or a failed unlink can skip.)
        assert!(matches!(
            state.prepare_inventory(&v0).unwrap(),
            crate::effects::state::InventoryWrite::Truncate
        ));
        state.save_inventory(&v0).unwrap();
        assert_eq!(log_len(&state), 0);
        assert_eq!(std::fs::read(state.inventory_path()).unwrap(), base);
        assert_eq!(*fresh(&state).0, v0);
    }

    /// A last line whose checksum holds but which does not read is no
    /// torn write (a newer agent's record with a field this one does not
    /// know): skipping it would forget a committed transaction.
    #[test]
    fn an_intact_last_line_that_does_not_read_is_refused_not_taken_for_torn() {
        let (d, state, v) = committed(1);
        let v0 = &v[0];
        let (_, st) = fresh(&state);
        let mut r =
            serde_json::to_value(record(v0, &next(v0, "t2"), st.base.as_deref().unwrap(), 2))
                .unwrap();
        r["newer_field"] = serde_json::json!(1);
        let line = crate::effects::state::encode_state_line(&r, STATE_FORMAT_LOGGED).unwrap();
        assert!(crate::effects::state::envelope_intact(&line));
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(state.path().join(LOG))
            .unwrap();
        std::io::Write::write_all(&mut f, &line).unwrap();
        let msg = format!(
            "{:#}",
            StateDir::open(d.path()).unwrap().inventory().unwrap_err()
        );
        assert!(msg.contains("line 2 does not read"), "{msg}");
    }

    /// A record of a newer inventory version was reported against
    /// `inventory.json`, which holds nothing newer: the error names the
    /// log and its line, and is a newer format (refused, never repaired).
    #[test]
    fn a_newer_inventory_version_in_a_record_names_the_log_and_its_line() {
        let (d, state, v) = committed(1);
        let (_, st) = fresh(&state);
        let mut r = record(&v[1], &next(&v[1], "t2"), st.base.as_deref().unwrap(), 2);
        r.version = crate::plan::inventory::INVENTORY_VERSION + 1;
        let line = encode(&r).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(state.path().join(LOG))
            .unwrap();
        std::io::Write::write_all(&mut f, &line).unwrap();
        let err = StateDir::open(d.path()).unwrap().inventory().unwrap_err();
        assert!(crate::effects::state::is_newer_format(&err), "{err:#}");
        let msg = format!("{err:#}");
        assert!(msg.contains("inventory.delta line 2"), "{msg}");
        assert!(!msg.contains("inventory.json"), "{msg}");
    }

    /// A transaction's copy of the log was written whole and made durable
    /// before it touched anything: a missing end is damage, and the error
    /// says what to do about that transaction (not `state repair`, which
    /// leaves transactions alone).
    #[test]
    fn a_transactions_copy_of_the_log_must_be_whole() {
        let (d, state, mut v) = committed(1);
        let v1 = v.remove(1);
        let tx = d.path().join("tx").join("t2");
        std::fs::create_dir_all(&tx).unwrap();
        std::fs::hard_link(state.inventory_path(), tx.join("before.json")).unwrap();
        let (_, st) = state.inventory_and_log().unwrap();
        state.copy_log(&st, &tx.join("before.delta")).unwrap();
        let read =
            |name: &str| crate::effects::state::read_inventory_at(&tx.join("before.json"), name);
        assert_eq!(read("before.delta").unwrap(), Some(v1));
        let copy = std::fs::read(tx.join("before.delta")).unwrap();
        std::fs::write(tx.join("before.delta"), &copy[..copy.len() - 1]).unwrap();
        let msg = format!("{:#}", read("before.delta").unwrap_err());
        assert!(
            msg.contains("before.delta is corrupt: line 1 is unfinished"),
            "{msg}"
        );
        assert!(msg.contains("remove its transaction directory"), "{msg}");
    }

    #[test]
    fn state_repair_moves_a_damaged_log_aside_with_its_base() {
        let (d, state, _) = committed(2);
        let root = tempfile::tempdir().unwrap();
        let mut bad = std::fs::read(state.path().join(LOG)).unwrap();
        bad[50] ^= 1;
        std::fs::write(state.path().join(LOG), &bad).unwrap();
        let state = StateDir::open(d.path()).unwrap();
        let found = crate::sync::state_repair::repair(&state, root.path(), 9).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].problem.contains("inventory.delta is corrupt"),
            "{:?}",
            found[0]
        );
        assert!(d.path().join("inventory.json.corrupt-9").exists());
        assert!(d.path().join("inventory.delta.corrupt-9").exists());
        assert!(!state.path().join(LOG).exists());
        assert!(state.inventory().unwrap().files.is_empty());
    }
}
