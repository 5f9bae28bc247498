//! A permit without a lease, from either backend: the etcd semaphore or a
//! FleetLock server. The reboot path (`sync::reboot`) and the FleetLock
//! apply path take, keep and give back such permits the same way; only
//! where they live differs.
//!
//! What differs is said here, once:
//! - etcd also refuses while the group is suspended (`driftless suspend`),
//!   and counts the group's permits against the commit's
//!   `max_concurrent`; a FleetLock server applies its own limit (and
//!   `driftless fleet serve-fleetlock` its suspensions).
//! - etcd can say whether a permit is still held (an operator may have
//!   deleted it); FleetLock cannot, so a host takes it as held, and giving
//!   it back is harmless either way (`steady-state` is idempotent).

use anyhow::Result;

use super::fleetlock::client::Client;
use crate::config::FleetSettings;

/// Where the permits are.
pub enum Slots {
    #[cfg(feature = "etcd")]
    Etcd(Box<super::Store>),
    FleetLock {
        url: String,
        ca_file: Option<std::path::PathBuf>,
    },
}

impl Slots {
    pub async fn connect(fleet: &FleetSettings) -> Result<Slots> {
        if let Some(url) = &fleet.fleetlock {
            return Ok(Slots::FleetLock {
                url: url.clone(),
                ca_file: fleet.tls.as_ref().map(|t| t.ca_file.clone()),
            });
        }
        #[cfg(feature = "etcd")]
        {
            Ok(Slots::Etcd(Box::new(super::Store::connect(fleet).await?)))
        }
        #[cfg(not(feature = "etcd"))]
        {
            anyhow::bail!("this driftless was built without etcd support (cargo feature `etcd`)")
        }
    }

    /// The backend a permit was taken from: `via`, the FleetLock server
    /// a record names, or etcd (`None`). A permit is given back where it
    /// was taken, also after `[fleet]` changed backends.
    pub async fn connect_via(fleet: &FleetSettings, via: Option<&str>) -> Result<Slots> {
        match via {
            Some(url) => Ok(Slots::FleetLock {
                url: url.to_string(),
                // The configured CA, if it is still the same server.
                ca_file: fleet
                    .tls
                    .as_ref()
                    .filter(|_| fleet.fleetlock.as_deref() == Some(url))
                    .map(|t| t.ca_file.clone()),
            }),
            None if fleet.fleetlock.is_some() => anyhow::bail!(
                "this permit was taken from etcd, but [fleet] now names a FleetLock server; an operator gives it back by deleting its key (`driftless fleet status` where [fleet] endpoints is set lists it)"
            ),
            None => Slots::connect(fleet).await,
        }
    }

    fn client(
        url: &str,
        ca_file: Option<&std::path::Path>,
        group: &str,
        host: &str,
    ) -> Result<Client> {
        Client::new(url, ca_file, host, group)
    }

    /// Takes `host`'s permit of `group` (`max` at most held, for etcd),
    /// with `value` as its etcd value. `Ok(Err(why))`: not taken.
    pub async fn take(
        &mut self,
        group: &str,
        host: &str,
        max: u32,
        value: &str,
    ) -> Result<Result<(), String>> {
        match self {
            #[cfg(feature = "etcd")]
            Slots::Etcd(store) => {
                let view = store.suspensions().await?;
                if let Some((g, s)) = crate::rollout::decide::suspension(&view, group) {
                    return Ok(Err(format!(
                        "rollouts of group {g} are suspended by {}",
                        s.by
                    )));
                }
                Ok(
                    match store.take_reboot_permit(group, host, max, value).await? {
                        None => Ok(()),
                        Some(super::Acquired::Full { held }) => Err(format!(
                        "all {held} permits of group {group} are taken (max_concurrent = {max})"
                    )),
                        Some(_) => Err("other hosts took the permits at the same moment".into()),
                    },
                )
            }
            Slots::FleetLock { url, ca_file } => {
                let _ = (max, value);
                let c = Self::client(url, ca_file.as_deref(), group, host)?;
                Ok(c.lock()
                    .await?
                    .map_err(|r| format!("the FleetLock server {url} refused: {r}")))
            }
        }
    }

    /// Whether `host` still holds its permit of `group` (FleetLock: taken
    /// as yes; see the module).
    pub async fn holds(&mut self, group: &str, host: &str) -> Result<bool> {
        match self {
            #[cfg(feature = "etcd")]
            Slots::Etcd(store) => store.holds(group, host).await,
            Slots::FleetLock { .. } => {
                let _ = (group, host);
                Ok(true)
            }
        }
    }

    /// Gives `host`'s permit of `group` back (fine when none is held).
    pub async fn give_back(&mut self, group: &str, host: &str) -> Result<()> {
        match self {
            #[cfg(feature = "etcd")]
            Slots::Etcd(store) => store.release_reboot_permit(group, host).await,
            Slots::FleetLock { url, ca_file } => {
                let c = Self::client(url, ca_file.as_deref(), group, host)?;
                c.unlock().await?.map_err(|r| {
                    anyhow::anyhow!("the FleetLock server {url} refused to take the slot back: {r}")
                })
            }
        }
    }

    /// Where, for messages: the key of an etcd permit, or the server.
    pub fn describe(&self, prefix: &str, group: &str, host: &str) -> String {
        match self {
            #[cfg(feature = "etcd")]
            Slots::Etcd(_) => super::Keys::new(prefix).permit(group, host),
            Slots::FleetLock { url, .. } => {
                let _ = prefix;
                format!("the slot at {url} (id {host}, group {group})")
            }
        }
    }
}
