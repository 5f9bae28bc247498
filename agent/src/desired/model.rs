//! The on-disk format of a config repository, exactly as users write it.
//!
//! Every struct denies unknown fields: a misspelt key is an error, never a
//! silently ignored setting. See `docs/config-repo.md` for the prose version.
//!
//! ```text
//! driftless.toml              repo-wide roles and variables
//! hosts/<hostname>.toml       one host: roles, labels, variables
//! hosts/default.toml          used when no hosts/<hostname>.toml exists
//! roles/<role>/role.toml      the files a role manages and its checks
//! roles/<role>/files/...      templates (*.tera) and static sources
//! templates/...               shared partials for {% include %} / {% import %}
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// `driftless.toml` at the repository root (or configured sub-path).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoFile {
    /// Roles every host gets, before its own.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Lowest-precedence variables.
    #[serde(default)]
    pub vars: toml::Table,
    /// How a new commit rolls out across a fleet (agents with `[fleet]`
    /// in agent.toml); see [`crate::rollout::policy`].
    #[serde(default)]
    pub rollout: Option<crate::rollout::policy::RolloutFile>,
}

/// `hosts/<name>.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostFile {
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Highest-precedence variables.
    #[serde(default)]
    pub vars: toml::Table,
}

/// `roles/<role>/role.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleFile {
    /// Free text shown by `validate`.
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub vars: toml::Table,
    /// Each entry keeps its byte span in `role.toml`, so that a semantic
    /// error can name its line (`roles/a/role.toml:12 files[0]`).
    #[serde(default)]
    pub files: Vec<Spanned<FileSpec>>,
    #[serde(default)]
    pub checks: Vec<Spanned<CheckSpec>>,
    #[serde(default)]
    pub units: Vec<Spanned<UnitSpec>>,
    /// Commands run before the files switch (`pre`) or after the unit
    /// actions (`post`) of a transaction.
    #[serde(default)]
    pub hooks: Vec<Spanned<HookSpec>>,
    /// Podman quadlet files: a file under /etc/containers/systemd and the
    /// unit podman generates from it (`super::quadlet`).
    #[serde(default)]
    pub quadlets: Vec<Spanned<super::quadlet::QuadletSpec>>,
    /// Managed symlinks, replaced atomically.
    #[serde(default)]
    pub links: Vec<Spanned<LinkSpec>>,
    /// Paths that must not exist (a regular file or a symlink).
    #[serde(default)]
    pub absent: Vec<Spanned<AbsentSpec>>,
    /// Managed directories: created if missing, mode and owner kept.
    #[serde(default)]
    pub dirs: Vec<Spanned<DirSpec>>,
    /// System users (`super::accounts`), created by systemd-sysusers
    /// before the files of the same commit.
    #[serde(default)]
    pub users: Vec<Spanned<super::accounts::UserSpec>>,
    /// System groups, created before the users.
    #[serde(default)]
    pub groups: Vec<Spanned<super::accounts::GroupSpec>>,
    /// Debian packages present or absent (`super::packages`), installed
    /// with apt before the files.
    #[serde(default)]
    pub packages: Vec<Spanned<super::packages::PackageSpec>>,
    /// Mode of the directories driftless creates for this role's files
    /// (e.g. "0750"); a file's own `dir_mode` wins. Default "0755".
    #[serde(default)]
    pub dir_mode: Option<Spanned<String>>,
}

/// One `[[units]]` entry of a role: the state a systemd unit must be in.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UnitSpec {
    pub name: String,
    /// `true`: enabled (`systemctl enable`); `false`: disabled; unset: left alone.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// `true`: running; `false`: stopped; unset: left alone.
    #[serde(default)]
    pub started: Option<bool>,
}

/// One `[[files]]` entry of a role.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Absolute target path on the host.
    pub path: String,
    /// A Tera template, relative to `roles/<role>/files/`.
    #[serde(default)]
    pub template: Option<String>,
    /// A file copied verbatim, relative to `roles/<role>/files/`.
    #[serde(default)]
    pub source: Option<String>,
    /// A whole SOPS file, decrypted, relative to the repository root.
    #[serde(default)]
    pub secret: Option<String>,
    /// With `secret`: write it as yaml, json, dotenv, ini or raw (binary).
    /// Default: the SOPS file's own format.
    #[serde(default)]
    pub format: Option<String>,
    /// Octal mode as a string, e.g. "0644". Default "0644", or "0600" for
    /// a file that depends on a secret.
    #[serde(default)]
    pub mode: Option<String>,
    /// User name or numeric uid. Default "root".
    #[serde(default)]
    pub owner: Option<String>,
    /// Group name or numeric gid. Default "root".
    #[serde(default)]
    pub group: Option<String>,
    /// Unit actions to run when this file changes (content, owner or mode).
    #[serde(default)]
    pub on_change: OnChangeSpec,
    /// Allow a setuid, setgid, sticky or world-writable `mode` (refused
    /// otherwise: one careless commit would open the host).
    #[serde(default)]
    pub allow_special_mode: bool,
    /// Mode of the missing parent directories driftless creates for this
    /// file (e.g. "0750"), whatever the process umask. Default: the role's
    /// `dir_mode`, else "0755". Existing directories are left as they are.
    #[serde(default)]
    pub dir_mode: Option<String>,
    /// A change to this file (create, update, owner or mode, removal) needs
    /// a reboot: after the commit the agent writes `/run/reboot-required`.
    /// It reboots by itself only with `[fleet] reboot = true`.
    #[serde(default)]
    pub reboot: bool,
}

