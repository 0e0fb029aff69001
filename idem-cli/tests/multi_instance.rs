//! Several `idem serve` PROCESSES sharing one store (issue #3, protocol §5–§7):
//!
//! - 300 concurrent same-key requests spread over 3 gateways → exactly one
//!   upstream execution, in `reject` and in `wait`, on Redis and on
//!   PostgreSQL (and, as the control that shows the test can fail, more
//!   than one with a memory store per process);
//! - a holder killed with SIGKILL mid-request: its lease protects the key
//!   until it runs out, then a retry elsewhere executes exactly once more,
//!   and the dead holder's late completion is fenced out;
//! - the store stopped mid-run: `fail = closed` answers 503 without calling
//!   the upstream, `fail = open` forwards, `/readyz` is 503; the store
//!   restarted: requests succeed again with no gateway restart (a private
//!   `redis-server`, and a private PostgreSQL made with `initdb`).
//!
//! The shared Redis (`IDEM_TEST_REDIS_URL`) and PostgreSQL
//! (`IDEM_TEST_DATABASE_URL`) are used with the gateway's default prefix
//! and schema; every test uses idempotency keys of its own (random per
//! run), so runs never see each other's records. Tests that stop a store
//! start a private `redis-server` and stop only that process. A missing
//! service skips the test loudly, or fails it with `IDEM_REQUIRE_SERVICES=1`.

mod support;

#[path = "support/process.rs"]
mod process;

#[path = "../../idem/tests/conformance/services.rs"]
mod services;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::HeaderMap;
use idem::record::Record;
use idem::store::postgres::PostgresStore;
use idem::store::redis::RedisStore;
use idem::store::{AnyStore, Fence, Store};
use idem::{CompletedRecord, Fingerprint, Scope, StoreKey, StoredResponse, Token};
use tokio::sync::Barrier;
use tokio::task::JoinHandle;

use process::{GatewayProcess, PrivatePostgres, PrivateRedis, PrivateStore, Scratch};
use support::{client, send, try_send, Reply, Upstream};

/// Same-key requests per race.
const N: usize = 300;
/// Gateway processes per race.
const INSTANCES: usize = 3;

/// A key no other run or test has used.
fn unique_key(tag: &str) -> String {
    format!("{tag}-{:016x}", rand::random::<u64>())
}

/// The store key the gateway uses for a request without any of the default
/// scope headers (`Authorization`, `Cookie`).
fn store_key(key: &str) -> StoreKey {
    StoreKey::new(
        &Scope::from_headers(
            &HeaderMap::new(),
            &idem::RoutePolicy::default().scope_headers,
        ),
        key,
    )
}

/// The shared Redis, reachable; `None` (skipped loudly) otherwise.
async fn shared_redis() -> Option<String> {
    let url = services::redis_url();
    match RedisStore::connect(&url).await {
        Ok(_) => Some(url),
        Err(e) => services::unavailable("Redis", &url, &e),
    }
}

/// The shared PostgreSQL, reachable; `None` (skipped loudly) otherwise.
async fn shared_postgres() -> Option<String> {
    let url = services::database_url();
    match PostgresStore::connect(&url).await {
        Ok(_) => Some(url),
        Err(e) => services::unavailable("PostgreSQL", &url, &e),
    }
}

/// The store a gateway with `--store url` uses (default prefix / schema).
async fn library_store(url: &str) -> AnyStore {
    if url.starts_with("redis") {
        AnyStore::Redis(RedisStore::connect(url).await.expect("redis store"))
    } else {
        AnyStore::Postgres(PostgresStore::connect(url).await.expect("postgres store"))
    }
}

/// The fencing token the store holds for `key` right now (in flight).
async fn current_token(url: &str, key: &StoreKey) -> Token {
    if url.starts_with("redis") {
        let client = redis::Client::open(url).expect("redis url");
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection");
        let store = RedisStore::connect(url).await.expect("redis store");
        let hex: String = redis::cmd("HGET")
            .arg(store.record_key(key))
            .arg("token")
            .query_async(&mut c)
            .await
            .expect("the holder's token");
        Token::from_u128(u128::from_str_radix(&hex, 16).expect("hex token"))
    } else {
        let store = PostgresStore::connect(url).await.expect("postgres store");
        let sql = format!(
            "SELECT token FROM \"{}\".idem_records WHERE key = $1",
            store.schema()
        );
        let (bytes,): (Vec<u8>,) = sqlx::query_as(&sql)
            .bind(key.as_str())
            .fetch_one(store.pool())
            .await
            .expect("the holder's token");
        Token::from_u128(u128::from_be_bytes(
            bytes.try_into().expect("a 16-byte token"),
        ))
    }
}

