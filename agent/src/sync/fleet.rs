//! The sync's one question to the fleet, and its one answer back.
//!
//! Before a new commit is applied ([`FleetRun::ask`]): the commit's
//! rollout policy, this host and the fleet's state go to
//! [`crate::rollout::decide()`]; `Apply` then takes a permit of the host's
//! group (held, and kept alive, until the run ends). `Wait` and `Halt`
//! leave the host exactly as it is, with the reason in the log, in
//! `status` (the last run's message) and in the fleet.
//!
//! After every run ([`FleetRun::finish`]): this host's status is
//! published (whatever the outcome, so the fleet sees live hosts and
//! their health), a revert marks the commit bad fleet-wide, and the permit
//! is released.
//!
//! Without `[fleet]` nothing here runs: no connection, no change.

use tracing::{info, warn};

use super::run::Pass;
use super::{Head, Report};
use crate::config::{FleetSettings, OnUnreachable};
use crate::effects::fetch;
use crate::effects::fleet::Waiting;
use crate::exit::{Error, Failure};
use crate::plan::diff::short;
use crate::rollout::{self, Decision, Policy};

/// What [`FleetRun::ask`] answered.
pub(super) enum Gate {
    /// Apply (a permit is held, or the store was unreachable and
    /// `on_unreachable = "apply-alone"`).
    Go,
    /// Keep the current state; the reason says why.
    Hold(Waiting),
}

/// The fleet side of one sync.
#[derive(Default)]
pub(super) struct FleetRun {
    #[cfg(feature = "etcd")]
    store: Option<crate::effects::fleet::Store>,
    #[cfg(feature = "etcd")]
    permit: Option<crate::effects::fleet::Permit>,
    /// This host's previous status (for `since`).
    #[cfg(feature = "etcd")]
    prev: Option<crate::effects::fleet::HostStatus>,
    held: Option<Waiting>,
    /// The store did not answer (logged once per run).
    unreachable: bool,
    /// This run was a rollback from a halted commit ([`FleetRun::rolled_back`]).
    rolled_back: bool,
}

/// `[fleet]`, unless this host is air-gapped (`source = "bundle:"`, the
/// USB path): bundles are carried by a person, who is the rollout.
pub(super) fn active(settings: &crate::config::Settings) -> Option<&FleetSettings> {
    if settings.source.as_deref() == Some(crate::effects::fetch::BUNDLE_SOURCE) {
        return None;
    }
    settings.fleet.as_ref()
}

/// The rollout policy of the fetched commit (`[rollout]` of its
/// `driftless.toml`), or the default one.
fn policy_of(pass: &Pass, head: &Head) -> Result<Policy, Error> {
    let snap = fetch::read_tree(
        &head.repo,
        head.id,
        &pass.settings.path,
        pass.settings.limits.file,
    )
    .map_err(|e| Error::new(Failure::InvalidRepo, e))?;
    match rollout::policy::load(&snap) {
        Ok(Some(p)) => Ok(p),
        Ok(None) => Ok(Policy::default_policy()),
        Err(e) => Err(Error::new(
            Failure::InvalidRepo,
            anyhow::anyhow!(
                "commit {}: the rollout policy is invalid, nothing applied:\n{e}",
                short(&head.commit)
            ),
        )),
    }
}

/// The rollout policy of an applied commit, read from its tree in the
/// mirror (every host judges a commit by the same rules: the store's copy
/// is for `fleet status` and could be anyone's); the default one when the
/// commit or its policy cannot be read.
fn policy_of_commit(pass: &Pass, head: &Head, commit: &str) -> Policy {
    let read = || -> anyhow::Result<Option<Policy>> {
        let id = head.repo.rev_parse_single(commit)?.detach();
        let snap = fetch::read_tree(
            &head.repo,
            id,
            &pass.settings.path,
            pass.settings.limits.file,
        )?;
        rollout::policy::load(&snap).map_err(|e| anyhow::anyhow!(e))
    };
    match read() {
        Ok(Some(p)) => p,
        Ok(None) => Policy::default_policy(),
        Err(e) => {
            warn!(commit = %short(commit), "fleet: cannot read the applied commit's rollout policy, judging it by the default one: {e:#}");
            Policy::default_policy()
        }
    }
}

