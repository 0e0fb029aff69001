//! A counting test upstream, a gateway in front of it, and a small client.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use idem_cli::config::{self, Overrides};
use idem_cli::gateway::Gateway;

/// Executions seen by the upstream, per (method, path, idempotency key).
#[derive(Clone, Default)]
pub struct Upstream {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    pub addr: Option<SocketAddr>,
}

impl Upstream {
    /// Starts the upstream on a free port.
    pub async fn start() -> Self {
        let mut up = Upstream::default();
        let app = axum::Router::new().fallback(handler).with_state(up.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        up.addr = Some(listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        up
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr.expect("started"))
    }

    /// Executions of `path` (any method) under `key`.
    pub fn count(&self, method: &str, path: &str, key: &str) -> usize {
        let counts = self.counts.lock().expect("lock");
        counts
            .get(&format!("{method} {path} {key}"))
            .copied()
            .unwrap_or(0)
    }

    /// All executions.
    pub fn total(&self) -> usize {
        self.counts.lock().expect("lock").values().sum()
    }
}

#[derive(serde::Deserialize, Default)]
struct Params {
    delay_ms: Option<u64>,
    status: Option<u16>,
    /// Sleep only on the first execution of this key.
    slow_first_ms: Option<u64>,
}

async fn handler(
    State(up): State<Upstream>,
    method: Method,
    uri: Uri,
    Query(p): Query<Params>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let n = {
        let mut counts = up.counts.lock().expect("lock");
        let c = counts
            .entry(format!("{method} {} {key}", uri.path()))
            .or_insert(0);
        *c += 1;
        *c
    };
    if let Some(ms) = p.delay_ms {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let (Some(ms), 1) = (p.slow_first_ms, n) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = StatusCode::from_u16(p.status.unwrap_or(201)).unwrap_or(StatusCode::OK);
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (
        status,
        [
            ("x-execution", n.to_string()),
            ("x-seen-request-id", request_id),
            ("set-cookie", format!("order={n}")),
        ],
        format!(
            "{{\"execution\":{n},\"key\":\"{key}\",\"body_len\":{},\"nonce\":{}}}",
            body.len(),
            rand_u32()
        ),
    )
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    h.finish() as u32
}

/// A gateway on port 0 in front of `upstream`, with `extra` TOML appended
/// to a minimal config.
pub async fn gateway(upstream: &str, extra: &str) -> Gateway {
    gateway_with_env(upstream, extra, &|_| None).await
}

/// Like [`gateway`], with `IDEM_*` variables from `env`.
pub async fn gateway_with_env(
    upstream: &str,
    extra: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Gateway {
    let src = format!("listen = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n{extra}\n");
    let cfg = config::load_str("test.toml", &src, env, &Overrides::default())
        .unwrap_or_else(|e| panic!("test config refused: {e}\n{src}"));
    Gateway::start(cfg).await.expect("gateway starts")
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("json body")
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// Asserts a problem+json with this status and code.
    pub fn assert_problem(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "body: {:?}", self.body);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json")
        );
        let v = self.json();
        assert_eq!(v["code"], code, "{v}");
        assert_eq!(v["status"], status);
        assert_eq!(v["retryable"], matches!(status, 409 | 502 | 503 | 504));
    }
}

pub async fn send(
    client: &HttpClient,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    try_send(client, addr, method, path, headers, body)
        .await
        .expect("gateway answers")
}

/// Like [`send`], but a failed connection or exchange is an error, not a
/// panic (for polling a server that may not be up, or may be killed).
pub async fn try_send(
    client: &HttpClient,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Reply, String> {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let req = req
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .expect("request");
    let res = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let (parts, body) = res.into_parts();
    Ok(Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: body.collect().await.map_err(|e| e.to_string())?.to_bytes(),
    })
}
