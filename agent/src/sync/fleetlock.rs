//! The FleetLock backend's part of a sync (`[fleet] fleetlock = URL`): a
//! slot of the host's group is taken before a new commit is applied and
//! given back after the run.
//!
//! Why a record: a FleetLock slot has no lease, so a host killed while it
//! holds one keeps it until the host itself gives it back. The record
//! (`fleetlock-slot.json` in the state directory) is written durably
//! *before* the server is asked, so whatever the moment of a crash, the
//! next run finds it and gives the slot back (the server's
//! `steady-state` is harmless when no slot is held). A slot held across a
//! reboot (`reboot-permit.json`, `sync::reboot`) is the reboot path's: a
//! run leaves it in place and drops only its own record.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::run::Pass;
use crate::config::FleetSettings;
use crate::effects::fleet::slots::Slots;
use crate::effects::state::{read_json, write_json_atomic};

const FILE: &str = "fleetlock-slot.json";

/// A slot this host may hold for an apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Slot {
    group: String,
    /// When it was asked for (Unix seconds).
    since: i64,
    /// The commit it was asked for.
    commit: String,
    /// The server it was asked from: it is given back there, also after
    /// `[fleet]` changed.
    url: String,
}

/// What the server said.
pub(super) enum Asked {
    Granted,
    Refused(String),
    /// No answer (or a 5xx): `on_unreachable` decides.
    Unreachable(anyhow::Error),
}

/// The record, if any; an unreadable one stands for a slot of the
/// configured group that may be held.
fn record(pass: &Pass, fleet: &FleetSettings) -> Option<Slot> {
    match read_json(&pass.state.path().join(FILE)) {
        Ok(s) => s,
        Err(e) => {
            warn!(
                "{FILE}: unreadable ({e:#}); taken as a slot of group {} that may be held",
                fleet.group
            );
            Some(Slot {
                group: fleet.group.clone(),
                since: 0,
                commit: String::new(),
                url: fleet.fleetlock.clone().unwrap_or_default(),
            })
        }
    }
}

async fn give_back(fleet: &FleetSettings, slot: &Slot, host: &str) -> Result<()> {
    Slots::connect_via(fleet, Some(&slot.url))
        .await?
        .give_back(&slot.group, host)
        .await
}

/// Takes the group's slot for applying `commit`.
pub(super) fn take(pass: &Pass, fleet: &FleetSettings, commit: &str) -> Result<Asked> {
    let path = pass.state.path().join(FILE);
    let host = pass.settings.host.as_str();
    let mut earlier = record(pass, fleet);
    // A slot of another group or server, from before the configuration
    // changed: given back first, or no new one is taken (its record would
    // be overwritten, and the slot held for good).
    let url = fleet.fleetlock.clone().unwrap_or_default();
    if let Some(old) = earlier
        .as_ref()
        .filter(|o| o.group != fleet.group || o.url != url)
    {
        if let Err(e) = pass.rt.block_on(give_back(fleet, old, host)) {
            return Ok(Asked::Refused(format!(
                "the FleetLock slot of group {} at {} this host took before cannot be given back yet ({e:#}); no new slot is taken until it is",
                old.group, old.url
            )));
        }
        info!(group = %old.group, url = %old.url, "fleet: FleetLock slot of the group or server this host used before given back");
        remove(pass)?;
        earlier = None;
    }
    // A client that cannot be built (an unreadable ca_file) is this
    // host's error: it must not pass for an unreachable server, which
    // `on_unreachable = "apply-alone"` would apply without.
    crate::effects::fleet::fleetlock::client::Client::new(
        fleet.fleetlock.as_deref().unwrap_or_default(),
        fleet.tls.as_ref().map(|t| t.ca_file.as_path()),
        host,
        &fleet.group,
    )
    .context("fleet.fleetlock")?;
    write_json_atomic(
        &path,
        &Slot {
            group: fleet.group.clone(),
            since: earlier.as_ref().map_or(pass.now, |e| e.since),
            commit: commit.to_string(),
            url,
        },
    )
    .with_context(|| format!("cannot record the FleetLock slot about to be taken ({FILE})"))?;
    crate::effects::failpoint::hit("sync.fleetlock.recorded")?;
    let answer = pass.rt.block_on(async {
        Slots::connect(fleet)
            .await?
            .take(&fleet.group, host, 0, "")
            .await
    });
    Ok(match answer {
        Ok(Ok(())) => {
            crate::effects::failpoint::hit("sync.fleetlock.granted")?;
            Asked::Granted
        }
        Ok(Err(why)) => {
            // Not held now, unless an earlier run took it (and was killed):
            // then the record stays, and the end of this run gives it back
            // (a server refuses a holder too, e.g. while suspended).
            if earlier.is_none() {
                remove(pass)?;
            }
            Asked::Refused(why)
        }
        Err(e) => Asked::Unreachable(e),
    })
}

