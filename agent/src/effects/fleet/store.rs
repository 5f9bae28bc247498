//! The etcd side: a client, leases, the semaphore, status and bad marks
//! (the key layout is in the parent module).

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use std::collections::BTreeMap;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp,
};
use tracing::{debug, warn};

use super::{parts, HostStatus, Keys, Snapshot};
use crate::config::FleetSettings;
use crate::rollout::decide::Suspension;
use crate::rollout::Policy;

/// How long connecting, and then each request, may take: a poll must not
/// hang on an unreachable store (it then waits or applies alone, as
/// `on_unreachable` says).
const TIMEOUT: Duration = Duration::from_secs(5);

/// Attempts at taking a permit when other hosts take permits at the same
/// moment (each failed attempt means someone else got one).
const ACQUIRE_ATTEMPTS: usize = 5;

/// A connection to the fleet's etcd (cheap to clone: the clones share
/// the connection).
#[derive(Clone)]
pub struct Store {
    client: Client,
    keys: Keys,
    endpoints: String,
    /// To connect again (the permit's keep-alive, when its connection
    /// breaks or its auth token expires).
    settings: FleetSettings,
}

/// A permit held by this host: its key and the lease keeping it, renewed
/// in the background until [`Store::release`] (or the process dies, and
/// the lease expires after `lease_ttl`).
pub struct Permit {
    pub key: String,
    lease: i64,
    keepalive: tokio::task::JoinHandle<()>,
    /// The key is this host's reboot permit (no lease), held from before
    /// this run: the run uses it and leaves it in place.
    borrowed: bool,
}

