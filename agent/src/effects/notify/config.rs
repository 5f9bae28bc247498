//! `[[webhooks]]` in the agent config.
//!
//! ```toml
//! [[webhooks]]
//! url = "https://hooks.example.com/driftless"
//! secret_file = "/etc/driftless/webhook.key"   # the HMAC key; never inline
//! events = ["reverted", "degraded", "halted"]   # default: all
//! timeout = "5s"                                # per request (default 5s)
//! ca_file = "/etc/ssl/private-ca.pem"           # optional, on top of the system roots
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::event::EventKind;

/// Default per-request timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// One `[[webhooks]]` table as written: unknown keys are errors (with the
/// file, line and a did-you-mean hint, like every agent config key).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookFragment {
    pub url: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub events: Option<Vec<String>>,
    pub timeout: Option<String>,
    pub ca_file: Option<PathBuf>,
}

/// A validated webhook.
#[derive(Debug, Clone, Serialize)]
pub struct Webhook {
    pub url: String,
    /// The file holding the HMAC-SHA256 key (read at each delivery).
    pub secret_file: PathBuf,
    pub events: Vec<EventKind>,
    pub timeout: Duration,
    pub ca_file: Option<PathBuf>,
}

impl Webhook {
    /// The spool queue of this webhook: a short hash of its URL (a changed
    /// URL starts a new queue; the old queue's events are not sent to the
    /// new URL and stay in the spool).
    pub fn queue(&self) -> String {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(self.url.as_bytes())[..8])
    }

    pub fn wants(&self, kind: EventKind) -> bool {
        self.events.contains(&kind)
    }
}

