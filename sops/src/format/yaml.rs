//! YAML store [stores/yaml/store.go].
//!
//! Parsing uses `saphyr-parser` (a YAML 1.2 event parser with positions) for
//! structure and scalars, and types plain scalars like yaml.v3 does (see
//! [`gocompat::resolve_plain`]). YAML parsers drop comments, but sops
//! encrypts comments too (with the path of the map or list that holds them
//! as AAD), so comments are found by a separate scan of the text that skips
//! quoted and block scalars, and each comment is attached by indentation to
//! the innermost open collection whose entries start at or left of the
//! comment's column. That reproduces where go-yaml + sops put the comments
//! sops writes (head comments of a key at the key's indentation, foot
//! comments of a map at its indentation, comments of list items at the `-`).
//! A comment that does not decrypt is kept as it is, exactly like sops (old
//! files left comments in clear).
//!
//! Multi-document files give one tree per document; the first document's
//! `sops` key is the metadata (sops writes it into every document). Aliases
//! are expanded (sops walks the expanded tree); `<<` stays an ordinary key.
//! Duplicate keys, non-string keys, top-level lists and scalars are errors,
//! as in sops.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use base64::Engine;
use saphyr_parser::{Event, Parser, ScalarStyle, Tag};
use zeroize::Zeroizing;

use super::super::error::ErrorKind;
use super::super::gocompat::{self, Resolved};
use super::super::tree::{Entry, Node, Scalar};
use super::{Parsed, MAX_DEPTH, MAX_NODES};

fn parse_error(line: Option<usize>, detail: impl Into<String>, truncated: bool) -> ErrorKind {
    ErrorKind::Parse {
        store: "YAML",
        line,
        detail: detail.into(),
        truncated,
    }
}

struct Comment {
    index: usize,
    col: usize,
    text: String,
}

/// Character ranges that are inside quoted or block scalars (a `#` there is
/// content, not a comment).
fn protected_ranges<'a, 'i: 'a>(
    chars: &[char],
    events: impl Iterator<Item = &'a (Event<'i>, usize, usize)>,
) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (ev, start, end) in events {
        let Event::Scalar(_, style, _, _) = ev else {
            continue;
        };
        match style {
            ScalarStyle::SingleQuoted | ScalarStyle::DoubleQuoted => {
                let quote = if *style == ScalarStyle::SingleQuoted {
                    '\''
                } else {
                    '"'
                };
                // The span may start at a tag; find the opening quote.
                let Some(open) = (*start..chars.len()).find(|&i| chars[i] == quote) else {
                    continue;
                };
                let mut i = open + 1;
                while i < chars.len() {
                    if quote == '"' && chars[i] == '\\' {
                        i += 2;
                        continue;
                    }
                    if chars[i] == quote {
                        if quote == '\'' && chars.get(i + 1) == Some(&'\'') {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                out.push((open, i.min(chars.len())));
            }
            // The span ends where the next line starts: exclusive.
            ScalarStyle::Literal | ScalarStyle::Folded => {
                out.push((*start, end.saturating_sub(1).max(*start)))
            }
            _ => {}
        }
    }
    out.sort_unstable();
    out
}

fn scan_comments(chars: &[char], protected: &[(usize, usize)]) -> Vec<Comment> {
    let mut out = Vec::new();
    let mut p = 0; // index into `protected`
    let mut col = 0;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            col = 0;
            i += 1;
            continue;
        }
        while p < protected.len() && protected[p].1 < i {
            p += 1;
        }
        let inside = p < protected.len() && protected[p].0 <= i && i <= protected[p].1;
        if c == '#' && !inside && (i == 0 || matches!(chars[i - 1], ' ' | '\t' | '\n' | '\r')) {
            let start = i + 1;
            let mut end = start;
            while end < chars.len() && chars[end] != '\n' {
                end += 1;
            }
            let mut text_end = end;
            if text_end > start && chars[text_end - 1] == '\r' {
                text_end -= 1;
            }
            out.push(Comment {
                index: i,
                col,
                text: chars[start..text_end].iter().collect(),
            });
            col += end - i;
            i = end;
            continue;
        }
        col += 1;
        i += 1;
    }
    out
}

