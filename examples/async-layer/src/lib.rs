//! An axum service that answers `202 Accepted` at once and runs the slow
//! work in the background, **once per key**, however often the client
//! retries: the tower `IdempotencyLayer` in async mode, with the memory
//! store and a `Dispatcher` in the same process (async mode is §9 of the
//! repository's `docs/protocol.md`).
//!
//! ```text
//! cargo run -p async-layer
//! curl -i -X POST localhost:3000/reports -H 'Idempotency-Key: r-1' -d 'monthly'
//! #   HTTP/1.1 202 Accepted
//! #   location: /_idem/operations/<id>
//! #   {"id":"<id>","status":"pending","href":"/_idem/operations/<id>"}
//! curl -i 'localhost:3000/_idem/operations/<id>?wait=10s'   # 201 + the report, once it is done
//! curl -i -X POST localhost:3000/reports -H 'Idempotency-Key: r-1' -d 'monthly'   # the same 201, replayed
//! curl localhost:3000/count                                  # {"count":1}
//! ```
//!
//! How it fits together ([`app`]):
//!
//! - `POST /reports` is an ordinary handler ([`work`]) that takes a while;
//! - the layer, given an `AsyncMode`, answers a POST of that route with a
//!   `202` as soon as the request is stored as an operation, repeats with
//!   the same `202` (or, once done, the stored answer), and serves
//!   `GET /_idem/operations/{id}` (`?wait=` long-polls);
//! - the `Dispatcher` claims each operation and sends it to the handler
//!   through [`Work`] (the handler without the layer), then stores its
//!   answer as the operation's final one. A `5xx` would be retried with
//!   backoff up to `max_attempts`.
//!
//! The memory store keeps operations in this process only: they are lost on
//! restart. With `PostgresStore` or `RedisStore` instead they survive it,
//! and every process sharing the store dispatches them.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use idem::asyncop::{AsyncConfig, DispatchError, Dispatcher, Upstream};
use idem::layer::{capture, AsyncMode, IdempotencyLayer};
use idem::policy::{Mode, Route, RoutePolicy, RouteTable};
use idem::store::memory::MemoryStore;
use idem::store::OperationRequest;
use idem::{Engine, StoredResponse};
use tower::ServiceExt;

/// How many times the report handler really ran.
pub type Executions = Arc<AtomicU64>;

/// The running service: the router to serve, and the dispatcher that must
/// live as long as it (dropping it stops the background work).
pub struct App {
    /// The service, with the layer.
    pub router: Router,
    /// Runs the accepted operations.
    pub dispatcher: Dispatcher<Arc<MemoryStore>, Work>,
    /// Executions of [`work`].
    pub executions: Executions,
}

/// How long a report takes.
pub const WORK_TIME: Duration = Duration::from_millis(300);

/// The slow work: one report per execution, counted.
pub async fn work(State(executions): State<Executions>, body: String) -> (StatusCode, String) {
    tokio::time::sleep(WORK_TIME).await;
    let n = executions.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, format!("report #{n} for {body:?}\n"))
}

/// `{"count": n}`: how many times [`work`] ran.
async fn count(State(executions): State<Executions>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "count": executions.load(Ordering::SeqCst) }))
}

/// Where the dispatcher sends an operation: the handlers, without the layer.
#[derive(Clone)]
pub struct Work(Router);

impl Upstream for Work {
    fn call(
        &self,
        op: Arc<OperationRequest>,
    ) -> impl Future<Output = Result<StoredResponse, DispatchError>> + Send {
        let handlers = self.0.clone();
        async move {
            let mut req = Request::builder()
                .method(op.method.as_str())
                .uri(op.uri.as_str());
            for (name, value) in &op.headers {
                req = req.header(name.as_str(), value.as_ref());
            }
            let req = req
                .body(Body::from(op.body.clone()))
                .map_err(|e| DispatchError::Refused(e.into()))?;
            let res = handlers
                .oneshot(req)
                .await
                .map_err(|e| DispatchError::Reset(e.into()))?;
            let (parts, body) = res.into_parts();
            let body = axum::body::to_bytes(body, 1 << 20)
                .await
                .map_err(|e| DispatchError::Reset(e.into()))?;
            Ok(capture(parts.status, &parts.headers, body))
        }
    }
}

/// Builds the service and starts its dispatcher (4 workers). Call it inside
/// a Tokio runtime.
///
/// # Panics
///
/// Outside a Tokio runtime.
#[must_use]
pub fn app() -> App {
    let executions = Executions::default();
    let handlers = Router::new()
        .route("/reports", post(work))
        .route("/count", get(count))
        .with_state(Arc::clone(&executions));

    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::spawn(
        Arc::clone(&store),
        Work(handlers.clone()),
        AsyncConfig::default().workers(4),
    );

    // Only POST /reports is async; everything else passes through.
    let mut report = RoutePolicy::default();
    report.mode = Mode::Async;
    let routes = RouteTable::default()
        .route(Route::parse_match("POST /reports", Arc::new(report)).expect("a valid pattern"));
    let layer = IdempotencyLayer::new(Engine::new(store), routes)
        .async_mode(AsyncMode::from_dispatcher(&dispatcher));
    App {
        router: handlers.layer(layer),
        dispatcher,
        executions,
    }
}
