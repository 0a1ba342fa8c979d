//! Handing freed heap memory back to the system, so an idle proxy returns to its idle size.

/// Returns the allocator's free pages to the system (glibc keeps them in its arenas
/// otherwise, and a burst of connections leaves megabytes of them behind).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim() {
    // SAFETY: malloc_trim only releases memory the allocator holds free; it takes no
    // pointers and may be called from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Returns the allocator's free pages to the system (nothing to do on this platform).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() {}
