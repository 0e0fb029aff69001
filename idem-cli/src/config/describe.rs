//! What `idem serve --check` prints ([`Config::describe`]), without the
//! admin token or any password in the store URL (and `Debug` likewise).

use std::fmt;

use http::Method;
use idem::policy::{RoutePolicy, StatusSet};

use super::parse::Named;
use super::{Config, StoreSpec};
use crate::units::{format_duration, format_size};

impl fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreSpec::Memory => f.write_str("memory"),
            StoreSpec::Redis(url) | StoreSpec::Postgres(url) => url.fmt(f),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("upstream", &self.upstream)
            .field("store", &self.store)
            .field("admin_listen", &self.admin_listen)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "***"))
            .field("routes", &self.routes)
            .field("limits", &self.limits)
            .field("tls", &self.tls)
            .field("source", &self.source)
            .finish()
    }
}

/// `2xx, 400, 404`: whole classes as `Nxx`, the rest one by one.
fn fmt_statuses(set: &StatusSet) -> String {
    let mut parts = Vec::new();
    for class in 1u16..=9 {
        let codes: Vec<u16> = (class * 100..class * 100 + 100)
            .filter(|s| set.contains(*s))
            .collect();
        if codes.len() == 100 {
            parts.push(format!("{class}xx"));
        } else {
            parts.extend(codes.iter().map(u16::to_string));
        }
    }
    parts.join(", ")
}

fn fmt_list<T>(items: &[T], f: impl Fn(&T) -> String) -> String {
    if items.is_empty() {
        "(none)".to_owned()
    } else {
        items.iter().map(f).collect::<Vec<_>>().join(", ")
    }
}

fn describe_policy(out: &mut Vec<String>, p: &RoutePolicy, named_method: Option<&Method>) {
    let methods = match named_method {
        Some(m) => format!("{m} (named by match)"),
        None if p.methods.is_empty() => {
            "(none: matching requests pass through untouched)".to_owned()
        }
        None => fmt_list(&p.methods, Method::to_string),
    };
    let rows = [
        ("methods", methods),
        ("key", p.key.name()),
        ("key_header", p.key_header.to_string()),
        ("dedupe_window", format_duration(p.dedupe_window)),
        ("concurrent", p.concurrent.name()),
        ("wait_timeout", format_duration(p.wait_timeout)),
        ("lease", format_duration(p.lease)),
        ("retention", format_duration(p.retention)),
        ("fail", p.fail.name()),
        ("ambiguous", p.ambiguous.name()),
        ("max_body", format_size(p.max_body)),
        ("max_response_body", format_size(p.max_response_body)),
        ("max_key_length", p.max_key_length.to_string()),
        ("upstream_timeout", format_duration(p.upstream_timeout)),
        (
            "scope_headers",
            fmt_list(&p.scope_headers, |h| h.to_string()),
        ),
        (
            "fingerprint_headers",
            fmt_list(&p.fingerprint_headers, |h| h.to_string()),
        ),
        ("store_statuses", fmt_statuses(&p.store_statuses)),
        ("mode", p.mode.name()),
        ("max_attempts", p.max_attempts.to_string()),
        ("retry_backoff", format_duration(p.retry_backoff)),
        ("canonical_json", p.canonical_json.to_string()),
        (
            "ignore_json_pointers",
            fmt_list(&p.ignore_json_pointers, |s| format!("{s:?}")),
        ),
    ];
    out.extend(rows.iter().map(|(k, v)| format!("  {k:<22}{v}")));
    // The stale-event guard (protocol §13), on routes that have one.
    if let Some(g) = &p.stale_guard {
        let entity = g
            .entity_header
            .as_ref()
            .map_or_else(|| "(the path)".to_owned(), ToString::to_string);
        let stale = match g.stale {
            idem::policy::StaleAnswer::Reject => "reject",
            idem::policy::StaleAnswer::Ack => "ack",
        };
        for (k, v) in [
            ("version_header", g.version_header.to_string()),
            ("entity_header", entity),
            ("stale", stale.to_owned()),
        ] {
            out.push(format!("  {k:<22}{v}"));
        }
    }
}

impl Config {
    /// What the listener speaks: `TLS <cert>, h2 + HTTP/1.1 by ALPN` or
    /// `plain HTTP/1.1 + h2c`. Also in the start-up banner.
    #[must_use]
    pub fn listener_protocols(&self) -> String {
        match (&self.tls.cert, &self.tls.key) {
            (Some(cert), Some(_)) => {
                format!("TLS {}; h2 and HTTP/1.1 by ALPN", cert.display())
            }
            _ => "plain HTTP/1.1 and h2c".to_owned(),
        }
    }