enum FrameKind {
    Map {
        entries: Vec<Entry>,
        key: Option<String>,
        seen: HashSet<String>,
        /// Comments that arrived while the value of `key` was being read:
        /// they come after that entry.
        after: Vec<Entry>,
    },
    Seq {
        items: Vec<Node>,
    },
}

struct Frame {
    kind: FrameKind,
    /// Column where the collection's entries (keys, or `-`) start.
    col: usize,
    anchor: usize,
}

struct Builder {
    stack: Vec<Frame>,
    root: Option<Node>,
    anchors: HashMap<usize, (Node, usize)>,
    nodes: usize,
}

fn count_nodes(node: &Node) -> usize {
    match node {
        Node::Map(e) => {
            1 + e
                .iter()
                .map(|e| match e {
                    Entry::Pair(_, v) => count_nodes(v),
                    Entry::Comment(_) => 1,
                })
                .sum::<usize>()
        }
        Node::List(items) => 1 + items.iter().map(count_nodes).sum::<usize>(),
        _ => 1,
    }
}

impl Builder {
    fn attach_comment(&mut self, c: Comment) {
        let pos = self.stack.iter().rposition(|f| f.col <= c.col).unwrap_or(0);
        let text = Zeroizing::new(c.text);
        match &mut self.stack[pos].kind {
            FrameKind::Map {
                entries,
                key,
                after,
                ..
            } => {
                if key.is_some() {
                    after.push(Entry::Comment(text));
                } else {
                    entries.push(Entry::Comment(text));
                }
            }
            FrameKind::Seq { items } => items.push(Node::Comment(text)),
        }
    }

    /// True if the next node is a mapping key.
    fn at_key(&self) -> bool {
        matches!(
            self.stack.last(),
            Some(Frame {
                kind: FrameKind::Map { key: None, .. },
                ..
            })
        )
    }

    fn complete(&mut self, node: Node, line: usize) -> Result<(), ErrorKind> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(parse_error(Some(line), "too many nodes", false));
        }
        match self.stack.last_mut() {
            None => {
                self.root = Some(node);
                Ok(())
            }
            Some(Frame {
                kind:
                    FrameKind::Map {
                        entries,
                        key,
                        after,
                        ..
                    },
                ..
            }) => {
                let k = key
                    .take()
                    .ok_or_else(|| parse_error(Some(line), "internal: value without key", false))?;
                entries.push(Entry::Pair(k, node));
                entries.append(after);
                Ok(())
            }
            Some(Frame {
                kind: FrameKind::Seq { items },
                ..
            }) => {
                items.push(node);
                Ok(())
            }
        }
    }

    fn set_key(&mut self, key: String, line: usize) -> Result<(), ErrorKind> {
        if let Some(Frame {
            kind: FrameKind::Map {
                key: slot, seen, ..
            },
            ..
        }) = self.stack.last_mut()
        {
            if !seen.insert(key.clone()) {
                return Err(parse_error(
                    Some(line),
                    format!("duplicate key `{key}` (sops refuses duplicate keys)"),
                    false,
                ));
            }
            *slot = Some(key);
        }
        Ok(())
    }
}

fn yaml_tag(tag: &Option<Cow<'_, Tag>>) -> Option<String> {
    tag.as_ref().map(|t| {
        if t.handle == "tag:yaml.org,2002:" {
            format!("!!{}", t.suffix)
        } else {
            format!("{}{}", t.handle, t.suffix)
        }
    })
}

fn resolved_node(r: Resolved, line: usize) -> Result<Node, ErrorKind> {
    Ok(match r {
        Resolved::Null => Node::Null,
        Resolved::Bool(b) => Node::Scalar(Scalar::Bool(b)),
        Resolved::Int(i) => Node::Scalar(Scalar::Int(i)),
        Resolved::Float(f) => Node::Scalar(Scalar::Float(f)),
        Resolved::Time(t) => Node::Scalar(Scalar::Time(t)),
        Resolved::BigInt => {
            return Err(parse_error(
                Some(line),
                "an integer beyond 64 bits (sops cannot handle it; quote it)",
                false,
            ))
        }
        Resolved::Str => return Err(parse_error(Some(line), "internal: string", false)),
    })
}

