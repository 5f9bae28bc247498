//! Managed directories (`[[dirs]]`), issue #16 step 2 of
//! docs/design/resources.md: in the plan, the transaction, the quick
//! check, drift repair, prune and a failing-check revert, under a
//! `--root` prefix. Unprivileged, owners are neither compared nor applied
//! (as for files); the snapshot still compares them.

use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

use crate::support::*;

const QUICK: &str = "(quick check)";

fn mode(host: &Host, path: &str) -> u32 {
    std::fs::symlink_metadata(host.path(path)).unwrap().mode() & 0o7777
}

fn is_dir(host: &Host, path: &str) -> bool {
    std::fs::symlink_metadata(host.path(path)).is_ok_and(|m| m.is_dir())
}

/// Role `app`: a managed file inside /srv/app, the entries of `extra`
/// (role.toml text), and a check running `check` (an argv as TOML).
fn set_role(r: &Repo, extra: &str, check: &str) {
    r.write("roles/app/files/conf", "port = 8080\n");
    r.write(
        "roles/app/role.toml",
        &format!(
            "[[files]]\npath = \"/srv/app/app.conf\"\nsource = \"conf\"\n\n{extra}\n\
             [[checks]]\nname = \"app\"\nretries = 1\ninterval = \"10ms\"\n\
             command = {{ argv = {check} }}\n"
        ),
    );
}

const PASS: &str = "[\"/bin/true\"]";

const DIRS: &str = "[[dirs]]\npath = \"/srv/app\"\nmode = \"0750\"\n\n\
     [[dirs]]\npath = \"/srv/app/data\"\nmode = \"2770\"\n";

fn repo(extra: &str) -> Repo {
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"app\"]\n");
    r.write("hosts/default.toml", "");
    set_role(&r, extra, PASS);
    r.commit("v1");
    r
}

fn sync(host: &Host, r: &Repo) -> Run {
    host.run(r.path(), &["sync", "--once", "--run-checks"])
}

/// Syncs until the quick check holds (the sync right after an apply may
/// not trust a stamp taken in the same clock tick).
fn settle(host: &Host, r: &Repo) -> Run {
    let mut runs = Vec::new();
    for _ in 0..3 {
        let run = sync(host, r).ok();
        if run.stdout.contains(QUICK) {
            return run;
        }
        runs.push(run.stdout);
    }
    panic!("the quick check never held over 3 idle syncs: {runs:#?}");
}

fn ids() -> (u32, u32) {
    (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    )
}

fn inventory(host: &Host) -> serde_json::Value {
    let inv = std::fs::read_to_string(host.state.path().join("inventory.json")).unwrap();
    serde_json::from_str(&inv).unwrap()
}

