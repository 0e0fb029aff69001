//! The checks behind the fuzz targets, one function per target.
//!
//! Each takes the fuzzer's raw input and panics when a property fails, so
//! the same functions serve `fuzz_targets/*.rs` (libFuzzer, via cargo-fuzz)
//! and `tests/replay.rs` (stable `cargo test`, over `seeds/` and
//! `regressions/`).

use http::{HeaderMap, Method, Uri};
use idem::fingerprint::{fingerprint, Fingerprint, FingerprintOptions};
use idem::key::{parse_header_value, IdempotencyKey};
use serde_json::Value;

// ---------------------------------------------------------------------------
// key

/// `parse_header_value` on the bytes and `IdempotencyKey::parse` on them as
/// UTF-8: never a panic; an accepted key is 1..=255 visible ASCII and reads
/// back as itself, bare and as an sf-string.
pub fn key(data: &[u8]) {
    match parse_header_value(data) {
        Ok(k) => {
            check_key(&k);
            // Written back as an RFC 8941 sf-string, it reads back the same.
            let quoted = format!(
                "\"{}\"",
                k.as_str().replace('\\', "\\\\").replace('"', "\\\"")
            );
            assert_eq!(parse_header_value(quoted.as_bytes()).as_ref(), Ok(&k));
            // So does the bare form, unless header syntax reads it otherwise
            // (a list, or the start of an sf-string).
            if !k.as_str().contains(',') && !k.as_str().starts_with('"') {
                assert_eq!(parse_header_value(k.as_str().as_bytes()).as_ref(), Ok(&k));
            }
        }
        Err(e) => assert!(!e.reason().is_empty()),
    }
    if let Ok(s) = std::str::from_utf8(data) {
        match IdempotencyKey::parse(s) {
            Ok(k) => {
                check_key(&k);
                assert_eq!(k.as_str(), s, "parse takes the key as it is");
            }
            Err(e) => {
                assert!(!e.reason().is_empty());
                assert!(
                    !is_valid_key(s),
                    "a valid key was refused: {s:?}: {}",
                    e.reason()
                );
            }
        }
    }
}

fn is_valid_key(s: &str) -> bool {
    (1..=idem::key::MAX_KEY_LEN).contains(&s.len()) && s.bytes().all(|b| (0x21..=0x7E).contains(&b))
}

fn check_key(k: &IdempotencyKey) {
    let s = k.as_str();
    assert!(
        is_valid_key(s),
        "an accepted key is 1..=255 visible ASCII: {s:?}"
    );
    assert_eq!(IdempotencyKey::parse(s).as_ref(), Ok(k), "round trip");
}

// ---------------------------------------------------------------------------
// canonical_json

