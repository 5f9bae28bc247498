//! Issue 12 §6: a corrupt inventory, marks file or cache stopped the agent
//! forever, with no remedy in the message.

use crate::support::*;

/// A corrupt marks file: the agent halts (exit 5) with the command that
/// resumes it, and `sync --retry` does.
#[test]
fn corrupt_marks_halt_with_the_remedy_instead_of_failing_forever() {
    let repo = simple_repo(&[("/etc/a", "a\n")]);
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    std::fs::write(host.state.path().join("marks.json"), "{\"bad\": 3").unwrap();
    let check = host.run(repo.path(), &["state", "check"]).code(1);
    assert!(check.stdout.contains("marks.json"), "{}", check.stdout);
    let run = host.sync(repo.path()).code(5);
    assert!(run.stderr.contains("sync --retry"), "{}", run.stderr);
    assert!(run.stderr.contains("marks.json.corrupt-"), "{}", run.stderr);
    host.run(repo.path(), &["sync", "--once", "--retry"]).ok();
    host.sync(repo.path()).ok();
    host.run(repo.path(), &["state", "check"]).ok();
}

/// A corrupt inventory is rebuilt from the host: the next sync succeeds
/// and a later commit applies normally.
#[test]
fn a_corrupt_inventory_is_rebuilt_and_the_host_converges() {
    let repo = simple_repo(&[("/etc/a", "a\n")]);
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    std::fs::write(host.state.path().join("inventory.json"), "\0garbage").unwrap();
    std::fs::write(host.state.path().join("last-run.json"), "{").unwrap();
    let run = host.sync(repo.path()).ok();
    assert!(run.stderr.contains("corrupt state file"), "{}", run.stderr);
    assert_eq!(host.read("/etc/a").as_deref(), Some("a\n"));
    repo.write("roles/app/files/f0", "a v2\n");
    repo.commit("v2");
    host.sync(repo.path()).ok();
    assert_eq!(host.read("/etc/a").as_deref(), Some("a v2\n"));
    let check = host.run(repo.path(), &["state", "check"]).ok();
    assert!(
        check.stdout.contains("every file is usable"),
        "{}",
        check.stdout
    );
}

/// A rebuilt inventory takes every file over again, as driftless wrote
/// it: the true original, saved at the first take-over, was replaced by
/// driftless's own content, and releasing the file later "restored" that
/// instead of what the admin had. The saved originals are kept now, and
/// come back with the mode recorded beside them.
#[test]
fn a_rebuilt_inventory_keeps_the_originals_saved_before_it_was_lost() {
    lost_inventory_keeps_originals(|inv| std::fs::write(inv, "\0garbage").unwrap(), true);
}

/// The same when the inventory was deleted by hand (no repair involved).
#[test]
fn a_deleted_inventory_keeps_the_originals_saved_before_it_was_lost() {
    lost_inventory_keeps_originals(|inv| std::fs::remove_file(inv).unwrap(), false);
}

fn lost_inventory_keeps_originals(damage: fn(&std::path::Path), repaired: bool) {
    let repo = simple_repo(&[("/etc/a", "managed\n"), ("/etc/b", "b\n")]);
    let host = Host::new("h");
    std::fs::create_dir_all(host.path("/etc")).unwrap();
    std::fs::write(host.path("/etc/a"), "the admin's original\n").unwrap();
    // Private; the repository manages it as 0644.
    std::fs::set_permissions(
        host.path("/etc/a"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    host.sync(repo.path()).ok();
    assert_eq!(host.read("/etc/a").as_deref(), Some("managed\n"));
    damage(&host.state.path().join("inventory.json"));
    std::fs::remove_file(host.state.path().join("inventory.delta")).ok();
    let run = host.sync(repo.path()).ok();
    assert_eq!(
        run.stderr.contains("corrupt state file"),
        repaired,
        "{}",
        run.stderr
    );
    // Once a commit is recorded again, a take-over refreshes a stale copy
    // as before; this release restores the one saved first.
    // The repository lets go of /etc/a: its original comes back.
    repo.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/b\"\nsource = \"f1\"\n",
    );
    repo.commit("stop managing /etc/a");
    host.sync(repo.path()).ok();
    assert_eq!(
        host.read("/etc/a").as_deref(),
        Some("the admin's original\n")
    );
    // With its own mode, not the one driftless wrote (which the rebuilt
    // inventory recorded).
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(host.path("/etc/a"))
                .unwrap()
                .permissions()
        ) & 0o777,
        0o600
    );
}

