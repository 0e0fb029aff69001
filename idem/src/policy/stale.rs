//! A route's stale-event guard (protocol §13): which headers carry an
//! event's version and entity, and how a stale event is answered.

use http::HeaderName;

/// How a route answers a stale event (protocol §13).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StaleAnswer {
    /// `409 stale_version` (`retryable: false`).
    #[default]
    Reject,
    /// `200` with `Idempotency-Status: stale`, for senders that retry
    /// every non-2xx answer.
    Ack,
}

/// The stale-event guard of a route: requests carry an entity and a
/// version, and an event whose version is not newer than the entity's
/// highest completed one is not forwarded (protocol §13).
///
/// The guard runs after the key check, so a repeat of an applied event
/// under its key is a replay. An event completes when the service answers
/// 2xx: then its version becomes the entity's. One event per entity runs
/// at a time (`concurrent`: `reject` → 409 `idempotency_key_in_progress`,
/// `wait` → waits up to `wait_timeout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StalePolicy {
    /// The header carrying the version: a non-negative integer or an
    /// RFC 3339 timestamp (e.g. `x-event-version`).
    pub version_header: HeaderName,
    /// The header naming the entity; `None`: the request's path (in normal
    /// form, without the query) is the entity.
    pub entity_header: Option<HeaderName>,
    /// What a stale event gets.
    pub stale: StaleAnswer,
}

impl StalePolicy {
    /// A guard reading the version from `version_header`, the entity from
    /// the path, rejecting stale events.
    #[must_use]
    pub fn new(version_header: HeaderName) -> Self {
        Self {
            version_header,
            entity_header: None,
            stale: StaleAnswer::Reject,
        }
    }
}
