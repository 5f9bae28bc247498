//! age identities: the private keys that can open a sops file's data key.
//!
//! Sources, all collected together like sops does (every identity is tried
//! on every recipient stanza):
//!
//! * a keys file (`age-keygen` output): `AGE-SECRET-KEY-1…` identities, one
//!   or more per line, `#` comment lines ([`Identities::from_keys_file`]);
//! * the text of `SOPS_AGE_KEY` (same syntax, [`Identities::from_keys_text`]);
//! * the sops environment conventions as explicit input
//!   ([`Identities::from_sops_env`]): `SOPS_AGE_KEY`, `SOPS_AGE_KEY_FILE`,
//!   the default `$XDG_CONFIG_HOME/sops/age/keys.txt`,
//!   `SOPS_AGE_SSH_PRIVATE_KEY_FILE`, `~/.ssh/id_ed25519` and `~/.ssh/id_rsa`;
//! * an OpenSSH private key ([`Identities::from_ssh_private_key`]), typically
//!   the host key `/etc/ssh/ssh_host_ed25519_key`. It opens stanzas encrypted
//!   to its `ssh-ed25519`/`ssh-rsa` public key (sops accepts those as age
//!   recipients), and an ed25519 key also yields the X25519 identity that
//!   `ssh-to-age` derives from it, so files encrypted to the converted
//!   `age1…` recipient (the sops-nix convention) open too. A host therefore
//!   decrypts secrets with the key it already has.
//!
//! Post-quantum (`AGE-SECRET-KEY-PQ-1…`) and plugin identities are recognised
//! but not usable with the age crate used here; they are listed in errors
//! instead of being silently dropped. Secret key material is only held by
//! the age types (which zeroize) and by [`Zeroizing`] buffers while reading.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha512};
use zeroize::Zeroizing;

use super::error::{ErrorKind, SecretError};
use super::openssh;

#[derive(Clone)]
enum Key {
    X25519(age::x25519::Identity),
    Ssh(age::ssh::Identity),
}

#[derive(Clone)]
struct Entry {
    key: Key,
    /// The public recipient string this identity opens (`age1…`,
    /// `ssh-ed25519 AAAA…`).
    recipient: String,
    /// Where it came from (a path, `SOPS_AGE_KEY`), for messages.
    origin: String,
}

/// A set of age identities. `Debug` shows only origins and public
/// recipients.
#[derive(Clone, Default)]
pub struct Identities {
    entries: Vec<Entry>,
    /// Identities that were recognised but cannot be used here, described.
    unusable: Vec<String>,
}

impl fmt::Debug for Identities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identities")
            .field(
                "identities",
                &self
                    .entries
                    .iter()
                    .map(|e| format!("{} ({})", e.recipient, e.origin))
                    .collect::<Vec<_>>(),
            )
            .field("unusable", &self.unusable)
            .finish()
    }
}

fn identity_error(origin: &str, msg: impl Into<String>) -> SecretError {
    SecretError::new(origin, ErrorKind::Identity(msg.into()))
}

fn read_secret_file(path: &Path) -> Result<Zeroizing<String>, SecretError> {
    let origin = path.display().to_string();
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| {
        SecretError::new(
            &origin,
            ErrorKind::Io(format!("cannot read the key file: {e}")),
        )
    })?);
    match std::str::from_utf8(&bytes) {
        Ok(s) => Ok(Zeroizing::new(s.to_string())),
        Err(_) => Err(identity_error(&origin, "the key file is not UTF-8 text")),
    }
}

impl Identities {
    /// No identities.
    pub fn new() -> Identities {
        Identities::default()
    }

