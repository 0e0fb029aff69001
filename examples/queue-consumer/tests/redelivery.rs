//! The queue consumer against a real RabbitMQ and PostgreSQL
//! (`IDEM_TEST_AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`;
//! `IDEM_TEST_DATABASE_URL`): skipped loudly when either is unreachable,
//! failed under `IDEM_REQUIRE_SERVICES=1`. Each test uses queues and a
//! schema of its own, deleted at its end.

#[path = "../../../idem/tests/conformance/services.rs"]
mod services;

use std::sync::Arc;
use std::time::Duration;

use idem::store::postgres::{sqlx, PostgresStore};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use queue_consumer::{
    consume, dead_letter_queue, declare, publish, Fail, Message, Settings, Shop, Stats,
};

fn amqp_url() -> String {
    std::env::var("IDEM_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A run of one test: its broker connection, queue, store and shop.
struct Run {
    id: String,
    publisher: Connection,
    channel: Channel,
    queue: String,
    shop: Shop,
}

impl Run {
    async fn start() -> Option<Self> {
        let id = format!("{:016x}", rand::random::<u64>());
        let url = amqp_url();
        let publisher = match Connection::connect(&url, ConnectionProperties::default()).await {
            Ok(c) => c,
            Err(e) => return services::unavailable("RabbitMQ", &url, &e),
        };
        let db = services::database_url();
        let store = match PostgresStore::builder(&db)
            .schema(format!("idem_q{id}"))
            .max_connections(8)
            .timeout(Duration::from_secs(10))
            .connect()
            .await
        {
            Ok(s) => s,
            Err(e) => return services::unavailable("PostgreSQL", &db, &e),
        };
        let shop = Shop::open(store).await.expect("business tables");
        let channel = publisher.create_channel().await.expect("channel");
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        let queue = format!("idem-test-{id}");
        declare(&channel, &queue).await.expect("declare queues");
        Some(Self {
            id,
            publisher,
            channel,
            queue,
            shop,
        })
    }

    fn settings(&self, prefetch: u16) -> Settings {
        Settings {
            queue: self.queue.clone(),
            prefetch,
            max_attempts: 3,
        }
    }

    async fn publish(&self, m: &Message) {
        publish(&self.channel, &self.queue, m)
            .await
            .expect("publish");
    }

    /// A consumer with a broker connection and a database pool of its own
    /// (as a separate process would have), running until its connection is
    /// closed.
    async fn consumer(&self, tag: &str, prefetch: u16) -> Consumer {
        let store = PostgresStore::builder(services::database_url())
            .schema(self.shop.store().schema())
            .max_connections(4)
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .expect("consumer's store");
        let shop = Shop::open(store).await.expect("business tables");
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("consumer connection");
        let channel = connection.create_channel().await.expect("channel");
        let stats = Arc::new(Stats::default());
        let (settings, tag) = (self.settings(prefetch), tag.to_owned());
        let pool = shop.store().pool().clone();
        let task = {
            let stats = Arc::clone(&stats);
            tokio::spawn(async move {
                if let Err(e) = consume(&channel, &tag, &settings, &shop, &stats).await {
                    eprintln!("consumer {tag} stopped: {e}");
                }
            })
        };
        Consumer {
            connection,
            pool,
            stats,
            task,
        }
    }

    async fn messages_in(&self, queue: &str) -> u32 {
        let q = self
            .channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        q.message_count()
    }

    async fn scalar(&self, sql: &str) -> i64 {
        let sql = sql.replace("{schema}", &format!("\"{}\"", self.shop.store().schema()));
        let (n,): (i64,) = sqlx::query_as(&sql)
            .fetch_one(self.shop.store().pool())
            .await
            .expect("query");
        n
    }

    async fn finish(self) {
        for q in [dead_letter_queue(&self.queue), self.queue.clone()] {
            let _ = self
                .channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = self.publisher.close(200, "done".into()).await;
        let drop = format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.shop.store().schema()
        );
        let _ = sqlx::raw_sql(&drop).execute(self.shop.store().pool()).await;
        let _ = self.id;
    }
}

struct Consumer {
    connection: Connection,
    pool: sqlx::PgPool,
    stats: Arc<Stats>,
    task: tokio::task::JoinHandle<()>,
}

impl Consumer {
    /// Kills the consumer as a crash would: its task stops where it is,
    /// its database connections close (PostgreSQL rolls back a transaction
    /// in progress), and its broker connection closes without acking what
    /// it holds, so the broker redelivers those messages to others.
    async fn kill(self) -> Arc<Stats> {
        self.task.abort();
        let _ = self.task.await;
        self.pool.close().await;
        let _ = self.connection.close(320, "killed mid-way".into()).await;
        self.stats
    }

    async fn stop(self) -> Arc<Stats> {
        let _ = self.connection.close(200, "done".into()).await;
        let _ = self.task.await;
        self.stats
    }
}

async fn until(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + deadline;
    while !done() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn g(c: &std::sync::atomic::AtomicU64) -> u64 {
    Stats::get(c)
}

/// 200 charges, each published 3 times; two consumers, one killed with
/// unacked deliveries in hand: every order is charged exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_order_is_charged_once_when_a_consumer_dies_mid_way() {
    let Some(run) = Run::start().await else {
        return;
    };
    const ORDERS: usize = 200;
    const COPIES: usize = 3;
    for _ in 0..COPIES {
        for i in 0..ORDERS {
            run.publish(&Message::ChargeOrder {
                order_id: format!("order-{i:03}"),
                amount_cents: 100 + i64::try_from(i).unwrap_or(0),
                fail: None,
            })
            .await;
        }
    }
    let published = ORDERS * COPIES;
    // Both start on a full queue, so A is sent up to 50 deliveries ahead.
    let a = run.consumer("consumer-a", 50).await;
    let b = run.consumer("consumer-b", 20).await;
    // Kill A once it has handled a good part of its share, while the broker
    // has more of them out to it, unacked.
    let a_stats = Arc::clone(&a.stats);
    until("consumer A to get going", Duration::from_secs(60), || {
        g(&a_stats.acked) >= 60
    })
    .await;
    let a_stats = a.kill().await;
    let b_stats = Arc::clone(&b.stats);
    let acked_by_a = g(&a_stats.acked);
    // Done when the queue has nothing ready and B has handled all it was
    // given, for a whole second. (Counting acks would not do: A may die
    // after the broker got an ack and before A counted it.)
    let drained = tokio::time::timeout(Duration::from_secs(120), async {
        let mut quiet_since: Option<tokio::time::Instant> = None;
        let mut last = u64::MAX;
        loop {
            let seen = g(&b_stats.delivered);
            let idle =
                seen == last && g(&b_stats.acked) == seen && run.messages_in(&run.queue).await == 0;
            last = seen;
            match (idle, quiet_since) {
                (false, _) => quiet_since = None,
                (true, None) => quiet_since = Some(tokio::time::Instant::now()),
                (true, Some(t)) if t.elapsed() >= Duration::from_secs(1) => break,
                (true, Some(_)) => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        drained.is_ok(),
        "the queue was not drained: A acked {acked_by_a}, B {:?}",
        b_stats
    );
    let b_stats = b.stop().await;

    let rows = run.scalar("SELECT count(*) FROM {schema}.charges").await;
    let distinct = run
        .scalar("SELECT count(DISTINCT order_id) FROM {schema}.charges")
        .await;
    let worst = run
        .scalar("SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM {schema}.charges GROUP BY order_id) c")
        .await;
    let delivered = g(&a_stats.delivered) + g(&b_stats.delivered);
    let redelivered = g(&a_stats.redelivered) + g(&b_stats.redelivered);
    let charged = g(&a_stats.charged) + g(&b_stats.charged);
    let replayed = g(&a_stats.already_charged) + g(&b_stats.already_charged);
    println!(
        "redelivery: published {published}, delivered {delivered} (A {}, B {}), redelivered {redelivered}, \
         acked {} (A {acked_by_a}), charges applied {rows} (charged {charged}, replayed {replayed}), \
         orders charged {distinct}, most charges of one order {worst}",
        g(&a_stats.delivered),
        g(&b_stats.delivered),
        acked_by_a + g(&b_stats.acked),
    );
    assert_eq!(distinct, ORDERS as i64, "an order was never charged");
    assert_eq!(worst, 1, "an order was charged more than once");
    assert_eq!(rows, ORDERS as i64);
    // A may die between a charge's COMMIT and counting it: the charge is
    // in the table (and its redelivery replays), the count is not.
    assert!(
        charged <= ORDERS as u64 && charged + 1 >= ORDERS as u64,
        "{charged}"
    );
    assert!(
        redelivered > 0,
        "the kill left no unacked delivery to redeliver; nothing was proved"
    );
    // `delivered` counts deliveries that reached a handler: the ones A had
    // been sent but not yet handled when it died are not in it (they come
    // back to B, flagged redelivered).
    assert!(delivered >= published as u64);
    assert_eq!(run.messages_in(&run.queue).await, 0);
    run.finish().await;
}

/// "cancel" (v2) processed before a late "renew" (v1): the subscription
/// stays cancelled; in order, both apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_renew_does_not_undo_a_cancel() {
    let Some(run) = Run::start().await else {
        return;
    };
    let change = |id: &str, version, state: &str| Message::SubscriptionChanged {
        subscription_id: id.into(),
        version,
        state: state.into(),
    };
    for m in [
        change("sub-late", 2, "cancelled"),
        change("sub-late", 1, "active"),
        change("sub-in-order", 1, "active"),
        change("sub-in-order", 2, "cancelled"),
        // A redelivered duplicate of an applied change is stale too.
        change("sub-in-order", 2, "cancelled"),
    ] {
        run.publish(&m).await;
    }
    let c = run.consumer("subscriptions", 1).await;
    let stats = Arc::clone(&c.stats);
    until("five acks", Duration::from_secs(60), || {
        g(&stats.acked) >= 5
    })
    .await;
    let stats = c.stop().await;
    let (state, version): (String, i64) = sqlx::query_as(&format!(
        "SELECT state, version FROM \"{}\".subscriptions WHERE id = 'sub-late'",
        run.shop.store().schema()
    ))
    .fetch_one(run.shop.store().pool())
    .await
    .expect("subscription");
    assert_eq!(
        (state.as_str(), version),
        ("cancelled", 2),
        "the late renew re-activated it"
    );
    let n = run
        .scalar("SELECT count(*) FROM {schema}.subscriptions WHERE id = 'sub-in-order' AND state = 'cancelled' AND version = 2")
        .await;
    assert_eq!(n, 1);
    assert_eq!((g(&stats.applied), g(&stats.stale)), (3, 2));
    run.finish().await;
}

/// A transient failure is retried up to `max_attempts` (3), then
/// dead-lettered; a permanent one is dead-lettered at once; neither is
/// retried forever, and neither charges anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_message_is_not_retried_forever() {
    let Some(run) = Run::start().await else {
        return;
    };
    let charge = |order: &str, amount_cents, fail| Message::ChargeOrder {
        order_id: order.into(),
        amount_cents,
        fail,
    };
    for m in [
        charge("flaky", 100, Some(Fail::Transient)),
        charge("declined", 100, Some(Fail::Permanent)),
        charge("negative", -5, None),
        charge("fine", 100, None),
    ] {
        run.publish(&m).await;
    }
    let c = run.consumer("failing", 1).await;
    let stats = Arc::clone(&c.stats);
    until(
        "three dead letters and one charge",
        Duration::from_secs(60),
        || g(&stats.dead_lettered) >= 3 && g(&stats.charged) >= 1,
    )
    .await;
    // Give a wrongly requeued message time to come back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = c.stop().await;
    assert_eq!(
        g(&stats.retried),
        2,
        "the transient failure: attempts 1 and 2 retried, 3 dead-lettered"
    );
    assert_eq!(g(&stats.dead_lettered), 3);
    assert_eq!(g(&stats.delivered), 6, "1 + 3 + 1 + 1 deliveries, no more");
    assert_eq!(g(&stats.charged), 1);
    assert_eq!(run.scalar("SELECT count(*) FROM {schema}.charges").await, 1);
    assert_eq!(run.messages_in(&dead_letter_queue(&run.queue)).await, 3);
    assert_eq!(run.messages_in(&run.queue).await, 0);
    run.finish().await;
}
