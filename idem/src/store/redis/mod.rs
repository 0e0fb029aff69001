//! The Redis store (feature `redis`): many instances share one Redis, or one
//! Redis Cluster (protocol §7).
//!
//! # Layout
//!
//! One record is ONE Redis hash at `{prefix}{<store key>}`: the configured
//! prefix (default `idem:`), then the whole [`StoreKey`] as the hash tag, so
//! a record, and anything later stored beside it under the same tag, lives
//! in one Cluster slot. The prefix may not contain `{` or `}`, which would
//! move the hash tag into the prefix and put every record in one slot.
//!
//! | field | in flight | completed |
//! |---|---|---|
//! | `state` | `in_flight` | `completed` |
//! | `token` | the holder's fencing token, 32 hex digits | the token that completed it (so a retried `complete` from that holder answers [`Fence::Held`]) |
//! | `fp` | fingerprint, 64 hex digits | fingerprint, 64 hex digits |
//! | `started_at` | milliseconds since the Unix epoch | — |
//! | `waiters` | `1` once a `reserve` found it in flight (then `complete` and `release` publish) | — |
//! | `status` | — | HTTP status, decimal |
//! | `headers` | — | binary: version byte `1`, then for each header a big-endian `u32` length and the name, a `u32` length and the value |
//! | `body` | — | the body's raw bytes (Redis strings are binary safe: no base64) |
//! | `completed_at`, `expires_at` | — | milliseconds since the Unix epoch |
//!
//! A job's attempt trace (protocol §13) is a hash of its own beside the
//! record, at `{prefix}{<store key>}:job` (see `job.rs`); `reserve` and
//! `complete` never touch it.
//!
//! Redis keeps the time: the lease is the key's TTL while in flight
//! (`PEXPIRE`, renewed by [`Store::extend`]), the retention once completed.
//! A lease that ran out is an expired key, which Redis treats as absent, so
//! it is free to take over; `lease_remaining` is the key's `PTTL`. A record
//! that cannot be decoded is [`StoreError::Corrupt`].
//!
//! # Scripts
//!
//! Every operation is ONE Lua script (`src/store/redis/lua/*.lua`, loaded with
//! `include_str!` into a [`redis::Script`], sent by `EVALSHA` and reloaded
//! after a Redis restart), and each says in an `-- Atomicity:` comment why
//! it cannot interleave badly: `reserve`, `complete`, `release`, `extend`,
//! `get`, `purge`. `complete`, `release` and `extend` are fenced on the
//! token inside the script. Async mode's queue adds its own scripts (see
//! [`queue`](self#async-modes-queue)).
//!
//! The fencing token is generated in Rust before `reserve` is sent, so a
//! call can be sent twice with the same arguments, and each script is
//! safe to repeat for its own token: a repeated `reserve` finds the
//! caller's own reservation and answers `Acquired` (restarting the lease);
//! a repeated `complete` finds the answer stored under its token and
//! answers [`Fence::Held`]; a repeated `extend` extends again. A repeated
//! `release` or `purge` finds nothing left to delete and says so
//! ([`Fence::Lost`], `false`): the key is free either way.
//!
//! # Notifications
//!
//! `complete`, `release` and `purge` `PUBLISH` the store key on the channel
//! `{prefix}changed`, inside their script, after the write; `complete` and
//! `release` only when somebody may be waiting: a `reserve` that found the
//! record in flight marks it (field `waiters`), and a running async
//! operation always counts as waited on (its status may be long-polled
//! from any instance). Without that, every fresh request would cost one
//! message to every subscribed instance. `reserve`, `extend` and `get`
//! publish nothing: waiters wait for an answer, and those give none.
//!
//! Each `RedisStore` keeps ONE subscriber connection of its own (not one
//! per waiter, and never one of the command connections), subscribed to
//! the channel, which feeds the store's [`Notifier`]; [`Store::subscribe`]
//! returns at once with an in-process [`Subscription`]. When the subscriber
//! connection drops, it reconnects with backoff and then wakes every
//! subscription ([`Notifier::notify_all`]), since messages sent meanwhile
//! are lost. A waiter never depends on it: the engine polls too.
//!
//! # Async mode's queue
//!
//! [`RedisStore`] implements [`Queue`](super::Queue): an async operation
//! is the record of its key (states `pending` and `running` beside
//! `in_flight` and `completed`), so `reserve`, `get`, `complete`,
//! `extend`, `release` and `purge` above treat it as the key's record, and
//! a synchronous request and an async one of the same key meet in one
//! script, in the key's slot. Claimable operations are found through the
//! queue: a sorted set by due time, with an id index, under one hash tag of
//! its own (`{prefix}{<prefix>queue}:…`), kept in step with the records by
//! a second call; the record is the authority, and the queue heals. The
//! layout, the steps, why one slot and the `max_pending` bound are in
//! `queue.rs` and `docs/stores.md`.
//!
//! # Redis Cluster
//!
//! [`RedisStore::connect_cluster`] routes each script by its one key to the
//! node that owns the slot and follows resharding. Notifications use plain
//! `PUBLISH`, which a Cluster broadcasts to every node, so one subscriber
//! connection to any node hears the changes of every slot. Sharded pub/sub
//! (`SPUBLISH`, Redis 7) would keep each message on its shard, but a
//! subscriber would then need a connection per shard and a `SSUBSCRIBE` per
//! watched key (confirmed before the waiter reads the record), re-issued on
//! every slot move; the broadcast costs one small message per finished
//! request on each node, which suits the clusters idem targets.
//!
//! The subscriber connects only through the node URLs it was given (the
//! seeds), in turn, never through nodes it learns of later: the command
//! connection follows the Cluster's topology, the subscriber does not. If
//! every seed is gone for good (replaced, not restarted), the store keeps
//! working but its waiters are woken by polling only, and
//! [`RedisStore::is_listening`] stays `false`; give every node, or an
//! address that stays valid (a DNS name), in the URL.
//!
//! # Connections and failures
//!
//! Standalone Redis uses a [`ConnectionManager`] (one multiplexed
//! connection that reconnects by itself); a Cluster uses the crate's async
//! cluster connection, which reconnects to nodes and refreshes the slot map.
//! A thread that runs its own runtime may take a standalone connection of
//! its own ([`RedisStore::pin_to_thread`]; the gateway's listener threads
//! do), which behaves as the shared one in every way below.
//! Every call is bounded by [`RedisStoreBuilder::timeout`] (default 2 s) and
//! fails with [`StoreError::Timeout`] past it; a refused or dropped
//! connection is [`StoreError::Unavailable`]. Construction fails (it never
//! panics) when Redis cannot be reached.
//!
//! A call that finds its connection dropped (reset, broken pipe, closed by
//! the server, refused) is sent ONCE more, with the same arguments, within
//! the same time-out: the connection manager has begun a new connection
//! by then, and the retry waits for it. This covers the two ways a
//! connection is lost:
//!
//! - mid-call, after Redis applied the script but before its reply
//!   arrived: the retry finds the caller's own work (see "Scripts") and
//!   answers as the first call would have;
//! - while idle, e.g. across a Redis restart: the old connection is only
//!   found dead when a call uses it, so without the retry the first call
//!   after Redis is back would fail. With it, that call (and the gateway's
//!   `/readyz` probe, a `get`) succeeds as soon as Redis answers, and a
//!   call while Redis is down fails only after a fresh connection attempt
//!   was refused — both agree with the server's real state.
//!
//! A call that timed out is not retried (the time-out is spent), nor one
//! Redis answered with an error. A Cluster connection also retries by
//! itself on connection errors (twice), which the same idempotence makes
//! safe.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use idem::{Engine, store::redis::RedisStore};
//! # async fn run() -> Result<(), idem::StoreError> {
//! let store = RedisStore::builder()
//!     .prefix("shop:idem:")
//!     .timeout(Duration::from_millis(500))
//!     .connect("redis://127.0.0.1:6379")
//!     .await?;
//! let engine = Engine::new(store);
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClientBuilder;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Client, Cmd, ErrorKind, RedisError, Script, ServerErrorKind, Value};

