//! Per-route policy (protocol §3, §5, §6, §12) and the route table that picks it.
//!
//! A [`RoutePolicy`] holds every knob a route can turn; [`RoutePolicy::default`]
//! is the contract's built-in defaults. A [`RouteTable`] is an ordered list of
//! [`Route`]s (first match wins) plus the policy for unmatched requests.
//!
//! [`Rules`] are the few settings a single call needs, derived from a
//! policy. In code, build a policy with [`RoutePolicy::builder`]; for
//! queue consumers, [`Rules::wait`]. [`PolicyError`] says why a policy
//! value was refused.
//!
//! # Matching
//!
//! Routes match a path in the normal form of [`crate::path::normalize`]
//! (the tower layer normalizes each request's path once, before it
//! matches); patterns are put in the same form when they are parsed.
//! Matching ignores ASCII case, of the path and of the method: methods are
//! case-sensitive tokens (RFC 9110 §9.1) and paths are case-sensitive, but
//! an upstream may well route `post /Payments/1` like `POST /payments/1`,
//! and a rule must not be skipped by spelling either differently. What is
//! matched case-insensitively is still fingerprinted and forwarded with the
//! case sent.
//!
//! This module depends on `std`, `http` and `thiserror` only, so
//! configuration front ends can use it without the engine.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};

use crate::path::{self, PathError};

mod builder;
mod stale;
pub use builder::RoutePolicyBuilder;
pub use stale::{StaleAnswer, StalePolicy};

/// The default key header, `Idempotency-Key`, in the lower case of a
/// [`HeaderName`].
pub const DEFAULT_KEY_HEADER: &str = "idempotency-key";

/// What to do when a participating request carries no key (protocol §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyPolicy {
    /// 400 `idempotency_key_missing`.
    #[default]
    Required,
    /// Pass through without protection.
    Optional,
    /// Key = fingerprint, kept for `dedupe_window` (double-submit protection).
    Derived,
}

/// What a concurrent duplicate gets (protocol §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Concurrent {
    /// 409 `idempotency_key_in_progress` with `Retry-After`.
    #[default]
    Reject,
    /// Wait up to `wait_timeout` for the first execution's result and replay it.
    Wait,
}

/// What happens when the store cannot be reached (protocol §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailMode {
    /// 503 `idempotency_store_unavailable`, nothing executed.
    #[default]
    Closed,
    /// Execute without protection; counted and logged.
    Open,
}

/// What the store keeps after an ambiguous outcome (protocol §3.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ambiguous {
    /// Keep the reservation until its lease runs out (no heartbeat).
    #[default]
    Hold,
    /// Release at once: a retry executes again.
    Release,
    /// Store the problem response as the final answer.
    Store,
}

/// Synchronous forwarding or 202-Accepted async mode (protocol §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Forward and answer with the upstream's response.
    #[default]
    Sync,
    /// Answer 202 at once and dispatch in the background (protocol §9).
    Async,
}

/// A set of HTTP status codes (100–999) whose responses are stored.
#[derive(Clone, PartialEq, Eq)]
pub struct StatusSet {
    bits: [u64; 16],
}

impl StatusSet {
    /// The empty set.
    #[must_use]
    pub const fn empty() -> Self {
        Self { bits: [0; 16] }
    }

    /// Adds one status code; codes outside 100–999 are ignored.
    #[must_use]
    pub fn with(mut self, status: u16) -> Self {
        if (100..1000).contains(&status) {
            self.bits[usize::from(status / 64)] |= 1 << (status % 64);
        }
        self
    }

    /// Adds a whole class, `class` being 1–9 (`2` for `2xx`).
    #[must_use]
    pub fn with_class(mut self, class: u16) -> Self {
        for status in class * 100..class * 100 + 100 {
            self = self.with(status);
        }
        self
    }

