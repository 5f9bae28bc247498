//! A test-only sops encryptor.
//!
//! The real fixtures cover only the default crypt rule. To test the other
//! rules, `mac_only_encrypted`, comment regexes and key groups, test files
//! are produced here by following the format exactly (the inverse of the
//! reader: same walk, same AAD, same MAC, same metadata layout per store).
//! The encryptor is itself proven against real sops output in
//! `tests::encryptor_reproduces_real_sops_ciphertexts`: re-encrypting each
//! fixture's plaintext with the fixture's data key and IVs gives back the
//! fixture's ciphertexts byte for byte, and the same MAC.

use std::io::Write;

use sha2::{Digest, Sha256};

use super::crypt;
use super::format::{self, dotenv, ini, json, yaml};
use super::gocompat::Timestamp;
use super::metadata::{flatten, Rule};
use super::shamir;
use super::tree::{Entry, Node, Scalar};
use super::walk::{encrypt::Encryptor, Rules};
use super::Store;

/// How to encrypt a test file.
pub(crate) struct Spec {
    /// (`unencrypted_suffix` | `encrypted_suffix` | `unencrypted_regex` |
    /// `encrypted_regex`, value); `None` writes no rule (default suffix).
    pub rule: Option<(&'static str, String)>,
    /// (`unencrypted_comment_regex` | `encrypted_comment_regex`, value).
    pub comment_rule: Option<(&'static str, String)>,
    pub mac_only_encrypted: bool,
    /// Age recipients per key group (one group: plain `age` list).
    pub groups: Vec<Vec<String>>,
    pub threshold: usize,
    pub lastmodified: String,
    pub with_mac: bool,
}

impl Spec {
    pub(crate) fn simple(recipients: &[&str]) -> Spec {
        Spec {
            rule: None,
            comment_rule: None,
            mac_only_encrypted: false,
            groups: vec![recipients.iter().map(|s| s.to_string()).collect()],
            threshold: 0,
            lastmodified: "2025-01-02T03:04:05Z".into(),
            with_mac: true,
        }
    }
}

/// Wraps `data` for one age recipient (`age1…` or `ssh-…`), armored.
pub(crate) fn age_wrap(data: &[u8], recipient: &str) -> String {
    let r: Box<dyn age::Recipient + Send> = if recipient.starts_with("age1") {
        Box::new(
            recipient
                .parse::<age::x25519::Recipient>()
                .expect("age recipient"),
        )
    } else {
        Box::new(
            recipient
                .parse::<age::ssh::Recipient>()
                .expect("ssh recipient"),
        )
    };
    let enc = age::Encryptor::with_recipients(std::iter::once(r.as_ref() as &dyn age::Recipient))
        .expect("encryptor");
    let mut out = Vec::new();
    let armor = age::armor::ArmoredWriter::wrap_output(&mut out, age::armor::Format::AsciiArmor)
        .expect("armor");
    let mut w = enc.wrap_output(armor).expect("wrap");
    w.write_all(data).expect("write");
    w.finish().and_then(|a| a.finish()).expect("finish");
    String::from_utf8(out).expect("armored text")
}

/// A deterministic IV from the AAD and the walk position.
pub(crate) fn det_iv(aad: &str, n: usize) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(aad.as_bytes());
    h.update(n.to_le_bytes());
    h.finalize().into()
}

fn rule_of(spec: &Spec) -> Rule {
    match &spec.rule {
        None => Rule::UnencryptedSuffix("_unencrypted".into()),
        Some(("unencrypted_suffix", v)) => Rule::UnencryptedSuffix(v.clone()),
        Some(("encrypted_suffix", v)) => Rule::EncryptedSuffix(v.clone()),
        Some(("unencrypted_regex", v)) => {
            Rule::UnencryptedRegex(regex::Regex::new(v).expect("regex"))
        }
        Some(("encrypted_regex", v)) => Rule::EncryptedRegex(regex::Regex::new(v).expect("regex")),
        Some((other, _)) => panic!("unknown rule {other}"),
    }
}

/// Encrypts plaintext documents; returns the encrypted documents and the MAC.
pub(crate) fn encrypt_docs(
    docs: &[Node],
    spec: &Spec,
    key: &[u8; 32],
    iv: &mut dyn FnMut(&str, usize) -> [u8; 32],
) -> (Vec<Node>, String) {
    let rule = rule_of(spec);
    let comment_re = spec
        .comment_rule
        .as_ref()
        .map(|(_, v)| regex::Regex::new(v).expect("regex"));
    let rules = Rules {
        rule: &rule,
        unencrypted_comment: match &spec.comment_rule {
            Some(("unencrypted_comment_regex", _)) => comment_re.as_ref(),
            _ => None,
        },
        encrypted_comment: match &spec.comment_rule {
            Some(("encrypted_comment_regex", _)) => comment_re.as_ref(),
            _ => None,
        },
    };
    let mut hasher = sha2::Sha512::new();
    if spec.mac_only_encrypted {
        hasher.update(super::walk::MAC_ONLY_ENCRYPTED_INIT);
    }
    let mut enc = Encryptor {
        rules,
        key,
        mac_only_encrypted: spec.mac_only_encrypted,
        hasher,
        iv,
        counter: 0,
    };
    let out = docs.iter().map(|d| enc.document(d)).collect();
    let mac = hex::encode_upper(enc.hasher.finalize());
    (out, mac)
}

fn metadata_node(spec: &Spec, key: &[u8; 32], mac: &str, store: Store) -> Node {
    let stanzas = |data: &[u8], recipients: &[String]| {
        Node::List(
            recipients
                .iter()
                .map(|r| {
                    Node::Map(vec![
                        Entry::Pair("recipient".into(), Node::str(r.clone())),
                        Entry::Pair("enc".into(), Node::str(age_wrap(data, r))),
                    ])
                })
                .collect(),
        )
    };
    let mut m = Vec::new();
    if spec.groups.len() == 1 {
        m.push(Entry::Pair("age".into(), stanzas(key, &spec.groups[0])));
    } else {
        let mut state = 0x9E37_79B9u32;
        let shares = shamir::split(key, spec.groups.len(), spec.threshold.max(2), move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        });
        let groups = spec
            .groups
            .iter()
            .zip(&shares)
            .map(|(g, share)| Node::Map(vec![Entry::Pair("age".into(), stanzas(share, g))]))
            .collect();
        m.push(Entry::Pair("key_groups".into(), Node::List(groups)));
        m.push(Entry::Pair(
            "shamir_threshold".into(),
            Node::Scalar(Scalar::Int(spec.threshold as i64)),
        ));
    }
    m.push(Entry::Pair(
        "lastmodified".into(),
        Node::str(spec.lastmodified.clone()),
    ));
    if spec.with_mac {
        let aad = Timestamp::parse_rfc3339(&spec.lastmodified)
            .expect("lastmodified")
            .format_rfc3339();
        let mac_enc = crypt::seal(mac.as_bytes(), "str", key, &aad, &det_iv(&aad, 0));
        m.push(Entry::Pair("mac".into(), Node::str(mac_enc)));
    }
    if let Some((name, v)) = &spec.rule {
        m.push(Entry::Pair((*name).into(), Node::str(v.clone())));
    } else {
        m.push(Entry::Pair(
            "unencrypted_suffix".into(),
            Node::str("_unencrypted"),
        ));
    }
    if let Some((name, v)) = &spec.comment_rule {
        m.push(Entry::Pair((*name).into(), Node::str(v.clone())));
    }
    if spec.mac_only_encrypted {
        let v = match store {
            Store::Yaml | Store::Json | Store::Binary => Node::Scalar(Scalar::Bool(true)),
            _ => Node::str("true"),
        };
        m.push(Entry::Pair("mac_only_encrypted".into(), v));
    }
    m.push(Entry::Pair("version".into(), Node::str("3.10.2")));
    Node::Map(m)
}

