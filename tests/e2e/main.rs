//! End-to-end suite against a real systemd.
//!
//! Each test boots the Debian rootfs built by `tests/e2e/build-rootfs.sh`
//! with `systemd-nspawn --boot --private-network --volatile=overlay` (all
//! changes vanish with the container), binds the freshly built binary and a
//! test git repository into it, and drives it from outside with
//! `nsenter -t <container pid> -a`. The host's own systemd is never
//! involved: nspawn runs with `--register=no --keep-unit` in a private
//! mount namespace.
//!
//! Without root, nspawn or the rootfs the suite skips with a message, unless
//! `DRIFTLESS_E2E_REQUIRED=1` (set by `.ci/run`), where it fails instead.

mod machine;
mod scenarios;
