//! Agent settings: where the repository is, which host this is, where
//! state lives and which paths may be written.
//!
//! Layers, lowest first (later wins, key by key):
//!
//! 1. built-in defaults
//! 2. `/etc/driftless/agent.toml` (or the file given with `--config`)
//! 3. drop-ins `*.toml` from `/usr/lib/driftless/agent.d`,
//!    `/run/driftless/agent.d`, `/etc/driftless/agent.d`, applied in file
//!    name order; a file in `/etc` masks one of the same name in `/run`,
//!    which masks `/usr/lib` (systemd's convention)
//! 4. command-line options
//!
//! Like zincati: fragments ([`Fragment`], every key optional) are merged
//! into inputs, then validated once into [`Settings`]. Unknown keys are
//! errors with a did-you-mean hint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::desired::spec::TargetPath;
use crate::desired::toml_file;
use crate::effects::state::DEFAULT_STATE_DIR;

pub const MAIN_CONFIG: &str = "/etc/driftless/agent.toml";
pub const DROP_IN_DIRS: &[&str] = &[
    "/usr/lib/driftless/agent.d",
    "/run/driftless/agent.d",
    "/etc/driftless/agent.d",
];
pub const DEFAULT_ALLOWED_ROOTS: &[&str] = &["/etc", "/usr/local", "/var/lib", "/srv", "/opt"];
pub const DEFAULT_BRANCH: &str = "main";
pub const DEFAULT_INTERVAL: &str = "5m";
pub const DEFAULT_SSH_HOST_KEYS: &[&str] =
    &["/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_rsa_key"];
pub const DEFAULT_SPLAY: &str = "1m";
pub const DEFAULT_JOB_TIMEOUT: &str = "90s";
/// The longest `interval` or `splay`: a year (and a day).
const MAX_PERIOD: Duration = Duration::from_secs(366 * 24 * 3600);
/// The longest `job_timeout`, for one systemd job: shorter than the
/// daemon's [`MAX_SYNC`](crate::daemon::MAX_SYNC), after which its
/// watchdog stops the agent mid-sync. (Several slow jobs in one sync can
/// still add up past it; this refuses only a single job that could.)
const MAX_JOB_TIMEOUT: Duration = Duration::from_secs(10 * 60);
pub const DEFAULT_ALLOWED_SIGNERS: &str = "/etc/driftless/allowed_signers";

/// One config file, or the command line: every key optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fragment {
    /// Repository: a path, `file://`, `https://`, `ssh://` or `user@host:path`.
    pub source: Option<String>,
    /// Branch (or full ref) to follow.
    pub branch: Option<String>,
    /// Sub-directory of the repository holding `driftless.toml`.
    pub path: Option<String>,
    /// This host's name in the repository (default: the kernel hostname).
    pub host: Option<String>,
    pub state_dir: Option<PathBuf>,
    /// Prefix under which targets are written (default `/`).
    pub root: Option<PathBuf>,
    pub allowed_roots: Option<Vec<String>>,
    /// Accept a tracked branch whose history was rewritten.
    pub allow_non_fast_forward: Option<bool>,
    /// Daemon: time between polls, e.g. "5m".
    pub interval: Option<String>,
    /// Daemon: random extra delay added to each interval, e.g. "1m".
    pub splay: Option<String>,
    /// How long one systemd job (reload, restart) may take, e.g. "90s".
    pub job_timeout: Option<String>,
    /// Run health checks even under a `--root` prefix (they always run on `/`).
    pub run_checks: Option<bool>,
    /// age identity files (`AGE-SECRET-KEY-1…` lines) for SOPS secrets.
    pub age_keys: Option<Vec<PathBuf>>,
    /// SSH private keys usable as age identities (default: the host keys
    /// /etc/ssh/ssh_host_ed25519_key and /etc/ssh/ssh_host_rsa_key).
    pub ssh_host_keys: Option<Vec<PathBuf>>,
    /// Refuse commits that are not signed by a key in `allowed_signers`.
    pub require_signed: Option<bool>,
    /// git's allowed_signers file (`gpg.ssh.allowedSignersFile` format):
    /// who may sign commits (namespace `git`) and bundles (namespace
    /// `driftless-bundle`).
    pub allowed_signers: Option<PathBuf>,
    /// `every-commit` (default) or `tip`: which new commits must be signed.
    pub signature_policy: Option<String>,
    /// Largest content of one managed file, e.g. "64MiB" (the default).
    pub max_file_size: Option<SizeValue>,
    /// Largest content of all of a host's files together, e.g. "1GiB"
    /// (the default).
    pub max_render_size: Option<SizeValue>,
    /// Largest bundle file imported (from a stick or `bundle import`),
    /// e.g. "2GiB" (the default).
    pub max_bundle_size: Option<SizeValue>,
    /// node_exporter textfile written after every run (default
    /// /var/lib/prometheus/node-exporter/driftless.prom); `""` or `false`
    /// turns it off.
    pub metrics_file: Option<MetricsFileValue>,
    #[serde(default)]
    pub ssh: SshFragment,
    /// `[[webhooks]]`: notifications of run outcomes. A layer that sets
    /// any replaces the list of the layers below it.
    pub webhooks: Option<Vec<crate::effects::notify::config::WebhookFragment>>,
    /// `[fleet]`: coordinate rollouts with other hosts through etcd
    /// (issue 17). Absent: this host applies new commits on its own, as
    /// always. Merged key by key across layers.
    pub fleet: Option<FleetFragment>,
}

/// `[fleet]` as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFragment {
    /// etcd client URLs, e.g. `["http://10.0.0.5:2379"]`.
    pub endpoints: Option<Vec<String>>,
    /// Key prefix for this fleet in etcd (default "/driftless").
    pub prefix: Option<String>,
    /// The group whose permits this host takes (default "default").
    pub group: Option<String>,
    /// Labels the rollout's waves select on, e.g. `{ canary = "yes" }`.
    pub labels: Option<BTreeMap<String, String>>,
    /// TTL of the lease behind this host's permit, e.g. "30s" (default):
    /// how long a permit of a host that died mid-apply stays taken.
    pub lease_ttl: Option<String>,
    /// etcd unreachable: "wait" (default: apply nothing new) or
    /// "apply-alone" (apply without coordination).
    pub on_unreachable: Option<String>,
    /// With `https://` endpoints: the CA (PEM) that signed etcd's
    /// certificate.
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM) for etcd's `--client-cert-auth`; with
    /// `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM); readable by its owner only.
    pub key_file: Option<PathBuf>,
    /// etcd's own authentication: a user, with `password_file`.
    pub user: Option<String>,
    /// The user's password (one line); readable by its owner only.
    pub password_file: Option<PathBuf>,
    /// Reboot this host by itself when a committed change asks for it
    /// (`reboot = true`), holding one of the group's permits across the
    /// reboot and only inside the group's maintenance window; the permit
    /// is given back after the first healthy run of the new boot.
    /// Default false: only `/run/reboot-required` says a reboot is due.
    pub reboot: Option<bool>,
    /// Instead of `endpoints`: a FleetLock server's base URL (zincati's
    /// protocol, e.g. `driftless fleet serve-fleetlock` or airlock). The
    /// host then takes a slot of its group before applying a new commit
    /// or rebooting, and nothing else of the fleet: no waves, halting or
    /// status, which need etcd.
    pub fleetlock: Option<String>,
}

