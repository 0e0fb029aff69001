//! Race regression tests: many tasks released together at a barrier against
//! one key. A failure means the side effect would have happened twice.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use idem::policy::Concurrent;
use idem::store::memory::MemoryStore;
use idem::store::{Reservation, Store};
use idem::{Action, Engine, Fingerprint, Finish, Outcome, Rules, Scope, StoreKey, StoredResponse};
use tokio::sync::Barrier;

const TASKS: usize = 200;

fn key(n: usize) -> StoreKey {
    StoreKey::new(&Scope::named("races"), &format!("key-{n}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reserve_is_exclusive_under_a_burst() {
    let store = MemoryStore::new();
    let fp = Fingerprint::of_bytes(b"same request");
    for round in 0..100 {
        let barrier = Arc::new(Barrier::new(TASKS));
        let k = key(round);
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let (store, barrier, k) = (store.clone(), Arc::clone(&barrier), k.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    store.reserve(&k, fp, Duration::from_secs(30)).await
                })
            })
            .collect();
        let mut acquired = 0;
        for t in tasks {
            match t.await.expect("task").expect("memory store never fails") {
                Reservation::Acquired(_) => acquired += 1,
                Reservation::InFlight { .. } => {}
                other => panic!("round {round}: unexpected {other:?}"),
            }
        }
        assert_eq!(
            acquired, 1,
            "round {round}: {acquired} of {TASKS} concurrent reserves won; \
             more than one means duplicate execution"
        );
    }
}

async fn burst(concurrent: Concurrent, round: usize) -> (usize, Vec<Outcome<Bytes>>) {
    let engine = Engine::new(MemoryStore::new());
    let executions = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(TASKS));
    let rules = Rules {
        concurrent,
        wait_timeout: Duration::from_secs(10),
        ..Rules::default()
    };
    let k = key(round);
    let fp = Fingerprint::of_bytes(b"pay 10");
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let (engine, barrier, executions, rules, k) = (
                engine.clone(),
                Arc::clone(&barrier),
                Arc::clone(&executions),
                rules.clone(),
                k.clone(),
            );
            tokio::spawn(async move {
                barrier.wait().await;
                engine
                    .run(&k, fp, &rules, || async move {
                        executions.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        // Each execution answers differently: a duplicate
                        // would show as a second distinct body.
                        let body = Bytes::from(format!("order created by task {i}"));
                        Finish {
                            output: body.clone(),
                            action: Action::Store(StoredResponse {
                                status: 201,
                                headers: vec![],
                                body,
                            }),
                        }
                    })
                    .await
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(TASKS);
    for t in tasks {
        outcomes.push(t.await.expect("task"));
    }
    (executions.load(Ordering::SeqCst), outcomes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reject_mode_executes_once_and_rejects_the_rest() {
    for round in 0..10 {
        let (executions, outcomes) = burst(Concurrent::Reject, round).await;
        assert_eq!(
            executions, 1,
            "round {round}: the operation ran {executions} times"
        );
        let executed = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Executed(_)))
            .count();
        let rejected = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::InProgress { .. }))
            .count();
        assert_eq!(executed, 1, "round {round}");
        assert_eq!(executed + rejected, TASKS, "round {round}: {outcomes:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wait_mode_executes_once_and_everyone_gets_the_same_bytes() {
    for round in 0..10 {
        let (executions, outcomes) = burst(Concurrent::Wait, round).await;
        assert_eq!(
            executions, 1,
            "round {round}: the operation ran {executions} times"
        );
        let bodies: Vec<Bytes> = outcomes
            .into_iter()
            .map(|o| match o {
                Outcome::Executed(b) => b,
                Outcome::Replayed(r) => r.response.body.clone(),
                other => panic!("round {round}: a waiter got {other:?} instead of the answer"),
            })
            .collect();
        assert!(
            bodies.iter().all(|b| *b == bodies[0]),
            "round {round}: waiters got different answers"
        );
    }
}
