//! The `sops` metadata: who can open the data key, how the MAC is keyed, and
//! which values are encrypted [stores/stores.go, stores/metadata.go].
//!
//! YAML and JSON files hold it as a nested `sops` map. dotenv and INI cannot
//! nest, so sops flattens it into keys like `age__list_0__map_enc`
//! [stores/flatten.go], with newlines written as `\n`; [`unflatten`] turns
//! those back into the same nested shape, and [`Metadata::from_node`] reads
//! either. Values are read with weak typing (dotenv/INI only have strings),
//! unknown fields are ignored, and `kms: []`, `kms: null` and a missing `kms`
//! mean the same.

use regex::Regex;

use super::error::ErrorKind;
use super::gocompat::Timestamp;
use super::tree::{Entry, Node, Scalar};

/// One age stanza: a recipient and the armored age file holding the data key
/// (or this group's Shamir share).
#[derive(Clone, Debug)]
pub(crate) struct AgeStanza {
    pub recipient: String,
    pub enc: String,
}

/// One key group. Only age entries can be opened here; the others are kept
/// as descriptions for error messages.
#[derive(Clone, Debug, Default)]
pub(crate) struct KeyGroup {
    pub age: Vec<AgeStanza>,
    pub others: Vec<String>,
}

/// Which values are encrypted.
#[derive(Clone, Debug)]
pub(crate) enum Rule {
    UnencryptedSuffix(String),
    EncryptedSuffix(String),
    UnencryptedRegex(Regex),
    EncryptedRegex(Regex),
}

#[derive(Clone, Debug)]
pub(crate) struct Metadata {
    pub groups: Vec<KeyGroup>,
    /// Number of groups needed when there are several (0 in the file means
    /// all of them).
    pub threshold: usize,
    /// `lastmodified` re-formatted the Go way: the AAD of the MAC.
    pub mac_aad: String,
    pub lastmodified: String,
    pub mac: Option<String>,
    pub rule: Rule,
    pub unencrypted_comment_regex: Option<Regex>,
    pub encrypted_comment_regex: Option<Regex>,
    pub mac_only_encrypted: bool,
    pub version: Option<String>,
}

fn meta_err(msg: impl Into<String>) -> ErrorKind {
    ErrorKind::Metadata(msg.into())
}

/// The text of a scalar, the way Go decodes a YAML/JSON scalar into a string
/// field.
fn scalar_text(node: &Node) -> Option<String> {
    match node {
        Node::Scalar(Scalar::Str(s)) => Some(s.to_string()),
        Node::Scalar(Scalar::Int(i)) => Some(i.to_string()),
        Node::Scalar(Scalar::Bool(b)) => Some(b.to_string()),
        Node::Scalar(Scalar::Float(f)) => Some(super::gocompat::format_float(*f)),
        Node::Scalar(Scalar::Time(t)) => Some(t.format_rfc3339_nano()),
        _ => None,
    }
}

fn string_field(map: &Node, name: &str) -> Result<Option<String>, ErrorKind> {
    match map.get(name) {
        None | Some(Node::Null) => Ok(None),
        Some(n) => scalar_text(n)
            .map(|s| if s.is_empty() { None } else { Some(s) })
            .ok_or_else(|| meta_err(format!("`{name}` must be a string"))),
    }
}

fn list_field<'a>(map: &'a Node, name: &str) -> Result<Vec<&'a Node>, ErrorKind> {
    match map.get(name) {
        None | Some(Node::Null) => Ok(Vec::new()),
        Some(Node::List(items)) => Ok(items
            .iter()
            .filter(|n| !matches!(n, Node::Comment(_)))
            .collect()),
        Some(_) => Err(meta_err(format!("`{name}` must be a list"))),
    }
}

fn compile(name: &str, pattern: &str) -> Result<Regex, ErrorKind> {
    Regex::new(pattern).map_err(|_| {
        meta_err(format!(
            "`{name}` is not a regular expression this reader understands"
        ))
    })
}

