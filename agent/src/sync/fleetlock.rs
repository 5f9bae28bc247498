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
}

/// What the server said.
pub(super) enum Asked {
    Granted,
    Refused(String),
    /// No answer (or a 5xx): `on_unreachable` decides.
    Unreachable(anyhow::Error),
}

/// Takes the group's slot for applying `commit`.
pub(super) fn take(pass: &Pass, fleet: &FleetSettings, commit: &str) -> Result<Asked> {
    let path = pass.state.path().join(FILE);
    write_json_atomic(
        &path,
        &Slot {
            group: fleet.group.clone(),
            since: pass.now,
            commit: commit.to_string(),
        },
    )
    .with_context(|| format!("cannot record the FleetLock slot about to be taken ({FILE})"))?;
    crate::effects::failpoint::hit("sync.fleetlock.recorded")?;
    let answer = pass.rt.block_on(async {
        Slots::connect(fleet)
            .await?
            .take(&fleet.group, &pass.settings.host, 0, "")
            .await
    });
    Ok(match answer {
        Ok(Ok(())) => {
            crate::effects::failpoint::hit("sync.fleetlock.granted")?;
            Asked::Granted
        }
        Ok(Err(why)) => {
            // Not held (a holder is granted again): nothing to give back.
            remove(pass)?;
            Asked::Refused(why)
        }
        Err(e) => Asked::Unreachable(e),
    })
}

/// After every run: gives back a slot this host may hold for an apply
/// (this run's, or one a crashed run left). Failures are logged; the
/// record stays, and the next run tries again.
pub(super) fn finish(pass: &Pass, fleet: &FleetSettings) {
    let path = pass.state.path().join(FILE);
    let slot: Option<Slot> = match read_json(&path) {
        Ok(s) => s,
        Err(e) => {
            // Unreadable: it may stand for a slot held; give it back.
            warn!("{FILE}: unreadable ({e:#}); giving back the slot it may stand for");
            Some(Slot {
                group: fleet.group.clone(),
                since: 0,
                commit: String::new(),
            })
        }
    };
    let Some(slot) = slot else {
        return;
    };
    let reboot_held = super::reboot_permit::read(&pass.state)
        .map(|h| h.is_some_and(|h| h.group == slot.group))
        .unwrap_or(true);
    if !reboot_held {
        let given = pass.rt.block_on(async {
            Slots::connect(fleet)
                .await?
                .give_back(&slot.group, &pass.settings.host)
                .await
        });
        if let Err(e) = given {
            warn!(group = %slot.group, "fleet: cannot give the FleetLock slot back: {e:#}; the next run tries again (the group has one slot less until then)");
            return;
        }
        info!(group = %slot.group, "fleet: FleetLock slot given back");
    }
    if let Err(e) = remove(pass) {
        warn!("fleet: {e:#}");
    }
}

fn remove(pass: &Pass) -> Result<()> {
    match std::fs::remove_file(pass.state.path().join(FILE)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {FILE}")),
    }
}
