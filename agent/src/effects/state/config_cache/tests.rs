use super::*;
use crate::desired::load::load_host;
use crate::desired::snapshot::Snapshot;
use crate::desired::spec::TargetPath;
use std::collections::BTreeSet;

fn opts() -> LoadOptions {
    LoadOptions {
        allowed_roots: vec![
            TargetPath::parse("/etc").unwrap(),
            TargetPath::parse("/srv").unwrap(),
        ],
        reserved: vec![(
            TargetPath::parse("/etc/driftless").unwrap(),
            "the agent's configuration".into(),
        )],
    }
}

fn key() -> Key {
    Key::of("web1", &opts(), "test build")
}

/// A repository that declares one of everything a host configuration can
/// hold, each with its optional fields set.
fn everything() -> Snapshot {
    let mut s = Snapshot::new();
    for (path, text) in [
        (
            "driftless.toml",
            r#"roles = ["base"]
[vars]
int = 7
float = 0.1
# Read back one off in the last digit without serde_json's float_roundtrip.
float_hard = 0.09144338512092887
big = 9007199254740993
neg = -3
text = "a \"quoted\" ünïcode\nline"
yes = true
when = 1979-05-27T07:32:00Z
day = 1979-05-27
list = [1, "two", 3.5, [4]]
nested = { a = { b = { c = "deep" } } }
"#,
        ),
        (
            "hosts/web1.toml",
            r#"roles = ["web"]
labels = { tier = "front", zone = "a" }
[vars]
int = 8
nested = { a = { x = 1 } }
"#,
        ),
        (
            "roles/base/role.toml",
            r#"description = "base"
dir_mode = "0750"
[vars]
base_only = "b"

[[files]]
path = "/etc/base.conf"
source = "base.conf"

[[groups]]
name = "app"
gid = 950

[[users]]
name = "app"
uid = 950
group = "app"
members_of = ["adm"]
home = "/srv/app"
shell = "/bin/sh"
description = "The app"

[[users]]
name = "worker"
"#,
        ),
        ("roles/base/files/base.conf", "base\n"),
        (
            "roles/web/role.toml",
            r#"[[files]]
path = "/etc/web/site.conf"
template = "site.conf.tera"
mode = "0640"
owner = "app"
group = "950"
dir_mode = "0700"
reboot = true
on_change = { reload = ["nginx.service"], restart = ["a.service"], try-restart = ["b.service"], reload-or-restart = ["c.service"] }

[[files]]
path = "/etc/web/secret.env"
secret = "secrets/web.env"
format = "json"

[[files]]
path = "/etc/web/raw.bin"
secret = "secrets/raw.bin"

[[files]]
path = "/srv/plain"
source = "plain"
mode = "0755"

[[links]]
path = "/etc/web/current"
target = "../srv/releases/1"

[[absent]]
path = "/etc/web/old.conf"

[[dirs]]
path = "/srv/www"
mode = "0750"
owner = "app"
group = "app"
purge = true
keep = ["lost+found", ".well-known"]

[[units]]
name = "nginx.service"
enabled = true
started = true

[[units]]
name = "old.service"
enabled = false

[[checks]]
name = "front page"
http = { url = "https://localhost:8443/health", status = 204, body_contains = "ok", follow_redirects = true, ca_file = "/etc/web/ca.pem" }
retries = 9
interval = "1s 500ms"
timeout = "3s"
delay = "250ms"

[[checks]]
tcp = { address = "127.0.0.1:80" }

[[checks]]
command = { argv = ["/usr/bin/test", "-e", "/srv/www"], exit_code = 1 }
interval = "1h 2m 3s 4ms 5us 6ns"

[[checks]]
unit = { name = "nginx.service", settle = "2s" }

[[hooks]]
when = "pre"
argv = ["/bin/true"]

[[hooks]]
when = "post"
argv = ["/usr/local/bin/migrate", "a; b", ""]
user = "app"
timeout = "90s"
env = { TOKEN = "hook-env-value", LANG = "C" }
run = "always"

[[packages]]
name = "nginx"
version = "1.22.1-9"
reboot = true

[[packages]]
name = "telnet"
state = "absent"
"#,
        ),
        ("roles/web/files/site.conf.tera", "{{ int }}\n"),
        ("roles/web/files/plain", "plain\n"),
        ("secrets/web.env", "not decrypted when loading\n"),
        ("secrets/raw.bin", "not decrypted when loading\n"),
    ] {
        s.insert_file(path, text.as_bytes().to_vec(), false);
    }
    s
}

