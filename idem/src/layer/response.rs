//! The responses the layer builds: captured for storage, replayed, its own
//! problems, and the answer for each engine [`Outcome`] (the *respond* phase).

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Response;

use super::{ResponseBody, IDEMPOTENT_REPLAYED};
use crate::engine::Outcome;
use crate::problem::{Problem, ProblemCode};
use crate::record::StoredResponse;

/// `Keep-Alive` (not among `http`'s constants).
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Hop-by-hop headers (RFC 9110 §7.6.1), as names (to remove them without
/// parsing a name per lookup), in the order of [`hop_index`]. A `static`:
/// a `const` array is built and dropped again at every use.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    KEEP_ALIVE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// `name`'s place in [`HOP_BY_HOP`], if it is one: one match on its text
/// (a name's text is lower case), where comparing it with each of the
/// eight names costs a copy of the array per call.
fn hop_index(name: &HeaderName) -> Option<usize> {
    match name.as_str() {
        "connection" => Some(0),
        "keep-alive" => Some(1),
        "proxy-authenticate" => Some(2),
        "proxy-authorization" => Some(3),
        "te" => Some(4),
        "trailer" => Some(5),
        "transfer-encoding" => Some(6),
        "upgrade" => Some(7),
        _ => None,
    }
}

/// Whether `name` is hop-by-hop (RFC 9110 §7.6.1), including any header the
/// `Connection` header lists.
#[must_use]
pub fn is_hop_by_hop(name: &HeaderName, headers: &HeaderMap) -> bool {
    hop_index(name).is_some() || listed_in_connection(name, headers)
}

/// Whether the `Connection` header lists `name`.
fn listed_in_connection(name: &HeaderName, headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(name.as_str()))
}

/// Removes hop-by-hop headers in place. A map with none of them (the usual
/// case once a proxy has stripped them) is only looked through, once; with
/// some, only those present are removed, and a `Connection` token is parsed
/// into a name only when the map holds a header of that name.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = [false; 8];
    for name in headers.keys() {
        if let Some(i) = hop_index(name) {
            present[i] = true;
        }
    }
    if !present.contains(&true) {
        // No `Connection` header either, so nothing it could list.
        return;
    }
    // Index 0 is `Connection`.
    let listed: Vec<HeaderName> = if present[0] {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // Mostly `keep-alive` or `close`, naming no header there.
            .filter(|t| headers.contains_key(*t))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect()
    } else {
        Vec::new()
    };
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
    for name in listed {
        headers.remove(name);
    }
}

/// Captures a response for storage, minus hop-by-hop headers.
#[must_use]
pub fn capture(status: http::StatusCode, headers: &HeaderMap, body: Bytes) -> StoredResponse {
    // Only a `Connection` header can name more hop-by-hop headers.
    let connection = headers.contains_key(header::CONNECTION);
    StoredResponse {
        status: status.as_u16(),
        headers: headers
            .iter()
            .filter(|(n, _)| {
                let listed = connection && listed_in_connection(n, headers);
                !(hop_index(n).is_some() || listed)
            })
            .map(|(n, v)| (n.as_str().to_owned(), Bytes::copy_from_slice(v.as_bytes())))
            .collect(),
        body: owned(body),
    }
}

/// `body` in an allocation of its own, sized to it. A body read in one
/// piece is a view into the HTTP client's read buffer (8 KB and up): kept
/// as it is, every record in the local cache (or a waiter's copy) would
/// keep that whole buffer alive, ~10 KB of memory per 100-byte answer that
/// the cache's byte bound does not see. A body already alone in a buffer
/// of about its size (collected from several pieces) is kept as it is.
/// Async mode keeps a pending operation's request body by it too.
pub(super) fn owned(body: Bytes) -> Bytes {
    match body.try_into_mut() {
        Ok(alone) if alone.capacity() <= alone.len() + alone.len() / 8 + 64 => alone.freeze(),
        Ok(alone) => Bytes::copy_from_slice(&alone),
        Err(shared) => Bytes::copy_from_slice(&shared),
    }
}

/// Rebuilds a stored response for replay, with `Idempotent-Replayed: true`.
#[must_use]
pub fn replay<B: From<Bytes>>(stored: &StoredResponse) -> Response<B> {
    let mut res = Response::new(B::from(stored.body.clone()));
    *res.status_mut() = http::StatusCode::from_u16(stored.status).unwrap_or(http::StatusCode::OK);
    let headers = res.headers_mut();
    for (name, value) in &stored.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_maybe_shared(value.clone()),
        ) {
            headers.append(n, v);
        }
    }
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    res
}

