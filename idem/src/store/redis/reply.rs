//! Encoding of script arguments and decoding of script replies: the
//! record's fields as the Lua scripts read and write them (see the table in
//! the [module docs](super)).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::Value;
use bytes::Bytes;

use crate::fingerprint::Fingerprint;
use crate::record::{CompletedRecord, StoredResponse};
use crate::store::{OperationId, StoreError};

/// The longest TTL sent to Redis (about 2 000 years): longer ones would
/// overflow Redis's expiry arithmetic.
const MAX_TTL: Duration = Duration::from_millis(1 << 46);
/// Format version of the `headers` field.
pub(super) const HEADERS_V1: u8 = 1;

/// A TTL in whole milliseconds, at least 1 (Redis deletes a key given 0).
pub(super) fn ttl_ms(d: Duration) -> u64 {
    u64::try_from(d.min(MAX_TTL).as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// A delay in whole milliseconds, zero included (a due time, not a TTL).
pub(super) fn delay_ms(d: Duration) -> u64 {
    u64::try_from(d.min(MAX_TTL).as_millis()).unwrap_or(u64::MAX)
}

pub(super) fn epoch_ms(t: SystemTime) -> u64 {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// Encodes headers as version byte, then per header `u32` length + name,
/// `u32` length + value (big endian): the reference for the stored layout.
/// Calls write it straight into the command with
/// [`Headers`](super::invoke::Headers), which the tests hold to this.
#[cfg(test)]
pub(super) fn encode_headers(headers: &[(String, Bytes)]) -> Vec<u8> {
    let size = headers
        .iter()
        .map(|(n, v)| 8 + n.len() + v.len())
        .sum::<usize>();
    let mut out = Vec::with_capacity(1 + size);
    out.push(HEADERS_V1);
    for (name, value) in headers {
        for part in [name.as_bytes(), value.as_ref()] {
            // Header names and values are far below 4 GiB (HTTP limits them
            // to kilobytes); saturating keeps the encoder total anyway.
            let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(part);
        }
    }
    out
}

pub(super) fn decode_headers(bytes: &[u8]) -> Result<Vec<(String, Bytes)>, StoreError> {
    let corrupt = |why: &str| StoreError::Corrupt(format!("stored headers: {why}").into());
    let Some((&version, mut rest)) = bytes.split_first() else {
        return Err(corrupt("empty"));
    };
    if version != HEADERS_V1 {
        return Err(corrupt("unknown format version"));
    }
    let take = |rest: &mut &[u8]| -> Result<Vec<u8>, StoreError> {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| corrupt("truncated length"))?;
        let len = usize::try_from(u32::from_be_bytes(*len)).map_err(|_| corrupt("length"))?;
        if tail.len() < len {
            return Err(corrupt("truncated field"));
        }
        let (field, tail) = tail.split_at(len);
        *rest = tail;
        Ok(field.to_vec())
    };
    let mut headers = Vec::new();
    while !rest.is_empty() {
        let name = String::from_utf8(take(&mut rest)?).map_err(|_| corrupt("name not UTF-8"))?;
        let value = Bytes::from(take(&mut rest)?);
        headers.push((name, value));
    }
    Ok(headers)
}

/// A script's array reply, read field by field.
pub(super) struct Reply(std::vec::IntoIter<Value>);

impl Reply {
    pub(super) fn new(v: Value) -> Result<Self, StoreError> {
        match v {
            Value::Array(items) => Ok(Self(items.into_iter())),
            other => Err(StoreError::Corrupt(
                format!("expected an array from a script, got {other:?}").into(),
            )),
        }
    }

    /// The fields of an array reply already taken apart.
    pub(super) fn from_items(items: Vec<Value>) -> Self {
        Self(items.into_iter())
    }

    /// An operation id, 32 lower-case hex digits.
    pub(super) fn operation_id(&mut self) -> Result<OperationId, StoreError> {
        self.text("operation id")?
            .parse()
            .map_err(|_| StoreError::Corrupt("operation id: not 32 hex digits".into()))
    }

    pub(super) fn bytes(&mut self, what: &str) -> Result<Vec<u8>, StoreError> {
        match self.0.next() {
            Some(Value::BulkString(b)) => Ok(b),
            Some(Value::SimpleString(s)) => Ok(s.into_bytes()),
            other => Err(StoreError::Corrupt(
                format!("{what}: expected a string, got {other:?}").into(),
            )),
        }
    }

    pub(super) fn text(&mut self, what: &str) -> Result<String, StoreError> {
        String::from_utf8(self.bytes(what)?)
            .map_err(|_| StoreError::Corrupt(format!("{what}: not UTF-8").into()))
    }

    /// A string that may be absent (a Lua `false`, or the end of the
    /// reply).
    pub(super) fn optional_text(&mut self, what: &str) -> Result<Option<String>, StoreError> {
        match self.0.next() {
            None | Some(Value::Nil) => Ok(None),
            Some(Value::BulkString(b)) => String::from_utf8(b)
                .map(Some)
                .map_err(|_| StoreError::Corrupt(format!("{what}: not UTF-8").into())),
            Some(Value::SimpleString(s)) => Ok(Some(s)),
            other => Err(StoreError::Corrupt(
                format!("{what}: expected a string, got {other:?}").into(),
            )),
        }
    }

    pub(super) fn tag(&mut self) -> Result<String, StoreError> {
        self.text("reply tag")
    }

    pub(super) fn number<T: std::str::FromStr>(&mut self, what: &str) -> Result<T, StoreError> {
        self.text(what)?
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("{what}: not a number").into()))
    }

    /// A whole number, as a Lua number (an integer reply) or as text.
    pub(super) fn int(&mut self, what: &str) -> Result<i64, StoreError> {
        match self.0.next() {
            Some(Value::Int(n)) => Ok(n),
            Some(Value::BulkString(b)) => std::str::from_utf8(&b)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| StoreError::Corrupt(format!("{what}: not a number").into())),
            other => Err(StoreError::Corrupt(
                format!("{what}: expected a number, got {other:?}").into(),
            )),
        }
    }

    /// A count or a time in milliseconds: a whole number, at least 0.
    pub(super) fn ms(&mut self, what: &str) -> Result<u64, StoreError> {
        u64::try_from(self.int(what)?)
            .map_err(|_| StoreError::Corrupt(format!("{what}: negative").into()))
    }

    /// Whether every field was read.
    pub(super) fn is_empty(&self) -> bool {
        self.0.len() == 0
    }

    pub(super) fn time(&mut self, what: &str) -> Result<SystemTime, StoreError> {
        Ok(UNIX_EPOCH + Duration::from_millis(self.number(what)?))
    }

    pub(super) fn fingerprint(&mut self) -> Result<Fingerprint, StoreError> {
        Fingerprint::from_hex(&self.text("fingerprint")?)
            .ok_or_else(|| StoreError::Corrupt("fingerprint: not 64 hex digits".into()))
    }

    /// A lease's remaining time from `PTTL`; a record without TTL would hold
    /// its key forever, so it is corrupt.
    pub(super) fn pttl(&mut self) -> Result<Duration, StoreError> {
        match self.0.next() {
            Some(Value::Int(ms)) if ms >= 0 => Ok(Duration::from_millis(ms.unsigned_abs())),
            // -2: expired between the read and PTTL (cannot happen inside one
            // script, but zero is the truthful answer).
            Some(Value::Int(-2)) => Ok(Duration::ZERO),
            other => Err(StoreError::Corrupt(
                format!("in-flight record without a lease (PTTL {other:?})").into(),
            )),
        }
    }

    /// `fp, status, headers, body, completed_at, expires_at`.
    pub(super) fn completed(&mut self) -> Result<CompletedRecord, StoreError> {
        let fingerprint = self.fingerprint()?;
        let status = self.number("status")?;
        let headers = decode_headers(&self.bytes("headers")?)?;
        let body = Bytes::from(self.bytes("body")?);
        Ok(CompletedRecord {
            fingerprint,
            response: StoredResponse {
                status,
                headers,
                body,
            },
            completed_at: self.time("completed_at")?,
            expires_at: self.time("expires_at")?,
        })
    }

    /// An unknown tag, or the script's own `corrupt` answer.
    pub(super) fn unexpected(&mut self, tag: &str) -> StoreError {
        if tag == "corrupt" {
            let why = self.text("reason").unwrap_or_default();
            StoreError::Corrupt(why.into())
        } else {
            StoreError::Corrupt(format!("unexpected reply tag {tag:?}").into())
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let headers = vec![
            ("content-type".to_owned(), Bytes::from_static(b"text/plain")),
            ("set-cookie".to_owned(), Bytes::from_static(b"a=1")),
            ("set-cookie".to_owned(), Bytes::from_static(b"")),
            ("x-bin".to_owned(), Bytes::from_static(b"\x00\xff\r\n")),
        ];
        assert_eq!(decode_headers(&encode_headers(&headers)).unwrap(), headers);
        assert_eq!(decode_headers(&encode_headers(&[])).unwrap(), vec![]);
    }

    #[test]
    fn bad_headers_are_corrupt() {
        let good = encode_headers(&[("a".to_owned(), Bytes::from_static(b"b"))]);
        for bad in [
            &[][..],
            &[2][..],
            &good[..good.len() - 1],
            &good[..3],
            &[1, 0, 0, 0, 1, 0xff, 0, 0, 0, 0][..],
        ] {
            assert!(
                matches!(decode_headers(bad), Err(StoreError::Corrupt(_))),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn ttls_are_whole_positive_milliseconds() {
        assert_eq!(ttl_ms(Duration::ZERO), 1);
        assert_eq!(ttl_ms(Duration::from_micros(1500)), 1);
        assert_eq!(ttl_ms(Duration::from_secs(30)), 30_000);
        assert_eq!(ttl_ms(Duration::MAX), 1 << 46);
    }

    #[test]
    fn script_replies_decode() {
        let fp = Fingerprint::of_bytes(b"x");
        let bulk = |s: &[u8]| Value::BulkString(s.to_vec());
        let mut r = Reply::new(Value::Array(vec![
            bulk(b"completed"),
            bulk(fp.to_hex().as_bytes()),
            bulk(b"201"),
            bulk(&encode_headers(&[])),
            bulk(b"\x00body"),
            bulk(b"1000"),
            bulk(b"2000"),
        ]))
        .unwrap();
        assert_eq!(r.tag().unwrap(), "completed");
        let c = r.completed().unwrap();
        assert_eq!(c.fingerprint, fp);
        assert_eq!(c.response.status, 201);
        assert_eq!(c.response.body, Bytes::from_static(b"\x00body"));
        assert_eq!(c.completed_at, UNIX_EPOCH + Duration::from_secs(1));
        assert_eq!(c.expires_at, UNIX_EPOCH + Duration::from_secs(2));

        let mut r = Reply::new(Value::Array(vec![bulk(b"corrupt"), bulk(b"why")])).unwrap();
        let tag = r.tag().unwrap();
        assert!(
            matches!(r.unexpected(&tag), StoreError::Corrupt(w) if w.to_string().as_str() == "why")
        );
        assert!(Reply::new(Value::Int(1)).is_err());
        let mut r = Reply::new(Value::Array(vec![Value::Int(-1)])).unwrap();
        assert!(r.pttl().is_err());
    }
}
