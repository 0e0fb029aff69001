//! `idem race`: fire N identical requests at once and count what happened
//! (protocol §8 "Race prober", §12).
//!
//! A race runs in four steps:
//!
//! 1. [`RaceArgs::plan`] checks the command line and builds a [`Plan`]
//!    (URL, method, body, headers, keys, count URL, mode);
//! 2. [`run`] reads the count URL, opens **one TCP connection per request**
//!    (in batches, *before* the start, so the burst is the requests and not
//!    the connects) and parks one task per connection on a
//!    [`tokio::sync::Barrier`] with every request already built;
//! 3. the barrier releases them together; each task times its own request,
//!    from send to the last byte of the body; the connections are closed
//!    together once the last answer is in (so the closes of the first are
//!    not timed in the last);
//! 4. the count URL is read again and everything is folded into a
//!    [`Report`]: status histogram, nearest-rank latency percentiles,
//!    distinct bodies, replays, executions and a verdict.
//!
//! Load mode (`--duration 10s --concurrency C`) instead keeps C connections
//! busy for the duration and adds requests/s.
//!
//! `--repeat N` runs the burst N times, each run with a fresh key, and
//! counts the runs that duplicated ([`Repeated`]): a race is a sample, and
//! a rare duplicate shows up in one run out of many.
//!
//! Exit codes are decided in one place, [`exit_code`] (and
//! [`Repeated::exit_code`]): 0 no duplicate, 1 duplicates found, 2 usage
//! or connection errors.

mod progress;
pub(crate) mod report;
mod runner;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{ArgGroup, Args};
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};

use crate::units::{self, format_duration};

pub use report::{Latency, Report, Verdict};

/// The most requests one burst may send (`-n`).
pub const MAX_REQUESTS: usize = 10_000;

/// How long one request may take before it counts as an error.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long opening one connection may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `idem race` flags (protocol §12).
#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("keying").args(["key", "unique_keys", "no_key"])))]
pub struct RaceArgs {
    /// The URL to race, as http://host:port/path (plain HTTP/1.1; the port may be left out).
    #[arg(value_name = "URL")]
    pub url: String,
    /// Number of requests, each on its own connection, released together (1 to 10000).
    #[arg(
        short = 'n',
        long = "requests",
        value_name = "N",
        default_value_t = 100,
        value_parser = clap::value_parser!(u16).range(1..=10_000),
        conflicts_with = "duration"
    )]
    pub requests: u16,
    /// HTTP method.
    #[arg(
        short = 'X',
        long = "request",
        value_name = "METHOD",
        default_value = "POST"
    )]
    pub method: String,
    /// Request body; `@file` reads it from a file.
    #[arg(short = 'd', long = "data", value_name = "BODY")]
    pub data: Option<String>,
    /// Extra request header, `Name: value` (repeatable).
    #[arg(short = 'H', long = "header", value_name = "'Name: value'")]
    pub headers: Vec<String>,
    /// The Idempotency-Key every request carries [default: a random key per run].
    #[arg(long, value_name = "K")]
    pub key: Option<String>,
    /// Give every request its own key (no request is a duplicate of another).
    #[arg(long)]
    pub unique_keys: bool,
    /// Send no Idempotency-Key at all.
    #[arg(long)]
    pub no_key: bool,
    /// The header that carries the key, e.g. `X-Idempotency-Key` or
    /// `webhook-id` (a route's `key_header`).
    #[arg(long, value_name = "NAME", default_value = "Idempotency-Key")]
    pub key_header: String,
    /// Run the burst N times, each run with a fresh key, and report how
    /// many runs duplicated (exit 1 if any did).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=10_000),
        conflicts_with_all = ["duration", "key"]
    )]
    pub repeat: u16,
    /// GET this before and after the burst: `{"count": n}` or a bare number of executions.
    #[arg(long, value_name = "URL")]
    pub count_url: Option<String>,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    pub json: bool,
    /// Load mode: keep sending for this long (e.g. 10s) and report requests/s.
    #[arg(long, value_name = "DURATION", value_parser = parse_load_duration)]
    pub duration: Option<Duration>,
    /// Load mode: connections kept busy at once [default: 16].
    #[arg(
        long,
        value_name = "C",
        requires = "duration",
        value_parser = clap::value_parser!(u16).range(1..=10_000)
    )]
    pub concurrency: Option<u16>,
}

