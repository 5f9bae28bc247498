//! What the commands print. Text for people, `--format json` for machines
//! (shaped as `apiVersion`/`kind`/`spec`/`status`, like bootc).

use std::path::Path;
use std::process::ExitCode;

use serde_json::json;

use super::Format;
use crate::config::Settings;
use crate::desired::load;

use crate::effects::apply::journal::TxState;
use crate::effects::state::StateDir;
use crate::effects::{facts, fetch};
use crate::exit::{Classify, Error, Failure};
use crate::plan::diff::{content_diff, render_plan, short, Style};
use crate::plan::ChangeKind;
use crate::sync::{LastRun, Prepared, Report};
use crate::time::time_str;

pub(super) const API_VERSION: &str = "driftless/v1";

pub(super) fn print_json(v: &serde_json::Value) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(v).kind(Failure::Failed)?;
    outln!("{text}");
    Ok(())
}

pub fn print_sync(r: &Report) {
    if let Some(w) = &r.waiting {
        let what = if w.halted { "halted" } else { "waiting" };
        outln!(
            "{} not applied ({what}, fleet rollout): {}",
            short(&r.commit),
            w.reason
        );
        return;
    }
    if r.skipped_bad {
        outln!(
            "{} is marked bad (it failed before and was reverted): not applied; push a fix or use --retry",
            short(&r.commit)
        );
        return;
    }
    match &r.applied {
        Some(a) => outln!(
            "applied {} (transaction {}): {} created, {} changed, {} removed, {} unchanged",
            short(&r.commit),
            a.txid,
            a.created,
            a.changed,
            a.removed,
            r.plan.unchanged
        ),
        None if r.quick => outln!(
            "{} already applied: {} file(s) unchanged since the last sync (quick check), nothing written",
            short(&r.commit),
            r.plan.unchanged
        ),
        None => outln!(
            "{} already applied: {} file(s) as desired, nothing written",
            short(&r.commit),
            r.plan.unchanged
        ),
    }
}

pub fn print_plan(
    s: &Settings,
    p: &Prepared,
    format: Format,
    color: bool,
    diff: bool,
    bad: Option<&crate::sync::marks::Mark>,
) -> Result<(), Error> {
    match format {
        Format::Text => {
            if let Some(m) = bad {
                outln!(
                    "{} is marked bad since {}: {}\n`driftless sync` does not apply it (the host stays as it is) until a new commit arrives; `sync --retry` applies it anyway. What it would change:",
                    short(&p.fetched.commit),
                    time_str(m.time),
                    m.reason
                );
            }
            out!("{}", render_plan(&p.plan, Style { color }, diff));
            Ok(())
        }
        Format::Json => {
            let changes: Vec<serde_json::Value> = p
                .plan
                .changes
                .iter()
                .map(|c| {
                    let mut v = serde_json::to_value(c).unwrap_or_default();
                    let d =
                        (diff && c.content_changed && !c.sensitive && c.kind != ChangeKind::Adopt)
                            .then(|| content_diff(c, Style { color: false }));
                    if let Some(obj) = v.as_object_mut() {
                        obj.insert("diff".into(), json!(d));
                    }
                    v
                })
                .collect();
            let mut plan = json!({
                "apiVersion": API_VERSION,
                "kind": "Plan",
                "spec": {
                    "host": p.plan.host,
                    "source": s.source.as_deref().map(crate::effects::fetch::redact),
                    "branch": s.branch,
                    "path": s.path,
                    "commit": p.fetched.commit,
                    "summary": p.fetched.summary,
                    "root": s.root,
                },
                "status": {
                    "skipped": bad.map(|m| json!({"marked_bad": m})),
                    "changes": changes,
                    "unchanged": p.plan.unchanged,
                    "unit_actions": p.plan.unit_actions,
                    "checks": p.plan.checks,
                },
            });
            // Only when there are hooks: a plan without them keeps its
            // bytes for today's consumers.
            if let (false, Some(status)) = (
                p.plan.hooks.is_empty(),
                plan.get_mut("status").and_then(|v| v.as_object_mut()),
            ) {
                status.insert("hooks".into(), json!(p.plan.hooks));
                status.insert(
                    "irreversible".into(),
                    json!([{"what": "hooks", "why": "hooks are not undone"}]),
                );
            }
            if let (false, Some(status)) = (
                p.plan.reboot_required.is_empty(),
                plan.get_mut("status").and_then(|v| v.as_object_mut()),
            ) {
                status.insert("reboot_required".into(), json!(p.plan.reboot_required));
            }
            if let (false, Some(status)) = (
                p.plan.reboot_packages.is_empty(),
                plan.get_mut("status").and_then(|v| v.as_object_mut()),
            ) {
                status.insert("reboot_packages".into(), json!(p.plan.reboot_packages));
            }
            // Links and absent paths, in the order they switch; only
            // when there are some (a files-only plan keeps its bytes).
            let resources = resources_json(&p.plan);
            if let (false, Some(status)) = (
                resources.is_empty(),
                plan.get_mut("status").and_then(|v| v.as_object_mut()),
            ) {
                status.insert("resources".into(), json!(resources));
            }
            print_json(&plan)
        }
    }
}

