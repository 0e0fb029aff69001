//! The admin listener (protocol §8, §10): a separate address, guarded by a
//! bearer token (`IDEM_ADMIN_TOKEN`).
//!
//! | route | auth | answer |
//! |---|---|---|
//! | `GET /healthz` | none | 200 while the process serves |
//! | `GET /readyz` | none | 200 when the store answers, else 503 |
//! | `GET /metrics` | bearer | Prometheus text |
//! | `GET /records/{store_key}` | bearer | the record as JSON (with a `job` object for a job run by `Engine::once`/`once_job`: status, attempts, since, last error), 404 if none |
//! | `DELETE /records/{store_key}` | bearer | 204 purged, 404 if none |
//! | `GET /operations/{id}` | bearer | an async operation's key, state, attempts and `last_error` as JSON, 404 if none |
//!
//! A `store_key` is `<32 hex scope hash>:<key>`; logs name it by its log id
//! ([`idem::StoreKey::log_id`]), never in full. A pending or running
//! operation's record reads as `in_flight` under `/records/`;
//! `/operations/{id}` shows where it is in its life (any scope's: the admin
//! is trusted).

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use idem::record::Record;
use idem::store::{OperationId, OperationState};
use idem::{Engine, JobStatus, Store, StoreKey};

use super::dispatch::AsyncStats;

mod metrics;

struct Admin<S> {
    engine: Engine<S>,
    token: String,
    asynchronous: Option<Arc<AsyncStats>>,
}

/// The admin routes over `engine`, guarded by `token`; with async mode's
/// figures and operations when `asynchronous` is given.
pub fn router<S: Store>(
    engine: Engine<S>,
    token: String,
    asynchronous: Option<Arc<AsyncStats>>,
) -> Router {
    let state = Arc::new(Admin {
        engine,
        token,
        asynchronous,
    });
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<S>))
        .route("/metrics", get(metrics::<S>))
        .route("/records/{key}", get(inspect::<S>).delete(purge::<S>))
        .route("/operations/{id}", get(operation::<S>))
        .with_state(state)
}

/// Compares in time independent of where the first difference is.
fn authorized<S>(admin: &Admin<S>, headers: &HeaderMap) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (given.as_bytes(), admin.token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "send Authorization: Bearer <IDEM_ADMIN_TOKEN>\n",
    )
        .into_response()
}

async fn readyz<S: Store>(State(admin): State<Arc<Admin<S>>>) -> Response {
    match admin.engine.ready().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(error) => {
            tracing::warn!(%error, "readyz: store not ready");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response()
        }
    }
}

