//! Phase 4, *run*: the engine reserves the key and, if this request wins,
//! calls the inner service, buffers its response (up to the route's
//! `max_response_body`; a larger one is streamed and not stored) and
//! decides what the store keeps (protocol §3.8–9).
//!
//! A server drops a request's future when its client hangs up; were the
//! engine's work simply part of that future, a started execution would be
//! cancelled half-way and its reservation let go, so the client's retry
//! would run the effect a second time. The execution is therefore
//! [`Detach`]ed when dropped: it runs in the caller's task while the
//! caller waits for it (no task spawned per request), and if the caller's
//! future is dropped before it ends, it is spawned onto a Tokio task of its
//! own, where it runs to its end and stores (or holds, or releases)
//! whatever the caller would have got, and the retry finds it.
//!
//! A panic in the inner service is caught at the call, settled as an
//! ambiguous outcome (unwinding through the engine would release the key),
//! then resumed, so the caller sees the panic as it would without the layer.

use std::any::Any;
use std::future::Future;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::response::Parts;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;
use tracing::Instrument;

use super::body::{buffer, Buffered, Prefixed};
use super::response::{capture, stored_problem};
use super::service::Identity;
use super::stale;
use super::{ResponseBody, ResponseTooLarge, UpstreamFailure};
use crate::engine::{Action, Engine, Finish, Metrics, Outcome};
use crate::policy::{Ambiguous, RoutePolicy};
use crate::problem::{Problem, ProblemCode};
use crate::record::StoredResponse;
use crate::store::{BoxError, Store};

/// What the inner service answered, as the caller gets it.
type Answer<B, E> = Result<Response<ResponseBody<B>>, E>;

/// Runs `req` through the engine: executed at most once per key, and never
/// cancelled by the caller going away (dropped before its end, the
/// execution goes on in a task of its own). `tasks`, when the server gave
/// one, counts it from its start, so the server's shutdown can wait for it.
///
/// Not an `async fn`: the arguments go straight into the execution's box,
/// where an `async fn`'s future would hold them first, and its caller's
/// future a slot of that size.
pub(super) fn run<Svc, St, ReqB, ResB>(
    engine: Engine<St>,
    mut inner: Svc,
    identity: Identity,
    policy: Arc<RoutePolicy>,
    req: Request<Bytes>,
    tasks: Option<&TaskTracker>,
) -> impl Future<Output = Outcome<Answer<ResB, Svc::Error>>> + Send + 'static
where
    Svc: Service<Request<ReqB>, Response = Response<ResB>> + Send + 'static,
    Svc::Future: Send + 'static,
    Svc::Error: Send + 'static,
    ReqB: From<Bytes> + Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
    St: Store,
{
    // Boxed where it is made: the execution's future is several KB and
    // every move copies it whole; a named local would also keep a slot of
    // its size in this function's own future, which its caller moves.
    // Boxed, it also moves to a task of its own, if it must, without being
    // copied (instrumented with its span only then: see `Detach`).
    let task = Box::pin(async move {
        let Identity {
            key,
            fingerprint,
            rules,
            event,
        } = identity;
        let event_rules = rules.clone();
        let mut panicked = None;
        let slot = &mut panicked;
        let metrics = engine.metrics();
        // A closure returning the future, not an `async` block awaiting
        // it: that would hold the execution's future twice.
        let op = || {
            let call = execute_catching(&mut inner, req.map(ReqB::from), &policy, metrics, slot);
            stale::around(event, &event_rules, call)
        };
        let outcome = engine.run(&key, fingerprint, &rules, op).await;
        // The key is settled; now the panic goes on as if uncaught.
        if let Some(panic) = panicked {
            panic::resume_unwind(panic);
        }
        outcome
    });
    // A panic is the caller's, as it would be without the layer.
    Detach {
        future: Some(task),
        span: tracing::Span::current(),
        token: tasks.map(TaskTracker::token),
    }
}