/// The other side of keeping originals while no commit is recorded: a
/// first sync whose check failed was reverted, but the copy it saved
/// stayed, and the next sync (still no commit recorded) kept that copy
/// over the admin's edit made in between: a later release restored the
/// file as it was before the edit. The undo removes the copies its
/// transaction made.
#[test]
fn a_reverted_first_sync_leaves_no_original_that_outlives_an_edit() {
    let repo = simple_repo(&[("/etc/a", "managed\n"), ("/etc/b", "b\n")]);
    let host = Host::new("h");
    std::fs::create_dir_all(host.path("/etc")).unwrap();
    std::fs::write(host.path("/etc/a"), "first\n").unwrap();
    let role = "[[files]]\npath = \"/etc/a\"\nsource = \"f0\"\n\n[[files]]\npath = \"/etc/b\"\nsource = \"f1\"\n";
    repo.write(
        "roles/app/role.toml",
        // Passes only on the file as it was: fails the new commit, not
        // the state the revert puts back.
        &format!(
            "{role}\n[[checks]]\nname = \"no\"\nretries = 1\ninterval = \"10ms\"\ncommand = {{ argv = [\"/usr/bin/grep\", \"-q\", \"first\", {:?}] }}\n",
            host.path("/etc/a").display().to_string()
        ),
    );
    repo.commit("v1: its check fails");
    // (Checks run under --root only when asked.)
    let run = host
        .run(repo.path(), &["sync", "--once", "--run-checks"])
        .code(1);
    assert!(run.stderr.contains("reverted"), "{}", run.stderr);
    assert_eq!(host.read("/etc/a").as_deref(), Some("first\n"));
    std::fs::write(host.path("/etc/a"), "edited\n").unwrap();
    repo.write("roles/app/role.toml", role);
    repo.commit("v2: no check");
    host.sync(repo.path()).ok();
    repo.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/b\"\nsource = \"f1\"\n",
    );
    repo.commit("v3: stop managing /etc/a");
    host.sync(repo.path()).ok();
    assert_eq!(host.read("/etc/a").as_deref(), Some("edited\n"));
}

/// `inventory.delta` deleted by hand: its base alone still reads as a
/// whole inventory, only an older one, and was believed: the commits the
/// delta recorded were silently forgotten. The kept committed transaction
/// that the inventory does not name gives it away: `state check` reports
/// it, and the next sync rebuilds the inventory like a corrupt one.
#[test]
fn a_deleted_inventory_delta_is_caught_instead_of_silently_forgetting_commits() {
    let repo = simple_repo(&[("/etc/a", "a\n")]);
    let mut host = Host::new("h");
    host.env
        .push(("DRIFTLESS_TEST_INVENTORY_LOG_FROM".into(), "1".into()));
    host.sync(repo.path()).ok();
    repo.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/a\"\nsource = \"f0\"\n\n[[files]]\npath = \"/etc/b\"\nsource = \"f1\"\n",
    );
    repo.write("roles/app/files/f1", "b\n");
    repo.commit("v2: adds /etc/b");
    host.sync(repo.path()).ok();
    let delta = host.state.path().join("inventory.delta");
    assert!(delta.exists(), "the second commit appended to the delta");
    // Intact, the state is consistent.
    host.run(repo.path(), &["state", "check"]).ok();

    // The first commit's transaction set aside as corrupt (recovery does
    // that to a committed journal that does not read) exempted the txid
    // the base names from the check for good: the later commit still
    // gives the stale base away.
    let base = std::fs::read_to_string(host.state.path().join("inventory.json")).unwrap();
    let first = base
        .split_once("\"txid\": \"")
        .and_then(|(_, r)| r.split_once('"'))
        .map(|(t, _)| t.to_string())
        .expect("the base names its transaction");
    std::fs::create_dir(host.state.path().join(format!("tx-corrupt-{first}"))).unwrap();
    host.run(repo.path(), &["state", "check"]).ok();

    std::fs::remove_file(&delta).unwrap();
    let check = host.run(repo.path(), &["state", "check"]).code(1);
    assert!(
        check.stdout.contains("inventory.json")
            && check.stdout.contains("was committed after it")
            && check.stdout.contains("inventory.delta deleted"),
        "{}",
        check.stdout
    );
    let run = host.sync(repo.path()).ok();
    assert!(run.stderr.contains("corrupt state file"), "{}", run.stderr);
    assert!(host.state.path().read_dir().unwrap().flatten().any(|e| e
        .file_name()
        .to_string_lossy()
        .starts_with("inventory.json.corrupt-")));
    assert_eq!(host.read("/etc/a").as_deref(), Some("a\n"));
    assert_eq!(host.read("/etc/b").as_deref(), Some("b\n"));
    let check = host.run(repo.path(), &["state", "check"]).ok();
    assert!(
        check.stdout.contains("every file is usable"),
        "{}",
        check.stdout
    );
}

