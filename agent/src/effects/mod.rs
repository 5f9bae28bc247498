//! Effects: everything that reads or changes the world outside the
//! process. The pure core never calls into here; [`crate::sync`] does.

pub mod accounts;
pub mod apply;
pub mod bundle;
pub mod checks;
pub mod facts;
pub mod failpoint;
pub mod fetch;
pub mod fleet;
pub mod hooks;
pub mod ids;
pub mod keys;
pub mod metrics;
pub mod notify;
pub mod observe;
pub mod packages;
pub mod process;
pub mod reboot;
pub mod rootfs;
pub mod state;
pub mod systemd;
