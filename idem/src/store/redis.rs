//! The Redis store (feature `redis`): many instances share one Redis, or one
//! Redis Cluster (SPEC §7).
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
//! | `status` | — | HTTP status, decimal |
//! | `headers` | — | binary: version byte `1`, then for each header a big-endian `u32` length and the name, a `u32` length and the value |
//! | `body` | — | the body's raw bytes (Redis strings are binary safe: no base64) |
//! | `completed_at`, `expires_at` | — | milliseconds since the Unix epoch |
//!
//! Redis keeps the time: the lease is the key's TTL while in flight
//! (`PEXPIRE`, renewed by [`Store::extend`]), the retention once completed.
//! A lease that ran out is an expired key, which Redis treats as absent, so
//! it is free to take over; `lease_remaining` is the key's `PTTL`. A record
//! that cannot be decoded is [`StoreError::Corrupt`].
//!
//! # Scripts
//!
//! Every operation is ONE Lua script (`src/store/lua/*.lua`, loaded with
//! `include_str!` into a [`redis::Script`], sent by `EVALSHA` and reloaded
//! after a Redis restart), and each says in an `-- Atomicity:` comment why
//! it cannot interleave badly: `reserve`, `complete`, `release`, `extend`,
//! `get`, `purge`. `complete`, `release` and `extend` are fenced on the
//! token inside the script.
//!
//! # Notifications
//!
//! `complete`, `release` and `purge` `PUBLISH` the store key on the channel
//! `{prefix}changed`, inside their script, after the write. `reserve`,
//! `extend` and `get` publish nothing: waiters wait for an answer, and those
//! give none (a notification per request and per heartbeat would only
//! double the traffic).
//!
//! Each `RedisStore` keeps ONE subscriber connection of its own (not one
//! per waiter, and never one of the command connections), subscribed to
//! the channel, which feeds the store's [`Notifier`]; [`Store::subscribe`]
//! returns at once with an in-process [`Subscription`]. When the subscriber
//! connection drops, it reconnects with backoff and then wakes every
//! subscription ([`Notifier::notify_all`]), since messages sent meanwhile
//! are lost. A waiter never depends on it: the engine polls too.
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
//! # Connections and failures
//!
//! Standalone Redis uses a [`ConnectionManager`] (one multiplexed
//! connection that reconnects by itself); a Cluster uses the crate's async
//! cluster connection, which reconnects to nodes and refreshes the slot map.
//! Every call is bounded by [`RedisStoreBuilder::timeout`] (default 2 s) and
//! fails with [`StoreError::Timeout`] past it; a refused or dropped
//! connection is [`StoreError::Unavailable`]. Construction fails (it never
//! panics) when Redis cannot be reached; after Redis restarts, calls succeed
//! again on the same store.
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClientBuilder;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Client, ErrorKind, RedisError, Script, ScriptInvocation, Value};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{
    ConfigError, Corruption, Fence, Lease, Notifier, Reservation, Store, StoreError, Subscription,
};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::record::{CompletedRecord, Record, StoredResponse, Token};

/// The prefix of every key (and of the change channel) unless configured.
pub const DEFAULT_PREFIX: &str = "idem:";
/// The default bound on every store call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// The default bound on establishing a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest TTL sent to Redis (about 2 000 years): longer ones would
/// overflow Redis's expiry arithmetic.
const MAX_TTL: Duration = Duration::from_millis(1 << 46);
/// Format version of the `headers` field.
const HEADERS_V1: u8 = 1;
/// How often the subscriber connection is checked with a PING.
const SUBSCRIBER_PING_EVERY: Duration = Duration::from_secs(5);
/// Backoff between subscriber reconnection attempts.
const SUBSCRIBER_MIN_BACKOFF: Duration = Duration::from_millis(50);
const SUBSCRIBER_MAX_BACKOFF: Duration = Duration::from_secs(2);

/// One Lua script per atomic operation.
struct Scripts {
    reserve: Script,
    complete: Script,
    release: Script,
    extend: Script,
    get: Script,
    purge: Script,
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
        }
    }
}

