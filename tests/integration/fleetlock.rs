//! FleetLock (issue 17's etcd-less backend), against a real etcd: the
//! server (`driftless fleet serve-fleetlock`, the real binary) spoken to
//! with requests written here from the protocol document (raw HTTP/1.1
//! over a socket, not the agent's client), and a driftless host whose
//! `[fleet]` names the server instead of etcd.
//!
//! What was held is judged from etcd's keys, not from logs.

#![cfg(feature = "etcd")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::fleet::{etcd_or_skip, repo_with, Etcd};
use crate::support::*;

/// The spec's example id, as zincati would send it.
const ZINCATI: &str = "c988d2509fdf5cdcbed39037c56406fb";

/// `driftless fleet serve-fleetlock` on a free loopback port, over
/// `etcd` (prefix /t); killed when dropped.
struct Server {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
}

impl Server {
    fn start(etcd: &Etcd, extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "host = \"lock\"\n[fleet]\nendpoints = [{:?}]\nprefix = \"/t\"\n",
                etcd.endpoint
            ),
        )
        .unwrap();
        let mut child = Command::new(BIN)
            .args([
                "fleet",
                "serve-fleetlock",
                "--listen",
                "127.0.0.1:0",
                "--config",
            ])
            .arg(&config)
            .args(extra)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("server.log")).unwrap())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let addr = first
            .split("http://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {first:?}"))
            .to_string();
        Server {
            child,
            addr,
            _dir: dir,
            config,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request, as the protocol document describes it; (status, body).
fn request(addr: &str, method: &str, path: &str, header: bool, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if header {
        req.push_str("fleet-lock-protocol: true\r\n");
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {out:?}"));
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn body(id: &str, group: &str) -> String {
    format!(r#"{{"client_params": {{"group": "{group}", "id": "{id}"}}}}"#)
}

fn lock(addr: &str, id: &str, group: &str) -> (u16, String) {
    request(addr, "POST", "/v1/pre-reboot", true, &body(id, group))
}

fn unlock(addr: &str, id: &str, group: &str) -> (u16, String) {
    request(addr, "POST", "/v1/steady-state", true, &body(id, group))
}

/// The error body's `kind`.
fn kind(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert!(
        v["value"].as_str().is_some_and(|s| !s.is_empty()),
        "an error without a value: {body}"
    );
    v["kind"].as_str().unwrap().to_string()
}

/// The permits under /t, with their leases.
fn permits(etcd: &Etcd) -> Vec<(String, i64)> {
    let mut c = etcd.client();
    etcd.rt.block_on(async {
        let r = c
            .get(
                "/t/permits/",
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        r.kvs()
            .iter()
            .map(|kv| (kv.key_str().unwrap().to_string(), kv.lease()))
            .collect()
    })
}

fn keys(etcd: &Etcd) -> Vec<String> {
    permits(etcd).into_iter().map(|(k, _)| k).collect()
}

#[test]
fn the_fleetlock_server_grants_slots_from_the_etcd_permits_as_the_protocol_says() {
    let Some(etcd) = etcd_or_skip() else { return };
    let server = Server::start(&etcd, &["--max", "1", "--max-for", "workers=2"]);
    let a = server.addr.as_str();

    // Requests the protocol does not allow take nothing.
    let (st, b) = request(
        a,
        "POST",
        "/v1/pre-reboot",
        false,
        &body(ZINCATI, "default"),
    );
    assert_eq!((st, kind(&b).as_str()), (400, "missing_fleet_lock_header"));
    let (st, b) = request(a, "GET", "/v1/pre-reboot", true, "");
    assert_eq!((st, kind(&b).as_str()), (405, "method_not_allowed"));
    let (st, b) = request(a, "POST", "/v2/pre-reboot", true, &body(ZINCATI, "default"));
    assert_eq!((st, kind(&b).as_str()), (404, "not_found"));
    let (st, b) = request(a, "POST", "/v1/pre-reboot", true, "{not json");
    assert_eq!((st, kind(&b).as_str()), (400, "invalid_client_params"));
    // Ids and groups become key parts: none may reach another key.
    for (id, group) in [
        ("../x", "default"),
        ("a/b", "default"),
        ("h", "a/b"),
        ("h", "a_b"),
        ("", "default"),
    ] {
        let (st, b) = lock(a, id, group);
        assert_eq!(
            (st, kind(&b).as_str()),
            (400, "invalid_client_params"),
            "{id:?} {group:?}"
        );
    }
    let big = format!(
        r#"{{"client_params": {{"group": "default", "id": "h"}}, "pad": "{}"}}"#,
        "x".repeat(20_000)
    );
    let (st, b) = request(a, "POST", "/v1/pre-reboot", true, &big);
    assert_eq!((st, kind(&b).as_str()), (413, "body_too_large"));
    assert!(keys(&etcd).is_empty(), "{:?}", keys(&etcd));

    // The protocol document's example: granted, as a permit without a lease.
    assert_eq!(lock(a, ZINCATI, "default").0, 200);
    let key = format!("/t/permits/default/{ZINCATI}");
    assert_eq!(permits(&etcd), vec![(key.clone(), 0)]);
    // Recursive: the holder asking again is granted, and holds one slot.
    assert_eq!(lock(a, ZINCATI, "default").0, 200);
    assert_eq!(keys(&etcd), vec![key.clone()]);
    // The group's one slot is taken.
    let (st, b) = lock(a, "node-b", "default");
    assert_eq!((st, kind(&b).as_str()), (409, "failed_lock_semaphore_full"));
    // Giving back what one does not hold is fine and changes nothing.
    assert_eq!(unlock(a, "node-b", "default").0, 200);
    assert_eq!(keys(&etcd), vec![key.clone()]);
    // The fleet view lists the slot.
    let out = Command::new(BIN)
        .args(["fleet", "status", "--config"])
        .arg(&server.config)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{ZINCATI} (fleetlock)")),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Given back, the next host gets it.
    assert_eq!(unlock(a, ZINCATI, "default").0, 200);
    assert!(keys(&etcd).is_empty());
    assert_eq!(lock(a, "node-b", "default").0, 200);

    // --max-for: a group of its own size, counted apart.
    assert_eq!(lock(a, "w1", "workers").0, 200);
    assert_eq!(lock(a, "w2", "workers").0, 200);
    let (st, b) = lock(a, "w3", "workers");
    assert_eq!((st, kind(&b).as_str()), (409, "failed_lock_semaphore_full"));

    // An operator's suspension stops new slots (but not giving back).
    let st = Command::new(BIN)
        .args([
            "suspend", "--group", "workers", "--reason", "incident", "--config",
        ])
        .arg(&server.config)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(unlock(a, "w2", "workers").0, 200);
    let (st, b) = lock(a, "w3", "workers");
    assert_eq!(
        (st, kind(&b).as_str()),
        (409, "failed_lock_suspended"),
        "{b}"
    );
    assert!(b.contains("incident"), "{b}");
    let st = Command::new(BIN)
        .args(["resume", "--group", "workers", "--config"])
        .arg(&server.config)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(lock(a, "w3", "workers").0, 200);

    // Ownership: an id may only ever hold a FleetLock slot. A driftless
    // host's permit of the same name (leased, while it applies; or its
    // reboot's, without a lease) is neither granted again nor given back,
    // and it counts against the server's limit.
    assert_eq!(unlock(a, "node-b", "default").0, 200);
    let mut c = etcd.client();
    etcd.rt.block_on(async {
        let lease = c.lease_grant(60, None).await.unwrap().id();
        c.put(
            "/t/permits/default/db1",
            "db1",
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
        c.put(
            "/t/permits/db/web9",
            r#"{"host":"web9","reboot":"b1","commit":"c"}"#,
            None,
        )
        .await
        .unwrap();
    });
    let (st, b) = lock(a, ZINCATI, "default");
    assert_eq!(
        (st, kind(&b).as_str()),
        (409, "failed_lock_semaphore_full"),
        "a driftless host's permit was not counted"
    );
    let (st, b) = lock(a, "db1", "default");
    assert_eq!((st, kind(&b).as_str()), (409, "failed_lock_id_in_use"));
    assert_eq!(unlock(a, "db1", "default").0, 200);
    assert_eq!(unlock(a, "web9", "db").0, 200);
    let held = permits(&etcd);
    assert!(
        held.iter()
            .any(|(k, l)| k == "/t/permits/default/db1" && *l != 0)
            && held
                .iter()
                .any(|(k, l)| k == "/t/permits/db/web9" && *l == 0),
        "a FleetLock request took over or deleted a driftless host's permit: {held:?}"
    );
}

/// A host whose `[fleet]` names the FleetLock server.
fn fleetlock_agent(
    name: &str,
    repo: &Path,
    url: &str,
    extra: &str,
) -> (tempfile::TempDir, Command) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(
        dir.path().join("agent.toml"),
        format!(
            "source = {:?}\nhost = {name:?}\nroot = {:?}\nstate_dir = {:?}\nrun_checks = true\n\
             metrics_file = false\ninterval = \"1m\"\nsplay = \"0s\"\n\
             [fleet]\nfleetlock = {url:?}\n{extra}",
            repo.display().to_string(),
            root.display().to_string(),
            dir.path().join("state").display().to_string(),
        ),
    )
    .unwrap();
    let mut c = Command::new(BIN);
    c.args(["sync", "--once", "--config"])
        .arg(dir.path().join("agent.toml"))
        .env("APP_ROOT", &root)
        .env("NO_COLOR", "1")
        .env_remove("DRIFTLESS_TEST_FAILPOINT");
    (dir, c)
}

fn run(c: &mut Command, failpoint: Option<&str>) -> (i32, String) {
    if let Some(f) = failpoint {
        c.env("DRIFTLESS_TEST_FAILPOINT", f);
    } else {
        c.env_remove("DRIFTLESS_TEST_FAILPOINT");
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_host_with_a_fleetlock_server_applies_only_holding_a_slot_and_gives_it_back() {
    let Some(etcd) = etcd_or_skip() else { return };
    let server = Server::start(&etcd, &["--max", "1"]);
    let a = server.addr.clone();
    let repo = repo_with("", "good v1\n");
    repo.commit("v1");
    let (dir, mut agent) = fleetlock_agent("web1", repo.path(), &server.url(), "");
    let conf = dir.path().join("root/etc/app.conf");
    let record = dir.path().join("state/fleetlock-slot.json");
    let slot = "/t/permits/default/web1".to_string();

    // A zincati host holds the group's only slot: the host waits, untouched.
    assert_eq!(lock(&a, ZINCATI, "default").0, 200);
    let (code, out) = run(&mut agent, None);
    assert_eq!(code, 0, "{out}");
    assert!(!conf.exists(), "applied without a slot: {out}");
    assert!(out.contains("failed_lock_semaphore_full"), "{out}");
    assert!(!record.exists(), "a refused slot left its record");
    assert_eq!(keys(&etcd), vec![format!("/t/permits/default/{ZINCATI}")]);

    // Given back: the host takes the slot, applies, and gives it back.
    assert_eq!(unlock(&a, ZINCATI, "default").0, 200);
    let (code, out) = run(&mut agent, None);
    assert_eq!(code, 0, "{out}");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "good v1\n");
    assert!(
        out.contains("FleetLock slot of group default taken"),
        "{out}"
    );
    assert!(keys(&etcd).is_empty(), "{:?}", keys(&etcd));
    assert!(!record.exists());

    // Killed right after the server granted the slot: the slot stays
    // taken (FleetLock has no lease), so the zincati host waits; the next
    // run applies under it (granted again) and gives it back.
    repo.write("roles/app/files/app.conf", "good v2\n");
    repo.commit("v2");
    let (code, out) = run(&mut agent, Some("sync.fleetlock.granted"));
    assert_ne!(code, 0, "the failpoint did not fire: {out}");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "good v1\n");
    assert!(record.exists(), "no record of the slot held");
    assert_eq!(permits(&etcd), vec![(slot.clone(), 0)]);
    assert_eq!(lock(&a, ZINCATI, "default").0, 409);
    // Suspended meanwhile: the server refuses the holder too; the record
    // stays, and the end of the run gives the slot back (it was lost once:
    // a refusal dropped the record of the slot held).
    let suspend = |verb: &str| {
        let mut c = Command::new(BIN);
        c.arg(verb);
        if verb == "suspend" {
            c.args(["--reason", "incident"]);
        }
        let st = c
            .arg("--config")
            .arg(&server.config)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
    };
    suspend("suspend");
    let (code, out) = run(&mut agent, None);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("failed_lock_suspended"), "{out}");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "good v1\n");
    assert!(
        keys(&etcd).is_empty(),
        "the held slot was not given back: {:?}",
        keys(&etcd)
    );
    assert!(!record.exists());
    suspend("resume");
    let (code, out) = run(&mut agent, None);
    assert_eq!(code, 0, "{out}");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "good v2\n");
    assert!(keys(&etcd).is_empty(), "{:?}", keys(&etcd));
    assert!(!record.exists());

    // Killed after the commit, before the slot went back: the next run has
    // nothing new to apply (it asks nothing) and gives the slot back
    // because of the record alone.
    repo.write("roles/app/files/app.conf", "good v2b\n");
    repo.commit("v2b");
    let (code, out) = run(&mut agent, Some("sync.record"));
    assert_ne!(code, 0, "the failpoint did not fire: {out}");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "good v2b\n");
    assert_eq!(permits(&etcd), vec![(slot.clone(), 0)]);
    let (code, out) = run(&mut agent, None);
    assert_eq!(code, 0, "{out}");
    assert!(
        !out.contains("FleetLock slot of group default taken"),
        "asked again: {out}"
    );
    assert!(keys(&etcd).is_empty(), "{:?}", keys(&etcd));
    assert!(!record.exists());

    // Killed after writing the record, before asking: nothing was taken,
    // and the next run asks again and gives it back.
    repo.write("roles/app/files/app.conf", "good v3\n");
    repo.commit("v3");
    let (code, _) = run(&mut agent, Some("sync.fleetlock.recorded"));
    assert_ne!(code, 0);
    assert!(record.exists());
    let (code, out) = run(&mut agent, None);
    assert_eq!(code, 0, "{out}");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "good v3\n");
    assert!(!record.exists() && keys(&etcd).is_empty());

    // Killed holding a slot, then `[fleet]` removed: the next run (alone
    // now) gives the slot back to the server its record names.
    let config = dir.path().join("agent.toml");
    let with_fleet = std::fs::read_to_string(&config).unwrap();
    repo.write("roles/app/files/app.conf", "good v3b\n");
    repo.commit("v3b");
    let (code, _) = run(&mut agent, Some("sync.fleetlock.granted"));
    assert_ne!(code, 0);
    assert_eq!(permits(&etcd), vec![(slot.clone(), 0)]);
    std::fs::write(&config, with_fleet.split("[fleet]").next().unwrap()).unwrap();
    let (code, out) = run(&mut agent, None);
    assert_eq!(code, 0, "{out}");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "good v3b\n");
    assert!(keys(&etcd).is_empty(), "{out}");
    assert!(!record.exists());
    std::fs::write(&config, &with_fleet).unwrap();

    // The server gone: nothing new is applied (on_unreachable = "wait").
    drop(server);
    repo.write("roles/app/files/app.conf", "good v4\n");
    repo.commit("v4");
    let (code, out) = run(&mut agent, None);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("until the FleetLock server answers"), "{out}");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "good v3b\n");
}

