//! Health-check failures: revert, bad commits, halting. Run under a
//! `--root` prefix with `--run-checks` (command checks); the same paths
//! against a real systemd are in the end-to-end suite.

use crate::support::*;

fn write_role(repo: &Repo, host: &Host, content: &str, check_cmd: &str) {
    repo.write("roles/app/files/app.conf", content);
    repo.write(
        "roles/app/role.toml",
        &format!(
            "[[files]]\npath = \"/etc/app.conf\"\nsource = \"app.conf\"\nmode = \"0640\"\n\n\
             [[checks]]\nname = \"app config is good\"\nretries = 2\ninterval = \"10ms\"\n\
             command = {{ argv = [\"/bin/sh\", \"-c\", {:?}] }}\n",
            check_cmd.replace("ROOT", &host.root.path().display().to_string())
        ),
    );
}

/// A repository whose hosts all take the role `app`, and a host.
fn app_repo_and_host() -> (Repo, Host) {
    let repo = Repo::new();
    repo.write("driftless.toml", "roles = [\"app\"]\n");
    repo.write("hosts/default.toml", "");
    (repo, Host::new("h"))
}

fn sync(host: &Host, repo: &Repo, extra: &[&str]) -> Run {
    let mut args = vec!["sync", "--once", "--run-checks"];
    args.extend_from_slice(extra);
    host.run(repo.path(), &args)
}