/// The command connection: both kinds are cheap clones of one shared,
/// multiplexed, self-reconnecting connection.
#[derive(Clone)]
enum Conn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn invoke(&self, invocation: &ScriptInvocation<'_>) -> Result<Value, RedisError> {
        match self {
            Conn::Standalone(c) => invocation.invoke_async(&mut c.clone()).await,
            Conn::Cluster(c) => invocation.invoke_async(&mut c.clone()).await,
        }
    }
}

/// Aborts the subscriber task when the last clone of the store is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Inner {
    conn: Conn,
    scripts: Scripts,
    notifier: Notifier,
    prefix: String,
    channel: String,
    timeout: Duration,
    cluster: bool,
    listening: Arc<AtomicBool>,
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
}

impl Default for RedisStoreBuilder {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
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

    /// Connects to a standalone Redis at `url` (`redis://host:port[/db]`).
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] for a malformed URL or prefix;
    /// [`StoreError::Unavailable`] or [`StoreError::Timeout`] when Redis
    /// cannot be reached.
    pub async fn connect(self, url: &str) -> Result<RedisStore, StoreError> {
        self.validate()?;
        let client = Client::open(url).map_err(config_error)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.timeout))
            // Fail fast while Redis is down (the next call tries again)
            // rather than hold callers in a long retry loop.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let manager = bounded(
            self.connect_timeout,
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await?;
        self.finish(Conn::Standalone(manager), vec![client]).await
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
            .map(|u| Client::open(*u))
            .collect::<Result<Vec<_>, _>>()
            .map_err(config_error)?;
        let client = ClusterClientBuilder::new(urls)
            .connection_timeout(self.connect_timeout)
            .response_timeout(self.timeout)
            .retries(2)
            .build()
            .map_err(config_error)?;
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
        let listening = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = oneshot::channel();
        let subscriber = Subscriber {
            nodes,
            channel: channel.clone(),
            notifier: notifier.clone(),
            timeout: self.connect_timeout.max(self.timeout),
            listening: Arc::clone(&listening),
        };
        let task = tokio::spawn(subscriber.run(ready_tx));
        if tokio::time::timeout(self.connect_timeout, ready_rx)
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
                cluster,
                listening,
                _subscriber: AbortOnDrop(task),
            }),
        })
    }
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

    /// Whether this store talks to a Redis Cluster.
    #[must_use]
    pub fn is_cluster(&self) -> bool {
        self.inner.cluster
    }

    /// Whether the change subscription is up right now. While it is down,
    /// waiters still finish, by polling.
    #[must_use]
    pub fn is_listening(&self) -> bool {
        self.inner.listening.load(Ordering::Acquire)
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

    /// Runs one script within the time-out.
    async fn eval(&self, invocation: ScriptInvocation<'_>) -> Result<Value, StoreError> {
        let timeout = self.inner.timeout;
        match tokio::time::timeout(timeout, self.inner.conn.invoke(&invocation)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(store_error(e, timeout)),
            Err(_) => Err(StoreError::Timeout(timeout)),
        }
    }

    /// Runs a fenced script answering 1 (held) or 0 (lost).
    async fn fenced(&self, invocation: ScriptInvocation<'_>) -> Result<Fence, StoreError> {
        match self.eval(invocation).await? {
            Value::Int(1) => Ok(Fence::Held),
            Value::Int(0) => Ok(Fence::Lost),
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
        let mut inv = self.inner.scripts.reserve.prepare_invoke();
        inv.key(self.record_key(key))
            .arg(fingerprint.to_hex())
            .arg(token_hex(token))
            .arg(ttl_ms(lease))
            .arg(epoch_ms(SystemTime::now()));
        let mut reply = Reply::new(self.eval(inv).await?)?;
        match reply.tag()?.as_str() {
            "acquired" => Ok(Reservation::Acquired(Lease {
                token,
                duration: lease,
            })),
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
        let mut inv = self.inner.scripts.complete.prepare_invoke();
        inv.key(self.record_key(key))
            .arg(token_hex(token))
            .arg(ttl_ms(retention))
            .arg(record.fingerprint.to_hex())
            .arg(response.status)
            .arg(encode_headers(&response.headers))
            .arg(response.body.as_ref())
            .arg(epoch_ms(record.completed_at))
            .arg(epoch_ms(record.expires_at))
            .arg(&self.inner.channel)
            .arg(key.as_str());
        self.fenced(inv).await
    }

    async fn release(&self, key: &StoreKey, token: Token) -> Result<Fence, StoreError> {
        let mut inv = self.inner.scripts.release.prepare_invoke();
        inv.key(self.record_key(key))
            .arg(token_hex(token))
            .arg(&self.inner.channel)
            .arg(key.as_str());
        self.fenced(inv).await
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        let mut inv = self.inner.scripts.extend.prepare_invoke();
        inv.key(self.record_key(key))
            .arg(token_hex(token))
            .arg(ttl_ms(lease));
        self.fenced(inv).await
    }

    async fn get(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        let mut inv = self.inner.scripts.get.prepare_invoke();
        inv.key(self.record_key(key));
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
        let mut inv = self.inner.scripts.purge.prepare_invoke();
        inv.key(self.record_key(key))
            .arg(&self.inner.channel)
            .arg(key.as_str());
        match self.eval(inv).await? {
            Value::Int(n) => Ok(n > 0),
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
}

/// The background subscriber: ONE pub/sub connection per store.
struct Subscriber {
    /// Nodes to subscribe through, tried in turn (one for standalone Redis;
    /// every given node for a Cluster, where PUBLISH reaches all of them).
    nodes: Vec<Client>,
    channel: String,
    notifier: Notifier,
    timeout: Duration,
    /// Up while subscribed (see [`RedisStore::is_listening`]).
    listening: Arc<AtomicBool>,
}

impl Subscriber {
    async fn run(self, ready: oneshot::Sender<()>) {
        let mut ready = Some(ready);
        let mut backoff = SUBSCRIBER_MIN_BACKOFF;
        let mut attempt = 0_usize;
        loop {
            let node = &self.nodes[attempt % self.nodes.len()];
            attempt = attempt.wrapping_add(1);
            let outcome = self.listen(node, &mut ready).await;
            self.listening.store(false, Ordering::Release);
            match outcome {
                Ok(()) => {
                    tracing::warn!(channel = %self.channel, "Redis change subscription lost; reconnecting");
                    backoff = SUBSCRIBER_MIN_BACKOFF;
                }
                Err(error) => {
                    tracing::debug!(channel = %self.channel, %error, "Redis change subscription failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(SUBSCRIBER_MAX_BACKOFF);
                }
            }
        }
    }

    /// Subscribes through `node` and feeds the notifier until the
    /// connection drops (`Ok`) or cannot be set up (`Err`).
    async fn listen(
        &self,
        node: &Client,
        ready: &mut Option<oneshot::Sender<()>>,
    ) -> Result<(), RedisError> {
        let pubsub = bounded_redis(self.timeout, node.get_async_pubsub()).await?;
        let (mut sink, mut stream) = pubsub.split();
        bounded_redis(self.timeout, sink.subscribe(&self.channel)).await?;
        self.listening.store(true, Ordering::Release);
        // Anything published while we were not subscribed is lost: wake every
        // waiter so it reads the record again.
        self.notifier.notify_all();
        if let Some(tx) = ready.take() {
            // The store may have given up waiting for us: nothing to do then.
            let _ = tx.send(());
        }
        let mut ping = tokio::time::interval(SUBSCRIBER_PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg else { return Ok(()) };
                    if !self.notifier.has_watchers() {
                        continue;
                    }
                    let key = std::str::from_utf8(msg.get_payload_bytes())
                        .ok()
                        .and_then(|s| StoreKey::from_stored(s).ok());
                    match key {
                        Some(key) => self.notifier.notify(&key),
                        None => tracing::debug!(channel = %self.channel, "ignoring a malformed change notification"),
                    }
                }
                _ = ping.tick() => {
                    // A connection that silently died (no FIN) is found here.
                    if bounded_redis(self.timeout, sink.ping::<Value>()).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
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

/// Awaits a Redis future within `timeout`, as a Redis result.
async fn bounded_redis<T>(
    timeout: Duration,
    fut: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, RedisError> {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| {
            Err(RedisError::from((
                ErrorKind::Io,
                "timed out",
                format!("no answer within {timeout:?}"),
            )))
        })
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

fn token_hex(token: Token) -> String {
    format!("{:032x}", token.as_u128())
}

/// A TTL in whole milliseconds, at least 1 (Redis deletes a key given 0).
fn ttl_ms(d: Duration) -> u64 {
    u64::try_from(d.min(MAX_TTL).as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

fn epoch_ms(t: SystemTime) -> u64 {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// Encodes headers as version byte, then per header `u32` length + name,
/// `u32` length + value (big endian).
fn encode_headers(headers: &[(String, Bytes)]) -> Vec<u8> {
    let size = headers
        .iter()
        .map(|(n, v)| 8 + n.len() + v.len())
        .sum::<usize>();
    let mut out = Vec::with_capacity(1 + size);
    out.push(HEADERS_V1);
    for (name, value) in headers {
        for part in [name.as_bytes(), value.as_ref()] {
            // Header names and values are far below 4 GiB (HTTP limits them
            // to kilobytes); saturating keeps the encoder total anyway.
            let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(part);
        }
    }
    out
}

fn decode_headers(bytes: &[u8]) -> Result<Vec<(String, Bytes)>, StoreError> {
    let corrupt = |why: &str| StoreError::Corrupt(format!("stored headers: {why}").into());
    let Some((&version, mut rest)) = bytes.split_first() else {
        return Err(corrupt("empty"));
    };
    if version != HEADERS_V1 {
        return Err(corrupt("unknown format version"));
    }
    let take = |rest: &mut &[u8]| -> Result<Vec<u8>, StoreError> {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| corrupt("truncated length"))?;
        let len = usize::try_from(u32::from_be_bytes(*len)).map_err(|_| corrupt("length"))?;
        if tail.len() < len {
            return Err(corrupt("truncated field"));
        }
        let (field, tail) = tail.split_at(len);
        *rest = tail;
        Ok(field.to_vec())
    };
    let mut headers = Vec::new();
    while !rest.is_empty() {
        let name = String::from_utf8(take(&mut rest)?).map_err(|_| corrupt("name not UTF-8"))?;
        let value = Bytes::from(take(&mut rest)?);
        headers.push((name, value));
    }
    Ok(headers)
}

/// A script's array reply, read field by field.
struct Reply(std::vec::IntoIter<Value>);

impl Reply {
    fn new(v: Value) -> Result<Self, StoreError> {
        match v {
            Value::Array(items) => Ok(Self(items.into_iter())),
            other => Err(StoreError::Corrupt(
                format!("expected an array from a script, got {other:?}").into(),
            )),
        }
    }

    fn bytes(&mut self, what: &str) -> Result<Vec<u8>, StoreError> {
        match self.0.next() {
            Some(Value::BulkString(b)) => Ok(b),
            Some(Value::SimpleString(s)) => Ok(s.into_bytes()),
            other => Err(StoreError::Corrupt(
                format!("{what}: expected a string, got {other:?}").into(),
            )),
        }
    }

    fn text(&mut self, what: &str) -> Result<String, StoreError> {
        String::from_utf8(self.bytes(what)?)
            .map_err(|_| StoreError::Corrupt(format!("{what}: not UTF-8").into()))
    }

    fn tag(&mut self) -> Result<String, StoreError> {
        self.text("reply tag")
    }

    fn number<T: std::str::FromStr>(&mut self, what: &str) -> Result<T, StoreError> {
        self.text(what)?
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("{what}: not a number").into()))
    }

    fn time(&mut self, what: &str) -> Result<SystemTime, StoreError> {
        Ok(UNIX_EPOCH + Duration::from_millis(self.number(what)?))
    }

    fn fingerprint(&mut self) -> Result<Fingerprint, StoreError> {
        Fingerprint::from_hex(&self.text("fingerprint")?)
            .ok_or_else(|| StoreError::Corrupt("fingerprint: not 64 hex digits".into()))
    }

    /// A lease's remaining time from `PTTL`; a record without TTL would hold
    /// its key forever, so it is corrupt.
    fn pttl(&mut self) -> Result<Duration, StoreError> {
        match self.0.next() {
            Some(Value::Int(ms)) if ms >= 0 => Ok(Duration::from_millis(ms.unsigned_abs())),
            // -2: expired between the read and PTTL (cannot happen inside one
            // script, but zero is the truthful answer).
            Some(Value::Int(-2)) => Ok(Duration::ZERO),
            other => Err(StoreError::Corrupt(
                format!("in-flight record without a lease (PTTL {other:?})").into(),
            )),
        }
    }

    /// `fp, status, headers, body, completed_at, expires_at`.
    fn completed(&mut self) -> Result<CompletedRecord, StoreError> {
        let fingerprint = self.fingerprint()?;
        let status = self.number("status")?;
        let headers = decode_headers(&self.bytes("headers")?)?;
        let body = Bytes::from(self.bytes("body")?);
        Ok(CompletedRecord {
            fingerprint,
            response: StoredResponse {
                status,
                headers,
                body,
            },
            completed_at: self.time("completed_at")?,
            expires_at: self.time("expires_at")?,
        })
    }

    /// An unknown tag, or the script's own `corrupt` answer.
    fn unexpected(&mut self, tag: &str) -> StoreError {
        if tag == "corrupt" {
            let why = self.text("reason").unwrap_or_default();
            StoreError::Corrupt(why.into())
        } else {
            StoreError::Corrupt(format!("unexpected reply tag {tag:?}").into())
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let headers = vec![
            ("content-type".to_owned(), Bytes::from_static(b"text/plain")),
            ("set-cookie".to_owned(), Bytes::from_static(b"a=1")),
            ("set-cookie".to_owned(), Bytes::from_static(b"")),
            ("x-bin".to_owned(), Bytes::from_static(b"\x00\xff\r\n")),
        ];
        assert_eq!(decode_headers(&encode_headers(&headers)).unwrap(), headers);
        assert_eq!(decode_headers(&encode_headers(&[])).unwrap(), vec![]);
    }

    #[test]
    fn bad_headers_are_corrupt() {
        let good = encode_headers(&[("a".to_owned(), Bytes::from_static(b"b"))]);
        for bad in [
            &[][..],
            &[2][..],
            &good[..good.len() - 1],
            &good[..3],
            &[1, 0, 0, 0, 1, 0xff, 0, 0, 0, 0][..],
        ] {
            assert!(
                matches!(decode_headers(bad), Err(StoreError::Corrupt(_))),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn ttls_are_whole_positive_milliseconds() {
        assert_eq!(ttl_ms(Duration::ZERO), 1);
        assert_eq!(ttl_ms(Duration::from_micros(1500)), 1);
        assert_eq!(ttl_ms(Duration::from_secs(30)), 30_000);
        assert_eq!(ttl_ms(Duration::MAX), 1 << 46);
    }

    #[test]
    fn tokens_are_fixed_width_hex() {
        assert_eq!(token_hex(Token::from_u128(0)), "0".repeat(32));
        assert_eq!(token_hex(Token::from_u128(u128::MAX)), "f".repeat(32));
        assert_eq!(token_hex(Token::from_u128(0xab)).len(), 32);
    }

    #[test]
    fn script_replies_decode() {
        let fp = Fingerprint::of_bytes(b"x");
        let bulk = |s: &[u8]| Value::BulkString(s.to_vec());
        let mut r = Reply::new(Value::Array(vec![
            bulk(b"completed"),
            bulk(fp.to_hex().as_bytes()),
            bulk(b"201"),
            bulk(&encode_headers(&[])),
            bulk(b"\x00body"),
            bulk(b"1000"),
            bulk(b"2000"),
        ]))
        .unwrap();
        assert_eq!(r.tag().unwrap(), "completed");
        let c = r.completed().unwrap();
        assert_eq!(c.fingerprint, fp);
        assert_eq!(c.response.status, 201);
        assert_eq!(c.response.body, Bytes::from_static(b"\x00body"));
        assert_eq!(c.completed_at, UNIX_EPOCH + Duration::from_secs(1));
        assert_eq!(c.expires_at, UNIX_EPOCH + Duration::from_secs(2));

        let mut r = Reply::new(Value::Array(vec![bulk(b"corrupt"), bulk(b"why")])).unwrap();
        let tag = r.tag().unwrap();
        assert!(matches!(r.unexpected(&tag), StoreError::Corrupt(w) if w == "why"));
        assert!(Reply::new(Value::Int(1)).is_err());
        let mut r = Reply::new(Value::Array(vec![Value::Int(-1)])).unwrap();
        assert!(r.pttl().is_err());
    }
}
