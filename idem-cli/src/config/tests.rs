//! Loading end to end (the file, the environment and the flags, and their
//! precedence), and the fixtures the other modules' tests share.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, Method, Uri};
use idem::policy::{Ambiguous, Concurrent, FailMode, KeyPolicy, Mode, RoutePolicy, RouteTable};

use super::*;
use crate::units::GIB;

/// The example file of protocol §12, verbatim.
pub(super) const PROTOCOL_EXAMPLE: &str = r#"listen = "127.0.0.1:8080"
upstream = "http://127.0.0.1:3000"
store = "memory"
admin_listen = "127.0.0.1:9090"   # optional; admin_token from IDEM_ADMIN_TOKEN

[defaults]                        # every [[route]] inherits these
methods = ["POST", "PATCH"]
key = "required"                  # required | optional | derived
dedupe_window = "10s"             # retention of derived keys
concurrent = "reject"             # reject | wait
wait_timeout = "10s"
lease = "30s"
retention = "24h"
fail = "closed"                   # closed | open
ambiguous = "hold"                # hold | release | store
max_body = "1MiB"
upstream_timeout = "30s"
scope_headers = ["authorization", "cookie"]
fingerprint_headers = ["content-type"]
store_statuses = ["2xx", 400, 404, 405, 410, 413, 415, 422]
mode = "sync"                     # sync | async

[[route]]                         # first match wins; unmatched requests use [defaults]
match = "POST /payments/*"
concurrent = "wait"
"#;

pub(super) fn no_env(_: &str) -> Option<String> {
    None
}

/// Only `IDEM_ADMIN_TOKEN`, which an admin listener requires.
pub(super) fn token_env(name: &str) -> Option<String> {
    (name == "IDEM_ADMIN_TOKEN").then(|| "test-admin-token".to_owned())
}

pub(super) fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |name| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
}

pub(super) fn load_ok(src: &str) -> Config {
    load_str("idem.toml", src, &token_env, &Overrides::default())
        .unwrap_or_else(|e| panic!("should load: {e}"))
}

/// Loads `src` (with an upstream prepended unless it sets one) and
/// returns the error message.
pub(super) fn load_err(src: &str) -> String {
    let src = if src.contains("upstream =") {
        src.to_owned()
    } else {
        format!("upstream = \"http://127.0.0.1:3000\"\n{src}")
    };
    match load_str("idem.toml", &src, &no_env, &Overrides::default()) {
        Ok(c) => panic!("should be refused:\n{src}\ngot {c:?}"),
        Err(e) => e.to_string(),
    }
}

pub(super) fn assert_err(src: &str, line: usize, needles: &[&str]) {
    let msg = load_err(src);
    let prefix = format!("idem.toml:{line}: ");
    assert!(
        msg.starts_with(&prefix),
        "expected `{prefix}…`, got `{msg}`"
    );
    for n in needles {
        assert!(msg.contains(n), "`{msg}` should mention `{n}`");
    }
}

#[test]
fn spec_example_loads_with_expected_values() {
    let c = load_ok(PROTOCOL_EXAMPLE);
    assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.upstream, "http://127.0.0.1:3000".parse::<Uri>().unwrap());
    assert_eq!(c.store, StoreSpec::Memory);
    assert_eq!(c.admin_listen, Some("127.0.0.1:9090".parse().unwrap()));
    assert_eq!(c.admin_token.as_deref(), Some("test-admin-token"));
    assert_eq!(c.limits, Limits::default());
    assert_eq!(c.source, Some(PathBuf::from("idem.toml")));
    // The example spells out the built-in defaults.
    assert_eq!(**c.routes.default_policy(), RoutePolicy::default());

    let routes = c.routes.routes();
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].method, Some(Method::POST));
    assert_eq!(routes[0].path.as_str(), "/payments/*");
    let mut expected = RoutePolicy::default();
    expected.concurrent = Concurrent::Wait;
    assert_eq!(*routes[0].policy, expected);
    let p = c
        .routes
        .classify(&Method::POST, "/payments/7")
        .expect("participates");
    assert_eq!(p.concurrent, Concurrent::Wait);
}

