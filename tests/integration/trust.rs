//! Trust and air-gap: signed commits (`require_signed`), the anti-rollback
//! floor surviving a wiped state dir, signed bundles (create, verify,
//! import, every bad-input case) and the USB stick flow with reports.
//! Commits are signed by the real `git` (`gpg.format=ssh`); bundles are
//! made by `driftless bundle create` (which runs the real `git bundle`)
//! and checked with `git bundle verify`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;

/// A signing key made by ssh-keygen, and an allowed_signers file.
pub struct Signer {
    dir: tempfile::TempDir,
}

impl Signer {
    pub fn new(principal: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", principal, "-f"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pubkey = std::fs::read_to_string(dir.path().join("key.pub")).unwrap();
        std::fs::write(
            dir.path().join("allowed_signers"),
            format!("{principal} {}", pubkey.trim()),
        )
        .unwrap();
        Signer { dir }
    }
    pub fn key(&self) -> PathBuf {
        self.dir.path().join("key")
    }
    pub fn allowed(&self) -> PathBuf {
        self.dir.path().join("allowed_signers")
    }
}

pub fn signed_commit(repo: &Repo, signer: &Signer, msg: &str) -> String {
    git(repo.path(), &["add", "-A"]);
    git(
        repo.path(),
        &[
            "-c",
            "gpg.format=ssh",
            "-c",
            &format!("user.signingkey={}", signer.key().display()),
            "commit",
            "-q",
            "-S",
            "--allow-empty",
            "-m",
            msg,
        ],
    );
    repo.head()
}

pub fn app_repo(signer: &Signer, content: &str) -> Repo {
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"app\"]\n");
    r.write("hosts/default.toml", "");
    r.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/app.conf\"\nsource = \"app.conf\"\n",
    );
    r.write("roles/app/files/app.conf", content);
    signed_commit(&r, signer, "v1");
    r
}

fn trusted<'a>(signer: &'a Signer, extra: &[&'a str]) -> Vec<String> {
    let mut v = vec![
        "--allowed-signers".to_string(),
        signer.allowed().display().to_string(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// The report host web1 wrote onto the stick at `stick`.
fn web1_report(stick: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(stick.join("driftless/reports/web1.json")).unwrap())
        .unwrap()
}

pub fn run_with(host: &Host, source: &Path, args: &[&str], signer: &Signer) -> Run {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    // `status` and `history` read no repository: no trust flags.
    if !matches!(args.first(), Some(&"status" | &"history")) {
        all.extend(trusted(signer, &[]));
    }
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    host.run(source, &refs)
}

#[test]
fn require_signed_applies_signed_commits_and_refuses_an_unsigned_one() {
    let signer = Signer::new("release@example.com");
    let repo = app_repo(&signer, "one\n");
    let host = Host::new("h");
    run_with(
        &host,
        repo.path(),
        &["sync", "--once", "--require-signed"],
        &signer,
    )
    .ok();
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("one\n"));

    repo.write("roles/app/files/app.conf", "two (unsigned)\n");
    let unsigned = repo.commit("sneaky");
    let run = run_with(
        &host,
        repo.path(),
        &["sync", "--once", "--require-signed"],
        &signer,
    )
    .code(4);
    assert!(run.stderr.contains("not signed"), "{}", run.stderr);
    assert!(run.stderr.contains(&unsigned[..7]), "{}", run.stderr);
    assert_eq!(
        host.read("/etc/app.conf").as_deref(),
        Some("one\n"),
        "nothing applied"
    );
    let status = run_with(&host, repo.path(), &["status", "--format", "json"], &signer).ok();
    assert!(
        status.stdout.contains("not signed"),
        "status says why: {}",
        status.stdout
    );

    // Signing on top does not launder the unsigned commit in between
    // (every-commit policy); the tip policy accepts it.
    repo.write("roles/app/files/app.conf", "three\n");
    signed_commit(&repo, &signer, "signed on top");
    run_with(
        &host,
        repo.path(),
        &["sync", "--once", "--require-signed"],
        &signer,
    )
    .code(4);
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("one\n"));
    let tip_only = tempfile::tempdir().unwrap();
    let cfg = tip_only.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "require_signed = true\nsignature_policy = \"tip\"\nallowed_signers = {:?}\n",
            signer.allowed().display().to_string()
        ),
    )
    .unwrap();
    // Host::cmd passes --no-config, which conflicts with --config.
    let args: Vec<_> = host
        .cmd(repo.path(), &["sync", "--once"])
        .get_args()
        .filter(|a| *a != "--no-config")
        .map(|a| a.to_owned())
        .collect();
    let out = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("three\n"));
}

#[test]
fn require_signed_refuses_a_commit_signed_by_an_unknown_key() {
    let signer = Signer::new("release@example.com");
    let stranger = Signer::new("mallory@example.com");
    let repo = app_repo(&stranger, "evil\n");
    let host = Host::new("h");
    let run = run_with(
        &host,
        repo.path(),
        &["sync", "--once", "--require-signed"],
        &signer,
    )
    .code(4);
    assert!(run.stderr.contains("allowed_signers"), "{}", run.stderr);
    assert!(host.read("/etc/app.conf").is_none(), "nothing applied");
}

