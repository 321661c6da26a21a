//! Formatting for people: UTC timestamps and ages, without a date library.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `2025-11-22T15:04:05Z`.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// How long ago `then` was, seen from `now`: `42s ago`, `5m ago`, `3h ago`,
/// `2d ago`; `-` when unknown (0), `ahead` when the device clock is ahead.
pub fn ago(then: u64, now: u64) -> String {
    if then == 0 {
        return "-".into();
    }
    let Some(d) = now.checked_sub(then) else {
        return "ahead".into();
    };
    match d {
        0..=119 => format!("{d}s ago"),
        120..=7199 => format!("{}m ago", d / 60),
        7200..=172_799 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86_400),
    }
}

/// Left-aligned columns, two spaces apart.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 < r.len() {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_763_823_845), "2025-11-22T15:04:05Z");
    }

    #[test]
    fn ages() {
        assert_eq!(ago(0, 100), "-");
        assert_eq!(ago(100, 100), "0s ago");
        assert_eq!(ago(100, 400), "5m ago");
        assert_eq!(ago(100, 100 + 3 * 3600), "3h ago");
        assert_eq!(ago(100, 100 + 3 * 86_400), "3d ago");
        assert_eq!(ago(200, 100), "ahead");
    }

    #[test]
    fn tables_align() {
        let t =
            table(&[vec!["A".into(), "BB".into(), "C".into()], vec!["aaa".into(), "b".into(), "".into()]]);
        assert_eq!(t, "A    BB  C\naaa  b\n");
    }
}
