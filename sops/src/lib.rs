//! SOPS secrets: decrypt files written by the real `sops` tool, with age
//! keys, in-process (no `sops` binary at run time).
//!
//! # Why it is built this way
//!
//! Users keep secrets in git as sops files; driftless must read exactly those
//! files, byte-compatible with sops, and must never be the weak link: a value
//! that does not authenticate, a MAC that does not match or is missing, or a
//! file that is not sops at all is an error, never a silent fallback. The
//! format is described rule by rule in `shared/SOPS-FORMAT.md`; each
//! submodule documents the rules it implements:
//!
//! * `format` — the five stores (YAML, JSON, dotenv, INI, binary): parsers
//!   into one ordered tree (`tree`) and emitters out of it;
//! * `metadata` — the `sops` metadata, including flattened dotenv/INI form;
//! * `keys` — age identities (keys files, SSH host keys);
//! * `shamir` — key groups with a threshold;
//! * `crypt` — one `ENC[...]` value: AES-256-GCM with 32-byte nonces;
//! * `walk` — crypt rules, AAD, and the MAC.
//!
//! # Handling plaintext
//!
//! Decrypted values live in [`zeroize::Zeroizing`] buffers inside
//! [`Decrypted`], which wipes the whole tree (numbers included) when
//! dropped; emitted files are [`secrecy`] boxes. `Debug` of every type here is
//! redacted, and no error message contains a value, a decrypted comment, a
//! data key or the computed MAC (an unkeyed hash of the plaintext).
//! [`Decrypted::to_json`] and [`SecretValue::to_json`] exist for the call
//! sites that print or render on purpose (`driftless secrets decrypt`,
//! template functions); they return ordinary `serde_json` values.
//!
//! # Example
//!
//! ```ignore
//! let ids = Identities::from_keys_file(Path::new("/etc/driftless/age.key"))?;
//! let file = decrypt("secrets/db.yaml", &bytes, Store::from_path("secrets/db.yaml"), &ids)?;
//! let password = file.get("db.password")?.expose_text()?;
//! ```

mod crypt;
mod error;
mod format;
mod gocompat;
mod keys;
mod metadata;
mod openssh;
mod shamir;
mod tree;
mod walk;

#[cfg(test)]
mod testenc;
#[cfg(test)]
mod tests;

use std::fmt;

use base64::Engine;
use secrecy::{SecretBox, SecretString};
use zeroize::{Zeroize, Zeroizing};

pub use error::{ErrorKind, SecretError};
pub use keys::{recipients, Identities};

use error::Raw;
use metadata::Metadata;
use tree::{display_path, parse_path, Entry, Node, PathElem, Scalar};

/// Plaintext bytes (an emitted file, a raw value). `Debug` is redacted; use
/// [`secrecy::ExposeSecret`] to read.
pub type SecretBytes = secrecy::SecretSlice<u8>;

/// The sops stores (file formats).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Store {
    Yaml,
    Json,
    Dotenv,
    Ini,
    /// Any other file: the encrypted file is JSON holding the whole
    /// plaintext as one value; decrypted output is the raw bytes.
    Binary,
}

impl Store {
    /// The store sops picks for a path: `.yaml`/`.yml`, `.json`, `.env`,
    /// `.ini` (case-sensitive suffixes, as in sops), anything else binary.
    pub fn from_path(path: &str) -> Store {
        if path.ends_with(".yaml") || path.ends_with(".yml") {
            Store::Yaml
        } else if path.ends_with(".json") {
            Store::Json
        } else if path.ends_with(".env") {
            Store::Dotenv
        } else if path.ends_with(".ini") {
            Store::Ini
        } else {
            Store::Binary
        }
    }

    /// A store by name, for `--input-type`/`--format` options: `yaml`
    /// (`yml`), `json`, `dotenv` (`env`), `ini`, `binary` (`raw`). Other
    /// sops formats (`toml`) and unknown names are an error.
    pub fn from_name(name: &str) -> Result<Store, SecretError> {
        match name {
            "yaml" | "yml" => Ok(Store::Yaml),
            "json" => Ok(Store::Json),
            "dotenv" | "env" => Ok(Store::Dotenv),
            "ini" => Ok(Store::Ini),
            "binary" | "raw" => Ok(Store::Binary),
            other => Err(SecretError::new(
                other,
                ErrorKind::UnsupportedStore(
                    "unsupported store; use one of yaml, json, dotenv, ini, binary (raw)".into(),
                ),
            )),
        }
    }

