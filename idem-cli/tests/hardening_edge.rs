//! Attacks on the edge of `idem serve`, each reproduced before it was fixed:
//! hostile clients (oversized bodies sent without `Expect`, idle sockets,
//! many small headers, a client that hangs up mid-answer), a shutdown
//! racing a request whose client hung up,
//! and log lines that must name their request and never a secret.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{client, gateway, send, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A client that sends a too-large body without `Expect: 100-continue`
/// (most SDKs) must read the 413, not a reset.
#[tokio::test]
async fn an_oversized_body_without_expect_gets_its_413() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "[defaults]\nmax_body = \"64KiB\"\n").await;
    let mut ok = 0;
    for _ in 0..10 {
        let mut s = TcpStream::connect(gw.local_addr()).await.expect("connect");
        let body = vec![b'x'; 1024 * 1024];
        let head = format!(
            "POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: k-big\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        // Like Python's http.client and most SDKs: the whole request is
        // written before the answer is read, and a failed write (broken
        // pipe, reset) is the call's error: the 413 is never seen.
        let mut sent = s.write_all(head.as_bytes()).await.is_ok();
        for chunk in body.chunks(16 * 1024) {
            if !sent || s.write_all(chunk).await.is_err() {
                sent = false;
                break;
            }
            // A client on a real network is slower than loopback.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        ok += usize::from(sent && out.starts_with(b"HTTP/1.1 413"));
    }
    assert_eq!(ok, 10, "clients that kept sending lost their 413");
    assert_eq!(up.total(), 0);
}

/// Read until the end of an answer's head (or the connection's end, or 5 s).
async fn read_head(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while !out.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// With `Expect: 100-continue` and a declared length over `max_body`, the
/// client gets its 413 at once and is never asked for the body.
#[tokio::test]
async fn an_oversized_body_with_expect_is_refused_before_it_is_sent() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "[defaults]\nmax_body = \"64KiB\"\n").await;
    let mut s = TcpStream::connect(gw.local_addr()).await.expect("connect");
    s.write_all(
        b"POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: k-expect\r\n\
          expect: 100-continue\r\ncontent-length: 1048576\r\n\r\n",
    )
    .await
    .expect("send the head");
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head:?}");
    assert_eq!(up.total(), 0);
}

/// A chunked body (no length declared) is refused once it passes
/// `max_body`; its client, still sending, reads the 413 too.
#[tokio::test]
async fn an_oversized_chunked_body_gets_its_413() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "[defaults]\nmax_body = \"64KiB\"\n").await;
    let mut s = TcpStream::connect(gw.local_addr()).await.expect("connect");
    let mut sent = s
        .write_all(
            b"POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: k-chunked\r\n\
              transfer-encoding: chunked\r\n\r\n",
        )
        .await
        .is_ok();
    let chunk = vec![b'x'; 16 * 1024];
    for _ in 0..32 {
        let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
        frame.extend_from_slice(&chunk);
        frame.extend_from_slice(b"\r\n");
        if !sent || s.write_all(&frame).await.is_err() {
            sent = false;
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    sent = sent && s.write_all(b"0\r\n\r\n").await.is_ok();
    let head = read_head(&mut s).await;
    assert!(sent, "the client could not finish sending: {head:?}");
    assert!(head.starts_with("HTTP/1.1 413"), "{head:?}");
    assert_eq!(up.total(), 0);
}

/// A refused request with a small body leaves the connection usable.
#[tokio::test]
async fn a_small_refused_body_keeps_the_connection() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "").await;
    let mut s = TcpStream::connect(gw.local_addr()).await.expect("connect");
    // No Idempotency-Key: refused with 400 before the body is read.
    s.write_all(b"POST /orders HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
        .await
        .expect("send");
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head:?}");
    assert!(
        !head.to_ascii_lowercase().contains("connection: close"),
        "{head:?}"
    );
    // The rest of that answer (its body), then a second request.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut rest = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut rest)).await;
    s.write_all(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("send again");
    let head = read_head(&mut s).await;
    assert!(head.contains("HTTP/1.1 201"), "{head:?}");
}

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

/// A loopback port where nothing listens.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("addr").port()
}

/// `idem serve` at the default log level, its stderr collected line by line.
struct Serve {
    child: std::process::Child,
    log: Arc<Mutex<String>>,
}

