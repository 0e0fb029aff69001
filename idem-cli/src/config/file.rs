//! The TOML file's shape, and what its tables mean.
//!
//! Every table is `deny_unknown_fields`, so a typo is an error with its line
//! rather than a silent default. Values check themselves while being
//! deserialized, so toml attaches the value's position to the error.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Uri};
use idem::policy::{
    Ambiguous, Concurrent, FailMode, KeyPolicy, Mode, Route, RoutePolicy, RouteTable, StaleAnswer,
    StalePolicy, StatusSet,
};
use serde::de::{self, Deserializer, IgnoredAny, Visitor};
use serde::Deserialize;
use toml::Spanned;

use super::parse::{self, Named};
use super::source::Src;
use super::{ConfigError, Limits, StoreSpec};
use crate::units::{self, format_size, KIB};

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub(super) listen: Option<Spanned<Text<SocketAddr>>>,
    pub(super) upstream: Option<Spanned<Text<Uri>>>,
    pub(super) store: Option<Spanned<Text<StoreSpec>>>,
    pub(super) admin_listen: Option<Spanned<Text<SocketAddr>>>,
    pub(super) tls_cert: Option<Spanned<Text<PathBuf>>>,
    pub(super) tls_key: Option<Spanned<Text<PathBuf>>>,
    pub(super) upstream_ca: Option<Spanned<Text<PathBuf>>>,
    pub(super) store_ca: Option<Spanned<Text<PathBuf>>>,
    /// Present only to refuse it with a clear message.
    #[allow(dead_code)]
    admin_token: Option<TokenInFile>,
    pub(super) defaults: Option<PolicyTable>,
    #[serde(default)]
    pub(super) route: Vec<Spanned<PolicyTable>>,
    pub(super) limits: Option<LimitsTable>,
}

/// `[defaults]` and each `[[route]]` (one shape, so the keys cannot drift
/// apart; `match` is refused in `[defaults]` and required in a route).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PolicyTable {
    #[serde(rename = "match")]
    matcher: Option<Spanned<Text<Route>>>,
    methods: Option<Vec<Spanned<String>>>,
    key: Option<Choice<KeyPolicy>>,
    key_header: Option<Spanned<String>>,
    dedupe_window: Option<NonZeroDuration>,
    concurrent: Option<Choice<Concurrent>>,
    wait_timeout: Option<NonZeroDuration>,
    lease: Option<Spanned<NonZeroDuration>>,
    retention: Option<NonZeroDuration>,
    fail: Option<Choice<FailMode>>,
    ambiguous: Option<Choice<Ambiguous>>,
    max_body: Option<NonZeroSize>,
    max_response_body: Option<NonZeroSize>,
    max_key_length: Option<KeyLength>,
    upstream_timeout: Option<NonZeroDuration>,
    scope_headers: Option<Vec<Spanned<String>>>,
    fingerprint_headers: Option<Vec<Spanned<String>>>,
    store_statuses: Option<Spanned<Vec<Spanned<StatusEntry>>>>,
    mode: Option<Choice<Mode>>,
    max_attempts: Option<Attempts>,
    retry_backoff: Option<NonZeroDuration>,
    canonical_json: Option<bool>,
    ignore_json_pointers: Option<Vec<Spanned<String>>>,
    version_header: Option<Spanned<String>>,
    entity_header: Option<Spanned<String>>,
    stale: Option<Spanned<String>>,
}

/// `[limits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LimitsTable {
    store_timeout: Option<Spanned<NonZeroDuration>>,
    request_read_timeout: Option<NonZeroDuration>,
    max_header_bytes: Option<Spanned<SizeValue>>,
    max_connections: Option<Spanned<u64>>,
    max_concurrent_streams: Option<Spanned<u64>>,
    idle_timeout: Option<Spanned<NonZeroDuration>>,
    local_cache_bytes: Option<SizeValue>,
    memory_max_entries: Option<Spanned<u64>>,
    memory_max_bytes: Option<NonZeroSize>,
    shutdown_grace: Option<DurationValue>,
    complete_retry: Option<NonZeroDuration>,
    async_workers: Option<Spanned<u64>>,
    threads: Option<Spanned<u64>>,
    max_pending: Option<Spanned<u64>>,
}

