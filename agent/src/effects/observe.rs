//! Observe the managed filesystem: the current state of every path a plan
//! may touch (the desired files and everything in the inventory).

use anyhow::Result;

use crate::desired::render::Desired;
use crate::desired::spec::TargetPath;
use crate::effects::rootfs::RootFs;
use crate::plan::inventory::Inventory;
use crate::plan::{Observation, Observed};

/// What [`observe`] reads of regular files' content in all, at most: the
/// render limit (what the repository may write) and one file of the
/// largest size read, so that a host converging on its repository never
/// meets it.
pub fn read_budget(limits: &crate::desired::guard::Limits) -> u64 {
    limits
        .total
        .saturating_add(crate::effects::rootfs::TARGET_READ_MAX_BYTES)
}

/// The current state of every path a plan may touch, reading at most
/// `budget` bytes of file content in all: each file is capped on its own
/// (see `rootfs::observe_in`), and the files under `--root` are untrusted,
/// so many large files at managed paths or dropped in a purged directory
/// must not add up to more memory than the host has.
pub fn observe(
    fs: &RootFs,
    desired: &Desired,
    inventory: &Inventory,
    budget: u64,
) -> Result<Observed> {
    let mut out = Observed::new();
    let mut read = 0u64;
    let mut count = |obs: &Observation, p: &TargetPath| -> Result<()> {
        if let Observation::File(f) = obs {
            read = read.saturating_add(f.content.len() as u64);
            if read > budget {
                anyhow::bail!(
                    "the files at managed and purged paths hold more than {} together (reached at {}): \
                     driftless reads them whole and stops here; move large files out of managed and purged paths, \
                     or raise max_render_size; nothing was changed",
                    crate::desired::guard::size_str(budget),
                    fs.display(p)
                );
            }
        }
        Ok(())
    };
    let paths = desired
        .files
        .iter()
        .map(|f| &f.path)
        .chain(inventory.files.keys());
    for p in paths {
        if !out.contains_key(p) {
            let obs = fs.observe(p)?;
            count(&obs, p)?;
            out.insert(p.clone(), obs);
        }
    }
    // Links and absent paths read a symlink rather than refuse it. A path
    // also read above (a pruned file now declared absent or a link) reads
    // the same for a regular file, and a file entry refuses a `Link` as it
    // refuses any symlink.
    let paths = desired
        .links
        .iter()
        .map(|l| &l.path)
        .chain(desired.absent.iter().map(|a| &a.path))
        .chain(inventory.links.keys());
    for p in paths {
        let obs = fs.observe_link(p)?;
        if !matches!(out.get(p), Some(Observation::File(_))) {
            count(&obs, p)?;
        }
        out.insert(p.clone(), obs);
    }
    // Managed directories (declared, or recorded and maybe to prune).
    for p in desired
        .dirs
        .iter()
        .map(|d| &d.path)
        .chain(inventory.directories.keys())
    {
        if !out.contains_key(p) {
            out.insert(p.clone(), fs.observe_dir(p)?);
        }
    }
    // Every entry of a purged directory (links read, never followed): the
    // plan removes those no role manages.
    for d in desired.dirs.iter().filter(|d| d.purge) {
        for name in fs.list_dir(&d.path)?.unwrap_or_default() {
            let child = TargetPath::parse(&format!("{}/{name}", d.path.as_str()))
                .map_err(|e| anyhow::anyhow!("cannot purge {}: {e}", fs.display(&d.path)))?;
            if let std::collections::btree_map::Entry::Vacant(e) = out.entry(child) {
                let obs = fs.observe_link(e.key())?;
                count(&obs, e.key())?;
                e.insert(obs);
            }
        }
    }
    Ok(out)
}
