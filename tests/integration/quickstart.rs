//! The README's first command: the bundled example applied into a prefix.

use crate::support::*;

#[test]
fn quickstart_applies_then_second_run_changes_nothing() {
    let repo = Repo::quickstart();
    let host = Host::new("web1");
    let run = host.sync(repo.path()).ok();
    assert!(run.stdout.contains("7 created"), "{}", run.stdout);
    // The demo secret, decrypted, private.
    let db = host.read("/etc/app/database.conf").unwrap();
    assert!(db.contains("password = demo-password-not-a-secret"), "{db}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(host.path("/etc/app/secrets.json"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let motd = host.read("/etc/motd").unwrap();
    assert!(motd.contains("web1 (prod) — Example Corp"), "{motd}");
    let site = host.read("/etc/nginx/conf.d/site.conf").unwrap();
    assert!(
        site.contains("2048 connections"),
        "host vars must win over role vars: {site}"
    );
    assert!(
        site.contains("listen 80;"),
        "role vars must survive the merge: {site}"
    );
    assert_eq!(
        host.read("/etc/profile.d/driftless-umask.sh").unwrap(),
        std::fs::read_to_string(workspace().join("examples/quickstart/roles/base/files/umask.sh"))
            .unwrap()
    );

    let before = host.stamps();
    let again = host.sync(repo.path()).ok();
    assert!(again.stdout.contains("already applied"), "{}", again.stdout);
    let after = host.stamps();
    assert_eq!(before, after, "a no-op sync must not touch any file");
}

#[test]
fn unknown_host_falls_back_to_default() {
    let repo = Repo::quickstart();
    let host = Host::new("stranger");
    host.sync(repo.path()).ok();
    assert!(host
        .read("/etc/motd")
        .unwrap()
        .contains("stranger (unassigned)"));
    assert!(host.read("/etc/nginx/conf.d/site.conf").is_none());
}

#[test]
fn quickstart_validates() {
    let run = std::process::Command::new(BIN)
        .args(["validate", "--no-config", "--age-key"])
        .arg(workspace().join("examples/DEMO-age-key.txt"))
        .arg(workspace().join("examples/quickstart"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}");
    assert!(stdout.contains("3 host(s) valid, 0 invalid"), "{stdout}");
}
