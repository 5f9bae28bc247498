//! Secrets in the desired state: `secret(file=..., key=...)` in templates
//! and `secret = "..."` files, decrypted from SOPS files in the repository.
//!
//! Decryption is pure given the identities; loading the identities (age key
//! files, SSH host keys) is an effect, so the resolver takes a loader and
//! calls it only when a secret is first needed: a host whose files use no
//! secret never reads a key. Decrypted files are cached for one render.
//!
//! Any file whose content depends on a secret is *sensitive*: mode 0600
//! unless the role sets a mode, content never shown in plans or logs.

use std::collections::HashMap;

use std::sync::{Arc, Mutex, OnceLock};

use secrecy::ExposeSecret;

use super::redact::Redactor;
use super::snapshot::Snapshot;
use crate::secrets::{self, Decrypted, Identities, Store};

type Loader = Box<dyn Fn() -> Result<Identities, String> + Send + Sync>;

/// Resolves secrets for one host's render.
pub struct SecretResolver {
    /// The repository (files are read when a secret is first needed).
    snap: Snapshot,
    loader: Loader,
    ids: OnceLock<Result<Identities, String>>,
    cache: Mutex<HashMap<String, Arc<Decrypted>>>,
    /// The threads that read a secret since their last
    /// [`SecretResolver::take_used`]: threads render files side by side,
    /// and a file is sensitive when a secret was read while *it* rendered.
    used: Mutex<Vec<std::thread::ThreadId>>,
    /// Every value decrypted so far, to scrub from messages.
    redactor: Redactor,
    /// `validate --skip-secrets`: nothing is decrypted; each use gives a
    /// placeholder, and the files are listed here.
    placeholders: Option<Mutex<std::collections::BTreeSet<String>>>,
}

/// True if `bytes` may be a sops file (cheap pre-filter).
fn looks_like_sops(bytes: &[u8]) -> bool {
    let hay = &bytes[..bytes.len().min(1 << 20)];
    [&b"sops"[..]]
        .iter()
        .any(|n| hay.windows(n.len()).any(|w| w == *n))
}

impl SecretResolver {
    pub fn new(snap: &Snapshot, loader: Loader) -> Self {
        SecretResolver {
            snap: snap.clone(),
            loader,
            ids: OnceLock::new(),
            cache: Mutex::new(HashMap::new()),
            used: Mutex::new(Vec::new()),
            redactor: Redactor::default(),
            placeholders: None,
        }
    }

    /// A resolver that decrypts nothing (`validate --skip-secrets`): a
    /// secret must name a SOPS file of the repository, and renders as a
    /// placeholder; [`SecretResolver::skipped`] lists the files.
    pub fn placeholders(snap: &Snapshot) -> Self {
        let mut r = Self::without_keys(snap);
        r.placeholders = Some(Mutex::new(Default::default()));
        r
    }

    /// The SOPS files a placeholder resolver was asked for.
    pub fn skipped(&self) -> Vec<String> {
        self.placeholders
            .as_ref()
            .and_then(|p| p.lock().ok().map(|s| s.iter().cloned().collect()))
            .unwrap_or_default()
    }

    /// With placeholders: checks that `file` is a SOPS file and records it.
    fn placeholder(&self, file: &str) -> Option<Result<(), String>> {
        let set = self.placeholders.as_ref()?;
        self.mark_used();
        let ok = matches!(self.snap.read_file(file), Ok(Some(b)) if looks_like_sops(b));
        if !ok {
            return Some(Err(format!(
                "{file}: no such SOPS file in the repository (paths are relative to the repository root)"
            )));
        }
        if let Ok(mut s) = set.lock() {
            s.insert(file.to_string());
        }
        Some(Ok(()))
    }

    /// A resolver for repositories rendered without keys (`validate`):
    /// any use of a secret is an error saying so.
    pub fn without_keys(snap: &Snapshot) -> Self {
        Self::new(
            snap,
            Box::new(|| Err("no age identities are available to this command".to_string())),
        )
    }

