//! End to end: `idem serve` on port 0 in front of a counting upstream.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{client, gateway, send, Upstream};
use tokio::sync::Barrier;

const JSON: (&str, &str) = ("content-type", "application/json");

#[tokio::test]
async fn replay_is_identical_and_marked() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "").await;
    let c = client();
    let h = [("idempotency-key", "k-replay"), JSON];
    let first = send(&c, gw.local_addr(), "POST", "/orders", &h, "{\"a\":1}").await;
    let second = send(&c, gw.local_addr(), "POST", "/orders", &h, "{\"a\":1}").await;
    assert_eq!(first.status, 201);
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    assert_eq!(second.status, first.status);
    assert_eq!(second.body, first.body, "replay must be byte-identical");
    for name in ["x-execution", "set-cookie", "content-type"] {
        assert_eq!(second.header(name), first.header(name), "header {name}");
    }
    assert_eq!(up.count("POST", "/orders", "k-replay"), 1);
    // The upstream saw the key and a request id; the client gets the id back.
    assert!(first.header("x-request-id").is_some_and(|v| !v.is_empty()));
    assert_eq!(
        first.header("x-seen-request-id"),
        first.header("x-request-id")
    );
    gw.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_sent_request_id_is_kept() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "").await;
    let c = client();
    let h = [("idempotency-key", "k-rid"), ("x-request-id", "trace-123")];
    let r = send(&c, gw.local_addr(), "POST", "/orders", &h, "").await;
    assert_eq!(r.header("x-request-id"), Some("trace-123"));
    assert_eq!(r.header("x-seen-request-id"), Some("trace-123"));
}

#[tokio::test]
async fn key_errors() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "").await;
    let (c, a) = (client(), gw.local_addr());
    send(&c, a, "POST", "/orders", &[], "{}")
        .await
        .assert_problem(400, "idempotency_key_missing");
    let long = "k".repeat(256);
    for bad in ["", "a b", "a,b", "\"unterminated", long.as_str()] {
        send(&c, a, "POST", "/orders", &[("idempotency-key", bad)], "{}")
            .await
            .assert_problem(400, "idempotency_key_invalid");
    }
    send(
        &c,
        a,
        "POST",
        "/orders",
        &[("idempotency-key", "a"), ("idempotency-key", "b")],
        "{}",
    )
    .await
    .assert_problem(400, "idempotency_key_invalid");
    // A quoted sf-string is the same key as the bare token.
    let bare = send(&c, a, "POST", "/orders", &[("idempotency-key", "same")], "").await;
    let quoted = send(
        &c,
        a,
        "POST",
        "/orders",
        &[("idempotency-key", "\"same\"")],
        "",
    )
    .await;
    assert_eq!(bare.status, 201);
    assert_eq!(quoted.header("idempotent-replayed"), Some("true"));
    assert_eq!(up.total(), 1, "bad keys must never reach the upstream");
}

#[tokio::test]
async fn reuse_with_another_body_is_422() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "").await;
    let (c, a) = (client(), gw.local_addr());
    let h = [("idempotency-key", "k-reuse"), JSON];
    assert_eq!(
        send(&c, a, "POST", "/orders", &h, "{\"n\":1}").await.status,
        201
    );
    send(&c, a, "POST", "/orders", &h, "{\"n\":2}")
        .await
        .assert_problem(422, "idempotency_key_reused");
    send(&c, a, "POST", "/other", &h, "{\"n\":1}")
        .await
        .assert_problem(422, "idempotency_key_reused");
    assert_eq!(up.total(), 1);
}

