//! PostgreSQL date/time text forms (DateStyle ISO, TimeZone UTC) ⇄ Unix-epoch numbers.
//!
//! Written by hand rather than with chrono because PostgreSQL's range (4713 BC to 294276 AD,
//! `BC` suffix, `infinity`) is wider than chrono's and must round-trip exactly.

use thiserror::Error;

/// A value that is not a date/time text form this module understands.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("not a PostgreSQL {what} in ISO form: {text:?}")]
pub struct TimeError {
    what: &'static str,
    text: String,
}

fn err(what: &'static str, text: &str) -> TimeError {
    TimeError {
        what,
        text: text.chars().take(64).collect(),
    }
}

/// Days of `date` sent as `i32::MAX` for `infinity` and `i32::MIN` for `-infinity`.
pub const DATE_POS_INFINITY: i32 = i32::MAX;
/// See [`DATE_POS_INFINITY`].
pub const DATE_NEG_INFINITY: i32 = i32::MIN;
/// Microseconds of a timestamp sent for `infinity` (PostgreSQL's own sentinel too).
pub const TS_POS_INFINITY: i64 = i64::MAX;
/// See [`TS_POS_INFINITY`].
pub const TS_NEG_INFINITY: i64 = i64::MIN;

const MICROS_PER_DAY: i64 = 86_400_000_000;

/// Days since 1970-01-01 of a proleptic Gregorian date (astronomical year: 1 BC = 0).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Splits off a trailing ` BC`, returning the rest and whether it was there.
fn strip_bc(s: &str) -> (&str, bool) {
    match s.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (s, false),
    }
}

fn parse_num(s: &str, what: &'static str, text: &str) -> Result<i64, TimeError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || s.len() > 9 {
        return Err(err(what, text));
    }
    s.parse().map_err(|_| err(what, text))
}

/// Parses `YYYY-MM-DD` (year may have more digits) into days since the epoch.
fn parse_ymd(s: &str, bc: bool, what: &'static str, text: &str) -> Result<i64, TimeError> {
    let mut parts = s.splitn(3, '-');
    let (y, m, d) = match (parts.next(), parts.next(), parts.next()) {
        (Some(y), Some(m), Some(d)) => (y, m, d),
        _ => return Err(err(what, text)),
    };
    let mut year = parse_num(y, what, text)?;
    let month = parse_num(m, what, text)?;
    let day = parse_num(d, what, text)?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || year == 0 {
        return Err(err(what, text));
    }
    if bc {
        year = 1 - year;
    }
    Ok(days_from_civil(year, month, day))
}

fn format_ymd(days: i64) -> (String, bool) {
    let (y, m, d) = civil_from_days(days);
    let (year, bc) = if y <= 0 { (1 - y, true) } else { (y, false) };
    (format!("{year:04}-{m:02}-{d:02}"), bc)
}

/// `date` text → days since 1970-01-01 (with the infinity sentinels).
pub fn parse_date(text: &str) -> Result<i32, TimeError> {
    match text {
        "infinity" => return Ok(DATE_POS_INFINITY),
        "-infinity" => return Ok(DATE_NEG_INFINITY),
        _ => {}
    }
    let (s, bc) = strip_bc(text);
    let days = parse_ymd(s, bc, "date", text)?;
    i32::try_from(days).map_err(|_| err("date", text))
}

/// Days since 1970-01-01 → `date` text PostgreSQL reads back to the same value.
pub fn format_date(days: i32) -> String {
    match days {
        DATE_POS_INFINITY => "infinity".into(),
        DATE_NEG_INFINITY => "-infinity".into(),
        _ => {
            let (ymd, bc) = format_ymd(days as i64);
            if bc {
                format!("{ymd} BC")
            } else {
                ymd
            }
        }
    }
}

