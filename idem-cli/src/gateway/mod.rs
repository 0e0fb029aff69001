//! `idem serve`: a reverse proxy that puts the idempotency layer in front of
//! any HTTP service (SPEC §8, §12).
//!
//! Phases of one request, in order:
//! 1. **downstream**: hyper reads the head (bounded by `max_header_bytes`
//!    and `request_read_timeout`); the request gets its `X-Request-Id`;
//! 2. **idempotency**: [`idem::layer::Idempotency`] classifies, checks the
//!    key, buffers the body (`max_body`, read deadline), reserves, replays or
//!    waits;
//! 3. **upstream**: [`proxy::Proxy`] forwards with a pooled client, within
//!    `upstream_timeout`, and classifies failures by source;
//! 4. **finish**: the layer stores or releases, *then* the response leaves.
//!
//! Each request runs in its own task, so a client that hangs up does not
//! cancel an upstream call already under way: its result is still stored,
//! and the client's retry replays it.

pub mod admin;
pub mod body;
pub mod proxy;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tower::{Layer, ServiceExt};
use tracing::Instrument;

use idem::layer::{Idempotency, IdempotencyLayer, ResponseBody};
use idem::problem::{Problem, ProblemCode};
use idem::store::memory::{MemoryLimits, MemoryStore};
use idem::store::{AnyStore, ConnectOptions};
use idem::{Engine, EngineConfig, Store};

use crate::config::{Config, StoreSpec};
use body::GatewayBody;
use proxy::{Proxy, ProxyBody, ProxyError};

/// The request-id header (SPEC §10).
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Why the gateway could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The upstream cannot be proxied to.
    #[error(transparent)]
    Upstream(#[from] ProxyError),
    /// The store did not answer at start-up.
    #[error("cannot use the store {store}: {source}")]
    Store {
        /// The store, with any password hidden.
        store: String,
        /// Why.
        #[source]
        source: idem::StoreError,
    },
    /// The serve loop's task failed (it panicked or was cancelled).
    #[error("the gateway task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// A running gateway (used by `idem serve`, the demo and tests).
#[derive(Debug)]
pub struct Gateway {
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Gateway {
    /// Binds `config.listen` and starts serving in the background.
    pub async fn start(config: Config) -> Result<Self, GatewayError> {
        let listener = bind(config.listen).await?;
        let local_addr = listener.local_addr().map_err(|source| GatewayError::Bind {
            addr: config.listen,
            source,
        })?;
        let engine_config = EngineConfig {
            store_timeout: config.limits.store_timeout,
            // The memory store is itself in this process: a second copy of
            // its records would only cost an insert per request.
            local_cache_bytes: match config.store {
                StoreSpec::Memory => 0,
                _ => config.limits.local_cache_bytes,
            },
            ..EngineConfig::default()
        };
        let (tx, rx) = watch::channel(false);
        let admin = match config.admin_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
        for note in unserved_async(&config) {
            tracing::warn!("{note}");
        }
        let store = open_store(&config).await?;
        let engine = Engine::with_config(store, engine_config);
        let tasks = spawn_serve(listener, admin, engine, config, rx)?;
        tracing::info!(%local_addr, "idem gateway listening");
        if let Some(addr) = admin_addr {
            tracing::info!(%addr, "admin listener (healthz, readyz, metrics, records)");
        }
        Ok(Self {
            local_addr,
            admin_addr,
            shutdown: tx,
            tasks,
        })
    }

    /// The bound address (useful with port 0).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin listener's bound address, if configured.
    #[must_use]
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Stops accepting, lets in-flight requests finish and store their
    /// results (up to `shutdown_grace`), then returns.
    pub async fn shutdown(self) -> Result<(), GatewayError> {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            task.await.map_err(GatewayError::Task)?;
        }
        Ok(())
    }

    /// Serves until `signal` completes, then shuts down gracefully.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> Result<(), GatewayError> {
        signal.await;
        tracing::info!("shutting down: no new connections; finishing in-flight requests");
        self.shutdown().await
    }
}

/// SPEC §9's async mode is parsed but not served yet: the routes asking for
/// it, as sentences for the start-up log and `--check`, rather than silently
/// answering them synchronously.
#[must_use]
pub fn unserved_async(config: &Config) -> Vec<String> {
    let is_async = |p: &idem::RoutePolicy| p.mode == idem::policy::Mode::Async;
    let mut notes = Vec::new();
    if is_async(config.routes.default_policy()) {
        notes.push(
            "[defaults] mode = \"async\" is not available yet: requests are served synchronously"
                .to_owned(),
        );
    }
    for route in config
        .routes
        .routes()
        .iter()
        .filter(|r| is_async(&r.policy))
    {
        notes.push(format!(
            "route {}: mode = \"async\" is not available yet: it is served synchronously",
            route.path.as_str()
        ));
    }
    notes
}

/// Connects to the configured store, then lets it go: `idem serve --check`
/// runs this so that "configuration OK" also means "the store answers".
/// The memory store has nothing to connect to. A PostgreSQL store creates
/// its tables if they are missing, as `idem serve` would.
///
/// # Errors
///
/// [`GatewayError::Store`] when the store does not answer in time.
pub async fn check_store(config: &Config) -> Result<(), GatewayError> {
    if config.store == StoreSpec::Memory {
        return Ok(());
    }
    open_store(config).await.map(drop)
}

