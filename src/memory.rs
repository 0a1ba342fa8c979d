//! Handing memory back to the system, so an idle proxy stays small: freed heap pages after a
//! burst of connections, and code pages once start-up is over and whenever the proxy idles.

/// Returns freed heap pages to the system (glibc keeps them in its arenas otherwise).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_free_memory() {
    unsafe extern "C" {
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    // SAFETY: malloc_trim only releases free memory held by the allocator; it takes no
    // pointers and is safe to call from any thread at any time.
    unsafe {
        malloc_trim(0);
    }
}

/// Returns freed heap pages to the system (nothing to do on this platform).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() {}

/// Unmaps the program's code pages from this process; the pages it then runs are mapped
/// again (from the page cache) on first use.
///
/// Start-up touches most of the binary (argument parsing, the config file, the keyring's
/// D-Bus client, TLS roots), and every page touched stays resident for the life of the
/// process; so does the code of a burst of work, such as the TLS handshakes of new upstream
/// connections (the kernel maps 64 KiB around each page fault, too). Serving needs a fraction
/// of it, an idle proxy almost none. Only the executable, never-written mapping of the
/// binary itself is dropped, so nothing can change: the same file pages come back. Returns
/// the bytes unmapped.
#[cfg(target_os = "linux")]
pub fn shed_code() -> usize {
    SHEDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    unsafe extern "C" {
        fn madvise(
            addr: *mut std::ffi::c_void,
            len: usize,
            advice: std::ffi::c_int,
        ) -> std::ffi::c_int;
    }
    const MADV_DONTNEED: std::ffi::c_int = 4;
    let (Ok(exe), Ok(maps)) = (
        std::fs::read_link("/proc/self/exe"),
        std::fs::read_to_string("/proc/self/maps"),
    ) else {
        return 0;
    };
    let mut shed = 0;
    for (start, end) in code_mappings(&maps, &exe.to_string_lossy()) {
        // SAFETY: the range is a private, read-only, executable file mapping of the binary
        // (text is never written), so discarding its pages only makes the next access fault
        // the identical file page back in. No Rust object lives in it.
        if unsafe { madvise(start as *mut std::ffi::c_void, end - start, MADV_DONTNEED) } == 0 {
            shed += end - start;
        }
    }
    shed
}

static SHEDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many times [`shed_code`] has run in this process.
pub fn code_sheds() -> usize {
    SHEDS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Unmaps code pages (nothing to do on this platform).
#[cfg(not(target_os = "linux"))]
pub fn shed_code() -> usize {
    0
}

/// The `r-xp` mappings of `exe` in a `/proc/self/maps` text, as address ranges.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn code_mappings(maps: &str, exe: &str) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next()?;
            let perms = fields.next()?;
            let path = fields.nth(3)?;
            if perms != "r-xp" || path != exe {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = usize::from_str_radix(start, 16).ok()?;
            let end = usize::from_str_radix(end, 16).ok()?;
            (end > start).then_some((start, end))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_binarys_executable_mappings_are_chosen() {
        let maps = "\
55d0a0000000-55d0a0100000 r--p 00000000 fd:01 42 /usr/bin/credproxy
55d0a0100000-55d0a0700000 r-xp 00100000 fd:01 42 /usr/bin/credproxy
55d0a0700000-55d0a0800000 r--p 00700000 fd:01 42 /usr/bin/credproxy
55d0a0800000-55d0a0810000 rw-p 00800000 fd:01 42 /usr/bin/credproxy
7f0000000000-7f0000100000 r-xp 00028000 fd:01 7 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000200000-7f0000300000 rw-p 00000000 00:00 0 
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
";
        assert_eq!(
            code_mappings(maps, "/usr/bin/credproxy"),
            vec![(0x55d0a0100000, 0x55d0a0700000)]
        );
        assert!(code_mappings(maps, "/usr/bin/other").is_empty());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn shedding_code_lowers_resident_memory_and_the_code_still_runs() {
        fn resident_file_kib() -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            status
                .lines()
                .find_map(|l| l.strip_prefix("RssFile:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
                .unwrap()
        }
        let before = resident_file_kib();
        let shed = shed_code();
        let after = resident_file_kib();
        assert!(shed > 0, "the test binary has an executable mapping");
        assert!(after < before, "RssFile {before} kB -> {after} kB");
        // Code runs on from pages mapped again on demand.
        let sum: u64 = (1..=1000u64).map(|n| n * n).sum();
        assert_eq!(sum, 333_833_500);
        assert!(code_mappings("", "x").is_empty());
    }
}
