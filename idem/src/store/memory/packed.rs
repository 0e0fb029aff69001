//! A completed record as the memory store keeps it: one buffer.
//!
//! A [`CompletedRecord`] in its own form costs several allocations (the
//! `Arc` around it, the header list, each header's name and value, the
//! body), each with the allocator's rounding and header: about 620 bytes
//! for a 100-byte body and two headers. Packed, the same record is one
//! allocation of its bytes plus 80 or so: the fingerprint, the completing
//! holder's token, the operation id if it was one, both times, the status,
//! each header as its name and its value, the body, then the record's
//! store key and the key's length (read from the end; [`key_text`]): the
//! shard's map keeps the same buffer as the record's key ([`ShardKey`]),
//! so a completed record and its key are one allocation. A header name
//! found in [`NAMES`] (the common response headers, as `http` spells
//! them) is packed as its index there, one byte; any other as its length
//! and bytes. Lengths and times
//! are LEB128 varints, and the expiry is written as its distance from the
//! completion (the retention, a few bytes) rather than as a second date.
//!
//! Reading it back ([`Packed::record`]) builds a `CompletedRecord` whose
//! header values and body are slices of the buffer (a reference count, no
//! copy, whatever the body's size): one `Arc`, the `Bytes` owner of the
//! buffer, the header list and each header's name are allocated per read.
//!
//! [`ShardKey`]: super::ShardKey Reads that only compare a
//! fingerprint or a token look at the buffer in place.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::fingerprint::Fingerprint;
use crate::hash::HEX_PAIRS;
use crate::record::{CompletedRecord, StoredResponse, Token};
use crate::store::OperationId;

const FINGERPRINT: Range<usize> = 0..32;
const TOKEN: Range<usize> = 32..48;
const FLAGS: usize = 48;
/// Where the operation id is, when there is one.
const OPERATION: Range<usize> = 49..65;

/// `FLAGS` bits.
const HAS_OPERATION: u8 = 1;
const COMPLETED_BEFORE_EPOCH: u8 = 2;
/// The expiry is before the completion (never written by the engine, but
/// a record is kept as it was given).
const EXPIRES_BEFORE_COMPLETED: u8 = 4;

