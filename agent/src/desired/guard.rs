//! Templates that never end: the guards that keep a hostile or careless
//! repository from crashing or wedging the agent while it renders.
//!
//! Tera trusts its templates. A template that includes itself (directly or
//! through others), an import cycle, or a macro that calls itself without
//! end recurses until the stack overflows, and a stack overflow is a
//! SIGABRT, not an error: `validate` died with exit 134 and the daemon
//! crash-looped under systemd. A loop can also emit output without bound
//! (a staging area once filled a disk). Each of these is stopped here,
//! before it can hurt, with an error that names the file and what to do:
//!
//! * **cycles** in `include`/`import`/`extends` are found on the parsed
//!   templates, before anything renders ([`cycles`]), and named as a chain
//!   (`a.tera → b.tera → a.tera`);
//! * **macro recursion** is bounded: every macro body is instrumented with
//!   an enter/leave call that counts the depth ([`instrument_macros`]), and
//!   rendering happens on a thread with a stack large enough for the bound
//!   (see `Renderer`);
//! * **output** is bounded per file and per sync ([`Limits`]): rendering
//!   streams into a [`LimitedWriter`] that stops Tera at the limit, so the
//!   oversized output never exists in memory;
//! * `range()` is bounded ([`MAX_RANGE`]): Tera's own builds the whole list
//!   first, so `range(end=10000000000)` would exhaust memory before the
//!   first byte is written.
//!
//! What is not bounded: CPU time of a template that loops without writing
//! (nested loops over bounded ranges). The daemon's watchdog and
//! `RuntimeMaxSec` of the one-shot units cover that.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;

use serde_json::Value as Json;
use tera::ast::{Expr, ExprVal, FunctionCall, Node, WS};
use tera::Tera;

/// Deepest macro call chain a template may build. Real recursive macros
/// (a nested menu, a tree of options) stay far below it.
pub const MAX_MACRO_DEPTH: usize = 64;

/// Most items `range()` may produce.
pub const MAX_RANGE: usize = 1_000_000;

/// Stack for the render thread: a macro call costs a few tens of KiB of
/// Tera's stack frames; this leaves a wide margin over
/// [`MAX_MACRO_DEPTH`] (pages are only touched when used).
pub const RENDER_STACK: usize = 256 << 20;

const ENTER: &str = "__driftless_macro_enter";
const LEAVE: &str = "__driftless_macro_leave";

/// Size limits on rendered output (`agent.toml`: `max_file_size`,
/// `max_render_size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest content of one managed file.
    pub file: u64,
    /// Largest content of all managed files of one sync together.
    pub total: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            file: 64 << 20,
            total: 1 << 30,
        }
    }
}

/// Human spelling of a byte count for messages ("64 MiB").
pub fn size_str(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{} GiB", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} bytes"),
    }
}

/// The include/import/extends cycles among the parsed templates, each as
/// a chain that starts and ends with the same template. Empty when there
/// are none.
pub fn cycles(tera: &Tera) -> Vec<Vec<String>> {
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (name, t) in &tera.templates {
        let mut out = BTreeSet::new();
        refs(&t.ast, &mut out);
        for m in t.macros.values() {
            refs(&m.body, &mut out);
        }
        for (file, _) in &t.imported_macro_files {
            out.insert(file.as_str());
        }
        if let Some(p) = &t.parent {
            out.insert(p.as_str());
        }
        out.retain(|r| tera.templates.contains_key(*r));
        graph.insert(name.as_str(), out);
    }
    // Depth-first search with an explicit stack (a hostile repository can
    // make the graph deep): white = unseen, grey = on the path, black = done.
    let mut colour: HashMap<&str, u8> = HashMap::new();
    let mut found: BTreeSet<Vec<String>> = BTreeSet::new();
    for &start in graph.keys() {
        if colour.get(start).copied().unwrap_or(0) != 0 {
            continue;
        }
        let mut path: Vec<(&str, Vec<&str>)> = Vec::new();
        colour.insert(start, 1);
        path.push((start, graph[start].iter().copied().collect()));
        while let Some((node, next)) = path.last_mut() {
            let node = *node;
            match next.pop() {
                Some(n) => match colour.get(n).copied().unwrap_or(0) {
                    0 => {
                        colour.insert(n, 1);
                        path.push((n, graph[n].iter().copied().collect()));
                    }
                    1 => {
                        let from = path.iter().position(|(p, _)| *p == n).unwrap_or(0);
                        let mut chain: Vec<String> =
                            path[from..].iter().map(|(p, _)| p.to_string()).collect();
                        // Start the chain at its smallest name, so a cycle
                        // found from two ends is reported once.
                        let min = chain
                            .iter()
                            .enumerate()
                            .min_by(|a, b| a.1.cmp(b.1))
                            .map_or(0, |(i, _)| i);
                        chain.rotate_left(min);
                        chain.push(chain[0].clone());
                        found.insert(chain);
                    }
                    _ => {}
                },
                None => {
                    colour.insert(node, 2);
                    path.pop();
                }
            }
        }
    }
    found.into_iter().collect()
}

