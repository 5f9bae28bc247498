//! The accounts stage of a transaction: reading the host's users and
//! groups, predicting and creating the declared ones with
//! `systemd-sysusers`, and undoing what a failed transaction created.
//!
//! **Observe** (plan time). Each declared account and each group a user
//! names is looked up: through NSS on the live system (`getpwnam`, so an
//! LDAP user counts as existing, as it does for sysusers), in the root's
//! `/etc/passwd` and `/etc/group` under a `--root` prefix. When something
//! is missing, `systemd-sysusers --dry-run --inline <lines>` says which ids
//! it would allocate: the plan shows them, and a file owned by a user the
//! commit creates is planned with the predicted uid.
//!
//! **Create** (in the transaction, after the intent is durable and before
//! any file is staged). The same lines run for real; then every predicted
//! id is read back. A difference (someone created an account in between)
//! fails the transaction before a single file was written, and undoes what
//! sysusers made.
//!
//! **Undo** (revert, rollback, recovery). The journal names what the
//! transaction was to create, each with its id. Memberships it added are
//! dropped (`usermod -r -G`), then users, then groups, by name and only
//! with the recorded id. A created user is removed (`userdel`, never `-r`)
//! only if it owns nothing else that driftless can see: no process runs
//! as it (live system), its home is absent or holds nothing of its own,
//! and no path driftless manages belongs to it. Otherwise it stays, and
//! the reason is logged: a user that vanishes while its files stay on disk
//! is how a later account inherits them. There is no whole-filesystem
//! scan (too slow on a big host, and it would cross mounts); that is the
//! honest limit of "owns nothing else". A created group is removed only
//! if no user has it as primary group and no such path belongs to it.
//! Undo is idempotent: recovery may run it again after a crash within it.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tracing::{info, warn};

use crate::desired::accounts::Accounts;
use crate::effects::process::{self, Invocation};
use crate::effects::rootfs::RootFs;
pub use crate::plan::accounts::{AccountsRecord, ObservedAccounts};

/// Time limit of one `systemd-sysusers`, `userdel`, `groupdel` or
/// `usermod` run (they wait for `/etc/.pwd.lock`).
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// Entries of a home directory looked at before a user is removed.
const HOME_SCAN_LIMIT: usize = 10_000;

/// The account names a commit's accounts involve: declared users; declared
/// groups, users' own groups, and the groups users name.
fn involved(accounts: &Accounts) -> (BTreeSet<&str>, BTreeSet<&str>) {
    let users = accounts.users.iter().map(|u| u.name.as_str()).collect();
    let mut groups: BTreeSet<&str> = accounts.groups.iter().map(|g| g.name.as_str()).collect();
    for u in &accounts.users {
        groups.insert(u.primary_group());
        groups.extend(u.members_of.iter().map(String::as_str));
    }
    (users, groups)
}

fn live(fs: &RootFs) -> bool {
    fs.path() == Path::new("/")
}

/// Reads what exists of `accounts` (and predicts what sysusers would
/// create, when `managed` and something is missing).
pub fn observe(fs: &RootFs, accounts: &Accounts, managed: bool) -> Result<ObservedAccounts> {
    let mut out = ObservedAccounts {
        managed,
        ..Default::default()
    };
    if accounts.is_empty() {
        return Ok(out);
    }
    let (users, groups) = involved(accounts);
    let db = Db::read(fs)?;
    for u in users {
        if let Some(ids) = db.user(u)? {
            out.users.insert(u.to_string(), ids);
        }
    }
    for g in groups {
        if let Some(entry) = db.group(g)? {
            out.groups.insert(g.to_string(), entry);
        }
    }
    let missing = accounts
        .users
        .iter()
        .any(|u| !out.users.contains_key(&u.name))
        || accounts
            .groups
            .iter()
            .any(|g| !out.groups.contains_key(&g.name));
    if managed && missing {
        let (users, groups) = predict(fs, &accounts.lines())?;
        out.predicted_users = users;
        out.predicted_groups = groups;
    }
    Ok(out)
}

