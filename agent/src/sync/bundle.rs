//! `driftless bundle import`: verify signed bundles, index them into the
//! mirror, then sync the new tip like any fetched commit.
//!
//! Several bundles are imported oldest first (by their signed
//! `created_at`), so a stick carrying a full bundle and later incremental
//! ones applies them in the only order that works. A bad bundle is
//! reported and skipped; it never stops the good ones before it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use serde::Serialize;
use tracing::info;

use crate::config::Settings;
use crate::effects::bundle::{import, manifest};
use crate::effects::fetch;
use crate::exit::{Classify, Error, Failure};
use crate::plan::diff::short;

/// What happened to one bundle file.
#[derive(Debug, Clone, Serialize)]
pub struct BundleOutcome {
    pub file: String,
    /// `imported`, `already-have`, `outdated` (older than what the host
    /// has: skipped, never a downgrade) or `refused`.
    pub result: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl BundleOutcome {
    pub fn refused(&self) -> bool {
        self.result == "refused"
    }
    pub fn outdated(&self) -> bool {
        self.result == "outdated"
    }
}

/// The most bundles one import takes. Each is verified, and each refusal
/// is a line of the host's history: a stick of thousands of junk files
/// (anyone can plug one in) would cost minutes and push the host's real
/// history out of its bounded file.
pub const MAX_BUNDLES: usize = 128;

/// Imports `files` (each the `.bundle` path) under the lock. Per-file
/// problems are outcomes, not errors; errors are what stops every import
/// (no lock, no signers, unusable mirror).
pub fn import_files(
    settings: &Settings,
    files: &[PathBuf],
    wait: Duration,
    now: i64,
) -> Result<Vec<BundleOutcome>, Error> {
    if files.len() > MAX_BUNDLES {
        return Err(Error::new(
            Failure::Refused,
            anyhow!(
                "{} bundles offered at once, more than {MAX_BUNDLES}: refused, nothing imported. A host needs only \
                 the bundles since its last import, or one full bundle: remove the older ones",
                files.len()
            ),
        ));
    }
    let signers = super::allowed_signers(settings)?;
    let (state, _guard) = super::lock(settings, wait)?;
    let spec = super::source_spec(settings)?;
    let repo = fetch::mirror_for_import(&spec, &state.mirror()).kind(Failure::Config)?;
    let full_ref = fetch::full_ref_name(&settings.branch).kind(Failure::Config)?;
    let applied = applied_ids(settings, &state)?;
    let incoming = incoming_dir(&state)?;

    // Oldest first, by the signed creation time; unreadable manifests sort
    // last and are refused with their own message below.
    let mut ordered: Vec<(i64, PathBuf)> = files
        .iter()
        .map(|f| {
            let t = manifest::verify_manifest(f, &signers)
                .map(|(m, _)| m.created_at)
                .unwrap_or(i64::MAX);
            (t, f.clone())
        })
        .collect();
    ordered.sort();

    let policy = import::Policy {
        full_ref: &full_ref,
        applied: &applied,
        allow_non_fast_forward: settings.allow_non_fast_forward,
        dry_run: false,
    };
    let mut out = Vec::new();
    for (_, file) in ordered {
        let staged = incoming.join(format!("import-{}.bundle", std::process::id()));
        let result = import_one(
            &repo,
            &file,
            &staged,
            &signers,
            &policy,
            settings.max_bundle_size,
        );
        let _ = std::fs::remove_file(&staged);
        let shown = file.display().to_string();
        out.push(match result {
            Ok((imported, signer)) => {
                let mut message = None;
                let (result, tip) = match imported {
                    import::Imported::New { tip, previous } => {
                        info!(bundle = %shown, tip = %short(&tip.to_string()), previous = ?previous.map(|p| short(&p.to_string()).to_string()), signer = %signer, "bundle imported");
                        ("imported", tip)
                    }
                    import::Imported::AlreadyHave { tip } => {
                        info!(bundle = %shown, tip = %short(&tip.to_string()), "bundle already imported");
                        ("already-have", tip)
                    }
                    import::Imported::Outdated { tip, reason } => {
                        info!(bundle = %shown, tip = %short(&tip.to_string()), "bundle skipped: {reason}");
                        super::runlog::record(
                            &state,
                            now,
                            crate::effects::state::history::Outcome::Outdated,
                            Some(tip.to_string()),
                            None,
                            None,
                            Some(format!("bundle {shown} set aside: {reason}")),
                        );
                        message = Some(reason);
                        ("outdated", tip)
                    }
                };
                BundleOutcome {
                    file: shown,
                    result: result.into(),
                    tip: Some(tip.to_string()),
                    signer: Some(signer),
                    message,
                }
            }
            Err(e) => {
                // The caller reports it (error, stick report, journal);
                // history and `status` keep why.
                info!(bundle = %shown, "bundle refused: {e:#}");
                super::runlog::record(
                    &state,
                    now,
                    crate::effects::state::history::Outcome::Refused,
                    None,
                    None,
                    None,
                    Some(format!("bundle {shown} refused: {e:#}")),
                );
                BundleOutcome {
                    file: shown,
                    result: "refused".into(),
                    tip: None,
                    signer: None,
                    message: Some(format!("{e:#}")),
                }
            }
        });
    }
    Ok(out)
}

fn import_one(
    repo: &gix::Repository,
    file: &Path,
    staged: &Path,
    signers: &crate::trust::AllowedSigners,
    policy: &import::Policy<'_>,
    max_size: u64,
) -> anyhow::Result<(import::Imported, String)> {
    let _spinner = crate::progress::spinner(&format!("importing {}", file.display()));
    let (m, signer) = manifest::verify_manifest(file, signers)?;
    let header = manifest::check_contents(file, &m, Some(staged), max_size)?;
    let imported = import::import(repo, staged, file, &header, &m, policy)?;
    Ok((
        imported,
        format!("{} ({})", signer.principal, signer.fingerprint),
    ))
}

/// The commits this host applied (inventory, anti-rollback floor).
fn applied_ids(settings: &Settings, state: &super::StateDir) -> Result<Vec<gix::ObjectId>, Error> {
    let mut applied = Vec::new();
    for c in super::applied_commits(settings, state)? {
        applied.push(
            gix::ObjectId::from_hex(c.as_bytes())
                .with_context(|| format!("the state names an invalid commit {c:?}"))
                .kind(Failure::Failed)?,
        );
    }
    Ok(applied)
}

/// `incoming/` of the state directory, without what an interrupted import
/// or verify left there (see [`import::clean_incoming`]; the caller holds
/// the lock).
fn incoming_dir(state: &super::StateDir) -> Result<PathBuf, Error> {
    let incoming = state.path().join("incoming");
    std::fs::create_dir_all(&incoming)
        .with_context(|| format!("cannot create {}", incoming.display()))
        .kind(Failure::Failed)?;
    import::clean_incoming(&incoming);
    Ok(incoming)
}

/// `driftless bundle verify FILE`: signature, hash and header; on a host
/// with a mirror, also everything an import decides (prerequisites, not
/// older than the applied commit, descends from it), by importing into a
/// quarantine that is then thrown away. Changes nothing.
pub fn verify_file(settings: &Settings, file: &Path) -> Result<VerifyReport, Error> {
    let signers = super::allowed_signers(settings)?;
    let (m, signer) = manifest::verify_manifest(file, &signers).kind(Failure::Refused)?;
    let signer = format!("{} ({})", signer.principal, signer.fingerprint);
    let full_ref = fetch::full_ref_name(&settings.branch).kind(Failure::Config)?;
    if m.branch != full_ref {
        return Err(Error::new(
            Failure::Refused,
            anyhow!(
                "{} carries {}, but this host follows {full_ref}",
                file.display(),
                m.branch
            ),
        ));
    }
    if !settings.state_dir.join("mirror.git").exists() {
        manifest::check_contents(file, &m, None, settings.max_bundle_size)
            .kind(Failure::Refused)?;
        return Ok(VerifyReport {
            manifest: m,
            signer,
            result:
                "valid; this host has no mirror, so it was not compared with what the host applied"
                    .into(),
        });
    }
    let (state, _guard) = super::lock(settings, Duration::from_secs(30))?;
    let spec = super::source_spec(settings).unwrap_or_else(|_| fetch::SourceSpec {
        location: fetch::Location::Bundles,
        branch: settings.branch.clone(),
        ssh: Default::default(),
    });
    let repo = fetch::mirror_for_import(&spec, &state.mirror()).kind(Failure::Config)?;
    let applied = applied_ids(settings, &state)?;
    let staged = incoming_dir(&state)?.join(format!("verify-{}.bundle", std::process::id()));
    let policy = import::Policy {
        full_ref: &full_ref,
        applied: &applied,
        allow_non_fast_forward: settings.allow_non_fast_forward,
        dry_run: true,
    };
    let checked = manifest::check_contents(file, &m, Some(&staged), settings.max_bundle_size)
        .and_then(|header| import::import(&repo, &staged, file, &header, &m, &policy));
    let _ = std::fs::remove_file(&staged);
    let result = match checked.kind(Failure::Refused)? {
        import::Imported::New { tip, .. } => format!("would import {}", short(&tip.to_string())),
        import::Imported::AlreadyHave { tip } => {
            format!("already imported ({})", short(&tip.to_string()))
        }
        import::Imported::Outdated { reason, .. } => {
            return Err(Error::new(Failure::Refused, anyhow!("{reason}")))
        }
    };
    Ok(VerifyReport {
        manifest: m,
        signer,
        result,
    })
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub manifest: manifest::Manifest,
    pub signer: String,
    /// What an import would do.
    pub result: String,
}
