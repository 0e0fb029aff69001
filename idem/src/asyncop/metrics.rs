//! The dispatcher's counters (protocol §9.8). Pending depth and the age of the
//! oldest operation come from the store ([`Queue::queue_stats`]), since the
//! queue is shared by every instance.
//!
//! [`Queue::queue_stats`]: crate::store::Queue::queue_stats

use std::sync::atomic::{AtomicU64, Ordering};

use crate::engine::Histogram;

/// What this instance's dispatchers did. Relaxed atomics, as the engine's
/// [`Metrics`](crate::engine::Metrics).
#[derive(Debug, Default)]
pub struct DispatchMetrics {
    /// Upstream calls started (every attempt).
    pub attempts: AtomicU64,
    /// Attempts that failed and were scheduled again.
    pub retries: AtomicU64,
    /// Operations done with an answer of a stored status.
    pub completed: AtomicU64,
    /// Operations done with the stored 502 after their last attempt.
    pub final_failures: AtomicU64,
    /// Attempts whose operation another dispatcher took over (the lease
    /// ran out) or that was purged meanwhile: their outcome was dropped.
    pub lost: AtomicU64,
    /// Store calls of the dispatchers that failed.
    pub store_errors: AtomicU64,
    /// Upstream calls running now.
    pub in_flight: AtomicU64,
    /// How long each upstream call took, one observation per attempt
    /// (calls over the last bucket count only in the sum and count).
    pub dispatch_latency: Histogram,
}

/// The counters of [`DispatchMetrics`] at one moment, as plain numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DispatchCounts {
    /// See [`DispatchMetrics::attempts`].
    pub attempts: u64,
    /// See [`DispatchMetrics::retries`].
    pub retries: u64,
    /// See [`DispatchMetrics::completed`].
    pub completed: u64,
    /// See [`DispatchMetrics::final_failures`].
    pub final_failures: u64,
    /// See [`DispatchMetrics::lost`].
    pub lost: u64,
    /// See [`DispatchMetrics::store_errors`].
    pub store_errors: u64,
    /// See [`DispatchMetrics::in_flight`].
    pub in_flight: u64,
}

impl DispatchMetrics {
    /// The counters now (each read on its own: a snapshot, not a
    /// transaction).
    #[must_use]
    pub fn counts(&self) -> DispatchCounts {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DispatchCounts {
            attempts: read(&self.attempts),
            retries: read(&self.retries),
            completed: read(&self.completed),
            final_failures: read(&self.final_failures),
            lost: read(&self.lost),
            store_errors: read(&self.store_errors),
            in_flight: read(&self.in_flight),
        }
    }

    pub(super) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
