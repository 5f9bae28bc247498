//! `driftless bundle create`: on a connected machine, write a bundle, its
//! manifest and the manifest's signature.
//!
//! This side runs the real `git` (`git bundle create`): the machine that
//! makes bundles is where the repository is worked on, and the real tool
//! is the surest way to the real format. Hosts importing bundles need no
//! git.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::header;
use super::manifest::{self, Manifest, FORMAT};
use crate::effects::fetch::{self, Location};
use crate::effects::state::write_atomic;

pub struct CreateOptions<'a> {
    /// A local repository path, or a URL git can fetch.
    pub repo: &'a str,
    /// Branch name or full ref.
    pub branch: &'a str,
    /// Make an incremental bundle holding only commits after this one.
    pub since: Option<&'a str>,
    pub out: &'a Path,
    pub sign_key: &'a Path,
    pub now: i64,
}

/// What was written.
pub struct Created {
    pub manifest: Manifest,
    pub files: Vec<PathBuf>,
}

pub fn create(opts: &CreateOptions<'_>) -> Result<Created> {
    let full_ref = fetch::full_ref_name(opts.branch)?;
    let location = Location::parse(opts.repo)?;
    // A remote is fetched into a throwaway bare repository first.
    let scratch;
    let repo_dir: PathBuf = match &location {
        Location::Local(p) => p.clone(),
        Location::Bundles => bail!("--repo must be a repository path or URL, not `bundle:`"),
        Location::Remote(url) => {
            scratch = tempfile::Builder::new()
                .prefix(".driftless-bundle-")
                .tempdir()
                .context("cannot create a scratch directory")?;
            let dir = scratch.path().join("repo.git");
            git(None, &["init", "--bare", "-q", path_str(&dir)?])?;
            git(
                Some(&dir),
                &[
                    "fetch",
                    "-q",
                    "--no-tags",
                    url,
                    &format!("+{full_ref}:{full_ref}"),
                ],
            )
            .with_context(|| format!("cannot fetch {full_ref} from {}", fetch::redact(url)))?;
            dir
        }
    };
    let tip = git(
        Some(&repo_dir),
        &[
            "rev-parse",
            "--verify",
            "-q",
            &format!("{full_ref}^{{commit}}"),
        ],
    )
    .with_context(|| format!("{full_ref} does not exist in {}", opts.repo))?;
    let tip_time: i64 = git(Some(&repo_dir), &["log", "-1", "--format=%ct", &tip])?
        .parse()
        .context("git printed an unexpected commit time")?;
    let mut revs = vec![full_ref.clone()];
    if let Some(since) = opts.since {
        let base = git(
            Some(&repo_dir),
            &[
                "rev-parse",
                "--verify",
                "-q",
                &format!("{since}^{{commit}}"),
            ],
        )
        .with_context(|| format!("--since {since}: no such commit in {}", opts.repo))?;
        if base == tip {
            bail!(
                "--since {since} is the tip of {full_ref} already: there is nothing new to bundle"
            );
        }
        if git(
            Some(&repo_dir),
            &["merge-base", "--is-ancestor", &base, &tip],
        )
        .is_err()
        {
            bail!("--since {since} is not an ancestor of {full_ref} ({tip}): an incremental bundle must start from a commit the hosts have and the branch descends from");
        }
        revs.push(format!("^{base}"));
    }

    // git runs in the repository (-C): relative paths must not follow it.
    let out = &std::path::absolute(opts.out).with_context(|| {
        format!(
            "--out {}: cannot make the path absolute",
            opts.out.display()
        )
    })?;
    let tmp = sibling(out, ".tmp-bundle")?;
    let mut args = vec!["bundle", "create", "-q", path_str(&tmp)?];
    args.extend(revs.iter().map(String::as_str));
    git(Some(&repo_dir), &args).context("git bundle create failed")?;
    let result = finish(
        opts, &location, &repo_dir, &full_ref, &tip, tip_time, &tmp, out,
    );
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Manifest, signature, and the files moved into place (bundle first, so a
/// manifest never names a bundle that is not there).
#[allow(clippy::too_many_arguments)]
fn finish(
    opts: &CreateOptions<'_>,
    location: &Location,
    repo_dir: &Path,
    full_ref: &str,
    tip: &str,
    tip_time: i64,
    tmp: &Path,
    out: &Path,
) -> Result<Created> {
    let bytes = std::fs::read(tmp).with_context(|| format!("cannot read {}", tmp.display()))?;
    let head = header::parse(&bytes).context("git wrote a bundle this driftless cannot read")?;
    use sha2::Digest;
    let manifest = Manifest {
        format: FORMAT.to_string(),
        source: match location {
            Location::Remote(u) => fetch::redact(u),
            _ => std::path::absolute(repo_dir)
                .unwrap_or(repo_dir.to_path_buf())
                .display()
                .to_string(),
        },
        branch: full_ref.to_string(),
        tip: tip.to_string(),
        tip_time,
        prerequisites: head.prerequisites.iter().map(|p| p.to_string()).collect(),
        created_at: opts.now,
        bundle_sha256: hex::encode(sha2::Sha256::digest(&bytes)),
        bundle_size: bytes.len() as u64,
    };
    let mut mbytes =
        serde_json::to_vec_pretty(&manifest).context("cannot serialise the manifest")?;
    mbytes.push(b'\n');
    let sig = crate::trust::sign_detached(opts.sign_key, crate::trust::BUNDLE_NAMESPACE, &mbytes)
        .with_context(|| format!("cannot sign with {}", opts.sign_key.display()))?;
    std::fs::rename(tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    let mpath = manifest::manifest_path(out);
    let spath = manifest::signature_path(out);
    write_atomic(&mpath, &mbytes)?;
    write_atomic(&spath, sig.as_bytes())?;
    Ok(Created {
        manifest,
        files: vec![out.to_path_buf(), mpath, spath],
    })
}

fn sibling(path: &Path, suffix: &str) -> Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("--out {} has no file name", path.display()))?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!("{suffix}-{}", std::process::id()));
    Ok(path.with_file_name(tmp))
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// Runs git with arguments (no shell); returns trimmed stdout.
fn git(dir: Option<&Path>, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("git");
    if let Some(d) = dir {
        cmd.arg("-C").arg(d);
    }
    cmd.args(args);
    let out = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow::anyhow!("`bundle create` runs git, which is not installed here (it is needed on the machine that makes bundles, not on the hosts)")
        } else {
            anyhow::Error::new(e).context("cannot run git")
        }
    })?;
    if !out.status.success() {
        bail!(
            "git {} failed: {}",
            args.first().copied().unwrap_or(""),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
