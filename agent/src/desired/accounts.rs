//! `[[users]]` and `[[groups]]`: system accounts a role needs, the systemd
//! way.
//!
//! ```toml
//! [[groups]]
//! name = "webadm"
//! gid = 851                        # optional: systemd-sysusers allocates one
//!
//! [[users]]
//! name = "app"
//! uid = 850                        # optional
//! group = "webadm"                 # primary group; default: one named like the user
//! members_of = ["adm"]             # supplementary groups (sysusers `m` lines)
//! home = "/var/lib/app"            # default "/" (sysusers never creates it)
//! description = "App service"
//! shell = "/usr/sbin/nologin"      # default (sysusers' own)
//! ```
//!
//! Why sysusers and not `useradd`: a `sysusers.d` fragment is declarative
//! and idempotent (an existing account is never modified), allocates ids
//! from the system range without colliding with NSS users, and is what
//! systemd itself runs at boot. So each role's accounts become two things:
//!
//! - one managed file, `/etc/sysusers.d/driftless-<role>.conf`, written,
//!   reverted and pruned like any file (`systemd-sysusers.service` then
//!   recreates a deleted account at the next boot, as for a package's own
//!   fragment); and
//! - an accounts stage of the transaction (`effects::accounts`), which runs
//!   `systemd-sysusers` on the same lines *before* any file is staged, so a
//!   file in the same commit can be owned by a user created by it.
//!
//! Existing accounts are never changed (sysusers' own rule): a declared
//! `uid`, `home` or `shell` that differs from an existing account's is not
//! drift driftless repairs. Accounts that leave the repository stay
//! ("forgetting is not removing": a user that vanishes while its files stay
//! on disk is how uids get reused). Only an account the failing
//! transaction itself created is removed by its revert, and only if it owns
//! nothing else (see `effects::accounts::undo`).
//!
//! Every value that reaches a sysusers line is validated here to a
//! character set that needs no quoting beyond `"…"` around the
//! description: nothing in a role can add a line or a field.

use serde::Deserialize;

/// Where the fragments go, and their prefix (`driftless-<role>.conf`).
pub const SYSUSERS_DIR: &str = "/etc/sysusers.d";

/// One `[[users]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    pub name: String,
    /// Fixed uid; default: allocated by systemd-sysusers.
    #[serde(default)]
    pub uid: Option<u32>,
    /// Primary group (a name); default: a group named like the user,
    /// created with it.
    #[serde(default)]
    pub group: Option<String>,
    /// Supplementary groups; each must be declared or exist on the host.
    #[serde(default)]
    pub members_of: Vec<String>,
    /// Home directory (an absolute path); default "/". Not created.
    #[serde(default)]
    pub home: Option<String>,
    /// Login shell; default sysusers' (`/usr/sbin/nologin`).
    #[serde(default)]
    pub shell: Option<String>,
    /// GECOS field.
    #[serde(default)]
    pub description: Option<String>,
    /// Allow a `uid` outside the system range (1–999).
    #[serde(default)]
    pub allow_regular_ids: bool,
}

/// One `[[groups]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    pub name: String,
    /// Fixed gid; default: allocated by systemd-sysusers.
    #[serde(default)]
    pub gid: Option<u32>,
    /// Allow a `gid` outside the system range (1–999).
    #[serde(default)]
    pub allow_regular_ids: bool,
}

/// A validated `[[users]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDecl {
    pub name: String,
    pub uid: Option<u32>,
    /// `None`: the same-named group sysusers creates with the user.
    pub group: Option<String>,
    pub members_of: Vec<String>,
    pub home: Option<String>,
    pub shell: Option<String>,
    pub description: Option<String>,
    pub role: String,
    /// `roles/app/role.toml:4 users[0]`.
    pub origin: String,
}

impl UserDecl {
    /// The group sysusers creates with the user when no `group` is named
    /// (and none of that name exists).
    pub fn implicit_group(&self) -> Option<&str> {
        self.group.is_none().then_some(self.name.as_str())
    }

    /// The primary group's name.
    pub fn primary_group(&self) -> &str {
        self.group.as_deref().unwrap_or(&self.name)
    }
}

/// A validated `[[groups]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupDecl {
    pub name: String,
    pub gid: Option<u32>,
    pub role: String,
    pub origin: String,
}

/// Every account the host's roles declare, groups before users (the order
/// sysusers needs), each in role order, then declaration order.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Accounts {
    pub groups: Vec<GroupDecl>,
    pub users: Vec<UserDecl>,
}

