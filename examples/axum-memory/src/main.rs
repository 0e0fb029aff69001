//! An axum service made idempotent with one `.layer(...)`, on the in-memory
//! store.
//!
//! ```text
//! cargo run -p axum-memory
//! curl -i -X POST localhost:3000/orders -H 'Idempotency-Key: o-1' -d '{"sku":"tea"}'
//! curl -i -X POST localhost:3000/orders -H 'Idempotency-Key: o-1' -d '{"sku":"tea"}'   # replayed
//! curl localhost:3000/count                                                             # {"count":1}
//! ```
//!
//! `GET /count` answers `{"count": n}`, the number of times the create
//! handler really ran: the count `idem race --count-url` reads before and
//! after a race. `LISTEN` sets the address (default `127.0.0.1:3000`; port 0
//! picks a free one, printed at start-up).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use idem::layer::IdempotencyLayer;
use idem::policy::{Concurrent, Route, RoutePolicy};
use idem::store::memory::MemoryStore;
use idem::{Engine, RouteTable};

/// Executions of the create handler.
type Orders = Arc<AtomicU64>;

/// Builds the app: `POST /orders` creates an order (duplicates wait for the
/// first and get its answer); `GET /count` says how many were really created.
fn app() -> Router {
    let orders = Orders::default();
    let mut wait = RoutePolicy::default();
    wait.concurrent = Concurrent::Wait;
    let routes = RouteTable::default()
        .route(Route::parse_match("POST /orders", Arc::new(wait)).expect("a valid pattern"));
    Router::new()
        .route("/orders", post(create_order))
        .route("/count", get(count))
        .with_state(orders)
        .layer(IdempotencyLayer::new(
            Engine::new(MemoryStore::new()),
            routes,
        ))
}

async fn create_order(State(orders): State<Orders>, body: String) -> Json<serde_json::Value> {
    let id = orders.fetch_add(1, Ordering::SeqCst) + 1;
    Json(serde_json::json!({ "order": id, "request": body }))
}

/// `{"count": n}`: how many times `create_order` ran (a GET: the layer
/// lets it through untouched).
async fn count(State(orders): State<Orders>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "count": orders.load(Ordering::SeqCst) }))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let addr = listener.local_addr()?;
    println!(
        "listening on http://{addr} (POST /orders with an Idempotency-Key header; GET /count)"
    );
    axum::serve(listener, app()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    fn post() -> Request<Body> {
        Request::post("/orders")
            .header("idempotency-key", "o-1")
            .body(Body::from("tea"))
            .expect("request")
    }

    async fn count_of(app: &Router) -> serde_json::Value {
        let res = app
            .clone()
            .oneshot(Request::get("/count").body(Body::empty()).expect("request"))
            .await
            .expect("response");
        assert_eq!(res.status(), 200);
        let body = axum::body::to_bytes(res.into_body(), 1024)
            .await
            .expect("body");
        serde_json::from_slice(&body).expect("JSON")
    }

    #[tokio::test]
    async fn second_post_replays_the_first() {
        let app = app();
        let first = app.clone().oneshot(post()).await.expect("response");
        let second = app.clone().oneshot(post()).await.expect("response");
        assert_eq!(first.status(), 200);
        assert_eq!(second.headers()["idempotent-replayed"], "true");
    }

    #[tokio::test]
    async fn count_says_how_many_orders_were_really_created() {
        let app = app();
        assert_eq!(count_of(&app).await, serde_json::json!({ "count": 0 }));
        for _ in 0..3 {
            let res = app.clone().oneshot(post()).await.expect("response");
            assert_eq!(res.status(), 200);
        }
        // Three POSTs with one key: the handler ran once.
        assert_eq!(count_of(&app).await, serde_json::json!({ "count": 1 }));
    }
}
