//! The accounts part of a plan: which declared users, groups and
//! memberships the host lacks, with the ids `systemd-sysusers` predicted
//! for them (see `desired::accounts` for the model, `effects::accounts`
//! for how they are read, made and undone).
//!
//! Pure: the observation comes in as [`ObservedAccounts`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::desired::accounts::Accounts;
use crate::desired::Diagnostics;

/// What exists on the host of the accounts a commit declares or names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedAccounts {
    /// Existing users: name → (uid, primary gid).
    pub users: BTreeMap<String, (u32, u32)>,
    /// Existing groups: name → (gid, members).
    pub groups: BTreeMap<String, (u32, Vec<String>)>,
    /// What `systemd-sysusers --dry-run` would create: user → (uid, gid).
    pub predicted_users: BTreeMap<String, (u32, u32)>,
    /// group → gid.
    pub predicted_groups: BTreeMap<String, u32>,
    /// Accounts are managed (running as root). Otherwise nothing is
    /// created, and the plan says so.
    pub managed: bool,
}

/// One account change, in the order sysusers makes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum AccountChange {
    CreateGroup {
        name: String,
        gid: u32,
        /// Allocated by sysusers (a prediction), not declared.
        allocated: bool,
        role: String,
    },
    CreateUser {
        name: String,
        uid: u32,
        gid: u32,
        allocated: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        home: Option<String>,
        role: String,
    },
    AddMember {
        user: String,
        group: String,
        role: String,
    },
}

impl AccountChange {
    /// `("group", "create")`, `("user", "create")`, `("member", "add")`:
    /// how `status.resources` names it.
    pub fn kind_action(&self) -> (&'static str, &'static str) {
        match self {
            AccountChange::CreateGroup { .. } => ("group", "create"),
            AccountChange::CreateUser { .. } => ("user", "create"),
            AccountChange::AddMember { .. } => ("member", "add"),
        }
    }

    /// `+ group webadm (gid 995, allocated by systemd-sysusers)`.
    pub fn line(&self) -> String {
        let how = |allocated: bool| {
            if allocated {
                ", allocated by systemd-sysusers"
            } else {
                ""
            }
        };
        match self {
            AccountChange::CreateGroup {
                name,
                gid,
                allocated,
                role,
            } => format!("+ group {name} (gid {gid}{}; role {role})", how(*allocated)),
            AccountChange::CreateUser {
                name,
                uid,
                gid,
                allocated,
                home,
                role,
            } => {
                let home = home
                    .as_deref()
                    .map_or(String::new(), |h| format!(", home {h} (not created)"));
                format!(
                    "+ user {name} (uid {uid}, gid {gid}{}{home}; role {role})",
                    how(*allocated)
                )
            }
            AccountChange::AddMember { user, group, role } => {
                format!("+ member {user} of group {group} (role {role})")
            }
        }
    }
}

/// What differs between an existing account and its declaration, which
/// driftless never changes (sysusers' rule): said in the plan, so that a
/// pinned uid that is not what the host has does not go unnoticed.
pub fn notes(declared: &Accounts, observed: &ObservedAccounts) -> Vec<String> {
    let mut out = Vec::new();
    for u in &declared.users {
        let Some(&(uid, gid)) = observed.users.get(&u.name) else {
            continue;
        };
        if let Some(want) = u.uid.filter(|w| *w != uid) {
            out.push(format!(
                "user {} exists with uid {uid}, not the declared {want} ({}); an existing account is never changed",
                u.name, u.origin
            ));
        }
        let group = u.primary_group();
        if let Some((want, _)) = observed.groups.get(group).filter(|(g, _)| *g != gid) {
            out.push(format!(
                "user {} exists with primary gid {gid}, not {group}'s {want} ({}); an existing account is never changed",
                u.name, u.origin
            ));
        }
    }
    for g in &declared.groups {
        if let (Some(want), Some((gid, _))) = (g.gid, observed.groups.get(&g.name)) {
            if want != *gid {
                out.push(format!(
                    "group {} exists with gid {gid}, not the declared {want} ({}); an existing account is never changed",
                    g.name, g.origin
                ));
            }
        }
    }
    out
}

