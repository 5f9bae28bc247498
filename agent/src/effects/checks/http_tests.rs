//! The `http` check against real local servers (127.0.0.1:0) that send
//! their responses byte for byte: chunked, keep-alive, HTTP/1.0, redirects,
//! large bodies, and TLS with a CA made in the test.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use super::http::{MAX_BODY, MAX_REDIRECTS};
use super::*;
use crate::desired::model::HttpCheckSpec;

// ----------------------------------------------------------------- server

/// What the server sends for one request: exactly these bytes, then it
/// either closes the connection or keeps it open until the client does.
struct Reply {
    bytes: Vec<u8>,
    close: bool,
}

impl Reply {
    fn keep_open(bytes: impl Into<Vec<u8>>) -> Reply {
        Reply {
            bytes: bytes.into(),
            close: false,
        }
    }

    fn then_close(bytes: impl Into<Vec<u8>>) -> Reply {
        Reply {
            bytes: bytes.into(),
            close: true,
        }
    }
}

/// Request path -> reply.
type Handler = fn(&str) -> Reply;

struct Server {
    addr: SocketAddr,
    /// The request heads received, in order.
    requests: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn url(&self, scheme: &str, path: &str) -> String {
        format!("{scheme}://{}{path}", self.addr)
    }
}

/// Serves `handler` on 127.0.0.1 (over TLS with `tls`) until the test's
/// runtime ends.
async fn serve(handler: Handler, tls: Option<tokio_rustls::TlsAcceptor>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&requests);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let log = Arc::clone(&log);
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => answer(tcp, handler, log).await,
                    // A client refusing the certificate ends the handshake.
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(tcp).await {
                            answer(stream, handler, log).await;
                        }
                    }
                }
            });
        }
    });
    Server { addr, requests }
}

/// Reads one request head, sends the reply.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    handler: Handler,
    log: Arc<Mutex<Vec<String>>>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    log.lock().unwrap().push(head);
    let reply = handler(&path);
    // A client that has read enough closes early (large bodies).
    if s.write_all(&reply.bytes).await.is_err() || s.flush().await.is_err() {
        return;
    }
    if reply.close {
        let _ = s.shutdown().await;
    } else {
        // Keep-alive: the connection stays open until the client closes it.
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
    }
}

// ----------------------------------------------------------------- checks

fn http_check(url: String, set: impl FnOnce(&mut HttpCheckSpec)) -> Check {
    let mut spec = HttpCheckSpec {
        url,
        status: 200,
        body_contains: None,
        follow_redirects: false,
        ca_file: None,
    };
    set(&mut spec);
    Check {
        name: "t".into(),
        role: "r".into(),
        probe: Probe::Http(spec),
        retries: 1,
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(5),
        delay: Duration::ZERO,
    }
}

async fn run(check: &Check) -> CheckResult {
    run_one(check, None).await
}

fn ok_body(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

// ------------------------------------------------------------------ tests

/// The bug this module was rewritten for: the hand-written client read the
/// raw bytes, so a chunked body was "5\r\nall s\r\n7\r\nystems …" and a
/// healthy service failed its check (and the commit was reverted). The
/// server closes after the response: the framing alone is under test
/// (keep-alive is the next test).
#[tokio::test]
async fn chunked_response_from_a_healthy_service_passes() {
    let server = serve(
        |_| {
            Reply::then_close(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n\
                 5\r\nall s\r\n7\r\nystems \r\n3\r\ngo!\r\n0\r\n\r\n",
            )
        },
        None,
    )
    .await;
    let url = server.url("http", "/health");
    let r = run(&http_check(url.clone(), |h| {
        h.body_contains = Some("all systems go!".into());
    }))
    .await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.attempts, 1);

    // The chunk framing is not part of the body.
    let r = run(&http_check(url, |h| h.body_contains = Some("7\r\n".into()))).await;
    assert!(!r.ok, "{r:?}");
    assert!(
        r.message.contains("the body does not contain \"7\\r\\n\""),
        "{}",
        r.message
    );
}

