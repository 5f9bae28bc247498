//! The packages part of a plan: what apt must install, change or remove
//! so that the declared packages are as declared, with what apt would do
//! besides (dependencies, and removals nobody asked for, which are
//! refused), and whether each change can be undone.
//!
//! Pure: the observation (`dpkg-query`, `apt-get -s`) comes in as
//! [`ObservedPackages`]; `effects::packages` makes it and carries the
//! changes out.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::desired::packages::PackageDecl;
use crate::desired::Diagnostics;

/// What the host has of the packages involved, and what apt would do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedPackages {
    /// Installed packages (dpkg's current state "installed", no error
    /// flag): name → version. Half-installed ones are refused before a
    /// plan is made (`effects::packages::observe`).
    pub installed: BTreeMap<String, String>,
    /// What apt is given, for the simulation and the change alike: the
    /// declarations the host does not satisfy yet (`name`, `name=version`,
    /// `name-`). A satisfied one is left out, so apt never marks an
    /// automatically installed package manual behind the plan's back.
    pub args: Vec<String>,
    /// `apt-get -s install -y …` of `args`, when anything must change.
    pub simulation: Option<Simulation>,
    /// What apt refused in the simulation, each line naming the entry it
    /// is about (`roles/web/role.toml:3 packages[0]: Unable to locate
    /// package nginx-ligth`).
    pub refused: Vec<String>,
    /// Old versions whose `.deb` can be had again (the apt cache or a
    /// configured source): name → version.
    pub reinstallable: BTreeMap<String, String>,
    /// Packages are changed here (running as root on the live system).
    pub managed: bool,
}

/// What `apt-get -s install …` says it would do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Simulation {
    /// `Inst name [old] (new …)`: name → (old, new).
    pub installs: BTreeMap<String, (Option<String>, String)>,
    /// `Remv name [old]` (and `Purg`, which the same options never make):
    /// name → old.
    pub removes: BTreeMap<String, String>,
}

impl Simulation {
    /// Every package apt would touch, and its version after (`None`:
    /// removed).
    pub fn effect(&self) -> BTreeMap<String, Option<String>> {
        self.installs
            .iter()
            .map(|(n, (_, new))| (n.clone(), Some(new.clone())))
            .chain(self.removes.keys().map(|n| (n.clone(), None)))
            .collect()
    }
}

/// One package change, in apt's terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum PackageChange {
    Install {
        name: String,
        version: String,
        /// A dependency apt pulls in, not declared.
        #[serde(skip_serializing_if = "Option::is_none")]
        role: Option<String>,
    },
    Change {
        name: String,
        from: String,
        to: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        role: Option<String>,
        /// `from` cannot be reinstalled by an undo.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        irreversible: bool,
    },
    Remove {
        name: String,
        version: String,
        role: String,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        irreversible: bool,
    },
}

impl PackageChange {
    pub fn name(&self) -> &str {
        match self {
            PackageChange::Install { name, .. }
            | PackageChange::Change { name, .. }
            | PackageChange::Remove { name, .. } => name,
        }
    }

    /// Irreversible: an undo cannot put the previous version back.
    pub fn irreversible(&self) -> bool {
        match self {
            PackageChange::Install { .. } => false,
            PackageChange::Change { irreversible, .. }
            | PackageChange::Remove { irreversible, .. } => *irreversible,
        }
    }

    /// `+ install nginx-light 1.22.1-9 (role web)`.
    pub fn line(&self) -> String {
        let irr = |i: bool, what: &str| {
            if i {
                format!("  [irreversible: {what} is in no configured source and not in /var/cache/apt/archives]")
            } else {
                String::new()
            }
        };
        match self {
            PackageChange::Install {
                name,
                version,
                role,
            } => match role {
                Some(r) => format!("+ install {name} {version} (role {r})"),
                None => format!("+ install {name} {version} (a dependency)"),
            },
            PackageChange::Change {
                name,
                from,
                to,
                role,
                irreversible,
            } => format!(
                "~ {} {name} {from} -> {to}{}{}",
                if role.is_some() {
                    "change"
                } else {
                    "change dependency"
                },
                role.as_ref()
                    .map_or(String::new(), |r| format!(" (role {r})")),
                irr(*irreversible, &format!("{name} {from}"))
            ),
            PackageChange::Remove {
                name,
                version,
                role,
                irreversible,
            } => format!(
                "- remove {name} {version} (role {role}){}",
                irr(*irreversible, &format!("{name} {version}"))
            ),
        }
    }
}

