//! The packages stage of a transaction: reading dpkg's database, asking
//! apt what it would do, installing and removing with apt, and undoing
//! that when the transaction fails.
//!
//! **Observe** (plan time). `dpkg-query -W` of the declared packages (in
//! the root's dpkg database under `--root`). On the live system, as root,
//! when something must change: `apt-get -s install <args>` (no lock, no
//! root needed) says what apt would install, change and remove, and
//! `apt-cache policy` whether each version a change replaces can be had
//! again (a source lists it, or its `.deb` is in `/var/cache/apt/archives`).
//! Under `--root`, packages are read but never changed: the plan says so.
//!
//! **Change** (in the transaction, after the accounts, before the files).
//! Each version to be replaced or removed is first saved as a `.deb` in
//! the transaction's `debs/` (from apt's cache, or downloaded from its
//! source), so the undo needs no network. Then `apt-get install -y` with
//! dpkg's lock waited for (`DPkg::Lock::Timeout`), old conffiles kept
//! (`--force-confold`), `DEBIAN_FRONTEND=noninteractive`; its output goes
//! to the log. dpkg is not transactional: a crash inside it leaves
//! packages half-configured, which the undo first repairs with `dpkg
//! --configure -a`.
//!
//! **Undo** (revert, rollback, recovery; only once the stage began):
//! packages it installed are removed (their conffiles stay: dpkg's `rc`),
//! packages it changed or removed are reinstalled from `debs/`. One whose
//! old version could not be saved is reported, never guessed: the plan
//! marked that change irreversible before it happened.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tracing::{info, warn};

use crate::desired::packages::PackageDecl;
use crate::effects::process::{self, Invocation};
use crate::effects::rootfs::RootFs;
pub use crate::plan::packages::{ObservedPackages, PackagesRecord};

/// The longest an apt or dpkg run may take (it waits for dpkg's lock
/// within this, then installs). Below the daemon's `MAX_SYNC`, after
/// which its watchdog would stop the agent mid-sync.
const APT_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// How long apt waits for dpkg's lock before it fails naming it.
const LOCK_WAIT_SECS: u32 = 120;

fn live(fs: &RootFs) -> bool {
    fs.path() == Path::new("/")
}

/// Runs an apt/dpkg tool with a clean environment.
fn run(argv: &[String], timeout: Duration) -> Result<process::Finished> {
    let env = BTreeMap::from([
        ("LC_ALL".to_string(), "C".to_string()),
        ("DEBIAN_FRONTEND".to_string(), "noninteractive".to_string()),
    ]);
    process::run_blocking(&Invocation {
        argv,
        env: Some(&env),
        user: None,
        timeout: Some(timeout),
        keep: 4 * 1024 * 1024,
    })
    .with_context(|| format!("cannot run {} (package apt/dpkg)", argv[0]))
}

fn check(argv: &[String], f: &process::Finished) -> Result<()> {
    if f.status.is_some_and(|s| s.success()) {
        return Ok(());
    }
    let mut why = f.describe(Some(APT_TIMEOUT));
    let last = f.stderr.last_line(400);
    if !last.is_empty() {
        why.push_str(": ");
        why.push_str(&last);
    }
    bail!("{} {why}", argv[..argv.len().min(2)].join(" "))
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Installed versions of `names` in the root's dpkg database.
pub fn installed(fs: &RootFs, names: &[&str]) -> Result<BTreeMap<String, String>> {
    if names.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut argv = vec!["dpkg-query".to_string()];
    if !live(fs) {
        argv.push(format!(
            "--admindir={}",
            fs.path().join("var/lib/dpkg").display()
        ));
    }
    argv.extend(strings(&[
        "-W",
        "-f",
        "${Package}\t${db:Status-Abbrev}\t${Version}\n",
    ]));
    argv.extend(names.iter().map(|n| n.to_string()));
    let f = run(&argv, Duration::from_secs(60))?;
    // Exit 1 with "no packages found matching X" for unknown names: fine.
    if f.status.and_then(|s| s.code()).is_none_or(|c| c > 1) {
        check(&argv, &f)?;
    }
    Ok(parse_installed(&String::from_utf8_lossy(&f.stdout.tail)))
}

/// `name\tii \tversion` lines: installed when dpkg's current state is not
/// "not installed" nor "config files only".
fn parse_installed(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (name, status, version) = (f.next()?, f.next()?, f.next()?);
            let current = status.chars().nth(1)?;
            (!matches!(current, 'n' | 'c') && !version.is_empty())
                .then(|| (name.to_string(), version.to_string()))
        })
        .collect()
}

