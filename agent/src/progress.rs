//! Progress on a terminal for long work: a first clone, a bundle import, a
//! cold apply of thousands of files.
//!
//! Why a process-wide switch like [`crate::timings`]: the work happens deep
//! in the core (fetch, render, apply), which must not know whether a human
//! is watching. The CLI turns progress on only when stderr is a terminal
//! and `-q` was not given; cron, journald and the daemon never see a byte
//! of it. When off, a [`Bar`] is an empty `Option` and costs nothing.
//!
//! Log lines and bars share stderr: [`LogWriter`] suspends the bar while a
//! log line is written, so lines never tear through a bar.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

static ENABLED: AtomicBool = AtomicBool::new(false);
/// The bar being drawn, for [`LogWriter`].
static ACTIVE: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Turns progress on for this process (the CLI does, on a terminal).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// A progress bar or spinner; nothing at all when progress is off. Cleared
/// from the terminal when dropped.
#[must_use]
pub struct Bar(Option<ProgressBar>);

/// Fewer items than this get no bar: one that flashes for a handful of
/// files is noise.
pub const MIN_BAR_ITEMS: u64 = 100;

/// A bar counting `len` items: `message [=====>    ] 1200/5000` (nothing
/// under [`MIN_BAR_ITEMS`]).
pub fn bar(len: u64, message: &str) -> Bar {
    if len < MIN_BAR_ITEMS {
        return Bar(None);
    }
    start(message, || {
        let style = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr()).with_style(style)
    })
}

/// A spinner for work of unknown length: `⠋ fetching https://… (3s)`.
pub fn spinner(message: &str) -> Bar {
    start(message, || {
        let style = ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let pb =
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(style);
        pb.enable_steady_tick(Duration::from_millis(120));
        pb
    })
}

fn start(message: &str, make: impl FnOnce() -> ProgressBar) -> Bar {
    if !ENABLED.load(Ordering::Relaxed) {
        return Bar(None);
    }
    let pb = make();
    pb.set_message(message.to_string());
    pb.tick();
    if let Ok(mut active) = ACTIVE.lock() {
        *active = Some(pb.clone());
    }
    Bar(Some(pb))
}

impl Bar {
    /// Counts `n` more items done.
    pub fn inc(&self, n: u64) {
        if let Some(pb) = &self.0 {
            pb.inc(n);
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(pb) = self.0.take() {
            pb.finish_and_clear();
            if let Ok(mut active) = ACTIVE.lock() {
                *active = None;
            }
        }
    }
}

/// stderr for the log subscriber: a log line is written with the active
/// bar (if any) taken off the screen, then the bar is redrawn below it.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let active = ACTIVE.lock().ok().and_then(|a| a.clone());
        match active {
            Some(pb) => pb.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
