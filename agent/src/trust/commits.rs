//! Signed git commits: one commit ([`verify_commit`]) and the commits an
//! update brings ([`verify_history`]).
//!
//! # What git signs
//!
//! `git commit -S` with `gpg.format = ssh` signs the commit object as it
//! would be written without a signature, and inserts the armored SSHSIG as
//! the `gpgsig` header (continuation lines indented by one space). The
//! signed payload is therefore the stored object minus that header, which
//! is what gix's `Commit::signature()` returns; any change to tree,
//! parents, author, committer or message changes the payload.
//!
//! Not handled: commits carrying a second signature for the other hash
//! function (`gpgsig-sha256` in a SHA-1 repository, written only with
//! `extensions.compatObjectFormat`). git leaves that header out of the
//! payload, gix keeps it in, so such commits fail as "bad signature"
//! (a refusal, never a false accept).
//!
//! # Which commits are checked
//!
//! With [`SignaturePolicy::EveryCommit`] the commits reachable from the new
//! tip and not from the last applied commit are checked (`git rev-list
//! from..to`), merges included and every parent's side walked. The walk
//! stops where the two histories meet (gix paints from both ends), so its
//! cost is bounded by what is new, also when `from` is not an ancestor of
//! `to` (the caller refuses non-fast-forward updates separately; here such
//! an update simply has more new commits).
//!
//! On a first sync (`from == None`) nothing has been applied yet, so there
//! is no boundary between "already trusted" and "new": checking every
//! reachable commit would require the whole history, back to commits made
//! before signing was adopted, to be signed by keys still listed, and would
//! fail on shallow mirrors. Only the tip is checked then: its signer vouches
//! for the tree being applied. Every later update is checked in full.
//!
//! The tip is always checked, even when the walk finds nothing new (`to`
//! already reachable from `from`), so a result is never an empty "ok".

use anyhow::{anyhow, Context, Result};

use super::sshsig::{check, When};
use super::{AllowedSigners, SignaturePolicy, Verified, GIT_NAMESPACE};

/// Verify the `gpgsig` header of commit `id` over the exact signed payload
/// (the commit object without the `gpgsig` header, as git does), in
/// namespace `git`, with validity windows checked at the commit's
/// committer time (as git does with `verify-time`).
pub fn verify_commit(
    repo: &gix::Repository,
    id: gix::ObjectId,
    signers: &AllowedSigners,
) -> Result<Verified> {
    let short = id.to_hex_with_len(7).to_string();
    let commit = repo
        .find_commit(id)
        .with_context(|| format!("cannot read commit {short}"))?;
    let subject = match commit.message() {
        Ok(message) => format!("commit {short} (\"{}\")", one_line(&message.summary())),
        Err(_) => format!("commit {short}"),
    };
    let signature = commit
        .signature()
        .with_context(|| format!("{subject} is not a well-formed commit object"))?;
    let Some((armored, signed)) = signature else {
        return Err(anyhow!(
            "{subject} is not signed: require_signed is on; sign commits with \
             `git config gpg.format ssh` + `user.signingkey` (and `commit.gpgsign true`)"
        ));
    };
    let committed_at = commit
        .time()
        .with_context(|| format!("{subject} has no readable committer time"))?
        .seconds;
    let armored = std::str::from_utf8(&armored)
        .map_err(|_| anyhow!("{subject} has a gpgsig header that is not text"))?;
    let payload = signed.to_bstring();
    check(signers, GIT_NAMESPACE, &payload, armored, committed_at)
        .map_err(|r| anyhow!("{}", r.describe(&subject, When::Commit)))
}

/// `Tip`: verify `to` only. `EveryCommit`: `to` and every commit reachable
/// from `to` and not from `from` (merges included, all parents' sides);
/// with `from == None` only the tip (see the module docs for why). Returns
/// the verified commits, tip first; the first failure is an error naming
/// the commit (short id and summary) and the reason.
pub fn verify_history(
    repo: &gix::Repository,
    from: Option<gix::ObjectId>,
    to: gix::ObjectId,
    signers: &AllowedSigners,
    policy: SignaturePolicy,
) -> Result<Vec<(gix::ObjectId, Verified)>> {
    let mut verified = vec![(to, verify_commit(repo, to, signers)?)];
    let from = match (policy, from) {
        (SignaturePolicy::EveryCommit, Some(from)) => from,
        (SignaturePolicy::Tip, _) | (SignaturePolicy::EveryCommit, None) => return Ok(verified),
    };
    let walk_error = || {
        format!(
            "cannot list the commits between {} and {}",
            from.to_hex_with_len(7),
            to.to_hex_with_len(7)
        )
    };
    let walk = repo
        .rev_walk([to])
        .with_hidden([from])
        .all()
        .with_context(walk_error)?;
    for info in walk {
        let id = info.with_context(walk_error)?.id;
        if id != to {
            verified.push((id, verify_commit(repo, id, signers)?));
        }
    }
    Ok(verified)
}

/// A commit summary for a message: control characters escaped, long ones
/// shortened.
fn one_line(summary: &gix::bstr::BStr) -> String {
    const MAX: usize = 72;
    let text = String::from_utf8_lossy(summary);
    let mut out: String = text
        .chars()
        .take(MAX)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if text.chars().count() > MAX {
        out.push('…');
    }
    out
}