#[test]
fn require_signed_without_a_signers_file_is_a_config_error() {
    let signer = Signer::new("release@example.com");
    let repo = app_repo(&signer, "one\n");
    let host = Host::new("h");
    let run = host
        .run(
            repo.path(),
            &[
                "sync",
                "--once",
                "--require-signed",
                "--allowed-signers",
                "/nonexistent/signers",
            ],
        )
        .code(78);
    assert!(
        run.stderr.contains("/nonexistent/signers"),
        "{}",
        run.stderr
    );
}

#[test]
fn anti_rollback_survives_a_wiped_state_dir() {
    let signer = Signer::new("release@example.com");
    let repo = app_repo(&signer, "one\n");
    let old = repo.head();
    let host = Host::new("h");
    host.sync(repo.path()).ok();
    repo.write("roles/app/files/app.conf", "two\n");
    signed_commit(&repo, &signer, "v2");
    host.sync(repo.path()).ok();
    let floor = host
        .read("/etc/driftless/applied-commit.json")
        .expect("floor recorded in the root");
    assert!(floor.contains(&repo.head()), "{floor}");

    // The server goes back to the old (validly signed) commit, and the
    // state directory is wiped: still refused.
    git(repo.path(), &["reset", "-q", "--hard", &old]);
    std::fs::remove_dir_all(host.state.path()).unwrap();
    let run = host.sync(repo.path()).code(4);
    assert!(run.stderr.contains("older than"), "{}", run.stderr);
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("two\n"));

    // The operator can still go back on purpose.
    host.run(repo.path(), &["sync", "--once", "--allow-non-fast-forward"])
        .ok();
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("one\n"));
}

/// Runs `driftless bundle create`.
pub fn create_bundle(repo: &Repo, out: &Path, signer: &Signer, since: Option<&str>) -> Run {
    let mut c = Command::new(BIN);
    c.args(["bundle", "create", "--repo"])
        .arg(repo.path())
        .arg("--out")
        .arg(out)
        .arg("--sign-key")
        .arg(signer.key());
    if let Some(s) = since {
        c.args(["--since", s]);
    }
    let out = c.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn bundles() -> &'static Path {
    Path::new("bundle:")
}

pub fn import(host: &Host, signer: &Signer, files: &[&Path]) -> Run {
    let mut args = vec!["bundle".to_string(), "import".to_string()];
    args.extend(files.iter().map(|f| f.display().to_string()));
    run_with(
        host,
        bundles(),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        signer,
    )
}

#[test]
fn bundles_full_then_incremental_reach_an_air_gapped_host() {
    let signer = Signer::new("release@example.com");
    let repo = app_repo(&signer, "one\n");
    let c1 = repo.head();
    let out = tempfile::tempdir().unwrap();
    let full = out.path().join("full.bundle");
    create_bundle(&repo, &full, &signer, None).ok();
    // The real git accepts it.
    git(
        repo.path(),
        &["bundle", "verify", "-q", full.to_str().unwrap()],
    );

    let host = Host::new("h");
    let v = run_with(
        &host,
        bundles(),
        &["bundle", "verify", full.to_str().unwrap()],
        &signer,
    )
    .ok();
    assert!(
        v.stdout.contains("good signature by release@example.com"),
        "{}",
        v.stdout
    );
    import(&host, &signer, &[&full]).ok();
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("one\n"));

    repo.write("roles/app/files/app.conf", "two\n");
    signed_commit(&repo, &signer, "v2");
    let inc = out.path().join("inc.bundle");
    create_bundle(&repo, &inc, &signer, Some(&c1)).ok();
    assert!(
        std::fs::metadata(&inc).unwrap().len() < std::fs::metadata(&full).unwrap().len(),
        "incremental bundles carry only new objects"
    );
    import(&host, &signer, &[&inc]).ok();
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("two\n"));

    // A sync with no network and no new bundle is a no-op.
    let again = run_with(&host, bundles(), &["sync", "--once"], &signer).ok();
    assert!(again.stdout.contains("already applied"), "{}", again.stdout);

    // Signed-commit policy applies to bundled commits as to fetched ones.
    repo.write("roles/app/files/app.conf", "three (unsigned)\n");
    let c3 = repo.commit("unsigned");
    let inc2 = out.path().join("inc2.bundle");
    create_bundle(
        &repo,
        &inc2,
        &signer,
        Some(&git(repo.path(), &["rev-parse", "HEAD~1"])),
    )
    .ok();
    let run = run_with(
        &host,
        bundles(),
        &[
            "bundle",
            "import",
            inc2.to_str().unwrap(),
            "--require-signed",
        ],
        &signer,
    )
    .code(4);
    assert!(
        run.stderr.contains("not signed") && run.stderr.contains(&c3[..7]),
        "{}",
        run.stderr
    );
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("two\n"));
}

