//! Async mode in the layer (protocol §9): the *accept* phase of a route with
//! `mode = "async"`, and the `/_idem/operations/{id}` status endpoint.
//!
//! An [`IdempotencyLayer`](super::IdempotencyLayer) given an [`AsyncMode`]
//! runs phases 1–3 (route and key, body, fingerprint and scope) as for any
//! guarded request; then, for an async route, instead of the engine it
//! *accepts*: ONE atomic store step ([`Queue::enqueue`]) that writes the
//! operation — method, path and query, the headers that would be forwarded,
//! the body — before the client hears `202 Accepted`. A
//! [`Dispatcher`](crate::asyncop::Dispatcher) on the same store (in this
//! process or another) sends it to the upstream later.
//!
//! | the key holds | the POST gets |
//! |---|---|
//! | nothing | `202`, `Location: /_idem/operations/{id}`, `Retry-After: 1`, `{"id", "status": "pending", "href"}` |
//! | the same request, pending or running | the same `202`, same id, its current `status` |
//! | the same request, done | the stored final answer, `Idempotent-Replayed: true` |
//! | another request (fingerprint) | `422 idempotency_key_reused` |
//! | a synchronous execution of it | `409 idempotency_key_in_progress` + `Retry-After` |
//! | nothing, but `max_pending` operations wait | `503 idempotency_queue_full` + `Retry-After`; nothing stored |
//! | (the store fails or times out) | `503 idempotency_store_unavailable` + `Retry-After`; async routes always fail closed |
//!
//! Every path under `/_idem/` belongs to the layer once it has an
//! `AsyncMode`, whatever the method, and never reaches the inner service
//! (in any spelling: the check runs on the path's normal form and ignores
//! ASCII case). `GET` (or `HEAD`) `/_idem/operations/{id}` answers with the
//! operation's state: `202` + `Retry-After` + `{"id", "status": "pending" |
//! "running", "attempts", "next_attempt_in_ms"?}` while it waits or runs,
//! the stored final answer with `Idempotent-Replayed: true` once it is
//! done. `?wait=5s` (or `500ms`, or bare seconds `5`), clamped to the
//! route's `wait_timeout`, holds the request until the operation is done
//! or the wait ends, woken through the same notifications as a
//! `concurrent = "wait"` duplicate. An unknown id, a malformed id, an id of
//! another scope, and every other path or method under `/_idem/` get the
//! same `404 operation_not_found`.
//!
//! The asker's scope is computed with the scope headers of the async
//! routes (and `[defaults]`): an operation is visible to a request whose
//! scope (or its derived scope, for `key = "derived"`), under the header
//! set of the route that accepted it, is the operation's. (A scope hash
//! covers the header *names* too, so another route's header set never
//! yields it by accident.)
//!
//! ```
//! use std::sync::Arc;
//! use axum::{body::Body, http::{Request, StatusCode}, routing::post, Router};
//! use idem::asyncop::{AsyncConfig, DispatchError, Dispatcher};
//! use idem::layer::{AsyncMode, IdempotencyLayer};
//! use idem::policy::{Mode, RoutePolicy, RouteTable};
//! use idem::store::{memory::MemoryStore, OperationRequest};
//! use idem::{Engine, StoredResponse};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // The slow work, as an ordinary handler.
//! let work = Router::new().route("/reports", post(|| async { (StatusCode::CREATED, "report #1") }));
//!
//! // The dispatcher sends each accepted operation to it, in the background.
//! let store = Arc::new(MemoryStore::new());
//! let handler = work.clone();
//! let upstream = move |op: Arc<OperationRequest>| {
//!     let handler = handler.clone();
//!     async move {
//!         let mut req = Request::builder().method(op.method.as_str()).uri(op.uri.as_str());
//!         for (name, value) in &op.headers {
//!             req = req.header(name.as_str(), value.as_ref());
//!         }
//!         let req = req.body(Body::from(op.body.clone())).map_err(|e| DispatchError::Refused(e.into()))?;
//!         let res = handler.oneshot(req).await.map_err(|e| DispatchError::Reset(e.into()))?;
//!         let (parts, body) = res.into_parts();
//!         let body = axum::body::to_bytes(body, usize::MAX).await.map_err(|e| DispatchError::Reset(e.into()))?;
//!         Ok(idem::layer::capture(parts.status, &parts.headers, body))
//!     }
//! };
//! let dispatcher = Dispatcher::spawn(Arc::clone(&store), upstream, AsyncConfig::default().workers(2));
//!
//! // The layer accepts with 202 and serves /_idem/operations/{id}.
//! let mut policy = RoutePolicy::default();
//! policy.mode = Mode::Async;
//! let layer = IdempotencyLayer::new(Engine::new(Arc::clone(&store)), RouteTable::new(policy))
//!     .async_mode(AsyncMode::from_dispatcher(&dispatcher));
//! let app = work.layer(layer);
//!
//! let post = Request::post("/reports").header("idempotency-key", "r-1").body(Body::empty()).unwrap();
//! let res = app.clone().oneshot(post).await.unwrap();
//! assert_eq!(res.status(), StatusCode::ACCEPTED);
//! let href = res.headers()["location"].to_str().unwrap().to_owned();
//!
//! // Long-poll for the final answer.
//! let get = Request::get(format!("{href}?wait=5s")).body(Body::empty()).unwrap();
//! let res = app.oneshot(get).await.unwrap();
//! assert_eq!(res.status(), StatusCode::CREATED);
//! assert_eq!(res.headers()["idempotent-replayed"], "true");
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{HeaderName, Method, Response, StatusCode};

