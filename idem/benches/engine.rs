//! Criterion benches of the hot path on the memory store.
//!
//! `cargo bench -p idem --bench engine`
#![allow(
    missing_docs,
    reason = "criterion_group! defines an undocumented function"
)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use idem::store::memory::MemoryStore;
use idem::store::{Reservation, Store};
use idem::{
    Action, CompletedRecord, Engine, Fingerprint, Finish, Outcome, Rules, Scope, StoreKey,
    StoredResponse,
};

fn response() -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![("content-type".into(), "application/json".into())],
        body: bytes::Bytes::from_static(br#"{"order":1}"#),
    }
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let scope = Scope::named("bench");
    let fp = Fingerprint::of_bytes(b"body");
    let rules = Rules::default();
    let n = Arc::new(AtomicU64::new(0));

    let mut g = c.benchmark_group("memory_store");
    g.throughput(Throughput::Elements(1));
    let store = rt.block_on(async { MemoryStore::new() });
    // Many operations per `block_on`, so the runtime's enter/exit is not
    // what is measured.
    g.bench_function("reserve_complete", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    let key = StoreKey::new(&scope, &n.fetch_add(1, Ordering::Relaxed).to_string());
                    let Ok(Reservation::Acquired(lease)) =
                        store.reserve(&key, fp, rules.lease).await
                    else {
                        panic!("fresh key must be acquired");
                    };
                    let now = std::time::SystemTime::now();
                    let record = Arc::new(CompletedRecord {
                        fingerprint: fp,
                        response: response(),
                        completed_at: now,
                        expires_at: now + rules.retention,
                    });
                    store
                        .complete(&key, lease.token, record, rules.retention)
                        .await
                        .expect("complete");
                }
                start.elapsed()
            })
        });
    });
    g.finish();

    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(1));
    let engine = rt.block_on(async { Engine::new(MemoryStore::new()) });
    g.bench_function("fresh_key", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    let key = StoreKey::new(&scope, &n.fetch_add(1, Ordering::Relaxed).to_string());
                    let out = engine
                        .run(&key, fp, &rules, || async {
                            Finish {
                                output: (),
                                action: Action::Store(response()),
                            }
                        })
                        .await;
                    assert!(matches!(out, Outcome::Executed(())));
                }
                start.elapsed()
            })
        });
    });
    let hot = StoreKey::new(&scope, "hot");
    rt.block_on(engine.run(&hot, fp, &rules, || async {
        Finish {
            output: (),
            action: Action::Store(response()),
        }
    }));
    g.bench_function("replay_local_cache", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    let out = engine
                        .run(&hot, fp, &rules, || async {
                            Finish {
                                output: (),
                                action: Action::Release,
                            }
                        })
                        .await;
                    assert!(matches!(out, Outcome::Replayed(_)));
                }
                start.elapsed()
            })
        });
    });
    g.finish();
}

criterion_group!(engine_benches, benches);
criterion_main!(engine_benches);