/// The packages part of a transaction's journal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackagesRecord {
    /// What `apt-get install` is given: `name`, `name=version`, `name-`
    /// (the simulation was given the same).
    pub args: Vec<String>,
    /// Every package the change touches and its version before (`None`:
    /// not installed).
    pub before: Vec<(String, Option<String>)>,
    /// The same packages' versions after (`None`: removed): what the plan
    /// showed, and once apt ran, what dpkg says it did. The undo leaves a
    /// package alone that is at neither version (someone else changed it
    /// since).
    #[serde(default)]
    pub after: Vec<(String, Option<String>)>,
    /// Packages whose change the plan showed as irreversible: the only
    /// ones whose old `.deb` may be missing when apt runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub irreversible: Vec<String>,
}

impl PackagesRecord {
    pub fn of(args: &[String], changes: &[PackageChange]) -> PackagesRecord {
        if changes.is_empty() {
            return PackagesRecord::default();
        }
        let (before, after) = changes
            .iter()
            .map(|c| match c {
                PackageChange::Install { name, version, .. } => {
                    ((name.clone(), None), (name.clone(), Some(version.clone())))
                }
                PackageChange::Change { name, from, to, .. } => (
                    (name.clone(), Some(from.clone())),
                    (name.clone(), Some(to.clone())),
                ),
                PackageChange::Remove { name, version, .. } => {
                    ((name.clone(), Some(version.clone())), (name.clone(), None))
                }
            })
            .unzip();
        PackagesRecord {
            args: args.to_vec(),
            before,
            after,
            irreversible: changes
                .iter()
                .filter(|c| c.irreversible())
                .map(|c| c.name().to_string())
                .collect(),
        }
    }

    /// What the plan expects apt to do: every touched package's version
    /// after (`None`: removed).
    pub fn expected(&self) -> BTreeMap<String, Option<String>> {
        self.after.iter().cloned().collect()
    }
}

/// The changes that bring the host's packages to `declared`.
pub fn diff(
    declared: &[PackageDecl],
    observed: &ObservedPackages,
) -> Result<Vec<PackageChange>, Diagnostics> {
    let mut diags = Diagnostics::default();
    let mut changes = Vec::new();
    if !observed.managed || declared.is_empty() {
        return Ok(changes);
    }
    if !observed.refused.is_empty() {
        for r in &observed.refused {
            diags.push(r.clone());
        }
        return Err(diags);
    }
    let sim = observed.simulation.clone().unwrap_or_default();
    let reversible = |name: &str, version: &str| {
        observed
            .reinstallable
            .get(name)
            .is_some_and(|v| v == version)
    };
    for d in declared {
        let name = d.name.as_str();
        let have = observed.installed.get(name);
        match (d.present, have) {
            (false, None) => {}
            (false, Some(v)) => changes.push(PackageChange::Remove {
                name: name.to_string(),
                version: v.clone(),
                role: d.role.clone(),
                irreversible: !reversible(name, v),
            }),
            (true, Some(v)) if d.version.as_ref().is_none_or(|want| want == v) => {}
            (true, have) => match sim.installs.get(name) {
                Some((_, new)) => match have {
                    None => changes.push(PackageChange::Install {
                        name: name.to_string(),
                        version: new.clone(),
                        role: Some(d.role.clone()),
                    }),
                    Some(old) => changes.push(PackageChange::Change {
                        name: name.to_string(),
                        from: old.clone(),
                        to: new.clone(),
                        role: Some(d.role.clone()),
                        irreversible: !reversible(name, old),
                    }),
                },
                // apt accepted the name but installs nothing by it: a
                // virtual package (apt chose a provider, which dpkg will
                // never report under this name).
                None => diags.push(format!(
                    "{}: apt installs no package named {}{}: it is a virtual package, or no configured source has it; declare the real package (`apt-cache showpkg {}` lists the providers), or run apt-get update",
                    d.origin,
                    d.name,
                    d.version.as_ref().map_or(String::new(), |v| format!(" at version {v}")),
                    d.name,
                )),
            },
        }
    }
    // What apt would do besides: dependencies (and a declared package
    // already as declared that apt changes along) are shown; removals no
    // role declares are refused (apt decided them, not the repository).
    // Everything apt would do is in the plan, so the stage's check of
    // apt's effect against it never fails on a side effect.
    let changed: std::collections::BTreeSet<String> =
        changes.iter().map(|c| c.name().to_string()).collect();
    for (name, (old, new)) in &sim.installs {
        if changed.contains(name) {
            continue;
        }
        changes.push(match old {
            None => PackageChange::Install {
                name: name.clone(),
                version: new.clone(),
                role: None,
            },
            Some(old) => PackageChange::Change {
                name: name.clone(),
                from: old.clone(),
                to: new.clone(),
                role: None,
                irreversible: !reversible(name, old),
            },
        });
    }
    for (name, old) in &sim.removes {
        if changed.contains(name) {
            continue;
        }
        if let Some(d) = declared.iter().find(|d| d.present && d.name == *name) {
            diags.push(format!(
                "{}: apt would remove {name} {old}, which this entry declares present; \
                 change what makes apt remove it",
                d.origin
            ));
            continue;
        }
        let why = declared
            .iter()
            .map(|d| d.origin.as_str())
            .next()
            .unwrap_or("[[packages]]");
        diags.push(format!(
            "{why}: apt would also remove {name} {old}, which no role declares absent; \
             declare it absent, or change what makes apt remove it"
        ));
    }
    if diags.is_empty() {
        Ok(changes)
    } else {
        Err(diags)
    }
}

