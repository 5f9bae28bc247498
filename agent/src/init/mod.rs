//! `driftless init DIR`: scaffold a config repository from the files in
//! `templates/init/`, embedded in the binary (an installed package has no
//! checkout to read them from).
//!
//! The pure part ([`scaffold`], [`check_host_name`], [`plan_writes`]) says
//! what goes where; [`write()`] puts the files on disk, never overwriting one,
//! and [`git`] makes the first commit in-process with gix (no `git` binary
//! needed on the host).

pub mod git;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The placeholder for the host name in `templates/init/hosts/HOST.toml`
/// (both its file name and its text).
const HOST_PLACEHOLDER: &str = "@HOST@";
const HOST_FILE: &str = "hosts/HOST.toml";

/// Every file of `templates/init/`, by its path in the new repository. A
/// unit test checks that this list and the directory agree.
const FILES: &[(&str, &str)] = &[
    (
        "README.md",
        include_str!("../../../templates/init/README.md"),
    ),
    (
        "driftless.toml",
        include_str!("../../../templates/init/driftless.toml"),
    ),
    (
        HOST_FILE,
        include_str!("../../../templates/init/hosts/HOST.toml"),
    ),
    (
        "roles/timesync/role.toml",
        include_str!("../../../templates/init/roles/timesync/role.toml"),
    ),
    (
        "roles/timesync/files/timesyncd.conf.tera",
        include_str!("../../../templates/init/roles/timesync/files/timesyncd.conf.tera"),
    ),
    (
        "roles/sshd-hardening/role.toml",
        include_str!("../../../templates/init/roles/sshd-hardening/role.toml"),
    ),
    (
        "roles/sshd-hardening/files/sshd.conf.tera",
        include_str!("../../../templates/init/roles/sshd-hardening/files/sshd.conf.tera"),
    ),
    (
        "roles/unit-dropin/role.toml",
        include_str!("../../../templates/init/roles/unit-dropin/role.toml"),
    ),
    (
        "roles/unit-dropin/files/cron.service.conf.tera",
        include_str!("../../../templates/init/roles/unit-dropin/files/cron.service.conf.tera"),
    ),
    (
        "roles/cron-job/role.toml",
        include_str!("../../../templates/init/roles/cron-job/role.toml"),
    ),
    (
        "roles/cron-job/files/site-jobs.tera",
        include_str!("../../../templates/init/roles/cron-job/files/site-jobs.tera"),
    ),
    (
        "roles/app-behind-proxy/role.toml",
        include_str!("../../../templates/init/roles/app-behind-proxy/role.toml"),
    ),
    (
        "roles/app-behind-proxy/files/app.container.tera",
        include_str!("../../../templates/init/roles/app-behind-proxy/files/app.container.tera"),
    ),
    (
        "roles/app-behind-proxy/files/nginx-app.conf.tera",
        include_str!("../../../templates/init/roles/app-behind-proxy/files/nginx-app.conf.tera"),
    ),
];

/// One file of the new repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaffoldFile {
    /// Relative to the repository root, `/`-separated.
    pub path: String,
    pub content: String,
}

/// A host name must make a usable `hosts/<name>.toml` (the agent refuses
/// the same names) and a line of TOML in the host file's comments.
pub fn check_host_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.starts_with('.')
        || name
            .chars()
            .any(|c| c == '/' || c == '"' || c == '\\' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "host name {name:?} cannot name hosts/<name>.toml: use letters, digits, '-', '_' \
             and '.' (pass --host NAME)"
        ));
    }
    Ok(())
}

/// The files of a new repository for `host`.
pub fn scaffold(host: &str) -> Result<Vec<ScaffoldFile>, String> {
    check_host_name(host)?;
    Ok(FILES
        .iter()
        .map(|(path, content)| {
            if *path == HOST_FILE {
                ScaffoldFile {
                    path: format!("hosts/{host}.toml"),
                    content: content.replace(HOST_PLACEHOLDER, host),
                }
            } else {
                ScaffoldFile {
                    path: (*path).to_string(),
                    content: (*content).to_string(),
                }
            }
        })
        .collect())
}

/// What to do with each scaffold file, given the ones already present.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Writes {
    pub create: Vec<ScaffoldFile>,
    /// Present already: left as they are.
    pub keep: Vec<String>,
}

/// Splits `files` into those to create and those `exists` says are there.
pub fn plan_writes(files: Vec<ScaffoldFile>, exists: impl Fn(&str) -> bool) -> Writes {
    let mut w = Writes::default();
    for f in files {
        if exists(&f.path) {
            w.keep.push(f.path);
        } else {
            w.create.push(f);
        }
    }
    w
}

/// Why `dir` cannot be initialised without `--force`: it exists and is not
/// an empty directory. `Ok(None)`: it is missing or empty.
pub fn refuse_reason(dir: &Path) -> Result<Option<String>> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", dir.display())),
    };
    if !meta.is_dir() {
        return Ok(Some(format!(
            "{} exists and is not a directory: name a new or empty directory",
            dir.display()
        )));
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.is_empty() {
        return Ok(None);
    }
    names.sort();
    let shown: Vec<&str> = names.iter().take(3).map(String::as_str).collect();
    Ok(Some(format!(
        "{} is not empty ({} entr{}: {}{}): `driftless init` writes into a new or empty \
         directory; pass --force to add only the missing files (nothing is overwritten)",
        dir.display(),
        names.len(),
        if names.len() == 1 { "y" } else { "ies" },
        shown.join(", "),
        if names.len() > 3 { ", …" } else { "" },
    )))
}

