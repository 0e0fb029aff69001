//! The deliberately naive "create order" service of `idem demo` (and of the
//! race tests): it checks, awaits, then acts, so concurrent duplicates slip
//! through the gap.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A running naive backend. `POST /orders` creates an order unless one
/// exists for the request's `Idempotency-Key`, but checks and inserts in
/// two steps with a delay between them (the classic check-then-act bug);
/// `GET /count` answers `{"count": n}`, the orders created so far.
///
/// Stops accepting when dropped.
#[derive(Debug)]
pub struct NaiveBackend {
    addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

#[derive(Debug)]
struct State {
    /// Order id by idempotency key. A std mutex, never held across an await:
    /// the bug is not in the locking but in the gap between the two locks.
    orders: Mutex<HashMap<String, u64>>,
    created: AtomicU64,
    connections: AtomicU64,
    delay: Duration,
}

impl NaiveBackend {
    /// Starts on 127.0.0.1, port 0; `delay` is the await between the check
    /// and the insert ("charging the card").
    pub async fn start(delay: Duration) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            orders: Mutex::new(HashMap::new()),
            created: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            delay,
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&state)));
        Ok(Self {
            addr,
            state,
            accept,
        })
    }

    /// The bound address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://{addr}/orders`.
    #[must_use]
    pub fn orders_url(&self) -> String {
        format!("http://{}/orders", self.addr)
    }

    /// `http://{addr}/count`.
    #[must_use]
    pub fn count_url(&self) -> String {
        format!("http://{}/count", self.addr)
    }

    /// Orders created so far (executions).
    #[must_use]
    pub fn orders_created(&self) -> u64 {
        self.state.created.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    #[must_use]
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }
}

impl Drop for NaiveBackend {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of descriptors and the like: back off, keep serving.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        state.connections.fetch_add(1, Ordering::SeqCst);
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(Arc::clone(&state), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match (req.method(), req.uri().path()) {
        (&Method::POST, "/orders") => create_order(&state, req).await,
        (&Method::GET, "/count") => json(
            StatusCode::OK,
            &serde_json::json!({ "count": state.created.load(Ordering::SeqCst) }),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({ "error": "POST /orders or GET /count" }),
        ),
    })
}

async fn create_order(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    // Read the body like a real service would (its content does not matter).
    let _ = req.into_body().collect().await;
    // Check (a retry that comes after the insert gets the same order back,
    // so sequential retries are handled correctly)...
    let existing = orders(state).get(&key).copied();
    if let Some(id) = existing {
        return json(
            StatusCode::OK,
            &serde_json::json!({ "order_id": id, "key": key }),
        );
    }
    // ...await (a payment call, a slow query)... while every concurrent
    // request with the same key passes the same check...
    tokio::time::sleep(state.delay).await;
    // ...then act: each of them creates an order.
    let id = state.created.fetch_add(1, Ordering::SeqCst) + 1;
    orders(state).insert(key.clone(), id);
    json(
        StatusCode::CREATED,
        &serde_json::json!({ "order_id": id, "key": key }),
    )
}

fn orders(state: &State) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
    state.orders.lock().unwrap_or_else(PoisonError::into_inner)
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(value.to_string())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    res
}
