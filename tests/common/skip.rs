//! Skips that are seen and counted.
//!
//! libtest cannot mark a test skipped, so a test that cannot run returns
//! early after calling one of these: each prints one `skipped: <test>:
//! <reason>` line straight to stderr (not captured by the harness, so it
//! shows in a plain `cargo test`) and appends the same line to the skip log,
//! which `tests/run` counts for its closing `N passed, N failed, N skipped`
//! line. The log is `$DRIFTLESS_SKIP_LOG`, or `driftless-test-skips.log` in
//! the cargo profile directory (`target/debug/`).
//!
//! Shared by the unit tests (`sops/src/tests.rs`), the integration
//! suite and the end-to-end suite through `#[path]`.

#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;

/// Set to `1` to let tests whose system prerequisites are missing skip
/// instead of failing.
pub const ALLOW_SKIP: &str = "DRIFTLESS_TEST_ALLOW_SKIP";

/// The name of the running test (libtest names each test's thread after it).
pub fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string()
}

/// Where skips are recorded.
pub fn log_path() -> PathBuf {
    if let Some(p) = std::env::var_os("DRIFTLESS_SKIP_LOG") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test binary>
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(std::env::temp_dir)
        .join("driftless-test-skips.log")
}

/// Records that the current test skips, for `reason`; the caller returns.
pub fn record(reason: &str) {
    let line = format!("skipped: {}: {reason}\n", test_name());
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path())
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// A cross-check against data outside this repository (`../shared`) could
/// not run because that data is absent. Not a skip: the repository's own
/// tests cover the same code; `tests/run` lists and counts these apart, and
/// they never fail a run. The caller returns.
pub fn cross_check_absent(reason: &str) {
    let line = format!("cross-check not run: {}: {reason}\n", test_name());
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path())
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// A system prerequisite (`what`) is missing: fails the test, naming what
/// to install, unless the user opted out with `DRIFTLESS_TEST_ALLOW_SKIP=1`;
/// then records the skip. The caller returns when this returns.
#[track_caller]
pub fn missing(what: &str) {
    if std::env::var(ALLOW_SKIP).is_ok_and(|v| v == "1") {
        record(&format!("{what} ({ALLOW_SKIP}=1)"));
        return;
    }
    panic!(
        "{}: missing prerequisite: {what}; install the test prerequisites with \
         `sudo tests/install-prereqs` (or set {ALLOW_SKIP}=1 to skip such tests)",
        test_name()
    );
}
