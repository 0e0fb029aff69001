//! The store conformance suite: every property of protocol §7 as a generic test.
//! Every store runs exactly these functions (see `conformance!` in main.rs).
//!
//! Time-based properties use real time with short leases, since remote
//! stores keep their own clocks.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use idem::policy::Concurrent;
use idem::record::Record;
use idem::store::{Fence, Reservation, Store, StoreError, Subscription};
use idem::{
    Action, CompletedRecord, Engine, EngineConfig, Fingerprint, Finish, Outcome, Rules, Scope,
    StoreKey, StoredResponse, Token,
};
use tokio::sync::Barrier;

const LEASE: Duration = Duration::from_secs(30);
const RETAIN: Duration = Duration::from_secs(3600);

/// A key no other test (or earlier run) uses.
pub fn fresh_key(name: &str) -> StoreKey {
    let run: u64 = rand::random();
    StoreKey::new(&Scope::named(&format!("conformance-{run:016x}")), name)
}

fn fp(s: &str) -> Fingerprint {
    Fingerprint::of_bytes(s.as_bytes())
}

fn record(fingerprint: Fingerprint, body: &'static str) -> Arc<CompletedRecord> {
    let now = SystemTime::now();
    Arc::new(CompletedRecord {
        fingerprint,
        response: StoredResponse {
            status: 201,
            headers: vec![
                (
                    "content-type".into(),
                    Bytes::from_static(b"application/json"),
                ),
                ("set-cookie".into(), Bytes::from_static(b"a=1")),
                ("set-cookie".into(), Bytes::from_static(b"b=2")),
            ],
            body: Bytes::from_static(body.as_bytes()),
        },
        completed_at: now,
        expires_at: now + RETAIN,
    })
}

async fn acquire<S: Store>(s: &S, k: &StoreKey, f: Fingerprint, lease: Duration) -> Token {
    match s.reserve(k, f, lease).await.expect("reserve") {
        Reservation::Acquired(l) => l.token,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

pub async fn reserve_is_exclusive<S: Store>(store: Arc<S>, rounds: usize) {
    const TASKS: usize = 200;
    for round in 0..rounds {
        let k = fresh_key("exclusive");
        let barrier = Arc::new(Barrier::new(TASKS));
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let (store, barrier, k) = (Arc::clone(&store), Arc::clone(&barrier), k.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    store.reserve(&k, fp("same"), LEASE).await
                })
            })
            .collect();
        let mut acquired = 0;
        for t in tasks {
            match t.await.expect("task").expect("reserve") {
                Reservation::Acquired(_) => acquired += 1,
                Reservation::InFlight { .. } => {}
                other => panic!("round {round}: unexpected {other:?}"),
            }
        }
        assert_eq!(
            acquired, 1,
            "round {round}: {acquired} of {TASKS} concurrent reserves acquired the key; \
             more than one means duplicate execution"
        );
    }
}

pub async fn complete_then_replay<S: Store>(store: Arc<S>) {
    let k = fresh_key("replay");
    let t = acquire(&*store, &k, fp("a"), LEASE).await;
    match store.reserve(&k, fp("a"), LEASE).await.expect("reserve") {
        Reservation::InFlight { lease_remaining } => {
            assert!(lease_remaining > Duration::ZERO && lease_remaining <= LEASE);
        }
        other => panic!("expected InFlight, got {other:?}"),
    }
    let rec = record(fp("a"), "{\"order\":1}");
    assert_eq!(
        store
            .complete(&k, t, Arc::clone(&rec), RETAIN)
            .await
            .expect("complete"),
        Fence::Held
    );
    match store.reserve(&k, fp("a"), LEASE).await.expect("reserve") {
        Reservation::Completed(r) => {
            assert_eq!(r.response, rec.response, "replay must be exact");
            assert_eq!(r.fingerprint, rec.fingerprint);
        }
        other => panic!("expected Completed, got {other:?}"),
    }
    match store.get(&k).await.expect("get") {
        Some(Record::Completed(r)) => assert_eq!(r.response, rec.response),
        other => panic!("expected Completed, got {other:?}"),
    }
    // The holder's retried complete (its reply lost) is acknowledged, and
    // the first record stays.
    assert_eq!(
        store
            .complete(&k, t, record(fp("a"), "other"), RETAIN)
            .await
            .expect("complete"),
        Fence::Held
    );
    match store.get(&k).await.expect("get") {
        Some(Record::Completed(r)) => assert_eq!(r.response, rec.response),
        other => panic!("expected Completed, got {other:?}"),
    }
    // Anyone else's token is fenced.
    assert_eq!(
        store
            .complete(&k, Token::generate(), record(fp("a"), "other"), RETAIN)
            .await
            .expect("complete"),
        Fence::Lost
    );
}

