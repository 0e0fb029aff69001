//! The stale-event guard in the layer (protocol §13), for routes with a
//! [`StalePolicy`]: requests carry an entity and a version, and one whose
//! version is not newer than the entity's highest completed one is not
//! passed to the inner service.
//!
//! Two steps, around the usual phases:
//!
//! - before the body is read, [`read_event`] reads the version (and entity)
//!   header: missing or malformed → 400 `event_header_invalid`, nothing
//!   stored;
//! - inside the key's execution (after the key check, so a repeat of an
//!   applied event under its key is a replay, not stale), [`around`] takes
//!   the entity ([`VersionStore::begin_version`]) before the inner service
//!   is called: stale → 409 `stale_version` (or 200 with
//!   `Idempotency-Status: stale` under `stale = "ack"`); another event of
//!   the entity running → 409 `idempotency_key_in_progress` (`reject`) or
//!   a wait (`wait`, up to `wait_timeout`). Once the service answered: a
//!   2xx commits the version, any other answer frees the entity unchanged,
//!   and an ambiguous outcome held by the key's `ambiguous = hold` keeps the
//!   entity held until its lease runs out. Answers the guard gives itself
//!   release the key: a retry is decided again.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Response};
use tokio::time::Instant;
use tokio_util::either::Either;

use super::ResponseBody;
use crate::engine::{Action, Finish, Rules};
use crate::key::{Scope, StoreKey};
use crate::policy::{Concurrent, FailMode, RoutePolicy, StaleAnswer, StalePolicy};
use crate::problem::{Problem, ProblemCode};
use crate::record::Token;
use crate::store::{Fence, Lease, StoreError, VersionBegin, VersionStore};
use crate::version::Version;

/// The header a `stale = "ack"` answer carries.
pub const IDEMPOTENCY_STATUS: &str = "idempotency-status";

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The store steps the guard needs, behind a pointer (the layer is generic
/// over any [`Store`](crate::store::Store); the guard needs a
/// [`VersionStore`]).
trait ErasedVersions: Send + Sync + 'static {
    fn begin<'a>(
        &'a self,
        entity: &'a StoreKey,
        version: Version,
        lease: Duration,
    ) -> BoxFuture<'a, Result<VersionBegin, StoreError>>;
    fn commit<'a>(
        &'a self,
        entity: &'a StoreKey,
        token: Token,
        version: Version,
    ) -> BoxFuture<'a, Result<Fence, StoreError>>;
    fn abort<'a>(
        &'a self,
        entity: &'a StoreKey,
        token: Token,
    ) -> BoxFuture<'a, Result<Fence, StoreError>>;
    fn extend<'a>(
        &'a self,
        entity: &'a StoreKey,
        token: Token,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Fence, StoreError>>;
}

impl<S: VersionStore> ErasedVersions for S {
    fn begin<'a>(
        &'a self,
        entity: &'a StoreKey,
        version: Version,
        lease: Duration,
    ) -> BoxFuture<'a, Result<VersionBegin, StoreError>> {
        Box::pin(self.begin_version(entity, version, lease))
    }
    fn commit<'a>(
        &'a self,
        entity: &'a StoreKey,
        token: Token,
        version: Version,
    ) -> BoxFuture<'a, Result<Fence, StoreError>> {
        Box::pin(self.commit_version(entity, token, version))
    }
    fn abort<'a>(
        &'a self,
        entity: &'a StoreKey,
        token: Token,
    ) -> BoxFuture<'a, Result<Fence, StoreError>> {
        Box::pin(self.abort_version(entity, token))
    }
    fn extend<'a>(
        &'a self,
        entity: &'a StoreKey,
        token: Token,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Fence, StoreError>> {
        Box::pin(self.extend_version(entity, token, lease))
    }
}

/// The store a layer's stale-event guard keeps versions in (protocol
/// §13); give it to [`IdempotencyLayer::stale_guard`](super::IdempotencyLayer::stale_guard).
/// Usually the engine's own store. Cheap to clone.
///
/// Without one, a request on a route with a [`StalePolicy`] gets a 500
/// `internal_error` (the route cannot be served as configured).
#[derive(Clone)]
pub struct StaleGuard {
    versions: Arc<dyn ErasedVersions>,
    store_timeout: Duration,
    poll_interval: Duration,
}

impl std::fmt::Debug for StaleGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaleGuard")
            .field("store_timeout", &self.store_timeout)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

impl StaleGuard {
    /// Keeps versions in `store`, with a store time-out of 2 s and waits
    /// that look again at most every 250 ms.
    #[must_use]
    pub fn new<S: VersionStore>(store: S) -> Self {
        Self {
            versions: Arc::new(store),
            store_timeout: Duration::from_secs(2),
            poll_interval: Duration::from_millis(250),
        }
    }

