//! Configuration of `idem serve` (SPEC §11, §12): the TOML file, the
//! `IDEM_*` environment variables and the command-line flags, merged and
//! validated before anything starts.
//!
//! Precedence, highest first: flags, environment, file, built-in defaults.
//! An empty environment variable counts as unset. Every problem names where
//! it is: `idem.toml:7: reason`, `environment variable IDEM_LISTEN: reason`
//! or `--listen: reason`.
//!
//! # The file
//!
//! ```toml
//! listen = "127.0.0.1:8080"          # IDEM_LISTEN, --listen
//! upstream = "http://127.0.0.1:3000" # IDEM_UPSTREAM, --upstream (required somewhere)
//! store = "memory"                   # IDEM_STORE, --store: memory | redis://… | postgres://…
//! admin_listen = "127.0.0.1:9090"    # IDEM_ADMIN_LISTEN, --admin-listen
//!
//! [defaults]   # the policy of unmatched requests; every [[route]] starts from it
//! lease = "30s"
//!
//! [[route]]    # first match wins
//! match = "POST /payments/*"
//! concurrent = "wait"
//!
//! [limits]
//! store_timeout = "2s"
//! ```
//!
//! - Durations are strings with a unit (`"500ms"`, `"30s"`, `"1h30m"`, `"7d"`);
//!   a bare number is refused. Sizes are strings (`"1MiB"`, `"10kB"`) or
//!   integers (bytes).
//! - Every table refuses unknown keys, so a typo is an error, not a default.
//! - `admin_token` is never read from the file (it would end up in version
//!   control): it comes only from `IDEM_ADMIN_TOKEN`, and a file that sets it
//!   is refused.
//! - `methods = []` is allowed: no method participates, so requests matching
//!   that route pass through untouched (unless its `match` names a method,
//!   which always participates). Use it to exempt paths.
//! - `mode = "async"` is accepted (SPEC §9).
//! - `lease`, `wait_timeout`, `upstream_timeout`, `retention`,
//!   `dedupe_window` and `max_body` must be greater than zero.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, Uri};
use idem::policy::{
    Ambiguous, Concurrent, FailMode, KeyPolicy, Mode, Route, RoutePolicy, RouteTable, StatusSet,
};
use serde::de::{self, Deserializer, IgnoredAny, Visitor};
use serde::Deserialize;
use toml::Spanned;

/// Values given on the command line (None = not given). The CLI's clap struct fills this.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen ADDR`.
    pub listen: Option<String>,
    /// `--upstream URL`.
    pub upstream: Option<String>,
    /// `--store STORE`.
    pub store: Option<String>,
    /// `--admin-listen ADDR`.
    pub admin_listen: Option<String>,
}

/// The fully validated configuration.
///
/// `Debug` redacts the admin token and any password in the store URL.
#[derive(Clone)]
pub struct Config {
    /// Where the gateway listens (default `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// The upstream: `http://host:port`, without path or query.
    pub upstream: Uri,
    /// The record store (default memory).
    pub store: StoreSpec,
    /// Where the admin listener listens; `None` = no admin listener.
    pub admin_listen: Option<SocketAddr>,
    /// The admin bearer token, from `IDEM_ADMIN_TOKEN` only (never the file).
    pub admin_token: Option<String>,
    /// Per-route policies, first match wins; unmatched requests use `[defaults]`.
    pub routes: RouteTable,
    /// Resource limits and timeouts (`[limits]`).
    pub limits: Limits,
    /// The config file used, if any.
    pub source: Option<PathBuf>,
}

/// Which store keeps the records (SPEC §7).
///
/// `Display` and `Debug` redact any password in the URL as `***`.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// The in-process store (one instance; lost on restart).
    Memory,
    /// A Redis URL (`redis://…` or `rediss://…`), as given.
    Redis(String),
    /// A PostgreSQL URL (`postgres://…` or `postgresql://…`), as given.
    Postgres(String),
}

/// Resource limits and timeouts: the TOML table `[limits]`, every field optional.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Timeout of every store call (default 2s).
    pub store_timeout: Duration,
    /// How long a client has to send headers and body (default 10s).
    pub request_read_timeout: Duration,
    /// Total request header size (default 64KiB; at least 8KiB).
    pub max_header_bytes: usize,
    /// Concurrent client connections (default 10 000).
    pub max_connections: usize,
    /// In-process cache of completed records, in bytes (default 64MiB; 0 disables).
    pub local_cache_bytes: u64,
    /// Memory store bound on records (default 1 000 000).
    pub memory_max_entries: usize,
    /// Memory store bound on bytes (default 512MiB).
    pub memory_max_bytes: u64,
    /// How long graceful shutdown waits for in-flight requests (default 30s).
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            store_timeout: Duration::from_secs(2),
            request_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_connections: 10_000,
            local_cache_bytes: 64 * MIB,
            memory_max_entries: 1_000_000,
            memory_max_bytes: 512 * MIB,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Why a configuration was refused. `Display` says where and why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file could not be read: `<file>: <io error>`.
    #[error("{}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A problem in the configuration file: `<file>:<line>: <reason>`.
    #[error("{}: {reason}", located(.file, *.line))]
    File {
        /// The file's name as given.
        file: String,
        /// 1-based line of the offending key or value (`None` if unknown).
        line: Option<usize>,
        /// What is wrong, and how to fix it.
        reason: String,
    },
    /// A bad `IDEM_*` environment variable: `environment variable IDEM_X: <reason>`.
    #[error("environment variable {var}: {reason}")]
    Env {
        /// The variable, e.g. `IDEM_LISTEN`.
        var: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A bad command-line flag: `--flag: <reason>`.
    #[error("{flag}: {reason}")]
    Flag {
        /// The flag, e.g. `--listen`.
        flag: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// No upstream anywhere.
    #[error(
        "no upstream given: use --upstream URL, the environment variable IDEM_UPSTREAM, \
         or `upstream = \"http://host:port\"` in the config file"
    )]
    MissingUpstream,
}

fn located(file: &str, line: Option<usize>) -> String {
    match line {
        Some(line) => format!("{file}:{line}"),
        None => file.to_owned(),
    }
}

/// Reads the file (if any), then IDEM_* environment (via `env` lookup fn, so
/// tests don't touch the real process env), then flags. Precedence: flags >
/// env > file > defaults (SPEC §12).
///
/// # Errors
///
/// [`ConfigError::Read`] if the file cannot be read; otherwise the first
/// problem found, naming the file and line, the variable or the flag.
pub fn load(
    path: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
    flags: &Overrides,
) -> Result<Config, ConfigError> {
    let Some(path) = path else {
        let src = Src { name: "", text: "" };
        return build(&src, FileConfig::default(), None, env, flags);
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let name = path.display().to_string();
    let src = Src {
        name: &name,
        text: &text,
    };
    let file = src.parse()?;
    build(&src, file, Some(path.to_owned()), env, flags)
}

/// Same as [`load`] but from a string (tests; `name` is used in messages as
/// the file name, and becomes [`Config::source`]).
///
/// # Errors
///
/// As [`load`], except that nothing is read from disk.
pub fn load_str(
    name: &str,
    toml_src: &str,
    env: &dyn Fn(&str) -> Option<String>,
    flags: &Overrides,
) -> Result<Config, ConfigError> {
    let src = Src {
        name,
        text: toml_src,
    };
    let file = src.parse()?;
    build(&src, file, Some(PathBuf::from(name)), env, flags)
}

// ---------------------------------------------------------------------------
// Merging

const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));

