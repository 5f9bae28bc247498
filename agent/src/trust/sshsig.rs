//! SSHSIG (OpenSSH `PROTOCOL.sshsig`) checks against an allowed signers
//! file, shared by detached signatures and git commits, and signing with an
//! OpenSSH private key file.
//!
//! The checks run in the order `ssh-keygen -Y verify` runs them: the
//! signature must decode, be for the expected namespace and be
//! cryptographically valid for the key embedded in it; only then is that
//! key looked up. So "not in allowed_signers" is only ever said about an
//! authentic signature, and "bad signature" means the signed bytes changed.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use ssh_key::private::{KeypairData, RsaKeypair};
use ssh_key::{Algorithm, EcdsaCurve, HashAlg, LineEnding, PrivateKey, PublicKey, SshSig};
use zeroize::Zeroizing;

use super::allowed_signers::{AllowedSigners, WindowMiss};
use super::{time, Verified};

/// Verify an armored SSHSIG (`-----BEGIN SSH SIGNATURE-----`) over
/// `message` in `namespace`, against the allowed signers, with validity
/// windows checked at unix time `at`.
pub fn verify_detached(
    signers: &AllowedSigners,
    namespace: &str,
    message: &[u8],
    armored: &str,
    at: i64,
) -> Result<Verified> {
    check(signers, namespace, message, armored, at)
        .map_err(|r| anyhow!("{}", r.describe("the signed data", When::Checked)))
}

/// Make an armored SSHSIG (SHA-512, as `ssh-keygen -Y sign`) of `message`
/// in `namespace` with an unencrypted OpenSSH private key file.
///
/// Key types: ssh-ed25519, ssh-rsa (signs `rsa-sha2-512`),
/// ecdsa-sha2-nistp256. FIDO (`sk-`) keys need the hardware token and
/// cannot sign here.
pub fn sign_detached(private_key: &Path, namespace: &str, message: &[u8]) -> Result<String> {
    let shown = private_key.display();
    if namespace.is_empty() {
        bail!("cannot sign: the signature namespace is empty");
    }
    // Read into a zeroized buffer; never put its content in an error.
    let text = Zeroizing::new(
        std::fs::read(private_key)
            .with_context(|| format!("cannot read the private key {shown}"))?,
    );
    let head = text.trim_ascii_start();
    if !head.starts_with(b"-----BEGIN OPENSSH PRIVATE KEY-----") {
        if head.starts_with(b"-----BEGIN ") && head.windows(11).any(|w| w == b"PRIVATE KEY") {
            bail!(
                "{shown} is a PEM/PKCS#8 private key; convert it to the OpenSSH format with `ssh-keygen -p -f {shown}`"
            );
        }
        if head.starts_with(b"ssh-") || head.starts_with(b"ecdsa-") || head.starts_with(b"sk-") {
            bail!("{shown} is a public key; pass the private key file (usually the same name without .pub)");
        }
        bail!(
            "{shown} is not an OpenSSH private key (expected -----BEGIN OPENSSH PRIVATE KEY-----)"
        );
    }
    let key = PrivateKey::from_openssh(&*text)
        .map_err(|e| anyhow!("{shown} is not a valid OpenSSH private key: {e}"))?;
    if key.is_encrypted() {
        bail!(
            "{shown} is encrypted (passphrase-protected); driftless cannot prompt for a passphrase: \
             use an unencrypted key kept for signing (for example a dedicated CI key)"
        );
    }
    let algorithm = key.algorithm();
    if !supported(&algorithm)
        || matches!(
            algorithm,
            Algorithm::SkEd25519 | Algorithm::SkEcdsaSha2NistP256
        )
    {
        bail!(
            "{shown} is a {} key, which cannot be used to sign here (supported: ssh-ed25519, ssh-rsa, ecdsa-sha2-nistp256)",
            algorithm.as_str()
        );
    }
    let signature = match key.key_data() {
        KeypairData::Rsa(keypair) => sign_rsa(keypair, &key, namespace, message),
        _ => key.sign(namespace, HashAlg::Sha512, message),
    }
    .map_err(|e| anyhow!("cannot sign with {shown} ({}): {e}", algorithm.as_str()))?;
    // Self-check: a signature we cannot verify must not leave this function.
    key.public_key()
        .verify(namespace, message, &signature)
        .map_err(|e| anyhow!("the signature made with {shown} does not verify: {e}"))?;
    signature
        .to_pem(LineEnding::LF)
        .map_err(|e| anyhow!("cannot encode the signature: {e}"))
}

