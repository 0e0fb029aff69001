//! Async mode in `idem serve` (protocol §9): the layer's [`AsyncMode`] accepts
//! operations into the store; this instance's [`Dispatcher`] claims due
//! ones (its own and other instances') and sends them upstream through the
//! same [`Proxy`] as synchronous requests.
//!
//! The proxy is the dispatcher's [`Upstream`]: the stored request goes out
//! with its stored headers — the same `Idempotency-Key` and the accepting
//! request's `X-Request-Id` — and the proxy's failures map to the
//! dispatcher's: refused → [`DispatchError::Refused`], no answer within
//! `upstream_timeout` → [`DispatchError::Timeout`], broken after sending →
//! [`DispatchError::Reset`]. Each is another attempt.
//!
//! Every operation is dispatched with the policy of the route its stored
//! request matches now (`max_attempts`, `retry_backoff`, `store_statuses`,
//! `retention`, `upstream_timeout`), or `[defaults]`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tracing::Instrument;

use idem::asyncop::{
    AsyncConfig, DispatchError, DispatchMetrics, DispatchPolicy, Dispatcher, Upstream,
};
use idem::layer::{capture, AcceptMetrics, AsyncMode, ResponseTooLarge, UpstreamFailure};
use idem::policy::{Mode, RoutePolicy, RouteTable};
use idem::problem::{Problem, ProblemCode};
use idem::store::{AnyStore, OperationRequest, Queue, QueueStats};
use idem::{StoreError, StoredResponse};

use super::body::GatewayBody;
use super::proxy::Proxy;
use super::GatewayError;
use crate::config::{Config, StoreSpec};

/// The gateway's proxy as the dispatcher's [`Upstream`].
#[derive(Debug, Clone)]
pub struct ProxyUpstream {
    proxy: Proxy,
    routes: Arc<RouteTable>,
}

impl ProxyUpstream {
    /// Dispatches through `proxy`, whose time-outs are `routes`'.
    #[must_use]
    pub fn new(proxy: Proxy, routes: Arc<RouteTable>) -> Self {
        Self { proxy, routes }
    }
}

/// A stored request as the proxy takes it. `None` if it no longer parses
/// (a store written by something else): it was never sent.
fn rebuild(op: &OperationRequest) -> Option<Request<GatewayBody>> {
    let method = Method::from_bytes(op.method.as_bytes()).ok()?;
    let mut req = Request::builder().method(method).uri(op.uri.as_str());
    let headers = req.headers_mut()?;
    for (name, value) in &op.headers {
        let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
        let value = HeaderValue::from_maybe_shared(value.clone()).ok()?;
        headers.append(name, value);
    }
    req.body(GatewayBody::from(op.body.clone())).ok()
}

impl Upstream for ProxyUpstream {
    fn call(
        &self,
        op: Arc<OperationRequest>,
    ) -> impl Future<Output = Result<StoredResponse, DispatchError>> + Send {
        let proxy = self.proxy.clone();
        let timeout = Method::from_bytes(op.method.as_bytes()).map_or_else(
            |_| self.routes.default_policy().upstream_timeout,
            |m| {
                self.routes
                    .policy_for(&m, path_of(&op.uri))
                    .upstream_timeout
            },
        );
        let id = op
            .headers
            .iter()
            .find(|(n, _)| n == "x-request-id")
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        let span = tracing::info_span!("dispatch", id = %id, method = %op.method, path = %path_of(&op.uri));
        async move {
            let Some(req) = rebuild(&op) else {
                return Err(DispatchError::Refused(
                    "the stored request cannot be rebuilt; it was not sent".into(),
                ));
            };
            let res = match proxy.oneshot(req).await {
                Ok(res) => res,
                Err(never) => match never {},
            };
            match res.extensions().get::<UpstreamFailure>().copied() {
                Some(UpstreamFailure::Unreachable) => {
                    return Err(DispatchError::Refused(
                        "the upstream refused the connection".into(),
                    ))
                }
                Some(UpstreamFailure::Reset) => {
                    return Err(DispatchError::Reset("the upstream connection broke".into()))
                }
                Some(UpstreamFailure::Timeout) => return Err(DispatchError::Timeout(timeout)),
                None => {}
            }
            if res.extensions().get::<ResponseTooLarge>().is_some() {
                // Not read further (the connection is dropped): a final
                // answer is stored whole or not at all.
                tracing::warn!(
                    status = res.status().as_u16(),
                    "the upstream's answer is larger than max_response_body; not stored"
                );
                let problem = Problem::new(
                    ProblemCode::UpstreamUnavailable,
                    format!(
                        "the upstream answered HTTP {} with a body larger than this route's \
                         max_response_body, which cannot be stored",
                        res.status().as_u16()
                    ),
                );
                let (parts, body) = problem.to_response::<Bytes>().into_parts();
                return Ok(capture(parts.status, &parts.headers, body));
            }
            let (parts, body) = res.into_parts();
            let bytes: Bytes = body
                .collect()
                .await
                .map_err(DispatchError::Reset)?
                .to_bytes();
            Ok(capture(parts.status, &parts.headers, bytes))
        }
        .instrument(span)
    }
}