fn parse_load_duration(s: &str) -> Result<Duration, String> {
    let d = units::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("the duration must be more than zero".into());
    }
    Ok(d)
}

/// Load-mode concurrency when `--concurrency` is not given.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// Why a race could not be run. Every variant maps to exit code 2.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RaceError {
    /// The URL is not one `idem race` can send to.
    #[error("bad URL `{url}`: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// A `-H` argument is not `Name: value`.
    #[error("bad header `{header}`: {reason}")]
    Header {
        /// The argument as given.
        header: String,
        /// Why it was refused.
        reason: String,
    },
    /// `-X` is not a valid method.
    #[error("bad method `{0}`: not an HTTP method token")]
    Method(String),
    /// `--key-header` is not a header name, or one that cannot carry a key.
    #[error("bad key header `{name}`: {reason}")]
    KeyHeader {
        /// The name as given.
        name: String,
        /// Why it was refused.
        reason: String,
    },
    /// `--key` cannot be sent as a header value.
    #[error("bad key `{0}`: a key must be 1 to 255 visible ASCII characters")]
    Key(String),
    /// `-d @file` could not be read.
    #[error("cannot read the body from `{path}`: {source}")]
    BodyFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The host name did not resolve.
    #[error("cannot resolve `{host}`: {reason}")]
    Resolve {
        /// `host:port`.
        host: String,
        /// Why.
        reason: String,
    },
    /// A connection could not be opened.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A connection was not established within the connect timeout.
    #[error("cannot connect to {addr}: no answer within {}", format_duration(*.timeout))]
    ConnectTimeout {
        /// The address.
        addr: std::net::SocketAddr,
        /// The timeout.
        timeout: Duration,
    },
    /// Not enough file descriptors for one connection per request.
    #[error(
        "{needed} connections need more file descriptors than this process may open{}; \
         raise it (e.g. `ulimit -n {suggest}`) or send fewer requests",
        limit.map(|l| format!(" (ulimit -n is {l})")).unwrap_or_default(),
        suggest = needed + 1024
    )]
    TooManyOpenFiles {
        /// Connections asked for.
        needed: usize,
        /// The soft limit, when known.
        limit: Option<u64>,
    },
    /// The HTTP/1.1 handshake on a fresh connection failed.
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: hyper::Error,
    },
    /// The count URL could not be read or did not hold a count.
    #[error("count URL `{url}`: {reason}")]
    CountUrl {
        /// The count URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// A request could not be built (an internal inconsistency).
    #[error("cannot build the request: {0}")]
    Request(#[source] http::Error),
    /// A task of the race failed unexpectedly.
    #[error("a race task failed: {0}")]
    Task(String),
}

/// Where requests go: a plain-HTTP URL split for a raw HTTP/1.1 connection.
#[derive(Debug, Clone)]
pub struct Target {
    url: String,
    connect: String,
    host: HeaderValue,
    path: PathAndQuery,
}

impl Target {
    /// Parses `http://host[:port][/path][?query]`. `https`, a missing
    /// scheme, user info and fragments are refused with the reason.
    pub fn parse(url: &str) -> Result<Self, RaceError> {
        let bad = |reason: &str| RaceError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        if !url.contains("://") {
            return Err(bad("write a full URL, e.g. http://127.0.0.1:8080/orders"));
        }
        if url.contains('#') {
            return Err(bad("fragments (#…) are never sent; remove it"));
        }
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        match uri.scheme() {
            Some(s) if *s == Scheme::HTTP => {}
            Some(s) if *s == Scheme::HTTPS => {
                return Err(bad(
                    "https is not supported: idem race speaks plain HTTP/1.1; \
                     race the service or gateway on its http:// address",
                ))
            }
            Some(s) => return Err(bad(&format!("scheme `{s}` is not supported; use http://"))),
            None => return Err(bad("write a full URL, e.g. http://127.0.0.1:8080/orders")),
        }
        let authority = uri.authority().ok_or_else(|| bad("the URL has no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad(
                "user info in the URL is not supported; send -H 'Authorization: …'",
            ));
        }
        let host = authority.host();
        if host.is_empty() {
            return Err(bad("the URL has no host"));
        }
        let port = authority.port_u16().unwrap_or(80);
        let host_header =
            HeaderValue::from_str(authority.as_str()).map_err(|e| bad(&e.to_string()))?;
        let path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Ok(Self {
            url: url.to_owned(),
            connect: format!("{host}:{port}"),
            host: host_header,
            path,
        })
    }

    /// The URL as given.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// Which Idempotency-Key each request carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keys {
    /// The same key on every request: they are all one operation.
    One(String),
    /// `{prefix}-{n}`: every request is its own operation.
    Unique {
        /// The per-run prefix.
        prefix: String,
    },
    /// No key header at all.
    None,
}

