//! Async mode (protocol §9): accept now, run in the background, let the client
//! ask. The library face of it; the gateway wires it to HTTP, and a Rust
//! service can do the same.
//!
//! - [`accept`]: ONE atomic store step that answers a POST — a fresh
//!   operation (`202 Accepted`), the existing one, its stored final answer,
//!   a mismatch, or `Full` (protocol §9.1–2, §9.6).
//! - [`status`] and [`status_wait`]: the operation by id, for the asker's
//!   scope only (protocol §9.3; another scope's id reads as unknown), the
//!   latter waiting for it to be done through the key's notifications.
//! - [`Dispatcher`]: a bounded pool of workers that claim due operations
//!   from the store, call the [`Upstream`] under a lease kept by heartbeat,
//!   and store the final answer or schedule another attempt (protocol §9.4–5).
//!   Any instance dispatches any operation: the queue lives in the store.
//!
//! Dispatch is at least once towards the upstream (a dispatcher that dies
//! mid-call leaves its operation to be claimed again once its lease runs
//! out), always with the accepting request's `Idempotency-Key`, so an
//! upstream that dedupes by key runs it exactly once.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use idem::asyncop::{AsyncConfig, Dispatcher, DispatchError};
//! use idem::store::{memory::MemoryStore, Enqueued, OperationRequest, OperationState};
//! use idem::{Fingerprint, Scope, StoreKey, StoredResponse};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), idem::StoreError> {
//! let store = Arc::new(MemoryStore::new());
//! let upstream = |req: Arc<OperationRequest>| async move {
//!     Ok::<_, DispatchError>(StoredResponse { status: 201, headers: vec![], body: req.body.clone() })
//! };
//! let dispatcher = Dispatcher::spawn(Arc::clone(&store), upstream, AsyncConfig::default());
//!
//! let scope = Scope::named("tenant-42");
//! let key = StoreKey::new(&scope, "order-1001");
//! let request = OperationRequest {
//!     method: "POST".into(),
//!     uri: "/orders".into(),
//!     headers: vec![],
//!     body: "charge 10 EUR".into(),
//! };
//! let fingerprint = Fingerprint::of_bytes(b"POST /orders charge 10 EUR");
//! let Enqueued::Accepted(id) = dispatcher.accept(&key, fingerprint, &request, 1000).await? else {
//!     unreachable!("a fresh key");
//! };
//! // 202 Accepted, Location: /_idem/operations/{id}
//! let done = idem::asyncop::status_wait(&*store, id, &scope, Duration::from_secs(5)).await?;
//! assert!(matches!(done.map(|op| op.state), Some(OperationState::Done(r)) if r.response.status == 201));
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::fingerprint::Fingerprint;
use crate::key::{Scope, StoreKey};
use crate::policy::{RoutePolicy, StatusSet};
use crate::store::{Enqueued, Operation, OperationId, OperationRequest, OperationState, Queue};
use crate::StoreError;

pub use dispatcher::{Dispatcher, WakeHandle};
pub use metrics::{DispatchCounts, DispatchMetrics};
pub use upstream::{retry_after, retry_delay, DispatchError, Upstream, MAX_RETRY_DELAY};

mod dispatcher;
mod metrics;
mod upstream;

/// How one operation is dispatched: the settings of the route that
/// accepted it (protocol §9.4, §12).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DispatchPolicy {
    /// Most upstream calls, the first included (default 5). After the
    /// last fails, the final answer is a stored 502 `upstream_unavailable`.
    pub max_attempts: u32,
    /// The wait after the first failed attempt, doubling after each
    /// (with jitter; default 1 s). See [`retry_delay`].
    pub retry_backoff: Duration,
    /// Answers with these statuses are the final answer; any other is an
    /// attempt that failed.
    pub store_statuses: StatusSet,
    /// How long the final answer is kept (and replayed, and readable by
    /// id).
    pub retention: Duration,
    /// How long one upstream call may take.
    pub upstream_timeout: Duration,
}

impl Default for DispatchPolicy {
    fn default() -> Self {
        Self::from(&RoutePolicy::default())
    }
}

/// The route's `max_attempts` (at least 1), `retry_backoff`,
/// `store_statuses`, `retention` and `upstream_timeout`.
impl From<&RoutePolicy> for DispatchPolicy {
    fn from(route: &RoutePolicy) -> Self {
        Self {
            max_attempts: route.max_attempts.max(1),
            retry_backoff: route.retry_backoff,
            store_statuses: route.store_statuses.clone(),
            retention: route.retention,
            upstream_timeout: route.upstream_timeout,
        }
    }
}

/// Which [`DispatchPolicy`] applies to an operation: the dispatcher runs
/// operations of every async route, so it asks per operation.
type PolicyFn = dyn Fn(&OperationRequest) -> DispatchPolicy + Send + Sync;

