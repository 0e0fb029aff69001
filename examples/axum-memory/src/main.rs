//! An axum service made idempotent with one `.layer(...)`, on the in-memory
//! store.
//!
//! ```text
//! cargo run -p axum-memory
//! curl -i -X POST localhost:3000/orders -H 'Idempotency-Key: o-1' -d '{"sku":"tea"}'
//! curl -i -X POST localhost:3000/orders -H 'Idempotency-Key: o-1' -d '{"sku":"tea"}'   # replayed
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use idem::layer::IdempotencyLayer;
use idem::policy::{Concurrent, Route, RoutePolicy};
use idem::store::memory::MemoryStore;
use idem::{Engine, RouteTable};

/// Builds the app: `POST /orders` creates an order; duplicates wait for the
/// first and get its answer.
fn app() -> Router {
    let orders = Arc::new(AtomicU64::new(0));
    let mut wait = RoutePolicy::default();
    wait.concurrent = Concurrent::Wait;
    let routes = RouteTable::default()
        .route(Route::parse_match("POST /orders", Arc::new(wait)).expect("a valid pattern"));
    Router::new()
        .route("/orders", post(create_order))
        .with_state(orders)
        .layer(IdempotencyLayer::new(
            Engine::new(MemoryStore::new()),
            routes,
        ))
}

async fn create_order(
    State(orders): State<Arc<AtomicU64>>,
    body: String,
) -> Json<serde_json::Value> {
    let id = orders.fetch_add(1, Ordering::SeqCst) + 1;
    Json(serde_json::json!({ "order": id, "request": body }))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{addr} (POST /orders with an Idempotency-Key header)");
    axum::serve(listener, app()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    #[tokio::test]
    async fn second_post_replays_the_first() {
        let app = app();
        let post = || {
            Request::post("/orders")
                .header("idempotency-key", "o-1")
                .body(Body::from("tea"))
                .expect("request")
        };
        let first = app.clone().oneshot(post()).await.expect("response");
        let second = app.oneshot(post()).await.expect("response");
        assert_eq!(first.status(), 200);
        assert_eq!(second.headers()["idempotent-replayed"], "true");
    }
}
