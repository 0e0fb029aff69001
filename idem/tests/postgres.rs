//! PostgreSQL-specific properties, beyond the conformance suite: the
//! transactional API, notifications across instances and reconnects,
//! clean-up, time-outs, binary safety, corrupt rows, migration, and the
//! plans the guarded statements get (protocol §7's measured hazard); async
//! mode's queue in `postgres/queue.rs`.
//!
//! Each test uses its own schema (see conformance/pg.rs) and drops it at the
//! end; without a server they skip loudly (fail under IDEM_REQUIRE_SERVICES=1).
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

#[path = "postgres/batch.rs"]
mod batch;
#[path = "conformance/pg.rs"]
mod pg;
#[path = "postgres/queue.rs"]
mod queue;
#[path = "conformance/services.rs"]
mod services;
#[path = "postgres/wait.rs"]
mod wait;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use idem::policy::Concurrent;
use idem::record::Record;
use idem::store::postgres::{sqlx, PostgresStore, SchemaStatus};
use idem::store::{Fence, Reservation, Store, StoreError};
use idem::{CompletedRecord, Fingerprint, OnceError, Rules, Scope, StoreKey, StoredResponse};
use sqlx::Row as _;
use tokio::sync::Barrier;

const LEASE: Duration = Duration::from_secs(30);
const RETAIN: Duration = Duration::from_secs(3600);

fn key(name: &str) -> StoreKey {
    StoreKey::new(&Scope::named("pg-tests"), name)
}

fn fp(s: &str) -> Fingerprint {
    Fingerprint::of_bytes(s.as_bytes())
}

fn wait_rules() -> Rules {
    Rules {
        concurrent: Concurrent::Wait,
        wait_timeout: Duration::from_secs(20),
        ..Rules::default()
    }
}

async fn orders_table(store: &PostgresStore) {
    let sql = format!(
        "CREATE TABLE \"{}\".orders (id bigserial PRIMARY KEY, item text NOT NULL)",
        store.schema()
    );
    sqlx::raw_sql(&sql).execute(store.pool()).await.unwrap();
}

async fn orders(store: &PostgresStore) -> i64 {
    let sql = format!("SELECT count(*) FROM \"{}\".orders", store.schema());
    sqlx::query_scalar(&sql)
        .fetch_one(store.pool())
        .await
        .unwrap()
}

fn insert_order(schema: &str) -> String {
    format!("INSERT INTO \"{schema}\".orders (item) VALUES ($1) RETURNING id")
}

fn record(fingerprint: Fingerprint, response: StoredResponse) -> Arc<CompletedRecord> {
    let now = SystemTime::now();
    Arc::new(CompletedRecord {
        fingerprint,
        response,
        completed_at: now,
        expires_at: now + RETAIN,
    })
}

async fn acquire(
    store: &PostgresStore,
    k: &StoreKey,
    f: Fingerprint,
    lease: Duration,
) -> idem::Token {
    match store.reserve(k, f, lease).await.unwrap() {
        Reservation::Acquired(l) => l.token,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transaction_runs_once_under_50_concurrent_calls() {
    let Some(store) = pg::connect(pg::builder().max_connections(8)).await else {
        return;
    };
    orders_table(&store).await;
    let store = Arc::new(store);
    let k = key("tx-race");
    let runs = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(50));
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let (store, k, runs, barrier) = (
                Arc::clone(&store),
                k.clone(),
                Arc::clone(&runs),
                Arc::clone(&barrier),
            );
            tokio::spawn(async move {
                barrier.wait().await;
                let insert = insert_order(store.schema());
                store
                    .transaction(&k, fp("2 x tea"), &wait_rules(), |tx| {
                        Box::pin(async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            // Widen the window: the other 49 arrive meanwhile.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            let id: i64 = sqlx::query_scalar(&insert)
                                .bind(format!("tea from task {i}"))
                                .fetch_one(&mut **tx)
                                .await?;
                            Ok::<_, sqlx::Error>(id)
                        })
                    })
                    .await
            })
        })
        .collect();
    let mut values = Vec::new();
    let mut fresh = 0;
    for t in tasks {
        let once = t.await.unwrap().unwrap();
        fresh += usize::from(!once.replayed);
        values.push(once.value);
    }
    assert_eq!(
        orders(&store).await,
        1,
        "50 concurrent transactional calls with one key must create exactly one order"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the closure ran more than once"
    );
    assert_eq!(fresh, 1, "exactly one caller executes, the others replay");
    assert!(
        values.iter().all(|v| *v == values[0]),
        "different answers: {values:?}"
    );
    pg::drop_schema(&store).await;
}