fn round_trip(config: &HostConfig) -> HostConfig {
    let (bytes, name) = encode(&key(), &mut config.clone()).unwrap();
    decode(bytes.as_slice(), &key(), &name, &opts(), None).unwrap()
}

#[test]
fn every_part_of_a_configuration_comes_back_as_it_was_loaded() {
    let config = load_host(&everything(), "web1", &opts()).unwrap();
    // The fixture really holds one of each (a field left empty would
    // prove nothing about its round trip).
    assert_eq!(config.files.len(), 6, "{:?}", config.files);
    assert!(config.files.iter().any(|f| matches!(
        f.content,
        crate::desired::load::ContentRef::Generated { .. }
    )));
    assert!(!config.links.is_empty() && !config.absent.is_empty() && !config.dirs.is_empty());
    assert_eq!((config.checks.len(), config.hooks.len()), (4, 2));
    assert_eq!(config.accounts.users.len(), 2);
    assert_eq!((config.packages.len(), config.units.len()), (2, 2));
    assert!(!config.labels.is_empty());
    // `Debug` shows every field, values included: the oracle.
    assert_eq!(
        format!("{:#?}", round_trip(&config)),
        format!("{config:#?}")
    );
}

#[test]
fn the_bundled_examples_come_back_as_they_were_loaded() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut seen = 0;
    for name in ["quickstart", "container-proxy"] {
        let snap = crate::effects::fetch::read_dir(&examples.join(name), "", u64::MAX).unwrap();
        let hosts = crate::desired::load::host_names(&snap);
        let hosts = if hosts.is_empty() {
            vec!["any".to_string()]
        } else {
            hosts
        };
        for host in hosts {
            let opts = LoadOptions {
                allowed_roots: ["/etc", "/srv", "/opt", "/usr/local", "/var"]
                    .iter()
                    .map(|r| TargetPath::parse(r).unwrap())
                    .collect(),
                reserved: Vec::new(),
            };
            let config =
                load_host(&snap, &host, &opts).unwrap_or_else(|e| panic!("{name} {host}: {e}"));
            let (bytes, cache) = encode(&key(), &mut config.clone()).unwrap();
            let back = decode(bytes.as_slice(), &key(), &cache, &opts, None).unwrap();
            assert_eq!(
                format!("{back:#?}"),
                format!("{config:#?}"),
                "{name} {host}"
            );
            seen += 1;
        }
    }
    assert!(seen >= 2, "only {seen} example hosts loaded");
}

#[test]
fn hook_environments_are_kept_whole_in_the_cache_only() {
    let config = load_host(&everything(), "web1", &opts()).unwrap();
    let (bytes, _) = encode(&key(), &mut config.clone()).unwrap();
    let (_, head, _, _) = parts(&bytes);
    assert!(String::from_utf8_lossy(head).contains("hook-env-value"));
    // ...while a plan or status shows only the names, as before.
    let shown = serde_json::to_string(&config.hooks).unwrap();
    assert!(
        !shown.contains("hook-env-value") && shown.contains("TOKEN"),
        "{shown}"
    );
}

