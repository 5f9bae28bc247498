//! Confined access to the managed filesystem.
//!
//! Every path is resolved from a directory handle on the root (`/`, or the
//! `--root` prefix) one component at a time with `openat(O_NOFOLLOW)`, so a
//! symlink planted at or above a target is never followed, whatever its
//! name: no string checks, no `realpath` races. The only way to touch a
//! file is through a directory handle obtained here.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstatat, mkdirat, Mode as NixMode, SFlag};

use crate::desired::spec::TargetPath;
use crate::plan::quick::Stamp;
use crate::plan::{FileState, Observation};

/// A handle on the root of the managed filesystem.
pub struct RootFs {
    fd: OwnedFd,
    path: PathBuf,
}

/// How [`RootFs::open_parent`] creates missing parent directories.
pub struct MkParents<'a> {
    /// Each directory created is appended (outermost first).
    pub created: &'a mut Vec<TargetPath>,
    /// Their mode, set with `fchmod` after `mkdirat`: independent of the
    /// process umask (the units run with `UMask=0077`, which made new
    /// directories 0700 and a web server answer 403).
    pub mode: u32,
}

impl RootFs {
    pub fn open(path: &Path) -> Result<Self> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            NixMode::empty(),
        )
        .with_context(|| format!("cannot open root directory {}", path.display()))?;
        Ok(RootFs {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The root is `/` itself: the host the agent runs on, not a prefix
    /// (`--root`, an image). A directory that merely looks like `/` (a
    /// bind mount of it, the same device and inode) is a prefix.
    pub fn is_host_root(&self) -> bool {
        self.path == Path::new("/")
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The path on the real filesystem, for messages only.
    pub fn display(&self, target: &TargetPath) -> String {
        if self.is_host_root() {
            target.to_string()
        } else {
            format!("{}{}", self.path.display(), target)
        }
    }

    /// Opens the directory containing `target`. Missing directories are
    /// created as `mk` says when it is given; otherwise a missing
    /// directory gives `Ok(None)`.
    pub fn open_parent(
        &self,
        target: &TargetPath,
        mut mk: Option<MkParents<'_>>,
    ) -> Result<Option<OwnedFd>> {
        let comps: Vec<&str> = target.components().collect();
        let mut dir = self
            .fd
            .try_clone()
            .context("cannot duplicate the root directory handle")?;
        let mut sofar = String::new();
        for comp in &comps[..comps.len() - 1] {
            sofar.push('/');
            sofar.push_str(comp);
            let next = match open_dir(&dir, comp) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => match mk.as_mut() {
                    None => return Ok(None),
                    Some(mk) => {
                        let (fd, made) = self.make_dir(&dir, comp, &sofar, mk.mode)?;
                        if made {
                            mk.created
                                .push(TargetPath::parse(&sofar).map_err(|e| anyhow!(e))?);
                        }
                        fd
                    }
                },
                Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => {
                    let what = describe_non_dir(&dir, comp);
                    bail!(
                        "{} is {what}, not a directory: driftless never follows symlinks at or above a target ({}); replace it with a real directory",
                        self.display_str(&sofar),
                        target
                    );
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot open directory {}", self.display_str(&sofar))
                    })
                }
            };
            dir = next;
        }
        Ok(Some(dir))
    }

    /// `lstat` stamps of `targets`, opening each parent directory once
    /// (the quick check stamps every managed file on every poll). A path
    /// that is missing or cannot be examined gives `None`.
    pub fn stamps<'a>(
        &self,
        targets: impl IntoIterator<Item = &'a TargetPath>,
    ) -> Vec<Option<Stamp>> {
        let targets: Vec<&'a TargetPath> = targets.into_iter().collect();
        self.stamps_of(&targets, &|t: &&TargetPath| *t, None)
    }

    /// [`RootFs::stamps`] of the paths of `items` (`path` gives each one's),
    /// calling `on_change` as soon as a stamp is one `differs` tells apart
    /// from its item's, from whichever thread took it: the caller can start
    /// what a change needs while the rest is stamped. Called at most once
    /// per thread; the caller makes it idempotent.
    pub fn stamps_noting<T: Sync>(
        &self,
        items: &[T],
        path: &(dyn Fn(&T) -> &TargetPath + Sync),
        differs: &(dyn Fn(&T, &Option<Stamp>) -> bool + Sync),
        on_change: &(dyn Fn() + Sync),
    ) -> Vec<Option<Stamp>> {
        self.stamps_of(items, path, Some((differs, on_change)))
    }

    #[allow(clippy::type_complexity)]
    fn stamps_of<T: Sync>(
        &self,
        items: &[T],
        path: &(dyn Fn(&T) -> &TargetPath + Sync),
        noting: Option<(
            &(dyn Fn(&T, &Option<Stamp>) -> bool + Sync),
            &(dyn Fn() + Sync),
        )>,
    ) -> Vec<Option<Stamp>> {
        // An `lstat` costs about 1.5 µs, so 10,000 of them are worth a
        // second thread; below that, starting one costs more than it saves.
        const PER_THREAD: usize = 2_048;
        let threads = if items.len() < 2 * PER_THREAD {
            1
        } else {
            crate::cpus::cpus().min(items.len() / PER_THREAD)
        };
        if threads == 1 {
            return self.stamps_serial(items, path, noting);
        }
        let parts = crate::cpus::map_parts(items, threads, |part| {
            self.stamps_serial(part, path, noting)
        });
        let mut out = crate::memory::vec_prefaulted(items.len());
        for (part, stamps) in parts {
            // A thread that panicked (it cannot: fstatat and a map)
            // leaves its files unstamped, which reads as "changed".
            out.extend(stamps.unwrap_or_else(|_| vec![None; part.len()]));
        }
        out
    }

    #[allow(clippy::type_complexity)]
    fn stamps_serial<'a, T>(
        &self,
        items: &'a [T],
        path: &(dyn Fn(&T) -> &TargetPath + Sync),
        mut noting: Option<(
            &(dyn Fn(&T, &Option<Stamp>) -> bool + Sync),
            &(dyn Fn() + Sync),
        )>,
    ) -> Vec<Option<Stamp>> {
        // Each directory opened once: `dirs` holds them, `index` finds one
        // by name. Targets come in path order, so most share the previous
        // one's directory, which is reused without hashing its name again.
        let mut dirs: Vec<Option<OwnedFd>> = Vec::new();
        let mut index: HashMap<&'a str, usize> = HashMap::new();
        let mut out = crate::memory::vec_prefaulted(items.len());
        let mut last: Option<(&'a str, usize)> = None;
        for item in items {
            let target = path(item);
            let parent = target.as_str().rsplit_once('/').map_or("", |(dir, _)| dir);
            let at = match last {
                Some((p, at)) if p == parent => at,
                _ => {
                    let at = *index.entry(parent).or_insert_with(|| {
                        dirs.push(self.open_parent(target, None).ok().flatten());
                        dirs.len() - 1
                    });
                    last = Some((parent, at));
                    at
                }
            };
            let dir = dirs[at].as_ref();
            let stamp = dir.and_then(|d| {
                fstatat(d, target.file_name(), AtFlags::AT_SYMLINK_NOFOLLOW)
                    .ok()
                    .map(|st| stamp_of(&st))
            });
            if let Some((differs, on_change)) = noting {
                if differs(item, &stamp) {
                    on_change();
                    noting = None;
                }
            }
            out.push(stamp);
        }
        out
    }

    fn display_str(&self, p: &str) -> String {
        if self.is_host_root() {
            p.to_string()
        } else {
            format!("{}{p}", self.path.display())
        }
    }

    /// What is at `target` now. Reads regular files in full.
    pub fn observe(&self, target: &TargetPath) -> Result<Observation> {
        let Some(dir) = self.open_parent(target, None)? else {
            return Ok(Observation::Missing);
        };
        observe_in(&dir, target.file_name())
            .with_context(|| format!("cannot read {}", self.display(target)))
    }

    /// What is at the path of a link or an absent entry: like
    /// [`RootFs::observe`], but a symlink is read (never followed) into
    /// [`Observation::Link`].
    pub fn observe_link(&self, target: &TargetPath) -> Result<Observation> {
        let Some(dir) = self.open_parent(target, None)? else {
            return Ok(Observation::Missing);
        };
        observe_link_in(&dir, target.file_name())
            .with_context(|| format!("cannot read {}", self.display(target)))
    }

    /// What is at the path of a managed directory: its mode and owner
    /// ([`Observation::Dir`]), read by `lstat` through its parent, so a
    /// symlink there (or above) is never followed.
    pub fn observe_dir(&self, target: &TargetPath) -> Result<Observation> {
        let Some(dir) = self.open_parent(target, None)? else {
            return Ok(Observation::Missing);
        };
        let st = match fstatat(&dir, target.file_name(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Ok(Observation::Missing),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", self.display(target)))
            }
        };
        match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFDIR => Ok(Observation::Dir {
                mode: st.st_mode & 0o7777,
                uid: st.st_uid,
                gid: st.st_gid,
            }),
            SFlag::S_IFLNK => Ok(Observation::Other { kind: "symlink" }),
            _ => observe_in(&dir, target.file_name())
                .with_context(|| format!("cannot read {}", self.display(target))),
        }
    }

    /// The names in the directory at `target` (a purged directory), none
    /// of ours (`.driftless-*`, staged by a transaction): `None` when it
    /// is missing or not a directory (the directory's own observation
    /// says so). Opened without following a symlink, here or above.
    pub fn list_dir(&self, target: &TargetPath) -> Result<Option<Vec<String>>> {
        let Some(parent) = self.open_parent(target, None)? else {
            return Ok(None);
        };
        let fd = match open_dir(&parent, target.file_name()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) | Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot open {}", self.display(target)))
            }
        };
        let mut dir = nix::dir::Dir::from_fd(fd)
            .with_context(|| format!("cannot list {}", self.display(target)))?;
        let mut out = Vec::new();
        for entry in dir.iter() {
            let entry = entry.with_context(|| format!("cannot list {}", self.display(target)))?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." || name.starts_with(b".driftless-") {
                continue;
            }
            match std::str::from_utf8(name) {
                Ok(n) => out.push(n.to_string()),
                Err(_) => bail!(
                    "{} holds an entry whose name is not UTF-8 ({:?}); purge cannot name it: rename or remove it",
                    self.display(target),
                    String::from_utf8_lossy(name)
                ),
            }
        }
        out.sort();
        Ok(Some(out))
    }

    /// True when nothing is at `target` (`lstat` says ENOENT, here or
    /// above): what the quick check needs of an absent path. A symlink
    /// planted above it is not "nothing": the full sync refuses it.
    pub fn confirms_absent(&self, target: &TargetPath) -> bool {
        match self.open_parent(target, None) {
            Ok(None) => true,
            Ok(Some(dir)) => matches!(
                fstatat(&dir, target.file_name(), AtFlags::AT_SYMLINK_NOFOLLOW),
                Err(Errno::ENOENT)
            ),
            Err(_) => false,
        }
    }
}