/// `dst.field = value` for every `field` the table sets (each value is a
/// checked wrapper around the model's type).
macro_rules! copy_set {
    ($table:expr => $dst:expr; $($field:ident),* $(,)?) => {
        $(if let Some(v) = $table.$field {
            $dst.$field = v.0;
        })*
    };
}

/// `[limits] store_timeout` and where the file sets it (`None`: the
/// default), which every lease must outlast.
pub(super) struct StoreTimeout {
    pub(super) value: Duration,
    pub(super) span: Option<Range<usize>>,
}

/// `[defaults]` then every `[[route]]` in order, each starting from the
/// defaults. Refuses a route without `match`, `match` in `[defaults]`, a
/// route that repeats an earlier one's `match` (it could never match), and
/// a lease shorter than [`LEASE_PER_STORE_TIMEOUT`](super::LEASE_PER_STORE_TIMEOUT) × `store_timeout`.
pub(super) fn route_table(
    src: &Src<'_>,
    defaults: Option<PolicyTable>,
    routes: Vec<Spanned<PolicyTable>>,
    store_timeout: &StoreTimeout,
) -> Result<RouteTable, ConfigError> {
    let mut base = RoutePolicy::default();
    let mut lease_span = None;
    if let Some(mut table) = defaults {
        if let Some(m) = table.matcher.take() {
            return Err(src.at(
                &m.span(),
                "`match` belongs in a [[route]]; [defaults] applies to every request",
            ));
        }
        lease_span = table.lease.as_ref().map(Spanned::span);
        let guard_span = table.version_header.as_ref().map(Spanned::span);
        table.apply(&mut base, src)?;
        check_stale_guard(src, &base, guard_span.unwrap_or(0..0))?;
    }
    // The defaults' lease (set or not); a route that sets none inherits it.
    check_lease(src, base.lease, lease_span.as_ref(), store_timeout)?;
    let mut out = RouteTable::new(base.clone());
    // (method, pattern, line) of the routes so far, to refuse unreachable repeats.
    let mut seen: Vec<(Option<Method>, String, usize)> = Vec::new();
    for (i, spanned) in routes.into_iter().enumerate() {
        let span = spanned.span();
        let mut table = spanned.into_inner();
        let Some(m) = table.matcher.take() else {
            return Err(src.at(
                &span,
                "this [[route]] has no `match`: add one, e.g. match = \"POST /payments/*\"",
            ));
        };
        let m_span = m.span();
        let Text(route) = m.into_inner();
        let key = (route.method.clone(), route.path.as_str().to_owned());
        if let Some(j) = seen.iter().position(|(m, p, _)| (m, p) == (&key.0, &key.1)) {
            return Err(src.at(
                &m_span,
                format!(
                    "route {} has the same `match` as route {} (line {}): \
                     only the first can ever match",
                    i + 1,
                    j + 1,
                    seen[j].2
                ),
            ));
        }
        seen.push((key.0, key.1, src.line(m_span.start)));
        let mut policy = base.clone();
        if let Some(lease) = &table.lease {
            check_lease(src, lease.get_ref().0, Some(&lease.span()), store_timeout)?;
        }
        let guard_span = table.version_header.as_ref().map(Spanned::span);
        table.apply(&mut policy, src)?;
        check_stale_guard(src, &policy, guard_span.unwrap_or(span))?;
        out = out.route(Route {
            method: route.method,
            path: route.path,
            policy: Arc::new(policy),
        });
    }
    Ok(out)
}

/// Refuses a lease shorter than [`LEASE_PER_STORE_TIMEOUT`](super::LEASE_PER_STORE_TIMEOUT) × `store_timeout`,
/// blaming the lease's line, or `store_timeout`'s when the lease is the
/// built-in default.
fn check_lease(
    src: &Src<'_>,
    lease: Duration,
    lease_span: Option<&Range<usize>>,
    store_timeout: &StoreTimeout,
) -> Result<(), ConfigError> {
    let Some(reason) = super::lease_too_short(lease, store_timeout.value) else {
        return Ok(());
    };
    match (lease_span, &store_timeout.span) {
        (Some(span), _) => Err(src.at(span, reason)),
        (None, Some(span)) => Err(src.at(
            span,
            format!("store_timeout: the default lease applies, and {reason}"),
        )),
        // The built-in defaults keep the rule.
        (None, None) => Err(src.at(&(0..0), reason)),
    }
}

