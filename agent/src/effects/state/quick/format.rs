//! The two files' format, read on every poll, so cheap to parse.

use std::io::Write;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::delta::{Change, FileLine};
use crate::desired::spec::TargetPath;
use crate::plan::quick::{QuickRecord, Stamp};

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BaseHeader {
    pub id: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeltaHeader {
    /// The id of the base the changes apply to.
    pub base: String,
    /// The record, its files aside.
    pub record: QuickRecord,
}

/// The format, read on every poll, so cheap to parse. Both files are a
/// magic line, a header as one line of JSON, lines, and `end N` last, so
/// a torn file that happens to end on a line boundary is still refused.
/// A base's lines are files:
/// `dev ino mode uid gid size mtime_ns ctime_ns self_contained path`;
/// a delta's are `+ ` (added), `= ` (changed) before such a line, or
/// `- path` (removed), in path order.
pub(super) const MAGIC: &str = "driftless-quick 2";
pub(super) const DELTA_MAGIC: &str = "driftless-quick-delta 1";

pub(super) fn encode_line(
    out: &mut Vec<u8>,
    path: &TargetPath,
    s: &Stamp,
    contained: bool,
) -> Result<()> {
    anyhow::ensure!(!path.as_str().contains('\n'), "a path with a newline");
    // `itoa` rather than `write!`: the formatting machinery was half of
    // encoding 10,000 lines.
    let mut n = itoa::Buffer::new();
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
    out.extend_from_slice(if contained { b"1 " } else { b"0 " });
    out.extend_from_slice(path.as_str().as_bytes());
    out.push(b'\n');
    Ok(())
}

pub(super) fn encode_base<'a>(
    id: &str,
    files: impl ExactSizeIterator<Item = (&'a TargetPath, Stamp, bool)>,
) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(96 * files.len() + 128);
    out.extend_from_slice(MAGIC.as_bytes());
    out.push(b'\n');
    serde_json::to_writer(&mut out, &BaseHeader { id: id.to_string() })?;
    out.push(b'\n');
    let mut count = 0usize;
    for (path, s, contained) in files {
        encode_line(&mut out, path, &s, contained)?;
        count += 1;
    }
    writeln!(out, "end {count}")?;
    Ok(out)
}

pub(super) fn encode_delta(header: &DeltaHeader, changes: &[Change]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(96 * changes.len() + 512);
    out.extend_from_slice(DELTA_MAGIC.as_bytes());
    out.push(b'\n');
    serde_json::to_writer(&mut out, header).context("cannot serialise the quick-check record")?;
    out.push(b'\n');
    for c in changes {
        match c {
            Change::Added((p, s, f)) => {
                out.extend_from_slice(b"+ ");
                encode_line(&mut out, p, s, *f)?;
            }
            Change::Changed((p, s, f)) => {
                out.extend_from_slice(b"= ");
                encode_line(&mut out, p, s, *f)?;
            }
            Change::Removed(p) => {
                anyhow::ensure!(!p.as_str().contains('\n'), "a path with a newline");
                out.extend_from_slice(b"- ");
                out.extend_from_slice(p.as_str().as_bytes());
                out.push(b'\n');
            }
        }
    }
    writeln!(out, "end {}", changes.len())?;
    Ok(out)
}

/// The header line and the lines before `end N` of either file, checked
/// against its magic and count.
pub(super) fn split<'a>(bytes: &'a [u8], magic: &str) -> Result<(&'a str, Vec<&'a str>)> {
    let text = std::str::from_utf8(bytes).context("not UTF-8")?;
    // Fields, like lines, split with `memchr`. Every separator is ASCII:
    // each piece is a `str`.
    let mut lines = crate::effects::state::Lines::new(text);
    anyhow::ensure!(lines.next() == Some(magic), "unknown format");
    let header = lines.next().context("no header")?;
    // Sized from the text, not from anything it claims: a line takes at
    // least 19 bytes, and `encode_line` writes about 90.
    let mut body = Vec::with_capacity(bytes.len() / 96);
    for line in lines {
        if let Some(n) = line.strip_prefix("end ") {
            anyhow::ensure!(number::<usize>(n)? == body.len(), "wrong count");
            return Ok((header, body));
        }
        body.push(line);
    }
    anyhow::bail!("truncated")
}

