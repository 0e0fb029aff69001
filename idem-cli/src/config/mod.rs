//! Configuration of `idem serve` (protocol §11, §12): the TOML file, the
//! `IDEM_*` environment variables and the command-line flags, merged and
//! validated before anything starts — or a [`Config`] built in code.
//!
//! Precedence, highest first: flags, environment, file, built-in defaults.
//! An empty environment variable counts as unset. Every problem names where
//! it is: `idem.toml:7: reason`, `environment variable IDEM_LISTEN: reason`
//! or `--listen: reason`.
//!
//! # Layout
//!
//! - this module: the model ([`Config`], [`Limits`], [`StoreSpec`],
//!   [`Overrides`], [`ConfigError`]) and the in-code builder;
//! - `file`: the TOML file's shape (every table refuses unknown keys) and
//!   what its tables mean for routes and limits;
//! - `source`: [`load`] / [`load_str`], the layering of file, `IDEM_*` and
//!   flags, and error locations (`file:line`, did-you-mean);
//! - `parse`: the value parsers (addresses, upstream, store, methods,
//!   headers, JSON pointers, policy names);
//! - `describe`: what `idem serve --check` prints, never a secret.
//!
//! Durations and sizes are read and written by [`crate::units`].
//!
//! # The file
//!
//! ```toml
//! listen = "127.0.0.1:8080"          # IDEM_LISTEN, --listen
//! upstream = "http://127.0.0.1:3000" # IDEM_UPSTREAM, --upstream (required somewhere)
//! store = "memory"                   # IDEM_STORE, --store: memory | redis://… | postgres://…
//! admin_listen = "127.0.0.1:9090"    # IDEM_ADMIN_LISTEN, --admin-listen
//!
//! [defaults]   # the policy of unmatched requests; every [[route]] starts from it
//! lease = "30s"
//!
//! [[route]]    # first match wins
//! match = "POST /payments/*"
//! concurrent = "wait"
//!
//! [limits]
//! store_timeout = "2s"
//! ```
//!
//! - Durations are strings with a unit (`"500ms"`, `"30s"`, `"1h30m"`, `"7d"`);
//!   a bare number is refused. Sizes are strings (`"1MiB"`, `"10kB"`) or
//!   integers (bytes).
//! - Every table refuses unknown keys, so a typo is an error, not a default.
//! - `admin_token` is never read from the file (it would end up in version
//!   control): it comes only from `IDEM_ADMIN_TOKEN`, and a file that sets it
//!   is refused.
//! - `methods = []` is allowed: no method participates, so requests matching
//!   that route pass through untouched (unless its `match` names a method,
//!   which always participates). Use it to exempt paths.
//! - `mode = "async"` answers 202 Accepted and dispatches in the
//!   background (protocol §9); `max_attempts` (1–1000) and `retry_backoff`
//!   shape its retries, `[limits] async_workers` (0 = accept-only) and
//!   `max_pending` bound it.
//! - `lease`, `wait_timeout`, `upstream_timeout`, `retention`,
//!   `dedupe_window` and `max_body` must be greater than zero.
//! - Every `lease` (in `[defaults]` and each route) must be at least
//!   3 × `store_timeout`: the heartbeat renews a lease every third of it,
//!   and each renewal may take up to `store_timeout`.
//! - `idle_timeout` may not be longer than `request_read_timeout`.
//! - `IDEM_ADMIN_TOKEN` must be at least [`MIN_ADMIN_TOKEN_BYTES`] long.
//!
//! # In code
//!
//! ```
//! use std::time::Duration;
//! use idem::policy::{Concurrent, RoutePolicy, RouteTable};
//! use idem_cli::config::{Config, Limits};
//!
//! let mut policy = RoutePolicy::default();
//! policy.concurrent = Concurrent::Wait;
//! let config = Config::new("http://127.0.0.1:3000".parse().unwrap())
//!     .listen("127.0.0.1:0".parse().unwrap())
//!     .routes(RouteTable::new(policy))
//!     .limits(Limits {
//!         shutdown_grace: Duration::from_secs(2),
//!         ..Limits::default()
//!     });
//! assert!(config.describe().contains("concurrent            wait"));
//! ```

mod describe;
mod file;
mod parse;
mod source;
#[cfg(test)]
mod tests;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use http::Uri;
use idem::policy::{RoutePolicy, RouteTable};
use idem::store::StoreUrl;

use crate::units::{format_duration, MIB};

pub use source::{load, load_str, Setting, SETTINGS};