impl FleetFragment {
    fn merge(&mut self, other: FleetFragment) {
        let FleetFragment {
            endpoints,
            prefix,
            group,
            labels,
            lease_ttl,
            on_unreachable,
            ca_file,
            cert_file,
            key_file,
            user,
            password_file,
            reboot,
            fleetlock,
        } = other;
        fn take<T>(mine: &mut Option<T>, theirs: Option<T>) {
            if theirs.is_some() {
                *mine = theirs;
            }
        }
        take(&mut self.endpoints, endpoints);
        take(&mut self.prefix, prefix);
        take(&mut self.group, group);
        take(&mut self.labels, labels);
        take(&mut self.lease_ttl, lease_ttl);
        take(&mut self.on_unreachable, on_unreachable);
        take(&mut self.ca_file, ca_file);
        take(&mut self.cert_file, cert_file);
        take(&mut self.key_file, key_file);
        take(&mut self.user, user);
        take(&mut self.password_file, password_file);
        take(&mut self.reboot, reboot);
        take(&mut self.fleetlock, fleetlock);
    }
}

/// What to do when etcd cannot be reached before applying a new commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnUnreachable {
    /// Keep the current state; try again next run (the default: a
    /// partition must not turn into an uncoordinated rollout).
    Wait,
    /// Apply as if there were no fleet (for hosts that must converge even
    /// when the coordination store is down).
    ApplyAlone,
}

/// `[fleet]`, validated.
#[derive(Debug, Clone, Serialize)]
pub struct FleetSettings {
    pub endpoints: Vec<String>,
    /// Starts with `/`, no trailing `/`.
    pub prefix: String,
    pub group: String,
    pub labels: BTreeMap<String, String>,
    pub lease_ttl: Duration,
    pub on_unreachable: OnUnreachable,
    /// `https://` endpoints: how to trust etcd and how to be known to it.
    pub tls: Option<FleetTls>,
    /// etcd's authentication (only over TLS).
    pub auth: Option<FleetAuth>,
    /// Reboot by itself under the fleet lock when a change asks for it.
    pub reboot: bool,
    /// The FleetLock backend (`endpoints` is then empty): the server's
    /// base URL, without a trailing `/`.
    pub fleetlock: Option<String>,
}

/// TLS to etcd: the CA, and an optional client certificate.
#[derive(Debug, Clone, Serialize)]
pub struct FleetTls {
    pub ca_file: PathBuf,
    /// Certificate and key, for etcd's `--client-cert-auth`.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// etcd user and the file holding its password (read at connect time,
/// never kept in the settings).
#[derive(Debug, Clone, Serialize)]
pub struct FleetAuth {
    pub user: String,
    pub password_file: PathBuf,
}

pub const DEFAULT_FLEET_PREFIX: &str = "/driftless";
pub const DEFAULT_FLEET_GROUP: &str = "default";
pub const DEFAULT_LEASE_TTL: &str = "30s";

/// `metrics_file`: a path, or `false` (off; `true` is the default path).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MetricsFileValue {
    Enabled(bool),
    Path(PathBuf),
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshFragment {
    /// Private key for `ssh://` sources.
    pub key: Option<PathBuf>,
    /// known_hosts file pinning the server's host key.
    pub known_hosts: Option<PathBuf>,
}

impl Fragment {
    /// The keys this fragment sets (for messages naming where a value
    /// came from).
    pub fn keys_set(&self) -> Vec<&'static str> {
        let Fragment {
            source,
            branch,
            path,
            host,
            state_dir,
            root,
            allowed_roots,
            allow_non_fast_forward,
            interval,
            splay,
            job_timeout,
            run_checks,
            age_keys,
            ssh_host_keys,
            require_signed,
            allowed_signers,
            signature_policy,
            max_file_size,
            max_render_size,
            max_bundle_size,
            metrics_file,
            ssh,
            webhooks,
            fleet,
        } = self;
        let mut out = Vec::new();
        let mut add = |set: bool, k: &'static str| {
            if set {
                out.push(k);
            }
        };
        add(source.is_some(), "source");
        add(branch.is_some(), "branch");
        add(path.is_some(), "path");
        add(host.is_some(), "host");
        add(state_dir.is_some(), "state_dir");
        add(root.is_some(), "root");
        add(allowed_roots.is_some(), "allowed_roots");
        add(allow_non_fast_forward.is_some(), "allow_non_fast_forward");
        add(interval.is_some(), "interval");
        add(splay.is_some(), "splay");
        add(job_timeout.is_some(), "job_timeout");
        add(run_checks.is_some(), "run_checks");
        add(age_keys.is_some(), "age_keys");
        add(ssh_host_keys.is_some(), "ssh_host_keys");
        add(require_signed.is_some(), "require_signed");
        add(allowed_signers.is_some(), "allowed_signers");
        add(signature_policy.is_some(), "signature_policy");
        add(max_file_size.is_some(), "max_file_size");
        add(max_render_size.is_some(), "max_render_size");
        add(max_bundle_size.is_some(), "max_bundle_size");
        add(metrics_file.is_some(), "metrics_file");
        add(ssh.key.is_some() || ssh.known_hosts.is_some(), "ssh");
        add(webhooks.is_some(), "webhooks");
        add(fleet.is_some(), "fleet");
        out
    }

    /// `other` wins where it sets a key. Destructuring makes a new key a
    /// compile error here until it is merged too.
    pub fn merge(&mut self, other: Fragment) {
        let Fragment {
            source,
            branch,
            path,
            host,
            state_dir,
            root,
            allowed_roots,
            allow_non_fast_forward,
            interval,
            splay,
            job_timeout,
            run_checks,
            age_keys,
            ssh_host_keys,
            require_signed,
            allowed_signers,
            signature_policy,
            max_file_size,
            max_render_size,
            max_bundle_size,
            metrics_file,
            ssh: SshFragment { key, known_hosts },
            webhooks,
            fleet,
        } = other;
        fn take<T>(mine: &mut Option<T>, theirs: Option<T>) {
            if theirs.is_some() {
                *mine = theirs;
            }
        }
        take(&mut self.source, source);
        take(&mut self.branch, branch);
        take(&mut self.path, path);
        take(&mut self.host, host);
        take(&mut self.state_dir, state_dir);
        take(&mut self.root, root);
        take(&mut self.allowed_roots, allowed_roots);
        take(&mut self.allow_non_fast_forward, allow_non_fast_forward);
        take(&mut self.interval, interval);
        take(&mut self.splay, splay);
        take(&mut self.job_timeout, job_timeout);
        take(&mut self.run_checks, run_checks);
        take(&mut self.age_keys, age_keys);
        take(&mut self.ssh_host_keys, ssh_host_keys);
        take(&mut self.require_signed, require_signed);
        take(&mut self.allowed_signers, allowed_signers);
        take(&mut self.signature_policy, signature_policy);
        take(&mut self.max_file_size, max_file_size);
        take(&mut self.max_render_size, max_render_size);
        take(&mut self.max_bundle_size, max_bundle_size);
        take(&mut self.metrics_file, metrics_file);
        take(&mut self.ssh.key, key);
        take(&mut self.ssh.known_hosts, known_hosts);
        take(&mut self.webhooks, webhooks);
        match (&mut self.fleet, fleet) {
            (Some(mine), Some(theirs)) => mine.merge(theirs),
            (mine @ None, Some(theirs)) => *mine = Some(theirs),
            (_, None) => {}
        }
    }
}

