//! The FleetLock client: a host's two calls to a FleetLock server.
//!
//! A server that cannot be reached, or answers 5xx (it cannot decide:
//! its own store is down), is an error, handled like an unreachable etcd
//! (`on_unreachable`). A 4xx is the server's refusal: the host waits, with
//! the server's `value` as the reason. Redirects are not followed (the
//! protocol's header exists so that a redirected request fails), and only
//! the first `MAX_ANSWER` bytes of an answer are read: the server is
//! not trusted to be small.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use super::{ClientParams, ErrorBody, Request, HEADER, PRE_REBOOT, STEADY_STATE};

/// How long one call may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of an answer read at most.
const MAX_ANSWER: usize = 64 * 1024;

/// A server's refusal (a 4xx).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub kind: String,
    pub value: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (HTTP {}, {})", self.value, self.status, self.kind)
    }
}

/// One host's side of the protocol.
pub struct Client {
    base: String,
    params: ClientParams,
    http: reqwest::Client,
}

impl Client {
    /// `url` is the server's base URL (the protocol's paths are appended);
    /// `ca_file` adds CAs for an `https://` server.
    pub fn new(url: &str, ca_file: Option<&Path>, id: &str, group: &str) -> Result<Client> {
        let http = crate::effects::checks::build_client(
            concat!("driftless/", env!("CARGO_PKG_VERSION")),
            url,
            ca_file,
            false,
            TIMEOUT,
        )
        .context("fleet.fleetlock")?;
        Ok(Client {
            base: url.trim_end_matches('/').to_string(),
            params: ClientParams {
                id: id.to_string(),
                group: group.to_string(),
            },
            http,
        })
    }

    /// Takes a slot of the group (granted again to its holder).
    pub async fn lock(&self) -> Result<Result<(), Refusal>> {
        self.call(PRE_REBOOT).await
    }

    /// Gives the slot back (granted when none is held).
    pub async fn unlock(&self) -> Result<Result<(), Refusal>> {
        self.call(STEADY_STATE).await
    }

    async fn call(&self, path: &str) -> Result<Result<(), Refusal>> {
        let url = format!("{}{path}", self.base);
        let body = serde_json::to_vec(&Request {
            client_params: self.params.clone(),
        })?;
        let mut resp = self
            .http
            .post(&url)
            .header(HEADER, "true")
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .with_context(|| format!("FleetLock server {url}: no answer"))?;
        let status = resp.status().as_u16();
        if status == 200 {
            return Ok(Ok(()));
        }
        let mut text = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .with_context(|| format!("FleetLock server {url}: the answer broke off"))?
        {
            let room = MAX_ANSWER - text.len();
            text.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if text.len() == MAX_ANSWER {
                break;
            }
        }
        let (kind, value) = match serde_json::from_slice::<ErrorBody>(&text) {
            Ok(e) => (printable(&e.kind, 64), printable(&e.value, 400)),
            Err(_) => (
                "unknown".to_string(),
                format!(
                    "an answer that is not a FleetLock error: {:?}",
                    printable(&String::from_utf8_lossy(&text), 200)
                ),
            ),
        };
        if status >= 500 {
            // The server cannot decide now (its store is down): like a
            // server that does not answer.
            anyhow::bail!(
                "FleetLock server {url}: cannot decide now: {value} (HTTP {status}, {kind})"
            );
        }
        if !(400..500).contains(&status) {
            // A redirect, or a success that is not the protocol's 200: the
            // URL points at something else. A refusal (the host waits),
            // never "unreachable" (which may apply alone).
            let why = if (300..400).contains(&status) {
                "it redirects elsewhere, and FleetLock requests are not redirected: set fleet.fleetlock to the server's own URL".to_string()
            } else {
                format!("HTTP {status} is not the protocol's 200; is fleet.fleetlock a FleetLock server?")
            };
            return Ok(Err(Refusal {
                status,
                kind: "unexpected_status".into(),
                value: why,
            }));
        }
        Ok(Err(Refusal {
            status,
            kind,
            value,
        }))
    }
}

/// `s` without control characters, cut to `max` characters: a server's
/// words go to the log and to `status` as they are otherwise.
fn printable(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_servers_words_are_cut_and_cleaned() {
        assert_eq!(printable("a\nb\x1b[31m", 10), "a b [31m");
        assert_eq!(printable("abcdef", 3), "abc…");
    }
}
