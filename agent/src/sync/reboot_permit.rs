//! The record of a reboot permit this host holds (`reboot-permit.json`
//! in the state directory; see `sync::reboot`), readable without etcd so
//! `driftless status` can show it.

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::effects::state::{read_json, StateDir};

pub(crate) const FILE: &str = "reboot-permit.json";

/// A reboot permit this host holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Held {
    pub group: String,
    /// The boot in which the permit was taken and the reboot asked for.
    pub boot_id: String,
    /// When the permit was taken (Unix seconds).
    pub since: i64,
    /// The commit whose change asked for the reboot.
    pub commit: Option<String>,
    /// The FleetLock server the permit was taken from (`[fleet]
    /// fleetlock`); none: etcd. It is given back there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleetlock: Option<String>,
}

/// The record, if any.
pub fn read(state: &StateDir) -> Result<Option<Held>> {
    read_json(&state.path().join(FILE))
}
