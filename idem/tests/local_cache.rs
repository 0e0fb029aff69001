//! The local cache (protocol §3.5) keeps answers that were replayed, not
//! every fresh one: a fresh answer costs no cache insert, the first retry
//! reads the store, and the retries after it are served without a store
//! round trip. A burst of waiters caches the answer once.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

#[path = "support/faulty.rs"]
mod faulty;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use faulty::Faulty;
use idem::policy::Concurrent;
use idem::store::memory::MemoryStore;
use idem::{
    Action, Engine, EngineConfig, Fingerprint, Finish, Outcome, Rules, Scope, StoreKey,
    StoredResponse,
};
use tokio::sync::Barrier;

fn key(name: &str) -> StoreKey {
    StoreKey::new(&Scope::named("local-cache"), name)
}

fn engine() -> Engine<Faulty> {
    Engine::with_config(
        Faulty::new(MemoryStore::new()),
        EngineConfig {
            local_cache_bytes: 1024 * 1024,
            ..EngineConfig::default()
        },
    )
}

async fn answer(delay: Duration) -> Finish<()> {
    tokio::time::sleep(delay).await;
    Finish {
        output: (),
        action: Action::Store(StoredResponse {
            status: 201,
            headers: vec![],
            body: Bytes::from_static(b"{\"id\":1}"),
        }),
    }
}

#[tokio::test]
async fn a_fresh_answer_is_cached_once_it_is_replayed() {
    let engine = engine();
    let (k, fp) = (key("retried"), Fingerprint::of_bytes(b"x"));
    let rules = Rules::default();
    let m = engine.metrics();
    let first = engine.run(&k, fp, &rules, || answer(Duration::ZERO)).await;
    assert!(matches!(first, Outcome::Executed(())), "got {first:?}");
    // Not cached by its completion: the first retry reads the store.
    let second = engine.run(&k, fp, &rules, || answer(Duration::ZERO)).await;
    assert!(matches!(second, Outcome::Replayed(_)), "got {second:?}");
    assert_eq!(m.cache_hits.load(Ordering::SeqCst), 0);
    assert_eq!(engine.store().faults.reserves.load(Ordering::SeqCst), 2);
    // From then on, the cache answers.
    for _ in 0..3 {
        let again = engine.run(&k, fp, &rules, || answer(Duration::ZERO)).await;
        assert!(matches!(again, Outcome::Replayed(_)), "got {again:?}");
    }
    assert_eq!(m.cache_hits.load(Ordering::SeqCst), 3);
    assert_eq!(engine.store().faults.reserves.load(Ordering::SeqCst), 2);
    // Another fingerprint on a cached key is still a mismatch.
    let other = engine
        .run(&k, Fingerprint::of_bytes(b"y"), &rules, || {
            answer(Duration::ZERO)
        })
        .await;
    assert!(matches!(other, Outcome::Mismatch), "got {other:?}");
}

/// 50 callers of one key at a barrier, `wait`, a slow operation: it runs
/// once, the 49 others replay, and the next caller is a cache hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_cache_the_answer_and_the_next_retry_hits_it() {
    let engine = Arc::new(engine());
    let (k, fp) = (key("burst"), Fingerprint::of_bytes(b"x"));
    let rules = Rules {
        concurrent: Concurrent::Wait,
        wait_timeout: Duration::from_secs(10),
        ..Rules::default()
    };
    let barrier = Arc::new(Barrier::new(50));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (engine, k, rules, barrier) = (
            Arc::clone(&engine),
            k.clone(),
            rules.clone(),
            Arc::clone(&barrier),
        );
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            engine
                .run(&k, fp, &rules, || answer(Duration::from_millis(200)))
                .await
        }));
    }
    let (mut executed, mut replayed) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Outcome::Executed(()) => executed += 1,
            Outcome::Replayed(_) => replayed += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((executed, replayed), (1, 49));
    let hits = engine.metrics().cache_hits.load(Ordering::SeqCst);
    let next = engine.run(&k, fp, &rules, || answer(Duration::ZERO)).await;
    assert!(matches!(next, Outcome::Replayed(_)), "got {next:?}");
    assert_eq!(engine.metrics().cache_hits.load(Ordering::SeqCst), hits + 1);
}
