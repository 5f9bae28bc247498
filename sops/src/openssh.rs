//! Reading the public half of an SSH private key file.
//!
//! The age crate decrypts with SSH keys but does not expose their public
//! key. driftless needs it twice: to print a host's recipient
//! (`driftless host-recipient`) and to derive the `ssh-to-age` X25519 key
//! from an ed25519 seed. Both key formats age accepts are read here:
//!
//! * OpenSSH (`-----BEGIN OPENSSH PRIVATE KEY-----`, "openssh-key-v1"): the
//!   public key blob is stored in clear before the private section; for an
//!   unencrypted ed25519 key the private section holds seed‖public.
//! * PKCS#1 PEM RSA (`-----BEGIN RSA PRIVATE KEY-----`): the DER sequence
//!   starts with version, n, e; the SSH blob is `ssh-rsa`, e, n (DER
//!   INTEGER content and SSH mpint share the same two's-complement form).

use base64::Engine;
use zeroize::Zeroizing;

pub(crate) struct KeyInfo {
    /// `ssh-ed25519 AAAA…` or `ssh-rsa AAAA…`.
    pub recipient: String,
    pub ed25519_seed: Option<Zeroizing<[u8; 32]>>,
}

fn pem_body(text: &str, begin: &str, end: &str) -> Option<Zeroizing<Vec<u8>>> {
    let start = text.find(begin)? + begin.len();
    let stop = start + text[start..].find(end)?;
    let b64: Zeroizing<String> = Zeroizing::new(
        text[start..stop]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect(),
    );
    base64::engine::general_purpose::STANDARD
        .decode(b64.as_bytes())
        .ok()
        .map(Zeroizing::new)
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.b.split_at_checked(4)?;
        self.b = rest;
        Some(u32::from_be_bytes(head.try_into().ok()?))
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        let (head, rest) = self.b.split_at_checked(n)?;
        self.b = rest;
        Some(head)
    }
}

fn ssh_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

fn openssh(text: &str) -> Option<KeyInfo> {
    let data = pem_body(
        text,
        "-----BEGIN OPENSSH PRIVATE KEY-----",
        "-----END OPENSSH PRIVATE KEY-----",
    )?;
    let rest = data.strip_prefix(b"openssh-key-v1\0")?;
    let mut r = Reader { b: rest };
    let cipher = r.string()?;
    let _kdf = r.string()?;
    let _kdf_options = r.string()?;
    if r.u32()? != 1 {
        return None;
    }
    let public = r.string()?;
    let mut pr = Reader { b: public };
    let ty = std::str::from_utf8(pr.string()?).ok()?.to_string();
    let recipient = format!(
        "{ty} {}",
        base64::engine::general_purpose::STANDARD.encode(public)
    );
    let mut ed25519_seed = None;
    if ty == "ssh-ed25519" && cipher == b"none" {
        let private = r.string()?;
        let mut p = Reader { b: private };
        let (c1, c2) = (p.u32()?, p.u32()?);
        if c1 == c2 && p.string()? == b"ssh-ed25519" {
            let _pk = p.string()?;
            let sk = p.string()?;
            if sk.len() == 64 {
                let mut seed = Zeroizing::new([0u8; 32]);
                seed.copy_from_slice(&sk[..32]);
                ed25519_seed = Some(seed);
            }
        }
    }
    Some(KeyInfo {
        recipient,
        ed25519_seed,
    })
}

/// Reads one DER TLV; returns (tag, content, rest).
fn der(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&len0, mut rest) = rest.split_first()?;
    let len = if len0 < 0x80 {
        usize::from(len0)
    } else {
        let n = usize::from(len0 & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, r) = rest.split_at_checked(n)?;
        rest = r;
        bytes
            .iter()
            .fold(0usize, |acc, &x| (acc << 8) | usize::from(x))
    };
    let (content, rest) = rest.split_at_checked(len)?;
    Some((tag, content, rest))
}

fn pkcs1_rsa(text: &str) -> Option<KeyInfo> {
    let data = pem_body(
        text,
        "-----BEGIN RSA PRIVATE KEY-----",
        "-----END RSA PRIVATE KEY-----",
    )?;
    let (tag, seq, _) = der(&data)?;
    if tag != 0x30 {
        return None;
    }
    let (t0, _version, rest) = der(seq)?;
    let (t1, n, rest) = der(rest)?;
    let (t2, e, _) = der(rest)?;
    if t0 != 2 || t1 != 2 || t2 != 2 {
        return None;
    }
    let mut blob = Vec::new();
    ssh_string(&mut blob, b"ssh-rsa");
    ssh_string(&mut blob, e);
    ssh_string(&mut blob, n);
    Some(KeyInfo {
        recipient: format!(
            "ssh-rsa {}",
            base64::engine::general_purpose::STANDARD.encode(&blob)
        ),
        ed25519_seed: None,
    })
}

/// The public recipient (and ed25519 seed) of an SSH private key file.
pub(crate) fn inspect(text: &str) -> Option<KeyInfo> {
    openssh(text).or_else(|| pkcs1_rsa(text))
}
