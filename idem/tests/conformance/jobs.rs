//! Job status on every store (protocol §13): `Engine::status`, attempts
//! counted across releases, transient and permanent failures, and a race.
//! Every store runs exactly these functions (see `jobs_conformance!` in
//! main.rs), through an `Engine` over the store.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem::store::Store;
use idem::{Engine, Fingerprint, JobError, JobFailure, JobStatus, OnceError, Rules};
use tokio::sync::{oneshot, Barrier};

use crate::suite::fresh_key;

/// An engine without the local cache, so every read reaches the store.
fn engine<S: Store>(s: Arc<S>) -> Engine<Arc<S>> {
    Engine::with_config(
        s,
        idem::EngineConfig {
            local_cache_bytes: 0,
            store_timeout: Duration::from_secs(10),
            ..Default::default()
        },
    )
}

fn wait_rules() -> Rules {
    Rules {
        wait_timeout: Duration::from_secs(30),
        ..Rules::wait()
    }
}

/// NotSeen → Running { attempt 1 } while the closure runs → Done.
pub async fn status_follows_a_run<S: Store>(s: Arc<S>) {
    let e = engine(s);
    let k = fresh_key("job-status");
    let fp = Fingerprint::of_bytes(b"job");
    assert_eq!(e.status(&k).await.expect("status"), JobStatus::NotSeen);

    let (started_tx, started_rx) = oneshot::channel::<u32>();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let runner = {
        let e = e.clone();
        let k = k.clone();
        tokio::spawn(async move {
            e.once_job(&k, fp, &wait_rules(), |attempt| async move {
                let _ = started_tx.send(attempt);
                let _ = go_rx.await;
                Ok::<_, JobError<String>>(7_u32)
            })
            .await
        })
    };
    assert_eq!(started_rx.await.expect("the closure ran"), 1);
    match e.status(&k).await.expect("status") {
        JobStatus::Running { attempt: 1, .. } => {}
        other => panic!("while the closure runs: expected Running {{ attempt: 1 }}, got {other:?}"),
    }
    go_tx.send(()).expect("the closure waits");
    let done = runner.await.expect("join").expect("once_job");
    assert_eq!((done.value, done.replayed), (7, false));
    assert!(
        matches!(e.status(&k).await.expect("status"), JobStatus::Done { .. }),
        "after the run: Done"
    );
}

/// A transient error releases the key and is counted; the next delivery
/// runs the closure again as attempt 2. `once`'s errors are transient too.
pub async fn transient_failure_releases_and_counts<S: Store>(s: Arc<S>) {
    let e = engine(s);
    let rules = wait_rules();
    let k = fresh_key("job-transient");
    let fp = Fingerprint::of_bytes(b"job");

    let first = e
        .once_job(&k, fp, &rules, |attempt| async move {
            assert_eq!(attempt, 1);
            Err::<u32, _>(JobError::Transient("upstream 503"))
        })
        .await;
    assert!(
        matches!(first, Err(OnceError::Failed("upstream 503"))),
        "{first:?}"
    );
    assert_eq!(
        e.status(&k).await.expect("status"),
        JobStatus::Released {
            attempts: 1,
            last_error: Some("upstream 503".into())
        }
    );

    // `once` (no classification): its error is transient, and counted.
    let second = e
        .once(&k, fp, &rules, || async {
            Err::<u32, _>(std::io::Error::other("reset"))
        })
        .await;
    assert!(matches!(second, Err(OnceError::Failed(_))), "{second:?}");
    assert_eq!(
        e.status(&k).await.expect("status"),
        JobStatus::Released {
            attempts: 2,
            last_error: None
        }
    );

    let (started_tx, started_rx) = oneshot::channel::<u32>();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let runner = {
        let e = e.clone();
        let k = k.clone();
        let rules = rules.clone();
        tokio::spawn(async move {
            e.once_job(&k, fp, &rules, |attempt| async move {
                let _ = started_tx.send(attempt);
                let _ = go_rx.await;
                Ok::<_, JobError<String>>(attempt)
            })
            .await
        })
    };
    assert_eq!(started_rx.await.expect("ran again"), 3);
    assert!(
        matches!(
            e.status(&k).await.expect("status"),
            JobStatus::Running { attempt: 3, .. }
        ),
        "the third delivery runs as attempt 3"
    );
    go_tx.send(()).expect("waiting");
    assert_eq!(runner.await.expect("join").expect("once_job").value, 3);
    assert!(matches!(
        e.status(&k).await.expect("status"),
        JobStatus::Done { .. }
    ));
}