impl Keys {
    /// One random key for this run (`race-` and 16 hex digits).
    #[must_use]
    pub fn random() -> Self {
        Self::One(random_name("race"))
    }

    /// Unique keys under a random per-run prefix.
    #[must_use]
    pub fn unique() -> Self {
        Self::Unique {
            prefix: random_name("race"),
        }
    }

    /// The same kind of keys, fresh (for the next run of `--repeat`): a new
    /// random key, a new prefix, or still none.
    #[must_use]
    pub fn fresh(&self) -> Self {
        match self {
            Self::One(_) => Self::random(),
            Self::Unique { .. } => Self::unique(),
            Self::None => Self::None,
        }
    }
}

fn random_name(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// Burst or load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `requests` requests, one connection each, released together.
    Burst {
        /// How many (1 to [`MAX_REQUESTS`]).
        requests: usize,
    },
    /// `concurrency` connections kept busy for `duration`.
    Load {
        /// How long to send.
        duration: Duration,
        /// Connections at once.
        concurrency: usize,
    },
}

/// A checked race, ready for [`run`].
#[derive(Debug, Clone)]
pub struct Plan {
    target: Target,
    mode: Mode,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
    keys: Keys,
    key_header: HeaderName,
    count_url: Option<Target>,
    progress: bool,
    request_timeout: Duration,
    connect_timeout: Duration,
}

impl Plan {
    /// A plan with the defaults: POST, no body or extra headers, one random
    /// key, no count URL, no progress bar.
    #[must_use]
    pub fn new(target: Target, mode: Mode) -> Self {
        Self {
            target,
            mode,
            method: Method::POST,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            keys: Keys::random(),
            key_header: idem::layer::IDEMPOTENCY_KEY,
            count_url: None,
            progress: false,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// Sets the method.
    #[must_use]
    pub fn method(mut self, method: Method) -> Self {
        self.method = method;
        self
    }

    /// Adds a header to every request.
    #[must_use]
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }

    /// Sets the body of every request.
    #[must_use]
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets which keys the requests carry.
    #[must_use]
    pub fn keys(mut self, keys: Keys) -> Self {
        self.keys = keys;
        self
    }

    /// Sets the header that carries the key (default `Idempotency-Key`).
    #[must_use]
    pub fn key_header(mut self, name: HeaderName) -> Self {
        self.key_header = name;
        self
    }

    /// The same plan with fresh keys (see [`Keys::fresh`]).
    #[must_use]
    pub fn fresh_keys(&self) -> Self {
        let mut next = self.clone();
        next.keys = self.keys.fresh();
        next
    }

    /// Reads executions from this URL before and after.
    #[must_use]
    pub fn count_url(mut self, target: Target) -> Self {
        self.count_url = Some(target);
        self
    }

    /// Draws a progress bar on stderr.
    #[must_use]
    pub fn progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }

    /// Sets how long one request may take before it counts as an error.
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The mode.
    #[must_use]
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// One line saying what this plan does.
    #[must_use]
    pub fn describe(&self) -> String {
        let keys = match &self.keys {
            Keys::One(k) => format!("one key ({k})"),
            Keys::Unique { prefix } => format!("a unique key each ({prefix}-…)"),
            Keys::None => "no key".to_owned(),
        };
        let keys = if self.key_header == idem::layer::IDEMPOTENCY_KEY || self.keys == Keys::None {
            keys
        } else {
            format!("{keys} in {}", self.key_header)
        };
        match self.mode {
            Mode::Burst { requests } => format!(
                "{requests} × {} {}, {keys}, one connection each, released together",
                self.method, self.target.url
            ),
            Mode::Load {
                duration,
                concurrency,
            } => format!(
                "{} {} for {} on {concurrency} connections, {keys}",
                self.method,
                self.target.url,
                format_duration(duration)
            ),
        }
    }
}