/// Where a top-level value came from, to blame the right place for a
/// problem found only once everything is merged.
enum Origin {
    Default,
    File(Range<usize>),
    Env(&'static str),
    Flag(&'static str),
}

impl Origin {
    fn error(&self, src: &Src<'_>, reason: String) -> ConfigError {
        match self {
            Origin::File(span) => src.at(span, reason),
            Origin::Env(var) => ConfigError::Env { var, reason },
            Origin::Flag(flag) => ConfigError::Flag { flag, reason },
            // Defaults never conflict with each other; blame the file as a whole.
            Origin::Default => ConfigError::File {
                file: src.name.to_owned(),
                line: None,
                reason,
            },
        }
    }
}

/// One top-level setting: the flag wins, then the variable, then the file.
fn layered<T>(
    flag: (&'static str, Option<&String>),
    var: &'static str,
    env: &dyn Fn(&str) -> Option<String>,
    file: Option<(T, Range<usize>)>,
    parse: fn(&str) -> Result<T, String>,
) -> Result<Option<(T, Origin)>, ConfigError> {
    if let Some(value) = flag.1 {
        return match parse(value) {
            Ok(v) => Ok(Some((v, Origin::Flag(flag.0)))),
            Err(reason) => Err(ConfigError::Flag {
                flag: flag.0,
                reason,
            }),
        };
    }
    if let Some(value) = env(var).filter(|v| !v.trim().is_empty()) {
        return match parse(value.trim()) {
            Ok(v) => Ok(Some((v, Origin::Env(var)))),
            Err(reason) => Err(ConfigError::Env { var, reason }),
        };
    }
    Ok(file.map(|(v, span)| (v, Origin::File(span))))
}

fn unspan<T, U>(s: Option<Spanned<T>>, f: impl FnOnce(T) -> U) -> Option<(U, Range<usize>)> {
    s.map(|s| {
        let span = s.span();
        (f(s.into_inner()), span)
    })
}

fn build(
    src: &Src<'_>,
    file: FileConfig,
    source: Option<PathBuf>,
    env: &dyn Fn(&str) -> Option<String>,
    flags: &Overrides,
) -> Result<Config, ConfigError> {
    let routes = build_routes(src, file.defaults, file.route)?;
    let limits = build_limits(src, file.limits.unwrap_or_default())?;

    let (listen, listen_origin) = layered(
        ("--listen", flags.listen.as_ref()),
        "IDEM_LISTEN",
        env,
        unspan(file.listen, |v| v.0),
        parse_addr,
    )?
    .unwrap_or((DEFAULT_LISTEN, Origin::Default));
    let (upstream, upstream_origin) = layered(
        ("--upstream", flags.upstream.as_ref()),
        "IDEM_UPSTREAM",
        env,
        unspan(file.upstream, |v| v.0),
        parse_upstream,
    )?
    .ok_or(ConfigError::MissingUpstream)?;
    let store = layered(
        ("--store", flags.store.as_ref()),
        "IDEM_STORE",
        env,
        unspan(file.store, |v| v.0),
        |s| s.parse::<StoreSpec>(),
    )?
    .map_or(StoreSpec::Memory, |(s, _)| s);
    let admin = layered(
        ("--admin-listen", flags.admin_listen.as_ref()),
        "IDEM_ADMIN_LISTEN",
        env,
        unspan(file.admin_listen, |v| v.0),
        parse_addr,
    )?;
    let admin_token = match env("IDEM_ADMIN_TOKEN").filter(|t| !t.is_empty()) {
        None => None,
        Some(token) => {
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::Env {
                    var: "IDEM_ADMIN_TOKEN",
                    reason: "the token must be visible ASCII characters only \
                             (no spaces or line breaks): it is compared with \
                             `Authorization: Bearer <token>`"
                        .to_owned(),
                });
            }
            Some(token)
        }
    };

    // Checks that need more than one value.
    if let Some((admin, origin)) = &admin {
        if *admin == listen && listen.port() != 0 {
            return Err(origin.error(
                src,
                format!(
                    "admin_listen {admin} is also the gateway's listen address \
                     (from {}); give the admin listener its own port",
                    listen_origin.describe()
                ),
            ));
        }
        if admin_token.is_none() {
            return Err(origin.error(
                src,
                format!(
                    "admin_listen {admin} needs a bearer token: set IDEM_ADMIN_TOKEN \
                     (the admin listener can read and purge records)"
                ),
            ));
        }
    }
    if listen.port() != 0 && upstream_is(&upstream, listen) {
        return Err(upstream_origin.error(
            src,
            format!(
                "upstream {upstream} is the gateway's own listen address \
                 (from {}): every request would loop back into idem",
                listen_origin.describe()
            ),
        ));
    }

    Ok(Config {
        listen,
        upstream,
        store,
        admin_listen: admin.map(|(a, _)| a),
        admin_token,
        routes,
        limits,
        source,
    })
}

impl Origin {
    fn describe(&self) -> String {
        match self {
            Origin::Default => "the default".to_owned(),
            Origin::File(_) => "the config file".to_owned(),
            Origin::Env(var) => (*var).to_owned(),
            Origin::Flag(flag) => (*flag).to_owned(),
        }
    }
}

/// Whether `upstream` names exactly `addr` (an IP literal and the same port).
fn upstream_is(upstream: &Uri, addr: SocketAddr) -> bool {
    let Some(host) = upstream.host() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = upstream.port_u16().unwrap_or(80);
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip == addr.ip() && port == addr.port())
}

fn build_routes(
    src: &Src<'_>,
    defaults: Option<PolicyTable>,
    routes: Vec<Spanned<PolicyTable>>,
) -> Result<RouteTable, ConfigError> {
    let mut base = RoutePolicy::default();
    if let Some(mut table) = defaults {
        if let Some(m) = table.matcher.take() {
            return Err(src.at(
                &m.span(),
                "`match` belongs in a [[route]]; [defaults] applies to every request",
            ));
        }
        table.apply(&mut base, src)?;
    }
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
        let MatchValue(route) = m.into_inner();
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
        table.apply(&mut policy, src)?;
        out = out.route(Route {
            method: route.method,
            path: route.path,
            policy: Arc::new(policy),
        });
    }
    Ok(out)
}

/// The smallest `max_header_bytes`: hyper's HTTP/1 read buffer cannot be
/// smaller (it panics below this).
const MIN_HEADER_BYTES: u64 = 8 * 1024;

fn build_limits(src: &Src<'_>, t: LimitsTable) -> Result<Limits, ConfigError> {
    let mut l = Limits::default();
    if let Some(v) = t.store_timeout {
        l.store_timeout = v.0;
    }
    if let Some(v) = t.request_read_timeout {
        l.request_read_timeout = v.0;
    }
    if let Some(v) = t.max_header_bytes {
        let n = v.get_ref().0;
        if n < MIN_HEADER_BYTES {
            return Err(src.at(
                &v.span(),
                format!(
                    "max_header_bytes must be at least 8KiB (the HTTP/1 parser's \
                     smallest buffer), not {}",
                    fmt_size(n)
                ),
            ));
        }
        l.max_header_bytes =
            usize::try_from(n).map_err(|_| src.at(&v.span(), "max_header_bytes is too large"))?;
    }
    if let Some(v) = t.max_connections {
        l.max_connections = positive_count(src, &v, "max_connections")?;
    }
    if let Some(v) = t.local_cache_bytes {
        l.local_cache_bytes = v.0;
    }
    if let Some(v) = t.memory_max_entries {
        l.memory_max_entries = positive_count(src, &v, "memory_max_entries")?;
    }
    if let Some(v) = t.memory_max_bytes {
        l.memory_max_bytes = v.0;
    }
    if let Some(v) = t.shutdown_grace {
        l.shutdown_grace = v.0;
    }
    Ok(l)
}

fn positive_count(src: &Src<'_>, v: &Spanned<u64>, key: &str) -> Result<usize, ConfigError> {
    match usize::try_from(*v.get_ref()) {
        Ok(0) => Err(src.at(&v.span(), format!("{key} must be greater than 0"))),
        Ok(n) => Ok(n),
        Err(_) => Err(src.at(&v.span(), format!("{key} is too large"))),
    }
}

// ---------------------------------------------------------------------------
// The file's shape

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<Spanned<AddrValue>>,
    upstream: Option<Spanned<UpstreamValue>>,
    store: Option<Spanned<StoreValue>>,
    admin_listen: Option<Spanned<AddrValue>>,
    /// Present only to refuse it with a clear message.
    #[allow(dead_code)]
    admin_token: Option<TokenInFile>,
    defaults: Option<PolicyTable>,
    #[serde(default)]
    route: Vec<Spanned<PolicyTable>>,
    limits: Option<LimitsTable>,
}

