//! The errors idem itself returns (protocol §4), as RFC 9457
//! `application/problem+json` documents.
//!
//! Every problem carries a stable `code`, and `retryable`: `true` for 409,
//! 502, 503 and 504 (retrying with the same key is safe) except the 409
//! `stale_version` (a stale event stays stale), `false` for the rest (the
//! request must be corrected). No problem ever carries another
//! scope's data, a stack trace or store internals.

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;

/// Where each code is documented: `{DOCS_BASE}#{code}`, the `type` of every
/// problem. Built from the package's `repository` (the workspace
/// `Cargo.toml`), the one place the project's URL is written.
pub const DOCS_BASE: &str = concat!(env!("CARGO_PKG_REPOSITORY"), "/blob/main/docs/problems.md");

/// The media type of problem documents.
pub const CONTENT_TYPE: &str = "application/problem+json";

/// A stable problem code (protocol §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemCode {
    /// 400: the route requires a key and none was sent.
    KeyMissing,
    /// 400: the key is empty, too long, not visible ASCII or malformed.
    KeyInvalid,
    /// 409: the same request is still executing.
    KeyInProgress,
    /// 413: the body is larger than `max_body`.
    BodyTooLarge,
    /// 422: the key was used with a different request.
    KeyReused,
    /// 503: the store is unreachable and the route fails closed.
    StoreUnavailable,
    /// 502: the upstream refused or reset the connection.
    UpstreamUnavailable,
    /// 504: the upstream did not answer in time.
    UpstreamTimeout,
    /// 400: the request body could not be read (client went away or was too
    /// slow). Not in protocol §4's table; nothing was executed or stored.
    BodyUnreadable,
    /// 400: the request's path cannot be put in normal form without guessing
    /// how the upstream reads it (an encoded slash or backslash, an encoded
    /// NUL, malformed percent-encoding). Not in protocol §4's table; nothing was
    /// executed or stored.
    PathInvalid,
    /// 500: idem itself failed (a bug). Not in protocol §4's table.
    Internal,
    /// 404: async mode: an unknown, malformed or foreign operation id
    /// (protocol §9.3; the same answer for all three).
    OperationNotFound,
    /// 503: async mode: `max_pending` operations are already waiting;
    /// nothing was stored (protocol §9.6).
    QueueFull,
    /// 409: the event's version is not newer than its entity's highest
    /// completed one; it did not run (protocol §13). Not retryable.
    StaleVersion,
    /// 400: a route with a stale guard got a missing or malformed version
    /// header, or a missing entity header, or a version of the other kind
    /// than the entity's (protocol §13).
    EventHeaderInvalid,
}

impl ProblemCode {
    /// Every code, in the order of protocol §4.
    pub const ALL: [ProblemCode; 15] = [
        ProblemCode::KeyMissing,
        ProblemCode::KeyInvalid,
        ProblemCode::KeyInProgress,
        ProblemCode::BodyTooLarge,
        ProblemCode::KeyReused,
        ProblemCode::StoreUnavailable,
        ProblemCode::UpstreamUnavailable,
        ProblemCode::UpstreamTimeout,
        ProblemCode::BodyUnreadable,
        ProblemCode::PathInvalid,
        ProblemCode::Internal,
        ProblemCode::OperationNotFound,
        ProblemCode::QueueFull,
        ProblemCode::StaleVersion,
        ProblemCode::EventHeaderInvalid,
    ];

