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
