//! Prometheus metrics: after every run, a node_exporter textfile-collector
//! file (default [`DEFAULT_METRICS_FILE`], Debian's textfile directory).
//!
//! [`update`] and [`render`] are pure: the running totals and one run in,
//! the file's text out. [`write()`] is the effect: it loads the totals from
//! the state directory (`metrics.json`, the checksummed state envelope; a
//! corrupt one is reset with a warning), adds the run, saves them, and
//! replaces the textfile atomically (a temp file beside it, renamed: the
//! collector never reads half a file, and a link at the target is
//! replaced, never followed). Metrics never fail a sync: a missing
//! directory (node_exporter not installed) is skipped at debug level,
//! anything else is a warning.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::desired::spec::TargetPath;
use crate::effects::rootfs::{replace_in, RootFs};
use crate::effects::state::{read_json, write_json_replace, StateDir};

/// Debian's `prometheus-node-exporter` reads `*.prom` here
/// (`--collector.textfile.directory`).
pub const DEFAULT_METRICS_FILE: &str = "/var/lib/prometheus/node-exporter/driftless.prom";

/// The running totals, in the state directory.
pub const TOTALS_FILE: &str = "metrics.json";

/// Every result a run can end with, one `driftless_last_run_result` and
/// `driftless_runs_total` series each (a series that is always there, at
/// 0, is one an alert can rely on).
pub const RESULTS: &[&str] = &[
    "applied",
    "unchanged",
    "skipped",
    "reverted",
    "degraded",
    "refused",
    "failed",
];

/// What survives restarts: the counters, and the gauges a run that stops
/// early does not measure again (the applied commit, the managed files,
/// the failing checks, the last success).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Totals {
    /// Runs by result.
    pub runs: BTreeMap<String, u64>,
    pub files_changed: u64,
    pub files_drifted: u64,
    pub files_pruned: u64,
    pub reverts: u64,
    pub lock_waits: u64,
    pub lock_wait_seconds: f64,
    pub last_success: Option<i64>,
    pub applied_commit: Option<String>,
    pub files_managed: Option<u64>,
    pub checks_failing: u64,
    /// The boot in which the last run that read the inventory found a
    /// reboot request pending (`None`: none was).
    pub reboot_required_boot: Option<String>,
}

/// One run, as far as it got.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// When it started, seconds since the epoch.
    pub time: i64,
    pub duration: Duration,
    /// One of [`RESULTS`].
    pub result: &'static str,
    /// The commit the host runs after this run, when the run knows it.
    pub applied_commit: Option<String>,
    /// Managed files after this run, when the run knows.
    pub files_managed: Option<u64>,
    /// Files created or updated / found changed behind driftless's back
    /// and repaired / removed (no longer in the repository).
    pub changed: u64,
    pub drifted: u64,
    pub pruned: u64,
    /// SOPS files decrypted while rendering.
    pub secrets_decrypted: u64,
    /// Health checks failing at the end of the run, when they ran.
    pub checks_failing: Option<u64>,
    pub bad_commits: u64,
    pub halted: bool,
    /// How long it waited for another run's lock (`None`: it was free).
    pub lock_wait: Option<Duration>,
    /// Whether a committed reboot request is pending in this boot (`None`:
    /// the run did not look; the last answer stands while the boot is
    /// the same).
    pub reboot_required: Option<bool>,
    /// The running kernel's boot id.
    pub boot_id: String,
}

impl Run {
    /// Applied, unchanged, or a bad commit skipped: exit code 0, the host
    /// is in a verified state.
    pub fn succeeded(&self) -> bool {
        matches!(self.result, "applied" | "unchanged" | "skipped")
    }
}

/// What does not change from run to run.
#[derive(Debug, Clone)]
pub struct Labels {
    pub branch: String,
    pub interval: Duration,
    pub splay: Duration,
    pub version: &'static str,
}

