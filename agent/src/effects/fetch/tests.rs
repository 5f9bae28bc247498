//! Tests against real repositories made with the `git` CLI, and real
//! servers on 127.0.0.1 (`tests/support/https_git_server.py` for smart
//! HTTPS, `tests/support/sshd.py` for OpenSSH).
//!
//! Some checks need an environment the test process must not change for
//! itself (tests run in parallel threads; mutating `PATH` or `SSL_CERT_FILE`
//! in-process would race): those run as a *child* of the test binary, which
//! re-executes one `#[ignore]`d `child_*` test with the environment set for
//! it. Run on their own, without that environment, the `child_*` tests skip.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;
use crate::desired::snapshot::Entry;

// ---------------------------------------------------------------- helpers

fn git_cmd(dir: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Test Author")
        .env("GIT_AUTHOR_EMAIL", "author@example.org")
        .env("GIT_COMMITTER_NAME", "Test Committer")
        .env("GIT_COMMITTER_EMAIL", "committer@example.org")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE");
    cmd
}

/// Runs git in `dir`, panics on failure, returns trimmed stdout.
fn git(dir: &Path, args: &[&str]) -> String {
    git_env(dir, args, &[])
}

fn git_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = git_cmd(dir);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} in {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A new repository under `root` (`work`) whose one commit holds `files`:
/// the repository and that commit.
fn commit_files(root: &Path, files: &[(&str, &[u8])]) -> (PathBuf, gix::ObjectId) {
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    for (name, content) in files {
        std::fs::write(work.join(name), content).unwrap();
    }
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "one"]);
    let head = oid(&git(&work, &["rev-parse", "HEAD"]));
    (work, head)
}

/// [`read_tree`] with the default `max_file_size`.
fn read_tree_t(repo: &gix::Repository, commit: gix::ObjectId, sub_path: &str) -> Result<Snapshot> {
    read_tree(
        repo,
        commit,
        sub_path,
        crate::desired::guard::Limits::default().file,
    )
}

fn oid(hex: &str) -> gix::ObjectId {
    gix::ObjectId::from_hex(hex.as_bytes()).expect("hex object id")
}