/// Creates each file (and its directories) under `dir`, refusing to
/// replace anything: a file that appeared meanwhile is an error naming it.
pub fn write(dir: &Path, files: &[ScaffoldFile]) -> Result<Vec<PathBuf>> {
    use std::io::Write as _;
    let mut written = Vec::new();
    for f in files {
        let target = dir.join(&f.path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create directory {}", parent.display()))?;
        }
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
            .with_context(|| match target.exists() {
                true => format!("{} appeared while writing: left as it is", target.display()),
                false => format!("cannot create {}", target.display()),
            })?;
        out.write_all(f.content.as_bytes())
            .and_then(|()| out.sync_all())
            .with_context(|| format!("cannot write {}", target.display()))?;
        written.push(target);
    }
    Ok(written)
}

/// The host name `init` uses without `--host`: the kernel hostname, as the
/// agent does.
pub fn default_host() -> Result<String> {
    let h = nix::unistd::gethostname().context("cannot read the hostname: pass --host NAME")?;
    match h.into_string() {
        Ok(s) => Ok(s),
        Err(_) => bail!("the hostname is not UTF-8: pass --host NAME"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_disk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                on_disk(&p, base, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }

    #[test]
    fn every_file_of_templates_init_is_embedded_and_nothing_else() {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../templates/init");
        let mut disk = Vec::new();
        on_disk(&base, &base, &mut disk);
        disk.sort();
        let mut table: Vec<String> = FILES.iter().map(|(p, _)| p.to_string()).collect();
        table.sort();
        assert_eq!(disk, table, "templates/init/ and init::FILES disagree");
        for (p, content) in FILES {
            assert_eq!(
                std::fs::read_to_string(base.join(p)).unwrap(),
                *content,
                "{p}"
            );
        }
    }

    #[test]
    fn the_host_file_is_named_and_filled_in_for_the_host() {
        let files = scaffold("web1").unwrap();
        let host = files
            .iter()
            .find(|f| f.path == "hosts/web1.toml")
            .expect("hosts/web1.toml");
        assert!(
            host.content.contains("The host \"web1\""),
            "{}",
            host.content
        );
        assert!(!host.content.contains(HOST_PLACEHOLDER));
        assert!(!files.iter().any(|f| f.path.contains("HOST")));
        assert_eq!(files.len(), FILES.len());
    }

    #[test]
    fn the_host_file_parses_and_enables_only_the_safe_roles() {
        let files = scaffold("h").unwrap();
        let host = &files.iter().find(|f| f.path == "hosts/h.toml").unwrap();
        let t: toml::Table = toml::from_str(&host.content).unwrap();
        let roles: Vec<&str> = t["roles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        assert_eq!(roles, ["timesync", "unit-dropin", "cron-job"]);
        // The others are offered, commented.
        assert!(host.content.contains("# \"sshd-hardening\""));
        assert!(host.content.contains("# \"app-behind-proxy\""));
    }

    #[test]
    fn unusable_host_names_are_refused() {
        for bad in ["", ".hidden", "a/b", "a b", "a\"b", "tab\t", "nl\n"] {
            assert!(check_host_name(bad).is_err(), "{bad:?}");
            assert!(scaffold(bad).is_err(), "{bad:?}");
        }
        for good in ["web1", "web1.example.com", "db_2", "default"] {
            check_host_name(good).unwrap();
        }
    }

    #[test]
    fn plan_writes_keeps_what_exists() {
        let files = scaffold("h").unwrap();
        let w = plan_writes(files, |p| p == "driftless.toml" || p == "hosts/h.toml");
        assert_eq!(w.keep, ["driftless.toml", "hosts/h.toml"]);
        assert_eq!(w.create.len(), FILES.len() - 2);
        assert!(w.create.iter().all(|f| !w.keep.contains(&f.path)));
    }

    #[test]
    fn refuse_reason_for_missing_empty_nonempty_and_file() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(refuse_reason(&t.path().join("new")).unwrap(), None);
        assert_eq!(refuse_reason(t.path()).unwrap(), None);
        std::fs::write(t.path().join("x"), "").unwrap();
        let why = refuse_reason(t.path()).unwrap().unwrap();
        assert!(why.contains("is not empty (1 entry: x)"), "{why}");
        assert!(why.contains("--force"), "{why}");
        let why = refuse_reason(&t.path().join("x")).unwrap().unwrap();
        assert!(why.contains("is not a directory"), "{why}");
    }

    #[test]
    fn write_never_replaces_a_file() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("driftless.toml"), "mine").unwrap();
        let files = scaffold("h").unwrap();
        let err = write(t.path(), &files).unwrap_err();
        assert!(format!("{err:#}").contains("driftless.toml"), "{err:#}");
        assert_eq!(
            std::fs::read_to_string(t.path().join("driftless.toml")).unwrap(),
            "mine"
        );
    }
}