#[test]
fn bad_bundles_are_refused_with_a_reason_and_change_nothing() {
    let signer = Signer::new("release@example.com");
    let stranger = Signer::new("mallory@example.com");
    let repo = app_repo(&signer, "one\n");
    let c1 = repo.head();
    let out = tempfile::tempdir().unwrap();
    let full1 = out.path().join("v1.bundle");
    create_bundle(&repo, &full1, &signer, None).ok();
    repo.write("roles/app/files/app.conf", "two\n");
    signed_commit(&repo, &signer, "v2");
    let inc = out.path().join("inc.bundle");
    create_bundle(&repo, &inc, &signer, Some(&c1)).ok();
    let full2 = out.path().join("v2.bundle");
    create_bundle(&repo, &full2, &signer, None).ok();

    let host = Host::new("h");
    // Missing prerequisites: the message says which --since to use.
    let run = import(&host, &signer, &[&inc]).code(4);
    assert!(
        run.stderr.contains("needs") && run.stderr.contains("full bundle"),
        "{}",
        run.stderr
    );
    assert!(host.read("/etc/app.conf").is_none());

    // Signed by a key that is not trusted.
    let evil = out.path().join("evil.bundle");
    create_bundle(&repo, &evil, &stranger, None).ok();
    let run = import(&host, &signer, &[&evil]).code(4);
    assert!(
        run.stderr.contains("allowed_signers") || run.stderr.contains("not allowed"),
        "{}",
        run.stderr
    );
    assert!(host.read("/etc/app.conf").is_none());

    // Truncated on the way.
    let cut = out.path().join("cut.bundle");
    let bytes = std::fs::read(&full2).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    for ext in [".manifest", ".manifest.sig"] {
        std::fs::copy(
            format!("{}{ext}", full2.display()),
            format!("{}{ext}", cut.display()),
        )
        .unwrap();
    }
    let run = import(&host, &signer, &[&cut]).code(4);
    assert!(
        run.stderr.contains("does not match its signed manifest"),
        "{}",
        run.stderr
    );
    assert!(host.read("/etc/app.conf").is_none());

    // Padded past the size its (genuine, old) manifest signs: refused
    // before a byte of it is copied into the state directory.
    let padded = out.path().join("padded.bundle");
    let mut bytes = std::fs::read(&full2).unwrap();
    bytes.resize(bytes.len() + (4 << 20), 0);
    std::fs::write(&padded, &bytes).unwrap();
    for ext in [".manifest", ".manifest.sig"] {
        std::fs::copy(
            format!("{}{ext}", full2.display()),
            format!("{}{ext}", padded.display()),
        )
        .unwrap();
    }
    let run = import(&host, &signer, &[&padded]).code(4);
    assert!(
        run.stderr.contains("does not match its signed manifest")
            && run.stderr.contains("refused unread"),
        "{}",
        run.stderr
    );
    let incoming = host.state.path().join("incoming");
    let staged: Vec<_> = std::fs::read_dir(&incoming)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(staged.is_empty(), "left in incoming/: {staged:?}");
    assert!(host.read("/etc/app.conf").is_none());

    // Apply v2, then offer the older v1: refused as a downgrade.
    import(&host, &signer, &[&full2]).ok();
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("two\n"));
    let run = import(&host, &signer, &[&full1]).code(4);
    assert!(run.stderr.contains("older than"), "{}", run.stderr);
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("two\n"));

    // A bundle of another branch.
    git(repo.path(), &["checkout", "-q", "-b", "other"]);
    let other = out.path().join("other.bundle");
    let mut c = Command::new(BIN);
    c.args(["bundle", "create", "--branch", "other", "--repo"])
        .arg(repo.path())
        .arg("--out")
        .arg(&other)
        .arg("--sign-key")
        .arg(signer.key());
    assert!(c.output().unwrap().status.success());
    let run = import(&host, &signer, &[&other]).code(4);
    assert!(
        run.stderr.contains("refs/heads/other") && run.stderr.contains("follows refs/heads/main"),
        "{}",
        run.stderr
    );
}

