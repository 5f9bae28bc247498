//! The `[rollout]` section of `driftless.toml`, as written and as
//! validated.
//!
//! ```toml
//! [rollout]
//! max_concurrent = 2      # hosts of one group applying at once (default 1)
//! max_failures = 1        # reverts of a commit that halt its rollout (default 1)
//!
//! [[rollout.waves]]
//! name = "canary"
//! labels = { canary = "yes" }   # hosts whose [fleet] labels all match
//! min_healthy = 1               # healthy reports needed (default 1)
//! bake = "10m"                  # then this long before the next wave
//!
//! [[rollout.waves]]
//! name = "early"
//! percent = 10                  # the first 10% of the host-name hash space
//!
//! [[rollout.waves]]
//! name = "rest"
//! percent = 100                 # everyone else; the last wave must say so
//!
//! [[rollout.windows]]           # when new commits may be applied
//! groups = ["db"]               # default: every group
//! calendar = "Mon..Fri 22:00"   # opens: systemd OnCalendar= syntax, the host's local time
//! length = "8h"                 # stays open this long
//! ```
//!
//! The policy is read from the commit being rolled out: a commit carries
//! the rules of its own rollout, so every host judges it by the same ones.
//! Validation is strict (unknown keys, overlapping or unordered
//! percentages, a wave that can never hold a host are errors naming the
//! file, the key and its line), because a policy that silently means
//! something else decides what a whole fleet applies.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::calendar::{Calendar, Window};
use crate::desired::load::REPO_FILE;
use crate::desired::snapshot::Snapshot;
use crate::desired::toml_file;

/// `[rollout]` exactly as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutFile {
    /// Hosts of one `[fleet] group` that may apply a new commit at once.
    #[serde(default)]
    pub max_concurrent: Option<toml::Spanned<i64>>,
    /// Hosts that reverted a commit before its rollout halts fleet-wide.
    #[serde(default)]
    pub max_failures: Option<toml::Spanned<i64>>,
    /// In order: the first wave a host matches is its wave.
    #[serde(default)]
    pub waves: Vec<toml::Spanned<WaveFile>>,
    /// Maintenance windows: outside them, hosts of the groups they name
    /// do not apply a new commit.
    #[serde(default)]
    pub windows: Vec<toml::Spanned<WindowFile>>,
}

/// One `[[rollout.windows]]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowFile {
    /// The `[fleet] group`s it applies to; every group when absent.
    #[serde(default)]
    pub groups: Option<Vec<String>>,
    /// When it opens, in systemd's `OnCalendar=` syntax.
    pub calendar: toml::Spanned<String>,
    /// How long it stays open, e.g. "8h".
    pub length: toml::Spanned<String>,
}

/// One `[[rollout.waves]]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaveFile {
    pub name: String,
    /// Hosts whose `[fleet] labels` hold every one of these pairs.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// Hosts whose name hashes below this share of the hash space
    /// (cumulative: `percent = 10` then `percent = 30` is 10% then 20%).
    #[serde(default)]
    pub percent: Option<toml::Spanned<i64>>,
    /// How long after the `min_healthy`-th healthy report of this wave the
    /// next wave may start, e.g. "10m".
    #[serde(default)]
    pub bake: Option<toml::Spanned<String>>,
    /// Healthy reports of this wave (hosts that applied the commit and
    /// pass their checks) needed before the next wave starts.
    #[serde(default)]
    pub min_healthy: Option<toml::Spanned<i64>>,
}

/// Only the `[rollout]` section: the rest of `driftless.toml` is the
/// loader's (which checks it strictly, and this section with it).
#[derive(Debug, Deserialize)]
struct OnlyRollout {
    #[serde(default)]
    rollout: Option<RolloutFile>,
}

/// A validated rollout policy. Serialised into the fleet store so that
/// `driftless fleet status` can explain a rollout without the repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub max_concurrent: u32,
    pub max_failures: u32,
    pub waves: Vec<Wave>,
    /// Absent from the JSON of a policy without windows (as written by
    /// agents before windows existed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<WindowRule>,
}

/// A maintenance window and the groups it holds for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowRule {
    /// Empty: every group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(flatten)]
    pub window: Window,
}

impl WindowRule {
    pub fn holds_for(&self, group: &str) -> bool {
        self.groups.is_empty() || self.groups.iter().any(|g| g == group)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    pub name: String,
    pub select: Select,
    /// Seconds.
    pub bake: u64,
    pub min_healthy: u32,
}

/// Which hosts a wave holds (those no earlier wave took).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Select {
    Labels(BTreeMap<String, String>),
    /// Cumulative upper bound, 1..=100.
    Percent(u32),
}

