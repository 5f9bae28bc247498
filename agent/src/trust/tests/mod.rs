//! Tests for the trust module, with real `ssh-keygen` keys and signatures
//! and real `git` commits (`gpg.format=ssh`).

mod commits;
mod detached;
mod parser;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::AllowedSigners;

/// Where the allowed signers file "is" in tests; errors must name it.
pub(super) const ORIGIN: &str = "/etc/driftless/allowed_signers";

/// A key pair made by `ssh-keygen`.
pub(super) struct Key {
    pub private: PathBuf,
    /// `type base64` (no comment), for allowed signers lines.
    pub public: String,
}

impl Key {
    /// `principal [options] public`.
    pub fn line(&self, principal: &str, options: &str) -> String {
        if options.is_empty() {
            format!("{principal} {}", self.public)
        } else {
            format!("{principal} {options} {}", self.public)
        }
    }

    /// `SHA256:...` from `ssh-keygen -l`.
    pub fn fingerprint(&self) -> String {
        let out = run(
            Command::new("ssh-keygen")
                .arg("-l")
                .arg("-f")
                .arg(self.pub_path()),
            None,
        );
        out.split_whitespace()
            .nth(1)
            .expect("fingerprint")
            .to_string()
    }

    pub fn pub_path(&self) -> PathBuf {
        let mut p = self.private.clone().into_os_string();
        p.push(".pub");
        PathBuf::from(p)
    }
}

/// `ssh-keygen -t <kind> -N ''`; `kind` is `ed25519`, `rsa` or `ecdsa`.
pub(super) fn keygen(dir: &Path, name: &str, kind: &str) -> Key {
    keygen_with(dir, name, kind, &[])
}

pub(super) fn keygen_with(dir: &Path, name: &str, kind: &str, extra: &[&str]) -> Key {
    let private = dir.join(name);
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", kind, "-C", name, "-f"]).arg(&private);
    match kind {
        "rsa" => cmd.args(["-b", "2048"]),
        "ecdsa" => cmd.args(["-b", "256"]),
        _ => &mut cmd,
    };
    if !extra.contains(&"-N") {
        cmd.args(["-N", ""]);
    }
    cmd.args(extra);
    run(&mut cmd, None);
    let public = std::fs::read_to_string(dir.join(format!("{name}.pub"))).expect("public key");
    let public = public
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    Key { private, public }
}

/// Parses allowed signers text as if it were [`ORIGIN`]; panics on error.
pub(super) fn signers(text: &str) -> AllowedSigners {
    AllowedSigners::parse(text, Path::new(ORIGIN)).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The full error chain as one string.
pub(super) fn message<T: std::fmt::Debug>(result: anyhow::Result<T>) -> String {
    format!("{:#}", result.expect_err("expected an error"))
}

/// Runs `cmd` (with `stdin` if given); panics with stderr on failure;
/// returns stdout.
pub(super) fn run(cmd: &mut Command, stdin: Option<&[u8]>) -> String {
    use std::io::Write;
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A scratch git repository driven by the real `git` CLI with a fixed
/// identity and no user or system config.
pub(super) struct Repo {
    pub dir: PathBuf,
}

impl Repo {
    pub fn init(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("mkdir");
        let repo = Self {
            dir: dir.to_path_buf(),
        };
        repo.git(&["init", "-q", "-b", "main"]);
        repo
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new("git");
        cmd.current_dir(&self.dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_AUTHOR_NAME", "Test")
            .env("GIT_AUTHOR_EMAIL", "test@example.com")
            .env("GIT_COMMITTER_NAME", "Test")
            .env("GIT_COMMITTER_EMAIL", "test@example.com")
            .env("GIT_AUTHOR_DATE", "@1750000000 +0000")
            .env("GIT_COMMITTER_DATE", "@1750000000 +0000");
        cmd
    }

    pub fn git(&self, args: &[&str]) -> String {
        run(self.command().args(args), None).trim().to_string()
    }

    /// An empty commit with `message`, signed with `key` (if any), made at
    /// unix time `at` (committer and author).
    pub fn commit_at(&self, message: &str, key: Option<&Key>, at: i64) -> gix::ObjectId {
        let date = format!("@{at} +0000");
        let mut cmd = self.command();
        cmd.env("GIT_AUTHOR_DATE", &date)
            .env("GIT_COMMITTER_DATE", &date);
        if let Some(key) = key {
            cmd.arg("-c")
                .arg("gpg.format=ssh")
                .arg("-c")
                .arg(format!("user.signingkey={}", key.private.display()))
                .args(["commit", "-q", "--allow-empty", "-S", "-m", message]);
        } else {
            cmd.args(["commit", "-q", "--allow-empty", "-m", message]);
        }
        run(&mut cmd, None);
        self.head()
    }

    pub fn commit(&self, message: &str, key: Option<&Key>) -> gix::ObjectId {
        self.commit_at(message, key, 1_750_000_000)
    }

    pub fn head(&self) -> gix::ObjectId {
        self.rev("HEAD")
    }

    pub fn rev(&self, rev: &str) -> gix::ObjectId {
        gix::ObjectId::from_hex(self.git(&["rev-parse", rev]).as_bytes()).expect("object id")
    }

    /// Writes a raw commit object (`git hash-object -w -t commit`).
    pub fn write_commit(&self, raw: &[u8]) -> gix::ObjectId {
        let out = run(
            self.command()
                .args(["hash-object", "-w", "-t", "commit", "--stdin"]),
            Some(raw),
        );
        gix::ObjectId::from_hex(out.trim().as_bytes()).expect("object id")
    }

    pub fn cat_commit(&self, id: gix::ObjectId) -> Vec<u8> {
        run(
            self.command().args(["cat-file", "commit", &id.to_string()]),
            None,
        )
        .into_bytes()
    }

    pub fn open(&self) -> gix::Repository {
        gix::open_opts(&self.dir, gix::open::Options::isolated()).expect("open repository")
    }
}
