//! [`RoutePolicyBuilder`]: a [`RoutePolicy`] built in code, starting from
//! the contract's defaults. `RoutePolicy` is `#[non_exhaustive]` (new knobs
//! arrive with new sections of the contract), so outside this crate it is
//! built this way, or from `RoutePolicy::default()` and field assignments.

use std::time::Duration;

use http::{HeaderName, Method};

use super::{Ambiguous, Concurrent, FailMode, KeyPolicy, Mode, RoutePolicy, Rules, StatusSet};

impl RoutePolicy {
    /// A builder that starts from [`RoutePolicy::default`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use idem::{Concurrent, RoutePolicy, Rules};
    ///
    /// let policy = RoutePolicy::builder()
    ///     .concurrent(Concurrent::Wait)
    ///     .wait_timeout(Duration::from_secs(30))
    ///     .lease(Duration::from_secs(60))
    ///     .build();
    /// let rules = Rules::from(&policy);
    /// assert_eq!(rules.concurrent, Concurrent::Wait);
    /// assert_eq!(rules.lease, Duration::from_secs(60));
    /// ```
    pub fn builder() -> RoutePolicyBuilder {
        RoutePolicyBuilder {
            policy: RoutePolicy::default(),
        }
    }
}

/// Builds a [`RoutePolicy`]; see [`RoutePolicy::builder`]. Each setter
/// consumes the builder and returns it; the fields are documented on
/// [`RoutePolicy`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct RoutePolicyBuilder {
    policy: RoutePolicy,
}

macro_rules! setters {
    ($($(#[$doc:meta])* $field:ident: $ty:ty;)*) => {
        $(
            $(#[$doc])*
            pub fn $field(mut self, $field: $ty) -> Self {
                self.policy.$field = $field;
                self
            }
        )*
    };
}

impl RoutePolicyBuilder {
    setters! {
        /// Methods that participate (default POST, PATCH).
        methods: Vec<Method>;
        /// What a request without a key gets (default `required`).
        key: KeyPolicy;
        /// The header that carries the key (default `idempotency-key`;
        /// `webhook-id` for Standard Webhooks, protocol §13).
        key_header: HeaderName;
        /// Retention of derived keys (default 10 s).
        dedupe_window: Duration;
        /// What a concurrent duplicate gets (default `reject`; `wait` for
        /// queue consumers and redelivered jobs).
        concurrent: Concurrent;
        /// How long a `wait` duplicate waits before 409 (default 10 s).
        wait_timeout: Duration;
        /// How long a reservation is honoured without a heartbeat (default 30 s).
        lease: Duration;
        /// How long a completed record is replayed (default 24 h).
        retention: Duration;
        /// What happens when the store cannot be reached (default `closed`).
        fail: FailMode;
        /// What the store keeps after an ambiguous outcome (default `hold`).
        ambiguous: Ambiguous;
        /// Largest request body accepted, in bytes (default 1 MiB).
        max_body: u64;
        /// Largest response kept, in bytes (default 8 MiB); a larger answer
        /// is streamed, not stored, and the key released.
        max_response_body: u64;
        /// Gateway only: how long the upstream has to answer (default 30 s).
        upstream_timeout: Duration;
        /// Headers whose values form the scope (default `authorization` and
        /// `cookie`).
        scope_headers: Vec<HeaderName>;
        /// Headers that enter the fingerprint (default `content-type`).
        fingerprint_headers: Vec<HeaderName>;
        /// Statuses whose responses are stored (default 2xx and 400, 404,
        /// 405, 410, 413, 415, 422).
        store_statuses: StatusSet;
        /// Sync or async (202) mode (default sync).
        mode: Mode;
        /// Async mode: the wait after an operation's first failed attempt,
        /// doubling after each (default 1 s).
        retry_backoff: Duration;
        /// Canonicalize JSON bodies before fingerprinting (default off).
        canonical_json: bool;
        /// JSON pointers removed from JSON bodies before fingerprinting.
        ignore_json_pointers: Vec<String>;
    }

    /// Longest key accepted, in characters; kept within 1–255 (protocol §3.2
    /// caps keys at 255).
    pub fn max_key_length(mut self, max_key_length: usize) -> Self {
        self.policy.max_key_length = max_key_length.clamp(1, 255);
        self
    }

    /// Async mode: most upstream calls per operation, the first included
    /// (default 5); at least 1.
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.policy.max_attempts = max_attempts.max(1);
        self
    }

    /// The stale-event guard (protocol §13); `None` turns it off.
    pub fn stale_guard(mut self, guard: Option<super::StalePolicy>) -> Self {
        self.policy.stale_guard = guard;
        self
    }

    /// The policy.
    #[must_use]
    pub fn build(self) -> RoutePolicy {
        self.policy
    }
}

impl Rules {
    /// The rules for queue consumers and redelivered jobs: the defaults,
    /// but a concurrent duplicate *waits* (up to `wait_timeout`) for the
    /// first run's result and gets it, instead of `InProgress` (protocol §5).
    ///
    /// ```
    /// use idem::{Concurrent, Rules};
    /// assert_eq!(Rules::wait().concurrent, Concurrent::Wait);
    /// ```
    #[must_use]
    pub fn wait() -> Self {
        Self {
            concurrent: Concurrent::Wait,
            ..Self::default()
        }
    }
}

impl From<RoutePolicy> for Rules {
    fn from(p: RoutePolicy) -> Self {
        Self::from(&p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builder_starts_from_the_defaults_and_sets_what_it_is_told() {
        assert_eq!(RoutePolicy::builder().build(), RoutePolicy::default());
        let p = RoutePolicy::builder()
            .concurrent(Concurrent::Wait)
            .ambiguous(Ambiguous::Release)
            .lease(Duration::from_secs(5))
            .max_key_length(0)
            .build();
        assert_eq!(p.concurrent, Concurrent::Wait);
        assert_eq!(p.ambiguous, Ambiguous::Release);
        assert_eq!(p.lease, Duration::from_secs(5));
        assert_eq!(p.max_key_length, 1);
        assert_eq!(p.retention, RoutePolicy::default().retention);
        let r = Rules::from(p);
        assert_eq!(
            (r.concurrent, r.ambiguous, r.lease),
            (Concurrent::Wait, Ambiguous::Release, Duration::from_secs(5))
        );
    }
}
