//! The inventory: what driftless applied last, per file. It is the input
//! that lets the planner prune files removed from the repository and
//! restore files that existed before driftless took them over.
//!
//! Pure data; `effects::state` persists it as `inventory.json`, and its
//! atomic replacement is the commit point of every apply transaction.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::desired::spec::{TargetPath, UnitAction};

///
/// The fields of this struct and of every type in it are declared in
/// alphabetical order: serialised as they are, they are then already the
/// canonical JSON that `effects::state::encode_state` checksums (keys
/// sorted), and a 10,000-file inventory is written without building a
/// `serde_json::Value` of it first (a unit test there pins it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// Unix time of that transaction.
    #[serde(default)]
    pub applied_at: i64,
    /// The commit applied by that transaction.
    #[serde(default)]
    pub commit: Option<String>,
    /// Managed directories (`[[dirs]]`) as last applied (`dirs` below
    /// means the directories created for files). One that leaves the
    /// repository is handed over to `dirs` if driftless created it, so it
    /// is removed once empty; otherwise it is left as it is. Absent when
    /// there are none (a files-only inventory keeps its bytes).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub directories: BTreeMap<TargetPath, DirectoryEntry>,
    /// Directories driftless created for managed files and has not removed
    /// yet: once no managed file is left under one and it is empty, it is
    /// removed (directories that existed before are never touched).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub dirs: BTreeSet<TargetPath>,
    #[serde(default, deserialize_with = "sorted_map::deserialize")]
    pub files: BTreeMap<TargetPath, ManagedEntry>,
    /// Managed symlinks (`[[links]]`) as last applied: a link that leaves
    /// the repository is removed if driftless created it. Absent when
    /// there are none (a files-only inventory keeps its bytes).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub links: BTreeMap<TargetPath, LinkEntry>,
    /// A reboot that committed changes asked for (files with `reboot =
    /// true`), until the host boots again. Recorded with the commit, so a
    /// crash before `/run/reboot-required` is written loses nothing: every
    /// full sync writes it again while the boot is the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot: Option<RebootRequest>,
    /// The transaction that wrote this inventory (empty before the first).
    #[serde(default)]
    pub txid: String,
    /// Format version of this file.
    pub version: u32,
}

/// One managed directory as last applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryEntry {
    /// Nothing was at the path before driftless managed it (or driftless
    /// had created it for files): when the entry leaves the repository,
    /// the directory is removed if it is empty. Otherwise it stays.
    pub created: bool,
    pub gid: u32,
    pub mode: u32,
    pub role: String,
    pub uid: u32,
}

/// One managed symlink as last applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkEntry {
    /// Nothing was at the path before driftless managed it: pruning the
    /// entry removes the link. Otherwise (a link driftless retargeted or
    /// found as desired) it stays as it is.
    pub created: bool,
    pub role: String,
    /// Its content, verbatim.
    pub target: String,
}

/// Why the host needs a reboot, and since which boot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebootRequest {
    /// `/proc/sys/kernel/random/boot_id` when the request was committed:
    /// once the host booted again, the request is done.
    pub boot_id: String,
    /// Each file whose change asked for it (the latest change wins).
    pub reasons: Vec<RebootReason>,
}

/// One change that needs a reboot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebootReason {
    /// The commit and transaction that changed it.
    #[serde(default)]
    pub commit: Option<String>,
    /// What `/run/reboot-required.pkgs` lists for it: the package that owns
    /// the file in the dpkg database, else `driftless`.
    pub package: String,
    pub path: TargetPath,
    pub txid: String,
}

impl RebootRequest {
    /// The request after a transaction `txid` of `commit` changed `paths`
    /// (`package` names each path's entry for `.pkgs`): `previous` is kept
    /// only if it was made in this boot.
    pub fn merged(
        previous: Option<&RebootRequest>,
        boot_id: &str,
        commit: Option<&str>,
        txid: &str,
        paths: &[(TargetPath, String)],
    ) -> Option<RebootRequest> {
        let mut reasons: Vec<RebootReason> = previous
            .filter(|p| p.boot_id == boot_id)
            .map(|p| p.reasons.clone())
            .unwrap_or_default();
        for (path, package) in paths {
            reasons.retain(|r| &r.path != path);
            reasons.push(RebootReason {
                path: path.clone(),
                commit: commit.map(str::to_string),
                txid: txid.to_string(),
                package: package.clone(),
            });
        }
        reasons.sort_by(|a, b| a.path.cmp(&b.path));
        (!reasons.is_empty()).then(|| RebootRequest {
            boot_id: boot_id.to_string(),
            reasons,
        })
    }

    /// The package names for `/run/reboot-required.pkgs`, unique, sorted.
    pub fn packages(&self) -> BTreeSet<&str> {
        self.reasons.iter().map(|r| r.package.as_str()).collect()
    }
}

pub const INVENTORY_VERSION: u32 = 1;

/// A map read from JSON in one bulk build rather than one insert per key.
///
/// serde's own `BTreeMap` reader inserts each entry, searching the tree
/// from its root: at 10,000 files with paths that share a long prefix,
/// those searches were the largest part of reading an inventory. Its keys
/// are written in order, so collecting them first and building the tree
/// from the sorted run is linear. Equal keys end as serde's reader leaves
/// them: the last value wins.
pub(crate) mod sorted_map {
    use std::collections::BTreeMap;
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

