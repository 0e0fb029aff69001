//! Request fingerprints (protocol §3.4): what makes a request *this* request.
//!
//! A [`Fingerprint`] is a BLAKE3 hash over the method, the path, the query
//! (its `&`-separated parts sorted by name, stably, so the order of distinct
//! parameters does not count but that of a repeated one does), the
//! configured headers (default `content-type`, see [`DEFAULT_HEADERS`]) and
//! the body. The same key sent again with another fingerprint is a reused key
//! (422 `idempotency_key_reused`).
//!
//! Every field is length-prefixed (u64, little endian) after a
//! domain-separation tag, so fields cannot run into each other: moving a
//! byte from the path into the query, or from one header into the next,
//! changes the fingerprint.
//!
//! # JSON bodies
//!
//! With [`FingerprintOptions::canonical_json`], or any
//! [`FingerprintOptions::ignore_json_pointers`], a body that parses as JSON
//! is hashed in canonical form: object keys sorted, no whitespace, strings
//! re-escaped the one `serde_json` way, ignored pointers removed. So
//! `{"b":1, "a":2}` and `{"a":2,"b":1}` are the same request. Canonical form
//! is also used when only pointers are given: it changes nothing a client
//! can see, and it is what lets removal work on the parsed body.
//!
//! The body is hashed as raw bytes instead (ignored pointers then count)
//! when it is not JSON, and when canonical form could make two different
//! requests equal:
//!
//! - a number that a 64-bit float cannot hold exactly (say
//!   `100000000000000000001` or `0.10000000000000000001`), which would be
//!   hashed as its rounded value and so equal another number;
//! - an object with a duplicate key, of which canonical form would keep the
//!   last member only.
//!
//! Falling back to raw bytes is always safe: at worst a retry that differs
//! only in formatting gets a 422 instead of its replay.

use std::borrow::Cow;
use std::fmt;

use http::{HeaderMap, HeaderName, Method, Uri};

use crate::hash::{push_hex, put, put_len, Feed};
use serde_json::Value;

/// Domain separation for [`fingerprint`].
const REQUEST_DOMAIN: &[u8] = b"idem.fp.v1";
/// Domain separation for [`Fingerprint::of_bytes`].
const BYTES_DOMAIN: &[u8] = b"idem.fp.bytes.v1";

/// The headers that enter a fingerprint unless a route says otherwise
/// (protocol §3.4): `content-type`.
pub static DEFAULT_HEADERS: [HeaderName; 1] = [http::header::CONTENT_TYPE];

