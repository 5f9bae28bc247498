//! Walking the tree: which values are encrypted, decrypting them, and the MAC
//! [sops.go: walkBranch, walkSlice, shouldBeEncrypted, Tree.Decrypt].
//!
//! The walk visits maps in file order and lists in order. A value's *path*
//! is the list of map keys from the root to it — list positions add nothing —
//! and its AAD is that path joined with `:` plus a trailing `:`. The crypt
//! rule decides per value from the path (and, for the comment regexes, from
//! the comments seen just before it at each level, as on-disk text). Every
//! value, encrypted or clear, is fed in canonical form into a SHA-512 (only
//! encrypted ones with `mac_only_encrypted`); comments and nulls never are.
//! The digest, upper-case hex, must equal the decrypted `mac`.

use sha2::{Digest, Sha512};
use zeroize::Zeroizing;

use super::crypt::{self, Plain};
use super::error::{raw_at, ErrorKind, Raw};
use super::metadata::{Metadata, Rule};
use super::tree::{display_path, Entry, Node, PathElem, Scalar};

/// sha256("sops"): the first bytes of the MAC with `mac_only_encrypted`.
pub(crate) const MAC_ONLY_ENCRYPTED_INIT: [u8; 32] = [
    0x8a, 0x3f, 0xd2, 0xad, 0x54, 0xce, 0x66, 0x52, 0x7b, 0x10, 0x34, 0xf3, 0xd1, 0x47, 0xbe, 0x0b,
    0x0b, 0x97, 0x5b, 0x3b, 0xf4, 0x4f, 0x72, 0xc6, 0xfd, 0xad, 0xec, 0x81, 0x76, 0xf2, 0x7d, 0x69,
];

/// The crypt rule part of the metadata.
pub(crate) struct Rules<'a> {
    pub rule: &'a Rule,
    pub unencrypted_comment: Option<&'a regex::Regex>,
    pub encrypted_comment: Option<&'a regex::Regex>,
}

impl<'a> Rules<'a> {
    pub(crate) fn of(meta: &'a Metadata) -> Rules<'a> {
        Rules {
            rule: &meta.rule,
            unencrypted_comment: meta.unencrypted_comment_regex.as_ref(),
            encrypted_comment: meta.encrypted_comment_regex.as_ref(),
        }
    }

    /// sops `shouldBeEncrypted`.
    pub(crate) fn should_encrypt(
        &self,
        path: &[String],
        stack: &[Vec<String>],
        is_comment: bool,
    ) -> bool {
        let mut encrypted = match self.rule {
            Rule::UnencryptedSuffix(s) => !path.iter().any(|p| p.ends_with(s.as_str())),
            Rule::EncryptedSuffix(s) => path.iter().any(|p| p.ends_with(s.as_str())),
            Rule::UnencryptedRegex(r) => !path.iter().any(|p| r.is_match(p)),
            Rule::EncryptedRegex(r) => path.iter().any(|p| r.is_match(p)),
        };
        if let Some(r) = self.unencrypted_comment {
            if stack.iter().flatten().any(|c| r.is_match(c)) {
                encrypted = false;
            }
        }
        if let Some(r) = self.encrypted_comment {
            // The comment that matches is itself left in clear: skip the
            // current comment (the last one pushed) when deciding about it.
            let last_level = stack.len().saturating_sub(1);
            let last_index = stack.last().map_or(0, |l| l.len().saturating_sub(1));
            encrypted = stack.iter().enumerate().any(|(i, level)| {
                level.iter().enumerate().any(|(j, c)| {
                    !(is_comment && i == last_level && j == last_index) && r.is_match(c)
                })
            });
        }
        encrypted
    }
}

/// Counts for [`super::CheckReport`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Stats {
    pub encrypted: usize,
    pub clear: usize,
    pub comments_decrypted: usize,
    pub comments_clear: usize,
}

pub(crate) struct Decryptor<'a> {
    rules: Rules<'a>,
    key: &'a [u8; 32],
    mac_only_encrypted: bool,
    hasher: Sha512,
    pub stats: Stats,
    pub warnings: Vec<String>,
}

fn aad(path: &[String]) -> String {
    let mut s = path.join(":");
    s.push(':');
    s
}

