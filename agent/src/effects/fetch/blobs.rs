//! Reading file contents out of the object database for a lazy
//! [`Snapshot`](crate::desired::snapshot::Snapshot): only the files a
//! sync uses are inflated, by whichever render worker needs them.
//!
//! Two things shape this module (issue #18, a cold apply of 1,000
//! templates):
//!
//! - **No lock around the repository.** A `gix::Repository` is not
//!   `Sync`; one behind a mutex made the render workers queue for every
//!   template they read. Each reader takes a handle of its own from a
//!   small pool (as many as there are concurrent readers, made once from
//!   the thread-safe repository) and gives it back after the read.
//! - **A loose object is read, not mapped.** gix maps a loose object's
//!   file, once for its header (the size check below) and once more to
//!   inflate it. Unmapping, in a process whose other threads run on other
//!   CPUs, interrupts all of them to flush their TLBs: two of those per
//!   template were a quarter of the render's time for a repository whose
//!   objects are loose, as a local source's recent commits are. Here a
//!   loose blob's file is read with `read(2)` once and its size checked
//!   from the header it inflates first, with gix's own zlib and header
//!   decoders. Anything else (packed objects, alternates, a loose file
//!   that is not a plain file or is over 1 MiB, a repository with
//!   replace refs) takes gix's path.
//!
//! An object larger than `max_file` (`max_file_size`: no managed file may
//! be larger) is refused by the size in its header, before it is
//! inflated: a hostile commit can hold gigabytes of zeros in a few
//! compressed kilobytes, and reading them whole would get the agent
//! killed for memory rather than give an error.

use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

use crate::desired::snapshot::BlobSource;
use crate::effects::state::{open_nofollow, read_up_to};

pub(super) struct Blobs {
    repo: gix::ThreadSafeRepository,
    /// Handles not in use; a reader takes one (or makes one) and puts it
    /// back.
    idle: Mutex<Vec<gix::Repository>>,
    /// The primary object directory, where loose objects are; `None`
    /// when every read takes gix's path (the repository replaces objects
    /// with `refs/replace/`, which gix applies and this reader does not).
    objects: Option<PathBuf>,
    max_file: u64,
}

impl Blobs {
    pub(super) fn new(repo: &gix::Repository, max_file: u64) -> Self {
        Self {
            objects: (repo.objects.store_ref().replacements().next().is_none())
                .then(|| repo.objects.store_ref().path().to_path_buf()),
            repo: repo.clone().into_sync(),
            idle: Mutex::new(vec![repo.clone()]),
            max_file,
        }
    }

    /// gix's path: the size from the object's header, then the object.
    fn read_by_gix(&self, id: gix::ObjectId) -> Result<Vec<u8>> {
        let repo = self
            .idle
            .lock()
            .ok()
            .and_then(|mut idle| idle.pop())
            .unwrap_or_else(|| self.repo.to_thread_local());
        let read = || -> Result<Vec<u8>> {
            let size = repo
                .find_header(id)
                .with_context(|| format!("cannot read object {id}"))?
                .size();
            if size > self.max_file {
                return Err(too_large(size, self.max_file));
            }
            Ok(repo
                .find_blob(id)
                .with_context(|| format!("cannot read object {id}"))?
                .detach()
                .data)
        };
        let data = read();
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(repo);
        }
        data
    }
}

impl BlobSource for Blobs {
    fn read(&self, id: &[u8]) -> Result<Vec<u8>> {
        let id = gix::ObjectId::try_from(id).context("invalid object id")?;
        let loose = match &self.objects {
            Some(objects) => read_loose(objects, &id, self.max_file)?,
            None => None,
        };
        match loose {
            Some(data) => Ok(data),
            None => self.read_by_gix(id),
        }
    }
}

/// The longest header of a loose object ("blob " and a 64-bit size).
const HEADER_MAX: usize = 64;

/// The largest loose file read this way. Templates and configuration
/// files are small; a larger object takes gix's path, which maps its file
/// (page cache the kernel can reclaim) instead of holding it in the heap
/// beside the inflated body.
const FAST_MAX: u64 = 1 << 20;