/// RSA with `rsa-sha2-512`, done with the `rsa` crate directly: ssh-key
/// 0.6.7 converts its keypair with `p` in place of `q`, which the `rsa`
/// crate rejects, so `PrivateKey::sign` always fails for RSA. Signing uses
/// blinding (OS randomness).
fn sign_rsa(
    keypair: &RsaKeypair,
    key: &PrivateKey,
    namespace: &str,
    message: &[u8],
) -> ssh_key::Result<SshSig> {
    use rsa::signature::{RandomizedSigner, SignatureEncoding};
    let int = |m: &ssh_key::Mpint| rsa::BigUint::try_from(m);
    let private = rsa::RsaPrivateKey::from_components(
        int(&keypair.public.n)?,
        int(&keypair.public.e)?,
        int(&keypair.private.d)?,
        vec![int(&keypair.private.p)?, int(&keypair.private.q)?],
    )
    .map_err(|_| ssh_key::Error::Crypto)?;
    let signed = SshSig::signed_data(namespace, HashAlg::Sha512, message)?;
    let raw = rsa::pkcs1v15::SigningKey::<sha2::Sha512>::new(private)
        .try_sign_with_rng(&mut rand_core::OsRng, &signed)
        .map_err(|_| ssh_key::Error::Crypto)?;
    let signature = ssh_key::Signature::new(
        Algorithm::Rsa {
            hash: Some(HashAlg::Sha512),
        },
        raw.to_vec(),
    )?;
    SshSig::new(
        key.public_key().key_data().clone(),
        namespace,
        HashAlg::Sha512,
        signature,
    )
}

/// Key types whose signatures can be checked (and made, for the
/// non-security-key ones).
fn supported(algorithm: &Algorithm) -> bool {
    matches!(
        algorithm,
        Algorithm::Ed25519
            | Algorithm::Rsa { .. }
            | Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP256
            }
            | Algorithm::SkEd25519
            | Algorithm::SkEcdsaSha2NistP256
    )
}

/// Which time an entry's validity window was checked at, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum When {
    /// A commit's committer time.
    Commit,
    /// The time passed to [`verify_detached`].
    Checked,
}

/// What kind of armored signature a text is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Armor {
    Ssh,
    OpenPgp,
    X509,
    Unknown,
}

pub(super) fn armor(text: &str) -> Armor {
    let text = text.trim_start();
    if text.starts_with("-----BEGIN SSH SIGNATURE-----") {
        Armor::Ssh
    } else if text.starts_with("-----BEGIN PGP SIGNATURE-----") {
        Armor::OpenPgp
    } else if text.starts_with("-----BEGIN SIGNED MESSAGE-----") {
        Armor::X509
    } else {
        Armor::Unknown
    }
}

/// Why a signature was not accepted. [`Rejection::describe`] words it for
/// a subject ("the signed data", "commit 1a2b3c4 (\"...\")").
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Rejection {
    OpenPgp,
    X509,
    NotArmored,
    Malformed(String),
    WrongNamespace {
        found: String,
        expected: String,
    },
    Certificate(String),
    Unsupported(String),
    BadSignature {
        fingerprint: String,
        algorithm: String,
    },
    UnknownKey {
        fingerprint: String,
        algorithm: String,
        origin: String,
        empty: bool,
        cert_authorities: usize,
    },
    /// The key is listed, but no line allows this use.
    NotAllowed {
        fingerprint: String,
        algorithm: String,
        at: i64,
        reasons: Vec<LineRefusal>,
    },
}