    pub fn deserialize<'de, D, K, V>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        D: Deserializer<'de>,
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
    {
        struct Pairs<K, V>(PhantomData<(K, V)>);
        impl<'de, K: Deserialize<'de> + Ord, V: Deserialize<'de>> Visitor<'de> for Pairs<K, V> {
            type Value = BTreeMap<K, V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                // No capacity from the input's size hint: it is untrusted.
                let mut pairs = Vec::new();
                while let Some(pair) = map.next_entry::<K, V>()? {
                    pairs.push(pair);
                }
                Ok(pairs.into_iter().collect())
            }
        }
        d.deserialize_map(Pairs(PhantomData))
    }
}

impl Inventory {
    /// Whether it records anything an agent older than `reboot = true`
    /// cannot read (its entries deny unknown fields): such an inventory is
    /// written as state format 2, which those agents refuse instead of
    /// rebuilding it as corrupt.
    pub fn uses_reboot(&self) -> bool {
        self.reboot.is_some() || self.files.values().any(|e| e.reboot)
    }

    /// Whether it records managed symlinks, which agents before them
    /// cannot read either: state format 2 as well.
    pub fn uses_links(&self) -> bool {
        !self.links.is_empty()
    }

    /// Whether it records managed directories: state format 2 as well.
    pub fn uses_directories(&self) -> bool {
        !self.directories.is_empty()
    }
}

impl Inventory {
    /// The same inventory with only the entries for `paths` (looked up
    /// one by one: a partial sync asks for a few of 10,000).
    pub fn restricted_to(&self, paths: &std::collections::BTreeSet<TargetPath>) -> Inventory {
        Inventory {
            files: paths
                .iter()
                .filter_map(|p| self.files.get_key_value(p))
                .map(|(p, e)| (p.clone(), e.clone()))
                .collect(),
            ..self.clone_header()
        }
    }

    /// The file entries not in `paths`: the map cloned whole and those
    /// removed. A map's clone copies it node by node; collecting the
    /// entries one at a time into a vector (grown by reallocation) and
    /// building a map of them again took twice as long at 10,000 files
    /// (issue #18).
    pub fn files_without(
        &self,
        paths: &std::collections::BTreeSet<TargetPath>,
    ) -> BTreeMap<TargetPath, ManagedEntry> {
        let mut files = self.files.clone();
        for p in paths {
            files.remove(p);
        }
        files
    }

    fn clone_header(&self) -> Inventory {
        Inventory {
            version: self.version,
            txid: self.txid.clone(),
            commit: self.commit.clone(),
            applied_at: self.applied_at,
            files: BTreeMap::new(),
            dirs: self.dirs.clone(),
            reboot: self.reboot.clone(),
            links: self.links.clone(),
            directories: self.directories.clone(),
        }
    }

    /// Created directories no managed file, link or directory lives under
    /// and that are not managed directories themselves, deepest first: the
    /// ones to remove if they are empty.
    pub fn unneeded_dirs(&self) -> Vec<TargetPath> {
        // Keys are in string order, so the first key from `d/` on is under
        // `d` if any is: one search per created directory, not a sorted
        // list of every path (half a millisecond of a one-file sync at
        // 10,000 files, which usually has one such directory).
        fn any_under<V>(map: &BTreeMap<TargetPath, V>, prefix: &str) -> bool {
            use std::ops::Bound;
            map.range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
                .next()
                .is_some_and(|(k, _)| k.as_str().starts_with(prefix))
        }
        let mut out: Vec<TargetPath> = self
            .dirs
            .iter()
            .filter(|d| !self.directories.contains_key(*d))
            .filter(|d| {
                let prefix = format!("{}/", d.as_str());
                !(any_under(&self.files, &prefix)
                    || any_under(&self.links, &prefix)
                    || any_under(&self.directories, &prefix))
            })
            .cloned()
            .collect();
        out.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        out
    }
}

#[cfg(test)]
impl ManagedEntry {
    /// An entry for tests: file `i` of role `r`, mode 0644, owned by root,
    /// its digest and size made from `i`.
    pub fn example(i: usize) -> Self {
        ManagedEntry {
            gid: 0,
            mode: 0o644,
            on_change: Vec::new(),
            original: None,
            reboot: false,
            role: "r".into(),
            sensitive: false,
            sha256: format!("{i:064x}"),
            size: i as u64,
            uid: 0,
        }
    }
}

/// One managed file as last applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedEntry {
    pub gid: u32,
    pub mode: u32,
    /// Actions to run when the file changes, kept so that pruning it
    /// triggers them too.
    #[serde(default)]
    pub on_change: Vec<UnitAction>,
    /// The file that was there before driftless managed it, if any.
    #[serde(default)]
    pub original: Option<Original>,
    /// `reboot = true`: a change to it, its removal included, needs a
    /// reboot. Absent when false (a files-only inventory stays the bytes
    /// older agents wrote).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reboot: bool,
    pub role: String,
    #[serde(default)]
    pub sensitive: bool,
    /// SHA-256 of the content written (hex). For sensitive files a keyed
    /// hash, never the plain digest of a secret.
    pub sha256: String,
    pub size: u64,
    pub uid: u32,
}

/// A pre-existing file, saved once when driftless first took it over and
/// put back if the file is ever pruned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Original {
    pub gid: u32,
    pub mode: u32,
    /// File name inside the state dir's `originals/`.
    pub stored: String,
    pub uid: u32,
}