/// A started execution, polled by the caller's task while the caller waits
/// for it. Dropped before its end (the caller went away), it is spawned to
/// run to its end on a task of its own: onto the server's tracker when it
/// gave one, else onto a bare Tokio task. Spawning every execution and
/// joining it cost a fresh request ~2.5 % of its instructions, and most
/// requests finish with their client.
///
/// The tracker counts the execution from the start (`token`), not only
/// once it is spawned: a server's shutdown waits for it either way, even
/// when its caller is dropped after the server looked (an HTTP/2 stream
/// reset while the connection is already gone, say).
struct Detach<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    future: Option<F>,
    /// The span the execution was started in: its lines carry it, polled
    /// by its caller or on a task of its own.
    span: tracing::Span,
    token: Option<TaskTrackerToken>,
}

/// Whether entering `span` would change nothing: it is disabled, or it is
/// already the current span of its own subscriber (span ids mean something
/// only to the subscriber that made them). A caller that awaits the
/// execution inside the span it started it in (the gateway does) then pays
/// no enter and exit of the span per poll, which at the default level cost
/// a fresh request ~2.5k instructions of a second `instrument` of the same
/// span.
fn in_span(span: &tracing::Span) -> bool {
    span.with_subscriber(|(id, dispatch)| dispatch.current_span().id() == Some(id))
        .unwrap_or(true)
}

impl<F> Future for Detach<F>
where
    F: Future + Unpin + Send + 'static,
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Taken out while it is polled: one that panics is dropped as the
        // panic unwinds, never spawned to be polled again.
        let this = &mut *self;
        let Some(mut future) = this.future.take() else {
            panic!("an execution polled after it ended");
        };
        let _entered = (!in_span(&this.span)).then(|| this.span.enter());
        match Pin::new(&mut future).poll(cx) {
            Poll::Ready(output) => Poll::Ready(output),
            Poll::Pending => {
                this.future = Some(future);
                Poll::Pending
            }
        }
    }
}

impl<F> Drop for Detach<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        // Ended, or panicked.
        let Some(future) = self.future.take() else {
            return;
        };
        let future = future.instrument(std::mem::replace(&mut self.span, tracing::Span::none()));
        // The runtime the caller ran on (a server drops a request's future
        // on it; a runtime shutting down drops its tasks within it, and
        // takes a task spawned then down at once, as it would any other).
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                // The answer is nobody's now; the store has it. Spawned
                // before this execution's token goes (with `self`): the
                // tracker never counts it out in between.
                drop(match &self.token {
                    Some(token) => token.task_tracker().spawn_on(future, &runtime),
                    None => runtime.spawn(future),
                });
            }
            Err(_) => tracing::error!(
                "a request's execution was dropped outside a Tokio runtime and cannot go on; \
                 its key stays held until its lease runs out"
            ),
        }
    }
}

/// [`execute`], with a panic caught into `panicked` and settled as an
/// ambiguous outcome: unwinding through the engine would let the key go.
async fn execute_catching<Svc, ReqB, ResB>(
    inner: &mut Svc,
    req: Request<ReqB>,
    policy: &RoutePolicy,
    metrics: &Metrics,
    panicked: &mut Option<Box<dyn Any + Send>>,
) -> Finish<Answer<ResB, Svc::Error>>
where
    Svc: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    let call = CatchUnwind {
        future: execute(inner, req, policy, metrics),
    };
    match call.await {
        Ok(finish) => finish,
        Err(panic) => {
            *panicked = Some(panic);
            tracing::error!(
                "the inner service panicked after it received the request; outcome unknown"
            );
            let unknown = Problem::new(
                ProblemCode::UpstreamUnavailable,
                "the service failed after it received the request; the outcome is unknown",
            );
            Finish {
                action: ambiguous(policy, || stored_problem(&unknown)),
                output: Ok(unknown.to_response()),
            }
        }
    }
}

