//! A fleet of simulated driftless agents against one etcd (issue 17,
//! "Scale"). Run by `bench/fleet-sim/run`, which starts the etcd, runs
//! this once per fleet size and prints the tables.
//!
//! Every simulated host is a tokio task that makes the calls
//! `agent/src/sync/fleet.rs` makes on a run, through the agent's own code:
//! `Store::publish_policy`, `Store::view`, `rollout::decide`,
//! `Store::acquire` (for `Apply`), then `Store::mark_bad` (a revert),
//! `Store::release`, `Store::own_status` (when the run had no view) and
//! `Store::put_status`. What is simulated: fetching (a shared "head"
//! that the driver moves), applying (a sleep of `--apply-ms` holding the
//! permit) and checks (always healthy; on the bad commit the canaries
//! revert).
//!
//! The time model: a host polls every `--interval` seconds plus a random
//! splay of up to `--splay` seconds, after its previous run ended (so an
//! overloaded store stretches the effective interval, and the report
//! says by how much). The agent's default interval is 5 minutes; a
//! 10-second interval compresses time 30 times, so the request *rate* a
//! simulated fleet of N hosts puts on etcd is that of a real fleet of
//! 30·N hosts, while each request (a view reads N statuses) is that of N
//! hosts. Bake times are compared with the real clock by
//! `rollout::decide`, so they are given in wall seconds (`--bake`).
//! Lease TTLs are the agent's real ones (a status lives 3 intervals plus
//! the splay of the real defaults, 960 s; a permit 30 s): a TTL only
//! matters when a host dies, which nothing here does.
//!
//! Simulated hosts share `--connections` etcd connections (one `Store`
//! each, behind a mutex, so at most that many requests are in flight);
//! a real fleet has one per host, and the `connect_all` phase opens one
//! per host to see whether that many work from one process. Permits are
//! given back (`release`, and `mark_bad` before it) over
//! `RELEASE_CONNECTIONS` connections of their own, so that a permit is
//! not held longer only because other simulated hosts' requests queue on
//! the shared connections (a real host has its own).
//!
//! Output: progress on stderr, one JSON document on stdout.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use driftless::config::{FleetSettings, OnUnreachable};
use driftless::effects::fleet::{HostStatus, Permit, Store, Waiting};
use driftless::rollout::{self, Decision, Policy};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex as AsyncMutex;

/// The agent's status TTL at its defaults: 3 × 5 min + 1 min.
const STATUS_TTL: Duration = Duration::from_secs(3 * 300 + 60);
/// The agent's default permit lease (`[fleet] lease_ttl`).
const PERMIT_TTL: Duration = Duration::from_secs(30);
const GROUP: &str = "web";
const RELEASE_CONNECTIONS: usize = 8;

struct Args {
    endpoint: String,
    hosts: usize,
    connections: usize,
    canaries: usize,
    interval: f64,
    splay: f64,
    apply_ms: u64,
    bake: u64,
    max_concurrent: u32,
    rollout_timeout: f64,
    storm_secs: f64,
    probe_views: usize,
    connect_all: bool,
    bad: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: fleet-sim --endpoint http://127.0.0.1:PORT [--hosts N] [--connections K] [--canaries C]
       [--interval SECS] [--splay SECS] [--apply-ms MS] [--bake SECS] [--max-concurrent M]
       [--rollout-timeout SECS] [--storm-secs SECS] [--probe-views V] [--no-connect-all] [--no-bad]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        endpoint: String::new(),
        hosts: 1000,
        connections: 100,
        canaries: 1,
        interval: 10.0,
        splay: 2.0,
        apply_ms: 500,
        bake: 5,
        max_concurrent: 50,
        rollout_timeout: 75.0,
        storm_secs: 5.0,
        probe_views: 15,
        connect_all: true,
        bad: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| usage());
        fn num<T: std::str::FromStr>(s: String) -> T {
            s.parse().unwrap_or_else(|_| usage())
        }
        match k.as_str() {
            "--endpoint" => a.endpoint = v(),
            "--hosts" => a.hosts = num(v()),
            "--connections" => a.connections = num(v()),
            "--canaries" => a.canaries = num(v()),
            "--interval" => a.interval = num(v()),
            "--splay" => a.splay = num(v()),
            "--apply-ms" => a.apply_ms = num(v()),
            "--bake" => a.bake = num(v()),
            "--max-concurrent" => a.max_concurrent = num(v()),
            "--rollout-timeout" => a.rollout_timeout = num(v()),
            "--storm-secs" => a.storm_secs = num(v()),
            "--probe-views" => a.probe_views = num(v()),
            "--no-connect-all" => a.connect_all = false,
            "--no-bad" => a.bad = false,
            _ => usage(),
        }
    }
    if a.endpoint.is_empty() || a.hosts == 0 || a.connections == 0 || a.canaries == 0 {
        usage()
    }
    a.connections = a.connections.min(a.hosts);
    a
}

// ---------------------------------------------------------------- stats

/// min / median / max of a sample.
fn mmm(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(f64::total_cmp);
    json!({"n": v.len(), "min": v[0], "median": v[v.len() / 2], "max": v[v.len() - 1]})
}

const CALLS: [&str; 8] = [
    "publish_policy",
    "view",
    "acquire",
    "release",
    "put_status",
    "own_status",
    "mark_bad",
    "connect",
];

