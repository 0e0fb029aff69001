//! Criterion benches of `reserve` + `complete` (one request's store work)
//! on every store: one pair at a time (latency bound) and 64 pairs at once
//! (what one multiplexed connection carries).
//!
//! `cargo bench -p idem --features redis --bench stores`
//!
//! Redis: `IDEM_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`) and
//! `IDEM_TEST_REDIS_CLUSTER_URLS` (default `redis://127.0.0.1:7000,7001,7002`);
//! an unreachable one is skipped with a notice. Records go under a random
//! prefix and expire after a minute.
#![allow(
    missing_docs,
    reason = "criterion_group! defines an undocumented function"
)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use idem::store::memory::MemoryStore;
use idem::store::redis::RedisStore;
use idem::store::{Fence, Reservation, Store};
use idem::{CompletedRecord, Fingerprint, Scope, StoreKey, StoredResponse};
use tokio::runtime::Runtime;

#[path = "../tests/conformance/services.rs"]
mod services;

const LEASE: Duration = Duration::from_secs(30);
const RETAIN: Duration = Duration::from_secs(60);
const BATCH: usize = 64;

fn record(fp: Fingerprint) -> Arc<CompletedRecord> {
    let now = SystemTime::now();
    Arc::new(CompletedRecord {
        fingerprint: fp,
        response: StoredResponse {
            status: 201,
            headers: vec![("content-type".into(), "application/json".into())],
            body: bytes::Bytes::from_static(br#"{"order":1}"#),
        },
        completed_at: now,
        expires_at: now + RETAIN,
    })
}

async fn reserve_complete<S: Store>(store: &S, key: StoreKey, fp: Fingerprint) {
    let Ok(Reservation::Acquired(lease)) = store.reserve(&key, fp, LEASE).await else {
        panic!("a fresh key must be acquired");
    };
    let fence = store
        .complete(&key, lease.token, record(fp), RETAIN)
        .await
        .expect("complete");
    assert_eq!(fence, Fence::Held);
}

fn bench_store<S: Store>(g: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, store: &Arc<S>) {
    let run: u64 = rand::random();
    let scope = Scope::named(&format!("bench-{run:016x}"));
    let fp = Fingerprint::of_bytes(b"body");
    let n = AtomicU64::new(0);
    let next = || StoreKey::new(&scope, &n.fetch_add(1, Ordering::Relaxed).to_string());

    g.throughput(Throughput::Elements(1));
    g.bench_function("reserve_complete", |b| {
        b.to_async(rt)
            .iter(|| reserve_complete(&**store, next(), fp));
    });

    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("reserve_complete_x64_concurrent", |b| {
        b.to_async(rt).iter(|| async {
            let tasks: Vec<_> = (0..BATCH)
                .map(|_| {
                    let (store, key) = (Arc::clone(store), next());
                    tokio::spawn(async move { reserve_complete(&*store, key, fp).await })
                })
                .collect();
            for t in tasks {
                t.await.expect("task");
            }
        });
    });
}

fn prefix() -> String {
    format!("idem-bench-{:016x}:", rand::random::<u64>())
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let memory = Arc::new(rt.block_on(async { MemoryStore::new() }));
    let mut g = c.benchmark_group("memory");
    bench_store(&mut g, &rt, &memory);
    g.finish();

    let url = services::redis_url();
    match rt.block_on(RedisStore::builder().prefix(prefix()).connect(&url)) {
        Ok(store) => {
            let mut g = c.benchmark_group("redis");
            bench_store(&mut g, &rt, &Arc::new(store));
            g.finish();
        }
        Err(e) => eprintln!("SKIPPED redis: {url} is unreachable: {e}"),
    }

    let urls = services::expand_cluster_urls(&services::redis_cluster_urls());
    match rt.block_on(
        RedisStore::builder()
            .prefix(prefix())
            .connect_cluster(&urls),
    ) {
        Ok(store) => {
            let mut g = c.benchmark_group("redis_cluster");
            bench_store(&mut g, &rt, &Arc::new(store));
            g.finish();
        }
        Err(e) => eprintln!("SKIPPED redis_cluster: {urls:?} is unreachable: {e}"),
    }
}

criterion_group!(stores, benches);
criterion_main!(stores);
