//! `quick.json`: the record of the last sync that left the host as desired
//! (see [`crate::plan::quick`] for why a stamp comparison is sound).
//!
//! It is a cache, so it is written without fsync: after a crash it may be
//! missing, old or torn, and each of those only costs one full sync. It is
//! removed before any transaction touches a file, so it never describes a
//! host that is half way through a change.

use std::fs;
use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, Result};

use super::StateDir;
use crate::desired::spec::TargetPath;
use crate::plan::quick::{QuickRecord, Stamp};

const FILE: &str = "quick.json";

/// The record, or `None` when there is none or it cannot be read (a
/// corrupt cache is not an error: the full path rebuilds it).
///
/// The daemon reads it on every poll, so the last one decoded is kept in
/// memory and reused while the file's stamp (inode, size, times) is the
/// same: the file is only ever replaced by rename, never edited in place.
pub fn load(state: &StateDir) -> Option<Arc<QuickRecord>> {
    let path = state.path().join(FILE);
    let stamp = crate::effects::rootfs::stamp_path(&path)?;
    let mut cache = CACHE.lock().ok()?;
    if let Some((p, s, r)) = cache.as_ref() {
        if *p == path && *s == stamp {
            return Some(Arc::clone(r));
        }
    }
    // (Not following a link planted there, and bounded: untrusted input.)
    let bytes = super::read_nofollow(&path).ok()?;
    match decode(&bytes) {
        Ok(r) => {
            // Read after the stamp: if the file was replaced in between, the
            // stamp is older than the content and the next load reads again.
            let r = Arc::new(r);
            *cache = Some((path, stamp, Arc::clone(&r)));
            Some(r)
        }
        Err(e) => {
            tracing::debug!("ignoring an unreadable {FILE}: {e:#}");
            None
        }
    }
}

fn forget() {
    if let Ok(mut cache) = CACHE.lock() {
        *cache = None;
    }
}

type Cached = Option<(std::path::PathBuf, Stamp, Arc<QuickRecord>)>;
static CACHE: std::sync::Mutex<Cached> = std::sync::Mutex::new(None);

/// The format, read on every poll, so cheap to parse: a magic line, the
/// header as one line of JSON, then one line per file:
/// `dev ino mode uid gid size mtime_ns ctime_ns self_contained path`, and
/// `end N` last,
/// so a torn file that happens to end on a line boundary is still refused.
const MAGIC: &str = "driftless-quick 1";

fn encode(record: &QuickRecord) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(64 * record.files.len() + 512);
    out.extend_from_slice(MAGIC.as_bytes());
    out.push(b'\n');
    serde_json::to_writer(&mut out, record).context("cannot serialise the quick-check record")?;
    out.push(b'\n');
    // `itoa` rather than `write!`: the formatting machinery was half of
    // this at 10,000 files.
    let mut n = itoa::Buffer::new();
    for (path, s, contained) in &record.files {
        anyhow::ensure!(!path.as_str().contains('\n'), "a path with a newline");
        for v in [
            s.dev,
            s.ino,
            u64::from(s.mode),
            u64::from(s.uid),
            u64::from(s.gid),
            s.size,
        ] {
            out.extend_from_slice(n.format(v).as_bytes());
            out.push(b' ');
        }
        for v in [s.mtime_ns, s.ctime_ns] {
            out.extend_from_slice(n.format(v).as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(if *contained { b"1 " } else { b"0 " });
        out.extend_from_slice(path.as_str().as_bytes());
        out.push(b'\n');
    }
    writeln!(out, "end {}", record.files.len())?;
    Ok(out)
}

pub(crate) fn decode(bytes: &[u8]) -> Result<QuickRecord> {
    let text = std::str::from_utf8(bytes).context("not UTF-8")?;
    // Fields, like lines, split with `memchr`. Every separator is ASCII:
    // each piece is a `str`.
    let mut lines = super::Lines::new(text);
    anyhow::ensure!(lines.next() == Some(MAGIC), "unknown format");
    let header = lines.next().context("no header")?;
    let mut record: QuickRecord = serde_json::from_str(header).context("bad header")?;
    // Sized from the text, not from anything it claims: a line takes at
    // least 19 bytes, and `encode` writes about 90.
    record.files.reserve(bytes.len() / 96);
    for line in lines {
        if let Some(n) = line.strip_prefix("end ") {
            anyhow::ensure!(number::<usize>(n)? == record.files.len(), "wrong count");
            return Ok(record);
        }
        let mut fields = Fields { line, at: 0 };
        let stamp = Stamp {
            dev: fields.unsigned()?,
            ino: fields.unsigned()?,
            mode: fields.unsigned()?,
            uid: fields.unsigned()?,
            gid: fields.unsigned()?,
            size: fields.unsigned()?,
            mtime_ns: fields.signed()?,
            ctime_ns: fields.signed()?,
        };
        let contained = match fields.next()? {
            "1" => true,
            "0" => false,
            other => anyhow::bail!("bad flag {other:?}"),
        };
        let path = TargetPath::parse(&line[fields.at..]).map_err(anyhow::Error::msg)?;
        record.files.push((path, stamp, contained));
    }
    anyhow::bail!("truncated")
}

/// The space-separated fields of a line, read left to right.
///
/// Ten thousand lines are read on every poll of a host with 10,000 files:
/// a number of up to 19 digits (all but a far-off time) is summed in the
/// one byte loop that finds its end (a field is a few digits long,
/// shorter than `memchr` takes to set up; issue #18). Any other field is
/// read by [`number`], which decides as before.
struct Fields<'a> {
    line: &'a str,
    at: usize,
}