#[test]
fn routes_inherit_defaults_from_the_file() {
    let c = load_ok(
        r#"upstream = "http://127.0.0.1:3000"
[defaults]
lease = "6s"
scope_headers = ["X-Tenant", "x-tenant", "Authorization"]
store_statuses = ["2xx", "5xx", 409]
max_body = 2048
ignore_json_pointers = ["", "/meta/request_id", "/a~1b/~0c"]
canonical_json = true

[[route]]
match = "/payments/**"
retention = "1h30m"
methods = []

[[route]]
match = "PUT /things/*"
key = "derived"
fail = "open"
ambiguous = "store"
mode = "async"
max_body = "10kB"
"#,
    );
    let d = c.routes.default_policy();
    assert_eq!(d.lease, Duration::from_secs(6));
    assert_eq!(d.retention, Duration::from_secs(86_400));
    assert_eq!(
        d.scope_headers,
        vec![
            HeaderName::from_static("x-tenant"),
            HeaderName::from_static("authorization")
        ]
    );
    assert!(d.store_statuses.contains(201) && d.store_statuses.contains(503));
    assert!(d.store_statuses.contains(409) && !d.store_statuses.contains(404));
    assert_eq!(d.max_body, 2048);
    assert!(d.canonical_json);
    assert_eq!(d.ignore_json_pointers.len(), 3);

    let [r1, r2] = c.routes.routes() else {
        panic!("two routes expected");
    };
    assert_eq!(r1.method, None);
    assert_eq!(r1.policy.lease, Duration::from_secs(6), "inherited");
    assert_eq!(r1.policy.retention, Duration::from_secs(5400));
    assert!(r1.policy.methods.is_empty());
    assert_eq!(r1.policy.scope_headers, d.scope_headers);
    assert!(c.routes.classify(&Method::POST, "/payments/1").is_none());

    assert_eq!(r2.policy.lease, Duration::from_secs(6), "inherited");
    assert_eq!(r2.policy.key, KeyPolicy::Derived);
    assert_eq!(r2.policy.fail, FailMode::Open);
    assert_eq!(r2.policy.ambiguous, Ambiguous::Store);
    assert_eq!(r2.policy.mode, Mode::Async);
    assert_eq!(r2.policy.max_body, 10_000);
    assert!(r2.policy.canonical_json, "inherited");
}

#[test]
fn async_keys() {
    let c = load_ok(
        r#"upstream = "http://127.0.0.1:3000"
[defaults]
retry_backoff = "250ms"

[[route]]
match = "POST /jobs/*"
mode = "async"
max_attempts = 8
"#,
    );
    let d = c.routes.default_policy();
    assert_eq!(
        (d.max_attempts, d.retry_backoff),
        (5, Duration::from_millis(250))
    );
    let [r] = c.routes.routes() else {
        panic!("one route expected");
    };
    assert_eq!(r.policy.mode, Mode::Async);
    assert_eq!(r.policy.max_attempts, 8);
    assert_eq!(
        r.policy.retry_backoff,
        Duration::from_millis(250),
        "inherited"
    );
    let limits = Limits::default();
    assert_eq!((limits.async_workers, limits.max_pending), (64, 100_000));
    assert_err(
        "[defaults]\nmax_attempts = 0\n",
        3,
        &["max_attempts", "1 to 1000"],
    );
    assert_err(
        "[defaults]\nretry_backoff = \"0s\"\n",
        3,
        &["retry_backoff"],
    );
    assert_err(
        "[defaults]\nretry_backoff = 5\n",
        3,
        &["retry_backoff", "no unit"],
    );
}