    /// The name [`Store::from_name`] accepts.
    pub fn name(self) -> &'static str {
        match self {
            Store::Yaml => "yaml",
            Store::Json => "json",
            Store::Dotenv => "dotenv",
            Store::Ini => "ini",
            Store::Binary => "binary",
        }
    }
}

impl fmt::Display for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What [`check`] (and [`Decrypted::report`]) found, without any value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckReport {
    pub store: Store,
    /// The sops version that wrote the file, if recorded.
    pub sops_version: Option<String>,
    /// `lastmodified` as written in the file.
    pub last_modified: String,
    /// The recipients whose stanza opened the data key (one per key group
    /// used), or `data key` when it was given directly.
    pub opened_with: Vec<String>,
    /// Values that were encrypted / stored in clear (empty strings count as
    /// encrypted where the rule says so).
    pub encrypted_values: usize,
    pub clear_values: usize,
    pub comments_decrypted: usize,
    /// Comments stored in clear (or left as they were because they did not
    /// decrypt, as sops does).
    pub comments_clear: usize,
    pub mac_only_encrypted: bool,
    /// Number of YAML documents (1 for the other stores).
    pub documents: usize,
    /// Things an operator should know that are not errors.
    pub warnings: Vec<String>,
}

/// A decrypted sops file. `Debug` shows the shape only. The plaintext is
/// wiped when this is dropped.
pub struct Decrypted {
    name: String,
    docs: Vec<Node>,
    report: CheckReport,
}

impl Drop for Decrypted {
    fn drop(&mut self) {
        self.docs.iter_mut().for_each(Zeroize::zeroize);
    }
}

impl fmt::Debug for Decrypted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decrypted")
            .field("name", &self.name)
            .field("store", &self.report.store)
            .field("documents", &self.docs)
            .finish()
    }
}

/// One value taken out of a [`Decrypted`] file: a scalar, or a whole
/// map/list. `Debug` is redacted; the plaintext is wiped on drop.
pub struct SecretValue {
    node: Node,
}

impl Drop for SecretValue {
    fn drop(&mut self) {
        self.node.zeroize();
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretValue({:?})", self.node)
    }
}

/// The type of a [`SecretValue`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueKind {
    Str,
    Int,
    Float,
    Bool,
    Bytes,
    Time,
    Null,
    Map,
    List,
}

impl SecretValue {
    pub fn kind(&self) -> ValueKind {
        match &self.node {
            Node::Map(_) => ValueKind::Map,
            Node::List(_) => ValueKind::List,
            Node::Null | Node::Comment(_) => ValueKind::Null,
            Node::Scalar(s) => match s {
                Scalar::Str(_) => ValueKind::Str,
                Scalar::Int(_) => ValueKind::Int,
                Scalar::Float(_) => ValueKind::Float,
                Scalar::Bool(_) => ValueKind::Bool,
                Scalar::Bytes(_) => ValueKind::Bytes,
                Scalar::Time(_) => ValueKind::Time,
            },
        }
    }

    /// A scalar as text: strings as they are, numbers in Go's canonical
    /// form, `true`/`false`, times in RFC 3339, bytes if they are UTF-8. A
    /// map, list, null or non-UTF-8 bytes give `None`.
    pub fn expose_text(&self) -> Option<SecretString> {
        match &self.node {
            Node::Scalar(s) => format::scalar_text(s).map(|t| SecretString::from(t.as_str())),
            _ => None,
        }
    }

    /// A scalar as bytes (strings as UTF-8, bytes raw; other scalars as
    /// their text). `None` for maps, lists and null.
    pub fn expose_bytes(&self) -> Option<SecretBytes> {
        match &self.node {
            Node::Scalar(Scalar::Bytes(b)) => Some(secret_bytes(b)),
            Node::Scalar(s) => format::scalar_text(s).map(|t| secret_bytes(t.as_bytes())),
            _ => None,
        }
    }

