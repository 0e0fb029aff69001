//! Tracing (protocol §14): W3C trace context continued to the upstream, and
//! OTLP/HTTP export of the request, store and upstream spans when (and only
//! when) `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! The in-process gateways here never set up export (as the library does
//! not); the export tests run `idem serve` as a process in front of a
//! collector stub that records what is POSTed to `/v1/traces`.

mod support;

#[path = "support/serve.rs"]
mod serve;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;

use serve::Serve;
use support::{client, gateway, send};

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn client_traceparent() -> String {
    format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")
}

/// `traceparent` split into (trace id, parent id, flags), checked for the
/// version-00 shape.
fn split(tp: &str) -> (String, String, String) {
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[0], "00", "{tp}");
    assert_eq!(parts[1].len(), 32, "{tp}");
    assert_eq!(parts[2].len(), 16, "{tp}");
    assert_eq!(parts[3].len(), 2, "{tp}");
    for p in &parts[1..] {
        assert!(
            p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{tp}"
        );
    }
    assert_ne!(parts[1], "0".repeat(32), "{tp}");
    assert_ne!(parts[2], "0".repeat(16), "{tp}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

/// An upstream that records the headers of every request it gets.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<HeaderMap>>>,
}

impl Recorder {
    async fn start() -> (Self, String) {
        let rec = Recorder::default();
        let app = axum::Router::new()
            .fallback(|State(r): State<Recorder>, headers: HeaderMap| async move {
                r.seen.lock().expect("lock").push(headers);
                (StatusCode::CREATED, "made\n")
            })
            .with_state(rec.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (rec, url)
    }

    fn traceparents(&self) -> Vec<String> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .map(|h| {
                let all: Vec<_> = h.get_all("traceparent").iter().collect();
                assert_eq!(all.len(), 1, "one traceparent upstream: {h:?}");
                all[0].to_str().expect("ascii").to_owned()
            })
            .collect()
    }

    fn last(&self) -> HeaderMap {
        self.seen
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .expect("the upstream was called")
    }
}