impl PolicyTable {
    /// Overrides the fields of `p` that this table sets.
    fn apply(self, p: &mut RoutePolicy, src: &Src<'_>) -> Result<(), ConfigError> {
        if let Some(list) = &self.methods {
            p.methods = each(src, list, "methods", parse::method)?;
        }
        if let Some(name) = &self.key_header {
            p.key_header = parse::key_header(name.get_ref())
                .map_err(|e| src.at(&name.span(), format!("key_header: {e}")))?;
        }
        if let Some(list) = &self.scope_headers {
            p.scope_headers = each(src, list, "scope_headers", parse::header)?;
        }
        if let Some(list) = &self.fingerprint_headers {
            p.fingerprint_headers = each(src, list, "fingerprint_headers", parse::header)?;
        }
        if let Some(list) = &self.store_statuses {
            p.store_statuses = statuses(src, list)?;
        }
        if let Some(list) = &self.ignore_json_pointers {
            p.ignore_json_pointers = each(src, list, "ignore_json_pointers", |s| {
                parse::json_pointer(s).map(str::to_owned)
            })?;
        }
        if let Some(v) = self.canonical_json {
            p.canonical_json = v;
        }
        if let Some(v) = self.lease {
            p.lease = v.into_inner().0;
        }
        copy_set!(self => p;
            key, dedupe_window, concurrent, wait_timeout, retention, fail,
            ambiguous, max_body, max_response_body, max_key_length, upstream_timeout, mode,
            max_attempts, retry_backoff,
        );
        stale_guard(p, src, self.version_header, self.entity_header, self.stale)
    }
}

/// `version_header`, `entity_header` and `stale` (protocol §13): the last
/// two only where a version header is set (here or inherited).
fn stale_guard(
    p: &mut RoutePolicy,
    src: &Src<'_>,
    version_header: Option<Spanned<String>>,
    entity_header: Option<Spanned<String>>,
    stale: Option<Spanned<String>>,
) -> Result<(), ConfigError> {
    let header = |v: &Spanned<String>, key: &str| {
        parse::header(v.get_ref()).map_err(|e| src.at(&v.span(), format!("{key}: {e}")))
    };
    if let Some(v) = &version_header {
        let name = header(v, "version_header")?;
        match &mut p.stale_guard {
            Some(guard) => guard.version_header = name,
            None => p.stale_guard = Some(StalePolicy::new(name)),
        }
    }
    let needs = |v: &Spanned<String>, key: &str| {
        src.at(
            &v.span(),
            format!(
                "{key} applies to the stale-event guard, which this route does not have: \
                 set version_header (e.g. version_header = \"X-Event-Version\") here or in [defaults]"
            ),
        )
    };
    if let Some(v) = &entity_header {
        let name = header(v, "entity_header")?;
        let guard = p
            .stale_guard
            .as_mut()
            .ok_or_else(|| needs(v, "entity_header"))?;
        guard.entity_header = Some(name);
    }
    if let Some(v) = &stale {
        let answer = match v.get_ref().as_str() {
            "reject" => StaleAnswer::Reject,
            "ack" => StaleAnswer::Ack,
            other => {
                return Err(src.at(
                    &v.span(),
                    format!("stale: `{other}` is not one of \"reject\", \"ack\""),
                ))
            }
        };
        let guard = p.stale_guard.as_mut().ok_or_else(|| needs(v, "stale"))?;
        guard.stale = answer;
    }
    Ok(())
}

/// A stale guard runs around a synchronous execution: an async route
/// (202) has none, so the two are refused together, blaming `span` (the
/// version header's, or the route's when it is inherited).
fn check_stale_guard(
    src: &Src<'_>,
    p: &RoutePolicy,
    span: Range<usize>,
) -> Result<(), ConfigError> {
    match &p.stale_guard {
        Some(guard) if p.mode == Mode::Async => Err(src.at(
            &span,
            format!(
                "version_header = \"{}\": the stale-event guard works on synchronous routes \
                 only; this route has mode = \"async\"",
                guard.version_header
            ),
        )),
        Some(guard) if guard.entity_header.as_ref() == Some(&guard.version_header) => Err(src.at(
            &span,
            "entity_header and version_header name the same header",
        )),
        _ => Ok(()),
    }
}

