//! Async mode's queue on PostgreSQL, beyond `conformance/queue.rs`:
//! durability across a reconnect, one operation per key under concurrent
//! enqueues, the documented `max_pending` bound, the in-place upgrade of a
//! layout 1 table, and the plans of the queue's statements.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use idem::record::Record;
use idem::store::postgres::sqlx;
use idem::store::{
    Enqueued, Fence, OperationId, OperationRequest, OperationState, Queue, Store, StoreError,
};
use idem::StoredResponse;
use tokio::sync::Barrier;

use super::{explain, fp, key, pg, record, LEASE, RETAIN};

fn request(body: &'static [u8]) -> OperationRequest {
    OperationRequest {
        method: "POST".into(),
        uri: "/payments?currency=eur".into(),
        headers: vec![
            ("idempotency-key".into(), Bytes::from_static(b"pay-1")),
            ("x-request-id".into(), Bytes::from_static(b"req-7")),
            ("x-binary".into(), Bytes::from_static(b"\x00\xff\x80")),
        ],
        body: Bytes::from_static(body),
    }
}

async fn accept<S: Queue>(s: &S, k: &idem::StoreKey, max_pending: u64) -> Enqueued {
    s.enqueue(
        k,
        fp("a"),
        OperationId::generate(),
        &request(b"{}"),
        max_pending,
    )
    .await
    .unwrap()
}

/// protocol §9.1: a 202 means the operation is committed. A store that goes
/// away (its pool, its listener, its process) loses nothing: another store
/// on the same schema claims the operation, request intact, and finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_operation_survives_a_reconnect() {
    let Some(first) = pg::store().await else {
        return;
    };
    let schema = first.schema().to_owned();
    let k = key("survives");
    let id = OperationId::generate();
    let sent = request(b"\x00{\"amount\":10}\xff");
    let e = first.enqueue(&k, fp("a"), id, &sent, 100).await.unwrap();
    assert!(matches!(e, Enqueued::Accepted(got) if got == id), "{e:?}");
    drop(first);

    let Some(second) = pg::connect(pg::builder().schema(schema)).await else {
        return;
    };
    assert!(matches!(
        second.operation(id).await.unwrap().map(|op| op.state),
        Some(OperationState::Pending { attempts: 0, .. })
    ));
    assert_eq!(second.queue_stats().await.unwrap().pending, 1);
    let mut claimed = second.claim(LEASE, 10).await.unwrap();
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    let c = claimed.remove(0);
    assert_eq!((c.id, &c.key, c.attempt), (id, &k, 1));
    assert_eq!(*c.request, sent, "the request comes back byte for byte");
    let answer = StoredResponse {
        status: 201,
        headers: Vec::new(),
        body: Bytes::from_static(b"paid"),
    };
    assert_eq!(
        second
            .complete(&k, c.token, record(fp("a"), answer.clone()), RETAIN)
            .await
            .unwrap(),
        Fence::Held
    );
    match second.operation(id).await.unwrap().map(|op| op.state) {
        Some(OperationState::Done(r)) => assert_eq!(r.response, answer),
        other => panic!("expected Done, got {other:?}"),
    }
    pg::drop_schema(&second).await;
}

/// protocol §9.2: N concurrent identical POSTs make ONE operation; every other
/// enqueue is told its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_enqueues_of_one_key_make_one_operation() {
    const CALLS: usize = 50;
    let Some(store) = pg::store().await else {
        return;
    };
    let store = Arc::new(store);
    let k = key("one-operation");
    let barrier = Arc::new(Barrier::new(CALLS));
    let calls: Vec<_> = (0..CALLS)
        .map(|_| {
            let (store, k, barrier) = (Arc::clone(&store), k.clone(), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                accept(&*store, &k, 1000).await
            })
        })
        .collect();
    let mut accepted = Vec::new();
    let mut existing = HashSet::new();
    for call in calls {
        match call.await.unwrap() {
            Enqueued::Accepted(id) => accepted.push(id),
            Enqueued::Existing(op) => {
                existing.insert(op.id);
            }
            other => panic!("expected Accepted or Existing, got {other:?}"),
        }
    }
    assert_eq!(accepted.len(), 1, "one key, one operation: {accepted:?}");
    assert!(
        existing.iter().all(|id| *id == accepted[0]),
        "every repeat names the one operation: {existing:?} vs {accepted:?}"
    );
    assert_eq!(store.queue_stats().await.unwrap().pending, 1);
    pg::drop_schema(&store).await;
}

