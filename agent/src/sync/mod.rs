//! One pass of the pipeline: fetch → load → render → plan → apply → record.
//!
//! `plan` runs the same [`prepare`] and stops before applying, so what it
//! prints is exactly what `sync` would do. Every failure carries its exit
//! code ([`crate::exit::Failure`]); every stop before the commit point
//! leaves the host as it was.

pub mod bundle;
mod fleet;
mod fleetlock;
pub mod marks;
mod metrics;
pub mod post;
pub mod quick;
mod reboot;
pub mod reboot_permit;
pub mod repair;
mod run;
mod runlog;
pub mod state_repair;
pub mod stick;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use tokio::runtime::Handle;

use anyhow::{anyhow, Context};
use tracing::{debug, warn};

use crate::config::Settings;
use crate::desired::load::{self, LoadOptions};
use crate::desired::render::Renderer;
use crate::desired::snapshot::Snapshot;
use crate::desired::spec::TargetPath;
use crate::effects::apply::{Applied, ApplyOptions};
use crate::effects::fetch::{self, Location, SourceSpec, SshOptions};
use crate::effects::rootfs::RootFs;
use crate::effects::state::history::Outcome;
use crate::effects::state::{config_cache, floor, LockGuard, StateDir};
use crate::effects::{facts, ids, observe};
use crate::exit::{Classify, Error, Failure};
use crate::plan::diff::short;
use crate::plan::{self, Plan};
use crate::timings;
use run::{begin, deploy};
pub use run::{sync_once, Reverted};
use runlog::record;
pub use runlog::{load_last_run, LastRun};

/// The repository as fetched for this pass.
pub struct Fetched {
    pub commit: String,
    /// Committer time, seconds since the epoch.
    pub commit_time: i64,
    pub summary: String,
    pub snapshot: Snapshot,
}

/// Everything `plan` shows and `sync` applies.
pub struct Prepared {
    pub fetched: Fetched,
    pub plan: Plan,
}

#[derive(Debug, Clone, Default)]
pub struct SyncOptions {
    /// How long to wait for another run's lock.
    pub wait: Duration,
    pub apply: ApplyOptions,
    /// Apply a commit marked bad, and clear the halted flag.
    pub retry: bool,
    /// Skip the quick check: render and compare every file.
    pub full: bool,
}

/// The result of a successful `sync`.
pub struct Report {
    pub commit: String,
    pub applied: Option<Applied>,
    pub plan: Plan,
    pub recovered: Vec<String>,
    /// The fetched commit is marked bad and was not applied.
    pub skipped_bad: bool,
    /// What the post-apply stage did (when something was applied).
    pub post: Option<post::PostReport>,
    /// Nothing changed since the last sync, proven by the quick check
    /// without rendering.
    pub quick: bool,
    /// `[fleet]`: the fetched commit is new, and this host may not apply
    /// it yet (or its rollout is halted); nothing was touched.
    pub waiting: Option<crate::effects::fleet::Waiting>,
}

impl Report {
    /// Ends the report's life at the end of a one-pass run: its plan's
    /// next inventory and set of self-contained files (a run's largest
    /// allocations at 10,000 files) go to [`crate::memory::discard`]; the
    /// rest, which may hold rendered secrets, is dropped (and zeroized).
    pub fn discard(mut self) {
        crate::memory::discard(std::mem::take(&mut self.plan.next_inventory));
        crate::memory::discard(std::mem::take(&mut self.plan.self_contained));
    }
}

pub fn source_spec(settings: &Settings) -> Result<SourceSpec, Error> {
    let source = settings.source.as_deref().ok_or_else(|| {
        Error::new(
            Failure::Config,
            anyhow!(
                "no repository configured: set `source` in {} or pass --source",
                crate::config::MAIN_CONFIG
            ),
        )
    })?;
    Ok(SourceSpec {
        location: Location::parse(source).kind(Failure::Config)?,
        branch: settings.branch.clone(),
        ssh: SshOptions {
            key: settings.ssh_key.clone(),
            known_hosts: settings.ssh_known_hosts.clone(),
        },
    })
}

/// Opens (creating) the state directory. Under a `--root` prefix it is,
/// by default, inside the root, which may be a hostile image: its path is
/// then walked from a handle on the root without following any symlink (a
/// link at `var/lib/driftless` would otherwise put the agent's state, and
/// its lock, anywhere on the host).
pub fn open_state(settings: &Settings) -> anyhow::Result<StateDir> {
    // Lexically normalised, as the reserved paths are: the walk below
    // resolves no `..` through a link, and the directory opened is the
    // one walked.
    let root = lexical(&settings.root);
    let dir = lexical(&settings.state_dir);
    if root != Path::new("/") {
        if let Ok(rel) = dir.strip_prefix(&root) {
            let target = TargetPath::parse(&format!("/{}", rel.display()))
                .map_err(|e| anyhow::anyhow!("state_dir {}: {e}", settings.state_dir.display()))?;
            RootFs::open(&root)?.ensure_dir(&target, 0o700)?;
            return StateDir::open(&dir);
        }
    }
    StateDir::open(&settings.state_dir)
}