/// Adds `run` to the totals.
pub fn update(t: &mut Totals, run: &Run) {
    // (The totals are read back from a state file: saturating, never an
    // overflow.)
    let n = t.runs.entry(run.result.to_string()).or_insert(0);
    *n = n.saturating_add(1);
    t.files_changed = t.files_changed.saturating_add(run.changed);
    t.files_drifted = t.files_drifted.saturating_add(run.drifted);
    t.files_pruned = t.files_pruned.saturating_add(run.pruned);
    if run.result == "reverted" {
        t.reverts = t.reverts.saturating_add(1);
    }
    if let Some(w) = run.lock_wait {
        t.lock_waits = t.lock_waits.saturating_add(1);
        t.lock_wait_seconds += w.as_secs_f64();
    }
    if run.succeeded() {
        t.last_success = Some(run.time);
    }
    if let Some(c) = &run.applied_commit {
        t.applied_commit = Some(c.clone());
    }
    if let Some(n) = run.files_managed {
        t.files_managed = Some(n);
    }
    if let Some(n) = run.checks_failing {
        t.checks_failing = n;
    }
    if let Some(r) = run.reboot_required {
        t.reboot_required_boot = r.then(|| run.boot_id.clone());
    }
}

/// A label value, escaped as the text format wants (`\\`, `\"`, `\n`).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Seconds as Prometheus writes floats.
fn secs(d: f64) -> String {
    let s = format!("{d:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() {
        "0".into()
    } else {
        s.to_string()
    }
}

/// The textfile: HELP and TYPE for every family, the totals after `run`.
pub fn render(t: &Totals, run: &Run, l: &Labels) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let one = |v: String| vec![(String::new(), v)];
    let n = |v: u64| one(v.to_string());
    family(
        "driftless_build_info",
        "gauge",
        "The running driftless version (always 1).",
        &[(format!("{{version=\"{}\"}}", label(l.version)), "1".into())],
    );
    family(
        "driftless_last_run_timestamp_seconds",
        "gauge",
        "When the last run started, seconds since the epoch.",
        &n(run.time.max(0) as u64),
    );
    family(
        "driftless_last_run_duration_seconds",
        "gauge",
        "How long the last run took, lock wait included.",
        &one(secs(run.duration.as_secs_f64())),
    );
    let results: Vec<(String, String)> = RESULTS
        .iter()
        .map(|r| {
            (
                format!("{{result=\"{r}\"}}"),
                if *r == run.result { "1" } else { "0" }.into(),
            )
        })
        .collect();
    family(
        "driftless_last_run_result",
        "gauge",
        "The result of the last run: 1 for its result, 0 for the others.",
        &results,
    );
    let runs: Vec<(String, String)> = RESULTS
        .iter()
        .map(|r| {
            (
                format!("{{result=\"{r}\"}}"),
                t.runs.get(*r).copied().unwrap_or(0).to_string(),
            )
        })
        .collect();
    family("driftless_runs_total", "counter", "Runs, by result.", &runs);
    if let Some(s) = t.last_success {
        family(
            "driftless_last_success_timestamp_seconds",
            "gauge",
            "When the last successful run (applied, unchanged or bad commit skipped) started.",
            &n(s.max(0) as u64),
        );
    }
    if let Some(c) = &t.applied_commit {
        family(
            "driftless_applied_commit_info",
            "gauge",
            "The commit the host runs (always 1).",
            &[(
                format!(
                    "{{commit=\"{}\",branch=\"{}\"}}",
                    label(c),
                    label(&l.branch)
                ),
                "1".into(),
            )],
        );
    }
    family(
        "driftless_sync_interval_seconds",
        "gauge",
        "The configured poll interval (the daemon's; the timer and cron use 5 minutes).",
        &one(secs(l.interval.as_secs_f64())),
    );
    family(
        "driftless_sync_splay_seconds",
        "gauge",
        "The configured random extra delay per poll.",
        &one(secs(l.splay.as_secs_f64())),
    );
    if let Some(m) = t.files_managed {
        family(
            "driftless_files_managed",
            "gauge",
            "Files driftless manages on this host.",
            &n(m),
        );
    }
    family(
        "driftless_last_run_files_changed",
        "gauge",
        "Files the last run created or updated.",
        &n(run.changed),
    );
    family(
        "driftless_last_run_files_drifted",
        "gauge",
        "Files the last run found changed behind driftless's back, and repaired.",
        &n(run.drifted),
    );
    family(
        "driftless_last_run_files_pruned",
        "gauge",
        "Files the last run removed (no longer in the repository).",
        &n(run.pruned),
    );
    family(
        "driftless_files_changed_total",
        "counter",
        "Files created or updated by applied runs.",
        &n(t.files_changed),
    );
    family(
        "driftless_files_drifted_total",
        "counter",
        "Drifted files repaired.",
        &n(t.files_drifted),
    );
    family(
        "driftless_files_pruned_total",
        "counter",
        "Files removed because the repository stopped managing them.",
        &n(t.files_pruned),
    );
    family(
        "driftless_reverts_total",
        "counter",
        "Commits applied, failed their unit actions or checks, and reverted.",
        &n(t.reverts),
    );
    family(
        "driftless_bad_commits",
        "gauge",
        "Commits marked bad (not applied again until a new commit or --retry).",
        &n(run.bad_commits),
    );
    family(
        "driftless_checks_failing",
        "gauge",
        "Health checks failing when they last ran.",
        &n(t.checks_failing),
    );
    family(
        "driftless_halted",
        "gauge",
        "1 while the agent is halted (a revert failed its checks too; `driftless sync --retry` resumes).",
        &n(u64::from(run.halted)),
    );
    family(
        "driftless_reboot_required",
        "gauge",
        "1 while a committed change to a file with `reboot = true` waits for a reboot (/run/reboot-required; driftless reboots by itself only with [fleet] reboot = true).",
        &n(u64::from(
            t.reboot_required_boot.as_deref() == Some(run.boot_id.as_str()),
        )),
    );
    family(
        "driftless_lock_waits_total",
        "counter",
        "Runs that found another run holding the lock and waited for it.",
        &n(t.lock_waits),
    );
    family(
        "driftless_lock_wait_seconds_total",
        "counter",
        "Time runs spent waiting for another run's lock.",
        &one(secs(t.lock_wait_seconds)),
    );
    family(
        "driftless_last_run_secrets_decrypted",
        "gauge",
        "SOPS files the last run decrypted.",
        &n(run.secrets_decrypted),
    );
    out
}