    /// Parses one entry of a `store_statuses` list: `"2xx"` or `"404"`.
    ///
    /// # Errors
    ///
    /// [`PolicyError::StatusClass`] or [`PolicyError::StatusCode`].
    pub fn parse_entry(self, entry: &str) -> Result<Self, PolicyError> {
        let e = entry.trim();
        // `get`, not `[1..]`: a first character of several bytes is no
        // class, and must be refused, not panic (found by fuzzing).
        if e.len() == 3 && e.get(1..).is_some_and(|x| x.eq_ignore_ascii_case("xx")) {
            return match e.as_bytes()[0] {
                c @ b'1'..=b'9' => Ok(self.with_class(u16::from(c - b'0'))),
                _ => Err(PolicyError::StatusClass {
                    entry: entry.to_owned(),
                }),
            };
        }
        match e.parse::<u16>() {
            Ok(s) if (100..1000).contains(&s) => Ok(self.with(s)),
            _ => Err(PolicyError::StatusCode {
                entry: entry.to_owned(),
            }),
        }
    }

    /// Whether `status` is in the set.
    #[must_use]
    pub fn contains(&self, status: u16) -> bool {
        status < 1024 && self.bits[usize::from(status / 64)] & (1 << (status % 64)) != 0
    }
}

impl Default for StatusSet {
    /// `2xx` and 400, 404, 405, 410, 413, 415, 422 (protocol §3.9).
    fn default() -> Self {
        [400, 404, 405, 410, 413, 415, 422]
            .into_iter()
            .fold(StatusSet::empty().with_class(2), StatusSet::with)
    }
}

impl fmt::Debug for StatusSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries((100u16..1000).filter(|s| self.contains(*s)))
            .finish()
    }
}

/// Everything one route can configure. `Default` is the contract's defaults.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RoutePolicy {
    /// Methods that participate (default POST, PATCH). Others pass through.
    pub methods: Vec<Method>,
    /// Missing-key policy.
    pub key: KeyPolicy,
    /// The header that carries the key (default `idempotency-key`; e.g.
    /// `webhook-id` for Standard Webhooks senders, protocol §13). Read and
    /// validated exactly as `Idempotency-Key` (§3.2); any other header,
    /// `Idempotency-Key` included, is then an ordinary header.
    pub key_header: HeaderName,
    /// Retention of derived keys.
    pub dedupe_window: Duration,
    /// Concurrent-duplicate policy.
    pub concurrent: Concurrent,
    /// How long a `wait` duplicate waits before 409.
    pub wait_timeout: Duration,
    /// How long a reservation is honoured without a heartbeat.
    pub lease: Duration,
    /// How long a completed record is replayed.
    pub retention: Duration,
    /// Store-failure policy.
    pub fail: FailMode,
    /// Ambiguous-outcome policy.
    pub ambiguous: Ambiguous,
    /// Largest request body accepted, in bytes.
    pub max_body: u64,
    /// Largest response kept, in bytes: a larger answer is streamed to the
    /// client, not stored, and the key released (a retry executes again).
    pub max_response_body: u64,
    /// Longest key accepted, in characters (1–255; protocol §3.2 caps it at 255).
    pub max_key_length: usize,
    /// Gateway only: how long the upstream has to answer.
    pub upstream_timeout: Duration,
    /// Headers whose values form the scope (lower-case names). Default
    /// `authorization` and `cookie`, so tenants told apart by either never
    /// share keys; a client whose cookies change between retries then gets
    /// a new scope (name the exact headers to scope by to avoid that).
    pub scope_headers: Vec<HeaderName>,
    /// Headers that enter the fingerprint (lower-case names).
    pub fingerprint_headers: Vec<HeaderName>,
    /// Responses with these statuses are stored and replayed.
    pub store_statuses: StatusSet,
    /// Sync or async (202) mode.
    pub mode: Mode,
    /// Async mode: most upstream calls per operation, the first included
    /// (default 5). After the last fails, the final answer is a stored 502
    /// `upstream_unavailable` (protocol §9.4).
    pub max_attempts: u32,
    /// Async mode: the wait after an operation's first failed attempt,
    /// doubling after each, with jitter (default 1 s; an upstream
    /// `Retry-After` can only lengthen it).
    pub retry_backoff: Duration,
    /// Canonicalize JSON bodies (key order, whitespace) before fingerprinting.
    pub canonical_json: bool,
    /// JSON pointers (RFC 6901) removed from JSON bodies before fingerprinting.
    pub ignore_json_pointers: Vec<String>,
    /// The stale-event guard (protocol §13); `None` (the default): none.
    pub stale_guard: Option<StalePolicy>,
}

