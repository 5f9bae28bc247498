//! Wall-clock helpers shared by the command line, the sync pipeline and
//! the daemon. They live below all three so none of them imports another
//! just to read the clock.

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `t` as RFC 3339 in UTC, or "never" for 0 and earlier.
pub fn time_str(t: i64) -> String {
    if t <= 0 {
        return "never".into();
    }
    let st = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t as u64);
    humantime::format_rfc3339_seconds(st).to_string()
}