/// The shortest admin token accepted: 16 bytes (e.g. `openssl rand -hex 16`
/// gives 32). A shorter one can be guessed by whoever reaches the admin port.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 16;

/// How many times `store_timeout` a lease must last at least: the heartbeat
/// renews it every third of the lease, and a renewal may take up to
/// `store_timeout`, so a shorter lease can lapse under a slow (not even
/// failing) store while its holder still works — and a second execution
/// takes the key over.
pub const LEASE_PER_STORE_TIMEOUT: u32 = 3;

/// Where the gateway listens unless told otherwise.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));

/// Values given on the command line (None = not given). The CLI's clap struct fills this.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen ADDR`.
    pub listen: Option<String>,
    /// `--upstream URL`.
    pub upstream: Option<String>,
    /// `--store STORE`.
    pub store: Option<String>,
    /// `--admin-listen ADDR`.
    pub admin_listen: Option<String>,
    /// `--tls-cert FILE`.
    pub tls_cert: Option<String>,
    /// `--tls-key FILE`.
    pub tls_key: Option<String>,
    /// `--upstream-ca FILE`.
    pub upstream_ca: Option<String>,
    /// `--store-ca FILE`.
    pub store_ca: Option<String>,
}

/// The fully validated configuration: from [`load`], or built in code with
/// [`Config::new`] and the setters below.
///
/// `Debug` redacts the admin token and any password in the store URL.
#[derive(Clone)]
pub struct Config {
    /// Where the gateway listens (default `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// The upstream: `http://host:port`, without path or query.
    pub upstream: Uri,
    /// The record store (default memory).
    pub store: StoreSpec,
    /// Where the admin listener listens; `None` = no admin listener.
    pub admin_listen: Option<SocketAddr>,
    /// The admin bearer token, from `IDEM_ADMIN_TOKEN` only (never the file).
    pub admin_token: Option<String>,
    /// Per-route policies, first match wins; unmatched requests use `[defaults]`.
    pub routes: RouteTable,
    /// Resource limits and timeouts (`[limits]`).
    pub limits: Limits,
    /// TLS files (protocol §14): the listener's certificate and key, and
    /// the CAs trusted for the upstream and the store.
    pub tls: TlsFiles,
    /// The config file used, if any.
    pub source: Option<PathBuf>,
}

/// TLS files (protocol §14). Paths in the file are relative to the file's
/// directory; from a flag or a variable, to the working directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// `tls_cert`: the listener's certificate chain (PEM, leaf first).
    /// With `key`, the listener speaks TLS (ALPN `h2`, `http/1.1`).
    pub cert: Option<PathBuf>,
    /// `tls_key`: the listener's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// `upstream_ca`: CA certificates (PEM) trusted for an `https://`
    /// upstream, besides the system's roots.
    pub upstream_ca: Option<PathBuf>,
    /// `store_ca`: CA certificates (PEM) trusted for a `rediss://` store
    /// (in place of the system's roots) or PostgreSQL (when the URL names
    /// no `sslrootcert`).
    pub store_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Whether the listener terminates TLS.
    #[must_use]
    pub fn listener(&self) -> bool {
        self.cert.is_some() && self.key.is_some()
    }
}

