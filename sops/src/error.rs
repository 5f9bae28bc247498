//! Errors of the secrets module.
//!
//! Every error names the file (the repository path the caller passed in), the
//! key path when there is one (`db.password`, `servers[0]`), what went wrong,
//! and what to do about it. No error ever carries a plaintext value, a
//! decrypted comment, a data key or the computed MAC: the MAC is an unkeyed
//! SHA-512 over the plaintext values, so printing it would let anyone
//! brute-force a short secret offline. Parser messages never quote file
//! content either (a non-sops file may hold secrets in clear).

use std::fmt;

/// What went wrong; see [`SecretError::kind`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Reading a key file failed.
    Io(String),
    /// An identity source (keys file, SSH key) is unusable.
    Identity(String),
    /// No identity was given at all.
    NoIdentities,
    /// The file cannot be parsed as its store.
    Parse {
        store: &'static str,
        line: Option<usize>,
        detail: String,
        /// The input ended in the middle of a construct.
        truncated: bool,
    },
    /// The file parses but has no `sops` metadata.
    NotSops,
    /// The `sops` metadata is invalid.
    Metadata(String),
    /// None of the identities opens any recipient of the file.
    NoMatchingKey {
        /// The file's age recipients (`age1…`, `ssh-ed25519 …`).
        recipients: Vec<String>,
        /// Other master keys of the file (pgp, kms, …), described.
        other_keys: Vec<String>,
        /// The recipients of the identities that were tried.
        tried: Vec<String>,
    },
    /// Key groups: fewer groups could be opened than the threshold needs.
    KeyGroups {
        needed: usize,
        opened: usize,
        groups: usize,
    },
    /// The unwrapped data key is unusable (wrong length, bad Shamir shares).
    DataKey(String),
    /// A value failed AES-GCM authentication.
    Tampered,
    /// The MAC does not match the values.
    MacMismatch,
    /// The file has no MAC.
    MacMissing,
    /// The MAC itself cannot be decrypted.
    MacUnreadable(String),
    /// An `ENC[...]` value names a type this reader does not know.
    UnknownType(String),
    /// An `ENC[...]` value is malformed.
    MalformedEnc(String),
    /// A field of an `ENC[...]` value is not valid base64.
    InvalidBase64(&'static str),
    /// A decrypted value does not fit its declared type.
    BadPlaintext(String),
    /// A value the crypt rule says is encrypted is not an `ENC[...]` string.
    NotEncrypted(String),
    /// The store cannot be used for this (unknown name, or the tree does not
    /// fit the output format).
    UnsupportedStore(String),
    /// [`super::Decrypted::get`]: the key path does not exist or is invalid.
    KeyNotFound(String),
}

/// An error of the secrets module. `Display` is a complete sentence for an
/// operator; [`SecretError::kind`] is for code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretError {
    file: String,
    key: Option<String>,
    kind: ErrorKind,
}

impl SecretError {
    pub(crate) fn new(file: &str, kind: ErrorKind) -> SecretError {
        SecretError {
            file: file.to_string(),
            key: None,
            kind,
        }
    }

    pub(crate) fn at(file: &str, key: impl Into<String>, kind: ErrorKind) -> SecretError {
        SecretError {
            file: file.to_string(),
            key: Some(key.into()),
            kind,
        }
    }

    /// The file the error is about (as the caller named it).
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The key path inside the file, if the error is about one value.
    pub fn key_path(&self) -> Option<&str> {
        self.key.as_deref()
    }

    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }
}

/// A bare [`ErrorKind`] raised deep inside, completed with the file name (and
/// maybe the key path) on the way out.
#[derive(Debug)]
pub(crate) struct Raw {
    pub kind: ErrorKind,
    pub key: Option<String>,
}

impl Raw {
    pub(crate) fn into_error(self, file: &str) -> SecretError {
        SecretError {
            file: file.to_string(),
            key: self.key,
            kind: self.kind,
        }
    }
}

impl From<ErrorKind> for Raw {
    fn from(kind: ErrorKind) -> Raw {
        Raw { kind, key: None }
    }
}