use super::background::{self, AbortOnDrop, Listening};
use super::pin;
use super::{
    ConfigError, Corruption, Fence, Lease, Notifier, Reservation, Store, StoreError, Subscription,
};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::record::{CompletedRecord, Record, Token};
use invoke::{token_hex, Headers, Hex, Invocation, Tagged};
use queue::Follow;
use reply::{epoch_ms, ttl_ms, Reply};
use subscriber::Subscriber;

pub use super::pin::ThreadPin;

mod invoke;
mod job;
mod queue;
mod reply;
mod subscriber;
mod version;

/// The prefix of every key (and of the change channel) unless configured.
pub const DEFAULT_PREFIX: &str = "idem:";
/// The default bound on every store call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// The default bound on establishing a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// One Lua script per atomic operation.
struct Scripts {
    reserve: Script,
    complete: Script,
    release: Script,
    extend: Script,
    get: Script,
    purge: Script,
    queue: queue::Scripts,
    job: job::Scripts,
}

impl Scripts {
    fn load() -> Self {
        Self {
            reserve: Script::new(include_str!("lua/reserve.lua")),
            complete: Script::new(include_str!("lua/complete.lua")),
            release: Script::new(include_str!("lua/release.lua")),
            extend: Script::new(include_str!("lua/extend.lua")),
            get: Script::new(include_str!("lua/get.lua")),
            purge: Script::new(include_str!("lua/purge.lua")),
            queue: queue::Scripts::load(),
            job: job::Scripts::load(),
        }
    }
}

