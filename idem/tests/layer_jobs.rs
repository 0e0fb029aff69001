//! Protocol §13 in the tower layer and `Engine::once`: a route's
//! `key_header` (validated, scoped and refused exactly as `Idempotency-Key`),
//! and the one `info` line per request and per job, which carries the
//! request id and a short hash of the key, never the key and never
//! `Authorization`.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use bytes::Bytes;
use http::HeaderName;
use http_body_util::BodyExt;
use idem::layer::{Idempotency, IdempotencyLayer};
use idem::policy::Route;
use idem::store::memory::MemoryStore;
use idem::{Engine, Fingerprint, RoutePolicy, RouteTable, Rules, Scope, StoreKey};
use tower::{Layer, ServiceExt};
use tracing::{Instrument, Level};

/// The tests of this binary run one at a time. Log captures install a
/// subscriber for their own thread; tracing caches each call site's
/// interest when the site is first hit, and a site first hit on another
/// test's thread at the wrong moment was cached as "never" for this one
/// (a missing line about 1 run in 60). One test at a time, no such race.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

type App = Idempotency<Router, MemoryStore>;

/// `POST /webhooks/*` takes its key from `webhook-id`; everything else
/// from `Idempotency-Key`. The handler counts its executions.
fn app(count: &Arc<AtomicUsize>) -> App {
    let hooks = RoutePolicy::builder()
        .key_header(HeaderName::from_static("webhook-id"))
        .build();
    let table = RouteTable::new(RoutePolicy::default())
        .route(Route::parse_match("POST /webhooks/*", Arc::new(hooks)).expect("valid"));
    let count = Arc::clone(count);
    let handler = move || {
        let count = Arc::clone(&count);
        async move {
            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
            (StatusCode::CREATED, format!("run {n}"))
        }
    };
    let router = Router::new().fallback(handler);
    IdempotencyLayer::new(Engine::new(MemoryStore::new()), table).layer(router)
}

fn request(uri: &str, headers: &[(&str, &str)], body: &'static str) -> Request<Body> {
    let mut b = Request::builder().method("POST").uri(uri);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(Body::from(body)).expect("request")
}

async fn call(app: &App, req: Request<Body>) -> (StatusCode, http::HeaderMap, Bytes) {
    let res = app.clone().oneshot(req).await.expect("infallible");
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    (parts.status, parts.headers, bytes)
}

fn problem(body: &Bytes) -> (String, String) {
    let v: serde_json::Value = serde_json::from_slice(body).expect("problem json");
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    (s("code"), s("detail"))
}