/// One of the layer's own `application/problem+json` answers (protocol §4).
pub(super) fn problem<B: From<Bytes>>(code: ProblemCode, detail: &str) -> Response<B> {
    Problem::new(code, detail).to_response()
}

/// `problem` as a stored answer (the `ambiguous = store` policy).
pub(super) fn stored_problem(problem: &Problem) -> StoredResponse {
    let (parts, body) = problem.to_response::<Bytes>().into_parts();
    capture(parts.status, &parts.headers, body)
}

/// The *respond* phase: what the client gets for each engine outcome.
/// `key_header` is the route's, named in the details.
pub(super) fn respond<B, E>(
    outcome: Outcome<Result<Response<ResponseBody<B>>, E>>,
    key_header: &HeaderName,
) -> Result<Response<ResponseBody<B>>, E> {
    let name = crate::key::header_display_name(key_header);
    match outcome {
        Outcome::Executed(r) | Outcome::Bypassed(r) => r,
        Outcome::Replayed(record) => Ok(replay(&record.response)),
        Outcome::InProgress { retry_after } => Ok(Problem::new(
            ProblemCode::KeyInProgress,
            format!("a request with this {name} is still being processed; retry later"),
        )
        .retry_after(retry_after)
        .to_response()),
        Outcome::Mismatch => Ok(problem(
            ProblemCode::KeyReused,
            &format!(
                "this {name} was already used with a different request \
                 (method, path, selected headers or body differ); use a new key"
            ),
        )),
        Outcome::StoreUnavailable { .. } => Ok(Problem::new(
            ProblemCode::StoreUnavailable,
            "the idempotency store cannot be reached; nothing was executed",
        )
        .retry_after(Duration::from_secs(1))
        .to_response()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| {
                (
                    HeaderName::from_bytes(n.as_bytes()).expect("name"),
                    HeaderValue::from_str(v).expect("value"),
                )
            })
            .collect()
    }

    fn names(headers: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_lists_are_stripped() {
        let mut headers = map(&[
            ("content-type", "application/json"),
            ("connection", "keep-alive, X-Trace-Hop ,close"),
            ("connection", "x-second"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("x-trace-hop", "1"),
            ("x-second", "2"),
            ("close", "a header of that name, listed"),
            ("x-kept", "3"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
        ]);
        strip_hop_by_hop(&mut headers);
        assert_eq!(names(&headers), ["content-type", "x-kept"]);
    }

    #[test]
    fn a_map_without_hop_by_hop_headers_is_left_as_it_is() {
        let mut headers = map(&[("content-type", "text/plain"), ("x-a", "1"), ("x-a", "2")]);
        let before = headers.clone();
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers, before);
    }

    #[test]
    fn connection_tokens_that_are_not_names_or_not_present_change_nothing_else() {
        let mut headers = map(&[
            ("connection", "keep-alive, not a name, x-absent, , @bad"),
            ("x-kept", "1"),
            ("proxy-authorization", "Basic abc"),
        ]);
        strip_hop_by_hop(&mut headers);
        assert_eq!(names(&headers), ["x-kept"]);
    }

    /// A body that is a slice of a larger buffer (as hyper hands out a
    /// body read in one piece) is stored in an allocation of its own, so a
    /// cached record does not keep the whole buffer alive.
    #[test]
    fn a_captured_body_does_not_keep_the_read_buffer_alive() {
        let buffer = Bytes::from(vec![7_u8; 16 * 1024]);
        let body = buffer.slice(100..200);
        let stored = capture(http::StatusCode::CREATED, &HeaderMap::new(), body);
        drop(buffer);
        assert_eq!(stored.body, Bytes::from(vec![7_u8; 100]));
        let alone = stored
            .body
            .try_into_mut()
            .expect("the stored body is the only view of its allocation");
        assert!(alone.capacity() < 1024, "capacity {}", alone.capacity());
    }

    /// A body already alone in a buffer of its size is not copied.
    #[test]
    fn a_body_alone_in_its_buffer_is_kept() {
        let body = Bytes::from(vec![1_u8; 4096]);
        let at = body.as_ptr();
        let stored = capture(http::StatusCode::OK, &HeaderMap::new(), body);
        assert_eq!(stored.body.as_ptr(), at);
        assert_eq!(
            capture(http::StatusCode::OK, &HeaderMap::new(), Bytes::new())
                .body
                .len(),
            0
        );
    }
}
