//! `[[users]]` and `[[groups]]` (issue #16): created by the real
//! `systemd-sysusers` under a `--root` prefix before the files they own,
//! undone by the real `userdel`/`groupdel`/`usermod` when the transaction
//! fails, kept when they own something. The nspawn e2e suite covers the
//! live system (NSS, a real service running as the user).
//!
//! Creating accounts needs root (ownership is not applied otherwise), as
//! do these tests.

use std::os::unix::fs::MetadataExt;

use crate::support::*;

const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
const GROUP: &str = "root:x:0:\ndaemon:x:1:\nadm:x:4:syslog\nnogroup:x:65534:\n";
const SHADOW: &str =
    "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n";
const GSHADOW: &str = "root:*::\ndaemon:*::\nadm:*::syslog\nnogroup:*::\n";
const DBS: [&str; 4] = ["/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow"];

/// A host whose prefix has account databases, or `None` (after failing
/// with what is missing) when the test cannot run.
fn host() -> Option<Host> {
    if !nix::unistd::geteuid().is_root() {
        skip::missing("root (creating accounts needs it)");
        return None;
    }
    if which("systemd-sysusers").is_none() || which("userdel").is_none() {
        skip::missing("systemd-sysusers and userdel (packages systemd and passwd)");
        return None;
    }
    let host = Host::new("h");
    std::fs::create_dir_all(host.path("/etc")).unwrap();
    // Debian's: userdel removes the group named like the user with it
    // (USERGROUPS_ENAB yes), which the undo must account for.
    std::fs::write(
        host.path("/etc/login.defs"),
        "USERGROUPS_ENAB yes\nSYS_UID_MIN 100\nSYS_UID_MAX 999\nSYS_GID_MIN 100\nSYS_GID_MAX 999\n",
    )
    .unwrap();
    for (p, text, mode) in [
        ("/etc/passwd", PASSWD, 0o644),
        ("/etc/group", GROUP, 0o644),
        ("/etc/shadow", SHADOW, 0o640),
        ("/etc/gshadow", GSHADOW, 0o640),
    ] {
        std::fs::write(host.path(p), text).unwrap();
        std::fs::set_permissions(
            host.path(p),
            std::os::unix::fs::PermissionsExt::from_mode(mode),
        )
        .unwrap();
    }
    Some(host)
}

fn which(prog: &str) -> Option<std::path::PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| std::path::Path::new(d).join(prog))
        .find(|p| p.exists())
}

const ACCOUNTS: &str = "[[groups]]\nname = \"webadm\"\n\n\
[[users]]\nname = \"app\"\ngroup = \"webadm\"\nmembers_of = [\"adm\"]\n\
home = \"/var/lib/app\"\ndescription = \"App service\"\n\n\
[[users]]\nname = \"worker\"\nuid = 850\n";

/// Role `app`: the accounts above, a config file owned by `app`, a
/// directory owned by `worker`, and a check running `check`.
fn role(r: &Repo, accounts: &str, check: &str) {
    r.write("roles/app/files/conf", "port = 8080\n");
    r.write(
        "roles/app/role.toml",
        &format!(
            "{accounts}\n\
             [[files]]\npath = \"/srv/app/app.conf\"\nsource = \"conf\"\nowner = \"app\"\ngroup = \"webadm\"\nmode = \"0640\"\n\n\
             [[dirs]]\npath = \"/srv/work\"\nowner = \"worker\"\ngroup = \"worker\"\nmode = \"0750\"\n\n\
             [[checks]]\nname = \"app\"\nretries = 1\ninterval = \"10ms\"\ncommand = {{ argv = {check} }}\n"
        ),
    );
}

const PASS: &str = "[\"/bin/true\"]";

/// A check that fails while the commit's config file is there (so it
/// passes again once the revert removed it).
fn fail(host: &Host) -> String {
    format!(
        "[\"/bin/sh\", \"-c\", \"! test -e {}\"]",
        host.path("/srv/app/app.conf").display()
    )
}