/// Reads what the host has of `decls`; on the live system, as root, when
/// anything must change, what apt would do and what can be undone.
pub fn observe(fs: &RootFs, decls: &[PackageDecl], root: bool) -> Result<ObservedPackages> {
    let mut out = ObservedPackages {
        managed: root && live(fs),
        ..Default::default()
    };
    if decls.is_empty() {
        return Ok(out);
    }
    let names: Vec<&str> = decls
        .iter()
        .map(|d| crate::plan::packages::base(&d.name))
        .collect();
    out.installed = installed(fs, &names)?;
    let settled = decls.iter().all(|d| {
        let base = crate::plan::packages::base(&d.name);
        match (d.present, out.installed.get(base)) {
            (false, None) => true,
            (true, Some(v)) => d.version.as_ref().is_none_or(|want| want == v),
            _ => false,
        }
    });
    if !out.managed || settled {
        return Ok(out);
    }
    let mut argv = strings(&["apt-get", "-s", "-o", "Debug::NoLocking=1", "install"]);
    argv.extend(decls.iter().map(PackageDecl::apt_arg));
    let f = run(&argv, Duration::from_secs(120))?;
    let text = String::from_utf8_lossy(&f.stdout.tail).into_owned();
    if !f.status.is_some_and(|s| s.success()) {
        // "E: Unable to locate package x", "E: Version 'v' for 'x' was
        // not found": each named with the entry that asked for it.
        let lines = f.stderr.lines(400);
        let mut named = Vec::new();
        for d in decls {
            let base = crate::plan::packages::base(&d.name);
            for l in lines.iter().filter(|l| {
                l.contains(&format!("package {base}"))
                    || l.contains(&format!("'{base}'"))
                    || l.contains(&format!("{base} :"))
            }) {
                named.push(format!("{}: {}", d.origin, l.trim_start_matches("E: ")));
            }
        }
        if named.is_empty() {
            named.push(format!("[[packages]]: {}", lines.join("; ")));
        }
        bail!(
            "apt cannot do what the repository asks:\n{}\n(run apt-get update if the package lists are old, or check the names and versions)",
            named.join("\n")
        );
    }
    let sim = crate::plan::packages::parse_simulation(&text);
    let replaced: Vec<(String, String)> = sim
        .installs
        .iter()
        .filter_map(|(n, (old, _))| Some((n.clone(), old.clone()?)))
        .chain(sim.removes.iter().map(|(n, v)| (n.clone(), v.clone())))
        .collect();
    for (name, version) in replaced {
        if can_fetch_again(&name, &version)? {
            out.reinstallable.insert(name, version);
        }
    }
    out.simulation = Some(sim);
    Ok(out)
}

/// `name_version_*.deb` in apt's cache.
fn cached_deb(name: &str, version: &str) -> Option<PathBuf> {
    deb_in(Path::new("/var/cache/apt/archives"), name, version)
}

/// How apt names the .debs of `name` `version`: `name_version_` then the
/// architecture (an epoch's `:` is `%3a` there).
fn deb_prefix(name: &str, version: &str) -> String {
    format!("{name}_{}_", version.replace(':', "%3a"))
}

