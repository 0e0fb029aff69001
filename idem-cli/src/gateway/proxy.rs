//! The upstream phase: forward one request to the upstream over a pooled
//! connection ([`super::pool`]), buffer a participating request's answer
//! up to the route's `max_response_body` (once: the layer reads that
//! buffer, never a copy), and classify failures by source (protocol §3.9):
//! refused before sending → `Unreachable` (502, released);
//! no answer in time → `Timeout` (504, ambiguous);
//! broken after sending → `Reset` (502, ambiguous).
//!
//! `https://` upstreams are reached with rustls (system roots plus
//! `upstream_ca`); a failed handshake is a refused connection. The gateway
//! speaks HTTP/1.1 to its upstream, in TLS or not: keep-alive connections
//! are pooled, and a request never waits behind another's stream. A
//! request that finds its pooled connection closed before it was written
//! goes out on another; one that was written is never sent again.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::Entry;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::HeaderValue;
use http::{Request, Response, Uri};
use http_body_util::{Either, Full};
use tower_service::Service;
use tracing::instrument::Instrumented;
use tracing::Instrument;

use idem::layer::{
    buffer, strip_hop_by_hop, Buffered, Prefixed, ResponseTooLarge, UpstreamFailure,
};
use idem::problem::{Problem, ProblemCode};
use idem::RouteTable;

use super::body::GatewayBody;
use super::pool::{Pool, SendError, UpstreamBody};

/// The body of an upstream response: streamed (pass-through requests, and
/// answers larger than `max_response_body`, after the part read while
/// buffering) or buffered within the upstream time-out (participating
/// requests).
pub type ProxyBody = Either<Prefixed<UpstreamBody>, Full<Bytes>>;

/// Why a [`Proxy`] cannot be built for an upstream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The upstream URL names no host.
    #[error("upstream `{0}` has no host")]
    NoHost(Uri),
    /// Neither `http://` nor `https://`.
    #[error("upstream `{0}`: only http:// and https:// upstreams are supported")]
    Scheme(Uri),
    /// The TLS settings for an `https://` upstream cannot be built
    /// (`upstream_ca` unreadable or holding no certificate).
    #[error("upstream TLS: {0}")]
    Tls(String),
}

/// Forwards requests to one upstream. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Proxy {
    inner: Arc<ProxyInner>,
}

#[derive(Debug)]
struct ProxyInner {
    pool: Arc<Pool>,
    authority: Authority,
    routes: Arc<RouteTable>,
}

impl Proxy {
    /// A proxy to `upstream` (`http://host:port`), using `routes` for
    /// per-route upstream time-outs and response limits (when a request
    /// does not already carry its [`RouteMatch`](idem::layer::RouteMatch)).
    ///
    /// # Errors
    ///
    /// [`ProxyError`] if `upstream` is not a plain-HTTP URL with a host
    /// (the configuration file refuses those already; a [`Config`] built in
    /// code may hold one).
    ///
    /// [`Config`]: crate::config::Config
    pub fn new(upstream: &Uri, routes: Arc<RouteTable>) -> Result<Self, ProxyError> {
        Self::with_upstream_ca(upstream, routes, None)
    }

