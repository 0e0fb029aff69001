//! The gateway's keep-alive connections to its upstream: HTTP/1.1, plain or
//! TLS, most recently used first. Each listener thread has a pool of its own
//! (see [`super::conn`]), so a request, its upstream connection and the
//! pool stay on one thread and the pool's lock is never contended; the
//! async dispatcher has one more.
//!
//! A connection goes back to the pool when its answer was read to the end
//! and it can take the next request; an answer dropped half read (a client
//! that hung up, a body over its limit) takes its connection with it. An
//! idle connection is closed after [`IDLE_TIMEOUT`], or when the upstream
//! closes it. A request that found its pooled connection closed before a
//! byte of it was written goes out again on another connection; one whose
//! bytes left is never sent twice (protocol §3.9: the outcome is unknown).
//!
//! Written for the gateway's one upstream, on top of hyper's own
//! connections: hyper-util's general-purpose pooled client keys its pool by
//! host in a hashed, locked map and spawns a task per request to return a
//! connection, ~10k instructions of a 60k proxied request (BENCHMARKS.md).

use std::collections::VecDeque;
use std::fmt;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use tower::ServiceExt;

use super::body::GatewayBody;

/// How long an unused connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a new connection (and its TLS handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// At most this many unused connections are kept per pool; the oldest go.
pub const MAX_IDLE: usize = 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Plain TCP or TLS (checked against the system's roots plus the
/// certificates in `upstream_ca`), by the upstream's scheme.
fn connector(upstream_ca: Option<&Path>) -> Result<HttpsConnector<HttpConnector>, String> {
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
    // `https://` needs the connector to pass the scheme through.
    tcp.enforce_http(false);
    let tls = super::tls::upstream_client_config(upstream_ca).map_err(|e| e.to_string())?;
    Ok(HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp))
}

/// Why a request got no answer from the upstream.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made (refused, TLS handshake failed, no
    /// answer within the connect time-out), or a new one closed before the
    /// request was written: nothing was sent.
    Unsent(BoxError),
    /// The connection broke after the request, or part of it, was written:
    /// the outcome is unknown.
    Broken(hyper::Error),
}

/// Keep-alive connections to one upstream.
pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority`: where connections go.
    target: Uri,
    idle: Mutex<VecDeque<Idle>>,
    idle_timeout: Duration,
    /// Whether the task that closes expired idle connections runs.
    reaping: AtomicBool,
}

struct Idle {
    sender: SendRequest<GatewayBody>,
    since: Instant,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("target", &self.target)
            .field("idle", &self.idle_count())
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// An empty pool of connections to `target` (`scheme://authority/`);
    /// an `https://` one is checked against the system's roots plus the
    /// certificates in `upstream_ca` (PEM).
    ///
    /// # Errors
    ///
    /// Why the TLS settings cannot be built from `upstream_ca`.
    pub fn new(target: Uri, upstream_ca: Option<&Path>) -> Result<Arc<Self>, String> {
        Ok(Self::with_idle_timeout(
            connector(upstream_ca)?,
            target,
            IDLE_TIMEOUT,
        ))
    }

    fn with_idle_timeout(
        connector: HttpsConnector<HttpConnector>,
        target: Uri,
        idle_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            connector,
            target,
            idle: Mutex::new(VecDeque::new()),
            idle_timeout,
            reaping: AtomicBool::new(false),
        })
    }

    /// A pool like this one (same upstream and TLS settings), empty.
    #[must_use]
    pub fn empty_copy(&self) -> Arc<Self> {
        Self::with_idle_timeout(
            self.connector.clone(),
            self.target.clone(),
            self.idle_timeout,
        )
    }

    /// Unused connections held now.
    #[must_use]
    pub fn idle_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        // The deque is valid whatever panicked while it was held.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `req` (origin-form URI, `Host` set) on a pooled connection or
    /// a new one. The answer's body gives the connection back once read to
    /// its end.
    ///
    /// # Errors
    ///
    /// [`SendError`]: whether the request may have reached the upstream.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<GatewayBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        loop {
            let (mut sender, reused) = match self.take() {
                Some(sender) => (sender, true),
                // Boxed: the connector's future (TLS included) is large and
                // rarely run; inline, it would size every request's.
                None => (Box::pin(self.connect()).await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(res) => {
                    let back = Some(Back {
                        sender,
                        pool: Arc::downgrade(self),
                    });
                    return Ok(res.map(|body| UpstreamBody { body, back }));
                }
                Err(mut e) => match e.take_message() {
                    // Closed by the upstream while idle, before any byte
                    // of this request was written: another connection.
                    Some(unsent) if reused => req = unsent,
                    Some(_) => return Err(SendError::Unsent(Box::new(e.into_error()))),
                    None => return Err(SendError::Broken(e.into_error())),
                },
            }
        }
    }

    /// The most recently used connection that can take a request now.
    fn take(&self) -> Option<SendRequest<GatewayBody>> {
        let mut idle = self.lock();
        self.drop_stale(&mut idle, Instant::now());
        while let Some(entry) = idle.pop_back() {
            if entry.sender.is_ready() {
                return Some(entry.sender);
            }
            // Closed by the upstream since: dropped.
        }
        None
    }

    /// Drops the idle connections that expired or that the upstream
    /// closed, oldest first (the deque is in the order they came back).
    fn drop_stale(&self, idle: &mut VecDeque<Idle>, now: Instant) {
        while idle.front().is_some_and(|e| {
            now.duration_since(e.since) >= self.idle_timeout || e.sender.is_closed()
        }) {
            idle.pop_front();
        }
    }

    async fn connect(&self) -> Result<SendRequest<GatewayBody>, SendError> {
        let io = self
            .connector
            .clone()
            .oneshot(self.target.clone())
            .await
            .map_err(SendError::Unsent)?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| SendError::Unsent(Box::new(e)))?;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%error, "upstream connection closed");
            }
        });
        Ok(sender)
    }

    /// Keeps `sender` for the next request, if it can take one.
    fn put(self: &Arc<Self>, sender: SendRequest<GatewayBody>) {
        let now = Instant::now();
        {
            let mut idle = self.lock();
            self.drop_stale(&mut idle, now);
            while idle.len() >= MAX_IDLE {
                idle.pop_front();
            }
            idle.push_back(Idle { sender, since: now });
        }
        if !self.reaping.swap(true, Ordering::Relaxed) {
            self.start_reaper();
        }
    }

    /// Closes idle connections once expired, even when no request comes to
    /// find them; ends with the pool.
    fn start_reaper(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.reaping.store(false, Ordering::Relaxed);
            return;
        };
        let pool = Arc::downgrade(self);
        let every = self.idle_timeout;
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(pool) = pool.upgrade() else { return };
                pool.drop_stale(&mut pool.lock(), Instant::now());
            }
        });
    }
}