thread_local! {
    /// The buffer a record is written in before it is copied into its
    /// own: kept between records (no allocation each time) unless it grew
    /// past [`SCRATCH_KEPT`] for a large one.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The most a thread's [`SCRATCH`] keeps between records.
const SCRATCH_KEPT: usize = 64 * 1024;

/// A completed record, the token of the holder that completed it, the id
/// of the operation it finished (if it was one) and its key, in one buffer.
#[derive(Debug, Clone)]
pub(super) struct Packed(Arc<[u8]>);

impl Packed {
    /// Packs `record`, completed by `token`'s holder, kept under `key`
    /// (copying its header values and body once).
    pub(super) fn new(record: &CompletedRecord, token: Token, key: &str) -> Self {
        let response = &record.response;
        // Room enough (each varint takes at most 10 bytes): the buffer is
        // copied into the shared one once written, so it need not be exact.
        let room = OPERATION.start
            + 4 * 10
            + 2
            + 10
            + response
                .headers
                .iter()
                .map(|(n, v)| 10 + n.len() + 10 + v.len())
                .sum::<usize>()
            + response.body.len()
            + key.len()
            + 10;
        SCRATCH.with_borrow_mut(|buf| {
            buf.clear();
            buf.reserve(room);
            Self::write(buf, record, token, key);
            let packed = Self(Arc::from(buf.as_slice()));
            if buf.capacity() > SCRATCH_KEPT {
                *buf = Vec::new();
            }
            packed
        })
    }

    /// What `new` packs, into `buf`.
    fn write(buf: &mut Vec<u8>, record: &CompletedRecord, token: Token, key: &str) {
        let response = &record.response;
        let (completed, completed_before) = since_epoch(record.completed_at);
        let (retention, expires_before) =
            match record.expires_at.duration_since(record.completed_at) {
                Ok(d) => (d, false),
                Err(e) => (e.duration(), true),
            };
        buf.extend_from_slice(&record.fingerprint.0);
        buf.extend_from_slice(&token.as_u128().to_le_bytes());
        let flags = if completed_before {
            COMPLETED_BEFORE_EPOCH
        } else {
            0
        } | if expires_before {
            EXPIRES_BEFORE_COMPLETED
        } else {
            0
        };
        buf.push(flags);
        for d in [completed, retention] {
            put_varint(buf, d.as_secs());
            put_varint(buf, u64::from(d.subsec_nanos()));
        }
        buf.extend_from_slice(&response.status.to_le_bytes());
        put_len(buf, response.headers.len());
        for (name, value) in &response.headers {
            put_name(buf, name);
            put_len(buf, value.len());
            buf.extend_from_slice(value);
        }
        buf.extend_from_slice(&response.body);
        put_key(buf, key.as_bytes());
    }

    /// The same record, as the one that finished operation `id`.
    pub(super) fn with_operation(self, id: OperationId) -> Self {
        let flags = self.flags();
        let rest = if flags & HAS_OPERATION != 0 {
            OPERATION.end
        } else {
            OPERATION.start
        };
        let rest = self.0.get(rest..).unwrap_or_default();
        let mut buf = Vec::with_capacity(OPERATION.end + rest.len());
        buf.extend_from_slice(self.0.get(..FLAGS).unwrap_or_default());
        buf.push(flags | HAS_OPERATION);
        buf.extend_from_slice(&id.as_u128().to_le_bytes());
        buf.extend_from_slice(rest);
        Self(buf.into())
    }

    /// Bytes the record takes in the buffer, without its key nor the
    /// operation id: the same before and after
    /// [`with_operation`](Self::with_operation).
    pub(super) fn record_len(&self) -> usize {
        let len = self.record_end();
        if self.flags() & HAS_OPERATION != 0 {
            len.saturating_sub(OPERATION.len())
        } else {
            len
        }
    }

    /// Where the record ends and its key begins.
    fn record_end(&self) -> usize {
        self.0.len().saturating_sub(key_section_len(&self.0))
    }

    /// The buffer, which also holds the record's key ([`key_text`]).
    pub(super) fn buffer(&self) -> &Arc<[u8]> {
        &self.0
    }

    /// The fingerprint of the request that produced the record.
    pub(super) fn fingerprint(&self) -> Fingerprint {
        let mut fp = [0; 32];
        if let Some(b) = self.0.get(FINGERPRINT) {
            fp.copy_from_slice(b);
        }
        Fingerprint(fp)
    }

    /// The token of the holder that completed it.
    pub(super) fn token(&self) -> Token {
        Token::from_u128(u128_at(&self.0, TOKEN))
    }

    /// The operation it finished, if it was one.
    pub(super) fn operation(&self) -> Option<OperationId> {
        (self.flags() & HAS_OPERATION != 0)
            .then(|| OperationId::from_u128(u128_at(&self.0, OPERATION)))
    }

    fn flags(&self) -> u8 {
        self.0.get(FLAGS).copied().unwrap_or(0)
    }

    /// The record, rebuilt: header values and body share the buffer.
    pub(super) fn record(&self) -> Arc<CompletedRecord> {
        let flags = self.flags();
        let buf = Bytes::from_owner(Arc::clone(&self.0));
        let mut r = Reader {
            buf: self.0.get(..self.record_end()).unwrap_or_default(),
            pos: if flags & HAS_OPERATION != 0 {
                OPERATION.end
            } else {
                OPERATION.start
            },
        };
        let completed_at = shift(
            UNIX_EPOCH,
            r.duration(),
            flags & COMPLETED_BEFORE_EPOCH != 0,
        );
        let expires_at = shift(
            completed_at,
            r.duration(),
            flags & EXPIRES_BEFORE_COMPLETED != 0,
        );
        let status = u16::from_le_bytes(r.array());
        let count = r.len();
        // Each header takes at least 2 bytes: a corrupt count (never
        // written) cannot make this reserve much.
        let mut headers = Vec::with_capacity(count.min(r.rest() / 2));
        for _ in 0..count {
            let name = r.name();
            let v = r.len();
            let value = r.take(v);
            headers.push((name, buf.slice(value)));
        }
        let body = buf.slice(r.pos.min(r.buf.len())..r.buf.len());
        Arc::new(CompletedRecord {
            fingerprint: self.fingerprint(),
            response: StoredResponse {
                status,
                headers,
                body,
            },
            completed_at,
            expires_at,
        })
    }
}

/// `t` as a distance from the epoch, and whether it is before it.
fn since_epoch(t: SystemTime) -> (Duration, bool) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d, false),
        Err(e) => (e.duration(), true),
    }
}