/// The floor is never guessed: `state repair` reports it and leaves it.
#[test]
fn a_corrupt_floor_is_refused_with_the_command_that_resolves_it() {
    let repo = simple_repo(&[("/etc/a", "a\n")]);
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    let floor = host.path("/etc/driftless/applied-commit.json");
    std::fs::write(&floor, "not json").unwrap();
    let run = host.sync(repo.path());
    assert_ne!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("applied-commit.json"), "{}", run.stderr);
    let rep = host.run(repo.path(), &["state", "repair"]).ok();
    assert!(
        rep.stdout.contains(&format!("rm {}", floor.display())),
        "{}",
        rep.stdout
    );
    assert_eq!(std::fs::read_to_string(&floor).unwrap(), "not json");
}

/// Issue 12 §6: a flipped bit that still parses (a digit of the applied
/// commit) was believed. State files carry a checksum now: the inventory
/// is then rebuilt like any corrupt one, and the anti-rollback record is
/// refused with its remedy, never trusted.
#[test]
fn a_flipped_bit_that_still_parses_is_caught_by_the_checksum() {
    let repo = simple_repo(&[("/etc/a", "a\n")]);
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    let commit = repo.head();
    let flip = |p: &std::path::Path| {
        let text = std::fs::read_to_string(p).unwrap();
        assert!(text.contains(&commit), "{text}");
        let last = commit.chars().last().unwrap();
        let other = if last == '0' { '1' } else { '0' };
        let flipped = format!("{}{other}", &commit[..commit.len() - 1]);
        std::fs::write(p, text.replace(&commit, &flipped)).unwrap();
    };
    flip(&host.state.path().join("inventory.json"));
    let run = host.sync(repo.path()).ok();
    assert!(run.stderr.contains("checksum"), "{}", run.stderr);
    assert_eq!(host.read("/etc/a").as_deref(), Some("a\n"));

    flip(&host.path("/etc/driftless/applied-commit.json"));
    let run = host.sync(repo.path()).code(1);
    assert!(
        run.stderr.contains("applied-commit.json") && run.stderr.contains("checksum"),
        "{}",
        run.stderr
    );
}

