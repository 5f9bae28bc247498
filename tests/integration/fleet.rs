//! Fleet rollout against a real etcd (issue 17): many agents, each its
//! own process with its own `--root`, state dir and host name, against
//! one repository and one etcd started here on loopback.
//!
//! What the agents did is judged from etcd's revision history (every
//! put and delete of the fleet's keys, replayed with a watch from
//! revision 1), not from their logs.

#![cfg(feature = "etcd")]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, WatchOptions};

use crate::support::*;

/// A single-member etcd on free loopback ports with a temp data dir,
/// killed when dropped.
pub(super) struct Etcd {
    child: Child,
    bin: &'static str,
    pub(super) dir: tempfile::TempDir,
    pub(super) endpoint: String,
    peer_url: String,
    pub(super) rt: tokio::runtime::Runtime,
    /// Extra etcd flags (TLS).
    extra: Vec<String>,
    /// How the test itself connects (TLS options, user).
    opts: Option<etcd_client::ConnectOptions>,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn spawn_etcd(bin: &str, dir: &Path, endpoint: &str, peer_url: &str, extra: &[String]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("etcd.log"))
        .unwrap();
    Command::new(bin)
        .arg("--name=t")
        .arg(format!("--data-dir={}", dir.join("data").display()))
        .arg(format!("--listen-client-urls={endpoint}"))
        .arg(format!("--advertise-client-urls={endpoint}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=t={peer_url}"))
        .arg("--logger=zap")
        .arg("--log-level=error")
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

impl Etcd {
    /// `None`: the etcd binary is missing (the test then fails, or skips
    /// with DRIFTLESS_TEST_ALLOW_SKIP=1).
    fn start() -> Option<Etcd> {
        Etcd::start_with(tempfile::tempdir().unwrap(), "http", Vec::new(), None)
    }

