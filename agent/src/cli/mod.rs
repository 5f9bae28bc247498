//! Command line: argument parsing, dispatch and output. Logic lives in
//! [`crate::sync`] and below; this module only translates.

/// `println!` for command output: a reader that went away (`driftless
/// status | head -1`) ends the process quietly with success instead of a
/// panic on `EPIPE` (Rust ignores `SIGPIPE`, so `println!` panics).
macro_rules! outln {
    ($($t:tt)*) => {
        $crate::cli::write_out(format_args!($($t)*), true)
    };
}

/// `print!` for command output (see [`outln!`]).
macro_rules! out {
    ($($t:tt)*) => {
        $crate::cli::write_out(format_args!($($t)*), false)
    };
}

mod bundle;
mod fleet;
mod fleetlock;
mod init;
mod output;

pub(crate) use crate::time::{now, time_str};

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{self, ConfigSource, Fragment, SshFragment};
use crate::exit::{Classify, Error, Failure};

const AFTER_HELP: &str = "\
Examples:
  Apply a repository once into a scratch root, as an unprivileged user:
    driftless sync --once --source ./repo --host web1 --root /tmp/r --state-dir /tmp/s
  See what the next sync would change, with diffs:
    driftless plan
  Check a config repository in its own CI (renders every host, touches nothing):
    driftless validate path/to/repo

Configuration: /etc/driftless/agent.toml, drop-ins in /usr/lib/driftless/agent.d,
/run/driftless/agent.d and /etc/driftless/agent.d; every setting can also be given
on the command line, which wins.

Exit codes: 0 ok (applied, nothing to do, or the fetched commit is marked bad and
was skipped: `status` lists bad commits); 1 failed (host unchanged or reverted,
retry later); 2 usage; 3 repository invalid for this host (nothing applied);
4 refused (history rewritten, signature, a bundle that is older, unrelated,
damaged, too large or reached through a link); 5 halted (a revert failed its
checks too; nothing is touched until `sync --retry`); 75 another run holds the
lock; 78 agent configuration invalid. `bundle import` and `bundle stick` exit
with the same code as `sync` for the same cause.";

#[derive(Debug, Parser)]
#[command(
    name = "driftless",
    version,
    about = "Pull-based GitOps agent: make this host match a git repository",
    long_about = "driftless pulls a config repository, renders this host's files from templates \
and variables, and applies them atomically: every file is either fully old or fully new, \
files removed from the repository are pruned, and a crash at any moment is repaired on the \
next run.",
    after_help = AFTER_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    global: GlobalArgs,
}

/// Flags every subcommand takes: how much it says.
#[derive(Debug, Args)]
pub(crate) struct GlobalArgs {
    /// More log output (repeat for more)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Nothing on success: only warnings and errors (for cron, which mails
    /// any output)
    #[arg(short, long, global = true)]
    quiet: bool,
}

// The other flags come in groups, each flattened into the subcommands it
// applies to, so `driftless status --help` lists only what `status` uses.
// Each group writes its values into the command-line config fragment.

/// Which agent config is read.
#[derive(Debug, Args, Default)]
pub(crate) struct ConfigArgs {
    /// Agent config file to use instead of /etc/driftless/agent.toml (drop-ins are then not read)
    #[arg(long, value_name = "FILE", conflicts_with = "no_config")]
    config: Option<PathBuf>,
    /// Read no config file at all: command-line options and defaults only
    #[arg(long)]
    no_config: bool,
}

/// Where the repository comes from.
#[derive(Debug, Args, Default)]
pub(crate) struct SourceArgs {
    /// Repository: a path, file://, https://, ssh:// or user@host:path
    #[arg(long, value_name = "REPO")]
    source: Option<String>,
    /// Branch (or full ref) to follow [default: main]
    #[arg(long)]
    branch: Option<String>,
    /// Sub-directory of the repository that holds driftless.toml
    #[arg(long, value_name = "DIR")]
    path: Option<String>,
    /// SSH private key for ssh:// sources
    #[arg(long, value_name = "FILE")]
    ssh_key: Option<PathBuf>,
    /// known_hosts file pinning the SSH server's key
    #[arg(long, value_name = "FILE")]
    ssh_known_hosts: Option<PathBuf>,
}

/// Who may sign commits and bundles.
#[derive(Debug, Args, Default)]
pub(crate) struct TrustArgs {
    /// Refuse commits not signed by a key in --allowed-signers (SSH signatures, `gpg.format=ssh`)
    #[arg(long)]
    require_signed: bool,
    /// git allowed_signers file: who may sign commits and bundles [default: /etc/driftless/allowed_signers]
    #[arg(long, value_name = "FILE")]
    allowed_signers: Option<PathBuf>,
}

