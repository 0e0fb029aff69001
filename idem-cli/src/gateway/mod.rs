//! `idem serve`: a reverse proxy that puts the idempotency layer in front of
//! any HTTP service (protocol §8, §12).
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
//! A protected request's execution (reserve, upstream call, storing the
//! answer) is never cancelled by a client that hangs up: it runs in its
//! connection's task while the client waits, and if the client leaves
//! first, the layer moves what is left of it onto a task of its own, so
//! an upstream call already under way still has its result stored and the
//! client's retry replays it. Those tasks are spawned onto the gateway's
//! tracker ([`IdempotencyLayer::tasks`]), and shutdown waits for them. (No
//! task per request: most requests end with their client.)
//!
//! Every log line of a request, at every level, is inside an info-level
//! `request` span carrying its `X-Request-Id` (and method and path, never a
//! header's value). A request that can only pass through has its span
//! made only for a warning about its upstream, by the proxy.
//!
//! Connections, their slots and shutdown: [`conn`].

pub mod admin;
pub mod body;
pub mod conn;
pub mod dispatch;
pub mod pool;
pub mod proxy;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderName, HeaderValue, Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::{Layer, Service, ServiceExt};
use tracing::Instrument;

use idem::layer::{Idempotency, IdempotencyLayer, ResponseBody, StaleGuard};
use idem::policy::Mode;
use idem::problem::{Problem, ProblemCode};
use idem::store::memory::{MemoryLimits, MemoryStore};
use idem::store::VersionStore;
use idem::store::{AnyStore, ConnectOptions};
use idem::{Engine, EngineConfig, Store};

use crate::config::{Config, ConfigError, StoreSpec};
use crate::telemetry::TracedStore;
use crate::units::MIB;
use body::GatewayBody;
use proxy::{Proxy, ProxyBody, ProxyError};