/// Types a scalar the way yaml.v3 decodes it into `interface{}`.
fn scalar_value(
    value: &str,
    style: ScalarStyle,
    tag: Option<String>,
    line: usize,
) -> Result<Node, ErrorKind> {
    let string = || Ok(Node::str(value));
    match tag.as_deref() {
        None | Some("!") if style != ScalarStyle::Plain => string(),
        None => match gocompat::resolve_plain(value) {
            Resolved::Str => string(),
            r => resolved_node(r, line),
        },
        Some("!!str") => string(),
        Some("!!binary") => {
            let cleaned: String = value.chars().filter(|c| !c.is_whitespace()).collect();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(cleaned)
                .map_err(|_| parse_error(Some(line), "!!binary value is not base64", false))?;
            Ok(match String::from_utf8(bytes) {
                Ok(s) => Node::str(s),
                Err(e) => Node::Scalar(Scalar::Bytes(Zeroizing::new(e.into_bytes()))),
            })
        }
        Some(t @ ("!!int" | "!!float" | "!!bool" | "!!null" | "!!timestamp")) => {
            let r = gocompat::resolve_plain(value);
            let ok = matches!(
                (t, &r),
                ("!!int", Resolved::Int(_))
                    | ("!!float", Resolved::Float(_))
                    | ("!!bool", Resolved::Bool(_))
                    | ("!!null", Resolved::Null)
                    | ("!!timestamp", Resolved::Time(_))
            );
            match (t, r) {
                ("!!float", Resolved::Int(i)) => Ok(Node::Scalar(Scalar::Float(i as f64))),
                (_, r) if ok => resolved_node(r, line),
                _ => Err(parse_error(
                    Some(line),
                    format!("a value tagged {t} cannot be decoded as such"),
                    false,
                )),
            }
        }
        Some(_) => string(),
    }
}

fn key_text(
    value: &str,
    style: ScalarStyle,
    tag: Option<String>,
    line: usize,
) -> Result<String, ErrorKind> {
    let is_str = match tag.as_deref() {
        Some("!!str") => true,
        None | Some("!") if style != ScalarStyle::Plain => true,
        None => matches!(gocompat::resolve_plain(value), Resolved::Str),
        Some(t) if t.starts_with("!!") => false,
        Some(_) => true,
    };
    if is_str {
        Ok(value.to_string())
    } else {
        Err(parse_error(
            Some(line),
            "a map key is not a string (sops only supports string keys; quote it)",
            false,
        ))
    }
}

