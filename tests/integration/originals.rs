//! Issue 12 §3: the one-time copy of a file driftless takes over was not
//! written atomically and never redone: killed mid-copy, a later prune
//! restored a 300 MiB original truncated. Here a 24 MiB original is taken
//! over while the process is killed at every stage of its copy; the copy
//! is redone, and when the repository stops managing the file the
//! original comes back byte for byte.

use std::os::unix::process::ExitStatusExt;

use crate::support::*;

const TARGET: &str = "/etc/big.dat";

/// `len` deterministic pseudo-random bytes (xorshift).
fn original(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The saved copy in the host's `originals/` (not a sidecar, not a temp).
fn stored_copy(host: &Host) -> std::path::PathBuf {
    std::fs::read_dir(host.state.path().join("originals"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_none() && !p.file_name().unwrap().to_string_lossy().starts_with('.')
        })
        .expect("a saved original")
}

/// Temp files left in `originals/`.
fn temps(host: &Host) -> Vec<String> {
    std::fs::read_dir(host.state.path().join("originals"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

/// The failpoints a run reached, in order.
fn trace(file: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .expect("no failpoint trace: failpoints exist in debug builds only")
        .lines()
        .map(str::to_string)
        .collect()
}

fn host_with(content: &[u8]) -> Host {
    let host = Host::new("h");
    std::fs::create_dir_all(host.path("/etc")).unwrap();
    std::fs::write(host.path(TARGET), content).unwrap();
    host
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
    let big = original(24 << 20);
    let r = repo();
    let dir = tempfile::tempdir().unwrap();
    for point in [
        "originals.chunk:1",
        "originals.chunk:7",
        "originals.chunk:23",
        "originals.chunk:24",
        "originals.renamed",
        "originals.recorded",
    ] {
        let host = host_with(&big);
        let killed = dir.path().join("killed");
        let _ = std::fs::remove_file(&killed);
        let out = host
            .cmd(r.path(), &["sync", "--once", "--branch", "take"])
            .env("DRIFTLESS_TEST_FAILPOINT", point)
            .env("DRIFTLESS_TEST_FAILPOINT_TRACE", &killed)
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(9),
            "{point}: the kill did not happen"
        );
        let seen = trace(&killed);
        let name = point.split(':').next().unwrap();
        assert_eq!(seen.last().map(String::as_str), Some(name), "{point}");
        assert!(
            !seen.iter().any(|p| p.starts_with("apply.")),
            "{point}: the transaction got past prepare before the original was saved: {seen:?}"
        );
        assert!(
            std::fs::read(host.path(TARGET)).unwrap() == big,
            "{point}: the original was touched before its copy was safe"
        );

        // The next sync takes the file over; the copy is redone, always
        // before the switch.
        let next = dir.path().join("next");
        let _ = std::fs::remove_file(&next);
        let out = host
            .cmd(r.path(), &["sync", "--once", "--branch", "take"])
            .env("DRIFTLESS_TEST_FAILPOINT_TRACE", &next)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{point}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let seen = trace(&next);
        let recorded = seen.iter().position(|p| p == "originals.recorded");
        let switch = seen.iter().position(|p| p == "apply.switch");
        assert!(switch.is_some(), "{point}: no switch: {seen:?}");
        // (Even a complete, recorded copy: the rollback of the killed
        // transaction removed the copy it had made, see
        // `Journal::saved_originals`.)
        assert!(
            recorded.is_some() && recorded < switch,
            "{point}: the copy was not redone before the switch: {seen:?}"
        );
        assert_eq!(host.read(TARGET).as_deref(), Some("ours\n"), "{point}");
        assert_eq!(temps(&host), Vec::<String>::new(), "{point}: stale temps");

        // The repository lets the file go: the original comes back whole.
        host.sync(r.path()).ok();
        assert!(
            std::fs::read(host.path(TARGET)).unwrap() == big,
            "{point}: the original did not come back byte for byte"
        );
    }
}

/// Killed mid-copy, then the repository stopped managing the file before
/// any sync took it over: the file was never ours, so nothing is restored
/// (least of all the partial copy) and the original stays as it was.
#[test]
fn a_copy_killed_before_the_take_over_is_never_restored_when_the_repo_lets_go() {
    let big = original(3 << 20);
    let r = repo();
    let host = host_with(&big);
    let out = host
        .cmd(r.path(), &["sync", "--once", "--branch", "take"])
        .env("DRIFTLESS_TEST_FAILPOINT", "originals.chunk:2")
        .output()
        .unwrap();
    assert_eq!(out.status.signal(), Some(9));
    host.sync(r.path()).ok();
    assert!(std::fs::read(host.path(TARGET)).unwrap() == big);
    assert_eq!(host.read("/etc/keep").as_deref(), Some("keep\n"));
}

/// A copy with no size and checksum record (as an older driftless left
/// every copy, complete or cut short) is not restored: the sync refuses,
/// names the file, changes nothing, and prints the record to write once
/// the copy is checked; written, the restore goes through.
#[test]
fn a_copy_without_its_record_is_not_restored_until_it_is_vouched_for() {
    let content = original(100_000);
    let host = host_with(&content);
    let r = repo();
    host.run(r.path(), &["sync", "--once", "--branch", "take"])
        .ok();
    let copy = stored_copy(&host);
    let side = copy.with_file_name(format!(
        "{}.json",
        copy.file_name().unwrap().to_string_lossy()
    ));
    std::fs::remove_file(&side).unwrap();
    let run = release_refused(&host, &r, &copy, "no record");
    // The message leaves the checksum to the user (the copy may be a
    // secret's original, and messages reach the journal and webhooks).
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(&copy).unwrap()))
    };
    assert!(!run.stderr.contains(&sha[..12]), "{}", run.stderr);
    assert!(
        run.stderr
            .contains(&format!("sha256sum {}", copy.display())),
        "{}",
        run.stderr
    );
    let record = run
        .stderr
        .split_once("by writing ")
        .and_then(|(_, rest)| rest.split_once(" to "))
        .map(|(json, _)| json.replace("<sha256sum>", &sha))
        .unwrap_or_else(|| panic!("no record to write in: {}", run.stderr));
    std::fs::write(&side, record).unwrap();
    host.sync(r.path()).ok();
    assert!(std::fs::read(host.path(TARGET)).unwrap() == content);
}

