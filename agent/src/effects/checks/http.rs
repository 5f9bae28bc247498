//! The `http` check: one GET with reqwest's async client, the same code
//! path for `http://` and `https://`.
//!
//! - **Redirects** are not followed unless `follow_redirects = true` (then at
//!   most [`MAX_REDIRECTS`]): by default a 301 is status 301.
//! - **TLS** goes through the same stack as fetching (rustls with the `ring`
//!   provider, [`install_tls_provider`]; server certificates checked by
//!   reqwest's platform verifier against the system roots, `SSL_CERT_FILE` /
//!   `SSL_CERT_DIR` honoured). `ca_file` adds the CA certificates of a PEM
//!   file to those roots.
//! - **The body** is read only when `body_contains` asks for it, at most
//!   [`MAX_BODY`] bytes (the rest is not read, which is not a failure), and
//!   searched as lossy UTF-8.
//! - No proxy from the environment: checks target the host's own services.
//! - Each attempt is bounded by the check's `timeout` (the whole request,
//!   body included); connecting by at most [`CONNECT_TIMEOUT`] of it.
//!
//! Errors read `GET <url>: <cause>: <cause>…`.
//!
//! [`install_tls_provider`]: crate::effects::fetch::install_tls_provider

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::desired::model::HttpCheckSpec;

/// Largest body read for a check.
pub(super) const MAX_BODY: usize = 1 << 20;

/// Redirects followed with `follow_redirects = true`.
pub(super) const MAX_REDIRECTS: usize = 5;

/// Longest wait for the TCP connection (the check's `timeout` if shorter).
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

const USER_AGENT: &str = concat!("driftless-check/", env!("CARGO_PKG_VERSION"));

/// Runs one attempt of the check.
pub(super) async fn check(h: &HttpCheckSpec, timeout: Duration) -> Result<()> {
    let url = &h.url;
    let client = client(h, timeout).with_context(|| format!("GET {url}"))?;
    let mut resp = client
        .get(url)
        .send()
        .await
        .map_err(reqwest::Error::without_url)
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status().as_u16();
    if status != h.status {
        bail!("GET {url}: status {status}, expected {}", h.status);
    }
    if let Some(needle) = &h.body_contains {
        let body = read_body(&mut resp)
            .await
            .map_err(reqwest::Error::without_url)
            .with_context(|| format!("GET {url}: reading the body"))?;
        if !String::from_utf8_lossy(&body).contains(needle.as_str()) {
            bail!(
                "GET {url}: the body does not contain {needle:?}{}",
                if body.len() == MAX_BODY {
                    " (only its first MiB is read)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}

/// A client for one check, built per attempt (it is cheap, and a `ca_file`
/// replaced on the host is picked up on the next attempt).
fn client(h: &HttpCheckSpec, timeout: Duration) -> Result<reqwest::Client> {
    build_client(
        USER_AGENT,
        &h.url,
        h.ca_file.as_deref(),
        h.follow_redirects,
        timeout,
    )
}

/// The agent's HTTP client (checks, webhooks): rustls with `ring`, no
/// proxy from the environment, a fresh connection per client, each request
/// bounded by `timeout` (connecting by at most [`CONNECT_TIMEOUT`] of it);
/// `ca_file` adds its CA certificates to the system roots.
pub(crate) fn build_client(
    user_agent: &str,
    url: &str,
    ca_file: Option<&std::path::Path>,
    follow_redirects: bool,
    timeout: Duration,
) -> Result<reqwest::Client> {
    crate::effects::fetch::install_tls_provider();
    let redirects = if follow_redirects {
        reqwest::redirect::Policy::limited(MAX_REDIRECTS)
    } else {
        reqwest::redirect::Policy::none()
    };
    let mut builder = reqwest::Client::builder()
        .user_agent(user_agent)
        .no_proxy()
        .redirect(redirects)
        .timeout(timeout)
        .connect_timeout(timeout.min(CONNECT_TIMEOUT))
        // A fresh connection per attempt: a check says whether the service
        // accepts connections now.
        .pool_max_idle_per_host(0);
    if let Some(path) = ca_file {
        let certs = ca_certs(path)?;
        builder = builder.tls_certs_merge(certs);
    } else if !may_use_tls(url, follow_redirects) {
        // Plain http:// without redirects never reaches TLS: do not load
        // the system roots, so the check also works on a host without a CA
        // bundle (reqwest refuses to build a client when it finds none).
        builder = builder.tls_certs_only([]);
    }
    builder.build().map_err(|e| {
        let what = match ca_file {
            Some(path) => format!("cannot set up the client with ca_file {}", path.display()),
            None => "cannot set up the client".to_string(),
        };
        anyhow::Error::new(e).context(what)
    })
}

/// Whether the request can end up on an `https://` URL.
fn may_use_tls(url: &str, follow_redirects: bool) -> bool {
    follow_redirects
        || url
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
}

/// The certificates of a PEM file; errors name the file.
fn ca_certs(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>> {
    let pem =
        std::fs::read(path).with_context(|| format!("cannot read ca_file {}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .with_context(|| format!("ca_file {}: not a PEM certificate bundle", path.display()))?;
    if certs.is_empty() {
        bail!(
            "ca_file {}: no certificate in it (expected PEM \"-----BEGIN CERTIFICATE-----\" blocks)",
            path.display()
        );
    }
    Ok(certs)
}

/// Reads at most [`MAX_BODY`] bytes of the body, and stops there.
async fn read_body(resp: &mut reqwest::Response) -> reqwest::Result<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = MAX_BODY - body.len();
        if chunk.len() >= room {
            body.extend_from_slice(&chunk[..room]);
            break;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