    /// Parses age identities from keys-file text: lines starting with `#`
    /// and blank lines are skipped, every other line holds one or more
    /// whitespace-separated `AGE-SECRET-KEY-1…` identities. `origin` names
    /// the source in messages (a path, `SOPS_AGE_KEY`). An invalid line is an
    /// error that gives its number, never its content.
    pub fn from_keys_text(text: &str, origin: &str) -> Result<Identities, SecretError> {
        let trimmed = text.trim_start();
        if trimmed.starts_with("age-encryption.org/")
            || trimmed.starts_with("-----BEGIN AGE ENCRYPTED FILE-----")
        {
            return Err(identity_error(
                origin,
                "this is a passphrase-protected age identity file, which cannot be used \
                 unattended; decrypt it with `age -d` into a root-only file and use that",
            ));
        }
        let mut out = Identities::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            for token in line.split_whitespace() {
                let upper = token.to_ascii_uppercase();
                if upper.starts_with("AGE-SECRET-KEY-PQ-1") {
                    out.unusable.push(format!(
                        "post-quantum identity on line {} of {origin} (not supported yet)",
                        n + 1
                    ));
                } else if upper.starts_with("AGE-PLUGIN-") {
                    out.unusable.push(format!(
                        "plugin identity on line {} of {origin} (plugins are not supported)",
                        n + 1
                    ));
                } else if upper.starts_with("AGE-SECRET-KEY-1") {
                    let id: age::x25519::Identity = token.parse().map_err(|_| {
                        identity_error(
                            origin,
                            format!(
                                "line {} is not a valid age identity (bad checksum or length)",
                                n + 1
                            ),
                        )
                    })?;
                    out.push_x25519(id, origin.to_string());
                } else {
                    return Err(identity_error(
                        origin,
                        format!(
                            "line {} is not an age identity (expected `AGE-SECRET-KEY-1…` or a \
                             `#` comment)",
                            n + 1
                        ),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// Reads a keys file (see [`Identities::from_keys_text`]).
    pub fn from_keys_file(path: &Path) -> Result<Identities, SecretError> {
        let text = read_secret_file(path)?;
        Identities::from_keys_text(&text, &path.display().to_string())
    }

    /// Reads an OpenSSH private key (ed25519 or rsa, unencrypted; PEM
    /// `BEGIN RSA PRIVATE KEY` also works), e.g. `/etc/ssh/ssh_host_ed25519_key`.
    /// An ed25519 key also contributes its `ssh-to-age` X25519 identity.
    pub fn from_ssh_private_key(path: &Path) -> Result<Identities, SecretError> {
        let text = read_secret_file(path)?;
        Identities::from_ssh_private_key_text(&text, &path.display().to_string())
    }

    /// [`Identities::from_ssh_private_key`] on the key's text.
    pub fn from_ssh_private_key_text(text: &str, origin: &str) -> Result<Identities, SecretError> {
        let parsed = age::ssh::Identity::from_buffer(text.as_bytes(), Some(origin.to_string()))
            .map_err(|_| {
                identity_error(
                    origin,
                    "not an OpenSSH private key that age can use (expected an unencrypted \
                     ed25519 or rsa key)",
                )
            })?;
        match &parsed {
            age::ssh::Identity::Unencrypted(_) => {}
            age::ssh::Identity::Encrypted(_) => {
                return Err(identity_error(
                    origin,
                    "the SSH key is passphrase-protected and cannot be used unattended; use \
                     the host key or an unencrypted deploy key",
                ))
            }
            age::ssh::Identity::Unsupported(kind) => {
                return Err(identity_error(
                    origin,
                    format!("unsupported SSH key ({kind:?}); use an ed25519 or rsa key"),
                ))
            }
        }
        let info = openssh::inspect(text)
            .ok_or_else(|| identity_error(origin, "cannot read the public half of the SSH key"))?;
        let mut out = Identities::new();
        out.entries.push(Entry {
            key: Key::Ssh(parsed),
            recipient: info.recipient,
            origin: origin.to_string(),
        });
        if let Some(seed) = info.ed25519_seed {
            // ssh-to-age: X25519 secret = SHA-512(ed25519 seed)[..32].
            let digest = Zeroizing::new(Sha512::digest(&seed[..]));
            let x25519 = x25519_from_bytes(&digest[..32], origin)?;
            out.push_x25519(x25519, format!("{origin} (converted like ssh-to-age)"));
        }
        Ok(out)
    }

    /// Collects identities the way the `sops` command line does, from an
    /// explicit environment lookup (pass `|k| std::env::var_os(k)` for the
    /// real environment): `SOPS_AGE_KEY`, `SOPS_AGE_KEY_FILE`, the default
    /// keys file `$XDG_CONFIG_HOME/sops/age/keys.txt` (else
    /// `$HOME/.config/sops/age/keys.txt`) if it exists,
    /// `SOPS_AGE_SSH_PRIVATE_KEY_FILE`, else `$HOME/.ssh/id_ed25519` and
    /// `$HOME/.ssh/id_rsa` if they exist and are usable. `SOPS_AGE_KEY_CMD` is
    /// not supported (it would run a command).
    pub fn from_sops_env(
        lookup: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Identities, SecretError> {
        let mut out = Identities::new();
        if let Some(v) = lookup("SOPS_AGE_KEY") {
            let text = Zeroizing::new(v.to_string_lossy().into_owned());
            out.extend(Identities::from_keys_text(&text, "SOPS_AGE_KEY")?);
        }
        if let Some(path) = lookup("SOPS_AGE_KEY_FILE") {
            out.extend(Identities::from_keys_file(Path::new(&path))?);
        }
        let home = lookup("HOME").map(PathBuf::from);
        let config_dir = lookup("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".config")));
        if let Some(dir) = config_dir {
            let default = dir.join("sops/age/keys.txt");
            if default.is_file() {
                out.extend(Identities::from_keys_file(&default)?);
            }
        }
        if let Some(path) = lookup("SOPS_AGE_SSH_PRIVATE_KEY_FILE") {
            out.extend(Identities::from_ssh_private_key(Path::new(&path))?);
        } else if let Some(home) = home {
            for name in [".ssh/id_ed25519", ".ssh/id_rsa"] {
                let path = home.join(name);
                if path.is_file() {
                    match Identities::from_ssh_private_key(&path) {
                        Ok(ids) => out.extend(ids),
                        Err(e) => out.unusable.push(e.to_string()),
                    }
                }
            }
        }
        Ok(out)
    }

    /// Adds all identities of `other`.
    pub fn extend(&mut self, other: Identities) {
        self.entries.extend(other.entries);
        self.unusable.extend(other.unusable);
    }

    /// True if there is no usable identity.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of usable identities.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The public recipients of the usable identities, in order, without
    /// duplicates.
    pub fn recipients(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for e in &self.entries {
            if !out.contains(&e.recipient) {
                out.push(e.recipient.clone());
            }
        }
        out
    }

    /// Identities that were found but cannot be used, described.
    pub fn unusable(&self) -> &[String] {
        &self.unusable
    }

    fn push_x25519(&mut self, id: age::x25519::Identity, origin: String) {
        let recipient = id.to_public().to_string();
        self.entries.push(Entry {
            key: Key::X25519(id),
            recipient,
            origin,
        });
    }

    /// Decrypts an armored (or binary) age file with these identities.
    /// `Ok(None)`: none of the identities matches a stanza.
    pub(crate) fn decrypt_age(&self, armored: &str) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
        use std::io::Read;
        let reader = age::armor::ArmoredReader::new(armored.as_bytes());
        let decryptor =
            age::Decryptor::new_buffered(reader).map_err(|e| format!("not an age file: {e}"))?;
        let ids = self.entries.iter().map(|e| match &e.key {
            Key::X25519(k) => k as &dyn age::Identity,
            Key::Ssh(k) => k as &dyn age::Identity,
        });
        match decryptor.decrypt(ids) {
            Ok(mut r) => {
                let mut out = Zeroizing::new(Vec::new());
                r.read_to_end(&mut out)
                    .map_err(|e| format!("the age payload is corrupt: {e}"))?;
                Ok(Some(out))
            }
            Err(age::DecryptError::NoMatchingKeys) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// An age X25519 identity from 32 raw secret bytes (bech32
/// `AGE-SECRET-KEY-1…`, the only constructor the age crate offers).
fn x25519_from_bytes(bytes: &[u8], origin: &str) -> Result<age::x25519::Identity, SecretError> {
    let hrp = bech32::Hrp::parse("age-secret-key-")
        .map_err(|_| identity_error(origin, "internal error: bech32 prefix"))?;
    let encoded = Zeroizing::new(
        bech32::encode::<bech32::Bech32>(hrp, bytes)
            .map_err(|_| identity_error(origin, "internal error: bech32 encoding"))?
            .to_uppercase(),
    );
    encoded
        .parse()
        .map_err(|_| identity_error(origin, "cannot convert the ed25519 key to an age key"))
}

/// The age recipient strings of a set of identities, for `driftless
/// host-recipient`: for an SSH host key both the `ssh-ed25519 AAAA…` line and
/// the `age1…` recipient `ssh-to-age` derives from it.
pub fn recipients(ids: &Identities) -> Vec<String> {
    ids.recipients()
}
