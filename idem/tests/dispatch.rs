//! The async-mode dispatcher (protocol §9.4–5) on the memory store, against a
//! scripted upstream: retries, the final 502, one call for N identical
//! accepts, takeover after a dispatcher dies, `Retry-After`, wake-ups.
//!
//! Most tests run on paused time (`start_paused`): the memory store keeps
//! Tokio's clock, so backoffs and leases of seconds take no real time and
//! the gaps between calls can be asserted exactly.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use idem::asyncop::{
    self, AsyncConfig, DispatchCounts, DispatchError, DispatchPolicy, Dispatcher, Upstream,
};
use idem::store::memory::MemoryStore;
use idem::store::{Enqueued, OperationId, OperationRequest, OperationState, Queue, Store};
use idem::{Fingerprint, Scope, StoreKey, StoredResponse};
use tokio::time::Instant;

/// What the scripted upstream does on one call.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Status(u16),
    /// A status with `Retry-After: secs`.
    RetryAfter(u16, u64),
    Refused,
    /// Never answers (until the call is dropped).
    Hang,
}

/// The upstream's log: when each call came.
#[derive(Debug, Default)]
struct Calls {
    at: Mutex<Vec<Instant>>,
    running: AtomicUsize,
}

impl Calls {
    fn count(&self) -> usize {
        self.at.lock().expect("calls").len()
    }

    fn gaps(&self) -> Vec<Duration> {
        let at = self.at.lock().expect("calls");
        at.windows(2).map(|w| w[1] - w[0]).collect()
    }
}

/// An upstream that answers call n with `script[n]` (the last answer
/// repeats), echoing the request's body.
fn scripted(script: &[Answer]) -> (Arc<Calls>, impl Upstream + Clone) {
    let calls = Arc::new(Calls::default());
    let script: Arc<[Answer]> = script.into();
    let log = Arc::clone(&calls);
    let upstream = move |req: Arc<OperationRequest>| {
        let (calls, script) = (Arc::clone(&log), Arc::clone(&script));
        async move {
            let n = {
                let mut at = calls.at.lock().expect("calls");
                at.push(Instant::now());
                at.len() - 1
            };
            let answer = script[n.min(script.len() - 1)];
            let respond = |status: u16, headers: Vec<(String, Bytes)>| {
                Ok(StoredResponse {
                    status,
                    headers,
                    body: req.body.clone(),
                })
            };
            match answer {
                Answer::Status(s) => respond(s, vec![]),
                Answer::RetryAfter(s, secs) => {
                    respond(s, vec![("retry-after".into(), secs.to_string().into())])
                }
                Answer::Refused => Err(DispatchError::Refused("connection refused".into())),
                Answer::Hang => {
                    calls.running.fetch_add(1, Ordering::SeqCst);
                    std::future::pending().await
                }
            }
        }
    };
    (calls, upstream)
}

fn scope() -> Scope {
    Scope::named("dispatch-tests")
}

fn key(name: &str) -> StoreKey {
    StoreKey::new(&scope(), name)
}

fn request(name: &str) -> OperationRequest {
    OperationRequest {
        method: "POST".into(),
        uri: format!("/orders/{name}"),
        headers: vec![(
            "idempotency-key".into(),
            Bytes::copy_from_slice(name.as_bytes()),
        )],
        body: Bytes::copy_from_slice(format!("body of {name}").as_bytes()),
    }
}

fn fp(name: &str) -> Fingerprint {
    Fingerprint::of_bytes(name.as_bytes())
}

fn policy(max_attempts: u32, retry_backoff: Duration) -> DispatchPolicy {
    let mut p = DispatchPolicy::default();
    p.max_attempts = max_attempts;
    p.retry_backoff = retry_backoff;
    p
}

fn config(workers: usize, policy: DispatchPolicy) -> AsyncConfig {
    AsyncConfig::default()
        .workers(workers)
        .lease(Duration::from_secs(3))
        .policy(policy)
}