#[test]
fn anything_but_the_named_cache_for_this_key_is_a_miss() {
    let config = load_host(&everything(), "web1", &opts()).unwrap();
    let (bytes, name) = encode(&key(), &mut config.clone()).unwrap();
    assert!(decode(bytes.as_slice(), &key(), &name, &opts(), None).is_ok());
    // Another host, other options, another build of the agent.
    for other in [
        Key::of("web2", &opts(), "test build"),
        Key::of(
            "web1",
            &LoadOptions {
                allowed_roots: opts().allowed_roots,
                reserved: Vec::new(),
            },
            "test build",
        ),
        Key::of("web1", &opts(), "another build"),
    ] {
        assert_ne!(other, key());
        let err = decode(bytes.as_slice(), &other, &name, &opts(), None).unwrap_err();
        assert!(format!("{err:#}").contains("another host"), "{err:#}");
    }
    // Not the cache the quick record names.
    let err = decode(bytes.as_slice(), &key(), &"0".repeat(64), &opts(), None).unwrap_err();
    assert!(format!("{err:#}").contains("quick record"), "{err:#}");
    // Torn anywhere, or one byte flipped anywhere: never a config.
    for cut in (0..bytes.len()).step_by(97) {
        assert!(
            decode(&bytes[..cut], &key(), &name, &opts(), None).is_err(),
            "cut at {cut}"
        );
    }
    for at in (0..bytes.len()).step_by(89) {
        let mut flipped = bytes.clone();
        flipped[at] ^= 0x20;
        assert!(
            decode(flipped.as_slice(), &key(), &name, &opts(), None).is_err(),
            "flip at {at}"
        );
    }
}

#[test]
fn a_cached_path_outside_the_allowed_roots_is_a_miss() {
    // Data that checks out (its checksum rewritten to match) but names a
    // path loading would refuse: the agent's own configuration.
    let mut config = load_host(&everything(), "web1", &opts()).unwrap();
    config.files[0].path = TargetPath::parse("/etc/driftless/agent.toml").unwrap();
    let (bytes, name) = encode(&key(), &mut config.clone()).unwrap();
    let err = decode(bytes.as_slice(), &key(), &name, &opts(), None).unwrap_err();
    assert!(format!("{err:#}").contains("/etc/driftless"), "{err:#}");
    config.files[0].path = TargetPath::parse("/usr/bin/x").unwrap();
    let (bytes, name) = encode(&key(), &mut config.clone()).unwrap();
    let err = decode(bytes.as_slice(), &key(), &name, &opts(), None).unwrap_err();
    assert!(format!("{err:#}").contains("allowed roots"), "{err:#}");
}

