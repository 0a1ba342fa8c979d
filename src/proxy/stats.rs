//! Per-profile totals: requests, body bytes, upstream errors, rejections, and a latency
//! histogram, all lock-free counters read by the admin listener and the embedding app.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Totals across exchanges, counted as they finish.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests answered (including the proxy's own error answers).
    pub requests: AtomicU64,
    /// Body bytes from clients to the upstream.
    pub bytes_up: AtomicU64,
    /// Body bytes from the upstream to clients.
    pub bytes_down: AtomicU64,
    /// Requests that failed to reach the upstream (DNS, connect, TLS, timeouts, resets).
    pub upstream_errors: AtomicU64,
    /// Requests answered with the rejected-credentials error (gate rejections and back-off).
    pub auth_rejections: AtomicU64,
    /// How long whole exchanges took, head to last byte.
    pub latency: Histogram,
    /// Per route (indexed by [`super::route::Route::index`]: public, LAN): the requests sent
    /// that way and their body bytes.
    pub routes: [RouteTotals; 2],
    /// Changes between the LAN and the public route.
    pub route_switches: AtomicU64,
}

/// What went one route.
#[derive(Debug, Default)]
pub struct RouteTotals {
    /// Requests sent this way.
    pub requests: AtomicU64,
    /// Body bytes from clients to the upstream.
    pub bytes_up: AtomicU64,
    /// Body bytes from the upstream to clients.
    pub bytes_down: AtomicU64,
}

/// Upper bounds (seconds) of the latency histogram's buckets.
pub const LATENCY_BOUNDS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0, 3600.0,
];

/// A fixed-bucket histogram of durations, lock-free.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Counts per bucket (not cumulative); the last slot counts what exceeds every bound.
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn record(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let slot = LATENCY_BOUNDS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Cumulative counts per bound (Prometheus `le` buckets), then the total count.
    pub fn cumulative(&self) -> (Vec<u64>, u64) {
        let mut running = 0;
        let mut out = Vec::with_capacity(LATENCY_BOUNDS.len());
        for bucket in &self.buckets[..LATENCY_BOUNDS.len()] {
            running += bucket.load(Ordering::Relaxed);
            out.push(running);
        }
        let total = running + self.buckets[LATENCY_BOUNDS.len()].load(Ordering::Relaxed);
        (out, total)
    }

    /// The sum of all recorded durations, in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_counts_cumulatively_and_sums() {
        let stats = Stats::default();
        stats.latency.record(Duration::from_micros(500));
        stats.latency.record(Duration::from_millis(30));
        stats.latency.record(Duration::from_secs(7200));
        let (cumulative, total) = stats.latency.cumulative();
        assert_eq!(total, 3);
        assert_eq!(cumulative[0], 1, "{cumulative:?}");
        assert_eq!(cumulative[LATENCY_BOUNDS.len() - 1], 2, "{cumulative:?}");
        assert!((stats.latency.sum_seconds() - 7200.0305).abs() < 1e-6);
        assert_eq!(stats.requests.load(Ordering::Relaxed), 0);
    }
}
