//! INI store [stores/ini/store.go], parsed with the rules of the go-ini
//! library (`gopkg.in/ini.v1` with default options) that sops uses.
//!
//! * Every section is a top-level map named after it; keys before any
//!   section header belong to `DEFAULT`, which always exists and comes
//!   first (so an INI tree always has a `DEFAULT` map, possibly empty).
//! * Keys and values are trimmed; `key = value` or `key: value` (the first
//!   `=` or `:` splits); keys may be quoted with `"` or `` ` ``.
//! * Values: `"""…"""` (may span lines) and `` `…` `` are taken literally; a
//!   trailing `\` continues the value on the next line; otherwise the value
//!   is cut at the first `#` or `;` (inline comment) and one pair of
//!   surrounding `"` or `'` is removed.
//! * Comment lines (`;` or `#`) before a section header become the
//!   section's comment (the first item of its map); comment lines before a
//!   key, plus its inline comment, become the key's comment, which sops
//!   places *after* the key. sops strips the leading `;`/`#` and spaces.
//!   Comments at the end of the file belong to nothing and are dropped.
//! * The `[sops]` section is the flattened metadata; `\n` in its values (or a
//!   `"""` multi-line value) gives newlines.
//!
//! All values are strings.

use zeroize::Zeroizing;

use super::super::error::ErrorKind;
use super::super::metadata;
use super::super::tree::{Entry, Node};
use super::Parsed;

fn err(line: usize, detail: impl Into<String>) -> ErrorKind {
    ErrorKind::Parse {
        store: "INI",
        line: Some(line),
        detail: detail.into(),
        truncated: false,
    }
}

struct Section {
    name: String,
    comment: String,
    keys: Vec<(String, String, String)>,
}

/// sops `stripCommentChar`.
fn strip_comment_char(c: &str) -> String {
    if c.starts_with(';') {
        c.trim_start_matches([';', ' ']).to_string()
    } else if c.starts_with('#') {
        c.trim_start_matches(['#', ' ']).to_string()
    } else {
        c.to_string()
    }
}

struct Lines<'a> {
    lines: Vec<&'a str>,
    next: usize,
}

impl<'a> Lines<'a> {
    /// The next raw line including its `\n` (none on the last line).
    fn take(&mut self) -> Option<&'a str> {
        let l = self.lines.get(self.next).copied();
        self.next += 1;
        l
    }
}

/// go-ini `readValue`: returns the value and an inline comment.
fn read_value(
    rest: &str,
    lines: &mut Lines<'_>,
    line_no: usize,
) -> Result<(String, String), ErrorKind> {
    let line = rest.trim_start();
    if line.trim().is_empty() {
        return Ok((String::new(), String::new()));
    }
    let quote = if line.len() > 3 && line.starts_with("\"\"\"") {
        Some("\"\"\"")
    } else if line.starts_with('`') {
        Some("`")
    } else {
        None
    };
    if let Some(q) = quote {
        let body = &line[q.len()..];
        if let Some(pos) = body.rfind(q) {
            return Ok((body[..pos].to_string(), String::new()));
        }
        // Multi-line: the first line's rest (with its newline), then whole
        // lines until one holds the closing quote.
        let mut val = body.to_string();
        loop {
            let Some(next) = lines.take() else {
                return Err(ErrorKind::Parse {
                    store: "INI",
                    line: Some(line_no),
                    detail: format!("a {q}-quoted value is never closed"),
                    truncated: true,
                });
            };
            if let Some(pos) = next.rfind(q) {
                val.push_str(&next[..pos]);
                let after = next[pos + q.len()..].trim();
                let comment = if after.starts_with(['#', ';']) {
                    after.to_string()
                } else {
                    String::new()
                };
                return Ok((val, comment));
            }
            val.push_str(next);
        }
    }
    let mut line = line.trim().to_string();
    if line.ends_with('\\') {
        // Continuation lines.
        line.pop();
        while let Some(next) = lines.take() {
            let next = next.trim();
            if next.is_empty() {
                break;
            }
            line.push_str(next);
            if !line.ends_with('\\') {
                break;
            }
            line.pop();
        }
        return Ok((line, String::new()));
    }
    let mut comment = String::new();
    if let Some(i) = line.find(['#', ';']) {
        comment = line[i..].to_string();
        line = line[..i].trim().to_string();
    }
    for q in ['\'', '"'] {
        if line.len() >= 2
            && line.starts_with(q)
            && line.ends_with(q)
            && line.matches(q).count() == 2
        {
            line = line[1..line.len() - 1].to_string();
            break;
        }
    }
    Ok((line, comment))
}

