//! Managed symlinks (`[[links]]`) and absent paths (`[[absent]]`), issue
//! #16 step 3 of docs/design/resources.md: in the plan, the transaction,
//! the quick check, drift repair, prune and a failing-check revert, under
//! a `--root` prefix.

use std::os::unix::fs::{symlink, PermissionsExt};

use crate::support::*;

const QUICK: &str = "(quick check)";

fn target(host: &Host, path: &str) -> Option<String> {
    std::fs::read_link(host.path(path))
        .ok()
        .map(|t| t.display().to_string())
}

/// Role `web`: a managed site file, the links and absent paths of
/// `extra` (role.toml text), and a check running `check` (an argv as TOML).
fn set_role(r: &Repo, extra: &str, check: &str) {
    r.write("roles/web/files/app", "server app;\n");
    r.write(
        "roles/web/role.toml",
        &format!(
            "[[files]]\npath = \"/etc/nginx/sites-available/app\"\nsource = \"app\"\n\n{extra}\n\
             [[checks]]\nname = \"site\"\nretries = 1\ninterval = \"10ms\"\n\
             command = {{ argv = {check} }}\n"
        ),
    );
}

const PASS: &str = "[\"/bin/true\"]";

const LINKS: &str = "[[links]]\npath = \"/etc/nginx/sites-enabled/app\"\ntarget = \"../sites-available/app\"\n\n\
     [[links]]\npath = \"/etc/nginx/sites-enabled/default\"\ntarget = \"../sites-available/app\"\n\n\
     [[absent]]\npath = \"/etc/cron.d/old-backup\"\n\n\
     [[absent]]\npath = \"/etc/old-link\"\n";

fn repo(extra: &str) -> Repo {
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"web\"]\n");
    r.write("hosts/default.toml", "");
    set_role(&r, extra, PASS);
    r.commit("v1");
    r
}