#[tokio::test]
async fn server_errors_are_released_and_client_errors_stored() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "").await;
    let (c, a) = (client(), gw.local_addr());
    for _ in 0..2 {
        let r = send(
            &c,
            a,
            "POST",
            "/pay?status=500",
            &[("idempotency-key", "k5")],
            "",
        )
        .await;
        assert_eq!(r.status, 500);
        assert_eq!(r.header("idempotent-replayed"), None);
    }
    assert_eq!(
        up.count("POST", "/pay", "k5"),
        2,
        "a 5xx must be re-executable"
    );
    for _ in 0..2 {
        let r = send(
            &c,
            a,
            "POST",
            "/pay?status=404",
            &[("idempotency-key", "k4")],
            "",
        )
        .await;
        assert_eq!(r.status, 404);
    }
    assert_eq!(
        up.count("POST", "/pay", "k4"),
        1,
        "a 404 is stored and replayed"
    );
}

#[tokio::test]
async fn get_and_put_pass_through_patch_participates() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "").await;
    let (c, a) = (client(), gw.local_addr());
    for method in ["GET", "PUT"] {
        for _ in 0..2 {
            let r = send(&c, a, method, "/thing?status=200", &[], "").await;
            assert_eq!(r.status, 200, "{method} needs no key");
        }
        assert_eq!(
            up.count(method, "/thing", "-"),
            2,
            "{method} passes through"
        );
    }
    send(&c, a, "PATCH", "/thing", &[], "{}")
        .await
        .assert_problem(400, "idempotency_key_missing");
    for _ in 0..2 {
        send(&c, a, "PATCH", "/thing", &[("idempotency-key", "kp")], "{}").await;
    }
    assert_eq!(up.count("PATCH", "/thing", "kp"), 1);
}

#[tokio::test]
async fn scopes_are_separate() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "").await;
    let (c, a) = (client(), gw.local_addr());
    for auth in ["Bearer alice", "Bearer bob", "Bearer alice"] {
        let h = [("idempotency-key", "shared"), ("authorization", auth)];
        send(&c, a, "POST", "/orders", &h, "").await;
    }
    assert_eq!(
        up.count("POST", "/orders", "shared"),
        2,
        "one key under two Authorization values is two keys"
    );
}

#[tokio::test]
async fn derived_and_optional_keys() {
    let up = Upstream::start().await;
    let routes = r#"
[[route]]
match = "POST /derived"
key = "derived"
dedupe_window = "10s"

[[route]]
match = "POST /optional"
key = "optional"
"#;
    let gw = gateway(&up.url(), routes).await;
    let (c, a) = (client(), gw.local_addr());
    let first = send(&c, a, "POST", "/derived", &[JSON], "{\"cart\":1}").await;
    let again = send(&c, a, "POST", "/derived", &[JSON], "{\"cart\":1}").await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, first.body);
    send(&c, a, "POST", "/derived", &[JSON], "{\"cart\":2}").await;
    assert_eq!(
        up.count("POST", "/derived", "-"),
        2,
        "same body once, other body again"
    );
    for _ in 0..2 {
        send(&c, a, "POST", "/optional", &[], "{}").await;
    }
    assert_eq!(up.count("POST", "/optional", "-"), 2, "no key: unprotected");
    for _ in 0..2 {
        send(
            &c,
            a,
            "POST",
            "/optional",
            &[("idempotency-key", "ko")],
            "{}",
        )
        .await;
    }
    assert_eq!(
        up.count("POST", "/optional", "ko"),
        1,
        "a key still protects"
    );
}

#[tokio::test]
async fn body_over_max_body_is_413_and_never_forwarded() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "[defaults]\nmax_body = \"1KiB\"").await;
    let (c, a) = (client(), gw.local_addr());
    let big = "x".repeat(1025);
    send(
        &c,
        a,
        "POST",
        "/orders",
        &[("idempotency-key", "big")],
        &big,
    )
    .await
    .assert_problem(413, "idempotency_body_too_large");
    let ok = send(
        &c,
        a,
        "POST",
        "/orders",
        &[("idempotency-key", "big")],
        &big[..1024],
    )
    .await;
    assert_eq!(
        ok.status, 201,
        "413 must not have stored anything under the key"
    );
    assert_eq!(up.total(), 1);
}

