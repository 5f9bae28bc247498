//! The new repository's `git init -b main` and first commit, in-process
//! with gix: a host that installed the package has no `git` binary to
//! count on. The index is written too (with each file's stat data), so
//! `git status` in the new repository is clean.

use std::path::Path;

use anyhow::{Context, Result};

/// Identity used when neither the environment (`GIT_AUTHOR_NAME`, …) nor
/// git's configuration (`user.name`, `user.email`) names one.
pub const FALLBACK_NAME: &str = "driftless init";
pub const FALLBACK_EMAIL: &str = "driftless-init@localhost";

/// What the commit was.
#[derive(Debug)]
pub struct Committed {
    pub id: String,
    pub branch: &'static str,
    /// The configured identity was missing: the fallback was used.
    pub fallback_identity: bool,
}

/// Initialises a repository with work tree in `dir` (branch `main`,
/// whatever `init.defaultBranch` says) and commits `paths` (relative,
/// `/`-separated, as they are on disk now) with `message`.
pub fn init_and_commit(dir: &Path, paths: &[String], message: &str) -> Result<Committed> {
    let what = || format!("cannot initialise a git repository in {}", dir.display());
    use gix::sec::trust::DefaultForLevel as _;
    let open = gix::open::Options::default_for_level(gix::sec::Trust::Full)
        .config_overrides(["init.defaultBranch=main"]);
    let mut repo: gix::Repository = gix::ThreadSafeRepository::init_opts(
        dir,
        gix::create::Kind::WithWorktree,
        gix::create::Options::default(),
        open,
    )
    .with_context(what)?
    .into();

    let fallback_identity = repo.committer().is_none();
    let committer = repo
        .committer_or_set_fallback(FALLBACK_NAME, FALLBACK_EMAIL)
        .context("git identity (user.name, user.email) is unusable")?
        .to_owned()
        .context("git identity (user.name, user.email) is unusable")?;
    let author = match repo.author() {
        Some(Ok(a)) => a
            .to_owned()
            .context("git author identity (user.name, user.email) is unusable")?,
        _ => committer.clone(),
    };

    let empty = gix::ObjectId::empty_tree(repo.object_hash());
    let mut editor = repo.edit_tree(empty).with_context(what)?;
    for rel in paths {
        let bytes = std::fs::read(dir.join(rel))
            .with_context(|| format!("cannot read {rel} to commit it"))?;
        let blob = repo
            .write_blob(bytes)
            .with_context(|| format!("cannot store {rel} in the git repository"))?;
        editor
            .upsert(rel.as_str(), gix::object::tree::EntryKind::Blob, blob)
            .with_context(|| format!("cannot add {rel} to the commit"))?;
    }
    let tree = editor.write().with_context(what)?.detach();
    let (mut cbuf, mut abuf) = (Default::default(), Default::default());
    let id = repo
        .commit_as(
            committer.to_ref(&mut cbuf),
            author.to_ref(&mut abuf),
            "HEAD",
            message,
            tree,
            Vec::<gix::ObjectId>::new(),
        )
        .with_context(|| format!("cannot commit in {}", dir.display()))?
        .detach();

    // The index, with each file's stat data, as `git add` leaves it.
    let mut index = repo.index_from_tree(&tree).with_context(what)?;
    for (entry, path) in index.entries_mut_with_paths() {
        let rel = std::str::from_utf8(path).context("a scaffold path is not UTF-8")?;
        let p = dir.join(rel);
        let meta = gix::index::fs::Metadata::from_path_no_follow(&p)
            .with_context(|| format!("cannot stat {}", p.display()))?;
        if let Ok(stat) = gix::index::entry::Stat::from_fs(&meta) {
            entry.stat = stat;
        }
    }
    index
        .write(Default::default())
        .with_context(|| format!("cannot write the git index of {}", dir.display()))?;
    Ok(Committed {
        id: id.to_string(),
        branch: "main",
        fallback_identity,
    })
}