#[test]
fn fleetlock_settings_that_etcd_alone_reads_are_refused() {
    let repo = repo_with("", "good\n");
    repo.commit("v1");
    for (extra, says) in [
        (
            "endpoints = [\"http://127.0.0.1:2379\"]\n",
            "choose one backend",
        ),
        ("labels = { canary = \"yes\" }\n", "fleet.labels"),
        ("group = \"a_b\"\n", "fleet.group"),
        ("prefix = \"/x\"\n", "fleet.prefix"),
    ] {
        let (_dir, mut agent) = fleetlock_agent("web1", repo.path(), "http://127.0.0.1:1", extra);
        let (code, out) = run(&mut agent, None);
        assert_eq!(code, 78, "{extra}: {out}");
        assert!(out.contains(says), "{extra}: {out}");
    }
    // A ca_file that cannot be read is this host's error (exit 1), never
    // an unreachable server that "apply-alone" would apply without.
    let (dir, mut agent) = fleetlock_agent(
        "web1",
        repo.path(),
        "https://127.0.0.1:1",
        "ca_file = \"/nonexistent/ca.pem\"\non_unreachable = \"apply-alone\"\n",
    );
    let (code, out) = run(&mut agent, None);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("ca.pem"), "{out}");
    assert!(!dir.path().join("root/etc/app.conf").exists(), "{out}");
    let (_dir, mut agent) = fleetlock_agent("web1", repo.path(), "http://u:secret@127.0.0.1:1", "");
    let (code, out) = run(&mut agent, None);
    assert_eq!(code, 78, "{out}");
    assert!(
        out.contains("user or password") && !out.contains("secret"),
        "{out}"
    );
}