/// Parses YAML text into one tree per document plus the first document's
/// `sops` map.
pub(crate) fn parse(text: &str) -> Result<Parsed, ErrorKind> {
    let chars: Vec<char> = text.chars().collect();
    let mut parser = Parser::new_from_str(text);
    let mut events = Vec::new();
    while let Some(item) = parser.next_event() {
        match item {
            Ok((ev, span)) => {
                let line = span.start.line();
                events.push((
                    (ev, span.start.index(), span.end.index()),
                    (line, span.start.col()),
                ));
            }
            Err(e) => {
                let at_end = e.marker().index() + 1 >= chars.len()
                    || e.info().contains("end of stream")
                    || e.info().contains("unexpected end");
                return Err(parse_error(
                    Some(e.marker().line()),
                    e.info().to_string(),
                    at_end,
                ));
            }
        }
    }
    let protected = protected_ranges(&chars, events.iter().map(|(e, _)| e));
    let mut comments = scan_comments(&chars, &protected).into_iter().peekable();

    let mut b = Builder {
        stack: Vec::new(),
        root: None,
        anchors: HashMap::new(),
        nodes: 0,
    };
    let mut docs: Vec<Node> = Vec::new();
    let mut sops: Option<Node> = None;
    for ((ev, start, _end), (line, col)) in events {
        // Comments before this event belong to the collections open now; a
        // collection that starts here takes the comments just above it.
        let opens = matches!(ev, Event::MappingStart(..) | Event::SequenceStart(..));
        if opens {
            if b.at_key() {
                return Err(parse_error(
                    Some(line),
                    "complex (non-scalar) map keys are not supported",
                    false,
                ));
            }
            if b.stack.len() >= MAX_DEPTH {
                return Err(parse_error(Some(line), "nesting too deep", false));
            }
            let (kind, anchor) = match &ev {
                Event::MappingStart(a, _) => (
                    FrameKind::Map {
                        entries: Vec::new(),
                        key: None,
                        seen: HashSet::new(),
                        after: Vec::new(),
                    },
                    *a,
                ),
                Event::SequenceStart(a, _) => (FrameKind::Seq { items: Vec::new() }, *a),
                _ => unreachable!("checked above"),
            };
            let mut entry_col = col;
            if matches!(kind, FrameKind::Seq { .. })
                && chars.get(start) != Some(&'-')
                && chars.get(start) != Some(&'[')
            {
                // An indentless or compact sequence: the event sits on the
                // first item; its entries start at the `-` before it.
                let mut i = start;
                while i > 0 && matches!(chars[i - 1], ' ' | '\t') {
                    i -= 1;
                }
                if i > 0 && chars[i - 1] == '-' {
                    entry_col = col.saturating_sub(start - (i - 1));
                }
            }
            b.stack.push(Frame {
                kind,
                col: entry_col,
                anchor,
            });
        }
        while let Some(c) = comments.peek() {
            if c.index >= start || b.stack.is_empty() {
                break;
            }
            if let Some(c) = comments.next() {
                b.attach_comment(c);
            }
        }
        match ev {
            Event::StreamStart | Event::StreamEnd | Event::Nothing | Event::DocumentStart(_) => {}
            Event::MappingStart(..) | Event::SequenceStart(..) => {}
            Event::DocumentEnd => {
                // Comments left over belong to no collection (an empty
                // document); sops drops them too.
                while comments.peek().is_some_and(|c| c.index < start) {
                    comments.next();
                }
                let root = b.root.take().unwrap_or(Node::Null);
                let mut root = match root {
                    Node::Map(entries) => entries,
                    Node::Null => Vec::new(),
                    Node::List(_) => {
                        return Err(parse_error(
                            Some(line),
                            "the document is a list; sops supports only documents that are maps",
                            false,
                        ))
                    }
                    _ => {
                        return Err(parse_error(
                            Some(line),
                            "the document is a single value; sops supports only documents that are maps",
                            false,
                        ))
                    }
                };
                if let Some(pos) = root
                    .iter()
                    .position(|e| matches!(e, Entry::Pair(k, _) if k == "sops"))
                {
                    if let Entry::Pair(_, meta) = root.remove(pos) {
                        if docs.is_empty() {
                            sops = Some(meta);
                        }
                    }
                }
                docs.push(Node::Map(root));
                b.anchors.clear();
            }
            Event::MappingEnd | Event::SequenceEnd => {
                let frame = b
                    .stack
                    .pop()
                    .ok_or_else(|| parse_error(Some(line), "internal: unbalanced", false))?;
                let node = match frame.kind {
                    FrameKind::Map { entries, key, .. } => {
                        if key.is_some() {
                            return Err(parse_error(
                                Some(line),
                                "internal: key without value",
                                false,
                            ));
                        }
                        Node::Map(entries)
                    }
                    FrameKind::Seq { items } => Node::List(items),
                };
                if frame.anchor > 0 {
                    let size = count_nodes(&node);
                    b.anchors.insert(frame.anchor, (node.clone(), size));
                }
                b.complete(node, line)?;
            }
            Event::Scalar(value, style, anchor, tag) => {
                let tag = yaml_tag(&tag);
                if b.at_key() {
                    let key = key_text(&value, style, tag, line)?;
                    b.set_key(key, line)?;
                } else {
                    let node = scalar_value(&value, style, tag, line)?;
                    if anchor > 0 {
                        b.anchors.insert(anchor, (node.clone(), 1));
                    }
                    b.complete(node, line)?;
                }
            }
            Event::Alias(id) => {
                let (node, size) = b
                    .anchors
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| parse_error(Some(line), "unknown alias", false))?;
                b.nodes += size;
                if b.nodes > MAX_NODES {
                    return Err(parse_error(
                        Some(line),
                        "aliases expand to too many nodes",
                        false,
                    ));
                }
                if b.at_key() {
                    match node {
                        Node::Scalar(Scalar::Str(s)) => b.set_key(s.to_string(), line)?,
                        _ => {
                            return Err(parse_error(
                                Some(line),
                                "a map key is not a string (sops only supports string keys)",
                                false,
                            ))
                        }
                    }
                } else {
                    b.complete(node, line)?;
                }
            }
        }
    }
    Ok(Parsed { docs, sops })
}