/// Blob `id` from its loose file under `objects`, at most `max_file`
/// bytes. `None` leaves the object to gix's path, which gives the same
/// answer for any object this reads: when there is no loose file (the
/// object is packed or in an alternate), when it is not a plain file
/// (gix follows a link and finds no object at a FIFO), or when it is
/// larger than [`FAST_MAX`]. A blob over `max_file` is refused by its
/// header either way.
///
/// Opened as the state files are ([`open_nofollow`]): looked at before it
/// is opened, so that a device node is never opened, and opened without
/// following a link and without blocking, so that one swapped in between
/// cannot make the read wait.
fn read_loose(objects: &std::path::Path, id: &gix::oid, max_file: u64) -> Result<Option<Vec<u8>>> {
    let hex = id.to_hex().to_string();
    let path = objects.join(&hex[..2]).join(&hex[2..]);
    let (file, meta) = match open_nofollow(&path) {
        Ok((f, m)) if m.len() <= FAST_MAX => (f, m),
        _ => return Ok(None),
    };
    let what = || format!("cannot read object {id} ({})", path.display());
    let compressed = read_up_to(file, meta.len(), FAST_MAX).with_context(what)?;
    // A refusal by size reads as gix's path gives it: the file, not the
    // object's path, is what the reader needs.
    inflate_blob(&compressed, max_file).map(Some).map_err(|e| {
        if e.is::<TooLarge>() {
            e
        } else {
            e.context(what())
        }
    })
}

/// The body of the loose blob whose zlib stream is `compressed`, refused
/// by the size in its header when that is over `max_file`, before the
/// body is inflated.
pub fn inflate_blob(compressed: &[u8], max_file: u64) -> Result<Vec<u8>> {
    let mut header = [0_u8; HEADER_MAX];
    let mut inflate = gix::zlib::Inflate::default();
    let (status, consumed_in, consumed_out) = inflate
        .prefix(compressed, &mut header)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (kind, size, header_len) = gix::objs::decode::loose_header(&header[..consumed_out])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if kind != gix::objs::Kind::Blob {
        bail!("it is a {kind}, not a blob");
    }
    if size > max_file {
        return Err(too_large(size, max_file));
    }
    let size = usize::try_from(size).context("the object's size does not fit in memory")?;
    let mut body = Vec::new();
    let n = if status == gix::zlib::Status::StreamEnd {
        body.extend_from_slice(&header[header_len..consumed_out]);
        body.len()
    } else {
        if consumed_out.saturating_sub(header_len) > size {
            bail!("the object is longer than its header says ({size} bytes)");
        }
        inflate
            .rest(
                &compressed[consumed_in..],
                &header[..consumed_out],
                header_len,
                &mut body,
                size,
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?
    };
    if n != size {
        bail!("the object holds {n} bytes, but its header says {size}");
    }
    Ok(body)
}

/// Why a file of `size` bytes is refused under the `max_file_size` of
/// `max` (it is not read).
pub(super) fn too_large(size: u64, max: u64) -> anyhow::Error {
    anyhow::Error::new(TooLarge { size, max })
}

/// A file refused by its size: said the same whichever path read it.
#[derive(Debug)]
struct TooLarge {
    size: u64,
    max: u64,
}

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "it is {} bytes, more than any managed file may be ({}, max_file_size in agent.toml): \
             a file this large does not belong in a configuration repository",
            self.size,
            crate::desired::guard::size_str(self.max)
        )
    }
}

