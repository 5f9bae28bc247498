//! The inventory's compact JSON, written by hand for its one large part.
//!
//! Every commit writes the whole inventory: at 10,000 managed files that is
//! 2 MB of JSON, and serde's derived serialiser (with the key-order check
//! of `canonical`, compiled for size like the rest of the agent) took 6 ms
//! of a one-file commit (issue 18). The file entries are the same nine
//! fields ten thousand times, so they are written here directly: numbers
//! through `itoa`, strings copied as they are unless they need an escape.
//! Everything else (the header, the rare `on_change` and `original`
//! values) still goes through serde.
//!
//! The bytes must be exactly serde's canonical JSON (keys sorted), because
//! that is what the checksum covers and what every older agent wrote: the
//! test below compares the two over random inventories, and the structs
//! are destructured field by field so that a new field does not compile
//! until it is written here too.

use std::borrow::Cow;
use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::desired::spec::{TargetPath, UnitAction, UnitActionKind};
use crate::plan::inventory::{Inventory, ManagedEntry, Original};

/// `serde_json::to_vec(inv)` (canonical, since the fields are declared in
/// key order), faster.
#[cfg(test)]
pub fn to_vec(inv: &Inventory) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(256 + inv.files.len() * 224);
    write(&mut out, inv)?;
    Ok(out)
}

/// `serde_json::to_writer(out, inv)`, faster (see `to_vec`).
pub fn write(out: &mut Vec<u8>, inv: &Inventory) -> Result<()> {
    let Inventory {
        applied_at,
        commit,
        directories,
        dirs,
        files,
        links,
        reboot,
        txid,
        version,
    } = inv;
    // The header in two halves around `files`, each serialised by serde
    // in key order (the skipped fields skipped the same way).
    #[derive(Serialize)]
    struct Before<'a> {
        applied_at: &'a i64,
        commit: &'a Option<String>,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        directories: &'a BTreeMap<TargetPath, crate::plan::inventory::DirectoryEntry>,
        #[serde(skip_serializing_if = "std::collections::BTreeSet::is_empty")]
        dirs: &'a std::collections::BTreeSet<TargetPath>,
    }
    #[derive(Serialize)]
    struct After<'a> {
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        links: &'a BTreeMap<TargetPath, crate::plan::inventory::LinkEntry>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reboot: &'a Option<crate::plan::inventory::RebootRequest>,
        txid: &'a String,
        version: &'a u32,
    }
    serde_json::to_writer(
        &mut *out,
        &Before {
            applied_at,
            commit,
            directories,
            dirs,
        },
    )
    .context("cannot serialise the inventory")?;
    // `{...}` without its closing brace (never empty: `applied_at` and
    // `commit` are always written).
    out.pop();
    out.extend_from_slice(br#","files":{"#);
    for (i, (path, entry)) in files.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, path.as_str())?;
        out.push(b':');
        managed_entry(out, entry)?;
    }
    out.extend_from_slice(b"},");
    let after = serde_json::to_vec(&After {
        links,
        reboot,
        txid,
        version,
    })
    .context("cannot serialise the inventory")?;
    // Without its opening brace.
    out.extend_from_slice(after.get(1..).unwrap_or_default());
    Ok(())
}

