//! `GET /metrics` (protocol §10, §9.8): the engine's and async mode's
//! figures in the Prometheus text format (0.0.4), encoded by
//! `prometheus-client`.
//!
//! The figures themselves stay relaxed atomics on the request path
//! ([`idem::engine::Metrics`], [`idem::asyncop::DispatchMetrics`]); a scrape
//! reads them once into a [`Families`] and encodes that, so the request path
//! pays nothing for the library.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use idem::engine::{Histogram, Metrics};
use idem::store::QueueStats;
use idem::StoreError;

use crate::gateway::dispatch::AsyncStats;

/// The `Content-Type` of the answer.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// One metric family as read at scrape time.
#[derive(Debug)]
enum Family {
    /// A counter (its name without `_total`, which the encoder adds), with
    /// one sample per label value, or one unlabelled sample.
    Counter {
        name: &'static str,
        help: &'static str,
        label: Option<&'static str>,
        samples: Vec<(&'static str, u64)>,
    },
    /// Whole numbers are written as such (`2`, not `2.0`).
    Gauge {
        name: &'static str,
        help: &'static str,
        value: Value,
    },
    /// Bucket counts are per bucket (not cumulative); `+Inf` is the count.
    Histogram {
        name: &'static str,
        help: &'static str,
        buckets: Vec<(f64, u64)>,
        sum: f64,
        count: u64,
    },
}

#[derive(Debug, Clone, Copy)]
enum Value {
    Whole(u64),
    Float(f64),
}

/// Every family of one scrape.
#[derive(Debug, Default)]
struct Families(Vec<Family>);

impl Families {
    fn counter(&mut self, name: &'static str, help: &'static str, value: &AtomicU64) {
        self.0.push(Family::Counter {
            name,
            help,
            label: None,
            samples: vec![("", read(value))],
        });
    }

    fn labelled(
        &mut self,
        name: &'static str,
        help: &'static str,
        label: &'static str,
        samples: Vec<(&'static str, u64)>,
    ) {
        self.0.push(Family::Counter {
            name,
            help,
            label: Some(label),
            samples,
        });
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, value: u64) {
        self.0.push(Family::Gauge {
            name,
            help,
            value: Value::Whole(value),
        });
    }

    fn histogram(&mut self, name: &'static str, help: &'static str, h: &Histogram) {
        let (cumulative, sum, count) = h.snapshot();
        let mut below = 0;
        let buckets = cumulative
            .into_iter()
            .map(|(le, n)| {
                let in_bucket = n.saturating_sub(below);
                below = n;
                (le, in_bucket)
            })
            .collect();
        self.0.push(Family::Histogram {
            name,
            help,
            buckets,
            sum,
            count,
        });
    }
}

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in &self.0 {
            match family {
                Family::Counter {
                    name,
                    help,
                    label,
                    samples,
                } => {
                    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                    match label {
                        None => {
                            let v = samples.first().map_or(0, |(_, v)| *v);
                            ConstCounter::new(v).encode(m)?;
                        }
                        Some(label) => {
                            for (value, v) in samples {
                                let labels = [(*label, *value)];
                                ConstCounter::new(*v).encode(m.encode_family(&labels)?)?;
                            }
                        }
                    }
                }
                Family::Gauge { name, help, value } => {
                    let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                    match value {
                        Value::Whole(v) => ConstGauge::new(*v).encode(m)?,
                        Value::Float(v) => ConstGauge::new(*v).encode(m)?,
                    }
                }
                Family::Histogram {
                    name,
                    help,
                    buckets,
                    sum,
                    count,
                } => {
                    let mut m =
                        encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
                    m.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?;
                }
            }
        }
        Ok(())
    }
}

