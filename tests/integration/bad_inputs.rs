//! Issue 12, "Done means": a catalogue of bad inputs (repository,
//! agent.toml, state files, stick contents, signatures). Each one gives a
//! clear error line naming what is wrong, exits with its documented code
//! (`driftless --help`: 1 failed, 3 repository invalid, 4 refused, 5
//! halted, 78 configuration), and leaves the managed root byte-identical
//! (content, mode and every path), from a host that had a good commit
//! applied.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use crate::support::*;
use crate::trust::{app_repo, bundles, create_bundle, import, signed_commit, Signer};

/// Every path under `dir` with its kind, mode and content.
fn snapshot(dir: &Path) -> Vec<(String, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            }
            let content = if meta.is_file() {
                std::fs::read(e.path()).unwrap()
            } else {
                Vec::new()
            };
            let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
            out.push((rel, meta.mode(), content));
        }
    }
    out.sort();
    out
}

/// The `error:` line of a run (the last one, if several lines start so).
fn error_line(run: &Run) -> String {
    run.stderr
        .lines()
        .rfind(|l| l.starts_with("error:"))
        .unwrap_or_default()
        .to_string()
}

const ROLE: &str = r#"[[files]]
path = "/etc/app.conf"
template = "app.conf.tera"

[[files]]
path = "/etc/static"
source = "static"
"#;

/// The good repository every repository case starts from.
fn good_repo() -> Repo {
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"app\"]\n[vars]\nport = 8080\n");
    r.write("hosts/default.toml", "");
    r.write("roles/app/role.toml", ROLE);
    r.write("roles/app/files/app.conf.tera", "port = {{ vars.port }}\n");
    r.write("roles/app/files/static", "static\n");
    r.commit("good");
    r
}

/// A repository case: `edit` breaks the good repository, then a sync runs.
struct RepoCase {
    name: &'static str,
    edit: fn(&Repo),
    code: i32,
    want: &'static str,
}

fn append_role(r: &Repo, extra: &str) {
    r.write("roles/app/role.toml", &format!("{ROLE}\n{extra}"));
}

