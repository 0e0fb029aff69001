//! [`AnyStore`]: one type over every backend compiled in, chosen at run
//! time by a store URL ([`StoreUrl`], protocol §12).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use super::{
    Attempts, Claimed, ConfigError, Enqueued, Fence, Operation, OperationId, OperationRequest,
    Queue, QueueStats, Reservation, Store, StoreError, Subscription,
};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::record::{CompletedRecord, Record, Token};

/// Any store this build supports, chosen by URL with
/// [`AnyStore::connect`]. Implements [`Store`] and async mode's [`Queue`]
/// by delegation.
///
/// ```
/// use std::time::Duration;
/// use idem::store::{AnyStore, ConnectOptions};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), idem::StoreError> {
/// let options = ConnectOptions::new().timeout(Duration::from_millis(500));
/// let store = AnyStore::connect("memory", options).await?;
/// assert_eq!(store.kind(), "memory");
/// // `redis://127.0.0.1:6379`, `redis://a:7000,b:7001,c:7002` (a Cluster)
/// // or `postgres://idem@db/idem` when those features are on.
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AnyStore {
    /// The in-process store.
    #[cfg(feature = "memory")]
    Memory(super::memory::MemoryStore),
    /// Redis or Redis Cluster.
    #[cfg(feature = "redis")]
    Redis(super::redis::RedisStore),
    /// PostgreSQL.
    #[cfg(feature = "postgres")]
    Postgres(super::postgres::PostgresStore),
}

impl AnyStore {
    /// Opens the store `url` names (see [`StoreUrl`]): a memory
    /// store with `options`' limits, or a connection to Redis, a Redis
    /// Cluster or PostgreSQL, which must answer now.
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] when `url` names no store, or a backend this
    /// build leaves out (its feature is off), or the backend refuses its
    /// settings; otherwise the backend's own errors when it cannot be
    /// reached ([`StoreError::Unavailable`], [`StoreError::Timeout`]).
    pub async fn connect(url: &str, options: ConnectOptions) -> Result<Self, StoreError> {
        Self::connect_to(&url.parse()?, options).await
    }

    /// [`connect`](Self::connect) to a URL already parsed (and checked).
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect).
    pub async fn connect_to(url: &StoreUrl, options: ConnectOptions) -> Result<Self, StoreError> {
        match &url.target {
            #[cfg(feature = "memory")]
            Target::Memory => Ok(Self::Memory(super::memory::MemoryStore::with_limits(
                options.memory_limits,
            ))),
            #[cfg(feature = "redis")]
            Target::Redis => {
                let builder = redis_builder(&options);
                Ok(Self::Redis(builder.connect(&url.url).await?))
            }
            #[cfg(feature = "redis")]
            Target::RedisCluster(nodes) => {
                let builder = redis_builder(&options);
                Ok(Self::Redis(builder.connect_cluster(nodes).await?))
            }
            #[cfg(feature = "postgres")]
            Target::Postgres => {
                let mut builder = super::postgres::PostgresStore::builder(url.url.as_str());
                if let Some(timeout) = options.timeout {
                    builder = builder.timeout(timeout);
                }
                #[cfg(feature = "tls")]
                if let Some(pem) = &options.tls_ca {
                    builder = builder.tls_ca(pem.clone());
                }
                Ok(Self::Postgres(builder.connect().await?))
            }
            #[allow(
                unreachable_patterns,
                reason = "reachable when a backend is compiled out"
            )]
            _ => Err(StoreError::Config(ConfigError::NotCompiledIn {
                url: url.to_string(),
                backend: url.kind(),
            })),
        }
    }

    /// Gives the calling thread connections of its own to the store, used
    /// by the calls made on this thread while the returned pins live: for
    /// a thread that runs one current-thread runtime for its whole life
    /// (the gateway's listener threads), one of `threads` such threads.
    /// Standalone Redis: a connection of the thread's own
    /// ([`RedisStore::pin_to_thread`](super::redis::RedisStore::pin_to_thread));
    /// PostgreSQL: a request-path pool of the thread's own holding its
    /// share of the store's connections, `max_connections` ÷ `threads`
    /// rounded up
    /// ([`PostgresStore::pin_to_thread`](super::postgres::PostgresStore::pin_to_thread));
    /// the memory store has nothing to pin (it is in this process).
    ///
    /// # Errors
    ///
    /// When the thread's own connection cannot be made (the thread then
    /// keeps using the shared one).
    pub async fn pin_to_thread(&self, threads: usize) -> Result<ThreadPins, StoreError> {
        #[cfg(not(feature = "postgres"))]
        let _ = threads;
        match self {
            #[cfg(feature = "redis")]
            Self::Redis(store) => Ok(ThreadPins {
                _pin: Some(store.pin_to_thread().await?),
            }),
            #[cfg(feature = "postgres")]
            Self::Postgres(store) => {
                let threads = u32::try_from(threads.max(1)).unwrap_or(u32::MAX);
                let share = store.max_connections().div_ceil(threads);
                Ok(ThreadPins {
                    _pin: Some(store.pin_to_thread(share)?),
                })
            }
            #[allow(
                unreachable_patterns,
                reason = "reachable when a backend is compiled in"
            )]
            _ => Ok(ThreadPins::default()),
        }
    }

    /// A short name of the backend: `memory`, `redis` or `postgres`.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            #[cfg(feature = "memory")]
            Self::Memory(_) => "memory",
            #[cfg(feature = "redis")]
            Self::Redis(_) => "redis",
            #[cfg(feature = "postgres")]
            Self::Postgres(_) => "postgres",
        }
    }
}

