//! Validated building blocks of the desired state: target paths, modes,
//! owners, unit actions and checks. Parsing happens once, in the loader;
//! everything downstream works with these types and cannot see a raw,
//! unchecked string.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::model::{CommandCheckSpec, HttpCheckSpec, TcpCheckSpec, UnitCheckSpec};

/// An absolute, normalised path on the managed host: starts with `/`, no
/// empty, `.` or `..` components, no trailing slash, not `/` itself.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TargetPath(String);

impl TargetPath {
    pub fn parse(s: &str) -> Result<Self, String> {
        if !s.starts_with('/') {
            return Err(format!(
                "path {s:?} is not absolute: targets are absolute paths such as \"/etc/motd\""
            ));
        }
        let bytes = s.as_bytes();
        if memchr::memchr(0, bytes).is_some() {
            return Err(format!("path {s:?} contains a NUL byte"));
        }
        if bytes[1..].iter().all(|&b| b == b'/') {
            return Err("path \"/\" cannot be a managed file".into());
        }
        // The components between separators found with `memchr`: every
        // state file read on every sync parses its paths here (10,000 at
        // a time), and a collected `split` was most of that.
        let ends = memchr::memchr_iter(b'/', &bytes[1..])
            .map(|i| i + 1)
            .chain(std::iter::once(bytes.len()));
        let mut start = 1;
        for end in ends {
            let c = &s[start..end];
            start = end + 1;
            match c {
                "" => {
                    return Err(format!(
                        "path {s:?} has an empty component (double or trailing '/')"
                    ))
                }
                "." | ".." => {
                    return Err(format!(
                        "path {s:?} contains {c:?}: write the normalised absolute path"
                    ))
                }
                _ => {}
            }
        }
        Ok(TargetPath(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Path components, without the leading `/`.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0[1..].split('/')
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// True if `self` is `root` or lies below it (component-wise).
    pub fn is_under(&self, root: &TargetPath) -> bool {
        self.0 == root.0
            || (self.0.starts_with(&root.0) && self.0.as_bytes().get(root.0.len()) == Some(&b'/'))
    }
}

/// Looked up by its text (`BTreeMap::range::<str>`): its order, equality
/// and hash are its string's.
impl std::borrow::Borrow<str> for TargetPath {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// For people (logs, plans, errors): see [`shown`]. A repository may not
/// declare such a path, but the host may hold one in a purged directory.
/// Paths are built from [`TargetPath::as_str`].
impl fmt::Display for TargetPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&shown(&self.0))
    }
}

/// `text` as it may be printed: unchanged unless it holds a character a
/// terminal or a log reader would obey ([`unprintable`]); then each such
/// character is escaped (`\n`, `\u{1b}`), and so is every `\` (a name
/// holding a backslash and an `n` must not read as one holding a line
/// break).
pub fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(unprintable) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unprintable(c) || c == '\\' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A control character (C0, DEL, C1) or one that reorders the text shown
/// around it (bidirectional marks, overrides and isolates): printed raw in
/// a log, a plan or an error, these would be obeyed, not shown.
pub fn unprintable(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{200E}'
                | '\u{200F}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2066}'..='\u{2069}'
        )
}

impl TryFrom<String> for TargetPath {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        TargetPath::parse(&s)
    }
}

impl From<TargetPath> for String {
    fn from(p: TargetPath) -> String {
        p.0
    }
}

/// Permission bits, at most `0o7777`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mode(pub u32);

impl Mode {
    pub const DEFAULT_FILE: Mode = Mode(0o644);
    /// Directories driftless creates for a managed file.
    pub const DEFAULT_DIR: Mode = Mode(0o755);

    /// Parses "0644", "644" or "0o644".
    pub fn parse(s: &str) -> Result<Self, String> {
        let digits = s.strip_prefix("0o").unwrap_or(s);
        if digits.is_empty() || digits.len() > 5 {
            return Err(format!("mode {s:?} is not an octal mode like \"0644\""));
        }
        let v = u32::from_str_radix(digits, 8)
            .map_err(|_| format!("mode {s:?} is not an octal mode like \"0644\""))?;
        if v > 0o7777 {
            return Err(format!("mode {s:?} is larger than 07777"));
        }
        Ok(Mode(v))
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

/// A user or group as written in the repo: a name or a numeric id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Principal(pub String);

impl Principal {
    pub fn root() -> Self {
        Principal("root".into())
    }

    /// The numeric id, if the principal was written as a number.
    pub fn numeric(&self) -> Option<u32> {
        self.0.parse().ok()
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What to do to a systemd unit after a change. Ordered by strength: when
/// several files ask for different actions on one unit, the strongest wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnitActionKind {
    Reload,
    ReloadOrRestart,
    TryRestart,
    Restart,
}

impl fmt::Display for UnitActionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UnitActionKind::Reload => "reload",
            UnitActionKind::ReloadOrRestart => "reload-or-restart",
            UnitActionKind::TryRestart => "try-restart",
            UnitActionKind::Restart => "restart",
        })
    }
}

