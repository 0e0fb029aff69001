//! A RabbitMQ consumer that carries two kinds of messages into PostgreSQL
//! through idem's transactional API (protocol §7, §13):
//!
//! - **"charge order"**: idempotent by its order key. The charge row and
//!   idem's record of the key commit in ONE transaction
//!   ([`PostgresStore::transaction`]), so however often the broker
//!   redelivers the message (a consumer crashed before its ack, the
//!   publisher sent it twice), the order is charged once and every
//!   delivery is acked.
//! - **"subscription changed"**: guarded by version. The subscription's new
//!   state and its version commit in ONE transaction
//!   ([`PostgresStore::transaction_if_newer`]); a change older than the
//!   subscription's current version is stale and dropped, so a late
//!   "renew" (v1) cannot undo a "cancel" (v2).
//!
//! Failures are classified: a **permanent** one (a malformed or invalid
//! message) is rejected at once to the dead-letter queue `<queue>.dead`; a
//! **transient** one is retried by re-publishing the message with its
//! attempt count (`x-attempt`) and acking the original, up to
//! [`Settings::max_attempts`], and then dead-lettered too: nothing is
//! retried forever.
//!
//! The delivery loop is [`consume`]; `src/main.rs` runs it, and
//! `tests/redelivery.rs` runs two of them against a real broker and kills
//! one half-way.

use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt;
use idem::apply::{Applied, ApplyError};
use idem::store::postgres::{sqlx, PostgresStore};
use idem::store::StoreError;
use idem::{Fingerprint, OnceError, Rules, Scope, StoreKey, Version};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use serde::{Deserialize, Serialize};

/// The header carrying a message's attempt number (1 on first publish).
pub const ATTEMPT_HEADER: &str = "x-attempt";

/// A message on the queue (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Charge an order, once.
    ChargeOrder {
        /// The order: its key makes the charge idempotent.
        order_id: String,
        /// How much, in cents (must be positive).
        amount_cents: i64,
        /// For demonstrations and tests: fail this way instead.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fail: Option<Fail>,
    },
    /// A subscription changed state; `version` orders the changes.
    SubscriptionChanged {
        /// The subscription (the entity whose versions are compared).
        subscription_id: String,
        /// The change's version: higher is newer.
        version: u64,
        /// The new state (`active`, `cancelled`, …).
        state: String,
    },
}

/// A simulated failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fail {
    /// Fails every time as if the payment provider were down.
    Transient,
    /// Fails as a message that can never succeed.
    Permanent,
}

/// What handling a message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// The order was charged now.
    Charged,
    /// The order had been charged before: the stored answer was replayed.
    AlreadyCharged,
    /// The subscription change was applied.
    Applied,
    /// The subscription change was older than the current version: dropped.
    Stale,
}

/// Why a message was not handled.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// Worth another attempt later (the store or the database failed, or a
    /// duplicate is still running).
    #[error("transient: {0}")]
    Transient(String),
    /// Can never succeed: dead-letter it.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl HandleError {
    fn store(e: StoreError) -> Self {
        if e.is_transient() {
            Self::Transient(e.to_string())
        } else {
            Self::Permanent(e.to_string())
        }
    }
}

/// The business side: the tables and the two handlers.
#[derive(Debug, Clone)]
pub struct Shop {
    store: PostgresStore,
    scope: Scope,
}

