//! Folding the samples of a race into a [`Report`], and printing it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

use serde::{Serialize, Serializer};

/// What one request got: the raw material of a [`Report`].
#[derive(Debug, Clone)]
pub(crate) enum Sample {
    /// An answer, read to the end.
    Answered {
        /// Status code.
        status: u16,
        /// From send to the last byte of the body.
        latency: Duration,
        /// A hash of the body (bodies are compared, not kept).
        body: u64,
        /// `Idempotent-Replayed: true` was present.
        replayed: bool,
        /// Which key the request carried (all requests without a key share one).
        key: u64,
    },
    /// No answer: reset, closed, timed out.
    Failed(String),
}

/// What a race found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No duplicate seen, and every request got an answer.
    NoDuplicates,
    /// More executions than keys (count URL), or more than one distinct 2xx
    /// body under one key.
    Duplicates,
    /// No duplicate seen, but some requests got no answer, so the race
    /// cannot vouch for the service.
    Inconclusive,
}

/// Latency percentiles (nearest rank) and maximum, over the requests that
/// got an answer. Zero when none did. In JSON: milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Latency {
    /// Median.
    #[serde(serialize_with = "millis")]
    pub p50: Duration,
    /// 90th percentile.
    #[serde(serialize_with = "millis")]
    pub p90: Duration,
    /// 99th percentile.
    #[serde(serialize_with = "millis")]
    pub p99: Duration,
    /// Slowest.
    #[serde(serialize_with = "millis")]
    pub max: Duration,
}

fn millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    // Microsecond resolution is plenty, and keeps the JSON readable.
    s.serialize_f64((d.as_secs_f64() * 1e6).round() / 1e3)
}

impl Latency {
    /// Nearest-rank percentiles of `samples` (sorted in place).
    #[must_use]
    pub fn of(samples: &mut [Duration]) -> Self {
        samples.sort_unstable();
        Self {
            p50: nearest_rank(samples, 50),
            p90: nearest_rank(samples, 90),
            p99: nearest_rank(samples, 99),
            max: samples.last().copied().unwrap_or_default(),
        }
    }
}

/// The nearest-rank `p`th percentile of sorted samples: the smallest value
/// with at least p % of the samples at or below it.
fn nearest_rank(sorted: &[Duration], p: usize) -> Duration {
    let n = sorted.len();
    if n == 0 {
        return Duration::ZERO;
    }
    let rank = (p * n).div_ceil(100).clamp(1, n);
    sorted[rank - 1]
}

/// The result of a race. Serializes (`--json`) with stable field names.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Requests sent (answered + errors).
    pub requests: usize,
    /// Answers by status code.
    pub statuses: BTreeMap<u16, usize>,
    /// Latency percentiles of the answered requests.
    pub latency_ms: Latency,
    /// Distinct response bodies, over all answers.
    pub distinct_bodies: usize,
    /// The most distinct 2xx bodies seen under any one key (1 = every
    /// caller of a key got the same success).
    pub distinct_2xx_bodies: usize,
    /// Answers that carried `Idempotent-Replayed: true`.
    pub replayed: usize,
    /// Executions by the count URL (after − before); `null` without one.
    pub executions: Option<u64>,
    /// Requests that got no answer (reset, closed, timed out).
    pub errors: usize,
    /// Duplicates were found.
    pub duplicates: bool,
    /// One line saying what was found.
    pub verdict: String,
    /// Distinct keys sent (0 with `--no-key`).
    pub keys: usize,
    /// The count URL's value before the race.
    pub count_before: Option<u64>,
    /// The count URL's value after the race.
    pub count_after: Option<u64>,
    /// The first error, if any.
    pub first_error: Option<String>,
    /// Load mode: answered requests per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_sec: Option<f64>,
    /// Load mode: seconds from the start to the last answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    #[serde(skip)]
    outcome: Verdict,
}

