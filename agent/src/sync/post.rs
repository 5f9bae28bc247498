//! After the commit point: daemon-reload, unit actions, health checks, and
//! the revert when any of them fails.

use anyhow::{bail, Result};
use tracing::{info, warn};

use crate::config::Settings;
use crate::effects::checks::{self, CheckResult};
use crate::effects::systemd::{is_unit_file, Systemd};
use crate::plan::Plan;

/// What the post-apply stage did.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct PostReport {
    pub daemon_reload: bool,
    pub actions: Vec<String>,
    pub checks: Vec<CheckResult>,
    /// Set when this stage failed: why.
    pub failure: Option<String>,
}

/// Runs the plan's systemd side and its checks. Unit actions need the live
/// system (`root = "/"`); checks run there, or under a prefix with
/// `run_checks`. Returns the report; `failure` is set if anything failed.
pub async fn run(settings: &Settings, plan: &Plan) -> PostReport {
    let mut report = PostReport::default();
    if let Err(e) = run_inner(settings, plan, &mut report).await {
        report.failure = Some(format!("{e:#}"));
    }
    report
}

async fn run_inner(settings: &Settings, plan: &Plan, report: &mut PostReport) -> Result<()> {
    let unit_files = plan.changes.iter().any(|c| is_unit_file(c.path.as_str()));
    let needs_units = unit_files
        || !plan.unit_actions.is_empty()
        || plan
            .checks
            .iter()
            .any(|c| matches!(c.probe, crate::desired::spec::Probe::Unit(_)));
    let systemd = if settings.live && needs_units {
        Some(Systemd::connect(settings.job_timeout).await?)
    } else {
        None
    };
    if !settings.live && (unit_files || !plan.unit_actions.is_empty()) {
        warn!("--root is not /: daemon-reload and unit actions are skipped");
    }
    if let Some(sd) = &systemd {
        if unit_files {
            info!("unit files changed: daemon-reload");
            sd.daemon_reload().await?;
            report.daemon_reload = true;
        }
        for action in &plan.unit_actions {
            info!(unit = %action.unit, action = %action.action, "unit action");
            let state = sd.run(action).await?;
            report
                .actions
                .push(format!("{} {}: {}", action.action, action.unit, state));
        }
    }
    if settings.run_checks && !plan.checks.is_empty() {
        report.checks = checks::run_all(&plan.checks, systemd.as_ref()).await;
        let failed: Vec<String> = report
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| {
                format!(
                    "check {:?} failed after {} attempt(s): {}",
                    c.name, c.attempts, c.message
                )
            })
            .collect();
        for c in &report.checks {
            if c.ok {
                info!(check = %c.name, attempts = c.attempts, "check passed");
            }
        }
        if !failed.is_empty() {
            bail!("{}", failed.join("; "));
        }
    }
    Ok(())
}