/// [`observe_in`] that reads a symlink instead of refusing it.
pub fn observe_link_in(dir: &OwnedFd, name: &str) -> Result<Observation> {
    let st = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(Observation::Missing),
        Err(e) => return Err(e.into()),
    };
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFLNK {
        return observe_in(dir, name);
    }
    let target = nix::fcntl::readlinkat(dir, name)?;
    match target.into_string() {
        Ok(target) => Ok(Observation::Link {
            target,
            uid: st.st_uid,
            gid: st.st_gid,
        }),
        // A TOML target is UTF-8: such a link can be neither desired nor
        // put back byte for byte after a removal.
        Err(_) => Ok(Observation::Other {
            kind: "symlink with a non-UTF-8 target",
        }),
    }
}

impl RootFs {
    /// Opens (creating with `mode` if missing, parents 0755) the directory
    /// at `dir` under the root, never through a symlink: a link at it or
    /// above it is refused with an error naming it. For the agent's own
    /// directories under `--root` (the state directory, `etc/driftless`),
    /// which a hostile image could otherwise point anywhere on the host.
    pub fn ensure_dir(&self, dir: &TargetPath, mode: u32) -> Result<OwnedFd> {
        let mut created = Vec::new();
        let parent = self
            .open_parent(
                dir,
                Some(MkParents {
                    created: &mut created,
                    mode: NEW_PARENT_MODE,
                }),
            )?
            .ok_or_else(|| anyhow!("cannot open the directory above {}", self.display(dir)))?;
        let name = dir.file_name();
        match open_dir(&parent, name) {
            Ok(fd) => Ok(fd),
            Err(Errno::ENOENT) => Ok(self.make_dir(&parent, name, dir.as_str(), mode)?.0),
            Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => bail!(
                "{} is {}, not a directory: driftless never follows a symlink to its own files under the root; replace it with a real directory",
                self.display(dir),
                describe_non_dir(&parent, name)
            ),
            Err(e) => Err(e).with_context(|| format!("cannot open {}", self.display(dir))),
        }
    }