pub const DEFAULT_MAX_CONCURRENT: u32 = 1;
pub const DEFAULT_MAX_FAILURES: u32 = 1;
pub const DEFAULT_MIN_HEALTHY: u32 = 1;

impl Policy {
    /// With no `[rollout]` section: one wave of everyone, one host of a
    /// group at a time, the first revert halts. A fleet-enabled agent is
    /// never uncoordinated just because the repository says nothing.
    pub fn default_policy() -> Policy {
        Policy {
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            max_failures: DEFAULT_MAX_FAILURES,
            waves: vec![Wave {
                name: "all".into(),
                select: Select::Percent(100),
                bake: 0,
                min_healthy: 0,
            }],
            windows: Vec::new(),
        }
    }
}

/// The rollout policy of a repository snapshot: `Ok(None)` when
/// `driftless.toml` has no `[rollout]` section (or is missing: the loader
/// reports that).
pub fn load(snap: &Snapshot) -> Result<Option<Policy>, String> {
    let bytes = match snap.read(REPO_FILE) {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(None),
        Err(e) => return Err(format!("{e:#}")),
    };
    let text =
        std::str::from_utf8(bytes).map_err(|e| format!("{REPO_FILE}: not valid UTF-8: {e}"))?;
    parse(REPO_FILE, text)
}

/// Parses and validates the `[rollout]` section of `text` (the content of
/// `file`). Every problem is listed, one per line.
pub fn parse(file: &str, text: &str) -> Result<Option<Policy>, String> {
    let only: OnlyRollout = toml_file::parse(file, text)?;
    match only.rollout {
        None => Ok(None),
        Some(r) => validate(file, text, &r).map(Some),
    }
}

