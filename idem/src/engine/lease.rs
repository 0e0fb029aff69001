//! Executing under a lease (protocol §3.8–9): the heartbeat that keeps it, the
//! fenced `complete` (retried for at most `complete_retry`) or `release`,
//! and the [`LeaseGuard`] that settles it when an execution ends without
//! an answer.
//!
//! The [`Lease`] is a permit, as in pingora-cache's lock: the guard owns it
//! while the operation runs and hands it back by value to the step that
//! finishes it. A guard dropped with its lease means the execution's future
//! was dropped (a caller's time-out or `select!`, a client hanging up) or
//! the operation panicked, *after* it started: its effect may have
//! happened. So the guard never simply frees the key; the route's
//! `ambiguous` policy decides (`hold` and `store`: the reservation runs out
//! with its lease, there being no answer to store; `release`: freed at
//! once, in the background).

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::{Action, Engine, Finish, Metrics};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::policy::{Ambiguous, Rules};
use crate::record::CompletedRecord;
use crate::store::{Fence, Lease, Store, StoreError};

impl<S: Store> Engine<S> {
    /// Runs `op` under `lease`, with heartbeat, then finishes (protocol §3.8–9).
    pub(super) async fn execute<R, F, Fut>(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease: Lease,
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
        let token = lease.token;
        let mut guard = LeaseGuard {
            engine: self.clone(),
            key: key.clone(),
            lease: Some(lease),
            started: false,
            ambiguous: rules.ambiguous,
        };
        // From here on the operation may have had its effect (even the
        // closure's synchronous part may have): a drop must not free the key.
        guard.started = true;
        // Pinned where it is made: `tokio::pin!` moves it into a second
        // local, and the first keeps a slot of its size in this future.
        let mut op = std::pin::pin!(op());
        let started = Instant::now();
        let mut lease_ends = started + rules.lease;
        let heartbeat = async {
            // A sleep reset after each beat, not an `Interval` (which boxes
            // its sleep): the next beat is a third of the lease after this
            // one began, however long its store call took.
            let every = (rules.lease / 3).max(Duration::from_millis(10));
            let mut tick = std::pin::pin!(tokio::time::sleep_until(started + every));
            loop {
                tick.as_mut().await;
                let at = Instant::now();
                tick.as_mut().reset(at + every);
                match self
                    .call(self.inner.store.extend(key, token, rules.lease))
                    .await
                {
                    Ok(Fence::Held) => lease_ends = at + rules.lease,
                    Ok(Fence::Lost) => {
                        tracing::warn!(key = %key.log_id(), "lease lost while executing; the result will not be stored");
                        return;
                    }
                    Err(error) => tracing::warn!(key = %key.log_id(), %error, "heartbeat failed"),
                }
            }
        };
        // The operation first (no random branch order): an answer ready at
        // the first poll starts no heartbeat timer.
        let finish = tokio::select! {
            biased;
            f = &mut op => f,
            () = heartbeat => op.await,
        };
        m.in_flight.fetch_sub(1, Ordering::Relaxed);
        let lease = guard.disarm();
        match finish.action {
            Action::Store(response) => {
                let now = SystemTime::now();
                let record = Arc::new(CompletedRecord {
                    fingerprint,
                    response,
                    completed_at: now,
                    expires_at: now + rules.retention,
                });
                self.complete(key, lease, record, rules.retention, lease_ends)
                    .await;
            }
            Action::Release => self.release(key, lease).await,
            // Kept without heartbeat: the lease runs out by itself (the
            // permit is simply dropped here, never handed to the store).
            Action::Hold => {}
        }
        finish.output
    }

