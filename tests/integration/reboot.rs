//! Reboot required (issue #16, step 8 of docs/design/resources.md): a file
//! with `reboot = true` whose change commits makes the agent write
//! `run/reboot-required` and `run/reboot-required.pkgs` under the `--root`
//! prefix, and `status` and the metrics say so until the boot id changes
//! (`DRIFTLESS_TEST_BOOT_ID` stands in for the kernel's).

use std::os::unix::fs::MetadataExt;
use std::process::Command;

use crate::support::*;

const FLAG: &str = "/run/reboot-required";
const PKGS: &str = "/run/reboot-required.pkgs";
const PROM: &str = "/var/lib/prometheus/node-exporter/driftless.prom";

/// Role `app`: `/etc/default/grub` (`reboot = true`, content `grub`) and
/// `/etc/motd` (`motd`), plus `extra` role.toml text.
fn set_role(r: &Repo, grub: Option<&str>, motd: &str, extra: &str) {
    let mut role = String::new();
    if let Some(grub) = grub {
        r.write("roles/app/files/grub", grub);
        role.push_str(
            "[[files]]\npath = \"/etc/default/grub\"\nsource = \"grub\"\nreboot = true\n\n",
        );
    }
    r.write("roles/app/files/motd", motd);
    role.push_str("[[files]]\npath = \"/etc/motd\"\nsource = \"motd\"\n\n");
    role.push_str(extra);
    r.write("roles/app/role.toml", &role);
}

fn repo(grub: Option<&str>, motd: &str, extra: &str) -> Repo {
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"app\"]\n");
    r.write("hosts/default.toml", "");
    set_role(&r, grub, motd, extra);
    r.commit("v1");
    r
}

fn cmd(host: &Host, repo: &Repo, boot: &str, args: &[&str]) -> Command {
    let mut c = host.cmd(repo.path(), args);
    c.env("DRIFTLESS_TEST_BOOT_ID", boot);
    c
}

