//! The one way a request target is written into a log line or an error message: Immich share
//! keys and slugs in the path, and every query value, are replaced by `***`.
//!
//! Immich takes credentials in the request target: share links are `/share/<key>` and
//! `/s/<slug>` on the web, and `?key=`, `?slug=` and `?password=` on the API; any request may
//! carry `?apiKey=` or `?sessionKey=`, and an OAuth callback its `code` and `state`. The path
//! is logged with the segment after `share` or `s` hidden. Of the query only the parameter
//! names are logged, never a value: a list of the dangerous names would miss the next one,
//! and the names alone say what kind of request it was (`?key=***` is a share link).

use std::fmt::{self, Write as _};

/// What is written in place of a hidden value.
pub const HIDDEN: &str = "***";

/// A request target as it may be logged; see [`request_target`].
#[derive(Debug, Clone, Copy)]
pub struct RedactedTarget<'a> {
    path: &'a str,
    query: Option<&'a str>,
}

/// The request target of `uri` with its secrets hidden, to be written with `{}`.
///
/// It borrows the URI and allocates nothing: the access line uses it for every request.
pub fn request_target(uri: &http::Uri) -> RedactedTarget<'_> {
    RedactedTarget {
        path: uri.path(),
        query: uri.query(),
    }
}

impl fmt::Display for RedactedTarget<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_path(self.path, f)?;
        if let Some(query) = self.query {
            f.write_char('?')?;
            write_query(query, f)?;
        }
        Ok(())
    }
}

/// Writes `path` with the segment after each `share` or `s` segment hidden; in one piece when
/// there is none (the usual case).
fn write_path(path: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    // Up to here `path` has been written.
    let mut written = 0;
    let mut hide_next = false;
    let mut start = 0;
    for segment in path.split('/') {
        let end = start + segment.len();
        if !segment.is_empty() {
            if hide_next {
                f.write_str(&path[written..start])?;
                f.write_str(HIDDEN)?;
                written = end;
                hide_next = false;
            } else {
                hide_next = names_a_share(segment);
            }
        }
        start = end + 1;
    }
    f.write_str(&path[written..])
}

/// Whether a path segment is `share` or `s` as Immich's web routes read it: percent-decoded
/// (`%73hare`), in any case.
fn names_a_share(segment: &str) -> bool {
    // `share` spelled with every letter percent-encoded is the longest form that can match.
    segment.len() <= 15
        && (decoded_eq_ignore_case(segment, b"share") || decoded_eq_ignore_case(segment, b"s"))
}

/// Whether `segment`, percent-decoded, is `word` (lowercase ASCII) in any case.
fn decoded_eq_ignore_case(segment: &str, word: &[u8]) -> bool {
    let mut bytes = segment.bytes();
    let mut expected = word.iter();
    loop {
        let byte = match bytes.next() {
            None => return expected.next().is_none(),
            Some(b'%') => {
                let high = bytes.next().and_then(hex_value);
                let low = bytes.next().and_then(hex_value);
                match (high, low) {
                    (Some(high), Some(low)) => high << 4 | low,
                    _ => return false,
                }
            }
            Some(byte) => byte,
        };
        match expected.next() {
            Some(want) if byte.to_ascii_lowercase() == *want => {}
            _ => return false,
        }
    }
}

fn hex_value(byte: u8) -> Option<u8> {
    char::from(byte)
        .to_digit(16)
        .and_then(|digit| u8::try_from(digit).ok())
}