/// Where the managed filesystem and the agent's state are.
#[derive(Debug, Args, Default)]
pub(crate) struct StateArgs {
    /// Apply everything under this prefix instead of / (like systemd-tmpfiles --root)
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// State directory [default: /var/lib/driftless]
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

/// What rendering needs: allowed targets and secret keys.
#[derive(Debug, Args, Default)]
pub(crate) struct RenderArgs {
    /// Allow writing under this directory (repeat; replaces the configured list)
    #[arg(long = "allowed-root", value_name = "DIR")]
    allowed_roots: Vec<String>,
    #[command(flatten)]
    keys: KeyArgs,
}

/// age identities for SOPS secrets.
#[derive(Debug, Args, Default)]
pub(crate) struct KeyArgs {
    /// age identity file for SOPS secrets (repeat; replaces `age_keys`)
    #[arg(long = "age-key", value_name = "FILE")]
    age_keys: Vec<PathBuf>,
}

/// Everything a run that renders this host and applies it takes.
#[derive(Debug, Args, Default)]
pub(crate) struct HostArgs {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    trust: TrustArgs,
    #[command(flatten)]
    state: StateArgs,
    /// This host's name in the repository [default: the hostname]
    #[arg(long, value_name = "NAME")]
    host: Option<String>,
    #[command(flatten)]
    render: RenderArgs,
}

/// Health checks under `--root`.
#[derive(Debug, Args, Default)]
pub(crate) struct ChecksArgs {
    /// Run health checks even under a --root prefix (unit actions never run there)
    #[arg(long)]
    run_checks: bool,
}

/// The command-line layer of the settings: what the groups a subcommand
/// takes say, nothing for the flags it does not take.
#[derive(Default)]
pub(crate) struct Overrides<'a> {
    config: Option<&'a ConfigArgs>,
    source: Option<&'a SourceArgs>,
    trust: Option<&'a TrustArgs>,
    state: Option<&'a StateArgs>,
    host: Option<&'a str>,
    render: Option<&'a RenderArgs>,
    keys: Option<&'a KeyArgs>,
    run_checks: bool,
    allow_nff: bool,
    interval: Option<String>,
    splay: Option<String>,
}

