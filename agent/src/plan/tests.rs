use super::*;
use crate::desired::render::{Desired, DesiredFile};
use crate::desired::spec::{Mode, Principal, TargetPath, UnitAction, UnitActionKind};

fn tp(s: &str) -> TargetPath {
    TargetPath::parse(s).unwrap()
}

fn file(path: &str, content: &str, mode: u32) -> DesiredFile {
    DesiredFile {
        path: tp(path),
        role: "r".into(),
        content: content.as_bytes().to_vec(),
        mode: Mode(mode),
        dir_mode: Mode::DEFAULT_DIR,
        owner: Principal::root(),
        group: Principal::root(),
        on_change: vec![UnitAction {
            unit: "app.service".into(),
            action: UnitActionKind::Reload,
        }],
        sensitive: false,
        self_contained: true,
        reboot: false,
        origin: "roles/r/role.toml files[0]".into(),
    }
}

fn desired(files: Vec<DesiredFile>) -> Desired {
    Desired {
        host: "h".into(),
        files,
        checks: vec![],
        units: vec![],
        hooks: vec![],
        links: Vec::new(),
        absent: Vec::new(),
        dirs: Vec::new(),
        accounts: Default::default(),
        packages: Vec::new(),
    }
}

fn ids() -> Ids {
    Ids {
        apply_ownership: true,
        users: [("root".to_string(), 0)].into(),
        groups: [("root".to_string(), 0)].into(),
        ..Default::default()
    }
}

fn on_disk(content: &str, mode: u32) -> Observation {
    Observation::File(FileState {
        content: content.as_bytes().to_vec(),
        mode,
        uid: 0,
        gid: 0,
    })
}

fn inventory_of(p: &Plan) -> Inventory {
    let mut inv = p.next_inventory.clone();
    inv.txid = "t1".into();
    inv
}

#[test]
fn missing_file_is_created_with_its_actions() {
    let d = desired(vec![file("/etc/a", "x\n", 0o644)]);
    let p = plan(
        &d,
        Some("c1"),
        &Observed::new(),
        &Inventory::default(),
        &ids(),
    )
    .unwrap();
    assert_eq!(p.changes.len(), 1);
    assert_eq!(p.changes[0].kind, ChangeKind::Create);
    assert_eq!(p.unit_actions.len(), 1);
    assert!(p.next_inventory.files.contains_key(&tp("/etc/a")));
}

#[test]
fn identical_managed_file_is_no_change() {
    let d = desired(vec![file("/etc/a", "x\n", 0o644)]);
    let first = plan(
        &d,
        Some("c1"),
        &Observed::new(),
        &Inventory::default(),
        &ids(),
    )
    .unwrap();
    let obs = Observed::from([(tp("/etc/a"), on_disk("x\n", 0o644))]);
    let p = plan(&d, Some("c1"), &obs, &inventory_of(&first), &ids()).unwrap();
    assert!(p.is_empty(), "{:?}", p.changes);
    assert_eq!(p.unchanged, 1);
    assert!(p.unit_actions.is_empty());
}

#[test]
fn mode_only_change_is_a_change_that_triggers_on_change() {
    let d = desired(vec![file("/etc/a", "x\n", 0o600)]);
    let first = plan(
        &d,
        Some("c1"),
        &Observed::new(),
        &Inventory::default(),
        &ids(),
    )
    .unwrap();
    let obs = Observed::from([(tp("/etc/a"), on_disk("x\n", 0o644))]);
    let p = plan(&d, Some("c2"), &obs, &inventory_of(&first), &ids()).unwrap();
    assert_eq!(p.changes.len(), 1);
    let c = &p.changes[0];
    assert!(c.mode_changed && !c.content_changed && !c.owner_changed);
    assert_eq!(p.unit_actions[0].unit, "app.service");
}

#[test]
fn owner_is_ignored_when_ownership_is_not_applied() {
    let d = desired(vec![file("/etc/a", "x\n", 0o644)]);
    let unprivileged = Ids {
        apply_ownership: false,
        own_uid: 1000,
        own_gid: 1000,
        ..Default::default()
    };
    let first = plan(
        &d,
        None,
        &Observed::new(),
        &Inventory::default(),
        &unprivileged,
    )
    .unwrap();
    let obs = Observed::from([(
        tp("/etc/a"),
        Observation::File(FileState {
            content: b"x\n".to_vec(),
            mode: 0o644,
            uid: 1000,
            gid: 1000,
        }),
    )]);
    let p = plan(&d, None, &obs, &inventory_of(&first), &unprivileged).unwrap();
    assert!(p.is_empty());
}

