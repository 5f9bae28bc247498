//! Reading a working directory (`driftless validate DIR`) into a
//! [`Snapshot`], as untrusted as a fetched commit.
//!
//! A CI job validating a pull request runs this on a checkout it did not
//! write, so it holds to what reading a commit holds to
//! ([`super::tree`]): a file's bytes are read only when the configuration
//! uses them, and a file larger than `max_file_size` is refused by its
//! size, never read (a checked-out multi-gigabyte file would otherwise be
//! read whole into memory); at most [`MAX_ENTRIES`] files and links;
//! symlinks are recorded as links, never followed. Every open is
//! `O_NOFOLLOW` relative to its directory's descriptor, so a directory or
//! file swapped for a link after the listing is refused, not followed out
//! of the checkout. `.git` is skipped. FIFOs, sockets and devices are
//! refused: git cannot commit them, so a validation that skipped them would
//! vouch for a tree no commit can hold.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use nix::fcntl::{openat, readlinkat, OFlag};
use nix::sys::stat::{fstat, fstatat, Mode, SFlag};

use crate::desired::snapshot::{BlobSource, Entry, Snapshot};

/// As many files and links as a commit's tree may hold (the same limit).
pub(super) const MAX_ENTRIES: usize = super::tree::MAX_ENTRIES;

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// The files of `dir/sub_path` (`sub_path` as in agent.toml's `path`).
pub(super) fn read(dir: &Path, sub_path: &str, max_file: u64) -> Result<Snapshot> {
    read_at_most(dir, sub_path, max_file, MAX_ENTRIES)
}

/// [`read`] holding at most `max_entries` files and symlinks.
pub(super) fn read_at_most(
    dir: &Path,
    sub_path: &str,
    max_file: u64,
    max_entries: usize,
) -> Result<Snapshot> {
    let sub_path = super::tree::normalise_sub_path(sub_path)?;
    let top = if sub_path.is_empty() {
        dir.to_path_buf()
    } else {
        dir.join(&sub_path)
    };
    // The directory the user named is opened as named (it may be a link);
    // nothing below it is followed, `path`'s own directories included (a
    // checkout whose `conf` is a link to `/` is not read at `/`).
    let named = nix::fcntl::open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| {
        format!(
            "cannot open the repository directory {} (is it a directory?)",
            dir.display()
        )
    })?;
    let root = open_dir_below(&named, &sub_path).with_context(|| {
        format!(
            "cannot open {} (`path` in agent.toml): it must be a directory of the repository, not a link",
            top.display()
        )
    })?;
    drop(named);
    let mut entries = Vec::new();
    // Files, links and directories listed so far: a checkout of a
    // million empty directories is refused like one of a million files.
    let mut seen = 0usize;
    let mut pending = vec![String::new()];
    while let Some(rel) = pending.pop() {
        let shown = top.join(&rel);
        let fd = open_dir_below(&root, &rel).with_context(|| {
            format!(
                "cannot open directory {} (replaced by a link since it was listed?)",
                shown.display()
            )
        })?;
        let listing = fd
            .try_clone()
            .context("cannot duplicate a directory descriptor")?;
        let Some(listed) = names(listing, &shown, max_entries.saturating_sub(seen))? else {
            bail!(
                "{} holds more than {max_entries} files and directories: driftless reads configuration repositories, not data; point it at the configuration's directory",
                top.display()
            );
        };
        for name in listed {
            seen += 1;
            let path = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let at = top.join(&path);
            let st = fstatat(&fd, name.as_str(), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                .with_context(|| format!("cannot stat {}", at.display()))?;
            let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
            if kind == SFlag::S_IFDIR {
                pending.push(path);
                continue;
            }

            if kind == SFlag::S_IFLNK {
                let target = readlinkat(&fd, name.as_str())
                    .with_context(|| format!("cannot read link {}", at.display()))?;
                let target = target
                    .into_string()
                    .map_err(|_| anyhow::anyhow!("{}: link target must be UTF-8", at.display()))?;
                entries.push((path, Entry::Symlink { target }));
            } else if kind == SFlag::S_IFREG {
                let executable = st.st_mode & 0o111 != 0;
                entries.push((path.clone(), Entry::at_place(path.into_bytes(), executable)));
            } else {
                bail!(
                    "{} is not a regular file, directory or symlink (a FIFO, socket or device): git cannot commit it; remove it from the repository directory",
                    at.display()
                );
            }
        }
    }
    let source = Arc::new(Places {
        root,
        shown: top,
        max_file,
    });
    Ok(Snapshot::lazy_from(source, entries))
}

/// The directory `rel` below `root`, each component opened `O_NOFOLLOW`
/// from the one before (a path given whole to `openat` would follow links
/// in all but its last component).
fn open_dir_below(root: &OwnedFd, rel: &str) -> nix::Result<OwnedFd> {
    let mut dir = root
        .try_clone()
        .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(nix::libc::EBADF)))?;
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        dir = openat(&dir, part, DIR_FLAGS, Mode::empty())?;
    }
    Ok(dir)
}

