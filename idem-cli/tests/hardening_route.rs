//! Attacks on `idem serve`'s routing and scoping, each reproduced before it
//! was fixed (issue 10, items 9, 10 and 13): odd spellings of a protected
//! path or method that skipped protection, tenants told apart by cookies
//! that shared keys, client keys that read derived records, and upstream
//! answers buffered without a limit.

mod support;

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use support::{client, gateway, gateway_with_env, send, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PAYMENTS: &str = r#"
[defaults]
key = "optional"

[[route]]
match = "POST /payments/*"
key = "required"
"#;

/// Every spelling that an upstream may route to `/payments/1` is governed by
/// the `POST /payments/*` rule: without a key it is refused, and nothing
/// reaches the upstream.
#[tokio::test]
async fn odd_spellings_of_a_protected_path_are_not_forwarded_unprotected() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), PAYMENTS).await;
    let (c, a) = (client(), gw.local_addr());
    for path in [
        "/payments/1",
        "//payments/1",
        "/payments//1",
        "/payments/1/",
        "/payments/./1",
        "/x/../payments/1",
        "/%70ayments/1",
        "/Payments/1",
    ] {
        send(&c, a, "POST", path, &[], "{}")
            .await
            .assert_problem(400, "idempotency_key_missing");
    }
    assert_eq!(
        up.total(),
        0,
        "an odd spelling reached the upstream unprotected"
    );
}

/// Methods are case-sensitive tokens, so `post` is not `POST`; but an
/// upstream may treat it like POST: it must not slip past a POST rule.
#[tokio::test]
async fn a_lower_case_method_is_not_a_way_around_a_rule() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), PAYMENTS).await;
    let mut s = TcpStream::connect(gw.local_addr()).await.expect("connect");
    s.write_all(
        b"post /payments/1 HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
    )
    .await
    .expect("write");
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
    assert_eq!(
        up.total(),
        0,
        "`post` reached the upstream unprotected: {out}"
    );
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("idempotency_key_missing"), "{out}");
}

/// Matching, fingerprint and forwarding use one normal form: two spellings
/// with one key are one request, and the upstream sees the normal path.
#[tokio::test]
async fn spellings_share_one_record_and_the_upstream_sees_the_normal_path() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), PAYMENTS).await;
    let (c, a) = (client(), gw.local_addr());
    let h = [("idempotency-key", "k-norm")];
    let first = send(&c, a, "POST", "/payments//1/?a=1&b=2", &h, "{}").await;
    let second = send(&c, a, "POST", "/payments/1?a=1&b=2", &h, "{}").await;
    assert_eq!(first.status, 201);
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    assert_eq!(second.body, first.body);
    assert_eq!(up.count("POST", "/payments/1", "k-norm"), 1);
    assert_eq!(up.total(), 1, "the upstream saw another path");
}

/// `%2F` is one segment here and two for many upstreams: refused.
#[tokio::test]
async fn an_encoded_slash_is_refused() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), PAYMENTS).await;
    let (c, a) = (client(), gw.local_addr());
    let h = [("idempotency-key", "k-slash")];
    send(&c, a, "POST", "/payments%2F1", &h, "{}")
        .await
        .assert_problem(400, "request_path_invalid");
    assert_eq!(up.total(), 0);
}

/// Tenants told apart by a session cookie (no `Authorization` header) do
/// not read each other's answers.
#[tokio::test]
async fn cookie_tenants_do_not_share_keys() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "").await;
    let (c, a) = (client(), gw.local_addr());
    let alice = [("idempotency-key", "order-1"), ("cookie", "session=alice")];
    let bob = [("idempotency-key", "order-1"), ("cookie", "session=bob")];
    let a1 = send(&c, a, "POST", "/orders", &alice, "{}").await;
    let b1 = send(&c, a, "POST", "/orders", &bob, "{}").await;
    assert_eq!(
        b1.header("idempotent-replayed"),
        None,
        "Bob got Alice's answer"
    );
    assert_ne!(a1.body, b1.body);
    assert_eq!(up.count("POST", "/orders", "order-1"), 2);
    let a2 = send(&c, a, "POST", "/orders", &alice, "{}").await;
    assert_eq!(a2.header("idempotent-replayed"), Some("true"));
    assert_eq!(a2.body, a1.body);
}

