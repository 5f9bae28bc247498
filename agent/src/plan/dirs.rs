//! The pure diff of managed directories (`[[dirs]]`, issue #16 step 2):
//! created if missing, mode and owner corrected on drift, and, once one
//! leaves the repository, removed if driftless created it and it is
//! empty. They join the file transaction as journal entries after the
//! links' and absent paths' (see `effects::apply`).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::inventory::DirectoryEntry;
use super::{Ids, Observation, Observed};
use crate::desired::load::DirDecl;
use crate::desired::spec::TargetPath;
use crate::desired::Diagnostics;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DirAction {
    /// Nothing was at the path: created with its mode and owner.
    Create,
    /// The directory is there with another mode or owner: corrected in
    /// place.
    Meta,
    /// It left the repository and driftless had created it: removed after
    /// the commit if it is empty (otherwise left, and tried again after
    /// the next commit, like a directory created for files).
    Remove,
}

/// Mode and owner of a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DirMeta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// One change to a managed directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirChange {
    pub path: TargetPath,
    pub action: DirAction,
    /// Role that manages (or managed, for a removal) the directory.
    pub role: String,
    /// Mode and owner after (for a removal: as last applied).
    #[serde(flatten)]
    pub meta: DirMeta,
    /// Mode and owner before (a correction only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub was: Option<DirMeta>,
    /// Mode of the parent directories created for it.
    #[serde(skip)]
    pub dir_mode: u32,
}

/// The directory changes of `decls` against the host, and the
/// directories the next inventory records. `created_for_files` are the
/// directories driftless created for files (the inventory's `dirs`): one
/// of them now declared counts as created by driftless. A directory that
/// left the repository is removed (if empty) only if driftless created
/// it and it is still a directory; one whose path another kind now
/// declares (`claimed_elsewhere`) is left to that kind.
pub fn diff_dirs(
    decls: &[DirDecl],
    observed: &Observed,
    previous: &BTreeMap<TargetPath, DirectoryEntry>,
    created_for_files: &BTreeSet<TargetPath>,
    claimed_elsewhere: &BTreeSet<&TargetPath>,
    ids: &Ids,
    diags: &mut Diagnostics,
) -> (Vec<DirChange>, BTreeMap<TargetPath, DirectoryEntry>) {
    let mut changes = Vec::new();
    let mut next = BTreeMap::new();
    for d in decls {
        let (uid, gid) = if ids.apply_ownership {
            match (ids.uid(&d.owner), ids.gid(&d.group)) {
                (Some(u), Some(g)) => (u, g),
                (u, g) => {
                    if u.is_none() {
                        diags.push(format!(
                            "{} ({}): user {:?} does not exist on this host; create it first or use a numeric uid",
                            d.path, d.origin, d.owner.0
                        ));
                    }
                    if g.is_none() {
                        diags.push(format!(
                            "{} ({}): group {:?} does not exist on this host; create it first or use a numeric gid",
                            d.path, d.origin, d.group.0
                        ));
                    }
                    continue;
                }
            }
        } else {
            (ids.own_uid, ids.own_gid)
        };
        let want = DirMeta {
            mode: d.mode.0,
            uid,
            gid,
        };
        let prev = previous.get(&d.path);
        let change = |action, meta, was| DirChange {
            path: d.path.clone(),
            action,
            role: d.role.clone(),
            meta,
            was,
            dir_mode: d.dir_mode.0,
        };
        let was_ours = prev.is_some_and(|p| p.created) || created_for_files.contains(&d.path);
        let (created, recorded) = match observed.get(&d.path).unwrap_or(&Observation::Missing) {
            Observation::Missing => {
                changes.push(change(DirAction::Create, want, None));
                (prev.is_none_or(|p| p.created), want)
            }
            Observation::Dir { mode, uid, gid } => {
                let now = DirMeta {
                    mode: *mode,
                    uid: *uid,
                    gid: *gid,
                };
                // Unprivileged, owners are neither compared nor applied.
                let target = if ids.apply_ownership {
                    want
                } else {
                    DirMeta {
                        mode: want.mode,
                        ..now
                    }
                };
                if now != target {
                    changes.push(change(DirAction::Meta, target, Some(now)));
                }
                (was_ours, target)
            }
            Observation::File(_) => {
                diags.push(format!(
                    "{} ({}): a regular file is where the directory must go; driftless never \
                     replaces a file with a directory: remove the file, or declare it in \
                     [[absent]] in one commit and the directory in the next",
                    d.path, d.origin
                ));
                continue;
            }
            Observation::Link { .. } => {
                diags.push(format!(
                    "{} ({}): a symlink is where the directory must go; driftless never follows \
                     or replaces a symlink with a directory: remove it, or manage the real path",
                    d.path, d.origin
                ));
                continue;
            }
            Observation::Other { kind } => {
                diags.push(format!(
                    "{} ({}): a {kind} is where the directory must go; driftless never follows \
                     or replaces a {kind} with a directory: remove it, or manage the real path",
                    d.path, d.origin
                ));
                continue;
            }
        };
        next.insert(
            d.path.clone(),
            DirectoryEntry {
                role: d.role.clone(),
                mode: recorded.mode,
                uid: recorded.uid,
                gid: recorded.gid,
                created,
            },
        );
    }
    for (path, entry) in previous {
        if next.contains_key(path) || claimed_elsewhere.contains(path) || !entry.created {
            continue;
        }
        // Still a directory: removed after the commit if empty. Gone, or
        // replaced by something else since: forget it.
        if let Some(Observation::Dir { mode, uid, gid }) = observed.get(path) {
            changes.push(DirChange {
                path: path.clone(),
                action: DirAction::Remove,
                role: entry.role.clone(),
                meta: DirMeta {
                    mode: *mode,
                    uid: *uid,
                    gid: *gid,
                },
                was: None,
                dir_mode: 0,
            });
        }
    }
    changes.sort_by(|a, b| a.path.cmp(&b.path));
    (changes, next)
}