#[test]
fn a_cache_is_saved_and_loaded_through_the_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::open(dir.path()).unwrap();
    let config = load_host(&everything(), "web1", &opts()).unwrap();
    assert!(
        load(&state, &key(), "x", &opts(), None).is_none(),
        "nothing saved yet"
    );
    let name = save(&state, &key(), &mut config.clone()).unwrap();
    let back = load(&state, &key(), &name, &opts(), None).unwrap();
    assert_eq!(format!("{back:?}"), format!("{config:?}"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join(FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// The parts of an encoded cache: its header, the configuration's line,
/// the index and the lines.
fn parts(bytes: &[u8]) -> (Header, &[u8], &[u8], &[u8]) {
    let rest = &bytes[MAGIC.len() + 1..];
    let split = rest.iter().position(|&b| b == b'\n').unwrap();
    let header: Header = serde_json::from_slice(&rest[..split]).unwrap();
    let rest = &rest[split + 1..];
    let (head, rest) = rest.split_at(header.config as usize);
    let (index, lines) = rest.split_at(header.files * RECORD);
    (header, head, index, lines)
}

/// `bytes` with its lines replaced by `edit(lines)`, its index made again
/// from each new line's own prefix, and the checksum and name made to
/// match: what only a forger, not a torn write, produces. The header's
/// count of files is left as it was.
fn forged(bytes: &[u8], edit: impl Fn(&str) -> String) -> (Vec<u8>, String) {
    let (header, head, _, lines) = parts(bytes);
    let lines = edit(std::str::from_utf8(lines).unwrap());
    let mut index = Vec::new();
    for line in lines.split_inclusive('\n') {
        let mut prefix = line.splitn(3, '\t');
        let path: String = serde_json::from_str(prefix.next().unwrap()).unwrap();
        let source: Option<String> = serde_json::from_str(prefix.next().unwrap()).unwrap();
        Record::of(&path, source.as_deref(), line.as_bytes())
            .unwrap()
            .write(&mut index);
    }
    let name = "forged".to_string();
    let header = Header {
        crc32: checksum(header.config, header.files, &header.paths, head, &index),
        name: name.clone(),
        ..header
    };
    let mut out = format!("{MAGIC}\n{}\n", serde_json::to_string(&header).unwrap()).into_bytes();
    out.extend_from_slice(head);
    out.extend_from_slice(&index);
    out.extend_from_slice(lines.as_bytes());
    (out, name)
}

fn declared(config: &HostConfig) -> String {
    let mut paths: Vec<&TargetPath> = config.files.iter().map(|f| &f.path).collect();
    paths.sort();
    paths_digest(paths)
}

#[test]
fn only_the_selected_declarations_are_read_and_they_are_the_loaded_ones() {
    let config = load_host(&everything(), "web1", &opts()).unwrap();
    let (bytes, name) = encode(&key(), &mut config.clone()).unwrap();
    let paths: BTreeSet<&str> = ["/etc/web/secret.env"].into_iter().collect();
    let sources: BTreeSet<&str> = ["roles/web/files/site.conf.tera"].into_iter().collect();
    let want = Want {
        declared: declared(&config),
        paths: &paths,
        sources: &sources,
    };
    let picked: Vec<&FileDecl> = config
        .files
        .iter()
        .filter(|f| ["/etc/web/secret.env", "/etc/web/site.conf"].contains(&f.path.as_str()))
        .collect();
    assert_eq!(picked.len(), 2);
    assert!(config.files.len() > 4, "{}", config.files.len());
    let back = decode(bytes.as_slice(), &key(), &name, &opts(), Some(&want)).unwrap();
    assert_eq!(format!("{:#?}", back.files), format!("{picked:#?}"));
    // Everything but the files is whole.
    let rest = |c: &HostConfig| {
        let mut c = c.clone();
        c.files.clear();
        format!("{c:#?}")
    };
    assert_eq!(rest(&back), rest(&config));
    // The other lines are not read: damaged (their checksums no longer
    // match), they fail a whole read and not this one.
    let (_, head, index, lines) = parts(&bytes);
    let lines_at = bytes.len() - lines.len();
    let mut damaged = bytes.clone();
    let mut at = lines_at;
    for (f, record) in config.files.iter().zip(index.chunks_exact(RECORD)) {
        let len = Record::read(record).len as usize;
        if !picked.iter().any(|p| p.path == f.path) {
            damaged[at] ^= 0x20;
        }
        at += len;
    }
    assert_eq!(at, bytes.len());
    assert!(!head.is_empty());
    let back = decode(damaged.as_slice(), &key(), &name, &opts(), Some(&want)).unwrap();
    assert_eq!(format!("{:#?}", back.files), format!("{picked:#?}"));
    let err = decode(damaged.as_slice(), &key(), &name, &opts(), None).unwrap_err();
    assert!(format!("{err:#}").contains("checksum"), "{err:#}");
    // A selected line that is damaged is a miss.
    let mut at = lines_at;
    let mut one = bytes.clone();
    for (f, record) in config.files.iter().zip(index.chunks_exact(RECORD)) {
        if f.path.as_str() == "/etc/web/site.conf" {
            one[at + 3] ^= 0x20;
        }
        at += Record::read(record).len as usize;
    }
    let err = decode(one.as_slice(), &key(), &name, &opts(), Some(&want)).unwrap_err();
    assert!(format!("{err:#}").contains("checksum"), "{err:#}");
}

/// More wanted lines than are worth a `pread` each are read in one go:
/// the same declarations either way.
#[test]
fn many_selected_declarations_are_the_same_as_few() {
    let mut config = load_host(&everything(), "web1", &opts()).unwrap();
    let template = config.files[0].clone();
    for i in 0..(LINE_READS * 2) {
        let mut f = template.clone();
        f.path = TargetPath::parse(&format!("/etc/many/{i:04}")).unwrap();
        config.files.push(f);
    }
    let (bytes, name) = encode(&key(), &mut config.clone()).unwrap();
    let every: Vec<String> = config.files.iter().map(|f| f.path.to_string()).collect();
    let none = BTreeSet::new();
    for take in [1, LINE_READS, LINE_READS + 1, every.len()] {
        let paths: BTreeSet<&str> = every.iter().take(take).map(String::as_str).collect();
        let want = Want {
            declared: declared(&config),
            paths: &paths,
            sources: &none,
        };
        let back = decode(bytes.as_slice(), &key(), &name, &opts(), Some(&want)).unwrap();
        let expected: Vec<&FileDecl> = config.files.iter().take(take).collect();
        assert_eq!(
            format!("{:?}", back.files),
            format!("{expected:?}"),
            "{take}"
        );
    }
}

#[test]
fn a_cache_declaring_other_files_than_the_record_holds_is_a_miss() {
    let config = load_host(&everything(), "web1", &opts()).unwrap();
    let (bytes, name) = encode(&key(), &mut config.clone()).unwrap();
    let mut fewer: Vec<&TargetPath> = config.files.iter().skip(1).map(|f| &f.path).collect();
    fewer.sort();
    let none = BTreeSet::new();
    let want = Want {
        declared: paths_digest(fewer),
        paths: &none,
        sources: &none,
    };
    let err = decode(bytes.as_slice(), &key(), &name, &opts(), Some(&want)).unwrap_err();
    assert!(format!("{err:#}").contains("other files"), "{err:#}");
}

#[test]
fn a_line_whose_prefix_is_not_its_declaration_is_a_miss() {
    let config = load_host(&everything(), "web1", &opts()).unwrap();
    let (bytes, _) = encode(&key(), &mut config.clone()).unwrap();
    let paths: BTreeSet<&str> = config.files.iter().map(|f| f.path.as_str()).collect();
    let sources: BTreeSet<&str> = ["roles/web/files/site.conf.tera", "roles/web/files/plain"]
        .into_iter()
        .collect();
    let want = Want {
        declared: declared(&config),
        paths: &paths,
        sources: &sources,
    };
    // Another path, or another source, in front of a declaration.
    for (from, to) in [
        ("\"/etc/web/site.conf\"\t", "\"/etc/web/other.conf\"\t"),
        (
            "\t\"roles/web/files/site.conf.tera\"\t",
            "\t\"roles/web/files/plain\"\t",
        ),
        ("\t\"roles/web/files/site.conf.tera\"\t", "\tnull\t"),
    ] {
        let (bytes, name) = forged(&bytes, |d| {
            assert!(d.contains(from), "{from} not in {d}");
            d.replacen(from, to, 1)
        });
        for want in [Some(&want), None] {
            let err = decode(bytes.as_slice(), &key(), &name, &opts(), want).unwrap_err();
            assert!(format!("{err:#}").contains("prefix"), "{err:#}");
        }
    }
    // A line whose index record is another's: its prefix is checked
    // against the record.
    let (header, head, index, lines) = parts(&bytes);
    let mut swapped = index.to_vec();
    swapped[..4].copy_from_slice(&index[RECORD..RECORD + 4]);
    let header = Header {
        crc32: checksum(header.config, header.files, &header.paths, head, &swapped),
        ..header
    };
    let mut out = format!("{MAGIC}\n{}\n", serde_json::to_string(&header).unwrap()).into_bytes();
    out.extend_from_slice(head);
    out.extend_from_slice(&swapped);
    out.extend_from_slice(lines);
    let err = decode(out.as_slice(), &key(), &header.name, &opts(), None).unwrap_err();
    assert!(format!("{err:#}").contains("index record"), "{err:#}");
    // A file line dropped: torn, whatever the checksum says.
    let (bytes, name) = forged(&bytes, |d| {
        let mut lines: Vec<&str> = d.split_terminator('\n').collect();
        lines.pop();
        lines.iter().map(|l| format!("{l}\n")).collect()
    });
    let err = decode(bytes.as_slice(), &key(), &name, &opts(), None).unwrap_err();
    assert!(format!("{err:#}").contains("checksum"), "{err:#}");
}

/// The bug this guards against: a damaged or sparse `config.cache` of any
/// size was read whole (an allocation of its size, then its checksum).
#[test]
fn a_cache_larger_than_any_configuration_is_a_miss_and_is_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::open(dir.path()).unwrap();
    let config = load_host(&everything(), "web1", &opts()).unwrap();
    let name = save(&state, &key(), &mut config.clone()).unwrap();
    assert!(load(&state, &key(), &name, &opts(), None).is_some());
    // Sparse: no disk used, and no time spent if it is not read.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join(FILE))
        .unwrap();
    f.set_len(MAX_BYTES + 1).unwrap();
    // Refused by its size, unread: `load` asks the file's size before it
    // reads a byte.
    assert!(load(&state, &key(), &name, &opts(), None).is_none());
}

/// The checked-in fuzz seed is a cache of this format that decodes (so
/// the fuzzer starts past the header, the index and the checksums): made
/// again when the format changes.
#[test]
fn the_fuzz_seed_is_a_cache_that_decodes() {
    let seed = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fuzz/corpus/state_file/config_cache"
    ))
    .unwrap();
    assert_eq!(
        seed[0] % 9,
        7,
        "the state_file target's arm for config.cache"
    );
    let (bytes, key, opts) = fuzz_cache(&seed[1..]).unwrap();
    let config = decode(bytes.as_slice(), &key, "n", &opts, None).unwrap();
    assert_eq!(config.files.len(), usize::from(seed[1]));
    assert!(config.files.len() > 1);
}

