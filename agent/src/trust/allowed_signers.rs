//! The git / OpenSSH `allowed_signers` file (ssh-keygen(1), section
//! ALLOWED SIGNERS):
//!
//! ```text
//! # comment
//! alice@example.com ssh-ed25519 AAAAC3Nza... alice's laptop
//! "bob smith",*@ops.example.com namespaces="git,driftless-bundle",valid-before="20270101Z" ssh-rsa AAAAB3...
//! *@example.com cert-authority ssh-ed25519 AAAAC3Nza...
//! ```
//!
//! `principals [options] keytype base64-key [comment]`, one per line:
//!
//! * principals: comma-separated, may contain `*`/`?` wildcards, may be
//!   quoted (`"..."`, to contain spaces). git does not match them against
//!   the committer: they only name who signed ([`super::Verified::principal`]).
//! * options, comma-separated, names in any case:
//!   `cert-authority`; `namespaces="pattern,..."` (`*`/`?` wildcards,
//!   `!pattern` negates); `valid-after=TIME`, `valid-before=TIME` with TIME
//!   `YYYYMMDD[HHMM[SS]][Z]`, the window inclusive at both ends as in
//!   OpenSSH.
//!
//! Differences from OpenSSH, all on the strict or explicit side:
//!
//! * times without `Z` are UTC, not local time (see `time.rs`);
//! * option values may be unquoted (OpenSSH requires quotes; an unquoted
//!   value ends at the next comma);
//! * an empty `namespaces` list, or an empty pattern in it, is an error
//!   instead of a line that silently matches nothing;
//! * `cert-authority` lines are parsed, but signatures made with SSH
//!   certificates are not supported: a CA line never matches a plain key.
//!
//! Every error names `path:line` and what is wrong. Parsing never panics
//! (fuzzed: `fuzz/fuzz_targets/allowed_signers.rs`).

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use base64::Engine;
use ssh_key::{Algorithm, HashAlg, PublicKey};

use super::time;

/// A parsed allowed signers file.
#[derive(Debug, Clone)]
pub struct AllowedSigners {
    origin: PathBuf,
    entries: Vec<Entry>,
}

/// One key line of an allowed signers file.
#[derive(Debug, Clone)]
pub struct Entry {
    line: usize,
    principals: String,
    cert_authority: bool,
    namespaces: Option<String>,
    valid_after: Option<i64>,
    valid_before: Option<i64>,
    key: PublicKey,
}

impl AllowedSigners {
    /// Reads and parses `path`. Errors name `path:line` and the problem.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read the allowed signers file {}", path.display()))?;
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            let line = 1 + bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            anyhow!("{}:{line}: not valid UTF-8", path.display())
        })?;
        Self::parse(text, path)
    }

    /// Parses the text of an allowed signers file; `origin` is only used in
    /// messages.
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        let mut entries = Vec::new();
        for (index, raw) in text.split('\n').enumerate() {
            let line = index + 1;
            let raw = raw.strip_suffix('\r').unwrap_or(raw);
            match parse_line(raw, line) {
                Ok(Some(entry)) => entries.push(entry),
                Ok(None) => {}
                Err(what) => return Err(anyhow!("{}:{line}: {what}", origin.display())),
            }
        }
        Ok(Self {
            origin: origin.to_path_buf(),
            entries,
        })
    }

    /// No key lines (only blank lines and comments, or an empty file).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of key lines.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The key lines, in file order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The path given to [`load`](Self::load) or [`parse`](Self::parse).
    pub fn origin(&self) -> &Path {
        &self.origin
    }
}

impl Entry {
    /// 1-based line number in the file.
    pub fn line(&self) -> usize {
        self.line
    }

    /// The principals field as written (quotes removed).
    pub fn principals(&self) -> &str {
        &self.principals
    }

    /// A `cert-authority` line: never matches a plain signing key.
    pub fn is_cert_authority(&self) -> bool {
        self.cert_authority
    }

    /// The `namespaces=` pattern list, if restricted.
    pub fn namespaces(&self) -> Option<&str> {
        self.namespaces.as_deref()
    }

    /// `valid-after=`, unix seconds.
    pub fn valid_after(&self) -> Option<i64> {
        self.valid_after
    }

    /// `valid-before=`, unix seconds.
    pub fn valid_before(&self) -> Option<i64> {
        self.valid_before
    }

    pub fn key(&self) -> &PublicKey {
        &self.key
    }

    /// `SHA256:...`, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        self.key.fingerprint(HashAlg::Sha256).to_string()
    }

    /// Whether the `namespaces=` option (if any) allows `namespace`.
    pub fn allows_namespace(&self, namespace: &str) -> bool {
        match &self.namespaces {
            None => true,
            Some(patterns) => match_pattern_list(namespace, patterns),
        }
    }

    /// Why the validity window excludes `at`, if it does.
    pub(super) fn window_excludes(&self, at: i64) -> Option<WindowMiss> {
        match (self.valid_after, self.valid_before) {
            (Some(after), _) if at < after => Some(WindowMiss::NotYet(after)),
            (_, Some(before)) if at > before => Some(WindowMiss::Expired(before)),
            _ => None,
        }
    }
}