/// Opens the state directory and takes the lock.
pub fn lock(settings: &Settings, wait: Duration) -> Result<(StateDir, LockGuard), Error> {
    let state = open_state(settings).kind(Failure::Failed)?;
    let guard = state.lock(wait).map_err(|e| {
        let kind = if e.is::<crate::effects::state::LockBusy>() {
            Failure::Busy
        } else {
            Failure::Failed
        };
        Error::new(kind, e)
    })?;
    Ok((state, guard))
}

/// Opens the managed root, creating a `--root` prefix if missing.
pub fn open_root(settings: &Settings) -> Result<RootFs, Error> {
    if !settings.root.exists() {
        std::fs::create_dir_all(&settings.root)
            .with_context(|| format!("cannot create root {}", settings.root.display()))
            .kind(Failure::Failed)?;
    }
    RootFs::open(&settings.root).kind(Failure::Failed)
}

/// Fetches the configured commit and reads its tree (see [`fetch_head`]).
pub fn fetch(settings: &Settings, state: &StateDir, applied: &[String]) -> Result<Fetched, Error> {
    let head = fetch_head(settings, state, applied)?;
    read_snapshot(settings, head)
}

/// The bound of the object cache of a fetched repository handle (a
/// directory of 10,000 files is a tree object of ~400 KB).
const TREE_CACHE_BYTES: usize = 8 << 20;

/// The commit to apply, fetched and trusted, its tree not read yet.
pub struct Head {
    repo: gix::Repository,
    id: gix::ObjectId,
    pub commit: String,
    pub commit_time: i64,
    pub summary: String,
}

/// What changed in the tree since an earlier commit (the one the
/// quick-check record vouches for), without reading any file; `None` if
/// the trees cannot be compared.
fn read_changes(settings: &Settings, head: &Head, commit: &str) -> Option<fetch::TreeChanges> {
    let _t = timings::stage("tree-diff");
    let id = gix::ObjectId::from_hex(commit.as_bytes()).ok()?;
    fetch::tree_changes(&head.repo, id, head.id, &settings.path)
        .map_err(|e| debug!("cannot compare the trees of {commit} and the new commit: {e:#}"))
        .ok()
}

/// Reads the configured sub-tree of the fetched commit.
pub fn read_snapshot(settings: &Settings, head: Head) -> Result<Fetched, Error> {
    let _t = timings::stage("read-tree");
    let snapshot = fetch::read_tree(&head.repo, head.id, &settings.path, settings.limits.file)
        .kind(Failure::InvalidRepo)?;
    Ok(Fetched {
        commit: head.commit,
        commit_time: head.commit_time,
        summary: head.summary,
        snapshot,
    })
}

/// [`read_snapshot`] read as it is used (see `run::lazy_tree` for when
/// that is sound); the head is kept for a whole read after all.
/// `known`: trees of the head's commit read already (see
/// [`fetch::read_tree_lazily`]).
pub(super) fn read_snapshot_lazily(
    settings: &Settings,
    head: &Head,
    known: Vec<(gix::ObjectId, Vec<u8>)>,
) -> Result<Fetched, Error> {
    let snapshot = fetch::read_tree_lazily(
        &head.repo,
        head.id,
        &settings.path,
        settings.limits.file,
        known,
    )
    .kind(Failure::InvalidRepo)?;
    Ok(Fetched {
        commit: head.commit.clone(),
        commit_time: head.commit_time,
        summary: head.summary.clone(),
        snapshot,
    })
}

/// A plan made from a snapshot read lazily is only as good as its reads:
/// an error if one failed (an entry then read as missing).
fn fully_read(fetched: &Fetched) -> Result<(), Error> {
    match fetched.snapshot.failure() {
        None => Ok(()),
        Some(why) => Err(anyhow!(
            "cannot read the tree of commit {}: {why}",
            short(&fetched.commit)
        ))
        .kind(Failure::InvalidRepo),
    }
}