    /// The stable machine-readable code.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::KeyMissing => "idempotency_key_missing",
            Self::KeyInvalid => "idempotency_key_invalid",
            Self::KeyInProgress => "idempotency_key_in_progress",
            Self::BodyTooLarge => "idempotency_body_too_large",
            Self::KeyReused => "idempotency_key_reused",
            Self::StoreUnavailable => "idempotency_store_unavailable",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::BodyUnreadable => "request_body_unreadable",
            Self::PathInvalid => "request_path_invalid",
            Self::Internal => "internal_error",
            Self::OperationNotFound => "operation_not_found",
            Self::QueueFull => "idempotency_queue_full",
            Self::StaleVersion => "stale_version",
            Self::EventHeaderInvalid => "event_header_invalid",
        }
    }

    /// The HTTP status.
    #[must_use]
    pub fn status(self) -> u16 {
        match self {
            Self::KeyMissing | Self::KeyInvalid | Self::BodyUnreadable | Self::PathInvalid => 400,
            Self::EventHeaderInvalid => 400,
            Self::KeyInProgress | Self::StaleVersion => 409,
            Self::BodyTooLarge => 413,
            Self::KeyReused => 422,
            Self::StoreUnavailable | Self::QueueFull => 503,
            Self::UpstreamUnavailable => 502,
            Self::UpstreamTimeout => 504,
            Self::Internal => 500,
            Self::OperationNotFound => 404,
        }
    }

    /// A short human-readable summary.
    #[must_use]
    pub fn title(self) -> &'static str {
        match self {
            Self::KeyMissing => "Idempotency-Key header is required",
            Self::KeyInvalid => "Idempotency-Key header is invalid",
            Self::KeyInProgress => "A request with this Idempotency-Key is in progress",
            Self::BodyTooLarge => "Request body is too large",
            Self::KeyReused => "Idempotency-Key was reused with a different request",
            Self::StoreUnavailable => "Idempotency store is unavailable",
            Self::UpstreamUnavailable => "Upstream is unavailable",
            Self::UpstreamTimeout => "Upstream timed out",
            Self::BodyUnreadable => "Request body could not be read",
            Self::PathInvalid => "Request path is ambiguous",
            Self::Internal => "Internal error in idem",
            Self::OperationNotFound => "Operation not found",
            Self::QueueFull => "Too many operations are pending",
            Self::StaleVersion => "The event is older than the entity's current version",
            Self::EventHeaderInvalid => "Event version or entity header is invalid",
        }
    }

    /// Whether retrying the same request with the same key is safe and useful.
    #[must_use]
    pub fn retryable(self) -> bool {
        self != Self::StaleVersion && matches!(self.status(), 409 | 502 | 503 | 504)
    }
}

/// One problem document, ready to render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The code.
    pub code: ProblemCode,
    /// What exactly went wrong, for a human.
    pub detail: String,
    /// `Retry-After` in seconds (409, 503).
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Document<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
    code: &'a str,
    retryable: bool,
}

impl Problem {
    /// A problem with a detail message.
    #[must_use]
    pub fn new(code: ProblemCode, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// Adds `Retry-After`, rounded up to whole seconds and at least 1.
    #[must_use]
    pub fn retry_after(mut self, wait: Duration) -> Self {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        self.retry_after = Some(secs.max(1));
        self
    }

    /// The HTTP status.
    #[must_use]
    pub fn status(&self) -> u16 {
        self.code.status()
    }

    /// The problem's code.
    #[must_use]
    pub fn code(&self) -> ProblemCode {
        self.code
    }

    /// The JSON body.
    #[must_use]
    pub fn body(&self) -> Bytes {
        let doc = Document {
            kind: format!("{DOCS_BASE}#{}", self.code.as_str()),
            title: self.code.title(),
            status: self.code.status(),
            detail: &self.detail,
            code: self.code.as_str(),
            retryable: self.code.retryable(),
        };
        // Serializing a struct of strings, numbers and bools cannot fail.
        Bytes::from(serde_json::to_vec(&doc).unwrap_or_default())
    }

    /// The problem as an HTTP response.
    #[must_use]
    pub fn to_response<B: From<Bytes>>(&self) -> http::Response<B> {
        let mut res = http::Response::new(B::from(self.body()));
        *res.status_mut() = http::StatusCode::from_u16(self.status())
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        let h = res.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(CONTENT_TYPE),
        );
        if let Some(secs) = self.retry_after {
            h.insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_renders_problem_json() {
        for code in ProblemCode::ALL {
            let p = Problem::new(code, "detail text");
            let v: serde_json::Value = serde_json::from_slice(&p.body()).expect("json");
            assert_eq!(v["code"], code.as_str());
            assert_eq!(v["status"], code.status());
            assert_eq!(
                v["retryable"],
                matches!(code.status(), 409 | 502 | 503 | 504) && code != ProblemCode::StaleVersion
            );
            assert!(v["type"]
                .as_str()
                .is_some_and(|t| t.ends_with(code.as_str())));
            assert_eq!(v["detail"], "detail text");
            let res: http::Response<Bytes> = p.to_response();
            assert_eq!(res.status().as_u16(), code.status());
            assert_eq!(res.headers()["content-type"], CONTENT_TYPE);
        }
    }

    #[test]
    fn retry_after_rounds_up_and_is_at_least_one() {
        let p = Problem::new(ProblemCode::KeyInProgress, "x");
        assert_eq!(p.clone().retry_after(Duration::ZERO).retry_after, Some(1));
        assert_eq!(
            p.clone()
                .retry_after(Duration::from_millis(1500))
                .retry_after,
            Some(2)
        );
        assert_eq!(p.retry_after(Duration::from_secs(3)).retry_after, Some(3));
    }
}