impl<'a> Decryptor<'a> {
    pub(crate) fn new(meta: &'a Metadata, key: &'a [u8; 32]) -> Decryptor<'a> {
        let mut hasher = Sha512::new();
        if meta.mac_only_encrypted {
            hasher.update(MAC_ONLY_ENCRYPTED_INIT);
        }
        Decryptor {
            rules: Rules::of(meta),
            key,
            mac_only_encrypted: meta.mac_only_encrypted,
            hasher,
            stats: Stats::default(),
            warnings: Vec::new(),
        }
    }

    /// Decrypts one document (a map).
    pub(crate) fn document(&mut self, doc: Node) -> Result<Node, Raw> {
        let mut path = Vec::new();
        let mut shown = Vec::new();
        let mut stack = Vec::new();
        self.value(doc, &mut path, &mut shown, &mut stack)
    }

    /// The MAC over everything walked so far (upper-case hex).
    pub(crate) fn mac(self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode_upper(self.hasher.finalize()))
    }

    fn value(
        &mut self,
        node: Node,
        path: &mut Vec<String>,
        shown: &mut Vec<PathElem>,
        stack: &mut Vec<Vec<String>>,
    ) -> Result<Node, Raw> {
        match node {
            Node::Map(entries) => {
                stack.push(Vec::new());
                let mut out = Vec::with_capacity(entries.len());
                for e in entries {
                    match e {
                        Entry::Comment(c) => {
                            if let Some(level) = stack.last_mut() {
                                level.push(c.to_string());
                            }
                            out.push(Entry::Comment(self.comment(c, path, stack)));
                        }
                        Entry::Pair(k, v) => {
                            path.push(k.clone());
                            shown.push(PathElem::Key(k.clone()));
                            let v = self.value(v, path, shown, stack);
                            path.pop();
                            shown.pop();
                            out.push(Entry::Pair(k, v?));
                            if let Some(level) = stack.last_mut() {
                                level.clear();
                            }
                        }
                    }
                }
                stack.pop();
                Ok(Node::Map(out))
            }
            Node::List(items) => {
                stack.push(Vec::new());
                let mut out = Vec::with_capacity(items.len());
                let mut index = 0;
                for item in items {
                    if let Node::Comment(c) = item {
                        if let Some(level) = stack.last_mut() {
                            level.push(c.to_string());
                        }
                        out.push(Node::Comment(self.comment(c, path, stack)));
                        continue;
                    }
                    shown.push(PathElem::Index(index));
                    let v = self.value(item, path, shown, stack);
                    shown.pop();
                    out.push(v?);
                    index += 1;
                    if let Some(level) = stack.last_mut() {
                        level.clear();
                    }
                }
                stack.pop();
                Ok(Node::List(out))
            }
            Node::Comment(c) => Ok(Node::Comment(self.comment(c, path, stack))),
            Node::Null => Ok(Node::Null),
            Node::Scalar(s) => self.scalar(s, path, shown, stack),
        }
    }

    fn comment(
        &mut self,
        text: Zeroizing<String>,
        path: &[String],
        stack: &[Vec<String>],
    ) -> Zeroizing<String> {
        if self.rules.should_encrypt(path, stack, true) && !text.is_empty() {
            match crypt::decrypt_value(&text, self.key, &aad(path)) {
                Ok(Plain::Comment(c)) => {
                    self.stats.comments_decrypted += 1;
                    return c;
                }
                Ok(Plain::Value(Scalar::Str(s))) => {
                    self.stats.comments_decrypted += 1;
                    return s;
                }
                _ => {
                    if crypt::looks_encrypted(&text) {
                        self.warnings.push(format!(
                            "an encrypted comment under `{}` could not be decrypted and is kept as is",
                            path.join(".")
                        ));
                    }
                }
            }
        }
        self.stats.comments_clear += 1;
        text
    }

    fn scalar(
        &mut self,
        s: Scalar,
        path: &[String],
        shown: &[PathElem],
        stack: &[Vec<String>],
    ) -> Result<Node, Raw> {
        let encrypted = self.rules.should_encrypt(path, stack, false);
        let node = if encrypted {
            let Scalar::Str(text) = s else {
                return Err(raw_at(
                    display_path(shown),
                    ErrorKind::NotEncrypted(format!(
                        "the value is a clear {} but the crypt rule says it is encrypted",
                        s.kind_name()
                    )),
                ));
            };
            if !text.is_empty() && !crypt::looks_encrypted(&text) {
                return Err(raw_at(
                    display_path(shown),
                    ErrorKind::NotEncrypted("the value is in clear text".into()),
                ));
            }
            match crypt::decrypt_value(&text, self.key, &aad(path)) {
                Ok(Plain::Value(v)) => {
                    self.stats.encrypted += 1;
                    Node::Scalar(v)
                }
                Ok(Plain::Comment(_)) => {
                    return Err(raw_at(
                        display_path(shown),
                        ErrorKind::BadPlaintext("a comment is stored where a value belongs".into()),
                    ))
                }
                Err(kind) => return Err(raw_at(display_path(shown), kind)),
            }
        } else {
            self.stats.clear += 1;
            Node::Scalar(s)
        };
        if !self.mac_only_encrypted || encrypted {
            if let Some(bytes) = crypt::mac_bytes(&node) {
                self.hasher.update(&bytes[..]);
            }
        }
        Ok(node)
    }
}