/// Where a connection goes back once its answer was read.
struct Back {
    sender: SendRequest<GatewayBody>,
    pool: Weak<Pool>,
}

/// An upstream answer's body; read to its end, it gives its connection
/// back to the pool (at once if the connection is ready for another
/// request, else once it is).
pub struct UpstreamBody {
    body: Incoming,
    back: Option<Back>,
}

impl fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("body", &self.body)
            .finish_non_exhaustive()
    }
}

impl UpstreamBody {
    fn give_back(&mut self) {
        let Some(Back { mut sender, pool }) = self.back.take() else {
            return;
        };
        let Some(pool) = pool.upgrade() else { return };
        if sender.is_ready() {
            pool.put(sender);
        } else if !sender.is_closed() {
            // Still finishing the answer it just read: back once ready.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    if sender.ready().await.is_ok() {
                        pool.put(sender);
                    }
                });
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            // The connection is not reused after an error.
            Poll::Ready(Some(Err(_))) => self.back = None,
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.give_back(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Read to its end without the last poll (an empty answer, or one
        // whose length was reached): the connection can still go back.
        // Dropped half read, it is closed with its connection.
        if self.body.is_end_stream() {
            self.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    use super::*;

    /// How the test upstream answers each request.
    #[derive(Clone, Copy)]
    enum Answer {
        /// 200 with a 2-byte body, keep-alive.
        KeepAlive,
        /// The same, then it closes the connection without saying so.
        ThenHangUp,
        /// 200 with `Connection: close`, then it closes.
        SaysClose,
        /// 200 with a 1 MB chunked body.
        Big,
        /// Reads the request and closes without answering.
        Nothing,
    }

    /// A raw HTTP/1.1 upstream: counts connections and requests; reports
    /// each connection's end (EOF from the gateway's side) on `closed`.
    struct Upstream {
        uri: Uri,
        connections: Arc<AtomicUsize>,
        requests: Arc<AtomicUsize>,
        closed: mpsc::UnboundedReceiver<()>,
    }

    async fn upstream(answer: Answer) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (tx, closed) = mpsc::unbounded_channel();
        let (c, r) = (Arc::clone(&connections), Arc::clone(&requests));
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(socket, answer, Arc::clone(&r), tx.clone()));
            }
        });
        Upstream {
            uri: format!("http://{addr}/").parse().expect("uri"),
            connections,
            requests,
            closed,
        }
    }

    async fn serve(
        mut socket: TcpStream,
        answer: Answer,
        requests: Arc<AtomicUsize>,
        closed: mpsc::UnboundedSender<()>,
    ) {
        let mut buf = Vec::new();
        let mut chunk = [0_u8; 1024];
        loop {
            // One request head (the tests send no bodies).
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match socket.read(&mut chunk).await {
                    Ok(0) | Err(_) => {
                        let _ = closed.send(());
                        return;
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.clear();
            requests.fetch_add(1, Ordering::SeqCst);
            let written = match answer {
                Answer::KeepAlive | Answer::ThenHangUp => {
                    socket
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                }
                Answer::SaysClose => {
                    socket
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
                        )
                        .await
                }
                Answer::Big => {
                    let mut out = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                    for _ in 0..64 {
                        out.extend_from_slice(b"4000\r\n");
                        out.extend_from_slice(&[b'x'; 0x4000]);
                        out.extend_from_slice(b"\r\n");
                    }
                    out.extend_from_slice(b"0\r\n\r\n");
                    socket.write_all(&out).await
                }
                Answer::Nothing => Err(std::io::ErrorKind::ConnectionAborted.into()),
            };
            if written.is_err() || !matches!(answer, Answer::KeepAlive | Answer::Big) {
                let _ = closed.send(());
                return;
            }
        }
    }

    fn get() -> Request<GatewayBody> {
        Request::builder()
            .uri("/orders")
            .header("host", "upstream")
            .body(GatewayBody::from(Bytes::new()))
            .expect("request")
    }

    async fn read_all(pool: &Arc<Pool>) -> Result<Bytes, SendError> {
        let res = pool.send(get()).await?;
        Ok(res
            .into_body()
            .collect()
            .await
            .map_err(SendError::Broken)?
            .to_bytes())
    }

    fn pool(up: &Upstream, idle_timeout: Duration) -> Arc<Pool> {
        Pool::with_idle_timeout(
            connector(None).expect("connector"),
            up.uri.clone(),
            idle_timeout,
        )
    }

    #[tokio::test]
    async fn an_answer_read_to_its_end_gives_its_connection_to_the_next_request() {
        let up = upstream(Answer::KeepAlive).await;
        let pool = pool(&up, IDLE_TIMEOUT);
        for _ in 0..5 {
            assert_eq!(read_all(&pool).await.expect("answer"), "ok");
        }
        assert_eq!(up.requests.load(Ordering::SeqCst), 5);
        assert_eq!(
            up.connections.load(Ordering::SeqCst),
            1,
            "one connection, reused"
        );
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_each_get_a_connection_and_all_come_back() {
        let up = upstream(Answer::KeepAlive).await;
        let pool = pool(&up, IDLE_TIMEOUT);
        for round in 0..2 {
            // Every request is sent before any answer is read.
            let mut answers = Vec::new();
            for _ in 0..8 {
                answers.push(pool.send(get()).await.expect("answer"));
            }
            for res in answers {
                let body = res.into_body().collect().await.expect("body").to_bytes();
                assert_eq!(body, "ok");
            }
            assert_eq!(up.connections.load(Ordering::SeqCst), 8, "round {round}");
            assert_eq!(pool.idle_count(), 8);
        }
    }

    #[tokio::test]
    async fn an_answer_dropped_half_read_closes_its_connection() {
        let mut up = upstream(Answer::Big).await;
        let pool = pool(&up, IDLE_TIMEOUT);
        let res = pool.send(get()).await.expect("answer");
        let mut body = res.into_body();
        let first = body.frame().await.expect("a frame").expect("data");
        assert!(first.is_data());
        drop(body);
        tokio::time::timeout(Duration::from_secs(5), up.closed.recv())
            .await
            .expect("the half-read connection is closed");
        assert_eq!(pool.idle_count(), 0);
        // A whole big answer gives its connection back.
        assert_eq!(read_all(&pool).await.expect("answer").len(), 64 * 0x4000);
        assert_eq!(up.connections.load(Ordering::SeqCst), 2);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_used_again() {
        for answer in [Answer::ThenHangUp, Answer::SaysClose] {
            let mut up = upstream(answer).await;
            let pool = pool(&up, IDLE_TIMEOUT);
            assert_eq!(read_all(&pool).await.expect("first"), "ok");
            up.closed.recv().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(read_all(&pool).await.expect("second"), "ok");
            assert_eq!(up.requests.load(Ordering::SeqCst), 2);
            assert_eq!(up.connections.load(Ordering::SeqCst), 2);
        }
    }

    #[tokio::test]
    async fn a_request_written_to_a_connection_that_broke_is_not_sent_again() {
        let up = upstream(Answer::Nothing).await;
        let pool = pool(&up, IDLE_TIMEOUT);
        match pool.send(get()).await {
            Err(SendError::Broken(_)) => {}
            other => panic!("expected a broken connection, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(up.requests.load(Ordering::SeqCst), 1, "sent once");
        assert_eq!(up.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_refused_connection_sends_nothing() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let pool = Pool::new(format!("http://{addr}/").parse().expect("uri"), None).expect("pool");
        assert!(matches!(pool.send(get()).await, Err(SendError::Unsent(_))));
    }

    #[tokio::test]
    async fn idle_connections_close_after_the_idle_timeout_with_no_request_to_find_them() {
        let mut up = upstream(Answer::KeepAlive).await;
        let pool = pool(&up, Duration::from_millis(100));
        assert_eq!(read_all(&pool).await.expect("answer"), "ok");
        assert_eq!(pool.idle_count(), 1);
        tokio::time::timeout(Duration::from_secs(5), up.closed.recv())
            .await
            .expect("the idle connection is closed");
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_pool_dropped_closes_its_idle_connections() {
        let mut up = upstream(Answer::KeepAlive).await;
        let pool = pool(&up, IDLE_TIMEOUT);
        assert_eq!(read_all(&pool).await.expect("answer"), "ok");
        drop(pool);
        tokio::time::timeout(Duration::from_secs(5), up.closed.recv())
            .await
            .expect("closed with the pool");
    }
}