#[test]
fn dirs_apply_stay_quick_and_drift_is_repaired() {
    let r = repo(DIRS);
    let host = Host::new("h");
    let (uid, gid) = ids();
    let plan = host.run(r.path(), &["plan"]).ok();
    for want in [
        format!("+ create directory /srv/app (0750, {uid}:{gid})\n"),
        format!("+ create directory /srv/app/data (2770, {uid}:{gid})\n"),
        "1 to create, 0 to change, 0 to remove, 0 to adopt, 0 unchanged; 2 directories\n"
            .to_string(),
    ] {
        assert!(
            plan.stdout.contains(&want),
            "{want:?} not in\n{}",
            plan.stdout
        );
    }
    // Directories come before the files that go in them.
    let first_dir = plan.stdout.find("+ create directory /srv/app ").unwrap();
    let file = plan.stdout.find("+ create /srv/app/app.conf").unwrap();
    assert!(first_dir < file, "{}", plan.stdout);
    // `plan` changes nothing.
    assert!(!host.path("/srv").exists());

    sync(&host, &r).ok();
    assert_eq!(mode(&host, "/srv/app"), 0o750);
    assert_eq!(mode(&host, "/srv/app/data"), 0o2770);
    assert_eq!(
        host.read("/srv/app/app.conf").as_deref(),
        Some("port = 8080\n")
    );
    // Recorded, so the inventory is format 2 and status says so.
    let inv = inventory(&host);
    assert_eq!(inv["driftless_state"], 2);
    assert_eq!(inv["data"]["directories"]["/srv/app"]["created"], true);
    assert_eq!(inv["data"]["directories"]["/srv/app"]["mode"], 0o750);
    let text = host.run(r.path(), &["status"]).ok().stdout;
    assert!(
        text.contains("(1 files, 2 directories, transaction"),
        "{text}"
    );
    let (code, out) = validate(r.path(), &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("ok    default: 1 file(s), 1 check(s), 2 directories"),
        "{out}"
    );
    // No staged directory is left behind.
    assert!(
        !root_snapshot(&host)
            .iter()
            .any(|e| e.path.contains(".driftless-")),
        "{:?}",
        root_snapshot(&host)
    );

    // No-op: the quick check holds, nothing is written.
    let before = root_snapshot(&host);
    settle(&host, &r);
    assert_eq!(root_snapshot(&host), before);

    // Drift: a mode changed by hand is caught by the quick check (the
    // directory's ctime moved) and put back.
    std::fs::set_permissions(
        host.path("/srv/app/data"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let plan = host.run(r.path(), &["plan"]).ok();
    assert!(
        plan.stdout.contains(&format!(
            "~ directory /srv/app/data (2770, {uid}:{gid}; was 0777, {uid}:{gid})"
        )),
        "{}",
        plan.stdout
    );
    let run = sync(&host, &r).ok();
    assert!(!run.stdout.contains(QUICK), "{}", run.stdout);
    assert_eq!(mode(&host, "/srv/app/data"), 0o2770);
    settle(&host, &r);

    // Drift of the owner (as root only: unprivileged, owners are neither
    // compared nor applied).
    if uid == 0 {
        let data = host.path("/srv/app/data");
        std::os::unix::fs::chown(&data, Some(4242), Some(4242)).unwrap();
        let run = sync(&host, &r).ok();
        assert!(!run.stdout.contains(QUICK), "{}", run.stdout);
        let m = std::fs::metadata(&data).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 0, 0o2770));
        settle(&host, &r);
    }

    // Drift: a removed directory is created again.
    std::fs::remove_dir(host.path("/srv/app/data")).unwrap();
    let run = sync(&host, &r).ok();
    assert!(!run.stdout.contains(QUICK), "{}", run.stdout);
    assert_eq!(mode(&host, "/srv/app/data"), 0o2770);
    settle(&host, &r);
    assert_eq!(
        root_snapshot(&host)
            .into_iter()
            .map(|e| (e.path, e.kind, e.content, e.mode))
            .collect::<Vec<_>>(),
        before
            .into_iter()
            .map(|e| (e.path, e.kind, e.content, e.mode))
            .collect::<Vec<_>>()
    );
}

/// A failing check reverts the directories with the files: a created
/// one is gone, a corrected one has its old mode and owner back.
#[test]
fn a_failing_check_reverts_dirs_byte_exact() {
    let r = repo("");
    let host = Host::new("h");
    std::fs::create_dir_all(host.path("/srv/shared")).unwrap();
    std::fs::set_permissions(
        host.path("/srv/shared"),
        std::fs::Permissions::from_mode(0o775),
    )
    .unwrap();
    sync(&host, &r).ok();
    let before = root_snapshot(&host);
    // Fails while the new directory exists: passes again once reverted.
    let data = host.path("/srv/app/data");
    // As root, the owner changes too (and must come back).
    let owner = if ids().0 == 0 { 4242 } else { ids().0 };
    set_role(
        &r,
        &format!(
            "{DIRS}\n[[dirs]]\npath = \"/srv/shared\"\nmode = \"0700\"\nowner = \"{owner}\"\n"
        ),
        &format!(
            "[\"/usr/bin/test\", \"!\", \"-d\", {:?}]",
            data.display().to_string()
        ),
    );
    r.commit("v2 with dirs, its check fails");
    let run = sync(&host, &r).code(1);
    assert!(run.stderr.contains("reverted"), "{}", run.stderr);
    assert_eq!(root_snapshot(&host), before, "the revert is not byte-exact");
    assert_eq!(mode(&host, "/srv/shared"), 0o775);
    assert!(!host.path("/srv/app/data").exists());
    // The inventory is the one before: no directories recorded.
    assert!(inventory(&host)["data"].get("directories").is_none());
}