impl Config {
    /// The built-in defaults in front of `upstream` (`http://host:port`):
    /// listen on [`DEFAULT_LISTEN`], the memory store, no admin listener,
    /// the default policy for every request, default [`Limits`]. What a file
    /// holding only `upstream = "…"` gives.
    #[must_use]
    pub fn new(upstream: Uri) -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            upstream,
            store: StoreSpec::Memory,
            admin_listen: None,
            admin_token: None,
            routes: RouteTable::new(RoutePolicy::default()),
            limits: Limits::default(),
            tls: TlsFiles::default(),
            source: None,
        }
    }

    /// Uses the TLS files `tls` (see [`TlsFiles`]).
    #[must_use]
    pub fn tls(mut self, tls: TlsFiles) -> Self {
        self.tls = tls;
        self
    }

    /// Listens on `addr` (port 0: any free port, see `Gateway::local_addr`).
    #[must_use]
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Keeps the records in `store`.
    #[must_use]
    pub fn store(mut self, store: StoreSpec) -> Self {
        self.store = store;
        self
    }

    /// Serves the admin listener on `addr`, guarded by the bearer `token`
    /// (the two go together: the listener can read and purge records).
    #[must_use]
    pub fn admin(mut self, addr: SocketAddr, token: impl Into<String>) -> Self {
        self.admin_listen = Some(addr);
        self.admin_token = Some(token.into());
        self
    }

    /// Uses `routes`: per-route policies and the default policy.
    #[must_use]
    pub fn routes(mut self, routes: RouteTable) -> Self {
        self.routes = routes;
        self
    }

    /// Uses `limits`.
    #[must_use]
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The checks [`load`] makes across values, for a configuration built
    /// in code (`Gateway::start` runs it): every lease at least
    /// [`LEASE_PER_STORE_TIMEOUT`] × `store_timeout`, and an admin token of
    /// at least [`MIN_ADMIN_TOKEN_BYTES`].
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] naming the first rule broken.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let store_timeout = self.limits.store_timeout;
        let policies = std::iter::once(("[defaults]".to_owned(), self.routes.default_policy()))
            .chain(
                self.routes
                    .routes()
                    .iter()
                    .map(|r| (format!("route {}", r.path.as_str()), &r.policy)),
            );
        for (name, policy) in policies {
            if let Some(reason) = lease_too_short(policy.lease, store_timeout) {
                return Err(ConfigError::Invalid {
                    reason: format!("{name}: {reason}"),
                });
            }
        }
        if let Some(token) = &self.admin_token {
            if let Some(reason) = token_too_short(token) {
                return Err(ConfigError::Invalid { reason });
            }
        }
        if self.accepts_what_nothing_dispatches() {
            return Err(ConfigError::Invalid {
                reason: ACCEPT_ONLY_ON_MEMORY.to_owned(),
            });
        }
        if let Some(reason) = half_a_pair(&self.tls) {
            return Err(ConfigError::Invalid { reason });
        }
        Ok(())
    }

    /// Async routes on the memory store with no dispatcher: nothing could
    /// ever run what this instance accepts.
    fn accepts_what_nothing_dispatches(&self) -> bool {
        let any_async = std::iter::once(self.routes.default_policy())
            .chain(self.routes.routes().iter().map(|r| &r.policy))
            .any(|p| p.mode == idem::policy::Mode::Async);
        any_async && self.limits.async_workers == 0 && self.store == StoreSpec::Memory
    }
}

/// Why `tls_cert` without `tls_key` (or the reverse) is refused, if so.
fn half_a_pair(tls: &TlsFiles) -> Option<String> {
    match (&tls.cert, &tls.key) {
        (Some(_), None) => Some(
            "tls_cert is set but tls_key is not: the listener needs both to speak TLS".to_owned(),
        ),
        (None, Some(_)) => Some(
            "tls_key is set but tls_cert is not: the listener needs both to speak TLS".to_owned(),
        ),
        _ => None,
    }
}

/// Why an accept-only instance on the memory store is refused.
const ACCEPT_ONLY_ON_MEMORY: &str = "[limits] async_workers = 0 with the memory store: this \
    instance would accept async operations that nothing could ever dispatch (no other process \
    can reach them); give it workers, or use a shared store (redis://, postgres://)";

/// Why `lease` is too short for `store_timeout`, if it is.
fn lease_too_short(lease: Duration, store_timeout: Duration) -> Option<String> {
    let least = store_timeout.saturating_mul(LEASE_PER_STORE_TIMEOUT);
    (lease < least).then(|| {
        format!(
            "lease {} is shorter than {LEASE_PER_STORE_TIMEOUT} × store_timeout ({}): the \
             heartbeat renews the lease every third of it and each renewal may take up to \
             store_timeout, so a slow store would let the lease lapse while the request still \
             runs, and a retry would execute it again; use a lease of at least {} or a \
             shorter store_timeout",
            format_duration(lease),
            format_duration(store_timeout),
            format_duration(least),
        )
    })
}

/// Why an admin token is too short, if it is (never the token itself).
fn token_too_short(token: &str) -> Option<String> {
    (token.len() < MIN_ADMIN_TOKEN_BYTES).then(|| {
        format!(
            "the admin token is shorter than {MIN_ADMIN_TOKEN_BYTES} bytes; use at least \
             {MIN_ADMIN_TOKEN_BYTES} random characters (e.g. `openssl rand -hex 16`): a short \
             token can be guessed by whoever reaches the admin listener"
        )
    })
}

/// Which store keeps the records (protocol §7). Parsed from `memory`,
/// `redis://…` / `rediss://…` (several nodes: a Redis Cluster) or
/// `postgres://…` / `postgresql://…` by [`idem::store::StoreUrl`], which
/// also opens it ([`idem::store::AnyStore::connect_to`]).
///
/// `Display` and `Debug` show any password in the URL as `***`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// The in-process store (one instance; lost on restart).
    Memory,
    /// Redis or a Redis Cluster.
    Redis(StoreUrl),
    /// PostgreSQL.
    Postgres(StoreUrl),
}

