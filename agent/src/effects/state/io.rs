//! Reading and replacing the files of the state directory, which is
//! untrusted input: nothing is opened through a symbolic link at the
//! last component or as a device, FIFO or socket; nothing is read past a
//! size cap (a sparse file of a terabyte is refused by its size, not read
//! until the agent is killed); every replacement is a private temp file
//! renamed over the old one, with or without the barriers that make it
//! durable ([`write_atomic`] for records, [`write_replace`] for caches).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::effects::rootfs::Durability;

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
    crate::memory::prefault(&mut out);
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
/// [`read_json_large`](super::read_json_large)).
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
pub(super) fn replace(path: &Path, bytes: &[u8], durability: Durability) -> Result<()> {
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
