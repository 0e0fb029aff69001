//! The engine: SPEC §3 steps 5–9, §5 and §6 over any [`Store`].
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
//! A request that is cancelled while it holds a reservation (its future is
//! dropped) releases it in the background, best effort.
//!
//! The function-level API, [`Engine::once`], is in `once.rs`, above the
//! engine.

use std::collections::HashMap;
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::policy::{Concurrent, FailMode};
use crate::record::{CompletedRecord, Record, StoredResponse, Token};
use crate::store::{Fence, Reservation, Store, StoreError};

/// The per-call settings [`Engine::run`] takes; defined in
/// [`policy`](crate::policy), next to the policy they come from.
pub use crate::policy::Rules;

/// What an operation hands back: its output and what the store keeps.
#[derive(Debug)]
pub struct Finish<R> {
    /// What the caller of [`Engine::run`] gets back.
    pub output: R,
    /// What happens to the reservation.
    pub action: Action,
}

/// What happens to the reservation once the operation finished (SPEC §3.9).
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

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Every store call is abandoned after this long.
    pub store_timeout: Duration,
    /// Bytes of completed records kept in the local cache (0 disables it).
    pub local_cache_bytes: u64,
    /// Longest pause between two polls of a waited-on key (the fallback
    /// for lost notifications).
    pub poll_interval: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            store_timeout: Duration::from_secs(2),
            local_cache_bytes: 64 * 1024 * 1024,
            poll_interval: Duration::from_millis(250),
        }
    }
}

/// Counters by outcome (SPEC §10). Cheap relaxed atomics.
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
    /// Local cache hits.
    pub cache_hits: AtomicU64,
    /// Local cache misses (lookups that went to the store).
    pub cache_misses: AtomicU64,
    /// Operations executing right now.
    pub in_flight: AtomicU64,
    /// Latency of every store call.
    pub store_latency: Histogram,
}