fn write(path: &Path, content: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

fn tool_available(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn sshd_available() -> bool {
    ["/usr/sbin/sshd", "/usr/local/sbin/sshd"]
        .iter()
        .any(|p| Path::new(p).exists())
}

/// `tests/support` of the workspace.
fn support_dir() -> PathBuf {
    let from_manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/support");
    if from_manifest.is_dir() {
        return from_manifest;
    }
    // Built from elsewhere with this file path-included: go up from it.
    Path::new(file!())
        .ancestors()
        .nth(5)
        .map(|root| root.join("tests/support"))
        .filter(|p| p.is_dir())
        .expect("tests/support not found")
}

/// A working repository on branch `main` with a commit containing a bit of
/// everything: plain, executable, nested files and symlinks.
fn fixture_repo(root: &Path) -> (PathBuf, gix::ObjectId) {
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    write(&work.join("README"), "hello\n");
    write(&work.join("bin/run.sh"), "#!/bin/sh\necho run\n");
    std::fs::set_permissions(
        work.join("bin/run.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    write(&work.join("sub/dir/conf.toml"), "a = 1\n");
    write(&work.join("sub/top.txt"), "top\n");
    std::os::unix::fs::symlink("README", work.join("readme-link")).unwrap();
    std::os::unix::fs::symlink("dir/conf.toml", work.join("sub/conf-link")).unwrap();
    // enough files that a full pack is clearly bigger than an incremental one
    for i in 0..20 {
        write(&work.join(format!("many/file{i}.txt")), &format!("{i}\n"));
    }
    git(&work, &["add", "-A"]);
    git(
        &work,
        &["commit", "-q", "-m", "first commit\n\nwith a body"],
    );
    let head = oid(&git(&work, &["rev-parse", "HEAD"]));
    (work, head)
}

fn commit_file(work: &Path, file: &str, content: &str, msg: &str) -> gix::ObjectId {
    write(&work.join(file), content);
    git(work, &["add", "-A"]);
    git(work, &["commit", "-q", "-m", msg]);
    oid(&git(work, &["rev-parse", "HEAD"]))
}

fn spec(location: Location, branch: &str) -> SourceSpec {
    SourceSpec {
        location,
        branch: branch.to_string(),
        ssh: SshOptions::default(),
    }
}

fn err_text(err: anyhow::Error) -> String {
    format!("{err:#}")
}

fn file(snap: &Snapshot, path: &str) -> (Vec<u8>, bool) {
    match snap.entry(path) {
        Some(Entry::File { executable, .. }) => {
            (snap.read_file(path).unwrap().unwrap().to_vec(), *executable)
        }
        other => panic!("{path}: expected a file, got {other:?}"),
    }
}

fn link(snap: &Snapshot, path: &str) -> String {
    match snap.entry(path) {
        Some(Entry::Symlink { target }) => target.clone(),
        other => panic!("{path}: expected a symlink, got {other:?}"),
    }
}

/// Checks the whole-repository snapshot of [`fixture_repo`]'s first commit.
fn check_fixture_snapshot(snap: &Snapshot) {
    assert_eq!(file(snap, "README"), (b"hello\n".to_vec(), false));
    assert!(file(snap, "bin/run.sh").1, "executable bit");
    assert_eq!(file(snap, "sub/dir/conf.toml").0, b"a = 1\n");
    assert_eq!(link(snap, "readme-link"), "README");
    assert_eq!(link(snap, "sub/conf-link"), "dir/conf.toml");
    assert_eq!(snap.read("readme-link").unwrap(), Some(&b"hello\n"[..]));
    assert_eq!(snap.len(), 6 + 20);
}

/// The pack files (`.idx`) of a repository's object database.
fn pack_indexes(repo_dir: &Path) -> Vec<PathBuf> {
    let dir = repo_dir.join("objects/pack");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "idx"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn objects_in_pack(idx: &Path) -> u32 {
    gix::odb::pack::index::File::at(idx, gix::hash::Kind::Sha1)
        .expect("open pack index")
        .num_objects()
}

/// Runs one `#[ignore]`d child test of this module in a new process of the
/// test binary with `env` applied, and asserts that it passed.
fn run_child(test: &str, env: &[(&str, &str)], remove: &[&str], scratch: &Path) {
    let module = module_path!().split_once("::").map_or("", |(_, m)| m);
    let name = format!("{module}::{test}");
    let out_path = scratch.join(format!("{test}.out"));
    let stdout = std::fs::File::create(&out_path).unwrap();
    let stderr = stdout.try_clone().unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        name.as_str(),
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .stdin(Stdio::null())
    .stdout(stdout)
    .stderr(stderr);
    for key in remove {
        cmd.env_remove(key);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn the test binary");
    let status = wait_timeout(&mut child, Duration::from_secs(180));
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(
        matches!(status, Some(s) if s.success()),
        "child test {name} failed ({status:?}):\n{output}"
    );
    assert!(
        output.contains("1 passed") && !output.contains("SKIP"),
        "child test {name} did not run:\n{output}"
    );
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// A server process, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads the server's stdout until `done(line)` or EOF; returns the lines.
fn read_until(child: &mut Child, done: impl Fn(&str) -> bool) -> Vec<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let mut reader = BufReader::new(stdout);
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = line.trim_end().to_string();
                let finished = done(&line);
                lines.push(line);
                if finished {
                    break;
                }
            }
        }
    }
    lines
}

/// The child tests read their inputs from these variables.
fn child_env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

// ------------------------------------------------------------ local reads

#[test]
fn local_path_and_file_url_read_the_tip() {
    let tmp = tempfile::tempdir().unwrap();
    let (work, head) = fixture_repo(tmp.path());
    let ct: i64 = git(&work, &["show", "-s", "--format=%ct", "HEAD"])
        .parse()
        .unwrap();
    let mirror = tmp.path().join("mirror.git");

    let url = format!("file://{}", work.display());
    for location in [
        Location::Local(work.clone()),
        Location::parse(&url).unwrap(),
    ] {
        let got = fetch(&spec(location.clone(), "main"), &mirror).unwrap();
        assert_eq!(got.commit, head, "{location}");
        assert_eq!(got.commit_time, ct);
        assert_eq!(got.summary, "first commit");
        check_fixture_snapshot(&read_tree_t(&got.repo, got.commit, "").unwrap());
        // open() gives the same object database back
        let again = open(&spec(location, "main"), &mirror).unwrap();
        assert!(again.has_object(head));
    }
    assert!(!mirror.exists(), "local sources must not create a mirror");

    // a new commit is seen at once: the repository is read in place
    let second = commit_file(&work, "README", "changed\n", "second");
    let got = fetch(&spec(Location::Local(work.clone()), "main"), &mirror).unwrap();
    assert_eq!(got.commit, second);
    assert_eq!(got.summary, "second");
}

#[test]
fn local_read_needs_no_git_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let (work, head) = fixture_repo(tmp.path());
    let empty_path = tmp.path().join("empty-path");
    std::fs::create_dir(&empty_path).unwrap();
    run_child(
        "child_local_read_without_git",
        &[
            ("PATH", empty_path.to_str().unwrap()),
            ("DRIFTLESS_TEST_REPO", work.to_str().unwrap()),
            ("DRIFTLESS_TEST_COMMIT", &head.to_string()),
        ],
        &[],
        tmp.path(),
    );
}

/// Runs with `PATH` set to an empty directory by [`local_read_needs_no_git_binary`].
#[test]
#[ignore = "run by local_read_needs_no_git_binary with PATH emptied"]
fn child_local_read_without_git() {
    let (Some(repo), Some(commit)) = (
        child_env("DRIFTLESS_TEST_REPO"),
        child_env("DRIFTLESS_TEST_COMMIT"),
    ) else {
        eprintln!("SKIP: only meaningful when started by local_read_needs_no_git_binary");
        return;
    };
    assert!(
        Command::new("git").arg("--version").output().is_err(),
        "git must not be reachable through PATH in this test"
    );
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{repo}");
    for location in [
        Location::Local(PathBuf::from(&repo)),
        Location::parse(&url).unwrap(),
    ] {
        let got = fetch(&spec(location, "main"), &tmp.path().join("m")).unwrap();
        assert_eq!(got.commit.to_string(), commit);
        check_fixture_snapshot(&read_tree_t(&got.repo, got.commit, "").unwrap());
        assert!(is_ancestor(&got.repo, got.commit, got.commit).unwrap());
    }
}

#[test]
fn bare_repos_full_refs_and_tags() {
    let tmp = tempfile::tempdir().unwrap();
    let (work, head) = fixture_repo(tmp.path());
    git(&work, &["tag", "-a", "-m", "release one", "v1"]);
    git(&work, &["tag", "light"]);
    let bare = tmp.path().join("bare.git");
    git(
        tmp.path(),
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().unwrap(),
            bare.to_str().unwrap(),
        ],
    );
    let mirror = tmp.path().join("m");
    for branch in ["main", "refs/heads/main", "refs/tags/v1", "refs/tags/light"] {
        let got = fetch(&spec(Location::Local(bare.clone()), branch), &mirror).unwrap();
        assert_eq!(
            got.commit, head,
            "{branch}: annotated tags are peeled to the commit"
        );
    }
}

#[test]
fn local_errors_name_the_ref_and_the_repository() {
    let tmp = tempfile::tempdir().unwrap();
    let (work, _) = fixture_repo(tmp.path());
    let mirror = tmp.path().join("m");
    let Err(err) = fetch(&spec(Location::Local(work.clone()), "nope"), &mirror) else {
        panic!("missing branch accepted")
    };
    let err = err_text(err);
    assert!(err.contains("refs/heads/nope"), "{err}");
    assert!(err.contains(&work.display().to_string()), "{err}");
    assert!(err.contains("branches there: main"), "{err}");

    let not_repo = tmp.path().join("plain");
    std::fs::create_dir(&not_repo).unwrap();
    let Err(err) = fetch(&spec(Location::Local(not_repo.clone()), "main"), &mirror) else {
        panic!("plain directory accepted")
    };
    let err = err_text(err);
    assert!(err.contains(&not_repo.display().to_string()), "{err}");
    assert!(err.contains("git working copy or bare repository"), "{err}");

    for bad in ["", "a..b", "main/"] {
        assert!(
            fetch(&spec(Location::Local(work.clone()), bad), &mirror).is_err(),
            "branch {bad:?} accepted"
        );
    }
}

// -------------------------------------------------------------- read_tree

#[test]
fn read_tree_of_a_sub_path() {
    let tmp = tempfile::tempdir().unwrap();
    let (work, head) = fixture_repo(tmp.path());
    let repo = open(&spec(Location::Local(work), "main"), tmp.path()).unwrap();

    for sub in ["sub", "/sub/", "./sub"] {
        let snap = read_tree_t(&repo, head, sub).unwrap();
        assert_eq!(file(&snap, "dir/conf.toml").0, b"a = 1\n", "{sub}");
        assert_eq!(file(&snap, "top.txt").0, b"top\n");
        assert_eq!(link(&snap, "conf-link"), "dir/conf.toml");
        assert_eq!(snap.read("conf-link").unwrap(), Some(&b"a = 1\n"[..]));
        assert_eq!(snap.len(), 3, "only the subtree");
    }
    let snap = read_tree_t(&repo, head, "sub/dir").unwrap();
    assert_eq!(snap.len(), 1);
    assert!(snap.contains("conf.toml"));
    check_fixture_snapshot(&read_tree_t(&repo, head, ".").unwrap());

    let err = err_text(read_tree_t(&repo, head, "nope/x").unwrap_err());
    assert!(err.contains("\"nope/x\" does not exist"), "{err}");
    assert!(err.contains(&head.to_string()), "{err}");
    let err = err_text(read_tree_t(&repo, head, "README").unwrap_err());
    assert!(err.contains("not a directory"), "{err}");
    let err = err_text(read_tree_t(&repo, head, "../etc").unwrap_err());
    assert!(err.contains("plain relative directory"), "{err}");
}

#[test]
fn submodules_are_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (work, head) = fixture_repo(tmp.path());
    // a gitlink entry, as `git submodule add` would record
    git(
        &work,
        &[
            "update-index",
            "--add",
            "--cacheinfo",
            &format!("160000,{head},sub/vendored"),
        ],
    );
    git(&work, &["commit", "-q", "-m", "add submodule"]);
    let with_sub = oid(&git(&work, &["rev-parse", "HEAD"]));
    let repo = open(&spec(Location::Local(work), "main"), tmp.path()).unwrap();
    let err = err_text(read_tree_t(&repo, with_sub, "").unwrap_err());
    assert!(err.contains("sub/vendored is a git submodule"), "{err}");
    let err = err_text(read_tree_t(&repo, with_sub, "sub").unwrap_err());
    assert!(err.contains("sub/vendored is a git submodule"), "{err}");
    // other subtrees are still readable
    assert_eq!(read_tree_t(&repo, with_sub, "bin").unwrap().len(), 1);
}

// ------------------------------------------------------------ is_ancestor

