//! Render: host configuration + facts → the exact bytes, mode and owner of
//! every managed file.
//!
//! Rendering is strict: an undefined variable is an error that names the
//! template, the line and the variable (Tera reports the variable; we find
//! the line). HTML auto-escaping is off (these are config files, not web
//! pages), and `get_env` is disabled so a template cannot read the agent's
//! environment.
//!
//! Templates see:
//! - `host`: `name`, `labels`, `roles`, `facts` (see `effects::facts`)
//! - `vars`: the merged variables (see `load` for precedence)
//! - `file`: the file's own `path`, `role`, `mode`, `owner`, `group`
//!
//! Template names are repository paths (`roles/web/files/nginx.conf.tera`,
//! `templates/header.tera`), so `{% include %}` and error messages use the
//! path the user sees in the repository. `driftless.tera` holds the macros
//! driftless ships (see `templates/` in the source tree).

use serde_json::{json, Value as Json};
use tera::Tera;

use std::collections::BTreeSet;

use super::guard::{self, LimitedWriter, Limits};
use super::load::{ContentRef, FileDecl, HostConfig};
use super::model::UnitSpec;
use super::secrets::SecretResolver;
use super::snapshot::{Entry, Snapshot};
use super::spec::{Check, Mode, Principal, TargetPath, UnitAction};
use super::Diagnostics;
use std::sync::Arc;

/// Macros shipped with the agent.
const BUILTIN_TEMPLATES: &[(&str, &str)] = &[(
    "driftless.tera",
    include_str!("../../../templates/driftless.tera"),
)];

/// One file as it must be on the host.
#[derive(Debug, Clone)]
pub struct DesiredFile {
    pub path: TargetPath,
    pub role: String,
    pub content: Vec<u8>,
    pub mode: Mode,
    /// Mode of the parent directories created for it.
    pub dir_mode: Mode,
    pub owner: Principal,
    pub group: Principal,
    pub on_change: Vec<UnitAction>,
    /// Content depends on a secret: never shown, logged or stored in clear.
    pub sensitive: bool,
    /// The content depends on nothing in the repository but its own
    /// template or source file, the shared templates and the variables: a
    /// commit that changes other role files cannot change it (see
    /// `sync::repair`).
    pub self_contained: bool,
    /// A change to it needs a reboot (`reboot = true`).
    pub reboot: bool,
    /// Where it was declared, for messages.
    pub origin: String,
}

impl Drop for DesiredFile {
    /// Rendered secrets do not outlive the file that holds them.
    fn drop(&mut self) {
        if self.sensitive {
            zeroize::Zeroize::zeroize(&mut self.content);
        }
    }
}

/// The whole desired state of one host.
#[derive(Debug, Clone)]
pub struct Desired {
    pub host: String,
    pub files: Vec<DesiredFile>,
    pub checks: Vec<Check>,
    /// Units that must be enabled/disabled, started/stopped.
    pub units: Vec<UnitSpec>,
    /// Declared hooks; the plan picks those a transaction runs.
    pub hooks: Vec<crate::desired::spec::Hook>,
    /// Managed symlinks (`[[links]]`), sorted by path.
    pub links: Vec<crate::desired::load::LinkDecl>,
    /// Paths that must not exist (`[[absent]]`), sorted by path.
    pub absent: Vec<crate::desired::load::AbsentDecl>,
    /// Managed directories (`[[dirs]]`), sorted by path.
    pub dirs: Vec<crate::desired::load::DirDecl>,
    /// Declared system users and groups (`[[users]]`, `[[groups]]`).
    pub accounts: crate::desired::accounts::Accounts,
    /// Declared packages (`[[packages]]`).
    pub packages: Vec<crate::desired::packages::PackageDecl>,
}

/// Templates of a repository, parsed once, rendered for any number of hosts.
pub struct Renderer {
    tera: Tera,
    secrets: Arc<SecretResolver>,
    /// Raw template texts by name, to find the line of a render error
    /// (Tera reports the variable but not where it is).
    sources: std::collections::HashMap<String, String>,
    limits: Limits,
}

/// Runs `f` on a thread with [`guard::RENDER_STACK`] of stack: Tera's
/// parser and renderer recurse, and a deep (hostile) template must end in
/// an error, not a stack overflow of a small thread's stack.
fn on_big_stack<T: Send, F: FnOnce() -> T + Send>(f: F) -> T {
    let slot = std::sync::Mutex::new(Some(f));
    let take = || slot.lock().ok().and_then(|mut s| s.take());
    let ran = std::thread::scope(|scope| {
        let spawned = std::thread::Builder::new()
            .name("render".into())
            .stack_size(guard::RENDER_STACK)
            .spawn_scoped(scope, || take().map(|f| f()));
        match spawned {
            Ok(handle) => match handle.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            },
            // No thread to be had (RLIMIT_NPROC, memory): render here.
            Err(_) => None,
        }
    });
    match ran {
        Some(v) => v,
        None => match take() {
            Some(f) => f(),
            None => unreachable!("the render closure ran or is still here"),
        },
    }
}

impl Renderer {
    /// Parses every template the given roles can use: all files under
    /// `templates/`, and under each role's `files/` every `*.tera` file and
    /// every file a `template =` names.
    pub fn new(
        snap: &Snapshot,
        hosts: &[&HostConfig],
        secrets: Arc<SecretResolver>,
    ) -> Result<Self, Diagnostics> {
        Self::build(snap, hosts, secrets, None)
    }

    /// Parses only what the files in `only` need directly: their own
    /// templates, `templates/` and the built-in macros. Repairing a few
    /// drifted files then costs a few parses instead of the whole
    /// repository's. A template that includes or imports another role
    /// template fails to render with this renderer; the caller falls back
    /// to [`Renderer::new`].
    pub fn for_files(
        snap: &Snapshot,
        host: &HostConfig,
        only: &BTreeSet<TargetPath>,
        secrets: Arc<SecretResolver>,
    ) -> Result<Self, Diagnostics> {
        Self::build(snap, &[host], secrets, Some(only))
    }