/// One `#[tokio::test]` per line, `name: service => body(args)`: runs
/// `body(&url, args…)` against the shared service's URL, or skips loudly
/// (fails with `IDEM_REQUIRE_SERVICES=1`) when it is unreachable.
macro_rules! with_shared {
    ($($name:ident: $service:ident => $body:ident($($arg:expr),*);)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let Some(url) = $service().await else {
                return;
            };
            $body(&url, $($arg),*).await;
        }
    )*};
}

/// `count` gateways on `store`, each with `toml` as its config file.
async fn gateways(
    dir: &Scratch,
    count: usize,
    up: &Upstream,
    store: &str,
    toml: &str,
) -> Vec<GatewayProcess> {
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        out.push(
            GatewayProcess::start(dir.path(), &format!("gw{i}"), &up.url(), store, toml).await,
        );
    }
    out
}

/// Sends `POST path` with `key` through `addr` in the background and
/// returns once the upstream is executing it; the task yields the answer,
/// or an error if the gateway died meanwhile.
async fn executing(
    up: &Upstream,
    addr: SocketAddr,
    path: &str,
    key: &str,
) -> JoinHandle<Result<Reply, String>> {
    let (p, k) = (path.to_owned(), key.to_owned());
    let task = tokio::spawn(async move {
        let h = [("idempotency-key", k.as_str())];
        try_send(&client(), addr, "POST", &p, &h, "{}").await
    });
    let counted = path.split('?').next().unwrap_or(path);
    let deadline = Instant::now() + Duration::from_secs(30);
    while up.count("POST", counted, key) == 0 {
        assert!(Instant::now() < deadline, "the upstream never got {path}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task
}

/// Fires `N` same-key requests, round-robin over `gws`, each on its own
/// connection, all released together at a barrier.
async fn race(gws: &[GatewayProcess], path: &str, key: &str) -> Vec<Reply> {
    let barrier = Arc::new(Barrier::new(N));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let addr = gws[i % gws.len()].addr();
            let (barrier, path, key) = (Arc::clone(&barrier), path.to_owned(), key.to_owned());
            tokio::spawn(async move {
                let c = client();
                barrier.wait().await;
                let h = [("idempotency-key", key.as_str())];
                send(&c, addr, "POST", &path, &h, "{\"sku\":\"tea\"}").await
            })
        })
        .collect();
    let mut replies = Vec::with_capacity(N);
    for t in tasks {
        replies.push(t.await.expect("request task"));
    }
    replies
}

/// Route settings for the races: long waits and store time-outs, so a
/// loaded machine slows the race down but does not change its outcome.
fn race_config(concurrent: &str) -> String {
    format!(
        "[defaults]\nconcurrent = \"{concurrent}\"\nwait_timeout = \"60s\"\nlease = \"30s\"\n\
         upstream_timeout = \"60s\"\n\n[limits]\nstore_timeout = \"10s\"\n"
    )
}

/// The upstream takes this long, so the duplicates overlap the execution.
const RACE_PATH: &str = "/orders?delay_ms=1000";

async fn exactly_once_across_instances(store: &str, concurrent: &str) {
    let up = Upstream::start().await;
    let dir = Scratch::new("race");
    let gws = gateways(&dir, INSTANCES, &up, store, &race_config(concurrent)).await;
    let key = unique_key(&format!("race-{concurrent}"));
    let started = Instant::now();
    let replies = race(&gws, RACE_PATH, &key).await;
    let took = started.elapsed();

    let executions = up.count("POST", "/orders", &key);
    assert_eq!(
        executions, 1,
        "{N} concurrent same-key requests over {INSTANCES} gateways sharing {store} \
         (concurrent = {concurrent}) must execute the upstream exactly once; \
         more means the shared reservation let a duplicate through"
    );
    let executed: Vec<&Reply> = replies
        .iter()
        .filter(|r| r.status == 201 && r.header("idempotent-replayed").is_none())
        .collect();
    assert_eq!(executed.len(), 1, "exactly one caller sees the execution");
    let original = executed[0];
    let mut conflicts = 0;
    for r in &replies {
        match r.status {
            201 => assert_eq!(r.body, original.body, "every 201 carries the same bytes"),
            409 if concurrent == "reject" => {
                r.assert_problem(409, "idempotency_key_in_progress");
                assert!(r.header("retry-after").is_some(), "409 without Retry-After");
                conflicts += 1;
            }
            other => panic!(
                "concurrent = {concurrent}: unexpected {other}: {:?}",
                r.body
            ),
        }
    }
    if concurrent == "wait" {
        assert_eq!(conflicts, 0, "in wait mode every duplicate gets the answer");
    }
    eprintln!(
        "{store} {concurrent}: {N} requests over {INSTANCES} processes in {took:?}: \
         1 execution, {conflicts}×409, {} replays",
        N - 1 - conflicts
    );
}

