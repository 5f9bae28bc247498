//! Durability barriers (issue 18): every `fsync`, `fdatasync`, `syncfs`
//! and `sync_file_range` is a journal commit on a real host's filesystem,
//! so a sync issues only those its crash guarantees need. A one-file
//! change costs at most 5 (it cost 19), whatever the size of the
//! configuration; a sync that changes nothing costs none. Counted by
//! running the real binary under `strace -f -c` (Debian package `strace`).
//! The reasons for each barrier are in `agent/src/effects/apply/mod.rs`.

use std::process::Command;

use crate::support::*;

const BARRIERS: [&str; 4] = ["fsync", "fdatasync", "syncfs", "sync_file_range"];

/// Traced beside the barriers, and never counted as one (see
/// `traced_sync`).
const CONTROL: &str = "execve";

fn have_strace() -> bool {
    Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `driftless sync --once` for `host` under `strace -f -c`: the run,
/// and the number of calls of each barrier system call.
fn traced_sync(host: &Host, repo: &Repo) -> (Run, Vec<(String, u64)>) {
    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("strace.txt");
    let inner = host.cmd(repo.path(), &["sync", "--once"]);
    let mut c = Command::new("strace");
    c.args(["-f", "-c", "-e"])
        // execve too, the control: the agent's own exec is always there,
        // so a summary that lacks it was not read (a missing file or
        // another strace format would otherwise count as no barrier).
        .arg(format!("trace={},{CONTROL}", BARRIERS.join(",")))
        .arg("-o")
        .arg(&summary)
        .arg(inner.get_program())
        .args(inner.get_args());
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    let out = c.output().expect("strace runs");
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    let text = std::fs::read_to_string(&summary).unwrap_or_default();
    // `% time  seconds  usecs/call  calls  [errors]  syscall`
    let rows: Vec<(String, u64)> = text
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let name = *cols.last()?;
            if !BARRIERS.contains(&name) && name != CONTROL {
                return None;
            }
            Some((name.to_string(), cols.get(3)?.parse().ok()?))
        })
        .collect();
    assert!(
        rows.iter().any(|(name, n)| name == CONTROL && *n >= 1),
        "no {CONTROL} row in strace's summary: it was not read, so it cannot count barriers\n{text}\n{}",
        run.stderr
    );
    let counts = rows
        .into_iter()
        .filter(|(name, _)| name != CONTROL)
        .collect();
    (run, counts)
}

fn total(counts: &[(String, u64)]) -> u64 {
    counts.iter().map(|(_, n)| n).sum()
}

/// 50 templated files, so that a barrier per managed file would show.
fn repo_of_many() -> Repo {
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"app\"]\n");
    r.write("hosts/default.toml", "");
    let mut role = String::new();
    for i in 0..50 {
        role.push_str(&format!(
            "[[files]]\npath = \"/etc/app/f{i:02}.conf\"\ntemplate = \"f{i:02}.tera\"\n\n"
        ));
        r.write(
            &format!("roles/app/files/f{i:02}.tera"),
            &format!("file {i} on {{{{ host.name }}}}\n"),
        );
    }
    r.write("roles/app/role.toml", &role);
    r.commit("initial");
    r
}

#[test]
fn a_one_file_change_issues_at_most_five_barriers() {
    if !have_strace() {
        return skip::missing("strace (Debian package strace)");
    }
    one_file_changes(Host::new("h"));
}

/// The same with the inventory kept as a base and `inventory.delta` (as
/// at 1,000 files and more): a commit appends a line instead of replacing
/// the inventory, with no more barriers.
#[test]
fn a_one_file_change_with_the_inventory_delta_issues_at_most_five_barriers() {
    if !have_strace() {
        return skip::missing("strace (Debian package strace)");
    }
    let mut host = Host::new("h");
    host.env
        .push(("DRIFTLESS_TEST_INVENTORY_LOG_FROM".into(), "1".into()));
    let lines = one_file_changes(host);
    assert_eq!(lines, 2, "one line per commit in inventory.delta");
}

/// A template edited, then a file drifted: each synced under `strace`.
/// Returns the number of lines of `inventory.delta` afterwards.
fn one_file_changes(host: Host) -> usize {
    let repo = repo_of_many();
    host.sync(repo.path()).ok();
    host.sync(repo.path()).ok();
    // One edited template: the quick path of a new commit.
    repo.write(
        "roles/app/files/f07.tera",
        "file 7, edited, on {{ host.name }}\n",
    );
    repo.commit("edit one template");
    let (run, counts) = traced_sync(&host, &repo);
    let run = run.ok();
    assert!(
        run.stdout.contains("0 created, 1 changed, 0 removed"),
        "{}",
        run.stdout
    );
    assert_eq!(
        host.read("/etc/app/f07.conf").as_deref(),
        Some("file 7, edited, on h\n")
    );
    assert!(total(&counts) <= 5, "a one-file change: {counts:?}");
    // One drifted file: the same transaction, planned from the stamps.
    std::fs::write(host.path("/etc/app/f11.conf"), "edited by hand\n").unwrap();
    let (run, counts) = traced_sync(&host, &repo);
    run.ok();
    assert_eq!(
        host.read("/etc/app/f11.conf").as_deref(),
        Some("file 11 on h\n")
    );
    assert!(total(&counts) <= 5, "one drifted file repaired: {counts:?}");
    // Not zero: the change is made durable.
    assert!(total(&counts) >= 3, "one drifted file repaired: {counts:?}");
    std::fs::read_to_string(host.state.path().join("inventory.delta"))
        .map_or(0, |t| t.lines().count())
}