/// The request-id header (protocol §10).
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
    /// A TLS file (`tls_cert`, `tls_key`, `store_ca`) cannot be used: the
    /// message names the file and the reason.
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    /// The store did not answer at start-up.
    #[error("cannot use the store {store}: {source}")]
    Store {
        /// The store, with any password hidden.
        store: String,
        /// Why.
        #[source]
        source: idem::StoreError,
    },
    /// The configuration breaks a rule (see [`Config::validate`]).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The listener's threads could not be started.
    #[error("cannot start the listener's threads: {0}")]
    Threads(#[source] std::io::Error),
    /// The serve loop's task failed (it panicked or was cancelled).
    #[error("the gateway task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// A running gateway (used by `idem serve`, the demo and tests).
#[derive(Debug)]
pub struct Gateway {
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Gateway {
    /// Binds `config.listen` and starts serving in the background.
    pub async fn start(config: Config) -> Result<Self, GatewayError> {
        config.validate()?;
        let listener_tls = match (&config.tls.cert, &config.tls.key) {
            (Some(cert), Some(key)) => Some(tls::ListenerTls::new(cert, key)?),
            _ => None,
        };
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
            complete_retry: config.limits.complete_retry,
            ..EngineConfig::default()
        };
        let stop = CancellationToken::new();
        let admin = match config.admin_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
        let store = open_store(&config).await?;
        for note in dispatch::describe(&config) {
            if note.warning {
                tracing::warn!("{}", note.text);
            } else {
                tracing::info!("{}", note.text);
            }
        }
        let asynchronous = dispatch::Async::start(&store, &config).await?;
        // Store calls are spans when traces are exported (protocol §14).
        // The listener threads pin their own connections to it.
        let shared_store = store.clone();
        let engine = Engine::with_config(TracedStore::new(store), engine_config);
        let protocols = config.listener_protocols();
        if let Some(tls) = &listener_tls {
            tls.clone().reload_on_sighup(stop.clone());
        }
        let serve = Serve {
            listener,
            tls: listener_tls,
            admin,
            store: shared_store,
        };
        let tasks = spawn_serve(serve, engine, config, stop.clone(), asynchronous)?;
        tracing::info!(%local_addr, %protocols, "idem gateway listening");
        if let Some(addr) = admin_addr {
            tracing::info!(
                %addr,
                "admin listener (healthz, readyz, metrics, records; plain HTTP/1.1)"
            );
        }
        Ok(Self {
            local_addr,
            admin_addr,
            shutdown: stop,
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
    /// results (up to `shutdown_grace`), including those whose client hung
    /// up, then returns.
    pub async fn shutdown(self) -> Result<(), GatewayError> {
        self.shutdown.cancel();
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

/// Reaches the configured store, then lets it go: `idem serve --check`
/// runs this so that "configuration OK" also means "the store answers".
/// The memory store has nothing to connect to. PostgreSQL is only looked
/// at (nothing is created): the answer says whether its schema and table
/// are in place. Returns what to print after the store's name.
///
/// # Errors
///
/// [`GatewayError::Store`] when the store does not answer in time.
pub async fn check_store(config: &Config) -> Result<String, GatewayError> {
    match &config.store {
        StoreSpec::Memory => Ok("in this process".to_owned()),
        // PostgreSQL is only looked at: connecting would create the schema
        // and table, and a check must change nothing.
        StoreSpec::Postgres(url) => postgres_check(config, url)
            .await
            .map(|status| format!("answered; {status}")),
        StoreSpec::Redis(_) => open_store(config).await.map(|_| "answered".to_owned()),
    }
}

/// The PostgreSQL half of [`check_store`].
async fn postgres_check(
    config: &Config,
    url: &idem::store::StoreUrl,
) -> Result<idem::store::postgres::SchemaStatus, GatewayError> {
    let mut builder = idem::store::postgres::PostgresStore::builder(url.as_str())
        .timeout(config.limits.store_timeout);
    if let Some(ca) = &config.tls.store_ca {
        builder = builder.tls_ca(tls::read_ca_pem(ca)?);
    }
    builder.check().await.map_err(|source| GatewayError::Store {
        store: config.store.to_string(),
        source,
    })
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
            let mut options = ConnectOptions::new().timeout(config.limits.store_timeout);
            if let Some(ca) = &config.tls.store_ca {
                options = options.tls_ca(tls::read_ca_pem(ca)?);
            }
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

/// The listeners [`spawn_serve`] serves.
struct Serve {
    listener: TcpListener,
    tls: Option<tls::ListenerTls>,
    admin: Option<TcpListener>,
    /// The store the engine wraps.
    store: AnyStore,
}

fn spawn_serve<S: Store + VersionStore + Clone>(
    Serve {
        listener,
        tls,
        admin,
        store: shared_store,
    }: Serve,
    engine: Engine<S>,
    config: Config,
    stop: CancellationToken,
    asynchronous: dispatch::Async,
) -> Result<Vec<JoinHandle<()>>, GatewayError> {
    let routes = Arc::new(config.routes.clone());
    let proxy = Proxy::with_upstream_ca(
        &config.upstream,
        Arc::clone(&routes),
        config.tls.upstream_ca.as_deref(),
    )?;
    // Routes with a stale-event guard keep their versions in the same store.
    let stale_guard =
        StaleGuard::new(engine.store().clone()).store_timeout(config.limits.store_timeout);
    let requests = TaskTracker::new();
    let layer = IdempotencyLayer::new(engine.clone(), config.routes.clone())
        .async_mode(asynchronous.mode.clone())
        .stale_guard(stale_guard)
        .tasks(requests.clone());
    // Each thread has its own upstream pool.
    let threads = conn::threads(listener, config.limits.io_threads(), || {
        layer.layer(proxy.with_own_pool())
    })
    .map_err(GatewayError::Threads)?;
    let edge = Arc::new(Edge {
        read_timeout: config.limits.request_read_timeout,
        drain_limit: drain_limit(&config.routes),
        requests,
    });
    let running = conn::start(
        threads,
        routes,
        edge,
        &config.limits,
        tls,
        &shared_store,
        stop.clone(),
    )
    .map_err(GatewayError::Threads)?;
    let mut tasks = Vec::with_capacity(3);
    if let (Some(listener), Some(token)) = (admin, config.admin_token.clone()) {
        let app = admin::router(engine.clone(), token, Some(Arc::clone(&asynchronous.stats)));
        let stop = stop.clone().cancelled_owned();
        tasks.push(tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::error!(%error, "admin listener failed");
            }
        }));
    }
    // The dispatchers stop with the listener and get the same grace.
    let (stopping, grace) = (stop.clone(), config.limits.shutdown_grace);
    tasks.push(tokio::spawn(async move {
        stopping.cancelled().await;
        asynchronous.shutdown(grace).await;
    }));
    tasks.push(tokio::spawn(running.finish()));
    Ok(tasks)
}

/// What [`handle`] needs besides the service and the routes.
#[derive(Debug)]
pub(crate) struct Edge {
    /// `request_read_timeout`, for the body.
    read_timeout: Duration,
    /// Bytes of a refused body read and discarded so its client can read
    /// the answer (see [`body`]).
    drain_limit: u64,
    /// Request executions that outlive their client (the layer's, and the
    /// accepting of async operations), which shutdown waits for.
    requests: TaskTracker,
}

/// The most of a refused body the gateway reads and discards: the larger of
/// 1 MiB and 4 × the largest `max_body` (as nginx keeps reading after a
/// 413, where most servers reset the connection).
fn drain_limit(routes: &idem::RouteTable) -> u64 {
    let largest = routes
        .routes()
        .iter()
        .map(|r| r.policy.max_body)
        .chain([routes.default_policy().max_body])
        .max()
        .unwrap_or(0);
    largest.saturating_mul(4).max(MIB)
}

fn request_id(headers: &http::HeaderMap) -> HeaderValue {
    headers
        .get(&X_REQUEST_ID)
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty() && b.len() <= 200 && b.iter().all(|c| (0x21..=0x7e).contains(c))
        })
        .cloned()
        .unwrap_or_else(random_id)
}

/// A 128-bit random id in 32 lower-case hex digits (always a valid header
/// value), written without going through `format!`.
fn random_id() -> HeaderValue {
    let mut hex = [0u8; 32];
    crate::telemetry::write_hex(&mut hex, &rand::random::<u128>().to_be_bytes());
    HeaderValue::from_bytes(&hex).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// A request's span: info level, so that warnings and errors carry its id
/// (`-` without a printable one) at the default filter. Fields are the id,
/// method and path: never another header's value.
pub(super) fn request_span(
    id: Option<&HeaderValue>,
    method: &http::Method,
    path: &str,
) -> tracing::Span {
    let id = id.and_then(|v| v.to_str().ok()).unwrap_or("-");
    tracing::info_span!("request", id = %id, method = %method, path = %path)
}

/// One request: its id, its span, its task (if it takes part), and what is
/// left of a body the layer stopped reading.
async fn handle<S: Store>(
    service: Idempotency<Proxy, S>,
    routes: Arc<idem::RouteTable>,
    edge: Arc<Edge>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody<ProxyBody>>, Infallible> {
    let (mut parts, body) = req.into_parts();
    let id = request_id(&parts.headers);
    parts.headers.insert(X_REQUEST_ID, id.clone());
    // A request that can only pass through writes no line in its span,
    // and making one cost a GET 14 % of its instructions at the default
    // level: its span is made only if a warning needs it, by the proxy
    // ([`EdgeTrace::defer_span`](crate::telemetry::EdgeTrace::defer_span)).
    // Made now for a method that may be guarded (its line is written in
    // it), when spans are exported or debug lines written, and for a path
    // that is the layer's own (`/_idem/`, in any spelling). Below
    // `info` the span is never made: nothing to defer. Debug enabled for
    // anything at all (a dependency, a span name) keeps it too: a debug
    // line written while the request is handled carries its span.
    let deferred = tracing::level_filters::LevelFilter::current()
        <= tracing::level_filters::LevelFilter::INFO
        && tracing::enabled!(tracing::Level::INFO)
        && !crate::telemetry::exporting()
        && !routes.may_participate(&parts.method)
        && !idem::layer::is_reserved(parts.uri.path());
    let span = if deferred {
        tracing::Span::none()
    } else {
        request_span(Some(&id), &parts.method, parts.uri.path())
    };
    // W3C trace context, continued (protocol §14). Never `None` when the
    // span was deferred (that is without export).
    if let Some(mut trace) = crate::telemetry::continue_trace(&span, &mut parts.headers) {
        if deferred {
            trace.defer_span();
        }
        parts.extensions.insert(trace);
    }
    // Normalizes the path and matches it once; the layer and the proxy
    // read the match from the request's extensions.
    let found = idem::layer::route(&routes, &mut parts);
    let expects_continue = parts.headers.contains_key(header::EXPECT);
    let (body, leftover) = GatewayBody::incoming_with_leftover(body, edge.read_timeout);
    let req = Request::from_parts(parts, body);
    // Called at once rather than through `oneshot`, whose future would
    // hold the request and the service until its first poll, to be moved
    // with them (the proxy, and so the layer, is always ready).
    let mut service = service;
    let call = match ServiceExt::<Request<GatewayBody>>::ready(&mut service).await {
        // In the span: a refusal is logged as the call is made. A panic
        // there gets a 500, as one while the call runs does.
        Ok(ready) => panic::catch_unwind(AssertUnwindSafe(|| span.in_scope(|| ready.call(req)))),
        Err(never) => match never {},
    };
    let call = match call {
        Ok(call) => call,
        Err(panic) => {
            let error = panic_message(&*panic);
            span.in_scope(|| tracing::error!(error, "request task failed"));
            return Ok(finish(
                internal(),
                id,
                leftover,
                &edge,
                expects_continue,
                span,
            ));
        }
    };
    if !found.participates() {
        // Pass-through: nothing is stored, so nothing is lost if the client
        // hangs up and the call is dropped; no task needed.
        let res = match call.instrument(span.clone()).await {
            Ok(res) => res,
            Err(never) => match never {},
        };
        return Ok(finish(res, id, leftover, &edge, expects_continue, span));
    }
    let call = call.instrument(span.clone());
    let res = if found.policy().mode == Mode::Async {
        // Accepting an async operation stores its request: its own task,
        // so a client hanging up cannot cut that short. Tracked: shutdown
        // waits for it.
        match edge.requests.spawn(call).await {
            Ok(Ok(res)) => Ok(res),
            Ok(Err(never)) => match never {},
            Err(error) if error.is_panic() => Err(error.into_panic()),
            Err(error) => {
                span.in_scope(|| tracing::error!(%error, "request task failed"));
                Ok(internal())
            }
        }
    } else {
        // The execution (reserve, upstream call, storing its answer) runs
        // here; dropped before its end (the client hung up), the layer
        // moves the rest of it onto a task of `edge.requests`
        // ([`IdempotencyLayer::tasks`]): a client hanging up does not
        // cancel it and shutdown waits for it.
        match (CatchUnwind { future: call }).await {
            Ok(Ok(res)) => Ok(res),
            Ok(Err(never)) => match never {},
            Err(panic) => Err(panic),
        }
    };
    let res = res.unwrap_or_else(|panic| {
        let error = panic_message(&*panic);
        span.in_scope(|| tracing::error!(error, "request task failed"));
        internal()
    });
    Ok(finish(res, id, leftover, &edge, expects_continue, span))
}

/// The 500 of a request whose handling panicked.
fn internal<B: From<bytes::Bytes>>() -> Response<B> {
    Problem::new(
        ProblemCode::Internal,
        "the gateway failed while handling this request",
    )
    .to_response()
}

/// What a panic said, for the log.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("panicked")
}

pin_project_lite::pin_project! {
    /// Polls `future`, catching a panic as `Err(payload)`: a request whose
    /// handling panics gets a 500 rather than a closed connection.
    struct CatchUnwind<F> {
        #[pin]
        future: F,
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let future = self.project().future;
        // Unwind safety: a future that panicked is never polled again.
        match panic::catch_unwind(AssertUnwindSafe(|| future.poll(cx))) {
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Ok(std::task::Poll::Ready(output)) => std::task::Poll::Ready(Ok(output)),
            Err(panic) => std::task::Poll::Ready(Err(panic)),
        }
    }
}

/// The response as it leaves: with its `X-Request-Id`, and the rest of a
/// body the layer did not read drained (see [`drain_rest`]).
fn finish<B>(
    mut res: Response<B>,
    id: HeaderValue,
    leftover: Option<oneshot::Receiver<body::Leftover>>,
    edge: &Edge,
    expects_continue: bool,
    span: tracing::Span,
) -> Response<B> {
    res.headers_mut().insert(X_REQUEST_ID, id);
    if let Some(rest) = leftover.and_then(|mut rx| rx.try_recv().ok()) {
        drain_rest(rest, &mut res, edge.drain_limit, expects_continue, span);
    }
    res
}

/// A body the layer stopped reading (refused as too large, or answered
/// before it was needed): read and discard the rest while the answer goes
/// out, so the client, still sending, reads the answer rather than a reset.
/// Past `limit` bytes or the read deadline, give up: hyper closes.
fn drain_rest<B>(
    rest: body::Leftover,
    res: &mut Response<B>,
    limit: u64,
    expects_continue: bool,
    span: tracing::Span,
) {
    // `Expect: 100-continue` and never read: the client waits for a
    // go-ahead it will not get; reading would only ask it for a body nobody
    // wants. (Once read, hyper has sent the go-ahead and the body comes.)
    if (expects_continue && !rest.started()) || rest.at_least() > limit {
        return;
    }
    // A small rest is drained and the connection kept; a large or unknown
    // one ends the connection once drained, as nginx does.
    if rest.at_least() > KEEP_ALIVE_DRAIN || rest.at_least() == 0 {
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    tokio::spawn(
        async move {
            if !body::drain(rest, limit).await {
                tracing::debug!(
                    limit,
                    "gave up draining a request body; closing the connection"
                );
            }
        }
        .instrument(span),
    );
}

/// Below this, what is left of a refused body is read and the connection
/// kept open; above it, the connection closes once it is read.
const KEEP_ALIVE_DRAIN: u64 = 64 * 1024;

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
        let e = Gateway::start(config("ftp://127.0.0.1:3000"))
            .await
            .expect_err("ftp upstream");
        assert!(
            matches!(e, GatewayError::Upstream(ProxyError::Scheme(_))),
            "{e:?}"
        );
        assert!(e.to_string().contains("only http:// and https://"), "{e}");
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