/// `t` moved by `d`, back if `before`; the epoch if out of range (never
/// for a time that was packed).
fn shift(t: SystemTime, d: Duration, before: bool) -> SystemTime {
    let t = if before {
        t.checked_sub(d)
    } else {
        t.checked_add(d)
    };
    t.unwrap_or(UNIX_EPOCH)
}

/// A number as LEB128: seven bits a byte, low bits first, the high bit
/// set on every byte but the last (one byte below 128).
fn put_varint(buf: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        // Truncation to the low seven bits is the encoding.
        buf.push((n & 0x7f) as u8 | 0x80);
        n >>= 7;
    }
    buf.push(n as u8);
}

/// Bytes `put_varint` writes for `n`.
#[cfg(test)]
fn varint_size(mut n: u64) -> usize {
    let mut size = 1;
    while n >= 0x80 {
        n >>= 7;
        size += 1;
    }
    size
}

/// Response header names packed as their index here (protocol-agnostic:
/// only a shorter spelling; any name not here, in any other case, is
/// packed as it is). Lowercase, as `http` gives them. At most 64 entries:
/// an index then packs in one byte.
const NAMES: [&str; 32] = [
    "content-type",
    "content-length",
    "content-encoding",
    "content-language",
    "content-location",
    "content-disposition",
    "content-range",
    "content-security-policy",
    "location",
    "cache-control",
    "etag",
    "last-modified",
    "expires",
    "date",
    "vary",
    "set-cookie",
    "link",
    "retry-after",
    "x-request-id",
    "x-correlation-id",
    "request-id",
    "traceparent",
    "server",
    "age",
    "allow",
    "accept-ranges",
    "www-authenticate",
    "access-control-allow-origin",
    "access-control-expose-headers",
    "strict-transport-security",
    "x-content-type-options",
    "x-frame-options",
];

/// The index of `name` in [`NAMES`] (a `match`: by length, then bytes).
fn name_index(name: &str) -> Option<usize> {
    Some(match name {
        "content-type" => 0,
        "content-length" => 1,
        "content-encoding" => 2,
        "content-language" => 3,
        "content-location" => 4,
        "content-disposition" => 5,
        "content-range" => 6,
        "content-security-policy" => 7,
        "location" => 8,
        "cache-control" => 9,
        "etag" => 10,
        "last-modified" => 11,
        "expires" => 12,
        "date" => 13,
        "vary" => 14,
        "set-cookie" => 15,
        "link" => 16,
        "retry-after" => 17,
        "x-request-id" => 18,
        "x-correlation-id" => 19,
        "request-id" => 20,
        "traceparent" => 21,
        "server" => 22,
        "age" => 23,
        "allow" => 24,
        "accept-ranges" => 25,
        "www-authenticate" => 26,
        "access-control-allow-origin" => 27,
        "access-control-expose-headers" => 28,
        "strict-transport-security" => 29,
        "x-content-type-options" => 30,
        "x-frame-options" => 31,
        _ => return None,
    })
}

/// A header name: `2 × index + 1` for a name in [`NAMES`], else
/// `2 × length` and its bytes.
fn put_name(buf: &mut Vec<u8>, name: &str) {
    match name_index(name) {
        Some(i) => put_varint(buf, 2 * i as u64 + 1),
        None => {
            put_varint(buf, 2 * name.len() as u64);
            buf.extend_from_slice(name.as_bytes());
        }
    }
}

/// Bytes `put_name` writes for `name`.
#[cfg(test)]
fn name_size(name: &str) -> usize {
    match name_index(name) {
        Some(i) => varint_size(2 * i as u64 + 1),
        None => varint_size(2 * name.len() as u64) + name.len(),
    }
}

/// Hex digits of a store key's scope, before its `:`.
const SCOPE_HEX: usize = 32;
/// Bytes of a scope.
const SCOPE: usize = SCOPE_HEX / 2;

