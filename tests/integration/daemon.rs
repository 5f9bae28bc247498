//! `driftless run` outside systemd: sd_notify messages on a socket the test
//! owns, SIGHUP syncs now, SIGTERM exits cleanly. (Under a real systemd:
//! the end-to-end suite.)

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::support::*;

/// Waits for `cond`, failing after `limit`; polls, never sleeps blindly.
fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the daemon if the test fails before stopping it.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0 as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// A socket for the daemon's sd_notify messages (`NOTIFY_SOCKET`), in a
/// directory kept while the test runs, read without blocking.
fn notify_socket() -> (tempfile::TempDir, std::path::PathBuf, UnixDatagram) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_nonblocking(true).unwrap();
    (dir, path, sock)
}

fn recv_all(sock: &UnixDatagram, into: &mut Vec<String>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        into.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
}

#[test]
fn daemon_notifies_syncs_on_sighup_and_stops_on_sigterm() {
    let repo = simple_repo(&[("/etc/a", "v1\n")]);
    let host = Host::new("h");
    let (_dir, sock_path, sock) = notify_socket();
    let mut child = host
        .cmd(repo.path(), &["run", "--interval", "1h", "--splay", "0s"])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID")
        .spawn()
        .unwrap();
    let _kill_on_panic = KillOnDrop(child.id());
    let mut msgs = Vec::new();
    wait_for(Duration::from_secs(30), "READY and the first sync", || {
        recv_all(&sock, &mut msgs);
        msgs.iter().any(|m| m.contains("idle since"))
    });
    assert!(msgs.iter().any(|m| m.contains("READY=1")), "{msgs:?}");
    assert!(
        msgs.iter().any(|m| m.contains("STATUS=syncing")),
        "{msgs:?}"
    );
    assert_eq!(host.read("/etc/a").as_deref(), Some("v1\n"));

    // A new commit is picked up at once on SIGHUP (the interval is 1h).
    repo.write("roles/app/files/f0", "v2\n");
    repo.commit("v2");
    msgs.clear();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_for(Duration::from_secs(30), "the SIGHUP sync", || {
        host.read("/etc/a").as_deref() == Some("v2\n")
    });
    wait_for(Duration::from_secs(5), "a watchdog ping", || {
        recv_all(&sock, &mut msgs);
        msgs.iter().any(|m| m.contains("WATCHDOG=1"))
    });

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    recv_all(&sock, &mut msgs);
    assert!(msgs.iter().any(|m| m.contains("STOPPING=1")), "{msgs:?}");
}

#[test]
fn daemon_without_source_exits_78_for_systemd_to_stop_restarting() {
    let host = Host::new("h");
    let out = std::process::Command::new(BIN)
        .args(["run", "--no-config", "--state-dir"])
        .arg(host.state.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(78),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The bug this pins: the daemon's `STATUS=` (which `systemctl status`
/// shows to every local user) named the source URL whole, password
/// included. Neither it nor the log of the failed sync may.
#[test]
fn the_daemon_names_its_source_without_the_password() {
    let host = Host::new("h");
    let (_dir, sock_path, sock) = notify_socket();
    // Port 1 on loopback: refused at once, the sync fails fast.
    let child = std::process::Command::new(BIN)
        .args(["run", "--no-config", "--interval", "1h", "--splay", "0s"])
        .args(["--source", "https://bot:s3cret@127.0.0.1:1/cfg.git"])
        .args(["--host", "h", "--root"])
        .arg(host.root.path())
        .arg("--state-dir")
        .arg(host.state.path())
        .env("NOTIFY_SOCKET", &sock_path)
        .env_remove("WATCHDOG_USEC")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _kill_on_panic = KillOnDrop(child.id());
    let mut msgs = Vec::new();
    wait_for(Duration::from_secs(60), "the failed first sync", || {
        recv_all(&sock, &mut msgs);
        msgs.iter().any(|m| m.contains("last sync failed"))
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        msgs.iter()
            .any(|m| m.contains("STATUS=syncing https://bot:***@127.0.0.1:1/cfg.git")),
        "{msgs:?}"
    );
    assert!(log.contains("sync failed"), "{log}");
    for m in msgs.iter().map(String::as_str).chain([&*log]) {
        assert!(!m.contains("s3cret"), "leaked: {m}");
    }
}

/// The bug: every idle poll of the daemon logged "nothing to do" at INFO,
/// a journal line per poll on every idle host. It is said once per commit
/// (again after anything else happened), the rest goes to DEBUG.
#[test]
fn an_idle_daemon_says_nothing_to_do_once_per_commit() {
    let repo = simple_repo(&[("/etc/a", "v1\n")]);
    let host = Host::new("h");
    let (_dir, sock_path, sock) = notify_socket();
    let child = host
        .cmd(repo.path(), &["run", "--interval", "1h", "--splay", "0s"])
        .env("NOTIFY_SOCKET", &sock_path)
        .env_remove("WATCHDOG_USEC")
        .env_remove("DRIFTLESS_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _kill_on_panic = KillOnDrop(child.id());
    let mut msgs = Vec::new();
    // One pass: SIGHUP (except for the first), then its closing STATUS=.
    let mut pass = |first: bool| {
        msgs.clear();
        if !first {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGHUP,
            )
            .unwrap();
        }
        wait_for(Duration::from_secs(30), "a pass", || {
            recv_all(&sock, &mut msgs);
            msgs.iter().any(|m| m.contains("idle since"))
        });
        msgs.iter()
            .find(|m| m.contains("idle since"))
            .cloned()
            .unwrap()
    };
    assert!(pass(true).contains("applied"));
    for _ in 0..3 {
        assert!(pass(false).contains("up to date"));
    }
    repo.write("roles/app/files/f0", "v2\n");
    repo.commit("v2");
    assert!(pass(false).contains("applied"));
    for _ in 0..2 {
        assert!(pass(false).contains("up to date"));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // 5 idle passes over two commits: said once after each apply.
    assert_eq!(log.matches("nothing to do").count(), 2, "{log}");
}
