//! The state directory (default `/var/lib/driftless`) and the lock.
//!
//! ```text
//! lock              flock(2) target shared by the daemon, the timer and cron
//! inventory.json    what is applied now; replacing it commits a transaction
//! inventory.delta   for 1,000 files and more: the transactions since, one
//!                   line each; appending one commits (see `inventory_log`)
//! history.jsonl     one JSON line per sync attempt (time, commit, result)
//! last-run.json     the outcome of the latest sync, for `status`
//! quick.json        stamps that let an idle poll skip rendering, one line per file (a cache)
//! quick.delta       the quick-check record: its header and its changes to quick.json
//! config.cache      the loaded configuration of the commit the quick-check record names
//! mirror.git/       bare mirror of a remote source (local sources are read in place)
//! tx/<txid>/        journal.json (intent.json before it), switched/committed
//!                   marks, inventory.before.json, backups/ (latest transactions)
//! originals/        files that existed before driftless managed them
//! spool/            webhook events not delivered yet (see `effects::notify::spool`)
//! ```
//!
//! Everything is created mode 0700 / 0600: backups may hold secrets.
//!
//! Every JSON state file (and the anti-rollback record) is an envelope
//! `{"driftless_state": 1, "sha256": …, "data": …}`: versioned, and
//! checksummed so that a flipped bit that still parses is caught (see
//! [`encode_state`]). What can be rebuilt is rebuilt (`sync::state_repair`),
//! except a file of a *newer* format than this binary knows
//! ([`NewerFormat`]): a newer agent may have recorded in it what this one
//! cannot undo (an installed package, a created user), so it is refused,
//! never moved aside or rebuilt. A state that holds only files is written
//! as format 1, byte for byte what older agents wrote, so a downgrade
//! stays possible while nothing else is managed.

pub(crate) mod canonical;
pub mod config_cache;
pub mod floor;
pub mod history;
pub(crate) mod inventory_json;
pub mod inventory_log;
pub mod quick;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::{de::DeserializeOwned, Serialize};

use crate::effects::rootfs::Durability;
use crate::plan::inventory::{Inventory, INVENTORY_VERSION};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/driftless";

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
    /// The inventory as last parsed, with the identity of the file it was
    /// read from (device, inode, size, mtime, taken from the open file). A
    /// run reads it several times (plan, apply, after the commit), and at
    /// 10,000 files each parse costs about 40 ms (bench/run W4). The file
    /// is only ever replaced by a rename, which changes the inode, so an
    /// unchanged identity is an unchanged file.
    inventory_cache: std::sync::Arc<std::sync::Mutex<Option<ParsedInventory>>>,
}

/// How an inventory is written (see [`StateDir::prepare_inventory`]).
pub enum InventoryWrite {
    /// `line` appended to the log after the valid records `log` counted.
    Append {
        line: Vec<u8>,
        log: inventory_log::LogState,
    },
    /// These bytes as `inventory.json`, and no log.
    Whole(Vec<u8>),
    /// The base already holds the inventory: the log is emptied.
    Truncate,
}

/// What tells one version of a state file from another.
type FileId = (u64, u64, u64, i64, i64, i64, i64);

fn file_id(meta: &fs::Metadata) -> FileId {
    use std::os::unix::fs::MetadataExt;
    (
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
    )
}

/// [`file_id`] without the change time, for a file only ever replaced by
/// a rename (a new inode): its ctime also moves when a transaction links
/// it (`inventory.before.json`), which must not make the next read
/// decode it again.
fn replaced_file_id(meta: &fs::Metadata) -> FileId {
    let (dev, ino, len, mtime, mtime_nsec, _, _) = file_id(meta);
    (dev, ino, len, mtime, mtime_nsec, 0, 0)
}

/// An inventory as parsed, the versions of the base and the log it came
/// from, and where the next record goes.
type ParsedInventory = (
    (FileId, Option<FileId>),
    std::sync::Arc<Inventory>,
    inventory_log::LogState,
);

/// Held while a sync (or anything that reads or writes state) runs.
pub struct LockGuard {
    _lock: Flock<File>,
    /// How long another run's lock was waited for (`None`: it was free).
    pub waited: Option<Duration>,
}

/// A state file written by a newer driftless: its envelope (or the
/// inventory's own `version`) is a format this binary does not know. Such
/// a file is never read, moved aside or rebuilt (see the module docs).
#[derive(Debug, thiserror::Error)]
#[error(
    "written by a newer driftless ({what} format {format}; this agent knows up to format {known}): \
     upgrade the agent, or, to downgrade on purpose, move the file away yourself and accept that \
     what it records is forgotten; this agent leaves it untouched"
)]
pub struct NewerFormat {
    /// `state` (the envelope) or `inventory`.
    pub what: &'static str,
    pub format: u64,
    pub known: u64,
}

/// Whether `e` (or one of its causes) is a [`NewerFormat`].
pub fn is_newer_format(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<NewerFormat>().is_some())
}

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
#[error("another driftless run holds the lock {path} (waited {waited:?}); try again later or pass --wait")]
pub struct LockBusy {
    pub path: PathBuf,
    pub waited: Duration,
}

