//! The entry points of the fuzz targets `repo_config`, `role_file`,
//! `state_file`, `rollout`, `fleetlock_request` and `loose_object` (`fuzz/`, `cargo fuzz`): the parsers that untrusted bytes
//! reach, called exactly as the agent calls
//! them. Each must return (an error is fine), never panic, hang or
//! allocate without bound. Unit tests below feed each a few odd inputs so
//! the entry points cannot rot between fuzz runs.

use std::sync::Arc;

use crate::desired::load::{load_host, LoadOptions};
use crate::desired::render::Renderer;
use crate::desired::secrets::SecretResolver;
use crate::desired::snapshot::Snapshot;
use crate::desired::spec::TargetPath;

/// Splits fuzz input into up to `n` parts at 0xFF bytes (never valid in
/// UTF-8, so the parts stay independent text).
fn parts(data: &[u8], n: usize) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = data.splitn(n, |b| *b == 0xff).map(<[u8]>::to_vec).collect();
    out.resize(n, Vec::new());
    out
}

fn load_options() -> LoadOptions {
    let t = |p: &str| TargetPath::parse(p).expect("a valid target path");
    LoadOptions {
        allowed_roots: vec![t("/etc"), t("/srv")],
        reserved: vec![(t("/etc/driftless"), "the agent's configuration".into())],
    }
}

/// Loads (and, if that works, renders) a repository whose files come from
/// the input: `driftless.toml`, `hosts/h.toml`, `roles/a/role.toml` and
/// the template `roles/a/files/t.tera`.
fn load_and_render(files: [(&str, Vec<u8>); 4]) {
    let mut snap = Snapshot::new();
    for (path, bytes) in files {
        snap.insert_file(path, bytes, false);
    }
    let Ok(host) = load_host(&snap, "h", &load_options()) else {
        return;
    };
    let secrets = Arc::new(SecretResolver::placeholders(&snap));
    let Ok(renderer) = Renderer::new(&snap, &[&host], secrets) else {
        return;
    };
    let facts = serde_json::json!({ "hostname": "h" });
    let _ = renderer.render_only(&snap, &host, &facts, None);
}

/// `driftless.toml` and a host file from the input; a fixed role.
pub fn repo_config(data: &[u8]) {
    let p = parts(data, 2);
    load_and_render([
        ("driftless.toml", p[0].clone()),
        ("hosts/h.toml", p[1].clone()),
        (
            "roles/a/role.toml",
            b"[[files]]\npath = \"/etc/a\"\ntemplate = \"t.tera\"\n".to_vec(),
        ),
        (
            "roles/a/files/t.tera",
            b"{{ vars | json_encode() }}\n".to_vec(),
        ),
    ]);
}

/// A role file and its template from the input; a fixed repository file.
pub fn role_file(data: &[u8]) {
    let p = parts(data, 2);
    load_and_render([
        ("driftless.toml", b"roles = [\"a\"]\n".to_vec()),
        ("hosts/h.toml", Vec::new()),
        ("roles/a/role.toml", p[0].clone()),
        ("roles/a/files/t.tera", p[1].clone()),
    ]);
}

/// The state files, parsed as the agent reads them: the first byte picks
/// the file.
pub fn state_file(data: &[u8]) {
    let Some((kind, rest)) = data.split_first() else {
        return;
    };
    match kind % 9 {
        0 => drop(serde_json::from_slice::<crate::plan::inventory::Inventory>(
            rest,
        )),
        1 => drop(serde_json::from_slice::<crate::sync::marks::Marks>(rest)),
        2 => drop(serde_json::from_slice::<
            crate::effects::apply::journal::Journal,
        >(rest)),
        3 => drop(serde_json::from_slice::<crate::effects::state::floor::Floor>(rest)),
        4 => {
            for line in rest.split(|b| *b == b'\n') {
                drop(serde_json::from_slice::<
                    crate::effects::state::history::Entry,
                >(line));
            }
        }
        // `quick.json` and `quick.delta` through their own line decoder (the serde form is
        // only its header line).
        5 => drop(crate::effects::state::quick::decode(rest)),
        6 => {
            // `inventory.delta` after a base whose checksum is "b", read
            // as the live log and as a transaction's copy.
            use crate::effects::state::inventory_log::{apply_log, Reading};
            let meta = crate::effects::state::EnvelopeMeta {
                format: crate::effects::state::STATE_FORMAT_LOGGED,
                sha256: "b".into(),
            };
            for reading in [Reading::Live, Reading::Copy] {
                let mut inv = crate::plan::inventory::Inventory::default();
                let path = std::path::Path::new("inventory.delta");
                drop(apply_log(path, Some(rest), &meta, 0, &mut inv, reading));
            }
        }
        // The configuration cache, behind a header that holds.
        7 => crate::effects::state::config_cache::fuzz_body(rest),
        _ => drop(crate::desired::toml_file::parse::<crate::config::Fragment>(
            "agent.toml",
            &String::from_utf8_lossy(rest),
        )),
    }
}