    /// The output size limits (default: [`Limits::default`]).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    fn build(
        snap: &Snapshot,
        hosts: &[&HostConfig],
        secrets: Arc<SecretResolver>,
        only: Option<&BTreeSet<TargetPath>>,
    ) -> Result<Self, Diagnostics> {
        on_big_stack(|| Self::build_inner(snap, hosts, secrets, only))
    }

    fn build_inner(
        snap: &Snapshot,
        hosts: &[&HostConfig],
        secrets: Arc<SecretResolver>,
        only: Option<&BTreeSet<TargetPath>>,
    ) -> Result<Self, Diagnostics> {
        let mut diags = Diagnostics::default();
        let mut names = shared_names(snap);
        for host in hosts {
            host_template_names(snap, host, only, &mut names);
        }
        if only.is_some() {
            // Also the templates those include, import or extend.
            let mut todo: Vec<String> = names.iter().cloned().collect();
            while let Some(name) = todo.pop() {
                let Ok(Some(bytes)) = snap.read(&name) else {
                    continue;
                };
                let Ok(text) = std::str::from_utf8(bytes) else {
                    continue;
                };
                let Some(refs) = template_refs(text).filter(|refs| {
                    // Every `roles/` of the text is a name the scan found:
                    // a tag it missed (see `may_batch`) would otherwise
                    // leave a role template out of this renderer.
                    text.matches("roles/").count()
                        <= refs.iter().map(|r| r.matches("roles/").count()).sum()
                }) else {
                    diags.push(format!("{name}: cannot tell which templates it uses"));
                    break;
                };
                for r in refs {
                    if !BUILTIN_TEMPLATES.iter().any(|(n, _)| *n == r) && names.insert(r.clone()) {
                        todo.push(r);
                    }
                }
            }
        }
        let sources = read_sources(snap, names, &mut diags);
        Self::from_sources(sources, secrets, diags)
    }

    /// Parses the templates `sources` (see [`read_sources`]) into a
    /// renderer. Every parse error is reported, not just the first, after
    /// `diags` (the caller's own; any fails the build).
    fn from_sources(
        sources: Vec<(String, String)>,
        secrets: Arc<SecretResolver>,
        diags: Diagnostics,
    ) -> Result<Self, Diagnostics> {
        Self::from_sources_with(sources, secrets, diags, parse)
    }

    /// [`Renderer::from_sources`] parsing on the calling thread only (for
    /// a caller that keeps the other cores busy itself).
    fn from_sources_on_this_thread(
        sources: Vec<(String, String)>,
        secrets: Arc<SecretResolver>,
        diags: Diagnostics,
    ) -> Result<Self, Diagnostics> {
        Self::from_sources_with(sources, secrets, diags, |s| instance(s.iter()))
    }

    fn from_sources_with(
        sources: Vec<(String, String)>,
        secrets: Arc<SecretResolver>,
        mut diags: Diagnostics,
        parse: impl FnOnce(&[(String, String)]) -> tera::Result<Tera>,
    ) -> Result<Self, Diagnostics> {
        if !diags.is_empty() {
            for m in parse_diagnostics(&sources) {
                diags.push(m);
            }
            return Err(diags);
        }
        let mut tera = match parse(&sources) {
            Ok(tera) => tera,
            Err(first) => {
                for m in parse_diagnostics(&sources) {
                    diags.push(m);
                }
                if diags.is_empty() {
                    diags.push(error_chain(&first).join(": "));
                }
                return Err(diags);
            }
        };
        let cycles = guard::cycles(&tera);
        if !cycles.is_empty() {
            for c in cycles {
                diags.push(guard::cycle_message(&c));
            }
            return Err(diags);
        }
        guard::instrument_macros(&mut tera);
        tera.autoescape_on(vec![]);
        tera.register_function("get_env", |_: &std::collections::HashMap<String, Json>| {
            Err(tera::Error::msg(
                "get_env() is disabled: templates see only `host`, `vars` and `file`",
            ))
        });
        super::secrets::register(&mut tera, secrets.clone());
        Ok(Renderer {
            tera,
            secrets,
            sources: sources.into_iter().collect(),
            limits: Limits::default(),
        })
    }

    /// Renders every file of `host`. All failures are collected.
    pub fn render(
        &self,
        snap: &Snapshot,
        host: &HostConfig,
        facts: &Json,
    ) -> Result<Desired, Diagnostics> {
        self.render_only(snap, host, facts, None)
    }

    /// Renders the files of `host` in `only` (all when `None`).
    pub fn render_only(
        &self,
        snap: &Snapshot,
        host: &HostConfig,
        facts: &Json,
        only: Option<&BTreeSet<TargetPath>>,
    ) -> Result<Desired, Diagnostics> {
        on_big_stack(|| {
            self.render_inner(snap, host, facts, only)
                .map_err(|d| d.map(|m| self.secrets.redact(&m)))
        })
    }

    /// [`Renderer::render_only`] before redaction: every message this
    /// returns may quote values the templates worked on.
    fn render_inner(
        &self,
        snap: &Snapshot,
        host: &HostConfig,
        facts: &Json,
        only: Option<&BTreeSet<TargetPath>>,
    ) -> Result<Desired, Diagnostics> {
        let mut diags = Diagnostics::default();
        let mut files = Vec::with_capacity(host.files.len());
        let bar = crate::progress::bar(host.files.len() as u64, "rendering");
        self.render_files(
            snap,
            host,
            &host_json(host, facts),
            &|d: &FileDecl| only.is_none_or(|o| o.contains(&d.path)),
            &RenderProgress {
                total: Default::default(),
                stop: Default::default(),
                bar: &bar,
            },
            &mut files,
            &mut diags,
        );
        if !diags.is_empty() {
            return Err(diags);
        }
        Ok(desired(host, files))
    }

    /// Renders the files of `host` that `select` picks, in declaration
    /// order, into `files` (with their index among the declarations);
    /// failures go to `diags`. `progress.total` is what the files kept so
    /// far add up to (the per-sync limit); crossing a limit sets
    /// `progress.stop`, and no file is rendered once it is set.
    #[allow(clippy::too_many_arguments)]
    fn render_files(
        &self,
        snap: &Snapshot,
        host: &HostConfig,
        host_json: &Json,
        select: &dyn Fn(&FileDecl) -> bool,
        progress: &RenderProgress<'_>,
        files: &mut Vec<(usize, DesiredFile)>,
        diags: &mut Diagnostics,
    ) {
        use std::sync::atomic::Ordering;
        let RenderProgress { total, stop, bar } = progress;
        // One context for all the templates of this call, built when the
        // first needs it: only `file` differs between them, and it is
        // replaced for each. (A context of its own per template copied
        // the host's variables and facts a thousand times in a cold
        // apply.) A template's `set` cannot change it: Tera renders with
        // the context borrowed and keeps its own assignments.
        let mut base: Option<tera::Context> = None;
        for (index, decl) in host.files.iter().enumerate().filter(|(_, d)| select(d)) {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            bar.inc(1);
            self.secrets.take_used();
            let content = match &decl.content {
                ContentRef::Secret { path, format } => match self.secrets.whole(path, *format) {
                    Ok(b) => b,
                    Err(e) => {
                        diags.push(format!("{} ({}): {e}", decl.path, decl.origin));
                        continue;
                    }
                },
                ContentRef::Generated { bytes, .. } => bytes.clone(),
                ContentRef::Source(path) => match snap.read_uncached(path) {
                    Ok(Some(b)) => b.into_owned(),
                    Ok(None) => {
                        diags.push(format!("{}: {path} does not exist", decl.origin));
                        continue;
                    }
                    Err(e) => {
                        diags.push(format!("{}: {e:#}", decl.origin));
                        continue;
                    }
                },
                ContentRef::Template(name) => {
                    let ctx = match &mut base {
                        Some(ctx) => ctx,
                        None => match tera::Context::from_value(
                            json!({ "host": host_json, "vars": host.vars }),
                        ) {
                            Ok(c) => base.insert(c),
                            Err(e) => {
                                diags.push(format!(
                                    "{}: cannot build template context: {e}",
                                    decl.origin
                                ));
                                continue;
                            }
                        },
                    };
                    ctx.insert(
                        "file",
                        &json!({
                            "path": decl.path.as_str(),
                            "role": decl.role,
                            "mode": decl.mode.to_string(),
                            "owner": decl.owner.0,
                            "group": decl.group.0,
                        }),
                    );
                    let ctx = &*ctx;
                    let limit = self.limits.file.min(
                        self.limits
                            .total
                            .saturating_sub(total.load(Ordering::Relaxed)),
                    );
                    let mut out = LimitedWriter::new(limit);
                    guard::reset_depth();
                    // Tera's own arithmetic can panic on a template's
                    // numbers (`i64::MIN % -1`): that is this template's
                    // error, not a crash of every sync.
                    let rendered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        self.tera.render_to(name, ctx, &mut out)
                    }));
                    let Ok(rendered) = rendered else {
                        diags.push(format!(
                            "{} ({}): the template engine failed on {name} (an arithmetic overflow, such as the \
                             remainder of the smallest integer by -1?); change the template",
                            decl.path, decl.origin
                        ));
                        continue;
                    };
                    match rendered {
                        Ok(()) => {
                            // The buffer grew by doubling: up to half of it
                            // is slack, kept for the whole sync otherwise
                            // (8 MiB at 10,000 files).
                            let mut buf = out.buf;
                            buf.shrink_to_fit();
                            buf
                        }
                        Err(_) if out.exceeded => {
                            if !stop.swap(true, Ordering::Relaxed) {
                                diags.push(self.too_large(
                                    decl,
                                    name,
                                    total.load(Ordering::Relaxed),
                                ));
                            }
                            return;
                        }
                        Err(e) => {
                            diags.push(format!(
                                "{} ({}): {}",
                                decl.path,
                                decl.origin,
                                self.render_message(&e)
                            ));
                            continue;
                        }
                    }
                }
            };
            // Kept only if it still fits, atomically: two threads cannot
            // both take what is left, and a file refused takes nothing.
            let len = content.len() as u64;
            let kept = len <= self.limits.file
                && total
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                        t.checked_add(len).filter(|n| *n <= self.limits.total)
                    })
                    .is_ok();
            if !kept {
                let what = match &decl.content {
                    ContentRef::Template(t) | ContentRef::Source(t) => t.clone(),
                    ContentRef::Secret { path, .. } | ContentRef::Generated { from: path, .. } => {
                        path.clone()
                    }
                };
                // The first to cross a limit names its file; another
                // thread stopping at the same moment says nothing.
                if !stop.swap(true, Ordering::Relaxed) {
                    diags.push(self.too_large(decl, &what, total.load(Ordering::Relaxed)));
                }
                return;
            }
            let sensitive = self.secrets.take_used();
            let self_contained = !sensitive
                && match &decl.content {
                    ContentRef::Source(path) => {
                        matches!(snap.entry(path), Some(Entry::File { .. }))
                    }
                    ContentRef::Template(name) => {
                        matches!(snap.entry(name), Some(Entry::File { .. }))
                            && self.uses_only_shared_templates(name)
                    }
                    ContentRef::Generated { .. } => true,
                    ContentRef::Secret { .. } => false,
                };
            let mode = if sensitive && !decl.mode_explicit {
                Mode(0o600)
            } else {
                decl.mode
            };
            files.push((
                index,
                DesiredFile {
                    path: decl.path.clone(),
                    role: decl.role.clone(),
                    content,
                    mode,
                    dir_mode: decl.dir_mode,
                    owner: decl.owner.clone(),
                    group: decl.group.clone(),
                    on_change: decl.on_change.clone(),
                    sensitive,
                    self_contained,
                    reboot: decl.reboot,
                    origin: decl.origin.clone(),
                },
            ));
        }
    }

    /// The error for a file over the per-file limit, or for the file that
    /// crossed the per-sync limit.
    fn too_large(&self, decl: &FileDecl, what: &str, total: u64) -> String {
        if self.limits.total.saturating_sub(total) < self.limits.file {
            format!(
                "{} ({}): {what}: the files of this host add up to more than {} \
                 (max_render_size in agent.toml); rendering stopped here",
                decl.path,
                decl.origin,
                guard::size_str(self.limits.total)
            )
        } else {
            format!(
                "{} ({}): {what}: the content is larger than {} (max_file_size in agent.toml); \
                 a template that loops without end, or a file that does not belong in a \
                 configuration repository?",
                decl.path,
                decl.origin,
                guard::size_str(self.limits.file)
            )
        }
    }

    /// Turns Tera's error chain into one line naming template, line and
    /// variable.
    fn render_message(&self, err: &tera::Error) -> String {
        let chain = error_chain(err);
        // Tera: "Variable `vars.x` not found in context while rendering 'name'"
        for msg in &chain {
            if let Some(rest) = msg.strip_prefix("Variable `") {
                if let Some((var, tail)) = rest.split_once('`') {
                    let template = tail
                        .split('\'')
                        .nth(1)
                        .map(str::to_string)
                        .unwrap_or_default();
                    let line = self.source_line_of(&template, var);
                    let at = match line {
                        Some(l) => format!("{template}:{l}"),
                        None => template,
                    };
                    return format!(
                        "{at}: undefined variable `{var}` (define it under [vars] in driftless.toml, the role or the host file, or guard it with `{{% if {var} is defined %}}`)"
                    );
                }
            }
        }
        // Tera names no line for an unknown filter, test or function: find
        // the first use in the template's source.
        let rendering = chain.iter().find_map(|m| {
            m.strip_prefix("Failed to render '")
                .and_then(|r| r.split_once('\''))
                .map(|(t, _)| t.to_string())
        });
        for msg in &chain {
            for (kind, patterns) in [
                ("Filter", &["|{}", "| {}"][..]),
                ("Test", &["is {}", "is not {}"][..]),
                ("Function", &["{}("][..]),
            ] {
                let Some(name) = msg
                    .strip_prefix(&format!("{kind} '"))
                    .and_then(|r| r.strip_suffix("' not found"))
                else {
                    continue;
                };
                let Some(template) = &rendering else { continue };
                let line = self.sources.get(template).and_then(|src| {
                    src.lines().position(|l| {
                        patterns.iter().any(|p| {
                            let pat = p.replace("{}", name);
                            l.match_indices(&pat).any(|(i, _)| {
                                // Whole names only: `| upper` is not `| upperx`.
                                let end = i + pat.len();
                                !l[end..]
                                    .chars()
                                    .next()
                                    .is_some_and(|c| c.is_alphanumeric() || c == '_')
                                    || pat.ends_with('(')
                            })
                        })
                    })
                });
                if let Some(l) = line {
                    return format!(
                        "{template}:{}: {kind} `{name}` does not exist (a typo, or a {} that only another template engine has?)",
                        l + 1,
                        kind.to_lowercase()
                    );
                }
            }
        }
        chain.join(": ")
    }

    /// True when `name` and everything it includes, imports or extends,
    /// transitively, are shared templates (`templates/`, the built-ins).
    fn uses_only_shared_templates(&self, name: &str) -> bool {
        let mut seen = BTreeSet::new();
        let mut todo = vec![name.to_string()];
        while let Some(t) = todo.pop() {
            if !seen.insert(t.clone()) {
                continue;
            }
            let Some(source) = self.sources.get(&t) else {
                return false;
            };
            // A text that names a role template anywhere may use one, even
            // where the tag scan does not see it (see `may_batch`).
            if source.contains("roles/") {
                return false;
            }
            let Some(refs) = template_refs(source) else {
                return false;
            };
            for r in refs {
                if !is_shared_template(&r) {
                    return false;
                }
                todo.push(r);
            }
        }
        true
    }

    fn source_line_of(&self, template: &str, var: &str) -> Option<usize> {
        let source = self.sources.get(template)?;
        source.lines().position(|l| l.contains(var)).map(|i| i + 1)
    }
}

