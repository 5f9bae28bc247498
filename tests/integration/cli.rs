//! Command-line behaviour: help, exit codes, the lock, JSON output.

use std::process::Command;

use crate::support::*;

#[test]
fn help_teaches_examples_and_exit_codes() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for needle in [
        "sync --once --source",
        "validate",
        "Exit codes",
        "75 another",
    ] {
        assert!(text.contains(needle), "--help lacks {needle:?}:\n{text}");
    }
}

#[test]
fn second_run_while_locked_exits_75_and_waits_with_wait() {
    let repo = simple_repo(&[("/etc/a", "x\n")]);
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(host.state.path().join("lock"))
        .unwrap();
    let held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).unwrap();
    let run = host.sync(repo.path()).code(75);
    assert!(run.stderr.contains("holds the lock"), "{}", run.stderr);
    // With --wait it proceeds once the lock is released. Released only
    // once the run is seen with the lock file open (while this test holds
    // the lock, it can only be waiting): dropped at once, the run found
    // the lock free and the wait went untested.
    let child = host
        .cmd(repo.path(), &["sync", "--once", "--wait", "30"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lock_path = std::fs::canonicalize(host.state.path().join("lock")).unwrap();
    let fds = format!("/proc/{}/fd", child.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let waiting = || {
        std::fs::read_dir(&fds).is_ok_and(|d| {
            d.flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == lock_path))
        })
    };
    while !waiting() {
        assert!(
            std::time::Instant::now() < deadline,
            "the run never opened the lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    drop(held);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn plan_json_status_json_and_history() {
    let repo = simple_repo(&[("/etc/a", "x\n"), ("/etc/b", "y\n")]);
    let host = Host::new("h");
    let plan = host.run(repo.path(), &["plan", "--format", "json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&plan.stdout).unwrap();
    assert_eq!(v["kind"], "Plan");
    assert_eq!(v["spec"]["commit"], repo.head());
    let changes = v["status"]["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 2);
    assert_eq!(changes[0]["kind"], "create");
    assert!(changes[0]["diff"].as_str().unwrap().contains("+x"));
    assert!(host.tree().is_empty(), "plan must not write");

    host.sync(repo.path()).ok();
    let status = host.run(repo.path(), &["status", "--format", "json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(v["status"]["applied"]["commit"], repo.head());
    assert_eq!(v["status"]["applied"]["files"], 2);
    assert_eq!(v["status"]["last_run"]["outcome"], "applied");

    let hist = host.run(repo.path(), &["history"]).ok();
    assert!(
        hist.stdout.contains("applied") && hist.stdout.contains("+2 ~0 -0"),
        "{}",
        hist.stdout
    );
}

/// An agent.toml (in a directory of its own, returned to keep) that syncs
/// `source` onto `host`.
fn agent_toml(host: &Host, source: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "source = \"{source}\"\nhost = \"{}\"\nroot = \"{}\"\nstate_dir = \"{}\"\n",
            host.name,
            host.root.path().display(),
            host.state.path().display()
        ),
    )
    .unwrap();
    (dir, cfg)
}

/// The bug this pins: `status` (text and JSON) printed the configured
/// source URL whole, its password included.
#[test]
fn status_names_the_source_without_its_password() {
    let host = Host::new("h");
    let (_dir, cfg) = agent_toml(&host, "https://bot:s3cret@git.example.org/cfg.git");
    for format in ["text", "json"] {
        let out = Command::new(BIN)
            .args(["status", "--format", format, "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("git.example.org"), "{stdout}");
        assert!(!stdout.contains("s3cret"), "leaked: {stdout}");
    }
}

#[test]
fn bad_agent_config_exits_78_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, "sorce = \"/srv/repo\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["status", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("agent.toml:1:1") && err.contains("did you mean `source`?"),
        "{err}"
    );
}

#[test]
fn config_file_provides_the_settings() {
    let repo = simple_repo(&[("/etc/a", "x\n")]);
    let host = Host::new("h");
    let (_dir, cfg) = agent_toml(&host, &repo.path().display().to_string());
    let out = Command::new(BIN)
        .args(["sync", "--once", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(host.read("/etc/a").as_deref(), Some("x\n"));
}

#[test]
fn missing_source_is_a_config_error() {
    let out = Command::new(BIN)
        .args([
            "sync",
            "--once",
            "--no-config",
            "--state-dir",
            "/nonexistent/x",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--source"), "{err}");
    // 78: a configuration error, which systemd is told not to restart on.
    assert_eq!(out.status.code(), Some(78), "{err}");
}

#[test]
fn validate_reports_every_broken_host_with_exit_3() {
    let repo = Repo::new();
    repo.write("driftless.toml", "roles = [\"app\"]\n");
    repo.write("hosts/a.toml", "");
    repo.write("hosts/b.toml", "roles = [\"nope\"]\n");
    repo.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/x\"\ntemplate = \"x.tera\"\n",
    );
    repo.write("roles/app/files/x.tera", "{{ vars.missing }}\n");
    let (code, text) = validate(repo.path(), &[]);
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains("FAIL  a:") && text.contains("undefined variable `vars.missing`"),
        "{text}"
    );
    assert!(
        text.contains("FAIL  b:") && text.contains("role `nope` does not exist"),
        "{text}"
    );
}

/// `validate DIR` (a CI job checking a pull request's checkout) read every
/// file of the directory into memory first: a checked-out 8 GiB file,
/// used or not, was read whole. Now a file is read only when the
/// configuration uses it, and a used one over `max_file_size` is refused
/// by its size. (Sparse files: nothing is stored, the old code would have
/// read 8 GiB of zeros.)
#[test]
fn validate_of_a_checkout_reads_only_used_files_and_refuses_a_huge_one_by_size() {
    let repo = Repo::new();
    repo.write("driftless.toml", "roles = [\"app\"]\n");
    repo.write("hosts/a.toml", "");
    repo.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/x\"\ntemplate = \"x.tera\"\n",
    );
    repo.write("roles/app/files/x.tera", "x\n");
    let unused = std::fs::File::create(repo.path().join("roles/app/files/unused.iso")).unwrap();
    unused.set_len(8 << 30).unwrap();
    let (code, text) = validate(repo.path(), &[]);
    assert_eq!(code, Some(0), "{text}");
    repo.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/x\"\ntemplate = \"x.tera\"\n\n[[files]]\npath = \"/etc/iso\"\nsource = \"unused.iso\"\n",
    );
    let (code, text) = validate(repo.path(), &[]);
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains("unused.iso")
            && text.contains("8589934592 bytes")
            && text.contains("max_file_size"),
        "{text}"
    );
}

/// Issue 14 §3: `driftless status | head -1` and `plan | head` panicked
/// on the broken pipe (exit 101). A reader that went away ends the
/// command quietly.
#[test]
fn a_closed_pipe_on_stdout_is_not_a_panic() {
    let repo = simple_repo(&[("/etc/a", "a\n"), ("/etc/b", "b\n")]);
    let host = Host::new("h");
    for args in [
        &["status"][..],
        &["plan"][..],
        &["history"][..],
        &["status", "--format", "json"][..],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = host.cmd(repo.path(), args).stdout(writer).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
    }
}

/// Issue 14 §3: `-q` still printed the summary, so cron mailed every run.
#[test]
fn quiet_prints_nothing_on_success() {
    let repo = simple_repo(&[("/etc/a", "a\n")]);
    let host = Host::new("h");
    for round in ["applies", "nothing to do"] {
        let run = host.run(repo.path(), &["sync", "--once", "-q"]).ok();
        assert_eq!(run.stdout, "", "{round}");
        assert_eq!(run.stderr, "", "{round}");
    }
    assert_eq!(host.read("/etc/a").as_deref(), Some("a\n"));
}

/// Issue 14 §3: an unknown filter (or function) named no line.
#[test]
fn an_unknown_filter_or_function_names_its_line() {
    for (body, want) in [
        (
            "one\ntwo\nthree {{ 1 | nofilter }}\n",
            "x.tera:3: Filter `nofilter` does not exist",
        ),
        (
            "one\n{{ nofn(a=1) }}\n",
            "x.tera:2: Function `nofn` does not exist",
        ),
    ] {
        let repo = Repo::new();
        repo.write("driftless.toml", "roles = [\"app\"]\n");
        repo.write("hosts/default.toml", "");
        repo.write(
            "roles/app/role.toml",
            "[[files]]\npath = \"/etc/x\"\ntemplate = \"x.tera\"\n",
        );
        repo.write("roles/app/files/x.tera", body);
        let (code, text) = validate(repo.path(), &[]);
        assert_eq!(code, Some(3), "{text}");
        assert!(text.contains(want), "{want:?} not in {text}");
    }
}

/// Issue 14 §3: a local source with uncommitted edits silently applied the
/// last commit; `sync` and `plan` now say the edits are ignored, to a
/// person at a terminal. Not when nobody reads it (a timer, cron, a
/// script): the status of a 10,000-file working copy cost 30 ms a run.
#[test]
fn uncommitted_edits_in_a_local_source_are_named_as_ignored() {
    let repo = simple_repo(&[("/etc/a", "a\n"), ("/etc/b", "b\n")]);
    let host = Host::new("h");
    let clean = on_a_terminal(&host.cmd(repo.path(), &["sync", "--once"]));
    assert!(!clean.contains("uncommitted"), "{clean}");

    // One modified, one new untracked, one ignored: two changes.
    repo.write("roles/app/files/f0", "edited\n");
    repo.write("notes.txt", "scratch\n");
    repo.write(".gitignore", "*.swp\n");
    repo.write("x.swp", "editor\n");
    let run = on_a_terminal(&host.cmd(repo.path(), &["sync", "--once"]));
    let want = format!(
        "note: 3 uncommitted changes in {} are ignored (driftless applies commits",
        repo.path().display()
    );
    assert!(run.contains(&want), "{run}");
    assert_eq!(
        host.read("/etc/a").as_deref(),
        Some("a\n"),
        "the edit is not applied"
    );
    let plan = on_a_terminal(&host.cmd(repo.path(), &["plan"]));
    assert!(plan.contains(&want), "{plan}");
    let quiet = on_a_terminal(&host.cmd(repo.path(), &["sync", "--once", "-q"]));
    assert!(!quiet.contains("uncommitted"), "{quiet}");
    let piped = host.sync(repo.path()).ok();
    assert!(!piped.stderr.contains("uncommitted"), "{}", piped.stderr);

    // On another branch than the followed one, edits say nothing about it.
    repo.commit("edits");
    git(repo.path(), &["checkout", "-q", "-b", "topic"]);
    repo.write("roles/app/files/f1", "topic edit\n");
    let other = on_a_terminal(&host.cmd(repo.path(), &["sync", "--once"]));
    assert!(!other.contains("uncommitted"), "{other}");
}

/// Issue 14 §3: every flag was global, so `status --help` listed
/// `--source`, `--age-key`, `--run-checks`… Each subcommand's help lists
/// what it uses, and a flag it does not use is a usage error (exit 2).
#[test]
fn each_subcommands_help_lists_only_the_flags_it_uses() {
    let help = |args: &[&str]| {
        let out = Command::new(BIN).args(args).arg("--help").output().unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let cases: &[(&[&str], &[&str], &[&str])] = &[
        (
            &["sync"],
            &[
                "--source",
                "--host",
                "--root",
                "--state-dir",
                "--age-key",
                "--run-checks",
                "--require-signed",
                "--config",
                "--quiet",
            ],
            &[],
        ),
        (
            &["plan"],
            &["--source", "--host", "--age-key"],
            &["--run-checks"],
        ),
        (
            &["status"],
            &["--root", "--state-dir", "--config"],
            &[
                "--source",
                "--host",
                "--age-key",
                "--run-checks",
                "--allowed-root",
            ],
        ),
        (&["history"], &["--state-dir"], &["--source", "--age-key"]),
        (
            &["validate"],
            &["--source", "--age-key", "--allowed-root"],
            &["--host", "--run-checks"],
        ),
        (
            &["secrets", "decrypt"],
            &["--age-key", "--config"],
            &["--source", "--root", "--host"],
        ),
        (
            &["state", "check"],
            &["--state-dir", "--root"],
            &["--source", "--age-key"],
        ),
        (
            &["bundle", "create"],
            &["--repo", "--branch", "--sign-key"],
            &["--config", "--root", "--state-dir", "--source"],
        ),
        (
            &["bundle", "verify"],
            &["--allowed-signers", "--state-dir"],
            &["--source", "--age-key"],
        ),
        (
            &["bundle", "stick"],
            &["--host", "--age-key", "--run-checks"],
            &[],
        ),
        (&["host-recipient"], &["--config"], &["--source", "--root"]),
        (
            &["init"],
            &["--host", "--force", "--quiet"],
            &["--source", "--root", "--state-dir", "--config", "--age-key"],
        ),
    ];
    for (cmd, has, lacks) in cases {
        let text = help(cmd);
        for f in *has {
            assert!(
                text.contains(&format!("{f} ")) || text.contains(&format!("{f}\n")),
                "{cmd:?} --help lacks {f}:\n{text}"
            );
        }
        for f in *lacks {
            assert!(!text.contains(f), "{cmd:?} --help lists {f}:\n{text}");
        }
    }
    let out = Command::new(BIN)
        .args(["status", "--source", "/srv/x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unexpected argument '--source'"));
}

/// Runs `cmd` on a pseudo-terminal (util-linux `script`), returning what
/// the terminal received.
fn on_a_terminal(cmd: &Command) -> String {
    let quote = |s: &std::ffi::OsStr| format!("'{}'", s.to_string_lossy().replace('\'', "'\\''"));
    let line: Vec<String> = std::iter::once(quote(cmd.get_program()))
        .chain(cmd.get_args().map(quote))
        .collect();
    let mut script = Command::new("script");
    // The environment `cmd` was given (what it removed, too).
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => script.env(k, v),
            None => script.env_remove(k),
        };
    }
    let out = script
        .args(["-q", "-e", "-c", &line.join(" "), "/dev/null"])
        .env("NO_COLOR", "1")
        .env_remove("JOURNAL_STREAM")
        .output()
        .unwrap_or_else(|e| panic!("util-linux `script` is needed for this test: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    text
}

/// Issue 14 §3: a cold apply of thousands of files showed nothing on a
/// terminal (and logged a line per file). On a terminal it shows progress;
/// on a pipe (cron, journald) and with -q, not a byte of it.
#[test]
fn progress_shows_on_a_terminal_only() {
    let files: Vec<(String, String)> = (0..300)
        .map(|i| (format!("/etc/many/f{i}"), format!("{i}\n")))
        .collect();
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_str()))
        .collect();
    let repo = simple_repo(&refs);

    let piped = Host::new("h");
    let run = piped.sync(repo.path()).ok();
    for word in ["rendering", "staging files", "switching in"] {
        assert!(
            !run.stderr.contains(word),
            "{word} on a pipe:\n{}",
            run.stderr
        );
    }

    let tty = Host::new("h");
    let text = on_a_terminal(&tty.cmd(repo.path(), &["sync", "--once"]));
    for word in ["rendering [", "staging files [", "switching in [", "/300"] {
        assert!(text.contains(word), "{word} missing on a terminal:\n{text}");
    }
    assert!(text.contains("applied"), "{text}");
    assert_eq!(tty.read("/etc/many/f299").as_deref(), Some("299\n"));

    let quiet = Host::new("h");
    let text = on_a_terminal(&quiet.cmd(repo.path(), &["sync", "--once", "-q"]));
    assert_eq!(text, "", "-q on a terminal");
}

/// The units' ExecCondition: an installed agent without a `source` is
/// skipped with the remedy named; with one it runs; an unreadable config
/// is left to the agent itself to report (exit 0 here).
#[test]
fn config_has_source_is_the_units_start_condition() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let run = |p: &std::path::Path| {
        Command::new(BIN)
            .args(["config", "has-source", "--config"])
            .arg(p)
            .output()
            .unwrap()
    };
    let none = run(&cfg("none.toml", "branch = \"main\"\n"));
    assert_eq!(none.status.code(), Some(1));
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(
        err.contains("no source configured") && err.contains("/etc/driftless/agent.toml"),
        "{err}"
    );
    let some = run(&cfg("some.toml", "source = \"/srv/config\"\n"));
    assert_eq!(some.status.code(), Some(0), "{some:?}");
    let broken = run(&cfg("broken.toml", "sorce = \"/srv/config\"\n"));
    assert_eq!(broken.status.code(), Some(0), "{broken:?}");
}

/// The package's default agent.toml: nothing set (so nothing runs), and
/// every commented key, uncommented, is a valid key of the right type.
#[test]
fn packaged_agent_toml_sets_nothing_and_documents_only_real_keys() {
    let shipped = workspace().join("packaging/agent.toml");
    let out = Command::new(BIN)
        .args(["config", "has-source", "--config"])
        .arg(&shipped)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "the shipped config must not set a source"
    );
    let text = std::fs::read_to_string(&shipped).unwrap();
    let uncommented: String = text
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .filter(|l| l.starts_with(|c: char| c.is_ascii_lowercase() || c == '['))
        .map(|l| l.replace("\"<hostname>\"", "\"web1\"") + "\n")
        .collect();
    assert!(uncommented.contains("source = "), "{uncommented}");
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("agent.toml");
    std::fs::write(&full, &uncommented).unwrap();
    let out = Command::new(BIN)
        .args(["status", "--config"])
        .arg(&full)
        .args(["--root"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "uncommented packaging/agent.toml is invalid:\n{}\n{uncommented}",
        String::from_utf8_lossy(&out.stderr)
    );
}
