//! Wall-clock times as RFC 3339 text in UTC (`2026-11-27T08:00:00.000000Z`), written without
//! `core::fmt` or a date library: every access line carries one (bench/README.md has the
//! figure), and messages about credentials say when they were last accepted.

/// Writes `time` as tracing-subscriber's `SystemTime` timer does (RFC 3339 in UTC with
/// microseconds: `2026-11-27T08:00:00.000000Z`), so access lines and other lines match.
pub fn write_timestamp(
    writer: &mut impl std::fmt::Write,
    time: std::time::SystemTime,
) -> std::fmt::Result {
    // ASCII by construction.
    writer.write_str(std::str::from_utf8(&timestamp(time)).unwrap_or_default())
}

/// The text of [`write_timestamp`]. The date and time of day are worked out once per second
/// per thread.
pub fn timestamp(time: std::time::SystemTime) -> [u8; 27] {
    thread_local! {
        /// The second last formatted on this thread and its `YYYY-MM-DDTHH:MM:SS.` text.
        static SECOND: std::cell::Cell<(u64, [u8; 20])> = const { std::cell::Cell::new((u64::MAX, [0; 20])) };
    }
    let since_epoch = time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since_epoch.as_secs();
    let prefix = SECOND
        .try_with(|cached| {
            let (second, text) = cached.get();
            if second == secs {
                return text;
            }
            let text = second_prefix(secs);
            cached.set((secs, text));
            text
        })
        .unwrap_or_else(|_| second_prefix(secs));
    let mut text = [b'Z'; 27];
    text[..20].copy_from_slice(&prefix);
    let mut n = since_epoch.subsec_micros();
    for digit in text[20..26].iter_mut().rev() {
        *digit = b'0' + (n % 10) as u8;
        n /= 10;
    }
    text
}

/// `YYYY-MM-DDTHH:MM:SS.` for `secs` after the Unix epoch, in UTC (proleptic Gregorian).
fn second_prefix(secs: u64) -> [u8; 20] {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Days to a civil date (Howard Hinnant's algorithm, era of 400 years from 0000-03-01).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = (yoe + era * 400 + u64::from(month <= 2)).min(9999);
    let mut text = *b"0000-00-00T00:00:00.";
    let mut put = |at: usize, width: usize, mut n: u64| {
        for i in (at..at + width).rev() {
            text[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, rem / 3600);
    put(14, 2, rem / 60 % 60);
    put(17, 2, rem % 60);
    text
}

/// `time` to the second, as RFC 3339 in UTC (`2026-11-27T08:00:00Z`), for messages.
pub fn seconds(time: std::time::SystemTime) -> String {
    let text = timestamp(time);
    let mut out = String::from_utf8_lossy(&text[..19]).into_owned();
    out.push('Z');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_rfc3339_with_microseconds() {
        use std::time::{Duration, UNIX_EPOCH};
        let text = |secs: u64, micros: u64| {
            let mut out = String::new();
            write_timestamp(
                &mut out,
                UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros),
            )
            .unwrap();
            out
        };
        // Expected values from Python's datetime.
        assert_eq!(text(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(text(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(text(951_868_799, 999_999), "2000-02-29T23:59:59.999999Z");
        assert_eq!(text(1_795_785_945, 123_456), "2026-11-27T13:25:45.123456Z");
        assert_eq!(text(4_102_444_799, 10), "2099-12-31T23:59:59.000010Z");
        assert_eq!(text(253_402_300_799, 0), "9999-12-31T23:59:59.000000Z");
        // The per-second cache hands back the right second after a change and back.
        assert_eq!(text(1_795_785_946, 1), "2026-11-27T13:25:46.000001Z");
        assert_eq!(text(1_795_785_945, 2), "2026-11-27T13:25:45.000002Z");
    }

    #[test]
    fn messages_show_whole_seconds() {
        use std::time::{Duration, UNIX_EPOCH};
        let time = UNIX_EPOCH + Duration::from_secs(1_795_785_945) + Duration::from_micros(9);
        assert_eq!(seconds(time), "2026-11-27T13:25:45Z");
    }
}