pub async fn mismatch<S: Store>(store: Arc<S>) {
    let k = fresh_key("mismatch");
    let t = acquire(&*store, &k, fp("a"), LEASE).await;
    assert!(matches!(
        store.reserve(&k, fp("b"), LEASE).await.expect("reserve"),
        Reservation::Mismatch
    ));
    store
        .complete(&k, t, record(fp("a"), "x"), RETAIN)
        .await
        .expect("complete");
    assert!(matches!(
        store.reserve(&k, fp("b"), LEASE).await.expect("reserve"),
        Reservation::Mismatch
    ));
}

pub async fn release_then_reserve<S: Store>(store: Arc<S>) {
    let k = fresh_key("release");
    let t = acquire(&*store, &k, fp("a"), LEASE).await;
    assert_eq!(store.release(&k, t).await.expect("release"), Fence::Held);
    assert!(store.get(&k).await.expect("get").is_none());
    let t2 = acquire(&*store, &k, fp("a"), LEASE).await;
    assert_ne!(t, t2);
    // Released with the old token again: fenced.
    assert_eq!(store.release(&k, t).await.expect("release"), Fence::Lost);
    assert!(store.get(&k).await.expect("get").is_some());
}

pub async fn lease_expiry_and_fencing<S: Store>(store: Arc<S>) {
    // Margins of half a lease: a remote store on a loaded machine can take
    // a good part of 100 ms per call.
    let short = Duration::from_millis(1000);
    let k = fresh_key("lease");
    let old = acquire(&*store, &k, fp("a"), short).await;
    // A heartbeat keeps it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        store.extend(&k, old, short).await.expect("extend"),
        Fence::Held
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(matches!(
        store.reserve(&k, fp("a"), short).await.expect("reserve"),
        Reservation::InFlight { .. }
    ));
    // Silence: the lease runs out and another holder takes over.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let new = acquire(&*store, &k, fp("a"), LEASE).await;
    assert_ne!(old, new);
    assert_eq!(
        store.extend(&k, old, LEASE).await.expect("extend"),
        Fence::Lost
    );
    assert_eq!(
        store
            .complete(&k, old, record(fp("a"), "stale"), RETAIN)
            .await
            .expect("complete"),
        Fence::Lost
    );
    assert_eq!(store.release(&k, old).await.expect("release"), Fence::Lost);
    assert!(matches!(
        store.get(&k).await.expect("get"),
        Some(Record::InFlight { .. })
    ));
    assert_eq!(
        store
            .complete(&k, new, record(fp("a"), "fresh"), RETAIN)
            .await
            .expect("complete"),
        Fence::Held
    );
    match store.get(&k).await.expect("get") {
        Some(Record::Completed(r)) => assert_eq!(r.response.body, "fresh"),
        other => panic!("expected the new holder's record, got {other:?}"),
    }
}

pub async fn retention_expiry<S: Store>(store: Arc<S>) {
    let k = fresh_key("retention");
    let t = acquire(&*store, &k, fp("a"), LEASE).await;
    store
        .complete(&k, t, record(fp("a"), "x"), Duration::from_millis(300))
        .await
        .expect("complete");
    assert!(store.get(&k).await.expect("get").is_some());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        store.get(&k).await.expect("get").is_none(),
        "retention ran out"
    );
    acquire(&*store, &k, fp("b"), LEASE).await;
}

