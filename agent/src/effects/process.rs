//! Running a program for a `command` check or a hook: never through a
//! shell, in a process group of its own, stdin from `/dev/null`, stdout
//! and stderr captured (only their last [`OUTPUT_KEPT`] bytes are kept),
//! and a time limit that ends the whole group, grandchildren included.
//!
//! At the time limit the group gets `SIGTERM`; whatever is still there
//! after the same time again (at most [`KILL_GRACE`]) gets `SIGKILL`. A run
//! without a time limit of its own (a check attempt, bounded by its
//! caller) kills the group with `SIGKILL` when its future is dropped.

use std::collections::BTreeMap;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};

/// `PATH` of a program run with a clean environment.
pub const MINIMAL_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Bytes kept of each output stream (the last ones).
pub const OUTPUT_KEPT: usize = 16 * 1024;

/// The longest wait between `SIGTERM` and `SIGKILL`.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// What to run, and how.
pub struct Invocation<'a> {
    /// Program and arguments; the program is not looked up in a shell.
    pub argv: &'a [String],
    /// `None`: the agent's environment. `Some`: exactly [`MINIMAL_PATH`]
    /// and these variables (which may override `PATH`), working directory
    /// `/`.
    pub env: Option<&'a BTreeMap<String, String>>,
    /// Run as this (uid, gid); supplementary groups are dropped.
    pub user: Option<(u32, u32)>,
    /// The time limit; `None`: the caller bounds the run.
    pub timeout: Option<Duration>,
    /// Bytes of each output stream kept (the last ones); 0 means
    /// [`OUTPUT_KEPT`].
    pub keep: usize,
}

/// How a run ended.
#[derive(Debug)]
pub struct Finished {
    /// `None` when it had to be killed and could not be waited for.
    pub status: Option<ExitStatus>,
    /// The time limit was reached and the group was killed.
    pub timed_out: bool,
    pub stdout: Output,
    pub stderr: Output,
}

impl Finished {
    /// "exited with 3", "was killed by signal 9", "timed out after 2s".
    pub fn describe(&self, timeout: Option<Duration>) -> String {
        use std::os::unix::process::ExitStatusExt;
        if self.timed_out {
            let after = timeout.map_or_else(String::new, |t| {
                format!(" after {}", humantime::format_duration(t))
            });
            return format!("timed out{after}; its process group was killed");
        }
        match self.status {
            Some(s) => match (s.code(), s.signal()) {
                (Some(c), _) => format!("exited with {c}"),
                (None, Some(sig)) => format!("was killed by signal {sig}"),
                (None, None) => "ended".to_string(),
            },
            None => "could not be waited for".to_string(),
        }
    }
}

/// The tail of an output stream.
#[derive(Debug, Default)]
pub struct Output {
    pub tail: Vec<u8>,
    /// Bytes dropped from the front to keep [`OUTPUT_KEPT`] (or the
    /// invocation's own `keep`).
    pub dropped: u64,
    /// Bytes kept; 0 means [`OUTPUT_KEPT`].
    limit: usize,
}

impl Output {
    fn push(&mut self, bytes: &[u8]) {
        self.tail.extend_from_slice(bytes);
        let limit = if self.limit == 0 {
            OUTPUT_KEPT
        } else {
            self.limit
        };
        if self.tail.len() > limit {
            let excess = self.tail.len() - limit;
            self.tail.drain(..excess);
            self.dropped += excess as u64;
        }
    }

    /// The kept lines, lossily decoded, each cut to `max_chars`.
    pub fn lines(&self, max_chars: usize) -> Vec<String> {
        String::from_utf8_lossy(&self.tail)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.chars().take(max_chars).collect())
            .collect()
    }

    /// The last non-empty line, cut to `max_chars`.
    pub fn last_line(&self, max_chars: usize) -> String {
        self.lines(max_chars).pop().unwrap_or_default()
    }
}

/// Kills the process group when dropped while armed: a run abandoned by
/// its caller (a check attempt that timed out) leaves nothing behind. It
/// is dropped before the child, whose `kill_on_drop` would reap the
/// leader and free the group id.
struct KillGroupOnDrop(Option<Pid>);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