impl RaceArgs {
    /// Checks the flags and builds the plan. Reads `-d @file`.
    pub fn plan(&self) -> Result<Plan, RaceError> {
        let target = Target::parse(&self.url)?;
        let mode = match self.duration {
            Some(duration) => Mode::Load {
                duration,
                concurrency: self.concurrency.map_or(DEFAULT_CONCURRENCY, usize::from),
            },
            None => Mode::Burst {
                requests: usize::from(self.requests),
            },
        };
        let method = Method::from_bytes(self.method.as_bytes())
            .map_err(|_| RaceError::Method(self.method.clone()))?;
        let keys = if self.no_key {
            Keys::None
        } else if self.unique_keys {
            Keys::unique()
        } else if let Some(k) = &self.key {
            check_key(k)?;
            Keys::One(k.clone())
        } else {
            Keys::random()
        };
        let key_header = parse_key_header(&self.key_header)?;
        let mut plan = Plan::new(target, mode).method(method).keys(keys);
        for raw in &self.headers {
            let (name, value) = parse_header(raw)?;
            if name == key_header {
                return Err(RaceError::Header {
                    header: raw.clone(),
                    reason: "set the key with --key K (or --unique-keys, --no-key)".to_owned(),
                });
            }
            plan = plan.header(name, value);
        }
        plan = plan.key_header(key_header);
        if let Some(data) = &self.data {
            plan = plan.body(read_body(data)?);
        }
        if let Some(url) = &self.count_url {
            plan = plan.count_url(Target::parse(url)?);
        }
        Ok(plan.progress(std::io::stderr().is_terminal()))
    }
}

/// `--key-header NAME`: a header name, and not one that frames the body.
fn parse_key_header(name: &str) -> Result<HeaderName, RaceError> {
    let bad = |reason: &str| RaceError::KeyHeader {
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    let header =
        HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad("not a valid header name"))?;
    if header == CONTENT_LENGTH || header == TRANSFER_ENCODING || header == http::header::HOST {
        return Err(bad("idem race sets this header itself"));
    }
    Ok(header)
}

fn check_key(key: &str) -> Result<(), RaceError> {
    let ok = (1..=255).contains(&key.len()) && key.bytes().all(|b| (0x21..=0x7e).contains(&b));
    if ok {
        Ok(())
    } else {
        Err(RaceError::Key(key.to_owned()))
    }
}

/// `-d BODY` or `-d @file`.
fn read_body(data: &str) -> Result<Bytes, RaceError> {
    match data.strip_prefix('@') {
        Some(path) => std::fs::read(path)
            .map(Bytes::from)
            .map_err(|source| RaceError::BodyFile {
                path: PathBuf::from(path),
                source,
            }),
        None => Ok(Bytes::copy_from_slice(data.as_bytes())),
    }
}

/// Parses `-H 'Name: value'` strictly: a valid header name, a colon, a
/// valid value (surrounding spaces trimmed). Headers that would break the
/// framing or the key handling are refused.
pub fn parse_header(raw: &str) -> Result<(HeaderName, HeaderValue), RaceError> {
    let bad = |reason: &str| RaceError::Header {
        header: raw.to_owned(),
        reason: reason.to_owned(),
    };
    let (name, value) = raw
        .split_once(':')
        .ok_or_else(|| bad("write it as 'Name: value'"))?;
    if name.is_empty() || name.trim() != name {
        return Err(bad(
            "the name must be non-empty and directly followed by `:`",
        ));
    }
    let name = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| bad("the name is not a valid header name"))?;
    let value = HeaderValue::from_str(value.trim_matches([' ', '\t']))
        .map_err(|_| bad("the value holds characters a header cannot carry"))?;
    if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
        return Err(bad("idem race sets the body framing itself; use -d"));
    }
    Ok((name, value))
}

/// Runs a race to completion.
pub async fn run(plan: &Plan) -> Result<Report, RaceError> {
    runner::run(plan).await
}

/// THE mapping from a race's outcome to the process exit code: 0 no
/// duplicate, 1 duplicates found, 2 usage or connection errors (including
/// requests that failed mid-race, which make a clean verdict unreliable).
#[must_use]
pub fn exit_code(outcome: &Result<Report, RaceError>) -> u8 {
    match outcome {
        Err(_) => 2,
        Ok(report) => match report.verdict() {
            Verdict::NoDuplicates => 0,
            Verdict::Duplicates => 1,
            Verdict::Inconclusive => 2,
        },
    }
}

