//! Sending spooled events: per webhook strictly in order, each POST
//! retried with exponential backoff until a time budget runs out (a sync
//! never waits long for a receiver); what is not delivered stays spooled
//! for the next run.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::config::{read_key, Webhook};
use super::event::signature;
use super::spool::Spool;

/// The first retry waits this long; each next one twice as long.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(4);

const USER_AGENT: &str = concat!("driftless-webhook/", env!("CARGO_PKG_VERSION"));

/// The wait before retry number `attempt` (0: the first retry).
pub fn backoff(attempt: u32) -> Duration {
    FIRST_BACKOFF
        .checked_mul(1u32.checked_shl(attempt).unwrap_or(u32::MAX))
        .unwrap_or(MAX_BACKOFF)
        .min(MAX_BACKOFF)
}

/// What a response status means for the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: delivered, remove it.
    Delivered,
    /// 4xx other than 408 and 429: the receiver will never take it.
    Permanent,
    /// Anything else (5xx, 408, 429, 3xx): try again later.
    Retry,
}

pub fn verdict(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        408 | 429 => Verdict::Retry,
        400..=499 => Verdict::Permanent,
        _ => Verdict::Retry,
    }
}

/// The URL as logged and in error messages: its scheme, host and port
/// only. The rest may be the secret: a token in the query, the key in
/// the path (Slack, Discord, Teams and ntfy webhooks carry it there), a
/// user and password (refused in the configuration, but named in that
/// very refusal).
pub fn display_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let had =
                u.query().is_some() || u.fragment().is_some() || !matches!(u.path(), "" | "/");
            u.set_query(None);
            u.set_fragment(None);
            u.set_path("");
            let credentials = !u.username().is_empty() || u.password().is_some();
            // Only a URL that cannot have them refuses these (`data:`).
            let _ = u.set_username("");
            let _ = u.set_password(None);
            let mut shown = u.to_string();
            if credentials {
                if let Some(at) = shown.find("://").map(|i| i + 3) {
                    shown.insert_str(at, "…@");
                }
            }
            if had {
                if !shown.ends_with('/') {
                    shown.push('/');
                }
                shown.push('…');
            }
            shown
        }
        Err(_) => "(not a URL)".into(),
    }
}

/// How one webhook's queue went.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub sent: usize,
    pub failed: usize,
    pub pending: usize,
}

/// Delivers `hook`'s queue in order until it is empty or `deadline`.
pub async fn deliver(spool: &Spool, hook: &Webhook, deadline: Instant) -> Delivered {
    let url = display_url(&hook.url);
    let queue = hook.queue();
    let mut out = Delivered::default();
    let entries = match spool.list(&queue) {
        Ok(e) => e,
        Err(e) => {
            warn!("webhook {url}: {e:#}");
            return out;
        }
    };
    if entries.is_empty() {
        return out;
    }
    let key = match read_key(&hook.secret_file) {
        Ok(k) => k,
        Err(e) => {
            warn!(
                "webhook {url}: {e:#}; {} event(s) stay spooled",
                entries.len()
            );
            out.pending = entries.len();
            return out;
        }
    };
    let client = match crate::effects::checks::build_client(
        USER_AGENT,
        &hook.url,
        hook.ca_file.as_deref(),
        false,
        hook.timeout,
    ) {
        Ok(c) => c,
        Err(e) => {
            warn!("webhook {url}: {e:#}; events stay spooled");
            out.pending = entries.len();
            return out;
        }
    };
    let total = entries.len();
    for (i, entry) in entries.iter().enumerate() {
        let event = match spool.read(entry) {
            Ok(e) => e,
            Err(e) => {
                // A torn or flipped file: never sent, kept for a look.
                warn!("webhook {url}: {e:#}: moved to the failed events");
                if spool.fail(&queue, entry).is_ok() {
                    out.failed += 1;
                }
                continue;
            }
        };
        let body = event.body();
        let sig = signature(&key, &body);
        let mut attempt = 0u32;
        let mut last_error;
        loop {
            let sent = client
                .post(&hook.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("X-Driftless-Event", event.event.name())
                .header("X-Driftless-Delivery", &event.idempotency_key)
                .header("X-Driftless-Signature", &sig)
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    match verdict(status) {
                        Verdict::Delivered => {
                            debug!(url = %url, event = event.event.name(), key = %event.idempotency_key, "webhook delivered");
                            if let Err(e) = spool.remove(entry) {
                                warn!("webhook {url}: delivered, but {e:#}");
                            }
                            out.sent += 1;
                            break;
                        }
                        Verdict::Permanent => {
                            let moved = spool.fail(&queue, entry);
                            warn!(
                                "webhook {url} refused the {} event {} with status {status}: not retried; kept in {}",
                                event.event.name(),
                                event.idempotency_key,
                                moved.as_ref().map_or_else(|e| format!("{e:#}"), |p| p.display().to_string())
                            );
                            out.failed += 1;
                            break;
                        }
                        Verdict::Retry => last_error = format!("status {status}"),
                    }
                }
                Err(e) => {
                    last_error = format!("{:#}", anyhow::Error::new(e.without_url()));
                }
            }
            let wait = backoff(attempt);
            attempt += 1;
            if Instant::now() + wait >= deadline {
                out.pending = total - i;
                warn!(
                    "webhook {url}: {} event(s) not delivered yet ({last_error}); they stay spooled in {} and are retried on the next run",
                    out.pending,
                    spool.path().display()
                );
                return out;
            }
            tokio::time::sleep(wait).await;
        }
    }
    if out.sent > 0 {
        info!(url = %url, sent = out.sent, "webhook events delivered");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let got: Vec<u128> = (0..8).map(|a| backoff(a).as_millis()).collect();
        assert_eq!(got, vec![250, 500, 1000, 2000, 4000, 4000, 4000, 4000]);
        assert_eq!(backoff(40), MAX_BACKOFF);
    }

    #[test]
    fn statuses() {
        assert_eq!(verdict(200), Verdict::Delivered);
        assert_eq!(verdict(204), Verdict::Delivered);
        assert_eq!(verdict(400), Verdict::Permanent);
        assert_eq!(verdict(410), Verdict::Permanent);
        assert_eq!(verdict(408), Verdict::Retry);
        assert_eq!(verdict(429), Verdict::Retry);
        assert_eq!(verdict(500), Verdict::Retry);
        assert_eq!(verdict(503), Verdict::Retry);
        assert_eq!(verdict(301), Verdict::Retry);
    }

    /// The bug this pins: the configuration's refusal of a URL with a
    /// password printed the password.
    #[test]
    fn shown_urls_lose_their_credentials() {
        assert_eq!(
            display_url("https://u:s3cret@h.example/hook"),
            "https://…@h.example/…"
        );
        assert_eq!(
            display_url("https://s3cret@h.example/hook?token=s3cret#s3cret"),
            "https://…@h.example/…"
        );
        assert_eq!(display_url("s3cret"), "(not a URL)");
    }

    /// The bug this pins: a key in the path (Slack's
    /// `/services/T…/B…/KEY`, an ntfy topic) was logged whole.
    #[test]
    fn logged_urls_keep_only_scheme_host_and_port() {
        assert_eq!(
            display_url("https://h.example/hook?token=s3cret"),
            "https://h.example/…"
        );
        assert_eq!(
            display_url("https://hooks.slack.com/services/T000/B000/s3cret"),
            "https://hooks.slack.com/…"
        );
        assert_eq!(
            display_url("http://127.0.0.1:8080/x"),
            "http://127.0.0.1:8080/…"
        );
        assert_eq!(display_url("https://h.example/"), "https://h.example/");
    }
}
