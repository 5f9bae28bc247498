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

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tracing::{info, warn};

use crate::desired::packages::PackageDecl;
use crate::effects::process::{self, Invocation};
use crate::effects::rootfs::RootFs;
pub use crate::plan::packages::{ObservedPackages, PackagesRecord};

/// How long the packages stage may take in all (re-simulation, saving the
/// old `.deb`s, apt), and separately its undo. Together well below the
/// daemon's `MAX_SYNC` (15 minutes), after which its watchdog would stop
/// the agent mid-sync: a stage that runs out is stopped here, and undone,
/// rather than killed by systemd.
pub const STAGE_BUDGET: Duration = Duration::from_secs(7 * 60);
pub const UNDO_BUDGET: Duration = Duration::from_secs(5 * 60);

/// How long apt waits for dpkg's lock before it fails naming it.
const LOCK_WAIT_SECS: u32 = 120;

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

fn live(fs: &RootFs) -> bool {
    fs.path() == Path::new("/")
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

/// What dpkg says of one package.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    /// Current state "installed", no error flag.
    Installed(String),
    /// Unpacked, half-configured, half-installed, awaiting triggers, or
    /// flagged for reinstallation: a dpkg run did not finish.
    Half { version: String, abbrev: String },
}

fn dpkg_query(fs: &RootFs, names: &[&str]) -> Result<BTreeMap<String, Status>> {
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
/// all its versions joined, so any change to one shows.
fn parse_status(text: &str) -> BTreeMap<String, Status> {
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
            Some(Status::Installed(v)) | Some(Status::Half { version: v, .. }) => {
                v.push(',');
                v.push_str(version);
            }
            None => {
                out.insert(name.to_string(), status);
            }
        }
    }
    out
}

/// Installed versions of `names` in the root's dpkg database (a
/// half-installed package is not installed).
pub fn installed(fs: &RootFs, names: &[&str]) -> Result<BTreeMap<String, String>> {
    if names.is_empty() {
        return Ok(BTreeMap::new());
    }
    Ok(dpkg_query(fs, names)?
        .into_iter()
        .filter_map(|(n, s)| match s {
            Status::Installed(v) => Some((n, v)),
            Status::Half { .. } => None,
        })
        .collect())
}

/// Every package dpkg knows, with its state: before and after apt runs,
/// their difference is what apt did.
fn snapshot() -> Result<BTreeMap<String, String>> {
    Ok(dpkg_query(&RootFs::open(Path::new("/"))?, &[])?
        .into_iter()
        .map(|(n, s)| match s {
            Status::Installed(v) => (n, v),
            Status::Half { version, abbrev } => (n, format!("{version} (dpkg state {abbrev})")),
        })
        .collect())
}

