//! Locking that a panic elsewhere cannot turn into a second panic.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex` even if a thread panicked while holding it.
///
/// Every mutex in credproxy guards values that are replaced or pushed whole, never left
/// half-written by a panicking holder, so the poison flag carries no information worth a
/// crash of the proxy.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