/// Input: `POINTERS \0 BODY`, where POINTERS are `\n`-separated (at most
/// four), or just BODY when there is no NUL byte. With a POINTERS part, a
/// pointer to the body's first object member (`~`/`/` escaped) and to the
/// first array element are added, so removal is reached too.
///
/// `fingerprint` with `canonical_json` never panics; for a body that parses
/// as JSON it hashes either the canonical form (the parsed value, pointers
/// removed, serialized) or, when canonical form could merge two requests,
/// the raw bytes; and the value re-serialized (compact or pretty) gets the
/// same fingerprint as the original whenever the original was canonical.
pub fn canonical_json(data: &[u8]) {
    let (pointers, body) = match data.iter().position(|&b| b == 0) {
        Some(i) => {
            let mut pointers: Vec<String> = data[..i]
                .split(|&b| b == b'\n')
                .take(4)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            let body = &data[i + 1..];
            if let Ok(value) = serde_json::from_slice::<Value>(body) {
                pointers.extend(derived_pointers(&value));
            }
            (pointers, body)
        }
        None => (Vec::new(), data),
    };
    let opts = FingerprintOptions {
        canonical_json: true,
        ignore_json_pointers: &pointers,
        ..FingerprintOptions::default()
    };
    let fp = fp(body, &opts);

    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        // Not JSON: the raw bytes.
        assert_eq!(fp, raw_fp(body), "a body that is not JSON is hashed raw");
        return;
    };
    let mut removed = value.clone();
    for p in &pointers {
        remove_pointer(&mut removed, p);
    }
    let expected = serde_json::to_vec(&removed).expect("a Value serializes");
    let canonical = raw_fp(&expected);
    let raw = raw_fp(body);
    assert!(
        fp == canonical || fp == raw,
        "neither canonical form nor raw bytes: {:?}",
        String::from_utf8_lossy(body)
    );
    if fp == canonical {
        let compact = serde_json::to_vec(&value).expect("a Value serializes");
        assert_eq!(
            fp,
            self::fp(&compact, &opts),
            "re-serialized compact differs: {:?} vs {:?}",
            String::from_utf8_lossy(body),
            String::from_utf8_lossy(&compact)
        );
        let pretty = serde_json::to_vec_pretty(&value).expect("a Value serializes");
        assert_eq!(
            fp,
            self::fp(&pretty, &opts),
            "re-serialized pretty differs: {:?}",
            String::from_utf8_lossy(body)
        );
        // Canonical form keeps every number's value: each float as parsed
        // equals the correctly rounded value of its token (else two
        // different numbers can share one canonical form).
        let shape = Shape::of(body);
        let tokens = number_tokens(body);
        assert_eq!(
            tokens.len(),
            shape.numbers.len(),
            "{:?}",
            String::from_utf8_lossy(body)
        );
        for (token, parsed) in tokens.iter().zip(&shape.numbers) {
            if let Some(parsed) = parsed {
                let exact: f64 = token.parse().expect("a JSON number is a float");
                assert_eq!(
                    parsed.to_bits(),
                    exact.to_bits(),
                    "the number {token} was read as {parsed:e}, not {exact:e}, and hashed so: {:?}",
                    String::from_utf8_lossy(body)
                );
            }
        }
    } else {
        // Raw bytes are hashed only when canonical form could merge two
        // requests: a duplicate key, or a number a float cannot hold (only
        // floats are at risk: integers within i64/u64 are kept exactly).
        assert_ne!(
            body,
            serde_json::to_vec(&value).expect("a Value serializes"),
            "serde_json's own compact output was hashed raw"
        );
        let shape = Shape::of(body);
        assert!(
            shape.duplicate_key || shape.float,
            "valid JSON without a duplicate key or a float was hashed raw: {:?}",
            String::from_utf8_lossy(body)
        );
    }
}

fn fp(body: &[u8], opts: &FingerprintOptions<'_>) -> Fingerprint {
    fingerprint(
        &Method::POST,
        &Uri::from_static("/fuzz"),
        &HeaderMap::new(),
        body,
        opts,
    )
}

/// The fingerprint of `body` hashed as it is.
fn raw_fp(body: &[u8]) -> Fingerprint {
    fp(body, &FingerprintOptions::default())
}

/// Pointers to the first member of the top-level object (and to the first
/// member of that if it is an object too), or to the first element of an
/// array.
fn derived_pointers(value: &Value) -> Vec<String> {
    fn escape(token: &str) -> String {
        token.replace('~', "~0").replace('/', "~1")
    }
    let mut out = Vec::new();
    match value {
        Value::Object(map) => {
            if let Some((k, v)) = map.iter().next() {
                let top = format!("/{}", escape(k));
                if let Some((k2, _)) = v.as_object().and_then(|m| m.iter().next()) {
                    out.push(format!("{top}/{}", escape(k2)));
                } else if v.is_array() {
                    out.push(format!("{top}/0"));
                }
                out.push(top);
            }
        }
        Value::Array(items) if !items.is_empty() => out.push("/0".to_owned()),
        _ => {}
    }
    out
}

/// RFC 6901 removal as the fingerprint documents it, written independently
/// on `serde_json`'s own pointer lookup: an object member is removed, an
/// array element becomes `null`, `""` makes the whole value `null`, a
/// pointer that does not start with `/` or finds nothing does nothing.
fn remove_pointer(root: &mut Value, pointer: &str) {
    if pointer.is_empty() {
        *root = Value::Null;
        return;
    }
    if !pointer.starts_with('/') {
        return;
    }
    let (parent, last) = pointer.rsplit_once('/').expect("starts with '/'");
    let last = last.replace("~1", "/").replace("~0", "~");
    match root.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.remove(&last);
        }
        Some(Value::Array(items)) => {
            let index = if last.starts_with('+') || (last.starts_with('0') && last.len() > 1) {
                None
            } else {
                last.parse::<usize>().ok()
            };
            if let Some(item) = index.and_then(|i| items.get_mut(i)) {
                *item = Value::Null;
            }
        }
        _ => {}
    }
}