#[test]
fn is_ancestor_follows_history_and_force_pushes() {
    let tmp = tempfile::tempdir().unwrap();
    let (work, c1) = fixture_repo(tmp.path());
    let c2 = commit_file(&work, "README", "two\n", "two");
    let c3 = commit_file(&work, "README", "three\n", "three");
    // force-push scenario: c3 is replaced by an amended commit
    git(&work, &["commit", "-q", "--amend", "-m", "three, amended"]);
    let c3b = oid(&git(&work, &["rev-parse", "HEAD"]));
    assert_ne!(c3, c3b);

    let repo = open(&spec(Location::Local(work.clone()), "main"), tmp.path()).unwrap();
    assert!(is_ancestor(&repo, c1, c3b).unwrap());
    assert!(is_ancestor(&repo, c2, c3b).unwrap());
    assert!(is_ancestor(&repo, c3b, c3b).unwrap());
    assert!(!is_ancestor(&repo, c3, c3b).unwrap(), "rewritten commit");
    assert!(!is_ancestor(&repo, c3b, c1).unwrap(), "wrong direction");
    let missing = oid("0123456789abcdef0123456789abcdef01234567");
    assert!(!is_ancestor(&repo, missing, c3b).unwrap(), "unknown commit");
    let tree = oid(&git(&work, &["rev-parse", "HEAD^{tree}"]));
    assert!(
        is_ancestor(&repo, tree, c3b).is_err(),
        "a tree is not a commit"
    );
}

#[test]
fn is_ancestor_tolerates_clock_skew() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("w");
    std::fs::create_dir(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    let at = |t: &str| {
        [
            ("GIT_COMMITTER_DATE", t.to_string()),
            ("GIT_AUTHOR_DATE", t.to_string()),
        ]
    };
    let commit = |msg: &str, t: &str| {
        write(&work.join("f"), msg);
        git(&work, &["add", "-A"]);
        let env = at(t);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        git_env(&work, &["commit", "-q", "-m", msg], &env);
        oid(&git(&work, &["rev-parse", "HEAD"]))
    };
    let old = commit("old", "1600000000 +0000");
    let base = commit("base", "1700000000 +0000");
    // a committer with a clock three days behind
    let skewed = commit("skewed", "1699740800 +0000");
    let tip = commit("tip", "1700100000 +0000");
    let repo = open(&spec(Location::Local(work), "main"), tmp.path()).unwrap();
    assert!(is_ancestor(&repo, base, tip).unwrap());
    assert!(is_ancestor(&repo, skewed, tip).unwrap());
    assert!(is_ancestor(&repo, old, tip).unwrap());
}

// ------------------------------------------------------------------ https

struct HttpsFixture {
    _server: Server,
    port: u16,
    ca: PathBuf,
    work: PathBuf,
    bare: PathBuf,
    first: gix::ObjectId,
}

fn https_fixture(root: &Path) -> Option<HttpsFixture> {
    for (tool, arg) in [
        ("python3", "--version"),
        ("openssl", "version"),
        ("git", "--version"),
    ] {
        if !tool_available(tool, arg) {
            crate::test_skip::missing(&format!("{tool} (tests/install-prereqs installs it)"));
            return None;
        }
    }
    let support = support_dir();
    let certs = root.join("certs");
    let status = Command::new("sh")
        .arg(support.join("make_test_ca.sh"))
        .arg(&certs)
        .status()
        .expect("run make_test_ca.sh");
    assert!(status.success(), "make_test_ca.sh failed");

    let (work, first) = fixture_repo(root);
    let served = root.join("served");
    std::fs::create_dir(&served).unwrap();
    let bare = served.join("cfg.git");
    git(
        root,
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().unwrap(),
            bare.to_str().unwrap(),
        ],
    );
    git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);

    let mut child = Command::new("python3")
        .arg(support.join("https_git_server.py"))
        .arg("--root")
        .arg(&served)
        .arg("--cert")
        .arg(certs.join("server.pem"))
        .arg("--key")
        .arg(certs.join("server.key"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start https_git_server.py");
    let lines = read_until(&mut child, |_| true);
    let server = Server(child);
    let port = lines
        .first()
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("https_git_server.py printed no port: {lines:?}"));
    Some(HttpsFixture {
        _server: server,
        port,
        ca: certs.join("ca.pem"),
        work,
        bare,
        first,
    })
}

/// Fetching over HTTPS, with the test CA trusted through `SSL_CERT_FILE`
/// (the only CA source: `SSL_CERT_DIR` is removed for the child): first
/// fetch, incremental fetch, force-push, URL change, unreachable server.
#[test]
fn https_fetch_is_incremental() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(fx) = https_fixture(tmp.path()) else {
        return;
    };
    let url = format!("https://127.0.0.1:{}/cfg.git", fx.port);
    run_child(
        "child_https_fetch",
        &[
            ("SSL_CERT_FILE", fx.ca.to_str().unwrap()),
            ("DRIFTLESS_TEST_URL", &url),
            ("DRIFTLESS_TEST_PORT", &fx.port.to_string()),
            ("DRIFTLESS_TEST_WORK", fx.work.to_str().unwrap()),
            ("DRIFTLESS_TEST_COMMIT", &fx.first.to_string()),
            ("DRIFTLESS_TEST_BARE", fx.bare.to_str().unwrap()),
        ],
        &["SSL_CERT_DIR"],
        tmp.path(),
    );
}

#[test]
#[ignore = "run by https_fetch_is_incremental with SSL_CERT_FILE set"]
fn child_https_fetch() {
    let (Some(url), Some(port), Some(work), Some(first)) = (
        child_env("DRIFTLESS_TEST_URL"),
        child_env("DRIFTLESS_TEST_PORT"),
        child_env("DRIFTLESS_TEST_WORK"),
        child_env("DRIFTLESS_TEST_COMMIT"),
    ) else {
        eprintln!("SKIP: only meaningful when started by https_fetch_is_incremental");
        return;
    };
    install_tls_provider();
    install_tls_provider(); // idempotent
    let work = PathBuf::from(work);
    let tmp = tempfile::tempdir().unwrap();
    let mirror = tmp.path().join("state/mirror.git");
    let source = spec(Location::parse(&url).unwrap(), "main");

    let err = err_text(open(&source, &mirror).unwrap_err());
    assert!(err.contains("run a sync first"), "{err}");

    // first fetch creates the mirror
    let got = fetch(&source, &mirror).unwrap();
    assert_eq!(got.commit.to_string(), first);
    assert_eq!(got.summary, "first commit");
    check_fixture_snapshot(&read_tree_t(&got.repo, got.commit, "").unwrap());
    assert!(mirror.join("HEAD").is_file(), "bare mirror created");
    let packs_before = pack_indexes(&mirror);
    assert_eq!(packs_before.len(), 1);
    let full_pack_objects = objects_in_pack(&packs_before[0]);
    assert!(full_pack_objects > 30, "{full_pack_objects}");
    let origin = mirror_origin(&mirror);
    assert_eq!(origin.0, url);
    assert_eq!(
        origin.1,
        vec!["+refs/heads/main:refs/remotes/origin/main".to_string()]
    );

    // fetching again without changes changes nothing
    let again = fetch(&source, &mirror).unwrap();
    assert_eq!(again.commit, got.commit);
    assert_eq!(pack_indexes(&mirror), packs_before);

    // a new commit arrives as a small, separate pack
    let second = commit_file(&work, "README", "second\n", "second commit");
    git(&work, &["push", "-q", "origin", "main"]);
    let got2 = fetch(&source, &mirror).unwrap();
    assert_eq!(got2.commit, second);
    assert_eq!(got2.summary, "second commit");
    let packs_after = pack_indexes(&mirror);
    let new_packs: Vec<_> = packs_after
        .iter()
        .filter(|p| !packs_before.contains(p))
        .collect();
    assert_eq!(new_packs.len(), 1, "{packs_after:?}");
    // 3 new objects (commit, root tree, blob), plus the delta bases gix
    // appends when it completes the thin pack: at most one each.
    let new_objects = objects_in_pack(new_packs[0]);
    assert!(
        new_objects <= 6,
        "incremental fetch brought {new_objects} objects (full pack: {full_pack_objects})"
    );
    assert!(is_ancestor(&got2.repo, got.commit, got2.commit).unwrap());
    assert_eq!(
        file(&read_tree_t(&got2.repo, got2.commit, "").unwrap(), "README").0,
        b"second\n"
    );

    // force-push: the mirror follows, and is_ancestor tells the caller
    git(
        &work,
        &["commit", "-q", "--amend", "-m", "second, rewritten"],
    );
    git(&work, &["push", "-q", "--force", "origin", "main"]);
    let got3 = fetch(&source, &mirror).unwrap();
    assert_eq!(got3.summary, "second, rewritten");
    assert!(!is_ancestor(&got3.repo, got2.commit, got3.commit).unwrap());
    assert!(is_ancestor(&got3.repo, got.commit, got3.commit).unwrap());

    // the same repository under another URL: fetched from there, recorded
    let other_url = format!("https://localhost:{port}/cfg.git");
    let moved = spec(Location::parse(&other_url).unwrap(), "main");
    assert_eq!(fetch(&moved, &mirror).unwrap().commit, got3.commit);
    assert_eq!(mirror_origin(&mirror).0, other_url);

    // a missing branch names the branch and the URL
    let err = err_text(fetch(&spec(Location::parse(&url).unwrap(), "nope"), &mirror).unwrap_err());
    assert!(
        err.contains(&format!("{url} has no refs/heads/nope")),
        "{err}"
    );

    // an unreachable server: the error names the URL; the mirror still works
    let dead_url = format!("https://127.0.0.1:{}/cfg.git", closed_port());
    let dead = spec(Location::parse(&dead_url).unwrap(), "main");
    let err = err_text(fetch(&dead, &mirror).unwrap_err());
    assert!(err.contains(&dead_url), "{err}");
    assert!(err.contains("keeps the previously fetched commit"), "{err}");
    let repo = open(&dead, &mirror).unwrap();
    let tip = repo
        .find_reference("refs/remotes/origin/main")
        .unwrap()
        .id()
        .detach();
    assert_eq!(tip, got3.commit);
    assert_eq!(read_tree_t(&repo, tip, "").unwrap().len(), 26);
    assert_eq!(
        mirror_origin(&mirror).0,
        other_url,
        "failed fetch records nothing"
    );
}