#[test]
fn a_sync_that_changes_nothing_issues_no_barrier() {
    if !have_strace() {
        return skip::missing("strace (Debian package strace)");
    }
    let repo = repo_of_many();
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    // The full path (the first sync after an apply may not trust stamps
    // taken in the same clock tick), then the quick check.
    for _ in 0..3 {
        let (run, counts) = traced_sync(&host, &repo);
        let run = run.ok();
        assert!(run.stdout.contains("nothing written"), "{}", run.stdout);
        assert_eq!(total(&counts), 0, "a no-op sync: {counts:?}");
    }
}

/// Links and absent paths (issue #16 step 3) join the files' transaction
/// and its flushes: a retargeted link plus an absent file removed cost no
/// more barriers than a one-file change.
#[test]
fn a_retargeted_link_and_an_absent_removal_issue_at_most_five_barriers() {
    if !have_strace() {
        return skip::missing("strace (Debian package strace)");
    }
    let repo = repo_of_many();
    let role = std::fs::read_to_string(repo.path().join("roles/app/role.toml")).unwrap();
    let with_link = |target: &str| {
        format!(
            "{role}[[links]]\npath = \"/etc/app/current\"\ntarget = \"{target}\"\n\n\
             [[absent]]\npath = \"/etc/app/stale\"\n"
        )
    };
    repo.write("roles/app/role.toml", &with_link("f00.conf"));
    repo.commit("a link and an absent path");
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    host.sync(repo.path()).ok();
    std::fs::write(host.path("/etc/app/stale"), "stale\n").unwrap();
    repo.write("roles/app/role.toml", &with_link("f01.conf"));
    repo.commit("retarget the link");
    let (run, counts) = traced_sync(&host, &repo);
    let run = run.ok();
    assert!(
        run.stdout.contains("0 created, 1 changed, 1 removed"),
        "{}",
        run.stdout
    );
    assert_eq!(
        std::fs::read_link(host.path("/etc/app/current")).unwrap(),
        std::path::Path::new("f01.conf")
    );
    assert!(!host.path("/etc/app/stale").exists());
    assert!(total(&counts) <= 5, "a retarget and a removal: {counts:?}");
    assert!(total(&counts) >= 3, "a retarget and a removal: {counts:?}");
}

/// Managed directories (issue #16 step 2) join the files' transaction and
/// its flushes: a directory created (with a file inside) and another's
/// mode corrected cost no more barriers than a one-file change.
#[test]
fn a_created_directory_and_a_mode_change_issue_at_most_five_barriers() {
    if !have_strace() {
        return skip::missing("strace (Debian package strace)");
    }
    let repo = repo_of_many();
    let role = std::fs::read_to_string(repo.path().join("roles/app/role.toml")).unwrap();
    repo.write(
        "roles/app/role.toml",
        &format!("{role}[[dirs]]\npath = \"/etc/app\"\nmode = \"0750\"\n"),
    );
    repo.commit("a managed directory");
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    host.sync(repo.path()).ok();
    repo.write(
        "roles/app/role.toml",
        &format!(
            "{role}[[dirs]]\npath = \"/etc/app\"\nmode = \"0700\"\n\n\
             [[dirs]]\npath = \"/etc/app/new.d\"\nmode = \"0750\"\n\n\
             [[files]]\npath = \"/etc/app/new.d/x.conf\"\ntemplate = \"f00.tera\"\n"
        ),
    );
    repo.commit("a new directory with a file, the other's mode changed");
    let (run, counts) = traced_sync(&host, &repo);
    let run = run.ok();
    assert!(
        run.stdout.contains("2 created, 1 changed, 0 removed"),
        "{}",
        run.stdout
    );
    use std::os::unix::fs::MetadataExt;
    let mode = |p: &str| std::fs::metadata(host.path(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode("/etc/app"), 0o700);
    assert_eq!(mode("/etc/app/new.d"), 0o750);
    assert_eq!(
        host.read("/etc/app/new.d/x.conf").as_deref(),
        Some("file 0 on h\n")
    );
    assert!(
        total(&counts) <= 5,
        "a new directory and a mode change: {counts:?}"
    );
    assert!(
        total(&counts) >= 3,
        "a new directory and a mode change: {counts:?}"
    );
}