/// Fetches the configured commit and enforces the trust policy: the new
/// tip must descend from every commit in `applied` (the inventory's commit
/// and the anti-rollback floor, see [`floor`]), and with `require_signed`
/// the new commits must carry valid signatures. A refusal changes nothing.
pub fn fetch_head(
    settings: &Settings,
    state: &StateDir,
    applied: &[String],
) -> Result<Head, Error> {
    let spec = source_spec(settings)?;
    fetch::install_tls_provider();
    let timing = timings::stage("fetch");
    let got = fetch::fetch(&spec, &state.mirror()).kind(Failure::Failed)?;
    drop(timing);
    let commit = got.commit.to_string();
    let mut base = None;
    for prev in applied {
        let prev_id = gix::ObjectId::from_hex(prev.as_bytes())
            .with_context(|| format!("the state names an invalid commit {prev:?}"))
            .kind(Failure::Failed)?;
        if prev == &commit || settings.allow_non_fast_forward {
            base = base.or(Some(prev_id));
            continue;
        }
        if !fetch::is_ancestor(&got.repo, prev_id, got.commit).kind(Failure::Failed)? {
            let older = fetch::is_ancestor(&got.repo, got.commit, prev_id).unwrap_or(false);
            let why = if older {
                "which is older than (an ancestor of) the applied commit: applying it would downgrade the host"
            } else {
                "which does not descend from the applied commit (judged by ancestry through the whole history, not by commit dates): its history was rewritten (force-push?) or the source changed"
            };
            return Err(Error::new(
                Failure::Refused,
                anyhow!(
                    "branch {} now points to {}, {why} {}. Nothing applied. If this is intended, \
                     run `driftless rollback --to {}` or pass --allow-non-fast-forward (allow_non_fast_forward = true)",
                    settings.branch,
                    short(&commit),
                    short(prev),
                    short(&commit)
                ),
            ));
        }
        base = Some(prev_id);
    }
    if settings.require_signed {
        let _t = timings::stage("signatures");
        verify_signatures(settings, &got.repo, base, got.commit)?;
    }
    let mut repo = got.repo;
    // The new commit's trees are read twice when a sync compares them
    // with the recorded commit's first (`read_changes`, then
    // `read_snapshot`): decoded objects are kept, up to a bound, so the
    // second read of a large directory is a copy, not another inflate.
    repo.object_cache_size_if_unset(TREE_CACHE_BYTES);
    Ok(Head {
        repo,
        id: got.commit,
        commit,
        commit_time: got.commit_time,
        summary: got.summary,
    })
}

/// The signers file, as a refusal-class error when missing or invalid.
pub fn allowed_signers(settings: &Settings) -> Result<crate::trust::AllowedSigners, Error> {
    crate::trust::AllowedSigners::load(&settings.allowed_signers).map_err(|e| {
        Error::new(
            Failure::Config,
            e.context(format!(
                "cannot use the allowed signers file {} (`allowed_signers`)",
                settings.allowed_signers.display()
            )),
        )
    })
}

/// `require_signed`: the commits new since `base` (or only the tip, on a
/// first sync) must be signed by an allowed key.
fn verify_signatures(
    settings: &Settings,
    repo: &gix::Repository,
    base: Option<gix::ObjectId>,
    tip: gix::ObjectId,
) -> Result<(), Error> {
    let signers = allowed_signers(settings)?;
    let verified =
        crate::trust::verify_history(repo, base, tip, &signers, settings.signature_policy)
            .map_err(|e| {
                Error::new(
                    Failure::Refused,
                    e.context(format!(
                        "refusing {}: require_signed is on and a commit fails signature verification. Nothing applied",
                        short(&tip.to_string())
                    )),
                )
            })?;
    for (id, v) in &verified {
        tracing::debug!(commit = %short(&id.to_string()), principal = %v.principal, key = %v.fingerprint, "signature verified");
    }
    Ok(())
}

/// The commits a new tip must descend from: the inventory's and the
/// anti-rollback floor's (the same one, normally).
pub fn applied_commits(settings: &Settings, state: &StateDir) -> Result<Vec<String>, Error> {
    let inventory = state.inventory().kind(Failure::Failed)?;
    applied_commits_from(settings, inventory.commit.clone())
}

/// [`applied_commits`] when the inventory's commit is already known.
fn applied_commits_from(
    settings: &Settings,
    inventory_commit: Option<String>,
) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    if let Some(c) = inventory_commit {
        out.push(c);
    }
    if let Some(f) = floor::load(&settings.root).kind(Failure::Failed)? {
        if !out.contains(&f.commit) {
            out.push(f.commit);
        }
    }
    Ok(out)
}

/// Raises the anti-rollback floor to `fetched` after it was applied (or
/// found already in place).
fn raise_floor(settings: &Settings, fetched_commit: &str, commit_time: i64, now: i64) {
    let Some(record) = floor_to_raise(settings, fetched_commit, commit_time, now) else {
        return;
    };
    if let Err(e) = floor::save(&settings.root, &record) {
        warn!("cannot record the anti-rollback floor: {e:#}");
    }
}

/// The anti-rollback record that applying `fetched_commit` should leave,
/// or `None` when the current one already says so. The commit writes it
/// with the inventory (see `apply::commit`); [`raise_floor`] afterwards
/// finds it in place, or writes it if that failed.
fn floor_to_raise(
    settings: &Settings,
    fetched_commit: &str,
    commit_time: i64,
    now: i64,
) -> Option<floor::Floor> {
    let full_ref =
        fetch::full_ref_name(&settings.branch).unwrap_or_else(|_| settings.branch.clone());
    let current = floor::load(&settings.root).ok().flatten();
    if current.as_ref().is_some_and(|f| {
        f.commit == fetched_commit
            && f.branch == full_ref
            && !f.rolled_back.iter().any(|c| c == fetched_commit)
    }) {
        return None;
    }
    Some(floor::Floor {
        commit: fetched_commit.to_string(),
        commit_time,
        branch: full_ref,
        recorded_at: now,
        rolled_back: current.map_or_else(Vec::new, |f| f.rolled_back_without(fetched_commit)),
    })
}