    /// Creates `name` in `parent` (shown as `shown`, a path under the
    /// root) with exactly `mode`, whatever the umask, and opens it without
    /// following a link. `true` if this call created it (a concurrent
    /// creator wins the race and keeps its mode).
    fn make_dir(
        &self,
        parent: &OwnedFd,
        name: &str,
        shown: &str,
        mode: u32,
    ) -> Result<(OwnedFd, bool)> {
        let mode = NixMode::from_bits_truncate(mode);
        let made = match mkdirat(parent, name, mode) {
            Ok(()) => true,
            Err(Errno::EEXIST) => false,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot create directory {}", self.display_str(shown))
                })
            }
        };
        let fd = open_dir(parent, name)
            .with_context(|| format!("cannot open directory {}", self.display_str(shown)))?;
        if made {
            fchmod(&fd, mode)
                .with_context(|| format!("cannot set the mode of {}", self.display_str(shown)))?;
        }
        Ok((fd, made))
    }

    /// Reads a small file of the root (os-release, machine-id, passwd)
    /// with symlinks resolved *inside* the root (`openat2` with
    /// `RESOLVE_IN_ROOT`): an image's `/etc/os-release -> ../usr/lib/os-release`
    /// works, and a link to `/etc/machine-id` reads the image's file, never
    /// the host's. Only a regular file is read (a FIFO cannot hang the
    /// agent), at most `cap` bytes. `Ok(None)` if it does not exist.
    pub fn read_contained(&self, rel: &str, cap: u64) -> Result<Option<Vec<u8>>> {
        use nix::fcntl::{openat2, OpenHow, ResolveFlag};
        let shown = self.display_str(&format!("/{}", rel.trim_start_matches('/')));
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let rel = rel.trim_start_matches('/');
        let opened = match openat2(&self.fd, rel, how) {
            // Linux before 5.6 (Ubuntu 20.04's own kernel): ENOSYS. A
            // seccomp filter older than the call: ENOSYS or EPERM (Docker
            // before 20.10, systemd's SystemCallErrorNumber=EPERM of the
            // units), which an open for reading gives for nothing else
            // (permissions are EACCES); a real one comes back from the
            // open below.
            Err(Errno::ENOSYS | Errno::EPERM) => self.open_without_openat2(rel, &shown)?,
            opened => opened,
        };
        let fd = match opened {
            Ok(fd) => fd,
            Err(Errno::ENOENT) | Err(Errno::ENOTDIR) | Err(Errno::ELOOP) => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot open {shown}")),
        };
        read_regular(File::from(fd), cap)
            .map(Some)
            .map_err(|e| anyhow!("{shown} is {e}: not read"))
    }

    /// [`RootFs::read_contained`]'s open where the kernel has no
    /// `openat2`. When the root is the process's own root directory, an
    /// ordinary open resolves every link exactly as `RESOLVE_IN_ROOT`
    /// would: an absolute target starts at that same directory, and `..`
    /// stops there. (A `/proc` magic link is then followed, where
    /// `RESOLVE_NO_MAGICLINKS` refused it: only someone who owns the
    /// host's own `/etc` can plant one there.) Any other root (`--root`,
    /// an image) could be left through a link, so the read is refused,
    /// saying what is missing. ([`RootFs::is_host_root`]: a bind mount
    /// of `/` elsewhere is a prefix, which `..` and absolute links leave.)
    fn open_without_openat2(&self, rel: &str, shown: &str) -> Result<nix::Result<OwnedFd>> {
        if !self.is_host_root() {
            bail!(
                "cannot open {shown}: openat2 is not available (Linux 5.6 or later has it; a seccomp \
                 filter may refuse it), and reading a file of a root other than / needs it, so that \
                 the root's links cannot lead out of it; run on a newer kernel or outside that filter, \
                 or against the root it runs in"
            );
        }
        Ok(openat(
            &self.fd,
            rel,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
            NixMode::empty(),
        ))
    }
}

