//! The queue conformance suite (protocol §9.7): every property of async mode's
//! [`Queue`] as a generic test. Every store that implements `Queue` runs
//! exactly these functions (see `queue_conformance!` in main.rs), each on a
//! store of its own (the queue holds nothing else).
//!
//! Time-based properties use real time with margins of half a lease, as in
//! `suite.rs`: remote stores keep their own clocks.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use idem::asyncop::{self, AsyncConfig, DispatchError, Dispatcher};
use idem::record::Record;
use idem::store::{
    Claimed, Enqueued, Fence, Operation, OperationId, OperationRequest, OperationState, Queue,
    QueueStats, Reservation,
};
use idem::{CompletedRecord, Fingerprint, Scope, StoreKey, StoredResponse, Token};
use tokio::sync::Barrier;
use tokio::time::Instant;

use crate::counting::Counting;
use crate::suite::fresh_key;

const LEASE: Duration = Duration::from_secs(30);
const RETAIN: Duration = Duration::from_secs(3600);
/// The lease of `claim_is_exclusive`'s claims: longer than the test runs.
const RACE_LEASE: Duration = Duration::from_secs(3600);
/// `max_pending` when the test is not about it.
const ROOMY: u64 = 100_000;

fn fp(s: &str) -> Fingerprint {
    Fingerprint::of_bytes(s.as_bytes())
}

fn request(key: &StoreKey) -> OperationRequest {
    OperationRequest {
        method: "POST".into(),
        uri: "/orders?x=1".into(),
        headers: vec![
            (
                "idempotency-key".into(),
                Bytes::copy_from_slice(key.key().as_bytes()),
            ),
            ("x-request-id".into(), Bytes::from_static(b"req-1")),
            ("x-dup".into(), Bytes::from_static(b"a")),
            ("x-dup".into(), Bytes::from_static(b"b")),
        ],
        body: Bytes::from_static(b"{\"amount\":10}"),
    }
}

fn record(fingerprint: Fingerprint, status: u16, body: &'static str) -> Arc<CompletedRecord> {
    let now = SystemTime::now();
    Arc::new(CompletedRecord {
        fingerprint,
        response: StoredResponse {
            status,
            headers: vec![("content-type".into(), Bytes::from_static(b"text/plain"))],
            body: Bytes::from_static(body.as_bytes()),
        },
        completed_at: now,
        expires_at: now + RETAIN,
    })
}

/// Enqueues a fresh operation under `key`; its id.
async fn accept<S: Queue>(s: &S, key: &StoreKey, f: Fingerprint) -> OperationId {
    let id = OperationId::generate();
    match s
        .enqueue(key, f, id, &request(key), ROOMY)
        .await
        .expect("enqueue")
    {
        Enqueued::Accepted(got) => {
            assert_eq!(got, id, "Accepted names the id the caller passed");
            id
        }
        other => panic!("expected Accepted, got {other:?}"),
    }
}

async fn claim_one<S: Queue>(s: &S, lease: Duration) -> Claimed {
    let mut claimed = s.claim(lease, 1).await.expect("claim");
    assert_eq!(claimed.len(), 1, "expected one due operation: {claimed:?}");
    claimed.remove(0)
}

async fn claim_none<S: Queue>(s: &S, why: &str) {
    let claimed = s.claim(LEASE, 10).await.expect("claim");
    assert!(claimed.is_empty(), "{why}: claimed {claimed:?}");
}

async fn operation<S: Queue>(s: &S, id: OperationId) -> Operation {
    s.operation(id)
        .await
        .expect("operation")
        .unwrap_or_else(|| panic!("operation {id} not found"))
}

async fn stats<S: Queue>(s: &S) -> QueueStats {
    s.queue_stats().await.expect("queue_stats")
}

