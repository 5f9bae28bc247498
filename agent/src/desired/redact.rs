//! Redaction of decrypted values from every message the render step emits.
//!
//! Why here, and why this way: a template error is built by Tera from the
//! values it was working on (`Filter round received an incorrect type …
//! got "hunter2"`), and the error then travels to stderr, the journal,
//! `history.jsonl`, `last-run.json`, `status` and the `validate` output a
//! CI system keeps. Patching each filter is a losing game (there are
//! dozens, and a secret can also be upper-cased, split, sliced, escaped or
//! used as a map key before the failing one sees it). So the rule is
//! enforced at the one boundary where render state becomes text that
//! leaves the render step ([`crate::desired::render::Renderer`] returning
//! its diagnostics): every message is scrubbed of every value decrypted
//! during that render.
//!
//! What counts as a leak, precisely: a value appearing whole (any length),
//! or any run of [`MIN_FRAGMENT`] or more of its characters, compared
//! ASCII-case-insensitively, in the value's own spelling, its Unicode upper
//! and lower case, or in their JSON,
//! Rust-debug, HTML or percent-encoded spelling, or reversed. Over-redaction
//! (an ordinary word of a message that happens to share four letters with a
//! secret) is the accepted price: a message with a marker in it is still a
//! message, a leaked password is an incident.

use std::sync::Mutex;

use zeroize::Zeroizing;

/// What a redacted run is replaced with.
pub const MARKER: &str = "[redacted]";

/// Shorter runs of a secret's characters are left alone (otherwise every
/// single letter of a message would match some secret).
pub const MIN_FRAGMENT: usize = 4;

/// The decrypted values of one render, in every spelling a message may
/// carry them. Wiped on drop.
#[derive(Default)]
pub struct Redactor {
    forms: Mutex<Vec<Zeroizing<Vec<u8>>>>,
}

impl Redactor {
    /// Remembers a decrypted value (and its escaped spellings).
    pub fn add(&self, value: &str) {
        if value.is_empty() {
            return;
        }
        let mut forms: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        let mut push = |s: String| {
            let s = Zeroizing::new(s);
            if !s.is_empty() {
                forms.push(Zeroizing::new(s.as_bytes().to_ascii_lowercase()));
            }
        };
        // Matching folds ASCII case only (a message's byte offsets must
        // stay its own), so the value's Unicode upper and lower cases are
        // spellings of their own: `upper` of a Cyrillic secret is not its
        // ASCII lowercase.
        let upper = Zeroizing::new(value.to_uppercase());
        let lower = Zeroizing::new(value.to_lowercase());
        for value in [value, upper.as_str(), lower.as_str()] {
            push(value.to_string());
            // Every temporary copy wiped too, not only the forms kept.
            if let Ok(json) = serde_json::to_string(value).map(Zeroizing::new) {
                push(json[1..json.len() - 1].to_string());
            }
            let debug = Zeroizing::new(format!("{value:?}"));
            push(debug[1..debug.len() - 1].to_string());
            push(tera::escape_html(value));
            push(percent_encode(value));
            let mut reversed = String::with_capacity(value.len());
            reversed.extend(value.chars().rev());
            push(reversed);
        }
        let Ok(mut all) = self.forms.lock() else {
            return;
        };
        for f in forms {
            if !all.iter().any(|g| g.as_slice() == f.as_slice()) {
                all.push(f);
            }
        }
    }

    /// Remembers every leaf of a decrypted tree.
    pub fn add_tree(&self, tree: &serde_json::Value) {
        match tree {
            serde_json::Value::String(s) => self.add(s),
            serde_json::Value::Number(n) => self.add(&n.to_string()),
            serde_json::Value::Bool(_) | serde_json::Value::Null => {}
            serde_json::Value::Array(items) => items.iter().for_each(|i| self.add_tree(i)),
            serde_json::Value::Object(map) => map.values().for_each(|v| self.add_tree(v)),
        }
    }

    /// True when no value was recorded.
    pub fn is_empty(&self) -> bool {
        self.forms.lock().is_ok_and(|f| f.is_empty())
    }