impl StateDir {
    /// Opens (creating if needed) the state directory.
    pub fn open(root: &Path) -> Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .with_context(|| format!("cannot create state directory {}", root.display()))?;
        refuse_shared(root)?;
        refuse_links(root)?;
        for sub in CREATED_SUBDIRS {
            let dir = root.join(sub);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            refuse_shared(&dir)?;
        }
        for dir in SHARED_CHECKED_IF_PRESENT {
            let dir = root.join(dir);
            if dir.exists() {
                refuse_shared(&dir)?;
            }
        }
        Ok(StateDir {
            inventory_cache: Default::default(),
            root: root.to_path_buf(),
        })
    }

    /// Opens an existing state directory without creating anything.
    pub fn existing(root: &Path) -> Option<Self> {
        root.is_dir().then(|| StateDir {
            root: root.to_path_buf(),
            inventory_cache: Default::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }
    pub fn mirror(&self) -> PathBuf {
        self.root.join("mirror.git")
    }
    pub fn tx_dir(&self) -> PathBuf {
        self.root.join("tx")
    }
    pub fn originals(&self) -> PathBuf {
        self.root.join("originals")
    }
    pub fn inventory_path(&self) -> PathBuf {
        self.root.join("inventory.json")
    }
    pub fn history_path(&self) -> PathBuf {
        self.root.join("history.jsonl")
    }
    pub fn last_run_path(&self) -> PathBuf {
        self.root.join("last-run.json")
    }

    /// Takes the exclusive lock, waiting up to `wait` (zero: try once).
    pub fn lock(&self, wait: Duration) -> Result<LockGuard> {
        let path = self.root.join("lock");
        let start = Instant::now();
        let mut file = open_regular_for_write(
            &path,
            OpenOptions::new().create(true).truncate(false).write(true),
            "remove it, then run again",
        )?;
        let mut busy = false;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => {
                    return Ok(LockGuard {
                        _lock: lock,
                        waited: busy.then(|| start.elapsed()),
                    })
                }
                Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                    busy = true;
                    if start.elapsed() >= wait {
                        return Err(LockBusy {
                            path,
                            waited: start.elapsed(),
                        }
                        .into());
                    }
                    file = f;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err((_, e)) => {
                    return Err(e).with_context(|| format!("cannot lock {}", path.display()))
                }
            }
        }
    }

    /// The per-host key for hashing sensitive content (`hash.key`, 32
    /// random bytes, 0600), created on first use.
    pub fn hash_key(&self) -> Result<Vec<u8>> {
        let path = self.root.join("hash.key");
        let corrupt = || {
            anyhow!(
                "{} is corrupt (not 32 bytes): remove it to make a new one",
                path.display()
            )
        };
        let cannot = || format!("cannot read {}", path.display());
        match open_nofollow(&path) {
            // Judged by its size before anything is read.
            Ok((_, meta)) if meta.len() != 32 => return Err(corrupt()),
            Ok((f, _)) => {
                let k = read_up_to(f, 32, 32).with_context(cannot)?;
                return if k.len() == 32 { Ok(k) } else { Err(corrupt()) };
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(cannot),
        }
        let mut key = vec![0u8; 32];
        std::io::Read::read_exact(
            &mut File::open("/dev/urandom").context("cannot open /dev/urandom")?,
            &mut key,
        )
        .context("cannot read /dev/urandom")?;
        write_atomic(&path, &key)?;
        Ok(key)
    }

    /// Removes the state file `name` if it is there (`Ok(false)`: it was
    /// not), without a barrier: the caller decides whether the removal
    /// must be durable now.
    pub fn remove_file(&self, name: &str) -> Result<bool> {
        let path = self.root.join(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e)
                .with_context(|| format!("cannot remove {}; remove it by hand", path.display())),
        }
    }

    /// The current inventory; empty if nothing was ever applied.
    ///
    /// Holds the cache for the whole read: a second caller (the planner,
    /// while [`StateDir::prefetch_inventory`] still decodes) waits for the
    /// first one's result instead of decoding the same file again.
    pub fn inventory(&self) -> Result<std::sync::Arc<Inventory>> {
        self.inventory_and_log().map(|(inv, _)| inv)
    }

    /// [`StateDir::inventory`] (its base and the records of
    /// `inventory.delta`, see [`inventory_log`]) and what the next commit
    /// appends to.
    pub fn inventory_and_log(
        &self,
    ) -> Result<(std::sync::Arc<Inventory>, inventory_log::LogState)> {
        let mut cache = self
            .inventory_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let path = self.inventory_path();
        let log_path = self.log_path();
        let (f, meta) = match open_nofollow(&path) {
            Ok(opened) => opened,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let empty = Inventory {
                    version: INVENTORY_VERSION,
                    ..Default::default()
                };
                return Ok((std::sync::Arc::new(empty), Default::default()));
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let log = match open_nofollow(&log_path) {
            Ok((f, meta)) => Some((f, file_id(&meta))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", log_path.display())),
        };
        let id = (replaced_file_id(&meta), log.as_ref().map(|(_, id)| *id));
        if let Some((cached, inv, log_state)) = cache.as_ref() {
            if *cached == id {
                return Ok((inv.clone(), log_state.clone()));
            }
        }
        let bytes = read_up_to(f, meta.len(), STATE_READ_MAX_BYTES).with_context(|| {
            format!(
                "cannot read {}; run `driftless state repair`",
                path.display()
            )
        })?;
        let log_bytes = match log {
            Some((f, (_, _, len, ..))) => Some(
                read_up_to(f, len, inventory_log::READ_MAX_BYTES).with_context(|| {
                    format!(
                        "cannot read {}; run `driftless state repair`",
                        log_path.display()
                    )
                })?,
            ),
            None => None,
        };
        let (inv, log_state) = decode_inventory(
            &path,
            &bytes,
            &log_path,
            log_bytes.as_deref(),
            inventory_log::Reading::Live,
        )?;
        let inv = std::sync::Arc::new(inv);
        *cache = Some((id, inv.clone(), log_state.clone()));
        Ok((inv, log_state))
    }

    /// How `next` is to be written as the inventory: one record appended
    /// to `inventory.delta` when the current base takes a log and the record
    /// fits, otherwise whole, as a new base (see [`inventory_log`]).
    pub fn prepare_inventory(&self, next: &Inventory) -> Result<InventoryWrite> {
        // The current base, when it takes a log and `next` may use one.
        let current = if next.files.len() >= inventory_log::log_from() {
            let (prev, log) = self.inventory_and_log()?;
            log.base.is_some().then_some((prev, log))
        } else {
            None
        };
        if let Some((prev, log)) = &current {
            if let Some(base) = &log.base {
                let record = inventory_log::record(prev, next, base, log.next_seq);
                let line = inventory_log::encode(&record)?;
                if inventory_log::fits(log, line.len()) {
                    let log = log.clone();
                    return Ok(InventoryWrite::Append { line, log });
                }
            }
        }
        let bytes = encode_inventory(next)?;
        // The very base there is (the same data, the same checksum): a log
        // beside it names it, so replacing the file would not make that
        // log stale. Emptying the log is what writes `next`.
        if current.is_some_and(|(_, log)| log.base == envelope_sum(&bytes)) {
            return Ok(InventoryWrite::Truncate);
        }
        Ok(InventoryWrite::Whole(bytes))
    }

    /// The state directory, opened as a directory (for `*at` calls).
    fn open_dir(&self) -> Result<std::os::fd::OwnedFd> {
        nix::fcntl::open(
            self.path(),
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .with_context(|| format!("cannot open {}", self.path().display()))
    }

    /// Where the log is, for messages.
    pub fn log_path(&self) -> PathBuf {
        self.root.join(inventory_log::LOG)
    }

    /// Replaces the inventory with `next`, durably: one record appended
    /// and `fdatasync`ed, or the whole file replaced atomically (and a log
    /// beside the old base removed).
    pub fn save_inventory(&self, next: &Inventory) -> Result<()> {
        match self.prepare_inventory(next)? {
            InventoryWrite::Whole(bytes) => {
                write_atomic(&self.inventory_path(), &bytes)?;
                crate::effects::failpoint::hit("state.inventory.replaced")?;
                if let Ok(dir) = self.open_dir() {
                    inventory_log::remove(&dir);
                }
                Ok(())
            }
            InventoryWrite::Truncate => {
                let dir = self.open_dir()?;
                if let Some(file) = inventory_log::truncate(&dir, &self.log_path())? {
                    file.sync_data().with_context(|| {
                        format!("cannot make {} durable", self.log_path().display())
                    })?;
                }
                Ok(())
            }
            InventoryWrite::Append { line, log } => {
                let dir = self.open_dir()?;
                let (file, created) = inventory_log::append(&dir, &log, &line, &self.log_path())?;
                let synced = crate::effects::failpoint::hit("state.inventory.appended")
                    .map_err(std::io::Error::other)
                    .and_then(|()| file.sync_data())
                    .and_then(|()| {
                        if created {
                            File::from(dir).sync_all()
                        } else {
                            Ok(())
                        }
                    });
                if let Err(e) = synced {
                    let _ = file.set_len(log.valid_len);
                    return Err(e).with_context(|| {
                        format!("cannot make {} durable", self.log_path().display())
                    });
                }
                Ok(())
            }
        }
    }

    /// Copies the valid records of `inventory.delta` that `log` counted to
    /// `dest` (not durable: the caller's barrier).
    pub fn copy_log(&self, log: &inventory_log::LogState, dest: &Path) -> Result<()> {
        let path = self.log_path();
        let mut bytes = Vec::new();
        open_nofollow(&path)
            .and_then(|(f, _)| {
                std::io::Read::read_to_end(&mut std::io::Read::take(f, log.valid_len), &mut bytes)
            })
            .with_context(|| format!("cannot read {}", path.display()))?;
        if bytes.len() as u64 != log.valid_len {
            bail!("{} changed while it was read", path.display());
        }
        replace(dest, &bytes, Durability::None)
    }

    /// Starts reading the inventory on another thread, so that its decode
    /// (15 ms at 10,000 files) overlaps the loading of the repository's
    /// configuration instead of following it. Whoever calls
    /// [`StateDir::inventory`] next gets the result, or an error of its
    /// own read.
    pub fn prefetch_inventory(&self) {
        let state = self.clone();
        let spawned = std::thread::Builder::new()
            .name("inventory".into())
            .spawn(move || {
                let _ = state.inventory();
            });
        if let Err(e) = spawned {
            tracing::debug!("inventory not read ahead: {e}");
        }
    }
}

/// The entries of a state directory that must be what they say: a symlink
/// planted at any of them (the state directory is untrusted input under
/// `--root`) would make the agent read or write a host file of the
/// link's choosing.
const STATE_ENTRIES: &[&str] = &[
    "lock",
    "inventory.json",
    "inventory.delta",
    "history.jsonl",
    "last-run.json",
    "marks.json",
    "quick.json",
    "quick.delta",
    "hash.key",
    "mirror.git",
    "tx",
    "originals",
    "spool",
];

/// The directories [`StateDir::open`] creates in the state directory.
const CREATED_SUBDIRS: [&str; 2] = ["tx", "originals"];

/// Refuses a state directory (or one of its directories) that a user
/// other than the agent's or root owns, or that group or others may
/// write: whoever can write it can make the agent remove files (a forged
/// inventory), restore any content over them (forged originals) or reuse
/// a forged configuration cache. Like
/// OpenSSH's `StrictModes`, the agent does not run on state it cannot
/// trust, and says how to fix it. (It does not check the ancestors: a
/// writable `/var/lib` is a broken host, not a driftless setting.)
fn refuse_shared(dir: &Path) -> Result<()> {
    refuse_shared_for(dir, nix::unistd::geteuid().as_raw())
}

/// [`refuse_shared`] for an agent running as uid `me`.
fn refuse_shared_for(dir: &Path, me: u32) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(dir).with_context(|| format!("cannot stat {}", dir.display()))?;
    // Root may own it: root can write anything anyway.
    if meta.uid() != me && meta.uid() != 0 {
        bail!(
            "state directory {} is owned by uid {}, not by the user driftless runs as (uid {me}): whoever owns it could forge what driftless trusts there (the inventory of what it manages, the backups it restores); `chown {me} {}`, or pass another --state-dir",
            dir.display(),
            meta.uid(),
            dir.display()
        );
    }
    if meta.mode() & 0o022 != 0 {
        bail!(
            "state directory {} is writable by group or others (mode {:04o}): anyone who can write it could forge what driftless trusts there (the inventory of what it manages, the backups it restores); `chmod 700 {}`",
            dir.display(),
            meta.mode() & 0o7777,
            dir.display()
        );
    }
    Ok(())
}

/// Directories of the state checked like the state directory when they
/// exist (the agent creates them later, or an older agent did): the
/// mirror holds the commits a sync applies, the spool what a stick
/// carries back.
const SHARED_CHECKED_IF_PRESENT: &[&str] = &["mirror.git", "spool"];

/// Why the state directory at `root` (or one of its directories) could
/// not be trusted, for `driftless state check`: what [`StateDir::open`]
/// refuses.
pub fn sharing_problems(root: &Path) -> Vec<(PathBuf, anyhow::Error)> {
    let subdirs = CREATED_SUBDIRS.iter().chain(SHARED_CHECKED_IF_PRESENT);
    std::iter::once(root.to_path_buf())
        .chain(subdirs.map(|d| root.join(d)))
        .filter(|d| d.exists())
        .filter_map(|d| refuse_shared(&d).err().map(|e| (d, e)))
        .collect()
}

/// Refuses a state directory with a symlink at one of its entries, naming
/// it (`driftless state repair` does not guess: the operator removes it).
fn refuse_links(root: &Path) -> Result<()> {
    for name in STATE_ENTRIES {
        let p = root.join(name);
        if fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
            bail!(
                "{} is a symlink: driftless never follows links in its state directory; remove it (the agent rebuilds what it needs)",
                p.display()
            );
        }
    }
    Ok(())
}