/// Without the test CA among the trusted roots the server is refused.
#[test]
fn https_refuses_an_untrusted_server() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(fx) = https_fixture(tmp.path()) else {
        return;
    };
    let url = format!("https://127.0.0.1:{}/cfg.git", fx.port);
    run_child(
        "child_https_untrusted",
        &[("DRIFTLESS_TEST_URL", &url)],
        &["SSL_CERT_FILE", "SSL_CERT_DIR"],
        tmp.path(),
    );
}

#[test]
#[ignore = "run by https_refuses_an_untrusted_server"]
fn child_https_untrusted() {
    let Some(url) = child_env("DRIFTLESS_TEST_URL") else {
        eprintln!("SKIP: only meaningful when started by https_refuses_an_untrusted_server");
        return;
    };
    install_tls_provider();
    let tmp = tempfile::tempdir().unwrap();
    let mirror = tmp.path().join("mirror.git");
    let err = err_text(fetch(&spec(Location::parse(&url).unwrap(), "main"), &mirror).unwrap_err());
    assert!(err.contains(&url), "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}

/// `remote.origin` of the mirror: URL and fetch refspecs.
fn mirror_origin(mirror: &Path) -> (String, Vec<String>) {
    let repo = gix::open_opts(mirror, gix::open::Options::isolated()).unwrap();
    let remote = repo.find_remote("origin").unwrap();
    let url = remote
        .url(gix::remote::Direction::Fetch)
        .unwrap()
        .to_bstring()
        .to_string();
    let specs = remote
        .refspecs(gix::remote::Direction::Fetch)
        .iter()
        .map(|s| s.to_ref().to_bstring().to_string())
        .collect();
    (url, specs)
}

/// A loopback port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

// -------------------------------------------------------------------- ssh

struct Sshd {
    _server: Server,
    port: u16,
    user: String,
    key: PathBuf,
    known_hosts: PathBuf,
}

fn start_sshd(dir: &Path) -> Option<Sshd> {
    if !sshd_available() {
        crate::test_skip::missing(
            "sshd (apt-get install -y openssh-server; tests/install-prereqs installs it)",
        );
        return None;
    }
    for (tool, arg) in [
        ("python3", "--version"),
        ("ssh", "-V"),
        ("ssh-keygen", "-?"),
        ("git", "--version"),
    ] {
        if !tool_available(tool, arg) {
            crate::test_skip::missing(&format!("{tool} (tests/install-prereqs installs it)"));
            return None;
        }
    }
    let mut child = Command::new("python3")
        .arg(support_dir().join("sshd.py"))
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start sshd.py");
    let lines = read_until(&mut child, |l| l == "ready");
    let server = Server(child);
    let value = |key: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("sshd.py did not report {key}: {lines:?}"))
    };
    Some(Sshd {
        port: value("port").parse().unwrap(),
        user: value("user"),
        key: PathBuf::from(value("key")),
        known_hosts: PathBuf::from(value("known_hosts")),
        _server: server,
    })
}

#[test]
fn ssh_fetch_is_incremental() {
    let tmp = tempfile::tempdir().unwrap();
    // a space in the paths checks the quoting of the ssh command line
    let sshd_dir = tmp.path().join("ssh server");
    let Some(sshd) = start_sshd(&sshd_dir) else {
        return;
    };
    let (work, first) = fixture_repo(tmp.path());
    let bare = tmp.path().join("cfg.git");
    git(
        tmp.path(),
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().unwrap(),
            bare.to_str().unwrap(),
        ],
    );
    git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);

    let url = format!(
        "ssh://{}@127.0.0.1:{}{}",
        sshd.user,
        sshd.port,
        bare.display()
    );
    let source = SourceSpec {
        location: Location::parse(&url).unwrap(),
        branch: "main".into(),
        ssh: SshOptions {
            key: Some(sshd.key.clone()),
            known_hosts: Some(sshd.known_hosts.clone()),
        },
    };
    let mirror = tmp.path().join("mirror.git");
    let got = fetch(&source, &mirror).unwrap();
    assert_eq!(got.commit, first);
    check_fixture_snapshot(&read_tree_t(&got.repo, got.commit, "").unwrap());
    let packs_before = pack_indexes(&mirror);
    assert_eq!(packs_before.len(), 1);

    let second = commit_file(&work, "sub/top.txt", "changed\n", "second over ssh");
    git(&work, &["push", "-q", "origin", "main"]);
    let got2 = fetch(&source, &mirror).unwrap();
    assert_eq!(got2.commit, second);
    assert_eq!(got2.summary, "second over ssh");
    let new_packs: Vec<_> = pack_indexes(&mirror)
        .into_iter()
        .filter(|p| !packs_before.contains(p))
        .collect();
    assert_eq!(new_packs.len(), 1);
    // 4 new objects (commit, root tree, sub/ tree, blob), plus the delta
    // bases gix appends when it completes the thin pack: at most one each.
    let new_objects = objects_in_pack(&new_packs[0]);
    let full_pack_objects = objects_in_pack(&packs_before[0]);
    assert!(
        new_objects <= 8 && full_pack_objects > 30,
        "incremental fetch brought {new_objects} objects (full pack: {full_pack_objects})"
    );
    assert!(is_ancestor(&got2.repo, first, second).unwrap());
    let snap = read_tree_t(&got2.repo, second, "sub").unwrap();
    assert_eq!(file(&snap, "top.txt").0, b"changed\n");

    // open() with the same options works for later reads
    assert!(open(&source, &mirror).unwrap().has_object(second));
}

