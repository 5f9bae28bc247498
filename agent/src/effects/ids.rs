//! Resolving user and group names to ids on the target system.
//!
//! On the live system (`--root /`) names go through NSS (`getpwnam`), so
//! LDAP or sssd users work. Under a `--root` prefix the prefix's own
//! `/etc/passwd` and `/etc/group` are read, like `systemd-tmpfiles --root`:
//! an image's users are not the build machine's.

use std::collections::BTreeSet;

use anyhow::{Context, Result};

use crate::desired::render::Desired;
use crate::effects::rootfs::RootFs;
use crate::plan::Ids;

/// Resolves every owner and group name of `desired`; a name missing on
/// the host that `accounts` predicts (a user or group the commit creates)
/// gets its predicted id.
pub fn resolve(
    root: &RootFs,
    desired: &Desired,
    accounts: &crate::plan::accounts::ObservedAccounts,
) -> Result<Ids> {
    let euid = nix::unistd::geteuid();
    let egid = nix::unistd::getegid();
    let mut ids = Ids {
        apply_ownership: euid.is_root(),
        own_uid: euid.as_raw(),
        own_gid: egid.as_raw(),
        ..Default::default()
    };
    let users: BTreeSet<&str> = desired
        .files
        .iter()
        .map(|f| f.owner.0.as_str())
        .chain(desired.dirs.iter().map(|d| d.owner.0.as_str()))
        .collect();
    let groups: BTreeSet<&str> = desired
        .files
        .iter()
        .map(|f| f.group.0.as_str())
        .chain(desired.dirs.iter().map(|d| d.group.0.as_str()))
        .collect();
    let db = AccountDb::read(root)?;
    let live = db.files.is_none();
    for u in users {
        if u.parse::<u32>().is_ok() {
            continue;
        }
        let id = db
            .user(u)?
            .map(|(uid, _)| uid)
            .or_else(|| (!live && u == "root").then_some(0));
        let id = id.or_else(|| accounts.predicted_users.get(u).map(|p| p.0));
        if let Some(id) = id {
            ids.users.insert(u.to_string(), id);
        }
    }
    for g in groups {
        if g.parse::<u32>().is_ok() {
            continue;
        }
        let id = db
            .group(g)?
            .map(|(gid, _)| gid)
            .or_else(|| (!live && g == "root").then_some(0));
        let id = id.or_else(|| accounts.predicted_groups.get(g).copied());
        if let Some(id) = id {
            ids.groups.insert(g.to_string(), id);
        }
    }
    Ok(ids)
}

/// Largest passwd or group file read under `--root`.
const MAX_DB: u64 = 64 * 1024 * 1024;

/// The host's account databases: NSS on the live system, the root's
/// files under a prefix.
pub struct AccountDb {
    files: Option<(String, String)>,
}

impl AccountDb {
    pub fn read(fs: &RootFs) -> Result<AccountDb> {
        if fs.is_host_root() {
            return Ok(AccountDb { files: None });
        }
        let read = |rel: &str| -> Result<String> {
            Ok(fs
                .read_contained(rel, MAX_DB)?
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default())
        };
        Ok(AccountDb {
            files: Some((read("etc/passwd")?, read("etc/group")?)),
        })
    }

    /// `name`'s uid and primary gid.
    pub fn user(&self, name: &str) -> Result<Option<(u32, u32)>> {
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

    /// `name`'s gid and members.
    pub fn group(&self, name: &str) -> Result<Option<(u32, Vec<String>)>> {
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

    /// A user other than `except` with `gid` as primary group.
    pub fn primary_of(&self, gid: u32, except: Option<&str>) -> Result<Option<String>> {
        match &self.files {
            None => {
                // getpwent through NSS is not exposed by nix; the files
                // are what sysusers writes, so they are what is checked.
                let passwd =
                    std::fs::read_to_string("/etc/passwd").context("cannot read /etc/passwd")?;
                Ok(primary_in(&passwd, gid, except))
            }
            Some((passwd, _)) => Ok(primary_in(passwd, gid, except)),
        }
    }
}

fn primary_in(passwd: &str, gid: u32, except: Option<&str>) -> Option<String> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[3].parse::<u32>().ok() == Some(gid) && Some(f[0]) != except)
            .then(|| f[0].to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_and_group_lookup_under_a_prefix() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("etc")).unwrap();
        std::fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nwww-data:x:33:33::/var/www:/usr/sbin/nologin\n",
        )
        .unwrap();
        std::fs::write(d.path().join("etc/group"), "adm:x:4:syslog,www-data\n").unwrap();
        let db = AccountDb::read(&RootFs::open(d.path()).unwrap()).unwrap();
        assert_eq!(db.user("www-data").unwrap(), Some((33, 33)));
        assert_eq!(db.user("nobody").unwrap(), None);
        assert_eq!(
            db.group("adm").unwrap(),
            Some((4, vec!["syslog".to_string(), "www-data".to_string()]))
        );
    }

    #[test]
    fn a_primary_group_is_found_by_gid() {
        let passwd = "root:x:0:0::/root:/bin/sh\napp:x:994:995::/:/usr/sbin/nologin\n";
        assert_eq!(primary_in(passwd, 995, None), Some("app".into()));
        assert_eq!(primary_in(passwd, 995, Some("app")), None);
        assert_eq!(primary_in(passwd, 996, None), None);
    }
}
