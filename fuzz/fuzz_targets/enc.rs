//! Fuzz `ENC[...]` parsing and decryption: never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        driftless::secrets::fuzzing::parse_enc(text);
    }
});
