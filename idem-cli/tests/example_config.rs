//! `idem.example.toml`, the sample configuration at the root of the
//! repository, loads as it is shipped, spells out the built-in defaults, and
//! names every key `idem serve --check` knows, as does `docs/gateway.md`.

use std::path::{Path, PathBuf};

use idem::policy::{Concurrent, KeyPolicy};
use idem::RoutePolicy;
use idem_cli::config::{self, Config, Limits, Overrides, StoreSpec};

fn repo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name)
}

fn read(name: &str) -> String {
    let path = repo_file(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// No `IDEM_*` variable at all: the file alone decides.
fn no_env(_: &str) -> Option<String> {
    None
}

fn load_example() -> Config {
    let path = repo_file("idem.example.toml");
    config::load(Some(&path), &no_env, &Overrides::default())
        .unwrap_or_else(|e| panic!("idem.example.toml must load as shipped: {e}"))
}

#[test]
fn the_example_loads_and_spells_out_the_defaults() {
    let c = load_example();
    assert_eq!(c.listen, "127.0.0.1:8080".parse().expect("an address"));
    assert_eq!(c.upstream, "http://127.0.0.1:3000");
    assert_eq!(c.store, StoreSpec::Memory);
    assert_eq!(c.admin_listen, None, "admin_listen is shown commented out");
    assert_eq!(
        c.limits,
        Limits::default(),
        "[limits] in the example must show the built-in defaults"
    );
    assert_eq!(
        **c.routes.default_policy(),
        RoutePolicy::default(),
        "[defaults] in the example must show the built-in defaults"
    );

    let routes = c.routes.routes();
    assert!(!routes.is_empty(), "the example shows [[route]] tables");
    let payments = c
        .routes
        .classify(&http::Method::POST, "/payments/7")
        .expect("POST /payments/7 takes part");
    assert_eq!(payments.concurrent, Concurrent::Wait);
    let webhooks = c
        .routes
        .classify(&http::Method::POST, "/webhooks/github/push")
        .expect("POST /webhooks/** takes part");
    assert_eq!(webhooks.key, KeyPolicy::Derived);
    assert!(
        c.routes
            .classify(&http::Method::POST, "/internal/jobs")
            .is_none(),
        "/internal/** is exempt"
    );
}

#[test]
fn the_commented_admin_listener_is_valid_once_uncommented() {
    let text = read("idem.example.toml");
    let line = "# admin_listen = \"127.0.0.1:9090\"";
    assert!(text.contains(line), "the example shows `{line}`");
    let text = text.replace(line, "admin_listen = \"127.0.0.1:9090\"");
    let token = |name: &str| {
        (name == "IDEM_ADMIN_TOKEN").then(|| "example-token-of-32-random-chars".to_owned())
    };
    let c = config::load_str("idem.example.toml", &text, &token, &Overrides::default())
        .unwrap_or_else(|e| panic!("admin_listen uncommented must load with a token: {e}"));
    assert_eq!(
        c.admin_listen,
        Some("127.0.0.1:9090".parse().expect("an address"))
    );
}

/// The keys `--check` prints (one indented `key value` row each, for the
/// policy tables and `[limits]`), plus the top-level keys.
fn known_keys(c: &Config) -> Vec<String> {
    let mut keys: Vec<String> = ["listen", "upstream", "store", "admin_listen", "match"]
        .map(str::to_owned)
        .to_vec();
    for line in c.describe().lines() {
        let Some(row) = line.strip_prefix("  ") else {
            continue;
        };
        if let Some(key) = row.split_whitespace().next() {
            if key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                && !keys.contains(&key.to_owned())
            {
                keys.push(key.to_owned());
            }
        }
    }
    keys
}

#[test]
fn the_example_and_the_reference_name_every_key() {
    let c = load_example();
    let keys = known_keys(&c);
    assert!(
        keys.len() > 20,
        "expected the policy and [limits] rows of --check, got {keys:?}"
    );
    let example = read("idem.example.toml");
    let reference = read("docs/gateway.md");
    for key in &keys {
        assert!(
            example.contains(&format!("\n{key} = ")) || example.contains(&format!("# {key} = ")),
            "idem.example.toml does not show `{key} = …`"
        );
        assert!(
            reference.contains(&format!("`{key}`")),
            "docs/gateway.md does not document `{key}`"
        );
    }
}