#[tokio::test]
async fn the_upstream_sees_the_clients_trace_with_a_new_parent() {
    let (up, url) = Recorder::start().await;
    let gw = gateway(&url, "").await;
    let c = client();
    let tp = client_traceparent();
    let headers = [
        ("idempotency-key", "trace-1"),
        ("traceparent", tp.as_str()),
        ("tracestate", "vendor=opaque"),
    ];
    let r = send(&c, gw.local_addr(), "POST", "/orders", &headers, "{}").await;
    assert_eq!(r.status, 201);
    // A pass-through request is continued too.
    let r = send(&c, gw.local_addr(), "GET", "/orders", &headers[1..], "").await;
    assert_eq!(r.status, 201);

    let seen = up.traceparents();
    assert_eq!(seen.len(), 2);
    for tp in &seen {
        let (trace, parent, flags) = split(tp);
        assert_eq!(trace, CLIENT_TRACE, "the client's trace id goes on");
        assert_ne!(parent, CLIENT_SPAN, "the gateway's span is the parent");
        assert_eq!(flags, "01", "the sampled flag is kept");
    }
    assert_ne!(split(&seen[0]).1, split(&seen[1]).1, "one span per call");
    assert_eq!(up.last()["tracestate"], "vendor=opaque");
    gw.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn without_a_traceparent_each_request_starts_a_trace() {
    let (up, url) = Recorder::start().await;
    let gw = gateway(&url, "").await;
    let c = client();
    for (key, extra) in [
        ("new-1", None),
        ("new-2", None),
        // Invalid (upper-case hex): a new trace, and its tracestate dropped.
        (
            "new-3",
            Some("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
        ),
    ] {
        let mut headers = vec![("idempotency-key", key), ("tracestate", "a=b")];
        if let Some(tp) = extra {
            headers.push(("traceparent", tp));
        }
        let r = send(&c, gw.local_addr(), "POST", "/orders", &headers, "{}").await;
        assert_eq!(r.status, 201);
        assert!(
            up.last().get("tracestate").is_none(),
            "a tracestate without a valid traceparent is dropped"
        );
    }
    let traces: Vec<String> = up.traceparents().iter().map(|tp| split(tp).0).collect();
    assert_eq!(traces.len(), 3);
    assert_ne!(traces[0], traces[1]);
    assert_ne!(traces[1], traces[2]);
    assert_ne!(traces[2], CLIENT_TRACE.to_ascii_uppercase());
    gw.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn an_async_dispatch_carries_the_accepting_requests_trace() {
    let (up, url) = Recorder::start().await;
    let route = "[[route]]\nmatch = \"POST /jobs/*\"\nmode = \"async\"\n";
    let gw = gateway(&url, route).await;
    let c = client();
    let tp = client_traceparent();
    let headers = [("idempotency-key", "job-1"), ("traceparent", tp.as_str())];
    let r = send(&c, gw.local_addr(), "POST", "/jobs/1", &headers, "{}").await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let deadline = Instant::now() + Duration::from_secs(20);
    while up.seen.lock().expect("lock").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the operation was never dispatched"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (trace, parent, _) = split(&up.traceparents()[0]);
    assert_eq!(trace, CLIENT_TRACE, "dispatched later, in the same trace");
    assert_ne!(parent, CLIENT_SPAN);
    gw.shutdown().await.expect("shutdown");
}

// ---------------------------------------------------------------------------
// `idem serve` processes and a collector stub.

/// Records every body POSTed to `/v1/traces`.
#[derive(Clone, Default)]
struct Collector {
    posts: Arc<Mutex<Vec<Bytes>>>,
}

impl Collector {
    async fn start() -> (Self, SocketAddr) {
        let col = Collector::default();
        let app = axum::Router::new()
            .route(
                "/v1/traces",
                axum::routing::post(|State(c): State<Collector>, body: Bytes| async move {
                    c.posts.lock().expect("lock").push(body);
                    ([("content-type", "application/x-protobuf")], Bytes::new())
                }),
            )
            .with_state(col.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind collector");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        (col, addr)
    }

    fn raw(&self) -> Vec<Bytes> {
        self.posts.lock().expect("lock").clone()
    }

    /// Every span received so far, with its resource's `service.name`.
    fn spans(&self) -> Vec<(String, Span)> {
        let mut out = Vec::new();
        for body in self.raw() {
            let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
            for rs in req.resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|a| a.key == "service.name")
                    .and_then(|a| string(a.value.as_ref()?.value.as_ref()?))
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    out.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
                }
            }
        }
        out
    }
}

fn string(v: &Value) -> Option<String> {
    match v {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| string(a.value.as_ref()?.value.as_ref()?))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_store_and_upstream_spans_are_exported_over_otlp() {
    let (col, col_addr) = Collector::start().await;
    let (up, url) = Recorder::start().await;
    let config =
        std::env::temp_dir().join(format!("idem-tracing-{:016x}.toml", rand::random::<u64>()));
    std::fs::write(
        &config,
        "[[route]]\nmatch = \"POST /jobs/*\"\nmode = \"async\"\n",
    )
    .expect("write config");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{col_addr}")),
        ("OTEL_SERVICE_NAME", "idem-under-test".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ("IDEM_CONFIG", config.display().to_string()),
    ];
    let mut gw = Serve::start(&url, &env, None).await;
    let _ = std::fs::remove_file(&config);
    let c = client();
    let tp = client_traceparent();
    let (key, secret) = ("raw-key-7f3a9c", "Bearer secret-token-5d1e");
    let headers = [
        ("idempotency-key", key),
        ("authorization", secret),
        ("traceparent", tp.as_str()),
    ];
    let first = send(&c, gw.addr, "POST", "/orders", &headers, "{}").await;
    assert_eq!(first.status, 201, "{}", gw.log());
    let replay = send(&c, gw.addr, "POST", "/orders", &headers, "{}").await;
    assert_eq!(replay.status, 201);
    assert_eq!(
        up.seen.lock().expect("lock").len(),
        1,
        "replayed, not re-run"
    );
    // An async operation: dispatched later, as a child of the accepting
    // request's span.
    let job_trace = "0af7651916cd43dd8448eb211c80319c";
    let job_tp = format!("00-{job_trace}-b7ad6b7169203331-01");
    let job = [
        ("idempotency-key", "job-1"),
        ("traceparent", job_tp.as_str()),
    ];
    let accepted = send(&c, gw.addr, "POST", "/jobs/1", &job, "{}").await;
    assert_eq!(accepted.status, 202, "{:?}", accepted.body);
    let deadline = Instant::now() + Duration::from_secs(20);
    while up.seen.lock().expect("lock").len() < 2 {
        assert!(Instant::now() < deadline, "never dispatched:\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Exported every 100 ms; a clean shutdown flushes the rest.
    let wanted = ["request", "store.reserve", "store.complete", "upstream"];
    let deadline = Instant::now() + Duration::from_secs(30);
    let job_upstream = |spans: &[(String, Span)]| {
        spans
            .iter()
            .any(|(_, s)| s.name == "upstream" && hex(&s.trace_id) == job_trace)
    };
    while !wanted
        .iter()
        .all(|w| col.spans().iter().any(|(_, s)| s.name == *w))
        || !job_upstream(&col.spans())
    {
        assert!(
            Instant::now() < deadline,
            "spans received: {:?}\n{}",
            col.spans().iter().map(|(_, s)| &s.name).collect::<Vec<_>>(),
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.terminate();

    let spans = col.spans();
    let ours: Vec<&Span> = spans
        .iter()
        .filter(|(_, s)| hex(&s.trace_id) == CLIENT_TRACE)
        .map(|(_, s)| s)
        .collect();
    assert!(spans.iter().all(|(svc, _)| svc == "idem-under-test"));
    let named =
        |name: &str| -> Vec<&Span> { ours.iter().copied().filter(|s| s.name == name).collect() };
    let requests = named("request");
    assert_eq!(requests.len(), 2, "one request span per request");
    let first_request = requests
        .iter()
        .find(|r| {
            named("upstream")
                .iter()
                .any(|u| u.parent_span_id == r.span_id)
        })
        .expect("the upstream span's parent is a request span");
    for r in &requests {
        assert_eq!(
            hex(&r.parent_span_id),
            CLIENT_SPAN,
            "child of the client's span"
        );
    }
    // Store calls: children of their request span, keyed by the log id,
    // with their outcome.
    let reserves = named("store.reserve");
    assert_eq!(reserves.len(), 2, "one reserve per request");
    let outcomes: Vec<_> = reserves.iter().filter_map(|s| attr(s, "outcome")).collect();
    assert!(outcomes.contains(&"acquired".to_owned()), "{outcomes:?}");
    assert!(outcomes.contains(&"completed".to_owned()), "{outcomes:?}");
    let complete = named("store.complete");
    assert_eq!(complete.len(), 1);
    assert_eq!(complete[0].parent_span_id, first_request.span_id);
    assert_eq!(attr(complete[0], "outcome").as_deref(), Some("held"));
    let log_id = attr(complete[0], "key").expect("a key attribute");
    assert_eq!(log_id.len(), 12, "a log id, not the key: {log_id}");
    // The upstream span is the parent the upstream was told about.
    let upstream = named("upstream");
    assert_eq!(upstream.len(), 1, "the replay did not call the upstream");
    let (trace, parent, _) = split(&up.traceparents()[0]);
    assert_eq!(trace, CLIENT_TRACE);
    assert_eq!(parent, hex(&upstream[0].span_id));
    // The async dispatch: its upstream span is a child of the accepting
    // request's span, and is what the upstream was told about.
    let job_spans: Vec<&Span> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| hex(&s.trace_id) == job_trace)
        .collect();
    let accept = job_spans
        .iter()
        .find(|s| s.name == "request")
        .expect("the accepting request's span");
    assert_eq!(hex(&accept.parent_span_id), "b7ad6b7169203331");
    let dispatch = job_spans
        .iter()
        .find(|s| s.name == "upstream")
        .expect("the dispatch's upstream span");
    assert_eq!(dispatch.parent_span_id, accept.span_id);
    let (trace, parent, _) = split(&up.traceparents()[1]);
    assert_eq!(trace, job_trace);
    assert_eq!(parent, hex(&dispatch.span_id));
    // Neither the key nor a credential is exported, in any form.
    for body in col.raw() {
        for secret in [key.as_bytes(), secret.as_bytes(), b"secret-token-5d1e"] {
            assert!(
                !body.windows(secret.len()).any(|w| w == secret),
                "an export holds {:?}",
                String::from_utf8_lossy(secret)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_endpoint_nothing_is_exported() {
    // The default OTLP/HTTP endpoint: a gateway that exported by default
    // would connect here.
    let Ok(default_endpoint) = StdListener::bind("127.0.0.1:4318") else {
        eprintln!("SKIPPED (127.0.0.1:4318 is in use: cannot watch the default OTLP endpoint)");
        return;
    };
    default_endpoint.set_nonblocking(true).expect("nonblocking");
    let (up, url) = Recorder::start().await;
    // Other OTEL_* variables set, the endpoint not.
    let env = [
        ("OTEL_SERVICE_NAME", "idem-under-test".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "10".to_owned()),
    ];
    let mut gw = Serve::start(&url, &env, None).await;
    let c = client();
    let tp = client_traceparent();
    for i in 0..5 {
        let key = format!("quiet-{i}");
        let headers = [
            ("idempotency-key", key.as_str()),
            ("traceparent", tp.as_str()),
        ];
        let r = send(&c, gw.addr, "POST", "/orders", &headers, "{}").await;
        assert_eq!(r.status, 201);
    }
    // The trace is still continued.
    assert_eq!(split(&up.traceparents()[0]).0, CLIENT_TRACE);
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.terminate();
    match default_endpoint.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("something connected to the default OTLP endpoint: {other:?}"),
    }
}

/// One line per guarded request (protocol §13), none lost under a burst,
/// and the shutdown's lines written, down to the last one, by the time the
/// process exits (a writer that buffers or queues lines must keep this).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_log_line_is_written_by_the_time_the_gateway_exits() {
    let (_up, url) = Recorder::start().await;
    let mut gw = Serve::start(&url, &[], None).await;
    let c = client();
    let n = 400;
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..n {
        let c = c.clone();
        let addr = gw.addr;
        sends.spawn(async move {
            let key = format!("logged-{i}");
            send(
                &c,
                addr,
                "POST",
                "/orders",
                &[("idempotency-key", &key)],
                "{}",
            )
            .await
        });
    }
    while let Some(r) = sends.join_next().await {
        assert_eq!(r.expect("task").status, 201);
    }
    gw.terminate();
    let log = gw.log();
    let executed = log
        .lines()
        .filter(|l| l.contains("outcome=\"executed\""))
        .count();
    assert_eq!(executed, n, "one line per request:\n{log}");
    assert!(
        log.contains("all connections finished"),
        "the shutdown's lines are written:\n{log}"
    );
}