/// Where the textfile goes: `path`, opened without following a link at
/// or above it when it lies under a `--root` prefix (an image that may be
/// hostile), as the agent's state directory is.
pub struct Target<'a> {
    pub path: &'a Path,
    /// The managed root, when it is not `/`.
    pub root: Option<&'a Path>,
}

/// Adds `run` to the totals in `state` and writes the textfile. Never
/// fails: problems are logged.
pub fn write(target: &Target, state: &StateDir, run: &Run, labels: &Labels) {
    let totals_path = state.path().join(TOTALS_FILE);
    let mut totals = match read_json::<Totals>(&totals_path) {
        Ok(t) => t.unwrap_or_default(),
        Err(e) => {
            warn!(
                "{e:#}: the metrics counters start again from 0 (they are rewritten now; nothing else is affected)"
            );
            Totals::default()
        }
    };
    update(&mut totals, run);
    if let Err(e) = write_json_replace(&totals_path, &totals) {
        warn!("cannot save the metrics counters: {e:#}");
    }
    let text = render(&totals, run, labels);
    match write_textfile(target, text.as_bytes()) {
        Ok(true) => debug!(file = %target.path.display(), "metrics written"),
        Ok(false) => debug!(
            file = %target.path.display(),
            "metrics not written: the directory does not exist (node_exporter's textfile collector is not installed)"
        ),
        Err(e) => warn!(
            "cannot write the metrics file {}: {e:#} (set metrics_file in the agent config, or metrics_file = false to turn it off)",
            target.path.display()
        ),
    }
}

/// Replaces the textfile (0644: it holds no secret). `Ok(false)` when
/// its directory does not exist.
pub fn write_textfile(target: &Target, bytes: &[u8]) -> Result<bool> {
    let name = target
        .path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("not a usable file name"))?;
    let Some(dir) = open_dir(target)? else {
        return Ok(false);
    };
    replace_in(&dir, name, bytes, 0o644, false).context("cannot replace it")?;
    Ok(true)
}

