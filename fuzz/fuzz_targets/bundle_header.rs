//! Fuzz the git bundle header parser (`driftless::effects::bundle::header`):
//! a bundle on a USB stick is untrusted input until its signature and hash
//! are checked, and the header is the first thing read. It must never
//! panic, and a parsed header must point inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = driftless::effects::bundle::header::parse(data) {
        assert!(h.pack_offset + 4 <= data.len());
        assert!(!h.refs.is_empty());
    }
});
