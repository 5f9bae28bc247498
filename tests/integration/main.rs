//! Integration tests: the real `driftless` binary against real git
//! repositories built with the `git` CLI, applied under temporary roots.
//!
//! `support` builds fixtures; each other module covers one area.

mod support;

mod accounts;
mod bad_inputs;
mod barriers;
mod checks;
mod cli;
mod corrupt_state;
mod crash;
mod crash_windows;
mod daemon;
mod dirs;
mod fleet;
mod fleet_tls;
mod fleetlock;
mod golden;
mod hooks;
mod hostile_templates;
mod init;
mod leak_catalogue;
mod links;
mod metrics;
mod no_openat2;
mod notify;
mod originals;
mod packages;
mod pipeline;
mod planted_links;
mod quick;
mod quickstart;
mod reboot;
mod reserved;
mod revert;
mod secrets;
mod stick_device;
mod transports;
mod trust;
