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

/// The role of [`templated_repo`]: a template and a source of mode 0640.
const ROLE: &str = "[[files]]\npath = \"/etc/app/a.conf\"\ntemplate = \"a.tera\"\n\n\
                    [[files]]\npath = \"/etc/app/b.conf\"\nsource = \"b\"\nmode = \"0640\"\n";

fn templated_repo() -> Repo {
    let r = Repo::new();
    r.write(
        "driftless.toml",
        "roles = [\"app\"]\n[vars]\ngreeting = \"hello\"\n",
    );
    r.write("hosts/default.toml", "");
    r.write("roles/app/role.toml", ROLE);
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
    // Not even the same bytes written again: inodes and times stay.
    let stamps = host.stamps();
    let run = host.sync(repo.path()).ok();
    assert!(run.stdout.contains(QUICK), "{}", run.stdout);
    assert_eq!(host.stamps(), stamps, "an idle sync touched a file");
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
    let record = std::fs::metadata(host.state.path().join("quick.delta"))
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

/// A repository exercising every way a file can depend on others: a
/// shared partial under `templates/`, a role partial included by one
/// template, a static source, a variable.
fn layered_repo() -> Repo {
    let r = Repo::new();
    r.write(
        "driftless.toml",
        "roles = [\"app\"]\n[vars]\nname = \"one\"\n",
    );
    r.write("hosts/default.toml", "");
    let mut role = String::new();
    for (target, spec) in [
        ("/etc/app/plain.conf", "template = \"plain.tera\""),
        ("/etc/app/shared.conf", "template = \"shared.tera\""),
        ("/etc/app/partial.conf", "template = \"uses-partial.tera\""),
        ("/etc/app/static.conf", "source = \"static\""),
        ("/etc/app/other.conf", "template = \"other.tera\""),
    ] {
        role.push_str(&format!("[[files]]\npath = \"{target}\"\n{spec}\n\n"));
    }
    r.write("roles/app/role.toml", &role);
    r.write("roles/app/files/plain.tera", "plain {{ vars.name }}\n");
    r.write(
        "roles/app/files/shared.tera",
        "{% include \"templates/header.tera\" %}shared {{ vars.name }}\n",
    );
    r.write(
        "roles/app/files/uses-partial.tera",
        "{% include \"roles/app/files/part.tera\" %}\n",
    );
    r.write("roles/app/files/part.tera", "part v1");
    r.write("roles/app/files/static", "static v1\n");
    r.write("roles/app/files/other.tera", "other\n");
    r.write("templates/header.tera", "# header v1\n");
    r.commit("v1");
    r
}

/// What a fresh host gets from a full sync of the repository as it is.
#[track_caller]
fn assert_same_as_a_full_sync(host: &Host, repo: &Repo, step: &str) {
    let fresh = Host::new(&host.name);
    fresh.run(repo.path(), &["sync", "--once", "--full"]).ok();
    let strip = |t: Vec<(String, Vec<u8>)>| -> Vec<(String, Vec<u8>)> {
        t.into_iter()
            .filter(|(p, _)| !p.starts_with("/etc/driftless/"))
            .collect()
    };
    assert_eq!(
        strip(host.tree()),
        strip(fresh.tree()),
        "{step}: the host differs from a full sync of the same commit"
    );
}

/// The bug this pins: updating only the files a commit touched must never
/// leave a file that depends on the change (an include, a shared partial,
/// a variable) behind.
#[test]
fn commits_update_exactly_what_a_full_sync_would() {
    let repo = layered_repo();
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    settle(&host, &repo);

    const FULL: &str = "updating only what changed is not possible";
    // (step, file, new content, expected in stdout, only what changed?)
    let steps: &[(&str, &str, &str, &str, bool)] = &[
        (
            "a template",
            "roles/app/files/plain.tera",
            "plain v2 {{ vars.name }}\n",
            "1 changed",
            true,
        ),
        (
            "a role partial included by another template",
            "roles/app/files/part.tera",
            "part v2",
            "1 changed",
            true,
        ),
        (
            "a static source",
            "roles/app/files/static",
            "static v2\n",
            "1 changed",
            true,
        ),
        (
            "a shared partial",
            "templates/header.tera",
            "# header v2\n",
            "1 changed",
            false,
        ),
        (
            "a variable",
            "driftless.toml",
            "roles = [\"app\"]\n[vars]\nname = \"two\"\n",
            "2 changed",
            false,
        ),
        (
            "a file no template uses",
            "roles/app/files/unused.tera",
            "unused\n",
            "nothing written",
            true,
        ),
        (
            "a template that starts including a role partial",
            "roles/app/files/other.tera",
            "{% include \"roles/app/files/part.tera\" %} other\n",
            "1 changed",
            true,
        ),
        (
            "the partial it now includes",
            "roles/app/files/part.tera",
            "part v3",
            "2 changed",
            true,
        ),
    ];
    for (step, file, content, expect, partial) in steps {
        repo.write(file, content);
        repo.commit(step);
        let run = host
            .run(repo.path(), &["sync", "--once", "-v", "--timings"])
            .ok();
        assert!(
            run.stdout.contains(expect),
            "{step}: expected {expect:?} in:\n{}",
            run.stdout
        );
        assert_eq!(
            !run.stderr.contains(FULL),
            *partial,
            "{step}: expected {} path:\n{}",
            if *partial { "the partial" } else { "the full" },
            run.stderr
        );
        // Only the full path reads the new commit's tree whole; updating
        // only what changed reads the entries it needs.
        assert_eq!(
            run.stderr.contains("timing: read-tree "),
            !*partial,
            "{step}:\n{}",
            run.stderr
        );
        assert_same_as_a_full_sync(&host, &repo, step);
        settle(&host, &repo);
    }
}

/// A drift repair renders only the drifted file; the record it writes
/// must keep, for every other file, whether it depends on more than its
/// own template. The bug this guards against: a file that includes a role
/// partial recorded as self-contained after a repair of another file, so
/// that the next commit changing the partial left it stale.
#[test]
fn after_a_drift_repair_a_changed_partial_still_renders_the_file_that_includes_it() {
    let repo = layered_repo();
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    settle(&host, &repo);
    std::fs::write(host.path("/etc/app/plain.conf"), "edited\n").unwrap();
    let run = host.sync(repo.path()).ok();
    assert!(run.stdout.contains("1 changed"), "{}", run.stdout);
    settle(&host, &repo);
    repo.write("roles/app/files/part.tera", "part v2");
    repo.commit("the partial");
    let run = host.sync(repo.path()).ok();
    assert!(run.stdout.contains("1 changed"), "{}", run.stdout);
    assert_eq!(host.read("/etc/app/partial.conf").unwrap(), "part v2\n");
    assert_same_as_a_full_sync(&host, &repo, "a partial after a drift repair");
}

#[test]
fn drift_and_a_new_commit_together_are_both_applied() {
    let repo = layered_repo();
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    settle(&host, &repo);
    std::fs::write(host.path("/etc/app/other.conf"), "edited\n").unwrap();
    repo.write("roles/app/files/plain.tera", "plain v2\n");
    repo.commit("v2");
    let run = host.sync(repo.path()).ok();
    assert!(run.stdout.contains("2 changed"), "{}", run.stdout);
    assert_same_as_a_full_sync(&host, &repo, "drift + commit");
}

/// The new record keeps the stamps the quick check verified at the start
/// of the run for every file the run did not write (no second `lstat` of
/// 10,000 files). The bug this pins, had the record stamped every file
/// again after the unit actions and hooks: a managed file something else
/// rewrote during the sync (here a post hook) was vouched for as it was
/// then, and the idle polls after it never repaired it.
#[test]
fn a_file_rewritten_during_a_sync_is_repaired_at_the_next_poll() {
    let scratch = tempfile::tempdir().unwrap();
    let flag = scratch.path().join("tamper");
    let host = Host::new("h");
    let script = scratch.path().join("hook");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ -e {flag} ] && echo tampered >> {b}\nexit 0\n",
            flag = flag.display(),
            b = host.path("/etc/app/b.conf").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let repo = Repo::new();
    repo.write("driftless.toml", "roles = [\"app\"]\n");
    repo.write("hosts/default.toml", "");
    repo.write(
        "roles/app/role.toml",
        &format!(
            "[[files]]\npath = \"/etc/app/a.conf\"\nsource = \"a\"\n\n\
             [[files]]\npath = \"/etc/app/b.conf\"\nsource = \"b\"\n\n\
             [[hooks]]\nwhen = \"post\"\nargv = [{:?}]\n",
            script.display().to_string()
        ),
    );
    repo.write("roles/app/files/a", "one\n");
    repo.write("roles/app/files/b", "static\n");
    repo.commit("initial");
    let sync = || {
        host.run(repo.path(), &["sync", "--once", "--run-checks"])
            .ok()
    };
    sync();
    // Until the quick check holds: the next sync starts from a verified record.
    let settled = (0..3).any(|_| sync().stdout.contains(QUICK));
    assert!(settled, "the quick check never held");

    std::fs::write(&flag, "").unwrap();
    repo.write("roles/app/files/a", "two\n");
    repo.commit("a changes; the hook rewrites b while it runs");
    let run = sync();
    assert!(run.stdout.contains("1 changed"), "{}", run.stdout);
    assert_eq!(
        host.read("/etc/app/b.conf").as_deref(),
        Some("static\ntampered\n")
    );
    std::fs::remove_file(&flag).unwrap();

    let next = sync();
    assert!(
        !next.stdout.contains(QUICK) && next.stdout.contains("1 changed"),
        "the rewritten file was vouched for: {}",
        next.stdout
    );
    assert_eq!(host.read("/etc/app/b.conf").as_deref(), Some("static\n"));
}

