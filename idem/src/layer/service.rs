use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower_service::Service;

use super::{capture, replay, ResponseBody, UpstreamFailure, IDEMPOTENCY_KEY};
use crate::engine::{Action, Engine, Finish, Outcome, Rules};
use crate::fingerprint::{fingerprint, FingerprintOptions};
use crate::key::{self, Scope, StoreKey};
use crate::policy::{Ambiguous, KeyPolicy, RoutePolicy, RouteTable};
use crate::problem::{Problem, ProblemCode};
use crate::store::{BoxError, Store};

/// Middleware that runs participating requests at most once per key.
/// Built by [`IdempotencyLayer`](super::IdempotencyLayer).
#[derive(Debug)]
pub struct Idempotency<Svc, St> {
    inner: Svc,
    engine: Engine<St>,
    routes: Arc<RouteTable>,
}

impl<Svc: Clone, St> Clone for Idempotency<Svc, St> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            engine: self.engine.clone(),
            routes: Arc::clone(&self.routes),
        }
    }
}

impl<Svc, St> Idempotency<Svc, St> {
    /// Wraps `inner`.
    #[must_use]
    pub fn new(inner: Svc, engine: Engine<St>, routes: Arc<RouteTable>) -> Self {
        Self {
            inner,
            engine,
            routes,
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<Svc, St, ReqB, ResB> Service<Request<ReqB>> for Idempotency<Svc, St>
where
    Svc: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    Svc::Future: Send + 'static,
    Svc::Error: Send + 'static,
    ReqB: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
    St: Store,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = Svc::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // Use the service that was driven to readiness; leave a clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(policy) = self
            .routes
            .classify(req.method(), req.uri().path())
            .cloned()
        else {
            return Box::pin(passthrough(inner, req));
        };
        let engine = self.engine.clone();
        Box::pin(async move {
            let key = match key::from_header_values(req.headers().get_all(IDEMPOTENCY_KEY)) {
                Ok(Some(k)) if k.as_str().len() > policy.max_key_length => {
                    return Ok(problem(
                        ProblemCode::KeyInvalid,
                        &format!(
                            "the key is {} characters long; this route's limit is {}",
                            k.as_str().len(),
                            policy.max_key_length
                        ),
                    ))
                }
                Ok(k) => k,
                Err(e) => return Ok(problem(ProblemCode::KeyInvalid, e.reason())),
            };
            if key.is_none() {
                match policy.key {
                    KeyPolicy::Required => {
                        return Ok(problem(
                            ProblemCode::KeyMissing,
                            "this route requires an Idempotency-Key header",
                        ))
                    }
                    KeyPolicy::Optional => return passthrough(inner, req).await,
                    KeyPolicy::Derived => {}
                }
            }
            let (parts, body) = req.into_parts();
            let bytes = match read_body(&parts.headers, body, policy.max_body).await {
                Ok(b) => b,
                Err(p) => return Ok(p.to_response()),
            };
            let fp = fingerprint(
                &parts.method,
                &parts.uri,
                &parts.headers,
                &bytes,
                &FingerprintOptions {
                    headers: &policy.fingerprint_headers,
                    canonical_json: policy.canonical_json,
                    ignore_json_pointers: &policy.ignore_json_pointers,
                },
            );
            let scope = Scope::from_headers(&parts.headers, &policy.scope_headers);
            let mut rules = Rules::from(&*policy);
            let store_key = match &key {
                Some(k) => StoreKey::new(&scope, k.as_str()),
                None => {
                    rules.retention = policy.dedupe_window;
                    StoreKey::new(&scope, &format!("derived:{}", fp.to_hex()))
                }
            };
            let op = || async move {
                let req = Request::from_parts(parts, ReqB::from(bytes));
                execute(&mut inner, req, &policy).await
            };
            match engine.run(&store_key, fp, &rules, op).await {
                Outcome::Executed(r) | Outcome::Bypassed(r) => r,
                Outcome::Replayed(record) => Ok(replay(&record.response)),
                Outcome::InProgress { retry_after } => Ok(Problem::new(
                    ProblemCode::KeyInProgress,
                    "a request with this Idempotency-Key is still being processed; retry later",
                )
                .retry_after(retry_after)
                .to_response()),
                Outcome::Mismatch => Ok(problem(
                    ProblemCode::KeyReused,
                    "this Idempotency-Key was already used with a different request \
                     (method, path, selected headers or body differ); use a new key",
                )),
                Outcome::StoreUnavailable { .. } => Ok(Problem::new(
                    ProblemCode::StoreUnavailable,
                    "the idempotency store cannot be reached; nothing was executed",
                )
                .retry_after(std::time::Duration::from_secs(1))
                .to_response()),
            }
        })
    }
}

fn problem<B: From<Bytes>>(code: ProblemCode, detail: &str) -> Response<B> {
    Problem::new(code, detail).to_response()
}

async fn passthrough<Svc, ReqB, ResB>(
    mut inner: Svc,
    req: Request<ReqB>,
) -> Result<Response<ResponseBody<ResB>>, Svc::Error>
where
    Svc: Service<Request<ReqB>, Response = Response<ResB>>,
{
    let res = inner.call(req).await?;
    Ok(res.map(|body| ResponseBody::Inner { body }))
}

/// Reads the whole body, refusing it (413) as soon as it exceeds `max`.
async fn read_body<B>(headers: &http::HeaderMap, body: B, max: u64) -> Result<Bytes, Problem>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let too_large = || {
        Problem::new(
            ProblemCode::BodyTooLarge,
            format!("the request body is larger than this route's limit of {max} bytes"),
        )
    };
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(too_large());
    }
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(_) => Err(Problem::new(
            ProblemCode::BodyUnreadable,
            "the request body could not be read completely",
        )),
    }
}

/// Calls the inner service and decides what the store keeps (SPEC §3.9).
async fn execute<Svc, ReqB, ResB>(
    inner: &mut Svc,
    req: Request<ReqB>,
    policy: &RoutePolicy,
) -> Finish<Result<Response<ResponseBody<ResB>>, Svc::Error>>
where
    Svc: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    let res = match inner.call(req).await {
        Ok(res) => res,
        Err(e) => {
            return Finish {
                output: Err(e),
                action: Action::Release,
            }
        }
    };
    let failure = res.extensions().get::<UpstreamFailure>().copied();
    let (parts, body) = res.into_parts();
    let bytes = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            return Finish {
                output: Ok(problem(
                    ProblemCode::UpstreamUnavailable,
                    "the response body failed while it was being read",
                )),
                action: Action::Release,
            }
        }
    };
    let stored = || capture(parts.status, &parts.headers, bytes.clone());
    let action = match failure {
        Some(UpstreamFailure::Unreachable) => Action::Release,
        Some(UpstreamFailure::Timeout | UpstreamFailure::Reset) => match policy.ambiguous {
            Ambiguous::Hold => Action::Hold,
            Ambiguous::Release => Action::Release,
            Ambiguous::Store => Action::Store(stored()),
        },
        None if policy.store_statuses.contains(parts.status.as_u16()) => Action::Store(stored()),
        None => Action::Release,
    };
    Finish {
        output: Ok(Response::from_parts(parts, ResponseBody::full(bytes))),
        action,
    }
}