/// `[defaults]` and each `[[route]]` (one shape, so the keys cannot drift
/// apart; `match` is refused in `[defaults]` and required in a route).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyTable {
    #[serde(rename = "match")]
    matcher: Option<Spanned<MatchValue>>,
    methods: Option<Vec<Spanned<String>>>,
    key: Option<Choice<KeyPolicy>>,
    dedupe_window: Option<NonZeroDuration>,
    concurrent: Option<Choice<Concurrent>>,
    wait_timeout: Option<NonZeroDuration>,
    lease: Option<NonZeroDuration>,
    retention: Option<NonZeroDuration>,
    fail: Option<Choice<FailMode>>,
    ambiguous: Option<Choice<Ambiguous>>,
    max_body: Option<NonZeroSize>,
    max_key_length: Option<KeyLength>,
    upstream_timeout: Option<NonZeroDuration>,
    scope_headers: Option<Vec<Spanned<String>>>,
    fingerprint_headers: Option<Vec<Spanned<String>>>,
    store_statuses: Option<Spanned<Vec<Spanned<StatusEntry>>>>,
    mode: Option<Choice<Mode>>,
    canonical_json: Option<bool>,
    ignore_json_pointers: Option<Vec<Spanned<String>>>,
}

impl PolicyTable {
    /// Overrides the fields of `p` that this table sets.
    fn apply(self, p: &mut RoutePolicy, src: &Src<'_>) -> Result<(), ConfigError> {
        if let Some(list) = self.methods {
            p.methods = each(src, &list, "methods", parse_method)?;
        }
        if let Some(v) = self.key {
            p.key = v.0;
        }
        if let Some(v) = self.dedupe_window {
            p.dedupe_window = v.0;
        }
        if let Some(v) = self.concurrent {
            p.concurrent = v.0;
        }
        if let Some(v) = self.wait_timeout {
            p.wait_timeout = v.0;
        }
        if let Some(v) = self.lease {
            p.lease = v.0;
        }
        if let Some(v) = self.retention {
            p.retention = v.0;
        }
        if let Some(v) = self.fail {
            p.fail = v.0;
        }
        if let Some(v) = self.ambiguous {
            p.ambiguous = v.0;
        }
        if let Some(v) = self.max_body {
            p.max_body = v.0;
        }
        if let Some(v) = self.max_key_length {
            p.max_key_length = v.0;
        }
        if let Some(v) = self.upstream_timeout {
            p.upstream_timeout = v.0;
        }
        if let Some(list) = self.scope_headers {
            p.scope_headers = each(src, &list, "scope_headers", parse_header)?;
        }
        if let Some(list) = self.fingerprint_headers {
            p.fingerprint_headers = each(src, &list, "fingerprint_headers", parse_header)?;
        }
        if let Some(list) = self.store_statuses {
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
            p.store_statuses = set;
        }
        if let Some(v) = self.mode {
            p.mode = v.0;
        }
        if let Some(v) = self.canonical_json {
            p.canonical_json = v;
        }
        if let Some(list) = self.ignore_json_pointers {
            p.ignore_json_pointers = each(src, &list, "ignore_json_pointers", |s| {
                parse_json_pointer(s).map(str::to_owned)
            })?;
        }
        Ok(())
    }
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsTable {
    store_timeout: Option<NonZeroDuration>,
    request_read_timeout: Option<NonZeroDuration>,
    max_header_bytes: Option<Spanned<SizeValue>>,
    max_connections: Option<Spanned<u64>>,
    local_cache_bytes: Option<SizeValue>,
    memory_max_entries: Option<Spanned<u64>>,
    memory_max_bytes: Option<NonZeroSize>,
    shutdown_grace: Option<DurationValue>,
}

// ---------------------------------------------------------------------------
// Values that check themselves while being deserialized, so that toml
// attaches the value's position to the error.

/// Deserializes a string and parses it with `parse`.
fn from_str_with<'de, D: Deserializer<'de>, T>(
    d: D,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, D::Error> {
    let s = String::deserialize(d)?;
    parse(&s).map_err(de::Error::custom)
}

#[derive(Debug)]
struct AddrValue(SocketAddr);

impl<'de> Deserialize<'de> for AddrValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_str_with(d, parse_addr).map(Self)
    }
}

#[derive(Debug)]
struct UpstreamValue(Uri);

impl<'de> Deserialize<'de> for UpstreamValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_str_with(d, parse_upstream).map(Self)
    }
}

#[derive(Debug)]
struct StoreValue(StoreSpec);

impl<'de> Deserialize<'de> for StoreValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_str_with(d, |s| s.parse()).map(Self)
    }
}

#[derive(Debug)]
struct MatchValue(Route);

impl<'de> Deserialize<'de> for MatchValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_str_with(d, |s| {
            let route = Route::parse_match(s, Arc::default()).map_err(|e| e.to_string())?;
            if let Some(m) = &route.method {
                parse_method(m.as_str())?;
            }
            Ok(route)
        })
        .map(Self)
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

#[derive(Debug)]
struct DurationValue(Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"30s\" or \"1h30m\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Duration, E> {
                parse_duration(s).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Duration, E> {
                Err(E::custom(format!(
                    "`{n}` has no unit: write a string with a unit, e.g. \"{n}s\" \
                     (units: ms, s, m, h, d)"
                )))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Duration, E> {
                self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
            }
        }
        d.deserialize_any(V).map(Self)
    }
}

#[derive(Debug)]
struct NonZeroDuration(Duration);

impl<'de> Deserialize<'de> for NonZeroDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let DurationValue(v) = DurationValue::deserialize(d)?;
        if v.is_zero() {
            return Err(de::Error::custom("must be greater than 0s"));
        }
        Ok(Self(v))
    }
}

#[derive(Debug)]
struct SizeValue(u64);

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = u64;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"1MiB\" or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<u64, E> {
                parse_size(s).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<u64, E> {
                u64::try_from(n).map_err(|_| E::custom(format!("`{n}` is not a size")))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<u64, E> {
                Ok(n)
            }
        }
        d.deserialize_any(V).map(Self)
    }
}

#[derive(Debug)]
struct NonZeroSize(u64);

/// `max_key_length`: 1 to 255 (SPEC §3.2 caps keys at 255 characters).
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

impl<'de> Deserialize<'de> for NonZeroSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let SizeValue(v) = SizeValue::deserialize(d)?;
        if v == 0 {
            return Err(de::Error::custom("must be greater than 0"));
        }
        Ok(Self(v))
    }
}

/// One `store_statuses` entry: `"2xx"`, `"404"` or `404`. Checked later, so
/// that a bad entry in a multi-line list is blamed on its own line.
#[derive(Debug)]
enum StatusEntry {
    Text(String),
    Code(i64),
}

impl StatusEntry {
    fn add_to(&self, set: StatusSet) -> Result<StatusSet, String> {
        match self {
            StatusEntry::Text(s) => set.parse_entry(s).map_err(|e| e.to_string()),
            StatusEntry::Code(n @ 100..=999) => Ok(set.with(u16::try_from(*n).unwrap_or(0))),
            StatusEntry::Code(n) => Err(format!("`{n}` is not a status code (100–999)")),
        }
    }
}

impl<'de> Deserialize<'de> for StatusEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = StatusEntry;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a status code such as 404 or a class such as \"2xx\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<StatusEntry, E> {
                Ok(StatusEntry::Text(s.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<StatusEntry, E> {
                Ok(StatusEntry::Code(n))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<StatusEntry, E> {
                Ok(StatusEntry::Code(i64::try_from(n).unwrap_or(i64::MAX)))
            }
        }
        d.deserialize_any(V)
    }
}

/// The policy enums and their names in the file (also used by `describe`).
trait Named: Copy + PartialEq + fmt::Debug + 'static {
    const ALL: &'static [(&'static str, Self)];

    fn name(self) -> String {
        Self::ALL.iter().find(|(_, v)| *v == self).map_or_else(
            || format!("{self:?}").to_lowercase(),
            |(n, _)| (*n).to_owned(),
        )
    }
}

impl Named for KeyPolicy {
    const ALL: &'static [(&'static str, Self)] = &[
        ("required", KeyPolicy::Required),
        ("optional", KeyPolicy::Optional),
        ("derived", KeyPolicy::Derived),
    ];
}

