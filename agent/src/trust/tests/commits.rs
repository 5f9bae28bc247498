//! Commits signed by real git (`gpg.format=ssh`), forged commit objects,
//! and which commits each policy checks.

use super::super::{sign_detached, verify_commit, verify_history, SignaturePolicy, GIT_NAMESPACE};
use super::{keygen, message, run, signers, Key, Repo, ORIGIN};

use SignaturePolicy::{EveryCommit, Tip};

struct Fixture {
    _dir: tempfile::TempDir,
    repo: Repo,
    alice: Key,
    mallory: Key,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::init(&dir.path().join("repo"));
    let alice = keygen(dir.path(), "alice", "ed25519");
    let mallory = keygen(dir.path(), "mallory", "ed25519");
    Fixture {
        _dir: dir,
        repo,
        alice,
        mallory,
    }
}

fn short(id: gix::ObjectId) -> String {
    id.to_hex_with_len(7).to_string()
}

#[test]
fn ed25519_signed_commit_verifies() {
    let f = fixture();
    let id = f.repo.commit("Add nginx", Some(&f.alice));
    let s = signers(&f.alice.line("alice@example.com", ""));
    let v = verify_commit(&f.repo.open(), id, &s).unwrap();
    assert_eq!(v.principal, "alice@example.com");
    assert_eq!(v.fingerprint, f.alice.fingerprint());
    assert_eq!(v.algorithm, "ssh-ed25519");
}

#[test]
fn rsa_and_ecdsa_signed_commits_verify() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    for (kind, algorithm) in [("rsa", "ssh-rsa"), ("ecdsa", "ecdsa-sha2-nistp256")] {
        let key = keygen(dir.path(), kind, kind);
        let id = f.repo.commit(kind, Some(&key));
        let v = verify_commit(&f.repo.open(), id, &signers(&key.line("ops", ""))).unwrap();
        assert_eq!(
            (v.algorithm.as_str(), v.fingerprint),
            (algorithm, key.fingerprint())
        );
    }
}

#[test]
fn unsigned_commit_is_refused_naming_commit_and_how_to_sign() {
    let f = fixture();
    let id = f.repo.commit("Add nginx", None);
    let err = message(verify_commit(
        &f.repo.open(),
        id,
        &signers(&f.alice.line("a", "")),
    ));
    assert_eq!(
        err,
        format!(
            "commit {} (\"Add nginx\") is not signed: require_signed is on; sign commits with \
             `git config gpg.format ssh` + `user.signingkey` (and `commit.gpgsign true`)",
            short(id)
        )
    );
}

#[test]
fn commit_signed_by_unknown_key_is_refused() {
    let f = fixture();
    let id = f.repo.commit("Sneak in", Some(&f.mallory));
    let err = message(verify_commit(
        &f.repo.open(),
        id,
        &signers(&f.alice.line("a", "")),
    ));
    assert_eq!(
        err,
        format!(
            "commit {} (\"Sneak in\") is signed by {} (ssh-ed25519), which is not in {ORIGIN}",
            short(id),
            f.mallory.fingerprint()
        )
    );
}

/// Replaces `from` by `to` in a raw commit object.
fn edit(raw: &[u8], from: &str, to: &str) -> Vec<u8> {
    let text = String::from_utf8(raw.to_vec()).unwrap();
    assert!(text.contains(from), "{from:?} not in {text}");
    text.replacen(from, to, 1).into_bytes()
}

