//! The memory store keeps its word (issue: hardening, items 2 and 3): its
//! bounds are for the whole store, an oversized record is refused without
//! evicting anyone, and no stale index entry can delete a newer record.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use idem::record::Record;
use idem::store::memory::{MemoryLimits, MemoryStore};
use idem::store::{Fence, Reservation, Store, StoreError};
use idem::{CompletedRecord, Fingerprint, Scope, StoreKey, StoredResponse, Token};

const LEASE: Duration = Duration::from_secs(30);
const RETAIN: Duration = Duration::from_secs(3600);

fn key(name: &str) -> StoreKey {
    StoreKey::new(&Scope::named("memory-tests"), name)
}

fn fp(s: &str) -> Fingerprint {
    Fingerprint::of_bytes(s.as_bytes())
}

fn record(fingerprint: Fingerprint, body_len: usize) -> Arc<CompletedRecord> {
    let now = SystemTime::now();
    Arc::new(CompletedRecord {
        fingerprint,
        response: StoredResponse {
            status: 201,
            headers: vec![],
            body: Bytes::from(vec![b'x'; body_len]),
        },
        completed_at: now,
        expires_at: now + RETAIN,
    })
}

async fn acquire(s: &MemoryStore, k: &StoreKey, f: Fingerprint, lease: Duration) -> Token {
    match s.reserve(k, f, lease).await.expect("reserve") {
        Reservation::Acquired(l) => l.token,
        other => panic!("expected Acquired for {k}, got {other:?}"),
    }
}

async fn store_one(s: &MemoryStore, name: &str, body_len: usize) {
    let k = key(name);
    let t = acquire(s, &k, fp(name), LEASE).await;
    let fence = s
        .complete(&k, t, record(fp(name), body_len), RETAIN)
        .await
        .expect("complete");
    assert_eq!(fence, Fence::Held, "complete of {name}");
}

async fn is_completed(s: &MemoryStore, name: &str) -> bool {
    matches!(
        s.get(&key(name)).await.expect("get"),
        Some(Record::Completed(_))
    )
}

/// Before: 64 shards each got 1/64 of the byte bound (8 MiB of 512 MiB), so
/// a 9.5 MiB answer evicted every completed record of its shard and then
/// failed anyway.
#[tokio::test]
async fn a_large_response_fits_under_the_store_wide_bound_without_evicting() {
    let s = MemoryStore::new();
    for i in 0..2000 {
        store_one(&s, &format!("small-{i}"), 100).await;
    }
    let big = key("big");
    let t = acquire(&s, &big, fp("big"), LEASE).await;
    let fence = s
        .complete(&big, t, record(fp("big"), 9_500_000), RETAIN)
        .await
        .expect("a 9.5 MiB answer fits in a 512 MiB store");
    assert_eq!(fence, Fence::Held);
    let mut lost = 0;
    for i in 0..2000 {
        lost += usize::from(!is_completed(&s, &format!("small-{i}")).await);
    }
    assert_eq!(
        lost, 0,
        "records were evicted from a store far below its bound"
    );
}

/// Before: the oversized answer evicted every completed record and then
/// failed with "every slot holds an in-flight reservation".
#[tokio::test]
async fn a_response_larger_than_the_store_is_refused_up_front() {
    let s = MemoryStore::with_limits(MemoryLimits {
        max_entries: 1000,
        max_bytes: 1024 * 1024,
    });
    for i in 0..10 {
        store_one(&s, &format!("kept-{i}"), 1000).await;
    }
    let big = key("too-big");
    let t = acquire(&s, &big, fp("too-big"), LEASE).await;
    let err = s
        .complete(&big, t, record(fp("too-big"), 2 * 1024 * 1024), RETAIN)
        .await
        .expect_err("a record larger than the store must be refused");
    assert!(
        matches!(err, StoreError::Capacity(m) if m.contains("larger")),
        "the error says why: {err}"
    );
    for i in 0..10 {
        assert!(
            is_completed(&s, &format!("kept-{i}")).await,
            "kept-{i} was evicted for a record that could never fit"
        );
    }
    assert!(
        matches!(
            s.get(&big).await.expect("get"),
            Some(Record::InFlight { .. })
        ),
        "the reservation stays until its lease runs out"
    );
}

