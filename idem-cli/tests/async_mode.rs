//! Async mode end to end (protocol §9, issue #8): `idem serve` on port 0 with
//! `mode = "async"` routes in front of a scripted upstream, each flow on
//! EVERY store (`on_every_store!`: a `memory`, `redis` and `postgres` test
//! per flow):
//!
//! - the 202 (Location = href, Retry-After, JSON), a repeat while running
//!   (same id), the long-poll that returns the stored answer, a repeat
//!   after done (replay), another body (422);
//! - 100 concurrent identical POSTs → one id, one upstream call;
//! - 500, 500, 201 → three calls, final 201; always 500 → `max_attempts`
//!   calls, then the stored 502 `upstream_unavailable`;
//! - unknown, malformed and foreign ids → the same 404; `/_idem/…` never
//!   reaches the upstream, in any spelling or method;
//! - `max_pending` → 503 with nothing stored;
//! - the figures on `/metrics`, an operation on the admin listener, with
//!   its `last_error` while a retry waits;
//! - an accept-only instance and a worker instance sharing PostgreSQL (and
//!   Redis): the worker runs what the other accepted, with the 202s, the
//!   herd, the retries and the final 502.
//!
//! Each test has a store of its own, since every dispatching instance
//! claims every due operation of its store (and sends it to ITS upstream),
//! and `max_pending` counts the whole store: the gateway has no key-prefix
//! or schema option, so Redis tests each start a private `redis-server`
//! (as the multi-instance tests do) and PostgreSQL tests each get a fresh
//! database on the shared server (`IDEM_TEST_DATABASE_URL`), dropped at the
//! end (and, if a run died, by a later run). A missing server skips the
//! test loudly, or fails it under `IDEM_REQUIRE_SERVICES=1`.

mod support;

#[path = "support/process.rs"]
mod process;

#[path = "../../idem/tests/conformance/services.rs"]
mod services;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use bytes::Bytes;
use tokio::sync::{watch, Barrier};

use idem_cli::gateway::Gateway;
use support::{client, gateway_with_env, send, HttpClient, Reply};

const TOKEN: &str = "async-admin-token-0123456789";

fn env(name: &str) -> Option<String> {
    (name == "IDEM_ADMIN_TOKEN").then(|| TOKEN.to_owned())
}

/// A key no other run has used.
fn unique(tag: &str) -> String {
    format!("{tag}-{:016x}", rand::random::<u64>())
}

// ---------------------------------------------------------------------------
// A scripted upstream.

/// One call the upstream received.
#[derive(Debug, Clone)]
struct Seen {
    key: String,
    request_id: String,
    body: Bytes,
}

/// Answers `?plan=500,500,201` with the n-th status of the plan on its
/// n-th call for a key (the last one after that; 201 without a plan),
/// and, with `?hold=1`, only once the gate is open.
#[derive(Clone)]
struct Script {
    calls: Arc<Mutex<HashMap<String, Vec<Seen>>>>,
    gate: watch::Sender<bool>,
    addr: SocketAddr,
}