/// go-ini `readKeyName`: the key and the rest of the line after the
/// delimiter.
fn read_key(line: &str, line_no: usize) -> Result<(String, &str), ErrorKind> {
    let quote = if line.starts_with("\"\"\"") && line.len() > 6 {
        Some("\"\"\"")
    } else if line.starts_with('"') {
        Some("\"")
    } else if line.starts_with('`') {
        Some("`")
    } else {
        None
    };
    if let Some(q) = quote {
        let body = &line[q.len()..];
        let Some(pos) = body.find(q) else {
            return Err(err(line_no, "a quoted key is never closed"));
        };
        let after = &body[pos + q.len()..];
        let Some(d) = after.find(['=', ':']) else {
            return Err(err(line_no, "no `=` or `:` after the key"));
        };
        return Ok((body[..pos].trim().to_string(), &after[d + 1..]));
    }
    match line.find(['=', ':']) {
        None => Err(err(
            line_no,
            "a line is neither a section, a `key = value` nor a comment",
        )),
        Some(0) => Err(err(line_no, "empty key name")),
        Some(d) => Ok((line[..d].trim().to_string(), &line[d + 1..])),
    }
}

/// Parses an INI sops file.
pub(crate) fn parse(text: &str) -> Result<Parsed, ErrorKind> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = Lines {
        lines: text.split_inclusive('\n').collect(),
        next: 0,
    };
    let mut sections = vec![Section {
        name: "DEFAULT".into(),
        comment: String::new(),
        keys: Vec::new(),
    }];
    let mut current = 0;
    let mut comment = String::new();
    while let Some(raw) = lines.take() {
        let line_no = lines.next;
        let line = raw.trim_start();
        if line.trim_end().is_empty() {
            continue;
        }
        if line.starts_with('#') || line.starts_with(';') {
            comment.push_str(line);
            if !line.ends_with('\n') {
                comment.push('\n');
            }
            continue;
        }
        if line.starts_with('[') {
            let Some(close) = line.rfind(']') else {
                return Err(err(line_no, "a section header is never closed"));
            };
            let name = &line[1..close];
            if name.is_empty() {
                return Err(err(line_no, "empty section name"));
            }
            let after = line[close + 1..].trim();
            if after.starts_with(['#', ';']) {
                comment.push_str(after);
            }
            current = match sections.iter().position(|s| s.name == name) {
                Some(i) => i,
                None => {
                    sections.push(Section {
                        name: name.to_string(),
                        comment: String::new(),
                        keys: Vec::new(),
                    });
                    sections.len() - 1
                }
            };
            sections[current].comment = comment.trim().to_string();
            comment.clear();
            continue;
        }
        let (key, rest) = read_key(line, line_no)?;
        let (value, inline) = read_value(rest, &mut lines, line_no)?;
        comment.push_str(&inline);
        let key_comment = comment.trim().to_string();
        comment.clear();
        let section = &mut sections[current];
        if section.keys.iter().any(|(k, _, _)| *k == key) {
            return Err(err(
                line_no,
                format!(
                    "duplicate key `{key}` in section `{}` (refused: the value would be ambiguous)",
                    section.name
                ),
            ));
        }
        section.keys.push((key, value, key_comment));
    }

    let mut docs = Vec::new();
    let mut sops = None;
    for s in sections {
        if s.name == "sops" {
            let pairs: Vec<(String, String)> = s.keys.into_iter().map(|(k, v, _)| (k, v)).collect();
            sops = Some(metadata::unflatten(&pairs)?);
            continue;
        }
        let mut entries = Vec::new();
        if !s.comment.is_empty() {
            entries.push(Entry::Comment(Zeroizing::new(strip_comment_char(
                &s.comment,
            ))));
        }
        for (k, v, c) in s.keys {
            entries.push(Entry::Pair(k, Node::str(v)));
            if !c.is_empty() {
                entries.push(Entry::Comment(Zeroizing::new(strip_comment_char(&c))));
            }
        }
        docs.push(Entry::Pair(s.name, Node::Map(entries)));
    }
    Ok(Parsed {
        docs: vec![Node::Map(docs)],
        sops,
    })
}

