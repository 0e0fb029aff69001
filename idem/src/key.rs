//! Idempotency keys, scopes and storage keys (protocol §3.2, §3.3).
//!
//! - [`IdempotencyKey`]: the client's key, read from the key header by
//!   [`from_header_values`] / [`parse_header_value`]. A bare token or an
//!   RFC 8941 sf-string (`"abc"`, unquoted before use); valid keys are
//!   1–255 visible ASCII characters (0x21–0x7E).
//! - [`Scope`]: who owns a key, a BLAKE3 hash of the configured scope headers
//!   (default `Authorization` and `Cookie`), so credentials are never kept
//!   in clear. Derived keys (the fingerprint as key) live in a scope of
//!   their own, [`Scope::derived`], that no client key can reach.
//! - [`StoreKey`]: what the store is indexed by, `hex(scope) ":" key`. The same
//!   key in two scopes is two store keys, so one scope can never read or
//!   block another scope's record.
//!
//! [`KeyError`] explains a refusal in words fit for a 400
//! `idempotency_key_invalid` problem `detail`; it never repeats the key.

use std::borrow::Cow;
use std::cell::RefCell;
use std::error::Error;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, OnceLock};

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::hash::{hex_into, push_hex, put, put_len, Feed};

/// The longest key accepted, in characters (protocol §3.2).
pub const MAX_KEY_LEN: usize = 255;

/// Domain separation for [`Scope::from_headers`].
const SCOPE_HEADERS_DOMAIN: &[u8] = b"idem.scope.v1";
/// Domain separation for [`Scope::named`].
const SCOPE_NAME_DOMAIN: &[u8] = b"idem.scope.name.v1";
/// Domain separation for [`Scope::derived`].
const SCOPE_DERIVED_DOMAIN: &[u8] = b"idem.scope.derived.v1";
/// Length of [`Scope::to_hex`], the prefix of every [`StoreKey`].
const SCOPE_HEX_LEN: usize = 32;

/// A validated idempotency key: 1–255 visible ASCII chars (0x21–0x7E),
/// already unquoted.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(Box<str>);

impl IdempotencyKey {
    /// Validates `raw` as a key as it is: no trimming and no sf-string
    /// unquoting (that is header syntax, see [`parse_header_value`]).
    ///
    /// This is the entry point of the function-level API. A comma is a
    /// visible ASCII character like any other here; only a header value
    /// refuses it, as a list.
    ///
    /// # Errors
    ///
    /// If `raw` is empty, longer than 255 characters or holds anything but
    /// visible ASCII.
    pub fn parse(raw: &str) -> Result<Self, KeyError> {
        validate_key(raw.as_bytes()).map(|key| Self(key.into()))
    }

    /// The key.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IdempotencyKey").field(&&*self.0).finish()
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a key was refused.
///
/// [`reason`](Self::reason) says precisely what is wrong, in words fit for
/// the `detail` of a 400 `idempotency_key_invalid` problem. It never contains
/// the key itself. Positions count from 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    reason: Cow<'static, str>,
}

impl KeyError {
    fn new(reason: impl Into<Cow<'static, str>>) -> Self {
        Self {
            reason: reason.into(),
        }
    }

    fn empty() -> Self {
        Self::new("the key is empty")
    }

    fn list() -> Self {
        Self::new("a comma-separated list is not one key; send exactly one key")
    }

    fn missing_quote() -> Self {
        Self::new("malformed sf-string: missing closing quote")
    }

    /// A byte outside 0x21–0x7E at `index` (0-based) of the key.
    fn bad_byte(byte: u8, index: usize) -> Self {
        let what = match byte {
            b' ' => "a space",
            b'\t' => "a tab",
            0x7F => "a DEL character",
            0x00..=0x1F => "a control character",
            _ => "a non-ASCII byte",
        };
        Self::new(format!(
            "the key contains {what} at position {}; only visible ASCII (0x21-0x7E) is allowed",
            index + 1
        ))
    }

    /// What is wrong with the key.
    #[must_use]
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl Error for KeyError {}

/// Reads the key from all values of the key header.
///
/// `Ok(None)`: no header at all (the key is missing; route policy decides).
/// Two or more header values are refused, even if they are equal: they may
/// come from different hops and no one can tell which is meant. One value
/// goes through [`parse_header_value`].
///
/// # Errors
///
/// If the header appears more than once or its value is not a valid key.
pub fn from_header_values<'a>(
    values: impl IntoIterator<Item = &'a HeaderValue>,
) -> Result<Option<IdempotencyKey>, KeyError> {
    from_named_header_values("Idempotency-Key", values)
}