impl Script {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let script = Self {
            calls: Arc::default(),
            gate: watch::channel(false).0,
            addr: listener.local_addr().expect("addr"),
        };
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(script.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        script
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn open(&self) {
        self.gate.send_replace(true);
    }

    fn seen(&self, key: &str) -> Vec<Seen> {
        self.calls
            .lock()
            .expect("lock")
            .get(key)
            .cloned()
            .unwrap_or_default()
    }

    fn count(&self, key: &str) -> usize {
        self.seen(key).len()
    }

    fn total(&self) -> usize {
        self.calls
            .lock()
            .expect("lock")
            .values()
            .map(Vec::len)
            .sum()
    }

    /// Waits until `key` was called `n` times (or panics after 10 s).
    async fn called(&self, key: &str, n: usize) {
        for _ in 0..1000 {
            if self.count(key) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "the upstream saw {} calls for {key}, expected {n}",
            self.count(key)
        );
    }
}

async fn answer(
    State(script): State<Script>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let key = text("idempotency-key");
    let n = {
        let mut calls = script.calls.lock().expect("lock");
        let list = calls.entry(key.clone()).or_default();
        list.push(Seen {
            key: key.clone(),
            request_id: text("x-request-id"),
            body: body.clone(),
        });
        list.len()
    };
    let query = uri.query().unwrap_or("");
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|p| p.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
    };
    if param("hold").is_some() {
        let mut open = script.gate.subscribe();
        let _ = open.wait_for(|o| *o).await;
    }
    let plan: Vec<u16> = param("plan")
        .map(|p| p.split(',').filter_map(|s| s.parse().ok()).collect())
        .unwrap_or_default();
    let status = plan.get(n - 1).or(plan.last()).copied().unwrap_or(201);
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        [("x-call", n.to_string())],
        format!("{{\"call\":{n},\"key\":\"{key}\",\"status\":{status}}}"),
    )
}

// ---------------------------------------------------------------------------
// Helpers.

const ASYNC_ROUTE: &str = "
[[route]]
match = \"POST /jobs/*\"
mode = \"async\"
retry_backoff = \"10ms\"
max_attempts = 3
";

/// A gateway on `store` (a `store = "…"` line, empty for memory) with the
/// admin listener, `extra` and the async route.
async fn start(store: &str, up: &Script, extra: &str) -> Gateway {
    gateway_with_env(
        &up.url(),
        &format!("admin_listen = \"127.0.0.1:0\"\n{store}\n{extra}\n{ASYNC_ROUTE}"),
        &env,
    )
    .await
}

// ---------------------------------------------------------------------------
// A store of the test's own, of each kind.

#[derive(Debug, Clone, Copy)]
enum Kind {
    Memory,
    Redis,
    Postgres,
}

/// A store only this test uses; [`finish`](Self::finish) removes it.
struct Isolated {
    /// The `store = "…"` line (empty: memory).
    line: String,
    /// Killed on drop.
    _redis: Option<process::PrivateRedis>,
    /// The database to drop at the end.
    database: Option<String>,
}

impl Isolated {
    /// `None`: the service is missing and the test is skipped (loudly).
    async fn new(kind: Kind) -> Option<Self> {
        match kind {
            Kind::Memory => Some(Self {
                line: String::new(),
                _redis: None,
                database: None,
            }),
            Kind::Redis => match process::PrivateRedis::start().await {
                Ok(redis) => Some(Self {
                    line: format!("store = \"{}\"", redis.url()),
                    _redis: Some(redis),
                    database: None,
                }),
                Err(e) => services::unavailable("redis-server", "a free port", &e),
            },
            Kind::Postgres => {
                let url = services::database_url();
                match fresh_database(&url).await {
                    Ok((name, db_url)) => Some(Self {
                        line: format!("store = \"{db_url}\""),
                        _redis: None,
                        database: Some(name),
                    }),
                    Err(e) => services::unavailable("PostgreSQL", &url, &e),
                }
            }
        }
    }

    fn store(&self) -> &str {
        &self.line
    }

    /// Drops the test's database (its gateways are shut down by now).
    async fn finish(self) {
        if let Some(name) = &self.database {
            let url = services::database_url();
            if let Ok(mut c) = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut c)
                    .await;
            }
        }
    }
}

/// Databases of this suite are named `idem_e2e_<unix seconds>_<random>`.
const DB_PREFIX: &str = "idem_e2e_";

