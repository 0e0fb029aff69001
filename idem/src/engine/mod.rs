//! The engine: protocol §3 steps 5–9, §5 and §6 over any [`Store`].
//!
//! [`Engine::run`] takes a scoped key, a fingerprint, the [`Rules`] of the
//! route and the operation as a closure. It answers from the local cache,
//! reserves with ONE atomic store call, and then either replays, rejects,
//! waits (single-flight per key per process) or executes. While the
//! operation runs, a heartbeat extends the lease in the same task. The
//! operation's [`Finish`] says what to keep; `complete`/`release` are fenced
//! and awaited before `run` returns, so no response leaves before its record
//! is stored.
//!
//! An execution that ends without an answer after its operation started
//! (its future dropped by a caller's time-out or `select!`, or a panic)
//! never frees the key by itself: the route's `ambiguous` policy decides,
//! and the default (`hold`) keeps the reservation until its lease runs out,
//! so a retry cannot run the effect a second time (`lease.rs`).
//!
//! This file holds the engine, [`Engine::run`] and the waiting loop; the
//! rest is split by concern:
//!
//! - `flight.rs`: single-flight waiting, one watcher per key per process;
//! - `lease.rs`: executing under a lease (heartbeat, complete-with-retry,
//!   fencing) and the guard that settles it on cancellation or panic;
//! - `metrics.rs`: [`Metrics`] and the store-latency [`Histogram`].
//!
//! The function-level API, [`Engine::once`], is in `once.rs`, above the
//! engine.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::fingerprint::Fingerprint;
use crate::key::{CarriedHash, StoreKey};
use crate::policy::{Concurrent, FailMode};
use crate::record::{CompletedRecord, Record, StoredResponse};
use crate::store::{Decision, Store, StoreError};

use flight::{FlightState, Flights};

/// The per-call settings [`Engine::run`] takes; defined in
/// [`policy`](crate::policy), next to the policy they come from.
pub use crate::policy::Rules;
pub use metrics::{Histogram, Metrics, LATENCY_BUCKETS};

mod flight;
mod lease;
mod metrics;

/// What an operation hands back: its output and what the store keeps.
#[derive(Debug)]
pub struct Finish<R> {
    /// What the caller of [`Engine::run`] gets back.
    pub output: R,
    /// What happens to the reservation.
    pub action: Action,
}

/// What happens to the reservation once the operation finished (protocol §3.9).
#[derive(Debug, Clone)]
pub enum Action {
    /// Store this as the final answer; repeats replay it.
    Store(StoredResponse),
    /// Delete the reservation: an immediate retry executes again.
    Release,
    /// Keep the reservation until its lease runs out, without heartbeat
    /// (ambiguous outcome, `ambiguous = hold`).
    Hold,
}

/// The result of [`Engine::run`].
#[derive(Debug)]
pub enum Outcome<R> {
    /// The operation ran here; this is its output.
    Executed(R),
    /// The store was unreachable and the route fails open: the operation ran
    /// without protection.
    Bypassed(R),
    /// The stored answer of an earlier execution.
    Replayed(Arc<CompletedRecord>),
    /// Another execution holds the key (409); retry after this long.
    InProgress {
        /// Time until the holder's lease runs out.
        retry_after: Duration,
    },
    /// The key was used with a different request (422).
    Mismatch,
    /// The store failed and the route fails closed (503).
    StoreUnavailable {
        /// What failed (for logs; never shown to clients).
        error: StoreError,
    },
}

impl<R> Outcome<R> {
    /// The outcome's name in logs and metrics (protocol §10): `executed`,
    /// `bypass`, `replayed`, `conflict`, `mismatch` or `store_error`.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Executed(_) => "executed",
            Outcome::Bypassed(_) => "bypass",
            Outcome::Replayed(_) => "replayed",
            Outcome::InProgress { .. } => "conflict",
            Outcome::Mismatch => "mismatch",
            Outcome::StoreUnavailable { .. } => "store_error",
        }
    }
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Every store call is abandoned after this long.
    pub store_timeout: Duration,
    /// Bytes of completed records kept in the local cache (0 disables it):
    /// each entry counts its key, its answer and 512 bytes of bookkeeping.
    pub local_cache_bytes: u64,
    /// Longest pause between two polls of a waited-on key (the fallback
    /// for lost notifications).
    pub poll_interval: Duration,
    /// How long a failing `complete` is retried once the operation has
    /// answered (default 5 s; never past the lease). Then the caller gets
    /// its answer unstored and the key is held until its lease runs out
    /// (protocol §6). A budget of its own: the lease is sized for the
    /// operation, not for how long a caller should wait for the store.
    pub complete_retry: Duration,
    /// Most single-flight watchers running at once, one per waited-on key
    /// (default 10 000). A `wait` duplicate that would need one more gets
    /// 409 at once (protocol §5).
    pub max_watchers: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            store_timeout: Duration::from_secs(2),
            local_cache_bytes: 64 * 1024 * 1024,
            poll_interval: Duration::from_millis(250),
            complete_retry: Duration::from_secs(5),
            max_watchers: 10_000,
        }
    }
}