/// Refuses a device, FIFO or socket at `path` before it is opened: opening
/// a device node planted in the state directory can have effects of its
/// own (a watchdog armed, a tape rewound), and its open's error would be
/// taken for a failed read of a file. (A symlink is left to `O_NOFOLLOW`;
/// what is opened is checked again, since this can race.)
pub(crate) fn refuse_special(path: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if !m.is_file() && !m.file_type().is_symlink() => {
            Err(std::io::Error::other("not a regular file"))
        }
        _ => Ok(()),
    }
}

/// Opens (creating, 0600) the state file `path` for writing with `opts`:
/// never through a symlink at the last component, never a device, FIFO or
/// socket (a FIFO planted at the lock or the history blocked the agent
/// forever in open(2)). A refusal says `remedy`.
pub(crate) fn open_regular_for_write(
    path: &Path,
    opts: &mut OpenOptions,
    remedy: &str,
) -> Result<File> {
    let refused = || anyhow::anyhow!("{} is not a regular file: {remedy}", path.display());
    refuse_special(path).map_err(|_| refused())?;
    let f = opts
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .with_context(|| {
            format!(
                "cannot open {} (if it is not a regular file: {remedy})",
                path.display()
            )
        })?;
    if !f.metadata().is_ok_and(|m| m.is_file()) {
        return Err(refused());
    }
    Ok(f)
}

/// Opens a state file without following a symlink at the last
/// component; anything but a regular file is refused.
pub(crate) fn open_nofollow(path: &Path) -> std::io::Result<(File, fs::Metadata)> {
    refuse_special(path)?;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok((f, meta))
}

/// The lines of a state file's text, each ended by a line break, found
/// with `memchr` (SIMD; `str::split`, compiled for size with the rest of
/// the agent, was most of reading 10,000 lines). A last line without its
/// break is not one: [`Lines::rest`] holds it.
pub(crate) struct Lines<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Lines<'a> {
    pub(crate) fn new(text: &'a str) -> Self {
        Lines { text, pos: 0 }
    }

    /// What follows the last line taken (empty after the last line of a
    /// whole file).
    pub(crate) fn rest(&self) -> &'a str {
        &self.text[self.pos..]
    }
}

impl<'a> Iterator for Lines<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let end = self.pos + memchr::memchr(b'\n', self.rest().as_bytes())?;
        let line = &self.text[self.pos..end];
        self.pos = end + 1;
        Some(line)
    }
}

/// [`read_nofollow`] of a file no larger than `max` bytes (a larger one
/// is an error, and is not read).
pub(crate) fn read_nofollow_up_to(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let (f, meta) = open_nofollow(path)?;
    read_up_to(f, meta.len(), max)
}

/// The content of the open file `f` (`len` bytes when it was stat'ed),
/// refused when it is, or grows, larger than `max`.
pub(crate) fn read_up_to(f: File, len: u64, max: u64) -> std::io::Result<Vec<u8>> {
    if len > max {
        return Err(std::io::Error::other(format!(
            "{len} bytes, more than {max}"
        )));
    }
    // Room for all of it and the read that finds the end: one read of the
    // whole file, not `read_to_end`'s probing reads of 32, 64, 128...
    // bytes and a reallocation after each.
    let mut out = Vec::with_capacity(usize::try_from(len).map_or(0, |n| n.saturating_add(1)));
    std::io::Read::read_to_end(&mut std::io::Read::take(f, max.saturating_add(1)), &mut out)?;
    if out.len() as u64 > max {
        return Err(std::io::Error::other(format!("more than {max} bytes")));
    }
    Ok(out)
}

/// The largest state file read (an inventory or a journal of a million
/// files is a few hundred MB). The state directory is untrusted input: a
/// sparse file of a terabyte must be refused by its size, not read into
/// memory until the agent is killed, and then it reads as corrupt (the
/// inventory is moved aside and rebuilt, see `sync::state_repair`).
pub const STATE_READ_MAX_BYTES: u64 = 1 << 30;

/// The largest small state file read: a record of bounded size (metrics,
/// the record of a saved original, a reboot permit, a FleetLock slot, a
/// few KB each). Under [`STATE_READ_MAX_BYTES`], a sparse or damaged one
/// of 512 MiB was read whole, into as much memory, on every run; now it is
/// refused by its size like any corrupt file. Not for a file that can
/// hold a long error message or a list of managed files (see
/// [`read_json_large`]).
pub const SMALL_STATE_READ_MAX_BYTES: u64 = 16 << 20;

/// Whether reading a state file failed for the read's sake (EIO, EACCES,
/// a MAC denial: an OS error), not for what the file is or holds: a link
/// (ELOOP), a socket or device (ENXIO, ENODEV), not a regular file or over
/// its cap (refused by driftless itself), content that does not decode.
/// Such a file says nothing about its content, and repair must leave it:
/// moving an inventory aside for a passing EIO had every file taken over
/// again and the record of what was pruned lost.
pub(crate) fn read_failed(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| {
            io.raw_os_error().is_some_and(|code| {
                ![nix::libc::ELOOP, nix::libc::ENXIO, nix::libc::ENODEV].contains(&code)
            })
        })
}

/// `fs::read` that does not follow a symlink at the last component, of a
/// file no larger than [`STATE_READ_MAX_BYTES`].
pub(crate) fn read_nofollow(path: &Path) -> std::io::Result<Vec<u8>> {
    read_nofollow_up_to(path, STATE_READ_MAX_BYTES)
}

/// Decodes the state file `path` read as `bytes`, its errors named.
fn decode_file<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T> {
    name_decode_error(path, decode_state(bytes))
}

/// [`decode_file`] and the envelope's [`EnvelopeMeta`].
fn name_decode_error<T>(path: &Path, decoded: Result<T>) -> Result<T> {
    match decoded {
        Ok(v) => Ok(v),
        // It says what it is; "corrupt" would send the reader astray.
        Err(e) if is_newer_format(&e) => Err(e.context(path.display().to_string())),
        Err(e) => Err(e.context(format!("{} is corrupt", path.display()))),
    }
}