/// The run's etcd connection, opened on first use.
#[cfg(feature = "etcd")]
async fn connected<'a>(
    store: &'a mut Option<crate::effects::fleet::Store>,
    fleet: &FleetSettings,
) -> anyhow::Result<&'a mut crate::effects::fleet::Store> {
    if store.is_none() {
        *store = Some(crate::effects::fleet::Store::connect(fleet).await?);
    }
    store
        .as_mut()
        .ok_or_else(|| anyhow::anyhow!("no etcd connection"))
}

/// How long a status entry outlives its host: three polls.
#[cfg(feature = "etcd")]
fn status_ttl(settings: &crate::config::Settings, fleet: &FleetSettings) -> std::time::Duration {
    (settings
        .interval
        .saturating_mul(3)
        .saturating_add(settings.splay))
    .max(fleet.lease_ttl)
}

impl FleetRun {
    /// May this host apply `head` now? `current` is the applied commit.
    pub(super) fn ask(
        &mut self,
        pass: &Pass,
        head: &Head,
        current: Option<&str>,
    ) -> Result<Gate, Error> {
        let Some(fleet) = active(pass.settings) else {
            return Ok(Gate::Go);
        };
        let policy = policy_of(pass, head)?;
        let settings = pass.settings;
        let commit = head.commit.as_str();
        let wave = rollout::decide::wave_of(&policy, &settings.host, &fleet.labels)
            .and_then(|w| policy.waves.get(w))
            .map(|w| w.name.clone());
        if fleet.fleetlock.is_some() {
            // No waves without etcd: no wave to name.
            return self.ask_fleetlock(pass, fleet, &policy, commit, None);
        }
        let answer = self.ask_store(pass, fleet, &policy, commit, current);
        let decision = match answer {
            Ok(d) => d,
            Err(e) => return Ok(self.unreachable(pass, fleet, &policy, commit, wave, e)),
        };
        Ok(self.gate(commit, wave, decision))
    }

    /// What `decision` means for this run.
    fn gate(&mut self, commit: &str, wave: Option<String>, decision: Decision) -> Gate {
        match decision {
            Decision::Apply { reason, .. } => {
                info!(commit = %short(commit), wave = wave.as_deref().unwrap_or("?"), "fleet: {reason}");
                Gate::Go
            }
            Decision::Wait { reason, .. } => {
                info!(commit = %short(commit), "fleet: waiting: {reason}");
                self.hold(commit, wave, reason, false)
            }
            Decision::Halt { reason } => {
                warn!(commit = %short(commit), "fleet: {reason}");
                self.hold(commit, wave, reason, true)
            }
        }
    }

    /// `on_unreachable` when the fleet did not answer (`e`).
    fn unreachable(
        &mut self,
        pass: &Pass,
        fleet: &FleetSettings,
        policy: &Policy,
        commit: &str,
        wave: Option<String>,
        e: anyhow::Error,
    ) -> Gate {
        self.unreachable = true;
        let store = if fleet.fleetlock.is_some() {
            "the FleetLock server"
        } else {
            "etcd"
        };
        match fleet.on_unreachable {
            OnUnreachable::Wait => {
                let reason = format!(
                    "{e:#}; not applying {} until {store} answers (on_unreachable = \"wait\")",
                    short(commit)
                );
                warn!("{reason}");
                self.hold(commit, wave, reason, false)
            }
            OnUnreachable::ApplyAlone => {
                // Alone, but never outside the maintenance window.
                let tz = jiff::tz::TimeZone::system();
                if let Some(why) =
                    rollout::decide::outside_window(policy, &fleet.group, pass.now, &tz)
                {
                    let reason = format!("{e:#}; on_unreachable = \"apply-alone\", but {why}");
                    warn!("{reason}");
                    return self.hold(commit, wave, reason, false);
                }
                warn!(commit = %short(commit), "{e:#}; applying without the fleet (on_unreachable = \"apply-alone\")");
                Gate::Go
            }
        }
    }

