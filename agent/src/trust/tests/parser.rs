//! The allowed signers parser: every option, quoting, and malformed lines
//! (each error names `path:line`).

use std::path::Path;
use std::time::{Duration, Instant};

use super::super::allowed_signers::match_pattern_list;
use super::super::time;
use super::super::AllowedSigners;
use super::{keygen, signers, ORIGIN};

const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILM+rvN+ot98qgEN796jTiQfZfG1KaT0PtFDJ/XFSqti";

fn parse_err(text: &str) -> String {
    format!(
        "{:#}",
        AllowedSigners::parse(text, Path::new(ORIGIN)).expect_err("expected a parse error")
    )
}

#[test]
fn plain_line_with_comment_parses_principal_key_and_no_options() {
    let s = signers(&format!("alice@example.com {ED} alice's laptop\n"));
    assert_eq!(s.len(), 1);
    let e = &s.entries()[0];
    assert_eq!(e.line(), 1);
    assert_eq!(e.principals(), "alice@example.com");
    assert!(!e.is_cert_authority());
    assert_eq!(e.namespaces(), None);
    assert_eq!((e.valid_after(), e.valid_before()), (None, None));
    assert_eq!(e.key().algorithm().as_str(), "ssh-ed25519");
    assert_eq!(
        e.fingerprint(),
        "SHA256:UCUiLr7Pjs9wFFJMDByLgc3NrtdU344OgUM45wZPcIQ"
    );
    assert!(e.allows_namespace("git") && e.allows_namespace("anything"));
    assert_eq!(s.origin(), Path::new(ORIGIN));
}

#[test]
fn blank_lines_comments_leading_whitespace_and_crlf_are_skipped() {
    let text = format!("\n# a comment\n   \t\n  # indented comment\r\n\talice {ED}\r\n\n");
    let s = signers(&text);
    assert_eq!(s.len(), 1);
    assert_eq!(s.entries()[0].line(), 5);
    assert_eq!(s.entries()[0].principals(), "alice");
}

#[test]
fn empty_file_and_only_comments_are_empty() {
    assert!(signers("").is_empty());
    assert!(signers("# nobody yet\n\n").is_empty());
    assert!(!signers(&format!("a {ED}")).is_empty());
}

#[test]
fn principals_may_be_a_list_with_wildcards_or_quoted_with_spaces() {
    let s = signers(&format!(
        "alice@example.com,*@ops.example.com,bo? {ED}\n\"Bob Smith,bob\" {ED}\nx\"y z\" {ED}\n"
    ));
    let p: Vec<_> = s.entries().iter().map(|e| e.principals()).collect();
    assert_eq!(
        p,
        [
            "alice@example.com,*@ops.example.com,bo?",
            "Bob Smith,bob",
            "xy z"
        ]
    );
}

#[test]
fn rsa_and_ecdsa_keys_parse() {
    let dir = tempfile::tempdir().unwrap();
    let rsa = keygen(dir.path(), "rsa", "rsa");
    let ecdsa = keygen(dir.path(), "ecdsa", "ecdsa");
    let s = signers(&format!("{}\n{}\n", rsa.line("r", ""), ecdsa.line("e", "")));
    assert_eq!(s.entries()[0].key().algorithm().as_str(), "ssh-rsa");
    assert_eq!(s.entries()[0].fingerprint(), rsa.fingerprint());
    assert_eq!(
        s.entries()[1].key().algorithm().as_str(),
        "ecdsa-sha2-nistp256"
    );
    assert_eq!(s.entries()[1].fingerprint(), ecdsa.fingerprint());
}

#[test]
fn cert_authority_flag_is_parsed_in_any_case() {
    let s = signers(&format!(
        "*@example.com cert-authority {ED}\n*@x CERT-Authority {ED}\n"
    ));
    assert!(s.entries().iter().all(|e| e.is_cert_authority()));
}