    /// Every version store call is abandoned after this long (503, or
    /// unguarded under `fail = open`).
    #[must_use]
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.store_timeout = timeout;
        self
    }

    /// Longest pause of a `wait` event between two looks at its entity.
    #[must_use]
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every.max(Duration::from_millis(1));
        self
    }

    async fn bounded<T>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.store_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(self.store_timeout)),
        }
    }
}

/// One guarded event: its entity, version, and what a stale one gets.
pub(super) struct Event {
    guard: StaleGuard,
    entity: StoreKey,
    version: Version,
    answer: StaleAnswer,
}

/// Reads the event headers of a request on a route with a stale guard
/// (`Ok(None)`: the route has none). Runs before the body is read.
pub(super) fn read_event(
    policy: &RoutePolicy,
    guard: Option<&StaleGuard>,
    parts: &Parts,
) -> Result<Option<Event>, Problem> {
    let Some(stale) = &policy.stale_guard else {
        return Ok(None);
    };
    let Some(guard) = guard else {
        tracing::error!("a route has a stale guard but the layer has no StaleGuard store");
        return Err(Problem::new(
            ProblemCode::Internal,
            "this route's stale-event guard has no store",
        ));
    };
    let version = read_version(stale, &parts.headers)?;
    let entity = match &stale.entity_header {
        None => parts.uri.path().to_owned(),
        Some(name) => single(&parts.headers, name)?.to_owned(),
    };
    let scope = Scope::from_headers(&parts.headers, &policy.scope_headers);
    Ok(Some(Event {
        guard: guard.clone(),
        entity: StoreKey::new(&scope, &entity),
        version,
        answer: stale.stale,
    }))
}

fn invalid(detail: String) -> Problem {
    Problem::new(ProblemCode::EventHeaderInvalid, detail)
}

/// The one value of header `name`: present once, visible ASCII, not empty.
fn single<'a>(headers: &'a http::HeaderMap, name: &http::HeaderName) -> Result<&'a str, Problem> {
    let mut values = headers.get_all(name).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(invalid(format!(
            "this route needs exactly one {name} header"
        )));
    };
    value
        .to_str()
        .ok()
        .map(|v| v.trim_matches([' ', '\t']))
        .filter(|v| !v.is_empty())
        .ok_or_else(|| invalid(format!("the {name} header is empty or not visible ASCII")))
}

fn read_version(stale: &StalePolicy, headers: &http::HeaderMap) -> Result<Version, Problem> {
    let name = &stale.version_header;
    let text = single(headers, name)?;
    text.parse::<Version>().map_err(|e| {
        invalid(format!(
            "the {name} header must be a non-negative integer or an RFC 3339 timestamp: {}",
            e.reason()
        ))
    })
}

/// An answer the guard gives itself; the key is released, so a retry is
/// decided again.
fn answer<B, E>(res: Response<ResponseBody<B>>) -> Finish<Result<Response<ResponseBody<B>>, E>> {
    Finish {
        output: Ok(res),
        action: Action::Release,
    }
}

/// Runs `run` (the inner service's execution) under the event's guard;
/// without an event, just runs it. Not an `async fn`: one would hold `run`
/// twice (the argument, then the awaited copy) on every request; the
/// guarded path is boxed, so only stale-guarded requests pay for its size.
pub(super) fn around<'a, B, E, Fut>(
    event: Option<Event>,
    rules: &'a Rules,
    run: Fut,
) -> impl Future<Output = Finish<Result<Response<ResponseBody<B>>, E>>> + 'a
where
    Fut: Future<Output = Finish<Result<Response<ResponseBody<B>>, E>>> + 'a,
    B: 'a,
    E: 'a,
{
    match event {
        None => Either::Left(run),
        Some(event) => Either::Right(Box::pin(guarded(event, rules, run))),
    }
}

