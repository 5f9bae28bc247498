//! Configured reboots under the fleet lock (`[fleet] reboot = true`;
//! issue 16's "reboot required" with issue 17's semaphore).
//!
//! Why a permit held across the reboot: a reboot is the most disruptive
//! thing an agent can do, and a fleet where every host reboots in the same
//! poll interval is down. A host reboots only holding one of its group's
//! permits (the same semaphore as applying, so `max_concurrent` bounds
//! applies and reboots together), only inside the group's maintenance
//! window (read from the applied commit: no reboot when it cannot be
//! read), never while its group is suspended, and only when the run that
//! found the reboot due was healthy. Every rule is checked on every
//! attempt, also when a record of an earlier attempt of the same boot
//! exists. The permit has no lease (the host is away while it reboots):
//! the host gives it back itself after the first run of the new boot whose
//! health checks pass. A host that does not come back healthy keeps it, so
//! its group stops at `max_concurrent` until a run is healthy or an
//! operator deletes the key (then the host drops its record too); that is
//! zincati's FleetLock rule. An apply while the permit is held uses it and
//! leaves it in place (`Store::try_acquire`).
//!
//! State: `reboot-permit.json` in the state directory, written durably
//! *before* etcd is asked, names the group and the boot the permit was
//! taken in, so no crash leaves a permit nobody gives back. The same boot
//! id at the next run means the reboot did not happen (systemd refused, or
//! the agent was killed first): it is asked again, or the permit given
//! back. A different one means the host is back: the run verifies it and
//! gives the permit back. `last-reboot.json` stops a loop: the same commit
//! and files asking a third time in a row, each within 24 hours of the
//! reboot before (something rewrites them at boot), do not reboot the host
//! again.
//!
//! A permit held when `reboot = true` is switched off is still given back.
//! Never under `--root` (a prefix is not a host to reboot), never without
//! `[fleet]` (an air-gapped host only gets `/run/reboot-required`).

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::run::Pass;
use super::Report;
use crate::config::FleetSettings;
use crate::effects::state::{read_json_large, write_json_atomic, StateDir};
use crate::exit::Error;
use crate::plan::diff::short;

use super::reboot_permit::{Held, FILE};

/// The reboot permit this host holds, if any. An unreadable file counts
/// as a permit held from an earlier boot (its group: the configured one):
/// giving back a permit that may be held is safe, losing one is not.
pub fn held(state: &StateDir, fleet: &FleetSettings) -> Option<Held> {
    match super::reboot_permit::read(state) {
        Ok(h) => h,
        Err(e) => {
            warn!(
                "{}: unreadable ({e:#}); taken as a reboot permit held from an earlier boot",
                FILE
            );
            Some(Held {
                group: fleet.group.clone(),
                boot_id: String::new(),
                since: 0,
                commit: None,
                fleetlock: fleet.fleetlock.clone(),
            })
        }
    }
}

/// `[fleet]` on the live system (a permit may be held even once
/// `reboot = true` was switched off: it is still given back).
fn fleet_here<'a>(pass: &Pass<'a>) -> Option<&'a FleetSettings> {
    super::fleet::active(pass.settings).filter(|_| pass.settings.live)
}

/// Whether this run starts back from a reboot this host holds a permit
/// for: it then plans in full (the quick check proves files, not health)
/// so that its checks run.
pub(super) fn verifying(pass: &Pass) -> bool {
    fleet_here(pass)
        .and_then(|f| held(&pass.state, f))
        .is_some_and(|h| h.boot_id != crate::effects::reboot::boot_id())
}

/// At the end of every run (after the fleet saw its result): gives back
/// the permit of a reboot this host came back from healthy, or reboots
/// the host when a committed change asks for it and the fleet allows it.
/// Never fails the run: what it could not do is logged, and the next run
/// tries again.
pub(super) fn after_run(pass: &Pass, result: &Result<Report, Error>) {
    let Some(fleet) = fleet_here(pass) else {
        return;
    };
    if let Err(e) = after_run_inner(pass, fleet, result) {
        warn!("fleet reboot: {e:#}; the next run tries again");
    }
}

/// The last automatic reboot: what asked for it, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LastReboot {
    commit: String,
    reasons: Vec<String>,
    time: i64,
    /// Reboots in a row for this commit and these files, each within
    /// [`LOOP_WINDOW_SECS`] of the one before.
    #[serde(default = "one")]
    count: u32,
    /// The boot it was asked from: the same boot now means that reboot
    /// has not happened yet (it is being asked again), so it is not
    /// counted twice.
    #[serde(default)]
    boot_id: String,
}

