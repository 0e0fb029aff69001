//! `idem demo`: duplicates on demand, then gone (protocol §8 "Demo").
//!
//! In one process: start a deliberately naive "create order" service
//! ([`NaiveBackend`]: check, await, insert), race it directly with N
//! same-key requests, then race it again through an in-process gateway
//! (memory store, `concurrent = "wait"`), and print both side by side.
//! No external server is needed.

mod backend;

pub use backend::NaiveBackend;

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use http::header::CONTENT_TYPE;
use http::HeaderValue;
use idem::policy::{Concurrent, RoutePolicy, RouteTable};

use crate::config::{Config, Limits};
use crate::gateway::{Gateway, GatewayError};
use crate::race::{self, Keys, Mode, Plan, RaceError, Report, Target, Verdict};
use crate::units::format_duration;

/// What the demo does.
#[derive(Debug, Clone, Copy)]
pub struct DemoOptions {
    /// Same-key requests per race (default 200).
    pub requests: usize,
    /// The naive service's await between check and insert (default 20 ms).
    pub delay: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            requests: 200,
            delay: Duration::from_millis(20),
        }
    }
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// The naive service could not start.
    #[error("cannot start the demo service: {0}")]
    Backend(#[source] std::io::Error),
    /// The naive service's address is not an upstream URL (a bug in the demo).
    #[error("the demo service's address is not an upstream URL: {0}")]
    Upstream(#[source] http::uri::InvalidUri),
    /// The gateway could not start or stop.
    #[error("the demo's gateway failed: {0}")]
    Gateway(#[source] GatewayError),
    /// A race could not run.
    #[error("the race failed: {0}")]
    Race(#[source] RaceError),
}

/// Both races.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// What was run.
    pub options: DemoOptions,
    /// Straight at the naive service.
    pub direct: Report,
    /// Through the gateway.
    pub gateway: Report,
}

/// Runs both races and returns their reports.
pub async fn run(options: DemoOptions) -> Result<DemoReport, DemoError> {
    let backend = NaiveBackend::start(options.delay)
        .await
        .map_err(DemoError::Backend)?;
    let direct = race::run(&plan(&backend.orders_url(), &backend, options)?)
        .await
        .map_err(DemoError::Race)?;

    let gateway = Gateway::start(gateway_config(backend.addr())?)
        .await
        .map_err(DemoError::Gateway)?;
    let url = format!("http://{}/orders", gateway.local_addr());
    let through = race::run(&plan(&url, &backend, options)?).await;
    // Stop the gateway whatever the race did; a race error comes first.
    let stopped = gateway.shutdown().await;
    let through = through.map_err(DemoError::Race)?;
    stopped.map_err(DemoError::Gateway)?;
    Ok(DemoReport {
        options,
        direct,
        gateway: through,
    })
}

/// The demo's gateway: in front of the naive service on a free port, memory
/// store, duplicates wait for the first answer, a short shutdown grace.
fn gateway_config(backend: SocketAddr) -> Result<Config, DemoError> {
    let upstream = format!("http://{backend}")
        .parse()
        .map_err(DemoError::Upstream)?;
    let mut policy = RoutePolicy::default();
    policy.concurrent = Concurrent::Wait;
    Ok(Config::new(upstream)
        .listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .routes(RouteTable::new(policy))
        .limits(Limits {
            shutdown_grace: Duration::from_secs(2),
            ..Limits::default()
        }))
}

/// The same race for both sides: one fresh random key, a JSON body, the
/// naive service's count URL (read directly, not through the gateway).
fn plan(url: &str, backend: &NaiveBackend, options: DemoOptions) -> Result<Plan, DemoError> {
    let target = Target::parse(url).map_err(DemoError::Race)?;
    let count = Target::parse(&backend.count_url()).map_err(DemoError::Race)?;
    Ok(Plan::new(
        target,
        Mode::Burst {
            requests: options.requests,
        },
    )
    .keys(Keys::random())
    .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
    .body(&b"{\"sku\":\"tea\",\"quantity\":1}"[..])
    .count_url(count))
}

impl DemoReport {
    /// The gateway did its job: exactly one execution, no duplicate.
    #[must_use]
    pub fn gateway_held(&self) -> bool {
        self.gateway.executions == Some(1) && self.gateway.verdict() == Verdict::NoDuplicates
    }

    /// The side-by-side table.
    #[must_use]
    pub fn table(&self) -> String {
        let side = |r: &Report| {
            let executions = r.executions.unwrap_or(0);
            vec![
                r.requests.to_string(),
                executions.to_string(),
                executions.saturating_sub(1).to_string(),
                r.status_summary(),
                race::report::ms(r.latency_ms.p50),
                race::report::ms(r.latency_ms.p99),
            ]
        };
        let labels = [
            "requests",
            "executions",
            "duplicates",
            "status codes",
            "latency p50",
            "latency p99",
        ];
        let (left, right) = (side(&self.direct), side(&self.gateway));
        let heads = ["without idem", "behind idem serve"];
        let width = |col: &[String], head: &str| {
            col.iter()
                .map(|s| s.chars().count())
                .chain([head.chars().count()])
                .max()
                .unwrap_or(0)
        };
        let (lw, rw) = (width(&left, heads[0]), width(&right, heads[1]));
        let label_w = labels.iter().map(|l| l.len()).max().unwrap_or(0);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "  {:<label_w$}   {:>lw$}   {:>rw$}",
            "", heads[0], heads[1]
        );
        for (i, label) in labels.iter().enumerate() {
            let _ = writeln!(
                out,
                "  {label:<label_w$}   {:>lw$}   {:>rw$}",
                left[i], right[i]
            );
        }
        out
    }

    /// What the table shows, in plain words.
    #[must_use]
    pub fn explanation(&self) -> String {
        let n = self.options.requests;
        let delay = format_duration(self.options.delay);
        let direct = self.direct.executions.unwrap_or(0);
        let first = if direct > 1 {
            format!(
                "Without idem, {direct} of the {n} requests found no order for their key \
                 during the same {delay} gap between check and insert, and each created one: \
                 {} duplicate orders.",
                direct - 1
            )
        } else {
            format!(
                "Without idem, this run happened to create {direct} order: the {delay} gap \
                 between check and insert is narrow, so run it again to see it open."
            )
        };
        let second = if self.gateway_held() {
            format!(
                "Behind idem serve (memory store, concurrent = \"wait\"), one request reserved \
                 the key in one atomic step and executed; the other {} waited for its answer \
                 and got it replayed byte for byte ({} marked Idempotent-Replayed): 1 order.",
                n.saturating_sub(1),
                self.gateway.replayed
            )
        } else {
            format!(
                "Behind idem serve the service executed {} times: that is a bug in idem ({}).",
                self.gateway.executions.unwrap_or(0),
                self.gateway.verdict
            )
        };
        format!("{}\n{}", wrap(&first, 78), wrap(&second, 78))
    }
}

/// Word-wraps `text` at `width` columns; every line ends with a newline.
fn wrap(text: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = 0;
    for word in text.split_whitespace() {
        let len = word.chars().count();
        if line > 0 && line + 1 + len > width {
            out.push('\n');
            line = 0;
        }
        if line > 0 {
            out.push(' ');
            line += 1;
        }
        out.push_str(word);
        line += len;
    }
    out.push('\n');
    out
}

/// `idem demo`: run, print the table and the explanation; exit 0, or 1 if
/// the gateway let a duplicate through.
pub async fn command() -> ExitCode {
    let options = DemoOptions::default();
    print!(
        "{}",
        wrap(
            &format!(
                "idem demo: {} identical POST /orders with one Idempotency-Key, released \
                 together, against a naive \"create order\" service (check, await {}, insert).",
                options.requests,
                format_duration(options.delay)
            ),
            78
        )
    );
    println!();
    match run(options).await {
        Ok(report) => {
            println!("{}", report.table());
            print!("{}", report.explanation());
            if report.gateway_held() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("idem demo: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn wrap_keeps_words_whole() {
        assert_eq!(super::wrap("aa bb cc", 5), "aa bb\ncc\n");
        assert_eq!(
            super::wrap("a-very-long-word x", 4),
            "a-very-long-word\nx\n"
        );
        assert_eq!(super::wrap("", 10), "\n");
    }
}