with_shared! {
    redis_reject_300_over_3_instances_execute_once: shared_redis => exactly_once_across_instances("reject");
    redis_wait_300_over_3_instances_execute_once: shared_redis => exactly_once_across_instances("wait");
    postgres_reject_300_over_3_instances_execute_once: shared_postgres => exactly_once_across_instances("reject");
    postgres_wait_300_over_3_instances_execute_once: shared_postgres => exactly_once_across_instances("wait");
}

/// The control: the same race over 3 processes that each keep their own
/// memory store executes once PER PROCESS. It shows that the races above
/// can fail, and why instances must share a store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_per_process_executes_once_per_instance() {
    let up = Upstream::start().await;
    let dir = Scratch::new("race-memory");
    let gws = gateways(&dir, INSTANCES, &up, "memory", &race_config("wait")).await;
    let key = unique_key("race-memory");
    let replies = race(&gws, RACE_PATH, &key).await;
    assert!(replies.iter().all(|r| r.status == 201));
    assert_eq!(
        up.count("POST", "/orders", &key),
        INSTANCES,
        "with a memory store per process, each process executes once"
    );
}

// --- a holder killed mid-request ---

/// The holder's lease. Its heartbeat runs every lease/3, so at any moment
/// at least 2/3 of it is left.
const LEASE: Duration = Duration::from_secs(6);