/// A `[rollout]` policy (`driftless.toml` of a commit: every host of a
/// fleet reads it) parsed as the agent does, then the decision and each
/// maintenance window evaluated at times taken from the input, in UTC and
/// in a zone with daylight saving: the calendar search must end.
pub fn rollout(data: &[u8]) {
    let (times, text) = data.split_at(data.len().min(8));
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let Ok(Some(policy)) = crate::rollout::policy::parse("driftless.toml", text) else {
        return;
    };
    let mut t = [0u8; 8];
    t[..times.len()].copy_from_slice(times);
    // Any instant from 1970 to about 2170.
    let now = (u64::from_le_bytes(t) % 6_300_000_000) as i64;
    let berlin = jiff::tz::TimeZone::get("Europe/Berlin").unwrap_or(jiff::tz::TimeZone::UTC);
    for tz in [jiff::tz::TimeZone::UTC, berlin] {
        for rule in &policy.windows {
            let _ = rule.window.open_until(now, &tz);
            let _ = rule.window.next_open(now, &tz);
        }
        let labels = std::collections::BTreeMap::new();
        let host = crate::rollout::ThisHost {
            name: "h",
            group: "g",
            labels: &labels,
            current: None,
            tz: &tz,
        };
        let _ = crate::rollout::decide(
            &policy,
            &host,
            &crate::rollout::FleetView::default(),
            "c",
            now,
        );
    }
}

/// A FleetLock request body, as the server reads it from anyone who can
/// reach it: parsed and checked, and what passes must be a single etcd
/// key part (no '/', nothing unprintable).
pub fn fleetlock_request(data: &[u8]) {
    if let Ok(p) = crate::effects::fleet::fleetlock::parse_request(data) {
        for part in [&p.id, &p.group] {
            assert!(!part.is_empty() && !part.contains('/') && part.len() <= 253);
            assert!(part.bytes().all(|b| b.is_ascii_graphic()));
        }
    }
}

/// A loose object's file from a repository, as driftless's own loose
/// reader inflates it (`effects/fetch/blobs.rs`) under a `max_file_size`
/// of 64 KiB: whatever it returns is at most that long.
pub fn loose_object(data: &[u8]) {
    if let Ok(body) = crate::effects::fetch::inflate_loose_blob(data, 64 << 10) {
        assert!(body.len() <= 64 << 10);
    }
}

/// An inventory's data as the fast reader reads it
/// (`effects::state::inventory_json::read`): whatever it returns, serde's
/// derived reader must return too, so the two can never disagree about
/// what the state says.
///
/// Its `files`, read in two halves on two threads, must read exactly as
/// in one pass, wherever the guessed cut falls.
pub fn inventory_json(data: &[u8]) {
    use crate::effects::state::inventory_json::read_split_from;
    let fast = read_split_from(data, usize::MAX);
    assert_eq!(read_split_from(data, 0), fast);
    if let Some(fast) = fast {
        let slow = serde_json::from_slice::<crate::plan::inventory::Inventory>(data);
        assert_eq!(slow.ok(), Some(fast));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ODD: &[&[u8]] = &[
        b"",
        b"\xff",
        b"roles = [\"a\"]\xffroles = [\"a\", \"a\"]",
        b"[[files]]\npath = \"/etc/x\"\ntemplate = \"t.tera\"\xff{% for i in range(end=3) %}{{ i }}{% endfor %}",
        b"[[files]]\npath = \"/etc/x\"\ntemplate = \"t.tera\"\xff{% include \"roles/a/files/t.tera\" %}",
        b"\x00{\"version\": 1, \"files\": {\"/etc/a\": 5}}",
        b"\x04{\"time\": 1}\n{\n\x00",
        b"\x06interval = [",
        b"\0\0\0\0\0\0\0\0[rollout]\n[[rollout.waves]]\nname = \"a\"\npercent = 100\n[[rollout.windows]]\ncalendar = \"*-02-30 00:00\"\nlength = \"1h\"\n",
        b"\xff\xff\xff\xff\xff\xff\xff\xff[rollout]\n[[rollout.waves]]\nname = \"a\"\npercent = 100\n[[rollout.windows]]\ncalendar = \"*:*:*\"\nlength = \"100d\"\n",
    ];

    #[test]
    fn every_entry_point_returns_on_odd_inputs() {
        for input in ODD {
            repo_config(input);
            role_file(input);
            state_file(input);
            rollout(input);
            fleetlock_request(input);
            loose_object(input);
            inventory_json(input);
        }
        fleetlock_request(br#"{"client_params": {"id": "a", "group": "b"}}"#);
    }
}