/// [`from_header_values`] for a key header of another name (a route's
/// `key_header`, protocol §13): the same rules, and a refusal that names
/// `name` (see [`header_display_name`]).
///
/// # Errors
///
/// If the header appears more than once or its value is not a valid key.
pub fn from_named_header_values<'a>(
    name: &str,
    values: impl IntoIterator<Item = &'a HeaderValue>,
) -> Result<Option<IdempotencyKey>, KeyError> {
    let mut values = values.into_iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(KeyError::new(format!(
            "more than one {name} header; send exactly one"
        )));
    }
    parse_header_value(first.as_bytes()).map(Some)
}

/// How a key header is named to clients: `Idempotency-Key` for the
/// default, otherwise the configured name as written to the wire (lower
/// case, as HTTP/2 sends it; names are case-insensitive).
#[must_use]
pub fn header_display_name(name: &HeaderName) -> &str {
    if name.as_str() == crate::policy::DEFAULT_KEY_HEADER {
        "Idempotency-Key"
    } else {
        name.as_str()
    }
}

/// Parses one value of the key header.
///
/// Surrounding spaces and tabs are trimmed. A value starting with `"` is an
/// RFC 8941 sf-string: it must end with the closing `"`, the only escapes
/// are `\"` and `\\`, and its unescaped content is the key (a comma inside
/// is fine: it is one string). Any other value is a bare key, and a comma in
/// it makes it a list, which is refused. Either way the key must then be
/// 1–255 visible ASCII characters (0x21–0x7E), the length counted after
/// unquoting.
///
/// # Errors
///
/// If the value is empty, a list, a malformed sf-string, or its key is too
/// long or holds anything but visible ASCII.
pub fn parse_header_value(value: &[u8]) -> Result<IdempotencyKey, KeyError> {
    let value = trim_ows(value);
    match value.first() {
        None => Err(KeyError::empty()),
        Some(b'"') => {
            let content = unquote_sf_string(value)?;
            validate_key(&content).map(|key| IdempotencyKey(key.into()))
        }
        Some(_) if value.contains(&b',') => Err(KeyError::list()),
        Some(_) => validate_key(value).map(|key| IdempotencyKey(key.into())),
    }
}

/// Strips leading and trailing SP / HTAB (RFC 9110 OWS).
fn trim_ows(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

/// The content of the sf-string `value` (which starts with `"`), unescaped.
/// Borrows unless an escape had to be undone.
fn unquote_sf_string(value: &[u8]) -> Result<Cow<'_, [u8]>, KeyError> {
    let body = value.get(1..).unwrap_or_default();
    // Allocated on the first escape only; until then `body[..i]` is the content.
    let mut unescaped: Option<Vec<u8>> = None;
    let mut i = 0;
    while let Some(&byte) = body.get(i) {
        match byte {
            b'\\' => match body.get(i + 1) {
                Some(&escaped @ (b'"' | b'\\')) => {
                    unescaped
                        .get_or_insert_with(|| body[..i].to_vec())
                        .push(escaped);
                    i += 2;
                }
                // `"abc\` ends inside an escape: the string was never closed.
                None => return Err(KeyError::missing_quote()),
                Some(_) => {
                    return Err(KeyError::new(format!(
                        "malformed sf-string: the backslash at byte {} of the header value \
                         escapes something other than '\"' or '\\'",
                        i + 2
                    )))
                }
            },
            b'"' => {
                let after = trim_ows(&body[i + 1..]);
                return match after.first() {
                    None => Ok(match unescaped {
                        Some(v) => Cow::Owned(v),
                        None => Cow::Borrowed(&body[..i]),
                    }),
                    Some(b',') => Err(KeyError::list()),
                    Some(_) => Err(KeyError::new(format!(
                        "malformed sf-string: an unescaped '\"' at byte {} of the header value \
                         ends the string before the end of the value",
                        i + 2
                    ))),
                };
            }
            _ => {
                if let Some(v) = unescaped.as_mut() {
                    v.push(byte);
                }
                i += 1;
            }
        }
    }
    Err(KeyError::missing_quote())
}

fn is_visible_ascii(byte: u8) -> bool {
    (0x21..=0x7E).contains(&byte)
}

/// Checks the key rules (1–255 visible ASCII characters) and returns the key
/// as text.
fn validate_key(key: &[u8]) -> Result<&str, KeyError> {
    if key.is_empty() {
        return Err(KeyError::empty());
    }
    if let Some(index) = key.iter().position(|&b| !is_visible_ascii(b)) {
        return Err(KeyError::bad_byte(key[index], index));
    }
    // All visible ASCII from here: one byte is one character.
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::new(format!(
            "the key is {} characters long; the limit is {MAX_KEY_LEN}",
            key.len()
        )));
    }
    std::str::from_utf8(key).map_err(|_| KeyError::new("the key is not ASCII"))
}

