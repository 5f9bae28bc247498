//! One encrypted value: `ENC[AES256_GCM,data:…,iv:…,tag:…,type:…]`.
//!
//! sops encrypts every value separately with AES-256-GCM under the file's
//! 32-byte data key, with a **32-byte** nonce (Go's
//! `cipher.NewGCMWithNonceSize(…, 32)`; the GCM counter block is then derived
//! with GHASH, which RustCrypto's `AesGcm<Aes256, U32>` implements) and with
//! the value's key path as additional authenticated data, so a ciphertext
//! cannot be moved to another key. The plaintext is text interpreted by the
//! `type` field [aes/cipher.go].
//!
//! The value syntax is matched like sops' regular expression
//! `^ENC\[AES256_GCM,data:(.+),iv:(.+),tag:(.+),type:(.+)\]` (greedy, not
//! anchored at the end), so anything sops accepts is accepted here.

use std::sync::OnceLock;

use aes_gcm::aead::consts::U32;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{AesGcm, Nonce, Tag};
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use regex::Regex;
use zeroize::Zeroizing;

use super::error::ErrorKind;
use super::gocompat::{self, Timestamp};
use super::tree::{Node, Scalar};

type SopsGcm = AesGcm<aes::Aes256, U32>;

/// sops' data key.
pub(crate) type DataKey = Zeroizing<[u8; 32]>;

/// Go's `base64.StdEncoding`: standard alphabet, padding required, trailing
/// bits ignored.
const GO_STD: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::RequireCanonical)
        .with_decode_allow_trailing_bits(true),
);

fn enc_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"^ENC\[AES256_GCM,data:(.+),iv:(.+),tag:(.+),type:(.+)\]")
            .unwrap_or_else(|e| panic!("static regex: {e}"))
    })
}

/// The parts of an `ENC[...]` value.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct EncValue {
    pub data: Vec<u8>,
    pub iv: [u8; 32],
    pub tag: [u8; 16],
    pub ty: String,
}

/// Whether a string looks like an encrypted value at all (used to tell
/// "malformed" from "not encrypted").
pub(crate) fn looks_encrypted(s: &str) -> bool {
    s.starts_with("ENC[")
}

/// Parses an `ENC[...]` string.
pub(crate) fn parse_enc(s: &str) -> Result<EncValue, ErrorKind> {
    let caps = enc_regex().captures(s).ok_or_else(|| {
        ErrorKind::MalformedEnc(if s.starts_with("ENC[") {
            if !s.starts_with("ENC[AES256_GCM,") {
                "only AES256_GCM values exist".to_string()
            } else {
                "a field is missing or empty".to_string()
            }
        } else {
            "it does not start with `ENC[`".to_string()
        })
    })?;
    let field = |i: usize| caps.get(i).map_or("", |m| m.as_str());
    let decode = |name: &'static str, text: &str| {
        GO_STD
            .decode(text)
            .map_err(|_| ErrorKind::InvalidBase64(name))
    };
    let data = decode("data", field(1))?;
    let iv = decode("iv", field(2))?;
    let tag = decode("tag", field(3))?;
    let iv: [u8; 32] = iv.try_into().map_err(|v: Vec<u8>| {
        ErrorKind::MalformedEnc(format!("the iv is {} bytes, sops uses 32", v.len()))
    })?;
    let tag: [u8; 16] = tag.try_into().map_err(|v: Vec<u8>| {
        ErrorKind::MalformedEnc(format!("the tag is {} bytes, AES-GCM uses 16", v.len()))
    })?;
    Ok(EncValue {
        data,
        iv,
        tag,
        ty: field(4).to_string(),
    })
}

/// Opens an encrypted value; returns the plaintext bytes and the type.
pub(crate) fn open(
    enc: &EncValue,
    key: &[u8; 32],
    aad: &str,
) -> Result<Zeroizing<Vec<u8>>, ErrorKind> {
    let cipher = SopsGcm::new(key.into());
    let mut buf = Zeroizing::new(enc.data.clone());
    cipher
        .decrypt_in_place_detached(
            Nonce::<U32>::from_slice(&enc.iv),
            aad.as_bytes(),
            &mut buf,
            Tag::from_slice(&enc.tag),
        )
        .map_err(|_| ErrorKind::Tampered)?;
    Ok(buf)
}

/// A decrypted `ENC[...]` value.
pub(crate) enum Plain {
    Value(Scalar),
    Comment(Zeroizing<String>),
}