/// Opens `name` in `dir` for reading: never through a symlink (ELOOP),
/// never blocking on a FIFO, never becoming a controlling terminal.
fn open_leaf(dir: &OwnedFd, name: &str) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_CLOEXEC
            | OFlag::O_NOCTTY,
        NixMode::empty(),
    )
}

/// Mode of the parents [`RootFs::ensure_dir`] creates.
const NEW_PARENT_MODE: u32 = 0o755;

/// Reads `name` in `dir` without following a symlink: a regular file of at
/// most `cap` bytes, `Ok(None)` if it does not exist.
pub fn read_file_in(dir: &OwnedFd, name: &str, cap: u64) -> std::io::Result<Option<Vec<u8>>> {
    let fd = match open_leaf(dir, name) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(None),
        Err(Errno::ELOOP) => {
            return Err(std::io::Error::other(
                "it is a symlink, which driftless never follows here",
            ))
        }
        Err(e) => return Err(e.into()),
    };
    read_regular(File::from(fd), cap).map(Some)
}

/// Reads an opened file in full if it is a regular file of at most `cap`
/// bytes (read through `take(cap)`: a file that grows meanwhile is cut,
/// never read without end). The errors read after "… is".
fn read_regular(file: File, cap: u64) -> std::io::Result<Vec<u8>> {
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.len() > cap {
        return Err(std::io::Error::other(format!(
            "{} bytes, more than the {cap} allowed",
            meta.len()
        )));
    }
    let mut content = Vec::with_capacity(meta.len() as usize);
    file.take(cap).read_to_end(&mut content)?;
    Ok(content)
}