/// `status.resources` of a plan: one object per account, directory, link
/// or absent change, in the order the transaction makes them,
/// `{"kind": "user", "action": "create", "name": …, "uid": …, …}`,
/// `{"kind": "link", "action": "retarget", "path": …, "target": …, "was": …}`
/// or `{"kind": "absent", "action": "remove", "path": …, "file"|"link": …}`.
fn resources_json(plan: &crate::plan::Plan) -> Vec<serde_json::Value> {
    let tagged = |kind: &str, action: Option<&str>, v: serde_json::Value| {
        let mut out = serde_json::Map::new();
        out.insert("kind".into(), json!(kind));
        if let Some(a) = action {
            out.insert("action".into(), json!(a));
        }
        if let serde_json::Value::Object(fields) = v {
            out.extend(fields);
        }
        serde_json::Value::Object(out)
    };
    plan.accounts
        .iter()
        .map(|c| {
            let (kind, action) = c.kind_action();
            let mut v = serde_json::to_value(c).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.remove("action");
            }
            tagged(kind, Some(action), v)
        })
        .chain(plan.packages.iter().map(|c| {
            let mut v = serde_json::to_value(c).unwrap_or_default();
            let action = v
                .as_object_mut()
                .and_then(|o| o.remove("action"))
                .and_then(|a| a.as_str().map(str::to_string))
                .unwrap_or_default();
            tagged("package", Some(&action), v)
        }))
        .chain(
            plan.dirs
                .iter()
                .map(|c| tagged("dir", None, serde_json::to_value(c).unwrap_or_default())),
        )
        .chain(
            plan.links
                .iter()
                .map(|c| tagged("link", None, serde_json::to_value(c).unwrap_or_default())),
        )
        .chain(plan.absent.iter().map(|c| {
            tagged(
                if c.purged { "purge" } else { "absent" },
                Some("remove"),
                serde_json::to_value(c).unwrap_or_default(),
            )
        }))
        .collect()
}