fn run(host: &Host, repo: &Repo, boot: &str, args: &[&str]) -> Run {
    let out = cmd(host, repo, boot, args).output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn sync(host: &Host, repo: &Repo, boot: &str) -> Run {
    run(host, repo, boot, &["sync", "--once", "--run-checks"])
}

/// (inode, mtime in ns) of a file under the root.
fn stamp(host: &Host, target: &str) -> (u64, i64) {
    let m = std::fs::symlink_metadata(host.path(target)).unwrap();
    (m.ino(), m.mtime() * 1_000_000_000 + m.mtime_nsec())
}

fn status_json(host: &Host, repo: &Repo, boot: &str) -> serde_json::Value {
    let out = run(host, repo, boot, &["status", "--format", "json"]).ok();
    serde_json::from_str(&out.stdout).unwrap()
}

fn inventory_format(host: &Host) -> u64 {
    let text = std::fs::read_to_string(host.state.path().join("inventory.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["driftless_state"].as_u64().unwrap()
}

#[test]
fn a_committed_change_writes_both_files_and_a_no_op_rewrites_nothing() {
    let r = repo(Some("GRUB_TIMEOUT=5\n"), "hi\n", "");
    let host = Host::new("h");
    std::fs::create_dir_all(host.path("/var/lib/prometheus/node-exporter")).unwrap();
    // A package driftless does not know about asked before.
    std::fs::create_dir_all(host.path("/run")).unwrap();
    std::fs::write(host.path(PKGS), "linux-image-6.1.0-13-amd64\n").unwrap();
    let first = sync(&host, &r, "boot-1").ok();
    assert!(first.stderr.contains("reboot required"), "{}", first.stderr);
    assert_eq!(
        host.read(FLAG).as_deref(),
        Some("*** System restart required ***\n")
    );
    assert_eq!(
        host.read(PKGS).as_deref(),
        Some("linux-image-6.1.0-13-amd64\ndriftless\n")
    );
    assert_eq!(inventory_format(&host), 2);
    let prom = std::fs::read_to_string(host.path(PROM)).unwrap();
    assert!(prom.contains("\ndriftless_reboot_required 1\n"), "{prom}");

    // No-ops, quick and full: nothing rewritten.
    let (flag, pkgs) = (stamp(&host, FLAG), stamp(&host, PKGS));
    std::thread::sleep(std::time::Duration::from_millis(20));
    sync(&host, &r, "boot-1").ok();
    run(&host, &r, "boot-1", &["sync", "--once", "--full"]).ok();
    assert_eq!(stamp(&host, FLAG), flag);
    assert_eq!(stamp(&host, PKGS), pkgs);
    let prom = std::fs::read_to_string(host.path(PROM)).unwrap();
    assert!(prom.contains("\ndriftless_reboot_required 1\n"), "{prom}");

    // Status, text and JSON.
    let text = run(&host, &r, "boot-1", &["status"]).ok().stdout;
    let commit = r.head();
    assert!(
        text.contains(&format!(
            "reboot required: yes (files: /etc/default/grub (commit {}))",
            &commit[..12]
        )),
        "{text}"
    );
    let json = status_json(&host, &r, "boot-1");
    let rr = &json["status"]["reboot_required"];
    assert_eq!(rr["required"], true, "{json}");
    assert_eq!(rr["files"][0]["path"], "/etc/default/grub", "{json}");
    assert_eq!(rr["files"][0]["commit"], commit.as_str(), "{json}");
    assert_eq!(rr["files"][0]["package"], "driftless", "{json}");

    // A change to a file without `reboot`, in the same boot: the request
    // stays, nothing is rewritten.
    set_role(&r, Some("GRUB_TIMEOUT=5\n"), "hello\n", "");
    r.commit("motd");
    sync(&host, &r, "boot-1").ok();
    assert_eq!(stamp(&host, FLAG), flag);
    assert_eq!(stamp(&host, PKGS), pkgs);

    // After a reboot: done (on a live host /run is empty; here the files
    // are left as the prefix has them).
    assert!(!run(&host, &r, "boot-2", &["status"])
        .ok()
        .stdout
        .contains("reboot required"));
    assert_eq!(
        status_json(&host, &r, "boot-2")["status"]["reboot_required"]["required"],
        false
    );
    sync(&host, &r, "boot-2").ok();
    let prom = std::fs::read_to_string(host.path(PROM)).unwrap();
    assert!(prom.contains("\ndriftless_reboot_required 0\n"), "{prom}");
    // The next commit drops the stale request: back to format 1.
    set_role(&r, Some("GRUB_TIMEOUT=5\n"), "hello again\n", "");
    r.commit("motd 2");
    sync(&host, &r, "boot-2").ok();
    let inv = std::fs::read_to_string(host.state.path().join("inventory.json")).unwrap();
    assert!(!inv.contains("boot-1"), "{inv}");
}

#[test]
fn the_owning_package_is_named_and_a_prune_counts() {
    let r = repo(Some("GRUB_TIMEOUT=5\n"), "hi\n", "");
    let host = Host::new("h");
    let info = host.path("/var/lib/dpkg/info");
    std::fs::create_dir_all(&info).unwrap();
    std::fs::write(
        info.join("grub-common:amd64.list"),
        "/.\n/etc\n/etc/default\n/etc/default/grub\n",
    )
    .unwrap();
    sync(&host, &r, "b").ok();
    assert_eq!(host.read(PKGS).as_deref(), Some("grub-common\n"));

    // Removed from the repository in a later boot: the prune asks again.
    set_role(&r, None, "hi\n", "");
    r.commit("no grub");
    sync(&host, &r, "b2").ok();
    assert!(host.read("/etc/default/grub").is_none());
    let json = status_json(&host, &r, "b2");
    assert_eq!(
        json["status"]["reboot_required"]["files"][0]["path"], "/etc/default/grub",
        "{json}"
    );
}

#[test]
fn a_change_to_a_file_without_reboot_and_a_plan_write_nothing() {
    let r = repo(None, "hi\n", "");
    let host = Host::new("h");
    sync(&host, &r, "b").ok();
    assert!(!host.path("/run").exists());
    assert_eq!(inventory_format(&host), 1);

    // `plan` says it, writes nothing.
    set_role(&r, Some("x\n"), "hi\n", "");
    r.commit("grub");
    let plan = run(&host, &r, "b", &["plan"]).ok().stdout;
    assert!(
        plan.contains("reboot required after this commit: file /etc/default/grub"),
        "{plan}"
    );
    let plan = run(&host, &r, "b", &["plan", "--format", "json"])
        .ok()
        .stdout;
    let v: serde_json::Value = serde_json::from_str(&plan).unwrap();
    assert_eq!(
        v["status"]["reboot_required"][0], "/etc/default/grub",
        "{v}"
    );
    assert!(!host.path("/run").exists());
}

#[test]
fn a_reverted_commit_writes_nothing() {
    let r = repo(None, "hi\n", "");
    let host = Host::new("h");
    sync(&host, &r, "b").ok();
    set_role(
        &r,
        Some("x\n"),
        "hi\n",
        "[[checks]]\nname = \"fails\"\nretries = 1\ncommand = { argv = [\"/bin/false\"] }\n",
    );
    r.commit("grub, failing check");
    let out = sync(&host, &r, "b");
    assert_ne!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("reverted"), "{}", out.stderr);
    assert!(host.read("/etc/default/grub").is_none());
    assert!(!host.path("/run").exists());
    assert_eq!(
        status_json(&host, &r, "b")["status"]["reboot_required"]["required"],
        false
    );
}

#[test]
fn links_planted_in_run_are_replaced_never_followed() {
    let r = repo(Some("x\n"), "hi\n", "");
    let host = Host::new("h");
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, "untouched\n").unwrap();
    std::fs::create_dir_all(host.path("/run")).unwrap();
    std::os::unix::fs::symlink(&victim, host.path(FLAG)).unwrap();
    std::os::unix::fs::symlink(&victim, host.path(PKGS)).unwrap();
    sync(&host, &r, "b").ok();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched\n");
    for f in [FLAG, PKGS] {
        assert!(std::fs::symlink_metadata(host.path(f))
            .unwrap()
            .file_type()
            .is_file());
    }
    assert_eq!(host.read(PKGS).as_deref(), Some("driftless\n"));

    // A link at `run/` itself: refused (named), the commit stands.
    let host = Host::new("h");
    std::fs::create_dir(outside.path().join("run")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("run"), host.path("/run")).unwrap();
    let out = sync(&host, &r, "b").ok();
    assert!(out.stderr.contains("symlink"), "{}", out.stderr);
    assert_eq!(
        std::fs::read_dir(outside.path().join("run"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(host.read("/etc/default/grub").as_deref(), Some("x\n"));
}

/// Killed after the commit point, before the files were written: the next
/// sync writes them (the request is in the committed inventory).
#[test]
fn a_crash_after_the_commit_loses_no_request() {
    let r = repo(None, "hi\n", "");
    let host = Host::new("h");
    sync(&host, &r, "b").ok();
    set_role(&r, Some("x\n"), "hi\n", "");
    r.commit("grub");
    let out = cmd(&host, &r, "b", &["sync", "--once", "--run-checks"])
        .env("DRIFTLESS_TEST_FAILPOINT", "apply.commit.journal:kill")
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(9));
    assert!(!host.path(FLAG).exists());
    sync(&host, &r, "b").ok();
    assert_eq!(
        host.read(FLAG).as_deref(),
        Some("*** System restart required ***\n")
    );
    assert_eq!(host.read(PKGS).as_deref(), Some("driftless\n"));
}
