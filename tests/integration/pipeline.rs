//! The sync pipeline against real git histories.

use crate::support::*;

#[test]
fn editing_one_template_changes_exactly_that_file() {
    let repo = Repo::quickstart();
    let host = Host::new("web1");
    host.sync(repo.path()).ok();
    let before = host.tree();
    repo.write(
        "roles/web/files/index.html.tera",
        "<!doctype html>\n<h1>{{ vars.organisation }} v2</h1>\n",
    );
    let new = repo.commit("new index");
    let run = host.sync(repo.path()).ok();
    assert!(
        run.stdout.contains("0 created, 1 changed, 0 removed"),
        "{}",
        run.stdout
    );
    let after = host.tree();
    let changed: Vec<&str> = before
        .iter()
        .zip(after.iter())
        .filter(|(a, b)| a != b)
        .map(|(a, _)| a.0.as_str())
        .collect();
    // Besides the managed file, only the anti-rollback record moves.
    assert_eq!(
        changed,
        vec!["/etc/driftless/applied-commit.json", "/srv/www/index.html"]
    );
    assert!(host
        .read("/etc/driftless/applied-commit.json")
        .unwrap()
        .contains(&new));
    assert_eq!(before.len(), after.len());
}

#[test]
fn file_deleted_from_repo_is_pruned() {
    let repo = Repo::quickstart();
    let host = Host::new("web1");
    host.sync(repo.path()).ok();
    assert!(host.path("/etc/profile.d/driftless-umask.sh").exists());
    let role = std::fs::read_to_string(repo.path().join("roles/base/role.toml")).unwrap();
    let cut = role.find("[[files]]\n# Copied verbatim").unwrap();
    repo.write("roles/base/role.toml", &role[..cut]);
    repo.remove("roles/base/files/umask.sh");
    repo.commit("drop umask");
    let run = host.sync(repo.path()).ok();
    assert!(run.stdout.contains("1 removed"), "{}", run.stdout);
    assert!(!host.path("/etc/profile.d/driftless-umask.sh").exists());
    assert!(host.path("/etc/motd").exists());
}

#[test]
fn renamed_target_moves_the_file() {
    let repo = simple_repo(&[("/etc/app/old.conf", "x\n")]);
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    repo.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/app/new.conf\"\nsource = \"f0\"\n",
    );
    repo.commit("rename");
    host.sync(repo.path()).ok();
    assert!(!host.path("/etc/app/old.conf").exists());
    assert_eq!(host.read("/etc/app/new.conf").as_deref(), Some("x\n"));
}

#[test]
fn force_push_is_refused_and_nothing_changes() {
    let repo = simple_repo(&[("/etc/a", "one\n")]);
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    // Rewrite history: amend the applied commit.
    repo.write("roles/app/files/f0", "rewritten\n");
    git(repo.path(), &["add", "-A"]);
    git(repo.path(), &["commit", "-q", "--amend", "-m", "rewritten"]);
    let run = host.sync(repo.path()).code(4);
    assert!(
        run.stderr.contains("history was rewritten"),
        "{}",
        run.stderr
    );
    assert_eq!(host.read("/etc/a").as_deref(), Some("one\n"));
    let hist = host.run(repo.path(), &["history"]).ok();
    assert!(hist.stdout.contains("refused"), "{}", hist.stdout);
    // The explicit opt-in accepts it.
    host.run(repo.path(), &["sync", "--once", "--allow-non-fast-forward"])
        .ok();
    assert_eq!(host.read("/etc/a").as_deref(), Some("rewritten\n"));
}

#[test]
fn invalid_repo_changes_nothing_and_names_the_problem() {
    let repo = simple_repo(&[("/etc/a", "one\n")]);
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    repo.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/a\"\nsource = \"f0\"\nmod = \"0600\"\n",
    );
    repo.commit("typo");
    let run = host.sync(repo.path()).code(3);
    assert!(
        run.stderr.contains("roles/app/role.toml:4:1"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("did you mean `mode`?"),
        "{}",
        run.stderr
    );
    assert_eq!(host.read("/etc/a").as_deref(), Some("one\n"));
}

#[test]
fn undefined_variable_names_template_line_and_variable() {
    let repo = Repo::new();
    repo.write("driftless.toml", "roles = [\"app\"]\n");
    repo.write("hosts/default.toml", "");
    repo.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/x\"\ntemplate = \"x.tera\"\n",
    );
    repo.write(
        "roles/app/files/x.tera",
        "line one\nport = {{ vars.port }}\n",
    );
    repo.commit("c");
    let host = Host::new("h");
    let run = host.sync(repo.path()).code(3);
    assert!(
        run.stderr
            .contains("roles/app/files/x.tera:2: undefined variable `vars.port`"),
        "{}",
        run.stderr
    );
    assert!(host.tree().is_empty(), "nothing may be written");
}

#[test]
fn symlink_planted_above_a_target_is_never_followed() {
    let repo = simple_repo(&[("/etc/app/conf", "x\n")]);
    let host = Host::new("h");
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(host.path("/etc")).unwrap();
    std::os::unix::fs::symlink(outside.path(), host.path("/etc/app")).unwrap();
    let run = host.sync(repo.path()).code(3);
    assert!(
        run.stderr.contains("is a symlink, not a directory"),
        "{}",
        run.stderr
    );
    assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
}

#[test]
fn target_outside_allowed_roots_is_refused() {
    let repo = simple_repo(&[("/usr/bin/evil", "x\n")]);
    let host = Host::new("h");
    let run = host.sync(repo.path()).code(3);
    assert!(
        run.stderr
            .contains("/usr/bin/evil is outside the allowed roots"),
        "{}",
        run.stderr
    );
    assert!(host.tree().is_empty());
}