/// Syncing `r` (which releases TARGET) is refused: a non-zero exit whose
/// message says `why` and names TARGET and the stored `copy`, and the host
/// exactly as it was.
#[track_caller]
fn release_refused(host: &Host, r: &Repo, copy: &std::path::Path, why: &str) -> Run {
    let before = host.tree();
    let run = host.sync(r.path());
    assert_ne!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains(why), "{}", run.stderr);
    assert!(run.stderr.contains(TARGET), "{}", run.stderr);
    assert!(
        run.stderr.contains(&copy.display().to_string()),
        "{}",
        run.stderr
    );
    assert_eq!(host.tree(), before, "the host changed");
    run
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
    let copy = stored_copy(&host);
    std::fs::write(&copy, b"the distri").unwrap();
    release_refused(&host, &r, &copy, "is damaged");
    assert_eq!(
        host.read(TARGET).as_deref(),
        Some("ours\n"),
        "the managed file must stay"
    );
}

/// A copy was never retired: take over, let go (restored), the admin
/// edits the file, take over again, let go: the *first* original came
/// back, and the admin's edit was lost. The copy of a new take-over is the
/// file as it is then, and a restored copy is removed.
#[test]
fn a_second_take_over_saves_the_file_as_it_is_then() {
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"app\"]\n");
    r.write("hosts/default.toml", "");
    r.write("roles/app/files/small", "ours\n");
    r.write("roles/app/files/keep", "keep\n");
    let host = host_with(b"first original\n");
    let step = |managed: bool, msg: &str| {
        set_role(&r, managed);
        r.commit(msg);
        host.sync(r.path()).ok();
    };
    step(true, "take it over");
    assert_eq!(host.read(TARGET).as_deref(), Some("ours\n"));
    step(false, "let it go");
    assert_eq!(host.read(TARGET).as_deref(), Some("first original\n"));
    std::fs::write(host.path(TARGET), "the admin's edit\n").unwrap();
    step(true, "take it over again");
    assert_eq!(host.read(TARGET).as_deref(), Some("ours\n"));
    step(false, "let it go again");
    assert_eq!(host.read(TARGET).as_deref(), Some("the admin's edit\n"));
    let left: Vec<_> = std::fs::read_dir(host.state.path().join("originals"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "a restored copy stayed: {left:?}");
}