fn path_of(uri: &str) -> &str {
    uri.split_once('?').map_or(uri, |(path, _)| path)
}

/// Whether any request can be served in async mode.
fn any_async(routes: &RouteTable) -> bool {
    routes.default_policy().mode == Mode::Async
        || routes.routes().iter().any(|r| r.policy.mode == Mode::Async)
}

/// The policies of the async routes (and `[defaults]` if it is async).
fn async_policies(routes: &RouteTable) -> impl Iterator<Item = &Arc<RoutePolicy>> {
    let defaults = routes.default_policy();
    routes
        .routes()
        .iter()
        .map(|r| &r.policy)
        .chain([defaults])
        .filter(|p| p.mode == Mode::Async)
}

/// Async mode of one gateway: what the layer accepts with, the dispatcher,
/// and what `/metrics` reads.
pub(crate) struct Async {
    /// Handed to the layer.
    pub(crate) mode: AsyncMode,
    /// Read by `/metrics` and the admin's operation route.
    pub(crate) stats: Arc<AsyncStats>,
    dispatcher: Dispatcher<AnyStore, ProxyUpstream>,
}

impl Async {
    /// Starts the dispatcher: `[limits] async_workers` tasks when some
    /// route is async, none otherwise (the layer still owns `/_idem/`).
    ///
    /// # Errors
    ///
    /// The upstream cannot be proxied to; a route is async and the store
    /// has no queue ([`StoreError::Unsupported`], refused at start-up
    /// rather than answered with 503s), or does not answer.
    pub(crate) async fn start(store: &AnyStore, config: &Config) -> Result<Self, GatewayError> {
        let routes = Arc::new(config.routes.clone());
        if any_async(&routes) {
            // Also proves the queue's tables are in place.
            store
                .queue_stats()
                .await
                .map_err(|source| GatewayError::Store {
                    store: config.store.to_string(),
                    source,
                })?;
        }
        // A client pool of its own: background dispatch does not compete
        // with clients' requests for pooled connections.
        let proxy = Proxy::with_upstream_ca(
            &config.upstream,
            Arc::clone(&routes),
            config.tls.upstream_ca.as_deref(),
        )?;
        let workers = if any_async(&routes) {
            config.limits.async_workers
        } else {
            0
        };
        // One lease for every operation: the longest of the async routes',
        // so no route's operation is taken over while its call still runs.
        let lease = async_policies(&routes)
            .map(|p| p.lease)
            .max()
            .unwrap_or(routes.default_policy().lease);
        let policy_routes = Arc::clone(&routes);
        let async_config = AsyncConfig::default()
            .workers(workers)
            .lease(lease)
            .policy_for(move |op: &OperationRequest| {
                let method = Method::from_bytes(op.method.as_bytes()).unwrap_or(Method::POST);
                DispatchPolicy::from(&**policy_routes.policy_for(&method, path_of(&op.uri)))
            });
        let dispatcher = Dispatcher::spawn(
            store.clone(),
            ProxyUpstream::new(proxy, Arc::clone(&routes)),
            async_config,
        );
        let mode = AsyncMode::from_dispatcher(&dispatcher)
            .max_pending(config.limits.max_pending)
            .store_timeout(config.limits.store_timeout);
        let stats = Arc::new(AsyncStats {
            store: store.clone(),
            dispatch: Arc::clone(dispatcher.metrics()),
            accept: Arc::clone(mode.metrics()),
            workers,
            max_pending: config.limits.max_pending,
        });
        Ok(Self {
            mode,
            stats,
            dispatcher,
        })
    }

