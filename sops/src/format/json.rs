//! JSON and binary stores [stores/json/store.go].
//!
//! A small parser of its own instead of `serde_json`: sops trees keep key
//! order, duplicate keys must be refused (a second `"password"` would be
//! ambiguous), and integers and floats must stay apart (sops ≥ 3.13.2 reads
//! a JSON integer that fits 64 bits as `int`, anything else as `float`).
//! Only a top-level object is accepted. Nesting depth is bounded.
//!
//! The binary store is JSON too: `{"data": "ENC[...]", "sops": {...}}`, the
//! whole plaintext file being the single string `data`.

use zeroize::Zeroizing;

use super::super::error::ErrorKind;
use super::super::gocompat;
use super::super::tree::{Entry, Node, Scalar};
use super::{Parsed, MAX_DEPTH};

struct P<'a> {
    s: &'a [u8],
    i: usize,
    store: &'static str,
}

impl P<'_> {
    fn line(&self) -> usize {
        1 + self.s[..self.i.min(self.s.len())]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
    }

    fn err(&self, detail: &str) -> ErrorKind {
        let truncated = self.i >= self.s.len();
        ErrorKind::Parse {
            store: self.store,
            line: Some(self.line()),
            detail: if truncated {
                format!("{detail} (unexpected end of input)")
            } else {
                detail.to_string()
            },
            truncated,
        }
    }

    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn expect(&mut self, c: u8, what: &str) -> Result<(), ErrorKind> {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(what))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Node, ErrorKind> {
        if depth > MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        self.ws();
        match self.s.get(self.i) {
            Some(b'{') => self.object(depth),
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Node::List(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Node::List(items));
                        }
                        _ => return Err(self.err("expected `,` or `]` in an array")),
                    }
                }
            }
            Some(b'"') => Ok(Node::Scalar(Scalar::Str(self.string()?))),
            Some(b't') => self.word("true", Node::Scalar(Scalar::Bool(true))),
            Some(b'f') => self.word("false", Node::Scalar(Scalar::Bool(false))),
            Some(b'n') => self.word("null", Node::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(self.err("expected a JSON value")),
        }
    }

    fn word(&mut self, w: &str, node: Node) -> Result<Node, ErrorKind> {
        if self.s[self.i..].starts_with(w.as_bytes()) {
            self.i += w.len();
            Ok(node)
        } else {
            Err(self.err("invalid literal"))
        }
    }

    fn number(&mut self) -> Result<Node, ErrorKind> {
        let start = self.i;
        if self.s.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        let digits = |p: &mut Self| {
            let st = p.i;
            while p.i < p.s.len() && p.s[p.i].is_ascii_digit() {
                p.i += 1;
            }
            p.i - st
        };
        let int_start = self.i;
        let n = digits(self);
        if n == 0 || (n > 1 && self.s[int_start] == b'0') {
            return Err(self.err("invalid number"));
        }
        let mut is_float = false;
        if self.s.get(self.i) == Some(&b'.') {
            self.i += 1;
            is_float = true;
            if digits(self) == 0 {
                return Err(self.err("invalid number"));
            }
        }
        if matches!(self.s.get(self.i), Some(b'e' | b'E')) {
            self.i += 1;
            is_float = true;
            if matches!(self.s.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if digits(self) == 0 {
                return Err(self.err("invalid number"));
            }
        }
        let text =
            std::str::from_utf8(&self.s[start..self.i]).map_err(|_| self.err("invalid number"))?;
        if !is_float {
            if let Ok(i) = text.parse::<i64>() {
                return Ok(Node::Scalar(Scalar::Int(i)));
            }
        }
        gocompat::parse_float(text)
            .filter(|f| f.is_finite())
            .map(|f| Node::Scalar(Scalar::Float(f)))
            .ok_or_else(|| self.err("number out of range"))
    }

    fn hex4(&mut self) -> Result<u32, ErrorKind> {
        let h = self
            .s
            .get(self.i..self.i + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or_else(|| self.err("invalid \\u escape"))?;
        self.i += 4;
        Ok(h)
    }

    fn string(&mut self) -> Result<Zeroizing<String>, ErrorKind> {
        self.i += 1; // opening quote
        let mut out = Zeroizing::new(Vec::new());
        loop {
            let Some(&b) = self.s.get(self.i) else {
                return Err(self.err("unterminated string"));
            };
            self.i += 1;
            match b {
                b'"' => break,
                b'\\' => {
                    let Some(&e) = self.s.get(self.i) else {
                        return Err(self.err("unterminated string"));
                    };
                    self.i += 1;
                    let c = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let code = if (0xD800..0xDC00).contains(&hi)
                                && self.s[self.i..].starts_with(b"\\u")
                            {
                                self.i += 2;
                                let lo = self.hex4()?;
                                if (0xDC00..0xE000).contains(&lo) {
                                    0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                                } else {
                                    0xFFFD
                                }
                            } else {
                                hi
                            };
                            char::from_u32(code).unwrap_or('\u{FFFD}')
                        }
                        _ => return Err(self.err("invalid escape in a string")),
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                b if b < 0x20 => return Err(self.err("control character in a string")),
                b => out.push(b),
            }
        }
        match std::str::from_utf8(&out) {
            Ok(s) => Ok(Zeroizing::new(s.to_string())),
            Err(_) => Err(self.err("a string is not UTF-8")),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Node, ErrorKind> {
        self.i += 1;
        let mut entries: Vec<Entry> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        self.ws();
        if self.s.get(self.i) == Some(&b'}') {
            self.i += 1;
            return Ok(Node::Map(entries));
        }
        loop {
            self.ws();
            if self.s.get(self.i) != Some(&b'"') {
                return Err(self.err("expected a string key"));
            }
            let key = self.string()?.to_string();
            if !seen.insert(key.clone()) {
                return Err(self.err(&format!(
                    "duplicate key `{key}` (sops refuses duplicate keys)"
                )));
            }
            self.expect(b':', "expected `:` after a key")?;
            let v = self.value(depth + 1)?;
            entries.push(Entry::Pair(key, v));
            self.ws();
            match self.s.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(Node::Map(entries));
                }
                _ => return Err(self.err("expected `,` or `}` in an object")),
            }
        }
    }
}

fn parse_with(text: &str, store: &'static str) -> Result<Parsed, ErrorKind> {
    let mut p = P {
        s: text.as_bytes(),
        i: 0,
        store,
    };
    p.ws();
    if p.s.get(p.i) != Some(&b'{') {
        return Err(if p.i >= p.s.len() {
            p.err("the file is empty")
        } else {
            p.err("sops only supports JSON files with a top-level object")
        });
    }
    let root = p.value(0)?;
    p.ws();
    if p.i != p.s.len() {
        return Err(p.err("unexpected data after the top-level object"));
    }
    let Node::Map(mut entries) = root else {
        return Err(p.err("sops only supports JSON files with a top-level object"));
    };
    let sops = entries
        .iter()
        .position(|e| matches!(e, Entry::Pair(k, _) if k == "sops"))
        .and_then(|pos| match entries.remove(pos) {
            Entry::Pair(_, v) => Some(v),
            Entry::Comment(_) => None,
        });
    Ok(Parsed {
        docs: vec![Node::Map(entries)],
        sops,
    })
}

/// Parses a JSON sops file.
pub(crate) fn parse(text: &str) -> Result<Parsed, ErrorKind> {
    parse_with(text, "JSON")
}

/// Parses a binary-store sops file (JSON with a `data` string).
pub(crate) fn parse_binary(text: &str) -> Result<Parsed, ErrorKind> {
    let parsed = parse_with(text, "binary-store (JSON)")?;
    if parsed.sops.is_some() {
        match parsed.docs[0].get("data") {
            Some(Node::Scalar(Scalar::Str(_))) => {}
            _ => {
                return Err(ErrorKind::Parse {
                    store: "binary-store (JSON)",
                    line: None,
                    detail: "a binary sops file must have a string `data`".into(),
                    truncated: false,
                })
            }
        }
    }
    Ok(parsed)
}

// ---------------------------------------------------------------------------
// Emitter

fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Emits one document as JSON (tab indentation like `sops -d`; comments
/// cannot be represented and are dropped). Floats with an integral value
/// are written without a fraction, as Go's encoder (and so `sops -d`) does.
/// `Err` carries the key path of a value JSON cannot hold and why.
pub(crate) fn emit(doc: &Node, out: &mut String) -> Result<(), (String, String)> {
    fn value(
        n: &Node,
        indent: usize,
        path: &str,
        out: &mut String,
    ) -> Result<(), (String, String)> {
        let pad = "\t".repeat(indent + 1);
        match n {
            Node::Map(entries) => {
                let pairs: Vec<_> = entries
                    .iter()
                    .filter_map(|e| match e {
                        Entry::Pair(k, v) => Some((k, v)),
                        Entry::Comment(_) => None,
                    })
                    .collect();
                if pairs.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push_str("{\n");
                for (i, (k, v)) in pairs.iter().enumerate() {
                    out.push_str(&pad);
                    write_string(k, out);
                    out.push_str(": ");
                    let p = if path.is_empty() {
                        (*k).clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    value(v, indent + 1, &p, out)?;
                    if i + 1 < pairs.len() {
                        out.push(',');
                    }
                    out.push('\n');
                }
                out.push_str(&"\t".repeat(indent));
                out.push('}');
            }
            Node::List(items) => {
                let vals: Vec<_> = items
                    .iter()
                    .filter(|n| !matches!(n, Node::Comment(_)))
                    .collect();
                if vals.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push_str("[\n");
                for (i, v) in vals.iter().enumerate() {
                    out.push_str(&pad);
                    value(v, indent + 1, &format!("{path}[{i}]"), out)?;
                    if i + 1 < vals.len() {
                        out.push(',');
                    }
                    out.push('\n');
                }
                out.push_str(&"\t".repeat(indent));
                out.push(']');
            }
            Node::Null | Node::Comment(_) => out.push_str("null"),
            Node::Scalar(s) => match s {
                Scalar::Str(v) => write_string(v, out),
                Scalar::Int(i) => out.push_str(&i.to_string()),
                Scalar::Float(f) if f.is_finite() => {
                    // Keep the type: sops writes 7.0 as `7`, which a
                    // consumer then reads as an integer.
                    let t = gocompat::format_float(*f);
                    out.push_str(&t);
                    if !t.contains(['.', 'e', 'E']) {
                        out.push_str(".0");
                    }
                }
                Scalar::Float(_) => {
                    return Err((path.to_string(), "JSON cannot hold NaN or infinity".into()))
                }
                Scalar::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
                Scalar::Time(t) => write_string(&t.format_rfc3339_nano(), out),
                Scalar::Bytes(b) => match std::str::from_utf8(b) {
                    Ok(s) => write_string(s, out),
                    Err(_) => {
                        return Err((
                            path.to_string(),
                            "the value is binary data, which JSON cannot hold; use raw output"
                                .into(),
                        ))
                    }
                },
            },
        }
        Ok(())
    }
    value(doc, 0, "", out)?;
    out.push('\n');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_in_order_with_types() {
        let p = parse(r#"{"b": 1, "a": [1.0, "x\u00e9\n", true, null, {"k": -2}], "big": 99999999999999999999, "sops": {"v": 1}}"#).unwrap();
        let Node::Map(e) = &p.docs[0] else { panic!() };
        let keys: Vec<_> = e
            .iter()
            .filter_map(|e| match e {
                Entry::Pair(k, _) => Some(k.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(keys, vec!["b", "a", "big"]);
        assert!(matches!(
            p.docs[0].get("b"),
            Some(Node::Scalar(Scalar::Int(1)))
        ));
        assert!(matches!(
            p.docs[0].get("big"),
            Some(Node::Scalar(Scalar::Float(_)))
        ));
        assert!(p.sops.is_some());
    }

    #[test]
    fn errors() {
        for bad in [
            "[1]",
            "",
            "{\"a\": 1, \"a\": 2}",
            "{\"a\": 01}",
            "{\"a\": \"x}",
            "{\"a\": 1} x",
            "{\"a\" 1}",
            "{\"a\": tru}",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let deep = format!("{{\"a\": {}{}}}", "[".repeat(500), "]".repeat(500));
        assert!(parse(&deep).is_err());
        match parse("{\"a\": \"abc") {
            Err(ErrorKind::Parse { truncated, .. }) => assert!(truncated),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn emit_round_trips() {
        let text = "{\"a\": {\"b\": [1, 2.5, \"q\\\"\\n\", false, null, {}, []]}, \"c\": 7.0}";
        let p = parse(text).unwrap();
        let mut out = String::new();
        emit(&p.docs[0], &mut out).unwrap();
        assert_eq!(
            out,
            "{\n\t\"a\": {\n\t\t\"b\": [\n\t\t\t1,\n\t\t\t2.5,\n\t\t\t\"q\\\"\\n\",\n\t\t\tfalse,\n\t\t\tnull,\n\t\t\t{},\n\t\t\t[]\n\t\t]\n\t},\n\t\"c\": 7.0\n}\n"
        );
        assert!(parse(&out).is_ok());
    }
}
