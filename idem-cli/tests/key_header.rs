//! Protocol §13 in the gateway: a route's `key_header` (`webhook-id` for
//! Standard Webhooks senders), and the one `info` line per request in the
//! `idem serve` process's own log, which carries the request id and a
//! short hash of the key, and never the key or `Authorization`.

#[path = "support/process.rs"]
mod process;
mod support;

use process::{GatewayProcess, Scratch};
use support::{client, gateway, send, Upstream};

const JSON: (&str, &str) = ("content-type", "application/json");

const WEBHOOKS: &str = r#"
[[route]]
match = "POST /webhooks/*"
key_header = "webhook-id"
"#;

#[tokio::test]
async fn webhook_id_is_the_key_of_its_route() {
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), WEBHOOKS).await;
    let (c, a) = (client(), gw.local_addr());

    // A redelivery is a replay: the upstream runs once.
    let h = [("webhook-id", "msg_2mX1"), JSON];
    let first = send(&c, a, "POST", "/webhooks/stripe", &h, "{\"a\":1}").await;
    let again = send(&c, a, "POST", "/webhooks/stripe", &h, "{\"a\":1}").await;
    assert_eq!(first.status, 201);
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, first.body);
    assert_eq!(up.count("POST", "/webhooks/stripe", "-"), 1);

    // The same id with another body: 422, naming the header.
    let other = send(&c, a, "POST", "/webhooks/stripe", &h, "{\"a\":2}").await;
    other.assert_problem(422, "idempotency_key_reused");
    assert!(other.json()["detail"]
        .as_str()
        .is_some_and(|d| d.contains("webhook-id")));

    // Malformed ids: 400, and nothing forwarded.
    let long = "k".repeat(256);
    for bad in ["", "a b", "a,b", "\"unterminated", long.as_str()] {
        send(&c, a, "POST", "/webhooks/bad", &[("webhook-id", bad)], "{}")
            .await
            .assert_problem(400, "idempotency_key_invalid");
    }
    let twice = [("webhook-id", "a"), ("webhook-id", "b")];
    let r = send(&c, a, "POST", "/webhooks/bad", &twice, "{}").await;
    r.assert_problem(400, "idempotency_key_invalid");
    assert!(r.json()["detail"]
        .as_str()
        .is_some_and(|d| d.contains("more than one webhook-id header")));

    // Missing: 400 (the route requires a key), naming the header; an
    // `Idempotency-Key` on this route is not its key.
    for h in [vec![], vec![("idempotency-key", "k-1")]] {
        let r = send(&c, a, "POST", "/webhooks/bad", &h, "{}").await;
        r.assert_problem(400, "idempotency_key_missing");
        assert!(r.json()["detail"]
            .as_str()
            .is_some_and(|d| d.contains("webhook-id")));
    }
    assert_eq!(up.count("POST", "/webhooks/bad", "-"), 0);
    assert_eq!(up.count("POST", "/webhooks/bad", "k-1"), 0);

    // Beside `webhook-id`, an `Idempotency-Key` is an ordinary header:
    // neither validated nor the key, and forwarded as it came.
    let both = [("webhook-id", "msg_9"), ("idempotency-key", "not a key")];
    let r = send(&c, a, "POST", "/webhooks/both", &both, "{}").await;
    assert_eq!(r.status, 201);
    assert_eq!(up.count("POST", "/webhooks/both", "not a key"), 1);

    // Other routes keep `Idempotency-Key`.
    send(&c, a, "POST", "/orders", &[("webhook-id", "w")], "{}")
        .await
        .assert_problem(400, "idempotency_key_missing");
    gw.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn webhook_id_duplicates_racing_run_once() {
    let up = Upstream::start().await;
    let gw = gateway(
        &up.url(),
        "[[route]]\nmatch = \"POST /webhooks/*\"\nkey_header = \"webhook-id\"\nconcurrent = \"wait\"\n",
    )
    .await;
    let (c, a) = (client(), gw.local_addr());
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(20));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (c, barrier) = (c.clone(), std::sync::Arc::clone(&barrier));
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let h = [("webhook-id", "msg_race")];
            send(&c, a, "POST", "/webhooks/race?delay_ms=200", &h, "{}").await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task").status, 201);
    }
    assert_eq!(up.count("POST", "/webhooks/race", "-"), 1);
    gw.shutdown().await.expect("shutdown");
}