/// Default `max_bundle_size`: a config repository's full history fits many
/// times over; a stick cannot make the agent copy and hash without end.
pub const DEFAULT_MAX_BUNDLE_SIZE: u64 = 2 << 30;

/// Validated settings.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub source: Option<String>,
    pub branch: String,
    /// Normalised sub-path, "" for the repository root.
    pub path: String,
    pub host: String,
    pub state_dir: PathBuf,
    pub root: PathBuf,
    pub allowed_roots: Vec<TargetPath>,
    pub allow_non_fast_forward: bool,
    pub interval: Duration,
    pub splay: Duration,
    pub job_timeout: Duration,
    /// Unit actions and checks run (true on the live system, `root = "/"`).
    pub live: bool,
    pub run_checks: bool,
    pub age_keys: Vec<PathBuf>,
    pub ssh_host_keys: Vec<PathBuf>,
    pub ssh_key: Option<PathBuf>,
    pub ssh_known_hosts: Option<PathBuf>,
    pub require_signed: bool,
    pub allowed_signers: PathBuf,
    pub signature_policy: crate::trust::SignaturePolicy,
    /// Rendered output limits.
    #[serde(skip)]
    pub limits: crate::desired::guard::Limits,
    /// Largest bundle file imported, in bytes.
    pub max_bundle_size: u64,
    /// Where the node_exporter textfile goes after every run; `None`: off.
    pub metrics_file: Option<PathBuf>,
    /// Config files that were read, in order.
    pub config_files: Vec<PathBuf>,
    /// `[[webhooks]]`, validated.
    pub webhooks: Vec<crate::effects::notify::config::Webhook>,
    /// `[fleet]`, validated; `None`: no fleet coordination.
    pub fleet: Option<FleetSettings>,
}

/// Where to look for config files.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// The standard locations.
    System,
    /// Exactly this file, no drop-ins.
    File(PathBuf),
    /// No files: command line only.
    None,
}

/// Reads the config layers and applies `cli` on top.
pub fn load(source: &ConfigSource, cli: Fragment) -> Result<Settings> {
    let mut merged = Fragment::default();
    let mut read = Vec::new();
    // Which layer set each key last, for errors found after merging
    // ("interval: …" names the file that says so).
    let mut origins: BTreeMap<String, String> = BTreeMap::new();
    let mut layer = |path: &Path, merged: &mut Fragment| -> Result<()> {
        let (fragment, keys) = read_fragment(path)?;
        for k in keys {
            origins.insert(k, path.display().to_string());
        }
        merged.merge(fragment);
        read.push(path.to_path_buf());
        Ok(())
    };
    match source {
        ConfigSource::None => {}
        ConfigSource::File(path) => layer(path, &mut merged)?,
        ConfigSource::System => {
            let main = Path::new(MAIN_CONFIG);
            if main.exists() {
                layer(main, &mut merged)?;
            }
            for path in drop_ins(DROP_IN_DIRS)? {
                layer(&path, &mut merged)?;
            }
        }
    }
    for k in cli.keys_set() {
        origins.insert(k.to_string(), "the command line".to_string());
    }
    merged.merge(cli);
    validate(merged, read).map_err(|e| with_origin(e, &origins))
}

/// Prefixes a validation error with the file (or "the command line") that
/// set the key it is about: every message of [`validate`] starts with its
/// key (`interval: …`, `max_render_size (…) is smaller …`).
fn with_origin(e: anyhow::Error, origins: &BTreeMap<String, String>) -> anyhow::Error {
    let msg = format!("{e:#}");
    let key: String = msg
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    match origins.get(&key) {
        Some(origin) => anyhow::anyhow!("{origin}: {msg}"),
        None => e,
    }
}

/// Drop-in files by name; later directories mask earlier ones.
pub fn drop_ins(dirs: &[&str]) -> Result<Vec<PathBuf>> {
    let mut by_name: BTreeMap<String, PathBuf> = BTreeMap::new();
    for dir in dirs {
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot list {dir}")),
        };
        for entry in rd {
            let entry = entry.with_context(|| format!("cannot list {dir}"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".toml") && !name.starts_with('.') {
                by_name.insert(name, entry.path());
            }
        }
    }
    Ok(by_name.into_values().collect())
}

/// A config file and the top-level keys it sets.
fn read_fragment(path: &Path) -> Result<(Fragment, Vec<String>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read agent config {}", path.display()))?;
    let fragment =
        toml_file::parse(&path.display().to_string(), &text).map_err(anyhow::Error::msg)?;
    let keys = text
        .parse::<toml::Table>()
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default();
    Ok((fragment, keys))
}

