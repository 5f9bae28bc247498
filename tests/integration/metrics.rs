//! The node_exporter textfile (issue 15 §3): written under `--root` after
//! every run, its content after applied, unchanged, drifted, pruned,
//! reverted, skipped, failed and halted runs, checked by the real
//! `promtool check metrics`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::support::*;

const PROM: &str = "/var/lib/prometheus/node-exporter/driftless.prom";

/// promtool, or the test fails naming the package (see `skip::missing`).
fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        skip::missing("promtool (Debian package prometheus)");
    }
    found
}

/// `promtool check metrics` on `text`: its lint findings, if any.
#[track_caller]
fn check_metrics(promtool: &Path, text: &str) {
    use std::io::Write;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\non:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of one series (`name{labels}` exactly as written).
#[track_caller]
fn value(text: &str, series: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .to_string()
}

fn result(text: &str) -> String {
    let on: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            l.strip_prefix("driftless_last_run_result{result=\"")?
                .strip_suffix("\"} 1")
        })
        .collect();
    assert_eq!(on.len(), 1, "one result is 1, the others 0:\n{text}");
    on[0].to_string()
}

fn commit_info(commit: &str) -> String {
    format!("driftless_applied_commit_info{{commit=\"{commit}\",branch=\"main\"}}")
}

fn host_with_collector() -> Host {
    let host = Host::new("h");
    std::fs::create_dir_all(host.path(PROM).parent().unwrap()).unwrap();
    host
}

fn role(repo: &Repo, host: &Host, app: &str, extra: bool) {
    repo.write("driftless.toml", "roles = [\"app\"]\n");
    repo.write("hosts/default.toml", "");
    repo.write("roles/app/files/app.conf", app);
    repo.write("roles/app/files/extra.conf", "extra\n");
    let mut toml = String::from(
        "[[files]]\npath = \"/etc/app.conf\"\nsource = \"app.conf\"\nmode = \"0640\"\n\n",
    );
    if extra {
        toml.push_str("[[files]]\npath = \"/etc/extra.conf\"\nsource = \"extra.conf\"\n\n");
    }
    let check = format!(
        "grep -q good {root}/etc/app.conf && ! test -e {root}/broken-flag",
        root = host.root.path().display()
    );
    toml.push_str(&format!(
        "[[checks]]\nname = \"app is good\"\nretries = 1\ninterval = \"10ms\"\n\
         command = {{ argv = [\"/bin/sh\", \"-c\", {check:?}] }}\n"
    ));
    repo.write("roles/app/role.toml", &toml);
}

fn sync(host: &Host, repo: &Repo) -> Run {
    host.run(repo.path(), &["sync", "--once", "--run-checks"])
}

fn prom(host: &Host) -> String {
    let meta = std::fs::symlink_metadata(host.path(PROM)).expect("the metrics file exists");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o7777, 0o644);
    host.read(PROM).unwrap()
}