/// One semaphore: a zincati host's FleetLock slot counts against the
/// `max_concurrent` of driftless hosts that use etcd directly.
#[test]
fn a_fleetlock_slot_and_the_etcd_hosts_permits_are_one_limit() {
    let Some(etcd) = etcd_or_skip() else { return };
    let server = Server::start(&etcd, &["--max", "1"]);
    let a = server.addr.clone();
    let repo = repo_with(
        "[rollout]\nmax_concurrent = 1\n[[rollout.waves]]\nname = \"all\"\npercent = 100\n",
        "good v1\n",
    );
    repo.commit("v1");
    let host =
        crate::fleet::Agent::with_fleet_keys("db1", repo.path(), &etcd, "default", "", "10s", "");
    assert_eq!(lock(&a, ZINCATI, "default").0, 200);
    let out = host.cmd(&["sync", "--once"]).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        host.content().is_none(),
        "applied past the zincati host's slot: {text}"
    );
    assert!(text.contains("permit(s) taken"), "{text}");
    // Given back, the driftless host applies (the other way round, a
    // driftless host's permit counted by the server, is checked in the
    // protocol test).
    assert_eq!(unlock(&a, ZINCATI, "default").0, 200);
    let out = host.cmd(&["sync", "--once"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(host.content().as_deref(), Some("good v1\n"));
}
