//! The tower layer in axum (ServiceExt::oneshot) and in plain hyper.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use idem::layer::IdempotencyLayer;
use idem::store::memory::MemoryStore;
use idem::{Engine, RouteTable};
use tower::ServiceExt;

fn app(count: Arc<AtomicUsize>) -> Router {
    Router::new()
        .route(
            "/orders",
            post(move |body: String| {
                let count = Arc::clone(&count);
                async move {
                    let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                    (StatusCode::CREATED, format!("order {n} for {body}"))
                }
            }),
        )
        .layer(IdempotencyLayer::new(
            Engine::new(MemoryStore::new()),
            RouteTable::default(),
        ))
}

fn post_req(key: Option<&str>, body: &'static str) -> Request<Body> {
    let mut b = Request::post("/orders");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Body::from(body)).expect("request")
}

async fn body(res: axum::response::Response) -> Bytes {
    res.into_body().collect().await.expect("body").to_bytes()
}

#[tokio::test]
async fn axum_replays_and_refuses() {
    let count = Arc::new(AtomicUsize::new(0));
    let app = app(Arc::clone(&count));
    let first = app
        .clone()
        .oneshot(post_req(Some("k"), "tea"))
        .await
        .expect("res");
    assert_eq!(first.status(), StatusCode::CREATED);
    let first = body(first).await;
    let again = app
        .clone()
        .oneshot(post_req(Some("k"), "tea"))
        .await
        .expect("res");
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(body(again).await, first);
    let reused = app
        .clone()
        .oneshot(post_req(Some("k"), "coffee"))
        .await
        .expect("res");
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let missing = app
        .clone()
        .oneshot(post_req(None, "tea"))
        .await
        .expect("res");
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        missing.headers()["content-type"],
        "application/problem+json"
    );
    let get = app
        .oneshot(Request::get("/orders").body(Body::empty()).expect("req"))
        .await
        .expect("res");
    assert_eq!(
        get.status(),
        StatusCode::METHOD_NOT_ALLOWED,
        "GET passes through to axum"
    );
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn plain_hyper_server() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::service::TowerToHyperService;
    use tower::Layer;

    let count = Arc::new(AtomicUsize::new(0));
    let inner = {
        let count = Arc::clone(&count);
        tower::service_fn(move |_req: Request<Full<Bytes>>| {
            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(format!(
                    "n={n}"
                )))))
            }
        })
    };
    let svc =
        IdempotencyLayer::new(Engine::new(MemoryStore::new()), RouteTable::default()).layer(inner);
    // hyper hands `Incoming` bodies; buffer them into `Full` first.
    let svc = tower::ServiceBuilder::new()
        .map_request(|req: Request<hyper::body::Incoming>| req)
        .service(tower::service_fn(
            move |req: Request<hyper::body::Incoming>| {
                let svc = svc.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let bytes = body
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    svc.oneshot(Request::from_parts(parts, Full::new(bytes)))
                        .await
                }
            },
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let req = Request::post(format!("http://{addr}/x"))
            .header("idempotency-key", "h1")
            .body(Full::new(Bytes::from_static(b"data")))
            .expect("req");
        let res = client.request(req).await.expect("res");
        bodies.push(res.into_body().collect().await.expect("body").to_bytes());
    }
    assert_eq!(bodies[0], bodies[1]);
    assert_eq!(count.load(Ordering::SeqCst), 1);
}