/// Every file under the state directory with its content, sorted.
fn state_files(host: &Host) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![host.state.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let rel = e
                .path()
                .strip_prefix(host.state.path())
                .unwrap()
                .display()
                .to_string();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
                out.push((format!("{rel}/"), Vec::new()));
            } else {
                out.push((rel, std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Rewrites the envelope of a state file as a newer driftless would
/// (format 5, one past what this agent knows; the checksum covers `data`
/// only, so it still holds).
fn bump_format(path: &std::path::Path) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains("\"driftless_state\": 1,"), "{text}");
    std::fs::write(
        path,
        text.replacen("\"driftless_state\": 1,", "\"driftless_state\": 5,", 1),
    )
    .unwrap();
}

/// The single transaction directory of the state.
fn only_tx(host: &Host) -> std::path::PathBuf {
    let mut txs: Vec<_> = std::fs::read_dir(host.state.path().join("tx"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(txs.len(), 1, "{txs:?}");
    txs.remove(0)
}

/// Asserts that a sync and `state repair` refuse the newer `file`, name it
/// and the remedy, and change nothing: every state file and every file of
/// the root stays byte-identical (nothing moved aside, rebuilt, rolled
/// back or recorded).
#[track_caller]
fn refused_and_untouched(host: &Host, repo: &Repo, file: &std::path::Path) {
    let state = state_files(host);
    let tree = host.tree();
    let run = host.sync(repo.path()).code(1);
    let err = run
        .stderr
        .lines()
        .rfind(|l| l.starts_with("error:"))
        .unwrap_or_default();
    for want in [
        &file.display().to_string(),
        "written by a newer driftless",
        "format 5; this agent knows up to format 4",
        "upgrade the agent",
    ] {
        assert!(
            err.contains(want),
            "{want:?} not in {err:?}\n{}",
            run.stderr
        );
    }
    assert!(!run.stderr.contains("corrupt"), "{}", run.stderr);
    let check = host.run(repo.path(), &["state", "check"]).code(1);
    assert!(
        check.stdout.contains("upgrade the agent"),
        "{}",
        check.stdout
    );
    let repair = host.run(repo.path(), &["state", "repair"]);
    assert_ne!(repair.code, 0, "{}", repair.stdout);
    assert!(
        repair.stderr.contains("written by a newer driftless"),
        "{}",
        repair.stderr
    );
    assert_eq!(state_files(host), state, "a state file changed");
    assert_eq!(host.tree(), tree, "a managed file changed");
}

/// Step 0 of docs/design/resources.md: an inventory or a journal written
/// by a newer driftless (envelope `driftless_state` 3) is refused, not
/// moved aside and rebuilt as a corrupt one was: it may record what only
/// the newer agent can undo.
#[test]
fn a_newer_format_inventory_is_refused_and_left_untouched() {
    let repo = simple_repo(&[("/etc/a", "a\n")]);
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    let inv = host.state.path().join("inventory.json");
    bump_format(&inv);
    // A newer agent's commit leaves no quick record of this agent's.
    std::fs::remove_file(host.state.path().join("quick.json")).ok();
    refused_and_untouched(&host, &repo, &inv);
    repo.write("roles/app/files/f0", "a v2\n");
    repo.commit("v2");
    refused_and_untouched(&host, &repo, &inv);
}

/// The committed transaction's journal (set aside as `tx-corrupt-*` when
/// corrupt), the journal of an interrupted one and its intent are refused.
#[test]
fn a_newer_format_journal_or_intent_is_refused_and_left_untouched() {
    // Committed.
    let repo = simple_repo(&[("/etc/a", "a\n"), ("/etc/b", "b\n")]);
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    let journal = only_tx(&host).join("journal.json");
    bump_format(&journal);
    std::fs::remove_file(host.state.path().join("quick.json")).ok();
    refused_and_untouched(&host, &repo, &journal);

    // Interrupted after one switch operation (`journal.json`), and before
    // the journal existed (`intent.json`).
    for (point, file) in [
        ("apply.switch:1", "journal.json"),
        ("apply.staged", "intent.json"),
    ] {
        let repo = simple_repo(&[("/etc/a", "a\n"), ("/etc/b", "b\n")]);
        let host = Host::new("h");
        host.sync(repo.path()).ok();
        let first = only_tx(&host);
        repo.write("roles/app/files/f0", "a v2\n");
        repo.write("roles/app/files/f1", "b v2\n");
        repo.commit("v2");
        let out = host
            .cmd(repo.path(), &["sync", "--once"])
            .env("DRIFTLESS_TEST_FAILPOINT", format!("{point}:kill"))
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(9), "{point}");
        let tx = std::fs::read_dir(host.state.path().join("tx"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| *p != first)
            .unwrap();
        if file == "intent.json" {
            assert!(!tx.join("journal.json").exists(), "{point}");
        }
        bump_format(&tx.join(file));
        refused_and_untouched(&host, &repo, &tx.join(file));
    }
}

/// Format 1 is still what a sync writes: an agent of before the format
/// number (or after a downgrade) reads it.
#[test]
fn state_files_of_a_files_only_host_stay_format_1() {
    let repo = simple_repo(&[("/etc/a", "a\n")]);
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    let tx = only_tx(&host);
    for f in [
        host.state.path().join("inventory.json"),
        tx.join("journal.json"),
    ] {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            text.contains("\n  \"driftless_state\": 1,\n"),
            "{}: {text}",
            f.display()
        );
    }
}