impl Named for Concurrent {
    const ALL: &'static [(&'static str, Self)] =
        &[("reject", Concurrent::Reject), ("wait", Concurrent::Wait)];
}

impl Named for FailMode {
    const ALL: &'static [(&'static str, Self)] =
        &[("closed", FailMode::Closed), ("open", FailMode::Open)];
}

impl Named for Ambiguous {
    const ALL: &'static [(&'static str, Self)] = &[
        ("hold", Ambiguous::Hold),
        ("release", Ambiguous::Release),
        ("store", Ambiguous::Store),
    ];
}

impl Named for Mode {
    const ALL: &'static [(&'static str, Self)] = &[("sync", Mode::Sync), ("async", Mode::Async)];
}

#[derive(Debug)]
struct Choice<T>(T);

impl<'de, T: Named> Deserialize<'de> for Choice<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_str_with(d, |s| {
            T::ALL
                .iter()
                .find(|(name, _)| *name == s)
                .map(|(_, v)| Self(*v))
                .ok_or_else(|| {
                    let names: Vec<String> = T::ALL.iter().map(|(n, _)| format!("`{n}`")).collect();
                    format!("unknown value `{s}`, expected one of {}", names.join(", "))
                })
        })
    }
}

// ---------------------------------------------------------------------------
// Scalar parsers (shared by the file, the environment and the flags)

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("`{s}` is not an IP address and port, such as 127.0.0.1:8080 or [::1]:8080")
    })
}

fn parse_upstream(s: &str) -> Result<Uri, String> {
    let uri: Uri = s
        .parse()
        .map_err(|e| format!("`{s}` is not a URL ({e}); write e.g. http://127.0.0.1:3000"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(scheme) if scheme.eq_ignore_ascii_case("https") => {
            return Err("https upstreams are not supported yet; use http://host:port".to_owned())
        }
        Some(scheme) => {
            return Err(format!(
                "`{s}`: scheme `{scheme}` is not supported; write http://host:port"
            ))
        }
        None => {
            return Err(format!(
                "`{s}` is not an absolute URL; write http://host:port (e.g. http://{s})"
            ))
        }
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("`{s}` has no host; write http://host:port"));
    };
    if authority.as_str().contains('@') {
        return Err("credentials in the upstream URL are not supported".to_owned());
    }
    if authority.host().is_empty() {
        return Err(format!("`{s}` has no host; write http://host:port"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "`{s}`: the upstream must be only http://host:port, without a path or query \
             (each request's own path and query are forwarded unchanged)"
        ));
    }
    Ok(uri)
}

fn parse_method(s: &str) -> Result<Method, String> {
    const STANDARD: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    let upper = s.to_ascii_uppercase();
    if upper != s && STANDARD.contains(&upper.as_str()) {
        return Err(format!(
            "`{s}`: HTTP methods are case-sensitive; write `{upper}`"
        ));
    }
    Method::from_bytes(s.as_bytes()).map_err(|_| format!("`{s}` is not an HTTP method"))
}

fn parse_header(s: &str) -> Result<HeaderName, String> {
    // `from_bytes` lower-cases.
    HeaderName::from_bytes(s.as_bytes()).map_err(|_| format!("`{s}` is not a valid header name"))
}

/// An RFC 6901 JSON pointer: empty, or `/`-separated tokens where `~` is
/// only ever followed by `0` or `1`.
fn parse_json_pointer(s: &str) -> Result<&str, String> {
    let bad_escape = s
        .split('~')
        .skip(1)
        .any(|after| !(after.starts_with('0') || after.starts_with('1')));
    if !(s.is_empty() || s.starts_with('/')) || bad_escape {
        return Err(format!(
            "`{s}` is not a JSON pointer (RFC 6901): it must be empty or start with `/`, \
             and `~` may only be followed by 0 or 1 (e.g. \"/meta/request_id\")"
        ));
    }
    Ok(s)
}

impl std::str::FromStr for StoreSpec {
    type Err = String;

    /// `memory`, `redis://…`, `rediss://…`, `postgres://…` or `postgresql://…`.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "memory" {
            return Ok(StoreSpec::Memory);
        }
        let lower = s.to_ascii_lowercase();
        let scheme_len = |prefixes: &[&str]| {
            prefixes
                .iter()
                .find(|p| lower.starts_with(*p))
                .map(|p| p.len())
        };
        let (spec, len): (fn(String) -> StoreSpec, _) =
            if let Some(len) = scheme_len(&["redis://", "rediss://"]) {
                (StoreSpec::Redis, len)
            } else if let Some(len) = scheme_len(&["postgres://", "postgresql://"]) {
                (StoreSpec::Postgres, len)
            } else {
                return Err(format!(
                    "`{}` is not a store: use `memory`, `redis://host:port[/db]` \
                     (or rediss://) or `postgres://user@host:port/db` (or postgresql://)",
                    redact_url(s)
                ));
            };
        if s.len() == len {
            return Err(format!("`{s}` has no host"));
        }
        Ok(spec(s.to_owned()))
    }
}

/// The largest duration accepted: 100 years. Anything larger is a typo, and
/// `Instant + duration` would overflow.
const MAX_DURATION_MS: u64 = 36_500 * 86_400_000;

/// Parses a duration: a number and a unit (`ms`, `s`, `m`, `h`, `d`), or
/// several from the largest unit to the smallest (`1h30m`). No spaces, no
/// fractions, no bare numbers; `0s` is allowed; at most 100 years.
///
/// # Errors
///
/// A message that quotes `s` and says how to write it.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    const UNITS: [(&str, u64); 5] = [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ];
    let bad = |why: &str| format!("`{s}` is not a duration: {why}");
    let hint = "write a number and a unit (ms, s, m, h, d), e.g. 30s or 1h30m";
    if s.is_empty() {
        return Err(format!("empty duration: {hint}"));
    }
    if s.chars().any(char::is_whitespace) {
        return Err(bad(&format!("spaces are not allowed; {hint}")));
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "`{s}` has no unit: use a unit: {s}s (or ms, m, h, d)"
        ));
    }
    let too_large = || format!("`{s}` is too large (at most 36500d)");
    let mut rest = s;
    let mut total_ms: u64 = 0;
    let mut last: Option<usize> = None;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad(hint));
        }
        let (number, after) = rest.split_at(digits);
        let letters = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(letters);
        if unit.is_empty() {
            return Err(bad(if after.starts_with(['.', ',']) {
                "fractions are not supported; use a smaller unit, e.g. 1500ms or 1m30s"
            } else if after.is_empty() {
                "the last number has no unit"
            } else {
                hint
            }));
        }
        let Some(rank) = UNITS.iter().position(|(u, _)| *u == unit) else {
            return Err(bad(&format!(
                "unknown unit `{unit}` (units: ms, s, m, h, d)"
            )));
        };
        if last.is_some_and(|l| rank <= l) {
            return Err(bad(
                "units must go from the largest to the smallest, each at most once (e.g. 1h30m)",
            ));
        }
        last = Some(rank);
        let n: u64 = number.parse().map_err(|_| too_large())?;
        total_ms = n
            .checked_mul(UNITS[rank].1)
            .and_then(|ms| total_ms.checked_add(ms))
            .ok_or_else(too_large)?;
        rest = after;
    }
    if total_ms > MAX_DURATION_MS {
        return Err(too_large());
    }
    Ok(Duration::from_millis(total_ms))
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;

/// Byte units, binary first (used by [`fmt_size`] in this order).
const SIZE_UNITS: [(&str, u64); 9] = [
    ("TiB", TIB),
    ("GiB", GIB),
    ("MiB", MIB),
    ("KiB", KIB),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("kB", 1_000),
    ("B", 1),
];

