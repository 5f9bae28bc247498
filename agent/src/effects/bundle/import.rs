//! Indexing a checked bundle into the mirror and moving the tracking ref.

use std::io::{BufReader, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::AtomicBool;

use anyhow::{anyhow, bail, Context, Result};

use super::header::Header;
use super::manifest::Manifest;
use crate::effects::fetch;
use crate::plan::diff::short;

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Imported {
    /// The tracking ref moved from `previous` to `tip`.
    New {
        tip: gix::ObjectId,
        previous: Option<gix::ObjectId>,
    },
    /// The mirror already had this tip.
    AlreadyHave { tip: gix::ObjectId },
    /// The tip is older than what the host applied or the mirror holds:
    /// the ref is not moved (no downgrade). Normal for old bundles left on
    /// a stick; an error when the operator imports just this one.
    Outdated { tip: gix::ObjectId, reason: String },
}

/// The policy an import enforces before moving the ref.
pub struct Policy<'a> {
    /// The full ref this host follows.
    pub full_ref: &'a str,
    /// Commits the host has applied (inventory, anti-rollback floor).
    pub applied: &'a [gix::ObjectId],
    pub allow_non_fast_forward: bool,
    /// Check everything, change nothing (`bundle verify`): the pack stays
    /// in the quarantine, which is then removed, and the ref is not moved.
    pub dry_run: bool,
}