/// Master-key types other than age: the field that identifies each entry.
const OTHER_TYPES: &[(&str, &str)] = &[
    ("pgp", "fp"),
    ("kms", "arn"),
    ("gcp_kms", "resource_id"),
    ("azure_kv", "vault_url"),
    ("hc_vault", "key_name"),
    ("hckms", "key_id"),
];

fn read_group(node: &Node) -> Result<KeyGroup, ErrorKind> {
    let mut group = KeyGroup::default();
    for entry in list_field(node, "age")? {
        let recipient = string_field(entry, "recipient")?.unwrap_or_default();
        let enc =
            string_field(entry, "enc")?.ok_or_else(|| meta_err("an `age` entry has no `enc`"))?;
        group.age.push(AgeStanza { recipient, enc });
    }
    for (ty, id_field) in OTHER_TYPES {
        for entry in list_field(node, ty)? {
            let id = string_field(entry, id_field)?.unwrap_or_else(|| "?".into());
            group.others.push(format!("{ty} {id}"));
        }
    }
    Ok(group)
}

fn has_keys(group: &KeyGroup) -> bool {
    !group.age.is_empty() || !group.others.is_empty()
}

impl Metadata {
    /// Reads the metadata from the `sops` map.
    pub(crate) fn from_node(node: &Node) -> Result<Metadata, ErrorKind> {
        if !matches!(node, Node::Map(_)) {
            return Err(meta_err("`sops` must be a map"));
        }
        let lastmodified = string_field(node, "lastmodified")?
            .ok_or_else(|| meta_err("`lastmodified` is missing"))?;
        let mac_aad = Timestamp::parse_rfc3339(&lastmodified)
            .ok_or_else(|| meta_err("`lastmodified` is not an RFC 3339 time"))?
            .format_rfc3339();

        let top = read_group(node)?;
        let groups = if has_keys(&top) {
            vec![top]
        } else {
            let groups = list_field(node, "key_groups")?
                .into_iter()
                .map(read_group)
                .collect::<Result<Vec<_>, _>>()?;
            if groups.is_empty() {
                return Err(meta_err("the file lists no keys"));
            }
            groups
        };
        let threshold = match node.get("shamir_threshold") {
            None | Some(Node::Null) => 0,
            Some(Node::Scalar(Scalar::Int(i))) if *i >= 0 => *i as usize,
            Some(n) => scalar_text(n)
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| meta_err("`shamir_threshold` must be a number"))?,
        };
        let mac_only_encrypted = match node.get("mac_only_encrypted") {
            None | Some(Node::Null) => false,
            Some(Node::Scalar(Scalar::Bool(b))) => *b,
            Some(n) => scalar_text(n)
                .and_then(|s| super::gocompat::parse_bool(&s))
                .ok_or_else(|| meta_err("`mac_only_encrypted` must be true or false"))?,
        };