use super::response::replay;
use super::service::Identity;
use crate::asyncop::{self, Dispatcher, Upstream, WakeHandle};
use crate::fingerprint::Fingerprint;
use crate::key::{Scope, StoreKey};
use crate::policy::{Mode, RouteTable};
use crate::problem::{Problem, ProblemCode};
use crate::store::{Enqueued, Operation, OperationId, OperationRequest, OperationState, Queue};
use crate::StoreError;

/// The paths the layer keeps for itself once it has an [`AsyncMode`].
pub const RESERVED_PREFIX: &str = "/_idem/";

/// Where an operation's status is read: `{OPERATIONS_PREFIX}{id}`.
pub const OPERATIONS_PREFIX: &str = "/_idem/operations/";

/// The default bound on pending operations (`[limits] max_pending`).
pub const DEFAULT_MAX_PENDING: u64 = 100_000;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The queue, with its type erased: the layer is generic over a [`Store`],
/// and only async mode needs a [`Queue`].
///
/// [`Store`]: crate::store::Store
trait ErasedQueue: Send + Sync + 'static {
    fn accept<'a>(
        &'a self,
        key: &'a StoreKey,
        fingerprint: Fingerprint,
        request: &'a OperationRequest,
        max_pending: u64,
    ) -> BoxFuture<'a, Result<Enqueued, StoreError>>;

    fn operation(&self, id: OperationId) -> BoxFuture<'_, Result<Option<Operation>, StoreError>>;

    fn status_wait<'a>(
        &'a self,
        id: OperationId,
        scope: &'a Scope,
        wait: Duration,
    ) -> BoxFuture<'a, Result<Option<Operation>, StoreError>>;
}

impl<Q: Queue> ErasedQueue for Q {
    fn accept<'a>(
        &'a self,
        key: &'a StoreKey,
        fingerprint: Fingerprint,
        request: &'a OperationRequest,
        max_pending: u64,
    ) -> BoxFuture<'a, Result<Enqueued, StoreError>> {
        Box::pin(asyncop::accept(
            self,
            key,
            fingerprint,
            request,
            max_pending,
        ))
    }

    fn operation(&self, id: OperationId) -> BoxFuture<'_, Result<Option<Operation>, StoreError>> {
        Box::pin(Queue::operation(self, id))
    }

    fn status_wait<'a>(
        &'a self,
        id: OperationId,
        scope: &'a Scope,
        wait: Duration,
    ) -> BoxFuture<'a, Result<Option<Operation>, StoreError>> {
        Box::pin(asyncop::status_wait(self, id, scope, wait))
    }
}

