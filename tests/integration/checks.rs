//! `http` health checks through the binary (`sync --run-checks` under a
//! `--root` prefix) against a local server on 127.0.0.1 that sends its
//! responses byte for byte. The client's cases (chunked, keep-alive,
//! HTTP/1.0, redirects, large bodies, TLS) are unit-tested in
//! `agent/src/effects/checks/http_tests.rs`; here: the sync's outcome.

use std::io::{Read, Write};
use std::net::TcpListener;

use crate::support::*;

/// Serves `reply(path)` on 127.0.0.1 from a thread for the rest of the test
/// process; then closes the connection (`close`) or keeps it open until the
/// client closes it.
fn serve(close: bool, reply: fn(&str) -> &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or_default();
                if s.write_all(reply(path).as_bytes()).is_err() || close {
                    return;
                }
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    format!("http://{addr}")
}

/// A repository whose hosts all get the role `app` (see [`write_role`]).
fn app_repo() -> Repo {
    let repo = Repo::new();
    repo.write("driftless.toml", "roles = [\"app\"]\n");
    repo.write("hosts/default.toml", "");
    repo
}

fn write_role(repo: &Repo, content: &str, http: &str) {
    repo.write("roles/app/files/app.conf", content);
    repo.write(
        "roles/app/role.toml",
        &format!(
            "[[files]]\npath = \"/etc/app.conf\"\nsource = \"app.conf\"\n\n\
             [[checks]]\nname = \"app answers\"\nretries = 2\ninterval = \"10ms\"\n\
             http = {{ {http} }}\n"
        ),
    );
}

fn sync(host: &Host, repo: &Repo) -> Run {
    host.run(repo.path(), &["sync", "--once", "--run-checks"])
}

fn last_outcome(host: &Host, repo: &Repo) -> serde_json::Value {
    let hist = host.run(repo.path(), &["history", "--format", "json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&hist.stdout).unwrap();
    v["status"]["entries"][0]["outcome"].clone()
}

/// Issue 14 §4: the hand-written client kept the chunk framing in the body,
/// so this healthy service failed its check and the commit was reverted.
/// (The server closes the connection after the response, so the old
/// client, which read to EOF, failed on the framing alone.)
#[test]
fn a_chunked_healthy_service_passes_its_http_check_and_the_commit_is_applied() {
    let base = serve(true, |_| {
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n\
         4\r\nstat\r\n6\r\nus: ok\r\n0\r\n\r\n"
    });
    let repo = app_repo();
    let host = Host::new("h");
    write_role(
        &repo,
        "v1\n",
        &format!("url = \"{base}/health\", body_contains = \"status: ok\""),
    );
    repo.commit("v1");
    let run = sync(&host, &repo).ok();
    assert!(!run.stderr.contains("failed"), "{}", run.stderr);
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("v1\n"));
    assert_eq!(last_outcome(&host, &repo), "applied");
}

/// A redirect is not followed unless asked: a 301 is status 301.
#[test]
fn http_checks_report_a_redirect_unless_follow_redirects() {
    let base = serve(false, |path| match path {
        "/old" => "HTTP/1.1 301 Moved Permanently\r\nLocation: /new\r\nContent-Length: 0\r\n\r\n",
        _ => "HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\narrived",
    });
    let repo = app_repo();
    let host = Host::new("h");
    write_role(
        &repo,
        "v1\n",
        &format!("url = \"{base}/old\", status = 301"),
    );
    repo.commit("v1 expects the redirect");
    sync(&host, &repo).ok();
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("v1\n"));

    write_role(
        &repo,
        "v2\n",
        &format!("url = \"{base}/old\", follow_redirects = true, body_contains = \"arrived\""),
    );
    repo.commit("v2 follows it");
    sync(&host, &repo).ok();
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("v2\n"));
    assert_eq!(last_outcome(&host, &repo), "applied");

    // Expecting 200 without following fails and reverts. The restored
    // state answers to v2's check (which follows), passes it, and the
    // host is not halted (it was, when v3's check was run on it again).
    write_role(&repo, "v3\n", &format!("url = \"{base}/old\""));
    repo.commit("v3 expects 200 from /old");
    let run = sync(&host, &repo).code(1);
    assert!(
        run.stderr.contains(&format!(
            "check \"app answers\" failed after 2 attempt(s): GET {base}/old: status 301, expected 200"
        )) && run.stderr.contains("reverted to its previous state and the commit is marked bad")
            && run.stderr.contains("check passed"),
        "{}",
        run.stderr
    );
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("v2\n"));
}

#[test]
fn validate_names_a_bad_http_check() {
    let repo = app_repo();
    repo.write(
        "roles/app/role.toml",
        "[[checks]]\nhttp = { url = \"ftp://127.0.0.1/\" }\n\n\
         [[checks]]\nhttp = { url = \"https://127.0.0.1/\", ca_file = \"ca.pem\" }\n\n\
         [[checks]]\nhttp = { url = \"https://127.0.0.1/\", ca_file = \"/etc/ssl/ca.pem\", follow_redirects = true }\n",
    );
    let (code, text) = validate(repo.path(), &[]);
    assert_eq!(code, Some(3), "{text}");
    for want in [
        "roles/app/role.toml:1 checks[0]: http.url: \"ftp://127.0.0.1/\" is not an http:// or https:// URL",
        "roles/app/role.toml:4 checks[1]: http.ca_file: \"ca.pem\" must be an absolute path",
    ] {
        assert!(text.contains(want), "{want:?} not in {text}");
    }
    assert!(!text.contains("checks[2]"), "{text}");
}