/// A directory that leaves the repository is removed only if driftless
/// created it and it is empty; one it found stays, and so does one
/// holding an unmanaged file (removed later, once empty).
#[test]
fn a_pruned_directory_is_removed_only_if_driftless_created_it_and_it_is_empty() {
    let extra = "[[dirs]]\npath = \"/srv/made\"\nmode = \"0750\"\n\n\
                 [[dirs]]\npath = \"/srv/full\"\n\n\
                 [[dirs]]\npath = \"/srv/found\"\nmode = \"0700\"\n";
    let r = repo(extra);
    let host = Host::new("h");
    std::fs::create_dir_all(host.path("/srv/found")).unwrap();
    sync(&host, &r).ok();
    assert!(is_dir(&host, "/srv/made") && is_dir(&host, "/srv/full"));
    assert_eq!(mode(&host, "/srv/found"), 0o700);
    std::fs::write(host.path("/srv/full/notes.txt"), "mine\n").unwrap();

    set_role(&r, "", PASS);
    r.commit("v2 without dirs");
    let plan = host.run(r.path(), &["plan"]).ok();
    for want in [
        "- remove directory /srv/made if empty (no longer declared, driftless created it)",
        "- remove directory /srv/full if empty",
    ] {
        assert!(
            plan.stdout.contains(want),
            "{want:?} not in\n{}",
            plan.stdout
        );
    }
    assert!(!plan.stdout.contains("/srv/found"), "{}", plan.stdout);
    sync(&host, &r).ok();
    assert!(!host.path("/srv/made").exists());
    assert_eq!(host.read("/srv/full/notes.txt").as_deref(), Some("mine\n"));
    assert_eq!(mode(&host, "/srv/found"), 0o700);
    // No managed directory left: state format 1 again; the one still
    // holding a file is remembered as created.
    let inv = inventory(&host);
    assert_eq!(inv["driftless_state"], 1);
    assert!(inv["data"].get("directories").is_none());
    // (/srv/app was created for the role's file.)
    assert_eq!(
        inv["data"]["dirs"],
        serde_json::json!(["/srv/app", "/srv/full"])
    );
    settle(&host, &r);

    // Emptied, it goes after the next commit.
    std::fs::remove_file(host.path("/srv/full/notes.txt")).unwrap();
    r.write("roles/app/files/conf", "port = 8081\n");
    r.commit("v3");
    sync(&host, &r).ok();
    assert!(!host.path("/srv/full").exists());
    assert!(is_dir(&host, "/srv/found"));
}

/// The plan as JSON: `status.resources` lists the directories.
#[test]
fn plan_json_lists_dirs_as_resources() {
    let r = repo(DIRS);
    let host = Host::new("h");
    let out = host
        .run(r.path(), &["plan", "--format", "json"])
        .ok()
        .stdout;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let res = v["status"]["resources"].as_array().unwrap();
    assert_eq!(res.len(), 2, "{res:?}");
    assert_eq!(res[0]["kind"], "dir");
    assert_eq!(res[0]["action"], "create");
    assert_eq!(res[0]["path"], "/srv/app");
    assert_eq!(res[0]["mode"], 0o750);
    assert_eq!(res[1]["path"], "/srv/app/data");
}

