//! Golden-file tests for rendering (bottlerocket style).
//!
//! `tests/golden/render/succeeds/<case>/repo/` is a config repository;
//! rendering host `test` (or the name in `<case>/host`) with the fixed
//! facts below must produce exactly the files under `<case>/expected/`
//! (target paths, e.g. `expected/etc/motd`).
//!
//! `tests/golden/render/fails/<case>/repo/` must fail; every line of
//! `<case>/error.txt` must appear in the error.
//!
//! `UPDATE_GOLDEN=1 cargo test golden` rewrites `expected/` from the
//! current output; review the diff before committing.

use std::path::{Path, PathBuf};

use driftless::desired::load::{load_host, LoadOptions};
use driftless::desired::render::Renderer;
use driftless::desired::secrets::SecretResolver;
use driftless::desired::spec::TargetPath;

use crate::support::workspace;

fn facts() -> serde_json::Value {
    serde_json::json!({
        "hostname": "test",
        "os_release": {"ID": "debian", "VERSION_ID": "12", "PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)"},
        "machine_id": "0123456789abcdef0123456789abcdef",
        "cpus": 4,
        "memory_bytes": 8589934592u64,
        "kernel": "6.1.0",
        "arch": "x86_64",
        "addresses": [{"iface": "eth0", "family": "ipv4", "address": "192.0.2.10"}],
    })
}

fn render_case(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, String> {
    let snap = driftless::effects::fetch::read_dir(&dir.join("repo"), "", u64::MAX)
        .map_err(|e| format!("{e:#}"))?;
    let host = std::fs::read_to_string(dir.join("host")).unwrap_or_else(|_| "test".into());
    let opts = LoadOptions {
        allowed_roots: vec![
            TargetPath::parse("/etc").unwrap(),
            TargetPath::parse("/srv").unwrap(),
        ],
        reserved: Vec::new(),
    };
    let cfg = load_host(&snap, host.trim(), &opts).map_err(|e| e.to_string())?;
    let resolver = std::sync::Arc::new(SecretResolver::without_keys(&snap));
    let r = Renderer::new(&snap, &[&cfg], resolver).map_err(|e| e.to_string())?;
    let d = r.render(&snap, &cfg, &facts()).map_err(|e| e.to_string())?;
    Ok(d.files
        .into_iter()
        .map(|f| (f.path.to_string(), f.content.clone()))
        .collect())
}

fn cases(kind: &str) -> Vec<PathBuf> {
    let dir = workspace().join("tests/golden/render").join(kind);
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no golden cases in {}", dir.display());
    out
}

fn expected_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let base = dir.join("expected");
    let mut stack = vec![base.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(&base).unwrap().display().to_string();
                out.push((format!("/{rel}"), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn golden_render_succeeds() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    for case in cases("succeeds") {
        let mut got = match render_case(&case) {
            Ok(g) => g,
            Err(e) => {
                failures.push(format!("{}: unexpected error:\n{e}", case.display()));
                continue;
            }
        };
        got.sort();
        if update {
            let _ = std::fs::remove_dir_all(case.join("expected"));
            for (path, content) in &got {
                let p = case.join("expected").join(path.trim_start_matches('/'));
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, content).unwrap();
            }
            continue;
        }
        let want = expected_files(&case);
        if got != want {
            let show = |v: &[(String, Vec<u8>)]| {
                v.iter()
                    .map(|(p, c)| format!("== {p}\n{}", String::from_utf8_lossy(c)))
                    .collect::<String>()
            };
            failures.push(format!(
                "{}:\n--- expected\n{}\n--- got\n{}",
                case.display(),
                show(&want),
                show(&got)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn golden_render_fails() {
    let mut failures = Vec::new();
    for case in cases("fails") {
        let want = std::fs::read_to_string(case.join("error.txt"))
            .unwrap_or_else(|_| panic!("{}: error.txt missing", case.display()));
        match render_case(&case) {
            Ok(_) => failures.push(format!("{}: rendered, but must fail", case.display())),
            Err(got) => {
                for line in want.lines().filter(|l| !l.trim().is_empty()) {
                    if !got.contains(line) {
                        failures.push(format!(
                            "{}:\nexpected the error to contain:\n  {line}\ngot:\n  {got}",
                            case.display()
                        ));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A repository with `n` role templates, `t00.tera` … ; `special` replaces
/// some of them. Every template but the macro file `t01` is a managed file.
fn many_templates(n: usize, special: &[(usize, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let files = repo.join("roles/app/files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::create_dir_all(repo.join("hosts")).unwrap();
    std::fs::write(repo.join("driftless.toml"), "roles = [\"app\"]\n").unwrap();
    std::fs::write(repo.join("hosts/test.toml"), "").unwrap();
    let mut role = String::new();
    for i in 0..n {
        let text = special
            .iter()
            .find(|(k, _)| *k == i)
            .map_or(format!("file {i}\n"), |(_, t)| t.to_string());
        std::fs::write(files.join(format!("t{i:02}.tera")), text).unwrap();
        if i != 1 {
            role.push_str(&format!(
                "[[files]]\npath = \"/etc/t{i:02}\"\ntemplate = \"t{i:02}.tera\"\n\n"
            ));
        }
    }
    std::fs::write(repo.join("roles/app/role.toml"), role).unwrap();
    dir
}

/// The bug this pins: with many role templates, parsing is split over two
/// threads; a template that extends or imports one parsed on the other
/// thread must render exactly as with one thread.
#[test]
fn templates_extending_and_importing_across_the_parse_halves_render() {
    let dir = many_templates(
        80,
        &[
            (0, "{% block body %}base{% endblock body %}\n"),
            (1, "{% macro hi(n) %}hi {{ n }}{% endmacro hi %}"),
            (40, "{% import \"roles/app/files/t01.tera\" as m %}{{ m::hi(n=40) }}\n"),
            (
                79,
                "{% extends \"roles/app/files/t00.tera\" %}{% block body %}child{% endblock body %}",
            ),
        ],
    );
    let got = render_case(dir.path()).unwrap();
    assert_eq!(got.len(), 79);
    let get = |p: &str| {
        got.iter()
            .find(|(path, _)| path == p)
            .map(|(_, c)| String::from_utf8_lossy(c).into_owned())
    };
    assert_eq!(get("/etc/t00").as_deref(), Some("base\n"));
    assert_eq!(get("/etc/t40").as_deref(), Some("hi 40\n"));
    assert_eq!(get("/etc/t79").as_deref(), Some("child\n"));
    assert_eq!(get("/etc/t02").as_deref(), Some("file 2\n"));
    assert_eq!(get("/etc/t78").as_deref(), Some("file 78\n"));
}

#[test]
fn broken_templates_in_both_parse_halves_are_all_reported() {
    let dir = many_templates(80, &[(10, "{% if %}\n"), (70, "{{ unclosed\n")]);
    let err = render_case(dir.path()).unwrap_err();
    assert!(err.contains("t10.tera"), "{err}");
    assert!(err.contains("t70.tera"), "{err}");
}
