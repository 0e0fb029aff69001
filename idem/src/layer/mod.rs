//! A `tower::Layer` that gives any HTTP service the guarantees of SPEC §3–§6.
//!
//! ```
//! use axum::{routing::post, Router};
//! use idem::{layer::IdempotencyLayer, store::memory::MemoryStore, Engine, RouteTable};
//!
//! let app: Router = Router::new()
//!     .route("/payments", post(|| async { "charged" }))
//!     .layer(IdempotencyLayer::new(Engine::new(MemoryStore::new()), RouteTable::default()));
//! # let _ = app;
//! ```
//!
//! Participating requests (by default POST and PATCH) are buffered up to the
//! route's `max_body`, fingerprinted and run through the [`Engine`]; the inner
//! service's response is buffered, stored when its status is in
//! `store_statuses`, and returned. Other requests pass through untouched.
//! The middleware's own failures become `application/problem+json`
//! responses (SPEC §4); the inner service's errors pass through as they are.
//!
//! An inner service that proxies (like `idem serve`) tells the layer about an
//! unreachable or ambiguous upstream by putting an [`UpstreamFailure`] into
//! its response's extensions.
//!
//! [`Engine`]: crate::Engine

mod body;
mod service;
mod tower_layer;

pub use body::ResponseBody;
pub use service::Idempotency;
pub use tower_layer::IdempotencyLayer;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::record::StoredResponse;

/// The request header that carries the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The response header that marks a replay.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// How a proxied request failed; set in a response's extensions by the inner
/// service so the layer can apply SPEC §3.9.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// Refused before the request was sent (connect error, DNS): released.
    Unreachable,
    /// No answer in time after the request was sent: the `ambiguous` policy decides.
    Timeout,
    /// The connection broke after the request was sent: the `ambiguous` policy decides.
    Reset,
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether `name` is hop-by-hop (RFC 9110 §7.6.1), including any header the
/// `Connection` header lists.
#[must_use]
pub fn is_hop_by_hop(name: &HeaderName, headers: &HeaderMap) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
        || headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(name.as_str()))
}

/// Removes hop-by-hop headers in place.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    for name in listed {
        headers.remove(name);
    }
}

/// Captures a response for storage, minus hop-by-hop headers.
#[must_use]
pub fn capture(status: http::StatusCode, headers: &HeaderMap, body: Bytes) -> StoredResponse {
    StoredResponse {
        status: status.as_u16(),
        headers: headers
            .iter()
            .filter(|(n, _)| !is_hop_by_hop(n, headers))
            .map(|(n, v)| (n.as_str().to_owned(), Bytes::copy_from_slice(v.as_bytes())))
            .collect(),
        body,
    }
}

/// Rebuilds a stored response for replay, with `Idempotent-Replayed: true`.
#[must_use]
pub fn replay<B: From<Bytes>>(stored: &StoredResponse) -> http::Response<B> {
    let mut res = http::Response::new(B::from(stored.body.clone()));
    *res.status_mut() = http::StatusCode::from_u16(stored.status).unwrap_or(http::StatusCode::OK);
    let headers = res.headers_mut();
    for (name, value) in &stored.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_maybe_shared(value.clone()),
        ) {
            headers.append(n, v);
        }
    }
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    res
}