/// Validation names the role file, the line of the entry and what to do.
#[test]
fn bad_dirs_entries_name_role_line_and_entry() {
    let cases: &[(&str, &str)] = &[
        (
            "[[dirs]]\npath = \"srv/x\"\n",
            "roles/app/role.toml:10 dirs[0]: path \"srv/x\" is not absolute",
        ),
        (
            "[[dirs]]\npath = \"/srv/x\"\nmode = \"0644\"\n",
            "roles/app/role.toml:10 dirs[0]: /srv/x: key `mode`: 0644 does not give the owner rwx",
        ),
        (
            "[[dirs]]\npath = \"/srv/x\"\nmode = \"4755\"\n",
            "roles/app/role.toml:10 dirs[0]: /srv/x: key `mode`: 4755 is setuid",
        ),
        (
            "[[dirs]]\npath = \"/srv/x\"\nmode = \"0999\"\n",
            "roles/app/role.toml:10 dirs[0]: /srv/x: key `mode`: mode \"0999\" is not an octal mode",
        ),
        (
            "[[dirs]]\npath = \"/srv/x\"\nowner = \"a b\"\n",
            "roles/app/role.toml:10 dirs[0]: /srv/x: key `owner`: \"a b\" is not a user/group name",
        ),
        ("[[dirs]]\npath = \"/srv/x\"\nmdoe = \"0755\"\n", "unknown field `mdoe`"),
        (
            "[[dirs]]\npath = \"/srv/app/app.conf\"\n",
            "roles/app/role.toml:10 dirs[0]: /srv/app/app.conf is already managed by roles/app/role.toml:1 files[0]",
        ),
        (
            "[[dirs]]\npath = \"/srv/x\"\n\n[[dirs]]\npath = \"/srv/x\"\n",
            "roles/app/role.toml:13 dirs[1]: /srv/x is already managed by roles/app/role.toml:10 dirs[0]",
        ),
        (
            "[[dirs]]\npath = \"/srv/x\"\n\n[[links]]\npath = \"/srv/x\"\ntarget = \"y\"\n",
            "roles/app/role.toml:10 dirs[0]: /srv/x is already managed by roles/app/role.toml:13 links[0]",
        ),
        (
            "[[dirs]]\npath = \"/srv/x/y\"\n\n[[absent]]\npath = \"/srv/x\"\n",
            "roles/app/role.toml:13 absent[0]: /srv/x is absent, but roles/app/role.toml:10 dirs[0] manages /srv/x/y below it",
        ),
        (
            "[[dirs]]\npath = \"/srv/l/d\"\n\n[[links]]\npath = \"/srv/l\"\ntarget = \"/tmp\"\n",
            "roles/app/role.toml:13 links[0]: /srv/l is a symlink, but roles/app/role.toml:10 dirs[0] manages /srv/l/d below it",
        ),
        (
            "[[dirs]]\npath = \"/etc/driftless\"\n",
            "roles/app/role.toml:10 dirs[0]: /etc/driftless is reserved for the agent itself",
        ),
    ];
    for (extra, want) in cases {
        let r = Repo::new();
        r.write("driftless.toml", "roles = [\"app\"]\n");
        r.write("hosts/default.toml", "");
        r.write("roles/app/files/app", "x\n");
        r.write(
            "roles/app/role.toml",
            &format!(
                "[[files]]\npath = \"/srv/app/app.conf\"\nsource = \"app\"\n\n\
                 # comment\n# comment\n# comment\n# comment\n\n{extra}"
            ),
        );
        r.commit("bad");
        let (code, out) = validate(r.path(), &[]);
        assert_ne!(code, Some(0), "{extra}: {out}");
        assert!(out.contains(want), "{want:?} not in\n{out}");
        // A sync refuses it too and writes nothing.
        let host = Host::new("h");
        let run = host.sync(r.path());
        assert_ne!(run.code, 0);
        assert!(run.stderr.contains(want), "{want:?} not in\n{}", run.stderr);
        assert!(root_snapshot(&host).is_empty(), "{extra}");
    }
}

