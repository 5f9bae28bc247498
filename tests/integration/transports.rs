//! The binary syncing over real network transports on loopback: `git
//! http-backend` behind TLS with a test CA, and a private OpenSSH server.
//! (Local paths and `file://` without git on PATH: `pipeline.rs`.)

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::support::*;

/// Kills the server when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args([
            "-c",
            &format!("command -v {tool} >/dev/null || test -x {tool}"),
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A bare repository (the "server side") cloned from `repo`.
fn bare_clone(repo: &Repo, parent: &Path) -> std::path::PathBuf {
    let bare = parent.join("config.git");
    git(
        parent,
        &[
            "clone",
            "-q",
            "--bare",
            repo.path().to_str().unwrap(),
            bare.to_str().unwrap(),
        ],
    );
    bare
}

#[test]
fn sync_over_https_with_a_private_ca() {
    for tool in ["python3", "openssl", "git"] {
        if !have(tool) {
            return skip::missing(&format!("{tool} (the HTTPS test server)"));
        }
    }
    let repo = simple_repo(&[("/etc/a", "v1\n")]);
    let srv = tempfile::tempdir().unwrap();
    let certs = srv.path().join("certs");
    let st = Command::new("sh")
        .arg(workspace().join("tests/support/make_test_ca.sh"))
        .arg(&certs)
        .status()
        .unwrap();
    assert!(st.success());
    let bare = bare_clone(&repo, srv.path());
    let mut child = Command::new("python3")
        .arg(workspace().join("tests/support/https_git_server.py"))
        .arg("--root")
        .arg(srv.path())
        .arg("--cert")
        .arg(certs.join("server.pem"))
        .arg("--key")
        .arg(certs.join("server.key"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let _server = Server(child);
    let url = format!("https://127.0.0.1:{}/config.git", port.trim());

    let host = Host::new("h");
    let run = |host: &Host| {
        let out = host
            .cmd(Path::new(&url), &["sync", "--once"])
            .env("SSL_CERT_FILE", certs.join("ca.pem"))
            .env_remove("SSL_CERT_DIR")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&host);
    assert_eq!(host.read("/etc/a").as_deref(), Some("v1\n"));
    assert!(host.state.path().join("mirror.git").is_dir());

    // A new commit on the server arrives with the next sync.
    repo.write("roles/app/files/f0", "v2\n");
    repo.commit("v2");
    git(repo.path(), &["push", "-q", bare.to_str().unwrap(), "main"]);
    run(&host);
    assert_eq!(host.read("/etc/a").as_deref(), Some("v2\n"));

    // Without the CA the server is not trusted: exit 1, host unchanged.
    repo.write("roles/app/files/f0", "v3\n");
    repo.commit("v3");
    git(repo.path(), &["push", "-q", bare.to_str().unwrap(), "main"]);
    let empty = tempfile::tempdir().unwrap();
    let out = host
        .cmd(Path::new(&url), &["sync", "--once"])
        .env("SSL_CERT_FILE", empty.path().join("none.pem"))
        .env_remove("SSL_CERT_DIR")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(host.read("/etc/a").as_deref(), Some("v2\n"));
}

#[test]
fn sync_over_ssh_with_a_pinned_host_key() {
    for (tool, package) in [
        ("/usr/sbin/sshd", "openssh-server"),
        ("ssh", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
        ("python3", "python3"),
        ("git", "git"),
    ] {
        if !have(tool) {
            return skip::missing(&format!("{tool} (Debian package {package})"));
        }
    }
    let repo = simple_repo(&[("/etc/a", "over ssh\n")]);
    let srv = tempfile::tempdir().unwrap();
    let bare = bare_clone(&repo, srv.path());
    let sshd_dir = srv.path().join("sshd");
    let mut child = Command::new("python3")
        .arg(workspace().join("tests/support/sshd.py"))
        .arg("--dir")
        .arg(&sshd_dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut info = std::collections::BTreeMap::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line == "ready" {
            break;
        }
        if let Some((k, v)) = line.split_once('=') {
            info.insert(k.to_string(), v.to_string());
        }
    }
    let _server = Server(child);
    let url = format!(
        "ssh://{}@127.0.0.1:{}{}",
        info["user"],
        info["port"],
        bare.display()
    );
    let host = Host::new("h");
    let out = host
        .cmd(
            Path::new(&url),
            &[
                "sync",
                "--once",
                "--ssh-key",
                &info["key"],
                "--ssh-known-hosts",
                &info["known_hosts"],
            ],
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(host.read("/etc/a").as_deref(), Some("over ssh\n"));

    // An unknown host key is refused: ssh's reason is in the error.
    let other_known = srv.path().join("empty_known_hosts");
    std::fs::write(&other_known, "").unwrap();
    let out = host
        .cmd(
            Path::new(&url),
            &[
                "sync",
                "--once",
                "--ssh-key",
                &info["key"],
                "--ssh-known-hosts",
                other_known.to_str().unwrap(),
            ],
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Host key verification failed"), "{err}");
}