#[tokio::test]
async fn a_route_s_key_header_is_the_key_in_every_respect() {
    let _serial = SERIAL.lock().await;
    let count = Arc::new(AtomicUsize::new(0));
    let app = app(&count);
    let hook = |id: &'static str, body| request("/webhooks/stripe", &[("webhook-id", id)], body);

    // Replay: one execution, the same answer.
    let first = call(&app, hook("msg_1", "{\"a\":1}")).await;
    let again = call(&app, hook("msg_1", "{\"a\":1}")).await;
    assert_eq!(
        (first.0, &first.2[..]),
        (StatusCode::CREATED, &b"run 1"[..])
    );
    assert_eq!(
        (again.0, &again.2[..]),
        (StatusCode::CREATED, &b"run 1"[..])
    );
    assert_eq!(again.1["idempotent-replayed"], "true");
    assert_eq!(count.load(Ordering::SeqCst), 1);

    // Another body under the same id: 422, naming the header.
    let (status, _, body) = call(&app, hook("msg_1", "{\"a\":2}")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (code, detail) = problem(&body);
    assert_eq!(code, "idempotency_key_reused");
    assert!(detail.contains("webhook-id"), "{detail}");

    // Malformed, too long, a list, twice: 400 invalid, naming the header.
    let long = "k".repeat(256);
    let long: &'static str = Box::leak(long.into_boxed_str());
    for headers in [
        vec![("webhook-id", "a b")],
        vec![("webhook-id", long)],
        vec![("webhook-id", "a,b")],
        vec![("webhook-id", "\"a")],
        vec![("webhook-id", "a"), ("webhook-id", "a")],
    ] {
        let (status, _, body) = call(&app, request("/webhooks/x", &headers, "{}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{headers:?}");
        let (code, detail) = problem(&body);
        assert_eq!(code, "idempotency_key_invalid", "{headers:?}");
        if headers.len() == 2 {
            assert!(
                detail.contains("more than one webhook-id header"),
                "{detail}"
            );
        }
    }

    // Missing (required by default): 400, naming the header. An
    // `Idempotency-Key` is an ordinary header on this route: not the key.
    for headers in [vec![], vec![("idempotency-key", "msg_2")]] {
        let (status, _, body) = call(&app, request("/webhooks/x", &headers, "{}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (code, detail) = problem(&body);
        assert_eq!(code, "idempotency_key_missing");
        assert!(detail.contains("webhook-id"), "{detail}");
    }
    // ... nor is a bad one refused there.
    let (status, _, _) = call(
        &app,
        request(
            "/webhooks/y",
            &[("webhook-id", "msg_3"), ("idempotency-key", "a b")],
            "{}",
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);

    // Scoped like any key: the same id under another Authorization runs.
    let other = request(
        "/webhooks/stripe",
        &[("webhook-id", "msg_1"), ("authorization", "Bearer other")],
        "{\"a\":1}",
    );
    let (status, headers, _) = call(&app, other).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(!headers.contains_key("idempotent-replayed"));

    // Other routes keep `Idempotency-Key`, and ignore `webhook-id`.
    let (status, _, body) = call(&app, request("/orders", &[("webhook-id", "w")], "{}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(problem(&body).1.contains("Idempotency-Key"));
    let (status, _, _) = call(&app, request("/orders", &[("idempotency-key", "o")], "{}")).await;
    assert_eq!(status, StatusCode::CREATED);
}

/// Everything written by the `tracing` subscriber installed by [`capture`].
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("logs").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("logs")).into_owned()
    }
}

/// A subscriber at `level` writing to a buffer, for this thread (the
/// tests run on a current-thread runtime, so does the layer's execution).
fn capture(level: Level) -> (Logs, tracing::subscriber::DefaultGuard) {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    // Other tests in this binary run on other threads with no subscriber;
    // a call site one of them registered first may have cached "never".
    tracing::callsite::rebuild_interest_cache();
    (logs, guard)
}

const SECRET_KEY: &str = "sk_live_SECRETKEY_4f9a1c";
const SECRET_TOKEN: &str = "Bearer tok_SECRETTOKEN_77e2";

#[tokio::test]
async fn one_line_per_request_with_its_id_and_a_hash_never_a_secret() {
    let _serial = SERIAL.lock().await;
    for level in [Level::INFO, Level::DEBUG] {
        let (logs, guard) = capture(level);
        let count = Arc::new(AtomicUsize::new(0));
        let app = app(&count);
        let headers = [
            ("idempotency-key", SECRET_KEY),
            ("authorization", SECRET_TOKEN),
            ("x-request-id", "req-42"),
        ];
        let (status, _, _) = call(&app, request("/orders", &headers, "{}")).await;
        assert_eq!(status, StatusCode::CREATED);
        drop(guard);

        let text = logs.text();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("req-42")).collect();
        let info: Vec<&&str> = lines.iter().filter(|l| l.contains(" INFO ")).collect();
        assert_eq!(
            info.len(),
            1,
            "one info line per request, at {level}:\n{text}"
        );
        // The store key is `hex(scope):key`; its log id is the first 12 hex
        // digits of its BLAKE3 hash.
        let scope = idem::Scope::from_headers(
            &{
                let mut h = http::HeaderMap::new();
                h.insert("authorization", SECRET_TOKEN.parse().expect("value"));
                h
            },
            &RoutePolicy::default().scope_headers,
        );
        let hash = StoreKey::new(&scope, SECRET_KEY).log_id().to_string();
        let line = info[0];
        for needle in [
            "request_id=\"req-42\"",
            "attempt=1",
            "outcome=\"executed\"",
            "status=201",
        ] {
            assert!(line.contains(needle), "`{needle}` missing from {line}");
        }
        assert!(line.contains(&format!("key={hash}")), "{line}");
        for secret in ["SECRETKEY", "SECRETTOKEN", "sk_live", "tok_"] {
            assert!(
                !text.contains(secret),
                "`{secret}` leaked at {level}:\n{text}"
            );
        }
    }
}

#[tokio::test]
async fn a_refused_request_gets_its_line_too() {
    let _serial = SERIAL.lock().await;
    let (logs, guard) = capture(Level::DEBUG);
    let count = Arc::new(AtomicUsize::new(0));
    let app = app(&count);
    let headers = [
        ("webhook-id", "SECRETKEY SECRETKEY"),
        ("authorization", SECRET_TOKEN),
        ("x-request-id", "req-43"),
    ];
    let (status, _, _) = call(&app, request("/webhooks/a", &headers, "{}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    drop(guard);
    let text = logs.text();
    let info: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("req-43") && l.contains(" INFO "))
        .collect();
    assert_eq!(info.len(), 1, "{text}");
    assert!(
        info[0].contains("outcome=\"idempotency_key_invalid\""),
        "{text}"
    );
    assert!(info[0].contains("status=400"), "{text}");
    assert!(!text.contains("SECRET"), "{text}");
}

#[tokio::test]
async fn one_line_per_job_with_a_hash_never_the_key() {
    let _serial = SERIAL.lock().await;
    for level in [Level::INFO, Level::DEBUG] {
        let (logs, guard) = capture(level);
        let engine = Engine::new(MemoryStore::new());
        let key = StoreKey::new(&Scope::named("jobs"), SECRET_KEY);
        let input = Fingerprint::of_bytes(b"charge order 7");
        let run = || async { Ok::<_, std::io::Error>(7_u32) };
        let (first, second) = async {
            let first = engine.once(&key, input, &Rules::wait(), run).await;
            let second = engine.once(&key, input, &Rules::wait(), run).await;
            (first, second)
        }
        .instrument(tracing::info_span!("job", id = "job-7"))
        .await;
        assert!(!first.expect("runs").replayed);
        assert!(second.expect("replays").replayed);
        drop(guard);

        let text = logs.text();
        let hash = key.log_id().to_string();
        let info: Vec<&str> = text.lines().filter(|l| l.contains(" INFO ")).collect();
        assert_eq!(info.len(), 2, "one line per job, at {level}:\n{text}");
        for (line, outcome) in info.iter().zip(["executed", "replayed"]) {
            assert!(line.contains("job-7"), "{line}");
            assert!(line.contains(&format!("key={hash}")), "{line}");
            assert!(line.contains(&format!("outcome=\"{outcome}\"")), "{line}");
        }
        assert!(!text.contains("SECRETKEY"), "{text}");
    }
}
