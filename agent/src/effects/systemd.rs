//! systemd over D-Bus (`org.freedesktop.systemd1`), never `systemctl`.
//!
//! Every job is waited for: we subscribe to `JobRemoved` *before* issuing
//! the call (a fast job could otherwise finish before we listen), match the
//! job path the call returns, and fail on any result but `done`. Then the
//! unit's `ActiveState`/`SubState`/`Result` are read back, because a job
//! can be `done` while the service it started has already died.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use zbus_systemd::systemd1::{ManagerProxy, UnitProxy};
use zbus_systemd::zbus;

use crate::desired::spec::{UnitAction, UnitActionKind};

/// A unit's state as systemd reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UnitState {
    pub unit: String,
    pub active: String,
    pub sub: String,
    /// The `Result` of a service ("success", "exit-code", ...), if any.
    pub result: Option<String>,
}

impl std::fmt::Display for UnitState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is {} ({})", self.unit, self.active, self.sub)?;
        if let Some(r) = &self.result {
            if r != "success" {
                write!(f, ", result {r}")?;
            }
        }
        Ok(())
    }
}

pub struct Systemd {
    conn: zbus::Connection,
    manager: ManagerProxy<'static>,
    /// How long one job may take.
    pub job_timeout: Duration,
}

impl Systemd {
    /// Connects to the system bus.
    pub async fn connect(job_timeout: Duration) -> Result<Self> {
        let conn = zbus::Connection::system()
            .await
            .context("cannot connect to the system D-Bus (is systemd running?)")?;
        let manager = ManagerProxy::new(&conn)
            .await
            .context("cannot reach org.freedesktop.systemd1")?;
        manager
            .subscribe()
            .await
            .context("cannot subscribe to systemd job signals")?;
        Ok(Systemd {
            conn,
            manager,
            job_timeout,
        })
    }

    /// `systemctl reboot`: queues `reboot.target` (irreversibly: nothing
    /// started later cancels it). Returns once systemd accepted the job;
    /// the agent is stopped with every other service.
    pub async fn reboot(&self) -> Result<()> {
        self.manager
            .start_unit("reboot.target".into(), "replace-irreversibly".into())
            .await
            .context("systemd refused to start reboot.target")?;
        Ok(())
    }

    /// `systemctl daemon-reload`: returns when systemd has reloaded.
    pub async fn daemon_reload(&self) -> Result<()> {
        self.manager.reload().await.context("daemon-reload failed")
    }

    /// Runs one action and waits for its job; then checks the unit did not
    /// end up failed.
    pub async fn run(&self, action: &UnitAction) -> Result<UnitState> {
        let unit = action.unit.clone();
        let verb = action.action;
        if verb == UnitActionKind::TryRestart {
            // As `systemctl try-restart`: a unit that is not installed (or
            // masked) is not running, so there is nothing to restart. The
            // quickstart's `try-restart chrony.service` on a host without
            // chrony halted the host before this.
            let load = self.load_state(&unit).await?;
            if load == "not-found" || load == "masked" {
                tracing::info!(unit = %unit, load_state = %load, "try-restart: the unit is not installed here: nothing to restart");
                return Ok(UnitState {
                    unit,
                    active: "inactive".into(),
                    sub: load,
                    result: None,
                });
            }
        }
        self.job(&unit, &verb.to_string(), move |m, u| {
            Box::pin(async move {
                let mode = "replace".to_string();
                match verb {
                    UnitActionKind::Reload => m.reload_unit(u, mode).await,
                    UnitActionKind::Restart => m.restart_unit(u, mode).await,
                    UnitActionKind::TryRestart => m.try_restart_unit(u, mode).await,
                    UnitActionKind::ReloadOrRestart => m.reload_or_restart_unit(u, mode).await,
                }
            })
        })
        .await?;
        let state = self.state(&unit).await?;
        let must_be_active = matches!(
            verb,
            UnitActionKind::Reload | UnitActionKind::Restart | UnitActionKind::ReloadOrRestart
        );
        if state.active == "failed"
            || (must_be_active
                && state.active != "active"
                && state.active != "activating"
                && state.active != "reloading")
        {
            bail!("{verb} {unit}: the job finished but {state}");
        }
        Ok(state)
    }

    /// Starts or stops a unit and waits for the job.
    pub async fn start_stop(&self, unit: &str, start: bool) -> Result<UnitState> {
        let verb = if start { "start" } else { "stop" };
        self.job(unit, verb, move |m, u| {
            Box::pin(async move {
                if start {
                    m.start_unit(u, "replace".into()).await
                } else {
                    m.stop_unit(u, "replace".into()).await
                }
            })
        })
        .await?;
        let state = self.state(unit).await?;
        if start && state.active != "active" && state.active != "activating" {
            bail!("start {unit}: the job finished but {state}");
        }
        Ok(state)
    }

