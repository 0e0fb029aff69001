//! Async mode across real `idem serve` PROCESSES sharing one store, with
//! instances killed by SIGKILL (issue #8, protocol §9.4–§9.7), on Redis and
//! on PostgreSQL:
//!
//! - an accept-only instance (`async_workers = 0`) takes 50 operations and
//!   is killed → a worker instance started afterwards runs every one
//!   exactly once;
//! - a dispatching instance killed while the upstream holds its call →
//!   another instance finishes the operation once the lease has run out
//!   (1 or 2 upstream calls, never 0, never more);
//! - 3 dispatching instances, 300 operations, one instance killed halfway
//!   through the dispatch → all 300 done, none lost.
//!
//! Every worker instance on a store claims every due operation and sends it
//! to its OWN upstream, so each test starts a private store server
//! (`redis-server`, or a PostgreSQL cluster made with `initdb`) and its own
//! upstream: nothing else dispatches from its store, and it sees no other
//! test's operations. The tests of this file run one at a time (they start
//! several processes each, on a possibly loaded machine). A missing server
//! binary skips the test loudly, or fails it with `IDEM_REQUIRE_SERVICES=1`.

mod support;

#[path = "support/process.rs"]
mod process;

#[path = "../../idem/tests/conformance/services.rs"]
mod services;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use process::{GatewayProcess, PrivatePostgres, PrivateRedis, PrivateStore, Scratch};
use support::{client, send, HttpClient, Reply, Upstream};

/// One test at a time in this binary.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long an operation may take to be done on a loaded machine before a
/// test calls it lost.
const DONE_WITHIN: Duration = Duration::from_secs(120);

/// A key no other run has used.
fn unique(tag: &str) -> String {
    format!("{tag}-{:016x}", rand::random::<u64>())
}

/// A gateway config: `[limits]` with `workers` dispatchers, and one async
/// route `POST /jobs/*` with `lease`. `store_timeout` is a third of the
/// lease (the most allowed); the upstream never times out on its own.
fn config(workers: usize, lease_s: u64) -> String {
    let store_timeout_ms = lease_s * 1000 / 3;
    format!(
        "[limits]\nasync_workers = {workers}\nstore_timeout = \"{store_timeout_ms}ms\"\n\n\
         [[route]]\nmatch = \"POST /jobs/*\"\nmode = \"async\"\nlease = \"{lease_s}s\"\n\
         max_attempts = 5\nretry_backoff = \"200ms\"\nupstream_timeout = \"600s\"\n\
         wait_timeout = \"10s\"\n"
    )
}

/// The operation id of a 202 (protocol §9.1).
fn accepted_id(r: &Reply) -> String {
    assert_eq!(r.status, 202, "{:?}", r.body);
    let v = r.json();
    let id = v["id"].as_str().expect("an id").to_owned();
    assert_eq!(
        r.header("location"),
        Some(format!("/_idem/operations/{id}").as_str())
    );
    id
}

async fn post(c: &HttpClient, gw: SocketAddr, path: &str, key: &str) -> Reply {
    send(c, gw, "POST", path, &[("idempotency-key", key)], "{}").await
}

/// Long-polls `GET /_idem/operations/{id}` on `gw` until the operation is
/// done; panics after [`DONE_WITHIN`].
async fn final_answer(c: &HttpClient, gw: &GatewayProcess, id: &str) -> Reply {
    let deadline = Instant::now() + DONE_WITHIN;
    loop {
        let path = format!("/_idem/operations/{id}?wait=5s");
        let r = send(c, gw.addr(), "GET", &path, &[], "").await;
        if r.status != 202 {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "operation {id} not done after {DONE_WITHIN:?}: {:?}\n{}",
            r.body,
            gw.log()
        );
    }
}

