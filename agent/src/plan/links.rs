//! The pure diff of the path kinds besides files (issue #16 step 3):
//! managed symlinks (`[[links]]`) and paths that must not exist
//! (`[[absent]]`). They join the file transaction (same journal, same
//! switch, same flushes) as entries after the files'.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::inventory::LinkEntry;
use super::{Observation, Observed, OldFile};
use crate::desired::load::{AbsentDecl, LinkDecl};
use crate::desired::spec::TargetPath;
use crate::desired::Diagnostics;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkAction {
    /// Nothing was at the path.
    Create,
    /// A symlink with another target was there.
    Retarget,
    /// The link left the repository and driftless had created it.
    Remove,
}

/// One change to a managed symlink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinkChange {
    pub path: TargetPath,
    pub action: LinkAction,
    /// Role that manages (or managed, for a removal) the link.
    pub role: String,
    /// The new target (none for a removal).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The target the link had before (none when there was no link).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub was: Option<String>,
    /// Owner of the link before (restored on revert).
    #[serde(skip)]
    pub was_owner: Option<(u32, u32)>,
    /// Mode of the parent directories created for it.
    #[serde(skip)]
    pub dir_mode: u32,
}

/// A path of `[[absent]]` that exists: removed, backed up first.
#[derive(Debug, Clone, Serialize)]
pub struct AbsentChange {
    pub path: TargetPath,
    pub role: String,
    /// The regular file removed (its content is backed up).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<OldFile>,
    /// The symlink removed: its target (re-created on revert).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// Owner of the removed symlink.
    #[serde(skip)]
    pub link_owner: (u32, u32),
    /// Removed by the purge of its directory (`[[dirs]]` with `purge =
    /// true`), not by an `[[absent]]` entry: the same removal, backed up.
    #[serde(skip)]
    pub purged: bool,
}

/// The link changes of `decls` against the host and the previous
/// inventory's links, and the links the next inventory records. A link
/// that left the repository is removed only if driftless created it and
/// it still points where driftless left it; one whose path another kind
/// now declares (`claimed_elsewhere`) is left to that kind.
pub fn diff_links(
    decls: &[LinkDecl],
    observed: &Observed,
    previous: &BTreeMap<TargetPath, LinkEntry>,
    claimed_elsewhere: &BTreeSet<&TargetPath>,
    diags: &mut Diagnostics,
) -> (Vec<LinkChange>, BTreeMap<TargetPath, LinkEntry>) {
    let mut changes = Vec::new();
    let mut next = BTreeMap::new();
    for d in decls {
        let prev = previous.get(&d.path);
        let obs = observed.get(&d.path).unwrap_or(&Observation::Missing);
        let change = |action, was: Option<&String>, was_owner| LinkChange {
            path: d.path.clone(),
            action,
            role: d.role.clone(),
            target: Some(d.target.clone()),
            was: was.cloned(),
            was_owner,
            dir_mode: d.dir_mode.0,
        };
        let created = match obs {
            Observation::Missing => {
                changes.push(change(LinkAction::Create, None, None));
                prev.is_none_or(|p| p.created)
            }
            Observation::Link { target, .. } if *target == d.target => {
                prev.is_some_and(|p| p.created)
            }
            Observation::Link { target, uid, gid } => {
                changes.push(change(
                    LinkAction::Retarget,
                    Some(target),
                    Some((*uid, *gid)),
                ));
                prev.is_some_and(|p| p.created)
            }
            Observation::File(_) => {
                diags.push(format!(
                    "{} ({}): a regular file is where the link must go; driftless replaces only a \
                     symlink with a link: remove the file, or declare it in [[absent]] in one commit \
                     and the link in the next",
                    d.path, d.origin
                ));
                continue;
            }
            Observation::Dir { .. } => {
                diags.push(format!(
                    "{} ({}): a directory is where the link must go; driftless never replaces a \
                     directory with a link: remove it, or manage another path",
                    d.path, d.origin
                ));
                continue;
            }
            Observation::Other { kind } => {
                diags.push(format!(
                    "{} ({}): a {kind} is where the link must go; driftless never replaces a {kind} \
                     with a link: remove it, or manage another path",
                    d.path, d.origin
                ));
                continue;
            }
        };
        next.insert(
            d.path.clone(),
            LinkEntry {
                role: d.role.clone(),
                target: d.target.clone(),
                created,
            },
        );
    }
    for (path, entry) in previous {
        if next.contains_key(path) || claimed_elsewhere.contains(path) || !entry.created {
            continue;
        }
        match observed.get(path).unwrap_or(&Observation::Missing) {
            // Still the link driftless made: remove it.
            Observation::Link { target, uid, gid } if *target == entry.target => {
                changes.push(LinkChange {
                    path: path.clone(),
                    action: LinkAction::Remove,
                    role: entry.role.clone(),
                    target: None,
                    was: Some(target.clone()),
                    was_owner: Some((*uid, *gid)),
                    dir_mode: 0,
                })
            }
            // Gone, or changed by someone else since: forget it.
            _ => {}
        }
    }
    changes.sort_by(|a, b| a.path.cmp(&b.path));
    (changes, next)
}

