//! Counters and the store-latency histogram of an engine (protocol §10).
//!
//! Relaxed atomics only: a counter is one `fetch_add`, cheap enough to keep
//! on every request. The admin listener renders them as Prometheus text.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counters by outcome (protocol §10). Cheap relaxed atomics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Operations executed under a reservation.
    pub executed: AtomicU64,
    /// Stored answers replayed (from the store or the local cache).
    pub replayed: AtomicU64,
    /// Duplicates that waited and then replayed or executed.
    pub waited: AtomicU64,
    /// Concurrent duplicates answered 409.
    pub conflict: AtomicU64,
    /// Keys reused with another request (422).
    pub mismatch: AtomicU64,
    /// Operations run without protection (`fail = open`).
    pub bypass: AtomicU64,
    /// Store failures seen.
    pub store_error: AtomicU64,
    /// `complete`/`release` refused because another holder took over.
    pub fenced: AtomicU64,
    /// Executions cancelled (their future dropped) or panicked after the
    /// operation started: the key was held (or released under
    /// `ambiguous = release`), never simply freed.
    pub cancelled: AtomicU64,
    /// Answers that reached their caller but could not be stored: `complete`
    /// kept failing for `complete_retry` (the key is held until its lease
    /// runs out), or the store refused the record for good, e.g. larger
    /// than the memory store's byte bound (the key is released).
    pub unstored: AtomicU64,
    /// Local cache hits.
    pub cache_hits: AtomicU64,
    /// Local cache misses (lookups that went to the store).
    pub cache_misses: AtomicU64,
    /// Operations executing right now.
    pub in_flight: AtomicU64,
    /// Single-flight watchers running right now (one per waited-on key,
    /// at most `max_watchers`).
    pub watchers: AtomicU64,
    /// Answers that would have been stored but were larger than the route's
    /// `max_response_body`: streamed to the client, not stored, key released.
    pub response_too_large: AtomicU64,
    /// Latency of every store call.
    pub store_latency: Histogram,
}

impl Metrics {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Upper bounds (seconds) of the store-latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A fixed-bucket latency histogram of relaxed atomics (Prometheus style).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations at or under each bound of [`LATENCY_BUCKETS`] (not cumulative).
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Cumulative counts per bound of [`LATENCY_BUCKETS`], the sum in
    /// seconds and the count (observations above the last bound are only
    /// in the count, as Prometheus' `+Inf`).
    #[must_use]
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, f64, u64) {
        let mut acc = 0;
        let cumulative = LATENCY_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(le, n)| {
                acc += n.load(Ordering::Relaxed);
                (*le, acc)
            })
            .collect();
        let sum = Duration::from_nanos(self.sum_nanos.load(Ordering::Relaxed)).as_secs_f64();
        (cumulative, sum, self.count.load(Ordering::Relaxed))
    }
}