/// An inventory from the bytes of its base (`path`) and of its log
/// (`log`, `None` when there is none), its version checked.
fn decode_inventory(
    path: &Path,
    bytes: &[u8],
    log_path: &Path,
    log: Option<&[u8]>,
    reading: inventory_log::Reading,
) -> Result<(Inventory, inventory_log::LogState)> {
    // The compact envelope's data through the inventory's own reader
    // (anything it does not read, serde reads; see `inventory_json::read`).
    let read =
        |data: &[u8]| inventory_json::read(data).or_else(|| serde_json::from_slice(data).ok());
    let (mut inv, meta): (Inventory, _) = name_decode_error(path, decode_state_meta(bytes, read))?;
    let log_state =
        inventory_log::apply_log(log_path, log, &meta, bytes.len() as u64, &mut inv, reading)?;
    if u64::from(inv.version) > u64::from(INVENTORY_VERSION) {
        return Err(anyhow::Error::new(NewerFormat {
            what: "inventory",
            format: inv.version.into(),
            known: INVENTORY_VERSION.into(),
        })
        .context(path.display().to_string()));
    }
    if inv.version != INVENTORY_VERSION {
        bail!(
            "{}: inventory format {} is not supported by this driftless (expects {INVENTORY_VERSION}); was the agent downgraded?",
            path.display(),
            inv.version
        );
    }
    Ok((inv, log_state))
}

/// The inventory kept at `path` and, beside it, the log named `log_name`
/// (a transaction's copy of the inventory it started from); `Ok(None)`
/// if there is no base.
pub fn read_inventory_at(path: &Path, log_name: &str) -> Result<Option<Inventory>> {
    let bytes = match read_nofollow(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let log_path = path.with_file_name(log_name);
    let log = match read_nofollow_up_to(&log_path, inventory_log::READ_MAX_BYTES) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", log_path.display())),
    };
    decode_inventory(
        path,
        &bytes,
        &log_path,
        log.as_deref(),
        inventory_log::Reading::Copy,
    )
    .map(|(inv, _)| Some(inv))
}

/// Reads a small JSON state file, a record of bounded size (at most
/// [`SMALL_STATE_READ_MAX_BYTES`]: metrics, the record of a saved
/// original, a reboot permit, a FleetLock slot...); `Ok(None)` if it does
/// not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    read_json_up_to(path, SMALL_STATE_READ_MAX_BYTES)
}

/// [`read_json`] of a file that can grow with the number of managed files
/// or hold a long error message (a journal, the marks and the last run,
/// whose halt reasons and errors can list every file of a failed revert;
/// the record of reboots, listing every file that asked for one): up to
/// [`STATE_READ_MAX_BYTES`].
pub fn read_json_large<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    read_json_up_to(path, STATE_READ_MAX_BYTES)
}

/// [`read_json`] of a file of at most `max` bytes.
pub(crate) fn read_json_up_to<T: DeserializeOwned>(path: &Path, max: u64) -> Result<Option<T>> {
    let bytes = match read_nofollow_up_to(path, max) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    decode_file(path, &bytes).map(Some)
}

/// Format of the state envelope (`driftless_state`) of a state that holds
/// only files: what every driftless so far wrote, and still writes.
pub const STATE_FORMAT: u64 = 1;

/// The envelope format of a journal or inventory that records something
/// agents before it cannot read or undo: a file with `reboot = true` or a
/// pending reboot request ([`Inventory::uses_reboot`]), managed symlinks
/// or removed ones ([`Inventory::uses_links`]), managed directories
/// ([`Inventory::uses_directories`]). Agents since step 0 of
/// `docs/design/resources.md` refuse it as [`NewerFormat`] rather than
/// rebuild it as corrupt. (It was called `STATE_FORMAT_REBOOT`, after the
/// first kind that needed it.)
pub const STATE_FORMAT_RESOURCES: u64 = 2;

/// The envelope format of a journal that records accounts
/// (`[[users]]`, `[[groups]]`). Agents that read format 2 but know no
/// accounts would recover such a transaction's files and silently drop
/// the record of the accounts it made (their journal ignores unknown
/// fields): they must refuse it instead.
pub const STATE_FORMAT_ACCOUNTS: u64 = 3;

/// The envelope format of an inventory that may be followed by
/// `inventory.delta` (large inventories, see [`inventory_log`]), and of
/// that log's records. An agent before it would read the base alone and
/// forget every transaction the log records: it must refuse the file.
pub const STATE_FORMAT_LOGGED: u64 = 4;

/// The newest envelope format this binary reads. A larger one is a
/// [`NewerFormat`], refused.
pub const STATE_FORMAT_MAX: u64 = STATE_FORMAT_LOGGED;

/// The envelope format `inv` is written with: 1 ([`STATE_FORMAT`], the
/// bytes every agent so far wrote) unless it uses `reboot`.
pub fn inventory_format(inv: &Inventory) -> u64 {
    if inv.files.len() >= inventory_log::log_from() {
        STATE_FORMAT_LOGGED
    } else if inv.uses_reboot() || inv.uses_links() || inv.uses_directories() {
        STATE_FORMAT_RESOURCES
    } else {
        STATE_FORMAT
    }
}

/// [`write_json_atomic`] for an inventory, in [`inventory_format`].
pub fn write_inventory_atomic(path: &Path, inv: &Inventory) -> Result<()> {
    write_atomic(path, &encode_inventory(inv)?)
}

/// [`write_json_replace`] for an inventory, in [`inventory_format`].
pub fn write_inventory_replace(path: &Path, inv: &Inventory) -> Result<()> {
    replace(path, &encode_inventory(inv)?, Durability::None)
}

/// [`encode_state`] of an inventory in [`inventory_format`]: the same
/// bytes, its data written by `inventory_json` when it is large.
pub fn encode_inventory(inv: &Inventory) -> Result<Vec<u8>> {
    let format = inventory_format(inv);
    // Written in place after the envelope's head, not copied into it: a
    // second buffer of 2 MB at 10,000 files was a memcpy and 500 page
    // faults of a one-file commit.
    // (+128: the envelope's tail, so that closing it never reallocates.)
    let mut out = Vec::with_capacity(COMPACT_HEAD.len() + 256 + 128 + inv.files.len() * 224);
    out.extend_from_slice(COMPACT_HEAD);
    inventory_json::write(&mut out, inv)?;
    if out.len() - COMPACT_HEAD.len() <= PRETTY_UP_TO {
        return encode_state(inv, format);
    }
    close_compact_envelope(&mut out, format);
    Ok(out)
}

/// [`encode_state`] always compact, on one line (the records of
/// `inventory.delta`, whatever their size).
pub(crate) fn encode_state_line<T: Serialize>(value: &T, format: u64) -> Result<Vec<u8>> {
    if !(STATE_FORMAT..=STATE_FORMAT_MAX).contains(&format) {
        bail!("cannot write state format {format}: this driftless writes formats {STATE_FORMAT} to {STATE_FORMAT_MAX}");
    }
    let (direct, canonical) = canonical::to_vec_checked(value).context("cannot serialise state")?;
    if canonical {
        return Ok(compact_envelope(&direct, format));
    }
    let data = serde_json::to_value(value).context("cannot serialise state")?;
    let text = serde_json::to_vec(&data).context("cannot serialise state")?;
    Ok(compact_envelope(&text, format))
}

/// How a compact envelope starts; its data follows.
const COMPACT_HEAD: &[u8] = br#"{"data":"#;

/// `{"data":DATA,"driftless_state":F,"sha256":H}` and a line break, for
/// `data` already compact and canonical.
fn compact_envelope(data: &[u8], format: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(COMPACT_HEAD.len() + data.len() + 128);
    out.extend_from_slice(COMPACT_HEAD);
    out.extend_from_slice(data);
    close_compact_envelope(&mut out, format);
    out
}