/// A thread's own store connections ([`AnyStore::pin_to_thread`]), kept
/// while this lives. Tied to its thread: drop it there.
#[derive(Debug, Default)]
#[must_use = "the thread keeps its connections only while the pins live"]
pub struct ThreadPins {
    #[cfg(any(feature = "redis", feature = "postgres"))]
    /// Held for its drop, which gives the connections up.
    _pin: Option<super::ThreadPin>,
}

/// The Redis settings `options` give.
#[cfg(feature = "redis")]
fn redis_builder(options: &ConnectOptions) -> super::redis::RedisStoreBuilder {
    let mut builder = super::redis::RedisStore::builder();
    if let Some(timeout) = options.timeout {
        builder = builder.timeout(timeout);
    }
    #[cfg(feature = "tls")]
    if let Some(pem) = &options.tls_ca {
        builder = builder.tls_ca(pem.clone());
    }
    builder
}

/// Calls `$method` on whichever backend `$self` holds.
///
/// The network stores' futures are boxed: inline, the largest of them
/// (sqlx's) would size every call's future, the memory store's included,
/// and every caller up to the request's task would copy it whole on each
/// move (one allocation is nothing next to a round trip).
macro_rules! delegate {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            #[cfg(feature = "memory")]
            AnyStore::Memory($s) => $call.await,
            #[cfg(feature = "redis")]
            AnyStore::Redis($s) => Box::pin($call).await,
            #[cfg(feature = "postgres")]
            AnyStore::Postgres($s) => Box::pin($call).await,
        }
    };
}
pub(super) use delegate;