/// Its fields are declared in alphabetical order (the inventory's JSON is
/// then canonical as it serialises, `effects::state::encode_state`); it
/// orders by unit, then action, as it always did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitAction {
    pub action: UnitActionKind,
    pub unit: String,
}

impl Ord for UnitAction {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (&self.unit, self.action).cmp(&(&other.unit, other.action))
    }
}

impl PartialOrd for UnitAction {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Unit name suffixes systemd knows.
const UNIT_SUFFIXES: &[&str] = &[
    "service",
    "socket",
    "device",
    "mount",
    "automount",
    "swap",
    "target",
    "path",
    "timer",
    "slice",
    "scope",
];

/// Checks a unit name: non-empty, a known type suffix, no `/` or spaces.
pub fn validate_unit_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.contains('/') || name.chars().any(char::is_whitespace) {
        return Err(format!("{name:?} is not a valid unit name"));
    }
    let template = match name.split_once('@') {
        Some((stem, rest)) => rest.rsplit_once('.').map(|(_, t)| format!("{stem}@.{t}")),
        None => None,
    };
    if AGENT_UNITS.contains(&name) || template.is_some_and(|t| AGENT_UNITS.contains(&t.as_str())) {
        return Err(format!(
            "{name} is the agent's own unit: a commit cannot stop, restart or reconfigure the agent that applies it (manage it outside the repository)"
        ));
    }
    match name.rsplit_once('.') {
        Some((stem, suffix)) if !stem.is_empty() && UNIT_SUFFIXES.contains(&suffix) => Ok(()),
        _ => Err(format!(
            "unit {name:?} has no unit type suffix: did you mean \"{name}.service\"?"
        )),
    }
}

/// The systemd units driftless ships (`units/`): no role may declare
/// their state, act on them, write them or their drop-ins.
pub const AGENT_UNITS: &[&str] = &[
    "driftless.service",
    "driftless-once.service",
    "driftless.timer",
    "driftless-usb@.service",
];

/// A health check, validated. Executed by the checks effect (issue: systemd
/// and health checks); the core only carries it into the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub role: String,
    pub probe: Probe,
    pub retries: u32,
    #[serde(with = "humantime_serde_compat")]
    pub interval: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// Wait this long before the first attempt (default none): after a
    /// `reload`, a server's old workers can still answer for a moment,
    /// and a check that passes against them proves nothing.
    #[serde(
        with = "humantime_serde_compat",
        default,
        skip_serializing_if = "Duration::is_zero"
    )]
    pub delay: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Probe {
    Http(HttpCheckSpec),
    Tcp(TcpCheckSpec),
    Command(CommandCheckSpec),
    Unit(UnitCheckSpec),
}

impl Probe {
    /// A short human description, used as the default check name.
    pub fn describe(&self) -> String {
        match self {
            Probe::Http(h) => format!("http {} -> {}", h.url, h.status),
            Probe::Tcp(t) => format!("tcp {}", t.address),
            Probe::Command(c) => format!("command {}", c.argv.join(" ")),
            Probe::Unit(u) => format!("unit {} active", u.name),
        }
    }
}

/// When a hook runs: `pre`, before the files of a transaction switch in;
/// `post`, after the unit actions and before the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookWhen {
    Pre,
    Post,
}

impl std::fmt::Display for HookWhen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HookWhen::Pre => "pre",
            HookWhen::Post => "post",
        })
    }
}

/// Which transactions run a hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookRun {
    /// Its role has a change (create, update or remove) in the transaction.
    OnChange,
    /// Every transaction (anything changes).
    Always,
}