        let rules = [
            (
                "unencrypted_suffix",
                string_field(node, "unencrypted_suffix")?,
            ),
            ("encrypted_suffix", string_field(node, "encrypted_suffix")?),
            (
                "unencrypted_regex",
                string_field(node, "unencrypted_regex")?,
            ),
            ("encrypted_regex", string_field(node, "encrypted_regex")?),
        ];
        let set: Vec<_> = rules.iter().filter(|(_, v)| v.is_some()).collect();
        if set.len() > 1 {
            return Err(meta_err(format!(
                "more than one crypt rule is set ({}); sops allows only one",
                set.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            )));
        }
        let rule = match set.first() {
            None => Rule::UnencryptedSuffix("_unencrypted".into()),
            Some((name, Some(v))) => match *name {
                "unencrypted_suffix" => Rule::UnencryptedSuffix(v.clone()),
                "encrypted_suffix" => Rule::EncryptedSuffix(v.clone()),
                "unencrypted_regex" => Rule::UnencryptedRegex(compile(name, v)?),
                _ => Rule::EncryptedRegex(compile(name, v)?),
            },
            Some((_, None)) => Rule::UnencryptedSuffix("_unencrypted".into()),
        };
        let comment_regex = |name: &str| -> Result<Option<Regex>, ErrorKind> {
            string_field(node, name)?
                .map(|v| compile(name, &v))
                .transpose()
        };
        Ok(Metadata {
            groups,
            threshold,
            mac_aad,
            lastmodified,
            mac: string_field(node, "mac")?,
            rule,
            unencrypted_comment_regex: comment_regex("unencrypted_comment_regex")?,
            encrypted_comment_regex: comment_regex("encrypted_comment_regex")?,
            mac_only_encrypted,
            version: string_field(node, "version")?,
        })
    }

    /// All age recipients of the file, in order.
    pub(crate) fn age_recipients(&self) -> Vec<String> {
        self.groups
            .iter()
            .flat_map(|g| g.age.iter().map(|a| a.recipient.clone()))
            .collect()
    }

    pub(crate) fn other_keys(&self) -> Vec<String> {
        self.groups
            .iter()
            .flat_map(|g| g.others.iter().cloned())
            .collect()
    }
}

/// One step of a flattened metadata key.
#[derive(Debug)]
enum Tok {
    Key(String),
    Index(usize),
}

/// Splits `key_groups__list_0__map_age` into `[key_groups, 0, age]`.
fn tokenize(path: &str) -> Result<Vec<Tok>, ErrorKind> {
    let mut toks = Vec::new();
    let mut rest = path;
    let mut kind = 'k';
    loop {
        let next_map = rest.find("__map_");
        let next_list = rest.find("__list_");
        let (cut, sep_len, next_kind) = match (next_map, next_list) {
            (Some(m), Some(l)) if l < m => (l, 7, 'l'),
            (Some(m), _) => (m, 6, 'k'),
            (None, Some(l)) => (l, 7, 'l'),
            (None, None) => (rest.len(), 0, ' '),
        };
        let piece = &rest[..cut];
        toks.push(if kind == 'l' {
            Tok::Index(
                piece
                    .parse()
                    .map_err(|_| meta_err("a flattened metadata key has a bad list index"))?,
            )
        } else {
            Tok::Key(piece.to_string())
        });
        if next_kind == ' ' {
            return Ok(toks);
        }
        rest = &rest[cut + sep_len..];
        kind = next_kind;
    }
}

enum Tmp {
    Map(Vec<(String, Tmp)>),
    List(Vec<Option<Tmp>>),
    Leaf(String),
}

fn insert(node: &mut Tmp, toks: &[Tok], value: &str) -> Result<(), ErrorKind> {
    let clash = || meta_err("flattened metadata keys contradict each other");
    let Some((first, rest)) = toks.split_first() else {
        return Err(clash());
    };
    let make = |rest: &[Tok]| match rest.first() {
        None => Tmp::Leaf(value.to_string()),
        Some(Tok::Key(_)) => Tmp::Map(Vec::new()),
        Some(Tok::Index(_)) => Tmp::List(Vec::new()),
    };
    let child: &mut Tmp = match (node, first) {
        (Tmp::Map(entries), Tok::Key(k)) => {
            let pos = match entries.iter().position(|(key, _)| key == k) {
                Some(p) => p,
                None => {
                    entries.push((k.clone(), make(rest)));
                    entries.len() - 1
                }
            };
            &mut entries[pos].1
        }
        (Tmp::List(items), Tok::Index(i)) => {
            if *i > 10_000 {
                return Err(meta_err("a flattened metadata list index is too large"));
            }
            if items.len() <= *i {
                items.resize_with(*i + 1, || None);
            }
            items[*i].get_or_insert_with(|| make(rest))
        }
        _ => return Err(clash()),
    };
    if rest.is_empty() {
        return match child {
            Tmp::Leaf(_) => Ok(()),
            _ => Err(clash()),
        };
    }
    if matches!(child, Tmp::Leaf(_)) {
        return Err(clash());
    }
    insert(child, rest, value)
}

