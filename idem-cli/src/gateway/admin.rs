//! The admin listener (SPEC §8, §10): a separate address, guarded by a
//! bearer token (`IDEM_ADMIN_TOKEN`).
//!
//! | route | auth | answer |
//! |---|---|---|
//! | `GET /healthz` | none | 200 while the process serves |
//! | `GET /readyz` | none | 200 when the store answers, else 503 |
//! | `GET /metrics` | bearer | Prometheus text |
//! | `GET /records/{store_key}` | bearer | the record as JSON, 404 if none |
//! | `DELETE /records/{store_key}` | bearer | 204 purged, 404 if none |
//!
//! A `store_key` is `<32 hex scope hash>:<key>`; logs name it by its log id
//! ([`idem::StoreKey::log_id`]), never in full.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use idem::record::Record;
use idem::{Engine, Store, StoreKey};

struct Admin<S> {
    engine: Engine<S>,
    token: String,
}

/// The admin routes over `engine`, guarded by `token`.
pub fn router<S: Store>(engine: Engine<S>, token: String) -> Router {
    let state = Arc::new(Admin { engine, token });
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<S>))
        .route("/metrics", get(metrics::<S>))
        .route("/records/{key}", get(inspect::<S>).delete(purge::<S>))
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
    let m = admin.engine.metrics();
    let mut out = String::with_capacity(2048);
    out.push_str(
        "# HELP idem_requests_total Requests by outcome.\n# TYPE idem_requests_total counter\n",
    );
    for (outcome, counter) in [
        ("executed", &m.executed),
        ("replayed", &m.replayed),
        ("waited", &m.waited),
        ("conflict", &m.conflict),
        ("mismatch", &m.mismatch),
        ("bypass", &m.bypass),
        ("store_error", &m.store_error),
        ("fenced", &m.fenced),
    ] {
        let _ = writeln!(
            out,
            "idem_requests_total{{outcome=\"{outcome}\"}} {}",
            counter.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP idem_in_flight Operations executing now.\n# TYPE idem_in_flight gauge\nidem_in_flight {}",
        m.in_flight.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP idem_response_too_large_total Answers larger than max_response_body: \
         streamed, not stored, key released.\n\
         # TYPE idem_response_too_large_total counter\n\
         idem_response_too_large_total {}",
        m.response_too_large.load(Ordering::Relaxed)
    );
    let (hits, misses) = (
        m.cache_hits.load(Ordering::Relaxed),
        m.cache_misses.load(Ordering::Relaxed),
    );
    let _ = writeln!(
        out,
        "# HELP idem_local_cache_lookups_total Local cache lookups by result.\n\
         # TYPE idem_local_cache_lookups_total counter\n\
         idem_local_cache_lookups_total{{result=\"hit\"}} {hits}\n\
         idem_local_cache_lookups_total{{result=\"miss\"}} {misses}"
    );
    let (buckets, sum, count) = m.store_latency.snapshot();
    out.push_str(
        "# HELP idem_store_latency_seconds Store call latency.\n\
         # TYPE idem_store_latency_seconds histogram\n",
    );
    for (le, n) in buckets {
        let _ = writeln!(out, "idem_store_latency_seconds_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "idem_store_latency_seconds_bucket{{le=\"+Inf\"}} {count}\n\
         idem_store_latency_seconds_sum {sum}\n\
         idem_store_latency_seconds_count {count}"
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
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
    let json = match admin.engine.inspect(&key).await {
        Err(error) => {
            tracing::warn!(%error, "admin inspect failed");
            return (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response();
        }
        Ok(None) => return (StatusCode::NOT_FOUND, "no record\n").into_response(),
        Ok(Some(Record::InFlight {
            fingerprint,
            lease_remaining,
            started_at,
        })) => serde_json::json!({
            "state": "in_flight",
            "fingerprint": fingerprint.to_hex(),
            "lease_remaining_ms": lease_remaining.as_millis(),
            "started_at_ms": millis_since_epoch(started_at),
        }),
        Ok(Some(Record::Completed(r))) => {
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
    (
        [(header::CONTENT_TYPE, "application/json")],
        json.to_string(),
    )
        .into_response()
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
