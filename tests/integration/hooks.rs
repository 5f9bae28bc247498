//! Hooks (issue #16, step 4 of docs/design/resources.md): `[[hooks]]` of a
//! role, run by the real binary under a `--root` prefix with
//! `--run-checks` (hooks act on the live system, like checks). The hooks
//! are scripts in a scratch directory; they record what they saw in files
//! there, and block on FIFOs where a test must act while one runs.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::support::*;

/// A scratch directory for the hooks' scripts and records.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        Scratch { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn p(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// An executable `#!/bin/sh` script `name` with `body`.
    fn script(&self, name: &str, body: &str) -> String {
        let p = self.path(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p.display().to_string()
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// A script that appends `<tag>: <content of TARGET or "absent">` to
    /// `log`, so a hook shows what the host looked like when it ran.
    fn recorder(&self, host: &Host, target: &str) -> String {
        self.script(
            "record",
            &format!(
                "tag=\"$1\"\nif [ -e {t} ]; then c=$(cat {t}); else c=absent; fi\necho \"$tag: $c\" >> {log}",
                t = host.path(target).display(),
                log = self.p("log"),
            ),
        )
    }
}

fn sync(host: &Host, repo: &Repo) -> Run {
    host.run(repo.path(), &["sync", "--once", "--run-checks"])
}

/// A repository with role `app` managing `/etc/app.conf` (content
/// `content`) plus `extra` role.toml text.
fn app_repo(content: &str, extra: &str) -> Repo {
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"app\"]\n");
    r.write("hosts/default.toml", "");
    set_app(&r, content, extra);
    r.commit("v1");
    r
}

fn set_app(r: &Repo, content: &str, extra: &str) {
    r.write("roles/app/files/app.conf", content);
    r.write(
        "roles/app/role.toml",
        &format!("[[files]]\npath = \"/etc/app.conf\"\nsource = \"app.conf\"\n\n{extra}"),
    );
}

fn hook(when: &str, argv: &[&str], more: &str) -> String {
    format!("[[hooks]]\nwhen = \"{when}\"\nargv = {argv:?}\n{more}\n")
}