fn validate(f: Fragment, config_files: Vec<PathBuf>) -> Result<Settings> {
    let cwd = std::env::current_dir().context("cannot determine the current directory")?;
    let absolute = |p: PathBuf| if p.is_absolute() { p } else { cwd.join(p) };

    let branch = f.branch.unwrap_or_else(|| DEFAULT_BRANCH.to_string());
    if branch.is_empty() || branch.contains("..") || branch.contains(char::is_whitespace) {
        bail!("branch {branch:?} is not a valid branch or ref name");
    }
    let path = normalise_sub_path(f.path.as_deref().unwrap_or(""))?;
    let host = match f.host {
        Some(h) => h,
        None => nix::unistd::gethostname()
            .context("cannot read the hostname; set `host` in the agent config or pass --host")?
            .into_string()
            .map_err(|_| anyhow::anyhow!("the hostname is not UTF-8; set `host` or pass --host"))?,
    };
    if host.is_empty() || host.contains('/') || host.starts_with('.') {
        bail!("host: {host:?} is not usable as hosts/<name>.toml; set `host` or pass --host");
    }
    let roots = f.allowed_roots.unwrap_or_else(|| {
        DEFAULT_ALLOWED_ROOTS
            .iter()
            .map(|s| s.to_string())
            .collect()
    });
    let mut allowed_roots = Vec::new();
    for r in roots {
        allowed_roots
            .push(TargetPath::parse(&r).map_err(|e| anyhow::anyhow!("allowed_roots: {e}"))?);
    }
    // A relative local source is relative to where the command runs.
    let source = f.source.map(|s| {
        if looks_like_url(&s) || Path::new(&s).is_absolute() {
            s
        } else {
            std::path::absolute(cwd.join(&s))
                .unwrap_or_else(|_| cwd.join(&s))
                .display()
                .to_string()
        }
    });
    let duration = |key: &str, v: Option<String>, default: &str| -> Result<Duration> {
        let text = v.unwrap_or_else(|| default.to_string());
        crate::desired::spec::parse_duration(&text).map_err(|e| anyhow::anyhow!("{key}: {e}"))
    };
    let interval = duration("interval", f.interval, DEFAULT_INTERVAL)?;
    if interval < Duration::from_secs(1) {
        bail!("interval: must be at least 1s");
    }
    if interval > MAX_PERIOD {
        bail!("interval: {} is more than a year (366d); a host that pulls this rarely is better served by `sync` from a timer", humantime::format_duration(interval));
    }
    let splay = duration("splay", f.splay, DEFAULT_SPLAY)?;
    if splay > MAX_PERIOD {
        bail!("splay: {} is more than a year (366d): the delay added to each interval must be shorter", humantime::format_duration(splay));
    }
    let job_timeout = duration("job_timeout", f.job_timeout, DEFAULT_JOB_TIMEOUT)?;
    if job_timeout < Duration::from_secs(1) || job_timeout > MAX_JOB_TIMEOUT {
        bail!(
            "job_timeout: {} is out of range: it must be between 1s and {} (a unit job that may take longer would outlast a sync, which the daemon's watchdog allows {}; a shorter one fails every restart)",
            humantime::format_duration(job_timeout),
            humantime::format_duration(MAX_JOB_TIMEOUT),
            humantime::format_duration(crate::daemon::MAX_SYNC),
        );
    }
    let root = absolute(f.root.unwrap_or_else(|| PathBuf::from("/")));
    let live = root == Path::new("/");
    let signature_policy = match f.signature_policy.as_deref() {
        None | Some("every-commit") => crate::trust::SignaturePolicy::EveryCommit,
        Some("tip") => crate::trust::SignaturePolicy::Tip,
        Some(other) => bail!(
            "signature_policy: {other:?} is not a policy; use \"every-commit\" (every new commit must be signed, the default) or \"tip\" (only the newest)"
        ),
    };
    let defaults = crate::desired::guard::Limits::default();
    let limits = crate::desired::guard::Limits {
        file: size("max_file_size", f.max_file_size, defaults.file)?,
        total: size("max_render_size", f.max_render_size, defaults.total)?,
    };
    if limits.file > crate::effects::rootfs::TARGET_READ_MAX_BYTES {
        bail!(
            "max_file_size ({}) is more than {}, the largest file driftless reads back at a managed path: lower it",
            crate::desired::guard::size_str(limits.file),
            crate::desired::guard::size_str(crate::effects::rootfs::TARGET_READ_MAX_BYTES)
        );
    }
    if limits.total < limits.file {
        bail!(
            "max_render_size ({}) is smaller than max_file_size ({}): make it at least as large",
            crate::desired::guard::size_str(limits.total),
            crate::desired::guard::size_str(limits.file)
        );
    }
    // State belongs to the root it describes: a `--root` prefix keeps its
    // own under the prefix unless `state_dir` says otherwise (a demo run as
    // root must not touch the host's /var/lib/driftless).
    let state_dir = match f.state_dir {
        Some(d) => absolute(d),
        None if live => PathBuf::from(DEFAULT_STATE_DIR),
        None => root.join(DEFAULT_STATE_DIR.trim_start_matches('/')),
    };
    let max_bundle_size = size(
        "max_bundle_size",
        f.max_bundle_size,
        DEFAULT_MAX_BUNDLE_SIZE,
    )?;
    // Like the state directory: the default belongs to the root it
    // describes (under `--root R`, R/var/lib/prometheus/…).
    let metrics_file = match f.metrics_file {
        Some(MetricsFileValue::Enabled(false)) => None,
        Some(MetricsFileValue::Path(p)) if p.as_os_str().is_empty() => None,
        Some(MetricsFileValue::Path(p)) => {
            if p.file_name().is_none() || p.to_string_lossy().ends_with('/') {
                bail!(
                    "metrics_file: {} names a directory; give the file, e.g. {}",
                    p.display(),
                    crate::effects::metrics::DEFAULT_METRICS_FILE
                );
            }
            Some(absolute(p))
        }
        None | Some(MetricsFileValue::Enabled(true)) if live => {
            Some(PathBuf::from(crate::effects::metrics::DEFAULT_METRICS_FILE))
        }
        None | Some(MetricsFileValue::Enabled(true)) => {
            Some(root.join(crate::effects::metrics::DEFAULT_METRICS_FILE.trim_start_matches('/')))
        }
    };
    let webhooks =
        crate::effects::notify::config::validate(f.webhooks.unwrap_or_default(), absolute)?;
    let fleet = f.fleet.map(|fl| validate_fleet(fl, &host)).transpose()?;
    Ok(Settings {
        fleet,
        metrics_file,
        webhooks,
        limits,
        max_bundle_size,
        interval,
        splay,
        job_timeout,
        live,
        run_checks: live || f.run_checks.unwrap_or(false),
        age_keys: f
            .age_keys
            .unwrap_or_default()
            .into_iter()
            .map(absolute)
            .collect(),
        ssh_host_keys: f
            .ssh_host_keys
            .unwrap_or_else(|| DEFAULT_SSH_HOST_KEYS.iter().map(PathBuf::from).collect()),
        source,
        branch,
        path,
        host,
        state_dir,
        root,
        allowed_roots,
        allow_non_fast_forward: f.allow_non_fast_forward.unwrap_or(false),
        ssh_key: f.ssh.key.map(absolute),
        ssh_known_hosts: f.ssh.known_hosts.map(absolute),
        require_signed: f.require_signed.unwrap_or(false),
        allowed_signers: absolute(
            f.allowed_signers
                .unwrap_or_else(|| PathBuf::from(DEFAULT_ALLOWED_SIGNERS)),
        ),
        signature_policy,
        config_files,
    })
}