fn repo_cases() -> Vec<RepoCase> {
    vec![
        RepoCase {
            name: "unknown key in driftless.toml",
            edit: |r| {
                r.write("driftless.toml", "roles = [\"app\"]\nrole = [\"x\"]\n");
            },
            code: 3,
            want: "driftless.toml",
        },
        RepoCase {
            name: "TOML syntax error in driftless.toml",
            edit: |r| {
                r.write("driftless.toml", "roles = [\"app\"\n");
            },
            code: 3,
            want: "driftless.toml",
        },
        RepoCase {
            name: "misspelt key in a role",
            edit: |r| {
                r.write(
                    "roles/app/role.toml",
                    &ROLE.replace("template =", "tempalte ="),
                );
            },
            code: 3,
            want: "tempalte",
        },
        RepoCase {
            name: "role that does not exist",
            edit: |r| {
                r.write("driftless.toml", "roles = [\"app\", \"nope\"]\n");
            },
            code: 3,
            want: "nope",
        },
        RepoCase {
            name: "role name escaping roles/",
            edit: |r| {
                r.write("driftless.toml", "roles = [\"../app\"]\n");
            },
            code: 3,
            want: "../app",
        },
        RepoCase {
            name: "relative target path",
            edit: |r| append_role(r, "[[files]]\npath = \"etc/rel\"\nsource = \"static\"\n"),
            code: 3,
            want: "roles/app/role.toml:9 files[2]: ",
        },
        RepoCase {
            name: "target path with ..",
            edit: |r| {
                append_role(
                    r,
                    "[[files]]\npath = \"/etc/../root/x\"\nsource = \"static\"\n",
                )
            },
            code: 3,
            want: "/etc/../root/x",
        },
        RepoCase {
            name: "target outside the allowed roots",
            edit: |r| append_role(r, "[[files]]\npath = \"/boot/x\"\nsource = \"static\"\n"),
            code: 3,
            want: "roles/app/role.toml:9 files[2]: /boot/x is outside the allowed roots",
        },
        RepoCase {
            name: "two entries claim one path",
            edit: |r| {
                append_role(
                    r,
                    "[[files]]\npath = \"/etc/static\"\nsource = \"static\"\n",
                )
            },
            code: 3,
            want: "roles/app/role.toml:9 files[2]: /etc/static is already managed by roles/app/role.toml:5 files[1]",
        },
        RepoCase {
            name: "template file missing",
            edit: |r| {
                r.remove("roles/app/files/app.conf.tera");
            },
            code: 3,
            want: "roles/app/role.toml:1 files[0]: key `template`: roles/app/files/app.conf.tera",
        },
        RepoCase {
            name: "template syntax error",
            edit: |r| {
                r.write("roles/app/files/app.conf.tera", "port = {{ vars.port \n");
            },
            code: 3,
            want: "app.conf.tera",
        },
        RepoCase {
            name: "undefined variable",
            edit: |r| {
                r.write("roles/app/files/app.conf.tera", "x = {{ vars.nope }}\n");
            },
            code: 3,
            want: "vars.nope",
        },
        RepoCase {
            name: "include cycle",
            edit: |r| {
                r.write("templates/a.tera", "{% include \"templates/b.tera\" %}");
                r.write("templates/b.tera", "{% include \"templates/a.tera\" %}");
                r.write(
                    "roles/app/files/app.conf.tera",
                    "{% include \"templates/a.tera\" %}",
                );
            },
            code: 3,
            want: "cycle",
        },
        RepoCase {
            name: "mode that is not octal",
            edit: |r| {
                r.write(
                    "roles/app/role.toml",
                    &ROLE.replace(
                        "source = \"static\"",
                        "source = \"static\"\nmode = \"0999\"",
                    ),
                );
            },
            code: 3,
            want: "roles/app/role.toml:5 files[1]: key `mode`",
        },
        RepoCase {
            name: "setuid mode without opting in",
            edit: |r| {
                r.write(
                    "roles/app/role.toml",
                    &ROLE.replace(
                        "source = \"static\"",
                        "source = \"static\"\nmode = \"4755\"",
                    ),
                );
            },
            code: 3,
            want: "roles/app/role.toml:5 files[1]: /etc/static: key `mode`: 4755 is setuid",
        },
        RepoCase {
            name: "owner that is not a name",
            edit: |r| {
                r.write(
                    "roles/app/role.toml",
                    &ROLE.replace(
                        "source = \"static\"",
                        "source = \"static\"\nowner = \"a b\"",
                    ),
                );
            },
            code: 3,
            want: "roles/app/role.toml:5 files[1]: key `owner`",
        },
        RepoCase {
            name: "dir_mode without owner rwx",
            edit: |r| {
                r.write(
                    "roles/app/role.toml",
                    &ROLE.replace(
                        "source = \"static\"",
                        "source = \"static\"\ndir_mode = \"0644\"",
                    ),
                );
            },
            code: 3,
            want: "roles/app/role.toml:5 files[1]: key `dir_mode`",
        },
        RepoCase {
            name: "invalid unit name in on_change",
            edit: |r| {
                r.write(
                    "roles/app/role.toml",
                    &ROLE.replace(
                        "source = \"static\"",
                        "source = \"static\"\non_change = { restart = [\"../evil\"] }",
                    ),
                );
            },
            code: 3,
            want: "roles/app/role.toml:5 files[1]: on_change.restart",
        },
        RepoCase {
            name: "check with no probe",
            edit: |r| append_role(r, "[[checks]]\nname = \"nothing\"\n"),
            code: 3,
            want: "roles/app/role.toml:9 checks[0]: a check needs exactly one",
        },
        RepoCase {
            name: "http check with a bad url",
            edit: |r| append_role(r, "[[checks]]\nhttp = { url = \"ftp://x/\" }\n"),
            code: 3,
            want: "roles/app/role.toml:9 checks[0]: http.url: \"ftp://x/\"",
        },
        RepoCase {
            name: "target reserved for the agent",
            edit: |r| {
                append_role(
                    r,
                    "[[files]]\npath = \"/etc/driftless/allowed_signers\"\nsource = \"static\"\n",
                )
            },
            code: 3,
            want: "roles/app/role.toml:9 files[2]: /etc/driftless/allowed_signers is reserved for the agent",
        },
        RepoCase {
            name: "host file syntax error",
            edit: |r| {
                r.write("hosts/h.toml", "roles = \n");
            },
            code: 3,
            want: "hosts/h.toml",
        },
        RepoCase {
            name: "no host file and no default",
            edit: |r| {
                r.remove("hosts/default.toml");
            },
            code: 3,
            want: "hosts/",
        },
        RepoCase {
            name: "secret file missing",
            edit: |r| {
                append_role(
                    r,
                    "[[files]]\npath = \"/etc/secret\"\nsecret = \"secrets/none.yaml\"\n",
                )
            },
            code: 3,
            want: "roles/app/role.toml:9 files[2]: key `secret`: secrets/none.yaml",
        },
        RepoCase {
            name: "secret that is not a SOPS file",
            edit: |r| {
                r.write("secrets/plain.yaml", "password: hunter2\n");
                append_role(
                    r,
                    "[[files]]\npath = \"/etc/secret\"\nsecret = \"secrets/plain.yaml\"\n",
                );
            },
            code: 3,
            want: "secrets/plain.yaml",
        },
        RepoCase {
            name: "symlink leaving the repository",
            edit: |r| {
                std::os::unix::fs::symlink("/etc/hostname", r.path().join("roles/app/files/leak"))
                    .unwrap();
                append_role(r, "[[files]]\npath = \"/etc/leak\"\nsource = \"leak\"\n");
            },
            code: 3,
            want: "leak",
        },
        RepoCase {
            name: "unit with an invalid name",
            edit: |r| {
                append_role(
                    r,
                    "[[units]]\nname = \"no spaces allowed.service\"\nstarted = true\n",
                )
            },
            code: 3,
            want: "roles/app/role.toml:9 units[0]: key `name`",
        },
        RepoCase {
            name: "format without secret",
            edit: |r| {
                r.write(
                    "roles/app/role.toml",
                    &ROLE.replace(
                        "source = \"static\"",
                        "source = \"static\"\nformat = \"json\"",
                    ),
                );
            },
            code: 3,
            want: "roles/app/role.toml:5 files[1]: key `format` only goes with `secret`",
        },
        RepoCase {
            name: "template and source both set",
            edit: |r| {
                r.write(
                    "roles/app/role.toml",
                    &ROLE.replace(
                        "source = \"static\"",
                        "source = \"static\"\ntemplate = \"app.conf.tera\"",
                    ),
                );
            },
            code: 3,
            want: "roles/app/role.toml:5 files[1]: set only one of",
        },
        RepoCase {
            name: "hook whose program is not an absolute path",
            edit: |r| append_role(r, "[[hooks]]\nwhen = \"post\"\nargv = [\"migrate\", \"--apply\"]\n"),
            code: 3,
            want: "roles/app/role.toml:9 hooks[0]: key `argv`: the program \"migrate\" must be an absolute path",
        },
        RepoCase {
            name: "hook with an empty argv",
            edit: |r| append_role(r, "[[hooks]]\nwhen = \"post\"\nargv = []\n"),
            code: 3,
            want: "roles/app/role.toml:9 hooks[0]: key `argv` is empty",
        },
        RepoCase {
            name: "hook with a bad timeout",
            edit: |r| {
                append_role(
                    r,
                    "[[hooks]]\nwhen = \"post\"\nargv = [\"/bin/true\"]\ntimeout = \"soon\"\n",
                )
            },
            code: 3,
            want: "roles/app/role.toml:9 hooks[0]: key `timeout`: \"soon\" is not a duration",
        },
        RepoCase {
            name: "hook with an unknown when",
            edit: |r| append_role(r, "[[hooks]]\nwhen = \"during\"\nargv = [\"/bin/true\"]\n"),
            code: 3,
            want: "roles/app/role.toml:9 hooks[0]: key `when`: \"during\" is neither \"pre\"",
        },
        RepoCase {
            name: "hook with an unknown run",
            edit: |r| {
                append_role(
                    r,
                    "[[hooks]]\nwhen = \"pre\"\nargv = [\"/bin/true\"]\nrun = \"sometimes\"\n",
                )
            },
            code: 3,
            want: "roles/app/role.toml:9 hooks[0]: key `run`: \"sometimes\" is neither \"on-change\"",
        },
        RepoCase {
            name: "hook with an unknown key",
            edit: |r| {
                append_role(
                    r,
                    "[[hooks]]\nwhen = \"pre\"\nargv = [\"/bin/true\"]\nshell = true\n",
                )
            },
            code: 3,
            want: "roles/app/role.toml:12:1: unknown field `shell`",
        },
        RepoCase {
            name: "hook with a zero timeout",
            edit: |r| {
                append_role(
                    r,
                    "[[hooks]]\nwhen = \"pre\"\nargv = [\"/bin/true\"]\ntimeout = \"0s\"\n",
                )
            },
            code: 3,
            want: "roles/app/role.toml:9 hooks[0]: key `timeout`: must be more than 0s",
        },
        RepoCase {
            name: "a template that raises an error",
            edit: |r| {
                r.write(
                    "roles/app/files/app.conf.tera",
                    "{{ throw(message=\"refusing this host\") }}",
                );
            },
            code: 3,
            want: "refusing this host",
        },
        RepoCase {
            // Refused by the size git records, before it is inflated.
            name: "a source larger than max_file_size",
            edit: |r| {
                r.write("roles/app/files/static", &"\0".repeat((64 << 20) + 1));
            },
            code: 3,
            want: "roles/app/files/static from the repository: it is 67108865 bytes, more than any managed file may be (64 MiB, max_file_size",
        },
    ]
}

