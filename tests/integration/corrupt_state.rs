//! Issue 12 §6: a corrupt inventory, marks file or cache stopped the agent
//! forever, with no remedy in the message.

use crate::support::*;

/// A corrupt marks file: the agent halts (exit 5) with the command that
/// resumes it, and `sync --retry` does.
#[test]
fn corrupt_marks_halt_with_the_remedy_instead_of_failing_forever() {
    let repo = simple_repo(&[("/etc/a", "a\n")]);
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    std::fs::write(host.state.path().join("marks.json"), "{\"bad\": 3").unwrap();
    let check = host.run(repo.path(), &["state", "check"]).code(1);
    assert!(check.stdout.contains("marks.json"), "{}", check.stdout);
    let run = host.sync(repo.path()).code(5);
    assert!(run.stderr.contains("sync --retry"), "{}", run.stderr);
    assert!(run.stderr.contains("marks.json.corrupt-"), "{}", run.stderr);
    host.run(repo.path(), &["sync", "--once", "--retry"]).ok();
    host.sync(repo.path()).ok();
    host.run(repo.path(), &["state", "check"]).ok();
}

/// A corrupt inventory is rebuilt from the host: the next sync succeeds
/// and a later commit applies normally.
#[test]
fn a_corrupt_inventory_is_rebuilt_and_the_host_converges() {
    let repo = simple_repo(&[("/etc/a", "a\n")]);
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    std::fs::write(host.state.path().join("inventory.json"), "\0garbage").unwrap();
    std::fs::write(host.state.path().join("last-run.json"), "{").unwrap();
    let run = host.sync(repo.path()).ok();
    assert!(run.stderr.contains("corrupt state file"), "{}", run.stderr);
    assert_eq!(host.read("/etc/a").as_deref(), Some("a\n"));
    repo.write("roles/app/files/f0", "a v2\n");
    repo.commit("v2");
    host.sync(repo.path()).ok();
    assert_eq!(host.read("/etc/a").as_deref(), Some("a v2\n"));
    let check = host.run(repo.path(), &["state", "check"]).ok();
    assert!(
        check.stdout.contains("every file is usable"),
        "{}",
        check.stdout
    );
}

/// The floor is never guessed: `state repair` reports it and leaves it.
#[test]
fn a_corrupt_floor_is_refused_with_the_command_that_resolves_it() {
    let repo = simple_repo(&[("/etc/a", "a\n")]);
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    let floor = host.path("/etc/driftless/applied-commit.json");
    std::fs::write(&floor, "not json").unwrap();
    let run = host.sync(repo.path());
    assert_ne!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("applied-commit.json"), "{}", run.stderr);
    let rep = host.run(repo.path(), &["state", "repair"]).ok();
    assert!(
        rep.stdout.contains(&format!("rm {}", floor.display())),
        "{}",
        rep.stdout
    );
    assert_eq!(std::fs::read_to_string(&floor).unwrap(), "not json");
}

/// Issue 12 §6: a flipped bit that still parses (a digit of the applied
/// commit) was believed. State files carry a checksum now: the inventory
/// is then rebuilt like any corrupt one, and the anti-rollback record is
/// refused with its remedy, never trusted.
#[test]
fn a_flipped_bit_that_still_parses_is_caught_by_the_checksum() {
    let repo = simple_repo(&[("/etc/a", "a\n")]);
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    let commit = repo.head();
    let flip = |p: &std::path::Path| {
        let text = std::fs::read_to_string(p).unwrap();
        assert!(text.contains(&commit), "{text}");
        let last = commit.chars().last().unwrap();
        let other = if last == '0' { '1' } else { '0' };
        let flipped = format!("{}{other}", &commit[..commit.len() - 1]);
        std::fs::write(p, text.replace(&commit, &flipped)).unwrap();
    };
    flip(&host.state.path().join("inventory.json"));
    let run = host.sync(repo.path()).ok();
    assert!(run.stderr.contains("checksum"), "{}", run.stderr);
    assert_eq!(host.read("/etc/a").as_deref(), Some("a\n"));

    flip(&host.path("/etc/driftless/applied-commit.json"));
    let run = host.sync(repo.path()).code(1);
    assert!(
        run.stderr.contains("applied-commit.json") && run.stderr.contains("checksum"),
        "{}",
        run.stderr
    );
}