/// How far [`replace_in_with`] makes a replacement durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// No barrier: atomic for readers, but after a power loss the file may
    /// be old, new, or (as for any unsynced write) torn.
    None,
    /// `fsync` of the file before the rename and of the directory after:
    /// the new content is durable when this returns.
    Full,
}

/// Replaces `name` in `dir` atomically with `bytes` (mode `mode`): a temp
/// file `.<name>.tmp-<pid>` created `O_EXCL|O_NOFOLLOW`, renamed over it;
/// `durable` adds an fsync of the file before and of the directory after.
/// A link planted at the temp name is never followed.
pub fn replace_in(
    dir: &OwnedFd,
    name: &str,
    bytes: &[u8],
    mode: u32,
    durable: bool,
) -> std::io::Result<()> {
    let durability = if durable {
        Durability::Full
    } else {
        Durability::None
    };
    replace_in_with(dir, name, bytes, mode, durability)
}

/// [`replace_in`] with a choice of [`Durability`].
pub fn replace_in_with(
    dir: &OwnedFd,
    name: &str,
    bytes: &[u8],
    mode: u32,
    durability: Durability,
) -> std::io::Result<()> {
    use nix::fcntl::renameat;
    use nix::unistd::unlinkat;
    let tmp = write_temp_in(dir, name, bytes, mode)?;
    let written = match durability {
        Durability::None => Ok(()),
        Durability::Full => tmp.1.sync_all(),
    }
    .and_then(|()| renameat(dir, tmp.0.as_str(), dir, name).map_err(Into::into));
    if let Err(e) = written {
        let _ = unlinkat(dir, tmp.0.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
        return Err(e);
    }
    if durability == Durability::Full {
        nix::unistd::fsync(dir)?;
    }
    Ok(())
}

/// Writes `bytes` to the temp name of `name` (`.<name>.tmp-<pid>`, created
/// `O_EXCL|O_NOFOLLOW`, mode `mode`) without syncing or renaming it:
/// returns the temp name and the open file. On error nothing is left.
pub fn write_temp_in(
    dir: &OwnedFd,
    name: &str,
    bytes: &[u8],
    mode: u32,
) -> std::io::Result<(String, File)> {
    use nix::unistd::{unlinkat, UnlinkatFlags};
    use std::io::Write;
    let tmp = format!(".{name}.tmp-{}", std::process::id());
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let m = NixMode::from_bits_truncate(mode);
    let fd = match openat(dir, tmp.as_str(), flags, m) {
        Err(Errno::EEXIST) => {
            // A leftover of an earlier process with our pid (or a planted
            // name): removing a name never follows it.
            unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir)?;
            openat(dir, tmp.as_str(), flags, m)?
        }
        r => r?,
    };
    let mut f = File::from(fd);
    let written = f
        .write_all(bytes)
        .and_then(|()| fchmod(&f, m).map_err(Into::into));
    if let Err(e) = written {
        let _ = unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        return Err(e);
    }
    Ok((tmp, f))
}