/// Rewrites `bundle`'s manifest with `edit` and signs it again with
/// `signer`: a manifest the signature vouches for, saying what the test
/// wants it to say.
fn resign_manifest(bundle: &Path, signer: &Signer, edit: impl FnOnce(&mut serde_json::Value)) {
    let mpath = PathBuf::from(format!("{}.manifest", bundle.display()));
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(&mpath, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    std::fs::remove_file(format!("{}.sig", mpath.display())).unwrap();
    let st = Command::new("ssh-keygen")
        .args(["-q", "-Y", "sign", "-n", "driftless-bundle", "-f"])
        .arg(signer.key())
        .arg(&mpath)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
}

/// Signed manifests that do not describe their bundle, or are not
/// manifests this driftless reads, are each refused with their reason,
/// and nothing is imported or applied: a tip or prerequisites other than
/// the bundle's header, an unknown field, another format, and a manifest
/// too large to be one (refused unread). (`bundle import` syncs what it
/// imports: nothing applied is nothing imported.)
#[test]
fn signed_manifests_that_do_not_describe_their_bundle_are_refused() {
    let signer = Signer::new("release@example.com");
    let repo = app_repo(&signer, "one\n");
    let c1 = repo.head();
    repo.write("roles/app/files/app.conf", "two\n");
    signed_commit(&repo, &signer, "v2");
    let out = tempfile::tempdir().unwrap();
    type Edit<'a> = &'a dyn Fn(&mut serde_json::Value);
    let cases: [(&str, Edit, &str); 5] = [
        (
            "tip",
            &|m| m["tip"] = c1.clone().into(),
            "refusing an inconsistent bundle",
        ),
        (
            "prerequisites",
            &|m| m["prerequisites"] = serde_json::json!([c1.clone()]),
            "prerequisites differ from its manifest's",
        ),
        (
            "unknown",
            &|m| m["steer"] = "x".into(),
            "is not a driftless bundle manifest",
        ),
        (
            "format",
            &|m| m["format"] = "driftless-bundle/99".into(),
            "is not supported",
        ),
        (
            "large",
            &|m| m["source"] = "x".repeat(70_000).into(),
            "larger than 65536 bytes",
        ),
    ];
    let host = Host::new("h");
    for (name, edit, want) in cases {
        let b = out.path().join(format!("{name}.bundle"));
        create_bundle(&repo, &b, &signer, None).ok();
        resign_manifest(&b, &signer, edit);
        let run = import(&host, &signer, &[&b]).code(4);
        assert!(run.stderr.contains(want), "{name}: {}", run.stderr);
        assert!(host.read("/etc/app.conf").is_none(), "{name}: applied");
    }
}

#[test]
fn a_pack_that_fails_to_index_is_refused_even_when_the_manifest_is_signed() {
    let signer = Signer::new("release@example.com");
    let repo = app_repo(&signer, "one\n");
    let out = tempfile::tempdir().unwrap();
    let b = out.path().join("b.bundle");
    create_bundle(&repo, &b, &signer, None).ok();
    // Damage the pack, then re-sign a manifest that matches the damaged
    // bytes: the signature is fine, the pack is not.
    let mut bytes = std::fs::read(&b).unwrap();
    let n = bytes.len();
    bytes[n - 30] ^= 0xff;
    std::fs::write(&b, &bytes).unwrap();
    resign_manifest(&b, &signer, |m| {
        use sha2::Digest;
        m["bundle_sha256"] = hex::encode(sha2::Sha256::digest(&bytes)).into();
    });

    let host = Host::new("h");
    let v = run_with(
        &host,
        bundles(),
        &["bundle", "verify", b.to_str().unwrap()],
        &signer,
    )
    .ok();
    assert!(
        v.stdout.contains("good signature"),
        "the signature itself is valid: {}",
        v.stdout
    );
    let run = import(&host, &signer, &[&b]).code(4);
    assert!(run.stderr.contains("cannot be indexed"), "{}", run.stderr);
    assert!(host.read("/etc/app.conf").is_none());
}

/// The bug this pins: a stick of thousands of junk `*.bundle` files (anyone
/// can plug one in) had every one verified and each refusal written to the
/// history, pushing the host's real history out of its bounded file. Over
/// `MAX_BUNDLES` (128) the stick is refused whole, in one line of history,
/// with its report; and a staged copy an interrupted import left in
/// `incoming/` (a stick pulled mid-import) is removed by the next import.
#[test]
fn a_stick_flooded_with_bundle_files_is_refused_whole_and_stale_copies_go() {
    let signer = Signer::new("release@example.com");
    let stick = tempfile::tempdir().unwrap();
    let dir = stick.path().join("driftless/bundles");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..129 {
        std::fs::write(dir.join(format!("junk-{i:03}.bundle")), "not a bundle").unwrap();
    }
    let host = Host::new("web1");
    let incoming = host.state.path().join("incoming");
    std::fs::create_dir_all(&incoming).unwrap();
    std::fs::write(incoming.join("import-999999.bundle"), vec![0u8; 1 << 20]).unwrap();
    let history = |host: &Host| {
        std::fs::read_to_string(host.state.path().join("history.jsonl"))
            .map(|h| h.lines().count())
            .unwrap_or(0)
    };
    let run = run_with(
        &host,
        bundles(),
        &["bundle", "stick", stick.path().to_str().unwrap()],
        &signer,
    )
    .code(4);
    assert!(
        run.stderr
            .contains("129 bundles offered at once, more than 128"),
        "{}",
        run.stderr
    );
    assert!(history(&host) <= 1, "{} lines of history", history(&host));
    let report: serde_json::Value = web1_report(stick.path());
    assert_eq!(report["outcome"], "refused", "{report}");
    assert!(host.read("/etc/app.conf").is_none());

    // Within the limit, the stale staged copy is cleaned up.
    std::fs::remove_file(dir.join("junk-000.bundle")).unwrap();
    run_with(
        &host,
        bundles(),
        &["bundle", "stick", stick.path().to_str().unwrap()],
        &signer,
    )
    .code(4);
    let left: Vec<_> = std::fs::read_dir(&incoming)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left in incoming/: {left:?}");
}

/// The stick pulled out (SIGTERM, through the unit's `BindsTo=`) after
/// the import, before the sync's transaction: the run stops at once, and
/// the next run applies what was imported.
#[test]
fn sigterm_after_a_sticks_import_stops_it_and_the_next_run_applies_the_import() {
    let signer = Signer::new("release@example.com");
    let repo = app_repo(&signer, "from the stick\n");
    let stick = tempfile::tempdir().unwrap();
    let dir = stick.path().join("driftless/bundles");
    std::fs::create_dir_all(&dir).unwrap();
    create_bundle(&repo, &dir.join("site.bundle"), &signer, None).ok();
    let host = Host::new("web1");
    let mut args: Vec<String> = ["bundle", "stick", stick.path().to_str().unwrap()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(trusted(&signer, &[]));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = host
        .cmd(bundles(), &args)
        .env("DRIFTLESS_TEST_FAILPOINT", "stick.imported:term")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGTERM), "{stderr}");
    assert!(
        host.read("/etc/app.conf").is_none(),
        "applied after SIGTERM"
    );
    // What was imported is applied by the next run, from the mirror.
    run_with(&host, bundles(), &["sync", "--once"], &signer).ok();
    assert_eq!(
        host.read("/etc/app.conf").as_deref(),
        Some("from the stick\n")
    );
}