    /// The value as JSON, types kept (see [`Decrypted::to_json`]).
    pub fn to_json(&self) -> serde_json::Value {
        node_to_json(&self.node)
    }
}

/// Copies into an exactly sized box, so no reallocation leaves a copy.
fn secret_bytes(b: &[u8]) -> SecretBytes {
    SecretBox::new(Box::from(b))
}

fn node_to_json(n: &Node) -> serde_json::Value {
    use serde_json::Value;
    match n {
        Node::Map(entries) => Value::Object(
            entries
                .iter()
                .filter_map(|e| match e {
                    Entry::Pair(k, v) => Some((k.clone(), node_to_json(v))),
                    Entry::Comment(_) => None,
                })
                .collect(),
        ),
        Node::List(items) => Value::Array(
            items
                .iter()
                .filter(|n| !matches!(n, Node::Comment(_)))
                .map(node_to_json)
                .collect(),
        ),
        Node::Null | Node::Comment(_) => Value::Null,
        Node::Scalar(s) => match s {
            Scalar::Str(v) => Value::String(v.to_string()),
            Scalar::Int(i) => Value::from(*i),
            Scalar::Float(f) => serde_json::Number::from_f64(*f)
                .map(Value::Number)
                .unwrap_or_else(|| Value::String(gocompat::format_float(*f))),
            Scalar::Bool(b) => Value::Bool(*b),
            Scalar::Time(t) => Value::String(t.format_rfc3339_nano()),
            Scalar::Bytes(b) => match std::str::from_utf8(b) {
                Ok(s) => Value::String(s.to_string()),
                Err(_) => Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
            },
        },
    }
}

impl Decrypted {
    /// The name the file was decrypted under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The store the file was read as.
    pub fn store(&self) -> Store {
        self.report.store
    }

    /// What was verified (no values).
    pub fn report(&self) -> &CheckReport {
        &self.report
    }

    /// One value by key path.
    ///
    /// Syntax: keys separated by `.` (`db.password`); list positions as
    /// `[0]` (`servers[0].host`) — a plain number segment like `servers.0`
    /// also indexes a list (and is a key in a map); keys containing `.`,
    /// `[`, `]` or `"` are written `["a.b"]` (`\"` and `\\` escape inside).
    /// INI files are `section.key` (`DEFAULT.key` before any section); dotenv
    /// files are `KEY`; binary files hold their content at `data`. The empty
    /// path is the whole document. Multi-document YAML: paths look into the
    /// first document.
    pub fn get(&self, key_path: &str) -> Result<SecretValue, SecretError> {
        let path = parse_path(key_path).map_err(|e| {
            SecretError::at(
                &self.name,
                key_path,
                ErrorKind::KeyNotFound(format!("invalid key path: {e}")),
            )
        })?;
        let mut node = self.docs.first().ok_or_else(|| {
            SecretError::at(
                &self.name,
                key_path,
                ErrorKind::KeyNotFound("the file is empty".into()),
            )
        })?;
        for (i, elem) in path.iter().enumerate() {
            let next = match (node, elem) {
                (Node::Map(_), PathElem::Key(k)) => node.get(k),
                (Node::List(items), PathElem::Index(n)) => list_item(items, *n),
                (Node::List(items), PathElem::Key(k)) => {
                    k.parse::<usize>().ok().and_then(|n| list_item(items, n))
                }
                _ => None,
            };
            node = next.ok_or_else(|| {
                let found = display_path(&path[..i]);
                let detail = match (node, elem) {
                    (Node::Map(_), PathElem::Key(k)) => {
                        let keys: Vec<&str> = match node {
                            Node::Map(e) => e
                                .iter()
                                .filter_map(|e| match e {
                                    Entry::Pair(k, _) => Some(k.as_str()),
                                    _ => None,
                                })
                                .collect(),
                            _ => Vec::new(),
                        };
                        format!(
                            "no key `{k}` under {}; the keys there are: {}",
                            if found.is_empty() {
                                "the document root".into()
                            } else {
                                format!("`{found}`")
                            },
                            if keys.is_empty() {
                                "none".into()
                            } else {
                                keys.join(", ")
                            }
                        )
                    }
                    (Node::List(items), _) => format!(
                        "`{found}` is a list of {} items",
                        items
                            .iter()
                            .filter(|n| !matches!(n, Node::Comment(_)))
                            .count()
                    ),
                    (other, _) => format!(
                        "`{found}` is a {}, which has no keys or positions",
                        other.kind_name()
                    ),
                };
                SecretError::at(&self.name, key_path, ErrorKind::KeyNotFound(detail))
            })?;
        }
        Ok(SecretValue { node: node.clone() })
    }

