//! Webhooks: the binary, configured with `[[webhooks]]`, posts its events
//! to a receiver on loopback written here (a minimal HTTP/1.1 server that
//! records each request and answers with the status it is told). The
//! signature is checked with the `hmac` crate directly, not with the
//! agent's code.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::support::*;

const KEY: &str = "test-webhook-key-0123456789";

/// One request the receiver saw, and the status it answered.
#[derive(Debug, Clone)]
struct Req {
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
    status: u16,
}

impl Req {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }
    fn event(&self) -> String {
        self.json()["event"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

#[derive(Clone, Default)]
struct Log {
    reqs: Arc<Mutex<Vec<Req>>>,
    /// Statuses to answer, in order; 200 once they are used up.
    script: Arc<Mutex<Vec<u16>>>,
}

impl Log {
    fn all(&self) -> Vec<Req> {
        self.reqs.lock().unwrap().clone()
    }
    /// The requests answered 2xx: the deliveries.
    fn delivered(&self) -> Vec<Req> {
        self.all()
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .collect()
    }
    fn answer(&self, statuses: &[u16]) {
        *self.script.lock().unwrap() = statuses.to_vec();
    }
}

struct Receiver {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    /// Listens on 127.0.0.1:`port` (0: any free port).
    fn start(port: u16, log: &Log) -> Receiver {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the receiver");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, log) = (stop.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => serve(s, &log),
                    // Polling the stop flag between connections.
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => {}
                }
            }
        });
        Receiver {
            port,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops listening: connections are refused from now on.
    fn kill(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(mut s: TcpStream, log: &Log) {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or_default()
        .to_string();
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let status = {
        let mut script = log.script.lock().unwrap();
        if script.is_empty() {
            200
        } else {
            script.remove(0)
        }
    };
    log.reqs.lock().unwrap().push(Req {
        path,
        headers,
        body: buf[head_end..head_end + len].to_vec(),
        status,
    });
    let _ = s.write_all(
        format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
    );
}

/// Polls `f` until it holds, for at most 10 s.
#[track_caller]
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The request carries a valid signature of its body, and the headers
/// match the body.
#[track_caller]
fn assert_signed(r: &Req) {
    let mut mac = Hmac::<Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
    mac.update(&r.body);
    let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(r.headers.get("x-driftless-signature"), Some(&want), "{r:?}");
    let v = r.json();
    assert_eq!(
        r.headers.get("x-driftless-event").map(String::as_str),
        v["event"].as_str()
    );
    assert_eq!(
        r.headers.get("x-driftless-delivery").map(String::as_str),
        v["idempotency_key"].as_str()
    );
    assert_eq!(
        r.headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    assert_eq!(r.path, "/hook");
}

/// A host with an agent config naming the repository and one webhook.
struct Agent {
    host: Host,
    repo: Repo,
    config: PathBuf,
    key: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn new(port: u16) -> Agent {
        let host = Host::new("web1");
        let repo = Repo::new();
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("webhook.key");
        std::fs::write(&key, format!("{KEY}\n")).unwrap();
        set_mode(&key, 0o600);
        let config = dir.path().join("agent.toml");
        let agent = Agent {
            host,
            repo,
            config,
            key,
            _dir: dir,
        };
        agent.configure(port, "");
        agent
    }

    fn configure(&self, port: u16, extra: &str) {
        std::fs::write(
            &self.config,
            format!(
                "source = {:?}\nhost = \"web1\"\nroot = {:?}\nstate_dir = {:?}\n\n\
                 [[webhooks]]\nurl = \"http://127.0.0.1:{port}/hook\"\nsecret_file = {:?}\n{extra}",
                self.repo.path(),
                self.host.root.path(),
                self.host.state.path(),
                self.key
            ),
        )
        .unwrap();
    }

    /// `v` of the app: its file and a check that passes when the file on
    /// the host says "good".
    fn commit(&self, content: &str, check: &str) -> String {
        self.repo.write("driftless.toml", "roles = [\"app\"]\n");
        self.repo.write("hosts/default.toml", "");
        self.repo.write("roles/app/files/app.conf", content);
        self.repo.write(
            "roles/app/role.toml",
            &format!(
                "[[files]]\npath = \"/etc/app.conf\"\nsource = \"app.conf\"\n\n\
                 [[checks]]\nname = \"app config is good\"\nretries = 1\ninterval = \"10ms\"\n\
                 command = {{ argv = [\"/bin/sh\", \"-c\", {:?}] }}\n",
                check.replace("ROOT", &self.host.root.path().display().to_string())
            ),
        );
        self.repo.commit(content.trim())
    }

    fn sync(&self) -> std::process::Output {
        Command::new(BIN)
            .args(["sync", "--once", "--run-checks", "--config"])
            .arg(&self.config)
            .env("NO_COLOR", "1")
            .env_remove("DRIFTLESS_TEST_FAILPOINT")
            .env_remove("DRIFTLESS_TEST_CRASH_AFTER")
            .output()
            .expect("driftless runs")
    }

    #[track_caller]
    fn sync_code(&self, code: i32) -> String {
        let out = self.sync();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(code), "stderr:\n{stderr}");
        stderr
    }

    /// Event files waiting in the spool (any queue).
    fn spooled(&self) -> Vec<PathBuf> {
        files_under(&self.host.state.path().join("spool"), |p| {
            !p.components().any(|c| c.as_os_str() == "failed")
                && p.extension().is_some_and(|e| e == "json")
                && p.file_name().is_some_and(|n| n != "repeat.json")
        })
    }

    fn failed(&self) -> Vec<PathBuf> {
        files_under(&self.host.state.path().join("spool/failed"), |_| true)
    }
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn files_under(dir: &Path, keep: impl Fn(&Path) -> bool + Copy) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(files_under(&p, keep));
        } else if keep(&p) {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn every_event_is_delivered_signed_and_in_order() {
    let log = Log::default();
    let rx = Receiver::start(0, &log);
    let a = Agent::new(rx.port);

    // applied
    let v1 = a.commit("good\n", "grep -q good ROOT/etc/app.conf");
    a.sync_code(0);
    eventually("the applied event", || log.delivered().len() == 1);
    let r = &log.delivered()[0];
    assert_signed(r);
    let v = r.json();
    assert_eq!(v["event"], "applied");
    assert_eq!(v["host"], "web1");
    assert_eq!(v["commit"], v1.as_str());
    assert_eq!(v["agent_version"], env!("CARGO_PKG_VERSION"));
    assert!(v["timestamp"].as_str().unwrap().ends_with('Z'), "{v}");
    assert!(
        v["summary"].as_str().unwrap().starts_with("applied "),
        "{v}"
    );
    let txid = v["txid"].as_str().unwrap().to_string();
    assert_eq!(v["idempotency_key"], format!("web1:applied:{txid}"));

    // An idle poll sends nothing.
    a.sync_code(0);
    // drift repaired: the file changed on the host, no new commit.
    std::fs::write(a.host.path("/etc/app.conf"), "good, edited by hand\n").unwrap();
    a.sync_code(0);
    assert_eq!(a.host.read("/etc/app.conf").as_deref(), Some("good\n"));

    // reverted: the check fails on the new content.
    let v2 = a.commit("broken\n", "grep -q good ROOT/etc/app.conf");
    a.sync_code(1);

    // refused: the branch was rewritten (not a descendant of v1).
    git(a.repo.path(), &["reset", "-q", "--hard", &v1]);
    git(
        a.repo.path(),
        &["commit", "-q", "--amend", "-m", "rewritten"],
    );
    a.sync_code(4);
    // The same refusal on the next poll is not news.
    a.sync_code(4);

    let got = log.delivered();
    let events: Vec<String> = got.iter().map(Req::event).collect();
    assert_eq!(
        events,
        vec!["applied", "drift_repaired", "reverted", "refused"],
        "{got:#?}"
    );
    for r in &got {
        assert_signed(r);
    }
    let drift = got[1].json();
    assert_eq!(drift["commit"], v1.as_str());
    assert_eq!(drift["drifted"], serde_json::json!(["/etc/app.conf"]));
    let reverted = got[2].json();
    assert_eq!(reverted["commit"], v2.as_str());
    assert_eq!(
        reverted["failing_checks"],
        serde_json::json!(["app config is good"])
    );
    assert!(
        reverted["summary"].as_str().unwrap().contains("reverted"),
        "{reverted}"
    );
    let keys: std::collections::BTreeSet<_> = got
        .iter()
        .map(|r| r.json()["idempotency_key"].to_string())
        .collect();
    assert_eq!(keys.len(), got.len(), "idempotency keys are distinct");
    assert_eq!(log.all().len(), got.len(), "nothing was sent twice");
    assert!(a.spooled().is_empty(), "{:?}", a.spooled());
    rx.kill();
}

/// Kill the receiver, make events (each `sync --once` is a new agent
/// process: what is spooled survives restarts), restart it: every event
/// arrives exactly once, in order, signed; a receiver answering 503 at
/// first is retried with backoff within the same run.
#[test]
fn events_survive_a_receiver_outage_and_agent_restarts() {
    let log = Log::default();
    let rx = Receiver::start(0, &log);
    let port = rx.port;
    let a = Agent::new(port);
    rx.kill();

    let v1 = a.commit("good 1\n", "grep -q good ROOT/etc/app.conf");
    let out = a.sync_code(0);
    assert!(out.contains("stay spooled"), "{out}");
    assert!(!out.contains(KEY), "{out}");
    let v2 = a.commit("good 2\n", "grep -q good ROOT/etc/app.conf");
    a.sync_code(0);
    std::fs::write(a.host.path("/etc/app.conf"), "drifted\n").unwrap();
    a.sync_code(0);
    let v3 = a.commit("bad 3\n", "grep -q good ROOT/etc/app.conf");
    a.sync_code(1);
    assert_eq!(a.spooled().len(), 4, "{:?}", a.spooled());
    assert!(log.all().is_empty());

    // Back, but overloaded for its first two answers.
    log.answer(&[503, 503]);
    let rx = Receiver::start(port, &log);
    a.sync_code(0);
    eventually("four deliveries", || log.delivered().len() == 4);
    // Another run sends nothing again.
    a.sync_code(0);
    let got = log.delivered();
    let summary: Vec<(String, String)> = got
        .iter()
        .map(|r| {
            (
                r.event(),
                r.json()["commit"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("applied".to_string(), v1),
            ("applied".to_string(), v2.clone()),
            ("drift_repaired".to_string(), v2),
            ("reverted".to_string(), v3),
        ]
    );
    for r in &got {
        assert_signed(r);
    }
    // The two 503s were the first event, sent again: the same body.
    let all = log.all();
    assert_eq!(all.len(), 6, "{all:#?}");
    assert_eq!(all[0].body, all[2].body);
    assert_eq!(all[1].body, all[2].body);
    let keys: std::collections::BTreeSet<_> = got
        .iter()
        .map(|r| r.json()["idempotency_key"].to_string())
        .collect();
    assert_eq!(keys.len(), 4);
    assert!(a.spooled().is_empty(), "{:?}", a.spooled());
    rx.kill();
}

/// A 4xx (other than 408/429) is final: the event is moved aside with a
/// warning naming the URL and the status, and the next one goes on.
#[test]
fn a_permanent_refusal_is_moved_aside_and_the_queue_goes_on() {
    let log = Log::default();
    let rx = Receiver::start(0, &log);
    let a = Agent::new(rx.port);
    log.answer(&[400]);
    a.commit("good 1\n", "true");
    let err = a.sync_code(0);
    assert!(
        err.contains(&format!("webhook http://127.0.0.1:{}/… refused", rx.port))
            && err.contains("status 400"),
        "{err}"
    );
    assert_eq!(a.failed().len(), 1, "{:?}", a.failed());
    assert!(a.spooled().is_empty());
    a.commit("good 2\n", "true");
    a.sync_code(0);
    let all = log.all();
    assert_eq!(all.len(), 2);
    assert_eq!(all[1].status, 200);
    assert_eq!(all[1].event(), "applied");
    rx.kill();
}

/// A key everyone may read is refused (nothing is sent, the event stays
/// spooled); once fixed, it goes out.
#[test]
fn a_world_readable_key_is_refused() {
    let log = Log::default();
    let rx = Receiver::start(0, &log);
    let a = Agent::new(rx.port);
    set_mode(&a.key, 0o644);
    a.commit("good\n", "true");
    let err = a.sync_code(0);
    assert!(
        err.contains("readable by everyone") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!err.contains(KEY), "{err}");
    assert!(log.all().is_empty());
    assert_eq!(a.spooled().len(), 1);
    set_mode(&a.key, 0o600);
    a.sync_code(0);
    assert_eq!(log.delivered().len(), 1);
    assert_signed(&log.delivered()[0]);
    rx.kill();
}

/// A revert whose previous state fails too: `degraded`; the next runs
/// refuse to go on: `halted`, once.
#[test]
fn degraded_then_halted_once() {
    let log = Log::default();
    let rx = Receiver::start(0, &log);
    let a = Agent::new(rx.port);
    // v1's own check holds while the flag is there; without it, the
    // state v2's revert restores fails it.
    let flag = a.host.root.path().join("flag");
    std::fs::write(&flag, "").unwrap();
    a.commit("v1\n", "test -e ROOT/flag");
    a.sync_code(0);
    std::fs::remove_file(&flag).unwrap();
    a.commit("v2\n", "test -e ROOT/flag");
    a.sync_code(5);
    a.commit("v3\n", "true");
    let err = a.sync_code(5);
    assert!(err.contains("halted"), "{err}");
    a.sync_code(5);
    let events: Vec<String> = log.delivered().iter().map(Req::event).collect();
    assert_eq!(events, vec!["applied", "degraded", "halted"]);
    for r in log.delivered() {
        assert_signed(&r);
    }
    let halted = log.delivered()[2].json();
    assert!(
        halted["summary"].as_str().unwrap().contains("sync --retry"),
        "{halted}"
    );
    rx.kill();
}

#[test]
fn an_unknown_webhook_key_names_the_file_and_the_key() {
    let a = Agent::new(1);
    a.configure(1, "retries = 3\n");
    let out = a.sync();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains(&a.config.display().to_string()) && err.contains("unknown field `retries`"),
        "{err}"
    );
}

/// An air-gapped host keeps its events spooled; a USB stick carries them
/// back in the host's report.
#[test]
fn the_stick_report_carries_the_pending_events() {
    let log = Log::default();
    let rx = Receiver::start(0, &log);
    let a = Agent::new(rx.port);
    rx.kill();
    let v1 = a.commit("good\n", "true");
    a.sync_code(0);
    assert_eq!(a.spooled().len(), 1);
    // A stick without bundles: refused, but the report is written.
    let stick = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(stick.path().join("driftless/bundles")).unwrap();
    let out = Command::new(BIN)
        .args(["bundle", "stick"])
        .arg(stick.path())
        .arg("--config")
        .arg(&a.config)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(stick.path().join("driftless/reports/web1.json")).unwrap_or_else(|e| {
            panic!("no report ({e}): {}", String::from_utf8_lossy(&out.stderr))
        }),
    )
    .unwrap();
    let pending = report["pending_events"].as_array().expect("pending_events");
    assert_eq!(pending.len(), 1, "{report}");
    assert_eq!(pending[0]["event"], "applied");
    assert_eq!(pending[0]["commit"], v1.as_str());
    assert_eq!(pending[0]["host"], "web1");
    // Still spooled: the stick is a copy, the webhook gets it when it can.
    assert_eq!(a.spooled().len(), 1);
    assert!(log.all().is_empty());
}
