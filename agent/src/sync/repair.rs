//! Repairing drift without re-rendering the whole host.
//!
//! When the quick check finds the commit and every input unchanged and
//! only some managed files changed on disk, every other file is provably
//! still as the commit wants it. Rendering, reading and comparing just the
//! changed files gives the same plan as the full pipeline, at the cost of
//! a few files instead of all of them: the desired state of the others is
//! their inventory entry, carried over unchanged.
//!
//! Anything unusual (a template that includes another role template, an
//! error of any kind) gives `None`, and the caller runs the full pipeline,
//! which is always correct and reports errors properly.

use std::collections::BTreeSet;

use tracing::debug;

use super::{host_name, Fetched};
use crate::config::Settings;
use crate::desired::load::{self, LoadOptions};
use crate::desired::render::Renderer;
use crate::desired::spec::TargetPath;
use crate::effects::rootfs::RootFs;
use crate::effects::state::StateDir;
use crate::effects::{ids, observe};
use crate::plan::{self, Plan};
use crate::timings;

/// The plan that repairs `changed`, or `None` to take the full path.
pub fn plan(
    settings: &Settings,
    state: &StateDir,
    fs: &RootFs,
    fetched: &Fetched,
    facts: &serde_json::Value,
    changed: &BTreeSet<TargetPath>,
) -> Option<Plan> {
    let result = plan_inner(settings, state, fs, fetched, facts, changed);
    if let Err(e) = &result {
        debug!("repairing only the changed files is not possible ({e:#}); full sync");
    }
    result.ok()
}

fn plan_inner(
    settings: &Settings,
    state: &StateDir,
    fs: &RootFs,
    fetched: &Fetched,
    facts: &serde_json::Value,
    changed: &BTreeSet<TargetPath>,
) -> anyhow::Result<Plan> {
    let snap = &fetched.snapshot;
    let opts = LoadOptions {
        allowed_roots: settings.allowed_roots.clone(),
    };
    let host = host_name(settings, snap);
    let timing = timings::stage("load");
    let config = load::load_host(snap, &host, &opts).map_err(|d| anyhow::anyhow!("{d}"))?;
    drop(timing);
    let declared: BTreeSet<&TargetPath> = config.files.iter().map(|f| &f.path).collect();
    if let Some(p) = changed.iter().find(|p| !declared.contains(p)) {
        anyhow::bail!("{p} is no longer declared");
    }
    let keys_settings = settings.clone();
    let resolver = std::sync::Arc::new(crate::desired::secrets::SecretResolver::new(
        snap,
        Box::new(move || crate::effects::keys::load(&keys_settings)),
    ));
    let timing = timings::stage("parse");
    let renderer = Renderer::for_files(snap, &config, changed, resolver)
        .map_err(|d| anyhow::anyhow!("{d}"))?;
    drop(timing);
    let timing = timings::stage("render");
    let desired = renderer
        .render_only(snap, &config, facts, Some(changed))
        .map_err(|d| anyhow::anyhow!("{d}"))?;
    drop(timing);
    let timing = timings::stage("ids");
    let mut ids = ids::resolve(fs.path(), &desired)?;
    let inventory = state.inventory()?;
    let subset = inventory.restricted_to(changed);
    if desired.files.iter().any(|f| f.sensitive) || subset.files.values().any(|e| e.sensitive) {
        ids.hash_key = state.hash_key()?;
    }
    drop(timing);
    let timing = timings::stage("observe");
    let observed = observe::observe(fs, &desired, &subset)?;
    drop(timing);
    let _t = timings::stage("plan");
    let mut plan = plan::plan(&desired, Some(&fetched.commit), &observed, &subset, &ids)
        .map_err(|d| anyhow::anyhow!("{d}"))?;
    let carried = inventory.without(changed);
    plan.unchanged += carried.len();
    plan.next_inventory.files.extend(carried);
    Ok(plan)
}
