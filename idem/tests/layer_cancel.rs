//! The layer is cancel-safe, and an ambiguous end of an execution never
//! frees the key (issue 10, item 1; protocol §3.9).
//!
//! - A client that hangs up while its handler runs must not cancel the
//!   execution: the retry with the same key gets 409 (or waits, per route)
//!   and then the replay; the handler runs once. Proved end to end with
//!   `axum::serve` and a raw TCP client that drops its socket.
//! - An inner service `Err`, a response body that breaks while it is read
//!   and a panicking handler are ambiguous (the effect may have happened):
//!   the route's `ambiguous` policy decides, `hold` by default.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Frame;
use idem::layer::IdempotencyLayer;
use idem::policy::{Ambiguous, Concurrent};
use idem::store::memory::MemoryStore;
use idem::{Engine, RoutePolicy, RouteTable};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tower::{Layer, ServiceExt};

/// Long enough for anything this file waits for; never reached when green.
const PATIENCE: Duration = Duration::from_secs(10);

fn routes(edit: impl FnOnce(&mut RoutePolicy)) -> RouteTable {
    let mut policy = RoutePolicy::default();
    edit(&mut policy);
    RouteTable::new(policy)
}

fn layer(routes: RouteTable) -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(Engine::new(MemoryStore::new()), routes)
}

// ---------------------------------------------------------------------------
// A client hanging up (axum::serve, raw TCP)
// ---------------------------------------------------------------------------

/// What the handler tells the test, and the gate that holds it mid-effect.
#[derive(Clone)]
struct Probe {
    executions: Arc<AtomicUsize>,
    started: Arc<Notify>,
    cancelled: Arc<Notify>,
    gate: watch::Receiver<bool>,
}

/// Signals `cancelled` when the handler's future is dropped before its end.
struct OnCancel {
    cancelled: Arc<Notify>,
    finished: AtomicBool,
}

impl Drop for OnCancel {
    fn drop(&mut self) {
        if !self.finished.load(Ordering::SeqCst) {
            self.cancelled.notify_one();
        }
    }
}

/// The handler: commits its effect (counts), then waits at the gate.
async fn charge(probe: Probe) -> (StatusCode, String) {
    let guard = OnCancel {
        cancelled: Arc::clone(&probe.cancelled),
        finished: AtomicBool::new(false),
    };
    let n = probe.executions.fetch_add(1, Ordering::SeqCst) + 1;
    probe.started.notify_one();
    let mut gate = probe.gate.clone();
    // The gate's sender lives as long as the test; an error ends the wait too.
    let _ = gate.wait_for(|open| *open).await;
    guard.finished.store(true, Ordering::SeqCst);
    (StatusCode::CREATED, format!("charge {n}"))
}

struct Server {
    addr: SocketAddr,
    probe: Probe,
    open_gate: watch::Sender<bool>,
}

async fn serve(routes: RouteTable) -> Server {
    let (open_gate, gate) = watch::channel(false);
    let probe = Probe {
        executions: Arc::new(AtomicUsize::new(0)),
        started: Arc::new(Notify::new()),
        cancelled: Arc::new(Notify::new()),
        gate,
    };
    let handler_probe = probe.clone();
    let app = Router::new()
        .route("/charges", post(move || charge(handler_probe.clone())))
        .layer(layer(routes));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    Server {
        addr,
        probe,
        open_gate,
    }
}

/// Opens a connection and sends one POST with `key`; the caller reads or drops it.
async fn send(addr: SocketAddr, key: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let body = "amount=10";
    let head = format!(
        "POST /charges HTTP/1.1\r\nhost: test\r\nidempotency-key: {key}\r\n\
         content-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    stream
}

/// Reads a whole `connection: close` response: status and text.
async fn read(mut stream: TcpStream) -> (u16, String) {
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut raw))
        .await
        .expect("the response came in time")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    (status, text)
}