/// The inputs of [`Report::build`] besides the samples.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Context {
    /// Distinct keys sent (0 = no key).
    pub keys: usize,
    /// The count URL before and after.
    pub counts: Option<(u64, u64)>,
    /// Load mode: time from the start to the last answer.
    pub load_elapsed: Option<Duration>,
}

impl Report {
    /// Folds the samples.
    pub(crate) fn build(samples: &[Sample], cx: Context) -> Self {
        let mut statuses = BTreeMap::new();
        let mut latencies = Vec::with_capacity(samples.len());
        let mut bodies = HashSet::new();
        let mut ok_bodies: HashMap<u64, HashSet<u64>> = HashMap::new();
        let mut replayed = 0;
        let mut errors = 0;
        let mut first_error = None;
        for sample in samples {
            match sample {
                Sample::Answered {
                    status,
                    latency,
                    body,
                    replayed: r,
                    key,
                } => {
                    *statuses.entry(*status).or_insert(0) += 1;
                    latencies.push(*latency);
                    bodies.insert(*body);
                    if (200..300).contains(status) {
                        ok_bodies.entry(*key).or_default().insert(*body);
                    }
                    replayed += usize::from(*r);
                }
                Sample::Failed(e) => {
                    errors += 1;
                    first_error.get_or_insert_with(|| e.clone());
                }
            }
        }
        let distinct_2xx_bodies = ok_bodies.values().map(HashSet::len).max().unwrap_or(0);
        let executions = cx
            .counts
            .map(|(before, after)| after.saturating_sub(before));
        let answered = latencies.len();
        let mut report = Self {
            requests: samples.len(),
            statuses,
            latency_ms: Latency::of(&mut latencies),
            distinct_bodies: bodies.len(),
            distinct_2xx_bodies,
            replayed,
            executions,
            errors,
            duplicates: false,
            verdict: String::new(),
            keys: cx.keys,
            count_before: cx.counts.map(|c| c.0),
            count_after: cx.counts.map(|c| c.1),
            first_error,
            requests_per_sec: cx.load_elapsed.map(|d| {
                let secs = d.as_secs_f64();
                if secs > 0.0 {
                    answered as f64 / secs
                } else {
                    0.0
                }
            }),
            duration_s: cx.load_elapsed.map(|d| d.as_secs_f64()),
            outcome: Verdict::NoDuplicates,
        };
        report.judge();
        report
    }

    /// Sets `duplicates`, `verdict` and the outcome from the numbers.
    fn judge(&mut self) {
        // Without keys the identical requests are one operation; with keys,
        // each key is one operation.
        let operations = self.keys.max(1) as u64;
        let extra = self.executions.filter(|&e| e > operations);
        let mut found = Vec::new();
        if let Some(e) = extra {
            found.push(format!(
                "{e} executions for {operations} {} (count URL)",
                plural(operations, "key", "keys")
            ));
        }
        if self.distinct_2xx_bodies > 1 {
            found.push(format!(
                "{} different 2xx answers under one key",
                self.distinct_2xx_bodies
            ));
        }
        (self.outcome, self.verdict) = if !found.is_empty() {
            (
                Verdict::Duplicates,
                format!("DUPLICATES: {}", found.join("; ")),
            )
        } else if self.errors > 0 {
            (
                Verdict::Inconclusive,
                format!(
                    "INCONCLUSIVE: {} of {} requests got no answer ({}); no duplicate seen in the rest",
                    self.errors,
                    self.requests,
                    self.first_error.as_deref().unwrap_or("unknown error")
                ),
            )
        } else {
            let what = match self.executions {
                Some(e) => format!(
                    "{e} {} for {operations} {}",
                    plural(e, "execution", "executions"),
                    plural(operations, "key", "keys")
                ),
                None => {
                    "at most one distinct 2xx answer per key (add --count-url to count executions)"
                        .to_owned()
                }
            };
            (Verdict::NoDuplicates, format!("OK: no duplicates: {what}"))
        };
        self.duplicates = self.outcome == Verdict::Duplicates;
    }

    /// What was found.
    #[must_use]
    pub fn verdict(&self) -> Verdict {
        self.outcome
    }

