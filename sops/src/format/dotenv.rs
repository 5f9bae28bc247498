//! dotenv store [stores/dotenv/store.go].
//!
//! sops' dotenv is deliberately simple and this reader matches it exactly:
//! the file is split on `\n`, empty lines are skipped, a line starting with
//! `#` is a comment (the text after `#`), every other line is split at its
//! first `=` with key and value taken verbatim (no trimming, no quotes), and
//! the two characters `\n` in a value mean a newline. Keys starting with
//! `sops_` are the flattened metadata. All values are strings.

use super::super::error::ErrorKind;
use super::super::metadata;
use super::super::tree::{Entry, Node};
use super::Parsed;

fn err(line: usize, detail: &str) -> ErrorKind {
    ErrorKind::Parse {
        store: "dotenv",
        line: Some(line),
        detail: detail.into(),
        truncated: false,
    }
}

/// Parses a dotenv sops file.
pub(crate) fn parse(text: &str) -> Result<Parsed, ErrorKind> {
    let mut entries = Vec::new();
    let mut meta: Vec<(String, String)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (n, line) in text.split('\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            entries.push(Entry::Comment(zeroize::Zeroizing::new(c.to_string())));
            continue;
        }
        let Some(pos) = line.find('=') else {
            return Err(err(
                n + 1,
                "a line is neither `KEY=VALUE` nor a `#` comment",
            ));
        };
        let (key, value) = (&line[..pos], &line[pos + 1..]);
        if let Some(mkey) = key.strip_prefix("sops_") {
            meta.push((mkey.to_string(), value.to_string()));
            continue;
        }
        if !seen.insert(key.to_string()) {
            return Err(err(
                n + 1,
                &format!("duplicate key `{key}` (sops refuses duplicate keys)"),
            ));
        }
        entries.push(Entry::Pair(
            key.to_string(),
            Node::str(value.replace("\\n", "\n")),
        ));
    }
    let sops = if meta.is_empty() {
        None
    } else {
        Some(metadata::unflatten(&meta)?)
    };
    Ok(Parsed {
        docs: vec![Node::Map(entries)],
        sops,
    })
}

/// Emits a flat map as dotenv. `Err` is the key path and the reason when the
/// tree does not fit (nested values, keys dotenv cannot hold).
pub(crate) fn emit(doc: &Node, out: &mut String) -> Result<(), (String, String)> {
    let Node::Map(entries) = doc else {
        return Err((
            String::new(),
            "dotenv needs a map of KEY=VALUE pairs".into(),
        ));
    };
    for e in entries {
        match e {
            Entry::Comment(c) => {
                for line in c.split('\n') {
                    out.push('#');
                    out.push_str(line);
                    out.push('\n');
                }
            }
            Entry::Pair(k, v) => {
                if k.is_empty() || k.contains(['=', '\n']) || k.starts_with('#') {
                    return Err((
                        k.clone(),
                        "this key cannot be written as a dotenv key".into(),
                    ));
                }
                let text = match v {
                    Node::Scalar(s) => super::scalar_text(s).ok_or_else(|| {
                        (
                            k.clone(),
                            "the value is binary data, which dotenv cannot hold".to_string(),
                        )
                    })?,
                    // What sops 3.11 writes (`sops decrypt --output-type
                    // dotenv` of `a: null` or `a: ~` gives `a=<nil>`, Go's
                    // rendering of nil): the same bytes as `sops -d`.
                    Node::Null => zeroize::Zeroizing::new("<nil>".to_string()),
                    other => {
                        return Err((
                            k.clone(),
                            format!(
                                "the value is a {}; dotenv holds only flat KEY=VALUE pairs (emit yaml or json instead)",
                                other.kind_name()
                            ),
                        ))
                    }
                };
                out.push_str(k);
                out.push('=');
                out.push_str(&zeroize::Zeroizing::new(text.replace('\n', "\\n")));
                out.push('\n');
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::super::tree::Scalar;
    use super::*;

    #[test]
    fn verbatim_keys_and_values() {
        let p = parse("#c\nfoo = bar \nA=x\\ny\nsops_version=3\nsops_age__list_0__map_enc=a\\nb\n")
            .unwrap();
        let d = &p.docs[0];
        assert!(
            matches!(d.get("foo "), Some(Node::Scalar(Scalar::Str(s))) if s.as_str() == " bar ")
        );
        assert!(matches!(d.get("A"), Some(Node::Scalar(Scalar::Str(s))) if s.as_str() == "x\ny"));
        let sops = p.sops.unwrap();
        assert!(sops.get("age").is_some());
        assert!(parse("novalue\n").is_err());
        assert!(parse("A=1\nA=2\n").is_err());
        let mut out = String::new();
        emit(d, &mut out).unwrap();
        assert_eq!(out, "#c\nfoo = bar \nA=x\\ny\n");
    }

    /// sops 3.11, `decrypt --output-type dotenv` of
    /// `a: null\nb: "multi\nline"\nc: ~\nd: ""`, byte for byte.
    #[test]
    fn nulls_and_newlines_come_out_as_sops_writes_them() {
        let doc = Node::Map(vec![
            Entry::Pair("a".into(), Node::Null),
            Entry::Pair("b".into(), Node::str("multi\nline")),
            Entry::Pair("c".into(), Node::Null),
            Entry::Pair("d".into(), Node::str("")),
        ]);
        let mut out = String::new();
        emit(&doc, &mut out).unwrap();
        assert_eq!(out, "a=<nil>\nb=multi\\nline\nc=<nil>\nd=\n");
    }
}