fn open_dir(target: &Target) -> Result<Option<OwnedFd>> {
    if let Some(rel) = target.root.and_then(|r| target.path.strip_prefix(r).ok()) {
        let root = target.root.unwrap_or(Path::new("/"));
        let t = TargetPath::parse(&format!("/{}", rel.display())).map_err(|e| anyhow!("{e}"))?;
        return RootFs::open(root)?.open_parent(&t, None);
    }
    let dir: PathBuf = match target.path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("/"),
    };
    match nix::fcntl::open(
        &dir,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    ) {
        Ok(fd) => Ok(Some(fd)),
        Err(nix::errno::Errno::ENOENT) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot open {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn labels() -> Labels {
        Labels {
            branch: "main".into(),
            interval: Duration::from_secs(300),
            splay: Duration::from_secs(60),
            version: "1.2.3",
        }
    }

    fn applied() -> Run {
        Run {
            time: 1_700_000_000,
            duration: Duration::from_millis(1250),
            result: "applied",
            applied_commit: Some("a".repeat(40)),
            files_managed: Some(12),
            changed: 3,
            drifted: 1,
            pruned: 2,
            secrets_decrypted: 1,
            checks_failing: Some(0),
            bad_commits: 0,
            halted: false,
            lock_wait: None,
            reboot_required: Some(false),
            boot_id: "b".into(),
        }
    }

    fn value<'a>(text: &'a str, series: &str) -> Option<&'a str> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
    }

    #[test]
    fn an_applied_run_renders_every_family_with_help_and_type() {
        let mut t = Totals::default();
        let run = applied();
        update(&mut t, &run);
        let text = render(&t, &run, &labels());
        for (series, want) in [
            ("driftless_build_info{version=\"1.2.3\"}", "1"),
            ("driftless_last_run_timestamp_seconds", "1700000000"),
            ("driftless_last_run_duration_seconds", "1.25"),
            ("driftless_last_run_result{result=\"applied\"}", "1"),
            ("driftless_last_run_result{result=\"failed\"}", "0"),
            ("driftless_runs_total{result=\"applied\"}", "1"),
            ("driftless_runs_total{result=\"reverted\"}", "0"),
            ("driftless_last_success_timestamp_seconds", "1700000000"),
            (
                &format!(
                    "driftless_applied_commit_info{{commit=\"{}\",branch=\"main\"}}",
                    "a".repeat(40)
                ),
                "1",
            ),
            ("driftless_sync_interval_seconds", "300"),
            ("driftless_files_managed", "12"),
            ("driftless_last_run_files_changed", "3"),
            ("driftless_last_run_files_drifted", "1"),
            ("driftless_last_run_files_pruned", "2"),
            ("driftless_files_changed_total", "3"),
            ("driftless_files_drifted_total", "1"),
            ("driftless_files_pruned_total", "2"),
            ("driftless_reverts_total", "0"),
            ("driftless_bad_commits", "0"),
            ("driftless_checks_failing", "0"),
            ("driftless_halted", "0"),
            ("driftless_reboot_required", "0"),
            ("driftless_lock_waits_total", "0"),
            ("driftless_lock_wait_seconds_total", "0"),
            ("driftless_last_run_secrets_decrypted", "1"),
        ] {
            assert_eq!(value(&text, series), Some(want), "{series} in\n{text}");
        }
        // HELP and TYPE before each family's samples; counters end in _total.
        let mut typed = std::collections::BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
                typed.insert(name.to_string());
            } else if !line.starts_with("# HELP ") {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(typed.contains(name), "{name} has no TYPE before it");
                assert!(
                    text.contains(&format!("# HELP {name} ")),
                    "{name} has no HELP"
                );
            }
        }
    }

    #[test]
    fn counters_add_up_and_a_failed_run_keeps_what_it_did_not_measure() {
        let mut t = Totals::default();
        update(&mut t, &applied());
        update(&mut t, &applied());
        let failed = Run {
            time: 1_700_000_600,
            result: "reverted",
            lock_wait: Some(Duration::from_millis(1500)),
            bad_commits: 1,
            ..Run::default()
        };
        update(&mut t, &failed);
        let text = render(&t, &failed, &labels());
        for (series, want) in [
            ("driftless_runs_total{result=\"applied\"}", "2"),
            ("driftless_runs_total{result=\"reverted\"}", "1"),
            ("driftless_last_run_result{result=\"reverted\"}", "1"),
            ("driftless_last_run_result{result=\"applied\"}", "0"),
            ("driftless_reverts_total", "1"),
            ("driftless_files_changed_total", "6"),
            ("driftless_last_run_files_changed", "0"),
            ("driftless_files_managed", "12"),
            ("driftless_last_success_timestamp_seconds", "1700000000"),
            ("driftless_last_run_timestamp_seconds", "1700000600"),
            ("driftless_bad_commits", "1"),
            ("driftless_lock_waits_total", "1"),
            ("driftless_lock_wait_seconds_total", "1.5"),
        ] {
            assert_eq!(value(&text, series), Some(want), "{series} in\n{text}");
        }
        assert!(text.contains(&"a".repeat(40)), "the applied commit is kept");
    }

    #[test]
    fn label_values_are_escaped() {
        let l = Labels {
            branch: "we\"ird\\br\nanch".into(),
            ..labels()
        };
        let mut t = Totals::default();
        update(&mut t, &applied());
        let text = render(&t, &applied(), &l);
        assert!(text.contains(r#"branch="we\"ird\\br\nanch"}"#), "{text}");
    }

    fn state() -> (tempfile::TempDir, StateDir) {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(&d.path().join("state")).unwrap();
        (d, s)
    }

    #[test]
    fn the_textfile_is_0644_and_a_link_at_it_is_replaced_not_followed() {
        let (d, state) = state();
        let dir = d.path().join("textfiles");
        std::fs::create_dir(&dir).unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        let path = dir.join("driftless.prom");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let target = Target {
            path: &path,
            root: None,
        };
        write(&target, &state, &applied(), &labels());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o644);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("driftless_runs_total{result=\"applied\"} 1"));
        // Only the file: no temp file left beside it.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[test]
    fn counters_survive_and_a_corrupt_totals_file_is_reset() {
        let (d, state) = state();
        let path = d.path().join("driftless.prom");
        let target = Target {
            path: &path,
            root: None,
        };
        write(&target, &state, &applied(), &labels());
        write(&target, &state, &applied(), &labels());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("driftless_runs_total{result=\"applied\"} 2"),
            "{text}"
        );
        std::fs::write(
            state.path().join(TOTALS_FILE),
            "{\"driftless_state\": 1, \"sha2",
        )
        .unwrap();
        write(&target, &state, &applied(), &labels());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("driftless_runs_total{result=\"applied\"} 1"),
            "{text}"
        );
        let saved: Totals = read_json(&state.path().join(TOTALS_FILE)).unwrap().unwrap();
        assert_eq!(saved.runs.get("applied"), Some(&1));
    }

    #[test]
    fn a_missing_directory_is_skipped_and_a_link_above_it_under_a_root_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let path = root.join("var/lib/prometheus/node-exporter/driftless.prom");
        let target = Target {
            path: &path,
            root: Some(&root),
        };
        assert!(!write_textfile(&target, b"x").unwrap());
        // A hostile image points var/lib/prometheus at a host directory.
        let outside = d.path().join("outside");
        std::fs::create_dir_all(outside.join("node-exporter")).unwrap();
        std::fs::create_dir_all(root.join("var/lib")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("var/lib/prometheus")).unwrap();
        let err = format!("{:#}", write_textfile(&target, b"x").unwrap_err());
        assert!(err.contains("symlink"), "{err}");
        assert!(!outside.join("node-exporter/driftless.prom").exists());
        // A real directory: written.
        std::fs::remove_file(root.join("var/lib/prometheus")).unwrap();
        std::fs::create_dir_all(root.join("var/lib/prometheus/node-exporter")).unwrap();
        assert!(write_textfile(&target, b"x").unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "x");
    }
}