    /// As [`new`](Self::new), for `http://` or `https://` upstreams; an
    /// `https://` one is checked against the system's roots plus the
    /// certificates in `upstream_ca` (PEM).
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new), and [`ProxyError::Tls`] when `upstream_ca`
    /// cannot be used.
    pub fn with_upstream_ca(
        upstream: &Uri,
        routes: Arc<RouteTable>,
        upstream_ca: Option<&std::path::Path>,
    ) -> Result<Self, ProxyError> {
        let authority = upstream
            .authority()
            .cloned()
            .ok_or_else(|| ProxyError::NoHost(upstream.clone()))?;
        if upstream
            .scheme()
            .is_some_and(|s| *s != Scheme::HTTP && *s != Scheme::HTTPS)
        {
            return Err(ProxyError::Scheme(upstream.clone()));
        }
        let mut target = http::uri::Parts::default();
        target.scheme = Some(upstream.scheme().cloned().unwrap_or(Scheme::HTTP));
        target.authority = Some(authority.clone());
        target.path_and_query = Some(PathAndQuery::from_static("/"));
        let target = Uri::from_parts(target).map_err(|_| ProxyError::NoHost(upstream.clone()))?;
        let pool = Pool::new(target, upstream_ca).map_err(ProxyError::Tls)?;
        Ok(Self {
            inner: Arc::new(ProxyInner {
                pool,
                authority,
                routes,
            }),
        })
    }

    /// The same proxy with a connection pool of its own: each of the
    /// gateway's threads keeps its upstream connections to itself, so a
    /// request, its upstream connection and its pool are on one thread
    /// (see [`super::conn`]).
    #[must_use]
    pub fn with_own_pool(&self) -> Self {
        let inner = &self.inner;
        Self {
            inner: Arc::new(ProxyInner {
                pool: inner.pool.empty_copy(),
                authority: inner.authority.clone(),
                routes: Arc::clone(&inner.routes),
            }),
        }
    }

    /// `span_deferred`: the edge left the request's span to be made here,
    /// should a warning need it.
    async fn forward(self, req: Request<GatewayBody>, span_deferred: bool) -> Response<ProxyBody> {
        let inner = &self.inner;
        // What that span names; boxed, not to size every call's future.
        let deferred = span_deferred.then(|| {
            Box::new((
                req.headers().get(super::X_REQUEST_ID).cloned(),
                req.method().clone(),
                req.uri().clone(),
            ))
        });
        // Matched once per request, before the layer ran: carried in the
        // extensions (resolved here only when the proxy is used alone).
        let (mut head, body) = req.into_parts();
        let found = idem::layer::route(&inner.routes, &mut head);
        let mut req = Request::from_parts(head, body);
        let policy = Arc::clone(found.policy());
        let buffered = found.participates();
        // An HTTP/2 request names its host in `:authority`, not `Host`;
        // the upstream speaks HTTP/1.1 and sees it as `Host`, as it would
        // from an HTTP/1.1 client.
        http1_to_upstream(&mut req);
        // Origin-form: the connection already goes to the upstream.
        if req.uri().scheme().is_some() || req.uri().path_and_query().is_none() {
            let path = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            *req.uri_mut() = Uri::from(path);
        }
        if let Entry::Vacant(host) = req.headers_mut().entry(http::header::HOST) {
            match HeaderValue::from_str(inner.authority.as_str()) {
                Ok(value) => {
                    host.insert(value);
                }
                Err(_) => {
                    return failure(
                        UpstreamFailure::Unreachable,
                        "cannot name the upstream in a Host header",
                    )
                }
            }
        }
        strip_hop_by_hop(req.headers_mut());
        let timeout = policy.upstream_timeout;
        let call = async {
            let res = inner.pool.send(req).await?;
            if !buffered {
                return Ok(res.map(|body| Either::Left(Prefixed::new(Vec::new(), body))));
            }
            // Hop-by-hop headers go once the call is done, below.
            let (parts, body) = res.into_parts();
            match buffer(body, policy.max_response_body)
                .await
                .map_err(SendError::Broken)?
            {
                Buffered::Whole(bytes) => {
                    Ok::<_, SendError>(Response::from_parts(parts, Either::Right(Full::new(bytes))))
                }
                // The rest is streamed to the client, past the upstream
                // time-out as a pass-through answer is; the layer stores
                // nothing and releases the key.
                Buffered::TooLarge(rest) => {
                    let mut res = Response::from_parts(parts, Either::Left(rest));
                    res.extensions_mut().insert(ResponseTooLarge);
                    Ok(res)
                }
            }
        };
        // `None`: no answer within the time-out.
        let failed = match tokio::time::timeout(timeout, call).await {
            Ok(Ok(mut res)) => {
                strip_hop_by_hop(res.headers_mut());
                return res;
            }
            Ok(Err(e)) => Some(e),
            Err(_) => None,
        };
        // Warned about in the request's span (made now if the edge
        // deferred it).
        let _span = deferred.map(|head| {
            let (id, method, uri) = *head;
            super::request_span(id.as_ref(), &method, uri.path()).entered()
        });
        match failed {
            Some(SendError::Unsent(e)) => {
                // The cause (refused, a certificate it does not trust…) is
                // in the source chain, not in the outer message.
                let error = error_chain(&*e);
                tracing::warn!(%error, "upstream refused the connection");
                failure(
                    UpstreamFailure::Unreachable,
                    "the upstream refused the connection; the request was not sent",
                )
            }
            Some(SendError::Broken(e)) => {
                tracing::warn!(error = %e, "upstream connection broke after the request was sent");
                failure(
                    UpstreamFailure::Reset,
                    "the upstream connection broke after the request was sent; \
                     the outcome is unknown",
                )
            }
            None => {
                tracing::warn!(?timeout, "upstream timed out");
                failure(
                    UpstreamFailure::Timeout,
                    &format!(
                        "the upstream did not answer within {}s; the outcome is unknown",
                        timeout.as_secs_f64()
                    ),
                )
            }
        }
    }
}

