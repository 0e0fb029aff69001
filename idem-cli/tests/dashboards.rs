//! The Grafana dashboard (`docs/grafana/idem.json`) and the example alert
//! rules (`docs/alerts.yml`) name only metrics, and label values, that
//! `idem serve` exports on `/metrics`: a renamed metric breaks this test,
//! not somebody's on-call.

mod support;

#[path = "support/serve.rs"]
mod serve;

use std::collections::BTreeSet;
use std::path::Path;

use serve::Serve;
use support::{client, send, Upstream};

const TOKEN: &str = "dashboards-test-admin-token";

/// A metric reference in an expression: the name and its `label="value"`
/// matchers (only `=`, and not the `instance` label Prometheus adds).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Reference {
    name: String,
    labels: Vec<(String, String)>,
}

/// Every `idem_…` name in `text`, with the matchers in the braces after it.
fn references(text: &str) -> Vec<Reference> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("idem_") {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..len];
        rest = &tail[len..];
        // Part of a longer word (e.g. a file name): not a metric.
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            continue;
        }
        let mut labels = Vec::new();
        if let Some(inner) = rest.strip_prefix('{').and_then(|r| r.split_once('}')) {
            for matcher in inner.0.split(',') {
                let Some((k, v)) = matcher.split_once('=') else {
                    continue;
                };
                let (k, v) = (k.trim(), v.trim());
                if k.ends_with('!') || v.starts_with('~') || k == "instance" {
                    continue;
                }
                labels.push((k.to_owned(), v.trim_matches('"').to_owned()));
            }
        }
        out.push(Reference {
            name: name.to_owned(),
            labels,
        });
    }
    out
}

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// The dashboard's expressions: every `expr`, and the variables' queries.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| dashboard_exprs(i, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_name_only_exported_metrics() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&repo_file("docs/grafana/idem.json")).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "the dashboard's queries: {exprs:?}");
    let mut wanted: BTreeSet<Reference> = exprs.iter().flat_map(|e| references(e)).collect();
    let alerts = repo_file("docs/alerts.yml");
    let alert_refs = references(&alerts);
    for must in [
        "idem_requests_total",
        "idem_store_latency_seconds_bucket",
        "idem_async_pending",
        "idem_async_oldest_pending_seconds",
    ] {
        assert!(
            alert_refs.iter().any(|r| r.name == must),
            "the alert rules watch {must}"
        );
    }
    wanted.extend(alert_refs);

    let up = Upstream::start().await;
    let mut gw = Serve::start(&up.url(), &[], Some(TOKEN)).await;
    let c = client();
    let r = send(&c, gw.addr, "POST", "/x", &[("idempotency-key", "k")], "").await;
    assert_eq!(r.status, 201, "{}", gw.log());
    let bearer = format!("Bearer {TOKEN}");
    let admin = gw.admin.expect("an admin listener");
    let metrics = send(
        &c,
        admin,
        "GET",
        "/metrics",
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(metrics.status, 200);
    gw.terminate();
    let text = String::from_utf8(metrics.body.to_vec()).expect("utf-8");
    let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();

    let mut missing = Vec::new();
    for w in &wanted {
        let found = samples.iter().any(|line| {
            let Some(rest) = line.strip_prefix(w.name.as_str()) else {
                return false;
            };
            (rest.starts_with('{') || rest.starts_with(' '))
                && w.labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        });
        if !found {
            missing.push(w);
        }
    }
    assert!(
        missing.is_empty(),
        "named by docs/grafana/idem.json or docs/alerts.yml but not on /metrics: {missing:?}\n{text}"
    );
}

#[test]
fn references_are_read_with_their_matchers() {
    let r = references(
        r#"sum(rate(idem_requests_total{outcome="bypass",instance=~"$i"}[5m])) / idem_in_flight"#,
    );
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].name, "idem_requests_total");
    assert_eq!(r[0].labels, vec![("outcome".into(), "bypass".into())]);
    assert_eq!(r[1].name, "idem_in_flight");
    assert!(references("docs/grafana/idem.json my-idem_x").is_empty());
}