/// [`run`] from synchronous code (the transaction's system tools:
/// `systemd-sysusers`, `userdel`), on a runtime of its own for the one
/// run. Must not be called from inside an async task.
pub fn run_blocking(inv: &Invocation<'_>) -> Result<Finished> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime to run a program")?
        .block_on(run(inv))
}

/// Runs `inv` to its end (or its time limit). An error means it could not
/// be started; how it ended is in [`Finished`].
pub async fn run(inv: &Invocation<'_>) -> Result<Finished> {
    let (prog, args) = inv.argv.split_first().context("empty argv")?;
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(env) = inv.env {
        cmd.env_clear()
            .env("PATH", MINIMAL_PATH)
            .envs(env)
            .current_dir("/");
    }
    if let Some((uid, gid)) = inv.user {
        cmd.uid(uid).gid(gid);
    }
    let mut child = cmd.spawn().with_context(|| format!("cannot run {prog}"))?;
    let pgid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(Pid::from_raw);
    let mut guard = KillGroupOnDrop(pgid);
    let (out_pipe, err_pipe) = (child.stdout.take(), child.stderr.take());
    let mut stdout = Output {
        limit: inv.keep,
        ..Default::default()
    };
    let mut stderr = Output {
        limit: inv.keep,
        ..Default::default()
    };
    let mut timed_out = false;
    let status = {
        let work = async {
            let (_, _, status) = tokio::join!(
                drain(out_pipe, &mut stdout),
                drain(err_pipe, &mut stderr),
                child.wait()
            );
            status.ok()
        };
        tokio::pin!(work);
        match inv.timeout {
            None => work.await,
            Some(limit) => {
                tokio::select! {
                    status = &mut work => status,
                    () = tokio::time::sleep(limit) => {
                        timed_out = true;
                        if let Some(pgid) = pgid {
                            let _ = killpg(pgid, Signal::SIGTERM);
                        }
                        let grace = limit.min(KILL_GRACE);
                        let status = tokio::time::timeout(grace, &mut work).await.ok().flatten();
                        // Whatever ignored SIGTERM, or outlived the leader.
                        if let Some(pgid) = pgid {
                            let _ = killpg(pgid, Signal::SIGKILL);
                        }
                        match status {
                            Some(s) => Some(s),
                            // A process that left the group may hold the
                            // pipes: do not wait for it forever.
                            None => tokio::time::timeout(KILL_GRACE, &mut work).await.ok().flatten(),
                        }
                    }
                }
            }
        }
    };
    // The leader was reaped (it ended, or was killed and waited for): its
    // id is free again, so the group is not signalled any more.
    if status.is_some() {
        guard.0 = None;
    }
    drop(guard);
    Ok(Finished {
        status,
        timed_out,
        stdout,
        stderr,
    })
}

async fn drain<R: AsyncRead + Unpin>(pipe: Option<R>, out: &mut Output) {
    let Some(mut pipe) = pipe else { return };
    let mut buf = [0u8; 8192];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => out.push(&buf[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn output_keeps_the_last_bytes() {
        let mut o = Output::default();
        o.push(&vec![b'a'; OUTPUT_KEPT]);
        o.push(b"\nlast line\n");
        assert_eq!(o.tail.len(), OUTPUT_KEPT);
        assert_eq!(o.dropped, 11);
        assert_eq!(o.last_line(4), "last");
    }

    #[tokio::test]
    async fn a_clean_environment_has_only_path_and_the_given_variables() {
        let env = BTreeMap::from([("ONLY".to_string(), "this".to_string())]);
        let a = argv(&["/usr/bin/env"]);
        let f = run(&Invocation {
            argv: &a,
            env: Some(&env),
            user: None,
            timeout: Some(Duration::from_secs(30)),
            keep: 0,
        })
        .await
        .unwrap();
        assert!(f.status.unwrap().success());
        let mut lines = f.stdout.lines(1000);
        lines.sort();
        assert_eq!(
            lines,
            vec!["ONLY=this".to_string(), format!("PATH={MINIMAL_PATH}")]
        );
    }

    #[tokio::test]
    async fn a_missing_program_is_an_error_naming_it() {
        let a = argv(&["/nonexistent/prog"]);
        let err = run(&Invocation {
            argv: &a,
            env: None,
            user: None,
            timeout: None,
            keep: 0,
        })
        .await
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot run /nonexistent/prog"),
            "{err:#}"
        );
    }
}