#[test]
fn limits_table() {
    let c = load_ok(
        r#"upstream = "http://127.0.0.1:3000"
[limits]
store_timeout = "500ms"
request_read_timeout = "5s"
max_header_bytes = "16KiB"
max_connections = 100
max_concurrent_streams = 50
idle_timeout = "2s"
local_cache_bytes = 0
memory_max_entries = 10
memory_max_bytes = "1GiB"
shutdown_grace = "0s"
complete_retry = "3s"
async_workers = 0
threads = 3
max_pending = 500
"#,
    );
    assert_eq!(
        c.limits,
        Limits {
            store_timeout: Duration::from_millis(500),
            request_read_timeout: Duration::from_secs(5),
            max_header_bytes: 16 * 1024,
            max_connections: 100,
            max_concurrent_streams: 50,
            idle_timeout: Duration::from_secs(2),
            local_cache_bytes: 0,
            memory_max_entries: 10,
            memory_max_bytes: GIB,
            shutdown_grace: Duration::ZERO,
            complete_retry: Duration::from_secs(3),
            async_workers: 0,
            threads: 3,
            max_pending: 500,
        }
    );
    assert_err(
        "[limits]\ncomplete_retry = \"0s\"\n",
        3,
        &["complete_retry"],
    );
    assert_err(
        "[limits]\nmax_pending = 0\n",
        3,
        &["max_pending", "greater than 0"],
    );
    assert_err("[limits]\nasync_workers = 100001\n", 3, &["async_workers"]);
    assert_err(
        "[limits]\nthreads = 1025\n",
        3,
        &["threads is at most 1024"],
    );
    assert_err("[limits]\nthreads = -1\n", 3, &["threads"]);
    assert!(Limits::default().io_threads() >= 1, "0 means one per CPU");
    assert_err("[limits]\nmax_connections = 0\n", 3, &["max_connections"]);
    assert_err(
        "[limits]\nrequest_read_timeout = \"3s\"\nidle_timeout = \"4s\"\n",
        4,
        &["idle_timeout 4s", "request_read_timeout 3s"],
    );
    assert_err("[limits]\nidle_timeout = \"0s\"\n", 3, &["idle_timeout"]);
    // Unset, it never exceeds request_read_timeout.
    let c =
        load_ok("upstream = \"http://127.0.0.1:3000\"\n[limits]\nrequest_read_timeout = \"2s\"\n");
    assert_eq!(c.limits.idle_timeout, Duration::from_secs(2));
    assert_err("[limits]\nmax_header_bytes = \"1KiB\"\n", 3, &["8KiB"]);
    assert_err(
        "[limits]\nstore_timeout = \"0s\"\n",
        3,
        &["store_timeout", "0s"],
    );
}

#[test]
fn no_file_uses_built_in_defaults() {
    let flags = Overrides {
        upstream: Some("http://10.0.0.1:80".to_owned()),
        ..Overrides::default()
    };
    let c = load(None, &no_env, &flags).expect("valid");
    assert_eq!(c.listen, DEFAULT_LISTEN);
    assert_eq!(c.store, StoreSpec::Memory);
    assert_eq!(c.admin_listen, None);
    assert_eq!(c.source, None);
    assert_eq!(**c.routes.default_policy(), RoutePolicy::default());
    assert!(c.routes.routes().is_empty());
    assert_eq!(
        Config::new(c.upstream.clone()).describe(),
        c.describe(),
        "Config::new holds the same defaults"
    );
}

#[test]
fn a_config_built_in_code_is_the_same_as_its_file() {
    let mut policy = RoutePolicy::default();
    policy.concurrent = Concurrent::Wait;
    let built = Config::new("http://127.0.0.1:3000".parse().unwrap())
        .listen("127.0.0.1:0".parse().unwrap())
        .store("redis://127.0.0.1:6379".parse().unwrap())
        .admin("127.0.0.1:9090".parse().unwrap(), "test-admin-token")
        .routes(RouteTable::new(policy))
        .limits(Limits {
            shutdown_grace: Duration::from_secs(2),
            ..Limits::default()
        });
    let loaded = load_ok(
        r#"listen = "127.0.0.1:0"
upstream = "http://127.0.0.1:3000"
store = "redis://127.0.0.1:6379"
admin_listen = "127.0.0.1:9090"
[defaults]
concurrent = "wait"
[limits]
shutdown_grace = "2s"
"#,
    );
    assert_eq!(built.source, None);
    assert_eq!(built.admin_token, loaded.admin_token);
    // Everything but the first line, which names the file.
    let shown = |c: &Config| c.describe().lines().skip(1).collect::<Vec<_>>().join("\n");
    assert_eq!(shown(&built), shown(&loaded));
}

#[test]
fn upstream_path_slash_is_fine() {
    let c = load_ok("upstream = \"http://backend:3000/\"\n");
    assert_eq!(c.upstream.host(), Some("backend"));
}