/// Calls the inner service and decides what the store keeps (protocol §3.9).
///
/// Once the inner service has the request its effect may have happened, so
/// an `Err` from it, or a response body that breaks while it is read, is
/// an *ambiguous* outcome (like an upstream reset in the gateway): the
/// route's `ambiguous` policy decides, and the key is never simply freed
/// unless that policy says `release`.
async fn execute<Svc, ReqB, ResB>(
    inner: &mut Svc,
    req: Request<ReqB>,
    policy: &RoutePolicy,
    metrics: &Metrics,
) -> Finish<Answer<ResB, Svc::Error>>
where
    Svc: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    let res = match inner.call(req).await {
        Ok(res) => res,
        Err(e) => {
            tracing::warn!(
                "the inner service failed after it received the request; outcome unknown"
            );
            let unknown = Problem::new(
                ProblemCode::UpstreamUnavailable,
                "the service failed after it received the request; the outcome is unknown",
            );
            return Finish {
                output: Err(e),
                action: ambiguous(policy, || stored_problem(&unknown)),
            };
        }
    };
    let failure = res.extensions().get::<UpstreamFailure>().copied();
    let known_too_large = res.extensions().get::<ResponseTooLarge>().is_some();
    let (parts, body) = res.into_parts();
    // Boxed so that any body can be handed on, part-read, to the client.
    let body = Box::pin(body);
    let read = if known_too_large {
        Ok(Buffered::TooLarge(Prefixed::new(Vec::new(), body)))
    } else {
        buffer(body, policy.max_response_body).await
    };
    let bytes = match read {
        Ok(Buffered::Whole(bytes)) => bytes,
        Ok(Buffered::TooLarge(rest)) => return too_large(parts, rest, policy, metrics),
        Err(e) => {
            let error: BoxError = e.into();
            tracing::warn!(%error, "the response body broke while it was read; outcome unknown");
            let unknown = Problem::new(
                ProblemCode::UpstreamUnavailable,
                "the response broke while it was being read; the outcome is unknown",
            );
            return Finish {
                action: ambiguous(policy, || stored_problem(&unknown)),
                output: Ok(unknown.to_response()),
            };
        }
    };
    let stored = || capture(parts.status, &parts.headers, bytes.clone());
    let action = match failure {
        Some(UpstreamFailure::Unreachable) => Action::Release,
        Some(UpstreamFailure::Timeout | UpstreamFailure::Reset) => ambiguous(policy, stored),
        None if policy.store_statuses.contains(parts.status.as_u16()) => Action::Store(stored()),
        None => Action::Release,
    };
    Finish {
        output: Ok(Response::from_parts(parts, ResponseBody::full(bytes))),
        action,
    }
}

/// An answer larger than the route's `max_response_body`: streamed to the
/// client (what was read, then the rest), not stored, and the key released
/// so that a retry executes again. Logged and counted when its status would
/// otherwise have been stored.
fn too_large<B, E>(
    parts: Parts,
    rest: Prefixed<Pin<Box<B>>>,
    policy: &RoutePolicy,
    metrics: &Metrics,
) -> Finish<Answer<B, E>> {
    if policy.store_statuses.contains(parts.status.as_u16()) {
        Metrics::inc(&metrics.response_too_large);
        tracing::warn!(
            status = parts.status.as_u16(),
            max_response_body = policy.max_response_body,
            "the answer is larger than max_response_body: streamed to the client, \
             not stored; the key is released, so a retry executes again"
        );
    }
    Finish {
        output: Ok(Response::from_parts(
            parts,
            ResponseBody::Streamed { body: rest },
        )),
        action: Action::Release,
    }
}

/// What the store keeps after an ambiguous outcome: the route's `ambiguous`
/// policy; under `store`, `answer` becomes the final answer.
fn ambiguous(policy: &RoutePolicy, answer: impl FnOnce() -> StoredResponse) -> Action {
    match policy.ambiguous {
        Ambiguous::Hold => Action::Hold,
        Ambiguous::Release => Action::Release,
        Ambiguous::Store => Action::Store(answer()),
    }
}