const SECRET_KEY: &str = "sk_live_SECRETKEY_4f9a1c";
const SECRET_TOKEN: &str = "Bearer tok_SECRETTOKEN_77e2";
const SECRET_COOKIE: &str = "session=SECRETCOOKIE";

/// The first 12 hex digits of BLAKE3 over the store key, which is
/// `hex(scope) ":" key` (protocol §3.3).
fn log_id(key: &str, authorization: &str, cookie: &str) -> String {
    let mut headers = http::HeaderMap::new();
    headers.insert("authorization", authorization.parse().expect("value"));
    headers.insert("cookie", cookie.parse().expect("value"));
    let scope = idem::Scope::from_headers(&headers, &idem::RoutePolicy::default().scope_headers);
    idem::StoreKey::new(&scope, key).log_id().to_string()
}

#[tokio::test]
async fn the_gateway_logs_one_line_per_request_and_no_secret() {
    let up = Upstream::start().await;
    let dir = Scratch::new("key-log");
    for filter in ["info", "debug"] {
        let mut gw =
            GatewayProcess::start_logging(dir.path(), filter, &up.url(), "memory", "", filter)
                .await;
        let c = client();
        let rid = format!("req-{filter}-7");
        let h = [
            ("idempotency-key", SECRET_KEY),
            ("authorization", SECRET_TOKEN),
            ("cookie", SECRET_COOKIE),
            ("x-request-id", rid.as_str()),
        ];
        let r = send(&c, gw.addr(), "POST", "/orders", &h, "{}").await;
        assert_eq!(r.status, 201);
        // The line is written before the answer leaves; give stderr a moment.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        gw.kill();
        let log = gw.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" INFO ") && l.contains("outcome="))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "one line for one request, at {filter}:\n{log}"
        );
        let line = lines[0];
        let hash = log_id(SECRET_KEY, SECRET_TOKEN, SECRET_COOKIE);
        for needle in [
            format!("request_id=\"{rid}\""),
            "attempt=1".to_owned(),
            "outcome=\"executed\"".to_owned(),
            "status=201".to_owned(),
            format!("key={hash}"),
        ] {
            assert!(line.contains(&needle), "`{needle}` missing from {line}");
        }
        if filter == "debug" {
            // The capture really is at debug (hyper's connection lines).
            assert!(log.contains(" DEBUG "), "{log}");
        }
        for secret in [
            "SECRETKEY",
            "SECRETTOKEN",
            "SECRETCOOKIE",
            "sk_live",
            "tok_",
        ] {
            assert!(
                !log.contains(secret),
                "`{secret}` leaked at {filter}:\n{log}"
            );
        }
    }
}

#[tokio::test]
async fn an_async_route_takes_its_key_from_webhook_id_too() {
    let up = Upstream::start().await;
    let gw = gateway(
        &up.url(),
        "[[route]]\nmatch = \"POST /events/*\"\nkey_header = \"webhook-id\"\nmode = \"async\"\n",
    )
    .await;
    let (c, a) = (client(), gw.local_addr());
    let h = [("webhook-id", "evt_1")];
    let first = send(&c, a, "POST", "/events/x?delay_ms=300", &h, "{}").await;
    assert_eq!(first.status, 202, "{:?}", first.body);
    let other = send(&c, a, "POST", "/events/x?delay_ms=300", &h, "{\"b\":1}").await;
    other.assert_problem(422, "idempotency_key_reused");
    assert!(other.json()["detail"]
        .as_str()
        .is_some_and(|d| d.contains("webhook-id")));
    send(&c, a, "POST", "/events/x", &[], "{}")
        .await
        .assert_problem(400, "idempotency_key_missing");
    gw.shutdown().await.expect("shutdown");
}
