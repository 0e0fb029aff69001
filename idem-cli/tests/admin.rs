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

/// `/records/` shows a job's status (protocol §13): attempts, since and
/// the last error, for a job run by `Engine::once_job` on the admin's store.
#[tokio::test]
async fn admin_inspect_shows_job_status() {
    use tower::ServiceExt as _;

    use idem::{Engine, Fingerprint, JobError, MemoryStore, Rules, Scope, StoreKey};

    let engine = Engine::new(MemoryStore::new());
    let router = idem_cli::gateway::admin::router(engine.clone(), TOKEN.to_owned(), None);
    let inspect = |key: StoreKey| {
        let router = router.clone();
        async move {
            let req = http::Request::get(format!("/records/{}", key.as_str()))
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(axum::body::Body::empty())
                .expect("request");
            let resp = router.oneshot(req).await.expect("infallible");
            let status = resp.status().as_u16();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .expect("body");
            (
                status,
                serde_json::from_slice::<serde_json::Value>(&body).ok(),
            )
        }
    };
    let key = StoreKey::new(&Scope::named("jobs"), "charge-1");
    let fp = Fingerprint::of_bytes(b"charge 1");
    let rules = Rules::wait();

    assert_eq!(inspect(key.clone()).await.0, 404);

    // A transient failure: no record, but the job's trace is shown.
    let _ = engine
        .once_job(&key, fp, &rules, |_| async {
            Err::<u32, _>(JobError::Transient("gateway timeout"))
        })
        .await;
    let (status, v) = inspect(key.clone()).await;
    let v = v.expect("json");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["state"], "released");
    assert_eq!(v["job"]["status"], "released");
    assert_eq!(v["job"]["attempts"], 1);
    assert_eq!(v["job"]["last_error"], "gateway timeout");

    // Attempt 2 fails permanently: stored, and shown as failed.
    let _ = engine
        .once_job(&key, fp, &rules, |_| async {
            Err::<u32, _>(JobError::Permanent("card declined"))
        })
        .await;
    let v = inspect(key.clone()).await.1.expect("json");
    assert_eq!(v["state"], "completed");
    assert_eq!(v["job"]["status"], "failed");
    assert_eq!(v["job"]["attempts"], 2);
    assert_eq!(v["job"]["last_error"], "card declined");

    // A running job: its attempt and since.
    let other = StoreKey::new(&Scope::named("jobs"), "charge-2");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let run = {
        let (engine, other) = (engine.clone(), other.clone());
        tokio::spawn(async move {
            engine
                .once_job(&other, fp, &Rules::wait(), |_| async move {
                    let _ = started_tx.send(());
                    let _ = rx.await;
                    Ok::<u32, JobError<String>>(1)
                })
                .await
        })
    };
    started_rx.await.expect("started");
    let v = inspect(other.clone()).await.1.expect("json");
    assert_eq!(v["state"], "in_flight");
    assert_eq!(v["job"]["status"], "running");
    assert_eq!(v["job"]["attempt"], 1);
    assert!(
        v["job"]["since_ms"].as_u64().is_some_and(|ms| ms > 0),
        "{v}"
    );
    tx.send(()).expect("waiting");
    run.await.expect("join").expect("done");
    let v = inspect(other).await.1.expect("json");
    assert_eq!(v["job"]["status"], "done");
}