/// The documented bound of `max_pending` (enqueue.sql): enqueues of fresh
/// keys running at once may each see one slot left, so the queue can
/// exceed the bound by the number of enqueue statements in flight (here at
/// most the pool's 4 connections) minus one; and never by more. (The
/// documented bound is one higher for a repeat whose record is purged
/// meanwhile, which this test does not do.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_pending_overshoots_by_at_most_the_concurrent_enqueues() {
    const CALLS: usize = 40;
    const MAX: u64 = 10;
    const POOL: u32 = 4;
    let Some(store) = pg::connect(pg::builder().max_connections(POOL)).await else {
        return;
    };
    let store = Arc::new(store);
    let barrier = Arc::new(Barrier::new(CALLS));
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                accept(&*store, &key(&format!("bound-{i}")), MAX).await
            })
        })
        .collect();
    let mut accepted = 0;
    for call in calls {
        match call.await.unwrap() {
            Enqueued::Accepted(_) => accepted += 1,
            Enqueued::Full => {}
            other => panic!("expected Accepted or Full, got {other:?}"),
        }
    }
    let bound = MAX + u64::from(POOL) - 1;
    assert!(
        (MAX..=bound).contains(&accepted),
        "{accepted} accepted: at least max_pending ({MAX}), at most {bound}"
    );
    assert_eq!(store.queue_stats().await.unwrap().pending, accepted);
    assert!(matches!(
        accept(&*store, &key("after"), MAX).await,
        Enqueued::Full
    ));
    pg::drop_schema(&store).await;
}

/// The table as layout version 1 (before async mode) created it.
const LAYOUT_1: &str = r#"
CREATE SCHEMA {schema};
CREATE TABLE {table} (
    key           text COLLATE "C" PRIMARY KEY,
    state         smallint    NOT NULL CHECK (state IN (1, 2)),
    token         bytea       NOT NULL,
    fingerprint   bytea       NOT NULL,
    started_at    timestamptz NOT NULL,
    expires_at    timestamptz NOT NULL,
    completed_at  timestamptz,
    status        integer,
    header_names  text[],
    header_values bytea[],
    body          bytea
) WITH (fillfactor = 90);
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS waiters boolean NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS idem_records_expires_at ON {table} (expires_at);
COMMENT ON TABLE {table} IS 'idem idempotency records, layout version 1';
"#;

/// A table of layout 1, with records in it, is upgraded in place by the
/// migration: its records read as before, the queue works, and running the
/// migration again changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_upgrades_a_layout_1_table_in_place() {
    let Some(store) = pg::connect(pg::builder().migrate(false)).await else {
        return;
    };
    let schema = format!("\"{}\"", store.schema());
    let table = format!("{schema}.idem_records");
    let v1 = LAYOUT_1
        .replace("{schema}", &schema)
        .replace("{table}", &table);
    sqlx::raw_sql(&v1).execute(store.pool()).await.unwrap();
    // What layout 1 holds: a completed record and a live reservation.
    let (done, held) = (key("v1-done"), key("v1-held"));
    let rows = format!(
        "INSERT INTO {table} (key, state, token, fingerprint, started_at, expires_at, \
                              completed_at, status, header_names, header_values, body) VALUES \
         ($1, 2, $3, $4, now(), now() + interval '1 hour', now(), 201, '{{content-type}}', \
          ARRAY['\\x74657874'::bytea], '\\x6f6b'), \
         ($2, 1, $3, $4, now(), now() + interval '1 hour', NULL, NULL, NULL, NULL, NULL)"
    );
    sqlx::query(&rows)
        .bind(done.as_str())
        .bind(held.as_str())
        .bind(&[7u8; 16][..])
        .bind(&fp("a").0[..])
        .execute(store.pool())
        .await
        .unwrap();

    store.migrate().await.unwrap();
    store.migrate().await.unwrap();

    match store.get(&done).await.unwrap() {
        Some(Record::Completed(r)) => {
            assert_eq!(r.response.status, 201);
            assert_eq!(r.response.body, "ok");
        }
        other => panic!("expected the layout 1 record, got {other:?}"),
    }
    assert!(matches!(
        store.get(&held).await.unwrap(),
        Some(Record::InFlight { .. })
    ));
    assert!(matches!(
        accept(&store, &key("v2-op"), 100).await,
        Enqueued::Accepted(_)
    ));
    assert_eq!(store.claim(LEASE, 10).await.unwrap().len(), 1);
    // Layout 3: job traces, in a table of their own (protocol §13).
    assert_eq!(store.begin_attempt(&key("v3-job"), LEASE).await.unwrap(), 1);
    assert_eq!(store.begin_attempt(&key("v3-job"), LEASE).await.unwrap(), 2);

    let constraints: Vec<String> = sqlx::query_scalar(
        "SELECT conname::text FROM pg_constraint WHERE conrelid = $1::regclass AND contype = 'c'",
    )
    .bind(&table)
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(constraints, ["idem_records_state"]);
    let bad = format!(
        "INSERT INTO {table} (key, state, token, fingerprint, started_at, expires_at) \
         VALUES ('x', 5, '\\x', '\\x', now(), now())"
    );
    assert!(
        sqlx::raw_sql(&bad).execute(store.pool()).await.is_err(),
        "the new check still refuses unknown states"
    );
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = $1 ORDER BY indexname",
    )
    .bind(store.schema())
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(
        indexes,
        [
            "idem_jobs_pkey",
            "idem_records_due",
            "idem_records_expires_at",
            "idem_records_op_id",
            "idem_records_pkey",
            "idem_versions_pkey"
        ]
    );
    let comment: String = sqlx::query_scalar("SELECT obj_description($1::regclass, 'pg_class')")
        .bind(&table)
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert!(comment.ends_with("layout version 2"), "{comment}");
    pg::drop_schema(&store).await;
}

