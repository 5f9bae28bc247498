//! Resolving user and group names to ids on the target system.
//!
//! On the live system (`--root /`) names go through NSS (`getpwnam`), so
//! LDAP or sssd users work. Under a `--root` prefix the prefix's own
//! `/etc/passwd` and `/etc/group` are read, like `systemd-tmpfiles --root`:
//! an image's users are not the build machine's.

use std::collections::BTreeSet;
use std::path::Path;

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
    let live = root.path() == Path::new("/");
    let passwd = if live {
        None
    } else {
        read_db(root, "etc/passwd")?
    };
    let group_db = if live {
        None
    } else {
        read_db(root, "etc/group")?
    };
    for u in users {
        if u.parse::<u32>().is_ok() {
            continue;
        }
        let id = if live {
            nix::unistd::User::from_name(u)
                .with_context(|| format!("cannot look up user {u:?}"))?
                .map(|x| x.uid.as_raw())
        } else {
            lookup(passwd.as_deref(), u).or_else(|| (u == "root").then_some(0))
        };
        let id = id.or_else(|| accounts.predicted_users.get(u).map(|p| p.0));
        if let Some(id) = id {
            ids.users.insert(u.to_string(), id);
        }
    }
    for g in groups {
        if g.parse::<u32>().is_ok() {
            continue;
        }
        let id = if live {
            nix::unistd::Group::from_name(g)
                .with_context(|| format!("cannot look up group {g:?}"))?
                .map(|x| x.gid.as_raw())
        } else {
            lookup(group_db.as_deref(), g).or_else(|| (g == "root").then_some(0))
        };
        let id = id.or_else(|| accounts.predicted_groups.get(g).copied());
        if let Some(id) = id {
            ids.groups.insert(g.to_string(), id);
        }
    }
    Ok(ids)
}

/// Largest passwd or group file read under `--root`.
const MAX_DB: u64 = 64 * 1024 * 1024;

/// An account database of the root, symlinks resolved inside it.
fn read_db(root: &RootFs, rel: &str) -> Result<Option<String>> {
    Ok(root
        .read_contained(rel, MAX_DB)?
        .map(|b| String::from_utf8_lossy(&b).into_owned()))
}

/// Finds `name` in a passwd/group style database (`name:x:id:...`).
fn lookup(db: Option<&str>, name: &str) -> Option<u32> {
    db?.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.next()?;
        f.next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lookup() {
        let db = "root:x:0:0::/root:/bin/sh\nwww-data:x:33:33::/var/www:/usr/sbin/nologin\n";
        assert_eq!(lookup(Some(db), "www-data"), Some(33));
        assert_eq!(lookup(Some(db), "nobody"), None);
    }
}
