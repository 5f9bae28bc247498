//! Hooks: the `[[hooks]]` commands of a role, run by a transaction (see
//! `plan::hooks_to_run` for which).
//!
//! - `pre` hooks run before anything of the transaction is written (not
//!   even its journal): a failing one stops the sync with nothing applied.
//! - `post` hooks run after the unit actions and before the checks, and
//!   fail like a check: the transaction is reverted and the commit marked
//!   bad (`sync::post`).
//!
//! A hook is never undone, and never re-run by crash recovery or after a
//! revert: it is not journaled, because recovery has nothing to do for it
//! (the plan says "hooks are not undone"). Each runs without a shell, in a
//! process group of its own, with only `PATH` and its `env`, working
//! directory `/`, as its `user` (switching user needs root) and within its
//! `timeout` (`effects::process`). Its output goes to the log, bounded:
//! the last [`LOG_LINES`] lines of each stream, each cut to
//! [`LOG_LINE_CHARS`]. Its environment's values are never logged: where
//! the program prints one (of 4 characters or more), the log shows
//! `[env NAME]`.
//!
//! Like checks, hooks act on the live system, so under `--root` they run
//! only with `--run-checks` (`run_checks = true`), and are skipped with a
//! warning otherwise.

use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use tracing::{info, warn};

use crate::desired::spec::{Hook, HookWhen};
use crate::effects::failpoint;
use crate::effects::process::{self, Invocation};

/// Lines of each output stream logged per hook (the last ones).
pub const LOG_LINES: usize = 40;

/// Characters kept of each logged line.
pub const LOG_LINE_CHARS: usize = 300;

/// The outcome of one hook, as kept in the post report of a sync.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HookResult {
    /// `pre roles/app: /usr/local/bin/app-migrate --check (60s)`.
    pub hook: String,
    pub ok: bool,
    /// How it ended, when it failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// Runs the `when` hooks of `hooks`, in order, and stops at the first
/// that fails (the error names it, its origin and how it ended).
pub async fn run(hooks: &[Hook], when: HookWhen, results: &mut Vec<HookResult>) -> Result<()> {
    for h in hooks.iter().filter(|h| h.when == when) {
        failpoint::hit(match when {
            HookWhen::Pre => "apply.hook.pre",
            HookWhen::Post => "post.hook",
        })?;
        let what = h.describe();
        info!(hook = %what, origin = %h.origin, "running hook");
        let started = Instant::now();
        match run_one(h).await {
            Ok(()) => {
                info!(hook = %what, ms = started.elapsed().as_millis() as u64, "hook succeeded");
                results.push(HookResult {
                    hook: what,
                    ok: true,
                    message: String::new(),
                });
            }
            Err(e) => {
                let message = format!("{e:#}");
                results.push(HookResult {
                    hook: what.clone(),
                    ok: false,
                    message: message.clone(),
                });
                bail!("hook {what} ({}) failed: {message}", h.origin);
            }
        }
    }
    Ok(())
}

/// Logs a skipped stage's hooks (under `--root` without `--run-checks`).
pub fn skipped(hooks: &[Hook], when: HookWhen) {
    for h in hooks.iter().filter(|h| h.when == when) {
        warn!(hook = %h.describe(), origin = %h.origin, "--root is not / and checks are off: hook skipped (run with --run-checks to run hooks on this system)");
    }
}

async fn run_one(h: &Hook) -> Result<()> {
    let user = match &h.user {
        None => None,
        Some(p) => resolve_user(&p.0)?,
    };
    let done = process::run(&Invocation {
        argv: &h.argv,
        env: Some(&h.env),
        user,
        timeout: Some(h.timeout),
        keep: 0,
    })
    .await?;
    for (stream, out) in [("stdout", &done.stdout), ("stderr", &done.stderr)] {
        let lines = out.lines(LOG_LINE_CHARS);
        let skip = lines.len().saturating_sub(LOG_LINES);
        if skip > 0 || out.dropped > 0 {
            info!(target: "driftless::hook", origin = %h.origin, stream, "({skip} earlier lines and {} bytes not logged)", out.dropped);
        }
        for line in &lines[skip..] {
            let line = hide_env(h, line);
            info!(target: "driftless::hook", origin = %h.origin, stream, "{line}");
        }
    }
    if !done.timed_out && done.status.is_some_and(|s| s.success()) {
        return Ok(());
    }
    let tail = hide_env(h, &done.stderr.last_line(200));
    // (The caller's message shows the argv.)
    Err(anyhow!(
        "{}{}",
        done.describe(Some(h.timeout)),
        if tail.is_empty() {
            String::new()
        } else {
            format!(": {tail}")
        }
    ))
}

/// `line` with every value of the hook's `env` (of 4 characters or more)
/// replaced by `[env NAME]`: a hook that prints its environment does not
/// put it in the log.
fn hide_env(h: &Hook, line: &str) -> String {
    let mut out = line.to_string();
    for (name, value) in &h.env {
        if value.chars().count() >= 4 {
            out = out.replace(value.as_str(), &format!("[env {name}]"));
        }
    }
    out
}

/// The uid and primary gid of `user` (a name or a uid) on the live
/// system to switch to, `None` when it is the agent's own (unprivileged)
/// user. Switching to another user than the agent's needs root.
fn resolve_user(user: &str) -> Result<Option<(u32, u32)>> {
    use nix::unistd::{geteuid, Uid, User};
    let found = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(user),
    }
    .map_err(|e| anyhow!("cannot look up user {user:?}: {e}"))?;
    let Some(u) = found else {
        bail!("user {user:?} does not exist on this host: create it, or change the hook's `user`");
    };
    let me = geteuid();
    if me.is_root() {
        return Ok(Some((u.uid.as_raw(), u.gid.as_raw())));
    }
    if u.uid != me {
        bail!(
            "running as user {user:?} needs root, and the agent runs as uid {me}: run the agent as root, or drop the hook's `user`"
        );
    }
    Ok(None)
}