/// Parses a size: a whole number and a unit, `B`, `kB`/`KB`, `MB`, `GB`,
/// `TB` (powers of 1000) or `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024).
/// Units are case-insensitive; no spaces, no fractions, no bare numbers (a
/// TOML integer, not a string, is taken as bytes).
///
/// # Errors
///
/// A message that quotes `s` and says how to write it.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = |why: &str| format!("`{s}` is not a size: {why}");
    let hint = "write a number and a unit, e.g. 512KiB, 1MiB or 10MB";
    if s.is_empty() {
        return Err(format!("empty size: {hint}"));
    }
    if s.chars().any(char::is_whitespace) {
        return Err(bad(&format!("spaces are not allowed; {hint}")));
    }
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = s.split_at(digits);
    if digits == 0 {
        return Err(bad(hint));
    }
    if unit.is_empty() {
        return Err(format!(
            "`{s}` has no unit: use a unit: {s}B (or KiB, MiB, GiB, kB, MB, GB)"
        ));
    }
    if unit.starts_with(['.', ',']) {
        return Err(bad(
            "fractions are not supported; use a smaller unit, e.g. 1536KiB",
        ));
    }
    let Some((_, scale)) = SIZE_UNITS
        .iter()
        .find(|(u, _)| u.eq_ignore_ascii_case(unit))
    else {
        return Err(bad(&format!(
            "unknown unit `{unit}` (units: B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )));
    };
    let too_large = || format!("`{s}` is too large");
    number
        .parse::<u64>()
        .map_err(|_| too_large())?
        .checked_mul(*scale)
        .ok_or_else(too_large)
}

// ---------------------------------------------------------------------------
// Source positions

/// The file being read: its name for messages and its text for line numbers.
struct Src<'a> {
    name: &'a str,
    text: &'a str,
}

impl Src<'_> {
    fn parse(&self) -> Result<FileConfig, ConfigError> {
        toml::from_str(self.text).map_err(|e| self.toml_error(&e))
    }

    /// 1-based line of a byte offset.
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn at(&self, span: &Range<usize>, reason: impl Into<String>) -> ConfigError {
        ConfigError::File {
            file: self.name.to_owned(),
            line: Some(self.line(span.start)),
            reason: reason.into(),
        }
    }

    /// toml's error, on one line, prefixed by the key whose value is at fault
    /// and followed by a suggestion for a misspelt key.
    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let mut reason = e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(": ")
            .replace("unknown variant", "unknown value");
        if let Some(suggestion) = did_you_mean(&reason) {
            reason = format!("{reason} (did you mean `{suggestion}`?)");
        }
        let Some(span) = e.span() else {
            return ConfigError::File {
                file: self.name.to_owned(),
                line: None,
                reason,
            };
        };
        if let Some(key) = self.key_before(span.start) {
            reason = format!("{key}: {reason}");
        }
        // `[route]` where `[[route]]` was meant.
        let header = self.text.get(span.start..).and_then(|t| t.lines().next());
        if let Some(name) = header
            .and_then(|h| h.trim().strip_prefix('['))
            .filter(|h| !h.starts_with('['))
            .and_then(|h| h.split_once(']'))
            .map(|(name, _)| name.trim())
        {
            if reason.contains("expected a sequence") {
                reason = format!(
                    "[{name}] must be written [[{name}]], with double brackets: \
                     it is a list (one [[{name}]] per entry)"
                );
            }
        }
        self.at(&span, reason)
    }

    /// The key of the `key = value` whose value starts at `offset`, if any.
    fn key_before(&self, offset: usize) -> Option<&str> {
        let before = self.text.get(..offset)?;
        let before = before.trim_end_matches([' ', '\t']).strip_suffix('=')?;
        let before = before.trim_end_matches([' ', '\t']);
        let is_key = |c: char| c.is_ascii_alphanumeric() || "_-.\"'".contains(c);
        let start = before
            .char_indices()
            .rev()
            .take_while(|(_, c)| is_key(*c))
            .last()?
            .0;
        Some(before[start..].trim_matches(['"', '\'']))
    }
}

/// For "unknown field `x`, expected one of `a`, `b`": the closest expected
/// name, if it is close enough to be a typo.
fn did_you_mean(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    let (unknown, rest) = rest.split_once('`')?;
    let (_, expected) = rest.split_once("expected")?;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|c| (edit_distance(unknown, c), c))
        .filter(|(d, c)| *d <= 2 && *d * 3 <= c.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let subst = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = subst.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

// ---------------------------------------------------------------------------
// Display

/// `url` with any password (in the user info or a `password=` query
/// parameter) replaced by `***`.
fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let start = scheme_end + 3;
    let mut out = url[..start].to_owned();
    let mut rest = &url[start..];
    // The last `@` ends the user info: a password may itself contain `/`.
    if let Some(at) = rest.rfind('@') {
        let userinfo = &rest[..at];
        match userinfo.split_once(':') {
            Some((user, _)) => {
                out.push_str(user);
                out.push_str(":***");
            }
            None => out.push_str(userinfo),
        }
        rest = &rest[at..];
    }
    let Some((head, query)) = rest.split_once('?') else {
        out.push_str(rest);
        return out;
    };
    out.push_str(head);
    out.push('?');
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((k, _))
                if ["password", "pass", "passwd", "pwd"]
                    .iter()
                    .any(|p| k.eq_ignore_ascii_case(p)) =>
            {
                format!("{k}=***")
            }
            _ => param.to_owned(),
        })
        .collect();
    out.push_str(&params.join("&"));
    out
}

impl fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreSpec::Memory => f.write_str("memory"),
            StoreSpec::Redis(url) | StoreSpec::Postgres(url) => f.write_str(&redact_url(url)),
        }
    }
}

impl fmt::Debug for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreSpec::Memory => f.write_str("Memory"),
            StoreSpec::Redis(url) => f.debug_tuple("Redis").field(&redact_url(url)).finish(),
            StoreSpec::Postgres(url) => f.debug_tuple("Postgres").field(&redact_url(url)).finish(),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("upstream", &self.upstream)
            .field("store", &self.store)
            .field("admin_listen", &self.admin_listen)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "***"))
            .field("routes", &self.routes)
            .field("limits", &self.limits)
            .field("source", &self.source)
            .finish()
    }
}

/// `30s`, `1h30m`, `24h`, `500ms`: the inverse of [`parse_duration`].
fn fmt_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_owned();
    }
    if d < Duration::from_millis(1) {
        return format!("{d:?}");
    }
    let mut ms = d.as_millis();
    let mut out = String::new();
    for (unit, scale) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ] {
        if ms >= scale {
            out.push_str(&format!("{}{unit}", ms / scale));
            ms %= scale;
        }
    }
    out
}

/// `1MiB`, `10MB`, `1500B`: the largest unit that divides exactly.
fn fmt_size(n: u64) -> String {
    if n == 0 {
        return "0B".to_owned();
    }
    SIZE_UNITS
        .iter()
        .find(|(_, scale)| n / scale * scale == n)
        .map_or_else(
            || format!("{n}B"),
            |(unit, scale)| format!("{}{unit}", n / scale),
        )
}

/// `2xx, 400, 404`: whole classes as `Nxx`, the rest one by one.
fn fmt_statuses(set: &StatusSet) -> String {
    let mut parts = Vec::new();
    for class in 1u16..=9 {
        let codes: Vec<u16> = (class * 100..class * 100 + 100)
            .filter(|s| set.contains(*s))
            .collect();
        if codes.len() == 100 {
            parts.push(format!("{class}xx"));
        } else {
            parts.extend(codes.iter().map(u16::to_string));
        }
    }
    parts.join(", ")
}

fn fmt_list<T>(items: &[T], f: impl Fn(&T) -> String) -> String {
    if items.is_empty() {
        "(none)".to_owned()
    } else {
        items.iter().map(f).collect::<Vec<_>>().join(", ")
    }
}

fn describe_policy(out: &mut Vec<String>, p: &RoutePolicy, named_method: Option<&Method>) {
    let methods = match named_method {
        Some(m) => format!("{m} (named by match)"),
        None if p.methods.is_empty() => {
            "(none: matching requests pass through untouched)".to_owned()
        }
        None => fmt_list(&p.methods, Method::to_string),
    };
    let rows = [
        ("methods", methods),
        ("key", p.key.name()),
        ("dedupe_window", fmt_duration(p.dedupe_window)),
        ("concurrent", p.concurrent.name()),
        ("wait_timeout", fmt_duration(p.wait_timeout)),
        ("lease", fmt_duration(p.lease)),
        ("retention", fmt_duration(p.retention)),
        ("fail", p.fail.name()),
        ("ambiguous", p.ambiguous.name()),
        ("max_body", fmt_size(p.max_body)),
        ("max_key_length", p.max_key_length.to_string()),
        ("upstream_timeout", fmt_duration(p.upstream_timeout)),
        (
            "scope_headers",
            fmt_list(&p.scope_headers, |h| h.to_string()),
        ),
        (
            "fingerprint_headers",
            fmt_list(&p.fingerprint_headers, |h| h.to_string()),
        ),
        ("store_statuses", fmt_statuses(&p.store_statuses)),
        ("mode", p.mode.name()),
        ("canonical_json", p.canonical_json.to_string()),
        (
            "ignore_json_pointers",
            fmt_list(&p.ignore_json_pointers, |s| format!("{s:?}")),
        ),
    ];
    out.extend(rows.iter().map(|(k, v)| format!("  {k:<22}{v}")));
}