impl Serve {
    fn start(args: &[&str], env: &[(&str, &str)]) -> (Self, SocketAddr) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_idem"));
        for (k, _) in std::env::vars() {
            if k.starts_with("IDEM_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd
            .arg("serve")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run idem");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line
                    .split("local_addr=")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                {
                    let _ = tx.send(addr);
                }
                let mut log = sink.lock().expect("lock");
                log.push_str(&line);
                log.push('\n');
            }
        });
        let serve = Self { child, log };
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("idem serve did not start:\n{}", serve.log()));
        (serve, addr)
    }

    fn log(&self) -> String {
        self.log.lock().expect("lock").clone()
    }

    /// The log once it has a line containing `needle` (or after 10 s).
    async fn log_with(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if log.contains(needle) || Instant::now() > deadline {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// At the default level, the warning a request causes carries its request
/// id, and neither its key nor its credentials.
#[tokio::test]
async fn request_warnings_carry_the_request_id_and_no_secret() {
    let upstream = format!("http://127.0.0.1:{}", closed_port());
    let (serve, addr) = Serve::start(&["--upstream", &upstream, "--listen", "127.0.0.1:0"], &[]);
    let h = [
        ("idempotency-key", "secret-key-123"),
        ("authorization", "Bearer hunter2"),
    ];
    let r = send(&client(), addr, "POST", "/orders", &h, "{}").await;
    assert_eq!(r.status, 502, "{:?}", r.body);
    let id = r.header("x-request-id").expect("a request id").to_owned();
    let log = serve.log_with("upstream refused").await;
    let line = log
        .lines()
        .find(|l| l.contains("upstream refused"))
        .unwrap_or_else(|| panic!("no warning about the upstream in:\n{log}"));
    assert!(
        line.contains(&id),
        "the warning lacks the request id {id}: {line}"
    );
    for secret in ["secret-key-123", "hunter2"] {
        assert!(!log.contains(secret), "`{secret}` in the log:\n{log}");
    }
}

/// A request that passes through (a GET) writes no line of its own, but a
/// warning it causes is in its request span all the same: its id, method
/// and path, as a guarded request's are.
#[tokio::test]
async fn a_pass_through_warning_carries_the_request_id_method_and_path() {
    let upstream = format!("http://127.0.0.1:{}", closed_port());
    let (serve, addr) = Serve::start(&["--upstream", &upstream, "--listen", "127.0.0.1:0"], &[]);
    let h = [("authorization", "Bearer hunter2")];
    let r = send(&client(), addr, "GET", "/catalog/items", &h, "").await;
    assert_eq!(r.status, 502, "{:?}", r.body);
    let id = r.header("x-request-id").expect("a request id").to_owned();
    let log = serve.log_with(&id).await;
    let line = log
        .lines()
        .find(|l| l.contains("upstream refused"))
        .unwrap_or_else(|| panic!("no warning about the upstream in:\n{log}"));
    for part in [id.as_str(), "method=GET", "path=/catalog/items"] {
        assert!(line.contains(part), "the warning lacks `{part}`: {line}");
    }
    assert!(!log.contains("hunter2"), "a credential in the log:\n{log}");
}

/// An admin purge is logged with the key's log id, not the client's key.
#[tokio::test]
async fn an_admin_purge_names_the_key_by_its_log_id() {
    let up = Upstream::start().await;
    let token = "admin-token-of-32-random-chars!!";
    let (serve, addr) = Serve::start(
        &[
            "--upstream",
            &up.url(),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        &[("IDEM_ADMIN_TOKEN", token)],
    );
    let log = serve.log_with("admin listener").await;
    let admin: SocketAddr = log
        .lines()
        .find(|l| l.contains("admin listener"))
        .and_then(|l| l.split("addr=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no admin address in:\n{log}"));
    let mut h = vec![
        ("idempotency-key", "secret-key-123"),
        ("authorization", "Bearer hunter2"),
    ];
    let r = send(&client(), addr, "POST", "/orders", &h, "{}").await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    // The store key, as the gateway builds it.
    let mut headers = http::HeaderMap::new();
    headers.insert("authorization", "Bearer hunter2".parse().expect("a value"));
    let scope = idem::Scope::from_headers(&headers, &idem::RoutePolicy::default().scope_headers);
    let key = idem::StoreKey::new(&scope, "secret-key-123");
    let bearer = format!("Bearer {token}");
    h = vec![("authorization", bearer.as_str())];
    let path = format!("/records/{}", key.as_str());
    let r = send(&client(), admin, "DELETE", &path, &h, "").await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    let log = serve.log_with("purged").await;
    let line = log
        .lines()
        .find(|l| l.contains("purged"))
        .unwrap_or_else(|| panic!("no purge line in:\n{log}"));
    assert!(line.contains(&key.log_id().to_string()), "{line}");
    for secret in ["secret-key-123", "hunter2", token] {
        assert!(!log.contains(secret), "`{secret}` in the log:\n{log}");
    }
}

/// An upstream that counts its connections and answers `/big` with 16 MiB
/// (more than the sockets between it and a client hold) and anything else
/// with `small`.
async fn counting_upstream(connections: Arc<AtomicUsize>) -> SocketAddr {
    use hyper::server::conn::http1;
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            connections.fetch_add(1, Ordering::SeqCst);
            let service = hyper::service::service_fn(|req: hyper::Request<_>| async move {
                let body = if req.uri().path() == "/big" {
                    bytes::Bytes::from(vec![b'x'; 16 * 1024 * 1024])
                } else {
                    bytes::Bytes::from_static(b"small")
                };
                hyper::Response::builder().body(http_body_util::Full::new(body))
            });
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });
    addr
}

/// A client hangs up in the middle of a large pass-through answer: the
/// upstream connection carrying it is not given to the next request (which
/// would read the rest of someone else's answer), and the requests after
/// it share one kept-alive upstream connection.
#[tokio::test]
async fn a_client_hanging_up_mid_answer_spoils_no_later_request() {
    let connections = Arc::new(AtomicUsize::new(0));
    let up = counting_upstream(Arc::clone(&connections)).await;
    let gw = gateway(&format!("http://{up}"), "").await;
    let mut s = TcpStream::connect(gw.local_addr()).await.expect("connect");
    s.write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("send");
    let mut first = vec![0u8; 64 * 1024];
    let mut read = 0;
    while read < first.len() {
        match s.read(&mut first[read..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => read += n,
        }
    }
    assert!(first.starts_with(b"HTTP/1.1 200"), "the big answer began");
    drop(s);
    let c = client();
    for i in 0..10 {
        let r = send(&c, gw.local_addr(), "GET", "/small", &[], "").await;
        assert_eq!((r.status, &r.body[..]), (200, &b"small"[..]), "request {i}");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        2,
        "one connection for the abandoned answer, one kept alive for the rest"
    );
}