#[test]
fn every_bad_repository_gives_its_error_and_exit_3_and_changes_nothing() {
    let cases = repo_cases();
    for case in &cases {
        let repo = good_repo();
        let host = Host::new("h");
        host.sync(repo.path()).ok();
        let before = snapshot(host.root.path());
        (case.edit)(&repo);
        repo.commit(case.name);
        let run = host.sync(repo.path());
        assert_eq!(run.code, case.code, "{}: {}", case.name, run.stderr);
        let line = error_line(&run);
        assert!(
            line.contains(case.want),
            "{}: {:?} not in {line:?}\n{}",
            case.name,
            case.want,
            run.stderr
        );
        assert!(
            !run.stderr.contains("panicked"),
            "{}: {}",
            case.name,
            run.stderr
        );
        assert_eq!(
            snapshot(host.root.path()),
            before,
            "{}: the host changed",
            case.name
        );
    }
    assert!(cases.len() >= 30);
}

/// agent.toml cases: the agent's own configuration, exit 78.
#[test]
fn every_bad_agent_config_gives_its_error_and_exit_78_and_changes_nothing() {
    let cases: &[(&str, &str, &str)] = &[
        ("unknown key", "sourec = \"/srv/x\"\n", "sourec"),
        ("TOML syntax error", "interval = \n", "agent.toml"),
        (
            "duration that is not one",
            "interval = \"5 parsecs\"\n",
            "interval",
        ),
        (
            "interval under a second",
            "interval = \"10ms\"\n",
            "interval",
        ),
        (
            "unknown signature policy",
            "signature_policy = \"sometimes\"\n",
            "signature_policy",
        ),
        (
            "render limit below the file limit",
            "max_file_size = \"1MiB\"\nmax_render_size = \"1KiB\"\n",
            "max_render_size",
        ),
        (
            "file limit above what a managed file may be read back at",
            "max_file_size = \"2GiB\"\nmax_render_size = \"4GiB\"\n",
            "max_file_size (2 GiB) is more than 1 GiB",
        ),
        (
            "size that is not one",
            "max_bundle_size = \"lots\"\n",
            "max_bundle_size",
        ),
        (
            "unsupported source scheme",
            "source = \"ftp://example.com/repo\"\n",
            "ftp",
        ),
        (
            "key of the wrong type",
            "require_signed = \"yes\"\n",
            "require_signed",
        ),
    ];
    for (name, toml, want) in cases {
        let repo = good_repo();
        let host = Host::new("h");
        host.sync(repo.path()).ok();
        let before = snapshot(host.root.path());
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("agent.toml");
        // The source comes from the file unless the case sets its own.
        let text = if toml.contains("source =") {
            toml.to_string()
        } else {
            format!("source = \"{}\"\n{toml}", repo.path().display())
        };
        std::fs::write(&conf, text).unwrap();
        let out = Command::new(BIN)
            .args(["sync", "--once", "--config"])
            .arg(&conf)
            .args(["--host", "h", "--root"])
            .arg(host.root.path())
            .arg("--state-dir")
            .arg(host.state.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(78), "{name}: {stderr}");
        let line = stderr
            .lines()
            .rfind(|l| l.starts_with("error:"))
            .unwrap_or_default();
        assert!(line.contains(want), "{name}: {want:?} not in {line:?}");
        assert!(
            line.contains("agent.toml") || *want == "ftp",
            "{name}: the file is not named: {line}"
        );
        assert_eq!(
            snapshot(host.root.path()),
            before,
            "{name}: the host changed"
        );
    }
}