/// Validates the `[[webhooks]]` list. Messages start with `webhooks` so
/// the config loader prefixes the file that set them.
pub fn validate(
    list: Vec<WebhookFragment>,
    absolute: impl Fn(PathBuf) -> PathBuf,
) -> Result<Vec<Webhook>> {
    let mut out: Vec<Webhook> = Vec::new();
    for (i, w) in list.into_iter().enumerate() {
        let n = i + 1;
        let Some(url) = w.url else {
            bail!("webhooks: webhook #{n} has no `url`: add url = \"https://…\"");
        };
        // Named in messages without its query or credentials: the URL
        // itself may carry a secret (the refusals below are about that).
        let shown = super::deliver::display_url(&url);
        let parsed = reqwest::Url::parse(&url)
            .map_err(|e| anyhow::anyhow!("webhooks: webhook #{n}: url is not a URL: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            bail!("webhooks: webhook #{n}: url {shown:?} must start with https:// (or http://)");
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            bail!(
                "webhooks: webhook #{n}: url {shown:?} carries credentials; they would end up in logs: use secret_file (the HMAC key) instead"
            );
        }
        if out.iter().any(|o| o.url == url) {
            bail!("webhooks: url {shown:?} is configured twice: merge the two tables");
        }
        let Some(secret_file) = w.secret_file else {
            bail!(
                "webhooks: webhook #{n} ({shown}) has no `secret_file`: every delivery is signed with an HMAC key read from a file (e.g. secret_file = \"/etc/driftless/webhook.key\", mode 0600)"
            );
        };
        let events = match w.events {
            None => EventKind::ALL.to_vec(),
            Some(names) => {
                let mut kinds = Vec::new();
                for name in names {
                    let Some(k) = EventKind::parse(&name) else {
                        let all: Vec<&str> = EventKind::ALL.iter().map(|k| k.name()).collect();
                        let hint = crate::desired::toml_file::closest(&name, &all)
                            .map(|c| format!(" (did you mean {c:?}?)"))
                            .unwrap_or_default();
                        bail!(
                            "webhooks: webhook #{n} ({shown}): event {name:?} is not an event{hint}; events are {}",
                            all.join(", ")
                        );
                    };
                    if !kinds.contains(&k) {
                        kinds.push(k);
                    }
                }
                if kinds.is_empty() {
                    bail!("webhooks: webhook #{n} ({shown}): events is empty; leave it out for all events");
                }
                kinds
            }
        };
        let timeout = match w.timeout {
            None => DEFAULT_TIMEOUT,
            Some(t) => crate::desired::spec::parse_duration(&t)
                .map_err(|e| anyhow::anyhow!("webhooks: webhook #{n} ({shown}): timeout: {e}"))?,
        };
        if timeout.is_zero() {
            bail!("webhooks: webhook #{n} ({shown}): timeout must be larger than 0");
        }
        out.push(Webhook {
            url,
            secret_file: absolute(secret_file),
            events,
            timeout,
            ca_file: w.ca_file.map(&absolute),
        });
    }
    Ok(out)
}

/// Reads a webhook's HMAC key. Refused when others may read it (anyone on
/// the host could forge deliveries); its group reading it is warned about.
pub fn read_key(path: &Path) -> Result<Vec<u8>> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot read the webhook key {} (secret_file): {e}; create it with e.g. `head -c 32 /dev/urandom | base64 > {0}; chmod 600 {0}`",
                path.display()
            )
        })?;
    let meta = f
        .metadata()
        .map_err(|e| anyhow::anyhow!("cannot read the webhook key {}: {e}", path.display()))?;
    if !meta.is_file() {
        bail!(
            "the webhook key {} (secret_file) is not a regular file",
            path.display()
        );
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        bail!(
            "refusing the webhook key {} (secret_file): it is readable by everyone (mode {mode:04o}), who could forge deliveries; run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    if mode & 0o070 != 0 {
        tracing::warn!(
            "the webhook key {} is readable by its group (mode {mode:04o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    let mut key = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(&f, 64 * 1024), &mut key)
        .map_err(|e| anyhow::anyhow!("cannot read the webhook key {}: {e}", path.display()))?;
    // A trailing newline from `echo` or an editor is not part of the key.
    while key.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        key.pop();
    }
    if key.is_empty() {
        bail!(
            "the webhook key {} (secret_file) is empty; put a random key in it",
            path.display()
        );
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Webhook>> {
        let f: crate::config::Fragment =
            crate::desired::toml_file::parse("agent.toml", text).map_err(anyhow::Error::msg)?;
        validate(f.webhooks.unwrap_or_default(), |p| p)
    }

    #[test]
    fn defaults_to_every_event_and_5s() {
        let w =
            parse("[[webhooks]]\nurl = \"https://h.example/x\"\nsecret_file = \"/k\"\n").unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].events, EventKind::ALL.to_vec());
        assert_eq!(w[0].timeout, DEFAULT_TIMEOUT);
        assert_eq!(w[0].queue().len(), 16);
    }

    #[test]
    fn unknown_key_names_the_file_and_the_key() {
        let err = parse("[[webhooks]]\nurl = \"https://h/x\"\nsecret = \"inline\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("agent.toml:3:1"), "{err}");
        assert!(err.contains("unknown field `secret`"), "{err}");
        let err = parse("[[webhooks]]\nurl = \"https://h/x\"\nsecret_fiel = \"/k\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("did you mean `secret_file`?"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = parse("[[webhooks]]\nurl = \"https://h/x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("webhooks: ") && err.contains("secret_file"),
            "{err}"
        );
        let err = parse("[[webhooks]]\nurl = \"ftp://h/x\"\nsecret_file = \"/k\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("https://"), "{err}");
        let err = parse(
            "[[webhooks]]\nurl = \"https://h/x\"\nsecret_file = \"/k\"\nevents = [\"reverteed\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("did you mean \"reverted\"?"), "{err}");
        let err = parse("[[webhooks]]\nurl = \"https://u:p@h/x\"\nsecret_file = \"/k\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("credentials"), "{err}");
    }

    /// The bug this pins: the refusal of a URL with a password, and every
    /// other message about a webhook, quoted the URL whole, password and
    /// query token included, into stderr and the journal.
    #[test]
    fn errors_about_a_webhook_never_quote_its_credentials_or_query() {
        for toml in [
            "[[webhooks]]\nurl = \"https://u:s3cret@h/x\"\nsecret_file = \"/k\"\n",
            "[[webhooks]]\nurl = \"https://h/x?token=s3cret\"\nsecret_file = \"/k\"\nevents = [\"nope\"]\n",
            "[[webhooks]]\nurl = \"https://h/x?token=s3cret\"\n",
            "[[webhooks]]\nurl = \"https://h/x?token=s3cret\"\nsecret_file = \"/k\"\ntimeout = \"0s\"\n",
            "[[webhooks]]\nurl = \"https://h/x?token=s3cret\"\nsecret_file = \"/k\"\n\
             [[webhooks]]\nurl = \"https://h/x?token=s3cret\"\nsecret_file = \"/k\"\n",
            "[[webhooks]]\nurl = \"ftp://u:s3cret@h/x\"\nsecret_file = \"/k\"\n",
            "[[webhooks]]\nurl = \"https://u:s3cret@h:99999/x\"\nsecret_file = \"/k\"\n",
        ] {
            let err = format!("{:#}", parse(toml).unwrap_err());
            assert!(err.starts_with("webhooks"), "{err}");
            assert!(!err.contains("s3cret"), "leaked: {err}");
        }
    }

    #[test]
    fn a_key_readable_by_everyone_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("webhook.key");
        std::fs::write(&k, "s3cret\n").unwrap();
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = format!("{:#}", read_key(&k).unwrap_err());
        assert!(
            err.contains("readable by everyone") && err.contains("chmod 600"),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_key(&k).unwrap(), b"s3cret");
    }
}