#[tokio::test]
async fn transaction_error_rolls_back_business_writes_and_reservation() {
    let Some(store) = pg::store().await else {
        return;
    };
    orders_table(&store).await;
    let k = key("tx-error");
    let insert = insert_order(store.schema());
    let failed = store
        .transaction(&k, fp("a"), &wait_rules(), |tx| {
            Box::pin(async move {
                sqlx::query(&insert).bind("tea").execute(&mut **tx).await?;
                Err::<i64, _>(sqlx::Error::Protocol("the payment was declined".into()))
            })
        })
        .await;
    assert!(matches!(failed, Err(OnceError::Failed(_))), "{failed:?}");
    assert_eq!(orders(&store).await, 0, "the business write must roll back");
    assert!(
        store.get(&k).await.unwrap().is_none(),
        "the reservation must roll back too"
    );

    // A retry runs again and commits both.
    let insert = insert_order(store.schema());
    let once = store
        .transaction(&k, fp("a"), &wait_rules(), |tx| {
            Box::pin(async move {
                sqlx::query_scalar::<_, i64>(&insert)
                    .bind("tea")
                    .fetch_one(&mut **tx)
                    .await
            })
        })
        .await
        .unwrap();
    assert!(!once.replayed);
    assert_eq!(orders(&store).await, 1);
    assert!(matches!(
        store.get(&k).await.unwrap(),
        Some(Record::Completed(_))
    ));
    pg::drop_schema(&store).await;
}