#[test]
fn failed_check_reverts_marks_bad_and_is_not_retried() {
    let (repo, host) = app_repo_and_host();
    let check = "grep -q good ROOT/etc/app.conf";
    write_role(&repo, &host, "good\n", check);
    repo.commit("v1");
    sync(&host, &repo, &[]).ok();
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("good\n"));

    write_role(&repo, &host, "broken\n", check);
    let bad = repo.commit("v2 breaks the app");
    let run = sync(&host, &repo, &[]).code(1);
    assert!(
        run.stderr
            .contains("check \"app config is good\" failed after 2 attempt(s)"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("reverted"), "{}", run.stderr);
    assert_eq!(
        host.read("/etc/app.conf").as_deref(),
        Some("good\n"),
        "content must be reverted"
    );
    let hist = host.run(repo.path(), &["history", "--format", "json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&hist.stdout).unwrap();
    assert_eq!(v["status"]["entries"][0]["outcome"], "reverted");
    assert_eq!(v["status"]["entries"][0]["commit"], bad);

    // Not retried: the next sync leaves the host alone.
    let again = sync(&host, &repo, &[]).ok();
    assert!(again.stdout.contains("marked bad"), "{}", again.stdout);
    // `plan` says sync will skip it, and why (it showed it as pending).
    let plan = host.run(repo.path(), &["plan"]).ok();
    assert!(
        plan.stdout.contains("is marked bad") && plan.stdout.contains("app config is good"),
        "{}",
        plan.stdout
    );
    let plan = host.run(repo.path(), &["plan", "--format", "json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&plan.stdout).unwrap();
    assert!(
        v["status"]["skipped"]["marked_bad"]["reason"].is_string(),
        "{}",
        plan.stdout
    );
    // `status` lists it, with the reason, for cron and monitoring.
    let status = host.run(repo.path(), &["status", "--format", "json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    let reason = v["status"]["bad_commits"][&bad]["reason"].as_str();
    assert!(
        reason.is_some_and(|r| r.contains("app config is good")),
        "{}",
        status.stdout
    );
    let text = host.run(repo.path(), &["status"]).ok();
    assert!(
        text.stdout.contains(&format!("bad:      {}", &bad[..12])),
        "{}",
        text.stdout
    );
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("good\n"));

    // A new commit is applied normally.
    write_role(&repo, &host, "good again\n", check);
    repo.commit("v3 fixes it");
    sync(&host, &repo, &[]).ok();
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("good again\n"));
}

/// Review: a drift repair whose checks failed marked the applied commit
/// bad on this host, and every later run skipped it with exit 0 ("commit
/// marked bad"): the host stayed different from its commit, and nothing
/// but the one revert said so. The runs fail, and say why, until a new
/// commit or `--retry`.
#[test]
fn a_failing_drift_repair_leaves_the_runs_failing_not_quietly_skipped() {
    let (repo, host) = app_repo_and_host();
    // Passes while ROOT/flag exists, or for a hand-edited file.
    let check = "test -e ROOT/flag || grep -q hand ROOT/etc/app.conf";
    write_role(&repo, &host, "v1\n", check);
    let v1 = repo.commit("v1");
    std::fs::write(host.path("/flag"), "").unwrap();
    sync(&host, &repo, &[]).ok();

    // The flag gone and the file hand-edited: the repair writes v1, which
    // fails here; the revert puts the edit back.
    std::fs::remove_file(host.path("/flag")).unwrap();
    std::fs::write(host.path("/etc/app.conf"), "hand\n").unwrap();
    let run = sync(&host, &repo, &[]).code(1);
    assert!(run.stderr.contains("reverted"), "{}", run.stderr);
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("hand\n"));

    for _ in 0..2 {
        let again = sync(&host, &repo, &[]).code(1);
        assert!(
            again.stderr.contains(&format!(
                "commit {} is this host's applied commit, but it is marked bad here since",
                &v1[..12]
            )) && again.stderr.contains("app config is good")
                && again.stderr.contains("its drift is not repaired")
                && again
                    .stderr
                    .contains("until a new commit arrives or `driftless sync --retry`"),
            "{}",
            again.stderr
        );
        assert_eq!(host.read("/etc/app.conf").as_deref(), Some("hand\n"));
    }
    // Entered in the history once, not once per run.
    let hist = host.run(repo.path(), &["history", "--format", "json"]).ok();
    let h: serde_json::Value = serde_json::from_str(&hist.stdout).unwrap();
    let outcomes: Vec<&str> = h["status"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["outcome"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(outcomes[..2], ["failed", "reverted"], "{}", hist.stdout);
    // `plan` shows the difference that stays.
    let plan = host.run(repo.path(), &["plan"]).ok();
    assert!(plan.stdout.contains("/etc/app.conf"), "{}", plan.stdout);

    // The operator fixed the host: --retry repairs it, and runs pass again.
    std::fs::write(host.path("/flag"), "").unwrap();
    sync(&host, &repo, &["--retry"]).ok();
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("v1\n"));
    sync(&host, &repo, &[]).ok();
}

#[test]
fn failing_revert_halts_until_retry() {
    let (repo, host) = app_repo_and_host();
    // v1's check holds while the flag is there.
    let flag = host.path("/flag");
    std::fs::write(&flag, "").unwrap();
    write_role(&repo, &host, "v1\n", "test -e ROOT/flag");
    repo.commit("v1");
    sync(&host, &repo, &[]).ok();
    // Something outside driftless breaks the host: v2 fails the same
    // check, and so does the v1 state its revert restores.
    std::fs::remove_file(&flag).unwrap();
    write_role(&repo, &host, "v2\n", "test -e ROOT/flag");
    repo.commit("v2");
    let run = sync(&host, &repo, &[]).code(5);
    assert!(
        run.stderr.contains("stops touching this host")
            && run.stderr.contains("the previous state fails too"),
        "{}",
        run.stderr
    );
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("v1\n"));
    // Halted: even a new commit is not applied.
    write_role(&repo, &host, "v3\n", "true");
    repo.commit("v3");
    let run = sync(&host, &repo, &[]).code(5);
    assert!(run.stderr.contains("halted"), "{}", run.stderr);
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("v1\n"));
    let status = host.run(repo.path(), &["status"]).ok();
    assert!(status.stdout.contains("degraded"), "{}", status.stdout);
    assert!(status.stdout.contains("HALTED"), "{}", status.stdout);
    // A rollback that is refused early leaves the halt in place.
    host.run(repo.path(), &["rollback", "--to", "no-such-commit"])
        .code(1);
    let status = host.run(repo.path(), &["status"]).ok();
    assert!(status.stdout.contains("HALTED"), "{}", status.stdout);
    // The operator clears it.
    sync(&host, &repo, &["--retry"]).ok();
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("v3\n"));
}

#[test]
fn rollback_applies_the_previous_good_commit_and_keeps_it() {
    let repo = simple_repo(&[("/etc/a", "v1\n")]);
    let host = Host::new("h");
    let v1 = repo.head();
    host.sync(repo.path()).ok();
    repo.write("roles/app/files/f0", "v2\n");
    repo.commit("v2");
    host.sync(repo.path()).ok();
    assert_eq!(host.read("/etc/a").as_deref(), Some("v2\n"));

    let run = host.run(repo.path(), &["rollback"]).ok();
    assert!(run.stdout.contains(&v1[..12]), "{}", run.stdout);
    assert_eq!(host.read("/etc/a").as_deref(), Some("v1\n"));
    // The commit rolled back from is not re-applied by the next sync.
    let again = host.sync(repo.path()).ok();
    assert!(again.stdout.contains("marked bad"), "{}", again.stdout);
    assert_eq!(host.read("/etc/a").as_deref(), Some("v1\n"));
    // A new commit is.
    repo.write("roles/app/files/f0", "v3\n");
    repo.commit("v3");
    host.sync(repo.path()).ok();
    assert_eq!(host.read("/etc/a").as_deref(), Some("v3\n"));
    // An explicit target, abbreviated.
    host.run(repo.path(), &["rollback", "--to", &v1[..10]]).ok();
    assert_eq!(host.read("/etc/a").as_deref(), Some("v1\n"));
}

#[test]
fn rollback_without_history_or_with_an_unknown_commit_is_a_clear_error() {
    let repo = simple_repo(&[("/etc/a", "v1\n")]);
    let host = Host::new("h");
    let run = host.run(repo.path(), &["rollback"]).code(1);
    assert!(
        run.stderr.contains("no earlier good commit"),
        "{}",
        run.stderr
    );
    let run = host
        .run(repo.path(), &["rollback", "--to", "deadbeef"])
        .code(1);
    assert!(
        run.stderr.contains("\"deadbeef\" is not a commit"),
        "{}",
        run.stderr
    );
    assert!(host.tree().is_empty());
}

/// The restored state was checked with the failed commit's checks: a
/// commit that added a check (or moved one: a new port) failed it again
/// after its revert, in the state that never had it, and the host was
/// halted (exit 5) until an operator came, for a commit that was already
/// reverted and marked bad. The restored state answers to its own
/// commit's checks.
#[test]
fn a_commit_adding_a_failing_check_is_reverted_without_halting_the_host() {
    let (repo, host) = app_repo_and_host();
    std::fs::write(host.path("/a"), "").unwrap();
    write_role(&repo, &host, "v1\n", "test -e ROOT/a");
    repo.commit("v1");
    sync(&host, &repo, &[]).ok();
    // v2 checks another path, which is not there in either state.
    write_role(&repo, &host, "v2\n", "test -e ROOT/b");
    let bad = repo.commit("v2 checks what is not there");
    let run = sync(&host, &repo, &[]).code(1);
    assert!(
        run.stderr.contains("reverted") && !run.stderr.contains("previous state fails"),
        "{}",
        run.stderr
    );
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("v1\n"));
    let status = host.run(repo.path(), &["status", "--format", "json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert!(v["status"]["halted"].is_null(), "{}", status.stdout);
    assert!(
        v["status"]["bad_commits"][&bad].is_object(),
        "{}",
        status.stdout
    );
    // The restored state's own check passed: the history says reverted.
    let hist = host.run(repo.path(), &["history", "--format", "json"]).ok();
    let h: serde_json::Value = serde_json::from_str(&hist.stdout).unwrap();
    assert_eq!(h["status"]["entries"][0]["outcome"], "reverted");
    // Not halted: the next commit applies.
    write_role(&repo, &host, "v3\n", "test -e ROOT/a");
    repo.commit("v3");
    sync(&host, &repo, &[]).ok();
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("v3\n"));
}

/// When the restored commit's checks cannot be read (the mirror lost
/// it), the revert says so and goes on: the host is not halted on a
/// guess, nor checked against the failed commit's checks.
#[test]
fn restored_checks_that_cannot_be_read_are_said_and_skipped() {
    let (repo, host) = app_repo_and_host();
    write_role(&repo, &host, "v1\n", "true");
    repo.commit("v1");
    sync(&host, &repo, &[]).ok();
    write_role(&repo, &host, "v2\n", "test -e ROOT/never");
    repo.commit("v2");
    let out = host
        .cmd(repo.path(), &["sync", "--once", "--run-checks"])
        .env("DRIFTLESS_TEST_FAILPOINT", "sync.restored-checks:error")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr
            .contains("the restored state is not checked: cannot read the health checks of commit")
            && stderr.contains("reverted"),
        "{stderr}"
    );
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("v1\n"));
    let status = host.run(repo.path(), &["status", "--format", "json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert!(v["status"]["halted"].is_null(), "{}", status.stdout);
}

/// A revert cut short (killed as it began, or during the restored
/// state's checks) left its restored state unchecked: the commit was
/// marked bad, so the syncs after found nothing to do, even with the
/// restored state failing its own checks. The next run checks it (and
/// halts if it fails), as a revert that ran to the end does.
#[test]
fn a_revert_cut_short_has_its_restored_state_checked_by_the_next_run() {
    for (point, restored_passes) in [
        ("apply.revert.started", true),
        ("apply.revert.started", false),
        // The first checks are v2's, the second the restored state's.
        ("post.checks:2", true),
        ("post.checks:2", false),
    ] {
        let repo = Repo::new();
        let host = Host::new("h");
        repo.write("driftless.toml", "roles = [\"app\"]\n");
        repo.write("hosts/default.toml", "");
        let flag = host.path("/flag");
        std::fs::write(&flag, "").unwrap();
        write_role(&repo, &host, "v1\n", "test -e ROOT/flag");
        repo.commit("v1");
        sync(&host, &repo, &[]).ok();
        write_role(&repo, &host, "v2\n", "test -e ROOT/never");
        repo.commit("v2");
        let out = host
            .cmd(repo.path(), &["sync", "--once", "--run-checks"])
            .env("DRIFTLESS_TEST_FAILPOINT", point)
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(9), "{point}");
        // `status` says a check is due.
        let status = host.run(repo.path(), &["status", "--format", "json"]).ok();
        let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
        assert!(
            v["status"]["unchecked_revert"]["commit"].is_string(),
            "{point}: {}",
            status.stdout
        );
        let status = host.run(repo.path(), &["status"]).ok();
        assert!(
            status
                .stdout
                .contains("the restored state is checked by the next run"),
            "{point}: {}",
            status.stdout
        );
        if !restored_passes {
            std::fs::remove_file(&flag).unwrap();
        }
        let run = sync(&host, &repo, &[]);
        assert!(
            run.stderr
                .contains("running the checks of the restored state")
                && (point != "apply.revert.started"
                    || run
                        .stderr
                        .contains("interrupted while it was being reverted")),
            "{point}: {}",
            run.stderr
        );
        assert_eq!(host.read("/etc/app.conf").as_deref(), Some("v1\n"));
        let status = host.run(repo.path(), &["status", "--format", "json"]).ok();
        let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
        if restored_passes {
            run.ok();
            assert!(
                v["status"]["halted"].is_null(),
                "{point}: {}",
                status.stdout
            );
        } else {
            let run = run.code(5);
            assert!(
                run.stderr
                    .contains("the restored state fails its checks too"),
                "{point}: {}",
                run.stderr
            );
            let reason = v["status"]["halted"]["reason"].as_str().unwrap_or_default();
            assert!(
                reason.contains("check \"app config is good\" failed"),
                "{point}: {}",
                status.stdout
            );
        }
        let status = host.run(repo.path(), &["status", "--format", "json"]).ok();
        let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
        assert!(
            v["status"]["unchecked_revert"].is_null(),
            "{point}: {}",
            status.stdout
        );
        // Checked once: the run after does not check it again.
        if restored_passes {
            let again = sync(&host, &repo, &[]).ok();
            assert!(
                !again
                    .stderr
                    .contains("running the checks of the restored state"),
                "{point}: {}",
                again.stderr
            );
        }
    }
}

