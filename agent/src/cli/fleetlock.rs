//! `driftless fleet serve-fleetlock`: the FleetLock server
//! (`effects::fleet::fleetlock::server`) as a command, for a unit or a
//! terminal.

use std::net::SocketAddr;
use std::process::ExitCode;

use crate::config::Settings;
use crate::exit::{Error, Failure};

/// `--max-for GROUP=N`.
pub(crate) fn parse_group_max(s: &str) -> Result<(String, u32), String> {
    let (g, n) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected GROUP=N, e.g. workers=2"))?;
    crate::effects::fleet::fleetlock::check_group(g)?;
    let n: u32 = n
        .parse()
        .map_err(|_| format!("{s:?}: {n:?} is not a whole number"))?;
    if n == 0 {
        return Err(format!(
            "{s:?}: 0 slots would block the group for good; use at least 1"
        ));
    }
    Ok((g.to_string(), n))
}

#[cfg(feature = "etcd")]
pub(crate) fn serve(
    s: &Settings,
    listen: SocketAddr,
    default_max: u32,
    per_group: Vec<(String, u32)>,
) -> Result<ExitCode, Error> {
    use crate::effects::fleet::fleetlock::server;
    use crate::exit::Classify;
    use std::collections::BTreeMap;
    let fleet = super::fleet::fleet_of(s)?.clone();
    if default_max == 0 {
        return Err(Error::new(
            Failure::Usage,
            anyhow::anyhow!("--max 0 would block every group for good; use at least 1"),
        ));
    }
    let mut groups = BTreeMap::new();
    for (g, n) in per_group {
        if groups.insert(g.clone(), n).is_some() {
            return Err(Error::new(
                Failure::Usage,
                anyhow::anyhow!("--max-for {g}=…: given twice; give each group once"),
            ));
        }
    }
    let limits = server::Limits {
        default: default_max,
        per_group: groups,
    };
    let rt = super::runtime()?;
    rt.block_on(async {
        let listener = server::bind(listen).await?;
        let addr = listener.local_addr()?;
        // The first line says where (with --listen ADDR:0, the port).
        outln!(
            "serving FleetLock on http://{addr} (etcd {}, prefix {})",
            fleet.endpoints.join(", "),
            fleet.prefix
        );
        tracing::info!(%addr, max = default_max, "fleetlock: serving");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        server::serve(fleet, limits, listener, shutdown).await
    })
    .kind(Failure::Failed)?;
    tracing::info!("fleetlock: stopped");
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "etcd"))]
pub(crate) fn serve(
    _s: &Settings,
    _listen: SocketAddr,
    _default_max: u32,
    _per_group: Vec<(String, u32)>,
) -> Result<ExitCode, Error> {
    Err(Error::new(
        Failure::Config,
        anyhow::anyhow!("the FleetLock server keeps its slots in etcd, and this driftless was built without etcd support (cargo feature `etcd`)"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_limits_are_checked() {
        assert_eq!(parse_group_max("workers=2"), Ok(("workers".into(), 2)));
        assert!(parse_group_max("workers").is_err());
        assert!(parse_group_max("a/b=2").is_err());
        assert!(parse_group_max("w=0").is_err());
        assert!(parse_group_max("w=-1").is_err());
    }
}