/// The error for a cycle.
pub fn cycle_message(chain: &[String]) -> String {
    format!(
        "{}: template cycle {}: a template that includes, imports or extends itself, directly or \
         through others, would never finish rendering; break the cycle",
        chain[0],
        chain.join(" → ")
    )
}

/// The templates `nodes` include (every name of an include list; a missing
/// one under `ignore missing` is dropped by the caller).
fn refs<'a>(nodes: &'a [Node], out: &mut BTreeSet<&'a str>) {
    for n in nodes {
        match n {
            Node::Include(_, names, _) => out.extend(names.iter().map(String::as_str)),
            Node::ImportMacro(_, file, _) => {
                out.insert(file.as_str());
            }
            Node::Extends(_, parent) => {
                out.insert(parent.as_str());
            }
            Node::MacroDefinition(_, m, _) => refs(&m.body, out),
            Node::Block(_, b, _) => refs(&b.body, out),
            Node::FilterSection(_, f, _) => refs(&f.body, out),
            Node::Forloop(_, f, _) => {
                refs(&f.body, out);
                if let Some(e) = &f.empty_body {
                    refs(e, out);
                }
            }
            Node::If(i, _) => {
                for (_, _, body) in &i.conditions {
                    refs(body, out);
                }
                if let Some((_, body)) = &i.otherwise {
                    refs(body, out);
                }
            }
            Node::Super
            | Node::Text(_)
            | Node::VariableBlock(..)
            | Node::Set(..)
            | Node::Raw(..)
            | Node::Break(_)
            | Node::Continue(_)
            | Node::Comment(..) => {}
        }
    }
}