#[tokio::test]
async fn transaction_replay_returns_the_stored_value_without_running() {
    let Some(store) = pg::store().await else {
        return;
    };
    let k = key("tx-replay");
    let first = store
        .transaction(&k, fp("a"), &Rules::default(), |tx| {
            Box::pin(async move {
                // The closure runs under the database's settings, not the
                // bounds the store put on its reserve.
                let lock: String = sqlx::query_scalar("SHOW lock_timeout")
                    .fetch_one(&mut **tx)
                    .await?;
                let statement: String = sqlx::query_scalar("SHOW statement_timeout")
                    .fetch_one(&mut **tx)
                    .await?;
                assert_eq!((lock.as_str(), statement.as_str()), ("0", "0"));
                Ok::<_, sqlx::Error>(vec!["order-7".to_owned()])
            })
        })
        .await
        .unwrap();
    assert!(!first.replayed);
    let ran = Arc::new(AtomicUsize::new(0));
    let ran2 = Arc::clone(&ran);
    let again = store
        .transaction(&k, fp("a"), &Rules::default(), move |_tx| {
            Box::pin(async move {
                ran2.fetch_add(1, Ordering::SeqCst);
                Ok::<_, sqlx::Error>(vec!["order-8".to_owned()])
            })
        })
        .await
        .unwrap();
    assert_eq!(
        ran.load(Ordering::SeqCst),
        0,
        "a replay must not run the closure"
    );
    assert!(again.replayed);
    assert_eq!(again.value, first.value);

    let other = store
        .transaction(&k, fp("b"), &Rules::default(), |_tx| {
            Box::pin(async { Ok::<_, sqlx::Error>(vec![String::new()]) })
        })
        .await;
    assert!(matches!(other, Err(OnceError::Mismatch)), "{other:?}");
    pg::drop_schema(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_duplicates_reject_or_wait() {
    let Some(store) = pg::store().await else {
        return;
    };
    let store = Arc::new(store);
    let k = key("tx-hold");
    let (entered_tx, entered) = tokio::sync::oneshot::channel();
    let (go_tx, go) = tokio::sync::oneshot::channel::<()>();
    let first = {
        let (store, k) = (Arc::clone(&store), k.clone());
        tokio::spawn(async move {
            store
                .transaction(&k, fp("a"), &Rules::default(), |_tx| {
                    Box::pin(async move {
                        let _ = entered_tx.send(());
                        let _ = go.await;
                        Ok::<_, std::io::Error>(1_u32)
                    })
                })
                .await
        })
    };
    entered.await.unwrap();
    // reject: the row lock is held by an open transaction → InProgress.
    let rules = Rules {
        concurrent: Concurrent::Reject,
        ..Rules::default()
    };
    let rejected = store
        .transaction(&k, fp("a"), &rules, |_tx| {
            Box::pin(async { Ok::<_, std::io::Error>(2_u32) })
        })
        .await;
    assert!(
        matches!(rejected, Err(OnceError::InProgress { retry_after }) if retry_after >= Duration::from_secs(1)),
        "{rejected:?}"
    );
    // The uncommitted reservation is invisible to readers.
    assert!(store.get(&k).await.unwrap().is_none());
    // wait: waits until the first commits (not on its row lock: see
    // postgres/wait.rs), then replays its value.
    let waiter = {
        let (store, k) = (Arc::clone(&store), k.clone());
        tokio::spawn(async move {
            store
                .transaction(&k, fp("a"), &wait_rules(), |_tx| {
                    Box::pin(async { Ok::<_, std::io::Error>(3_u32) })
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiter.is_finished(),
        "the duplicate should wait for the first transaction"
    );
    go_tx.send(()).unwrap();
    assert_eq!(first.await.unwrap().unwrap().value, 1);
    let waited = waiter.await.unwrap().unwrap();
    assert_eq!((waited.value, waited.replayed), (1, true));
    pg::drop_schema(&store).await;
}

#[tokio::test]
async fn transaction_meets_a_non_transactional_holder() {
    let Some(store) = pg::store().await else {
        return;
    };
    let k = key("tx-vs-engine");
    acquire(&store, &k, fp("a"), LEASE).await;
    let r = store
        .transaction(&k, fp("a"), &wait_rules(), |_tx| {
            Box::pin(async { Ok::<_, std::io::Error>(1_u8) })
        })
        .await;
    assert!(
        matches!(r, Err(OnceError::InProgress { retry_after }) if retry_after > Duration::from_secs(20)),
        "{r:?}"
    );
    pg::drop_schema(&store).await;
}

#[tokio::test]
async fn responses_are_binary_safe() {
    let Some(store) = pg::store().await else {
        return;
    };
    let k = key("binary");
    let all_bytes: Vec<u8> = (0..=255).collect();
    let response = StoredResponse {
        status: 599,
        headers: vec![
            ("x-raw".into(), Bytes::from(vec![0, 0xff, b'\n', 0x80])),
            ("x-empty".into(), Bytes::new()),
            ("x-raw".into(), Bytes::from_static(b"second")),
        ],
        body: Bytes::from(all_bytes),
    };
    let t = acquire(&store, &k, fp("a"), LEASE).await;
    let rec = record(fp("a"), response.clone());
    assert_eq!(
        store.complete(&k, t, rec, RETAIN).await.unwrap(),
        Fence::Held
    );
    match store.reserve(&k, fp("a"), LEASE).await.unwrap() {
        Reservation::Completed(r) => {
            assert_eq!(r.response, response);
            let left = r.remaining();
            assert!(
                left > RETAIN - Duration::from_secs(60) && left <= RETAIN,
                "{left:?}"
            );
        }
        other => panic!("expected Completed, got {other:?}"),
    }
    // An empty response too.
    let k2 = key("empty");
    let t = acquire(&store, &k2, fp("a"), LEASE).await;
    let empty = StoredResponse {
        status: 204,
        headers: vec![],
        body: Bytes::new(),
    };
    store
        .complete(&k2, t, record(fp("a"), empty.clone()), RETAIN)
        .await
        .unwrap();
    match store.get(&k2).await.unwrap() {
        Some(Record::Completed(r)) => assert_eq!(r.response, empty),
        other => panic!("expected Completed, got {other:?}"),
    }
    pg::drop_schema(&store).await;
}

#[tokio::test]
async fn undecodable_rows_are_corrupt() {
    let Some(store) = pg::store().await else {
        return;
    };
    let k = key("corrupt");
    acquire(&store, &k, fp("a"), LEASE).await;
    let sql = format!(
        "UPDATE \"{}\".idem_records SET fingerprint = '\\x0102' WHERE key = $1",
        store.schema()
    );
    sqlx::query(&sql)
        .bind(k.as_str())
        .execute(store.pool())
        .await
        .unwrap();
    let e = store.get(&k).await;
    assert!(matches!(e, Err(StoreError::Corrupt(_))), "{e:?}");
    let e = store.reserve(&k, fp("a"), LEASE).await;
    assert!(matches!(e, Err(StoreError::Corrupt(_))), "{e:?}");
    pg::drop_schema(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_reach_other_instances() {
    let Some(a) = pg::store().await else {
        return;
    };
    // A second instance on the same schema (migration re-run: harmless).
    let b = PostgresStore::builder(services::database_url())
        .schema(a.schema())
        .connect()
        .await
        .unwrap();
    assert_eq!(a.channel(), b.channel());
    let k = key("cross");
    let t = acquire(&a, &k, fp("a"), LEASE).await;
    // B's duplicate finds the key in flight (which marks it waited for).
    assert!(matches!(
        b.reserve(&k, fp("a"), LEASE).await.unwrap(),
        Reservation::InFlight { .. }
    ));
    let mut sub = b.subscribe(&k).await.unwrap();
    let rec = record(
        fp("a"),
        StoredResponse {
            status: 200,
            headers: vec![],
            body: Bytes::from_static(b"x"),
        },
    );
    a.complete(&k, t, rec, RETAIN).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), sub.changed())
        .await
        .expect("a complete on instance A must wake a waiter on instance B");
    pg::drop_schema(&a).await;
}

/// The backend pid of the store's listener connection.
async fn listener_pid(store: &PostgresStore) -> Option<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE starts_with(query, 'LISTEN \"' || $1 || '\"') \
         ORDER BY backend_start DESC LIMIT 1",
    )
    .bind(store.channel())
    .fetch_optional(store.pool())
    .await
    .unwrap()
}

/// Settings for a test store in a fresh schema whose connections carry
/// the schema's name as `application_name`, to find them by; and the name.
fn named_builder() -> (idem::store::postgres::PostgresStoreBuilder, String) {
    let url = services::database_url();
    let name = pg::fresh_schema();
    let sep = if url.contains('?') { '&' } else { '?' };
    let builder =
        PostgresStore::builder(format!("{url}{sep}application_name={name}")).schema(&name);
    (builder, name)
}

/// Terminates the connections named `name` (a [`named_builder`] store's),
/// but its listener's, from a connection of our own: how many.
async fn kill_connections(name: &str) -> i64 {
    use sqlx::Connection as _;
    let mut own = sqlx::PgConnection::connect(&services::database_url())
        .await
        .unwrap();
    let killed = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = $1 AND NOT starts_with(query, 'LISTEN')",
    )
    .bind(name)
    .fetch_one(&mut own)
    .await
    .unwrap();
    own.close().await.unwrap();
    killed
}

/// A pooled connection is not pinged each time it is taken from the pool
/// (sqlx pinged it when it came back), only after it sat idle for a
/// while: one that died meanwhile, say a server restart, is then replaced
/// before any statement runs on it, and the call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_that_died_is_replaced_before_use() {
    // One connection in each pool, so the next call must take the one
    // killed; a name of its own, to find it by.
    let (builder, name) = named_builder();
    let Some(store) =
        pg::connect(builder.max_connections(1).timeout(Duration::from_secs(10))).await
    else {
        return;
    };
    let a = key("idle-a");
    acquire(&store, &a, fp("a"), LEASE).await;
    // The request path's connection (and sqlx's pool's, if the migration
    // left one there).
    let killed = kill_connections(&name).await;
    assert!(killed >= 1, "the pooled connection was found and killed");
    // Idle for longer than the store lets a connection go unchecked.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let b = key("idle-b");
    acquire(&store, &b, fp("b"), LEASE).await;
    pg::drop_schema(&store).await;
}

/// The request path's pids seen by `n` statements run at once on the
/// calling thread, each holding its connection for 300 ms.
async fn request_path_pids(store: &PostgresStore, n: usize) -> Vec<i32> {
    let mut each = tokio::task::JoinSet::new();
    for _ in 0..n {
        let store = store.clone();
        each.spawn(async move {
            let rows = store
                .request_path_rows("SELECT pg_backend_pid() AS pid FROM pg_sleep(0.3)")
                .await
                .unwrap();
            rows[0].get::<i32, _>("pid")
        });
    }
    let mut pids = each.join_all().await;
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// A thread that pins the store gets a request-path pool of its own, of
/// the size it asked for, with connections the shared pool does not have;
/// its reserve goes through it; once the pin is dropped the thread is back
/// on the shared pool. A second pin on the same thread holds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_thread_has_a_request_path_pool_of_its_own() {
    let Some(store) = pg::connect(pg::builder().max_connections(1)).await else {
        return;
    };
    assert_eq!(store.max_connections(), 1);
    let shared = request_path_pids(&store, 2).await;
    assert_eq!(shared.len(), 1, "the shared pool has one connection");
    let on_thread = store.clone();
    let seen = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let pin = on_thread.pin_to_thread(2).unwrap();
            assert!(pin.is_pinned());
            assert!(!on_thread.pin_to_thread(2).unwrap().is_pinned());
            let own = request_path_pids(&on_thread, 3).await;
            acquire(&on_thread, &key("pinned"), fp("a"), LEASE).await;
            drop(pin);
            let after = request_path_pids(&on_thread, 1).await;
            (own, after)
        })
    })
    .await
    .unwrap();
    let (own, after) = seen;
    assert_eq!(
        own.len(),
        2,
        "three statements at once on a pool of two: {own:?}"
    );
    assert!(
        own.iter().all(|pid| !shared.contains(pid)),
        "the thread's own connections: {own:?}, shared {shared:?}"
    );
    assert_eq!(after, shared, "unpinned, the thread uses the shared pool");
    pg::drop_schema(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_reconnects_and_wakes_every_waiter() {
    let Some(store) = pg::store().await else {
        return;
    };
    assert!(store.is_listening(), "listening once connected");
    let old = listener_pid(&store).await.expect("a listener connection");
    let k = key("reconnect");
    let t = acquire(&store, &k, fp("a"), LEASE).await;
    let mut sub = store.subscribe(&k).await.unwrap();
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(old)
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert!(killed);
    // Notifications sent while it was away are lost: it wakes everyone.
    tokio::time::timeout(Duration::from_secs(10), sub.changed())
        .await
        .expect("a reconnect must wake waiters");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match listener_pid(&store).await {
            Some(pid) if pid != old && store.is_listening() => break,
            _ if Instant::now() > deadline => panic!("the listener did not come back"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    // And it listens again: a change made by another instance reaches it.
    let other = PostgresStore::builder(services::database_url())
        .schema(store.schema())
        .connect()
        .await
        .unwrap();
    // A waiter found it in flight (so the release notifies).
    assert!(matches!(
        store.reserve(&k, fp("a"), LEASE).await.unwrap(),
        Reservation::InFlight { .. }
    ));
    let mut sub = store.subscribe(&k).await.unwrap();
    assert_eq!(other.release(&k, t).await.unwrap(), Fence::Held);
    tokio::time::timeout(Duration::from_secs(5), sub.changed())
        .await
        .expect("notifications flow after the reconnect");
    pg::drop_schema(&store).await;
}

#[tokio::test]
async fn expired_rows_are_deleted_in_batches() {
    let Some(store) = pg::connect(pg::builder().cleanup_batch(3).cleanup_interval(None)).await
    else {
        return;
    };
    for i in 0..10 {
        acquire(
            &store,
            &key(&format!("short-{i}")),
            fp("a"),
            Duration::from_millis(50),
        )
        .await;
    }
    let live = key("live");
    acquire(&store, &live, fp("a"), LEASE).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(store.delete_expired().await.unwrap(), 10);
    assert_eq!(store.delete_expired().await.unwrap(), 0);
    let sql = format!("SELECT count(*) FROM \"{}\".idem_records", store.schema());
    let left: i64 = sqlx::query_scalar(&sql)
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(left, 1, "only the live reservation is left");
    assert!(store.get(&live).await.unwrap().is_some());
    pg::drop_schema(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cleanup_task_runs_until_the_store_drops() {
    let Some(store) =
        pg::connect(pg::builder().cleanup_interval(Some(Duration::from_millis(100)))).await
    else {
        return;
    };
    acquire(&store, &key("gone"), fp("a"), Duration::from_millis(10)).await;
    let sql = format!("SELECT count(*) FROM \"{}\".idem_records", store.schema());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = sqlx::query_scalar(&sql)
            .fetch_one(store.pool())
            .await
            .unwrap();
        if n == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the clean-up task did not run");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let schema = store.schema().to_owned();
    let pool = store.pool().clone();
    drop(store);
    // With the store gone, its listener connection goes too.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listening: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE starts_with(query, 'LISTEN \"' || $1 || '_idem_changed\"')",
        )
        .bind(&schema)
        .fetch_one(&pool)
        .await
        .unwrap();
        if listening == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the listener outlived the store");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sql = format!("DROP SCHEMA \"{schema}\" CASCADE");
    sqlx::raw_sql(&sql).execute(&pool).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_database_is_a_timeout() {
    let Some(store) = pg::connect(pg::builder().timeout(Duration::from_millis(300))).await else {
        return;
    };
    let k = key("locked");
    let t = acquire(&store, &k, fp("a"), LEASE).await;
    // Another session holds the row lock.
    let mut blocker = store.pool().begin().await.unwrap();
    let sql = format!(
        "SELECT 1 FROM \"{}\".idem_records WHERE key = $1 FOR UPDATE",
        store.schema()
    );
    sqlx::query(&sql)
        .bind(k.as_str())
        .execute(&mut *blocker)
        .await
        .unwrap();
    let started = Instant::now();
    let e = store.extend(&k, t, LEASE).await;
    assert!(matches!(e, Err(StoreError::Timeout(_))), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    blocker.rollback().await.unwrap();
    // The connection that timed out is usable again.
    assert_eq!(store.extend(&k, t, LEASE).await.unwrap(), Fence::Held);
    pg::drop_schema(&store).await;
}

/// Issue 10: the scheme in capitals, which `idem serve` accepts, connects.
#[tokio::test]
async fn the_scheme_may_be_in_capitals() {
    let Some(store) = pg::store().await else {
        return;
    };
    let url = services::database_url();
    let (_, rest) = url.split_once("://").unwrap();
    let caps = PostgresStore::builder(format!("POSTGRESQL://{rest}"))
        .schema(store.schema())
        .connect()
        .await
        .unwrap_or_else(|e| panic!("POSTGRESQL://… was refused: {e}"));
    assert!(caps.get(&key("caps")).await.unwrap().is_none());
    pg::drop_schema(&store).await;
}

#[tokio::test]
async fn an_unreachable_database_is_unavailable() {
    let e = PostgresStore::builder("postgres://postgres@127.0.0.1:1/test")
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .map(|_| ())
        .err();
    assert!(matches!(e, Some(StoreError::Unavailable(_))), "{e:?}");
    let url = services::database_url();
    let (base, _) = url.rsplit_once('/').unwrap();
    let e = PostgresStore::connect(&format!(
        "{base}/no_such_database_{:x}",
        rand::random::<u32>()
    ))
    .await
    .map(|_| ())
    .err();
    match e {
        // The server's own reason (or, with no server at all, the refusal:
        // the other tests skip or fail loudly then).
        Some(StoreError::Unavailable(source)) => {
            let reason = source.to_string();
            assert!(
                reason.contains("does not exist") || reason.contains("refused"),
                "{reason}"
            );
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_is_re_runnable_and_concurrent_safe() {
    let Some(store) = pg::connect(pg::builder().migrate(false)).await else {
        return;
    };
    let store = Arc::new(store);
    let runs: Vec<_> = (0..8)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.migrate().await })
        })
        .collect();
    for r in runs {
        r.await.unwrap().unwrap();
    }
    store.migrate().await.unwrap();
    acquire(&store, &key("after-migrate"), fp("a"), LEASE).await;
    pg::drop_schema(&store).await;
}

/// Issue 10: `idem serve --check` must not create the schema. `check()`
/// connects, creates nothing and says what is there; `.migrate(false)`
/// connects without creating anything either.
#[tokio::test]
async fn checking_creates_nothing_and_says_what_is_there() {
    let Some(admin) = pg::store().await else {
        return;
    };
    let schema = pg::fresh_schema();
    let builder = || {
        PostgresStore::builder(services::database_url())
            .schema(&schema)
            .max_connections(2)
            .timeout(Duration::from_secs(10))
    };
    let exists = || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
        )
        .bind(&schema)
        .fetch_one(admin.pool())
        .await
        .unwrap()
    };
    assert_eq!(builder().check().await.unwrap(), SchemaStatus::NoSchema);
    assert!(!exists().await, "check() created the schema");
    let store = builder().migrate(false).connect().await.unwrap();
    assert!(
        !exists().await,
        "connect() with migrate(false) created the schema"
    );
    assert_eq!(store.schema_status().await.unwrap(), SchemaStatus::NoSchema);

    let sql = format!("CREATE SCHEMA \"{schema}\"");
    sqlx::raw_sql(&sql).execute(admin.pool()).await.unwrap();
    assert_eq!(builder().check().await.unwrap(), SchemaStatus::NoTable);
    store.migrate().await.unwrap();
    let ready = builder().check().await.unwrap();
    assert_eq!(ready, SchemaStatus::Ready);
    assert!(ready.is_ready());
    // A table of an older layout: the migration would add the column.
    let sql = format!("ALTER TABLE \"{schema}\".idem_records DROP COLUMN waiters");
    sqlx::raw_sql(&sql).execute(admin.pool()).await.unwrap();
    assert_eq!(store.schema_status().await.unwrap(), SchemaStatus::Outdated);
    store.migrate().await.unwrap();
    assert_eq!(store.schema_status().await.unwrap(), SchemaStatus::Ready);

    // Refused as connect() would refuse.
    let e = PostgresStore::builder("mysql://x").check().await;
    assert!(matches!(e, Err(StoreError::Config(_))), "{e:?}");
    let e = PostgresStore::builder("postgres://postgres@127.0.0.1:1/test")
        .timeout(Duration::from_secs(2))
        .check()
        .await;
    assert!(matches!(e, Err(StoreError::Unavailable(_))), "{e:?}");
    pg::drop_schema(&store).await;
    pg::drop_schema(&admin).await;
}

/// A request-path statement cut off mid-way (its caller went away, or its
/// time-out fired) leaves its connection mid-protocol: that connection is
/// never used again, and the next statement answers correctly on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_off_mid_statement_is_not_reused() {
    let builder = pg::builder()
        .max_connections(1)
        .timeout(Duration::from_secs(10));
    let Some(store) = pg::connect(builder).await else {
        return;
    };
    let pid = |rows: Vec<sqlx::postgres::PgRow>| -> i32 { rows[0].get(0) };
    let before = pid(store
        .request_path_rows("SELECT pg_backend_pid()")
        .await
        .unwrap());
    let cut = tokio::time::timeout(
        Duration::from_millis(100),
        store.request_path_rows("SELECT pg_sleep(2)::text"),
    )
    .await;
    assert!(cut.is_err(), "the caller went away mid-statement");
    let rows = store.request_path_rows("SELECT 42").await.unwrap();
    let answer: i32 = rows[0].get(0);
    assert_eq!(
        answer, 42,
        "the answer to this statement, not the cut one's"
    );
    let after = pid(store
        .request_path_rows("SELECT pg_backend_pid()")
        .await
        .unwrap());
    assert_ne!(before, after, "another connection");
    // And the store works on.
    let k = key("after-cut");
    acquire(&store, &k, fp("a"), LEASE).await;
    pg::drop_schema(&store).await;
}

/// protocol §7's measured hazard: a prepared `UPDATE … WHERE key = $1` planned
/// while the table was empty kept a sequential scan. The store's
/// connections use custom plans, and under load the guarded statements use
/// the primary key index.
#[tokio::test]
async fn guarded_statements_use_the_index_under_load() {
    // One connection, so the statements we inspect are the ones the store
    // prepared and ran (on the request path's connection).
    let Some(store) = pg::connect(pg::builder().max_connections(1)).await else {
        return;
    };
    let rows = store
        .request_path_rows("SHOW plan_cache_mode")
        .await
        .unwrap();
    let mode: String = rows[0].get(0);
    assert_eq!(mode, "force_custom_plan");

    // Prepare and run every statement while the table is (nearly) empty:
    // with the default `auto` mode the 6th run would switch to a generic plan.
    let k = key("warm");
    for _ in 0..10 {
        let t = acquire(&store, &k, fp("a"), LEASE).await;
        store.extend(&k, t, LEASE).await.unwrap();
        store.get(&k).await.unwrap();
        store.release(&k, t).await.unwrap();
    }

    // Load: 50 000 rows, no ANALYZE.
    let fill = format!(
        "INSERT INTO \"{}\".idem_records (key, state, token, fingerprint, started_at, expires_at) \
         SELECT 'k' || g, 1, '\\x00', '\\x00', now(), now() + interval '1 hour' \
         FROM generate_series(1, 50000) AS g",
        store.schema()
    );
    sqlx::raw_sql(&fill).execute(store.pool()).await.unwrap();

    let started = Instant::now();
    for _ in 0..200 {
        let t = acquire(&store, &k, fp("a"), LEASE).await;
        assert_eq!(store.extend(&k, t, LEASE).await.unwrap(), Fence::Held);
        assert_eq!(store.release(&k, t).await.unwrap(), Fence::Held);
    }
    let per_op = started.elapsed() / 600;
    eprintln!("guarded statements over 50 000 rows: {per_op:?} per statement");

    // No statement of the store was ever run with a generic plan.
    // (The schema name is a-z, 0-9 and _ only.)
    let plans: Vec<(String, i64, i64)> = store
        .request_path_rows(&format!(
            "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements \
             WHERE strpos(statement, '\"{}\".idem_records') > 0 \
             AND strpos(statement, 'pg_prepared_statements') = 0",
            store.schema()
        ))
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(
        plans.len() >= 4,
        "the store's statements are prepared: {plans:?}"
    );
    for (statement, generic, custom) in &plans {
        assert_eq!(*generic, 0, "a generic plan was used for {statement}");
        assert!(*custom > 0);
    }

    // And the plans of the statements as shipped, on this connection, use
    // the indexes: the guarded UPDATE the primary key, the clean-up the
    // expires_at index (then a TID scan).
    let table = format!("\"{}\".idem_records", store.schema());
    let extend = include_str!("../src/store/postgres/sql/extend.sql").replace("{table}", &table);
    let plan = explain(
        &store,
        &extend,
        "text, bytea, bigint",
        "'k777', '\\x00', 1000",
    )
    .await;
    assert!(
        plan.contains("Index Scan using idem_records_pkey"),
        "{plan}"
    );
    assert!(!plan.contains("Seq Scan"), "{plan}");
    // The batched complete joins its keys to the table by the primary key.
    let complete =
        include_str!("../src/store/postgres/sql/complete_many.sql").replace("{table}", &table);
    let plan = explain(
        &store,
        &complete,
        "text[], bytea[], int[], int[], int[], bytea[], bigint[], text[], bytea[], text, text",
        "ARRAY['k7', 'k70', 'k700'], ARRAY['\\x00', '\\x00', '\\x00']::bytea[], \
         ARRAY[200, 201, 202], ARRAY[1, 1, 1], ARRAY[0, 0, 0], \
         ARRAY['\\x00', '\\x00', '\\x00']::bytea[], ARRAY[1000, 1000, 1000]::bigint[], \
         '{}'::text[], '{}'::bytea[], 'chan', '100ms'",
    )
    .await;
    assert!(
        plan.contains("Index Scan using idem_records_pkey"),
        "{plan}"
    );
    assert!(!plan.contains("Seq Scan"), "{plan}");
    let cleanup = include_str!("../src/store/postgres/sql/cleanup.sql").replace("{table}", &table);
    let plan = explain(&store, &cleanup, "bigint", "1000").await;
    assert!(plan.contains("idem_records_expires_at"), "{plan}");
    assert!(plan.contains("Tid Scan"), "{plan}");
    assert!(!plan.contains("Seq Scan"), "{plan}");
    pg::drop_schema(&store).await;
}

/// `EXPLAIN EXECUTE` of `sql` prepared with `types` and run with `args`.
async fn explain(store: &PostgresStore, sql: &str, types: &str, args: &str) -> String {
    let name = format!("p{:08x}", rand::random::<u32>());
    let prepare = format!("PREPARE {name}({types}) AS {sql}");
    sqlx::raw_sql(&prepare).execute(store.pool()).await.unwrap();
    let lines: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN EXECUTE {name}({args})"))
        .fetch_all(store.pool())
        .await
        .unwrap();
    sqlx::raw_sql(&format!("DEALLOCATE {name}"))
        .execute(store.pool())
        .await
        .unwrap();
    lines.join("\n")
}
