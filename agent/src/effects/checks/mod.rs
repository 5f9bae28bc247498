//! Health checks: `http`, `tcp`, `command`, `unit`.
//!
//! Each check is attempted up to `retries` times, `interval` apart, each
//! attempt bounded by `timeout`; the first success passes. Time comes from
//! tokio, so tests run with a paused clock (`tokio::time::pause`) and take
//! no wall-clock time.
//!
//! `command` runs the program directly (no shell): write
//! `argv = ["/bin/sh", "-c", "..."]` to ask for one.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::desired::model::{CommandCheckSpec, HttpCheckSpec, TcpCheckSpec, UnitCheckSpec};
use crate::desired::spec::{parse_duration, Check, Probe};
use crate::effects::systemd::Systemd;

/// The outcome of one check, as shown in status and history.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub ok: bool,
    pub attempts: u32,
    /// The last failure (or empty when it passed).
    pub message: String,
}

/// Runs every check; returns all results (in order).
pub async fn run_all(checks: &[Check], systemd: Option<&Systemd>) -> Vec<CheckResult> {
    let mut out = Vec::with_capacity(checks.len());
    for c in checks {
        out.push(run_one(c, systemd).await);
    }
    out
}

pub async fn run_one(check: &Check, systemd: Option<&Systemd>) -> CheckResult {
    attempt_loop(check, || probe(&check.probe, systemd)).await
}

/// Retries `attempt` per the check's retries/interval/timeout.
async fn attempt_loop<F, Fut>(check: &Check, mut attempt_fn: F) -> CheckResult
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let attempts = check.retries.max(1);
    let mut last = String::new();
    for attempt in 1..=attempts {
        let r = tokio::time::timeout(check.timeout, attempt_fn())
            .await
            .unwrap_or_else(|_| Err(anyhow!("timed out after {:?}", check.timeout)));
        match r {
            Ok(()) => {
                return CheckResult {
                    name: check.name.clone(),
                    ok: true,
                    attempts: attempt,
                    message: String::new(),
                }
            }
            Err(e) => last = format!("{e:#}"),
        }
        if attempt < attempts {
            tokio::time::sleep(check.interval).await;
        }
    }
    CheckResult {
        name: check.name.clone(),
        ok: false,
        attempts,
        message: last,
    }
}

async fn probe(p: &Probe, systemd: Option<&Systemd>) -> Result<()> {
    match p {
        Probe::Http(h) => http(h).await,
        Probe::Tcp(t) => tcp(t).await,
        Probe::Command(c) => command(c).await,
        Probe::Unit(u) => unit(u, systemd).await,
    }
}

async fn tcp(t: &TcpCheckSpec) -> Result<()> {
    tokio::net::TcpStream::connect(&t.address)
        .await
        .with_context(|| format!("cannot connect to {}", t.address))?;
    Ok(())
}

/// A plain HTTP/1.1 GET (checks target local services; `https://` URLs go
/// through the same TLS stack as fetching).
async fn http(h: &HttpCheckSpec) -> Result<()> {
    let (status, body) = if h.url.starts_with("https://") {
        https_get(&h.url).await?
    } else {
        http_get(&h.url).await?
    };
    if status != h.status {
        bail!("GET {}: status {status}, expected {}", h.url, h.status);
    }
    if let Some(needle) = &h.body_contains {
        if !body.contains(needle.as_str()) {
            bail!("GET {}: the body does not contain {needle:?}", h.url);
        }
    }
    Ok(())
}

/// Largest body read for a check.
const MAX_BODY: u64 = 1 << 20;

async fn http_get(url: &str) -> Result<(u16, String)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: only http:// and https:// URLs can be checked"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let mut stream = tokio::net::TcpStream::connect(&addr)
        .await
        .with_context(|| format!("GET {url}: cannot connect to {addr}"))?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: driftless-check\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(req.as_bytes())
        .await
        .with_context(|| format!("GET {url}"))?;
    let mut buf = Vec::new();
    stream
        .take(MAX_BODY)
        .read_to_end(&mut buf)
        .await
        .with_context(|| format!("GET {url}: reading the response"))?;
    let text = String::from_utf8_lossy(&buf);
    let status_line = text.lines().next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("GET {url}: not an HTTP response: {status_line:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

async fn https_get(url: &str) -> Result<(u16, String)> {
    let url = url.to_string();
    tokio::task::spawn_blocking(move || -> Result<(u16, String)> {
        crate::effects::fetch::install_tls_provider();
        let client = reqwest::blocking::Client::builder()
            .build()
            .context("cannot build an HTTPS client")?;
        let resp = client
            .get(&url)
            .send()
            .with_context(|| format!("GET {url}"))?;
        let status = resp.status().as_u16();
        let body = resp.text().unwrap_or_default();
        Ok((status, body))
    })
    .await
    .context("HTTPS check task failed")?
}

async fn command(c: &CommandCheckSpec) -> Result<()> {
    let (prog, args) = c.argv.split_first().context("empty argv")?;
    let out = tokio::process::Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("cannot run {prog}"))?;
    let code = out.status.code();
    if code != Some(c.exit_code) {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: String = stderr
            .lines()
            .last()
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect();
        bail!(
            "{} exited with {}, expected {}{}",
            c.argv.join(" "),
            code.map_or("a signal".to_string(), |c| c.to_string()),
            c.exit_code,
            if tail.is_empty() {
                String::new()
            } else {
                format!(": {tail}")
            }
        );
    }
    Ok(())
}

async fn unit(u: &UnitCheckSpec, systemd: Option<&Systemd>) -> Result<()> {
    let sd = systemd.context("unit checks need systemd, which is not used for this run")?;
    let settle = match &u.settle {
        Some(s) => parse_duration(s).map_err(|e| anyhow!(e))?,
        None => Duration::ZERO,
    };
    let deadline = tokio::time::Instant::now() + settle;
    loop {
        let st = sd.state(&u.name).await?;
        if st.active != "active" {
            bail!("{st}");
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500).min(settle)).await;
    }
}

#[cfg(test)]
mod tests;