/// `[fleet]`: every message starts with `fleet.<key>` (the origin prefix
/// then names the file that set it).
fn validate_fleet(f: FleetFragment, host: &str) -> Result<FleetSettings> {
    if f.fleetlock.is_some() {
        return validate_fleetlock(f, host);
    }
    if !cfg!(feature = "etcd") {
        bail!(
            "fleet: this driftless was built without etcd support (cargo feature `etcd`, e.g. \
             `cargo install --no-default-features`); rebuild with the default features, or remove [fleet]"
        );
    }
    let endpoints = f.endpoints.unwrap_or_default();
    if endpoints.is_empty() {
        bail!("fleet.endpoints: missing or empty; list the etcd client URLs, e.g. endpoints = [\"http://etcd1:2379\"]");
    }
    let https = endpoints
        .iter()
        .filter(|e| e.starts_with("https://"))
        .count();
    if https != 0 && https != endpoints.len() {
        bail!("fleet.endpoints: some are https:// and some are not; one fleet speaks one of them to etcd");
    }
    for e in &endpoints {
        // Named only redacted: whatever is before an `@` may be a password.
        let shown = redact_userinfo(e);
        if e.contains('@') {
            bail!("fleet.endpoints: {shown:?} carries a user or password, which would end up in logs and in `fleet status`: use fleet.user and fleet.password_file (etcd's authentication) instead");
        }
        let rest = e
            .strip_prefix("http://")
            .or_else(|| e.strip_prefix("https://"))
            .unwrap_or(e);
        if rest.is_empty() || rest.contains("://") || rest.contains('/') || !rest.contains(':') {
            bail!("fleet.endpoints: {shown:?} is not an etcd client URL like \"http://10.0.0.5:2379\"");
        }
    }
    let prefix = f.prefix.unwrap_or_else(|| DEFAULT_FLEET_PREFIX.to_string());
    if !prefix.starts_with('/')
        || prefix.ends_with('/')
        || prefix.contains("//")
        || prefix.contains(char::is_whitespace)
    {
        bail!("fleet.prefix: {prefix:?} must start with '/', not end with '/' and hold no empty part or space, e.g. \"/driftless\"");
    }
    let group = f.group.unwrap_or_else(|| DEFAULT_FLEET_GROUP.to_string());
    if group.is_empty()
        || group == crate::rollout::decide::ALL_GROUPS
        || group.contains('/')
        || group.contains(char::is_whitespace)
    {
        bail!("fleet.group: {group:?} must be a non-empty name without '/' or spaces, and not \"*\" (which means every group)");
    }
    let ttl_text = f.lease_ttl.unwrap_or_else(|| DEFAULT_LEASE_TTL.to_string());
    let lease_ttl = crate::desired::spec::parse_duration(&ttl_text)
        .map_err(|e| anyhow::anyhow!("fleet.lease_ttl: {e}"))?;
    if lease_ttl < Duration::from_secs(2) || lease_ttl > Duration::from_secs(3600) {
        bail!("fleet.lease_ttl: {ttl_text:?} is outside 2s..1h (etcd grants no shorter lease, and a longer one keeps a dead host's permit for too long)");
    }
    let on_unreachable = on_unreachable_of(f.on_unreachable.as_deref())?;
    let absolute = |key: &str, p: Option<PathBuf>| -> Result<Option<PathBuf>> {
        match p {
            Some(p) if !p.is_absolute() => {
                bail!("fleet.{key}: {} is not an absolute path", p.display())
            }
            other => Ok(other),
        }
    };
    let ca_file = absolute("ca_file", f.ca_file)?;
    let cert_file = absolute("cert_file", f.cert_file)?;
    let key_file = absolute("key_file", f.key_file)?;
    let password_file = absolute("password_file", f.password_file)?;
    let identity = match (cert_file, key_file) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => bail!(
            "fleet.cert_file and fleet.key_file go together: a client certificate needs its key"
        ),
    };
    let tls = if https > 0 {
        let Some(ca_file) = ca_file else {
            bail!(
                "fleet.ca_file: missing; https:// endpoints need the CA (PEM) that signed etcd's certificate"
            );
        };
        Some(FleetTls { ca_file, identity })
    } else {
        if ca_file.is_some() || identity.is_some() {
            bail!("fleet.ca_file, cert_file and key_file are for https:// endpoints; these are http://");
        }
        None
    };
    let auth = match (f.user, password_file) {
        (None, None) => None,
        (Some(_), Some(_)) if tls.is_none() => bail!(
            "fleet.user: over http:// the password would cross the network in clear; use https:// endpoints (and ca_file)"
        ),
        (Some(user), Some(password_file)) if !user.is_empty() => Some(FleetAuth {
            user,
            password_file,
        }),
        _ => bail!("fleet.user and fleet.password_file go together (and the user is not empty)"),
    };
    Ok(FleetSettings {
        reboot: f.reboot.unwrap_or(false),
        endpoints,
        prefix,
        group,
        labels: f.labels.unwrap_or_default(),
        lease_ttl,
        on_unreachable,
        tls,
        auth,
        fleetlock: None,
    })
}

/// `on_unreachable`, for both backends.
fn on_unreachable_of(v: Option<&str>) -> Result<OnUnreachable> {
    Ok(match v {
        None | Some("wait") => OnUnreachable::Wait,
        Some("apply-alone") => OnUnreachable::ApplyAlone,
        Some(other) => bail!(
            "fleet.on_unreachable: {other:?} is not a choice; use \"wait\" (apply nothing new until the fleet answers, the default) \
             or \"apply-alone\" (apply without coordination)"
        ),
    })
}