/// The command connection: both kinds are cheap clones of one shared,
/// multiplexed, self-reconnecting connection. A standalone store's
/// connection may be replaced, on a thread, by that thread's own
/// ([`RedisStore::pin_to_thread`]).
#[derive(Clone)]
enum Conn {
    Standalone(Box<Standalone>),
    Cluster(ClusterConnection),
}

/// A standalone Redis: the shared connection, and what a thread's own
/// connection is made from.
#[derive(Clone)]
struct Standalone {
    /// This store's key in the threads' tables of their own connections.
    id: u64,
    shared: ConnectionManager,
    client: Client,
    config: ConnectionManagerConfig,
}

impl Standalone {
    /// The calling thread's own connection if it has one, else the shared one.
    fn conn(&self) -> ConnectionManager {
        pin::get::<ConnectionManager>(self.id).unwrap_or_else(|| self.shared.clone())
    }
}

impl Conn {
    /// Sends the script's `EVALSHA`; when Redis does not know the script
    /// (`NOSCRIPT`: restarted, flushed, a new node), loads it and sends the
    /// call again, as `redis::ScriptInvocation` does.
    async fn invoke(&self, invocation: &Invocation<'_>) -> Result<Value, RedisError> {
        match self.query(invocation.cmd()).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                let script = invocation.script();
                match self {
                    Conn::Standalone(c) => script.load_async(&mut c.conn()).await?,
                    Conn::Cluster(c) => script.load_async(&mut c.clone()).await?,
                };
                self.query(invocation.cmd()).await
            }
            result => result,
        }
    }

    async fn query(&self, cmd: &Cmd) -> Result<Value, RedisError> {
        match self {
            Conn::Standalone(c) => cmd.query_async(&mut c.conn()).await,
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
    }
}

struct Inner {
    conn: Conn,
    scripts: Scripts,
    notifier: Notifier,
    prefix: String,
    channel: String,
    timeout: Duration,
    /// Bound on making a thread's own connection.
    connect_timeout: Duration,
    cluster: bool,
    listening: Listening,
    /// The subscriber task, stopped when the last clone of the store drops.
    _subscriber: AbortOnDrop,
}

/// The Redis store. Cheap to clone; clones share the connections.
///
/// Build it with [`RedisStore::connect`], [`RedisStore::connect_cluster`] or
/// [`RedisStore::builder`]. See the [module docs](self) for the layout.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .field("cluster", &self.inner.cluster)
            .finish_non_exhaustive()
    }
}

/// Settings of a [`RedisStore`]; finish with
/// [`connect`](RedisStoreBuilder::connect) or
/// [`connect_cluster`](RedisStoreBuilder::connect_cluster).
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisStoreBuilder {
    prefix: String,
    timeout: Duration,
    connect_timeout: Duration,
    /// PEM roots for `rediss://` in place of the system's (feature `tls`).
    #[cfg(feature = "tls")]
    tls_ca: Option<Vec<u8>>,
}

impl Default for RedisStoreBuilder {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            #[cfg(feature = "tls")]
            tls_ca: None,
        }
    }
}

