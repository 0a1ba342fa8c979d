//! Where log lines go: standard error, one `write` per line, or per batch on server threads.
//!
//! A busy proxy writes a line per request. Server threads (see [`crate::server::start_threads`])
//! collect their lines and write them together when the thread goes idle or 8 KiB are waiting,
//! so a burst of requests costs one `write` instead of one each; nginx's `access_log … buffer=`
//! does the same. Every other thread writes each line at once. Lines are written whole, and
//! through a duplicate of the descriptor: threads never queue on the lock that
//! `std::io::Stderr` holds across each write.

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, Write};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::Level;

/// The target of the per-request access line.
pub const ACCESS_TARGET: &str = "credproxy::access";

/// The event format: tracing-subscriber's usual line (time, level, message and fields, ANSI
/// escapes in messages neutralised), except for access lines, which are written directly:
/// their message is built by credproxy from a parsed request (method, URI path, numbers),
/// which cannot hold control characters, so the character-by-character escaping, a good part
/// of a small request's logging cost, has nothing to do.
#[derive(Debug, Default)]
pub struct Format {
    other: tracing_subscriber::fmt::format::Format,
}

impl Format {
    /// The format, with the target left out of ordinary lines.
    pub fn new() -> Self {
        Self {
            other: tracing_subscriber::fmt::format::Format::default().with_target(false),
        }
    }
}

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for Format
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        if event.metadata().target() != ACCESS_TARGET {
            return self.other.format_event(ctx, writer, event);
        }
        write_timestamp(&mut writer, std::time::SystemTime::now())?;
        writer.write_str(match *event.metadata().level() {
            Level::ERROR => " ERROR ",
            Level::WARN => "  WARN ",
            Level::INFO => ACCESS_LEVEL,
            Level::DEBUG => " DEBUG ",
            Level::TRACE => " TRACE ",
        })?;
        let mut message = MessageOnly {
            writer: &mut writer,
            result: Ok(()),
        };
        event.record(&mut message);
        message.result?;
        writer.write_char('\n')
    }
}

/// Set by [`access_lines_direct`].
static DIRECT: AtomicBool = AtomicBool::new(false);

/// Declares that the installed subscriber is this module's [`Format`] writing to [`Stderr`],
/// as the binary sets it up: server threads then write access lines into their batch
/// themselves, the text the subscriber would write, without the trip through it (event
/// dispatch, the subscriber's buffer, a second copy). The level filter still decides.
pub fn access_lines_direct() {
    DIRECT.store(true, Ordering::Relaxed);
}

/// Logs the access line of a finished request: `method=GET path=/p status=200 up=0 down=21 ms=1`.
///
/// The line is put together here, numbers without `core::fmt`'s machinery, and handed to
/// tracing as one ready message, or, on a server thread of the binary, written straight into
/// the thread's batch (see [`access_lines_direct`]): a small request's whole cost is a few
/// microseconds, and logging was a good part of it.
pub fn access(method: &http::Method, path: &str, status: u16, up: u64, down: u64, ms: u128) {
    if !tracing::enabled!(target: ACCESS_TARGET, Level::INFO) {
        return;
    }
    thread_local! {
        static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    let direct = DIRECT.load(Ordering::Relaxed) && batching();
    let log = |line: &mut Vec<u8>| {
        line.clear();
        if direct {
            line.extend_from_slice(&timestamp(std::time::SystemTime::now()));
            line.extend_from_slice(ACCESS_LEVEL.as_bytes());
        }
        line.extend_from_slice(b"method=");
        line.extend_from_slice(method.as_str().as_bytes());
        line.extend_from_slice(b" path=");
        line.extend_from_slice(path.as_bytes());
        line.extend_from_slice(b" status=");
        push_decimal(line, status.into());
        line.extend_from_slice(b" up=");
        push_decimal(line, up);
        line.extend_from_slice(b" down=");
        push_decimal(line, down);
        line.extend_from_slice(b" ms=");
        push_decimal(line, u64::try_from(ms).unwrap_or(u64::MAX));
        if direct {
            line.push(b'\n');
            let _ = Line.write_all(line);
        } else {
            // Text and ASCII digits only: always UTF-8.
            let text = std::str::from_utf8(line).unwrap_or_default();
            tracing::info!(target: ACCESS_TARGET, "{text}");
        }
    };
    let reused = LINE.try_with(|line| match line.try_borrow_mut() {
        Ok(mut line) => {
            log(&mut line);
            true
        }
        Err(_) => false,
    });
    if reused != Ok(true) {
        log(&mut Vec::new());
    }
}

/// What [`Format`] writes between an access line's time and its message.
const ACCESS_LEVEL: &str = "  INFO ";

/// Whether the calling thread collects its lines (see [`batch_thread`]).
fn batching() -> bool {
    BATCH
        .try_with(|batch| batch.try_borrow().is_ok_and(|batch| batch.is_some()))
        .unwrap_or(false)
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Writes `time` as tracing-subscriber's `SystemTime` timer does (RFC 3339 in UTC with
/// microseconds: `2026-11-27T08:00:00.000000Z`), so access lines and other lines match.
fn write_timestamp(
    writer: &mut impl std::fmt::Write,
    time: std::time::SystemTime,
) -> std::fmt::Result {
    // ASCII by construction.
    writer.write_str(std::str::from_utf8(&timestamp(time)).unwrap_or_default())
}

/// The text of [`write_timestamp`]. The date and time of day are worked out once per second
/// per thread.
fn timestamp(time: std::time::SystemTime) -> [u8; 27] {
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

/// Writes an event's `message` field as it is.
struct MessageOnly<'a, 'w> {
    writer: &'a mut tracing_subscriber::fmt::format::Writer<'w>,
    result: std::fmt::Result,
}

impl tracing::field::Visit for MessageOnly<'_, '_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            // The message is `format_args!`, whose Debug is its plain text.
            self.result = std::fmt::Write::write_fmt(self.writer, format_args!("{value:?}"));
        }
    }
}

