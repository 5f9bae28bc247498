//! Fuzz the FleetLock server's request reader: its bodies come from anyone
//! who can reach the server, and what it accepts becomes an etcd key part.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    driftless::fuzz_entry::fleetlock_request(data);
});
