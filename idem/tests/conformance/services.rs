//! Reaching the real services tests need (Redis, PostgreSQL).
//!
//! A test that needs a service calls [`unavailable`] when it cannot reach
//! it: the test is skipped with a loud message, unless
//! `IDEM_REQUIRE_SERVICES=1` (CI), where it fails.
#![allow(dead_code)]

/// `IDEM_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`.
pub fn redis_url() -> String {
    std::env::var("IDEM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// `IDEM_TEST_REDIS_CLUSTER_URLS`, default `redis://127.0.0.1:7000,7001,7002`
/// (see [`expand_cluster_urls`]).
pub fn redis_cluster_urls() -> String {
    std::env::var("IDEM_TEST_REDIS_CLUSTER_URLS")
        .unwrap_or_else(|_| "redis://127.0.0.1:7000,7001,7002".into())
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
/// otherwise prints a loud skip notice and returns `None`.
pub fn unavailable<T>(service: &str, url: &str, error: &dyn std::fmt::Display) -> Option<T> {
    let msg = format!("{service} at {url} is unreachable: {error}");
    if required() {
        panic!("{msg} (IDEM_REQUIRE_SERVICES=1: failing instead of skipping)");
    }
    eprintln!("\n!!!!!!!! SKIPPED: {msg}. Start it, or set the URL variable. !!!!!!!!\n");
    None
}