#[test]
fn namespaces_option_quoted_unquoted_with_patterns_and_negation() {
    let s = signers(&format!(
        "a namespaces=\"git,driftless-*\" {ED}\nb NAMESPACES=git {ED}\nc namespaces=\"*,!file\" {ED}\nd namespaces=\"a\\\"b\" {ED}\n"
    ));
    let e = s.entries();
    assert_eq!(e[0].namespaces(), Some("git,driftless-*"));
    assert!(e[0].allows_namespace("git"));
    assert!(e[0].allows_namespace("driftless-bundle"));
    assert!(!e[0].allows_namespace("file"));
    assert!(e[1].allows_namespace("git") && !e[1].allows_namespace("gitx"));
    assert!(e[2].allows_namespace("git") && !e[2].allows_namespace("file"));
    assert_eq!(e[3].namespaces(), Some("a\"b"));
}

#[test]
fn valid_after_and_valid_before_accept_every_time_shape() {
    let s = signers(&format!(
        "a valid-after=\"20260101\" {ED}\n\
         b valid-after=202601010930Z {ED}\n\
         c valid-before=\"20260101093015UTC\" {ED}\n\
         d valid-after=\"20250101Z\",valid-before=\"20260101z\",namespaces=\"git\" {ED}\n"
    ));
    let e = s.entries();
    assert_eq!(e[0].valid_after(), Some(1_767_225_600));
    assert_eq!(e[1].valid_after(), Some(1_767_225_600 + 9 * 3600 + 30 * 60));
    assert_eq!(
        e[2].valid_before(),
        Some(1_767_225_600 + 9 * 3600 + 30 * 60 + 15)
    );
    assert_eq!(
        (e[3].valid_after(), e[3].valid_before(), e[3].namespaces()),
        (Some(1_735_689_600), Some(1_767_225_600), Some("git"))
    );
}

#[test]
fn time_without_z_is_read_as_utc() {
    assert_eq!(time::parse("20260101"), time::parse("20260101Z"));
    assert_eq!(time::parse("20260101"), Ok(1_767_225_600));
}

#[test]
fn validity_window_is_inclusive_at_both_ends() {
    let s = signers(&format!(
        "a valid-after=\"20250101Z\",valid-before=\"20260101Z\" {ED}\n"
    ));
    let e = &s.entries()[0];
    assert!(e.window_excludes(1_735_689_600 - 1).is_some());
    assert!(e.window_excludes(1_735_689_600).is_none());
    assert!(e.window_excludes(1_767_225_600).is_none());
    assert!(e.window_excludes(1_767_225_600 + 1).is_some());
}

#[test]
fn time_format_round_trips_and_handles_extremes() {
    assert_eq!(time::format(1_767_225_600), "2026-01-01 00:00:00 UTC");
    assert_eq!(time::format(0), "1970-01-01 00:00:00 UTC");
    assert_eq!(time::format(-1), "1969-12-31 23:59:59 UTC");
    assert_eq!(time::format(951_782_400), "2000-02-29 00:00:00 UTC");
    assert_eq!(time::parse("20000229"), Ok(951_782_400));
    for t in [i64::MIN, i64::MAX] {
        assert!(time::format(t).ends_with(" UTC"));
    }
}