#[test]
fn missing_upstream_says_how_to_give_one() {
    let e = load_str(
        "idem.toml",
        "listen = \"127.0.0.1:1\"\n",
        &no_env,
        &Overrides::default(),
    )
    .expect_err("no upstream");
    let msg = e.to_string();
    for n in ["--upstream", "IDEM_UPSTREAM", "upstream ="] {
        assert!(msg.contains(n), "`{msg}` should mention {n}");
    }
    assert!(matches!(e, ConfigError::MissingUpstream));
}

#[test]
fn flags_beat_env_beats_file() {
    let file = r#"listen = "127.0.0.1:1001"
upstream = "http://127.0.0.1:2001"
store = "memory"
admin_listen = "127.0.0.1:3001"
"#;
    let env = env_of(&[
        ("IDEM_LISTEN", "127.0.0.1:1002"),
        ("IDEM_UPSTREAM", " http://127.0.0.1:2002 "),
        ("IDEM_STORE", "redis://127.0.0.1:6379/0"),
        ("IDEM_ADMIN_LISTEN", ""),
        ("IDEM_ADMIN_TOKEN", "t0ken-0f-16-bytes"),
    ]);
    let c = load_str("idem.toml", file, &env, &Overrides::default()).expect("valid");
    assert_eq!(c.listen, "127.0.0.1:1002".parse().unwrap());
    assert_eq!(c.upstream, "http://127.0.0.1:2002".parse::<Uri>().unwrap());
    assert_eq!(c.store, "redis://127.0.0.1:6379/0".parse().unwrap());
    assert_eq!(
        c.admin_listen,
        Some("127.0.0.1:3001".parse().unwrap()),
        "empty env ignored"
    );
    assert_eq!(c.admin_token.as_deref(), Some("t0ken-0f-16-bytes"));

    let flags = Overrides {
        listen: Some("127.0.0.1:1003".to_owned()),
        upstream: Some("http://127.0.0.1:2003".to_owned()),
        store: Some("postgresql://idem@db:5432/idem".to_owned()),
        admin_listen: Some("127.0.0.1:3003".to_owned()),
        ..Overrides::default()
    };
    let c = load_str("idem.toml", file, &env, &flags).expect("valid");
    assert_eq!(c.listen, "127.0.0.1:1003".parse().unwrap());
    assert_eq!(c.upstream, "http://127.0.0.1:2003".parse::<Uri>().unwrap());
    assert_eq!(c.store, "postgresql://idem@db:5432/idem".parse().unwrap());
    assert_eq!(c.admin_listen, Some("127.0.0.1:3003".parse().unwrap()));

    let c = load_str("idem.toml", file, &token_env, &Overrides::default()).expect("valid");
    assert_eq!(c.listen, "127.0.0.1:1001".parse().unwrap());
    assert_eq!(c.upstream, "http://127.0.0.1:2001".parse::<Uri>().unwrap());
}

