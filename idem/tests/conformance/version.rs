//! The stale-event guard's conformance suite (protocol §13): every store
//! that implements `VersionStore` runs exactly these functions (see
//! `version_conformance!` in main.rs).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem::apply::Applied;
use idem::store::{Fence, Store, VersionBegin, VersionStore};
use idem::{Engine, EngineConfig, Fingerprint, Rules, Scope, StoreKey, Token, Version};
use tokio::sync::Barrier;

use super::suite::fresh_key;

const LEASE: Duration = Duration::from_secs(30);

fn n(v: u64) -> Version {
    Version::Number(v)
}

fn ts(s: &str) -> Version {
    s.parse().expect("a test timestamp")
}

async fn acquire<S: VersionStore>(s: &S, e: &StoreKey, v: Version, lease: Duration) -> Token {
    match s.begin_version(e, v, lease).await.expect("begin") {
        VersionBegin::Acquired(l) => l.token,
        other => panic!("expected Acquired for {v}, got {other:?}"),
    }
}

async fn begin<S: VersionStore>(s: &S, e: &StoreKey, v: Version) -> VersionBegin {
    s.begin_version(e, v, LEASE).await.expect("begin")
}

/// begin / commit / abort, stale, in flight, mixed kinds, fencing.
pub async fn begin_commit_abort<S: VersionStore>(s: Arc<S>) {
    let e = fresh_key("subscription-1");
    assert_eq!(s.current_version(&e).await.expect("current"), None);
    let t5 = acquire(&*s, &e, n(5), LEASE).await;
    // One event per entity in flight, whatever its version.
    for v in [6, 3] {
        assert!(
            matches!(begin(&*s, &e, n(v)).await, VersionBegin::InFlight { lease_remaining } if lease_remaining > Duration::ZERO && lease_remaining <= LEASE),
            "a second event ({v}) while 5 is in flight"
        );
    }
    // Only the holder finishes.
    assert_eq!(
        s.commit_version(&e, Token::generate(), n(9))
            .await
            .expect("commit"),
        Fence::Lost
    );
    assert_eq!(
        s.abort_version(&e, Token::generate()).await.expect("abort"),
        Fence::Lost
    );
    assert_eq!(
        s.extend_version(&e, Token::generate(), LEASE)
            .await
            .expect("extend"),
        Fence::Lost
    );
    assert_eq!(
        s.extend_version(&e, t5, LEASE).await.expect("extend"),
        Fence::Held
    );
    assert_eq!(
        s.commit_version(&e, t5, n(5)).await.expect("commit"),
        Fence::Held
    );
    assert_eq!(s.current_version(&e).await.expect("current"), Some(n(5)));
    // A repeated commit of a finished holder changes nothing.
    assert_eq!(
        s.commit_version(&e, t5, n(5)).await.expect("commit"),
        Fence::Lost
    );
    // ≤ the highest completed: stale, even the same version (a redelivery).
    for v in [5, 4, 0] {
        match begin(&*s, &e, n(v)).await {
            VersionBegin::Stale { current } => assert_eq!(current, n(5)),
            other => panic!("{v} after 5: expected Stale, got {other:?}"),
        }
    }
    // A stale event is stale even while a newer one is in flight.
    let t7 = acquire(&*s, &e, n(7), LEASE).await;
    assert!(
        matches!(begin(&*s, &e, n(2)).await, VersionBegin::Stale { current } if current == n(5))
    );
    // A failed event leaves the version unchanged and frees the entity.
    assert_eq!(s.abort_version(&e, t7).await.expect("abort"), Fence::Held);
    assert_eq!(s.current_version(&e).await.expect("current"), Some(n(5)));
    assert_eq!(
        s.commit_version(&e, t7, n(7)).await.expect("commit"),
        Fence::Lost
    );
    assert_eq!(s.current_version(&e).await.expect("current"), Some(n(5)));
    // Another kind is refused and writes nothing.
    match begin(&*s, &e, ts("2026-12-02T05:00:00Z")).await {
        VersionBegin::Mixed { current } => assert_eq!(current, n(5)),
        other => panic!("a timestamp after a number: expected Mixed, got {other:?}"),
    }
    let t6 = acquire(&*s, &e, n(6), LEASE).await;
    assert_eq!(
        s.commit_version(&e, t6, n(6)).await.expect("commit"),
        Fence::Held
    );
    assert_eq!(s.current_version(&e).await.expect("current"), Some(n(6)));

    // An entity that only ever failed keeps no version.
    let f = fresh_key("subscription-2");
    let t = acquire(&*s, &f, n(1), LEASE).await;
    assert_eq!(s.abort_version(&f, t).await.expect("abort"), Fence::Held);
    assert_eq!(s.current_version(&f).await.expect("current"), None);
    acquire(&*s, &f, n(1), LEASE).await;
}