async fn metrics<S: Store>(State(admin): State<Arc<Admin<S>>>, headers: HeaderMap) -> Response {
    if !authorized(&admin, &headers) {
        return unauthorized();
    }
    let asynchronous = match &admin.asynchronous {
        Some(stats) => Some((stats.as_ref(), stats.queue().await)),
        None => None,
    };
    let text = metrics::render(admin.engine.metrics(), asynchronous);
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

/// `GET /operations/{id}`: an operation of any scope, for the operator.
async fn operation<S: Store>(
    State(admin): State<Arc<Admin<S>>>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Response {
    if !authorized(&admin, &headers) {
        return unauthorized();
    }
    let Ok(id) = raw.parse::<OperationId>() else {
        return (
            StatusCode::BAD_REQUEST,
            "not an operation id (32 lower-case hex digits)\n",
        )
            .into_response();
    };
    let Some(stats) = &admin.asynchronous else {
        return (StatusCode::NOT_FOUND, "no operation\n").into_response();
    };
    let op = match stats.operation(id).await {
        Ok(Some(op)) => op,
        Ok(None) => return (StatusCode::NOT_FOUND, "no operation\n").into_response(),
        Err(error) => {
            tracing::warn!(%error, "admin operation lookup failed");
            return (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response();
        }
    };
    let mut json = serde_json::json!({ "id": op.id.to_string(), "key": op.key.as_str() });
    match op.state {
        OperationState::Pending {
            attempts,
            next_attempt_in,
        } => {
            json["state"] = "pending".into();
            json["attempts"] = attempts.into();
            json["next_attempt_in_ms"] = u64::try_from(next_attempt_in.as_millis())
                .unwrap_or(u64::MAX)
                .into();
        }
        OperationState::Running { attempts } => {
            json["state"] = "running".into();
            json["attempts"] = attempts.into();
        }
        OperationState::Done(r) => {
            json["state"] = "done".into();
            json["status"] = r.response.status.into();
            json["completed_at_ms"] = u64::try_from(millis_since_epoch(r.completed_at))
                .unwrap_or(u64::MAX)
                .into();
            json["expires_at_ms"] = u64::try_from(millis_since_epoch(r.expires_at))
                .unwrap_or(u64::MAX)
                .into();
        }
    }
    if let Some(why) = op.last_error {
        json["last_error"] = why.into();
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        json.to_string(),
    )
        .into_response()
}

/// The store key a records route names, once the caller is authorized:
/// 401 without the token, 400 for a malformed key.
struct RecordKey(StoreKey);

impl<S: Store> FromRequestParts<Arc<Admin<S>>> for RecordKey {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        admin: &Arc<Admin<S>>,
    ) -> Result<Self, Response> {
        if !authorized(admin, &parts.headers) {
            return Err(unauthorized());
        }
        let Path(raw) = Path::<String>::from_request_parts(parts, admin)
            .await
            .map_err(IntoResponse::into_response)?;
        StoreKey::from_stored(&raw).map(Self).map_err(|e| {
            (
                StatusCode::BAD_REQUEST,
                format!("not a store key (`<32 hex>:<key>`): {}\n", e.reason()),
            )
                .into_response()
        })
    }
}

fn millis_since_epoch(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

async fn inspect<S: Store>(
    State(admin): State<Arc<Admin<S>>>,
    RecordKey(key): RecordKey,
) -> Response {
    let record = match admin.engine.inspect(&key).await {
        Err(error) => {
            tracing::warn!(%error, "admin inspect failed");
            return (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response();
        }
        Ok(record) => record,
    };
    // A job's trace (protocol §13): kept beside the record by
    // `Engine::once`/`once_job` only, and outliving a release.
    let trace = match admin.engine.store().attempts(&key).await {
        Ok(trace) => trace,
        Err(error) => {
            tracing::warn!(%error, "admin inspect: cannot read the job trace");
            None
        }
    };
    let status = JobStatus::from_parts(record.as_ref(), trace.as_ref());
    let is_job = trace.is_some() || matches!(status, JobStatus::Failed { .. });
    let mut json = match record {
        None if is_job => serde_json::json!({ "state": "released" }),
        None => return (StatusCode::NOT_FOUND, "no record\n").into_response(),
        Some(Record::InFlight {
            fingerprint,
            lease_remaining,
            started_at,
        }) => serde_json::json!({
            "state": "in_flight",
            "fingerprint": fingerprint.to_hex(),
            "lease_remaining_ms": lease_remaining.as_millis(),
            "started_at_ms": millis_since_epoch(started_at),
        }),
        Some(Record::Completed(r)) => {
            let preview = &r.response.body[..r.response.body.len().min(1024)];
            serde_json::json!({
                "state": "completed",
                "fingerprint": r.fingerprint.to_hex(),
                "status": r.response.status,
                "headers": r.response.headers.iter()
                    .map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned()))
                    .collect::<Vec<_>>(),
                "body_len": r.response.body.len(),
                "body_preview": String::from_utf8_lossy(preview),
                "completed_at_ms": millis_since_epoch(r.completed_at),
                "expires_at_ms": millis_since_epoch(r.expires_at),
            })
        }
    };
    if is_job {
        json["job"] = job_json(&status);
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        json.to_string(),
    )
        .into_response()
}

/// A job's status (protocol §13) as `/records/` shows it: the same fields
/// as `idem::JobStatus`.
fn job_json(status: &JobStatus) -> serde_json::Value {
    match status {
        JobStatus::Running { attempt, since } => serde_json::json!({
            "status": "running",
            "attempt": attempt,
            "since_ms": millis_since_epoch(*since),
        }),
        JobStatus::Released {
            attempts,
            last_error,
        } => serde_json::json!({
            "status": "released",
            "attempts": attempts,
            "last_error": last_error,
        }),
        JobStatus::Done { at } => serde_json::json!({
            "status": "done",
            "at_ms": millis_since_epoch(*at),
        }),
        JobStatus::Failed {
            attempts,
            last_error,
        } => serde_json::json!({
            "status": "failed",
            "attempts": attempts,
            "last_error": last_error,
        }),
        _ => serde_json::json!({ "status": "not_seen" }),
    }
}

async fn purge<S: Store>(
    State(admin): State<Arc<Admin<S>>>,
    RecordKey(key): RecordKey,
) -> Response {
    match admin.engine.purge(&key).await {
        Ok(true) => {
            // By its log id: the store key holds the client's key.
            tracing::info!(key = %key.log_id(), "record purged by admin");
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => (StatusCode::NOT_FOUND, "no record\n").into_response(),
        Err(error) => {
            tracing::warn!(%error, "admin purge failed");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response()
        }
    }
}
