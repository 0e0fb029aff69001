//! Leases, heartbeats and fencing, on a paused clock.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem::record::Record;
use idem::store::memory::MemoryStore;
use idem::store::{Fence, Reservation, Store};
use idem::{
    Action, CompletedRecord, Engine, Fingerprint, Finish, Outcome, Rules, Scope, StoreKey,
    StoredResponse,
};

const LEASE: Duration = Duration::from_secs(30);

fn key(name: &str) -> StoreKey {
    StoreKey::new(&Scope::named("leases"), name)
}

fn answer(body: &'static str) -> StoredResponse {
    StoredResponse {
        status: 200,
        headers: vec![],
        body: body.into(),
    }
}

fn record(fp: Fingerprint, body: &'static str) -> Arc<CompletedRecord> {
    let now = std::time::SystemTime::now();
    Arc::new(CompletedRecord {
        fingerprint: fp,
        response: answer(body),
        completed_at: now,
        expires_at: now + Duration::from_secs(3600),
    })
}

#[tokio::test(start_paused = true)]
async fn a_silent_holder_loses_its_lease_and_is_fenced_out() {
    let store = MemoryStore::new();
    let (k, fp) = (key("silent"), Fingerprint::of_bytes(b"x"));
    let Reservation::Acquired(old) = store.reserve(&k, fp, LEASE).await.expect("reserve") else {
        panic!("first reserve must acquire");
    };
    // Within the lease the key is held.
    tokio::time::advance(LEASE - Duration::from_secs(1)).await;
    assert!(matches!(
        store.reserve(&k, fp, LEASE).await.expect("reserve"),
        Reservation::InFlight { .. }
    ));
    // No heartbeat: after the lease anyone may take it over.
    tokio::time::advance(Duration::from_secs(2)).await;
    let Reservation::Acquired(new) = store.reserve(&k, fp, LEASE).await.expect("reserve") else {
        panic!("an expired lease must be taken over");
    };
    assert_ne!(old.token, new.token);
    // The stale holder wakes up: every fenced operation is refused.
    assert_eq!(
        store.extend(&k, old.token, LEASE).await.expect("extend"),
        Fence::Lost
    );
    assert_eq!(
        store
            .complete(&k, old.token, record(fp, "stale"), LEASE)
            .await
            .expect("complete"),
        Fence::Lost
    );
    assert_eq!(
        store.release(&k, old.token).await.expect("release"),
        Fence::Lost
    );
    assert!(
        matches!(
            store.get(&k).await.expect("get"),
            Some(Record::InFlight { .. })
        ),
        "the stale complete must store nothing"
    );
    // The new holder completes normally.
    assert_eq!(
        store
            .complete(&k, new.token, record(fp, "fresh"), LEASE)
            .await
            .expect("complete"),
        Fence::Held
    );
    match store.get(&k).await.expect("get") {
        Some(Record::Completed(r)) => assert_eq!(r.response.body, "fresh"),
        other => panic!("expected the new holder's record, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn heartbeat_keeps_a_long_operation_alive() {
    let engine = Engine::new(MemoryStore::new());
    let (k, fp) = (key("long"), Fingerprint::of_bytes(b"x"));
    let rules = Rules {
        lease: LEASE,
        ..Rules::default()
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let long = {
        let (engine, k, rules, runs) =
            (engine.clone(), k.clone(), rules.clone(), Arc::clone(&runs));
        tokio::spawn(async move {
            engine
                .run(&k, fp, &rules, || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    // Three leases long.
                    tokio::time::sleep(LEASE * 3).await;
                    Finish {
                        output: (),
                        action: Action::Store(answer("done")),
                    }
                })
                .await
        })
    };
    tokio::time::sleep(LEASE * 2).await;
    let dup = engine
        .run(&k, fp, &rules, || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Finish {
                output: (),
                action: Action::Release,
            }
        })
        .await;
    assert!(
        matches!(dup, Outcome::InProgress { .. }),
        "a live holder with heartbeat must not be taken over: {dup:?}"
    );
    assert!(matches!(long.await.expect("task"), Outcome::Executed(())));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_dead_holders_key_executes_again_after_the_lease() {
    let store = MemoryStore::new();
    let engine = Engine::new(store.clone());
    let (k, fp) = (key("dead"), Fingerprint::of_bytes(b"x"));
    let rules = Rules {
        lease: LEASE,
        ..Rules::default()
    };
    // A holder that reserved and died (no heartbeat, no release).
    assert!(matches!(
        store.reserve(&k, fp, LEASE).await.expect("reserve"),
        Reservation::Acquired(_)
    ));
    let op = || async {
        Finish {
            output: "ran",
            action: Action::Store(answer("ran")),
        }
    };
    assert!(matches!(
        engine.run(&k, fp, &rules, op).await,
        Outcome::InProgress { .. }
    ));
    tokio::time::advance(LEASE + Duration::from_millis(1)).await;
    assert!(matches!(
        engine.run(&k, fp, &rules, op).await,
        Outcome::Executed("ran")
    ));
    assert!(matches!(
        engine.run(&k, fp, &rules, op).await,
        Outcome::Replayed(_)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_request_releases_its_reservation_under_ambiguous_release() {
    // Only `ambiguous = release` frees the key of a cancelled execution; the
    // default holds it (tests/cancel.rs).
    let engine = Engine::new(MemoryStore::new());
    let (k, fp) = (key("cancel"), Fingerprint::of_bytes(b"x"));
    let rules = Rules {
        ambiguous: idem::policy::Ambiguous::Release,
        ..Rules::default()
    };
    let running = engine.run(&k, fp, &rules, || async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Finish {
            output: (),
            action: Action::Release,
        }
    });
    // Cancel it mid-operation.
    let _ = tokio::time::timeout(Duration::from_secs(1), running).await;
    // The guard's release runs in the background.
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let again = engine
        .run(&k, fp, &rules, || async {
            Finish {
                output: 1,
                action: Action::Release,
            }
        })
        .await;
    assert!(matches!(again, Outcome::Executed(1)), "got {again:?}");
}

#[tokio::test(start_paused = true)]
async fn retention_expiry_forgets_the_answer() {
    let engine = Engine::with_config(
        MemoryStore::new(),
        idem::EngineConfig {
            local_cache_bytes: 0,
            ..Default::default()
        },
    );
    let (k, fp) = (key("retention"), Fingerprint::of_bytes(b"x"));
    let rules = Rules {
        retention: Duration::from_secs(60),
        ..Rules::default()
    };
    let op = || async {
        Finish {
            output: (),
            action: Action::Store(answer("a")),
        }
    };
    assert!(matches!(
        engine.run(&k, fp, &rules, op).await,
        Outcome::Executed(())
    ));
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(matches!(
        engine.run(&k, fp, &rules, op).await,
        Outcome::Replayed(_)
    ));
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(matches!(
        engine.run(&k, fp, &rules, op).await,
        Outcome::Executed(())
    ));
}
