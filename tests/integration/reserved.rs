//! Issue 12 §5: the repository must not own the agent. A role could claim
//! the anti-rollback floor, the trust anchors, agent.toml and files in the
//! state directory (writing marks.json halted the agent), and a careless
//! `mode = "4777"` went through.

use std::process::Command;

use crate::support::*;

/// A repository whose one role manages `target` (with `extra` keys).
fn claiming(target: &str, extra: &str) -> Repo {
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"app\"]\n");
    r.write("hosts/default.toml", "");
    r.write("roles/app/files/f", "payload\n");
    r.write(
        "roles/app/role.toml",
        &format!("[[files]]\npath = \"{target}\"\nsource = \"f\"\n{extra}"),
    );
    r.commit("claims");
    r
}

/// The sync, the plan and validate all refuse with exit 3, naming the
/// role file, the target and `needle`; the host is unchanged.
#[track_caller]
fn refused(target: &str, extra: &str, needle: &str) {
    let repo = claiming(target, extra);
    let host = Host::new("h");
    let before = host.tree();
    for args in [&["sync", "--once"][..], &["plan"][..]] {
        let run = host.run(repo.path(), args).code(3);
        for want in ["roles/app/role.toml", target, needle] {
            assert!(
                run.stderr.contains(want),
                "{args:?}: {want:?} not in {}",
                run.stderr
            );
        }
    }
    assert_eq!(host.tree(), before, "the host changed");
    let (code, text) = validate(repo.path(), &[]);
    assert_eq!(code, Some(3), "{text}");
    for want in ["roles/app/role.toml:1 files[0]", target, needle] {
        assert!(text.contains(want), "validate: {want:?} not in {text}");
    }
}

#[test]
fn a_role_cannot_claim_the_anti_rollback_floor() {
    refused(
        "/etc/driftless/applied-commit.json",
        "",
        "reserved for the agent",
    );
}

#[test]
fn a_role_cannot_replace_the_allowed_signers_or_agent_toml() {
    refused("/etc/driftless/allowed_signers", "", "trust anchors");
    refused("/etc/driftless/agent.toml", "", "reserved for the agent");
}

#[test]
fn a_role_cannot_write_marks_json_in_the_state_dir() {
    refused("/var/lib/driftless/marks.json", "", "the agent's state");
}

#[test]
fn a_role_cannot_replace_a_directory_above_the_agents_files() {
    refused("/etc", "", "reserved for the agent");
}

#[test]
fn setuid_mode_is_refused_without_opt_in() {
    refused("/etc/app.bin", "mode = \"4755\"\n", "setuid");
    refused("/etc/app.conf", "mode = \"0666\"\n", "world-writable");
}

#[test]
fn world_writable_mode_is_allowed_with_opt_in() {
    let repo = claiming(
        "/etc/shared.txt",
        "mode = \"0666\"\nallow_special_mode = true\n",
    );
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    let m = std::fs::metadata(host.path("/etc/shared.txt")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777,
        0o666
    );
}

/// A `state_dir` under the root, configured as `<root>/srv/x/../state/`: it
/// was not reserved at all (the path did not parse as a target path), so a
/// role could write the agent's marks.json.
#[test]
fn a_role_cannot_write_into_a_configured_state_dir_given_unnormalised() {
    let repo = claiming("/srv/state/marks.json", "");
    let host = Host::new("h");
    let state = format!("{}/srv/x/../state/", host.root.path().display());
    let outside_state = |t: Vec<(String, Vec<u8>)>| -> Vec<(String, Vec<u8>)> {
        t.into_iter()
            .filter(|(p, _)| !p.starts_with("/srv/state/"))
            .collect()
    };
    let before = outside_state(host.tree());
    for args in [&["sync", "--once"][..], &["plan"][..]] {
        let out = Command::new(BIN)
            .args(args)
            .args(["--no-config", "--host", "h", "--source"])
            .arg(repo.path())
            .arg("--root")
            .arg(host.root.path())
            .args(["--state-dir", &state])
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {err}");
        for want in [
            "roles/app/role.toml:1 files[0]",
            "/srv/state/marks.json",
            "/srv/state holds the agent's state (state_dir)",
        ] {
            assert!(err.contains(want), "{args:?}: {want:?} not in {err}");
        }
    }
    assert_eq!(outside_state(host.tree()), before, "the host changed");
    // The agent's own marks.json, if any, is not the repository's payload.
    assert_ne!(
        host.read("/srv/state/marks.json").as_deref(),
        Some("payload\n")
    );
}

/// `rollback --to` an old commit goes through the same loader: a commit
/// that claims the floor cannot be rolled back to.
#[test]
fn rollback_to_a_commit_claiming_the_floor_is_refused() {
    let repo = claiming("/etc/driftless/applied-commit.json", "");
    let bad = repo.head();
    repo.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/app.conf\"\nsource = \"f\"\n",
    );
    repo.commit("fixed");
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    let before = host.tree();
    let run = host
        .run(repo.path(), &["rollback", "--to", &bad[..12]])
        .code(3);
    for want in [
        "roles/app/role.toml:1 files[0]",
        "/etc/driftless/applied-commit.json",
        "reserved for the agent",
    ] {
        assert!(run.stderr.contains(want), "{want:?} not in {}", run.stderr);
    }
    assert_eq!(host.tree(), before, "the host changed");
}

/// A role could stop the agent for good: a drop-in with an empty
/// `ExecStart=`, its timer disabled in `[[units]]`, its cron job or udev
/// rule replaced, or `restart = ["driftless.service"]` killing the sync
/// that applies it. How the agent is started is reserved like its files.
#[test]
fn a_role_cannot_stop_or_reconfigure_the_agent_itself() {
    for target in [
        "/etc/systemd/system/driftless.service.d/override.conf",
        "/etc/systemd/system/driftless.timer",
        "/etc/systemd/system/driftless-usb@.service.d/x.conf",
        "/etc/cron.d/driftless",
        "/etc/udev/rules.d/99-driftless-usb.rules",
        // Drop-ins systemd reads before /etc/systemd/system's, and units
        // under /usr/local (an allowed root).
        "/etc/systemd/system.control/driftless.service.d/50-x.conf",
        "/usr/local/lib/systemd/system/driftless.service.d/x.conf",
        // A quadlet generates the unit it is named after.
        "/etc/containers/systemd/driftless.container",
        "/etc/containers/systemd/driftless-once.kube",
    ] {
        refused(target, "", "how the agent is started");
    }
    for (extra, unit) in [
        (
            "\n[[units]]\nname = \"driftless.timer\"\nenabled = false\n",
            "driftless.timer",
        ),
        (
            "on_change = { restart = [\"driftless.service\"] }\n",
            "driftless.service",
        ),
        (
            "\n[[units]]\nname = \"driftless-usb@sdb1.service\"\nstarted = false\n",
            "driftless-usb@sdb1.service",
        ),
    ] {
        let repo = claiming("/etc/app.conf", extra);
        let host = Host::new("h");
        let run = host.sync(repo.path()).code(3);
        assert!(
            run.stderr
                .contains(&format!("{unit} is the agent's own unit")),
            "{unit}: {}",
            run.stderr
        );
        assert_eq!(host.read("/etc/app.conf"), None);
    }
}