impl Default for RoutePolicy {
    fn default() -> Self {
        Self {
            methods: vec![Method::POST, Method::PATCH],
            key: KeyPolicy::Required,
            key_header: HeaderName::from_static(DEFAULT_KEY_HEADER),
            dedupe_window: Duration::from_secs(10),
            concurrent: Concurrent::Reject,
            wait_timeout: Duration::from_secs(10),
            lease: Duration::from_secs(30),
            retention: Duration::from_secs(24 * 3600),
            fail: FailMode::Closed,
            ambiguous: Ambiguous::Hold,
            max_body: 1024 * 1024,
            max_response_body: 8 * 1024 * 1024,
            max_key_length: 255,
            upstream_timeout: Duration::from_secs(30),
            scope_headers: vec![http::header::AUTHORIZATION, http::header::COOKIE],
            fingerprint_headers: vec![http::header::CONTENT_TYPE],
            store_statuses: StatusSet::default(),
            mode: Mode::Sync,
            max_attempts: 5,
            retry_backoff: Duration::from_secs(1),
            canonical_json: false,
            ignore_json_pointers: Vec::new(),
            stale_guard: None,
        }
    }
}

/// The per-call settings of one route, derived from a [`RoutePolicy`]: what
/// [`Engine::run`](crate::Engine::run), [`Engine::once`](crate::Engine::once)
/// and the stores' transactional APIs need to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// How long a reservation lives without a heartbeat.
    pub lease: Duration,
    /// How long a completed record is replayed.
    pub retention: Duration,
    /// Reject or wait for concurrent duplicates.
    pub concurrent: Concurrent,
    /// How long a waiting duplicate waits.
    pub wait_timeout: Duration,
    /// What to do when the store fails.
    pub fail: FailMode,
    /// What the store keeps when a started operation ends without an
    /// answer (its future dropped, or a panic): `release` frees the key,
    /// `hold` and `store` keep it until its lease runs out (there is no
    /// answer to store).
    pub ambiguous: Ambiguous,
}

impl Default for Rules {
    fn default() -> Self {
        (&RoutePolicy::default()).into()
    }
}

impl From<&RoutePolicy> for Rules {
    fn from(p: &RoutePolicy) -> Self {
        Self {
            lease: p.lease,
            retention: p.retention,
            concurrent: p.concurrent,
            wait_timeout: p.wait_timeout,
            fail: p.fail,
            ambiguous: p.ambiguous,
        }
    }
}

/// Why a policy value (a status entry, a path pattern, a route's `match`)
/// was refused. The messages name the offending text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// `Nxx` with a first digit outside 1–9.
    #[error("`{entry}` is not a status class (use 1xx … 9xx)")]
    StatusClass {
        /// The entry as written.
        entry: String,
    },
    /// Neither a status code in 100–999 nor a class.
    #[error("`{entry}` is not a status code (100–999) or a class like \"2xx\"")]
    StatusCode {
        /// The entry as written.
        entry: String,
    },
    /// A path pattern that does not start with `/`.
    #[error("path pattern `{pattern}` must start with `/`")]
    PatternStart {
        /// The pattern as written.
        pattern: String,
    },
    /// `**` before the last segment.
    #[error("path pattern `{pattern}`: `**` may only be the last segment")]
    RestNotLast {
        /// The pattern as written.
        pattern: String,
    },
    /// `*` inside a segment (`/a*`).
    #[error("path pattern `{pattern}`: `*` must be a whole segment")]
    PartialWildcard {
        /// The pattern as written.
        pattern: String,
    },
    /// A pattern that has no normal form (an encoded slash, say): no request
    /// path could ever match it.
    #[error("path pattern `{pattern}`: {source}")]
    PatternPath {
        /// The pattern as written.
        pattern: String,
        /// Why it has no normal form.
        #[source]
        source: PathError,
    },
    /// A `match` whose method is not an HTTP method.
    #[error("`{method}` is not an HTTP method")]
    Method {
        /// The method as written.
        method: String,
        /// Why `http` refused it.
        #[source]
        source: http::method::InvalidMethod,
    },
    /// A `match` that is not `METHOD /path` or `/path`.
    #[error("match `{spec}` must be `METHOD /path` or `/path` (e.g. \"POST /payments/*\")")]
    Match {
        /// The `match` as written.
        spec: String,
    },
}

