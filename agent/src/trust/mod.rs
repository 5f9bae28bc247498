//! Trust: SSH signatures on git commits and on bundle files, verified
//! in-process against a git `allowed_signers` file.
//!
//! # What is verified
//!
//! * **Commits** signed by git with `gpg.format = ssh`: the `gpgsig` header
//!   holds an armored SSHSIG over the commit object *without* that header
//!   (exactly what git hands to `ssh-keygen -Y sign`), in namespace
//!   [`GIT_NAMESPACE`]. See [`verify_commit`] and [`verify_history`].
//! * **Detached signatures** (`ssh-keygen -Y sign -n driftless-bundle`, or
//!   [`sign_detached`]) over a file, in namespace [`BUNDLE_NAMESPACE`]. See
//!   [`verify_detached`].
//!
//! A signature is accepted when it is cryptographically valid, made for the
//! expected namespace, and its key is listed in the allowed signers file on
//! a line whose `namespaces=` and `valid-after=` / `valid-before=` options
//! allow it (the semantics of `ssh-keygen -Y verify`, see
//! [`allowed_signers`](AllowedSigners) for the file format and where it
//! deliberately differs).
//!
//! # Why in-process
//!
//! gix's own verification helper (and git itself) runs `ssh-keygen`; an
//! agent on a minimal host should not depend on an external binary for a
//! security decision, nor parse its human-oriented output. The `ssh-key`
//! crate does the cryptography (ed25519, RSA with `rsa-sha2-256/512`,
//! ECDSA P-256); this module adds the allowed signers policy and the git
//! commit framing.
//!
//! # Why the validity window is checked at the committer time
//!
//! git verifies commit signatures with `-Overify-time=<committer date>`:
//! a key that was valid when the commit was made keeps vouching for that
//! commit after the key expires (`valid-before`), so rotating a key does
//! not invalidate history. The flip side is that the committer date is
//! chosen by the signer: a holder of an expired key can back-date a new
//! commit. Retire a key that must not sign anymore by removing its line,
//! not only by `valid-before`. Detached signatures are checked at the time
//! the caller passes (bundle creation time, or now).
//!
//! # Errors
//!
//! Every refusal says which commit or signature, which key (SHA-256
//! fingerprint and type) and what to change. No error contains secret
//! material: private keys are read into zeroized buffers and never
//! formatted.

mod allowed_signers;
mod commits;
mod sshsig;
mod time;

#[doc(hidden)]
pub mod fuzzing;

#[cfg(test)]
mod tests;

pub use allowed_signers::{AllowedSigners, Entry};
pub use commits::{verify_commit, verify_history};
pub use sshsig::{sign_detached, verify_detached};

/// The SSHSIG namespace git uses for commit and tag signatures.
pub const GIT_NAMESPACE: &str = "git";

/// The SSHSIG namespace of driftless bundle signatures. A signature made
/// for one namespace is never accepted for another, so a commit signature
/// cannot be replayed as a bundle signature and vice versa.
pub const BUNDLE_NAMESPACE: &str = "driftless-bundle";

/// Who signed: the outcome of a successful verification.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verified {
    /// The principals field of the matching allowed signers line, as
    /// written (for example `alice@example.com` or `*@example.com,bob`).
    pub principal: String,
    /// `SHA256:` + unpadded base64, as printed by `ssh-keygen -l`.
    pub fingerprint: String,
    /// The key type, for example `ssh-ed25519`, `ssh-rsa`,
    /// `ecdsa-sha2-nistp256`.
    pub algorithm: String,
}

/// Which commits of an update must be signed.
///
/// * `every-commit` (default): each commit reachable from the new tip and
///   not from the last applied commit, merges and both sides of merges
///   included. A commit pushed by someone without a trusted key is caught
///   even when a trusted committer later builds on top of it. Costs one
///   signature check per new commit (microseconds for ed25519).
/// * `tip`: only the new tip. Whoever signs the tip vouches for the whole
///   tree it points to, which is what gets applied; cheaper, and the only
///   option when history contains unsigned commits from before signing was
///   adopted, but an unsigned commit in the middle goes unnoticed (its
///   content is still in the tree the signed tip vouches for).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignaturePolicy {
    Tip,
    #[default]
    EveryCommit,
}
