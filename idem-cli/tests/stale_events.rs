//! The stale-event guard in `idem serve` (protocol §13, issue #12 item 3):
//! per route `version_header`, `entity_header` and `stale`, on the memory
//! store and on the shared Redis and PostgreSQL.
//!
//! Every test uses entities (paths, or entity header values) and keys of
//! its own, so the tests run in parallel and repeatedly on shared servers.

mod support;

#[path = "../../idem/tests/conformance/services.rs"]
mod services;

use std::net::SocketAddr;

use support::{client, gateway, send, HttpClient, Reply, Upstream};

const SUBSCRIPTIONS: &str = r#"
[[route]]
match = "POST /subscriptions/*"
version_header = "X-Event-Version"
"#;

fn run_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

async fn event(c: &HttpClient, a: SocketAddr, path: &str, key: &str, version: &str) -> Reply {
    send(
        c,
        a,
        "POST",
        path,
        &[("idempotency-key", key), ("x-event-version", version)],
        "{}",
    )
    .await
}

/// Asserts a 409 `stale_version`, which is NOT retryable.
fn assert_stale(r: &Reply) {
    assert_eq!(r.status, 409, "body: {:?}", r.body);
    let v = r.json();
    assert_eq!(v["code"], "stale_version", "{v}");
    assert_eq!(v["retryable"], false, "{v}");
}