    /// Re-emits the decrypted content in `format`: YAML (comments kept),
    /// JSON, dotenv (flat maps only), INI (sections of scalars) or binary
    /// (raw bytes of a binary file's content). A tree that does not fit the
    /// format is an error naming the key.
    pub fn emit(&self, format: Store) -> Result<SecretBytes, SecretError> {
        // Reserve generously up front: a growing String reallocates and would
        // leave unwiped copies of the plaintext behind.
        let mut out = Zeroizing::new(String::with_capacity(
            self.docs.iter().map(text_size).sum::<usize>() * 2 + 4096,
        ));
        let fit = |r: Result<(), (String, String)>| {
            r.map_err(|(key, why)| {
                SecretError::at(&self.name, key, ErrorKind::UnsupportedStore(why))
            })
        };
        let single = || {
            if self.docs.len() == 1 {
                Ok(&self.docs[0])
            } else {
                Err(SecretError::new(
                    &self.name,
                    ErrorKind::UnsupportedStore(format!(
                        "the file has {} YAML documents; only yaml output can hold several",
                        self.docs.len()
                    )),
                ))
            }
        };
        match format {
            Store::Yaml => format::yaml::emit(&self.docs, &mut out),
            Store::Json => fit(format::json::emit(single()?, &mut out))?,
            Store::Dotenv => fit(format::dotenv::emit(single()?, &mut out))?,
            Store::Ini => fit(format::ini::emit(single()?, &mut out))?,
            Store::Binary => {
                return match single()?.get("data") {
                    Some(Node::Scalar(Scalar::Str(s))) => Ok(secret_bytes(s.as_bytes())),
                    Some(Node::Scalar(Scalar::Bytes(b))) => Ok(secret_bytes(b)),
                    _ => Err(SecretError::new(
                        &self.name,
                        ErrorKind::UnsupportedStore(
                            "raw (binary) output needs a file encrypted with the binary store \
                             (one `data` value); emit yaml, json, dotenv or ini instead"
                                .into(),
                        ),
                    )),
                };
            }
        }
        Ok(secret_bytes(out.as_bytes()))
    }

    /// The decrypted tree as JSON with types kept (ints, floats, booleans,
    /// strings; times as RFC 3339 strings; non-UTF-8 bytes as base64;
    /// comments dropped). Multi-document YAML gives an array of documents.
    /// Key order follows `serde_json`'s map (sorted unless its
    /// `preserve_order` feature is on); [`Decrypted::emit`] with
    /// [`Store::Json`] keeps file order.
    pub fn to_json(&self) -> serde_json::Value {
        if self.docs.len() == 1 {
            node_to_json(&self.docs[0])
        } else {
            serde_json::Value::Array(self.docs.iter().map(node_to_json).collect())
        }
    }
}

/// A rough upper bound of a tree's text size, to size output buffers.
fn text_size(n: &Node) -> usize {
    match n {
        Node::Map(e) => e
            .iter()
            .map(|e| match e {
                Entry::Pair(k, v) => k.len() + 16 + text_size(v),
                Entry::Comment(c) => c.len() + 16,
            })
            .sum(),
        Node::List(items) => items.iter().map(|i| 16 + text_size(i)).sum(),
        Node::Comment(c) => c.len() + 16,
        Node::Scalar(Scalar::Str(s)) => s.len() * 2,
        Node::Scalar(Scalar::Bytes(b)) => b.len() * 2,
        _ => 48,
    }
}

fn list_item(items: &[Node], n: usize) -> Option<&Node> {
    items
        .iter()
        .filter(|i| !matches!(i, Node::Comment(_)))
        .nth(n)
}

