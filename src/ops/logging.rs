//! Where the binary's log lines go: standard error, one `write` per line, or per batch on
//! busy serving threads, with access lines written as they are.
//!
//! A busy proxy writes a line per request. Threads that [`batch_thread`] collect their lines
//! and write them together when the thread goes idle ([`flush_thread`], from the runtime's
//! park hook) or 8 KiB are waiting, so a burst of requests costs one `write` instead of one
//! each; nginx's `access_log … buffer=` does the same. Other threads write each line at once.
//! Lines are written whole, through a duplicate of the descriptor: threads never queue on
//! the lock that `std::io::Stderr` holds across each write.

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, Write};
use std::sync::OnceLock;

use tracing::Level;

use crate::proxy::body::ACCESS_TARGET;

/// The event format: tracing-subscriber's usual line (time, level, message and fields, ANSI
/// escapes in messages neutralised), except for access lines, which are written directly:
/// their message is built by credproxy from a parsed request (method, redacted request
/// target, numbers), which cannot hold control characters, so the character-by-character escaping, a good part
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
        crate::utc::write_timestamp(&mut writer, std::time::SystemTime::now())?;
        writer.write_str(match *event.metadata().level() {
            Level::ERROR => " ERROR ",
            Level::WARN => "  WARN ",
            Level::INFO => "  INFO ",
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
    fn access_lines_carry_the_request_numbers_and_never_a_share_key() {
        use crate::proxy::body::{Direction, Exchange};
        let out = Captured::default();
        tracing::subscriber::with_default(capturing(&out), || {
            let stats = std::sync::Arc::new(crate::proxy::Stats::default());
            let uri = http::Uri::from_static("/share/path-secret/photos/a1?key=share-secret");
            let exchange = Exchange::new(http::Method::PUT, &uri, stats);
            exchange.set_status(http::StatusCode::CREATED);
            exchange.add(Direction::Up, 1_048_576);
            drop(exchange);
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let (time, line) = text.trim_end().split_once(' ').unwrap();
        assert!(time.len() == 27 && time.ends_with('Z'), "{time}");
        assert!(
            line.starts_with(
                " INFO method=PUT path=/share/***/photos/a1?key=*** status=201 up=1048576 down=0 ms="
            ),
            "{line}"
        );
        assert!(
            !text.contains("share-secret") && !text.contains("path-secret"),
            "{text}"
        );
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
