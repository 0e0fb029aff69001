//! Waiting duplicates (protocol §5 `wait`) cost nothing once nobody waits
//! (issue 10, item 15): a key's single-flight watcher stops with its last
//! waiter, the number of watchers is capped, and a waiter is counted once.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

#[path = "support/faulty.rs"]
mod faulty;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use faulty::Faulty;
use idem::policy::Concurrent;
use idem::record::Record;
use idem::store::memory::MemoryStore;
use idem::store::{Fence, Reservation, Store};
use idem::{
    Action, CompletedRecord, Engine, EngineConfig, Fingerprint, Finish, Outcome, Rules, Scope,
    StoreKey, StoredResponse,
};
use tokio::sync::Barrier;

fn key(name: &str) -> StoreKey {
    StoreKey::new(&Scope::named("waiters"), name)
}

fn config() -> EngineConfig {
    EngineConfig {
        local_cache_bytes: 0,
        ..EngineConfig::default()
    }
}

fn wait_rules(wait_timeout: Duration) -> Rules {
    Rules {
        concurrent: Concurrent::Wait,
        wait_timeout,
        ..Rules::default()
    }
}

/// Reserves `k` directly in the store: a holder that never finishes on
/// its own (its lease is 30 s).
async fn hold<S: Store>(store: &S, k: &StoreKey, fp: Fingerprint) -> idem::Token {
    match store.reserve(k, fp, Duration::from_secs(30)).await.unwrap() {
        Reservation::Acquired(lease) => lease.token,
        other => panic!("expected to acquire, got {other:?}"),
    }
}

async fn nothing() -> Finish<()> {
    Finish {
        output: (),
        action: Action::Release,
    }
}

#[tokio::test(start_paused = true)]
async fn a_watcher_stops_polling_when_its_last_waiter_gave_up() {
    let store = Faulty::new(MemoryStore::new());
    let faults = Arc::clone(&store.faults);
    let engine = Engine::with_config(store, config());
    let (k, fp) = (key("abandoned"), Fingerprint::of_bytes(b"x"));
    hold(engine.store(), &k, fp).await;
    let waited = engine
        .run(&k, fp, &wait_rules(Duration::from_millis(200)), nothing)
        .await;
    assert!(
        matches!(waited, Outcome::InProgress { .. }),
        "got {waited:?}"
    );
    // Let the watcher notice, then count its polls over one second.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = faults.gets.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let polls = faults.gets.load(Ordering::SeqCst) - before;
    assert_eq!(
        polls, 0,
        "the key's watcher polled the store {polls} times in 1 s with nobody waiting"
    );
}

#[tokio::test(start_paused = true)]
async fn a_completed_record_of_another_request_counts_as_a_mismatch_only() {
    let store = MemoryStore::new();
    let engine = Engine::with_config(store.clone(), config());
    let k = key("other-request");
    let (mine, theirs) = (
        Fingerprint::of_bytes(b"mine"),
        Fingerprint::of_bytes(b"theirs"),
    );
    let first = hold(&store, &k, mine).await;
    let waiter = {
        let (engine, k) = (engine.clone(), k.clone());
        tokio::spawn(async move {
            engine
                .run(&k, mine, &wait_rules(Duration::from_secs(10)), nothing)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The holder lets go and, before the waiter looks again, another
    // request takes the key and completes it.
    assert_eq!(store.release(&k, first).await.unwrap(), Fence::Held);
    let second = hold(&store, &k, theirs).await;
    let now = std::time::SystemTime::now();
    let record = Arc::new(CompletedRecord {
        fingerprint: theirs,
        response: StoredResponse {
            status: 200,
            headers: vec![],
            body: "theirs".into(),
        },
        completed_at: now,
        expires_at: now + Duration::from_secs(60),
    });
    let done = store.complete(&k, second, record, Duration::from_secs(60));
    assert_eq!(done.await.unwrap(), Fence::Held);
    assert!(matches!(
        store.get(&k).await.unwrap(),
        Some(Record::Completed(_))
    ));
    let outcome = waiter.await.unwrap();
    assert!(matches!(outcome, Outcome::Mismatch), "got {outcome:?}");
    let m = engine.metrics();
    assert_eq!(
        (
            m.waited.load(Ordering::Relaxed),
            m.mismatch.load(Ordering::Relaxed)
        ),
        (0, 1),
        "(waited, mismatch): one waiter is one outcome"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_max_watchers_a_waiter_is_answered_409_at_once() {
    const KEYS: usize = 20;
    const CAP: usize = 5;
    let store = MemoryStore::new();
    let engine = Engine::with_config(
        store.clone(),
        EngineConfig {
            max_watchers: CAP,
            ..config()
        },
    );
    let fp = Fingerprint::of_bytes(b"x");
    let keys: Vec<StoreKey> = (0..KEYS).map(|i| key(&format!("capped-{i}"))).collect();
    let mut tokens = Vec::new();
    for k in &keys {
        tokens.push(hold(&store, k, fp).await);
    }
    let barrier = Arc::new(Barrier::new(KEYS));
    let answered = Arc::new(AtomicUsize::new(0));
    let waiters: Vec<_> = keys
        .iter()
        .map(|k| {
            let (engine, k) = (engine.clone(), k.clone());
            let (barrier, answered) = (Arc::clone(&barrier), Arc::clone(&answered));
            tokio::spawn(async move {
                barrier.wait().await;
                let outcome = engine
                    .run(&k, fp, &wait_rules(Duration::from_secs(30)), nothing)
                    .await;
                answered.fetch_add(1, Ordering::SeqCst);
                outcome
            })
        })
        .collect();
    // Waiters past the cap are answered at once; the others wait.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while answered.load(Ordering::SeqCst) < KEYS - CAP {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of the {} waiters past the cap were answered",
            answered.load(Ordering::SeqCst),
            KEYS - CAP
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        answered.load(Ordering::SeqCst),
        KEYS - CAP,
        "waiters within the cap wait"
    );
    assert_eq!(engine.metrics().watchers.load(Ordering::SeqCst), CAP as u64);
    // The holders finish: the waiting ones replay.
    for (k, token) in keys.iter().zip(tokens) {
        let now = std::time::SystemTime::now();
        let record = Arc::new(CompletedRecord {
            fingerprint: fp,
            response: StoredResponse {
                status: 200,
                headers: vec![],
                body: "done".into(),
            },
            completed_at: now,
            expires_at: now + Duration::from_secs(60),
        });
        let done = store.complete(k, token, record, Duration::from_secs(60));
        assert_eq!(done.await.unwrap(), Fence::Held);
    }
    let (mut in_progress, mut replayed) = (0, 0);
    for w in waiters {
        match w.await.unwrap() {
            Outcome::InProgress { .. } => in_progress += 1,
            Outcome::Replayed(_) => replayed += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        (in_progress, replayed),
        (KEYS - CAP, CAP),
        "(409 at once, replayed after waiting)"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while engine.metrics().watchers.load(Ordering::SeqCst) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "watchers never stopped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
