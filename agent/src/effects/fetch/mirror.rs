//! The bare mirror that remote sources are fetched into.
//!
//! The mirror is opened isolated (the host's git config and `GIT_*`
//! variables are ignored) with in-memory overrides for what a fetch needs:
//! a committer fallback (gix writes reflogs, and the host may have no git
//! identity) and the ssh command. The remote is always the configured URL,
//! not whatever the mirror's config says; after a successful fetch the URL
//! and refspec are recorded in the mirror's config as `remote.origin` for
//! humans and `git` looking at it.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{anyhow, bail, Context, Result};
use gix::bstr::ByteSlice;
use gix::remote::Direction;

use super::{redact, SshOptions};

/// Fetches `full_ref` from `url` into the mirror at `mirror_dir` and returns
/// the mirror and the commit the ref points to (tags peeled).
///
/// Its errors carry no password of `url`: gix's own (a redirect, a bad
/// URL) quote the URL whole.
pub(super) fn fetch(
    url: &str,
    full_ref: &str,
    ssh: &SshOptions,
    mirror_dir: &Path,
) -> Result<(gix::Repository, gix::ObjectId)> {
    fetch_quoting(url, full_ref, ssh, mirror_dir).map_err(|e| super::redact_error(e, url))
}

fn fetch_quoting(
    url: &str,
    full_ref: &str,
    ssh: &SshOptions,
    mirror_dir: &Path,
) -> Result<(gix::Repository, gix::ObjectId)> {
    let shown = redact(url);
    let _spinner = crate::progress::spinner(&format!("fetching {shown}"));
    ensure_mirror(mirror_dir)?;
    let ssh_log = mirror_dir.join(SSH_STDERR_FILE);
    let repo = open_mirror(mirror_dir, ssh, Some(&ssh_log))?;
    let tracking = tracking_ref(full_ref);
    let refspec = format!("+{full_ref}:{tracking}");
    let had_previous = matches!(repo.try_find_reference(tracking.as_str()), Ok(Some(_)));

    let remote = anonymous_remote(&repo, url, &refspec)?;
    let never_interrupt = AtomicBool::new(false);
    // Leftover output of an earlier run would be misleading; a missing file
    // is the normal case.
    let _ = std::fs::remove_file(&ssh_log);
    let fetch_error = |err: gix::Error| {
        let ssh_said = match ssh_stderr(&ssh_log) {
            Some(text) => format!(" ssh said: {text}."),
            None => String::new(),
        };
        let mirror_state = if had_previous {
            format!(
                "the mirror at {} keeps the previously fetched commit",
                mirror_dir.display()
            )
        } else {
            "nothing has been fetched yet".to_string()
        };
        anyhow::Error::new(err).context(format!(
            "cannot fetch {full_ref} from {shown}.{ssh_said} Check that the URL is reachable from this host and that credentials (or the ssh key and known_hosts) are set up; {mirror_state}"
        ))
    };
    let prepared = remote
        .connect(Direction::Fetch)
        .and_then(|connection| connection.prepare_fetch(gix::progress::Discard, Default::default()))
        .map_err(fetch_error)?;

    // Checked before receiving: gix would fail with a generic "no refspec
    // matched" error.
    let advertised = prepared
        .ref_map()
        .mappings
        .iter()
        .find(|m| m.remote.as_name() == Some(full_ref.as_bytes().as_bstr()))
        .and_then(|m| m.remote.as_id())
        .map(ToOwned::to_owned)
        .ok_or_else(|| {
            anyhow!("{shown} has no {full_ref}: check `branch` (a branch name like `main`, or a full ref like `refs/tags/v1`)")
        })?;

    prepared
        .receive(gix::progress::Discard, &never_interrupt)
        .map_err(fetch_error)?;

    // The forced refspec must have moved the tracking ref to what the server
    // advertised; anything else means the mirror is inconsistent.
    let local = repo
        .find_reference(tracking.as_str())
        .with_context(|| {
            format!(
                "{tracking} missing in the mirror at {} after fetching from {shown}",
                mirror_dir.display()
            )
        })?
        .id()
        .detach();
    if local != advertised {
        bail!(
            "after fetching from {shown}, {tracking} in the mirror at {} is {local} but the server advertised {advertised}; remove the mirror directory and sync again",
            mirror_dir.display()
        );
    }

    let commit = repo
        .find_object(advertised)
        .with_context(|| format!("{full_ref} of {shown} points to {advertised}, which the fetch did not bring into the mirror"))?
        .peel_to_commit()
        .with_context(|| format!("{full_ref} of {shown} ({advertised}) does not point to a commit"))?
        .id;

    if let Some(text) = ssh_stderr(&ssh_log) {
        tracing::debug!(url = %shown, "ssh: {text}");
    }
    // Only diagnostics; if it cannot be removed it is overwritten next time.
    let _ = std::fs::remove_file(&ssh_log);

    record_remote(&repo, url, &refspec).with_context(|| {
        format!(
            "cannot record {shown} as the origin of the mirror at {}",
            mirror_dir.display()
        )
    })?;
    Ok((repo, commit))
}

