//! Parsing TOML files with errors a person can act on.
//!
//! `toml`'s own messages are good but anonymous; this adds the file name,
//! `line:column`, and a did-you-mean hint for misspelt keys, e.g.
//!
//! ```text
//! roles/web/role.toml:4:1: unknown field `tempalte` (did you mean `template`?), expected one of ...
//! ```

use serde::de::DeserializeOwned;

/// Parses `text` (the content of `file`) into `T`. The error names the file,
/// the line and column, and suggests the closest known key for a typo.
pub fn parse<T: DeserializeOwned>(file: &str, text: &str) -> Result<T, String> {
    toml::from_str::<T>(text).map_err(|e| describe(file, text, &e))
}

fn describe(file: &str, text: &str, err: &toml::de::Error) -> String {
    let location = match err.span() {
        Some(span) => {
            let (line, col) = line_col(text, span.start);
            format!("{file}:{line}:{col}")
        }
        None => file.to_string(),
    };
    let message = err.message().trim().to_string();
    let message = add_hint(&message);
    // A value of the wrong type: say which key holds it (toml points at
    // the value, and names only the types).
    let key = err
        .span()
        .filter(|_| message.starts_with("invalid type") || message.starts_with("invalid value"))
        .and_then(|span| key_of_line(text, span.start));
    match key {
        Some(k) => format!("{location}: key `{k}`: {message}"),
        None => format!("{location}: {message}"),
    }
}

/// The key assigned on the line holding byte `offset` (`key = value`).
fn key_of_line(text: &str, offset: usize) -> Option<String> {
    let start = text[..floor_char_boundary(text, offset)]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    (!key.is_empty() && !key.contains(char::is_whitespace)).then(|| key.to_string())
}

/// Line numbers of many offsets in one text: the offsets of its line
/// starts, built once, then a binary search per lookup.
///
/// Why: a role file names the line of every entry in its messages, and
/// calling [`line_col`] per entry rescans the text from the start each time.
/// With 10,000 `[[files]]` that was quadratic: loading took 2.1 s instead of
/// 25 ms (found by `bench/run` at 10,000 files, issue #18).
pub struct LineIndex {
    /// Byte offset where each line starts; `starts[0] == 0`.
    starts: Vec<usize>,
}

impl LineIndex {
    pub fn new(text: &str) -> LineIndex {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }

    /// 1-based line of a byte offset (the same line as [`line_col`]).
    pub fn line(&self, offset: usize) -> usize {
        // The number of line starts at or before `offset`.
        self.starts.partition_point(|&s| s <= offset)
    }
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..floor_char_boundary(text, offset)];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// serde says "unknown field `x`, expected one of `a`, `b`": insert the
/// closest candidate when it is close enough to be a typo.
fn add_hint(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_string();
    };
    let Some((unknown, tail)) = rest.split_once('`') else {
        return message.to_string();
    };
    let candidates: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
    match closest(unknown, &candidates) {
        Some(best) => format!("unknown field `{unknown}` (did you mean `{best}`?){tail}"),
        None => message.to_string(),
    }
}

/// The candidate closest to `word`, if it is plausibly a typo of it.
pub fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::model::RoleFile;

    #[test]
    fn typo_in_key_names_file_line_and_suggestion() {
        let text = "[[files]]\npath = \"/etc/x\"\ntempalte = \"x.tera\"\n";
        let err = parse::<RoleFile>("roles/web/role.toml", text).unwrap_err();
        assert!(err.starts_with("roles/web/role.toml:3:1: "), "{err}");
        assert!(err.contains("did you mean `template`?"), "{err}");
    }

    #[test]
    fn no_hint_for_unrelated_word() {
        let text = "zzzzzzzzzz = 1\n";
        let err = parse::<RoleFile>("r.toml", text).unwrap_err();
        assert!(err.contains("unknown field `zzzzzzzzzz`"), "{err}");
        assert!(!err.contains("did you mean"), "{err}");
    }

    #[test]
    fn line_index_agrees_with_line_col_at_every_offset() {
        for text in [
            "",
            "a",
            "ab\ncd",
            "\n\nx\n",
            "é\n[[files]]\npath = \"ü\"\n",
            "x\r\ny\n",
        ] {
            let index = LineIndex::new(text);
            for offset in 0..=text.len() + 2 {
                assert_eq!(
                    index.line(offset),
                    line_col(text, offset).0,
                    "{text:?} at {offset}"
                );
            }
        }
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_key() {
        let err = parse::<crate::config::Fragment>(
            "agent.toml",
            "host = \"h\"\nrequire_signed = \"yes\"\n",
        )
        .unwrap_err();
        assert!(
            err.starts_with("agent.toml:2:18: key `require_signed`: invalid type"),
            "{err}"
        );
    }
}
