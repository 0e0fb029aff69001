//! The `idem` command line: `idem serve` (the gateway), `idem race` (the
//! duplicate prober) and `idem demo`.
//!
//! `main` is thin; [`run`] does the work so tests can drive it in-process.
//!
//! # Layout
//!
//! - [`config`]: the TOML file, `IDEM_*` variables and flags → [`config::Config`];
//! - [`gateway`]: `idem serve`, the reverse proxy;
//! - [`race`]: `idem race`, N requests released together, and what came back;
//! - [`demo`]: `idem demo`, a naive service raced without and behind the gateway;
//! - [`telemetry`]: logs, and trace export over OTLP when `OTEL_*` asks for it;
//! - [`units`]: durations and sizes (`30s`, `1MiB`), read and written.

pub mod config;
pub mod demo;
pub mod gateway;
pub mod race;
pub mod telemetry;
pub mod units;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, Overrides, StoreSpec};
use crate::gateway::Gateway;
use crate::race::RaceArgs;

/// idem: make non-idempotent HTTP operations safe to retry and safe to race.
#[derive(Debug, Parser)]
#[command(name = "idem", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the idempotency gateway in front of an HTTP service.
    Serve(ServeArgs),
    /// Fire N identical requests at once and report duplicates (exit 1 if any).
    Race(RaceArgs),
    /// Show duplicates on a naive service, then gone behind the gateway.
    Demo,
}

/// `idem serve` flags (protocol §12). Flags override `IDEM_*` variables, which
/// override the config file, which overrides the built-in defaults.
///
/// Only `--config` is read from its variable by clap; the others are read by
/// [`config::load`], which names the variable when its value is refused.
/// Each help line names its variable, as [`config::SETTINGS`] does.
#[derive(Debug, Args)]
#[command(
    after_help = "Also from the environment: IDEM_ADMIN_TOKEN (the admin bearer token; \
never from the file or a flag), IDEM_LOG (log filter, default info), \
IDEM_LOG_FORMAT=json (JSON log lines)."
)]
pub struct ServeArgs {
    /// The service to protect, e.g. http://127.0.0.1:3000 [env: IDEM_UPSTREAM]
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,
    /// Address to listen on [default: 127.0.0.1:8080] [env: IDEM_LISTEN]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// memory (default), redis://host:port[/db] or postgres://user@host:port/db [env: IDEM_STORE]
    #[arg(long, value_name = "STORE")]
    pub store: Option<String>,
    /// TOML configuration file
    #[arg(long, value_name = "FILE", env = "IDEM_CONFIG", hide_env_values = true)]
    pub config: Option<PathBuf>,
    /// Address of the admin listener (token from IDEM_ADMIN_TOKEN) [env: IDEM_ADMIN_LISTEN]
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// The listener's certificate chain (PEM); with --tls-key, the listener speaks TLS [env: IDEM_TLS_CERT]
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<String>,
    /// The listener's private key (PEM) [env: IDEM_TLS_KEY]
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<String>,
    /// CA certificates (PEM) trusted for an https:// upstream, besides the system's [env: IDEM_UPSTREAM_CA]
    #[arg(long, value_name = "FILE")]
    pub upstream_ca: Option<String>,
    /// CA certificates (PEM) trusted for a rediss:// or PostgreSQL store [env: IDEM_STORE_CA]
    #[arg(long, value_name = "FILE")]
    pub store_ca: Option<String>,
    /// Validate the configuration, connect to the store (then let it go),
    /// print what would run, and exit: 0 if `idem serve` would start, 2 for
    /// a bad configuration, 1 for a store that does not answer.
    #[arg(long)]
    pub check: bool,
    /// With --check: do not connect to the store, check the configuration alone.
    #[arg(long, requires = "check")]
    pub no_store_check: bool,
}

/// Parses the command line, sets up a runtime and logging (and trace
/// export), and runs.
#[must_use]
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("idem: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Only the gateway logs; the race and the demo print their own reports,
    // and the demo's in-process gateway must not add log lines to them.
    let telemetry = if matches!(cli.command, Command::Serve(_)) {
        match telemetry::Telemetry::init(runtime.handle()) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("idem: configuration refused: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let code = runtime.block_on(run(cli));
    // While the runtime still runs: the last spans go out on it.
    if let Some(t) = telemetry {
        t.shutdown();
    }
    code
}

/// Runs a parsed command line to completion.
pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Race(args) => race::command(args).await,
        Command::Demo => demo::command().await,
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    let flags = Overrides {
        listen: args.listen,
        upstream: args.upstream,
        store: args.store,
        admin_listen: args.admin_listen,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        upstream_ca: args.upstream_ca,
        store_ca: args.store_ca,
    };
    let env = |name: &str| std::env::var(name).ok();
    let config = match config::load(args.config.as_deref(), &env, &flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("idem: configuration refused: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        return check(&config, !args.no_store_check).await;
    }
    let gateway = match Gateway::start(config).await {
        Ok(g) => g,
        Err(e) => {
            eprintln!("idem: {e}");
            return ExitCode::FAILURE;
        }
    };
    match gateway.run_until(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("idem: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `idem serve --check`: print the plan, then prove the store answers
/// (unless told not to), so that "configuration OK" includes the store.
async fn check(config: &Config, connect_to_store: bool) -> ExitCode {
    println!("{}", config.describe());
    for note in gateway::dispatch::describe(config) {
        println!("note: {}", note.text);
    }
    match gateway::tls::check_files(&config.tls) {
        Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
        Err(e) => {
            eprintln!("idem: configuration refused: TLS: {e}");
            return ExitCode::from(2);
        }
    }
    if !connect_to_store {
        println!("store check: skipped (--no-store-check)");
    } else if config.store != StoreSpec::Memory {
        match gateway::check_store(config).await {
            Ok(what) => println!("store check: {} {what}", config.store),
            Err(e) => {
                eprintln!("idem: {e}");
                eprintln!(
                    "idem: the configuration is valid but the store does not answer; \
                     --no-store-check checks the configuration alone"
                );
                return ExitCode::FAILURE;
            }
        }
    }
    println!("configuration OK");
    ExitCode::SUCCESS
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