    /// Answered requests by status, as `201×1 200×99` (most frequent first).
    #[must_use]
    pub fn status_summary(&self) -> String {
        let mut by_count: Vec<_> = self.statuses.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let parts: Vec<String> = by_count.iter().map(|(s, n)| format!("{s}×{n}")).collect();
        if parts.is_empty() {
            "none".to_owned()
        } else {
            parts.join(" ")
        }
    }

    /// The `--json` object, on one line.
    #[must_use]
    pub fn to_json(&self) -> String {
        serde_json::to_value(self).map_or_else(
            |e| serde_json::json!({ "error": e.to_string() }).to_string(),
            |v| v.to_string(),
        )
    }

    /// The human report.
    #[must_use]
    pub fn to_text(&self) -> String {
        let l = &self.latency_ms;
        let mut out = String::new();
        let mut line = |label: &str, value: String| {
            let _ = writeln!(out, "  {label:<12} {value}");
        };
        line("statuses", self.status_summary());
        line(
            "latency",
            format!(
                "p50 {}  p90 {}  p99 {}  max {}",
                ms(l.p50),
                ms(l.p90),
                ms(l.p99),
                ms(l.max)
            ),
        );
        if let (Some(rps), Some(secs)) = (self.requests_per_sec, self.duration_s) {
            line(
                "throughput",
                format!(
                    "{rps:.1} requests/s ({} answered in {secs:.2} s)",
                    self.requests - self.errors
                ),
            );
        }
        line(
            "bodies",
            format!(
                "{} distinct; at most {} distinct 2xx under one key",
                self.distinct_bodies, self.distinct_2xx_bodies
            ),
        );
        line(
            "replayed",
            format!("{} (Idempotent-Replayed: true)", self.replayed),
        );
        line(
            "executions",
            match (self.executions, self.count_before, self.count_after) {
                (Some(e), Some(b), Some(a)) => format!("{e} (count URL: {b} → {a})"),
                _ => "unknown (no --count-url)".to_owned(),
            },
        );
        line(
            "errors",
            match &self.first_error {
                Some(first) => format!("{} (first: {first})", self.errors),
                None => "0".to_owned(),
            },
        );
        let _ = writeln!(out, "{}", self.verdict);
        out
    }
}

fn plural(n: u64, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 {
        one
    } else {
        many
    }
}