/// The idempotency engine. Cheap to clone; clones share everything.
pub struct Engine<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for Engine<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S> std::fmt::Debug for Engine<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct Inner<S> {
    store: S,
    config: EngineConfig,
    cache: Option<moka::sync::Cache<StoreKey, Arc<CompletedRecord>, CarriedHash>>,
    flights: Flights,
    metrics: Metrics,
}

struct CacheExpiry;

/// What one local-cache entry costs beyond its key and its answer's
/// weight: the cache's own bookkeeping (entry, hash-table slot, access and
/// expiry order) and the allocator's rounding. Measured at ~600 bytes per
/// entry with 100-byte answers (BENCHMARKS.md); counted in the weight so
/// that `local_cache_bytes` bounds the memory the cache really holds.
const CACHE_ENTRY_OVERHEAD: usize = 512;

impl moka::Expiry<StoreKey, Arc<CompletedRecord>> for CacheExpiry {
    fn expire_after_create(
        &self,
        _key: &StoreKey,
        value: &Arc<CompletedRecord>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.remaining())
    }
}

impl<S: Store> Engine<S> {
    /// An engine over `store` with default settings.
    #[must_use]
    pub fn new(store: S) -> Self {
        Self::with_config(store, EngineConfig::default())
    }

    /// An engine over `store`.
    #[must_use]
    pub fn with_config(store: S, config: EngineConfig) -> Self {
        let cache = (config.local_cache_bytes > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(config.local_cache_bytes)
                .weigher(|k: &StoreKey, v: &Arc<CompletedRecord>| {
                    u32::try_from(k.as_str().len() + v.response.weight() + CACHE_ENTRY_OVERHEAD)
                        .unwrap_or(u32::MAX)
                })
                .expire_after(CacheExpiry)
                .build_with_hasher(CarriedHash)
        });
        Self {
            inner: Arc::new(Inner {
                store,
                config,
                cache,
                flights: Flights::default(),
                metrics: Metrics::default(),
            }),
        }
    }

    /// The store.
    #[must_use]
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// The counters.
    #[must_use]
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The settings.
    #[must_use]
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Drops `key` from the local cache (after an admin purge).
    pub fn forget(&self, key: &StoreKey) {
        if let Some(c) = &self.inner.cache {
            c.invalidate(key);
        }
    }

    /// Whether the store answers within the store time-out (for `/readyz`).
    pub async fn ready(&self) -> Result<(), StoreError> {
        let probe = StoreKey::new(&crate::key::Scope::named("idem.readyz"), "probe");
        self.call(self.inner.store.get(&probe)).await.map(|_| ())
    }

    /// The record under `key` (admin inspection).
    pub async fn inspect(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        self.call(self.inner.store.get(key)).await
    }

    /// Deletes the record under `key` from the store and the local cache.
    /// Other instances' local caches keep replaying it until it expires there.
    pub async fn purge(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let purged = self.call(self.inner.store.purge(key)).await;
        self.forget(key);
        purged
    }

    async fn call<T>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let timeout = self.inner.config.store_timeout;
        // One clock read for the latency and the deadline both.
        let started = Instant::now();
        let r = match started.checked_add(timeout) {
            Some(deadline) => tokio::time::timeout_at(deadline, fut)
                .await
                .unwrap_or(Err(StoreError::Timeout(timeout))),
            // Further than an instant reaches: no time-out.
            None => fut.await,
        };
        let m = &self.inner.metrics;
        m.store_latency.observe(started.elapsed());
        r.inspect_err(|_| Metrics::inc(&m.store_error))
    }

    /// Runs `op` at most once per `key` and `fingerprint` (protocol §3).
    ///
    /// `op` is called only if this call wins the reservation (or the store
    /// failed and the route fails open); the returned future completes only
    /// after the result is stored, released or held.
    pub async fn run<R, F, Fut>(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        rules: &Rules,
        op: F,
    ) -> Outcome<R>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Finish<R>>,
    {
        let m = &self.inner.metrics;
        if let Some(cache) = &self.inner.cache {
            match cache.get(key) {
                Some(record) => {
                    Metrics::inc(&m.cache_hits);
                    return if record.fingerprint == fingerprint {
                        Metrics::inc(&m.replayed);
                        Outcome::Replayed(record)
                    } else {
                        Metrics::inc(&m.mismatch);
                        Outcome::Mismatch
                    };
                }
                None => Metrics::inc(&m.cache_misses),
            }
        }
        let reserved = self
            .call(self.inner.store.reserve(key, fingerprint, rules.lease))
            .await;
        // The rare paths (the store failed, waiting for another holder)
        // are boxed: inline, their futures would size every call's.
        let reservation = match reserved {
            Ok(r) => r,
            Err(error) => return Box::pin(self.store_failed(key, rules, error, op)).await,
        };
        match reservation.decide(rules.concurrent) {
            Decision::Execute(lease) => {
                Outcome::Executed(self.execute(key, fingerprint, lease, rules, op).await)
            }
            Decision::Replay(record) => Outcome::Replayed(self.replayed(key, record)),
            Decision::Mismatch => {
                Metrics::inc(&m.mismatch);
                Outcome::Mismatch
            }
            Decision::Conflict { retry_after } => {
                Metrics::inc(&m.conflict);
                Outcome::InProgress { retry_after }
            }
            Decision::Wait { lease_remaining } => {
                Box::pin(self.wait(key, fingerprint, rules, lease_remaining, op)).await
            }
        }
    }

    /// A replayed answer, which the local cache keeps from now on: a key
    /// retried once tends to be retried again. The waiters of one key all
    /// come here with the same record; the first one caches it.
    fn replayed(&self, key: &StoreKey, record: Arc<CompletedRecord>) -> Arc<CompletedRecord> {
        Metrics::inc(&self.inner.metrics.replayed);
        if let Some(c) = self.inner.cache.as_ref().filter(|c| !c.contains_key(key)) {
            c.insert(key.clone(), Arc::clone(&record));
        }
        record
    }

    async fn store_failed<R, F, Fut>(
        &self,
        key: &StoreKey,
        rules: &Rules,
        error: StoreError,
        op: F,
    ) -> Outcome<R>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Finish<R>>,
    {
        match rules.fail {
            FailMode::Closed => {
                tracing::warn!(key = %key.log_id(), %error, "store unavailable; failing closed");
                Outcome::StoreUnavailable { error }
            }
            FailMode::Open => {
                tracing::warn!(key = %key.log_id(), %error, "store unavailable; executing WITHOUT protection (fail = open)");
                Metrics::inc(&self.inner.metrics.bypass);
                Outcome::Bypassed(op().await.output)
            }
        }
    }

    /// Waits for the holder of `key` to finish (protocol §5 `wait`).
    async fn wait<R, F, Fut>(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        rules: &Rules,
        mut lease_remaining: Duration,
        op: F,
    ) -> Outcome<R>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Finish<R>>,
    {
        let m = &self.inner.metrics;
        let deadline = Instant::now() + rules.wait_timeout;
        loop {
            let Some(mut rx) = self.join_flight(key) else {
                // `max_watchers` are running: answer as a timed-out wait.
                tracing::debug!(key = %key.log_id(), "too many waited-on keys; answering 409 without waiting");
                Metrics::inc(&m.conflict);
                return Outcome::InProgress {
                    retry_after: lease_remaining,
                };
            };
            let seen = tokio::time::timeout_at(
                deadline,
                rx.wait_for(|s| !matches!(s, FlightState::Pending { .. })),
            )
            .await
            .map(|r| r.map(|state| state.clone()));
            let state = match seen {
                Err(_) => {
                    // Timed out: report the freshest lease we know of.
                    if let FlightState::Pending { lease_remaining: l } = &*rx.borrow() {
                        lease_remaining = *l;
                    }
                    Metrics::inc(&m.conflict);
                    return Outcome::InProgress {
                        retry_after: lease_remaining,
                    };
                }
                Ok(Ok(state)) => state,
                // The watcher is gone without a verdict: look again.
                Ok(Err(_)) => FlightState::Vacant,
            };
            match state {
                FlightState::Pending { .. } => continue,
                FlightState::Completed(record) => {
                    // One waiter, one outcome: a mismatch is not also
                    // counted as waited.
                    if record.fingerprint != fingerprint {
                        Metrics::inc(&m.mismatch);
                        return Outcome::Mismatch;
                    }
                    Metrics::inc(&m.waited);
                    return Outcome::Replayed(self.replayed(key, record));
                }
                FlightState::Failed | FlightState::Vacant => {}
            }
            // Vacant (or the watcher failed): try to take the key ourselves.
            let reserved = self
                .call(self.inner.store.reserve(key, fingerprint, rules.lease))
                .await;
            let reservation = match reserved {
                Ok(r) => r,
                Err(error) => return self.store_failed(key, rules, error, op).await,
            };
            // Still waiting: a key held by someone else is waited for again.
            match reservation.decide(Concurrent::Wait) {
                Decision::Execute(lease) => {
                    Metrics::inc(&m.waited);
                    return Outcome::Executed(
                        self.execute(key, fingerprint, lease, rules, op).await,
                    );
                }
                Decision::Replay(record) => {
                    Metrics::inc(&m.waited);
                    return Outcome::Replayed(self.replayed(key, record));
                }
                Decision::Mismatch => {
                    Metrics::inc(&m.mismatch);
                    return Outcome::Mismatch;
                }
                Decision::Wait { lease_remaining: l } | Decision::Conflict { retry_after: l } => {
                    lease_remaining = l;
                    if Instant::now() >= deadline {
                        Metrics::inc(&m.conflict);
                        return Outcome::InProgress {
                            retry_after: lease_remaining,
                        };
                    }
                }
            }
        }
    }
}