fn one() -> u32 {
    1
}

/// Reboots in a row for the same commit and files allowed (a drift
/// repaired after a reboot may honestly ask again, once).
const LOOP_MAX: u32 = 2;

const LAST: &str = "last-reboot.json";

/// A request for the same commit and reasons as a reboot less than this
/// ago is a loop (something rewrites the file at boot), not a new need.
const LOOP_WINDOW_SECS: i64 = 24 * 3600;

/// How many reboots in a row the same commit and files already caused,
/// each within [`LOOP_WINDOW_SECS`] of the one before; a reboot asked for
/// in this same boot (it did not happen yet) is not counted again.
fn in_a_row(
    last: Option<&LastReboot>,
    commit: &str,
    reasons: &[String],
    boot: &str,
    now: i64,
) -> u32 {
    last.filter(|l| {
        l.commit == commit && l.reasons == reasons && now.saturating_sub(l.time) < LOOP_WINDOW_SECS
    })
    .map_or(0, |l| {
        if l.boot_id == boot {
            l.count.saturating_sub(1)
        } else {
            l.count
        }
    })
}

fn after_run_inner(
    pass: &Pass,
    fleet: &FleetSettings,
    result: &Result<Report, Error>,
) -> Result<()> {
    let boot = crate::effects::reboot::boot_id();
    if boot.is_empty() {
        return Err(anyhow!(
            "cannot read this boot's id ({}), without which a reboot cannot be told from a run of the same boot: not rebooting",
            "/proc/sys/kernel/random/boot_id"
        ));
    }
    let held = held(&pass.state, fleet);
    if let Some(h) = held.as_ref().filter(|h| h.boot_id != boot) {
        return back_from_reboot(pass, fleet, h, result);
    }
    // From here on, a record is of this boot: a reboot asked for that did
    // not happen (a crash, systemd refused). Every rule is checked again
    // before asking again; when one says no, the permit goes back.
    let give_back = |why: &str| -> Result<()> {
        if let Some(h) = &held {
            release(pass, fleet, &h.group, h.fleetlock.as_deref())?;
            info!(group = %h.group, "{why}: the reboot permit is given back");
        }
        Ok(())
    };
    if !fleet.reboot {
        return give_back("[fleet] reboot is off");
    }
    let inventory = pass.state.inventory()?;
    let Some(request) = crate::effects::reboot::pending(&inventory, &boot) else {
        return give_back("no reboot is due any more");
    };
    let commit = inventory.commit.clone().unwrap_or_default();
    let reasons: Vec<String> = request
        .reasons
        .iter()
        .map(|r| r.path.as_str().to_string())
        .collect();
    if let Err(why) = healthy(pass, result) {
        warn!(commit = %short(&commit), "a reboot is due ({}), but {why}: not rebooting an unhealthy host", reasons.join(", "));
        return give_back("the host is not healthy");
    }
    let policy = match policy_of(pass, &commit) {
        Ok(p) => p,
        Err(e) => {
            warn!(commit = %short(&commit), "a reboot is due, but the applied commit's rollout policy (its maintenance windows) cannot be read: not rebooting: {e:#}");
            return give_back("the rollout policy cannot be read");
        }
    };
    let tz = jiff::tz::TimeZone::system();
    if let Some(why) =
        crate::rollout::decide::outside_window(&policy, &fleet.group, crate::time::now(), &tz)
    {
        info!(commit = %short(&commit), "a reboot is due, waiting: {why}");
        return give_back("outside the maintenance window");
    }
    let last: Option<LastReboot> = read_json_large(&pass.state.path().join(LAST)).unwrap_or(None);
    let again = in_a_row(last.as_ref(), &commit, &reasons, &boot, pass.now);
    if again >= LOOP_MAX {
        warn!(commit = %short(&commit), "a reboot is due again for the same change ({}), after {again} reboots for it in a row: something rewrites it at boot? Not rebooting again for the same commit and files within 24 hours; a new commit, or removing {} from the state directory, allows it", reasons.join(", "), LAST);
        return give_back("a reboot loop was stopped");
    }
    // A permit of this boot taken elsewhere (the group or the backend
    // changed since): given back first, or its record would be
    // overwritten and the permit held for good.
    if let Some(h) = held
        .as_ref()
        .filter(|h| h.group != fleet.group || h.fleetlock != fleet.fleetlock)
    {
        release(pass, fleet, &h.group, h.fleetlock.as_deref())?;
        info!(group = %h.group, "the reboot permit taken before [fleet] changed is given back");
    }
    // The record first, durably: a crash after etcd granted the permit
    // must not leave a permit nobody gives back. With the record, the
    // next run of this boot checks every rule again and takes it again (a
    // host's own permit is granted again), or gives it back.
    write_json_atomic(
        &pass.state.path().join(FILE),
        &Held {
            group: fleet.group.clone(),
            boot_id: boot.clone(),
            since: held.as_ref().map_or(pass.now, |h| h.since),
            commit: Some(commit.clone()),
            fleetlock: fleet.fleetlock.clone(),
        },
    )
    .context("cannot record the reboot permit about to be taken")?;
    crate::effects::failpoint::hit("sync.reboot.recorded")?;
    let value = serde_json::json!({"host": pass.settings.host, "reboot": boot, "commit": commit})
        .to_string();
    let taken = pass.rt.block_on(async {
        crate::effects::fleet::slots::Slots::connect(fleet)
            .await?
            .take(
                &fleet.group,
                &pass.settings.host,
                policy.max_concurrent,
                &value,
            )
            .await
    })?;
    if let Err(why) = taken {
        // Ours (taken by an earlier attempt of this boot) goes back too.
        release(pass, fleet, &fleet.group, fleet.fleetlock.as_deref())?;
        info!(commit = %short(&commit), "a reboot is due, waiting for a fleet permit: {why}");
        return Ok(());
    }
    crate::effects::failpoint::hit("sync.reboot.permit")?;
    write_json_atomic(
        &pass.state.path().join(LAST),
        &LastReboot {
            commit: commit.clone(),
            reasons: reasons.clone(),
            time: pass.now,
            count: again + 1,
            boot_id: boot.clone(),
        },
    )?;
    crate::events::rebooting(short(&commit), &reasons.join(", "));
    pass.rt.block_on(async {
        crate::effects::systemd::Systemd::connect(pass.settings.job_timeout)
            .await?
            .reboot()
            .await
    })
}

