//! Criterion benches of the PostgreSQL store: one `reserve` + `complete` of
//! a fresh key (two statements, two commits), and one transactional call
//! (`BEGIN`, reserve, reset, complete, `COMMIT`), against
//! `IDEM_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`)
//! in a schema of their own, dropped at the end.
//!
//! `cargo bench -p idem --features postgres --bench postgres -- --warm-up-time 1 --measurement-time 3`
//!
//! One caller at a time: the figure is the latency of one operation (its
//! inverse is the ops/s of ONE connection); instances and connections add
//! up until the server's commit rate is the limit.
#![allow(
    missing_docs,
    reason = "criterion_group! defines an undocumented function"
)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use idem::store::postgres::{sqlx, PostgresStore};
use idem::store::{Lease, Reservation, Store};
use idem::{CompletedRecord, Fingerprint, Rules, Scope, StoreKey, StoredResponse};

/// Completes `key` for `lease`'s holder with a small JSON answer.
async fn complete(store: &PostgresStore, key: &StoreKey, fp: Fingerprint, lease: Lease) {
    let retention = Rules::default().retention;
    let now = SystemTime::now();
    let record = CompletedRecord {
        fingerprint: fp,
        response: StoredResponse {
            status: 201,
            headers: vec![("content-type".into(), "application/json".into())],
            body: bytes::Bytes::from_static(br#"{"order":1}"#),
        },
        completed_at: now,
        expires_at: now + retention,
    };
    store
        .complete(key, lease.token, Arc::new(record), retention)
        .await
        .expect("complete");
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let url = std::env::var("IDEM_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let schema = format!("idem_t{secs}_bench");
    let store = match rt.block_on(PostgresStore::builder(&url).schema(&schema).connect()) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("\n!!!!!!!! SKIPPED: PostgreSQL at {url} is unreachable: {e} !!!!!!!!\n");
            return;
        }
    };
    let scope = Scope::named("bench");
    let fp = Fingerprint::of_bytes(b"body");
    let rules = Rules::default();
    let n = Arc::new(AtomicU64::new(0));
    let fresh = || StoreKey::new(&scope, &n.fetch_add(1, Ordering::Relaxed).to_string());

    let mut g = c.benchmark_group("postgres_store");
    g.throughput(Throughput::Elements(1));
    g.bench_function("reserve_complete", |b| {
        b.to_async(&rt).iter(|| {
            let key = fresh();
            let store = &store;
            async move {
                let Ok(Reservation::Acquired(lease)) = store.reserve(&key, fp, rules.lease).await
                else {
                    panic!("fresh key must be acquired");
                };
                complete(store, &key, fp, lease).await;
            }
        });
    });
    let replayed = fresh();
    g.bench_function("reserve_replay", |b| {
        b.to_async(&rt).iter(|| async {
            // The first iteration completes the key; the rest replay it.
            if let Ok(Reservation::Acquired(lease)) =
                store.reserve(&replayed, fp, rules.lease).await
            {
                complete(&store, &replayed, fp, lease).await;
            }
        });
    });
    g.bench_function("transaction", |b| {
        b.to_async(&rt).iter(|| {
            let key = fresh();
            let (store, rules) = (&store, &rules);
            async move {
                store
                    .transaction(&key, fp, rules, |_tx| {
                        Box::pin(async { Ok::<_, sqlx::Error>(7_u32) })
                    })
                    .await
                    .expect("transaction");
            }
        });
    });
    g.finish();

    let drop = format!("DROP SCHEMA \"{schema}\" CASCADE");
    let _ = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(30),
            sqlx::raw_sql(&drop).execute(store.pool()),
        )
        .await
    });
}

criterion_group!(postgres_benches, benches);
criterion_main!(postgres_benches);