async fn accept<S: Queue, U: Upstream>(d: &Dispatcher<S, U>, name: &str) -> OperationId {
    match d
        .accept(&key(name), fp(name), &request(name), 1000)
        .await
        .expect("accept")
    {
        Enqueued::Accepted(id) => id,
        other => panic!("expected Accepted, got {other:?}"),
    }
}

/// The final answer of operation `id` (waiting for it up to a minute).
async fn final_answer<S: Queue>(store: &S, id: OperationId) -> StoredResponse {
    let op = asyncop::status_wait(store, id, &scope(), Duration::from_secs(60))
        .await
        .expect("status")
        .expect("the operation exists");
    match op.state {
        OperationState::Done(record) => record.response.clone(),
        other => panic!("not done after a minute: {other:?}"),
    }
}

fn counts<S: Queue, U: Upstream>(d: &Dispatcher<S, U>) -> DispatchCounts {
    d.metrics().counts()
}

#[tokio::test(start_paused = true)]
async fn two_failures_then_a_stored_status_is_three_calls_and_the_answer_stored() {
    let store = Arc::new(MemoryStore::new());
    let (calls, upstream) = scripted(&[
        Answer::Status(500),
        Answer::Status(500),
        Answer::Status(201),
    ]);
    let d = Dispatcher::spawn(
        Arc::clone(&store),
        upstream,
        config(2, policy(5, Duration::from_secs(1))),
    );
    let id = accept(&d, "a").await;
    let answer = final_answer(&*store, id).await;
    assert_eq!((answer.status, &answer.body[..]), (201, &b"body of a"[..]));
    assert_eq!(calls.count(), 3);
    // Backoff 1 s then 2 s, each jittered in its upper half, plus at most
    // one poll interval (200 ms) before an idle worker looks again.
    let gaps = calls.gaps();
    assert!(
        gaps[0] >= Duration::from_millis(500) && gaps[0] <= Duration::from_millis(1200),
        "{gaps:?}"
    );
    assert!(
        gaps[1] >= Duration::from_secs(1) && gaps[1] <= Duration::from_millis(2200),
        "{gaps:?}"
    );
    let c = counts(&d);
    assert_eq!(
        (c.attempts, c.retries, c.completed, c.final_failures, c.lost),
        (3, 2, 1, 0, 0)
    );
    // A repeat of the POST replays it.
    match d
        .accept(&key("a"), fp("a"), &request("a"), 1000)
        .await
        .expect("accept")
    {
        Enqueued::Completed(r) => assert_eq!(r.response.status, 201),
        other => panic!("expected the stored answer, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn always_failing_is_max_attempts_calls_then_a_stored_502() {
    let store = Arc::new(MemoryStore::new());
    let (calls, upstream) = scripted(&[Answer::Status(500)]);
    let d = Dispatcher::spawn(
        Arc::clone(&store),
        upstream,
        config(4, policy(3, Duration::from_millis(100))),
    );
    let id = accept(&d, "b").await;
    let answer = final_answer(&*store, id).await;
    assert_eq!(calls.count(), 3, "max_attempts counts every call");
    assert_eq!(answer.status, 502);
    assert!(answer
        .headers
        .iter()
        .any(|(n, v)| n == "content-type" && v == "application/problem+json"));
    let doc: serde_json::Value = serde_json::from_slice(&answer.body).expect("problem json");
    assert_eq!(doc["code"], "upstream_unavailable");
    let detail = doc["detail"].as_str().expect("detail");
    assert!(
        detail.contains("3 attempts") && detail.contains("HTTP 500"),
        "{detail}"
    );
    let c = counts(&d);
    assert_eq!(
        (c.attempts, c.retries, c.completed, c.final_failures),
        (3, 2, 0, 1)
    );
    // Replayed like any stored answer.
    match d
        .accept(&key("b"), fp("b"), &request("b"), 1000)
        .await
        .expect("accept")
    {
        Enqueued::Completed(r) => assert_eq!(r.response, answer),
        other => panic!("expected the stored 502, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn connection_errors_and_time_outs_are_attempts() {
    let store = Arc::new(MemoryStore::new());
    let (calls, upstream) = scripted(&[Answer::Refused, Answer::Hang]);
    let mut p = policy(2, Duration::from_millis(100));
    p.upstream_timeout = Duration::from_secs(2);
    let d = Dispatcher::spawn(Arc::clone(&store), upstream, config(1, p));
    let id = accept(&d, "c").await;
    let answer = final_answer(&*store, id).await;
    assert_eq!((calls.count(), answer.status), (2, 502));
    let doc: serde_json::Value = serde_json::from_slice(&answer.body).expect("problem json");
    let detail = doc["detail"].as_str().expect("detail");
    assert!(
        detail.contains("2 attempts") && detail.contains("no answer within 2s"),
        "{detail}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_latest_failure_is_kept_as_last_error_in_short() {
    let store = Arc::new(MemoryStore::new());
    let (calls, upstream) = scripted(&[Answer::Refused, Answer::Status(503), Answer::Status(201)]);
    let d = Dispatcher::spawn(
        Arc::clone(&store),
        upstream,
        config(1, policy(5, Duration::from_secs(10))),
    );
    let id = accept(&d, "e").await;
    let last_error = |store: Arc<MemoryStore>| async move {
        let op = store
            .operation(id)
            .await
            .expect("operation")
            .expect("known");
        assert!(matches!(op.state, OperationState::Pending { .. }), "{op:?}");
        op.last_error
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(calls.count(), 1);
    // The kind only: the error's own text ("connection refused") and any
    // upstream address stay in the log.
    assert_eq!(
        last_error(Arc::clone(&store)).await.as_deref(),
        Some("attempt 1: the connection was refused")
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(calls.count(), 2);
    assert_eq!(
        last_error(Arc::clone(&store)).await.as_deref(),
        Some("attempt 2: HTTP 503")
    );
    assert_eq!(final_answer(&*store, id).await.status, 201);
    let op = store
        .operation(id)
        .await
        .expect("operation")
        .expect("known");
    assert_eq!(op.last_error, None, "done: the answer says how it ended");
}

#[tokio::test(start_paused = true)]
async fn an_upstream_retry_after_is_honoured() {
    let store = Arc::new(MemoryStore::new());
    let (calls, upstream) = scripted(&[Answer::RetryAfter(503, 7), Answer::Status(200)]);
    let d = Dispatcher::spawn(
        Arc::clone(&store),
        upstream,
        config(2, policy(5, Duration::from_millis(10))),
    );
    let id = accept(&d, "d").await;
    assert_eq!(final_answer(&*store, id).await.status, 200);
    let gap = calls.gaps()[0];
    assert!(
        gap >= Duration::from_secs(7) && gap <= Duration::from_millis(7300),
        "the second call came {gap:?} after the first; Retry-After said 7 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_identical_accepts_are_one_operation_and_one_call() {
    let store = Arc::new(MemoryStore::new());
    let (calls, upstream) = scripted(&[Answer::Status(201)]);
    let d = Arc::new(Dispatcher::spawn(
        Arc::clone(&store),
        upstream,
        config(8, policy(5, Duration::from_millis(10))),
    ));
    let barrier = Arc::new(tokio::sync::Barrier::new(100));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (d, barrier) = (Arc::clone(&d), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                d.accept(&key("e"), fp("e"), &request("e"), 1000)
                    .await
                    .expect("accept")
            })
        })
        .collect();
    let (mut ids, mut accepted) = (Vec::new(), 0);
    for t in tasks {
        match t.await.expect("task") {
            Enqueued::Accepted(id) => {
                accepted += 1;
                ids.push(id);
            }
            Enqueued::Existing(op) => ids.push(op.id),
            // Fast enough to be done before the last accept arrived.
            Enqueued::Completed(r) => assert_eq!(r.response.status, 201),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(accepted, 1, "one operation for 100 identical POSTs");
    assert!(ids.iter().all(|id| *id == ids[0]), "one id");
    assert_eq!(final_answer(&*store, ids[0]).await.status, 201);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(calls.count(), 1, "one upstream call");
}

/// A dispatcher dies mid-call (its tasks aborted, as by kill -9): after the
/// lease another one finishes the operation. 1 or 2 upstream calls, never
/// 0, never more.
#[tokio::test(start_paused = true)]
async fn a_dispatcher_that_dies_mid_call_is_taken_over_after_the_lease() {
    let store = Arc::new(MemoryStore::new());
    let (calls, upstream) = scripted(&[Answer::Hang, Answer::Status(201)]);
    let first = Dispatcher::spawn(
        Arc::clone(&store),
        upstream.clone(),
        config(1, policy(5, Duration::from_millis(10))),
    );
    let id = accept(&first, "f").await;
    while calls.running.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let died = Instant::now();
    drop(first);
    let second = Dispatcher::spawn(
        Arc::clone(&store),
        upstream,
        config(1, policy(5, Duration::from_millis(10))),
    );
    assert_eq!(final_answer(&*store, id).await.status, 201);
    let calls_made = calls.count();
    assert!(
        (1..=2).contains(&calls_made),
        "{calls_made} upstream calls for one operation"
    );
    assert!(
        died.elapsed() >= Duration::from_secs(2),
        "taken over only once the dead dispatcher's lease ran out"
    );
    match asyncop::status(&*store, id, &scope())
        .await
        .expect("status")
    {
        Some(op) => assert!(matches!(op.state, OperationState::Done(_))),
        None => panic!("the operation is gone"),
    }
    assert_eq!(counts(&second).attempts, 1);
}

/// When the dispatcher of the last allowed attempt dies, the one that
/// takes over stores the 502 without calling again.
#[tokio::test(start_paused = true)]
async fn a_takeover_after_the_last_attempt_does_not_call_again() {
    let store = Arc::new(MemoryStore::new());
    let (calls, upstream) = scripted(&[Answer::Hang, Answer::Status(201)]);
    let first = Dispatcher::spawn(
        Arc::clone(&store),
        upstream.clone(),
        config(1, policy(1, Duration::ZERO)),
    );
    let id = accept(&first, "g").await;
    while calls.running.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(first);
    let _second = Dispatcher::spawn(
        Arc::clone(&store),
        upstream,
        config(1, policy(1, Duration::ZERO)),
    );
    let answer = final_answer(&*store, id).await;
    assert_eq!((calls.count(), answer.status), (1, 502));
}

#[tokio::test(start_paused = true)]
async fn an_accept_wakes_an_idle_worker_at_once() {
    let store = Arc::new(MemoryStore::new());
    let (calls, upstream) = scripted(&[Answer::Status(201)]);
    let d = Dispatcher::spawn(
        Arc::clone(&store),
        upstream,
        config(2, DispatchPolicy::default()).poll_interval(Duration::from_secs(3600)),
    );
    // Let the workers go idle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let accepted = Instant::now();
    let id = accept(&d, "h").await;
    assert_eq!(final_answer(&*store, id).await.status, 201);
    assert!(
        calls.at.lock().expect("calls")[0] - accepted < Duration::from_millis(50),
        "the worker waited for its poll instead of being woken"
    );
    // An accept made elsewhere wakes through the handle.
    let id = match asyncop::accept(&*store, &key("i"), fp("i"), &request("i"), 1000)
        .await
        .expect("accept")
    {
        Enqueued::Accepted(id) => id,
        other => panic!("{other:?}"),
    };
    let woken = Instant::now();
    d.wake_handle().wake();
    final_answer(&*store, id).await;
    assert!(calls.at.lock().expect("calls")[1] - woken < Duration::from_millis(50));
}

#[tokio::test(start_paused = true)]
async fn an_accept_only_instance_never_calls_and_another_dispatches() {
    let store = Arc::new(MemoryStore::new());
    let (calls, upstream) = scripted(&[Answer::Status(201)]);
    let web = Dispatcher::spawn(
        Arc::clone(&store),
        upstream.clone(),
        config(0, DispatchPolicy::default()),
    );
    let id = accept(&web, "j").await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(calls.count(), 0);
    let stats = store.queue_stats().await.expect("stats");
    assert_eq!(stats.pending, 1);
    assert_eq!(stats.oldest_pending_age, Some(Duration::from_secs(10)));
    let _worker = Dispatcher::spawn(
        Arc::clone(&store),
        upstream,
        config(1, DispatchPolicy::default()),
    );
    assert_eq!(final_answer(&*store, id).await.status, 201);
    assert_eq!(store.queue_stats().await.expect("stats").pending, 0);
}

#[tokio::test(start_paused = true)]
async fn status_is_for_the_scope_that_accepted() {
    let store = Arc::new(MemoryStore::new());
    let (_, upstream) = scripted(&[Answer::Hang]);
    let d = Dispatcher::spawn(
        Arc::clone(&store),
        upstream,
        config(0, DispatchPolicy::default()),
    );
    let id = accept(&d, "k").await;
    let mine = asyncop::status(&*store, id, &scope())
        .await
        .expect("status");
    assert!(matches!(
        mine.map(|op| op.state),
        Some(OperationState::Pending { attempts: 0, .. })
    ));
    let other = Scope::named("someone else");
    assert!(asyncop::status(&*store, id, &other)
        .await
        .expect("status")
        .is_none());
    let waited = asyncop::status_wait(&*store, id, &other, Duration::from_secs(5))
        .await
        .expect("status");
    assert!(waited.is_none(), "a foreign id reads as unknown, at once");
    assert!(asyncop::status(&*store, OperationId::generate(), &scope())
        .await
        .expect("status")
        .is_none());
    // Waiting on a pending operation answers with its state when the wait ends.
    let started = Instant::now();
    let op = asyncop::status_wait(&*store, id, &scope(), Duration::from_secs(3))
        .await
        .expect("status")
        .expect("found");
    assert!(matches!(op.state, OperationState::Pending { .. }));
    assert_eq!(started.elapsed(), Duration::from_secs(3));
}

/// An operation purged mid-call: the heartbeat finds the lease gone, the
/// call is dropped and nothing is stored.
#[tokio::test(start_paused = true)]
async fn a_lost_lease_drops_the_outcome() {
    let store = Arc::new(MemoryStore::new());
    let (calls, upstream) = scripted(&[Answer::Hang]);
    let d = Dispatcher::spawn(
        Arc::clone(&store),
        upstream,
        config(1, DispatchPolicy::default()),
    );
    accept(&d, "l").await;
    while calls.running.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(store.purge(&key("l")).await.expect("purge"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(counts(&d).lost, 1);
    assert_eq!(counts(&d).in_flight, 0, "the call was dropped");
    assert!(store.get(&key("l")).await.expect("get").is_none());
}

#[tokio::test(start_paused = true)]
async fn each_route_has_its_policy_and_shutdown_lets_calls_finish() {
    let store = Arc::new(MemoryStore::new());
    let (calls, upstream) = scripted(&[Answer::Status(500)]);
    let config = AsyncConfig::default().workers(2).policy_for(|req| {
        if req.uri.ends_with("/once") {
            policy(1, Duration::ZERO)
        } else {
            policy(2, Duration::ZERO)
        }
    });
    let d = Dispatcher::spawn(Arc::clone(&store), upstream, config);
    let once = accept(&d, "once").await;
    let twice = accept(&d, "twice").await;
    assert_eq!(final_answer(&*store, once).await.status, 502);
    assert_eq!(final_answer(&*store, twice).await.status, 502);
    assert_eq!(calls.count(), 3);
    d.shutdown(Duration::from_secs(1)).await;
}