/// Gives this host's reboot permit of `group` back and drops the record.
/// `via`: the FleetLock server it was taken from, or etcd (`None`).
fn release(pass: &Pass, fleet: &FleetSettings, group: &str, via: Option<&str>) -> Result<()> {
    pass.rt.block_on(async {
        crate::effects::fleet::slots::Slots::connect_via(fleet, via)
            .await?
            .give_back(group, &pass.settings.host)
            .await
    })?;
    pass.state.remove_file(FILE).map(drop)
}

/// The first runs of a new boot, while the permit is held: healthy gives
/// it back; otherwise it is kept, unless someone (an operator unblocking
/// the group) deleted it already.
fn back_from_reboot(
    pass: &Pass,
    fleet: &FleetSettings,
    held: &Held,
    result: &Result<Report, Error>,
) -> Result<()> {
    let group = held.group.as_str();
    let via = held.fleetlock.as_deref();
    let (holds, where_) = pass.rt.block_on(async {
        let mut slots = crate::effects::fleet::slots::Slots::connect_via(fleet, via).await?;
        let holds = slots.holds(group, &pass.settings.host).await?;
        anyhow::Ok((
            holds,
            slots.describe(&fleet.prefix, group, &pass.settings.host),
        ))
    })?;
    if !holds {
        release(pass, fleet, group, via)?;
        info!(group, "back from the reboot; the fleet permit was already given back by someone else (an operator)");
        return Ok(());
    }
    match healthy(pass, result) {
        Ok(()) => {
            release(pass, fleet, group, via)?;
            info!(
                group,
                "back from the reboot and healthy: the fleet permit is given back"
            );
        }
        Err(why) => {
            warn!(group, "back from the reboot, but {why}: keeping the fleet permit, so the group waits, until a run is healthy (or an operator deletes {where_})");
        }
    }
    Ok(())
}

/// The run ended well and the applied commit's health checks passed in
/// it (run now if the run itself ran none).
fn healthy(pass: &Pass, result: &Result<Report, Error>) -> Result<(), String> {
    let report = match result {
        Ok(r) => r,
        Err(e) => return Err(format!("the run failed ({:#})", e.error)),
    };
    if let Some(n) = pass.checks_failing {
        return if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} health check(s) failed"))
        };
    }
    let applied = pass.state.inventory().ok().and_then(|i| i.commit.clone());
    let checks = if plan_is_of_applied(report, applied.as_deref()) && !report.plan.checks.is_empty()
    {
        report.plan.checks.clone()
    } else {
        match checks_of_applied(pass) {
            Ok(c) => c,
            Err(e) => return Err(format!("its health checks could not be read ({e:#})")),
        }
    };
    let results = pass.rt.block_on(async {
        let systemd = crate::effects::systemd::Systemd::connect(pass.settings.job_timeout)
            .await
            .ok();
        crate::effects::checks::run_all(&checks, systemd.as_ref()).await
    });
    let failed: Vec<String> = results
        .iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{}: {}", c.name, c.message))
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("health checks failed: {}", failed.join("; ")))
    }
}

