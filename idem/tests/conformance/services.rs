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
