//! W3C trace context (`traceparent`, `tracestate`), continued to the
//! upstream (protocol §14).
//!
//! Two places touch it, each with one call:
//!
//! - the edge ([`continue_trace`]): a request without a valid
//!   `traceparent` gets one that starts a new trace (and loses any
//!   `tracestate`, which means nothing without its parent); with export on,
//!   the header then names the request's span as parent. Written into the
//!   request itself, so an async-mode operation stored now is dispatched
//!   later in the trace of the request that was accepted;
//! - the proxy ([`upstream_span`]): the header sent upstream names a new
//!   span id under the same trace id (with export on, the `upstream`
//!   span's).
//!
//! Without export this is a parse of one 55-byte header, at most two random
//! numbers and one formatted header: no span is created. The edge hands
//! what it parsed or started to the proxy ([`EdgeTrace`], in the request's
//! extensions), so the header is not parsed twice; a trace the edge started
//! itself goes upstream as the edge wrote it (its parent id names no span
//! anybody has seen, as a new one would not either).

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::exporting;

/// The W3C `traceparent` header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// The W3C `tracestate` header.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// A parsed `traceparent` (version 00 layout; later versions are read by
/// their first four fields, as the W3C text asks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// 16 bytes, never zero.
    pub trace_id: u128,
    /// The caller's span, 8 bytes, never zero.
    pub parent_id: u64,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// Parses one header value; `None` if it is not a valid `traceparent`.
    #[must_use]
    pub fn parse(v: &[u8]) -> Option<Self> {
        if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return None;
        }
        let version = hex(&v[0..2])?;
        // 00 is exactly 55 bytes; a later version may append `-…`.
        if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
            return None;
        }
        let trace_id = hex(&v[3..35])?;
        let parent_id = u64::try_from(hex(&v[36..52])?).ok()?;
        let flags = u8::try_from(hex(&v[53..55])?).ok()?;
        (trace_id != 0 && parent_id != 0).then_some(Self {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The request's `traceparent`: `None` when absent, invalid or sent
    /// more than once.
    #[must_use]
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let mut all = headers.get_all(TRACEPARENT).iter();
        let first = all.next()?;
        if all.next().is_some() {
            return None;
        }
        Self::parse(first.as_bytes())
    }

    /// The header value, version 00.
    #[must_use]
    pub fn to_header(self) -> HeaderValue {
        let mut b = *b"00-00000000000000000000000000000000-0000000000000000-00";
        write_hex(&mut b[3..35], &self.trace_id.to_be_bytes());
        write_hex(&mut b[36..52], &self.parent_id.to_be_bytes());
        write_hex(&mut b[53..55], &[self.flags]);
        // Lower-case hex and dashes: always a valid header value.
        HeaderValue::from_bytes(&b).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// A new trace, with the sampled flag set so that an upstream that
    /// samples by its parent still records it, as it would a root span.
    fn start() -> Self {
        Self {
            trace_id: rand::random::<u128>().max(1),
            parent_id: new_span_id(),
            flags: 1,
        }
    }

    fn of(sc: &SpanContext) -> Option<Self> {
        sc.is_valid().then(|| Self {
            trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
            parent_id: u64::from_be_bytes(sc.span_id().to_bytes()),
            flags: sc.trace_flags().to_u8(),
        })
    }

    fn remote(self, headers: &HeaderMap) -> opentelemetry::Context {
        let state = headers
            .get(TRACESTATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(self.trace_id),
            SpanId::from(self.parent_id),
            TraceFlags::new(self.flags),
            true,
            state,
        ))
    }
}

/// The value of 1 to 32 lower-case hex digits; `None` at any other byte.
fn hex(s: &[u8]) -> Option<u128> {
    s.iter().try_fold(0u128, |acc, &c| {
        let d = HEX_VALUE[usize::from(c)];
        (d < 16).then(|| acc << 4 | u128::from(d))
    })
}