    /// Human-readable summary printed by `idem serve --check`: listen,
    /// upstream, store (any password in the URL shown as `***`), admin (whether
    /// a token is set, never the token), limits, the defaults policy and each
    /// route in order with every effective value.
    #[must_use]
    pub fn describe(&self) -> String {
        let mut out = Vec::new();
        out.push(format!(
            "config file:   {}",
            self.source
                .as_ref()
                .map_or_else(|| "(none)".to_owned(), |p| p.display().to_string())
        ));
        out.push(format!(
            "listen:        {} ({})",
            self.listen,
            self.listener_protocols()
        ));
        out.push(match &self.tls.upstream_ca {
            Some(ca) if self.upstream.scheme_str() == Some("https") => format!(
                "upstream:      {} (TLS: system roots + {}; HTTP/1.1)",
                self.upstream,
                ca.display()
            ),
            _ if self.upstream.scheme_str() == Some("https") => format!(
                "upstream:      {} (TLS: system roots; HTTP/1.1)",
                self.upstream
            ),
            _ => format!("upstream:      {}", self.upstream),
        });
        out.push(match &self.store {
            StoreSpec::Memory => {
                "store:         memory (this process only; records are lost on restart)".to_owned()
            }
            other => match &self.tls.store_ca {
                Some(ca) => format!("store:         {other} (store_ca {})", ca.display()),
                None => format!("store:         {other}"),
            },
        });
        let token = if self.admin_token.is_some() {
            "yes"
        } else {
            "no"
        };
        out.push(match self.admin_listen {
            Some(addr) => format!("admin:         {addr} (token set: {token})"),
            None => format!("admin:         off (token set: {token})"),
        });
        let l = &self.limits;
        out.push("limits:".to_owned());
        let cache = if l.local_cache_bytes == 0 {
            "0B (disabled)".to_owned()
        } else {
            format_size(l.local_cache_bytes)
        };
        let rows = [
            ("store_timeout", format_duration(l.store_timeout)),
            (
                "request_read_timeout",
                format_duration(l.request_read_timeout),
            ),
            (
                "max_header_bytes",
                format_size(u64::try_from(l.max_header_bytes).unwrap_or(u64::MAX)),
            ),
            ("max_connections", l.max_connections.to_string()),
            (
                "max_concurrent_streams",
                l.max_concurrent_streams.to_string(),
            ),
            ("idle_timeout", format_duration(l.idle_timeout)),
            ("local_cache_bytes", cache),
            ("memory_max_entries", l.memory_max_entries.to_string()),
            ("memory_max_bytes", format_size(l.memory_max_bytes)),
            ("shutdown_grace", format_duration(l.shutdown_grace)),
            (
                "threads",
                if l.threads == 0 {
                    format!("0 (one per CPU: {})", l.io_threads())
                } else {
                    l.threads.to_string()
                },
            ),
            ("async_workers", l.async_workers.to_string()),
            ("max_pending", l.max_pending.to_string()),
            ("complete_retry", format_duration(l.complete_retry)),
        ];
        out.extend(rows.iter().map(|(k, v)| format!("  {k:<22}{v}")));
        out.push("defaults (requests that match no route):".to_owned());
        describe_policy(&mut out, self.routes.default_policy(), None);
        for (i, route) in self.routes.routes().iter().enumerate() {
            let matcher = match &route.method {
                Some(m) => format!("{m} {}", route.path.as_str()),
                None => format!("{} (any method)", route.path.as_str()),
            };
            out.push(format!("route {}: {matcher}", i + 1));
            describe_policy(&mut out, &route.policy, route.method.as_ref());
        }
        let mut text = out.join("\n");
        text.push('\n');
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{env_of, no_env, PROTOCOL_EXAMPLE};
    use crate::config::{load_str, Overrides};

    #[test]
    fn passwords_are_redacted() {
        let cases = [
            ("redis://:hunter2@h:6379/0", "redis://:***@h:6379/0"),
            (
                "postgres://idem:hunter2@db:5432/idem",
                "postgres://idem:***@db:5432/idem",
            ),
            (
                "postgres://idem:hu/nt@er2@db/idem",
                "postgres://idem:***@db/idem",
            ),
            (
                "postgres://idem@db/idem?password=hunter2&sslmode=require",
                "postgres://idem@db/idem?password=***&sslmode=require",
            ),
            ("redis://h:6379", "redis://h:6379"),
            (
                "redis://:hunter2@a:7000,:hunter2@b:7001",
                "redis://:***@a:7000,:***@b:7001",
            ),
        ];
        for (url, shown) in cases {
            let spec: StoreSpec = url.parse().expect("a store");
            assert_eq!(spec.to_string(), shown);
            assert!(!format!("{spec:?}").contains("hunter2"));
        }
    }

    #[test]
    fn describe_hides_secrets_and_shows_every_value() {
        let env = env_of(&[
            ("IDEM_ADMIN_TOKEN", "sup3r-s3cret-t0ken"),
            ("IDEM_STORE", "postgres://idem:hunter2@db:5432/idem"),
        ]);
        let c =
            load_str("idem.toml", PROTOCOL_EXAMPLE, &env, &Overrides::default()).expect("valid");
        let text = c.describe();
        let debug = format!("{c:?}");
        for shown in [&text, &debug] {
            assert!(!shown.contains("sup3r-s3cret-t0ken"), "{shown}");
            assert!(!shown.contains("hunter2"), "{shown}");
        }
        for needle in [
            "127.0.0.1:8080",
            "http://127.0.0.1:3000",
            "postgres://idem:***@db:5432/idem",
            "127.0.0.1:9090 (token set: yes)",
            "store_timeout",
            "shutdown_grace",
            "route 1: POST /payments/*",
            "2xx, 400, 404, 405, 410, 413, 415, 422",
            "1MiB",
            "retention             24h",
            "wait",
            "content-type",
        ] {
            assert!(
                text.contains(needle),
                "describe() lacks `{needle}`:\n{text}"
            );
        }
        let c = load_str(
            "idem.toml",
            "upstream = \"http://127.0.0.1:3000\"\n",
            &no_env,
            &Overrides::default(),
        )
        .expect("valid");
        assert!(c.describe().contains("off (token set: no)"));
    }
}