/// Role templates parsed and rendered together by [`render_host`].
///
/// Tera's parsed form of a template is about ten times its text: at
/// 10,000 role templates one instance of them all was most of a cold
/// sync's 200 MB peak. Parsed a batch at a time, each batch rendered and
/// dropped before the next is parsed, the peak holds one batch per
/// worker (`RENDER_WORKERS`). (10,000 templates, peak RSS: 1,024 on one
/// worker 118 MB, 512 on two 77 MB, 256 on two 64 MB, each as fast as
/// the one before; the fixed cost of a batch, the shared templates parsed
/// again, is small at this size.)
pub const RENDER_BATCH: usize = 256;

/// Renders every file of `host`, as [`Renderer::new`] and
/// [`Renderer::render`] do (the same files and bytes; the same parse
/// errors; the same render errors, in batch order, those of files that
/// are not role templates last; past the per-sync size limit, the file
/// named is one whose bytes crossed it, and errors the other worker met
/// meanwhile are reported too), but
/// with the role templates parsed and rendered [`RENDER_BATCH`] at a time
/// when there are more than that, so that their parsed forms are never
/// all held at once. Batches are possible when no role template (and no
/// shared one) includes, imports or extends a role template: each batch
/// is then whole with the shared templates beside it. Otherwise, or when
/// a template's references cannot be read, everything is parsed at once.
pub fn render_host(
    snap: &Snapshot,
    host: &HostConfig,
    facts: &Json,
    secrets: Arc<SecretResolver>,
    limits: Limits,
) -> Result<Desired, Diagnostics> {
    render_host_in(snap, host, facts, secrets, limits, RENDER_BATCH)
}

