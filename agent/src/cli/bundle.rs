//! `driftless bundle …`: argument handling and output. The work is in
//! [`crate::effects::bundle`] and [`crate::sync::bundle`] /
//! [`crate::sync::stick`].

use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use serde_json::json;

use super::{output, BundleCommand, Format, Overrides};
use crate::desired::spec::shown;
use crate::effects::bundle::create::{self, CreateOptions};
use crate::effects::state::history::Outcome;
use crate::exit::{Classify, Error, Failure};
use crate::plan::diff::short;
use crate::sync::stick::{self, StickOptions};

pub(super) fn run(cmd: BundleCommand) -> Result<ExitCode, Error> {
    match cmd {
        BundleCommand::Create(a) => {
            let branch = a
                .branch
                .clone()
                .unwrap_or_else(|| crate::config::DEFAULT_BRANCH.into());
            let created = create::create(&CreateOptions {
                repo: &a.repo,
                branch: &branch,
                since: a.since.as_deref(),
                out: &a.out,
                sign_key: &a.sign_key,
                now: super::now(),
            })
            .kind(Failure::Failed)?;
            let m = &created.manifest;
            outln!(
                "bundle of {} at {} ({} bytes, {}):",
                m.branch,
                short(&m.tip),
                m.bundle_size,
                if m.prerequisites.is_empty() {
                    "full".to_string()
                } else {
                    format!(
                        "incremental after {}",
                        m.prerequisites
                            .iter()
                            .map(|p| short(p))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            );
            for f in &created.files {
                outln!("  {}", f.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        BundleCommand::Verify {
            file,
            format,
            config,
            trust,
            state,
        } => {
            let s = super::settings(&Overrides {
                config: Some(&config),
                trust: Some(&trust),
                state: Some(&state),
                ..Default::default()
            })?;
            let r = crate::sync::bundle::verify_file(&s, &file)?;
            match format {
                Format::Json => output::print_json(&json!({
                    "apiVersion": output::API_VERSION,
                    "kind": "BundleVerification",
                    "status": r,
                }))?,
                Format::Text => outln!(
                    "{}: good signature by {}; {} at {} ({} bytes{}); {}",
                    file.display(),
                    r.signer,
                    r.manifest.branch,
                    short(&r.manifest.tip),
                    r.manifest.bundle_size,
                    if r.manifest.prerequisites.is_empty() {
                        ", full".to_string()
                    } else {
                        ", incremental".to_string()
                    },
                    r.result
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        BundleCommand::Import(a) => {
            let s = super::settings(&Overrides::host(&a.host).checks(&a.checks))?;
            let outcomes = crate::sync::bundle::import_files(
                &s,
                &a.files,
                Duration::from_secs(a.wait),
                super::now(),
            )?;
            // Importing an older bundle on purpose is refused (a downgrade);
            // `rollback` is the way back.
            let refused: Vec<_> = outcomes
                .iter()
                .filter(|o| o.refused() || o.outdated())
                .collect();
            if a.format == Format::Json {
                output::print_json(&json!({
                    "apiVersion": output::API_VERSION,
                    "kind": "BundleImport",
                    "status": { "bundles": outcomes },
                }))?;
            } else {
                for o in outcomes.iter().filter(|o| o.message.is_none()) {
                    outln!(
                        "{}: {} {}",
                        o.file,
                        o.result,
                        o.tip.as_deref().map(short).unwrap_or("")
                    );
                }
            }
            let reasons = refused
                .iter()
                .map(|o| format!("{}: {}", o.file, o.message.as_deref().unwrap_or(&o.result)))
                .collect::<Vec<_>>()
                .join("\n  ");
            if !refused.is_empty() && refused.len() == outcomes.len() {
                return Err(Error::new(
                    Failure::Refused,
                    anyhow!("no bundle imported, nothing applied:\n  {reasons}"),
                ));
            }
            if !a.no_sync {
                let opts = crate::sync::SyncOptions {
                    wait: Duration::from_secs(a.wait),
                    apply: crate::effects::apply::ApplyOptions {
                        crash_after: super::test_hook_crash_after(),
                    },
                    retry: false,
                    full: false,
                    idle_logged: None,
                };
                let rt = super::runtime()?;
                crate::stop::defer_sigterm(rt.handle());
                let report = crate::sync::sync_once(&s, &opts, super::now(), rt.handle())?;
                output::print_sync(&report);
            }
            if refused.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                Err(Error::new(
                    Failure::Refused,
                    anyhow!(
                        "{} of {} bundles refused (see above)",
                        refused.len(),
                        outcomes.len()
                    ),
                ))
            }
        }
        BundleCommand::Stick(a) => {
            let s = super::settings(&Overrides::host(&a.host).checks(&a.checks))?;
            let rt = super::runtime()?;
            crate::stop::defer_sigterm(rt.handle());
            let opts = crate::sync::SyncOptions {
                wait: Duration::from_secs(a.wait),
                apply: crate::effects::apply::ApplyOptions {
                    crash_after: super::test_hook_crash_after(),
                },
                retry: false,
                full: false,
                idle_logged: None,
            };
            let report = stick::run(
                &s,
                &StickOptions {
                    path: a.stick,
                    reports: a.reports,
                    wait: Duration::from_secs(a.wait),
                },
                &opts,
                super::now(),
                rt.handle(),
            )?;
            outln!(
                "{}: {} {}",
                report.host,
                outcome_str(&report.outcome),
                report.commit.as_deref().map(short).unwrap_or("-")
            );
            Ok(ExitCode::SUCCESS)
        }
        BundleCommand::Reports { dir, format } => {
            let reports = stick::read_reports(&dir).kind(Failure::Failed)?;
            if format == Format::Json {
                let items: Vec<_> = reports
                    .iter()
                    .map(|(p, r)| match r {
                        Ok(r) => json!(r),
                        Err(e) => {
                            json!({ "file": p.display().to_string(), "error": format!("{e:#}") })
                        }
                    })
                    .collect();
                output::print_json(&json!({
                    "apiVersion": output::API_VERSION,
                    "kind": "StickReports",
                    "status": { "reports": items },
                }))?;
                return Ok(ExitCode::SUCCESS);
            }
            if reports.is_empty() {
                outln!("no reports in {}", dir.display());
            } else {
                outln!(
                    "{:<20} {:<20} {:<9} {:<12} {:>6}  MESSAGE",
                    "HOST",
                    "TIME",
                    "RESULT",
                    "COMMIT",
                    "DRIFT"
                );
            }
            let mut bad = 0;
            for (p, r) in &reports {
                match r {
                    Ok(r) => {
                        if !matches!(r.outcome, Outcome::Applied | Outcome::Unchanged) {
                            bad += 1;
                        }
                        // A stick is untrusted: what it says is shown escaped.
                        outln!(
                            "{:<20} {:<20} {:<9} {:<12} {:>6}  {}",
                            shown(&r.host),
                            super::time_str(r.time),
                            outcome_str(&r.outcome),
                            shown(r.commit.as_deref().map(short).unwrap_or("-")),
                            r.drifted.len(),
                            shown(
                                r.message
                                    .as_deref()
                                    .and_then(|m| m.lines().next())
                                    .unwrap_or("")
                            )
                        );
                    }
                    Err(e) => {
                        bad += 1;
                        outln!(
                            "{:<20} unreadable: {}",
                            shown(&p.display().to_string()),
                            shown(&format!("{e:#}"))
                        );
                    }
                }
            }
            if !reports.is_empty() {
                outln!("{} host(s), {bad} need attention", reports.len());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn outcome_str(o: &Outcome) -> String {
    serde_json::to_value(o)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}
