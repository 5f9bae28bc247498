//! Times in allowed signers files (`YYYYMMDD[HHMM[SS]][Z]`) and in error
//! messages (`YYYY-MM-DD HH:MM:SS UTC`), as unix seconds.
//!
//! OpenSSH reads a time without `Z`/`UTC` suffix as the *local* time of the
//! verifying machine. driftless runs on servers whose time zone is an
//! accident of provisioning, so a file would mean different instants on
//! different hosts: every time is read as UTC here, with or without the
//! suffix. Write the `Z` anyway, so `ssh-keygen` agrees.

/// Parses `YYYYMMDD`, `YYYYMMDDHHMM` or `YYYYMMDDHHMMSS`, optionally
/// followed by `Z` or `UTC` (any case), as UTC.
pub(super) fn parse(text: &str) -> Result<i64, String> {
    let digits = strip_suffix_ignore_case(text, "UTC")
        .or_else(|| strip_suffix_ignore_case(text, "Z"))
        .unwrap_or(text);
    let shape = "expected YYYYMMDD, YYYYMMDDHHMM or YYYYMMDDHHMMSS, optionally followed by Z";
    if !digits.bytes().all(|b| b.is_ascii_digit()) || ![8, 12, 14].contains(&digits.len()) {
        return Err(format!("`{text}` is not a time: {shape}"));
    }
    // All ASCII digits and of a known length: slicing and parsing cannot fail.
    let field = |from: usize, to: usize| -> i64 {
        digits
            .get(from..to)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    let (year, month, day) = (field(0, 4), field(4, 6), field(6, 8));
    let (hour, minute, second) = match digits.len() {
        8 => (0, 0, 0),
        12 => (field(8, 10), field(10, 12), 0),
        _ => (field(8, 10), field(10, 12), field(12, 14)),
    };
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(format!("`{text}` is not a valid date"));
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err(format!("`{text}` is not a valid time of day"));
    }
    Ok(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// `YYYY-MM-DD HH:MM:SS UTC`.
pub(super) fn format(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

fn strip_suffix_ignore_case<'a>(text: &'a str, suffix: &str) -> Option<&'a str> {
    let cut = text.len().checked_sub(suffix.len())?;
    let (head, tail) = (text.get(..cut)?, text.get(cut..)?);
    tail.eq_ignore_ascii_case(suffix).then_some(head)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Inverse of [`days_from_civil`].
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}