/// Opens the mirror of `url` for reading.
pub(super) fn open(url: &str, ssh: &SshOptions, mirror_dir: &Path) -> Result<gix::Repository> {
    if !mirror_dir.exists() {
        bail!(
            "nothing has been fetched from {} yet (no mirror at {}): run a sync first",
            redact(url),
            mirror_dir.display()
        );
    }
    open_mirror(mirror_dir, ssh, None)
}

/// Opens the mirror of an air-gapped host (`source = "bundle:"`).
pub(super) fn open_for_bundles(mirror_dir: &Path, ssh: &SshOptions) -> Result<gix::Repository> {
    if !mirror_dir.exists() {
        bail!(
            "no bundle has been imported yet (no mirror at {}): this host's source is `bundle:`, so commits arrive only through `driftless bundle import FILE`",
            mirror_dir.display()
        );
    }
    open_mirror(mirror_dir, ssh, None)
}

/// Opens the mirror, creating it if needed, for a bundle import.
pub(super) fn open_for_import(mirror_dir: &Path, ssh: &SshOptions) -> Result<gix::Repository> {
    ensure_mirror(mirror_dir)?;
    open_mirror(mirror_dir, ssh, None)
}

/// The commit the tracking ref of `full_ref` points to in the mirror of an
/// air-gapped host.
pub(super) fn bundle_tip(
    repo: &gix::Repository,
    full_ref: &str,
    mirror_dir: &Path,
) -> Result<gix::ObjectId> {
    let tracking = tracking_ref(full_ref);
    let Some(mut reference) = repo
        .try_find_reference(tracking.as_str())
        .with_context(|| {
            format!(
                "cannot read {tracking} in the mirror at {}",
                mirror_dir.display()
            )
        })?
    else {
        bail!(
            "no bundle for {full_ref} has been imported into the mirror at {} yet: import one with `driftless bundle import FILE` (check `branch` if bundles were imported for another branch)",
            mirror_dir.display()
        );
    };
    Ok(reference
        .peel_to_commit()
        .with_context(|| {
            format!(
                "{tracking} in the mirror at {} does not point to a commit",
                mirror_dir.display()
            )
        })?
        .id)
}

/// `refs/heads/main` -> `refs/remotes/origin/main`; other refs keep their
/// path below `refs/` (`refs/tags/v1` -> `refs/remotes/origin/tags/v1`).
pub(crate) fn tracking_ref(full_ref: &str) -> String {
    let short = full_ref
        .strip_prefix("refs/heads/")
        .or_else(|| full_ref.strip_prefix("refs/"))
        .unwrap_or(full_ref);
    format!("refs/remotes/origin/{short}")
}

fn anonymous_remote<'r>(
    repo: &'r gix::Repository,
    url: &str,
    refspec: &str,
) -> Result<gix::Remote<'r>> {
    let shown = redact(url);
    repo.remote_at(url)
        .with_context(|| format!("{shown} is not a usable git URL"))?
        .with_refspecs(Some(refspec), Direction::Fetch)
        .with_context(|| format!("invalid refspec {refspec} for {shown}"))
        .map(|r| r.with_fetch_tags(gix::remote::fetch::Tags::None))
}

/// Creates the mirror if it does not exist yet: `init_bare` in a temporary
/// sibling directory, then one rename, so a crash never leaves a
/// half-initialised mirror behind.
fn ensure_mirror(mirror_dir: &Path) -> Result<()> {
    match std::fs::read_dir(mirror_dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Ok(()); // exists; open_mirror checks it is a repository
            }
            std::fs::remove_dir(mirror_dir).with_context(|| {
                format!(
                    "cannot replace the empty directory {} by a mirror",
                    mirror_dir.display()
                )
            })?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| {
                format!("cannot read the mirror directory {}", mirror_dir.display())
            });
        }
    }
    let parent = match mirror_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {} for the mirror", parent.display()))?;
    let name = mirror_dir
        .file_name()
        .with_context(|| format!("the mirror path {} has no file name", mirror_dir.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".init-{}", std::process::id()));
    let tmp = parent.join(tmp_name);
    match std::fs::remove_dir_all(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot remove the leftover {}", tmp.display()))
        }
    }
    gix::init_bare(&tmp)
        .with_context(|| format!("cannot create a bare repository at {}", tmp.display()))?;
    // Private whatever the umask (the state directory refuses a mirror
    // others may write: it holds the commits a sync applies).
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .with_context(|| format!("cannot make {} private", tmp.display()))?;
    std::fs::rename(&tmp, mirror_dir).with_context(|| {
        format!(
            "cannot move the new mirror {} to {}",
            tmp.display(),
            mirror_dir.display()
        )
    })?;
    Ok(())
}