#[test]
fn malformed_lines_are_errors_naming_path_line_and_problem() {
    let cases: &[(&str, &str)] = &[
        ("alice", "missing key"),
        ("\"alice", "unterminated quote in the principals"),
        ("\"alice\"x ssh-ed25519 AAAA", "after the closing quote"),
        ("\"\" KEY", "empty principals"),
        ("alice ssh-foo AAAA", "unknown key type `ssh-foo`"),
        ("alice cert-authorty KEY", "unknown key type `cert-authorty` (or a misspelled option"),
        ("alice ssh-ed25519", "missing the base64 key"),
        ("alice ssh-ed25519 !!!notbase64", "not valid base64"),
        ("alice ssh-ed25519 AAAAB3NzaC1yc2E=", "invalid ssh-ed25519 key"),
        (
            "alice ssh-ed25519-cert-v01@openssh.com AAAA",
            "is a certificate; list the certificate authority's key with cert-authority",
        ),
        ("alice foo=\"bar\" KEY", "unknown option `foo`"),
        ("alice namespaces=\"git\",namespaces=\"x\" KEY", "namespaces is given more than once"),
        ("alice namespaces=\"\" KEY", "empty namespace pattern"),
        ("alice namespaces=\"git,,x\" KEY", "empty namespace pattern"),
        ("alice namespaces KEY", "namespaces needs a value"),
        ("alice namespaces=\"git KEY", "unterminated quote in the options"),
        ("alice namespaces=\"git\"x KEY", "unexpected text after the quoted value of namespaces"),
        ("alice namespaces=g\"it\" KEY", "stray quote in the value of namespaces"),
        ("alice cert-authority=yes KEY", "cert-authority takes no value"),
        ("alice cert-authority,,namespaces=git KEY", "empty option"),
        ("alice cert-authority, KEY", "trailing comma"),
        ("alice valid-after=\"2026\" KEY", "valid-after: `2026` is not a time"),
        ("alice valid-after=\"20260230\" KEY", "`20260230` is not a valid date"),
        ("alice valid-before=\"202601012460\" KEY", "not a valid time of day"),
        ("alice valid-before=\"2026010x\" KEY", "is not a time"),
        ("alice valid-after=\"19700101\" KEY", "valid-after must be later than 1970"),
        (
            "alice valid-after=\"20250101\",valid-after=\"20250102\" KEY",
            "valid-after is given more than once",
        ),
        (
            "alice valid-after=\"20260101\",valid-before=\"20250101\" KEY",
            "valid-before (2025-01-01 00:00:00 UTC) is not later than valid-after (2026-01-01 00:00:00 UTC)",
        ),
    ];
    let ed_rsa_mismatch = ED.replacen("ssh-ed25519", "ssh-rsa", 1);
    let mismatch = format!("alice {ed_rsa_mismatch}");
    let all = cases.iter().copied().chain([(
        mismatch.as_str(),
        "key type `ssh-rsa` does not match the key, which is ssh-ed25519",
    )]);
    for (bad, expected) in all {
        let bad = bad.replace("KEY", ED);
        // A good line and a comment first: the error must name line 3.
        let text = format!("ok {ED}\n# comment\n{bad}\nlater {ED}\n");
        let err = parse_err(&text);
        assert!(
            err.starts_with(&format!("{ORIGIN}:3: ")),
            "{bad:?}: error does not name the line: {err}"
        );
        assert!(
            err.contains(expected),
            "{bad:?}: expected {expected:?} in: {err}"
        );
    }
}

#[test]
fn load_reads_a_file_and_names_missing_files_and_bad_utf8_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("allowed_signers");
    std::fs::write(&path, format!("alice {ED}\n")).unwrap();
    let s = AllowedSigners::load(&path).unwrap();
    assert_eq!((s.len(), s.origin()), (1, path.as_path()));

    let missing = dir.path().join("nope");
    let err = format!("{:#}", AllowedSigners::load(&missing).unwrap_err());
    assert!(
        err.contains("cannot read the allowed signers file") && err.contains("nope"),
        "{err}"
    );

    std::fs::write(&path, b"# ok\n# \xff\n").unwrap();
    let err = format!("{:#}", AllowedSigners::load(&path).unwrap_err());
    assert_eq!(err, format!("{}:2: not valid UTF-8", path.display()));
}

#[test]
fn pattern_lists_follow_openssh_match_pattern_list() {
    assert!(match_pattern_list("git", "git"));
    assert!(match_pattern_list("git", "file,git"));
    assert!(match_pattern_list("driftless-bundle", "driftless-*"));
    assert!(match_pattern_list("gxt", "g?t"));
    assert!(!match_pattern_list("git", "g?"));
    assert!(match_pattern_list("abcbcd", "a*bcd"));
    assert!(match_pattern_list("", "*"));
    assert!(!match_pattern_list("file", "*,!file"));
    assert!(!match_pattern_list("file", "!file"));
    assert!(
        !match_pattern_list("git", "!file"),
        "negation alone accepts nothing"
    );
}

#[test]
fn pattern_matching_is_fast_on_hostile_patterns() {
    let text = "a".repeat(5000);
    let pattern = format!("{}b", "*a".repeat(2000));
    let start = Instant::now();
    assert!(!match_pattern_list(&text, &pattern));
    assert!(start.elapsed() < Duration::from_secs(2));
}
