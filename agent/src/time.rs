//! Wall-clock helpers shared by the command line, the sync pipeline and
//! the daemon. They live below all three so none of them imports another
//! just to read the clock.

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `t` as RFC 3339 in UTC, or "never" for 0 and earlier. Times come from
/// state files and from etcd (other hosts): one past the year 9999 is
/// shown as its number, never a panic.
pub fn time_str(t: i64) -> String {
    use std::fmt::Write;
    if t <= 0 {
        return "never".into();
    }
    let Some(st) = std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(t as u64))
    else {
        return format!("{t} (seconds since 1970)");
    };
    let mut out = String::new();
    if write!(out, "{}", humantime::format_rfc3339_seconds(st)).is_err() {
        return format!("{t} (seconds since 1970)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::time_str;

    #[test]
    fn far_future_times_from_other_hosts_do_not_panic() {
        assert_eq!(time_str(0), "never");
        assert_eq!(time_str(1_796_392_729), "2026-12-04T13:58:49Z");
        assert_eq!(
            time_str(300_000_000_000),
            "300000000000 (seconds since 1970)"
        );
        assert_eq!(
            time_str(i64::MAX),
            format!("{} (seconds since 1970)", i64::MAX)
        );
    }
}
