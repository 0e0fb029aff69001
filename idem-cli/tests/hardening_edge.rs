//! Attacks on the edge of `idem serve`, each reproduced before it was fixed:
//! hostile clients (idle sockets, many small headers) and a shutdown racing
//! a request whose client hung up.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{client, gateway, send, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sockets that connect and send nothing must not keep a real client out.
#[tokio::test]
async fn idle_sockets_do_not_stall_new_clients() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "[limits]\nmax_connections = 20\n").await;
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(TcpStream::connect(gw.local_addr()).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(3),
        send(&client(), gw.local_addr(), "GET", "/health", &[], ""),
    )
    .await
    .expect("a new client was stalled by idle sockets");
    assert_eq!(r.status, 201);
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(idle);
}

/// Idle sockets are closed after `idle_timeout`, and past the cap the
/// oldest are shed first; a socket that has sent its first byte is served.
#[tokio::test]
async fn idle_sockets_are_closed_oldest_first() {
    let up = Upstream::start().await;
    let gw = gateway(
        &up.url(),
        "[limits]\nmax_connections = 4\nidle_timeout = \"1s\"\n",
    )
    .await;
    let mut oldest = TcpStream::connect(gw.local_addr()).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut rest = Vec::new();
    for _ in 0..4 {
        rest.push(TcpStream::connect(gw.local_addr()).await.expect("connect"));
    }
    // Five waiting, four allowed: the oldest is closed at once.
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_millis(500), oldest.read(&mut buf))
        .await
        .expect("the oldest idle socket is shed at once");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // The others go once idle_timeout passes.
    let started = Instant::now();
    for s in &mut rest {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an idle socket outlived idle_timeout");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
    assert!(started.elapsed() >= Duration::from_millis(500));
    let r = send(&client(), gw.local_addr(), "GET", "/", &[], "").await;
    assert_eq!(r.status, 201);
}

/// An upstream that takes up to 1 000 headers (hyper's default is 100, so
/// the usual test upstream refuses such requests itself) and says how many
/// `x-h…` headers it saw.
async fn roomy_upstream() -> SocketAddr {
    use hyper::server::conn::http1;
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|req: hyper::Request<_>| async move {
                let seen = req
                    .headers()
                    .keys()
                    .filter(|n| n.as_str().starts_with("x-h"))
                    .count();
                hyper::Response::builder()
                    .status(201)
                    .header("x-seen-headers", seen)
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
            });
            tokio::spawn(
                http1::Builder::new()
                    .max_headers(1000)
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    addr
}

/// More than hyper's default 100 headers, well under `max_header_bytes`.
#[tokio::test]
async fn many_small_headers_under_the_byte_limit_are_accepted() {
    let up = roomy_upstream().await;
    let gw = gateway(&format!("http://{up}"), "").await;
    let names: Vec<String> = (0..150).map(|i| format!("x-h{i}")).collect();
    let headers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    for method in ["GET", "POST"] {
        let mut headers = headers.clone();
        headers.push(("idempotency-key", "k-headers"));
        let r = send(&client(), gw.local_addr(), method, "/", &headers, "").await;
        assert_eq!(r.status, 201, "{method}: 150 small headers were refused");
        assert_eq!(r.header("x-seen-headers"), Some("150"), "{method}");
    }
}

/// An upstream whose answers take `DELAY`, counting the calls that started
/// and the answers it finished.
#[derive(Clone, Default)]
struct SlowUpstream {
    started: Arc<AtomicUsize>,
    finished: Arc<AtomicUsize>,
}

const DELAY: Duration = Duration::from_millis(1500);

impl SlowUpstream {
    async fn start(&self) -> SocketAddr {
        let up = self.clone();
        let app = axum::Router::new().fallback(move || {
            let up = up.clone();
            async move {
                up.started.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(DELAY).await;
                up.finished.fetch_add(1, Ordering::SeqCst);
                (axum::http::StatusCode::CREATED, "done")
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }
}

/// A client hangs up while its request is at the upstream; the gateway is
/// told to stop. Shutdown must wait for that request's task (upstream call,
/// then `complete`), not only for connections: otherwise the process exits
/// between the two and the answer is never stored.
#[tokio::test]
async fn shutdown_waits_for_requests_whose_client_hung_up() {
    let up = SlowUpstream::default();
    let addr = up.start().await;
    let gw = gateway(&format!("http://{addr}"), "").await;
    let mut s = TcpStream::connect(gw.local_addr()).await.expect("connect");
    s.write_all(
        b"POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: k-bye\r\ncontent-length: 2\r\n\r\n{}",
    )
    .await
    .expect("send");
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.started.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The client hangs up; give the gateway time to see the connection end.
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(up.finished.load(Ordering::SeqCst), 0, "DELAY is too short");
    gw.shutdown().await.expect("shutdown");
    assert_eq!(
        up.finished.load(Ordering::SeqCst),
        1,
        "shutdown returned while a request task was still at the upstream"
    );
}
