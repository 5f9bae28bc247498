//! The few pieces of Go's standard library and of yaml.v3 whose exact
//! behaviour the sops MAC depends on.
//!
//! The MAC hashes the *canonical text* of every value: Go's
//! `strconv.FormatFloat(f, 'f', -1, 64)` for floats, `True`/`False` for
//! booleans, `time.Time.MarshalText` for timestamps. A reader that formats a
//! float slightly differently computes a different MAC and rejects a valid
//! file, so these functions reproduce Go exactly for every input sops can
//! produce. Plain YAML scalars are typed the way yaml.v3's `resolve` types them
//! (YAML 1.2 core schema plus yaml.v3's timestamp layouts).

use std::fmt;

use zeroize::Zeroize;

/// Go `strconv.FormatFloat(f, 'f', -1, 64)`: the shortest decimal that
/// round-trips, never an exponent, no trailing `.0`.
///
/// Rust's `Display` for `f64` has exactly these properties for finite values;
/// only the spelling of the special values differs.
pub(crate) fn format_float(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f == f64::INFINITY {
        "+Inf".into()
    } else if f == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{f}")
    }
}

/// Go `strconv.ParseFloat(s, 64)` for the decimal forms sops writes (plus the
/// special values). Hexadecimal floats and `_` separators are not accepted.
pub(crate) fn parse_float(s: &str) -> Option<f64> {
    if s.is_empty() || s.contains('_') {
        return None;
    }
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    if body.starts_with("0x") || body.starts_with("0X") {
        return None;
    }
    s.parse::<f64>().ok()
}

/// Go `strconv.Atoi`: optional sign, decimal digits.
pub(crate) fn parse_int(s: &str) -> Option<i64> {
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    if body.is_empty() || !body.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<i64>().ok()
}

/// Go `strconv.ParseBool`.
pub(crate) fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// The canonical MAC text of a boolean (sops inherited it from Python).
pub(crate) fn format_bool(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

/// A Go `time.Time` reduced to what parsing and formatting need: the civil
/// date and time as written, with its UTC offset (Go keeps the offset it
/// parsed, so formatting reproduces it).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Timestamp {
    year: u16,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    nanos: u32,
    /// Offset from UTC in minutes; 0 formats as `Z`.
    offset_minutes: i16,
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<time redacted>")
    }
}

impl Zeroize for Timestamp {
    fn zeroize(&mut self) {
        self.year.zeroize();
        self.month.zeroize();
        self.day.zeroize();
        self.hour.zeroize();
        self.minute.zeroize();
        self.second.zeroize();
        self.nanos.zeroize();
        self.offset_minutes.zeroize();
    }
}

fn days_in_month(year: u16, month: u8) -> u8 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ => {
            let y = u32::from(year);
            if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 {
                29
            } else {
                28
            }
        }
    }
}

/// A small cursor over ASCII input.
struct Cur<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cur<'_> {
    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    /// Between `min` and `max` digits.
    fn num(&mut self, min: usize, max: usize) -> Option<u32> {
        let start = self.i;
        while self.i < self.s.len() && self.i - start < max && self.s[self.i].is_ascii_digit() {
            self.i += 1;
        }
        if self.i - start < min {
            return None;
        }
        let mut v = 0u32;
        for &b in &self.s[start..self.i] {
            v = v * 10 + u32::from(b - b'0');
        }
        Some(v)
    }

    /// An optional fraction (`.` or `,` then digits): nanoseconds.
    fn fraction(&mut self) -> Option<u32> {
        match self.s.get(self.i) {
            Some(b'.') | Some(b',') if self.s.get(self.i + 1).is_some_and(u8::is_ascii_digit) => {
                self.i += 1;
                let start = self.i;
                while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                    self.i += 1;
                }
                let digits = &self.s[start..self.i];
                let mut nanos = 0u32;
                for k in 0..9 {
                    nanos = nanos * 10 + digits.get(k).map_or(0, |d| u32::from(d - b'0'));
                }
                Some(nanos)
            }
            _ => Some(0),
        }
    }

    /// `Z` or `±hh:mm`.
    fn zone(&mut self) -> Option<i16> {
        if self.eat(b'Z') {
            return Some(0);
        }
        let sign = if self.eat(b'+') {
            1
        } else if self.eat(b'-') {
            -1
        } else {
            return None;
        };
        let h = self.num(2, 2)?;
        if !self.eat(b':') {
            return None;
        }
        let m = self.num(2, 2)?;
        if h > 23 || m > 59 {
            return None;
        }
        Some(sign * (h * 60 + m) as i16)
    }

    fn done(&self) -> bool {
        self.i == self.s.len()
    }
}