/// The old client sent `Connection: close` and read to EOF: a server
/// keeping the connection open made it hang until the timeout.
#[tokio::test]
async fn keep_alive_response_with_content_length_passes_without_waiting_for_close() {
    let server = serve(|_| Reply::keep_open(ok_body("hello world")), None).await;
    let url = server.url("http", "/health");

    let start = Instant::now();
    let r = run(&http_check(url.clone(), |h| {
        h.body_contains = Some("o w".into());
    }))
    .await;
    assert!(r.ok, "{r:?}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}: waited for the connection to close",
        start.elapsed()
    );

    let r = run(&http_check(url.clone(), |h| {
        h.body_contains = Some("bye".into())
    }))
    .await;
    assert!(!r.ok, "{r:?}");
    assert_eq!(
        r.message,
        format!("GET {url}: the body does not contain \"bye\"")
    );

    let r = run(&http_check(url.clone(), |h| h.status = 204)).await;
    assert!(!r.ok, "{r:?}");
    assert_eq!(r.message, format!("GET {url}: status 200, expected 204"));
}

#[tokio::test]
async fn http_1_0_response_without_content_length_closed_by_the_server_passes() {
    let server = serve(
        |_| Reply::then_close("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nold but healthy"),
        None,
    )
    .await;
    let r = run(&http_check(server.url("http", "/"), |h| {
        h.body_contains = Some("but healthy".into());
    }))
    .await;
    assert!(r.ok, "{r:?}");
}

fn redirects(path: &str) -> Reply {
    match path {
        "/old" => Reply::keep_open(
            "HTTP/1.1 301 Moved Permanently\r\nLocation: /new\r\nContent-Length: 0\r\n\r\n",
        ),
        "/loop" => {
            Reply::keep_open("HTTP/1.1 302 Found\r\nLocation: /loop\r\nContent-Length: 0\r\n\r\n")
        }
        "/new" => Reply::keep_open(ok_body("arrived")),
        _ => Reply::keep_open("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
    }
}

#[tokio::test]
async fn a_redirect_is_its_status_unless_follow_redirects() {
    let server = serve(redirects, None).await;
    let old = server.url("http", "/old");

    // Default: not followed, the 301 is the answer.
    let r = run(&http_check(old.clone(), |_| {})).await;
    assert!(!r.ok, "{r:?}");
    assert_eq!(r.message, format!("GET {old}: status 301, expected 200"));
    let r = run(&http_check(old.clone(), |h| h.status = 301)).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(server.requests.lock().unwrap().len(), 2, "only /old, twice");

    // Opted in: followed to /new.
    let r = run(&http_check(old.clone(), |h| {
        h.follow_redirects = true;
        h.body_contains = Some("arrived".into());
    }))
    .await;
    assert!(r.ok, "{r:?}");
    let paths: Vec<String> = server.requests.lock().unwrap()[2..]
        .iter()
        .map(|head| {
            head.split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(paths, ["/old", "/new"]);

    // Bounded: a redirect loop fails after MAX_REDIRECTS.
    let before = server.requests.lock().unwrap().len();
    let looping = server.url("http", "/loop");
    let r = run(&http_check(looping.clone(), |h| h.follow_redirects = true)).await;
    assert!(!r.ok, "{r:?}");
    assert!(
        r.message.starts_with(&format!("GET {looping}: ")),
        "{}",
        r.message
    );
    assert!(r.message.contains("too many redirects"), "{}", r.message);
    let after = server.requests.lock().unwrap().len();
    assert_eq!(after - before, MAX_REDIRECTS + 1);
}

#[tokio::test]
async fn a_body_larger_than_the_cap_is_truncated_not_failed() {
    fn big(_: &str) -> Reply {
        // 3 MiB: a marker at the start, one past the first MiB.
        let mut body = vec![b'.'; 3 << 20];
        body[..5].copy_from_slice(b"START");
        body[(1 << 20) + 10..(1 << 20) + 13].copy_from_slice(b"END");
        let mut bytes = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        bytes.extend_from_slice(&body);
        Reply::keep_open(bytes)
    }
    assert_eq!(MAX_BODY, 1 << 20);
    let server = serve(big, None).await;
    let url = server.url("http", "/big");

    // Status only: the body is not read at all.
    let r = run(&http_check(url.clone(), |_| {})).await;
    assert!(r.ok, "{r:?}");

    let r = run(&http_check(url.clone(), |h| {
        h.body_contains = Some("START".into())
    }))
    .await;
    assert!(r.ok, "{r:?}");

    let r = run(&http_check(url.clone(), |h| {
        h.body_contains = Some("END".into())
    }))
    .await;
    assert!(!r.ok, "{r:?}");
    assert_eq!(
        r.message,
        format!("GET {url}: the body does not contain \"END\" (only its first MiB is read)")
    );
}

#[tokio::test]
async fn the_request_names_the_agent() {
    let server = serve(|_| Reply::keep_open(ok_body("ok")), None).await;
    let r = run(&http_check(server.url("http", "/ua"), |_| {})).await;
    assert!(r.ok, "{r:?}");
    let head = server.requests.lock().unwrap()[0].to_ascii_lowercase();
    assert!(head.starts_with("get /ua http/1.1\r\n"), "{head}");
    assert!(
        head.contains(&format!(
            "\r\nuser-agent: driftless-check/{}\r\n",
            env!("CARGO_PKG_VERSION")
        )),
        "{head}"
    );
}

#[tokio::test]
async fn a_refused_connection_names_the_url_and_the_cause() {
    // Bind then drop to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/health");
    let r = run(&http_check(url.clone(), |_| {})).await;
    assert!(!r.ok, "{r:?}");
    assert!(
        r.message.starts_with(&format!("GET {url}: ")),
        "{}",
        r.message
    );
    assert!(r.message.contains("Connection refused"), "{}", r.message);
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_naming_the_url() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s); // accepted, never answered
        }
    });
    let url = format!("http://{addr}/slow");
    let mut check = http_check(url.clone(), |_| {});
    check.timeout = Duration::from_millis(300);
    let start = Instant::now();
    let r = run(&check).await;
    assert!(!r.ok, "{r:?}");
    assert!(
        r.message.starts_with(&format!("GET {url}: ")),
        "{}",
        r.message
    );
    assert!(r.message.contains("timed out"), "{}", r.message);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}

