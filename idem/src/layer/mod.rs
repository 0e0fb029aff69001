//! A `tower::Layer` that gives any HTTP service the guarantees of protocol §3–§6.
//!
//! ```
//! use axum::{body::Body, http::{Request, StatusCode}, routing::post, Router};
//! use idem::{layer::IdempotencyLayer, store::memory::MemoryStore, Engine, RouteTable};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let app = Router::new()
//!     .route("/payments", post(|| async { (StatusCode::CREATED, "charged") }))
//!     .layer(IdempotencyLayer::new(Engine::new(MemoryStore::new()), RouteTable::default()));
//! let pay = |key: Option<&str>, amount: &'static str| {
//!     let mut req = Request::post("/payments");
//!     if let Some(key) = key {
//!         req = req.header("idempotency-key", key);
//!     }
//!     req.body(Body::from(amount)).unwrap()
//! };
//!
//! // The first request runs the handler.
//! let res = app.clone().oneshot(pay(Some("order-1"), "10 EUR")).await.unwrap();
//! assert_eq!(res.status(), StatusCode::CREATED);
//!
//! // A retry gets the stored answer; the handler does not run again.
//! let res = app.clone().oneshot(pay(Some("order-1"), "10 EUR")).await.unwrap();
//! assert_eq!(res.status(), StatusCode::CREATED);
//! assert_eq!(res.headers()["idempotent-replayed"], "true");
//!
//! // The same key with another request: 422 `idempotency_key_reused`.
//! let res = app.clone().oneshot(pay(Some("order-1"), "99 EUR")).await.unwrap();
//! assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
//!
//! // No key where the route requires one: 400 `idempotency_key_missing`.
//! let res = app.oneshot(pay(None, "10 EUR")).await.unwrap();
//! assert_eq!(res.status(), StatusCode::BAD_REQUEST);
//! assert_eq!(res.headers()["content-type"], "application/problem+json");
//! # }
//! ```
//!
//! Participating requests (by default POST and PATCH) are buffered up to the
//! route's `max_body`, fingerprinted and run through the [`Engine`]; the inner
//! service's response is buffered, stored when its status is in
//! `store_statuses`, and returned. Other requests pass through untouched.
//!
//! A response is buffered up to the route's `max_response_body` only. A
//! larger one (by its declared size, or once more than that has been read)
//! is streamed to the client, what was read first and then the rest as it
//! comes, and is **not stored**: the key is released, so a retry executes
//! again. It is logged (warn) and counted
//! ([`Metrics::response_too_large`](crate::engine::Metrics)) when its status
//! would otherwise have been stored. An inner service that already found the
//! body too large (like `idem serve`'s proxy) says so with
//! [`ResponseTooLarge`] and the layer does not read it again.
//! The middleware's own failures become `application/problem+json`
//! responses (protocol §4); the inner service's errors pass through as they are.
//!
//! An inner service that proxies (like `idem serve`) tells the layer about an
//! unreachable or ambiguous upstream by putting an [`UpstreamFailure`] into
//! its response's extensions.
//!
//! # Paths
//!
//! The path of every request whose method participates on some route is
//! put in normal form once, before its route is matched ([`route`]; the
//! rules are in [`crate::path`]): `//payments/1`, `/payments/./1/` and
//! `/%70ayments/1` are all `/payments/1`, and that is the path that is
//! matched, fingerprinted and handed to the inner service (the query is
//! kept as sent). Requests whose method participates nowhere (GET by
//! default) reach the inner service with their path as sent. Matching ignores ASCII case, of the path
//! and of the method, so neither `/Payments/1` nor `post` skips a rule;
//! the fingerprint and the inner service keep the case sent. A path with no
//! normal form (`%2F`, `%5C`, `\`, `%00`, a broken `%`) is refused with 400
//! `request_path_invalid` when its method participates on some route, and
//! passes through untouched otherwise.
//!
//! With axum's `Router::layer` the layer runs after axum has routed the
//! path as sent (`//payments/1` then finds no handler); to have axum route
//! the normal form too, put the layer around the whole router
//! (`IdempotencyLayer::layer(&layer, router)`, or `ServiceBuilder`).
//!
//! # Async mode
//!
//! With [`IdempotencyLayer::async_mode`], routes with `mode = "async"` are
//! answered `202 Accepted` at once and run later by a
//! [`Dispatcher`](crate::asyncop::Dispatcher), and the layer serves
//! `/_idem/operations/{id}` (protocol §9). See [`AsyncMode`].
//!
//! # Ambiguous outcomes
//!
//! Once the inner service has the request, its effect may have happened.
//! So an `Err` from it, a panic in it (the panic still reaches the caller,
//! once the key is settled), a response body that breaks while it is read
//! (the client gets 502 `upstream_unavailable`), and an
//! [`UpstreamFailure::Timeout`] or [`UpstreamFailure::Reset`] are ambiguous
//! (protocol §3.9): the route's `ambiguous` policy decides what the store keeps.
//! `hold` (the default) keeps the reservation until its lease runs out, so
//! retries get 409 meanwhile; `store` keeps a 502 `upstream_unavailable`
//! problem (or the proxy's own problem) as the final answer; only `release`
//! lets an immediate retry run the effect again.
//!
//! # Cancel safety
//!
//! A guarded request's execution (reserve, call the inner service, store)
//! runs in the response future while the client waits. When the client
//! hangs up and the server drops the response future, a started execution
//! is not cancelled: it moves onto a Tokio task of its own (so the layer
//! needs a Tokio runtime), runs to its end and its answer is stored
//! (or the key held or released, protocol §3.9), so the client's retry gets a
//! 409 while it runs, then the replay — never a second execution.
//!
//! While its client waits, the execution makes progress, and extends its
//! lease, when the response future is polled, as servers poll it until
//! they drop it: a caller that keeps the future but stops polling it for
//! longer than a third of the lease lets the lease run out, and another
//! request may take the key over. Drop it within a Tokio runtime's context,
//! as servers do: dropped outside any, it cannot move onto a task, and its
//! key stays held until its lease runs out (logged as an error).
//!
//! # Layout
//!
//! - `layer.rs`: [`IdempotencyLayer`];
//! - `route.rs`: [`route`], the path in normal form and the [`RouteMatch`]
//!   found once per request;
//! - `service.rs`: [`Idempotency`] and the phases of a request (resolve
//!   route and key → read body → fingerprint → run → respond);
//! - `execute.rs`: the *run* phase (the engine, the inner call, what the
//!   store keeps);
//! - `operations.rs`: async mode ([`AsyncMode`]): the *accept* phase of
//!   `mode = "async"` routes and the `/_idem/operations/{id}` endpoint;
//! - `future.rs`: [`ResponseFuture`]; `body.rs`: [`ResponseBody`];
//! - `response.rs`: capture, replay, hop-by-hop headers, the layer's problems.
//!
//! [`Engine`]: crate::Engine

