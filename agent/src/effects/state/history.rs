//! `history.jsonl`: one line per sync attempt, newest last. Appended with
//! `O_APPEND` in a single write, so concurrent readers never see half a
//! line; a torn last line after a crash is skipped when reading.
//!
//! The append is not synced (it used to end with an `fdatasync`, one
//! journal commit per applied change): the history is a report for
//! people, never an input of recovery, the quick check or the
//! anti-rollback checks (those read the inventory, the journals, the
//! marks and the floor, which keep their barriers). After a power loss
//! the newest lines may be missing, or the last one torn, which the
//! reader skips (`rollback` without `--to` looks for the newest applied
//! commit *other than the current one*: a lost newest line names the
//! current commit, which it skips anyway); the kernel writes it back within seconds, and the next
//! transaction's first `syncfs` makes every earlier line durable.

use std::fs::OpenOptions;
use std::io::Write;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::StateDir;

/// History is trimmed to [`KEEP_HISTORY`] entries once it grows past this.
const MAX_HISTORY_BYTES: u64 = 1 << 20;
const KEEP_HISTORY: usize = 2000;

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
    /// Applied, but a unit action or check failed: reverted, commit marked bad.
    Reverted,
    /// The revert's checks failed too: driftless halted.
    Degraded,
    /// The fetched commit is marked bad: not applied again.
    Skipped,
    /// A bundle older than what the host runs was offered (an old bundle
    /// left on a stick): set aside, nothing imported.
    Outdated,
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
        let mut f = super::open_regular_for_write(
            &path,
            OpenOptions::new().create(true).append(true),
            "not appended to (`driftless state repair` moves it aside)",
        )?;
        f.write_all(&line)
            .with_context(|| format!("cannot append to {}", path.display()))?;
        let size = f.metadata().map_or(0, |m| m.len());
        if size > MAX_HISTORY_BYTES {
            self.trim_history(KEEP_HISTORY)?;
        }
        Ok(())
    }

    /// Keeps the newest `keep` entries (atomic rewrite).
    fn trim_history(&self, keep: usize) -> Result<()> {
        let entries = self.history()?;
        let keep = &entries[entries.len().saturating_sub(keep)..];
        let mut out = Vec::new();
        for e in keep {
            out.extend(serde_json::to_vec(e).context("cannot serialise history entry")?);
            out.push(b'\n');
        }
        super::write_atomic(&self.history_path(), &out)
    }

    /// The newest entry, read from the file's last 64 KiB (no entry is
    /// longer: messages are bounded). None when there is none, or the
    /// last line does not read (torn by a crash, or too long).
    pub fn last_history(&self) -> Result<Option<Entry>> {
        use std::io::{Read, Seek, SeekFrom};
        const TAIL: u64 = 64 << 10;
        let path = self.history_path();
        let (mut f, meta) = match super::io::open_nofollow(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let start = meta.len().saturating_sub(TAIL);
        f.seek(SeekFrom::Start(start))
            .and_then(|_| {
                let mut tail = Vec::new();
                f.take(TAIL).read_to_end(&mut tail).map(|_| tail)
            })
            .with_context(|| format!("cannot read {}", path.display()))
            .map(|tail| {
                let text = String::from_utf8_lossy(&tail);
                let line = text.strip_suffix('\n')?.rsplit('\n').next()?;
                serde_json::from_str(line).ok()
            })
    }

    /// All readable entries, oldest first.
    pub fn history(&self) -> Result<Vec<Entry>> {
        let path = self.history_path();
        let bytes = match super::read_nofollow(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        // A line that is not UTF-8 is skipped like any unreadable line.
        let text = String::from_utf8_lossy(&bytes);
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::OpenOptionsExt;

    use super::*;

    fn failed(time: i64, message: &str) -> Entry {
        Entry {
            time,
            outcome: Outcome::Failed,
            commit: Some("c1".into()),
            txid: None,
            created: 0,
            changed: 0,
            removed: 0,
            message: Some(message.into()),
        }
    }

    #[test]
    fn the_last_entry_is_read_from_the_tail_and_a_torn_one_is_none() {
        let d = tempfile::tempdir().unwrap();
        let state = StateDir::open(d.path()).unwrap();
        assert_eq!(state.last_history().unwrap(), None);
        // Entries longer than the tail read before the last one.
        state
            .append_history(&failed(1, &"x".repeat(100_000)))
            .unwrap();
        state.append_history(&failed(2, "second")).unwrap();
        assert_eq!(state.last_history().unwrap(), Some(failed(2, "second")));
        // A last line torn by a crash: no last entry (the caller appends).
        std::fs::OpenOptions::new()
            .append(true)
            .open(state.history_path())
            .unwrap()
            .write_all(b"{\"time\":3,\"outc")
            .unwrap();
        assert_eq!(state.last_history().unwrap(), None);
    }

    /// A FIFO planted at the lock or at `history.jsonl` (the append is
    /// reached without a repair when the quick check skips one) blocked
    /// the agent forever in open(2). Refused at once now, naming it.
    #[test]
    fn a_fifo_planted_at_the_lock_or_the_history_is_refused_not_waited_on() {
        let d = tempfile::tempdir().unwrap();
        let state = StateDir::open(d.path()).unwrap();
        for name in ["lock", "history.jsonl"] {
            nix::unistd::mkfifo(&d.path().join(name), nix::sys::stat::Mode::S_IRWXU).unwrap();
        }
        let err = format!(
            "{:#}",
            state
                .lock(std::time::Duration::ZERO)
                .err()
                .expect("refused")
        );
        assert!(err.contains("lock") && err.contains("remove it"), "{err}");
        let err = format!("{:#}", state.append_history(&entry(1)).unwrap_err());
        assert!(err.contains("history.jsonl"), "{err}");
        // With a reader waiting, the FIFO still is not written to.
        let path = d.path().join("history.jsonl");
        let _reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let err = format!("{:#}", state.append_history(&entry(2)).unwrap_err());
        assert!(err.contains("not a regular file"), "{err}");
    }

    fn entry(i: i64) -> Entry {
        Entry {
            time: i,
            outcome: Outcome::Applied,
            commit: Some("c".repeat(40)),
            txid: None,
            created: 0,
            changed: 0,
            removed: 0,
            message: Some("m".repeat(200)),
        }
    }

    #[test]
    fn history_is_trimmed_to_the_newest_entries() {
        let d = tempfile::tempdir().unwrap();
        let st = StateDir::open(d.path()).unwrap();
        for i in 0..50 {
            st.append_history(&entry(i)).unwrap();
        }
        st.trim_history(10).unwrap();
        let h = st.history().unwrap();
        let times: Vec<i64> = h.iter().map(|e| e.time).collect();
        assert_eq!(times, (40..50).collect::<Vec<_>>());
        // Appending still works after the rewrite.
        st.append_history(&entry(50)).unwrap();
        assert_eq!(st.history().unwrap().len(), 11);
    }
}
