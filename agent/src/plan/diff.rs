//! Human-readable rendering of a plan: one line per change and a unified
//! diff of the content, coloured when asked.
//!
//! Sensitive files never show content: only that it changed and the
//! digests recorded for it. Binary content shows sizes, not bytes.

use std::fmt::Write as _;

use super::dirs::DirAction;
use super::links::LinkAction;
use super::{ChangeKind, FileChange, Plan};
use crate::desired::spec::{shown, HookWhen};

/// ANSI colours, or none.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    pub color: bool,
}

impl Style {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }
}

/// Lines of context around each change in the unified diff.
const CONTEXT: usize = 3;

/// The whole plan as text, as printed by `driftless plan`.
pub fn render_plan(plan: &Plan, style: Style, show_diff: bool) -> String {
    let mut out = String::new();
    let commit = plan.commit.as_deref().map(short).unwrap_or("working tree");
    let _ = writeln!(out, "host {} at {commit}", plan.host);
    if plan.is_empty() {
        let _ = writeln!(
            out,
            "no changes: {} managed file(s) already as desired",
            plan.unchanged
        );
    }
    let hook_lines = |out: &mut String, when: HookWhen| {
        for h in plan.hooks.iter().filter(|h| h.when == when) {
            let _ = writeln!(
                out,
                "{}",
                style.paint("33", &format!("~ hook {}", h.describe()))
            );
        }
    };
    hook_lines(&mut out, HookWhen::Pre);
    for a in &plan.accounts {
        let _ = writeln!(out, "{}", style.paint("32", &a.line()));
    }
    for p in &plan.packages {
        let color = match p {
            crate::plan::packages::PackageChange::Install { .. } => "32",
            crate::plan::packages::PackageChange::Change { .. } => "33",
            crate::plan::packages::PackageChange::Remove { .. } => "31",
        };
        let _ = writeln!(out, "{}", style.paint(color, &p.line()));
    }
    for line in dir_lines(plan) {
        let _ = writeln!(out, "{}", style.paint(line.0, &line.1));
    }
    for c in &plan.changes {
        let _ = writeln!(out, "{}", summary_line(c, style));
        if show_diff && c.content_changed && c.kind != ChangeKind::Adopt {
            out.push_str(&content_diff(c, style));
        }
    }
    for line in path_lines(plan) {
        let _ = writeln!(out, "{}", style.paint(line.0, &line.1));
    }
    if !plan.is_empty() {
        let mut counts = [0usize; 4];
        for c in &plan.changes {
            counts[match c.kind {
                ChangeKind::Create => 0,
                ChangeKind::Update => 1,
                ChangeKind::Remove => 2,
                ChangeKind::Adopt => 3,
            }] += 1;
        }
        let mut others = String::new();
        if !plan.accounts.is_empty() {
            let _ = write!(others, "; {} account change(s)", plan.accounts.len());
        }
        if !plan.packages.is_empty() {
            let _ = write!(others, "; {} package(s)", plan.packages.len());
        }
        if !plan.dirs.is_empty() {
            let n = plan.dirs.len();
            let _ = write!(
                others,
                "; {n} {}",
                if n == 1 { "directory" } else { "directories" }
            );
        }
        if !plan.links.is_empty() {
            let _ = write!(others, "; {} link(s)", plan.links.len());
        }
        let purged = plan.absent.iter().filter(|c| c.purged).count();
        if plan.absent.len() > purged {
            let _ = write!(others, "; {} absent", plan.absent.len() - purged);
        }
        if purged > 0 {
            let _ = write!(others, "; {purged} purged");
        }
        let _ = writeln!(
            out,
            "{} to create, {} to change, {} to remove, {} to adopt, {} unchanged{others}",
            counts[0], counts[1], counts[2], counts[3], plan.unchanged
        );
    }
    for a in &plan.unit_actions {
        let _ = writeln!(out, "unit {} {}", a.action, a.unit);
    }
    hook_lines(&mut out, HookWhen::Post);
    let checks: &[_] = if plan.is_empty() { &[] } else { &plan.checks };
    for c in checks {
        let _ = writeln!(out, "check {} (role {})", c.name, c.role);
    }
    if !plan.hooks.is_empty() {
        let _ = writeln!(
            out,
            "irreversible: hooks are not undone (a revert restores the files, not what a hook did)"
        );
    }
    for p in plan.packages.iter().filter(|p| p.irreversible()) {
        let _ = writeln!(
            out,
            "irreversible: {} (its current version cannot be had again: a revert cannot put it back)",
            p.line().trim_start_matches(['+', '~', '-', ' '])
        );
    }
    if !plan.reboot_required.is_empty() || !plan.reboot_packages.is_empty() {
        let what: Vec<String> = plan
            .reboot_required
            .iter()
            .map(|p| format!("file {p}"))
            .chain(plan.reboot_packages.iter().map(|n| format!("package {n}")))
            .collect();
        let _ = writeln!(
            out,
            "reboot required after this commit: {} (driftless writes /run/reboot-required; it reboots only with [fleet] reboot = true, holding a fleet permit)",
            what.join(", ")
        );
    }
    if !plan.ownership_applied {
        let _ = writeln!(
            out,
            "note: not running as root: owner and group are neither compared nor applied"
        );
    }
    for n in &plan.account_notes {
        let _ = writeln!(out, "note: {n}");
    }
    if plan.packages_skipped {
        let _ = writeln!(
            out,
            "note: [[packages]] are read but not changed under --root or without root"
        );
    }
    if plan.accounts_skipped {
        let _ = writeln!(
            out,
            "note: not running as root: [[users]] and [[groups]] are not created"
        );
    }
    out
}

