//! The packages stage of a transaction: before its mark, apt asked again
//! and the old versions saved; after it, apt run and what it did checked
//! against the plan.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tracing::warn;

use super::apt::{apt_install, cached_deb, deb_in, deb_prefix, log_output};
use super::dpkg::{difference, snapshot};
use super::{check, lock_wait_secs, run, Budget, PackagesRecord};

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
            format!("DPkg::Lock::Timeout={}", lock_wait_secs()),
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
    let expected = record.expected();
    // What changed while apt ran but neither the plan expected nor apt's
    // output names was another program's (unattended-upgrades between
    // the snapshot and apt's lock): not the transaction's to undo.
    let by_apt = super::apt::touched(&f);
    let (did, others): (BTreeMap<_, _>, BTreeMap<_, _>) =
        difference(before, &after).into_iter().partition(|(n, _)| {
            expected.contains_key(n) || by_apt.as_ref().is_none_or(|t| t.contains(n))
        });
    if !others.is_empty() {
        warn!(
            "changed while apt ran, but not by it (another program?): {}; left out of the transaction",
            describe_effect(&others)
        );
    }
    for (name, now) in &did {
        if !record.before.iter().any(|(n, _)| n == name) {
            record
                .before
                .push((name.clone(), before.get(name).cloned()));
        }
        // The version only: a package apt left half-configured is at the
        // version it unpacked (the undo compares versions, after dpkg's
        // repair may have finished it).
        let version = now.as_ref().map(|v| super::dpkg::version_of(v).to_string());
        match record.after.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = version,
            None => record.after.push((name.clone(), version)),
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