/// Review: a stick whose head is marked bad on the host (it failed its
/// checks there once) reported that head as the host's commit, though the
/// host stays on the commit before it.
#[test]
fn a_stick_whose_head_is_marked_bad_reports_the_commit_the_host_stays_on() {
    let signer = Signer::new("release@example.com");
    let repo = app_repo(&signer, "one\n");
    let c1 = repo.head();
    let stick = tempfile::tempdir().unwrap();
    let dir = stick.path().join("driftless/bundles");
    std::fs::create_dir_all(&dir).unwrap();
    create_bundle(&repo, &dir.join("site.bundle"), &signer, None).ok();
    let host = Host::new("web1");
    let args = [
        "bundle",
        "stick",
        stick.path().to_str().unwrap(),
        "--run-checks",
    ];
    run_with(&host, bundles(), &args, &signer).ok();
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("one\n"));

    // v2 fails its check here: reverted, and marked bad.
    repo.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/app.conf\"\nsource = \"app.conf\"\n\n\
         [[checks]]\nname = \"never passes\"\nretries = 1\n\
         command = { argv = [\"/bin/false\"] }\n",
    );
    repo.write("roles/app/files/app.conf", "two\n");
    let c2 = signed_commit(&repo, &signer, "v2 fails its check");
    std::fs::remove_file(dir.join("site.bundle")).unwrap();
    create_bundle(&repo, &dir.join("site.bundle"), &signer, None).ok();
    run_with(&host, bundles(), &args, &signer).code(1);
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("one\n"));

    // The same stick again: the bad head is skipped, and the report says
    // the host is on v1, and why.
    let run = run_with(&host, bundles(), &args, &signer).ok();
    let report: serde_json::Value = web1_report(stick.path());
    assert_eq!(report["outcome"], "skipped", "{report} {}", run.stderr);
    assert_eq!(report["commit"], c1.as_str(), "{report}");
    assert_eq!(report["previous"], c1.as_str(), "{report}");
    let message = report["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("commit {} is marked bad on this host", &c2[..12])),
        "{report}"
    );
    assert_eq!(report["drifted"], serde_json::json!([]), "{report}");
}

