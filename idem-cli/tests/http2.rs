//! HTTP/2 on the listener (protocol §14): ALPN `h2` with TLS, prior
//! knowledge (h2c) without; the §4 answers and replays byte for byte the
//! same as HTTP/1.1's; many same-key streams on one connection execute once.

mod support;

mod certs;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::sync::Barrier;

use certs::Pki;
use support::{gateway, Reply, Upstream};

/// One client connection, HTTP/1.1 or HTTP/2, in TLS or not.
#[derive(Clone)]
enum Conn {
    H1(Arc<tokio::sync::Mutex<http1::SendRequest<Full<Bytes>>>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

#[derive(Clone, Copy, Debug)]
enum Transport {
    Plain,
    Tls,
}

async fn connect(
    addr: SocketAddr,
    transport: Transport,
    h2: bool,
    pki: Option<&Pki>,
) -> (Conn, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let base = match transport {
        Transport::Plain => format!("http://{addr}"),
        Transport::Tls => format!("https://localhost:{}", addr.port()),
    };
    match transport {
        Transport::Plain => (handshake(TokioIo::new(tcp), h2).await, base),
        Transport::Tls => {
            let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
            let connector = pki.expect("a PKI for TLS").client(alpn);
            let name = ServerName::try_from("localhost").expect("a name");
            let tls = connector.connect(name, tcp).await.expect("TLS handshake");
            let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            let expected: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
            assert_eq!(negotiated.as_deref(), Some(expected), "ALPN");
            (handshake(TokioIo::new(tls), h2).await, base)
        }
    }
}

async fn handshake<I>(io: I, h2: bool) -> Conn
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    if h2 {
        let (send, conn) = http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        Conn::H2(send)
    } else {
        let (send, conn) = http1::handshake(io).await.expect("h1 handshake");
        tokio::spawn(conn);
        Conn::H1(Arc::new(tokio::sync::Mutex::new(send)))
    }
}

impl Conn {
    async fn send(
        &self,
        base: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let mut req = Request::builder().method(method);
        req = match self {
            // HTTP/1.1 sends the path and a Host header.
            Conn::H1(_) => req
                .uri(path)
                .header("host", base.split("//").nth(1).unwrap_or(base)),
            Conn::H2(_) => req.uri(format!("{base}{path}")),
        };
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let req = req
            .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
            .expect("request");
        let res = match self {
            Conn::H1(send) => {
                let mut send = send.lock().await;
                send.ready().await.expect("h1 ready");
                send.send_request(req).await.expect("h1 answer")
            }
            Conn::H2(send) => {
                let mut send = send.clone();
                send.ready().await.expect("h2 ready");
                send.send_request(req).await.expect("h2 answer")
            }
        };
        let (parts, body) = res.into_parts();
        Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: body.collect().await.expect("body").to_bytes(),
        }
    }
}

/// Everything of an answer but its `date`, in order.
fn bytes_of(r: &Reply) -> (u16, Vec<(String, Vec<u8>)>, Bytes) {
    let headers = r
        .headers
        .iter()
        .filter(|(n, _)| *n != "date")
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    (r.status, headers, r.body.clone())
}

fn key(tag: &str) -> String {
    format!("{tag}-{:016x}", rand::random::<u64>())
}