/// The names in the directory `fd` (shown as `shown`), sorted, without
/// `.`, `..` and `.git`; an error for a name that is not UTF-8, and
/// `None` as soon as there are more than `budget` (the rest not read).
fn names(fd: OwnedFd, shown: &Path, budget: usize) -> Result<Option<Vec<String>>> {
    let mut dir =
        nix::dir::Dir::from_fd(fd).with_context(|| format!("cannot list {}", shown.display()))?;
    let mut out = Vec::new();
    for entry in dir.iter() {
        let entry = entry.with_context(|| format!("cannot list {}", shown.display()))?;
        let name = entry.file_name().to_bytes();
        if matches!(name, b"." | b".." | b".git") {
            continue;
        }
        let name = std::str::from_utf8(name).map_err(|_| {
            anyhow::anyhow!(
                "{}/{}: file names must be UTF-8",
                shown.display(),
                String::from_utf8_lossy(name)
            )
        })?;
        if out.len() >= budget {
            return Ok(None);
        }
        out.push(name.to_string());
    }
    out.sort_unstable();
    Ok(Some(out))
}

/// A working directory's files, read by their place below `root`.
struct Places {
    root: OwnedFd,
    /// `root` as the user named it, for messages.
    shown: PathBuf,
    max_file: u64,
}