pub async fn enqueue_then_repeat<S: Queue>(store: Arc<S>) {
    let k = fresh_key("enqueue");
    let id = accept(&*store, &k, fp("a")).await;
    match operation(&*store, id).await {
        Operation {
            id: got,
            key,
            state: OperationState::Pending { attempts: 0, .. },
            ..
        } => assert_eq!((got, key), (id, k.clone())),
        other => panic!("expected pending, attempts 0: {other:?}"),
    }
    // A repeat (another id offered) gets the first operation.
    match store
        .enqueue(&k, fp("a"), OperationId::generate(), &request(&k), ROOMY)
        .await
        .expect("enqueue")
    {
        Enqueued::Existing(op) => {
            assert_eq!((op.id, &op.key), (id, &k));
            assert!(matches!(
                op.state,
                OperationState::Pending { attempts: 0, .. }
            ));
        }
        other => panic!("expected Existing, got {other:?}"),
    }
    assert!(matches!(
        store
            .enqueue(&k, fp("b"), OperationId::generate(), &request(&k), ROOMY)
            .await
            .expect("enqueue"),
        Enqueued::Mismatch
    ));
    // The operation is the key's record: in flight to `get` and `reserve`.
    match store.get(&k).await.expect("get") {
        Some(Record::InFlight {
            fingerprint,
            lease_remaining,
            ..
        }) => {
            assert_eq!(fingerprint, fp("a"));
            assert!(
                !lease_remaining.is_zero(),
                "an operation is never free to take"
            );
        }
        other => panic!("expected InFlight, got {other:?}"),
    }
    assert!(matches!(
        store.reserve(&k, fp("a"), LEASE).await.expect("reserve"),
        Reservation::InFlight { .. }
    ));
    assert!(matches!(
        store.reserve(&k, fp("b"), LEASE).await.expect("reserve"),
        Reservation::Mismatch
    ));
    assert!(
        store
            .operation(OperationId::generate())
            .await
            .expect("operation")
            .is_none(),
        "an unknown id is None"
    );
}

/// Enqueue meets the records of synchronous executions as `reserve` does.
pub async fn enqueue_meets_sync_records<S: Queue>(store: Arc<S>) {
    let k = fresh_key("sync");
    let Reservation::Acquired(lease) = store.reserve(&k, fp("a"), LEASE).await.expect("reserve")
    else {
        panic!("fresh key not acquired");
    };
    let offer = |f| {
        let (store, k) = (Arc::clone(&store), k.clone());
        async move {
            store
                .enqueue(&k, f, OperationId::generate(), &request(&k), ROOMY)
                .await
                .expect("enqueue")
        }
    };
    assert!(
        matches!(offer(fp("a")).await, Enqueued::InFlight { lease_remaining } if !lease_remaining.is_zero())
    );
    assert!(matches!(offer(fp("b")).await, Enqueued::Mismatch));
    let rec = record(fp("a"), 201, "sync");
    store
        .complete(&k, lease.token, Arc::clone(&rec), RETAIN)
        .await
        .expect("complete");
    match offer(fp("a")).await {
        Enqueued::Completed(r) => assert_eq!(r.response, rec.response),
        other => panic!("expected Completed, got {other:?}"),
    }
    assert!(matches!(offer(fp("b")).await, Enqueued::Mismatch));
    claim_none(&*store, "nothing was enqueued").await;
    // An expired synchronous lease is free: the operation takes the key.
    let k2 = fresh_key("sync-expired");
    store
        .reserve(&k2, fp("a"), Duration::from_millis(200))
        .await
        .expect("reserve");
    tokio::time::sleep(Duration::from_millis(500)).await;
    accept(&*store, &k2, fp("a")).await;
}

pub async fn claim_due<S: Queue>(store: Arc<S>) {
    let k = fresh_key("claim");
    let id = accept(&*store, &k, fp("a")).await;
    let c = claim_one(&*store, LEASE).await;
    assert_eq!(
        (c.id, &c.key, c.fingerprint, c.attempt),
        (id, &k, fp("a"), 1)
    );
    assert_eq!(*c.request, request(&k), "the request comes back exactly");
    claim_none(&*store, "a running operation with a live lease").await;
    assert!(matches!(
        operation(&*store, id).await.state,
        OperationState::Running { attempts: 1 }
    ));
    match store
        .enqueue(&k, fp("a"), OperationId::generate(), &request(&k), ROOMY)
        .await
        .expect("enqueue")
    {
        Enqueued::Existing(op) => {
            assert_eq!(op.id, id);
            assert!(matches!(op.state, OperationState::Running { attempts: 1 }));
        }
        other => panic!("expected Existing, got {other:?}"),
    }
    // A heartbeat holds it; a stranger's token holds nothing.
    assert_eq!(
        store.extend(&k, c.token, LEASE).await.expect("extend"),
        Fence::Held
    );
    assert_eq!(
        store
            .extend(&k, Token::generate(), LEASE)
            .await
            .expect("extend"),
        Fence::Lost
    );
}