/// `[fleet] fleetlock = URL`: the FleetLock backend. The keys only etcd
/// reads are refused, not ignored.
fn validate_fleetlock(f: FleetFragment, host: &str) -> Result<FleetSettings> {
    let text = f.fleetlock.clone().unwrap_or_default();
    if f.endpoints.is_some() {
        bail!("fleet.fleetlock and fleet.endpoints: choose one backend; `endpoints` is etcd (waves, halting, fleet status), `fleetlock` a FleetLock server (a concurrency limit only)");
    }
    let etcd_only = [
        ("prefix", f.prefix.is_some()),
        ("labels", f.labels.is_some()),
        ("lease_ttl", f.lease_ttl.is_some()),
        ("cert_file", f.cert_file.is_some()),
        ("key_file", f.key_file.is_some()),
        ("user", f.user.is_some()),
        ("password_file", f.password_file.is_some()),
    ];
    if let Some((key, _)) = etcd_only.iter().find(|(_, set)| *set) {
        bail!("fleet.{key}: only the etcd backend (`endpoints`) reads it; a FleetLock server (fleet.fleetlock) knows only groups and ids: remove it");
    }
    // Nothing below echoes a user or password given in the URL: messages
    // show it with everything before its last '@' hidden, and a URL that
    // parses with credentials (however its slashes are spelled) is refused.
    let shown = redact_userinfo(&text);
    let url = reqwest::Url::parse(text.trim()).map_err(|e| {
        anyhow::anyhow!(
            "fleet.fleetlock: {shown:?} is not a URL ({e}); e.g. \"http://fleetlock.example:8282\""
        )
    })?;
    if !url.username().is_empty() || url.password().is_some() {
        bail!("fleet.fleetlock: the URL holds a user or password ({shown}), which would end up in logs; FleetLock has no authentication: put the server on a private network");
    }
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        bail!("fleet.fleetlock: {shown:?} is not an http:// or https:// server URL");
    }
    if url.query().is_some() || url.fragment().is_some() {
        bail!("fleet.fleetlock: give the server's base URL, without ?query or #fragment (the protocol's /v1/... paths are appended)");
    }
    let ca_file = match f.ca_file {
        Some(p) if !p.is_absolute() => {
            bail!("fleet.ca_file: {} is not an absolute path", p.display())
        }
        Some(_) if url.scheme() != "https" => {
            bail!("fleet.ca_file is for an https:// FleetLock server; {text:?} is http://")
        }
        other => other,
    };
    let group = f.group.unwrap_or_else(|| DEFAULT_FLEET_GROUP.to_string());
    crate::effects::fleet::fleetlock::check_group(&group)
        .map_err(|e| anyhow::anyhow!("fleet.group: {e} (the FleetLock protocol's rule)"))?;
    crate::effects::fleet::fleetlock::check_id(host).map_err(|e| {
        anyhow::anyhow!("host: {host:?} is this host's FleetLock id, but the {e}; set `host`")
    })?;
    Ok(FleetSettings {
        endpoints: Vec::new(),
        prefix: DEFAULT_FLEET_PREFIX.to_string(),
        group,
        labels: BTreeMap::new(),
        lease_ttl: Duration::from_secs(30),
        on_unreachable: on_unreachable_of(f.on_unreachable.as_deref())?,
        tls: ca_file.map(|ca_file| FleetTls {
            ca_file,
            identity: None,
        }),
        auth: None,
        reboot: f.reboot.unwrap_or(false),
        // As parsed (`https:host` is `https://host/`): what the client
        // connects to is what was checked.
        fleetlock: Some(url.as_str().trim_end_matches('/').to_string()),
    })
}

/// `text` with everything between its scheme and its last `@` hidden:
/// whatever the spelling of the slashes, a user and password come before
/// that `@` (a path that holds one is hidden a little too much, in a
/// message only).
fn redact_userinfo(text: &str) -> String {
    let Some(at) = text.rfind('@') else {
        return text.to_string();
    };
    let start = text.find(':').map_or(0, |i| i + 1);
    if start > at {
        return format!("***{}", &text[at..]);
    }
    format!("{}***{}", &text[..start], &text[at..])
}

/// URL schemes and scp-like `user@host:path`.
pub fn looks_like_url(s: &str) -> bool {
    s == "bundle:"
        || s.contains("://")
        || (s.contains('@') && s.contains(':') && !s.starts_with('/'))
}