#[test]
fn ssh_refuses_an_unknown_host_key() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(sshd) = start_sshd(&tmp.path().join("sshd")) else {
        return;
    };
    let (work, _) = fixture_repo(tmp.path());
    let empty_known_hosts = tmp.path().join("known_hosts");
    std::fs::write(&empty_known_hosts, "").unwrap();
    let url = format!(
        "ssh://{}@127.0.0.1:{}{}",
        sshd.user,
        sshd.port,
        work.display()
    );
    let source = SourceSpec {
        location: Location::parse(&url).unwrap(),
        branch: "main".into(),
        ssh: SshOptions {
            key: Some(sshd.key.clone()),
            known_hosts: Some(empty_known_hosts),
        },
    };
    let mirror = tmp.path().join("mirror.git");
    let err = err_text(fetch(&source, &mirror).unwrap_err());
    assert!(err.contains(&url), "{err}");
    assert!(
        err.contains("ssh said: No ED25519 host key is known"),
        "{err}"
    );
    assert!(err.contains("Host key verification failed"), "{err}");
    assert!(err.contains("nothing has been fetched yet"), "{err}");
    // the mirror exists and is usable, just empty
    assert!(open(&source, &mirror).is_ok());
}

// ----------------------------------------------------------------- mirror

#[test]
fn unusable_mirror_directory_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mirror = tmp.path().join("mirror.git");
    std::fs::create_dir(&mirror).unwrap();
    std::fs::write(mirror.join("junk"), "x").unwrap();
    let url = format!("https://127.0.0.1:{}/cfg.git", closed_port());
    let err = err_text(fetch(&spec(Location::Remote(url), "main"), &mirror).unwrap_err());
    assert!(err.contains("not a usable mirror"), "{err}");
    assert!(err.contains("remove it"), "{err}");
}

#[test]
fn empty_mirror_directory_is_initialised() {
    install_tls_provider();
    let tmp = tempfile::tempdir().unwrap();
    let mirror = tmp.path().join("mirror.git");
    std::fs::create_dir(&mirror).unwrap();
    let url = format!("https://127.0.0.1:{}/cfg.git", closed_port());
    let source = spec(Location::Remote(url.clone()), "main");
    let err = err_text(fetch(&source, &mirror).unwrap_err());
    assert!(err.contains(&url), "{err}");
    assert!(mirror.join("HEAD").is_file());
    assert!(open(&source, &mirror).is_ok());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("mirror.git")]);
}

/// gix's error for a redirect it refuses quotes the original URL whole
/// (`http/redirect.rs`), password included, and a fetch error carried it
/// to the journal, the history and webhooks: `mirror::fetch` passes every
/// error through `redact_error`. (Reached only over https: over http gix
/// refuses to send a password at all, so the chain is made by hand here.)
#[test]
fn an_error_chain_that_quotes_the_source_url_loses_its_password() {
    let url = "https://bot:s3cret%21pw@git.example.org/cfg.git";
    let err = anyhow::anyhow!(
        "redirect from https://bot:s3cret!pw@git.example.org/cfg.git/info/refs to https://login.example.org/ is not allowed"
    )
    .context("cannot fetch refs/heads/main from https://bot:***@git.example.org/cfg.git");
    let text = format!("{:#}", redact_error(err, url));
    assert!(!text.contains("s3cret"), "leaked: {text}");
    assert!(
        text.contains("https://bot:***@git.example.org/cfg.git/info/refs"),
        "{text}"
    );
    // Without the password, the error is passed on as it was, chain and all.
    let err = anyhow::anyhow!("inner").context("outer");
    assert_eq!(redact_error(err, url).chain().count(), 2);
}

/// The bug this pins: gix's error for a URL it cannot parse quotes the
/// input, and `{:#}` printed it, password included, after the redacted
/// prefix.
#[test]
fn a_source_url_that_does_not_parse_is_named_without_its_password() {
    for url in [
        "https://bot:s3cret@git.example.org:99999/cfg.git",
        "ssh://bot:s3cret@[::1/cfg.git",
    ] {
        let err = format!("{:#}", location::parse(url).unwrap_err());
        assert!(err.contains("not a valid"), "{err}");
        assert!(!err.contains("s3cret"), "leaked: {err}");
    }
    // A short password only where it is one (after a `:`, before an `@`).
    assert_eq!(
        redact_in("x \"https://u:pw@h\" y pw", "https://u:pw@h"),
        "x \"https://u:***@h\" y pw"
    );
    assert_eq!(
        redact_in("x \"https://u:s3cret@h\" y s3cret", "https://u:s3cret@h"),
        "x \"https://u:***@h\" y ***"
    );
    // Written percent-encoded, quoted decoded (or the other way round).
    assert_eq!(
        redact_in(
            "a s3c@r!t b https://u:s3c%40r%21t@h",
            "https://u:s3c%40r%21t@h/x"
        ),
        "a *** b https://u:***@h"
    );
    assert_eq!(redact_in("no password", "https://u@h"), "no password");
}

#[test]
fn urls_with_passwords_are_redacted() {
    assert_eq!(
        redact("https://bot:s3cret@git.example.org/cfg.git"),
        "https://bot:***@git.example.org/cfg.git"
    );
    // Over http(s) a lone user name may be a token: hidden too.
    assert_eq!(redact("https://bot@host/x"), "https://***@host/x");
    assert_eq!(redact("git@host:x.git"), "git@host:x.git");
    assert_eq!(redact("ssh://git@host:22/x.git"), "ssh://git@host:22/x.git");
    assert_eq!(redact("https://host:8443/x.git"), "https://host:8443/x.git");
}

/// The bug: a password with an unencoded `/` (an invalid URL, but one a
/// user can write) ended the authority early, so `redact` and `redact_in`
/// found no password and the URL went into messages whole.
#[test]
fn a_password_with_an_unencoded_slash_is_still_redacted() {
    for (url, shown) in [
        ("https://bot:pa/ss@host/x.git", "https://bot:***@host/x.git"),
        ("https://bot:a/b?c#d@host/x", "https://bot:***@host/x"),
        ("https://bot:p/w@x@host/x", "https://bot:***@host/x"),
        // An `@` before the `/` (review): the well-formed reading finds a
        // password `p`, and `ss/word` went out.
        (
            "https://bot:p@ss/word@host/x.git",
            "https://bot:***@host/x.git",
        ),
    ] {
        assert_eq!(redact(url), shown);
        let said = redact_in(&format!("cannot fetch {url}: refused"), url);
        for part in ["pa/ss", "a/b?c#d", "p/w@x", "ss/word"] {
            assert!(!said.contains(part), "{said}");
        }
    }
    // Quoted alone (a library's message), percent-decoded or not.
    let url = "https://bot:s3cr%2Fet@host/x";
    assert_eq!(redact_in("auth s3cr/et failed", url), "auth *** failed");
    // Hiding errs on the side of too much for such a URL, never too little.
    assert_eq!(redact("https://host:8443/u/@me"), "https://host:***@me");
    assert_eq!(
        Location::Remote("https://u:p@h/x".into()).to_string(),
        "https://u:***@h/x"
    );
}

