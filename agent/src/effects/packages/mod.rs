//! The packages stage of a transaction: reading dpkg's database, asking
//! apt what it would do, installing and removing with apt, and undoing
//! that when the transaction fails.
//!
//! **Observe** (plan time, `observe`). `dpkg-query -W` of the declared
//! packages (in the root's dpkg database under `--root`); only dpkg's
//! "installed" state counts, and a declared package left half-installed
//! by an interrupted run stops the plan (as does anything `dpkg --audit`
//! reports, which would make apt refuse later). On the live system, as
//! root, when something must change: `apt-get install -y -s` of the
//! unsatisfied declarations, with exactly the options the change uses
//! (`apt::apt_install`): apt refuses a held or Essential package there
//! as it would for real. `apt-cache policy` says whether each version a
//! change replaces can be had again. Under `--root`, packages are read
//! but never changed: the plan says so.
//!
//! **Change** (in the transaction, after the accounts, before the files;
//! `stage`). Before the `packages-started` mark: apt is asked again
//! (the package lists may have moved since the plan) and anything but the
//! plan's effect refused; each version to be replaced or removed is saved
//! as a `.deb` in the transaction's `debs/` and fsynced, so the undo needs
//! no network (a missing one the plan called reversible stops the stage
//! here). Then `apt-get install -y`; dpkg's snapshot of every package
//! before and after tells what apt really did, which joins the journal
//! and must be the plan's effect. Output goes to the log (target
//! `driftless::apt`).
//!
//! **Undo** (revert, rollback, recovery; only once the stage began;
//! [`undo()`]): an interrupted dpkg is repaired first (`dpkg --configure
//! -a`, only when `dpkg --audit` asks; its failure is reported and the
//! undo goes on), packages the stage installed are removed (their
//! conffiles stay: dpkg's `rc`), those it changed or removed reinstalled
//! from `debs/`. The exact final apt command is simulated first: an undo
//! that would remove anything else is narrowed or not made, and reported.
//! A package someone changed since is left alone. One whose old version
//! could not be saved is reported, never guessed: the plan marked that
//! change irreversible before it happened.
//!
//! Each of the stage and the undo has a time budget ([`STAGE_BUDGET`],
//! [`UNDO_BUDGET`]) that keeps a sync inside the daemon's watchdog.

mod apt;
mod dpkg;
mod stage;
mod undo;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::desired::packages::PackageDecl;
use crate::effects::process::{self, Invocation};
use crate::effects::rootfs::RootFs;
pub use crate::plan::packages::{ObservedPackages, PackagesRecord};
use apt::{apt_install, can_fetch_again, refusal};
pub use dpkg::DPKG_STATUS;
use dpkg::{audit, dpkg_query, Status};
pub use stage::{change, prepare};
pub use undo::undo;

/// How long the packages stage may take in all (re-simulation, saving the
/// old `.deb`s, apt), and separately its undo. Together well below the
/// daemon's `MAX_SYNC` (15 minutes), after which its watchdog would stop
/// the agent mid-sync: a stage that runs out is stopped here, and undone,
/// rather than killed by systemd.
pub const STAGE_BUDGET: Duration = Duration::from_secs(7 * 60);
pub const UNDO_BUDGET: Duration = Duration::from_secs(5 * 60);

/// How long apt waits for dpkg's lock before it fails naming it.
const LOCK_WAIT_SECS: u32 = 120;

/// [`LOCK_WAIT_SECS`], which debug builds (the test suite) may shorten
/// with `DRIFTLESS_TEST_LOCK_WAIT_SECS`, so that a test of a held lock
/// does not wait two minutes; release builds ignore the variable.
fn lock_wait_secs() -> u32 {
    crate::effects::failpoint::test_knob("DRIFTLESS_TEST_LOCK_WAIT_SECS").unwrap_or(LOCK_WAIT_SECS)
}

/// The undo of a packages stage could not finish because another program
/// (apt, unattended-upgrades) holds dpkg's or apt's lock: the next run
/// tries again without counting a failed try ([`must_wait`]). Anything
/// else, a tool that timed out or the budget spent included, counts: a
/// maintainer script that hangs every time must not keep the agent from
/// ever applying the fix.
///
/// A type, not words searched in the message: the message also holds
/// package names and apt's output, and "lock" is in many of them (a
/// failure that named `flock` was taken for a wait, and retried forever).
#[derive(Debug)]
pub struct MustWait(pub String);

impl std::fmt::Display for MustWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MustWait {}

/// Whether `e` (or any error or context it wraps) is a [`MustWait`].
pub fn must_wait(e: &anyhow::Error) -> bool {
    e.downcast_ref::<MustWait>().is_some()
}

/// `e`, marked [`MustWait`] when a lock of dpkg or apt is held right now
/// (probed once), and whether it was.
fn wait_if_locked(e: anyhow::Error) -> (anyhow::Error, bool) {
    match dpkg::lock_held() {
        Some(lock) => (
            e.context(MustWait(format!("{lock} is held by another program"))),
            true,
        ),
        None => (e, false),
    }
}

/// The time left of a stage's budget.
pub struct Budget {
    what: &'static str,
    total: Duration,
    until: Instant,
}

impl Budget {
    pub fn new(what: &'static str, total: Duration) -> Budget {
        Budget {
            what,
            total,
            until: Instant::now() + total,
        }
    }

