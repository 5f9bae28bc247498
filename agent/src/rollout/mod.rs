//! Fleet rollout (issue 17): which hosts may apply a new commit, and when.
//!
//! One repository drives many hosts. Without coordination every host
//! applies a new commit at its next poll, so a bad commit that passes its
//! local checks reaches the whole fleet within one poll interval. With a
//! `[fleet]` section in agent.toml, a host asks one question before it
//! applies a new commit: "may I apply commit C now?". The answer comes
//! from [`decide()`], a pure function of
//!
//! - the commit's own rollout policy (`[rollout]` in its `driftless.toml`,
//!   [`policy`]): ordered waves (canary first) selected by labels or by a
//!   share of the host-name hash space, each with `min_healthy` reports
//!   and a `bake` time before the next wave may start, a `max_failures`
//!   threshold that halts the rollout, and `max_concurrent` permits per
//!   group;
//! - this host's name, group and labels;
//! - the fleet's state as read from the store (host reports, hosts that
//!   reverted the commit, permits held), and the time.
//!
//! It is pure so that every branch is tested without etcd and without a
//! clock (like zincati's update agent state machine); the store, its
//! leases and the semaphore live with the other effects
//! (`crate::effects::fleet`).

pub mod calendar;
pub mod decide;
pub mod policy;

pub use decide::{decide, Decision, FleetView, Report, ThisHost};
pub use policy::Policy;

#[cfg(test)]
mod tests;
