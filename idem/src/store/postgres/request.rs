//! The stored form of an operation's request (the `request` column): a
//! small binary format, so header values and the body stay bytes, byte for
//! byte, at their own size (JSON would write a byte as up to four
//! characters).
//!
//! ```text
//! version   1 byte, 1
//! method    u32 length (big endian), UTF-8
//! uri       u32 length, UTF-8
//! headers   u32 count, then per header: u32 length + name (UTF-8),
//!           u32 length + value (bytes)
//! body      the rest
//! ```
//!
//! Anything else reads as [`StoreError::Corrupt`], naming what is wrong.

use bytes::{Buf, BufMut, Bytes};

use crate::error::{Corruption, StoreError};
use crate::store::OperationRequest;

/// The layout this version writes (and the only one it reads).
const VERSION: u8 = 1;

/// `request` as stored.
///
/// # Errors
///
/// [`StoreError::Capacity`] for a method, URI, header name or value over
/// 4 GiB, or more than 2³² headers (the gateway's limits stop far sooner).
pub(super) fn encode(request: &OperationRequest) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(request.weight());
    out.put_u8(VERSION);
    put(&mut out, request.method.as_bytes())?;
    put(&mut out, request.uri.as_bytes())?;
    out.put_u32(len(request.headers.len())?);
    for (name, value) in &request.headers {
        put(&mut out, name.as_bytes())?;
        put(&mut out, value)?;
    }
    out.extend_from_slice(&request.body);
    Ok(out)
}

/// The request stored as `bytes`. Header values and the body share
/// `bytes`' allocation.
///
/// # Errors
///
/// [`StoreError::Corrupt`] when `bytes` is not what [`encode`] writes.
pub(super) fn decode(bytes: Bytes) -> Result<OperationRequest, StoreError> {
    let mut buf = bytes;
    if buf.try_get_u8().ok() != Some(VERSION) {
        return Err(corrupt("an unknown layout"));
    }
    let method = text(take(&mut buf)?, "method")?;
    let uri = text(take(&mut buf)?, "uri")?;
    let count = buf.try_get_u32().map_err(|_| corrupt("no header count"))?;
    let mut headers = Vec::new();
    for _ in 0..count {
        let name = text(take(&mut buf)?, "a header name")?;
        headers.push((name, take(&mut buf)?));
    }
    Ok(OperationRequest {
        method,
        uri,
        headers,
        body: buf,
    })
}

fn len(n: usize) -> Result<u32, StoreError> {
    u32::try_from(n).map_err(|_| {
        StoreError::Capacity("a part of the request is too large to store (over 4 GiB)")
    })
}

fn put(out: &mut Vec<u8>, part: &[u8]) -> Result<(), StoreError> {
    out.put_u32(len(part.len())?);
    out.extend_from_slice(part);
    Ok(())
}

/// The next length-prefixed part.
fn take(buf: &mut Bytes) -> Result<Bytes, StoreError> {
    let n = buf.try_get_u32().map_err(|_| corrupt("cut short"))?;
    let n = usize::try_from(n).map_err(|_| corrupt("a part too long"))?;
    if buf.len() < n {
        return Err(corrupt("cut short"));
    }
    Ok(buf.split_to(n))
}

fn text(part: Bytes, what: &str) -> Result<String, StoreError> {
    String::from_utf8(part.to_vec()).map_err(|e| {
        Corruption::with_source(format!("column request: {what} is not UTF-8"), e).into()
    })
}

fn corrupt(why: &str) -> StoreError {
    Corruption::new(format!("column request: {why}")).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> OperationRequest {
        OperationRequest {
            method: "POST".into(),
            uri: "/orders?x=1&y=%20".into(),
            headers: vec![
                ("idempotency-key".into(), Bytes::from_static(b"k-1")),
                ("x-bin".into(), Bytes::from_static(b"\x00\xff\r\n")),
                ("x-dup".into(), Bytes::from_static(b"a")),
                ("x-dup".into(), Bytes::from_static(b"")),
            ],
            body: Bytes::from_static(b"\x00{\"amount\":10}\xff"),
        }
    }

    #[test]
    fn requests_come_back_byte_for_byte() -> Result<(), StoreError> {
        for request in [
            sample(),
            OperationRequest {
                method: String::new(),
                uri: String::new(),
                headers: Vec::new(),
                body: Bytes::new(),
            },
        ] {
            let stored = encode(&request)?;
            assert_eq!(decode(Bytes::from(stored))?, request);
        }
        Ok(())
    }

    #[test]
    fn anything_else_is_corrupt() -> Result<(), StoreError> {
        let good = encode(&sample())?;
        let mut other_version = good.clone();
        other_version[0] = 2;
        let mut bad_name = good.clone();
        // The first header name's first byte: after the version, method,
        // uri and header count.
        let at = 1 + 4 + 4 + 4 + "/orders?x=1&y=%20".len() + 4 + 4;
        bad_name[at] = 0xff;
        for bad in [
            Vec::new(),
            other_version,
            good[..3].to_vec(),
            good[..20].to_vec(),
            bad_name,
        ] {
            let e = decode(Bytes::from(bad));
            assert!(matches!(e, Err(StoreError::Corrupt(_))), "{e:?}");
        }
        Ok(())
    }
}
