//! Fuzz the rollout policy of a commit (`[rollout]`, maintenance windows
//! in systemd calendar syntax) and the decision made with it: every host
//! of a fleet reads it, so it must never panic or hang, whatever the
//! repository says.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    driftless::fuzz_entry::rollout(data);
});