fn render_host_in(
    snap: &Snapshot,
    host: &HostConfig,
    facts: &Json,
    secrets: Arc<SecretResolver>,
    limits: Limits,
    batch: usize,
) -> Result<Desired, Diagnostics> {
    let whole = |secrets| {
        Renderer::new(snap, &[host], secrets)?
            .with_limits(limits)
            .render(snap, host, facts)
    };
    let Some((shared, batches)) = batches(snap, host, batch) else {
        return whole(secrets);
    };
    let redact = secrets.clone();
    match on_big_stack(|| {
        render_batches(snap, host, facts, secrets.clone(), limits, &shared, batches)
    }) {
        Some(rendered) => rendered.map_err(|d| d.map(|m| redact.redact(&m))),
        // A template uses a role template: all of them at once.
        None => whole(redact),
    }
}

/// The shared templates: every file and link under `templates/`.
fn shared_names(snap: &Snapshot) -> BTreeSet<String> {
    snap.walk("templates")
        .filter(|(_, entry)| matches!(entry, Entry::File { .. } | Entry::Symlink { .. }))
        .map(|(path, _)| path.to_string())
        .collect()
}

/// Adds to `names` the templates `host` renders with: every `*.tera`
/// under its roles' `files/` and every `template =` of its files; with
/// `only`, just the `template =` of those files.
fn host_template_names(
    snap: &Snapshot,
    host: &HostConfig,
    only: Option<&BTreeSet<TargetPath>>,
    names: &mut BTreeSet<String>,
) {
    for role in host.roles.iter().filter(|_| only.is_none()) {
        for (path, _) in snap.walk(&format!("roles/{role}/files")) {
            if path.ends_with(".tera") {
                names.insert(path.to_string());
            }
        }
    }
    let wanted = |f: &&FileDecl| only.is_none_or(|o| o.contains(&f.path));
    for f in host.files.iter().filter(wanted) {
        if let ContentRef::Template(t) = &f.content {
            names.insert(t.clone());
        }
    }
}

/// The shared templates and the role templates of `host` in batches of
/// `batch`, or `None` when one batch would hold them all. Whether they
/// can be batched is found batch by batch, from the texts read for it
/// (reading them all first would read every template twice).
fn batches(
    snap: &Snapshot,
    host: &HostConfig,
    batch: usize,
) -> Option<(Vec<String>, Vec<Vec<String>>)> {
    let shared = shared_names(snap);
    let mut own = BTreeSet::new();
    host_template_names(snap, host, None, &mut own);
    own.retain(|t| !shared.contains(t));
    if own.len() <= batch {
        return None;
    }
    let own: Vec<String> = own.into_iter().collect();
    Some((
        shared.into_iter().collect(),
        own.chunks(batch).map(<[String]>::to_vec).collect(),
    ))
}

