//! apt's side: the one `apt-get install` command line the simulation and
//! the change share, reading apt's refusals, and where an old version's
//! `.deb` can be had again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use tracing::info;

use super::{lock_wait_secs, run, strings};
use crate::desired::packages::PackageDecl;
use crate::effects::process;

/// `apt-get install -y` as both the simulation and the change run it, so
/// what the plan shows is what apt does: downgrades allowed (an undo
/// reinstalls older versions), never a purge nor an autoremove, the old
/// conffiles kept, dpkg's lock waited for. With `-y`, apt refuses held and
/// Essential packages, in the simulation too.
pub(super) fn apt_install(simulate: bool) -> Vec<String> {
    let mut argv = strings(&[
        "apt-get",
        "install",
        "-y",
        "--allow-downgrades",
        "-o",
        "APT::Get::Purge=false",
        "-o",
        "APT::Get::AutomaticRemove=false",
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
    ]);
    argv.push("-o".into());
    argv.push(format!("DPkg::Lock::Timeout={}", lock_wait_secs()));
    if simulate {
        argv.extend(strings(&["-s", "-o", "Debug::NoLocking=1"]));
    }
    argv
}

/// Whether `line` names `name` as a whole word (`nginx` is not named by
/// `nginx-light`).
pub(super) fn mentions(line: &str, name: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.');
    line.match_indices(name).any(|(i, _)| {
        !line[..i].chars().next_back().is_some_and(word)
            && !line[i + name.len()..]
                .trim_end_matches('.')
                .chars()
                .next()
                .is_some_and(word)
    })
}

/// apt's refusal, each error line with the entries it names (or all the
/// entries apt was given, when it names none), and what apt listed as
/// held or Essential.
pub(super) fn refusal(f: &process::Finished, decls: &[&PackageDecl]) -> Vec<String> {
    let errors: Vec<String> = f
        .stderr
        .lines(400)
        .into_iter()
        .filter(|l| l.starts_with("E: "))
        .map(|l| l.trim_start_matches("E: ").to_string())
        .collect();
    let out = f.stdout.lines(400);
    let mut listed = Vec::new();
    let mut section = None;
    for l in &out {
        if l.starts_with("The following held packages will be changed")
            || l.starts_with("WARNING: The following essential packages will be removed")
        {
            section = Some(if l.contains("held") {
                "held"
            } else {
                "Essential"
            });
            continue;
        }
        match section {
            Some(kind) if l.starts_with("  ") => {
                listed.extend(l.split_whitespace().map(|n| format!("{n} ({kind})")))
            }
            Some(_) if l.starts_with("This should NOT") => {}
            _ => section = None,
        }
    }
    let mut lines = Vec::new();
    for e in errors.iter().chain(std::iter::once(&String::new())) {
        if e.is_empty() && (listed.is_empty() || !lines.is_empty()) {
            continue;
        }
        let named: Vec<&&PackageDecl> = decls.iter().filter(|d| mentions(e, &d.name)).collect();
        let origins: Vec<&str> = if named.is_empty() {
            decls.iter().map(|d| d.origin.as_str()).collect()
        } else {
            named.iter().map(|d| d.origin.as_str()).collect()
        };
        let mut line = format!("{}: {}", origins.join(", "), e);
        if !listed.is_empty() && (e.contains("held") || e.contains("ssential") || e.is_empty()) {
            line.push_str(&format!(" [{}]", listed.join(", ")));
        }
        lines.push(line);
    }
    if lines.is_empty() {
        lines.push(format!(
            "{}: apt-get {}",
            decls
                .iter()
                .map(|d| d.origin.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            f.describe(None)
        ));
    }
    lines
}

/// `name_version_*.deb` in apt's cache.
pub(super) fn cached_deb(name: &str, version: &str) -> Option<PathBuf> {
    deb_in(Path::new("/var/cache/apt/archives"), name, version)
}

/// How apt names the .debs of `name` `version`: `name_version_` then the
/// architecture (an epoch's `:` is `%3a` there).
pub(super) fn deb_prefix(name: &str, version: &str) -> String {
    format!("{name}_{}_", version.replace(':', "%3a"))
}

/// Whether `name` `version` can be had again: in apt's cache, or listed
/// by a source other than dpkg's status file (`apt-cache policy`).
pub(super) fn can_fetch_again(name: &str, version: &str) -> Result<bool> {
    if cached_deb(name, version).is_some() {
        return Ok(true);
    }
    let argv = strings(&["apt-cache", "policy", name]);
    let f = run(&argv, Duration::from_secs(60))?;
    let text = String::from_utf8_lossy(&f.stdout.tail).into_owned();
    Ok(policy_has_source(&text, version))
}

/// In `apt-cache policy` output: the version table entry of `version` is
/// followed by at least one source line that is not dpkg's status file.
pub(super) fn policy_has_source(text: &str, version: &str) -> bool {
    let mut in_version = false;
    for line in text.lines() {
        let t = line.trim_start_matches([' ', '*']).trim();
        let depth = line.len() - line.trim_start().len();
        if depth <= 5 && !t.is_empty() && t.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            // "     1.0 500" or " *** 1.0 100": a version line.
            in_version = t.split_whitespace().next() == Some(version);
            continue;
        }
        if in_version && depth > 5 && !t.ends_with("/var/lib/dpkg/status") {
            return true;
        }
    }
    false
}

