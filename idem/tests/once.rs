//! The function-level API (protocol §8): run a closure at most once per key.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem::policy::Concurrent;
use idem::store::memory::MemoryStore;
use idem::{Engine, Fingerprint, OnceError, Rules, Scope, StoreKey};
use tokio::sync::Barrier;

fn key(name: &str) -> StoreKey {
    StoreKey::new(&Scope::named("jobs"), name)
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Charge {
    id: u32,
    cents: u64,
}

#[tokio::test]
async fn errors_release_the_key_and_a_retry_runs_again() {
    let engine = Engine::new(MemoryStore::new());
    let (k, fp) = (key("flaky"), Fingerprint::of_bytes(b"job 1"));
    let rules = Rules::default();
    let first = engine
        .once(&k, fp, &rules, || async {
            Err::<Charge, _>("gateway down")
        })
        .await;
    assert!(matches!(first, Err(OnceError::Failed("gateway down"))));
    let second = engine
        .once(&k, fp, &rules, || async {
            Ok::<_, &str>(Charge { id: 1, cents: 500 })
        })
        .await
        .expect("second run");
    assert!(!second.replayed);
    let third = engine
        .once(&k, fp, &rules, || async {
            Ok::<_, &str>(Charge { id: 2, cents: 1 })
        })
        .await
        .expect("replay");
    assert!(third.replayed);
    assert_eq!(third.value, Charge { id: 1, cents: 500 });
}

#[tokio::test]
async fn another_input_under_the_same_key_is_refused() {
    let engine = Engine::new(MemoryStore::new());
    let rules = Rules::default();
    let k = key("reuse");
    engine
        .once(&k, Fingerprint::of_bytes(b"a"), &rules, || async {
            Ok::<_, ()>(1)
        })
        .await
        .expect("first");
    let other = engine
        .once(&k, Fingerprint::of_bytes(b"b"), &rules, || async {
            Ok::<_, ()>(2)
        })
        .await;
    assert!(matches!(other, Err(OnceError::Mismatch)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redelivered_burst_runs_the_job_once() {
    const N: usize = 50;
    let engine = Engine::new(MemoryStore::new());
    let rules = Rules {
        concurrent: Concurrent::Wait,
        ..Rules::default()
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(N));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let (engine, rules, runs, barrier) = (
                engine.clone(),
                rules.clone(),
                Arc::clone(&runs),
                Arc::clone(&barrier),
            );
            tokio::spawn(async move {
                barrier.wait().await;
                engine
                    .once(
                        &key("burst"),
                        Fingerprint::of_bytes(b"msg"),
                        &rules,
                        || async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Ok::<_, ()>(i)
                        },
                    )
                    .await
            })
        })
        .collect();
    let mut values = Vec::new();
    for t in tasks {
        values.push(t.await.expect("task").expect("value").value);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the job ran more than once");
    assert!(
        values.iter().all(|v| *v == values[0]),
        "consumers got different results"
    );
}