impl Config {
    /// Human-readable summary printed by `idem serve --check`: listen,
    /// upstream, store (any password in the URL shown as `***`), admin (whether
    /// a token is set, never the token), limits, the defaults policy and each
    /// route in order with every effective value.
    #[must_use]
    pub fn describe(&self) -> String {
        let mut out = Vec::new();
        out.push(format!(
            "config file:   {}",
            self.source
                .as_ref()
                .map_or_else(|| "(none)".to_owned(), |p| p.display().to_string())
        ));
        out.push(format!("listen:        {}", self.listen));
        out.push(format!("upstream:      {}", self.upstream));
        out.push(match &self.store {
            StoreSpec::Memory => {
                "store:         memory (this process only; records are lost on restart)".to_owned()
            }
            other => format!("store:         {other}"),
        });
        let token = if self.admin_token.is_some() {
            "yes"
        } else {
            "no"
        };
        out.push(match self.admin_listen {
            Some(addr) => format!("admin:         {addr} (token set: {token})"),
            None => format!("admin:         off (token set: {token})"),
        });
        let l = &self.limits;
        out.push("limits:".to_owned());
        let cache = if l.local_cache_bytes == 0 {
            "0B (disabled)".to_owned()
        } else {
            fmt_size(l.local_cache_bytes)
        };
        let rows = [
            ("store_timeout", fmt_duration(l.store_timeout)),
            ("request_read_timeout", fmt_duration(l.request_read_timeout)),
            (
                "max_header_bytes",
                fmt_size(u64::try_from(l.max_header_bytes).unwrap_or(u64::MAX)),
            ),
            ("max_connections", l.max_connections.to_string()),
            ("local_cache_bytes", cache),
            ("memory_max_entries", l.memory_max_entries.to_string()),
            ("memory_max_bytes", fmt_size(l.memory_max_bytes)),
            ("shutdown_grace", fmt_duration(l.shutdown_grace)),
        ];
        out.extend(rows.iter().map(|(k, v)| format!("  {k:<22}{v}")));
        out.push("defaults (requests that match no route):".to_owned());
        describe_policy(&mut out, self.routes.default_policy(), None);
        for (i, route) in self.routes.routes().iter().enumerate() {
            let matcher = match &route.method {
                Some(m) => format!("{m} {}", route.path.as_str()),
                None => format!("{} (any method)", route.path.as_str()),
            };
            out.push(format!("route {}: {matcher}", i + 1));
            describe_policy(&mut out, &route.policy, route.method.as_ref());
        }
        let mut text = out.join("\n");
        text.push('\n');
        text
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The example file of SPEC §12, verbatim.
    const SPEC_EXAMPLE: &str = r#"listen = "127.0.0.1:8080"
upstream = "http://127.0.0.1:3000"
store = "memory"
admin_listen = "127.0.0.1:9090"   # optional; admin_token from IDEM_ADMIN_TOKEN

[defaults]                        # every [[route]] inherits these
methods = ["POST", "PATCH"]
key = "required"                  # required | optional | derived
dedupe_window = "10s"             # retention of derived keys
concurrent = "reject"             # reject | wait
wait_timeout = "10s"
lease = "30s"
retention = "24h"
fail = "closed"                   # closed | open
ambiguous = "hold"                # hold | release | store
max_body = "1MiB"
upstream_timeout = "30s"
scope_headers = ["authorization"]
fingerprint_headers = ["content-type"]
store_statuses = ["2xx", 400, 404, 405, 410, 413, 415, 422]
mode = "sync"                     # sync | async

[[route]]                         # first match wins; unmatched requests use [defaults]
match = "POST /payments/*"
concurrent = "wait"
"#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// Only `IDEM_ADMIN_TOKEN`, which an admin listener requires.
    fn token_env(name: &str) -> Option<String> {
        (name == "IDEM_ADMIN_TOKEN").then(|| "test-admin-token".to_owned())
    }

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    fn load_ok(src: &str) -> Config {
        load_str("idem.toml", src, &token_env, &Overrides::default())
            .unwrap_or_else(|e| panic!("should load: {e}"))
    }

    /// Loads `src` (with an upstream prepended unless it sets one) and
    /// returns the error message.
    fn load_err(src: &str) -> String {
        let src = if src.contains("upstream =") {
            src.to_owned()
        } else {
            format!("upstream = \"http://127.0.0.1:3000\"\n{src}")
        };
        match load_str("idem.toml", &src, &no_env, &Overrides::default()) {
            Ok(c) => panic!("should be refused:\n{src}\ngot {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn assert_err(src: &str, line: usize, needles: &[&str]) {
        let msg = load_err(src);
        let prefix = format!("idem.toml:{line}: ");
        assert!(
            msg.starts_with(&prefix),
            "expected `{prefix}…`, got `{msg}`"
        );
        for n in needles {
            assert!(msg.contains(n), "`{msg}` should mention `{n}`");
        }
    }

    #[test]
    fn spec_example_loads_with_expected_values() {
        let c = load_ok(SPEC_EXAMPLE);
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.upstream, "http://127.0.0.1:3000".parse::<Uri>().unwrap());
        assert_eq!(c.store, StoreSpec::Memory);
        assert_eq!(c.admin_listen, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(c.admin_token.as_deref(), Some("test-admin-token"));
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.source, Some(PathBuf::from("idem.toml")));
        // The example spells out the built-in defaults.
        assert_eq!(**c.routes.default_policy(), RoutePolicy::default());

        let routes = c.routes.routes();
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].method, Some(Method::POST));
        assert_eq!(routes[0].path.as_str(), "/payments/*");
        let mut expected = RoutePolicy::default();
        expected.concurrent = Concurrent::Wait;
        assert_eq!(*routes[0].policy, expected);
        let p = c
            .routes
            .classify(&Method::POST, "/payments/7")
            .expect("participates");
        assert_eq!(p.concurrent, Concurrent::Wait);
    }

    #[test]
    fn routes_inherit_defaults_from_the_file() {
        let c = load_ok(
            r#"upstream = "http://127.0.0.1:3000"
[defaults]
lease = "5s"
scope_headers = ["X-Tenant", "x-tenant", "Authorization"]
store_statuses = ["2xx", "5xx", 409]
max_body = 2048
ignore_json_pointers = ["", "/meta/request_id", "/a~1b/~0c"]
canonical_json = true

[[route]]
match = "/payments/**"
retention = "1h30m"
methods = []

[[route]]
match = "PUT /things/*"
key = "derived"
fail = "open"
ambiguous = "store"
mode = "async"
max_body = "10kB"
"#,
        );
        let d = c.routes.default_policy();
        assert_eq!(d.lease, Duration::from_secs(5));
        assert_eq!(d.retention, Duration::from_secs(86_400));
        assert_eq!(
            d.scope_headers,
            vec![
                HeaderName::from_static("x-tenant"),
                HeaderName::from_static("authorization")
            ]
        );
        assert!(d.store_statuses.contains(201) && d.store_statuses.contains(503));
        assert!(d.store_statuses.contains(409) && !d.store_statuses.contains(404));
        assert_eq!(d.max_body, 2048);
        assert!(d.canonical_json);
        assert_eq!(d.ignore_json_pointers.len(), 3);

        let [r1, r2] = c.routes.routes() else {
            panic!("two routes expected");
        };
        assert_eq!(r1.method, None);
        assert_eq!(r1.policy.lease, Duration::from_secs(5), "inherited");
        assert_eq!(r1.policy.retention, Duration::from_secs(5400));
        assert!(r1.policy.methods.is_empty());
        assert_eq!(r1.policy.scope_headers, d.scope_headers);
        assert!(c.routes.classify(&Method::POST, "/payments/1").is_none());

        assert_eq!(r2.policy.lease, Duration::from_secs(5), "inherited");
        assert_eq!(r2.policy.key, KeyPolicy::Derived);
        assert_eq!(r2.policy.fail, FailMode::Open);
        assert_eq!(r2.policy.ambiguous, Ambiguous::Store);
        assert_eq!(r2.policy.mode, Mode::Async);
        assert_eq!(r2.policy.max_body, 10_000);
        assert!(r2.policy.canonical_json, "inherited");
    }