/// Ends the compact envelope whose head and data `out` holds.
fn close_compact_envelope(out: &mut Vec<u8>, format: u64) {
    use sha2::Digest;
    let sum = hex::encode(sha2::Sha256::digest(&out[COMPACT_HEAD.len()..]));
    out.extend_from_slice(format!(r#","driftless_state":{format},"sha256":"{sum}"}}"#).as_bytes());
    out.push(b'\n');
}

/// State files up to this size (their compact data) are pretty-printed
/// for the person who opens them; larger ones, which nobody reads by eye
/// (the inventory of thousands of files: 3 MB pretty, 2 MB compact), are
/// written compact on one line, which also spares the reader the
/// whitespace (`jq . FILE` shows them pretty).
const PRETTY_UP_TO: usize = 64 * 1024;

/// A state file's bytes: `{"driftless_state": F, "sha256": H, "data": V}`,
/// where F is `format` (1, [`STATE_FORMAT`], unless the state holds
/// something an older agent could not undo) and H is the sha256 of V's
/// compact JSON. A parse error catches a torn file; the checksum catches
/// what still parses (a flipped bit in a commit id would otherwise be
/// believed).
pub fn encode_state<T: Serialize>(value: &T, format: u64) -> Result<Vec<u8>> {
    use sha2::Digest;
    if !(STATE_FORMAT..=STATE_FORMAT_MAX).contains(&format) {
        bail!("cannot write state format {format}: this driftless writes formats {STATE_FORMAT} to {STATE_FORMAT_MAX}");
    }
    /// The envelope, its keys in order.
    #[derive(Serialize)]
    struct Envelope<'a, D: Serialize> {
        data: &'a D,
        driftless_state: u64,
        sha256: &'a str,
    }
    // The canonical JSON is what a `serde_json::Value` of `value` (keys
    // sorted) serialises to. A type whose fields are declared in order
    // serialises to exactly that by itself (checked while it is written,
    // every time: `canonical`), so the tree is built only for the others.
    let (direct, canonical) = canonical::to_vec_checked(value).context("cannot serialise state")?;
    if canonical {
        if direct.len() > PRETTY_UP_TO {
            // The envelope around these very bytes, keys in the same order
            // as the pretty one: no second serialisation.
            return Ok(compact_envelope(&direct, format));
        }
        let sum = hex::encode(sha2::Sha256::digest(&direct));
        return serde_json::to_vec_pretty(&Envelope {
            data: value,
            driftless_state: format,
            sha256: &sum,
        })
        .context("cannot serialise state");
    }
    let data = serde_json::to_value(value).context("cannot serialise state")?;
    let sum = hex::encode(sha2::Sha256::digest(
        serde_json::to_vec(&data).context("cannot serialise state")?,
    ));
    serde_json::to_vec_pretty(&Envelope {
        data: &data,
        driftless_state: format,
        sha256: &sum,
    })
    .context("cannot serialise state")
}

/// Reads what [`encode_state`] wrote, checking version and checksum. A
/// file without the envelope (written before it existed) is read as it is.
pub fn decode_state<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    if let Some(v) = decode_state_fast(bytes) {
        return Ok(v);
    }
    decode_state_slow(bytes)
}

/// The envelope with `data` left as text (and nothing else in it).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvelope<'a> {
    driftless_state: u64,
    sha256: &'a str,
    #[serde(borrow)]
    data: &'a serde_json::value::RawValue,
}

/// [`decode_state`] without building a `serde_json::Value` of the whole
/// file (at 10,000 managed files, the inventory is 3 MB and that tree
/// was most of a run's cost to read it): the checksum is taken over the
/// data's text with its insignificant whitespace removed, which is the
/// compact JSON [`encode_state`] hashed, and the data is parsed straight
/// into `T`. `None` whenever anything differs from what this driftless
/// writes (a checksum that does not match this way, an unknown format, a
/// file without the envelope, a key the envelope does not have):
/// [`decode_state_slow`] then decides, with its own errors. A flipped bit
/// or a torn write is refused by both. What differs: a file whose
/// checksum someone recomputed over exotic spellings the reference
/// reader normalises away (`\u0041`, `1e5`, a duplicate key) can read
/// here and be refused there; the checksum is no signature, and whoever
/// can rewrite the state directory can write a valid file anyway.
fn decode_state_fast<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    use sha2::Digest;
    if let Some((data, sum)) = compact_parts(bytes) {
        // The data is parsed once (below), not also scanned as a raw
        // value: parsing it whole into `T` is what proves it one value.
        if hex::encode(sha2::Sha256::digest(data)) == sum {
            if let Ok(v) = serde_json::from_slice(data) {
                return Some(v);
            }
        }
    }
    let env: RawEnvelope = serde_json::from_slice(bytes).ok()?;
    if !(STATE_FORMAT..=STATE_FORMAT_MAX).contains(&env.driftless_state) {
        return None;
    }
    let raw = env.data.get().as_bytes();
    // Written compact (large files; JSON strings never hold a raw line
    // break, pretty-printed data always does): the text is what was hashed.
    if !raw.contains(&b'\n') {
        if hex::encode(sha2::Sha256::digest(raw)) != env.sha256 {
            return None;
        }
        return serde_json::from_slice(raw).ok();
    }
    let compact = strip_json_whitespace(raw);
    if hex::encode(sha2::Sha256::digest(&compact)) != env.sha256 {
        return None;
    }
    serde_json::from_slice(&compact).ok()
}

/// The data and checksum of a file exactly as [`compact_envelope`] writes
/// it: `{"data":` DATA `,"driftless_state":F,"sha256":"H"}` and a line
/// break, F a format this driftless reads, H 64 lowercase hex digits.
/// The tail is fixed, so it is matched from the end; a key of that text
/// inside DATA cannot be mistaken for it, since the tail is taken last
/// and DATA must then parse as one value. Anything else is `None`.
fn compact_parts(bytes: &[u8]) -> Option<(&[u8], &str)> {
    compact_parts_with_format(bytes).map(|(data, sum, _)| (data, sum))
}

/// [`compact_parts`] and the envelope's format.
fn compact_parts_with_format(bytes: &[u8]) -> Option<(&[u8], &str, u64)> {
    let rest = bytes.strip_prefix(COMPACT_HEAD)?;
    let rest = rest.strip_suffix(b"\"}\n")?;
    let (rest, sum) = rest.split_at_checked(rest.len().checked_sub(64)?)?;
    let sum = std::str::from_utf8(sum).ok()?;
    if !sum
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let rest = rest.strip_suffix(br#","sha256":""#)?;
    let digits = rest.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    let (rest, format) = rest.split_at(rest.len() - digits);
    let format: u64 = std::str::from_utf8(format).ok()?.parse().ok()?;
    if !(STATE_FORMAT..=STATE_FORMAT_MAX).contains(&format) {
        return None;
    }
    let data = rest.strip_suffix(br#","driftless_state":"#)?;
    // Compact data has no line break (JSON strings never hold a raw one):
    // the text is what was hashed, as in the general path below.
    if memchr::memchr(b'\n', data).is_some() {
        return None;
    }
    Some((data, sum, format))
}

/// JSON text without the whitespace outside its strings. One pass that
/// copies the runs between whitespace (pretty-printed JSON has some every
/// few bytes, too often for a `memchr` per run to pay).
fn strip_json_whitespace(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut run = 0;
    for (i, &b) in text.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
            out.extend_from_slice(&text[run..i]);
            run = i + 1;
        } else if b == b'"' {
            in_string = true;
        }
    }
    out.extend_from_slice(&text[run..]);
    out
}

/// The fast path took `bytes` and read what the reference reads (for the
/// tests): never a value the reference would refuse or read otherwise.
#[cfg(test)]
fn decoders_agree(bytes: &[u8]) -> bool {
    match decode_state_fast::<serde_json::Value>(bytes) {
        None => true,
        Some(fast) => decode_state_slow::<serde_json::Value>(bytes).is_ok_and(|slow| slow == fast),
    }
}

/// [`decode_state`] through a `serde_json::Value` of the whole file: the
/// reference, for every file the fast path does not take.
fn decode_state_slow<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    decode_state_slow_meta(bytes).map(|(v, _)| v)
}

/// What an envelope says about its data: its format and checksum (0 and
/// empty for a file written before the envelope existed).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EnvelopeMeta {
    pub format: u64,
    pub sha256: String,
}

/// Whether `bytes` is an envelope in the compact form whose checksum
/// holds (whatever its data turns out to hold).
pub(crate) fn envelope_intact(bytes: &[u8]) -> bool {
    use sha2::Digest;
    compact_parts_with_format(bytes)
        .is_some_and(|(data, sum, _)| hex::encode(sha2::Sha256::digest(data)) == sum)
}

