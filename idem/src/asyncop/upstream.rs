//! What the dispatcher calls: the [`Upstream`], its failures, and the
//! schedule of the next attempt (backoff with jitter, `Retry-After`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::error::BoxError;
use crate::record::StoredResponse;
use crate::store::OperationRequest;

/// Where the dispatcher sends an operation's request: the gateway's proxy,
/// or anything a Rust service plugs in.
///
/// Implemented for every closure `Fn(Arc<OperationRequest>) -> impl
/// Future<Output = Result<StoredResponse, DispatchError>>`. An `Ok`
/// response is an answer (stored if its status is one of the route's
/// `store_statuses`, another attempt otherwise); an `Err` says why there
/// is no answer, and is always another attempt.
///
/// The request carries the accepting request's `idempotency-key` and
/// `x-request-id` headers: forward them, so an upstream that dedupes by key
/// sees an operation once however often it is dispatched (protocol §9.5).
pub trait Upstream: Send + Sync + 'static {
    /// Sends `request` and waits for the answer. Dropping the future
    /// abandons the call (the dispatcher does when its lease is lost or
    /// the route's upstream time-out passes).
    fn call(
        &self,
        request: Arc<OperationRequest>,
    ) -> impl Future<Output = Result<StoredResponse, DispatchError>> + Send;
}

impl<F, Fut> Upstream for F
where
    F: Fn(Arc<OperationRequest>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<StoredResponse, DispatchError>> + Send,
{
    fn call(
        &self,
        request: Arc<OperationRequest>,
    ) -> impl Future<Output = Result<StoredResponse, DispatchError>> + Send {
        self(request)
    }
}

/// Why an upstream call gave no answer (protocol §9.4: refused, reset,
/// time-out). Every one is another attempt.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError {
    /// The connection could not be made (refused, unreachable, DNS): the
    /// upstream never saw the request.
    #[error("the upstream refused the connection: {0}")]
    Refused(#[source] BoxError),
    /// The connection broke after the request was (maybe) sent: the
    /// outcome is unknown.
    #[error("the upstream connection broke: {0}")]
    Reset(#[source] BoxError),
    /// No answer within the time-out: the outcome is unknown.
    #[error("the upstream did not answer within {0:?}")]
    Timeout(Duration),
}

impl DispatchError {
    /// What a client may read about it (in the stored 502's `detail`):
    /// the kind, never the upstream's addresses or error texts.
    pub(super) fn summary(&self) -> String {
        match self {
            Self::Refused(_) => "the connection was refused".to_owned(),
            Self::Reset(_) => "the connection broke".to_owned(),
            Self::Timeout(after) => format!("no answer within {}s", after.as_secs_f64()),
        }
    }
}

/// The longest wait before another attempt, whatever the backoff or the
/// upstream's `Retry-After` says: an operation is never parked for days.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(3600);

/// The wait before attempt `attempt + 1` after attempt `attempt` (1-based)
/// failed: `base · 2^(attempt−1)`, at most [`MAX_RETRY_DELAY`], with
/// "equal jitter" (a uniform pick in its upper half, so dispatchers that
/// failed together spread out, yet none retries much sooner than planned);
/// and never sooner than the upstream's `retry_after`.
#[must_use]
pub fn retry_delay(base: Duration, attempt: u32, retry_after: Option<Duration>) -> Duration {
    let doublings = attempt.saturating_sub(1).min(31);
    let planned = base.saturating_mul(1 << doublings).min(MAX_RETRY_DELAY);
    let half = planned / 2;
    let jittered = half + half.mul_f64(rand::random::<f64>());
    jittered
        .max(retry_after.unwrap_or(Duration::ZERO))
        .min(MAX_RETRY_DELAY)
}

/// The `Retry-After` of an upstream answer, if it is a number of seconds
/// (an HTTP date is ignored: the backoff applies).
#[must_use]
pub fn retry_after(response: &StoredResponse) -> Option<Duration> {
    let (_, value) = response
        .headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("retry-after"))?;
    let text = std::str::from_utf8(value).ok()?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Digits only: a failed parse can only mean overflow, i.e. "very long".
    Some(
        text.parse::<u64>()
            .map_or(MAX_RETRY_DELAY, Duration::from_secs),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn with_header(value: &'static str) -> StoredResponse {
        StoredResponse {
            status: 503,
            headers: vec![("Retry-After".into(), Bytes::from_static(value.as_bytes()))],
            body: Bytes::new(),
        }
    }

    #[test]
    fn retry_after_takes_seconds_only() {
        assert_eq!(retry_after(&with_header("3")), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(&with_header(" 0 ")), Some(Duration::ZERO));
        assert_eq!(
            retry_after(&with_header("99999999999999999999999")),
            Some(MAX_RETRY_DELAY)
        );
        for ignored in ["", "-1", "1.5", "Wed, 21 Oct 2015 07:28:00 GMT"] {
            assert_eq!(retry_after(&with_header(ignored)), None, "{ignored:?}");
        }
        let none = StoredResponse {
            status: 500,
            headers: vec![],
            body: Bytes::new(),
        };
        assert_eq!(retry_after(&none), None);
    }

    #[test]
    fn backoff_doubles_with_jitter_in_its_upper_half() {
        let base = Duration::from_millis(100);
        for (attempt, planned) in [(1, 100), (2, 200), (3, 400), (4, 800)] {
            let planned = Duration::from_millis(planned);
            for _ in 0..100 {
                let d = retry_delay(base, attempt, None);
                assert!(d >= planned / 2 && d <= planned, "attempt {attempt}: {d:?}");
            }
        }
        assert!(retry_delay(base, 60, None) <= MAX_RETRY_DELAY);
        assert!(retry_delay(Duration::MAX, 3, None) <= MAX_RETRY_DELAY);
        // Never sooner than the upstream asks, never later than the cap.
        assert_eq!(
            retry_delay(base, 1, Some(Duration::from_secs(5))),
            Duration::from_secs(5)
        );
        assert_eq!(
            retry_delay(base, 1, Some(Duration::from_secs(86_400))),
            MAX_RETRY_DELAY
        );
    }

    #[test]
    fn the_summary_names_the_kind_only() {
        let e = DispatchError::Refused("connect 10.0.0.7:8080: refused".into());
        assert!(!e.summary().contains("10.0.0.7"));
        assert!(e.to_string().contains("10.0.0.7"), "logs keep the cause");
        assert_eq!(
            DispatchError::Timeout(Duration::from_millis(1500)).summary(),
            "no answer within 1.5s"
        );
    }
}
