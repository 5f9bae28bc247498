//! Crash safety: the process is aborted (as by `kill -9`) after every
//! possible number of switch operations of a transaction. Every target
//! must be fully old or fully new at each crash point, the crashed
//! transaction must be rolled back as a whole by the next run, and that
//! run must then apply the new commit completely.

use crate::support::*;

const V1: &[(&str, &str)] = &[
    ("/etc/app/a.conf", "a v1\n"),
    ("/etc/app/b.conf", "b v1\n"),
    ("/etc/app/gone1", "g1\n"),
    ("/srv/gone2", "g2\n"),
];
const V2: &[(&str, &str)] = &[
    ("/etc/app/a.conf", "a v2\n"),
    ("/etc/app/b.conf", "b v2\n"),
    ("/etc/app/new1", "n1\n"),
    ("/opt/deep/new2", "n2\n"),
];

fn set_files(repo: &Repo, files: &[(&str, &str)]) {
    let mut role = String::new();
    for (i, (target, content)) in files.iter().enumerate() {
        let name = target.trim_start_matches('/').replace('/', "_");
        role.push_str(&format!(
            "[[files]]\npath = \"{target}\"\nsource = \"{name}\"\n\n"
        ));
        repo.write(&format!("roles/app/files/{name}"), content);
        let _ = i;
    }
    repo.write("roles/app/role.toml", &role);
}

fn state_of(host: &Host) -> Vec<(String, Option<String>)> {
    let mut paths: Vec<&str> = V1.iter().chain(V2.iter()).map(|(p, _)| *p).collect();
    paths.sort();
    paths.dedup();
    paths
        .into_iter()
        .map(|p| (p.to_string(), host.read(p)))
        .collect()
}

fn expected(files: &[(&str, &str)]) -> Vec<(String, Option<String>)> {
    let mut paths: Vec<&str> = V1.iter().chain(V2.iter()).map(|(p, _)| *p).collect();
    paths.sort();
    paths.dedup();
    paths
        .into_iter()
        .map(|p| {
            (
                p.to_string(),
                files
                    .iter()
                    .find(|(q, _)| *q == p)
                    .map(|(_, c)| c.to_string()),
            )
        })
        .collect()
}

#[test]
fn crash_between_any_two_operations_leaves_old_or_new_and_is_repaired() {
    let repo = Repo::new();
    repo.write("driftless.toml", "roles = [\"app\"]\n");
    repo.write("hosts/default.toml", "");
    set_files(&repo, V1);
    repo.commit("v1");
    let v1_repo_commit = repo.head();
    set_files(&repo, V2);
    for (p, _) in V1 {
        let name = p.trim_start_matches('/').replace('/', "_");
        if !V2.iter().any(|(q, _)| q == p) {
            repo.remove(&format!("roles/app/files/{name}"));
        }
    }
    repo.commit("v2");
    let old = expected(V1);
    let new = expected(V2);

    // 2 updates + 2 creates + 2 removes = 6 switch operations.
    for crash_after in 1..=6 {
        let host = Host::new("h");
        // Apply v1 from a branch pointing at it.
        git(repo.path(), &["branch", "-f", "v1", &v1_repo_commit]);
        host.run(repo.path(), &["sync", "--once", "--branch", "v1"])
            .ok();
        assert_eq!(state_of(&host), old);

        let out = host
            .cmd(repo.path(), &["sync", "--once"])
            .env("DRIFTLESS_TEST_CRASH_AFTER", crash_after.to_string())
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "crash hook did not fire at {crash_after}"
        );
        let mid = state_of(&host);
        for ((path, got), ((_, o), (_, n))) in mid.iter().zip(old.iter().zip(new.iter())) {
            assert!(
                got == o || got == n,
                "{path} is neither old nor new after crash {crash_after}: {got:?}"
            );
        }
        let status = host.run(repo.path(), &["status", "--format", "json"]).ok();
        let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
        assert_eq!(
            v["status"]["interrupted_transactions"]
                .as_array()
                .map(|a| a.len()),
            Some(1),
            "status must report the interrupted transaction: {}",
            status.stdout
        );

        host.sync(repo.path()).ok();
        assert_eq!(state_of(&host), new, "after crash {crash_after} and repair");
        let leftovers: Vec<String> = host
            .tree()
            .into_iter()
            .map(|(p, _)| p)
            .filter(|p| p.contains(".driftless-"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "staged files left behind: {leftovers:?}"
        );
        let hist = host.run(repo.path(), &["history", "--format", "json"]).ok();
        assert!(hist.stdout.contains("\"recovered\""), "{}", hist.stdout);
    }
}