impl Store {
    pub async fn connect(fleet: &FleetSettings) -> Result<Store> {
        let endpoints = fleet.endpoints.join(", ");
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(TIMEOUT)
            .with_timeout(TIMEOUT);
        if let Some(tls) = &fleet.tls {
            let ca = std::fs::read(&tls.ca_file)
                .with_context(|| format!("fleet.ca_file: cannot read {}", tls.ca_file.display()))?;
            let mut options = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(ca));
            if let Some((cert_file, key_file)) = &tls.identity {
                let cert = std::fs::read(cert_file).with_context(|| {
                    format!("fleet.cert_file: cannot read {}", cert_file.display())
                })?;
                let key = read_private("fleet.key_file", key_file)?;
                options = options.identity(etcd_client::Identity::from_pem(cert, key.as_slice()));
            }
            opts = opts.with_tls(options);
        }
        if let Some(auth) = &fleet.auth {
            let password = read_private("fleet.password_file", &auth.password_file)?;
            let text = std::str::from_utf8(&password).with_context(|| {
                format!(
                    "fleet.password_file: {} is not UTF-8 text",
                    auth.password_file.display()
                )
            })?;
            let line = text.strip_suffix('\n').unwrap_or(text);
            let line = line.strip_suffix('\r').unwrap_or(line);
            opts = opts.with_user(auth.user.clone(), line.to_string());
        }
        let client = Client::connect(&fleet.endpoints, Some(opts))
            .await
            .with_context(|| {
                format!("cannot connect to etcd at {endpoints} ([fleet] endpoints)")
            })?;
        Ok(Store {
            client,
            keys: Keys::new(&fleet.prefix),
            endpoints,
            settings: fleet.clone(),
        })
    }

    /// One key (its value, lease and revisions), read.
    async fn get_key(&mut self, key: &str) -> Result<etcd_client::GetResponse> {
        self.client
            .get(key, None)
            .await
            .with_context(|| self.ctx(&format!("cannot read {key}")))
    }

    fn ctx(&self, what: &str) -> String {
        format!("etcd at {} ([fleet] endpoints): {what}", self.endpoints)
    }

    /// Every key of the fleet: statuses, bad marks, permits, policies.
    pub async fn snapshot(&mut self) -> Result<Snapshot> {
        let mut out = Snapshot::default();
        let prefix = self.keys.hosts();
        for (key, value) in self.list(&prefix).await? {
            match serde_json::from_str::<HostStatus>(&value) {
                Ok(s) => out.statuses.push(s),
                Err(e) => out.unreadable.push(format!("{key}: {e}")),
            }
        }
        let prefix = self.keys.all_bad();
        for (key, value) in self.list(&prefix).await? {
            match parts(&prefix, &key).as_deref() {
                Some([commit, host]) => {
                    out.bad
                        .entry(commit.to_string())
                        .or_default()
                        .insert(host.to_string(), value);
                }
                _ => out.unreadable.push(key),
            }
        }
        let prefix = self.keys.all_permits();
        for (key, value) in self.list(&prefix).await? {
            match parts(&prefix, &key).as_deref() {
                Some([group, host]) => {
                    out.permits
                        .entry(group.to_string())
                        .or_default()
                        .insert(host.to_string());
                    let reboot = serde_json::from_str::<serde_json::Value>(&value)
                        .is_ok_and(|v| v.get("reboot").is_some());
                    if reboot {
                        out.reboot_permits
                            .entry(group.to_string())
                            .or_default()
                            .insert(host.to_string());
                    }
                    if super::fleetlock::is_slot(value.as_bytes()) {
                        out.fleetlock_slots
                            .entry(group.to_string())
                            .or_default()
                            .insert(host.to_string());
                    }
                }
                _ => out.unreadable.push(key),
            }
        }
        let prefix = self.keys.policies();
        for (key, value) in self.list(&prefix).await? {
            match (
                parts(&prefix, &key).as_deref(),
                serde_json::from_str::<Policy>(&value),
            ) {
                (Some([commit]), Ok(p)) => {
                    out.policies.insert(commit.to_string(), p);
                }
                _ => out.unreadable.push(key),
            }
        }
        self.read_suspensions(&mut out).await?;
        Ok(out)
    }

    async fn read_suspensions(&mut self, out: &mut Snapshot) -> Result<()> {
        let prefix = self.keys.all_suspended();
        for (key, value) in self.list(&prefix).await? {
            match (
                parts(&prefix, &key).as_deref(),
                serde_json::from_str::<Suspension>(&value),
            ) {
                (Some([group]), Ok(s)) => {
                    out.suspended.insert(group.to_string(), s);
                }
                // An unreadable suspension still suspends: an operator
                // meant to stop the rollout.
                (Some([group]), Err(e)) => {
                    out.unreadable.push(format!("{key}: {e}"));
                    out.suspended.insert(
                        group.to_string(),
                        Suspension {
                            by: "?".into(),
                            reason: format!("unreadable suspension key {key}"),
                            since: 0,
                        },
                    );
                }
                _ => out.unreadable.push(key),
            }
        }
        Ok(())
    }

    /// Suspends new rollouts for `group` (`*`: every group).
    pub async fn suspend(&mut self, group: &str, s: &Suspension) -> Result<()> {
        let key = self.keys.suspended(group);
        self.client
            .put(key.clone(), serde_json::to_string(s)?, None)
            .await
            .with_context(|| self.ctx(&format!("cannot write {key}")))?;
        Ok(())
    }

    /// Lifts the suspension of `group`; `false` if there was none.
    pub async fn resume(&mut self, group: &str) -> Result<bool> {
        let key = self.keys.suspended(group);
        let r = self
            .client
            .delete(key.clone(), None)
            .await
            .with_context(|| self.ctx(&format!("cannot delete {key}")))?;
        Ok(r.deleted() > 0)
    }

    /// Deletes the bad marks of `commit` (an operator resumes its halted
    /// rollout); returns the hosts whose marks were removed.
    pub async fn clear_bad(&mut self, commit: &str) -> Result<Vec<String>> {
        let prefix = self.keys.bad(commit);
        let r = self
            .client
            .delete(
                prefix.clone(),
                Some(DeleteOptions::new().with_prefix().with_prev_key()),
            )
            .await
            .with_context(|| self.ctx(&format!("cannot delete {prefix}")))?;
        Ok(r.prev_kvs()
            .iter()
            .filter_map(|kv| {
                String::from_utf8_lossy(kv.key())
                    .strip_prefix(&prefix)
                    .map(str::to_string)
            })
            .collect())
    }

    /// The operators' suspensions only (as a view for
    /// `rollout::decide::suspension`).
    pub async fn suspensions(&mut self) -> Result<crate::rollout::FleetView> {
        let mut snap = Snapshot::default();
        self.read_suspensions(&mut snap).await?;
        Ok(snap.view())
    }

    /// The hosts that reverted `commit`, with why.
    pub async fn bad_marks(&mut self, commit: &str) -> Result<BTreeMap<String, String>> {
        let prefix = self.keys.bad(commit);
        Ok(self
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|h| (h.to_string(), v)))
            .collect())
    }

    /// What the decision for `commit` needs: live statuses, the hosts
    /// that reverted `commit`, the permits of `group` and the operators'
    /// suspensions (four reads, not the whole prefix).
    pub async fn view(&mut self, commit: &str, group: &str) -> Result<Snapshot> {
        let mut out = Snapshot::default();
        let prefix = self.keys.hosts();
        for (key, value) in self.list(&prefix).await? {
            match serde_json::from_str::<HostStatus>(&value) {
                Ok(s) => out.statuses.push(s),
                Err(e) => out.unreadable.push(format!("{key}: {e}")),
            }
        }
        let prefix = self.keys.bad(commit);
        for (key, value) in self.list(&prefix).await? {
            if let Some(host) = key.strip_prefix(&prefix) {
                out.bad
                    .entry(commit.to_string())
                    .or_default()
                    .insert(host.to_string(), value);
            }
        }
        let prefix = self.keys.permits(group);
        for (key, _) in self.list(&prefix).await? {
            if let Some(host) = key.strip_prefix(&prefix) {
                out.permits
                    .entry(group.to_string())
                    .or_default()
                    .insert(host.to_string());
            }
        }
        self.read_suspensions(&mut out).await?;
        Ok(out)
    }

    /// Keys and values under `prefix` (values that are not UTF-8 are
    /// replaced, lossily: they are JSON written by agents).
    ///
    /// Read in pages of [`PAGE`] keys, all at the revision of the first
    /// page (one consistent view): a single range over every host status
    /// of a large fleet is one gRPC response, and past 4 MiB (about 7,600
    /// statuses, found by `bench/fleet-sim`) the client refuses it, so no
    /// host of such a fleet could ever decide.
    async fn list(&mut self, prefix: &str) -> Result<Vec<(String, String)>> {
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.as_bytes().to_vec();
        let mut revision = 0;
        let mut out = Vec::new();
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision != 0 {
                opts = opts.with_revision(revision);
            }
            let resp = self
                .client
                .get(from.clone(), Some(opts))
                .await
                .with_context(|| self.ctx(&format!("cannot read {prefix}")))?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                out.push((
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                ));
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    /// Records `policy` as the rollout policy of `commit` unless one is
    /// recorded already (every host derives the same from the commit).
    pub async fn publish_policy(&mut self, commit: &str, policy: &Policy) -> Result<()> {
        let key = self.keys.policy(commit);
        // A read first: a transaction with a write in it goes through
        // consensus even when its comparison fails, and every waiting host
        // asks on every poll.
        let existing = self
            .client
            .get(key.clone(), Some(GetOptions::new().with_count_only()))
            .await
            .with_context(|| self.ctx(&format!("cannot read {key}")))?;
        if existing.count() > 0 {
            return Ok(());
        }
        let value = serde_json::to_string(policy)?;
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(key.clone(), value, None)]);
        self.client
            .txn(txn)
            .await
            .with_context(|| self.ctx(&format!("cannot write {key}")))?;
        Ok(())
    }

    /// Takes a permit of `group` for `host` if fewer than `max` are held
    /// (or `host` holds one already). `Ok(None)`: none was had (all taken,
    /// or lost to other hosts taking permits at the same moment).
    pub async fn acquire(
        &mut self,
        group: &str,
        host: &str,
        max: u32,
        ttl: Duration,
    ) -> Result<Option<Permit>> {
        Ok(match self.try_acquire(group, host, max, ttl).await? {
            Acquired::Permit(p) => Some(p),
            Acquired::Full { .. } | Acquired::Contended { .. } => None,
        })
    }

    /// [`Store::acquire`], saying why no permit was had.
    pub async fn try_acquire(
        &mut self,
        group: &str,
        host: &str,
        max: u32,
        ttl: Duration,
    ) -> Result<Acquired> {
        let key = self.keys.permit(group, host);
        let lease = self
            .client
            .lease_grant(ttl.as_secs().max(1) as i64, None)
            .await
            .with_context(|| self.ctx("cannot create a lease for the permit"))?
            .id();
        match self.take(group, host, max, host, Some(lease)).await {
            Ok(Taken::Put) => {
                let keepalive = self.keep_alive(lease, ttl).await?;
                Ok(Acquired::Permit(Permit {
                    key,
                    lease,
                    keepalive,
                    borrowed: false,
                }))
            }
            // A host back from a reboot, not yet verified, applies a
            // commit (the fix, say) under the permit it holds: neither
            // the apply nor its end may turn that permit into a leased one
            // or delete it.
            Ok(Taken::HeldWithoutLease) => {
                self.revoke(lease).await;
                Ok(Acquired::Permit(Permit {
                    key,
                    lease: 0,
                    keepalive: tokio::spawn(async {}),
                    borrowed: true,
                }))
            }
            Ok(Taken::No(no)) => {
                self.revoke(lease).await;
                Ok(no)
            }
            // Only FleetLock takes (`take_as(.., slot)`) say so.
            Ok(Taken::InUse) => {
                self.revoke(lease).await;
                Err(anyhow!("{}", self.ctx(&format!("{key} is in use"))))
            }
            Err(e) => {
                self.revoke(lease).await;
                Err(e)
            }
        }
    }

    /// A permit of `group` held across a reboot: no lease (the host is
    /// gone while it reboots, and a host that does not come back healthy
    /// must keep blocking its group until an operator looks). Given back
    /// with [`Store::release_reboot_permit`]. `Ok(None)`: taken (or held
    /// already).
    pub async fn take_reboot_permit(
        &mut self,
        group: &str,
        host: &str,
        max: u32,
        why: &str,
    ) -> Result<Option<Acquired>> {
        Ok(match self.take(group, host, max, why, None).await? {
            Taken::Put | Taken::HeldWithoutLease => None,
            Taken::No(no) => Some(no),
            // Only FleetLock takes (`take_as(.., slot)`) say so.
            Taken::InUse => Some(Acquired::Contended { attempts: 0 }),
        })
    }

    /// Whether this host's permit key of `group` exists (an operator may
    /// have deleted a reboot permit to unblock the group).
    pub async fn holds(&mut self, group: &str, host: &str) -> Result<bool> {
        let key = self.keys.permit(group, host);
        let resp = self.get_key(&key).await?;
        Ok(!resp.kvs().is_empty())
    }

    /// Gives a reboot permit back.
    pub async fn release_reboot_permit(&mut self, group: &str, host: &str) -> Result<()> {
        let key = self.keys.permit(group, host);
        self.client
            .delete(key.clone(), None)
            .await
            .with_context(|| self.ctx(&format!("cannot delete {key}")))?;
        Ok(())
    }

    /// A FleetLock slot of `group` for `id` (no lease; its value `value`
    /// marks it as a slot, [`super::fleetlock::is_slot`]).
    pub async fn take_fleetlock_slot(
        &mut self,
        group: &str,
        id: &str,
        max: u32,
        value: &str,
    ) -> Result<SlotTaken> {
        Ok(
            match self.take_as(group, id, max, value, None, true).await? {
                Taken::Put | Taken::HeldWithoutLease => SlotTaken::Granted,
                Taken::InUse => SlotTaken::InUse,
                Taken::No(Acquired::Full { held }) => SlotTaken::Full { held },
                Taken::No(_) => SlotTaken::Contended,
            },
        )
    }

    /// Gives `id`'s FleetLock slot of `group` back: deletes the key only
    /// if it is a slot (never a driftless host's permit of the same
    /// name), and only as it was read. Whether one was deleted.
    pub async fn release_fleetlock_slot(&mut self, group: &str, id: &str) -> Result<bool> {
        let key = self.keys.permit(group, id);
        let resp = self.get_key(&key).await?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(false);
        };
        if kv.lease() != 0 || !super::fleetlock::is_slot(kv.value()) {
            return Ok(false);
        }
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                kv.mod_revision(),
            )])
            .and_then(vec![TxnOp::delete(key.clone(), None)]);
        let done = self
            .client
            .txn(txn)
            .await
            .with_context(|| self.ctx(&format!("cannot delete {key}")))?;
        Ok(done.succeeded())
    }

    /// The semaphore: puts `host`'s permit key (with `lease`, or none) if
    /// fewer than `max` are held under the group (or `host` holds one
    /// already). A leased take leaves this host's lease-less key (a reboot
    /// permit) as it is.
    async fn take(
        &mut self,
        group: &str,
        host: &str,
        max: u32,
        value: &str,
        lease: Option<i64>,
    ) -> Result<Taken> {
        self.take_as(group, host, max, value, lease, false).await
    }

    /// [`Store::take`]; `slot`: for a FleetLock client, whose id may only
    /// ever own a FleetLock slot: a key of the same name that is not one
    /// (a driftless host's permit) is [`Taken::InUse`], and its own slot
    /// is granted again as it is.
    async fn take_as(
        &mut self,
        group: &str,
        host: &str,
        max: u32,
        value: &str,
        lease: Option<i64>,
        slot: bool,
    ) -> Result<Taken> {
        let prefix = self.keys.permits(group);
        let key = self.keys.permit(group, host);
        for attempt in 0..ACQUIRE_ATTEMPTS {
            let resp = self
                .client
                .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
                .await
                .with_context(|| self.ctx(&format!("cannot read {prefix}")))?;
            let revision = resp
                .header()
                .map(|h| h.revision())
                .ok_or_else(|| anyhow!("{}", self.ctx("a response without a header")))?;
            let held = resp.kvs().len();
            let own = resp.kvs().iter().find(|kv| kv.key() == key.as_bytes());
            if slot {
                if let Some(kv) = own {
                    return Ok(
                        if kv.lease() == 0 && super::fleetlock::is_slot(kv.value()) {
                            Taken::HeldWithoutLease
                        } else {
                            Taken::InUse
                        },
                    );
                }
            }
            if lease.is_some() && own.is_some_and(|kv| kv.lease() == 0) {
                return Ok(Taken::HeldWithoutLease);
            }
            if own.is_none() && held >= max as usize {
                return Ok(Taken::No(Acquired::Full { held }));
            }
            // Nothing under the group's prefix changed since `revision`:
            // the count just read still holds when the put happens.
            let txn = Txn::new()
                .when(vec![Compare::mod_revision(
                    prefix.clone(),
                    CompareOp::Less,
                    revision.saturating_add(1),
                )
                .with_prefix()])
                .and_then(vec![TxnOp::put(
                    key.clone(),
                    value,
                    lease.map(|l| PutOptions::new().with_lease(l)),
                )]);
            let done = self
                .client
                .txn(txn)
                .await
                .with_context(|| self.ctx(&format!("cannot write {key}")))?;
            if done.succeeded() {
                debug!(key = %key, ?lease, attempt, "permit taken");
                return Ok(Taken::Put);
            }
            debug!(key = %key, attempt, "another host took a permit at the same time; reading again");
            // Hosts that lost together would collide again at once: each
            // waits a different few milliseconds (bench/fleet-sim saw 785
            // of 1,785 attempts lost with permits still free).
            tokio::time::sleep(jitter(attempt)).await;
        }
        Ok(Taken::No(Acquired::Contended {
            attempts: ACQUIRE_ATTEMPTS,
        }))
    }

    /// Renews `lease` every third of its TTL until aborted.
    async fn keep_alive(
        &mut self,
        lease: i64,
        ttl: Duration,
    ) -> Result<tokio::task::JoinHandle<()>> {
        let (mut keeper, mut stream) = self
            .client
            .lease_keep_alive(lease)
            .await
            .with_context(|| self.ctx("cannot keep the permit's lease alive"))?;
        let every = (ttl / 3).max(Duration::from_millis(500));
        let settings = self.settings.clone();
        Ok(tokio::spawn(async move {
            let mut renewed_at = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(every).await;
                let renewed = match keeper.keep_alive().await {
                    Ok(()) => stream.message().await.map(|m| m.map(|r| r.ttl())),
                    Err(e) => Err(e),
                };
                match renewed {
                    Ok(Some(ttl)) if ttl > 0 => renewed_at = tokio::time::Instant::now(),
                    Ok(_) => {
                        warn!(
                            lease,
                            "the permit's lease expired: another host may take the permit"
                        );
                        return;
                    }
                    Err(e) => {
                        // A broken connection (etcd restarted, a network
                        // blip): the lease lives on in etcd for its TTL,
                        // so keep renewing it on a new connection until
                        // then.
                        debug!(
                            lease,
                            "the permit's keep-alive stream broke ({e}); connecting again"
                        );
                        loop {
                            let again = async {
                                let mut fresh = Store::connect(&settings).await?;
                                let (k, s) = fresh.client.lease_keep_alive(lease).await?;
                                anyhow::Ok((k, s))
                            };
                            match again.await {
                                Ok((k, s)) => {
                                    keeper = k;
                                    stream = s;
                                    break;
                                }
                                Err(e2) if renewed_at.elapsed() < ttl => {
                                    debug!(
                                        lease,
                                        "cannot reach etcd to renew the permit's lease yet: {e2:#}"
                                    );
                                    tokio::time::sleep(every.min(Duration::from_millis(500))).await;
                                }
                                Err(e2) => {
                                    warn!(lease, "cannot renew the permit's lease: {e}; nor on a new connection within its TTL: {e2:#}; another host may take the permit");
                                    return;
                                }
                            }
                        }
                    }
                }
            }
        }))
    }

    /// Gives a permit back.
    pub async fn release(&mut self, permit: Permit) -> Result<()> {
        self.give_back(&permit).await
    }

    /// [`Store::release`] that can be tried again (on another connection)
    /// when it fails.
    pub async fn give_back(&mut self, permit: &Permit) -> Result<()> {
        permit.keepalive.abort();
        if permit.borrowed {
            return Ok(());
        }
        let deleted = self.client.delete(permit.key.clone(), None).await;
        self.revoke(permit.lease).await;
        deleted.with_context(|| self.ctx(&format!("cannot delete {}", permit.key)))?;
        Ok(())
    }

    async fn revoke(&mut self, lease: i64) {
        if let Err(e) = self.client.lease_revoke(lease).await {
            debug!(lease, "cannot revoke a lease (it expires by itself): {e}");
        }
    }

    /// Publishes this host's status under a lease of `ttl`.
    pub async fn put_status(&mut self, status: &HostStatus, ttl: Duration) -> Result<()> {
        let key = self.keys.host(&status.host);
        let lease = self
            .client
            .lease_grant(ttl.as_secs().max(1) as i64, None)
            .await
            .with_context(|| self.ctx("cannot create a lease for the status"))?
            .id();
        let value = serde_json::to_string(status)?;
        let put = self
            .client
            .put(
                key.clone(),
                value,
                Some(PutOptions::new().with_lease(lease).with_prev_key()),
            )
            .await
            .with_context(|| self.ctx(&format!("cannot write {key}")))?;
        // The key now lives on the new lease: the previous run's lease
        // holds nothing and is revoked rather than left to expire (a fleet
        // polling every few minutes would otherwise keep three leases per
        // host alive).
        if let Some(old) = put
            .prev_key()
            .map(|kv| kv.lease())
            .filter(|l| *l != 0 && *l != lease)
        {
            self.revoke(old).await;
        }
        Ok(())
    }

    /// Marks `commit` as reverted by `host` (no lease: the mark outlives
    /// the host).
    pub async fn mark_bad(&mut self, commit: &str, host: &str, reason: &str) -> Result<()> {
        let key = self.keys.bad_mark(commit, host);
        self.client
            .put(key.clone(), reason, None)
            .await
            .with_context(|| self.ctx(&format!("cannot write {key}")))?;
        Ok(())
    }

    /// The rollout policy recorded for `commit`, if any host recorded one.
    pub async fn policy(&mut self, commit: &str) -> Result<Option<Policy>> {
        let key = self.keys.policy(commit);
        let resp = self.get_key(&key).await?;
        match resp.kvs().first() {
            None => Ok(None),
            Some(kv) => serde_json::from_slice(kv.value())
                .map(Some)
                .with_context(|| self.ctx(&format!("{key} is not a rollout policy"))),
        }
    }

    /// This host's own last status, if its entry has not expired.
    pub async fn own_status(&mut self, host: &str) -> Result<Option<HostStatus>> {
        let key = self.keys.host(host);
        let resp = self.get_key(&key).await?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice(kv.value()).ok()))
    }
}