fn repo(check: &str) -> Repo {
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"app\"]\n");
    r.write("hosts/default.toml", "");
    role(&r, ACCOUNTS, check);
    r.commit("v1");
    r
}

fn sync(host: &Host, r: &Repo) -> Run {
    host.run(r.path(), &["sync", "--once", "--run-checks"])
}

/// `name`'s (uid, gid) in the prefix's passwd.
fn user(host: &Host, name: &str) -> Option<(u32, u32)> {
    host.read("/etc/passwd")?.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f[0] == name).then(|| (f[2].parse().unwrap(), f[3].parse().unwrap()))
    })
}

fn group(host: &Host, name: &str) -> Option<(u32, String)> {
    host.read("/etc/group")?.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f[0] == name).then(|| (f[2].parse().unwrap(), f[3].to_string()))
    })
}

fn dbs(host: &Host) -> Vec<Option<String>> {
    DBS.iter().map(|p| host.read(p)).collect()
}

#[test]
fn accounts_are_created_before_the_files_they_own_and_then_stay_quick() {
    let Some(host) = host() else { return };
    let r = repo(PASS);
    let before = dbs(&host);
    let plan = host.run(r.path(), &["plan"]).ok().stdout;
    // The ids are sysusers' own predictions (its dry run), shown as such.
    for want in [
        "+ group webadm (gid 999, allocated by systemd-sysusers; role app)\n",
        "+ group worker (gid 850; role app)\n",
        "+ user app (uid 998, gid 999, allocated by systemd-sysusers, home /var/lib/app (not created); role app)\n",
        "+ user worker (uid 850, gid 850; role app)\n",
        "+ member app of group adm (role app)\n",
        "+ create /etc/sysusers.d/driftless-app.conf",
        "; 5 account change(s); 1 directory\n",
    ] {
        assert!(plan.contains(want), "{want:?} not in\n{plan}");
    }
    // Accounts first, then directories and files.
    assert!(plan.find("+ user app").unwrap() < plan.find("+ create directory /srv/work").unwrap());
    // JSON: `status.resources`, in the order they are made.
    let json: serde_json::Value = serde_json::from_str(
        &host
            .run(r.path(), &["plan", "--format", "json"])
            .ok()
            .stdout,
    )
    .unwrap();
    let resources = &json["status"]["resources"];
    assert_eq!(
        resources[0],
        serde_json::json!({"kind": "group", "action": "create", "name": "webadm", "gid": 999, "allocated": true, "role": "app"})
    );
    assert_eq!(
        resources[2],
        serde_json::json!({"kind": "user", "action": "create", "name": "app", "uid": 998, "gid": 999,
            "allocated": true, "home": "/var/lib/app", "role": "app"})
    );
    assert_eq!(
        resources[4],
        serde_json::json!({"kind": "member", "action": "add", "user": "app", "group": "adm", "role": "app"})
    );
    assert_eq!(resources[5]["kind"], "dir");
    // `plan` changes nothing.
    assert_eq!(dbs(&host), before);

    let run = sync(&host, &r).ok();
    assert!(run.stderr.contains("switched in"), "{}", run.stderr);
    assert_eq!(user(&host, "app"), Some((998, 999)));
    assert_eq!(user(&host, "worker"), Some((850, 850)));
    assert_eq!(group(&host, "webadm"), Some((999, String::new())));
    assert_eq!(group(&host, "adm"), Some((4, "app,syslog".into())));
    let passwd = host.read("/etc/passwd").unwrap();
    assert!(
        passwd.contains("app:x:998:999:App service:/var/lib/app:/usr/sbin/nologin\n"),
        "{passwd}"
    );
    // The files carry the new ids, as the plan said.
    let conf = std::fs::metadata(host.path("/srv/app/app.conf")).unwrap();
    assert_eq!(
        (conf.uid(), conf.gid(), conf.mode() & 0o7777),
        (998, 999, 0o640)
    );
    let work = std::fs::metadata(host.path("/srv/work")).unwrap();
    assert_eq!((work.uid(), work.gid()), (850, 850));
    // The sysusers.d fragment: systemd-sysusers.service makes the same
    // accounts at boot.
    assert_eq!(
        host.read("/etc/sysusers.d/driftless-app.conf").unwrap(),
        "# Managed by driftless (roles/app/role.toml: [[users]], [[groups]]).\n\
         # Applied by driftless before the files of each commit, and by\n\
         # systemd-sysusers.service at boot. Edits here are overwritten.\n\
         g webadm -\n\
         u app -:webadm \"App service\" /var/lib/app -\n\
         u worker 850 - - -\n\
         m app adm\n"
    );
    // Nothing left to do: the next syncs plan no account change and the
    // quick check holds.
    let plan = host.run(r.path(), &["plan"]).ok().stdout;
    assert!(plan.contains("no changes"), "{plan}");
    let mut quick = false;
    for _ in 0..3 {
        if sync(&host, &r).stdout.contains("(quick check)") {
            quick = true;
            break;
        }
    }
    assert!(quick, "the quick check never held");
}

