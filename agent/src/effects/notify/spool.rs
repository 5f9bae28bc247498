//! The spool: `<state>/spool/`, events waiting for delivery.
//!
//! ```text
//! spool/<queue>/<seq>.json       one event for one webhook (queue: hash of its URL)
//! spool/failed/<queue>-<seq>.json refused by the receiver for good (4xx), kept for the operator
//! spool/repeat.json              the last repeating event spooled (a refusal, a halt), not spooled again
//! ```
//!
//! `<seq>` is 20 digits, increasing within a queue: the name order is the
//! event order. Each file is a state file written atomically and durably
//! (temp file, fsync, rename, fsync of the directory) before delivery is
//! attempted, so an event survives a crash or a restart. Written and
//! delivered under the state lock.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tracing::warn;

use super::event::Event;
use crate::effects::state::{read_json, write_json_atomic};

/// At most this many events per queue; the oldest are dropped beyond.
pub const MAX_EVENTS: usize = 10_000;
/// At most this many bytes of events per queue.
pub const MAX_BYTES: u64 = 64 << 20;

pub struct Spool {
    dir: PathBuf,
}

/// One spooled event file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub path: PathBuf,
    pub size: u64,
}

/// The file name of the event `seq`.
pub fn file_name(seq: u64) -> String {
    format!("{seq:020}.json")
}

/// The sequence number of a spool file name; `None` for anything else
/// (temp files, foreign files).
pub fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".json")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The next sequence number after `last`: later than every spooled event,
/// and at least the time in milliseconds (names stay unique after a queue
/// emptied, for `failed/`).
pub fn next_seq(last: Option<u64>, now_ms: u64) -> u64 {
    last.map_or(now_ms, |l| l.saturating_add(1).max(now_ms))
}

/// The entries to drop so that what is left fits the caps: the oldest
/// first. `entries` is in order.
pub fn over_cap(entries: &[Entry], max_events: usize, max_bytes: u64) -> usize {
    let mut total: u64 = entries.iter().fold(0, |t, e| t.saturating_add(e.size));
    let mut n = entries.len();
    let mut drop = 0;
    while drop < entries.len() && (n > max_events || total > max_bytes) {
        total -= entries[drop].size;
        n -= 1;
        drop += 1;
    }
    drop
}

impl Spool {
    pub fn new(state: &Path) -> Spool {
        Spool {
            dir: state.join("spool"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn queue_dir(&self, queue: &str) -> PathBuf {
        self.dir.join(queue)
    }

    fn failed_dir(&self) -> PathBuf {
        self.dir.join("failed")
    }

    fn ensure(dir: &Path) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))
    }

