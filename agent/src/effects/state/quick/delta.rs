//! How a record's files differ from its base's: applied when the record
//! is read, composed from the last record and the new files when it is
//! written (see the parent module for why the record is kept this way).

use std::collections::BTreeMap;

use anyhow::Result;

use crate::desired::spec::TargetPath;
use crate::plan::quick::Stamp;

/// One file's line: its stamp and whether it is self-contained.
pub type FileLine = (TargetPath, Stamp, bool);

/// How the record's files differ from the base's, one path each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Change {
    /// A file the base does not have.
    Added(FileLine),
    /// A file the base has, with another stamp or flag.
    Changed(FileLine),
    /// A file of the base that the record does not have.
    Removed(TargetPath),
}

impl Change {
    pub(super) fn path(&self) -> &TargetPath {
        match self {
            Change::Added((p, _, _)) | Change::Changed((p, _, _)) | Change::Removed(p) => p,
        }
    }
}

/// The base's files with `changes` (in path order, as decoded) applied.
/// A change that does not fit the base (a changed or removed file it does
/// not have, an added one it has) is an error: the files do not belong
/// together. (A base out of path order, which only a hand-made file is,
/// gives a record no more wrong than that file: a line is replaced only
/// by one of the same path.)
pub(super) fn apply(mut files: Vec<FileLine>, changes: &[Change]) -> Result<Vec<FileLine>> {
    let find = |files: &[FileLine], p: &TargetPath| files.binary_search_by(|(q, _, _)| q.cmp(p));
    if changes.iter().all(|c| matches!(c, Change::Changed(_))) {
        // The usual delta (files rewritten in place): no reshuffle.
        for c in changes {
            if let Change::Changed(line) = c {
                let at = find(&files, &line.0).map_err(|_| {
                    anyhow::anyhow!("changes {}, which its base does not have", line.0)
                })?;
                files[at] = line.clone();
            }
        }
        return Ok(files);
    }
    let mut out = Vec::with_capacity(files.len() + changes.len());
    let mut base = files.into_iter().peekable();
    for c in changes {
        while let Some(line) = base.next_if(|(q, _, _)| q < c.path()) {
            out.push(line);
        }
        let here = base.next_if(|(q, _, _)| q == c.path()).is_some();
        match (c, here) {
            (Change::Added(line), false) | (Change::Changed(line), true) => out.push(line.clone()),
            (Change::Removed(_), true) => {}
            (_, true) => anyhow::bail!("adds {}, which its base already has", c.path()),
            (_, false) => anyhow::bail!(
                "changes or removes {}, which its base does not have",
                c.path()
            ),
        }
    }
    out.extend(base);
    Ok(out)
}

/// The delta from a base to a record of `files`, given an earlier record
/// on that base (`old`, its `old_changes`): those changes, updated by how
/// `files` differ from `old`. `None` if
/// either list is out of path order (a new base is written then).
pub(super) fn compose(
    old: &[FileLine],
    old_changes: &[Change],
    files: &[(&TargetPath, Stamp, bool)],
) -> Option<Vec<Change>> {
    use std::cmp::Ordering;
    let ascending = |a: &TargetPath, b: &TargetPath| a < b;
    if !old.windows(2).all(|w| ascending(&w[0].0, &w[1].0))
        || !files.windows(2).all(|w| ascending(w[0].0, w[1].0))
    {
        return None;
    }
    let mut changes: BTreeMap<&TargetPath, &Change> =
        old_changes.iter().map(|c| (c.path(), c)).collect();
    let mut fresh: Vec<Change> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < files.len() {
        let order = match (old.get(i), files.get(j)) {
            (Some(o), Some(n)) => o.0.cmp(n.0),
            (Some(_), None) => Ordering::Less,
            _ => Ordering::Greater,
        };
        match order {
            Ordering::Equal => {
                let ((p, so, co), (_, sn, cn)) = (&old[i], &files[j]);
                if (so, co) != (sn, cn) {
                    let line = (p.clone(), *sn, *cn);
                    fresh.push(match changes.remove(p) {
                        Some(Change::Added(_)) => Change::Added(line),
                        _ => Change::Changed(line),
                    });
                }
                i += 1;
                j += 1;
            }
            // Gone: if the base has it, the delta removes it.
            Ordering::Less => {
                let p = &old[i].0;
                if !matches!(changes.remove(p), Some(Change::Added(_))) {
                    fresh.push(Change::Removed(p.clone()));
                }
                i += 1;
            }
            // New: the base has it only if an earlier delta removed it.
            Ordering::Greater => {
                let (p, s, c) = files[j];
                let line = (p.clone(), s, c);
                fresh.push(match changes.remove(p) {
                    Some(Change::Removed(_)) => Change::Changed(line),
                    _ => Change::Added(line),
                });
                j += 1;
            }
        }
    }
    let mut out: Vec<Change> = changes.into_values().cloned().collect();
    out.extend(fresh);
    out.sort_by(|a, b| a.path().cmp(b.path()));
    Some(out)
}