/// Each byte's value as a lower-case hex digit, 16 for any other byte.
const HEX_VALUE: [u8; 256] = {
    let mut table = [16_u8; 256];
    let mut i = 0;
    while i < 16 {
        table[b"0123456789abcdef"[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// Writes `bytes` into `out` as lower-case hex, two digits per byte
/// (`out` holds exactly that many).
pub(crate) fn write_hex(out: &mut [u8], bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
}

fn new_span_id() -> u64 {
    rand::random::<u64>().max(1)
}

/// What the edge found or wrote as a request's `traceparent`, kept in the
/// request's extensions for the proxy (without export only); and whether
/// it left the request's span for the proxy to make, should a warning need
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeTrace {
    /// The header's value, parsed.
    parent: TraceParent,
    /// The edge started this trace: the client sent no valid header.
    started: bool,
    /// The edge did not make the request's span.
    span_deferred: bool,
}

impl EdgeTrace {
    /// The edge did not make the request's span: the proxy makes it for a
    /// warning.
    pub fn defer_span(&mut self) {
        self.span_deferred = true;
    }

    /// Whether the edge left the request's span to the proxy.
    #[must_use]
    pub fn span_deferred(&self) -> bool {
        self.span_deferred
    }
}

/// The edge: makes sure the request carries a valid `traceparent` (see the
/// module docs). With export on, `span` (the request's) becomes the child
/// of the client's span and the header names `span`. Without, returns what
/// the header now holds, for [`upstream_span`].
pub fn continue_trace(span: &Span, headers: &mut HeaderMap) -> Option<EdgeTrace> {
    let incoming = TraceParent::from_headers(headers);
    if exporting() {
        if let Some(tp) = incoming {
            let _ = span.set_parent(tp.remote(headers));
        }
        if let Some(ours) = TraceParent::of(span.context().span().span_context()) {
            if incoming.is_none() {
                headers.remove(TRACESTATE);
            }
            headers.insert(TRACEPARENT, ours.to_header());
            return None;
        }
    }
    Some(match incoming {
        Some(parent) => EdgeTrace {
            parent,
            started: false,
            span_deferred: false,
        },
        None => {
            let parent = TraceParent::start();
            headers.remove(TRACESTATE);
            headers.insert(TRACEPARENT, parent.to_header());
            EdgeTrace {
                parent,
                started: true,
                span_deferred: false,
            }
        }
    })
}

/// The proxy: gives the request going upstream a new parent span id under
/// its trace (starting one if it has none). With export on, that is the id
/// of the returned `upstream` span, the child of the request's; without,
/// the span is [`Span::none`]. `edge` is what [`continue_trace`] returned
/// for this request's headers, if they came through the edge unchanged (an
/// async operation's stored request is read again); without export, a
/// trace the edge started is sent as the edge wrote it.
pub fn upstream_span(headers: &mut HeaderMap, edge: Option<EdgeTrace>) -> Span {
    let exporting = exporting();
    let incoming = match edge {
        Some(edge) if !exporting => {
            if edge.started {
                return Span::none();
            }
            Some(edge.parent)
        }
        _ => TraceParent::from_headers(headers),
    };
    if exporting {
        let span = tracing::info_span!(
            "upstream",
            otel.kind = "client",
            http.response.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        if let Some(tp) = incoming {
            let _ = span.set_parent(tp.remote(headers));
        }
        if let Some(ours) = TraceParent::of(span.context().span().span_context()) {
            headers.insert(TRACEPARENT, ours.to_header());
            return span;
        }
    }
    let next = match incoming {
        Some(tp) => TraceParent {
            parent_id: new_span_id(),
            ..tp
        },
        None => {
            headers.remove(TRACESTATE);
            TraceParent::start()
        }
    };
    headers.insert(TRACEPARENT, next.to_header());
    Span::none()
}

/// Records the answer the `upstream` span ended with (a 5xx, the gateway's
/// own 502/504 included, marks it failed).
pub fn upstream_answered(span: &Span, status: StatusCode) {
    if span.is_none() {
        return;
    }
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_the_w3c_example() {
        let tp = TraceParent::parse(EXAMPLE.as_bytes()).expect("valid");
        assert_eq!(tp.trace_id, 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736);
        assert_eq!(tp.parent_id, 0x00f0_67aa_0ba9_02b7);
        assert_eq!(tp.flags, 1);
        assert_eq!(tp.to_header(), EXAMPLE);
    }

    #[test]
    fn refuses_what_the_w3c_text_refuses() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad.as_bytes()), None, "{bad:?}");
        }
        // A later version may carry more fields.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what";
        assert!(TraceParent::parse(later.as_bytes()).is_some());
    }

    #[test]
    fn without_export_the_upstream_gets_the_trace_with_a_new_parent() {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_static(EXAMPLE));
        headers.insert(TRACESTATE, HeaderValue::from_static("k=v"));
        let edge = continue_trace(&Span::none(), &mut headers);
        assert_eq!(headers[&TRACEPARENT], EXAMPLE, "kept at the edge");
        // Handed over by the edge, or read again (an async operation's
        // stored request): the same outcome.
        for edge in [edge, None] {
            let mut headers = headers.clone();
            let span = upstream_span(&mut headers, edge);
            assert!(span.is_none());
            let sent = TraceParent::from_headers(&headers).expect("valid");
            assert_eq!(sent.trace_id, 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736);
            assert_ne!(sent.parent_id, 0x00f0_67aa_0ba9_02b7);
            assert_eq!(headers[&TRACESTATE], "k=v");
        }
    }

    #[test]
    fn a_trace_the_edge_started_goes_upstream_as_the_edge_wrote_it() {
        let mut headers = HeaderMap::new();
        headers.insert(TRACESTATE, HeaderValue::from_static("k=v"));
        let edge = continue_trace(&Span::none(), &mut headers);
        let started = TraceParent::from_headers(&headers).expect("started at the edge");
        assert!(headers.get(TRACESTATE).is_none());
        assert_eq!(
            edge,
            Some(EdgeTrace {
                parent: started,
                started: true,
                span_deferred: false,
            })
        );
        let mut sent = headers.clone();
        assert!(upstream_span(&mut sent, edge).is_none());
        assert_eq!(sent, headers, "the edge's header, untouched");
        // Read again without the edge's word: a new parent, same trace.
        let mut again = headers.clone();
        upstream_span(&mut again, None);
        let tp = TraceParent::from_headers(&again).expect("valid");
        assert_eq!(tp.trace_id, started.trace_id);
        assert_ne!(tp.parent_id, started.parent_id);
    }

    #[test]
    fn an_invalid_or_repeated_traceparent_starts_a_new_trace() {
        let mut headers = HeaderMap::new();
        headers.append(TRACEPARENT, HeaderValue::from_static(EXAMPLE));
        headers.append(TRACEPARENT, HeaderValue::from_static(EXAMPLE));
        headers.insert(TRACESTATE, HeaderValue::from_static("k=v"));
        continue_trace(&Span::none(), &mut headers);
        assert_eq!(headers.get_all(TRACEPARENT).iter().count(), 1);
        let new = TraceParent::from_headers(&headers).expect("valid");
        assert_ne!(new.trace_id, 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736);
        assert!(headers.get(TRACESTATE).is_none());
    }

    /// What continuing the trace costs a request without export: run with
    /// `cargo test --release -p idem-cli --lib trace_context_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn trace_context_cost() {
        let n = 1_000_000u32;
        let base = {
            let mut h = HeaderMap::new();
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            h.insert("idempotency-key", HeaderValue::from_static("k-123"));
            h
        };
        for (label, incoming) in [("with a traceparent", true), ("without", false)] {
            let started = std::time::Instant::now();
            for _ in 0..n {
                let mut h = base.clone();
                if incoming {
                    h.insert(TRACEPARENT, HeaderValue::from_static(EXAMPLE));
                }
                let edge = continue_trace(&Span::none(), &mut h);
                std::hint::black_box(upstream_span(&mut h, edge));
                std::hint::black_box(h);
            }
            let with = started.elapsed();
            let started = std::time::Instant::now();
            for _ in 0..n {
                let mut h = base.clone();
                if incoming {
                    h.insert(TRACEPARENT, HeaderValue::from_static(EXAMPLE));
                }
                std::hint::black_box(&mut h);
                std::hint::black_box(h);
            }
            let without = started.elapsed();
            println!(
                "{label}: {:.0} ns per request for the edge and the proxy together",
                (with.as_nanos() as f64 - without.as_nanos() as f64) / f64::from(n)
            );
        }
    }
}