/// The entries of each purged directory that nothing manages: removed,
/// backed up first (the same removal as an absent path's, marked
/// `purged`). `managed` are the paths some entry declares or the previous
/// inventory still manages (a pruned file is the prune's business); a
/// `keep` name stays. A subdirectory or a special file nobody manages is
/// refused (v1: no recursive backup), naming it and what to do.
pub fn diff_purge(
    decls: &[DirDecl],
    observed: &Observed,
    managed: &BTreeSet<&TargetPath>,
    digest: &dyn Fn(&[u8]) -> String,
    diags: &mut Diagnostics,
) -> Vec<super::links::AbsentChange> {
    let mut out = Vec::new();
    for d in decls.iter().filter(|d| d.purge) {
        if !matches!(observed.get(&d.path), Some(Observation::Dir { .. })) {
            // Missing (created empty by this transaction) or refused.
            continue;
        }
        let prefix = format!("{}/", d.path.as_str());
        let children = observed.iter().filter(|(p, _)| {
            p.as_str()
                .strip_prefix(&prefix)
                .is_some_and(|rest| !rest.contains('/'))
        });
        for (path, obs) in children {
            if managed.contains(path) || d.keep.contains(path.file_name()) {
                continue;
            }
            let change = |file, link, link_owner| super::links::AbsentChange {
                path: path.clone(),
                role: d.role.clone(),
                file,
                link,
                link_owner,
                purged: true,
            };
            match obs {
                Observation::Missing => {}
                Observation::File(cur) => out.push(change(
                    Some(super::old_file(cur, digest(&cur.content))),
                    None,
                    (0, 0),
                )),
                Observation::Link { target, uid, gid } => {
                    out.push(change(None, Some(target.clone()), (*uid, *gid)))
                }
                Observation::Dir { .. } | Observation::Other { .. } => {
                    let kind = match obs {
                        Observation::Other { kind } => kind,
                        _ => "directory",
                    };
                    diags.push(format!(
                        "{path}: the purge of {} ({}) would remove this {kind}, which no role \
                         manages; driftless purges only files and symlinks (v1): declare it, add \
                         {:?} to keep, or remove it by hand",
                        d.path,
                        d.origin,
                        path.file_name()
                    ));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::spec::{Mode, Principal};

    fn path(p: &str) -> TargetPath {
        TargetPath::parse(p).unwrap()
    }

    fn decl(p: &str, mode: u32, owner: &str) -> DirDecl {
        DirDecl {
            path: path(p),
            role: "web".into(),
            mode: Mode(mode),
            owner: Principal(owner.into()),
            group: Principal(owner.into()),
            dir_mode: Mode(0o755),
            purge: false,
            keep: BTreeSet::new(),
            origin: "roles/web/role.toml:3 dirs[0]".into(),
        }
    }

    fn root_ids() -> Ids {
        let mut ids = Ids {
            apply_ownership: true,
            ..Default::default()
        };
        ids.users.insert("app".into(), 994);
        ids.groups.insert("app".into(), 994);
        ids
    }

    fn dir(mode: u32, id: u32) -> Observation {
        Observation::Dir {
            mode,
            uid: id,
            gid: id,
        }
    }

    fn entry(created: bool) -> DirectoryEntry {
        DirectoryEntry {
            role: "web".into(),
            mode: 0o750,
            uid: 994,
            gid: 994,
            created,
        }
    }

    type Out = (
        Vec<DirChange>,
        BTreeMap<TargetPath, DirectoryEntry>,
        Diagnostics,
    );

    fn diff(
        decls: &[DirDecl],
        observed: &[(&str, Observation)],
        previous: &[(&str, DirectoryEntry)],
        for_files: &[&str],
        ids: &Ids,
    ) -> Out {
        let observed: Observed = observed.iter().map(|(p, o)| (path(p), o.clone())).collect();
        let previous = previous.iter().map(|(p, e)| (path(p), e.clone())).collect();
        let for_files = for_files.iter().map(|p| path(p)).collect();
        let mut diags = Diagnostics::default();
        let (c, n) = diff_dirs(
            decls,
            &observed,
            &previous,
            &for_files,
            &BTreeSet::new(),
            ids,
            &mut diags,
        );
        (c, n, diags)
    }

    #[test]
    fn a_missing_directory_is_created_with_its_mode_and_owner() {
        let (c, n, d) = diff(
            &[decl("/srv/app", 0o750, "app")],
            &[],
            &[],
            &[],
            &root_ids(),
        );
        assert!(d.is_empty());
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].action, DirAction::Create);
        assert_eq!(
            c[0].meta,
            DirMeta {
                mode: 0o750,
                uid: 994,
                gid: 994
            }
        );
        assert!(n[&path("/srv/app")].created);
    }

    #[test]
    fn a_directory_as_desired_is_no_change_and_keeps_who_created_it() {
        let decls = [decl("/srv/app", 0o750, "app")];
        let obs = [("/srv/app", dir(0o750, 994))];
        let (c, n, _) = diff(&decls, &obs, &[("/srv/app", entry(true))], &[], &root_ids());
        assert!(c.is_empty());
        assert!(n[&path("/srv/app")].created);
        // Found there, never recorded: not ours.
        let (_, n, _) = diff(&decls, &obs, &[], &[], &root_ids());
        assert!(!n[&path("/srv/app")].created);
        // Created by driftless for a file earlier: ours.
        let (_, n, _) = diff(&decls, &obs, &[], &["/srv/app"], &root_ids());
        assert!(n[&path("/srv/app")].created);
    }

    #[test]
    fn a_drifted_mode_or_owner_is_corrected_and_remembers_the_old_one() {
        let decls = [decl("/srv/app", 0o750, "app")];
        for now in [dir(0o777, 994), dir(0o750, 0)] {
            let (c, _, _) = diff(&decls, &[("/srv/app", now.clone())], &[], &[], &root_ids());
            assert_eq!(c.len(), 1, "{now:?}");
            assert_eq!(c[0].action, DirAction::Meta);
            let Observation::Dir { mode, uid, gid } = now else {
                unreachable!()
            };
            assert_eq!(c[0].was, Some(DirMeta { mode, uid, gid }));
        }
    }

    #[test]
    fn unprivileged_the_owner_is_neither_compared_nor_applied() {
        let ids = Ids {
            apply_ownership: false,
            own_uid: 1000,
            own_gid: 1000,
            ..Default::default()
        };
        let decls = [decl("/srv/app", 0o750, "app")];
        let (c, _, d) = diff(&decls, &[("/srv/app", dir(0o750, 0))], &[], &[], &ids);
        assert!(d.is_empty() && c.is_empty(), "{c:?}");
        let (c, _, _) = diff(&decls, &[("/srv/app", dir(0o700, 0))], &[], &[], &ids);
        assert_eq!(
            c[0].meta,
            DirMeta {
                mode: 0o750,
                uid: 0,
                gid: 0
            }
        );
    }

    #[test]
    fn an_unknown_owner_a_file_or_a_symlink_at_the_path_is_refused_with_the_entry_named() {
        let (_, _, d) = diff(
            &[decl("/srv/app", 0o750, "nobody-here")],
            &[],
            &[],
            &[],
            &root_ids(),
        );
        let all = d.iter().cloned().collect::<Vec<_>>().join("\n");
        assert!(
            all.contains("roles/web/role.toml:3 dirs[0]")
                && all.contains("user \"nobody-here\" does not exist"),
            "{all}"
        );
        for (obs, what) in [
            (Observation::Other { kind: "symlink" }, "a symlink is where"),
            (
                Observation::File(crate::plan::FileState {
                    content: vec![],
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                }),
                "a regular file is where",
            ),
        ] {
            let (c, n, d) = diff(
                &[decl("/srv/app", 0o750, "app")],
                &[("/srv/app", obs)],
                &[],
                &[],
                &root_ids(),
            );
            let all = d.iter().cloned().collect::<Vec<_>>().join("\n");
            assert!(c.is_empty() && n.is_empty());
            assert!(all.contains(what) && all.contains("dirs[0]"), "{all}");
        }
    }

    #[test]
    fn a_directory_leaving_the_repository_is_removed_only_if_driftless_created_it() {
        let obs = [("/srv/old", dir(0o750, 994))];
        let (c, n, _) = diff(&[], &obs, &[("/srv/old", entry(true))], &[], &root_ids());
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].action, DirAction::Remove);
        assert!(n.is_empty());
        // Found there: left alone.
        let (c, _, _) = diff(&[], &obs, &[("/srv/old", entry(false))], &[], &root_ids());
        assert!(c.is_empty());
        // Gone, or replaced by a symlink: forgotten.
        for obs in [
            vec![],
            vec![("/srv/old", Observation::Other { kind: "symlink" })],
        ] {
            let (c, _, _) = diff(&[], &obs, &[("/srv/old", entry(true))], &[], &root_ids());
            assert!(c.is_empty());
        }
    }

    fn purged(p: &str, keep: &[&str]) -> DirDecl {
        DirDecl {
            purge: true,
            keep: keep.iter().map(|k| k.to_string()).collect(),
            ..decl(p, 0o755, "root")
        }
    }

    fn file(content: &str) -> Observation {
        Observation::File(crate::plan::FileState {
            content: content.as_bytes().to_vec(),
            mode: 0o640,
            uid: 0,
            gid: 0,
        })
    }

    fn purge(
        decls: &[DirDecl],
        observed: &[(&str, Observation)],
        managed: &[&str],
    ) -> (Vec<super::super::links::AbsentChange>, Diagnostics) {
        let observed: Observed = observed.iter().map(|(p, o)| (path(p), o.clone())).collect();
        let managed: Vec<TargetPath> = managed.iter().map(|p| path(p)).collect();
        let managed: BTreeSet<&TargetPath> = managed.iter().collect();
        let mut diags = Diagnostics::default();
        let out = diff_purge(decls, &observed, &managed, &|_| "d".into(), &mut diags);
        (out, diags)
    }

    #[test]
    fn purge_removes_what_nobody_manages_but_keeps_managed_kept_and_deeper_paths() {
        let conf = [
            ("/etc/c", dir(0o755, 0)),
            ("/etc/c/app.conf", file("managed")),
            ("/etc/c/default.conf", file("stray")),
            ("/etc/c/README", file("kept")),
            (
                "/etc/c/ln",
                Observation::Link {
                    target: "/x".into(),
                    uid: 0,
                    gid: 0,
                },
            ),
            ("/etc/c/gone", Observation::Missing),
            ("/etc/c/sub/deeper", file("not a child")),
            ("/etc/cx", file("a sibling, not a child")),
        ];
        let (out, d) = purge(
            &[purged("/etc/c", &["README"])],
            &conf,
            &["/etc/c/app.conf"],
        );
        assert!(d.is_empty(), "{d:?}");
        let paths: Vec<&str> = out.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, ["/etc/c/default.conf", "/etc/c/ln"]);
        assert!(out.iter().all(|c| c.purged));
        assert_eq!(out[0].file.as_ref().map(|f| f.mode), Some(0o640));
        assert_eq!(out[1].link.as_deref(), Some("/x"));
        // Without purge, nothing.
        let (out, _) = purge(&[decl("/etc/c", 0o755, "root")], &conf, &[]);
        assert!(out.is_empty());
        // A missing directory (created now) has nothing to purge.
        let (out, _) = purge(&[purged("/etc/c", &[])], &conf[1..], &[]);
        assert!(out.is_empty());
    }

    #[test]
    fn purge_refuses_an_unmanaged_subdirectory_naming_it() {
        let conf = [
            ("/etc/c", dir(0o755, 0)),
            ("/etc/c/sub", Observation::Other { kind: "directory" }),
        ];
        let (out, d) = purge(&[purged("/etc/c", &[])], &conf, &[]);
        assert!(out.is_empty());
        let all = d.iter().cloned().collect::<Vec<_>>().join("\n");
        assert!(
            all.contains("/etc/c/sub: the purge of /etc/c (roles/web/role.toml:3 dirs[0]) would remove this directory")
                && all.contains("add \"sub\" to keep"),
            "{all}"
        );
        // Kept or managed, it is fine.
        let (_, d) = purge(&[purged("/etc/c", &["sub"])], &conf, &[]);
        assert!(d.is_empty());
        let (_, d) = purge(&[purged("/etc/c", &[])], &conf, &["/etc/c/sub"]);
        assert!(d.is_empty());
    }

    #[test]
    fn changes_come_parents_first() {
        let decls = [
            decl("/srv/app", 0o750, "app"),
            decl("/srv/app/data", 0o700, "app"),
        ];
        let (c, _, _) = diff(&decls, &[], &[], &[], &root_ids());
        let paths: Vec<&str> = c.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, ["/srv/app", "/srv/app/data"]);
    }
}