fn normalise_sub_path(p: &str) -> Result<String> {
    let parts: Vec<&str> = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if parts.contains(&"..") {
        bail!("path {p:?}: the repository sub-path cannot contain '..'");
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_layers_win_key_by_key() {
        let mut a: Fragment = toml::from_str("source = \"a\"\nbranch = \"x\"\n").unwrap();
        let b: Fragment = toml::from_str("branch = \"y\"\n[ssh]\nkey = \"/k\"\n").unwrap();
        a.merge(b);
        assert_eq!(a.source.as_deref(), Some("a"));
        assert_eq!(a.branch.as_deref(), Some("y"));
        assert_eq!(a.ssh.key.as_deref(), Some(Path::new("/k")));
    }

    #[test]
    fn unknown_key_is_an_error_with_hint() {
        let err = toml_file::parse::<Fragment>("/etc/driftless/agent.toml", "brnach = \"main\"\n")
            .unwrap_err();
        assert!(err.contains("/etc/driftless/agent.toml:1:1"), "{err}");
        assert!(err.contains("did you mean `branch`?"), "{err}");
    }

    #[test]
    fn drop_ins_mask_by_name_and_sort() {
        let d = tempfile::tempdir().unwrap();
        let usr = d.path().join("usr");
        let etc = d.path().join("etc");
        std::fs::create_dir_all(&usr).unwrap();
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(usr.join("10-a.toml"), "").unwrap();
        std::fs::write(usr.join("20-b.toml"), "").unwrap();
        std::fs::write(etc.join("10-a.toml"), "").unwrap();
        std::fs::write(etc.join("notes.txt"), "").unwrap();
        let got = drop_ins(&[usr.to_str().unwrap(), etc.to_str().unwrap()]).unwrap();
        assert_eq!(got, vec![etc.join("10-a.toml"), usr.join("20-b.toml")]);
    }

    #[test]
    fn metrics_file_defaults_under_the_root_and_can_be_turned_off() {
        let with = |text: &str, root: Option<&str>| {
            let mut f: Fragment = toml::from_str(text).unwrap();
            f.host = Some("h".into());
            f.root = root.map(PathBuf::from);
            validate(f, Vec::new()).map(|s| s.metrics_file)
        };
        let default = Some(PathBuf::from(crate::effects::metrics::DEFAULT_METRICS_FILE));
        assert_eq!(with("", None).unwrap(), default);
        assert_eq!(with("metrics_file = true", None).unwrap(), default);
        assert_eq!(
            with("", Some("/tmp/r")).unwrap(),
            Some(PathBuf::from(
                "/tmp/r/var/lib/prometheus/node-exporter/driftless.prom"
            ))
        );
        assert_eq!(with("metrics_file = false", None).unwrap(), None);
        assert_eq!(with("metrics_file = \"\"", None).unwrap(), None);
        assert_eq!(
            with("metrics_file = \"/srv/m.prom\"", Some("/tmp/r")).unwrap(),
            Some(PathBuf::from("/srv/m.prom"))
        );
        let err = format!("{:#}", with("metrics_file = \"/srv/\"", None).unwrap_err());
        assert!(
            err.starts_with("metrics_file: /srv/ names a directory"),
            "{err}"
        );
    }

    /// The bug this guards against: `interval`, `splay` and `job_timeout`
    /// had no upper bound (a typo of `5y` for `5m` was taken, and the
    /// arithmetic on such values overflowed before it was made to
    /// saturate), and a `job_timeout` of 0 failed every restart, one over
    /// 15 minutes outlasted the watchdog's allowance for a sync. Each is
    /// refused, naming the key and the range.
    #[test]
    fn periods_and_the_job_timeout_are_bounded() {
        let with = |text: &str| {
            let mut f: Fragment = toml::from_str(text).unwrap();
            f.host = Some("h".into());
            validate(f, Vec::new()).map(|s| (s.interval, s.splay, s.job_timeout))
        };
        let (i, sp, j) = with("").unwrap();
        assert_eq!(
            (i, sp, j),
            (
                Duration::from_secs(300),
                Duration::from_secs(60),
                Duration::from_secs(90)
            )
        );
        assert!(with("interval = \"366d\"\nsplay = \"366d\"\njob_timeout = \"10m\"").is_ok());
        for (text, want) in [
            ("interval = \"367d\"", "interval: 1year 1day 18h"),
            ("interval = \"100000y\"", "interval: "),
            ("splay = \"2y\"", "splay: "),
            ("job_timeout = \"0s\"", "job_timeout: 0s is out of range"),
            (
                "job_timeout = \"11m\"",
                "job_timeout: 11m is out of range: it must be between 1s and 10m",
            ),
        ] {
            let err = format!("{:#}", with(text).unwrap_err());
            assert!(err.starts_with(want), "{text}: {err}");
        }
    }

    #[cfg(feature = "etcd")]
    #[test]
    fn fleet_is_validated_and_absent_by_default() {
        let with = |text: &str| {
            let mut f: Fragment = toml::from_str(text).unwrap();
            f.host = Some("h".into());
            validate(f, Vec::new()).map(|s| s.fleet)
        };
        assert!(with("").unwrap().is_none());
        let f = with(
            "[fleet]\nendpoints = [\"http://127.0.0.1:2379\"]\nlabels = { canary = \"yes\" }\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(f.prefix, "/driftless");
        assert_eq!(f.group, "default");
        assert_eq!(f.lease_ttl, Duration::from_secs(30));
        assert_eq!(f.on_unreachable, OnUnreachable::Wait);
        assert_eq!(f.labels.get("canary").map(String::as_str), Some("yes"));
        assert!(f.tls.is_none() && f.auth.is_none());
        let f = with(
            "[fleet]\nendpoints = [\"https://e:2379\"]\nca_file = \"/ca.pem\"\ncert_file = \"/c.pem\"\n\
             key_file = \"/c.key\"\nuser = \"agent\"\npassword_file = \"/pw\"\n",
        )
        .unwrap()
        .unwrap();
        let tls = f.tls.unwrap();
        assert_eq!(tls.ca_file, Path::new("/ca.pem"));
        assert_eq!(
            tls.identity,
            Some((PathBuf::from("/c.pem"), PathBuf::from("/c.key")))
        );
        assert_eq!(f.auth.map(|a| a.user).as_deref(), Some("agent"));
        for (text, want) in [
            ("[fleet]\n", "fleet.endpoints: missing"),
            (
                "[fleet]\nendpoints = [\"https://e:2379\"]\n",
                "fleet.ca_file: missing; https:// endpoints need the CA",
            ),
            (
                "[fleet]\nendpoints = [\"https://e:2379\", \"http://f:2379\"]\nca_file = \"/ca\"\n",
                "some are https:// and some are not",
            ),
            (
                "[fleet]\nendpoints = [\"https://e:2379\"]\nca_file = \"ca.pem\"\n",
                "fleet.ca_file: ca.pem is not an absolute path",
            ),
            (
                "[fleet]\nendpoints = [\"https://e:2379\"]\nca_file = \"/ca\"\ncert_file = \"/c\"\n",
                "fleet.cert_file and fleet.key_file go together",
            ),
            (
                "[fleet]\nendpoints = [\"http://e:2379\"]\nca_file = \"/ca\"\n",
                "are for https:// endpoints",
            ),
            (
                "[fleet]\nendpoints = [\"http://e:2379\"]\nuser = \"u\"\npassword_file = \"/p\"\n",
                "fleet.user: over http:// the password would cross the network in clear",
            ),
            (
                "[fleet]\nendpoints = [\"https://e:2379\"]\nca_file = \"/ca\"\nuser = \"u\"\n",
                "fleet.user and fleet.password_file go together",
            ),
            ("[fleet]\nendpoints = [\"e\"]\n", "not an etcd client URL"),
            (
                "[fleet]\nendpoints = [\"https://u:s3cret@e:2379\"]\nca_file = \"/ca\"\n",
                "fleet.endpoints: \"https:***@e:2379\" carries a user or password",
            ),
            (
                "[fleet]\nendpoints = [\"http://s3cret@e:2379/x\"]\n",
                "use fleet.user and fleet.password_file",
            ),
            (
                "[fleet]\nendpoints = [\"e:1\"]\nprefix = \"x/\"\n",
                "fleet.prefix",
            ),
            (
                "[fleet]\nendpoints = [\"e:1\"]\ngroup = \"a/b\"\n",
                "fleet.group",
            ),
            (
                "[fleet]\nendpoints = [\"e:1\"]\ngroup = \"*\"\n",
                "not \"*\" (which means every group)",
            ),
            (
                "[fleet]\nendpoints = [\"e:1\"]\nlease_ttl = \"1s\"\n",
                "fleet.lease_ttl",
            ),
            (
                "[fleet]\nendpoints = [\"e:1\"]\non_unreachable = \"yolo\"\n",
                "fleet.on_unreachable",
            ),
        ] {
            let e = format!("{:#}", with(text).unwrap_err());
            assert!(e.starts_with(want) || e.contains(want), "{text}: {e}");
            assert!(!e.contains("s3cret"), "leaked: {e}");
        }
        let err =
            toml_file::parse::<Fragment>("agent.toml", "[fleet]\nendpoint = []\n").unwrap_err();
        assert!(
            err.contains("agent.toml:2:1") && err.contains("did you mean `endpoints`?"),
            "{err}"
        );
    }

    #[cfg(not(feature = "etcd"))]
    #[test]
    fn fleet_is_refused_without_the_etcd_feature() {
        let mut f: Fragment = toml::from_str("[fleet]\nendpoints = [\"e:1\"]\n").unwrap();
        f.host = Some("h".into());
        let e = format!("{:#}", validate(f, Vec::new()).unwrap_err());
        assert!(
            e.starts_with("fleet: this driftless was built without etcd support"),
            "{e}"
        );
    }

    #[test]
    fn fleet_merges_key_by_key() {
        let mut a: Fragment =
            toml::from_str("[fleet]\nendpoints = [\"a:1\"]\ngroup = \"g\"\n").unwrap();
        let b: Fragment = toml::from_str("[fleet]\ngroup = \"h\"\n").unwrap();
        a.merge(b);
        let f = a.fleet.unwrap();
        assert_eq!(f.endpoints, Some(vec!["a:1".to_string()]));
        assert_eq!(f.group.as_deref(), Some("h"));
    }

    #[test]
    fn sub_path_is_normalised_and_confined() {
        assert_eq!(normalise_sub_path("/a//b/./").unwrap(), "a/b");
        assert!(normalise_sub_path("a/../b").is_err());
    }
}

/// A size in an agent config: bytes as an integer, or a string with a
/// binary unit ("512KiB", "64MiB", "1GiB"; "K", "M", "G" mean the same).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

fn size(key: &str, v: Option<SizeValue>, default: u64) -> Result<u64> {
    let n = match v {
        None => return Ok(default),
        Some(SizeValue::Bytes(n)) => n,
        Some(SizeValue::Text(t)) => parse_size(&t).ok_or_else(|| {
            anyhow::anyhow!(
                "{key}: {t:?} is not a size; write bytes (1048576) or a number with KiB, MiB or GiB (\"64MiB\")"
            )
        })?,
    };
    if n == 0 {
        bail!("{key}: must be larger than 0");
    }
    Ok(n)
}

fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" | "k" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod fleetlock_tests {
    use super::*;

    fn with(url: &str, edit: impl FnOnce(&mut FleetFragment)) -> Result<FleetSettings> {
        let mut f = FleetFragment {
            fleetlock: Some(url.to_string()),
            ..FleetFragment::default()
        };
        edit(&mut f);
        validate_fleet(f, "web1")
    }

    fn err(url: &str, edit: impl FnOnce(&mut FleetFragment)) -> String {
        format!("{:#}", with(url, edit).unwrap_err())
    }

    #[test]
    fn a_fleetlock_url_is_stored_as_parsed() {
        let s = with("http://lock:8282/base/", |_| {}).unwrap();
        assert_eq!(s.fleetlock.as_deref(), Some("http://lock:8282/base"));
        assert!(s.endpoints.is_empty() && s.tls.is_none());
        // What the client will connect to is what was checked.
        let s = with("https:lock", |_| {}).unwrap();
        assert_eq!(s.fleetlock.as_deref(), Some("https://lock"));
    }

    /// Review of the FleetLock backend: the "not a URL" messages echoed a
    /// password given in the URL.
    #[test]
    fn no_fleetlock_message_echoes_a_password() {
        for url in [
            "http://u:secret@lock:8282",
            "ftp://u:secret@lock",
            "http://u:secret@lock:99999",
            "http://secret@lock",
            // Review: slashes spelled otherwise got past the first check.
            "http:///u:secret@lock",
            "http:/\\u:secret@lock",
            "http:/\t/u:secret@lock",
        ] {
            let e = err(url, |_| {});
            assert!(!e.contains("secret"), "{url}: {e}");
        }
        let e = err("http://lock/?token=secret", |_| {});
        assert!(e.contains("without ?query") && !e.contains("secret"), "{e}");
    }

    #[test]
    fn fleetlock_keys_are_checked() {
        assert!(err("file:///x", |_| {}).contains("not an http:// or https://"));
        assert!(err("http://lock", |f| f.ca_file = Some("/ca.pem".into())).contains("https://"));
        assert!(err("https://lock", |f| f.ca_file = Some("ca.pem".into())).contains("absolute"));
        let s = with("https://lock", |f| f.ca_file = Some("/ca.pem".into())).unwrap();
        assert_eq!(s.tls.map(|t| t.ca_file), Some(PathBuf::from("/ca.pem")));
        assert!(err("http://lock", |f| f.group = Some("a_b".into())).contains("fleet.group"));
        for (key, e) in [
            (
                "lease_ttl",
                err("http://lock", |f| f.lease_ttl = Some("30s".into())),
            ),
            ("user", err("http://lock", |f| f.user = Some("u".into()))),
            (
                "cert_file",
                err("http://lock", |f| f.cert_file = Some("/c".into())),
            ),
        ] {
            assert!(e.contains(&format!("fleet.{key}")), "{e}");
        }
        assert!(validate_fleet(
            FleetFragment {
                fleetlock: Some("http://lock".into()),
                ..FleetFragment::default()
            },
            "bad/host"
        )
        .is_err());
    }

    #[test]
    fn userinfo_is_redacted() {
        assert_eq!(redact_userinfo("http://a:b@h:1/p"), "http:***@h:1/p");
        assert_eq!(redact_userinfo("http:///a:b@h"), "http:***@h");
        assert_eq!(redact_userinfo("http://h/p"), "http://h/p");
        assert_eq!(redact_userinfo("ab@h"), "***@h");
    }
}