fn quote_value(v: &str) -> Option<String> {
    if v.contains('\n') || v.contains('\r') {
        return (!v.contains("\"\"\"") && !v.ends_with('"')).then(|| format!("\"\"\"{v}\"\"\""));
    }
    let special = v != v.trim()
        || v.contains(['#', ';'])
        || v.starts_with(['"', '\'', '`'])
        || v.ends_with('\\')
        || v.starts_with("\"\"\"");
    if !special {
        return Some(v.to_string());
    }
    if !v.contains('`') {
        Some(format!("`{v}`"))
    } else if !v.contains("\"\"\"") && !v.ends_with('"') {
        Some(format!("\"\"\"{v}\"\"\""))
    } else {
        None
    }
}

fn quote_key(k: &str) -> Option<String> {
    let special = k.is_empty()
        || k != k.trim()
        || k.contains(['=', ':', '\n', '\r'])
        || k.starts_with(['[', '#', ';', '"', '`']);
    if !special {
        Some(k.to_string())
    } else if !k.contains('`') && !k.contains(['\n', '\r']) && k == k.trim() && !k.is_empty() {
        Some(format!("`{k}`"))
    } else {
        None
    }
}

fn write_comment(c: &str, out: &mut String) {
    for line in c.split('\n') {
        out.push_str("; ");
        out.push_str(line);
        out.push('\n');
    }
}