/// State files and the anti-rollback record: refused with the remedy,
/// nothing applied.
#[test]
fn corrupt_state_gives_its_error_and_code_and_changes_nothing() {
    type Break = fn(&Host);
    let cases: &[(&str, Break, i32, &str)] = &[
        (
            "anti-rollback record that is not JSON",
            |h| std::fs::write(h.path("/etc/driftless/applied-commit.json"), "{").unwrap(),
            1,
            "applied-commit.json",
        ),
        (
            "anti-rollback record naming no commit",
            |h| {
                std::fs::write(
                    h.path("/etc/driftless/applied-commit.json"),
                    "{\"commit\": 5}",
                )
                .unwrap()
            },
            1,
            "applied-commit.json",
        ),
        (
            "marks that are not JSON",
            |h| std::fs::write(h.state.path().join("marks.json"), "{\"bad\": 3").unwrap(),
            5,
            "sync --retry",
        ),
        (
            "state entry that is a symlink",
            |h| {
                let p = h.state.path().join("history.jsonl");
                std::fs::remove_file(&p).unwrap();
                std::os::unix::fs::symlink("/etc/passwd", p).unwrap()
            },
            1,
            "history.jsonl is a symlink",
        ),
        (
            "lock that is a symlink",
            |h| {
                let p = h.state.path().join("lock");
                std::fs::remove_file(&p).unwrap();
                std::os::unix::fs::symlink("/etc/passwd", p).unwrap()
            },
            1,
            "lock is a symlink",
        ),
        (
            "state directory others can write",
            |h| {
                use std::os::unix::fs::PermissionsExt;
                let p = std::fs::Permissions::from_mode(0o777);
                std::fs::set_permissions(h.state.path(), p).unwrap()
            },
            1,
            "is writable by group or others (mode 0777)",
        ),
    ];
    for (name, brk, code, want) in cases {
        let repo = good_repo();
        let host = Host::new("h");
        host.sync(repo.path()).ok();
        repo.write("roles/app/files/static", "changed\n");
        repo.commit("a change that must not apply");
        brk(&host);
        let before = snapshot(host.root.path());
        let run = host.sync(repo.path());
        assert_eq!(run.code, *code, "{name}: {}", run.stderr);
        assert!(
            error_line(&run).contains(want),
            "{name}: {want:?} not in {}",
            run.stderr
        );
        assert_eq!(
            snapshot(host.root.path()),
            before,
            "{name}: the host changed"
        );
    }
}

