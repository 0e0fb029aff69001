//! Reaching the real services tests need (Redis, PostgreSQL).
//!
//! A test that needs a service calls [`unavailable`] when it cannot reach
//! it: the test is skipped, and says so in one `SKIPPED (…): <test>` line
//! that the test harness does not capture; with `IDEM_REQUIRE_SERVICES=1`
//! (CI) it fails instead.
#![allow(dead_code)]

use std::io::Write;

/// `IDEM_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`.
pub fn redis_url() -> String {
    std::env::var("IDEM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// `IDEM_TEST_REDIS_CLUSTER_URLS` when set and not empty: a Redis Cluster
/// the tests share (see [`expand_cluster_urls`]). Unset, the tests start a
/// cluster of their own (`conformance/cluster.rs`).
pub fn shared_redis_cluster_urls() -> Option<String> {
    std::env::var("IDEM_TEST_REDIS_CLUSTER_URLS")
        .ok()
        .filter(|spec| !spec.trim().is_empty())
}

/// For the benches: [`shared_redis_cluster_urls`], or the cluster
/// `.ci/redis-cluster` starts, `redis://127.0.0.1:7000,7001,7002`.
pub fn redis_cluster_urls() -> String {
    shared_redis_cluster_urls().unwrap_or_else(|| "redis://127.0.0.1:7000,7001,7002".into())
}

/// Splits a comma-separated node list into URLs. An item that is a bare
/// port takes the scheme and host of the first URL:
/// `redis://h:7000,7001` → `redis://h:7000`, `redis://h:7001`.
pub fn expand_cluster_urls(spec: &str) -> Vec<String> {
    let mut items = spec.split(',').map(str::trim).filter(|s| !s.is_empty());
    let Some(first) = items.next() else {
        return Vec::new();
    };
    let base = first.rsplit_once(':').map_or(first, |(base, _)| base);
    let mut urls = vec![first.to_owned()];
    for item in items {
        if item.bytes().all(|b| b.is_ascii_digit()) {
            urls.push(format!("{base}:{item}"));
        } else if item.contains("://") {
            urls.push(item.to_owned());
        } else {
            urls.push(format!("redis://{item}"));
        }
    }
    urls
}

/// `IDEM_TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`.
pub fn database_url() -> String {
    std::env::var("IDEM_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Whether CI demands every service.
pub fn required() -> bool {
    std::env::var("IDEM_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// Reports an unreachable service: panics when services are required,
/// otherwise reports the skip and returns `None`.
///
/// The report is one line, `SKIPPED (no <service> at <url>: <error>): <test>`,
/// written straight to the process's stderr: libtest captures `eprintln!`
/// (and throws it away when the test passes) but not writes to
/// `std::io::stderr()`, so the line shows in `cargo test`'s output, and
/// `.ci/run` counts these lines in its summary. The test's name is its
/// thread's (libtest names each test's thread after the test).
pub fn unavailable<T>(service: &str, url: &str, error: &dyn std::fmt::Display) -> Option<T> {
    let msg = format!("no {service} at {url}: {error}");
    if required() {
        panic!("{msg} (IDEM_REQUIRE_SERVICES=1: failing instead of skipping)");
    }
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("(unnamed test)");
    // One write of the whole line: a line under PIPE_BUF bytes is not
    // interleaved with the harness's own output on a shared pipe.
    let line = format!("SKIPPED ({}): {test}\n", msg.replace('\n', " "));
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
    None
}