/// Settings of a [`Dispatcher`].
#[derive(Clone)]
#[non_exhaustive]
pub struct AsyncConfig {
    /// Most operations this instance dispatches at once (`[limits]
    /// async_workers`, default 64); 0 makes an accept-only instance.
    pub workers: usize,
    /// The lease a dispatcher holds an operation under, kept by heartbeat
    /// (every third of it) while the upstream works (default 30 s). A dead
    /// dispatcher's operations are claimed again once it runs out.
    pub lease: Duration,
    /// How often an idle dispatcher looks for due operations (default
    /// 200 ms): ONE claim per interval for the whole pool, whatever
    /// `workers` is. An accept on this instance wakes it at once; work
    /// accepted by another instance, or due again after a backoff or a
    /// lost lease, is found within an interval.
    pub poll_interval: Duration,
    policy: Arc<PolicyFn>,
}

impl Default for AsyncConfig {
    fn default() -> Self {
        Self {
            workers: 64,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(200),
            policy: Arc::new(|_: &OperationRequest| DispatchPolicy::default()),
        }
    }
}

impl std::fmt::Debug for AsyncConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncConfig")
            .field("workers", &self.workers)
            .field("lease", &self.lease)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

impl AsyncConfig {
    /// Sets [`workers`](Self::workers).
    #[must_use]
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Sets [`lease`](Self::lease).
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets [`poll_interval`](Self::poll_interval).
    #[must_use]
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every;
        self
    }

    /// One policy for every operation.
    #[must_use]
    pub fn policy(self, policy: DispatchPolicy) -> Self {
        self.policy_for(move |_| policy.clone())
    }

    /// The policy of each operation, chosen by its request (the gateway
    /// looks its route up by method and path).
    #[must_use]
    pub fn policy_for(
        mut self,
        choose: impl Fn(&OperationRequest) -> DispatchPolicy + Send + Sync + 'static,
    ) -> Self {
        self.policy = Arc::new(choose);
        self
    }

    /// The policy that applies to `request`.
    #[must_use]
    pub fn policy_of(&self, request: &OperationRequest) -> DispatchPolicy {
        (self.policy)(request)
    }
}

/// Accepts an operation (protocol §9.1–2, §9.6): ONE atomic store step under a
/// fresh [`OperationId`]. `Accepted` means it is durable in the store;
/// answer 202. See [`Enqueued`] for the other answers.
/// [`Dispatcher::accept`] does the same and wakes the dispatcher of this
/// instance.
///
/// # Errors
///
/// The store's failures (answer 503 as for any store failure).
pub async fn accept<S: Queue>(
    store: &S,
    key: &StoreKey,
    fingerprint: Fingerprint,
    request: &OperationRequest,
    max_pending: u64,
) -> Result<Enqueued, StoreError> {
    store
        .enqueue(
            key,
            fingerprint,
            OperationId::generate(),
            request,
            max_pending,
        )
        .await
}

/// The operation `id`, if it exists and belongs to `scope` (protocol §9.3). An
/// unknown id and another scope's id both read as `None`: the same 404,
/// so the endpoint is no oracle.
///
/// # Errors
///
/// The store's failures.
pub async fn status<S: Queue>(
    store: &S,
    id: OperationId,
    scope: &Scope,
) -> Result<Option<Operation>, StoreError> {
    let op = store.operation(id).await?;
    let scope = scope.to_hex();
    Ok(op.filter(|op| op.key.scope_hex() == scope))
}

/// Like [`status`], but waits up to `wait` for the operation to be done
/// (`?wait=` long-polls, protocol §9.3): it subscribes to the operation's key,
/// as a `wait` duplicate does, and answers as soon as the final answer is
/// stored, or with the current state when `wait` ends. It also looks
/// again every second, since a notification may be lost.
///
/// # Errors
///
/// The store's failures.
pub async fn status_wait<S: Queue>(
    store: &S,
    id: OperationId,
    scope: &Scope,
    wait: Duration,
) -> Result<Option<Operation>, StoreError> {
    const POLL: Duration = Duration::from_secs(1);
    let deadline = Instant::now() + wait;
    let Some(op) = status(store, id, scope).await? else {
        return Ok(None);
    };
    if wait.is_zero() || matches!(op.state, OperationState::Done(_)) {
        return Ok(Some(op));
    }
    // Subscribe, then read again: a completion between the first read and
    // the subscription is not missed.
    let mut changes = store.subscribe(&op.key).await?;
    loop {
        let op = status(store, id, scope).await?;
        let done = op
            .as_ref()
            .is_none_or(|op| matches!(op.state, OperationState::Done(_)));
        let now = Instant::now();
        if done || now >= deadline {
            return Ok(op);
        }
        let next = deadline.min(now + POLL);
        tokio::select! {
            () = changes.changed() => {}
            () = tokio::time::sleep_until(next) => {}
        }
    }
}