/// The removals `decls` need on this host: a regular file or a symlink at
/// an absent path is removed; a directory or a special file is refused.
/// `digest` hashes a removed file's content for display.
pub fn diff_absent(
    decls: &[AbsentDecl],
    observed: &Observed,
    digest: &dyn Fn(&TargetPath, &[u8]) -> String,
    diags: &mut Diagnostics,
) -> Vec<AbsentChange> {
    let mut changes = Vec::new();
    for d in decls {
        match observed.get(&d.path).unwrap_or(&Observation::Missing) {
            Observation::Missing => {}
            Observation::File(cur) => changes.push(AbsentChange {
                path: d.path.clone(),
                role: d.role.clone(),
                file: Some(super::old_file(cur, digest(&d.path, &cur.content))),
                link: None,
                link_owner: (0, 0),
                purged: false,
            }),
            Observation::Link { target, uid, gid } => changes.push(AbsentChange {
                path: d.path.clone(),
                role: d.role.clone(),
                file: None,
                link: Some(target.clone()),
                link_owner: (*uid, *gid),
                purged: false,
            }),
            Observation::Dir { .. } => diags.push(format!(
                "{} ({}): it is a directory; absent removes only a regular file or a symlink (a \
                 directory is refused): remove it by hand, or drop this entry",
                d.path, d.origin
            )),
            Observation::Other { kind } => diags.push(format!(
                "{} ({}): it is a {kind}; absent removes only a regular file or a symlink (a \
                 {kind} is refused): remove it by hand, or drop this entry",
                d.path, d.origin
            )),
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::spec::Mode;
    use crate::plan::FileState;

    fn p(s: &str) -> TargetPath {
        TargetPath::parse(s).unwrap()
    }

    fn link(path: &str, target: &str) -> LinkDecl {
        LinkDecl {
            path: p(path),
            role: "r".into(),
            target: target.into(),
            dir_mode: Mode::DEFAULT_DIR,
            origin: "roles/r/role.toml:1 links[0]".into(),
        }
    }

    fn on_disk_link(target: &str) -> Observation {
        Observation::Link {
            target: target.into(),
            uid: 7,
            gid: 8,
        }
    }

    fn entry(target: &str, created: bool) -> LinkEntry {
        LinkEntry {
            role: "r".into(),
            target: target.into(),
            created,
        }
    }

    type Diffed = (Vec<LinkChange>, BTreeMap<TargetPath, LinkEntry>);

    fn diff(
        decls: &[LinkDecl],
        obs: &[(&str, Observation)],
        prev: &[(&str, LinkEntry)],
    ) -> Result<Diffed, Vec<String>> {
        let observed: Observed = obs.iter().map(|(k, o)| (p(k), o.clone())).collect();
        let prev: BTreeMap<_, _> = prev.iter().map(|(k, e)| (p(k), e.clone())).collect();
        let mut diags = Diagnostics::default();
        let out = diff_links(decls, &observed, &prev, &BTreeSet::new(), &mut diags);
        if diags.is_empty() {
            Ok(out)
        } else {
            Err(diags.iter().cloned().collect())
        }
    }

    #[test]
    fn a_missing_link_is_created_and_recorded_as_created() {
        let (changes, next) = diff(&[link("/etc/a", "../b")], &[], &[]).unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].action, LinkAction::Create);
        assert_eq!(changes[0].target.as_deref(), Some("../b"));
        assert_eq!(changes[0].was, None);
        assert_eq!(next[&p("/etc/a")], entry("../b", true));
    }

    #[test]
    fn the_same_target_is_no_change_and_a_found_link_is_not_ours_to_remove() {
        let (changes, next) = diff(
            &[link("/etc/a", "../b")],
            &[("/etc/a", on_disk_link("../b"))],
            &[],
        )
        .unwrap();
        assert!(changes.is_empty());
        assert_eq!(next[&p("/etc/a")], entry("../b", false));
        // Once created, it stays created.
        let (_, next) = diff(
            &[link("/etc/a", "../b")],
            &[("/etc/a", on_disk_link("../b"))],
            &[("/etc/a", entry("../b", true))],
        )
        .unwrap();
        assert!(next[&p("/etc/a")].created);
    }

    #[test]
    fn another_target_is_a_retarget_compared_verbatim() {
        // `./b` and `b` resolve alike, but the target is never resolved.
        let (changes, _) = diff(
            &[link("/etc/a", "b")],
            &[("/etc/a", on_disk_link("./b"))],
            &[],
        )
        .unwrap();
        assert_eq!(changes[0].action, LinkAction::Retarget);
        assert_eq!(changes[0].was.as_deref(), Some("./b"));
        assert_eq!(changes[0].was_owner, Some((7, 8)));
    }

    #[test]
    fn a_file_or_directory_in_the_way_is_refused_naming_the_entry() {
        let file = Observation::File(FileState {
            content: b"x".to_vec(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        });
        let err = diff(&[link("/etc/a", "b")], &[("/etc/a", file)], &[]).unwrap_err();
        assert!(err[0].contains("/etc/a (roles/r/role.toml:1 links[0]): a regular file"));
        let dir = Observation::Other { kind: "directory" };
        let err = diff(&[link("/etc/a", "b")], &[("/etc/a", dir)], &[]).unwrap_err();
        assert!(
            err[0].contains("a directory is where the link must go"),
            "{err:?}"
        );
    }

    #[test]
    fn a_pruned_link_is_removed_only_if_created_and_untouched() {
        let (changes, next) = diff(
            &[],
            &[("/etc/a", on_disk_link("b")), ("/etc/c", on_disk_link("d"))],
            &[("/etc/a", entry("b", true)), ("/etc/c", entry("d", false))],
        )
        .unwrap();
        assert!(next.is_empty());
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(changes[0].path, p("/etc/a"));
        assert_eq!(changes[0].action, LinkAction::Remove);
        assert_eq!(changes[0].was.as_deref(), Some("b"));
        // Retargeted by hand since: someone else's now.
        let (changes, _) = diff(
            &[],
            &[("/etc/a", on_disk_link("elsewhere"))],
            &[("/etc/a", entry("b", true))],
        )
        .unwrap();
        assert!(changes.is_empty());
    }

    #[test]
    fn a_pruned_link_claimed_by_another_kind_is_left_to_it() {
        let observed: Observed = [(p("/etc/a"), on_disk_link("b"))].into();
        let prev = [(p("/etc/a"), entry("b", true))].into();
        let a = p("/etc/a");
        let claimed = [&a].into();
        let mut diags = Diagnostics::default();
        let (changes, _) = diff_links(&[], &observed, &prev, &claimed, &mut diags);
        assert!(changes.is_empty() && diags.is_empty());
    }

    #[test]
    fn absent_removes_files_and_links_and_refuses_directories() {
        let decl = |path: &str| AbsentDecl {
            path: p(path),
            role: "base".into(),
            origin: format!("roles/base/role.toml:3 absent[0] {path}"),
        };
        let observed: Observed = [
            (
                p("/etc/f"),
                Observation::File(FileState {
                    content: b"old".to_vec(),
                    mode: 0o640,
                    uid: 1,
                    gid: 2,
                }),
            ),
            (p("/etc/l"), on_disk_link("../x")),
            (p("/etc/d"), Observation::Other { kind: "directory" }),
        ]
        .into();
        let mut diags = Diagnostics::default();
        let changes = diff_absent(
            &[decl("/etc/f"), decl("/etc/l"), decl("/etc/gone")],
            &observed,
            &|_, b| format!("h{}", b.len()),
            &mut diags,
        );
        assert!(diags.is_empty());
        assert_eq!(changes.len(), 2);
        let f = changes[0].file.as_ref().unwrap();
        assert_eq!((f.mode, f.uid, f.gid, f.size), (0o640, 1, 2, 3));
        assert_eq!(f.sha256, "h3");
        assert_eq!(changes[1].link.as_deref(), Some("../x"));
        assert_eq!(changes[1].link_owner, (7, 8));
        diff_absent(
            &[decl("/etc/d")],
            &observed,
            &|_, _| String::new(),
            &mut diags,
        );
        let msg = diags.iter().next().unwrap();
        assert!(
            msg.contains("/etc/d (roles/base/role.toml:3 absent[0] /etc/d): it is a directory"),
            "{msg}"
        );
    }
}
