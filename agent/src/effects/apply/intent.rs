//! A transaction's identity and its intent: the id, the names of the
//! staged files, and the journal entries a plan becomes, written before
//! anything on the host changes so that recovery knows what to undo.

use super::*;

/// A new transaction's id: `<unix seconds>-<nanoseconds, 8 hex
/// digits>-<pid>`, so that ids sort in the order transactions began
/// (`state check` tells a stale inventory by a transaction committed after
/// the one it names).
pub(super) fn new_txid() -> String {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    txid_at(since_epoch)
}

/// [`new_txid`] at `since_epoch`. Both parts of the time come from that
/// one reading: the seconds were once the run's start and the nanoseconds
/// read at the transaction, so a run that began in one second and staged
/// its transaction in the next got an id below an earlier transaction's
/// of that first second (and `state check`, under load, missed a deleted
/// `inventory.delta`).
pub(crate) fn txid_at(since_epoch: std::time::Duration) -> String {
    format!(
        "{}-{:08x}-{}",
        since_epoch.as_secs(),
        since_epoch.subsec_nanos(),
        std::process::id()
    )
}

/// The staged file of the `index`th change: short and independent of the
/// target's name (`.<name>.driftless-<txid>` overflowed NAME_MAX for a
/// 240-character file name). The journal records it, so recovery needs no
/// rule to find it.
fn staged_name(index: usize, txid: &str) -> String {
    format!(".driftless-{index}-{txid}")
}

pub(super) fn parent_key(path: &TargetPath) -> String {
    match path.as_str().rsplit_once('/') {
        Some((p, _)) => p.to_string(),
        None => String::new(),
    }
}

/// The journal entries of a plan, computed before any I/O so the intent
/// is on disk before the first byte is staged.
pub(super) fn intent(plan: &Plan, txid: &str) -> Vec<JournalEntry> {
    plan.changes
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let meta = |mode, uid, gid| Meta { mode, uid, gid };
            let old = c.before.as_ref().map(|b| meta(b.mode, b.uid, b.gid));
            let mut new = c.after.as_ref().map(|a| meta(a.mode, a.uid, a.gid));
            let staged = Some(staged_name(i, txid));
            let (op, staged) = match c.kind {
                ChangeKind::Adopt => (Op::Adopt, None),
                ChangeKind::Create | ChangeKind::Update if c.content_changed => {
                    (Op::Replace, staged)
                }
                ChangeKind::Create | ChangeKind::Update => (Op::Meta, None),
                ChangeKind::Remove => match &c.restore_original {
                    Some(o) => {
                        new = Some(meta(o.mode, o.uid, o.gid));
                        (Op::Replace, staged)
                    }
                    None => (Op::Remove, None),
                },
            };
            let backup = (c.before.is_some() && op != Op::Adopt).then(|| i.to_string());
            JournalEntry {
                path: c.path.clone(),
                op,
                staged,
                backup,
                old,
                new,
                link: None,
                old_link: None,
            }
        })
        .chain(path_intent(plan, txid))
        .chain(dir_intent(plan, txid))
        .collect()
}

/// The journal entries of the managed directories to create or correct,
/// after the links' and absent paths' (a directory leaving the
/// repository has none: it is removed after the commit, if empty).
fn dir_intent<'a>(plan: &'a Plan, txid: &'a str) -> impl Iterator<Item = JournalEntry> + 'a {
    let first = plan.changes.len() + plan.links.len() + plan.absent.len();
    let meta = |m: crate::plan::dirs::DirMeta| Meta {
        mode: m.mode,
        uid: m.uid,
        gid: m.gid,
    };
    plan.dirs
        .iter()
        .filter(|c| c.action != DirAction::Remove)
        .enumerate()
        .map(move |(j, c)| {
            let (op, staged) = match c.action {
                DirAction::Create => (Op::Mkdir, Some(staged_name(first + j, txid))),
                _ => (Op::DirMeta, None),
            };
            JournalEntry {
                path: c.path.clone(),
                op,
                staged,
                backup: None,
                old: c.was.map(meta),
                new: Some(meta(c.meta)),
                link: None,
                old_link: None,
            }
        })
}

/// The journal entries of the links, then the absent paths, after the
/// files' (indices, hence staged and backup names, continue theirs).
fn path_intent<'a>(plan: &'a Plan, txid: &'a str) -> impl Iterator<Item = JournalEntry> + 'a {
    let first = plan.changes.len();
    let link_meta = |owner: Option<(u32, u32)>| {
        owner.map(|(uid, gid)| Meta {
            mode: 0o777,
            uid,
            gid,
        })
    };
    let links = plan.links.iter().map(move |c| (c, link_meta(c.was_owner)));
    let links = links.enumerate().map(move |(j, (c, old))| {
        let i = first + j;
        match c.action {
            LinkAction::Create | LinkAction::Retarget => JournalEntry {
                path: c.path.clone(),
                op: Op::Link,
                staged: Some(staged_name(i, txid)),
                backup: None,
                old,
                new: None,
                link: c.target.clone(),
                old_link: c.was.clone(),
            },
            LinkAction::Remove => JournalEntry {
                path: c.path.clone(),
                op: Op::Remove,
                staged: None,
                backup: None,
                old,
                new: None,
                link: None,
                old_link: c.was.clone(),
            },
        }
    });
    let first = first + plan.links.len();
    let absent = plan.absent.iter().enumerate().map(move |(j, c)| {
        let i = first + j;
        match (&c.file, &c.link) {
            (Some(f), _) => JournalEntry {
                path: c.path.clone(),
                op: Op::Remove,
                staged: None,
                backup: Some(i.to_string()),
                old: Some(Meta {
                    mode: f.mode,
                    uid: f.uid,
                    gid: f.gid,
                }),
                new: None,
                link: None,
                old_link: None,
            },
            (None, link) => JournalEntry {
                path: c.path.clone(),
                op: Op::Remove,
                staged: None,
                backup: None,
                old: link_meta(Some(c.link_owner)),
                new: None,
                link: None,
                old_link: link.clone(),
            },
        }
    });
    links.chain(absent)
}

/// The envelope format of `journal`: 1 unless it records links (see
/// [`JournalEntry::uses_links`]).
pub(super) fn journal_format(journal: &Journal) -> u64 {
    if journal.accounts.is_some() || journal.packages.is_some() {
        crate::effects::state::STATE_FORMAT_ACCOUNTS
    } else if journal
        .entries
        .iter()
        .any(|e| e.uses_links() || e.uses_directories())
    {
        crate::effects::state::STATE_FORMAT_RESOURCES
    } else {
        crate::effects::state::STATE_FORMAT
    }
}