/// What the layer's async mode did (relaxed atomics, like the engine's
/// [`Metrics`](crate::engine::Metrics)).
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct AcceptMetrics {
    /// New operations accepted (202 with a fresh id).
    pub accepted: AtomicU64,
    /// Repeats answered with the pending or running operation's 202.
    pub existing: AtomicU64,
    /// Repeats answered with the stored final answer.
    pub replayed: AtomicU64,
    /// Repeats with another fingerprint (422).
    pub mismatch: AtomicU64,
    /// Keys held by a synchronous execution (409).
    pub conflict: AtomicU64,
    /// Refused because `max_pending` operations wait (503).
    pub full: AtomicU64,
    /// Accepts and status requests the store failed (503).
    pub store_error: AtomicU64,
    /// Status requests answered (any outcome).
    pub status_requests: AtomicU64,
}

fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Async mode for an [`IdempotencyLayer`](super::IdempotencyLayer): the
/// queue that accepted operations go to, and the settings of the accept
/// phase. Cheap to clone. See the [layer documentation](crate::layer#async-mode).
///
/// Without one, a layer serves `mode = "async"` routes synchronously and
/// leaves `/_idem/` paths to the inner service.
#[derive(Clone)]
pub struct AsyncMode {
    queue: Arc<dyn ErasedQueue>,
    wake: Option<WakeHandle>,
    max_pending: u64,
    store_timeout: Duration,
    metrics: Arc<AcceptMetrics>,
}

impl std::fmt::Debug for AsyncMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncMode")
            .field("max_pending", &self.max_pending)
            .field("store_timeout", &self.store_timeout)
            .field("wakes_a_dispatcher", &self.wake.is_some())
            .finish_non_exhaustive()
    }
}

impl AsyncMode {
    /// Accepts operations into `queue` (the store the dispatchers claim
    /// from), with `max_pending` 100 000 and a store time-out of 2 s.
    #[must_use]
    pub fn new<Q: Queue>(queue: Q) -> Self {
        Self {
            queue: Arc::new(queue),
            wake: None,
            max_pending: DEFAULT_MAX_PENDING,
            store_timeout: Duration::from_secs(2),
            metrics: Arc::default(),
        }
    }

    /// Accepts into the dispatcher's store, and wakes its poller after
    /// each accept.
    #[must_use]
    pub fn from_dispatcher<S: Queue + Clone, U: Upstream>(dispatcher: &Dispatcher<S, U>) -> Self {
        Self::new(dispatcher.store().clone()).wake(dispatcher.wake_handle())
    }

    /// Wakes the dispatcher of this process after each accept
    /// (others find the operation at their next poll).
    #[must_use]
    pub fn wake(mut self, handle: WakeHandle) -> Self {
        self.wake = Some(handle);
        self
    }

    /// At most `n` operations pending or running in the store (protocol §9.6);
    /// beyond, `503 idempotency_queue_full` and nothing is stored.
    #[must_use]
    pub fn max_pending(mut self, n: u64) -> Self {
        self.max_pending = n;
        self
    }

    /// How long one store call may take before the request gets `503`.
    #[must_use]
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.store_timeout = timeout;
        self
    }

    /// The counters of the accept phase and the status endpoint.
    #[must_use]
    pub fn metrics(&self) -> &Arc<AcceptMetrics> {
        &self.metrics
    }

    async fn bounded<T>(
        &self,
        extra: Duration,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let limit = self.store_timeout.saturating_add(extra);
        match tokio::time::timeout(limit, call).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(limit)),
        }
    }
}

/// Whether `path` is under `/_idem/` (or is `/_idem`) in any spelling: its
/// normal form, ASCII case ignored. A path with no normal form counts as
/// reserved as soon as it mentions `_idem` in any case or encoding, so no
/// odd spelling slips through to the upstream.
#[must_use]
pub fn is_reserved(path: &str) -> bool {
    match crate::path::normalize(path) {
        Ok(normal) => {
            let root = RESERVED_PREFIX.trim_end_matches('/');
            normal
                .get(..root.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(root))
                && matches!(normal.as_bytes().get(root.len()), None | Some(b'/'))
        }
        Err(_) => path
            .to_ascii_lowercase()
            .replace("%5f", "_")
            .contains("_idem"),
    }
}

