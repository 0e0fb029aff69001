//! Value parsers, shared by the file, the environment and the flags. Each
//! returns the reason a value is refused, quoting it and saying how to
//! write it; the caller adds where it came from.
//!
//! Durations and sizes are [`crate::units`]'s.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use http::{HeaderName, Method, Uri};
use idem::policy::{Ambiguous, Concurrent, FailMode, KeyPolicy, Mode, Route};
use idem::store::StoreUrl;
use idem::StoreError;

use super::StoreSpec;

pub(super) fn addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("`{s}` is not an IP address and port, such as 127.0.0.1:8080 or [::1]:8080")
    })
}

/// A file path (TLS certificates, keys, CAs): not empty.
pub(super) fn path(s: &str) -> Result<std::path::PathBuf, String> {
    if s.trim().is_empty() {
        return Err("the path is empty; name a PEM file".to_owned());
    }
    Ok(std::path::PathBuf::from(s))
}

/// `http://host:port` or `https://host:port`, nothing else: each request's own path and query are
/// forwarded unchanged, so a path here would be silently ignored.
pub(super) fn upstream(s: &str) -> Result<Uri, String> {
    let uri: Uri = s
        .parse()
        .map_err(|e| format!("`{s}` is not a URL ({e}); write e.g. http://127.0.0.1:3000"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(scheme) => {
            return Err(format!(
                "`{s}`: scheme `{scheme}` is not supported; write http://host:port \
                 or https://host:port"
            ))
        }
        None => {
            return Err(format!(
                "`{s}` is not an absolute URL; write http://host:port (e.g. http://{s})"
            ))
        }
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("`{s}` has no host; write http://host:port"));
    };
    if authority.as_str().contains('@') {
        return Err("credentials in the upstream URL are not supported".to_owned());
    }
    if authority.host().is_empty() {
        return Err(format!("`{s}` has no host; write http://host:port"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "`{s}`: the upstream must be only http://host:port, without a path or query \
             (each request's own path and query are forwarded unchanged)"
        ));
    }
    Ok(uri)
}

/// A store, for the layers that give it as a string. The message never
/// shows a password.
pub(super) fn store(s: &str) -> Result<StoreSpec, String> {
    s.parse().map_err(|e: StoreError| e.to_string())
}

/// A method token; the standard ones only in upper case (they are
/// case-sensitive, and `post` would never match a request).
pub(super) fn method(s: &str) -> Result<Method, String> {
    const STANDARD: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    let upper = s.to_ascii_uppercase();
    if upper != s && STANDARD.contains(&upper.as_str()) {
        return Err(format!(
            "`{s}`: HTTP methods are case-sensitive; write `{upper}`"
        ));
    }
    Method::from_bytes(s.as_bytes()).map_err(|_| format!("`{s}` is not an HTTP method"))
}

pub(super) fn header(s: &str) -> Result<HeaderName, String> {
    // `from_bytes` lower-cases.
    HeaderName::from_bytes(s.as_bytes()).map_err(|_| format!("`{s}` is not a valid header name"))
}

/// A route's `key_header` (protocol §13): a header name that can carry a
/// key end to end. Refused: hop-by-hop headers (a proxy drops them),
/// headers HTTP itself or idem gives another meaning (`host`,
/// `content-length`, `content-type`, `x-request-id`, …), and the
/// credentials the scope is built from (`authorization`, `cookie`: a key
/// is written to the store, a credential never is).
pub(super) fn key_header(s: &str) -> Result<HeaderName, String> {
    const REFUSED: [&str; 18] = [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-type",
        "expect",
        "authorization",
        "cookie",
        "x-request-id",
        "idempotent-replayed",
        "idempotency-status",
        "retry-after",
    ];
    let name = header(s)?;
    if REFUSED.contains(&name.as_str()) {
        return Err(format!(
            "`{s}` cannot carry the key: HTTP or idem already gives it another meaning \
             (use a header of its own, such as `Idempotency-Key`, `X-Idempotency-Key` \
             or `webhook-id`)"
        ));
    }
    Ok(name)
}

/// An RFC 6901 JSON pointer: empty, or `/`-separated tokens where `~` is
/// only ever followed by `0` or `1`.
pub(super) fn json_pointer(s: &str) -> Result<&str, String> {
    let bad_escape = s
        .split('~')
        .skip(1)
        .any(|after| !(after.starts_with('0') || after.starts_with('1')));
    if !(s.is_empty() || s.starts_with('/')) || bad_escape {
        return Err(format!(
            "`{s}` is not a JSON pointer (RFC 6901): it must be empty or start with `/`, \
             and `~` may only be followed by 0 or 1 (e.g. \"/meta/request_id\")"
        ));
    }
    Ok(s)
}