/// Whether `name` `version` can be had again: in apt's cache, or listed
/// by a source other than dpkg's status file (`apt-cache policy`).
fn can_fetch_again(name: &str, version: &str) -> Result<bool> {
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
fn policy_has_source(text: &str, version: &str) -> bool {
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

/// dpkg's database of installed packages: the quick check watches it
/// when packages are declared.
pub const DPKG_STATUS: &str = "/var/lib/dpkg/status";

/// The mark that the packages stage began (an undo is due only then).
pub const STARTED: &str = "packages-started";

/// Saves each version `record` replaces into `debs` (`tx/<txid>/debs`),
/// from apt's cache or its source. Returns those it could not save.
pub fn save_previous(record: &PackagesRecord, debs: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(debs.join("partial"))
        .with_context(|| format!("cannot create {}", debs.display()))?;
    let mut missing = Vec::new();
    for (name, old) in &record.before {
        let Some(old) = old else { continue };
        if let Some(deb) = cached_deb(name, old) {
            let to = debs.join(deb.file_name().unwrap_or_default());
            if std::fs::hard_link(&deb, &to).is_err() {
                std::fs::copy(&deb, &to)
                    .with_context(|| format!("cannot save {}", deb.display()))?;
            }
            continue;
        }
        let argv = vec![
            "apt-get".to_string(),
            "install".into(),
            "-y".into(),
            "--download-only".into(),
            "--reinstall".into(),
            "--allow-downgrades".into(),
            "-o".into(),
            format!("Dir::Cache::archives={}", debs.display()),
            "-o".into(),
            format!("DPkg::Lock::Timeout={LOCK_WAIT_SECS}"),
            format!("{name}={old}"),
        ];
        let f = run(&argv, APT_TIMEOUT)?;
        if check(&argv, &f).is_err() || deb_in(debs, name, old).is_none() {
            missing.push(format!("{name} {old}"));
        }
    }
    // Only the saved versions stay (a download may bring dependencies).
    for e in std::fs::read_dir(debs).into_iter().flatten().flatten() {
        let keep = e.file_name().to_str().is_some_and(|n| {
            record.before.iter().any(|(name, old)| {
                old.as_ref()
                    .is_some_and(|o| n.starts_with(&deb_prefix(name, o)))
            })
        });
        if !keep && e.path().is_file() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(missing)
}

/// `name_version_*.deb` in `debs`.
fn deb_in(debs: &Path, name: &str, version: &str) -> Option<PathBuf> {
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

fn log_output(f: &process::Finished) {
    for line in f.stdout.lines(400).iter().chain(f.stderr.lines(400).iter()) {
        info!(target: "apt", "{line}");
    }
}

/// `apt-get install -y` as every change runs it: downgrades allowed (an
/// undo reinstalls older versions), the old conffiles kept, dpkg's lock
/// waited for.
fn apt_install() -> Vec<String> {
    let mut argv = strings(&[
        "apt-get",
        "install",
        "-y",
        "--allow-downgrades",
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
    ]);
    argv.push("-o".into());
    argv.push(format!("DPkg::Lock::Timeout={LOCK_WAIT_SECS}"));
    argv
}

/// `apt-get install -y …` of `record`'s arguments.
pub fn change(record: &PackagesRecord) -> Result<()> {
    let mut argv = apt_install();
    argv.extend(record.args.iter().cloned());
    let f = run(&argv, APT_TIMEOUT)?;
    log_output(&f);
    check(&argv, &f).context("the packages could not be installed")
}

/// Puts `record.before` back as far as it can: installed ones removed,
/// changed or removed ones reinstalled from `debs`. Returns a note per
/// package it could not put back.
pub fn undo(record: &PackagesRecord, debs: &Path) -> Result<Vec<String>> {
    let mut kept = Vec::new();
    // dpkg may have been interrupted half-way.
    let argv = strings(&["dpkg", "--configure", "-a"]);
    let f = run(&argv, APT_TIMEOUT)?;
    log_output(&f);
    check(&argv, &f)?;
    let names: Vec<&str> = record.before.iter().map(|(n, _)| n.as_str()).collect();
    let now = installed(&RootFs::open(Path::new("/"))?, &names)?;
    let remove: Vec<String> = record
        .before
        .iter()
        .filter(|(n, old)| old.is_none() && now.contains_key(n))
        .map(|(n, _)| format!("{n}-"))
        .collect();
    let mut reinstall = Vec::new();
    for (name, old) in &record.before {
        let Some(old) = old else { continue };
        if now.get(name) == Some(old) {
            continue;
        }
        match deb_in(debs, name, old) {
            Some(deb) => reinstall.push(deb.display().to_string()),
            None => {
                warn!(package = %name, "cannot put {name} {old} back: its .deb could not be saved");
                kept.push(format!("{name} not put back to {old} (no .deb)"));
            }
        }
    }
    if remove.is_empty() && reinstall.is_empty() {
        return Ok(kept);
    }
    // apt removes what depends on a package it removes: a removal that
    // would take anything else along (say a reinstall could not happen)
    // is not made.
    let mut remove = remove;
    if !remove.is_empty() {
        let mut argv = strings(&["apt-get", "-s", "-o", "Debug::NoLocking=1", "install"]);
        argv.extend(reinstall.iter().cloned());
        argv.extend(remove.iter().cloned());
        let f = run(&argv, Duration::from_secs(120))?;
        let sim = crate::plan::packages::parse_simulation(&String::from_utf8_lossy(&f.stdout.tail));
        let asked: Vec<&str> = remove.iter().map(|r| r.trim_end_matches('-')).collect();
        let collateral: Vec<&String> = sim
            .removes
            .keys()
            .filter(|n| !asked.contains(&n.as_str()))
            .collect();
        if !f.status.is_some_and(|s| s.success()) || !collateral.is_empty() {
            for r in &asked {
                warn!(package = %r, "kept {r}: removing it would also remove {collateral:?}");
                kept.push(format!(
                    "kept package {r}: removing it would also remove {collateral:?}"
                ));
            }
            remove.clear();
        }
    }
    if remove.is_empty() && reinstall.is_empty() {
        return Ok(kept);
    }
    let mut argv = apt_install();
    argv.extend(reinstall);
    argv.extend(remove);
    let f = run(&argv, APT_TIMEOUT)?;
    log_output(&f);
    check(&argv, &f).context("cannot put the packages back")?;
    info!(packages = ?record.before, "reverted: packages put back");
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_query_lines_are_read() {
        let got = parse_installed("demo\tii \t1.0\nold\trc \t0.9\ngone\tun \t\nhalf\tiF \t2.0\n");
        assert_eq!(
            got,
            BTreeMap::from([
                ("demo".to_string(), "1.0".to_string()),
                ("half".to_string(), "2.0".to_string())
            ])
        );
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