/// Picks the host name to look up: the configured name, or for an FQDN
/// whose file is missing, its first label.
fn host_name(settings: &Settings, snap: &Snapshot) -> String {
    let full = settings.host.clone();
    if !snap.contains(&format!("hosts/{full}.toml")) {
        if let Some((short, _)) = full.split_once('.') {
            if snap.contains(&format!("hosts/{short}.toml")) {
                return short.to_string();
            }
        }
    }
    full
}

/// The host's facts (one gathering per sync: the quick check's inputs and
/// the templates see the same values).
pub fn gather_facts(fs: &RootFs) -> serde_json::Value {
    let _t = timings::stage("facts");
    facts::gather(fs)
}

/// Load, render, observe and plan for this host.
pub fn plan_for(
    settings: &Settings,
    state: &StateDir,
    fs: &RootFs,
    fetched: &Fetched,
    facts: &serde_json::Value,
) -> Result<Plan, Error> {
    let plan = load_config(settings, &fetched.snapshot)
        .and_then(|config| plan_files(settings, state, fs, fetched, facts, &config, None));
    // (Before its own error: a read that failed makes a missing file.)
    fully_read(fetched)?;
    plan
}

/// [`plan_for`] in a sync: the loaded configuration is also saved as the
/// configuration cache the quick-check record will name.
fn plan_for_sync(
    settings: &Settings,
    state: &StateDir,
    fs: &RootFs,
    fetched: &Fetched,
    facts: &serde_json::Value,
) -> Result<Plan, Error> {
    let (config, cache, _) = load_config_cached(settings, state, &fetched.snapshot, None)?;
    let mut plan = plan_files(settings, state, fs, fetched, facts, &config, None)?;
    plan.config_cache = cache;
    Ok(plan)
}

/// How to load a repository for these settings: the allowed roots, and
/// the paths the agent owns (issue 12 §5: a role could claim the
/// anti-rollback floor, the trust anchors, agent.toml or marks.json).
pub fn load_options(settings: &Settings) -> LoadOptions {
    let mut reserved: Vec<(TargetPath, String)> = Vec::new();
    let root = lexical(&settings.root);
    let mut add = |p: &Path, what: &str| {
        // A path on the host as a target path: under the managed root.
        // Compared lexically normalised: `state_dir = "/srv/state/"` (or
        // `//srv/state`, `/srv/x/../state`) once failed to parse as a
        // target path and so reserved nothing.
        let p = lexical(p);
        let rel = if root == Path::new("/") {
            Some(p)
        } else {
            p.strip_prefix(&root).ok().map(|r| Path::new("/").join(r))
        };
        if let Some(t) = rel.and_then(|r| TargetPath::parse(&r.to_string_lossy()).ok()) {
            if !reserved.iter().any(|(r, _)| t.is_under(r)) {
                reserved.push((t, what.to_string()));
            }
        }
    };
    for (p, what) in [
        (
            "/etc/driftless",
            "the agent's configuration, trust anchors (allowed_signers), keys and anti-rollback record",
        ),
        ("/var/lib/driftless", "the agent's state"),
        ("/run/driftless", "the agent's runtime configuration"),
        ("/usr/lib/driftless", "the agent's packaged configuration"),
    ] {
        add(&settings.root.join(p.trim_start_matches('/')), what);
    }
    add(&settings.state_dir, "the agent's state (state_dir)");
    add(
        &settings.allowed_signers,
        "the trust anchors (allowed_signers)",
    );
    for k in settings.age_keys.iter().chain(&settings.ssh_host_keys) {
        add(k, "a key the agent decrypts secrets with");
    }
    for k in settings.ssh_key.iter().chain(&settings.ssh_known_hosts) {
        add(k, "the agent's ssh key or known_hosts for fetching");
    }
    for f in &settings.config_files {
        add(f, "an agent configuration file");
    }
    for w in &settings.webhooks {
        add(&w.secret_file, "a webhook's signing key (secret_file)");
    }
    // The agent rewrites its metrics file after every run: a role that
    // managed it would flap with the agent, and the file would lie.
    if let Some(m) = &settings.metrics_file {
        add(m, "the agent's metrics file (metrics_file)");
    }
    // How the agent is started: a role that overrides its units (a drop-in
    // with an empty ExecStart=), its timer, cron job or udev rule could
    // stop it for good, and nothing would ever sync the fix.
    for unit in crate::desired::spec::AGENT_UNITS {
        for dir in [
            "/etc/systemd/system.control",
            "/etc/systemd/system",
            "/run/systemd/system",
            "/usr/local/lib/systemd/system",
            "/usr/lib/systemd/system",
        ] {
            let what = "how the agent is started (its systemd units and their drop-ins)";
            add(&settings.root.join(format!("{}/{unit}", &dir[1..])), what);
            add(&settings.root.join(format!("{}/{unit}.d", &dir[1..])), what);
        }
    }
    // A Podman quadlet named like an agent unit generates that unit (in
    // /run/systemd/generator, above the packaged one in /usr/lib).
    for unit in crate::desired::spec::AGENT_UNITS {
        let stem = unit.rsplit_once('.').map_or(*unit, |(stem, _)| stem);
        for kind in [
            "container",
            "kube",
            "pod",
            "network",
            "volume",
            "image",
            "build",
        ] {
            add(
                &settings
                    .root
                    .join(format!("etc/containers/systemd/{stem}.{kind}")),
                "how the agent is started (a quadlet would generate its unit)",
            );
        }
    }
    add(
        &settings.root.join("etc/cron.d/driftless"),
        "how the agent is started (its cron job)",
    );
    add(
        &settings
            .root
            .join("etc/udev/rules.d/99-driftless-usb.rules"),
        "how the agent is started (its USB stick rule)",
    );
    LoadOptions {
        allowed_roots: settings.allowed_roots.clone(),
        reserved,
    }
}