/// Where ssh's stderr goes during a fetch (inside the mirror's git dir), so
/// that its complaint ("Host key verification failed.") can go into the
/// error instead of only onto the agent's stderr.
const SSH_STDERR_FILE: &str = "driftless-ssh-stderr";

/// The last few lines ssh wrote, joined, if any.
fn ssh_stderr(path: &Path) -> Option<String> {
    // Bounded and not through a link: the mirror is in the state directory.
    let bytes = crate::effects::state::read_nofollow_up_to(path, 1 << 20).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return None;
    }
    let start = lines.len().saturating_sub(4);
    Some(lines[start..].join(" / "))
}

fn open_mirror(
    mirror_dir: &Path,
    ssh: &SshOptions,
    ssh_log: Option<&Path>,
) -> Result<gix::Repository> {
    let overrides = vec![
        "gitoxide.committer.nameFallback=driftless".to_string(),
        "gitoxide.committer.emailFallback=driftless@localhost".to_string(),
        // We build an OpenSSH command line; saying so spares gix probing it.
        "ssh.variant=ssh".to_string(),
        format!("core.sshCommand={}", ssh_command(ssh, ssh_log)?),
    ];
    gix::open_opts(
        mirror_dir,
        gix::open::Options::isolated().config_overrides(overrides),
    )
    .with_context(|| {
        format!(
            "{} is not a usable mirror (not a git repository?): remove it and the next sync recreates it",
            mirror_dir.display()
        )
    })
}

/// The OpenSSH command line gix runs (through `/bin/sh`, so paths are
/// quoted). Batch mode always: an agent must fail, not wait for a prompt.
/// With `stderr_to`, ssh's stderr goes to that file; the command then ends
/// in `"$@"` itself (gix appends it only when it is absent).
fn ssh_command(ssh: &SshOptions, stderr_to: Option<&Path>) -> Result<String> {
    let mut cmd = String::from("ssh -o BatchMode=yes -o ConnectTimeout=30 -o ServerAliveInterval=15 -o ServerAliveCountMax=4");
    if let Some(key) = &ssh.key {
        cmd.push_str(" -i ");
        cmd.push_str(&sh_quote(path_str(key, "ssh key", false)?));
        cmd.push_str(" -o IdentitiesOnly=yes");
    }
    if let Some(known_hosts) = &ssh.known_hosts {
        let path = path_str(known_hosts, "known_hosts file", true)?;
        // ssh splits this option's value on spaces unless double-quoted.
        cmd.push_str(" -o ");
        cmd.push_str(&sh_quote(&format!("UserKnownHostsFile=\"{path}\"")));
        cmd.push_str(" -o StrictHostKeyChecking=yes");
    }
    // Best effort: without the redirect ssh's stderr just goes to ours.
    if let Some(log) = stderr_to.and_then(|p| path_str(p, "ssh log", false).ok()) {
        cmd.push_str(" \"$@\" 2>");
        cmd.push_str(&sh_quote(log));
    }
    Ok(cmd)
}

/// `path` as text for the shell command line; `in_ssh_option` paths go
/// inside an ssh `-o` value, where a double quote cannot be expressed.
fn path_str<'a>(path: &'a Path, what: &str, in_ssh_option: bool) -> Result<&'a str> {
    let s = path
        .to_str()
        .with_context(|| format!("the {what} path {} is not UTF-8", path.display()))?;
    if s.contains(['\n', '\r']) || (in_ssh_option && s.contains('"')) {
        bail!("the {what} path {s:?} contains a newline or double quote, which ssh cannot take");
    }
    Ok(s)
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Writes `remote.origin` (URL, refspec, no tags) into the mirror's config
/// if it differs from what is there.
/// `path` (the mirror's config) made readable by its owner only, if it is
/// not: it holds the source URL, and so its password.
fn keep_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mode = f
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?
        .mode();
    if mode & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot make {} private", path.display()))?;
    }
    Ok(())
}