    #[test]
    fn limits_table() {
        let c = load_ok(
            r#"upstream = "http://127.0.0.1:3000"
[limits]
store_timeout = "500ms"
request_read_timeout = "5s"
max_header_bytes = "16KiB"
max_connections = 100
local_cache_bytes = 0
memory_max_entries = 10
memory_max_bytes = "1GiB"
shutdown_grace = "0s"
"#,
        );
        assert_eq!(
            c.limits,
            Limits {
                store_timeout: Duration::from_millis(500),
                request_read_timeout: Duration::from_secs(5),
                max_header_bytes: 16 * 1024,
                max_connections: 100,
                local_cache_bytes: 0,
                memory_max_entries: 10,
                memory_max_bytes: GIB,
                shutdown_grace: Duration::ZERO,
            }
        );
        assert_err("[limits]\nmax_connections = 0\n", 3, &["max_connections"]);
        assert_err("[limits]\nmax_header_bytes = \"1KiB\"\n", 3, &["8KiB"]);
        assert_err(
            "[limits]\nstore_timeout = \"0s\"\n",
            3,
            &["store_timeout", "0s"],
        );
    }

    #[test]
    fn no_file_uses_built_in_defaults() {
        let flags = Overrides {
            upstream: Some("http://10.0.0.1:80".to_owned()),
            ..Overrides::default()
        };
        let c = load(None, &no_env, &flags).expect("valid");
        assert_eq!(c.listen, DEFAULT_LISTEN);
        assert_eq!(c.store, StoreSpec::Memory);
        assert_eq!(c.admin_listen, None);
        assert_eq!(c.source, None);
        assert_eq!(**c.routes.default_policy(), RoutePolicy::default());
        assert!(c.routes.routes().is_empty());
    }

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

    #[test]
    fn bad_top_level_values() {
        assert_err(
            "listen = \"localhost:8080\"\n",
            2,
            &["listen", "`localhost:8080`"],
        );
        assert_err(
            "store = \"mysql://u:hunter2@db/x\"\n",
            2,
            &["memory", "redis://", "postgres://"],
        );
        assert!(!load_err("store = \"mysql://u:hunter2@db/x\"\n").contains("hunter2"));
        assert_err("store = \"redis://\"\n", 2, &["no host"]);
        assert_err(
            "upstream = \"https://api.example\"\n",
            1,
            &["https upstreams are not supported yet"],
        );
        assert_err("upstream = \"http://127.0.0.1:3000/api\"\n", 1, &["path"]);
        assert_err("upstream = \"http://127.0.0.1:3000/?a=1\"\n", 1, &["query"]);
        assert_err(
            "upstream = \"127.0.0.1:3000\"\n",
            1,
            &["http://127.0.0.1:3000"],
        );
        assert_err("upstream = \"ftp://x\"\n", 1, &["`ftp`"]);
        assert_err("upstream = \"http://u:p@x\"\n", 1, &["credentials"]);
        assert_err(
            "admin_token = \"s3cret\"\n",
            2,
            &["admin_token", "IDEM_ADMIN_TOKEN"],
        );
        assert!(!load_err("admin_token = \"s3cret\"\n").contains("s3cret"));
        assert_err("listen = 8080\n", 2, &["listen", "string"]);
        assert_err(
            "listen = \"127.0.0.1:1\"\nlisten = \"127.0.0.1:2\"\n",
            3,
            &["duplicate key"],
        );
        assert_err("listen = \n", 2, &["listen"]);
        assert_err(
            "listen = \"127.0.0.1:9000\"\nadmin_listen = \"127.0.0.1:9000\"\n",
            3,
            &["admin_listen", "own port"],
        );
        assert_err("listen = \"127.0.0.1:3000\"\n", 1, &["loop"]);
    }

    #[test]
    fn upstream_path_slash_is_fine() {
        let c = load_ok("upstream = \"http://backend:3000/\"\n");
        assert_eq!(c.upstream.host(), Some("backend"));
    }

    #[test]
    fn missing_upstream_says_how_to_give_one() {
        let e = load_str(
            "idem.toml",
            "listen = \"127.0.0.1:1\"\n",
            &no_env,
            &Overrides::default(),
        )
        .expect_err("no upstream");
        let msg = e.to_string();
        for n in ["--upstream", "IDEM_UPSTREAM", "upstream ="] {
            assert!(msg.contains(n), "`{msg}` should mention {n}");
        }
        assert!(matches!(e, ConfigError::MissingUpstream));
    }

    #[test]
    fn flags_beat_env_beats_file() {
        let file = r#"listen = "127.0.0.1:1001"
upstream = "http://127.0.0.1:2001"
store = "memory"
admin_listen = "127.0.0.1:3001"
"#;
        let env = env_of(&[
            ("IDEM_LISTEN", "127.0.0.1:1002"),
            ("IDEM_UPSTREAM", " http://127.0.0.1:2002 "),
            ("IDEM_STORE", "redis://127.0.0.1:6379/0"),
            ("IDEM_ADMIN_LISTEN", ""),
            ("IDEM_ADMIN_TOKEN", "t0ken"),
        ]);
        let c = load_str("idem.toml", file, &env, &Overrides::default()).expect("valid");
        assert_eq!(c.listen, "127.0.0.1:1002".parse().unwrap());
        assert_eq!(c.upstream, "http://127.0.0.1:2002".parse::<Uri>().unwrap());
        assert_eq!(
            c.store,
            StoreSpec::Redis("redis://127.0.0.1:6379/0".to_owned())
        );
        assert_eq!(
            c.admin_listen,
            Some("127.0.0.1:3001".parse().unwrap()),
            "empty env ignored"
        );
        assert_eq!(c.admin_token.as_deref(), Some("t0ken"));

        let flags = Overrides {
            listen: Some("127.0.0.1:1003".to_owned()),
            upstream: Some("http://127.0.0.1:2003".to_owned()),
            store: Some("postgresql://idem@db:5432/idem".to_owned()),
            admin_listen: Some("127.0.0.1:3003".to_owned()),
        };
        let c = load_str("idem.toml", file, &env, &flags).expect("valid");
        assert_eq!(c.listen, "127.0.0.1:1003".parse().unwrap());
        assert_eq!(c.upstream, "http://127.0.0.1:2003".parse::<Uri>().unwrap());
        assert_eq!(
            c.store,
            StoreSpec::Postgres("postgresql://idem@db:5432/idem".to_owned())
        );
        assert_eq!(c.admin_listen, Some("127.0.0.1:3003".parse().unwrap()));

        let c = load_str("idem.toml", file, &token_env, &Overrides::default()).expect("valid");
        assert_eq!(c.listen, "127.0.0.1:1001".parse().unwrap());
        assert_eq!(c.upstream, "http://127.0.0.1:2001".parse::<Uri>().unwrap());
    }