    /// The FleetLock backend: the commit's maintenance windows, then a
    /// slot from the server. Waves, bake times and halting need the
    /// fleet's shared state, which only etcd keeps; the log says so when
    /// the commit has them.
    fn ask_fleetlock(
        &mut self,
        pass: &Pass,
        fleet: &FleetSettings,
        policy: &Policy,
        commit: &str,
        wave: Option<String>,
    ) -> Result<Gate, Error> {
        let tz = jiff::tz::TimeZone::system();
        if let Some(why) = rollout::decide::outside_window(policy, &fleet.group, pass.now, &tz) {
            info!(commit = %short(commit), "fleet: waiting: {why}");
            return Ok(self.hold(commit, wave, why, false));
        }
        let default = Policy::default_policy();
        if policy.waves.len() > 1
            || policy
                .waves
                .first()
                .is_some_and(|w| w.bake > 0 || w.min_healthy > 0)
            || policy.max_concurrent != default.max_concurrent
            || policy.max_failures != default.max_failures
        {
            info!(commit = %short(commit), "fleet: with a FleetLock server (fleet.fleetlock) only the commit's maintenance windows and the server's slot limit apply; its waves, bake times, max_concurrent and max_failures need etcd");
        }
        let asked = super::fleetlock::take(pass, fleet, commit)
            .map_err(|e| Error::new(crate::exit::Failure::Failed, e))?;
        Ok(match asked {
            super::fleetlock::Asked::Granted => {
                info!(commit = %short(commit), "fleet: FleetLock slot of group {} taken", fleet.group);
                Gate::Go
            }
            super::fleetlock::Asked::Refused(why) => {
                info!(commit = %short(commit), "fleet: waiting: {why}");
                self.hold(commit, wave, why, false)
            }
            super::fleetlock::Asked::Unreachable(e) => {
                self.unreachable(pass, fleet, policy, commit, wave, e)
            }
        })
    }

    /// Is `current`, the commit this host runs, halted fleet-wide (other
    /// hosts reverted it, `max_failures` of them, by the rules of
    /// `current`'s own `[rollout]`, read from the commit, not from the
    /// store)? Then the reason: the caller rolls this host back to its
    /// previous good commit, like the hosts that reverted it. Not asked
    /// when this run is about to apply a newer commit (`applying_newer`),
    /// when etcd did not answer this run, or while an operator suspended
    /// the host's group (a suspension freezes the fleet, rollbacks too).
    pub(super) fn current_halted(
        &mut self,
        pass: &Pass,
        head: &Head,
        current: Option<&str>,
        applying_newer: bool,
    ) -> Option<String> {
        let fleet = active(pass.settings)?;
        let current = current?;
        if applying_newer || self.unreachable || fleet.fleetlock.is_some() {
            return None;
        }
        let max_failures = policy_of_commit(pass, head, current).max_failures;
        match self.halted_in_store(pass, fleet, current, max_failures) {
            Ok(why) => why,
            Err(e) => {
                warn!(commit = %short(current), "fleet: cannot tell whether the applied commit was halted: {e:#}");
                None
            }
        }
    }

    #[cfg(feature = "etcd")]
    fn halted_in_store(
        &mut self,
        pass: &Pass,
        fleet: &FleetSettings,
        current: &str,
        max: u32,
    ) -> anyhow::Result<Option<String>> {
        let store = &mut self.store;
        let (marks, suspended) = pass.rt.block_on(async {
            let s = connected(store, fleet).await?;
            let marks = s.bad_marks(current).await?;
            if marks.len() < max as usize {
                return Ok((marks, None));
            }
            let view = s.suspensions().await?;
            let suspended = rollout::decide::suspension(&view, &fleet.group)
                .map(|(k, s)| format!("{k} by {}", s.by));
            anyhow::Ok((marks, suspended))
        })?;
        if marks.len() < max as usize || marks.contains_key(&pass.settings.host) {
            return Ok(None);
        }
        if let Some(who) = suspended {
            warn!(commit = %short(current), "fleet: the applied commit is halted fleet-wide, but rollouts are suspended ({who}): not rolling back until `driftless resume`");
            return Ok(None);
        }
        let who: Vec<String> = marks
            .iter()
            .take(3)
            .map(|(h, why)| format!("{h} ({why})"))
            .collect();
        Ok(Some(format!(
            "halted fleet-wide: reverted by {}{}",
            who.join("; "),
            if marks.len() > 3 { "; …" } else { "" }
        )))
    }

    #[cfg(not(feature = "etcd"))]
    fn halted_in_store(
        &mut self,
        _pass: &Pass,
        _fleet: &FleetSettings,
        _current: &str,
        _max: u32,
    ) -> anyhow::Result<Option<String>> {
        Ok(None)
    }

