//! The one `info` line per request the layer guards or refuses (protocol
//! §13): its request id, attempt, outcome and status, and the key as a
//! short hash ([`StoreKey::log_id`](crate::key::StoreKey::log_id)), never
//! the key itself and never a header's value other than `X-Request-Id`.
//!
//! Requests that pass through (their method does not participate, or an
//! optional key is absent) are the inner service's business and get no
//! line.

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::key::LogId;
use crate::problem::Problem;

/// `X-Request-Id`, as a client or a gateway in front set it.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's `X-Request-Id` (the gateway sets one on every request),
/// kept for its line; not looked up when the lines are not written.
pub(super) fn request_id(headers: &HeaderMap) -> Option<HeaderValue> {
    if !enabled() {
        return None;
    }
    headers.get(X_REQUEST_ID).cloned()
}

/// Whether the request lines are written (`info` for this module): the
/// key's short hash is computed only then.
pub(super) fn enabled() -> bool {
    tracing::enabled!(target: module_path!(), tracing::Level::INFO)
}

/// Writes the line of a request refused with `problem` before any key
/// was read or stored, and answers it.
pub(super) fn refused<B: From<bytes::Bytes>>(
    id: Option<&HeaderValue>,
    problem: &Problem,
) -> http::Response<B> {
    request(id, None, problem.code().as_str(), problem.status());
    problem.to_response()
}

/// Writes the request's line. `outcome` is an engine outcome's
/// [`name`](crate::engine::Outcome::name), a problem code for a refusal,
/// or `accepted` for async mode; `status` is what the client gets (`0`
/// when the inner service failed without an answer).
pub(super) fn request(id: Option<&HeaderValue>, key: Option<LogId>, outcome: &str, status: u16) {
    let id = id
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 200)
        .unwrap_or("-");
    match key {
        Some(key) => tracing::info!(
            request_id = id,
            attempt = 1,
            outcome,
            status,
            key = %key,
            "request"
        ),
        None => tracing::info!(request_id = id, attempt = 1, outcome, status, "request"),
    }
}

/// The outcome of an async route's *accept* phase, read off its answer:
/// `accepted` (202), `replayed`, `conflict` (409), `mismatch` (422) or
/// `refused` (503: queue full or store unavailable).
pub(super) fn async_outcome<B>(res: &http::Response<B>) -> &'static str {
    if res.headers().contains_key(super::IDEMPOTENT_REPLAYED) {
        return "replayed";
    }
    match res.status().as_u16() {
        202 => "accepted",
        409 => "conflict",
        422 => "mismatch",
        _ => "refused",
    }
}