/// The host's account databases: NSS on the live system, the root's
/// files under a prefix.
struct Db {
    files: Option<(String, String)>,
}

impl Db {
    fn read(fs: &RootFs) -> Result<Db> {
        if live(fs) {
            return Ok(Db { files: None });
        }
        let read = |rel: &str| -> Result<String> {
            Ok(fs
                .read_contained(rel, 64 * 1024 * 1024)?
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default())
        };
        Ok(Db {
            files: Some((read("etc/passwd")?, read("etc/group")?)),
        })
    }

    fn user(&self, name: &str) -> Result<Option<(u32, u32)>> {
        match &self.files {
            None => Ok(nix::unistd::User::from_name(name)
                .with_context(|| format!("cannot look up user {name:?}"))?
                .map(|u| (u.uid.as_raw(), u.gid.as_raw()))),
            Some((passwd, _)) => Ok(passwd.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() >= 4 && f[0] == name)
                    .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
                    .flatten()
            })),
        }
    }

    fn group(&self, name: &str) -> Result<Option<(u32, Vec<String>)>> {
        match &self.files {
            None => Ok(nix::unistd::Group::from_name(name)
                .with_context(|| format!("cannot look up group {name:?}"))?
                .map(|g| (g.gid.as_raw(), g.mem))),
            Some((_, group)) => Ok(group.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() >= 4 && f[0] == name)
                    .then(|| {
                        let members = f[3]
                            .split(',')
                            .filter(|m| !m.is_empty())
                            .map(str::to_string)
                            .collect();
                        Some((f[2].parse().ok()?, members))
                    })
                    .flatten()
            })),
        }
    }

    /// Whether any user has `gid` as primary group.
    fn primary_of(&self, gid: u32) -> Result<Option<String>> {
        match &self.files {
            None => {
                // getpwent through NSS is not exposed by nix; the files
                // are what sysusers writes, so they are what is checked.
                let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
                Ok(primary_in(&passwd, gid))
            }
            Some((passwd, _)) => Ok(primary_in(passwd, gid)),
        }
    }
}

fn primary_in(passwd: &str, gid: u32) -> Option<String> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[3].parse::<u32>().ok() == Some(gid)).then(|| f[0].to_string())
    })
}

/// `systemd-sysusers [--root=R] ARGS…`, with a clean environment and C
/// messages (the dry run's are parsed).
fn sysusers(fs: &RootFs, args: &[&str]) -> Result<process::Finished> {
    let mut argv = vec!["systemd-sysusers".to_string()];
    if !live(fs) {
        argv.push(format!("--root={}", fs.path().display()));
    }
    argv.extend(args.iter().map(|a| a.to_string()));
    tool(&argv)
}

fn tool(argv: &[String]) -> Result<process::Finished> {
    let env = BTreeMap::from([("LC_ALL".to_string(), "C".to_string())]);
    let finished = process::run_blocking(&Invocation {
        argv,
        env: Some(&env),
        user: None,
        timeout: Some(TOOL_TIMEOUT),
    })
    .map_err(|e| {
        if argv[0] == "systemd-sysusers" {
            anyhow!("{e:#}: [[users]] and [[groups]] need systemd-sysusers (package systemd)")
        } else {
            anyhow!(
                "{e:#}: removing accounts needs {} (package passwd)",
                argv[0]
            )
        }
    })?;
    Ok(finished)
}

fn ok_or_explain(argv0: &str, f: &process::Finished) -> Result<()> {
    if f.status.is_some_and(|s| s.success()) {
        return Ok(());
    }
    let mut why = f.describe(Some(TOOL_TIMEOUT));
    let last = f.stderr.last_line(300);
    if !last.is_empty() {
        why.push_str(": ");
        why.push_str(&last);
    }
    bail!("{argv0} {why}")
}