#[test]
fn file_gone_from_repo_is_pruned_with_its_old_actions() {
    let d = desired(vec![file("/etc/a", "x\n", 0o644)]);
    let first = plan(
        &d,
        Some("c1"),
        &Observed::new(),
        &Inventory::default(),
        &ids(),
    )
    .unwrap();
    let obs = Observed::from([(tp("/etc/a"), on_disk("x\n", 0o644))]);
    let p = plan(
        &desired(vec![]),
        Some("c2"),
        &obs,
        &inventory_of(&first),
        &ids(),
    )
    .unwrap();
    assert_eq!(p.changes.len(), 1);
    assert_eq!(p.changes[0].kind, ChangeKind::Remove);
    assert!(p.changes[0].restore_original.is_none());
    assert_eq!(p.unit_actions[0].unit, "app.service");
    assert!(p.next_inventory.files.is_empty());
}

#[test]
fn pruned_file_already_gone_is_just_forgotten() {
    let d = desired(vec![file("/etc/a", "x\n", 0o644)]);
    let first = plan(
        &d,
        Some("c1"),
        &Observed::new(),
        &Inventory::default(),
        &ids(),
    )
    .unwrap();
    let p = plan(
        &desired(vec![]),
        Some("c2"),
        &Observed::new(),
        &inventory_of(&first),
        &ids(),
    )
    .unwrap();
    assert!(p.is_empty());
}

#[test]
fn preexisting_file_is_adopted_and_restored_when_pruned() {
    let d = desired(vec![file("/etc/a", "managed\n", 0o644)]);
    let obs = Observed::from([(tp("/etc/a"), on_disk("distro default\n", 0o640))]);
    let first = plan(&d, Some("c1"), &obs, &Inventory::default(), &ids()).unwrap();
    assert!(first.changes[0].adopt_original);
    let orig = first.next_inventory.files[&tp("/etc/a")]
        .original
        .clone()
        .unwrap();
    assert_eq!(orig.mode, 0o640);
    // Later the file leaves the repository: the original comes back.
    let obs = Observed::from([(tp("/etc/a"), on_disk("managed\n", 0o644))]);
    let p = plan(
        &desired(vec![]),
        Some("c2"),
        &obs,
        &inventory_of(&first),
        &ids(),
    )
    .unwrap();
    assert_eq!(p.changes[0].restore_original, Some(orig));
}

#[test]
fn preexisting_identical_file_is_adopted_without_actions() {
    let d = desired(vec![file("/etc/a", "same\n", 0o644)]);
    let obs = Observed::from([(tp("/etc/a"), on_disk("same\n", 0o644))]);
    let p = plan(&d, Some("c1"), &obs, &Inventory::default(), &ids()).unwrap();
    assert_eq!(p.changes[0].kind, ChangeKind::Adopt);
    assert!(p.unit_actions.is_empty());
}

#[test]
fn symlink_at_target_is_refused_with_the_path() {
    let d = desired(vec![file("/etc/resolv.conf", "x", 0o644)]);
    let obs = Observed::from([(
        tp("/etc/resolv.conf"),
        Observation::Other { kind: "symlink" },
    )]);
    let err = plan(&d, None, &obs, &Inventory::default(), &ids())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("/etc/resolv.conf") && err.contains("never follows or replaces a symlink"),
        "{err}"
    );
}

