//! dpkg's side: what its database says of a package (installed, or left
//! half-way by an interrupted run), a snapshot of every package to tell
//! what apt did, and the repair of an interrupted run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use tracing::warn;

use super::apt::log_output;
use super::{check, run, strings, wait_if_locked, Budget};
use crate::effects::rootfs::RootFs;

/// What dpkg says of one package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Status {
    /// Current state "installed", no error flag.
    Installed(String),
    /// Unpacked, half-configured, half-installed, awaiting triggers, or
    /// flagged for reinstallation: a dpkg run did not finish.
    Half { version: String, abbrev: String },
}

pub(super) fn dpkg_query(fs: &RootFs, names: &[&str]) -> Result<BTreeMap<String, Status>> {
    let mut argv = vec!["dpkg-query".to_string()];
    if !fs.is_host_root() {
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
    let timeout = Duration::from_secs(60);
    let f = run(&argv, timeout)?;
    // Exit 1 with "no packages found matching X" for unknown names: fine.
    if f.status.and_then(|s| s.code()).is_none_or(|c| c > 1) {
        check(&argv, &f, timeout)?;
    }
    Ok(parse_status(&String::from_utf8_lossy(&f.stdout.tail)))
}

/// `name\tii \tversion` lines. Not installed (`n`) and config files only
/// (`c`) are absent; a name listed twice (several architectures) reads as
/// its versions joined when they differ, so any change to one shows.
pub(super) fn parse_status(text: &str) -> BTreeMap<String, Status> {
    let mut out: BTreeMap<String, Status> = BTreeMap::new();
    for l in text.lines() {
        let mut f = l.split('\t');
        let (Some(name), Some(abbrev), Some(version)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let mut c = abbrev.chars();
        let (current, error) = (c.nth(1), c.next().unwrap_or(' '));
        let status = match current {
            None | Some('n' | 'c') => continue,
            Some('i') if error == ' ' => Status::Installed(version.to_string()),
            Some(_) => Status::Half {
                version: version.to_string(),
                abbrev: abbrev.trim_end().to_string(),
            },
        };
        match out.get_mut(name) {
            // Installed for several architectures (Multi-Arch: same): one
            // version when they agree, as apt's simulation says it.
            Some(Status::Installed(v)) | Some(Status::Half { version: v, .. }) => {
                if !v.split(',').any(|have| have == version) {
                    v.push(',');
                    v.push_str(version);
                }
            }
            None => {
                out.insert(name.to_string(), status);
            }
        }
    }
    out
}

/// Every package dpkg knows, with its state: before and after apt runs,
/// their difference is what apt did.
pub(super) fn snapshot() -> Result<BTreeMap<String, String>> {
    Ok(dpkg_query(&RootFs::open(Path::new("/"))?, &[])?
        .into_iter()
        .map(|(n, s)| match s {
            Status::Installed(v) => (n, v),
            Status::Half { version, abbrev } => (n, format!("{version} (dpkg state {abbrev})")),
        })
        .collect())
}

/// The version part of a snapshot entry (`3.0 (dpkg state iF)` → `3.0`).
pub(super) fn version_of(entry: &str) -> &str {
    entry.split_once(" (dpkg state ").map_or(entry, |(v, _)| v)
}

/// What changed between two snapshots: name → version after (`None`:
/// gone).
pub(super) fn difference(
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
) -> BTreeMap<String, Option<String>> {
    let names: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    names
        .into_iter()
        .filter(|n| before.get(*n) != after.get(*n))
        .map(|n| (n.clone(), after.get(n).cloned()))
        .collect()
}

/// `dpkg --audit`: anything half-installed on the host (not only what the
/// repository declares) makes apt refuse to run, after the plan said it
/// would.
pub(super) fn audit() -> Result<()> {
    let argv = strings(&["dpkg", "--audit"]);
    let timeout = Duration::from_secs(60);
    let f = run(&argv, timeout)?;
    let said = f.stdout.lines(40);
    if !f.status.is_some_and(|s| s.success()) || said.iter().any(|l| !l.trim().is_empty()) {
        bail!(
            "dpkg's database needs repair before packages can change (dpkg --audit: {}): run `dpkg --configure -a` (or `apt-get -f install`) as root, then sync again",
            said.iter()
                .map(|l| l.trim())
                .filter(|l| !l.is_empty())
                .take(6)
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}

/// Repairs what an interrupted dpkg left (only when `dpkg --audit` says
/// so): `dpkg --configure -a`, keeping the old conffiles. A failure is
/// reported and the undo goes on (reinstalling the old version often is
/// the repair), unless a lock of dpkg or apt is held (then the next run
/// tries again).
pub(super) fn repair_dpkg(budget: &Budget, kept: &mut Vec<String>) -> Result<()> {
    let timeout = budget.left()?;
    let argv = strings(&["dpkg", "--audit"]);
    let f = run(&argv, timeout)?;
    if f.status.is_some_and(|s| s.success())
        && f.stdout.lines(1).iter().all(|l| l.trim().is_empty())
    {
        return Ok(());
    }
    let argv = strings(&[
        "dpkg",
        "--force-confdef",
        "--force-confold",
        "--configure",
        "-a",
    ]);
    let timeout = budget.left()?;
    let f = run(&argv, timeout)?;
    log_output(&f);
    if let Err(e) = check(&argv, &f, timeout) {
        let (e, locked) = wait_if_locked(e);
        if locked {
            return Err(e);
        }
        let why = format!("{}: {}", f.describe(Some(timeout)), f.stderr.last_line(300));
        warn!("dpkg --configure -a {why}; putting the old versions back anyway");
        kept.push(format!("dpkg --configure -a failed first ({why})"));
    }
    Ok(())
}

/// The locks dpkg and apt hold while they change packages (`fcntl` write
/// locks): dpkg's, its frontends', and apt's download directory's, which
/// `apt-get install` takes too and does not wait for (apt-daily's
/// download-only run holds it).
const LOCKS: [&str; 3] = [
    "/var/lib/dpkg/lock-frontend",
    "/var/lib/dpkg/lock",
    "/var/cache/apt/archives/lock",
];

/// The first of these locks another process holds now, if any.
pub(super) fn lock_held() -> Option<&'static str> {
    LOCKS.into_iter().find(|p| write_locked(Path::new(p)))
}

/// Whether another process holds an `fcntl` lock on `path` that a write
/// lock would conflict with (`F_GETLK`: it takes nothing). A missing or
/// unreadable file holds no lock.
fn write_locked(path: &Path) -> bool {
    let Ok((f, _)) = crate::effects::state::open_nofollow(path) else {
        return false;
    };
    // SAFETY: a plain C struct; zero is a valid value of every field.
    let mut probe: libc::flock = unsafe { std::mem::zeroed() };
    probe.l_type = libc::F_WRLCK as libc::c_short;
    probe.l_whence = libc::SEEK_SET as libc::c_short;
    nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_GETLK(&mut probe)).is_ok()
        && probe.l_type != libc::F_UNLCK as libc::c_short
}

/// dpkg's database of installed packages: the quick check watches it
/// when packages are declared.
pub const DPKG_STATUS: &str = "/var/lib/dpkg/status";

#[cfg(test)]
mod tests {
    use super::*;

    /// dpkg and apt hold `fcntl` write locks; a lock held by another
    /// process is seen, and seen to go when that process lets go. (A lock
    /// this process held would not be: `F_GETLK` reports other processes'
    /// locks only, and the agent never takes dpkg's.)
    #[test]
    fn a_write_lock_held_by_another_process_is_seen_and_seen_to_go() {
        use std::io::BufRead;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("lock-frontend");
        std::fs::write(&path, b"").unwrap();
        assert!(!write_locked(&path));
        assert!(!write_locked(&tmp.path().join("missing")));
        let mut holder = std::process::Command::new("python3")
            .args([
                "-c",
                "import fcntl, sys\nf = open(sys.argv[1], 'r+')\nfcntl.lockf(f, fcntl.LOCK_EX)\nprint('locked', flush=True)\nsys.stdin.read()",
            ])
            .arg(&path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 (a test prerequisite: tests/install-prereqs)");
        let mut line = String::new();
        std::io::BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked");
        assert!(write_locked(&path));
        drop(holder.stdin.take());
        holder.wait().unwrap();
        assert!(!write_locked(&path));
    }
    #[test]
    fn dpkg_query_lines_are_read_and_half_installed_is_not_installed() {
        let got = parse_status(
            "demo\tii \t1.0\nheld\thi \t3.0\nold\trc \t0.9\ngone\tun \t\nhalf\tiF \t2.0\nreinst\tiiR\t4.0\nlib\tii \t1\nlib\tii \t2\nlibc6\tii \t2.36\nlibc6\tii \t2.36\n",
        );
        let half = |v: &str, a: &str| Status::Half {
            version: v.into(),
            abbrev: a.into(),
        };
        assert_eq!(
            got,
            BTreeMap::from([
                ("demo".to_string(), Status::Installed("1.0".into())),
                ("held".to_string(), Status::Installed("3.0".into())),
                ("half".to_string(), half("2.0", "iF")),
                ("reinst".to_string(), half("4.0", "iiR")),
                ("lib".to_string(), Status::Installed("1,2".into())),
                // Both architectures at one version: as apt says it.
                ("libc6".to_string(), Status::Installed("2.36".into())),
            ])
        );
    }

    #[test]
    fn what_apt_did_is_the_difference_of_two_snapshots() {
        let before = BTreeMap::from([
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "1".to_string()),
            ("c".to_string(), "1".to_string()),
        ]);
        let after = BTreeMap::from([
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "2".to_string()),
            ("d".to_string(), "1".to_string()),
        ]);
        assert_eq!(
            difference(&before, &after),
            BTreeMap::from([
                ("b".to_string(), Some("2".to_string())),
                ("c".to_string(), None),
                ("d".to_string(), Some("1".to_string())),
            ])
        );
    }
}