/// How `at` falls outside an entry's validity window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WindowMiss {
    /// Before `valid-after` (the value).
    NotYet(i64),
    /// After `valid-before` (the value).
    Expired(i64),
}

impl fmt::Display for WindowMiss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotYet(t) => write!(f, "is valid only from {}", time::format(*t)),
            Self::Expired(t) => write!(f, "is valid only before {}", time::format(*t)),
        }
    }
}

/// OpenSSH `match_pattern_list`: comma-separated `*`/`?` patterns; a
/// matching `!pattern` vetoes, otherwise any matching pattern accepts.
pub(super) fn match_pattern_list(text: &str, patterns: &str) -> bool {
    let mut positive = false;
    for pattern in patterns.split(',') {
        match pattern.strip_prefix('!') {
            Some(negated) if glob(negated.as_bytes(), text.as_bytes()) => return false,
            Some(_) => {}
            None => positive |= glob(pattern.as_bytes(), text.as_bytes()),
        }
    }
    positive
}

/// `*` (any run) and `?` (any one byte) glob with single-star backtracking:
/// at most len(pattern) × len(text) steps, no recursion.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

const FORMAT: &str = "expected `principals [options] keytype base64-key [comment]`";

fn is_space(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// One line: `Ok(None)` for blank lines and comments.
fn parse_line(raw: &str, line: usize) -> Result<Option<Entry>, String> {
    let rest = raw.trim_start_matches(is_space);
    if rest.is_empty() || rest.starts_with('#') {
        return Ok(None);
    }
    let (principals, rest) = principals_token(rest)?;
    if principals.is_empty() {
        return Err(format!("empty principals; {FORMAT}"));
    }
    let (first, after_first) = options_token(rest)?;
    if first.is_empty() {
        return Err(format!("missing key after the principals; {FORMAT}"));
    }
    let mut options = Options::default();
    let key_part = if is_options(first) {
        options = parse_options(first)?;
        after_first
    } else {
        rest
    };
    let key = parse_key(key_part)?;
    Ok(Some(Entry {
        line,
        principals,
        cert_authority: options.cert_authority,
        namespaces: options.namespaces,
        valid_after: options.valid_after,
        valid_before: options.valid_before,
        key,
    }))
}

/// The principals field, OpenSSH `strdelimw`-style: up to whitespace; a
/// `"` starts a quoted part that runs to the next `"` and ends the field.
fn principals_token(text: &str) -> Result<(String, &str), String> {
    let end = text
        .find(|c: char| is_space(c) || c == '"')
        .unwrap_or(text.len());
    let (head, tail) = text.split_at(end);
    let Some(quoted) = tail.strip_prefix('"') else {
        return Ok((head.to_string(), tail.trim_start_matches(is_space)));
    };
    let close = quoted
        .find('"')
        .ok_or("unterminated quote in the principals")?;
    let (inside, after) = quoted.split_at(close);
    let after = &after[1..];
    if !after.is_empty() && !after.starts_with(is_space) {
        return Err("unexpected text right after the closing quote of the principals".into());
    }
    Ok((
        format!("{head}{inside}"),
        after.trim_start_matches(is_space),
    ))
}

/// The next whitespace-delimited token, where whitespace inside `"..."`
/// (with `\"` escapes) does not end it; returns it and what follows.
fn options_token(text: &str) -> Result<(&str, &str), String> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if escaped {
            escaped = false;
        } else if quoted && c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if !quoted && is_space(c) {
            return Ok((&text[..i], text[i..].trim_start_matches(is_space)));
        }
    }
    if quoted {
        return Err("unterminated quote in the options".into());
    }
    Ok((text, ""))
}

/// Key types never contain `=`, `,` or `"`; options do, or are an option
/// name on its own (`cert-authority`, or a value-less `namespaces` that
/// deserves "needs a value" rather than "unknown key type").
fn is_options(token: &str) -> bool {
    token.contains(['=', ',', '"'])
        || [
            "cert-authority",
            "namespaces",
            "valid-after",
            "valid-before",
        ]
        .iter()
        .any(|name| token.eq_ignore_ascii_case(name))
}

#[derive(Default)]
struct Options {
    cert_authority: bool,
    namespaces: Option<String>,
    valid_after: Option<i64>,
    valid_before: Option<i64>,
}

const KNOWN_OPTIONS: &str =
    "cert-authority, namespaces=\"...\", valid-after=\"YYYYMMDD[HHMM[SS]]Z\", valid-before=\"...\"";

