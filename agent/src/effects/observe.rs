//! Observe the managed filesystem: the current state of every path a plan
//! may touch (the desired files and everything in the inventory).

use anyhow::Result;

use crate::desired::render::Desired;
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
    Ok(out)
}
