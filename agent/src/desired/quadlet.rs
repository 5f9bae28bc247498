//! `[[quadlets]]`: Podman quadlet files as a resource of their own.
//!
//! A quadlet (`app.container`, `db.pod`, …) under
//! `/etc/containers/systemd/` is not a unit: podman's systemd generator
//! turns it into one (`app.service`) at every `daemon-reload`. Declared as
//! a plain `[[files]]` entry, a role would have to know the generator's
//! naming rules, add the restart of the generated unit by hand, and
//! remember that the unit cannot be `enabled` (generated units are started
//! by their `[Install]` section or not at all). This sugar does it:
//!
//! ```toml
//! [[quadlets]]
//! name = "app.container"          # → /etc/containers/systemd/app.container, unit app.service
//! template = "app.container.tera" # or source = / secret =, as for files
//! # on_change = { restart = ["app.service"] }   the default
//! # started = true                              the default: the generated unit runs
//! # unit = "custom.service"                     if the file sets ServiceName=
//! ```
//!
//! It desugars into exactly what a role could have written by hand: one
//! file entry (so the plan, the transaction, the revert and pruning are the
//! files' own) and one `[[units]]` entry for the generated unit. A quadlet
//! file is a unit source (`effects::systemd::is_unit_file`), so a change
//! triggers `daemon-reload` before the restart.

use serde::Deserialize;

use super::model::{FileSpec, OnChangeSpec, UnitSpec};

/// Where podman reads system quadlets from (as root).
pub const QUADLET_DIR: &str = "/etc/containers/systemd";

/// One `[[quadlets]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuadletSpec {
    /// File name with its quadlet type: `app.container`, `db.pod`, ….
    pub name: String,
    /// A Tera template, relative to `roles/<role>/files/`.
    #[serde(default)]
    pub template: Option<String>,
    /// A file copied verbatim, relative to `roles/<role>/files/`.
    #[serde(default)]
    pub source: Option<String>,
    /// A whole SOPS file, decrypted, relative to the repository root.
    #[serde(default)]
    pub secret: Option<String>,
    /// With `secret`: the format to write it in.
    #[serde(default)]
    pub format: Option<String>,
    /// Default "0644" ("0600" with secrets).
    #[serde(default)]
    pub mode: Option<String>,
    /// Default: restart the generated unit.
    #[serde(default)]
    pub on_change: Option<OnChangeSpec>,
    /// The generated unit runs (default) or is stopped; never "left alone"
    /// (a container nobody starts is a mistake more often than a wish).
    #[serde(default)]
    pub started: Option<bool>,
    /// The generated unit's name, when the file sets `ServiceName=`.
    #[serde(default)]
    pub unit: Option<String>,
}

/// Quadlet types and the suffix podman's generator adds to the stem of the
/// generated service (podman 4.4 to 5.x: `app.container` → `app.service`,
/// `db.pod` → `db-pod.service`).
const TYPES: &[(&str, &str)] = &[
    ("container", ""),
    ("kube", ""),
    ("pod", "-pod"),
    ("network", "-network"),
    ("volume", "-volume"),
    ("image", "-image"),
    ("build", "-build"),
];

/// The unit podman's generator makes of quadlet file `name`.
pub fn generated_unit(name: &str) -> Result<String, String> {
    let Some((stem, kind)) = name.rsplit_once('.') else {
        return Err(format!(
            "key `name`: {name:?} has no quadlet type; name it like app.container ({})",
            kinds()
        ));
    };
    if stem.contains('@') {
        return Err(format!(
            "key `name`: {name:?}: template quadlets (with '@') are not supported: their unit cannot be \
             started without an instance; declare the file with [[files]] and the instances with [[units]]"
        ));
    }
    if stem.is_empty()
        || !stem
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || stem.starts_with('.')
    {
        return Err(format!(
            "key `name`: {name:?}: a quadlet name may only use letters, digits, '-', '_' and '.', \
             and no '/' (it is a file in {QUADLET_DIR})"
        ));
    }
    match TYPES.iter().find(|(k, _)| *k == kind) {
        Some((_, suffix)) => Ok(format!("{stem}{suffix}.service")),
        None => Err(format!(
            "key `name`: {name:?}: .{kind} is not a quadlet type ({})",
            kinds()
        )),
    }
}

fn kinds() -> String {
    let list: Vec<String> = TYPES.iter().map(|(k, _)| format!(".{k}")).collect();
    list.join(", ")
}

/// The file and unit entries a quadlet stands for.
pub fn desugar(q: QuadletSpec) -> Result<(FileSpec, UnitSpec), String> {
    let derived = generated_unit(&q.name)?;
    let unit = match q.unit {
        Some(u) => {
            super::spec::validate_unit_name(&u).map_err(|e| format!("key `unit`: {e}"))?;
            u
        }
        None => derived,
    };
    let on_change = q.on_change.unwrap_or_else(|| OnChangeSpec {
        restart: vec![unit.clone()],
        ..OnChangeSpec::default()
    });
    let file = FileSpec {
        path: format!("{QUADLET_DIR}/{}", q.name),
        template: q.template,
        source: q.source,
        secret: q.secret,
        format: q.format,
        mode: q.mode,
        owner: None,
        group: None,
        on_change,
        allow_special_mode: false,
        dir_mode: None,
        reboot: false,
    };
    let unit = UnitSpec {
        name: unit,
        enabled: None,
        started: Some(q.started.unwrap_or(true)),
    };
    Ok((file, unit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_unit_names_follow_podman() {
        for (file, unit) in [
            ("app.container", "app.service"),
            ("web.kube", "web.service"),
            ("db.pod", "db-pod.service"),
            ("net1.network", "net1-network.service"),
            ("data.volume", "data-volume.service"),
            ("base.image", "base-image.service"),
            ("tool.build", "tool-build.service"),
            ("my-app.v2.container", "my-app.v2.service"),
        ] {
            assert_eq!(generated_unit(file).unwrap(), unit, "{file}");
        }
        for (bad, want) in [
            ("app", "has no quadlet type"),
            ("app.service", ".service is not a quadlet type"),
            (".container", "may only use"),
            ("a/b.container", "no '/'"),
            ("a b.container", "may only use"),
            (
                "app@.container",
                "template quadlets (with '@') are not supported",
            ),
        ] {
            let e = generated_unit(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn a_quadlet_is_a_file_under_the_quadlet_dir_and_a_started_unit() {
        let q: QuadletSpec =
            toml::from_str("name = \"app.container\"\ntemplate = \"app.container.tera\"\n")
                .unwrap();
        let (file, unit) = desugar(q).unwrap();
        assert_eq!(file.path, "/etc/containers/systemd/app.container");
        assert_eq!(file.template.as_deref(), Some("app.container.tera"));
        assert_eq!(file.on_change.restart, ["app.service"]);
        assert_eq!(unit.name, "app.service");
        assert_eq!((unit.enabled, unit.started), (None, Some(true)));
        let q: QuadletSpec = toml::from_str(
            "name = \"db.pod\"\nsource = \"db.pod\"\nunit = \"database.service\"\nstarted = false\n\
             on_change = { try-restart = [\"database.service\"] }\n",
        )
        .unwrap();
        let (file, unit) = desugar(q).unwrap();
        assert!(file.on_change.restart.is_empty());
        assert_eq!(file.on_change.try_restart, ["database.service"]);
        assert_eq!(
            (unit.name.as_str(), unit.started),
            ("database.service", Some(false))
        );
        let e = toml::from_str::<QuadletSpec>("name = \"a.container\"\nenabled = true\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `enabled`"), "{e}");
    }
}
