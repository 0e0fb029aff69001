//! An axum service that creates orders exactly once, with idem's
//! transactional API on PostgreSQL: the order row and its idempotency record
//! commit in ONE transaction, so there is no window in which one exists
//! without the other. A retry replays the stored order; a request that
//! fails rolls back both, so its retry runs again.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo run -p axum-postgres
//! curl -i -X POST localhost:3000/orders -H 'Idempotency-Key: o-1' \
//!      -H 'content-type: application/json' -d '{"item":"tea","quantity":2}'
//! # the same again: 201 with the same order and `idempotent-replayed: true`
//! ```
//!
//! Both tables live in one schema (`SCHEMA`, default `shop`): `orders` and
//! idem's `idem_records`.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use idem::fingerprint::{fingerprint, FingerprintOptions, DEFAULT_HEADERS};
use idem::policy::Concurrent;
use idem::problem::{Problem, ProblemCode};
use idem::store::postgres::{sqlx, PostgresStore};
use idem::store::StoreError;
use idem::{OnceError, Rules, Scope, StoreKey};
use serde::{Deserialize, Serialize};

/// What a client sends.
#[derive(Debug, Deserialize)]
struct NewOrder {
    item: String,
    quantity: i32,
}

/// What is stored, and answered on every repeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Order {
    id: i64,
    item: String,
    quantity: i32,
}

#[derive(Clone)]
struct App {
    store: PostgresStore,
    insert: String,
    rules: Rules,
}

/// Connects the store (its migration creates the schema) and the orders
/// table next to it.
async fn connect(url: &str, schema: &str) -> Result<PostgresStore, StoreError> {
    let store = PostgresStore::builder(url).schema(schema).connect().await?;
    let ddl = format!(
        "CREATE TABLE IF NOT EXISTS \"{schema}\".orders (
             id bigserial PRIMARY KEY,
             item text NOT NULL,
             quantity integer NOT NULL,
             created_at timestamptz NOT NULL DEFAULT now())"
    );
    sqlx::raw_sql(&ddl)
        .execute(store.pool())
        .await
        .map_err(|e| StoreError::Unavailable(Box::new(e)))?;
    Ok(store)
}

/// `POST /orders`: duplicates wait for the first request and get its order.
fn app(store: PostgresStore) -> Router {
    let insert = format!(
        "INSERT INTO \"{}\".orders (item, quantity) VALUES ($1, $2) RETURNING id",
        store.schema()
    );
    let rules = Rules {
        concurrent: Concurrent::Wait,
        wait_timeout: Duration::from_secs(10),
        ..Rules::default()
    };
    Router::new()
        .route("/orders", post(create_order))
        .with_state(App {
            store,
            insert,
            rules,
        })
}

async fn create_order(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let key = match idem::key::from_header_values(headers.get_all("idempotency-key")) {
        Ok(Some(key)) => key,
        Ok(None) => {
            return problem(&Problem::new(
                ProblemCode::KeyMissing,
                "send an Idempotency-Key header",
            ))
        }
        Err(e) => return problem(&Problem::new(ProblemCode::KeyInvalid, e.reason())),
    };
    let new: NewOrder = match serde_json::from_slice(&body) {
        Ok(new) => new,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad order: {e}\n")).into_response(),
    };
    // The key belongs to whoever sent it (their Authorization header), and
    // the fingerprint says what they asked for.
    let key = StoreKey::new(
        &Scope::from_headers(&headers, &[header::AUTHORIZATION]),
        key.as_str(),
    );
    let request = fingerprint(
        &Method::POST,
        &Uri::from_static("/orders"),
        &headers,
        &body,
        &FingerprintOptions {
            headers: &DEFAULT_HEADERS,
            canonical_json: true,
            ..FingerprintOptions::default()
        },
    );

    let insert = app.insert.clone();
    let created = app
        .store
        .transaction(&key, request, &app.rules, move |tx| {
            Box::pin(async move {
                // Runs on the transaction that also holds the reservation.
                let id: i64 = sqlx::query_scalar(&insert)
                    .bind(&new.item)
                    .bind(new.quantity)
                    .fetch_one(&mut **tx)
                    .await?;
                Ok::<_, sqlx::Error>(Order {
                    id,
                    item: new.item,
                    quantity: new.quantity,
                })
            })
        })
        .await;

    match created {
        Ok(once) => {
            let mut res = (StatusCode::CREATED, Json(once.value)).into_response();
            if once.replayed {
                res.headers_mut()
                    .insert("idempotent-replayed", HeaderValue::from_static("true"));
            }
            res
        }
        Err(OnceError::InProgress { retry_after }) => problem(
            &Problem::new(
                ProblemCode::KeyInProgress,
                "this order is still being created",
            )
            .retry_after(retry_after),
        ),
        Err(OnceError::Mismatch) => problem(&Problem::new(
            ProblemCode::KeyReused,
            "this key was used for a different order",
        )),
        Err(OnceError::Store(e)) => {
            eprintln!("store unavailable: {e}");
            problem(
                &Problem::new(ProblemCode::StoreUnavailable, "try again shortly")
                    .retry_after(Duration::from_secs(1)),
            )
        }
        Err(e) => {
            // Nothing was committed: a retry with the same key runs again.
            eprintln!("order failed: {e}");
            problem(&Problem::new(
                ProblemCode::Internal,
                "the order could not be saved",
            ))
        }
    }
}