    /// How many SOPS files were decrypted (each once per render).
    pub fn decrypted_files(&self) -> usize {
        self.cache.lock().map_or(0, |c| c.len())
    }

    /// Whether this thread read a secret since its last call; resets it.
    pub fn take_used(&self) -> bool {
        let me = std::thread::current().id();
        // A poisoned lock says "used": a file is then wrongly kept secret,
        // never wrongly shown.
        let Ok(mut used) = self.used.lock() else {
            return true;
        };
        match used.iter().position(|t| *t == me) {
            Some(i) => {
                used.swap_remove(i);
                true
            }
            None => false,
        }
    }

    fn mark_used(&self) {
        let me = std::thread::current().id();
        if let Ok(mut used) = self.used.lock() {
            if !used.contains(&me) {
                used.push(me);
            }
        }
    }

    fn decrypted(&self, file: &str) -> Result<Arc<Decrypted>, String> {
        self.mark_used();
        if let Some(d) = self
            .cache
            .lock()
            .map_err(|_| "secret cache poisoned")?
            .get(file)
        {
            return Ok(d.clone());
        }
        let bytes = self
            .snap
            .read_file(file)
            .map_err(|e| format!("{e:#}"))?
            .filter(|b| looks_like_sops(b))
            .ok_or_else(|| {
                format!("{file}: no such SOPS file in the repository (paths are relative to the repository root)")
            })?;
        let ids = self
            .ids
            .get_or_init(|| (self.loader)())
            .as_ref()
            .map_err(|e| format!("{file}: cannot load age identities: {e}"))?;
        let d = secrets::decrypt(file, bytes, Store::from_path(file), ids)
            .map_err(|e| e.to_string())?;
        self.redactor.add_tree(&d.to_json());
        let d = Arc::new(d);
        self.cache
            .lock()
            .map_err(|_| "secret cache poisoned")?
            .insert(file.to_string(), d.clone());
        Ok(d)
    }

    /// One value as text (numbers and booleans as written).
    pub fn value(&self, file: &str, key: &str) -> Result<String, String> {
        if let Some(r) = self.placeholder(file) {
            return r.map(|()| format!("<secret {file} {key}>"));
        }
        let d = self.decrypted(file)?;
        let v = d.get(key).map_err(|e| e.to_string())?;
        if let Some(text) = v.expose_text() {
            return Ok(text.expose_secret().to_string());
        }
        match v.to_json() {
            serde_json::Value::String(s) => Ok(s),
            serde_json::Value::Number(n) => Ok(n.to_string()),
            serde_json::Value::Bool(b) => Ok(b.to_string()),
            _ => Err(format!(
                "{file}: key {key:?} is not a single value; use a `secret =` file entry to write a whole tree"
            )),
        }
    }

    /// `msg` without any value decrypted by this resolver (see
    /// [`super::redact`]).
    pub fn redact(&self, msg: &str) -> String {
        self.redactor.redact(msg)
    }

    /// A whole decrypted file re-emitted in `format`.
    pub fn whole(&self, file: &str, format: Store) -> Result<Vec<u8>, String> {
        if let Some(r) = self.placeholder(file) {
            return r.map(|()| format!("<secret {file}>\n").into_bytes());
        }
        let d = self.decrypted(file)?;
        let out = d.emit(format).map_err(|e| e.to_string())?;
        Ok(out.expose_secret().to_vec())
    }
}

/// Registers `secret(file=..., key=...)` on a Tera instance.
pub fn register(tera: &mut tera::Tera, resolver: Arc<SecretResolver>) {
    tera.register_function(
        "secret",
        move |args: &std::collections::HashMap<String, serde_json::Value>| {
            let get = |name: &str| {
                args.get(name)
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| {
                        tera::Error::msg(format!(
                            "secret() needs {name}=\"...\": secret(file=\"secrets/db.yaml\", key=\"db.password\")"
                        ))
                    })
            };
            let file = get("file")?;
            let key = get("key")?;
            resolver
                .value(&file, &key)
                .map(serde_json::Value::String)
                .map_err(tera::Error::msg)
        },
    );
}