impl std::error::Error for TooLarge {}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A loose object's file: `header` then `body`, zlib-compressed.
    fn loose(header: &str, body: &[u8]) -> Vec<u8> {
        loose_at(gix::zlib::Compression::default(), header, body)
    }

    fn loose_at(level: gix::zlib::Compression, header: &str, body: &[u8]) -> Vec<u8> {
        let mut w = gix::zlib::stream::deflate::Write::new(Vec::new(), level);
        w.write_all(header.as_bytes()).unwrap();
        w.write_all(body).unwrap();
        w.flush().unwrap();
        w.into_inner()
    }

    fn text(r: Result<Vec<u8>>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn a_blob_reads_whole_whether_its_header_inflates_with_all_of_it_or_not() {
        // Small: the first inflate into the header buffer ends the stream.
        assert_eq!(inflate_blob(&loose("blob 2\0", b"ok"), 100).unwrap(), b"ok");
        assert_eq!(inflate_blob(&loose("blob 0\0", b""), 100).unwrap(), b"");
        // Larger than the header buffer: the rest is inflated after it.
        let body: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let file = loose(&format!("blob {}\0", body.len()), &body);
        assert_eq!(inflate_blob(&file, body.len() as u64).unwrap(), body);
    }

    /// The bug this guards against: a blob that inflates to gigabytes must
    /// be refused by the size its header declares, before it is inflated.
    #[test]
    fn a_blob_over_max_file_size_is_refused_by_its_header() {
        let file = loose("blob 4194304\0", &vec![0; 4 << 20]);
        let err = text(inflate_blob(&file, 1 << 20));
        assert!(
            err.contains("4194304 bytes") && err.contains("max_file_size"),
            "{err}"
        );
        // A header that claims more than the body holds is refused too,
        // by its size alone.
        let err = text(inflate_blob(
            &loose("blob 18446744073709551615\0", b"x"),
            1 << 20,
        ));
        assert!(err.contains("max_file_size"), "{err}");
    }

    #[test]
    fn a_loose_object_whose_header_lies_or_is_not_a_blob_is_an_error() {
        for (header, body, want) in [
            (
                "blob 10\0",
                &b"short"[..],
                "holds 5 bytes, but its header says 10",
            ),
            (
                "blob 3\0",
                &[7; 100][..],
                "longer than its header says (3 bytes)",
            ),
            (
                "blob 3\0",
                &b"longer than three"[..],
                "holds 17 bytes, but its header says 3",
            ),
            ("tree 2\0", &b"ok"[..], "is a tree, not a blob"),
            ("blob x\0", &b"ok"[..], ""),
            ("nonsense", &b""[..], ""),
        ] {
            let err = text(inflate_blob(&loose(header, body), 1 << 20));
            assert!(err.contains(want), "{header:?}: {err}");
        }
        // A long body that is shorter than its header says.
        let err = text(inflate_blob(
            &loose("blob 200000\0", &[1; 100_000]),
            1 << 20,
        ));
        assert!(
            err.contains("holds 100000 bytes, but its header says 200000"),
            "{err}"
        );
        // Not zlib at all.
        assert!(inflate_blob(b"plain text, not a zlib stream", 1 << 20).is_err());
        assert!(inflate_blob(b"", 1 << 20).is_err());
    }

    /// An incompressible blob of exactly `max_file_size`, stored (level
    /// 0), at git's loose default (1, which zlib-ng's quick strategy
    /// expands by up to an eighth) or at 9, reads by this reader. A file
    /// over 1 MiB, a link and a FIFO are left to gix's path (`None`).
    #[test]
    fn any_plain_loose_file_up_to_a_mib_is_read_here_and_the_rest_is_left_to_gix() {
        let tmp = tempfile::tempdir().unwrap();
        let id = gix::ObjectId::from_hex(b"0123456789abcdef0123456789abcdef01234567").unwrap();
        let dir = tmp.path().join("01");
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("23456789abcdef0123456789abcdef01234567");
        let noise = |n: usize| {
            let mut x: u32 = 1;
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect::<Vec<u8>>()
        };
        let body = noise(200_000);
        let header = format!("blob {}\0", body.len());
        for level in [0, 1, 9] {
            let file = loose_at(gix::zlib::Compression::new(level).unwrap(), &header, &body);
            assert!(
                file.len() > body.len(),
                "level {level}: {} bytes",
                file.len()
            );
            std::fs::write(&path, &file).unwrap();
            let read = read_loose(tmp.path(), &id, body.len() as u64).unwrap();
            assert!(
                read.as_deref() == Some(&body[..]),
                "level {level}: not read back"
            );
            // Under a smaller max_file_size, its header refuses it, in
            // the words gix's path uses (no object path: the caller names
            // the file).
            let err = format!("{:#}", read_loose(tmp.path(), &id, 1000).unwrap_err());
            assert!(
                err.starts_with("it is 200000 bytes, more than any managed file may be"),
                "{err}"
            );
        }
        // Over 1 MiB: gix's path (which maps the file) reads it.
        let big = noise(1 << 20);
        std::fs::write(
            &path,
            loose_at(
                gix::zlib::Compression::new(0).unwrap(),
                "blob 1048576\0",
                &big,
            ),
        )
        .unwrap();
        assert!(read_loose(tmp.path(), &id, 2 << 20).unwrap().is_none());
        // Not a plain file: gix decides.
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        assert!(read_loose(tmp.path(), &id, 1 << 20).unwrap().is_none());
        std::fs::remove_file(&path).unwrap();
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        assert!(read_loose(tmp.path(), &id, 1 << 20).unwrap().is_none());
        // No file: gix decides (packed).
        std::fs::remove_file(&path).unwrap();
        assert!(read_loose(tmp.path(), &id, 1 << 20).unwrap().is_none());
        // objects/01 is a file, not a directory: gix decides.
        std::fs::remove_dir(&dir).unwrap();
        std::fs::write(&dir, b"x").unwrap();
        assert!(read_loose(tmp.path(), &id, 1 << 20).unwrap().is_none());
    }
}