fn problem(p: &Problem) -> Response {
    p.to_response::<Body>()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let schema = std::env::var("SCHEMA").unwrap_or_else(|_| "shop".into());
    let addr = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let store = connect(&url, &schema).await?;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{addr} (POST /orders with an Idempotency-Key header)");
    axum::serve(listener, app(store)).await?;
    Ok(())
}

#[cfg(test)]
#[path = "../../../idem/tests/conformance/services.rs"]
mod services;

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use axum::http::Request;
    use tower::ServiceExt;

    /// A store in a schema of its own, or `None` (skipped loudly).
    async fn store() -> Option<PostgresStore> {
        let url = super::services::database_url();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let schema = format!("shop_t{nanos:x}");
        match connect(&url, &schema).await {
            Ok(store) => Some(store),
            Err(e) => super::services::unavailable("PostgreSQL", &url, &e),
        }
    }

    async fn drop_schema(store: &PostgresStore) {
        let sql = format!("DROP SCHEMA \"{}\" CASCADE", store.schema());
        sqlx::raw_sql(&sql).execute(store.pool()).await.unwrap();
    }

    fn post(key: Option<&str>, body: &'static str) -> Request<Body> {
        let mut req = Request::post("/orders")
            .header("content-type", "application/json")
            .header("authorization", "Bearer alice");
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        req.body(Body::from(body)).unwrap()
    }

    async fn body(res: Response) -> Bytes {
        axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn twenty_concurrent_posts_create_one_order() {
        let Some(store) = store().await else { return };
        let app = app(store.clone());
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let app = app.clone();
                tokio::spawn(async move {
                    let res = app
                        .oneshot(post(Some("o-1"), r#"{"item":"tea","quantity":2}"#))
                        .await
                        .unwrap();
                    let replayed = res.headers().contains_key("idempotent-replayed");
                    (res.status(), replayed, body(res).await)
                })
            })
            .collect();
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.unwrap());
        }
        let orders: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM \"{}\".orders",
            store.schema()
        ))
        .fetch_one(store.pool())
        .await
        .unwrap();
        assert_eq!(
            orders, 1,
            "20 identical POSTs must create exactly one order"
        );
        assert!(answers.iter().all(|(s, _, _)| *s == StatusCode::CREATED));
        assert_eq!(answers.iter().filter(|(_, r, _)| !r).count(), 1);
        assert!(answers.iter().all(|(_, _, b)| *b == answers[0].2));
        let order: Order = serde_json::from_slice(&answers[0].2).unwrap();
        assert_eq!((order.item.as_str(), order.quantity), ("tea", 2));

        // The same body with keys in another order is the same request.
        let again = app
            .clone()
            .oneshot(post(Some("o-1"), r#"{ "quantity": 2, "item": "tea" }"#))
            .await
            .unwrap();
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        drop_schema(&store).await;
    }

    #[tokio::test]
    async fn reused_and_missing_keys_are_refused() {
        let Some(store) = store().await else { return };
        let app = app(store.clone());
        let first = app
            .clone()
            .oneshot(post(Some("o-2"), r#"{"item":"tea","quantity":1}"#))
            .await
            .unwrap();
        assert_eq!(first.status(), StatusCode::CREATED);
        let reused = app
            .clone()
            .oneshot(post(Some("o-2"), r#"{"item":"coffee","quantity":1}"#))
            .await
            .unwrap();
        assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let missing = app
            .clone()
            .oneshot(post(None, r#"{"item":"tea","quantity":1}"#))
            .await
            .unwrap();
        assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
        let problem: serde_json::Value = serde_json::from_slice(&body(missing).await).unwrap();
        assert_eq!(problem["code"], "idempotency_key_missing");
        drop_schema(&store).await;
    }
}