/// Semantic checks of a parsed `[rollout]`; errors name the file, the
/// line and the key (`driftless.toml:12: rollout.waves[1].percent: …`).
pub fn validate(file: &str, text: &str, r: &RolloutFile) -> Result<Policy, String> {
    let mut errors: Vec<String> = Vec::new();
    let at = |span: std::ops::Range<usize>| toml_file::line_col(text, span.start).0;
    let count = |errors: &mut Vec<String>,
                 key: &str,
                 v: &Option<toml::Spanned<i64>>,
                 default: u32,
                 min: i64|
     -> u32 {
        match v {
            None => default,
            Some(s) => {
                let n = *s.get_ref();
                match u32::try_from(n) {
                    Ok(n) if i64::from(n) >= min => n,
                    _ => {
                        errors.push(format!(
                            "{file}:{}: {key}: {n} is not allowed; use a whole number from {min} up",
                            at(s.span())
                        ));
                        default
                    }
                }
            }
        }
    };
    let max_concurrent = count(
        &mut errors,
        "rollout.max_concurrent",
        &r.max_concurrent,
        DEFAULT_MAX_CONCURRENT,
        1,
    );
    let max_failures = count(
        &mut errors,
        "rollout.max_failures",
        &r.max_failures,
        DEFAULT_MAX_FAILURES,
        1,
    );
    let mut waves = Vec::new();
    let mut names = BTreeSet::new();
    let mut last_percent: Option<u32> = None;
    let mut seen_everyone = false;
    for (i, spanned) in r.waves.iter().enumerate() {
        let line = at(spanned.span());
        let w = spanned.get_ref();
        let key = format!("rollout.waves[{i}]");
        if seen_everyone {
            errors.push(format!(
                "{file}:{line}: {key} ({:?}): no host can reach this wave: an earlier wave already takes percent = 100; \
                 move it before that wave or remove it",
                w.name
            ));
        }
        if w.name.trim().is_empty() {
            errors.push(format!(
                "{file}:{line}: {key}.name: empty; give the wave a name (it is shown by `driftless fleet status`)"
            ));
        } else if !names.insert(w.name.clone()) {
            errors.push(format!(
                "{file}:{line}: {key}.name: {:?} names two waves; wave names must be unique",
                w.name
            ));
        }
        let select = match (&w.labels, &w.percent) {
            (Some(_), Some(_)) => {
                errors.push(format!(
                    "{file}:{line}: {key} ({:?}): sets both `labels` and `percent`; a wave selects by one of them (use two waves)",
                    w.name
                ));
                continue;
            }
            (None, None) => {
                errors.push(format!(
                    "{file}:{line}: {key} ({:?}): selects no hosts; set `labels = {{ key = \"value\" }}` or `percent = N`",
                    w.name
                ));
                continue;
            }
            (Some(l), None) => {
                if l.is_empty() {
                    errors.push(format!(
                        "{file}:{line}: {key}.labels: empty; an empty match would take every host (write `percent = 100` for that)"
                    ));
                }
                Select::Labels(l.clone())
            }
            (None, Some(p)) => {
                let pline = at(p.span());
                let n = *p.get_ref();
                let n = match u32::try_from(n) {
                    Ok(n) if (1..=100).contains(&n) => n,
                    _ => {
                        errors.push(format!(
                            "{file}:{pline}: {key}.percent: {n} is not a percentage from 1 to 100"
                        ));
                        continue;
                    }
                };
                if let Some(prev) = last_percent.filter(|prev| n <= *prev) {
                    errors.push(format!(
                        "{file}:{pline}: {key}.percent: {n} is not larger than the previous percentage wave's {prev}; \
                         percentages are cumulative (10 then 30 means 10% then the next 20%), so they must increase"
                    ));
                }
                last_percent = Some(n);
                if n == 100 {
                    seen_everyone = true;
                }
                Select::Percent(n)
            }
        };
        let min_healthy = count(
            &mut errors,
            &format!("{key}.min_healthy"),
            &w.min_healthy,
            DEFAULT_MIN_HEALTHY,
            0,
        );
        let bake = match &w.bake {
            None => 0,
            Some(b) => match crate::desired::spec::parse_duration(b.get_ref()) {
                Ok(d) => d.as_secs(),
                Err(e) => {
                    errors.push(format!("{file}:{}: {key}.bake: {e}", at(b.span())));
                    0
                }
            },
        };
        if bake > 0 && min_healthy == 0 {
            errors.push(format!(
                "{file}:{line}: {key}.bake: the bake time counts from the min_healthy-th healthy report, and min_healthy is 0; \
                 set min_healthy to 1 or more, or remove bake"
            ));
        }
        waves.push(Wave {
            name: w.name.clone(),
            select,
            bake,
            min_healthy,
        });
    }
    if r.waves.is_empty() {
        errors.push(format!(
            "{file}: rollout.waves: none; add at least one [[rollout.waves]] (the last with percent = 100)"
        ));
    } else if !seen_everyone {
        let line = r.waves.last().map_or(0, |w| at(w.span()));
        errors.push(format!(
            "{file}:{line}: rollout.waves: no wave takes percent = 100, so some hosts would have no wave and never apply; \
             end with a wave of percent = 100 (everyone else)"
        ));
    }
    let mut windows = Vec::new();
    for (i, spanned) in r.windows.iter().enumerate() {
        let line = at(spanned.span());
        let w = spanned.get_ref();
        let key = format!("rollout.windows[{i}]");
        let groups = w.groups.clone().unwrap_or_default();
        if w.groups.as_ref().is_some_and(|g| g.is_empty()) {
            errors.push(format!(
                "{file}:{line}: {key}.groups: empty, so the window would hold for no group; \
                 name the groups, or remove `groups` for every group"
            ));
        }
        if let Some(g) = groups.iter().find(|g| g.trim().is_empty()) {
            errors.push(format!(
                "{file}:{line}: {key}.groups: {g:?} is not a group name"
            ));
        }
        let calendar = match Calendar::parse(w.calendar.get_ref()) {
            Ok(c) => Some(c),
            Err(e) => {
                errors.push(format!(
                    "{file}:{}: {key}.calendar: {e}",
                    at(w.calendar.span())
                ));
                None
            }
        };
        let length = match crate::desired::spec::parse_duration(w.length.get_ref()) {
            Ok(d) if d.as_secs() >= 1 => Some(d.as_secs()),
            Ok(_) => {
                errors.push(format!(
                    "{file}:{}: {key}.length: {:?} is shorter than a second; give the window a length such as \"8h\"",
                    at(w.length.span()),
                    w.length.get_ref()
                ));
                None
            }
            Err(e) => {
                errors.push(format!("{file}:{}: {key}.length: {e}", at(w.length.span())));
                None
            }
        };
        if let (Some(calendar), Some(length)) = (calendar, length) {
            windows.push(WindowRule {
                groups,
                window: Window { calendar, length },
            });
        }
    }
    if errors.is_empty() {
        Ok(Policy {
            max_concurrent,
            max_failures,
            waves,
            windows,
        })
    } else {
        Err(errors.join("\n"))
    }
}
