//! Reading the public half of an SSH private key file.
//!
//! The age crate decrypts with SSH keys but does not expose their public
//! key. driftless needs it twice: to print a host's recipient
//! (`driftless host-recipient`) and to derive the `ssh-to-age` X25519 key
//! from an ed25519 seed. Both key formats age accepts are read here, each
//! with the maintained parser of its format (no hand-written decoding):
//!
//! * OpenSSH (`-----BEGIN OPENSSH PRIVATE KEY-----`, "openssh-key-v1"):
//!   `ssh-key`, which also says whether the private half is encrypted; the
//!   ed25519 seed is taken only from an unencrypted key.
//! * PKCS#1 PEM RSA (`-----BEGIN RSA PRIVATE KEY-----`, what older
//!   `ssh-keygen -m PEM` writes and age still reads): `rsa`'s PKCS#1 decoder,
//!   converted to the SSH public key by `ssh-key`.
//!
//! The recipient is `<algorithm> <base64 of the public key blob>`, with no
//! comment: the same string `ssh-keygen -y` prints before the comment and
//! the one sops users put in `.sops.yaml`.

use base64::Engine;
use rsa::pkcs1::DecodeRsaPrivateKey;
use ssh_key::public::KeyData;
use zeroize::Zeroizing;

pub(crate) struct KeyInfo {
    /// `ssh-ed25519 AAAA…` or `ssh-rsa AAAA…`.
    pub recipient: String,
    pub ed25519_seed: Option<Zeroizing<[u8; 32]>>,
}

fn recipient(key: &KeyData) -> Option<String> {
    let blob = ssh_key::PublicKey::from(key.clone()).to_bytes().ok()?;
    Some(format!(
        "{} {}",
        key.algorithm().as_str(),
        base64::engine::general_purpose::STANDARD.encode(blob)
    ))
}

fn openssh(text: &str) -> Option<KeyInfo> {
    let key = ssh_key::PrivateKey::from_openssh(text.trim()).ok()?;
    let ed25519_seed = match key.key_data().ed25519() {
        Some(pair) if !key.is_encrypted() => Some(Zeroizing::new(pair.private.to_bytes())),
        _ => None,
    };
    Some(KeyInfo {
        recipient: recipient(key.public_key().key_data())?,
        ed25519_seed,
    })
}

fn pkcs1_rsa(text: &str) -> Option<KeyInfo> {
    let private = rsa::RsaPrivateKey::from_pkcs1_pem(text.trim()).ok()?;
    let public = ssh_key::public::RsaPublicKey::try_from(private.to_public_key()).ok()?;
    Some(KeyInfo {
        recipient: recipient(&KeyData::Rsa(public))?,
        ed25519_seed: None,
    })
}

/// The public recipient (and ed25519 seed) of an SSH private key file.
pub(crate) fn inspect(text: &str) -> Option<KeyInfo> {
    openssh(text).or_else(|| pkcs1_rsa(text))
}
