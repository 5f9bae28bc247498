use std::os::unix::fs::{MetadataExt, PermissionsExt};

use super::*;
use crate::desired::render::{Desired, DesiredFile};
use crate::desired::spec::{Mode, Principal, TargetPath};
use crate::effects::observe::observe;
use crate::effects::state::write_json_atomic;
use crate::plan::{plan, Ids};

struct Env {
    root: tempfile::TempDir,
    state_dir: tempfile::TempDir,
    fs: RootFs,
    state: StateDir,
}

fn env() -> Env {
    let root = tempfile::tempdir().unwrap();
    let state_dir = tempfile::tempdir().unwrap();
    let fs = RootFs::open(root.path()).unwrap();
    let state = StateDir::open(state_dir.path()).unwrap();
    Env {
        root,
        state_dir,
        fs,
        state,
    }
}

fn ids() -> Ids {
    Ids {
        apply_ownership: false,
        own_uid: nix::unistd::geteuid().as_raw(),
        own_gid: nix::unistd::getegid().as_raw(),
        ..Default::default()
    }
}

fn desired(files: &[(&str, &str, u32)]) -> Desired {
    Desired {
        host: "h".into(),
        files: files
            .iter()
            .map(|(p, c, m)| DesiredFile {
                path: TargetPath::parse(p).unwrap(),
                role: "r".into(),
                content: c.as_bytes().to_vec(),
                mode: Mode(*m),
                dir_mode: Mode::DEFAULT_DIR,
                owner: Principal::root(),
                group: Principal::root(),
                on_change: vec![],
                sensitive: false,
                self_contained: true,
                reboot: false,
                origin: "test".into(),
            })
            .collect(),
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

impl Env {
    fn path(&self, p: &str) -> std::path::PathBuf {
        self.root.path().join(p.trim_start_matches('/'))
    }
    fn plan(&self, d: &Desired) -> Plan {
        let inv = self.state.inventory().unwrap();
        let obs = observe(&self.fs, d, &inv, u64::MAX).unwrap();
        plan(d, Some("c"), &obs, &inv, &ids()).unwrap()
    }
    /// Applies and commits (as after passing checks).
    fn apply(&self, d: &Desired) -> Applied {
        let mut p = self.plan(d);
        let a = self.switch_in(&p);
        commit(
            &self.fs,
            &self.state,
            &a.txid,
            &mut p.next_inventory,
            1,
            None,
            None,
        )
        .unwrap();
        a
    }
    /// Applies up to the switch-in: files live, not committed.
    fn switch_in(&self, p: &Plan) -> Applied {
        apply(&self.fs, &self.state, p, false, 1, &ApplyOptions::default()).unwrap()
    }
    fn txids(r: Vec<Recovered>) -> Vec<String> {
        r.into_iter().map(|r| r.txid).collect()
    }
    fn read(&self, p: &str) -> Option<String> {
        std::fs::read_to_string(self.path(p)).ok()
    }
    fn mode(&self, p: &str) -> u32 {
        std::fs::metadata(self.path(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }
    /// Files in the root other than the expected ones: staged leftovers.
    fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else if e.file_name().to_string_lossy().contains(".driftless-") {
                    out.push(e.path().display().to_string());
                }
            }
        }
        out
    }
}

#[test]
fn apply_creates_files_with_mode_and_parents_then_is_idempotent() {
    let e = env();
    let d = desired(&[("/etc/app/a.conf", "a\n", 0o640), ("/etc/b", "b\n", 0o600)]);
    let applied = e.apply(&d);
    assert_eq!(applied.created, 2);
    assert_eq!(e.read("/etc/app/a.conf").as_deref(), Some("a\n"));
    assert_eq!(e.mode("/etc/app/a.conf"), 0o640);
    assert_eq!(e.mode("/etc/b"), 0o600);
    assert!(e.leftovers().is_empty(), "{:?}", e.leftovers());
    let inode = std::fs::metadata(e.path("/etc/b")).unwrap().ino();
    let mtime = std::fs::metadata(e.path("/etc/b")).unwrap().mtime_nsec();
    assert!(e.plan(&d).is_empty());
    assert_eq!(std::fs::metadata(e.path("/etc/b")).unwrap().ino(), inode);
    assert_eq!(
        std::fs::metadata(e.path("/etc/b")).unwrap().mtime_nsec(),
        mtime
    );
}

#[test]
fn revert_restores_bytes_modes_pruned_and_removes_new_files() {
    let e = env();
    e.apply(&desired(&[
        ("/etc/keep", "v1\n", 0o644),
        ("/etc/gone", "old\n", 0o600),
    ]));
    let before = e.state.inventory().unwrap();
    // Second transaction: change content+mode, prune one, add one.
    let a = e.switch_in(&e.plan(&desired(&[
        ("/etc/keep", "v2\n", 0o600),
        ("/etc/new/file", "n\n", 0o644),
    ])));
    assert_eq!(e.read("/etc/gone"), None);
    assert_eq!(e.read("/etc/keep").as_deref(), Some("v2\n"));
    assert_eq!(
        e.state.inventory().unwrap(),
        before,
        "a switched-in transaction is not recorded before its checks pass"
    );

    revert(&e.fs, &e.state, &a.txid).unwrap();
    assert_eq!(e.read("/etc/keep").as_deref(), Some("v1\n"));
    assert_eq!(e.mode("/etc/keep"), 0o644);
    assert_eq!(e.read("/etc/gone").as_deref(), Some("old\n"));
    assert_eq!(e.mode("/etc/gone"), 0o600);
    assert!(!e.path("/etc/new/file").exists());
    assert!(
        !e.path("/etc/new").exists(),
        "created directory not removed"
    );
    assert_eq!(e.state.inventory().unwrap(), before);
    assert!(e.leftovers().is_empty(), "{:?}", e.leftovers());
}

/// A cold apply of 10,000 templates carried their 17 MB of rendered text
/// (secrets among it) through the switch, the checks and the commit
/// (issue #18). Once staged and backed up, the plan holds no contents,
/// and undoing works from the files on disk.
#[test]
fn contents_are_released_once_staged_and_a_revert_still_restores_the_old_bytes() {
    let e = env();
    e.apply(&desired(&[("/etc/keep", "v1\n", 0o644)]));
    std::fs::write(e.path("/etc/unwanted"), "secret\n").unwrap();
    let mut d = desired(&[("/etc/keep", "v2\n", 0o600), ("/etc/new", "n\n", 0o644)]);
    d.absent.push(crate::desired::load::AbsentDecl {
        path: TargetPath::parse("/etc/unwanted").unwrap(),
        role: "r".into(),
        origin: "test".into(),
    });
    let mut p = e.plan(&d);
    let held = |p: &Plan| -> usize {
        let changes = p.changes.iter().flat_map(|c| {
            let before = c.before.as_ref().map(|b| b.content.len());
            let after = c.after.as_ref().map(|a| a.content.len());
            before.into_iter().chain(after)
        });
        let removed = p
            .absent
            .iter()
            .filter_map(|a| a.file.as_ref().map(|f| f.content.len()));
        changes.chain(removed).sum()
    };
    assert_eq!(
        held(&p),
        3 + 3 + 2 + 7,
        "old and new contents before applying"
    );
    let a = apply_with(
        &e.fs,
        &e.state,
        &mut p,
        false,
        2,
        &ApplyOptions::default(),
        None,
    )
    .unwrap();
    assert_eq!(held(&p), 0, "contents still held after staging");
    assert_eq!(e.read("/etc/keep").as_deref(), Some("v2\n"));
    assert_eq!(e.read("/etc/new").as_deref(), Some("n\n"));
    assert_eq!(e.read("/etc/unwanted"), None);
    revert(&e.fs, &e.state, &a.txid).unwrap();
    assert_eq!(e.read("/etc/keep").as_deref(), Some("v1\n"));
    assert_eq!(e.mode("/etc/keep"), 0o644);
    assert_eq!(e.read("/etc/new"), None);
    assert_eq!(e.read("/etc/unwanted").as_deref(), Some("secret\n"));
}

#[test]
fn metadata_only_change_is_applied_in_place_and_reverted() {
    let e = env();
    e.apply(&desired(&[("/etc/x", "same\n", 0o644)]));
    let inode = std::fs::metadata(e.path("/etc/x")).unwrap().ino();
    let p = e.plan(&desired(&[("/etc/x", "same\n", 0o600)]));
    assert!(p.changes[0].mode_changed && !p.changes[0].content_changed);
    let a = apply(&e.fs, &e.state, &p, false, 2, &ApplyOptions::default()).unwrap();
    assert_eq!(e.mode("/etc/x"), 0o600);
    assert_eq!(std::fs::metadata(e.path("/etc/x")).unwrap().ino(), inode);
    revert(&e.fs, &e.state, &a.txid).unwrap();
    assert_eq!(e.mode("/etc/x"), 0o644);
}

#[test]
fn preexisting_file_is_saved_once_and_restored_on_prune() {
    let e = env();
    std::fs::create_dir_all(e.path("/etc")).unwrap();
    std::fs::write(e.path("/etc/distro.conf"), "distro\n").unwrap();
    std::fs::set_permissions(
        e.path("/etc/distro.conf"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    e.apply(&desired(&[("/etc/distro.conf", "ours v1\n", 0o644)]));
    e.apply(&desired(&[("/etc/distro.conf", "ours v2\n", 0o644)]));
    assert_eq!(e.read("/etc/distro.conf").as_deref(), Some("ours v2\n"));
    let applied = e.apply(&desired(&[]));
    assert_eq!(applied.removed, 1);
    assert_eq!(e.read("/etc/distro.conf").as_deref(), Some("distro\n"));
    assert_eq!(e.mode("/etc/distro.conf"), 0o640);
}

#[test]
fn recovery_rolls_back_a_transaction_that_never_committed() {
    let e = env();
    e.apply(&desired(&[
        ("/etc/a", "old a\n", 0o644),
        ("/etc/b", "old b\n", 0o644),
    ]));
    let committed = e.state.inventory().unwrap();
    // Apply a second transaction fully, then put the old inventory back and
    // mark the journal Prepared: exactly the state after a crash between
    // the last rename and the commit point.
    let applied = e.apply(&desired(&[
        ("/etc/a", "new a\n", 0o600),
        ("/etc/c", "c\n", 0o644),
    ]));
    let tx = e.state.tx_dir().join(&applied.txid);
    let mut j: Journal = read_json_large(&tx.join(JOURNAL)).unwrap().unwrap();
    j.state = TxState::Prepared;
    write_json_atomic(&tx.join(JOURNAL), &j).unwrap();
    unmark(&tx);
    write_json_atomic(&e.state.inventory_path(), committed.as_ref()).unwrap();

    let recovered = Env::txids(recover(&e.fs, &e.state).unwrap());
    assert_eq!(recovered, vec![applied.txid.clone()]);
    assert_eq!(e.read("/etc/a").as_deref(), Some("old a\n"));
    assert_eq!(e.mode("/etc/a"), 0o644);
    assert_eq!(e.read("/etc/b").as_deref(), Some("old b\n"));
    assert_eq!(e.read("/etc/c"), None);
    assert!(!tx.exists());
    // Running recovery again changes nothing.
    assert!(recover(&e.fs, &e.state).unwrap().is_empty());
    assert_eq!(e.read("/etc/a").as_deref(), Some("old a\n"));
}

#[test]
fn recovery_keeps_a_transaction_whose_inventory_was_written() {
    let e = env();
    let applied = e.apply(&desired(&[("/etc/a", "a\n", 0o644)]));
    let tx = e.state.tx_dir().join(&applied.txid);
    let mut j: Journal = read_json_large(&tx.join(JOURNAL)).unwrap().unwrap();
    j.state = TxState::Prepared;
    write_json_atomic(&tx.join(JOURNAL), &j).unwrap();
    unmark(&tx);
    assert!(recover(&e.fs, &e.state).unwrap().is_empty());
    assert_eq!(e.read("/etc/a").as_deref(), Some("a\n"));
}

#[test]
fn failure_while_staging_leaves_the_host_unchanged() {
    let e = env();
    e.apply(&desired(&[("/etc/a", "old\n", 0o644)]));
    // A regular file where a directory must go: staging the second file fails.
    std::fs::write(e.path("/etc/blocker"), "x").unwrap();
    let d = desired(&[
        ("/etc/a", "new\n", 0o644),
        ("/etc/blocker/inner", "y", 0o644),
    ]);
    let inv = e.state.inventory().unwrap();
    let obs = observe(
        &e.fs,
        &desired(&[("/etc/a", "new\n", 0o644)]),
        &inv,
        u64::MAX,
    )
    .unwrap();
    let p = plan(&d, Some("c"), &obs, &inv, &ids()).unwrap();
    let err = apply(&e.fs, &e.state, &p, false, 3, &ApplyOptions::default()).unwrap_err();
    assert!(format!("{err:#}").contains("/etc/blocker"), "{err:#}");
    assert_eq!(e.read("/etc/a").as_deref(), Some("old\n"));
    assert!(e.leftovers().is_empty(), "{:?}", e.leftovers());
    assert_eq!(e.state.inventory().unwrap(), inv);
    let _ = e.state_dir.path();
}

#[test]
fn crash_during_a_revert_is_finished_by_recovery() {
    let e = env();
    e.apply(&desired(&[
        ("/etc/a", "v1\n", 0o644),
        ("/etc/b", "b1\n", 0o644),
    ]));
    let before = e.state.inventory().unwrap();
    let applied = e.apply(&desired(&[
        ("/etc/a", "v2\n", 0o600),
        ("/etc/c", "c\n", 0o644),
    ]));
    // Simulate a crash right after the revert started: journal says
    // Reverting, one file already restored, the rest not.
    let tx = e.state.tx_dir().join(&applied.txid);
    let mut j: Journal = read_json_large(&tx.join(JOURNAL)).unwrap().unwrap();
    j.state = TxState::Reverting;
    write_json_atomic(&tx.join(JOURNAL), &j).unwrap();
    std::fs::remove_file(e.path("/etc/c")).unwrap();

    let recovered = Env::txids(recover(&e.fs, &e.state).unwrap());
    assert_eq!(recovered, vec![applied.txid]);
    assert_eq!(e.read("/etc/a").as_deref(), Some("v1\n"));
    assert_eq!(e.mode("/etc/a"), 0o644);
    assert_eq!(e.read("/etc/b").as_deref(), Some("b1\n"));
    assert_eq!(e.read("/etc/c"), None);
    assert_eq!(e.state.inventory().unwrap(), before);
    assert!(!tx.exists());
}

/// Issue 12 §2: a `kill -9` while the health checks ran left the failing
/// commit live and recorded, and the next sync said "already applied".
#[test]
fn a_transaction_interrupted_during_its_checks_is_rolled_back_with_its_unit_actions() {
    let e = env();
    e.apply(&desired(&[("/etc/a", "v1\n", 0o644)]));
    let before = e.state.inventory().unwrap();
    let mut p = e.plan(&desired(&[
        ("/etc/a", "v2\n", 0o644),
        ("/etc/systemd/system/x.service", "[Service]\n", 0o644),
    ]));
    p.unit_actions = vec![crate::desired::spec::UnitAction {
        unit: "x.service".into(),
        action: crate::desired::spec::UnitActionKind::Restart,
    }];
    let a = e.switch_in(&p);
    assert_eq!(e.read("/etc/a").as_deref(), Some("v2\n"));
    // The process dies here (checks running): no commit, no revert.
    let recovered = recover(&e.fs, &e.state).unwrap();
    assert_eq!(recovered.len(), 1);
    let r = &recovered[0];
    assert_eq!(r.txid, a.txid);
    assert_eq!(r.phase, TxState::Switched);
    assert!(r.was_live());
    let post = r.post.clone().expect("the unit actions to tell again");
    assert!(post.daemon_reload);
    assert_eq!(post.unit_actions, p.unit_actions);
    assert_eq!(e.read("/etc/a").as_deref(), Some("v1\n"));
    assert_eq!(e.read("/etc/systemd/system/x.service"), None);
    assert_eq!(e.state.inventory().unwrap(), before);
    assert!(recover(&e.fs, &e.state).unwrap().is_empty());
}

#[test]
fn a_switched_transaction_whose_inventory_was_written_counts_as_committed() {
    let e = env();
    let p = e.plan(&desired(&[("/etc/a", "a\n", 0o644)]));
    let a = e.switch_in(&p);
    let mut inv = p.next_inventory.clone();
    inv.txid = a.txid.clone();
    // Crash after the inventory, before the journal said Committed.
    write_json_atomic(&e.state.inventory_path(), &inv).unwrap();
    assert!(recover(&e.fs, &e.state).unwrap().is_empty());
    assert_eq!(e.read("/etc/a").as_deref(), Some("a\n"));
    let j: Journal = load_journal(&e.state.tx_dir().join(&a.txid))
        .unwrap()
        .unwrap();
    assert_eq!(j.state, TxState::Committed);
}

/// A revert after the inventory was already replaced (the journal write
/// after it failed) must put the previous inventory back too.
#[test]
fn reverting_after_the_inventory_was_written_restores_the_previous_inventory() {
    let e = env();
    e.apply(&desired(&[("/etc/a", "v1\n", 0o644)]));
    let before = e.state.inventory().unwrap();
    let p = e.plan(&desired(&[("/etc/a", "v2\n", 0o644)]));
    let a = e.switch_in(&p);
    let mut inv = p.next_inventory.clone();
    inv.txid = a.txid.clone();
    write_json_atomic(&e.state.inventory_path(), &inv).unwrap();
    revert(&e.fs, &e.state, &a.txid).unwrap();
    assert_eq!(e.read("/etc/a").as_deref(), Some("v1\n"));
    assert_eq!(e.state.inventory().unwrap(), before);
}

#[test]
fn only_a_switched_transaction_can_be_committed() {
    let e = env();
    let mut p = e.plan(&desired(&[("/etc/a", "a\n", 0o644)]));
    let a = e.switch_in(&p);
    let mut commit_it = || {
        commit(
            &e.fs,
            &e.state,
            &a.txid,
            &mut p.next_inventory,
            1,
            None,
            None,
        )
    };
    commit_it().unwrap();
    let err = commit_it().unwrap_err();
    assert!(format!("{err:#}").contains("not switched in"), "{err:#}");
}

/// Issue 12 §6: a corrupt journal of the committed transaction stopped
/// every later run.
#[test]
fn a_corrupt_journal_of_the_committed_transaction_is_set_aside() {
    let e = env();
    let a = e.apply(&desired(&[("/etc/a", "a\n", 0o644)]));
    let tx = e.state.tx_dir().join(&a.txid);
    std::fs::write(tx.join(JOURNAL), "{truncated").unwrap();
    assert!(recover(&e.fs, &e.state).unwrap().is_empty());
    assert!(!tx.exists());
    assert!(e
        .state
        .path()
        .join(format!("tx-corrupt-{}", a.txid))
        .exists());
    assert_eq!(e.read("/etc/a").as_deref(), Some("a\n"));
}

/// The state directory is untrusted: a journal planted for an interrupted
/// transaction whose backup was `../../../../<file>` had that file
/// hard-linked over a target by the rollback (its mode set to the
/// target's), and one whose staged name held `../` had any file
/// unlinked. Refused as corrupt now; the victim and the target untouched.
#[test]
fn a_planted_journal_naming_files_outside_its_transaction_is_refused() {
    for (field, txid_too) in [("backup", false), ("staged", false), ("backup", true)] {
        let e = env();
        e.apply(&desired(&[("/etc/a", "a\n", 0o644)]));
        let p = e.plan(&desired(&[("/etc/a", "b\n", 0o644)]));
        let a = e.switch_in(&p);
        let tx = e.state.tx_dir().join(&a.txid);
        let victim = e.state_dir.path().join("victim");
        std::fs::write(&victim, "secret").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut j = load_journal(&tx).unwrap().unwrap();
        let escape = format!("../../../{}/victim", e.state_dir.path().display());
        let entry = &mut j.entries[0];
        if field == "backup" {
            entry.backup = Some(escape);
        } else {
            entry.staged = Some(escape);
        }
        if txid_too {
            j.txid = "../elsewhere".into();
        }
        let bytes = crate::effects::state::encode_state(&j, journal_format(&j)).unwrap();
        std::fs::write(tx.join(JOURNAL), bytes).unwrap();
        let err = format!("{:#}", recover(&e.fs, &e.state).unwrap_err());
        assert!(
            err.contains("corrupt") || err.contains("unreadable"),
            "{field}: {err}"
        );
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "secret");
        assert_eq!(std::fs::metadata(&victim).unwrap().mode() & 0o777, 0o600);
        assert_eq!(e.read("/etc/a").as_deref(), Some("b\n"), "{field}");
    }
}

/// An interrupted transaction whose journal is unreadable cannot be
/// rolled back blind: the error says where its files are and what to do.
#[test]
fn a_corrupt_journal_of_an_interrupted_transaction_names_the_remedy() {
    let e = env();
    e.apply(&desired(&[("/etc/a", "a\n", 0o644)]));
    let p = e.plan(&desired(&[("/etc/a", "b\n", 0o644)]));
    let a = e.switch_in(&p);
    let tx = e.state.tx_dir().join(&a.txid);
    std::fs::write(tx.join(JOURNAL), "{truncated").unwrap();
    let err = format!("{:#}", recover(&e.fs, &e.state).unwrap_err());
    assert!(
        err.contains("driftless plan") && err.contains(&a.txid),
        "{err}"
    );
}

/// Issue 12 §4: a 240-character file name failed, because the staged
/// name (`.<name>.driftless-<txid>`) exceeded NAME_MAX.
#[test]
fn a_file_name_of_240_characters_is_applied_and_reverted() {
    let e = env();
    let long = format!("/etc/{}", "n".repeat(240));
    e.apply(&desired(&[(long.as_str(), "v1\n", 0o644)]));
    assert_eq!(e.read(&long).as_deref(), Some("v1\n"));
    let p = e.plan(&desired(&[(long.as_str(), "v2\n", 0o644)]));
    let a = e.switch_in(&p);
    assert_eq!(e.read(&long).as_deref(), Some("v2\n"));
    revert(&e.fs, &e.state, &a.txid).unwrap();
    assert_eq!(e.read(&long).as_deref(), Some("v1\n"));
    assert!(e.leftovers().is_empty(), "{:?}", e.leftovers());
}

/// Pruning a file left the directories driftless had created for it
/// behind, empty. Only the directories it created go, and only when empty.
#[test]
fn directories_created_for_pruned_files_are_removed_when_empty_and_only_those() {
    let e = env();
    std::fs::create_dir(e.path("/etc")).unwrap();
    e.apply(&desired(&[
        ("/etc/app/conf.d/a.conf", "a\n", 0o644),
        ("/etc/app/conf.d/b.conf", "b\n", 0o644),
        ("/etc/other/x", "x\n", 0o644),
    ]));
    let dirs = |e: &Env| -> Vec<String> {
        e.state
            .inventory()
            .unwrap()
            .dirs
            .iter()
            .map(|d| d.to_string())
            .collect()
    };
    assert_eq!(dirs(&e), ["/etc/app", "/etc/app/conf.d", "/etc/other"]);

    // One of two files goes: its directory is still needed.
    e.apply(&desired(&[
        ("/etc/app/conf.d/a.conf", "a\n", 0o644),
        ("/etc/other/x", "x\n", 0o644),
    ]));
    assert!(e.path("/etc/app/conf.d").is_dir());

    // An admin's file keeps /etc/other; /etc/app goes entirely; /etc,
    // which existed before, stays.
    std::fs::write(e.path("/etc/other/admin.conf"), "mine").unwrap();
    e.apply(&desired(&[("/etc/new", "n\n", 0o644)]));
    assert!(!e.path("/etc/app").exists());
    assert_eq!(e.read("/etc/other/admin.conf").as_deref(), Some("mine"));
    assert!(e.path("/etc").is_dir());
    assert_eq!(dirs(&e), ["/etc/other"]);

    // Once the admin's file is gone, the next commit removes /etc/other.
    std::fs::remove_file(e.path("/etc/other/admin.conf")).unwrap();
    e.apply(&desired(&[("/etc/new", "n2\n", 0o644)]));
    assert!(!e.path("/etc/other").exists());
    assert!(dirs(&e).is_empty());
    assert!(e.path("/etc").is_dir());
}

/// Takes a transaction back to the state its `journal.json` says, as if
/// the crash came before its `switched` and `committed` marks.
fn unmark(tx: &std::path::Path) {
    for m in [SWITCHED, COMMITTED] {
        let _ = std::fs::remove_file(tx.join(m));
    }
}

/// Review of the packages stage: a torn intent was taken for "crashed
/// before anything was staged" and the transaction directory deleted,
/// even when the mark said apt had already run, losing what its undo
/// needs.
#[test]
fn an_unreadable_intent_after_a_stage_mark_is_refused_not_thrown_away() {
    let e = env();
    for started in [ACCOUNTS_STARTED, crate::effects::packages::STARTED] {
        let tx = e.state.tx_dir().join("20261204T000000Z-torn");
        fs::create_dir_all(&tx).unwrap();
        fs::write(tx.join(INTENT), b"{\"txid\": \"20261204T0").unwrap();
        fs::write(tx.join(started), b"").unwrap();
        let err = format!("{:#}", recover(&e.fs, &e.state).unwrap_err());
        assert!(
            err.contains("users, groups or packages were already changed by it"),
            "{err}"
        );
        assert!(tx.join(INTENT).exists(), "the evidence was deleted");
        fs::remove_dir_all(&tx).unwrap();
    }
    // Without a mark it is what it always was: nothing was touched.
    let tx = e.state.tx_dir().join("20261204T000000Z-torn");
    fs::create_dir_all(&tx).unwrap();
    fs::write(tx.join(INTENT), b"{\"txid\": \"20261204T0").unwrap();
    assert!(recover(&e.fs, &e.state).unwrap().is_empty());
    assert!(!tx.exists());
}

/// A backup was read whole into memory to copy it back across
/// filesystems (a rollback of a target larger than memory could not
/// finish), and a FIFO planted among the backups blocked the rollback.
#[test]
fn a_backup_is_copied_back_streamed_and_only_if_it_is_a_regular_file() {
    let backups = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..(3 << 20) + 5).map(|i: usize| (i % 253) as u8).collect();
    std::fs::write(backups.path().join("b0"), &big).unwrap();
    let bfd = open_dir_path(backups.path()).unwrap();
    let dfd = open_dir_path(dir.path()).unwrap();
    copy_backup(&bfd, "b0", &dfd, "t0").unwrap();
    assert!(std::fs::read(dir.path().join("t0")).unwrap() == big);
    assert_eq!(
        std::fs::metadata(dir.path().join("t0")).unwrap().mode() & 0o777,
        0o600
    );
    nix::unistd::mkfifo(&backups.path().join("b1"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let err = format!("{:#}", copy_backup(&bfd, "b1", &dfd, "t1").unwrap_err());
    assert!(err.contains("not a regular file"), "{err}");
    std::os::unix::fs::symlink(backups.path().join("b0"), backups.path().join("b2")).unwrap();
    assert!(copy_backup(&bfd, "b2", &dfd, "t2").is_err());
    assert!(!dir.path().join("t1").exists() && !dir.path().join("t2").exists());
}

/// The same-filesystem path of a restore links the backup back: linkat(2)
/// links a symlink or a FIFO planted among the backups as readily as a
/// file, and the rename then put a link (pointing anywhere) where the
/// target was. Now what was linked is checked and refused.
#[test]
fn a_planted_link_or_fifo_among_the_backups_is_not_linked_back_over_a_target() {
    let backups = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("target"), "current").unwrap();
    std::fs::write(backups.path().join("good"), "previous").unwrap();
    std::os::unix::fs::symlink("/etc/shadow", backups.path().join("link")).unwrap();
    nix::unistd::mkfifo(&backups.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let bfd = open_dir_path(backups.path()).unwrap();
    let dfd = open_dir_path(dir.path()).unwrap();
    let meta = Meta {
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        mode: 0o640,
    };
    for bad in ["link", "fifo"] {
        let err = format!(
            "{:#}",
            restore_backup(&dfd, &bfd, bad, "target", "tx1", meta, false).unwrap_err()
        );
        assert!(err.contains("not a regular file"), "{bad}: {err}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("target")).unwrap(),
            "current"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["target"], "{bad}: a temp name was left behind");
    }
    restore_backup(&dfd, &bfd, "good", "target", "tx1", meta, false).unwrap();
    let path = dir.path().join("target");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "previous");
    assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o640);
}

/// Each file at a managed path is capped on its own, but they were read
/// whole and all held at once: many large files (at managed paths, or
/// dropped in a purged directory) added up to more memory than the host
/// had. Their total is bounded now, the error naming where it was met.
#[test]
fn the_files_observed_are_bounded_in_total_not_only_each() {
    let e = env();
    std::fs::create_dir_all(e.root.path().join("etc")).unwrap();
    for name in ["a", "b", "c"] {
        std::fs::write(e.root.path().join("etc").join(name), "1234").unwrap();
    }
    let d = desired(&[
        ("/etc/a", "x\n", 0o644),
        ("/etc/b", "x\n", 0o644),
        ("/etc/c", "x\n", 0o644),
    ]);
    let inv = Inventory::default();
    assert!(observe(&e.fs, &d, &inv, 12).is_ok());
    let err = format!("{:#}", observe(&e.fs, &d, &inv, 11).unwrap_err());
    assert!(
        err.contains("more than 11 bytes together")
            && err.contains("/etc/c")
            && err.contains("nothing was changed"),
        "{err}"
    );
}