impl RedisStoreBuilder {
    /// The prefix of every key and of the change channel (default `idem:`).
    /// Stores with different prefixes never see each other's records. It may
    /// not contain `{` or `}` (see the module docs).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The bound on every store call (default 2 s); past it the call fails
    /// with [`StoreError::Timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The bound on establishing a connection, at start and on every
    /// reconnection attempt (default 2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Trusts the certificates in `pem` (one or more PEM `CERTIFICATE`
    /// blocks) for `rediss://` URLs, in place of the system's roots: a
    /// managed Redis with a private CA. Without it, `rediss://` checks the
    /// server against the system's roots. Cluster nodes too.
    #[cfg(feature = "tls")]
    pub fn tls_ca(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_ca = Some(pem.into());
        self
    }

    /// A client for `url`, with the configured roots when it is `rediss://`.
    fn client(&self, url: &str) -> Result<Client, StoreError> {
        #[cfg(feature = "tls")]
        if let Some(pem) = &self.tls_ca {
            if url
                .get(..9)
                .is_some_and(|s| s.eq_ignore_ascii_case("rediss://"))
            {
                let certs = ::redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                };
                return Client::build_with_tls(url, certs).map_err(config_error);
            }
        }
        Client::open(url).map_err(config_error)
    }

    /// Connects to a standalone Redis at `url` (`redis://host:port[/db]`,
    /// or `rediss://…` over TLS with feature `tls`).
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] for a malformed URL or prefix;
    /// [`StoreError::Unavailable`] or [`StoreError::Timeout`] when Redis
    /// cannot be reached.
    pub async fn connect(self, url: &str) -> Result<RedisStore, StoreError> {
        self.validate()?;
        let client = self.client(url)?;
        let config = manager_config(self.connect_timeout);
        let manager = bounded(
            self.connect_timeout,
            ConnectionManager::new_with_config(client.clone(), config.clone()),
        )
        .await?;
        let conn = Conn::Standalone(Box::new(Standalone {
            id: pin::next_id(),
            shared: manager,
            client: client.clone(),
            config,
        }));
        self.finish(conn, vec![client]).await
    }

    /// Connects to a Redis Cluster through any of its `urls` (the slot map is
    /// read from the first that answers).
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] for a malformed URL or prefix, or no URL;
    /// [`StoreError::Unavailable`] or [`StoreError::Timeout`] when no node
    /// can be reached.
    pub async fn connect_cluster<S: AsRef<str>>(
        self,
        urls: &[S],
    ) -> Result<RedisStore, StoreError> {
        self.validate()?;
        if urls.is_empty() {
            return Err(StoreError::Config(ConfigError::NoNodes));
        }
        let urls: Vec<&str> = urls.iter().map(AsRef::as_ref).collect();
        let nodes = urls
            .iter()
            .map(|u| self.client(u))
            .collect::<Result<Vec<_>, _>>()?;
        let builder = ClusterClientBuilder::new(urls)
            .connection_timeout(self.connect_timeout)
            .response_timeout(self.timeout)
            .retries(2);
        #[cfg(feature = "tls")]
        let builder = match &self.tls_ca {
            Some(pem) => builder.certs(::redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            }),
            None => builder,
        };
        let client = builder.build().map_err(config_error)?;
        let conn = bounded(self.connect_timeout, client.get_async_connection()).await?;
        self.finish(Conn::Cluster(conn), nodes).await
    }

    fn validate(&self) -> Result<(), StoreError> {
        if self.prefix.contains(['{', '}']) {
            return Err(StoreError::Config(ConfigError::Name {
                what: "the Redis key prefix",
                name: self.prefix.clone(),
                rule: "it must not contain '{' or '}', which would move the hash tag of \
                       every key into the prefix",
            }));
        }
        if self.timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(StoreError::Config(ConfigError::ZeroTimeout {
                what: "Redis time-outs",
            }));
        }
        Ok(())
    }

    /// Starts the subscriber and waits (up to the connect time-out) for its
    /// first subscription, so changes made right after construction wake
    /// waiters. If it cannot subscribe yet, it keeps trying in the
    /// background and waiters poll meanwhile.
    async fn finish(self, conn: Conn, nodes: Vec<Client>) -> Result<RedisStore, StoreError> {
        let channel = format!("{}changed", self.prefix);
        let notifier = Notifier::new();
        let subscriber = Subscriber::new(
            nodes,
            channel.clone(),
            self.connect_timeout.max(self.timeout),
        );
        let listener = background::listen(subscriber, notifier.clone(), subscriber::backoff());
        let listening = listener.listening();
        let mut tasks = AbortOnDrop::new();
        tasks.spawn(listener.run());
        if tokio::time::timeout(self.connect_timeout, listening.up())
            .await
            .is_err()
        {
            tracing::warn!(
                channel,
                "Redis change subscription not ready; waiters poll until it is"
            );
        }
        let cluster = matches!(conn, Conn::Cluster(_));
        Ok(RedisStore {
            inner: Arc::new(Inner {
                conn,
                scripts: Scripts::load(),
                notifier,
                prefix: self.prefix,
                channel,
                timeout: self.timeout,
                connect_timeout: self.connect_timeout,
                cluster,
                listening,
                _subscriber: tasks,
            }),
        })
    }
}