/// A store key's text, packed: every store key is `hex(scope) ":" key`,
/// kept as the scope's 16 bytes then the key (17 bytes fewer); any other
/// text (never made) as it is. Then a varint, written backwards so that it
/// reads from the end of the buffer: twice the bytes before it, plus one
/// if the scope was packed. The key section of a packed record, and the
/// whole of a [`ShardKey`](super::ShardKey) of a record not completed.
pub(super) fn put_key(buf: &mut Vec<u8>, text: &[u8]) {
    let (scope, rest, tag) = pack_key(text);
    if let Some(scope) = scope {
        buf.extend_from_slice(&scope);
    }
    buf.extend_from_slice(rest);
    let (tag, n) = backwards(tag);
    buf.extend_from_slice(&tag[..n]);
}

/// How `put_key` packs `text`: the scope's bytes (if the text has the
/// shape of a store key), the rest of the text, and the tag after them.
fn pack_key(text: &[u8]) -> (Option<[u8; SCOPE]>, &[u8], u64) {
    match scope_of(text) {
        Some(scope) => {
            let rest = text.get(SCOPE_HEX + 1..).unwrap_or_default();
            (Some(scope), rest, 2 * (SCOPE + rest.len()) as u64 + 1)
        }
        None => (None, text, 2 * text.len() as u64),
    }
}

/// A buffer of `put_key`'s bytes for `text` alone, allocated once.
pub(super) fn key_buffer(text: &[u8]) -> Arc<[u8]> {
    let (scope, rest, tag) = pack_key(text);
    let (tag, n) = backwards(tag);
    let parts: [&[u8]; 3] = [scope.as_ref().map_or(&[], |s| &s[..]), rest, &tag[..n]];
    let total: usize = parts.iter().map(|p| p.len()).sum();
    // Written on the stack and copied once into the shared buffer (any
    // valid key fits), else gathered in a vector first.
    let mut small = [0; 320];
    match small.get_mut(..total) {
        Some(buf) => {
            let mut at = 0;
            for p in parts {
                buf[at..at + p.len()].copy_from_slice(p);
                at += p.len();
            }
            Arc::from(&*buf)
        }
        None => Arc::from(parts.concat()),
    }
}

/// `n` as a varint written backwards, in the first bytes of the array.
fn backwards(n: u64) -> ([u8; 10], usize) {
    let mut out = [0; 10];
    let mut n = n;
    let mut size = 0;
    while n >= 0x80 {
        // Truncation to the low seven bits is the encoding.
        out[size] = (n & 0x7f) as u8 | 0x80;
        n >>= 7;
        size += 1;
    }
    out[size] = n as u8;
    size += 1;
    out[..size].reverse();
    (out, size)
}

/// Bytes `put_key` writes for `text`.
#[cfg(test)]
pub(super) fn key_size(text: &[u8]) -> usize {
    let (scope, rest, tag) = pack_key(text);
    scope.map_or(0, |s| s.len()) + rest.len() + varint_size(tag)
}

/// The scope of a store key's text, if it has the shape of one.
fn scope_of(text: &[u8]) -> Option<[u8; SCOPE]> {
    if text.len() <= SCOPE_HEX || text[SCOPE_HEX] != b':' {
        return None;
    }
    let mut scope = [0; SCOPE];
    // Table lookups, and one test for a bad digit at the end.
    let mut bad = 0;
    for (b, pair) in scope.iter_mut().zip(text[..SCOPE_HEX].chunks_exact(2)) {
        let (hi, lo) = (
            HEX_VALUES[usize::from(pair[0])],
            HEX_VALUES[usize::from(pair[1])],
        );
        bad |= hi | lo;
        *b = (hi << 4) | (lo & 0x0f);
    }
    (bad & 0x10 == 0).then_some(scope)
}

