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
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tracing::{info, warn};

use crate::desired::accounts::Accounts;
use crate::effects::ids::AccountDb;
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
    let db = AccountDb::read(fs)?;
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

/// `systemd-sysusers [--root=R] ARGS…`, with a clean environment and C
/// messages (the dry run's are parsed).
fn sysusers(fs: &RootFs, args: &[&str]) -> Result<process::Finished> {
    let mut argv = vec!["systemd-sysusers".to_string()];
    if !fs.is_host_root() {
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
        // The dry run prints a line per account to create: all are read.
        keep: 16 * 1024 * 1024,
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
    if f.stderr.dropped > 0 || f.stdout.dropped > 0 {
        bail!("systemd-sysusers' dry run printed more than 16 MiB: too many accounts to create in one commit");
    }
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

/// Fails if anything of `record` exists already: made since the plan by
/// something else (a package's sysusers run, a pre hook, an operator), it
/// is not this transaction's to make, or to undo.
pub fn still_missing(fs: &RootFs, record: &AccountsRecord) -> Result<()> {
    let db = AccountDb::read(fs)?;
    let again = "nothing was applied; the next sync plans again";
    for (name, _) in &record.users {
        if db.user(name)?.is_some() {
            bail!("user {name} was created by something else since the plan; {again}");
        }
    }
    for (name, _) in &record.groups {
        if db.group(name)?.is_some() {
            bail!("group {name} was created by something else since the plan; {again}");
        }
    }
    for (user, group) in &record.members {
        if db
            .group(group)?
            .is_some_and(|(_, members)| members.contains(user))
        {
            bail!("{user} was added to group {group} by something else since the plan; {again}");
        }
    }
    Ok(())
}

/// Runs sysusers on `record`'s lines, then checks every recorded id.
pub fn create(fs: &RootFs, record: &AccountsRecord) -> Result<()> {
    let mut args = vec!["--inline"];
    args.extend(record.lines.iter().map(String::as_str));
    let f = sysusers(fs, &args)?;
    ok_or_explain("systemd-sysusers", &f).context("cannot create the declared accounts")?;
    let db = AccountDb::read(fs)?;
    let again =
        "(another account was created meanwhile); nothing was applied, the next sync plans again";
    for (name, uid) in &record.users {
        match db.user(name)? {
            Some((got, _)) if got == *uid => {}
            Some((got, _)) => bail!(
                "user {name} was created with uid {got}, not the {uid} the plan predicted {again}"
            ),
            None => bail!("systemd-sysusers did not create user {name}"),
        }
    }
    for (name, gid) in &record.groups {
        match db.group(name)? {
            Some((got, _)) if got == *gid => {}
            Some((got, _)) => bail!(
                "group {name} was created with gid {got}, not the {gid} the plan predicted {again}"
            ),
            None => bail!("systemd-sysusers did not create group {name}"),
        }
    }
    for (user, group) in &record.members {
        let added = db
            .group(group)?
            .is_some_and(|(_, members)| members.contains(user));
        if !added {
            bail!("systemd-sysusers did not add {user} to group {group}");
        }
    }
    Ok(())
}

/// `record` as sysusers really made it (run right after it, before any
/// comparison): each recorded account that exists, with its real id; each
/// recorded membership that exists. Missing ones are dropped.
pub fn made(fs: &RootFs, record: &AccountsRecord) -> Result<AccountsRecord> {
    let db = AccountDb::read(fs)?;
    let mut out = AccountsRecord {
        lines: record.lines.clone(),
        ..Default::default()
    };
    for (name, _) in &record.users {
        if let Some((uid, _)) = db.user(name)? {
            out.users.push((name.clone(), uid));
        }
    }
    for (name, _) in &record.groups {
        if let Some((gid, _)) = db.group(name)? {
            out.groups.push((name.clone(), gid));
        }
    }
    for (user, group) in &record.members {
        if db
            .group(group)?
            .is_some_and(|(_, members)| members.contains(user))
        {
            out.members.push((user.clone(), group.clone()));
        }
    }
    Ok(out)
}

/// `userdel`'s exit status for "the user is logged in / runs a process".
const USERDEL_IN_USE: i32 = 8;

/// Undoes `record` as far as it is safe. `watched` are paths driftless
/// manages and what survived of the transaction (after the file undo);
/// `scanned` are those of them looked into as well (a created directory
/// something else wrote in). An account that owns something there is
/// kept, as is one whose removal would take along an account the
/// transaction did not make: a note per kept account is returned and
/// logged. An error (a tool that cannot run or fails otherwise, an
/// unreadable database) leaves the rest for the next run to try again.
pub fn undo(
    fs: &RootFs,
    record: &AccountsRecord,
    watched: &[PathBuf],
    scanned: &[PathBuf],
) -> Result<Vec<String>> {
    let mut kept = Vec::new();
    let mut keep = |what: String, why: String| {
        warn!("kept {what} although its transaction was reverted: {why}");
        kept.push(format!("kept {what}: {why}"));
    };
    let prefix = |argv: &mut Vec<String>| {
        if !fs.is_host_root() {
            argv.push("--prefix".into());
            argv.push(fs.path().display().to_string());
        }
    };
    let db = AccountDb::read(fs)?;
    for (user, group) in &record.members {
        let is_member = db
            .group(group)?
            .is_some_and(|(_, members)| members.contains(user));
        let user_exists = db.user(user)?.is_some();
        let user_goes = record.users.iter().any(|(u, _)| u == user);
        if !is_member || !user_exists || user_goes {
            // userdel drops a removed user's memberships itself.
            continue;
        }
        crate::effects::failpoint::hit("apply.undo.account")?;
        let mut argv = vec!["usermod".to_string()];
        prefix(&mut argv);
        argv.extend(["-r", "-G", group, user].map(str::to_string));
        let f = tool(&argv)?;
        ok_or_explain("usermod", &f)
            .with_context(|| format!("cannot take {user} out of group {group}"))?;
        info!(user = %user, group = %group, "reverted: membership removed");
    }
    let ours_group =
        |name: &str, gid: u32| record.groups.iter().any(|(g, id)| g == name && *id == gid);
    for (name, uid) in &record.users {
        let Some((got, primary)) = db.user(name)? else {
            continue;
        };
        if got != *uid {
            keep(
                format!("user {name}"),
                format!("it has uid {got}, not the {uid} this transaction gave it"),
            );
            continue;
        }
        // Debian's userdel (USERGROUPS_ENAB) also removes the group named
        // like the user when it is the user's primary group: only if that
        // group is this transaction's too, and may go.
        if let Some((gid, _)) = db.group(name)?.filter(|(gid, _)| *gid == primary) {
            if !ours_group(name, gid) {
                keep(
                    format!("user {name}"),
                    format!("userdel would remove its group {name} (gid {gid}) as well, which this transaction did not create"),
                );
                continue;
            }
            if let Some(why) = group_stays(fs, &db, name, gid, Some(name), watched, scanned)? {
                keep(format!("user {name} and its group"), why);
                continue;
            }
        }
        if let Some(why) = user_owns(fs, name, *uid, watched, scanned)? {
            keep(format!("user {name}"), why);
            continue;
        }
        crate::effects::failpoint::hit("apply.undo.account")?;
        let mut argv = vec!["userdel".to_string()];
        prefix(&mut argv);
        argv.push(name.clone());
        let f = tool(&argv)?;
        if f.status.and_then(|s| s.code()) == Some(USERDEL_IN_USE) {
            keep(format!("user {name}"), f.stderr.last_line(300));
            continue;
        }
        ok_or_explain("userdel", &f).with_context(|| format!("cannot remove user {name}"))?;
        info!(user = %name, uid, "reverted: user removed");
    }
    let db = AccountDb::read(fs)?;
    for (name, gid) in &record.groups {
        let Some((got, _)) = db.group(name)? else {
            continue;
        };
        if got != *gid {
            keep(
                format!("group {name}"),
                format!("it has gid {got}, not the {gid} this transaction gave it"),
            );
            continue;
        }
        if let Some(why) = group_stays(fs, &db, name, *gid, None, watched, scanned)? {
            keep(format!("group {name}"), why);
            continue;
        }
        crate::effects::failpoint::hit("apply.undo.account")?;
        let mut argv = vec!["groupdel".to_string()];
        prefix(&mut argv);
        argv.push(name.clone());
        let f = tool(&argv)?;
        ok_or_explain("groupdel", &f).with_context(|| format!("cannot remove group {name}"))?;
        info!(group = %name, gid, "reverted: group removed");
    }
    Ok(kept)
}

/// Why group `name` (`gid`) must stay, if it must: another user (not
/// `going`) has it as primary group, a process runs with it, or it owns
/// something driftless can see.
fn group_stays(
    fs: &RootFs,
    db: &AccountDb,
    name: &str,
    gid: u32,
    going: Option<&str>,
    watched: &[PathBuf],
    scanned: &[PathBuf],
) -> Result<Option<String>> {
    if let Some(user) = db.primary_of(gid, going)? {
        return Ok(Some(format!("it is the primary group of user {user}")));
    }
    if fs.is_host_root() {
        if let Some(pid) = process_with(gid, "Gid:") {
            return Ok(Some(format!("process {pid} runs with gid {gid}")));
        }
    }
    let places = service_dirs(fs, name);
    Ok(owned(watched, scanned, &places, |m| m.gid() == gid)
        .map(|p| format!("gid {gid} owns {}", p.display())))
}

/// Why user `name` (`uid`) may not be removed, if it owns anything
/// driftless can see: a process, a watched path, something in a scanned
/// directory, its home, or `/var/{lib,log,cache}/<name>` (where a
/// service's `StateDirectory=` and the like put its data).
fn user_owns(
    fs: &RootFs,
    name: &str,
    uid: u32,
    watched: &[PathBuf],
    scanned: &[PathBuf],
) -> Result<Option<String>> {
    if fs.is_host_root() {
        if let Some(pid) = process_with(uid, "Uid:") {
            return Ok(Some(format!("process {pid} runs as uid {uid}")));
        }
    }
    let mut places = service_dirs(fs, name);
    if let Some(home) = home_of(fs, name)?.filter(|h| h != "/" && h.starts_with('/')) {
        places.push(fs.path().join(home.trim_start_matches('/')));
    }
    Ok(owned(watched, scanned, &places, |m| m.uid() == uid)
        .map(|p| format!("uid {uid} owns {}", p.display())))
}

fn service_dirs(fs: &RootFs, name: &str) -> Vec<PathBuf> {
    ["var/lib", "var/log", "var/cache"]
        .iter()
        .map(|d| fs.path().join(d).join(name))
        .collect()
}

/// The first path that `owns`: among `watched` (the path itself), under
/// `scanned` and `places` (looked into).
fn owned(
    watched: &[PathBuf],
    scanned: &[PathBuf],
    places: &[PathBuf],
    owns: impl Fn(&std::fs::Metadata) -> bool + Copy,
) -> Option<PathBuf> {
    if let Some(p) = watched
        .iter()
        .find(|p| std::fs::symlink_metadata(p).is_ok_and(|m| owns(&m)))
    {
        return Some(p.clone());
    }
    scanned
        .iter()
        .chain(places)
        .find_map(|d| owned_under(d, owns))
}

fn home_of(fs: &RootFs, name: &str) -> Result<Option<String>> {
    if fs.is_host_root() {
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

/// The first entry under `dir` (itself included) that `owns`, looking at
/// no more than [`HOME_SCAN_LIMIT`] entries; past that the directory
/// counts as owned (the safe answer: the account is kept). Symlinks are
/// not followed; other filesystems are not entered.
fn owned_under(dir: &Path, owns: impl Fn(&std::fs::Metadata) -> bool) -> Option<PathBuf> {
    let top = std::fs::symlink_metadata(dir).ok()?;
    if owns(&top) {
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
            if owns(&m) {
                return Some(e.path());
            }
            if m.is_dir() && m.dev() == top.dev() {
                stack.push(e.path());
            }
        }
    }
    None
}

/// A process whose real, effective, saved or filesystem id on the
/// `/proc/PID/status` line `field` (`Uid:`, `Gid:`) is `id`.
fn process_with(id: u32, field: &str) -> Option<u32> {
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
            .find_map(|l| l.strip_prefix(field))
            .is_some_and(|ids| ids.split_whitespace().any(|i| i.parse() == Ok(id)));
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
}