    /// `scheme` "https" with `extra` TLS flags (files under `dir`), and
    /// the options this test's own client connects with.
    pub(super) fn start_with(
        dir: tempfile::TempDir,
        scheme: &str,
        extra: Vec<String>,
        opts: Option<etcd_client::ConnectOptions>,
    ) -> Option<Etcd> {
        let bin = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .find(|p| Path::new(p).exists())?;
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = spawn_etcd(bin, dir.path(), &endpoint, &peer_url, &extra);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let etcd = Etcd {
            child,
            bin,
            dir,
            endpoint,
            peer_url,
            rt,
            extra,
            opts,
        };
        etcd.wait_ready();
        Some(etcd)
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = self.rt.block_on(async {
                let mut c = Client::connect([self.endpoint.as_str()], self.opts.clone())
                    .await
                    .ok()?;
                c.get("ready", None).await.ok()
            });
            if ok.is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not start: {}",
                std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills etcd (SIGKILL: no goodbye to its clients).
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same ports and data.
    fn restart(&mut self) {
        self.child = spawn_etcd(
            self.bin,
            self.dir.path(),
            &self.endpoint,
            &self.peer_url,
            &self.extra,
        );
        self.wait_ready();
    }

    pub(super) fn client(&self) -> Client {
        self.rt
            .block_on(Client::connect([self.endpoint.as_str()], self.opts.clone()))
            .unwrap()
    }

    /// Keys under `prefix` now.
    pub(super) fn keys(&self, prefix: &str) -> Vec<String> {
        let mut c = self.client();
        self.rt.block_on(async {
            let r = c
                .get(
                    prefix,
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                )
                .await
                .unwrap();
            r.kvs()
                .iter()
                .map(|kv| kv.key_str().unwrap().to_string())
                .collect()
        })
    }

    /// The store's current revision.
    fn revision(&self) -> i64 {
        let mut c = self.client();
        self.rt.block_on(async {
            c.get("/", Some(GetOptions::new().with_count_only()))
                .await
                .unwrap()
                .header()
                .unwrap()
                .revision()
        })
    }

    /// Every change under `prefix` since revision 1, in order:
    /// (revision, put?, key, value).
    fn history(&self, prefix: &str) -> Vec<(i64, bool, String, String)> {
        let mut c = self.client();
        self.rt.block_on(async {
            let now = c
                .get(
                    prefix,
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await
                .unwrap()
                .header()
                .unwrap()
                .revision();
            let mut stream = c
                .watch(
                    prefix,
                    Some(WatchOptions::new().with_prefix().with_start_revision(1)),
                )
                .await
                .unwrap();
            let mut out = Vec::new();
            let mut seen = 0;
            while seen < now {
                let Ok(Ok(Some(resp))) =
                    tokio::time::timeout(Duration::from_secs(2), stream.message()).await
                else {
                    break;
                };
                // (Not the header's revision: the response that creates the
                // watch carries the current one, before any event.)
                for e in resp.events() {
                    let Some(kv) = e.kv() else { continue };
                    out.push((
                        kv.mod_revision(),
                        e.event_type() == EventType::Put,
                        kv.key_str().unwrap().to_string(),
                        kv.value_str().unwrap_or("").to_string(),
                    ));
                    seen = seen.max(kv.mod_revision());
                }
            }
            out
        })
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(super) fn etcd_or_skip() -> Option<Etcd> {
    let e = Etcd::start();
    if e.is_none() {
        skip::missing("etcd (Debian package etcd-server): run tests/install-prereqs");
    }
    e
}

/// One agent: its own root, state dir, name and config file.
pub(super) struct Agent {
    pub(super) name: String,
    dir: tempfile::TempDir,
}

impl Agent {
    fn new(name: &str, repo: &Path, etcd: &Etcd, group: &str, labels: &str, ttl: &str) -> Agent {
        Agent::with_fleet_keys(name, repo, etcd, group, labels, ttl, "")
    }

    /// With `keys` (TOML lines) added to its `[fleet]` section.
    pub(super) fn with_fleet_keys(
        name: &str,
        repo: &Path,
        etcd: &Etcd,
        group: &str,
        labels: &str,
        ttl: &str,
        keys: &str,
    ) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(
            dir.path().join("agent.toml"),
            format!(
                "source = {:?}\nhost = {name:?}\nroot = {:?}\nstate_dir = {:?}\nrun_checks = true\n\
                 metrics_file = false\ninterval = \"1m\"\nsplay = \"0s\"\n\
                 [fleet]\nendpoints = [{:?}]\nprefix = \"/t\"\ngroup = {group:?}\nlease_ttl = {ttl:?}\n\
                 labels = {{ {labels} }}\n{keys}",
                repo.display().to_string(),
                root.display().to_string(),
                dir.path().join("state").display().to_string(),
                etcd.endpoint,
            ),
        )
        .unwrap();
        Agent {
            name: name.into(),
            dir,
        }
    }

    pub(super) fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub(super) fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .arg("--config")
            .arg(self.dir.path().join("agent.toml"))
            .env("APP_ROOT", self.root())
            .env("NO_COLOR", "1")
            .env_remove("DRIFTLESS_TEST_FAILPOINT")
            .env_remove("DRIFTLESS_TEST_CRASH_AFTER");
        c
    }

    fn spawn_sync(&self) -> Child {
        use std::os::unix::process::CommandExt;
        self.cmd(&["sync", "--once"])
            // Its own process group: a kill takes its checks along.
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    pub(super) fn content(&self) -> Option<String> {
        std::fs::read_to_string(self.root().join("etc/app.conf")).ok()
    }
}

/// A repository with one role (`/etc/app.conf`, checked by grepping for
/// "good" after a short pause) and `policy` as its `[rollout]`.
pub(super) fn repo_with(policy: &str, content: &str) -> Repo {
    let repo = Repo::new();
    repo.write("driftless.toml", &format!("roles = [\"app\"]\n{policy}"));
    repo.write("hosts/default.toml", "");
    set_content(&repo, content);
    repo
}

fn set_content(repo: &Repo, content: &str) {
    repo.write("roles/app/files/app.conf", content);
    repo.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/app.conf\"\nsource = \"app.conf\"\n\n\
         [[checks]]\nname = \"app is good\"\nretries = 1\n\
         command = { argv = [\"/bin/sh\", \"-c\", \"sleep 0.2; grep -q good \\\"$APP_ROOT/etc/app.conf\\\"\"] }\n",
    );
}

/// Runs every agent once, all at the same time; returns their outputs.
pub(super) fn round(agents: &[Agent]) -> Vec<(String, i32, String)> {
    let children: Vec<(String, Child)> = agents
        .iter()
        .map(|a| (a.name.clone(), a.spawn_sync()))
        .collect();
    children
        .into_iter()
        .map(|(n, c)| {
            let out = c.wait_with_output().unwrap();
            (
                n,
                out.status.code().unwrap_or(-1),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            )
        })
        .collect()
}

const POLICY: &str = "[rollout]\nmax_concurrent = 4\n\n\
    [[rollout.waves]]\nname = \"canary\"\nlabels = { canary = \"yes\" }\nmin_healthy = 1\nbake = \"1s\"\n\n\
    [[rollout.waves]]\nname = \"early\"\npercent = 25\nmin_healthy = 3\nbake = \"1s\"\n\n\
    [[rollout.waves]]\nname = \"rest\"\npercent = 100\n";

fn fleet(repo: &Repo, etcd: &Etcd, n: usize, groups: usize, ttl: &str) -> Vec<Agent> {
    (0..n)
        .map(|i| {
            let labels = if i == 0 { "canary = \"yes\"" } else { "" };
            Agent::new(
                &format!("h{i:02}"),
                repo.path(),
                etcd,
                &format!("g{}", i % groups),
                labels,
                ttl,
            )
        })
        .collect()
}

/// A rollout policy of one wave, every host at once (6 permits).
const ALL_AT_ONCE: &str = "[rollout]\nmax_concurrent = 6\n[[rollout.waves]]\nname = \"all\"\npercent = 100\nmin_healthy = 0\n";

#[test]
fn a_good_commit_rolls_out_wave_by_wave_within_the_permits() {
    let Some(etcd) = etcd_or_skip() else { return };
    let started = Instant::now();
    let repo = repo_with(POLICY, "good v1\n");
    let c1 = repo.commit("v1");
    let agents = fleet(&repo, &etcd, 50, 2, "10s");
    let policy = driftless::rollout::policy::parse("driftless.toml", POLICY)
        .unwrap()
        .unwrap();
    let wave_of = |name: &str| {
        let labels: BTreeMap<String, String> = if name == "h00" {
            [("canary".to_string(), "yes".to_string())].into()
        } else {
            BTreeMap::new()
        };
        driftless::rollout::decide::wave_of(&policy, name, &labels).unwrap()
    };
    let mut rounds = 0;
    while agents
        .iter()
        .any(|a| a.content().as_deref() != Some("good v1\n"))
    {
        rounds += 1;
        assert!(
            rounds <= 30,
            "the rollout did not finish in 30 rounds ({:?}); waiting: {:?}",
            started.elapsed(),
            round(&agents[..3])
        );
        for (name, code, out) in round(&agents) {
            assert_eq!(code, 0, "{name}: {out}");
        }
        // A bake is 1s: do not spin through rounds faster than it.
        std::thread::sleep(Duration::from_millis(300));
    }
    // `fleet status` shows the settled rollout.
    let out = agents[0]
        .cmd(&["fleet", "status", "--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let commits = v["status"]["commits"].as_array().unwrap();
    let mine = commits.iter().find(|c| c["commit"] == c1.as_str()).unwrap();
    let applied: u64 = mine["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["applied"].as_u64().unwrap())
        .sum();
    assert_eq!(applied, 50, "{mine}");
    // One status lease per live host: each run's put revokes the lease
    // of the run before, and released permits revoke theirs.
    let mut c = etcd.client();
    let leases = etcd.rt.block_on(c.leases()).unwrap().leases().len();
    assert!(leases <= 50, "{leases} leases alive after {rounds} rounds");
    let table = agents[0].cmd(&["fleet", "status"]).output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("50 live host(s)") && table.contains("canary"),
        "{table}"
    );

    // The history: permits never exceeded, every apply held one, and
    // waves started in order.
    let hist = etcd.history("/t/");
    let mut held: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut most = 0;
    let mut holding: BTreeSet<String> = BTreeSet::new();
    let mut applied_at: BTreeMap<String, i64> = BTreeMap::new();
    let mut healthy_per_wave: Vec<Vec<i64>> = vec![Vec::new(); policy.waves.len()];
    let mut permit_at: BTreeMap<String, i64> = BTreeMap::new();
    for (rev, put, key, value) in &hist {
        if let Some(rest) = key.strip_prefix("/t/permits/") {
            let (group, host) = rest.split_once('/').unwrap();
            let set = held.entry(group.to_string()).or_default();
            if *put {
                set.insert(host.to_string());
                holding.insert(host.to_string());
                permit_at.entry(host.to_string()).or_insert(*rev);
            } else {
                set.remove(host);
                holding.remove(host);
            }
            assert!(
                set.len() <= 4,
                "revision {rev}: group {group} holds {} permits: {set:?}",
                set.len()
            );
            most = most.max(set.len());
        } else if let Some(host) = key.strip_prefix("/t/hosts/") {
            if !put || applied_at.contains_key(host) {
                continue;
            }
            let s: serde_json::Value = serde_json::from_str(value).unwrap();
            if s["commit"] == c1.as_str() {
                assert_eq!(s["result"], "applied", "{host} at {rev}: {s}");
                assert!(
                    permit_at.contains_key(host),
                    "{host} applied at revision {rev} without ever holding a permit"
                );
                applied_at.insert(host.to_string(), *rev);
                if s["healthy"] == true {
                    healthy_per_wave[wave_of(host)].push(*rev);
                }
            }
        }
    }
    assert_eq!(applied_at.len(), 50);
    assert!(
        most >= 2,
        "permits were never used concurrently (most {most})"
    );
    for (host, at) in &permit_at {
        let w = wave_of(host);
        for (j, wave) in policy.waves.iter().enumerate().take(w) {
            let before = healthy_per_wave[j].iter().filter(|r| **r < *at).count();
            assert!(
                before >= wave.min_healthy as usize,
                "{host} (wave {w}) took a permit at revision {at} when wave {j} had {before} healthy report(s)"
            );
        }
    }
    eprintln!(
        "fleet rollout: 50 agents, {rounds} rounds, {} etcd changes, at most {most} permits per group, {:?}",
        hist.len(),
        started.elapsed()
    );
}

#[test]
fn a_failing_canary_halts_the_rollout() {
    let Some(etcd) = etcd_or_skip() else { return };
    let policy = "[rollout]\nmax_concurrent = 4\n\n\
        [[rollout.waves]]\nname = \"canary\"\nlabels = { canary = \"yes\" }\n\n\
        [[rollout.waves]]\nname = \"rest\"\npercent = 100\n";
    let repo = repo_with(policy, "good v1\n");
    repo.commit("v1");
    // Everyone on v1 first.
    let agents = fleet(&repo, &etcd, 12, 1, "10s");
    let mut rounds = 0;
    while agents
        .iter()
        .any(|a| a.content().as_deref() != Some("good v1\n"))
    {
        rounds += 1;
        assert!(rounds <= 30, "v1 did not roll out");
        round(&agents);
        std::thread::sleep(Duration::from_millis(300));
    }
    set_content(&repo, "broken v2\n");
    let bad = repo.commit("v2 breaks the check");
    let before = etcd.revision();
    for _ in 0..4 {
        round(&agents);
        std::thread::sleep(Duration::from_millis(300));
    }
    // The canary tried, failed its check and reverted; nobody else
    // applied v2, ever (the history of every status says so).
    assert_eq!(agents[0].content().as_deref(), Some("good v1\n"));
    let marks = etcd.keys(&format!("/t/bad/{bad}/"));
    assert_eq!(marks, vec![format!("/t/bad/{bad}/h00")]);
    // The histories hold what the checks below read: every host's
    // statuses (v1 rolled out to all 12), and the canary's permit for v2.
    let statuses = etcd.history("/t/hosts/");
    let reporting: BTreeSet<&str> = statuses
        .iter()
        .filter(|(_, put, _, _)| *put)
        .map(|(_, _, key, _)| key.as_str())
        .collect();
    assert_eq!(reporting.len(), 12, "{reporting:?}");
    for (rev, put, key, value) in &statuses {
        if *put {
            let s: serde_json::Value = serde_json::from_str(value).unwrap();
            assert_ne!(s["commit"], bad.as_str(), "{key} at {rev} applied v2: {s}");
        }
    }
    let permits = etcd.history("/t/permits/");
    assert!(
        permits
            .iter()
            .any(|(rev, put, key, _)| *put && *rev > before && key.ends_with("/h00")),
        "the canary never took a permit for v2: {permits:?}"
    );
    for (rev, put, key, _) in &permits {
        if *put && *rev > before {
            assert!(
                key.ends_with("/h00"),
                "{key} took a permit after v2 while only the canary may: revision {rev}"
            );
        }
    }
    for a in &agents {
        assert_eq!(a.content().as_deref(), Some("good v1\n"), "{}", a.name);
    }
    let st = agents[3].cmd(&["fleet", "status"]).output().unwrap();
    let st = String::from_utf8_lossy(&st.stdout);
    assert!(
        st.contains("HALTED") && st.contains("reverted by h00"),
        "{st}"
    );
    let status = agents[3]
        .cmd(&["status", "--format", "json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(v.to_string().contains("halted"), "`status` says why: {v}");
}

#[test]
fn a_killed_hosts_permit_returns_after_the_lease_ttl() {
    let Some(etcd) = etcd_or_skip() else { return };
    let policy = "[rollout]\nmax_concurrent = 1\n[[rollout.waves]]\nname = \"all\"\npercent = 100\nmin_healthy = 0\n";
    let repo = repo_with(policy, "good v1\n");
    // The check hangs: the first agent holds its permit until killed.
    repo.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/app.conf\"\nsource = \"app.conf\"\n\n\
         [[checks]]\nname = \"slow\"\nretries = 1\ntimeout = \"60s\"\n\
         command = { argv = [\"/bin/sh\", \"-c\", \"test -e \\\"$APP_ROOT/fast\\\" || sleep 60\"] }\n",
    );
    repo.commit("v1");
    let a = Agent::new("slow", repo.path(), &etcd, "g", "", "2s");
    let b = Agent::new("next", repo.path(), &etcd, "g", "", "2s");
    std::fs::write(b.root().join("fast"), "").unwrap();
    let mut child = a.spawn_sync();
    let deadline = Instant::now() + Duration::from_secs(15);
    while etcd.keys("/t/permits/g/") != vec!["/t/permits/g/slow".to_string()] {
        assert!(
            Instant::now() < deadline,
            "the first agent never took its permit"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Held (kept alive) for longer than the TTL while the agent lives.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(etcd.keys("/t/permits/g/"), vec!["/t/permits/g/slow"]);
    // Meanwhile the other host waits for the permit.
    let out = b.cmd(&["sync", "--once"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("permit"), "{text}");
    assert!(b.content().is_none());
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    while !etcd.keys("/t/permits/g/").is_empty() {
        assert!(
            killed.elapsed() < Duration::from_secs(8),
            "the permit outlived its 2s lease"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let freed = killed.elapsed();
    assert!(
        freed >= Duration::from_millis(500),
        "freed at once: {freed:?}"
    );
    b.cmd(&["sync", "--once"]).output().unwrap();
    assert_eq!(b.content().as_deref(), Some("good v1\n"));
    eprintln!("permit of a killed host freed {freed:?} after the kill (lease_ttl 2s)");
}

#[test]
fn etcd_killed_mid_rollout_no_host_applies_without_a_permit() {
    let Some(mut etcd) = etcd_or_skip() else {
        return;
    };
    let policy = "[rollout]\nmax_concurrent = 2\n[[rollout.waves]]\nname = \"all\"\npercent = 100\nmin_healthy = 0\n";
    let repo = repo_with(policy, "good v1\n");
    let c1 = repo.commit("v1");
    let agents = fleet(&repo, &etcd, 10, 1, "10s");
    let applied = |agents: &[Agent]| {
        agents
            .iter()
            .filter(|a| a.content().as_deref() == Some("good v1\n"))
            .count()
    };
    round(&agents);
    let before = applied(&agents);
    assert!(
        (1..=2).contains(&before),
        "{before} applied in the first round"
    );
    etcd.kill();
    // etcd down: every agent waits (on_unreachable = "wait"), none applies.
    for (name, code, out) in round(&agents) {
        assert_eq!(code, 0, "{name}: {out}");
        if agents
            .iter()
            .any(|a| a.name == name && a.content().is_none())
        {
            assert!(out.contains("until etcd answers"), "{name}: {out}");
        }
    }
    assert_eq!(
        applied(&agents),
        before,
        "a host applied while etcd was down"
    );
    etcd.restart();
    let mut rounds = 0;
    while applied(&agents) < agents.len() {
        rounds += 1;
        assert!(rounds <= 15, "the rollout did not resume");
        round(&agents);
    }
    // Every host that applied took a permit first, at most 2 at a time.
    let mut held: BTreeSet<String> = BTreeSet::new();
    let mut permitted: BTreeSet<String> = BTreeSet::new();
    let mut on_c1: BTreeSet<String> = BTreeSet::new();
    for (rev, put, key, value) in etcd.history("/t/") {
        if let Some(host) = key.strip_prefix("/t/permits/g0/") {
            if put {
                held.insert(host.to_string());
                permitted.insert(host.to_string());
            } else {
                held.remove(host);
            }
            assert!(held.len() <= 2, "revision {rev}: {held:?}");
        } else if let Some(host) = key.strip_prefix("/t/hosts/") {
            let s: serde_json::Value = serde_json::from_str(&value).unwrap_or_default();
            if put && s["commit"] == c1.as_str() && on_c1.insert(host.to_string()) {
                assert!(
                    permitted.contains(host),
                    "{host} applied at {rev} without a permit"
                );
            }
        }
    }
    assert_eq!(on_c1.len(), 10);
}

/// The commit each host's status names, from the history (last put wins).
fn last_commits(etcd: &Etcd) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (_, put, key, value) in etcd.history("/t/hosts/") {
        if let (true, Some(host)) = (put, key.strip_prefix("/t/hosts/")) {
            let s: serde_json::Value = serde_json::from_str(&value).unwrap_or_default();
            out.insert(
                host.to_string(),
                s["commit"].as_str().unwrap_or("").to_string(),
            );
        }
    }
    out
}

#[test]
fn hosts_that_applied_a_commit_another_host_reverted_roll_back() {
    let Some(etcd) = etcd_or_skip() else { return };
    let policy = ALL_AT_ONCE;
    let repo = repo_with(policy, "good v1\n");
    // v2 passes its check everywhere except on h03 (it reverts v2), and
    // v1 fails on a host holding `v1-breaks-here` (h02, once v2 runs there).
    repo.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/app.conf\"\nsource = \"app.conf\"\n\n\
         [[checks]]\nname = \"app is good\"\nretries = 1\n\
         command = { argv = [\"/bin/sh\", \"-c\", \"sleep 0.2; cd \\\"$APP_ROOT\\\"; \
         ! { test -e v2-breaks-here && grep -q v2 etc/app.conf; } && \
         ! { test -e v1-breaks-here && grep -q v1 etc/app.conf; }\"] }\n",
    );
    let c1 = repo.commit("v1");
    let agents = fleet(&repo, &etcd, 6, 1, "10s");
    round(&agents);
    assert!(agents
        .iter()
        .all(|a| a.content().as_deref() == Some("good v1\n")));
    std::fs::write(agents[3].root().join("v2-breaks-here"), "").unwrap();
    repo.write("roles/app/files/app.conf", "good v2\n");
    let c2 = repo.commit("v2 breaks on h03");
    // The five others first, then h03 (in one round, a slow start could
    // see h03's mark before deciding, and wait instead).
    let (first, h03): (Vec<&Agent>, Vec<&Agent>) = agents.iter().partition(|a| a.name != "h03");
    for a in &first {
        let out = a.cmd(&["sync", "--once"]).output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            a.name,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(a.content().as_deref(), Some("good v2\n"), "{}", a.name);
    }
    let out = h03[0].cmd(&["sync", "--once"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "h03 reverts v2");
    assert_eq!(
        etcd.keys(&format!("/t/bad/{c2}/")),
        vec![format!("/t/bad/{c2}/h03")]
    );
    // While rollouts are suspended, nobody rolls back either.
    let ok = |args: &[&str]| {
        let out = agents[0].cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(&["suspend", "--reason", "incident"]);
    for (name, code, out) in round(&agents) {
        assert_eq!(code, 0, "{name}: {out}");
        if name != "h03" {
            assert!(
                out.contains("not rolling back until `driftless resume`"),
                "{name}: {out}"
            );
        }
    }
    assert_eq!(agents[0].content().as_deref(), Some("good v2\n"));
    ok(&["resume"]);
    // v1 now fails on h02: its rollback reverts, and that must not mark v1
    // bad fleet-wide (v1 is what every other host returns to).
    std::fs::write(agents[2].root().join("v1-breaks-here"), "").unwrap();
    // Next poll: v2 is halted fleet-wide, and the hosts on it roll back.
    for (name, code, out) in round(&agents) {
        match name.as_str() {
            "h03" => assert_eq!(code, 0, "{name}: {out}"),
            "h02" => assert_eq!(code, 1, "h02's rollback to v1 fails its check: {out}"),
            _ => {
                assert_eq!(code, 0, "{name}: {out}");
                assert!(
                    out.contains("halted fleet-wide") && out.contains("rolling back"),
                    "{name}: {out}"
                );
            }
        }
    }
    assert!(
        etcd.keys(&format!("/t/bad/{c1}/")).is_empty(),
        "a failed rollback marked v1 bad fleet-wide"
    );
    for a in &agents {
        let want = if a.name == "h02" {
            "good v2\n"
        } else {
            "good v1\n"
        };
        assert_eq!(a.content().as_deref(), Some(want), "{}", a.name);
    }
    // And stay there: v2 is marked bad on each host; h02's rollback failed
    // (v1 fails there): it keeps v2 without failing or trying again.
    for (name, code, out) in round(&agents) {
        assert_eq!(code, 0, "{name}: {out}");
        if name == "h02" {
            assert!(out.contains("rollback from it failed already"), "{out}");
        }
    }
    for a in &agents {
        let want = if a.name == "h02" {
            "good v2\n"
        } else {
            "good v1\n"
        };
        assert_eq!(a.content().as_deref(), Some(want), "{}", a.name);
    }
    let commits = last_commits(&etcd);
    assert_eq!(commits.len(), 6);
    assert_eq!(
        commits.values().filter(|c| **c == c1).count(),
        5,
        "{commits:?}"
    );
    let hist = agents[0].cmd(&["history"]).output().unwrap();
    let hist = String::from_utf8_lossy(&hist.stdout);
    assert!(hist.contains("rollback from"), "{hist}");
    // v1 halted too (marks of other hosts): a host that came to v1 by a
    // rollback does not walk further down the history by itself.
    let mut c = etcd.client();
    etcd.rt
        .block_on(c.put(format!("/t/bad/{c1}/ghost"), "forged", None))
        .unwrap();
    for (name, code, out) in round(&agents) {
        assert_eq!(code, 0, "{name}: {out}");
        if !["h02", "h03"].contains(&name.as_str()) {
            assert!(out.contains("came to it by a rollback"), "{name}: {out}");
        }
    }
    assert_eq!(agents[0].content().as_deref(), Some("good v1\n"));
    etcd.rt
        .block_on(c.delete(format!("/t/bad/{c1}/ghost"), None))
        .unwrap();
    // The operator resumes v2's rollout: the fleet's marks go; a host's own
    // bad mark stays until it retries (`sync --retry`) or a newer commit.
    let out = agents[0]
        .cmd(&["resume", "--commit", &c2.to_uppercase()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("removed the bad marks of h03"),
        "{text}"
    );
    assert!(etcd.keys(&format!("/t/bad/{c2}/")).is_empty());
    let out = agents[0]
        .cmd(&["resume", "--commit", "abc"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("full 40-character commit id"));
}

/// A fleet rollback whose target failed its checks (reverted: the host
/// stayed on the halted commit) was tried again on every poll with the
/// next older commit of the history: the host walked down its whole
/// history, one transaction and its restarts at a time. One step it is.
#[test]
fn a_failed_fleet_rollback_is_not_followed_by_older_ones() {
    let Some(etcd) = etcd_or_skip() else { return };
    let policy = ALL_AT_ONCE;
    let repo = repo_with(policy, "good v0\n");
    repo.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/app.conf\"\nsource = \"app.conf\"\n\n\
         [[checks]]\nname = \"app is good\"\nretries = 1\n\
         command = { argv = [\"/bin/sh\", \"-c\", \"cd \\\"$APP_ROOT\\\"; \
         ! { test -e v2-breaks-here && grep -q v2 etc/app.conf; } && \
         ! { test -e v1-breaks-here && grep -q v1 etc/app.conf; }\"] }\n",
    );
    repo.commit("v0");
    let agents = fleet(&repo, &etcd, 2, 1, "10s");
    for (name, code, out) in round(&agents) {
        assert_eq!(code, 0, "{name}: {out}");
    }
    repo.write("roles/app/files/app.conf", "good v1\n");
    repo.commit("v1");
    for (name, code, out) in round(&agents) {
        assert_eq!(code, 0, "{name}: {out}");
    }
    // v2: h00 applies it, h01 reverts it (halted fleet-wide).
    std::fs::write(agents[1].root().join("v2-breaks-here"), "").unwrap();
    repo.write("roles/app/files/app.conf", "good v2\n");
    repo.commit("v2");
    let out = agents[0].cmd(&["sync", "--once"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = agents[1].cmd(&["sync", "--once"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // h00 rolls back to v1, which fails there: reverted, it stays on v2.
    std::fs::write(agents[0].root().join("v1-breaks-here"), "").unwrap();
    let out = agents[0].cmd(&["sync", "--once"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(agents[0].content().as_deref(), Some("good v2\n"), "{err}");
    // The next polls do not try v0.
    for _ in 0..2 {
        let out = agents[0].cmd(&["sync", "--once"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(err.contains("rollback from it failed already"), "{err}");
        assert_eq!(agents[0].content().as_deref(), Some("good v2\n"), "{err}");
    }
    // The commit it stays on is not left marked bad by the failed
    // rollback: its drift is still repaired.
    std::fs::write(agents[0].root().join("etc/app.conf"), "edited\n").unwrap();
    let out = agents[0].cmd(&["sync", "--once"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(agents[0].content().as_deref(), Some("good v2\n"), "{err}");
}

/// A drift repair whose checks fail on one host (the host's own trouble:
/// here the desired content fails where the hand-edited one passed) was
/// reported as a revert of the commit, and marked it bad fleet-wide: every
/// other host running it, for weeks maybe, rolled back. The commit is not
/// marked bad on the fleet for that; the host says it reverted.
#[test]
fn a_failing_drift_repair_does_not_mark_the_running_commit_bad_fleet_wide() {
    let Some(etcd) = etcd_or_skip() else { return };
    let policy = ALL_AT_ONCE;
    let repo = repo_with(policy, "good v1\n");
    repo.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/app.conf\"\nsource = \"app.conf\"\n\n\
         [[checks]]\nname = \"app is good\"\nretries = 1\n\
         command = { argv = [\"/bin/sh\", \"-c\", \"cd \\\"$APP_ROOT\\\"; test -e flag || grep -q hand etc/app.conf\"] }\n",
    );
    let c1 = repo.commit("v1");
    let agents = fleet(&repo, &etcd, 2, 1, "10s");
    for a in &agents {
        std::fs::write(a.root().join("flag"), "").unwrap();
    }
    for (name, code, out) in round(&agents) {
        assert_eq!(code, 0, "{name}: {out}");
    }
    // h01: its flag gone and its file hand-edited. The repair writes v1,
    // which fails there; the revert puts the edit back, which passes.
    std::fs::remove_file(agents[1].root().join("flag")).unwrap();
    std::fs::write(agents[1].root().join("etc/app.conf"), "hand\n").unwrap();
    let out = agents[1].cmd(&["sync", "--once"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("reverted"), "{err}");
    assert_eq!(agents[1].content().as_deref(), Some("hand\n"));
    assert!(
        etcd.keys(&format!("/t/bad/{c1}/")).is_empty(),
        "marked bad fleet-wide: {err}"
    );
    // Its next run fails and says why, and still marks nothing fleet-wide.
    let out = agents[1].cmd(&["sync", "--once"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("its drift is not repaired"), "{err}");
    assert!(
        etcd.keys(&format!("/t/bad/{c1}/")).is_empty(),
        "marked bad fleet-wide: {err}"
    );
    // h00 goes on running v1.
    let out = agents[0].cmd(&["sync", "--once"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("rolling back"), "{err}");
    assert_eq!(agents[0].content().as_deref(), Some("good v1\n"));
}

#[test]
fn a_suspended_group_waits_until_resumed_and_the_others_go_on() {
    let Some(etcd) = etcd_or_skip() else { return };
    let policy = ALL_AT_ONCE;
    let repo = repo_with(policy, "good v1\n");
    repo.commit("v1");
    let agents = fleet(&repo, &etcd, 6, 2, "10s");
    round(&agents);
    let out = agents[0]
        .cmd(&["suspend", "--group", "g0", "--reason", "db migration"])
        .env("SUDO_USER", "alice")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    set_content(&repo, "good v2\n");
    repo.commit("v2");
    for _ in 0..2 {
        for (name, code, out) in round(&agents) {
            assert_eq!(code, 0, "{name}: {out}");
        }
    }
    for (i, a) in agents.iter().enumerate() {
        let want = if i % 2 == 0 { "good v1\n" } else { "good v2\n" };
        assert_eq!(a.content().as_deref(), Some(want), "{}", a.name);
    }
    let st = agents[1].cmd(&["fleet", "status"]).output().unwrap();
    let st = String::from_utf8_lossy(&st.stdout);
    assert!(
        st.contains("SUSPENDED: group g0, by alice@h00") && st.contains("db migration"),
        "{st}"
    );
    assert!(
        st.contains("rollouts are suspended for group \"g0\" by alice@h00"),
        "each waiting host says why: {st}"
    );
    // A fleet-wide suspension holds every group; resuming g0 alone does
    // not lift it.
    let ok = |args: &[&str]| {
        let out = agents[0].cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(&["suspend"]);
    assert!(ok(&["resume", "--group", "g0"]).contains("resumed rollouts for group \"g0\""));
    round(&agents);
    assert_eq!(agents[0].content().as_deref(), Some("good v1\n"));
    assert!(ok(&["resume"]).contains("resumed rollouts for every group"));
    assert!(ok(&["resume"]).contains("no fleet-wide suspension"));
    round(&agents);
    for a in &agents {
        assert_eq!(a.content().as_deref(), Some("good v2\n"), "{}", a.name);
    }
    let out = agents[0]
        .cmd(&["suspend", "--group", "a/b"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn no_host_applies_outside_the_maintenance_window() {
    let Some(etcd) = etcd_or_skip() else { return };
    // Open 6 s of every 15 s; one host at a time, so the rollout of 12
    // hosts outlasts a window and has to wait for the next.
    let policy = "[rollout]\nmax_concurrent = 1\n[[rollout.waves]]\nname = \"all\"\npercent = 100\nmin_healthy = 0\n\
        [[rollout.windows]]\ncalendar = \"*:*:00/15 UTC\"\nlength = \"6s\"\n";
    let repo = repo_with(policy, "good v1\n");
    let c1 = repo.commit("v1");
    let agents = fleet(&repo, &etcd, 12, 1, "10s");
    // Start well outside a window (7 to 12 s into a cycle), so the first
    // round must wait whatever the machine's speed (CI found a rollout
    // that fit into one window).
    while !(7..12).contains(&(driftless::time::now() % 15)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let started = Instant::now();
    let mut waited_for_window = false;
    while agents
        .iter()
        .any(|a| a.content().as_deref() != Some("good v1\n"))
    {
        // One host at a time, 6 s open of every 15: a slow machine may
        // need a window per host.
        assert!(
            started.elapsed() < Duration::from_secs(12 * 15 + 60),
            "the rollout did not finish in 240 s"
        );
        for (name, code, out) in round(&agents) {
            assert_eq!(code, 0, "{name}: {out}");
            waited_for_window |= out.contains("outside its maintenance window");
        }
    }
    assert!(waited_for_window, "no host ever waited for the window");
    let st = agents[0].cmd(&["fleet", "status"]).output().unwrap();
    let st = String::from_utf8_lossy(&st.stdout);
    assert!(
        st.contains("window for every group: \"*:*:00/15 UTC\" for 6s: "),
        "fleet status shows the window: {st}"
    );
    // Every apply was decided inside a window: its status's `since` is
    // the time of the decision.
    let mut applied = 0;
    for (rev, put, key, value) in etcd.history("/t/hosts/") {
        let s: serde_json::Value = serde_json::from_str(&value).unwrap_or_default();
        if put && s["result"] == "applied" && s["commit"] == c1.as_str() {
            let since = s["since"].as_i64().unwrap();
            assert!(
                since % 15 < 6,
                "{key} at revision {rev} applied at {since} ({} s into a 15 s cycle, the window is 6 s)",
                since % 15
            );
            applied += 1;
        }
    }
    assert_eq!(applied, 12);
    eprintln!(
        "windowed rollout of 12 hosts, one at a time, 6 s of every 15 s: {:?}",
        started.elapsed()
    );
}

/// bench/fleet-sim found it: every host reads all host statuses before it
/// decides, in one range request, and past gRPC's 4 MiB message limit
/// (about 7,600 statuses) the client refused the answer, so no host of a
/// large fleet could apply anything. The statuses are now read in pages
/// at one revision.
#[test]
fn a_fleet_whose_statuses_exceed_one_grpc_message_still_decides() {
    let Some(etcd) = etcd_or_skip() else { return };
    let mut c = etcd.client();
    let padding = "x".repeat(420);
    let n = 8_000;
    etcd.rt.block_on(async {
        for batch in 0..n / 100 {
            let ops: Vec<etcd_client::TxnOp> = (0..100)
                .map(|i| {
                    let host = format!("sim{:05}", batch * 100 + i);
                    let status = serde_json::json!({
                        "host": host, "group": "g", "labels": { "pad": padding },
                        "version": "0", "commit": null, "since": null, "healthy": true,
                        "result": "unchanged", "last_run": 1,
                    });
                    etcd_client::TxnOp::put(format!("/t/hosts/{host}"), status.to_string(), None)
                })
                .collect();
            c.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
        }
    });
    let total: usize = etcd.rt.block_on(async {
        let r = c
            .get(
                "/t/hosts/",
                Some(GetOptions::new().with_prefix().with_limit(1)),
            )
            .await
            .unwrap();
        assert_eq!(r.count(), n as i64);
        n * 560
    });
    assert!(
        total > 4 << 20,
        "the statuses must outgrow one gRPC message"
    );
    let policy = "[rollout]\n[[rollout.waves]]\nname = \"all\"\npercent = 100\nmin_healthy = 0\n";
    let repo = repo_with(policy, "good v1\n");
    repo.commit("v1");
    let a = Agent::new("h0", repo.path(), &etcd, "g", "", "10s");
    let out = a.cmd(&["sync", "--once"]).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert_eq!(a.content().as_deref(), Some("good v1\n"), "{text}");
    let st = a.cmd(&["fleet", "status"]).output().unwrap();
    let st = String::from_utf8_lossy(&st.stdout);
    assert!(
        st.contains(&format!("{} live host(s)", n + 1)),
        "{}",
        &st[..st.len().min(400)]
    );
}

/// etcd restarts while a host holds a permit through a slow check: the
/// permit's keep-alive loses its stream and renews on a new connection,
/// so the permit is held throughout and given back at the end.
#[test]
fn a_permit_survives_an_etcd_restart_during_the_apply() {
    let Some(mut etcd) = etcd_or_skip() else {
        return;
    };
    let policy = "[rollout]\n[[rollout.waves]]\nname = \"all\"\npercent = 100\nmin_healthy = 0\n";
    let repo = repo_with(policy, "good v1\n");
    repo.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/app.conf\"\nsource = \"app.conf\"\n\n\
         [[checks]]\nname = \"slow\"\nretries = 1\ntimeout = \"30s\"\n\
         command = { argv = [\"/bin/sleep\", \"10\"] }\n",
    );
    repo.commit("v1");
    let a = Agent::new("h0", repo.path(), &etcd, "g", "", "4s");
    let mut child = a.spawn_sync();
    let deadline = Instant::now() + Duration::from_secs(15);
    while etcd.keys("/t/permits/g/").is_empty() {
        assert!(Instant::now() < deadline, "the agent never took its permit");
        std::thread::sleep(Duration::from_millis(50));
    }
    let permit = etcd.keys("/t/permits/g/");
    etcd.kill();
    std::thread::sleep(Duration::from_millis(1500));
    etcd.restart();
    // Past the lease's TTL (4 s) after the restart, while the check still
    // runs: only a lease the agent went on renewing keeps the permit.
    std::thread::sleep(Duration::from_millis(5500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the sync ended before the lease's TTL passed: the test proves nothing"
    );
    assert_eq!(etcd.keys("/t/permits/g/"), permit, "the permit lapsed");
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert_eq!(a.content().as_deref(), Some("good v1\n"));
    assert!(
        !text.contains("cannot renew the permit's lease") && !text.contains("lease expired"),
        "{text}"
    );
    // Held until the end, then given back.
    assert!(etcd.keys("/t/permits/g/").is_empty(), "{text}");
    let puts = etcd
        .history("/t/permits/g/")
        .iter()
        .filter(|(_, put, _, _)| *put)
        .count();
    assert_eq!(puts, 1, "one permit, held across the restart");
    let deletes = etcd
        .history("/t/permits/g/")
        .iter()
        .filter(|(_, put, _, _)| !*put)
        .count();
    assert_eq!(deletes, 1, "given back once, at the end");
}