/// Who owns a key (protocol §3.3): 16 bytes of a BLAKE3 hash over the configured
/// scope headers (or a name); the headers are never kept in clear.
///
/// Two requests share a scope only if they carry the same scope headers with
/// the same values.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scope([u8; 16]);

impl Scope {
    /// The scope of a request: a hash of the `names` headers of `headers`, in
    /// the order of `names`.
    ///
    /// Each header contributes its name and all its values in order, every
    /// field length-prefixed, so `("a", "bc")` never equals `("ab", "c")`, and
    /// an absent header (no values) differs from an empty one (one empty
    /// value). With no `names` at all every request shares
    /// [`Scope::global`].
    #[must_use]
    pub fn from_headers(headers: &HeaderMap, names: &[HeaderName]) -> Scope {
        if names.is_empty() {
            return Scope::global();
        }
        if names.iter().all(|name| !headers.contains_key(name)) {
            return Scope::of_absent(names);
        }
        Scope::hash_headers(headers, names)
    }

    /// The scope of a request that sends none of `names`: the hash of
    /// [`from_headers`](Self::from_headers) with every header absent, which
    /// depends on `names` alone. It is the common case (a request without
    /// `Authorization` or `Cookie`, the default names), so the last list
    /// asked for is remembered per thread with its scope and the hash is
    /// not made again; another list replaces it.
    fn of_absent(names: &[HeaderName]) -> Scope {
        thread_local! {
            static LAST: RefCell<Option<(Box<[HeaderName]>, Scope)>> =
                const { RefCell::new(None) };
        }
        LAST.with(|last| {
            // Nothing below calls back in here, so the cell is always free;
            // were it not, the hash is made as if nothing were remembered.
            let Ok(mut last) = last.try_borrow_mut() else {
                return Scope::hash_headers(&HeaderMap::new(), names);
            };
            match &*last {
                Some((known, scope)) if **known == *names => *scope,
                _ => {
                    let scope = Scope::hash_headers(&HeaderMap::new(), names);
                    *last = Some((names.into(), scope));
                    scope
                }
            }
        })
    }

    fn hash_headers(headers: &HeaderMap, names: &[HeaderName]) -> Scope {
        let mut h = Feed::new();
        put(&mut h, SCOPE_HEADERS_DOMAIN);
        put_len(&mut h, names.len());
        for name in names {
            put(&mut h, name.as_str().as_bytes());
            let values = headers.get_all(name);
            put_len(&mut h, values.iter().count());
            for value in values {
                put(&mut h, value.as_bytes());
            }
        }
        Scope::from_hash(&h.finalize())
    }

    /// A scope from an arbitrary name (function-level API: a tenant id, an
    /// API key …), hashed with its own domain separation so it never equals a
    /// header scope.
    #[must_use]
    pub fn named(name: &str) -> Scope {
        let mut h = Feed::new();
        put(&mut h, SCOPE_NAME_DOMAIN);
        put(&mut h, name.as_bytes());
        Scope::from_hash(&h.finalize())
    }

    /// The scope that holds this scope's *derived* keys (`key = "derived"`:
    /// the fingerprint is the key): this scope hashed again under its own
    /// domain. A client's key lives in the client's scope, which is never a
    /// derived one, so no key a client sends (the fingerprint's hex, or any
    /// other text) can read or block a derived record, and no derived
    /// record can answer a client's key.
    #[must_use]
    pub fn derived(&self) -> Scope {
        let mut h = Feed::new();
        put(&mut h, SCOPE_DERIVED_DOMAIN);
        put(&mut h, &self.0);
        Scope::from_hash(&h.finalize())
    }

    /// The global scope, shared by everyone: `Scope::named("")`. Also the
    /// scope of [`Scope::from_headers`] when no scope headers are configured.
    #[must_use]
    pub fn global() -> Scope {
        static GLOBAL: OnceLock<Scope> = OnceLock::new();
        *GLOBAL.get_or_init(|| Scope::named(""))
    }

    /// The scope as 32 lowercase hex characters.
    #[must_use]
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(SCOPE_HEX_LEN);
        push_hex(&mut s, &self.0);
        s
    }

    fn from_hash(hash: &blake3::Hash) -> Scope {
        let mut bytes = [0; 16];
        bytes.copy_from_slice(&hash.as_bytes()[..16]);
        Scope(bytes)
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scope({})", self.to_hex())
    }
}