/// [`render_host_in`] with batches, before redaction; `None` as soon as a
/// batch's texts show a template that includes, imports or extends a role
/// template (or one whose references cannot be read): they must then be
/// parsed all at once. A batch that does not parse is reported and the
/// rest are still parsed (every parse error is reported, as one instance
/// reports them) but no longer rendered; then only parse errors are
/// returned, as [`Renderer::new`] returns them.
///
/// With a second core, two workers take batches in turn, each parsing and
/// rendering its own (one instance parses a batch on one thread: both
/// cores stay busy through the render too, which one instance split in
/// two halves for the parse left to one). Diagnostics are put back in
/// batch order, so they do not depend on which worker was faster; only
/// the file named when the files of a host add up to more than
/// `max_render_size` can differ (it is the one whose bytes crossed it).
#[allow(clippy::too_many_arguments)]
fn render_batches(
    snap: &Snapshot,
    host: &HostConfig,
    facts: &Json,
    secrets: Arc<SecretResolver>,
    limits: Limits,
    shared: &[String],
    batches: Vec<Vec<String>>,
) -> Option<Result<Desired, Diagnostics>> {
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    let host_json = host_json(host, facts);
    let bar = crate::progress::bar(host.files.len() as u64, "rendering");
    let progress = RenderProgress {
        total: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        bar: &bar,
    };
    let next = AtomicUsize::new(0);
    let unbatchable = AtomicBool::new(false);
    let parse_failed = AtomicBool::new(false);
    let last = batches.len().saturating_sub(1);
    let mut shared_diags = Diagnostics::default();
    let shared_sources = read_sources(snap, shared.iter().cloned(), &mut shared_diags);
    let worker = || {
        let mut out = WorkerOutput::default();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(own) = batches.get(i) else { break };
            if unbatchable.load(Ordering::Relaxed) {
                break;
            }
            let mine: BTreeSet<&str> = own.iter().map(String::as_str).collect();
            // The shared templates as read once for all batches (a
            // working directory edited meanwhile cannot give two batches
            // two versions of one).
            let mut read_diags = shared_diags.clone();
            let mut sources = shared_sources.clone();
            sources.extend(read_named(snap, own.iter().cloned(), &mut read_diags));
            let batchable = sources.iter().all(|(_, text)| may_batch(text));
            if !batchable {
                unbatchable.store(true, Ordering::Relaxed);
                break;
            }
            let renderer =
                match Renderer::from_sources_on_this_thread(sources, secrets.clone(), read_diags) {
                    Ok(r) => r.with_limits(limits),
                    Err(d) => {
                        parse_failed.store(true, Ordering::Relaxed);
                        out.parse_diags.push((i, d));
                        continue;
                    }
                };
            if parse_failed.load(Ordering::Relaxed) || progress.stop.load(Ordering::Relaxed) {
                continue;
            }
            // Each file rendered by the batch holding its template; the
            // files that are not templates by the last batch.
            let select = |d: &FileDecl| match &d.content {
                ContentRef::Template(t) => {
                    mine.contains(t.as_str()) || (i == last && shared.contains(t))
                }
                _ => i == last,
            };
            let mut diags = Diagnostics::default();
            renderer.render_files(
                snap,
                host,
                &host_json,
                &select,
                &progress,
                &mut out.files,
                &mut diags,
            );
            out.render_diags.push((i, diags));
        }
        out
    };
    let workers = crate::cpus::cpus().min(RENDER_WORKERS);
    let mut outputs = vec![];
    std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..workers)
            .filter_map(|_| {
                std::thread::Builder::new()
                    .name("render".into())
                    .stack_size(guard::RENDER_STACK)
                    .spawn_scoped(scope, worker)
                    .ok()
            })
            .collect();
        outputs.push(worker());
        for h in helpers {
            match h.join() {
                Ok(out) => outputs.push(out),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    });
    if unbatchable.load(Ordering::Relaxed) {
        return None;
    }
    let mut files = Vec::with_capacity(host.files.len());
    let mut parse_diags: Vec<(usize, Diagnostics)> = Vec::new();
    let mut render_diags: Vec<(usize, Diagnostics)> = Vec::new();
    for out in outputs {
        files.extend(out.files);
        parse_diags.extend(out.parse_diags);
        render_diags.extend(out.render_diags);
    }
    if !parse_diags.is_empty() {
        parse_diags.sort_by_key(|(i, _)| *i);
        let mut seen: std::collections::HashSet<&String> = Default::default();
        let mut d = Diagnostics::default();
        for m in parse_diags.iter().flat_map(|(_, d)| d.iter()) {
            // A broken shared template breaks every batch: named once.
            if seen.insert(m) {
                d.push(m.clone());
            }
        }
        return Some(Err(d));
    }
    render_diags.sort_by_key(|(i, _)| *i);
    let mut diags = Diagnostics::default();
    for (_, d) in render_diags {
        diags.extend(d);
    }
    if !diags.is_empty() {
        return Some(Err(diags));
    }
    Some(Ok(desired(host, files)))
}

/// Whether a template may be parsed without the role templates: it
/// names none. Tera takes a template's name only as a string literal
/// (`include`, `import`, `extends`), and a role template's name starts
/// with `roles/`, so a text without `roles/` anywhere cannot use one,
/// however its tags are written; the tag scan of [`template_refs`] alone
/// could be misled (a `{%` inside a comment or a string hides the tag
/// after it). A text that merely mentions `roles/` is parsed with all the
/// others: slower, never wrong.
fn may_batch(text: &str) -> bool {
    !text.contains("roles/")
        && template_refs(text).is_some_and(|refs| refs.iter().all(|r| is_shared_template(r)))
}

/// How many threads parse and render batches (each holds one batch's
/// parsed templates).
const RENDER_WORKERS: usize = 2;

/// What one worker of [`render_batches`] did, by batch index.
#[derive(Default)]
struct WorkerOutput {
    files: Vec<(usize, DesiredFile)>,
    parse_diags: Vec<(usize, Diagnostics)>,
    render_diags: Vec<(usize, Diagnostics)>,
}

/// The texts of the built-in templates and of `names` (read without
/// keeping them in the snapshot: the renderer keeps its own copy); what
/// cannot be read or is not UTF-8 goes to `diags`, a name that is not
/// there is left out (rendering it then names it).
fn read_sources(
    snap: &Snapshot,
    names: impl IntoIterator<Item = String>,
    diags: &mut Diagnostics,
) -> Vec<(String, String)> {
    let mut sources: Vec<(String, String)> = BUILTIN_TEMPLATES
        .iter()
        .map(|(n, s)| (n.to_string(), s.to_string()))
        .collect();
    sources.extend(read_named(snap, names, diags));
    sources
}

/// [`read_sources`] without the built-in templates.
fn read_named(
    snap: &Snapshot,
    names: impl IntoIterator<Item = String>,
    diags: &mut Diagnostics,
) -> Vec<(String, String)> {
    let mut sources = Vec::new();
    for name in names {
        match snap.read_uncached(&name) {
            Ok(Some(bytes)) => match String::from_utf8(bytes.into_owned()) {
                Ok(text) => sources.push((name, text)),
                Err(_) => diags.push(format!(
                    "{name}: a template must be UTF-8 text; use `source =` for binary files"
                )),
            },
            Ok(None) => {}
            Err(e) => diags.push(format!("{e:#}")),
        }
    }
    sources
}

/// How far one host's rendering got, shared by the threads rendering it:
/// the bytes rendered (for the per-sync limit, reserved before a file is
/// kept, so that together they never keep more) and the progress bar.
struct RenderProgress<'a> {
    total: std::sync::atomic::AtomicU64,
    /// Set when a limit was crossed: no file is rendered after it.
    stop: std::sync::atomic::AtomicBool,
    bar: &'a crate::progress::Bar,
}

/// The `host` every template sees.
fn host_json(host: &HostConfig, facts: &Json) -> Json {
    json!({
        "name": host.name,
        "labels": host.labels,
        "roles": host.roles,
        "facts": facts,
    })
}

/// The desired state of `host` with its rendered `files` (in declaration
/// order once sorted by their index).
fn desired(host: &HostConfig, mut files: Vec<(usize, DesiredFile)>) -> Desired {
    files.sort_unstable_by_key(|(i, _)| *i);
    Desired {
        host: host.name.clone(),
        files: files.into_iter().map(|(_, f)| f).collect(),
        checks: host.checks.clone(),
        units: host.units.clone(),
        hooks: host.hooks.clone(),
        links: host.links.clone(),
        absent: host.absent.clone(),
        dirs: host.dirs.clone(),
        accounts: host.accounts.clone(),
        packages: host.packages.clone(),
    }
}

fn is_shared_template(name: &str) -> bool {
    name.starts_with("templates/") || BUILTIN_TEMPLATES.iter().any(|(n, _)| *n == name)
}

/// The template names a template's `include`, `import` and `extends` tags
/// name, or `None` when a tag names one in a way this scan does not
/// understand. Conservative: a tag inside `{% raw %}` counts too.
pub fn template_refs(source: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let after = &rest[start + 2..];
        let end = after.find("%}")?;
        let tag = after[..end].trim_matches(|c: char| c == '-' || c.is_whitespace());
        let keyword = tag.split_whitespace().next().unwrap_or("");
        if matches!(keyword, "include" | "import" | "extends") {
            let names = quoted_strings(&tag[keyword.len()..])?;
            if names.is_empty() {
                return None;
            }
            out.extend(names);
        }
        rest = &after[end + 2..];
    }
    Some(out)
}