    fn left(&self) -> Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "the {} ran out of its {} budget",
                self.what,
                humantime::format_duration(self.total)
            );
        }
        Ok(left)
    }
}

/// Runs an apt/dpkg tool with a clean environment: C locale (its output
/// is parsed), no questions, no needrestart prompting or restarting
/// services behind the plan (the unit actions are the plan's).
fn run(argv: &[String], timeout: Duration) -> Result<process::Finished> {
    let env = BTreeMap::from([
        ("LC_ALL".to_string(), "C".to_string()),
        ("DEBIAN_FRONTEND".to_string(), "noninteractive".to_string()),
        ("NEEDRESTART_SUSPEND".to_string(), "1".to_string()),
        ("APT_LISTCHANGES_FRONTEND".to_string(), "none".to_string()),
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

fn check(argv: &[String], f: &process::Finished, timeout: Duration) -> Result<()> {
    if f.status.is_some_and(|s| s.success()) {
        return Ok(());
    }
    let mut why = f.describe(Some(timeout));
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

/// Reads what the host has of `decls`; on the live system, as root, when
/// anything must change, what apt would do and what can be undone.
///
/// An error is the host's (a tool that cannot run, dpkg interrupted
/// half-way); what apt refuses of the repository's declarations is in
/// [`ObservedPackages::refused`].
pub fn observe(fs: &RootFs, decls: &[PackageDecl], root: bool) -> Result<ObservedPackages> {
    let mut out = ObservedPackages {
        managed: root && fs.is_host_root(),
        ..Default::default()
    };
    if decls.is_empty() {
        return Ok(out);
    }
    let names: Vec<&str> = decls.iter().map(|d| d.name.as_str()).collect();
    let status = dpkg_query(fs, &names)?;
    let half: Vec<String> = decls
        .iter()
        .filter_map(|d| match status.get(&d.name) {
            Some(Status::Half { version, abbrev }) => Some(format!(
                "{}: dpkg has {} {version} half-installed (state {abbrev})",
                d.origin, d.name
            )),
            _ => None,
        })
        .collect();
    if !half.is_empty() && out.managed {
        bail!(
            "{}\na dpkg run was interrupted: run `dpkg --configure -a` (or `apt-get -f install`) as root, then sync again",
            half.join("\n")
        );
    }
    out.installed = status
        .into_iter()
        .filter_map(|(n, s)| match s {
            Status::Installed(v) => Some((n, v)),
            Status::Half { .. } => None,
        })
        .collect();
    let unsettled: Vec<&PackageDecl> = decls
        .iter()
        .filter(|d| match (d.present, out.installed.get(&d.name)) {
            (false, None) => false,
            (true, Some(v)) => d.version.as_ref().is_some_and(|want| want != v),
            _ => true,
        })
        .collect();
    if !out.managed || unsettled.is_empty() {
        return Ok(out);
    }
    audit()?;
    out.args = unsettled.iter().map(|d| d.apt_arg()).collect();
    let mut argv = apt_install(true);
    argv.extend(out.args.iter().cloned());
    let f = run(&argv, Duration::from_secs(120))?;
    if !f.status.is_some_and(|s| s.success()) {
        if f.timed_out || f.status.is_none() {
            check(&argv, &f, Duration::from_secs(120))?;
        }
        out.refused = refusal(&f, &unsettled);
        out.refused.push(
            "(run apt-get update if the package lists are old, or check the names and versions)"
                .into(),
        );
        return Ok(out);
    }
    let sim = crate::plan::packages::parse_simulation(&String::from_utf8_lossy(&f.stdout.tail));
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

/// The mark that the packages stage began (an undo is due only then).
pub const STARTED: &str = "packages-started";

#[cfg(test)]
mod tests {
    use super::*;

    /// The bug this guards against: whether a failed undo was a wait (try
    /// again, uncounted) or a failure (counted, given up after three) was
    /// decided by searching the message for "lock", "timed out" and "ran
    /// out of its". Package names and apt's output are in that message,
    /// so a failure naming a package such as `flock` was retried forever,
    /// and so was a maintainer script that timed out every time. Now only
    /// a [`MustWait`] anywhere in the chain is a wait, and only a held
    /// lock makes one.
    #[test]
    fn only_a_held_lock_makes_a_failed_undo_a_wait_not_words_in_its_message() {
        let named = anyhow::anyhow!("apt-get install exited with 100: E: Unable to correct problems with flock, lockfile-progs")
            .context("cannot put the packages back");
        assert!(!must_wait(&named));
        let budget = Budget::new("undo of the packages stage", Duration::ZERO);
        let out = budget
            .left()
            .unwrap_err()
            .context("cannot put the packages back");
        assert!(!must_wait(&out), "{out:#}");
        let argv = strings(&["sh", "-c", "sleep 5"]);
        let f = run(&argv, Duration::from_millis(200)).unwrap();
        let e = check(&argv, &f, Duration::from_millis(200)).unwrap_err();
        assert!(
            !must_wait(&e) && format!("{e:#}").contains("timed out"),
            "{e:#}"
        );
        let locked = anyhow::anyhow!("apt-get install exited with 100")
            .context(MustWait(
                "/var/lib/dpkg/lock-frontend is held by another program".into(),
            ))
            .context("cannot put the packages back")
            .context("transaction 1");
        assert!(must_wait(&locked), "{locked:#}");
        assert!(format!("{locked:#}").contains("lock-frontend is held by another program"));
    }
}