/// What [`Store::try_acquire`] got.
/// What the semaphore's put did.
enum Taken {
    Put,
    /// This host holds a lease-less permit (its reboot's): kept as it is.
    HeldWithoutLease,
    /// (FleetLock) the id's key is someone else's: a driftless host's
    /// permit of the same name.
    InUse,
    No(Acquired),
}

/// What [`Store::take_fleetlock_slot`] got.
pub enum SlotTaken {
    /// Taken now, or held already (FleetLock locks are recursive).
    Granted,
    /// `held` permits of the group are taken.
    Full { held: usize },
    /// Lost to other hosts taking permits at the same moment, repeatedly.
    Contended,
    /// The id's key is not a FleetLock slot (a driftless host's permit).
    InUse,
}

pub enum Acquired {
    Permit(Permit),
    /// `held` permits of `max` are taken.
    Full {
        held: usize,
    },
    /// Permits were free, but other hosts took permits at the same moment
    /// on every attempt.
    Contended {
        attempts: usize,
    },
}

/// A pause of 5 to 5 + 20·(attempt + 1) ms, different per process and
/// call (no random-number crate for this: the clock's nanoseconds and the
/// process id spread hosts well enough).
fn jitter(attempt: usize) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let spread = 20 * (attempt as u64 + 1);
    let seed = u64::from(nanos) ^ (u64::from(std::process::id()) << 7);
    Duration::from_millis(5 + seed % spread)
}