/// Imports the staged copy of a checked bundle into `repo` (the mirror).
pub fn import(
    repo: &gix::Repository,
    staged: &Path,
    shown: &Path,
    header: &Header,
    manifest: &Manifest,
    policy: &Policy<'_>,
) -> Result<Imported> {
    if manifest.branch != policy.full_ref {
        bail!(
            "{} carries {}, but this host follows {}: use a bundle made with --branch {} (or change `branch`)",
            shown.display(),
            manifest.branch,
            policy.full_ref,
            policy.full_ref.strip_prefix("refs/heads/").unwrap_or(policy.full_ref)
        );
    }
    let tip = header
        .tip_of(policy.full_ref)
        .ok_or_else(|| anyhow!("{} has no {}", shown.display(), policy.full_ref))?;
    let tracking = fetch::tracking_ref(policy.full_ref);
    let current = repo
        .try_find_reference(tracking.as_str())
        .with_context(|| format!("cannot read {tracking} in the mirror"))?
        .map(|mut r| r.peel_to_id().map(|id| id.detach()))
        .transpose()
        .with_context(|| format!("cannot resolve {tracking} in the mirror"))?;

    let missing: Vec<_> = header
        .prerequisites
        .iter()
        .filter(|p| !repo.has_object(**p))
        .collect();
    if !missing.is_empty() {
        let have = policy
            .applied
            .first()
            .copied()
            .or(current)
            .map(|c| c.to_string());
        let hint = match have {
            Some(c) => format!(
                "this host has {}: make the bundle with `driftless bundle create --since {c}` (or a full bundle, without --since)",
                short(&c)
            ),
            None => "this host has no commits yet: make a full bundle (without --since)".to_string(),
        };
        bail!(
            "{} is incremental and needs {} which this host does not have; {hint}",
            shown.display(),
            missing
                .iter()
                .map(|m| short(&m.to_string()).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    // Anti-rollback before writing anything: a tip we already have can be
    // judged without its pack.
    if repo.has_object(tip) {
        if let Some(reason) = older(repo, tip, current, policy, shown)? {
            return Ok(Imported::Outdated { tip, reason });
        }
    }
    // The pack goes into a quarantine first: a bundle refused below (not a
    // commit, not descending from the applied commit, outdated) leaves the
    // mirror exactly as it was. Checks read through the quarantine, which
    // sees the mirror's objects too.
    let quarantine = Quarantine::new(repo, &staged.with_extension("quarantine"))?;
    index_pack(
        repo,
        &quarantine.pack_dir(),
        staged,
        header.pack_offset,
        shown,
    )?;
    let q = &quarantine.repo;
    let commit = q
        .find_object(tip)
        .with_context(|| {
            format!(
                "{} names tip {tip}, but its pack does not contain it",
                shown.display()
            )
        })?
        .try_into_commit()
        .map_err(|_| {
            anyhow!(
                "{}: {} ({tip}) is not a commit",
                shown.display(),
                policy.full_ref
            )
        })?;
    drop(commit);
    if let Some(reason) = older(q, tip, current, policy, shown)? {
        return Ok(Imported::Outdated { tip, reason });
    }
    for applied in policy.applied {
        if !policy.allow_non_fast_forward && !fetch::is_ancestor(q, *applied, tip)? {
            bail!(
                "{}: its tip {} does not descend from the applied commit {}: the bundle comes from a rewritten history or another repository. Nothing applied; if intended, use `driftless rollback` or allow_non_fast_forward",
                shown.display(),
                short(&tip.to_string()),
                short(&applied.to_string())
            );
        }
    }
    if current == Some(tip) {
        return Ok(Imported::AlreadyHave { tip });
    }
    if policy.dry_run {
        return Ok(Imported::New {
            tip,
            previous: current,
        });
    }
    quarantine.promote(repo)?;
    repo.reference(
        tracking.as_str(),
        tip,
        gix::refs::transaction::PreviousValue::Any,
        format!("driftless: bundle import {}", shown.display()),
    )
    .with_context(|| format!("cannot move {tracking} in the mirror to {tip}"))?;
    Ok(Imported::New {
        tip,
        previous: current,
    })
}

/// Why `tip` is a downgrade, if it is: an ancestor of what the host
/// applied, or of what the mirror already holds.
fn older(
    repo: &gix::Repository,
    tip: gix::ObjectId,
    current: Option<gix::ObjectId>,
    policy: &Policy<'_>,
    shown: &Path,
) -> Result<Option<String>> {
    for applied in policy.applied {
        if *applied != tip
            && fetch::is_ancestor(repo, tip, *applied)?
            && !policy.allow_non_fast_forward
        {
            return Ok(Some(format!(
                "{} is older than what this host runs: its tip {} is an ancestor of the applied commit {}. Refusing a downgrade; to go back on purpose use `driftless rollback --to {}`",
                shown.display(),
                short(&tip.to_string()),
                short(&applied.to_string()),
                short(&tip.to_string())
            )));
        }
    }
    if let Some(cur) = current {
        if cur != tip && fetch::is_ancestor(repo, tip, cur)? {
            return Ok(Some(format!(
                "{} is older than the bundle imported before: its tip {} is an ancestor of {}, which the mirror already has",
                shown.display(),
                short(&tip.to_string()),
                short(&cur.to_string())
            )));
        }
    }
    Ok(None)
}

/// A bare repository in the state directory's `incoming/` holding the
/// objects of one bundle until it is accepted; its object store borrows
/// the mirror's through `objects/info/alternates`. Removed when dropped
/// (accepted packs have been moved out by then); a crash leaves it for
/// [`clean_incoming`].
struct Quarantine {
    dir: std::path::PathBuf,
    repo: gix::Repository,
}

impl Quarantine {
    fn new(mirror: &gix::Repository, dir: &Path) -> Result<Self> {
        let _ = std::fs::remove_dir_all(dir);
        let made = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(dir.join("objects/pack"))?;
            std::fs::create_dir_all(dir.join("objects/info"))?;
            std::fs::create_dir_all(dir.join("refs/heads"))?;
            std::fs::write(dir.join("HEAD"), "ref: refs/heads/main\n")?;
            let objects = std::fs::canonicalize(mirror.objects.store_ref().path())?;
            std::fs::write(
                dir.join("objects/info/alternates"),
                format!("{}\n", objects.display()),
            )
        })();
        made.with_context(|| format!("cannot create the quarantine {}", dir.display()))?;
        let repo = gix::open_opts(dir, gix::open::Options::isolated())
            .with_context(|| format!("cannot open the quarantine {}", dir.display()))?;
        Ok(Quarantine {
            dir: dir.to_path_buf(),
            repo,
        })
    }

    fn pack_dir(&self) -> std::path::PathBuf {
        self.dir.join("objects/pack")
    }

    /// Moves the accepted pack into the mirror: the pack first, its index
    /// last (a pack is only looked at through its index), then the
    /// directory is made durable.
    fn promote(&self, mirror: &gix::Repository) -> Result<()> {
        let to = mirror.objects.store_ref().path().join("pack");
        std::fs::create_dir_all(&to).with_context(|| format!("cannot create {}", to.display()))?;
        let mut files: Vec<_> = std::fs::read_dir(self.pack_dir())
            .with_context(|| format!("cannot read {}", self.pack_dir().display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "pack" || x == "idx"))
            .collect();
        files.sort_by_key(|p| p.extension().is_some_and(|x| x == "idx"));
        for f in files {
            let name = f.file_name().context("pack file without a name")?;
            std::fs::rename(&f, to.join(name))
                .with_context(|| format!("cannot move {} into the mirror", f.display()))?;
        }
        crate::effects::state::fsync_dir(&to)
    }
}

impl Drop for Quarantine {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes what an interrupted import or verify left in `incoming` (under
/// the lock, which every import and verify takes: none is running): its
/// quarantines, and its staged copies (`*.bundle`, each as large as its
/// bundle, up to max_bundle_size; a stick pulled mid-import stops the run
/// before it removes its own).
pub fn clean_incoming(incoming: &Path) {
    if let Ok(rd) = std::fs::read_dir(incoming) {
        for e in rd.flatten() {
            let path = e.path();
            let ext = path.extension();
            if ext.is_some_and(|x| x == "quarantine") {
                let _ = std::fs::remove_dir_all(&path);
            } else if ext.is_some_and(|x| x == "bundle") && e.file_type().is_ok_and(|t| t.is_file())
            {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// Hands the pack after the header to gix, which checks every object,
/// completes a thin pack from the mirror, and writes pack + index into
/// `pack_dir` (the quarantine).
fn index_pack(
    repo: &gix::Repository,
    pack_dir: &Path,
    staged: &Path,
    offset: usize,
    shown: &Path,
) -> Result<()> {
    let mut file = std::fs::File::open(staged)
        .with_context(|| format!("cannot open the staged copy {}", staged.display()))?;
    file.seek(SeekFrom::Start(offset as u64))
        .with_context(|| format!("cannot read {}", staged.display()))?;
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let never = AtomicBool::new(false);
    let outcome = gix::odb::pack::Bundle::write_to_directory(
        &mut reader,
        Some(pack_dir),
        &mut gix::progress::Discard,
        &never,
        Some(repo.objects.clone()),
        gix::hash::Kind::Sha1,
        gix::odb::pack::bundle::write::Options::default(),
    )
    .map_err(|e| anyhow!("{e}"))
    .with_context(|| {
        format!(
            "the pack in {} cannot be indexed (damaged, or its delta bases are missing); nothing was changed",
            shown.display()
        )
    })?;
    // The .keep file protects a new pack from gc until refs point to it;
    // driftless never runs gc, and the ref moves right after.
    if let Some(keep) = outcome.keep_path {
        let _ = std::fs::remove_file(keep);
    }
    // gix's object store notices the new pack on the next lookup miss.
    Ok(())
}