#[test]
fn the_textfile_follows_every_run_and_passes_promtool() {
    let Some(promtool) = promtool() else { return };
    let repo = Repo::new();
    let host = host_with_collector();

    // Applied: two new files.
    role(&repo, &host, "good\n", true);
    let v1 = repo.commit("v1");
    sync(&host, &repo).ok();
    let t = prom(&host);
    check_metrics(&promtool, &t);
    assert_eq!(result(&t), "applied");
    assert_eq!(value(&t, &commit_info(&v1)), "1");
    assert_eq!(value(&t, "driftless_files_managed"), "2");
    assert_eq!(value(&t, "driftless_last_run_files_changed"), "2");
    assert_eq!(value(&t, "driftless_runs_total{result=\"applied\"}"), "1");
    assert_eq!(value(&t, "driftless_checks_failing"), "0");
    assert_eq!(value(&t, "driftless_halted"), "0");
    let build = format!(
        "driftless_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&t, &build), "1");
    let first_success = value(&t, "driftless_last_success_timestamp_seconds");
    assert_eq!(
        first_success,
        value(&t, "driftless_last_run_timestamp_seconds")
    );

    // Unchanged (the quick check): nothing changed, counters kept.
    sync(&host, &repo).ok();
    let t = prom(&host);
    check_metrics(&promtool, &t);
    assert_eq!(result(&t), "unchanged");
    assert_eq!(value(&t, "driftless_last_run_files_changed"), "0");
    assert_eq!(value(&t, "driftless_files_changed_total"), "2");
    assert_eq!(value(&t, "driftless_files_managed"), "2");
    assert_eq!(value(&t, "driftless_runs_total{result=\"unchanged\"}"), "1");
    assert_eq!(value(&t, &commit_info(&v1)), "1");

    // Drift repaired.
    std::fs::write(host.path("/etc/app.conf"), "good, edited by hand\n").unwrap();
    sync(&host, &repo).ok();
    let t = prom(&host);
    assert_eq!(result(&t), "applied");
    assert_eq!(value(&t, "driftless_last_run_files_drifted"), "1");
    assert_eq!(value(&t, "driftless_files_drifted_total"), "1");

    // Pruned: the repository stops managing extra.conf.
    role(&repo, &host, "good\n", false);
    let v2 = repo.commit("v2 drops extra.conf");
    sync(&host, &repo).ok();
    let t = prom(&host);
    assert_eq!(result(&t), "applied");
    assert_eq!(value(&t, "driftless_last_run_files_pruned"), "1");
    assert_eq!(value(&t, "driftless_files_pruned_total"), "1");
    assert_eq!(value(&t, "driftless_files_managed"), "1");
    assert_eq!(value(&t, &commit_info(&v2)), "1");

    // Reverted: the host stays at v2, the commit is marked bad.
    role(&repo, &host, "broken\n", false);
    repo.commit("v3 breaks the app");
    sync(&host, &repo).code(1);
    let t = prom(&host);
    check_metrics(&promtool, &t);
    assert_eq!(result(&t), "reverted");
    assert_eq!(value(&t, "driftless_reverts_total"), "1");
    assert_eq!(value(&t, "driftless_bad_commits"), "1");
    assert_eq!(value(&t, &commit_info(&v2)), "1");
    assert_eq!(
        value(&t, "driftless_checks_failing"),
        "0",
        "the restored state passes"
    );

    // Skipped: the bad commit is not applied again.
    sync(&host, &repo).ok();
    let t = prom(&host);
    assert_eq!(result(&t), "skipped");
    let success = value(&t, "driftless_last_success_timestamp_seconds");
    // A second later (timestamps are in seconds):
    std::thread::sleep(std::time::Duration::from_millis(1100));

    // Failed: the source is gone. What the run did not learn is kept.
    let gone = tempfile::tempdir().unwrap();
    host.run(&gone.path().join("nothing"), &["sync", "--once"])
        .code(1);
    let t = prom(&host);
    check_metrics(&promtool, &t);
    assert_eq!(result(&t), "failed");
    assert_eq!(value(&t, "driftless_runs_total{result=\"failed\"}"), "1");
    assert_eq!(value(&t, &commit_info(&v2)), "1");
    assert_eq!(value(&t, "driftless_files_managed"), "1");
    assert_eq!(
        value(&t, "driftless_last_success_timestamp_seconds"),
        success,
        "a failure is not a success"
    );
    assert_ne!(value(&t, "driftless_last_run_timestamp_seconds"), success);
    assert_eq!(value(&t, "driftless_runs_total{result=\"applied\"}"), "3");
    assert_eq!(value(&t, "driftless_runs_total{result=\"reverted\"}"), "1");
    assert_eq!(value(&t, "driftless_runs_total{result=\"skipped\"}"), "1");
}

#[test]
fn a_halted_agent_says_so_on_every_run() {
    let Some(promtool) = promtool() else { return };
    let repo = Repo::new();
    let host = host_with_collector();
    role(&repo, &host, "good\n", false);
    repo.commit("v1");
    sync(&host, &repo).ok();
    // The next commit fails its check, and so does the state it reverts to.
    std::fs::write(host.path("/broken-flag"), "").unwrap();
    role(&repo, &host, "good, v2\n", false);
    repo.commit("v2");
    sync(&host, &repo).code(5);
    let t = prom(&host);
    check_metrics(&promtool, &t);
    assert_eq!(result(&t), "degraded");
    assert_eq!(value(&t, "driftless_halted"), "1");
    assert_eq!(value(&t, "driftless_checks_failing"), "1");
    // Refused at the start while halted: still counted, still halted.
    sync(&host, &repo).code(5);
    let t = prom(&host);
    assert_eq!(result(&t), "degraded");
    assert_eq!(value(&t, "driftless_halted"), "1");
    assert_eq!(value(&t, "driftless_runs_total{result=\"degraded\"}"), "2");
    // `--retry` resumes.
    std::fs::remove_file(host.path("/broken-flag")).unwrap();
    host.run(repo.path(), &["sync", "--once", "--run-checks", "--retry"])
        .ok();
    let t = prom(&host);
    assert_eq!(result(&t), "applied");
    assert_eq!(value(&t, "driftless_halted"), "0");
    assert_eq!(value(&t, "driftless_checks_failing"), "0");
}

#[test]
fn no_collector_directory_no_file_and_no_warning() {
    let repo = simple_repo(&[("/etc/a.conf", "a\n")]);
    let host = Host::new("h");
    let run = host.sync(repo.path()).ok();
    assert!(!host.path(PROM).exists());
    assert!(!host.path(PROM).parent().unwrap().exists());
    assert!(
        !run.stderr.to_lowercase().contains("metrics"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_corrupt_counters_file_is_reset_with_a_warning_and_the_sync_goes_on() {
    let repo = simple_repo(&[("/etc/a.conf", "a\n")]);
    let host = host_with_collector();
    host.sync(repo.path()).ok();
    host.sync(repo.path()).ok();
    assert_eq!(
        value(&prom(&host), "driftless_runs_total{result=\"unchanged\"}"),
        "1"
    );
    let counters = host.state.path().join("metrics.json");
    let text = std::fs::read_to_string(&counters).unwrap();
    std::fs::write(
        &counters,
        text.replacen("\"unchanged\": 1", "\"unchanged\": 7", 1),
    )
    .unwrap();
    let run = host.sync(repo.path()).ok();
    assert!(
        run.stderr.contains("metrics.json is corrupt") && run.stderr.contains("start again from 0"),
        "{}",
        run.stderr
    );
    let t = prom(&host);
    assert_eq!(value(&t, "driftless_runs_total{result=\"unchanged\"}"), "1");
    assert_eq!(value(&t, "driftless_runs_total{result=\"applied\"}"), "0");
}

/// `metrics_file` in agent.toml: another path, or off.
#[test]
fn metrics_file_is_configurable_and_can_be_turned_off() {
    let repo = simple_repo(&[("/etc/a.conf", "a\n")]);
    let host = host_with_collector();
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = dir.path().join("custom.prom");
    let run_with = |setting: &str| {
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "source = {:?}\nhost = \"h\"\nroot = {:?}\nstate_dir = {:?}\n{setting}\n",
                repo.path(),
                host.root.path(),
                host.state.path()
            ),
        )
        .unwrap();
        let out = Command::new(BIN)
            .args(["sync", "--once", "--config"])
            .arg(&config)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run_with(&format!("metrics_file = {elsewhere:?}"));
    assert!(std::fs::read_to_string(&elsewhere)
        .unwrap()
        .contains("driftless_last_run_result{result=\"applied\"} 1"));
    assert!(!host.path(PROM).exists());
    for off in ["metrics_file = false", "metrics_file = \"\""] {
        std::fs::remove_file(&elsewhere).ok();
        run_with(off);
        assert!(!host.path(PROM).exists(), "{off}");
        assert!(!elsewhere.exists(), "{off}");
    }
}

/// The metric names a PromQL text uses (`driftless_…`).
fn names_in(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("driftless_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// The shipped alert rules and dashboard: valid for the real promtool,
/// the rules' unit tests pass, and every metric they use is one the agent
/// writes (a renamed metric would otherwise silently empty a panel or
/// disarm an alert).
#[test]
fn the_shipped_rules_and_dashboard_use_real_metrics_and_pass_promtool() {
    let Some(promtool) = promtool() else { return };
    let dir = workspace().join("packaging/prometheus");
    for args in [
        &["check", "rules", "driftless-rules.yml"][..],
        &["test", "rules", "driftless-rules.test.yml"][..],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let repo = simple_repo(&[("/etc/a.conf", "a\n")]);
    let host = host_with_collector();
    host.sync(repo.path()).ok();
    let written = prom(&host);
    let exported: std::collections::BTreeSet<String> = written
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();

    let rules = std::fs::read_to_string(dir.join("driftless-rules.yml")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(workspace().join("packaging/grafana/driftless-dashboard.json"))
            .unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut used = names_in(&rules);
    for e in &exprs {
        used.extend(names_in(e));
    }
    let unknown: Vec<_> = used.difference(&exported).collect();
    assert!(unknown.is_empty(), "not written by the agent: {unknown:?}");

    // The dashboard's queries parse: as recording rules, with Grafana's
    // variables replaced by what Grafana would put there.
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$__range", "1d")
            .replace("$instance", ".*");
        file.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("dashboard-queries.yml");
    std::fs::write(&path, &file).unwrap();
    let out = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "a dashboard query does not parse:\n{}{}\n{file}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Secrets decrypted (the quickstart's database.conf uses one), and a run
/// that waited for another's lock.
#[test]
fn secrets_decrypted_and_lock_waits_are_counted() {
    let repo = Repo::quickstart();
    let host = Host::new("web1");
    std::fs::create_dir_all(host.path(PROM).parent().unwrap()).unwrap();
    host.sync(repo.path()).ok();
    let t = prom(&host);
    assert_eq!(value(&t, "driftless_last_run_secrets_decrypted"), "1");
    assert_eq!(value(&t, "driftless_lock_waits_total"), "0");

    // Another run (here flock(1)) holds the lock until the sync is seen
    // waiting for it (the lock file open while the lock is held), then
    // lets go: no race with a fixed second.
    let lock = host.state.path().join("lock");
    let marks = tempfile::tempdir().unwrap();
    let release = marks.path().join("release");
    let mut holder = Command::new("flock")
        .arg(&lock)
        .arg("-c")
        .arg(format!(
            "echo held; while [ ! -e {} ]; do sleep 0.01; done",
            release.display()
        ))
        .stdout(Stdio::piped())
        .spawn()
        .expect("flock (util-linux) runs");
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "held\n");
    let sync = host
        .cmd(repo.path(), &["sync", "--once", "--wait", "60"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lock_path = std::fs::canonicalize(&lock).unwrap();
    let fds = format!("/proc/{}/fd", sync.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !std::fs::read_dir(&fds).is_ok_and(|d| {
        d.flatten()
            .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == lock_path))
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "the sync never opened the lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::fs::write(&release, "").unwrap();
    let out = sync.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    holder.wait().unwrap();
    let t = prom(&host);
    assert_eq!(result(&t), "unchanged");
    assert_eq!(value(&t, "driftless_lock_waits_total"), "1");
    let waited: f64 = value(&t, "driftless_lock_wait_seconds_total")
        .parse()
        .unwrap();
    assert!(waited > 0.0 && waited < 60.0, "{waited}");
    let took: f64 = value(&t, "driftless_last_run_duration_seconds")
        .parse()
        .unwrap();
    assert!(
        took >= waited,
        "the duration includes the wait: {took} < {waited}"
    );
    assert_eq!(
        value(&t, "driftless_last_run_secrets_decrypted"),
        "0",
        "the quick check decrypts nothing"
    );
}