/// How every standalone connection manager behaves.
fn manager_config(connect_timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        // Every call is bounded by `call` (its deadline covers the retry
        // too); a second, per-request timer inside the connection would
        // only cost a timer entry per call. The crate's default is 500 ms.
        .set_response_timeout(None)
        // Fail fast while Redis is down (the next call tries again)
        // rather than hold callers in a long retry loop.
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(1))
}

impl RedisStore {
    /// Settings with the defaults (prefix `idem:`, time-outs 2 s).
    pub fn builder() -> RedisStoreBuilder {
        RedisStoreBuilder::default()
    }

    /// Connects to a standalone Redis at `url` with the default settings.
    ///
    /// # Errors
    ///
    /// As [`RedisStoreBuilder::connect`].
    pub async fn connect(url: &str) -> Result<RedisStore, StoreError> {
        Self::builder().connect(url).await
    }

    /// Connects to a Redis Cluster through any of its `urls`, with the
    /// default settings.
    ///
    /// # Errors
    ///
    /// As [`RedisStoreBuilder::connect_cluster`].
    pub async fn connect_cluster<S: AsRef<str>>(urls: &[S]) -> Result<RedisStore, StoreError> {
        Self::builder().connect_cluster(urls).await
    }

    /// The prefix of every key.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The bound on every call.
    #[must_use]
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// Gives the calling thread a connection of its own to a standalone
    /// Redis, made on the calling thread's runtime, used by every call made
    /// on this thread while the returned pin lives (calls elsewhere use the
    /// shared connection). For a thread that runs one current-thread
    /// runtime for its whole life, as each of the gateway's listener
    /// threads does: its calls then never wake another thread (measured in
    /// BENCHMARKS.md). Drop the pin on its thread, before its runtime ends.
    ///
    /// A Redis Cluster connection is shared by all threads (the pin holds
    /// nothing), as is a second pin of the same thread.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] or [`StoreError::Timeout`] when the new
    /// connection cannot be made within the connect time-out; the thread
    /// then keeps using the shared one.
    pub async fn pin_to_thread(&self) -> Result<ThreadPin, StoreError> {
        let Conn::Standalone(standalone) = &self.inner.conn else {
            return Ok(ThreadPin::none());
        };
        if pin::has(standalone.id) {
            return Ok(ThreadPin::none());
        }
        let manager = bounded(
            self.inner.connect_timeout,
            ConnectionManager::new_with_config(
                standalone.client.clone(),
                standalone.config.clone(),
            ),
        )
        .await?;
        Ok(pin::insert(standalone.id, manager))
    }

    /// Whether this store talks to a Redis Cluster.
    #[must_use]
    pub fn is_cluster(&self) -> bool {
        self.inner.cluster
    }

    /// Whether the change subscription is up right now. While it is down,
    /// waiters still finish, by polling.
    #[must_use]
    pub fn is_listening(&self) -> bool {
        self.inner.listening.is_up()
    }

    /// The Redis key of `key`'s record: `{prefix}{<store key>}`.
    #[must_use]
    pub fn record_key(&self, key: &StoreKey) -> String {
        let mut k = String::with_capacity(self.inner.prefix.len() + key.as_str().len() + 2);
        k.push_str(&self.inner.prefix);
        k.push('{');
        k.push_str(key.as_str());
        k.push('}');
        k
    }