/// The loaded configuration is kept (`config.cache`) for a sync that
/// provably loads the same one again: a commit that changed only the
/// content of role files. The bug this guards against: a cached
/// configuration used after the role file itself changed, or a damaged
/// cache believed.
#[test]
fn the_configuration_cache_serves_only_commits_that_left_the_configuration_alone() {
    use std::os::unix::fs::PermissionsExt;
    let repo = templated_repo();
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    settle(&host, &repo);
    let cache = host.state.path().join("config.cache");
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "config.cache mode {mode:o}");
    let sync = |step: &str, cached: bool| {
        let run = host.run(repo.path(), &["sync", "--once", "--timings"]).ok();
        // (`load-cached` is the attempt; `load` follows it on a miss.)
        assert!(
            run.stderr.contains("timing: load-cached ") || !cached,
            "{step}: expected the cache used:\n{}",
            run.stderr
        );
        assert_eq!(
            run.stderr.contains("timing: load "),
            !cached,
            "{step}: a load from the repository {}expected:\n{}",
            if cached { "not " } else { "" },
            run.stderr
        );
        assert_same_as_a_full_sync(&host, &repo, step);
    };

    repo.write("roles/app/files/a.tera", "v2 {{ vars.greeting }}\n");
    repo.commit("a template");
    sync("a template", true);
    assert_eq!(host.read("/etc/app/a.conf").unwrap(), "v2 hello\n");

    // The role file itself: loaded again, and the new mode applied.
    repo.write("roles/app/role.toml", &ROLE.replace("0640", "0600"));
    repo.commit("a mode");
    sync("a mode", false);
    let b = std::fs::metadata(host.path("/etc/app/b.conf")).unwrap();
    assert_eq!(b.permissions().mode() & 0o777, 0o600);

    // The cache saved by that load serves the next template change.
    repo.write("roles/app/files/b", "static v2\n");
    repo.commit("a source");
    sync("a source", true);

    // A new file under files/ (not in the old tree): loaded again.
    repo.write("roles/app/files/new", "new\n");
    repo.commit("a new file nothing uses");
    sync("a new file nothing uses", false);

    // A damaged line this sync does not need (b.conf's, when a.conf's
    // template changes): not read, so not noticed, and nothing of it used.
    let flip_in_line = |path: &str| {
        let mut bytes = std::fs::read(&cache).unwrap();
        let needle = format!("\"{path}\"\t");
        let at = bytes
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
            .unwrap_or_else(|| panic!("no line of {path} in the cache"));
        bytes[at + needle.len() + 2] ^= 0x01;
        std::fs::write(&cache, &bytes).unwrap();
    };
    flip_in_line("/etc/app/b.conf");
    repo.write("roles/app/files/a.tera", "v3 {{ vars.greeting }}\n");
    repo.commit("a template, with another file's line damaged");
    sync("a template, with another file's line damaged", true);
    assert_eq!(host.read("/etc/app/a.conf").unwrap(), "v3 hello\n");

    // A damaged cache: one byte flipped in the line the sync needs, or in
    // the configuration, or the file cut short.
    for (step, damage) in [
        ("a flipped byte in a needed line", 0usize),
        ("a flipped byte in the configuration", 1),
        ("a torn cache", 2),
    ] {
        match damage {
            0 => flip_in_line("/etc/app/a.conf"),
            1 => {
                let mut bytes = std::fs::read(&cache).unwrap();
                let at = bytes
                    .windows(8)
                    .position(|w| w == b"\"vars\":{")
                    .expect("the configuration's variables");
                bytes[at + 9] ^= 0x01;
                std::fs::write(&cache, &bytes).unwrap();
            }
            _ => {
                let mut bytes = std::fs::read(&cache).unwrap();
                bytes.truncate(bytes.len() / 2);
                std::fs::write(&cache, &bytes).unwrap();
            }
        }
        repo.write(
            "roles/app/files/a.tera",
            &format!("{step} {{{{ vars.greeting }}}}\n"),
        );
        repo.commit(step);
        sync(step, false);
        assert_eq!(
            host.read("/etc/app/a.conf").unwrap(),
            format!("{step} hello\n")
        );
    }
    // Rebuilt by the load: used again.
    repo.write("roles/app/files/a.tera", "v9 {{ vars.greeting }}\n");
    repo.commit("after the repair");
    sync("after the repair", true);

    // The role file a symbolic link to a file under files/: a change to
    // that file is a change to the role file, loaded again (the bug: the
    // old configuration reused, the new file never written).
    let role = std::fs::read_to_string(repo.path().join("roles/app/role.toml")).unwrap();
    repo.write("roles/app/files/role.toml", &role);
    repo.remove("roles/app/role.toml");
    std::os::unix::fs::symlink("files/role.toml", repo.path().join("roles/app/role.toml")).unwrap();
    repo.commit("the role file moved under files/ behind a link");
    sync("the role file moved under files/ behind a link", false);
    repo.write(
        "roles/app/files/role.toml",
        &format!("{role}\n[[files]]\npath = \"/etc/app/c.conf\"\nsource = \"b\"\n"),
    );
    repo.commit("a new file declared through the link");
    sync("a new file declared through the link", false);
    assert_eq!(host.read("/etc/app/c.conf").unwrap(), "static v2\n");
}