/// The largest file at a managed path that is read (see [`observe_in`]):
/// far above `max_file_size`'s limit, so no file a repository can write
/// is refused by it.
pub const TARGET_READ_MAX_BYTES: u64 = 1 << 30;

/// Observes `name` inside an open directory, never following a symlink.
pub fn observe_in(dir: &OwnedFd, name: &str) -> Result<Observation> {
    let fd = match open_leaf(dir, name) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(Observation::Missing),
        Err(Errno::ELOOP) => return Ok(Observation::Other { kind: "symlink" }),
        Err(Errno::ENXIO) | Err(Errno::ENODEV) => {
            return Ok(Observation::Other {
                kind: "special file",
            })
        }
        Err(e) => return Err(e.into()),
    };
    let file = File::from(fd);
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Ok(Observation::Other { kind: "directory" });
    }
    if !meta.is_file() {
        return Ok(Observation::Other {
            kind: "special file",
        });
    }
    // A managed file is read whole (to compare, back up and keep as the
    // original), so one larger than any a repository may write is refused
    // by its size, unread: a sparse terabyte planted at a managed path
    // was allocated up front and aborted the agent.
    if meta.len() > TARGET_READ_MAX_BYTES {
        bail!(
            "it is {} bytes, more than the {} MiB driftless reads of a file it manages or purges: move it aside, or stop managing this path; nothing was changed",
            meta.len(),
            TARGET_READ_MAX_BYTES >> 20
        );
    }
    let mut content = Vec::with_capacity(meta.len() as usize);
    file.take(TARGET_READ_MAX_BYTES.saturating_add(1))
        .read_to_end(&mut content)?;
    if content.len() as u64 > TARGET_READ_MAX_BYTES {
        bail!(
            "it grew past {} MiB while read: not managed; nothing was changed",
            TARGET_READ_MAX_BYTES >> 20
        );
    }
    Ok(Observation::File(FileState {
        content,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
    }))
}

/// `lstat(2)` of a plain path (state files, account databases).
pub fn stamp_path(path: &Path) -> Option<Stamp> {
    nix::sys::stat::lstat(path).ok().map(|st| stamp_of(&st))
}

fn stamp_of(st: &nix::sys::stat::FileStat) -> Stamp {
    let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
    Stamp {
        dev: st.st_dev,
        ino: st.st_ino,
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        size: st.st_size as u64,
        mtime_ns: ns(st.st_mtime, st.st_mtime_nsec),
        ctime_ns: ns(st.st_ctime, st.st_ctime_nsec),
    }
}

fn open_dir(dir: &impl AsFd, name: &str) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        NixMode::empty(),
    )
}