thread_local! {
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// Resets the macro depth count; called before each file renders (an
/// error mid-macro skips the leave calls).
pub fn reset_depth() {
    DEPTH.with(|d| d.set(0));
}

fn call(name: &str) -> Node {
    Node::VariableBlock(
        WS::default(),
        Expr::new(ExprVal::FunctionCall(FunctionCall {
            name: name.to_string(),
            args: HashMap::new(),
        })),
    )
}

/// Wraps every macro body in enter/leave calls and registers them, with
/// the bounded `range()`. Whitespace control is resolved by Tera's parser
/// before this runs, so the calls (which render as nothing) change no
/// output.
pub fn instrument_macros(tera: &mut Tera) {
    for t in tera.templates.values_mut() {
        for m in t.macros.values_mut() {
            let mut body = Vec::with_capacity(m.body.len() + 2);
            body.push(call(ENTER));
            body.append(&mut m.body);
            body.push(call(LEAVE));
            m.body = body;
        }
    }
    tera.register_function(ENTER, |_: &HashMap<String, Json>| {
        let depth = DEPTH.with(|d| {
            d.set(d.get() + 1);
            d.get()
        });
        if depth > MAX_MACRO_DEPTH {
            return Err(tera::Error::msg(format!(
                "macro calls nested deeper than {MAX_MACRO_DEPTH}: a macro that calls itself needs a \
                 condition that ends the recursion"
            )));
        }
        Ok(Json::String(String::new()))
    });
    tera.register_function(LEAVE, |_: &HashMap<String, Json>| {
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        Ok(Json::String(String::new()))
    });
    tera.register_function("range", range);
}

/// Tera's `range(end, start=0, step_by=1)`, refusing more than
/// [`MAX_RANGE`] items instead of allocating them.
fn range(args: &HashMap<String, Json>) -> tera::Result<Json> {
    let num = |name: &str, default: Option<i64>| -> tera::Result<i64> {
        match args.get(name) {
            Some(v) => v.as_i64().ok_or_else(|| {
                tera::Error::msg(format!("range(): `{name}` must be an integer, got {v}"))
            }),
            None => default.ok_or_else(|| {
                tera::Error::msg("range() needs `end`: range(end=10, start=0, step_by=1)")
            }),
        }
    };
    let start = num("start", Some(0))?;
    let end = num("end", None)?;
    let step = num("step_by", Some(1))?;
    if step <= 0 {
        return Err(tera::Error::msg("range(): `step_by` must be positive"));
    }
    if start > end {
        return Err(tera::Error::msg(
            "range(): `end` must be greater than `start`",
        ));
    }
    let count = (end as i128 - start as i128 + step as i128 - 1) / step as i128;
    if count > MAX_RANGE as i128 {
        return Err(tera::Error::msg(format!(
            "range() of {count} items: more than the {MAX_RANGE} a template may iterate over"
        )));
    }
    Ok(Json::Array(
        (0..count as i64)
            // (In i128: `i * step` may leave i64 for a range whose items
            // all fit, as `start` and `step` near its ends.)
            .map(|i| Json::from((i128::from(start) + i128::from(i) * i128::from(step)) as i64))
            .collect(),
    ))
}

/// A writer that accepts at most `limit` bytes, then fails (and says so
/// in `exceeded`, so the caller can tell this from any other error).
pub struct LimitedWriter {
    pub buf: Vec<u8>,
    limit: u64,
    pub exceeded: bool,
}

impl LimitedWriter {
    pub fn new(limit: u64) -> Self {
        LimitedWriter {
            buf: Vec::new(),
            limit,
            exceeded: false,
        }
    }
}

impl Write for LimitedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() as u64 + data.len() as u64 > self.limit {
            self.exceeded = true;
            return Err(std::io::Error::other("rendered output over the size limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tera(templates: &[(&str, &str)]) -> Tera {
        let mut t = Tera::default();
        t.add_raw_templates(templates.to_vec()).unwrap();
        t
    }

    #[test]
    fn a_self_include_is_a_cycle_of_one() {
        let t = tera(&[("a.tera", "x{% include \"a.tera\" %}")]);
        assert_eq!(cycles(&t), vec![vec!["a.tera", "a.tera"]]);
    }

    #[test]
    fn a_cycle_through_three_templates_is_named_once_from_its_smallest_name() {
        let t = tera(&[
            ("c.tera", "{% include \"a.tera\" %}"),
            ("a.tera", "{% if x %}{% include \"b.tera\" %}{% endif %}"),
            (
                "b.tera",
                "{% for i in x %}{% include \"c.tera\" %}{% endfor %}",
            ),
            ("d.tera", "{% include \"a.tera\" %}"),
        ]);
        assert_eq!(
            cycles(&t),
            vec![vec!["a.tera", "b.tera", "c.tera", "a.tera"]]
        );
        assert!(cycle_message(&cycles(&t)[0]).contains("a.tera → b.tera → c.tera → a.tera"));
    }

    #[test]
    fn import_cycles_and_includes_inside_macros_count() {
        let t = tera(&[
            (
                "m.tera",
                "{% import \"n.tera\" as n %}{% macro f() %}{% endmacro %}",
            ),
            (
                "n.tera",
                "{% import \"m.tera\" as m %}{% macro g() %}{% endmacro %}",
            ),
            (
                "p.tera",
                "{% macro h() %}{% include \"p.tera\" %}{% endmacro %}",
            ),
        ]);
        let c = cycles(&t);
        assert!(
            c.contains(&vec!["m.tera".into(), "n.tera".into(), "m.tera".into()]),
            "{c:?}"
        );
        assert!(c.contains(&vec!["p.tera".into(), "p.tera".into()]), "{c:?}");
    }

    #[test]
    fn shared_includes_without_a_loop_are_no_cycle() {
        let t = tera(&[
            ("a.tera", "{% include \"h.tera\" %}{% include \"h.tera\" %}"),
            (
                "b.tera",
                "{% include \"h.tera\" %}{% include [\"gone.tera\", \"h.tera\"] ignore missing %}",
            ),
            ("h.tera", "hi"),
        ]);
        assert!(cycles(&t).is_empty());
    }

    #[test]
    fn instrumented_macros_render_the_same_bytes() {
        let src = "{% macro m(n) -%}\n  <{{ n }}>\n{%- endmacro m %}\n[{{ self::m(n=1) }}]\n{{- self::m(n=2) }}";
        let plain = tera(&[("t", src)])
            .render("t", &tera::Context::new())
            .unwrap();
        let mut t = tera(&[("t", src)]);
        instrument_macros(&mut t);
        reset_depth();
        assert_eq!(t.render("t", &tera::Context::new()).unwrap(), plain);
    }

    #[test]
    fn range_is_bounded_and_otherwise_like_teras() {
        let mut args = HashMap::new();
        args.insert("end".to_string(), Json::from(7));
        args.insert("start".to_string(), Json::from(1));
        args.insert("step_by".to_string(), Json::from(3));
        assert_eq!(range(&args).unwrap(), serde_json::json!([1, 4]));
        args.insert("end".to_string(), Json::from(10_000_000_000i64));
        assert!(range(&args).unwrap_err().to_string().contains("more than"));
        // Four items near the ends of i64: `i * step` left it (a panic in
        // a debug build).
        args.insert(
            "start".to_string(),
            Json::from(-9_000_000_000_000_000_000i64),
        );
        args.insert("end".to_string(), Json::from(9_000_000_000_000_000_000i64));
        args.insert(
            "step_by".to_string(),
            Json::from(5_000_000_000_000_000_000i64),
        );
        assert_eq!(
            range(&args).unwrap(),
            serde_json::json!([
                -9_000_000_000_000_000_000i64,
                -4_000_000_000_000_000_000i64,
                1_000_000_000_000_000_000i64,
                6_000_000_000_000_000_000i64
            ])
        );
    }
}