fn text(bytes: &Zeroizing<Vec<u8>>, ty: &str) -> Result<Zeroizing<String>, ErrorKind> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(Zeroizing::new(s.to_string())),
        Err(_) => Err(ErrorKind::BadPlaintext(format!(
            "type `{ty}` but the plaintext is not UTF-8"
        ))),
    }
}

/// Decrypts a sops value string (`""` stays `""`, as in sops) and converts
/// the plaintext to its declared type.
pub(crate) fn decrypt_value(s: &str, key: &[u8; 32], aad: &str) -> Result<Plain, ErrorKind> {
    if s.is_empty() {
        return Ok(Plain::Value(Scalar::Str(Zeroizing::new(String::new()))));
    }
    let enc = parse_enc(s)?;
    // Check the type before decrypting, so an unknown type is reported as
    // such even with a wrong key.
    if !matches!(
        enc.ty.as_str(),
        "str" | "int" | "int64" | "float" | "bytes" | "bool" | "time" | "comment"
    ) {
        return Err(ErrorKind::UnknownType(enc.ty.clone()));
    }
    let bytes = open(&enc, key, aad)?;
    let bad = |what: &str| ErrorKind::BadPlaintext(format!("type `{}` but not {what}", enc.ty));
    Ok(match enc.ty.as_str() {
        "str" => match String::from_utf8(bytes.to_vec()) {
            // Go strings are bytes: a `str` need not be UTF-8 (binary files
            // stored with the binary store are the common case).
            Ok(s) => Plain::Value(Scalar::Str(Zeroizing::new(s))),
            Err(e) => Plain::Value(Scalar::Bytes(Zeroizing::new(e.into_bytes()))),
        },
        "int" | "int64" => {
            let t = text(&bytes, &enc.ty)?;
            Plain::Value(Scalar::Int(
                gocompat::parse_int(&t).ok_or_else(|| bad("an integer"))?,
            ))
        }
        "float" => {
            let t = text(&bytes, &enc.ty)?;
            Plain::Value(Scalar::Float(
                gocompat::parse_float(&t).ok_or_else(|| bad("a number"))?,
            ))
        }
        "bool" => {
            let t = text(&bytes, &enc.ty)?;
            Plain::Value(Scalar::Bool(
                gocompat::parse_bool(&t).ok_or_else(|| bad("a boolean"))?,
            ))
        }
        "bytes" => Plain::Value(Scalar::Bytes(bytes)),
        "time" => {
            let t = text(&bytes, &enc.ty)?;
            Plain::Value(Scalar::Time(
                Timestamp::parse_rfc3339(&t).ok_or_else(|| bad("an RFC 3339 time"))?,
            ))
        }
        _ => Plain::Comment(text(&bytes, &enc.ty)?),
    })
}

/// The bytes sops feeds into the MAC for a value (`sops.ToBytes`).
pub(crate) fn mac_bytes(node: &Node) -> Option<Zeroizing<Vec<u8>>> {
    let Node::Scalar(s) = node else {
        return None;
    };
    Some(Zeroizing::new(match s {
        Scalar::Str(s) => s.as_bytes().to_vec(),
        Scalar::Bytes(b) => b.to_vec(),
        Scalar::Int(i) => i.to_string().into_bytes(),
        Scalar::Float(f) => gocompat::format_float(*f).into_bytes(),
        Scalar::Bool(b) => gocompat::format_bool(*b).as_bytes().to_vec(),
        Scalar::Time(t) => t.format_rfc3339_nano().into_bytes(),
    }))
}

#[cfg(test)]
/// Encrypts one value the way sops does (`aes.Cipher.Encrypt`). `None` for a
/// type sops cannot encrypt. An empty string or comment stays empty.
///
/// Decryption never needs this; it exists so that tests can build encrypted
/// files for the rules the real fixtures do not cover, and prove the result
/// byte-for-byte against files written by sops.
pub(crate) fn encrypt_value(
    plain: &Node,
    key: &[u8; 32],
    aad: &str,
    iv: &[u8; 32],
) -> Option<String> {
    let (bytes, ty): (Zeroizing<Vec<u8>>, &str) = match plain {
        Node::Comment(c) => (Zeroizing::new(c.as_bytes().to_vec()), "comment"),
        Node::Scalar(Scalar::Str(s)) => (Zeroizing::new(s.as_bytes().to_vec()), "str"),
        Node::Scalar(Scalar::Bytes(b)) => (Zeroizing::new(b.to_vec()), "bytes"),
        Node::Scalar(Scalar::Int(_)) => (mac_bytes(plain)?, "int"),
        Node::Scalar(Scalar::Float(_)) => (mac_bytes(plain)?, "float"),
        Node::Scalar(Scalar::Bool(_)) => (mac_bytes(plain)?, "bool"),
        Node::Scalar(Scalar::Time(_)) => (mac_bytes(plain)?, "time"),
        _ => return None,
    };
    if bytes.is_empty() && matches!(ty, "str" | "comment" | "bytes") {
        return Some(String::new());
    }
    Some(seal(&bytes, ty, key, aad, iv))
}

