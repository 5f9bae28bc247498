//! Issue 13 §1: the leak catalogue. A secret piped into a Tera filter that
//! fails (`round`, `first`, `join`, `sort`, `slice`, `unique`,
//! `pluralize`, `map`, `nth`, `throw()`, a secret used as a map key, ...)
//! put the value into the error message, which then reached stderr,
//! `history.jsonl`, `last-run.json`, `status`, `history` and `validate`.
//!
//! Every Tera built-in filter, test and function is applied here to a
//! canary secret in a way that can fail, and the canary (whole, in
//! fragments, in other cases and reversed) must appear in no output
//! channel and no file but its own target.

use std::process::Command;

use crate::support::*;

const CANARY: &str = "CANARY-d41f7e2b-never-leak";

/// Pieces of the canary that must not appear either: fragments, other
/// cases, the reversed string.
fn needles() -> Vec<String> {
    let mut n = vec![
        CANARY.to_string(),
        "d41f7e2b".into(),
        "never-leak".into(),
        CANARY.to_lowercase(),
        CANARY.to_uppercase(),
        CANARY.chars().rev().collect(),
        "D41F7E2B".into(),
        "kael-reven".into(),
    ];
    n.sort();
    n.dedup();
    n
}

#[track_caller]
fn assert_clean(what: &str, text: &str) {
    for n in needles() {
        assert!(
            !text.contains(&n),
            "the canary ({n:?}) leaked into {what}:\n{text}"
        );
    }
}

/// Expressions over `s` (the canary) and `u` (the secret user name, a
/// second value), each expected to fail rendering.
const FAILING: &[&str] = &[
    // Filters that want another type, or arguments of another type.
    "s | int",
    "s | float",
    "s | abs",
    "s | round",
    "s | round(method=s)",
    "s | filesizeformat",
    "s | date",
    "s | date(format=s)",
    "s | first",
    "s | last",
    "s | nth(n=1)",
    "s | join(sep=\",\")",
    "s | sort",
    "s | unique",
    "s | slice(start=1)",
    "s | reverse | int",
    "s | pluralize",
    "1 | pluralize(singular=s, plural=1)",
    "s | map(attribute=\"x\")",
    "s | group_by(attribute=\"x\")",
    "s | filter(attribute=\"x\")",
    "s | concat(with=1) | int",
    "s | get(key=\"x\")",
    "s | truncate(length=s)",
    "s | indent(width=s)",
    "s | replace(from=s)",
    "s | split(pat=1)",
    "s | upper | int",
    "s | lower | float",
    "s | capitalize | int",
    "s | title | int",
    "s | trim | int",
    "s | trim_start | int",
    "s | trim_end | int",
    "s | trim_start_matches(pat=1)",
    "s | trim_end_matches(pat=1)",
    "s | wordcount | date(format=s)",
    "s | addslashes | int",
    "s | slugify | int",
    "s | linebreaksbr | int",
    "s | spaceless | int",
    "s | striptags | int",
    "s | escape | int",
    "s | escape_xml | int",
    "s | safe | int",
    "s | urlencode | int",
    "s | urlencode_strict | int",
    "s | json_encode | int",
    "s | as_str | int",
    "s | length | date(format=s)",
    "[s, 1] | sort",
    "[s, u] | join(sep=1)",
    "[s] | map(attribute=\"x\")",
    "[s] | group_by(attribute=\"x\")",
    "[s] | filter(attribute=\"x\", value=s) | int",
    "[s, u] | slice(start=s)",
    "[s, u] | nth(n=s)",
    "[s] | unique | int",
    "[s] | first | int",
    "[s] | last | float",
    "[s] | concat(with=s) | int",
    "s | default(value=s) | int",
    // Tests.
    "s is odd",
    "s is even",
    "s is divisibleby(3)",
    "3 is divisibleby(s)",
    "s is containing(1)",
    "s is starting_with(1)",
    "s is ending_with(1)",
    "s is matching(1)",
    "\"x\" is matching(s ~ \"(\")",
    "s is iterable | int",
    "s is object | int",
    "s is string | int",
    "s is number | int",
    "s is defined | int",
    "s is undefined | int",
    // Functions.
    "throw(message=s)",
    "throw(message=\"failed: \" ~ s)",
    "range(end=s)",
    "range(start=s, end=3)",
    "now(timestamp=s)",
    "get_random(start=s, end=3)",
    "get_env(name=s)",
    // Operators, attribute and index access, a secret as a map key.
    "s + 1",
    "s * 2",
    "s / s",
    "s % 2",
    "s.attribute",
    "s[0]",
    "vars[s]",
    "host[s]",
    "missing[s]",
    "s ~ missing",
    "not_a_function(arg=s)",
    "s | not_a_filter",
];

fn repo_with(templates: &[(String, String)]) -> Repo {
    let r = Repo::new();
    r.write("driftless.toml", "roles = [\"app\"]\n");
    r.write("hosts/default.toml", "");
    let enc = std::fs::read_to_string(workspace().join("tests/fixtures/secrets/canary.enc.yaml"))
        .expect("tests/fixtures/secrets/canary.enc.yaml");
    r.write("secrets/db.enc.yaml", &enc);
    let mut role = String::new();
    for (i, (name, body)) in templates.iter().enumerate() {
        role.push_str(&format!(
            "[[files]]\npath = \"/etc/app/f{i}\"\ntemplate = \"{name}\"\n\n"
        ));
        r.write(&format!("roles/app/files/{name}"), body);
    }
    r.write("roles/app/role.toml", &role);
    r.commit("catalogue");
    r
}

