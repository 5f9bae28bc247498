//! The quick check: an idle sync proves "nothing changed" from stamps
//! alone, and never misses a change the full path would see.

use crate::support::*;

const QUICK: &str = "(quick check)";

/// Syncs until the quick check holds. The sync right after an apply may
/// take the full path once (a file written in the same clock tick as the
/// record is not trusted), so it holds by the third sync at the latest.
fn settle(host: &Host, repo: &Repo) -> Run {
    let mut runs = Vec::new();
    for _ in 0..3 {
        let run = host.sync(repo.path()).ok();
        if run.stdout.contains(QUICK) {
            return run;
        }
        runs.push(run.stdout);
    }
    panic!("the quick check never held over 3 idle syncs: {runs:#?}");
}

fn templated_repo() -> Repo {
    let r = Repo::new();
    r.write(
        "driftless.toml",
        "roles = [\"app\"]\n[vars]\ngreeting = \"hello\"\n",
    );
    r.write("hosts/default.toml", "");
    r.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/app/a.conf\"\ntemplate = \"a.tera\"\n\n\
         [[files]]\npath = \"/etc/app/b.conf\"\nsource = \"b\"\nmode = \"0640\"\n",
    );
    r.write(
        "roles/app/files/a.tera",
        "{{ vars.greeting }} from {{ host.name }}\n",
    );
    r.write("roles/app/files/b", "static\n");
    r.commit("initial");
    r
}

#[test]
fn an_idle_sync_takes_the_quick_check_and_writes_nothing() {
    let repo = templated_repo();
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    let before = host.tree();
    let run = settle(&host, &repo);
    assert!(run.stdout.contains("2 file(s) unchanged"), "{}", run.stdout);
    assert_eq!(host.tree(), before);
}

/// The bug this pins: an edit that keeps the size and puts the mtime back
/// (what `cp -p` or a careful attacker does) must still be seen. Only the
/// ctime, which userspace cannot set, gives it away.
#[test]
fn an_edit_that_keeps_size_and_mtime_is_still_repaired() {
    let repo = templated_repo();
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    settle(&host, &repo);
    let path = host.path("/etc/app/a.conf");
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    assert_eq!(host.read("/etc/app/a.conf").unwrap(), "hello from h\n");
    std::fs::write(&path, "HELLO from h\n").unwrap();
    let f = std::fs::File::options().write(true).open(&path).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);
    let run = host.sync(repo.path()).ok();
    assert!(run.stdout.contains("1 changed"), "{}", run.stdout);
    assert_eq!(host.read("/etc/app/a.conf").unwrap(), "hello from h\n");
}

#[test]
fn a_mode_change_a_deletion_and_a_replacement_are_each_repaired() {
    use std::os::unix::fs::PermissionsExt;
    let repo = templated_repo();
    let host = Host::new("h");
    host.sync(repo.path()).ok();

    settle(&host, &repo);
    std::fs::set_permissions(
        host.path("/etc/app/b.conf"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let run = host.sync(repo.path()).ok();
    assert!(run.stdout.contains("1 changed"), "{}", run.stdout);
    let mode = std::fs::metadata(host.path("/etc/app/b.conf"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o640);

    settle(&host, &repo);
    std::fs::remove_file(host.path("/etc/app/a.conf")).unwrap();
    let run = host.sync(repo.path()).ok();
    assert!(run.stdout.contains("1 created"), "{}", run.stdout);
    assert_eq!(host.read("/etc/app/a.conf").unwrap(), "hello from h\n");

    settle(&host, &repo);
    // Same bytes, new inode (an editor that writes a copy and renames it).
    let tmp = host.path("/etc/app/.a.conf.swp");
    std::fs::write(&tmp, "hello from h\n").unwrap();
    std::fs::rename(&tmp, host.path("/etc/app/a.conf")).unwrap();
    let run = host.sync(repo.path()).ok();
    assert!(
        !run.stdout.contains(QUICK),
        "a replaced file must be looked at: {}",
        run.stdout
    );
    assert!(run.stdout.contains("nothing written"), "{}", run.stdout);
}

#[test]
fn a_new_commit_and_a_changed_account_database_take_the_full_path() {
    let repo = templated_repo();
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    settle(&host, &repo);

    repo.write(
        "driftless.toml",
        "roles = [\"app\"]\n[vars]\ngreeting = \"bonjour\"\n",
    );
    repo.commit("greet in French");
    let run = host.sync(repo.path()).ok();
    assert!(run.stdout.contains("1 changed"), "{}", run.stdout);
    assert_eq!(host.read("/etc/app/a.conf").unwrap(), "bonjour from h\n");

    settle(&host, &repo);
    // Owner names resolve through etc/passwd under --root: a change there
    // may change the uid a file must have.
    std::fs::create_dir_all(host.path("/etc")).unwrap();
    std::fs::write(host.path("/etc/passwd"), "app:x:1234:1234::/:/bin/false\n").unwrap();
    let run = host.sync(repo.path()).ok();
    assert!(!run.stdout.contains(QUICK), "{}", run.stdout);
}

#[test]
fn full_flag_and_a_corrupt_record_fall_back_to_comparing_every_file() {
    let repo = templated_repo();
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    settle(&host, &repo);

    let run = host.run(repo.path(), &["sync", "--once", "--full"]).ok();
    assert!(!run.stdout.contains(QUICK), "{}", run.stdout);
    assert!(
        run.stdout.contains("2 file(s) as desired"),
        "{}",
        run.stdout
    );

    let record = host.state.path().join("quick.json");
    assert!(record.exists(), "the full sync records the stamps again");
    std::fs::write(&record, "{ not json").unwrap();
    let run = host.sync(repo.path()).ok();
    assert!(!run.stdout.contains(QUICK), "{}", run.stdout);
    // ... and rebuilds the record, so the host is quick again.
    settle(&host, &repo);
}

#[test]
fn timings_name_the_stages_and_the_quick_path_skips_rendering() {
    let repo = templated_repo();
    let host = Host::new("h");
    let run = host.run(repo.path(), &["sync", "--once", "--timings"]).ok();
    for stage in [
        "fetch",
        "read-tree",
        "render",
        "observe",
        "write",
        "flush",
        "commit",
        "total",
    ] {
        assert!(
            run.stderr.contains(&format!("timing: {stage} ")),
            "no {stage} line in:\n{}",
            run.stderr
        );
    }
    settle(&host, &repo);
    let run = host.run(repo.path(), &["sync", "--once", "--timings"]).ok();
    assert!(run.stdout.contains(QUICK), "{}", run.stdout);
    assert!(
        run.stderr.contains("timing: quick-check "),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("timing: render "), "{}", run.stderr);
    assert!(!run.stderr.contains("timing: read-tree "), "{}", run.stderr);
}

/// Stamps are taken after the files are written: a record must never be
/// older than the writes it vouches for.
#[test]
fn the_record_is_newer_than_every_file_it_vouches_for() {
    let repo = templated_repo();
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    let record = std::fs::metadata(host.state.path().join("quick.json"))
        .unwrap()
        .modified()
        .unwrap();
    for target in ["/etc/app/a.conf", "/etc/app/b.conf"] {
        let m = std::fs::metadata(host.path(target))
            .unwrap()
            .modified()
            .unwrap();
        assert!(
            m <= record,
            "{target} modified at {m:?}, after the record at {record:?}"
        );
    }
}
