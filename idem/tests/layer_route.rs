//! The tower layer against the attacks of issue 10, items 9, 10 and 13, in
//! axum: odd spellings of a protected path or method, tenants told apart by
//! cookies, client keys that spell a derived key, and answers too large to
//! keep.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{Request, StatusCode, Uri};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use idem::layer::{Idempotency, IdempotencyLayer};
use idem::policy::{KeyPolicy, Route};
use idem::store::memory::MemoryStore;
use idem::{Engine, RoutePolicy, RouteTable};
use tower::{Layer, ServiceExt};

type App = Idempotency<Router, MemoryStore>;

/// `POST /payments/*` requires a key; everything else is optional. The
/// layer wraps the whole router, so axum routes the path the layer saw.
fn payments(count: &Arc<AtomicUsize>) -> App {
    let mut optional = RoutePolicy::default();
    optional.key = KeyPolicy::Optional;
    let table = RouteTable::new(optional).route(
        Route::parse_match("POST /payments/*", Arc::new(RoutePolicy::default())).expect("valid"),
    );
    let count = Arc::clone(count);
    let echo = move |uri: Uri| {
        let count = Arc::clone(&count);
        async move {
            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
            (StatusCode::CREATED, format!("{n} {uri}"))
        }
    };
    let router = Router::new()
        .route("/payments/{id}", post(echo.clone()))
        .route("/files/{*rest}", get(echo.clone()))
        .fallback(echo);
    IdempotencyLayer::new(Engine::new(MemoryStore::new()), table).layer(router)
}

fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(uri);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(Body::from("{}")).expect("request")
}

async fn call(app: &App, req: Request<Body>) -> (StatusCode, http::HeaderMap, Bytes) {
    let res = app.clone().oneshot(req).await.expect("infallible");
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    (parts.status, parts.headers, bytes)
}

fn code(body: &Bytes) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).expect("problem json");
    v["code"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn every_spelling_of_a_protected_path_is_protected() {
    let count = Arc::new(AtomicUsize::new(0));
    let app = payments(&count);
    for path in [
        "/payments/1",
        "//payments/1",
        "/payments//1",
        "/payments/1/",
        "/payments/./1",
        "/x/../payments/1",
        "/%70ayments/1",
        "/Payments/1",
        "/PAYMENTS/1?x=1",
    ] {
        let (status, _, body) = call(&app, request("POST", path, &[])).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(code(&body), "idempotency_key_missing", "{path}");
    }
    let (status, _, body) = call(&app, request("post", "/payments/1", &[])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a lower-case method");
    assert_eq!(code(&body), "idempotency_key_missing");
    assert_eq!(count.load(Ordering::SeqCst), 0, "a spelling got through");
}

#[tokio::test]
async fn the_inner_service_sees_the_path_that_was_matched_and_fingerprinted() {
    let count = Arc::new(AtomicUsize::new(0));
    let app = payments(&count);
    let key = [("idempotency-key", "k-1")];
    let (status, _, first) = call(&app, request("POST", "//payments/./1/?b=2&a=1", &key)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        first, "1 /payments/1?b=2&a=1",
        "path normalized, query kept"
    );
    let (_, headers, again) = call(&app, request("POST", "/payments/%31?b=2&a=1", &key)).await;
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(again, first);
    // The fingerprint keeps the case sent: another case is another request.
    let (status, _, body) = call(&app, request("POST", "/Payments/1?b=2&a=1", &key)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(code(&body), "idempotency_key_reused");
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_ambiguous_path_is_refused_when_its_method_may_take_part() {
    let count = Arc::new(AtomicUsize::new(0));
    let app = payments(&count);
    let key = [("idempotency-key", "k-2")];
    for path in [
        "/payments%2F1",
        "/payments%5c1",
        "/payments/1%00",
        "/payments/%zz",
    ] {
        let (status, _, body) = call(&app, request("POST", path, &key)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(code(&body), "request_path_invalid", "{path}");
    }
    assert_eq!(count.load(Ordering::SeqCst), 0);
    // GET takes part nowhere: its path is not the layer's business, and it
    // reaches the inner service as sent.
    let (status, _, body) = call(&app, request("GET", "/files/a%2Fb", &[])).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body, "1 /files/a%2Fb");
    let (_, _, body) = call(&app, request("GET", "/files/./a/", &[])).await;
    assert_eq!(body, "2 /files/./a/");
}

#[tokio::test]
async fn cookie_tenants_and_derived_keys_do_not_meet() {
    let count = Arc::new(AtomicUsize::new(0));
    let app = payments(&count);
    let alice = [("idempotency-key", "k-3"), ("cookie", "session=alice")];
    let bob = [("idempotency-key", "k-3"), ("cookie", "session=bob")];
    let (_, _, a) = call(&app, request("POST", "/payments/1", &alice)).await;
    let (_, headers, b) = call(&app, request("POST", "/payments/1", &bob)).await;
    assert!(
        !headers.contains_key("idempotent-replayed"),
        "Bob got Alice's answer"
    );
    assert_ne!(a, b);
    assert_eq!(count.load(Ordering::SeqCst), 2);

    let mut derived = RoutePolicy::default();
    derived.key = KeyPolicy::Derived;
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&runs);
    let router = Router::new().fallback(move || {
        let counted = Arc::clone(&counted);
        async move { format!("run {}", counted.fetch_add(1, Ordering::SeqCst) + 1) }
    });
    let app = IdempotencyLayer::new(Engine::new(MemoryStore::new()), RouteTable::new(derived))
        .layer(router);
    call(&app, request("POST", "/orders", &[])).await;
    let (_, headers, _) = call(&app, request("POST", "/orders", &[])).await;
    assert_eq!(headers["idempotent-replayed"], "true", "a double submit");
    let fp = idem::fingerprint::fingerprint(
        &http::Method::POST,
        &Uri::from_static("/orders"),
        &http::HeaderMap::new(),
        b"{}",
        &idem::fingerprint::FingerprintOptions {
            headers: &[http::header::CONTENT_TYPE],
            ..Default::default()
        },
    );
    for forged in [fp.to_hex(), format!("derived:{}", fp.to_hex())] {
        let req = request("POST", "/orders", &[("idempotency-key", &forged)]);
        let (_, headers, _) = call(&app, req).await;
        assert!(
            !headers.contains_key("idempotent-replayed"),
            "the client key {forged} read a derived record"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

/// `n` chunks of 64 KiB of `y`, of unknown length.
struct Chunks(usize);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.0 == 0 {
            return Poll::Ready(None);
        }
        self.0 -= 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'y'; 64 * 1024])))))
    }
}