/// What `systemd-sysusers --dry-run` would create for `lines`.
#[allow(clippy::type_complexity)]
pub fn predict(
    fs: &RootFs,
    lines: &[String],
) -> Result<(BTreeMap<String, (u32, u32)>, BTreeMap<String, u32>)> {
    let mut args = vec!["--dry-run", "--inline"];
    args.extend(lines.iter().map(String::as_str));
    let f = sysusers(fs, &args)?;
    ok_or_explain("systemd-sysusers --dry-run", &f)
        .context("cannot predict the ids of the accounts to create")?;
    // Its messages go to stderr (stdout too, in some versions).
    let mut text = String::from_utf8_lossy(&f.stderr.tail).into_owned();
    text.push('\n');
    text.push_str(&String::from_utf8_lossy(&f.stdout.tail));
    Ok(parse_predictions(&text))
}

/// Parses sysusers' "Creating group 'g' with GID 995." and "Creating user
/// 'u' (GECOS) with UID 994 and GID 995." lines.
#[allow(clippy::type_complexity)]
fn parse_predictions(text: &str) -> (BTreeMap<String, (u32, u32)>, BTreeMap<String, u32>) {
    let mut users = BTreeMap::new();
    let mut groups = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim().trim_end_matches('.');
        if let Some(rest) = line.strip_prefix("Creating group '") {
            let Some((name, rest)) = rest.split_once('\'') else {
                continue;
            };
            if let Some(gid) = rest.strip_prefix(" with GID ").and_then(|g| g.parse().ok()) {
                groups.insert(name.to_string(), gid);
            }
        } else if let Some(rest) = line.strip_prefix("Creating user '") {
            let Some((name, rest)) = rest.split_once('\'') else {
                continue;
            };
            let Some(at) = rest.rfind(" with UID ") else {
                continue;
            };
            let ids = &rest[at + " with UID ".len()..];
            if let Some((uid, gid)) = ids.split_once(" and GID ") {
                if let (Ok(u), Ok(g)) = (uid.parse(), gid.parse()) {
                    users.insert(name.to_string(), (u, g));
                }
            }
        }
    }
    (users, groups)
}

/// Creates what `record` says is missing, then checks every recorded id.
pub fn create(fs: &RootFs, record: &AccountsRecord) -> Result<()> {
    // Still missing? An account that appeared since the plan is not this
    // transaction's to undo.
    let db = Db::read(fs)?;
    for (name, _) in &record.users {
        if db.user(name)?.is_some() {
            bail!("user {name} was created by something else since the plan; nothing was applied, the next sync plans again");
        }
    }
    for (name, _) in &record.groups {
        if db.group(name)?.is_some() {
            bail!("group {name} was created by something else since the plan; nothing was applied, the next sync plans again");
        }
    }
    let mut args = vec!["--inline"];
    args.extend(record.lines.iter().map(String::as_str));
    let f = sysusers(fs, &args)?;
    ok_or_explain("systemd-sysusers", &f).context("cannot create the declared accounts")?;
    let db = Db::read(fs)?;
    for (name, uid) in &record.users {
        match db.user(name)? {
            Some((got, _)) if got == *uid => {}
            Some((got, _)) => bail!(
                "user {name} was created with uid {got}, not the {uid} the plan predicted \
                 (another account was created meanwhile); nothing was applied, the next sync plans again"
            ),
            None => bail!("systemd-sysusers did not create user {name}"),
        }
    }
    for (name, gid) in &record.groups {
        match db.group(name)? {
            Some((got, _)) if got == *gid => {}
            Some((got, _)) => bail!(
                "group {name} was created with gid {got}, not the {gid} the plan predicted \
                 (another group was created meanwhile); nothing was applied, the next sync plans again"
            ),
            None => bail!("systemd-sysusers did not create group {name}"),
        }
    }
    for (user, group) in &record.members {
        let added = db
            .group(group)?
            .is_some_and(|(_, members)| members.iter().any(|m| m == user));
        if !added {
            bail!("systemd-sysusers did not add {user} to group {group}");
        }
    }
    Ok(())
}