/// Before: a holder whose lease had lapsed completed while the store was
/// over its bound; making room swept the holder's own entry, the index
/// kept an entry for the key, `complete` answered Held, and a later
/// eviction by key deleted a NEW holder's reservation: a duplicate acquired.
#[tokio::test(start_paused = true)]
async fn a_lapsed_holder_cannot_leave_an_index_entry_that_evicts_a_new_holder() {
    let s = MemoryStore::with_limits(MemoryLimits {
        max_entries: 100,
        max_bytes: 4000,
    });
    let k = key("contested");
    let old = acquire(&s, &k, fp("contested"), Duration::from_secs(1)).await;
    store_one(&s, "a", 1000).await;
    store_one(&s, "b", 1000).await;
    tokio::time::advance(Duration::from_secs(2)).await; // the lease lapses

    // Needs room: the lapsed entry is swept meanwhile, so the holder no
    // longer holds anything.
    let fence = s
        .complete(&k, old, record(fp("contested"), 2000), RETAIN)
        .await
        .expect("complete");
    assert_eq!(fence, Fence::Lost, "a lapsed, swept holder stores nothing");

    let new = acquire(&s, &k, fp("contested"), LEASE).await;
    assert_ne!(new, old);
    // Fill the store so that eviction runs through the completed index.
    for i in 0..6 {
        store_one(&s, &format!("filler-{i}"), 1000).await;
    }
    match s
        .reserve(&k, fp("contested"), LEASE)
        .await
        .expect("reserve")
    {
        Reservation::InFlight { .. } => {}
        other => panic!(
            "the new holder's reservation was deleted by a stale index entry \
             (a duplicate would execute): {other:?}"
        ),
    }
    assert!(s.bytes() <= 4000, "the byte bound holds: {}", s.bytes());
}

