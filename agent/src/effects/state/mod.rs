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
mod envelope;
pub mod floor;
pub mod history;
pub(crate) mod inventory_json;
pub mod inventory_log;
mod io;
pub mod quick;

pub use envelope::*;
pub use io::*;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};

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
        self.prepare_inventory_hinted(next, None)
    }

    /// [`StateDir::prepare_inventory`], told that `next`'s file entries
    /// differ from the current inventory's only at the paths in `changed`
    /// (see [`inventory_log::record_hinted`]).
    pub fn prepare_inventory_hinted(
        &self,
        next: &Inventory,
        changed: Option<&std::collections::BTreeSet<crate::desired::spec::TargetPath>>,
    ) -> Result<InventoryWrite> {
        // The current base, when it takes a log and `next` may use one.
        let current = if next.files.len() >= inventory_log::log_from() {
            let (prev, log) = self.inventory_and_log()?;
            log.base.is_some().then_some((prev, log))
        } else {
            None
        };
        if let Some((prev, log)) = &current {
            if let Some(base) = &log.base {
                let record = inventory_log::record_hinted(prev, next, base, log.next_seq, changed);
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

    /// Lets go of the inventory this handle (and its clones) cached, as
    /// [`crate::memory::discard`] does: at the end of a pass, its next
    /// read would go to the files again anyway.
    pub fn discard_cache(&self) {
        let cached = self
            .inventory_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        crate::memory::discard(cached);
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

#[cfg(test)]
mod temp_tests;

#[cfg(test)]
mod inventory_cache_tests;

#[cfg(test)]
mod cap_tests;