/// `store_statuses`: every entry blamed on its own line; never empty.
fn statuses(
    src: &Src<'_>,
    list: &Spanned<Vec<Spanned<StatusEntry>>>,
) -> Result<StatusSet, ConfigError> {
    if list.get_ref().is_empty() {
        return Err(src.at(
            &list.span(),
            "store_statuses is empty: no response would ever be stored \
             (the default is [\"2xx\", 400, 404, 405, 410, 413, 415, 422])",
        ));
    }
    let mut set = StatusSet::empty();
    for entry in list.get_ref() {
        set = entry
            .get_ref()
            .add_to(set)
            .map_err(|e| src.at(&entry.span(), format!("store_statuses: {e}")))?;
    }
    Ok(set)
}

/// Parses every element, blaming the element's own line; drops repeats.
fn each<T: PartialEq>(
    src: &Src<'_>,
    list: &[Spanned<String>],
    key: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, ConfigError> {
    let mut out = Vec::with_capacity(list.len());
    for item in list {
        let v = parse(item.get_ref()).map_err(|e| src.at(&item.span(), format!("{key}: {e}")))?;
        if !out.contains(&v) {
            out.push(v);
        }
    }
    Ok(out)
}

/// The most dispatcher tasks one instance runs: each is cheap, but each
/// polls the store when idle.
const MAX_ASYNC_WORKERS: usize = 10_000;

/// `[limits] threads`: at most this many (one per core is the point).
const MAX_THREADS: usize = 1024;

/// The smallest `max_header_bytes`: hyper's HTTP/1 read buffer cannot be
/// smaller (it panics below this).
const MIN_HEADER_BYTES: u64 = 8 * KIB;

impl LimitsTable {
    /// The default limits with this table's values on top, and where
    /// `store_timeout` was set (for the lease rule).
    pub(super) fn into_limits(
        self,
        src: &Src<'_>,
    ) -> Result<(Limits, Option<Range<usize>>), ConfigError> {
        let mut l = Limits::default();
        let store_timeout_span = self.store_timeout.as_ref().map(Spanned::span);
        if let Some(v) = self.store_timeout {
            l.store_timeout = v.into_inner().0;
        }
        if let Some(v) = &self.max_header_bytes {
            let n = v.get_ref().0;
            if n < MIN_HEADER_BYTES {
                return Err(src.at(
                    &v.span(),
                    format!(
                        "max_header_bytes must be at least 8KiB (the HTTP/1 parser's \
                         smallest buffer), not {}",
                        format_size(n)
                    ),
                ));
            }
            l.max_header_bytes = usize::try_from(n)
                .map_err(|_| src.at(&v.span(), "max_header_bytes is too large"))?;
        }
        if let Some(v) = &self.max_connections {
            l.max_connections = positive_count(src, v, "max_connections")?;
        }
        if let Some(v) = &self.max_concurrent_streams {
            l.max_concurrent_streams =
                u32::try_from(positive_count(src, v, "max_concurrent_streams")?)
                    .map_err(|_| src.at(&v.span(), "max_concurrent_streams is too large"))?;
        }
        if let Some(v) = &self.memory_max_entries {
            l.memory_max_entries = positive_count(src, v, "memory_max_entries")?;
        }
        if let Some(v) = &self.async_workers {
            // 0 is allowed: an accept-only instance (protocol §9.1).
            l.async_workers = count_at_most(src, v, MAX_ASYNC_WORKERS, "async_workers", "")?;
        }
        if let Some(v) = &self.threads {
            // 0 is allowed: one thread per CPU.
            l.threads = count_at_most(src, v, MAX_THREADS, "threads", " (0: one per CPU)")?;
        }
        if let Some(v) = &self.max_pending {
            if *v.get_ref() == 0 {
                return Err(src.at(
                    &v.span(),
                    "max_pending must be greater than 0 (0 would refuse every async request)",
                ));
            }
            l.max_pending = *v.get_ref();
        }
        copy_set!(self => l;
            request_read_timeout, local_cache_bytes, memory_max_bytes, shutdown_grace,
            complete_retry,
        );
        // Never wait longer for a first byte than for the whole head.
        l.idle_timeout = l.idle_timeout.min(l.request_read_timeout);
        if let Some(v) = &self.idle_timeout {
            let idle = v.get_ref().0;
            if idle > l.request_read_timeout {
                return Err(src.at(
                    &v.span(),
                    format!(
                        "idle_timeout {} is longer than request_read_timeout {}: a client \
                         that has not sent its first byte may not be waited for longer than \
                         one that is sending its request",
                        units::format_duration(idle),
                        units::format_duration(l.request_read_timeout)
                    ),
                ));
            }
            l.idle_timeout = idle;
        }
        Ok((l, store_timeout_span))
    }
}

/// A count from 0 to `max`; past it, "`key` is at most `max``note`".
fn count_at_most(
    src: &Src<'_>,
    v: &Spanned<u64>,
    max: usize,
    key: &str,
    note: &str,
) -> Result<usize, ConfigError> {
    match usize::try_from(*v.get_ref()) {
        Ok(n) if n <= max => Ok(n),
        _ => Err(src.at(&v.span(), format!("{key} is at most {max}{note}"))),
    }
}

fn positive_count(src: &Src<'_>, v: &Spanned<u64>, key: &str) -> Result<usize, ConfigError> {
    match usize::try_from(*v.get_ref()) {
        Ok(0) => Err(src.at(&v.span(), format!("{key} must be greater than 0"))),
        Ok(n) => Ok(n),
        Err(_) => Err(src.at(&v.span(), format!("{key} is too large"))),
    }
}

// ---------------------------------------------------------------------------
// Values that check themselves while being deserialized.

/// A type read from a TOML string by one of the value parsers.
pub(super) trait FromText: Sized {
    fn from_text(s: &str) -> Result<Self, String>;
}

impl FromText for PathBuf {
    fn from_text(s: &str) -> Result<Self, String> {
        parse::path(s)
    }
}

impl FromText for SocketAddr {
    fn from_text(s: &str) -> Result<Self, String> {
        parse::addr(s)
    }
}

impl FromText for Uri {
    fn from_text(s: &str) -> Result<Self, String> {
        parse::upstream(s)
    }
}

impl FromText for StoreSpec {
    fn from_text(s: &str) -> Result<Self, String> {
        parse::store(s)
    }
}

impl FromText for Route {
    fn from_text(s: &str) -> Result<Self, String> {
        parse::route_match(s)
    }
}

/// A string parsed by [`FromText`].
#[derive(Debug)]
pub(super) struct Text<T>(pub(super) T);

impl<'de, T: FromText> Deserialize<'de> for Text<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        T::from_text(&s).map(Self).map_err(de::Error::custom)
    }
}

