//! The envelope every JSON state file is written in:
//! `{"driftless_state": F, "sha256": H, "data": V}`. F is the format (an
//! agent refuses a file of a format newer than it knows, see
//! [`NewerFormat`]); H is the sha256 of V's compact JSON, so a flipped
//! bit that still parses is caught. Large files are written compact, on
//! one line, and read without the whitespace pass the general reader
//! needs (at 10,000 files, most of a run's cost to read them).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Serialize};

use super::io::{read_nofollow_up_to, replace, write_atomic, STATE_READ_MAX_BYTES};
use super::{is_newer_format, NewerFormat, SMALL_STATE_READ_MAX_BYTES};
use crate::effects::rootfs::Durability;

/// Decodes the state file `path` read as `bytes`, its errors named.
fn decode_file<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T> {
    name_decode_error(path, decode_state(bytes))
}

/// [`decode_file`] and the envelope's [`EnvelopeMeta`].
pub(super) fn name_decode_error<T>(path: &Path, decoded: Result<T>) -> Result<T> {
    match decoded {
        Ok(v) => Ok(v),
        // It says what it is; "corrupt" would send the reader astray.
        Err(e) if is_newer_format(&e) => Err(e.context(path.display().to_string())),
        Err(e) => Err(e.context(format!("{} is corrupt", path.display()))),
    }
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
///
/// [`Inventory::uses_reboot`]: crate::plan::inventory::Inventory::uses_reboot
/// [`Inventory::uses_links`]: crate::plan::inventory::Inventory::uses_links
/// [`Inventory::uses_directories`]: crate::plan::inventory::Inventory::uses_directories
pub const STATE_FORMAT_RESOURCES: u64 = 2;

/// The envelope format of a journal that records accounts
/// (`[[users]]`, `[[groups]]`). Agents that read format 2 but know no
/// accounts would recover such a transaction's files and silently drop
/// the record of the accounts it made (their journal ignores unknown
/// fields): they must refuse it instead.
pub const STATE_FORMAT_ACCOUNTS: u64 = 3;

/// The envelope format of an inventory that may be followed by
/// `inventory.delta` (large inventories, see [`inventory_log`](super::inventory_log)), and of
/// that log's records. An agent before it would read the base alone and
/// forget every transaction the log records: it must refuse the file.
pub const STATE_FORMAT_LOGGED: u64 = 4;

/// The newest envelope format this binary reads. A larger one is a
/// [`NewerFormat`], refused.
pub const STATE_FORMAT_MAX: u64 = STATE_FORMAT_LOGGED;

/// [`encode_state`] always compact, on one line (the records of
/// `inventory.delta`, whatever their size).
pub(crate) fn encode_state_line<T: Serialize>(value: &T, format: u64) -> Result<Vec<u8>> {
    if !(STATE_FORMAT..=STATE_FORMAT_MAX).contains(&format) {
        bail!("cannot write state format {format}: this driftless writes formats {STATE_FORMAT} to {STATE_FORMAT_MAX}");
    }
    let (mut out, canonical) = head_and_data(value)?;
    if canonical {
        close_compact_envelope(&mut out, format);
        return Ok(out);
    }
    let data = serde_json::to_value(value).context("cannot serialise state")?;
    let text = serde_json::to_vec(&data).context("cannot serialise state")?;
    Ok(compact_envelope(&text, format))
}

/// A compact envelope's head and `value`'s compact JSON after it, and
/// whether that JSON is canonical. Written in place, so that a large
/// file's data is not copied into its envelope afterwards (a journal of
/// 10,000 entries is 2.5 MB, and its copy was part of a cold apply's peak
/// RSS, issue #18).
fn head_and_data<T: Serialize>(value: &T) -> Result<(Vec<u8>, bool)> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(COMPACT_HEAD);
    let canonical =
        super::canonical::append_checked(&mut out, value).context("cannot serialise state")?;
    Ok((out, canonical))
}

/// How a compact envelope starts; its data follows.
pub(super) const COMPACT_HEAD: &[u8] = br#"{"data":"#;

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
pub(super) fn close_compact_envelope(out: &mut Vec<u8>, format: u64) {
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
pub(super) const PRETTY_UP_TO: usize = 64 * 1024;

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
    let (mut out, canonical) = head_and_data(value)?;
    if canonical {
        let direct = &out[COMPACT_HEAD.len()..];
        if direct.len() > PRETTY_UP_TO {
            // The envelope around these very bytes, keys in the same order
            // as the pretty one: no second serialisation.
            close_compact_envelope(&mut out, format);
            return Ok(out);
        }
        let sum = hex::encode(sha2::Sha256::digest(direct));
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
pub(super) fn decode_state_fast<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
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
pub(super) fn compact_parts(bytes: &[u8]) -> Option<(&[u8], &str)> {
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
pub(super) fn decoders_agree(bytes: &[u8]) -> bool {
    match decode_state_fast::<serde_json::Value>(bytes) {
        None => true,
        Some(fast) => decode_state_slow::<serde_json::Value>(bytes).is_ok_and(|slow| slow == fast),
    }
}

/// [`decode_state`] through a `serde_json::Value` of the whole file: the
/// reference, for every file the fast path does not take.
pub(super) fn decode_state_slow<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
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
pub(super) fn envelope_sum(bytes: &[u8]) -> Option<String> {
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
pub(super) fn decode_state_meta<T: DeserializeOwned>(
    bytes: &[u8],
    read: impl FnOnce(&[u8]) -> Option<T>,
) -> Result<(T, EnvelopeMeta)> {
    use sha2::Digest;
    if let Some((data, sum, format)) = compact_parts_with_format(bytes) {
        let intact = || hex::encode(sha2::Sha256::digest(data)) == sum;
        // What is read is used only once the checksum matched.
        let (intact, read) = std::thread::scope(|scope| {
            // (On one CPU, a thread beside would only take turns with this.)
            let beside = (data.len() >= DIGEST_BESIDE_FROM && crate::cpus::cpus() > 1)
                .then(|| std::thread::Builder::new().spawn_scoped(scope, intact).ok())
                .flatten();
            match beside {
                // (A digest and a comparison do not panic; if it did, the
                // data would count as damaged.)
                Some(digest) => {
                    let read = read(data);
                    (digest.join().unwrap_or(false), read)
                }
                None => {
                    let ok = intact();
                    (ok, if ok { read(data) } else { None })
                }
            }
        });
        if let (true, Some(v)) = (intact, read) {
            let meta = EnvelopeMeta {
                format,
                sha256: sum.to_string(),
            };
            return Ok((v, meta));
        }
    }
    decode_state_slow_meta(bytes)
}

/// Data from this size on has its checksum taken on another thread while
/// it is read: the inventory of 10,000 files (2 MB) took 1.5 ms to hash,
/// after which its reader ran, while a partial sync waited for both.
const DIGEST_BESIDE_FROM: usize = 256 << 10;

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