/// The runs of `idem race --repeat N`, each a burst with fresh keys.
#[derive(Debug, Clone, Default)]
pub struct Repeated {
    /// The report of every run that completed, in order.
    pub reports: Vec<Report>,
    /// The error that ended the runs early, if one did.
    pub error: Option<String>,
    /// Runs asked for.
    pub runs: usize,
}

impl Repeated {
    /// Runs that found duplicates.
    #[must_use]
    pub fn duplicated(&self) -> usize {
        self.count(Verdict::Duplicates)
    }

    /// Runs with requests that got no answer (and no duplicate).
    #[must_use]
    pub fn inconclusive(&self) -> usize {
        self.count(Verdict::Inconclusive)
    }

    fn count(&self, verdict: Verdict) -> usize {
        self.reports
            .iter()
            .filter(|r| r.verdict() == verdict)
            .count()
    }

    /// 1 if any run duplicated (a duplicate is a finding, even if a later
    /// run failed); else 2 if a run failed or was inconclusive; else 0.
    #[must_use]
    pub fn exit_code(&self) -> u8 {
        if self.duplicated() > 0 {
            1
        } else if self.error.is_some() || self.inconclusive() > 0 {
            2
        } else {
            0
        }
    }

    /// One line saying what the runs found.
    #[must_use]
    pub fn verdict(&self) -> String {
        let done = self.reports.len();
        let mut line = match self.duplicated() {
            0 => format!("NO DUPLICATES in {done} of {} runs", self.runs),
            d => format!("DUPLICATES in {d} of {done} runs"),
        };
        if self.inconclusive() > 0 {
            line.push_str(&format!(
                " ({} inconclusive: requests without an answer)",
                self.inconclusive()
            ));
        }
        if let Some(e) = &self.error {
            line.push_str(&format!("; stopped after run {done}: {e}"));
        }
        line
    }

    /// `--json`: the counts, the verdict and every run's report.
    #[must_use]
    pub fn to_json(&self) -> String {
        let reports: Vec<serde_json::Value> = self
            .reports
            .iter()
            .map(|r| serde_json::from_str(&r.to_json()).unwrap_or_default())
            .collect();
        serde_json::json!({
            "runs": self.runs,
            "completed": self.reports.len(),
            "duplicated": self.duplicated(),
            "inconclusive": self.inconclusive(),
            "duplicates": self.duplicated() > 0,
            "error": self.error,
            "verdict": self.verdict(),
            "reports": reports,
        })
        .to_string()
    }
}

/// `--repeat N`: `runs` bursts one after the other, each with fresh keys;
/// one line per run on stdout unless `quiet`. Stops at the first error.
pub async fn run_repeated(plan: &Plan, runs: usize, quiet: bool) -> Repeated {
    let mut out = Repeated {
        runs,
        ..Repeated::default()
    };
    for i in 1..=runs {
        let this = if i == 1 {
            plan.clone()
        } else {
            plan.fresh_keys()
        };
        match run(&this).await {
            Ok(report) => {
                if !quiet {
                    println!(
                        "run {i}/{runs}: {}; {}",
                        report.status_summary(),
                        report.verdict
                    );
                }
                out.reports.push(report);
            }
            Err(e) => {
                out.error = Some(e.to_string());
                break;
            }
        }
    }
    out
}

/// `idem race`: plan, run, print (text or `--json`), and the exit code.
pub async fn command(args: RaceArgs) -> ExitCode {
    if args.repeat > 1 {
        return repeat_command(&args).await;
    }
    let outcome = match args.plan() {
        Ok(plan) => {
            if !args.json {
                println!("idem race: {}", plan.describe());
            }
            run(&plan).await
        }
        Err(e) => Err(e),
    };
    match &outcome {
        Ok(report) if args.json => println!("{}", report.to_json()),
        Ok(report) => print!("{}", report.to_text()),
        Err(e) => {
            if args.json {
                println!("{}", serde_json::json!({ "error": e.to_string() }));
            }
            eprintln!("idem race: {e}");
        }
    }
    ExitCode::from(exit_code(&outcome))
}