/// BLAKE3 hash of what makes a request *this* request (protocol §3.4).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint as 64 lowercase hex characters.
    #[must_use]
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        push_hex(&mut s, &self.0);
        s
    }

    /// Parses 64 hex characters (either case), as written by
    /// [`Fingerprint::to_hex`].
    #[must_use]
    pub fn from_hex(s: &str) -> Option<Fingerprint> {
        let s = s.as_bytes();
        if s.len() != 64 {
            return None;
        }
        let mut bytes = [0; 32];
        for (byte, pair) in bytes.iter_mut().zip(s.chunks_exact(2)) {
            *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Some(Fingerprint(bytes))
    }

    /// For the function-level API: a domain-separated hash of raw bytes (the
    /// serialized input of the operation). Never equal to a request
    /// [`fingerprint`].
    #[must_use]
    pub fn of_bytes(bytes: &[u8]) -> Fingerprint {
        let mut h = Feed::new();
        put(&mut h, BYTES_DOMAIN);
        put(&mut h, bytes);
        Fingerprint(*h.finalize().as_bytes())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut short = String::with_capacity(16);
        push_hex(&mut short, &self.0[..8]);
        write!(f, "Fingerprint({short}…)")
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// How a route fingerprints requests.
#[derive(Debug, Clone, Default)]
pub struct FingerprintOptions<'a> {
    /// Headers whose values enter the hash, in this order (routes default to
    /// [`DEFAULT_HEADERS`]). Headers not listed never count.
    pub headers: &'a [HeaderName],
    /// Hash JSON bodies in canonical form: keys sorted, no whitespace.
    pub canonical_json: bool,
    /// RFC 6901 pointers removed from JSON bodies before hashing (a request
    /// id, a client timestamp …). Check them with [`validate_json_pointer`]
    /// when the configuration is loaded; an invalid one is ignored here.
    pub ignore_json_pointers: &'a [String],
}

/// The fingerprint of a request: method, normalized path+query, the
/// selected headers and the body.
///
/// - Path: `uri.path()` as it is.
/// - Query: split on `&`, empty parts dropped, the parts sorted by name
///   (stably: repeated parameters keep their order), so `?b=2&a=1` equals
///   `?a=1&b=2`, `?a=1&a=2` differs from `?a=2&a=1`, and no query equals an
///   empty one (`?`).
///   Parts are not percent-decoded.
/// - Headers: for each of `opts.headers` its name and all its values in
///   order; an absent header differs from an empty one.
/// - Body: raw bytes, or canonical JSON (see the [module docs](self)).
#[must_use]
pub fn fingerprint(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    opts: &FingerprintOptions<'_>,
) -> Fingerprint {
    let mut h = Feed::new();
    put(&mut h, REQUEST_DOMAIN);
    put(&mut h, method.as_str().as_bytes());
    put(&mut h, uri.path().as_bytes());
    put_query(&mut h, uri.query().unwrap_or_default());

    put_len(&mut h, opts.headers.len());
    for name in opts.headers {
        put(&mut h, name.as_str().as_bytes());
        let values = headers.get_all(name);
        put_len(&mut h, values.iter().count());
        for value in values {
            put(&mut h, value.as_bytes());
        }
    }

    let canonical = if opts.canonical_json || !opts.ignore_json_pointers.is_empty() {
        canonical_json(body, opts.ignore_json_pointers)
    } else {
        None
    };
    put(&mut h, canonical.as_deref().unwrap_or(body));
    Fingerprint(*h.finalize().as_bytes())
}

/// Checks an RFC 6901 JSON pointer when the configuration is loaded: `""`
/// (the whole body) or `/`-separated tokens in which `~` appears only as
/// `~0` (for `~`) or `~1` (for `/`).
///
/// # Errors
///
/// A sentence saying what is wrong with `p`.
pub fn validate_json_pointer(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Ok(());
    }
    if !p.starts_with('/') {
        return Err(format!(
            "JSON pointer {p:?} must be empty (the whole body) or start with '/'"
        ));
    }
    let mut bytes = p.bytes().enumerate();
    while let Some((i, b)) = bytes.next() {
        if b == b'~' && !matches!(bytes.next(), Some((_, b'0' | b'1'))) {
            return Err(format!(
                "JSON pointer {p:?} has a '~' at byte {} that is not followed by '0' or '1' \
                 (write '~0' for '~' and '~1' for '/')",
                i + 1
            ));
        }
    }
    Ok(())
}

/// Hashes the query's non-empty `&`-parts sorted by parameter name. The
/// sort is stable, so repeated parameters keep their order (`a=1&a=2` is a
/// list that many servers read in order: it differs from `a=2&a=1`).
/// Allocates only when there are two parts or more.
fn put_query(h: &mut Feed, query: &str) {
    let mut parts = query.split('&').filter(|p| !p.is_empty());
    let Some(first) = parts.next() else {
        put_len(h, 0);
        return;
    };
    let Some(second) = parts.next() else {
        put_len(h, 1);
        put(h, first.as_bytes());
        return;
    };
    let mut all = vec![first, second];
    all.extend(parts);
    all.sort_by_key(|part| part.split_once('=').map_or(*part, |(name, _)| name));
    put_len(h, all.len());
    for part in all {
        put(h, part.as_bytes());
    }
}

