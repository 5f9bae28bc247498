//! `history.jsonl`: one line per sync attempt, newest last. Appended with
//! `O_APPEND` in a single write, so concurrent readers never see half a
//! line; a torn last line after a crash is skipped when reading.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::StateDir;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Changes were applied.
    Applied,
    /// Nothing to do: the host already matched.
    Unchanged,
    /// Refused before touching the host (invalid repo, non-fast-forward...).
    Refused,
    /// Failed; the host keeps its previous state.
    Failed,
    /// An interrupted transaction was rolled back at start-up.
    Recovered,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Unix seconds.
    pub time: i64,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txid: Option<String>,
    #[serde(default)]
    pub created: usize,
    #[serde(default)]
    pub changed: usize,
    #[serde(default)]
    pub removed: usize,
    /// Why it failed or was refused; never holds file content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl StateDir {
    pub fn append_history(&self, entry: &Entry) -> Result<()> {
        let path = self.history_path();
        let mut line = serde_json::to_vec(entry).context("cannot serialise history entry")?;
        line.push(b'\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        f.write_all(&line)
            .and_then(|()| f.sync_data())
            .with_context(|| format!("cannot append to {}", path.display()))
    }

    /// All readable entries, oldest first.
    pub fn history(&self) -> Result<Vec<Entry>> {
        let path = self.history_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }
}