/// Emits encrypted documents plus metadata in the layout of `store`.
pub(crate) fn emit_file(docs: Vec<Node>, meta: Node, store: Store) -> String {
    let mut out = String::new();
    let with_sops = |doc: Node, meta: &Node| match doc {
        Node::Map(mut e) => {
            e.push(Entry::Pair("sops".into(), meta.clone()));
            Node::Map(e)
        }
        other => other,
    };
    match store {
        Store::Yaml => {
            let docs: Vec<Node> = docs.into_iter().map(|d| with_sops(d, &meta)).collect();
            yaml::emit(&docs, &mut out);
        }
        Store::Json | Store::Binary => {
            let doc = with_sops(docs.into_iter().next().expect("one document"), &meta);
            json::emit(&doc, &mut out).expect("json");
        }
        Store::Dotenv => {
            dotenv::emit(&docs[0], &mut out).expect("dotenv");
            for (k, v) in flatten(&meta) {
                out.push_str(&format!("sops_{k}={v}\n"));
            }
        }
        Store::Ini => {
            ini::emit(&docs[0], &mut out).expect("ini");
            out.push_str("\n[sops]\n");
            for (k, v) in flatten(&meta) {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
    }
    out
}

/// Encrypts a plaintext file (in `store`'s syntax) following `spec`.
pub(crate) fn encrypt_text(store: Store, plain: &str, spec: &Spec, key: &[u8; 32]) -> String {
    let docs = if store == Store::Binary {
        vec![Node::Map(vec![Entry::Pair(
            "data".into(),
            Node::str(plain),
        )])]
    } else {
        let parsed = format::parse(store, plain).expect("plaintext parses");
        assert!(parsed.sops.is_none(), "plaintext must not have metadata");
        parsed.docs
    };
    let (docs, mac) = encrypt_docs(&docs, spec, key, &mut det_iv);
    let meta = metadata_node(spec, key, &mac, store);
    emit_file(docs, meta, store)
}