    /// This run rolled the host back (a halted commit): its status is the
    /// rollback's, not a wait, and a revert inside that rollback is this
    /// host's business, never a fleet-wide bad mark for the commit it
    /// tried to return to (that would halt the commit most hosts run).
    pub(super) fn rolled_back(&mut self) {
        self.rolled_back = true;
        self.held = None;
    }

    fn hold(&mut self, commit: &str, wave: Option<String>, reason: String, halted: bool) -> Gate {
        let w = Waiting {
            commit: commit.to_string(),
            wave,
            reason,
            halted,
        };
        self.held = Some(w.clone());
        Gate::Hold(w)
    }

    /// The decision, and for `Apply` the permit (a lost race for the last
    /// permit turns into a `Wait`).
    #[cfg(feature = "etcd")]
    fn ask_store(
        &mut self,
        pass: &Pass,
        fleet: &FleetSettings,
        policy: &Policy,
        commit: &str,
        current: Option<&str>,
    ) -> anyhow::Result<Decision> {
        let settings = pass.settings;
        let store = &mut self.store;
        let (decision, prev, permit) = pass.rt.block_on(async {
            let s = connected(store, fleet).await?;
            s.publish_policy(commit, policy).await?;
            let snap = s.view(commit, &fleet.group).await?;
            let prev = snap
                .statuses
                .iter()
                .find(|st| st.host == settings.host)
                .cloned();
            let tz = jiff::tz::TimeZone::system();
            let host = rollout::ThisHost {
                name: &settings.host,
                group: &fleet.group,
                labels: &fleet.labels,
                current,
                tz: &tz,
            };
            let mut decision = rollout::decide(policy, &host, &snap.view(), commit, pass.now);
            let mut permit = None;
            if let Decision::Apply { wave, .. } = &decision {
                use crate::effects::fleet::Acquired;
                match s
                    .try_acquire(
                        &fleet.group,
                        &settings.host,
                        policy.max_concurrent,
                        fleet.lease_ttl,
                    )
                    .await?
                {
                    Acquired::Permit(p) => permit = Some(p),
                    Acquired::Full { held } => {
                        decision = Decision::Wait {
                            wave: *wave,
                            reason: format!(
                                "group {:?} has all {held} permit(s) taken (max_concurrent = {})",
                                fleet.group, policy.max_concurrent
                            ),
                        }
                    }
                    Acquired::Contended { attempts } => {
                        decision = Decision::Wait {
                            wave: *wave,
                            reason: format!(
                                "group {:?} had a free permit, but other hosts took permits at the same moment {attempts} times; the next run tries again",
                                fleet.group
                            ),
                        }
                    }
                }
            }
            anyhow::Ok((decision, prev, permit))
        })?;
        self.prev = prev;
        self.permit = permit;
        Ok(decision)
    }

    #[cfg(not(feature = "etcd"))]
    fn ask_store(
        &mut self,
        _pass: &Pass,
        _fleet: &FleetSettings,
        _policy: &Policy,
        _commit: &str,
        _current: Option<&str>,
    ) -> anyhow::Result<Decision> {
        anyhow::bail!("this driftless was built without etcd support (cargo feature `etcd`)")
    }

    /// After the run: status, bad mark, permit. Failures are logged: the
    /// run's outcome on this host stands, and a permit not released
    /// expires with its lease.
    pub(super) fn finish(self, pass: &Pass, result: &Result<Report, Error>) {
        match active(pass.settings) {
            Some(fleet) if fleet.fleetlock.is_some() => {
                // No status or bad marks to publish: a FleetLock server
                // keeps slots only. A revert is remembered by this host
                // alone.
                super::fleetlock::finish(pass, fleet);
            }
            other => {
                // Not (or no longer) FleetLock: a slot recorded from
                // before goes back to the server it names.
                super::fleetlock::finish_elsewhere(pass);
                if let Some(fleet) = other {
                    if let Err(e) = self.finish_inner(pass, fleet, result) {
                        warn!("fleet: cannot report this run to etcd: {e:#}");
                    }
                }
            }
        }
    }