/// A host with what a Debian nginx and an old cron job leave: a default
/// site link, a cron file (0640) and a stray link.
fn debian_host() -> Host {
    let host = Host::new("h");
    std::fs::create_dir_all(host.path("/etc/nginx/sites-enabled")).unwrap();
    std::fs::create_dir_all(host.path("/etc/cron.d")).unwrap();
    symlink(
        "../sites-available/default",
        host.path("/etc/nginx/sites-enabled/default"),
    )
    .unwrap();
    std::fs::write(
        host.path("/etc/cron.d/old-backup"),
        "0 3 * * * root backup\n",
    )
    .unwrap();
    std::fs::set_permissions(
        host.path("/etc/cron.d/old-backup"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    symlink("/nowhere", host.path("/etc/old-link")).unwrap();
    host
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

#[test]
fn links_and_absent_apply_stay_quick_and_drift_is_repaired() {
    let r = repo(LINKS);
    let host = debian_host();
    let plan = host.run(r.path(), &["plan"]).ok();
    for want in [
        "+ link /etc/nginx/sites-enabled/app -> ../sites-available/app\n",
        "~ relink /etc/nginx/sites-enabled/default -> ../sites-available/app (was -> ../sites-available/default)\n",
        "- remove /etc/cron.d/old-backup (absent in role web; backed up)\n",
        "- remove /etc/old-link -> /nowhere (absent in role web; backed up)\n",
        "1 to create, 0 to change, 0 to remove, 0 to adopt, 0 unchanged; 2 link(s); 2 absent\n",
    ] {
        assert!(plan.stdout.contains(want), "{want:?} not in\n{}", plan.stdout);
    }
    // `plan` changes nothing.
    assert!(host.path("/etc/cron.d/old-backup").exists());

    sync(&host, &r).ok();
    assert_eq!(
        target(&host, "/etc/nginx/sites-enabled/app").as_deref(),
        Some("../sites-available/app")
    );
    assert_eq!(
        target(&host, "/etc/nginx/sites-enabled/default").as_deref(),
        Some("../sites-available/app")
    );
    // Followed, the link reaches the managed file.
    assert_eq!(
        host.read("/etc/nginx/sites-enabled/app").as_deref(),
        Some("server app;\n")
    );
    assert!(!host.path("/etc/cron.d/old-backup").exists());
    assert!(std::fs::symlink_metadata(host.path("/etc/old-link")).is_err());
    // Links are recorded, so the inventory is format 2 and status says so.
    let inv = std::fs::read_to_string(host.state.path().join("inventory.json")).unwrap();
    let inv: serde_json::Value = serde_json::from_str(&inv).unwrap();
    assert_eq!(inv["driftless_state"], 2);
    assert_eq!(
        inv["data"]["links"]["/etc/nginx/sites-enabled/app"]["created"],
        true
    );
    assert_eq!(
        inv["data"]["links"]["/etc/nginx/sites-enabled/default"]["created"],
        false
    );
    let text = host.run(r.path(), &["status"]).ok().stdout;
    assert!(text.contains("(1 files, 2 links, transaction"), "{text}");
    let (code, out) = validate(r.path(), &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("ok    default: 1 file(s), 1 check(s), 2 link(s), 2 absent"),
        "{out}"
    );
    let status = host.run(r.path(), &["status", "--format", "json"]).ok();
    let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(
        status["status"]["applied"]["links"]["/etc/nginx/sites-enabled/app"]["target"],
        "../sites-available/app"
    );

    // No-op: the quick check holds, nothing is written.
    let before = root_snapshot(&host);
    settle(&host, &r);
    assert_eq!(root_snapshot(&host), before);

    // Drift: a link retargeted by hand is put back.
    let app = host.path("/etc/nginx/sites-enabled/app");
    std::fs::remove_file(&app).unwrap();
    symlink("../sites-available/evil", &app).unwrap();
    let run = sync(&host, &r).ok();
    assert!(!run.stdout.contains(QUICK), "{}", run.stdout);
    assert_eq!(
        target(&host, "/etc/nginx/sites-enabled/app").as_deref(),
        Some("../sites-available/app")
    );
    settle(&host, &r);

    // Drift: an absent path re-created (a file, then a link) is removed
    // again at the next poll.
    std::fs::write(host.path("/etc/cron.d/old-backup"), "again\n").unwrap();
    let run = sync(&host, &r).ok();
    assert!(!run.stdout.contains(QUICK), "{}", run.stdout);
    assert!(!host.path("/etc/cron.d/old-backup").exists());
    settle(&host, &r);
    symlink("x", host.path("/etc/old-link")).unwrap();
    sync(&host, &r).ok();
    assert!(std::fs::symlink_metadata(host.path("/etc/old-link")).is_err());
    settle(&host, &r);
    assert_eq!(root_snapshot(&host), before);
}

/// A failing check reverts links and absent paths with the files: the
/// old link targets and the removed file (bytes, mode, owner) and link
/// come back exactly.
#[test]
fn a_failing_check_reverts_links_and_absent_paths_byte_exact() {
    let r = repo("");
    let host = debian_host();
    sync(&host, &r).ok();
    let before = root_snapshot(&host);
    // Fails while the new link exists: passes again once reverted.
    let link = host.path("/etc/nginx/sites-enabled/app");
    set_role(
        &r,
        LINKS,
        &format!(
            "[\"/usr/bin/test\", \"!\", \"-L\", {:?}]",
            link.display().to_string()
        ),
    );
    r.commit("v2 with links, its check fails");
    let run = sync(&host, &r).code(1);
    assert!(run.stderr.contains("reverted"), "{}", run.stderr);
    assert_eq!(root_snapshot(&host), before, "the revert is not byte-exact");
    assert!(
        !host.path("/etc/nginx/sites-enabled/app").exists()
            && std::fs::symlink_metadata(host.path("/etc/nginx/sites-enabled/app")).is_err()
    );
    let leftovers: Vec<_> = root_snapshot(&host)
        .into_iter()
        .filter(|e| e.path.contains(".driftless-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A link that leaves the repository is removed if driftless created it;
/// one it found (and retargeted) stays as it is. Absent needs nothing.
#[test]
fn a_pruned_link_is_removed_only_if_driftless_created_it() {
    let r = repo(LINKS);
    let host = debian_host();
    sync(&host, &r).ok();
    set_role(&r, "", PASS);
    r.commit("v2 without links");
    let plan = host.run(r.path(), &["plan"]).ok();
    assert!(
        plan.stdout.contains(
            "- unlink /etc/nginx/sites-enabled/app (was -> ../sites-available/app; no longer declared, driftless created it)"
        ),
        "{}",
        plan.stdout
    );
    assert!(!plan.stdout.contains("default"), "{}", plan.stdout);
    sync(&host, &r).ok();
    assert!(std::fs::symlink_metadata(host.path("/etc/nginx/sites-enabled/app")).is_err());
    assert_eq!(
        target(&host, "/etc/nginx/sites-enabled/default").as_deref(),
        Some("../sites-available/app")
    );
    // A files-only inventory again: state format 1.
    let inv = std::fs::read_to_string(host.state.path().join("inventory.json")).unwrap();
    assert!(inv.contains("\"driftless_state\": 1"), "{inv}");
    assert!(!inv.contains("\"links\""), "{inv}");
    // The absent path may come back: nothing removes it any more.
    std::fs::write(host.path("/etc/cron.d/old-backup"), "back\n").unwrap();
    sync(&host, &r).ok();
    assert!(host.path("/etc/cron.d/old-backup").exists());
}

/// The plan as JSON: `status.resources` lists the links and absent paths
/// with their kind and action; a plan without any has no such key.
#[test]
fn plan_json_lists_links_and_absent_as_resources() {
    let r = repo(LINKS);
    let host = debian_host();
    let out = host
        .run(r.path(), &["plan", "--format", "json"])
        .ok()
        .stdout;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let res = v["status"]["resources"].as_array().unwrap();
    let brief: Vec<(String, String, String)> = res
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap().to_string(),
                r["action"].as_str().unwrap().to_string(),
                r["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want = [
        ("link", "create", "/etc/nginx/sites-enabled/app"),
        ("link", "retarget", "/etc/nginx/sites-enabled/default"),
        ("absent", "remove", "/etc/cron.d/old-backup"),
        ("absent", "remove", "/etc/old-link"),
    ];
    let want: Vec<_> = want
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(brief, want);
    assert_eq!(res[1]["was"], "../sites-available/default");
    assert_eq!(res[1]["target"], "../sites-available/app");
    assert_eq!(res[2]["file"]["mode"], 0o640);
    assert_eq!(res[2]["file"]["size"], 22);
    assert_eq!(res[3]["link"], "/nowhere");

    let plain = repo("");
    let out = host
        .run(plain.path(), &["plan", "--format", "json"])
        .ok()
        .stdout;
    assert!(!out.contains("resources"), "{out}");
}

/// Validation names the role file, the line of the entry and what to do.
#[test]
fn bad_links_and_absent_entries_name_role_line_and_entry() {
    let cases: &[(&str, &str)] = &[
        (
            "[[links]]\npath = \"etc/x\"\ntarget = \"y\"\n",
            "roles/web/role.toml:10 links[0]: path \"etc/x\" is not absolute",
        ),
        (
            "[[links]]\npath = \"/etc/a/../x\"\ntarget = \"y\"\n",
            "roles/web/role.toml:10 links[0]:",
        ),
        (
            "[[links]]\npath = \"/etc/x\"\ntaget = \"y\"\n",
            "unknown field `taget`",
        ),
        (
            "[[links]]\npath = \"/etc/x\"\ntarget = \"\"\n",
            "roles/web/role.toml:10 links[0]: /etc/x: key `target` is empty",
        ),
        (
            "[[absent]]\npath = \"/etc/driftless/agent.toml\"\n",
            "roles/web/role.toml:10 absent[0]: /etc/driftless/agent.toml is reserved for the agent itself",
        ),
        (
            "[[absent]]\npath = \"/etc/nginx/sites-available/app\"\n",
            "roles/web/role.toml:10 absent[0]: /etc/nginx/sites-available/app is already managed by roles/web/role.toml:1 files[0]",
        ),
        (
            "[[absent]]\npath = \"/etc/nginx\"\n",
            "roles/web/role.toml:10 absent[0]: /etc/nginx is absent, but roles/web/role.toml:1 files[0] manages /etc/nginx/sites-available/app below it",
        ),
        (
            "[[links]]\npath = \"/etc/nginx/sites-available\"\ntarget = \"/srv\"\n",
            "roles/web/role.toml:10 links[0]: /etc/nginx/sites-available is a symlink, but roles/web/role.toml:1 files[0] manages",
        ),
        (
            "[[links]]\npath = \"/etc/l\"\ntarget = \"a\"\n\n[[links]]\npath = \"/etc/l\"\ntarget = \"b\"\n",
            "roles/web/role.toml:14 links[1]: /etc/l is already managed by roles/web/role.toml:10 links[0]",
        ),
    ];
    for (extra, want) in cases {
        let r = Repo::new();
        r.write("driftless.toml", "roles = [\"web\"]\n");
        r.write("hosts/default.toml", "");
        r.write("roles/web/files/app", "x\n");
        r.write(
            "roles/web/role.toml",
            &format!(
                "[[files]]\npath = \"/etc/nginx/sites-available/app\"\nsource = \"app\"\n\n\
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

/// A directory at an absent path, or a file where a link goes, is refused
/// at plan time naming the entry; nothing is changed.
#[test]
fn a_directory_at_an_absent_path_or_a_file_at_a_link_is_refused() {
    let r = repo("[[absent]]\npath = \"/etc/nginx/sites-enabled\"\n");
    let host = debian_host();
    let before = root_snapshot(&host);
    let run = sync(&host, &r);
    assert_ne!(run.code, 0);
    assert!(
        run.stderr.contains(
            "/etc/nginx/sites-enabled (roles/web/role.toml:5 absent[0]): it is a directory"
        ),
        "{}",
        run.stderr
    );
    assert_eq!(root_snapshot(&host), before);

    let r = repo("[[links]]\npath = \"/etc/cron.d/old-backup\"\ntarget = \"x\"\n");
    let run = sync(&host, &r);
    assert_ne!(run.code, 0);
    assert!(
        run.stderr.contains(
            "/etc/cron.d/old-backup (roles/web/role.toml:5 links[0]): a regular file is where the link must go"
        ),
        "{}",
        run.stderr
    );
    assert_eq!(root_snapshot(&host), before);
}

/// A symlink planted above a link's path (its parent directory replaced
/// by a link to a directory outside the root) is refused like for files:
/// nothing is written through it.
#[test]
fn a_planted_link_above_a_link_or_absent_path_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("old-backup"), "outside\n").unwrap();
    for extra in [
        "[[links]]\npath = \"/etc/cron.d/app\"\ntarget = \"x\"\n",
        "[[absent]]\npath = \"/etc/cron.d/old-backup\"\n",
    ] {
        let r = repo(extra);
        let host = Host::new("h");
        std::fs::create_dir_all(host.path("/etc")).unwrap();
        symlink(outside.path(), host.path("/etc/cron.d")).unwrap();
        let run = sync(&host, &r);
        assert_ne!(run.code, 0, "{extra}");
        assert!(
            run.stderr.contains("is a symlink, not a directory")
                && run.stderr.contains("driftless never follows symlinks"),
            "{}",
            run.stderr
        );
        let mut names: Vec<_> = std::fs::read_dir(outside.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["old-backup"], "{extra}");
        assert_eq!(
            std::fs::read_to_string(outside.path().join("old-backup")).unwrap(),
            "outside\n"
        );
    }
}

/// A commit that changes only a file's source takes the partial path
/// (only that file is rendered): the links and absent paths keep their
/// inventory records and stay as they are, and a full sync then finds
/// nothing to do. A link drifted at the same time takes the full path.
#[test]
fn a_source_only_commit_keeps_links_on_the_partial_path() {
    const FULL: &str = "updating only what changed is not possible";
    let r = repo(LINKS);
    let host = debian_host();
    sync(&host, &r).ok();
    settle(&host, &r);
    let inv_before = |host: &Host| {
        let text = std::fs::read_to_string(host.state.path().join("inventory.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["data"]["links"].clone()
    };
    let links = inv_before(&host);
    r.write("roles/web/files/app", "server app v2;\n");
    r.commit("site v2");
    let run = host
        .run(r.path(), &["sync", "--once", "--run-checks", "-v"])
        .ok();
    assert!(run.stdout.contains("1 changed"), "{}", run.stdout);
    assert!(
        run.stderr.contains("updating only what changed") && !run.stderr.contains(FULL),
        "{}",
        run.stderr
    );
    assert_eq!(inv_before(&host), links);
    let plan = host.run(r.path(), &["plan"]).ok();
    assert!(plan.stdout.contains("no changes"), "{}", plan.stdout);
    settle(&host, &r);

    // A retargeted link plus a new commit: the full path, both repaired.
    let app = host.path("/etc/nginx/sites-enabled/app");
    std::fs::remove_file(&app).unwrap();
    symlink("elsewhere", &app).unwrap();
    r.write("roles/web/files/app", "server app v3;\n");
    r.commit("site v3");
    sync(&host, &r).ok();
    assert_eq!(
        target(&host, "/etc/nginx/sites-enabled/app").as_deref(),
        Some("../sites-available/app")
    );
    assert_eq!(
        host.read("/etc/nginx/sites-enabled/app").as_deref(),
        Some("server app v3;\n")
    );
}

/// A link at a managed link's path or at an absent path may point out of
/// the root: it is replaced or removed as a link, never followed, and
/// what it points to is never touched, even by a revert.
#[test]
fn links_out_of_the_root_at_the_paths_themselves_are_never_followed() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "outside\n").unwrap();
    let host = debian_host();
    let out_dir = outside.path().display().to_string();
    let out_file = outside.path().join("secret").display().to_string();
    std::fs::remove_file(host.path("/etc/old-link")).unwrap();
    symlink(&out_file, host.path("/etc/old-link")).unwrap();
    std::fs::remove_file(host.path("/etc/nginx/sites-enabled/default")).unwrap();
    symlink(&out_dir, host.path("/etc/nginx/sites-enabled/default")).unwrap();
    let r = repo("");
    sync(&host, &r).ok();
    let before = root_snapshot(&host);
    // A failing commit: switched in, then reverted.
    let link = host.path("/etc/nginx/sites-enabled/app");
    set_role(
        &r,
        LINKS,
        &format!(
            "[\"/usr/bin/test\", \"!\", \"-L\", {:?}]",
            link.display().to_string()
        ),
    );
    r.commit("v2 fails");
    sync(&host, &r).code(1);
    assert_eq!(root_snapshot(&host), before);
    // Then one that passes.
    set_role(&r, LINKS, PASS);
    r.commit("v3");
    sync(&host, &r).ok();
    assert!(std::fs::symlink_metadata(host.path("/etc/old-link")).is_err());
    assert_eq!(
        target(&host, "/etc/nginx/sites-enabled/default").as_deref(),
        Some("../sites-available/app")
    );
    let mut names: Vec<_> = std::fs::read_dir(outside.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["secret"]);
    assert_eq!(
        std::fs::read_to_string(outside.path().join("secret")).unwrap(),
        "outside\n"
    );
}