    /// `key`'s record key as a call argument, written in place.
    fn record_arg<'a>(&'a self, key: &'a StoreKey) -> Tagged<'a> {
        Tagged {
            prefix: &self.inner.prefix,
            tag: key.as_str(),
            suffix: "",
        }
    }

    /// Runs one script within the time-out; once more, with the same
    /// arguments and within the same time-out, when the connection was
    /// found dropped (see "Connections and failures" in the module docs).
    async fn eval(&self, invocation: Invocation<'_>) -> Result<Value, StoreError> {
        self.call(|| self.inner.conn.invoke(&invocation)).await
    }

    /// Runs one plain command as [`eval`](Self::eval) runs a script (only
    /// commands that are atomic by themselves and safe to repeat).
    async fn query(&self, cmd: Cmd) -> Result<Value, StoreError> {
        self.call(|| self.inner.conn.query(&cmd)).await
    }

    async fn call<'a, F, Fut>(&'a self, send: F) -> Result<Value, StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Value, RedisError>> + 'a,
    {
        let timeout = self.inner.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let attempt = || tokio::time::timeout_at(deadline, send());
        let result = match attempt().await {
            Ok(Err(e)) if connection_dropped(&e) => {
                // The connection manager has started a new connection; this
                // attempt waits for it. Every script is idempotent for its
                // caller's token, so a repeat of a call that applied answers
                // as the first would have.
                tracing::debug!(error = %e, "Redis connection dropped; retrying the call once");
                attempt().await
            }
            first => first,
        };
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(store_error(e, timeout)),
            Err(_) => Err(StoreError::Timeout(timeout)),
        }
    }

    /// Runs a fenced script answering 1 (held), 0 (lost) or, held on the
    /// record of an async operation, `{op[, at]}` — then does `follow`,
    /// the operation's second step in the queue (see `queue.rs`).
    async fn fenced(
        &self,
        key: &StoreKey,
        invocation: Invocation<'_>,
        follow: Follow,
    ) -> Result<Fence, StoreError> {
        match self.eval(invocation).await? {
            Value::Int(1) => Ok(Fence::Held),
            Value::Int(0) => Ok(Fence::Lost),
            Value::Array(items) => {
                let mut reply = Reply::from_items(items);
                let id = reply.operation_id()?;
                let at = if reply.is_empty() {
                    None
                } else {
                    Some(reply.ms("time")?)
                };
                self.follow(key, id, at, follow).await;
                Ok(Fence::Held)
            }
            other => Err(StoreError::Corrupt(
                format!("unexpected reply {other:?} from a fenced script").into(),
            )),
        }
    }
}