pub async fn purge<S: Store>(store: Arc<S>) {
    let k = fresh_key("purge");
    assert!(!store.purge(&k).await.expect("purge"));
    let t = acquire(&*store, &k, fp("a"), LEASE).await;
    store
        .complete(&k, t, record(fp("a"), "x"), RETAIN)
        .await
        .expect("complete");
    assert!(store.purge(&k).await.expect("purge"));
    assert!(store.get(&k).await.expect("get").is_none());
    acquire(&*store, &k, fp("b"), LEASE).await;
}

pub async fn a_change_wakes_subscribers<S: Store>(store: Arc<S>) {
    for change in ["complete", "release", "purge"] {
        let k = fresh_key("wake");
        let t = acquire(&*store, &k, fp("a"), LEASE).await;
        // A waiter first finds the key in flight (that is what makes it
        // wait), then subscribes. Stores may skip notifications for
        // records nobody found in flight.
        assert!(matches!(
            store.reserve(&k, fp("a"), LEASE).await.expect("reserve"),
            Reservation::InFlight { .. }
        ));
        let mut sub = store.subscribe(&k).await.expect("subscribe");
        let waiter = tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(5), sub.changed()).await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        match change {
            "complete" => {
                store
                    .complete(&k, t, record(fp("a"), "x"), RETAIN)
                    .await
                    .expect("complete");
            }
            "release" => {
                store.release(&k, t).await.expect("release");
            }
            _ => {
                store.purge(&k).await.expect("purge");
            }
        }
        assert!(
            waiter.await.expect("task").is_ok(),
            "{change} must wake a subscriber"
        );
    }
}

/// Wraps a store and loses every notification: waiters must still finish
/// by polling.
pub struct Deaf<S>(pub Arc<S>);

impl<S: Store> Store for Deaf<S> {
    async fn reserve(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Reservation, StoreError> {
        self.0.reserve(key, fingerprint, lease).await
    }
    async fn complete(
        &self,
        key: &StoreKey,
        token: Token,
        record: Arc<CompletedRecord>,
        retention: Duration,
    ) -> Result<Fence, StoreError> {
        self.0.complete(key, token, record, retention).await
    }
    async fn release(&self, key: &StoreKey, token: Token) -> Result<Fence, StoreError> {
        self.0.release(key, token).await
    }
    async fn extend(
        &self,
        key: &StoreKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        self.0.extend(key, token, lease).await
    }
    async fn get(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        self.0.get(key).await
    }
    async fn purge(&self, key: &StoreKey) -> Result<bool, StoreError> {
        self.0.purge(key).await
    }
    async fn subscribe(&self, key: &StoreKey) -> Result<Subscription, StoreError> {
        Ok(Subscription::never(key))
    }
}

/// Waiters (in `wait` mode, in two engines = two "instances") get the first
/// execution's answer, with notifications working or lost.
pub async fn waiters_finish<S: Store>(store: Arc<S>, deaf: bool) {
    let config = EngineConfig {
        poll_interval: Duration::from_millis(100),
        local_cache_bytes: 0,
        ..EngineConfig::default()
    };
    let rules = Rules {
        concurrent: Concurrent::Wait,
        wait_timeout: Duration::from_secs(10),
        ..Rules::default()
    };
    let k = fresh_key(if deaf { "deaf" } else { "wake-waiters" });
    let runs = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (k, rules, runs, store, config) = (
            k.clone(),
            rules.clone(),
            Arc::clone(&runs),
            Arc::clone(&store),
            config.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let op = || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                let body = Bytes::from(format!("answer {i}"));
                Finish {
                    output: body.clone(),
                    action: Action::Store(StoredResponse {
                        status: 200,
                        headers: vec![],
                        body,
                    }),
                }
            };
            let outcome = if deaf {
                Engine::with_config(Deaf(store), config)
                    .run(&k, fp("w"), &rules, op)
                    .await
            } else {
                Engine::with_config(store, config)
                    .run(&k, fp("w"), &rules, op)
                    .await
            };
            match outcome {
                Outcome::Executed(b) => b,
                Outcome::Replayed(r) => r.response.body.clone(),
                other => panic!("a waiter got {other:?}"),
            }
        }));
    }
    let mut bodies = Vec::new();
    for t in tasks {
        bodies.push(t.await.expect("task"));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "executed more than once");
    assert!(bodies.iter().all(|b| *b == bodies[0]), "different answers");
}