/// A stored request this version cannot read is corrupt, not a crash, and
/// is named as such.
#[tokio::test]
async fn an_undecodable_request_is_corrupt() {
    let Some(store) = pg::store().await else {
        return;
    };
    accept(&store, &key("bad-request"), 100).await;
    let sql = format!(
        "UPDATE \"{}\".idem_records SET request = '\\x0900'",
        store.schema()
    );
    sqlx::raw_sql(&sql).execute(store.pool()).await.unwrap();
    match store.claim(LEASE, 1).await {
        Err(StoreError::Corrupt(c)) => assert!(c.to_string().contains("request"), "{c}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    pg::drop_schema(&store).await;
}

/// Over a table of 50 000 synchronous records and 2 000 operations, the
/// claim walks the partial due index and updates by primary key, the gate
/// of enqueue and the stats read that index, and `operation` finds its row
/// through the op_id index: no statement scans the table.
#[tokio::test]
async fn queue_statements_use_their_indexes() {
    let Some(store) = pg::connect(pg::builder().max_connections(1)).await else {
        return;
    };
    let table = format!("\"{}\".idem_records", store.schema());
    let fill = format!(
        "INSERT INTO {table} (key, state, token, fingerprint, started_at, expires_at) \
         SELECT 'k' || g, 2, '\\x00', '\\x00', now(), now() + interval '1 hour' \
         FROM generate_series(1, 50000) AS g; \
         INSERT INTO {table} (key, state, token, fingerprint, started_at, expires_at, \
                              waiters, op_id, request, attempts, due_at) \
         SELECT 'op' || g, 3, '\\x', '\\x00', now(), 'infinity', true, \
                decode(lpad(to_hex(g), 32, '0'), 'hex'), '\\x01', 0, now() + g * interval '1 s' \
         FROM generate_series(1, 2000) AS g; \
         ANALYZE {table}"
    );
    sqlx::raw_sql(&fill).execute(store.pool()).await.unwrap();
    let sql = |file: &str| file.replace("{table}", &table);

    let claim = explain(
        &store,
        &sql(include_str!("../../src/store/postgres/sql/claim.sql")),
        "bigint, bigint, bytea[]",
        "10, 1000000, ARRAY['\\x00'::bytea]",
    )
    .await;
    assert!(claim.contains("idem_records_due"), "{claim}");
    assert!(claim.contains("idem_records_pkey"), "{claim}");
    assert!(!claim.contains("Seq Scan"), "{claim}");

    let operation = explain(
        &store,
        &sql(include_str!("../../src/store/postgres/sql/operation.sql")),
        "bytea",
        "'\\x000000000000000000000000000007d0'",
    )
    .await;
    assert!(operation.contains("idem_records_op_id"), "{operation}");
    assert!(!operation.contains("Seq Scan"), "{operation}");

    let enqueue = explain(
        &store,
        &sql(include_str!("../../src/store/postgres/sql/enqueue.sql")),
        "text, bytea, bytea, bytea, bigint",
        "'fresh', '\\x00', '\\x01', '\\x01', 100000",
    )
    .await;
    assert!(enqueue.contains("idem_records_due"), "{enqueue}");
    assert!(!enqueue.contains("Seq Scan"), "{enqueue}");

    // No parameters: EXPLAIN it as it is.
    let stats: Vec<String> = sqlx::query_scalar(&format!(
        "EXPLAIN {}",
        sql(include_str!("../../src/store/postgres/sql/queue_stats.sql"))
    ))
    .fetch_all(store.pool())
    .await
    .unwrap();
    let stats = stats.join("\n");
    assert!(stats.contains("idem_records_due"), "{stats}");
    assert!(!stats.contains("Seq Scan"), "{stats}");
    pg::drop_schema(&store).await;
}