    /// Stops claiming; lets running attempts finish for up to `grace`.
    pub(crate) async fn shutdown(self, grace: Duration) {
        self.dispatcher.shutdown(grace).await;
    }
}

/// What the admin listener shows of async mode (protocol §9.8).
#[derive(Debug)]
pub struct AsyncStats {
    store: AnyStore,
    /// This instance's dispatchers.
    pub dispatch: Arc<DispatchMetrics>,
    /// This instance's accepts and status requests.
    pub accept: Arc<AcceptMetrics>,
    /// `async_workers` in effect (0 when no route is async).
    pub workers: usize,
    /// `max_pending`.
    pub max_pending: u64,
}

impl AsyncStats {
    /// The queue's depth and oldest age, shared by every instance.
    ///
    /// # Errors
    ///
    /// The store's failures.
    pub async fn queue(&self) -> Result<QueueStats, StoreError> {
        self.store.queue_stats().await
    }

    /// The operation `id`, whatever its scope (the admin is trusted).
    ///
    /// # Errors
    ///
    /// The store's failures.
    pub async fn operation(
        &self,
        id: idem::store::OperationId,
    ) -> Result<Option<idem::store::Operation>, StoreError> {
        self.store.operation(id).await
    }
}

/// One sentence of [`describe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// Worth a warning (at start-up, the log level).
    pub warning: bool,
    /// The sentence.
    pub text: String,
}

/// The start-up log's and `--check`'s sentences about async mode: the
/// async routes, `max_pending`, the dispatcher workers (or an accept-only
/// instance), and what the memory store means for operations.
#[must_use]
pub fn describe(config: &Config) -> Vec<Note> {
    let info = |text: String| Note {
        warning: false,
        text,
    };
    let warning = |text: String| Note {
        warning: true,
        text,
    };
    let routes = &config.routes;
    if !any_async(routes) {
        return Vec::new();
    }
    let mut names: Vec<String> = routes
        .routes()
        .iter()
        .filter(|r| r.policy.mode == Mode::Async)
        .map(|r| match &r.method {
            Some(m) => format!("{m} {}", r.path.as_str()),
            None => r.path.as_str().to_owned(),
        })
        .collect();
    if routes.default_policy().mode == Mode::Async {
        names.push("[defaults]".to_owned());
    }
    let l = &config.limits;
    let mut notes = vec![info(format!(
        "async mode (202 Accepted) on {}: status at /_idem/operations/{{id}}; \
         max_pending {}",
        names.join(", "),
        l.max_pending
    ))];
    notes.push(info(if l.async_workers == 0 {
        "async_workers = 0: accept-only instance; operations are dispatched by other \
         instances sharing the store"
            .to_owned()
    } else {
        format!(
            "{} dispatcher workers on this instance (async_workers); dispatch is at least \
             once, always with the accepting request's Idempotency-Key",
            l.async_workers
        )
    }));
    if config.store == StoreSpec::Memory {
        notes.push(warning(
            "store = memory: async operations live in this process only and are lost on restart"
                .to_owned(),
        ));
        if l.async_workers == 0 {
            notes.push(warning(
                "store = memory with async_workers = 0: no other instance can reach this \
                 process's operations, so none will ever be dispatched"
                    .to_owned(),
            ));
        }
    }
    notes
}