impl Timestamp {
    fn build(
        year: u32,
        month: u32,
        day: u32,
        hms: (u32, u32, u32),
        nanos: u32,
        offset_minutes: i16,
    ) -> Option<Timestamp> {
        let (hour, minute, second) = hms;
        if !(1..=12).contains(&month) || hour > 23 || minute > 59 || second > 59 {
            return None;
        }
        let year = u16::try_from(year).ok()?;
        let month = month as u8;
        if day < 1 || day > u32::from(days_in_month(year, month)) {
            return None;
        }
        Some(Timestamp {
            year,
            month,
            day: day as u8,
            hour: hour as u8,
            minute: minute as u8,
            second: second as u8,
            nanos,
            offset_minutes,
        })
    }

    /// Go `time.Parse(time.RFC3339, s)` (which also accepts a fractional
    /// second): `2006-01-02T15:04:05[.999999999](Z|±07:00)`.
    pub(crate) fn parse_rfc3339(s: &str) -> Option<Timestamp> {
        let mut c = Cur {
            s: s.as_bytes(),
            i: 0,
        };
        let year = c.num(4, 4)?;
        c.eat(b'-').then_some(())?;
        let month = c.num(2, 2)?;
        c.eat(b'-').then_some(())?;
        let day = c.num(2, 2)?;
        c.eat(b'T').then_some(())?;
        let hour = c.num(2, 2)?;
        c.eat(b':').then_some(())?;
        let minute = c.num(2, 2)?;
        c.eat(b':').then_some(())?;
        let second = c.num(2, 2)?;
        let nanos = c.fraction()?;
        let offset = c.zone()?;
        if !c.done() {
            return None;
        }
        Timestamp::build(year, month, day, (hour, minute, second), nanos, offset)
    }

    /// yaml.v3 `parseTimestamp`: the layouts `2006-1-2T15:4:5.999999999Z07:00`
    /// (also with a lower-case `t`), `2006-1-2 15:4:5.999999999` (UTC) and
    /// `2006-1-2` (midnight UTC).
    pub(crate) fn parse_yaml(s: &str) -> Option<Timestamp> {
        let b = s.as_bytes();
        // Quick check as in yaml.v3: exactly four digits, then `-`.
        if b.len() < 5 || !b[..4].iter().all(u8::is_ascii_digit) || b[4] != b'-' {
            return None;
        }
        let mut c = Cur { s: b, i: 0 };
        let year = c.num(4, 4)?;
        c.eat(b'-').then_some(())?;
        let month = c.num(1, 2)?;
        c.eat(b'-').then_some(())?;
        let day = c.num(1, 2)?;
        if c.done() {
            return Timestamp::build(year, month, day, (0, 0, 0), 0, 0);
        }
        let zoned = if c.eat(b'T') || c.eat(b't') {
            true
        } else if c.eat(b' ') {
            false
        } else {
            return None;
        };
        let hour = c.num(1, 2)?;
        c.eat(b':').then_some(())?;
        let minute = c.num(1, 2)?;
        c.eat(b':').then_some(())?;
        let second = c.num(1, 2)?;
        let nanos = c.fraction()?;
        let offset = if zoned { c.zone()? } else { 0 };
        if !c.done() {
            return None;
        }
        Timestamp::build(year, month, day, (hour, minute, second), nanos, offset)
    }

    fn write_base(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = write!(
            out,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        );
    }

    fn write_zone(&self, out: &mut String) {
        use std::fmt::Write;
        if self.offset_minutes == 0 {
            out.push('Z');
        } else {
            let sign = if self.offset_minutes < 0 { '-' } else { '+' };
            let m = self.offset_minutes.unsigned_abs();
            let _ = write!(out, "{sign}{:02}:{:02}", m / 60, m % 60);
        }
    }

    /// Go `t.Format(time.RFC3339)`: whole seconds.
    pub(crate) fn format_rfc3339(&self) -> String {
        let mut out = String::new();
        self.write_base(&mut out);
        self.write_zone(&mut out);
        out
    }

    /// Go `t.MarshalText()` (RFC 3339 with nanoseconds, trailing zeros of the
    /// fraction removed).
    pub(crate) fn format_rfc3339_nano(&self) -> String {
        let mut out = String::new();
        self.write_base(&mut out);
        if self.nanos != 0 {
            let frac = format!("{:09}", self.nanos);
            out.push('.');
            out.push_str(frac.trim_end_matches('0'));
        }
        self.write_zone(&mut out);
        out
    }
}