/// The lines of the managed directory changes, with their colour: before
/// the files, which may go inside them.
pub fn dir_lines(plan: &Plan) -> Vec<(&'static str, String)> {
    plan.dirs
        .iter()
        .map(|c| {
            let m = c.meta;
            match c.action {
                DirAction::Create => (
                    "32",
                    format!(
                        "+ create directory {} ({:04o}, {}:{})",
                        c.path, m.mode, m.uid, m.gid
                    ),
                ),
                DirAction::Meta => {
                    let w = c.was.unwrap_or(m);
                    (
                        "33",
                        format!(
                            "~ directory {} ({:04o}, {}:{}; was {:04o}, {}:{})",
                            c.path, m.mode, m.uid, m.gid, w.mode, w.uid, w.gid
                        ),
                    )
                }
                DirAction::Remove => (
                    "31",
                    format!(
                        "- remove directory {} if empty (no longer declared, driftless created it)",
                        c.path
                    ),
                ),
            }
        })
        .collect()
}

/// The lines of the link and absent changes, with their colour: after
/// the files, in the order the transaction switches them.
pub fn path_lines(plan: &Plan) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    // Link targets read from the host are shown escaped, like paths.
    for c in &plan.links {
        let target = shown(c.target.as_deref().unwrap_or_default());
        let was = shown(c.was.as_deref().unwrap_or_default());
        out.push(match c.action {
            LinkAction::Create => ("32", format!("+ link {} -> {target}", c.path)),
            LinkAction::Retarget => (
                "33",
                format!("~ relink {} -> {target} (was -> {was})", c.path),
            ),
            LinkAction::Remove => (
                "31",
                format!(
                    "- unlink {} (was -> {was}; no longer declared, driftless created it)",
                    c.path
                ),
            ),
        });
    }
    for c in &plan.absent {
        let link = c
            .link
            .as_deref()
            .map(|t| format!(" -> {}", shown(t)))
            .unwrap_or_default();
        if c.purged {
            out.push((
                "31",
                format!("- purge {}{link} (not managed; backed up)", c.path),
            ));
            continue;
        }
        out.push((
            "31",
            format!(
                "- remove {}{link} (absent in role {}; backed up)",
                c.path, c.role
            ),
        ));
    }
    out
}

