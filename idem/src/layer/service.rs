//! [`Idempotency`], the service, and the phases of one request through it:
//!
//! 1. **resolve** route and key (synchronous, in `call`): the path in normal
//!    form and its route ([`route`](super::route())), then the key
//!    ([`resolve`]): pass through, refuse (400), or guard;
//! 2. **read body**, bounded by the route's `max_body` ([`read_body`]);
//! 3. **fingerprint**: storage key, fingerprint and rules ([`identify`]);
//! 4. **run**: the engine reserves and runs the inner service at most once
//!    ([`execute::run`](super::execute::run)); or, on an async route with
//!    an [`AsyncMode`], **accept** the operation for a dispatcher
//!    ([`operations`](super::operations));
//! 5. **respond**: one answer per engine outcome
//!    ([`respond`](super::response::respond)).

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio_util::task::TaskTracker;
use tower_service::Service;

use super::execute;
use super::future::ResponseFuture;
use super::log;
use super::operations::{self, AsyncMode};
use super::response::respond;
use super::route::{route, RouteMatch};
use super::stale::{self, StaleGuard};
use super::ResponseBody;
use crate::engine::{Engine, Rules};
use crate::fingerprint::{fingerprint, Fingerprint, FingerprintOptions};
use crate::key::{self, IdempotencyKey, Scope, StoreKey};
use crate::policy::{KeyPolicy, Mode, RoutePolicy, RouteTable};
use crate::problem::{Problem, ProblemCode};
use crate::store::{BoxError, Store};

/// Middleware that runs participating requests at most once per key.
/// Built by [`IdempotencyLayer`](super::IdempotencyLayer).
#[derive(Debug)]
pub struct Idempotency<Svc, St> {
    inner: Svc,
    engine: Engine<St>,
    routes: Arc<RouteTable>,
    extras: Extras,
}

/// What a service holds beyond its engine and routes, set by the builder
/// methods of [`Idempotency`] and of the layer, which hands its own to
/// every service it builds.
#[derive(Debug, Clone, Default)]
pub(super) struct Extras {
    pub(super) async_mode: Option<AsyncMode>,
    pub(super) tasks: Option<TaskTracker>,
    pub(super) stale_guard: Option<StaleGuard>,
}

impl<Svc: Clone, St> Clone for Idempotency<Svc, St> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            engine: self.engine.clone(),
            routes: Arc::clone(&self.routes),
            extras: self.extras.clone(),
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
            extras: Extras::default(),
        }
    }

    /// The layer's extras, for every service it builds.
    pub(super) fn with_extras(mut self, extras: Extras) -> Self {
        self.extras = extras;
        self
    }

    /// Keeps the versions of routes with a stale-event guard in `guard`'s
    /// store (protocol §13; see [`StaleGuard`]).
    #[must_use]
    pub fn stale_guard(mut self, guard: StaleGuard) -> Self {
        self.extras.stale_guard = Some(guard);
        self
    }

    /// Serves `mode = "async"` routes with 202 Accepted, and `/_idem/`
    /// (see [`AsyncMode`]).
    #[must_use]
    pub fn async_mode(mut self, mode: AsyncMode) -> Self {
        self.extras.async_mode = Some(mode);
        self
    }

    /// Counts each guarded request's execution on `tasks` from its start,
    /// and spawns what is left of it when its client leaves onto `tasks`
    /// rather than onto a bare Tokio task, so that a server can wait, at
    /// shutdown, for the executions still running, its clients there or
    /// not (`tasks.close()`, then `tasks.wait()`); see
    /// [`IdempotencyLayer::tasks`](super::IdempotencyLayer::tasks).
    #[must_use]
    pub fn tasks(mut self, tasks: TaskTracker) -> Self {
        self.extras.tasks = Some(tasks);
        self
    }
}

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
    type Future = ResponseFuture<Svc::Future, ResB, Svc::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        if let Some(mode) = &self.extras.async_mode {
            // Before the route: `/_idem/` belongs to the layer whatever the
            // method, and the check normalizes the path itself.
            if operations::is_reserved(parts.uri.path()) {
                let (mode, routes) = (mode.clone(), Arc::clone(&self.routes));
                drop(body);
                return ResponseFuture::guarded(Box::pin(async move {
                    Ok(operations::status(&mode, &routes, &parts).await)
                }));
            }
        }
        let found = route(&self.routes, &mut parts);
        let req = Request::from_parts(parts, body);
        match resolve(&found, req.headers()) {
            Resolved::PassThrough => ResponseFuture::pass_through(self.inner.call(req)),
            Resolved::Refused(problem) => {
                let id = log::request_id(req.headers());
                ResponseFuture::ready(log::refused(id.as_ref(), &problem))
            }
            Resolved::Guarded(guard) => {
                // Take the service that was driven to readiness; leave a clone.
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                let engine = self.engine.clone();
                let extras = self.extras.clone();
                ResponseFuture::guarded(Box::pin(guarded(engine, inner, guard, req, extras)))
            }
        }
    }
}

/// What the *resolve* phase decided.
enum Resolved {
    /// Not protected: the method does not participate, or the key is
    /// optional and absent.
    PassThrough,
    /// A bad or missing key (400).
    Refused(Problem),
    /// Run through the engine.
    Guarded(Guard),
}

/// A request the engine guards: its route's policy and its key (`None`:
/// derived from the fingerprint).
struct Guard {
    policy: Arc<RoutePolicy>,
    key: Option<IdempotencyKey>,
}