/// A request the layer answers itself: path, headers, body, status, code.
type Case<'a> = (&'a str, Vec<(&'a str, String)>, &'a str, u16, &'a str);

/// The same requests over HTTP/1.1 and over HTTP/2 get the same answers:
/// a replay, and each §4 answer the layer gives itself.
async fn same_answers_as_http1(gw_addr: SocketAddr, transport: Transport, pki: Option<&Pki>) {
    let (h1, base) = connect(gw_addr, transport, false, pki).await;
    let (h2, _) = connect(gw_addr, transport, true, pki).await;
    let with = |k: &str| {
        [
            ("idempotency-key", k.to_owned()),
            ("x-request-id", "req-1".to_owned()),
        ]
    };

    // A first POST over HTTP/1.1, then its replay over both.
    let k = key("replay");
    let hk = with(&k);
    let hk: Vec<(&str, &str)> = hk.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let first = h1.send(&base, "POST", "/orders", &hk, "{\"a\":1}").await;
    assert_eq!(first.status, 201);
    let r1 = h1.send(&base, "POST", "/orders", &hk, "{\"a\":1}").await;
    let r2 = h2.send(&base, "POST", "/orders", &hk, "{\"a\":1}").await;
    assert_eq!(r1.header("idempotent-replayed"), Some("true"));
    assert_eq!(bytes_of(&r1), bytes_of(&r2), "replay over {transport:?}");
    // A replay over HTTP/2 of a key first executed over HTTP/2.
    let k2 = key("replay-h2");
    let hk2 = with(&k2);
    let hk2: Vec<(&str, &str)> = hk2.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let first2 = h2.send(&base, "POST", "/orders", &hk2, "{}").await;
    assert_eq!(first2.status, 201);
    let again1 = h1.send(&base, "POST", "/orders", &hk2, "{}").await;
    let again2 = h2.send(&base, "POST", "/orders", &hk2, "{}").await;
    assert_eq!(bytes_of(&again1), bytes_of(&again2));

    // §4: the same key with another body (422), no key (400), a key too
    // long (400), a key in progress (409).
    let cases: Vec<Case<'_>> = vec![
        (
            "/orders",
            with(&k).to_vec(),
            "{\"a\":2}",
            422,
            "idempotency_key_reused",
        ),
        (
            "/orders",
            vec![("x-request-id", "req-1".to_owned())],
            "{}",
            400,
            "idempotency_key_missing",
        ),
        (
            "/orders",
            with(&"k".repeat(300)).to_vec(),
            "{}",
            400,
            "idempotency_key_invalid",
        ),
    ];
    for (path, headers, body, status, code) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let a = h1.send(&base, "POST", path, &headers, body).await;
        let b = h2.send(&base, "POST", path, &headers, body).await;
        a.assert_problem(status, code);
        assert_eq!(bytes_of(&a), bytes_of(&b), "{code} over {transport:?}");
    }
    let k = key("held");
    let hk = with(&k);
    let hk: Vec<(&str, &str)> = hk.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let holder = {
        let (h1, base, hk) = (
            h1.clone(),
            base.clone(),
            hk.iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect::<Vec<_>>(),
        );
        tokio::spawn(async move {
            let hk: Vec<(&str, &str)> = hk.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            h1.send(&base, "POST", "/slow?slow_first_ms=1500", &hk, "")
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The holder keeps the HTTP/1.1 connection busy: a second one.
    let (h1b, _) = connect(gw_addr, transport, false, pki).await;
    let a = h1b
        .send(&base, "POST", "/slow?slow_first_ms=1500", &hk, "")
        .await;
    let b = h2
        .send(&base, "POST", "/slow?slow_first_ms=1500", &hk, "")
        .await;
    a.assert_problem(409, "idempotency_key_in_progress");
    assert_eq!(bytes_of(&a), bytes_of(&b), "409 over {transport:?}");
    assert_eq!(holder.await.expect("holder").status, 201);
}

#[tokio::test]
async fn h2c_answers_byte_for_byte_as_http1() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "").await;
    same_answers_as_http1(gw.local_addr(), Transport::Plain, None).await;
    gw.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn tls_with_alpn_h2_answers_byte_for_byte_as_http1_over_tls() {
    let pki = Pki::new("listener");
    let up = Upstream::start().await;
    let gw = gateway(
        &up.url(),
        &format!(
            "tls_cert = {:?}\ntls_key = {:?}",
            pki.cert.display().to_string(),
            pki.key.display().to_string()
        ),
    )
    .await;
    same_answers_as_http1(gw.local_addr(), Transport::Tls, Some(&pki)).await;
    gw.shutdown().await.expect("shutdown");
}

/// 100 streams with one key, released together on ONE HTTP/2 connection:
/// exactly one reaches the upstream (the others get 409 in progress, or
/// the replay if they come late).
async fn hundred_streams_execute_once(transport: Transport) {
    let pki = Pki::new("streams");
    let up = Upstream::start().await;
    let extra = match transport {
        Transport::Plain => String::new(),
        Transport::Tls => format!(
            "tls_cert = {:?}\ntls_key = {:?}",
            pki.cert.display().to_string(),
            pki.key.display().to_string()
        ),
    };
    let gw = gateway(&up.url(), &extra).await;
    let (conn, base) = connect(gw.local_addr(), transport, true, Some(&pki)).await;
    let k = key("streams");
    let barrier = Arc::new(Barrier::new(100));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (conn, base, k, barrier) =
                (conn.clone(), base.clone(), k.clone(), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                let h = [("idempotency-key", k.as_str())];
                conn.send(&base, "POST", "/pay?slow_first_ms=300", &h, "{}")
                    .await
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.expect("stream").status);
    }
    assert_eq!(
        up.count("POST", "/pay", &k),
        1,
        "100 same-key streams on one HTTP/2 connection ({transport:?}) must execute once; \
         more means the reservation was not atomic per key"
    );
    assert!(
        statuses.iter().all(|s| matches!(s, 201 | 409)),
        "{statuses:?}"
    );
    gw.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_same_key_streams_on_one_h2c_connection_execute_once() {
    hundred_streams_execute_once(Transport::Plain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_same_key_streams_on_one_tls_h2_connection_execute_once() {
    hundred_streams_execute_once(Transport::Tls).await;
}

#[tokio::test]
async fn an_h2_head_over_max_header_bytes_is_refused_before_the_upstream() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "[limits]\nmax_header_bytes = \"8KiB\"").await;
    let (conn, base) = connect(gw.local_addr(), Transport::Plain, true, None).await;
    let Conn::H2(send) = conn else {
        panic!("an HTTP/2 connection")
    };
    let big = "x".repeat(20 * 1024);
    let k = key("big-head");
    let req = Request::builder()
        .method("POST")
        .uri(format!("{base}/orders"))
        .header("idempotency-key", &k)
        .header("x-big", &big)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let mut send = send.clone();
    let answer = async {
        send.ready().await?;
        send.send_request(req).await
    }
    .await;
    match answer {
        Ok(res) => assert_eq!(res.status(), 431, "an oversized head"),
        // The h2 layer may also reset the stream or the connection.
        Err(e) => eprintln!("refused by the HTTP/2 layer: {e}"),
    }
    assert_eq!(up.total(), 0, "nothing reached the upstream");
    gw.shutdown().await.expect("shutdown");
}