impl Store for AnyStore {
    async fn reserve(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Reservation, StoreError> {
        delegate!(self, s => s.reserve(key, fingerprint, lease))
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: Token,
        record: Arc<CompletedRecord>,
        retention: Duration,
    ) -> Result<Fence, StoreError> {
        delegate!(self, s => s.complete(key, token, record, retention))
    }

    async fn release(&self, key: &StoreKey, token: Token) -> Result<Fence, StoreError> {
        delegate!(self, s => s.release(key, token))
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        delegate!(self, s => s.extend(key, token, lease))
    }

    async fn get(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        delegate!(self, s => s.get(key))
    }

    async fn purge(&self, key: &StoreKey) -> Result<bool, StoreError> {
        delegate!(self, s => s.purge(key))
    }

    async fn subscribe(&self, key: &StoreKey) -> Result<Subscription, StoreError> {
        delegate!(self, s => s.subscribe(key))
    }

    async fn begin_attempt(&self, key: &StoreKey, keep: Duration) -> Result<u32, StoreError> {
        delegate!(self, s => s.begin_attempt(key, keep))
    }

    async fn end_attempt(
        &self,
        key: &StoreKey,
        attempt: u32,
        error: Option<&str>,
        keep: Duration,
    ) -> Result<Fence, StoreError> {
        delegate!(self, s => s.end_attempt(key, attempt, error, keep))
    }

    async fn attempts(&self, key: &StoreKey) -> Result<Option<Attempts>, StoreError> {
        delegate!(self, s => s.attempts(key))
    }
}

impl Queue for AnyStore {
    async fn enqueue(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        id: OperationId,
        request: &OperationRequest,
        max_pending: u64,
    ) -> Result<Enqueued, StoreError> {
        delegate!(self, s => s.enqueue(key, fingerprint, id, request, max_pending))
    }

    async fn claim(&self, lease: Duration, max: usize) -> Result<Vec<Claimed>, StoreError> {
        delegate!(self, s => s.claim(lease, max))
    }

    async fn retry(
        &self,
        key: &StoreKey,
        token: Token,
        delay: Duration,
        last_error: &str,
    ) -> Result<Fence, StoreError> {
        delegate!(self, s => s.retry(key, token, delay, last_error))
    }

    async fn operation(&self, id: OperationId) -> Result<Option<Operation>, StoreError> {
        delegate!(self, s => s.operation(id))
    }

    async fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        delegate!(self, s => s.queue_stats())
    }
}

/// How [`AnyStore::connect`] sets up the store it opens.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct ConnectOptions {
    #[cfg_attr(
        not(any(feature = "redis", feature = "postgres")),
        allow(dead_code, reason = "only remote stores have a time-out")
    )]
    timeout: Option<Duration>,
    #[cfg(feature = "memory")]
    memory_limits: super::memory::MemoryLimits,
    /// PEM roots for TLS to the store (feature `tls`).
    #[cfg(feature = "tls")]
    tls_ca: Option<Vec<u8>>,
}

impl ConnectOptions {
    /// The backends' defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// The bound on every call to a remote store (Redis, PostgreSQL);
    /// default: the backend's own (2 s). The memory store ignores it.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Trusts the certificates in `pem` (PEM `CERTIFICATE` blocks) for TLS
    /// to the store: `rediss://` (every Cluster node) in place of the
    /// system's roots, and PostgreSQL when its URL names no `sslrootcert`
    /// (feature `tls`; the memory store ignores it).
    #[cfg(feature = "tls")]
    pub fn tls_ca(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_ca = Some(pem.into());
        self
    }

    /// The memory store's bounds (default [`MemoryLimits::default`](super::memory::MemoryLimits)).
    #[cfg(feature = "memory")]
    pub fn memory_limits(mut self, limits: super::memory::MemoryLimits) -> Self {
        self.memory_limits = limits;
        self
    }
}

/// A store URL, checked: which backend, and where (protocol §12).
///
/// | URL | backend |
/// |---|---|
/// | `memory` | the in-process memory store (feature `memory`) |
/// | `redis://host:port[/db]`, `rediss://…` | one Redis server (feature `redis`) |
/// | `redis://[:pw@]a:7000,b:7001,c:7002[/db][?query]` | a Redis Cluster, through any of those nodes; the password, db and query apply to every node |
/// | `postgres://user@host:port/db`, `postgresql://…` | PostgreSQL (feature `postgres`) |
///
/// Schemes may be in any case. Whether the backend is compiled in is
/// checked by [`AnyStore::connect_to`].
///
/// `Display` and `Debug` show the URL with any password as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreUrl {
    /// As given.
    url: String,
    target: Target,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Memory,
    Redis,
    /// The node URLs, each whole: scheme, user info, path and query.
    RedisCluster(Vec<String>),
    Postgres,
}