pub(super) fn decode_line(line: &str) -> Result<FileLine> {
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
    Ok((path, stamp, contained))
}

pub(super) fn decode_base(bytes: &[u8]) -> Result<(String, Vec<FileLine>)> {
    let (header, lines) = split(bytes, MAGIC)?;
    let header: BaseHeader = serde_json::from_str(header).context("bad header")?;
    Ok((header.id, decode_lines(&lines)?))
}

/// Below this many lines per thread, a second thread costs more than it
/// saves (starting one takes about 50 µs; a line, 0.3 µs).
const LINES_PER_THREAD: usize = 4_096;

/// A base's lines, decoded on as many threads as there are CPUs, each a
/// contiguous part, when there are many (10,000 lines took 3.5 ms on one;
/// issue #18). The result is the serial one: the lines in order, or the
/// error of the first bad line.
fn decode_lines(lines: &[&str]) -> Result<Vec<FileLine>> {
    decode_lines_on(
        lines,
        crate::cpus::cpus().min(lines.len() / LINES_PER_THREAD),
    )
}

/// [`decode_lines`] on `threads` threads.
pub(super) fn decode_lines_on(lines: &[&str], threads: usize) -> Result<Vec<FileLine>> {
    // Each list sized and its pages mapped ahead: collected from an
    // iterator of results, it grew by doubling, copied and faulted at
    // every step.
    let decode = |part: &[&str]| -> Result<Vec<FileLine>> {
        let mut out = crate::memory::vec_prefaulted(part.len());
        for l in part {
            out.push(decode_line(l)?);
        }
        Ok(out)
    };
    if threads <= 1 || lines.is_empty() {
        return decode(lines);
    }
    let mut out = crate::memory::vec_prefaulted(lines.len());
    // A part's first error is the first of all: the parts before it
    // decoded whole.
    for (_, decoded) in crate::cpus::map_parts(lines, threads, decode) {
        out.extend(decoded.map_err(|_| anyhow::anyhow!("a thread decoding the record panicked"))??);
    }
    Ok(out)
}

pub(super) fn decode_delta(bytes: &[u8]) -> Result<(DeltaHeader, Vec<Change>)> {
    let (header, lines) = split(bytes, DELTA_MAGIC)?;
    let header: DeltaHeader = serde_json::from_str(header).context("bad header")?;
    let mut changes: Vec<Change> = Vec::with_capacity(lines.len());
    for line in lines {
        let change = if let Some(rest) = line.strip_prefix("+ ") {
            Change::Added(decode_line(rest)?)
        } else if let Some(rest) = line.strip_prefix("= ") {
            Change::Changed(decode_line(rest)?)
        } else if let Some(rest) = line.strip_prefix("- ") {
            Change::Removed(TargetPath::parse(rest).map_err(anyhow::Error::msg)?)
        } else {
            anyhow::bail!("bad line {line:?}");
        };
        // In strict path order: `apply` merges them with the base.
        if let Some(last) = changes.last() {
            anyhow::ensure!(
                last.path() < change.path(),
                "out of order at {}",
                change.path()
            );
        }
        changes.push(change);
    }
    Ok((header, changes))
}

/// Either file, by its magic (for the fuzz target).
pub(crate) fn decode(bytes: &[u8]) -> Result<()> {
    if bytes.starts_with(DELTA_MAGIC.as_bytes()) {
        decode_delta(bytes).map(drop)
    } else {
        decode_base(bytes).map(drop)
    }
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
pub(super) fn number<T: TryFrom<i128>>(text: &str) -> Result<T> {
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