/// Oldest due first, and `max` bounds a batch.
pub async fn claim_order_and_batch<S: Queue>(store: Arc<S>) {
    let mut ids = Vec::new();
    for i in 0..5 {
        let k = fresh_key(&format!("order-{i}"));
        ids.push(accept(&*store, &k, fp("a")).await);
        // Distinct due times even on stores with millisecond clocks.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first = store.claim(LEASE, 2).await.expect("claim");
    let rest = store.claim(LEASE, 10).await.expect("claim");
    assert_eq!(
        first.iter().map(|c| c.id).collect::<Vec<_>>(),
        ids[..2],
        "a batch of 2, oldest first"
    );
    assert_eq!(rest.iter().map(|c| c.id).collect::<Vec<_>>(), ids[2..]);
    claim_none(&*store, "all five are running").await;
}

pub async fn retry_schedule<S: Queue>(store: Arc<S>) {
    let k = fresh_key("retry");
    let id = accept(&*store, &k, fp("a")).await;
    let c = claim_one(&*store, LEASE).await;
    assert_eq!(
        store
            .retry(&k, Token::generate(), Duration::ZERO, "stranger")
            .await
            .expect("retry"),
        Fence::Lost
    );
    assert_eq!(
        store
            .retry(&k, c.token, Duration::from_millis(1000), "HTTP 503")
            .await
            .expect("retry"),
        Fence::Held
    );
    match operation(&*store, id).await.state {
        OperationState::Pending {
            attempts: 1,
            next_attempt_in,
        } => assert!(
            next_attempt_in > Duration::from_millis(500)
                && next_attempt_in <= Duration::from_secs(1),
            "{next_attempt_in:?}"
        ),
        other => panic!("expected pending after 1 attempt: {other:?}"),
    }
    // The retried attempt's token is spent.
    assert_eq!(
        store.extend(&k, c.token, LEASE).await.expect("extend"),
        Fence::Lost
    );
    assert_eq!(
        store
            .complete(&k, c.token, record(fp("a"), 201, "stale"), RETAIN)
            .await
            .expect("complete"),
        Fence::Lost
    );
    claim_none(&*store, "not due before its delay").await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let again = claim_one(&*store, LEASE).await;
    assert_eq!((again.id, again.attempt), (id, 2));
    assert_ne!(again.token, c.token);
    assert_eq!(
        store
            .retry(&k, c.token, Duration::ZERO, "stale")
            .await
            .expect("retry"),
        Fence::Lost,
        "the first attempt's token cannot retry the second"
    );
}

pub async fn complete_makes_it_done<S: Queue>(store: Arc<S>) {
    let k = fresh_key("done");
    let id = accept(&*store, &k, fp("a")).await;
    let c = claim_one(&*store, LEASE).await;
    let mut sub = store.subscribe(&k).await.expect("subscribe");
    let waiter =
        tokio::spawn(
            async move { tokio::time::timeout(Duration::from_secs(5), sub.changed()).await },
        );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let rec = record(fp("a"), 201, "created");
    assert_eq!(
        store
            .complete(&k, c.token, Arc::clone(&rec), RETAIN)
            .await
            .expect("complete"),
        Fence::Held
    );
    assert!(
        waiter.await.expect("task").is_ok(),
        "completing an operation must wake the key's subscribers (status long-polls)"
    );
    match operation(&*store, id).await.state {
        OperationState::Done(r) => assert_eq!(r.response, rec.response),
        other => panic!("expected Done, got {other:?}"),
    }
    match store
        .enqueue(&k, fp("a"), OperationId::generate(), &request(&k), ROOMY)
        .await
        .expect("enqueue")
    {
        Enqueued::Completed(r) => assert_eq!(r.response, rec.response),
        other => panic!("expected Completed, got {other:?}"),
    }
    assert!(matches!(
        store.get(&k).await.expect("get"),
        Some(Record::Completed(r)) if r.response == rec.response
    ));
    // The holder's retried complete is acknowledged and changes nothing.
    assert_eq!(
        store
            .complete(&k, c.token, record(fp("a"), 500, "other"), RETAIN)
            .await
            .expect("complete"),
        Fence::Held
    );
    match operation(&*store, id).await.state {
        OperationState::Done(r) => assert_eq!(r.response, rec.response),
        other => panic!("expected Done, got {other:?}"),
    }
    claim_none(&*store, "a done operation left the queue").await;
    assert_eq!(stats(&*store).await.pending, 0);
}

pub async fn done_operation_lives_for_its_retention<S: Queue>(store: Arc<S>) {
    let k = fresh_key("retained");
    let id = accept(&*store, &k, fp("a")).await;
    let c = claim_one(&*store, LEASE).await;
    store
        .complete(
            &k,
            c.token,
            record(fp("a"), 201, "x"),
            Duration::from_millis(300),
        )
        .await
        .expect("complete");
    assert!(matches!(
        operation(&*store, id).await.state,
        OperationState::Done(_)
    ));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        store.operation(id).await.expect("operation").is_none(),
        "the id ends with the record's retention"
    );
    let again = accept(&*store, &k, fp("b")).await;
    assert_ne!(again, id);
}