/// One `[[links]]` entry of a role: a symlink at `path` pointing to
/// `target`, stored verbatim and never resolved by driftless.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    /// Absolute path of the link on the host.
    pub path: String,
    /// What the link points to, relative or absolute, exactly as written.
    pub target: String,
}

/// One `[[dirs]]` entry of a role: a directory with mode and owner.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirSpec {
    /// Absolute path of the directory on the host.
    pub path: String,
    /// Octal, e.g. "0750". Default "0755".
    #[serde(default)]
    pub mode: Option<String>,
    /// User name or uid. Default root.
    #[serde(default)]
    pub owner: Option<String>,
    /// Group name or gid. Default root.
    #[serde(default)]
    pub group: Option<String>,
    /// Remove the entries of the directory no role manages (backed up,
    /// restored on a revert).
    #[serde(default)]
    pub purge: bool,
    /// Names of entries `purge` leaves alone.
    #[serde(default)]
    pub keep: Vec<String>,
}

/// One `[[absent]]` entry of a role: a path that must not exist.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbsentSpec {
    /// Absolute path; a regular file or a symlink there is removed (backed
    /// up). A directory is refused.
    pub path: String,
}

/// `on_change = { reload = ["nginx.service"], restart = [...] }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnChangeSpec {
    #[serde(default)]
    pub reload: Vec<String>,
    #[serde(default)]
    pub restart: Vec<String>,
    #[serde(default, rename = "try-restart")]
    pub try_restart: Vec<String>,
    #[serde(default, rename = "reload-or-restart")]
    pub reload_or_restart: Vec<String>,
}

/// One `[[checks]]` entry of a role: exactly one of `http`, `tcp`,
/// `command`, `unit`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    /// Shown in logs and status; defaults to a description of the probe.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub http: Option<HttpCheckSpec>,
    #[serde(default)]
    pub tcp: Option<TcpCheckSpec>,
    #[serde(default)]
    pub command: Option<CommandCheckSpec>,
    #[serde(default)]
    pub unit: Option<UnitCheckSpec>,
    /// Attempts before the check fails. Default 5.
    #[serde(default)]
    pub retries: Option<u32>,
    /// Time between attempts, e.g. "2s". Default "2s".
    #[serde(default)]
    pub interval: Option<String>,
    /// Time limit of one attempt, e.g. "5s". Default "5s".
    #[serde(default)]
    pub timeout: Option<String>,
    /// Wait before the first attempt, e.g. "1s" (after a reload, old
    /// workers may still answer). Default none.
    #[serde(default)]
    pub delay: Option<String>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HttpCheckSpec {
    /// An `http://` or `https://` URL.
    pub url: String,
    #[serde(default = "default_http_status")]
    pub status: u16,
    /// A substring the body (its first MiB, read as lossy UTF-8) must contain.
    #[serde(default)]
    pub body_contains: Option<String>,
    /// Follow redirects (at most 5). Off by default: a 301 is status 301.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub follow_redirects: bool,
    /// A PEM file of CA certificates trusted for `https://`, in addition to
    /// the system roots (a private CA). An absolute path on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
}

fn default_http_status() -> u16 {
    200
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TcpCheckSpec {
    /// `host:port`.
    pub address: String,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CommandCheckSpec {
    /// Program and arguments; run without a shell.
    pub argv: Vec<String>,
    /// Expected exit code. Default 0.
    #[serde(default)]
    pub exit_code: i32,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UnitCheckSpec {
    pub name: String,
    /// How long the unit must stay active, e.g. "3s". Default "0s".
    #[serde(default)]
    pub settle: Option<String>,
}

/// One `[[hooks]]` entry of a role: a command run when a transaction
/// changes the host, never through a shell. See `spec::Hook`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookSpec {
    /// "pre" (before the files switch) or "post" (after the unit actions,
    /// before the checks).
    pub when: String,
    /// Program (an absolute path) and arguments.
    pub argv: Vec<String>,
    /// User name or numeric uid to run as. Default: the agent's user.
    #[serde(default)]
    pub user: Option<String>,
    /// Time limit, e.g. "60s". Default "30s".
    #[serde(default)]
    pub timeout: Option<String>,
    /// The hook's whole environment, besides a minimal `PATH`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// "on-change" (default: the role has changes in this transaction) or
    /// "always" (whenever a transaction changes anything).
    #[serde(default)]
    pub run: Option<String>,
}