/// Lines waiting on a server thread are written once they reach this many bytes.
const BATCH_BYTES: usize = 8 * 1024;

static STDERR: OnceLock<Option<File>> = OnceLock::new();

thread_local! {
    /// `Some` on threads that batch (server threads), holding their waiting lines.
    static BATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
}

/// The lines a server thread has not written yet; written when dropped (the thread ends).
struct Batch(Vec<u8>);

impl Drop for Batch {
    fn drop(&mut self) {
        write_out(&self.0);
    }
}

/// The `tracing_subscriber` writer for the binary's log output.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line
    }
}

/// One log line (the formatter writes each event with a single `write_all`).
#[derive(Debug)]
pub struct Line;

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let batched = BATCH
            .try_with(|batch| {
                let mut batch = batch.borrow_mut();
                let Some(Batch(waiting)) = batch.as_mut() else {
                    return false;
                };
                waiting.extend_from_slice(buf);
                if waiting.len() >= BATCH_BYTES {
                    write_out(waiting);
                    waiting.clear();
                }
                true
            })
            .unwrap_or(false);
        if !batched {
            write_out(buf);
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Makes the calling thread collect its log lines until [`flush_thread`] (or the thread ends).
pub fn batch_thread() {
    BATCH.with(|batch| {
        batch
            .borrow_mut()
            .get_or_insert_with(|| Batch(Vec::with_capacity(BATCH_BYTES)));
    });
}

/// Writes the lines the calling thread has collected; called when a server thread goes idle.
pub fn flush_thread() {
    let _ = BATCH.try_with(|batch| {
        if let Some(Batch(waiting)) = batch.borrow_mut().as_mut()
            && !waiting.is_empty()
        {
            write_out(waiting);
            waiting.clear();
        }
    });
}

fn write_out(bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    // A log line that cannot be written has nowhere to be reported: it is dropped.
    let _ = match stderr_file() {
        Some(mut file) => file.write_all(bytes),
        None => io::stderr().write_all(bytes),
    };
}

/// A duplicate of the standard error descriptor, where the platform allows one.
fn stderr_file() -> Option<&'static File> {
    STDERR
        .get_or_init(|| {
            #[cfg(unix)]
            {
                use std::os::fd::AsFd as _;
                io::stderr()
                    .as_fd()
                    .try_clone_to_owned()
                    .ok()
                    .map(File::from)
            }
            #[cfg(not(unix))]
            {
                None
            }
        })
        .as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting() -> usize {
        BATCH.with(|b| b.borrow().as_ref().map_or(0, |b| b.0.len()))
    }

    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The binary's subscriber setup (this module's Format, no colours), writing to `out`.
    fn capturing(out: &Captured) -> impl tracing::Subscriber + Send + Sync + use<> {
        let writer = out.clone();
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .event_format(Format::new())
            .finish()
    }

    #[test]
    fn access_lines_are_written_as_is_and_other_lines_as_usual() {
        let out = Captured::default();
        tracing::subscriber::with_default(capturing(&out), || {
            tracing::info!(target: ACCESS_TARGET, "method={} path={} status={}", "GET", "/a", 200);
            tracing::warn!(target: "credproxy::proxy", "upstream said \u{1b}[31mred");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        // `2026-11-27T08:00:00.000000Z  INFO method=GET path=/a status=200`
        let (time, access) = lines[0].split_once(' ').unwrap();
        assert!(time.ends_with('Z') && time.contains('T'), "{time}");
        assert_eq!(access, " INFO method=GET path=/a status=200");
        // Other lines keep tracing-subscriber's format, escapes neutralised, no target.
        let (_, warning) = lines[1].split_once(' ').unwrap();
        assert!(warning.starts_with(" WARN upstream said "), "{warning}");
        assert!(!warning.contains('\u{1b}') && !warning.contains("credproxy::proxy"));
        // What the access line relies on: a request target with control characters never
        // becomes a URI (hyper's parser refuses it even earlier).
        for target in ["/a\u{1b}[31m", "/a\nforged", "/a\r", "/a\u{7f}"] {
            assert!(http::Uri::try_from(target).is_err(), "{target:?}");
        }
    }

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
    fn access_lines_carry_the_request_numbers() {
        let out = Captured::default();
        tracing::subscriber::with_default(capturing(&out), || {
            access(&http::Method::PUT, "/api/assets", 201, 1_048_576, 0, 12);
            access(&http::Method::GET, "/", 502, 0, u64::MAX, u128::MAX);
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().map(|l| l.split_once(' ').unwrap().1).collect();
        assert_eq!(
            lines,
            [
                " INFO method=PUT path=/api/assets status=201 up=1048576 down=0 ms=12",
                " INFO method=GET path=/ status=502 up=0 down=18446744073709551615 ms=18446744073709551615",
            ]
        );
    }

    #[test]
    fn server_threads_write_access_lines_as_the_subscriber_would() {
        let request = || access(&http::Method::GET, "/api/ping", 200, 0, 21, 3);
        // A thread that does not batch: the line goes through the subscriber.
        let through = Captured::default();
        tracing::subscriber::with_default(capturing(&through), request);
        let through = String::from_utf8(through.0.lock().unwrap().clone()).unwrap();
        // A server thread of the binary: the same text, written into its batch directly.
        let bypassed = Captured::default();
        let direct = {
            let bypassed = bypassed.clone();
            std::thread::spawn(move || {
                access_lines_direct();
                batch_thread();
                tracing::subscriber::with_default(capturing(&bypassed), request);
                let line = BATCH.with(|b| std::mem::take(&mut b.borrow_mut().as_mut().unwrap().0));
                String::from_utf8(line).unwrap()
            })
            .join()
            .unwrap()
        };
        assert!(
            bypassed.0.lock().unwrap().is_empty(),
            "the subscriber was used"
        );
        let without_time = |line: &str| line.split_once(' ').unwrap().1.to_owned();
        assert_eq!(without_time(&direct), without_time(&through));
        assert_eq!(
            without_time(&direct),
            " INFO method=GET path=/api/ping status=200 up=0 down=21 ms=3\n"
        );
        let (time, _) = direct.split_once(' ').unwrap();
        assert!(time.len() == 27 && time.ends_with('Z'), "{time}");
    }

    #[test]
    fn server_threads_collect_lines_until_idle_or_full() {
        std::thread::spawn(|| {
            // Not a server thread: nothing is kept back.
            Line.write_all(b"direct\n").unwrap();
            assert_eq!(waiting(), 0);

            batch_thread();
            Line.write_all(b"first\n").unwrap();
            Line.write_all(b"second\n").unwrap();
            assert_eq!(waiting(), 13);
            flush_thread();
            assert_eq!(waiting(), 0);

            // A full batch goes out without waiting for idleness.
            let line = vec![b'x'; 1000];
            for _ in 0..=(BATCH_BYTES / line.len()) {
                Line.write_all(&line).unwrap();
            }
            assert_eq!(waiting(), 0);
            Line.write_all(&line).unwrap();
            assert_eq!(waiting(), line.len());
        })
        .join()
        .unwrap();
    }
}