/// The storage key: `hex(scope) ":" key` (protocol §3.3: `H(scope) ‖ key`).
/// Cheap to clone.
///
/// It carries a hash of its text, computed once with a per-process random
/// seed: the maps a request goes through (local cache, memory store shards,
/// waiter registry) hash 8 bytes instead of the whole key each time, and
/// keys chosen by clients still cannot be aimed at one bucket.
#[derive(Clone)]
pub struct StoreKey {
    text: Arc<str>,
    hash: u64,
}

impl StoreKey {
    fn from_text(text: Arc<str>) -> Self {
        let hash = Self::hash_of(text.as_bytes());
        Self { text, hash }
    }

    /// The hash a store key of this text carries: a map that keeps many
    /// keys can keep their text alone and hash it again.
    pub(crate) fn hash_of(text: &[u8]) -> u64 {
        static SEED: std::sync::OnceLock<std::collections::hash_map::RandomState> =
            std::sync::OnceLock::new();
        std::hash::BuildHasher::hash_one(SEED.get_or_init(Default::default), text)
    }

    /// The hash this key carries (see the type).
    #[cfg(test)]
    pub(crate) fn carried_hash(&self) -> u64 {
        self.hash
    }

    /// Which of `shards` holds this key, in a map of store keys split into
    /// shards: from the carried hash's high half, because the map inside a
    /// shard ([`CarriedHash`]) places its keys by the low bits and tags
    /// them with the top seven, so the keys of one shard still spread over
    /// its buckets.
    pub(crate) fn shard(&self, shards: usize) -> usize {
        // Truncating the hash is intended.
        ((self.hash >> 32) as usize) % shards.max(1)
    }

    /// The store key of text taken from another store key's
    /// [`as_str`](Self::as_str).
    #[cfg(feature = "memory")]
    pub(crate) fn from_text_of(text: &str) -> Self {
        Self::from_text(text.into())
    }
}

/// How a map of store keys hashes them: by the hash each key carries (a
/// keyed SipHash of its text, made once per key with the process's random
/// seed), so a lookup does not hash those 8 bytes again (std's SipHash,
/// ~130 instructions a lookup). Keys chosen by clients still cannot be
/// aimed at one bucket: the carried hash is keyed.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CarriedHash;

/// A map of store keys, hashed by [`CarriedHash`].
pub(crate) type KeyMap<V> = std::collections::HashMap<StoreKey, V, CarriedHash>;

impl BuildHasher for CarriedHash {
    type Hasher = CarriedHasher;

    fn build_hasher(&self) -> CarriedHasher {
        CarriedHasher(0)
    }
}

/// Passes on the one `u64` a store key (or the memory store's own form of
/// one) writes. Anything else written (never, for these keys) is folded in
/// byte by byte (FNV-1a), so it is still a hash of everything written.
pub(crate) struct CarriedHasher(u64);

impl Hasher for CarriedHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl PartialEq for StoreKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.text == other.text
    }
}

impl Eq for StoreKey {}

impl std::hash::Hash for StoreKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialOrd for StoreKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for StoreKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.text.cmp(&other.text)
    }
}

impl StoreKey {
    /// The store key of `key` in `scope`.
    ///
    /// Takes `&str` rather than an [`IdempotencyKey`] so derived keys (a
    /// fingerprint in hex) fit too; keep `key` within the key rules
    /// (1–255 visible ASCII) so [`StoreKey::from_stored`] accepts it back.
    #[must_use]
    pub fn new(scope: &Scope, key: &str) -> StoreKey {
        // Put together in one buffer (on the stack for any key within the
        // rules) and copied once, into the `Arc` the key lives in.
        let len = SCOPE_HEX_LEN + 1 + key.len();
        let mut stack = [0u8; SCOPE_HEX_LEN + 1 + MAX_KEY_LEN];
        let mut heap = Vec::new();
        let text = match stack.get_mut(..len) {
            Some(text) => text,
            None => {
                heap.resize(len, 0);
                heap.as_mut_slice()
            }
        };
        let (hex, rest) = text.split_at_mut(SCOPE_HEX_LEN);
        hex_into(hex, &scope.0);
        if let Some((colon, tail)) = rest.split_first_mut() {
            *colon = b':';
            tail.copy_from_slice(key.as_bytes());
        }
        // Hex digits, ':' and the key's own UTF-8: always valid, so this
        // borrows the buffer as it is.
        StoreKey::from_text(String::from_utf8_lossy(text).into())
    }

    /// The store key as text, `hex(scope) ":" key`.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The scope part: 32 lowercase hex characters.
    #[must_use]
    pub fn scope_hex(&self) -> &str {
        self.text.get(..SCOPE_HEX_LEN).unwrap_or_default()
    }

    /// The key part, after the `:`.
    #[must_use]
    pub fn key(&self) -> &str {
        self.text.get(SCOPE_HEX_LEN + 1..).unwrap_or_default()
    }

