//! Detached SSHSIG signatures: our signer, `ssh-keygen -Y sign`, and the
//! allowed signers policy (namespaces, validity windows, unknown keys).

use std::process::Command;

use super::super::{sign_detached, verify_detached, Verified, BUNDLE_NAMESPACE, GIT_NAMESPACE};
use super::{keygen, keygen_with, message, run, signers, Key, ORIGIN};

const MSG: &[u8] = b"{\"format\":\"driftless-bundle/1\"}\n";
/// 2025-06-15, inside every window used below that is meant to allow it.
const NOW: i64 = 1_750_000_000;

fn sign(key: &Key) -> String {
    sign_detached(&key.private, BUNDLE_NAMESPACE, MSG).unwrap()
}

fn roundtrip(kind: &str, algorithm: &str) {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "k", kind);
    let armored = sign(&key);
    assert!(armored.starts_with("-----BEGIN SSH SIGNATURE-----\n"));
    let s = signers(&key.line("ci@example.com", ""));
    let v = verify_detached(&s, BUNDLE_NAMESPACE, MSG, &armored, NOW).unwrap();
    assert_eq!(
        v,
        Verified {
            principal: "ci@example.com".into(),
            fingerprint: key.fingerprint(),
            algorithm: algorithm.into(),
        }
    );
}

#[test]
fn ed25519_sign_then_verify_roundtrip() {
    roundtrip("ed25519", "ssh-ed25519");
}

#[test]
fn rsa_sign_then_verify_roundtrip() {
    roundtrip("rsa", "ssh-rsa");
}

#[test]
fn ecdsa_p256_sign_then_verify_roundtrip() {
    roundtrip("ecdsa", "ecdsa-sha2-nistp256");
}

/// `ssh-keygen -Y sign` of `MSG` with `key` in `namespace`.
fn ssh_keygen_sign(dir: &std::path::Path, key: &Key, namespace: &str) -> String {
    let file = dir.join("manifest");
    std::fs::write(&file, MSG).unwrap();
    // ssh-keygen would not replace an existing signature file.
    let _ = std::fs::remove_file(dir.join("manifest.sig"));
    run(
        Command::new("ssh-keygen")
            .args(["-q", "-Y", "sign", "-n", namespace, "-f"])
            .arg(&key.private)
            .arg(&file),
        None,
    );
    std::fs::read_to_string(dir.join("manifest.sig")).unwrap()
}

#[test]
fn signatures_made_by_ssh_keygen_verify() {
    let dir = tempfile::tempdir().unwrap();
    for kind in ["ed25519", "rsa", "ecdsa"] {
        let key = keygen(dir.path(), kind, kind);
        let armored = ssh_keygen_sign(dir.path(), &key, BUNDLE_NAMESPACE);
        let s = signers(&key.line("ops", ""));
        let v = verify_detached(&s, BUNDLE_NAMESPACE, MSG, &armored, NOW)
            .unwrap_or_else(|e| panic!("{kind}: {e:#}"));
        assert_eq!(v.fingerprint, key.fingerprint(), "{kind}");
    }
}

#[test]
fn our_signatures_verify_with_ssh_keygen() {
    let dir = tempfile::tempdir().unwrap();
    for kind in ["ed25519", "rsa"] {
        let key = keygen(dir.path(), kind, kind);
        let sig = dir.path().join(format!("{kind}.sig"));
        std::fs::write(&sig, sign(&key)).unwrap();
        let allowed = dir.path().join("allowed");
        std::fs::write(&allowed, key.line("ops", "")).unwrap();
        run(
            Command::new("ssh-keygen")
                .args(["-Y", "verify", "-n", BUNDLE_NAMESPACE, "-I", "ops", "-f"])
                .arg(&allowed)
                .arg("-s")
                .arg(&sig),
            Some(MSG),
        );
    }
}

#[test]
fn signature_for_another_namespace_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "k", "ed25519");
    let s = signers(&key.line("ops", ""));
    let git_sig = sign_detached(&key.private, GIT_NAMESPACE, MSG).unwrap();
    let err = message(verify_detached(&s, BUNDLE_NAMESPACE, MSG, &git_sig, NOW));
    assert_eq!(
        err,
        "the signed data is signed for namespace \"git\", not \"driftless-bundle\": a signature \
         made for another purpose is not accepted"
    );
    let file_sig = ssh_keygen_sign(dir.path(), &key, "file");
    let err = message(verify_detached(&s, BUNDLE_NAMESPACE, MSG, &file_sig, NOW));
    assert!(err.contains("namespace \"file\""), "{err}");
}