#[test]
fn a_stick_directory_is_imported_in_order_and_carries_the_report_back() {
    let signer = Signer::new("release@example.com");
    let repo = app_repo(&signer, "one\n");
    let c1 = repo.head();
    let stick = tempfile::tempdir().unwrap();
    let dir = stick.path().join("driftless/bundles");
    std::fs::create_dir_all(&dir).unwrap();
    // Names sort opposite to creation order: import must use the signed time.
    create_bundle(&repo, &dir.join("b-full.bundle"), &signer, None).ok();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    repo.write("roles/app/files/app.conf", "two\n");
    signed_commit(&repo, &signer, "v2");
    create_bundle(&repo, &dir.join("a-inc.bundle"), &signer, Some(&c1)).ok();
    std::fs::write(dir.join("c-junk.bundle"), "not a bundle").unwrap();

    let host = Host::new("web1");
    std::fs::create_dir_all(host.path("/etc")).unwrap();
    let run = run_with(
        &host,
        bundles(),
        &["bundle", "stick", stick.path().to_str().unwrap()],
        &signer,
    );
    // The junk bundle is refused, the good ones applied.
    assert_eq!(
        host.read("/etc/app.conf").as_deref(),
        Some("two\n"),
        "{}",
        run.stderr
    );
    let report: serde_json::Value = web1_report(stick.path());
    assert_eq!(report["host"], "web1");
    assert_eq!(report["outcome"], "applied");
    assert_eq!(report["commit"], repo.head());
    let results: Vec<_> = report["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["file"].as_str().unwrap().to_string(),
                b["result"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        results,
        [
            ("b-full.bundle".to_string(), "imported".to_string()),
            ("a-inc.bundle".to_string(), "imported".to_string()),
            ("c-junk.bundle".to_string(), "refused".to_string()),
        ]
    );
    assert!(
        report["message"]
            .as_str()
            .unwrap()
            .contains("c-junk.bundle"),
        "{report}"
    );

    // Drift on the host is repaired by the next stick and reported.
    std::fs::write(host.path("/etc/app.conf"), "edited by hand\n").unwrap();
    run_with(
        &host,
        bundles(),
        &["bundle", "stick", stick.path().to_str().unwrap()],
        &signer,
    );
    let report: serde_json::Value = web1_report(stick.path());
    assert_eq!(
        report["drifted"],
        serde_json::json!(["/etc/app.conf"]),
        "{report}"
    );
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("two\n"));

    let summary = Command::new(BIN)
        .args(["bundle", "reports"])
        .arg(stick.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&summary.stdout);
    assert!(
        text.contains("web1") && text.contains("applied") && text.contains(&repo.head()[..7]),
        "{text}"
    );
}

/// A stick is untrusted, and so are the reports on it: `bundle reports`
/// printed their host names and messages raw (an escape sequence rewrote
/// the admin's terminal), read a FIFO named `*.json` until killed, and a
/// link to /dev/zero until memory ran out. Shown escaped now, and read
/// only as regular files, bounded.
#[test]
fn bundle_reports_from_a_hostile_stick_are_shown_escaped_and_read_bounded() {
    let stick = tempfile::tempdir().unwrap();
    let dir = stick.path().join("driftless/reports");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("forged.json"),
        r#"{"host":"web1\u001b[2J","time":0,"outcome":"failed","commit":"c\u001b[31m","drifted":[],"message":"m\u001b]0;pwned\u0007","agent_version":"1"}"#,
    )
    .unwrap();
    nix::unistd::mkfifo(&dir.join("fifo.json"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.join("zero.json")).unwrap();
    let mut child = Command::new(BIN)
        .args(["bundle", "reports"])
        .arg(stick.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A guard against the hang this pins, not a timing assumption.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "bundle reports hung");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}'),
        "raw: {text:?}"
    );
    assert!(text.contains("web1\\u{1b}[2J"), "{text}");
    for bad in ["fifo.json", "zero.json"] {
        assert!(
            text.lines()
                .any(|l| l.contains(bad) && l.contains("unreadable")),
            "{bad}: {text}"
        );
    }

    // `driftless` on the stick a link into the host: not followed.
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(elsewhere.path().join("reports")).unwrap();
    std::fs::write(
        elsewhere.path().join("reports/host.json"),
        r#"{"host":"from-the-host","time":0,"outcome":"applied","drifted":[],"agent_version":"1"}"#,
    )
    .unwrap();
    let stick = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), stick.path().join("driftless")).unwrap();
    let out = Command::new(BIN)
        .args(["bundle", "reports"])
        .arg(stick.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("from-the-host"), "followed a link: {text}");
}