/// The whole flow on one store: in order, out of order, replays, a failed
/// event, bad headers.
async fn flow(store: Option<&str>) {
    let up = Upstream::start().await;
    let extra = match store {
        Some(url) => format!("store = \"{url}\"\n{SUBSCRIPTIONS}"),
        None => SUBSCRIPTIONS.to_owned(),
    };
    let gw = gateway(&up.url(), &extra).await;
    let (c, a) = (client(), gw.local_addr());
    let run = run_id();
    let path = format!("/subscriptions/{run}");
    let k = |n: &str| format!("{run}-{n}");

    // "cancel" (v2) first: forwarded.
    let r = event(&c, a, &path, &k("cancel"), "2").await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    // The late "renew" (v1): stale, never forwarded.
    assert_stale(&event(&c, a, &path, &k("renew"), "1").await);
    assert_eq!(up.count("POST", &path, &k("renew")), 0);
    // A repeat of the applied event under its key is a replay, not stale.
    let r = event(&c, a, &path, &k("cancel"), "2").await;
    assert_eq!(r.status, 201);
    assert_eq!(r.header("idempotent-replayed"), Some("true"));
    assert_eq!(up.count("POST", &path, &k("cancel")), 1);
    // The same version under another key: stale.
    assert_stale(&event(&c, a, &path, &k("cancel-again"), "2").await);
    // Stale again on a retry: the guard's answers are not stored.
    assert_stale(&event(&c, a, &path, &k("renew"), "1").await);

    // A failed event does not advance the version.
    let failing = format!("{path}?status=500");
    let r = event(&c, a, &failing, &k("v5-fails"), "5").await;
    assert_eq!(r.status, 500);
    let r = event(&c, a, &path, &k("v4"), "4").await;
    assert_eq!(r.status, 201, "a failed v5 must not make v4 stale");

    // Another entity (path) is independent.
    let other = format!("/subscriptions/{run}-other");
    assert_eq!(event(&c, a, &other, &k("o1"), "1").await.status, 201);

    // Bad version headers: 400, nothing stored, nothing forwarded.
    for bad in ["", "abc", "-1", "1.5", "2026-12-02", "18446744073709551616"] {
        event(&c, a, &path, &k("bad"), bad)
            .await
            .assert_problem(400, "event_header_invalid");
    }
    send(
        &c,
        a,
        "POST",
        &path,
        &[("idempotency-key", &k("bad"))],
        "{}",
    )
    .await
    .assert_problem(400, "event_header_invalid");
    send(
        &c,
        a,
        "POST",
        &path,
        &[
            ("idempotency-key", &k("bad")),
            ("x-event-version", "7"),
            ("x-event-version", "8"),
        ],
        "{}",
    )
    .await
    .assert_problem(400, "event_header_invalid");
    // A timestamp where the entity's versions are integers.
    event(&c, a, &path, &k("bad"), "2026-12-02T05:00:00Z")
        .await
        .assert_problem(400, "event_header_invalid");
    assert_eq!(up.count("POST", &path, &k("bad")), 0);
    // ... and the key was not used up: it still runs a good event.
    assert_eq!(event(&c, a, &path, &k("bad"), "9").await.status, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_events_are_refused_on_memory() {
    flow(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_events_are_refused_on_redis() {
    let url = services::redis_url();
    if let Err(e) = idem::store::redis::RedisStore::connect(&url).await {
        services::unavailable::<()>("Redis", &url, &e);
        return;
    }
    flow(Some(&url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_events_are_refused_on_postgres() {
    let url = services::database_url();
    if let Err(e) = idem::store::postgres::PostgresStore::connect(&url).await {
        services::unavailable::<()>("PostgreSQL", &url, &e);
        return;
    }
    flow(Some(&url)).await;
}

/// `entity_header` names the entity (paths do not), timestamps compare as
/// instants, and `stale = "ack"` answers 200 with `Idempotency-Status: stale`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_mode_with_an_entity_header_and_timestamps() {
    let up = Upstream::start().await;
    let gw = gateway(
        &up.url(),
        r#"
[[route]]
match = "POST /webhooks/*"
version_header = "X-Event-Time"
entity_header = "X-Customer"
stale = "ack"
"#,
    )
    .await;
    let (c, a) = (client(), gw.local_addr());
    let run = run_id();
    let customer = format!("cus_{run}");
    let hook = |key: String, at: &'static str, path: &'static str| {
        let (c, customer) = (c.clone(), customer.clone());
        async move {
            send(
                &c,
                a,
                "POST",
                path,
                &[
                    ("idempotency-key", key.as_str()),
                    ("x-event-time", at),
                    ("x-customer", customer.as_str()),
                ],
                "{}",
            )
            .await
        }
    };
    let r = hook(
        format!("{run}-1"),
        "2026-12-02T06:00:00+01:00",
        "/webhooks/a",
    )
    .await;
    assert_eq!(r.status, 201);
    // The same instant in UTC, on another path: the same entity, stale.
    let r = hook(format!("{run}-2"), "2026-12-02T05:00:00Z", "/webhooks/b").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.header("idempotency-status"), Some("stale"));
    assert_eq!(r.json()["status"], "stale");
    assert_eq!(up.count("POST", "/webhooks/b", &format!("{run}-2")), 0);
    // One nanosecond later: newer.
    let r = hook(
        format!("{run}-3"),
        "2026-12-02T05:00:00.000000001Z",
        "/webhooks/b",
    )
    .await;
    assert_eq!(r.status, 201);
    // The entity header is required on this route.
    send(
        &c,
        a,
        "POST",
        "/webhooks/a",
        &[
            ("idempotency-key", "k"),
            ("x-event-time", "2030-01-01T00:00:00Z"),
        ],
        "{}",
    )
    .await
    .assert_problem(400, "event_header_invalid");
}

/// Events of one entity raced with `concurrent = "wait"`: each is either
/// applied or stale, and afterwards the entity's version is the highest
/// one sent (it is stale, one more is not).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raced_events_end_at_the_highest_version() {
    let up = Upstream::start().await;
    let gw = gateway(
        &up.url(),
        r#"
[[route]]
match = "POST /accounts/*"
version_header = "X-Event-Version"
concurrent = "wait"
wait_timeout = "30s"
"#,
    )
    .await;
    let (c, a) = (client(), gw.local_addr());
    let run = run_id();
    let path = format!("/accounts/{run}");
    let mut tasks = Vec::new();
    for v in 1..=40u32 {
        let (c, path, run) = (c.clone(), path.clone(), run.clone());
        tasks.push(tokio::spawn(async move {
            event(&c, a, &path, &format!("{run}-{v}"), &v.to_string())
                .await
                .status
        }));
    }
    let mut applied = 0;
    for t in tasks {
        match t.await.expect("task") {
            201 => applied += 1,
            409 => {}
            s => panic!("unexpected status {s}"),
        }
    }
    assert!(applied >= 1);
    assert_eq!(
        up.total(),
        applied,
        "only applied events reach the upstream"
    );
    assert_stale(&event(&c, a, &path, &format!("{run}-again"), "40").await);
    assert_eq!(
        event(&c, a, &path, &format!("{run}-41"), "41").await.status,
        201
    );
}

/// Config errors name the file, the line and the reason.
#[test]
fn bad_stale_guard_configs_are_refused_with_their_line() {
    let base = "listen = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:9\"\n";
    for (extra, line, reason) in [
        (
            "[[route]]\nmatch = \"POST /a\"\nentity_header = \"X-Entity\"\n",
            5,
            "set version_header",
        ),
        (
            "[[route]]\nmatch = \"POST /a\"\nversion_header = \"X-V\"\nstale = \"maybe\"\n",
            6,
            "`maybe` is not one of",
        ),
        (
            "[[route]]\nmatch = \"POST /a\"\nversion_header = \"bad header\"\n",
            5,
            "not a valid header name",
        ),
        (
            "[[route]]\nmatch = \"POST /a\"\nmode = \"async\"\nversion_header = \"X-V\"\n",
            6,
            "synchronous routes",
        ),
        ("[defaults]\nstale = \"ack\"\n", 4, "set version_header"),
    ] {
        let src = format!("{base}{extra}");
        let err = idem_cli::config::load_str("test.toml", &src, &|_| None, &Default::default())
            .expect_err("must be refused");
        let text = err.to_string();
        assert!(text.contains("test.toml"), "{text}");
        assert!(
            text.contains(&format!("line {line}")) || text.contains(&format!(":{line}")),
            "line {line}: {text}"
        );
        assert!(text.contains(reason), "{reason}: {text}");
    }
}