#[test]
fn a_deleted_user_is_created_again_with_the_same_files() {
    let Some(host) = host() else { return };
    let r = repo(PASS);
    sync(&host, &r).ok();
    let del = std::process::Command::new("userdel")
        .args(["--prefix"])
        .arg(host.root.path())
        .arg("worker")
        .status()
        .unwrap();
    assert!(del.success());
    assert_eq!(user(&host, "worker"), None);
    let plan = host.run(r.path(), &["plan"]).ok().stdout;
    assert!(
        plan.contains("+ user worker (uid 850, gid 850; role app)\n"),
        "{plan}"
    );
    sync(&host, &r).ok();
    assert_eq!(user(&host, "worker"), Some((850, 850)));
}

/// The failing transaction's accounts are removed with its files: the
/// account databases come back byte for byte.
#[test]
fn a_failing_check_removes_the_accounts_its_transaction_created() {
    let Some(host) = host() else { return };
    let r = repo(&fail(&host));
    let before = dbs(&host);
    let run = sync(&host, &r).code(1);
    assert!(
        run.stderr.contains("reverted: user removed"),
        "{}",
        run.stderr
    );
    assert_eq!(
        dbs(&host),
        before,
        "the account databases differ after the revert"
    );
    assert!(!host.path("/srv/app/app.conf").exists());
    assert!(!host.path("/etc/sysusers.d/driftless-app.conf").exists());
    // A good commit afterwards creates them again, with the same ids.
    role(&r, ACCOUNTS, PASS);
    r.commit("v2");
    sync(&host, &r).ok();
    assert_eq!(user(&host, "app"), Some((998, 999)));
}

/// A user created by a failing transaction that came to own a file (here
/// its home, written during the check) is not removed: its uid would
/// otherwise be handed to the next account with the file still on disk.
#[test]
fn a_created_user_that_owns_its_home_is_kept_on_revert() {
    let Some(host) = host() else { return };
    let home = host.path("/var/lib/app");
    let check = format!(
        "[\"/bin/sh\", \"-c\", \"mkdir -p {0} && touch {0}/data && chown 850 {0}/data && ! test -e {1}\"]",
        home.display(),
        host.path("/srv/app/app.conf").display()
    );
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"app\"]\n");
    r.write("hosts/default.toml", "");
    role(
        &r,
        "[[users]]\nname = \"app\"\nuid = 850\nhome = \"/var/lib/app\"\n\n[[groups]]\nname = \"spare\"\n",
        &check,
    );
    // The directory entry of `role` names `worker`: declare it too.
    r.write(
        "roles/app/role.toml",
        &std::fs::read_to_string(r.path().join("roles/app/role.toml"))
            .unwrap()
            .replace(
                "owner = \"worker\"\ngroup = \"worker\"",
                "owner = \"app\"\ngroup = \"app\"",
            )
            .replace("group = \"webadm\"", "group = \"app\""),
    );
    r.commit("v1");
    let run = sync(&host, &r).code(1);
    assert!(
        run.stderr.contains(&format!(
            "kept user app although its transaction was reverted: uid 850 owns {}/data",
            home.display()
        )),
        "{}",
        run.stderr
    );
    assert_eq!(user(&host, "app"), Some((850, 850)));
    // Its own group stays with it; an unused group goes.
    assert!(
        run.stderr
            .contains("kept group app although its transaction was reverted: it is the primary group of user app"),
        "{}",
        run.stderr
    );
    assert_eq!(group(&host, "spare"), None);
}