#[derive(Default)]
struct Stats {
    calls: [AtomicU64; CALLS.len()],
    /// Runs that asked the fleet (a new commit) and runs that did not.
    asks: AtomicU64,
    idle_runs: AtomicU64,
    granted: AtomicU64,
    refused: AtomicU64,
    view_ms: Mutex<Vec<f64>>,
    acquire_ms: Mutex<Vec<f64>>,
    run_ms: Mutex<Vec<f64>>,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    fn call(&self, name: &str) {
        let i = CALLS.iter().position(|c| *c == name).unwrap_or(0);
        self.calls[i].fetch_add(1, Relaxed);
    }
    fn counts(&self) -> BTreeMap<&'static str, u64> {
        CALLS
            .iter()
            .zip(&self.calls)
            .map(|(n, c)| (*n, c.load(Relaxed)))
            .collect()
    }
    fn error(&self, e: &anyhow::Error) {
        // Host names and numbers vary; the kind of error does not.
        let mut s = String::new();
        let mut digits = false;
        for c in format!("{e:#}").chars() {
            if c.is_ascii_digit() {
                if !digits {
                    s.push('N');
                }
                digits = true;
            } else {
                digits = false;
                s.push(c);
            }
        }
        s.truncate(240);
        *self.errors.lock().unwrap().entry(s).or_default() += 1;
    }
    fn take(v: &Mutex<Vec<f64>>) -> Vec<f64> {
        std::mem::take(&mut *v.lock().unwrap())
    }
}

// ------------------------------------------------------- etcd's metrics

/// etcd's /metrics (Prometheus text) on its client URL.
async fn scrape(endpoint: &str) -> Result<BTreeMap<String, f64>> {
    let addr = endpoint.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    let mut out = BTreeMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        if let Some((series, value)) = line.rsplit_once(' ') {
            if let Ok(v) = value.parse::<f64>() {
                out.insert(series.to_string(), v);
            }
        }
    }
    Ok(out)
}

/// The sum of the series named `name` whose labels contain `filter`.
fn metric(m: &BTreeMap<String, f64>, name: &str, filter: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| {
            let n = k.split('{').next().unwrap_or("");
            n == name && k.contains(filter)
        })
        .map(|(_, v)| v)
        .sum()
}

