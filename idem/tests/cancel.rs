//! A started execution that is cancelled or panics never frees its key by
//! itself (issue 10, item 1, engine side; protocol §3.8).
//!
//! `Engine::once` under a caller's `tokio::time::timeout` or `select!`, or
//! any direct `Engine::run` whose future is dropped, stops the operation
//! half-way: its effect may have happened. Were the key released, the
//! retry would run the effect a second time. The route's `ambiguous`
//! policy decides instead: `hold` (default) and `store` keep the
//! reservation until its lease runs out, only `release` frees it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem::policy::Ambiguous;
use idem::store::memory::MemoryStore;
use idem::{Action, Engine, Fingerprint, Finish, OnceError, Outcome, Rules, Scope, StoreKey};

const LEASE: Duration = Duration::from_secs(30);

fn key(name: &str) -> StoreKey {
    StoreKey::new(&Scope::named("cancel"), name)
}

/// A job that counts its runs and takes a second: its effect (the count)
/// happens at once, its answer comes late.
async fn slow_job(runs: &AtomicUsize) -> Result<u32, std::io::Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(7)
}

/// Lets the engine's background work (if any) run.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test(start_paused = true)]
async fn a_once_cut_short_by_a_timeout_is_not_run_again() {
    let engine = Engine::new(MemoryStore::new());
    let (k, fp) = (key("timeout"), Fingerprint::of_bytes(b"job"));
    let rules = Rules::default();
    let runs = AtomicUsize::new(0);
    let cut = tokio::time::timeout(
        Duration::from_millis(100),
        engine.once(&k, fp, &rules, || slow_job(&runs)),
    )
    .await;
    assert!(cut.is_err(), "the caller's time-out must fire first");
    settle().await;
    let again = engine.once(&k, fp, &rules, || slow_job(&runs)).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the retry ran the job a second time: a cancelled execution freed its key"
    );
    assert!(
        matches!(again, Err(OnceError::InProgress { retry_after }) if retry_after <= LEASE),
        "a retry within the lease must find the key held, got {again:?}"
    );
    assert_eq!(engine.metrics().cancelled.load(Ordering::Relaxed), 1);
    // The hold ends with the lease: then a retry runs the job.
    tokio::time::sleep(LEASE).await;
    let later = engine.once(&k, fp, &rules, || slow_job(&runs)).await;
    assert!(matches!(later, Ok(ref o) if !o.replayed), "got {later:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// An operation for `Engine::run` that counts its runs and never ends.
async fn endless(runs: &AtomicUsize) -> Finish<()> {
    runs.fetch_add(1, Ordering::SeqCst);
    std::future::pending::<()>().await;
    Finish {
        output: (),
        action: Action::Release,
    }
}

async fn quick(runs: &AtomicUsize) -> Finish<u8> {
    runs.fetch_add(1, Ordering::SeqCst);
    Finish {
        output: 1,
        action: Action::Release,
    }
}

#[tokio::test(start_paused = true)]
async fn a_run_that_loses_a_select_holds_its_key_under_hold_and_store() {
    for ambiguous in [Ambiguous::Hold, Ambiguous::Store] {
        let engine = Engine::new(MemoryStore::new());
        let (k, fp) = (key("select"), Fingerprint::of_bytes(b"x"));
        let rules = Rules {
            ambiguous,
            ..Rules::default()
        };
        let runs = AtomicUsize::new(0);
        tokio::select! {
            _ = engine.run(&k, fp, &rules, || endless(&runs)) => panic!("it never ends"),
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        settle().await;
        let again = engine.run(&k, fp, &rules, || quick(&runs)).await;
        assert!(
            matches!(again, Outcome::InProgress { .. }),
            "{ambiguous:?}: a cancelled execution must keep its key, got {again:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{ambiguous:?}");
        assert_eq!(engine.metrics().cancelled.load(Ordering::Relaxed), 1);
        assert_eq!(engine.metrics().in_flight.load(Ordering::Relaxed), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn under_ambiguous_release_a_cancelled_run_frees_its_key() {
    let engine = Engine::new(MemoryStore::new());
    let (k, fp) = (key("release"), Fingerprint::of_bytes(b"x"));
    let rules = Rules {
        ambiguous: Ambiguous::Release,
        ..Rules::default()
    };
    let runs = AtomicUsize::new(0);
    let cut = tokio::time::timeout(
        Duration::from_millis(50),
        engine.run(&k, fp, &rules, || endless(&runs)),
    )
    .await;
    assert!(cut.is_err());
    settle().await;
    let again = engine.run(&k, fp, &rules, || quick(&runs)).await;
    assert!(matches!(again, Outcome::Executed(1)), "got {again:?}");
    assert_eq!(engine.metrics().cancelled.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_operation_holds_its_key() {
    let engine = Engine::new(MemoryStore::new());
    let (k, fp) = (key("panic"), Fingerprint::of_bytes(b"x"));
    let runs = Arc::new(AtomicUsize::new(0));
    let task = {
        let (engine, k, runs) = (engine.clone(), k.clone(), Arc::clone(&runs));
        tokio::spawn(async move {
            engine
                .once(&k, fp, &Rules::default(), || async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    assert!(n > 0, "the job blew up after its effect");
                    Ok::<u32, std::io::Error>(1)
                })
                .await
        })
    };
    let joined = task.await;
    assert!(
        joined.is_err_and(|e| e.is_panic()),
        "the panic goes on to the caller"
    );
    settle().await;
    let again = engine
        .once(&k, fp, &Rules::default(), || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<u32, std::io::Error>(2)
        })
        .await;
    assert!(
        matches!(again, Err(OnceError::InProgress { .. })),
        "a panicked execution must keep its key, got {again:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(engine.metrics().cancelled.load(Ordering::Relaxed), 1);
}