impl Metrics {
    fn inc(counter: &AtomicU64) {
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
    cache: Option<moka::sync::Cache<StoreKey, Arc<CompletedRecord>>>,
    flights: Flights,
    metrics: Metrics,
}

/// What a key's single-flight watcher has seen.
#[derive(Debug, Clone)]
enum FlightState {
    Pending {
        lease_remaining: Duration,
    },
    Completed(Arc<CompletedRecord>),
    /// Released or lease expired: waiters try to reserve again.
    Vacant,
    Failed,
}

const FLIGHT_SHARDS: usize = 16;

#[derive(Default)]
struct Flights {
    shards: [Mutex<HashMap<StoreKey, watch::Receiver<FlightState>>>; FLIGHT_SHARDS],
    hasher: std::collections::hash_map::RandomState,
}

impl Flights {
    fn shard(&self, key: &StoreKey) -> &Mutex<HashMap<StoreKey, watch::Receiver<FlightState>>> {
        // Truncating the hash to pick a shard is intended.
        &self.shards[(self.hasher.hash_one(key) % FLIGHT_SHARDS as u64) as usize]
    }
}

struct CacheExpiry;

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
                    u32::try_from(k.as_str().len() + v.response.weight()).unwrap_or(u32::MAX)
                })
                .expire_after(CacheExpiry)
                .build()
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
        let started = Instant::now();
        let r = match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(timeout)),
        };
        let m = &self.inner.metrics;
        m.store_latency.observe(started.elapsed());
        r.inspect_err(|_| Metrics::inc(&m.store_error))
    }

    /// Runs `op` at most once per `key` and `fingerprint` (SPEC §3).
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
        let reservation = match reserved {
            Ok(r) => r,
            Err(error) => return self.store_failed(key, rules, error, op).await,
        };
        match reservation {
            Reservation::Acquired(lease) => {
                Outcome::Executed(self.execute(key, fingerprint, lease.token, rules, op).await)
            }
            Reservation::Completed(record) => Outcome::Replayed(self.replayed(key, record)),
            Reservation::Mismatch => {
                Metrics::inc(&m.mismatch);
                Outcome::Mismatch
            }
            Reservation::InFlight { lease_remaining } => match rules.concurrent {
                Concurrent::Reject => {
                    Metrics::inc(&m.conflict);
                    Outcome::InProgress {
                        retry_after: lease_remaining,
                    }
                }
                Concurrent::Wait => {
                    self.wait(key, fingerprint, rules, lease_remaining, op)
                        .await
                }
            },
        }
    }

    fn replayed(&self, key: &StoreKey, record: Arc<CompletedRecord>) -> Arc<CompletedRecord> {
        Metrics::inc(&self.inner.metrics.replayed);
        if let Some(c) = &self.inner.cache {
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
                tracing::warn!(%key, %error, "store unavailable; failing closed");
                Outcome::StoreUnavailable { error }
            }
            FailMode::Open => {
                tracing::warn!(%key, %error, "store unavailable; executing WITHOUT protection (fail = open)");
                Metrics::inc(&self.inner.metrics.bypass);
                Outcome::Bypassed(op().await.output)
            }
        }
    }

    /// Waits for the holder of `key` to finish (SPEC §5 `wait`).
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
            let mut rx = self.join_flight(key);
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
                    Metrics::inc(&m.waited);
                    if record.fingerprint != fingerprint {
                        Metrics::inc(&m.mismatch);
                        return Outcome::Mismatch;
                    }
                    return Outcome::Replayed(self.replayed(key, record));
                }
                FlightState::Failed | FlightState::Vacant => {}
            }
            // Vacant (or the watcher failed): try to take the key ourselves.
            let reserved = self
                .call(self.inner.store.reserve(key, fingerprint, rules.lease))
                .await;
            match reserved {
                Err(error) => return self.store_failed(key, rules, error, op).await,
                Ok(Reservation::Acquired(lease)) => {
                    Metrics::inc(&m.waited);
                    return Outcome::Executed(
                        self.execute(key, fingerprint, lease.token, rules, op).await,
                    );
                }
                Ok(Reservation::Completed(record)) => {
                    Metrics::inc(&m.waited);
                    return Outcome::Replayed(self.replayed(key, record));
                }
                Ok(Reservation::Mismatch) => {
                    Metrics::inc(&m.mismatch);
                    return Outcome::Mismatch;
                }
                Ok(Reservation::InFlight { lease_remaining: l }) => {
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

    /// Joins the watcher of `key`, starting one if there is none: all
    /// waiters of a key in this process share ONE subscription and poll loop.
    fn join_flight(&self, key: &StoreKey) -> watch::Receiver<FlightState> {
        let shard = self.inner.flights.shard(key);
        let mut map = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(rx) = map.get(key) {
            // Join only a live watcher that has no verdict yet; one that is
            // finishing would hand back a stale verdict.
            if rx.has_changed().is_ok() && matches!(*rx.borrow(), FlightState::Pending { .. }) {
                return rx.clone();
            }
        }
        let (tx, rx) = watch::channel(FlightState::Pending {
            lease_remaining: Duration::ZERO,
        });
        map.insert(key.clone(), rx.clone());
        drop(map);
        let engine = self.clone();
        let key = key.clone();
        tokio::spawn(async move {
            engine.watch_flight(&key, &tx).await;
            let shard = engine.inner.flights.shard(&key);
            let mut map = shard.lock().unwrap_or_else(PoisonError::into_inner);
            // Remove our entry only: a newer watcher may have replaced it.
            if map
                .get(&key)
                .is_some_and(|rx| rx.same_channel(&tx.subscribe()))
            {
                map.remove(&key);
            }
        });
        rx
    }

    async fn watch_flight(&self, key: &StoreKey, tx: &watch::Sender<FlightState>) {
        let store = &self.inner.store;
        let mut sub = match self.call(store.subscribe(key)).await {
            Ok(s) => Some(s),
            Err(error) => {
                tracing::debug!(%key, %error, "subscribe failed; polling only");
                None
            }
        };
        let mut pause = Duration::from_millis(5);
        loop {
            let state = match self.call(store.get(key)).await {
                Err(_) => FlightState::Failed,
                Ok(None) => FlightState::Vacant,
                Ok(Some(Record::Completed(r))) => FlightState::Completed(r),
                Ok(Some(Record::InFlight {
                    lease_remaining, ..
                })) if lease_remaining.is_zero() => FlightState::Vacant,
                Ok(Some(Record::InFlight {
                    lease_remaining, ..
                })) => FlightState::Pending { lease_remaining },
            };
            let FlightState::Pending { lease_remaining } = state else {
                tx.send_replace(state);
                return;
            };
            tx.send_replace(state);
            // Poll again soon, and no later than the lease's end.
            let sleep = pause.min(lease_remaining + Duration::from_millis(1));
            pause = (pause * 2).min(self.inner.config.poll_interval);
            tokio::select! {
                () = tx.closed() => return,
                () = tokio::time::sleep(sleep) => {}
                () = async {
                    match sub.as_mut() {
                        Some(s) => s.changed().await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
    }

    /// Runs `op` under the lease, with heartbeat, then finishes (SPEC §3.8–9).
    async fn execute<R, F, Fut>(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        token: Token,
        rules: &Rules,
        op: F,
    ) -> R
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Finish<R>>,
    {
        let m = &self.inner.metrics;
        Metrics::inc(&m.executed);
        m.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut guard = LeaseGuard {
            engine: self.clone(),
            key: Some(key.clone()),
            token,
        };
        let op = op();
        tokio::pin!(op);
        let mut lease_ends = Instant::now() + rules.lease;
        let heartbeat = async {
            let every = (rules.lease / 3).max(Duration::from_millis(10));
            let mut tick = tokio::time::interval_at(Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let at = Instant::now();
                match self
                    .call(self.inner.store.extend(key, token, rules.lease))
                    .await
                {
                    Ok(Fence::Held) => lease_ends = at + rules.lease,
                    Ok(Fence::Lost) => {
                        tracing::warn!(%key, "lease lost while executing; the result will not be stored");
                        return;
                    }
                    Err(error) => tracing::warn!(%key, %error, "heartbeat failed"),
                }
            }
        };
        let finish = tokio::select! {
            f = &mut op => f,
            () = heartbeat => op.await,
        };
        m.in_flight.fetch_sub(1, Ordering::Relaxed);
        match finish.action {
            Action::Store(response) => {
                let now = SystemTime::now();
                let record = Arc::new(CompletedRecord {
                    fingerprint,
                    response,
                    completed_at: now,
                    expires_at: now + rules.retention,
                });
                guard.disarm();
                self.complete(key, token, record, rules.retention, lease_ends)
                    .await;
            }
            Action::Release => {
                guard.disarm();
                match self.call(self.inner.store.release(key, token)).await {
                    Ok(Fence::Held) => {}
                    Ok(Fence::Lost) => self.fenced(key, "release"),
                    Err(error) => {
                        tracing::warn!(%key, %error, "release failed; the key frees itself when the lease runs out");
                    }
                }
            }
            Action::Hold => guard.disarm(),
        }
        finish.output
    }

    /// `complete`, retried with backoff until the lease would run out.
    async fn complete(
        &self,
        key: &StoreKey,
        token: Token,
        record: Arc<CompletedRecord>,
        retention: Duration,
        lease_ends: Instant,
    ) {
        let mut backoff = Duration::from_millis(10);
        loop {
            let r = self
                .call(
                    self.inner
                        .store
                        .complete(key, token, Arc::clone(&record), retention),
                )
                .await;
            match r {
                Ok(Fence::Held) => {
                    if let Some(c) = &self.inner.cache {
                        c.insert(key.clone(), record);
                    }
                    return;
                }
                Ok(Fence::Lost) => return self.fenced(key, "complete"),
                Err(error) if Instant::now() + backoff < lease_ends => {
                    tracing::warn!(%key, %error, ?backoff, "complete failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(error) => {
                    tracing::error!(%key, %error, "complete failed until the lease ran out; the result is NOT stored");
                    return;
                }
            }
        }
    }

    fn fenced(&self, key: &StoreKey, op: &str) {
        Metrics::inc(&self.inner.metrics.fenced);
        tracing::warn!(%key, op, "fenced out: another holder took the key over; nothing stored");
    }
}

/// Releases a reservation (best effort, in the background) if the request
/// is cancelled while it holds it.
struct LeaseGuard<S: Store> {
    engine: Engine<S>,
    key: Option<StoreKey>,
    token: Token,
}

impl<S: Store> LeaseGuard<S> {
    fn disarm(&mut self) {
        self.key = None;
    }
}

impl<S: Store> Drop for LeaseGuard<S> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else {
            return;
        };
        let engine = self.engine.clone();
        let token = self.token;
        engine
            .inner
            .metrics
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                tracing::debug!(%key, "request cancelled; releasing its reservation");
                let _ = engine.call(engine.inner.store.release(&key, token)).await;
            });
        }
    }
}
