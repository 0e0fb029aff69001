//! Logs and traces of `idem serve` (protocol §10, §14).
//!
//! Logs go to stderr as before: `IDEM_LOG` is the filter (default `info`),
//! `IDEM_LOG_FORMAT=json` switches to JSON lines.
//!
//! Traces are exported over OTLP/HTTP (protobuf) only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set, and `OTEL_SDK_DISABLED` is not `true` nor `OTEL_TRACES_EXPORTER`
//! `none`. The other standard variables apply: `OTEL_SERVICE_NAME` (default
//! `idem`), `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`.
//! Exported spans: `request` (one per request, the existing span that
//! carries its id), `store.<call>` (one per store call, [`TracedStore`]) and
//! `upstream` (the call to the upstream). Their filter is separate from
//! `IDEM_LOG`: spans are exported at `info` whatever the log level.
//!
//! Without export, no span is added to the request path: only the
//! `traceparent` header is continued ([`context`]).

pub mod context;
mod stderr;
pub mod store;

use std::future::Future;
use std::io::IsTerminal;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

pub(crate) use context::write_hex;
pub use context::{continue_trace, upstream_answered, upstream_span, EdgeTrace, TraceParent};
pub use store::TracedStore;

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are being exported (set once, by [`Telemetry::init`]).
#[inline]
#[must_use]
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// A protocol other than `http/protobuf` was asked for.
    #[error(
        "{var}={value}: idem exports traces over OTLP http/protobuf only; \
         unset it or set it to http/protobuf"
    )]
    Protocol {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// The OTLP exporter refused its settings (e.g. an endpoint that is not
    /// a URL).
    #[error("OTEL_EXPORTER_OTLP_ENDPOINT: cannot export traces: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The process's logs and (maybe) trace export. [`Telemetry::shutdown`]
/// flushes the spans not yet sent.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sets up logs, and trace export when the environment asks for it
    /// (see the module docs). The exporter's HTTP calls run on `runtime`.
    ///
    /// # Errors
    ///
    /// [`TelemetryError`] for export settings that cannot work.
    pub fn init(runtime: &tokio::runtime::Handle) -> Result<Self, TelemetryError> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let provider = if export_requested(&env) {
            Some(provider(&env, runtime)?)
        } else {
            None
        };
        let traces = provider.as_ref().map(|p| {
            let spans = Targets::new()
                .with_target("idem_cli", Level::INFO)
                .with_target("idem", Level::INFO);
            tracing_opentelemetry::layer()
                .with_tracer(p.tracer("idem"))
                .with_filter(spans)
        });
        let _ = tracing_subscriber::registry()
            .with(logs())
            .with(traces)
            .try_init();
        EXPORTING.store(provider.is_some(), Ordering::Relaxed);
        Ok(Self { provider })
    }

    /// Sends the spans still buffered (bounded by the exporter's time-out).
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            EXPORTING.store(false, Ordering::Relaxed);
            if let Err(error) = p.shutdown() {
                eprintln!("idem: flushing traces failed: {error}");
            }
        }
    }
}

/// Logs go to stderr, filtered by `IDEM_LOG`; colours only when stderr is a
/// terminal: a file or a pipe gets plain text, not escape codes.
fn logs() -> Box<dyn Layer<Registry> + Send + Sync> {
    let filter = EnvFilter::try_from_env("IDEM_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(stderr::writer());
    let json = std::env::var("IDEM_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    if json {
        layer.json().with_filter(filter).boxed()
    } else {
        layer.with_filter(filter).boxed()
    }
}

fn export_requested(env: &impl Fn(&str) -> Option<String>) -> bool {
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    let endpoint = env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some();
    endpoint && !disabled
}

fn provider(
    env: &impl Fn(&str) -> Option<String>,
    runtime: &tokio::runtime::Handle,
) -> Result<SdkTracerProvider, TelemetryError> {
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(value) = env(var) {
            if value != "http/protobuf" {
                return Err(TelemetryError::Protocol { var, value });
            }
            break;
        }
    }
    let timeout = [
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .into_iter()
    .find_map(|var| env(var)?.parse::<u64>().ok())
    .map_or(Duration::from_secs(10), Duration::from_millis);
    let client = OnRuntime {
        client: opentelemetry_http::hyper::HyperClient::with_default_connector(timeout, None),
        runtime: runtime.clone(),
    };
    // Endpoint, headers and time-out come from the OTEL_* variables.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_http_client(client)
        .build()?;
    let named = env("OTEL_SERVICE_NAME").is_some()
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
    let mut resource = Resource::builder()
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if !named {
        resource = resource.with_service_name("idem");
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// The exporter runs on its own thread, outside the runtime; its HTTP calls
/// are sent to the runtime (hyper needs one) and awaited from there.
#[derive(Debug)]
struct OnRuntime {
    client: opentelemetry_http::hyper::HyperClient,
    runtime: tokio::runtime::Handle,
}

impl HttpClient for OnRuntime {
    fn send_bytes<'life0, 'async_trait>(
        &'life0 self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let client = self.client.clone();
        let task = self
            .runtime
            .spawn(async move { client.send_bytes(request).await });
        Box::pin(async move { task.await.map_err(|e| Box::new(e) as HttpError)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_only_when_an_endpoint_is_set_and_not_disabled() {
        let with = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert!(!export_requested(&with(&[])));
        assert!(!export_requested(&with(&[("OTEL_SERVICE_NAME", "x")])));
        assert!(export_requested(&with(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://127.0.0.1:4318"
        )])));
        assert!(export_requested(&with(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://127.0.0.1:4318/v1/traces"
        )])));
        assert!(!export_requested(&with(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ("OTEL_SDK_DISABLED", "true"),
        ])));
        assert!(!export_requested(&with(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ])));
    }
}