#[tokio::test]
async fn upstream_refused_is_502_and_released() {
    // A port nothing listens on.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", dead.local_addr().expect("addr"));
    drop(dead);
    let gw = gateway(&url, "").await;
    let (c, a) = (client(), gw.local_addr());
    let h = [("idempotency-key", "k502")];
    send(&c, a, "POST", "/orders", &h, "")
        .await
        .assert_problem(502, "upstream_unavailable");
    // Released: the retry is forwarded again (and fails again), not a 409.
    send(&c, a, "POST", "/orders", &h, "")
        .await
        .assert_problem(502, "upstream_unavailable");
}

#[tokio::test]
async fn upstream_timeout_holds_the_key_until_the_lease_runs_out() {
    let up = Upstream::start().await;
    let gw = gateway(
        &up.url(),
        // A 1s lease needs store calls bounded by a third of it.
        "[defaults]\nupstream_timeout = \"200ms\"\nlease = \"1s\"\n\
         [limits]\nstore_timeout = \"300ms\"",
    )
    .await;
    let (c, a) = (client(), gw.local_addr());
    let h = [("idempotency-key", "k-hold")];
    send(&c, a, "POST", "/slow?slow_first_ms=600", &h, "")
        .await
        .assert_problem(504, "upstream_timeout");
    let held = send(&c, a, "POST", "/slow?slow_first_ms=600", &h, "").await;
    held.assert_problem(409, "idempotency_key_in_progress");
    assert!(held
        .header("retry-after")
        .is_some_and(|v| v.parse::<u64>().is_ok_and(|s| s >= 1)));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = send(&c, a, "POST", "/slow?slow_first_ms=600", &h, "").await;
    assert_eq!(after.status, 201, "after the lease the key executes again");
    assert_eq!(up.count("POST", "/slow", "k-hold"), 2);
}

#[tokio::test]
async fn concurrent_duplicate_in_reject_mode_gets_409() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "").await;
    let (c, a) = (client(), gw.local_addr());
    let h = [("idempotency-key", "k409")];
    let slow = {
        let c = c.clone();
        tokio::spawn(async move { send(&c, a, "POST", "/orders?delay_ms=300", &h, "").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let dup = send(&c, a, "POST", "/orders?delay_ms=300", &h, "").await;
    dup.assert_problem(409, "idempotency_key_in_progress");
    assert!(dup.header("retry-after").is_some());
    assert_eq!(slow.await.expect("task").status, 201);
}

#[tokio::test]
async fn store_full_of_in_flight_records_is_503_closed() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "[limits]\nmemory_max_entries = 1").await;
    let (c, a) = (client(), gw.local_addr());
    let holder = hold_a_key(&c, a, "k1").await;
    let r = send(&c, a, "POST", "/orders", &[("idempotency-key", "k2")], "").await;
    r.assert_problem(503, "idempotency_store_unavailable");
    assert!(r.header("retry-after").is_some());
    assert_eq!(
        up.count("POST", "/orders", "k2"),
        0,
        "closed: nothing forwarded"
    );
    assert_eq!(holder.await.expect("task").status, 201);
}

async fn hundred_at_once(mode: &str) {
    hundred_at_once_with(mode, "").await;
}