impl Store for RedisStore {
    async fn reserve(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Reservation, StoreError> {
        let token = Token::generate();
        let mut inv = Invocation::new(&self.inner.scripts.reserve, 1);
        inv.key(self.record_arg(key))
            .arg(Hex(fingerprint.0))
            .arg(token_hex(token))
            .arg(ttl_ms(lease))
            .arg(epoch_ms(SystemTime::now()));
        let mut reply = match self.eval(inv).await? {
            Value::Int(1) => {
                return Ok(Reservation::Acquired(Lease {
                    token,
                    duration: lease,
                }))
            }
            other => Reply::new(other)?,
        };
        match reply.tag()?.as_str() {
            "in_flight" => Ok(Reservation::InFlight {
                lease_remaining: reply.pttl()?,
            }),
            "mismatch" => Ok(Reservation::Mismatch),
            "completed" => Ok(Reservation::Completed(Arc::new(reply.completed()?))),
            other => Err(reply.unexpected(other)),
        }
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: Token,
        record: Arc<CompletedRecord>,
        retention: Duration,
    ) -> Result<Fence, StoreError> {
        let response = &record.response;
        let mut inv = Invocation::new(&self.inner.scripts.complete, 1);
        inv.key(self.record_arg(key))
            .arg(token_hex(token))
            .arg(ttl_ms(retention))
            .arg(Hex(record.fingerprint.0))
            .arg(response.status)
            .arg(Headers(&response.headers))
            .arg(response.body.as_ref())
            .arg(epoch_ms(record.completed_at))
            .arg(epoch_ms(record.expires_at))
            .arg(&self.inner.channel)
            .arg(key.as_str());
        self.fenced(key, inv, Follow::Forget(retention)).await
    }

    async fn release(&self, key: &StoreKey, token: Token) -> Result<Fence, StoreError> {
        let mut inv = Invocation::new(&self.inner.scripts.release, 1);
        inv.key(self.record_arg(key))
            .arg(token_hex(token))
            .arg(&self.inner.channel)
            .arg(key.as_str());
        self.fenced(key, inv, Follow::Forget(Duration::ZERO)).await
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        let mut inv = Invocation::new(&self.inner.scripts.extend, 1);
        inv.key(self.record_arg(key))
            .arg(token_hex(token))
            .arg(ttl_ms(lease));
        self.fenced(key, inv, Follow::Schedule).await
    }

    async fn get(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        let mut inv = Invocation::new(&self.inner.scripts.get, 1);
        inv.key(self.record_arg(key));
        let mut reply = Reply::new(self.eval(inv).await?)?;
        match reply.tag()?.as_str() {
            "none" => Ok(None),
            "in_flight" => Ok(Some(Record::InFlight {
                fingerprint: reply.fingerprint()?,
                started_at: reply.time("started_at")?,
                lease_remaining: reply.pttl()?,
            })),
            "completed" => Ok(Some(Record::Completed(Arc::new(reply.completed()?)))),
            other => Err(reply.unexpected(other)),
        }
    }

    async fn purge(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let mut inv = Invocation::new(&self.inner.scripts.purge, 2);
        inv.key(self.record_arg(key))
            .key(self.job_arg(key))
            .arg(&self.inner.channel)
            .arg(key.as_str());
        match self.eval(inv).await? {
            Value::Int(n) => Ok(n > 0),
            Value::Array(items) => {
                // An operation: out of the queue, its id forgotten.
                let id = Reply::from_items(items).operation_id()?;
                self.follow(key, id, None, Follow::Forget(Duration::ZERO))
                    .await;
                Ok(true)
            }
            other => Err(StoreError::Corrupt(
                format!("unexpected reply {other:?} from purge").into(),
            )),
        }
    }

    async fn subscribe(&self, key: &StoreKey) -> Result<Subscription, StoreError> {
        // In-process only: the store's one subscriber connection feeds the
        // notifier, so a waiter holds no Redis connection of its own.
        Ok(self.inner.notifier.subscribe(key))
    }

    async fn begin_attempt(&self, key: &StoreKey, keep: Duration) -> Result<u32, StoreError> {
        self.job_begin(key, keep).await
    }

    async fn end_attempt(
        &self,
        key: &StoreKey,
        attempt: u32,
        error: Option<&str>,
        keep: Duration,
    ) -> Result<Fence, StoreError> {
        self.job_end(key, attempt, error, keep).await
    }

    async fn attempts(&self, key: &StoreKey) -> Result<Option<super::Attempts>, StoreError> {
        self.job_get(key).await
    }
}

/// Awaits a Redis future within `timeout`, as a store result.
async fn bounded<T>(
    timeout: Duration,
    fut: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r.map_err(|e| store_error(e, timeout)),
        Err(_) => Err(StoreError::Timeout(timeout)),
    }
}

/// Whether `e` says the connection was lost or could not be made (reset,
/// broken pipe, closed, refused) — as opposed to a time-out, which leaves
/// no time to retry, or an answer from Redis.
fn connection_dropped(e: &RedisError) -> bool {
    !e.is_timeout() && (e.is_connection_dropped() || e.is_connection_refusal())
}

/// Classifies a Redis error at the edge.
fn store_error(e: RedisError, timeout: Duration) -> StoreError {
    if e.is_timeout() {
        return StoreError::Timeout(timeout);
    }
    let corrupt = matches!(e.kind(), ErrorKind::Parse | ErrorKind::UnexpectedReturnType)
        || e.code() == Some("WRONGTYPE");
    if corrupt {
        StoreError::Corrupt(Corruption::from_source(e))
    } else {
        StoreError::Unavailable(Box::new(e))
    }
}

fn config_error(e: RedisError) -> StoreError {
    StoreError::Config(ConfigError::Url {
        what: "Redis URL",
        source: Box::new(e),
    })
}