    /// `msg` with every whole value and every fragment of
    /// [`MIN_FRAGMENT`]+ characters replaced by [`MARKER`].
    pub fn redact(&self, msg: &str) -> String {
        let Ok(forms) = self.forms.lock() else {
            // A poisoned lock means a panic mid-render: say nothing.
            return MARKER.to_string();
        };
        if forms.is_empty() {
            return msg.to_string();
        }
        let hay = msg.as_bytes().to_ascii_lowercase();
        let mut hidden = vec![false; hay.len()];
        for form in forms.iter() {
            mark(&hay, form, &mut hidden);
        }
        if !hidden.iter().any(|h| *h) {
            return msg.to_string();
        }
        // Widen to character boundaries so the result stays UTF-8.
        for i in 0..hidden.len() {
            if hidden[i] {
                let mut j = i;
                while j > 0 && !msg.is_char_boundary(j) {
                    j -= 1;
                    hidden[j] = true;
                }
            }
        }
        for i in (0..hidden.len()).rev() {
            if hidden[i] {
                let mut j = i + 1;
                while j < hidden.len() && !msg.is_char_boundary(j) {
                    hidden[j] = true;
                    j += 1;
                }
            }
        }
        let mut out = String::with_capacity(msg.len());
        let mut i = 0;
        while i < msg.len() {
            if hidden[i] {
                while i < msg.len() && hidden[i] {
                    i += 1;
                }
                out.push_str(MARKER);
            } else {
                let start = i;
                while i < msg.len() && !hidden[i] {
                    i += 1;
                }
                out.push_str(&msg[start..i]);
            }
        }
        out
    }
}

/// Marks in `hidden` every occurrence of `form` in `hay`, and every run of
/// at least [`MIN_FRAGMENT`] bytes of `hay` that occurs inside `form`.
fn mark(hay: &[u8], form: &[u8], hidden: &mut [bool]) {
    let min = MIN_FRAGMENT.min(form.len());
    if hay.len() < min {
        return;
    }
    let mut i = 0;
    while i + min <= hay.len() {
        let mut len = 0;
        let mut l = min;
        while i + l <= hay.len() && contains(form, &hay[i..i + l]) {
            len = l;
            l += 1;
        }
        if len > 0 {
            hidden[i..i + len].iter_mut().for_each(|h| *h = true);
        }
        i += 1;
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.len() <= hay.len() && hay.windows(needle.len()).any(|w| w == needle)
}

/// RFC 3986 percent-encoding of everything but unreserved characters (the
/// spelling `urlencode`/`urlencode_strict` produce, give or take `/`,
/// which the fragment rule covers).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redactor(values: &[&str]) -> Redactor {
        let r = Redactor::default();
        values.iter().for_each(|v| r.add(v));
        r
    }

    #[test]
    fn whole_values_and_fragments_are_hidden_in_any_case() {
        let r = redactor(&["S3cret-Passw0rd"]);
        let m = r.redact("got `\"s3cret-passw0rd\"` and `S3CR` and `passw0` from x");
        assert!(!m.to_ascii_lowercase().contains("s3cr"), "{m}");
        assert!(!m.to_ascii_lowercase().contains("ssw0"), "{m}");
        assert!(m.starts_with("got `\"[redacted]\"`"), "{m}");
        assert!(m.ends_with(" from x"), "{m}");
    }

    #[test]
    fn escaped_spellings_are_hidden() {
        let r = redactor(&["a\"b'c<d>e f\\g"]);
        for spelled in [
            "a\\\"b'c",
            "a&quot;b&#x27;c&lt;d",
            "a%22b%27c%3Cd",
            "g\\f e>d<c'b\"a",
        ] {
            let m = r.redact(&format!("value: {spelled}!"));
            assert_eq!(m, "value: [redacted]!", "{spelled}");
        }
    }

    #[test]
    fn short_values_are_hidden_whole_and_messages_stay_utf8() {
        let r = redactor(&["é9"]);
        assert_eq!(r.redact("x é9 y"), "x [redacted] y");
        let r = redactor(&["ünïcödé-sëcret"]);
        let m = r.redact("«ünïcödé-sëcret»");
        assert!(!m.contains("cöd"), "{m}");
    }

    /// The bug this pins: case was folded for ASCII only, so `upper` of a
    /// secret in another script, quoted by a failing filter, went out
    /// whole.
    #[test]
    fn a_non_ascii_secret_is_hidden_in_its_other_case_too() {
        let r = redactor(&["пароль-тайна"]);
        for spelled in ["ПАРОЛЬ-ТАЙНА", "ТАЙН", "Пароль-Тайна"] {
            let m = r.redact(&format!("got \"{spelled}\" here"));
            // At most a run shorter than MIN_FRAGMENT bytes is left (the
            // capital of a word in title case).
            assert!(
                m.starts_with("got \"") && m.ends_with("[redacted]\" here"),
                "{m}"
            );
            let left = &m["got \"".len()..m.len() - "[redacted]\" here".len()];
            assert!(
                left.len() < MIN_FRAGMENT && !left.contains('['),
                "{spelled}: {m}"
            );
        }
    }

    #[test]
    fn nothing_recorded_changes_nothing() {
        let r = Redactor::default();
        assert_eq!(r.redact("plain message"), "plain message");
        assert!(r.is_empty());
    }

    #[test]
    fn numbers_in_trees_are_recorded() {
        let r = Redactor::default();
        r.add_tree(&serde_json::json!({"db": {"port": 54321, "pw": ["hunter22"]}}));
        assert_eq!(r.redact("54321 hunter22"), "[redacted] [redacted]");
    }
}
