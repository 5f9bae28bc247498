//! Commits known to be bad, and the "halted" flag.
//!
//! A commit whose unit actions or health checks failed is reverted and
//! marked bad: it is not applied again until a new commit arrives or the
//! operator passes `--retry`. If the revert's own checks fail, the host is
//! in a state nobody verified: driftless marks itself halted and stops
//! touching the host until `sync --retry` (or `rollback`).

use std::collections::BTreeMap;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::effects::state::{read_json_large, write_json_atomic, StateDir};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Marks {
    #[serde(default)]
    pub bad: BTreeMap<String, Mark>,
    #[serde(default)]
    pub halted: Option<Halt>,
    /// Commits whose unit actions or checks were interrupted (the agent
    /// was killed, the host lost power) and rolled back, with how many
    /// times. A commit interrupted [`MAX_INTERRUPTED`] times is marked bad:
    /// something in it may be what kills the agent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub interrupted: BTreeMap<String, u32>,
    /// A revert began whose restored state has not passed its checks yet:
    /// set, durably, before a failed commit is reverted, and cleared once
    /// the restored state was checked. A run that finds it set (the revert
    /// or its checks were cut short: a kill, a power loss, dpkg's lock held)
    /// checks the restored state after recovery finished the revert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unchecked_revert: Option<Unchecked>,
}

/// See [`Marks::unchecked_revert`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unchecked {
    pub time: i64,
    /// The commit that failed and is reverted.
    pub commit: String,
}

/// See [`Marks::interrupted`].
pub const MAX_INTERRUPTED: u32 = 3;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub time: i64,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Halt {
    pub time: i64,
    pub commit: Option<String>,
    pub reason: String,
    /// A rollback to this commit started while halted: once the
    /// inventory names it, the rollback committed, and the halt goes
    /// (`run::begin`), also when the run that applied it was killed
    /// before it could lift the halt itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifted_by: Option<String>,
}

const FILE: &str = "marks.json";

pub fn load(state: &StateDir) -> Result<Marks> {
    Ok(read_json_large(&state.path().join(FILE))?.unwrap_or_default())
}

pub fn save(state: &StateDir, marks: &Marks) -> Result<()> {
    write_json_atomic(&state.path().join(FILE), marks)
}