/// Timestamps compare as instants; integers past 2^53 keep their order;
/// scopes and idempotency keys are apart from entities.
pub async fn kinds_precision_and_isolation<S: VersionStore>(s: Arc<S>) {
    let e = fresh_key("order-events");
    let t = acquire(&*s, &e, ts("2026-12-02T06:00:00+01:00"), LEASE).await;
    assert_eq!(
        s.commit_version(&e, t, ts("2026-12-02T06:00:00+01:00"))
            .await
            .expect("commit"),
        Fence::Held
    );
    assert_eq!(
        s.current_version(&e).await.expect("current"),
        Some(ts("2026-12-02T05:00:00Z"))
    );
    // The same instant, written in UTC: stale.
    assert!(matches!(
        begin(&*s, &e, ts("2026-12-02T05:00:00Z")).await,
        VersionBegin::Stale { .. }
    ));
    assert!(matches!(
        begin(&*s, &e, ts("2026-12-02T04:59:59.999999999Z")).await,
        VersionBegin::Stale { .. }
    ));
    assert!(matches!(
        begin(&*s, &e, n(1)).await,
        VersionBegin::Mixed { .. }
    ));
    let t = acquire(&*s, &e, ts("2026-12-02T05:00:00.000000001Z"), LEASE).await;
    assert_eq!(s.abort_version(&e, t).await.expect("abort"), Fence::Held);

    // 2^53 and 2^53 + 1 are one double: a store comparing doubles fails here.
    let big = fresh_key("counter");
    let two53 = 1u64 << 53;
    let t = acquire(&*s, &big, n(two53), LEASE).await;
    assert_eq!(
        s.commit_version(&big, t, n(two53)).await.expect("commit"),
        Fence::Held
    );
    let t = acquire(&*s, &big, n(two53 + 1), LEASE).await;
    assert_eq!(
        s.commit_version(&big, t, n(two53 + 1))
            .await
            .expect("commit"),
        Fence::Held
    );
    let t = acquire(&*s, &big, n(u64::MAX), LEASE).await;
    assert_eq!(
        s.commit_version(&big, t, n(u64::MAX))
            .await
            .expect("commit"),
        Fence::Held
    );
    assert_eq!(
        s.current_version(&big).await.expect("current"),
        Some(n(u64::MAX))
    );
    assert!(matches!(
        begin(&*s, &big, n(u64::MAX - 1)).await,
        VersionBegin::Stale { .. }
    ));

    // Another scope, same entity name: another entity.
    let other = StoreKey::new(&Scope::named("another-tenant-of-the-suite"), big.key());
    let mine = StoreKey::new(&Scope::named(&format!("x{}", big.scope_hex())), big.key());
    for e in [other, mine] {
        let t = acquire(&*s, &e, n(1), LEASE).await;
        assert_eq!(s.abort_version(&e, t).await.expect("abort"), Fence::Held);
    }
    // An idempotency key of the same name is not the entity.
    let fp = Fingerprint::of_bytes(b"x");
    let _ = s.reserve(&big, fp, LEASE).await.expect("reserve");
    assert!(matches!(
        begin(&*s, &big, n(1)).await,
        VersionBegin::Stale { .. }
    ));
    assert!(s.get(&big).await.expect("get").is_some());
}

