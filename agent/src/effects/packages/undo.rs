//! The undo of a packages stage (revert, rollback, recovery): dpkg
//! repaired if an interrupted run left it half-way, packages the stage
//! installed removed, those it changed or removed reinstalled from the
//! transaction's `debs/`, and nothing taken along that nobody asked for.

use std::path::Path;

use anyhow::{Context, Result};
use tracing::{info, warn};

use super::apt::{apt_install, deb_in, log_output};
use super::dpkg::{dpkg_query, repair_dpkg, Status};
use super::{check, run, wait_if_locked, Budget, PackagesRecord, UNDO_BUDGET};
use crate::effects::rootfs::RootFs;

/// Puts `record.before` back as far as it can: installed ones removed,
/// changed or removed ones reinstalled from `debs`. Returns a note per
/// package it could not put back.
pub fn undo(record: &PackagesRecord, debs: &Path) -> Result<Vec<String>> {
    // The record comes from the transaction's journal, in the untrusted
    // state directory: a name apt or dpkg would read as an option (or a
    // removal) is refused before either runs.
    // (Versions too: they name the saved `.deb` files.)
    let plausible = |s: &str| {
        s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '-' | ':' | '~'))
    };
    if let Some(bad) = record
        .before
        .iter()
        .chain(&record.after)
        .flat_map(|(n, v)| std::iter::once(n).chain(v))
        .find(|s| !plausible(s))
    {
        anyhow::bail!(
            "the journal names the package or version {:?}, which is not a Debian one: it is corrupt; nothing was run. \
             Check the packages with `dpkg --audit`, then move the transaction directory away",
            bad
        );
    }
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
        let timeout = budget.left()?;
        let f = run(&argv, timeout)?;
        if f.timed_out {
            // Not apt refusing the undo (which gives it up for good): a
            // failed try, counted.
            check(&argv, &f, timeout).context("cannot simulate putting the packages back")?;
        }
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
    check(&argv, &f, timeout)
        .map_err(|e| wait_if_locked(e).0)
        .context("cannot put the packages back")?;
    info!(packages = ?record.before, "reverted: packages put back");
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The record is read from a journal in the untrusted state directory:
    /// a name starting with `-` reached apt-get and dpkg-query as an
    /// option, a version with `/` named a `.deb` outside `debs/`. Refused
    /// before anything runs.
    #[test]
    fn a_forged_package_record_is_refused_before_apt_or_dpkg_runs() {
        let before = |before| PackagesRecord {
            before,
            ..PackagesRecord::default()
        };
        for record in [
            before(vec![("--force-all".to_string(), None)]),
            before(vec![(
                "nginx".to_string(),
                Some("../../../etc/x".to_string()),
            )]),
            before(vec![("".to_string(), None)]),
            // The versions it made (logged, compared) are checked too.
            PackagesRecord {
                before: vec![("nginx".to_string(), None)],
                after: vec![("nginx".to_string(), Some("1\u{1b}[2J".to_string()))],
                ..PackagesRecord::default()
            },
        ] {
            let err = format!(
                "{:#}",
                undo(&record, Path::new("/nonexistent")).unwrap_err()
            );
            assert!(
                err.contains("not a Debian one") && err.contains("nothing was run"),
                "{err}"
            );
        }
    }
}