pub(crate) fn raw_at(key: impl Into<String>, kind: ErrorKind) -> Raw {
    Raw {
        kind,
        key: Some(key.into()),
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

impl fmt::Display for SecretError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(key) = &self.key {
            if key.is_empty() {
                write!(f, " (document root)")?;
            } else {
                write!(f, " (key `{key}`)")?;
            }
        }
        f.write_str(": ")?;
        match &self.kind {
            ErrorKind::Io(d) => write!(f, "{d}"),
            ErrorKind::Identity(d) => write!(f, "{d}"),
            ErrorKind::NoIdentities => write!(
                f,
                "no age identity is available to decrypt it; give a keys file \
                 (AGE-SECRET-KEY-1… lines) or the host's SSH key"
            ),
            ErrorKind::Parse {
                store,
                line,
                detail,
                truncated,
            } => {
                write!(f, "not a valid {store} file")?;
                if let Some(line) = line {
                    write!(f, " (line {line})")?;
                }
                write!(f, ": {detail}")?;
                if *truncated {
                    write!(
                        f,
                        "; the file ends in the middle of a value, so it looks truncated: \
                         restore it from git"
                    )?;
                }
                Ok(())
            }
            ErrorKind::NotSops => write!(
                f,
                "not a sops-encrypted file (no `sops` metadata found); encrypt it with \
                 `sops --encrypt --age <recipient>` or point to the encrypted file"
            ),
            ErrorKind::Metadata(d) => write!(
                f,
                "invalid sops metadata: {d}; re-encrypt the file with sops"
            ),
            ErrorKind::NoMatchingKey {
                recipients,
                other_keys,
                tried,
            } => {
                write!(
                    f,
                    "none of the available identities can decrypt the data key. The file is \
                     encrypted to the age recipients [{}]",
                    list(recipients)
                )?;
                if !other_keys.is_empty() {
                    write!(f, " and to [{}] (not usable here)", list(other_keys))?;
                }
                write!(
                    f,
                    "; the identities tried are [{}]. Add this host's recipient to the file \
                     (`sops updatekeys` after editing .sops.yaml, or `sops -r -i --add-age <recipient>`) \
                     or give the matching key",
                    list(tried)
                )
            }
            ErrorKind::KeyGroups {
                needed,
                opened,
                groups,
            } => write!(
                f,
                "the data key is split over {groups} key groups and {needed} are needed, but the \
                 available identities open only {opened}; give keys for more groups"
            ),
            ErrorKind::DataKey(d) => write!(
                f,
                "the recovered data key is unusable ({d}); the file's key stanzas are corrupt: \
                 restore it from git or re-encrypt it"
            ),
            ErrorKind::Tampered => write!(
                f,
                "the value does not authenticate (AES-GCM tag mismatch): the ciphertext, its \
                 key path or the data key was changed. Restore the file from git history or \
                 re-encrypt it with sops"
            ),
            ErrorKind::MacMismatch => write!(
                f,
                "MAC mismatch: the values do not match the file's MAC, so values were changed, \
                 added, removed or reordered outside sops. Restore the file from git history, \
                 or re-encrypt the intended content with sops"
            ),
            ErrorKind::MacMissing => write!(
                f,
                "the file has no MAC, so its integrity cannot be verified and it is refused; \
                 re-encrypt it with a current sops (`sops -d` then `sops -e`)"
            ),
            ErrorKind::MacUnreadable(d) => write!(
                f,
                "the MAC cannot be decrypted ({d}); the metadata was tampered with or \
                 `lastmodified` was edited: restore the file from git history"
            ),
            ErrorKind::UnknownType(t) => write!(
                f,
                "the encrypted value has unknown type `{t}` (known: str, int, float, bool, bytes, \
                 time, comment); the file was written by an unsupported sops version or edited \
                 by hand"
            ),
            ErrorKind::MalformedEnc(d) => write!(
                f,
                "malformed encrypted value ({d}); expected \
                 `ENC[AES256_GCM,data:…,iv:…,tag:…,type:…]`. Restore the value from git history"
            ),
            ErrorKind::InvalidBase64(field) => write!(
                f,
                "the `{field}` field of the encrypted value is not valid base64; restore the \
                 value from git history"
            ),
            ErrorKind::BadPlaintext(d) => write!(
                f,
                "the decrypted value does not match its declared type ({d}); re-encrypt the file \
                 with sops"
            ),
            ErrorKind::NotEncrypted(d) => write!(
                f,
                "{d}; sops encrypts this key, so the value was edited by hand. Re-encrypt the \
                 file with sops"
            ),
            ErrorKind::UnsupportedStore(d) => write!(f, "{d}"),
            ErrorKind::KeyNotFound(d) => write!(f, "{d}"),
        }
    }
}

impl std::error::Error for SecretError {}