pub fn print_status(s: &Settings, format: Format) -> Result<(), Error> {
    let state = StateDir::existing(&s.state_dir);
    let inventory = match &state {
        Some(st) => Some(st.inventory().kind(Failure::Failed)?),
        None => None,
    };
    let last: Option<LastRun> = match &state {
        Some(st) => crate::sync::load_last_run(st).kind(Failure::Failed)?,
        None => None,
    };
    let pending = match &state {
        Some(st) => pending_transactions(st),
        None => Vec::new(),
    };
    let marks = match &state {
        Some(st) => crate::sync::marks::load(st).map_err(|e| format!("{e:#}")),
        None => Ok(Default::default()),
    };
    let applied = inventory.as_ref().filter(|i| !i.txid.is_empty());
    let boot = crate::effects::reboot::boot_id();
    let reboot = inventory
        .as_ref()
        .and_then(|i| crate::effects::reboot::pending(i, &boot));
    let reboot_permit = state
        .as_ref()
        .map(|st| crate::sync::reboot_permit::read(st).map_err(|e| format!("{e:#}")));
    // Unreadable floor: shown as an error string, status still prints.
    let floor = crate::effects::state::floor::load(&s.root).map_err(|e| format!("{e:#}"));
    match format {
        Format::Json => print_json(&json!({
            "apiVersion": API_VERSION,
            "kind": "Status",
            "spec": {
                "host": s.host,
                "source": s.source.as_deref().map(crate::effects::fetch::redact),
                "branch": s.branch,
                "path": s.path,
                "root": s.root,
                "state_dir": s.state_dir,
                "allowed_roots": s.allowed_roots,
                "require_signed": s.require_signed,
                "allowed_signers": s.allowed_signers,
                "signature_policy": s.signature_policy,
            },
            "status": {
                "anti_rollback": match &floor {
                    Ok(f) => json!(f),
                    Err(e) => json!({ "error": e }),
                },
                "applied": applied.map(|i| {
                    let mut v = json!({
                        "commit": i.commit,
                        "txid": i.txid,
                        "applied_at": i.applied_at,
                        "files": i.files.len(),
                    });
                    // Only with links: a files-only status keeps its bytes.
                    if let (false, Some(o)) = (i.links.is_empty(), v.as_object_mut()) {
                        o.insert("links".into(), json!(i.links));
                    }
                    if let (false, Some(o)) = (i.directories.is_empty(), v.as_object_mut()) {
                        o.insert("directories".into(), json!(i.directories));
                    }
                    v
                }),
                "last_run": last,
                "interrupted_transactions": pending,
                "bad_commits": match &marks {
                    Ok(m) => json!(m.bad),
                    Err(e) => json!({ "error": e }),
                },
                "halted": marks.as_ref().ok().and_then(|m| m.halted.clone()),
                "interrupted_attempts": marks.as_ref().map(|m| json!(m.interrupted)).unwrap_or(json!({})),
                "unchecked_revert": marks.as_ref().ok().and_then(|m| m.unchecked_revert.clone()),
                "reboot_required": match reboot {
                    Some(r) => json!({
                        "required": true,
                        "boot_id": r.boot_id,
                        "files": r.reasons,
                    }),
                    None => json!({ "required": false }),
                },
                // `[fleet] reboot = true`: a fleet permit held across a
                // reboot, until a healthy run of the new boot.
                "reboot_permit": match &reboot_permit {
                    Some(Ok(h)) => json!(h),
                    Some(Err(e)) => json!({ "error": e }),
                    None => json!(null),
                },
            },
        })),
        Format::Text => {
            outln!("host:     {}", s.host);
            outln!(
                "source:   {} (branch {}{})",
                s.source
                    .as_deref()
                    .map_or_else(|| "(none configured)".into(), crate::effects::fetch::redact),
                s.branch,
                if s.path.is_empty() {
                    String::new()
                } else {
                    format!(", path {}", s.path)
                }
            );
            match applied {
                Some(i) => outln!(
                    "applied:  {} at {} ({} files{}, transaction {})",
                    i.commit.as_deref().map(short).unwrap_or("?"),
                    time_str(i.applied_at),
                    i.files.len(),
                    if i.links.is_empty() {
                        String::new()
                    } else {
                        format!(", {} links", i.links.len())
                    } + &match i.directories.len() {
                        0 => String::new(),
                        1 => ", 1 directory".to_string(),
                        n => format!(", {n} directories"),
                    },
                    i.txid
                ),
                None => outln!("applied:  nothing yet"),
            }
            match &floor {
                Ok(Some(f)) => outln!(
                    "floor:    {} (new commits must descend from it; {})",
                    short(&f.commit),
                    crate::effects::state::floor::path(&s.root).display()
                ),
                Ok(None) => {}
                Err(e) => outln!("floor:    unreadable: {e}"),
            }
            if s.require_signed {
                outln!(
                    "signing:  required ({}, {})",
                    s.allowed_signers.display(),
                    serde_json::to_value(s.signature_policy)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                );
            }
            match &last {
                Some(l) => {
                    outln!(
                        "last run: {} at {}{}",
                        serde_json::to_value(&l.outcome)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default(),
                        time_str(l.time),
                        l.commit
                            .as_deref()
                            .map(|c| format!(" ({})", short(c)))
                            .unwrap_or_default()
                    );
                    if let Some(m) = &l.message {
                        outln!("          {m}");
                    }
                }
                None => outln!("last run: never"),
            }
            if let Some(r) = reboot {
                outln!(
                    "reboot required: yes (files: {}); driftless reboots by itself only with [fleet] reboot = true",
                    crate::effects::reboot::describe(r)
                );
            }
            match &reboot_permit {
                Some(Ok(Some(h))) => outln!(
                    "reboot permit: held since {} (group {}{}); {}",
                    time_str(h.since),
                    h.group,
                    h.commit
                        .as_deref()
                        .map(|c| format!(", commit {}", short(c)))
                        .unwrap_or_default(),
                    if h.boot_id == boot {
                        "the reboot is asked for at the next run"
                    } else {
                        "given back after the first healthy run of this boot"
                    }
                ),
                Some(Err(e)) => outln!("reboot permit: unreadable record ({e})"),
                _ => {}
            }
            if !pending.is_empty() {
                outln!(
                    "interrupted transactions (rolled back by the next run): {}",
                    pending.join(", ")
                );
            }
            match &marks {
                Ok(m) => {
                    if let Some(h) = &m.halted {
                        outln!(
                            "HALTED:   since {}: {} (`driftless sync --retry` resumes)",
                            time_str(h.time),
                            h.reason
                        );
                    }
                    if let Some(u) = &m.unchecked_revert {
                        outln!(
                            "reverted: {} (since {}): the restored state is checked by the next run",
                            short(&u.commit),
                            time_str(u.time)
                        );
                    }
                    for (commit, mark) in &m.bad {
                        outln!(
                            "bad:      {} (marked {}): {}",
                            short(commit),
                            time_str(mark.time),
                            mark.reason
                        );
                    }
                }
                Err(e) => outln!("marks:    unreadable: {e}"),
            }
            Ok(())
        }
    }
}

