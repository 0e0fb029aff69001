use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use pin_project_lite::pin_project;

use crate::store::BoxError;

pin_project! {
    /// The body of a response from [`Idempotency`](super::Idempotency): the
    /// inner service's own body (pass-through) or a buffered one.
    // pin_project! takes no attributes on variant fields, so no docs.
    #[allow(missing_docs)]
    #[project = Proj]
    pub enum ResponseBody<B> {
        /// Passed through untouched.
        Inner { #[pin] body: B },
        /// Buffered: executed, replayed, or a problem.
        Full { body: Full<Bytes> },
    }
}

impl<B> ResponseBody<B> {
    /// A buffered body.
    #[must_use]
    pub fn full(bytes: Bytes) -> Self {
        Self::Full {
            body: Full::new(bytes),
        }
    }
}

impl<B> From<Bytes> for ResponseBody<B> {
    fn from(bytes: Bytes) -> Self {
        Self::full(bytes)
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            Proj::Inner { body } => body.poll_frame(cx).map_err(Into::into),
            Proj::Full { body } => Pin::new(body).poll_frame(cx).map_err(|e| match e {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Inner { body } => body.is_end_stream(),
            Self::Full { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Inner { body } => body.size_hint(),
            Self::Full { body } => body.size_hint(),
        }
    }
}
