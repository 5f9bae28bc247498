//! Where a sync spends its time: `driftless sync --timings` prints one line
//! per stage to stderr.
//!
//! Why not tracing spans: the numbers must cost nothing when nobody asks
//! (one relaxed atomic load per stage) and must come out as a stable table
//! that `bench/run` parses for BENCHMARKS.md, whatever the log level.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static STAGES: Mutex<Vec<(&'static str, Duration)>> = Mutex::new(Vec::new());

/// Starts recording (for this process).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Measures a stage until the guard drops. A stage that runs several
/// times adds up.
#[must_use]
pub fn stage(name: &'static str) -> Option<Stage> {
    ENABLED.load(Ordering::Relaxed).then(|| Stage {
        name,
        start: Instant::now(),
    })
}

pub struct Stage {
    name: &'static str,
    start: Instant,
}

impl Drop for Stage {
    fn drop(&mut self) {
        record(self.name, self.start.elapsed());
    }
}

fn record(name: &'static str, took: Duration) {
    if let Ok(mut stages) = STAGES.lock() {
        match stages.iter_mut().find(|(n, _)| *n == name) {
            Some((_, d)) => *d += took,
            None => stages.push((name, took)),
        }
    }
}

/// The stages recorded so far, in the order they first ran.
pub fn take() -> Vec<(&'static str, Duration)> {
    STAGES
        .lock()
        .map(|mut s| std::mem::take(&mut *s))
        .unwrap_or_default()
}

/// `stage  1.234 ms` lines, then the total since `start`.
pub fn render(stages: &[(&'static str, Duration)], total: Duration) -> String {
    let mut out = String::new();
    for (name, d) in stages {
        out.push_str(&format!(
            "timing: {name:<12} {:>9.3} ms\n",
            d.as_secs_f64() * 1e3
        ));
    }
    out.push_str(&format!(
        "timing: {:<12} {:>9.3} ms\n",
        "total",
        total.as_secs_f64() * 1e3
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_stage_adds_up() {
        record("unit-test-stage", Duration::from_millis(2));
        record("unit-test-stage", Duration::from_millis(3));
        let got: Vec<_> = take()
            .into_iter()
            .filter(|(n, _)| *n == "unit-test-stage")
            .collect();
        assert_eq!(got.len(), 1, "one entry per stage name: {got:?}");
        assert_eq!(got[0].1, Duration::from_millis(5));
    }

    #[test]
    fn render_prints_one_aligned_line_per_stage_then_the_total() {
        let stages = vec![
            ("fetch", Duration::from_micros(1500)),
            ("render", Duration::from_millis(2)),
        ];
        let text = render(&stages, Duration::from_millis(4));
        assert_eq!(
            text,
            "timing: fetch            1.500 ms\n\
             timing: render           2.000 ms\n\
             timing: total            4.000 ms\n"
        );
    }
}
