//! From a fetched commit to a plan: the host's configuration loaded (or
//! taken from the configuration cache), its files rendered and observed,
//! and the plan made against the inventory.

use std::collections::BTreeSet;
use std::path::Path;

use tracing::debug;

use crate::config::Settings;
use crate::desired::load::{self, LoadOptions};
use crate::desired::render::Renderer;
use crate::desired::snapshot::Snapshot;
use crate::desired::spec::TargetPath;
use crate::effects::rootfs::RootFs;
use crate::effects::state::{config_cache, StateDir};
use crate::effects::{facts, ids, observe};
use crate::exit::{Classify, Error, Failure};
use crate::plan::{self, Plan};
use crate::timings;

use super::{applied_commits, fetch, fully_read, stick, Fetched, Prepared};

/// Picks the host name to look up: the configured name, or for an FQDN
/// whose file is missing, its first label.
pub(super) fn host_name(settings: &Settings, snap: &Snapshot) -> String {
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
pub(super) fn plan_for_sync(
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
pub(super) fn lexical(p: &Path) -> std::path::PathBuf {
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
pub(super) fn load_config(settings: &Settings, snap: &Snapshot) -> Result<load::HostConfig, Error> {
    let opts = load_options(settings);
    let host = host_name(settings, snap);
    let _t = timings::stage("load");
    load::load_host(snap, &host, &opts).kind(Failure::InvalidRepo)
}

/// The health checks the configuration of `commit` (a commit of the
/// mirror) declares for this host: loaded, not rendered (checks are no
/// templates, so a plan's checks are these).
pub(super) fn checks_of_commit(
    settings: &Settings,
    state: &StateDir,
    commit: &str,
) -> anyhow::Result<Vec<crate::desired::spec::Check>> {
    let fetched = super::fetched_commit(settings, state, commit).map_err(|e| e.error)?;
    Ok(load_config(settings, &fetched.snapshot)
        .map_err(|e| e.error)?
        .checks)
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
pub(super) fn load_config_cached(
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
pub(super) fn plan_files(
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
pub(super) fn refuse_purging_package_files(fs: &RootFs, plan: &Plan) -> Result<(), Error> {
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