/// The bug: `https://<token>@github.com/...`, the usual way to clone over
/// https with a token, has no password, so nothing was hidden: the token
/// went into `status`, the daemon's STATUS= and fetch errors whole.
#[test]
fn a_token_used_as_the_user_name_is_redacted_over_https() {
    let token = "ghp_0123456789abcdefABCDEF0123456789abcd";
    let url = format!("https://{token}@github.com/org/cfg.git");
    assert_eq!(redact(&url), "https://***@github.com/org/cfg.git");
    let said = redact_in(
        &format!("cannot fetch {url}: 401; user {token} refused"),
        &url,
    );
    assert!(!said.contains(token), "{said}");
    // A short user name is hidden in the URL, not in the rest of the text.
    assert_eq!(
        redact_in(
            "deploy: cannot fetch https://deploy@h/x",
            "https://deploy@h/x"
        ),
        "deploy: cannot fetch https://***@h/x"
    );
    // Over ssh the user is `git`, not a secret: shown.
    assert_eq!(redact("ssh://git@host/x.git"), "ssh://git@host/x.git");
}

// ------------------------------------------------------------ tree_changes

/// The bug this guards against: comparing two commits' trees without
/// reading them whole (skipping equal subtrees, merging entries in git's
/// order, where `a/` sorts after `a.b`) must find exactly the changes that
/// comparing the two whole snapshots finds, or a sync would update too
/// little. 40 random commits over names chosen for git's ordering (a file
/// and a directory of one name, names that are prefixes of others), with
/// files written, rewritten, removed, made executable, turned into
/// symlinks and directories turned into files and back; every pair of
/// commits is compared both ways, on the whole tree and on a sub-path.
#[test]
fn tree_changes_finds_what_comparing_whole_snapshots_finds() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    let names = [
        "a",
        "a.b",
        "a-b",
        "a0",
        "a/x",
        "a/y/z",
        "ab",
        "b/c/d",
        "b/c.d",
        "b/c-d",
        "b/c/e/f",
        "sub/keep",
        "sub/a",
        "sub/a/b",
        "sub/a.b",
        "sub/dir/f",
        "sub/dir.x",
    ];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut commits = Vec::new();
    for round in 0..40 {
        for _ in 0..1 + next(4) {
            let name = names[next(names.len() as u64) as usize];
            let path = work.join(name);
            // Whatever is in the way (a file where a directory must go, a
            // directory where the file goes) is removed first.
            let mut p = path.clone();
            while p != work {
                if p.is_file() || p.is_symlink() {
                    std::fs::remove_file(&p).unwrap();
                }
                p.pop();
            }
            if path.is_dir() && !path.is_symlink() {
                std::fs::remove_dir_all(&path).unwrap();
            }
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            match next(5) {
                0 => {}
                1 => std::os::unix::fs::symlink(format!("t{}", next(3)), &path).unwrap(),
                k => {
                    std::fs::write(&path, format!("{}\n", next(3))).unwrap();
                    use std::os::unix::fs::PermissionsExt;
                    let mode = if k == 4 { 0o755 } else { 0o644 };
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
                }
            }
        }
        std::fs::create_dir_all(work.join("sub")).unwrap();
        if !work.join("sub/keep").is_file() {
            std::fs::write(work.join("sub/keep"), "keep\n").unwrap();
        }
        git(&work, &["add", "-A"]);
        git(
            &work,
            &[
                "commit",
                "-q",
                "--allow-empty",
                "-m",
                &format!("round {round}"),
            ],
        );
        commits.push(oid(&git(&work, &["rev-parse", "HEAD"])));
    }
    let repo = open_local_uncached(&work).unwrap();
    let mut compared = 0;
    let mut with_changes = 0;
    for sub in ["", "sub"] {
        let snaps: Vec<Snapshot> = commits
            .iter()
            .map(|c| read_tree_t(&repo, *c, sub).unwrap())
            .collect();
        for (i, a) in commits.iter().enumerate() {
            for (j, b) in commits.iter().enumerate() {
                let fast = tree_changes(&repo, *a, *b, sub).unwrap().changed;
                let whole = snaps[i].changes(&snaps[j]);
                assert_eq!(fast, whole, "commits {i} -> {j}, sub-path {sub:?}");
                compared += 1;
                with_changes += usize::from(!whole.is_empty());
            }
        }
    }
    assert_eq!(compared, 2 * 40 * 40);
    assert!(with_changes > 2000, "only {with_changes} pairs differ");
}

/// The bug this guards against: comparing trees recursed once per level,
/// so a commit nesting directories thousands deep (a hostile repository)
/// overflowed the stack and aborted the agent, on every poll. Past
/// `MAX_DEPTH` it is an error (the sync then reads the trees whole, which
/// does not recurse), and the whole read still works.
#[test]
fn a_tree_nested_deeper_than_the_comparison_follows_is_an_error_not_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let (work, before) = commit_files(tmp.path(), &[("top", b"1")]);
    let deep: std::path::PathBuf = std::iter::repeat_n("d", 300).collect();
    std::fs::create_dir_all(work.join(&deep)).unwrap();
    std::fs::write(work.join(&deep).join("f"), "x").unwrap();
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "deep"]);
    let after = oid(&git(&work, &["rev-parse", "HEAD"]));
    let repo = open_local_uncached(&work).unwrap();
    let err = tree_changes(&repo, before, after, "").unwrap_err();
    assert!(format!("{err:#}").contains("nested deeper"), "{err:#}");
    let snap = read_tree_t(&repo, after, "").unwrap();
    assert_eq!(snap.len(), 2);
}

/// Writes a tree object with exactly `entries` (mode, name, object id), in
/// the order given and unchecked, as only a hand-crafted (hostile) object
/// has them: `git hash-object --literally` skips git's own checks.
/// One raw tree entry: mode, name, object id.
type RawEntry<'a> = (&'a str, &'a [u8], &'a str);