/// A policy enum by its name in the file (`"wait"`).
#[derive(Debug)]
struct Choice<T>(T);

impl<'de, T: Named> Deserialize<'de> for Choice<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        T::from_name(&s).map(Self).map_err(de::Error::custom)
    }
}

/// `admin_token` in the file: always refused.
#[derive(Debug)]
struct TokenInFile;

impl<'de> Deserialize<'de> for TokenInFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        IgnoredAny::deserialize(d)?;
        Err(de::Error::custom(
            "a token does not belong in a file; set the environment variable \
             IDEM_ADMIN_TOKEN instead",
        ))
    }
}

/// A TOML string or integer, for values that may be either (or, for
/// durations, that must say why a bare number is refused).
#[derive(Debug)]
enum Scalar {
    Text(String),
    Int(i64),
}

impl Scalar {
    /// `expecting` ends toml's message for any other type ("invalid type:
    /// boolean `true`, expected …").
    fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
        expecting: &'static str,
    ) -> Result<Self, D::Error> {
        struct V(&'static str);
        impl Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.0)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Scalar, E> {
                Ok(Scalar::Text(s.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(n))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Scalar, E> {
                Ok(Scalar::Int(i64::try_from(n).unwrap_or(i64::MAX)))
            }
        }
        d.deserialize_any(V(expecting))
    }
}

/// A duration; with `NONZERO`, `0s` is refused.
#[derive(Debug)]
struct DurationValue<const NONZERO: bool = false>(Duration);

type NonZeroDuration = DurationValue<true>;