impl StoreUrl {
    /// The backend: `memory`, `redis` or `postgres`.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self.target {
            Target::Memory => "memory",
            Target::Redis | Target::RedisCluster(_) => "redis",
            Target::Postgres => "postgres",
        }
    }

    /// Whether the URL names the nodes of a Redis Cluster.
    #[must_use]
    pub fn is_cluster(&self) -> bool {
        matches!(self.target, Target::RedisCluster(_))
    }

    /// The URL as given, password included: for connecting, never for logs.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.url
    }
}

impl FromStr for StoreUrl {
    type Err = StoreError;

    /// `memory`, `redis://…`, `rediss://…` (several nodes separated by
    /// commas: a Cluster), `postgres://…` or `postgresql://…`; schemes in
    /// any case.
    fn from_str(s: &str) -> Result<Self, StoreError> {
        if s == "memory" {
            return Ok(Self {
                url: s.to_owned(),
                target: Target::Memory,
            });
        }
        let lower = s.to_ascii_lowercase();
        let scheme_len = |schemes: &[&str]| {
            schemes
                .iter()
                .find(|p| lower.starts_with(*p))
                .map(|p| p.len())
        };
        let (target, len) = if let Some(len) = scheme_len(&["redis://", "rediss://"]) {
            let nodes = redis_nodes(s);
            let target = if nodes.len() > 1 {
                Target::RedisCluster(nodes)
            } else {
                Target::Redis
            };
            (target, len)
        } else if let Some(len) = scheme_len(&["postgres://", "postgresql://"]) {
            (Target::Postgres, len)
        } else {
            return Err(StoreError::Config(ConfigError::NotAStore {
                url: redact(s),
            }));
        };
        if s.len() == len {
            return Err(StoreError::Config(ConfigError::NoHost { url: redact(s) }));
        }
        Ok(Self {
            url: s.to_owned(),
            target,
        })
    }
}

impl StoreUrl {
    /// The URL as given, with any password shown as `***` (each node's,
    /// for a Cluster).
    fn redacted(&self) -> String {
        if !self.is_cluster() {
            return redact(&self.url);
        }
        let nodes: Vec<String> = self
            .url
            .split(',')
            .map(|node| {
                if node.contains("://") {
                    redact(node)
                } else {
                    // `b:7001` after the first node: the user info starts it.
                    let shown = redact(&format!("x://{node}"));
                    shown.get("x://".len()..).unwrap_or_default().to_owned()
                }
            })
            .collect();
        nodes.join(",")
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("StoreUrl").field(&self.redacted()).finish()
    }
}

/// `redis://a:7000,b:7001,c:7002` (or full URLs separated by commas) names
/// the nodes of a Redis Cluster; one address is a standalone server.
///
/// In the shorthand, the scheme and the user info are written once, on
/// the first node, and the path (the database) and query once, after the
/// last node (or on the first): `redis://:pw@a:7000,b:7001/0?protocol=resp3`.
/// Every node written without a scheme gets the scheme, and the shared
/// user info, path and query unless it has its own; a node written as a
/// whole URL (`…,redis://c:7002`) is taken as it is. A `,` in a password
/// must be percent-encoded (`%2C`).
fn redis_nodes(spec: &str) -> Vec<String> {
    let (scheme, rest) = spec.split_once("://").unwrap_or(("redis", spec));
    let nodes: Vec<(bool, &str)> = rest
        .split(',')
        .filter(|s| !s.is_empty())
        .enumerate()
        // The first node is written after the scheme: always shorthand.
        .map(|(i, s)| (i == 0 || !s.contains("://"), s))
        .collect();
    let shorthand = || {
        nodes
            .iter()
            .filter(|(short, _)| *short)
            .map(|&(_, s)| NodeParts::of(s))
    };
    let userinfo = shorthand().next().and_then(|n| n.userinfo);
    let tail = shorthand()
        .next_back()
        .map(|n| n.tail)
        .filter(|t| !t.is_empty())
        .or_else(|| shorthand().next().map(|n| n.tail))
        .unwrap_or_default();
    nodes
        .iter()
        .map(|&(short, node)| {
            if !short {
                return node.to_owned();
            }
            let n = NodeParts::of(node);
            let mut url = format!("{scheme}://");
            if let Some(userinfo) = n.userinfo.or(userinfo) {
                url.push_str(userinfo);
                url.push('@');
            }
            url.push_str(n.host);
            url.push_str(if n.tail.is_empty() { tail } else { n.tail });
            url
        })
        .collect()
}

