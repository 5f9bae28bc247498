//! Observe the managed filesystem: the current state of every path a plan
//! may touch (the desired files and everything in the inventory).

use anyhow::Result;

use crate::desired::render::Desired;
use crate::desired::spec::TargetPath;
use crate::effects::rootfs::RootFs;
use crate::plan::inventory::Inventory;
use crate::plan::Observed;

pub fn observe(fs: &RootFs, desired: &Desired, inventory: &Inventory) -> Result<Observed> {
    let mut out = Observed::new();
    let paths = desired
        .files
        .iter()
        .map(|f| &f.path)
        .chain(inventory.files.keys());
    for p in paths {
        if !out.contains_key(p) {
            out.insert(p.clone(), fs.observe(p)?);
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
        out.insert(p.clone(), fs.observe_link(p)?);
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
                e.insert(obs);
            }
        }
    }
    Ok(out)
}