    #[test]
    fn bad_env_and_flags_are_named() {
        let file = "upstream = \"http://127.0.0.1:3000\"\n";
        let env = env_of(&[("IDEM_LISTEN", "nope")]);
        let e = load_str("idem.toml", file, &env, &Overrides::default()).expect_err("bad env");
        assert!(
            e.to_string()
                .starts_with("environment variable IDEM_LISTEN: "),
            "{e}"
        );
        let env = env_of(&[("IDEM_STORE", "sqlite://x")]);
        let e = load_str("idem.toml", file, &env, &Overrides::default()).expect_err("bad env");
        assert!(
            e.to_string()
                .starts_with("environment variable IDEM_STORE: "),
            "{e}"
        );
        let env = env_of(&[("IDEM_ADMIN_TOKEN", "two words")]);
        let e = load_str("idem.toml", file, &env, &Overrides::default()).expect_err("bad token");
        assert!(
            e.to_string()
                .starts_with("environment variable IDEM_ADMIN_TOKEN: "),
            "{e}"
        );
        assert!(!e.to_string().contains("two words"));

        let flags = Overrides {
            upstream: Some("https://x".to_owned()),
            ..Overrides::default()
        };
        let e = load_str("idem.toml", file, &no_env, &flags).expect_err("bad flag");
        assert_eq!(
            e.to_string(),
            "--upstream: https upstreams are not supported yet; use http://host:port"
        );
        let flags = Overrides {
            admin_listen: Some("127.0.0.1:8080".to_owned()),
            ..Overrides::default()
        };
        let e = load_str("idem.toml", file, &no_env, &flags).expect_err("same port");
        assert!(e.to_string().starts_with("--admin-listen: "), "{e}");
        // A flag fixes a bad environment value: the flag wins and the variable is not read.
        let env = env_of(&[("IDEM_LISTEN", "nope")]);
        let flags = Overrides {
            listen: Some("127.0.0.1:0".to_owned()),
            ..Overrides::default()
        };
        assert!(load_str("idem.toml", file, &env, &flags).is_ok());
    }

    #[test]
    fn load_reads_files_and_names_missing_ones() {
        let dir = std::env::temp_dir().join(format!("idem-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("idem.toml");
        std::fs::write(
            &path,
            "upstream = \"http://127.0.0.1:3000\"\n[defaults]\nlease = \"1x\"\n",
        )
        .unwrap();
        let e = load(Some(&path), &no_env, &Overrides::default()).expect_err("bad unit");
        assert!(
            e.to_string()
                .starts_with(&format!("{}:3: lease: ", path.display())),
            "{e}"
        );
        std::fs::write(&path, "upstream = \"http://127.0.0.1:3000\"\n").unwrap();
        let c = load(Some(&path), &no_env, &Overrides::default()).expect("valid");
        assert_eq!(c.source.as_deref(), Some(path.as_path()));

        let missing = dir.join("nope.toml");
        let e = load(Some(&missing), &no_env, &Overrides::default()).expect_err("missing");
        assert!(matches!(e, ConfigError::Read { .. }));
        assert!(
            e.to_string()
                .starts_with(&format!("{}: ", missing.display())),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn durations() {
        let ok = [
            ("0s", 0),
            ("500ms", 500),
            ("30s", 30_000),
            ("10m", 600_000),
            ("24h", 86_400_000),
            ("7d", 604_800_000),
            ("1h30m", 5_400_000),
            ("1d2h3m4s5ms", 93_784_005),
            ("36500d", MAX_DURATION_MS),
        ];
        for (s, ms) in ok {
            assert_eq!(parse_duration(s), Ok(Duration::from_millis(ms)), "{s}");
            assert_eq!(
                parse_duration(&fmt_duration(Duration::from_millis(ms))),
                Ok(Duration::from_millis(ms))
            );
        }
        let bad = [
            ("", "empty"),
            ("30", "use a unit: 30s"),
            ("0", "use a unit"),
            ("10 seconds", "spaces"),
            (" 1s", "spaces"),
            ("1h 30m", "spaces"),
            ("10seconds", "unknown unit `seconds`"),
            ("1.5s", "fractions"),
            ("-1s", "not a duration"),
            ("1h30", "no unit"),
            ("30m1h", "largest to the smallest"),
            ("1s1s", "largest to the smallest"),
            ("1S", "unknown unit"),
            ("s", "not a duration"),
            ("36501d", "too large"),
            ("99999999999999999999s", "too large"),
            ("18446744073709551615d", "too large"),
            ("1d18446744073709551615ms", "too large"),
        ];
        for (s, needle) in bad {
            let e = parse_duration(s).expect_err(s);
            assert!(e.contains(needle), "{s:?}: `{e}` should contain `{needle}`");
        }
    }

    #[test]
    fn sizes() {
        let ok = [
            ("100B", 100),
            ("0B", 0),
            ("10kB", 10_000),
            ("10KB", 10_000),
            ("10MB", 10_000_000),
            ("2GB", 2_000_000_000),
            ("512KiB", 512 * 1024),
            ("1MiB", 1024 * 1024),
            ("1mib", 1024 * 1024),
            ("1GiB", 1 << 30),
            ("1TiB", 1 << 40),
        ];
        for (s, n) in ok {
            assert_eq!(parse_size(s), Ok(n), "{s}");
            assert_eq!(parse_size(&fmt_size(n)), Ok(n));
        }
        let bad = [
            ("", "empty"),
            ("1024", "use a unit: 1024B"),
            ("1 MiB", "spaces"),
            ("1.5MiB", "fractions"),
            ("MiB", "not a size"),
            ("-1B", "not a size"),
            ("1XB", "unknown unit"),
            ("17179869184GiB", "too large"),
            ("99999999999999999999B", "too large"),
        ];
        for (s, needle) in bad {
            let e = parse_size(s).expect_err(s);
            assert!(e.contains(needle), "{s:?}: `{e}` should contain `{needle}`");
        }
    }

    #[test]
    fn store_specs() {
        assert_eq!("memory".parse(), Ok(StoreSpec::Memory));
        for url in ["redis://h:6379", "rediss://h:6380/1", "REDIS://h"] {
            assert_eq!(url.parse(), Ok(StoreSpec::Redis(url.to_owned())));
        }
        for url in ["postgres://u@h:5432/d", "postgresql://u:p@h/d"] {
            assert_eq!(url.parse(), Ok(StoreSpec::Postgres(url.to_owned())));
        }
        for bad in ["", "Memory", "mem", "redis:/h", "http://h"] {
            let e = bad.parse::<StoreSpec>().expect_err(bad);
            assert!(e.contains("memory") && e.contains("postgres://"), "{e}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        let cases = [
            ("redis://:hunter2@h:6379/0", "redis://:***@h:6379/0"),
            (
                "postgres://idem:hunter2@db:5432/idem",
                "postgres://idem:***@db:5432/idem",
            ),
            (
                "postgres://idem:hu/nt@er2@db/idem",
                "postgres://idem:***@db/idem",
            ),
            (
                "postgres://idem@db/idem?password=hunter2&sslmode=require",
                "postgres://idem@db/idem?password=***&sslmode=require",
            ),
            ("redis://h:6379", "redis://h:6379"),
        ];
        for (url, shown) in cases {
            assert_eq!(redact_url(url), shown);
            let spec: StoreSpec = url.parse().unwrap();
            assert_eq!(spec.to_string(), shown);
            assert!(!format!("{spec:?}").contains("hunter2"));
        }
    }

    #[test]
    fn describe_hides_secrets_and_shows_every_value() {
        let env = env_of(&[
            ("IDEM_ADMIN_TOKEN", "sup3r-s3cret-t0ken"),
            ("IDEM_STORE", "postgres://idem:hunter2@db:5432/idem"),
        ]);
        let c = load_str("idem.toml", SPEC_EXAMPLE, &env, &Overrides::default()).expect("valid");
        let text = c.describe();
        let debug = format!("{c:?}");
        for shown in [&text, &debug] {
            assert!(!shown.contains("sup3r-s3cret-t0ken"), "{shown}");
            assert!(!shown.contains("hunter2"), "{shown}");
        }
        for needle in [
            "127.0.0.1:8080",
            "http://127.0.0.1:3000",
            "postgres://idem:***@db:5432/idem",
            "127.0.0.1:9090 (token set: yes)",
            "store_timeout",
            "shutdown_grace",
            "route 1: POST /payments/*",
            "2xx, 400, 404, 405, 410, 413, 415, 422",
            "1MiB",
            "1d",
            "wait",
            "content-type",
        ] {
            assert!(
                text.contains(needle),
                "describe() lacks `{needle}`:\n{text}"
            );
        }
        let c = load_str(
            "idem.toml",
            "upstream = \"http://127.0.0.1:3000\"\n",
            &no_env,
            &Overrides::default(),
        )
        .expect("valid");
        assert!(c.describe().contains("off (token set: no)"));
    }
}