/// `timestamp` or `timestamptz` text → microseconds since the Unix epoch (UTC for timestamptz,
/// subtracting any `+HH[:MM[:SS]]` offset).
pub fn parse_timestamp(text: &str) -> Result<i64, TimeError> {
    const WHAT: &str = "timestamp";
    match text {
        "infinity" => return Ok(TS_POS_INFINITY),
        "-infinity" => return Ok(TS_NEG_INFINITY),
        _ => {}
    }
    let (s, bc) = strip_bc(text);
    let (date, time) = s.split_once([' ', 'T']).ok_or_else(|| err(WHAT, text))?;
    let days = parse_ymd(date, bc, WHAT, text)?;
    // Time part, then an optional offset starting at the first '+' / '-' or a 'Z'.
    let (clock, offset_secs) = match time.find(['+', '-', 'Z']) {
        Some(i) => {
            let (clock, off) = time.split_at(i);
            (clock, parse_offset(off).ok_or_else(|| err(WHAT, text))?)
        }
        None => (time, 0),
    };
    let (hms, frac) = match clock.split_once('.') {
        Some((hms, frac)) => (hms, Some(frac)),
        None => (clock, None),
    };
    let mut hms_parts = hms.split(':');
    let (h, mi, se) = match (hms_parts.next(), hms_parts.next(), hms_parts.next(), hms_parts.next()) {
        (Some(h), Some(m), Some(s), None) => (h, m, s),
        _ => return Err(err(WHAT, text)),
    };
    let (h, mi, se) = (
        parse_num(h, WHAT, text)?,
        parse_num(mi, WHAT, text)?,
        parse_num(se, WHAT, text)?,
    );
    if h > 24 || mi > 59 || se > 60 {
        return Err(err(WHAT, text));
    }
    let micros_frac = match frac {
        None => 0,
        Some(f) if !f.is_empty() && f.len() <= 6 => parse_num(f, WHAT, text)? * 10_i64.pow(6 - f.len() as u32),
        Some(_) => return Err(err(WHAT, text)),
    };
    let secs = h * 3600 + mi * 60 + se - offset_secs;
    days.checked_mul(MICROS_PER_DAY)
        .and_then(|v| v.checked_add(secs * 1_000_000 + micros_frac))
        .filter(|v| *v != TS_POS_INFINITY && *v != TS_NEG_INFINITY)
        .ok_or_else(|| err(WHAT, text))
}

/// `+HH`, `+HH:MM`, `+HH:MM:SS`, `-…` or `Z` → seconds east of UTC.
fn parse_offset(s: &str) -> Option<i64> {
    if s == "Z" {
        return Some(0);
    }
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let mut secs = 0;
    let mut unit = 3600;
    for part in rest.split(':') {
        if unit == 0 || part.is_empty() || part.len() > 2 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        secs += part.parse::<i64>().ok()? * unit;
        unit /= 60;
    }
    Some(sign * secs)
}

fn split_micros(micros: i64) -> (i64, i64, i64, i64, i64) {
    let days = micros.div_euclid(MICROS_PER_DAY);
    let rem = micros.rem_euclid(MICROS_PER_DAY);
    let secs = rem / 1_000_000;
    (days, secs / 3600, secs / 60 % 60, secs % 60, rem % 1_000_000)
}

fn format_clock(h: i64, m: i64, s: i64, us: i64) -> String {
    if us == 0 {
        format!("{h:02}:{m:02}:{s:02}")
    } else {
        let frac = format!("{us:06}");
        format!("{h:02}:{m:02}:{s:02}.{}", frac.trim_end_matches('0'))
    }
}

/// `time` text (`HH:MM:SS[.ffffff]`, up to `24:00:00`) → microseconds since midnight.
pub fn parse_time(text: &str) -> Result<i64, TimeError> {
    const WHAT: &str = "time";
    let (hms, frac) = match text.split_once('.') {
        Some((hms, frac)) => (hms, Some(frac)),
        None => (text, None),
    };
    let mut parts = hms.split(':');
    let (h, m, s) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(m), Some(s), None) => (
            parse_num(h, WHAT, text)?,
            parse_num(m, WHAT, text)?,
            parse_num(s, WHAT, text)?,
        ),
        _ => return Err(err(WHAT, text)),
    };
    let us = match frac {
        None => 0,
        Some(f) if !f.is_empty() && f.len() <= 6 => parse_num(f, WHAT, text)? * 10_i64.pow(6 - f.len() as u32),
        Some(_) => return Err(err(WHAT, text)),
    };
    let total = ((h * 60 + m) * 60 + s) * 1_000_000 + us;
    if m > 59 || s > 60 || total > MICROS_PER_DAY {
        return Err(err(WHAT, text));
    }
    Ok(total)
}

/// Microseconds since midnight → `time` text.
pub fn format_time(us: i64) -> String {
    let secs = us / 1_000_000;
    format_clock(secs / 3600, secs / 60 % 60, secs % 60, us % 1_000_000)
}

