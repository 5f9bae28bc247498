//! `[[packages]]`: Debian packages a role needs present (optionally at an
//! exact version) or absent.
//!
//! ```toml
//! [[packages]]
//! name = "nginx-light"
//! # state = "present"          # default; or "absent"
//! # version = "1.22.1-9"       # exact version (epoch included when it has one)
//! # reboot = true              # a change of it needs a reboot (/run/reboot-required)
//! ```
//!
//! Packages are installed with apt before the files and units of the same
//! commit (a config file can only be written once its package made the
//! directory, and a unit can only restart once it is installed); see
//! `effects::packages` for how, and what an undo can and cannot do.
//! Forgetting is not removing: a package that leaves the repository
//! stays installed; only `state = "absent"` removes one.

use serde::Deserialize;

/// One `[[packages]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageSpec {
    pub name: String,
    /// "present" (default) or "absent".
    #[serde(default)]
    pub state: Option<String>,
    /// An exact version to install (or keep).
    #[serde(default)]
    pub version: Option<String>,
    /// A change of this package (install, upgrade, removal) needs a
    /// reboot: listed in `/run/reboot-required.pkgs` after the commit.
    #[serde(default)]
    pub reboot: bool,
}

/// A validated `[[packages]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageDecl {
    pub name: String,
    pub present: bool,
    pub version: Option<String>,
    pub reboot: bool,
    pub role: String,
    /// `roles/web/role.toml:3 packages[0]`.
    pub origin: String,
}

impl PackageDecl {
    /// The argument apt takes for it: `name`, `name=version`, or `name-`
    /// (remove).
    pub fn apt_arg(&self) -> String {
        match (&self.version, self.present) {
            (_, false) => format!("{}-", self.name),
            (Some(v), true) => format!("{}={v}", self.name),
            (None, true) => self.name.clone(),
        }
    }
}

/// Debian policy §5.6.1: lower case letters, digits, `+`, `-`, `.`; at
/// least two characters, starting with a letter or digit. Nothing else
/// reaches apt's argv.
///
/// Two more refusals, because apt reads them as something else:
/// - a trailing `-` (apt's "remove this" suffix: `nginx-` declared
///   present would remove nginx);
/// - an architecture qualifier (`libc6:i386`): dpkg-query and apt's
///   simulation name packages without it, so the plan could not tell a
///   foreign-architecture package from the native one.
pub fn check_name(name: &str) -> Result<(), String> {
    if let Some((base, _)) = name.split_once(':') {
        return Err(format!(
            "key `name`: {name:?} has an architecture qualifier, which driftless does not \
             support yet; declare the native package ({base:?})"
        ));
    }
    if name.ends_with('-') {
        return Err(format!(
            "key `name`: {name:?} ends with `-`, which apt reads as \"remove\"; write \
             `state = \"absent\"` to remove a package"
        ));
    }
    let ok = name.len() >= 2
        && name.len() <= 128
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "key `name`: {name:?} is not a Debian package name (lower case letters, digits, \
             `+`, `-` and `.`, at least two characters, starting with a letter or digit)"
        ))
    }
}

/// Debian policy §5.6.12: `[epoch:]upstream[-revision]`, from letters,
/// digits and `.+~-:`, starting with a digit (after the epoch).
fn check_version(v: &str) -> Result<(), String> {
    let upstream = match v.split_once(':') {
        Some((epoch, rest)) if !epoch.is_empty() && epoch.chars().all(|c| c.is_ascii_digit()) => {
            rest
        }
        Some(_) => return Err(format!("key `version`: {v:?} has a bad epoch")),
        None => v,
    };
    let ok = !upstream.is_empty()
        && v.len() <= 128
        && upstream.chars().next().is_some_and(|c| c.is_ascii_digit())
        && upstream
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '~' | '-' | ':'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "key `version`: {v:?} is not a Debian version (`[epoch:]upstream[-revision]`, \
             starting with a digit; letters, digits and `.+~-:`)"
        ))
    }
}

pub fn package_decl(role: &str, origin: &str, spec: PackageSpec) -> Result<PackageDecl, String> {
    check_name(&spec.name)?;
    let present = match spec.state.as_deref() {
        None | Some("present") => true,
        Some("absent") => false,
        Some(other) => {
            return Err(format!(
                "key `state`: {other:?} is not \"present\" or \"absent\""
            ))
        }
    };
    if let Some(v) = &spec.version {
        if !present {
            return Err("key `version` goes with state = \"present\" only".into());
        }
        check_version(v)?;
    }
    Ok(PackageDecl {
        name: spec.name,
        present,
        version: spec.version,
        reboot: spec.reboot,
        role: role.to_string(),
        origin: origin.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, state: Option<&str>, version: Option<&str>) -> PackageSpec {
        PackageSpec {
            name: name.into(),
            state: state.map(str::to_string),
            version: version.map(str::to_string),
            reboot: false,
        }
    }

    #[test]
    fn names_and_versions_follow_debian_policy_and_nothing_else_reaches_apt() {
        for good in ["nginx-light", "g++", "0ad", "lib.x+y"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "Nginx",
            "a",
            "-rf",
            "nginx light",
            "x;y",
            "nginx\n",
            "a:",
            "--purge",
            "pkg=1.0",
            // apt would read these as something else.
            "nginx-",
            "libc6:amd64",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        for good in ["1.22.1-9", "1:2.0~rc1-1+deb12u1", "2.0"] {
            assert!(check_version(good).is_ok(), "{good}");
        }
        for bad in ["", "v1.0", "1.0 x", "1.0/2", "x:1.0", "-1"] {
            assert!(check_version(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn apt_arguments() {
        let d = |s| package_decl("r", "o", s).unwrap().apt_arg();
        assert_eq!(d(spec("nginx-light", None, None)), "nginx-light");
        assert_eq!(d(spec("demo", None, Some("1.0"))), "demo=1.0");
        assert_eq!(d(spec("telnet", Some("absent"), None)), "telnet-");
        assert!(package_decl("r", "o", spec("telnet", Some("absent"), Some("1.0"))).is_err());
        assert!(package_decl("r", "o", spec("telnet", Some("purged"), None)).is_err());
    }
}
