//! Fixture helpers: git repositories made with the real `git` CLI, and a
//! runner for the built binary with an isolated root and state dir.

#![allow(dead_code)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_driftless");

/// The workspace root (where `examples/` lives).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[path = "../common/git.rs"]
mod git_cli;
pub use git_cli::git;

/// Missing prerequisites fail unless `DRIFTLESS_TEST_ALLOW_SKIP=1`; skips
/// are printed and counted (`tests/run`).
#[path = "../common/skip.rs"]
pub mod skip;

/// A git repository in a temp dir, on branch `main`.
pub struct Repo {
    pub dir: tempfile::TempDir,
}

impl Repo {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        git(dir.path(), &["init", "-q", "-b", "main"]);
        Repo { dir }
    }

    /// A repository holding a copy of `examples/quickstart`, committed.
    pub fn quickstart() -> Self {
        let r = Repo::new();
        copy_dir(&workspace().join("examples/quickstart"), r.path());
        r.commit("quickstart");
        r
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, rel: &str, content: &str) -> &Self {
        let p = self.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
        self
    }

    pub fn remove(&self, rel: &str) -> &Self {
        std::fs::remove_file(self.path().join(rel)).unwrap();
        self
    }

    /// Commits everything; returns the commit id.
    pub fn commit(&self, msg: &str) -> String {
        git(self.path(), &["add", "-A"]);
        git(self.path(), &["commit", "-q", "--allow-empty", "-m", msg]);
        self.head()
    }

    pub fn head(&self) -> String {
        git(self.path(), &["rev-parse", "HEAD"])
    }
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// An isolated target: root prefix and state dir.
pub struct Host {
    pub root: tempfile::TempDir,
    pub state: tempfile::TempDir,
    pub name: String,
    /// Set in the environment of every command of this host.
    pub env: Vec<(String, String)>,
}

/// What a run of the binary produced.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Self {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "expected success\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    pub fn code(self, code: i32) -> Self {
        assert_eq!(
            self.code, code,
            "expected exit {code}\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

impl Host {
    pub fn new(name: &str) -> Self {
        Host {
            root: tempfile::tempdir().unwrap(),
            state: tempfile::tempdir().unwrap(),
            name: name.into(),
            env: Vec::new(),
        }
    }

    /// A command for the binary with `--no-config` and, as far as the
    /// subcommand takes them (`driftless status` has no `--source`), this
    /// host's name, root, state dir, age key and `source`.
    pub fn cmd(&self, source: &Path, args: &[&str]) -> Command {
        #[derive(PartialEq, PartialOrd)]
        enum Takes {
            State,
            Keys,
            Validate,
            All,
        }
        let words: Vec<&str> = args.iter().take(2).copied().collect();
        let takes = match words.as_slice() {
            ["status" | "history" | "state", ..] | ["bundle", "verify"] => Takes::State,
            ["secrets", ..] => Takes::Keys,
            ["validate", ..] => Takes::Validate,
            _ => Takes::All,
        };
        let mut c = Command::new(BIN);
        c.args(args).arg("--no-config");
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        if matches!(takes, Takes::All | Takes::Validate) {
            c.arg("--source").arg(source);
        }
        if takes == Takes::All {
            c.arg("--host").arg(&self.name);
        }
        if takes != Takes::Keys {
            c.arg("--root")
                .arg(self.root.path())
                .arg("--state-dir")
                .arg(self.state.path());
        }
        if takes != Takes::State {
            // Only read when a file uses a secret.
            c.arg("--age-key")
                .arg(workspace().join("examples/DEMO-age-key.txt"));
        }
        c.env_remove("DRIFTLESS_TEST_CRASH_AFTER")
            .env_remove("DRIFTLESS_TEST_FAILPOINT")
            .env_remove("DRIFTLESS_TEST_FAILPOINT_TRACE")
            .env_remove("SOPS_AGE_KEY")
            .env_remove("SOPS_AGE_KEY_FILE")
            .env("NO_COLOR", "1");
        c
    }

    pub fn run(&self, source: &Path, args: &[&str]) -> Run {
        Run::from(self.cmd(source, args).output().expect("driftless runs"))
    }

    pub fn sync(&self, source: &Path) -> Run {
        self.run(source, &["sync", "--once"])
    }

    pub fn path(&self, target: &str) -> PathBuf {
        self.root.path().join(target.trim_start_matches('/'))
    }

    pub fn read(&self, target: &str) -> Option<String> {
        std::fs::read_to_string(self.path(target)).ok()
    }

    /// Every file under the root, relative, sorted, with content.
    pub fn tree(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        walk(self.root.path(), self.root.path(), &mut out);
        out.sort();
        out
    }

    /// Every file of [`Host::tree`] with its inode, mtime and ctime (ns):
    /// what a rewrite of the same bytes, or a chmod back to the same mode,
    /// changes, where a comparison of contents sees nothing.
    pub fn stamps(&self) -> Vec<(String, u64, i128, i128)> {
        self.tree()
            .into_iter()
            .map(|(p, _)| {
                let m = std::fs::symlink_metadata(self.path(&p)).unwrap();
                let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
                let (mtime, ctime) = (ns(m.mtime(), m.mtime_nsec()), ns(m.ctime(), m.ctime_nsec()));
                (p, m.ino(), mtime, ctime)
            })
            .collect()
    }
}

fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            walk(base, &e.path(), out);
        } else {
            let rel = e.path().strip_prefix(base).unwrap().display().to_string();
            out.push((
                format!("/{rel}"),
                std::fs::read(e.path()).unwrap_or_default(),
            ));
        }
    }
}