/// Makes a request from an HTTP/2 client one for the HTTP/1.1 upstream:
/// the version, and `Host` from `:authority` when the client sent none.
fn http1_to_upstream<B>(req: &mut Request<B>) {
    if req.version() != http::Version::HTTP_2 {
        return;
    }
    *req.version_mut() = http::Version::HTTP_11;
    if !req.headers().contains_key(http::header::HOST) {
        if let Some(host) = req
            .uri()
            .authority()
            .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(http::header::HOST, host);
        }
    }
}

/// `outer: cause: cause…`, each once.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

fn failure(kind: UpstreamFailure, detail: &str) -> Response<ProxyBody> {
    let code = match kind {
        UpstreamFailure::Timeout => ProblemCode::UpstreamTimeout,
        UpstreamFailure::Unreachable | UpstreamFailure::Reset => ProblemCode::UpstreamUnavailable,
    };
    let mut res: Response<Full<Bytes>> = Problem::new(code, detail).to_response();
    res.extensions_mut().insert(kind);
    res.map(Either::Right)
}

/// The future of [`Proxy::call`]: the forwarding, boxed once where it is
/// made (a future of a few KB: each move copies it whole), in its
/// `upstream` span, which records the status it ends with.
pub struct ProxyFuture(Instrumented<Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>>>);

impl Future for ProxyFuture {
    type Output = Result<Response<ProxyBody>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let res = ready!(Pin::new(&mut self.0).poll(cx));
        crate::telemetry::upstream_answered(self.0.span(), res.status());
        Poll::Ready(Ok(res))
    }
}

impl std::fmt::Debug for ProxyFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyFuture").finish_non_exhaustive()
    }
}

impl Service<Request<GatewayBody>> for Proxy {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = ProxyFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<GatewayBody>) -> Self::Future {
        // W3C trace context, continued upstream (protocol §14).
        let edge = req
            .extensions()
            .get::<crate::telemetry::EdgeTrace>()
            .copied();
        let span = crate::telemetry::upstream_span(req.headers_mut(), edge);
        let forward: Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>> = Box::pin(
            self.clone()
                .forward(req, edge.is_some_and(|e| e.span_deferred())),
        );
        ProxyFuture(forward.instrument(span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(upstream: &str) -> Result<Proxy, ProxyError> {
        let routes = Arc::new(RouteTable::new(idem::RoutePolicy::default()));
        Proxy::new(&upstream.parse().expect("a URI"), routes)
    }

    #[test]
    fn only_http_and_https_upstreams_with_a_host() {
        assert!(proxy("http://127.0.0.1:3000").is_ok());
        assert!(proxy("https://api.example").is_ok());
        assert!(matches!(
            proxy("ftp://api.example"),
            Err(ProxyError::Scheme(_))
        ));
        assert!(matches!(proxy("/just/a/path"), Err(ProxyError::NoHost(_))));
    }
}