    /// The events of `queue`, oldest first.
    pub fn list(&self, queue: &str) -> Result<Vec<Entry>> {
        let dir = self.queue_dir(queue);
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
        };
        let mut out = Vec::new();
        for e in rd {
            let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
            let Some(seq) = e.file_name().to_str().and_then(parse_name) else {
                continue;
            };
            let meta = e
                .metadata()
                .with_context(|| format!("cannot read {}", e.path().display()))?;
            if meta.is_file() {
                out.push(Entry {
                    seq,
                    path: e.path(),
                    size: meta.len(),
                });
            }
        }
        out.sort_by_key(|e| e.seq);
        Ok(out)
    }

    /// Spools `event` for `queue`, durably; drops the oldest events of the
    /// queue beyond the caps, with a warning.
    pub fn push(&self, queue: &str, url: &str, event: &Event, now_ms: u64) -> Result<PathBuf> {
        let dir = self.queue_dir(queue);
        Self::ensure(&dir)?;
        let entries = self.list(queue)?;
        let seq = next_seq(entries.last().map(|e| e.seq), now_ms);
        let path = dir.join(file_name(seq));
        write_json_atomic(&path, event)
            .with_context(|| format!("cannot spool the {} event", event.event.name()))?;
        let mut entries = entries;
        entries.push(Entry {
            seq,
            path: path.clone(),
            size: std::fs::metadata(&path).map_or(0, |m| m.len()),
        });
        let drop = over_cap(&entries, MAX_EVENTS, MAX_BYTES);
        if drop > 0 {
            warn!(
                url = %super::deliver::display_url(url),
                dropped = drop,
                "the webhook spool {} is full ({MAX_EVENTS} events or {} MiB): dropped the oldest undelivered events",
                dir.display(),
                MAX_BYTES >> 20
            );
            for e in &entries[..drop] {
                if let Err(err) = std::fs::remove_file(&e.path) {
                    warn!("cannot remove {}: {err}", e.path.display());
                }
            }
        }
        Ok(path)
    }

    /// The event in a spool file.
    pub fn read(&self, entry: &Entry) -> Result<Event> {
        // (An event lists every drifted file: up to what the whole spool
        // may hold, not the cap of a small state file.)
        crate::effects::state::read_json_up_to::<Event>(&entry.path, MAX_BYTES)?
            .with_context(|| format!("{} disappeared", entry.path.display()))
    }

    /// Delivered: gone.
    pub fn remove(&self, entry: &Entry) -> Result<()> {
        std::fs::remove_file(&entry.path)
            .with_context(|| format!("cannot remove {}", entry.path.display()))?;
        crate::effects::state::fsync_dir(entry.path.parent().unwrap_or(&self.dir))
    }

    /// Refused for good: moved to `failed/` for the operator.
    pub fn fail(&self, queue: &str, entry: &Entry) -> Result<PathBuf> {
        let failed = self.failed_dir();
        Self::ensure(&failed)?;
        let to = failed.join(format!("{queue}-{}", file_name(entry.seq)));
        std::fs::rename(&entry.path, &to)
            .with_context(|| format!("cannot move {} to {}", entry.path.display(), to.display()))?;
        crate::effects::state::fsync_dir(&failed)?;
        Ok(to)
    }

    /// Every event still waiting, of every queue, oldest first within a
    /// queue (for the USB stick's report).
    pub fn pending(&self) -> Vec<Event> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut queues: Vec<String> = rd
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| n != "failed")
            .collect();
        queues.sort();
        let mut out = Vec::new();
        for q in queues {
            for e in self.list(&q).unwrap_or_default() {
                if let Ok(ev) = self.read(&e) {
                    out.push(ev);
                }
            }
        }
        out
    }

    /// The idempotency key of the last repeating event spooled.
    pub fn last_repeat(&self) -> Option<String> {
        read_json::<String>(&self.dir.join("repeat.json"))
            .ok()
            .flatten()
    }

    pub fn set_repeat(&self, key: Option<&str>) -> Result<()> {
        let path = self.dir.join("repeat.json");
        match key {
            Some(k) => {
                Self::ensure(&self.dir)?;
                write_json_atomic(&path, &k)
            }
            None => match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effects::notify::event::EventKind;

    #[test]
    fn names_sort_in_event_order_and_parse_back() {
        let a = file_name(9);
        let b = file_name(10);
        let c = file_name(1_700_000_000_000);
        assert!(a < b && b < c, "{a} {b} {c}");
        assert_eq!(parse_name(&c), Some(1_700_000_000_000));
        assert_eq!(parse_name(".00000000000000000009.json.tmp-1"), None);
        assert_eq!(parse_name("9.json"), None);
        assert_eq!(parse_name("repeat.json"), None);
    }

    #[test]
    fn sequence_increases_even_when_the_clock_goes_back() {
        assert_eq!(next_seq(None, 1000), 1000);
        assert_eq!(next_seq(Some(1000), 1000), 1001);
        assert_eq!(next_seq(Some(5000), 1000), 5001);
        assert_eq!(next_seq(Some(5), 1000), 1000);
    }

    #[test]
    fn the_cap_drops_the_oldest() {
        let e = |seq, size| Entry {
            seq,
            path: PathBuf::new(),
            size,
        };
        let list = [e(1, 10), e(2, 10), e(3, 10)];
        assert_eq!(over_cap(&list, 3, 100), 0);
        assert_eq!(over_cap(&list, 2, 100), 1);
        assert_eq!(over_cap(&list, 10, 15), 2);
        assert_eq!(over_cap(&list, 0, 100), 3);
    }

    #[test]
    fn push_list_fail_remove() {
        let d = tempfile::tempdir().unwrap();
        let s = Spool::new(d.path());
        let ev = |k| Event::new("h", k, 1, "x");
        s.push("q", "http://x", &ev(EventKind::Applied), 5).unwrap();
        s.push("q", "http://x", &ev(EventKind::Reverted), 5)
            .unwrap();
        s.push("q", "http://x", &ev(EventKind::Halted), 4).unwrap();
        let l = s.list("q").unwrap();
        assert_eq!(l.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![5, 6, 7]);
        let kinds: Vec<_> = l.iter().map(|e| s.read(e).unwrap().event).collect();
        assert_eq!(
            kinds,
            vec![EventKind::Applied, EventKind::Reverted, EventKind::Halted]
        );
        let to = s.fail("q", &l[0]).unwrap();
        assert!(to.ends_with("failed/q-00000000000000000005.json"));
        s.remove(&l[1]).unwrap();
        assert_eq!(s.list("q").unwrap().len(), 1);
        assert_eq!(s.pending().len(), 1);
        assert!(s.list("none").unwrap().is_empty());
    }
}