/// A validated `[[hooks]]` entry. A hook is a command with effects that
/// driftless cannot see: it is never undone, and never re-run by crash
/// recovery. Its argv and environment are literal strings from the
/// repository (no templating); the environment's values are never shown in
/// plans, logs or history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hook {
    pub role: String,
    pub when: HookWhen,
    pub argv: Vec<String>,
    /// Run as this user (name or uid); `None`: the agent's own user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<Principal>,
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// The environment besides `PATH`: only its names are serialised.
    #[serde(serialize_with = "env_names")]
    pub env: std::collections::BTreeMap<String, String>,
    pub run: HookRun,
    /// Where it was declared: `roles/app/role.toml:12 hooks[0]`.
    pub origin: String,
}

impl Hook {
    /// `pre roles/app: /usr/local/bin/app-migrate --check (user app, 60s)`.
    pub fn describe(&self) -> String {
        let mut extra = Vec::new();
        if let Some(u) = &self.user {
            extra.push(format!("user {}", u.0));
        }
        extra.push(humantime::format_duration(self.timeout).to_string());
        if !self.env.is_empty() {
            let names: Vec<&str> = self.env.keys().map(String::as_str).collect();
            extra.push(format!("env {}", names.join(" ")));
        }
        let argv: Vec<String> = self.argv.iter().map(|a| shown_arg(a)).collect();
        format!(
            "{} roles/{}: {} ({})",
            self.when,
            self.role,
            argv.join(" "),
            extra.join(", ")
        )
    }
}

/// An argument as shown: plain when unambiguous, quoted otherwise (`x; y`
/// is one argument, never a shell's two commands).
fn shown_arg(a: &str) -> String {
    let plain = !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./=:,@%+-".contains(c));
    if plain {
        a.to_string()
    } else {
        format!("{a:?}")
    }
}

fn env_names<S: serde::Serializer>(
    env: &std::collections::BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(env.keys())
}

/// Hooks as the configuration cache (`effects::state::config_cache`)
/// stores them: whole, environment values included, where their own
/// `Serialize` (plans, status, history) names only the variables.
pub mod hooks_in_full {
    use super::{Hook, HookRun, HookWhen, Principal};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::BTreeMap;
    use std::time::Duration;

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Whole {
        role: String,
        when: HookWhen,
        argv: Vec<String>,
        user: Option<Principal>,
        #[serde(with = "super::humantime_serde_compat")]
        timeout: Duration,
        env: BTreeMap<String, String>,
        run: HookRun,
        origin: String,
    }

    pub fn serialize<S: Serializer>(hooks: &[Hook], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(hooks.iter().map(|h| Whole {
            role: h.role.clone(),
            when: h.when,
            argv: h.argv.clone(),
            user: h.user.clone(),
            timeout: h.timeout,
            env: h.env.clone(),
            run: h.run,
            origin: h.origin.clone(),
        }))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Hook>, D::Error> {
        Ok(Vec::<Whole>::deserialize(d)?
            .into_iter()
            .map(|w| Hook {
                role: w.role,
                when: w.when,
                argv: w.argv,
                user: w.user,
                timeout: w.timeout,
                env: w.env,
                run: w.run,
                origin: w.origin,
            })
            .collect())
    }
}

/// Parses "5s", "250ms", "1m".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like \"5s\" or \"250ms\": {e}"))
}

mod humantime_serde_compat {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    /// What `serialize` wrote (the configuration cache reads it back).
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name found on the host (in a purged directory) reached logs and
    /// terminals raw: shown escaped now, the path itself unchanged.
    #[test]
    fn a_path_with_control_characters_is_shown_escaped_and_kept_as_is() {
        let raw = "/etc/d/a\nINFO forged \u{1b}[2J\u{202e}x\\n";
        let p = TargetPath::parse(raw).unwrap();
        let shown = p.to_string();
        assert_eq!(shown, "/etc/d/a\\nINFO forged \\u{1b}[2J\\u{202e}x\\\\n");
        assert!(!shown.chars().any(unprintable));
        // A backslash alone is shown as it is.
        assert_eq!(
            TargetPath::parse("/etc/a\\nb").unwrap().to_string(),
            "/etc/a\\nb"
        );
        assert_eq!(p.as_str(), raw);
        assert_eq!(String::from(p), raw);
        let plain = TargetPath::parse("/etc/caf\u{e9} x").unwrap();
        assert_eq!(plain.to_string(), "/etc/caf\u{e9} x");
    }