fn describe_non_dir(dir: &impl AsFd, name: &str) -> &'static str {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFLNK => "a symlink",
            SFlag::S_IFREG => "a regular file",
            _ => "a special file",
        },
        Err(_) => "not a directory",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(s: &str) -> TargetPath {
        TargetPath::parse(s).unwrap()
    }

    /// `stamps_noting` starts the inventory's read for a sync that will
    /// update something: it must note a change on one thread or several,
    /// and never note one when every stamp is as expected (an idle poll
    /// would read the inventory for nothing).
    #[test]
    fn stamps_noting_calls_back_on_a_change_and_only_then() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("a")).unwrap();
        for n in [10, 6_000] {
            let targets: Vec<TargetPath> = (0..n).map(|i| tp(&format!("/a/{i}"))).collect();
            for t in &targets {
                std::fs::write(root.path().join(&t.as_str()[1..]), "x").unwrap();
            }
            let fs = RootFs::open(root.path()).unwrap();
            let recorded: Vec<(TargetPath, Stamp)> = targets
                .iter()
                .cloned()
                .zip(fs.stamps(&targets).into_iter().map(Option::unwrap))
                .collect();
            let noted = AtomicUsize::new(0);
            let note = || {
                noted.fetch_add(1, Ordering::Relaxed);
            };
            let differs =
                |(_, then): &(TargetPath, Stamp), now: &Option<Stamp>| *now != Some(*then);
            let stamps = fs.stamps_noting(&recorded, &|(p, _)| p, &differs, &note);
            assert_eq!(stamps, fs.stamps(&targets), "{n}");
            assert_eq!(noted.load(Ordering::Relaxed), 0, "{n}: nothing changed");
            // A change at each end: in the first part and the last one
            // when the stamps are taken on several threads, each of
            // which notes it (at most once each).
            std::fs::write(root.path().join(format!("a/{}", n - 1)), "changed").unwrap();
            std::fs::write(root.path().join("a/0"), "changed").unwrap();
            std::fs::write(root.path().join("a/1"), "changed too").unwrap();
            fs.stamps_noting(&recorded, &|(p, _)| p, &differs, &note);
            let threads = if n < 4_096 {
                1
            } else {
                crate::cpus::cpus().min(n / 2_048)
            };
            assert_eq!(
                noted.load(Ordering::Relaxed),
                threads.min(2),
                "{n}: changes"
            );
        }
    }

    /// Enough files for the stamps to be taken on more than one thread:
    /// every stamp lands at its own target's index, as on one thread.
    #[test]
    fn stamps_of_many_files_come_back_in_order() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("a")).unwrap();
        std::fs::create_dir_all(root.path().join("b")).unwrap();
        let mut targets = Vec::new();
        for i in 0..5_000 {
            let dir = if i % 3 == 0 { "a" } else { "b" };
            // Every seventh is missing; sizes tell the files apart.
            if i % 7 != 0 {
                std::fs::write(root.path().join(format!("{dir}/{i}")), vec![b'x'; i]).unwrap();
            }
            targets.push(tp(&format!("/{dir}/{i}")));
        }
        let fs = RootFs::open(root.path()).unwrap();
        let stamps = fs.stamps(&targets);
        assert_eq!(stamps, fs.stamps_serial(&targets, &|t| t, None));
        for (i, stamp) in stamps.iter().enumerate() {
            match stamp {
                None => assert_eq!(i % 7, 0, "{i}"),
                Some(s) => assert_eq!(s.size, i as u64, "{i}"),
            }
        }
    }

    #[test]
    fn symlinked_parent_is_never_followed() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("etc/app")).unwrap();
        let fs = RootFs::open(root.path()).unwrap();
        let err = fs.observe(&tp("/etc/app/conf")).unwrap_err();
        assert!(
            format!("{err:#}").contains("is a symlink, not a directory"),
            "{err:#}"
        );
        let mut created = Vec::new();
        let mk = MkParents {
            created: &mut created,
            mode: 0o755,
        };
        assert!(fs.open_parent(&tp("/etc/app/conf"), Some(mk)).is_err());
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    }

    #[test]
    fn symlink_at_target_is_observed_not_followed() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", root.path().join("etc/x")).unwrap();
        let fs = RootFs::open(root.path()).unwrap();
        assert_eq!(
            fs.observe(&tp("/etc/x")).unwrap(),
            Observation::Other { kind: "symlink" }
        );
    }

    /// Files under `--root` are untrusted: a sparse terabyte at a managed
    /// path had its size allocated up front (`Vec::with_capacity`), and the
    /// allocation failure aborted the agent. Now it is refused by its
    /// size, unread, with an error naming the path and what to do.
    #[test]
    fn a_sparse_terabyte_at_a_managed_path_is_refused_by_its_size_not_read() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::fs::File::create(root.path().join("etc/x"))
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        std::fs::write(root.path().join("etc/y"), "small").unwrap();
        let fs = RootFs::open(root.path()).unwrap();
        let err = format!("{:#}", fs.observe(&tp("/etc/x")).unwrap_err());
        assert!(
            err.contains("/etc/x")
                && err.contains(&format!("{} bytes, more than the 1024 MiB", 1u64 << 40))
                && err.contains("move it aside"),
            "{err}"
        );
        assert!(matches!(
            fs.observe(&tp("/etc/y")).unwrap(),
            Observation::File(FileState { ref content, .. }) if content == b"small"
        ));
    }

    #[test]
    fn missing_parents_are_created_and_listed() {
        let root = tempfile::tempdir().unwrap();
        let fs = RootFs::open(root.path()).unwrap();
        let mut created = Vec::new();
        let mk = MkParents {
            created: &mut created,
            mode: 0o755,
        };
        fs.open_parent(&tp("/etc/a/b/c"), Some(mk)).unwrap();
        let got: Vec<&str> = created.iter().map(|p| p.as_str()).collect();
        assert_eq!(got, vec!["/etc", "/etc/a", "/etc/a/b"]);
        assert_eq!(fs.observe(&tp("/etc/a/b/c")).unwrap(), Observation::Missing);
    }

    /// The units' `UMask=0077` made created directories 0700 (nginx then
    /// answered 403): the mode is set explicitly. 0775 is what no common
    /// umask (022, 077) leaves alone, so `mkdirat` alone cannot pass this.
    #[test]
    fn created_directories_get_the_requested_mode_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("srv")).unwrap();
        std::fs::set_permissions(
            root.path().join("srv"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        let fs = RootFs::open(root.path()).unwrap();
        let mut created = Vec::new();
        let mk = MkParents {
            created: &mut created,
            mode: 0o775,
        };
        fs.open_parent(&tp("/srv/www/site/index.html"), Some(mk))
            .unwrap();
        for (dir, want) in [("srv", 0o700), ("srv/www", 0o775), ("srv/www/site", 0o775)] {
            let got = std::fs::metadata(root.path().join(dir))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777;
            assert_eq!(got, want, "{dir}: {got:o}");
        }
    }

    /// A link planted at the temp name of [`replace_in`] is replaced, never
    /// written through.
    #[test]
    fn replace_in_never_writes_through_a_link_at_its_temp_name() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "host").unwrap();
        let tmp = format!(".f.tmp-{}", std::process::id());
        std::os::unix::fs::symlink(&victim, dir.path().join(&tmp)).unwrap();
        let fd = nix::fcntl::open(
            dir.path(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            NixMode::empty(),
        )
        .unwrap();
        replace_in(&fd, "f", b"new", 0o600, true).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "host");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("f")).unwrap(),
            "new"
        );
        assert!(!dir.path().join(&tmp).exists());
        let meta = std::fs::symlink_metadata(dir.path().join("f")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o600
        );
    }

    #[test]
    fn ensure_dir_creates_with_its_mode_and_refuses_a_link_naming_it() {
        let root = tempfile::tempdir().unwrap();
        let fs = RootFs::open(root.path()).unwrap();
        fs.ensure_dir(&tp("/var/lib/driftless"), 0o700).unwrap();
        let mode = |p: &str| {
            std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(root.path().join(p))
                    .unwrap()
                    .permissions(),
            ) & 0o7777
        };
        assert_eq!(mode("var/lib/driftless"), 0o700);
        assert_eq!(mode("var/lib"), 0o755);
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("etc")).unwrap();
        let err = format!(
            "{:#}",
            fs.ensure_dir(&tp("/etc/driftless"), 0o755).unwrap_err()
        );
        assert!(
            err.contains(&format!("{}/etc is a symlink", root.path().display())),
            "{err}"
        );
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    }
}
