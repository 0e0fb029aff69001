//! Properties that must hold for every input, not only the ones we thought
//! of: the key parser never panics and round-trips, normalized paths are a
//! fixed point, canonical JSON ignores key order and whitespace.

use http::{HeaderMap, Method, Uri};
use idem::fingerprint::{fingerprint, FingerprintOptions};
use idem::key::{parse_header_value, IdempotencyKey};
use idem::path::normalize;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn key_parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = parse_header_value(&bytes);
        if let Ok(s) = std::str::from_utf8(&bytes) {
            let _ = IdempotencyKey::parse(s);
        }
    }

    #[test]
    fn a_valid_key_round_trips(key in "[!-~]{1,255}") {
        let parsed = IdempotencyKey::parse(&key).expect("visible ASCII of 1-255 is a key");
        prop_assert_eq!(parsed.as_str(), key.as_str());
        // As an sf-string, with `\` and `"` escaped, it reads back the same.
        let quoted = format!("\"{}\"", key.replace('\\', "\\\\").replace('"', "\\\""));
        if let Ok(from_header) = parse_header_value(quoted.as_bytes()) {
            prop_assert_eq!(from_header.as_str(), key.as_str());
        }
    }

    #[test]
    fn normalizing_twice_is_normalizing_once(path in "/[a-zA-Z0-9%./_~-]{0,40}") {
        if let Ok(once) = normalize(&path) {
            let twice = normalize(&once).expect("a normal path normalizes");
            prop_assert_eq!(twice.as_ref(), once.as_ref());
            prop_assert!(!once.contains("//"), "{}", once);
            prop_assert!(once == "/" || !once.ends_with('/'), "{}", once);
        }
    }

    #[test]
    fn normalize_never_panics(path in "\\PC{0,60}") {
        let _ = normalize(&path);
    }

    #[test]
    fn canonical_json_ignores_key_order_and_whitespace(
        entries in proptest::collection::btree_map("[a-z]{1,6}", any::<i32>(), 0..8),
        spaces in 0usize..3,
    ) {
        let forward: Vec<String> = entries.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        let backward: Vec<String> = forward.iter().rev().cloned().collect();
        let pad = " ".repeat(spaces);
        let a = format!("{{{}}}", forward.join(","));
        let b = format!("{{{pad}{}{pad}}}", backward.join(&format!(",{pad}\n")));
        let opts = FingerprintOptions { canonical_json: true, ..FingerprintOptions::default() };
        let uri = Uri::from_static("/orders");
        let headers = HeaderMap::new();
        prop_assert_eq!(
            fingerprint(&Method::POST, &uri, &headers, a.as_bytes(), &opts),
            fingerprint(&Method::POST, &uri, &headers, b.as_bytes(), &opts)
        );
    }
}