/// Keys read per request by `Store::list`: a page of host statuses stays
/// far below gRPC's 4 MiB message limit.
const PAGE: i64 = 500;

/// The first key after every key starting with `prefix` (etcd's range end
/// for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the keyspace.
    vec![0]
}

/// A key or password file: read only if no one but its owner can read or
/// write it (as ssh does with private keys), so a copy that went
/// world-readable is noticed rather than used. The bytes are wiped when
/// dropped.
fn read_private(key: &str, path: &std::path::Path) -> Result<zeroize::Zeroizing<Vec<u8>>> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // Checked on the open file, not the path: nothing can swap it between
    // the check and the read.
    let mut file = std::fs::File::open(path)
        .with_context(|| format!("{key}: cannot read {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("{key}: cannot read {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "{key}: {} is readable or writable by others (mode {mode:04o}); it holds a secret: chmod 600 it",
            path.display()
        );
    }
    // Owned by root or by the agent's own user (anyone else could replace
    // it with a key of their choosing), as ssh requires of its keys.
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        anyhow::bail!(
            "{key}: {} belongs to uid {}, not to root or the agent's user (uid {me}); chown it",
            path.display(),
            meta.uid()
        );
    }
    let mut bytes = zeroize::Zeroizing::new(Vec::new());
    file.read_to_end(&mut bytes)
        .with_context(|| format!("{key}: cannot read {}", path.display()))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/t/hosts/"), b"/t/hosts0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