// ---------------------------------------------------------------------------
// Emitter

const INDENT: usize = 4;

/// Whether a string can be written as a plain scalar and read back as the
/// same string, by a YAML 1.2 parser (yaml.v3, which sops uses) and by a
/// YAML 1.1 one (PyYAML, many Go and Ruby programs) alike.
fn plain_ok(s: &str) -> bool {
    if s.is_empty()
        || s != s.trim()
        || !matches!(gocompat::resolve_plain(s), Resolved::Str)
        || yaml11_typed(s)
    {
        return false;
    }
    let first = s.chars().next().unwrap_or(' ');
    if "-?:,[]{}#&*!|>'\"%@`".contains(first) {
        return false;
    }
    if s.starts_with("---") || s.starts_with("...") {
        return false;
    }
    if s.contains(": ")
        || s.contains(" #")
        || s.contains(":\t")
        || s.contains("\t#")
        || s.ends_with(':')
    {
        return false;
    }
    !s.chars().any(|c| c.is_control() || needs_escape(c))
}

/// Whether a YAML 1.1 (or a lenient 1.2) parser could read the plain
/// scalar `s` as something other than a string: the 1.1 booleans (`yes`,
/// `no`, `on`, `off`, `y`, `n`), nulls (`~`, `null`), and anything shaped
/// like a number or a date: sexagesimal `12:30`, octal `012` and `0o12`,
/// hex, binary, `1_000`, `1e3`, `.inf`, `2024-01-02`. Quoting a string
/// that did not need it is harmless; the reverse changes its type.
fn yaml11_typed(s: &str) -> bool {
    const WORDS: &[&str] = &[
        "y", "yes", "n", "no", "on", "off", "true", "false", "null", "~", ".inf", "-.inf", "+.inf",
        ".nan", "=", "<<",
    ];
    let lower = s.to_ascii_lowercase();
    if WORDS.contains(&lower.as_str()) {
        return true;
    }
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    let numberish = body
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_digit() || c == '.')
        && body
            .chars()
            .all(|c| c.is_ascii_hexdigit() || "_.:+-xXoO".contains(c));
    // Dates and timestamps: PyYAML reads `2024-01-02 03:04:05` as one.
    let dateish = body.len() >= 8
        && body.as_bytes()[..4].iter().all(u8::is_ascii_digit)
        && body.as_bytes()[4] == b'-';
    numberish || dateish
}

fn needs_escape(c: char) -> bool {
    matches!(c, '\u{85}' | '\u{2028}' | '\u{2029}' | '\u{feff}')
        || (c.is_control() && c != '\t' && c != '\n')
}