/// `p` with `.`, `..`, repeated and trailing separators resolved without
/// touching the filesystem (`..` at the root stays at the root).
fn lexical(p: &Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                if out.parent().is_some() {
                    out.pop();
                }
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// This host's configuration in the fetched commit.
fn load_config(settings: &Settings, snap: &Snapshot) -> Result<load::HostConfig, Error> {
    let opts = load_options(settings);
    let host = host_name(settings, snap);
    let _t = timings::stage("load");
    load::load_host(snap, &host, &opts).kind(Failure::InvalidRepo)
}

/// [`load_config`] through the configuration cache: `reuse` names a
/// cache that the caller proved holds this snapshot's configuration (see
/// `effects::state::config_cache` for when that holds); it is read if it
/// is there for this host, options and agent build. Otherwise the
/// configuration is loaded and encoded as the new cache, written when the
/// quick-check record is (`config_cache::Pending`). Returns the
/// configuration and the cache that holds it (`None`: none; a cache that
/// cannot be encoded or written only costs the next sync a load).
///
/// From the cache, the configuration holds only the file declarations
/// `want` selects, and the third value is `true`; loaded, it holds all.
fn load_config_cached(
    settings: &Settings,
    state: &StateDir,
    snap: &Snapshot,
    reuse: Option<(&str, &config_cache::Want)>,
) -> Result<(load::HostConfig, Option<config_cache::Pending>, bool), Error> {
    let opts = load_options(settings);
    let host = host_name(settings, snap);
    let key = config_cache::Key::new(&host, &opts);
    if let (Some(key), Some((name, want))) = (&key, reuse) {
        let _t = timings::stage("load-cached");
        if let Some(config) = config_cache::load(state, key, name, &opts, Some(want)) {
            return Ok((config, Some(config_cache::Pending::existing(name)), true));
        }
    }
    let mut config = {
        let _t = timings::stage("load");
        load::load_host(snap, &host, &opts).kind(Failure::InvalidRepo)?
    };
    let cache = key.and_then(|key| {
        let _t = timings::stage("encode-config");
        config_cache::Pending::new(&key, &mut config)
            .map_err(|e| debug!("configuration cache not encoded: {e:#}"))
            .ok()
    });
    Ok((config, cache, false))
}

/// Renders, observes and plans the files of `config`: all of them, or
/// only those in `only`, with every other inventory entry carried over
/// unchanged (see `repair` for when that is sound).
fn plan_files(
    settings: &Settings,
    state: &StateDir,
    fs: &RootFs,
    fetched: &Fetched,
    facts: &serde_json::Value,
    config: &load::HostConfig,
    only: Option<&BTreeSet<TargetPath>>,
) -> Result<Plan, Error> {
    let snap = &fetched.snapshot;
    let keys_settings = settings.clone();
    let resolver = std::sync::Arc::new(crate::desired::secrets::SecretResolver::new(
        snap,
        Box::new(move || crate::effects::keys::load(&keys_settings)),
    ));
    let mut desired = match only {
        None => {
            // Parsed and rendered a batch of templates at a time (their
            // parsed forms were the largest thing a cold sync held), so
            // the stage holds both.
            let _t = timings::stage("render");
            crate::memory::limit_arenas();
            crate::desired::render::render_host(
                snap,
                config,
                facts,
                resolver.clone(),
                settings.limits,
            )
            .kind(Failure::InvalidRepo)?
        }
        Some(only) => {
            let timing = timings::stage("parse");
            let renderer = Renderer::for_files(snap, config, only, resolver.clone())
                .kind(Failure::InvalidRepo)?
                .with_limits(settings.limits);
            drop(timing);
            let _t = timings::stage("render");
            renderer
                .render_only(snap, config, facts, Some(only))
                .kind(Failure::InvalidRepo)?
        }
    };
    let timing = timings::stage("ids");
    let observed_accounts =
        crate::effects::accounts::observe(fs, &desired.accounts, ownership_applied())
            .kind(Failure::Failed)?;
    let mut ids = ids::resolve(fs, &desired, &observed_accounts).kind(Failure::Failed)?;
    let observed_packages =
        crate::effects::packages::observe(fs, &desired.packages, ownership_applied())
            .kind(Failure::Failed)?;
    let inventory = state.inventory().kind(Failure::Failed)?;
    let (inventory, carried) = match only {
        None => (inventory, std::collections::BTreeMap::new()),
        Some(only) => (
            std::sync::Arc::new(inventory.restricted_to(only)),
            inventory.files_without(only),
        ),
    };
    if desired.files.iter().any(|f| f.sensitive) || inventory.files.values().any(|e| e.sensitive) {
        ids.hash_key = state.hash_key().kind(Failure::Failed)?;
    }
    drop(timing);
    let timing = timings::stage("observe");
    let budget = observe::read_budget(&settings.limits);
    let observed = observe::observe(fs, &desired, &inventory, budget).kind(Failure::InvalidRepo)?;
    drop(timing);
    let _t = timings::stage("plan");
    let account_changes = plan::accounts::diff(&desired.accounts, &observed_accounts);
    // Moved into the plan, not copied: nothing below reads them.
    let contents = plan::take_contents(&mut desired);
    let mut plan = match (
        plan::plan_taking(
            &desired,
            contents,
            Some(&fetched.commit),
            &observed,
            &inventory,
            &ids,
        ),
        account_changes,
    ) {
        (Ok(mut p), Ok(a)) => {
            p.hooks = plan::accounts::with_hooks(&desired.hooks, &p.hooks, &a)
                .kind(Failure::InvalidRepo)?;
            p.accounts = a;
            p.account_notes = plan::accounts::notes(&desired.accounts, &observed_accounts);
            p
        }
        (Err(mut d), Err(a)) => {
            d.extend(a);
            return Err(d).kind(Failure::InvalidRepo);
        }
        (Err(d), Ok(_)) | (Ok(_), Err(d)) => return Err(d).kind(Failure::InvalidRepo),
    };
    refuse_purging_package_files(fs, &plan)?;
    let packages =
        plan::packages::diff(&desired.packages, &observed_packages).kind(Failure::InvalidRepo)?;
    if !packages.is_empty() {
        // Hooks ride along with package changes as with any change.
        let roles: BTreeSet<&str> = desired
            .packages
            .iter()
            .filter(|d| packages.iter().any(|c| c.name() == d.name))
            .map(|d| d.role.as_str())
            .collect();
        plan.hooks = desired
            .hooks
            .iter()
            .filter(|h| {
                plan.hooks.contains(h)
                    || h.run == crate::desired::spec::HookRun::Always
                    || roles.contains(h.role.as_str())
            })
            .cloned()
            .collect();
    }
    plan.package_record = plan::packages::PackagesRecord::of(&observed_packages.args, &packages);
    plan.reboot_packages = desired
        .packages
        .iter()
        .filter(|d| d.reboot && packages.iter().any(|c| c.name() == d.name))
        .map(|d| d.name.clone())
        .collect();
    plan.packages = packages;
    plan.packages_skipped = !observed_packages.managed && !desired.packages.is_empty();
    plan.unchanged += carried.len();
    // What was planned goes into the carried entries, a few inserts into
    // 10,000 rather than a merge that rebuilds the map. A path in both
    // (none: the carried ones are those not planned) keeps its carried
    // entry.
    let planned = std::mem::replace(&mut plan.next_inventory.files, carried);
    for (path, entry) in planned {
        plan.next_inventory.files.entry(path).or_insert(entry);
    }
    plan.drifted = stick::drifted(&plan, &inventory).len();
    plan.secrets_decrypted = resolver.decrypted_files();
    Ok(plan)
}

/// A purge (`[[dirs]]` with `purge = true`) never removes a file an
/// installed package owns (dpkg would miss it, and the next upgrade put it
/// back): `/etc/cron.d/e2scrub_all` belongs to e2fsprogs, so purging
/// `/etc/cron.d` must name it.
fn refuse_purging_package_files(fs: &RootFs, plan: &Plan) -> Result<(), Error> {
    let purged: Vec<&crate::plan::links::AbsentChange> =
        plan.absent.iter().filter(|a| a.purged).collect();
    if purged.is_empty() {
        return Ok(());
    }
    let paths: Vec<TargetPath> = purged.iter().map(|a| a.path.clone()).collect();
    let owners = crate::effects::reboot::dpkg_owners(fs, &paths).kind(Failure::Failed)?;
    let mut diags = crate::desired::Diagnostics::default();
    for (a, owner) in purged.iter().zip(owners) {
        if let Some(package) = owner {
            diags.push(format!(
                "{} (role {}): the purge of its directory would remove it, but package {package} owns it; \
                 declare it, add it to `keep`, or remove the package",
                a.path, a.role
            ));
        }
    }
    if diags.is_empty() {
        Ok(())
    } else {
        Err(diags).kind(Failure::InvalidRepo)
    }
}

/// Prepares a plan under an already-held lock.
pub fn prepare(settings: &Settings, state: &StateDir, fs: &RootFs) -> Result<Prepared, Error> {
    let applied = applied_commits(settings, state)?;
    let fetched = fetch(settings, state, &applied)?;
    let facts = gather_facts(fs);
    let plan = plan_for(settings, state, fs, &fetched, &facts)?;
    Ok(Prepared { fetched, plan })
}

/// `driftless rollback [--to COMMIT]`: applies an earlier commit on the
/// operator's request (no fast-forward check), through the same apply,
/// unit actions, checks and revert as a sync. The commit rolled back from
/// is marked bad, so the next poll does not re-apply it; a new commit on
/// the branch is applied as usual.
pub fn rollback(
    settings: &Settings,
    to: Option<&str>,
    now: i64,
    rt: &Handle,
) -> Result<Report, Error> {
    // The operator's rollback also resumes a halted agent (once it is
    // about to apply: a rollback refused early leaves the halt in place).
    let opts = SyncOptions::default();
    let mut pass = begin(settings, &opts, now, rt, true)?;
    let result = rollback_in(&mut pass, to, "rolled back by the operator");
    metrics::after_run(&pass, &result);
    result
}

/// The newest commit of the history applied before, that is not
/// `current` and not marked bad here: where a rollback goes by default.
fn previous_good(pass: &run::Pass, current: Option<&str>) -> Result<Option<String>, Error> {
    let history = pass.state.history().kind(Failure::Failed)?;
    Ok(history
        .iter()
        .rev()
        .filter(|e| e.outcome == Outcome::Applied)
        .filter_map(|e| e.commit.clone())
        .find(|c| Some(c.as_str()) != current && !pass.marks.bad.contains_key(c)))
}

/// May the fleet roll this host back from `current` by itself?
enum RollbackEligibility {
    Yes,
    /// Nothing earlier in the history to return to.
    NoEarlierCommit,
    /// `current` was itself reached by a rollback (the operator's or the
    /// fleet's): one automatic step is the limit.
    ReachedByRollback,
}

fn rollback_eligibility(pass: &run::Pass, current: &str) -> Result<RollbackEligibility, Error> {
    let history = pass.state.history().kind(Failure::Failed)?;
    let reached = history
        .iter()
        .rev()
        .find(|e| e.outcome == Outcome::Applied && e.commit.as_deref() == Some(current));
    if reached.is_some_and(|e| {
        e.message
            .as_deref()
            .is_some_and(|m| m.starts_with("rollback from"))
    }) {
        return Ok(RollbackEligibility::ReachedByRollback);
    }
    Ok(match previous_good(pass, Some(current))? {
        Some(_) => RollbackEligibility::Yes,
        None => RollbackEligibility::NoEarlierCommit,
    })
}

/// A rollback within a pass that holds the lock: to `to`, or the previous
/// good commit of the history. `why` is the bad mark's reason for the
/// commit rolled back from. Records the outcome in the history.
/// A commit of the mirror, read as a sync reads the fetched one (its
/// signatures checked again when they are required).
pub(super) fn fetched_commit(
    settings: &Settings,
    state: &StateDir,
    commit: &str,
) -> Result<Fetched, Error> {
    let spec = source_spec(settings)?;
    let repo = fetch::open(&spec, &state.mirror()).kind(Failure::Failed)?;
    let id = repo
        .rev_parse_single(commit)
        .map_err(|e| {
            Error::new(
                Failure::Failed,
                anyhow!("{commit:?} is not a commit of the repository: {e}"),
            )
        })?
        .detach();
    if settings.require_signed {
        verify_signatures(settings, &repo, None, id)?;
    }
    let commit_time = repo
        .find_commit(id)
        .ok()
        .and_then(|c| c.time().ok())
        .map_or(0, |t| t.seconds);
    let snapshot = fetch::read_tree(&repo, id, &settings.path, settings.limits.file)
        .kind(Failure::InvalidRepo)?;
    Ok(Fetched {
        commit: id.to_string(),
        commit_time,
        summary: String::new(),
        snapshot,
    })
}

fn rollback_in(pass: &mut run::Pass, to: Option<&str>, why: &str) -> Result<Report, Error> {
    let (settings, now) = (pass.settings, pass.now);
    let inventory = pass.state.inventory().kind(Failure::Failed)?;
    let current = inventory.commit.clone();
    let target = match to {
        Some(t) => t.to_string(),
        None => previous_good(pass, current.as_deref())?.ok_or_else(|| {
            Error::new(
                Failure::Failed,
                anyhow!("no earlier good commit in the history: name one with --to COMMIT"),
            )
        })?,
    };
    let mut fetched = fetched_commit(settings, &pass.state, &target)?;
    fetched.summary = format!("rollback to {}", short(&fetched.commit));
    let commit_time = fetched.commit_time;
    let facts = gather_facts(&pass.fs);
    let plan = plan_for(settings, &pass.state, &pass.fs, &fetched, &facts)?;
    if let Some(cur) = current.as_ref().filter(|c| **c != fetched.commit) {
        pass.marks.bad.insert(
            cur.clone(),
            marks::Mark {
                time: now,
                reason: format!("{why} to {}", short(&fetched.commit)),
            },
        );
    }
    pass.marks.bad.remove(&fetched.commit);
    pass.marks.halted = None;
    marks::save(&pass.state, &pass.marks).kind(Failure::Failed)?;
    let prepared = Prepared { fetched, plan };
    let result = deploy(pass, prepared);
    match &result {
        Ok(r) => {
            // The operator (or the fleet) lowered the floor on purpose.
            let full_ref =
                fetch::full_ref_name(&settings.branch).unwrap_or_else(|_| settings.branch.clone());
            let mut rolled_back = floor::load(&settings.root)
                .ok()
                .flatten()
                .map_or_else(Vec::new, |f| f.rolled_back_without(&r.commit));
            if let Some(cur) = current.as_ref().filter(|c| **c != r.commit) {
                rolled_back.retain(|c| c != cur);
                rolled_back.push(cur.clone());
            }
            let excess = rolled_back.len().saturating_sub(floor::MAX_ROLLED_BACK);
            rolled_back.drain(..excess);
            let lowered = floor::Floor {
                commit: r.commit.clone(),
                commit_time,
                branch: full_ref,
                recorded_at: now,
                rolled_back,
            };
            if let Err(e) = floor::save(&settings.root, &lowered) {
                warn!("cannot record the anti-rollback floor: {e:#}");
            }
            record(
                &pass.state,
                now,
                Outcome::Applied,
                Some(r.commit.clone()),
                r.applied.as_ref().map(|a| a.txid.clone()),
                r.applied.as_ref(),
                Some(format!(
                    "rollback from {}",
                    current.as_deref().map(short).unwrap_or("nothing")
                )),
            )
        }
        Err(e) => record(
            &pass.state,
            now,
            Outcome::Failed,
            None,
            None,
            None,
            Some(format!("rollback: {:#}", e.error)),
        ),
    }
    result
}

/// True when running as root: owners and groups are applied.
pub fn ownership_applied() -> bool {
    nix::unistd::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigSource, Fragment, SshFragment};
    use std::path::PathBuf;

    fn settings(f: Fragment) -> Settings {
        let f = Fragment {
            host: Some("h".into()),
            ..f
        };
        crate::config::load(&ConfigSource::None, f).expect("settings")
    }

    fn reserved(s: &Settings) -> Vec<String> {
        load_options(s)
            .reserved
            .iter()
            .map(|(t, _)| t.as_str().to_string())
            .collect()
    }

    #[test]
    fn live_root_reserves_the_agents_directories() {
        let r = reserved(&settings(Fragment::default()));
        for want in [
            "/etc/driftless",
            "/var/lib/driftless",
            "/run/driftless",
            "/usr/lib/driftless",
        ] {
            assert!(r.iter().any(|p| p == want), "{want} not in {r:?}");
        }
        // allowed_signers is below /etc/driftless: covered, not repeated.
        assert!(!r.iter().any(|p| p == "/etc/driftless/allowed_signers"));
    }

    #[test]
    fn metrics_file_is_reserved() {
        let s = settings(Fragment::default());
        let Some(m) = s.metrics_file.clone() else {
            panic!("metrics are on by default");
        };
        let r = reserved(&s);
        assert!(
            r.iter().any(|p| Path::new(p) == m),
            "{} not in {r:?}",
            m.display()
        );
    }

    #[test]
    fn configured_paths_are_reserved_even_when_not_normalised() {
        let s = settings(Fragment {
            state_dir: Some(PathBuf::from("/srv//state/")),
            allowed_signers: Some(PathBuf::from("/opt/trust/./x/../signers")),
            age_keys: Some(vec![PathBuf::from("/opt/keys/age.txt")]),
            ssh: SshFragment {
                key: Some(PathBuf::from("/opt/ssh/deploy")),
                known_hosts: Some(PathBuf::from("/opt/ssh/known_hosts")),
            },
            ..Fragment::default()
        });
        let r = reserved(&s);
        for want in [
            "/srv/state",
            "/opt/trust/signers",
            "/opt/keys/age.txt",
            "/opt/ssh/deploy",
            "/opt/ssh/known_hosts",
        ] {
            assert!(r.iter().any(|p| p == want), "{want} not in {r:?}");
        }
    }

    #[test]
    fn under_a_root_prefix_only_paths_inside_it_are_reserved() {
        let s = settings(Fragment {
            root: Some(PathBuf::from("/tmp/host-root/")),
            state_dir: Some(PathBuf::from("/tmp/host-root/srv/state")),
            allowed_signers: Some(PathBuf::from("/home/me/signers")),
            ..Fragment::default()
        });
        let r = reserved(&s);
        for want in ["/etc/driftless", "/var/lib/driftless", "/srv/state"] {
            assert!(r.iter().any(|p| p == want), "{want} not in {r:?}");
        }
        // Outside the root: not a target path of this host.
        assert!(!r.iter().any(|p| p.contains("home")), "{r:?}");
    }

    #[test]
    fn lexical_normalisation() {
        for (a, b) in [
            ("/a//b/", "/a/b"),
            ("/a/./b/../c", "/a/c"),
            ("/../a", "/a"),
            ("/", "/"),
        ] {
            assert_eq!(lexical(Path::new(a)), PathBuf::from(b), "{a}");
        }
    }
}
