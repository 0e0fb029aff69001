//! Attacks on `idem serve`'s routing and scoping, each reproduced before it
//! was fixed (issue 10, items 9 and 10): odd spellings of a protected path
//! or method that skipped protection, tenants told apart by cookies that
//! shared keys, and client keys that read derived records.

mod support;

use std::time::Duration;

use support::{client, gateway, send, Upstream};
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