/// What yaml.v3 makes of a plain (unquoted, untagged) scalar when decoding
/// into `interface{}`.
pub(crate) enum Resolved {
    Null,
    Bool(bool),
    Int(i64),
    /// An integer beyond `i64` (yaml.v3 gives `uint64`, which sops cannot
    /// walk).
    BigInt,
    Float(f64),
    Time(Timestamp),
    Str,
}

/// yaml.v3 `resolve("", s)`.
pub(crate) fn resolve_plain(s: &str) -> Resolved {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Resolved::Null,
        "true" | "True" | "TRUE" => return Resolved::Bool(true),
        "false" | "False" | "FALSE" => return Resolved::Bool(false),
        ".nan" | ".NaN" | ".NAN" => return Resolved::Float(f64::NAN),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Resolved::Float(f64::INFINITY)
        }
        "-.inf" | "-.Inf" | "-.INF" => return Resolved::Float(f64::NEG_INFINITY),
        _ => {}
    }
    let first = s.as_bytes()[0];
    if first == b'.' {
        // yaml.v3 hands these straight to ParseFloat.
        return match parse_float(s) {
            Some(f) => Resolved::Float(f),
            None => Resolved::Str,
        };
    }
    if !(first.is_ascii_digit() || first == b'+' || first == b'-') {
        return Resolved::Str;
    }
    if let Some(t) = Timestamp::parse_yaml(s) {
        return Resolved::Time(t);
    }
    let plain: String = s.chars().filter(|&c| c != '_').collect();
    match go_parse_int_base0(&plain) {
        IntParse::Int(i) => return Resolved::Int(i),
        IntParse::TooBig => return Resolved::BigInt,
        IntParse::Invalid => {}
    }
    if yaml_style_float(&plain) {
        if let Some(f) = parse_float(&plain) {
            return Resolved::Float(f);
        }
    }
    for (prefix, radix, negative) in [
        ("0b", 2, false),
        ("-0b", 2, true),
        ("0o", 8, false),
        ("-0o", 8, true),
    ] {
        if let Some(digits) = plain.strip_prefix(prefix) {
            return match u64::from_str_radix(digits, radix) {
                Ok(v) if !digits.starts_with(['+', '-']) => signed(v, negative),
                _ => Resolved::Str,
            };
        }
    }
    Resolved::Str
}

fn signed(v: u64, negative: bool) -> Resolved {
    if negative {
        if v <= i64::MAX as u64 + 1 {
            Resolved::Int((v as i128).wrapping_neg() as i64)
        } else {
            Resolved::Str
        }
    } else {
        match i64::try_from(v) {
            Ok(i) => Resolved::Int(i),
            Err(_) => Resolved::BigInt,
        }
    }
}

enum IntParse {
    Int(i64),
    TooBig,
    Invalid,
}

/// Go `strconv.ParseInt(s, 0, 64)` falling back to `ParseUint(s, 0, 64)`:
/// optional sign, then `0x`/`0o`/`0b`/leading-`0` (octal) prefixes.
fn go_parse_int_base0(s: &str) -> IntParse {
    let (negative, body) = match s.as_bytes().first() {
        Some(b'+') => (false, &s[1..]),
        Some(b'-') => (true, &s[1..]),
        _ => (false, s),
    };
    let (radix, digits) = if let Some(d) = body.strip_prefix("0x").or(body.strip_prefix("0X")) {
        (16, d)
    } else if let Some(d) = body.strip_prefix("0o").or(body.strip_prefix("0O")) {
        (8, d)
    } else if let Some(d) = body.strip_prefix("0b").or(body.strip_prefix("0B")) {
        (2, d)
    } else if body.len() > 1 && body.starts_with('0') {
        (8, &body[1..])
    } else {
        (10, body)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return IntParse::Invalid;
    }
    match u64::from_str_radix(digits, radix) {
        Ok(v) => match signed(v, negative) {
            Resolved::Int(i) => IntParse::Int(i),
            Resolved::BigInt => IntParse::TooBig,
            _ => IntParse::Invalid,
        },
        Err(_) => IntParse::Invalid,
    }
}