/// Phase 1, once the route is found: whether the request is guarded, and
/// its key (protocol §3.1–2).
fn resolve(found: &RouteMatch, headers: &http::HeaderMap) -> Resolved {
    if !found.participates() {
        return Resolved::PassThrough;
    }
    if let Some(e) = found.invalid_path() {
        return Resolved::Refused(Problem::new(ProblemCode::PathInvalid, e.to_string()));
    }
    let policy = found.policy();
    // The route's key header (protocol §13); any other, `Idempotency-Key`
    // included, is an ordinary header here, forwarded as it came.
    let name = key::header_display_name(&policy.key_header);
    let key = match key::from_named_header_values(name, headers.get_all(&policy.key_header)) {
        Ok(key) => key,
        Err(e) => return Resolved::Refused(Problem::new(ProblemCode::KeyInvalid, e.reason())),
    };
    match key {
        Some(k) if k.as_str().len() > policy.max_key_length => Resolved::Refused(Problem::new(
            ProblemCode::KeyInvalid,
            format!(
                "the key is {} characters long; this route's limit is {}",
                k.as_str().len(),
                policy.max_key_length
            ),
        )),
        Some(k) => Resolved::Guarded(Guard {
            policy: Arc::clone(policy),
            key: Some(k),
        }),
        None => match policy.key {
            KeyPolicy::Required => Resolved::Refused(Problem::new(
                ProblemCode::KeyMissing,
                format!("this route requires a key in the {name} header"),
            )),
            KeyPolicy::Optional => Resolved::PassThrough,
            KeyPolicy::Derived => Resolved::Guarded(Guard {
                policy: Arc::clone(policy),
                key: None,
            }),
        },
    }
}

/// Phases 2–5 of a guarded request.
async fn guarded<Svc, St, ReqB, ResB>(
    engine: Engine<St>,
    inner: Svc,
    guard: Guard,
    req: Request<ReqB>,
    extras: Extras,
) -> Result<Response<ResponseBody<ResB>>, Svc::Error>
where
    Svc: Service<Request<ReqB>, Response = Response<ResB>> + Send + 'static,
    Svc::Future: Send + 'static,
    Svc::Error: Send + 'static,
    ReqB: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
    St: Store,
{
    let (parts, body) = req.into_parts();
    let id = log::request_id(&parts.headers);
    // The stale guard's headers are checked before anything is read or stored.
    let event = match stale::read_event(&guard.policy, extras.stale_guard.as_ref(), &parts) {
        Ok(event) => event,
        Err(problem) => return Ok(log::refused(id.as_ref(), &problem)),
    };
    let bytes = match read_body(&parts.headers, body, guard.policy.max_body).await {
        Ok(bytes) => bytes,
        Err(problem) => return Ok(log::refused(id.as_ref(), &problem)),
    };
    let mut identity = identify(&parts, &bytes, &guard);
    identity.event = event;
    // Hashed for the request's line only when that line is written.
    let key = log::enabled().then(|| identity.key.log_id());
    if let (Mode::Async, Some(mode)) = (guard.policy.mode, &extras.async_mode) {
        // Phase 4 of async mode: accept, and let a dispatcher run it.
        // Boxed: inline, its future would size every sync request's.
        let res = Box::pin(operations::accept(
            mode,
            &parts,
            bytes,
            &identity,
            &guard.policy.key_header,
        ))
        .await;
        log::request(
            id.as_ref(),
            key,
            log::async_outcome(&res),
            res.status().as_u16(),
        );
        return Ok(res);
    }
    let req = Request::from_parts(parts, bytes);
    let policy = Arc::clone(&guard.policy);
    let outcome = execute::run(
        engine,
        inner,
        identity,
        guard.policy,
        req,
        extras.tasks.as_ref(),
    )
    .await;
    let name = outcome.name();
    let res = respond(outcome, &policy.key_header);
    let status = res.as_ref().map_or(0, |r| r.status().as_u16());
    log::request(id.as_ref(), key, name, status);
    res
}

/// Phase 2: the whole body, refused (413) as soon as it exceeds `max`.
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

/// Who a guarded request is, for the engine.
pub(super) struct Identity {
    /// `H(scope) ‖ key`, or the derived key.
    pub(super) key: StoreKey,
    /// What makes the request *this* request.
    pub(super) fingerprint: Fingerprint,
    /// The route's rules (retention = `dedupe_window` for derived keys).
    pub(super) rules: Rules,
    /// The event, on a route with a stale guard (protocol §13).
    pub(super) event: Option<stale::Event>,
}

/// Phase 3: fingerprint and scope (protocol §3.3–4); a missing key under
/// `derived` becomes the fingerprint.
fn identify(parts: &Parts, body: &[u8], guard: &Guard) -> Identity {
    let policy = &guard.policy;
    let fingerprint = fingerprint(
        &parts.method,
        &parts.uri,
        &parts.headers,
        body,
        &FingerprintOptions {
            headers: &policy.fingerprint_headers,
            canonical_json: policy.canonical_json,
            ignore_json_pointers: &policy.ignore_json_pointers,
        },
    );
    let scope = Scope::from_headers(&parts.headers, &policy.scope_headers);
    let mut rules = Rules::from(&**policy);
    let key = match &guard.key {
        Some(k) => StoreKey::new(&scope, k.as_str()),
        None => {
            rules.retention = policy.dedupe_window;
            // Its own namespace: a client cannot send a key that names it.
            StoreKey::new(&scope.derived(), &fingerprint.to_hex())
        }
    };
    Identity {
        key,
        fingerprint,
        rules,
        event: None,
    }
}