#[test]
fn changed_message_is_a_bad_signature() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "k", "ed25519");
    let s = signers(&key.line("ops", ""));
    let armored = sign(&key);
    let mut tampered = MSG.to_vec();
    tampered[3] ^= 1;
    let err = message(verify_detached(
        &s,
        BUNDLE_NAMESPACE,
        &tampered,
        &armored,
        NOW,
    ));
    assert_eq!(
        err,
        format!(
            "the signed data has a bad signature: the payload does not match (tampered?); \
             the signature names key {} (ssh-ed25519)",
            key.fingerprint()
        )
    );
}

#[test]
fn signature_by_key_not_listed_is_refused_naming_fingerprint_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let listed = keygen(dir.path(), "listed", "ed25519");
    let other = keygen(dir.path(), "other", "rsa");
    let s = signers(&listed.line("ops", ""));
    let err = message(verify_detached(
        &s,
        BUNDLE_NAMESPACE,
        MSG,
        &sign(&other),
        NOW,
    ));
    assert_eq!(
        err,
        format!(
            "the signed data is signed by {} (ssh-rsa), which is not in {ORIGIN}",
            other.fingerprint()
        )
    );
}

#[test]
fn empty_signers_file_is_named_in_the_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "k", "ed25519");
    let err = message(verify_detached(
        &signers("# nobody\n"),
        BUNDLE_NAMESPACE,
        MSG,
        &sign(&key),
        NOW,
    ));
    assert!(
        err.ends_with("which is not in /etc/driftless/allowed_signers (the file lists no keys)"),
        "{err}"
    );
}

#[test]
fn cert_authority_lines_never_match_and_the_refusal_says_they_are_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "k", "ed25519");
    // Even the signing key itself, listed as a CA, does not vouch for a
    // plain signature.
    let s = signers(&key.line("*@example.com", "cert-authority"));
    let err = message(verify_detached(&s, BUNDLE_NAMESPACE, MSG, &sign(&key), NOW));
    assert!(
        err.contains(
            "which is not in /etc/driftless/allowed_signers; its 1 cert-authority line(s)"
        ) && err
            .contains("certificate-signed signatures (cert-authority entries) are not supported"),
        "{err}"
    );
}

#[test]
fn namespace_restriction_excluding_the_namespace_is_the_stated_reason() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "k", "ed25519");
    let s = signers(&key.line("alice@example.com", "namespaces=\"git,file\""));
    let err = message(verify_detached(&s, BUNDLE_NAMESPACE, MSG, &sign(&key), NOW));
    assert_eq!(
        err,
        format!(
            "the signed data is signed by {} (ssh-ed25519), but the key of alice@example.com \
             ({ORIGIN}:1) is allowed only for namespaces \"git,file\", not \"driftless-bundle\"",
            key.fingerprint()
        )
    );
    let s = signers(&key.line("alice@example.com", "namespaces=\"git,driftless-*\""));
    verify_detached(&s, BUNDLE_NAMESPACE, MSG, &sign(&key), NOW).unwrap();
}

#[test]
fn a_later_line_for_the_same_key_can_allow_what_an_earlier_one_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "k", "ed25519");
    let text = format!(
        "{}\n{}\n",
        key.line("dev", "namespaces=\"git\""),
        key.line("release", "namespaces=\"driftless-bundle\"")
    );
    let v = verify_detached(&signers(&text), BUNDLE_NAMESPACE, MSG, &sign(&key), NOW).unwrap();
    assert_eq!(v.principal, "release");
}

#[test]
fn validity_window_is_checked_at_the_given_time_both_directions() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "k", "ed25519");
    let armored = sign(&key);
    let s = signers(&key.line(
        "alice@example.com",
        "valid-after=\"20250101Z\",valid-before=\"20260101Z\"",
    ));
    verify_detached(&s, BUNDLE_NAMESPACE, MSG, &armored, NOW).unwrap();

    let err = message(verify_detached(
        &s,
        BUNDLE_NAMESPACE,
        MSG,
        &armored,
        1_767_225_601,
    ));
    assert!(
        err.ends_with(&format!(
            "but the key of alice@example.com ({ORIGIN}:1) is valid only before 2026-01-01 00:00:00 UTC; \
             the signature was checked for 2026-01-01 00:00:01 UTC"
        )),
        "{err}"
    );
    let err = message(verify_detached(
        &s,
        BUNDLE_NAMESPACE,
        MSG,
        &armored,
        1_735_689_599,
    ));
    assert!(
        err.contains("is valid only from 2025-01-01 00:00:00 UTC; the signature was checked for 2024-12-31 23:59:59 UTC"),
        "{err}"
    );
}