    #[cfg(feature = "etcd")]
    fn status(
        &self,
        pass: &Pass,
        fleet: &FleetSettings,
        result: &Result<Report, Error>,
    ) -> crate::effects::fleet::HostStatus {
        let settings = pass.settings;
        let commit = pass.state.inventory().ok().and_then(|i| i.commit.clone());
        let prev = self.prev.as_ref();
        let kept_since = prev
            .filter(|p| p.commit.is_some() && p.commit == commit)
            .and_then(|p| p.since);
        let mut failing = Vec::new();
        let (result_word, since) = match result {
            Ok(_) if self.held.as_ref().is_some_and(|w| w.halted) => ("halted", kept_since),
            Ok(_) if self.held.is_some() => ("waiting", kept_since),
            Ok(r) if r.skipped_bad => ("skipped", kept_since),
            Ok(r) => {
                if let Some(post) = &r.post {
                    failing = post
                        .checks
                        .iter()
                        .filter(|c| !c.ok)
                        .map(|c| c.name.clone())
                        .collect();
                }
                if r.applied.is_some() {
                    ("applied", Some(pass.now))
                } else {
                    ("unchanged", kept_since.or(Some(pass.now)))
                }
            }
            Err(e) if e.error.downcast_ref::<super::Reverted>().is_some() => {
                ("reverted", kept_since)
            }
            Err(_) => ("failed", kept_since),
        };
        let healthy = match pass.checks_failing {
            Some(n) => n == 0 && failing.is_empty(),
            None => prev.is_none_or(|p| p.healthy),
        };
        crate::effects::fleet::HostStatus {
            host: settings.host.clone(),
            group: fleet.group.clone(),
            labels: fleet.labels.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            commit,
            since,
            healthy,
            result: result_word.to_string(),
            failing_checks: failing,
            last_run: crate::time::now(),
            waiting: self.held.clone(),
        }
    }

    #[cfg(feature = "etcd")]
    fn finish_inner(
        mut self,
        pass: &Pass,
        fleet: &FleetSettings,
        result: &Result<Report, Error>,
    ) -> anyhow::Result<()> {
        if self.unreachable {
            // Asked and got no answer this run: do not wait again.
            return Ok(());
        }
        let settings = pass.settings;
        let ttl = status_ttl(settings, fleet);
        // A commit this host already ran, failing its drift repair, is this
        // host's trouble: the others running it are not rolled back for it.
        let reverted = match result {
            Err(e) if !self.rolled_back => e
                .error
                .downcast_ref::<super::Reverted>()
                .filter(|r| !r.already_applied),
            _ => None,
        };
        let mut store = self.store.take();
        let permit = self.permit.take();
        // Each step is tried again once on a fresh connection: the one
        // opened before the apply may have broken, or (etcd users) its
        // token expired while the checks ran (etcd-client authenticates
        // once, at connect). The bad mark first, before the permit goes
        // back, so no host takes the permit and applies the commit before
        // the mark is there.
        // `$call` on the store (connecting if needed), and on failure once
        // more on a fresh connection.
        macro_rules! retried {
            ($what:expr, |$s:ident| $call:expr) => {
                pass.rt.block_on(async {
                    let mut last = anyhow::anyhow!("no etcd connection");
                    for attempt in 0..2 {
                        if attempt > 0 || store.is_none() {
                            store = None;
                            match crate::effects::fleet::Store::connect(fleet).await {
                                Ok(fresh) => store = Some(fresh),
                                Err(e) => {
                                    last = e;
                                    continue;
                                }
                            }
                        }
                        let Some($s) = store.as_mut() else { continue };
                        match $call.await {
                            Ok(v) => return Ok(v),
                            Err(e) => last = e,
                        }
                    }
                    Err(last.context(format!("cannot {}", $what)))
                })
            };
        }
        if let Some(r) = reverted {
            retried!("mark the commit bad", |s| s.mark_bad(
                &r.commit,
                &settings.host,
                &r.reason
            ))?;
            warn!(commit = %short(&r.commit), "fleet: marked bad fleet-wide: this host reverted it");
        }
        if let Some(p) = permit {
            if let Err(e) = retried!("give the permit back", |s| s.give_back(&p)) {
                warn!("fleet: {e:#} (it frees when its lease expires)");
            }
        }
        if self.prev.is_none() {
            self.prev = retried!("read this host's status", |s| s.own_status(&settings.host))?;
        }
        let status = self.status(pass, fleet, result);
        retried!("publish this host's status", |s| s.put_status(&status, ttl))
    }

    #[cfg(not(feature = "etcd"))]
    fn finish_inner(
        self,
        _pass: &Pass,
        _fleet: &FleetSettings,
        _result: &Result<Report, Error>,
    ) -> anyhow::Result<()> {
        Ok(())
    }
}