#[test]
fn unknown_owner_is_an_error_naming_file_and_user() {
    let mut f = file("/etc/a", "x", 0o644);
    f.owner = Principal("nosuchuser".into());
    let err = plan(
        &desired(vec![f]),
        None,
        &Observed::new(),
        &Inventory::default(),
        &ids(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("/etc/a") && err.contains("\"nosuchuser\" does not exist"),
        "{err}"
    );
}

#[test]
fn strongest_action_per_unit_wins_in_unit_order() {
    let a = |u: &str, k| UnitAction {
        unit: u.into(),
        action: k,
    };
    let merged = merge_actions(
        [
            a("b.service", UnitActionKind::Reload),
            a("a.service", UnitActionKind::Reload),
            a("b.service", UnitActionKind::Restart),
            a("a.service", UnitActionKind::TryRestart),
        ]
        .iter(),
    );
    assert_eq!(
        merged,
        vec![
            a("a.service", UnitActionKind::TryRestart),
            a("b.service", UnitActionKind::Restart)
        ]
    );
}

#[test]
fn diff_of_changed_file_is_unified_and_sensitive_is_redacted() {
    let d = desired(vec![file("/etc/a", "one\ntwo\n", 0o644)]);
    let obs = Observed::from([(tp("/etc/a"), on_disk("one\nthree\n", 0o644))]);
    let mut p = plan(&d, None, &obs, &Inventory::default(), &ids()).unwrap();
    let text = diff::content_diff(&p.changes[0], diff::Style { color: false });
    assert!(
        text.contains("--- a/etc/a") && text.contains("-three") && text.contains("+two"),
        "{text}"
    );
    p.changes[0].sensitive = true;
    let text = diff::content_diff(&p.changes[0], diff::Style { color: false });
    assert!(
        !text.contains("two") && text.contains("not shown"),
        "{text}"
    );
}

/// The inventory after `f` was created on an empty host.
fn applied(f: DesiredFile, ids: &Ids) -> Inventory {
    let p = plan(
        &desired(vec![f]),
        None,
        &Observed::new(),
        &Inventory::default(),
        ids,
    )
    .unwrap();
    inventory_of(&p)
}

/// Issue 13: a file that stopped being sensitive showed the old secret in
/// its diff, and the JSON plan carried an unkeyed digest of it.
#[test]
fn a_file_that_stops_being_sensitive_shows_neither_side() {
    let keyed = Ids {
        hash_key: vec![7; 32],
        ..ids()
    };
    let mut secret = file("/etc/a", "password=CANARY-old\n", 0o600);
    secret.sensitive = true;
    let inv = applied(secret, &keyed);
    let plain = file("/etc/a", "password=public\n", 0o600);
    let obs = Observed::from([(tp("/etc/a"), on_disk("password=CANARY-old\n", 0o600))]);
    let p = plan(&desired(vec![plain]), None, &obs, &inv, &keyed).unwrap();
    let c = &p.changes[0];
    assert!(c.sensitive, "a change is sensitive if either side is");
    let text = diff::content_diff(c, diff::Style { color: false });
    assert!(
        !text.contains("CANARY") && text.contains("not shown"),
        "{text}"
    );
    let json = serde_json::to_string(&p.changes).unwrap();
    assert!(
        !json.contains(&sha256_hex(b"password=CANARY-old\n")),
        "{json}"
    );
    assert!(c.before.as_ref().unwrap().sha256.starts_with("hmac:"));
    assert!(c.after.as_ref().unwrap().sha256.starts_with("hmac:"));
}

/// The bug this pins: a managed secret replaced by an `[[absent]]` entry
/// showed the plan (and `plan --format json`) an unkeyed sha256 of the
/// content it removes, which a short password can be found from.
#[test]
fn a_secret_declared_absent_is_shown_by_its_keyed_digest_only() {
    use crate::desired::load::AbsentDecl;
    let keyed = Ids {
        hash_key: vec![7; 32],
        ..ids()
    };
    let mut secret = file("/etc/a", "password=CANARY\n", 0o600);
    secret.sensitive = true;
    let inv = applied(secret, &keyed);
    let mut d = desired(vec![]);
    d.absent = vec![AbsentDecl {
        path: tp("/etc/a"),
        role: "r".into(),
        origin: "roles/r/role.toml:1 absent[0]".into(),
    }];
    let obs = Observed::from([(tp("/etc/a"), on_disk("password=CANARY\n", 0o600))]);
    let p = plan(&d, None, &obs, &inv, &keyed).unwrap();
    assert_eq!(p.absent.len(), 1);
    let shown = &p.absent[0].file.as_ref().unwrap().sha256;
    assert!(shown.starts_with("hmac:"), "{shown}");
    assert_ne!(*shown, sha256_hex(b"password=CANARY\n"));
    // A host file driftless never managed keeps its plain digest.
    let p = plan(&d, None, &obs, &Inventory::default(), &keyed).unwrap();
    let shown = &p.absent[0].file.as_ref().unwrap().sha256;
    assert_eq!(*shown, sha256_hex(b"password=CANARY\n"));
}

/// The other direction: a file that becomes a secret shows no digest of
/// its new content unkeyed and no diff.
#[test]
fn a_file_that_becomes_sensitive_shows_neither_side() {
    let keyed = Ids {
        hash_key: vec![7; 32],
        ..ids()
    };
    let inv = applied(file("/etc/a", "x\n", 0o644), &keyed);
    let mut secret = file("/etc/a", "CANARY-new\n", 0o644);
    secret.sensitive = true;
    let obs = Observed::from([(tp("/etc/a"), on_disk("x\n", 0o644))]);
    let p = plan(&desired(vec![secret]), None, &obs, &inv, &keyed).unwrap();
    let c = &p.changes[0];
    assert!(c.sensitive);
    let json = serde_json::to_string(&p.changes).unwrap();
    assert!(!json.contains(&sha256_hex(b"CANARY-new\n")), "{json}");
    let text = diff::content_diff(c, diff::Style { color: false });
    assert!(!text.contains("CANARY"), "{text}");
}

fn hook(role: &str, run: HookRun) -> Hook {
    Hook {
        role: role.into(),
        when: crate::desired::spec::HookWhen::Post,
        argv: vec![format!("/bin/{role}")],
        user: None,
        timeout: std::time::Duration::from_secs(30),
        env: Default::default(),
        run,
        origin: format!("roles/{role}/role.toml:1 hooks[0]"),
    }
}

/// `on-change` follows its role's writes (an adoption writes nothing),
/// `always` any change; nothing runs without a change.
#[test]
fn hooks_ride_along_with_the_changes_of_their_role() {
    let hooks = vec![
        hook("r", HookRun::OnChange),
        hook("other", HookRun::OnChange),
        hook("other", HookRun::Always),
    ];
    let mut d = desired(vec![file("/etc/a", "new\n", 0o644)]);
    d.hooks = hooks.clone();
    let observed: Observed = [(tp("/etc/a"), on_disk("old\n", 0o644))].into();
    let p = plan(&d, None, &observed, &Inventory::default(), &ids()).unwrap();
    let roles: Vec<(&str, HookRun)> = p.hooks.iter().map(|h| (h.role.as_str(), h.run)).collect();
    assert_eq!(
        roles,
        vec![("r", HookRun::OnChange), ("other", HookRun::Always)]
    );

    // Already as desired and managed: no change, no hook.
    let applied = inventory_of(&p);
    let observed: Observed = [(tp("/etc/a"), on_disk("new\n", 0o644))].into();
    let p = plan(&d, None, &observed, &applied, &ids()).unwrap();
    assert!(p.is_empty() && p.hooks.is_empty(), "{:?}", p.hooks);

    // An adoption only: `always` rides along, `on-change` does not.
    let p = plan(&d, None, &observed, &Inventory::default(), &ids()).unwrap();
    assert_eq!(p.changes[0].kind, ChangeKind::Adopt);
    let roles: Vec<&str> = p.hooks.iter().map(|h| h.role.as_str()).collect();
    assert_eq!(roles, vec!["other"]);
}

/// Step 8: which changes of a `reboot = true` file ask for a reboot.
#[test]
fn reboot_is_asked_by_a_write_meta_change_or_prune_never_by_an_adoption() {
    let grub = || {
        let mut f = file("/etc/default/grub", "x\n", 0o644);
        f.reboot = true;
        f
    };
    // Create.
    let created = plan(
        &desired(vec![grub(), file("/etc/a", "a\n", 0o644)]),
        Some("c1"),
        &Observed::new(),
        &Inventory::default(),
        &ids(),
    )
    .unwrap();
    assert_eq!(created.reboot_required, vec![tp("/etc/default/grub")]);
    let inv = inventory_of(&created);
    assert!(inv.files[&tp("/etc/default/grub")].reboot);
    assert!(!inv.files[&tp("/etc/a")].reboot);
    assert!(inv.uses_reboot());
    // Mode only.
    let obs = Observed::from([
        (tp("/etc/default/grub"), on_disk("x\n", 0o600)),
        (tp("/etc/a"), on_disk("a\n", 0o644)),
    ]);
    let p = plan(
        &desired(vec![grub(), file("/etc/a", "a\n", 0o644)]),
        Some("c2"),
        &obs,
        &inv,
        &ids(),
    )
    .unwrap();
    assert_eq!(p.reboot_required, vec![tp("/etc/default/grub")]);
    // Another file changes: no reboot.
    let obs = Observed::from([
        (tp("/etc/default/grub"), on_disk("x\n", 0o644)),
        (tp("/etc/a"), on_disk("old\n", 0o644)),
    ]);
    let p = plan(
        &desired(vec![grub(), file("/etc/a", "a\n", 0o644)]),
        Some("c2"),
        &obs,
        &inv,
        &ids(),
    )
    .unwrap();
    assert_eq!(p.changes.len(), 1);
    assert!(p.reboot_required.is_empty());
    // Pruned.
    let p = plan(
        &desired(vec![file("/etc/a", "a\n", 0o644)]),
        Some("c3"),
        &obs,
        &inv,
        &ids(),
    )
    .unwrap();
    assert_eq!(p.reboot_required, vec![tp("/etc/default/grub")]);
    // Adopted as it is: nothing written, no reboot.
    let obs = Observed::from([(tp("/etc/default/grub"), on_disk("x\n", 0o644))]);
    let p = plan(
        &desired(vec![grub()]),
        Some("c1"),
        &obs,
        &Inventory::default(),
        &ids(),
    )
    .unwrap();
    assert_eq!(p.changes[0].kind, ChangeKind::Adopt);
    assert!(p.reboot_required.is_empty());
    // A files-only plan records nothing of it.
    let plain = plan(
        &desired(vec![file("/etc/a", "a\n", 0o644)]),
        Some("c1"),
        &Observed::new(),
        &Inventory::default(),
        &ids(),
    )
    .unwrap();
    assert!(!inventory_of(&plain).uses_reboot());
}

/// Step 3: a link or absent change is a change of its role: its
/// `on-change` hooks ride along, and the plan is not empty; the link is
/// recorded in the next inventory and a pruned file now declared absent
/// is removed once, by the absent entry (no restore of its original).
#[test]
fn links_and_absent_join_the_plan_and_its_hooks() {
    use crate::desired::load::{AbsentDecl, LinkDecl};
    let mut d = desired(vec![]);
    d.hooks = vec![hook("web", HookRun::OnChange), hook("r", HookRun::OnChange)];
    d.links = vec![LinkDecl {
        path: tp("/etc/l"),
        role: "web".into(),
        target: "t".into(),
        dir_mode: Mode::DEFAULT_DIR,
        origin: "roles/web/role.toml:1 links[0]".into(),
    }];
    let p = plan(&d, None, &Observed::new(), &Inventory::default(), &ids()).unwrap();
    assert!(!p.is_empty());
    assert_eq!(p.links.len(), 1);
    assert!(p.next_inventory.links[&tp("/etc/l")].created);
    let roles: Vec<&str> = p.hooks.iter().map(|h| h.role.as_str()).collect();
    assert_eq!(roles, vec!["web"]);

    // /etc/a was a managed file with a saved original; now it is absent.
    let f = file("/etc/a", "x\n", 0o644);
    let mut managed = applied(f, &ids());
    if let Some(e) = managed.files.get_mut(&tp("/etc/a")) {
        e.original = Some(Original {
            stored: "abc".into(),
            mode: 0o600,
            uid: 0,
            gid: 0,
        });
    }
    let mut d = desired(vec![]);
    d.absent = vec![AbsentDecl {
        path: tp("/etc/a"),
        role: "r".into(),
        origin: "roles/r/role.toml:1 absent[0]".into(),
    }];
    let observed: Observed = [(tp("/etc/a"), on_disk("x\n", 0o644))].into();
    let p = plan(&d, None, &observed, &managed, &ids()).unwrap();
    assert!(p.changes.is_empty(), "{:?}", p.changes);
    assert_eq!(p.absent.len(), 1);
    assert_eq!(p.absent_paths, vec![tp("/etc/a")]);
    assert!(p.next_inventory.files.is_empty());
}

/// The inventory's file map is read in one bulk build (`sorted_map`), not
/// one insert per key: it must read what serde's own map reader reads,
/// including keys out of order and a key given twice (the last wins).
#[test]
fn the_bulk_built_file_map_reads_what_serdes_map_reader_reads() {
    use crate::plan::inventory::{Inventory, ManagedEntry};
    use std::collections::BTreeMap;
    let entry = |size: u64| {
        serde_json::json!({"gid": 0, "mode": 420, "on_change": [], "original": null,
            "role": "r", "sensitive": false, "sha256": "00", "size": size, "uid": 0})
    };
    let text = format!(
        r#"{{"applied_at":1,"commit":null,"files":{{"/etc/b":{},"/etc/a":{},"/etc/b":{},"/etc/c":{}}},"txid":"","version":1}}"#,
        entry(1),
        entry(2),
        entry(3),
        entry(4)
    );
    let inv: Inventory = serde_json::from_str(&text).unwrap();
    #[derive(serde::Deserialize)]
    struct Reference {
        files: BTreeMap<TargetPath, ManagedEntry>,
    }
    let reference: Reference = serde_json::from_str(&text).unwrap();
    assert_eq!(inv.files, reference.files);
    let sizes: Vec<(&str, u64)> = inv
        .files
        .iter()
        .map(|(p, e)| (p.as_str(), e.size))
        .collect();
    assert_eq!(sizes, [("/etc/a", 2), ("/etc/b", 3), ("/etc/c", 4)]);
    // Not a map: an error, as before.
    assert!(serde_json::from_str::<Inventory>(r#"{"files":[],"version":1}"#).is_err());
}

/// A partial sync splits the inventory into the entries it plans again
/// (`restricted_to`) and those it carries over (`files_without`): every
/// entry lands in exactly one, a path asked for that the inventory lacks
/// in neither, and the inventory itself is left as it was.
#[test]
fn a_partial_sync_splits_the_inventory_into_planned_and_carried_entries() {
    use crate::plan::inventory::ManagedEntry;
    let entry = |role: &str| ManagedEntry {
        role: role.to_string(),
        ..ManagedEntry::example(1)
    };
    let mut inv = Inventory::default();
    for (p, role) in [("/etc/a", "r1"), ("/etc/b", "r2"), ("/etc/c", "r3")] {
        inv.files.insert(TargetPath::parse(p).unwrap(), entry(role));
    }
    inv.dirs.insert(TargetPath::parse("/etc").unwrap());
    let before = inv.clone();
    let only: std::collections::BTreeSet<TargetPath> = ["/etc/b", "/etc/x"]
        .iter()
        .map(|p| TargetPath::parse(p).unwrap())
        .collect();
    let planned = inv.restricted_to(&only);
    let carried = inv.files_without(&only);
    let names = |m: &std::collections::BTreeMap<TargetPath, ManagedEntry>| {
        m.keys().map(|p| p.as_str().to_string()).collect::<Vec<_>>()
    };
    assert_eq!(names(&planned.files), ["/etc/b"]);
    assert_eq!(planned.files.values().next().unwrap().role, "r2");
    assert_eq!(planned.dirs, before.dirs, "the header is kept");
    assert_eq!(names(&carried), ["/etc/a", "/etc/c"]);
    assert_eq!(
        carried
            .values()
            .map(|e| e.role.as_str())
            .collect::<Vec<_>>(),
        ["r1", "r3"]
    );
    assert_eq!(format!("{inv:?}"), format!("{before:?}"));
}

/// A created directory is unneeded when no managed file, link or
/// directory lies under it; a path that only shares its name as a prefix
/// (`/etc/cc/x` for `/etc/c`) does not count. Deepest first.
#[test]
fn unneeded_dirs_are_those_nothing_managed_lies_under() {
    use crate::plan::inventory::{DirectoryEntry, LinkEntry};
    let mut inv = Inventory::default();
    for d in [
        "/etc/a", "/etc/a/b", "/etc/c", "/etc/c/d", "/etc/d", "/etc/e", "/etc/f",
    ] {
        inv.dirs.insert(tp(d));
    }
    for f in ["/etc/a/b/f", "/etc/cc/x", "/etc/c/d2"] {
        inv.files.insert(tp(f), ManagedEntry::example(1));
    }
    inv.links.insert(
        tp("/etc/d/l"),
        LinkEntry {
            created: true,
            role: "r".into(),
            target: "x".into(),
        },
    );
    let entry = DirectoryEntry {
        created: true,
        gid: 0,
        mode: 0o755,
        role: "r".into(),
        uid: 0,
    };
    inv.directories.insert(tp("/etc/e/sub"), entry.clone());
    // A managed directory that is itself in `dirs` is never unneeded.
    inv.directories.insert(tp("/etc/f"), entry);
    assert_eq!(inv.unneeded_dirs(), vec![tp("/etc/c/d")]);
    inv.files.remove(&tp("/etc/c/d2"));
    assert_eq!(inv.unneeded_dirs(), vec![tp("/etc/c/d"), tp("/etc/c")]);
}