/// Parses the file and reads its metadata.
fn load(store: Store, bytes: &[u8]) -> Result<(format::Parsed, Metadata), Raw> {
    let text = std::str::from_utf8(bytes).map_err(|_| {
        Raw::from(ErrorKind::Parse {
            store: match store {
                Store::Yaml => "YAML",
                Store::Json => "JSON",
                Store::Dotenv => "dotenv",
                Store::Ini => "INI",
                Store::Binary => "binary-store (JSON)",
            },
            line: None,
            detail: "the file is not UTF-8 text".into(),
            truncated: false,
        })
    })?;
    let mut parsed = format::parse(store, text)?;
    let sops = parsed.sops.take().ok_or(ErrorKind::NotSops)?;
    let meta = Metadata::from_node(&sops)?;
    Ok((parsed, meta))
}

/// Opens the data key from the age stanzas (and Shamir shares).
fn unwrap_data_key(
    meta: &Metadata,
    ids: &Identities,
) -> Result<(crypt::DataKey, Vec<String>), Raw> {
    if ids.is_empty() {
        return Err(ErrorKind::NoIdentities.into());
    }
    let mut parts: Vec<Zeroizing<Vec<u8>>> = Vec::new();
    let mut opened_with = Vec::new();
    let mut errors = Vec::new();
    for group in &meta.groups {
        for stanza in &group.age {
            match ids.decrypt_age(&stanza.enc) {
                Ok(Some(part)) => {
                    parts.push(part);
                    opened_with.push(stanza.recipient.clone());
                    break;
                }
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
    }
    let no_key = || ErrorKind::NoMatchingKey {
        recipients: meta.age_recipients(),
        other_keys: meta.other_keys(),
        tried: ids
            .recipients()
            .into_iter()
            .chain(ids.unusable().iter().map(|u| format!("(unusable: {u})")))
            .collect(),
    };
    let key: Zeroizing<Vec<u8>> = if meta.groups.len() > 1 {
        let needed = if meta.threshold == 0 {
            meta.groups.len()
        } else {
            meta.threshold
        };
        if parts.is_empty() {
            return Err(no_key().into());
        }
        if parts.len() < needed {
            return Err(ErrorKind::KeyGroups {
                needed,
                opened: parts.len(),
                groups: meta.groups.len(),
            }
            .into());
        }
        shamir::combine(&parts).map_err(ErrorKind::DataKey)?
    } else {
        match parts.pop() {
            Some(p) => p,
            None if !errors.is_empty() && !meta.age_recipients().is_empty() => {
                return Err(ErrorKind::DataKey(format!(
                    "an age stanza is corrupt: {}",
                    errors.join("; ")
                ))
                .into())
            }
            None => return Err(no_key().into()),
        }
    };
    let arr: [u8; 32] = key[..]
        .try_into()
        .map_err(|_| ErrorKind::DataKey(format!("{} bytes instead of 32", key.len())))?;
    Ok((Zeroizing::new(arr), opened_with))
}

/// Decrypts all values and verifies the MAC.
fn decrypt_tree(
    store: Store,
    parsed: format::Parsed,
    meta: &Metadata,
    key: &[u8; 32],
    opened_with: Vec<String>,
) -> Result<(Vec<Node>, CheckReport), Raw> {
    let mut dec = walk::Decryptor::new(meta, key);
    let mut docs = Vec::with_capacity(parsed.docs.len());
    for doc in parsed.docs {
        docs.push(dec.document(doc)?);
    }
    let stats = dec.stats;
    let warnings = std::mem::take(&mut dec.warnings);
    let computed = dec.mac();
    let Some(stored) = meta.mac.as_deref() else {
        return Err(ErrorKind::MacMissing.into());
    };
    let file_mac = match crypt::decrypt_value(stored, key, &meta.mac_aad) {
        Ok(crypt::Plain::Value(Scalar::Str(s))) => s,
        Ok(_) => return Err(ErrorKind::MacUnreadable("it is not a string".into()).into()),
        Err(ErrorKind::Tampered) => {
            return Err(ErrorKind::MacUnreadable("it does not authenticate".into()).into())
        }
        Err(e) => return Err(ErrorKind::MacUnreadable(format!("{e:?}")).into()),
    };
    if !constant_time_eq(file_mac.as_bytes(), computed.as_bytes()) {
        return Err(ErrorKind::MacMismatch.into());
    }
    let report = CheckReport {
        store,
        sops_version: meta.version.clone(),
        last_modified: meta.lastmodified.clone(),
        opened_with,
        encrypted_values: stats.encrypted,
        clear_values: stats.clear,
        comments_decrypted: stats.comments_decrypted,
        comments_clear: stats.comments_clear,
        mac_only_encrypted: meta.mac_only_encrypted,
        documents: docs.len(),
        warnings,
    };
    Ok((docs, report))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Decrypts a whole sops file: parses it as `store`, opens the data key
/// with `ids`, decrypts every value (AES-256-GCM, key path as AAD) and
/// verifies the MAC, which is mandatory. `name` (the repository path) is used
/// in every error message.
pub fn decrypt(
    name: &str,
    bytes: &[u8],
    store: Store,
    ids: &Identities,
) -> Result<Decrypted, SecretError> {
    let run = || -> Result<Decrypted, Raw> {
        let (parsed, meta) = load(store, bytes)?;
        let (key, opened_with) = unwrap_data_key(&meta, ids)?;
        let (docs, report) = decrypt_tree(store, parsed, &meta, &key, opened_with)?;
        Ok(Decrypted {
            name: name.to_string(),
            docs,
            report,
        })
    };
    run().map_err(|e| e.into_error(name))
}

/// Verifies that the file decrypts and its MAC matches, without returning
/// any value (for `driftless secrets check`).
pub fn check(
    name: &str,
    bytes: &[u8],
    store: Store,
    ids: &Identities,
) -> Result<CheckReport, SecretError> {
    decrypt(name, bytes, store, ids).map(|d| d.report.clone())
}

/// [`decrypt`] with the data key given directly instead of unwrapped from
/// the key stanzas. For tests and tooling only (files wrapped for PGP or
/// KMS, whose data key is known): a data key is as sensitive as every
/// secret in the file.
#[doc(hidden)]
pub fn decrypt_with_data_key(
    name: &str,
    bytes: &[u8],
    store: Store,
    data_key: &[u8; 32],
) -> Result<Decrypted, SecretError> {
    let run = || -> Result<Decrypted, Raw> {
        let (parsed, meta) = load(store, bytes)?;
        let (docs, report) = decrypt_tree(store, parsed, &meta, data_key, vec!["data key".into()])?;
        Ok(Decrypted {
            name: name.to_string(),
            docs,
            report,
        })
    };
    run().map_err(|e| e.into_error(name))
}

/// Entry points for fuzz targets: parsers and `ENC[...]` parsing without
/// keys. Not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    use super::Store;

    /// Parses `bytes` as `store` (metadata included); the result is
    /// discarded. Must never panic.
    pub fn parse_store(store: Store, bytes: &[u8]) {
        if let Ok(text) = std::str::from_utf8(bytes) {
            if let Ok(parsed) = super::format::parse(store, text) {
                if let Some(sops) = &parsed.sops {
                    let _ = super::metadata::Metadata::from_node(sops);
                }
                let mut out = String::new();
                super::format::yaml::emit(&parsed.docs, &mut out);
                if let Some(doc) = parsed.docs.first() {
                    let _ = super::format::json::emit(doc, &mut out);
                    let _ = super::format::dotenv::emit(doc, &mut out);
                    let _ = super::format::ini::emit(doc, &mut out);
                }
            }
        }
    }

    /// Parses and (with a fixed key) tries to decrypt an `ENC[...]` value.
    /// Must never panic.
    pub fn parse_enc(text: &str) {
        let _ = super::crypt::parse_enc(text);
        let _ = super::crypt::decrypt_value(text, &[0u8; 32], "a:");
    }
}

/// Counted skips for tests whose system prerequisites are missing (see
/// `tests/common/skip.rs`).
#[cfg(test)]
#[path = "../../tests/common/skip.rs"]
pub(crate) mod test_skip;