/// A route's `match` (`"POST /payments/*"`), its method checked like
/// `methods`; the policy is filled in later.
pub(super) fn route_match(s: &str) -> Result<Route, String> {
    let route = Route::parse_match(s, Arc::default()).map_err(|e| e.to_string())?;
    if let Some(m) = &route.method {
        method(m.as_str())?;
    }
    Ok(route)
}

impl FromStr for StoreSpec {
    type Err = StoreError;

    /// What [`StoreUrl`] accepts: `memory`, `redis://…`, `rediss://…`,
    /// `postgres://…` or `postgresql://…`.
    fn from_str(s: &str) -> Result<Self, StoreError> {
        let url: StoreUrl = s.parse()?;
        Ok(match url.kind() {
            "memory" => StoreSpec::Memory,
            "redis" => StoreSpec::Redis(url),
            _ => StoreSpec::Postgres(url),
        })
    }
}

/// The policy enums and their names in the file (also used by `describe`).
pub(super) trait Named: Copy + PartialEq + fmt::Debug + 'static {
    const ALL: &'static [(&'static str, Self)];

    fn name(self) -> String {
        Self::ALL.iter().find(|(_, v)| *v == self).map_or_else(
            || format!("{self:?}").to_lowercase(),
            |(n, _)| (*n).to_owned(),
        )
    }

    fn from_name(s: &str) -> Result<Self, String> {
        Self::ALL
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                let names: Vec<String> = Self::ALL.iter().map(|(n, _)| format!("`{n}`")).collect();
                format!("unknown value `{s}`, expected one of {}", names.join(", "))
            })
    }
}

impl Named for KeyPolicy {
    const ALL: &'static [(&'static str, Self)] = &[
        ("required", KeyPolicy::Required),
        ("optional", KeyPolicy::Optional),
        ("derived", KeyPolicy::Derived),
    ];
}

impl Named for Concurrent {
    const ALL: &'static [(&'static str, Self)] =
        &[("reject", Concurrent::Reject), ("wait", Concurrent::Wait)];
}

impl Named for FailMode {
    const ALL: &'static [(&'static str, Self)] =
        &[("closed", FailMode::Closed), ("open", FailMode::Open)];
}

impl Named for Ambiguous {
    const ALL: &'static [(&'static str, Self)] = &[
        ("hold", Ambiguous::Hold),
        ("release", Ambiguous::Release),
        ("store", Ambiguous::Store),
    ];
}

impl Named for Mode {
    const ALL: &'static [(&'static str, Self)] = &[("sync", Mode::Sync), ("async", Mode::Async)];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_specs() {
        assert!(matches!("memory".parse(), Ok(StoreSpec::Memory)));
        for url in [
            "redis://h:6379",
            "rediss://h:6380/1",
            "REDIS://h",
            "redis://a:1,b:2",
        ] {
            let spec: StoreSpec = url.parse().expect(url);
            assert!(
                matches!(&spec, StoreSpec::Redis(u) if u.as_str() == url),
                "{spec:?}"
            );
        }
        for url in ["postgres://u@h:5432/d", "postgresql://u:p@h/d"] {
            let spec: StoreSpec = url.parse().expect(url);
            assert!(
                matches!(&spec, StoreSpec::Postgres(u) if u.as_str() == url),
                "{spec:?}"
            );
        }
        for bad in ["", "Memory", "mem", "redis:/h", "http://h"] {
            let e = bad.parse::<StoreSpec>().expect_err(bad).to_string();
            assert!(e.contains("memory") && e.contains("postgres://"), "{e}");
        }
        let e = store("redis://").expect_err("no host");
        assert!(e.contains("no host"), "{e}");
        let e = store("mysql://u:hunter2@db/x").expect_err("mysql");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn names_round_trip() {
        for (name, v) in Concurrent::ALL {
            assert_eq!(v.name(), *name);
            assert_eq!(Concurrent::from_name(name), Ok(*v));
        }
        let e = FailMode::from_name("maybe").expect_err("unknown");
        assert!(e.contains("`closed`, `open`"), "{e}");
    }
}