mod body;
mod execute;
mod future;
#[allow(
    clippy::module_inception,
    reason = "tower-http's split: `layer/layer.rs` holds the `Layer`"
)]
mod layer;
mod log;
mod operations;
mod response;
mod route;
mod service;
mod stale;

pub use body::{buffer, Buffered, Prefixed, ResponseBody};
pub use future::ResponseFuture;
pub use layer::IdempotencyLayer;
pub use operations::{
    is_reserved, AcceptMetrics, AsyncMode, DEFAULT_MAX_PENDING, OPERATIONS_PREFIX, RESERVED_PREFIX,
};
pub use response::{capture, is_hop_by_hop, replay, strip_hop_by_hop};
pub use route::{route, RouteMatch};
pub use service::Idempotency;
pub use stale::{StaleGuard, IDEMPOTENCY_STATUS};

use http::header::HeaderName;

/// The request header that carries the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The response header that marks a replay.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Set in a response's extensions by an inner service that found the body
/// larger than the route's `max_response_body` while reading it (as
/// `idem serve`'s proxy does, within its upstream time-out; a
/// [`Prefixed`] body hands on what it read): the layer then streams the
/// body without reading it first, does not store it, and releases the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseTooLarge;

/// How a proxied request failed; set in a response's extensions by the inner
/// service so the layer can apply protocol §3.9.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// Refused before the request was sent (connect error, DNS): released.
    Unreachable,
    /// No answer in time after the request was sent: the `ambiguous` policy decides.
    Timeout,
    /// The connection broke after the request was sent: the `ambiguous` policy decides.
    Reset,
}