/// [`around`] with an event: hold the entity's version while `run` runs.
async fn guarded<B, E, Fut>(
    event: Event,
    rules: &Rules,
    run: Fut,
) -> Finish<Result<Response<ResponseBody<B>>, E>>
where
    Fut: Future<Output = Finish<Result<Response<ResponseBody<B>>, E>>>,
{
    let lease = match take(&event, rules).await {
        Taken::Held(lease) => lease,
        Taken::Unguarded => return run.await,
        Taken::Answer(res) => return answer(res),
    };
    let Event {
        guard,
        entity,
        version,
        ..
    } = &event;
    let every = (lease.duration / 3).max(Duration::from_millis(1));
    tokio::pin!(run);
    let finish = loop {
        tokio::select! {
            biased;
            finish = &mut run => break finish,
            () = tokio::time::sleep(every) => {
                let _ = guard.bounded(guard.versions.extend(entity, lease.token, lease.duration)).await;
            }
        }
    };
    // Decided before any await: the response is not `Sync`.
    let settle = match (&finish.action, &finish.output) {
        // The effect may or may not have happened: keep the entity held
        // until the lease runs out, like the key.
        (Action::Hold, _) => None,
        (_, Ok(res)) if res.status().is_success() => Some(true),
        _ => Some(false),
    };
    let done = match settle {
        None => None,
        Some(true) => Some(
            guard
                .bounded(guard.versions.commit(entity, lease.token, *version))
                .await,
        ),
        Some(false) => Some(
            guard
                .bounded(guard.versions.abort(entity, lease.token))
                .await,
        ),
    };
    match done {
        Some(Err(error)) => {
            tracing::warn!(entity = %entity.log_id(), %error, "stale guard: cannot settle the event's version; the entity frees itself when its lease runs out");
        }
        Some(Ok(Fence::Lost)) => {
            tracing::warn!(entity = %entity.log_id(), "stale guard: the event's hold was taken over while it ran; its version was not stored");
        }
        _ => {}
    }
    finish
}

/// What taking the entity gave.
enum Taken<B> {
    /// The event holds the entity: run it.
    Held(Lease),
    /// The store failed and the route fails open: run it unguarded.
    Unguarded,
    /// Answer this instead of running it.
    Answer(Response<ResponseBody<B>>),
}

async fn take<B>(event: &Event, rules: &Rules) -> Taken<B> {
    let Event {
        guard,
        entity,
        version,
        answer,
    } = event;
    let deadline = Instant::now() + rules.wait_timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        let begun = guard
            .bounded(guard.versions.begin(entity, *version, rules.lease))
            .await;
        match begun {
            Ok(VersionBegin::Acquired(lease)) => return Taken::Held(lease),
            Ok(VersionBegin::Stale { current }) => {
                tracing::info!(entity = %entity.log_id(), %version, %current, "stale event: not forwarded");
                return Taken::Answer(stale_answer(*answer, *version, current));
            }
            Ok(VersionBegin::Mixed { current }) => {
                return Taken::Answer(
                    invalid(format!(
                        "this entity's versions are {}; {version} is not",
                        current.kind()
                    ))
                    .to_response(),
                );
            }
            Ok(VersionBegin::InFlight { lease_remaining }) => {
                let now = Instant::now();
                if rules.concurrent == Concurrent::Reject || now >= deadline {
                    return Taken::Answer(
                        Problem::new(
                            ProblemCode::KeyInProgress,
                            "another event of this entity is being processed; retry later",
                        )
                        .retry_after(lease_remaining)
                        .to_response(),
                    );
                }
                tokio::time::sleep(pause.min(deadline - now)).await;
                pause = (pause * 2).min(guard.poll_interval);
            }
            Err(error) => {
                return match rules.fail {
                    FailMode::Closed => {
                        tracing::warn!(entity = %entity.log_id(), %error, "stale guard: store unavailable; failing closed");
                        Taken::Answer(
                            Problem::new(
                                ProblemCode::StoreUnavailable,
                                "the idempotency store is unavailable; retry later",
                            )
                            .retry_after(Duration::from_secs(1))
                            .to_response(),
                        )
                    }
                    FailMode::Open => {
                        tracing::warn!(entity = %entity.log_id(), %error, "stale guard: store unavailable; forwarding WITHOUT the guard (fail = open)");
                        Taken::Unguarded
                    }
                };
            }
        }
    }
}

/// The answer to a stale event: 409 `stale_version`, or under `ack` a 200
/// that says so.
fn stale_answer<B>(
    answer: StaleAnswer,
    version: Version,
    current: Version,
) -> Response<ResponseBody<B>> {
    match answer {
        StaleAnswer::Reject => Problem::new(
            ProblemCode::StaleVersion,
            format!("version {version} is not newer than this entity's version {current}"),
        )
        .to_response(),
        StaleAnswer::Ack => {
            let body = serde_json::json!({
                "status": "stale",
                "version": version.to_string(),
                "current": current.to_string(),
            });
            let mut res = Response::new(ResponseBody::full(Bytes::from(body.to_string())));
            let h = res.headers_mut();
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            h.insert(IDEMPOTENCY_STATUS, HeaderValue::from_static("stale"));
            res
        }
    }
}
