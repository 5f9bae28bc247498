//! Build-time tasks that need the CLI definition but not a running agent.
//!
//! `cargo run -p xtask -- dist DIR` writes what the Debian package ships
//! beside the binary, generated from the same clap definitions the binary
//! parses with, so `--help`, the man pages and the completions never
//! disagree:
//!
//! - `DIR/man/driftless.1` and one page per subcommand
//!   (`driftless-sync.1`, `driftless-bundle-create.1`, …), gzipped by the
//!   packager;
//! - `DIR/completions/driftless.bash`, `_driftless` (zsh), `driftless.fish`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Command;
use clap_complete::Shell;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [task, dir] if task == "dist" => match dist(Path::new(dir)) {
            Ok(n) => {
                println!("xtask: wrote {n} files under {dir}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("xtask: {e}");
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!("usage: cargo run -p xtask -- dist DIR   (man pages and shell completions)");
            ExitCode::from(2)
        }
    }
}

fn dist(dir: &Path) -> Result<usize, String> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).map_err(|e| format!("create {}: {e}", d.display()))?;
    }
    let mut cmd = driftless::cli::command();
    cmd.build();
    let mut written = 0;
    man_pages(&cmd, &man, &mut written)?;
    for (shell, name) in [
        (Shell::Bash, "driftless.bash"),
        (Shell::Zsh, "_driftless"),
        (Shell::Fish, "driftless.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut driftless::cli::command(), "driftless", &mut out);
        write(&completions.join(name), &out)?;
        written += 1;
    }
    Ok(written)
}

/// One page for the command and one per subcommand, named like git's
/// (`driftless-bundle-create.1`), each listing its own flags.
fn man_pages(cmd: &Command, dir: &Path, written: &mut usize) -> Result<(), String> {
    let name = cmd
        .get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_string();
    let page = cmd.clone().name(name.clone());
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .map_err(|e| format!("render {name}: {e}"))?;
    write(&dir.join(format!("{name}.1")), &out)?;
    *written += 1;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        man_pages(sub, dir, written)?;
    }
    Ok(())
}

fn write(path: &PathBuf, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(path, bytes).map_err(|e| format!("write {}: {e}", path.display()))
}
