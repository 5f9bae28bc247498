//! driftless: a pull-based GitOps agent for ordinary Linux hosts.
//!
//! The tree mirrors the pipeline:
//!
//! - [`desired`] and [`plan`] are the **pure core**: repository snapshot →
//!   host configuration → rendered files → plan. No I/O; unit-tested with
//!   in-memory inputs.
//! - [`effects`] holds everything that touches the world: fetching with
//!   gix, reading facts, observing and writing the managed filesystem, the
//!   state directory.
//! - [`sync`] wires one pass of the pipeline together; [`cli`] parses
//!   arguments and prints; [`config`] layers the agent's own settings.
//! - [`rollout`] decides, purely, whether a host of a fleet may apply a
//!   new commit now (waves, bake times, permits, halting); the etcd side
//!   is in `effects::fleet`.
//! - [`trust`] verifies SSH signatures (signed commits, signed bundle
//!   manifests) against an `allowed_signers` file, in-process.

pub mod cli;
pub mod config;
pub mod cpus;
pub mod daemon;
pub mod desired;
pub mod effects;
pub mod events;
pub mod exit;
pub mod fuzz_entry;
pub mod init;
pub mod memory;
pub mod plan;
pub mod progress;
pub mod rollout;
pub mod stop;
pub mod sync;
pub mod time;
pub mod timings;
pub mod trust;

/// SOPS reading lives in its own crate (`sops/`, no dependency on the
/// agent); re-exported under its old path.
pub use driftless_sops as secrets;

/// Counted skips for tests whose system prerequisites are missing (see
/// `tests/common/skip.rs`).
#[cfg(test)]
#[path = "../../tests/common/skip.rs"]
pub(crate) mod test_skip;
