use super::*;
use serde::Serialize;

/// The bug this guards against: a state directory that group or
/// others could write, or that another user owned, was used as it
/// was, so anyone with write access to it could forge the inventory
/// (files removed as "no longer declared") or the backups restored
/// over host files. The directory and its `tx` and `originals` are
/// checked; a private one is opened as before.
#[test]
fn a_state_directory_others_can_write_or_own_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let set = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    StateDir::open(d.path()).unwrap();
    for (dir, mode) in [
        (d.path().to_path_buf(), 0o777),
        (d.path().to_path_buf(), 0o720),
        (d.path().to_path_buf(), 0o1777),
        (d.path().join("tx"), 0o702),
        (d.path().join("originals"), 0o770),
        (d.path().join("mirror.git"), 0o777),
    ] {
        std::fs::create_dir_all(&dir).unwrap();
        set(&dir, mode);
        // `state check` names it too.
        let problems = sharing_problems(d.path());
        assert_eq!(problems.len(), 1, "{mode:o}");
        assert_eq!(problems[0].0, dir);
        let err = format!("{:#}", StateDir::open(d.path()).unwrap_err());
        assert!(
            err.contains(&format!("{} is writable by group or others", dir.display()))
                && err.contains("chmod 700"),
            "{mode:o}: {err}"
        );
        set(&dir, 0o700);
    }
    set(d.path(), 0o755);
    StateDir::open(d.path()).unwrap();
    // Owned by another user: as root, a directory given away and
    // opened; as any other user, its own directory judged for an
    // agent running as someone else.
    use std::os::unix::fs::MetadataExt;
    let owner = if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(d.path(), Some(4321), None).unwrap();
        let err = format!("{:#}", StateDir::open(d.path()).unwrap_err());
        assert!(
            err.contains("is owned by uid 4321, not by the user"),
            "{err}"
        );
        4321
    } else {
        std::fs::metadata(d.path()).unwrap().uid()
    };
    let err = format!("{:#}", refuse_shared_for(d.path(), owner + 1).unwrap_err());
    assert!(
        err.contains(&format!(
            "is owned by uid {owner}, not by the user driftless runs as (uid {})",
            owner + 1
        )),
        "{err}"
    );
    // Root may own it (as systemd or tmpfiles create it) whoever the
    // agent runs as.
    refuse_shared_for(Path::new("/"), 4321).unwrap();
}

#[test]
fn a_file_larger_than_the_cap_is_refused_by_its_size_and_one_at_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    std::fs::write(&p, b"0123456789").unwrap();
    assert_eq!(read_nofollow_up_to(&p, 10).unwrap(), b"0123456789");
    let err = read_nofollow_up_to(&p, 9).unwrap_err();
    assert!(err.to_string().contains("more than 9"), "{err}");
    // Sparse and huge: refused before a byte is read.
    let big = dir.path().join("big");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(1 << 32)
        .unwrap();
    let err = read_nofollow_up_to(&big, 1 << 20).unwrap_err();
    assert!(
        err.to_string().contains(&format!("{} bytes", 1u64 << 32)),
        "{err}"
    );
}

/// Issue 12 §6: `.applied-commit.json.tmp` and friends, left by a run
/// that died mid-write, stayed forever.
#[test]
fn stale_temp_files_are_removed_and_nothing_else() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    std::fs::write(p.join(".inventory.json.tmp-12345"), "x").unwrap();
    std::fs::write(p.join(".applied-commit.json.tmp-7"), "x").unwrap();
    std::fs::write(p.join("inventory.json"), "{}").unwrap();
    std::fs::write(p.join(".keep.tmp-notapid"), "x").unwrap();
    let ours = format!(".x.json.tmp-{}", std::process::id());
    std::fs::write(p.join(&ours), "x").unwrap();
    assert_eq!(remove_stale_temps(p), 2);
    let mut left: Vec<String> = std::fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        vec![
            ".keep.tmp-notapid".to_string(),
            ours,
            "inventory.json".into()
        ]
    );
}

/// Issue 12 §4: a link planted at the temp name was followed, and the
/// state file's content written wherever it pointed.
#[test]
fn a_link_planted_at_the_temp_name_is_not_followed() {
    let d = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("victim");
    std::fs::write(&target, "untouched").unwrap();
    let path = d.path().join("marks.json");
    let tmp = d
        .path()
        .join(format!(".marks.json.tmp-{}", std::process::id()));
    std::os::unix::fs::symlink(&target, &tmp).unwrap();
    write_atomic(&path, b"{}").unwrap();
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}");
}