/// `name_version_*.deb` in `debs`.
pub(super) fn deb_in(debs: &Path, name: &str, version: &str) -> Option<PathBuf> {
    let prefix = deb_prefix(name, version);
    std::fs::read_dir(debs)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
}

pub(super) fn log_output(f: &process::Finished) {
    for line in f.stdout.lines(400).iter().chain(f.stderr.lines(400).iter()) {
        info!(target: "driftless::apt", "{line}");
    }
}

/// The packages apt's output says it unpacked, set up or removed, or
/// `None` when the output was cut (then it cannot say).
pub(super) fn touched(f: &process::Finished) -> Option<std::collections::BTreeSet<String>> {
    if f.stdout.dropped > 0 {
        return None;
    }
    Some(touched_in(&String::from_utf8_lossy(&f.stdout.tail)))
}

fn touched_in(text: &str) -> std::collections::BTreeSet<String> {
    const VERBS: &[&str] = &[
        "Unpacking ",
        "Setting up ",
        "Removing ",
        "Purging configuration files for ",
        "Selecting previously unselected package ",
    ];
    text.lines()
        .filter_map(|l| {
            let rest = VERBS.iter().find_map(|v| l.strip_prefix(v))?;
            let name = rest.split_whitespace().next()?.trim_end_matches('.');
            Some(name.split_once(':').map_or(name, |(b, _)| b).to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_apt_touched_is_read_from_its_output() {
        let out = "Reading package lists...\nSelecting previously unselected package drift-dep.\n\
            Preparing to unpack .../drift-dep_1.0_all.deb ...\nUnpacking drift-dep (1.0) ...\n\
            Unpacking libc6:amd64 (2.36-9+deb12u4) over (2.36-9) ...\nSetting up drift-demo (2.0) ...\n\
            Removing telnet (0.17+2.4-2) ...\nProcessing triggers for man-db (2.11.2-2) ...\n";
        let got: Vec<String> = touched_in(out).into_iter().collect();
        assert_eq!(got, ["drift-demo", "drift-dep", "libc6", "telnet"]);
    }

    #[test]
    fn apt_errors_name_an_entry_only_by_its_whole_name() {
        assert!(mentions("E: Unable to locate package nginx", "nginx"));
        assert!(mentions(
            "E: Version '9' for 'nginx' was not found",
            "nginx"
        ));
        assert!(mentions("E: Unable to locate package nginx.", "nginx"));
        assert!(!mentions(
            "E: Unable to locate package nginx-light",
            "nginx"
        ));
        assert!(!mentions("E: Unable to locate package libnginx", "nginx"));
    }

    #[test]
    fn apt_cache_policy_says_whether_a_version_has_a_source() {
        let text = "demo:\n  Installed: 1.0\n  Candidate: 2.0\n  Version table:\n     2.0 500\n        500 file:/srv/repo ./ Packages\n *** 1.0 100\n        100 /var/lib/dpkg/status\n";
        assert!(policy_has_source(text, "2.0"));
        assert!(!policy_has_source(text, "1.0"));
        let both = "demo:\n  Version table:\n *** 1.0 500\n        500 file:/srv/repo ./ Packages\n        100 /var/lib/dpkg/status\n";
        assert!(policy_has_source(both, "1.0"));
    }
}