impl<'a> Fields<'a> {
    fn next(&mut self) -> Result<&'a str> {
        let rest = &self.line.as_bytes()[self.at..];
        let len = rest.iter().position(|&b| b == b' ').context("short line")?;
        // A space is ASCII, so both ends are character boundaries.
        let field = &self.line[self.at..self.at + len];
        self.at += len + 1;
        Ok(field)
    }

    /// The next field, if it is 1 to 19 digits (where a `u64` cannot
    /// overflow), summed in the same pass that finds its end; `None`
    /// (nothing taken) for anything else.
    fn digits(&mut self) -> Option<u64> {
        let mut v: u64 = 0;
        for (i, &b) in self.line.as_bytes()[self.at..].iter().enumerate() {
            if b == b' ' {
                if i == 0 || i > 19 {
                    return None;
                }
                self.at += i + 1;
                return Some(v);
            }
            if !b.is_ascii_digit() {
                return None;
            }
            v = v.wrapping_mul(10).wrapping_add(u64::from(b - b'0'));
        }
        None
    }

    fn unsigned<T: TryFrom<u64> + TryFrom<i128>>(&mut self) -> Result<T> {
        let at = self.at;
        if let Some(v) = self.digits().and_then(|v| T::try_from(v).ok()) {
            return Ok(v);
        }
        self.at = at;
        number(self.next()?)
    }

    fn signed(&mut self) -> Result<i128> {
        let at = self.at;
        let negative = self.line.as_bytes().get(at) == Some(&b'-');
        self.at += usize::from(negative);
        match self.digits() {
            Some(v) if negative => Ok(-i128::from(v)),
            Some(v) => Ok(i128::from(v)),
            None => {
                self.at = at;
                number(self.next()?)
            }
        }
    }
}

/// A decimal integer as `encode` writes it (digits, `-` first if
/// negative), in range for `T`.
fn number<T: TryFrom<i128>>(text: &str) -> Result<T> {
    let (negative, digits) = match text.as_bytes().split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text.as_bytes()),
    };
    anyhow::ensure!(
        !digits.is_empty() && digits.len() <= 39,
        "bad number {text:?}"
    );
    // Up to 19 digits (every stamp but a far-off time) fit a `u64`,
    // cheaper to sum than an `i128`.
    if digits.len() <= 19 {
        let mut v: u64 = 0;
        for &b in digits {
            anyhow::ensure!(b.is_ascii_digit(), "bad number {text:?}");
            v = v * 10 + u64::from(b - b'0');
        }
        let v = if negative {
            -i128::from(v)
        } else {
            i128::from(v)
        };
        return T::try_from(v).map_err(|_| anyhow::anyhow!("number out of range: {text:?}"));
    }
    // Summed as a negative number, whose range reaches one further.
    let mut v: i128 = 0;
    for &b in digits {
        anyhow::ensure!(b.is_ascii_digit(), "bad number {text:?}");
        v = v
            .checked_mul(10)
            .and_then(|v| v.checked_sub(i128::from(b - b'0')))
            .with_context(|| format!("number out of range: {text:?}"))?;
    }
    let v = if negative { Some(v) } else { v.checked_neg() };
    v.and_then(|v| T::try_from(v).ok())
        .with_context(|| format!("number out of range: {text:?}"))
}