/// The request an operation sends upstream: the method, path and query,
/// the headers minus hop-by-hop ones and `Content-Length` (the sender sets
/// it), and the body.
fn operation_request(parts: &Parts, body: Bytes) -> OperationRequest {
    let headers = parts
        .headers
        .iter()
        .filter(|(n, _)| **n != header::CONTENT_LENGTH && !super::is_hop_by_hop(n, &parts.headers))
        .map(|(n, v)| (n.as_str().to_owned(), Bytes::copy_from_slice(v.as_bytes())))
        .collect();
    OperationRequest {
        method: parts.method.as_str().to_owned(),
        uri: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned()),
        headers,
        body: super::response::owned(body),
    }
}

/// The *accept* phase of an async route (instead of *run*).
/// `key_header` is the route's, named in the details.
pub(super) async fn accept<B: From<Bytes>>(
    mode: &AsyncMode,
    parts: &Parts,
    body: Bytes,
    identity: &Identity,
    key_header: &HeaderName,
) -> Response<B> {
    let name = crate::key::header_display_name(key_header);
    let request = operation_request(parts, body);
    let m = &mode.metrics;
    let answer = mode
        .bounded(
            Duration::ZERO,
            mode.queue.accept(
                &identity.key,
                identity.fingerprint,
                &request,
                mode.max_pending,
            ),
        )
        .await;
    match answer {
        Ok(Enqueued::Accepted(id)) => {
            inc(&m.accepted);
            if let Some(wake) = &mode.wake {
                wake.wake();
            }
            tracing::debug!(%id, key = %identity.key.log_id(), "operation accepted");
            accepted(id, "pending")
        }
        Ok(Enqueued::Existing(op)) => {
            inc(&m.existing);
            let status = match op.state {
                OperationState::Running { .. } => "running",
                _ => "pending",
            };
            accepted(op.id, status)
        }
        Ok(Enqueued::Completed(record)) => {
            inc(&m.replayed);
            replay(&record.response)
        }
        Ok(Enqueued::Mismatch) => {
            inc(&m.mismatch);
            Problem::new(
                ProblemCode::KeyReused,
                format!(
                    "this {name} was already used with a different request \
                     (method, path, selected headers or body differ); use a new key"
                ),
            )
            .to_response()
        }
        Ok(Enqueued::InFlight { lease_remaining }) => {
            inc(&m.conflict);
            Problem::new(
                ProblemCode::KeyInProgress,
                format!("a request with this {name} is still being processed; retry later"),
            )
            .retry_after(lease_remaining)
            .to_response()
        }
        Ok(Enqueued::Full) => {
            inc(&m.full);
            tracing::warn!(
                max_pending = mode.max_pending,
                "async operation refused: max_pending reached"
            );
            Problem::new(
                ProblemCode::QueueFull,
                "too many operations are waiting to be dispatched; nothing was accepted, \
                 retry later",
            )
            .retry_after(Duration::from_secs(1))
            .to_response()
        }
        Err(error) => {
            inc(&m.store_error);
            tracing::warn!(%error, "accepting an async operation failed");
            unavailable("nothing was accepted")
        }
    }
}

fn unavailable<B: From<Bytes>>(what: &str) -> Response<B> {
    Problem::new(
        ProblemCode::StoreUnavailable,
        format!("the idempotency store cannot be reached; {what}"),
    )
    .retry_after(Duration::from_secs(1))
    .to_response()
}

fn href(id: OperationId) -> String {
    format!("{OPERATIONS_PREFIX}{id}")
}