#[test]
fn armor_with_crlf_and_surrounding_blank_lines_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "k", "ed25519");
    let armored = format!("\r\n\r\n{}\r\n", sign(&key).replace('\n', "\r\n"));
    verify_detached(
        &signers(&key.line("ops", "")),
        BUNDLE_NAMESPACE,
        MSG,
        &armored,
        NOW,
    )
    .unwrap();
}

#[test]
fn non_ssh_and_broken_signatures_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "k", "ed25519");
    let s = signers(&key.line("ops", ""));
    let pgp = "-----BEGIN PGP SIGNATURE-----\n\niQEz\n-----END PGP SIGNATURE-----\n";
    let err = message(verify_detached(&s, BUNDLE_NAMESPACE, MSG, pgp, NOW));
    assert!(
        err.contains("signed with OpenPGP, only SSH signatures are supported"),
        "{err}"
    );
    let err = message(verify_detached(&s, BUNDLE_NAMESPACE, MSG, "hello", NOW));
    assert!(
        err.contains("carries a signature that is not an SSH signature"),
        "{err}"
    );
    let good = sign(&key);
    let truncated = good.replacen("\n", "\nAAAA", 2);
    let err = message(verify_detached(&s, BUNDLE_NAMESPACE, MSG, &truncated, NOW));
    assert!(
        err.starts_with("the signed data has a malformed SSH signature: "),
        "{err}"
    );
}

#[test]
fn encrypted_private_key_is_a_clear_error_without_key_material() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen_with(dir.path(), "k", "ed25519", &["-N", "correct horse"]);
    let err = message(sign_detached(&key.private, BUNDLE_NAMESPACE, MSG));
    assert!(err.contains("is encrypted (passphrase-protected)"), "{err}");
    assert!(
        !err.contains("BEGIN") && !err.contains("b3BlbnNzaC"),
        "{err}"
    );
}

#[test]
fn signing_with_a_public_key_pem_key_or_missing_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "k", "ed25519");
    let err = message(sign_detached(&key.pub_path(), BUNDLE_NAMESPACE, MSG));
    assert!(
        err.contains("is a public key; pass the private key file"),
        "{err}"
    );

    let pem = keygen_with(dir.path(), "pem", "rsa", &["-m", "PEM"]);
    let err = message(sign_detached(&pem.private, BUNDLE_NAMESPACE, MSG));
    assert!(
        err.contains("is a PEM/PKCS#8 private key; convert it"),
        "{err}"
    );
    assert!(!err.contains("MII"), "{err}");

    let err = message(sign_detached(
        &dir.path().join("absent"),
        BUNDLE_NAMESPACE,
        MSG,
    ));
    assert!(err.contains("cannot read the private key"), "{err}");
}

#[test]
fn certificate_signed_signature_is_refused_as_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let ca = keygen(dir.path(), "ca", "ed25519");
    let user = keygen(dir.path(), "user", "ed25519");
    run(
        Command::new("ssh-keygen")
            .args(["-q", "-s"])
            .arg(&ca.private)
            .args(["-I", "alice", "-n", "alice"])
            .arg(user.pub_path()),
        None,
    );
    let file = dir.path().join("manifest");
    std::fs::write(&file, MSG).unwrap();
    // Signing "with the certificate" embeds it in the signature.
    run(
        Command::new("ssh-keygen")
            .args(["-q", "-Y", "sign", "-n", BUNDLE_NAMESPACE, "-f"])
            .arg(dir.path().join("user-cert.pub"))
            .arg(&file),
        None,
    );
    let armored = std::fs::read_to_string(dir.path().join("manifest.sig")).unwrap();
    let s = signers(&format!(
        "{}\n{}\n",
        ca.line("alice", "cert-authority"),
        user.line("alice", "")
    ));
    let err = message(verify_detached(&s, BUNDLE_NAMESPACE, MSG, &armored, NOW));
    assert!(
        err.starts_with(
            "the signed data is signed with an SSH certificate (ssh-ed25519-cert-v01@openssh.com); \
             certificate-signed signatures are not supported"
        ),
        "{err}"
    );
}
