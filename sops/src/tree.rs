//! The ordered value tree every store parses into and every emitter writes
//! from.
//!
//! sops works on one generic tree for all formats (`sops.TreeBranch`): maps
//! keep file order, lists keep their order, comments are items of the map or
//! list that holds them, and scalars carry a type (str, int, float, bool,
//! bytes, time). The same type serves two purposes here:
//!
//! * the *raw* tree straight from a parser: values as they are on disk
//!   (`ENC[...]` strings, clear values with their YAML/JSON type), plus the
//!   `sops` metadata cut out of it;
//! * the *decrypted* tree: the same shape with plaintext values.
//!
//! Plaintext lives in [`Zeroizing`] buffers (strings, bytes, comment text), and
//! [`Node`] implements [`Zeroize`] so the owner ([`super::Decrypted`]) wipes
//! numbers and booleans too when it is dropped. Nothing in this module
//! implements `Display` for values, and `Debug` is redacted, so a tree cannot
//! end up in a log line by accident.

use std::fmt;

use zeroize::{Zeroize, Zeroizing};

use super::gocompat::Timestamp;

/// A scalar value with the type sops gives it.
#[derive(Clone)]
pub(crate) enum Scalar {
    Str(Zeroizing<String>),
    Int(i64),
    Float(f64),
    Bool(bool),
    Bytes(Zeroizing<Vec<u8>>),
    Time(Timestamp),
}

/// One node of the tree.
#[derive(Clone)]
pub(crate) enum Node {
    /// An ordered map. Keys are never secret (they are stored in clear).
    Map(Vec<Entry>),
    /// An ordered list; comments are [`Node::Comment`] items.
    List(Vec<Node>),
    /// A comment inside a list (comments inside maps are [`Entry::Comment`]).
    Comment(Zeroizing<String>),
    Scalar(Scalar),
    Null,
}

/// One item of a map.
#[derive(Clone)]
pub(crate) enum Entry {
    Pair(String, Node),
    Comment(Zeroizing<String>),
}

impl Node {
    pub(crate) fn str(s: impl Into<String>) -> Node {
        Node::Scalar(Scalar::Str(Zeroizing::new(s.into())))
    }

    #[cfg(test)]
    pub(crate) fn comment(s: impl Into<String>) -> Node {
        Node::Comment(Zeroizing::new(s.into()))
    }

    /// The value of `key` in a map node (first match; keys are unique).
    pub(crate) fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Map(entries) => entries.iter().find_map(|e| match e {
                Entry::Pair(k, v) if k == key => Some(v),
                _ => None,
            }),
            _ => None,
        }
    }

    /// A short name of the node's type, for error messages.
    pub(crate) fn kind_name(&self) -> &'static str {
        match self {
            Node::Map(_) => "map",
            Node::List(_) => "list",
            Node::Comment(_) => "comment",
            Node::Null => "null",
            Node::Scalar(s) => s.kind_name(),
        }
    }
}

impl Scalar {
    pub(crate) fn kind_name(&self) -> &'static str {
        match self {
            Scalar::Str(_) => "str",
            Scalar::Int(_) => "int",
            Scalar::Float(_) => "float",
            Scalar::Bool(_) => "bool",
            Scalar::Bytes(_) => "bytes",
            Scalar::Time(_) => "time",
        }
    }
}

impl Zeroize for Scalar {
    fn zeroize(&mut self) {
        match self {
            Scalar::Str(s) => s.zeroize(),
            Scalar::Int(i) => i.zeroize(),
            Scalar::Float(f) => f.zeroize(),
            Scalar::Bool(b) => b.zeroize(),
            Scalar::Bytes(b) => b.zeroize(),
            Scalar::Time(t) => t.zeroize(),
        }
    }
}

impl Zeroize for Node {
    fn zeroize(&mut self) {
        match self {
            Node::Map(entries) => {
                for e in entries.iter_mut() {
                    match e {
                        Entry::Pair(_, v) => v.zeroize(),
                        Entry::Comment(c) => c.zeroize(),
                    }
                }
            }
            Node::List(items) => items.iter_mut().for_each(Zeroize::zeroize),
            Node::Comment(c) => c.zeroize(),
            Node::Scalar(s) => s.zeroize(),
            Node::Null => {}
        }
    }
}

/// Redacted: shows the shape (map keys, list lengths, scalar types), never a
/// value or a comment.
impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::Map(entries) => {
                let mut m = f.debug_map();
                for e in entries {
                    match e {
                        Entry::Pair(k, v) => m.entry(k, v),
                        Entry::Comment(_) => m.entry(&"#", &Redacted("comment")),
                    };
                }
                m.finish()
            }
            Node::List(items) => f.debug_list().entries(items).finish(),
            other => Redacted(other.kind_name()).fmt(f),
        }
    }
}

impl fmt::Debug for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Redacted(self.kind_name()).fmt(f)
    }
}

struct Redacted(&'static str);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} redacted>", self.0)
    }
}

/// One element of a key path: a map key or a list position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PathElem {
    Key(String),
    Index(usize),
}