fn json<B: From<Bytes>>(status: StatusCode, value: &serde_json::Value) -> Response<B> {
    let mut res = Response::new(B::from(Bytes::from(value.to_string())));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// The 202 of an accept (protocol §9.1): `Location` equals `href`.
fn accepted<B: From<Bytes>>(id: OperationId, status: &str) -> Response<B> {
    let href = href(id);
    let mut res = json(
        StatusCode::ACCEPTED,
        &serde_json::json!({ "id": id.to_string(), "status": status, "href": href }),
    );
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&href) {
        h.insert(header::LOCATION, v);
    }
    h.insert(header::RETRY_AFTER, HeaderValue::from(1u64));
    res
}

fn not_found<B: From<Bytes>>() -> Response<B> {
    Problem::new(
        ProblemCode::OperationNotFound,
        "no such operation for this caller (unknown, malformed, expired, or another scope's id)",
    )
    .to_response()
}

/// A set of scope headers the status endpoint tries, with the longest
/// `wait_timeout` of the routes that use it.
struct ScopeSet<'a> {
    names: &'a [HeaderName],
    wait_timeout: Duration,
}

/// The distinct scope header sets of the async routes and `[defaults]`.
fn scope_sets(routes: &RouteTable) -> Vec<ScopeSet<'_>> {
    let defaults = routes.default_policy();
    let policies = routes
        .routes()
        .iter()
        .map(|r| &r.policy)
        .filter(|p| p.mode == Mode::Async)
        .chain([defaults]);
    let mut sets: Vec<ScopeSet<'_>> = Vec::new();
    for p in policies {
        match sets
            .iter_mut()
            .find(|s| s.names == p.scope_headers.as_slice())
        {
            Some(set) => set.wait_timeout = set.wait_timeout.max(p.wait_timeout),
            None => sets.push(ScopeSet {
                names: &p.scope_headers,
                wait_timeout: p.wait_timeout,
            }),
        }
    }
    sets
}

/// `?wait=` as a duration: `5s`, `500ms`, `2m` or bare seconds; anything
/// else (or no `wait`) is no wait.
fn wait_param(query: Option<&str>) -> Duration {
    let Some(value) = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("wait="))
    else {
        return Duration::ZERO;
    };
    let digits = value.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = value.split_at(digits);
    let Ok(n) = number.parse::<u64>() else {
        return Duration::ZERO;
    };
    match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => Duration::ZERO,
    }
}

/// A request under `/_idem/`: the status of an operation (protocol §9.3), or
/// 404 for anything else.
pub(super) async fn status<B: From<Bytes>>(
    mode: &AsyncMode,
    routes: &RouteTable,
    parts: &Parts,
) -> Response<B> {
    inc(&mode.metrics.status_requests);
    let normal = crate::path::normalize(parts.uri.path()).unwrap_or_default();
    let id = match (&parts.method, normal.strip_prefix(OPERATIONS_PREFIX)) {
        (&Method::GET | &Method::HEAD, Some(id)) => id.parse::<OperationId>().ok(),
        _ => None,
    };
    let Some(id) = id else {
        return not_found();
    };
    let found = match mode.bounded(Duration::ZERO, mode.queue.operation(id)).await {
        Ok(found) => found,
        Err(error) => return status_failed(mode, &error),
    };
    let Some(op) = found else {
        return not_found();
    };
    let mut asker = None;
    for set in scope_sets(routes) {
        let scope = Scope::from_headers(&parts.headers, set.names);
        // A route with `key = "derived"` keeps its operations in the
        // asker's derived scope.
        let derived = scope.derived();
        asker = [scope, derived]
            .into_iter()
            .find(|s| s.to_hex() == op.key.scope_hex())
            .map(|s| (s, set.wait_timeout));
        if asker.is_some() {
            break;
        }
    }
    let Some((scope, wait_timeout)) = asker else {
        return not_found();
    };
    let wait = wait_param(parts.uri.query()).min(wait_timeout);
    let op = if wait.is_zero() || matches!(op.state, OperationState::Done(_)) {
        op
    } else {
        match mode
            .bounded(wait, mode.queue.status_wait(id, &scope, wait))
            .await
        {
            Ok(Some(op)) => op,
            // Purged or expired meanwhile.
            Ok(None) => return not_found(),
            Err(error) => return status_failed(mode, &error),
        }
    };
    render(&op)
}

