//! Fuzz the allowed signers parser (`driftless::trust`), plus what the
//! verifier does with parsed entries (namespace patterns, validity windows,
//! fingerprints, error messages): it must never panic, whatever the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    driftless::trust::fuzzing::allowed_signers(data);
});