pub async fn claim_expired<S: Queue>(store: Arc<S>) {
    let short = Duration::from_millis(1000);
    let k = fresh_key("expired");
    let id = accept(&*store, &k, fp("a")).await;
    let old = claim_one(&*store, short).await;
    // A heartbeat holds it past its first lease.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        store.extend(&k, old.token, short).await.expect("extend"),
        Fence::Held
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    claim_none(&*store, "a heartbeat keeps the lease").await;
    // Silence: the dispatcher died; the lease runs out, another takes over.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let new = claim_one(&*store, LEASE).await;
    assert_eq!((new.id, new.attempt), (id, 2));
    assert_ne!(new.token, old.token);
    assert_eq!(*new.request, request(&k));
    for fence in [
        store.extend(&k, old.token, LEASE).await.expect("extend"),
        store
            .retry(&k, old.token, Duration::ZERO, "late")
            .await
            .expect("retry"),
        store
            .complete(&k, old.token, record(fp("a"), 201, "stale"), RETAIN)
            .await
            .expect("complete"),
        store.release(&k, old.token).await.expect("release"),
    ] {
        assert_eq!(fence, Fence::Lost, "the dead dispatcher's token is fenced");
    }
    assert!(matches!(
        operation(&*store, id).await.state,
        OperationState::Running { attempts: 2 }
    ));
    let rec = record(fp("a"), 201, "fresh");
    assert_eq!(
        store
            .complete(&k, new.token, Arc::clone(&rec), RETAIN)
            .await
            .expect("complete"),
        Fence::Held
    );
    match operation(&*store, id).await.state {
        OperationState::Done(r) => assert_eq!(r.response.body, "fresh"),
        other => panic!("expected the new holder's answer, got {other:?}"),
    }
}