/// What changed between two snapshots: name → version after (`None`:
/// gone).
fn difference(
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

/// `apt-get install -y` as both the simulation and the change run it, so
/// what the plan shows is what apt does: downgrades allowed (an undo
/// reinstalls older versions), never a purge nor an autoremove, the old
/// conffiles kept, dpkg's lock waited for. With `-y`, apt refuses held and
/// Essential packages, in the simulation too.
fn apt_install(simulate: bool) -> Vec<String> {
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
    argv.push(format!("DPkg::Lock::Timeout={LOCK_WAIT_SECS}"));
    if simulate {
        argv.extend(strings(&["-s", "-o", "Debug::NoLocking=1"]));
    }
    argv
}

/// Whether `line` names `name` as a whole word (`nginx` is not named by
/// `nginx-light`).
fn mentions(line: &str, name: &str) -> bool {
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
fn refusal(f: &process::Finished, decls: &[&PackageDecl]) -> Vec<String> {
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

/// Reads what the host has of `decls`; on the live system, as root, when
/// anything must change, what apt would do and what can be undone.
///
/// An error is the host's (a tool that cannot run, dpkg interrupted
/// half-way); what apt refuses of the repository's declarations is in
/// [`ObservedPackages::refused`].
pub fn observe(fs: &RootFs, decls: &[PackageDecl], root: bool) -> Result<ObservedPackages> {
    let mut out = ObservedPackages {
        managed: root && live(fs),
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

/// `dpkg --audit`: anything half-installed on the host (not only what the
/// repository declares) makes apt refuse to run, after the plan said it
/// would.
fn audit() -> Result<()> {
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

/// Before the packages stage's `started` mark: asks apt again what it
/// would do (the package lists may have changed since the plan) and
/// refuses anything else; saves each version the change replaces into
/// `debs` (`tx/<txid>/debs`), durably, from apt's cache or its source,
/// refusing to go on when one the plan called reversible cannot be saved.
/// Returns dpkg's snapshot of every package, to tell afterwards what apt
/// did.
pub fn prepare(
    record: &PackagesRecord,
    debs: &Path,
    budget: &Budget,
) -> Result<BTreeMap<String, String>> {
    let mut argv = apt_install(true);
    argv.extend(record.args.iter().cloned());
    let f = run(&argv, budget.left()?)?;
    check(&argv, &f, budget.left()?)
        .context("apt no longer accepts what the plan showed; sync again to plan anew")?;
    let now =
        crate::plan::packages::parse_simulation(&String::from_utf8_lossy(&f.stdout.tail)).effect();
    if now != record.expected() {
        bail!(
            "apt would now do something else than the plan showed (the package lists changed since): {}; sync again to plan anew",
            describe_effect(&now)
        );
    }
    let missing = save_previous(record, debs, budget)?;
    let unexpected: Vec<&String> = missing
        .iter()
        .filter(|(name, _)| !record.irreversible.contains(name))
        .map(|(_, what)| what)
        .collect();
    if !unexpected.is_empty() {
        bail!(
            "cannot save the .deb of {} (the plan showed these changes as reversible); nothing was changed: check the apt sources and sync again",
            unexpected
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for (_, what) in &missing {
        warn!(
            "{what} cannot be put back by an undo: its .deb could not be saved (the plan said so)"
        );
    }
    snapshot()
}

fn describe_effect(effect: &BTreeMap<String, Option<String>>) -> String {
    effect
        .iter()
        .map(|(n, v)| match v {
            Some(v) => format!("{n} {v}"),
            None => format!("{n} removed"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Saves each version `record` replaces into `debs`, and makes them
/// durable. Returns (name, "name version") of those it could not save.
fn save_previous(
    record: &PackagesRecord,
    debs: &Path,
    budget: &Budget,
) -> Result<Vec<(String, String)>> {
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
        let f = run(&argv, budget.left()?)?;
        if check(&argv, &f, budget.left()?).is_err() || deb_in(debs, name, old).is_none() {
            missing.push((name.clone(), format!("{name} {old}")));
        }
    }
    // Only the saved versions stay (a download may bring dependencies),
    // each made durable before the stage's mark allows an undo to need it.
    for e in std::fs::read_dir(debs).into_iter().flatten().flatten() {
        let keep = e.file_name().to_str().is_some_and(|n| {
            record.before.iter().any(|(name, old)| {
                old.as_ref()
                    .is_some_and(|o| n.starts_with(&deb_prefix(name, o)))
            })
        });
        if !e.path().is_file() {
            continue;
        }
        if keep {
            std::fs::File::open(e.path())
                .and_then(|f| f.sync_all())
                .with_context(|| format!("cannot fsync {}", e.path().display()))?;
        } else {
            let _ = std::fs::remove_file(e.path());
        }
    }
    std::fs::File::open(debs)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot fsync {}", debs.display()))?;
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
        info!(target: "driftless::apt", "{line}");
    }
}

/// `apt-get install -y …` of `record`'s arguments, then what dpkg says it
/// did. Whatever apt touched beyond the plan joins `record` (so the undo
/// covers it) and fails the stage; `record.after` becomes what dpkg has.
/// The caller writes `record` to the journal whatever this returns.
pub fn change(
    record: &mut PackagesRecord,
    before: &BTreeMap<String, String>,
    budget: &Budget,
) -> Result<()> {
    let mut argv = apt_install(false);
    argv.extend(record.args.iter().cloned());
    let timeout = budget.left()?;
    let f = run(&argv, timeout)?;
    log_output(&f);
    let ran = check(&argv, &f, timeout).context("the packages could not be installed");
    let after = snapshot()?;
    let did = difference(before, &after);
    let expected = record.expected();
    for (name, now) in &did {
        if !record.before.iter().any(|(n, _)| n == name) {
            record
                .before
                .push((name.clone(), before.get(name).cloned()));
        }
        match record.after.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = now.clone(),
            None => record.after.push((name.clone(), now.clone())),
        }
    }
    ran?;
    if did != expected {
        bail!(
            "apt did something else than the plan showed: it did {}; the plan showed {}",
            describe_effect(&did),
            describe_effect(&expected)
        );
    }
    Ok(())
}

/// Repairs what an interrupted dpkg left (only when `dpkg --audit` says
/// so): `dpkg --configure -a`, keeping the old conffiles. A failure is
/// reported and the undo goes on (reinstalling the old version often is
/// the repair), unless dpkg's lock is held (then the next run tries
/// again).
fn repair_dpkg(budget: &Budget, kept: &mut Vec<String>) -> Result<()> {
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
        if f.stderr.lines(40).iter().any(|l| l.contains("lock")) {
            return Err(e.context("dpkg's lock is held by another program"));
        }
        let why = format!("{}: {}", f.describe(Some(timeout)), f.stderr.last_line(300));
        warn!("dpkg --configure -a {why}; putting the old versions back anyway");
        kept.push(format!("dpkg --configure -a failed first ({why})"));
    }
    Ok(())
}

/// Puts `record.before` back as far as it can: installed ones removed,
/// changed or removed ones reinstalled from `debs`. Returns a note per
/// package it could not put back.
pub fn undo(record: &PackagesRecord, debs: &Path) -> Result<Vec<String>> {
    let budget = Budget::new("undo of the packages stage", UNDO_BUDGET);
    let mut kept = Vec::new();
    repair_dpkg(&budget, &mut kept)?;
    let names: Vec<&str> = record.before.iter().map(|(n, _)| n.as_str()).collect();
    let now = dpkg_query(&RootFs::open(Path::new("/"))?, &names)?;
    let after = record.expected();
    let mut remove = Vec::new();
    let mut reinstall = Vec::new();
    for (name, old) in &record.before {
        // A half-installed package (apt was interrupted) counts as
        // present at no version: it is removed or reinstalled.
        let cur = now.get(name);
        let version = match cur {
            Some(Status::Installed(v)) => Some(v),
            _ => None,
        };
        if version == old.as_ref() && (cur.is_some() == old.is_some()) {
            continue;
        }
        // Changed since by someone else (neither what it was nor what
        // apt made it).
        if let (Some(cur), Some(Some(made))) = (version, after.get(name)) {
            if cur != made {
                warn!(package = %name, "left {name} at {cur}: it changed since the transaction made it {made}");
                kept.push(format!(
                    "left package {name} at {cur}: changed since the transaction made it {made}"
                ));
                continue;
            }
        }
        match old {
            None => remove.push(format!("{name}-")),
            Some(old) => match deb_in(debs, name, old) {
                Some(deb) => reinstall.push(deb.display().to_string()),
                None => {
                    warn!(package = %name, "cannot put {name} {old} back: its .deb could not be saved");
                    kept.push(format!("{name} not put back to {old} (no .deb)"));
                }
            },
        }
    }
    // apt removes what depends on a package it removes or downgrades: the
    // exact final command is simulated first, and an undo that would
    // take anything else along is narrowed (no removals), or not made.
    let mut with_removals = true;
    let attempt = loop {
        let attempt = if with_removals {
            [reinstall.clone(), remove.clone()].concat()
        } else {
            reinstall.clone()
        };
        if attempt.is_empty() {
            return Ok(kept);
        }
        let mut argv = apt_install(true);
        argv.extend(attempt.iter().cloned());
        let f = run(&argv, budget.left()?)?;
        let sim = crate::plan::packages::parse_simulation(&String::from_utf8_lossy(&f.stdout.tail));
        let asked: Vec<&str> = if with_removals {
            remove.iter().map(|r| r.trim_end_matches('-')).collect()
        } else {
            Vec::new()
        };
        let collateral: Vec<&String> = sim
            .removes
            .keys()
            .filter(|n| !asked.contains(&n.as_str()))
            .collect();
        if f.status.is_some_and(|s| s.success()) && collateral.is_empty() {
            break attempt;
        }
        let why = if collateral.is_empty() {
            format!("apt refuses it: {}", f.stderr.last_line(300))
        } else {
            format!("it would also remove {collateral:?}")
        };
        if with_removals && !remove.is_empty() {
            for r in &asked {
                warn!(package = %r, "kept {r}: {why}");
                kept.push(format!("kept package {r}: removing it {why}"));
            }
            with_removals = false;
            continue;
        }
        warn!("cannot put the packages back: {why}");
        kept.push(format!(
            "packages not put back ({}): {why}",
            reinstall.join(", ")
        ));
        return Ok(kept);
    };
    let mut argv = apt_install(false);
    argv.extend(attempt);
    let timeout = budget.left()?;
    let f = run(&argv, timeout)?;
    log_output(&f);
    check(&argv, &f, timeout).context("cannot put the packages back")?;
    info!(packages = ?record.before, "reverted: packages put back");
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_query_lines_are_read_and_half_installed_is_not_installed() {
        let got = parse_status(
            "demo\tii \t1.0\nheld\thi \t3.0\nold\trc \t0.9\ngone\tun \t\nhalf\tiF \t2.0\nreinst\tiiR\t4.0\nlib\tii \t1\nlib\tii \t2\n",
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
            ])
        );
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

    #[test]
    fn apt_cache_policy_says_whether_a_version_has_a_source() {
        let text = "demo:\n  Installed: 1.0\n  Candidate: 2.0\n  Version table:\n     2.0 500\n        500 file:/srv/repo ./ Packages\n *** 1.0 100\n        100 /var/lib/dpkg/status\n";
        assert!(policy_has_source(text, "2.0"));
        assert!(!policy_has_source(text, "1.0"));
        let both = "demo:\n  Version table:\n *** 1.0 500\n        500 file:/srv/repo ./ Packages\n        100 /var/lib/dpkg/status\n";
        assert!(policy_has_source(both, "1.0"));
    }
}
