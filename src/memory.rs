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

/// How long no client must be connected before the heap's free pages go back to the system:
/// long enough that a client opening one connection per request never pays for it, short
/// enough that an idle proxy is back at its idle size a moment after a burst.
pub const TRIM_AFTER_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Returns freed heap pages to the system each time `idle` is told that the last client left
/// and, [`TRIM_AFTER_IDLE`] later, `connected()` is still none; never returns.
pub async fn trim_when_idle(
    idle: &tokio::sync::Notify,
    connected: impl Fn() -> usize,
) -> std::convert::Infallible {
    loop {
        idle.notified().await;
        tokio::time::sleep(TRIM_AFTER_IDLE).await;
        if connected() == 0 {
            trim();
        }
    }
}