/// Parses `apt-get -s` output: `Inst`/`Remv`/`Purg` lines. An
/// architecture-qualified name (`libc6:amd64`) counts under its package
/// name, as dpkg-query prints it.
pub fn parse_simulation(text: &str) -> Simulation {
    let mut sim = Simulation::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Inst"), Some(name)) => {
                let rest: Vec<&str> = words.collect();
                let (old, rest) = match rest.first() {
                    Some(w) if w.starts_with('[') => (
                        Some(w.trim_matches(|c| c == '[' || c == ']').to_string()),
                        &rest[1..],
                    ),
                    _ => (None, &rest[..]),
                };
                if let Some(new) = rest.first().map(|w| w.trim_start_matches('(')) {
                    sim.installs
                        .insert(unqualified(name).to_string(), (old, new.to_string()));
                }
            }
            (Some("Remv" | "Purg"), Some(name)) => {
                let old = words
                    .next()
                    .map(|w| w.trim_matches(|c| c == '[' || c == ']').to_string())
                    .unwrap_or_default();
                sim.removes.insert(unqualified(name).to_string(), old);
            }
            _ => {}
        }
    }
    sim
}

fn unqualified(name: &str) -> &str {
    name.split_once(':').map_or(name, |(b, _)| b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::packages::{package_decl, PackageSpec};

    fn decl(name: &str, state: Option<&str>, version: Option<&str>) -> PackageDecl {
        package_decl(
            "web",
            "roles/web/role.toml:1 packages[0]",
            PackageSpec {
                name: name.into(),
                state: state.map(str::to_string),
                version: version.map(str::to_string),
                reboot: false,
            },
        )
        .unwrap()
    }

    const SIM: &str = "NOTE: This is only a simulation!\n\
        Reading package lists...\n\
        Remv telnet [0.17+2.4-2]\n\
        Inst libdemo (1.0 local [all])\n\
        Inst demo [1.0] (2.0 local [all])\n\
        Conf libdemo (1.0 local [all])\n\
        Conf demo (2.0 local [all])\n";

    #[test]
    fn purges_count_as_removals_and_qualified_names_as_their_package() {
        let sim = parse_simulation(
            "Purg telnet [0.17+2.4-2]\nInst libc6:amd64 [2.36-9] (2.36-9+deb12u4 Debian:12.8/stable [amd64])\n",
        );
        assert_eq!(sim.removes["telnet"], "0.17+2.4-2");
        assert_eq!(
            sim.installs["libc6"],
            (Some("2.36-9".into()), "2.36-9+deb12u4".into())
        );
    }

    /// Review: a declared package already as declared that apt upgrades
    /// or removes along was left out of the plan, so the stage's check of
    /// apt's effect failed on every run, blaming the package lists.
    #[test]
    fn a_declared_package_apt_changes_along_is_in_the_plan_or_refused() {
        let obs = ObservedPackages {
            installed: BTreeMap::from([
                ("demo".into(), "1.0".into()),
                ("libdemo".into(), "1.0".into()),
            ]),
            simulation: Some(parse_simulation(
                "Inst libdemo [1.0] (2.0 local [all])\nInst demo [1.0] (2.0 local [all])\n",
            )),
            managed: true,
            ..Default::default()
        };
        let decls = [decl("demo", None, Some("2.0")), decl("libdemo", None, None)];
        let changes = diff(&decls, &obs).unwrap();
        let record = PackagesRecord::of(&["demo=2.0".into()], &changes);
        assert_eq!(record.expected(), obs.simulation.as_ref().unwrap().effect());
        let obs = ObservedPackages {
            simulation: Some(parse_simulation(
                "Remv libdemo [1.0]\nInst demo [1.0] (2.0 local [all])\n",
            )),
            ..obs
        };
        let e = diff(&decls, &obs).unwrap_err().to_string();
        assert!(
            e.contains("apt would remove libdemo 1.0, which this entry declares present"),
            "{e}"
        );
    }

    #[test]
    fn what_apt_refused_is_the_plan_error() {
        let obs = ObservedPackages {
            refused: vec![
                "roles/web/role.toml:1 packages[0]: Unable to locate package nope".into(),
            ],
            managed: true,
            ..Default::default()
        };
        let e = diff(&[decl("nope", None, None)], &obs)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Unable to locate package nope"), "{e}");
    }

    #[test]
    fn apt_simulations_are_read() {
        let sim = parse_simulation(SIM);
        assert_eq!(sim.installs["demo"], (Some("1.0".into()), "2.0".into()));
        assert_eq!(sim.installs["libdemo"], (None, "1.0".into()));
        assert_eq!(sim.removes["telnet"], "0.17+2.4-2");
    }

    #[test]
    fn changes_dependencies_and_irreversibility() {
        let obs = ObservedPackages {
            installed: BTreeMap::from([
                ("demo".into(), "1.0".into()),
                ("telnet".into(), "0.17+2.4-2".into()),
            ]),
            simulation: Some(parse_simulation(SIM)),
            reinstallable: BTreeMap::from([("demo".into(), "1.0".into())]),
            managed: true,
            ..Default::default()
        };
        let changes = diff(
            &[
                decl("demo", None, Some("2.0")),
                decl("telnet", Some("absent"), None),
            ],
            &obs,
        )
        .unwrap();
        let lines: Vec<String> = changes.iter().map(PackageChange::line).collect();
        assert_eq!(
            lines,
            [
                "~ change demo 1.0 -> 2.0 (role web)",
                "- remove telnet 0.17+2.4-2 (role web)  [irreversible: telnet 0.17+2.4-2 is in no configured source and not in /var/cache/apt/archives]",
                "+ install libdemo 1.0 (a dependency)",
            ]
        );
        let record = PackagesRecord::of(&["demo=2.0".into(), "telnet-".into()], &changes);
        assert_eq!(record.args, ["demo=2.0", "telnet-"]);
        assert_eq!(record.before[2], ("libdemo".to_string(), None));
        assert_eq!(record.irreversible, ["telnet"]);
        // What the plan expects is what the simulation said.
        assert_eq!(record.expected(), obs.simulation.as_ref().unwrap().effect());
    }

    #[test]
    fn a_removal_nobody_declared_is_refused() {
        let obs = ObservedPackages {
            installed: BTreeMap::from([("telnet".into(), "0.17+2.4-2".into())]),
            simulation: Some(parse_simulation(SIM)),
            managed: true,
            ..Default::default()
        };
        let e = diff(&[decl("demo", None, Some("2.0"))], &obs)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("apt would also remove telnet 0.17+2.4-2, which no role declares absent"),
            "{e}"
        );
    }

    #[test]
    fn what_no_source_has_is_refused_and_what_is_there_is_no_change() {
        let obs = ObservedPackages {
            installed: BTreeMap::from([("nginx-light".into(), "1.22.1-9".into())]),
            simulation: Some(Simulation::default()),
            managed: true,
            ..Default::default()
        };
        assert_eq!(diff(&[decl("nginx-light", None, None)], &obs).unwrap(), []);
        let e = diff(&[decl("nope", None, None)], &obs)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("apt installs no package named nope: it is a virtual package, or no configured source has it"),
            "{e}"
        );
    }
}
