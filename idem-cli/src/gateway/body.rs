//! The request body the gateway hands to the idempotency layer: the
//! client's streaming body, bounded by a read deadline, or a buffered one;
//! and what is left of it when the layer stops reading early.
//!
//! A body refused as too large (413) is dropped half read. Closing the
//! socket then, with the client still sending, makes the kernel answer with
//! a reset, and a client that writes its whole request before reading (most
//! SDKs) sees a broken pipe instead of the 413. So a client body dropped
//! before its end goes back to the gateway as a [`Leftover`], which it
//! [drains](drain) up to a bound while the answer is written.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::time::Sleep;

use idem::store::BoxError;

/// The client took longer than `request_read_timeout` to send its body.
#[derive(Debug, thiserror::Error)]
#[error("the request body was not received within {0:?}")]
pub struct ReadTimeout(pub Duration);

/// A request body: streaming from the client, or buffered.
#[derive(Debug)]
pub struct GatewayBody(Kind);

#[derive(Debug)]
enum Kind {
    /// From the client; fails once the deadline passes.
    Streaming(Streaming),
    /// Buffered (by the idempotency layer).
    Full(Full<Bytes>),
}

#[derive(Debug)]
struct Streaming {
    /// `None` only once handed back in `drop`.
    live: Option<Leftover>,
    limit: Duration,
    /// The end, or an error, was read: nothing left to drain.
    finished: bool,
    /// Where the rest goes if the body is dropped before its end.
    leftover: Option<oneshot::Sender<Leftover>>,
}

/// What is left of a client body dropped before its end, with what is left
/// of its read deadline.
#[derive(Debug)]
pub struct Leftover {
    body: Incoming,
    // Boxed so the body is `Unpin`, as the pooled client requires.
    deadline: Pin<Box<Sleep>>,
    /// Whether it was ever read (after which hyper has sent any
    /// `100 Continue` the client waited for).
    started: bool,
}

impl GatewayBody {
    /// Wraps a client body that must arrive within `limit`. A body known
    /// to be empty (no body, or `Content-Length: 0`) has nothing to wait
    /// for: it gets no deadline (no timer per GET).
    #[must_use]
    pub fn incoming(body: Incoming, limit: Duration) -> Self {
        if body.is_end_stream() {
            return Self::from(Bytes::new());
        }
        Self(Kind::Streaming(Streaming {
            live: Some(Leftover {
                body,
                deadline: Box::pin(tokio::time::sleep(limit)),
                started: false,
            }),
            limit,
            finished: false,
            leftover: None,
        }))
    }

    /// Like [`GatewayBody::incoming`], and if the body is dropped before
    /// its end, what is left of it arrives on the returned receiver. A body
    /// known to be empty needs no receiver (`None`).
    #[must_use]
    pub fn incoming_with_leftover(
        body: Incoming,
        limit: Duration,
    ) -> (Self, Option<oneshot::Receiver<Leftover>>) {
        let mut this = Self::incoming(body, limit);
        let Kind::Streaming(s) = &mut this.0 else {
            return (this, None);
        };
        if s.live.as_ref().is_none_or(|l| l.body.is_end_stream()) {
            return (this, None);
        }
        let (tx, rx) = oneshot::channel();
        s.leftover = Some(tx);
        (this, Some(rx))
    }
}

impl From<Bytes> for GatewayBody {
    fn from(bytes: Bytes) -> Self {
        Self(Kind::Full(Full::new(bytes)))
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let (Some(tx), Some(rest)) = (self.leftover.take(), self.live.take()) else {
            return;
        };
        if rest.body.is_end_stream() {
            return;
        }
        // Nobody waiting (the request was answered already): hyper closes.
        let _ = tx.send(rest);
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().0 {
            Kind::Streaming(s) => {
                let Some(live) = s.live.as_mut() else {
                    return Poll::Ready(None);
                };
                live.started = true;
                if let Poll::Ready(frame) = Pin::new(&mut live.body).poll_frame(cx) {
                    if !matches!(frame, Some(Ok(_))) {
                        s.finished = true;
                    }
                    return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
                }
                match live.deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        s.finished = true;
                        Poll::Ready(Some(Err(Box::new(ReadTimeout(s.limit)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
            Kind::Full(body) => Pin::new(body).poll_frame(cx).map_err(|e| match e {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Streaming(s) => s.live.as_ref().is_none_or(|l| l.body.is_end_stream()),
            Kind::Full(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Streaming(s) => s
                .live
                .as_ref()
                .map_or_else(|| SizeHint::with_exact(0), |l| l.body.size_hint()),
            Kind::Full(body) => body.size_hint(),
        }
    }
}

impl Leftover {
    /// At least this many bytes are still to come.
    #[must_use]
    pub fn at_least(&self) -> u64 {
        self.body.size_hint().lower()
    }

    /// Whether the body was read at all before it was dropped.
    #[must_use]
    pub fn started(&self) -> bool {
        self.started
    }
}

/// Reads and discards the rest of a body, up to `limit` bytes and until its
/// read deadline: true if it ended within both (then the connection can
/// even be kept). Past either, dropping it lets hyper close the connection.
pub async fn drain(rest: Leftover, limit: u64) -> bool {
    let Leftover {
        mut body, deadline, ..
    } = rest;
    let mut read = 0u64;
    let reading = async {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            if let Some(data) = frame.data_ref() {
                read = read.saturating_add(data.len() as u64);
                if read > limit {
                    return false;
                }
            }
        }
        true
    };
    tokio::select! {
        ended = reading => ended,
        () = deadline => false,
    }
}