/// `idem race --repeat N`.
async fn repeat_command(args: &RaceArgs) -> ExitCode {
    let plan = match args.plan() {
        Ok(plan) => plan.progress(false),
        Err(e) => {
            if args.json {
                println!("{}", serde_json::json!({ "error": e.to_string() }));
            }
            eprintln!("idem race: {e}");
            return ExitCode::from(2);
        }
    };
    let runs = usize::from(args.repeat);
    if !args.json {
        println!("idem race: {runs} runs of {}", plan.describe());
    }
    let repeated = run_repeated(&plan, runs, args.json).await;
    if args.json {
        println!("{}", repeated.to_json());
    } else {
        println!("{}", repeated.verdict());
    }
    if let Some(e) = &repeated.error {
        eprintln!("idem race: {e}");
    }
    ExitCode::from(repeated.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        race: RaceArgs,
    }

    fn args(argv: &[&str]) -> Result<RaceArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("race").chain(argv.iter().copied())).map(|c| c.race)
    }

    #[test]
    fn urls() {
        let t = Target::parse("http://127.0.0.1:8080/orders?x=1").expect("valid");
        assert_eq!(t.connect, "127.0.0.1:8080");
        assert_eq!(t.host, "127.0.0.1:8080");
        assert_eq!(t.path.as_str(), "/orders?x=1");
        let t = Target::parse("http://example.test").expect("valid");
        assert_eq!(
            (t.connect.as_str(), t.path.as_str()),
            ("example.test:80", "/")
        );
        let t = Target::parse("http://[::1]:9/").expect("valid");
        assert_eq!(t.connect, "[::1]:9");
        for (bad, why) in [
            ("https://example.test/", "https is not supported"),
            ("example.test/orders", "full URL"),
            ("ftp://example.test/", "scheme `ftp`"),
            ("http://u:p@example.test/", "user info"),
            ("http://example.test/#x", "fragments"),
            ("http://exa mple/", "bad URL"),
            ("", "bad URL"),
        ] {
            let e = Target::parse(bad).expect_err(bad).to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn headers_are_parsed_strictly() {
        let (n, v) = parse_header("Content-Type:  application/json ").expect("valid");
        assert_eq!(
            (n.as_str(), v.to_str().ok()),
            ("content-type", Some("application/json"))
        );
        let (_, v) = parse_header("X-Empty:").expect("an empty value is a value");
        assert!(v.is_empty());
        for bad in [
            "no colon",
            ": value",
            "Bad Name: v",
            "Name : v",
            "X: a\u{7f}b",
            "Content-Length: 3",
            "Transfer-Encoding: chunked",
        ] {
            assert!(parse_header(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn key_header_and_repeat() {
        let plan = |argv: &[&str]| args(argv).expect("parses").plan();
        let p = plan(&["http://h/"]).expect("plans");
        assert_eq!(p.key_header, idem::layer::IDEMPOTENCY_KEY);
        let p = plan(&["http://h/", "--key-header", "Webhook-Id"]).expect("plans");
        assert_eq!(p.key_header.as_str(), "webhook-id");
        assert!(p.describe().contains("in webhook-id"), "{}", p.describe());
        // The key header is set by --key; any other header by -H.
        let e = plan(&["http://h/", "-H", "Idempotency-Key: k"]).expect_err("refused");
        assert!(e.to_string().contains("--key"), "{e}");
        let e = plan(&[
            "http://h/",
            "--key-header",
            "webhook-id",
            "-H",
            "webhook-id: k",
        ]);
        assert!(e.is_err());
        let p = plan(&[
            "http://h/",
            "--key-header",
            "webhook-id",
            "-H",
            "Idempotency-Key: k",
        ]);
        assert_eq!(p.expect("plans").headers["idempotency-key"], "k");
        for bad in ["bad name", "content-length", "Host", ""] {
            let e = plan(&["http://h/", "--key-header", bad]).expect_err(bad);
            assert!(e.to_string().contains("bad key header"), "{e}");
        }

        let a = args(&["http://h/", "--repeat", "5"]).expect("parses");
        assert_eq!(a.repeat, 5);
        let p = a.plan().expect("plans");
        let (one, two) = (p.fresh_keys(), p.fresh_keys());
        assert!(matches!(&one.keys, Keys::One(k) if k.starts_with("race-")));
        assert_ne!(one.keys, two.keys, "a fresh key per run");
        assert_eq!(args(&["http://h/"]).expect("parses").repeat, 1);
        assert!(args(&["http://h/", "--repeat", "0"]).is_err());
        assert!(args(&["http://h/", "--repeat", "2", "--key", "k"]).is_err());
        assert!(args(&["http://h/", "--repeat", "2", "--duration", "1s"]).is_err());
        let p = plan(&["http://h/", "--repeat", "2", "--no-key"]).expect("plans");
        assert_eq!(p.fresh_keys().keys, Keys::None);
    }

    #[test]
    fn flags_build_the_plan() {
        let plan = args(&[
            "http://h/o",
            "-n",
            "7",
            "-X",
            "PATCH",
            "-d",
            "{}",
            "-H",
            "A: b",
        ])
        .expect("parses")
        .plan()
        .expect("plans");
        assert_eq!(plan.mode, Mode::Burst { requests: 7 });
        assert_eq!(plan.method, Method::PATCH);
        assert_eq!(plan.body, Bytes::from_static(b"{}"));
        assert_eq!(plan.headers["a"], "b");
        assert!(matches!(&plan.keys, Keys::One(k) if k.starts_with("race-")));
        let a = args(&["http://h/"]).expect("parses").plan().expect("plans");
        let b = args(&["http://h/"]).expect("parses").plan().expect("plans");
        assert_ne!(a.keys, b.keys, "the default key is random per run");
        assert_eq!(a.mode, Mode::Burst { requests: 100 });

        let p = args(&["http://h/", "--key", "k1"]).expect("parses").plan();
        assert_eq!(p.expect("plans").keys, Keys::One("k1".into()));
        let p = args(&["http://h/", "--no-key"]).expect("parses").plan();
        assert_eq!(p.expect("plans").keys, Keys::None);
        let p = args(&["http://h/", "--unique-keys"])
            .expect("parses")
            .plan();
        assert!(matches!(p.expect("plans").keys, Keys::Unique { .. }));

        let load = args(&["http://h/", "--duration", "2s", "--concurrency", "3"])
            .expect("parses")
            .plan()
            .expect("plans");
        assert_eq!(
            load.mode,
            Mode::Load {
                duration: Duration::from_secs(2),
                concurrency: 3
            }
        );
        let load = args(&["http://h/", "--duration", "500ms"])
            .expect("parses")
            .plan();
        assert!(matches!(
            load.expect("plans").mode,
            Mode::Load {
                concurrency: DEFAULT_CONCURRENCY,
                ..
            }
        ));
    }

    #[test]
    fn usage_errors() {
        // clap refuses these (clap's usage exit code is 2, like ours).
        for argv in [
            &["http://h/", "-n", "0"][..],
            &["http://h/", "-n", "10001"],
            &["http://h/", "--key", "a", "--no-key"],
            &["http://h/", "--unique-keys", "--no-key"],
            &["http://h/", "--concurrency", "4"],
            &["http://h/", "--duration", "10"],
            &["http://h/", "--duration", "0s"],
            &["http://h/", "-n", "5", "--duration", "1s"],
        ] {
            let e = args(argv).expect_err(&argv.join(" "));
            assert_eq!(e.exit_code(), 2, "{argv:?}");
        }
        // The plan refuses these.
        for (argv, why) in [
            (&["http://h/", "-X", "GE T"][..], "bad method"),
            (&["http://h/", "--key", "a b"], "bad key"),
            (&["http://h/", "--key", ""], "bad key"),
            (&["http://h/", "-H", "nocolon"], "bad header"),
            (
                &["http://h/", "-d", "@/nonexistent/idem-body"],
                "cannot read the body",
            ),
            (&["https://h/"], "https is not supported"),
            (&["http://h/", "--count-url", "h/count"], "full URL"),
        ] {
            let e = args(argv)
                .expect("parses")
                .plan()
                .expect_err(why)
                .to_string();
            assert!(e.contains(why), "{argv:?}: {e}");
        }
    }

    #[test]
    fn body_from_file() {
        let path = std::env::temp_dir().join(format!("idem-race-body-{}", std::process::id()));
        std::fs::write(&path, b"{\"from\":\"file\"}").expect("write");
        let arg = format!("@{}", path.display());
        let plan = args(&["http://h/", "-d", &arg]).expect("parses").plan();
        let _ = std::fs::remove_file(&path);
        assert_eq!(
            plan.expect("plans").body,
            Bytes::from_static(b"{\"from\":\"file\"}")
        );
    }

    #[test]
    fn too_many_files_says_what_to_do() {
        let e = RaceError::TooManyOpenFiles {
            needed: 10_000,
            limit: Some(1024),
        }
        .to_string();
        assert!(e.contains("ulimit -n is 1024"), "{e}");
        assert!(e.contains("ulimit -n 11024"), "{e}");
    }
}