    /// Rebuilds a store key from the text of [`StoreKey::as_str`] (stores,
    /// admin).
    ///
    /// # Errors
    ///
    /// If `s` is not 32 lowercase hex characters, `:`, then 1–255 visible
    /// ASCII characters.
    pub fn from_stored(s: &str) -> Result<StoreKey, KeyError> {
        let b = s.as_bytes();
        let shaped = b.len() > SCOPE_HEX_LEN
            && b[..SCOPE_HEX_LEN]
                .iter()
                .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
            && b[SCOPE_HEX_LEN] == b':';
        if !shaped {
            return Err(KeyError::new(
                "a stored key must start with 32 lowercase hex characters and ':'",
            ));
        }
        validate_key(&b[SCOPE_HEX_LEN + 1..])?;
        Ok(StoreKey::from_text(s.into()))
    }
}

impl StoreKey {
    /// A short, stable name of this key for logs: the first 12 hex digits
    /// of the BLAKE3 hash of [`as_str`](StoreKey::as_str). Log lines carry
    /// it instead of the key, which is the client's own text (protocol §10).
    ///
    /// An operator who knows a store key finds its lines with
    /// `printf '%s' "$STORE_KEY" | b3sum | cut -c1-12`.
    #[must_use]
    pub fn log_id(&self) -> LogId {
        let hash = blake3::hash(self.text.as_bytes());
        let mut id = [0; LOG_ID_BYTES];
        id.copy_from_slice(&hash.as_bytes()[..LOG_ID_BYTES]);
        LogId(id)
    }
}

const LOG_ID_BYTES: usize = 6;

/// A [`StoreKey`]'s name in logs ([`StoreKey::log_id`]); displays as 12
/// lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LogId([u8; LOG_ID_BYTES]);

impl fmt::Display for LogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::with_capacity(2 * LOG_ID_BYTES);
        push_hex(&mut s, &self.0);
        f.write_str(&s)
    }
}

impl fmt::Debug for LogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LogId({self})")
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("StoreKey").field(&&*self.text).finish()
    }
}

