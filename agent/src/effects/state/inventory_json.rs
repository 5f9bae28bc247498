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

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::desired::spec::TargetPath;
use crate::plan::inventory::{Inventory, ManagedEntry};

/// `serde_json::to_vec(inv)` (canonical, since the fields are declared in
/// key order), faster.
#[cfg(test)]
pub fn to_vec(inv: &Inventory) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(256 + inv.files.len() * 224);
    write(&mut out, inv)?;
    Ok(out)
}

/// [`to_vec`], appended to `out`.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::spec::{UnitAction, UnitActionKind};
    use crate::plan::inventory::{
        DirectoryEntry, LinkEntry, Original, RebootReason, RebootRequest,
    };

    /// A small deterministic generator (no new dependency for one test).
    struct Rng(u64);
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
            (0..self.below(6))
                .map(|_| PIECES[self.below(PIECES.len() as u64) as usize])
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
                        action: if rng.below(2) == 0 {
                            UnitActionKind::Reload
                        } else {
                            UnitActionKind::Restart
                        },
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
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
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
        let mut rng = Rng(11);
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
        let mut rng = Rng(7);
        for _ in 0..200 {
            let inv = inventory(&mut rng);
            let back: Inventory = serde_json::from_slice(&to_vec(&inv).unwrap()).unwrap();
            assert_eq!(back, inv);
        }
    }
}
