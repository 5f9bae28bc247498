//! Health checks: `http`, `tcp`, `command`, `unit`.
//!
//! Each check is attempted up to `retries` times, `interval` apart, each
//! attempt bounded by `timeout`, the first after `delay`; the first
//! success passes. Time comes from
//! tokio, so tests run with a paused clock (`tokio::time::pause`) and take
//! no wall-clock time.
//!
//! `command` runs the program directly (no shell): write
//! `argv = ["/bin/sh", "-c", "..."]` to ask for one. It inherits the
//! agent's environment and runs in a process group of its own, killed as
//! a whole when an attempt times out (`effects::process`, shared with
//! hooks).

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::desired::model::{CommandCheckSpec, TcpCheckSpec, UnitCheckSpec};
use crate::desired::spec::{parse_duration, Check, Probe};
use crate::effects::systemd::Systemd;

mod http;
pub(crate) use http::build_client;

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
    attempt_loop(check, || probe(&check.probe, check.timeout, systemd)).await
}

/// Retries `attempt` per the check's retries/interval/timeout.
async fn attempt_loop<F, Fut>(check: &Check, mut attempt_fn: F) -> CheckResult
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let attempts = check.retries.max(1);
    let mut last = String::new();
    if !check.delay.is_zero() {
        tokio::time::sleep(check.delay).await;
    }
    for attempt in 1..=attempts {
        let r = tokio::time::timeout(check.timeout, attempt_fn())
            .await
            .unwrap_or_else(|_| Err(timed_out(&check.probe, check.timeout)));
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

/// The error of an attempt cut off by the check's `timeout`. An http
/// attempt is also bounded by the client's own timeout (the same duration),
/// so either may fire first: both name the request.
fn timed_out(p: &Probe, timeout: Duration) -> anyhow::Error {
    match p {
        Probe::Http(h) => anyhow!("GET {}: timed out after {timeout:?}", h.url),
        _ => anyhow!("timed out after {timeout:?}"),
    }
}

async fn probe(p: &Probe, timeout: Duration, systemd: Option<&Systemd>) -> Result<()> {
    match p {
        Probe::Http(h) => http::check(h, timeout).await,
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

/// Runs the program (see `effects::process`: no shell, its own process
/// group, killed with it when the attempt's timeout drops this future).
async fn command(c: &CommandCheckSpec) -> Result<()> {
    let done = crate::effects::process::run(&crate::effects::process::Invocation {
        argv: &c.argv,
        env: None,
        user: None,
        timeout: None,
        keep: 0,
    })
    .await?;
    let code = done.status.and_then(|s| s.code());
    if code != Some(c.exit_code) {
        let tail = done.stderr.last_line(200);
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
    // (Bounded by the loader; a forged configuration cache is not.)
    let now = tokio::time::Instant::now();
    let deadline = now.checked_add(settle).unwrap_or(now);
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
mod http_tests;
#[cfg(test)]
mod tests;