pub async fn max_pending_is_full_and_writes_nothing<S: Queue>(store: Arc<S>) {
    let keys: Vec<_> = (0..3).map(|i| fresh_key(&format!("full-{i}"))).collect();
    let mut ids = Vec::new();
    for k in &keys[..2] {
        let id = OperationId::generate();
        let e = store
            .enqueue(k, fp("a"), id, &request(k), 2)
            .await
            .expect("enqueue");
        assert!(matches!(e, Enqueued::Accepted(got) if got == id), "{e:?}");
        ids.push(id);
    }
    // A running operation still counts.
    let c = claim_one(&*store, LEASE).await;
    let refused = OperationId::generate();
    let e = store
        .enqueue(&keys[2], fp("a"), refused, &request(&keys[2]), 2)
        .await
        .expect("enqueue");
    assert!(matches!(e, Enqueued::Full), "{e:?}");
    assert!(
        store.get(&keys[2]).await.expect("get").is_none(),
        "Full stores nothing"
    );
    assert!(store.operation(refused).await.expect("operation").is_none());
    assert_eq!(stats(&*store).await.pending, 2);
    // A repeat of an accepted operation is answered even when full.
    assert!(matches!(
        store
            .enqueue(
                &keys[1],
                fp("a"),
                OperationId::generate(),
                &request(&keys[1]),
                2
            )
            .await
            .expect("enqueue"),
        Enqueued::Existing(_)
    ));
    // Done, it frees its slot.
    store
        .complete(&c.key, c.token, record(fp("a"), 201, "x"), RETAIN)
        .await
        .expect("complete");
    let e = store
        .enqueue(&keys[2], fp("a"), refused, &request(&keys[2]), 2)
        .await
        .expect("enqueue");
    assert!(matches!(e, Enqueued::Accepted(_)), "{e:?}");
    assert!(matches!(
        store
            .enqueue(
                &fresh_key("none"),
                fp("a"),
                OperationId::generate(),
                &request(&keys[0]),
                0
            )
            .await
            .expect("enqueue"),
        Enqueued::Full
    ));
}

/// The race: `TASKS` claimers start together over `OPS` due operations.
/// Every operation must be claimed exactly once: twice means two
/// dispatchers calling the upstream for one operation at once; never means
/// a lost operation.
pub async fn claim_is_exclusive<S: Queue>(store: Arc<S>, rounds: usize) {
    const TASKS: usize = 200;
    const OPS: usize = 200;
    for round in 0..rounds {
        let mut ids = HashSet::new();
        for i in 0..OPS {
            ids.insert(accept(&*store, &fresh_key(&format!("race-{i}")), fp("a")).await);
        }
        let barrier = Arc::new(Barrier::new(TASKS));
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
                tokio::spawn(async move {
                    barrier.wait().await;
                    let mut got = Vec::new();
                    loop {
                        // Batches of 1 to 3, so single and batch claims race.
                        // A lease longer than the whole test: on a slow
                        // machine the 25 rounds outlast a 30 s lease, and an
                        // earlier round's operations would be due again.
                        let batch = store.claim(RACE_LEASE, 1 + t % 3).await.expect("claim");
                        if batch.is_empty() {
                            return got;
                        }
                        got.extend(batch.into_iter().map(|c| c.id));
                    }
                })
            })
            .collect();
        let mut seen = HashSet::new();
        let mut claims = 0;
        for t in tasks {
            for id in t.await.expect("task") {
                claims += 1;
                assert!(
                    seen.insert(id),
                    "round {round}: operation {id} was claimed twice while its lease was live: \
                     two dispatchers would call the upstream for it at once"
                );
            }
        }
        assert!(
            seen.is_subset(&ids),
            "round {round}: claimed an operation that was not due (one an earlier round holds)"
        );
        assert_eq!(
            claims, OPS,
            "round {round}: {claims} claims for {OPS} operations; every operation must be \
             claimed exactly once (fewer: an operation was lost)"
        );
    }
}

