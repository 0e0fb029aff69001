//! `idem race` and `idem demo` end to end: real races (barrier start, one
//! connection per request) against a naive check-then-act service with a
//! delay, directly and through the gateway. The `idem` binary is run for
//! exit codes and output; the library for in-process checks.

mod support;

use std::process::Output;
use std::time::Duration;

use idem_cli::demo::{self, DemoOptions, NaiveBackend};
use idem_cli::race::{self, Keys, Mode, Plan, Target, Verdict};
use serde_json::Value;

/// The naive service's gap between check and insert.
const GAP: Duration = Duration::from_millis(20);

async fn idem(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(args)
        .output()
        .await
        .expect("the idem binary runs")
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited with a code")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            stderr(out)
        )
    })
}

/// `idem race URL ARGS… [--count-url COUNT] --json`: exit code and the object.
async fn race_json(url: &str, args: &[&str], count_url: Option<&str>) -> (i32, Value) {
    let mut argv = vec!["race", url];
    argv.extend_from_slice(args);
    if let Some(c) = count_url {
        argv.extend(["--count-url", c]);
    }
    argv.push("--json");
    let out = idem(&argv).await;
    (code(&out), json(&out))
}

/// A gateway in front of the naive service, duplicates coalesced.
async fn gateway_for(backend: &NaiveBackend) -> idem_cli::gateway::Gateway {
    support::gateway(
        &format!("http://{}", backend.addr()),
        "[defaults]\nconcurrent = \"wait\"",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_naive_service_shows_duplicates_and_exits_1() {
    let backend = NaiveBackend::start(GAP).await.expect("backend");
    let (code, v) = race_json(
        &backend.orders_url(),
        &[
            "-n",
            "100",
            "-d",
            "{\"sku\":\"tea\"}",
            "-H",
            "Content-Type: application/json",
        ],
        Some(&backend.count_url()),
    )
    .await;
    assert_eq!(code, 1, "duplicates must exit 1: {v}");
    let executions = v["executions"].as_u64().expect("executions");
    assert!(
        executions > 1,
        "100 same-key requests released together against a check-then-act service with a \
         {GAP:?} gap must create more than one order; 1 means the burst was not concurrent: {v}"
    );
    assert_eq!(
        executions,
        backend.orders_created(),
        "count URL = what happened"
    );
    assert_eq!(v["duplicates"], true);
    assert!(
        v["verdict"]
            .as_str()
            .is_some_and(|s| s.starts_with("DUPLICATES")),
        "{v}"
    );
    assert_eq!(v["requests"], 100);
    assert_eq!(v["errors"], 0);
    // Each created order has its own id, so callers of one key got different answers.
    assert!(
        v["distinct_2xx_bodies"].as_u64().is_some_and(|d| d > 1),
        "{v}"
    );
    // One connection per request, plus one per count URL read.
    assert_eq!(
        backend.connections(),
        102,
        "each request on its own connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_gateway_one_execution_and_exit_0() {
    let backend = NaiveBackend::start(GAP).await.expect("backend");
    let gw = gateway_for(&backend).await;
    let url = format!("http://{}/orders", gw.local_addr());
    let (code, v) = race_json(&url, &["-n", "100"], Some(&backend.count_url())).await;
    assert_eq!(code, 0, "no duplicates must exit 0: {v}");
    assert_eq!(
        v["executions"], 1,
        "behind the gateway, 100 concurrent same-key requests must execute exactly once: {v}"
    );
    assert_eq!(backend.orders_created(), 1);
    assert_eq!(
        v["statuses"],
        serde_json::json!({ "201": 100 }),
        "everyone gets the one answer"
    );
    assert_eq!(v["replayed"], 99);
    assert_eq!(
        (
            v["distinct_bodies"].as_u64(),
            v["distinct_2xx_bodies"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(v["duplicates"], false);
    gw.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_has_the_promised_fields() {
    let backend = NaiveBackend::start(GAP).await.expect("backend");
    let (code, v) = race_json(&backend.orders_url(), &["-n", "20"], None).await;
    let fields: Vec<&str> = v
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    for f in [
        "requests",
        "statuses",
        "latency_ms",
        "distinct_bodies",
        "distinct_2xx_bodies",
        "replayed",
        "executions",
        "errors",
        "duplicates",
        "verdict",
    ] {
        assert!(fields.contains(&f), "missing `{f}` in {v}");
    }
    for p in ["p50", "p90", "p99", "max"] {
        assert!(
            v["latency_ms"][p].as_f64().is_some_and(|ms| ms > 0.0),
            "latency_ms.{p}: {v}"
        );
    }
    let l = &v["latency_ms"];
    assert!(l["p50"].as_f64() <= l["p99"].as_f64() && l["p99"].as_f64() <= l["max"].as_f64());
    assert_eq!(v["executions"], Value::Null, "no count URL → null");
    assert!(
        v.get("requests_per_sec").is_none(),
        "burst mode has no rate"
    );
    let total: u64 = v["statuses"]
        .as_object()
        .expect("statuses")
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(total, 20);
    // Without a count URL the distinct 2xx bodies still give the naive service away.
    assert_eq!(code, 1, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_keys_are_not_duplicates_and_the_text_report_reads_well() {
    let backend = NaiveBackend::start(GAP).await.expect("backend");
    let out = idem(&[
        "race",
        &backend.orders_url(),
        "-n",
        "30",
        "--unique-keys",
        "--count-url",
        &backend.count_url(),
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(code(&out), 0, "{text}{}", stderr(&out));
    assert_eq!(backend.orders_created(), 30);
    for needle in [
        "idem race: 30 × POST",
        "statuses     201×30",
        "latency      p50",
        "executions   30 (count URL: 0 → 30)",
        "OK: no duplicates: 30 executions for 30 keys",
    ] {
        assert!(text.contains(needle), "`{needle}` not in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_sends_no_key() {
    let backend = NaiveBackend::start(GAP).await.expect("backend");
    let gw = gateway_for(&backend).await;
    let url = format!("http://{}/orders", gw.local_addr());
    let (code, v) = race_json(&url, &["-n", "10", "--no-key"], None).await;
    assert_eq!(
        v["statuses"],
        serde_json::json!({ "400": 10 }),
        "key required: {v}"
    );
    assert_eq!(backend.orders_created(), 0);
    assert_eq!(code, 0);
    gw.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_mode_reports_a_rate() {
    let backend = NaiveBackend::start(Duration::from_millis(1))
        .await
        .expect("backend");
    let (code, v) = race_json(
        &backend.orders_url(),
        &["--duration", "1s", "--concurrency", "4", "--unique-keys"],
        Some(&backend.count_url()),
    )
    .await;
    assert_eq!(code, 0, "{v}");
    let requests = v["requests"].as_u64().expect("requests");
    assert!(requests >= 4, "{v}");
    assert_eq!(
        v["executions"].as_u64(),
        Some(requests),
        "one order per unique key"
    );
    assert!(
        v["requests_per_sec"].as_f64().is_some_and(|r| r > 0.0),
        "{v}"
    );
    let secs = v["duration_s"].as_f64().expect("duration_s");
    // The clock starts before the first request and stops after the
    // last; a run of "1s" may measure a hair under it.
    assert!((0.9..5.0).contains(&secs), "{v}");
    // Keep-alive: 4 connections, plus the two count URL reads.
    assert_eq!(backend.connections(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_exits_2_with_a_clear_message() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let url = format!("http://127.0.0.1:{port}/orders");
    let out = idem(&["race", &url, "-n", "5"]).await;
    assert_eq!(code(&out), 2);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("cannot connect to 127.0.0.1:{port}")) && err.contains("refused"),
        "{err}"
    );
    let out = idem(&["race", &url, "--json"]).await;
    assert_eq!(code(&out), 2);
    assert!(json(&out)["error"]
        .as_str()
        .is_some_and(|e| e.contains("cannot connect")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_exits_2_with_a_clear_message() {
    let backend = NaiveBackend::start(GAP).await.expect("backend");
    let url = backend.orders_url();
    for (args, says) in [
        (
            vec!["race", "https://127.0.0.1:1/"],
            "https is not supported",
        ),
        (vec!["race", "not a url"], "write a full URL"),
        (
            vec!["race", &url, "-H", "no colon"],
            "bad header `no colon`",
        ),
        (
            vec!["race", &url, "-d", "@/nonexistent/body.json"],
            "cannot read the body",
        ),
        (vec!["race", &url, "-X", "G:T"], "bad method"),
        (vec!["race", &url, "-n", "0"], "not in 1..=10000"),
        (vec!["race", &url, "-n", "10001"], "10001"),
        (
            vec!["race", &url, "--key", "k", "--unique-keys"],
            "cannot be used with",
        ),
        (vec!["race", &url, "--duration", "ten"], "not a duration"),
        (vec!["race", &url, "--count-url", &url], "count URL"),
    ] {
        let out = idem(&args).await;
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(says),
            "{args:?}: `{says}` not in {}",
            stderr(&out)
        );
    }
    assert_eq!(backend.orders_created(), 0, "bad input sends nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_race_without_and_behind_the_gateway() {
    let backend = NaiveBackend::start(GAP).await.expect("backend");
    let plan = |url: &str| {
        Plan::new(
            Target::parse(url).expect("url"),
            Mode::Burst { requests: 50 },
        )
        .keys(Keys::random())
        .count_url(Target::parse(&backend.count_url()).expect("count url"))
    };
    let direct = race::run(&plan(&backend.orders_url()))
        .await
        .expect("race runs");
    assert_eq!(direct.verdict(), Verdict::Duplicates, "{}", direct.verdict);
    assert!(
        direct.executions.is_some_and(|e| e > 1),
        "{}",
        direct.verdict
    );
    assert_eq!(race::exit_code(&Ok(direct)), 1);

    let gw = gateway_for(&backend).await;
    let url = format!("http://{}/orders", gw.local_addr());
    let through = race::run(&plan(&url)).await.expect("race runs");
    assert_eq!(through.executions, Some(1), "{}", through.verdict);
    assert_eq!(through.verdict(), Verdict::NoDuplicates);
    assert_eq!(race::exit_code(&Ok(through)), 0);
    gw.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_shows_duplicates_then_one_execution() {
    let report = demo::run(DemoOptions::default()).await.expect("demo runs");
    let direct = report.direct.executions.expect("counted");
    assert!(
        direct > 1,
        "the naive service must create duplicates when raced directly: {}",
        report.direct.verdict
    );
    assert_eq!(
        report.gateway.executions,
        Some(1),
        "{}",
        report.gateway.verdict
    );
    assert!(report.gateway_held());
    let table = report.table();
    assert!(
        table.contains("without idem") && table.contains("behind idem serve"),
        "{table}"
    );
    assert!(
        table.contains("201×200"),
        "everyone behind the gateway got the 201:\n{table}"
    );
    let words = report
        .explanation()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        words.contains(&format!("{direct} of the 200 requests")),
        "{words}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeat_counts_the_runs_that_duplicated() {
    let backend = NaiveBackend::start(GAP).await.expect("backend");
    let (code, v) = race_json(
        &backend.orders_url(),
        &["-n", "100", "--repeat", "3"],
        Some(&backend.count_url()),
    )
    .await;
    assert_eq!(code, 1, "duplicated runs must exit 1: {v}");
    assert_eq!(
        (v["runs"].as_u64(), v["completed"].as_u64()),
        (Some(3), Some(3)),
        "{v}"
    );
    assert_eq!(
        v["duplicated"], 3,
        "a fresh key per run, so every run races the check-then-act gap anew: {v}"
    );
    assert_eq!(v["duplicates"], true);
    assert!(
        v["verdict"]
            .as_str()
            .is_some_and(|s| s.starts_with("DUPLICATES in 3 of 3")),
        "{v}"
    );
    let reports = v["reports"].as_array().expect("reports");
    let executions: u64 = reports
        .iter()
        .map(|r| r["executions"].as_u64().expect("executions"))
        .sum();
    assert_eq!(
        executions,
        backend.orders_created(),
        "count URL = what happened"
    );
}

/// `POST /webhooks/*` keyed by `webhook-id`, duplicates coalesced.
const WEBHOOK_ROUTE: &str =
    "[[route]]\nmatch = \"POST /webhooks/*\"\nkey_header = \"webhook-id\"\nconcurrent = \"wait\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_header_and_repeat_without_and_behind_the_gateway() {
    // The test upstream has no check at all: every request executes, and
    // every execution answers a body of its own.
    let up = support::Upstream::start().await;
    let path = "/webhooks/hook?delay_ms=50";
    let direct = format!("{}{path}", up.url());
    let args = ["-n", "20", "--key-header", "webhook-id", "--repeat", "3"];
    let (exit, v) = race_json(&direct, &args, None).await;
    assert_eq!(exit, 1, "{v}");
    assert_eq!(v["duplicated"], 3, "{v}");
    assert_eq!(up.total(), 60);

    let gw = support::gateway(&up.url(), WEBHOOK_ROUTE).await;
    let url = format!("http://{}{path}", gw.local_addr());
    let (exit, v) = race_json(&url, &args, None).await;
    assert_eq!(exit, 0, "behind idem, no run duplicates: {v}");
    assert_eq!(
        (v["duplicated"].as_u64(), v["completed"].as_u64()),
        (Some(0), Some(3)),
        "{v}"
    );
    assert!(
        v["verdict"]
            .as_str()
            .is_some_and(|s| s.starts_with("NO DUPLICATES in 3 of 3")),
        "{v}"
    );
    for r in v["reports"].as_array().expect("reports") {
        // Every request got the one success of its run: the key travelled
        // in webhook-id (without it the route answers 400).
        assert_eq!(r["statuses"]["201"], 20, "{r}");
        assert_eq!(r["replayed"], 19, "{r}");
    }
    assert_eq!(
        up.total(),
        63,
        "one execution per run, a fresh webhook-id each"
    );

    // The text report: one line per run, then the verdict.
    let out = idem(&[
        "race",
        &url,
        "-n",
        "5",
        "--key-header",
        "webhook-id",
        "--repeat",
        "2",
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(code(&out), 0, "{text}{}", stderr(&out));
    assert!(text.contains("in webhook-id"), "{text}");
    assert!(
        text.contains("run 1/2: ") && text.contains("run 2/2: "),
        "{text}"
    );
    assert!(text.contains("NO DUPLICATES in 2 of 2 runs"), "{text}");
    gw.shutdown().await.expect("shutdown");
}
