//! `driftless init DIR`: prints what [`crate::init`] created and what to do
//! next.

use std::path::Path;
use std::process::ExitCode;

use crate::exit::{Classify, Error, Failure};
use crate::init;

use super::InitArgs;

pub(super) fn run(args: &InitArgs, quiet: bool) -> Result<ExitCode, Error> {
    let host = match &args.host {
        Some(h) => h.clone(),
        None => init::default_host().kind(Failure::Usage)?,
    };
    let files = init::scaffold(&host)
        .map_err(anyhow::Error::msg)
        .kind(Failure::Usage)?;
    let dir = args.dir.as_path();
    if let Some(why) = init::refuse_reason(dir).kind(Failure::Failed)? {
        if !args.force || !dir.is_dir() {
            return Err(Error::new(Failure::Usage, anyhow::anyhow!(why)));
        }
    }
    let had_git = dir.join(".git").exists();
    let all: Vec<String> = files.iter().map(|f| f.path.clone()).collect();
    let writes = init::plan_writes(files, |p| std::fs::symlink_metadata(dir.join(p)).is_ok());
    init::write(dir, &writes.create).kind(Failure::Failed)?;

    let committed = if had_git {
        None
    } else {
        let msg = format!("driftless init: config repository with host {host} and starter roles");
        Some(init::git::init_and_commit(dir, &all, &msg).kind(Failure::Failed)?)
    };
    if quiet {
        return Ok(ExitCode::SUCCESS);
    }
    print_summary(dir, &host, &writes, committed.as_ref());
    Ok(ExitCode::SUCCESS)
}

fn print_summary(
    dir: &Path,
    host: &str,
    writes: &init::Writes,
    committed: Option<&init::git::Committed>,
) {
    let shown = dir.display();
    outln!("Created a driftless config repository in {shown}:");
    for f in &writes.create {
        outln!("  created  {}", f.path);
    }
    for p in &writes.keep {
        outln!("  kept     {p} (exists; not overwritten)");
    }
    match committed {
        Some(c) => {
            outln!(
                "git: initialised, branch {}, first commit {}",
                c.branch,
                &c.id[..12.min(c.id.len())]
            );
            if c.fallback_identity {
                outln!(
                    "     (no git identity configured: committed as \"{} <{}>\"; set git's \
                     user.name and user.email)",
                    init::git::FALLBACK_NAME,
                    init::git::FALLBACK_EMAIL
                );
            }
        }
        None => outln!(
            "git: {shown}/.git exists: left alone; commit the new files yourself \
             (driftless applies commits, not the working tree)"
        ),
    }
    let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let abs = abs.display();
    outln!(
        "\nNext steps:\n  \
         1. Check it (run this in the repository's CI too):\n       \
         driftless validate {shown}\n  \
         2. See what it would write for this host, into a scratch directory:\n       \
         driftless plan --no-config --source {shown} --host {host} --root /tmp/driftless-try --state-dir /tmp/driftless-try-state\n     \
         (`sync --once` with the same options writes it there)\n  \
         3. Enable more roles in {shown}/hosts/{host}.toml, commit, and point the agent at \
         the repository\n     in /etc/driftless/agent.toml (or the URL you push it to):\n       \
         source = \"{abs}\"\n       \
         host = \"{host}\"    # only if it differs from the hostname"
    );
}