impl<'de, const NONZERO: bool> Deserialize<'de> for DurationValue<NONZERO> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = match Scalar::deserialize(d, "a duration such as \"30s\" or \"1h30m\"")? {
            Scalar::Text(s) => units::parse_duration(&s).map_err(de::Error::custom)?,
            Scalar::Int(n) => {
                return Err(de::Error::custom(format!(
                    "`{n}` has no unit: write a string with a unit, e.g. \"{n}s\" \
                     (units: ms, s, m, h, d)"
                )))
            }
        };
        if NONZERO && v.is_zero() {
            return Err(de::Error::custom("must be greater than 0s"));
        }
        Ok(Self(v))
    }
}

/// A size in bytes; with `NONZERO`, `0` is refused.
#[derive(Debug)]
struct SizeValue<const NONZERO: bool = false>(u64);

type NonZeroSize = SizeValue<true>;

impl<'de, const NONZERO: bool> Deserialize<'de> for SizeValue<NONZERO> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = match Scalar::deserialize(d, "a size such as \"1MiB\" or a number of bytes")? {
            Scalar::Text(s) => units::parse_size(&s).map_err(de::Error::custom)?,
            Scalar::Int(n) => {
                u64::try_from(n).map_err(|_| de::Error::custom(format!("`{n}` is not a size")))?
            }
        };
        if NONZERO && v == 0 {
            return Err(de::Error::custom("must be greater than 0"));
        }
        Ok(Self(v))
    }
}

/// `max_key_length`: 1 to 255 (protocol §3.2 caps keys at 255 characters).
#[derive(Debug)]
struct KeyLength(usize);

impl<'de> Deserialize<'de> for KeyLength {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        match usize::try_from(v) {
            Ok(n @ 1..=255) => Ok(Self(n)),
            _ => Err(de::Error::custom(format!(
                "`{v}` is out of range: a key may be 1 to 255 characters long"
            ))),
        }
    }
}

/// `max_attempts`: 1 to 1000 upstream calls per async operation.
#[derive(Debug)]
struct Attempts(u32);

impl<'de> Deserialize<'de> for Attempts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        match u32::try_from(v) {
            Ok(n @ 1..=1000) => Ok(Self(n)),
            _ => Err(de::Error::custom(format!(
                "`{v}` is out of range: max_attempts counts every upstream call, \
                 the first included, from 1 to 1000"
            ))),
        }
    }
}

/// One `store_statuses` entry: `"2xx"`, `"404"` or `404`. Checked later, so
/// that a bad entry in a multi-line list is blamed on its own line.
#[derive(Debug)]
struct StatusEntry(Scalar);

impl StatusEntry {
    fn add_to(&self, set: StatusSet) -> Result<StatusSet, String> {
        match &self.0 {
            Scalar::Text(s) => set.parse_entry(s).map_err(|e| e.to_string()),
            Scalar::Int(n @ 100..=999) => Ok(set.with(u16::try_from(*n).unwrap_or(0))),
            Scalar::Int(n) => Err(format!("`{n}` is not a status code (100–999)")),
        }
    }
}