/// Bundles and signatures: refused (exit 4) with the reason, nothing
/// imported or applied.
#[test]
fn bad_bundles_and_signatures_give_their_error_and_exit_4_and_change_nothing() {
    let signer = Signer::new("release@example.com");
    let stranger = Signer::new("mallory@example.com");
    let repo = app_repo(&signer, "one\n");
    let out = tempfile::tempdir().unwrap();
    let good = out.path().join("good.bundle");
    create_bundle(&repo, &good, &signer, None).ok();
    repo.write("roles/app/files/app.conf", "two\n");
    signed_commit(&repo, &signer, "v2");
    let v2 = out.path().join("v2.bundle");
    create_bundle(&repo, &v2, &signer, None).ok();
    let copy = |to: &str| -> std::path::PathBuf {
        let p = out.path().join(to);
        for ext in ["", ".manifest", ".manifest.sig"] {
            std::fs::copy(
                format!("{}{ext}", v2.display()),
                format!("{}{ext}", p.display()),
            )
            .unwrap();
        }
        p
    };
    type Make<'a> = Box<dyn Fn() -> std::path::PathBuf + 'a>;
    let cases: Vec<(&str, Make<'_>, &str)> = vec![
        (
            "signed by an untrusted key",
            Box::new(|| {
                let p = out.path().join("stranger.bundle");
                create_bundle(&repo, &p, &stranger, None).ok();
                p
            }),
            "allowed",
        ),
        (
            "truncated bundle",
            Box::new(|| {
                let p = copy("cut.bundle");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
                p
            }),
            "does not match its signed manifest",
        ),
        (
            "manifest that is not JSON",
            Box::new(|| {
                let p = copy("badjson.bundle");
                std::fs::write(format!("{}.manifest", p.display()), "not json").unwrap();
                p
            }),
            "manifest",
        ),
        (
            "signature that is not an SSH signature",
            Box::new(|| {
                let p = copy("badsig.bundle");
                std::fs::write(format!("{}.manifest.sig", p.display()), "garbage").unwrap();
                p
            }),
            "signature",
        ),
        (
            "manifest altered after signing",
            Box::new(|| {
                let p = copy("altered.bundle");
                let m = std::fs::read_to_string(format!("{}.manifest", p.display())).unwrap();
                std::fs::write(
                    format!("{}.manifest", p.display()),
                    m.replacen('{', "{ ", 1),
                )
                .unwrap();
                p
            }),
            "does not vouch",
        ),
        (
            "manifest missing",
            Box::new(|| {
                let p = copy("nomanifest.bundle");
                std::fs::remove_file(format!("{}.manifest", p.display())).unwrap();
                p
            }),
            "manifest",
        ),
        (
            "a FIFO instead of the bundle",
            Box::new(|| {
                let p = copy("fifo.bundle");
                std::fs::remove_file(&p).unwrap();
                nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
                p
            }),
            "not a regular file",
        ),
        (
            "a symlink instead of the bundle",
            Box::new(|| {
                let p = copy("link.bundle");
                std::fs::remove_file(&p).unwrap();
                std::os::unix::fs::symlink(&v2, &p).unwrap();
                p
            }),
            "is a symlink",
        ),
        (
            "older than what the host runs",
            Box::new(|| good.clone()),
            "older than",
        ),
    ];
    for (name, make, want) in &cases {
        let host = Host::new("h");
        import(&host, &signer, &[&v2]).ok();
        let before = snapshot(host.root.path());
        let mirror_before = snapshot(&host.state.path().join("mirror.git/objects"));
        let file = make();
        let run = import(&host, &signer, &[&file]);
        assert_eq!(run.code, 4, "{name}: {}", run.stderr);
        assert!(
            run.stderr.contains(want),
            "{name}: {want:?} not in {}",
            run.stderr
        );
        assert_eq!(
            snapshot(host.root.path()),
            before,
            "{name}: the host changed"
        );
        assert_eq!(
            snapshot(&host.state.path().join("mirror.git/objects")),
            mirror_before,
            "{name}: the mirror changed"
        );
    }
    // An unsigned commit where signatures are required (fetched over git).
    let host = Host::new("h");
    let mut signed_host_args = vec!["sync", "--once", "--require-signed", "--allowed-signers"];
    let allowed = signer.allowed().display().to_string();
    signed_host_args.push(&allowed);
    host.run(repo.path(), &signed_host_args).ok();
    let before = snapshot(host.root.path());
    repo.write("roles/app/files/app.conf", "unsigned\n");
    repo.commit("unsigned");
    let run = host.run(repo.path(), &signed_host_args).code(4);
    assert!(
        error_line(&run).contains("not signed") || error_line(&run).contains("unsigned"),
        "{}",
        run.stderr
    );
    assert_eq!(snapshot(host.root.path()), before);
    let _ = bundles();
}