/// A symlink at a directory's path (to a directory outside the root) is
/// refused, never followed: the outside directory keeps its mode. So is
/// one above it, and a regular file at the path.
#[test]
fn a_planted_link_at_or_above_a_dir_or_a_file_there_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::set_permissions(outside.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cases: [(&str, &str, &str); 3] = [
        (
            "/srv/app",
            "[[dirs]]\npath = \"/srv/app/data\"\nmode = \"0700\"\n",
            "is a symlink, not a directory",
        ),
        (
            "/srv/app/data",
            "[[dirs]]\npath = \"/srv/app/data\"\nmode = \"0700\"\n",
            "/srv/app/data (roles/app/role.toml:5 dirs[0]): a symlink is where the directory must go",
        ),
        (
            "",
            "[[dirs]]\npath = \"/srv/app/app.conf.d\"\n",
            "/srv/app/app.conf.d (roles/app/role.toml:5 dirs[0]): a regular file is where the directory must go",
        ),
    ];
    for (link_at, extra, want) in cases {
        let r = repo(extra);
        let host = Host::new("h");
        std::fs::create_dir_all(host.path("/srv/app")).unwrap();
        if link_at.is_empty() {
            std::fs::write(host.path("/srv/app/app.conf.d"), "a file\n").unwrap();
        } else {
            if link_at == "/srv/app" {
                std::fs::remove_dir(host.path("/srv/app")).unwrap();
            }
            symlink(outside.path(), host.path(link_at)).unwrap();
        }
        let before = root_snapshot(&host);
        let run = sync(&host, &r);
        assert_ne!(run.code, 0, "{extra}");
        assert!(run.stderr.contains(want), "{want:?} not in\n{}", run.stderr);
        assert_eq!(root_snapshot(&host), before, "{extra}");
        let names: Vec<_> = std::fs::read_dir(outside.path()).unwrap().collect();
        assert!(names.is_empty(), "written outside the root: {names:?}");
        assert_eq!(
            std::fs::metadata(outside.path()).unwrap().mode() & 0o7777,
            0o755
        );
    }
}

/// A host without `[[dirs]]` writes no `directories` anywhere: the
/// inventory stays state format 1.
#[test]
fn no_dirs_no_trace() {
    let r = repo("");
    let host = Host::new("h");
    sync(&host, &r).ok();
    let inv = std::fs::read_to_string(host.state.path().join("inventory.json")).unwrap();
    assert!(inv.contains("\"driftless_state\": 1"), "{inv}");
    assert!(!inv.contains("directories"), "{inv}");
    let plan = host
        .run(r.path(), &["plan", "--format", "json"])
        .ok()
        .stdout;
    assert!(!plan.contains("resources"), "{plan}");
}

/// Role `web` with a managed site file in a purged /etc/nginx/conf.d
/// that keeps README, and a check running `check`.
fn set_purge_role(r: &Repo, check: &str) {
    r.write("roles/web/files/app", "server app;\n");
    r.write(
        "roles/web/role.toml",
        &format!(
            "[[dirs]]\npath = \"/etc/nginx/conf.d\"\npurge = true\nkeep = [\"README\"]\n\n\
             [[files]]\npath = \"/etc/nginx/conf.d/app.conf\"\nsource = \"app\"\n\n\
             [[checks]]\nname = \"site\"\nretries = 1\ninterval = \"10ms\"\n\
             command = {{ argv = {check} }}\n"
        ),
    );
}

/// What a Debian nginx leaves in conf.d, plus a stray link and a README.
fn nginx_host() -> Host {
    let host = Host::new("h");
    let d = host.path("/etc/nginx/conf.d");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(d.join("default.conf"), "server default;\n").unwrap();
    std::fs::set_permissions(
        d.join("default.conf"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    if ids().0 == 0 {
        std::os::unix::fs::chown(d.join("default.conf"), Some(4242), Some(4343)).unwrap();
    }
    std::fs::write(d.join("README"), "local notes\n").unwrap();
    symlink("/nowhere", d.join("stray")).unwrap();
    host
}

/// `purge = true`: the entries nobody manages are removed (backed up),
/// shown in `plan`, restored byte for byte by a failing check's revert;
/// `keep` stays; a file dropped in later is caught by the quick check
/// (the directory's stamp) and removed at the next poll.
#[test]
fn purge_removes_unmanaged_entries_restores_them_on_revert_and_catches_drift() {
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"web\"]\n");
    r.write("hosts/default.toml", "");
    let host = nginx_host();
    let conf = host.path("/etc/nginx/conf.d/app.conf");
    // Fails while the new file exists: passes again once reverted.
    set_purge_role(
        &r,
        &format!(
            "[\"/usr/bin/test\", \"!\", \"-e\", {:?}]",
            conf.display().to_string()
        ),
    );
    r.commit("purge, its check fails");
    let plan = host.run(r.path(), &["plan"]).ok();
    for want in [
        "- purge /etc/nginx/conf.d/default.conf (not managed; backed up)\n",
        "- purge /etc/nginx/conf.d/stray -> /nowhere (not managed; backed up)\n",
        "1 to create, 0 to change, 0 to remove, 0 to adopt, 0 unchanged; 2 purged\n",
    ] {
        assert!(
            plan.stdout.contains(want),
            "{want:?} not in\n{}",
            plan.stdout
        );
    }
    assert!(!plan.stdout.contains("README"), "{}", plan.stdout);
    let json = host
        .run(r.path(), &["plan", "--format", "json"])
        .ok()
        .stdout;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let kinds: Vec<&str> = v["status"]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["purge", "purge"], "{json}");

    let before = root_snapshot(&host);
    let run = sync(&host, &r).code(1);
    assert!(run.stderr.contains("reverted"), "{}", run.stderr);
    assert_eq!(root_snapshot(&host), before, "the revert is not byte-exact");

    set_purge_role(&r, PASS);
    r.commit("purge, its check passes");
    sync(&host, &r).ok();
    let d = host.path("/etc/nginx/conf.d");
    let mut names: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["README", "app.conf"]);
    settle(&host, &r);

    // Drift: a file dropped into the purged directory.
    std::fs::write(d.join("dropped.conf"), "server evil;\n").unwrap();
    let run = sync(&host, &r).ok();
    assert!(!run.stdout.contains(QUICK), "{}", run.stdout);
    assert!(!d.join("dropped.conf").exists());
    settle(&host, &r);
}