impl Shop {
    /// A shop whose tables live in the store's schema, next to idem's.
    /// Creates them if absent.
    ///
    /// # Errors
    ///
    /// When the database refuses the DDL.
    pub async fn open(store: PostgresStore) -> Result<Self, sqlx::Error> {
        let schema = store.schema().to_owned();
        sqlx::raw_sql(&format!(
            "CREATE TABLE IF NOT EXISTS \"{schema}\".charges (
                 id           bigserial PRIMARY KEY,
                 order_id     text NOT NULL,
                 amount_cents bigint NOT NULL,
                 charged_at   timestamptz NOT NULL DEFAULT now());
             CREATE TABLE IF NOT EXISTS \"{schema}\".subscriptions (
                 id      text PRIMARY KEY,
                 state   text NOT NULL,
                 version bigint NOT NULL)"
        ))
        .execute(store.pool())
        .await?;
        Ok(Self {
            store,
            scope: Scope::named("queue-consumer"),
        })
    }

    /// The store.
    #[must_use]
    pub fn store(&self) -> &PostgresStore {
        &self.store
    }

    /// Handles one message. `raw` is its body as delivered (the charge's
    /// fingerprint: the same key with another body is refused).
    ///
    /// # Errors
    ///
    /// See [`HandleError`].
    pub async fn handle(&self, message: &Message, raw: &[u8]) -> Result<Handled, HandleError> {
        match message {
            Message::ChargeOrder {
                order_id,
                amount_cents,
                fail,
            } => self.charge(order_id, *amount_cents, *fail, raw).await,
            Message::SubscriptionChanged {
                subscription_id,
                version,
                state,
            } => self.change(subscription_id, *version, state).await,
        }
    }

    async fn charge(
        &self,
        order_id: &str,
        amount_cents: i64,
        fail: Option<Fail>,
        raw: &[u8],
    ) -> Result<Handled, HandleError> {
        if amount_cents <= 0 {
            return Err(HandleError::Permanent(format!(
                "order {order_id}: amount {amount_cents} is not positive"
            )));
        }
        let key = StoreKey::new(&self.scope, &format!("charge:{order_id}"));
        let schema = self.store.schema().to_owned();
        let order = order_id.to_owned();
        let charged = self
            .store
            .transaction(&key, Fingerprint::of_bytes(raw), &Rules::wait(), |tx| {
                Box::pin(async move {
                    match fail {
                        Some(Fail::Transient) => return Err(Failure::Transient),
                        Some(Fail::Permanent) => return Err(Failure::Permanent),
                        None => {}
                    }
                    let (id,): (i64,) = sqlx::query_as(&format!(
                        "INSERT INTO \"{schema}\".charges (order_id, amount_cents) \
                         VALUES ($1, $2) RETURNING id"
                    ))
                    .bind(&order)
                    .bind(amount_cents)
                    .fetch_one(&mut **tx)
                    .await
                    .map_err(Failure::Db)?;
                    Ok(id)
                })
            })
            .await;
        match charged {
            Ok(once) if once.replayed => Ok(Handled::AlreadyCharged),
            Ok(_) => Ok(Handled::Charged),
            Err(OnceError::Failed(Failure::Permanent)) => Err(HandleError::Permanent(format!(
                "order {order_id}: the payment was declined"
            ))),
            Err(OnceError::Failed(Failure::Transient)) => Err(HandleError::Transient(format!(
                "order {order_id}: the payment provider is unavailable"
            ))),
            Err(OnceError::Failed(Failure::Db(e))) => Err(HandleError::Transient(e.to_string())),
            Err(OnceError::Mismatch) => Err(HandleError::Permanent(format!(
                "order {order_id}: a different charge message was seen under this order"
            ))),
            Err(OnceError::Store(e)) => Err(HandleError::store(e)),
            Err(e) => Err(HandleError::Transient(e.to_string())),
        }
    }

    async fn change(
        &self,
        subscription_id: &str,
        version: u64,
        state: &str,
    ) -> Result<Handled, HandleError> {
        let entity = StoreKey::new(&self.scope, &format!("subscription:{subscription_id}"));
        let schema = self.store.schema().to_owned();
        let (id, state) = (subscription_id.to_owned(), state.to_owned());
        let stored_version = i64::try_from(version).map_err(|_| {
            HandleError::Permanent(format!("version {version} is too large for this shop"))
        })?;
        let applied = self
            .store
            .transaction_if_newer(&entity, Version::Number(version), &Rules::wait(), |tx| {
                Box::pin(async move {
                    sqlx::query(&format!(
                        "INSERT INTO \"{schema}\".subscriptions (id, state, version) \
                         VALUES ($1, $2, $3) \
                         ON CONFLICT (id) DO UPDATE SET state = $2, version = $3"
                    ))
                    .bind(&id)
                    .bind(&state)
                    .bind(stored_version)
                    .execute(&mut **tx)
                    .await
                    .map(drop)
                })
            })
            .await;
        match applied {
            Ok(Applied::Applied(())) => Ok(Handled::Applied),
            Ok(Applied::Stale { .. }) => Ok(Handled::Stale),
            Err(ApplyError::Failed(e)) => Err(HandleError::Transient(e.to_string())),
            Err(ApplyError::Mixed { current }) => Err(HandleError::Permanent(format!(
                "subscription {subscription_id}: versions are {}",
                current.kind()
            ))),
            Err(ApplyError::Store(e)) => Err(HandleError::store(e)),
            Err(e) => Err(HandleError::Transient(e.to_string())),
        }
    }
}

/// Why a charge's transaction rolled back.
enum Failure {
    Transient,
    Permanent,
    Db(sqlx::Error),
}

/// What a consumer counts (for logs, metrics and the tests).
#[derive(Debug, Default)]
pub struct Stats {
    /// Deliveries received.
    pub delivered: AtomicU64,
    /// Of those, deliveries the broker flagged as redelivered.
    pub redelivered: AtomicU64,
    /// Deliveries acked (handled, or handed on as a retry).
    pub acked: AtomicU64,
    /// Orders charged by this consumer.
    pub charged: AtomicU64,
    /// Charges found already done (replayed).
    pub already_charged: AtomicU64,
    /// Subscription changes applied.
    pub applied: AtomicU64,
    /// Subscription changes dropped as stale.
    pub stale: AtomicU64,
    /// Transient failures re-published for another attempt.
    pub retried: AtomicU64,
    /// Messages rejected to the dead-letter queue.
    pub dead_lettered: AtomicU64,
}