/// Writes the names of `query`'s parameters, each value as [`HIDDEN`]; a parameter without
/// `=` may itself be a token, so it is hidden whole.
fn write_query(query: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    for (index, parameter) in query.split('&').enumerate() {
        if index > 0 {
            f.write_char('&')?;
        }
        match parameter.split_once('=') {
            Some((name, _)) => {
                f.write_str(name)?;
                f.write_char('=')?;
                f.write_str(HIDDEN)?;
            }
            None if parameter.is_empty() => {}
            None => f.write_str(HIDDEN)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(target: &str) -> String {
        request_target(&http::Uri::try_from(target).unwrap()).to_string()
    }

    #[test]
    fn share_keys_and_slugs_in_the_path_are_hidden() {
        for (target, logged) in [
            ("/share/AbCdEf123", "/share/***"),
            ("/share/AbCdEf123/", "/share/***/"),
            (
                "/share/AbCdEf123/photos/4f1c-asset",
                "/share/***/photos/4f1c-asset",
            ),
            ("/s/holiday-2025", "/s/***"),
            ("/s/holiday-2025/photos/abc", "/s/***/photos/abc"),
            // Spellings Immich's web routes would still take.
            ("/SHARE/AbCdEf123", "/SHARE/***"),
            ("/%73hare/AbCdEf123", "/%73hare/***"),
            ("/%53/holiday-2025", "/%53/***"),
            ("//share//AbCdEf123", "//share//***"),
            ("/share/a/s/b", "/share/***/s/***"),
        ] {
            assert_eq!(shown(target), logged, "{target}");
        }
    }

    #[test]
    fn every_query_value_is_hidden_and_the_names_kept() {
        for (target, logged) in [
            (
                "/api/shared-links/me?key=AbCdEf123&password=hunter2",
                "/api/shared-links/me?key=***&password=***",
            ),
            (
                "/api/assets/4f1c/thumbnail?size=preview&key=AbCdEf123",
                "/api/assets/4f1c/thumbnail?size=***&key=***",
            ),
            (
                "/api/shared-links/me?slug=holiday-2025",
                "/api/shared-links/me?slug=***",
            ),
            (
                "/api/users/me?apiKey=k1&sessionKey=k2",
                "/api/users/me?apiKey=***&sessionKey=***",
            ),
            (
                "/auth/login?code=c0de&state=st4te",
                "/auth/login?code=***&state=***",
            ),
            ("/x?a=b=c", "/x?a=***"),
            ("/x?bare-token", "/x?***"),
            ("/x?&key=", "/x?&key=***"),
            ("/x?", "/x?"),
        ] {
            assert_eq!(shown(target), logged, "{target}");
        }
    }

    #[test]
    fn ordinary_targets_are_written_as_they_are() {
        for target in [
            "/",
            "/api/server/ping",
            "/api/assets/4f1c-asset/original",
            "/sharing",
            "/shared-links/abc",
            "/api/shared-links/5e1f",
            "/photos/s",
            "/s",
            "/share/",
            "/%7e/%zz",
        ] {
            assert_eq!(shown(target), target);
        }
    }

    /// Counts the heap allocations made on each thread, so a test can see that writing a
    /// target makes none.
    struct Counting;

    thread_local! {
        static ALLOCATIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    // SAFETY: every call goes to the system allocator unchanged; only a counter is added.
    unsafe impl std::alloc::GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
            // SAFETY: the caller's contract is passed on as it is.
            unsafe { std::alloc::System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
            // SAFETY: the caller's contract is passed on as it is.
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    /// Text written into a fixed buffer, never the heap.
    struct Fixed {
        buf: [u8; 128],
        len: usize,
    }

    impl fmt::Write for Fixed {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            let end = self.len + s.len();
            self.buf
                .get_mut(self.len..end)
                .ok_or(fmt::Error)?
                .copy_from_slice(s.as_bytes());
            self.len = end;
            Ok(())
        }
    }

    #[test]
    fn writing_a_target_allocates_nothing() {
        for (target, logged) in [
            ("/api/assets/4f1c/original", "/api/assets/4f1c/original"),
            ("/share/AbCdEf123?key=AbCdEf123", "/share/***?key=***"),
        ] {
            let uri = http::Uri::try_from(target).unwrap();
            let mut out = Fixed {
                buf: [0; 128],
                len: 0,
            };
            let before = ALLOCATIONS.with(std::cell::Cell::get);
            write!(out, "{}", request_target(&uri)).unwrap();
            let allocations = ALLOCATIONS.with(std::cell::Cell::get) - before;
            assert_eq!(&out.buf[..out.len], logged.as_bytes());
            assert_eq!(allocations, 0, "{target}");
        }
    }
}