/// Each byte's value as a lowercase hex digit, or 0x10 if it is not one
/// (an uppercase digit would not come back the same, so a text with one
/// is kept as it is).
const HEX_VALUES: [u8; 256] = {
    let mut t = [0x10; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// The key `put_key` wrote at the end of `buf`.
pub(super) fn key_text(buf: &[u8]) -> KeyText<'_> {
    let (tag, size) = key_tag(buf);
    let end = buf.len().saturating_sub(size);
    let bytes = usize::try_from(tag / 2).unwrap_or(usize::MAX);
    let key = buf.get(end.saturating_sub(bytes)..end).unwrap_or_default();
    match key.split_at_checked(SCOPE) {
        Some((scope, rest)) if tag % 2 == 1 => KeyText {
            scope: Some(scope),
            rest,
        },
        _ => KeyText {
            scope: None,
            rest: key,
        },
    }
}

/// A store key's text as `put_key` packed it.
#[derive(Debug, Clone, Copy)]
pub(super) struct KeyText<'a> {
    /// The scope's bytes, if packed.
    scope: Option<&'a [u8]>,
    /// The rest: the key after the `:`, or the whole text.
    rest: &'a [u8],
}

impl KeyText<'_> {
    /// The text's length.
    pub(super) fn len(self) -> usize {
        match self.scope {
            Some(_) => SCOPE_HEX + 1 + self.rest.len(),
            None => self.rest.len(),
        }
    }

    /// Whether this is `text`.
    pub(super) fn is(self, text: &[u8]) -> bool {
        let Some(scope) = self.scope else {
            return self.rest == text;
        };
        let Some((head, rest)) = text.split_at_checked(SCOPE_HEX + 1) else {
            return false;
        };
        if rest != self.rest || head[SCOPE_HEX] != b':' {
            return false;
        }
        head[..SCOPE_HEX]
            .chunks_exact(2)
            .zip(scope)
            .all(|(pair, &b)| *pair == HEX_PAIRS[usize::from(b)])
    }

    /// Whether `self` and `other` are the same text (each text packs one
    /// way only).
    pub(super) fn same(self, other: KeyText<'_>) -> bool {
        self.scope == other.scope && self.rest == other.rest
    }

    /// The order of the texts: scopes packed compare as their hex digits
    /// do (fixed width, digits in the order of their values).
    pub(super) fn order(self, other: KeyText<'_>) -> std::cmp::Ordering {
        match (self.scope, other.scope) {
            (Some(a), Some(b)) => a.cmp(b).then_with(|| self.rest.cmp(other.rest)),
            _ => self.text().cmp(&other.text()),
        }
    }

    /// The text, as it was given to `put_key`.
    pub(super) fn text(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        if let Some(scope) = self.scope {
            for &b in scope {
                out.extend_from_slice(&HEX_PAIRS[usize::from(b)]);
            }
            out.push(b':');
        }
        out.extend_from_slice(self.rest);
        out
    }
}

/// Bytes the key section at the end of `buf` takes, its tag included.
fn key_section_len(buf: &[u8]) -> usize {
    let (tag, size) = key_tag(buf);
    usize::try_from(tag / 2)
        .unwrap_or(usize::MAX)
        .saturating_add(size)
}

