//! Loading age identities for SOPS secrets: the configured key files, the
//! host's SSH keys, and the `SOPS_AGE_KEY`/`SOPS_AGE_KEY_FILE` conventions
//! (for operators running the CLI). Called only when a secret is needed.

use std::path::Path;

use crate::config::Settings;
use crate::secrets::Identities;

/// Warns, as ssh does, when a private key file is readable by its group or
/// by others: whoever can read it can decrypt every secret of this host.
fn warn_if_exposed(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "{} is readable by {} (mode {mode:04o}): anyone who can read it can decrypt this host's secrets; run `chmod 600 {}`",
                path.display(),
                if mode & 0o007 != 0 { "everyone" } else { "its group" },
                path.display()
            );
        }
    }
}

pub fn load(settings: &Settings) -> Result<Identities, String> {
    let mut ids = Identities::new();
    let mut notes = Vec::new();
    for f in &settings.age_keys {
        ids.extend(Identities::from_keys_file(f).map_err(|e| e.to_string())?);
        warn_if_exposed(Path::new(f));
    }
    for k in &settings.ssh_host_keys {
        if !Path::new(k).exists() {
            continue;
        }
        match Identities::from_ssh_private_key(k) {
            Ok(i) => {
                warn_if_exposed(Path::new(k));
                ids.extend(i)
            }
            Err(e) => notes.push(e.to_string()),
        }
    }
    match Identities::from_sops_env(|k| std::env::var_os(k)) {
        Ok(i) => ids.extend(i),
        Err(e) => notes.push(e.to_string()),
    }
    if ids.is_empty() {
        let mut msg = String::from(
            "no age identity: set `age_keys` in the agent config (or --age-key FILE, or SOPS_AGE_KEY_FILE), or give the host an SSH host key",
        );
        for n in notes {
            msg.push_str("; ");
            msg.push_str(&n);
        }
        return Err(msg);
    }
    Ok(ids)
}
