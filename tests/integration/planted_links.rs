//! Issue 12 §4: symlinks planted under `--root` (a hostile image) or in the
//! state directory were followed out of it: the agent's state, lock and
//! anti-rollback record were written, and facts and account databases
//! read, wherever the links pointed. Each test plants one link to a
//! directory outside the root and checks that nothing there is read or
//! written, and that the error names the link.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

use crate::support::*;

/// Everything under `dir`, for "nothing was written here".
fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            }
            let content = if ft.is_file() {
                std::fs::read(e.path()).unwrap()
            } else {
                Vec::new()
            };
            out.push((e.path().display().to_string(), content));
        }
    }
    out.sort();
    out
}

/// `sync --once` with the state directory at its default place under the
/// root (as `--root` on an image uses it).
fn sync_default_state(host: &Host, repo: &Path) -> Run {
    let state = host.root.path().join("var/lib/driftless");
    let out = Command::new(BIN)
        .args(["sync", "--once", "--no-config", "--host", "h", "--source"])
        .arg(repo)
        .arg("--root")
        .arg(host.root.path())
        .arg("--state-dir")
        .arg(&state)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Plants a link at `planted` (under a fresh host's root) to an empty
/// directory outside, runs `run`, and checks the refusal: exit 1, the
/// link named, nothing written outside, `target` not applied.
fn refuses_link(planted: &str, target: &str, run: impl Fn(&Host) -> Run) {
    let host = Host::new("h");
    let outside = tempfile::tempdir().unwrap();
    let link = host.root.path().join(planted);
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    symlink(outside.path(), &link).unwrap();
    let out = run(&host).code(1);
    assert!(
        out.stderr
            .contains(&format!("{} is a symlink", link.display())),
        "{planted}: {}",
        out.stderr
    );
    assert!(
        listing(outside.path()).is_empty(),
        "{planted}: written outside the root"
    );
    assert_eq!(host.read(target), None, "{planted}: applied anyway");
}

#[test]
fn a_link_at_the_state_directory_under_the_root_is_refused() {
    let repo = simple_repo(&[("/etc/a", "a\n")]);
    for planted in ["var/lib/driftless", "var/lib", "var"] {
        refuses_link(planted, "/etc/a", |host| {
            sync_default_state(host, repo.path())
        });
    }
}

#[test]
fn a_link_at_etc_driftless_is_refused_and_no_floor_is_written_outside() {
    let repo = simple_repo(&[("/srv/a", "a\n")]);
    for planted in ["etc/driftless", "etc"] {
        refuses_link(planted, "/srv/a", |host| {
            host.run(repo.path(), &["sync", "--once", "--allowed-root", "/srv"])
        });
    }
}

/// Facts come from the image, links resolved inside it: a relative
/// `os-release` link (as Debian ships it) works; a link to a host file
/// reads nothing of the host; a FIFO neither hangs the agent nor counts.
#[test]
fn fact_files_resolve_links_inside_the_root_and_never_read_the_host() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("id"), "HOST-MACHINE-ID\n").unwrap();
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"app\"]\n");
    r.write("hosts/default.toml", "");
    r.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/facts\"\ntemplate = \"facts.tera\"\n",
    );
    r.write(
        "roles/app/files/facts.tera",
        "id=[{{ host.facts.machine_id }}] os=[{{ host.facts.os_release.ID | default(value=\"\") }}]\n",
    );
    r.commit("facts");

    let host = Host::new("h");
    let etc = host.root.path().join("etc");
    std::fs::create_dir_all(host.root.path().join("usr/lib")).unwrap();
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(host.root.path().join("usr/lib/os-release"), "ID=imageos\n").unwrap();
    symlink("../usr/lib/os-release", etc.join("os-release")).unwrap();
    symlink(outside.path().join("id"), etc.join("machine-id")).unwrap();
    host.sync(r.path()).ok();
    assert_eq!(
        host.read("/etc/facts").as_deref(),
        Some("id=[] os=[imageos]\n")
    );

    std::fs::remove_file(etc.join("machine-id")).unwrap();
    nix::unistd::mkfifo(
        &etc.join("machine-id"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let run = host.run(r.path(), &["sync", "--once", "--full"]).ok();
    assert_eq!(
        host.read("/etc/facts").as_deref(),
        Some("id=[] os=[imageos]\n")
    );
    assert!(
        run.stderr.contains("machine-id is not a regular file"),
        "{}",
        run.stderr
    );
}

/// The account database of the image, not whatever a link points at: a
/// user only the linked-to file defines is unknown.
#[test]
fn an_account_database_link_out_of_the_root_is_not_followed() {
    if !nix::unistd::geteuid().is_root() {
        // Ownership is only resolved (and applied) as root.
        return crate::support::skip::missing("root (ownership is only resolved as root)");
    }
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(
        outside.path().join("passwd"),
        "evil:x:4242:4242::/:/bin/sh\n",
    )
    .unwrap();
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"app\"]\n");
    r.write("hosts/default.toml", "");
    r.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/owned\"\nsource = \"f\"\nowner = \"evil\"\n",
    );
    r.write("roles/app/files/f", "x\n");
    r.commit("owned");
    let host = Host::new("h");
    std::fs::create_dir_all(host.root.path().join("etc")).unwrap();
    symlink(
        outside.path().join("passwd"),
        host.root.path().join("etc/passwd"),
    )
    .unwrap();
    let run = host.sync(r.path());
    assert_ne!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("evil"), "{}", run.stderr);
    assert_eq!(host.read("/etc/owned"), None);
}

#[test]
fn a_link_in_the_state_directory_is_refused_naming_it() {
    let repo = simple_repo(&[("/etc/a", "a\n")]);
    for name in [
        "history.jsonl",
        "lock",
        "inventory.json",
        "marks.json",
        "tx",
    ] {
        let host = Host::new("h");
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "host file\n").unwrap();
        symlink(&victim, host.state.path().join(name)).unwrap();
        let run = host.sync(repo.path()).code(1);
        assert!(
            run.stderr.contains(&format!(
                "{} is a symlink",
                host.state.path().join(name).display()
            )),
            "{name}: {}",
            run.stderr
        );
        assert_eq!(
            std::fs::read_to_string(&victim).unwrap(),
            "host file\n",
            "{name}"
        );
        assert_eq!(listing(outside.path()).len(), 1, "{name}");
        assert_eq!(host.read("/etc/a"), None, "{name}");
    }
}