/// Resource limits and timeouts: the TOML table `[limits]`, every field optional.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Timeout of every store call (default 2s).
    pub store_timeout: Duration,
    /// How long a client has to send headers and body (default 10s).
    pub request_read_timeout: Duration,
    /// Total request header size (default 64KiB; at least 8KiB).
    pub max_header_bytes: usize,
    /// Concurrent streams (requests) on one HTTP/2 connection (default 256).
    pub max_concurrent_streams: u32,
    /// Concurrent client connections (default 10 000). A connection takes
    /// one only once its first byte arrives; as many again may wait for
    /// their first byte, and past that the oldest waiting is closed.
    pub max_connections: usize,
    /// How long a new connection may stay silent before its first byte
    /// (default 5s; the gateway never waits longer than
    /// `request_read_timeout`).
    pub idle_timeout: Duration,
    /// In-process cache of completed records, in bytes (default 64MiB; 0 disables).
    pub local_cache_bytes: u64,
    /// Memory store bound on records (default 1 000 000).
    pub memory_max_entries: usize,
    /// Memory store bound on bytes (default 512MiB).
    pub memory_max_bytes: u64,
    /// How long graceful shutdown waits for in-flight requests (default 30s).
    pub shutdown_grace: Duration,
    /// Async mode: dispatcher tasks on this instance (default 64; 0 makes an
    /// accept-only instance that answers 202s and status requests while
    /// other instances dispatch).
    pub async_workers: usize,
    /// Threads serving connections, each with its own runtime, accepting
    /// on the listening socket and keeping its own upstream pool (default
    /// 0: one per CPU the process may use).
    pub threads: usize,
    /// Async mode: most operations pending or running in the store
    /// (default 100 000); beyond, 503 `idempotency_queue_full`.
    pub max_pending: u64,
    /// How long a failing `complete` (the answer could not be stored) is
    /// retried before the client gets its answer anyway and the key stays
    /// held until its lease ends (default 5s; never past the lease).
    pub complete_retry: Duration,
}

impl Limits {
    /// The threads that serve connections: `threads`, or one per CPU the
    /// process may use when it is 0.
    #[must_use]
    pub fn io_threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            n => n,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            store_timeout: Duration::from_secs(2),
            request_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_concurrent_streams: 256,
            max_connections: 10_000,
            idle_timeout: Duration::from_secs(5),
            local_cache_bytes: 64 * MIB,
            memory_max_entries: 1_000_000,
            memory_max_bytes: 512 * MIB,
            shutdown_grace: Duration::from_secs(30),
            async_workers: 64,
            threads: 0,
            max_pending: idem::layer::DEFAULT_MAX_PENDING,
            complete_retry: Duration::from_secs(5),
        }
    }
}

/// Why a configuration was refused. `Display` says where and why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file could not be read: `<file>: <io error>`.
    #[error("{}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A problem in the configuration file: `<file>:<line>: <reason>`.
    #[error("{}: {reason}", located(.file, *.line))]
    File {
        /// The file's name as given.
        file: String,
        /// 1-based line of the offending key or value (`None` if unknown).
        line: Option<usize>,
        /// What is wrong, and how to fix it.
        reason: String,
    },
    /// A bad `IDEM_*` environment variable: `environment variable IDEM_X: <reason>`.
    #[error("environment variable {var}: {reason}")]
    Env {
        /// The variable, e.g. `IDEM_LISTEN`.
        var: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A bad command-line flag: `--flag: <reason>`.
    #[error("{flag}: {reason}")]
    Flag {
        /// The flag, e.g. `--listen`.
        flag: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A configuration built in code breaks a rule that [`load`] enforces
    /// for files (see [`Config::validate`]).
    #[error("invalid configuration: {reason}")]
    Invalid {
        /// Which rule, and how to fix it.
        reason: String,
    },
    /// No upstream anywhere.
    #[error(
        "no upstream given: use --upstream URL, the environment variable IDEM_UPSTREAM, \
         or `upstream = \"http://host:port\"` in the config file"
    )]
    MissingUpstream,
}

fn located(file: &str, line: Option<usize>) -> String {
    match line {
        Some(line) => format!("{file}:{line}"),
        None => file.to_owned(),
    }
}
