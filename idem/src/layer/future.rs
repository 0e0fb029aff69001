//! The response future of [`Idempotency`](super::Idempotency).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

use super::ResponseBody;

/// A boxed, sendable future (the guarded path is an `async fn`).
pub(super) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

pin_project! {
    /// Response future of [`Idempotency`](super::Idempotency): an answer
    /// known at once (a refused key), the inner service's own future
    /// (pass-through), or the guarded path (body, fingerprint, engine).
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        // Boxed: a refusal is rare, and inline it would size (and every
        // move would copy) every request's future.
        Ready { response: Option<Box<Response<ResponseBody<B>>>> },
        PassThrough { #[pin] future: F },
        Guarded { future: BoxFuture<Result<Response<ResponseBody<B>>, E>> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    /// Answers `response` without calling the inner service.
    pub(super) fn ready(response: Response<ResponseBody<B>>) -> Self {
        Self {
            kind: Kind::Ready {
                response: Some(Box::new(response)),
            },
        }
    }

    /// The inner service's response, untouched.
    pub(super) fn pass_through(future: F) -> Self {
        Self {
            kind: Kind::PassThrough { future },
        }
    }

    /// A request the engine runs at most once.
    pub(super) fn guarded(future: BoxFuture<Result<Response<ResponseBody<B>>, E>>) -> Self {
        Self {
            kind: Kind::Guarded { future },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Ready { response } => Poll::Ready(Ok(*response
                .take()
                .expect("ResponseFuture polled after completion"))),
            KindProj::PassThrough { future } => {
                let res = ready!(future.poll(cx))?;
                Poll::Ready(Ok(res.map(|body| ResponseBody::Inner { body })))
            }
            KindProj::Guarded { future } => future.as_mut().poll(cx),
        }
    }
}