/// JSON that still parses after a flipped bit was believed: the
/// envelope's checksum refuses it; files written before the envelope
/// still read; a newer format is named.
#[test]
fn state_files_carry_a_checksum_that_catches_what_still_parses() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("x.json");
    let value = serde_json::json!({"commit": "a".repeat(40), "n": 1});
    write_json_atomic(&p, &value).unwrap();
    assert_eq!(
        read_json::<serde_json::Value>(&p).unwrap(),
        Some(value.clone())
    );
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, text.replacen("aaaa", "aaab", 1)).unwrap();
    let err = format!("{:#}", read_json::<serde_json::Value>(&p).unwrap_err());
    assert!(
        err.contains("x.json is corrupt") && err.contains("checksum"),
        "{err}"
    );
    std::fs::write(&p, serde_json::to_vec(&value).unwrap()).unwrap();
    assert_eq!(read_json::<serde_json::Value>(&p).unwrap(), Some(value));
    std::fs::write(&p, r#"{"driftless_state": 5, "sha256": "", "data": {}}"#).unwrap();
    let err = read_json::<serde_json::Value>(&p).unwrap_err();
    assert!(is_newer_format(&err), "{err:#}");
    let err = format!("{err:#}");
    assert!(
            err.contains("x.json: written by a newer driftless (state format 5; this agent knows up to format 4)")
                && err.contains("upgrade the agent")
                && !err.contains("corrupt"),
            "{err}"
        );
    std::fs::write(&p, r#"{"driftless_state": 0, "sha256": "", "data": {}}"#).unwrap();
    let err = read_json::<serde_json::Value>(&p).unwrap_err();
    assert!(!is_newer_format(&err), "{err:#}");
    assert!(
        format!("{err:#}").contains("state format 0 is not supported"),
        "{err:#}"
    );
}

/// Reading the 3 MB inventory of 10,000 files went through a
/// `serde_json::Value` of the whole file (issue 18); the fast path
/// must read exactly what that reads, and leave everything else to it.
#[test]
fn the_fast_reader_reads_what_the_reference_reads_or_steps_aside() {
    let tricky = serde_json::json!({
        "z": "a \"quoted\" \\ back\\slash\n with  spaces\t and é and \u{1}",
        "a": [1, -2, 3.5, true, null, {"y": " ", "x": "}{,:"}],
        "m": {"/etc/a b": {"sha256": "00", "size": 12}},
    });
    for format in [STATE_FORMAT, STATE_FORMAT_MAX] {
        let pretty = encode_state(&tricky, format).unwrap();
        assert_eq!(
            decode_state_fast::<serde_json::Value>(&pretty).as_ref(),
            Some(&tricky)
        );
        assert!(decoders_agree(&pretty));
        // The same envelope written compactly reads the same.
        let compact =
            serde_json::to_vec(&serde_json::from_slice::<serde_json::Value>(&pretty).unwrap())
                .unwrap();
        assert_eq!(
            decode_state_fast::<serde_json::Value>(&compact).as_ref(),
            Some(&tricky)
        );
    }
    // The compact envelope of large files, read from its fixed tail,
    // even when a string inside looks like that tail.
    let sneaky = serde_json::json!({
        "k": "\",\"driftless_state\":1,\"sha256\":\"",
        "pad": "x".repeat(PRETTY_UP_TO),
    });
    let compact = encode_state(&sneaky, STATE_FORMAT).unwrap();
    assert!(compact_parts(&compact).is_some());
    assert_eq!(
        decode_state_fast::<serde_json::Value>(&compact).as_ref(),
        Some(&sneaky)
    );
    assert!(decoders_agree(&compact));
    // (Without its final line break it is still whole.)
    for cut in [2, 10, 70, 90, compact.len() / 2] {
        let torn = &compact[..compact.len() - cut];
        assert!(
            compact_parts(torn).is_none() || decode_state_fast::<serde_json::Value>(torn).is_none()
        );
        assert!(
            decode_state::<serde_json::Value>(torn).is_err(),
            "cut {cut}"
        );
    }
    // Keys in another order (a hand edit): the checksum does not match
    // the text, so the reference decides (and accepts it).
    let sum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(br#"{"a":1,"b":2}"#));
    let reordered = format!(r#"{{"driftless_state":1,"sha256":"{sum}","data":{{"b":2,"a":1}}}}"#);
    assert!(decode_state_fast::<serde_json::Value>(reordered.as_bytes()).is_none());
    assert_eq!(
        decode_state::<serde_json::Value>(reordered.as_bytes()).unwrap(),
        serde_json::json!({"a": 1, "b": 2})
    );
    // A flipped bit, a newer format, no envelope: the reference's errors.
    let mut flipped = encode_state(&tricky, STATE_FORMAT).unwrap();
    let at = flipped.windows(4).position(|w| w == b"back").unwrap();
    flipped[at] = b'B';
    assert!(decode_state_fast::<serde_json::Value>(&flipped).is_none());
    assert!(format!(
        "{:#}",
        decode_state::<serde_json::Value>(&flipped).unwrap_err()
    )
    .contains("checksum"));
    let newer = format!(
        r#"{{"driftless_state":{},"sha256":"{sum}","data":{{"a":1,"b":2}}}}"#,
        STATE_FORMAT_MAX + 1
    );
    assert!(decode_state_fast::<serde_json::Value>(newer.as_bytes()).is_none());
    assert!(is_newer_format(
        &decode_state::<serde_json::Value>(newer.as_bytes()).unwrap_err()
    ));
    assert!(decode_state_fast::<serde_json::Value>(br#"{"a":1}"#).is_none());
    assert!(decoders_agree(reordered.as_bytes()) && decoders_agree(&flipped));
}

/// What `encode_state` wrote before it skipped the `serde_json::Value`
/// for canonical types.
fn encode_via_value<T: Serialize>(value: &T, format: u64) -> Vec<u8> {
    use sha2::Digest;
    let data = serde_json::to_value(value).unwrap();
    let sum = hex::encode(sha2::Sha256::digest(serde_json::to_vec(&data).unwrap()));
    serde_json::to_vec_pretty(&serde_json::json!({
        "driftless_state": format,
        "sha256": sum,
        "data": data,
    }))
    .unwrap()
}

/// Issue 18: an inventory of 10,000 files was turned into a
/// `serde_json::Value` to be written. Its types declare their fields
/// in order, so it is canonical as it serialises, and the bytes are
/// those the tree gave: for an inventory using every field, and for
/// a type that is not canonical (which still goes through the tree).
#[test]
fn state_is_written_as_before_without_the_tree_when_canonical() {
    let full: Inventory = serde_json::from_value(serde_json::json!({
            "version": 1, "txid": "t1", "commit": "c1", "applied_at": 5,
            "files": {
                "/etc/a": {"role": "r", "sha256": "00", "size": 1, "mode": 420, "uid": 0, "gid": 0,
                    "on_change": [{"unit": "a.service", "action": "reload-or-restart"}],
                    "sensitive": true, "reboot": true,
                    "original": {"stored": "o1", "mode": 384, "uid": 1, "gid": 2}},
                "/etc/b \"q\"": {"role": "r", "sha256": "01", "size": 2, "mode": 420, "uid": 0, "gid": 0}
            },
            "dirs": ["/etc/d"],
            "reboot": {"boot_id": "b", "reasons": [{"path": "/etc/a", "commit": "c1", "txid": "t1", "package": "driftless"}]},
            "links": {"/etc/l": {"role": "r", "target": "/x", "created": true}},
            "directories": {"/srv/d": {"role": "r", "mode": 493, "uid": 0, "gid": 0, "created": false}}
        }))
        .unwrap();
    let (direct, canonical) = canonical::to_vec_checked(&full).unwrap();
    assert!(
        canonical,
        "a type in the inventory declares its fields out of order: {}",
        String::from_utf8_lossy(&direct)
    );
    for format in [STATE_FORMAT, STATE_FORMAT_MAX] {
        assert_eq!(
            encode_state(&full, format).unwrap(),
            encode_via_value(&full, format)
        );
    }
    // Past `PRETTY_UP_TO`, the same envelope, data and checksum on one
    // line; both readers take it.
    let mut big = full.clone();
    let entry = big.files.values().next().unwrap().clone();
    for i in 0..1_000 {
        let path = crate::desired::spec::TargetPath::parse(&format!("/srv/f{i:04}")).unwrap();
        big.files.insert(path, entry.clone());
    }
    assert!(serde_json::to_vec(&big).unwrap().len() > PRETTY_UP_TO);
    let one_line = encode_state(&big, STATE_FORMAT).unwrap();
    let pretty = encode_via_value(&big, STATE_FORMAT);
    assert_eq!(one_line.iter().filter(|&&b| b == b'\n').count(), 1);
    assert!(one_line.starts_with(br#"{"data":{"#) && one_line.ends_with(b"}\n"));
    let as_value = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();
    assert_eq!(as_value(&one_line), as_value(&pretty));
    assert!(decode_state_fast::<Inventory>(&one_line).is_some());
    assert!(decoders_agree(&one_line));
    let read: Inventory = decode_state(&one_line).unwrap();
    assert_eq!(
        serde_json::to_vec(&read).unwrap(),
        serde_json::to_vec(&big).unwrap()
    );
    let slow: Inventory = decode_state_slow(&one_line).unwrap();
    assert_eq!(
        serde_json::to_vec(&slow).unwrap(),
        serde_json::to_vec(&big).unwrap()
    );
    // A flipped bit in the one line is refused by both.
    let mut flipped = one_line.clone();
    let at = flipped.windows(6).position(|w| w == b"/srv/f").unwrap() + 2;
    flipped[at] = b'x';
    assert!(decode_state_fast::<Inventory>(&flipped).is_none());
    assert!(decode_state::<Inventory>(&flipped).is_err());
    #[derive(Serialize)]
    struct OutOfOrder {
        b: u32,
        a: Vec<&'static str>,
    }
    let odd = OutOfOrder { b: 1, a: vec!["x"] };
    assert!(!canonical::to_vec_checked(&odd).unwrap().1);
    assert_eq!(
        encode_state(&odd, STATE_FORMAT).unwrap(),
        encode_via_value(&odd, STATE_FORMAT)
    );
}

/// Format 1 is what every agent so far wrote: the same bytes.
#[test]
fn format_1_is_the_envelope_older_agents_wrote_and_others_are_refused() {
    let v = serde_json::json!({"b": [1, 2], "a": "x"});
    let bytes = encode_state(&v, STATE_FORMAT).unwrap();
    let sum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        br#"{"a":"x","b":[1,2]}"#,
    ));
    // Exactly what the encoder wrote before it took a format number.
    let want = format!(
            "{{\n  \"data\": {{\n    \"a\": \"x\",\n    \"b\": [\n      1,\n      2\n    ]\n  }},\n  \"driftless_state\": 1,\n  \"sha256\": \"{sum}\"\n}}"
        );
    assert_eq!(String::from_utf8(bytes).unwrap(), want);
    assert!(encode_state(&v, 0).is_err());
    assert!(encode_state(&v, STATE_FORMAT_MAX + 1).is_err());
}

/// A large inventory's checksum is taken on another thread while its
/// data is read: what was read counts only once the checksum matched. A
/// flipped digit that still parses is refused as corrupt, large or small.
#[test]
fn a_large_inventory_read_beside_its_checksum_is_refused_when_damaged() {
    use crate::plan::inventory::ManagedEntry;
    for files in [3, 2_000] {
        let mut inv = Inventory {
            version: INVENTORY_VERSION,
            ..Default::default()
        };
        for i in 0..files {
            inv.files.insert(
                crate::desired::spec::TargetPath::parse(&format!("/etc/f{i:05}")).unwrap(),
                ManagedEntry::example(i),
            );
        }
        let bytes = encode_inventory(&inv).unwrap();
        let large = bytes.len() >= 256 << 10;
        assert_eq!(large, files > 3, "{} bytes", bytes.len());
        let path = Path::new("/state/inventory.json");
        let log = Path::new("/state/inventory.delta");
        let (back, _) =
            decode_inventory(path, &bytes, log, None, inventory_log::Reading::Live).unwrap();
        assert_eq!(back.files, inv.files);
        // The last entry's digest, one digit changed: it still parses.
        let text = String::from_utf8(bytes).unwrap();
        let sum = format!("{:064x}", files - 1);
        assert_eq!(text.matches(&sum).count(), 1, "{sum}");
        let damaged = text.replace(&sum, &format!("{:064x}", files + 0x10_0000));
        let err = decode_inventory(
            path,
            damaged.as_bytes(),
            log,
            None,
            inventory_log::Reading::Live,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("is corrupt"), "{err:#}");
    }
}