pub fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

fn summary_line(c: &FileChange, style: Style) -> String {
    let path = c.path.to_string();
    match c.kind {
        ChangeKind::Create => {
            let a = c.after.as_ref();
            style.paint(
                "32",
                &format!(
                    "+ create {path} ({} bytes, mode {:04o}, {}:{})",
                    a.map_or(0, |a| a.size),
                    a.map_or(0, |a| a.mode),
                    a.map_or(0, |a| a.uid),
                    a.map_or(0, |a| a.gid)
                ),
            )
        }
        ChangeKind::Remove => {
            let how = if c.restore_original.is_some() {
                "restore the pre-driftless original of"
            } else {
                "remove"
            };
            style.paint(
                "31",
                &format!("- {how} {path} (no longer in role {})", c.role),
            )
        }
        ChangeKind::Adopt => format!("= adopt {path} (already as desired; original saved)"),
        ChangeKind::Update => {
            let mut what = Vec::new();
            if c.content_changed {
                what.push("content".to_string());
            }
            if let (Some(b), Some(a)) = (&c.before, &c.after) {
                if c.mode_changed {
                    what.push(format!("mode {:04o} -> {:04o}", b.mode, a.mode));
                }
                if c.owner_changed {
                    what.push(format!("owner {}:{} -> {}:{}", b.uid, b.gid, a.uid, a.gid));
                }
            }
            style.paint("33", &format!("~ change {path} ({})", what.join(", ")))
        }
    }
}

/// A unified diff of the content change, or a one-line note where content
/// must not or cannot be shown.
pub fn content_diff(c: &FileChange, style: Style) -> String {
    let empty: &[u8] = &[];
    let old = c.before.as_ref().map_or(empty, |b| b.content.as_slice());
    let new = c.after.as_ref().map_or(empty, |a| a.content.as_slice());
    if c.sensitive {
        return format!(
            "    (sensitive content changed; {} -> {}; not shown)\n",
            c.before
                .as_ref()
                .map_or("none".to_string(), |b| short(&b.sha256).to_string()),
            c.after
                .as_ref()
                .map_or("none".to_string(), |a| short(&a.sha256).to_string()),
        );
    }
    let (Ok(old_text), Ok(new_text)) = (std::str::from_utf8(old), std::str::from_utf8(new)) else {
        return format!(
            "    (binary content: {} bytes -> {} bytes)\n",
            old.len(),
            new.len()
        );
    };
    if old_text.contains('\0') || new_text.contains('\0') {
        return format!(
            "    (binary content: {} bytes -> {} bytes)\n",
            old.len(),
            new.len()
        );
    }
    let diff = similar::TextDiff::from_lines(old_text, new_text);
    let path = c.path.to_string();
    let old_label = if c.before.is_some() {
        format!("a{path}")
    } else {
        "/dev/null".into()
    };
    let new_label = if c.after.is_some() {
        format!("b{path}")
    } else {
        "/dev/null".into()
    };
    let text = diff
        .unified_diff()
        .context_radius(CONTEXT)
        .header(&old_label, &new_label)
        .to_string();
    if !style.color {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 64);
    for line in text.split_inclusive('\n') {
        let code = if line.starts_with("+++") || line.starts_with("---") {
            "1"
        } else if line.starts_with('+') {
            "32"
        } else if line.starts_with('-') {
            "31"
        } else if line.starts_with("@@") {
            "36"
        } else {
            ""
        };
        if code.is_empty() {
            out.push_str(line);
        } else {
            let body = line.strip_suffix('\n').unwrap_or(line);
            out.push_str(&style.paint(code, body));
            if line.ends_with('\n') {
                out.push('\n');
            }
        }
    }
    out
}