/// Undoes `record` as far as it is safe. `watched` are paths driftless
/// manages (as they are after the file undo): a created account that owns
/// one of them is kept. Never fails: an account that cannot be removed is
/// kept (always the safe side), and a note per account kept is returned
/// and logged.
pub fn undo(fs: &RootFs, record: &AccountsRecord, watched: &[std::path::PathBuf]) -> Vec<String> {
    match undo_inner(fs, record, watched) {
        Ok(kept) => kept,
        Err(e) => {
            warn!("the accounts of a reverted transaction were kept: {e:#}");
            vec![format!("accounts kept: {e:#}")]
        }
    }
}

fn undo_inner(
    fs: &RootFs,
    record: &AccountsRecord,
    watched: &[std::path::PathBuf],
) -> Result<Vec<String>> {
    let mut kept = Vec::new();
    let prefix = |argv: &mut Vec<String>| {
        if !live(fs) {
            argv.push("--prefix".into());
            argv.push(fs.path().display().to_string());
        }
    };
    let db = Db::read(fs)?;
    for (user, group) in &record.members {
        let is_member = db
            .group(group)?
            .is_some_and(|(_, members)| members.iter().any(|m| m == user));
        let created_user = record.users.iter().any(|(u, _)| u == user);
        if !is_member || created_user {
            // userdel drops a removed user's memberships itself.
            continue;
        }
        let _ = crate::effects::failpoint::hit("apply.undo.account");
        let mut argv = vec!["usermod".to_string()];
        prefix(&mut argv);
        argv.extend(["-r", "-G", group, user].map(str::to_string));
        if let Err(e) = tool(&argv).and_then(|f| ok_or_explain("usermod", &f)) {
            warn!(user = %user, group = %group, "kept {user} in group {group}: {e:#}");
            kept.push(format!("kept {user} in group {group}: {e:#}"));
            continue;
        }
        info!(user = %user, group = %group, "reverted: membership removed");
    }
    for (name, uid) in &record.users {
        match db.user(name)? {
            Some((got, _)) if got == *uid => {}
            _ => continue,
        }
        if let Some(why) = user_owns(fs, name, *uid, watched)? {
            warn!(user = %name, uid, "kept user {name} although its transaction was reverted: {why}");
            kept.push(format!("kept user {name}: {why}"));
            continue;
        }
        let _ = crate::effects::failpoint::hit("apply.undo.account");
        let mut argv = vec!["userdel".to_string()];
        prefix(&mut argv);
        argv.push(name.clone());
        if let Err(e) = tool(&argv).and_then(|f| ok_or_explain("userdel", &f)) {
            warn!(user = %name, "kept user {name}: {e:#}");
            kept.push(format!("kept user {name}: {e:#}"));
            continue;
        }
        info!(user = %name, uid, "reverted: user removed");
    }
    let db = Db::read(fs)?;
    for (name, gid) in &record.groups {
        match db.group(name)? {
            Some((got, _)) if got == *gid => {}
            _ => continue,
        }
        let why = match db.primary_of(*gid)? {
            Some(user) => Some(format!("it is the primary group of user {user}")),
            None => owner_among(watched, |m| m.gid() == *gid)
                .map(|p| format!("gid {gid} owns {}", p.display())),
        };
        if let Some(why) = why {
            warn!(group = %name, gid, "kept group {name} although its transaction was reverted: {why}");
            kept.push(format!("kept group {name}: {why}"));
            continue;
        }
        let _ = crate::effects::failpoint::hit("apply.undo.account");
        let mut argv = vec!["groupdel".to_string()];
        prefix(&mut argv);
        argv.push(name.clone());
        if let Err(e) = tool(&argv).and_then(|f| ok_or_explain("groupdel", &f)) {
            warn!(group = %name, "kept group {name}: {e:#}");
            kept.push(format!("kept group {name}: {e:#}"));
            continue;
        }
        info!(group = %name, gid, "reverted: group removed");
    }
    Ok(kept)
}