fn pending_transactions(state: &StateDir) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(state.tx_dir()) else {
        return Vec::new();
    };
    let committed = state
        .inventory()
        .map(|i| i.txid.clone())
        .unwrap_or_default();
    let mut out: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            if name.ends_with(".removed") {
                return None; // being removed (see `apply::remove_tx_dir`)
            }
            let j = crate::effects::apply::load_journal(&e.path()).ok()??;
            let interrupted = match j.state {
                TxState::Preparing | TxState::Reverting => true,
                // A Prepared journal named by the inventory has committed.
                TxState::Prepared | TxState::Switched => name != committed,
                TxState::Committed | TxState::RolledBack => false,
            };
            interrupted.then_some(name)
        })
        .collect();
    out.sort();
    out
}

pub fn print_history(s: &Settings, limit: usize, format: Format) -> Result<(), Error> {
    let entries = match StateDir::existing(&s.state_dir) {
        Some(st) => st.history().kind(Failure::Failed)?,
        None => Vec::new(),
    };
    let newest: Vec<_> = entries.iter().rev().take(limit).collect();
    match format {
        Format::Json => print_json(&json!({
            "apiVersion": API_VERSION,
            "kind": "History",
            "status": { "entries": newest },
        })),
        Format::Text => {
            if newest.is_empty() {
                outln!("no runs recorded in {}", s.state_dir.display());
            }
            for e in newest {
                let outcome = serde_json::to_value(&e.outcome)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                // history.jsonl is in the untrusted state directory.
                let commit =
                    crate::desired::spec::shown(e.commit.as_deref().map(short).unwrap_or("-"));
                let mut line = format!("{}  {:<9} {:<12}", time_str(e.time), outcome, commit);
                if e.created != 0 || e.changed != 0 || e.removed != 0 {
                    line.push_str(&format!("  +{} ~{} -{}", e.created, e.changed, e.removed));
                }
                if let Some(m) = &e.message {
                    line.push_str("  ");
                    line.push_str(&crate::desired::spec::shown(m.lines().next().unwrap_or("")));
                }
                outln!("{line}");
            }
            Ok(())
        }
    }
}

