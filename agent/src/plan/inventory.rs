//! The inventory: what driftless applied last, per file. It is the input
//! that lets the planner prune files removed from the repository and
//! restore files that existed before driftless took them over.
//!
//! Pure data; `effects::state` persists it as `inventory.json`, and its
//! atomic replacement is the commit point of every apply transaction.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::desired::spec::{TargetPath, UnitAction};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// Format version of this file.
    pub version: u32,
    /// The transaction that wrote this inventory (empty before the first).
    #[serde(default)]
    pub txid: String,
    /// The commit applied by that transaction.
    #[serde(default)]
    pub commit: Option<String>,
    /// Unix time of that transaction.
    #[serde(default)]
    pub applied_at: i64,
    #[serde(default)]
    pub files: BTreeMap<TargetPath, ManagedEntry>,
    /// Directories driftless created for managed files and has not removed
    /// yet: once no managed file is left under one and it is empty, it is
    /// removed (directories that existed before are never touched).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub dirs: BTreeSet<TargetPath>,
}

pub const INVENTORY_VERSION: u32 = 1;

impl Inventory {
    /// The same inventory with only the entries for `paths`.
    pub fn restricted_to(&self, paths: &std::collections::BTreeSet<TargetPath>) -> Inventory {
        Inventory {
            files: self
                .files
                .iter()
                .filter(|(p, _)| paths.contains(*p))
                .map(|(p, e)| (p.clone(), e.clone()))
                .collect(),
            ..self.clone_header()
        }
    }

    /// The entries not in `paths`.
    pub fn without(
        &self,
        paths: &std::collections::BTreeSet<TargetPath>,
    ) -> Vec<(TargetPath, ManagedEntry)> {
        self.files
            .iter()
            .filter(|(p, _)| !paths.contains(*p))
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect()
    }

    fn clone_header(&self) -> Inventory {
        Inventory {
            version: self.version,
            txid: self.txid.clone(),
            commit: self.commit.clone(),
            applied_at: self.applied_at,
            files: BTreeMap::new(),
            dirs: self.dirs.clone(),
        }
    }

    /// Created directories no managed file lives under, deepest first:
    /// the ones to remove if they are empty.
    pub fn unneeded_dirs(&self) -> Vec<TargetPath> {
        // Keys are in string order, so the files under `d` follow `d/`.
        let files: Vec<&str> = self.files.keys().map(TargetPath::as_str).collect();
        let mut out: Vec<TargetPath> = self
            .dirs
            .iter()
            .filter(|d| {
                let prefix = format!("{d}/");
                let i = files.partition_point(|f| *f < prefix.as_str());
                !files.get(i).is_some_and(|f| f.starts_with(&prefix))
            })
            .cloned()
            .collect();
        out.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        out
    }
}

/// One managed file as last applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedEntry {
    pub role: String,
    /// SHA-256 of the content written (hex). For sensitive files a keyed
    /// hash, never the plain digest of a secret.
    pub sha256: String,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Actions to run when the file changes, kept so that pruning it
    /// triggers them too.
    #[serde(default)]
    pub on_change: Vec<UnitAction>,
    #[serde(default)]
    pub sensitive: bool,
    /// The file that was there before driftless managed it, if any.
    #[serde(default)]
    pub original: Option<Original>,
}

/// A pre-existing file, saved once when driftless first took it over and
/// put back if the file is ever pruned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Original {
    /// File name inside the state dir's `originals/`.
    pub stored: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}