/// What etcd did between two scrapes (and its gauges at the second).
fn etcd_delta(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> Value {
    let d = |name: &str, f: &str| metric(b, name, f) - metric(a, name, f);
    let rpc = |m: &str| d("grpc_server_handled_total", &format!("grpc_method=\"{m}\""));
    json!({
        "cpu_s": d("process_cpu_seconds_total", ""),
        "rss_mb": metric(b, "process_resident_memory_bytes", "") / 1e6,
        "rpc_range": rpc("Range"),
        "rpc_put": rpc("Put"),
        "rpc_txn": rpc("Txn"),
        "rpc_delete": rpc("DeleteRange"),
        "rpc_lease_grant": rpc("LeaseGrant"),
        "rpc_lease_revoke": rpc("LeaseRevoke"),
        "rpc_unary_total": d("grpc_server_handled_total", "grpc_type=\"unary\""),
        "proposals_committed": d("etcd_server_proposals_committed_total", ""),
        "mvcc_put": d("etcd_mvcc_put_total", ""),
        "mvcc_delete": d("etcd_mvcc_delete_total", ""),
        "mvcc_txn": d("etcd_mvcc_txn_total", ""),
        "mvcc_range": d("etcd_mvcc_range_total", ""),
        "wal_fsyncs": d("etcd_disk_wal_fsync_duration_seconds_count", ""),
        "sent_mb": d("etcd_network_client_grpc_sent_bytes_total", "") / 1e6,
        "received_mb": d("etcd_network_client_grpc_received_bytes_total", "") / 1e6,
        "keys": metric(b, "etcd_debugging_mvcc_keys_total", ""),
        "db_mb": metric(b, "etcd_mvcc_db_total_size_in_bytes", "") / 1e6,
    })
}

/// CPU seconds of this process (user + system), from /proc.
fn own_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // After the command name in parentheses: field 3 is the state; utime
    // and stime are fields 14 and 15 (1-based), in USER_HZ (100 on Linux).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

/// One measured phase: wall time, CPU of both sides, etcd's deltas and
/// the calls the simulated agents made.
struct Phase {
    name: &'static str,
    started: Instant,
    cpu: f64,
    metrics: BTreeMap<String, f64>,
    calls: BTreeMap<&'static str, u64>,
}

impl Phase {
    async fn start(ctx: &Ctx, name: &'static str) -> Result<Phase> {
        eprintln!("[{:7.1}s] {name}", ctx.t0.elapsed().as_secs_f64());
        Ok(Phase {
            name,
            started: Instant::now(),
            cpu: own_cpu(),
            metrics: scrape(&ctx.args.endpoint).await?,
            calls: ctx.stats.counts(),
        })
    }
    async fn end(self, ctx: &Ctx, mut extra: Value) -> Result<Value> {
        let wall = self.started.elapsed().as_secs_f64();
        let after = scrape(&ctx.args.endpoint).await?;
        let now = ctx.stats.counts();
        let calls: BTreeMap<&str, u64> = now
            .iter()
            .map(|(k, v)| (*k, v - self.calls.get(k).copied().unwrap_or(0)))
            .filter(|(_, v)| *v > 0)
            .collect();
        let errors = std::mem::take(&mut *ctx.stats.errors.lock().unwrap());
        let obj = extra.as_object_mut().expect("an object");
        obj.insert("phase".into(), json!(self.name));
        obj.insert("wall_s".into(), json!(wall));
        obj.insert("sim_cpu_s".into(), json!(own_cpu() - self.cpu));
        obj.insert("etcd".into(), etcd_delta(&self.metrics, &after));
        obj.insert("calls".into(), json!(calls));
        obj.insert("errors".into(), json!(errors));
        eprintln!(
            "[{:7.1}s]   {}: {:.1}s, {}",
            ctx.t0.elapsed().as_secs_f64(),
            self.name,
            wall,
            serde_json::to_string(&extra).unwrap_or_default()
        );
        Ok(extra)
    }
}

// ---------------------------------------------------------- the fleet

struct Ctx {
    args: Args,
    fleet: FleetSettings,
    stores: Vec<AsyncMutex<Store>>,
    release_stores: Vec<AsyncMutex<Store>>,
    stats: Stats,
    t0: Instant,
}

impl Ctx {
    fn store(&self, host: usize) -> &AsyncMutex<Store> {
        &self.stores[host % self.stores.len()]
    }
    fn release_store(&self, host: usize) -> &AsyncMutex<Store> {
        &self.release_stores[host % self.release_stores.len()]
    }
}

/// A simulated host: what its state dir and inventory would hold.
struct Host {
    idx: usize,
    name: String,
    labels: BTreeMap<String, String>,
    current: Option<String>,
    /// Commits this host reverted (its local bad marks).
    locally_bad: BTreeSet<String>,
    rng: u64,
}

impl Host {
    fn new(idx: usize, canaries: usize) -> Host {
        let mut labels = BTreeMap::new();
        labels.insert("role".to_string(), "web".to_string());
        labels.insert("dc".to_string(), format!("dc{}", idx % 3 + 1));
        if idx < canaries {
            labels.insert("canary".to_string(), "yes".to_string());
        }
        Host {
            idx,
            name: format!("web-{idx:05}.dc{}.example.net", idx % 3 + 1),
            labels,
            current: Some(COMMIT_A.to_string()),
            locally_bad: BTreeSet::new(),
            rng: 0x9e37_79b9_7f4a_7c15 ^ (idx as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9),
        }
    }
    /// xorshift64*: a uniform number in [0, 1).
    fn random(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn is_canary(&self) -> bool {
        self.labels.contains_key("canary")
    }
}

const COMMIT_A: &str = "1111111111111111111111111111111111111111";
const COMMIT_B: &str = "2222222222222222222222222222222222222222";
const COMMIT_BAD: &str = "3333333333333333333333333333333333333333";

/// The commit the hosts fetch (the simulated repository's head).
#[derive(Clone)]
struct Head {
    commit: String,
    /// Its checks fail on a canary, which reverts it.
    bad: bool,
}

/// The rollout's progress, shared by the host tasks.
struct Progress {
    policy: Policy,
    wave_of: Vec<usize>,
    /// Per wave: hosts, of those on the head, and when the last applied
    /// (ms since the rollout started).
    wave_hosts: Vec<usize>,
    wave_applied: Vec<AtomicUsize>,
    wave_first_ms: Vec<AtomicU64>,
    wave_last_ms: Vec<AtomicU64>,
    on_head: AtomicUsize,
    /// Hosts that asked about the bad commit and were told it is halted,
    /// canaries that reverted it, and others that applied it (must be 0).
    halted: AtomicUsize,
    reverted: AtomicUsize,
    bad_applied_elsewhere: AtomicUsize,
    /// Permits held at once, as the hosts saw it (max).
    holding: AtomicUsize,
    max_holding: AtomicUsize,
    started: Mutex<Instant>,
}

/// One run of a host, as `sync_once` does it with `[fleet]`: ask when
/// the head is new, then report.
async fn run_once(ctx: &Ctx, prog: &Progress, h: &mut Host, head: &Head) {
    let started = Instant::now();
    let now = driftless::time::now();
    let policy = &prog.policy;
    let mut prev: Option<HostStatus> = None;
    let mut permit: Option<Permit> = None;
    let mut held: Option<Waiting> = None;
    let mut applied = false;
    let mut reverted = false;
    let wave_name = policy
        .waves
        .get(prog.wave_of[h.idx])
        .map(|w| w.name.clone());
    let asks =
        h.current.as_deref() != Some(head.commit.as_str()) && !h.locally_bad.contains(&head.commit);
    if asks {
        ctx.stats.asks.fetch_add(1, Relaxed);
        match ask(ctx, h, head, policy).await {
            Err(e) => {
                // on_unreachable = "wait": nothing applied, and (as the
                // agent's finish does) nothing reported this run.
                ctx.stats.error(&e);
                ctx.stats
                    .run_ms
                    .lock()
                    .unwrap()
                    .push(started.elapsed().as_secs_f64() * 1e3);
                return;
            }
            Ok((decision, p, got)) => {
                prev = p;
                match decision {
                    Decision::Apply { .. } => {
                        let n = prog.holding.fetch_add(1, Relaxed) + 1;
                        prog.max_holding.fetch_max(n, Relaxed);
                        tokio::time::sleep(Duration::from_millis(ctx.args.apply_ms)).await;
                        prog.holding.fetch_sub(1, Relaxed);
                        permit = got;
                        if head.bad && h.is_canary() {
                            reverted = true;
                            h.locally_bad.insert(head.commit.clone());
                            prog.reverted.fetch_add(1, Relaxed);
                        } else {
                            if head.bad {
                                prog.bad_applied_elsewhere.fetch_add(1, Relaxed);
                            }
                            h.current = Some(head.commit.clone());
                            applied = true;
                            let w = prog.wave_of[h.idx];
                            let ms = prog.started.lock().unwrap().elapsed().as_millis() as u64;
                            prog.wave_applied[w].fetch_add(1, Relaxed);
                            prog.wave_first_ms[w].fetch_min(ms, Relaxed);
                            prog.wave_last_ms[w].fetch_max(ms, Relaxed);
                            prog.on_head.fetch_add(1, Relaxed);
                        }
                    }
                    Decision::Wait { reason, .. } => {
                        held = Some(Waiting {
                            commit: head.commit.clone(),
                            wave: wave_name,
                            reason,
                            halted: false,
                        });
                    }
                    Decision::Halt { reason } => {
                        if !h.locally_bad.contains(&head.commit) {
                            h.locally_bad.insert(head.commit.clone());
                            prog.halted.fetch_add(1, Relaxed);
                        }
                        held = Some(Waiting {
                            commit: head.commit.clone(),
                            wave: wave_name,
                            reason,
                            halted: true,
                        });
                    }
                }
            }
        }
    } else {
        ctx.stats.idle_runs.fetch_add(1, Relaxed);
    }
    if let Err(e) = finish(ctx, h, prev, permit, held, applied, reverted, head, now).await {
        ctx.stats.error(&e);
    }
    ctx.stats
        .run_ms
        .lock()
        .unwrap()
        .push(started.elapsed().as_secs_f64() * 1e3);
}

/// `FleetRun::ask_store`: publish the policy, read the view, decide,
/// take a permit for `Apply` (a lost race is a `Wait`).
async fn ask(
    ctx: &Ctx,
    h: &Host,
    head: &Head,
    policy: &Policy,
) -> Result<(Decision, Option<HostStatus>, Option<Permit>)> {
    let store = ctx.store(h.idx);
    let commit = head.commit.as_str();
    ctx.stats.call("publish_policy");
    store.lock().await.publish_policy(commit, policy).await?;
    let snap = {
        let mut s = store.lock().await;
        let t = Instant::now();
        ctx.stats.call("view");
        let snap = s.view(commit, GROUP).await?;
        ctx.stats
            .view_ms
            .lock()
            .unwrap()
            .push(t.elapsed().as_secs_f64() * 1e3);
        snap
    };
    let prev = snap.statuses.iter().find(|s| s.host == h.name).cloned();
    let this = rollout::ThisHost {
        tz: &jiff_utc(),
        name: &h.name,
        group: GROUP,
        labels: &h.labels,
        current: h.current.as_deref(),
    };
    let mut decision = rollout::decide(policy, &this, &snap.view(), commit, driftless::time::now());
    let mut permit = None;
    if let Decision::Apply { wave, .. } = &decision {
        let mut s = store.lock().await;
        let t = Instant::now();
        ctx.stats.call("acquire");
        let got = s
            .acquire(GROUP, &h.name, policy.max_concurrent, PERMIT_TTL)
            .await?;
        ctx.stats
            .acquire_ms
            .lock()
            .unwrap()
            .push(t.elapsed().as_secs_f64() * 1e3);
        match got {
            Some(p) => {
                ctx.stats.granted.fetch_add(1, Relaxed);
                permit = Some(p);
            }
            None => {
                ctx.stats.refused.fetch_add(1, Relaxed);
                decision = Decision::Wait {
                    wave: *wave,
                    reason: format!(
                        "group {GROUP:?} has all {} permit(s) taken (max_concurrent = {})",
                        policy.max_concurrent, policy.max_concurrent
                    ),
                };
            }
        }
    }
    Ok((decision, prev, permit))
}

/// `FleetRun::finish_inner` and `status`: bad mark, permit, status.
#[allow(clippy::too_many_arguments)]
async fn finish(
    ctx: &Ctx,
    h: &Host,
    mut prev: Option<HostStatus>,
    permit: Option<Permit>,
    held: Option<Waiting>,
    applied: bool,
    reverted: bool,
    head: &Head,
    now: i64,
) -> Result<()> {
    let store = ctx.store(h.idx);
    if reverted {
        ctx.stats.call("mark_bad");
        ctx.release_store(h.idx)
            .lock()
            .await
            .mark_bad(&head.commit, &h.name, "check \"http\" failed (simulated)")
            .await?;
    }
    if let Some(p) = permit {
        ctx.stats.call("release");
        ctx.release_store(h.idx).lock().await.release(p).await?;
    }
    if prev.is_none() {
        ctx.stats.call("own_status");
        prev = store.lock().await.own_status(&h.name).await?;
    }
    let kept_since = prev
        .as_ref()
        .filter(|p| p.commit.is_some() && p.commit == h.current)
        .and_then(|p| p.since);
    let (result, since) = match &held {
        Some(w) if w.halted => ("halted", kept_since),
        Some(_) => ("waiting", kept_since),
        None if reverted => ("reverted", kept_since),
        None if applied => ("applied", Some(now)),
        None => ("unchanged", kept_since.or(Some(now))),
    };
    let status = HostStatus {
        host: h.name.clone(),
        group: GROUP.to_string(),
        labels: h.labels.clone(),
        version: "0.1.0".to_string(),
        commit: h.current.clone(),
        since,
        healthy: true,
        result: result.to_string(),
        failing_checks: if reverted {
            vec!["http".to_string()]
        } else {
            vec![]
        },
        last_run: driftless::time::now(),
        waiting: held,
    };
    ctx.stats.call("put_status");
    store.lock().await.put_status(&status, STATUS_TTL).await
}

// ---------------------------------------------------------- phases

async fn connect(fleet: &FleetSettings, stats: &Stats) -> Result<Store> {
    stats.call("connect");
    Store::connect(fleet).await
}

/// Every host runs once without a new commit (commit A), all at once:
/// the first time it publishes its first status.
async fn register(ctx: &Arc<Ctx>, prog: &Arc<Progress>, name: &'static str) -> Result<Value> {
    let phase = Phase::start(ctx, name).await?;
    let mut tasks = Vec::new();
    for i in 0..ctx.args.hosts {
        let (ctx, prog) = (ctx.clone(), prog.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = Host::new(i, ctx.args.canaries);
            let head = Head {
                commit: COMMIT_A.into(),
                bad: false,
            };
            run_once(&ctx, &prog, &mut h, &head).await;
        }));
    }
    for t in tasks {
        t.await?;
    }
    let wall = phase.started.elapsed().as_secs_f64();
    let runs = Stats::take(&ctx.stats.run_ms);
    phase
        .end(
            ctx,
            json!({"runs_per_s": ctx.args.hosts as f64 / wall, "run_ms": mmm(runs)}),
        )
        .await
}