fn record_remote(repo: &gix::Repository, url: &str, refspec: &str) -> Result<()> {
    let wanted_url = gix::url::parse(url).context("invalid URL")?;
    if let Ok(existing) = repo.find_remote("origin") {
        let same_url = existing.url(Direction::Fetch) == Some(&wanted_url);
        let specs: Vec<String> = existing
            .refspecs(Direction::Fetch)
            .iter()
            .map(|s| s.to_ref().to_bstring().to_string())
            .collect();
        if same_url && specs == [refspec] {
            // Written by an older driftless with the umask's mode.
            return keep_private(&repo.git_dir().join("config"));
        }
        if let Some(old) = existing.url(Direction::Fetch) {
            if !same_url {
                tracing::info!(
                    from = %redact(&old.to_bstring().to_string()),
                    to = %redact(url),
                    "the repository URL changed; the mirror now follows the new one"
                );
            }
        }
    }
    let config_path = repo.git_dir().join("config");
    let mut file =
        gix::config::File::from_path_no_includes(config_path.clone(), gix::config::Source::Local)
            .with_context(|| format!("cannot read {}", config_path.display()))?;
    let mut remote = anonymous_remote(repo, url, refspec)?;
    remote
        .save_as_to("origin", &mut file)
        .context("cannot serialise the remote")?;
    let mut bytes = Vec::new();
    file.write_to(&mut bytes)
        .context("cannot serialise the mirror config")?;
    // The state files' atomic replace, 0600 whatever the umask: the URL
    // in it may carry a password.
    crate::effects::state::write_replace(&config_path, &bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bug this pins: the mirror's config, which holds the source URL
    /// and so its password, was written with the umask's mode (0644 under
    /// the usual 022).
    #[test]
    fn the_remote_is_recorded_in_a_config_only_its_owner_can_read() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let repo = gix::init_bare(dir.path().join("m.git")).unwrap();
        let config = repo.git_dir().join("config");
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
        record_remote(
            &repo,
            "https://bot:s3cret@git.example.org/cfg.git",
            "+refs/heads/main:refs/remotes/origin/main",
        )
        .unwrap();
        let meta = std::fs::metadata(&config).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(std::fs::read_to_string(&config)
            .unwrap()
            .contains("git.example.org"));
        // One an older driftless wrote with the umask's mode is made
        // private by the next fetch, which finds the remote unchanged.
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
        let written = std::fs::read(&config).unwrap();
        let repo = gix::open(dir.path().join("m.git")).unwrap();
        record_remote(
            &repo,
            "https://bot:s3cret@git.example.org/cfg.git",
            "+refs/heads/main:refs/remotes/origin/main",
        )
        .unwrap();
        assert_eq!(std::fs::read(&config).unwrap(), written, "rewritten");
        let meta = std::fs::metadata(&config).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn tracking_refs() {
        assert_eq!(tracking_ref("refs/heads/main"), "refs/remotes/origin/main");
        assert_eq!(tracking_ref("refs/heads/a/b"), "refs/remotes/origin/a/b");
        assert_eq!(tracking_ref("refs/tags/v1"), "refs/remotes/origin/tags/v1");
    }

    #[test]
    fn ssh_command_is_batch_and_quoted() {
        let plain = ssh_command(&SshOptions::default(), None).unwrap();
        assert!(plain.starts_with("ssh -o BatchMode=yes"), "{plain}");
        assert!(!plain.contains(" -i "), "{plain}");

        let cmd = ssh_command(
            &SshOptions {
                key: Some("/etc/driftless/it's key".into()),
                known_hosts: Some("/etc/driftless/known hosts".into()),
            },
            Some(Path::new("/var/lib/driftless/mirror.git/err")),
        )
        .unwrap();
        assert!(
            cmd.contains(r"-i '/etc/driftless/it'\''s key' -o IdentitiesOnly=yes"),
            "{cmd}"
        );
        assert!(
            cmd.contains(r#"-o 'UserKnownHostsFile="/etc/driftless/known hosts"' -o StrictHostKeyChecking=yes"#),
            "{cmd}"
        );
        assert!(
            cmd.ends_with(
                r#"StrictHostKeyChecking=yes "$@" 2>'/var/lib/driftless/mirror.git/err'"#
            ),
            "{cmd}"
        );
        let with_quote = SshOptions {
            key: Some("/a\"b".into()),
            known_hosts: None,
        };
        assert!(
            ssh_command(&with_quote, None).is_ok(),
            "fine as an argument"
        );
        let with_quote = SshOptions {
            key: None,
            known_hosts: Some("/a\"b".into()),
        };
        assert!(ssh_command(&with_quote, None).is_err(), "not inside -o");
        let with_newline = SshOptions {
            key: Some("/a\nb".into()),
            known_hosts: None,
        };
        assert!(ssh_command(&with_newline, None).is_err());
    }
}