/// Whether the run's plan is the applied commit's (`applied`), so that its
/// checks are the ones the host answers to. Not for a fetched commit that
/// is marked bad and was skipped, nor for one that waits for the fleet:
/// their plan is of another commit than the host runs, and a check such a
/// commit added (or moved) would have kept a healthy host from rebooting,
/// or a host back from its reboot from giving the fleet permit back.
fn plan_is_of_applied(report: &Report, applied: Option<&str>) -> bool {
    !report.skipped_bad && report.waiting.is_none() && applied == Some(report.commit.as_str())
}

/// The health checks of the applied commit (none when nothing is applied).
fn checks_of_applied(pass: &Pass) -> Result<Vec<crate::desired::spec::Check>> {
    let inventory = pass.state.inventory()?;
    let Some(commit) = inventory.commit.clone() else {
        return Ok(Vec::new());
    };
    super::checks_of_commit(pass.settings, &pass.state, &commit)
}

/// The rollout policy of the applied commit (its maintenance windows and
/// `max_concurrent`), read from its tree; the default one when it has
/// none. An error when it cannot be read: no reboot then (the default
/// policy has no window).
fn policy_of(pass: &Pass, commit: &str) -> Result<crate::rollout::Policy> {
    let fetched = super::fetched_commit(pass.settings, &pass.state, commit).map_err(|e| e.error)?;
    Ok(crate::rollout::policy::load(&fetched.snapshot)
        .map_err(|e| anyhow!(e))?
        .unwrap_or_else(crate::rollout::Policy::default_policy))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(commit: &str, skipped_bad: bool) -> Report {
        Report {
            commit: commit.into(),
            applied: None,
            plan: crate::plan::Plan::default(),
            recovered: Vec::new(),
            skipped_bad,
            post: None,
            quick: false,
            waiting: None,
        }
    }

    /// Review: the reboot's health gate ran the run's plan's checks, which
    /// for a skipped bad head are the bad commit's, not the applied one's.
    #[test]
    fn the_reboot_gate_takes_the_checks_of_the_applied_commit() {
        assert!(plan_is_of_applied(&report("c1", false), Some("c1")));
        // The fetched head is marked bad and skipped: its plan is its own.
        assert!(!plan_is_of_applied(&report("c2", true), Some("c1")));
        // Another commit than the applied one (or none applied).
        assert!(!plan_is_of_applied(&report("c2", false), Some("c1")));
        assert!(!plan_is_of_applied(&report("c2", false), None));
    }

    fn last(count: u32, boot: &str, time: i64) -> LastReboot {
        LastReboot {
            commit: "c1".into(),
            reasons: vec!["/etc/f".into()],
            time,
            count,
            boot_id: boot.into(),
        }
    }

    /// Review of the reboot loop guard: a reboot asked for again in the
    /// same boot (systemd refused, or the agent was killed first) was
    /// counted as another reboot, so two failed attempts stopped a
    /// legitimate reboot as a "loop".
    #[test]
    fn reboots_in_a_row_count_boots_not_attempts() {
        let r = vec!["/etc/f".to_string()];
        // Nothing before.
        assert_eq!(in_a_row(None, "c1", &r, "b1", 100), 0);
        // Asked in b1, not rebooted yet, asked again in b1: still the first.
        assert_eq!(in_a_row(Some(&last(1, "b1", 100)), "c1", &r, "b1", 200), 0);
        // Rebooted into b2, asked again: the second in a row.
        assert_eq!(in_a_row(Some(&last(1, "b1", 100)), "c1", &r, "b2", 200), 1);
        // And once more from b3: the loop guard's limit.
        assert_eq!(
            in_a_row(Some(&last(2, "b2", 300)), "c1", &r, "b3", 400),
            LOOP_MAX
        );
        // Another commit, other files, or a day later: a new need.
        assert_eq!(in_a_row(Some(&last(2, "b2", 300)), "c2", &r, "b3", 400), 0);
        assert_eq!(
            in_a_row(
                Some(&last(2, "b2", 300)),
                "c1",
                &["/etc/g".to_string()],
                "b3",
                400
            ),
            0
        );
        assert_eq!(
            in_a_row(
                Some(&last(2, "b2", 300)),
                "c1",
                &r,
                "b3",
                300 + LOOP_WINDOW_SECS
            ),
            0
        );
    }
}
