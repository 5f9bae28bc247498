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
//! Without root, nspawn or the rootfs every scenario fails, naming what is
//! missing (`tests/install-prereqs` installs it all), unless the user opted
//! out with `DRIFTLESS_TEST_ALLOW_SKIP=1`: then each prints a `skipped:`
//! line and is counted as skipped by `tests/run`.

mod machine;
mod package;
#[cfg(feature = "etcd")]
mod reboot;
mod scenarios;
