//! The example end to end, through the whole router: POST → 202 +
//! Location, long-poll → the final answer, repeats → the same operation,
//! and 20 concurrent identical POSTs → one execution of the handler.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use tokio::sync::Barrier;
use tower::ServiceExt;

struct Answer {
    status: StatusCode,
    location: Option<String>,
    replayed: bool,
    body: String,
}

fn header(headers: &axum::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn send(app: &Router, req: Request<Body>) -> Answer {
    let res = app.clone().oneshot(req).await.expect("the router answers");
    let status = res.status();
    let location = header(res.headers(), "location");
    let replayed = header(res.headers(), "idempotent-replayed").as_deref() == Some("true");
    let body = res.into_body().collect().await.expect("body").to_bytes();
    Answer {
        status,
        location,
        replayed,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn post(key: &str) -> Request<Body> {
    Request::post("/reports")
        .header("idempotency-key", key)
        .body(Body::from("monthly"))
        .expect("request")
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_then_long_polled_then_replayed() {
    let app = async_layer::app();
    let accepted = send(&app.router, post("r-1")).await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{}", accepted.body);
    let location = accepted.location.expect("a Location");
    assert!(location.starts_with("/_idem/operations/"), "{location}");
    let json: serde_json::Value = serde_json::from_str(&accepted.body).expect("JSON");
    assert_eq!(json["href"], location.as_str());

    // A repeat while it runs: the same operation.
    let again = send(&app.router, post("r-1")).await;
    assert_eq!(
        (again.status, again.location.as_deref()),
        (StatusCode::ACCEPTED, Some(location.as_str()))
    );

    // The long-poll returns the final answer as soon as it is stored.
    let done = send(&app.router, get(&format!("{location}?wait=10s"))).await;
    assert_eq!(done.status, StatusCode::CREATED, "{}", done.body);
    assert!(done.replayed);
    assert_eq!(done.body, "report #1 for \"monthly\"\n");

    // Done: the POST replays it; the handler ran once.
    let replay = send(&app.router, post("r-1")).await;
    assert_eq!(
        (replay.status, replay.replayed),
        (StatusCode::CREATED, true)
    );
    assert_eq!(replay.body, done.body);
    assert_eq!(app.executions.load(Ordering::SeqCst), 1);
    let count = send(&app.router, get("/count")).await;
    assert_eq!(count.body, "{\"count\":1}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_identical_posts_run_the_handler_once() {
    const N: usize = 20;
    let app = async_layer::app();
    let router = app.router.clone();
    let barrier = Arc::new(Barrier::new(N));
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let (router, barrier) = (router.clone(), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                send(&router, post("r-herd")).await
            })
        })
        .collect();
    let mut locations = std::collections::HashSet::new();
    for t in tasks {
        let a = t.await.expect("task");
        // 202 while pending or running; the replay if it is done already.
        match a.status {
            StatusCode::ACCEPTED => {
                locations.insert(a.location.expect("a Location"));
            }
            StatusCode::CREATED => assert!(a.replayed),
            other => panic!("unexpected {other}: {}", a.body),
        }
    }
    assert_eq!(locations.len(), 1, "one operation: {locations:?}");
    let location = locations.into_iter().next().expect("one");
    let done = send(&router, get(&format!("{location}?wait=10s"))).await;
    assert_eq!(done.status, StatusCode::CREATED, "{}", done.body);
    // Give a second (wrong) execution the time to show up.
    tokio::time::sleep(async_layer::WORK_TIME * 2).await;
    assert_eq!(app.executions.load(Ordering::SeqCst), 1, "one execution");
}