/// A path pattern: segments separated by `/`; `*` matches exactly one
/// segment; `**` as the last segment matches zero or more segments.
/// Matching ignores the query string and ASCII case; the pattern is put in
/// the normal form of [`crate::path::normalize`] (`/a//b/` is `/a/b`), as
/// request paths are before they are matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    source: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    Rest,
}

impl PathPattern {
    /// Parses a pattern such as `/payments/*` or `/api/**`.
    ///
    /// # Errors
    ///
    /// [`PolicyError::PatternStart`], [`PolicyError::RestNotLast`],
    /// [`PolicyError::PartialWildcard`] or [`PolicyError::PatternPath`].
    pub fn parse(pattern: &str) -> Result<Self, PolicyError> {
        if !pattern.starts_with('/') {
            return Err(PolicyError::PatternStart {
                pattern: pattern.to_owned(),
            });
        }
        let normal = path::normalize(pattern).map_err(|source| PolicyError::PatternPath {
            pattern: pattern.to_owned(),
            source,
        })?;
        let rest = normal.strip_prefix('/').unwrap_or(&normal);
        let parts: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let seg = match *part {
                "*" => Segment::One,
                "**" if i + 1 == parts.len() => Segment::Rest,
                "**" => {
                    return Err(PolicyError::RestNotLast {
                        pattern: pattern.to_owned(),
                    })
                }
                p if p.contains('*') => {
                    return Err(PolicyError::PartialWildcard {
                        pattern: pattern.to_owned(),
                    })
                }
                p => Segment::Literal(p.to_owned()),
            };
            segments.push(seg);
        }
        Ok(Self {
            source: pattern.to_owned(),
            segments,
        })
    }

    /// Whether `path` matches, ignoring its query and ASCII case. `path`
    /// should be in normal form ([`crate::path::normalize`]): an empty
    /// segment never matches.
    #[must_use]
    pub fn matches(&self, path: &str) -> bool {
        let path = path.split('?').next().unwrap_or("");
        let rest = path.strip_prefix('/').unwrap_or(path);
        let mut parts = if rest.is_empty() {
            None
        } else {
            Some(rest.split('/'))
        }
        .into_iter()
        .flatten();
        for seg in &self.segments {
            match seg {
                Segment::Rest => return true,
                Segment::One => match parts.next() {
                    Some(p) if !p.is_empty() => {}
                    _ => return false,
                },
                Segment::Literal(l) => match parts.next() {
                    Some(p) if p.eq_ignore_ascii_case(l) => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }

    /// The pattern as written.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

/// One `[[route]]`: an optional method, a path pattern and its policy.
#[derive(Debug, Clone)]
pub struct Route {
    /// `None` matches any method (then `policy.methods` decides participation).
    pub method: Option<Method>,
    /// The path pattern.
    pub path: PathPattern,
    /// The policy of matching requests.
    pub policy: Arc<RoutePolicy>,
}

impl Route {
    /// Parses a `match` string: `"POST /payments/*"`, `"* /x"` or `"/x"`.
    ///
    /// # Errors
    ///
    /// [`PolicyError::Match`], [`PolicyError::Method`], or the path
    /// pattern's error.
    pub fn parse_match(spec: &str, policy: Arc<RoutePolicy>) -> Result<Self, PolicyError> {
        let mut words = spec.split_whitespace();
        let (method, path) = match (words.next(), words.next(), words.next()) {
            (Some(p), None, None) => (None, p),
            (Some("*"), Some(p), None) => (None, p),
            (Some(m), Some(p), None) => {
                let method =
                    Method::from_bytes(m.as_bytes()).map_err(|source| PolicyError::Method {
                        method: m.to_owned(),
                        source,
                    })?;
                (Some(method), p)
            }
            _ => {
                return Err(PolicyError::Match {
                    spec: spec.to_owned(),
                })
            }
        };
        Ok(Self {
            method,
            path: PathPattern::parse(path)?,
            policy,
        })
    }
}

/// Ordered routes (first match wins) and the policy for unmatched requests.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Route>,
    default: Arc<RoutePolicy>,
}

impl RouteTable {
    /// A table with no routes: every request uses `default`.
    #[must_use]
    pub fn new(default: RoutePolicy) -> Self {
        Self {
            routes: Vec::new(),
            default: Arc::new(default),
        }
    }

    /// Appends a route (matched after the ones already added).
    #[must_use]
    pub fn route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }

    /// The routes, in match order.
    #[must_use]
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The policy of unmatched requests.
    #[must_use]
    pub fn default_policy(&self) -> &Arc<RoutePolicy> {
        &self.default
    }

    /// The policy of the first route matching method and path (whether or
    /// not the method participates), else the default policy. Pass-through
    /// requests use it for settings such as `upstream_timeout`.
    #[must_use]
    pub fn policy_for(&self, method: &Method, path: &str) -> &Arc<RoutePolicy> {
        self.lookup(method, path).0
    }

    /// The policy that governs this request, or `None` when it passes
    /// through untouched (its method does not participate).
    #[must_use]
    pub fn classify(&self, method: &Method, path: &str) -> Option<&Arc<RoutePolicy>> {
        let (policy, participates) = self.lookup(method, path);
        participates.then_some(policy)
    }

    /// One pass over the table: the policy of the first route matching
    /// method and path (else the default policy), and whether the request
    /// participates. `path` should be in normal form
    /// ([`crate::path::normalize`]); method and path match ignoring ASCII
    /// case (see [the module docs](self#matching)).
    #[must_use]
    pub fn lookup(&self, method: &Method, path: &str) -> (&Arc<RoutePolicy>, bool) {
        for route in &self.routes {
            let method_ok = route.method.as_ref().is_none_or(|m| same_method(m, method));
            if method_ok && route.path.matches(path) {
                // A route that names its method makes that method participate.
                let participates = route.method.is_some() || lists(&route.policy.methods, method);
                return (&route.policy, participates);
            }
        }
        (&self.default, lists(&self.default.methods, method))
    }

    /// Whether a request with this method participates on *some* path: the
    /// default policy's `methods`, a route's `methods`, or a route's `match`
    /// names it. A request whose path has no normal form is refused when
    /// this holds (it might be a protected request) and passes through
    /// untouched when it does not.
    #[must_use]
    pub fn may_participate(&self, method: &Method) -> bool {
        lists(&self.default.methods, method)
            || self.routes.iter().any(|r| match &r.method {
                Some(m) => same_method(m, method),
                None => lists(&r.policy.methods, method),
            })
    }
}

/// Methods compare ignoring ASCII case in matching (see the module docs).
fn same_method(a: &Method, b: &Method) -> bool {
    a.as_str().eq_ignore_ascii_case(b.as_str())
}

fn lists(methods: &[Method], method: &Method) -> bool {
    methods.iter().any(|m| same_method(m, method))
}

impl Default for RouteTable {
    fn default() -> Self {
        Self::new(RoutePolicy::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_entry_of_multibyte_characters_is_refused_not_a_panic() {
        for entry in ["Շx", "éx", "é"] {
            assert!(StatusSet::default().parse_entry(entry).is_err(), "{entry}");
        }
    }

    #[test]
    fn default_statuses_follow_the_contract() {
        let s = StatusSet::default();
        for code in [200, 201, 204, 299, 400, 404, 405, 410, 413, 415, 422] {
            assert!(s.contains(code), "{code} must be stored by default");
        }
        for code in [
            100, 301, 401, 403, 408, 409, 425, 429, 500, 502, 503, 504, 999,
        ] {
            assert!(!s.contains(code), "{code} must not be stored by default");
        }
    }

    #[test]
    fn status_entries_parse() {
        let s = StatusSet::empty()
            .parse_entry("5xx")
            .and_then(|s| s.parse_entry("201"))
            .expect("valid entries");
        assert!(s.contains(503) && s.contains(201) && !s.contains(200));
        assert!(StatusSet::empty().parse_entry("0xx").is_err());
        assert!(StatusSet::empty().parse_entry("99").is_err());
        assert!(StatusSet::empty().parse_entry("abc").is_err());
    }

    #[test]
    fn path_patterns() {
        let p = PathPattern::parse("/payments/*").expect("valid");
        assert!(p.matches("/payments/1"));
        assert!(p.matches("/payments/1?x=2"));
        assert!(!p.matches("/payments"));
        assert!(!p.matches("/payments/"));
        assert!(!p.matches("/payments/1/refunds"));
        let r = PathPattern::parse("/api/**").expect("valid");
        assert!(r.matches("/api"));
        assert!(r.matches("/api/a/b/c"));
        assert!(!r.matches("/apis"));
        let root = PathPattern::parse("/").expect("valid");
        assert!(root.matches("/"));
        assert!(!root.matches("/a"));
        assert!(PathPattern::parse("payments").is_err());
        assert!(PathPattern::parse("/a/**/b").is_err());
        assert!(PathPattern::parse("/a/b*").is_err());
    }

    #[test]
    fn first_match_wins_and_methods_decide() {
        let wait = Arc::new(RoutePolicy {
            concurrent: Concurrent::Wait,
            ..RoutePolicy::default()
        });
        let put = Arc::new(RoutePolicy {
            key: KeyPolicy::Optional,
            ..RoutePolicy::default()
        });
        let table = RouteTable::default()
            .route(Route::parse_match("POST /payments/*", wait).expect("valid"))
            .route(Route::parse_match("PUT /things/*", put).expect("valid"))
            .route(
                Route::parse_match("/payments/**", Arc::new(RoutePolicy::default()))
                    .expect("valid"),
            );
        let p = table
            .classify(&Method::POST, "/payments/7")
            .expect("participates");
        assert_eq!(p.concurrent, Concurrent::Wait);
        let p = table
            .classify(&Method::PATCH, "/payments/7")
            .expect("falls to the third route");
        assert_eq!(p.concurrent, Concurrent::Reject);
        assert!(table.classify(&Method::GET, "/payments/7").is_none());
        let p = table.classify(&Method::PUT, "/things/1").expect("named");
        assert_eq!(p.key, KeyPolicy::Optional);
        assert!(table.classify(&Method::PUT, "/other").is_none());
        assert!(table.classify(&Method::POST, "/other").is_some());
        assert!(table.classify(&Method::GET, "/other").is_none());
        assert!(Route::parse_match("POST", Arc::default()).is_err());
        assert!(Route::parse_match("PO ST /x /y", Arc::default()).is_err());
    }

    #[test]
    fn patterns_are_normalized_and_match_ignoring_case() {
        let p = PathPattern::parse("//payments/./*/").expect("valid");
        assert!(p.matches("/payments/1"));
        assert_eq!(p.as_str(), "//payments/./*/", "shown as written");
        assert!(PathPattern::parse("/%70ayments")
            .expect("valid")
            .matches("/payments"));
        assert!(p.matches("/PAYMENTS/1") && p.matches("/Payments/x"));
        assert!(!p.matches("/payment/1"));
        assert!(matches!(
            PathPattern::parse("/a%2Fb"),
            Err(PolicyError::PatternPath { .. })
        ));
    }

    #[test]
    fn methods_match_ignoring_case() {
        let post = Method::from_bytes(b"post").expect("a token");
        let table = RouteTable::new(RoutePolicy {
            methods: Vec::new(),
            ..RoutePolicy::default()
        })
        .route(Route::parse_match("POST /payments/*", Arc::default()).expect("valid"))
        .route(Route::parse_match("/orders", Arc::default()).expect("valid"));
        assert!(table.classify(&post, "/payments/1").is_some());
        assert!(table.classify(&post, "/orders").is_some(), "via `methods`");
        let patch = Method::from_bytes(b"Patch").expect("a token");
        assert!(table.classify(&patch, "/orders").is_some());
        assert!(table.classify(&post, "/other").is_none());
        assert!(table.may_participate(&post) && table.may_participate(&patch));
        assert!(!table.may_participate(&Method::GET));
        let exempt = RouteTable::new(RoutePolicy {
            methods: Vec::new(),
            ..RoutePolicy::default()
        });
        assert!(!exempt.may_participate(&Method::POST));
    }
}