/// After every run: gives back a slot this host may hold for an apply
/// (this run's, or one a crashed run left). Failures are logged; the
/// record stays, and the next run tries again.
pub(super) fn finish(pass: &Pass, fleet: &FleetSettings) {
    let Some(slot) = record(pass, fleet) else {
        return;
    };
    let host = pass.settings.host.as_str();
    let reboot_held = match super::reboot_permit::read(&pass.state) {
        // The same lock: the same group at the same server.
        Ok(h) => {
            h.is_some_and(|h| h.group == slot.group && h.fleetlock.as_deref() == Some(&slot.url))
        }
        Err(e) => {
            // The reboot path takes it as held; so does this: the slot
            // stays until the record can be read (the reboot path's runs
            // give it back).
            warn!(
                "{}: unreadable ({e:#}); leaving the FleetLock slot to the reboot path",
                super::reboot_permit::FILE
            );
            return;
        }
    };
    if !reboot_held {
        if let Err(e) = pass.rt.block_on(give_back(fleet, &slot, host)) {
            warn!(group = %slot.group, "fleet: cannot give the FleetLock slot back: {e:#}; the next run tries again (the group has one slot less until then)");
            return;
        }
        info!(group = %slot.group, "fleet: FleetLock slot given back");
    }
    if let Err(e) = remove(pass) {
        warn!("fleet: {e:#}");
    }
}

/// After a run without `[fleet] fleetlock` (the section was removed, or
/// switched to etcd): a slot recorded from before is given back to the
/// server it names.
pub(super) fn finish_elsewhere(pass: &Pass) {
    let path = pass.state.path().join(FILE);
    let slot: Slot = match read_json(&path) {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(e) => {
            warn!("{FILE}: unreadable ({e:#}), and [fleet] names no FleetLock server any more: the slot it may stand for is not given back; remove the file once the server's operator has");
            return;
        }
    };
    let host = pass.settings.host.as_str();
    match super::reboot_permit::read(&pass.state) {
        Ok(Some(h)) if h.group == slot.group && h.fleetlock.as_deref() == Some(&slot.url) => {
            // The same lock is this host's reboot permit: the reboot path's.
            if let Err(e) = remove(pass) {
                warn!("fleet: {e:#}");
            }
            return;
        }
        Ok(_) => {}
        Err(e) => {
            warn!(
                "{}: unreadable ({e:#}); leaving the FleetLock slot to the reboot path",
                super::reboot_permit::FILE
            );
            return;
        }
    }
    let given = pass.rt.block_on(async {
        Slots::FleetLock {
            url: slot.url.clone(),
            ca_file: None,
        }
        .give_back(&slot.group, host)
        .await
    });
    match given {
        Ok(()) => {
            info!(group = %slot.group, url = %slot.url, "fleet: FleetLock slot taken before [fleet] changed given back");
            if let Err(e) = remove(pass) {
                warn!("fleet: {e:#}");
            }
        }
        Err(e) => {
            warn!(group = %slot.group, url = %slot.url, "fleet: cannot give back the FleetLock slot taken before [fleet] changed: {e:#}; the next run tries again")
        }
    }
}

fn remove(pass: &Pass) -> Result<()> {
    pass.state.remove_file(FILE).map(drop)
}