/// Why one allowed signers line that lists the key did not allow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LineRefusal {
    principal: String,
    place: String,
    why: LineWhy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LineWhy {
    Namespace { allowed: String, requested: String },
    Window(WindowMiss),
}

impl Rejection {
    pub(super) fn describe(&self, subject: &str, when: When) -> String {
        match self {
            Self::OpenPgp => format!(
                "{subject} is signed with OpenPGP, only SSH signatures are supported \
                 (sign with `git config gpg.format ssh` + `user.signingkey`)"
            ),
            Self::X509 => {
                format!("{subject} is signed with X.509 (gpgsm), only SSH signatures are supported")
            }
            Self::NotArmored => format!(
                "{subject} carries a signature that is not an SSH signature \
                 (expected -----BEGIN SSH SIGNATURE-----)"
            ),
            Self::Malformed(e) => format!("{subject} has a malformed SSH signature: {e}"),
            Self::WrongNamespace { found, expected } => format!(
                "{subject} is signed for namespace \"{}\", not \"{}\": a signature made for \
                 another purpose is not accepted",
                found.escape_debug(),
                expected.escape_debug()
            ),
            Self::Certificate(kind) => format!(
                "{subject} is signed with an SSH certificate ({kind}); certificate-signed signatures \
                 are not supported: list the signing key itself in the allowed signers file"
            ),
            Self::Unsupported(what) => format!("{subject} is signed with {what}, which is not supported"),
            Self::BadSignature {
                fingerprint,
                algorithm,
            } => format!(
                "{subject} has a bad signature: the payload does not match (tampered?); \
                 the signature names key {fingerprint} ({algorithm})"
            ),
            Self::UnknownKey {
                fingerprint,
                algorithm,
                origin,
                empty,
                cert_authorities,
            } => {
                let mut out = format!(
                    "{subject} is signed by {fingerprint} ({algorithm}), which is not in {origin}"
                );
                if *empty {
                    out.push_str(" (the file lists no keys)");
                } else if *cert_authorities > 0 {
                    let _ = write!(
                        out,
                        "; its {cert_authorities} cert-authority line(s) cannot vouch for it: \
                         certificate-signed signatures (cert-authority entries) are not supported"
                    );
                }
                out
            }
            Self::NotAllowed {
                fingerprint,
                algorithm,
                at,
                reasons,
            } => {
                let mut out = format!("{subject} is signed by {fingerprint} ({algorithm}), but");
                for (i, r) in reasons.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ";" };
                    let _ = write!(out, "{sep} the key of {} ({}) ", r.principal, r.place);
                    match &r.why {
                        LineWhy::Namespace { allowed, requested } => {
                            let _ = write!(
                                out,
                                "is allowed only for namespaces \"{}\", not \"{}\"",
                                allowed.escape_debug(),
                                requested.escape_debug()
                            );
                        }
                        LineWhy::Window(miss) => {
                            let made = match when {
                                When::Commit => "the commit was made at",
                                When::Checked => "the signature was checked for",
                            };
                            let _ = write!(out, "{miss}; {made} {}", time::format(*at));
                        }
                    }
                }
                out
            }
        }
    }
}

