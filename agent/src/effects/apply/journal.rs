//! The transaction journal: everything needed to undo a transaction,
//! written durably before its first rename (`journal.json`; before it,
//! `intent.json` says `Preparing`). Later states are told by empty marker
//! files rather than rewrites (see [`super::load_journal`] and, for why,
//! the barriers section of [`super`]).

use serde::{Deserialize, Serialize};

use crate::desired::spec::TargetPath;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TxState {
    /// Intent recorded; backups and staged files are being written. No
    /// target has been touched yet: rollback only deletes staged files.
    Preparing,
    /// Staged and journalled; renames may be under way. Recovery rolls it
    /// back unless the inventory names this transaction (then it committed).
    Prepared,
    /// Every target is switched in and flushed (the `switched` mark); unit
    /// actions and health
    /// checks are running. The inventory still names the previous
    /// transaction: the commit is not applied until its checks pass and
    /// the inventory naming it is durable. Recovery rolls it back (and
    /// re-runs the unit actions for the restored files) unless the
    /// inventory names this transaction.
    Switched,
    /// The inventory was replaced: the transaction is the current state
    /// (the `committed` mark; older journals say so themselves).
    Committed,
    /// A revert of this transaction is under way. Recovery finishes it
    /// (rolls back and restores the previous inventory).
    Reverting,
    /// Undone (by recovery or a revert).
    RolledBack,
}

/// Owner and mode of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub gid: u32,
    pub mode: u32,
    pub uid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Rename `staged` over the target.
    Replace,
    /// Change owner/mode in place; content unchanged.
    Meta,
    /// Unlink the target.
    Remove,
    /// Nothing on the target; an original copy was saved.
    Adopt,
    /// Rename the staged symlink (pointing to `link`) over the target.
    Link,
    /// A managed directory that did not exist: made at `staged` with its
    /// owner and mode (`new`) and renamed into place while preparing, so
    /// it appears whole. Undo removes it if it is empty.
    Mkdir,
    /// A managed directory whose owner and mode change in place (`old`
    /// to `new`), never through a symlink.
    DirMeta,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// File name in the transaction's `backups/` holding the previous
    /// content (absent when the target did not exist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// For `Link`: the new link's target, verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// Owner and mode after (absent for removals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<Meta>,
    /// Owner and mode before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<Meta>,
    /// The target was a symlink to this (its owner in `old`): undo
    /// re-creates it. A symlink is never backed up as a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_link: Option<String>,
    pub op: Op,
    pub path: TargetPath,
    /// Temp file name in the target's directory (for `Replace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<String>,
}

impl JournalEntry {
    /// Whether an agent without managed symlinks would misread it (it
    /// would not re-create a removed link): the journal is then written
    /// as state format 2, which such agents refuse.
    pub fn uses_links(&self) -> bool {
        self.op == Op::Link || self.link.is_some() || self.old_link.is_some()
    }

    /// Whether it is a managed directory's, which an agent without them
    /// cannot undo: state format 2 as well.
    pub fn uses_directories(&self) -> bool {
        matches!(self.op, Op::Mkdir | Op::DirMeta)
    }
}

/// Its fields, and its entries', in name order, as in every state type:
/// so it serialises straight to the canonical JSON its checksum covers
/// (see `effects::state::canonical`), without building a
/// `serde_json::Value` of the whole journal first (12 MB at 10,000 files,
/// the peak of a cold sync's apply).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    /// The users, groups and memberships this transaction creates before
    /// staging its files (`effects::accounts`), so that any undo removes
    /// what it made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accounts: Option<crate::plan::accounts::AccountsRecord>,
    #[serde(default)]
    pub commit: Option<String>,
    pub created_at: i64,
    /// Directories created for new files, outermost first.
    #[serde(default)]
    pub created_dirs: Vec<TargetPath>,
    pub entries: Vec<JournalEntry>,
    /// Accounts an undo of this transaction kept, and why (for the log
    /// and the history; not stored).
    #[serde(skip)]
    pub kept: Vec<String>,
    /// Whether ownership was applied (false when running unprivileged).
    pub ownership: bool,
    /// The packages this transaction installs, changes or removes before
    /// staging its files (`effects::packages`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages: Option<crate::plan::packages::PackagesRecord>,
    /// What systemd was told to do after the switch-in, so a recovery that
    /// puts the previous files back can tell it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post: Option<PostActions>,
    /// Saved originals (`originals/` names) of the files this transaction
    /// stops managing: removed once it commits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub released_originals: Vec<String>,
    /// Saved originals this transaction writes where there was no
    /// verified copy: removed again by its rollback or revert, so that a
    /// failed first sync leaves no copy that a later one would keep
    /// (see `originals::save`'s `keep_saved`) over an admin's edit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub saved_originals: Vec<String>,
    pub state: TxState,
    pub txid: String,
}

/// The systemd side of a transaction: after its files change (or change
/// back), units must reload or restart to pick them up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostActions {
    /// A unit file changed: `daemon-reload` first.
    #[serde(default)]
    pub daemon_reload: bool,
    #[serde(default)]
    pub unit_actions: Vec<crate::desired::spec::UnitAction>,
}

impl PostActions {
    pub fn is_empty(&self) -> bool {
        !self.daemon_reload && self.unit_actions.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A journal of 10,000 entries went through a `serde_json::Value`
    /// of itself (12 MB) to be written, because its fields were not in
    /// name order: the canonical check then sends it the slow way.
    #[test]
    fn a_journal_serialises_canonically_without_a_value_tree() {
        let meta = Some(Meta {
            gid: 1,
            mode: 0o644,
            uid: 2,
        });
        let entry = |op, path: &str| JournalEntry {
            backup: Some("b".into()),
            link: Some("t".into()),
            new: meta,
            old: meta,
            old_link: Some("o".into()),
            op,
            path: TargetPath::parse(path).unwrap(),
            staged: Some("s".into()),
        };
        let journal = Journal {
            accounts: None,
            commit: Some("c".into()),
            created_at: 1,
            created_dirs: vec![TargetPath::parse("/etc/d").unwrap()],
            entries: vec![
                entry(Op::Replace, "/etc/a"),
                entry(Op::Link, "/etc/b"),
                entry(Op::Mkdir, "/etc/c"),
            ],
            kept: vec!["not stored".into()],
            ownership: true,
            packages: None,
            post: Some(PostActions {
                daemon_reload: true,
                unit_actions: Vec::new(),
            }),
            released_originals: vec!["r".into()],
            saved_originals: vec!["s".into()],
            state: TxState::Switched,
            txid: "t1".into(),
        };
        let (bytes, canonical) =
            crate::effects::state::canonical::to_vec_checked(&journal).unwrap();
        assert!(canonical, "{}", String::from_utf8_lossy(&bytes));
        let back: Journal = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back.entries, journal.entries);
        assert!(back.kept.is_empty());
    }
}