/// Answers of 3 MiB (`/sized` with a known length, `/chunked` without),
/// with `max_response_body` = `limit`.
fn big(limit: u64, runs: &Arc<AtomicUsize>) -> (App, Engine<MemoryStore>) {
    let mut policy = RoutePolicy::default();
    policy.max_response_body = limit;
    let runs = Arc::clone(runs);
    let router = Router::new().fallback(move |uri: Uri| {
        let runs = Arc::clone(&runs);
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            if uri.path() == "/chunked" {
                Body::new(Chunks(48))
            } else {
                Body::from(vec![b'y'; 3 * 1024 * 1024])
            }
        }
    });
    let engine = Engine::new(MemoryStore::new());
    let app = IdempotencyLayer::new(engine.clone(), RouteTable::new(policy)).layer(router);
    (app, engine)
}

#[tokio::test]
async fn an_answer_over_max_response_body_is_streamed_and_not_stored() {
    let runs = Arc::new(AtomicUsize::new(0));
    let (app, engine) = big(1024 * 1024, &runs);
    for (n, path) in [(1, "/sized"), (2, "/chunked")] {
        let key = [("idempotency-key", path)];
        for attempt in 1..=2 {
            let res = app
                .clone()
                .oneshot(request("POST", path, &key))
                .await
                .expect("infallible");
            assert_eq!(res.status(), StatusCode::OK);
            assert!(!res.headers().contains_key("idempotent-replayed"));
            let body = res.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(body.len(), 3 * 1024 * 1024, "{path}: the whole answer");
            assert!(body.iter().all(|b| *b == b'y'));
            assert_eq!(
                runs.load(Ordering::SeqCst),
                2 * (n - 1) + attempt,
                "{path}: not stored, the key released, so a retry executes"
            );
        }
    }
    let counted = engine.metrics().response_too_large.load(Ordering::Relaxed);
    assert_eq!(counted, 4, "each answer too large to store is counted");
}

#[tokio::test]
async fn an_answer_within_max_response_body_is_stored() {
    let runs = Arc::new(AtomicUsize::new(0));
    let (app, engine) = big(3 * 1024 * 1024, &runs);
    for path in ["/sized", "/chunked"] {
        let key = [("idempotency-key", path)];
        let (_, _, first) = call(&app, request("POST", path, &key)).await;
        let (_, headers, again) = call(&app, request("POST", path, &key)).await;
        assert_eq!(headers["idempotent-replayed"], "true", "{path}");
        assert_eq!(again, first);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(
        engine.metrics().response_too_large.load(Ordering::Relaxed),
        0
    );
}