async fn hundred_at_once_with(mode: &str, limits: &str) {
    let up = Upstream::start().await;
    let cfg = format!("[defaults]\nconcurrent = \"{mode}\"\n[limits]\n{limits}");
    let gw = gateway(&up.url(), &cfg).await;
    let a = gw.local_addr();
    let barrier = Arc::new(Barrier::new(100));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                // Each on its own connection pool: distinct clients.
                let c = client();
                barrier.wait().await;
                send(
                    &c,
                    a,
                    "POST",
                    "/orders?delay_ms=100",
                    &[("idempotency-key", "burst")],
                    "{}",
                )
                .await
            })
        })
        .collect();
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.expect("task"));
    }
    assert_eq!(
        up.count("POST", "/orders", "burst"),
        1,
        "{mode}: 100 concurrent identical requests must execute once"
    );
    let ok: Vec<_> = replies.iter().filter(|r| r.status == 201).collect();
    if mode == "wait" {
        assert_eq!(ok.len(), 100, "wait: everyone gets the answer");
        assert!(
            ok.iter().all(|r| r.body == ok[0].body),
            "wait: identical bytes"
        );
    } else {
        assert!(!ok.is_empty());
        assert!(replies.iter().all(|r| r.status == 201 || r.status == 409));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_same_key_reject() {
    hundred_at_once("reject").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_same_key_wait() {
    hundred_at_once("wait").await;
}

/// The listener's threads (`[limits] threads`): connections accepted by
/// different threads race for the same key and still execute once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_same_key_over_four_threads() {
    hundred_at_once_with("wait", "threads = 4").await;
    hundred_at_once_with("reject", "threads = 4").await;
}

#[tokio::test]
async fn store_failure_with_fail_open_forwards_unprotected() {
    let up = Upstream::start().await;
    let gw = gateway(
        &up.url(),
        "[defaults]\nfail = \"open\"\n[limits]\nmemory_max_entries = 1",
    )
    .await;
    let (c, a) = (client(), gw.local_addr());
    let holder = hold_a_key(&c, a, "k1").await;
    let r = send(&c, a, "POST", "/orders", &[("idempotency-key", "k2")], "").await;
    assert_eq!(r.status, 201, "open: forwarded without protection");
    assert_eq!(up.count("POST", "/orders", "k2"), 1);
    assert_eq!(holder.await.expect("task").status, 201);
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "").await;
    let a = gw.local_addr();
    let in_flight = tokio::spawn(async move {
        send(
            &client(),
            a,
            "POST",
            "/orders?delay_ms=400",
            &[("idempotency-key", "k-drain")],
            "",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    gw.shutdown().await.expect("shutdown");
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "shutdown must wait for the in-flight request"
    );
    let r = in_flight.await.expect("task");
    assert_eq!(r.status, 201, "the in-flight request completes");
    assert!(
        tokio::net::TcpStream::connect(a).await.is_err(),
        "no new connections after shutdown"
    );
}

#[tokio::test]
async fn max_key_length_is_configurable() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "[defaults]\nmax_key_length = 8").await;
    let (c, a) = (client(), gw.local_addr());
    send(
        &c,
        a,
        "POST",
        "/orders",
        &[("idempotency-key", "123456789")],
        "",
    )
    .await
    .assert_problem(400, "idempotency_key_invalid");
    let ok = send(
        &c,
        a,
        "POST",
        "/orders",
        &[("idempotency-key", "12345678")],
        "",
    )
    .await;
    assert_eq!(ok.status, 201);
    assert_eq!(up.total(), 1);
}

#[tokio::test]
async fn a_slow_body_is_cut_off_and_never_forwarded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "[limits]\nrequest_read_timeout = \"300ms\"").await;
    let mut s = tokio::net::TcpStream::connect(gw.local_addr())
        .await
        .expect("connect");
    s.write_all(
        b"POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: slow\r\ncontent-length: 10\r\n\r\nab",
    )
    .await
    .expect("write");
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the gateway answers within the read timeout")
        .expect("read");
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(head.contains("request_body_unreadable"), "{head}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(up.total(), 0, "nothing forwarded");
}

/// Starts a 300 ms request under `key` in the background and returns once it
/// holds its reservation (the only slot of a one-entry memory store).
async fn hold_a_key(
    c: &support::HttpClient,
    a: std::net::SocketAddr,
    key: &'static str,
) -> tokio::task::JoinHandle<support::Reply> {
    let c = c.clone();
    let holder = tokio::spawn(async move {
        send(
            &c,
            a,
            "POST",
            "/orders?delay_ms=300",
            &[("idempotency-key", key)],
            "",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    holder
}