/// The hooks of a transaction that also makes `changes`: besides those it
/// runs already (`planned`), every `always` hook and the `on-change` ones
/// of the roles whose accounts change. A pre hook may not run as a user
/// the transaction creates (pre hooks run before the accounts stage).
pub fn with_hooks(
    declared: &[crate::desired::spec::Hook],
    planned: &[crate::desired::spec::Hook],
    changes: &[AccountChange],
) -> Result<Vec<crate::desired::spec::Hook>, Diagnostics> {
    use crate::desired::spec::{HookRun, HookWhen};
    if changes.is_empty() {
        return Ok(planned.to_vec());
    }
    let role_of = |c: &AccountChange| match c {
        AccountChange::CreateGroup { role, .. }
        | AccountChange::CreateUser { role, .. }
        | AccountChange::AddMember { role, .. } => role.clone(),
    };
    let roles: std::collections::BTreeSet<String> = changes.iter().map(role_of).collect();
    let hooks: Vec<_> = declared
        .iter()
        .filter(|h| planned.contains(h) || h.run == HookRun::Always || roles.contains(&h.role))
        .cloned()
        .collect();
    let mut diags = Diagnostics::default();
    for h in hooks.iter().filter(|h| h.when == HookWhen::Pre) {
        let Some(user) = &h.user else { continue };
        let created = changes
            .iter()
            .any(|c| matches!(c, AccountChange::CreateUser { name, .. } if *name == user.0));
        if created {
            diags.push(format!(
                "{}: this pre hook runs as user {}, which this commit creates; pre hooks run before \
                 the accounts are made: make it a post hook, or let the user exist first",
                h.origin, user.0
            ));
        }
    }
    if diags.is_empty() {
        Ok(hooks)
    } else {
        Err(diags)
    }
}

/// The accounts part of a transaction's journal: enough to undo it
/// without the plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountsRecord {
    /// The sysusers lines run.
    pub lines: Vec<String>,
    /// Users absent when the transaction was planned, with their uid.
    pub users: Vec<(String, u32)>,
    /// Groups absent when the transaction was planned, with their gid.
    pub groups: Vec<(String, u32)>,
    /// Memberships (user, group) absent when the transaction was planned.
    pub members: Vec<(String, String)>,
}

impl AccountsRecord {
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.groups.is_empty() && self.members.is_empty()
    }

    /// The record of `changes`, which `lines` carry out.
    pub fn of(changes: &[AccountChange], lines: Vec<String>) -> AccountsRecord {
        let mut r = AccountsRecord {
            lines,
            ..Default::default()
        };
        for c in changes {
            match c {
                AccountChange::CreateGroup { name, gid, .. } => r.groups.push((name.clone(), *gid)),
                AccountChange::CreateUser { name, uid, .. } => r.users.push((name.clone(), *uid)),
                AccountChange::AddMember { user, group, .. } => {
                    r.members.push((user.clone(), group.clone()))
                }
            }
        }
        r
    }
}