/// Why user `name` (`uid`) may not be removed, if it owns anything
/// driftless can see.
fn user_owns(
    fs: &RootFs,
    name: &str,
    uid: u32,
    watched: &[std::path::PathBuf],
) -> Result<Option<String>> {
    if live(fs) {
        if let Some(pid) = process_of(uid) {
            return Ok(Some(format!("process {pid} runs as uid {uid}")));
        }
    }
    if let Some(p) = owner_among(watched, |m| m.uid() == uid) {
        return Ok(Some(format!("uid {uid} owns {}", p.display())));
    }
    let home = home_of(fs, name)?;
    if let Some(home) = home.filter(|h| h != "/" && h.starts_with('/')) {
        let at = fs.path().join(home.trim_start_matches('/'));
        if let Some(p) = owned_under(&at, uid) {
            return Ok(Some(format!("uid {uid} owns {}", p.display())));
        }
    }
    Ok(None)
}

fn home_of(fs: &RootFs, name: &str) -> Result<Option<String>> {
    if live(fs) {
        return Ok(nix::unistd::User::from_name(name)
            .with_context(|| format!("cannot look up user {name:?}"))?
            .map(|u| u.dir.display().to_string()));
    }
    let passwd = fs
        .read_contained("etc/passwd", 64 * 1024 * 1024)?
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    Ok(passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 6 && f[0] == name).then(|| f[5].to_string())
    }))
}

fn owner_among(
    paths: &[std::path::PathBuf],
    owns: impl Fn(&std::fs::Metadata) -> bool,
) -> Option<std::path::PathBuf> {
    paths
        .iter()
        .find(|p| std::fs::symlink_metadata(p).is_ok_and(|m| owns(&m)))
        .cloned()
}

/// The first entry under `dir` (itself included) owned by `uid`, looking
/// at no more than [`HOME_SCAN_LIMIT`] entries; past that the directory
/// counts as owned (the safe answer: the user is kept). Symlinks are not
/// followed; other filesystems are not entered.
fn owned_under(dir: &Path, uid: u32) -> Option<std::path::PathBuf> {
    let top = std::fs::symlink_metadata(dir).ok()?;
    if top.uid() == uid {
        return Some(dir.to_path_buf());
    }
    if !top.is_dir() {
        return None;
    }
    let mut stack = vec![dir.to_path_buf()];
    let mut seen = 0usize;
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            seen += 1;
            if seen > HOME_SCAN_LIMIT {
                return Some(d);
            }
            let Ok(m) = e.metadata() else { continue };
            if m.uid() == uid {
                return Some(e.path());
            }
            if m.is_dir() && m.dev() == top.dev() {
                stack.push(e.path());
            }
        }
    }
    None
}

/// A process whose real, effective, saved or filesystem uid is `uid`.
fn process_of(uid: u32) -> Option<u32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let runs_as = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .is_some_and(|ids| ids.split_whitespace().any(|i| i.parse() == Ok(uid)));
        if runs_as {
            return Some(pid);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysusers_dry_run_messages_are_parsed() {
        let text = "Creating group 'webadm' with GID 995.\n\
                    Creating user 'app' (App service) with UID 994 and GID 995.\n\
                    Creating user 'x' (a (b) with UID 9) with UID 993 and GID 993.\n\
                    Would write /etc/group…\n";
        let (users, groups) = parse_predictions(text);
        assert_eq!(groups, BTreeMap::from([("webadm".to_string(), 995)]));
        assert_eq!(
            users,
            BTreeMap::from([
                ("app".to_string(), (994, 995)),
                ("x".to_string(), (993, 993))
            ])
        );
    }

    #[test]
    fn a_primary_group_is_found_by_gid() {
        let passwd = "root:x:0:0::/root:/bin/sh\napp:x:994:995::/:/usr/sbin/nologin\n";
        assert_eq!(primary_in(passwd, 995), Some("app".into()));
        assert_eq!(primary_in(passwd, 996), None);
    }
}