#[test]
fn bad_env_and_flags_are_named() {
    let file = "upstream = \"http://127.0.0.1:3000\"\n";
    let env = env_of(&[("IDEM_LISTEN", "nope")]);
    let e = load_str("idem.toml", file, &env, &Overrides::default()).expect_err("bad env");
    assert!(
        e.to_string()
            .starts_with("environment variable IDEM_LISTEN: "),
        "{e}"
    );
    let env = env_of(&[("IDEM_STORE", "sqlite://x")]);
    let e = load_str("idem.toml", file, &env, &Overrides::default()).expect_err("bad env");
    assert!(
        e.to_string()
            .starts_with("environment variable IDEM_STORE: "),
        "{e}"
    );
    let env = env_of(&[("IDEM_ADMIN_TOKEN", "two words")]);
    let e = load_str("idem.toml", file, &env, &Overrides::default()).expect_err("bad token");
    assert!(
        e.to_string()
            .starts_with("environment variable IDEM_ADMIN_TOKEN: "),
        "{e}"
    );
    assert!(!e.to_string().contains("two words"));

    let flags = Overrides {
        upstream: Some("ftp://x".to_owned()),
        ..Overrides::default()
    };
    let e = load_str("idem.toml", file, &no_env, &flags).expect_err("bad flag");
    assert_eq!(
        e.to_string(),
        "--upstream: `ftp://x`: scheme `ftp` is not supported; write http://host:port \
         or https://host:port"
    );
    let flags = Overrides {
        tls_cert: Some("cert.pem".to_owned()),
        ..Overrides::default()
    };
    let e = load_str("idem.toml", file, &no_env, &flags).expect_err("half a pair");
    assert!(
        e.to_string().contains("tls_cert is set but tls_key is not"),
        "{e}"
    );
    let flags = Overrides {
        admin_listen: Some("127.0.0.1:8080".to_owned()),
        ..Overrides::default()
    };
    let e = load_str("idem.toml", file, &no_env, &flags).expect_err("same port");
    assert!(e.to_string().starts_with("--admin-listen: "), "{e}");
    // A flag fixes a bad environment value: the flag wins and the variable is not read.
    let env = env_of(&[("IDEM_LISTEN", "nope")]);
    let flags = Overrides {
        listen: Some("127.0.0.1:0".to_owned()),
        ..Overrides::default()
    };
    assert!(load_str("idem.toml", file, &env, &flags).is_ok());
}