/// A permanent error is stored: 50 concurrent redeliveries all get the
/// same failure, and the closure never runs again.
pub async fn permanent_failure_is_replayed<S: Store>(s: Arc<S>) {
    let e = engine(s);
    let rules = wait_rules();
    let k = fresh_key("job-permanent");
    let fp = Fingerprint::of_bytes(b"job");

    // One transient failure first: the count carries into the stored one.
    let _ = e
        .once_job(&k, fp, &rules, |_| async {
            Err::<u32, _>(JobError::Transient("timeout"))
        })
        .await;
    let long = format!("card declined: {}", "x".repeat(5000));
    let first = e
        .once_job(&k, fp, &rules, |attempt| {
            let long = long.clone();
            async move {
                assert_eq!(attempt, 2);
                Err::<u32, _>(JobError::Permanent(long))
            }
        })
        .await;
    let failure = match first {
        Err(OnceError::Permanent(f)) => f,
        other => panic!("expected Permanent, got {other:?}"),
    };
    assert_eq!(failure.attempts, 2);
    assert!(failure.last_error.starts_with("card declined: xxx"));
    assert!(
        failure.last_error.len() <= idem::store::MAX_ERROR_BYTES,
        "the stored text is bounded"
    );
    assert_eq!(
        e.status(&k).await.expect("status"),
        JobStatus::Failed {
            attempts: 2,
            last_error: failure.last_error.clone()
        }
    );

    let runs = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(50));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (e, k, runs, barrier, rules) = (
                e.clone(),
                k.clone(),
                runs.clone(),
                barrier.clone(),
                rules.clone(),
            );
            tokio::spawn(async move {
                barrier.wait().await;
                e.once_job(&k, fp, &rules, |_| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<u32, JobError<String>>(1)
                })
                .await
            })
        })
        .collect();
    for t in tasks {
        match t.await.expect("join") {
            Err(OnceError::Permanent(f)) => assert_eq!(f, failure),
            other => {
                panic!("a redelivery of a failed job: expected the stored failure, got {other:?}")
            }
        }
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "a permanently failed job ran again on redelivery"
    );
    // A plain `once` of the same key gets the failure too.
    let plain = e.once(&k, fp, &rules, || async { Ok::<u32, ()>(1) }).await;
    assert!(matches!(
        plain,
        Err(OnceError::Permanent(JobFailure { attempts: 2, .. }))
    ));
}

/// How far along a status is; it must never decrease.
fn rank(s: &JobStatus) -> (u8, u32) {
    match s {
        JobStatus::NotSeen => (0, 0),
        JobStatus::Running { attempt, .. } => (1, *attempt),
        JobStatus::Released { attempts, .. } => (1, *attempts),
        JobStatus::Done { .. } | JobStatus::Failed { .. } => (2, u32::MAX),
        other => panic!("unknown status {other:?}"),
    }
}

/// 100 deliveries of one job released at a barrier against a slow closure:
/// exactly one execution (attempt 1), every delivery gets its answer, and
/// a poller reading the status meanwhile never sees it go backwards.
pub async fn deliveries_race<S: Store>(s: Arc<S>, deliveries: usize) {
    let e = engine(s);
    let rules = wait_rules();
    let k = fresh_key("job-race");
    let fp = Fingerprint::of_bytes(b"job");
    let runs = Arc::new(AtomicUsize::new(0));
    let last_attempt = Arc::new(AtomicU32::new(0));
    let barrier = Arc::new(Barrier::new(deliveries + 1));
    let finished = Arc::new(AtomicUsize::new(0));

    let poller = {
        let (e, k, finished) = (e.clone(), k.clone(), finished.clone());
        let barrier = barrier.clone();
        tokio::spawn(async move {
            barrier.wait().await;
            let mut seen = Vec::new();
            loop {
                let done = finished.load(Ordering::SeqCst) == deliveries;
                let status = e.status(&k).await.expect("status");
                seen.push(status);
                if done {
                    return seen;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let tasks: Vec<_> = (0..deliveries)
        .map(|_| {
            let (e, k, rules) = (e.clone(), k.clone(), rules.clone());
            let (runs, last_attempt, barrier, finished) = (
                runs.clone(),
                last_attempt.clone(),
                barrier.clone(),
                finished.clone(),
            );
            tokio::spawn(async move {
                barrier.wait().await;
                let r = e
                    .once_job(&k, fp, &rules, |attempt| async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        last_attempt.store(attempt, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        Ok::<u64, JobError<String>>(42)
                    })
                    .await;
                finished.fetch_add(1, Ordering::SeqCst);
                r
            })
        })
        .collect();
    for t in tasks {
        let once = t
            .await
            .expect("join")
            .expect("every delivery gets the answer");
        assert_eq!(once.value, 42);
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "{deliveries} concurrent deliveries of one job must run it exactly once"
    );
    assert_eq!(last_attempt.load(Ordering::SeqCst), 1);
    let seen = poller.await.expect("join");
    for pair in seen.windows(2) {
        assert!(
            rank(&pair[0]) <= rank(&pair[1]),
            "the job's status went backwards: {:?} then {:?} (all: {seen:?})",
            pair[0],
            pair[1]
        );
    }
    assert!(
        matches!(seen.last(), Some(JobStatus::Done { .. })),
        "{seen:?}"
    );
}

/// `purge` forgets a job's trace with its record: the job reads
/// `NotSeen`, and its next run is attempt 1. A released job (a trace, no
/// record) counts as something purged.
pub async fn purge_forgets_the_trace<S: Store>(s: Arc<S>) {
    let e = engine(s);
    let rules = wait_rules();
    let k = fresh_key("job-purge");
    let fp = Fingerprint::of_bytes(b"job");
    let _ = e
        .once_job(&k, fp, &rules, |_| async {
            Err::<u32, _>(JobError::Transient("later"))
        })
        .await;
    assert!(matches!(
        e.status(&k).await.expect("status"),
        JobStatus::Released { attempts: 1, .. }
    ));
    assert!(
        e.purge(&k).await.expect("purge"),
        "a released job's trace is something to purge"
    );
    assert_eq!(e.status(&k).await.expect("status"), JobStatus::NotSeen);
    assert!(!e.purge(&k).await.expect("purge"));
    let again = e
        .once_job(&k, fp, &rules, |attempt| async move {
            Ok::<u32, JobError<String>>(attempt)
        })
        .await
        .expect("runs");
    assert_eq!(again.value, 1, "after a purge the count starts again");
}