fn template(expr: &str) -> String {
    format!(
        "{{% set s = secret(file=\"secrets/db.enc.yaml\", key=\"db.password\") %}}\
         {{% set u = secret(file=\"secrets/db.enc.yaml\", key=\"db.user\") %}}\
         line one\nvalue: {{{{ {expr} }}}}\n"
    )
}

fn keys() -> String {
    workspace()
        .join("tests/fixtures/secrets/keys.txt")
        .display()
        .to_string()
}

/// Every file under `dir`, as text.
fn all_files(dir: &std::path::Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p);
            } else if let Ok(b) = std::fs::read(&p) {
                out.push((
                    p.display().to_string(),
                    String::from_utf8_lossy(&b).into_owned(),
                ));
            }
        }
    }
    out
}

/// One expression at a time through `validate` (what a config repo's CI
/// keeps), in text and JSON: nothing of the canary. Returns the
/// expressions that parse (a parse error stops a whole repository before
/// anything renders, so only those go into the combined run).
fn validate_each() -> Vec<&'static str> {
    let mut parsed = Vec::new();
    let mut render_errors = 0;
    for expr in FAILING {
        let repo = repo_with(&[("x.tera".into(), template(expr))]);
        let mut parse_error = false;
        for format in ["text", "json"] {
            let out = Command::new(BIN)
                .args(["validate", "--no-config", "--format", format, "--age-key"])
                .arg(keys())
                .arg(repo.path())
                .env("NO_COLOR", "1")
                .output()
                .expect("driftless runs");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_clean(&format!("validate {format} of `{expr}`"), &stdout);
            assert_clean(&format!("validate {format} log of `{expr}`"), &stderr);
            assert!(
                matches!(out.status.code(), Some(0) | Some(3)),
                "`{expr}`: {stdout}{stderr}"
            );
            parse_error |= stdout.contains("Failed to parse") || stderr.contains("Failed to parse");
            if format == "text" && out.status.code() == Some(3) && !parse_error {
                render_errors += 1;
            }
        }
        if !parse_error {
            parsed.push(*expr);
        }
    }
    // The catalogue is about failing renders: most of it must fail (Tera
    // is lenient in places: `"x" | int` is 0, not an error).
    eprintln!(
        "leak catalogue: {} expressions, {} fail rendering, {} do not parse",
        FAILING.len(),
        render_errors,
        FAILING.len() - parsed.len()
    );
    assert!(
        render_errors * 3 >= FAILING.len() * 2,
        "only {render_errors} of {} expressions fail rendering: the catalogue no longer tests error paths",
        FAILING.len()
    );
    parsed
}

/// All of them in one repository through `plan`, `sync`, `status` and
/// `history`, then every file the agent wrote (state dir, root).
#[test]
fn no_failing_filter_test_or_function_leaks_a_secret_into_any_channel_or_state_file() {
    let parsed = validate_each();
    let mut templates: Vec<(String, String)> = parsed
        .iter()
        .enumerate()
        .map(|(i, e)| (format!("t{i}.tera"), template(e)))
        .collect();
    // A good file using the secret, so the canary legitimately exists in
    // exactly one place on a successful sync (checked at the end).
    let good = ("good.tera".to_string(), template("s"));
    templates.push(good.clone());
    let repo = repo_with(&templates);
    let host = Host::new("h");
    let k = keys();
    let with_key = |args: &[&str]| {
        let mut v: Vec<&str> = args.to_vec();
        v.extend(["--age-key", k.as_str()]);
        host.run(repo.path(), &v)
    };
    let plan = with_key(&["plan"]);
    let plan_json = with_key(&["plan", "--format", "json"]);
    let sync = with_key(&["sync", "--once"]);
    assert_eq!(sync.code, 3, "{}", sync.stderr);
    let status = with_key(&["status"]);
    let status_json = with_key(&["status", "--format", "json"]);
    let history = with_key(&["history"]);
    let history_json = with_key(&["history", "--format", "json"]);
    for (what, run) in [
        ("plan", &plan),
        ("plan json", &plan_json),
        ("sync", &sync),
        ("status", &status),
        ("status json", &status_json),
        ("history", &history),
        ("history json", &history_json),
    ] {
        assert_clean(&format!("{what} stdout"), &run.stdout);
        assert_clean(&format!("{what} stderr"), &run.stderr);
    }
    // The error is there, only scrubbed: it names the failing files.
    assert!(sync.stderr.contains("[redacted]"), "{}", sync.stderr);
    for (path, text) in all_files(host.state.path()) {
        assert_clean(&format!("state file {path}"), &text);
    }
    for (path, text) in all_files(host.root.path()) {
        assert_clean(&format!("file {path} under the root"), &text);
    }

    // Only the good file left: it is applied, and the canary is in its
    // target (0600) and nowhere else but the state dir's 0600 copies.
    let repo2 = repo_with(&[good]);
    let args = vec!["sync", "--once", "--age-key", k.as_str()];
    let ok = host.run(repo2.path(), &args).ok();
    assert_clean("the good sync", &ok.stderr);
    assert_clean("the good sync", &ok.stdout);
    let st = host.run(repo2.path(), &["status"]).ok();
    assert_clean("status after the good sync", &st.stdout);
    let holders: Vec<String> = all_files(host.root.path())
        .into_iter()
        .filter(|(_, t)| t.contains(CANARY))
        .map(|(p, _)| p)
        .collect();
    assert_eq!(holders.len(), 1, "{holders:?}");
    assert!(holders[0].ends_with("/etc/app/f0"), "{holders:?}");
    for (path, text) in all_files(host.state.path()) {
        assert_clean(&format!("state file {path} after the good sync"), &text);
    }
}
