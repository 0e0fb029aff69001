//! The dispatcher pool (protocol §9.4–5): workers that claim due operations,
//! call the upstream under a lease kept by heartbeat, and finish each
//! attempt with ONE fenced store step: `complete` (a stored status, or the
//! 502 after the last attempt) or `retry` (another attempt later).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::metrics::DispatchMetrics;
use super::upstream::{retry_after, retry_delay, DispatchError, Upstream};
use super::{AsyncConfig, DispatchPolicy};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::problem::{Problem, ProblemCode, CONTENT_TYPE};
use crate::record::{CompletedRecord, StoredResponse};
use crate::store::{Claimed, Enqueued, Fence, OperationRequest, Queue, StoreError};

/// A pool of dispatcher tasks over one store (protocol §9.4).
///
/// [`spawn`](Self::spawn) starts ONE poller task. The poller claims due
/// operations for the free workers only (at most
/// [`AsyncConfig::workers`] run at once) in one store call, and starts a
/// worker task per claimed operation: it calls the [`Upstream`] while
/// heartbeating its lease, then stores the answer, or schedules another
/// attempt, or — after the route's `max_attempts` — stores a 502
/// `upstream_unavailable`. When a claim finds less due work than there
/// are free workers, the poller sleeps `poll_interval`, or less when
/// [`accept`](Self::accept) (or a [`WakeHandle`]) wakes it. So an idle
/// dispatcher costs the store one claim per `poll_interval`, whatever
/// `workers` is, and holds no store connection in between; and no claim
/// is made while every worker is busy.
///
/// Dropping the dispatcher aborts its tasks at once, like a crash: the
/// operations they held are claimed again when their leases run out.
/// [`shutdown`](Self::shutdown) lets the running calls finish first.
pub struct Dispatcher<S, U> {
    inner: Arc<Inner<S, U>>,
    /// The poller (none on an accept-only instance). It owns the worker
    /// tasks: aborting it aborts them.
    poller: JoinSet<()>,
    stop: watch::Sender<bool>,
}

struct Inner<S, U> {
    store: S,
    upstream: U,
    config: AsyncConfig,
    metrics: Arc<DispatchMetrics>,
    wake: Arc<Notify>,
}

/// Wakes the poller of a [`Dispatcher`] (after an accept made outside
/// [`Dispatcher::accept`]), so it claims at once rather than at its next
/// poll. Cheap to clone.
#[derive(Debug, Clone)]
pub struct WakeHandle(Arc<Notify>);

impl WakeHandle {
    /// Wakes the poller now if it is idle, else as soon as it goes idle.
    pub fn wake(&self) {
        self.0.notify_one();
    }
}