/// The bug this guards against: the configuration cache was written as
/// soon as a configuration was loaded, also by runs that then failed (a
/// template that does not render) and so never recorded it: the cache
/// the quick record named was replaced, and the next sync loaded the
/// repository again. It is now written with the record.
#[test]
fn a_failed_run_leaves_the_configuration_cache_alone() {
    let repo = templated_repo();
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    settle(&host, &repo);
    let cache = host.state.path().join("config.cache");
    let before = std::fs::read(&cache).unwrap();
    repo.write("roles/app/role.toml", &ROLE.replace("0640", "0600"));
    repo.write("roles/app/files/a.tera", "{{ nope.nothing }}\n");
    repo.commit("a role change with a template that does not render");
    let run = host.run(repo.path(), &["sync", "--once", "--timings"]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(run.stderr.contains("timing: load "), "{}", run.stderr);
    assert_eq!(
        std::fs::read(&cache).unwrap(),
        before,
        "the cache was replaced"
    );
    // Back to a commit whose configuration the cache holds: used.
    repo.write("roles/app/role.toml", ROLE);
    repo.write("roles/app/files/a.tera", "v3 {{ vars.greeting }}\n");
    repo.commit("fixed");
    let run = host.run(repo.path(), &["sync", "--once", "--timings"]).ok();
    assert!(
        run.stderr.contains("timing: load-cached ") && !run.stderr.contains("timing: load "),
        "the cache was not used:\n{}",
        run.stderr
    );
    assert_eq!(host.read("/etc/app/a.conf").unwrap(), "v3 hello\n");
}

/// A drift is repaired from the tree read entry by entry
/// (`sync::run::lazy_tree`), where a read that fails makes an entry look
/// missing. With a tree object gone from the repository, the sync must not
/// plan from such a read: it reads the tree whole, fails on the same
/// object with an error that names the commit and the directory (exit 3),
/// and changes nothing, neither the drifted file nor the inventory.
#[test]
fn a_tree_object_gone_from_the_repository_fails_a_drift_repair_and_changes_nothing() {
    let repo = templated_repo();
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    settle(&host, &repo);
    let commit = repo.head();
    let tree = git(repo.path(), &["rev-parse", "HEAD:roles/app/files"]);
    let object = repo
        .path()
        .join(".git/objects")
        .join(&tree[..2])
        .join(&tree[2..]);
    std::fs::remove_file(&object).unwrap_or_else(|e| panic!("{}: {e}", object.display()));
    std::fs::write(host.path("/etc/app/a.conf"), "drifted\n").unwrap();
    let before = host.tree();
    let state = std::fs::read(host.state.path().join("inventory.json")).unwrap();
    let run = host.run(repo.path(), &["sync", "--once"]).code(3);
    assert!(
        run.stderr.contains(&commit) && run.stderr.contains("roles/app/files"),
        "the error does not name the commit and the directory:\n{}",
        run.stderr
    );
    assert_eq!(host.tree(), before, "the host changed");
    assert_eq!(host.read("/etc/app/a.conf").unwrap(), "drifted\n");
    assert_eq!(
        std::fs::read(host.state.path().join("inventory.json")).unwrap(),
        state,
        "the inventory changed"
    );
}
