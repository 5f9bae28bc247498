//! Signed git bundles: how commits reach air-gapped hosts.
//!
//! A driftless bundle is three files side by side:
//!
//! ```text
//! site-2026-11-22.bundle                 a real git bundle (`git bundle verify` accepts it)
//! site-2026-11-22.bundle.manifest        JSON: source, branch, tip, prerequisites,
//!                                        created_at, sha256 and size of the bundle
//! site-2026-11-22.bundle.manifest.sig    SSHSIG over the manifest, namespace "driftless-bundle"
//! ```
//!
//! The signature covers the manifest, and the manifest pins the bundle's
//! SHA-256, so the signature covers the bundle too; and an operator can
//! check a bundle by hand with stock tools
//! (`ssh-keygen -Y verify -n driftless-bundle …` then `sha256sum`).
//!
//! **Importing** never trusts the stick: the bundle is first copied into
//! the state directory while hashing it (a USB device could serve
//! different bytes on a second read), the copy's hash is compared with the
//! signed manifest, the header must agree with the manifest, and only then
//! is the pack indexed into the mirror by gix (no `git` binary on the
//! host). The tracking ref moves last, after the anti-rollback checks; a
//! failure before that leaves at most unreachable objects in the mirror.
//! The sync that follows applies the usual rules (signed commits,
//! fast-forward from the applied commit).
//!
//! **Creating** (on a connected machine) runs `git bundle create`: the
//! connected side has git, and the real tool guarantees the real format.

pub mod create;
pub mod header;
pub mod import;
pub mod manifest;

pub use header::Header;
pub use manifest::{Manifest, MANIFEST_SUFFIX, SIGNATURE_SUFFIX};
