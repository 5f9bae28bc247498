//! What a webhook receives: the event, its JSON body, its idempotency key
//! and the signature. Pure.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The events a webhook can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A new commit was applied (files switched in, actions and checks passed).
    Applied,
    /// A commit failed its unit actions or checks and was reverted.
    Reverted,
    /// The revert failed its checks too.
    Degraded,
    /// A commit or bundle was refused (signature, history, invalid repository).
    Refused,
    /// Files changed on the host were rewritten, without a new commit.
    DriftRepaired,
    /// The agent is halted and refuses to touch the host until `--retry`.
    Halted,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = [
        EventKind::Applied,
        EventKind::Reverted,
        EventKind::Degraded,
        EventKind::Refused,
        EventKind::DriftRepaired,
        EventKind::Halted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EventKind::Applied => "applied",
            EventKind::Reverted => "reverted",
            EventKind::Degraded => "degraded",
            EventKind::Refused => "refused",
            EventKind::DriftRepaired => "drift_repaired",
            EventKind::Halted => "halted",
        }
    }

    pub fn parse(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// One event, as spooled and sent (the body is this, as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub host: String,
    pub event: EventKind,
    /// The commit the event is about (applied, reverted…); none when the
    /// run did not get that far.
    pub commit: Option<String>,
    /// One line about the outcome (counts, or the run's error message,
    /// which never holds rendered content).
    pub summary: String,
    /// Names of the health checks that failed.
    #[serde(default)]
    pub failing_checks: Vec<String>,
    /// Managed files rewritten because they had changed on the host.
    #[serde(default)]
    pub drifted: Vec<String>,
    /// The transaction, when files were switched in.
    pub txid: Option<String>,
    /// Unix seconds, and the same as RFC 3339 (UTC).
    pub time: i64,
    pub timestamp: String,
    pub agent_version: String,
    /// Stable per event: a receiver that sees it twice (a retry after a
    /// lost response) drops the second.
    pub idempotency_key: String,
}

impl Event {
    /// An event of this host now; the idempotency key is made from the
    /// host, the event and `id` (the txid, else the commit, else what the
    /// caller makes stable, e.g. the halt's time).
    pub fn new(host: &str, kind: EventKind, time: i64, id: &str) -> Event {
        Event {
            host: host.to_string(),
            event: kind,
            commit: None,
            summary: String::new(),
            failing_checks: Vec::new(),
            drifted: Vec::new(),
            txid: None,
            time,
            timestamp: crate::time::time_str(time),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            idempotency_key: idempotency_key(host, kind, id),
        }
    }

    /// The exact bytes sent (compact JSON).
    pub fn body(&self) -> Vec<u8> {
        // Serialising plain strings, numbers and lists cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// `host:event:id`; `id` is the txid, commit, or another stable name of
/// the occurrence.
pub fn idempotency_key(host: &str, kind: EventKind, id: &str) -> String {
    format!("{host}:{}:{id}", kind.name())
}

/// The `X-Driftless-Signature` value: `sha256=` and the hex HMAC-SHA256 of
/// the body under `key`.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The names of failed checks in a post-apply failure message (`check
/// "NAME" failed after N attempt(s): …`, joined by `; `).
pub fn failing_checks(message: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = message;
    while let Some(i) = rest.find("check \"") {
        let after = &rest[i + 7..];
        // The name is Rust-debug-quoted: find the closing quote not
        // preceded by a backslash.
        let mut end = None;
        let mut escaped = false;
        for (j, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = Some(j);
                    break;
                }
                _ => escaped = false,
            }
        }
        let Some(end) = end else { break };
        let tail = &after[end + 1..];
        if tail.starts_with(" failed") {
            let name = after[..end].replace("\\\"", "\"").replace("\\\\", "\\");
            if !out.contains(&name) {
                out.push(name);
            }
        }
        rest = tail;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_serde() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.name()), Some(k));
            assert_eq!(
                serde_json::to_value(k).unwrap(),
                serde_json::Value::String(k.name().into())
            );
        }
    }

    #[test]
    fn body_carries_every_field() {
        let mut e = Event::new("web1", EventKind::Reverted, 1_700_000_000, "tx-1");
        e.commit = Some("abc".into());
        e.summary = "commit abc was reverted".into();
        e.failing_checks = vec!["app".into()];
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["host"], "web1");
        assert_eq!(v["event"], "reverted");
        assert_eq!(v["commit"], "abc");
        assert_eq!(v["summary"], "commit abc was reverted");
        assert_eq!(v["failing_checks"][0], "app");
        assert_eq!(v["time"], 1_700_000_000);
        assert_eq!(v["timestamp"], "2023-11-14T22:13:20Z");
        assert_eq!(v["agent_version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(v["idempotency_key"], "web1:reverted:tx-1");
        // The body read back is the same event, byte for byte.
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(back.body(), e.body());
    }

    /// RFC 4231 test case 2 for HMAC-SHA256.
    #[test]
    fn signature_is_hmac_sha256_hex() {
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_ne!(signature(b"k1", b"x"), signature(b"k2", b"x"));
    }

    #[test]
    fn failing_check_names_are_read_from_the_failure() {
        let m = "check \"app config is good\" failed after 2 attempt(s): exit 1; \
                 check \"say \\\"hi\\\"\" failed after 1 attempt(s): timeout";
        assert_eq!(failing_checks(m), vec!["app config is good", "say \"hi\""]);
        assert!(failing_checks("unit nginx.service failed to restart").is_empty());
    }
}
