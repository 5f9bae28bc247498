//! Issue 12 §1 through the binary: templates that never end. A template
//! that included itself, two that included each other, or a recursive
//! macro overflowed the stack (SIGABRT, exit 134) and the daemon
//! crash-looped; a loop could write gigabytes into the staging area. Each
//! must now be an ordinary "invalid repository" error (exit 3) naming the
//! file, with the host left exactly as it was.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use crate::support::*;

/// A host with one good file applied, and a repository whose next commit
/// adds `bad.tera` (plus `extra` templates) as a second file.
fn setup(bad: &str, extra: &[(&str, &str)]) -> (Repo, Host, Vec<(String, Vec<u8>)>) {
    let repo = Repo::new();
    let host = Host::new("h");
    repo.write("driftless.toml", "roles = [\"app\"]\n");
    repo.write("hosts/default.toml", "");
    repo.write("roles/app/files/good", "good\n");
    repo.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/app/good\"\nsource = \"good\"\n",
    );
    repo.commit("v1");
    host.sync(repo.path()).ok();
    let before = host.tree();
    repo.write("roles/app/files/bad.tera", bad);
    for (p, c) in extra {
        repo.write(p, c);
    }
    repo.write(
        "roles/app/role.toml",
        "[[files]]\npath = \"/etc/app/good\"\nsource = \"good\"\n\n\
         [[files]]\npath = \"/etc/app/bad\"\ntemplate = \"bad.tera\"\n",
    );
    repo.commit("v2");
    (repo, host, before)
}

/// Runs `args` and checks: exit 3 (not a signal), `needle` in stderr, the
/// host unchanged.
#[track_caller]
fn refused(out: std::process::Output, needle: &str, host: &Host, before: &[(String, Vec<u8>)]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), None, "killed by a signal: {stderr}");
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    assert!(
        stderr.contains("/etc/app/bad") || stderr.contains(".tera: template cycle"),
        "neither the target nor the template is named: {stderr}"
    );
    assert_eq!(host.tree(), before, "the host changed");
}

#[test]
fn a_template_that_includes_itself_is_an_error_not_a_stack_overflow() {
    let (repo, host, before) = setup("x{% include \"roles/app/files/bad.tera\" %}", &[]);
    let out = host.cmd(repo.path(), &["sync", "--once"]).output().unwrap();
    refused(out, "template cycle", &host, &before);
    let out = host.cmd(repo.path(), &["plan"]).output().unwrap();
    refused(out, "template cycle", &host, &before);
}

#[test]
fn two_templates_that_include_each_other_name_the_chain() {
    let (repo, host, before) = setup(
        "{% include \"templates/a.tera\" %}",
        &[
            ("templates/a.tera", "{% include \"templates/b.tera\" %}"),
            ("templates/b.tera", "{% include \"templates/a.tera\" %}"),
        ],
    );
    let out = host.cmd(repo.path(), &["sync", "--once"]).output().unwrap();
    refused(
        out,
        "templates/a.tera → templates/b.tera → templates/a.tera",
        &host,
        &before,
    );
}

#[test]
fn a_macro_that_recurses_without_end_is_stopped_at_the_depth_limit() {
    let (repo, host, before) = setup(
        "{% import \"templates/m.tera\" as m %}{{ m::down(n=1) }}",
        &[(
            "templates/m.tera",
            "{% macro down(n) %}{{ self::down(n=n+1) }}{% endmacro down %}",
        )],
    );
    let out = host.cmd(repo.path(), &["sync", "--once"]).output().unwrap();
    refused(out, "nested deeper than 64", &host, &before);
}

#[test]
fn a_template_that_writes_without_end_stops_at_max_file_size() {
    let (repo, host, before) = setup(
        "{% for i in range(end=1000000) %}0123456789abcdef0123456789abcdef{% endfor %}",
        &[],
    );
    let config = host.state.path().join("agent.toml");
    std::fs::write(&config, "max_file_size = \"1MiB\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["sync", "--once", "--config"])
        .arg(&config)
        .arg("--source")
        .arg(repo.path())
        .args(["--host", "h", "--root"])
        .arg(host.root.path())
        .arg("--state-dir")
        .arg(host.state.path())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    refused(out, "larger than 1 MiB (max_file_size", &host, &before);
    // Nothing was staged either.
    let staged: Vec<_> = host
        .tree()
        .into_iter()
        .filter(|(p, _)| p.contains(".driftless-"))
        .collect();
    assert!(staged.is_empty());
}

/// Tera computes `%` on i64 itself, and `i64::MIN % -1` panics even in a
/// release build: the panic was re-raised from the render thread and
/// crashed every sync (exit 101), and `validate` with it. It is this
/// template's error now.
#[test]
fn an_arithmetic_overflow_in_tera_is_an_error_not_a_crash() {
    let (repo, host, before) = setup("{{ -9223372036854775808 % -1 }}\n", &[]);
    let out = host.cmd(repo.path(), &["sync", "--once"]).output().unwrap();
    refused(out, "the template engine failed on", &host, &before);
    let (code, stdout) = validate(repo.path(), &[]);
    assert_eq!(code, Some(3), "{stdout}");
}