/// The whole check; `Ok` only for a valid signature by an allowed key.
pub(super) fn check(
    signers: &AllowedSigners,
    namespace: &str,
    message: &[u8],
    armored: &str,
    at: i64,
) -> Result<Verified, Rejection> {
    match armor(armored) {
        Armor::Ssh => {}
        Armor::OpenPgp => return Err(Rejection::OpenPgp),
        Armor::X509 => return Err(Rejection::X509),
        Armor::Unknown => return Err(Rejection::NotArmored),
    }
    let normalized = normalize_armor(armored);
    let sig = SshSig::from_pem(normalized.as_bytes()).map_err(|e| {
        // ssh-key cannot decode certificates; say what it is instead of
        // "malformed".
        match embedded_key_type(&normalized) {
            Some(kind) if kind.ends_with("-cert-v01@openssh.com") => Rejection::Certificate(kind),
            _ => Rejection::Malformed(e.to_string()),
        }
    })?;
    if sig.namespace() != namespace {
        return Err(Rejection::WrongNamespace {
            found: sig.namespace().to_string(),
            expected: namespace.to_string(),
        });
    }
    let key_data = sig.public_key();
    let key_algorithm = key_data.algorithm();
    if let Algorithm::Other(name) = &key_algorithm {
        if name.as_str().ends_with("-cert-v01@openssh.com") {
            return Err(Rejection::Certificate(name.as_str().to_string()));
        }
    }
    if !supported(&key_algorithm) {
        return Err(Rejection::Unsupported(format!(
            "a {} key",
            key_algorithm.as_str()
        )));
    }
    if sig.algorithm() == (Algorithm::Rsa { hash: None }) {
        return Err(Rejection::Unsupported(
            "an ssh-rsa (SHA-1) signature; sign with rsa-sha2-256 or rsa-sha2-512".into(),
        ));
    }
    let fingerprint = key_data.fingerprint(HashAlg::Sha256).to_string();
    let algorithm = key_algorithm.as_str().to_string();
    let key = PublicKey::new(key_data.clone(), "");
    if key.verify(namespace, message, &sig).is_err() {
        return Err(Rejection::BadSignature {
            fingerprint,
            algorithm,
        });
    }

    let origin = signers.origin().display().to_string();
    let mut reasons = Vec::new();
    for entry in signers.entries() {
        if entry.is_cert_authority() || entry.key().key_data() != key_data {
            continue;
        }
        let place = format!("{origin}:{}", entry.line());
        let why = if !entry.allows_namespace(namespace) {
            LineWhy::Namespace {
                allowed: entry.namespaces().unwrap_or_default().to_string(),
                requested: namespace.to_string(),
            }
        } else if let Some(miss) = entry.window_excludes(at) {
            LineWhy::Window(miss)
        } else {
            return Ok(Verified {
                principal: entry.principals().to_string(),
                fingerprint,
                algorithm,
            });
        };
        reasons.push(LineRefusal {
            principal: entry.principals().to_string(),
            place,
            why,
        });
    }
    if reasons.is_empty() {
        let cert_authorities = signers
            .entries()
            .iter()
            .filter(|e| e.is_cert_authority())
            .count();
        return Err(Rejection::UnknownKey {
            fingerprint,
            algorithm,
            origin,
            empty: signers.is_empty(),
            cert_authorities,
        });
    }
    Err(Rejection::NotAllowed {
        fingerprint,
        algorithm,
        at,
        reasons,
    })
}

/// The PEM decoder wants `\n` line ends and the armor at the start; git
/// stores the header without a final newline, files may have CRLF and
/// surrounding blank lines.
fn normalize_armor(armored: &str) -> String {
    let mut out = String::with_capacity(armored.len() + 1);
    for line in armored.trim().lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The key type named inside an armored SSHSIG (`"SSHSIG"`, u32 version,
/// string public key whose first field is the type), without decoding the
/// rest. `None` if the blob is not shaped like that.
fn embedded_key_type(normalized: &str) -> Option<String> {
    use base64::Engine;
    let body: String = normalized
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let blob = base64::engine::general_purpose::STANDARD
        .decode(body)
        .ok()?;
    let rest = blob.strip_prefix(b"SSHSIG")?.get(4..)?;
    let key = read_string(rest)?;
    let kind = read_string(key)?;
    std::str::from_utf8(kind).ok().map(str::to_string)
}

/// An SSH wire `string` (u32 big-endian length, bytes) at the start.
fn read_string(data: &[u8]) -> Option<&[u8]> {
    let len: [u8; 4] = data.get(..4)?.try_into().ok()?;
    let len = usize::try_from(u32::from_be_bytes(len)).ok()?;
    data.get(4..)?.get(..len)
}
