//! Entry points for `fuzz/fuzz_targets/allowed_signers.rs`: no panic,
//! whatever the input. Not part of the supported API.

use std::path::Path;

use super::AllowedSigners;

/// Parses `data` as an allowed signers file and exercises what the
/// verifier does with each entry (namespace patterns, validity windows,
/// fingerprints, error messages).
pub fn allowed_signers(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The pattern matcher on its own, with hostile patterns and subjects.
    if let Some((pattern, subject)) = text.split_once('\n') {
        std::hint::black_box(super::allowed_signers::match_pattern_list(subject, pattern));
    }
    match AllowedSigners::parse(text, Path::new("fuzz")) {
        Ok(signers) => {
            for entry in signers.entries() {
                for namespace in ["git", "driftless-bundle", "", "a*b?c"] {
                    std::hint::black_box(entry.allows_namespace(namespace));
                }
                for at in [i64::MIN, -1, 0, 1_700_000_000, i64::MAX] {
                    if let Some(miss) = entry.window_excludes(at) {
                        std::hint::black_box(miss.to_string());
                    }
                }
                std::hint::black_box(entry.fingerprint());
            }
        }
        Err(e) => {
            std::hint::black_box(format!("{e:#}"));
        }
    }
}