/// Microseconds since the epoch → PostgreSQL text (`YYYY-MM-DD HH:MM:SS[.ffffff][+00][ BC]`).
pub fn format_timestamp(micros: i64, with_zone: bool) -> String {
    match micros {
        TS_POS_INFINITY => return "infinity".into(),
        TS_NEG_INFINITY => return "-infinity".into(),
        _ => {}
    }
    let (days, h, m, s, us) = split_micros(micros);
    let (ymd, bc) = format_ymd(days);
    let zone = if with_zone { "+00" } else { "" };
    let era = if bc { " BC" } else { "" };
    format!("{ymd} {}{zone}{era}", format_clock(h, m, s, us))
}

/// Microseconds since the epoch → ISO-8601 UTC (`YYYY-MM-DDTHH:MM:SS[.ffffff]Z`), the form of
/// Debezium's `io.debezium.time.ZonedTimestamp`. Years before 1 AD are astronomical (`-0043`).
pub fn format_iso_utc(micros: i64) -> String {
    match micros {
        TS_POS_INFINITY => return "infinity".into(),
        TS_NEG_INFINITY => return "-infinity".into(),
        _ => {}
    }
    let (days, h, m, s, us) = split_micros(micros);
    let (y, mo, d) = civil_from_days(days);
    let year = if y < 0 {
        format!("-{:04}", -y)
    } else {
        format!("{y:04}")
    };
    format!("{year}-{mo:02}-{d:02}T{}Z", format_clock(h, m, s, us))
}

/// Inverse of [`format_iso_utc`].
pub fn parse_iso_utc(text: &str) -> Result<i64, TimeError> {
    match text {
        "infinity" => return Ok(TS_POS_INFINITY),
        "-infinity" => return Ok(TS_NEG_INFINITY),
        _ => {}
    }
    // An astronomical year <= 0 is written with a leading '-': turn it into PostgreSQL's BC form.
    if let Some(rest) = text.strip_prefix('-') {
        let (year, tail) = rest.split_once('-').ok_or_else(|| err("timestamp", text))?;
        let year: i64 = parse_num(year, "timestamp", text)?;
        return parse_timestamp(&format!("{:04}-{tail} BC", year + 1));
    }
    if let Some(rest) = text.strip_prefix("0000-") {
        return parse_timestamp(&format!("0001-{rest} BC"));
    }
    parse_timestamp(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip() {
        for (text, days) in [
            ("1970-01-01", 0),
            ("2000-02-29", 11_016),
            ("1969-12-31", -1),
            ("0001-01-01", -719_162),
            ("0001-12-31 BC", -719_163),
        ] {
            assert_eq!(parse_date(text).unwrap(), days, "{text}");
            assert_eq!(format_date(days), text);
        }
        for text in ["4713-01-01 BC", "5874897-12-31"] {
            assert_eq!(format_date(parse_date(text).unwrap()), text);
        }
        assert_eq!(format_date(parse_date("infinity").unwrap()), "infinity");
        assert_eq!(format_date(parse_date("-infinity").unwrap()), "-infinity");
        assert!(parse_date("2024-13-01").is_err());
        assert!(parse_date("yesterday").is_err());
    }

    #[test]
    fn timestamps_round_trip() {
        for text in [
            "1970-01-01 00:00:00",
            "2024-02-29 23:59:59.999999",
            "1900-06-01 12:00:00.5",
            "0044-03-15 12:00:00 BC",
            "200000-12-31 23:59:59.999999",
        ] {
            let us = parse_timestamp(text).unwrap();
            assert_eq!(format_timestamp(us, false), text);
            assert_eq!(parse_iso_utc(&format_iso_utc(us)).unwrap(), us, "{text}");
        }
        assert_eq!(
            parse_timestamp("2024-01-02 03:04:05.123456+00").unwrap(),
            parse_timestamp("2024-01-02 03:04:05.123456").unwrap()
        );
        assert_eq!(
            parse_timestamp("2024-01-02 05:34:05+02:30").unwrap(),
            parse_timestamp("2024-01-02 03:04:05").unwrap()
        );
        assert_eq!(format_timestamp(0, true), "1970-01-01 00:00:00+00");
        assert_eq!(format_iso_utc(1_500), "1970-01-01T00:00:00.0015Z");
        assert_eq!(parse_timestamp("infinity").unwrap(), TS_POS_INFINITY);
        assert!(parse_timestamp("2024-01-02").is_err());
        assert!(parse_timestamp("2024-01-02 25:00:00").is_err());
    }
}