fn status_failed<B: From<Bytes>>(mode: &AsyncMode, error: &StoreError) -> Response<B> {
    inc(&mode.metrics.store_error);
    tracing::warn!(%error, "reading an operation's status failed");
    unavailable("the operation's state is unknown")
}

/// An operation's state as the status endpoint answers it.
fn render<B: From<Bytes>>(op: &Operation) -> Response<B> {
    let id = op.id.to_string();
    let (value, retry) = match &op.state {
        OperationState::Done(record) => return replay(&record.response),
        OperationState::Running { attempts } => (
            serde_json::json!({ "id": id, "status": "running", "attempts": attempts }),
            Duration::from_secs(1),
        ),
        OperationState::Pending {
            attempts,
            next_attempt_in,
        } => {
            let mut v = serde_json::json!({ "id": id, "status": "pending", "attempts": attempts });
            if !next_attempt_in.is_zero() {
                v["next_attempt_in_ms"] = u64::try_from(next_attempt_in.as_millis())
                    .unwrap_or(u64::MAX)
                    .into();
            }
            (v, *next_attempt_in)
        }
    };
    let mut res = json(StatusCode::ACCEPTED, &value);
    let secs = (retry.as_secs() + u64::from(retry.subsec_nanos() > 0)).max(1);
    res.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_the_reserved_prefix_is_reserved() {
        for reserved in [
            "/_idem",
            "/_idem/",
            "/_idem/operations/0123",
            "/_IDEM/x",
            "//_idem/x",
            "/a/../_idem/x",
            "/%5fidem/x",
            "/%5Fidem/x",
            "/_idem/a%2Fb",
            "/x/%5FIdem%2F",
        ] {
            assert!(is_reserved(reserved), "{reserved}");
        }
        for free in ["/", "/_idemx", "/payments/_idem", "/idem/x", "/_ide/m"] {
            assert!(!is_reserved(free), "{free}");
        }
    }

    #[test]
    fn wait_takes_a_duration_or_bare_seconds() {
        let w = |q: &str| wait_param(Some(q));
        assert_eq!(w("wait=5s"), Duration::from_secs(5));
        assert_eq!(w("a=1&wait=500ms"), Duration::from_millis(500));
        assert_eq!(w("wait=5"), Duration::from_secs(5));
        assert_eq!(w("wait=2m"), Duration::from_secs(120));
        for none in ["", "wait=", "wait=-1", "wait=1.5s", "wait=5h", "wait=s"] {
            assert_eq!(w(none), Duration::ZERO, "{none}");
        }
        assert_eq!(wait_param(None), Duration::ZERO);
    }

    #[test]
    fn the_stored_request_keeps_what_is_forwarded() {
        let req = http::Request::post("/jobs/1?x=2")
            .header("idempotency-key", "k")
            .header("x-request-id", "r-1")
            .header("content-length", "3")
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "1")
            .header("te", "trailers")
            .body(())
            .expect("request");
        let (parts, ()) = req.into_parts();
        let op = operation_request(&parts, Bytes::from_static(b"abc"));
        assert_eq!(op.method, "POST");
        assert_eq!(op.uri, "/jobs/1?x=2");
        let names: Vec<&str> = op.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["idempotency-key", "x-request-id"]);
        assert_eq!(op.body, "abc");
    }

    #[test]
    fn a_pending_status_says_when_it_is_due() {
        let op = Operation {
            id: OperationId::from_u128(7),
            key: StoreKey::new(&Scope::global(), "k"),
            state: OperationState::Pending {
                attempts: 2,
                next_attempt_in: Duration::from_millis(1500),
            },
            last_error: Some("HTTP 503".into()),
        };
        let res: Response<Bytes> = render(&op);
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        assert_eq!(res.headers()[header::RETRY_AFTER], "2");
        let v: serde_json::Value = serde_json::from_slice(res.body()).expect("json");
        assert_eq!(v["status"], "pending");
        assert_eq!(v["attempts"], 2);
        assert_eq!(v["next_attempt_in_ms"], 1500);
        assert_eq!(v["id"], "00000000000000000000000000000007");
    }
}
