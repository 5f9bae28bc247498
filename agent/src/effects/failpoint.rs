//! Failpoints: named places in the effects where a test can make the
//! process die (as by `kill -9` or a power cut) or an operation fail (as
//! by a full disk), to prove that every crash window is repaired.
//!
//! Why an environment variable and not the `fail` crate: the crash tests
//! drive the real binary, one process per crash point, and a variable is
//! the simplest switch that crosses `exec`. The hook is compiled only into
//! debug builds (what `cargo test` builds); in a release build [`hit`] is
//! an empty inline function, so a production agent cannot be told to kill
//! itself.
//!
//! - `DRIFTLESS_TEST_FAILPOINT=name[:N][:kill|error]`: on the `N`th time
//!   (default 1) the point `name` is reached, `kill` sends the process
//!   `SIGKILL` (the default) and `error` makes the operation fail with an
//!   I/O-like error. Several specs may be given, comma-separated.
//! - `DRIFTLESS_TEST_FAILPOINT_TRACE=FILE` appends the name of every point
//!   reached, one per line, so a test can first list the points of a run
//!   and then kill the process at each of them in turn.

/// The value of the test knob `name` (an environment variable such as
/// `DRIFTLESS_TEST_LOCK_WAIT_SECS`), parsed; `None` when it is unset or
/// does not parse, and always in release builds, which no environment
/// can tune this way.
pub fn test_knob<T: std::str::FromStr>(name: &str) -> Option<T> {
    if !cfg!(debug_assertions) {
        return None;
    }
    std::env::var(name).ok()?.parse().ok()
}

/// The failpoint `name` was reached: die or fail if a test asked for it.
#[cfg(debug_assertions)]
pub fn hit(name: &str) -> anyhow::Result<()> {
    imp::hit(name)
}

/// Release builds: failpoints do nothing.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn hit(_name: &str) -> anyhow::Result<()> {
    Ok(())
}

#[cfg(debug_assertions)]
mod imp {
    use std::collections::HashMap;
    use std::io::Write;
    use std::sync::Mutex;

    static COUNTS: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);

    #[derive(Debug, PartialEq, Eq)]
    enum Action {
        Kill,
        Error,
        /// SIGTERM to itself, as systemd sends on stop; returns once the
        /// run has taken it in (see `crate::stop`), so that what follows
        /// sees it deterministically.
        Term,
    }

    struct Spec {
        name: String,
        nth: usize,
        action: Action,
    }

    fn parse(spec: &str) -> Option<Spec> {
        let mut parts = spec.trim().split(':');
        let name = parts.next()?.to_string();
        let mut nth = 1;
        let mut action = Action::Kill;
        for p in parts {
            match p {
                "kill" => action = Action::Kill,
                "error" => action = Action::Error,
                "term" => action = Action::Term,
                n => nth = n.parse().ok()?,
            }
        }
        (!name.is_empty()).then_some(Spec { name, nth, action })
    }

    pub fn hit(name: &str) -> anyhow::Result<()> {
        if let Some(trace) = std::env::var_os("DRIFTLESS_TEST_FAILPOINT_TRACE") {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(trace)
            {
                let _ = writeln!(f, "{name}");
            }
        }
        let Ok(specs) = std::env::var("DRIFTLESS_TEST_FAILPOINT") else {
            return Ok(());
        };
        let count = {
            let mut guard = COUNTS.lock().unwrap_or_else(|p| p.into_inner());
            let counts = guard.get_or_insert_with(HashMap::new);
            let c = counts.entry(name.to_string()).or_insert(0);
            *c += 1;
            *c
        };
        for spec in specs.split(',').filter_map(parse) {
            if spec.name != name || spec.nth != count {
                continue;
            }
            match spec.action {
                Action::Kill => {
                    eprintln!("driftless: failpoint {name} (hit {count}): killing the process");
                    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
                    std::process::abort();
                }
                Action::Error => {
                    anyhow::bail!("failpoint {name} (hit {count}): injected failure")
                }
                Action::Term => {
                    eprintln!("driftless: failpoint {name} (hit {count}): SIGTERM");
                    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM);
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                    while !crate::stop::requested() && std::time::Instant::now() < deadline {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn specs_parse_with_defaults() {
            let s = parse("apply.switch").unwrap();
            assert_eq!(
                (s.name.as_str(), s.nth, s.action),
                ("apply.switch", 1, Action::Kill)
            );
            let s = parse("a:3:error").unwrap();
            assert_eq!((s.name.as_str(), s.nth, s.action), ("a", 3, Action::Error));
            let s = parse("a:term").unwrap();
            assert_eq!((s.nth, s.action), (1, Action::Term));
            assert!(parse("a:x").is_none());
            assert!(parse("").is_none());
        }
    }
}