    /// `complete`, retried with backoff (10 ms doubling, at most 1 s apart)
    /// while the store fails transiently, for at most
    /// [`complete_retry`](super::EngineConfig::complete_retry) and never
    /// past the lease (protocol §6). The caller gets its answer either way:
    ///
    /// - the budget runs out: the answer is not stored and the key is held
    ///   (no release), so a retry gets 409 rather than running blind; the
    ///   reservation runs out with its lease;
    /// - the store refuses the record for good ([`StoreError::is_transient`]
    ///   is false, e.g. larger than the memory store's byte bound): not
    ///   retried, not stored, and the key is released, so a retry executes
    ///   again.
    async fn complete(
        &self,
        key: &StoreKey,
        lease: Lease,
        record: Arc<CompletedRecord>,
        retention: Duration,
        lease_ends: Instant,
    ) {
        let budget = self.inner.config.complete_retry;
        let deadline = (Instant::now() + budget).min(lease_ends);
        let mut backoff = Duration::from_millis(10);
        for attempt in 0_u32.. {
            let call = self.call(self.inner.store.complete(
                key,
                lease.token,
                Arc::clone(&record),
                retention,
            ));
            // The first attempt has the whole store time-out; a retry
            // ends with the budget.
            let r = if attempt == 0 {
                call.await
            } else {
                let started = Instant::now();
                tokio::time::timeout_at(deadline, call)
                    .await
                    .unwrap_or_else(|_| Err(StoreError::Timeout(started.elapsed())))
            };
            let error = match r {
                // Stored. The local cache takes the answer only once it
                // is replayed (`replayed`): most keys never are, and
                // caching every fresh answer cost CPU per request and
                // pushed the retried ones out.
                Ok(Fence::Held) => return,
                Ok(Fence::Lost) => return self.fenced(key, "complete"),
                Err(error) => error,
            };
            if !error.is_transient() {
                Metrics::inc(&self.inner.metrics.unstored);
                tracing::error!(
                    key = %key.log_id(),
                    %error,
                    "the store refused the answer; it is NOT stored, and the key is released so a retry executes again"
                );
                return self.release(key, lease).await;
            }
            if Instant::now() + backoff >= deadline {
                Metrics::inc(&self.inner.metrics.unstored);
                tracing::error!(
                    key = %key.log_id(),
                    %error,
                    attempts = attempt + 1,
                    ?budget,
                    "complete kept failing; the answer is NOT stored, and the key is held until its lease runs out"
                );
                // The permit is dropped, never handed to the store: held.
                return;
            }
            if attempt == 0 {
                tracing::warn!(key = %key.log_id(), %error, "complete failed; retrying");
            } else {
                tracing::debug!(key = %key.log_id(), %error, ?backoff, "complete failed again; retrying");
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// `release`: an immediate retry executes again.
    async fn release(&self, key: &StoreKey, lease: Lease) {
        match self.call(self.inner.store.release(key, lease.token)).await {
            Ok(Fence::Held) => {}
            Ok(Fence::Lost) => self.fenced(key, "release"),
            Err(error) => {
                tracing::warn!(key = %key.log_id(), %error, "release failed; the key frees itself when the lease runs out");
            }
        }
    }

    fn fenced(&self, key: &StoreKey, op: &str) {
        Metrics::inc(&self.inner.metrics.fenced);
        tracing::warn!(key = %key.log_id(), op, "fenced out: another holder took the key over; nothing stored");
    }
}

/// Holds a [`Lease`] while its operation runs, until [`disarm`] hands it
/// back to the step that finishes it.
///
/// Dropped with its lease, the execution ended without an answer: its
/// future was dropped or the operation panicked. Once the operation has
/// started, the key is held (the reservation runs out with its lease, no
/// more heartbeat) unless the route's `ambiguous` policy is `release`;
/// before it started, releasing is safe. Releasing runs in the background,
/// best effort; either way the event is counted (`cancelled`) and logged.
///
/// [`disarm`]: LeaseGuard::disarm
struct LeaseGuard<S: Store> {
    engine: Engine<S>,
    key: StoreKey,
    lease: Option<Lease>,
    /// Whether the operation was called: its effect may have happened.
    started: bool,
    /// The route's policy for an execution that ends without an answer.
    ambiguous: Ambiguous,
}

impl<S: Store> LeaseGuard<S> {
    /// Hands the lease back to the caller, who finishes it; the guard
    /// then drops without releasing anything.
    fn disarm(mut self) -> Lease {
        // Only `disarm` (which consumes the guard) and `drop` take the
        // lease, so it is still here.
        self.lease
            .take()
            .expect("a lease guard is disarmed once, by value")
    }
}

impl<S: Store> Drop for LeaseGuard<S> {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        let engine = self.engine.clone();
        let key = self.key.clone();
        let m = &engine.inner.metrics;
        m.in_flight.fetch_sub(1, Ordering::Relaxed);
        let how = if std::thread::panicking() {
            "panicked"
        } else {
            "was cancelled"
        };
        if self.started {
            Metrics::inc(&m.cancelled);
            if self.ambiguous != Ambiguous::Release {
                // Hold (and `store`, with no answer to store): the
                // permit is dropped here, never handed to the store.
                tracing::warn!(
                    key = %key.log_id(),
                    "the operation {how} after it started; the key is held until its lease runs out"
                );
                return;
            }
            tracing::warn!(key = %key.log_id(), "the operation {how} after it started; releasing its key (ambiguous = release)");
        } else {
            tracing::debug!(key = %key.log_id(), "the request {how} before its operation started; releasing its key");
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = engine
                    .call(engine.inner.store.release(&key, lease.token))
                    .await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Scope;
    use crate::store::memory::MemoryStore;
    use crate::store::Reservation;

    /// A guard dropped before its operation was called frees the key: no
    /// effect can have happened. (In `execute` the operation is called in
    /// the same poll that creates the guard; this keeps the guard right on
    /// its own.)
    #[tokio::test]
    async fn a_guard_dropped_before_its_operation_started_releases() {
        let engine = Engine::new(MemoryStore::new());
        let key = StoreKey::new(&Scope::named("guard"), "k");
        let fp = Fingerprint::of_bytes(b"x");
        let lease = Duration::from_secs(30);
        let Ok(Reservation::Acquired(held)) = engine.store().reserve(&key, fp, lease).await else {
            panic!("the first reserve acquires");
        };
        engine.metrics().in_flight.fetch_add(1, Ordering::Relaxed);
        drop(LeaseGuard {
            engine: engine.clone(),
            key: key.clone(),
            lease: Some(held),
            started: false,
            ambiguous: Ambiguous::Hold,
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let again = engine.store().reserve(&key, fp, lease).await;
        assert!(
            matches!(again, Ok(Reservation::Acquired(_))),
            "got {again:?}"
        );
        assert_eq!(engine.metrics().cancelled.load(Ordering::Relaxed), 0);
    }
}
