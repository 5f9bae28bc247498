//! Which target paths a repository may declare: under an allowed root, and
//! neither one of the agent's own paths, below one, nor a directory above
//! one (issue 12 §5).
//!
//! Why an index: every declared path is checked against every reserved
//! path in both directions. With a dozen reserved paths and 10,000 files
//! that was a quarter of a million prefix comparisons, 15% of loading a
//! host (issue #18). A path is only ever "under" another at a `/`
//! boundary, so the index looks up the path's own ancestors (a handful)
//! and the path itself among the ancestors of the reserved paths: the
//! same answers, and the same first reserved path named in the error.

use std::collections::HashMap;

use super::load::LoadOptions;
use super::spec::{unprintable, TargetPath};

/// [`LoadOptions`] indexed for checking many target paths.
pub struct Targets<'o> {
    opts: &'o LoadOptions,
    /// Each allowed root.
    allowed: HashMap<&'o str, ()>,
    /// Each reserved path → its first position in `opts.reserved`.
    reserved: HashMap<&'o str, usize>,
    /// Each reserved path and each of its ancestors → the first position in
    /// `opts.reserved` of a reserved path at or below it.
    above_reserved: HashMap<&'o str, usize>,
}

impl<'o> Targets<'o> {
    pub fn new(opts: &'o LoadOptions) -> Targets<'o> {
        let allowed = opts
            .allowed_roots
            .iter()
            .map(|r| (r.as_str(), ()))
            .collect();
        let mut reserved = HashMap::new();
        let mut above_reserved = HashMap::new();
        for (i, (r, _)) in opts.reserved.iter().enumerate() {
            reserved.entry(r.as_str()).or_insert(i);
            for a in self_and_ancestors(r.as_str()) {
                above_reserved.entry(a).or_insert(i);
            }
        }
        Targets {
            opts,
            allowed,
            reserved,
            above_reserved,
        }
    }

    /// `spec_path` as a target path: absolute, plain, under an allowed
    /// root and not the agent's own. The error says which rule it broke
    /// and what to do.
    pub fn check(&self, spec_path: &str) -> Result<TargetPath, String> {
        let path = TargetPath::parse(spec_path)?;
        self.admit(&path)?;
        Ok(path)
    }

    /// [`Targets::check`] of a path already parsed.
    pub fn admit(&self, path: &TargetPath) -> Result<(), String> {
        let s = path.as_str();
        if let Some(c) = s.chars().find(|&c| unprintable(c)) {
            return Err(format!(
                "path {s:?} contains the character U+{:04X}, which a target path may not: it would reach logs and terminals \
                 as is (a line break forges a log line, an escape sequence rewrites the screen); rename the file",
                c as u32
            ));
        }
        if !self_and_ancestors(s).any(|a| self.allowed.contains_key(a)) {
            let roots: Vec<&str> = self
                .opts
                .allowed_roots
                .iter()
                .map(TargetPath::as_str)
                .collect();
            return Err(format!(
                "{path} is outside the allowed roots ({}); widen `allowed_roots` in the agent config if this is intended",
                roots.join(", ")
            ));
        }
        // The first reserved path (in the options' order) that this path
        // lies under, or that lies under this path.
        let below = self_and_ancestors(s).filter_map(|a| self.reserved.get(a).copied());
        let above = self.above_reserved.get(s).copied();
        if let Some((r, what)) = below
            .chain(above)
            .min()
            .and_then(|i| self.opts.reserved.get(i))
        {
            return Err(format!(
                "{path} is reserved for the agent itself: {r} holds {what}. A repository may not manage it \
                 (a compromised or careless commit could otherwise lower the anti-rollback floor, replace the \
                 trust anchors or halt the agent); remove this entry"
            ));
        }
        Ok(())
    }
}

/// `/a/b/c`, then `/a/b`, then `/a`: every path `p` is under (in the sense
/// of [`TargetPath::is_under`]).
fn self_and_ancestors(path: &str) -> impl Iterator<Item = &str> {
    std::iter::once(path).chain(
        path.char_indices()
            .filter(|&(i, c)| c == '/' && i > 0)
            .map(move |(i, _)| &path[..i]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TargetPath {
        TargetPath::parse(s).unwrap()
    }

    /// A hostile repository's path reached logs and terminals raw: a
    /// line break forged a log line, an escape sequence rewrote the
    /// admin's screen. Refused now, the error showing it escaped.
    #[test]
    fn a_path_with_a_control_or_reordering_character_is_refused_escaped() {
        let opts = LoadOptions {
            allowed_roots: vec![t("/etc")],
            reserved: Vec::new(),
        };
        let targets = Targets::new(&opts);
        for (bad, code) in [
            ("/etc/a\nINFO forged", "U+000A"),
            ("/etc/\u{1b}[2Jx", "U+001B"),
            ("/etc/x\u{7f}", "U+007F"),
            ("/etc/x\u{9b}", "U+009B"),
            ("/etc/evil\u{202E}fnoc.", "U+202E"),
        ] {
            let err = targets.check(bad).unwrap_err();
            assert!(err.contains(code) && err.contains("rename"), "{err}");
            assert!(!err.chars().any(unprintable), "unescaped: {err:?}");
        }
        assert!(targets.check("/etc/caf\u{e9} \u{1F600}").is_ok());
    }

    /// The rule as it was written before the index, the oracle.
    fn naive(spec_path: &str, opts: &LoadOptions) -> Result<TargetPath, String> {
        let path = TargetPath::parse(spec_path)?;
        if !opts.allowed_roots.iter().any(|r| path.is_under(r)) {
            return Err("outside".into());
        }
        if let Some((r, _)) = opts
            .reserved
            .iter()
            .find(|(r, _)| path.is_under(r) || r.is_under(&path))
        {
            return Err(format!("reserved {r}"));
        }
        Ok(path)
    }

    /// Every path over a small tree, with roots and reserved paths nested
    /// in each other, prefixes that are not parents (`/etc/d` and
    /// `/etc/driftless`) and a reserved path listed twice: the index
    /// accepts, refuses and names the same reserved path as the scan.
    #[test]
    fn the_index_agrees_with_checking_every_reserved_path() {
        let opts = LoadOptions {
            allowed_roots: vec![t("/etc"), t("/srv"), t("/srv/www"), t("/opt/x")],
            reserved: vec![
                (t("/etc/driftless/keys"), "keys".into()),
                (t("/etc/driftless"), "config".into()),
                (t("/srv/state"), "state".into()),
                (t("/srv/state"), "again".into()),
                (t("/opt/x/y/z"), "deep".into()),
            ],
        };
        let index = Targets::new(&opts);
        let parts = [
            "etc",
            "driftless",
            "keys",
            "d",
            "srv",
            "state",
            "www",
            "opt",
            "x",
            "y",
            "z",
        ];
        let mut paths = vec![String::new()];
        let mut checked = 0;
        for _ in 0..3 {
            let mut next = Vec::new();
            for p in &paths {
                for c in parts {
                    next.push(format!("{p}/{c}"));
                }
            }
            for p in &next {
                let want = naive(p, &opts);
                let got = index.check(p);
                match (&want, &got) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b),
                    (Err(w), Err(g)) if w == "outside" => {
                        assert!(g.contains("outside the allowed roots"), "{p}: {g}")
                    }
                    (Err(w), Err(g)) => {
                        let r = w.trim_start_matches("reserved ");
                        assert!(
                            g.contains(&format!("reserved for the agent itself: {r} holds")),
                            "{p}: want {w}, got {g}"
                        )
                    }
                    _ => panic!("{p}: want {want:?}, got {got:?}"),
                }
                checked += 1;
            }
            paths = next;
        }
        assert_eq!(checked, 11 + 121 + 1331);
        // Both kinds of refusal and acceptance occurred.
        assert!(index.check("/etc/driftless/keys/a").is_err());
        assert!(index.check("/opt/x/y").is_err());
        assert!(index.check("/etc/d/x").is_ok());
        assert!(index.check("/srv/stat").is_ok());
        assert!(index.check("/opt/y").is_err());
    }
}