impl Accounts {
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty() && self.users.is_empty()
    }

    /// Whether `name` is a user this commit declares.
    pub fn declares_user(&self, name: &str) -> bool {
        self.users.iter().any(|u| u.name == name)
    }

    /// Whether `name` is a group this commit declares, explicitly or as a
    /// user's own group.
    pub fn declares_group(&self, name: &str) -> bool {
        self.groups.iter().any(|g| g.name == name)
            || self.users.iter().any(|u| u.implicit_group() == Some(name))
    }

    /// The sysusers lines of every account: `g` lines, then `u`, then `m`.
    pub fn lines(&self) -> Vec<String> {
        lines(&self.groups, &self.users)
    }
}

/// The sysusers.d lines for `groups` and `users`, in the order sysusers
/// needs (a group before a user naming it, a user before its `m` lines).
pub fn lines(groups: &[GroupDecl], users: &[UserDecl]) -> Vec<String> {
    let mut out = Vec::new();
    for g in groups {
        out.push(format!("g {} {}", g.name, id_field(g.gid)));
    }
    for u in users {
        let id = match (&u.group, u.uid) {
            (None, uid) => id_field(uid),
            (Some(g), uid) => format!("{}:{g}", id_field(uid)),
        };
        out.push(format!(
            "u {} {id} {} {} {}",
            u.name,
            u.description
                .as_deref()
                .map_or("-".to_string(), |d| format!("\"{d}\"")),
            u.home.as_deref().unwrap_or("-"),
            u.shell.as_deref().unwrap_or("-"),
        ));
    }
    for u in users {
        for g in &u.members_of {
            out.push(format!("m {} {g}", u.name));
        }
    }
    out
}

/// The fragment file of one role: a header, then its lines.
pub fn fragment(role: &str, groups: &[GroupDecl], users: &[UserDecl]) -> Vec<u8> {
    let mut text = format!(
        "# Managed by driftless (roles/{role}/role.toml: [[users]], [[groups]]).\n\
         # Applied by driftless before the files of each commit, and by\n\
         # systemd-sysusers.service at boot. Edits here are overwritten.\n"
    );
    for l in lines(groups, users) {
        text.push_str(&l);
        text.push('\n');
    }
    text.into_bytes()
}

/// The fragment's path for `role`.
pub fn fragment_path(role: &str) -> String {
    format!("{SYSUSERS_DIR}/driftless-{role}.conf")
}

fn id_field(id: Option<u32>) -> String {
    id.map_or("-".to_string(), |i| i.to_string())
}

/// A user or group name sysusers accepts and no field can be smuggled
/// through: `[a-z_][a-z0-9_-]*`, at most 31 characters (systemd's strict
/// rule, minus upper case, which Debian's tools refuse by default).
pub fn check_name(name: &str, key: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 31
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "key `{key}`: {name:?} is not a valid account name: use at most 31 characters \
             of a-z, 0-9, `_` and `-`, starting with a letter or `_`"
        ))
    }
}

/// The id ranges an account may ask for: the system range unless the
/// entry allows regular ids; never 0 (root exists) nor the placeholders
/// 65534 (nobody), 65535 and 4294967295.
fn check_id(id: u32, key: &str, allow_regular: bool) -> Result<(), String> {
    if id == 0 || id == 65534 || id == 65535 || id == u32::MAX {
        return Err(format!(
            "key `{key}`: {id} is reserved (root, nobody, or a placeholder systemd refuses)"
        ));
    }
    if id >= 1000 && !allow_regular {
        return Err(format!(
            "key `{key}`: {id} is outside the system range 1-999; \
             set allow_regular_ids = true if a regular id is really meant"
        ));
    }
    if id >= 0x8000_0000 {
        return Err(format!(
            "key `{key}`: {id} is in the upper half of the id range, which systemd reserves"
        ));
    }
    Ok(())
}

/// An absolute path for `home` or `shell`: no whitespace, quote, `:` or
/// control character (each would end the field in sysusers or passwd).
fn check_path_field(value: &str, key: &str) -> Result<(), String> {
    if !value.starts_with('/')
        || value.len() > 256
        || value.chars().any(|c| {
            c.is_whitespace() || c.is_control() || matches!(c, ':' | '"' | '\'' | '\\' | '%')
        })
    {
        return Err(format!(
            "key `{key}`: {value:?} must be an absolute path without spaces, quotes, `:`, `%` or `\\`"
        ));
    }
    Ok(())
}

/// The description (GECOS): printable, no `:` (the passwd separator), no
/// quote or backslash (sysusers' quoting), at most 128 characters.
fn check_description(value: &str) -> Result<(), String> {
    if value.is_empty()
        || value.chars().count() > 128
        || value
            .chars()
            .any(|c| c.is_control() || matches!(c, ':' | '"' | '\\' | '%'))
    {
        return Err(format!(
            "key `description`: {value:?} must be 1 to 128 printable characters without `:`, `\"`, `%` or `\\` \
             (sysusers would expand `%` specifiers)"
        ));
    }
    Ok(())
}