/// The bounds hold for the store as a whole under concurrent writers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bounds_hold_under_concurrent_writers() {
    let s = MemoryStore::with_limits(MemoryLimits {
        max_entries: 300,
        max_bytes: 200_000,
    });
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let tasks: Vec<_> = (0..16)
        .map(|w| {
            let s = s.clone();
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                for i in 0..200 {
                    store_one(&s, &format!("w{w}-{i}"), 500).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("writer");
    }
    assert!(s.len() <= 300, "entries over the bound: {}", s.len());
    assert!(s.bytes() <= 200_000, "bytes over the bound: {}", s.bytes());
    assert!(
        s.len() >= 250,
        "eviction freed only what was needed: {}",
        s.len()
    );
}

mod queue {
    //! Async mode on the memory store (protocol §9.6): a pending request
    //! counts against the byte bound, operations are never evicted nor
    //! swept, and the books balance when they leave.

    use super::*;
    use idem::store::{Enqueued, OperationId, OperationRequest, OperationState, Queue};

    fn request(body_len: usize) -> OperationRequest {
        OperationRequest {
            method: "POST".into(),
            uri: "/pay".into(),
            headers: vec![("idempotency-key".into(), Bytes::from_static(b"k"))],
            body: Bytes::from(vec![b'r'; body_len]),
        }
    }

    async fn enqueue(s: &MemoryStore, name: &str, body_len: usize) -> Result<Enqueued, StoreError> {
        s.enqueue(
            &key(name),
            fp(name),
            OperationId::generate(),
            &request(body_len),
            1_000_000,
        )
        .await
    }

    #[tokio::test]
    async fn a_pending_request_is_charged_until_its_operation_is_done() {
        let s = MemoryStore::new();
        let empty = s.bytes();
        assert!(matches!(
            enqueue(&s, "op", 100_000).await.expect("enqueue"),
            Enqueued::Accepted(_)
        ));
        let pending = s.bytes();
        assert!(
            pending - empty >= 100_000,
            "the request's body is charged: {empty} → {pending}"
        );
        let c = s.claim(LEASE, 1).await.expect("claim").remove(0);
        let done = s
            .complete(&c.key, c.token, record(fp("op"), 10), RETAIN)
            .await
            .expect("complete");
        assert_eq!(done, Fence::Held);
        let completed = s.bytes();
        assert!(
            completed - empty < 1_000,
            "done, the request is refunded and only the small answer stays: \
             {empty} → {completed}"
        );
        assert!(s.purge(&c.key).await.expect("purge"));
        assert_eq!(s.bytes(), empty, "purged, every byte is back");
        assert_eq!(s.len(), 0);
    }

    #[tokio::test]
    async fn operations_are_never_evicted_completed_records_are() {
        let s = MemoryStore::with_limits(MemoryLimits {
            max_entries: 1000,
            max_bytes: 1024 * 1024,
        });
        for i in 0..3 {
            store_one(&s, &format!("old-{i}"), 250_000).await;
        }
        // Four requests of 250 kB fit only if completed records make room.
        for i in 0..4 {
            let e = enqueue(&s, &format!("op-{i}"), 250_000).await;
            assert!(matches!(e, Ok(Enqueued::Accepted(_))), "op-{i}: {e:?}");
        }
        assert!(
            !is_completed(&s, "old-0").await,
            "the oldest answer made room"
        );
        // Now only operations are left to evict: none is.
        let e = enqueue(&s, "op-4", 250_000).await;
        assert!(
            matches!(e, Err(StoreError::Capacity(_))),
            "a full store of operations refuses the next: {e:?}"
        );
        let e = enqueue(&s, "huge", 2 * 1024 * 1024).await;
        assert!(
            matches!(&e, Err(StoreError::Capacity(m)) if m.contains("larger")),
            "a request larger than the store is refused up front: {e:?}"
        );
        assert_eq!(s.queue_stats().await.expect("stats").pending, 4);
        for i in 0..4 {
            assert!(matches!(
                s.get(&key(&format!("op-{i}"))).await.expect("get"),
                Some(Record::InFlight { .. })
            ));
        }
    }

    /// A pending or running operation outlives any deadline: the sweep and
    /// `get` leave it alone, and a dead dispatcher's lease only makes it
    /// claimable again.
    #[tokio::test(start_paused = true)]
    async fn operations_never_expire_while_pending_or_running() {
        let s = MemoryStore::new();
        let Enqueued::Accepted(id) = enqueue(&s, "op", 10).await.expect("enqueue") else {
            panic!("not accepted");
        };
        let first = s.claim(Duration::from_secs(1), 1).await.expect("claim");
        assert_eq!(first.len(), 1);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(matches!(
            s.get(&key("op")).await.expect("get"),
            Some(Record::InFlight { .. })
        ));
        let again = s.claim(LEASE, 1).await.expect("claim").remove(0);
        assert_eq!((again.id, again.attempt), (id, 2));
        assert_eq!(
            s.retry(&again.key, again.token, Duration::from_secs(60), "HTTP 503")
                .await
                .expect("retry"),
            Fence::Held
        );
        tokio::time::sleep(Duration::from_secs(30)).await;
        match s.operation(id).await.expect("operation").map(|o| o.state) {
            Some(OperationState::Pending {
                attempts: 2,
                next_attempt_in,
            }) => assert_eq!(next_attempt_in, Duration::from_secs(30)),
            other => panic!("expected pending, 30 s to go: {other:?}"),
        }
        assert!(s.claim(LEASE, 1).await.expect("claim").is_empty());
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(s.claim(LEASE, 1).await.expect("claim")[0].attempt, 3);
    }
}