/// Removes the record, durably. Called before a transaction touches a
/// file: from then on, an existing record means no transaction started
/// after it was taken, even across a power loss.
pub fn clear(state: &StateDir) -> Result<()> {
    forget();
    if state.remove_file(FILE)? {
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
    forget();
    state.remove_file(FILE).map(drop)
}

/// Writes a new record. `build` receives the filesystem's current time
/// (the mtime of the freshly created temp file), taken before it stamps
/// the files: the racy-stamp rule needs a time from the same clock.
/// When `build` gives `None`, nothing is written.
pub fn save(state: &StateDir, build: impl FnOnce(i128) -> Option<QuickRecord>) -> Result<()> {
    forget();
    let path = state.path().join(FILE);
    let (tmp, mut f) = super::create_temp(&path)?;
    let st = nix::sys::stat::fstat(&f).with_context(|| format!("cannot stat {}", tmp.display()))?;
    let now = i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec);
    let Some(record) = build(now) else {
        drop(f);
        let _ = fs::remove_file(&tmp);
        return Ok(());
    };
    let bytes = encode(&record)?;
    let written = f
        .write_all(&bytes)
        .with_context(|| format!("cannot write {}", tmp.display()))
        .and_then(|()| {
            fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))
        });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::quick::QUICK_VERSION;

    fn stamp(n: u64) -> Stamp {
        Stamp {
            dev: n,
            ino: n + 1,
            mode: 0o100644,
            uid: 0,
            gid: 7,
            size: 42,
            mtime_ns: -5,
            ctime_ns: 1_700_000_000_123_456_789,
        }
    }

    #[test]
    fn numbers_read_as_the_standard_parser_reads_them_and_out_of_range_is_refused() {
        for text in [
            "0",
            "7",
            "-5",
            "18446744073709551615",
            "4294967295",
            "-170141183460469231731687303715884105728",
            "170141183460469231731687303715884105727",
        ] {
            assert_eq!(number::<i128>(text).unwrap(), text.parse::<i128>().unwrap());
        }
        assert_eq!(number::<u64>("18446744073709551615").unwrap(), u64::MAX);
        for bad in [
            "",
            "-",
            "1a",
            " 1",
            "+1",
            "18446744073709551616",
            "-1",
            "99999999999999999999999999999999999999999",
        ] {
            assert!(number::<u64>(bad).is_err(), "{bad:?}");
        }
        assert!(number::<u32>("4294967296").is_err());
        assert!(number::<i128>("170141183460469231731687303715884105728").is_err());
    }

    /// A record of no files (the fields the tests share).
    fn empty_record() -> QuickRecord {
        QuickRecord {
            version: QUICK_VERSION,
            inputs: "abc".into(),
            commit: "c".into(),
            inventory: stamp(1),
            inventory_log: None,
            taken_at_ns: 99,
            files: vec![],
            units: vec![],
            links: vec![],
            absent: vec![],
            watched: vec![],
            directories: vec![],
            config: None,
        }
    }

    /// `quick.json` was read with `fs::read`: through a link planted in
    /// the state directory, and whole (a sparse file of a terabyte, or a
    /// link to `/dev/zero`, was read until the agent was killed).
    #[test]
    fn a_planted_link_or_a_huge_sparse_record_is_ignored_not_read() {
        let d = tempfile::tempdir().unwrap();
        let state = StateDir::open(d.path()).unwrap();
        let record = empty_record();
        let elsewhere = d.path().join("elsewhere");
        std::fs::write(&elsewhere, encode(&record).unwrap()).unwrap();
        std::os::unix::fs::symlink(&elsewhere, d.path().join(FILE)).unwrap();
        assert!(load(&state).is_none(), "read through a planted link");
        std::fs::remove_file(d.path().join(FILE)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", d.path().join(FILE)).unwrap();
        assert!(load(&state).is_none());
        std::fs::remove_file(d.path().join(FILE)).unwrap();
        std::fs::File::create(d.path().join(FILE))
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        assert!(load(&state).is_none());
        // The same bytes in place are read.
        std::fs::remove_file(d.path().join(FILE)).unwrap();
        std::fs::copy(&elsewhere, d.path().join(FILE)).unwrap();
        assert_eq!(load(&state).as_deref(), Some(&record));
    }

    /// The bug this guards against: the quick record's numbers are read by
    /// a fused scan-and-sum (`Fields`), which must read every line exactly
    /// as splitting at spaces and [`number`] do, odd spellings included
    /// (leading zeros, `-0`, 20 digits, a value out of its field's range).
    #[test]
    fn every_line_reads_as_splitting_and_number_read_it() {
        fn reference(line: &str) -> Result<(Stamp, bool, TargetPath)> {
            let mut parts = line.splitn(10, ' ');
            let mut next = || parts.next().context("short line");
            let stamp = Stamp {
                dev: number(next()?)?,
                ino: number(next()?)?,
                mode: number(next()?)?,
                uid: number(next()?)?,
                gid: number(next()?)?,
                size: number(next()?)?,
                mtime_ns: number(next()?)?,
                ctime_ns: number(next()?)?,
            };
            let contained = match next()? {
                "1" => true,
                "0" => false,
                other => anyhow::bail!("bad flag {other:?}"),
            };
            let path = TargetPath::parse(next()?).map_err(anyhow::Error::msg)?;
            Ok((stamp, contained, path))
        }
        const TOKENS: &[&str] = &[
            "0",
            "7",
            "007",
            "-0",
            "-5",
            "",
            "-",
            "4294967295",
            "4294967296",
            "9999999999999999999",
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999",
            "-9999999999999999999",
            "-99999999999999999999",
            "1a",
            "+1",
            " ",
            "1 ",
        ];
        let header = format!(
            "{MAGIC}\n{}\n",
            serde_json::to_string(&empty_record()).unwrap()
        );
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut pick = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut read = 0;
        for _ in 0..20_000 {
            let mut line: Vec<&str> = (0..8)
                .map(|_| {
                    if pick(4) == 0 {
                        TOKENS[pick(TOKENS.len())]
                    } else {
                        "12"
                    }
                })
                .collect();
            line.push(["1", "0", "2", ""][pick(4)]);
            line.push(["/etc/a b", "/etc/a", "etc", "/etc//a"][pick(4)]);
            let line = line.join(" ");
            let text = format!("{header}{line}\nend 1\n");
            let want = reference(&line);
            match decode(text.as_bytes()) {
                Ok(r) => {
                    let (stamp, contained, path) =
                        want.unwrap_or_else(|e| panic!("{line:?}: {e:#}"));
                    assert_eq!(r.files, vec![(path, stamp, contained)], "{line:?}");
                    read += 1;
                }
                Err(_) => assert!(want.is_err(), "{line:?} was refused"),
            }
        }
        assert!(read > 1000, "{read}");
    }

    #[test]
    fn a_record_survives_encode_and_decode_and_garbage_is_refused() {
        let record = QuickRecord {
            files: vec![
                (TargetPath::parse("/etc/a b").unwrap(), stamp(2), true),
                (TargetPath::parse("/etc/c").unwrap(), stamp(3), false),
            ],
            units: vec![],
            links: vec![(TargetPath::parse("/etc/l").unwrap(), stamp(4))],
            absent: vec![TargetPath::parse("/etc/gone").unwrap()],
            watched: vec![(TargetPath::parse("/var/lib/dpkg/status").unwrap(), stamp(6))],
            directories: vec![(TargetPath::parse("/srv/app").unwrap(), stamp(5))],
            config: Some("c0ffee".into()),
            ..empty_record()
        };
        let bytes = encode(&record).unwrap();
        assert_eq!(decode(&bytes).unwrap(), record);
        for bad in [
            &b""[..],
            b"driftless-quick 1\n",
            b"driftless-quick 2\n{}\n",
            &bytes[..bytes.len() - 9],
            &bytes[..bytes.len() - 6],
        ] {
            assert!(decode(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
