//! The store's ONE pub/sub connection, which feeds its [`Notifier`] (see
//! "Notifications" in the [module docs](super)).
//!
//! [`Subscriber`] knows how to subscribe to the change channel and read it;
//! reconnecting with backoff and waking every waiter after a loss is the
//! shared [`background::listen`](crate::store::background::listen) loop.

use std::future::Future;
use std::time::Duration;

use ::redis::aio::{PubSubSink, PubSubStream};
use ::redis::{Client, ErrorKind, RedisError, Value};
use futures_util::StreamExt;

use crate::key::StoreKey;
use crate::store::background::{Backoff, ChangeFeed};
use crate::store::Notifier;

/// How often the subscriber connection is checked with a PING.
const PING_EVERY: Duration = Duration::from_secs(5);
/// Backoff between failed subscription attempts.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The pauses between failed subscription attempts.
pub(super) fn backoff() -> Backoff {
    Backoff::new(MIN_BACKOFF, MAX_BACKOFF)
}

/// Subscribes to `{prefix}changed` through one of `nodes`.
pub(super) struct Subscriber {
    /// Nodes to subscribe through, tried in turn (one for standalone Redis;
    /// every given node for a Cluster, where PUBLISH reaches all of them).
    /// Never empty. Only these seeds: nodes added to a Cluster later are
    /// not learnt (see "Redis Cluster" in the module docs).
    nodes: Vec<Client>,
    channel: String,
    /// Bounds each step of subscribing and each PING.
    timeout: Duration,
    /// Attempts so far, to pick the next node.
    attempt: usize,
}

impl Subscriber {
    /// A subscriber through `nodes` (at least one), on `channel`.
    pub(super) fn new(nodes: Vec<Client>, channel: String, timeout: Duration) -> Self {
        Self {
            nodes,
            channel,
            timeout,
            attempt: 0,
        }
    }
}

impl ChangeFeed for Subscriber {
    type Conn = (PubSubSink, PubSubStream);
    type Error = RedisError;
    const BACKEND: &'static str = "Redis";

    fn channel(&self) -> &str {
        &self.channel
    }

    async fn subscribe(&mut self) -> Result<Self::Conn, RedisError> {
        let Some(node) = self.nodes.get(self.attempt % self.nodes.len().max(1)) else {
            return Err(RedisError::from((
                ErrorKind::Client,
                "no Redis node to subscribe through",
            )));
        };
        self.attempt = self.attempt.wrapping_add(1);
        let pubsub = bounded_redis(self.timeout, node.get_async_pubsub()).await?;
        let (mut sink, stream) = pubsub.split();
        bounded_redis(self.timeout, sink.subscribe(&self.channel)).await?;
        Ok((sink, stream))
    }

    /// Feeds the notifier until the connection drops (`Ok`) or stops
    /// answering PINGs (`Err`).
    async fn forward(
        &mut self,
        (mut sink, mut stream): Self::Conn,
        notifier: &Notifier,
    ) -> Result<(), RedisError> {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg else { return Ok(()) };
                    if !notifier.has_watchers() {
                        continue;
                    }
                    let key = std::str::from_utf8(msg.get_payload_bytes())
                        .ok()
                        .and_then(|s| StoreKey::from_stored(s).ok());
                    match key {
                        Some(key) => notifier.notify(&key),
                        None => tracing::debug!(channel = %self.channel, "ignoring a malformed change notification"),
                    }
                }
                _ = ping.tick() => {
                    // A connection that silently died (no FIN) is found here.
                    bounded_redis(self.timeout, sink.ping::<Value>()).await?;
                }
            }
        }
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