fn applied_commit(host: &Host, repo: &Repo) -> serde_json::Value {
    let status = host.run(repo.path(), &["status", "--format", "json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    v["status"]["applied"]["commit"].clone()
}

/// A commit that changes no file on this host (another host's file, or
/// only a check) was never recorded as this host's commit: the inventory
/// kept naming the older one, so the fleet saw the host behind (a wave
/// waited for it forever) and a check the commit added never ran. Now its
/// checks run, and it is recorded as applied, or marked bad.
#[test]
fn a_commit_that_changes_no_file_here_is_checked_and_recorded() {
    let (repo, host) = app_repo_and_host();
    write_role(&repo, &host, "v1\n", "true");
    let v1 = repo.commit("v1");
    sync(&host, &repo, &[]).ok();
    assert_eq!(applied_commit(&host, &repo), v1.as_str());

    // Another host's file: nothing changes here.
    repo.write("hosts/other.toml", "[vars]\nx = 1\n");
    let v2 = repo.commit("v2 for another host");
    let run = sync(&host, &repo, &[]).ok();
    assert!(
        run.stderr
            .contains("recorded as applied: it changes no file on this host"),
        "{}",
        run.stderr
    );
    assert_eq!(applied_commit(&host, &repo), v2.as_str());
    // And in the history, which a rollback reads for the previous good
    // commit and for its one-step limit.
    let hist = host.run(repo.path(), &["history", "--format", "json"]).ok();
    let h: serde_json::Value = serde_json::from_str(&hist.stdout).unwrap();
    let newest = &h["status"]["entries"][0];
    assert!(
        newest["outcome"] == "applied"
            && newest["commit"] == v2.as_str()
            && newest["message"] == "no file changes on this host",
        "{}",
        hist.stdout
    );
    // Recorded once: the next sync is a quick-check hit.
    let again = sync(&host, &repo, &[]).ok();
    assert!(
        !again.stderr.contains("recorded as applied")
            && !again.stderr.contains("running the commit's checks"),
        "{}",
        again.stderr
    );

    // Only a check, which fails: marked bad, nothing written, not applied.
    write_role(&repo, &host, "v1\n", "test -e ROOT/never");
    let v3 = repo.commit("v3 adds a failing check");
    let run = sync(&host, &repo, &[]).code(1);
    assert!(
        run.stderr
            .contains("changes no file on this host, but check \"app config is good\" failed")
            && run
                .stderr
                .contains("nothing was written, and the commit is marked bad"),
        "{}",
        run.stderr
    );
    assert_eq!(applied_commit(&host, &repo), v2.as_str());
    let status = host.run(repo.path(), &["status", "--format", "json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert!(
        v["status"]["bad_commits"][&v3].is_object(),
        "{}",
        status.stdout
    );
    assert!(v["status"]["halted"].is_null(), "{}", status.stdout);
    let hist = host.run(repo.path(), &["history", "--format", "json"]).ok();
    let h: serde_json::Value = serde_json::from_str(&hist.stdout).unwrap();
    assert_eq!(
        h["status"]["entries"][0]["outcome"], "reverted",
        "{}",
        hist.stdout
    );
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("v1\n"));
}

/// Review: a commit that changes no file here, arriving while the host
/// failed its own commit's checks (a service down, a host back from a
/// reboot), was marked bad, and on a fleet halted everywhere, for this
/// host's trouble. It is not recorded, and is tried again until the host
/// is healthy.
#[test]
fn a_changeless_commit_on_an_unhealthy_host_is_not_marked_bad() {
    let (repo, host) = app_repo_and_host();
    write_role(&repo, &host, "v1\n", "test -e ROOT/flag");
    std::fs::write(host.path("/flag"), "").unwrap();
    let v1 = repo.commit("v1");
    sync(&host, &repo, &[]).ok();
    std::fs::remove_file(host.path("/flag")).unwrap();
    repo.write("hosts/other.toml", "[vars]\nx = 1\n");
    let v2 = repo.commit("v2 for another host");
    for _ in 0..2 {
        let run = sync(&host, &repo, &[]).code(1);
        assert!(
            run.stderr
                .contains("the host is unhealthy, not the commit. Not recorded"),
            "{}",
            run.stderr
        );
        assert_eq!(applied_commit(&host, &repo), v1.as_str());
        let status = host.run(repo.path(), &["status", "--format", "json"]).ok();
        let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
        assert!(
            v["status"]["bad_commits"][&v2].is_null(),
            "{}",
            status.stdout
        );
    }
    // Healthy again: recorded.
    std::fs::write(host.path("/flag"), "").unwrap();
    let run = sync(&host, &repo, &[]).ok();
    assert!(
        run.stderr
            .contains("recorded as applied: it changes no file on this host"),
        "{}",
        run.stderr
    );
    assert_eq!(applied_commit(&host, &repo), v2.as_str());
}

/// The role of the halt tests: a pre hook that fails while ROOT/block
/// exists, and a check that passes while ROOT/flag exists.
fn hooked_role(repo: &Repo, host: &Host, content: &str) {
    repo.write("roles/app/files/app.conf", content);
    repo.write(
        "roles/app/role.toml",
        &format!(
            "[[files]]\npath = \"/etc/app.conf\"\nsource = \"app.conf\"\n\n\
             [[hooks]]\nwhen = \"pre\"\nargv = [\"/bin/sh\", \"-c\", {:?}]\n\n\
             [[checks]]\nname = \"app config is good\"\nretries = 1\ninterval = \"10ms\"\n\
             command = {{ argv = [\"/bin/sh\", \"-c\", {:?}] }}\n",
            format!("! test -e {}/block", host.root.path().display()),
            format!("test -e {}/flag", host.root.path().display()),
        ),
    );
}

/// v0 and v1 applied; v2 fails, and so does the v1 state its revert
/// restores: halted (exit 5). The commits v0 and v1.
fn halted_after_v2(repo: &Repo, host: &Host) -> (String, String) {
    std::fs::write(host.path("/flag"), "").unwrap();
    hooked_role(repo, host, "v0\n");
    let v0 = repo.commit("v0");
    sync(host, repo, &[]).ok();
    hooked_role(repo, host, "v1\n");
    let v1 = repo.commit("v1");
    sync(host, repo, &[]).ok();
    std::fs::remove_file(host.path("/flag")).unwrap();
    hooked_role(repo, host, "v2\n");
    repo.commit("v2");
    sync(host, repo, &[]).code(5);
    (v0, v1)
}

/// A rollback whose run was killed after its transaction committed, before
/// it lifted the halt: the host stayed halted on the commit it was rolled
/// back to, and the operator's next `rollback` went a second step back.
/// The next run sees the rollback applied and lifts the halt.
#[test]
fn a_rollback_killed_after_its_commit_lifts_the_halt_at_the_next_run() {
    let (repo, host) = app_repo_and_host();
    let (v0, _) = halted_after_v2(&repo, &host);
    std::fs::write(host.path("/flag"), "").unwrap();
    let out = host
        .cmd(repo.path(), &["rollback", "--run-checks"])
        .env("DRIFTLESS_TEST_FAILPOINT", "rollback.applied")
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("v0\n"));
    // The next sync is not halted: it stays on v0 (v1 and v2 are marked
    // bad) and says the halt is lifted.
    let run = sync(&host, &repo, &[]).ok();
    assert!(run.stderr.contains("the halt is lifted"), "{}", run.stderr);
    let json = host.run(repo.path(), &["status", "--format", "json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert!(v["status"]["halted"].is_null(), "{}", json.stdout);
    assert_eq!(
        v["status"]["applied"]["commit"],
        v0.as_str(),
        "{}",
        json.stdout
    );
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("v0\n"));
}

/// An operator's rollback lifted the halt before it applied anything: one
/// whose pre hook failed (nothing changed) left the host unhalted in the
/// state that had failed its checks. The halt goes when the rollback
/// applied.
#[test]
fn a_rollback_that_applies_nothing_leaves_the_halt() {
    let (repo, host) = app_repo_and_host();
    let (_, v1) = halted_after_v2(&repo, &host);
    // The rollback (to v0) is stopped by its pre hook: nothing changed.
    std::fs::write(host.path("/block"), "").unwrap();
    let run = host.run(repo.path(), &["rollback", "--run-checks"]);
    assert_ne!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("a pre hook failed"), "{}", run.stderr);
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("v1\n"));
    let status = host.run(repo.path(), &["status"]).ok();
    assert!(status.stdout.contains("HALTED"), "{}", status.stdout);
    // The commit it stays on is not left marked bad by the failed rollback
    // (its drift would no longer be repaired).
    let json = host.run(repo.path(), &["status", "--format", "json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert!(v["status"]["bad_commits"][&v1].is_null(), "{}", json.stdout);
    // A rollback to the commit the host is on has nothing to apply, or to
    // check: refused, the halt stays.
    let run = host
        .run(repo.path(), &["rollback", "--to", &v1, "--run-checks"])
        .code(2);
    assert!(
        run.stderr.contains("is already this host's applied commit"),
        "{}",
        run.stderr
    );
    let status = host.run(repo.path(), &["status"]).ok();
    assert!(status.stdout.contains("HALTED"), "{}", status.stdout);
    // A rollback that applies lifts it.
    std::fs::remove_file(host.path("/block")).unwrap();
    std::fs::write(host.path("/flag"), "").unwrap();
    host.run(repo.path(), &["rollback", "--run-checks"]).ok();
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("v0\n"));
    let status = host.run(repo.path(), &["status"]).ok();
    assert!(!status.stdout.contains("HALTED"), "{}", status.stdout);
}

/// Issue 14 §2: reverting the first commit on a host (nothing managed
/// before) failed ("nothing to revert") and halted the host. It must work
/// and put back the file that was there before driftless.
#[test]
fn reverting_the_first_commit_restores_the_preexisting_file() {
    let (repo, host) = app_repo_and_host();
    std::fs::create_dir_all(host.path("/etc")).unwrap();
    std::fs::write(host.path("/etc/app.conf"), "good, from the distribution\n").unwrap();
    let before = host.tree();
    write_role(&repo, &host, "broken\n", "grep -q good ROOT/etc/app.conf");
    repo.commit("first commit, broken");
    let run = sync(&host, &repo, &[]).code(1);
    assert!(run.stderr.contains("reverted"), "{}", run.stderr);
    assert!(!run.stderr.contains("halted"), "{}", run.stderr);
    assert_eq!(
        host.tree(),
        before,
        "the host is as before the first commit"
    );
    let status = host.run(repo.path(), &["status", "--format", "json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert!(v["status"]["applied"].is_null(), "{}", status.stdout);
    // Not halted: a fixed commit applies.
    write_role(&repo, &host, "good\n", "grep -q good ROOT/etc/app.conf");
    repo.commit("fixed");
    sync(&host, &repo, &[]).ok();
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("good\n"));
}

/// Issue 12 §7: after the state directory was wiped, the next sync
/// re-applied the commit the operator had rolled back from (the bad mark
/// lived only in the state directory). It is kept beside the
/// anti-rollback record now; `sync --retry` applies it on purpose.
#[test]
fn a_rollback_survives_a_wiped_state_directory() {
    let repo = simple_repo(&[("/etc/a", "v1\n")]);
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    repo.write("roles/app/files/f0", "v2\n");
    let v2 = repo.commit("v2");
    host.sync(repo.path()).ok();
    host.run(repo.path(), &["rollback"]).ok();
    assert_eq!(host.read("/etc/a").as_deref(), Some("v1\n"));

    for e in std::fs::read_dir(host.state.path()).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
    }
    let again = host.sync(repo.path()).ok();
    assert!(again.stdout.contains("marked bad"), "{}", again.stdout);
    assert_eq!(host.read("/etc/a").as_deref(), Some("v1\n"));
    let status = host.run(repo.path(), &["status", "--format", "json"]).ok();
    assert!(status.stdout.contains(&v2), "{}", status.stdout);

    // On purpose: applied, and no longer remembered as rolled back.
    host.run(repo.path(), &["sync", "--once", "--retry"]).ok();
    assert_eq!(host.read("/etc/a").as_deref(), Some("v2\n"));
    let floor = std::fs::read_to_string(host.path("/etc/driftless/applied-commit.json")).unwrap();
    assert!(!floor.contains("rolled_back"), "{floor}");
    repo.write("roles/app/files/f0", "v3\n");
    repo.commit("v3");
    host.sync(repo.path()).ok();
    assert_eq!(host.read("/etc/a").as_deref(), Some("v3\n"));
}

/// The bug this pins: `systemctl stop` (or, for the USB unit, pulling
/// the stick out) sends SIGTERM, whose default action killed a one-pass
/// sync in the middle of its transaction, here its health checks. The
/// sync now finishes the transaction (the check passes: committed) and
/// exits 0; the host is left applied, not half switched until some later
/// run recovers it.
#[test]
fn sigterm_during_the_health_checks_lets_the_sync_finish_its_transaction() {
    let (repo, host) = app_repo_and_host();
    let marks = tempfile::tempdir().unwrap();
    let started = marks.path().join("check-started");
    let release = marks.path().join("release");
    // The check says it started, then waits for the test to let it pass.
    let check = format!(
        "touch {0}; while [ ! -e {1} ]; do sleep 0.02; done; grep -q good ROOT/etc/app.conf",
        started.display(),
        release.display()
    );
    // A check that waits on the test, with time to spare under any load
    // (the default timeout is a few seconds).
    repo.write("roles/app/files/app.conf", "good\n");
    repo.write(
        "roles/app/role.toml",
        &format!(
            "[[files]]\npath = \"/etc/app.conf\"\nsource = \"app.conf\"\n\n\
             [[checks]]\nname = \"app config is good\"\ntimeout = \"300s\"\n\
             command = {{ argv = [\"/bin/sh\", \"-c\", {:?}] }}\n",
            check.replace("ROOT", &host.root.path().display().to_string())
        ),
    );
    repo.commit("v1");
    let mut child = host
        .cmd(repo.path(), &["sync", "--once", "--run-checks"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    // The log, line by line, as it comes.
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !started.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the check never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    // The check is let pass only once the run has taken the signal in.
    let mut log = Vec::new();
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .unwrap_or_else(|e| panic!("no word of the SIGTERM ({e}): {log:#?}"));
        let taken = line.contains("SIGTERM: finishing the transaction");
        log.push(line);
        if taken {
            break;
        }
    }
    std::fs::write(&release, "").unwrap();
    let status = child.wait().unwrap();
    reader.join().unwrap();
    log.extend(lines.try_iter());
    assert_eq!(status.code(), Some(0), "{status:?}\n{log:#?}");
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("good\n"));
    let status = host.run(repo.path(), &["status", "--format", "json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(v["status"]["applied"]["commit"], repo.head(), "{v}");
    assert!(
        std::fs::read_dir(host.state.path().join("tx"))
            .unwrap()
            .flatten()
            .all(|e| e.path().join("committed").exists()),
        "a transaction is left uncommitted"
    );
}

/// A host that applied v1 of the app, a repository at v2, and a sync of
/// it with SIGTERM raised at `failpoint`: its output, and the host's tree
/// before it. After it, a sync must bring v2.
fn sync_v2_with_sigterm_at(
    failpoint: &str,
) -> (Repo, Host, std::process::Output, Vec<(String, Vec<u8>)>) {
    let (repo, host) = app_repo_and_host();
    write_role(&repo, &host, "good\n", "true");
    repo.commit("v1");
    sync(&host, &repo, &[]).ok();
    write_role(&repo, &host, "good, v2\n", "true");
    repo.commit("v2");
    let before = host.tree();
    let out = host
        .cmd(repo.path(), &["sync", "--once", "--run-checks"])
        .env("DRIFTLESS_TEST_FAILPOINT", format!("{failpoint}:term"))
        .output()
        .unwrap();
    (repo, host, out, before)
}

/// SIGTERM before the transaction starts (here, once the plan is made):
/// the run stops at once, by the signal, as it always did (a stop must
/// not wait on a slow fetch), and the host keeps what it had.
#[test]
fn sigterm_outside_a_transaction_stops_the_sync_at_once_with_nothing_changed() {
    let (repo, host, out, before) = sync_v2_with_sigterm_at("sync.planned");
    let stderr = String::from_utf8_lossy(&out.stderr);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGTERM), "{stderr}");
    assert!(!stderr.contains("finishing the transaction"), "{stderr}");
    assert_eq!(host.tree(), before, "the host changed");
    // The next run applies it.
    sync(&host, &repo, &[]).ok();
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("good, v2\n"));
}

/// SIGTERM just as the transaction is about to start (its section open,
/// nothing written yet): the run takes it in, starts nothing, and says so;
/// the host keeps what it had.
#[test]
fn sigterm_as_the_transaction_opens_starts_nothing_and_says_so() {
    let (repo, host, out, before) = sync_v2_with_sigterm_at("sync.applying");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("stopped by SIGTERM before applying")
            && stderr.contains("nothing was changed"),
        "{stderr}"
    );
    assert_eq!(host.tree(), before, "the host changed");
    sync(&host, &repo, &[]).ok();
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("good, v2\n"));
}
