use super::delta::*;
use super::format::*;
use super::*;
use crate::plan::quick::QUICK_VERSION;
use std::collections::BTreeMap;

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
        tree: None,
    }
}

/// Saves `record` as a sync does: after loading what is there.
fn put(state: &StateDir, record: &QuickRecord) {
    let _ = load(state);
    save_only(state, record);
}

/// Saves `record` on whatever this process last loaded.
fn save_only(state: &StateDir, record: &QuickRecord) {
    let files: Vec<(&TargetPath, Stamp, bool)> =
        record.files.iter().map(|(p, s, c)| (p, *s, *c)).collect();
    let header = QuickRecord {
        files: Vec::new(),
        ..record.clone()
    };
    save(state, |_| Some((header, files))).unwrap();
}

fn path(n: usize) -> TargetPath {
    TargetPath::parse(&format!("/etc/f{n:05}")).unwrap()
}

/// `quick.json` was read with `fs::read`: through a link planted in
/// the state directory, and whole (a sparse file of a terabyte, or a
/// link to `/dev/zero`, was read until the agent was killed). Both
/// files of the record are read that way.
#[test]
fn a_planted_link_or_a_huge_sparse_record_is_ignored_not_read() {
    let d = tempfile::tempdir().unwrap();
    let state = StateDir::open(d.path()).unwrap();
    let record = QuickRecord {
        files: vec![(path(1), stamp(1), true)],
        ..empty_record()
    };
    put(&state, &record);
    for name in [FILE, DELTA] {
        let elsewhere = d.path().join("elsewhere");
        std::fs::rename(d.path().join(name), &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, d.path().join(name)).unwrap();
        assert!(load(&state).is_none(), "{name} read through a planted link");
        std::fs::remove_file(d.path().join(name)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", d.path().join(name)).unwrap();
        assert!(load(&state).is_none(), "{name}");
        std::fs::remove_file(d.path().join(name)).unwrap();
        std::fs::File::create(d.path().join(name))
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        assert!(load(&state).is_none(), "{name}");
        // The same bytes in place are read.
        std::fs::remove_file(d.path().join(name)).unwrap();
        std::fs::copy(&elsewhere, d.path().join(name)).unwrap();
        assert_eq!(load(&state).as_deref(), Some(&record), "{name}");
    }
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
    let header = format!("{MAGIC}\n{{\"id\":\"b\"}}\n");
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
        match decode_base(text.as_bytes()) {
            Ok((_, files)) => {
                let (stamp, contained, path) = want.unwrap_or_else(|e| panic!("{line:?}: {e:#}"));
                assert_eq!(files, vec![(path, stamp, contained)], "{line:?}");
                read += 1;
            }
            Err(_) => assert!(want.is_err(), "{line:?} was refused"),
        }
    }
    assert!(read > 1000, "{read}");
}