/// What a JSON document holds that canonical form could lose, found by
/// deserializing it again with a visitor that sees every member and number.
#[derive(Default)]
struct Shape {
    duplicate_key: bool,
    float: bool,
    /// Every number in document order: `Some` for one read as a float.
    numbers: Vec<Option<f64>>,
}

impl Shape {
    fn of(body: &[u8]) -> Shape {
        let mut shape = Shape::default();
        let mut de = serde_json::Deserializer::from_slice(body);
        serde::de::DeserializeSeed::deserialize(ShapeSeed(&mut shape), &mut de)
            .expect("the body parsed as a Value");
        shape
    }
}

/// The number tokens of the valid JSON `body`, in document order.
fn number_tokens(body: &[u8]) -> Vec<&str> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => {
                i += 1;
                while i < body.len() && body[i] != b'"' {
                    i += if body[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < body.len()
                    && matches!(body[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                out.push(std::str::from_utf8(&body[start..i]).expect("ASCII"));
            }
            _ => i += 1,
        }
    }
    out
}

struct ShapeSeed<'a>(&'a mut Shape);

impl<'de> serde::de::DeserializeSeed<'de> for ShapeSeed<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ShapeSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        self.0.numbers.push(None);
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        self.0.numbers.push(None);
        Ok(())
    }
    fn visit_f64<E>(self, f: f64) -> Result<(), E> {
        self.0.float = true;
        self.0.numbers.push(Some(f));
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(ShapeSeed(&mut *self.0))?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut keys = std::collections::HashSet::new();
        while let Some(k) = map.next_key::<String>()? {
            if !keys.insert(k) {
                self.0.duplicate_key = true;
            }
            map.next_value_seed(ShapeSeed(&mut *self.0))?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// config

/// `idem_cli::config::load_str` on any UTF-8 text: errors are fine, a panic
/// is not; an accepted configuration can be described and printed. Short
/// inputs also go through `parse_duration` and `parse_size` directly.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let flags = idem_cli::config::Overrides::default();
    match idem_cli::config::load_str("fuzz.toml", text, &|_| None, &flags) {
        Ok(cfg) => {
            let _ = cfg.describe();
            let _ = format!("{cfg:?}");
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    if text.len() <= 64 {
        if let Ok(d) = idem_cli::units::parse_duration(text) {
            assert!(d <= idem_cli::units::MAX_DURATION, "{text:?} -> {d:?}");
        }
        let _ = idem_cli::units::parse_size(text);
    }
}

// ---------------------------------------------------------------------------
// path

/// `idem::path::normalize` on any UTF-8 text: never a panic; a normal form
/// is a fixed point (normalizing it again gives it back, without error) and
/// has no empty, `.` or `..` segment, no trailing slash, and only upper-case
/// escapes of reserved bytes; a valid request path stays one.
pub fn path(data: &[u8]) {
    let Ok(p) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(once) = idem::path::normalize(p) else {
        return;
    };
    let twice = idem::path::normalize(&once)
        .unwrap_or_else(|e| panic!("{p:?} -> {once:?}, which is refused: {e}"));
    assert_eq!(twice, once, "normalize is not idempotent on {p:?}");
    if !p.starts_with('/') {
        assert_eq!(once, p, "a path not starting with '/' is kept");
        return;
    }
    assert!(once.starts_with('/'), "{p:?} -> {once:?}");
    assert!(once == "/" || !once.ends_with('/'), "{p:?} -> {once:?}");
    for segment in once.split('/').skip(1) {
        assert!(
            once == "/" || !matches!(segment, "" | "." | ".."),
            "{p:?} -> {once:?}"
        );
    }
    assert!(!once.contains('\\'), "{p:?} -> {once:?}");
    let bytes = once.as_bytes();
    for (i, _) in once.match_indices('%') {
        let hex = &bytes[i + 1..i + 3];
        assert!(
            hex.iter()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(b)),
            "{p:?} -> {once:?}"
        );
        let byte = u8::from_str_radix(std::str::from_utf8(hex).expect("ASCII"), 16)
            .expect("two hex digits");
        assert!(
            !(byte.is_ascii_alphanumeric() || b"-._~/\\\0".contains(&byte)),
            "{p:?} -> {once:?}: %{byte:02X} left encoded"
        );
    }
    if !p.contains(['?', '#']) && p.parse::<http::uri::PathAndQuery>().is_ok() {
        assert!(
            once.parse::<http::uri::PathAndQuery>().is_ok(),
            "{p:?} is a valid request path but {once:?} is not"
        );
    }
}