/// The checksum an envelope [`encode_state`] wrote says its data has.
fn envelope_sum(bytes: &[u8]) -> Option<String> {
    if let Some((_, sum, _)) = compact_parts_with_format(bytes) {
        return Some(sum.to_string());
    }
    serde_json::from_slice::<RawEnvelope>(bytes)
        .ok()
        .map(|e| e.sha256.to_string())
}

/// [`decode_state`] and the envelope's [`EnvelopeMeta`].
///
/// The compact envelope's data (its checksum verified first) is read by
/// `read`; what it does not read takes the general path.
fn decode_state_meta<T: DeserializeOwned>(
    bytes: &[u8],
    read: impl FnOnce(&[u8]) -> Option<T>,
) -> Result<(T, EnvelopeMeta)> {
    use sha2::Digest;
    if let Some((data, sum, format)) = compact_parts_with_format(bytes) {
        if hex::encode(sha2::Sha256::digest(data)) == sum {
            if let Some(v) = read(data) {
                let meta = EnvelopeMeta {
                    format,
                    sha256: sum.to_string(),
                };
                return Ok((v, meta));
            }
        }
    }
    decode_state_slow_meta(bytes)
}

fn decode_state_slow_meta<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, EnvelopeMeta)> {
    use sha2::Digest;
    let mut value: serde_json::Value = serde_json::from_slice(bytes).context("not JSON")?;
    let Some(format) = value.get("driftless_state") else {
        return serde_json::from_value(value)
            .map(|v| (v, EnvelopeMeta::default()))
            .context("not what this file holds");
    };
    let format_number = format.as_u64().unwrap_or(0);
    match format.as_u64() {
        Some(f) if (STATE_FORMAT..=STATE_FORMAT_MAX).contains(&f) => {}
        Some(f) if f > STATE_FORMAT_MAX => {
            return Err(anyhow::Error::new(NewerFormat {
                what: "state",
                format: f,
                known: STATE_FORMAT_MAX,
            }));
        }
        _ => bail!("state format {format} is not supported by this driftless (it reads {STATE_FORMAT} to {STATE_FORMAT_MAX})"),
    }
    let sum = value
        .get("sha256")
        .and_then(|s| s.as_str())
        .map(str::to_string);
    let (Some(sum), Some(data)) = (sum, value.get_mut("data").map(serde_json::Value::take)) else {
        bail!("the state envelope has no sha256 or no data");
    };
    let actual = hex::encode(sha2::Sha256::digest(
        serde_json::to_vec(&data).context("cannot serialise state")?,
    ));
    if actual != sum {
        bail!("its checksum does not match its content (a flipped bit or a torn write)");
    }
    let v = serde_json::from_value(data).context("not what this file holds")?;
    Ok((
        v,
        EnvelopeMeta {
            format: format_number,
            sha256: sum,
        },
    ))
}

/// Replaces `path` atomically and durably with `value` as JSON: write a
/// temp file, fsync it, rename it over, fsync the directory.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    write_atomic(path, &encode_state(value, STATE_FORMAT)?)
}

/// Replaces `path` atomically but not durably: readers see the old or the
/// new file, and after a power loss it may be the old one. For status
/// files that are rewritten on every poll (two fsyncs per idle poll would
/// be most of its cost, for nothing the next poll does not rewrite).
pub fn write_json_replace<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    replace(path, &encode_state(value, STATE_FORMAT)?, Durability::None)
}

/// [`write_json_atomic`] in envelope `format`.
pub fn write_state_atomic<T: Serialize>(path: &Path, value: &T, format: u64) -> Result<()> {
    write_atomic(path, &encode_state(value, format)?)
}

/// [`write_json_replace`] in envelope `format`.
pub fn write_state_replace<T: Serialize>(path: &Path, value: &T, format: u64) -> Result<()> {
    replace(path, &encode_state(value, format)?, Durability::None)
}

/// Replaces `path` atomically, without a barrier: for caches, where an
/// old, missing or torn file after a power loss only costs a miss.
pub fn write_replace(path: &Path, bytes: &[u8]) -> Result<()> {
    replace(path, bytes, Durability::None)
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    replace(path, bytes, Durability::Full)
}

/// The state files' atomic replace: [`replace_in`] (temp `O_EXCL` and
/// `O_NOFOLLOW` beside the file, rename) in the file's directory, 0600.
///
/// [`replace_in`]: crate::effects::rootfs::replace_in
fn replace(path: &Path, bytes: &[u8], durability: Durability) -> Result<()> {
    let dir = path.parent().context("state file has no parent")?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("state file name")?;
    let fd = nix::fcntl::open(
        dir,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .with_context(|| format!("cannot open {}", dir.display()))?;
    crate::effects::rootfs::replace_in_with(&fd, name, bytes, 0o600, durability)
        .with_context(|| format!("cannot replace {}", path.display()))
}

/// A new private (0600) temp file beside `path`, for an atomic replace.
pub(crate) fn create_temp(path: &Path) -> Result<(PathBuf, File)> {
    let dir = path.parent().context("state file has no parent")?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("state file name")?;
    let tmp = dir.join(format!(".{name}{TEMP_MARK}{}", std::process::id()));
    // A leftover of an earlier process with this pid, or something planted
    // there: unlink (never follows a link), then create afresh, refusing
    // to follow a link that appears in between.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", tmp.display())),
    }
    let f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    Ok((tmp, f))
}

/// The middle of a temp file's name: `.<file>.tmp-<pid>`.
const TEMP_MARK: &str = ".tmp-";