/// A header (checksum and all) that claims more declarations than the
/// file can hold is a miss, found before anything of that size is read or
/// allocated.
#[test]
fn a_header_claiming_more_files_than_the_file_holds_is_a_miss() {
    let config = load_host(&everything(), "web1", &opts()).unwrap();
    let (bytes, name) = encode(&key(), &mut config.clone()).unwrap();
    let (header, head, index, lines) = parts(&bytes);
    let header_files = header.files;
    for files in [header_files + 1, 1 << 40, usize::MAX / RECORD] {
        let header = Header {
            crc32: checksum(header.config, files, &header.paths, head, index),
            files,
            ..parts(&bytes).0
        };
        let mut out =
            format!("{MAGIC}\n{}\n", serde_json::to_string(&header).unwrap()).into_bytes();
        out.extend_from_slice(head);
        out.extend_from_slice(index);
        out.extend_from_slice(lines);
        let err = format!(
            "{:#}",
            decode(out.as_slice(), &key(), &name, &opts(), None).unwrap_err()
        );
        // One more: its record would be the first line's bytes, which the
        // checksum does not cover. More than the file holds: torn; more
        // than a size can say: a bad header.
        let expected = match files {
            n if n == header_files + 1 => "checksum",
            n if n == 1 << 40 => "torn",
            _ => "bad header",
        };
        assert!(err.contains(expected), "{files}: {err}");
    }
}
