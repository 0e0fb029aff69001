//! The request body the gateway hands to the idempotency layer: the
//! client's streaming body, bounded by a read deadline, or a buffered one.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::Sleep;

use idem::store::BoxError;

/// The client took longer than `request_read_timeout` to send its body.
#[derive(Debug, thiserror::Error)]
#[error("the request body was not received within {0:?}")]
pub struct ReadTimeout(pub Duration);

pin_project! {
    /// A request body: streaming from the client, or buffered.
    // pin_project! takes no attributes on variant fields, so no docs.
    #[allow(missing_docs)]
    #[project = Proj]
    pub enum GatewayBody {
        /// From the client; fails once `deadline` passes.
        Incoming {
            #[pin] body: Incoming,
            // Boxed so the body is `Unpin`, as the pooled client requires.
            deadline: Pin<Box<Sleep>>,
            limit: Duration,
        },
        /// Buffered (by the idempotency layer).
        Full { body: Full<Bytes> },
    }
}

impl GatewayBody {
    /// Wraps a client body that must arrive within `limit`.
    #[must_use]
    pub fn incoming(body: Incoming, limit: Duration) -> Self {
        Self::Incoming {
            body,
            deadline: Box::pin(tokio::time::sleep(limit)),
            limit,
        }
    }
}

impl From<Bytes> for GatewayBody {
    fn from(bytes: Bytes) -> Self {
        Self::Full {
            body: Full::new(bytes),
        }
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            Proj::Incoming {
                body,
                deadline,
                limit,
            } => {
                if let Poll::Ready(frame) = body.poll_frame(cx) {
                    return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
                }
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(ReadTimeout(*limit))))),
                    Poll::Pending => Poll::Pending,
                }
            }
            Proj::Full { body } => Pin::new(body).poll_frame(cx).map_err(|e| match e {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Incoming { body, .. } => body.is_end_stream(),
            Self::Full { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Incoming { body, .. } => body.size_hint(),
            Self::Full { body } => body.size_hint(),
        }
    }
}