// -------------------------------------------------------------------- TLS

/// A CA, and a server certificate it signed for 127.0.0.1 and localhost.
struct Pki {
    ca_pem: String,
    acceptor: tokio_rustls::TlsAcceptor,
}

fn pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "driftless test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate().unwrap();
    let mut leaf =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = leaf.signed_by(&key, &issuer).unwrap();

    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf_cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn https_with_a_private_ca_fails_without_ca_file_and_passes_with_it() {
    let pki = pki();
    let tmp = tempfile::tempdir().unwrap();
    let ca_file = write(tmp.path(), "ca.pem", &pki.ca_pem);
    let server = serve(
        |_| Reply::keep_open(ok_body("secure and sound")),
        Some(pki.acceptor),
    )
    .await;
    let url = server.url("https", "/health");

    // System roots only: the test CA is unknown.
    let r = run(&http_check(url.clone(), |_| {})).await;
    assert!(!r.ok, "{r:?}");
    assert!(
        r.message.starts_with(&format!("GET {url}: ")),
        "{}",
        r.message
    );
    assert!(
        r.message
            .contains("invalid peer certificate: UnknownIssuer"),
        "{}",
        r.message
    );
    assert!(server.requests.lock().unwrap().is_empty());

    // ca_file trusts it (by IP address and by name).
    let r = run(&http_check(url.clone(), |h| {
        h.ca_file = Some(ca_file.clone());
        h.body_contains = Some("and sound".into());
    }))
    .await;
    assert!(r.ok, "{r:?}");
    let by_name = format!("https://localhost:{}/health", server.addr.port());
    let r = run(&http_check(by_name, |h| h.ca_file = Some(ca_file.clone()))).await;
    assert!(r.ok, "{r:?}");

    // Another CA does not (one with the same name: the signature is wrong).
    let other = write(tmp.path(), "other.pem", &self::pki().ca_pem);
    let r = run(&http_check(url.clone(), |h| h.ca_file = Some(other))).await;
    assert!(!r.ok, "{r:?}");
    assert!(
        r.message.contains("invalid peer certificate: BadSignature"),
        "{}",
        r.message
    );
}

