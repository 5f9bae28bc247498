//! Issue 12 §3: the one-time copy of a file driftless takes over was not
//! written atomically and never redone: killed mid-copy, a later prune
//! restored a 300 MiB original truncated. Here a 24 MiB original is taken
//! over while the process is killed at every stage of its copy; the copy
//! is redone, and when the repository stops managing the file the
//! original comes back byte for byte.

use std::os::unix::process::ExitStatusExt;

use crate::support::*;

const TARGET: &str = "/etc/big.dat";

/// 24 MiB of deterministic pseudo-random bytes (xorshift).
fn original() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(24 << 20);
    while out.len() < 24 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn set_role(r: &Repo, managed: bool) {
    let mut role = String::from("[[files]]\npath = \"/etc/keep\"\nsource = \"keep\"\n\n");
    if managed {
        role.push_str(&format!(
            "[[files]]\npath = \"{TARGET}\"\nsource = \"small\"\n"
        ));
    }
    r.write("roles/app/role.toml", &role);
}

/// A repository whose branch `take` manages the file and whose `main`
/// (one commit later) no longer does.
fn repo() -> Repo {
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"app\"]\n");
    r.write("hosts/default.toml", "");
    r.write("roles/app/files/small", "ours\n");
    r.write("roles/app/files/keep", "keep\n");
    set_role(&r, true);
    let take = r.commit("take it over");
    git(r.path(), &["branch", "-f", "take", &take]);
    set_role(&r, false);
    r.commit("let it go");
    r
}

#[test]
fn a_kill_during_the_original_copy_never_restores_a_truncated_file() {
    let big = original();
    let r = repo();
    for point in [
        "originals.chunk:1",
        "originals.chunk:7",
        "originals.chunk:24",
        "originals.renamed",
        "originals.recorded",
    ] {
        let host = Host::new("h");
        std::fs::create_dir_all(host.path("/etc")).unwrap();
        std::fs::write(host.path(TARGET), &big).unwrap();
        let out = host
            .cmd(r.path(), &["sync", "--once", "--branch", "take"])
            .env("DRIFTLESS_TEST_FAILPOINT", point)
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(9),
            "{point}: the kill did not happen"
        );
        assert!(
            std::fs::read(host.path(TARGET)).unwrap() == big,
            "{point}: the original was touched before its copy was safe"
        );
        host.run(r.path(), &["sync", "--once", "--branch", "take"])
            .ok();
        assert_eq!(host.read(TARGET).as_deref(), Some("ours\n"), "{point}");
        host.sync(r.path()).ok();
        assert!(
            std::fs::read(host.path(TARGET)).unwrap() == big,
            "{point}: the original did not come back byte for byte"
        );
    }
}

/// A stored original damaged later (a disk error, a hand edit) is never
/// restored: the sync refuses and the host keeps the managed file.
#[test]
fn a_damaged_stored_original_refuses_the_restore_and_changes_nothing() {
    let host = Host::new("h");
    std::fs::create_dir_all(host.path("/etc")).unwrap();
    std::fs::write(host.path(TARGET), b"the distribution's file, complete\n").unwrap();
    let r = repo();
    host.run(r.path(), &["sync", "--once", "--branch", "take"])
        .ok();
    let dir = host.state.path().join("originals");
    let copy = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_none() && !p.file_name().unwrap().to_string_lossy().starts_with('.')
        })
        .expect("a saved original");
    std::fs::write(&copy, b"the distri").unwrap();
    let before = host.tree();
    let run = host.sync(r.path());
    assert_ne!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("is damaged"), "{}", run.stderr);
    assert!(run.stderr.contains(TARGET), "{}", run.stderr);
    assert_eq!(host.tree(), before, "the host changed");
}