#[test]
fn forged_commit_with_copied_gpgsig_is_a_bad_signature() {
    let f = fixture();
    let signed = f.repo.commit("Add nginx", Some(&f.alice));
    let raw = f.repo.cat_commit(signed);
    assert!(String::from_utf8_lossy(&raw).contains("\ngpgsig -----BEGIN SSH SIGNATURE-----"));
    let forged = f
        .repo
        .write_commit(&edit(&raw, "Add nginx", "Add a backdoor"));
    let s = signers(&f.alice.line("alice@example.com", ""));
    let err = message(verify_commit(&f.repo.open(), forged, &s));
    assert_eq!(
        err,
        format!(
            "commit {} (\"Add a backdoor\") has a bad signature: the payload does not match \
             (tampered?); the signature names key {} (ssh-ed25519)",
            short(forged),
            f.alice.fingerprint()
        )
    );
    // Changing a header (here the committer) is caught the same way.
    let forged = f
        .repo
        .write_commit(&edit(&raw, "committer Test", "committer Tess"));
    let err = message(verify_commit(&f.repo.open(), forged, &s));
    assert!(
        err.contains("bad signature: the payload does not match"),
        "{err}"
    );
}

/// A commit object built by hand: `tree`, author, committer, message, and
/// a `gpgsig` header made by [`sign_detached`] in `namespace`.
fn hand_built(f: &Fixture, key: &Key, namespace: &str, message: &str) -> gix::ObjectId {
    let tree = f
        .repo
        .git(&["hash-object", "-t", "tree", "-w", "/dev/null"]);
    let ident = "Test <test@example.com> 1750000000 +0000";
    let payload = format!("tree {tree}\nauthor {ident}\ncommitter {ident}\n\n{message}\n");
    let armored = sign_detached(&key.private, namespace, payload.as_bytes()).unwrap();
    let header = format!("gpgsig {}", armored.trim_end().replace('\n', "\n "));
    let raw = payload.replacen("\n\n", &format!("\n{header}\n\n"), 1);
    f.repo.write_commit(raw.as_bytes())
}

#[test]
fn hand_built_commit_signed_by_sign_detached_verifies_so_the_payload_framing_is_git_s() {
    let f = fixture();
    let id = hand_built(&f, &f.alice, GIT_NAMESPACE, "By hand");
    let s = signers(&f.alice.line("alice", ""));
    verify_commit(&f.repo.open(), id, &s).unwrap();
    // And real git agrees.
    let allowed = f.repo.dir.join("../allowed");
    std::fs::write(&allowed, f.alice.line("test@example.com", "")).unwrap();
    run(
        f.repo
            .command()
            .arg("-c")
            .arg(format!("gpg.ssh.allowedSignersFile={}", allowed.display()))
            .args(["verify-commit", &id.to_string()]),
        None,
    );
}

#[test]
fn commit_signature_made_for_another_namespace_is_refused() {
    let f = fixture();
    let id = hand_built(&f, &f.alice, "driftless-bundle", "Replayed");
    let err = message(verify_commit(
        &f.repo.open(),
        id,
        &signers(&f.alice.line("a", "")),
    ));
    assert!(
        err.ends_with("is signed for namespace \"driftless-bundle\", not \"git\": a signature made for another purpose is not accepted"),
        "{err}"
    );
}

#[test]
fn openpgp_signed_commit_is_refused_as_unsupported() {
    let f = fixture();
    let tree = f
        .repo
        .git(&["hash-object", "-t", "tree", "-w", "/dev/null"]);
    let ident = "Test <test@example.com> 1750000000 +0000";
    let raw = format!(
        "tree {tree}\nauthor {ident}\ncommitter {ident}\ngpgsig -----BEGIN PGP SIGNATURE-----\n \n iQEzBAAB\n -----END PGP SIGNATURE-----\n\nGPG signed\n"
    );
    let id = f.repo.write_commit(raw.as_bytes());
    let err = message(verify_commit(
        &f.repo.open(),
        id,
        &signers(&f.alice.line("a", "")),
    ));
    assert!(
        err.starts_with(&format!(
            "commit {} (\"GPG signed\") is signed with OpenPGP, only SSH signatures are supported",
            short(id)
        )),
        "{err}"
    );
}

const JAN_2025: i64 = 1_735_689_600;
const JAN_2026: i64 = 1_767_225_600;