pin_project! {
    /// Polls `future`, catching a panic as `Err(payload)`.
    struct CatchUnwind<F> {
        #[pin]
        future: F,
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let future = self.project().future;
        // Unwind safety: a future that panicked is never polled again, and
        // the panic is resumed once the key is settled.
        match panic::catch_unwind(AssertUnwindSafe(|| future.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// Sets its flag once polled to its end.
    struct Ends {
        polls_left: u32,
        ended: Arc<AtomicBool>,
    }

    impl Future for Ends {
        type Output = ();

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.polls_left == 0 {
                self.ended.store(true, Ordering::SeqCst);
                return Poll::Ready(());
            }
            self.polls_left -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    fn noop_context() -> Context<'static> {
        Context::from_waker(std::task::Waker::noop())
    }

    /// An execution that ends after `polls` more polls, and its flag.
    fn ends_after(polls: u32, tasks: &TaskTracker) -> (Detach<Pin<Box<Ends>>>, Arc<AtomicBool>) {
        let ended = Arc::new(AtomicBool::new(false));
        let future = Box::pin(Ends {
            polls_left: polls,
            ended: Arc::clone(&ended),
        });
        let detach = Detach {
            future: Some(future),
            span: tracing::Span::none(),
            token: Some(tasks.token()),
        };
        (detach, ended)
    }

    #[tokio::test]
    async fn dropped_before_its_end_it_ends_on_a_tracked_task() {
        let tasks = TaskTracker::new();
        let (mut detach, ended) = ends_after(3, &tasks);
        assert!(Pin::new(&mut detach).poll(&mut noop_context()).is_pending());
        assert_eq!(tasks.len(), 1, "counted while its caller runs it");
        drop(detach);
        assert_eq!(tasks.len(), 1, "the rest runs on a task of the tracker's");
        tasks.close();
        tasks.wait().await;
        assert!(ended.load(Ordering::SeqCst), "the execution ran to its end");
    }

    #[tokio::test]
    async fn ended_or_panicked_it_spawns_nothing() {
        let tasks = TaskTracker::new();
        let (mut done, ended) = ends_after(0, &tasks);
        assert!(Pin::new(&mut done).poll(&mut noop_context()).is_ready());
        assert!(ended.load(Ordering::SeqCst));
        drop(done);

        let mut panics = Detach {
            future: Some(Box::pin(async { panic!("the inner service panicked") })),
            span: tracing::Span::none(),
            token: Some(tasks.token()),
        };
        let caught = panic::catch_unwind(AssertUnwindSafe(|| {
            let _ = Pin::new(&mut panics).poll(&mut noop_context());
        }));
        assert!(caught.is_err(), "the panic is the caller's");
        drop(panics);
        assert_eq!(
            tasks.len(),
            0,
            "nothing is spawned: a future that panicked is never polled again"
        );
    }

    /// What the subscriber formats, kept to read back.
    #[derive(Clone, Default)]
    struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// An execution that logs a line at each poll and ends after `polls_left`.
    struct Logs {
        polls_left: u32,
    }

    impl Future for Logs {
        type Output = ();

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            tracing::info!("polled");
            if self.polls_left == 0 {
                return Poll::Ready(());
            }
            self.polls_left -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    /// Polled inside the span it was started in (not entered again), outside
    /// any span, inside another span, and on a task of its own once dropped:
    /// every line it logs carries the span it was started in.
    #[tokio::test]
    async fn its_lines_carry_the_span_it_was_started_in() {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        tracing::callsite::rebuild_interest_cache();
        let tasks = TaskTracker::new();
        let span = tracing::info_span!("request", id = 7);
        let mut detach = span.in_scope(|| Detach {
            future: Some(Box::pin(Logs { polls_left: 3 })),
            span: tracing::Span::current(),
            token: Some(tasks.token()),
        });
        span.in_scope(|| assert!(Pin::new(&mut detach).poll(&mut noop_context()).is_pending()));
        assert!(Pin::new(&mut detach).poll(&mut noop_context()).is_pending());
        tracing::info_span!("another").in_scope(|| {
            assert!(Pin::new(&mut detach).poll(&mut noop_context()).is_pending());
        });
        drop(detach);
        tasks.close();
        tasks.wait().await;
        let text = String::from_utf8(lines.0.lock().expect("lock").clone()).expect("utf-8");
        let polled: Vec<&str> = text.lines().filter(|l| l.contains("polled")).collect();
        assert_eq!(polled.len(), 4, "{text}");
        assert!(polled.iter().all(|l| l.contains("request{id=7}")), "{text}");
    }
}