#[tokio::test]
async fn a_bad_ca_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.pem");
    let empty = write(tmp.path(), "empty.pem", "not a certificate\n");
    let garbage = write(
        tmp.path(),
        "garbage.pem",
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    );
    let url = "https://127.0.0.1:1/health".to_string();
    for (file, want) in [
        (&missing, "cannot read ca_file"),
        (&empty, "no certificate in it"),
        (&garbage, "cannot set up the client with ca_file"),
    ] {
        let r = run(&http_check(url.clone(), |h| h.ca_file = Some(file.clone()))).await;
        assert!(!r.ok, "{r:?}");
        assert!(
            r.message.starts_with(&format!("GET {url}: ")),
            "{}",
            r.message
        );
        assert!(r.message.contains(want), "{want:?} not in {}", r.message);
        assert!(
            r.message.contains(&file.display().to_string()),
            "{}",
            r.message
        );
    }
}

// ------------------------------------------------------ the environment

/// Proxies in the environment are not used, and a host without a CA
/// bundle still runs http:// checks (and https:// ones with `ca_file`).
/// In a child process, so the environment is its own.
#[test]
fn proxies_and_a_missing_ca_bundle_in_the_environment_do_not_matter() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = write(tmp.path(), "no-roots.pem", "");
    // Nothing listens there: a request through the proxy would fail.
    let proxy = "http://127.0.0.1:9";
    let module = module_path!().split_once("::").map_or("", |(_, m)| m);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            &format!("{module}::child_environment"),
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("DRIFTLESS_TEST_CHILD", "1")
        .env("SSL_CERT_FILE", &empty)
        .env_remove("SSL_CERT_DIR")
        .env("HTTP_PROXY", proxy)
        .env("http_proxy", proxy)
        .env("HTTPS_PROXY", proxy)
        .env("https_proxy", proxy)
        .env("ALL_PROXY", proxy)
        .env("all_proxy", proxy)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(
        text.contains("1 passed") && !text.contains("SKIP"),
        "child did not run:\n{text}"
    );
}

#[tokio::test]
#[ignore = "run by proxies_and_a_missing_ca_bundle_in_the_environment_do_not_matter"]
async fn child_environment() {
    if std::env::var_os("DRIFTLESS_TEST_CHILD").is_none() {
        eprintln!("SKIP: only meaningful when started by its parent test");
        return;
    }
    let plain = serve(|_| Reply::keep_open(ok_body("direct")), None).await;
    let r = run(&http_check(plain.url("http", "/"), |h| {
        h.body_contains = Some("direct".into());
    }))
    .await;
    assert!(r.ok, "{r:?}");

    let pki = pki();
    let tmp = tempfile::tempdir().unwrap();
    let ca_file = write(tmp.path(), "ca.pem", &pki.ca_pem);
    let tls = serve(|_| Reply::keep_open(ok_body("direct")), Some(pki.acceptor)).await;
    let url = tls.url("https", "/");
    let r = run(&http_check(url.clone(), |h| h.ca_file = Some(ca_file))).await;
    assert!(r.ok, "{r:?}");

    // No system roots and no ca_file: said so.
    let r = run(&http_check(url.clone(), |_| {})).await;
    assert!(!r.ok, "{r:?}");
    assert!(
        r.message.starts_with(&format!("GET {url}: ")),
        "{}",
        r.message
    );
    assert!(
        r.message
            .contains("No CA certificates were loaded from the system"),
        "{}",
        r.message
    );
}