impl<'de> Deserialize<'de> for StatusEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Scalar::deserialize(d, "a status code such as 404 or a class such as \"2xx\"").map(Self)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::assert_err;

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        assert_err(
            "lisen = \"127.0.0.1:1\"\n",
            2,
            &["`lisen`", "did you mean `listen`"],
        );
        assert_err(
            "[defaults]\nlease = \"1s\"\nconcurent = \"wait\"\n",
            4,
            &["unknown field `concurent`", "did you mean `concurrent`"],
        );
        assert_err(
            "[[route]]\nmatch = \"/a\"\n\n[[route]]\nmatch = \"/b\"\nretension = \"1h\"\n",
            7,
            &["`retension`", "did you mean `retention`"],
        );
        assert_err(
            "[limits]\nstore_timeout = \"1s\"\nmax_conections = 5\n",
            4,
            &["`max_conections`", "did you mean `max_connections`"],
        );
        assert_err("[default]\nlease = \"1s\"\n", 2, &["`default`"]);
    }

    #[test]
    fn bad_values_are_refused_with_their_line() {
        assert_err(
            "[defaults]\ndedupe_window = \"10 seconds\"\n",
            3,
            &["dedupe_window", "`10 seconds`", "spaces"],
        );
        assert_err("[defaults]\nlease = 30\n", 3, &["lease", "unit", "30s"]);
        assert_err(
            "[defaults]\nlease = \"0s\"\n",
            3,
            &["lease", "greater than 0"],
        );
        assert_err(
            "[defaults]\nwait_timeout = \"0s\"\nconcurrent = \"wait\"\n",
            3,
            &["wait_timeout"],
        );
        assert_err("[defaults]\nretention = \"0ms\"\n", 3, &["retention"]);
        assert_err(
            "[defaults]\ndedupe_window = \"0s\"\n",
            3,
            &["dedupe_window"],
        );
        assert_err(
            "[defaults]\nupstream_timeout = \"0s\"\n",
            3,
            &["upstream_timeout"],
        );
        assert_err(
            "[defaults]\nmax_body = \"1 MiB\"\n",
            3,
            &["max_body", "`1 MiB`"],
        );
        assert_err(
            "[defaults]\nmax_body = \"1MB\"\nmax_body = 0\n",
            4,
            &["max_body"],
        );
        assert_err(
            "[defaults]\nmax_body = 0\n",
            3,
            &["max_body", "greater than 0"],
        );
        assert_err(
            "[defaults]\nmax_response_body = \"0B\"\n",
            3,
            &["max_response_body", "greater than 0"],
        );
        assert_err(
            "[defaults]\nmax_body = \"12XB\"\n",
            3,
            &["unknown unit `XB`"],
        );
        assert_err(
            "[defaults]\nfail = \"maybe\"\n",
            3,
            &["fail", "`maybe`", "`closed`, `open`"],
        );
        assert_err(
            "[defaults]\nkey = \"Required\"\n",
            3,
            &["key", "`Required`"],
        );
        assert_err(
            "[defaults]\nstore_statuses = [\n  \"2xx\",\n  404,\n  99,\n]\n",
            6,
            &["store_statuses", "`99`"],
        );
        assert_err(
            "[defaults]\nstore_statuses = [\"2xx\", \"0xx\"]\n",
            3,
            &["store_statuses", "`0xx`"],
        );
        assert_err(
            "[defaults]\nstore_statuses = []\n",
            3,
            &["store_statuses", "empty"],
        );
        assert_err(
            "[defaults]\nscope_headers = [\"x-tenant\",\n \"bad header\"]\n",
            4,
            &["scope_headers", "`bad header`"],
        );
        assert_err(
            "[defaults]\nfingerprint_headers = [\"\"]\n",
            3,
            &["fingerprint_headers"],
        );
        assert_err(
            "[defaults]\nmethods = [\"POST\", \"P OST\"]\n",
            3,
            &["`P OST`"],
        );
        assert_err(
            "[defaults]\nmethods = [\"post\"]\n",
            3,
            &["case-sensitive", "`POST`"],
        );
        assert_err(
            "[defaults]\nignore_json_pointers = [\"meta\"]\n",
            3,
            &["ignore_json_pointers", "`meta`"],
        );
        assert_err(
            "[defaults]\nignore_json_pointers = [\"/a~2\"]\n",
            3,
            &["ignore_json_pointers", "`/a~2`"],
        );
        assert_err(
            "[defaults]\ncanonical_json = \"yes\"\n",
            3,
            &["canonical_json"],
        );
    }

    #[test]
    fn bad_routes_are_refused_with_their_line() {
        assert_err("[[route]]\nmatch = \"P@ST /x\"\n", 3, &["match", "`P@ST`"]);
        assert_err("[[route]]\nmatch = \"post /x\"\n", 3, &["case-sensitive"]);
        assert_err(
            "[[route]]\nmatch = \"POST payments\"\n",
            3,
            &["must start with `/`"],
        );
        assert_err("[[route]]\nmatch = \"POST /a/**/b\"\n", 3, &["`**`"]);
        assert_err(
            "[[route]]\nmatch = \"POST /a%2Fb\"\n",
            3,
            &["`/a%2Fb`", "encoded slash"],
        );
        assert_err("\n[[route]]\nconcurrent = \"wait\"\n", 3, &["no `match`"]);
        assert_err(
            "[defaults]\nmatch = \"/x\"\n",
            3,
            &["`match` belongs in a [[route]]"],
        );
        assert_err(
            "[[route]]\nmatch = \"POST /x\"\n[[route]]\nmatch = \"POST  /x\"\n",
            5,
            &["route 2", "route 1 (line 3)"],
        );
        assert_err("[route]\nmatch = \"/x\"\n", 2, &["route"]);
    }
}