#[test]
fn load_reads_files_and_names_missing_ones() {
    let dir = std::env::temp_dir().join(format!("idem-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("idem.toml");
    std::fs::write(
        &path,
        "upstream = \"http://127.0.0.1:3000\"\n[defaults]\nlease = \"1x\"\n",
    )
    .unwrap();
    let e = load(Some(&path), &no_env, &Overrides::default()).expect_err("bad unit");
    assert!(
        e.to_string()
            .starts_with(&format!("{}:3: lease: ", path.display())),
        "{e}"
    );
    std::fs::write(&path, "upstream = \"http://127.0.0.1:3000\"\n").unwrap();
    let c = load(Some(&path), &no_env, &Overrides::default()).expect("valid");
    assert_eq!(c.source.as_deref(), Some(path.as_path()));

    let missing = dir.join("nope.toml");
    let e = load(Some(&missing), &no_env, &Overrides::default()).expect_err("missing");
    assert!(matches!(e, ConfigError::Read { .. }));
    assert!(
        e.to_string()
            .starts_with(&format!("{}: ", missing.display())),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Issue 10, item 8: a lease that a slow store lets lapse while its holder
/// still works (heartbeat every lease/3, each call up to store_timeout).
#[test]
fn a_lease_shorter_than_three_store_timeouts_is_refused() {
    // The defaults' lease against the default store_timeout (2s).
    assert_err(
        "[defaults]\nlease = \"5s\"\n",
        3,
        &["lease 5s", "3 × store_timeout (2s)", "at least 6s"],
    );
    // A route's own lease.
    assert_err(
        "[limits]\nstore_timeout = \"1s\"\n\n[[route]]\nmatch = \"/a\"\nlease = \"2s\"\n",
        7,
        &["lease 2s", "3 × store_timeout (1s)", "at least 3s"],
    );
    // A store_timeout that outgrows the default lease is blamed itself.
    assert_err(
        "[limits]\nstore_timeout = \"11s\"\n",
        3,
        &[
            "store_timeout",
            "default lease",
            "lease 30s",
            "at least 33s",
        ],
    );
    // A route inheriting a good lease is fine; exactly 3× is enough.
    let c = load_ok(
        "upstream = \"http://127.0.0.1:3000\"\n[defaults]\nlease = \"3s\"\n\
         [[route]]\nmatch = \"/a\"\n[limits]\nstore_timeout = \"1s\"\n",
    );
    assert!(c.validate().is_ok());
    // Built in code: Config::validate (run by Gateway::start) says the same.
    let mut policy = RoutePolicy::default();
    policy.lease = Duration::from_secs(1);
    let c = Config::new("http://127.0.0.1:3000".parse().unwrap()).routes(RouteTable::new(policy));
    let e = c.validate().expect_err("1s lease, 2s store_timeout");
    assert!(matches!(e, ConfigError::Invalid { .. }), "{e:?}");
    assert!(e.to_string().contains("[defaults]: lease 1s"), "{e}");
}

/// Issue 10, item 18: a one-character admin token was accepted.
#[test]
fn a_short_admin_token_is_refused() {
    let file = "upstream = \"http://127.0.0.1:3000\"\n";
    for short in ["Q", "fifteen-bytes!!"] {
        let env = env_of(&[("IDEM_ADMIN_TOKEN", short)]);
        let e = load_str("idem.toml", file, &env, &Overrides::default()).expect_err("short");
        let msg = e.to_string();
        assert!(
            msg.starts_with("environment variable IDEM_ADMIN_TOKEN: ")
                && msg.contains("at least 16"),
            "{msg}"
        );
        assert!(!msg.contains(short), "the token leaked: {msg}");
    }
    let env = env_of(&[("IDEM_ADMIN_TOKEN", "sixteen-bytes!!!")]);
    assert!(load_str("idem.toml", file, &env, &Overrides::default()).is_ok());
    let c = Config::new("http://127.0.0.1:3000".parse().unwrap())
        .admin("127.0.0.1:9090".parse().unwrap(), "x");
    let e = c.validate().expect_err("short token in code");
    assert!(e.to_string().contains("at least 16"), "{e}");
}

#[test]
fn key_header_per_route() {
    let c = load_ok(
        r#"upstream = "http://127.0.0.1:3000"
[defaults]
key_header = "X-Idempotency-Key"

[[route]]
match = "POST /webhooks/**"
key_header = "webhook-id"

[[route]]
match = "POST /payments/*"
"#,
    );
    let d = c.routes.default_policy();
    assert_eq!(d.key_header, HeaderName::from_static("x-idempotency-key"));
    let [hook, pay] = c.routes.routes() else {
        panic!("two routes expected");
    };
    assert_eq!(
        hook.policy.key_header,
        HeaderName::from_static("webhook-id")
    );
    assert_eq!(
        pay.policy.key_header,
        HeaderName::from_static("x-idempotency-key"),
        "inherited"
    );
    assert_eq!(
        RoutePolicy::default().key_header,
        HeaderName::from_static("idempotency-key")
    );
    let text = c.describe();
    assert!(text.contains("key_header            webhook-id"), "{text}");
    assert!(
        text.contains("key_header            x-idempotency-key"),
        "{text}"
    );

    assert_err(
        "[defaults]\nkey_header = \"bad header\"\n",
        3,
        &["key_header", "not a valid header name"],
    );
    assert_err(
        "[[route]]\nmatch = \"POST /x\"\nkey_header = \"Authorization\"\n",
        4,
        &["key_header", "`Authorization` cannot carry the key"],
    );
    assert_err(
        "[defaults]\nkey_header = \"connection\"\n",
        3,
        &["key_header", "cannot carry the key"],
    );
    assert_err("[defaults]\nkey_header = \"\"\n", 3, &["key_header"]);
    assert_err("[defaults]\nkey_header = 5\n", 3, &["key_header"]);
}

#[test]
fn tls_paths_from_the_file_are_relative_to_it() {
    let file = "upstream = \"https://api.example:8443\"\n\
                tls_cert = \"certs/gw.pem\"\n\
                tls_key = \"/etc/idem/gw.key\"\n";
    let env = env_of(&[("IDEM_UPSTREAM_CA", "ca.pem")]);
    let flags = Overrides {
        store_ca: Some("store-ca.pem".to_owned()),
        ..Overrides::default()
    };
    let c = load_str("conf/idem.toml", file, &env, &flags).expect("valid");
    assert_eq!(c.tls.cert, Some(PathBuf::from("conf/certs/gw.pem")));
    assert_eq!(c.tls.key, Some(PathBuf::from("/etc/idem/gw.key")));
    assert_eq!(c.tls.upstream_ca, Some(PathBuf::from("ca.pem")));
    assert_eq!(c.tls.store_ca, Some(PathBuf::from("store-ca.pem")));
    let plan = c.describe();
    assert!(
        plan.contains("TLS conf/certs/gw.pem; h2 and HTTP/1.1 by ALPN"),
        "{plan}"
    );
    assert!(plan.contains("system roots + ca.pem"), "{plan}");
}