/// The "..." and '...' literals in a tag; `None` on an unterminated one.
fn quoted_strings(text: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        if c == '"' || c == '\'' || c == '`' {
            let close = text[i + 1..].find(c)?;
            out.push(text[i + 1..i + 1 + close].to_string());
            // Skip past the literal.
            for _ in 0..text[i + 1..i + 1 + close].chars().count() + 1 {
                chars.next();
            }
        }
    }
    Some(out)
}

/// Below this many role templates, one thread parses them all.
const PARALLEL_PARSE_MIN: usize = 64;

/// Parses every template into one Tera instance.
///
/// Tera's parser is the most expensive stage of a cold sync (about 150 µs
/// per template of a few dozen lines, more than rendering it), so with many
/// role templates and a second core the role templates are split in two
/// halves parsed on two threads, each beside the shared ones (`templates/`
/// and the built-in macros), and the halves are merged. A role template
/// that extends or imports a template of the other half fails to parse
/// alone; then everything is parsed again on one thread, which is always
/// correct.
fn parse(sources: &[(String, String)]) -> tera::Result<Tera> {
    let (own, shared): (Vec<_>, Vec<_>) =
        sources.iter().partition(|(n, _)| n.starts_with("roles/"));
    let cores = crate::cpus::cpus();
    if own.len() >= PARALLEL_PARSE_MIN && cores > 1 {
        let (a, b) = own.split_at(own.len() / 2);
        let (first, second) = std::thread::scope(|scope| {
            let other = std::thread::Builder::new()
                .stack_size(guard::RENDER_STACK)
                .spawn_scoped(scope, || instance(shared.iter().chain(b).copied()));
            let mine = instance(shared.iter().chain(a).copied());
            (mine, other.map(|h| h.join()))
        });
        if let (Ok(mut first), Ok(Ok(Ok(mut second)))) = (first, second) {
            // Moved, not `Tera::extend`ed: that clones every template of
            // the other half while the other half is still alive, and at
            // 10,000 role templates that copy made the parse the peak of a
            // cold sync's memory. The shared templates are in both
            // halves; the first half's copies stay. Each half resolved its
            // own imports already (one importing from the other failed
            // above and takes the one-thread path).
            for (name, template) in second.templates.drain() {
                first.templates.entry(name).or_insert(template);
            }
            drop(second);
            if first.build_inheritance_chains().is_ok() {
                return Ok(first);
            }
        }
    }
    instance(sources.iter())
}

fn instance<'a>(sources: impl Iterator<Item = &'a (String, String)>) -> tera::Result<Tera> {
    let mut tera = Tera::default();
    tera.add_raw_templates(sources.map(|(n, t)| (n.as_str(), t.as_str())))?;
    Ok(tera)
}

/// Every broken template, not just the first: Tera stops at the first, so
/// drop it, note it, and parse the rest again.
fn parse_diagnostics(sources: &[(String, String)]) -> Vec<String> {
    let mut diags = Vec::new();
    let mut remaining: Vec<&(String, String)> = sources.iter().collect();
    loop {
        match instance(remaining.iter().copied()) {
            Ok(_) => break,
            Err(e) => {
                let msg = error_chain(&e).join(": ");
                let culprit = remaining.iter().position(|(n, _)| {
                    msg.contains(&format!("'{n}'")) || msg.contains(&format!("`{n}`"))
                });
                diags.push(msg);
                match culprit {
                    Some(i) => {
                        remaining.remove(i);
                    }
                    None => break,
                }
            }
        }
    }
    diags
}