/// Waits until `cond` holds, or panics with `what` after `within`.
async fn until(within: Duration, what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "{what} (after {within:?})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two `#[tokio::test]`s per line, on a private `redis-server` and on a
/// private PostgreSQL: `redis_name, postgres_name => body;` runs
/// `body(&store_url)`, one test at a time.
macro_rules! on_private_stores {
    ($($redis:ident, $postgres:ident => $body:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $redis() {
            let _one_at_a_time = SERIAL.lock().await;
            match PrivateRedis::start().await {
                Ok(store) => $body(&PrivateStore::url(&store)).await,
                Err(e) => {
                    services::unavailable::<()>("redis-server (private)", "PATH", &e);
                }
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $postgres() {
            let _one_at_a_time = SERIAL.lock().await;
            match PrivatePostgres::start().await {
                Ok(store) => $body(&store.url()).await,
                Err(e) => {
                    services::unavailable::<()>(
                        "PostgreSQL (private, initdb)",
                        "/usr/lib/postgresql",
                        &e,
                    );
                }
            }
        }
    )*};
}

// --- 1. an accept-only instance killed with 50 operations pending ---

const ACCEPTED: usize = 50;

async fn killed_accept_only_instance_loses_nothing(store: &str) {
    let up = Upstream::start().await;
    let dir = Scratch::new("async-kill-web");
    let c = client();
    let mut web = GatewayProcess::start(dir.path(), "web", &up.url(), store, &config(0, 30)).await;
    let keys: Vec<String> = (0..ACCEPTED).map(|i| unique(&format!("web{i}"))).collect();
    let mut ids = Vec::with_capacity(ACCEPTED);
    for key in &keys {
        ids.push(accepted_id(&post(&c, web.addr(), "/jobs/web", key).await));
    }
    // Accepted, not dispatched.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(up.total(), 0, "an accept-only instance dispatches nothing");

    web.kill();
    let killed = Instant::now();

    let worker =
        GatewayProcess::start(dir.path(), "worker", &up.url(), store, &config(8, 30)).await;
    for (key, id) in keys.iter().zip(&ids) {
        let done = final_answer(&c, &worker, id).await;
        assert_eq!(done.status, 201, "{key}: {:?}", done.body);
        assert_eq!(done.header("idempotent-replayed"), Some("true"));
    }
    let took = killed.elapsed();
    // Nothing runs twice, not even late.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for key in &keys {
        assert_eq!(
            up.count("POST", "/jobs/web", key),
            1,
            "{key}: an accepted operation must run exactly once"
        );
    }
    assert_eq!(up.total(), ACCEPTED);
    // The stored answers replay.
    let replay = post(&c, worker.addr(), "/jobs/web", &keys[0]).await;
    assert_eq!(replay.status, 201);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(up.total(), ACCEPTED);
    eprintln!(
        "{store}: accept-only instance killed with {ACCEPTED} pending; \
         a new worker ran them all once in {took:?}"
    );
}

// --- 2. a dispatching instance killed mid-call ---

/// The lease of test 2 (with a third of it as `store_timeout`).
const SHORT_LEASE: u64 = 3;

async fn dispatcher_killed_mid_call_is_taken_over_after_the_lease(store: &str) {
    let up = Upstream::start().await;
    let dir = Scratch::new("async-kill-mid-call");
    let c = client();
    let toml = config(4, SHORT_LEASE);
    let mut a = GatewayProcess::start(dir.path(), "a", &up.url(), store, &toml).await;
    let key = unique("mid-call");
    // The first call hangs (until its gateway dies and beyond); a second
    // one is quick. Same path and query: the same operation.
    let path = "/jobs/mid?slow_first_ms=600000";
    let id = accepted_id(&post(&c, a.addr(), path, &key).await);
    until(
        Duration::from_secs(30),
        "instance A never dispatched the operation",
        || up.count("POST", "/jobs/mid", &key) == 1,
    )
    .await;

    // A second worker instance does not take the operation while A's
    // heartbeat keeps the lease: wait longer than a lease.
    let b = GatewayProcess::start(dir.path(), "b", &up.url(), store, &toml).await;
    tokio::time::sleep(Duration::from_secs(SHORT_LEASE + 2)).await;
    assert_eq!(
        up.count("POST", "/jobs/mid", &key),
        1,
        "another instance took an operation whose dispatcher is alive"
    );
    let s = send(
        &c,
        b.addr(),
        "GET",
        &format!("/_idem/operations/{id}"),
        &[],
        "",
    )
    .await;
    assert_eq!(s.status, 202, "{:?}", s.body);
    assert_eq!(s.json()["status"], "running", "{:?}", s.body);

    a.kill();
    let killed = Instant::now();
    let done = final_answer(&c, &b, &id).await;
    let took = killed.elapsed();
    assert_eq!(done.status, 201, "{:?}", done.body);
    let calls = up.count("POST", "/jobs/mid", &key);
    assert!(
        (1..=2).contains(&calls),
        "a dispatcher killed mid-call: {calls} upstream calls (1 or 2 allowed)"
    );
    // Here the first call never answers, so the answer is the second's.
    assert_eq!(done.header("x-execution"), Some("2"));
    // No third call later, and the answer stays.
    tokio::time::sleep(Duration::from_secs(SHORT_LEASE + 1)).await;
    assert_eq!(up.count("POST", "/jobs/mid", &key), calls);
    let again = final_answer(&c, &b, &id).await;
    assert_eq!(again.body, done.body);
    eprintln!(
        "{store}: dispatcher killed mid-call; taken over and done {took:?} later \
         ({calls} upstream calls, lease {SHORT_LEASE}s)"
    );
}

// --- 3. 3 instances, 300 operations, one killed halfway ---

const OPERATIONS: usize = 300;
const INSTANCES: usize = 3;

async fn one_of_three_killed_halfway_loses_nothing(store: &str) {
    let up = Upstream::start().await;
    let dir = Scratch::new("async-kill-3");
    let c = client();
    // 4 workers each and a 200 ms upstream: about 60 operations a second
    // over 3 instances, so the kill lands while A has calls in flight and
    // operations of its own pending.
    let toml = config(4, SHORT_LEASE);
    let mut gws = Vec::with_capacity(INSTANCES);
    for i in 0..INSTANCES {
        gws.push(
            GatewayProcess::start(dir.path(), &format!("gw{i}"), &up.url(), store, &toml).await,
        );
    }
    let path = "/jobs/many?delay_ms=200";
    let keys: Vec<String> = (0..OPERATIONS).map(|i| unique(&format!("op{i}"))).collect();
    // Accepted round-robin over the 3 instances, 10 at a time.
    let mut ids = Vec::with_capacity(OPERATIONS);
    for (n, chunk) in keys.chunks(10).enumerate() {
        let tasks: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(i, key)| {
                let addr = gws[(n * 10 + i) % INSTANCES].addr();
                let (c, key) = (c.clone(), key.clone());
                tokio::spawn(async move { post(&c, addr, path, &key).await })
            })
            .collect();
        for t in tasks {
            ids.push(accepted_id(&t.await.expect("post task")));
        }
    }
    until(
        DONE_WITHIN,
        "the upstream never got half of the operations",
        || up.total() >= OPERATIONS / 2,
    )
    .await;
    gws[0].kill();
    let killed = Instant::now();
    let at_kill = up.total();

    for (i, (key, id)) in keys.iter().zip(&ids).enumerate() {
        // Asked of a survivor.
        let done = final_answer(&c, &gws[1 + i % 2], id).await;
        assert_eq!(done.status, 201, "{key}: {:?}", done.body);
    }
    let took = killed.elapsed();
    let mut twice = 0;
    for (i, key) in keys.iter().enumerate() {
        let calls = up.count("POST", "/jobs/many", key);
        assert!(calls >= 1, "{key}: done without an upstream call");
        assert!(
            calls <= 2,
            "{key}: {calls} upstream calls; only A's in-flight calls may run twice"
        );
        twice += usize::from(calls == 2);
        // Its final answer is stored: a repeat replays it.
        let replay = post(&c, gws[1 + i % 2].addr(), path, key).await;
        assert_eq!(replay.status, 201, "{key}: {:?}", replay.body);
        assert_eq!(replay.header("idempotent-replayed"), Some("true"), "{key}");
    }
    assert!(
        twice <= 4,
        "{twice} operations ran twice; at most A's 4 in-flight calls may"
    );
    eprintln!(
        "{store}: {OPERATIONS} operations over {INSTANCES} instances, one killed after \
         {at_kill} upstream calls; all done {took:?} later, {twice} run twice"
    );
}

on_private_stores! {
    redis_killed_accept_only_instance_loses_nothing,
    postgres_killed_accept_only_instance_loses_nothing
        => killed_accept_only_instance_loses_nothing;
    redis_dispatcher_killed_mid_call_is_taken_over_after_the_lease,
    postgres_dispatcher_killed_mid_call_is_taken_over_after_the_lease
        => dispatcher_killed_mid_call_is_taken_over_after_the_lease;
    redis_one_of_three_killed_halfway_loses_nothing,
    postgres_one_of_three_killed_halfway_loses_nothing
        => one_of_three_killed_halfway_loses_nothing;
}
