//! Fuzz the ini store parser (plus metadata reading and all emitters on
//! what it parsed): it must never panic, whatever the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    driftless::secrets::fuzzing::parse_store(driftless::secrets::Store::Ini, data);
});