impl Stats {
    /// A counter's value.
    #[must_use]
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::SeqCst)
    }

    fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

/// How a consumer runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The queue to consume.
    pub queue: String,
    /// Unacked deliveries the broker sends ahead (`basic.qos`).
    pub prefetch: u16,
    /// Attempts of a transiently failing message before it is dead-lettered
    /// (the first included).
    pub max_attempts: u32,
}

/// The dead-letter queue of `queue`.
#[must_use]
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

/// Declares `queue` (durable) and its dead-letter queue: a message the
/// consumer rejects goes there through the default exchange.
///
/// # Errors
///
/// When the broker refuses.
pub async fn declare(channel: &Channel, queue: &str) -> Result<(), lapin::Error> {
    let dead = dead_letter_queue(queue);
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(dead.as_str().into(), durable, FieldTable::default())
        .await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(dead.as_str().into()),
    );
    channel.queue_declare(queue.into(), durable, args).await?;
    Ok(())
}

/// Publishes `message` to `queue` (attempt 1), persistent, and waits for the
/// broker's confirmation when the channel is in confirm mode.
///
/// # Errors
///
/// When the message cannot be encoded or the broker refuses it.
pub async fn publish(
    channel: &Channel,
    queue: &str,
    message: &Message,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let body = serde_json::to_vec(message)?;
    publish_raw(channel, queue, &body, 1).await?;
    Ok(())
}

async fn publish_raw(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    attempt: u32,
) -> Result<(), lapin::Error> {
    let mut headers = FieldTable::default();
    headers.insert(ATTEMPT_HEADER.into(), AMQPValue::LongUInt(attempt));
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_headers(headers);
    channel
        .basic_publish(
            ShortString::from(""),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await?
        .await?;
    Ok(())
}

fn attempt_of(properties: &BasicProperties) -> u32 {
    properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(ATTEMPT_HEADER).cloned())
        .and_then(|v| match v {
            AMQPValue::LongUInt(n) => Some(n),
            AMQPValue::LongInt(n) => u32::try_from(n).ok(),
            AMQPValue::LongLongInt(n) => u32::try_from(n).ok(),
            _ => None,
        })
        .unwrap_or(1)
        .max(1)
}

/// Consumes `settings.queue` on `channel` until the channel closes: each
/// delivery is handled, then acked, retried or dead-lettered (see the
/// crate docs). `tag` names the consumer.
///
/// # Errors
///
/// When the broker refuses the consumer or an ack (the unacked deliveries
/// then go back to the queue, marked redelivered).
pub async fn consume(
    channel: &Channel,
    tag: &str,
    settings: &Settings,
    shop: &Shop,
    stats: &Stats,
) -> Result<(), lapin::Error> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .basic_qos(settings.prefetch, BasicQosOptions::default())
        .await?;
    let mut deliveries = channel
        .basic_consume(
            settings.queue.as_str().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    while let Some(delivery) = deliveries.next().await {
        let delivery = delivery?;
        Stats::inc(&stats.delivered);
        if delivery.redelivered {
            Stats::inc(&stats.redelivered);
        }
        let attempt = attempt_of(&delivery.properties);
        let outcome = match serde_json::from_slice::<Message>(&delivery.data) {
            Ok(message) => shop.handle(&message, &delivery.data).await,
            Err(e) => Err(HandleError::Permanent(format!("not a message: {e}"))),
        };
        match outcome {
            Ok(handled) => {
                Stats::inc(match handled {
                    Handled::Charged => &stats.charged,
                    Handled::AlreadyCharged => &stats.already_charged,
                    Handled::Applied => &stats.applied,
                    Handled::Stale => &stats.stale,
                });
                delivery.ack(BasicAckOptions::default()).await?;
                Stats::inc(&stats.acked);
            }
            Err(HandleError::Transient(reason)) if attempt < settings.max_attempts => {
                tracing::info!(consumer = tag, attempt, %reason, "transient failure; retrying later");
                // Publish the next attempt (confirmed) BEFORE acking this
                // one: a crash in between delivers it twice, never zero
                // times, and the handlers are idempotent.
                publish_raw(channel, &settings.queue, &delivery.data, attempt + 1).await?;
                delivery.ack(BasicAckOptions::default()).await?;
                Stats::inc(&stats.retried);
                Stats::inc(&stats.acked);
            }
            Err(e) => {
                tracing::warn!(consumer = tag, attempt, error = %e, "dead-lettering the message");
                delivery
                    .reject(BasicRejectOptions { requeue: false })
                    .await?;
                Stats::inc(&stats.dead_lettered);
            }
        }
    }
    Ok(())
}