/// A name on the host is not the repository's to vet: a file in a purged
/// directory named with an escape sequence and a line break reached the
/// plan and the log raw (the admin's screen cleared, a log line forged).
/// Shown escaped now, and purged like any other.
#[test]
fn a_purged_file_named_with_control_characters_is_shown_escaped_and_removed() {
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"web\"]\n");
    r.write("hosts/default.toml", "");
    set_purge_role(&r, PASS);
    r.commit("purge");
    let host = nginx_host();
    let d = host.path("/etc/nginx/conf.d");
    let evil = "x\u{1b}[2J\nINFO forged\u{202e}";
    std::fs::write(d.join(evil), "").unwrap();
    let plan = host.run(r.path(), &["plan"]).ok();
    let run = sync(&host, &r).ok();
    for out in [&plan.stdout, &plan.stderr, &run.stdout, &run.stderr] {
        assert!(
            !out.contains('\u{1b}') && !out.contains('\u{202e}') && !out.contains("\nINFO forged"),
            "raw: {out:?}"
        );
    }
    assert!(
        plan.stdout
            .contains("- purge /etc/nginx/conf.d/x\\u{1b}[2J\\nINFO forged\\u{202e} (not managed; backed up)\n"),
        "{}",
        plan.stdout
    );
    assert!(!d.join(evil).exists());
}

/// An unmanaged subdirectory in a purged directory is refused, named.
#[test]
fn purge_refuses_an_unmanaged_subdirectory_naming_it() {
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"web\"]\n");
    r.write("hosts/default.toml", "");
    set_purge_role(&r, PASS);
    r.commit("purge");
    let host = nginx_host();
    std::fs::create_dir(host.path("/etc/nginx/conf.d/snippets")).unwrap();
    let before = root_snapshot(&host);
    let run = sync(&host, &r);
    assert_ne!(run.code, 0);
    assert!(
        run.stderr.contains(
            "/etc/nginx/conf.d/snippets: the purge of /etc/nginx/conf.d (roles/web/role.toml:1 dirs[0]) would remove this directory"
        ),
        "{}",
        run.stderr
    );
    assert_eq!(root_snapshot(&host), before);
}