/// The canonical form of a JSON `body` with `pointers` removed, or `None`
/// when the raw bytes must be hashed instead (not JSON, or canonical form
/// could equal another request's).
fn canonical_json(body: &[u8], pointers: &[String]) -> Option<Vec<u8>> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    if !is_faithful(body, &value) {
        return None;
    }
    for pointer in pointers {
        remove_pointer(&mut value, pointer);
    }
    serde_json::to_vec(&value).ok()
}

/// Whether `value`, parsed from the valid JSON `body`, keeps everything that
/// tells `body` apart from another document: every number exact and every
/// object member (no duplicate key dropped).
fn is_faithful(body: &[u8], value: &Value) -> bool {
    // In valid JSON, outside strings, each ':' separates one object member's
    // key from its value, and a '-' or digit starts a number.
    let mut colons = 0;
    let mut i = 0;
    while let Some(&b) = body.get(i) {
        match b {
            b'"' => {
                i += 1;
                while let Some(&c) = body.get(i) {
                    i += if c == b'\\' { 2 } else { 1 };
                    if c == b'"' {
                        break;
                    }
                }
            }
            b':' => {
                colons += 1;
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while body
                    .get(i)
                    .is_some_and(|c| matches!(c, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                {
                    i += 1;
                }
                if !number_is_exact(&body[start..i]) {
                    return false;
                }
            }
            _ => i += 1,
        }
    }
    colons == member_count(value)
}

/// Object members in `value`, nested ones included.
fn member_count(value: &Value) -> usize {
    match value {
        Value::Object(map) => map.len() + map.values().map(member_count).sum::<usize>(),
        Value::Array(items) => items.iter().map(member_count).sum(),
        _ => 0,
    }
}

/// Whether `serde_json` keeps the JSON number `token` exactly: an integer
/// within `i64`/`u64`, or a number equal to the shortest decimal form of the
/// nearest `f64` (what any float-printing client sends).
///
/// Two different numbers that pass are the shortest forms of two different
/// `f64`s, so they stay apart. (`serde_json` without `float_roundtrip` may
/// round a long one off by one unit in the last place; merging them would
/// then take two adjacent `f64`s under one key, which its own parse cannot
/// tell apart either.)
fn number_is_exact(token: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(token) else {
        return false;
    };
    let integer = !token.iter().any(|b| matches!(b, b'.' | b'e' | b'E'));
    if integer && (text.parse::<u64>().is_ok() || text.parse::<i64>().is_ok()) {
        return true;
    }
    match text.parse::<f64>() {
        Ok(f) if f.is_finite() => {
            // The reference is the writer of the canonical form (serde_json,
            // shortest round-trip digits): an f64 with two shortest decimal
            // forms (`197693124862020.12` / `.13`) is exact only in the one
            // serde_json writes, so the other keeps its own spelling.
            let exact = decimal(text);
            let written = serde_json::Number::from_f64(f).map(|n| n.to_string());
            exact.is_some() && exact == written.as_deref().and_then(decimal)
        }
        _ => false,
    }
}

/// A decimal number as `(negative, significant digits, exponent)`, its value
/// being `digits × 10^exponent`, without leading or trailing zero digits.
/// Zero, whatever its sign, is `(false, "", 0)`.
fn decimal(text: &str) -> Option<(bool, String, i64)> {
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i64>().ok()?),
        None => (unsigned, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = [int, frac].concat();
    let without_trailing = digits.trim_end_matches('0');
    let significant = without_trailing.trim_start_matches('0');
    if significant.is_empty() {
        return Some((false, String::new(), 0));
    }
    let trailing = i64::try_from(digits.len() - without_trailing.len()).ok()?;
    let frac_len = i64::try_from(frac.len()).ok()?;
    let exponent = exponent.checked_sub(frac_len)?.checked_add(trailing)?;
    Some((negative, significant.to_owned(), exponent))
}

/// Removes the target of the RFC 6901 `pointer` from `root`: an object
/// member is removed, an array element is replaced by `null` (so the indices
/// of the other pointers keep meaning the same elements), `""` makes the
/// whole body `null`. A target that does not exist is fine.
fn remove_pointer(root: &mut Value, pointer: &str) {
    let Some(path) = pointer.strip_prefix('/') else {
        if pointer.is_empty() {
            *root = Value::Null;
        }
        return;
    };
    let (parents, last) = match path.rsplit_once('/') {
        Some((parents, last)) => (Some(parents), last),
        None => (None, path),
    };
    let mut target = root;
    for token in parents.into_iter().flat_map(|p| p.split('/')) {
        let token = unescape(token);
        let next = match target {
            Value::Object(map) => map.get_mut(token.as_ref()),
            Value::Array(items) => array_index(&token).and_then(|i| items.get_mut(i)),
            _ => None,
        };
        match next {
            Some(next) => target = next,
            None => return,
        }
    }
    let last = unescape(last);
    match target {
        Value::Object(map) => {
            map.remove(last.as_ref());
        }
        Value::Array(items) => {
            if let Some(item) = array_index(&last).and_then(|i| items.get_mut(i)) {
                *item = Value::Null;
            }
        }
        _ => {}
    }
}

/// A pointer token with `~1` → `/` and then `~0` → `~` (RFC 6901 §4).
fn unescape(token: &str) -> Cow<'_, str> {
    if token.contains('~') {
        Cow::Owned(token.replace("~1", "/").replace("~0", "~"))
    } else {
        Cow::Borrowed(token)
    }
}

/// An RFC 6901 array index: `0` or digits without a leading zero.
fn array_index(token: &str) -> Option<usize> {
    let digits = token.bytes().all(|b| b.is_ascii_digit());
    if !digits || token.is_empty() || (token.len() > 1 && token.starts_with('0')) {
        return None;
    }
    token.parse().ok()
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use http::HeaderValue;

    use super::*;

    /// A request to fingerprint; fields changed one at a time by the tests.
    #[derive(Clone)]
    struct Req {
        method: Method,
        uri: &'static str,
        headers: Vec<(&'static str, &'static str)>,
        body: Vec<u8>,
    }

    fn req(body: &str) -> Req {
        Req {
            method: Method::POST,
            uri: "/orders?currency=EUR&dry_run=false",
            headers: vec![
                ("content-type", "application/json"),
                ("authorization", "Bearer x"),
            ],
            body: body.as_bytes().to_vec(),
        }
    }

    fn fp_with(
        r: &Req,
        names: &[HeaderName],
        canonical_json: bool,
        ignore: &[&str],
    ) -> Fingerprint {
        let mut headers = HeaderMap::new();
        for (name, value) in &r.headers {
            headers.append(*name, HeaderValue::from_static(value));
        }
        let ignore: Vec<String> = ignore.iter().map(|p| (*p).to_owned()).collect();
        let opts = FingerprintOptions {
            headers: names,
            canonical_json,
            ignore_json_pointers: &ignore,
        };
        let uri: Uri = r.uri.parse().unwrap();
        fingerprint(&r.method, &uri, &headers, &r.body, &opts)
    }

    fn fp(r: &Req) -> Fingerprint {
        fp_with(r, &DEFAULT_HEADERS, false, &[])
    }

    fn canon(body: &str) -> Fingerprint {
        fp_with(&req(body), &DEFAULT_HEADERS, true, &[])
    }

    fn ignoring(body: &str, pointers: &[&str]) -> Fingerprint {
        fp_with(&req(body), &DEFAULT_HEADERS, false, pointers)
    }

    #[test]
    fn same_request_same_fingerprint() {
        let r = req(r#"{"amount":10}"#);
        assert_eq!(fp(&r), fp(&r.clone()));
        assert_eq!(
            fp_with(&r, &[], true, &["/x"]),
            fp_with(&r, &[], true, &["/x"])
        );
    }

    #[test]
    fn every_part_counts() {
        let base = req(r#"{"amount":10}"#);
        let mut changed = Vec::new();

        let mut r = base.clone();
        r.body = br#"{"amount":11}"#.to_vec();
        changed.push(("body", r));
        let mut r = base.clone();
        r.method = Method::PATCH;
        changed.push(("method", r));
        let mut r = base.clone();
        r.uri = "/orders/?currency=EUR&dry_run=false";
        changed.push(("path", r));
        let mut r = base.clone();
        r.uri = "/orders?currency=USD&dry_run=false";
        changed.push(("query value", r));
        let mut r = base.clone();
        r.uri = "/orders?currency=EUR";
        changed.push(("query part", r));
        let mut r = base.clone();
        r.headers[0].1 = "application/json; charset=utf-8";
        changed.push(("content-type", r));
        let mut r = base.clone();
        r.headers.remove(0);
        changed.push(("content-type absent", r));

        for (what, r) in &changed {
            assert_ne!(
                fp(&base),
                fp(r),
                "a different {what} must change the fingerprint"
            );
        }
    }

    #[test]
    fn unlisted_headers_do_not_count() {
        let a = req("x");
        let mut b = a.clone();
        b.headers[1].1 = "Bearer y";
        b.headers.push(("x-request-id", "42"));
        assert_eq!(fp(&a), fp(&b));
        // Listed, they do.
        let names = [http::header::CONTENT_TYPE, http::header::AUTHORIZATION];
        assert_ne!(
            fp_with(&a, &names, false, &[]),
            fp_with(&b, &names, false, &[])
        );
    }

    #[test]
    fn header_fields_cannot_run_into_each_other() {
        let names = [
            HeaderName::from_static("x-a"),
            HeaderName::from_static("x-b"),
        ];
        let mut one = req("");
        one.headers = vec![("x-a", "a"), ("x-b", "bc")];
        let mut two = one.clone();
        two.headers = vec![("x-a", "ab"), ("x-b", "c")];
        assert_ne!(
            fp_with(&one, &names, false, &[]),
            fp_with(&two, &names, false, &[])
        );

        let mut absent = one.clone();
        absent.headers = vec![("x-b", "bc")];
        let mut empty = one.clone();
        empty.headers = vec![("x-a", ""), ("x-b", "bc")];
        assert_ne!(
            fp_with(&absent, &names, false, &[]),
            fp_with(&empty, &names, false, &[])
        );

        let mut ab = one.clone();
        ab.headers = vec![("x-a", "1"), ("x-a", "2")];
        let mut ba = one.clone();
        ba.headers = vec![("x-a", "2"), ("x-a", "1")];
        assert_ne!(
            fp_with(&ab, &names, false, &[]),
            fp_with(&ba, &names, false, &[])
        );
    }

    #[test]
    fn query_order_does_not_count() {
        let with = |uri: &'static str| {
            let mut r = req("x");
            r.uri = uri;
            fp(&r)
        };
        assert_eq!(with("/p?b=2&a=1"), with("/p?a=1&b=2"));
        assert_eq!(with("/p?c=3&b=2&a=1"), with("/p?a=1&b=2&c=3"));
        assert_eq!(with("/p?a=1&&b=2&"), with("/p?b=2&a=1"));
        assert_eq!(with("/p"), with("/p?"));
        assert_eq!(with("/p"), with("/p?&&"));
        assert_eq!(with("http://example.com/p?a=1"), with("/p?a=1"));
        assert_ne!(with("/p?a=1&b=2"), with("/p?a=1b=2"));
        assert_ne!(with("/p?a=1&b=2"), with("/p?a=1&b=2&b=2"));
        // Repeated parameters are a list: their order counts (hardening 11).
        assert_ne!(with("/p?a=1&a=2"), with("/p?a=2&a=1"));
        assert_eq!(with("/p?a=1&b=x&a=2"), with("/p?b=x&a=1&a=2"));
        assert_ne!(with("/p?a"), with("/pa"));
    }

    #[test]
    fn canonical_json_ignores_key_order_and_whitespace() {
        let a = r#"{"b":1,"a":{"y":[1,2,{"q":true,"p":null}],"x":"s"}}"#;
        let b = "{ \"a\" : {\n \"x\" : \"s\", \"y\" : [ 1, 2, { \"p\": null, \"q\": true } ] },\n \"b\" : 1 }\n";
        assert_eq!(canon(a), canon(b));
        assert_ne!(fp(&req(a)), fp(&req(b)), "raw mode keeps the bytes");
        // Already canonical bodies hash the same in both modes.
        let sorted = r#"{"a":1,"b":[true,null]}"#;
        assert_eq!(canon(sorted), fp(&req(sorted)));
        // Values still count.
        assert_ne!(canon(r#"{"a":1,"b":2}"#), canon(r#"{"a":2,"b":1}"#));
        assert_ne!(canon("[1,2]"), canon("[2,1]"));
        // Escapes that mean the same string are the same string.
        assert_eq!(canon(r#"{"k":"\u0061"}"#), canon(r#"{"k":"a"}"#));
        // ':' and quotes inside strings are not structure.
        assert_eq!(
            canon(r#"{"u":"http://x/\":1","t":2}"#),
            canon(r#"{"t":2, "u":"http://x/\":1"}"#)
        );
    }

    #[test]
    fn canonical_json_keeps_numbers_apart() {
        assert_eq!(canon(r#"{"a":0.1,"b":2}"#), canon(r#"{"b":2,"a":0.1}"#));
        assert_eq!(
            canon(r#"{"a":0.30000000000000004,"b":-1.5e-7,"c":1e300,"d":-0}"#),
            canon(r#"{"d":-0,"c":1e300,"b":-1.5e-7,"a":0.30000000000000004}"#)
        );
        assert_eq!(
            canon(r#"{"a":18446744073709551615,"b":-9223372036854775808}"#),
            canon(r#"{"b":-9223372036854775808,"a":18446744073709551615}"#)
        );
        for (x, y) in [
            ("100000000000000000001", "100000000000000000000"),
            ("0.10000000000000000001", "0.1"),
            ("18446744073709551617", "18446744073709551616"),
            ("1e-400", "0"),
            ("9007199254740993", "9007199254740992"),
            ("9007199254740993.0", "9007199254740992.0"),
        ] {
            let a = format!(r#"{{"n":{x}}}"#);
            let b = format!(r#"{{"n":{y}}}"#);
            assert_ne!(canon(&a), canon(&b), "{x} and {y} must not be equal");
        }
        // A body holding an inexact number falls back to its raw bytes.
        let inexact = r#"{ "n": 100000000000000000001 }"#;
        assert_eq!(canon(inexact), fp(&req(inexact)));
        assert_ne!(canon(inexact), canon(r#"{"n":100000000000000000001}"#));
    }

    /// Found by fuzzing: serde_json without `float_roundtrip` read `9E238`
    /// one unit off, merging two numbers and splitting one; and an `f64`
    /// with two shortest forms was judged by another writer than the one
    /// that writes the canonical form.
    #[test]
    fn canonical_json_floats_found_by_fuzzing() {
        assert_eq!(canon(r#"{"n":9E238}"#), canon(r#"{"n":9.0e238}"#));
        assert_ne!(
            canon(r#"{"n":9.000000000000001e238}"#),
            canon(r#"{"n":9.000000000000002e238}"#)
        );
        assert_eq!(
            canon(r#"{"amount":197693124862020.12}"#),
            canon(r#"{ "amount": 197693124862020.12 }"#)
        );
    }

    #[test]
    fn duplicate_keys_fall_back_to_raw() {
        let dup = r#"{"a":1,"a":2}"#;
        assert_ne!(canon(dup), canon(r#"{"a":2}"#));
        assert_eq!(canon(dup), fp(&req(dup)));
        let nested = r#"{"o":{"k":1,"k":1}}"#;
        assert_ne!(canon(nested), canon(r#"{"o":{"k":1}}"#));
        assert_eq!(
            ignoring(r#"{"a":1,"a":2}"#, &["/a"]),
            fp(&req(r#"{"a":1,"a":2}"#))
        );
    }

    #[test]
    fn ignored_pointers() {
        let top = |ts: &str| format!(r#"{{"amount":10,"timestamp":{ts}}}"#);
        assert_eq!(
            ignoring(&top("1"), &["/timestamp"]),
            ignoring(&top("\"x\""), &["/timestamp"])
        );
        assert_eq!(
            ignoring(&top("1"), &["/timestamp"]),
            ignoring(r#"{"amount":10}"#, &["/timestamp"])
        );
        assert_ne!(fp(&req(&top("1"))), fp(&req(&top("2"))));
        assert_ne!(
            ignoring(r#"{"amount":10,"timestamp":1}"#, &["/timestamp"]),
            ignoring(r#"{"amount":11,"timestamp":1}"#, &["/timestamp"])
        );

        let nested = ["/meta/nonce"];
        assert_eq!(
            ignoring(r#"{"meta":{"nonce":"n1","v":1},"x":1}"#, &nested),
            ignoring(r#"{"x":1,"meta":{"v":1,"nonce":"n2"}}"#, &nested)
        );
        assert_ne!(
            ignoring(r#"{"meta":{"nonce":"n1","v":1}}"#, &nested),
            ignoring(r#"{"meta":{"nonce":"n1","v":2}}"#, &nested)
        );

        let array = ["/items/0"];
        assert_eq!(
            ignoring(r#"{"items":["a","b"]}"#, &array),
            ignoring(r#"{"items":["z","b"]}"#, &array)
        );
        assert_ne!(
            ignoring(r#"{"items":["a","b"]}"#, &array),
            ignoring(r#"{"items":["a","c"]}"#, &array)
        );
        // Array pointers are independent of their order.
        let both = ["/items/0", "/items/1"];
        let both_rev = ["/items/1", "/items/0"];
        assert_eq!(
            ignoring(r#"{"items":[1,2,3]}"#, &both),
            ignoring(r#"{"items":[7,8,3]}"#, &both_rev)
        );
        assert_ne!(
            ignoring(r#"{"items":[1,2,3]}"#, &both),
            ignoring(r#"{"items":[1,2,4]}"#, &both)
        );

        let escaped = ["/a~1b", "/c~0d"];
        assert_eq!(
            ignoring(r#"{"a/b":1,"c~d":1,"e":1}"#, &escaped),
            ignoring(r#"{"a/b":2,"c~d":2,"e":1}"#, &escaped)
        );
        assert_ne!(
            ignoring(r#"{"a/b":1,"e":1}"#, &escaped),
            ignoring(r#"{"a/b":1,"e":2}"#, &escaped)
        );

        // Missing targets, bad indices and other pointers do no harm.
        let body = r#"{"a":[1],"b":"s"}"#;
        let misses = ["/zz", "/a/5", "/a/01", "/a/-", "/b/c", "/a/0/x", "no-slash"];
        assert_eq!(ignoring(body, &misses), canon(body));

        // "" is the whole body.
        assert_eq!(ignoring(r#"{"a":1}"#, &[""]), ignoring("[2,3]", &[""]));
        assert_eq!(ignoring(r#"{"a":1}"#, &[""]), ignoring("null", &[]));
    }

    #[test]
    fn non_json_bodies_hash_raw() {
        for body in ["", "not json", "{\"a\":1", "a=1&b=2", "{\"a\":1} {}"] {
            assert_eq!(canon(body), fp(&req(body)), "{body:?}");
            assert_eq!(ignoring(body, &["/a"]), fp(&req(body)), "{body:?}");
        }
        assert_ne!(canon("a=1&b=2"), canon("b=2&a=1"));
        let mut binary = req("");
        binary.body = vec![0xff, 0xfe, b'{'];
        assert_eq!(
            fp_with(&binary, &DEFAULT_HEADERS, true, &[]),
            fp_with(&binary, &DEFAULT_HEADERS, false, &[])
        );
    }

    #[test]
    fn json_pointer_validation() {
        for ok in ["", "/", "/a", "/a/0", "/a~0b", "/a~1b", "/~01", "//"] {
            assert_eq!(validate_json_pointer(ok), Ok(()), "{ok:?}");
        }
        for bad in ["a", "a/b", "/a~2", "/a~", "/~x", "#/a"] {
            let e = validate_json_pointer(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        assert_eq!(unescape("~01"), "~1");
        assert_eq!(unescape("a~1b~0c"), "a/b~c");
    }

    /// Fingerprints are stored with their records: the same request must
    /// give the same value in every version, or a retry across an upgrade
    /// would be a 422. These values were computed once and are pinned.
    #[test]
    fn fingerprint_values_are_stable_across_versions() {
        let body = r#"{"amount":100,"note":"a note long enough to span more than one block of the hash: 0123456789abcdef0123456789abcdef"}"#;
        assert_eq!(
            fp(&req(body)).to_hex(),
            "c7d2fa0206d6f7284636f4cae8d3bce5e9361e97b5c4f48c7b01a3db37cc8e95"
        );
        assert_eq!(
            canon(body).to_hex(),
            "c7d2fa0206d6f7284636f4cae8d3bce5e9361e97b5c4f48c7b01a3db37cc8e95"
        );
        assert_eq!(
            Fingerprint::of_bytes(b"job-42").to_hex(),
            "14fd851237a4efebaf0c6062f8220d7ad37098036c1c1bb1e15fc0a6d3026be2"
        );
        let long = "x".repeat(5000);
        assert_eq!(
            fp(&req(&long)).to_hex(),
            "448c0e92e99fc368226370ede05eedcd97d318835b949f9f068d97570cedbf64"
        );
    }

    #[test]
    fn hex_round_trip_and_formatting() {
        let f = fp(&req("x"));
        let hex = f.to_hex();
        assert_eq!(hex.len(), 64);
        assert!(hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')));
        assert_eq!(Fingerprint::from_hex(&hex), Some(f));
        assert_eq!(Fingerprint::from_hex(&hex.to_uppercase()), Some(f));
        assert_eq!(f.to_string(), hex);
        assert_eq!(format!("{f:?}"), format!("Fingerprint({}…)", &hex[..16]));
        assert_eq!(Fingerprint::from_hex(&hex[..63]), None);
        assert_eq!(Fingerprint::from_hex(&format!("{hex}0")), None);
        assert_eq!(Fingerprint::from_hex(&format!("{}g", &hex[..63])), None);
        assert_eq!(Fingerprint::from_hex(&"é".repeat(32)), None);
    }

    #[test]
    fn of_bytes_is_domain_separated() {
        assert_eq!(
            Fingerprint::of_bytes(b"charge"),
            Fingerprint::of_bytes(b"charge")
        );
        assert_ne!(
            Fingerprint::of_bytes(b"charge"),
            Fingerprint::of_bytes(b"charge ")
        );
        assert_ne!(
            Fingerprint::of_bytes(b""),
            Fingerprint(*blake3::hash(b"").as_bytes())
        );
        assert_ne!(Fingerprint::of_bytes(b"x"), fp(&req("x")));
    }

    #[test]
    fn decimal_forms() {
        let d = |s: &str| decimal(s);
        assert_eq!(d("100"), Some((false, "1".to_owned(), 2)));
        assert_eq!(d("1e2"), d("100"));
        assert_eq!(d("0.01e4"), d("100"));
        assert_eq!(d("-1.50E+1"), Some((true, "15".to_owned(), 0)));
        assert_eq!(d("0.000"), Some((false, String::new(), 0)));
        assert_eq!(d("-0e5"), d("0"));
        assert_eq!(d("0.0120"), Some((false, "12".to_owned(), -3)));
        assert_eq!(d("1e99999999999999999999"), None);
    }
}
