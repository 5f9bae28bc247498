#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    driftless::fuzz_entry::repo_config(data);
});