/// What the repository itself contradicts about a purge.
#[test]
fn purge_contradictions_are_refused_with_role_and_line() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "[[dirs]]\npath = \"/srv/p\"\npurge = true\nkeep = [\"x\"]\n\n[[files]]\npath = \"/srv/p/x\"\nsource = \"app\"\n",
            "",
            "roles/a/role.toml:1 dirs[0]: keep entry \"x\" of /srv/p is declared by roles/a/role.toml:6 files[0]: it is managed, not kept",
        ),
        (
            "[[dirs]]\npath = \"/srv/p\"\npurge = true\n\n[[absent]]\npath = \"/srv/p/old\"\n",
            "",
            "roles/a/role.toml:5 absent[0]: /srv/p/old is inside /srv/p, which roles/a/role.toml:1 dirs[0] purges",
        ),
        (
            "[[dirs]]\npath = \"/srv/p\"\nkeep = [\"x\"]\n",
            "",
            "roles/a/role.toml:1 dirs[0]: /srv/p: key `keep` only goes with `purge = true`",
        ),
        (
            "[[dirs]]\npath = \"/srv/p\"\npurge = true\nkeep = [\"a/b\"]\n",
            "",
            "roles/a/role.toml:1 dirs[0]: /srv/p: key `keep`: \"a/b\" is not the name of an entry",
        ),
        (
            "[[dirs]]\npath = \"/srv/p\"\npurge = true\n",
            "[[dirs]]\npath = \"/srv/p/q\"\npurge = true\n",
            "roles/b/role.toml:1 dirs[0]: /srv/p/q is purged, but it is inside /srv/p, which roles/a/role.toml:1 dirs[0] purges too",
        ),
    ];
    for (a, b, want) in cases {
        let r = Repo::new();
        r.write("driftless.toml", "roles = [\"a\", \"b\"]\n");
        r.write("hosts/default.toml", "");
        r.write("roles/a/files/app", "x\n");
        r.write("roles/a/role.toml", a);
        r.write("roles/b/role.toml", b);
        r.commit("bad");
        let (code, out) = validate(r.path(), &[]);
        assert_ne!(code, Some(0), "{a}{b}: {out}");
        assert!(out.contains(want), "{want:?} not in\n{out}");
    }
    // The same nesting in one role is fine (the inner one is managed).
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"a\"]\n");
    r.write("hosts/default.toml", "");
    r.write(
        "roles/a/role.toml",
        "[[dirs]]\npath = \"/srv/p\"\npurge = true\n\n[[dirs]]\npath = \"/srv/p/q\"\npurge = true\n",
    );
    r.commit("nested in one role");
    let (code, out) = validate(r.path(), &[]);
    assert_eq!(code, Some(0), "{out}");
}

/// Design §2.2: a purge never removes a file an installed package owns
/// (dpkg's file lists in the root's database), naming the package; `keep`
/// lets it stay.
#[test]
fn a_purge_refuses_to_remove_a_file_a_package_owns() {
    let host = Host::new("h");
    std::fs::create_dir_all(host.path("/etc/jobs.d")).unwrap();
    std::fs::write(
        host.path("/etc/jobs.d/e2scrub_all"),
        "30 3 * * 0 root e2scrub_all\n",
    )
    .unwrap();
    std::fs::write(host.path("/etc/jobs.d/stale"), "0 1 * * * root stale\n").unwrap();
    std::fs::create_dir_all(host.path("/var/lib/dpkg/info")).unwrap();
    std::fs::write(
        host.path("/var/lib/dpkg/info/e2fsprogs.list"),
        "/.\n/etc\n/etc/jobs.d\n/etc/jobs.d/e2scrub_all\n",
    )
    .unwrap();
    let r = repo("[[dirs]]\npath = \"/etc/jobs.d\"\npurge = true\n");
    let before = root_snapshot(&host);
    let run = host.run(r.path(), &["plan"]);
    assert_ne!(run.code, 0, "{}", run.stdout);
    assert!(
        run.stderr.contains(
            "/etc/jobs.d/e2scrub_all (role app): the purge of its directory would remove it, but package e2fsprogs owns it; declare it, add it to `keep`, or remove the package"
        ),
        "{}",
        run.stderr
    );
    assert_ne!(sync(&host, &r).code, 0);
    assert_eq!(
        root_snapshot(&host),
        before,
        "a refused purge changed the host"
    );
    // Kept: the purge goes on without it.
    set_role(
        &r,
        "[[dirs]]\npath = \"/etc/jobs.d\"\npurge = true\nkeep = [\"e2scrub_all\"]\n",
        PASS,
    );
    r.commit("keep it");
    sync(&host, &r).ok();
    assert!(host.path("/etc/jobs.d/e2scrub_all").exists());
    assert!(!host.path("/etc/jobs.d/stale").exists());
}