pub async fn purge_and_release_remove_it<S: Queue>(store: Arc<S>) {
    // Pending, purged.
    let k = fresh_key("purge");
    let id = accept(&*store, &k, fp("a")).await;
    assert!(store.purge(&k).await.expect("purge"));
    assert!(store.operation(id).await.expect("operation").is_none());
    assert!(store.get(&k).await.expect("get").is_none());
    claim_none(&*store, "a purged operation is out of the queue").await;
    assert_eq!(stats(&*store).await.pending, 0);
    let again = accept(&*store, &k, fp("b")).await;
    assert_ne!(again, id);
    // Running, purged: its dispatcher is fenced out.
    let c = claim_one(&*store, LEASE).await;
    assert!(store.purge(&k).await.expect("purge"));
    assert!(store.operation(again).await.expect("operation").is_none());
    assert_eq!(
        store
            .complete(&k, c.token, record(fp("b"), 201, "x"), RETAIN)
            .await
            .expect("complete"),
        Fence::Lost
    );
    assert!(store.get(&k).await.expect("get").is_none());
    // Done, purged.
    let id = accept(&*store, &k, fp("c")).await;
    let c = claim_one(&*store, LEASE).await;
    store
        .complete(&k, c.token, record(fp("c"), 201, "x"), RETAIN)
        .await
        .expect("complete");
    assert!(store.purge(&k).await.expect("purge"));
    assert!(store.operation(id).await.expect("operation").is_none());
    // Running, released by its holder: gone with its id.
    let id = accept(&*store, &k, fp("d")).await;
    let c = claim_one(&*store, LEASE).await;
    assert_eq!(
        store.release(&k, c.token).await.expect("release"),
        Fence::Held
    );
    assert!(store.operation(id).await.expect("operation").is_none());
    assert!(store.get(&k).await.expect("get").is_none());
    claim_none(&*store, "a released operation is out of the queue").await;
    assert_eq!(stats(&*store).await.pending, 0);
}