/// Creates a database of the test's own on the server of `url`; its name
/// and URL. Drops the ones earlier runs left behind (over an hour old).
async fn fresh_database(url: &str) -> Result<(String, String), sqlx::Error> {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(url).await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let names: Vec<(String,)> =
        sqlx::query_as("SELECT datname FROM pg_database WHERE starts_with(datname, $1)")
            .bind(DB_PREFIX)
            .fetch_all(&mut c)
            .await?;
    for (name,) in names {
        let born = name
            .strip_prefix(DB_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|s| s.parse::<u64>().ok());
        if born.is_some_and(|t| t + 3600 < now) {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(&mut c)
                .await;
        }
    }
    let name = format!("{DB_PREFIX}{now}_{:08x}", rand::random::<u32>());
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut c)
        .await?;
    // The same URL with the database (its path) replaced.
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_end = base
        .find("://")
        .map(|i| i + 3)
        .and_then(|start| base[start..].find('/').map(|j| start + j))
        .unwrap_or(base.len());
    let mut db_url = format!("{}/{name}", &base[..authority_end]);
    if let Some(q) = query {
        db_url = format!("{db_url}?{q}");
    }
    Ok((name, db_url))
}

/// `on_every_store!(flow)`: `flow::memory`, `flow::redis` and
/// `flow::postgres`, each running `async fn flow(store: &str)` on a store
/// of its own.
macro_rules! on_every_store {
    ($($flow:ident),* $(,)?) => {$(
        mod $flow {
            use super::{Isolated, Kind};

            async fn on(kind: Kind) {
                let Some(store) = Isolated::new(kind).await else { return };
                super::$flow(store.store()).await;
                store.finish().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn memory() {
                on(Kind::Memory).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn redis() {
                on(Kind::Redis).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                on(Kind::Postgres).await;
            }
        }
    )*};
}

on_every_store!(
    accept_repeat_long_poll_and_replay,
    a_hundred_concurrent_posts_make_one_operation,
    failed_attempts_are_retried_until_a_stored_status,
    the_last_failed_attempt_stores_a_502,
    derived_keys_and_answers_too_large_to_store,
    unknown_malformed_and_foreign_ids_get_the_same_404,
    max_pending_refuses_with_nothing_stored,
    dispatch_figures_on_metrics,
    admin_inspect_shows_the_last_error,
);

/// The operation id of a 202, after checking its shape (protocol §9.1).
fn accepted_id(r: &Reply) -> String {
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("retry-after"), Some("1"));
    let v = r.json();
    let id = v["id"].as_str().expect("an id").to_owned();
    assert_eq!(id.len(), 32, "{id}");
    assert!(
        id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "{id}"
    );
    let href = format!("/_idem/operations/{id}");
    assert_eq!(v["href"], href.as_str());
    assert_eq!(r.header("location"), Some(href.as_str()), "Location = href");
    assert!(
        matches!(v["status"].as_str(), Some("pending" | "running")),
        "{v}"
    );
    id
}

async fn post(c: &HttpClient, gw: SocketAddr, path: &str, key: &str, body: &str) -> Reply {
    send(c, gw, "POST", path, &[("idempotency-key", key)], body).await
}

async fn status(c: &HttpClient, gw: SocketAddr, id: &str, query: &str) -> Reply {
    send(
        c,
        gw,
        "GET",
        &format!("/_idem/operations/{id}{query}"),
        &[],
        "",
    )
    .await
}

/// Long-polls until the operation is done (the 202s of a long retry
/// schedule are polled again).
async fn final_answer(c: &HttpClient, gw: SocketAddr, id: &str) -> Reply {
    for _ in 0..20 {
        let r = status(c, gw, id, "?wait=5s").await;
        if r.status != 202 {
            return r;
        }
    }
    panic!("operation {id} not done after 100 s");
}

// ---------------------------------------------------------------------------
// The flows, each run on every store by `on_every_store!`.

async fn accept_repeat_long_poll_and_replay(store: &str) {
    let up = Script::start().await;
    let gw = start(store, &up, "").await;
    let (c, a) = (client(), gw.local_addr());
    let key = unique("flow");

    let first = post(&c, a, "/jobs/1?hold=1", &key, "{\"n\":1}").await;
    let id = accepted_id(&first);
    let request_id = first.header("x-request-id").expect("an id").to_owned();
    up.called(&key, 1).await;

    // Running: the repeat gets the same 202 with the same id.
    let again = post(&c, a, "/jobs/1?hold=1", &key, "{\"n\":1}").await;
    assert_eq!(accepted_id(&again), id);
    assert_eq!(again.json()["status"], "running");
    let s = status(&c, a, &id, "").await;
    assert_eq!(s.status, 202);
    assert!(s.header("retry-after").is_some());
    let v = s.json();
    assert_eq!(
        (v["id"].as_str(), v["status"].as_str()),
        (Some(id.as_str()), Some("running"))
    );
    assert_eq!(v["attempts"], 1);

    // Another body under the key: 422, however far the operation is.
    post(&c, a, "/jobs/1?hold=1", &key, "{\"n\":2}")
        .await
        .assert_problem(422, "idempotency_key_reused");

    // A long-poll returns as soon as the answer is stored.
    let waiting = {
        let (c, id) = (c.clone(), id.clone());
        tokio::spawn(async move { status(&c, a, &id, "?wait=10s").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    up.open();
    let done = waiting.await.expect("the long-poll");
    assert_eq!(done.status, 201, "{:?}", done.body);
    assert_eq!(done.header("idempotent-replayed"), Some("true"));
    assert_eq!(done.header("x-call"), Some("1"));

    // Done: the POST replays the stored answer, byte for byte.
    let replay = post(&c, a, "/jobs/1?hold=1", &key, "{\"n\":1}").await;
    assert_eq!(replay.status, 201);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.body, done.body);
    post(&c, a, "/jobs/1?hold=1", &key, "{\"n\":2}")
        .await
        .assert_problem(422, "idempotency_key_reused");

    // One upstream call, with the key, the accepting request's id, the body.
    let seen = up.seen(&key);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].key, key);
    assert_eq!(seen[0].request_id, request_id);
    assert_eq!(seen[0].body, "{\"n\":1}");
    gw.shutdown().await.expect("shutdown");
}

async fn a_hundred_concurrent_posts_make_one_operation(store: &str) {
    const N: usize = 100;
    let up = Script::start().await;
    let gw = start(store, &up, "").await;
    let a = gw.local_addr();
    let key = unique("herd");
    let barrier = Arc::new(Barrier::new(N));
    let mut tasks = Vec::with_capacity(N);
    for _ in 0..N {
        let (barrier, key) = (Arc::clone(&barrier), key.clone());
        tasks.push(tokio::spawn(async move {
            let c = client();
            barrier.wait().await;
            post(&c, a, "/jobs/herd?hold=1", &key, "same").await
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        ids.insert(accepted_id(&t.await.expect("task")));
    }
    assert_eq!(
        ids.len(),
        1,
        "N concurrent identical POSTs must make ONE operation"
    );
    up.open();
    let id = ids.into_iter().next().expect("one id");
    assert_eq!(final_answer(&client(), a, &id).await.status, 201);
    assert_eq!(up.count(&key), 1, "one operation, one upstream call");
}

async fn failed_attempts_are_retried_until_a_stored_status(store: &str) {
    let up = Script::start().await;
    let gw = start(store, &up, "").await;
    let (c, a) = (client(), gw.local_addr());
    let key = unique("retry");
    let id = accepted_id(&post(&c, a, "/jobs/r?plan=500,500,201", &key, "").await);
    let done = final_answer(&c, a, &id).await;
    assert_eq!(done.status, 201, "{:?}", done.body);
    assert_eq!(done.header("x-call"), Some("3"));
    assert_eq!(up.count(&key), 3, "500, 500, then 201");
    let seen = up.seen(&key);
    assert!(seen.iter().all(|s| s.request_id == seen[0].request_id));
}

async fn the_last_failed_attempt_stores_a_502(store: &str) {
    let up = Script::start().await;
    let gw = start(store, &up, "").await;
    let (c, a) = (client(), gw.local_addr());
    let key = unique("fail");
    let id = accepted_id(&post(&c, a, "/jobs/f?plan=500", &key, "").await);
    let done = final_answer(&c, a, &id).await;
    done.assert_problem(502, "upstream_unavailable");
    assert_eq!(done.header("idempotent-replayed"), Some("true"));
    let detail = done.json()["detail"].as_str().unwrap_or("").to_owned();
    assert!(detail.contains("3 attempts"), "{detail}");
    assert_eq!(
        up.count(&key),
        3,
        "max_attempts = 3 calls, the first included"
    );
    // A final failure is replayed like any stored answer.
    let again = post(&c, a, "/jobs/f?plan=500", &key, "").await;
    again.assert_problem(502, "upstream_unavailable");
    assert_eq!(again.body, done.body);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(up.count(&key), 3, "no call after the last attempt");
}

async fn derived_keys_and_answers_too_large_to_store(store: &str) {
    let up = Script::start().await;
    let routes = "
[[route]]
match = \"POST /derived/*\"
mode = \"async\"
key = \"derived\"

[[route]]
match = \"POST /big/*\"
mode = \"async\"
max_response_body = 10
max_attempts = 2
retry_backoff = \"10ms\"
";
    let gw = start(store, &up, routes).await;
    let (c, a) = (client(), gw.local_addr());

    // No key: the fingerprint is the key, in the asker's derived scope.
    let who = [("authorization", "Bearer d")];
    let id = accepted_id(&send(&c, a, "POST", "/derived/1", &who, "same").await);
    let again = send(&c, a, "POST", "/derived/1", &who, "same").await;
    assert!(
        again.status == 202 || again.status == 201,
        "{}",
        again.status
    );
    let path = format!("/_idem/operations/{id}?wait=5s");
    let done = send(&c, a, "GET", &path, &who, "").await;
    assert_eq!(done.status, 201, "{:?}", done.body);
    send(&c, a, "GET", &path, &[("authorization", "Bearer e")], "")
        .await
        .assert_problem(404, "operation_not_found");
    assert_eq!(up.count(""), 1);

    // An answer larger than max_response_body cannot be the final answer.
    let key = unique("big");
    let id = accepted_id(&post(&c, a, "/big/1", &key, "").await);
    let done = final_answer(&c, a, &id).await;
    done.assert_problem(502, "upstream_unavailable");
    assert_eq!(up.count(&key), 2, "max_attempts = 2");
}

async fn unknown_malformed_and_foreign_ids_get_the_same_404(store: &str) {
    let up = Script::start().await;
    let gw = start(store, &up, "").await;
    let (c, a) = (client(), gw.local_addr());
    let key = unique("scope");
    let alice = [
        ("idempotency-key", key.as_str()),
        ("authorization", "Bearer alice"),
    ];
    let r = send(&c, a, "POST", "/jobs/s?hold=1", &alice, "").await;
    let id = accepted_id(&r);
    let path = format!("/_idem/operations/{id}");

    let owner = send(
        &c,
        a,
        "GET",
        &path,
        &[("authorization", "Bearer alice")],
        "",
    )
    .await;
    assert_eq!(owner.status, 202, "the scope that accepted it sees it");
    let unknown = format!("/_idem/operations/{:032x}", rand::random::<u128>());
    let mut bodies = Vec::new();
    for (path, who) in [
        (path.as_str(), "Bearer mallory"),
        (path.as_str(), ""),
        (unknown.as_str(), "Bearer alice"),
        ("/_idem/operations/not-an-id", "Bearer alice"),
        (
            &path
                .to_uppercase()
                .replace("/_IDEM/OPERATIONS/", "/_idem/operations/"),
            "Bearer alice",
        ),
        (&format!("{path}0"), "Bearer alice"),
    ] {
        let headers: &[(&str, &str)] = if who.is_empty() {
            &[]
        } else {
            &[("authorization", who)]
        };
        let r = send(&c, a, "GET", path, headers, "").await;
        r.assert_problem(404, "operation_not_found");
        bodies.push(r.body);
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "no oracle: one answer for all"
    );
    up.open();
}

#[tokio::test]
async fn nothing_under_idem_reaches_the_upstream() {
    let up = Script::start().await;
    // Also with no async route at all: the paths still belong to the gateway.
    for extra in [
        "",
        "[defaults]\nmethods = [\"POST\", \"GET\", \"DELETE\", \"PUT\"]\nkey = \"optional\"",
    ] {
        let gw = gateway_with_env(&up.url(), extra, &env).await;
        let (c, a) = (client(), gw.local_addr());
        for method in ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"] {
            for path in [
                "/_idem",
                "/_idem/",
                "/_idem/anything",
                "/_idem/operations",
                "/_idem/operations/",
                "/_IDEM/operations/x",
                "//_idem/x",
                "/a/../_idem/x",
                "/%5fidem/x",
                "/%5Fidem/a%2Fb",
            ] {
                let r = send(&c, a, method, path, &[("idempotency-key", "k")], "x").await;
                assert_eq!(r.status, 404, "{method} {path}");
            }
        }
        assert_eq!(up.total(), 0, "nothing under /_idem/ is forwarded");
    }
}

async fn max_pending_refuses_with_nothing_stored(store: &str) {
    let up = Script::start().await;
    // The upstream holds every call: the operations stay running.
    let gw = start(store, &up, "[limits]\nmax_pending = 2").await;
    let (c, a) = (client(), gw.local_addr());
    let admin = gw.admin_addr().expect("admin");
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("authorization", bearer.as_str())];
    let keys: Vec<String> = (0..3).map(|i| unique(&format!("full{i}"))).collect();
    accepted_id(&post(&c, a, "/jobs/p?hold=1", &keys[0], "").await);
    let id = accepted_id(&post(&c, a, "/jobs/p?hold=1", &keys[1], "").await);
    let full = post(&c, a, "/jobs/p?hold=1", &keys[2], "").await;
    full.assert_problem(503, "idempotency_queue_full");
    assert!(full.header("retry-after").is_some());
    // A repeat of an accepted one is still answered.
    assert_eq!(
        accepted_id(&post(&c, a, "/jobs/p?hold=1", &keys[1], "").await),
        id
    );

    // The default scope headers, none of them sent.
    let names = idem::RoutePolicy::default().scope_headers;
    let scope = idem::Scope::from_headers(&http::HeaderMap::new(), &names);
    let stored = idem::StoreKey::new(&scope, &keys[2]);
    let rec = send(
        &c,
        admin,
        "GET",
        &format!("/records/{}", stored.as_str()),
        &auth,
        "",
    )
    .await;
    assert_eq!(
        rec.status, 404,
        "a refused operation leaves nothing in the store"
    );
    let held = idem::StoreKey::new(&scope, &keys[1]);
    let rec = send(
        &c,
        admin,
        "GET",
        &format!("/records/{}", held.as_str()),
        &auth,
        "",
    )
    .await;
    assert_eq!(rec.json()["state"], "in_flight");

    up.called(&keys[0], 1).await;
    up.called(&keys[1], 1).await;
    let s = status(&c, a, &id, "").await;
    assert_eq!(s.status, 202);
    assert_eq!(
        (s.json()["status"].as_str(), s.json()["attempts"].as_u64()),
        (Some("running"), Some(1))
    );
    let op = send(&c, admin, "GET", &format!("/operations/{id}"), &auth, "").await;
    assert_eq!(op.status, 200, "{:?}", op.body);
    assert_eq!(op.json()["state"], "running");
    assert_eq!(op.json()["key"], held.as_str());
    assert_eq!(up.count(&keys[2]), 0);

    let metrics = send(&c, admin, "GET", "/metrics", &auth, "").await;
    let text = String::from_utf8_lossy(&metrics.body);
    for line in [
        "idem_async_pending 2",
        "idem_async_workers 64",
        "idem_async_max_pending 2",
        "idem_async_accepts_total{result=\"full\"} 1",
        "idem_async_accepts_total{result=\"accepted\"} 2",
        "idem_async_in_flight 2",
    ] {
        assert!(text.contains(line), "/metrics lacks `{line}`:\n{text}");
    }

    // Done, the room is back. On Redis the slot is given back by a step
    // of its own just after the answer is stored (the queue entry leaves
    // after the record completes), so a POST at that very moment may still
    // be told 503: give it a moment.
    up.open();
    final_answer(&c, a, &id).await;
    let mut again = post(&c, a, "/jobs/p?hold=1", &keys[2], "").await;
    for _ in 0..100 {
        if again.status != 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        again = post(&c, a, "/jobs/p?hold=1", &keys[2], "").await;
    }
    let id2 = accepted_id(&again);
    assert_eq!(final_answer(&c, a, &id2).await.status, 201);
}

async fn dispatch_figures_on_metrics(store: &str) {
    let up = Script::start().await;
    let gw = start(store, &up, "").await;
    let (c, a) = (client(), gw.local_addr());
    let admin = gw.admin_addr().expect("admin");
    let key = unique("metrics");
    let id = accepted_id(&post(&c, a, "/jobs/m?plan=503,200", &key, "").await);
    assert_eq!(final_answer(&c, a, &id).await.status, 200);
    let bearer = format!("Bearer {TOKEN}");
    let lines = [
        "idem_async_attempts_total 2",
        "idem_async_retries_total 1",
        "idem_async_completed_total 1",
        "idem_async_final_failures_total 0",
        "idem_async_dispatch_latency_seconds_count 2",
        "idem_async_pending 0",
        "idem_requests_total{outcome=\"cancelled\"}",
        "idem_watchers ",
    ];
    // The answer is readable as soon as the store has it; the dispatcher
    // counts it just after (and on Redis the queue entry leaves a step
    // later): give the figures a moment to settle.
    let mut text = String::new();
    for _ in 0..100 {
        let r = send(
            &c,
            admin,
            "GET",
            "/metrics",
            &[("authorization", bearer.as_str())],
            "",
        )
        .await;
        text = String::from_utf8_lossy(&r.body).into_owned();
        if lines.iter().all(|l| text.contains(l)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for line in lines {
        assert!(text.contains(line), "/metrics lacks `{line}`:\n{text}");
    }
    let op = send(
        &c,
        admin,
        "GET",
        &format!("/operations/{id}"),
        &[("authorization", bearer.as_str())],
        "",
    )
    .await;
    assert_eq!(op.json()["state"], "done");
    assert_eq!(op.json()["status"], 200);
}

// ---------------------------------------------------------------------------
// PostgreSQL and Redis: an accept-only instance with a worker.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_end_to_end_with_accept_only_and_worker_instances() {
    if let Some(store) = Isolated::new(Kind::Postgres).await {
        shared_store_end_to_end(store.store()).await;
        store.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_end_to_end_with_accept_only_and_worker_instances() {
    if let Some(store) = Isolated::new(Kind::Redis).await {
        shared_store_end_to_end(store.store()).await;
        store.finish().await;
    }
}

/// Two instances on one store of the test's own (`store`, a `store = "…"`
/// line): no other gateway dispatches from it meanwhile.
async fn shared_store_end_to_end(store: &str) {
    let up = Script::start().await;
    let web = start(store, &up, "[limits]\nasync_workers = 0").await;
    let (c, a) = (client(), web.local_addr());
    let key = unique("tiers");
    let id = accepted_id(&post(&c, a, "/jobs/pg?plan=500,201", &key, "pg").await);
    assert_eq!(
        accepted_id(&post(&c, a, "/jobs/pg?plan=500,201", &key, "pg").await),
        id
    );
    post(&c, a, "/jobs/pg?plan=500,201", &key, "other")
        .await
        .assert_problem(422, "idempotency_key_reused");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        up.count(&key),
        0,
        "an accept-only instance dispatches nothing"
    );
    let s = status(&c, a, &id, "").await;
    assert_eq!(
        (s.status, s.json()["status"].as_str()),
        (202, Some("pending"))
    );

    // A worker instance on the same store runs it; the web tier answers.
    let worker = start(store, &up, "").await;
    let done = final_answer(&c, a, &id).await;
    assert_eq!(done.status, 201, "{:?}", done.body);
    assert_eq!(done.header("idempotent-replayed"), Some("true"));
    assert_eq!(up.count(&key), 2, "500, then 201");
    let w = worker.local_addr();
    let replay = post(&c, w, "/jobs/pg?plan=500,201", &key, "pg").await;
    assert_eq!(
        (replay.status, replay.body.clone()),
        (201, done.body.clone())
    );
    status(&c, a, &format!("{:032x}", rand::random::<u128>()), "")
        .await
        .assert_problem(404, "operation_not_found");

    // Concurrent identical POSTs over both instances: one operation.
    const N: usize = 50;
    let key = unique("shared-herd");
    let barrier = Arc::new(Barrier::new(N));
    let mut tasks = Vec::with_capacity(N);
    for i in 0..N {
        let (barrier, key) = (Arc::clone(&barrier), key.clone());
        let to = if i % 2 == 0 { a } else { w };
        tasks.push(tokio::spawn(async move {
            let c = client();
            barrier.wait().await;
            post(&c, to, "/jobs/herd?hold=1", &key, "same").await
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        ids.insert(accepted_id(&t.await.expect("task")));
    }
    assert_eq!(ids.len(), 1);
    up.open();
    let id = ids.into_iter().next().expect("one id");
    assert_eq!(final_answer(&c, w, &id).await.status, 201);
    assert_eq!(up.count(&key), 1);

    // Always 500: max_attempts calls, then the stored 502.
    let key = unique("shared-fail");
    let id = accepted_id(&post(&c, a, "/jobs/f?plan=500", &key, "").await);
    final_answer(&c, a, &id)
        .await
        .assert_problem(502, "upstream_unavailable");
    assert_eq!(up.count(&key), 3);
    worker.shutdown().await.expect("shutdown");
    web.shutdown().await.expect("shutdown");
}

async fn admin_inspect_shows_the_last_error(store: &str) {
    let up = Script::start().await;
    let slow = "
[[route]]
match = \"POST /slow/*\"
mode = \"async\"
retry_backoff = \"60s\"
max_attempts = 2
";
    let gw = start(store, &up, slow).await;
    let (c, a) = (client(), gw.local_addr());
    let admin = gw.admin_addr().expect("admin");
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("authorization", bearer.as_str())];
    let key = unique("last-error");
    let id = accepted_id(&post(&c, a, "/slow/1?plan=503,201", &key, "").await);
    up.called(&key, 1).await;
    // The attempt failed; its retry is a minute away: pending, with why.
    let mut seen = serde_json::Value::Null;
    for _ in 0..500 {
        let op = send(&c, admin, "GET", &format!("/operations/{id}"), &auth, "").await;
        assert_eq!(op.status, 200, "{:?}", op.body);
        seen = op.json();
        if seen["state"] == "pending" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen["state"], "pending", "{seen}");
    assert_eq!(seen["attempts"], 1, "{seen}");
    assert_eq!(seen["last_error"], "attempt 1: HTTP 503", "{seen}");
    // Not for the client: its status view stays as §9.3 says.
    let s = status(&c, a, &id, "").await;
    assert!(s.json().get("last_error").is_none(), "{:?}", s.body);
    gw.shutdown().await.expect("shutdown");
}