/// The first request's client hangs up while the handler is mid-effect.
async fn hang_up_mid_handler(server: &Server, key: &str) {
    let first = send(server.addr, key).await;
    tokio::time::timeout(PATIENCE, server.probe.started.notified())
        .await
        .expect("the handler started");
    drop(first);
    // Give hyper the time to see the hang-up (before the fix it dropped the
    // handler here); the fixed layer never cancels it, so this times out.
    let _ = tokio::time::timeout(
        Duration::from_millis(300),
        server.probe.cancelled.notified(),
    )
    .await;
}

/// Retries until the answer is no longer 409 (the first execution finishing).
async fn retry_until_settled(addr: SocketAddr, key: &str) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (status, text) = read(send(addr, key).await).await;
        if status != 409 || tokio::time::Instant::now() > deadline {
            return (status, text);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_client_hanging_up_does_not_cancel_the_execution_reject() {
    let server = serve(routes(|_| {})).await;
    hang_up_mid_handler(&server, "hang-up-1").await;

    // The execution is still running: a retry is a concurrent duplicate.
    let retry = tokio::time::timeout(
        Duration::from_secs(3),
        read(send(server.addr, "hang-up-1").await),
    )
    .await;
    assert_eq!(
        server.probe.executions.load(Ordering::SeqCst),
        1,
        "the retry must not run the handler again"
    );
    let (status, text) = retry.expect("an answer at once");
    assert_eq!(status, 409, "the key is still held while it runs: {text}");
    assert!(text.contains("idempotency_key_in_progress"), "{text}");

    server.open_gate.send_replace(true);
    let (status, text) = retry_until_settled(server.addr, "hang-up-1").await;
    assert_eq!(status, 201, "{text}");
    assert!(
        text.contains("idempotent-replayed: true"),
        "a replay: {text}"
    );
    assert!(text.ends_with("charge 1"), "{text}");
    assert_eq!(server.probe.executions.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_client_hanging_up_does_not_cancel_the_execution_wait() {
    let server = serve(routes(|p| p.concurrent = Concurrent::Wait)).await;
    hang_up_mid_handler(&server, "hang-up-2").await;

    // The retry waits for the first execution and replays its answer.
    let retry = tokio::spawn(read(send(server.addr, "hang-up-2").await));
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.open_gate.send_replace(true);
    let (status, text) = retry.await.expect("retry task");
    assert_eq!(
        server.probe.executions.load(Ordering::SeqCst),
        1,
        "the retry must not run the handler again"
    );
    assert_eq!(status, 201, "{text}");
    assert!(
        text.contains("idempotent-replayed: true"),
        "a replay: {text}"
    );
    assert!(text.ends_with("charge 1"), "{text}");
    assert_eq!(server.probe.executions.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------
// Ambiguous ends: inner `Err`, a broken response body, a panic
// ---------------------------------------------------------------------------

fn post_req(key: &str) -> Request<Full<Bytes>> {
    Request::post("/charges")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(b"amount=10")))
        .expect("request")
}

/// An inner service whose effect happened, then it failed.
#[derive(Clone)]
struct Failing {
    executions: Arc<AtomicUsize>,
}

impl tower::Service<Request<Full<Bytes>>> for Failing {
    type Response = Response<Full<Bytes>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
        let executions = Arc::clone(&self.executions);
        Box::pin(async move {
            executions.fetch_add(1, Ordering::SeqCst);
            Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "the database connection broke after the insert",
            ))
        })
    }
}

fn failing(executions: &Arc<AtomicUsize>) -> Failing {
    Failing {
        executions: Arc::clone(executions),
    }
}