pub async fn queue_stats_count_pending_and_running<S: Queue>(store: Arc<S>) {
    assert_eq!(stats(&*store).await, QueueStats::default());
    let keys: Vec<_> = (0..3).map(|i| fresh_key(&format!("stats-{i}"))).collect();
    for k in &keys {
        accept(&*store, k, fp("a")).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = stats(&*store).await;
    assert_eq!(s.pending, 3);
    let age = s.oldest_pending_age.expect("an oldest operation");
    assert!(
        age >= Duration::from_millis(250) && age < Duration::from_secs(30),
        "{age:?}"
    );
    let c = claim_one(&*store, LEASE).await;
    assert_eq!(stats(&*store).await.pending, 3, "running counts");
    store
        .complete(&c.key, c.token, record(fp("a"), 201, "x"), RETAIN)
        .await
        .expect("complete");
    assert_eq!(stats(&*store).await.pending, 2);
}

/// The idle cost of a [`Dispatcher`] of 64 workers (protocol §9.4): ONE
/// poller claims once per poll interval, not each worker on its own; an
/// accept on this instance still wakes it at once, and an accept made
/// elsewhere (another instance) is picked up within a poll interval.
///
/// No bound here is close to the machine's speed: the poll interval is a
/// second, the local accept is made just after a poll (so a poller it did
/// not wake would take most of a second), and it must be picked up within
/// half of one; a loaded CI machine took over 100 ms with a 200 ms poll.
pub async fn idle_dispatcher_claims_rarely_and_picks_up_promptly<S: Queue>(store: Arc<S>) {
    const POLL: Duration = Duration::from_secs(1);
    let counted = Arc::new(Counting::new(Arc::clone(&store)));
    let calls = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let log = Arc::clone(&calls);
    let upstream = move |req: Arc<OperationRequest>| {
        let log = Arc::clone(&log);
        async move {
            log.lock().expect("calls").push(Instant::now());
            Ok::<_, DispatchError>(StoredResponse {
                status: 201,
                headers: vec![],
                body: req.body.clone(),
            })
        }
    };
    let config = AsyncConfig::default().workers(64).poll_interval(POLL);
    let d = Dispatcher::spawn(Arc::clone(&counted), upstream, config);

    // Idle for 2.5 polls: two or three claims. Before the poller, each of
    // the 64 workers claimed on its own: ~160.
    tokio::time::sleep(POLL * 5 / 2).await;
    let idle = counted.claims();
    assert!(
        (1..=8).contains(&idle),
        "an idle dispatcher of 64 workers claimed {idle} times in 2.5 polls"
    );

    // An accept on this instance wakes the poller at once: made just after
    // a poll (its claim let finish), it is not found by the next one.
    let polled = counted.claims();
    while counted.claims() == polled {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let scope = Scope::named(&format!("idle-{:016x}", rand::random::<u64>()));
    let k = StoreKey::new(&scope, "idle-local");
    let accepted = Instant::now();
    let Enqueued::Accepted(id) = d
        .accept(&k, fp("a"), &request(&k), ROOMY)
        .await
        .expect("accept")
    else {
        panic!("a fresh key is accepted");
    };
    let done = asyncop::status_wait(&*store, id, &scope, Duration::from_secs(5))
        .await
        .expect("status");
    assert!(matches!(
        done.map(|op| op.state),
        Some(OperationState::Done(_))
    ));
    let first = calls.lock().expect("calls")[0];
    assert!(
        first - accepted < POLL / 2,
        "a local accept waited {:?} for the poller (poll interval {POLL:?})",
        first - accepted
    );

    // An accept made by another instance (straight into the store): found
    // by the next poll.
    let k = StoreKey::new(&scope, "idle-remote");
    let accepted = Instant::now();
    let id = accept(&*store, &k, fp("b")).await;
    let done = asyncop::status_wait(&*store, id, &scope, Duration::from_secs(5))
        .await
        .expect("status");
    assert!(matches!(
        done.map(|op| op.state),
        Some(OperationState::Done(_))
    ));
    let second = calls.lock().expect("calls")[1];
    assert!(
        second - accepted < POLL + POLL / 2,
        "a remote accept waited {:?} (poll interval {POLL:?})",
        second - accepted
    );
    d.shutdown(Duration::from_secs(1)).await;
}

/// `last_error` (admin inspect): none until an attempt fails; then the text
/// of the latest [`Queue::retry`], shown while pending and while running
/// the next attempt, to `operation` and to a repeat's `Existing`; gone once
/// done. A fenced-out retry changes nothing.
pub async fn last_error_is_the_latest_failed_attempt<S: Queue>(store: Arc<S>) {
    let k = fresh_key("last-error");
    let id = accept(&*store, &k, fp("a")).await;
    assert_eq!(operation(&*store, id).await.last_error, None);
    let c = claim_one(&*store, LEASE).await;
    assert_eq!(operation(&*store, id).await.last_error, None, "running");
    let first = "attempt 1: HTTP 503";
    assert_eq!(
        store
            .retry(&k, c.token, Duration::ZERO, first)
            .await
            .expect("retry"),
        Fence::Held
    );
    let op = operation(&*store, id).await;
    assert!(matches!(
        op.state,
        OperationState::Pending { attempts: 1, .. }
    ));
    assert_eq!(op.last_error.as_deref(), Some(first));
    match store
        .enqueue(&k, fp("a"), OperationId::generate(), &request(&k), ROOMY)
        .await
        .expect("enqueue")
    {
        Enqueued::Existing(op) => assert_eq!(op.last_error.as_deref(), Some(first)),
        other => panic!("expected Existing, got {other:?}"),
    }
    let c = claim_one(&*store, LEASE).await;
    let op = operation(&*store, id).await;
    assert!(matches!(op.state, OperationState::Running { attempts: 2 }));
    assert_eq!(
        op.last_error.as_deref(),
        Some(first),
        "kept while the next attempt runs"
    );
    assert_eq!(
        store
            .retry(&k, Token::generate(), Duration::ZERO, "stranger")
            .await
            .expect("retry"),
        Fence::Lost
    );
    assert_eq!(
        operation(&*store, id).await.last_error.as_deref(),
        Some(first)
    );
    let second = "attempt 2: the connection was refused";
    store
        .retry(&k, c.token, Duration::ZERO, second)
        .await
        .expect("retry");
    assert_eq!(
        operation(&*store, id).await.last_error.as_deref(),
        Some(second),
        "the latest replaces the one before"
    );
    let c = claim_one(&*store, LEASE).await;
    store
        .complete(&k, c.token, record(fp("a"), 201, "x"), RETAIN)
        .await
        .expect("complete");
    let op = operation(&*store, id).await;
    assert!(matches!(op.state, OperationState::Done(_)));
    assert_eq!(
        op.last_error, None,
        "a done operation's answer says how it ended"
    );
}