/// The argv reaches the program as written: no shell, so `;`, `$HOME`
/// and a quote are literal; the environment is `PATH` and `env` only.
#[test]
fn a_hook_runs_without_a_shell_and_with_only_its_environment() {
    let w = Scratch::new();
    let args = w.script(
        "args",
        &format!(
            "for a in \"$@\"; do echo \"$a\" >> {}; done",
            w.p("args.out")
        ),
    );
    let env = w.script(
        "env",
        &format!("/usr/bin/env | grep -v '^PWD=' | sort > {}", w.p("env.out")),
    );
    let repo = app_repo(
        "v1\n",
        &format!(
            "{}{}",
            hook(
                "post",
                &[&args, &format!("a; touch {}", w.p("pwned")), "$HOME", "'q"],
                ""
            ),
            hook("pre", &[&env], "env = { APP_ENV = \"prod\", EMPTY = \"\" }"),
        ),
    );
    let host = Host::new("h");
    let run = host
        .cmd(repo.path(), &["sync", "--once", "--run-checks"])
        .env("LEAK_ME", "from the agent")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(
        w.read("args.out"),
        format!("a; touch {}\n$HOME\n'q\n", w.p("pwned"))
    );
    assert!(!w.path("pwned").exists(), "a shell ran the argument");
    assert_eq!(
        w.read("env.out"),
        "APP_ENV=prod\nEMPTY=\nPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    );
}

/// A pre hook sees the old files, a post hook the new ones after the unit
/// actions, and both run before the checks.
#[test]
fn pre_hooks_run_before_the_switch_and_post_hooks_before_the_checks() {
    let w = Scratch::new();
    let host = Host::new("h");
    let rec = w.recorder(&host, "/etc/app.conf");
    let hooks = format!(
        "{}{}[[checks]]\nname = \"c\"\nretries = 1\ncommand = {{ argv = [{rec:?}, \"check\"] }}\n",
        hook("pre", &[&rec, "pre"], ""),
        hook("post", &[&rec, "post"], ""),
    );
    let repo = app_repo("v1", &hooks);
    sync(&host, &repo).ok();
    assert_eq!(w.read("log"), "pre: absent\npost: v1\ncheck: v1\n");
    set_app(&repo, "v2", &hooks);
    repo.commit("v2");
    sync(&host, &repo).ok();
    assert_eq!(
        w.read("log"),
        "pre: absent\npost: v1\ncheck: v1\npre: v1\npost: v2\ncheck: v2\n"
    );
}

/// `on-change` runs when its role has a change, `always` when anything
/// changes, and nothing runs when nothing changes: an idle poll (a quick
/// hit), a full sync of the same commit, a commit that changes no file.
#[test]
fn on_change_and_always_hooks_and_none_on_a_no_op() {
    let w = Scratch::new();
    let host = Host::new("h");
    let rec = w.recorder(&host, "/etc/app.conf");
    let repo = Repo::new();
    repo.write("driftless.toml", "roles = [\"app\", \"other\"]\n");
    repo.write("hosts/default.toml", "");
    let other = format!(
        "[[files]]\npath = \"/etc/other.conf\"\nsource = \"o\"\n\n{}{}",
        hook("post", &[&rec, "other on-change"], "run = \"on-change\""),
        hook("post", &[&rec, "other always"], "run = \"always\""),
    );
    repo.write("roles/other/role.toml", &other);
    repo.write("roles/other/files/o", "o\n");
    let app_hooks = hook("post", &[&rec, "app on-change"], "");
    set_app(&repo, "v1", &app_hooks);
    repo.commit("v1");
    sync(&host, &repo).ok();
    assert_eq!(
        w.read("log"),
        "app on-change: v1\nother on-change: v1\nother always: v1\n"
    );
    std::fs::remove_file(w.path("log")).unwrap();

    set_app(&repo, "v2", &app_hooks);
    repo.commit("v2: only app changes");
    sync(&host, &repo).ok();
    assert_eq!(w.read("log"), "app on-change: v2\nother always: v2\n");
    std::fs::remove_file(w.path("log")).unwrap();

    sync(&host, &repo).ok();
    host.run(repo.path(), &["sync", "--once", "--run-checks", "--full"])
        .ok();
    repo.write("README", "no file of the host changes\n");
    repo.commit("v3: readme");
    sync(&host, &repo).ok();
    assert_eq!(w.read("log"), "", "a hook ran without a change");
}

/// `plan` lists the hooks a sync would run, says they are not undone,
/// shows the environment's names but never its values, and runs nothing.
#[test]
fn plan_lists_hooks_and_says_they_are_not_undone() {
    let w = Scratch::new();
    let host = Host::new("h");
    let rec = w.recorder(&host, "/etc/app.conf");
    let repo = app_repo(
        "v1",
        &format!(
            "{}{}",
            hook(
                "pre",
                &[&rec, "pre"],
                "user = \"root\"\ntimeout = \"60s\"\nenv = { TOKEN = \"hunter2\" }"
            ),
            hook("post", &[&rec, "post"], "run = \"always\""),
        ),
    );
    let text = host.run(repo.path(), &["plan"]).ok().stdout;
    let pre = format!("~ hook pre roles/app: {rec} pre (user root, 1m, env TOKEN)");
    let post = format!("~ hook post roles/app: {rec} post (30s)");
    for want in [
        pre.as_str(),
        post.as_str(),
        "irreversible: hooks are not undone",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
    let lines: Vec<&str> = text.lines().collect();
    let at = |s: &str| lines.iter().position(|l| l.contains(s)).unwrap();
    assert!(at(&pre) < at("+ create /etc/app.conf"), "{text}");
    assert!(at("+ create /etc/app.conf") < at(&post), "{text}");
    assert!(!text.contains("hunter2"), "{text}");

    let json = host
        .run(repo.path(), &["plan", "--format", "json"])
        .ok()
        .stdout;
    assert!(!json.contains("hunter2"), "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let hooks = &v["status"]["hooks"];
    assert_eq!(hooks[0]["when"], "pre");
    assert_eq!(hooks[0]["argv"], serde_json::json!([rec, "pre"]));
    assert_eq!(hooks[0]["user"], "root");
    assert_eq!(hooks[0]["timeout"], "1m");
    assert_eq!(hooks[0]["env"], serde_json::json!(["TOKEN"]));
    assert_eq!(hooks[0]["run"], "on-change");
    assert_eq!(hooks[0]["origin"], "roles/app/role.toml:5 hooks[0]");
    assert_eq!(hooks[1]["run"], "always");
    assert_eq!(
        v["status"]["irreversible"][0]["why"],
        "hooks are not undone"
    );
    assert_eq!(w.read("log"), "", "plan ran a hook");

    // Nothing to change: no hook in the plan.
    sync(&host, &repo).ok();
    let text = host.run(repo.path(), &["plan"]).ok().stdout;
    assert!(!text.contains("hook"), "{text}");
    let json = host
        .run(repo.path(), &["plan", "--format", "json"])
        .ok()
        .stdout;
    assert!(!json.contains("\"hooks\""), "{json}");
}

/// A failing post hook fails like a check: the files go back byte for
/// byte, the commit is marked bad, and the hook is not run again, neither
/// for the restored files nor by the next poll.
#[test]
fn a_failing_post_hook_reverts_byte_exact_and_marks_the_commit_bad() {
    let w = Scratch::new();
    let host = Host::new("h");
    let rec = w.recorder(&host, "/etc/app.conf");
    let repo = app_repo("v1\n", "");
    repo.write("roles/app/files/extra", "extra\n");
    sync(&host, &repo).ok();
    let before = host.tree();
    let fail = w.script(
        "fail",
        &format!("{rec} failing-hook\necho 'migration broke' >&2\nexit 3"),
    );
    set_app(
        &repo,
        "v2\n",
        &format!(
            "[[files]]\npath = \"/etc/new/extra\"\nsource = \"extra\"\n\n{}",
            hook("post", &[&fail], "")
        ),
    );
    let bad = repo.commit("v2 with a failing hook");
    let run = sync(&host, &repo).code(1);
    for want in [
        "hook post roles/app:",
        "(roles/app/role.toml:",
        "exited with 3: migration broke",
        "reverted",
    ] {
        assert!(run.stderr.contains(want), "{want:?} not in {}", run.stderr);
    }
    assert_eq!(host.tree(), before, "the revert is not byte-exact");
    assert!(!host.path("/etc/new").exists());
    assert_eq!(w.read("log"), "failing-hook: v2\n", "the hook ran again");
    let hist = host.run(repo.path(), &["history", "--format", "json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&hist.stdout).unwrap();
    assert_eq!(v["status"]["entries"][0]["outcome"], "reverted");
    assert_eq!(v["status"]["entries"][0]["commit"], bad);
    let again = sync(&host, &repo).ok();
    assert!(again.stdout.contains("marked bad"), "{}", again.stdout);
    assert_eq!(w.read("log"), "failing-hook: v2\n");
}

/// A failing pre hook stops the sync before anything is written: the
/// host and the applied commit stay, the commit is not marked bad, and the
/// next poll tries again.
#[test]
fn a_failing_pre_hook_changes_nothing_on_the_host() {
    let w = Scratch::new();
    let host = Host::new("h");
    let rec = w.recorder(&host, "/etc/app.conf");
    let repo = app_repo("v1\n", "");
    sync(&host, &repo).ok();
    let before = host.tree();
    let inventory = std::fs::read(host.state.path().join("inventory.json")).unwrap();
    let gate = w.script(
        "gate",
        &format!(
            "{rec} gate\n[ -e {} ] || {{ echo 'not ready' >&2; exit 1; }}",
            w.p("ready")
        ),
    );
    set_app(&repo, "v2\n", &hook("pre", &[&gate], ""));
    repo.commit("v2 behind a gate");
    let run = sync(&host, &repo).code(1);
    for want in [
        "a pre hook failed, nothing was changed",
        "exited with 1: not ready",
    ] {
        assert!(run.stderr.contains(want), "{want:?} not in {}", run.stderr);
    }
    assert_eq!(host.tree(), before);
    assert_eq!(
        std::fs::read(host.state.path().join("inventory.json")).unwrap(),
        inventory
    );
    let tx: Vec<_> = std::fs::read_dir(host.state.path().join("tx"))
        .unwrap()
        .collect();
    assert_eq!(tx.len(), 1, "a transaction was started");

    sync(&host, &repo).code(1);
    assert_eq!(w.read("log"), "gate: v1\ngate: v1\n", "not tried again");
    std::fs::write(w.path("ready"), "").unwrap();
    sync(&host, &repo).ok();
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("v2\n"));
}

/// At its timeout a hook's whole process group gets SIGTERM, then
/// SIGKILL: a grandchild that ignores SIGTERM is gone too.
#[test]
fn a_hook_that_times_out_is_killed_with_its_process_group() {
    let w = Scratch::new();
    let host = Host::new("h");
    let repo = app_repo("v1\n", "");
    sync(&host, &repo).ok();
    let before = host.tree();
    let slow = w.script(
        "slow",
        &format!(
            "trap '' TERM\n/bin/sleep 600 &\necho $! > {}\nwait",
            w.p("grandchild")
        ),
    );
    set_app(&repo, "v2\n", &hook("pre", &[&slow], "timeout = \"1s\""));
    repo.commit("v2 with a slow hook");
    let run = sync(&host, &repo).code(1);
    assert!(
        run.stderr
            .contains("timed out after 1s; its process group was killed"),
        "{}",
        run.stderr
    );
    assert_eq!(host.tree(), before);
    let pid: i32 = w.read("grandchild").trim().parse().unwrap();
    assert!(!alive(pid), "the grandchild {pid} survived");
}

/// Running (not a zombie waiting to be reaped).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

/// `kill -9` of the agent while a post hook runs: the next run rolls the
/// files back (the transaction was switched in, not committed) and does
/// not run the hook again; the sync after that applies the commit anew,
/// and runs the hook once, in its own transaction.
#[test]
fn a_kill_during_a_post_hook_rolls_back_and_recovery_does_not_rerun_it() {
    let w = Scratch::new();
    let host = Host::new("h");
    let rec = w.recorder(&host, "/etc/app.conf");
    let fifo = w.path("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    std::fs::write(w.path("block"), "").unwrap();
    let repo = app_repo("v1\n", "");
    sync(&host, &repo).ok();
    let before = host.tree();
    let blocking = w.script(
        "blocking",
        &format!(
            "{rec} post-hook\nif [ -e {block} ]; then /bin/cat {fifo} > /dev/null; fi",
            block = w.p("block"),
            fifo = fifo.display()
        ),
    );
    set_app(&repo, "v2\n", &hook("post", &[&blocking], ""));
    repo.commit("v2");
    let agent = host
        .cmd(repo.path(), &["sync", "--once", "--run-checks"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(agent.id() as i32);
    let waiter = {
        let fifo = fifo.clone();
        let mut agent = agent;
        std::thread::spawn(move || {
            let status = agent.wait().unwrap();
            // Should the agent end before its hook opened the FIFO, this
            // releases the test's open below instead of hanging it.
            let _ = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(&fifo);
            status
        })
    };
    // Opening the FIFO for writing returns once the hook opened it: the
    // hook is running.
    let writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    assert_eq!(w.read("log"), "post-hook: v2\n", "the hook did not run");
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("v2\n"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(waiter.join().unwrap().signal(), Some(9));
    drop(writer);
    std::fs::remove_file(w.path("block")).unwrap();
    assert_eq!(w.read("log"), "post-hook: v2\n");

    // Recovery only: the fetch after it fails on purpose.
    let run = host
        .cmd(repo.path(), &["sync", "--once", "--run-checks"])
        .env("DRIFTLESS_TEST_FAILPOINT", "sync.fetched:error")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("interrupted during its unit actions or health checks"),
        "{stderr}"
    );
    assert_eq!(host.tree(), before, "recovery did not restore the files");
    assert_eq!(w.read("log"), "post-hook: v2\n", "recovery ran the hook");
    assert_no_staged(host.root.path());

    sync(&host, &repo).ok();
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("v2\n"));
    assert_eq!(w.read("log"), "post-hook: v2\npost-hook: v2\n");
}

fn assert_no_staged(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with(".driftless-"), "{}", e.path().display());
        if e.file_type().unwrap().is_dir() {
            assert_no_staged(&e.path());
        }
    }
}

/// Under `--root` without `--run-checks`, hooks are skipped (like checks:
/// they act on the live system), with a warning; the files are applied.
#[test]
fn under_root_without_run_checks_hooks_are_skipped_with_a_warning() {
    let w = Scratch::new();
    let host = Host::new("h");
    let rec = w.recorder(&host, "/etc/app.conf");
    let repo = app_repo("v1\n", &hook("pre", &[&rec, "pre"], ""));
    let run = host.sync(repo.path()).ok();
    assert!(run.stderr.contains("hook skipped"), "{}", run.stderr);
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("v1\n"));
    assert_eq!(w.read("log"), "");
}

/// `user` switches to that user (the agent runs as root here; without
/// root the e2e suite covers the refusal).
#[test]
fn a_hook_runs_as_its_user() {
    if !nix::unistd::geteuid().is_root() {
        return skip::missing("root (a hook's `user` needs it)");
    }
    let w = Scratch::new();
    let host = Host::new("h");
    let who = w.script(
        "who",
        &format!("/usr/bin/id -u > {}\n/usr/bin/id -G >> {0}", w.p("who.out")),
    );
    let repo = app_repo("v1\n", &hook("post", &[&who], "user = \"nobody\""));
    sync(&host, &repo).ok();
    assert_eq!(w.read("who.out"), "65534\n65534\n");
}

/// A `kill -9` at the new failpoints, before a pre hook (nothing of the
/// transaction is written yet) and before a post hook (switched in, not
/// committed): the next sync finds the old files, rolls back what needs
/// it, applies the commit anew and runs each hook once more, in that new
/// transaction; no staged file is left.
#[test]
fn a_kill_at_the_hook_failpoints_converges_to_the_new_commit() {
    for point in ["apply.hook.pre", "post.hook"] {
        let w = Scratch::new();
        let host = Host::new("h");
        let rec = w.recorder(&host, "/etc/app.conf");
        let repo = app_repo("v1\n", "");
        sync(&host, &repo).ok();
        let before = host.tree();
        set_app(
            &repo,
            "v2\n",
            &format!(
                "{}{}",
                hook("pre", &[&rec, "pre"], ""),
                hook("post", &[&rec, "post"], "")
            ),
        );
        repo.commit("v2");
        let out = host
            .cmd(repo.path(), &["sync", "--once", "--run-checks"])
            .env("DRIFTLESS_TEST_FAILPOINT", format!("{point}:kill"))
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(9), "{point}");
        // Killed before the pre hook: nothing ran, nothing changed. Before
        // the post hook: the pre hook ran and the files are switched in.
        let (seen, live) = match point {
            "apply.hook.pre" => ("", "v1\n"),
            _ => ("pre: v1\n", "v2\n"),
        };
        assert_eq!(w.read("log"), seen, "{point}");
        assert_eq!(host.read("/etc/app.conf").as_deref(), Some(live), "{point}");
        if point == "apply.hook.pre" {
            assert_eq!(host.tree(), before, "{point}");
        }
        let run = sync(&host, &repo).ok();
        if point == "post.hook" {
            assert!(
                run.stderr.contains("rolled back a transaction"),
                "{point}: {}",
                run.stderr
            );
        }
        assert_eq!(
            host.read("/etc/app.conf").as_deref(),
            Some("v2\n"),
            "{point}"
        );
        assert_eq!(
            w.read("log"),
            format!("{seen}pre: v1\npost: v2\n"),
            "{point}"
        );
        assert_no_staged(host.root.path());
    }
}

/// A hook's output goes to the log, where the values of its `env` are
/// hidden; the last stderr line is in the error of a failing hook.
#[test]
fn hook_output_is_logged_without_its_environment_values() {
    let w = Scratch::new();
    let host = Host::new("h");
    let repo = app_repo(
        "v1\n",
        &hook(
            "post",
            &["/usr/bin/env"],
            "env = { TOKEN = \"hunter2\", ON = \"1\" }",
        ),
    );
    let run = sync(&host, &repo).ok();
    assert!(!run.stderr.contains("hunter2"), "{}", run.stderr);
    assert!(run.stderr.contains("TOKEN=[env TOKEN]"), "{}", run.stderr);
    assert!(run.stderr.contains("ON=1"), "{}", run.stderr);
    let fail = w.script("fail", "echo \"token was $TOKEN\" >&2\nexit 1");
    set_app(
        &repo,
        "v2\n",
        &hook("post", &[&fail], "env = { TOKEN = \"hunter2\" }"),
    );
    repo.commit("v2");
    let run = sync(&host, &repo).code(1);
    assert!(!run.stderr.contains("hunter2"), "{}", run.stderr);
    assert!(
        run.stderr.contains("exited with 1: token was [env TOKEN]"),
        "{}",
        run.stderr
    );
}