impl<S, U> std::fmt::Debug for Dispatcher<S, U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("config", &self.inner.config)
            .field(
                "running",
                &self.inner.metrics.in_flight.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl<S: Queue, U: Upstream> Dispatcher<S, U> {
    /// Starts the poller on the current Tokio runtime (none for an
    /// accept-only instance, `config.workers == 0`).
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    #[must_use]
    pub fn spawn(store: S, upstream: U, config: AsyncConfig) -> Self {
        let workers = config.workers;
        let inner = Arc::new(Inner {
            store,
            upstream,
            config,
            metrics: Arc::default(),
            wake: Arc::default(),
        });
        let (stop, stopped) = watch::channel(false);
        let mut poller = JoinSet::new();
        if workers > 0 {
            poller.spawn(Arc::clone(&inner).poll(stopped));
        }
        Self {
            inner,
            poller,
            stop,
        }
    }

    /// [`accept`](super::accept), then wakes the poller if the operation
    /// is new.
    ///
    /// # Errors
    ///
    /// The store's failures.
    pub async fn accept(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        request: &OperationRequest,
        max_pending: u64,
    ) -> Result<Enqueued, StoreError> {
        let answer =
            super::accept(&self.inner.store, key, fingerprint, request, max_pending).await?;
        if matches!(answer, Enqueued::Accepted(_)) {
            self.inner.wake.notify_one();
        }
        Ok(answer)
    }

    /// A handle that wakes the poller.
    #[must_use]
    pub fn wake_handle(&self) -> WakeHandle {
        WakeHandle(Arc::clone(&self.inner.wake))
    }

    /// The store the dispatcher works on.
    #[must_use]
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// The dispatchers' counters (protocol §9.8). The queue's depth and oldest
    /// age are the store's: [`Queue::queue_stats`].
    #[must_use]
    pub fn metrics(&self) -> &Arc<DispatchMetrics> {
        &self.inner.metrics
    }

    /// The settings it runs with.
    #[must_use]
    pub fn config(&self) -> &AsyncConfig {
        &self.inner.config
    }

    /// Stops claiming, lets the running attempts finish for up to
    /// `grace`, then aborts the rest (their operations are claimed again
    /// after their leases).
    pub async fn shutdown(mut self, grace: Duration) {
        self.stop.send_replace(true);
        let all = async { while self.poller.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(
                running = self.inner.metrics.in_flight.load(Ordering::Relaxed),
                "dispatchers still calling the upstream at the end of the grace period were \
                 aborted; their operations are dispatched again after their leases"
            );
        }
        // Dropping `self` aborts whatever is left.
    }
}

/// How an attempt ended without an answer to store.
struct Failure {
    /// For the operator's logs (may name upstream addresses).
    log: String,
    /// For the client (the stored 502's `detail`) and the store's
    /// `last_error` (what admin inspect shows): the status or the kind of
    /// transport error, never the upstream's addresses or error texts.
    summary: String,
    retry_after: Option<Duration>,
}

impl<S: Queue, U: Upstream> Inner<S, U> {
    /// The poller: claims due operations for the free workers, one worker
    /// task per operation; idle (less due work than free workers, or a
    /// failed claim), waits for a wake-up, the poll interval or the stop
    /// signal. Stopped, it lets the running workers finish.
    async fn poll(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut running = JoinSet::new();
        loop {
            if *stop.borrow() {
                break;
            }
            while running.try_join_next().is_some() {}
            let free = self.config.workers.saturating_sub(running.len());
            if free == 0 {
                // Every worker is busy: claim again when one is free.
                tokio::select! {
                    _ = running.join_next() => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            let drained = match self.store.claim(self.config.lease, free).await {
                Ok(claimed) => {
                    let drained = claimed.len() < free;
                    for c in claimed {
                        let inner = Arc::clone(&self);
                        running.spawn(async move { inner.dispatch(c).await });
                    }
                    drained
                }
                Err(error) => {
                    DispatchMetrics::inc(&self.metrics.store_errors);
                    tracing::warn!(%error, "claiming due operations failed");
                    true
                }
            };
            if drained {
                tokio::select! {
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(self.config.poll_interval) => {}
                    _ = stop.changed() => {}
                }
            }
        }
        while running.join_next().await.is_some() {}
    }

    /// One attempt of a claimed operation, finished in the store.
    async fn dispatch(&self, c: Claimed) {
        let policy = self.config.policy_of(&c.request);
        if c.attempt > policy.max_attempts {
            // The dispatcher of the last attempt died before storing its
            // outcome: no call beyond `max_attempts`.
            let failure = Failure {
                log: "the last attempt's dispatcher stopped before storing its outcome".into(),
                summary: "its outcome was lost".into(),
                retry_after: None,
            };
            let lease_ends = Instant::now() + self.config.lease;
            return self
                .give_up(&c, &policy, policy.max_attempts, &failure, lease_ends)
                .await;
        }
        let m = &self.metrics;
        DispatchMetrics::inc(&m.attempts);
        m.in_flight.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let called = self.call(&c, &policy).await;
        m.in_flight.fetch_sub(1, Ordering::Relaxed);
        m.dispatch_latency.observe(started.elapsed());
        let Some((outcome, lease_ends)) = called else {
            DispatchMetrics::inc(&m.lost);
            tracing::warn!(id = %c.id, key = %c.key.log_id(), "lease lost during the upstream call; its outcome is dropped");
            return;
        };
        let failure = match outcome {
            Ok(response) if policy.store_statuses.contains(response.status) => {
                if self.finish(&c, &policy, response, lease_ends).await {
                    DispatchMetrics::inc(&m.completed);
                }
                return;
            }
            Ok(response) => Failure {
                log: format!("the upstream answered {}", response.status),
                summary: format!("HTTP {}", response.status),
                retry_after: retry_after(&response),
            },
            Err(e) => Failure {
                log: e.to_string(),
                summary: e.summary(),
                retry_after: None,
            },
        };
        if c.attempt >= policy.max_attempts {
            return self
                .give_up(&c, &policy, c.attempt, &failure, lease_ends)
                .await;
        }
        let delay = retry_delay(policy.retry_backoff, c.attempt, failure.retry_after);
        tracing::info!(id = %c.id, attempt = c.attempt, ?delay, error = %failure.log, "attempt failed; retrying");
        let last_error = format!("attempt {}: {}", c.attempt, failure.summary);
        match self.store.retry(&c.key, c.token, delay, &last_error).await {
            Ok(Fence::Held) => DispatchMetrics::inc(&m.retries),
            Ok(Fence::Lost) => self.lost(&c, "retry"),
            Err(error) => {
                DispatchMetrics::inc(&m.store_errors);
                tracing::warn!(id = %c.id, %error, "scheduling the retry failed; the operation is due again when its lease runs out");
            }
        }
    }

    /// Calls the upstream (bounded by the route's time-out) while the
    /// lease is kept by heartbeat. `None` if the lease was lost: another
    /// dispatcher holds the operation (or it was purged) and this call's
    /// outcome must not be stored. Otherwise the outcome and when the
    /// lease ends.
    async fn call(
        &self,
        c: &Claimed,
        policy: &DispatchPolicy,
    ) -> Option<(Result<StoredResponse, DispatchError>, Instant)> {
        let lease = self.config.lease;
        let mut lease_ends = Instant::now() + lease;
        let timeout = policy.upstream_timeout;
        let call = tokio::time::timeout(timeout, self.upstream.call(Arc::clone(&c.request)));
        let heartbeat = async {
            let every = (lease / 3).max(Duration::from_millis(10));
            let mut tick = tokio::time::interval_at(Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let at = Instant::now();
                match self.store.extend(&c.key, c.token, lease).await {
                    Ok(Fence::Held) => lease_ends = at + lease,
                    Ok(Fence::Lost) => return,
                    Err(error) => {
                        DispatchMetrics::inc(&self.metrics.store_errors);
                        tracing::warn!(id = %c.id, %error, "heartbeat failed");
                    }
                }
            }
        };
        let outcome = tokio::select! {
            r = call => r.unwrap_or(Err(DispatchError::Timeout(timeout))),
            () = heartbeat => return None,
        };
        Some((outcome, lease_ends))
    }

    /// Stores the final answer after `attempts` calls failed (protocol §9.4).
    async fn give_up(
        &self,
        c: &Claimed,
        policy: &DispatchPolicy,
        attempts: u32,
        why: &Failure,
        lease_ends: Instant,
    ) {
        tracing::warn!(id = %c.id, attempts, error = %why.log, "last attempt failed; storing 502 upstream_unavailable");
        let plural = if attempts == 1 { "" } else { "s" };
        let problem = Problem::new(
            ProblemCode::UpstreamUnavailable,
            format!(
                "the upstream gave no answer to keep after {attempts} attempt{plural}; \
                 the last: {}",
                why.summary
            ),
        );
        if self
            .finish(c, policy, stored_problem(&problem), lease_ends)
            .await
        {
            DispatchMetrics::inc(&self.metrics.final_failures);
        }
    }

    /// Stores `response` as the operation's final answer: fenced
    /// `complete`, retried with backoff while the lease lasts. True if it
    /// is stored.
    async fn finish(
        &self,
        c: &Claimed,
        policy: &DispatchPolicy,
        response: StoredResponse,
        lease_ends: Instant,
    ) -> bool {
        let now = SystemTime::now();
        let record = Arc::new(CompletedRecord {
            fingerprint: c.fingerprint,
            response,
            completed_at: now,
            expires_at: now + policy.retention,
        });
        let mut backoff = Duration::from_millis(10);
        loop {
            let stored = self
                .store
                .complete(&c.key, c.token, Arc::clone(&record), policy.retention)
                .await;
            match stored {
                Ok(Fence::Held) => return true,
                Ok(Fence::Lost) => {
                    self.lost(c, "complete");
                    return false;
                }
                Err(error) => {
                    DispatchMetrics::inc(&self.metrics.store_errors);
                    if Instant::now() + backoff >= lease_ends {
                        tracing::error!(id = %c.id, %error, "storing the final answer failed until the lease ran out; the operation will be dispatched again");
                        return false;
                    }
                    tracing::warn!(id = %c.id, %error, ?backoff, "storing the final answer failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    fn lost(&self, c: &Claimed, step: &str) {
        DispatchMetrics::inc(&self.metrics.lost);
        tracing::warn!(id = %c.id, key = %c.key.log_id(), step, "fenced out: another dispatcher took the operation over; nothing stored");
    }
}

/// A problem as a stored answer (what a repeat of the POST and the status
/// request replay).
fn stored_problem(problem: &Problem) -> StoredResponse {
    let mut headers = vec![(
        "content-type".to_owned(),
        bytes::Bytes::from_static(CONTENT_TYPE.as_bytes()),
    )];
    if let Some(secs) = problem.retry_after {
        headers.push(("retry-after".to_owned(), secs.to_string().into()));
    }
    StoredResponse {
        status: problem.status(),
        headers,
        body: problem.body(),
    }
}