#[test]
fn repo_symlink_escaping_the_repository_is_refused() {
    let repo = Repo::new();
    repo.write("driftless.toml", "roles = [\"app\"]\n");
    repo.write("hosts/default.toml", "");
    repo.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/x\"\nsource = \"link\"\n",
    );
    std::fs::create_dir_all(repo.path().join("roles/app/files")).unwrap();
    std::os::unix::fs::symlink(
        "../../../../etc/passwd",
        repo.path().join("roles/app/files/link"),
    )
    .unwrap();
    repo.commit("c");
    let host = Host::new("h");
    let run = host.sync(repo.path()).code(3);
    assert!(
        run.stderr.contains("leaves the repository"),
        "{}",
        run.stderr
    );
}

#[test]
fn drift_on_the_host_is_repaired() {
    let repo = simple_repo(&[("/etc/a", "desired\n")]);
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    std::fs::write(host.path("/etc/a"), "edited by hand\n").unwrap();
    let plan = host.run(repo.path(), &["plan"]).ok();
    assert!(
        plan.stdout.contains("-edited by hand") && plan.stdout.contains("+desired"),
        "{}",
        plan.stdout
    );
    host.sync(repo.path()).ok();
    assert_eq!(host.read("/etc/a").as_deref(), Some("desired\n"));
}

#[test]
fn mode_only_change_is_applied() {
    let repo = simple_repo(&[("/etc/a", "x\n")]);
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    repo.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/a\"\nsource = \"f0\"\nmode = \"0600\"\n",
    );
    repo.commit("tighten");
    let plan = host.run(repo.path(), &["plan"]).ok();
    assert!(plan.stdout.contains("mode 0644 -> 0600"), "{}", plan.stdout);
    host.sync(repo.path()).ok();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(host.path("/etc/a"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o7777, 0o600);
}

#[test]
fn sub_path_and_branch_are_honoured() {
    let repo = Repo::new();
    repo.write("README", "not config\n");
    repo.commit("root");
    git(repo.path(), &["checkout", "-q", "-b", "prod"]);
    repo.write("config/driftless.toml", "roles = [\"app\"]\n");
    repo.write("config/hosts/default.toml", "");
    repo.write(
        "config/roles/app/role.toml",
        "[[files]]\npath = \"/etc/a\"\nsource = \"a\"\n",
    );
    repo.write("config/roles/app/files/a", "from prod\n");
    repo.commit("prod config");
    git(repo.path(), &["checkout", "-q", "main"]);
    let host = Host::new("h");
    host.run(
        repo.path(),
        &["sync", "--once", "--branch", "prod", "--path", "config"],
    )
    .ok();
    assert_eq!(host.read("/etc/a").as_deref(), Some("from prod\n"));
}

#[test]
fn local_source_needs_no_git_binary() {
    let repo = simple_repo(&[("/etc/a", "x\n")]);
    let host = Host::new("h");
    let empty = tempfile::tempdir().unwrap();
    let run = host
        .cmd(repo.path(), &["sync", "--once"])
        .env("PATH", empty.path())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(host.read("/etc/a").as_deref(), Some("x\n"));
    // file:// is a local source too.
    let url = format!("file://{}", repo.path().display());
    repo.write("roles/app/files/f0", "y\n");
    repo.commit("y");
    let run = std::process::Command::new(BIN)
        .args([
            "sync",
            "--once",
            "--no-config",
            "--host",
            "h",
            "--source",
            &url,
            "--root",
        ])
        .arg(host.root.path())
        .arg("--state-dir")
        .arg(host.state.path())
        .env("PATH", empty.path())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(host.read("/etc/a").as_deref(), Some("y\n"));
}

/// Issue 12 §7: a genuine fast-forward whose commit dates were skewed by
/// more than a week (a committer's clock) was refused as rewritten history:
/// the ancestry walk stopped at the date cutoff. Ancestry decides now.
#[test]
fn a_fast_forward_with_skewed_commit_dates_is_applied() {
    let repo = simple_repo(&[("/etc/a", "one\n")]);
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    // A commit dated 30 days before its parent, then a normal one.
    repo.write("roles/app/files/f0", "two\n");
    git(repo.path(), &["add", "-A"]);
    let parent_time: i64 = git(repo.path(), &["log", "-1", "--format=%ct"])
        .trim()
        .parse()
        .unwrap();
    let skewed = format!("@{} +0000", parent_time - 30 * 24 * 3600);
    let out = std::process::Command::new("git")
        .current_dir(repo.path())
        .args(["commit", "-q", "-m", "from a machine with a wrong clock"])
        .env("GIT_COMMITTER_DATE", &skewed)
        .env("GIT_AUTHOR_DATE", &skewed)
        .output()
        .unwrap();
    assert!(out.status.success());
    repo.write("roles/app/files/f0", "three\n");
    repo.commit("a normal commit");
    let run = host.sync(repo.path()).ok();
    assert_eq!(
        host.read("/etc/a").as_deref(),
        Some("three\n"),
        "{}",
        run.stderr
    );

    // A real rewrite is still refused, and says by which rule.
    git(repo.path(), &["reset", "-q", "--hard", "HEAD~2"]);
    repo.write("roles/app/files/f0", "rewritten\n");
    repo.commit("rewritten");
    let refused = host.sync(repo.path()).code(4);
    assert!(
        refused
            .stderr
            .contains("judged by ancestry through the whole history, not by commit dates"),
        "{}",
        refused.stderr
    );
    assert_eq!(host.read("/etc/a").as_deref(), Some("three\n"));
}