fn parse_options(token: &str) -> Result<Options, String> {
    let mut options = Options::default();
    let mut rest = token;
    loop {
        let name_end = rest.find(['=', ',']).unwrap_or(rest.len());
        let name = &rest[..name_end];
        rest = &rest[name_end..];
        let value = match rest.strip_prefix('=') {
            Some(after) => {
                let (value, after) = option_value(name, after)?;
                rest = after;
                Some(value)
            }
            None => None,
        };
        apply_option(&mut options, name, value)?;
        if rest.is_empty() {
            break;
        }
        // Only a comma can follow a name or a value here.
        rest = &rest[1..];
        if rest.is_empty() {
            return Err("trailing comma in the options".into());
        }
    }
    if let (Some(after), Some(before)) = (options.valid_after, options.valid_before) {
        if before <= after {
            return Err(format!(
                "valid-before ({}) is not later than valid-after ({})",
                time::format(before),
                time::format(after)
            ));
        }
    }
    Ok(options)
}

/// An option value: `"..."` (with `\"` escapes) or bare up to the next
/// comma. Returns the value and the rest (empty or starting with `,`).
fn option_value<'a>(name: &str, text: &'a str) -> Result<(String, &'a str), String> {
    let Some(quoted) = text.strip_prefix('"') else {
        let end = text.find(',').unwrap_or(text.len());
        if text[..end].contains('"') {
            return Err(format!("stray quote in the value of {name}"));
        }
        return Ok((text[..end].to_string(), &text[end..]));
    };
    let mut value = String::new();
    let mut chars = quoted.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' if quoted[i + 1..].starts_with('"') => {
                value.push('"');
                chars.next();
            }
            '"' => {
                let after = &quoted[i + 1..];
                if !after.is_empty() && !after.starts_with(',') {
                    return Err(format!("unexpected text after the quoted value of {name}"));
                }
                return Ok((value, after));
            }
            c => value.push(c),
        }
    }
    Err(format!("missing closing quote in the value of {name}"))
}

fn apply_option(options: &mut Options, name: &str, value: Option<String>) -> Result<(), String> {
    let lower = name.to_ascii_lowercase();
    match (lower.as_str(), value) {
        ("cert-authority", None) => options.cert_authority = true,
        ("cert-authority", Some(_)) => return Err("cert-authority takes no value".into()),
        ("namespaces" | "valid-after" | "valid-before", None) => {
            return Err(format!("{lower} needs a value ({lower}=\"...\")"))
        }
        ("namespaces", Some(value)) => {
            if options.namespaces.is_some() {
                return Err("namespaces is given more than once".into());
            }
            if value.is_empty() || value.split(',').any(|p| p.is_empty() || p == "!") {
                return Err(format!(
                    "namespaces=\"{}\" has an empty namespace pattern",
                    value.escape_debug()
                ));
            }
            options.namespaces = Some(value);
        }
        ("valid-after" | "valid-before", Some(value)) => {
            let slot = if lower == "valid-after" {
                &mut options.valid_after
            } else {
                &mut options.valid_before
            };
            if slot.is_some() {
                return Err(format!("{lower} is given more than once"));
            }
            let at = time::parse(&value).map_err(|e| format!("{lower}: {e}"))?;
            if lower == "valid-after" && at == 0 {
                // OpenSSH treats 0 as "not set"; refuse the ambiguity.
                return Err("valid-after must be later than 1970-01-01 00:00:00".into());
            }
            *slot = Some(at);
        }
        ("", _) => return Err("empty option (two commas in a row?)".into()),
        (_, _) => {
            return Err(format!(
                "unknown option `{}` (supported: {KNOWN_OPTIONS})",
                name.escape_debug()
            ))
        }
    }
    Ok(())
}

/// `keytype base64-key [comment]`.
fn parse_key(text: &str) -> Result<PublicKey, String> {
    let mut parts = text.splitn(2, is_space);
    let key_type = parts.next().unwrap_or_default();
    let rest = parts
        .next()
        .unwrap_or_default()
        .trim_start_matches(is_space);
    let encoded = rest.split(is_space).next().unwrap_or_default();
    if key_type.is_empty() {
        return Err(format!("missing key type; {FORMAT}"));
    }
    let shown = key_type.escape_debug();
    if key_type.ends_with("-cert-v01@openssh.com") {
        return Err(format!(
            "`{shown}` is a certificate; list the certificate authority's key with cert-authority instead"
        ));
    }
    match Algorithm::new(key_type) {
        Ok(Algorithm::Other(_)) | Err(_) => {
            return Err(format!(
                "unknown key type `{shown}` (or a misspelled option; options: {KNOWN_OPTIONS})"
            ))
        }
        Ok(_) => {}
    }
    if encoded.is_empty() {
        return Err(format!("missing the base64 key after `{shown}`"));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| format!("the {shown} key is not valid base64: {e}"))?;
    let key = PublicKey::from_bytes(&bytes).map_err(|e| format!("invalid {shown} key: {e}"))?;
    let actual = key.algorithm();
    if actual.as_str() != key_type {
        return Err(format!(
            "key type `{shown}` does not match the key, which is {}",
            actual.as_str().escape_debug()
        ));
    }
    Ok(key)
}