fn tmp_to_node(t: Tmp) -> Node {
    match t {
        Tmp::Leaf(s) => Node::str(s),
        Tmp::Map(entries) => Node::Map(
            entries
                .into_iter()
                .map(|(k, v)| Entry::Pair(k, tmp_to_node(v)))
                .collect(),
        ),
        Tmp::List(items) => Node::List(
            items
                .into_iter()
                .map(|i| i.map_or(Node::Null, tmp_to_node))
                .collect(),
        ),
    }
}

/// Rebuilds the nested metadata map from flattened `(key, value)` pairs
/// (dotenv without its `sops_` prefix, INI `[sops]`). `\n` in values becomes
/// a newline, as in sops.
pub(crate) fn unflatten(pairs: &[(String, String)]) -> Result<Node, ErrorKind> {
    let mut root = Tmp::Map(Vec::new());
    for (k, v) in pairs {
        let toks = tokenize(k)?;
        insert(&mut root, &toks, &v.replace("\\n", "\n"))?;
    }
    Ok(tmp_to_node(root))
}

/// Flattens a nested metadata map into `(key, value)` pairs (the inverse of
/// [`unflatten`]; used by the test encryptor). Newlines become `\n`.
#[cfg(test)]
pub(crate) fn flatten(node: &Node) -> Vec<(String, String)> {
    fn walk(prefix: &str, node: &Node, out: &mut Vec<(String, String)>) {
        match node {
            Node::Map(entries) => {
                for e in entries {
                    if let Entry::Pair(k, v) = e {
                        let p = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}__map_{k}")
                        };
                        walk(&p, v, out);
                    }
                }
            }
            Node::List(items) => {
                for (i, v) in items.iter().enumerate() {
                    walk(&format!("{prefix}__list_{i}"), v, out);
                }
            }
            other => {
                if let Some(s) = scalar_text(other) {
                    out.push((prefix.to_string(), s.replace('\n', "\\n")));
                }
            }
        }
    }
    let mut out = Vec::new();
    walk("", node, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unflatten_rebuilds_lists_and_maps() {
        let pairs = vec![
            ("age__list_1__map_recipient".to_string(), "r1".to_string()),
            (
                "age__list_0__map_enc".to_string(),
                "line1\\nline2".to_string(),
            ),
            ("age__list_0__map_recipient".to_string(), "r0".to_string()),
            ("age__list_1__map_enc".to_string(), "e1".to_string()),
            (
                "key_groups__list_0__map_age__list_0__map_enc".to_string(),
                "g".to_string(),
            ),
            (
                "lastmodified".to_string(),
                "2024-01-01T00:00:00Z".to_string(),
            ),
        ];
        let node = unflatten(&pairs).unwrap();
        let age = list_field(&node, "age").unwrap();
        assert_eq!(age.len(), 2);
        assert_eq!(string_field(age[0], "recipient").unwrap().unwrap(), "r0");
        assert_eq!(
            string_field(age[0], "enc").unwrap().unwrap(),
            "line1\nline2"
        );
        let groups = list_field(&node, "key_groups").unwrap();
        let g_age = list_field(groups[0], "age").unwrap();
        assert_eq!(string_field(g_age[0], "enc").unwrap().unwrap(), "g");
        let mut back = flatten(&node);
        back.sort();
        let mut orig = pairs.clone();
        orig.sort();
        assert_eq!(back, orig);
        assert!(unflatten(&[
            ("a".to_string(), "x".to_string()),
            ("a__map_b".to_string(), "y".to_string())
        ])
        .is_err());
    }
}