fn read(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The text of one scrape. `queue` is async mode's store-wide figures, read
/// by the caller (it is a store call); an error leaves them out.
pub fn render(
    m: &Metrics,
    asynchronous: Option<(&AsyncStats, Result<QueueStats, StoreError>)>,
) -> String {
    let mut f = Families::default();
    f.labelled(
        "idem_requests",
        "Requests by outcome.",
        "outcome",
        [
            ("executed", &m.executed),
            ("replayed", &m.replayed),
            ("waited", &m.waited),
            ("conflict", &m.conflict),
            ("mismatch", &m.mismatch),
            ("bypass", &m.bypass),
            ("store_error", &m.store_error),
            ("fenced", &m.fenced),
            ("cancelled", &m.cancelled),
            ("unstored", &m.unstored),
        ]
        .into_iter()
        .map(|(o, c)| (o, read(c)))
        .collect(),
    );
    f.gauge(
        "idem_in_flight",
        "Operations executing now.",
        read(&m.in_flight),
    );
    f.gauge(
        "idem_watchers",
        "Single-flight watchers running now.",
        read(&m.watchers),
    );
    f.counter(
        "idem_response_too_large",
        "Answers larger than max_response_body: streamed, not stored, key released.",
        &m.response_too_large,
    );
    f.labelled(
        "idem_local_cache_lookups",
        "Local cache lookups by result.",
        "result",
        vec![
            ("hit", read(&m.cache_hits)),
            ("miss", read(&m.cache_misses)),
        ],
    );
    f.histogram(
        "idem_store_latency_seconds",
        "Store call latency.",
        &m.store_latency,
    );
    if let Some((stats, queue)) = asynchronous {
        async_families(&mut f, stats, queue);
    }
    let mut registry = Registry::default();
    registry.register_collector(Box::new(f));
    let mut out = String::with_capacity(4096);
    if let Err(error) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        tracing::warn!(%error, "metrics: encoding failed");
    }
    out
}

/// Async mode's figures (protocol §9.8): the queue's (shared by every
/// instance, from the store), then this instance's accepts and dispatches.
fn async_families(f: &mut Families, stats: &AsyncStats, queue: Result<QueueStats, StoreError>) {
    match queue {
        Ok(q) => {
            f.gauge(
                "idem_async_pending",
                "Operations accepted and not yet done, in the whole store.",
                q.pending,
            );
            f.0.push(Family::Gauge {
                name: "idem_async_oldest_pending_seconds",
                help: "Age of the oldest of them (0: none).",
                value: Value::Float(q.oldest_pending_age.map_or(0.0, |d| d.as_secs_f64())),
            });
        }
        Err(error) => tracing::warn!(%error, "metrics: the queue's figures are unavailable"),
    }
    f.gauge(
        "idem_async_max_pending",
        "The max_pending bound.",
        stats.max_pending,
    );
    f.gauge(
        "idem_async_workers",
        "Dispatcher workers on this instance.",
        u64::try_from(stats.workers).unwrap_or(u64::MAX),
    );
    let a = &stats.accept;
    f.labelled(
        "idem_async_accepts",
        "Async requests by answer.",
        "result",
        [
            ("accepted", &a.accepted),
            ("existing", &a.existing),
            ("replayed", &a.replayed),
            ("mismatch", &a.mismatch),
            ("conflict", &a.conflict),
            ("full", &a.full),
            ("store_error", &a.store_error),
        ]
        .into_iter()
        .map(|(r, c)| (r, read(c)))
        .collect(),
    );
    f.counter(
        "idem_async_status_requests",
        "Requests under /_idem/.",
        &a.status_requests,
    );
    let d = stats.dispatch.counts();
    for (name, help, value) in [
        (
            "idem_async_attempts",
            "Upstream calls made by this instance's dispatchers.",
            d.attempts,
        ),
        (
            "idem_async_retries",
            "Failed attempts scheduled again.",
            d.retries,
        ),
        (
            "idem_async_completed",
            "Operations done with an answer of a stored status.",
            d.completed,
        ),
        (
            "idem_async_final_failures",
            "Operations done with the stored 502 after their last attempt.",
            d.final_failures,
        ),
        (
            "idem_async_lost",
            "Attempts whose operation another dispatcher took over; outcome dropped.",
            d.lost,
        ),
        (
            "idem_async_store_errors",
            "Store calls of the dispatchers that failed.",
            d.store_errors,
        ),
    ] {
        f.0.push(Family::Counter {
            name,
            help,
            label: None,
            samples: vec![("", value)],
        });
    }
    f.gauge(
        "idem_async_in_flight",
        "Upstream calls of dispatchers running now.",
        d.in_flight,
    );
    f.histogram(
        "idem_async_dispatch_latency_seconds",
        "Upstream call latency of each attempt.",
        &stats.dispatch.dispatch_latency,
    );
}