/// A crash right after sysusers made the accounts (before any file was
/// staged): the next run's recovery removes them.
#[test]
fn accounts_made_by_a_killed_transaction_are_removed_by_recovery() {
    let Some(host) = host() else { return };
    let r = repo(PASS);
    let before = dbs(&host);
    for point in ["apply.accounts.done", "apply.staged", "apply.undo.accounts"] {
        let mut cmd = host.cmd(r.path(), &["sync", "--once", "--run-checks"]);
        // The undo point is reached by a failing check's revert.
        if point == "apply.undo.accounts" {
            role(&r, ACCOUNTS, &fail(&host));
            r.commit("failing");
        }
        let out = cmd
            .env("DRIFTLESS_TEST_FAILPOINT", format!("{point}:kill"))
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(9),
            "{point}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            user(&host, "app"),
            Some((998, 999)),
            "{point}: killed before the accounts existed"
        );
        // The next sync recovers first; it fails at its own accounts
        // stage, before sysusers, so what is left is recovery's work.
        // (After the revert's kill, the commit is marked bad and the
        // sync does not get that far.)
        let out = host
            .cmd(r.path(), &["sync", "--once", "--run-checks"])
            .env("DRIFTLESS_TEST_FAILPOINT", "apply.accounts.started:error")
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("rolled back a transaction"),
            "{point}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            dbs(&host),
            before,
            "{point}: the accounts were not removed by recovery"
        );
        if point == "apply.undo.accounts" {
            role(&r, ACCOUNTS, PASS);
            r.commit("good again");
        }
    }
}

#[test]
fn bad_account_declarations_name_their_line_and_change_nothing() {
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"base\", \"app\"]\n");
    r.write("hosts/default.toml", "");
    r.write("roles/base/files/x", "x\n");
    r.write(
        "roles/base/role.toml",
        "[[files]]\npath = \"/etc/x\"\nsource = \"x\"\nowner = \"app\"\n\n\
         [[users]]\nname = \"Bad Name\"\n",
    );
    r.write(
        "roles/app/role.toml",
        "[[users]]\nname = \"app\"\ndescription = \"a:b\"\n\n\
         [[users]]\nname = \"app2\"\nuid = 1500\n\n\
         [[groups]]\nname = \"root\"\n",
    );
    r.commit("bad");
    let (code, out) = validate(r.path(), &[]);
    assert_eq!(code, Some(3), "{out}");
    for want in [
        "roles/base/role.toml:6 users[0]: key `name`: \"Bad Name\" is not a valid account name",
        "roles/app/role.toml:1 users[0]: key `description`: \"a:b\" must be 1 to 128 printable characters",
        "roles/app/role.toml:5 users[1]: key `uid`: 1500 is outside the system range 1-999",
        "roles/app/role.toml:9 groups[0]: key `name`: root always exists",
    ] {
        assert!(out.contains(want), "{want:?} not in\n{out}");
    }
    // A sync refuses the same commit before anything is written (the
    // refusal comes before any account is looked at: no root needed).
    let host = Host::new("h");
    let run = host.run(r.path(), &["sync", "--once"]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("roles/base/role.toml:6 users[0]: key `name`"),
        "{}",
        run.stderr
    );
    assert!(host.tree().is_empty(), "{:?}", host.tree());
    // Fixed, except that `base` uses `app` before `app` declares it.
    r.write(
        "roles/base/role.toml",
        "[[files]]\npath = \"/etc/x\"\nsource = \"x\"\nowner = \"app\"\n",
    );
    r.write("roles/app/role.toml", "[[users]]\nname = \"app\"\n");
    r.commit("order");
    let (code, out) = validate(r.path(), &[]);
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains(
            "roles/base/role.toml:1 files[0]: user \"app\" is declared later, in roles/app/role.toml:1 users[0]; list role app before base"
        ),
        "{out}"
    );
    // Two roles declaring one account.
    r.write("driftless.toml", "roles = [\"app\", \"base\"]\n");
    r.write("roles/base/role.toml", "[[users]]\nname = \"app\"\n");
    r.commit("twice");
    let (code, out) = validate(r.path(), &[]);
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains("roles/base/role.toml:1 users[0]: user app is already declared by roles/app/role.toml:1 users[0]"),
        "{out}"
    );
}

