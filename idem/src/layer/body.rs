//! The layer's response body, and the bounded buffering of the inner
//! service's answers ([`buffer`], [`Prefixed`]).

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use pin_project_lite::pin_project;

use crate::store::BoxError;

pin_project! {
    /// The body of a response from [`Idempotency`](super::Idempotency): the
    /// inner service's own body (pass-through), a buffered one, or an
    /// answer too large to buffer, streamed.
    // pin_project! takes no attributes on variant fields, so no docs.
    #[allow(missing_docs)]
    #[project = Proj]
    pub enum ResponseBody<B> {
        /// Passed through untouched.
        Inner { #[pin] body: B },
        /// Buffered: executed, replayed, or a problem.
        Full { body: Full<Bytes> },
        /// Larger than the route's `max_response_body`: what was read, then
        /// the rest as it comes (not stored).
        Streamed { #[pin] body: Prefixed<Pin<Box<B>>> },
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
            Proj::Streamed { body } => body.poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Inner { body } => body.is_end_stream(),
            Self::Full { body } => body.is_end_stream(),
            Self::Streamed { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Inner { body } => body.size_hint(),
            Self::Full { body } => body.size_hint(),
            Self::Streamed { body } => body.size_hint(),
        }
    }
}

pin_project! {
    /// A body whose first chunks were already read: those chunks, then the
    /// rest of `body` as it comes.
    #[derive(Debug)]
    pub struct Prefixed<B> {
        prefix: VecDeque<Bytes>,
        #[pin]
        body: B,
    }
}

impl<B> Prefixed<B> {
    /// `prefix`, then the rest of `body`.
    #[must_use]
    pub fn new(prefix: Vec<Bytes>, body: B) -> Self {
        Self {
            prefix: prefix.into(),
            body,
        }
    }

    /// How many bytes the prefix still holds.
    fn prefix_len(&self) -> u64 {
        self.prefix.iter().map(|b| b.len() as u64).sum()
    }
}

impl<B: Body<Data = Bytes>> Body for Prefixed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if let Some(chunk) = this.prefix.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        this.body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.body.size_hint();
        let prefix = self.prefix_len();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(prefix));
        if let Some(upper) = inner.upper().and_then(|u| u.checked_add(prefix)) {
            hint.set_upper(upper);
        }
        hint
    }
}

/// What [`buffer`] read.
#[derive(Debug)]
pub enum Buffered<B> {
    /// The whole body, at most the limit (trailers are not kept).
    Whole(Bytes),
    /// More than the limit: what was read, then the unread rest.
    TooLarge(Prefixed<B>),
}

/// Reads `body` whole if it holds at most `limit` bytes. Past the limit it
/// stops and hands back what it read followed by the unread rest, so no
/// more than `limit` and one frame are ever held; a body that declares a
/// larger size up front (`Content-Length`) is not read at all.
///
/// # Errors
///
/// The body's own error, if it fails while being read.
pub async fn buffer<B>(mut body: B, limit: u64) -> Result<Buffered<B>, B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    if body.size_hint().lower() > limit {
        return Ok(Buffered::TooLarge(Prefixed::new(Vec::new(), body)));
    }
    let mut chunks = Vec::new();
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        // Trailers are dropped, as a buffered answer has nowhere to keep them.
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        total = total.saturating_add(data.len() as u64);
        if !data.is_empty() {
            chunks.push(data);
        }
        if total > limit {
            return Ok(Buffered::TooLarge(Prefixed::new(chunks, body)));
        }
    }
    Ok(Buffered::Whole(concat(chunks, total)))
}

/// One `Bytes` of `chunks` (`total` bytes in all), copied only when there
/// is more than one.
fn concat(mut chunks: Vec<Bytes>, total: u64) -> Bytes {
    if chunks.len() <= 1 {
        return chunks.pop().unwrap_or_default();
    }
    let mut out = BytesMut::with_capacity(usize::try_from(total).unwrap_or(0));
    for chunk in chunks {
        out.extend_from_slice(&chunk);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    /// Data frames of unknown total length.
    struct Chunks(VecDeque<&'static str>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(
                self.0
                    .pop_front()
                    .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes())))),
            )
        }
    }

    fn chunked(chunks: &[&'static str]) -> Chunks {
        Chunks(chunks.iter().copied().collect())
    }

    #[tokio::test]
    async fn within_the_limit_the_body_is_whole() {
        let Ok(Buffered::Whole(b)) = buffer(chunked(&["ab", "cd", ""]), 4).await else {
            panic!("whole");
        };
        assert_eq!(b, "abcd");
        let Ok(Buffered::Whole(b)) = buffer(Full::new(Bytes::from_static(b"xyz")), 3).await else {
            panic!("whole");
        };
        assert_eq!(b, "xyz");
    }

    #[tokio::test]
    async fn past_the_limit_the_prefix_then_the_rest() {
        let Ok(Buffered::TooLarge(rest)) = buffer(chunked(&["ab", "cd", "ef"]), 3).await else {
            panic!("too large");
        };
        assert_eq!(rest.prefix_len(), 4, "read up to the frame that crossed");
        let all = rest.collect().await.expect("body").to_bytes();
        assert_eq!(all, "abcdef");
        let declared = Full::new(Bytes::from_static(b"0123456789"));
        let Ok(Buffered::TooLarge(rest)) = buffer(declared, 9).await else {
            panic!("too large by its size");
        };
        assert_eq!(rest.prefix_len(), 0, "not read at all");
        assert_eq!(rest.size_hint().exact(), Some(10));
        assert_eq!(rest.collect().await.expect("body").to_bytes(), "0123456789");
    }
}