#[tokio::test]
async fn an_inner_error_holds_the_key_by_default() {
    let executions = Arc::new(AtomicUsize::new(0));
    let svc = layer(routes(|_| {})).layer(failing(&executions));
    let first = svc.clone().oneshot(post_req("err-1")).await;
    assert!(first.is_err(), "the inner error reaches the caller");
    let retry = svc.oneshot(post_req("err-1")).await;
    assert_eq!(executions.load(Ordering::SeqCst), 1, "no second execution");
    let retry = retry.expect("a problem");
    assert_eq!(retry.status(), StatusCode::CONFLICT, "held, not released");
    assert!(retry.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn an_inner_error_follows_ambiguous_store_and_release() {
    let executions = Arc::new(AtomicUsize::new(0));
    let svc = layer(routes(|p| p.ambiguous = Ambiguous::Store)).layer(failing(&executions));
    assert!(svc.clone().oneshot(post_req("err-2")).await.is_err());
    let retry = svc.oneshot(post_req("err-2")).await;
    assert_eq!(executions.load(Ordering::SeqCst), 1, "no second execution");
    let retry = retry.expect("the stored problem");
    assert_eq!(retry.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let body = retry.into_body().collect().await.expect("body").to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("upstream_unavailable"),
        "{body:?}"
    );

    // `release` is the one policy under which a retry runs again.
    let executions = Arc::new(AtomicUsize::new(0));
    let svc = layer(routes(|p| p.ambiguous = Ambiguous::Release)).layer(failing(&executions));
    assert!(svc.clone().oneshot(post_req("err-3")).await.is_err());
    assert!(svc.oneshot(post_req("err-3")).await.is_err());
    assert_eq!(executions.load(Ordering::SeqCst), 2);
}

/// A response body that sends one chunk, then breaks.
struct Broken {
    sent: bool,
}

impl hyper::body::Body for Broken {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.sent {
            return Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "the response stream broke",
            ))));
        }
        self.sent = true;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"{\"id\":")))))
    }
}

#[tokio::test]
async fn a_response_body_that_breaks_holds_the_key() {
    let executions = Arc::new(AtomicUsize::new(0));
    let inner = {
        let executions = Arc::clone(&executions);
        tower::service_fn(move |_req: Request<Full<Bytes>>| {
            let executions = Arc::clone(&executions);
            async move {
                executions.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Infallible>(Response::new(Broken { sent: false }))
            }
        })
    };
    let svc = layer(routes(|_| {})).layer(inner);
    let first = svc.clone().oneshot(post_req("body-1")).await.expect("res");
    assert_eq!(
        first.status(),
        StatusCode::BAD_GATEWAY,
        "an unknown outcome"
    );
    let retry = svc.oneshot(post_req("body-1")).await.expect("res");
    assert_eq!(executions.load(Ordering::SeqCst), 1, "no second execution");
    assert_eq!(retry.status(), StatusCode::CONFLICT, "held, not released");
}

#[tokio::test]
async fn a_panicking_handler_holds_the_key() {
    let executions = Arc::new(AtomicUsize::new(0));
    let inner = {
        let executions = Arc::clone(&executions);
        tower::service_fn(move |_req: Request<Full<Bytes>>| {
            let executions = Arc::clone(&executions);
            async move {
                let n = executions.fetch_add(1, Ordering::SeqCst) + 1;
                if n >= 1 {
                    panic!("the handler panicked after its effect");
                }
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            }
        })
    };
    let svc = layer(routes(|_| {})).layer(inner);
    // The panic still reaches the caller, as it would without the layer.
    let first = tokio::spawn(svc.clone().oneshot(post_req("panic-1"))).await;
    assert!(first.is_err_and(|e| e.is_panic()), "the panic propagates");
    // Retries keep getting 409 (a release in the background would let one run).
    for _ in 0..10 {
        let retry = tokio::spawn(svc.clone().oneshot(post_req("panic-1"))).await;
        assert_eq!(executions.load(Ordering::SeqCst), 1, "no second execution");
        let retry = retry.expect("no panic").expect("res");
        assert_eq!(retry.status(), StatusCode::CONFLICT, "held, not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