/// Issue 12 §7: the objects of a refused bundle stayed in the mirror (its
/// pack was indexed into the mirror before the ancestry check). They are
/// now indexed into a quarantine and only moved in once accepted.
#[test]
fn a_refused_bundle_leaves_the_mirror_untouched() {
    let signer = Signer::new("release@example.com");
    let repo = app_repo(&signer, "one\n");
    let out = tempfile::tempdir().unwrap();
    let good = out.path().join("good.bundle");
    create_bundle(&repo, &good, &signer, None).ok();
    let host = Host::new("h");
    import(&host, &signer, &[&good]).ok();
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("one\n"));

    // Same signer, unrelated history: refused by ancestry, after indexing.
    let stranger = app_repo(&signer, "rewritten\n");
    let foreign = out.path().join("foreign.bundle");
    create_bundle(&stranger, &foreign, &signer, None).ok();
    let mirror = host.state.path().join("mirror.git");
    let objects = |m: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(m.join("objects/pack"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let before = objects(&mirror);
    let run = import(&host, &signer, &[&foreign]).code(4);
    assert!(
        run.stderr
            .contains("does not descend from the applied commit"),
        "{}",
        run.stderr
    );
    assert_eq!(
        objects(&mirror),
        before,
        "the refused pack reached the mirror"
    );
    let has = Command::new("git")
        .arg("--git-dir")
        .arg(&mirror)
        .args(["cat-file", "-e", &stranger.head()])
        .status()
        .unwrap();
    assert!(!has.success(), "the refused tip is in the mirror");
    let incoming: Vec<_> = std::fs::read_dir(host.state.path().join("incoming"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(incoming.is_empty(), "quarantine left behind: {incoming:?}");
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("one\n"));
}

/// Issue 12 §7: a directory stick's links were followed (the report went
/// to a host path of the stick's choosing; a linked "bundle" leaked a host
/// file's size and hash into the report), a FIFO in place of a bundle hung
/// the agent under the lock, and a bundle had no size cap.
#[test]
fn a_hostile_directory_stick_is_refused_without_following_or_hanging() {
    let signer = Signer::new("release@example.com");
    let repo = app_repo(&signer, "one\n");
    let made = tempfile::tempdir().unwrap();
    let good = made.path().join("good.bundle");
    create_bundle(&repo, &good, &signer, None).ok();
    let copy_bundle = |to: &Path| {
        for ext in ["", ".manifest", ".manifest.sig"] {
            std::fs::copy(
                format!("{}{ext}", good.display()),
                format!("{}{ext}", to.display()),
            )
            .unwrap();
        }
    };
    let stick_run = |host: &Host, stick: &Path, extra: &[&str]| {
        let mut args = vec!["bundle", "stick", stick.to_str().unwrap(), "--wait", "5"];
        args.extend_from_slice(extra);
        run_with(host, bundles(), &args, &signer)
    };

    // 1. The reports directory links to a host directory.
    let stick = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(stick.path().join("driftless/bundles")).unwrap();
    copy_bundle(&stick.path().join("driftless/bundles/a.bundle"));
    std::os::unix::fs::symlink(outside.path(), stick.path().join("driftless/reports")).unwrap();
    let host = Host::new("web1");
    let run = stick_run(&host, stick.path(), &[]);
    assert_ne!(run.code, 0);
    assert!(
        run.stderr.contains("driftless/reports is a symlink"),
        "{}",
        run.stderr
    );
    assert!(
        std::fs::read_dir(outside.path()).unwrap().next().is_none(),
        "report written through the link"
    );

    // 2. A "bundle" that links to a host file: refused by name; nothing of
    //    the host file (size, hash) reaches the report.
    let stick = tempfile::tempdir().unwrap();
    let bdir = stick.path().join("driftless/bundles");
    std::fs::create_dir_all(&bdir).unwrap();
    copy_bundle(&bdir.join("x.bundle"));
    std::fs::remove_file(bdir.join("x.bundle")).unwrap();
    let secret = outside.path().join("host-secret");
    std::fs::write(&secret, "host secret content\n").unwrap();
    std::os::unix::fs::symlink(&secret, bdir.join("x.bundle")).unwrap();
    let host = Host::new("web1");
    let run = stick_run(&host, stick.path(), &[]).code(4);
    assert!(run.stderr.contains("is a symlink"), "{}", run.stderr);
    let report = std::fs::read_to_string(stick.path().join("driftless/reports/web1.json")).unwrap();
    assert!(report.contains("x.bundle is a symlink"), "{report}");
    assert!(
        !report.contains("20 bytes") && !report.contains("size 20"),
        "{report}"
    );

    // 3. The bundles directory itself links elsewhere.
    let stick = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    copy_bundle(&elsewhere.path().join("a.bundle"));
    std::fs::create_dir_all(stick.path().join("driftless")).unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), stick.path().join("driftless/bundles")).unwrap();
    let host = Host::new("web1");
    let run = stick_run(&host, stick.path(), &[]);
    assert_ne!(run.code, 0);
    assert!(
        run.stderr.contains("driftless/bundles is a symlink"),
        "{}",
        run.stderr
    );
    assert_eq!(host.read("/etc/app.conf"), None);

    // 4. A FIFO in place of the bundle: refused at once, not a hang.
    let stick = tempfile::tempdir().unwrap();
    let bdir = stick.path().join("driftless/bundles");
    std::fs::create_dir_all(&bdir).unwrap();
    copy_bundle(&bdir.join("f.bundle"));
    std::fs::remove_file(bdir.join("f.bundle")).unwrap();
    nix::unistd::mkfifo(
        &bdir.join("f.bundle"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let host = Host::new("web1");
    let started = std::time::Instant::now();
    let run = stick_run(&host, stick.path(), &[]).code(4);
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    assert!(
        run.stderr.contains("f.bundle is not a regular file"),
        "{}",
        run.stderr
    );

    // 5. Larger than max_bundle_size: refused before it is read.
    let stick = tempfile::tempdir().unwrap();
    let bdir = stick.path().join("driftless/bundles");
    std::fs::create_dir_all(&bdir).unwrap();
    copy_bundle(&bdir.join("big.bundle"));
    let conf = made.path().join("agent.toml");
    std::fs::write(&conf, "max_bundle_size = \"100B\"\n").unwrap();
    let host = Host::new("web1");
    let out = Command::new(BIN)
        .args([
            "bundle",
            "stick",
            stick.path().to_str().unwrap(),
            "--config",
        ])
        .arg(&conf)
        .args(["--source", "bundle:", "--host", "web1", "--root"])
        .arg(host.root.path())
        .arg("--state-dir")
        .arg(host.state.path())
        .arg("--allowed-signers")
        .arg(signer.allowed())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("more than max_bundle_size (100 bytes)"),
        "{stderr}"
    );
    assert_eq!(host.read("/etc/app.conf"), None);
}

/// Issue 12 §7: `bundle verify` checked signature and hash but not what an
/// import decides; on a host it now reports the import's verdict (older,
/// unrelated history, would import) and still changes nothing.
#[test]
fn bundle_verify_on_a_host_judges_ancestry_like_an_import_and_changes_nothing() {
    let signer = Signer::new("release@example.com");
    let repo = app_repo(&signer, "one\n");
    let out = tempfile::tempdir().unwrap();
    let v1 = out.path().join("v1.bundle");
    create_bundle(&repo, &v1, &signer, None).ok();
    repo.write("roles/app/files/app.conf", "two\n");
    signed_commit(&repo, &signer, "v2");
    let v2 = out.path().join("v2.bundle");
    create_bundle(&repo, &v2, &signer, None).ok();
    repo.write("roles/app/files/app.conf", "three\n");
    signed_commit(&repo, &signer, "v3");
    let v3 = out.path().join("v3.bundle");
    create_bundle(&repo, &v3, &signer, None).ok();
    let foreign_repo = app_repo(&signer, "rewritten\n");
    let foreign = out.path().join("foreign.bundle");
    create_bundle(&foreign_repo, &foreign, &signer, None).ok();

    let host = Host::new("h");
    import(&host, &signer, &[&v2]).ok();
    let mirror = host.state.path().join("mirror.git");
    let snapshot = || {
        let mut v: Vec<String> = std::fs::read_dir(mirror.join("objects/pack"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        (v, git(&mirror, &["for-each-ref"]))
    };
    let before = snapshot();
    let verify = |b: &Path| {
        run_with(
            &host,
            bundles(),
            &["bundle", "verify", b.to_str().unwrap()],
            &signer,
        )
    };

    let older = verify(&v1).code(4);
    assert!(
        older.stderr.contains("older than what this host runs"),
        "{}",
        older.stderr
    );
    let unrelated = verify(&foreign).code(4);
    assert!(
        unrelated
            .stderr
            .contains("does not descend from the applied commit"),
        "{}",
        unrelated.stderr
    );
    let newer = verify(&v3).ok();
    assert!(newer.stdout.contains("would import"), "{}", newer.stdout);
    assert_eq!(snapshot(), before, "verify changed the mirror");
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("two\n"));
    let incoming: Vec<_> = std::fs::read_dir(host.state.path().join("incoming"))
        .unwrap()
        .collect();
    assert!(incoming.is_empty());

    // An outdated import is refused and, unlike before, recorded.
    import(&host, &signer, &[&v1]).code(4);
    let history = host.run(bundles(), &["history", "--format", "json"]).ok();
    let entries: serde_json::Value = serde_json::from_str(&history.stdout).unwrap();
    let newest = &entries["status"]["entries"][0];
    assert_eq!(newest["outcome"], "outdated", "{}", history.stdout);
    assert!(
        newest["message"]
            .as_str()
            .unwrap_or("")
            .contains("v1.bundle set aside"),
        "{}",
        history.stdout
    );
}

/// Issue 12 §7: the stick path exited 4 where `sync` exits 3 for the same
/// refusal (an invalid repository): one code per kind of refusal.
#[test]
fn an_invalid_repository_on_a_stick_exits_3_like_sync() {
    let signer = Signer::new("release@example.com");
    let repo = app_repo(&signer, "one\n");
    repo.write("driftless.toml", "roles = [\"app\"]\ntypo_key = 1\n");
    signed_commit(&repo, &signer, "broken");
    let stick = tempfile::tempdir().unwrap();
    let bdir = stick.path().join("driftless/bundles");
    std::fs::create_dir_all(&bdir).unwrap();
    create_bundle(&repo, &bdir.join("b.bundle"), &signer, None).ok();
    let host = Host::new("web1");
    let run = run_with(
        &host,
        bundles(),
        &["bundle", "stick", stick.path().to_str().unwrap()],
        &signer,
    )
    .code(3);
    assert!(run.stderr.contains("typo_key"), "{}", run.stderr);
    let report: serde_json::Value = web1_report(stick.path());
    assert_eq!(report["outcome"], "refused");
    // The same commit fetched over git: exit 3 too.
    let direct = Host::new("web1");
    direct.run(repo.path(), &["sync", "--once"]).code(3);
}