/// Opens the configured store. A remote store must answer at start-up:
/// better to refuse to start than to serve 503s from the first request.
async fn open_store(config: &Config) -> Result<AnyStore, GatewayError> {
    let limits = MemoryLimits {
        max_entries: config.limits.memory_max_entries,
        max_bytes: config.limits.memory_max_bytes,
    };
    let store = match &config.store {
        StoreSpec::Memory => {
            tracing::warn!(
                "store = memory: records live in this process only and are lost on restart; \
                 run several instances only with a shared store (redis:// or postgres://)"
            );
            AnyStore::Memory(MemoryStore::with_limits(limits))
        }
        StoreSpec::Redis(url) | StoreSpec::Postgres(url) => {
            let options = ConnectOptions::new().timeout(config.limits.store_timeout);
            AnyStore::connect_to(url, options)
                .await
                .map_err(|source| GatewayError::Store {
                    store: config.store.to_string(),
                    source,
                })?
        }
    };
    tracing::info!(store = %config.store, "store ready");
    Ok(store)
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, GatewayError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| GatewayError::Bind { addr, source })
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    // A dropped sender also means stop.
    let _ = rx.wait_for(|stop| *stop).await;
}

fn spawn_serve<S: Store>(
    listener: TcpListener,
    admin: Option<TcpListener>,
    engine: Engine<S>,
    config: Config,
    shutdown: watch::Receiver<bool>,
) -> Result<Vec<JoinHandle<()>>, GatewayError> {
    let routes = Arc::new(config.routes.clone());
    let proxy = Proxy::new(&config.upstream, Arc::clone(&routes))?;
    let mut tasks = Vec::with_capacity(2);
    if let (Some(listener), Some(token)) = (admin, config.admin_token.clone()) {
        let app = admin::router(engine.clone(), token);
        let stop = stopped(shutdown.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::error!(%error, "admin listener failed");
            }
        }));
    }
    let service = IdempotencyLayer::new(engine, config.routes.clone()).layer(proxy);
    tasks.push(tokio::spawn(serve(listener, service, config, shutdown)));
    Ok(tasks)
}

async fn serve<S: Store>(
    listener: TcpListener,
    service: Idempotency<Proxy, S>,
    config: Config,
    shutdown: watch::Receiver<bool>,
) {
    let shutdown = stopped(shutdown);
    tokio::pin!(shutdown);
    let limits = &config.limits;
    let routes = Arc::new(config.routes.clone());
    let read_timeout = limits.request_read_timeout;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(read_timeout)
        // hyper refuses buffers under 8 KiB.
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(error) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let routes = Arc::clone(&routes);
        let conn = http.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| handle(service.clone(), Arc::clone(&routes), read_timeout, req)),
        );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections finished"),
        () = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!(grace = ?limits.shutdown_grace, "shutdown grace ran out; closing remaining connections");
        }
    }
}

fn request_id(headers: &http::HeaderMap) -> HeaderValue {
    headers
        .get(&X_REQUEST_ID)
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty() && b.len() <= 200 && b.iter().all(|c| (0x21..=0x7e).contains(c))
        })
        .cloned()
        .unwrap_or_else(|| {
            // A 128-bit random hex id is always a valid header value.
            HeaderValue::from_str(&format!("{:032x}", rand::random::<u128>()))
                .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
        })
}

async fn handle<S: Store>(
    service: Idempotency<Proxy, S>,
    routes: Arc<idem::RouteTable>,
    read_timeout: Duration,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody<ProxyBody>>, Infallible> {
    let (mut parts, body) = req.into_parts();
    let id = request_id(&parts.headers);
    parts.headers.insert(X_REQUEST_ID, id.clone());
    let span =
        tracing::debug_span!("request", id = ?id, method = %parts.method, path = %parts.uri.path());
    // Normalizes the path and matches it once; the layer and the proxy
    // read the match from the request's extensions.
    let participates = idem::layer::route(&routes, &mut parts).participates();
    let req = Request::from_parts(parts, GatewayBody::incoming(body, read_timeout));
    if !participates {
        // Pass-through: nothing is stored, so nothing is lost if the client
        // hangs up and the call is dropped; no task needed.
        let mut res = match service.oneshot(req).instrument(span).await {
            Ok(res) => res,
            Err(never) => match never {},
        };
        res.headers_mut().insert(X_REQUEST_ID, id);
        return Ok(res);
    }
    // Its own task: a client hanging up must not cancel an upstream call
    // whose result still has to be stored.
    let task = tokio::spawn(service.oneshot(req).instrument(span));
    let mut res = match task.await {
        Ok(Ok(res)) => res,
        Ok(Err(never)) => match never {},
        Err(error) => {
            tracing::error!(%error, "request task failed");
            Problem::new(
                ProblemCode::Internal,
                "the gateway failed while handling this request",
            )
            .to_response()
        }
    };
    res.headers_mut().insert(X_REQUEST_ID, id);
    Ok(res)
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    fn config(upstream: &str) -> Config {
        let upstream = upstream.parse().expect("a URI");
        Config::new(upstream).listen(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    #[tokio::test]
    async fn an_upstream_the_proxy_cannot_reach_is_refused_at_start() {
        let e = Gateway::start(config("https://127.0.0.1:3000"))
            .await
            .expect_err("https upstream");
        assert!(
            matches!(e, GatewayError::Upstream(ProxyError::Scheme(_))),
            "{e:?}"
        );
        assert!(e.to_string().contains("only http://"), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_store_keeps_the_store_error_as_source() {
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        let c = config("http://127.0.0.1:3000")
            .store("redis://:hunter2@127.0.0.1:1".parse().expect("a store"));
        let e = Gateway::start(c).await.expect_err("nothing on port 1");
        let GatewayError::Store { store, .. } = &e else {
            panic!("expected a store error, got {e:?}");
        };
        assert_eq!(store, "redis://:***@127.0.0.1:1");
        let source = e.source().expect("a source");
        assert!(
            source.downcast_ref::<idem::StoreError>().is_some(),
            "{source:?}"
        );
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}