/// A minimal one-role repository managing the given files from sources.
pub fn simple_repo(files: &[(&str, &str)]) -> Repo {
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"app\"]\n");
    r.write("hosts/default.toml", "");
    let mut role = String::new();
    for (i, (target, content)) in files.iter().enumerate() {
        role.push_str(&format!(
            "[[files]]\npath = \"{target}\"\nsource = \"f{i}\"\n\n"
        ));
        r.write(&format!("roles/app/files/f{i}"), content);
    }
    r.write("roles/app/role.toml", &role);
    r.commit("initial");
    r
}

/// `driftless validate --no-config [extra…] DIR`, without secret keys from
/// the environment: (exit code, stdout).
pub fn validate(dir: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(["validate", "--no-config"])
        .args(extra)
        .arg(dir)
        .env_remove("SOPS_AGE_KEY_FILE")
        .env_remove("SOPS_AGE_KEY")
        .env("NO_COLOR", "1")
        .output()
        .expect("driftless runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// One entry under the root, as `lstat` and `readlink` see it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RootEntry {
    pub path: String,
    /// "file", "link" or "dir".
    pub kind: &'static str,
    /// A file's bytes, or a link's target.
    pub content: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Every entry under the root, links included (never followed), with
/// mode and owner: what a byte-exact revert must give back.
pub fn root_snapshot(host: &Host) -> Vec<RootEntry> {
    fn walk(base: &std::path::Path, dir: &std::path::Path, out: &mut Vec<RootEntry>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            let rel = format!("/{}", path.strip_prefix(base).unwrap().display());
            let (kind, content) = if m.file_type().is_symlink() {
                let t = std::fs::read_link(&path).unwrap();
                ("link", t.into_os_string().into_encoded_bytes())
            } else if m.is_dir() {
                walk(base, &path, out);
                ("dir", Vec::new())
            } else {
                ("file", std::fs::read(&path).unwrap())
            };
            out.push(RootEntry {
                path: rel,
                kind,
                content,
                // A link's mode is always 0777; compare what can differ.
                mode: if kind == "link" { 0 } else { m.mode() & 0o7777 },
                uid: m.uid(),
                gid: m.gid(),
            });
        }
    }
    let mut out = Vec::new();
    walk(host.root.path(), host.root.path(), &mut out);
    out.sort();
    out
}