fn raw_tree(work: &Path, entries: &[RawEntry<'_>]) -> String {
    use std::io::Write as _;
    let mut data = Vec::new();
    for (mode, name, id) in entries {
        data.extend_from_slice(mode.as_bytes());
        data.push(b' ');
        data.extend_from_slice(name);
        data.push(0);
        data.extend_from_slice(oid(id).as_bytes());
    }
    let mut child = git_cmd(work)
        .args(["hash-object", "-t", "tree", "-w", "--literally", "--stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run git hash-object");
    child.stdin.take().unwrap().write_all(&data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "git hash-object failed");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The bug this guards against: trees were trusted to be what git writes.
/// A hand-crafted commit (a hostile repository; `git fsck` refuses every
/// one of these, a fetch does not run it) could hold an entry named `..`,
/// `.`, `.git`, the empty name or a name with a `/` in it (so that
/// `roles/r/files/../role.toml` or `a/b` is one entry), a name twice, a
/// file and a directory of one name, or entries out of order: the whole
/// read took them as paths, the comparison of two commits refused only
/// some. Both now refuse each of them, naming the directory and the entry.
#[test]
fn a_hand_crafted_tree_with_bad_names_duplicates_or_disorder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (work, before) = commit_files(tmp.path(), &[("top", b"1")]);
    let blob = git(&work, &["rev-parse", "HEAD:top"]);
    let sub = raw_tree(&work, &[("100644", b"f", &blob)]);
    let cases: Vec<(&str, Vec<RawEntry<'_>>, &str)> = vec![
        ("dot-dot", vec![("100644", b"..", &blob)], "\"..\""),
        ("dot-dot tree", vec![("40000", b"..", &sub)], "\"..\""),
        ("dot", vec![("40000", b".", &sub)], "\".\""),
        ("empty", vec![("100644", b"", &blob)], "\"\""),
        ("slash", vec![("100644", b"a/b", &blob)], "\"a/b\""),
        ("dot-git", vec![("40000", b".git", &sub)], "\".git\""),
        ("dot-GIT", vec![("100644", b".GiT", &blob)], "\".GiT\""),
        (
            "twice",
            vec![("100644", b"a", &blob), ("100644", b"a", &blob)],
            "\"a\"",
        ),
        (
            "file and directory",
            vec![
                ("100644", b"a", &blob),
                ("100644", b"a.b", &blob),
                ("40000", b"a", &sub),
            ],
            "\"a\"",
        ),
        (
            "disorder",
            vec![("100644", b"b", &blob), ("100644", b"a", &blob)],
            "\"a\"",
        ),
    ];
    let repo_dir = work.clone();
    for (what, entries, named) in cases {
        // Each case one level down as well, so the error must name where.
        let bad = raw_tree(&work, &entries);
        let mid = raw_tree(&work, &[("40000", b"d", &bad), ("100644", b"top", &blob)]);
        let after = oid(&git(
            &work,
            &["commit-tree", &mid, "-p", &before.to_string(), "-m", what],
        ));
        let repo = open_local_uncached(&repo_dir).unwrap();
        let err = err_text(read_tree_t(&repo, after, "").unwrap_err());
        assert!(
            err.contains(named) && err.contains("d"),
            "{what}: read: {err}"
        );
        let err = err_text(tree_changes(&repo, before, after, "").unwrap_err());
        assert!(
            err.contains(named) && err.contains("directory d"),
            "{what}: changes: {err}"
        );
        let err = err_text(tree_changes(&repo, after, before, "").unwrap_err());
        assert!(err.contains(named), "{what}: changes back: {err}");
    }
    // A well-formed tree of such names is still read: `..x`, `.gitx`, `a.b`.
    let ok = raw_tree(
        &work,
        &[
            ("100644", b"..x", &blob),
            ("100644", b".gitx", &blob),
            ("100644", b"a.b", &blob),
        ],
    );
    let after = oid(&git(&work, &["commit-tree", &ok, "-m", "ok"]));
    let repo = open_local_uncached(&repo_dir).unwrap();
    assert_eq!(read_tree_t(&repo, after, "").unwrap().len(), 3);
    assert_eq!(
        tree_changes(&repo, before, after, "")
            .unwrap()
            .changed
            .len(),
        4
    );
}

/// The bug this guards against: a file's object was inflated whole before
/// its size was looked at, so a hostile commit holding a few compressed
/// kilobytes that inflate to gigabytes (zeros) got the agent killed for
/// memory instead of refused. Now an object larger than `max_file_size`
/// is refused by the size in its header, naming the file and the
/// setting; a symlink whose target is longer than a path likewise; the
/// other files still read.
#[test]
fn an_object_larger_than_max_file_size_is_refused_before_it_is_inflated() {
    let tmp = tempfile::tempdir().unwrap();
    // 4 MiB of zeros: 4 KiB compressed.
    let zeros = vec![0u8; 4 << 20];
    let (work, head) = commit_files(tmp.path(), &[("small", b"ok"), ("bomb", &zeros)]);
    let repo = open_local_uncached(&work).unwrap();
    let snap = read_tree(&repo, head, "", 1 << 20).unwrap();
    assert_eq!(snap.read("small").unwrap(), Some(&b"ok"[..]));
    let err = err_text(snap.read("bomb").unwrap_err());
    assert!(
        err.contains("bomb")
            && err.contains("4194304 bytes")
            && err.contains("1 MiB, max_file_size"),
        "{err}"
    );
    // At the limit it reads.
    let snap = read_tree(&repo, head, "", 4 << 20).unwrap();
    assert_eq!(snap.read("bomb").unwrap().map(<[u8]>::len), Some(4 << 20));
    // The same once the objects are packed: loose objects are read by
    // driftless's own reader, packed ones by gix's, and both refuse.
    git(&work, &["gc", "-q"]);
    assert!(
        std::fs::read_dir(work.join(".git/objects"))
            .unwrap()
            .all(|e| {
                let name = e.unwrap().file_name();
                name.len() != 2 || name == "pack" || name == "info"
            }),
        "git gc left loose objects"
    );
    let repo = open_local_uncached(&work).unwrap();
    let snap = read_tree(&repo, head, "", 1 << 20).unwrap();
    assert_eq!(snap.read("small").unwrap(), Some(&b"ok"[..]));
    let err = err_text(snap.read("bomb").unwrap_err());
    assert!(
        err.contains("bomb") && err.contains("4194304 bytes"),
        "{err}"
    );
    let snap = read_tree(&repo, head, "", 4 << 20).unwrap();
    assert_eq!(snap.read("bomb").unwrap().map(<[u8]>::len), Some(4 << 20));

    // A symlink's target is a blob too: one longer than a path is refused.
    let long = "x".repeat(5000);
    let blob = {
        let f = tmp.path().join("target");
        std::fs::write(&f, &long).unwrap();
        git(&work, &["hash-object", "-w", f.to_str().unwrap()])
    };
    git(
        &work,
        &[
            "update-index",
            "--add",
            "--cacheinfo",
            &format!("120000,{blob},link"),
        ],
    );
    git(&work, &["commit", "-q", "-m", "long link"]);
    let head = oid(&git(&work, &["rev-parse", "HEAD"]));
    let err = err_text(read_tree(&repo, head, "", 1 << 20).unwrap_err());
    assert!(
        err.contains("symlink link") && err.contains("5000 bytes"),
        "{err}"
    );
}

/// A loose object's file is part of the repository, which is untrusted,
/// and driftless reads plain loose files itself (`blobs.rs`): one
/// replaced by a FIFO must not make that read wait for a writer, and one
/// replaced by a link reads as gix reads it (gix follows the link). The
/// other files still read, from several threads at once, loose and then
/// packed (each reader has a repository handle of its own).
#[test]
fn a_loose_object_that_is_a_fifo_or_a_link_reads_as_gix_reads_it() {
    let tmp = tempfile::tempdir().unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| (format!("f{i}"), format!("content {i}").into_bytes()))
        .collect();
    let mut all: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, c)| (n.as_str(), c.as_slice()))
        .collect();
    all.push(("fifo", b"will be a fifo"));
    all.push(("link", b"will be a link"));
    let (work, head) = commit_files(tmp.path(), &all);
    let object = |name: &str| {
        let hex = git(&work, &["rev-parse", &format!("HEAD:{name}")]);
        work.join(".git/objects").join(&hex[..2]).join(&hex[2..])
    };
    let fifo = object("fifo");
    let fifo_was = std::fs::read(&fifo).unwrap();
    std::fs::remove_file(&fifo).unwrap();
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let link = object("link");
    let link_was = std::fs::read(&link).unwrap();
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(object("f0"), &link).unwrap();

    let read_all = |snap: &Snapshot| {
        std::thread::scope(|scope| {
            for half in [0, 1] {
                let snap = snap.clone();
                let files = &files;
                scope.spawn(move || {
                    for (name, content) in files.iter().skip(half).step_by(2) {
                        assert_eq!(snap.read(name).unwrap(), Some(&content[..]), "{name}");
                    }
                });
            }
        });
    };
    let repo = open_local_uncached(&work).unwrap();
    let snap = read_tree_t(&repo, head, "").unwrap();
    let err = err_text(snap.read("fifo").unwrap_err());
    assert!(
        err.contains("cannot read fifo") && err.contains("could not be found"),
        "{err}"
    );
    assert_eq!(snap.read("link").unwrap(), Some(&b"content 0"[..]));
    read_all(&snap);

    for (path, was) in [(&fifo, fifo_was), (&link, link_was)] {
        std::fs::remove_file(path).unwrap();
        std::fs::write(path, was).unwrap();
    }
    git(&work, &["gc", "-q", "--prune=now"]);
    let repo = open_local_uncached(&work).unwrap();
    let snap = read_tree_t(&repo, head, "").unwrap();
    read_all(&snap);
}