#[test]
fn valid_before_accepts_commits_made_before_and_refuses_commits_made_after() {
    let f = fixture();
    let s = signers(
        &f.alice
            .line("alice@example.com", "valid-before=\"20260101Z\""),
    );
    let before = f.repo.commit_at("Before", Some(&f.alice), JAN_2026 - 60);
    let after = f.repo.commit_at("After", Some(&f.alice), JAN_2026 + 60);
    let repo = f.repo.open();
    verify_commit(&repo, before, &s).unwrap();
    let err = message(verify_commit(&repo, after, &s));
    assert_eq!(
        err,
        format!(
            "commit {} (\"After\") is signed by {} (ssh-ed25519), but the key of alice@example.com \
             ({ORIGIN}:1) is valid only before 2026-01-01 00:00:00 UTC; the commit was made at \
             2026-01-01 00:01:00 UTC",
            short(after),
            f.alice.fingerprint()
        )
    );
}

#[test]
fn valid_after_refuses_commits_made_before_and_accepts_commits_made_after() {
    let f = fixture();
    let s = signers(
        &f.alice
            .line("alice@example.com", "valid-after=\"20250101Z\""),
    );
    let early = f.repo.commit_at("Early", Some(&f.alice), JAN_2025 - 1);
    let later = f.repo.commit_at("Later", Some(&f.alice), JAN_2025);
    let repo = f.repo.open();
    let err = message(verify_commit(&repo, early, &s));
    assert!(
        err.ends_with(
            "is valid only from 2025-01-01 00:00:00 UTC; the commit was made at 2024-12-31 23:59:59 UTC"
        ),
        "{err}"
    );
    verify_commit(&repo, later, &s).unwrap();
}

#[test]
fn namespaces_restriction_without_git_refuses_commits() {
    let f = fixture();
    let id = f.repo.commit("Add nginx", Some(&f.alice));
    let s = signers(&f.alice.line("ci", "namespaces=\"driftless-bundle\""));
    let err = message(verify_commit(&f.repo.open(), id, &s));
    assert!(
        err.ends_with(&format!(
            "but the key of ci ({ORIGIN}:1) is allowed only for namespaces \"driftless-bundle\", not \"git\""
        )),
        "{err}"
    );
}

/// main: a (signed) - b (`middle` signed?) - c (signed).
fn linear(f: &Fixture, middle_signed: bool) -> [gix::ObjectId; 3] {
    let a = f.repo.commit("a", Some(&f.alice));
    let b = f.repo.commit("b", middle_signed.then_some(&f.alice));
    let c = f.repo.commit("c", Some(&f.alice));
    [a, b, c]
}

#[test]
fn every_commit_catches_unsigned_commit_in_the_middle_tip_does_not() {
    let f = fixture();
    let [a, b, c] = linear(&f, false);
    let s = signers(&f.alice.line("alice", ""));
    let repo = f.repo.open();
    let err = message(verify_history(&repo, Some(a), c, &s, EveryCommit));
    assert!(
        err.starts_with(&format!("commit {} (\"b\") is not signed", short(b))),
        "{err}"
    );
    let tip = verify_history(&repo, Some(a), c, &s, Tip).unwrap();
    assert_eq!(tip.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [c]);
}

#[test]
fn every_commit_returns_each_new_commit_tip_first_and_stops_at_from() {
    let f = fixture();
    let [a, b, c] = linear(&f, true);
    let s = signers(&f.alice.line("alice", ""));
    let repo = f.repo.open();
    let all = verify_history(&repo, Some(a), c, &s, EveryCommit).unwrap();
    assert_eq!(all.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [c, b]);
    assert!(all.iter().all(|(_, v)| v.principal == "alice"));
}