fn managed_entry(out: &mut Vec<u8>, e: &ManagedEntry) -> Result<()> {
    let ManagedEntry {
        gid,
        mode,
        on_change,
        original,
        reboot,
        role,
        sensitive,
        sha256,
        size,
        uid,
    } = e;
    let mut n = itoa::Buffer::new();
    out.extend_from_slice(br#"{"gid":"#);
    out.extend_from_slice(n.format(*gid).as_bytes());
    out.extend_from_slice(br#","mode":"#);
    out.extend_from_slice(n.format(*mode).as_bytes());
    out.extend_from_slice(br#","on_change":"#);
    if on_change.is_empty() {
        out.extend_from_slice(b"[]");
    } else {
        serde_json::to_writer(&mut *out, on_change).context("cannot serialise the inventory")?;
    }
    out.extend_from_slice(br#","original":"#);
    match original {
        None => out.extend_from_slice(b"null"),
        Some(o) => serde_json::to_writer(&mut *out, o).context("cannot serialise the inventory")?,
    }
    if *reboot {
        out.extend_from_slice(br#","reboot":true"#);
    }
    out.extend_from_slice(br#","role":"#);
    string(out, role)?;
    out.extend_from_slice(if *sensitive {
        br#","sensitive":true,"sha256":"#.as_slice()
    } else {
        br#","sensitive":false,"sha256":"#.as_slice()
    });
    string(out, sha256)?;
    out.extend_from_slice(br#","size":"#);
    out.extend_from_slice(n.format(*size).as_bytes());
    out.extend_from_slice(br#","uid":"#);
    out.extend_from_slice(n.format(*uid).as_bytes());
    out.push(b'}');
    Ok(())
}

/// A JSON string as serde_json writes it: copied between quotes when it
/// holds nothing to escape (a control character, `"` or `\`), else
/// through serde_json itself.
fn string(out: &mut Vec<u8>, s: &str) -> Result<()> {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        Ok(())
    } else {
        serde_json::to_writer(&mut *out, s).context("cannot serialise the inventory")
    }
}

/// `serde_json::from_slice::<Inventory>(data)` for the bytes [`write()`]
/// produces, faster; `None` for anything else, and the caller then takes
/// serde's path, which decides.
///
/// Why: a one-file sync at 10,000 files decodes the 2 MB base of the
/// inventory, and serde's derived reader (matching every field name of
/// every entry, a string allocated for each key it reads) was half the
/// CPU of the thread that reads it, running against the `lstat` workers
/// of the quick check on a two-core host (issue #18).
///
/// What makes it safe: it reads only the exact form `write` writes (no
/// whitespace, the fields in their order, no escapes in keys or strings,
/// keys strictly in order), hands everything outside `files` to serde
/// itself, and whatever it returns, serde returns too: the tests below and
/// the `inventory_json` fuzz target compare the two.
pub fn read(data: &[u8]) -> Option<Inventory> {
    // On one CPU the second half would only wait for the first.
    let split_from = if crate::cpus::cpus() > 1 {
        SPLIT_FROM_BYTES
    } else {
        usize::MAX
    };
    read_split_from(data, split_from)
}

/// [`read`], reading `files` in two halves from `split_from` bytes on
/// (the fuzz target compares 0 with never).
pub fn read_split_from(data: &[u8], split_from: usize) -> Option<Inventory> {
    let text = std::str::from_utf8(data).ok()?;
    let at = memchr::memmem::find(data, br#","files":{"#)? + br#","files":"#.len();
    // That key belongs to the top-level object, outside any string, if and
    // only if the text before it, closed, is one complete object: parsing
    // is left to right, so the state at that point is the same in both.
    let head = format!("{}}}", &text[..at - br#","files":"#.len()]);
    serde_json::from_str::<serde::de::IgnoredAny>(&head).ok()?;
    let (files, len) = files_map_cut(&text[at..], split_from)?;
    // The rest through serde, with `files` empty; a second `files` key
    // there is refused as serde refuses it in the whole.
    let mut rest = String::with_capacity(text.len() - len + 2);
    rest.push_str(&text[..at]);
    rest.push_str("{}");
    rest.push_str(&text[at + len..]);
    let mut inv: Inventory = serde_json::from_str(&rest).ok()?;
    inv.files = files;
    Some(inv)
}

/// From this size on, the second half of `files` is read on a thread of
/// its own (2 MB at 10,000 files, whose reading took 3.6 ms of a one-file
/// sync on the inventory's thread while the sync waited for it; issue
/// #18). A thread costs about 50 µs; 1,000 files are 200 KB.
const SPLIT_FROM_BYTES: usize = 512 * 1024;

/// Where a reader of entries stopped.
enum Stop {
    /// At the `}` that closes `files`, just past it.
    End,
    /// At the cut: on the `,` before the next entry's key.
    Cut,
}

/// The `files` object at the start of `text` and its length in bytes,
/// its second half read on another thread when `text` is `split_from`
/// bytes or more.
///
/// Why the result is exactly the serial one, whatever the text: the cut
/// is a guess (the first `},"/` past the middle, which `write` puts only
/// between two entries), and the first half is read serially until it
/// stands *exactly* on the cut after a whole entry. There the serial
/// reader would take the `,` and read on from the next key, which is what
/// the second half did, from the same text with the same rules; only the
/// order of the two keys around the cut is checked here instead. A first
/// half that ends `files` before the cut, or passes it inside an entry,
/// simply reads on serially, and the second half's result is dropped.
fn files_map_cut(
    text: &str,
    split_from: usize,
) -> Option<(BTreeMap<TargetPath, ManagedEntry>, usize)> {
    let mut r = Reader { text, at: 0 };
    r.literal("{")?;
    if r.eat("}") {
        return Some((BTreeMap::new(), r.at));
    }
    // Sized from the text, not from anything it claims: an entry as
    // `write` writes it takes more than 128 bytes.
    let mut pairs: Vec<(TargetPath, ManagedEntry)> = Vec::with_capacity(text.len() / 128);
    let cut = (text.len() >= split_from)
        .then(|| memchr::memmem::find(&text.as_bytes()[text.len() / 2..], br#"},"/"#))
        .flatten()
        .map(|i| text.len() / 2 + i + 1);
    let Some(cut) = cut else {
        entries(&mut r, &mut pairs, None)?;
        return Some((pairs.into_iter().collect(), r.at));
    };
    let second_half = || {
        let mut r = Reader { text, at: cut + 1 };
        let mut pairs = Vec::with_capacity((text.len() - cut) / 128);
        entries(&mut r, &mut pairs, None).map(|_| (pairs, r.at))
    };
    std::thread::scope(|scope| {
        let second = std::thread::Builder::new()
            .name("inventory-2".into())
            .spawn_scoped(scope, second_half)
            .ok();
        let first = entries(&mut r, &mut pairs, Some(cut));
        // Joined whatever the first half found (the scope would join it
        // anyway, and re-raise a panic of it there).
        let second = second.map(std::thread::ScopedJoinHandle::join);
        match first? {
            // `files` ended before the cut, or the cut was inside an entry
            // and this read past it to the end: the second half is moot.
            Stop::End => {}
            Stop::Cut => match second {
                Some(Ok(rest)) => {
                    let (rest, end) = rest?;
                    if let (Some((last, _)), Some((next, _))) = (pairs.last(), rest.first()) {
                        if last >= next {
                            return None;
                        }
                    }
                    pairs.extend(rest);
                    r.at = end;
                }
                // No second thread (or one that panicked, which reading
                // cannot): read on here.
                _ => {
                    r.literal(",")?;
                    entries(&mut r, &mut pairs, None)?;
                }
            },
        }
        // In order already: one pass of the sort, then the tree built in bulk.
        Some((pairs.into_iter().collect(), r.at))
    })
}

/// Reads `key:entry` pairs into `pairs` (keys strictly ascending) until
/// the `}` that closes `files`, or until it stands on `cut` after a whole
/// entry. `None`: the text is not in `write`'s exact form.
fn entries(
    r: &mut Reader<'_>,
    pairs: &mut Vec<(TargetPath, ManagedEntry)>,
    cut: Option<usize>,
) -> Option<Stop> {
    loop {
        let key = r.string()?;
        // Strictly in order: no duplicate, whose value serde would
        // take from the last one.
        if pairs.last().is_some_and(|(last, _)| last.as_str() >= &*key) {
            return None;
        }
        let path = TargetPath::parse(&key).ok()?;
        r.literal(":")?;
        pairs.push((path, r.entry()?));
        if r.eat("}") {
            return Some(Stop::End);
        }
        if cut == Some(r.at) {
            return Some(Stop::Cut);
        }
        r.literal(",")?;
    }
}

struct Reader<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Reader<'a> {
    fn rest(&self) -> &'a str {
        &self.text[self.at..]
    }

    // Inlined, so each literal is compared as the constant it is, not
    // through a `memcmp` call (fourteen per entry).
    #[inline(always)]
    fn eat(&mut self, lit: &str) -> bool {
        let yes = self.rest().starts_with(lit);
        if yes {
            self.at += lit.len();
        }
        yes
    }

    #[inline(always)]
    fn literal(&mut self, lit: &str) -> Option<()> {
        self.eat(lit).then_some(())
    }

    /// A string. One with nothing escaped is borrowed (no control
    /// character: serde refuses a raw one); one with escapes (a systemd
    /// unit name's `\x2d` is one) is decoded by serde itself, so that it
    /// reads as serde reads it, and an inventory holding one does not
    /// leave the whole file to serde.
    fn string(&mut self) -> Option<Cow<'a, str>> {
        self.literal("\"")?;
        let rest = self.rest();
        let bytes = rest.as_bytes();
        let end = memchr::memchr2(b'"', b'\\', bytes)?;
        if bytes[end] == b'"' {
            let s = &rest[..end];
            if s.bytes().any(|b| b < 0x20) {
                return None;
            }
            self.at += end + 1;
            return Some(Cow::Borrowed(s));
        }
        // The closing quote: the first not escaped. (An escape's second
        // byte is skipped; the quote found is ASCII, so a boundary.)
        let mut close = end;
        loop {
            match bytes.get(close)? {
                b'\\' => close += 2,
                b'"' => break,
                _ => close += 1,
            }
        }
        let quoted = &self.text[self.at - 1..=self.at + close];
        let decoded: String = serde_json::from_str(quoted).ok()?;
        self.at += close + 1;
        Some(Cow::Owned(decoded))
    }

    fn bool(&mut self) -> Option<bool> {
        if self.eat("true") {
            Some(true)
        } else {
            self.literal("false").map(|()| false)
        }
    }

    /// A non-negative integer as JSON spells it (no leading zero, no
    /// fraction or exponent: a `.` or `e` after it fails the next literal).
    fn number<T: TryFrom<u64>>(&mut self) -> Option<T> {
        let digits = self.rest().bytes().take_while(u8::is_ascii_digit).count();
        let text = &self.rest()[..digits];
        if digits == 0 || (digits > 1 && text.starts_with('0')) || digits > 20 {
            return None;
        }
        let v: u64 = text.parse().ok()?;
        self.at += digits;
        T::try_from(v).ok()
    }

    /// `on_change` as serde writes it: `[]` or actions of a known kind,
    /// each `{"action":...,"unit":...}`.
    fn actions(&mut self) -> Option<Vec<UnitAction>> {
        self.literal("[")?;
        let mut out = Vec::new();
        if self.eat("]") {
            return Some(out);
        }
        loop {
            self.literal(r#"{"action":"#)?;
            let action = match self.string()?.as_ref() {
                "reload" => UnitActionKind::Reload,
                "reload-or-restart" => UnitActionKind::ReloadOrRestart,
                "try-restart" => UnitActionKind::TryRestart,
                "restart" => UnitActionKind::Restart,
                _ => return None,
            };
            self.literal(r#","unit":"#)?;
            let unit = self.string()?.into_owned();
            self.literal("}")?;
            out.push(UnitAction { action, unit });
            if self.eat("]") {
                return Some(out);
            }
            self.literal(",")?;
        }
    }

    /// `original` as serde writes it: `null` or its four fields.
    fn original(&mut self) -> Option<Option<Original>> {
        if self.eat("null") {
            return Some(None);
        }
        self.literal(r#"{"gid":"#)?;
        let gid = self.number()?;
        self.literal(r#","mode":"#)?;
        let mode = self.number()?;
        self.literal(r#","stored":"#)?;
        let stored = self.string()?.into_owned();
        self.literal(r#","uid":"#)?;
        let uid = self.number()?;
        self.literal("}")?;
        Some(Some(Original {
            gid,
            mode,
            stored,
            uid,
        }))
    }

    /// A [`ManagedEntry`] in the order `managed_entry` writes its fields.
    fn entry(&mut self) -> Option<ManagedEntry> {
        self.literal(r#"{"gid":"#)?;
        let gid = self.number()?;
        self.literal(r#","mode":"#)?;
        let mode = self.number()?;
        self.literal(r#","on_change":"#)?;
        let on_change = self.actions()?;
        self.literal(r#","original":"#)?;
        let original = self.original()?;
        let reboot = if self.eat(r#","reboot":"#) {
            self.bool()?
        } else {
            false
        };
        self.literal(r#","role":"#)?;
        let role = self.string()?.into_owned();
        self.literal(r#","sensitive":"#)?;
        let sensitive = self.bool()?;
        self.literal(r#","sha256":"#)?;
        let sha256 = self.string()?.into_owned();
        self.literal(r#","size":"#)?;
        let size = self.number()?;
        self.literal(r#","uid":"#)?;
        let uid = self.number()?;
        self.literal("}")?;
        Some(ManagedEntry {
            gid,
            mode,
            on_change,
            original,
            reboot,
            role,
            sensitive,
            sha256,
            size,
            uid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::inventory::{DirectoryEntry, LinkEntry, RebootReason, RebootRequest};

    /// A small deterministic generator (no new dependency for one test).
    /// `.1`: only text that needs no escape in JSON.
    struct Rng(u64, bool);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn text(&mut self) -> String {
            const PIECES: &[&str] = &[
                "a", "Z", "0", "-", ".", "\"", "\\", "\n", "\t", "\u{1}", "\u{1f}", "\u{7f}", "é",
                "€", "😀", " ", "/", "\u{2028}",
            ];
            let plain = self.1;
            (0..self.below(6))
                .map(|_| PIECES[self.below(PIECES.len() as u64) as usize])
                .filter(|p| !plain || p.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\'))
                .collect()
        }
        fn number(&mut self) -> u64 {
            match self.below(4) {
                0 => 0,
                1 => u64::from(u32::MAX),
                2 => u64::MAX,
                _ => self.next() >> self.below(64),
            }
        }
    }

    fn path(rng: &mut Rng, i: usize) -> TargetPath {
        let name = format!("/etc/t{i}{}", rng.text().replace(['/', '\0'], "_"));
        TargetPath::parse(&name)
            .unwrap_or_else(|_| TargetPath::parse(&format!("/etc/p{i}")).unwrap())
    }

    fn inventory(rng: &mut Rng) -> Inventory {
        let mut inv = Inventory {
            applied_at: rng.number() as i64,
            commit: (rng.below(2) == 0).then(|| rng.text()),
            txid: rng.text(),
            version: rng.number() as u32,
            ..Default::default()
        };
        for i in 0..rng.below(20) as usize {
            let entry = ManagedEntry {
                gid: rng.number() as u32,
                mode: rng.number() as u32,
                on_change: (0..rng.below(3))
                    .map(|_| UnitAction {
                        unit: rng.text(),
                        action: [
                            UnitActionKind::Reload,
                            UnitActionKind::ReloadOrRestart,
                            UnitActionKind::TryRestart,
                            UnitActionKind::Restart,
                        ][rng.below(4) as usize],
                    })
                    .collect(),
                original: (rng.below(3) == 0).then(|| Original {
                    gid: rng.number() as u32,
                    mode: rng.number() as u32,
                    stored: rng.text(),
                    uid: rng.number() as u32,
                }),
                reboot: rng.below(4) == 0,
                role: rng.text(),
                sensitive: rng.below(2) == 0,
                sha256: rng.text(),
                size: rng.number(),
                uid: rng.number() as u32,
            };
            inv.files.insert(path(rng, i), entry);
        }
        if rng.below(3) == 0 {
            inv.dirs.insert(path(rng, 1000));
        }
        if rng.below(3) == 0 {
            inv.directories.insert(
                path(rng, 2000),
                DirectoryEntry {
                    created: rng.below(2) == 0,
                    gid: 1,
                    mode: 0o755,
                    role: rng.text(),
                    uid: 2,
                },
            );
        }
        if rng.below(3) == 0 {
            inv.links.insert(
                path(rng, 3000),
                LinkEntry {
                    created: true,
                    role: rng.text(),
                    target: rng.text(),
                },
            );
        }
        if rng.below(3) == 0 {
            inv.reboot = Some(RebootRequest {
                boot_id: rng.text(),
                reasons: vec![RebootReason {
                    commit: None,
                    package: rng.text(),
                    path: path(rng, 4000),
                    txid: rng.text(),
                }],
            });
        }
        inv
    }

    /// The reference: serde's JSON of the inventory with its keys sorted
    /// (what `encode_state` checksums and every older agent wrote).
    fn reference(inv: &Inventory) -> Vec<u8> {
        serde_json::to_vec(&serde_json::to_value(inv).unwrap()).unwrap()
    }

    #[test]
    fn the_hand_written_inventory_json_is_serdes_canonical_json_byte_for_byte() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15, false);
        for _ in 0..2000 {
            let inv = inventory(&mut rng);
            assert_eq!(
                String::from_utf8(to_vec(&inv).unwrap()).unwrap(),
                String::from_utf8(reference(&inv)).unwrap()
            );
        }
        // The empty inventory, and one of nothing but files.
        let empty = Inventory::default();
        assert_eq!(to_vec(&empty).unwrap(), reference(&empty));
    }

    /// The bug this guards against: the inventory's envelope is written
    /// around the data in one buffer (not copied into a second one); its
    /// bytes must stay what the general state writer makes of the same
    /// inventory, pretty below the size limit and compact above, and read
    /// back the same.
    #[test]
    fn the_inventory_file_is_what_the_general_state_writer_writes() {
        let mut rng = Rng(11, false);
        for n in [0usize, 3, 3000] {
            let mut inv = inventory(&mut rng);
            while inv.files.is_empty() {
                inv = inventory(&mut rng);
            }
            let template = inv.files.values().next().cloned().unwrap();
            for i in 0..n {
                inv.files
                    .insert(path(&mut rng, 10_000 + i), template.clone());
            }
            let format = super::super::inventory_format(&inv);
            let bytes = super::super::encode_inventory(&inv).unwrap();
            assert_eq!(
                String::from_utf8(bytes.clone()).unwrap(),
                String::from_utf8(super::super::encode_state(&inv, format).unwrap()).unwrap(),
                "{n} more files"
            );
            // Both forms are covered: pretty below the limit, compact above.
            if n != 3 {
                assert_eq!(bytes.starts_with(b"{\"data\":"), n == 3000, "{n}");
            }
            let back: Inventory = super::super::decode_state(&bytes).unwrap();
            assert_eq!(back, inv);
        }
    }

    #[test]
    fn what_it_writes_reads_back_as_the_same_inventory() {
        let mut rng = Rng(7, false);
        for _ in 0..200 {
            let inv = inventory(&mut rng);
            let back: Inventory = serde_json::from_slice(&to_vec(&inv).unwrap()).unwrap();
            assert_eq!(back, inv);
        }
    }

    /// `data` with one byte replaced by one of `bytes`, dropped or
    /// doubled, or (with `cut`) everything from one byte on dropped.
    fn damage(rng: &mut Rng, data: &[u8], bytes: &[u8], cut: bool) -> Vec<u8> {
        let mut damaged = data.to_vec();
        let at = rng.below(data.len() as u64) as usize;
        match rng.below(if cut { 4 } else { 3 }) {
            0 => damaged[at] = bytes[rng.below(bytes.len() as u64) as usize],
            1 => drop(damaged.remove(at)),
            2 => damaged.insert(at, damaged[at]),
            _ => damaged.truncate(at),
        }
        damaged
    }

    /// What the fast reader returns, serde returns too: for every
    /// inventory it reads, and for every damaged copy of one (a byte
    /// changed, dropped or doubled, a cut), where it may only read nothing
    /// or the same.
    fn agrees(data: &[u8]) -> bool {
        match read(data) {
            None => false,
            Some(fast) => {
                let slow: Inventory = serde_json::from_slice(data).unwrap_or_else(|e| {
                    panic!(
                        "the fast reader read what serde refuses ({e}): {}",
                        String::from_utf8_lossy(data)
                    )
                });
                assert_eq!(fast, slow, "{}", String::from_utf8_lossy(data));
                true
            }
        }
    }

    #[test]
    fn the_fast_reader_reads_what_serde_reads_or_leaves_it_to_serde() {
        let (mut read_fast, mut damaged_read) = (0, 0);
        for plain in [true, false] {
            let mut rng = Rng(0x5eed_cafe, plain);
            for _ in 0..400 {
                let inv = inventory(&mut rng);
                let data = to_vec(&inv).unwrap();
                let fast = agrees(&data);
                // Text with nothing to escape is always its to read (so
                // this test compares something).
                if plain {
                    assert!(fast, "{}", String::from_utf8_lossy(&data));
                }
                read_fast += usize::from(fast);
                for _ in 0..40 {
                    let damaged = damage(&mut rng, &data, b"{}[]\",:0123456789ntfe-\\ x/", true);
                    damaged_read += usize::from(agrees(&damaged));
                }
            }
        }
        assert!(read_fast >= 400, "{read_fast}");
        // Some damage leaves a valid inventory (a digit changed): compared.
        assert!(damaged_read > 1000, "{damaged_read}");
    }

    /// The `files` text of an inventory's JSON (as `read` finds it).
    fn files_text(data: &[u8]) -> Option<&str> {
        let text = std::str::from_utf8(data).ok()?;
        let at = memchr::memmem::find(data, br#","files":{"#)? + br#","files":"#.len();
        Some(&text[at..])
    }

    /// Reading `files` in two halves on two threads gives exactly what
    /// one serial pass gives, for every inventory and every damaged copy
    /// of one, wherever the guessed cut falls (on an entry's end, inside
    /// an entry, past the end of `files`, or nowhere).
    #[test]
    fn reading_files_in_two_halves_reads_exactly_what_one_pass_reads() {
        let (mut cut_on_an_entry, mut compared) = (0, 0);
        for plain in [true, false] {
            let mut rng = Rng(0xc0ff_ee00, plain);
            for _ in 0..300 {
                let inv = inventory(&mut rng);
                let data = to_vec(&inv).unwrap();
                let mut copies = vec![data.clone()];
                for _ in 0..20 {
                    copies.push(damage(&mut rng, &data, b"{}\",:0/", false));
                }
                for copy in &copies {
                    let Some(text) = files_text(copy) else {
                        continue;
                    };
                    let serial = files_map_cut(text, usize::MAX);
                    assert_eq!(files_map_cut(text, 0), serial, "{text}");
                    compared += usize::from(serial.is_some());
                    let mid = text.len() / 2;
                    if memchr::memmem::find(&text.as_bytes()[mid..], br#"},"/"#).is_some()
                        && serial.as_ref().is_some_and(|(files, _)| files.len() > 1)
                    {
                        cut_on_an_entry += 1;
                    }
                }
            }
        }
        // Both paths were taken, many times.
        assert!(compared > 500, "{compared}");
        assert!(cut_on_an_entry > 100, "{cut_on_an_entry}");
    }

    /// A second half that does not continue the first in key order (two
    /// halves each in order, the whole not) is refused, as one pass
    /// refuses it.
    #[test]
    fn keys_out_of_order_across_the_cut_are_refused() {
        let entry = r#"{"gid":0,"mode":420,"on_change":[],"original":null,"role":"r","sensitive":false,"sha256":"ab","size":1,"uid":0}"#;
        // Each half in order, the whole not: the cut falls between the
        // second entry and the third.
        let files = format!(r#"{{"/b":{entry},"/c":{entry},"/a":{entry}}}"#);
        let mid = files.len() / 2;
        let cut = mid + memchr::memmem::find(&files.as_bytes()[mid..], br#"},"/"#).unwrap() + 1;
        assert!(files[cut..].starts_with(r#","/a":"#), "{}", &files[cut..]);
        assert_eq!(files_map_cut(&files, usize::MAX), None);
        assert_eq!(files_map_cut(&files, 0), None);
        let sorted = format!(r#"{{"/a":{entry},"/b":{entry},"/c":{entry},"/d":{entry}}}"#);
        let (whole, len) = files_map_cut(&sorted, 0).expect("in order");
        assert_eq!((whole.len(), len), (4, sorted.len()));
    }

    /// Forms `write` never makes, each refused by the fast reader and left
    /// to serde (which reads some of them: a duplicate key's last value
    /// wins, whitespace is allowed, fields come in any order).
    #[test]
    fn anything_but_the_written_form_is_left_to_serde() {
        let entry = r#"{"gid":0,"mode":420,"on_change":[],"original":null,"role":"r","sensitive":false,"sha256":"ab","size":1,"uid":0}"#;
        let whole = |files: &str| {
            format!(r#"{{"applied_at":1,"commit":null,"files":{files},"txid":"t","version":1}}"#)
        };
        assert!(agrees(whole(&format!(r#"{{"/a":{entry}}}"#)).as_bytes()));
        assert!(agrees(whole("{}").as_bytes()));
        for files in [
            format!(r#"{{"/a":{entry},"/a":{entry}}}"#),
            format!(r#"{{"/b":{entry},"/a":{entry}}}"#),
            format!(r#"{{ "/a":{entry}}}"#),
            format!(r#"{{"/a":{}}}"#, entry.replace(r#""gid":0"#, r#""gid":00"#)),
            format!(
                r#"{{"/a":{}}}"#,
                entry.replace(r#""gid":0"#, r#""gid":4294967296"#)
            ),
            format!(
                r#"{{"/a":{}}}"#,
                entry.replace(r#""size":1"#, r#""size":1.0"#)
            ),
            format!(
                r#"{{"/a":{}}}"#,
                entry.replace(r#""uid":0}"#, r#""uid":0,"x":1}"#)
            ),
            format!(
                r#"{{"/a":{}}}"#,
                entry.replace(
                    r#""on_change":[]"#,
                    r#""on_change":[{"unit":"u","action":"reload"}]"#
                )
            ),
            // A raw control character (serde refuses it too), an escape
            // that is none, a lone surrogate.
            format!(
                r#"{{"/a":{}}}"#,
                entry.replace(r#""role":"r""#, "\"role\":\"\u{1}\"")
            ),
            format!(
                r#"{{"/a":{}}}"#,
                entry.replace(r#""role":"r""#, r#""role":"\q""#)
            ),
            format!(
                r#"{{"/a":{}}}"#,
                entry.replace(r#""role":"r""#, r#""role":"\ud800""#)
            ),
            // Two keys that are one once their escapes are read.
            format!(r#"{{"/a":{entry},"/\u0061":{entry}}}"#),
            format!(r#"{{"a":{entry}}}"#),
        ] {
            assert!(!agrees(whole(&files).as_bytes()), "{files}");
        }
        // Escaped strings are read, by serde, as serde reads them: a
        // systemd unit name, a path, any field.
        for files in [
            format!(r#"{{"/\u0061":{entry}}}"#),
            format!(
                r#"{{"/a":{}}}"#,
                entry.replace(r#""role":"r""#, r#""role":"\n\"\\""#)
            ),
            format!(
                r#"{{"/mnt/a\\x2db":{}}}"#,
                entry.replace(
                    r#""on_change":[]"#,
                    r#""on_change":[{"action":"reload","unit":"mnt-a\\x2db.mount"}]"#
                )
            ),
        ] {
            assert!(agrees(whole(&files).as_bytes()), "{files}");
        }
        // "files" elsewhere than as the top-level key: inside an entry's
        // unit action, whose unknown fields serde ignores (without the
        // check that the text before the key is one whole object, the
        // reader took this one and read no files).
        let in_action = format!(
            r#"{{"files":{{"/a":{}}},"applied_at":1,"commit":null,"txid":"t","version":1}}"#,
            entry.replace(
                r#""on_change":[]"#,
                r#""on_change":[{"action":"reload","unit":"u","files":{}}]"#
            )
        );
        assert!(
            serde_json::from_str::<Inventory>(&in_action).is_ok_and(|i| i.files.len() == 1),
            "serde reads it"
        );
        assert!(!agrees(in_action.as_bytes()));
        // "files" elsewhere than as the top-level key.
        let nested = format!(
            r#"{{"applied_at":1,"commit":null,"directories":{{"/d":{{"created":true,"gid":0,"mode":493,"role":"r","uid":0,"files":{{}}}}}},"files":{{"/a":{entry}}},"txid":"t","version":1}}"#
        );
        assert!(!agrees(nested.as_bytes()));
    }
}