pub fn validate(
    s: &Settings,
    dir: Option<&Path>,
    format: Format,
    skip_secrets: bool,
) -> Result<ExitCode, Error> {
    let snap = match dir {
        Some(d) => fetch::read_dir(d, &s.path, s.limits.file).kind(Failure::InvalidRepo)?,
        None => {
            let spec = crate::sync::source_spec(s)?;
            fetch::install_tls_provider();
            let got = fetch::fetch(&spec, &s.state_dir.join("mirror.git")).kind(Failure::Failed)?;
            fetch::read_tree(&got.repo, got.commit, &s.path, s.limits.file)
                .kind(Failure::InvalidRepo)?
        }
    };
    let opts = crate::sync::load_options(s);
    let mut hosts = load::host_names(&snap);
    if snap.contains(&format!("hosts/{}.toml", load::DEFAULT_HOST)) {
        hosts.push(load::DEFAULT_HOST.to_string());
    }
    if hosts.is_empty() {
        return Err(Error::new(
            Failure::InvalidRepo,
            anyhow::anyhow!("no host files: add hosts/<name>.toml or hosts/default.toml"),
        ));
    }
    let base_facts =
        facts::gather(&crate::effects::rootfs::RootFs::open(Path::new("/")).kind(Failure::Failed)?);
    let mut results = Vec::new();
    let mut failed = 0;
    let mut skipped = std::collections::BTreeSet::new();
    for name in &hosts {
        let mut facts = base_facts.clone();
        facts["hostname"] = json!(name);
        let outcome = load::load_host(&snap, name, &opts).and_then(|cfg| {
            use crate::desired::secrets::SecretResolver;
            let keys_settings = s.clone();
            let resolver = std::sync::Arc::new(if skip_secrets {
                SecretResolver::placeholders(&snap)
            } else {
                SecretResolver::new(
                    &snap,
                    Box::new(move || crate::effects::keys::load(&keys_settings)),
                )
            });
            let d = crate::desired::render::render_host(
                &snap,
                &cfg,
                &facts,
                resolver.clone(),
                s.limits,
            );
            skipped.extend(resolver.skipped());
            Ok((cfg, d?))
        });
        match outcome {
            Ok((cfg, d)) => {
                let mut r = json!({
                    "host": name, "ok": true, "roles": cfg.roles, "files": d.files.len(),
                    "checks": d.checks.len(), "errors": [],
                });
                // Only when declared: a files-only validation keeps its bytes.
                if let Some(o) = r.as_object_mut() {
                    if !d.links.is_empty() {
                        o.insert("links".into(), json!(d.links.len()));
                    }
                    if !d.absent.is_empty() {
                        o.insert("absent".into(), json!(d.absent.len()));
                    }
                    if !d.dirs.is_empty() {
                        o.insert("dirs".into(), json!(d.dirs.len()));
                    }
                }
                results.push(r)
            }
            Err(diags) => {
                failed += 1;
                let errors: Vec<&String> = diags.iter().collect();
                results.push(json!({"host": name, "ok": false, "errors": errors}));
            }
        }
    }
    match format {
        Format::Json => print_json(&json!({
            "apiVersion": API_VERSION,
            "kind": "Validation",
            "status": { "hosts": results, "failed": failed, "secrets_not_decrypted": skipped },
        }))?,
        Format::Text => {
            for r in &results {
                let host = r["host"].as_str().unwrap_or("?");
                if r["ok"].as_bool() == Some(true) {
                    let mut others = String::new();
                    if let Some(n) = r.get("links") {
                        others.push_str(&format!(", {n} link(s)"));
                    }
                    if let Some(n) = r.get("absent") {
                        others.push_str(&format!(", {n} absent"));
                    }
                    if let Some(n) = r.get("dirs") {
                        let word = if n.as_u64() == Some(1) {
                            "directory"
                        } else {
                            "directories"
                        };
                        others.push_str(&format!(", {n} {word}"));
                    }
                    outln!(
                        "ok    {host}: {} file(s), {} check(s){others}",
                        r["files"],
                        r["checks"]
                    );
                } else {
                    outln!("FAIL  {host}:");
                    for e in r["errors"].as_array().into_iter().flatten() {
                        outln!("      {}", e.as_str().unwrap_or(""));
                    }
                }
            }
            outln!("{} host(s) valid, {failed} invalid", results.len() - failed);
            if !skipped.is_empty() {
                outln!(
                    "not decrypted (--skip-secrets; values were placeholders): {}",
                    skipped.into_iter().collect::<Vec<_>>().join(", ")
                );
            }
        }
    }
    Ok(if failed > 0 {
        ExitCode::from(Failure::InvalidRepo.code())
    } else {
        ExitCode::SUCCESS
    })
}