/// One connection per host, from this one process: does it work, how
/// long does it take, what does it cost etcd? Each does one read.
async fn connect_all(ctx: &Arc<Ctx>) -> Result<Value> {
    let phase = Phase::start(ctx, "connect_all").await?;
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::new();
    let stores = Arc::new(AsyncMutex::new(Vec::new()));
    let ok = Arc::new(AtomicUsize::new(0));
    for i in 0..ctx.args.hosts {
        let (ctx, gate, stores, ok) = (ctx.clone(), gate.clone(), stores.clone(), ok.clone());
        tasks.push(tokio::spawn(async move {
            let _g = gate.acquire().await;
            let r = async {
                let mut s = connect(&ctx.fleet, &ctx.stats).await?;
                s.own_status(&Host::new(i, 0).name).await?;
                anyhow::Ok(s)
            }
            .await;
            match r {
                Ok(s) => {
                    ok.fetch_add(1, Relaxed);
                    stores.lock().await.push(s);
                }
                Err(e) => ctx.stats.error(&e),
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let opened = phase.started.elapsed().as_secs_f64();
    // All open at once: etcd's memory and file descriptors now.
    let m = scrape(&ctx.args.endpoint).await?;
    let fds = metric(&m, "process_open_fds", "");
    let rss = metric(&m, "process_resident_memory_bytes", "") / 1e6;
    let n = ok.load(Relaxed);
    drop(std::mem::take(&mut *stores.lock().await));
    phase
        .end(
            ctx,
            json!({"connections": n, "open_s": opened, "etcd_open_fds": fds, "etcd_rss_mb_all_open": rss}),
        )
        .await
}

/// `view()` alone, one after another from one connection, nothing else
/// running: its latency and the bytes it reads; and `decide()` over it.
async fn probe(ctx: &Arc<Ctx>, policy: &Policy) -> Result<Value> {
    let phase = Phase::start(ctx, "probe").await?;
    let mut lat = Vec::new();
    let mut decide_ms = Vec::new();
    let mut bytes = 0usize;
    let mut statuses = 0usize;
    let h = Host::new(ctx.args.hosts - 1, 0);
    for _ in 0..ctx.args.probe_views {
        let mut s = ctx.stores[0].lock().await;
        let t = Instant::now();
        ctx.stats.call("view");
        let snap = s.view(COMMIT_B, GROUP).await?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        drop(s);
        statuses = snap.statuses.len();
        // What came over the wire: each status key and its JSON (the
        // value the agent wrote with the same serde_json::to_string).
        bytes = snap
            .statuses
            .iter()
            .map(|st| {
                format!("/driftless/hosts/{}", st.host).len()
                    + serde_json::to_string(st).map_or(0, |j| j.len())
            })
            .sum();
        let this = rollout::ThisHost {
            tz: &jiff_utc(),
            name: &h.name,
            group: GROUP,
            labels: &h.labels,
            current: h.current.as_deref(),
        };
        let t = Instant::now();
        let view = snap.view();
        let d = rollout::decide(policy, &this, &view, COMMIT_B, driftless::time::now());
        decide_ms.push(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(d);
    }
    phase
        .end(
            ctx,
            json!({"view_ms": mmm(lat), "statuses": statuses, "status_bytes": bytes,
                   "bytes_per_status": bytes as f64 / statuses.max(1) as f64,
                   "decide_ms": mmm(decide_ms)}),
        )
        .await
}

/// Permits alone: every host loops acquire → hold `--apply-ms` → release
/// (or, refused, waits 100 ms) for `--storm-secs`, in a group of its own.
/// Permits granted after that time are not counted (the phase's wall
/// time includes the requests still queued then).
async fn storm(ctx: &Arc<Ctx>, max: u32, name: &'static str) -> Result<Value> {
    let phase = Phase::start(ctx, name).await?;
    let group: &'static str = if max as usize >= ctx.args.hosts {
        "storm-large"
    } else {
        "storm-small"
    };
    let deadline = Instant::now() + Duration::from_secs_f64(ctx.args.storm_secs);
    let granted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let holding = Arc::new(AtomicUsize::new(0));
    let max_holding = Arc::new(AtomicUsize::new(0));
    let lat = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..ctx.args.hosts {
        let ctx = ctx.clone();
        let (granted, refused, holding, max_holding, lat) = (
            granted.clone(),
            refused.clone(),
            holding.clone(),
            max_holding.clone(),
            lat.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let name = Host::new(i, 0).name;
            while Instant::now() < deadline {
                let store = ctx.store(i);
                let r = {
                    let mut s = store.lock().await;
                    if Instant::now() >= deadline {
                        // Queued past the end: not part of the measurement.
                        break;
                    }
                    let t = Instant::now();
                    ctx.stats.call("acquire");
                    let r = s.acquire(group, &name, max, PERMIT_TTL).await;
                    lat.lock().unwrap().push(t.elapsed().as_secs_f64() * 1e3);
                    r
                };
                match r {
                    Ok(Some(p)) => {
                        if Instant::now() < deadline {
                            granted.fetch_add(1, Relaxed);
                        }
                        let n = holding.fetch_add(1, Relaxed) + 1;
                        max_holding.fetch_max(n, Relaxed);
                        tokio::time::sleep(Duration::from_millis(ctx.args.apply_ms)).await;
                        holding.fetch_sub(1, Relaxed);
                        ctx.stats.call("release");
                        if let Err(e) = ctx.release_store(i).lock().await.release(p).await {
                            ctx.stats.error(&e);
                        }
                    }
                    Ok(None) => {
                        refused.fetch_add(1, Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => {
                        ctx.stats.error(&e);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let g = granted.load(Relaxed);
    let lat = std::mem::take(&mut *lat.lock().unwrap());
    phase
        .end(
            ctx,
            json!({"max_concurrent": max, "granted": g, "refused": refused.load(Relaxed),
                   "granted_per_s": g as f64 / ctx.args.storm_secs,
                   "limit_per_s": f64::from(max) * 1000.0 / ctx.args.apply_ms as f64,
                   "max_held_at_once": max_holding.load(Relaxed),
                   "acquire_ms": mmm(lat)}),
        )
        .await
}

/// The hosts poll; the head moves to `head`; until every host is on it
/// (or, for a bad commit, every host halted or reverted), or the timeout.
async fn rollout_phase(
    ctx: &Arc<Ctx>,
    prog: &Arc<Progress>,
    head_tx: &tokio::sync::watch::Sender<Head>,
    head: Head,
    name: &'static str,
) -> Result<Value> {
    let phase = Phase::start(ctx, name).await?;
    *prog.started.lock().unwrap() = Instant::now();
    for w in 0..prog.wave_hosts.len() {
        prog.wave_applied[w].store(0, Relaxed);
        prog.wave_first_ms[w].store(u64::MAX, Relaxed);
        prog.wave_last_ms[w].store(0, Relaxed);
    }
    prog.on_head.store(0, Relaxed);
    let asks0 = ctx.stats.asks.load(Relaxed);
    let idle0 = ctx.stats.idle_runs.load(Relaxed);
    let (g0, r0) = (
        ctx.stats.granted.load(Relaxed),
        ctx.stats.refused.load(Relaxed),
    );
    let bad = head.bad;
    head_tx.send_replace(head);
    let n = ctx.args.hosts;
    let canaries = ctx.args.canaries.min(n);
    let deadline = Instant::now() + Duration::from_secs_f64(ctx.args.rollout_timeout);
    let mut timeline = Vec::new();
    let mut next_mark = 0.0;
    let done = loop {
        let t = phase.started.elapsed().as_secs_f64();
        let on = prog.on_head.load(Relaxed);
        let settled = prog.halted.load(Relaxed) + prog.reverted.load(Relaxed);
        if t >= next_mark {
            timeline.push(json!([t.round(), if bad { settled } else { on }]));
            next_mark += 5.0;
        }
        if (!bad && on >= n) || (bad && settled >= n) {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let wall = phase.started.elapsed().as_secs_f64();
    let views = Stats::take(&ctx.stats.view_ms);
    let acq = Stats::take(&ctx.stats.acquire_ms);
    let runs = Stats::take(&ctx.stats.run_ms);
    let asks = ctx.stats.asks.load(Relaxed) - asks0;
    let idle = ctx.stats.idle_runs.load(Relaxed) - idle0;
    let waves: Vec<Value> = prog
        .policy
        .waves
        .iter()
        .enumerate()
        .map(|(w, wave)| {
            let first = prog.wave_first_ms[w].load(Relaxed);
            json!({"wave": wave.name, "hosts": prog.wave_hosts[w],
                   "applied": prog.wave_applied[w].load(Relaxed),
                   "first_s": (first != u64::MAX).then(|| first as f64 / 1e3),
                   "last_s": prog.wave_last_ms[w].load(Relaxed) as f64 / 1e3})
        })
        .collect();
    let runs_total = (asks + idle) as f64;
    let mut out = json!({
        "done": done, "hosts": n, "on_head": prog.on_head.load(Relaxed),
        "time_to_done_s": done.then_some(wall),
        "waves": waves,
        "granted": ctx.stats.granted.load(Relaxed) - g0,
        "refused_after_apply_decision": ctx.stats.refused.load(Relaxed) - r0,
        "max_held_at_once": prog.max_holding.load(Relaxed),
        "runs": runs_total, "asks": asks, "idle_runs": idle,
        // The interval each host actually achieved (runs per host over
        // the phase), against the configured interval + splay / 2.
        "effective_interval_s": if runs_total > 0.0 { wall * n as f64 / runs_total } else { 0.0 },
        "nominal_interval_s": ctx.args.interval + ctx.args.splay / 2.0,
        "view_ms": mmm(views), "acquire_ms": mmm(acq), "run_ms": mmm(runs),
        "timeline": timeline,
    });
    if bad {
        let o = out.as_object_mut().expect("an object");
        o.insert("halted".into(), json!(prog.halted.load(Relaxed)));
        o.insert("canaries".into(), json!(canaries));
        o.insert("reverted".into(), json!(prog.reverted.load(Relaxed)));
        o.insert(
            "applied_bad_outside_canaries".into(),
            json!(prog.bad_applied_elsewhere.load(Relaxed)),
        );
    }
    phase.end(ctx, out).await
}

/// Every host publishes the status a host waiting for the canary
/// publishes (with the reason `decide` gives), then `view()` is tried:
/// a waiting status is larger than an idle one, and the read of all
/// statuses is one gRPC response, which the client refuses above 4 MiB
/// (tonic's default, which `Store::connect` keeps).
async fn all_waiting(ctx: &Arc<Ctx>, policy: &Policy) -> Result<Value> {
    let phase = Phase::start(ctx, "all_waiting").await?;
    let mut tasks = Vec::new();
    for i in 0..ctx.args.hosts {
        let (ctx, policy) = (ctx.clone(), policy.clone());
        tasks.push(tokio::spawn(async move {
            let h = Host::new(i, ctx.args.canaries);
            let this = rollout::ThisHost {
                tz: &jiff_utc(),
                name: &h.name,
                group: GROUP,
                labels: &h.labels,
                current: h.current.as_deref(),
            };
            let empty = rollout::FleetView::default();
            let now = driftless::time::now();
            let (wave, reason, halted) =
                match rollout::decide(&policy, &this, &empty, COMMIT_B, now) {
                    Decision::Wait { wave, reason } => (wave, reason, false),
                    Decision::Halt { reason } => (0, reason, true),
                    Decision::Apply { wave, reason } => (wave, reason, false),
                };
            let status = HostStatus {
                host: h.name.clone(),
                group: GROUP.to_string(),
                labels: h.labels.clone(),
                version: "0.1.0".to_string(),
                commit: h.current.clone(),
                since: Some(now),
                healthy: true,
                result: "waiting".to_string(),
                failing_checks: vec![],
                last_run: now,
                waiting: Some(Waiting {
                    commit: COMMIT_B.to_string(),
                    wave: policy.waves.get(wave).map(|w| w.name.clone()),
                    reason,
                    halted,
                }),
            };
            let bytes = format!("/driftless/hosts/{}", h.name).len()
                + serde_json::to_string(&status).map_or(0, |j| j.len());
            ctx.stats.call("put_status");
            if let Err(e) = ctx
                .store(i)
                .lock()
                .await
                .put_status(&status, STATUS_TTL)
                .await
            {
                ctx.stats.error(&e);
            }
            bytes
        }));
    }
    let mut bytes = 0;
    for t in tasks {
        bytes += t.await?;
    }
    let mut lat = Vec::new();
    let mut result = "ok".to_string();
    for _ in 0..3 {
        let mut s = ctx.stores[0].lock().await;
        let t = Instant::now();
        ctx.stats.call("view");
        match s.view(COMMIT_B, GROUP).await {
            Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e3),
            Err(e) => {
                result = format!("{e:#}");
                ctx.stats.error(&e);
            }
        }
    }
    phase
        .end(
            ctx,
            json!({"status_bytes": bytes, "bytes_per_status": bytes as f64 / ctx.args.hosts as f64,
                   "view": result, "view_ms": mmm(lat)}),
        )
        .await
}

fn policy(args: &Args) -> Result<Policy> {
    // Parsed and validated by the agent, as it reads driftless.toml.
    let text = format!(
        r#"
[rollout]
max_concurrent = {m}
max_failures = 1

[[rollout.waves]]
name = "canary"
labels = {{ canary = "yes" }}
min_healthy = {c}
bake = "{b}s"

[[rollout.waves]]
name = "early"
percent = 10
min_healthy = 1
bake = "{b}s"

[[rollout.waves]]
name = "rest"
percent = 100
"#,
        m = args.max_concurrent,
        c = args.canaries,
        b = args.bake
    );
    match rollout::policy::parse("driftless.toml", &text) {
        Ok(Some(p)) => Ok(p),
        Ok(None) => bail!("no [rollout]"),
        Err(e) => bail!("{e}"),
    }
}

async fn run(args: Args) -> Result<Value> {
    let policy = policy(&args)?;
    let fleet = FleetSettings {
        endpoints: vec![args.endpoint.clone()],
        prefix: "/driftless".to_string(),
        group: GROUP.to_string(),
        labels: BTreeMap::new(),
        lease_ttl: PERMIT_TTL,
        on_unreachable: OnUnreachable::Wait,
        tls: None,
        auth: None,
        reboot: false,
        fleetlock: None,
    };
    let stats = Stats::default();
    let t0 = Instant::now();
    let mut stores = Vec::new();
    for _ in 0..args.connections {
        stores.push(AsyncMutex::new(
            connect(&fleet, &stats).await.context("connecting")?,
        ));
    }
    let mut release_stores = Vec::new();
    for _ in 0..RELEASE_CONNECTIONS {
        release_stores.push(AsyncMutex::new(
            connect(&fleet, &stats).await.context("connecting")?,
        ));
    }
    let ctx = Arc::new(Ctx {
        args,
        fleet,
        stores,
        release_stores,
        stats,
        t0,
    });
    let n = ctx.args.hosts;
    let wave_of: Vec<usize> = (0..n)
        .map(|i| {
            let h = Host::new(i, ctx.args.canaries);
            rollout::decide::wave_of(&policy, &h.name, &h.labels).unwrap_or(0)
        })
        .collect();
    let mut wave_hosts = vec![0; policy.waves.len()];
    for w in &wave_of {
        wave_hosts[*w] += 1;
    }
    let waves = policy.waves.len();
    let prog = Arc::new(Progress {
        policy: policy.clone(),
        wave_of,
        wave_hosts,
        wave_applied: (0..waves).map(|_| AtomicUsize::new(0)).collect(),
        wave_first_ms: (0..waves).map(|_| AtomicU64::new(u64::MAX)).collect(),
        wave_last_ms: (0..waves).map(|_| AtomicU64::new(0)).collect(),
        on_head: AtomicUsize::new(0),
        halted: AtomicUsize::new(0),
        reverted: AtomicUsize::new(0),
        bad_applied_elsewhere: AtomicUsize::new(0),
        holding: AtomicUsize::new(0),
        max_holding: AtomicUsize::new(0),
        started: Mutex::new(Instant::now()),
    });
    let mut phases = Vec::new();
    if ctx.args.connect_all {
        phases.push(connect_all(&ctx).await?);
    }
    phases.push(register(&ctx, &prog, "register").await?);
    // The same again: a run of a host that has a status already (its
    // previous lease is revoked), as every poll without a new commit is.
    phases.push(register(&ctx, &prog, "idle").await?);
    phases.push(probe(&ctx, &policy).await?);
    let small = ctx.args.max_concurrent.min(2);
    phases.push(storm(&ctx, small, "permits_small").await?);
    phases.push(storm(&ctx, n as u32, "permits_large").await?);

    // The fleet polls from here on.
    let (head_tx, head_rx) = tokio::sync::watch::channel(Head {
        commit: COMMIT_A.into(),
        bad: false,
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (ctx, prog, rx, stop) = (ctx.clone(), prog.clone(), head_rx.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = Host::new(i, ctx.args.canaries);
            let first = h.random() * ctx.args.interval;
            tokio::time::sleep(Duration::from_secs_f64(first)).await;
            while !stop.load(Relaxed) {
                let head = rx.borrow().clone();
                run_once(&ctx, &prog, &mut h, &head).await;
                let wait = ctx.args.interval + h.random() * ctx.args.splay;
                tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            }
        }));
    }
    let good = Head {
        commit: COMMIT_B.into(),
        bad: false,
    };
    let r = rollout_phase(&ctx, &prog, &head_tx, good, "rollout").await?;
    let finished = r["done"].as_bool().unwrap_or(false);
    phases.push(r);
    if ctx.args.bad && finished {
        let bad = Head {
            commit: COMMIT_BAD.into(),
            bad: true,
        };
        phases.push(rollout_phase(&ctx, &prog, &head_tx, bad, "bad_commit").await?);
    }
    stop.store(true, Relaxed);
    for t in &tasks {
        t.abort();
    }
    phases.push(all_waiting(&ctx, &policy).await?);
    let a = &ctx.args;
    Ok(json!({
        "hosts": a.hosts, "connections": a.connections, "canaries": a.canaries,
        "interval_s": a.interval, "splay_s": a.splay, "apply_ms": a.apply_ms,
        "bake_s": a.bake, "max_concurrent": a.max_concurrent,
        "rollout_timeout_s": a.rollout_timeout, "storm_s": a.storm_secs,
        "policy": serde_json::to_value(&policy)?,
        "phases": phases,
    }))
}

fn main() -> Result<()> {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let out = rt.block_on(run(args))?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    // Leftover keep-alive tasks of aborted hosts: do not wait for them.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// Simulated hosts read maintenance windows in UTC (the policies here
/// have none).
fn jiff_utc() -> driftless::rollout::decide::TimeZone {
    driftless::rollout::decide::TimeZone::UTC
}
