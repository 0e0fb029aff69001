//! The admin listener: health, readiness, metrics, inspect and purge.

mod support;

use support::{client, gateway_with_env, send, Upstream};

const TOKEN: &str = "s3cret-admin-token";

fn env(name: &str) -> Option<String> {
    (name == "IDEM_ADMIN_TOKEN").then(|| TOKEN.to_owned())
}

#[tokio::test]
async fn admin_endpoints() {
    let up = Upstream::start().await;
    let gw = gateway_with_env(&up.url(), "admin_listen = \"127.0.0.1:0\"", &env).await;
    let (c, a) = (client(), gw.local_addr());
    let admin = gw.admin_addr().expect("admin listener");
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("authorization", bearer.as_str())];

    assert_eq!(
        send(&c, admin, "GET", "/healthz", &[], "").await.status,
        200
    );
    assert_eq!(send(&c, admin, "GET", "/readyz", &[], "").await.status, 200);
    assert_eq!(
        send(&c, admin, "GET", "/metrics", &[], "").await.status,
        401
    );
    let wrong = [("authorization", "Bearer nope")];
    assert_eq!(
        send(&c, admin, "GET", "/metrics", &wrong, "").await.status,
        401
    );

    let h = [("idempotency-key", "k-admin")];
    send(&c, a, "POST", "/orders", &h, "x").await;
    send(&c, a, "POST", "/orders", &h, "x").await;
    let metrics = send(&c, admin, "GET", "/metrics", &auth, "").await;
    assert_eq!(metrics.status, 200);
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("idem_requests_total{outcome=\"executed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("idem_requests_total{outcome=\"replayed\"} 1"),
        "{text}"
    );
    assert!(text.contains("idem_store_latency_seconds_count"), "{text}");

    // No scope header on the POSTs: the scope is that of absent headers.
    let scope = idem::Scope::from_headers(
        &http::HeaderMap::new(),
        &idem::RoutePolicy::default().scope_headers,
    );
    let key = idem::StoreKey::new(&scope, "k-admin");
    let path = format!("/records/{}", key.as_str());
    let rec = send(&c, admin, "GET", &path, &auth, "").await;
    assert_eq!(rec.status, 200, "{:?}", rec.body);
    let v = rec.json();
    assert_eq!(v["state"], "completed");
    assert_eq!(v["status"], 201);
    assert_eq!(send(&c, admin, "GET", &path, &[], "").await.status, 401);
    assert_eq!(
        send(&c, admin, "GET", "/records/nonsense", &auth, "")
            .await
            .status,
        400
    );

    assert_eq!(
        send(&c, admin, "DELETE", &path, &auth, "").await.status,
        204
    );
    assert_eq!(send(&c, admin, "GET", &path, &auth, "").await.status, 404);
    assert_eq!(
        send(&c, admin, "DELETE", &path, &auth, "").await.status,
        404
    );
    // Purged: the same request executes again.
    send(&c, a, "POST", "/orders", &h, "x").await;
    assert_eq!(up.count("POST", "/orders", "k-admin"), 2);
}

#[tokio::test]
async fn admin_without_a_token_is_refused_at_start() {
    let src = "listen = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:9\"\nadmin_listen = \"127.0.0.1:0\"\n";
    let err = idem_cli::config::load_str("t.toml", src, &|_| None, &Default::default())
        .expect_err("must be refused");
    assert!(err.to_string().contains("IDEM_ADMIN_TOKEN"), "{err}");
}