    #[test]
    fn a_hook_shows_an_ambiguous_argument_quoted() {
        let h = Hook {
            role: "app".into(),
            when: HookWhen::Post,
            argv: vec![
                "/usr/bin/m".into(),
                "--to=v2".into(),
                "x; y".into(),
                "".into(),
            ],
            user: Some(Principal("app".into())),
            timeout: Duration::from_secs(90),
            env: [
                ("B".to_string(), "secret".to_string()),
                ("A".to_string(), "1".to_string()),
            ]
            .into(),
            run: HookRun::OnChange,
            origin: "roles/app/role.toml:1 hooks[0]".into(),
        };
        assert_eq!(
            h.describe(),
            "post roles/app: /usr/bin/m --to=v2 \"x; y\" \"\" (user app, 1m 30s, env A B)"
        );
    }

    #[test]
    fn target_path_rejects_relative_dotdot_and_empty_components() {
        assert!(TargetPath::parse("/etc/motd").is_ok());
        for bad in [
            "etc/motd",
            "/etc/../shadow",
            "/etc/./x",
            "/etc//x",
            "/etc/x/",
            "/",
            "",
        ] {
            assert!(TargetPath::parse(bad).is_err(), "{bad} accepted");
        }
    }

    /// `TargetPath::parse` as it was written first (a collected `split`):
    /// the oracle for the faster one, error messages included.
    fn parse_reference(s: &str) -> Result<String, String> {
        if !s.starts_with('/') {
            return Err(format!(
                "path {s:?} is not absolute: targets are absolute paths such as \"/etc/motd\""
            ));
        }
        if s.contains('\0') {
            return Err(format!("path {s:?} contains a NUL byte"));
        }
        let comps: Vec<&str> = s[1..].split('/').collect();
        if comps.iter().all(|c| c.is_empty()) {
            return Err("path \"/\" cannot be a managed file".into());
        }
        for c in &comps {
            match *c {
                "" => {
                    return Err(format!(
                        "path {s:?} has an empty component (double or trailing '/')"
                    ))
                }
                "." | ".." => {
                    return Err(format!(
                        "path {s:?} contains {c:?}: write the normalised absolute path"
                    ))
                }
                _ => {}
            }
        }
        Ok(s.to_string())
    }

    #[test]
    fn target_path_parsing_decides_and_words_every_path_as_the_reference_does() {
        // Every string of up to 6 pieces from these: all the separators,
        // dots and odd bytes that matter, in every order that short.
        const PIECES: &[&str] = &["/", "a", ".", "..", "\0", "é", "//"];
        let mut checked = 0;
        let mut stack = vec![String::new()];
        while let Some(s) = stack.pop() {
            assert_eq!(
                TargetPath::parse(&s).map(|p| p.0),
                parse_reference(&s),
                "{s:?}"
            );
            checked += 1;
            if s.len() < 6 {
                stack.extend(PIECES.iter().map(|p| format!("{s}{p}")));
            }
        }
        assert!(checked > 10_000, "{checked}");
    }

    #[test]
    fn is_under_is_component_wise() {
        let etc = TargetPath::parse("/etc").unwrap();
        assert!(TargetPath::parse("/etc/x").unwrap().is_under(&etc));
        assert!(!TargetPath::parse("/etcetera/x").unwrap().is_under(&etc));
    }

    #[test]
    fn mode_parsing() {
        assert_eq!(Mode::parse("0644").unwrap(), Mode(0o644));
        assert_eq!(Mode::parse("600").unwrap(), Mode(0o600));
        assert_eq!(Mode::parse("0o4755").unwrap(), Mode(0o4755));
        assert!(Mode::parse("0999").is_err());
        assert!(Mode::parse("17777").is_err());
        assert_eq!(Mode(0o600).to_string(), "0600");
    }

    #[test]
    fn unit_names_need_a_suffix() {
        assert!(validate_unit_name("nginx.service").is_ok());
        let err = validate_unit_name("nginx").unwrap_err();
        assert!(err.contains("nginx.service"), "{err}");
    }

    #[test]
    fn actions_are_ordered_by_strength() {
        assert!(UnitActionKind::Restart > UnitActionKind::Reload);
        assert!(UnitActionKind::TryRestart > UnitActionKind::ReloadOrRestart);
    }
}