/// Removes the temp files that a crash left in `dir` (`.<file>.tmp-<pid>`
/// of another process). Call under the lock. Returns how many.
pub fn remove_stale_temps(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let ours = format!("{TEMP_MARK}{}", std::process::id());
    let mut removed = 0;
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let stale = name.starts_with('.')
            && name
                .rsplit_once(TEMP_MARK)
                .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
            && !name.ends_with(&ours);
        if stale
            && e.file_type().is_ok_and(|t| !t.is_dir())
            && std::fs::remove_file(e.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory {}", dir.display()))
}

#[cfg(test)]
mod temp_tests {
    use super::*;

    /// The bug this guards against: a state directory that group or
    /// others could write, or that another user owned, was used as it
    /// was, so anyone with write access to it could forge the inventory
    /// (files removed as "no longer declared") or the backups restored
    /// over host files. The directory and its `tx` and `originals` are
    /// checked; a private one is opened as before.
    #[test]
    fn a_state_directory_others_can_write_or_own_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let set = |p: &Path, mode: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        StateDir::open(d.path()).unwrap();
        for (dir, mode) in [
            (d.path().to_path_buf(), 0o777),
            (d.path().to_path_buf(), 0o720),
            (d.path().to_path_buf(), 0o1777),
            (d.path().join("tx"), 0o702),
            (d.path().join("originals"), 0o770),
            (d.path().join("mirror.git"), 0o777),
        ] {
            std::fs::create_dir_all(&dir).unwrap();
            set(&dir, mode);
            // `state check` names it too.
            let problems = sharing_problems(d.path());
            assert_eq!(problems.len(), 1, "{mode:o}");
            assert_eq!(problems[0].0, dir);
            let err = format!("{:#}", StateDir::open(d.path()).unwrap_err());
            assert!(
                err.contains(&format!("{} is writable by group or others", dir.display()))
                    && err.contains("chmod 700"),
                "{mode:o}: {err}"
            );
            set(&dir, 0o700);
        }
        set(d.path(), 0o755);
        StateDir::open(d.path()).unwrap();
        // Owned by another user: as root, a directory given away and
        // opened; as any other user, its own directory judged for an
        // agent running as someone else.
        use std::os::unix::fs::MetadataExt;
        let owner = if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(d.path(), Some(4321), None).unwrap();
            let err = format!("{:#}", StateDir::open(d.path()).unwrap_err());
            assert!(
                err.contains("is owned by uid 4321, not by the user"),
                "{err}"
            );
            4321
        } else {
            std::fs::metadata(d.path()).unwrap().uid()
        };
        let err = format!("{:#}", refuse_shared_for(d.path(), owner + 1).unwrap_err());
        assert!(
            err.contains(&format!(
                "is owned by uid {owner}, not by the user driftless runs as (uid {})",
                owner + 1
            )),
            "{err}"
        );
        // Root may own it (as systemd or tmpfiles create it) whoever the
        // agent runs as.
        refuse_shared_for(Path::new("/"), 4321).unwrap();
    }

    #[test]
    fn a_file_larger_than_the_cap_is_refused_by_its_size_and_one_at_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"0123456789").unwrap();
        assert_eq!(read_nofollow_up_to(&p, 10).unwrap(), b"0123456789");
        let err = read_nofollow_up_to(&p, 9).unwrap_err();
        assert!(err.to_string().contains("more than 9"), "{err}");
        // Sparse and huge: refused before a byte is read.
        let big = dir.path().join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(1 << 32)
            .unwrap();
        let err = read_nofollow_up_to(&big, 1 << 20).unwrap_err();
        assert!(
            err.to_string().contains(&format!("{} bytes", 1u64 << 32)),
            "{err}"
        );
    }

    /// Issue 12 §6: `.applied-commit.json.tmp` and friends, left by a run
    /// that died mid-write, stayed forever.
    #[test]
    fn stale_temp_files_are_removed_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::write(p.join(".inventory.json.tmp-12345"), "x").unwrap();
        std::fs::write(p.join(".applied-commit.json.tmp-7"), "x").unwrap();
        std::fs::write(p.join("inventory.json"), "{}").unwrap();
        std::fs::write(p.join(".keep.tmp-notapid"), "x").unwrap();
        let ours = format!(".x.json.tmp-{}", std::process::id());
        std::fs::write(p.join(&ours), "x").unwrap();
        assert_eq!(remove_stale_temps(p), 2);
        let mut left: Vec<String> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![
                ".keep.tmp-notapid".to_string(),
                ours,
                "inventory.json".into()
            ]
        );
    }

    /// Issue 12 §4: a link planted at the temp name was followed, and the
    /// state file's content written wherever it pointed.
    #[test]
    fn a_link_planted_at_the_temp_name_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("victim");
        std::fs::write(&target, "untouched").unwrap();
        let path = d.path().join("marks.json");
        let tmp = d
            .path()
            .join(format!(".marks.json.tmp-{}", std::process::id()));
        std::os::unix::fs::symlink(&target, &tmp).unwrap();
        write_atomic(&path, b"{}").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}");
    }

    /// JSON that still parses after a flipped bit was believed: the
    /// envelope's checksum refuses it; files written before the envelope
    /// still read; a newer format is named.
    #[test]
    fn state_files_carry_a_checksum_that_catches_what_still_parses() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.json");
        let value = serde_json::json!({"commit": "a".repeat(40), "n": 1});
        write_json_atomic(&p, &value).unwrap();
        assert_eq!(
            read_json::<serde_json::Value>(&p).unwrap(),
            Some(value.clone())
        );
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, text.replacen("aaaa", "aaab", 1)).unwrap();
        let err = format!("{:#}", read_json::<serde_json::Value>(&p).unwrap_err());
        assert!(
            err.contains("x.json is corrupt") && err.contains("checksum"),
            "{err}"
        );
        std::fs::write(&p, serde_json::to_vec(&value).unwrap()).unwrap();
        assert_eq!(read_json::<serde_json::Value>(&p).unwrap(), Some(value));
        std::fs::write(&p, r#"{"driftless_state": 5, "sha256": "", "data": {}}"#).unwrap();
        let err = read_json::<serde_json::Value>(&p).unwrap_err();
        assert!(is_newer_format(&err), "{err:#}");
        let err = format!("{err:#}");
        assert!(
            err.contains("x.json: written by a newer driftless (state format 5; this agent knows up to format 4)")
                && err.contains("upgrade the agent")
                && !err.contains("corrupt"),
            "{err}"
        );
        std::fs::write(&p, r#"{"driftless_state": 0, "sha256": "", "data": {}}"#).unwrap();
        let err = read_json::<serde_json::Value>(&p).unwrap_err();
        assert!(!is_newer_format(&err), "{err:#}");
        assert!(
            format!("{err:#}").contains("state format 0 is not supported"),
            "{err:#}"
        );
    }

    /// Reading the 3 MB inventory of 10,000 files went through a
    /// `serde_json::Value` of the whole file (issue 18); the fast path
    /// must read exactly what that reads, and leave everything else to it.
    #[test]
    fn the_fast_reader_reads_what_the_reference_reads_or_steps_aside() {
        let tricky = serde_json::json!({
            "z": "a \"quoted\" \\ back\\slash\n with  spaces\t and é and \u{1}",
            "a": [1, -2, 3.5, true, null, {"y": " ", "x": "}{,:"}],
            "m": {"/etc/a b": {"sha256": "00", "size": 12}},
        });
        for format in [STATE_FORMAT, STATE_FORMAT_MAX] {
            let pretty = encode_state(&tricky, format).unwrap();
            assert_eq!(
                decode_state_fast::<serde_json::Value>(&pretty).as_ref(),
                Some(&tricky)
            );
            assert!(decoders_agree(&pretty));
            // The same envelope written compactly reads the same.
            let compact =
                serde_json::to_vec(&serde_json::from_slice::<serde_json::Value>(&pretty).unwrap())
                    .unwrap();
            assert_eq!(
                decode_state_fast::<serde_json::Value>(&compact).as_ref(),
                Some(&tricky)
            );
        }
        // The compact envelope of large files, read from its fixed tail,
        // even when a string inside looks like that tail.
        let sneaky = serde_json::json!({
            "k": "\",\"driftless_state\":1,\"sha256\":\"",
            "pad": "x".repeat(PRETTY_UP_TO),
        });
        let compact = encode_state(&sneaky, STATE_FORMAT).unwrap();
        assert!(compact_parts(&compact).is_some());
        assert_eq!(
            decode_state_fast::<serde_json::Value>(&compact).as_ref(),
            Some(&sneaky)
        );
        assert!(decoders_agree(&compact));
        // (Without its final line break it is still whole.)
        for cut in [2, 10, 70, 90, compact.len() / 2] {
            let torn = &compact[..compact.len() - cut];
            assert!(
                compact_parts(torn).is_none()
                    || decode_state_fast::<serde_json::Value>(torn).is_none()
            );
            assert!(
                decode_state::<serde_json::Value>(torn).is_err(),
                "cut {cut}"
            );
        }
        // Keys in another order (a hand edit): the checksum does not match
        // the text, so the reference decides (and accepts it).
        let sum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(br#"{"a":1,"b":2}"#));
        let reordered =
            format!(r#"{{"driftless_state":1,"sha256":"{sum}","data":{{"b":2,"a":1}}}}"#);
        assert!(decode_state_fast::<serde_json::Value>(reordered.as_bytes()).is_none());
        assert_eq!(
            decode_state::<serde_json::Value>(reordered.as_bytes()).unwrap(),
            serde_json::json!({"a": 1, "b": 2})
        );
        // A flipped bit, a newer format, no envelope: the reference's errors.
        let mut flipped = encode_state(&tricky, STATE_FORMAT).unwrap();
        let at = flipped.windows(4).position(|w| w == b"back").unwrap();
        flipped[at] = b'B';
        assert!(decode_state_fast::<serde_json::Value>(&flipped).is_none());
        assert!(format!(
            "{:#}",
            decode_state::<serde_json::Value>(&flipped).unwrap_err()
        )
        .contains("checksum"));
        let newer = format!(
            r#"{{"driftless_state":{},"sha256":"{sum}","data":{{"a":1,"b":2}}}}"#,
            STATE_FORMAT_MAX + 1
        );
        assert!(decode_state_fast::<serde_json::Value>(newer.as_bytes()).is_none());
        assert!(is_newer_format(
            &decode_state::<serde_json::Value>(newer.as_bytes()).unwrap_err()
        ));
        assert!(decode_state_fast::<serde_json::Value>(br#"{"a":1}"#).is_none());
        assert!(decoders_agree(reordered.as_bytes()) && decoders_agree(&flipped));
    }

    /// What `encode_state` wrote before it skipped the `serde_json::Value`
    /// for canonical types.
    fn encode_via_value<T: Serialize>(value: &T, format: u64) -> Vec<u8> {
        use sha2::Digest;
        let data = serde_json::to_value(value).unwrap();
        let sum = hex::encode(sha2::Sha256::digest(serde_json::to_vec(&data).unwrap()));
        serde_json::to_vec_pretty(&serde_json::json!({
            "driftless_state": format,
            "sha256": sum,
            "data": data,
        }))
        .unwrap()
    }

    /// Issue 18: an inventory of 10,000 files was turned into a
    /// `serde_json::Value` to be written. Its types declare their fields
    /// in order, so it is canonical as it serialises, and the bytes are
    /// those the tree gave: for an inventory using every field, and for
    /// a type that is not canonical (which still goes through the tree).
    #[test]
    fn state_is_written_as_before_without_the_tree_when_canonical() {
        let full: Inventory = serde_json::from_value(serde_json::json!({
            "version": 1, "txid": "t1", "commit": "c1", "applied_at": 5,
            "files": {
                "/etc/a": {"role": "r", "sha256": "00", "size": 1, "mode": 420, "uid": 0, "gid": 0,
                    "on_change": [{"unit": "a.service", "action": "reload-or-restart"}],
                    "sensitive": true, "reboot": true,
                    "original": {"stored": "o1", "mode": 384, "uid": 1, "gid": 2}},
                "/etc/b \"q\"": {"role": "r", "sha256": "01", "size": 2, "mode": 420, "uid": 0, "gid": 0}
            },
            "dirs": ["/etc/d"],
            "reboot": {"boot_id": "b", "reasons": [{"path": "/etc/a", "commit": "c1", "txid": "t1", "package": "driftless"}]},
            "links": {"/etc/l": {"role": "r", "target": "/x", "created": true}},
            "directories": {"/srv/d": {"role": "r", "mode": 493, "uid": 0, "gid": 0, "created": false}}
        }))
        .unwrap();
        let (direct, canonical) = canonical::to_vec_checked(&full).unwrap();
        assert!(
            canonical,
            "a type in the inventory declares its fields out of order: {}",
            String::from_utf8_lossy(&direct)
        );
        for format in [STATE_FORMAT, STATE_FORMAT_MAX] {
            assert_eq!(
                encode_state(&full, format).unwrap(),
                encode_via_value(&full, format)
            );
        }
        // Past `PRETTY_UP_TO`, the same envelope, data and checksum on one
        // line; both readers take it.
        let mut big = full.clone();
        let entry = big.files.values().next().unwrap().clone();
        for i in 0..1_000 {
            let path = crate::desired::spec::TargetPath::parse(&format!("/srv/f{i:04}")).unwrap();
            big.files.insert(path, entry.clone());
        }
        assert!(serde_json::to_vec(&big).unwrap().len() > PRETTY_UP_TO);
        let one_line = encode_state(&big, STATE_FORMAT).unwrap();
        let pretty = encode_via_value(&big, STATE_FORMAT);
        assert_eq!(one_line.iter().filter(|&&b| b == b'\n').count(), 1);
        assert!(one_line.starts_with(br#"{"data":{"#) && one_line.ends_with(b"}\n"));
        let as_value = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();
        assert_eq!(as_value(&one_line), as_value(&pretty));
        assert!(decode_state_fast::<Inventory>(&one_line).is_some());
        assert!(decoders_agree(&one_line));
        let read: Inventory = decode_state(&one_line).unwrap();
        assert_eq!(
            serde_json::to_vec(&read).unwrap(),
            serde_json::to_vec(&big).unwrap()
        );
        let slow: Inventory = decode_state_slow(&one_line).unwrap();
        assert_eq!(
            serde_json::to_vec(&slow).unwrap(),
            serde_json::to_vec(&big).unwrap()
        );
        // A flipped bit in the one line is refused by both.
        let mut flipped = one_line.clone();
        let at = flipped.windows(6).position(|w| w == b"/srv/f").unwrap() + 2;
        flipped[at] = b'x';
        assert!(decode_state_fast::<Inventory>(&flipped).is_none());
        assert!(decode_state::<Inventory>(&flipped).is_err());
        #[derive(Serialize)]
        struct OutOfOrder {
            b: u32,
            a: Vec<&'static str>,
        }
        let odd = OutOfOrder { b: 1, a: vec!["x"] };
        assert!(!canonical::to_vec_checked(&odd).unwrap().1);
        assert_eq!(
            encode_state(&odd, STATE_FORMAT).unwrap(),
            encode_via_value(&odd, STATE_FORMAT)
        );
    }

    /// Format 1 is what every agent so far wrote: the same bytes.
    #[test]
    fn format_1_is_the_envelope_older_agents_wrote_and_others_are_refused() {
        let v = serde_json::json!({"b": [1, 2], "a": "x"});
        let bytes = encode_state(&v, STATE_FORMAT).unwrap();
        let sum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            br#"{"a":"x","b":[1,2]}"#,
        ));
        // Exactly what the encoder wrote before it took a format number.
        let want = format!(
            "{{\n  \"data\": {{\n    \"a\": \"x\",\n    \"b\": [\n      1,\n      2\n    ]\n  }},\n  \"driftless_state\": 1,\n  \"sha256\": \"{sum}\"\n}}"
        );
        assert_eq!(String::from_utf8(bytes).unwrap(), want);
        assert!(encode_state(&v, 0).is_err());
        assert!(encode_state(&v, STATE_FORMAT_MAX + 1).is_err());
    }
}

#[cfg(test)]
mod inventory_cache_tests {
    use super::*;

    /// The parsed inventory is reused only for the very file it came
    /// from: a replaced inventory (every write is a rename), a corrupted
    /// one and a removed one are read again, through every clone of the
    /// state directory.
    #[test]
    fn the_cached_inventory_follows_every_replacement_of_the_file() {
        let d = tempfile::tempdir().unwrap();
        let state = StateDir::open(d.path()).unwrap();
        let other = state.clone();
        let mut inv = (*state.inventory().unwrap()).clone();
        assert!(inv.commit.is_none());
        inv.commit = Some("c1".into());
        write_inventory_atomic(&state.inventory_path(), &inv).unwrap();
        assert_eq!(state.inventory().unwrap().commit.as_deref(), Some("c1"));
        assert_eq!(other.inventory().unwrap().commit.as_deref(), Some("c1"));
        inv.commit = Some("c2".into());
        write_inventory_atomic(&state.inventory_path(), &inv).unwrap();
        assert_eq!(other.inventory().unwrap().commit.as_deref(), Some("c2"));
        std::fs::write(state.inventory_path(), b"{ not json").unwrap();
        let e = format!("{:#}", state.inventory().unwrap_err());
        assert!(e.contains("is corrupt"), "{e}");
        std::fs::remove_file(state.inventory_path()).unwrap();
        assert!(state.inventory().unwrap().commit.is_none());
    }
}

#[cfg(test)]
mod cap_tests {
    use super::*;

    /// A small record's reader took the 1 GiB cap of the inventory: a
    /// sparse or damaged metrics file of 512 MiB was read whole, into as
    /// much memory, on every run. It is refused by its size now, as
    /// content (repaired, not left as a failed read); a file that may be
    /// large (a journal, the marks) is still read under the large cap.
    #[test]
    fn a_sparse_small_record_is_refused_by_its_own_cap_not_read() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("metrics-totals.json");
        let size: u64 = 64 << 20;
        File::create(&p).unwrap().set_len(size).unwrap();
        let e = read_json::<serde_json::Value>(&p).unwrap_err();
        assert!(
            format!("{e:#}").contains(&format!(
                "{size} bytes, more than {SMALL_STATE_READ_MAX_BYTES}"
            )),
            "{e:#}"
        );
        assert!(!read_failed(&e));
        let e = read_json_large::<serde_json::Value>(&p).unwrap_err();
        assert!(!format!("{e:#}").contains("more than"), "{e:#}");
    }

    /// `hash.key` is judged by its size before it is read: a larger one
    /// said only "N bytes, more than 4096", without the remedy a short one
    /// gets.
    #[test]
    fn an_oversized_hash_key_is_corrupt_with_its_remedy() {
        let d = tempfile::tempdir().unwrap();
        let state = StateDir::open(d.path()).unwrap();
        for len in [31u64, 33, 1 << 20] {
            File::create(d.path().join("hash.key"))
                .unwrap()
                .set_len(len)
                .unwrap();
            let e = format!("{:#}", state.hash_key().unwrap_err());
            assert!(
                e.contains("is corrupt (not 32 bytes): remove it"),
                "{len}: {e}"
            );
        }
    }
}