/// A node of the Cluster shorthand, `[userinfo@]host:port[/db][?query]`.
struct NodeParts<'a> {
    userinfo: Option<&'a str>,
    host: &'a str,
    /// The path and query, with their leading `/` or `?`; maybe empty.
    tail: &'a str,
}

impl<'a> NodeParts<'a> {
    fn of(node: &'a str) -> Self {
        // The last `@` ends the user info, as in `redact`: a password may
        // itself contain `/`.
        let (userinfo, rest) = match node.rfind('@') {
            Some(at) => (Some(&node[..at]), &node[at + 1..]),
            None => (None, node),
        };
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (host, tail) = rest.split_at(end);
        Self {
            userinfo,
            host,
            tail,
        }
    }
}

/// `url` with any password (in the user info or a `password=` query
/// parameter) replaced by `***`.
fn redact(url: &str) -> String {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn url(s: &str) -> StoreUrl {
        s.parse().unwrap()
    }

    fn refused(s: &str) -> String {
        match s.parse::<StoreUrl>() {
            Err(StoreError::Config(why)) => why.to_string(),
            other => panic!("{s:?} gave {other:?}"),
        }
    }

    #[test]
    fn urls_name_their_backend() {
        let memory = url("memory");
        assert_eq!((memory.kind(), memory.is_cluster()), ("memory", false));
        for s in [
            "redis://127.0.0.1:6379",
            "redis://h:6379/2",
            "rediss://:pw@h:6380",
            "REDIS://h",
            // A trailing comma names no second node.
            "redis://h:6379,",
        ] {
            let u = url(s);
            assert_eq!((u.kind(), u.is_cluster(), u.as_str()), ("redis", false, s));
            assert_eq!(u.target, Target::Redis, "{s}");
        }
        for s in [
            "postgres://idem@db:5432/idem",
            "postgresql://db/idem",
            "Postgres://db",
        ] {
            let u = url(s);
            assert_eq!(
                (u.kind(), u.is_cluster(), u.as_str()),
                ("postgres", false, s)
            );
        }
    }

    #[test]
    fn several_redis_nodes_are_a_cluster() {
        let cases = [
            (
                "redis://a:7000,b:7001,c:7002",
                &["redis://a:7000", "redis://b:7001", "redis://c:7002"][..],
            ),
            (
                "rediss://a:7000,rediss://b:7001",
                &["rediss://a:7000", "rediss://b:7001"][..],
            ),
            (
                "redis://a:7000,,b:7001,",
                &["redis://a:7000", "redis://b:7001"][..],
            ),
        ];
        for (s, nodes) in cases {
            let u = url(s);
            assert_eq!((u.kind(), u.is_cluster(), u.as_str()), ("redis", true, s));
            assert_eq!(
                u.target,
                Target::RedisCluster(nodes.iter().map(|n| (*n).to_owned()).collect())
            );
        }
    }

    /// The shorthand `redis://:pw@a:7000,b:7001/0?x=y` writes the user info
    /// once, before the first node, and the path and query once, after the
    /// last: every node written without its own gets them (a Cluster client
    /// refuses nodes with different passwords, and the subscriber
    /// authenticates to any of them).
    #[test]
    fn cluster_nodes_share_credentials_db_and_query() {
        let cases = [
            (
                "redis://:pw@a:7000,b:7001,c:7002",
                &[
                    "redis://:pw@a:7000",
                    "redis://:pw@b:7001",
                    "redis://:pw@c:7002",
                ][..],
            ),
            (
                "rediss://user:p%40w@a:7000,b:7001/0?protocol=resp3",
                &[
                    "rediss://user:p%40w@a:7000/0?protocol=resp3",
                    "rediss://user:p%40w@b:7001/0?protocol=resp3",
                ][..],
            ),
            (
                "redis://u:pw@a:7000/0,b:7001",
                &["redis://u:pw@a:7000/0", "redis://u:pw@b:7001/0"][..],
            ),
            // A node with its own user info, or written as a whole URL,
            // keeps exactly what it says.
            (
                "redis://:pw@a:7000,:other@b:7001,redis://c:7002",
                &[
                    "redis://:pw@a:7000",
                    "redis://:other@b:7001",
                    "redis://c:7002",
                ][..],
            ),
            (
                "redis://a:7000,b:7001?protocol=resp3",
                &[
                    "redis://a:7000?protocol=resp3",
                    "redis://b:7001?protocol=resp3",
                ][..],
            ),
        ];
        for (s, nodes) in cases {
            assert_eq!(redis_nodes(s), nodes, "{s}");
        }
    }

    #[cfg(feature = "redis")]
    #[test]
    fn a_cluster_with_a_password_builds() {
        for s in [
            "redis://:pw@127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002",
            "redis://user:pw@127.0.0.1:7000,127.0.0.1:7001/0?protocol=resp3",
        ] {
            let Target::RedisCluster(nodes) = url(s).target else {
                panic!("{s} is not a cluster");
            };
            let built = ::redis::cluster::ClusterClientBuilder::new(nodes).build();
            assert!(built.is_ok(), "{s}: {:?}", built.err());
        }
    }

    #[test]
    fn other_strings_are_refused() {
        for bad in [
            "",
            "Memory",
            "mem",
            "redis:/h",
            "http://h",
            "mysql://u:hunter2@h/db",
        ] {
            let why = refused(bad);
            assert!(
                why.contains("memory") && why.contains("postgres://"),
                "{why}"
            );
            assert!(!why.contains("hunter2"), "{why}");
        }
        for bad in ["redis://", "rediss://", "postgres://", "postgresql://"] {
            assert!(refused(bad).contains("has no host"), "{bad}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        let cases = [
            ("memory", "memory"),
            ("redis://:hunter2@h:6379/0", "redis://:***@h:6379/0"),
            ("redis://h:6379", "redis://h:6379"),
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
            (
                "redis://:hunter2@a:7000,:hunter2@b:7001,redis://u:hunter2@c:7002",
                "redis://:***@a:7000,:***@b:7001,redis://u:***@c:7002",
            ),
        ];
        for (s, shown) in cases {
            let u = url(s);
            assert_eq!(u.to_string(), shown);
            assert!(!format!("{u:?}").contains("hunter2"));
        }
    }

    #[cfg(feature = "memory")]
    #[tokio::test]
    #[allow(irrefutable_let_patterns, reason = "memory may be the only backend")]
    async fn memory_takes_its_limits() {
        use crate::store::memory::MemoryLimits;
        let limits = MemoryLimits {
            max_entries: 7,
            max_bytes: 1 << 20,
        };
        let options = ConnectOptions::new()
            .timeout(Duration::from_secs(1))
            .memory_limits(limits);
        let store = AnyStore::connect("memory", options).await.unwrap();
        assert_eq!(store.kind(), "memory");
        let AnyStore::Memory(memory) = store else {
            panic!("not the memory store");
        };
        assert_eq!(memory.limits(), limits);
    }

    #[cfg(not(feature = "postgres"))]
    #[tokio::test]
    async fn a_backend_left_out_is_a_clear_error() {
        let e = AnyStore::connect("postgres://u:hunter2@db/idem", ConnectOptions::new())
            .await
            .unwrap_err();
        let why = e.to_string();
        assert!(why.contains("feature `postgres`"), "{why}");
        assert!(!why.contains("hunter2"), "{why}");
    }

    #[cfg(not(feature = "redis"))]
    #[tokio::test]
    async fn redis_left_out_is_a_clear_error() {
        let e = AnyStore::connect("redis://a:7000,b:7001", ConnectOptions::new())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("feature `redis`"), "{e}");
    }
}