async fn killed_holder_is_taken_over_once_and_fenced(store: &str) {
    let up = Upstream::start().await;
    let dir = Scratch::new("kill");
    // store_timeout: at most a third of the lease, or the lease could lapse
    // under a slow store (refused at start-up).
    let toml = "[defaults]\nlease = \"6s\"\nupstream_timeout = \"120s\"\n\n\
                [limits]\nstore_timeout = \"2s\"\n";
    let mut gws = gateways(&dir, 2, &up, store, toml).await;
    let key = unique_key("kill");
    let k = store_key(&key);
    // The first execution hangs (until its gateway is killed); the
    // take-over's is quick. Same path and query: same fingerprint.
    let path = "/orders?slow_first_ms=600000";
    let h = [("idempotency-key", key.as_str())];

    let in_flight = executing(&up, gws[0].addr(), path, &key).await;
    // The token of the holder about to die, as the store has it.
    let stale = current_token(store, &k).await;

    gws[0].kill();
    let killed = Instant::now();
    assert!(
        in_flight.await.expect("task").is_err(),
        "the killed gateway cannot answer"
    );

    // Its lease still protects the key: a retry elsewhere is refused.
    let c = client();
    let b = gws[1].addr();
    let retry = send(&c, b, "POST", path, &h, "{}").await;
    if retry.status == 409 {
        retry.assert_problem(409, "idempotency_key_in_progress");
        assert!(retry.header("retry-after").is_some());
        assert_eq!(up.count("POST", "/orders", &key), 1, "a 409 forwarded");
    } else {
        // Only a stall longer than the guaranteed 2/3 of the lease excuses it.
        assert!(
            killed.elapsed() >= LEASE * 2 / 3,
            "a retry while the dead holder's lease runs must get 409, got {} after {:?}: {:?}",
            retry.status,
            killed.elapsed(),
            retry.body
        );
    }
    // After the lease: the retry executes, exactly once more.
    let deadline = Instant::now() + LEASE + Duration::from_secs(30);
    let taken_over = loop {
        let r = send(&c, b, "POST", path, &h, "{}").await;
        if r.status != 409 {
            break r;
        }
        assert!(Instant::now() < deadline, "the lease never ran out");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let waited = killed.elapsed();
    assert_eq!(taken_over.status, 201, "{:?}", taken_over.body);
    assert_eq!(
        up.count("POST", "/orders", &key),
        2,
        "a dead holder's key executes exactly once more after its lease"
    );
    assert!(
        waited >= LEASE / 3,
        "taken over after {waited:?}: sooner than the lease allows"
    );

    // The dead holder "wakes up" and completes with its own token, or with
    // any other: fenced out, nothing changes.
    let lib = library_store(store).await;
    let now = SystemTime::now();
    let late = Arc::new(CompletedRecord {
        fingerprint: Fingerprint::of_bytes(b"late"),
        response: StoredResponse {
            status: 200,
            headers: Vec::new(),
            body: Bytes::from_static(b"late completion"),
        },
        completed_at: now,
        expires_at: now + Duration::from_secs(3600),
    });
    for token in [stale, Token::generate()] {
        let fence = lib
            .complete(&k, token, Arc::clone(&late), Duration::from_secs(3600))
            .await
            .expect("complete");
        assert_eq!(fence, Fence::Lost, "a fenced-out holder must not overwrite");
        assert_eq!(lib.release(&k, token).await.expect("release"), Fence::Lost);
    }
    match lib.get(&k).await.expect("get") {
        Some(Record::Completed(r)) => {
            assert_eq!(r.response.status, 201);
            assert_eq!(
                r.response.body, taken_over.body,
                "the stored answer changed"
            );
        }
        other => panic!("expected the take-over's completed record, got {other:?}"),
    }
    // And through the gateway (B, and a fresh instance without a local cache).
    let fresh = GatewayProcess::start(dir.path(), "fresh", &up.url(), store, toml).await;
    for addr in [b, fresh.addr()] {
        let replay = send(&c, addr, "POST", path, &h, "{}").await;
        assert_eq!(replay.header("idempotent-replayed"), Some("true"));
        assert_eq!(replay.body, taken_over.body);
    }
    assert_eq!(up.count("POST", "/orders", &key), 2);
    eprintln!("{store}: holder killed; taken over after {waited:?}");
}

with_shared! {
    redis_killed_holder_is_taken_over_once_and_fenced: shared_redis => killed_holder_is_taken_over_once_and_fenced();
    postgres_killed_holder_is_taken_over_once_and_fenced: shared_postgres => killed_holder_is_taken_over_once_and_fenced();
}

/// `wait` mode: duplicates parked on two other instances while the holder
/// is SIGKILLed do not hang until `wait_timeout` and do not all execute:
/// when the dead holder's lease runs out, exactly one of them takes over,
/// and the others get its answer.
async fn waiters_take_over_a_killed_holder_once(store: &str) {
    const WAITERS: usize = 30;
    let up = Upstream::start().await;
    let dir = Scratch::new("kill-wait");
    let toml = "[defaults]\nconcurrent = \"wait\"\nwait_timeout = \"120s\"\nlease = \"3s\"\n\
                upstream_timeout = \"120s\"\n\n[limits]\nstore_timeout = \"1s\"\n";
    let mut gws = gateways(&dir, 3, &up, store, toml).await;
    let key = unique_key("kill-wait");
    let path = "/orders?slow_first_ms=600000";
    let in_flight = executing(&up, gws[0].addr(), path, &key).await;
    // Park the waiters on B and C while A still holds the key...
    let waiters: Vec<_> = (0..WAITERS)
        .map(|i| {
            let addr = gws[1 + i % 2].addr();
            let key = key.clone();
            tokio::spawn(async move {
                let h = [("idempotency-key", key.as_str())];
                send(&client(), addr, "POST", path, &h, "{}").await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...then A dies.
    gws[0].kill();
    let killed = Instant::now();
    assert!(in_flight.await.expect("task").is_err());
    let mut replies = Vec::with_capacity(WAITERS);
    for w in waiters {
        replies.push(w.await.expect("waiter"));
    }
    let took = killed.elapsed();
    assert_eq!(
        up.count("POST", "/orders", &key),
        2,
        "after a dead holder's lease, exactly one waiter executes"
    );
    let first = &replies[0];
    for r in &replies {
        assert_eq!(r.status, 201, "{:?}", r.body);
        assert_eq!(
            r.body, first.body,
            "every waiter gets the take-over's answer"
        );
    }
    assert_eq!(
        replies
            .iter()
            .filter(|r| r.header("idempotent-replayed").is_none())
            .count(),
        1
    );
    assert!(
        took < Duration::from_secs(60),
        "waiters should be served soon after the 3 s lease, not at wait_timeout: {took:?}"
    );
    eprintln!("{store}: {WAITERS} waiters on 2 instances served {took:?} after the holder died");
}

with_shared! {
    redis_waiters_take_over_a_killed_holder_once: shared_redis => waiters_take_over_a_killed_holder_once();
    postgres_waiters_take_over_a_killed_holder_once: shared_postgres => waiters_take_over_a_killed_holder_once();
}

// --- the store stopped and restarted under a running gateway ---

async fn store_down_closed_refuses_open_forwards_and_recovers(mut store: impl PrivateStore) {
    let up = Upstream::start().await;
    let dir = Scratch::new("store-down");
    // Default closed; `/open/*` is open. Short store time-outs: a dead
    // store is noticed quickly.
    let toml = "[defaults]\nlease = \"3s\"\n\n[limits]\nstore_timeout = \"1s\"\n\n\
                [[route]]\nmatch = \"POST /open/*\"\nfail = \"open\"\n";
    let gw = GatewayProcess::start(dir.path(), "gw", &up.url(), &store.url(), toml).await;
    let (c, a) = (client(), gw.addr());
    let post = |path: &'static str, key: String| {
        let c = c.clone();
        async move {
            let h = [("idempotency-key", key.as_str())];
            send(&c, a, "POST", path, &h, "{}").await
        }
    };

    // Up: both routes protected.
    for path in ["/closed/x", "/open/x"] {
        let key = unique_key("up");
        assert_eq!(post(path, key.clone()).await.status, 201);
        let again = post(path, key.clone()).await;
        assert_eq!(again.header("idempotent-replayed"), Some("true"));
        assert_eq!(up.count("POST", path, &key), 1);
    }

    // A request executing when the store goes away still gets its answer
    // (its `complete` fails and is retried until the lease ends, protocol §3.9).
    let slow_key = unique_key("in-flight");
    let slow = executing(&up, a, "/closed/slow?delay_ms=1500", &slow_key).await;

    store.stop();
    let stopped = Instant::now();
    let r = slow
        .await
        .expect("in-flight request")
        .expect("an answer although the store went away");
    let in_flight_answer = stopped.elapsed();
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert!(
        stopped.elapsed() < Duration::from_secs(30),
        "the answer waited {:?}: longer than the lease and its retries allow",
        stopped.elapsed()
    );
    gw.wait_readyz(503, Duration::from_secs(20)).await;

    // closed: 503, retryable, with Retry-After, and the upstream untouched.
    let key = unique_key("closed");
    let asked = Instant::now();
    let r = post("/closed/x", key.clone()).await;
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "a dead store held the request {:?} (store_timeout = 1s)",
        asked.elapsed()
    );
    r.assert_problem(503, "idempotency_store_unavailable");
    assert!(r.header("retry-after").is_some(), "503 without Retry-After");
    assert_eq!(up.count("POST", "/closed/x", &key), 0, "closed forwarded");

    // open: forwarded, without protection (each repeat executes).
    let key = unique_key("open");
    for n in 1..=2 {
        let r = post("/open/x", key.clone()).await;
        assert_eq!(r.status, 201, "open must forward: {:?}", r.body);
        assert_eq!(r.header("idempotent-replayed"), None);
        assert_eq!(up.count("POST", "/open/x", &key), n);
    }
    assert_eq!(gw.readyz().await, Some(503));

    // Restarted (same port, empty): the same gateway process recovers.
    store.restart().await.expect("restart the store");
    let restarted = Instant::now();
    let key = unique_key("back");
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let r = post("/closed/x", key.clone()).await;
        if r.status != 503 {
            break r;
        }
        assert_eq!(up.count("POST", "/closed/x", &key), 0, "a 503 forwarded");
        assert!(
            Instant::now() < deadline,
            "no recovery after the store came back:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let recovered = restarted.elapsed();
    assert_eq!(first.status, 201, "{:?}", first.body);
    let again = post("/closed/x", key.clone()).await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, first.body);
    assert_eq!(up.count("POST", "/closed/x", &key), 1);
    // open is protected again too.
    let key = unique_key("open-back");
    assert_eq!(post("/open/x", key.clone()).await.status, 201);
    let again = post("/open/x", key.clone()).await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(up.count("POST", "/open/x", &key), 1);
    gw.wait_readyz(200, Duration::from_secs(20)).await;
    eprintln!(
        "{}: in-flight answer {in_flight_answer:?} after the stop; \
         restarted; requests succeed again after {recovered:?}",
        store.url()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_closed_refuses_open_forwards_and_recovers() {
    match PrivateRedis::start().await {
        Ok(redis) => store_down_closed_refuses_open_forwards_and_recovers(redis).await,
        Err(e) => {
            services::unavailable::<()>("redis-server (private)", "PATH", &e);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_closed_refuses_open_forwards_and_recovers() {
    match PrivatePostgres::start().await {
        Ok(pg) => store_down_closed_refuses_open_forwards_and_recovers(pg).await,
        Err(e) => {
            services::unavailable::<()>("PostgreSQL (private, initdb)", "/usr/lib/postgresql", &e);
        }
    }
}