/// yaml.v3's `^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$`.
fn yaml_style_float(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    if matches!(b.first(), Some(b'+') | Some(b'-')) {
        i += 1;
    }
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    } else {
        if digits(&mut i) == 0 {
            return false;
        }
        if b.get(i) == Some(&b'.') {
            i += 1;
            digits(&mut i);
        }
    }
    if matches!(b.get(i), Some(b'e') | Some(b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+') | Some(b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_format_like_go() {
        for (f, s) in [
            (7.0, "7"),
            (2.71, "2.71"),
            (1234568000.0, "1234568000"),
            (1.5, "1.5"),
            (1e21, "1000000000000000000000"),
            (1e-7, "0.0000001"),
            (-0.0, "-0"),
            (0.1 + 0.2, "0.30000000000000004"),
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
            (f64::NAN, "NaN"),
        ] {
            assert_eq!(format_float(f), s);
        }
    }

    #[test]
    fn ints_bools() {
        assert_eq!(parse_int("+5"), Some(5));
        assert_eq!(parse_int("007"), Some(7));
        assert_eq!(parse_int("1_0"), None);
        assert_eq!(parse_int(""), None);
        assert_eq!(parse_bool("True"), Some(true));
        assert_eq!(parse_bool("yes"), None);
    }

    #[test]
    fn timestamps() {
        let t = Timestamp::parse_rfc3339("2024-03-25T22:08:10Z").unwrap();
        assert_eq!(t.format_rfc3339(), "2024-03-25T22:08:10Z");
        let t = Timestamp::parse_rfc3339("2024-03-25T22:08:10.500+00:00").unwrap();
        assert_eq!(t.format_rfc3339(), "2024-03-25T22:08:10Z");
        assert_eq!(t.format_rfc3339_nano(), "2024-03-25T22:08:10.5Z");
        let t = Timestamp::parse_rfc3339("2024-03-25T22:08:10-05:30").unwrap();
        assert_eq!(t.format_rfc3339(), "2024-03-25T22:08:10-05:30");
        assert!(Timestamp::parse_rfc3339("2024-02-30T00:00:00Z").is_none());
        assert!(Timestamp::parse_rfc3339("2024-3-25T22:08:10Z").is_none());
        assert!(Timestamp::parse_rfc3339("2024-03-25 22:08:10Z").is_none());
        let t = Timestamp::parse_yaml("2001-12-14").unwrap();
        assert_eq!(t.format_rfc3339_nano(), "2001-12-14T00:00:00Z");
        let t = Timestamp::parse_yaml("2001-12-14t21:59:43.10-05:00").unwrap();
        assert_eq!(t.format_rfc3339_nano(), "2001-12-14T21:59:43.1-05:00");
        let t = Timestamp::parse_yaml("2001-1-4 1:2:3").unwrap();
        assert_eq!(t.format_rfc3339_nano(), "2001-01-04T01:02:03Z");
        assert!(Timestamp::parse_yaml("2001-12-14 21:59:43.10 -5").is_none());
        assert!(Timestamp::parse_yaml("20011-12-14").is_none());
    }

    #[test]
    fn yaml_resolution() {
        let kind = |s: &str| match resolve_plain(s) {
            Resolved::Null => "null".to_string(),
            Resolved::Bool(b) => format!("bool:{b}"),
            Resolved::Int(i) => format!("int:{i}"),
            Resolved::BigInt => "bigint".into(),
            Resolved::Float(f) => format!("float:{}", format_float(f)),
            Resolved::Time(t) => format!("time:{}", t.format_rfc3339_nano()),
            Resolved::Str => "str".into(),
        };
        assert_eq!(kind("~"), "null");
        assert_eq!(kind("True"), "bool:true");
        assert_eq!(kind("yes"), "str");
        assert_eq!(kind("on"), "str");
        assert_eq!(kind("42"), "int:42");
        assert_eq!(kind("-42"), "int:-42");
        assert_eq!(kind("0x1F"), "int:31");
        assert_eq!(kind("0o17"), "int:15");
        assert_eq!(kind("017"), "int:15");
        assert_eq!(kind("09"), "float:9");
        assert_eq!(kind("1_000"), "int:1000");
        assert_eq!(kind("0b101"), "int:5");
        assert_eq!(kind("1.50"), "float:1.5");
        assert_eq!(kind(".5"), "float:0.5");
        assert_eq!(kind("1e3"), "float:1000");
        assert_eq!(kind(".inf"), "float:+Inf");
        assert_eq!(kind("-.inf"), "float:-Inf");
        assert_eq!(kind("18446744073709551615"), "bigint");
        // Beyond u64, Go's ParseInt and ParseUint fail and it is a float.
        assert_eq!(kind("99999999999999999999"), "float:100000000000000000000");
        assert_eq!(kind("2024-01-02"), "time:2024-01-02T00:00:00Z");
        assert_eq!(kind("1.2.3"), "str");
        assert_eq!(kind("-"), "str");
        assert_eq!(kind("+1"), "int:1");
        assert_eq!(kind("12:30"), "str");
    }
}