#[test]
fn merge_with_unsigned_commit_on_the_side_branch_is_caught() {
    let f = fixture();
    let base = f.repo.commit("base", Some(&f.alice));
    f.repo.git(&["checkout", "-q", "-b", "side"]);
    let unsigned = f.repo.commit("side work", None);
    f.repo.git(&["checkout", "-q", "main"]);
    f.repo.commit("main work", Some(&f.alice));
    let mut cmd = f.repo.command();
    cmd.arg("-c")
        .arg("gpg.format=ssh")
        .arg("-c")
        .arg(format!("user.signingkey={}", f.alice.private.display()))
        .args(["merge", "-q", "--no-ff", "-S", "-m", "Merge side", "side"]);
    run(&mut cmd, None);
    let merge = f.repo.head();
    let s = signers(&f.alice.line("alice", ""));
    let repo = f.repo.open();
    // The merge itself is signed; Tip accepts it.
    verify_history(&repo, Some(base), merge, &s, Tip).unwrap();
    let err = message(verify_history(&repo, Some(base), merge, &s, EveryCommit));
    assert!(
        err.starts_with(&format!(
            "commit {} (\"side work\") is not signed",
            short(unsigned)
        )),
        "{err}"
    );
}

#[test]
fn first_sync_without_from_checks_only_the_tip() {
    let f = fixture();
    let [_, _, c] = linear(&f, false);
    let s = signers(&f.alice.line("alice", ""));
    let all = verify_history(&f.repo.open(), None, c, &s, EveryCommit).unwrap();
    assert_eq!(all.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [c]);
    // ... and the tip itself must be signed.
    let unsigned_tip = f.repo.commit("d", None);
    let err = message(verify_history(
        &f.repo.open(),
        None,
        unsigned_tip,
        &s,
        EveryCommit,
    ));
    assert!(err.contains("(\"d\") is not signed"), "{err}");
}

#[test]
fn nothing_new_still_checks_the_tip() {
    let f = fixture();
    let [_, _, c] = linear(&f, true);
    let s = signers(&f.alice.line("alice", ""));
    let all = verify_history(&f.repo.open(), Some(c), c, &s, EveryCommit).unwrap();
    assert_eq!(all.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [c]);
    let err = message(verify_history(
        &f.repo.open(),
        Some(c),
        c,
        &signers(""),
        EveryCommit,
    ));
    assert!(err.contains("which is not in"), "{err}");
}

#[test]
fn from_not_an_ancestor_walks_only_the_new_side_and_terminates() {
    let f = fixture();
    let base = f.repo.commit("base", None); // old unsigned history
    let old = f.repo.commit("old tip", Some(&f.alice));
    f.repo
        .git(&["checkout", "-q", "-b", "rewritten", &base.to_string()]);
    let new1 = f.repo.commit("new 1", Some(&f.alice));
    let new2 = f.repo.commit("new 2", Some(&f.alice));
    let s = signers(&f.alice.line("alice", ""));
    let all = verify_history(&f.repo.open(), Some(old), new2, &s, EveryCommit).unwrap();
    // `base` is reachable from `old`: not new, not checked (it is unsigned).
    assert_eq!(
        all.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [new2, new1]
    );
}

#[test]
fn shallow_mirror_with_from_at_the_shallow_boundary_walks_the_new_commits() {
    let f = fixture();
    f.repo.commit("ancient, unsigned", None);
    let first = f.repo.commit("first synced", Some(&f.alice));
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("mirror");
    let url = format!("file://{}", f.repo.dir.display());
    run(
        f.repo
            .command()
            .args(["clone", "-q", "--bare", "--depth", "1", &url])
            .arg(&mirror),
        None,
    );
    let second = f.repo.commit("second", Some(&f.alice));
    let mirror_repo = Repo { dir: mirror };
    mirror_repo.git(&["fetch", "-q", &url, "main:main"]);
    let s = signers(&f.alice.line("alice", ""));
    let all = verify_history(&mirror_repo.open(), Some(first), second, &s, EveryCommit).unwrap();
    assert_eq!(all.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [second]);
}