    /// Enables or disables a unit file; true if anything changed.
    pub async fn enable(&self, unit: &str, enable: bool) -> Result<bool> {
        let changes = if enable {
            self.manager
                .enable_unit_files(vec![unit.to_string()], false, false)
                .await
                .map(|(_, c)| c)
        } else {
            self.manager
                .disable_unit_files(vec![unit.to_string()], false)
                .await
        }
        .with_context(|| {
            format!(
                "cannot {} {unit}",
                if enable { "enable" } else { "disable" }
            )
        })?;
        Ok(!changes.is_empty())
    }

    /// `enabled`, `disabled`, `static`, ... for a unit file.
    pub async fn unit_file_state(&self, unit: &str) -> Result<String> {
        self.manager
            .get_unit_file_state(unit.to_string())
            .await
            .with_context(|| format!("cannot read the unit file state of {unit}"))
    }

    /// A proxy for `unit` (loaded if needed).
    async fn unit_proxy(&self, unit: &str) -> Result<UnitProxy<'static>> {
        let path = self
            .manager
            .load_unit(unit.to_string())
            .await
            .with_context(|| format!("cannot load unit {unit}"))?;
        UnitProxy::builder(&self.conn)
            .path(path)
            .build()
            .await
            .with_context(|| format!("cannot reach unit {unit}"))
    }

    /// The unit's `LoadState`: "loaded", "not-found", "masked", "error", ...
    pub async fn load_state(&self, unit: &str) -> Result<String> {
        self.unit_proxy(unit)
            .await?
            .load_state()
            .await
            .with_context(|| format!("cannot read {unit} LoadState"))
    }

    /// The unit's current state (loads it if needed).
    pub async fn state(&self, unit: &str) -> Result<UnitState> {
        let proxy = self.unit_proxy(unit).await?;
        let active = proxy
            .active_state()
            .await
            .with_context(|| format!("cannot read {unit} ActiveState"))?;
        let sub = proxy
            .sub_state()
            .await
            .with_context(|| format!("cannot read {unit} SubState"))?;
        let result = if unit.ends_with(".service") {
            let svc = zbus_systemd::systemd1::ServiceProxy::builder(&self.conn)
                .path(proxy.inner().path().to_owned())
                .build()
                .await
                .ok();
            match svc {
                Some(s) => s.result().await.ok(),
                None => None,
            }
        } else {
            None
        };
        Ok(UnitState {
            unit: unit.to_string(),
            active,
            sub,
            result,
        })
    }

    /// Issues a job with `call` and waits for its `JobRemoved`.
    async fn job<F>(&self, unit: &str, verb: &str, call: F) -> Result<()>
    where
        F: for<'a> FnOnce(
            &'a ManagerProxy<'static>,
            String,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = zbus::Result<zbus::OwnedObjectPath>> + Send + 'a>,
        >,
    {
        let mut removed = self
            .manager
            .receive_job_removed()
            .await
            .context("cannot listen for systemd job results")?;
        let job = call(&self.manager, unit.to_string())
            .await
            .map_err(|e| anyhow!("{verb} {unit}: {}", dbus_message(&e)))?;
        let wait = async {
            while let Some(signal) = removed.next().await {
                let args = signal.args().context("malformed JobRemoved signal")?;
                if args.job.as_str() == job.as_str() {
                    return Ok::<String, anyhow::Error>(args.result.clone());
                }
            }
            bail!("the system bus closed while waiting for {verb} {unit}")
        };
        let result = tokio::time::timeout(self.job_timeout, wait)
            .await
            .map_err(|_| anyhow!("{verb} {unit}: no result after {:?}", self.job_timeout))??;
        if result != "done" {
            let state = self
                .state(unit)
                .await
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            bail!("{verb} {unit}: job {result}{state}");
        }
        Ok(())
    }
}

/// The D-Bus error name and message, e.g. "org.freedesktop.systemd1.NoSuchUnit: Unit x.service not found."
fn dbus_message(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, msg, _) => {
            format!("{}: {}", name.as_str(), msg.as_deref().unwrap_or(""))
        }
        other => other.to_string(),
    }
}

/// True for paths systemd reads unit files from (within the allowed roots),
/// and for Podman quadlet files, which podman's systemd generator turns
/// into units at `daemon-reload` (`app.container` → `app.service`).
pub fn is_unit_file(path: &str) -> bool {
    const DIRS: &[&str] = &[
        "/etc/systemd/system/",
        "/etc/systemd/user/",
        "/usr/local/lib/systemd/system/",
        "/run/systemd/system/",
        "/etc/containers/systemd/",
    ];
    DIRS.iter().any(|d| path.starts_with(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_file_paths() {
        assert!(is_unit_file("/etc/systemd/system/app.service"));
        assert!(is_unit_file(
            "/etc/systemd/system/app.service.d/override.conf"
        ));
        assert!(!is_unit_file("/etc/app.service"));
        assert!(is_unit_file("/etc/containers/systemd/app.container"));
        assert!(is_unit_file("/etc/containers/systemd/users/app.container"));
        assert!(!is_unit_file("/etc/containers/registries.conf"));
    }
}