#[test]
fn a_record_survives_encode_and_decode_and_garbage_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let state = StateDir::open(d.path()).unwrap();
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
        tree: Some(crate::plan::quick::Tree {
            entries: 7,
            links: true,
        }),
        ..empty_record()
    };
    put(&state, &record);
    assert_eq!(load(&state).as_deref(), Some(&record));
    let base = std::fs::read(d.path().join(FILE)).unwrap();
    let delta = std::fs::read(d.path().join(DELTA)).unwrap();
    assert!(decode_base(&base).is_ok());
    assert!(decode_delta(&delta).is_ok());
    for bad in [
        &b""[..],
        b"driftless-quick 1\n",
        b"driftless-quick 2\n{}\n",
        &base[..base.len() - 9],
        &base[..base.len() - 6],
    ] {
        assert!(
            decode_base(bad).is_err(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let line = "= 1 2 33188 0 0 5 6 7 1";
    for bad in [
        &b""[..],
        b"driftless-quick-delta 1\n{}\n",
        &delta[..delta.len() - 6],
        // Out of order, twice the same path, an unknown kind.
        format!("{DELTA_MAGIC}\n{{}}\n{line} /etc/b\n{line} /etc/a\nend 2\n").as_bytes(),
        format!("{DELTA_MAGIC}\n{{}}\n{line} /etc/a\n- /etc/a\nend 2\n").as_bytes(),
        format!("{DELTA_MAGIC}\n{{}}\n* /etc/a\nend 1\n").as_bytes(),
    ] {
        assert!(
            decode_delta(bad).is_err(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
}

/// The record is the base with the delta applied: whatever sequence of
/// syncs wrote it (files added, removed, re-added, restamped), what
/// loads is exactly the record each sync saved, and the base is
/// rewritten only when the changes outgrow the delta.
#[test]
fn a_record_saved_as_a_delta_loads_as_the_record_saved() {
    let d = tempfile::tempdir().unwrap();
    let state = StateDir::open(d.path()).unwrap();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut pick = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    // 1,000 files of 1,200 possible paths.
    let mut files: BTreeMap<usize, (Stamp, bool)> = (0..1_000)
        .map(|n| (n, (stamp(n as u64), n % 3 == 0)))
        .collect();
    let record = |files: &BTreeMap<usize, (Stamp, bool)>, round: u64| QuickRecord {
        files: files.iter().map(|(n, (s, c))| (path(*n), *s, *c)).collect(),
        commit: format!("c{round}"),
        taken_at_ns: i128::from(round),
        ..empty_record()
    };
    let base_ino = || {
        std::fs::metadata(d.path().join(FILE))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .ok()
    };
    put(&state, &record(&files, 0));
    let (mut kept, mut rebased) = (0, 0);
    for round in 1..300 {
        let before = base_ino();
        // A few changes, now and then many.
        let changes = if pick(40) == 0 { 500 } else { 1 + pick(4) };
        for _ in 0..changes {
            // Half of them to a few paths at the base's edge, so
            // that paths come and go within one base's life.
            let n = if pick(2) == 0 {
                995 + pick(10)
            } else {
                pick(1_200)
            } as usize;
            match pick(3) {
                0 => drop(files.remove(&n)),
                1 => drop(files.insert(n, (stamp(round * 10_000 + n as u64), pick(2) == 0))),
                _ => {
                    if let Some(e) = files.get_mut(&n) {
                        e.1 = !e.1;
                    }
                }
            }
        }
        let want = record(&files, round);
        // Sometimes the transaction cleared the record first.
        if pick(2) == 0 {
            clear_unsynced(&state).unwrap();
        }
        match pick(4) {
            // A sync: it loaded the record at its start.
            0 | 1 => put(&state, &want),
            // Saved on what this process loaded some syncs ago.
            2 => save_only(&state, &want),
            // Another process (the cron run beside the daemon) wrote both
            // files: what this one loaded is not their base.
            _ => {
                let id = format!("other{round}");
                let lines = want.files.iter().map(|(p, s, c)| (p, *s, *c));
                let base = encode_base(&id, lines).unwrap();
                let header = DeltaHeader {
                    base: id,
                    record: QuickRecord {
                        files: Vec::new(),
                        ..want.clone()
                    },
                };
                std::fs::write(d.path().join(FILE), base).unwrap();
                std::fs::write(d.path().join(DELTA), encode_delta(&header, &[]).unwrap()).unwrap();
            }
        }
        assert_eq!(load(&state).as_deref(), Some(&want), "round {round}");
        // Saved again at once (the next sync changed nothing): the same.
        if pick(8) == 0 {
            save_only(&state, &want);
            assert_eq!(load(&state).as_deref(), Some(&want), "round {round}, again");
        }
        if base_ino() == before {
            kept += 1;
        } else {
            rebased += 1;
        }
    }
    assert!(kept > 150 && rebased > 2, "kept {kept}, rebased {rebased}");
}

/// Only the delta makes a record: cleared (a transaction started), the
/// base alone is none; a delta of another base (a crash between
/// writing a new base and its delta) is none either.
#[test]
fn a_base_without_its_own_delta_is_no_record() {
    let d = tempfile::tempdir().unwrap();
    let state = StateDir::open(d.path()).unwrap();
    let one = QuickRecord {
        files: vec![(path(1), stamp(1), true)],
        ..empty_record()
    };
    put(&state, &one);
    assert!(load(&state).is_some());
    clear(&state).unwrap();
    assert!(d.path().join(FILE).exists(), "the base is kept");
    assert!(load(&state).is_none(), "a cleared record still loads");
    put(&state, &one);
    let old_delta = std::fs::read(d.path().join(DELTA)).unwrap();
    // A new base (none left to build on), then the old delta.
    std::fs::remove_file(d.path().join(FILE)).unwrap();
    put(&state, &one);
    assert!(load(&state).is_some());
    std::fs::write(d.path().join(DELTA), &old_delta).unwrap();
    assert!(load(&state).is_none(), "a delta of another base loads");
}

/// A delta that does not fit its base (damage, or a hand edit) is
/// refused as a whole, not applied as far as it goes.
#[test]
fn changes_that_do_not_fit_the_base_are_refused() {
    let base = vec![(path(1), stamp(1), true), (path(3), stamp(3), true)];
    let line = |n: usize| (path(n), stamp(9), false);
    for changes in [
        vec![Change::Changed(line(2))],
        vec![Change::Added(line(1))],
        vec![Change::Removed(path(2))],
        vec![Change::Added(line(0)), Change::Changed(line(2))],
    ] {
        assert!(apply(base.clone(), &changes).is_err(), "{changes:?}");
    }
    let got = apply(
        base.clone(),
        &[Change::Added(line(2)), Change::Removed(path(3))],
    )
    .unwrap();
    assert_eq!(got, vec![base[0].clone(), line(2)]);
}

/// The fuzz target's seeds (`fuzz/corpus/state_file/quick*`, a kind byte
/// then the file) are valid files, so that fuzzing starts past the magic
/// and the header.
#[test]
fn the_fuzz_seeds_decode() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/state_file");
    let base = std::fs::read(dir.join("quick")).unwrap();
    let (_, files) = decode_base(&base[1..]).unwrap();
    assert!(files.len() > 1);
    let delta = std::fs::read(dir.join("quick_delta")).unwrap();
    let (_, changes) = decode_delta(&delta[1..]).unwrap();
    assert_eq!(changes.len(), 2);
}

/// A large base is decoded in parts on several threads: the files come
/// back in order, exactly as one thread decodes them, and a bad line
/// anywhere (in the first part, the last, or at a part's edge) is the
/// error one thread reports, the first bad line's.
#[test]
fn lines_decoded_in_parts_are_the_lines_decoded_in_one() {
    let text: Vec<String> = (0..9_001u64)
        .map(|i| {
            let mut out = Vec::new();
            let path = TargetPath::parse(&format!("/etc/d{}/f{i:05}", i % 7)).unwrap();
            encode_line(&mut out, &path, &stamp(i), i % 3 == 0).unwrap();
            String::from_utf8(out).unwrap().trim_end().to_string()
        })
        .collect();
    let lines: Vec<&str> = text.iter().map(String::as_str).collect();
    let serial = decode_lines_on(&lines, 1).unwrap();
    assert_eq!(serial.len(), lines.len());
    for threads in [2, 3, 8] {
        assert_eq!(
            decode_lines_on(&lines, threads).unwrap(),
            serial,
            "{threads}"
        );
    }
    for bad_at in [0, 3_000, 3_001, 4_500, 8_999, 9_000] {
        for second in [None, Some(8_000)] {
            let mut damaged = lines.clone();
            damaged[bad_at] = "1 2 three";
            if let Some(at) = second.filter(|&at| at > bad_at) {
                damaged[at] = "x";
            }
            let want = format!("{:#}", decode_lines_on(&damaged, 1).unwrap_err());
            for threads in [2, 3, 8] {
                let got = format!("{:#}", decode_lines_on(&damaged, threads).unwrap_err());
                assert_eq!(got, want, "bad line {bad_at}, {threads} threads");
            }
        }
    }
}