fn identities(s: &Settings) -> Result<crate::secrets::Identities, Error> {
    crate::effects::keys::load(s).map_err(|e| Error::new(Failure::Config, anyhow::anyhow!(e)))
}

pub fn secrets(s: &Settings, cmd: super::SecretsCommand) -> Result<ExitCode, Error> {
    use crate::secrets::{self, Store};
    use secrecy::ExposeSecret;
    match cmd {
        super::SecretsCommand::Decrypt { file, format, .. } => {
            let name = file.display().to_string();
            let bytes = std::fs::read(&file).map_err(|e| {
                Error::new(Failure::Failed, anyhow::anyhow!("cannot read {name}: {e}"))
            })?;
            let ids = identities(s)?;
            let d = secrets::decrypt(&name, &bytes, Store::from_path(&name), &ids)
                .map_err(|e| Error::new(Failure::InvalidRepo, anyhow::anyhow!(e.to_string())))?;
            if format.as_deref() == Some("json") {
                print_json(&d.to_json())?;
                return Ok(ExitCode::SUCCESS);
            }
            let store = match format.as_deref() {
                Some(f) => Store::from_name(f)
                    .map_err(|e| Error::new(Failure::Config, anyhow::anyhow!(e.to_string())))?,
                None => d.store(),
            };
            let out = d
                .emit(store)
                .map_err(|e| Error::new(Failure::InvalidRepo, anyhow::anyhow!(e.to_string())))?;
            std::io::Write::write_all(&mut std::io::stdout(), out.expose_secret())
                .kind(Failure::Failed)?;
            Ok(ExitCode::SUCCESS)
        }
        super::SecretsCommand::Check { file, .. } => {
            let name = file.display().to_string();
            let bytes = std::fs::read(&file).map_err(|e| {
                Error::new(Failure::Failed, anyhow::anyhow!("cannot read {name}: {e}"))
            })?;
            let ids = identities(s)?;
            let r = secrets::check(&name, &bytes, Store::from_path(&name), &ids)
                .map_err(|e| Error::new(Failure::InvalidRepo, anyhow::anyhow!(e.to_string())))?;
            outln!(
                "{name}: ok ({} store, MAC verified, {} encrypted value(s), {} in clear)",
                r.store,
                r.encrypted_values,
                r.clear_values
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn host_recipient(s: &Settings) -> Result<ExitCode, Error> {
    let mut found = false;
    for k in &s.ssh_host_keys {
        if !k.exists() {
            continue;
        }
        let ids = crate::secrets::Identities::from_ssh_private_key(k)
            .map_err(|e| Error::new(Failure::Failed, anyhow::anyhow!(e.to_string())))?;
        for r in ids.recipients() {
            outln!("{r}");
            found = true;
        }
    }
    if !found {
        return Err(Error::new(
            Failure::Config,
            anyhow::anyhow!(
                "no SSH host key found ({}): generate one with `ssh-keygen -A`, or set `ssh_host_keys`",
                s.ssh_host_keys.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    Ok(ExitCode::SUCCESS)
}