/// A holder whose lease ran out is taken over; its late commit is fenced.
pub async fn lease_expiry_and_fencing<S: VersionStore>(s: Arc<S>) {
    let e = fresh_key("lease");
    let dead = acquire(&*s, &e, n(1), Duration::from_millis(200)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let live = acquire(&*s, &e, n(2), LEASE).await;
    assert_eq!(
        s.commit_version(&e, dead, n(1)).await.expect("commit"),
        Fence::Lost
    );
    assert_eq!(
        s.extend_version(&e, dead, LEASE).await.expect("extend"),
        Fence::Lost
    );
    assert_eq!(s.abort_version(&e, dead).await.expect("abort"), Fence::Lost);
    assert_eq!(
        s.commit_version(&e, live, n(2)).await.expect("commit"),
        Fence::Held
    );
    assert_eq!(s.current_version(&e).await.expect("current"), Some(n(2)));
    // A heartbeat keeps a holder alive past its first lease (750 ms of
    // heartbeats every 150 ms on a 600 ms lease: 450 ms of slack for each
    // heartbeat on a loaded machine).
    let t = acquire(&*s, &e, n(3), Duration::from_millis(600)).await;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            s.extend_version(&e, t, Duration::from_millis(600))
                .await
                .expect("extend"),
            Fence::Held
        );
    }
    assert!(matches!(
        begin(&*s, &e, n(4)).await,
        VersionBegin::InFlight { .. }
    ));
}

/// 200 tasks released at a barrier deliver random versions of ONE entity
/// through `Engine::apply_if_newer` (`wait`): the versions applied are
/// strictly increasing (so none twice), the last applied is the maximum
/// delivered, and never two updates run at once.
pub async fn applies_in_increasing_order<S: VersionStore>(s: Arc<S>, tasks: usize) {
    let engine = Engine::with_config(
        s,
        EngineConfig {
            poll_interval: Duration::from_millis(20),
            ..EngineConfig::default()
        },
    );
    let rules = Rules {
        wait_timeout: Duration::from_secs(120),
        ..Rules::wait()
    };
    let e = fresh_key("raced-entity");
    let versions: Vec<u64> = (0..tasks).map(|_| rand::random_range(1..=1000)).collect();
    let max = versions.iter().copied().max().unwrap_or(0);
    let applied = Arc::new(Mutex::new(Vec::new()));
    let running = Arc::new(AtomicUsize::new(0));
    let overlap = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(tasks));
    let mut handles = Vec::new();
    for v in versions {
        let (engine, rules, e) = (engine.clone(), rules.clone(), e.clone());
        let (applied, running, overlap, barrier) = (
            Arc::clone(&applied),
            Arc::clone(&running),
            Arc::clone(&overlap),
            Arc::clone(&barrier),
        );
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            let out = engine
                .apply_if_newer(&e, n(v), &rules, || async {
                    if running.fetch_add(1, Ordering::SeqCst) > 0 {
                        overlap.fetch_add(1, Ordering::SeqCst);
                    }
                    // A slow handler widens any window a store leaves open.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    applied.lock().expect("log").push(v);
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, std::io::Error>(v)
                })
                .await;
            match out {
                Ok(Applied::Applied(got)) => assert_eq!(got, v),
                Ok(Applied::Stale { current }) => {
                    assert!(current >= n(v), "{v} stale against {current}")
                }
                Err(e) => panic!("version {v}: {e}"),
            }
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    let applied = applied.lock().expect("log").clone();
    assert_eq!(
        overlap.load(Ordering::SeqCst),
        0,
        "two updates of one entity ran at once: the store's begin is not atomic"
    );
    assert!(
        applied.windows(2).all(|w| w[0] < w[1]),
        "versions applied out of order or twice (the store let a stale event through): {applied:?}"
    );
    assert_eq!(
        applied.last().copied(),
        Some(max),
        "the last applied is not the maximum delivered: {applied:?}"
    );
    assert_eq!(
        engine.current_version(&e).await.expect("current"),
        Some(n(max))
    );
}