#[cfg(test)]
/// AES-256-GCM seal of raw bytes, formatted as an `ENC[...]` value.
pub(crate) fn seal(bytes: &[u8], ty: &str, key: &[u8; 32], aad: &str, iv: &[u8; 32]) -> String {
    let cipher = SopsGcm::new(key.into());
    let mut buf = bytes.to_vec();
    let tag = cipher
        .encrypt_in_place_detached(Nonce::<U32>::from_slice(iv), aad.as_bytes(), &mut buf)
        .unwrap_or_else(|e| panic!("AES-GCM encryption cannot fail for short inputs: {e}"));
    let b64 = base64::engine::general_purpose::STANDARD;
    format!(
        "ENC[AES256_GCM,data:{},iv:{},tag:{},type:{ty}]",
        b64.encode(&buf),
        b64.encode(iv),
        b64.encode(tag)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7u8; 32];

    #[test]
    fn seal_open_round_trip_with_aad() {
        let iv = [3u8; 32];
        let s = seal(b"hello", "str", &KEY, "a:b:", &iv);
        let enc = parse_enc(&s).unwrap();
        assert_eq!(enc.ty, "str");
        assert_eq!(&open(&enc, &KEY, "a:b:").unwrap()[..], b"hello");
        assert_eq!(open(&enc, &KEY, "a:c:"), Err(ErrorKind::Tampered));
        assert_eq!(open(&enc, &[8u8; 32], "a:b:"), Err(ErrorKind::Tampered));
    }

    #[test]
    fn malformed_values() {
        let good = seal(b"x", "str", &KEY, "k:", &[1u8; 32]);
        assert!(parse_enc(&good).is_ok());
        // Trailing text after `]` is accepted, as by sops' regex.
        assert!(parse_enc(&format!("{good}trailing")).is_ok());
        for bad in [
            "ENC[AES256_GCM,data:,iv:,tag:,type:str]",
            "ENC[AES256_CBC,data:AA==,iv:AA==,tag:AA==,type:str]",
            "ENC[AES256_GCM,data:AA==,iv:AA==,tag:AA==]",
            "ENC[",
            "plain",
        ] {
            assert!(
                matches!(parse_enc(bad), Err(ErrorKind::MalformedEnc(_))),
                "{bad}"
            );
        }
        let short_iv = good.replace("iv:", "iv:AAAA,x:");
        assert!(parse_enc(&short_iv).is_err());
        let bad_b64 = good.replacen("data:", "data:!!", 1);
        assert_eq!(parse_enc(&bad_b64), Err(ErrorKind::InvalidBase64("data")));
    }

    #[test]
    fn types_decode() {
        let iv = [9u8; 32];
        let cases: &[(&[u8], &str, &str)] = &[
            (b"7", "int", "7"),
            (b"+7", "int", "7"),
            (b"1.50", "float", "1.5"),
            (b"True", "bool", "True"),
            (b"false", "bool", "False"),
            (
                b"2024-01-02T03:04:05.600+02:00",
                "time",
                "2024-01-02T03:04:05.6+02:00",
            ),
        ];
        for (plain, ty, canonical) in cases {
            let s = seal(plain, ty, &KEY, "x:", &iv);
            match decrypt_value(&s, &KEY, "x:").unwrap() {
                Plain::Value(v) => {
                    let mac = mac_bytes(&Node::Scalar(v)).unwrap();
                    assert_eq!(std::str::from_utf8(&mac).unwrap(), *canonical);
                }
                Plain::Comment(_) => panic!("not a comment"),
            }
        }
        let s = seal(b"x", "weird", &KEY, "x:", &iv);
        assert!(matches!(
            decrypt_value(&s, &KEY, "x:"),
            Err(ErrorKind::UnknownType(t)) if t == "weird"
        ));
        let s = seal(b"seven", "int", &KEY, "x:", &iv);
        assert!(matches!(
            decrypt_value(&s, &KEY, "x:"),
            Err(ErrorKind::BadPlaintext(_))
        ));
    }
}