/// Test-only encryption walk: the exact inverse of [`Decryptor`], used to
/// build files for the crypt rules the real fixtures do not cover.
#[cfg(test)]
pub(crate) mod encrypt {
    use super::*;

    pub(crate) struct Encryptor<'a> {
        pub rules: Rules<'a>,
        pub key: &'a [u8; 32],
        pub mac_only_encrypted: bool,
        pub hasher: Sha512,
        /// Chooses the 32-byte IV for a value (given its AAD and its
        /// position in the walk).
        pub iv: &'a mut dyn FnMut(&str, usize) -> [u8; 32],
        pub counter: usize,
    }

    impl Encryptor<'_> {
        pub(crate) fn document(&mut self, doc: &Node) -> Node {
            let mut path = Vec::new();
            let mut stack = Vec::new();
            self.value(doc, &mut path, &mut stack)
        }

        fn next_iv(&mut self, aad: &str) -> [u8; 32] {
            self.counter += 1;
            (self.iv)(aad, self.counter)
        }

        fn value(
            &mut self,
            node: &Node,
            path: &mut Vec<String>,
            stack: &mut Vec<Vec<String>>,
        ) -> Node {
            match node {
                Node::Map(entries) => {
                    stack.push(Vec::new());
                    let mut out = Vec::new();
                    for e in entries {
                        match e {
                            Entry::Comment(c) => {
                                if let Some(l) = stack.last_mut() {
                                    l.push(c.to_string());
                                }
                                let Node::Comment(c) =
                                    self.leaf(&Node::Comment(c.clone()), path, stack)
                                else {
                                    unreachable!()
                                };
                                out.push(Entry::Comment(c));
                            }
                            Entry::Pair(k, v) => {
                                path.push(k.clone());
                                let v = self.value(v, path, stack);
                                path.pop();
                                out.push(Entry::Pair(k.clone(), v));
                                if let Some(l) = stack.last_mut() {
                                    l.clear();
                                }
                            }
                        }
                    }
                    stack.pop();
                    Node::Map(out)
                }
                Node::List(items) => {
                    stack.push(Vec::new());
                    let mut out = Vec::new();
                    for item in items {
                        if let Node::Comment(c) = item {
                            if let Some(l) = stack.last_mut() {
                                l.push(c.to_string());
                            }
                            out.push(self.leaf(item, path, stack));
                            continue;
                        }
                        out.push(self.value(item, path, stack));
                        if let Some(l) = stack.last_mut() {
                            l.clear();
                        }
                    }
                    stack.pop();
                    Node::List(out)
                }
                Node::Null => Node::Null,
                other => self.leaf(other, path, stack),
            }
        }

        fn leaf(&mut self, node: &Node, path: &[String], stack: &[Vec<String>]) -> Node {
            let is_comment = matches!(node, Node::Comment(_));
            let encrypted = self.rules.should_encrypt(path, stack, is_comment);
            if !is_comment && (!self.mac_only_encrypted || encrypted) {
                if let Some(b) = crypt::mac_bytes(node) {
                    self.hasher.update(&b[..]);
                }
            }
            let empty = match node {
                Node::Comment(c) => c.is_empty(),
                Node::Scalar(Scalar::Str(s)) => s.is_empty(),
                Node::Scalar(Scalar::Bytes(b)) => b.is_empty(),
                _ => false,
            };
            if !encrypted || empty {
                return node.clone();
            }
            let aad = aad(path);
            let iv = self.next_iv(&aad);
            let text = crypt::encrypt_value(node, self.key, &aad, &iv)
                .unwrap_or_else(|| panic!("cannot encrypt a {}", node.kind_name()));
            if is_comment {
                Node::comment(text)
            } else {
                Node::str(text)
            }
        }
    }
}