/// A derived record (key = fingerprint) cannot be read by a client sending
/// that fingerprint as its own key.
#[tokio::test]
async fn derived_keys_live_apart_from_client_keys() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "[defaults]\nkey = \"derived\"\n").await;
    let (c, a) = (client(), gw.local_addr());
    let derived = send(&c, a, "POST", "/orders", &[], "{}").await;
    assert_eq!(derived.status, 201);
    let again = send(&c, a, "POST", "/orders", &[], "{}").await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    let fp = idem::fingerprint::fingerprint(
        &http::Method::POST,
        &http::Uri::from_static("/orders"),
        &http::HeaderMap::new(),
        b"{}",
        &idem::fingerprint::FingerprintOptions {
            headers: &[http::HeaderName::from_static("content-type")],
            ..Default::default()
        },
    );
    // Whatever text the store key of a derived record holds after its scope,
    // a client key cannot spell it: neither the bare hex nor `derived:<hex>`.
    for forged in [fp.to_hex(), format!("derived:{}", fp.to_hex())] {
        let r = send(
            &c,
            a,
            "POST",
            "/orders",
            &[("idempotency-key", &forged)],
            "{}",
        )
        .await;
        assert_eq!(r.status, 201);
        assert_eq!(
            r.header("idempotent-replayed"),
            None,
            "the client key {forged} read a derived record"
        );
    }
}

/// `n` chunks of 64 KiB of `y`, of unknown length (sent chunked).
struct Chunks(usize);

impl Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.0 == 0 {
            return Poll::Ready(None);
        }
        self.0 -= 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'y'; 64 * 1024])))))
    }
}

/// An upstream whose answers are 3 MiB: `/big` with a `Content-Length`,
/// `/chunked` without one. Counts its calls.
async fn big_upstream(calls: Arc<AtomicUsize>) -> String {
    let app = axum::Router::new().fallback(move |uri: http::Uri| {
        let counted = Arc::clone(&calls);
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            if uri.path() == "/chunked" {
                axum::body::Body::new(Chunks(48))
            } else {
                axum::body::Body::from(vec![b'y'; 3 * 1024 * 1024])
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    upstream
}

/// An answer larger than `max_response_body` reaches the client whole (it
/// is streamed, not buffered), is not stored, and the key is released: a
/// retry executes again. Both with a `Content-Length` and chunked. Each is
/// counted in the admin listener's metrics.
#[tokio::test]
async fn a_huge_answer_is_streamed_not_stored() {
    let calls = Arc::new(AtomicUsize::new(0));
    let upstream = big_upstream(Arc::clone(&calls)).await;
    let token = |name: &str| (name == "IDEM_ADMIN_TOKEN").then(|| "t".repeat(32));
    let gw = gateway_with_env(
        &upstream,
        "admin_listen = \"127.0.0.1:0\"\n[defaults]\nmax_response_body = \"1MiB\"\n",
        &token,
    )
    .await;
    let (c, a) = (client(), gw.local_addr());
    for (n, path) in [(1, "/big"), (2, "/chunked")] {
        let key = format!("k-huge-{n}");
        let h = [("idempotency-key", key.as_str())];
        let first = send(&c, a, "POST", path, &h, "").await;
        assert_eq!(first.status, 200, "{path}");
        assert_eq!(
            first.body.len(),
            3 * 1024 * 1024,
            "{path}: the client gets the whole answer"
        );
        assert!(first.body.iter().all(|b| *b == b'y'), "{path}");
        let second = send(&c, a, "POST", path, &h, "").await;
        assert_eq!(second.header("idempotent-replayed"), None, "{path}");
        assert_eq!(second.body.len(), 3 * 1024 * 1024, "{path}");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2 * n,
            "{path}: not stored, so the retry executes"
        );
    }
    let admin = gw.admin_addr().expect("admin listener");
    let bearer = format!("Bearer {}", "t".repeat(32));
    let metrics = send(
        &c,
        admin,
        "GET",
        "/metrics",
        &[("authorization", &bearer)],
        "",
    )
    .await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("idem_response_too_large_total 4"), "{text}");
}

/// Under the limit nothing changes: the answer is stored and replayed.
#[tokio::test]
async fn an_answer_within_max_response_body_is_stored() {
    let calls = Arc::new(AtomicUsize::new(0));
    let upstream = big_upstream(Arc::clone(&calls)).await;
    let gw = gateway(&upstream, "[defaults]\nmax_response_body = \"4MiB\"\n").await;
    let (c, a) = (client(), gw.local_addr());
    for path in ["/big", "/chunked"] {
        let h = [("idempotency-key", path)];
        let first = send(&c, a, "POST", path, &h, "").await;
        let second = send(&c, a, "POST", path, &h, "").await;
        assert_eq!(second.header("idempotent-replayed"), Some("true"), "{path}");
        assert_eq!(second.body, first.body, "{path}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