pub fn user_decl(role: &str, origin: &str, spec: UserSpec) -> Result<UserDecl, String> {
    check_name(&spec.name, "name")?;
    if spec.name == "root" {
        return Err("key `name`: root always exists; declare the accounts a role adds".into());
    }
    if let Some(uid) = spec.uid {
        check_id(uid, "uid", spec.allow_regular_ids)?;
    }
    if let Some(g) = &spec.group {
        check_name(g, "group")?;
    }
    let mut seen = std::collections::BTreeSet::new();
    for g in &spec.members_of {
        check_name(g, "members_of")?;
        if !seen.insert(g) {
            return Err(format!("key `members_of`: {g:?} is listed twice"));
        }
        if *g == spec.name && spec.group.is_none() || spec.group.as_ref() == Some(g) {
            return Err(format!(
                "key `members_of`: {g:?} is the user's primary group already"
            ));
        }
    }
    if let Some(h) = &spec.home {
        check_path_field(h, "home")?;
    }
    if let Some(s) = &spec.shell {
        check_path_field(s, "shell")?;
    }
    if let Some(d) = &spec.description {
        check_description(d)?;
    }
    Ok(UserDecl {
        name: spec.name,
        uid: spec.uid,
        group: spec.group,
        members_of: spec.members_of,
        home: spec.home,
        shell: spec.shell,
        description: spec.description,
        role: role.to_string(),
        origin: origin.to_string(),
    })
}

pub fn group_decl(role: &str, origin: &str, spec: GroupSpec) -> Result<GroupDecl, String> {
    check_name(&spec.name, "name")?;
    if spec.name == "root" {
        return Err("key `name`: root always exists; declare the groups a role adds".into());
    }
    if let Some(gid) = spec.gid {
        check_id(gid, "gid", spec.allow_regular_ids)?;
    }
    Ok(GroupDecl {
        name: spec.name,
        gid: spec.gid,
        role: role.to_string(),
        origin: origin.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> UserSpec {
        UserSpec {
            name: name.into(),
            uid: None,
            group: None,
            members_of: vec![],
            home: None,
            shell: None,
            description: None,
            allow_regular_ids: false,
        }
    }

    #[test]
    fn lines_put_groups_first_and_memberships_last() {
        let g = group_decl(
            "a",
            "o",
            GroupSpec {
                name: "webadm".into(),
                gid: Some(851),
                allow_regular_ids: false,
            },
        )
        .unwrap();
        let mut spec = user("app");
        spec.group = Some("webadm".into());
        spec.members_of = vec!["adm".into()];
        spec.description = Some("App service".into());
        spec.home = Some("/var/lib/app".into());
        let u = user_decl("a", "o", spec).unwrap();
        let plain = user_decl("a", "o", user("worker")).unwrap();
        assert_eq!(
            lines(&[g], &[u, plain]),
            [
                "g webadm 851",
                "u app -:webadm \"App service\" /var/lib/app -",
                "u worker - - - -",
                "m app adm",
            ]
        );
    }

    #[test]
    fn nothing_in_a_role_can_add_a_sysusers_line_or_field() {
        for bad in [
            "app\nu evil",
            "app x",
            "App",
            "1app",
            "",
            "a:b",
            &"a".repeat(32),
        ] {
            assert!(user_decl("a", "o", user(bad)).is_err(), "{bad:?}");
        }
        for (key, value) in [
            ("description", "x\"y"),
            ("description", "a:b"),
            ("description", "line\nu evil - - - -"),
            ("home", "relative"),
            ("home", "/var/lib/a b"),
            ("home", "/srv/%v"),
            ("description", "on %H"),
            ("shell", "/bin/sh\n"),
        ] {
            let mut spec = user("app");
            match key {
                "description" => spec.description = Some(value.into()),
                "home" => spec.home = Some(value.into()),
                _ => spec.shell = Some(value.into()),
            }
            let e = user_decl("a", "o", spec).unwrap_err();
            assert!(e.contains(key), "{e}");
        }
    }

    #[test]
    fn ids_stay_in_the_system_range_unless_allowed() {
        for (uid, ok) in [(0, false), (850, true), (1000, false), (65534, false)] {
            let mut spec = user("app");
            spec.uid = Some(uid);
            assert_eq!(user_decl("a", "o", spec).is_ok(), ok, "{uid}");
        }
        let mut spec = user("app");
        spec.uid = Some(2000);
        spec.allow_regular_ids = true;
        assert!(user_decl("a", "o", spec).is_ok());
    }

    #[test]
    fn a_membership_in_the_primary_group_or_twice_is_refused() {
        let mut spec = user("app");
        spec.members_of = vec!["app".into()];
        assert!(user_decl("a", "o", spec).is_err());
        let mut spec = user("app");
        spec.members_of = vec!["adm".into(), "adm".into()];
        assert!(user_decl("a", "o", spec).is_err());
    }
}