/// The tag at the end of `buf` (`put_key`), and the bytes it takes.
fn key_tag(buf: &[u8]) -> (u64, usize) {
    let mut n = 0u64;
    let mut size = 0;
    for &b in buf.iter().rev() {
        n |= u64::from(b & 0x7f)
            .checked_shl(7 * size as u32)
            .unwrap_or(0);
        size += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    (n, size)
}

/// A length, as `put_varint` writes it.
fn put_len(buf: &mut Vec<u8>, n: usize) {
    put_varint(buf, n as u64);
}

/// Bytes `put_len` writes for `n`.
#[cfg(test)]
fn len_size(n: usize) -> usize {
    varint_size(n as u64)
}

fn u128_at(buf: &[u8], at: Range<usize>) -> u128 {
    let mut b = [0; 16];
    if let Some(s) = buf.get(at) {
        b.copy_from_slice(s);
    }
    u128::from_le_bytes(b)
}

/// Reads what [`Packed::new`] wrote, in order. Past the end it reads
/// zeros and empty ranges rather than failing: the buffer is the store's
/// own and always whole.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn rest(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// The next `n` bytes' range (shorter at the end of the buffer).
    fn take(&mut self, n: usize) -> Range<usize> {
        let start = self.pos.min(self.buf.len());
        let end = start.saturating_add(n).min(self.buf.len());
        self.pos = end;
        start..end
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let range = self.take(N);
        out[..range.len()].copy_from_slice(&self.buf[range]);
        out
    }

    /// A number `put_varint` wrote.
    fn varint(&mut self) -> u64 {
        let mut n = 0u64;
        let mut shift = 0;
        while let Some(&b) = self.buf.get(self.pos) {
            self.pos += 1;
            n |= u64::from(b & 0x7f).checked_shl(shift).unwrap_or(0);
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        n
    }

    /// A header name `put_name` wrote.
    fn name(&mut self) -> String {
        let code = self.varint();
        if code % 2 == 1 {
            let i = usize::try_from(code / 2).unwrap_or(usize::MAX);
            return NAMES.get(i).copied().unwrap_or_default().to_owned();
        }
        let n = usize::try_from(code / 2).unwrap_or(usize::MAX);
        let range = self.take(n);
        String::from_utf8_lossy(&self.buf[range]).into_owned()
    }

    /// A length `put_len` wrote.
    fn len(&mut self) -> usize {
        usize::try_from(self.varint()).unwrap_or(usize::MAX)
    }

    /// A duration `Packed::new` wrote: seconds, then nanoseconds.
    fn duration(&mut self) -> Duration {
        let secs = self.varint();
        let nanos = u32::try_from(self.varint()).unwrap_or(0);
        Duration::new(secs, nanos.min(999_999_999))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(headers: Vec<(String, Bytes)>, body: &'static [u8]) -> CompletedRecord {
        let now = SystemTime::now();
        CompletedRecord {
            fingerprint: Fingerprint([7; 32]),
            response: StoredResponse {
                status: 201,
                headers,
                body: Bytes::from_static(body),
            },
            completed_at: now,
            expires_at: now + Duration::from_secs(600),
        }
    }

    #[test]
    fn a_record_reads_back_as_it_was() {
        let r = record(
            vec![
                (
                    "content-type".into(),
                    Bytes::from_static(b"application/json"),
                ),
                ("x-empty".into(), Bytes::new()),
                ("set-cookie".into(), Bytes::from_static(b"a=1")),
                ("set-cookie".into(), Bytes::from_static(b"b=\xff")),
                ("Content-Type".into(), Bytes::from_static(b"another case")),
                (String::new(), Bytes::from_static(b"no name")),
                ("x-frame-options".into(), Bytes::from_static(b"DENY")),
            ],
            b"{\"id\":1}",
        );
        let token = Token::generate();
        let p = Packed::new(&r, token, "k");
        assert_eq!(*p.record(), r);
        assert_eq!(p.fingerprint(), r.fingerprint);
        assert_eq!(p.token(), token);
        assert_eq!(p.operation(), None);
        assert_eq!(key_text(&p.0).text(), b"k");
        assert_eq!(p.record_len() + 2, p.0.len());
    }

    #[test]
    fn the_key_reads_back_from_the_end() {
        let r = record(vec![], b"the body");
        let scope = "0123456789abcdef00ff7f80a5c3e1d2";
        let mut keys = vec![
            String::new(),
            format!("{scope}:"),
            scope.to_owned(),
            format!("{scope};k"),
            format!("{}:k", scope.to_uppercase()),
            format!("{}:k", &scope[1..]),
            format!("g{}:k", &scope[1..]),
        ];
        for n in [0, 1, 36, 69, 127, 128, 300, 16_383, 16_384, 70_000] {
            keys.push("k".repeat(n));
            keys.push(format!("{scope}:{}", "k".repeat(n)));
        }
        for key in &keys {
            let p = Packed::new(&r, Token::generate(), key);
            let text = key_text(&p.0);
            assert_eq!(text.text(), key.as_bytes(), "{key}");
            assert_eq!(text.len(), key.len(), "{key}");
            assert!(text.is(key.as_bytes()), "{key}");
            assert!(!text.is(format!("{key}x").as_bytes()), "{key}");
            assert_eq!(*p.record(), r, "{key}");
            assert_eq!(p.record_len() + key_section_len(&p.0), p.0.len());
            assert_eq!(key_section_len(&p.0), key_size(key.as_bytes()));
            let mut alone = Vec::new();
            put_key(&mut alone, key.as_bytes());
            assert_eq!(key_text(&alone).text(), key.as_bytes(), "{key}");
            assert_eq!(key_section_len(&alone), alone.len(), "{key}");
            assert_eq!(*key_buffer(key.as_bytes()), *alone, "{key}");
            for other in &keys {
                let theirs = key_buffer(other.as_bytes());
                let theirs = key_text(&theirs);
                assert_eq!(text.same(theirs), key == other, "{key} {other}");
                assert_eq!(text.order(theirs), key.cmp(other), "{key} {other}");
            }
        }
        let store_key = format!("{scope}:{}", "k".repeat(36));
        assert_eq!(key_size(store_key.as_bytes()), 53, "the scope in 16 bytes");
        let other = format!("{}:{}", scope.replace('a', "b"), "k".repeat(36));
        let mut alone = Vec::new();
        put_key(&mut alone, store_key.as_bytes());
        assert!(!key_text(&alone).is(other.as_bytes()));
        assert_eq!(key_text(&[]).text(), b"");
    }

    #[test]
    fn common_names_pack_as_one_byte() {
        assert!(NAMES.len() <= 64, "an index packs in one byte");
        for (i, name) in NAMES.iter().enumerate() {
            assert_eq!(name_index(name), Some(i), "{name}");
            assert_eq!(name_size(name), 1, "{name}");
            assert!(!NAMES[..i].contains(name), "{name} twice");
            assert_eq!(name.to_ascii_lowercase(), *name);
        }
        let with = |name: &str| {
            let r = record(vec![(name.into(), Bytes::from_static(b"v"))], b"");
            Packed::new(&r, Token::generate(), "k")
        };
        assert_eq!(with("location").0.len() + 10, with("x-location").0.len());
    }

    #[test]
    fn long_names_and_values_read_back() {
        let long = Bytes::from(vec![b'v'; 70_000]);
        let r = record(
            vec![
                ("x-".repeat(100), long.clone()),
                ("a".into(), Bytes::from_static(b"b")),
            ],
            b"",
        );
        let p = Packed::new(&r, Token::generate(), "k");
        assert_eq!(*p.record(), r);
        for n in [0, 1, 127, 128, 16_383, 16_384, 70_000, usize::MAX] {
            let mut buf = Vec::new();
            put_len(&mut buf, n);
            assert_eq!(buf.len(), len_size(n), "{n}");
            assert_eq!(Reader { buf: &buf, pos: 0 }.len(), n, "{n}");
        }
    }

    #[test]
    fn an_operation_id_an_empty_response_and_old_times_read_back() {
        let mut r = record(vec![], b"");
        r.completed_at = UNIX_EPOCH - Duration::new(5, 7);
        r.expires_at = UNIX_EPOCH + Duration::new(0, 1);
        let p = Packed::new(&r, Token::generate(), "k");
        assert_eq!(*p.record(), r);
        // An expiry before the completion, and times far from the epoch.
        r.completed_at = UNIX_EPOCH + Duration::new(u64::from(u32::MAX) * 4, 999_999_999);
        r.expires_at = r.completed_at - Duration::new(3, 999_999_999);
        let p = Packed::new(&r, Token::generate(), "k");
        assert_eq!(*p.record(), r);
        r.expires_at = r.completed_at + Duration::new(1 << 40, 1);
        let p = Packed::new(&r, Token::generate(), "k");
        assert_eq!(*p.record(), r);
        r.completed_at = UNIX_EPOCH - Duration::new(5, 7);
        r.expires_at = UNIX_EPOCH + Duration::new(0, 1);
        let id = OperationId::generate();
        let token = Token::generate();
        let p = Packed::new(&r, token, "k").with_operation(id);
        assert_eq!(*p.record(), r);
        assert_eq!(p.operation(), Some(id));
        assert_eq!(p.token(), token);
        assert_eq!(
            p.record_len(),
            Packed::new(&r, token, "k").record_len(),
            "the id is not counted"
        );
        assert_eq!(key_text(&p.0).text(), b"k");
        let other = OperationId::generate();
        let p = p.with_operation(other);
        assert_eq!(*p.record(), r);
        assert_eq!(p.operation(), Some(other));
        assert_eq!(p.token(), token);
    }
}