impl<'a> Overrides<'a> {
    fn host(h: &'a HostArgs) -> Self {
        Overrides {
            config: Some(&h.config),
            source: Some(&h.source),
            trust: Some(&h.trust),
            state: Some(&h.state),
            host: h.host.as_deref(),
            render: Some(&h.render),
            ..Default::default()
        }
    }
    fn config(c: &'a ConfigArgs) -> Self {
        Overrides {
            config: Some(c),
            ..Default::default()
        }
    }
    fn state(c: &'a ConfigArgs, s: &'a StateArgs) -> Self {
        Overrides {
            config: Some(c),
            state: Some(s),
            ..Default::default()
        }
    }
    fn checks(mut self, c: &ChecksArgs) -> Self {
        self.run_checks = c.run_checks;
        self
    }
    fn allow_non_fast_forward(mut self, yes: bool) -> Self {
        self.allow_nff = yes;
        self
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fetch the repository and make this host match it (one pass)
    #[command(after_help = "\
A sync runs: recover an interrupted transaction, fetch, load, render, plan, apply
(atomically), record in history. Files already as desired are not written and keep
their mtime. After a commit it reloads units and runs the checks; a failure reverts
the transaction and marks the commit bad. The long-running daemon is `driftless run`.")]
    Sync(SyncArgs),
    /// Run as the long-lived agent: sync every interval (systemd Type=notify)
    #[command(after_help = "\
Polls every `interval` (default 5m) plus a random part of `splay` (default 1m).
SIGHUP (systemctl reload driftless) syncs now; SIGTERM lets the current sync
finish, then exits. Under systemd it sends READY=1, STATUS= lines and feeds
the watchdog (WatchdogSec=). Shares the lock and the state with `sync --once`.")]
    Run(RunArgs),
    /// Show what `sync` would change, with diffs; changes nothing
    Plan(PlanArgs),
    /// Apply an earlier commit (default: the previous good one from history)
    #[command(after_help = "\
Runs like a sync (apply, unit actions, checks, revert on failure) but for the
named commit, without the fast-forward check. The commit rolled back from is
marked bad, so the agent does not re-apply it; the next new commit on the
branch is applied as usual.")]
    Rollback(RollbackArgs),
    /// Show what is applied and how the last run went
    Status(StatusArgs),
    /// Render every host of a repository without touching anything (for the repository's CI)
    #[command(after_help = "\
Without DIR the configured --source is fetched. Every hosts/*.toml (and
hosts/default.toml) is loaded and rendered with this machine's facts, the
hostname fact replaced by the host's name. Ownership is not checked (users
differ per host). Exit code 3 if anything fails, with every problem listed.")]
    Validate(ValidateArgs),
    /// List past runs, newest first
    History(HistoryArgs),
    /// Decrypt or check SOPS files (operator tools; never used by sync)
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// Signed git bundles for air-gapped hosts: create, verify, import, USB sticks
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Check or repair the state directory (corrupt inventory, marks, caches, floor)
    #[command(subcommand)]
    State(StateCommand),
    /// Print this host's age recipients (from its SSH host keys), to encrypt secrets to it
    #[command(after_help = "\
Add a printed line to the recipients of a SOPS file (e.g. `sops --age 'ssh-ed25519 AAAA…'`
or the `age:` list of .sops.yaml) and this host can decrypt it with its own SSH host key:
no extra key to distribute. Both forms are printed: the ssh-ed25519 recipient and the
age1… key that ssh-to-age derives from it (sops-nix's convention).")]
    HostRecipient(ConfigOnlyArgs),
    /// Questions about the agent's own configuration (for units, cron and scripts)
    #[command(subcommand)]
    Config(ConfigCommand),
    /// The fleet's rollouts, read from etcd (`[fleet]` in agent.toml)
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Stop new rollouts fleet-wide or for one group (etcd, `[fleet]` in agent.toml)
    #[command(after_help = "\
Writes a suspension to etcd: no host of the group (every group without --group)
applies a new commit until `driftless resume`. Hosts already on a commit keep
repairing drift and running checks; a host in the middle of an apply finishes it.
`driftless fleet status` and each waiting host's `status` show who suspended and why.

Examples:
  driftless suspend --reason \"incident 4711\"
  driftless suspend --group db --reason \"db migration until 18:00\"")]
    Suspend(SuspendArgs),
    /// Let suspended rollouts go on, or resume a halted commit (--commit)
    #[command(after_help = "\
Without options, lifts a fleet-wide `driftless suspend`; with --group G, the
suspension of group G. With --commit C, deletes the bad marks of commit C (the
hosts that reverted it), so its halted rollout starts again from its first wave
that is not yet healthy: do this only after fixing what made C fail elsewhere
(a newer commit is the usual way to resume).

Examples:
  driftless resume
  driftless resume --group db
  driftless resume --commit 3f2a9c1e0b7d4c8a...")]
    Resume(ResumeArgs),
    /// Start a config repository in DIR: driftless.toml, a host file, starter roles, git
    #[command(after_help = "\
Writes driftless.toml, hosts/<NAME>.toml (this host, or --host), README.md and the
starter roles timesync, unit-dropin, cron-job (enabled in the host file), sshd-hardening
and app-behind-proxy (listed there, commented: they need a decision or software first),
then `git init` (branch main) and a first commit, without needing the git binary.
DIR must be missing or empty; --force adds only the files that are missing and never
overwrites one (an existing git repository is then left alone: commit yourself).

Example:
  driftless init ~/config && driftless validate ~/config")]
    Init(InitArgs),
}

#[derive(Debug, Args)]
pub(crate) struct InitArgs {
    /// Directory to create the repository in (missing or empty)
    dir: PathBuf,
    /// Name of the host file, hosts/<NAME>.toml [default: the hostname]
    #[arg(long, value_name = "NAME")]
    host: Option<String>,
    /// DIR may be non-empty: add only the missing files, never overwrite one
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub(crate) struct SuspendArgs {
    /// Suspend only this `[fleet] group` [default: every group]
    #[arg(long, value_name = "G")]
    pub(crate) group: Option<String>,
    /// Why (shown to everyone who asks why a host waits)
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub(crate) reason: String,
    #[command(flatten)]
    pub(crate) config: ConfigArgs,
}

#[derive(Debug, Args)]
pub(crate) struct ResumeArgs {
    /// Lift the suspension of this group [default: the fleet-wide one]
    #[arg(long, value_name = "G", conflicts_with = "commit")]
    pub(crate) group: Option<String>,
    /// Resume the halted rollout of this commit (full id): delete its bad marks
    #[arg(long, value_name = "COMMIT")]
    pub(crate) commit: Option<String>,
    #[command(flatten)]
    pub(crate) config: ConfigArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum FleetCommand {
    /// Per commit and wave: hosts applied, healthy, failed, waiting, and why each waits
    #[command(after_help = "\
Reads the keys under `[fleet] prefix` in etcd: the live hosts' statuses, the permits
held, the hosts that reverted a commit, and each commit's rollout policy. Hosts whose
status expired (dead, or not polling for three intervals) are not counted.")]
    Status(FleetStatusArgs),
    /// Serve the FleetLock protocol (zincati's reboot lock) from the fleet's etcd permits
    #[command(after_help = "\
Answers POST /v1/pre-reboot (take a slot of the client's group; granted again to its
holder) and POST /v1/steady-state (give it back) with the permits of `[fleet]`'s etcd:
a slot is the key P/permits/<group>/<id>, without a lease, so zincati hosts (Fedora
CoreOS, `[updates] strategy = \"fleet_lock\"`) and driftless hosts of a group share one
limit, and `driftless fleet status` lists the slots. `driftless suspend` refuses
slots (a holder's too). A slot is held until its client gives it back (or an operator
deletes its key); a driftless host's own permit is never taken over or given back.

The protocol has no authentication: listen on a private address only. The first line
printed names the address.

Examples:
  driftless fleet serve-fleetlock --listen 10.0.0.5:8282 --max 2
  driftless fleet serve-fleetlock --listen 127.0.0.1:8282 --max 1 --max-for workers=5")]
    ServeFleetlock(ServeFleetlockArgs),
}

#[derive(Debug, Args)]
pub(crate) struct ServeFleetlockArgs {
    /// Address and port to listen on (port 0: any free one)
    #[arg(long, value_name = "ADDR:PORT")]
    listen: std::net::SocketAddr,
    /// Slots per group, for groups without --max-for
    #[arg(long, value_name = "N", default_value_t = 1)]
    max: u32,
    /// Slots of one group (repeatable), e.g. --max-for workers=5
    #[arg(long, value_name = "GROUP=N", value_parser = fleetlock::parse_group_max)]
    max_for: Vec<(String, u32)>,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Debug, Args)]
pub(crate) struct FleetStatusArgs {
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Exit 0 if a `source` is configured, 1 (with the remedy) if not
    #[command(after_help = "\
The shipped units run it as ExecCondition=, so an installed but unconfigured agent is
skipped (not failed) until `source` is set, and the cron fallback does nothing. A
configuration that cannot be read also exits 0: the agent itself then fails and names
the file and key.")]
    HasSource(ConfigOnlyArgs),
}

#[derive(Debug, Subcommand)]
pub(crate) enum SecretsCommand {
    /// Print a decrypted SOPS file (like `sops -d`), for debugging on a host
    #[command(after_help = "\
Identities: --age-key FILE, `age_keys` in agent.toml, SOPS_AGE_KEY / SOPS_AGE_KEY_FILE,
and the host's SSH keys. The output contains secrets: it is for a terminal, not a log.")]
    Decrypt {
        file: PathBuf,
        /// Output: the file's own format (default), yaml, json, dotenv, ini, raw; `--format json` keeps value types
        #[arg(long)]
        format: Option<String>,
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        keys: KeyArgs,
    },
    /// Verify that a SOPS file decrypts and its MAC is intact, without printing values
    Check {
        file: PathBuf,
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        keys: KeyArgs,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum StateCommand {
    /// Report unusable state files and what repair would do; changes nothing
    #[command(after_help = "\
Exit 0 when every state file is usable, 1 otherwise (each file listed with its problem
and remedy). Every sync runs the same repair first, so this is for a look before it.")]
    Check(StateDirArgs),
    /// Repair now, under the lock: drop corrupt caches, rebuild the inventory, set corrupt
    /// marks aside (the agent then halts until `sync --retry`). The anti-rollback floor
    /// is never guessed: the command says how to resolve it.
    Repair(StateDirArgs),
}

#[derive(Debug, Subcommand)]
pub(crate) enum BundleCommand {
    /// On a connected machine: write FILE (a git bundle), FILE.manifest and FILE.manifest.sig
    #[command(after_help = "\
Needs git on this machine (hosts importing the bundle do not). The manifest pins the
bundle's SHA-256, branch, tip and prerequisites; the signature (an SSHSIG, namespace
driftless-bundle) covers the manifest. Hosts trust the signer through their
allowed_signers file, e.g. a line:
  release@example.com namespaces=\"driftless-bundle\" ssh-ed25519 AAAA...
Incremental bundles (--since COMMIT) carry only what is new after COMMIT: use the
commit the hosts have applied (see `driftless bundle reports`).

Example:
  driftless bundle create --repo /srv/config --out /media/stick/driftless/bundles/2026-11-22.bundle \\
      --sign-key ~/.ssh/release_ed25519 --since 4f1c2e9")]
    Create(BundleCreateArgs),
    /// Check a bundle's signature, hash and header (and prerequisites, on a host); changes nothing
    Verify {
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        trust: TrustArgs,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Verify and import bundles into this host's mirror, then sync
    #[command(after_help = "\
The host's source must be `bundle:` (air-gapped) or a remote URL: bundles go into
the mirror under the state directory; the pack is indexed in-process (no git needed).
Bundles are imported oldest first (by their signed creation time). Each must be
signed by a key in allowed_signers (namespace driftless-bundle), be for the followed
branch, and descend from the applied commit: an older bundle is refused, never a
downgrade. The sync that follows applies the usual rules (require_signed, checks,
revert).")]
    Import(BundleImportArgs),
    /// Import every bundle on a USB stick (device or directory), sync, write a report onto it
    #[command(after_help = "\
Run by driftless-usb@.service when a stick labelled DRIFTLESS is plugged in. Layout:
  <stick>/driftless/bundles/*.bundle   (+ .manifest, .manifest.sig)
  <stick>/driftless/reports/<host>.json   written here
A block device is mounted read-only under /run/driftless/stick/, remounted read-write
only to write the report, then unmounted. A directory is used as it is.")]
    Stick(BundleStickArgs),
    /// Summarise the host reports collected on a stick (or any directory of reports)
    Reports {
        /// A stick's mount point, or a directory of <host>.json reports
        dir: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

#[derive(Debug, Args)]
pub(crate) struct BundleCreateArgs {
    /// Repository to bundle: a path or a URL git can fetch
    #[arg(long, value_name = "PATH|URL")]
    repo: String,
    /// Bundle file to write (FILE.manifest and FILE.manifest.sig are written beside it)
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Only commits after this one (the hosts' applied commit): an incremental bundle
    #[arg(long, value_name = "COMMIT")]
    since: Option<String>,
    /// OpenSSH private key to sign with (unencrypted ed25519 or RSA)
    #[arg(long, value_name = "FILE")]
    sign_key: PathBuf,
    /// Branch (or full ref) to bundle: the one the hosts follow [default: main]
    #[arg(long)]
    branch: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct BundleImportArgs {
    /// Bundle files (FILE.manifest and FILE.manifest.sig must be beside each)
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Import only; do not sync
    #[arg(long)]
    no_sync: bool,
    /// Wait up to this many seconds for a running sync
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    wait: u64,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    #[command(flatten)]
    host: HostArgs,
    #[command(flatten)]
    checks: ChecksArgs,
}

#[derive(Debug, Args)]
pub(crate) struct BundleStickArgs {
    /// The stick: a block device (e.g. /dev/sdb1) or a mounted directory
    #[arg(value_name = "DEVICE|DIR")]
    stick: PathBuf,
    /// Write the report here instead of <stick>/driftless/reports/
    #[arg(long, value_name = "DIR")]
    reports: Option<PathBuf>,
    /// Wait up to this many seconds for a running sync
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    wait: u64,
    #[command(flatten)]
    host: HostArgs,
    #[command(flatten)]
    checks: ChecksArgs,
}

#[derive(Debug, Args)]
struct SyncArgs {
    /// Run one pass and exit (what cron and timers use; `sync` never daemonises)
    #[arg(long)]
    once: bool,
    /// Wait up to this many seconds for another run to finish instead of exiting with 75
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    wait: u64,
    /// Accept a tracked branch whose history was rewritten (force-push)
    #[arg(long)]
    allow_non_fast_forward: bool,
    /// Apply the commit even if it is marked bad, and clear a halt
    #[arg(long)]
    retry: bool,
    /// Skip the quick check: render every template and compare every file
    /// byte for byte, even when the stamps say nothing changed
    #[arg(long)]
    full: bool,
    /// Print where the time went (fetch, render, observe, write, flush, ...) to stderr
    #[arg(long)]
    timings: bool,
    #[command(flatten)]
    host: HostArgs,
    #[command(flatten)]
    checks: ChecksArgs,
}

#[derive(Debug, Args)]
struct RollbackArgs {
    /// Commit to apply (full or abbreviated id, or any revision the repository knows)
    #[arg(long, value_name = "COMMIT")]
    to: Option<String>,
    #[command(flatten)]
    host: HostArgs,
    #[command(flatten)]
    checks: ChecksArgs,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Time between polls, e.g. 5m (overrides `interval` in agent.toml)
    #[arg(long, value_name = "DURATION")]
    interval: Option<String>,
    /// Random extra delay per poll, e.g. 1m (overrides `splay`)
    #[arg(long, value_name = "DURATION")]
    splay: Option<String>,
    #[command(flatten)]
    host: HostArgs,
    #[command(flatten)]
    checks: ChecksArgs,
}

#[derive(Debug, Args)]
struct PlanArgs {
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Colour the diff: auto (on a terminal), always, never
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto)]
    color: ColorChoice,
    /// Only list the changes, no content diff
    #[arg(long)]
    no_diff: bool,
    /// Wait up to this many seconds for a running sync
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    wait: u64,
    /// Plan even if the tracked branch's history was rewritten
    #[arg(long)]
    allow_non_fast_forward: bool,
    #[command(flatten)]
    host: HostArgs,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    state: StateArgs,
}

#[derive(Debug, Args)]
pub(crate) struct StateDirArgs {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    state: StateArgs,
}

#[derive(Debug, Args)]
pub(crate) struct ConfigOnlyArgs {
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Debug, Args)]
struct ValidateArgs {
    /// A repository directory (working tree); default: the configured source
    dir: Option<PathBuf>,
    /// Check structure and templates without decrypting: each secret renders as a
    /// placeholder, and the SOPS files not decrypted are listed (for CI without keys)
    #[arg(long)]
    skip_secrets: bool,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    state: StateArgs,
    #[command(flatten)]
    render: RenderArgs,
}

#[derive(Debug, Args)]
struct HistoryArgs {
    /// Show at most this many entries
    #[arg(long, short = 'n', default_value_t = 20)]
    limit: usize,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    state: StateArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ColorChoice {
    Auto,
    Always,
    Never,
}

/// Entry point used by the binary.
/// The command-line definition (for man pages and completions, built by
/// `xtask`).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon is never watched on a terminal the way a one-off is.
    let daemon = matches!(cli.command, Command::Run(_));
    // The FleetLock server is long-running too, and never trims: it keeps
    // glibc's defaults.
    let server = matches!(cli.command, Command::Fleet(FleetCommand::ServeFleetlock(_)));
    if !daemon && !server {
        let _ = crate::memory::tune_for_one_pass();
    }
    init_logging(&cli.global, daemon);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.kind.code())
        }
    }
}

fn init_logging(g: &GlobalArgs, daemon: bool) {
    use tracing_subscriber::EnvFilter;
    let level = if g.quiet {
        "warn"
    } else {
        match g.verbose {
            0 => "info",
            1 => "debug",
            _ => "trace",
        }
    };
    let filter = EnvFilter::try_from_env("DRIFTLESS_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("driftless={level},warn")));
    let tty = std::io::stderr().is_terminal();
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    // Straight to journald, with priorities, fields and MESSAGE_IDs, when
    // stderr is the journal (not merely inherited JOURNAL_STREAM).
    if stderr_is_journal() {
        if let Ok(layer) = tracing_journald::layer() {
            use tracing_subscriber::prelude::*;
            let layer = layer
                .with_field_prefix(None)
                .with_syslog_identifier("driftless".into());
            tracing_subscriber::registry()
                .with(filter)
                .with(layer)
                .init();
            crate::events::enable();
            return;
        }
    }
    // Progress bars for a human at a terminal only: never under cron,
    // journald, `-q`, or the daemon.
    if tty && !journald && !g.quiet && !daemon {
        crate::progress::enable();
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| crate::progress::LogWriter)
        .with_ansi(tty)
        .with_target(false);
    // journald stamps lines itself; a terminal user wants short lines.
    if tty || journald {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

/// `JOURNAL_STREAM` (`dev:inode`) names stderr itself: systemd connected
/// it to the journal. A shell started from a service inherits the variable
/// with another stderr.
fn stderr_is_journal() -> bool {
    let Some(var) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = var.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}

pub(crate) fn settings(o: &Overrides<'_>) -> Result<config::Settings, Error> {
    let cfg = o
        .config
        .map_or((false, None), |c| (c.no_config, c.config.clone()));
    let source = match cfg {
        (true, _) => ConfigSource::None,
        (false, Some(f)) => ConfigSource::File(f),
        (false, None) => ConfigSource::System,
    };
    let src = o.source;
    let trust = o.trust;
    let state = o.state;
    let keys = o.keys.or(o.render.map(|r| &r.keys));
    let cli = Fragment {
        source: src.and_then(|a| a.source.clone()),
        branch: src.and_then(|a| a.branch.clone()),
        path: src.and_then(|a| a.path.clone()),
        host: o.host.map(str::to_string),
        state_dir: state.and_then(|a| a.state_dir.clone()),
        root: state.and_then(|a| a.root.clone()),
        allowed_roots: o
            .render
            .filter(|r| !r.allowed_roots.is_empty())
            .map(|r| r.allowed_roots.clone()),
        allow_non_fast_forward: o.allow_nff.then_some(true),
        interval: o.interval.clone(),
        splay: o.splay.clone(),
        job_timeout: None,
        run_checks: o.run_checks.then_some(true),
        age_keys: keys
            .filter(|k| !k.age_keys.is_empty())
            .map(|k| k.age_keys.clone()),
        ssh_host_keys: None,
        require_signed: trust.and_then(|t| t.require_signed.then_some(true)),
        allowed_signers: trust.and_then(|t| t.allowed_signers.clone()),
        signature_policy: None,
        max_file_size: None,
        max_render_size: None,
        max_bundle_size: None,
        metrics_file: None,
        ssh: SshFragment {
            key: src.and_then(|a| a.ssh_key.clone()),
            known_hosts: src.and_then(|a| a.ssh_known_hosts.clone()),
        },
        webhooks: None,
        fleet: None,
    };
    config::load(&source, cli).kind(Failure::Config)
}

/// The runtime for D-Bus and checks. One worker: the agent does little
/// concurrently, and the main thread drives it with `Handle::block_on`.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .kind(Failure::Failed)
}

fn run(cli: Cli) -> Result<ExitCode, Error> {
    let g = &cli.global;
    match cli.command {
        Command::Sync(args) => {
            let _ = args.once; // one pass is the only mode of `sync`
            let s = settings(
                &Overrides::host(&args.host)
                    .checks(&args.checks)
                    .allow_non_fast_forward(args.allow_non_fast_forward),
            )?;
            let opts = crate::sync::SyncOptions {
                wait: Duration::from_secs(args.wait),
                apply: crate::effects::apply::ApplyOptions {
                    crash_after: test_hook_crash_after(),
                },
                retry: args.retry,
                full: args.full,
                idle_logged: None,
            };
            let started = std::time::Instant::now();
            if args.timings {
                crate::timings::enable();
            }
            let rt = runtime()?;
            crate::stop::defer_sigterm(rt.handle());
            let result = crate::sync::sync_once(&s, &opts, now(), rt.handle());
            if args.timings {
                let stages = crate::timings::take();
                eprint!("{}", crate::timings::render(&stages, started.elapsed()));
            }
            let report = result?;
            if !g.quiet {
                output::print_sync(&report);
                note_uncommitted(&s);
            }
            report.discard();
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            let s = settings(&Overrides {
                interval: args.interval.clone(),
                splay: args.splay.clone(),
                ..Overrides::host(&args.host).checks(&args.checks)
            })?;
            let opts = crate::sync::SyncOptions {
                wait: Duration::ZERO,
                apply: crate::effects::apply::ApplyOptions {
                    crash_after: test_hook_crash_after(),
                },
                retry: false,
                full: false,
                idle_logged: None,
            };
            crate::daemon::run(s, opts)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Rollback(args) => {
            let s = settings(&Overrides::host(&args.host).checks(&args.checks))?;
            let rt = runtime()?;
            let report = crate::sync::rollback(&s, args.to.as_deref(), now(), rt.handle())?;
            if !g.quiet {
                output::print_sync(&report);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan(args) => {
            let s = settings(
                &Overrides::host(&args.host).allow_non_fast_forward(args.allow_non_fast_forward),
            )?;
            let (state, _guard) = crate::sync::lock(&s, Duration::from_secs(args.wait))?;
            let fs = crate::sync::open_root(&s)?;
            let prepared = crate::sync::prepare(&s, &state, &fs)?;
            let color = match args.color {
                ColorChoice::Always => true,
                ColorChoice::Never => false,
                ColorChoice::Auto => {
                    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
                }
            };
            let marks = crate::sync::marks::load(&state).kind(Failure::Failed)?;
            let bad = marks.bad.get(&prepared.fetched.commit);
            output::print_plan(&s, &prepared, args.format, color, !args.no_diff, bad)?;
            if !g.quiet {
                note_uncommitted(&s);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(args) => {
            let s = settings(&Overrides::state(&args.config, &args.state))?;
            output::print_status(&s, args.format)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::History(args) => {
            let s = settings(&Overrides::state(&args.config, &args.state))?;
            output::print_history(&s, args.limit, args.format)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Secrets(cmd) => {
            let (SecretsCommand::Decrypt { config, keys, .. }
            | SecretsCommand::Check { config, keys, .. }) = &cmd;
            let s = settings(&Overrides {
                keys: Some(keys),
                ..Overrides::config(config)
            })?;
            output::secrets(&s, cmd)
        }
        Command::Bundle(cmd) => bundle::run(cmd),
        Command::State(cmd) => {
            let (StateCommand::Check(a) | StateCommand::Repair(a)) = &cmd;
            let s = settings(&Overrides::state(&a.config, &a.state))?;
            let findings = match cmd {
                StateCommand::Check(_) => {
                    match crate::effects::state::StateDir::existing(&s.state_dir) {
                        Some(st) => crate::sync::state_repair::check(&st, &s.root),
                        None => Vec::new(),
                    }
                }
                StateCommand::Repair(_) => {
                    let (st, _guard) = crate::sync::lock(&s, Duration::ZERO)?;
                    crate::sync::state_repair::repair(&st, &s.root, now()).kind(Failure::Failed)?
                }
            };
            if findings.is_empty() {
                outln!("state {}: every file is usable", s.state_dir.display());
                return Ok(ExitCode::SUCCESS);
            }
            for f in &findings {
                outln!(
                    "{}\n  problem: {}\n  remedy:  {}",
                    f.file.display(),
                    f.problem,
                    f.remedy
                );
            }
            Ok(match cmd {
                StateCommand::Check(_) => ExitCode::from(1),
                StateCommand::Repair(_) => ExitCode::SUCCESS,
            })
        }
        Command::Config(ConfigCommand::HasSource(a)) => {
            match settings(&Overrides::config(&a.config)) {
                Ok(s) if s.source.is_none() => {
                    eprintln!(
                    "driftless: no source configured: set `source` in {} (or a drop-in in {}), \
                     then `systemctl start driftless`",
                    config::MAIN_CONFIG,
                    config::DROP_IN_DIRS[2]
                );
                    Ok(ExitCode::from(1))
                }
                _ => Ok(ExitCode::SUCCESS),
            }
        }
        Command::Fleet(FleetCommand::Status(a)) => {
            let s = settings(&Overrides::config(&a.config))?;
            fleet::status(&s, a.format)
        }
        Command::Fleet(FleetCommand::ServeFleetlock(a)) => {
            let s = settings(&Overrides::config(&a.config))?;
            fleetlock::serve(&s, a.listen, a.max, a.max_for)
        }
        Command::Suspend(a) => {
            let s = settings(&Overrides::config(&a.config))?;
            fleet::suspend(&s, a.group.as_deref(), &a.reason)
        }
        Command::Resume(a) => {
            let s = settings(&Overrides::config(&a.config))?;
            fleet::resume(&s, a.group.as_deref(), a.commit.as_deref())
        }
        Command::HostRecipient(a) => {
            let s = settings(&Overrides::config(&a.config))?;
            output::host_recipient(&s)
        }
        Command::Init(args) => init::run(&args, g.quiet),
        Command::Validate(args) => {
            let s = settings(&Overrides {
                config: Some(&args.config),
                source: Some(&args.source),
                state: Some(&args.state),
                render: Some(&args.render),
                ..Default::default()
            })?;
            output::validate(&s, args.dir.as_deref(), args.format, args.skip_secrets)
        }
    }
}

/// Edits in a local source's working copy are not applied (only commits
/// are): say so after `sync` and `plan`, on stderr, so a user who edited
/// and ran `sync` knows why nothing changed.
///
/// Only for a person at a terminal: the note costs a status of the whole
/// working copy (an `lstat` of every tracked file: 30 ms at 10,000 files,
/// more than the rest of a one-file sync), which a timer, cron or a script
/// would pay on every run for a line nobody reads.
fn note_uncommitted(s: &config::Settings) {
    if !std::io::stderr().is_terminal() {
        return;
    }
    let Ok(spec) = crate::sync::source_spec(s) else {
        return;
    };
    if let Some(n @ 1..) = crate::effects::fetch::uncommitted_changes(&spec) {
        eprintln!(
            "note: {n} uncommitted change{} in {} {} ignored (driftless applies commits: commit them to apply)",
            if n == 1 { "" } else { "s" },
            s.source.as_deref().unwrap_or("the source"),
            if n == 1 { "is" } else { "are" },
        );
    }
}

/// `DRIFTLESS_TEST_CRASH_AFTER=N` aborts the process after N operations of
/// an apply, for the crash-safety tests. Documented in tests/README.md.
/// Like the failpoints, only in debug builds (what `cargo test` builds and
/// the end-to-end tests run): a production agent cannot be told by its
/// environment to kill itself mid-transaction.
pub(crate) fn test_hook_crash_after() -> Option<usize> {
    crate::effects::failpoint::test_knob("DRIFTLESS_TEST_CRASH_AFTER")
}

/// Writes command output to stdout. A closed pipe ends the process with
/// exit 0 and nothing on stderr; any other write error ends it with exit 1
/// and one line saying why.
pub(crate) fn write_out(args: std::fmt::Arguments<'_>, newline: bool) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let written = o
        .write_fmt(args)
        .and_then(|()| if newline { o.write_all(b"\n") } else { Ok(()) })
        .and_then(|()| o.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("error: cannot write to standard output: {e}");
            std::process::exit(1);
        }
    }
}