impl fmt::Display for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    /// Scopes are part of stored keys: a request's scope must hash to the
    /// same value in every version. Computed once and pinned.
    #[test]
    fn scope_values_are_stable_across_versions() {
        let mut headers = HeaderMap::new();
        headers.append(
            "authorization",
            http::HeaderValue::from_static("Bearer abc"),
        );
        headers.append("x-tenant", http::HeaderValue::from_static("t1"));
        headers.append("x-tenant", http::HeaderValue::from_static("t2"));
        let names = [
            HeaderName::from_static("authorization"),
            HeaderName::from_static("x-tenant"),
        ];
        assert_eq!(
            Scope::from_headers(&headers, &names).to_hex(),
            "abb197af33f0560488515bdbbc215f33"
        );
        assert_eq!(
            Scope::named("billing").to_hex(),
            "e0cf53cf25a195c1635945c44f0e5bc6"
        );
    }

    #[test]
    fn log_id_is_a_short_hash_of_the_store_key() {
        let k = StoreKey::new(&Scope::named("t"), "secret-key-123");
        let id = k.log_id().to_string();
        assert_eq!(id.len(), 12);
        assert!(!id.contains("secret"));
        assert_eq!(id, blake3::hash(k.as_str().as_bytes()).to_hex()[..12]);
        assert_ne!(
            k.log_id(),
            StoreKey::new(&Scope::named("t"), "other").log_id()
        );
    }

    fn header(raw: &[u8]) -> Result<String, KeyError> {
        parse_header_value(raw).map(|k| k.as_str().to_owned())
    }

    fn err(raw: &[u8]) -> String {
        match parse_header_value(raw) {
            Ok(k) => panic!("{:?} was accepted as {k:?}", String::from_utf8_lossy(raw)),
            Err(e) => e.reason().to_owned(),
        }
    }

    #[test]
    fn bare_key() {
        assert_eq!(header(b"order-1001").unwrap(), "order-1001");
        assert_eq!(header(b"!~").unwrap(), "!~");
        let k = IdempotencyKey::parse("abc").unwrap();
        assert_eq!(k.as_str(), "abc");
        assert_eq!(k.to_string(), "abc");
        assert_eq!(format!("{k:?}"), "IdempotencyKey(\"abc\")");
    }

    #[test]
    fn sf_string_is_unquoted() {
        assert_eq!(header(b"\"abc\"").unwrap(), "abc");
        assert_eq!(header(br#""a\"b""#).unwrap(), "a\"b");
        assert_eq!(header(br#""a\\b""#).unwrap(), "a\\b");
        assert_eq!(header(br#""\\\"""#).unwrap(), "\\\"");
    }

    #[test]
    fn bad_escape_is_malformed() {
        let e = err(br#""a\nb""#);
        assert!(e.starts_with("malformed sf-string"), "{e}");
        assert!(e.contains("byte 3"), "{e}");
        assert!(err(br#""a\"#).contains("missing closing quote"));
    }

    #[test]
    fn length_limit_counts_after_unquoting() {
        let max = "k".repeat(255);
        let over = "k".repeat(256);
        assert_eq!(header(max.as_bytes()).unwrap(), max);
        assert_eq!(header(format!("\"{max}\"").as_bytes()).unwrap(), max);
        let e = err(over.as_bytes());
        assert_eq!(e, "the key is 256 characters long; the limit is 255");
        assert_eq!(err(format!("\"{over}\"").as_bytes()), e);
        // 254 characters plus one escape: 255 after unquoting.
        let escaped = format!("\"{}\\\\\"", "k".repeat(254));
        assert_eq!(header(escaped.as_bytes()).unwrap().len(), 255);
        assert!(IdempotencyKey::parse(&max).is_ok());
        assert!(IdempotencyKey::parse(&over).is_err());
    }

    #[test]
    fn empty_key() {
        assert_eq!(err(b""), "the key is empty");
        assert_eq!(err(b"   \t "), "the key is empty");
        assert_eq!(err(b"\"\""), "the key is empty");
        assert_eq!(err(b" \"\" "), "the key is empty");
        assert!(IdempotencyKey::parse("").is_err());
    }

    #[test]
    fn non_visible_ascii() {
        let e = err("caf\u{e9}".as_bytes());
        assert!(e.contains("non-ASCII byte at position 4"), "{e}");
        assert!(err("\"caf\u{e9}\"".as_bytes()).contains("non-ASCII"));
        assert!(err(b"ab cd").contains("a space at position 3"));
        assert!(err(b"\"ab cd\"").contains("a space at position 3"));
        assert!(err(b"ab\tcd").contains("a tab at position 3"));
        assert!(err(b"ab\x7fcd").contains("DEL"));
        assert!(err(b"ab\x01cd").contains("a control character"));
        assert!(err(b"ab\x00").contains("a control character"));
        assert!(err(b"\xff\xfe").contains("non-ASCII"));
        assert!(IdempotencyKey::parse("a b").is_err());
        assert!(IdempotencyKey::parse("a\u{e9}").is_err());
    }

    #[test]
    fn surrounding_whitespace_is_trimmed() {
        assert_eq!(header(b"  abc\t ").unwrap(), "abc");
        assert_eq!(header(b" \"abc\" ").unwrap(), "abc");
        // Inside quotes the space is part of the key, and is refused.
        assert!(err(b"\" abc\"").contains("a space at position 1"));
    }

    #[test]
    fn lists_are_refused() {
        let list = "a comma-separated list is not one key; send exactly one key";
        assert_eq!(err(b"a,b"), list);
        assert_eq!(err(b"a, b"), list);
        assert_eq!(err(b","), list);
        assert_eq!(err(b"\"a\", \"b\""), list);
        assert_eq!(err(b"\"a\",b"), list);
        // A comma inside an sf-string is one string.
        assert_eq!(header(b"\"a,b\"").unwrap(), "a,b");
        // The function-level API takes the key as it is.
        assert_eq!(IdempotencyKey::parse("a,b").unwrap().as_str(), "a,b");
    }

    #[test]
    fn malformed_sf_strings() {
        assert_eq!(err(b"\"abc"), "malformed sf-string: missing closing quote");
        assert_eq!(err(b"\""), "malformed sf-string: missing closing quote");
        assert_eq!(
            err(br#""abc\""#),
            "malformed sf-string: missing closing quote"
        );
        let e = err(b"\"a\"b\"");
        assert!(
            e.starts_with("malformed sf-string: an unescaped '\"'"),
            "{e}"
        );
        assert!(err(b"\"a\" b").starts_with("malformed sf-string"));
        assert!(err(b"\"a\";p=1").starts_with("malformed sf-string"));
    }

    #[test]
    fn header_values() {
        let none: [&HeaderValue; 0] = [];
        assert_eq!(from_header_values(none).unwrap(), None);

        let one = HeaderValue::from_static("\"k-1\"");
        assert_eq!(from_header_values([&one]).unwrap().unwrap().as_str(), "k-1");

        let two = HeaderValue::from_static("k-1");
        let e = from_header_values([&one, &two]).unwrap_err();
        assert_eq!(
            e.reason(),
            "more than one Idempotency-Key header; send exactly one"
        );
        assert!(from_header_values([&two, &two]).is_err());

        let mut map = HeaderMap::new();
        map.append("idempotency-key", HeaderValue::from_static("a"));
        map.append("idempotency-key", HeaderValue::from_static("b"));
        assert!(from_header_values(map.get_all("idempotency-key")).is_err());
        assert_eq!(from_header_values(map.get_all("other")).unwrap(), None);

        let bad = HeaderValue::from_static("a b");
        assert!(from_header_values([&bad]).is_err());
    }

    #[test]
    fn errors_never_echo_the_key() {
        let secret = "SeCrEt";
        let long = format!("{secret}{}", "x".repeat(300));
        let bad: Vec<Vec<u8>> = vec![
            format!("{secret} x").into_bytes(),
            format!("{secret}\tx").into_bytes(),
            format!("{secret},{secret}").into_bytes(),
            format!("\"{secret}").into_bytes(),
            format!("\"{secret}\\n\"").into_bytes(),
            format!("\"{secret}\"{secret}\"").into_bytes(),
            format!("{secret}\u{e9}").into_bytes(),
            format!("{secret}\x7f").into_bytes(),
            long.clone().into_bytes(),
            format!("\"{long}\"").into_bytes(),
        ];
        for raw in &bad {
            let e = err(raw);
            assert!(!e.contains(secret), "{e:?} echoes the key");
            assert!(!KeyError::new(e.clone()).to_string().contains(secret));
        }
        let e = StoreKey::from_stored(&format!("{}:{secret} ", "0".repeat(32))).unwrap_err();
        assert!(!e.reason().contains(secret));
        let e = StoreKey::from_stored(secret).unwrap_err();
        assert!(!e.to_string().contains(secret));
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn scope_from_headers() {
        let auth = [http::header::AUTHORIZATION];
        let a = headers(&[("authorization", "Bearer a"), ("x-other", "1")]);
        let a2 = headers(&[("authorization", "Bearer a"), ("x-other", "2")]);
        let b = headers(&[("authorization", "Bearer b")]);
        assert_eq!(
            Scope::from_headers(&a, &auth),
            Scope::from_headers(&a2, &auth)
        );
        assert_ne!(
            Scope::from_headers(&a, &auth),
            Scope::from_headers(&b, &auth)
        );

        let absent = headers(&[]);
        let empty = headers(&[("authorization", "")]);
        assert_ne!(
            Scope::from_headers(&absent, &auth),
            Scope::from_headers(&empty, &auth)
        );
        assert_ne!(Scope::from_headers(&absent, &auth), Scope::global());
    }

    /// The scope of a request without any of the names is remembered per
    /// thread for the last list of names: it is the hash itself, and the
    /// list it was made for answers no other list.
    #[test]
    fn the_remembered_absent_scope_is_the_hash_of_its_own_names() {
        let absent = headers(&[]);
        let lists: [&[HeaderName]; 4] = [
            &[http::header::AUTHORIZATION, http::header::COOKIE],
            &[http::header::AUTHORIZATION],
            &[http::header::COOKIE, http::header::AUTHORIZATION],
            &[http::header::AUTHORIZATION, http::header::COOKIE],
        ];
        let hashed: Vec<Scope> = lists
            .iter()
            .map(|names| Scope::hash_headers(&absent, names))
            .collect();
        for _ in 0..3 {
            for (names, scope) in lists.iter().zip(&hashed) {
                assert_eq!(Scope::from_headers(&absent, names), *scope);
                // Another header, not one of the names, changes nothing.
                let other = headers(&[("x-other", "1")]);
                assert_eq!(Scope::from_headers(&other, names), *scope);
            }
        }
        assert_ne!(hashed[0], hashed[1]);
        assert_ne!(hashed[0], hashed[2]);
        // The default names, pinned as the stored keys of every version.
        assert_eq!(hashed[0].to_hex(), "ebb7ad678f301f41adc89347c0076082");
        // One of the names present is hashed, not remembered.
        let one = headers(&[("cookie", "s=1")]);
        assert_ne!(Scope::from_headers(&one, lists[0]), hashed[0]);
        assert_eq!(
            Scope::from_headers(&one, lists[0]),
            Scope::hash_headers(&one, lists[0])
        );
    }

    #[test]
    fn scope_fields_cannot_run_into_each_other() {
        let names = [
            HeaderName::from_static("x-a"),
            HeaderName::from_static("x-b"),
        ];
        let one = headers(&[("x-a", "a"), ("x-b", "bc")]);
        let two = headers(&[("x-a", "ab"), ("x-b", "c")]);
        assert_ne!(
            Scope::from_headers(&one, &names),
            Scope::from_headers(&two, &names)
        );
        // Two values of one header are not one value of each.
        let split = headers(&[("x-a", "a"), ("x-a", "b")]);
        let spread = headers(&[("x-a", "a"), ("x-b", "b")]);
        assert_ne!(
            Scope::from_headers(&split, &names),
            Scope::from_headers(&spread, &names)
        );
        // The order of `names` counts.
        let swapped = [names[1].clone(), names[0].clone()];
        assert_ne!(
            Scope::from_headers(&one, &names),
            Scope::from_headers(&one, &swapped)
        );
    }

    #[test]
    fn scope_value_order_matters() {
        let names = [HeaderName::from_static("x-a")];
        let ab = headers(&[("x-a", "1"), ("x-a", "2")]);
        let ba = headers(&[("x-a", "2"), ("x-a", "1")]);
        assert_ne!(
            Scope::from_headers(&ab, &names),
            Scope::from_headers(&ba, &names)
        );
        assert_eq!(
            Scope::from_headers(&ab, &names),
            Scope::from_headers(&ab.clone(), &names)
        );
    }

    #[test]
    fn named_and_global_scopes() {
        assert_eq!(Scope::named("t-1"), Scope::named("t-1"));
        assert_ne!(Scope::named("t-1"), Scope::named("t-2"));
        assert_eq!(Scope::global(), Scope::named(""));
        assert_eq!(
            Scope::from_headers(&headers(&[("x-a", "1")]), &[]),
            Scope::global()
        );
        // A name never collides with the header scope of the same text.
        let names = [HeaderName::from_static("x-a")];
        assert_ne!(
            Scope::named("x-a"),
            Scope::from_headers(&headers(&[("x-a", "x-a")]), &names)
        );
        let hex = Scope::named("t-1").to_hex();
        assert_eq!(hex.len(), 32);
        assert!(hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')));
        assert_eq!(
            format!("{:?}", Scope::named("t-1")),
            format!("Scope({hex})")
        );
    }

    #[test]
    fn store_key_shape_and_round_trip() {
        let scope = Scope::named("tenant-42");
        let key = StoreKey::new(&scope, "order-1001");
        assert_eq!(key.as_str(), format!("{}:order-1001", scope.to_hex()));
        assert_eq!(key.scope_hex(), scope.to_hex());
        assert_eq!(key.key(), "order-1001");
        assert_eq!(key.to_string(), key.as_str());
        assert_eq!(format!("{key:?}"), format!("StoreKey({:?})", key.as_str()));
        assert_eq!(StoreKey::from_stored(key.as_str()).unwrap(), key);
        assert_ne!(key, StoreKey::new(&Scope::named("tenant-43"), "order-1001"));

        let max = StoreKey::new(&scope, &"k".repeat(255));
        assert_eq!(StoreKey::from_stored(max.as_str()).unwrap(), max);
        let derived = StoreKey::new(&scope.derived(), &"ab".repeat(32));
        assert_eq!(StoreKey::from_stored(derived.as_str()).unwrap(), derived);
        // Outside the key rules (`new` takes any text): longer than the
        // longest key, and not ASCII, the text is still `hex:key`.
        for odd in ["k".repeat(256), "k".repeat(4096), "ключ-€".to_owned()] {
            let key = StoreKey::new(&scope, &odd);
            assert_eq!(key.as_str(), format!("{}:{odd}", scope.to_hex()));
            assert_eq!(key.key(), odd);
        }
    }

    #[test]
    fn derived_scopes_are_apart() {
        let scope = Scope::named("tenant-42");
        assert_eq!(scope.derived(), scope.derived());
        assert_ne!(scope.derived(), scope);
        assert_ne!(scope.derived(), Scope::named("tenant-43").derived());
        assert_ne!(scope.derived().derived(), scope.derived());
        assert_ne!(Scope::global().derived(), Scope::global());
    }

    #[test]
    fn store_key_rejections() {
        let hex = Scope::global().to_hex();
        for bad in [
            String::new(),
            "abc".to_owned(),
            hex.clone(),
            format!("{hex}:"),
            format!("{hex}-k"),
            format!("{}:k", hex.to_uppercase()),
            format!("{}:k", &hex[1..]),
            format!("{hex}0:k"),
            format!("{}:k", "g".repeat(32)),
            format!("{hex}:a b"),
            format!("{hex}:{}", "k".repeat(256)),
            format!("{hex}:\u{e9}"),
        ] {
            assert!(StoreKey::from_stored(&bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(
            StoreKey::from_stored(&format!("{hex}:"))
                .unwrap_err()
                .reason(),
            "the key is empty"
        );
    }

    #[test]
    fn key_error_is_an_error() {
        let e: Box<dyn Error + Send + Sync> = Box::new(KeyError::empty());
        assert_eq!(e.to_string(), "the key is empty");
    }
}