/// gix applies `refs/replace/` to every object it reads; the loose
/// reader does not, so a repository with replace refs is read by gix
/// alone. Before, a replaced blob read as the replacement while packed
/// and as the original while loose.
#[test]
fn a_replaced_blob_reads_as_its_replacement_loose_or_packed() {
    let tmp = tempfile::tempdir().unwrap();
    let (work, head) = commit_files(tmp.path(), &[("a", b"original"), ("b", b"replacement")]);
    let a = git(&work, &["rev-parse", "HEAD:a"]);
    let b = git(&work, &["rev-parse", "HEAD:b"]);
    git(&work, &["replace", &a, &b]);
    let repo = open_local_uncached(&work).unwrap();
    let snap = read_tree_t(&repo, head, "").unwrap();
    assert_eq!(snap.read("a").unwrap(), Some(&b"replacement"[..]));
    git(&work, &["gc", "-q"]);
    let repo = open_local_uncached(&work).unwrap();
    let snap = read_tree_t(&repo, head, "").unwrap();
    assert_eq!(snap.read("a").unwrap(), Some(&b"replacement"[..]));
}

/// The bug this guards against: a tree object was inflated before its
/// size was looked at. A loose object whose header claims a tree of a
/// gigabyte (its id is the hash of exactly those bytes, so it is a valid
/// object id) is refused by that header, before anything is inflated,
/// by the whole read and by the comparison.
#[test]
fn a_tree_whose_header_claims_a_gigabyte_is_refused_before_it_is_inflated() {
    let tmp = tempfile::tempdir().unwrap();
    let (work, before) = commit_files(tmp.path(), &[("top", b"1")]);
    // The object written by hand: zlib("tree 1000000000\0" + one entry).
    let script = r#"
import hashlib, os, sys, zlib
blob = bytes.fromhex(sys.argv[2])
raw = b"tree 1000000000\0" + b"100644 f\0" + blob
oid = hashlib.sha1(raw).hexdigest()
d = os.path.join(sys.argv[1], ".git", "objects", oid[:2])
os.makedirs(d, exist_ok=True)
open(os.path.join(d, oid[2:]), "wb").write(zlib.compress(raw))
print(oid)
"#;
    let blob = git(&work, &["rev-parse", "HEAD:top"]);
    let out = Command::new("python3")
        .args(["-c", script, work.to_str().unwrap(), &blob])
        .output()
        .expect("python3 runs (apt install python3)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let big = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let top = raw_tree(&work, &[("40000", b"d", &big), ("100644", b"top", &blob)]);
    let after = oid(&git(
        &work,
        &["commit-tree", &top, "-p", &before.to_string(), "-m", "big"],
    ));
    let repo = open_local_uncached(&work).unwrap();
    let err = err_text(read_tree_t(&repo, after, "").unwrap_err());
    assert!(
        err.contains("directory d") && err.contains("1000000000 bytes"),
        "{err}"
    );
    let err = err_text(tree_changes(&repo, before, after, "").unwrap_err());
    assert!(
        err.contains("\"d\"") && err.contains("1000000000 bytes"),
        "{err}"
    );
}

/// A commit of more files than a snapshot holds is refused with the
/// count and the remedy, not read into memory without end (the limit is
/// 1,000,000; here a small one stands in for it); at the limit it reads.
#[test]
fn a_commit_of_more_files_than_a_snapshot_holds_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (work, head) = fixture_repo(tmp.path());
    let repo = open_local_uncached(&work).unwrap();
    let all = read_tree_t(&repo, head, "").unwrap().len();
    assert!(all > 2, "{all}");
    let max = crate::desired::guard::Limits::default().file;
    let snap = super::tree::read_at_most(&repo, head, "", max, all).unwrap();
    assert_eq!(snap.len(), all);
    let err = err_text(super::tree::read_at_most(&repo, head, "", max, all - 1).unwrap_err());
    assert!(
        err.contains(&format!("more than {} files below /", all - 1)) && err.contains("set `path`"),
        "{err}"
    );
}

/// A tree read as it is used answers every question exactly as the same
/// tree read whole: each entry (files, executables, links, at every
/// depth and below a sub-path), each walk, what is not an entry (a
/// directory, a path through a file, a name no tree has), and the whole
/// snapshot once something asks for all of it.
#[test]
fn a_tree_read_lazily_answers_as_the_tree_read_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let (work, first) = fixture_repo(tmp.path());
    // A second commit, read lazily starting from the trees that comparing
    // it with the first read (a file changed two directories down).
    let second = commit_file(&work, "sub/dir/seeded.txt", "new\n", "second");
    let repo = open(&spec(Location::Local(work), "main"), tmp.path()).unwrap();
    let max = crate::desired::guard::Limits::default().file;
    let walked = |s: &Snapshot, dir: &str| {
        s.walk(dir)
            .map(|(k, e)| (k.to_string(), e.clone()))
            .collect::<Vec<_>>()
    };
    for (sub, head) in [("", first), ("sub", first), ("", second), ("sub", second)] {
        let known = match head == second {
            true => tree_changes(&repo, first, second, sub).unwrap().trees,
            false => Vec::new(),
        };
        // The top (or `sub`), `sub` and `sub/dir` of the second commit.
        assert_eq!(
            known.len(),
            if head == second { 3 - sub.len() / 3 } else { 0 }
        );
        let whole = read_tree_t(&repo, head, sub).unwrap();
        let lazy = read_tree_lazily(&repo, head, sub, max, known).unwrap();
        assert!(lazy.is_partly_read());
        let paths: Vec<String> = whole.walk("").map(|(p, _)| p.to_string()).collect();
        for p in &paths {
            assert_eq!(lazy.entry(p), whole.entry(p), "{sub:?} {p}");
            assert_eq!(lazy.read(p).unwrap(), whole.read(p).unwrap(), "{sub:?} {p}");
        }
        for p in [
            "",
            "bin",
            "sub",
            "sub/dir",
            "many",
            "nope",
            "README/x",
            "sub//top.txt",
            "dir/../top.txt",
        ] {
            assert_eq!(lazy.entry(p), whole.entry(p), "{sub:?} {p:?}");
            if !p.is_empty() {
                assert_eq!(walked(&lazy, p), walked(&whole, p), "walk {sub:?} {p:?}");
            }
        }
        assert!(
            lazy.is_partly_read(),
            "a lookup or a walk of a directory read the whole tree"
        );
        assert_eq!(lazy.failure(), None);
        // A walk of everything reads it all, once.
        assert_eq!(walked(&lazy, ""), walked(&whole, ""), "walk {sub:?}");
        assert!(!lazy.is_partly_read());
        assert_eq!(lazy.len(), whole.len());
        assert_eq!(lazy.has_symlinks(), whole.has_symlinks());
        assert!(!lazy.is_partly_read());
        assert!(lazy == whole);
    }
}

/// A lazy read that fails (an object gone from the store) is no answer:
/// the entry reads as missing and the snapshot says why, so that what was
/// made from it is not used (the sync reads the tree whole instead).
#[test]
fn a_lazy_read_that_fails_is_kept_as_the_snapshots_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let (work, head) = fixture_repo(tmp.path());
    let repo = open(&spec(Location::Local(work.clone()), "main"), tmp.path()).unwrap();
    let lazy = read_tree_lazily(
        &repo,
        head,
        "",
        crate::desired::guard::Limits::default().file,
        Vec::new(),
    )
    .unwrap();
    // The tree of `sub/dir`, removed after the snapshot was made.
    let dir_tree = git(&work, &["rev-parse", "HEAD:sub/dir"]);
    let loose = repo
        .objects
        .store_ref()
        .path()
        .join(&dir_tree[..2])
        .join(&dir_tree[2..]);
    std::fs::remove_file(&loose).unwrap();
    assert_eq!(lazy.entry("sub/dir/conf.toml"), None);
    let why = lazy.failure().expect("a failure");
    assert!(why.contains("sub/dir"), "{why}");
    assert_eq!(
        lazy.entry("README").map(Entry::kind),
        Some(crate::desired::snapshot::Kind::File)
    );
}