/// The tree `tree` (an object id) of `repo` with one more entry `name`
/// (mode, blob holding `content`) in its directory `dir` (`/`-separated,
/// "" for the top), written as raw objects: git's own commands refuse to
/// write these names, a hostile repository writes them anyway.
fn tree_with_entry(repo: &Repo, tree: &str, dir: &str, name: &[u8], content: &str) -> String {
    use std::io::Write as _;
    let (head, rest) = dir.split_once('/').unwrap_or((dir, ""));
    let listing = git(repo.path(), &["ls-tree", "-z", tree]);
    let mut entries: Vec<(String, Vec<u8>, String)> = listing
        .split('\0')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (meta, n) = l.split_once('\t').unwrap();
            let mut m = meta.split(' ');
            let (mode, _, id) = (m.next().unwrap(), m.next(), m.next().unwrap());
            (mode.to_string(), n.as_bytes().to_vec(), id.to_string())
        })
        .collect();
    if dir.is_empty() {
        let blob_file = repo.path().join(".crafted-blob");
        std::fs::write(&blob_file, content).unwrap();
        let blob = git(
            repo.path(),
            &["hash-object", "-w", blob_file.to_str().unwrap()],
        );
        std::fs::remove_file(blob_file).unwrap();
        entries.push(("100644".into(), name.to_vec(), blob));
    } else {
        let e = entries
            .iter_mut()
            .find(|e| e.1 == head.as_bytes())
            .expect("the directory exists");
        e.2 = tree_with_entry(repo, &e.2.clone(), rest, name, content);
    }
    let mut data = Vec::new();
    for (mode, n, id) in &entries {
        let mode = if mode == "040000" { "40000" } else { mode };
        data.extend_from_slice(mode.as_bytes());
        data.push(b' ');
        data.extend_from_slice(n);
        data.push(0);
        for i in (0..id.len()).step_by(2) {
            data.push(u8::from_str_radix(&id[i..i + 2], 16).unwrap());
        }
    }
    let mut child = Command::new("git")
        .args(["hash-object", "-t", "tree", "-w", "--literally", "--stdin"])
        .current_dir(repo.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The bug this guards against: a commit whose trees git never writes (a
/// second `role.toml` in the role's directory, an entry named
/// `roles/app/role.toml` at the top, one named `..` under `files/`) was
/// read as if the names were paths, so which `role.toml` declared the
/// host's files depended on the order of a map. Each is refused, naming
/// the entry, with exit 3, and the host keeps what it had.
#[test]
fn a_hand_crafted_tree_is_refused_and_changes_nothing() {
    let evil = "[[files]]\npath = \"/etc/evil\"\nsource = \"static\"\n";
    let cases: &[(&str, &str, &[u8], &str)] = &[
        (
            "a second role.toml",
            "roles/app",
            b"role.toml",
            "\"role.toml\" appears twice",
        ),
        (
            "a path as one name",
            "",
            b"roles/app/role.toml",
            "holds a `/`",
        ),
        (
            "a .. under files/",
            "roles/app/files",
            b"..",
            "\"..\" is not a file name",
        ),
        (
            "a .git directory name",
            "roles",
            b".GIT",
            "git's own directory",
        ),
        // A commit that changes only files under `files/` is one the
        // quick path takes without reading the tree whole: the tree
        // comparison must refuse it as the whole read does.
        (
            "a role file twice",
            "roles/app/files",
            b"static",
            "\"static\" appears twice",
        ),
    ];
    for (what, dir, name, want) in cases {
        let repo = good_repo();
        let host = Host::new("h");
        host.sync(repo.path()).ok();
        let before = snapshot(host.root.path());
        let tree = git(repo.path(), &["rev-parse", "HEAD^{tree}"]);
        let crafted = tree_with_entry(&repo, &tree, dir, name, evil);
        let commit = git(
            repo.path(),
            &["commit-tree", &crafted, "-p", "HEAD", "-m", what],
        );
        git(repo.path(), &["update-ref", "refs/heads/main", &commit]);
        let run = host.sync(repo.path());
        assert_eq!(run.code, 3, "{what}: {}", run.stderr);
        let line = error_line(&run);
        assert!(line.contains(want), "{what}: {want:?} not in {line:?}");
        assert!(!run.stderr.contains("panicked"), "{what}: {}", run.stderr);
        assert_eq!(
            snapshot(host.root.path()),
            before,
            "{what}: the host changed"
        );
        assert!(host.read("/etc/evil").is_none(), "{what}");
    }
}