fn error_chain(err: &tera::Error) -> Vec<String> {
    let mut out = vec![err.to_string()];
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(err);
    while let Some(e) = cur {
        out.push(e.to_string());
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod refs_tests {
    use super::template_refs;

    #[test]
    fn include_import_and_extends_names_are_found_in_any_spelling() {
        let t = r#"{% extends "templates/base.tera" %}
{%- import 'templates/m.tera' as m -%}
{% include ["roles/a/files/x.tera", "templates/y.tera"] ignore missing %}
{% if x %}{{ x }}{% endif %}"#;
        assert_eq!(
            template_refs(t).unwrap(),
            vec![
                "templates/base.tera",
                "templates/m.tera",
                "roles/a/files/x.tera",
                "templates/y.tera"
            ]
        );
        assert_eq!(
            template_refs("plain {{ text }}").unwrap(),
            Vec::<String>::new()
        );
    }

    /// A tag the scan cannot read must make the caller assume the worst.
    #[test]
    fn unreadable_tags_give_none() {
        assert_eq!(template_refs("{% include some_variable %}"), None);
        assert_eq!(template_refs("{% include \"unterminated %}"), None);
        assert_eq!(template_refs("{% include \"a.tera\" "), None);
    }
}

#[cfg(test)]
mod parse_tests {
    use super::{instance, parse, PARALLEL_PARSE_MIN};

    fn render_all(tera: &tera::Tera, names: &[String]) -> Vec<String> {
        let mut ctx = tera::Context::new();
        ctx.insert("n", &7);
        names
            .iter()
            .map(|n| {
                tera.render(n, &ctx)
                    .unwrap_or_else(|e| format!("error: {e}"))
            })
            .collect()
    }

    /// Role templates that extend and import shared templates, and (in
    /// the second set) one that imports macros from a role template of the
    /// other half: the two-thread parse with its merge must give exactly
    /// what one Tera instance of everything gives.
    #[test]
    fn the_split_parse_renders_like_one_instance() {
        for cross_half in [false, true] {
            let mut sources = vec![
                (
                    "templates/base.tera".to_string(),
                    "base[{% block body %}{% endblock %}]".to_string(),
                ),
                (
                    "templates/m.tera".to_string(),
                    "{% macro twice(x) %}{{ x }}{{ x }}{% endmacro %}".to_string(),
                ),
            ];
            let count = PARALLEL_PARSE_MIN * 2;
            for i in 0..count {
                let body = match i % 3 {
                    0 => format!(
                        "{{% extends \"templates/base.tera\" %}}{{% block body %}}{i}:{{{{ n }}}}{{% endblock %}}"
                    ),
                    1 => format!(
                        "{{% import \"templates/m.tera\" as m %}}{i}:{{{{ m::twice(x=n) }}}}"
                    ),
                    _ => format!("{i}:{{{{ n * 2 }}}}"),
                };
                sources.push((format!("roles/r/files/t{i:03}.tera"), body));
            }
            if cross_half {
                // The first role template imports from the last one: they
                // land in different halves.
                sources.push((
                    "roles/r/files/z-macros.tera".to_string(),
                    "{% macro z(x) %}<{{ x }}>{% endmacro %}".to_string(),
                ));
                sources[2].1 =
                    "{% import \"roles/r/files/z-macros.tera\" as z %}{{ z::z(x=n) }}".to_string();
            }
            let names: Vec<String> = sources.iter().map(|(n, _)| n.clone()).collect();
            let split = parse(&sources).unwrap();
            let whole = instance(sources.iter()).unwrap();
            assert_eq!(split.templates.len(), whole.templates.len());
            let got = render_all(&split, &names);
            assert_eq!(got, render_all(&whole, &names), "cross_half {cross_half}");
            assert!(!got.iter().any(|r| r.starts_with("error")), "{got:?}");
            assert_eq!(got[2], if cross_half { "<7>" } else { "base[0:7]" });
        }
    }
}

#[cfg(test)]
mod batch_tests {
    use super::*;
    use crate::desired::load::{load_host, LoadOptions};

    type Rendered = Result<Vec<(String, Vec<u8>, String, bool, bool)>, Vec<String>>;

    fn repo(files: &[(String, String)]) -> Snapshot {
        let mut s = Snapshot::new();
        for (p, c) in files {
            s.insert_file(p.clone(), c.as_bytes().to_vec(), false);
        }
        s
    }

    /// Two roles of `n` templates each (extending, importing, including a
    /// shared template, or plain), a `source =` file, and an unused role
    /// template.
    fn files(n: usize) -> Vec<(String, String)> {
        let mut f = vec![
            (
                "driftless.toml".to_string(),
                "roles = [\"a\", \"b\"]\n[vars]\nx = 3\n".to_string(),
            ),
            ("hosts/h.toml".into(), String::new()),
            (
                "templates/base.tera".into(),
                "base[{% block body %}{% endblock %}]".into(),
            ),
            (
                "templates/m.tera".into(),
                "{% macro twice(v) %}{{ v }}{{ v }}{% endmacro %}".into(),
            ),
            ("templates/plain.tera".into(), "plain {{ vars.x }}\n".into()),
            (
                "roles/a/files/unused.tera".into(),
                "never {{ rendered }}".into(),
            ),
            ("roles/a/files/raw.bin".into(), "raw bytes\n".into()),
        ];
        for role in ["a", "b"] {
            let mut decls = String::new();
            for i in 0..n {
                let body = match i % 4 {
                    0 => format!(
                        "{{% extends \"templates/base.tera\" %}}{{% block body %}}{role}{i}:{{{{ vars.x }}}}{{% endblock %}}"
                    ),
                    1 => format!(
                        "{{% import \"templates/m.tera\" as m %}}{role}{i}:{{{{ m::twice(v=vars.x) }}}}"
                    ),
                    2 => format!("{{% include \"templates/plain.tera\" %}}{role}{i}"),
                    _ => format!("{role}{i}:{{{{ vars.x * 2 }}}} {{{{ file.path }}}}"),
                };
                f.push((format!("roles/{role}/files/t{i:03}.tera"), body));
                decls.push_str(&format!(
                    "[[files]]\npath = \"/etc/{role}/t{i:03}\"\ntemplate = \"t{i:03}.tera\"\n"
                ));
            }
            if role == "a" {
                decls.push_str("[[files]]\npath = \"/etc/a/raw\"\nsource = \"raw.bin\"\n");
            }
            f.push((format!("roles/{role}/role.toml"), decls));
        }
        f
    }

    fn render(snap: &Snapshot, batch: usize) -> Rendered {
        render_with(snap, batch, SecretResolver::without_keys(snap))
    }

    fn render_with(snap: &Snapshot, batch: usize, secrets: SecretResolver) -> Rendered {
        let host =
            load_host(snap, "h", &opts()).map_err(|d| d.iter().cloned().collect::<Vec<_>>())?;
        let secrets = Arc::new(secrets);
        let facts = json!({"hostname": "h"});
        match render_host_in(snap, &host, &facts, secrets, Limits::default(), batch) {
            Ok(d) => Ok(d
                .files
                .iter()
                .map(|f| {
                    (
                        f.path.to_string(),
                        f.content.clone(),
                        f.mode.to_string(),
                        f.sensitive,
                        f.self_contained,
                    )
                })
                .collect()),
            Err(d) => {
                let mut m: Vec<String> = d.iter().cloned().collect();
                m.sort();
                Err(m)
            }
        }
    }

    fn opts() -> LoadOptions {
        LoadOptions {
            allowed_roots: vec![TargetPath::parse("/etc").unwrap()],
            reserved: Vec::new(),
        }
    }

    fn host_of(snap: &Snapshot) -> HostConfig {
        load_host(snap, "h", &opts()).unwrap()
    }

    #[test]
    fn batches_render_what_one_instance_renders() {
        let snap = repo(&files(9));
        let (shared, batches) = batches(&snap, &host_of(&snap), 4).expect("batched");
        assert_eq!(shared.len(), 3);
        assert_eq!(batches.len(), 5, "19 role templates in batches of 4");
        let whole = render(&snap, usize::MAX);
        let got = render(&snap, 4);
        assert_eq!(got, whole);
        let got = got.unwrap();
        assert_eq!(got.len(), 19);
        // In the configuration's order (by path), as one instance gives it.
        assert_eq!(got[0].0, "/etc/a/raw");
        assert_eq!(
            got.iter().find(|f| f.0 == "/etc/a/t000").unwrap().1,
            b"base[a0:3]"
        );
        assert_eq!(
            got.iter().find(|f| f.0 == "/etc/a/raw").unwrap().1,
            b"raw bytes\n"
        );
        assert_eq!(
            got.iter().find(|f| f.0 == "/etc/a/t002").unwrap().1,
            b"plain 3\na2"
        );
    }

    /// The templates of a render share one context and only `file` is
    /// replaced for each: each sees its own `file`, and what one template
    /// assigns (`set_global`, shadowing `vars`, `file` or `host`) is not
    /// seen by the next, in one instance or in batches.
    #[test]
    fn templates_sharing_a_context_see_their_own_file_and_not_each_others_assignments() {
        let mut f = vec![
            (
                "driftless.toml".to_string(),
                "roles = [\"a\"]\n[vars]\nx = 3\n".to_string(),
            ),
            ("hosts/h.toml".into(), String::new()),
        ];
        let mut decls = String::new();
        for i in 0..6 {
            let body = if i % 2 == 0 {
                "{% set_global vars = 7 %}{% set_global file = 8 %}{% set host = 9 %}{{ file }} {{ host }}".to_string()
            } else {
                "{{ file.path }} {{ file.mode }} {{ vars.x }} {{ host.name }}".to_string()
            };
            f.push((format!("roles/a/files/t{i}.tera"), body));
            let mode = if i == 3 { "mode = \"0600\"\n" } else { "" };
            decls.push_str(&format!(
                "[[files]]\npath = \"/etc/t{i}\"\ntemplate = \"t{i}.tera\"\n{mode}"
            ));
        }
        f.push(("roles/a/role.toml".into(), decls));
        let snap = repo(&f);
        for batch in [usize::MAX, 2] {
            let got = render(&snap, batch).unwrap();
            let text = |p: &str| {
                String::from_utf8(got.iter().find(|f| f.0 == p).unwrap().1.clone()).unwrap()
            };
            assert_eq!(text("/etc/t0"), "8 9", "batch {batch}");
            assert_eq!(text("/etc/t1"), "/etc/t1 0644 3 h", "batch {batch}");
            assert_eq!(text("/etc/t3"), "/etc/t3 0600 3 h", "batch {batch}");
            assert_eq!(text("/etc/t5"), "/etc/t5 0644 3 h", "batch {batch}");
        }
    }

    #[test]
    fn a_role_template_using_another_role_template_is_parsed_with_all_of_them() {
        let mut f = files(9);
        f.push((
            "roles/b/files/t008.tera".into(),
            "{% include \"roles/a/files/t003.tera\" %}!".into(),
        ));
        let snap = repo(&f);
        let host = host_of(&snap);
        let (shared, batches) = batches(&snap, &host, 4).unwrap();
        let secrets = Arc::new(SecretResolver::without_keys(&snap));
        let facts = json!({});
        let batched = render_batches(
            &snap,
            &host,
            &facts,
            secrets,
            Limits::default(),
            &shared,
            batches,
        );
        assert!(batched.is_none(), "not batchable");
        let got = render(&snap, 4);
        assert_eq!(got, render(&snap, usize::MAX));
        let got = got.unwrap();
        assert_eq!(
            got.iter().find(|f| f.0 == "/etc/b/t008").unwrap().1,
            b"a3:6 /etc/b/t008!"
        );
    }

    #[test]
    fn parse_errors_in_several_batches_are_all_reported_and_nothing_is_rendered() {
        let mut f = files(9);
        f.push(("roles/a/files/t000.tera".into(), "{% if %}".into()));
        f.push(("roles/b/files/t008.tera".into(), "{{ unclosed".into()));
        let snap = repo(&f);
        let whole = render(&snap, usize::MAX).unwrap_err();
        let got = render(&snap, 4).unwrap_err();
        assert_eq!(got, whole);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(
            got.iter().any(|m| m.contains("roles/a/files/t000.tera")),
            "{got:?}"
        );
        assert!(
            got.iter().any(|m| m.contains("roles/b/files/t008.tera")),
            "{got:?}"
        );
    }

    #[test]
    fn a_broken_shared_template_is_reported_once() {
        let mut f = files(9);
        f.push(("templates/m.tera".into(), "{% macro %}".into()));
        let snap = repo(&f);
        let got = render(&snap, 4).unwrap_err();
        assert_eq!(got, render(&snap, usize::MAX).unwrap_err());
        assert_eq!(
            got.iter()
                .filter(|m| m.starts_with("Failed to parse 'templates/m.tera'"))
                .count(),
            1,
            "{got:?}"
        );
    }

    #[test]
    fn render_errors_in_several_batches_are_all_reported() {
        let mut f = files(9);
        f.push(("roles/a/files/t001.tera".into(), "{{ vars.nope }}".into()));
        f.push((
            "roles/b/files/t007.tera".into(),
            "{{ vars.x | nofilter }}".into(),
        ));
        let snap = repo(&f);
        let got = render(&snap, 4).unwrap_err();
        assert_eq!(got, render(&snap, usize::MAX).unwrap_err());
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got.iter().any(|m| m.contains("vars.nope")), "{got:?}");
        assert!(got.iter().any(|m| m.contains("nofilter")), "{got:?}");
    }

    /// Two threads render side by side: a file is sensitive exactly when
    /// a secret was read while it rendered, never because the other
    /// thread read one meanwhile (one flag for the resolver would have
    /// mixed them up, either way).
    #[test]
    fn each_file_is_sensitive_exactly_when_its_own_template_read_a_secret() {
        let mut f = files(40);
        f.push((
            "secrets/s.yaml".into(),
            "k: ENC[...]\nsops:\n  age: []\n".into(),
        ));
        for role in ["a", "b"] {
            for i in (0..40).step_by(3) {
                f.push((
                    format!("roles/{role}/files/t{i:03}.tera"),
                    "{{ secret(file=\"secrets/s.yaml\", key=\"k\") }}".into(),
                ));
            }
        }
        let snap = repo(&f);
        let whole = render_with(&snap, usize::MAX, SecretResolver::placeholders(&snap)).unwrap();
        let expected: Vec<String> = ["a", "b"]
            .iter()
            .flat_map(|r| (0..40).step_by(3).map(move |i| format!("/etc/{r}/t{i:03}")))
            .collect();
        let sensitive = |got: &[(String, Vec<u8>, String, bool, bool)]| {
            let mut s: Vec<String> = got.iter().filter(|f| f.3).map(|f| f.0.clone()).collect();
            s.sort();
            s
        };
        assert_eq!(sensitive(&whole), expected);
        for _ in 0..20 {
            let got = render_with(&snap, 2, SecretResolver::placeholders(&snap)).unwrap();
            assert_eq!(sensitive(&got), expected);
            assert_eq!(got, whole);
        }
    }

    /// A `{%` inside a comment or a string made the tag scan pair it with
    /// the next `%}` and miss the include after it: batched, that file was
    /// rendered without the role template it includes (`ignore missing`)
    /// or refused though one instance renders it.
    #[test]
    fn a_reference_hidden_from_the_tag_scan_still_parses_everything_at_once() {
        for hidden in [
            "{# a {% b #}{% include [\"roles/a/files/t003.tera\"] ignore missing %}!",
            "{{ \"{%\" }}{% include \"roles/a/files/t003.tera\" %}!",
        ] {
            assert_eq!(template_refs(hidden), Some(vec![]), "the scan is fooled");
            let mut f = files(9);
            f.push(("roles/b/files/t008.tera".into(), hidden.into()));
            let snap = repo(&f);
            let got = render(&snap, 4);
            assert_eq!(got, render(&snap, usize::MAX));
            let got = got.unwrap();
            let t008 = &got.iter().find(|f| f.0 == "/etc/b/t008").unwrap().1;
            assert!(
                String::from_utf8_lossy(t008).contains("a3:6 /etc/b/t008"),
                "{}",
                String::from_utf8_lossy(t008)
            );
        }
    }

    /// The same hidden include made the file count as depending on its own
    /// template only (`self_contained`): a later commit changing the role
    /// template it includes would not have rendered it again.
    #[test]
    fn a_hidden_reference_to_a_role_template_is_not_self_contained() {
        let mut f = files(3);
        f.push((
            "roles/b/files/t002.tera".into(),
            "{# a {% b #}{% include [\"roles/a/files/t001.tera\"] ignore missing %}!".into(),
        ));
        let snap = repo(&f);
        let got = render(&snap, usize::MAX).unwrap();
        let t002 = got.iter().find(|f| f.0 == "/etc/b/t002").unwrap();
        assert!(!t002.4, "self_contained");
        assert!(got.iter().find(|f| f.0 == "/etc/b/t000").unwrap().4);
        // Repairing it alone (the renderer of the files in `only`) parses
        // what it includes too, or says it cannot tell.
        let host = host_of(&snap);
        let only: BTreeSet<TargetPath> = [TargetPath::parse("/etc/b/t002").unwrap()].into();
        let secrets = Arc::new(SecretResolver::without_keys(&snap));
        let err = Renderer::for_files(&snap, &host, &only, secrets)
            .err()
            .unwrap();
        assert!(
            err.iter()
                .any(|m| m.contains("cannot tell which templates it uses")),
            "{err:?}"
        );
    }
}