/// The changes that bring the host's accounts to `declared`.
pub fn diff(
    declared: &Accounts,
    observed: &ObservedAccounts,
) -> Result<Vec<AccountChange>, Diagnostics> {
    let mut diags = Diagnostics::default();
    let mut changes = Vec::new();
    if !observed.managed || declared.is_empty() {
        return Ok(changes);
    }
    let predicted_gid = |name: &str| observed.predicted_groups.get(name).copied();
    let mut creating_groups: BTreeMap<&str, ()> = BTreeMap::new();
    for g in &declared.groups {
        if observed.groups.contains_key(&g.name) {
            continue;
        }
        match predicted_gid(&g.name) {
            Some(gid) if g.gid.is_some_and(|want| want != gid) => diags.push(format!(
                "{}: gid {} of group {} is taken on this host (systemd-sysusers would allocate {gid}); \
                 free it, or remove `gid` to let sysusers allocate one",
                g.origin,
                g.gid.unwrap_or_default(),
                g.name
            )),
            Some(gid) => {
                creating_groups.insert(&g.name, ());
                changes.push(AccountChange::CreateGroup {
                    name: g.name.clone(),
                    gid,
                    allocated: g.gid.is_none(),
                    role: g.role.clone(),
                });
            }
            None => diags.push(format!(
                "{}: systemd-sysusers would not create group {} (its dry run did not say so); \
                 is the name or gid taken by another account?",
                g.origin, g.name
            )),
        }
    }
    let group_known = |name: &str, creating: &BTreeMap<&str, ()>| {
        observed.groups.contains_key(name)
            || creating.contains_key(name)
            || declared.declares_group(name)
    };
    for u in &declared.users {
        if let Some(g) = &u.group {
            if !group_known(g, &creating_groups) {
                diags.push(format!(
                    "{}: group {g:?} (primary group of user {}) is neither declared in [[groups]] nor on this host",
                    u.origin, u.name
                ));
                continue;
            }
        }
        if !observed.users.contains_key(&u.name) {
            if let Some(own) = u.implicit_group() {
                if !observed.groups.contains_key(own) && !creating_groups.contains_key(own) {
                    match predicted_gid(own) {
                        Some(gid) => {
                            changes.push(AccountChange::CreateGroup {
                                name: own.to_string(),
                                gid,
                                allocated: u.uid.is_none_or(|uid| uid != gid),
                                role: u.role.clone(),
                            });
                        }
                        None => {
                            // sysusers may reuse a group of that name
                            // declared elsewhere; otherwise it must say.
                            if !declared.groups.iter().any(|g| g.name == own) {
                                diags.push(format!(
                                    "{}: systemd-sysusers would not create group {own} for user {} (its dry run did not say so)",
                                    u.origin, u.name
                                ));
                            }
                        }
                    }
                }
            }
            match observed.predicted_users.get(&u.name) {
                Some(&(uid, _)) if u.uid.is_some_and(|want| want != uid) => {
                    diags.push(format!(
                        "{}: uid {} of user {} is taken on this host (systemd-sysusers would allocate {uid}); \
                         free it, or remove `uid` to let sysusers allocate one",
                        u.origin,
                        u.uid.unwrap_or_default(),
                        u.name
                    ));
                    continue;
                }
                Some(&(uid, gid)) => changes.push(AccountChange::CreateUser {
                    name: u.name.clone(),
                    uid,
                    gid,
                    allocated: u.uid.is_none(),
                    home: u.home.clone(),
                    role: u.role.clone(),
                }),
                None => {
                    diags.push(format!(
                        "{}: systemd-sysusers would not create user {} (its dry run did not say so); \
                         is the uid taken by another account?",
                        u.origin, u.name
                    ));
                    continue;
                }
            }
        }
        for g in &u.members_of {
            if !group_known(g, &creating_groups) {
                diags.push(format!(
                    "{}: group {g:?} (in members_of of user {}) is neither declared in [[groups]] nor on this host",
                    u.origin, u.name
                ));
                continue;
            }
            let member = observed
                .groups
                .get(g)
                .is_some_and(|(_, m)| m.contains(&u.name));
            if !member {
                changes.push(AccountChange::AddMember {
                    user: u.name.clone(),
                    group: g.clone(),
                    role: u.role.clone(),
                });
            }
        }
    }
    if diags.is_empty() {
        // Groups first, then users, then memberships: sysusers' order.
        changes.sort_by_key(|c| match c {
            AccountChange::CreateGroup { .. } => 0,
            AccountChange::CreateUser { .. } => 1,
            AccountChange::AddMember { .. } => 2,
        });
        Ok(changes)
    } else {
        Err(diags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::accounts::{group_decl, user_decl, GroupSpec, UserSpec};

    fn user(name: &str, group: Option<&str>, members_of: &[&str]) -> UserSpec {
        UserSpec {
            name: name.into(),
            uid: None,
            group: group.map(str::to_string),
            members_of: members_of.iter().map(|s| s.to_string()).collect(),
            home: None,
            shell: None,
            description: None,
            allow_regular_ids: false,
        }
    }

    fn declared() -> Accounts {
        Accounts {
            groups: vec![group_decl(
                "web",
                "roles/web/role.toml:1 groups[0]",
                GroupSpec {
                    name: "webadm".into(),
                    gid: None,
                    allow_regular_ids: false,
                },
            )
            .unwrap()],
            users: vec![
                user_decl(
                    "web",
                    "roles/web/role.toml:4 users[0]",
                    user("app", Some("webadm"), &["adm"]),
                )
                .unwrap(),
                user_decl(
                    "web",
                    "roles/web/role.toml:9 users[1]",
                    user("worker", None, &[]),
                )
                .unwrap(),
            ],
        }
    }

    fn host() -> ObservedAccounts {
        ObservedAccounts {
            groups: BTreeMap::from([("adm".to_string(), (4, vec!["syslog".to_string()]))]),
            managed: true,
            ..Default::default()
        }
    }

    #[test]
    fn a_fresh_host_gets_groups_then_users_then_memberships_with_the_predicted_ids() {
        let mut obs = host();
        obs.predicted_groups = BTreeMap::from([("webadm".into(), 995), ("worker".into(), 993)]);
        obs.predicted_users =
            BTreeMap::from([("app".into(), (994, 995)), ("worker".into(), (993, 993))]);
        let changes = diff(&declared(), &obs).unwrap();
        let lines: Vec<String> = changes.iter().map(AccountChange::line).collect();
        assert_eq!(
            lines,
            [
                "+ group webadm (gid 995, allocated by systemd-sysusers; role web)",
                "+ group worker (gid 993, allocated by systemd-sysusers; role web)",
                "+ user app (uid 994, gid 995, allocated by systemd-sysusers; role web)",
                "+ user worker (uid 993, gid 993, allocated by systemd-sysusers; role web)",
                "+ member app of group adm (role web)",
            ]
        );
        let record = AccountsRecord::of(&changes, vec![]);
        assert_eq!(record.users, [("app".into(), 994), ("worker".into(), 993)]);
        assert_eq!(record.members, [("app".into(), "adm".into())]);
    }

    #[test]
    fn existing_accounts_and_memberships_are_no_change() {
        let mut obs = host();
        obs.groups.insert("webadm".into(), (995, vec![]));
        obs.groups.insert("worker".into(), (993, vec![]));
        obs.groups.get_mut("adm").unwrap().1.push("app".into());
        obs.users.insert("app".into(), (994, 995));
        obs.users.insert("worker".into(), (993, 993));
        assert_eq!(diff(&declared(), &obs).unwrap(), []);
    }

    #[test]
    fn a_group_neither_declared_nor_on_the_host_is_refused_with_its_line() {
        let mut d = declared();
        d.users[0].members_of = vec!["docker".into()];
        let mut obs = host();
        obs.predicted_groups = BTreeMap::from([("webadm".into(), 995), ("worker".into(), 993)]);
        obs.predicted_users =
            BTreeMap::from([("app".into(), (994, 995)), ("worker".into(), (993, 993))]);
        let e = diff(&d, &obs).unwrap_err().to_string();
        assert_eq!(
            e,
            "roles/web/role.toml:4 users[0]: group \"docker\" (in members_of of user app) is neither declared in [[groups]] nor on this host"
        );
    }

    #[test]
    fn a_missing_prediction_is_an_error_not_a_guess() {
        let obs = host();
        let e = diff(&declared(), &obs).unwrap_err().to_string();
        assert!(e.contains("would not create group webadm"), "{e}");
    }

    #[test]
    fn a_declared_id_that_is_taken_is_refused_not_silently_replaced() {
        let mut d = declared();
        d.users[1].uid = Some(850);
        d.groups[0].gid = Some(900);
        let mut obs = host();
        // What sysusers predicts when 850 and 900 are taken.
        obs.predicted_groups = BTreeMap::from([("webadm".into(), 999), ("worker".into(), 998)]);
        obs.predicted_users =
            BTreeMap::from([("app".into(), (997, 999)), ("worker".into(), (998, 998))]);
        let e = diff(&d, &obs).unwrap_err().to_string();
        assert!(e.contains("roles/web/role.toml:1 groups[0]: gid 900 of group webadm is taken on this host (systemd-sysusers would allocate 999)"), "{e}");
        assert!(
            e.contains(
                "roles/web/role.toml:9 users[1]: uid 850 of user worker is taken on this host"
            ),
            "{e}"
        );
    }

    #[test]
    fn an_existing_account_unlike_its_declaration_is_noted_not_changed() {
        let mut d = declared();
        d.users[1].uid = Some(850);
        let mut obs = host();
        obs.groups.insert("webadm".into(), (995, vec![]));
        obs.groups.insert("worker".into(), (990, vec![]));
        obs.users.insert("app".into(), (994, 4));
        obs.users.insert("worker".into(), (990, 990));
        assert_eq!(
            notes(&d, &obs),
            [
                "user app exists with primary gid 4, not webadm's 995 (roles/web/role.toml:4 users[0]); an existing account is never changed",
                "user worker exists with uid 990, not the declared 850 (roles/web/role.toml:9 users[1]); an existing account is never changed",
            ]
        );
    }

    #[test]
    fn unmanaged_accounts_plan_nothing() {
        let mut obs = host();
        obs.managed = false;
        assert_eq!(diff(&declared(), &obs).unwrap(), []);
    }
}