/// A group the host lacks and no role declares: refused at plan time,
/// with the entry's line, before anything is created.
#[test]
fn a_membership_in_an_unknown_group_is_refused_before_anything_changes() {
    let Some(host) = host() else { return };
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"app\"]\n");
    r.write("hosts/default.toml", "");
    r.write(
        "roles/app/role.toml",
        "[[users]]\nname = \"app\"\nmembers_of = [\"docker\"]\n",
    );
    r.commit("v1");
    let before = dbs(&host);
    let run = sync(&host, &r);
    assert_ne!(run.code, 0);
    assert!(
        run.stderr.contains(
            "roles/app/role.toml:1 users[0]: group \"docker\" (in members_of of user app) is neither declared in [[groups]] nor on this host"
        ),
        "{}",
        run.stderr
    );
    assert_eq!(dbs(&host), before);
}

/// A pre hook that makes, the way a package's postinst would, an account
/// the commit declares (`still_missing`), or one that takes the uid the
/// plan predicted (`made`).
fn pre_hook(host: &Host, line: &str) -> String {
    format!(
        "[[hooks]]\nwhen = \"pre\"\nrun = \"always\"\nargv = [\"/usr/bin/systemd-sysusers\", \"--root={}\", \"--inline\", \"{line}\"]\n",
        host.root.path().display()
    )
}

/// The review's defect 1: an account made by something else between the
/// plan and the accounts stage was removed by the rollback, as if the
/// transaction had made it.
#[test]
fn an_account_made_by_something_else_after_the_plan_is_never_undone() {
    let Some(host) = host() else { return };
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"app\"]\n");
    r.write("hosts/default.toml", "");
    r.write(
        "roles/app/role.toml",
        &format!(
            "[[users]]\nname = \"svc\"\n\n{}",
            pre_hook(&host, "u svc - - - -")
        ),
    );
    r.commit("v1");
    let run = host.run(r.path(), &["sync", "--once", "--run-checks"]);
    assert_ne!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("user svc was created by something else since the plan"),
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("reverted: user removed"),
        "{}",
        run.stderr
    );
    assert!(user(&host, "svc").is_some(), "the other's user was removed");
    assert!(
        group(&host, "svc").is_some(),
        "the other's group was removed"
    );
}

/// The review's defect 5: sysusers gave another uid than predicted (one
/// was taken meanwhile): the accounts it made are removed all the same,
/// by their real ids, and the other's stays.
#[test]
fn accounts_made_with_other_ids_than_planned_are_still_undone() {
    let Some(host) = host() else { return };
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"app\"]\n");
    r.write("hosts/default.toml", "");
    r.write(
        "roles/app/role.toml",
        &format!(
            "[[users]]\nname = \"svc\"\n\n{}",
            pre_hook(&host, "u pkguser - - - -")
        ),
    );
    r.commit("v1");
    let plan = host.run(r.path(), &["plan"]).ok().stdout;
    assert!(plan.contains("+ user svc (uid 999, gid 999"), "{plan}");
    let run = host.run(r.path(), &["sync", "--once", "--run-checks"]);
    assert_ne!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("user svc was created with uid 998, not the 999 the plan predicted"),
        "{}",
        run.stderr
    );
    assert_eq!(user(&host, "svc"), None, "{}", run.stderr);
    assert_eq!(group(&host, "svc"), None, "{}", run.stderr);
    assert_eq!(user(&host, "pkguser"), Some((999, 999)));
}

