#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    driftless::fuzz_entry::inventory_json(data);
});