/// Renders a path the way [`super::Decrypted::get`] accepts it:
/// `db.password`, `servers[0].host`, `["key.with.dots"]`.
pub(crate) fn display_path(path: &[PathElem]) -> String {
    let mut out = String::new();
    for elem in path {
        match elem {
            PathElem::Index(i) => {
                out.push('[');
                out.push_str(&i.to_string());
                out.push(']');
            }
            PathElem::Key(k) => {
                let plain = !k.is_empty()
                    && !k.contains(['.', '[', ']', '"', '\\'])
                    && !k.chars().any(char::is_control);
                if plain {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(k);
                } else {
                    out.push_str("[\"");
                    for c in k.chars() {
                        match c {
                            '"' => out.push_str("\\\""),
                            '\\' => out.push_str("\\\\"),
                            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
                            c => out.push(c),
                        }
                    }
                    out.push_str("\"]");
                }
            }
        }
    }
    out
}

/// Parses a key path (see [`super::Decrypted::get`] for the syntax).
pub(crate) fn parse_path(text: &str) -> Result<Vec<PathElem>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let mut expect_sep = false;
    while i < chars.len() {
        match chars[i] {
            '.' if expect_sep => {
                i += 1;
                expect_sep = false;
                if i == chars.len() {
                    return Err("the path ends with `.`".into());
                }
            }
            '[' => {
                i += 1;
                if chars.get(i) == Some(&'"') {
                    i += 1;
                    let mut key = String::new();
                    loop {
                        match chars.get(i) {
                            None => return Err("unterminated `[\"` in the path".into()),
                            Some('\\') => {
                                match chars.get(i + 1) {
                                    Some('"') => key.push('"'),
                                    Some('\\') => key.push('\\'),
                                    _ => {
                                        return Err(
                                            "only `\\\"` and `\\\\` are escapes inside `[\"...\"]`"
                                                .into(),
                                        )
                                    }
                                }
                                i += 2;
                            }
                            Some('"') => {
                                i += 1;
                                break;
                            }
                            Some(c) => {
                                key.push(*c);
                                i += 1;
                            }
                        }
                    }
                    if chars.get(i) != Some(&']') {
                        return Err("expected `]` after the quoted key".into());
                    }
                    i += 1;
                    out.push(PathElem::Key(key));
                } else {
                    let start = i;
                    while i < chars.len() && chars[i].is_ascii_digit() {
                        i += 1;
                    }
                    if start == i || chars.get(i) != Some(&']') {
                        return Err(
                            "`[` must hold a list position (`[0]`) or a quoted key (`[\"a.b\"]`)"
                                .into(),
                        );
                    }
                    let digits: String = chars[start..i].iter().collect();
                    let index = digits
                        .parse::<usize>()
                        .map_err(|_| "list position too large".to_string())?;
                    i += 1;
                    out.push(PathElem::Index(index));
                }
                expect_sep = true;
            }
            _ if expect_sep => {
                return Err(format!(
                    "expected `.` or `[` at character {} of the path",
                    i + 1
                ))
            }
            _ => {
                let start = i;
                while i < chars.len() && chars[i] != '.' && chars[i] != '[' {
                    i += 1;
                }
                let name: String = chars[start..i].iter().collect();
                if name.is_empty() {
                    return Err("empty key in the path (`..`)".into());
                }
                if name.contains([']', '"']) {
                    return Err("write keys containing `]` or `\"` as `[\"...\"]`".into());
                }
                out.push(PathElem::Key(name));
                expect_sep = true;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_and_display() {
        let p = parse_path("db.password").unwrap();
        assert_eq!(
            p,
            vec![PathElem::Key("db".into()), PathElem::Key("password".into())]
        );
        let p = parse_path("servers[0].host").unwrap();
        assert_eq!(
            p,
            vec![
                PathElem::Key("servers".into()),
                PathElem::Index(0),
                PathElem::Key("host".into())
            ]
        );
        let p = parse_path("a[\"b.c\"][\"q\\\"\"]").unwrap();
        assert_eq!(
            p,
            vec![
                PathElem::Key("a".into()),
                PathElem::Key("b.c".into()),
                PathElem::Key("q\"".into())
            ]
        );
        assert_eq!(display_path(&p), "a[\"b.c\"][\"q\\\"\"]");
        assert_eq!(
            parse_path("servers.0").unwrap()[1],
            PathElem::Key("0".into())
        );
        assert_eq!(parse_path("").unwrap(), vec![]);
        for bad in ["a..b", "a.", "a[", "a[x]", "a[\"x", "a]b", "a[0]b"] {
            assert!(parse_path(bad).is_err(), "{bad}");
        }
        let keys = [
            PathElem::Key("foo ".into()),
            PathElem::Key("a:b".into()),
            PathElem::Index(3),
        ];
        assert_eq!(parse_path(&display_path(&keys)).unwrap(), keys);
    }

    #[test]
    fn debug_is_redacted() {
        let n = Node::Map(vec![
            Entry::Pair("password".into(), Node::str("hunter2-MARKER")),
            Entry::Comment(Zeroizing::new("secret comment MARKER".into())),
            Entry::Pair("n".into(), Node::Scalar(Scalar::Int(424242))),
        ]);
        let dbg = format!("{n:?} {n:#?}");
        assert!(!dbg.contains("MARKER"), "{dbg}");
        assert!(!dbg.contains("424242"), "{dbg}");
        assert!(dbg.contains("password"));
    }
}