/// The review's defect 2: the host has group `app` already; the commit
/// declares user `app`, whose primary group it becomes. Debian's userdel
/// would remove that group with the user: the user is kept instead.
#[test]
fn a_user_whose_group_existed_before_is_kept_with_it() {
    let Some(host) = host() else { return };
    let mut group_db = std::fs::read_to_string(host.path("/etc/group")).unwrap();
    group_db.push_str("app:x:901:\n");
    std::fs::write(host.path("/etc/group"), group_db).unwrap();
    let mut gshadow = std::fs::read_to_string(host.path("/etc/gshadow")).unwrap();
    gshadow.push_str("app:!::\n");
    std::fs::write(host.path("/etc/gshadow"), gshadow).unwrap();
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"app\"]\n");
    r.write("hosts/default.toml", "");
    r.write("roles/app/files/conf", "x\n");
    r.write(
        "roles/app/role.toml",
        &format!(
            "[[users]]\nname = \"app\"\n\n[[files]]\npath = \"/srv/app/app.conf\"\nsource = \"conf\"\n\n\
             [[checks]]\nname = \"app\"\nretries = 1\ninterval = \"10ms\"\ncommand = {{ argv = {} }}\n",
            fail(&host)
        ),
    );
    r.commit("v1");
    let run = sync(&host, &r).code(1);
    assert!(
        run.stderr.contains("kept user app although its transaction was reverted: userdel would remove its group app (gid 901) as well, which this transaction did not create"),
        "{}",
        run.stderr
    );
    assert_eq!(group(&host, "app"), Some((901, String::new())));
    // The failing sync says so too.
    assert!(
        run.stderr
            .contains("(but kept user app: userdel would remove"),
        "{}",
        run.stderr
    );
}

/// The review's defect 3: a directory the transaction created for its
/// user survives the revert (something was written into it during the
/// check): the user and its group stay, or the directory would belong to
/// a uid the next account inherits.
#[test]
fn a_user_owning_a_directory_that_survived_the_revert_is_kept() {
    let Some(host) = host() else { return };
    let check = format!(
        "[\"/bin/sh\", \"-c\", \"touch {} && ! test -e {}\"]",
        host.path("/srv/work/data").display(),
        host.path("/srv/app/app.conf").display()
    );
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"app\"]\n");
    r.write("hosts/default.toml", "");
    role(&r, ACCOUNTS, &check);
    r.commit("v1");
    let run = sync(&host, &r).code(1);
    assert!(
        run.stderr.contains(&format!(
            "kept user worker and its group although its transaction was reverted: gid 850 owns {}",
            host.path("/srv/work").display()
        )) || run.stderr.contains(&format!(
            "kept user worker although its transaction was reverted: uid 850 owns {}",
            host.path("/srv/work").display()
        )),
        "{}",
        run.stderr
    );
    assert_eq!(user(&host, "worker"), Some((850, 850)));
    // The others owned nothing: gone.
    assert_eq!(user(&host, "app"), None);
}

#[test]
fn a_pre_hook_cannot_run_as_a_user_the_commit_creates() {
    let Some(host) = host() else { return };
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"app\"]\n");
    r.write("hosts/default.toml", "");
    r.write(
        "roles/app/role.toml",
&"[[users]]\nname = \"app\"\n\n[[hooks]]\nwhen = \"pre\"\nrun = \"always\"\nuser = \"app\"\nargv = [\"/bin/sh\", \"-c\", \"touch HOOK\"]\n"
            .replace("HOOK", &host.path("/hook-ran").display().to_string()),
    );
    r.commit("v1");
    let before = dbs(&host);
    for args in [&["plan"][..], &["sync", "--once"]] {
        let run = host.run(r.path(), args);
        assert_eq!(run.code, 3, "{args:?}: {}", run.stderr);
        assert!(
            run.stderr.contains("roles/app/role.toml:4 hooks[0]: this pre hook runs as user app, which this commit creates"),
            "{args:?}: {}",
            run.stderr
        );
        assert_eq!(dbs(&host), before, "{args:?}");
        assert!(host.read("/hook-ran").is_none(), "{args:?}: the hook ran");
    }
}