impl BlobSource for Places {
    fn read(&self, key: &[u8]) -> Result<Vec<u8>> {
        let rel = std::str::from_utf8(key).context("invalid place")?;
        let shown = self.shown.join(rel);
        let (dirs, name) = rel.rsplit_once('/').unwrap_or(("", rel));
        let dir = open_dir_below(&self.root, dirs).with_context(|| {
            format!(
                "cannot open {}: a directory on its path changed since it was listed (replaced by a link?)",
                shown.display()
            )
        })?;
        // Looked at before it is opened: opening a device node swapped in
        // since the listing could have effects of its own.
        let st = fstatat(&dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            .with_context(|| format!("cannot stat {}", shown.display()))?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            bail!(
                "{} is no longer a regular file (it changed since it was listed; replaced by a link?)",
                shown.display()
            );
        }
        let fd = openat(
            &dir,
            name,
            OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_NOCTTY
                | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| {
            format!(
                "cannot open {} (replaced by a link since it was listed?)",
                shown.display()
            )
        })?;
        let st = fstat(&fd).with_context(|| format!("cannot stat {}", shown.display()))?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            bail!(
                "{} is no longer a regular file (it changed since it was listed)",
                shown.display()
            );
        }
        let size = u64::try_from(st.st_size).unwrap_or(0);
        if size > self.max_file {
            return Err(super::blobs::too_large(size, self.max_file));
        }
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        std::fs::File::from(fd)
            .take(self.max_file.saturating_add(1))
            .read_to_end(&mut bytes)
            .with_context(|| format!("cannot read {}", shown.display()))?;
        let read = bytes.len() as u64;
        if read > self.max_file {
            // It grew while it was read.
            return Err(super::blobs::too_large(read, self.max_file));
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn checkout() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::create_dir_all(p.join("conf/roles/a/files")).unwrap();
        std::fs::create_dir_all(p.join("conf/.git/objects")).unwrap();
        std::fs::write(p.join("conf/.git/HEAD"), "ref: refs/heads/main\n").unwrap();
        std::fs::write(p.join("conf/roles/a/files/small"), "small\n").unwrap();
        std::fs::write(p.join("conf/roles/a/files/run.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            p.join("conf/roles/a/files/run.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        symlink("small", p.join("conf/roles/a/files/link")).unwrap();
        // Sparse: 8 GiB claimed, nothing stored.
        let big = std::fs::File::create(p.join("conf/roles/a/files/big")).unwrap();
        big.set_len(8 << 30).unwrap();
        d
    }

    fn read_file(s: &Snapshot, path: &str) -> Result<Vec<u8>> {
        Ok(s.read(path)?.map(<[u8]>::to_vec).unwrap_or_default())
    }

    #[test]
    fn files_are_listed_without_reading_them_and_read_only_when_used() {
        let d = checkout();
        let s = read(d.path(), "conf", 1 << 20).unwrap();
        let paths: Vec<&str> = s.walk("").map(|(p, _)| p).collect();
        assert_eq!(
            paths,
            [
                "roles/a/files/big",
                "roles/a/files/link",
                "roles/a/files/run.sh",
                "roles/a/files/small"
            ]
        );
        assert_eq!(read_file(&s, "roles/a/files/small").unwrap(), b"small\n");
        assert_eq!(read_file(&s, "roles/a/files/link").unwrap(), b"small\n");
        assert!(matches!(
            s.entry("roles/a/files/run.sh"),
            Some(Entry::File {
                executable: true,
                ..
            })
        ));
        assert!(matches!(
            s.entry("roles/a/files/small"),
            Some(Entry::File {
                executable: false,
                ..
            })
        ));
        assert!(matches!(
            s.entry("roles/a/files/link"),
            Some(Entry::Symlink { target }) if target == "small"
        ));
        // The 8 GiB file is refused by its size, not read.
        let err = format!("{:#}", read_file(&s, "roles/a/files/big").unwrap_err());
        assert!(
            err.contains("roles/a/files/big")
                && err.contains("8589934592 bytes")
                && err.contains("max_file_size"),
            "{err}"
        );
    }

    /// `validate DIR` with `path = "/conf/"` in agent.toml read `/conf/`
    /// of the host: `Path::join` with an absolute path replaces the base.
    #[test]
    fn an_absolute_looking_sub_path_stays_inside_the_directory() {
        let d = checkout();
        let s = read(d.path(), "/conf/", 1 << 20).unwrap();
        assert!(s.contains("roles/a/files/small"));
        let err = format!("{:#}", read(d.path(), "conf/../..", 1 << 20).unwrap_err());
        assert!(err.contains("plain relative directory"), "{err}");
    }

    /// `path = "conf"` with `conf` a link (a pull request can make it
    /// one) was followed wherever it pointed, `/` included.
    #[test]
    fn a_path_that_is_a_link_is_not_followed() {
        let d = checkout();
        symlink(d.path().join("conf"), d.path().join("elsewhere")).unwrap();
        let err = format!("{:#}", read(d.path(), "elsewhere", 1 << 20).unwrap_err());
        assert!(err.contains("not a link"), "{err}");
        // The directory named on the command line may itself be a link.
        let s = read(&d.path().join("elsewhere"), "", 1 << 20).unwrap();
        assert!(s.contains("roles/a/files/small"));
    }

    #[test]
    fn too_many_files_are_refused() {
        let d = checkout();
        // Four files and three directories (roles, roles/a, roles/a/files).
        assert!(read_at_most(d.path(), "conf", 1 << 20, 7).is_ok());
        let err = format!(
            "{:#}",
            read_at_most(d.path(), "conf", 1 << 20, 6).unwrap_err()
        );
        assert!(err.contains("more than 6 files and directories"), "{err}");
    }

    #[test]
    fn a_fifo_is_refused_by_name() {
        let d = checkout();
        let fifo = d.path().join("conf/roles/a/files/pipe");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
        let err = format!("{:#}", read(d.path(), "conf", 1 << 20).unwrap_err());
        assert!(
            err.contains("roles/a/files/pipe") && err.contains("git cannot commit it"),
            "{err}"
        );
    }

    #[test]
    fn a_file_or_directory_swapped_for_a_link_after_the_listing_is_not_followed() {
        let d = checkout();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("small"), "secret outside\n").unwrap();
        let s = read(d.path(), "conf", 1 << 20).unwrap();
        let files = d.path().join("conf/roles/a/files");
        // The file becomes a link to a file outside.
        std::fs::remove_file(files.join("run.sh")).unwrap();
        symlink(outside.path().join("small"), files.join("run.sh")).unwrap();
        let err = format!("{:#}", read_file(&s, "roles/a/files/run.sh").unwrap_err());
        assert!(err.contains("replaced by a link"), "{err}");
        // Its directory becomes a link to a directory outside.
        std::fs::rename(&files, d.path().join("moved")).unwrap();
        symlink(outside.path(), &files).unwrap();
        let err = format!("{:#}", read_file(&s, "roles/a/files/small").unwrap_err());
        assert!(err.contains("replaced by a link"), "{err}");
    }

    #[test]
    fn a_name_that_is_not_utf8_is_refused() {
        use std::os::unix::ffi::OsStrExt;
        let d = checkout();
        let bad = std::ffi::OsStr::from_bytes(b"conf/roles/bad-\xff");
        std::fs::write(d.path().join(bad), "x").unwrap();
        let err = format!("{:#}", read(d.path(), "conf", 1 << 20).unwrap_err());
        assert!(err.contains("must be UTF-8"), "{err}");
    }

    /// A place names where bytes are, not what they are: two checkouts'
    /// unread files at one path are not taken as equal.
    #[test]
    fn unread_files_of_two_checkouts_are_not_equal_by_their_place() {
        let (a, b) = (checkout(), checkout());
        std::fs::write(b.path().join("conf/roles/a/files/small"), "other\n").unwrap();
        let sa = read(a.path(), "conf", 1 << 20).unwrap();
        let sb = read(b.path(), "conf", 1 << 20).unwrap();
        assert!(sa
            .changed_paths(&sb)
            .contains(&"roles/a/files/small".to_string()));
        assert_eq!(sa, sa.clone());
    }
}
