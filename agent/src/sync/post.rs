//! After the switch-in, before the commit point: daemon-reload, unit
//! actions, post hooks, health checks (the caller reverts when any of them
//! fails).

use anyhow::{bail, Result};
use tracing::{info, warn};

use crate::config::Settings;
use crate::desired::spec::HookWhen;
use crate::effects::apply::journal::PostActions;
use crate::effects::checks::{self, CheckResult};
use crate::effects::failpoint;
use crate::effects::hooks::{self, HookResult};
use crate::effects::systemd::{is_unit_file, Systemd};
use crate::plan::Plan;

/// What the post-apply stage did.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct PostReport {
    pub daemon_reload: bool,
    pub actions: Vec<String>,
    pub checks: Vec<CheckResult>,
    /// The post hooks run, in order (a failing one is the last).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<HookResult>,
    /// Set when this stage failed: why.
    pub failure: Option<String>,
}

/// Which run of the post stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// After the transaction switched in: unit actions, post hooks, checks.
    Apply,
    /// After a revert, for the restored files: unit actions and checks,
    /// never the hooks (they are not undone, nor re-run).
    Restored,
}

/// Runs the plan's systemd side, its post hooks and its checks. Unit
/// actions need the live system (`root = "/"`); hooks and checks run
/// there, or under a prefix with `run_checks`. Returns the report;
/// `failure` is set if anything failed.
pub async fn run(settings: &Settings, plan: &Plan, stage: Stage) -> PostReport {
    let mut report = PostReport::default();
    if let Err(e) = run_inner(settings, plan, stage, &mut report).await {
        report.failure = Some(format!("{e:#}"));
    }
    report
}

async fn run_inner(
    settings: &Settings,
    plan: &Plan,
    stage: Stage,
    report: &mut PostReport,
) -> Result<()> {
    let unit_files = plan.changes.iter().any(|c| is_unit_file(c.path.as_str()));
    let needs_units = unit_files
        || !plan.units.is_empty()
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
        let actions = PostActions {
            daemon_reload: unit_files,
            unit_actions: plan.unit_actions.clone(),
        };
        tell(sd, &actions, report).await?;
    }
    if stage == Stage::Apply {
        if settings.run_checks {
            hooks::run(&plan.hooks, HookWhen::Post, &mut report.hooks).await?;
        } else {
            hooks::skipped(&plan.hooks, HookWhen::Post);
        }
    }
    if settings.run_checks && !plan.checks.is_empty() {
        failpoint::hit("post.checks")?;
        report.checks = checks::run_all(&plan.checks, systemd.as_ref()).await;
        failpoint::hit("post.checked")?;
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

/// Daemon-reload when a unit file changed, then the unit actions, each
/// waited for.
async fn tell(sd: &Systemd, actions: &PostActions, report: &mut PostReport) -> Result<()> {
    if actions.daemon_reload {
        info!("unit files changed: daemon-reload");
        sd.daemon_reload().await?;
        report.daemon_reload = true;
    }
    for action in &actions.unit_actions {
        failpoint::hit("post.unit_action")?;
        info!(unit = %action.unit, action = %action.action, "unit action");
        let state = sd.run(action).await?;
        report
            .actions
            .push(format!("{} {}: {}", action.action, action.unit, state));
    }
    Ok(())
}

/// After a recovery put back the files of an interrupted transaction:
/// tells systemd again what the transaction had told it, so units run the
/// restored files rather than what they loaded from the rolled-back ones.
/// Nothing to do under a `--root` prefix (no live systemd).
pub async fn retell(settings: &Settings, actions: &PostActions) -> Result<Vec<String>> {
    if !settings.live || actions.is_empty() {
        return Ok(Vec::new());
    }
    let sd = Systemd::connect(settings.job_timeout).await?;
    let mut report = PostReport::default();
    tell(&sd, actions, &mut report).await?;
    Ok(report.actions)
}

/// `enabled = true/false` of the declared units.
async fn converge_enablement(sd: &Systemd, plan: &Plan, report: &mut PostReport) -> Result<()> {
    let mut changed = false;
    for u in &plan.units {
        let Some(want) = u.enabled else { continue };
        let now = sd.unit_file_state(&u.name).await?;
        let is = matches!(now.as_str(), "enabled" | "enabled-runtime");
        if is != want {
            info!(unit = %u.name, enable = want, "unit enablement");
            sd.enable(&u.name, want).await?;
            report.actions.push(format!(
                "{} {}",
                if want { "enable" } else { "disable" },
                u.name
            ));
            changed = true;
        }
    }
    if changed {
        sd.daemon_reload().await?;
        report.daemon_reload = true;
    }
    Ok(())
}

/// `started = true/false` of the declared units.
async fn converge_running(sd: &Systemd, plan: &Plan, report: &mut PostReport) -> Result<()> {
    for u in &plan.units {
        let Some(want) = u.started else { continue };
        let st = sd.state(&u.name).await?;
        let running = matches!(st.active.as_str(), "active" | "activating" | "reloading");
        if running != want {
            info!(unit = %u.name, start = want, "unit start/stop");
            let after = sd.start_stop(&u.name, want).await?;
            report.actions.push(format!(
                "{} {}: {after}",
                if want { "start" } else { "stop" },
                u.name
            ));
        }
    }
    Ok(())
}

/// On a sync that changed no file: only bring declared units to their
/// state (a unit stopped by hand is started again). No checks, no revert.
pub async fn converge_units(settings: &Settings, plan: &Plan) -> Result<Vec<String>> {
    if !settings.live || plan.units.is_empty() {
        return Ok(Vec::new());
    }
    let sd = Systemd::connect(settings.job_timeout).await?;
    let mut report = PostReport::default();
    converge_enablement(&sd, plan, &mut report).await?;
    converge_running(&sd, plan, &mut report).await?;
    Ok(report.actions)
}