/// `12.3 ms`.
pub(crate) fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(status: u16, ms: u64, body: u64, replayed: bool, key: u64) -> Sample {
        Sample::Answered {
            status,
            latency: Duration::from_millis(ms),
            body,
            replayed,
            key,
        }
    }

    /// A burst's report: `keys` keys, the count URL before and after.
    fn burst(samples: &[Sample], keys: usize, counts: Option<(u64, u64)>) -> Report {
        Report::build(
            samples,
            Context {
                keys,
                counts,
                load_elapsed: None,
            },
        )
    }

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let l = Latency::of(&mut v);
        assert_eq!(l.p50, Duration::from_millis(50));
        assert_eq!(l.p90, Duration::from_millis(90));
        assert_eq!(l.p99, Duration::from_millis(99));
        assert_eq!(l.max, Duration::from_millis(100));
        // n = 3: rank(50) = ceil(1.5) = 2, rank(99) = ceil(2.97) = 3.
        let mut v = vec![
            Duration::from_millis(30),
            Duration::from_millis(10),
            Duration::from_millis(20),
        ];
        let l = Latency::of(&mut v);
        assert_eq!(
            (l.p50, l.p99),
            (Duration::from_millis(20), Duration::from_millis(30))
        );
        let mut one = vec![Duration::from_millis(7)];
        assert_eq!(Latency::of(&mut one).p50, Duration::from_millis(7));
        assert_eq!(Latency::of(&mut []), Latency::default());
    }

    #[test]
    fn one_execution_and_replays_is_clean() {
        let mut s = vec![answered(201, 20, 1, false, 0)];
        s.extend((0..9).map(|_| answered(201, 21, 1, true, 0)));
        let r = burst(&s, 1, Some((5, 6)));
        assert_eq!(r.verdict(), Verdict::NoDuplicates);
        assert!(!r.duplicates);
        assert_eq!((r.requests, r.replayed, r.executions), (10, 9, Some(1)));
        assert_eq!((r.distinct_bodies, r.distinct_2xx_bodies), (1, 1));
        assert_eq!(r.statuses[&201], 10);
        assert_eq!(r.verdict, "OK: no duplicates: 1 execution for 1 key");
        assert_eq!(r.status_summary(), "201×10");
    }

    #[test]
    fn extra_executions_are_duplicates() {
        let s = vec![
            answered(201, 20, 1, false, 0),
            answered(200, 21, 1, false, 0),
        ];
        let r = burst(&s, 1, Some((0, 2)));
        assert_eq!(r.verdict(), Verdict::Duplicates);
        assert!(r.duplicates);
        assert!(
            r.verdict.starts_with("DUPLICATES: 2 executions for 1 key"),
            "{}",
            r.verdict
        );
        assert_eq!(crate::race::exit_code(&Ok(r)), 1);
    }

    #[test]
    fn two_successes_under_one_key_are_duplicates_without_a_count_url() {
        let s = vec![
            answered(201, 20, 1, false, 0),
            answered(201, 21, 2, false, 0),
        ];
        let r = burst(&s, 1, None);
        assert_eq!(r.verdict(), Verdict::Duplicates);
        assert!(r.verdict.contains("2 different 2xx answers under one key"));
        assert_eq!(r.executions, None);
    }

    #[test]
    fn unique_keys_may_each_execute() {
        let s: Vec<_> = (0..4).map(|k| answered(201, 5, k, false, k)).collect();
        let r = burst(&s, 4, Some((0, 4)));
        assert_eq!(r.verdict(), Verdict::NoDuplicates, "{}", r.verdict);
        assert_eq!((r.distinct_bodies, r.distinct_2xx_bodies), (4, 1));
    }

    #[test]
    fn different_error_bodies_are_not_duplicates() {
        let s = vec![answered(201, 5, 1, false, 0), answered(409, 5, 2, false, 0)];
        let r = burst(&s, 1, None);
        assert_eq!(r.verdict(), Verdict::NoDuplicates);
        assert_eq!(r.distinct_bodies, 2);
    }

    #[test]
    fn failures_make_it_inconclusive() {
        let s = vec![
            answered(201, 5, 1, false, 0),
            Sample::Failed("connection reset".into()),
        ];
        let r = burst(&s, 1, None);
        assert_eq!(r.verdict(), Verdict::Inconclusive);
        assert_eq!(r.errors, 1);
        assert!(r.verdict.contains("connection reset"));
        assert_eq!(crate::race::exit_code(&Ok(r)), 2);
    }

    #[test]
    fn json_fields_are_stable() {
        let s = vec![
            answered(201, 12, 1, false, 0),
            answered(201, 14, 1, true, 0),
        ];
        let cx = Context {
            keys: 1,
            counts: None,
            load_elapsed: Some(Duration::from_secs(2)),
        };
        let v: serde_json::Value =
            serde_json::from_str(&Report::build(&s, cx).to_json()).expect("json");
        assert_eq!(v["requests"], 2);
        assert_eq!(v["statuses"]["201"], 2);
        assert_eq!(v["latency_ms"]["p50"], 12.0);
        assert_eq!(v["latency_ms"]["max"], 14.0);
        assert_eq!(v["executions"], serde_json::Value::Null);
        assert_eq!(v["requests_per_sec"], 1.0);
        assert_eq!(v["duration_s"], 2.0);
        assert_eq!(v["duplicates"], false);
        let burst = burst(&s, 1, None);
        let v: serde_json::Value = serde_json::from_str(&burst.to_json()).expect("json");
        assert!(v.get("requests_per_sec").is_none() && v.get("duration_s").is_none());
    }
}
