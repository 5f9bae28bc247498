//! The pure core, first half: repository snapshot → host configuration →
//! rendered desired state. Nothing here touches the disk, the network or
//! the clock; inputs are a [`snapshot::Snapshot`] and the host's facts.

pub mod accounts;
pub mod guard;
pub mod load;
pub mod model;
pub mod packages;
pub mod quadlet;
pub mod redact;
pub mod render;
pub mod secrets;
pub mod snapshot;
pub mod spec;
pub mod targets;
pub mod toml_file;

use std::fmt;

/// A list of problems, each naming its file, key or line. Displayed one
/// per line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Diagnostics(Vec<String>);

impl Diagnostics {
    pub fn push(&mut self, msg: impl Into<String>) {
        self.0.push(msg.into());
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn iter(&self) -> impl Iterator<Item = &String> {
        self.0.iter()
    }
    pub fn extend(&mut self, other: Diagnostics) {
        self.0.extend(other.0);
    }
    /// Every message rewritten by `f` (redaction).
    pub fn map(self, f: impl Fn(String) -> String) -> Diagnostics {
        Diagnostics(self.0.into_iter().map(f).collect())
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, m) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{m}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}