/// Emits `{section: {key: value}}` as INI. `DEFAULT` keys come first,
/// without a header. `Err` is the key path and why the tree does not fit.
pub(crate) fn emit(doc: &Node, out: &mut String) -> Result<(), (String, String)> {
    let Node::Map(sections) = doc else {
        return Err((String::new(), "INI needs a map of sections".into()));
    };
    let mut first = true;
    let mut pending: Vec<&str> = Vec::new();
    for e in sections {
        let (name, body) = match e {
            Entry::Comment(c) => {
                pending.push(c);
                continue;
            }
            Entry::Pair(name, body) => (name, body),
        };
        let Node::Map(entries) = body else {
            return Err((
                name.clone(),
                format!(
                    "INI holds sections of key = value pairs, and this top-level value is a {} (emit yaml or json instead)",
                    body.kind_name()
                ),
            ));
        };
        let has_keys = entries.iter().any(|e| matches!(e, Entry::Pair(..)));
        if name == "DEFAULT" && !has_keys && pending.is_empty() {
            continue;
        }
        let leading = first;
        if !first {
            out.push('\n');
        }
        first = false;
        for c in pending.drain(..) {
            write_comment(c, out);
        }
        let leading_comments = entries
            .iter()
            .take_while(|e| matches!(e, Entry::Comment(_)))
            .count();
        for e in &entries[..leading_comments] {
            if let Entry::Comment(c) = e {
                write_comment(c, out);
            }
        }
        let entries = &entries[leading_comments..];
        // Keys before any header are DEFAULT's; later, it needs its header.
        if name != "DEFAULT" || !leading {
            if name.contains([']', '\n', '\r']) || name.is_empty() {
                return Err((
                    name.clone(),
                    "this section name cannot be written in INI".into(),
                ));
            }
            out.push('[');
            out.push_str(name);
            out.push_str("]\n");
        }
        // sops keeps a key's comment *after* the key in the tree and writes
        // it before the key; a comment first in a section is the section's.
        let mut i = 0;
        while i < entries.len() {
            let Entry::Pair(k, v) = &entries[i] else {
                i += 1;
                continue;
            };
            i += 1;
            while let Some(Entry::Comment(c)) = entries.get(i) {
                write_comment(c, out);
                i += 1;
            }
            let path = format!("{name}.{k}");
            let text = match v {
                Node::Scalar(s) => super::scalar_text(s).ok_or_else(|| {
                    (
                        path.clone(),
                        "binary data cannot be written in INI".to_string(),
                    )
                })?,
                Node::Null => Zeroizing::new(String::new()),
                other => {
                    return Err((
                        path,
                        format!(
                        "the value is a {}; INI values must be scalars (emit yaml or json instead)",
                        other.kind_name()
                    ),
                    ))
                }
            };
            let key = quote_key(k).ok_or_else(|| {
                (
                    path.clone(),
                    "this key cannot be written in INI".to_string(),
                )
            })?;
            let value = Zeroizing::new(quote_value(&text).ok_or_else(|| {
                (
                    path.clone(),
                    "this value cannot be quoted in INI".to_string(),
                )
            })?);
            out.push_str(&key);
            out.push_str(" = ");
            out.push_str(&value);
            out.push('\n');
        }
    }
    for c in pending {
        write_comment(c, out);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::super::tree::Scalar;
    use super::*;

    fn val<'a>(p: &'a Parsed, s: &str, k: &str) -> &'a str {
        match p.docs[0].get(s).and_then(|m| m.get(k)) {
            Some(Node::Scalar(Scalar::Str(v))) => v.as_str(),
            other => panic!("{s}.{k}: {other:?}"),
        }
    }

    #[test]
    fn go_ini_rules() {
        let text = "top = 1\n; section comment\n[a b]\nk1 = \"quoted\"  \nk2: v2 ; inline\n# key comment\nk3 = `x ; y`\nk4 = \"\"\"multi\nline\"\"\"\nk5 = con\\\n  tinued\n[sops]\nversion = 3\nage__list_0__map_enc = a\\nb\n";
        let p = parse(text).unwrap();
        assert_eq!(val(&p, "DEFAULT", "top"), "1");
        assert_eq!(val(&p, "a b", "k1"), "quoted");
        assert_eq!(val(&p, "a b", "k2"), "v2");
        assert_eq!(val(&p, "a b", "k3"), "x ; y");
        assert_eq!(val(&p, "a b", "k4"), "multi\nline");
        assert_eq!(val(&p, "a b", "k5"), "continued");
        let Some(Node::Map(e)) = p.docs[0].get("a b") else {
            panic!()
        };
        let comments: Vec<String> = e
            .iter()
            .filter_map(|e| match e {
                Entry::Comment(c) => Some(c.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(comments, vec!["section comment", "inline", "key comment"]);
        assert!(p.sops.unwrap().get("age").is_some());
        assert!(parse("[unclosed\n").is_err());
        assert!(parse("novalue\n").is_err());
        assert!(parse("k = \"\"\"never closed\n").is_err());
    }

    #[test]
    fn emit_round_trips() {
        let text =
            "top = 1\n; c\n[a]\nk1 = ` lead`\nk2 = \"\"\"two\nlines\"\"\"\nk3 = plain value\n";
        let p = parse(text).unwrap();
        let mut out = String::new();
        emit(&p.docs[0], &mut out).unwrap();
        let again = parse(&out).unwrap();
        assert_eq!(val(&again, "a", "k1"), " lead");
        assert_eq!(val(&again, "a", "k2"), "two\nlines");
        assert_eq!(val(&again, "DEFAULT", "top"), "1");
        let mut out2 = String::new();
        emit(&again.docs[0], &mut out2).unwrap();
        assert_eq!(out, out2);
    }
}