fn double_quoted(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\0' => out.push_str("\\0"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if needs_escape(c) || c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A literal block scalar (`|`) is used for multi-line text when it reads
/// back exactly.
fn literal_ok(s: &str) -> bool {
    if !s.contains('\n') || s.contains('\r') || s.chars().any(needs_escape) {
        return false;
    }
    let first_content = s.lines().find(|l| !l.is_empty());
    match first_content {
        Some(l) if !l.starts_with(' ') && !l.starts_with('\t') => {}
        _ => return false,
    }
    !s.lines().any(|l| !l.is_empty() && l.trim().is_empty())
}

fn write_str(s: &str, indent: usize, out: &mut String) {
    if plain_ok(s) {
        out.push_str(s);
    } else if literal_ok(s) {
        let body = s.trim_end_matches('\n');
        let trailing = s.len() - body.len();
        out.push_str(match trailing {
            0 => "|-",
            1 => "|",
            _ => "|+",
        });
        let pad = " ".repeat(indent + INDENT);
        for line in body.split('\n') {
            out.push('\n');
            if !line.is_empty() {
                out.push_str(&pad);
                out.push_str(line);
            }
        }
        for _ in 1..trailing {
            out.push('\n');
        }
    } else {
        double_quoted(s, out);
    }
}

fn write_scalar(s: &Scalar, indent: usize, out: &mut String) {
    match s {
        Scalar::Str(v) => write_str(v, indent, out),
        Scalar::Int(i) => out.push_str(&i.to_string()),
        Scalar::Float(f) => {
            if f.is_nan() {
                out.push_str(".nan");
            } else if f.is_infinite() {
                out.push_str(if *f > 0.0 { ".inf" } else { "-.inf" });
            } else {
                let t = gocompat::format_float(*f);
                out.push_str(&t);
                if !t.contains(['.', 'e', 'E']) {
                    out.push_str(".0");
                }
            }
        }
        Scalar::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Scalar::Time(t) => out.push_str(&t.format_rfc3339_nano()),
        Scalar::Bytes(b) => match std::str::from_utf8(b) {
            Ok(s) => write_str(s, indent, out),
            Err(_) => {
                out.push_str("!!binary ");
                out.push_str(&base64::engine::general_purpose::STANDARD.encode(b));
            }
        },
    }
}

fn write_key(k: &str, out: &mut String) {
    if plain_ok(k) {
        out.push_str(k);
    } else {
        double_quoted(k, out);
    }
}

fn write_comment(text: &str, indent: usize, out: &mut String) {
    for line in text.split('\n') {
        out.push_str(&" ".repeat(indent));
        out.push('#');
        out.push_str(line.trim_end_matches('\r'));
        out.push('\n');
    }
}

fn has_values_map(entries: &[Entry]) -> bool {
    entries.iter().any(|e| matches!(e, Entry::Pair(..)))
}

fn has_values_list(items: &[Node]) -> bool {
    items.iter().any(|n| !matches!(n, Node::Comment(_)))
}

/// Writes the value after `key:` or `- `.
fn write_inline_value(v: &Node, indent: usize, out: &mut String) {
    match v {
        Node::Scalar(s) => {
            out.push(' ');
            write_scalar(s, indent, out);
            out.push('\n');
        }
        Node::Null => out.push_str(" null\n"),
        Node::Map(e) if has_values_map(e) => {
            out.push('\n');
            write_map(e, indent + INDENT, out);
        }
        Node::Map(e) => {
            out.push_str(" {}\n");
            write_comments_only_map(e, indent + INDENT, out);
        }
        Node::List(items) if has_values_list(items) => {
            out.push('\n');
            write_list(items, indent + INDENT, out);
        }
        Node::List(items) => {
            out.push_str(" []\n");
            for i in items {
                if let Node::Comment(c) = i {
                    write_comment(c, indent + INDENT, out);
                }
            }
        }
        Node::Comment(c) => {
            out.push('\n');
            write_comment(c, indent + INDENT, out);
        }
    }
}

fn write_comments_only_map(entries: &[Entry], indent: usize, out: &mut String) {
    for e in entries {
        if let Entry::Comment(c) = e {
            write_comment(c, indent, out);
        }
    }
}

fn write_map(entries: &[Entry], indent: usize, out: &mut String) {
    for e in entries {
        match e {
            Entry::Comment(c) => write_comment(c, indent, out),
            Entry::Pair(k, v) => {
                out.push_str(&" ".repeat(indent));
                write_key(k, out);
                out.push(':');
                write_inline_value(v, indent, out);
            }
        }
    }
}

fn write_list(items: &[Node], indent: usize, out: &mut String) {
    for item in items {
        match item {
            Node::Comment(c) => write_comment(c, indent, out),
            Node::Map(e) if has_values_map(e) => {
                // `-   key: value` with the other keys aligned under it.
                let mut inner = Zeroizing::new(String::new());
                write_map(e, indent + INDENT, &mut inner);
                out.push_str(&" ".repeat(indent));
                out.push('-');
                out.push_str(&inner[indent + 1..]);
            }
            Node::List(l) if has_values_list(l) => {
                let mut inner = Zeroizing::new(String::new());
                write_list(l, indent + INDENT, &mut inner);
                out.push_str(&" ".repeat(indent));
                out.push('-');
                out.push_str(&inner[indent + 1..]);
            }
            other => {
                out.push_str(&" ".repeat(indent));
                out.push('-');
                write_inline_value(other, indent, out);
            }
        }
    }
}

/// Emits documents as YAML (4-space indentation, like `sops -d`).
pub(crate) fn emit(docs: &[Node], out: &mut String) {
    for (i, doc) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        match doc {
            Node::Map(e) if has_values_map(e) => write_map(e, 0, out),
            Node::Map(e) => {
                out.push_str("{}\n");
                write_comments_only_map(e, 0, out);
            }
            other => {
                let mut tmp = Zeroizing::new(String::new());
                write_inline_value(other, 0, &mut tmp);
                out.push_str(tmp.trim_start());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comments_of(node: &Node) -> Vec<String> {
        match node {
            Node::Map(e) => e
                .iter()
                .filter_map(|e| match e {
                    Entry::Comment(c) => Some(c.to_string()),
                    _ => None,
                })
                .collect(),
            Node::List(items) => items
                .iter()
                .filter_map(|e| match e {
                    Node::Comment(c) => Some(c.to_string()),
                    _ => None,
                })
                .collect(),
            _ => vec![],
        }
    }

    #[test]
    fn comments_attach_by_indentation() {
        let text = "# top\na:\n  # head of b\n  b: 1\n  c:\n    d: \"x # not\"   # trailing\n    # foot of d\n  # foot of c\ne:\n- x\n# list comment\n- y: 2\n  z: |\n    lit # not comment\n  # in y map\nk:\n    - a\n    # at dash\n    - b\n# end\n";
        let parsed = parse(text).unwrap();
        let root = &parsed.docs[0];
        assert_eq!(comments_of(root), vec![" top", " end"]);
        let a = root.get("a").unwrap();
        assert_eq!(comments_of(a), vec![" head of b", " foot of c"]);
        let c = a.get("c").unwrap();
        assert_eq!(comments_of(c), vec![" trailing", " foot of d"]);
        let e = root.get("e").unwrap();
        assert_eq!(comments_of(e), vec![" list comment"]);
        let Node::List(items) = e else { panic!() };
        let y = items.iter().find(|n| n.get("y").is_some()).unwrap();
        assert_eq!(comments_of(y), vec![" in y map"]);
        assert!(
            matches!(y.get("z"), Some(Node::Scalar(Scalar::Str(s))) if s.as_str() == "lit # not comment\n")
        );
        assert_eq!(comments_of(root.get("k").unwrap()), vec![" at dash"]);
    }

    #[test]
    fn scalars_are_typed_like_yaml_v3() {
        let parsed =
            parse("a: 1\nb: 1.50\nc: true\nd: ~\ne: '1'\nf: 2024-01-02\ng: !!str 3\nh: yes\n")
                .unwrap();
        let d = &parsed.docs[0];
        assert!(matches!(d.get("a"), Some(Node::Scalar(Scalar::Int(1)))));
        assert!(matches!(d.get("b"), Some(Node::Scalar(Scalar::Float(f))) if *f == 1.5));
        assert!(matches!(d.get("c"), Some(Node::Scalar(Scalar::Bool(true)))));
        assert!(matches!(d.get("d"), Some(Node::Null)));
        assert!(matches!(d.get("e"), Some(Node::Scalar(Scalar::Str(_)))));
        assert!(matches!(d.get("f"), Some(Node::Scalar(Scalar::Time(_)))));
        assert!(matches!(d.get("g"), Some(Node::Scalar(Scalar::Str(_)))));
        assert!(matches!(d.get("h"), Some(Node::Scalar(Scalar::Str(_)))));
    }

    #[test]
    fn structural_errors() {
        assert!(parse("- a\n- b\n").is_err());
        assert!(parse("just a string\n").is_err());
        assert!(parse("a: 1\na: 2\n").is_err());
        assert!(parse("1: x\n").is_err());
        assert!(parse("a: [1, 2\n").is_err());
        let many = "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]\n";
        assert!(parse(many).is_err());
    }

    #[test]
    fn multi_document_and_aliases() {
        let parsed = parse("a: &x {k: v}\nb: *x\nsops: {m: 1}\n---\nc: 2\nsops: {m: 2}\n").unwrap();
        assert_eq!(parsed.docs.len(), 2);
        assert!(parsed.docs[0].get("b").unwrap().get("k").is_some());
        assert!(parsed.docs[1].get("sops").is_none());
        assert!(matches!(
            parsed.sops.unwrap().get("m"),
            Some(Node::Scalar(Scalar::Int(1)))
        ));
    }

    /// The YAML 1.1 pitfalls of issue 13 §2: written unquoted, a PyYAML
    /// consumer read `yes` as true, `12:30` as 750, `0o12`/`012` as 10.
    const AMBIGUOUS: &[&str] = &[
        "yes",
        "no",
        "on",
        "off",
        "y",
        "n",
        "Y",
        "N",
        "YES",
        "No",
        "On",
        "OFF",
        "~",
        "null",
        "Null",
        "true",
        "False",
        "12:30",
        "1:02:03",
        "0o12",
        "012",
        "007",
        "0x1F",
        "0b101",
        "1_000",
        "1e3",
        "1E-3",
        "+1",
        "-1",
        ".5",
        "1.",
        ".inf",
        "-.Inf",
        ".NaN",
        "2024-01-02",
        "2024-01-02 03:04:05",
        "2024-01-02T03:04:05Z",
        "=",
        "<<",
        "123",
        "1.5",
    ];

    fn corpus_doc() -> Node {
        Node::Map(
            AMBIGUOUS
                .iter()
                .enumerate()
                .map(|(i, v)| Entry::Pair(format!("k{i}"), Node::str(*v)))
                .collect(),
        )
    }

    #[test]
    fn strings_that_yaml_1_1_would_type_are_quoted() {
        for v in AMBIGUOUS {
            assert!(!plain_ok(v), "{v:?} would be written unquoted");
        }
        for v in [
            "hello",
            "a1",
            "v1.2.3-beta",
            "yesterday",
            "noon",
            "x:y",
            "12 apples",
        ] {
            assert!(plain_ok(v), "{v:?} needlessly quoted");
        }
        let mut out = String::new();
        emit(&[corpus_doc()], &mut out);
        let again = parse(&out).unwrap();
        for (i, v) in AMBIGUOUS.iter().enumerate() {
            assert!(
                matches!(again.docs[0].get(&format!("k{i}")), Some(Node::Scalar(Scalar::Str(s))) if s.as_str() == *v),
                "{v:?} did not come back as the same string:\n{out}"
            );
        }
    }

    /// The same corpus, read back by PyYAML (YAML 1.1): every value is the
    /// string it was.
    #[test]
    fn pyyaml_reads_back_every_string_as_the_same_string() {
        let python = std::env::var_os("DRIFTLESS_TEST_PYTHON")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| "/opt/driftless-test-tools/sops-venv/bin/python3".into());
        if !python.exists() {
            return crate::test_skip::missing(
                "PyYAML (tests/install-prereqs installs it in /opt/driftless-test-tools/sops-venv)",
            );
        }
        let mut out = String::new();
        emit(&[corpus_doc()], &mut out);
        let mut child = std::process::Command::new(&python)
            .args([
                "-c",
                "import sys, json, yaml; print(json.dumps(yaml.safe_load(sys.stdin), default=str))",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python runs");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(out.as_bytes())
            .expect("write");
        let res = child.wait_with_output().expect("python ends");
        assert!(res.status.success());
        let v: serde_json::Value = serde_json::from_slice(&res.stdout).expect("JSON");
        for (i, want) in AMBIGUOUS.iter().enumerate() {
            assert_eq!(
                v[format!("k{i}")],
                serde_json::Value::String(want.to_string()),
                "PyYAML read {want:?} differently from:\n{out}"
            );
        }
    }

    #[test]
    fn emit_round_trips() {
        let text = "a: plain\nb: \"needs: quoting\"\nc: |\n    line1\n    line2\nd:\n    - 1\n    - 2.0\n    -   x: true\n        y: null\n    - - nested\n# note\ne: \"\"\nf: \" lead\"\ng: \"123\"\nh: 2024-01-02T03:04:05Z\ni: {}\nj: []\n\"k:ey\": \"tab\\there\"\n";
        let parsed = parse(text).unwrap();
        let mut out = String::new();
        emit(&parsed.docs, &mut out);
        let again = parse(&out).unwrap();
        let mut out2 = String::new();
        emit(&again.docs, &mut out2);
        assert_eq!(out, out2, "first:\n{out}\nsecond:\n{out2}");
        assert!(out.contains("c: |\n    line1\n    line2\n"), "{out}");
        assert!(matches!(
            again.docs[0].get("g"),
            Some(Node::Scalar(Scalar::Str(_)))
        ));
        assert!(matches!(again.docs[0].get("d"), Some(Node::List(l)) if l.len() == 4));
    }
}
