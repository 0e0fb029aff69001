//! The `idem` binary: start-up validation, `--check`, `--help` and logs.

#[path = "support/process.rs"]
mod process;
#[path = "../../idem/tests/conformance/services.rs"]
mod services;
mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

fn idem() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_idem"));
    for (k, _) in std::env::vars() {
        if k.starts_with("IDEM_") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn check_prints_the_plan_and_exits_zero() {
    let out = idem()
        .args(["serve", "--check", "--upstream", "http://127.0.0.1:3000"])
        .output()
        .expect("run idem");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("127.0.0.1:3000"), "{stdout}");
    assert!(stdout.contains("configuration OK"), "{stdout}");
}

#[test]
fn a_bad_config_file_is_refused_with_file_and_line() {
    let (path, out) =
        check_file("upstream = \"http://127.0.0.1:3000\"\n\n[defaults]\nconcurent = \"wait\"");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let expected = format!("{}:4:", path.display());
    assert!(
        stderr.contains(&expected),
        "wanted `{expected}` in: {stderr}"
    );
    assert!(stderr.contains("concurent"), "{stderr}");
}

#[test]
fn a_missing_upstream_says_how_to_give_one() {
    let out = idem()
        .args(["serve", "--check"])
        .output()
        .expect("run idem");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("--upstream"), "{stderr}");
}

#[test]
fn a_bad_flag_value_is_refused() {
    let out = idem()
        .args([
            "serve",
            "--check",
            "--upstream",
            "http://127.0.0.1:3000",
            "--listen",
            "nowhere",
        ])
        .output()
        .expect("run idem");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--listen"), "{stderr}");
}

/// Writes `toml` to a fresh file and runs `idem serve --check --config` on it.
fn check_file(toml: &str) -> (std::path::PathBuf, std::process::Output) {
    let (path, mut file) = tempfile();
    writeln!(file, "{toml}").expect("write");
    let out = idem()
        .args(["serve", "--check", "--config"])
        .arg(&path)
        .output()
        .expect("run idem");
    (path, out)
}

fn tempfile() -> (std::path::PathBuf, std::fs::File) {
    let path = std::env::temp_dir().join(format!("idem-cli-test-{:x}.toml", rand::random::<u64>()));
    let file = std::fs::File::create(&path).expect("create temp file");
    (path, file)
}

#[test]
fn check_describes_async_routes() {
    let (_, out) = check_file(
        "upstream = \"http://127.0.0.1:3000\"\n[[route]]\nmatch = \"POST /jobs/*\"\nmode = \"async\"\n\
         [limits]\nasync_workers = 8\nmax_pending = 500",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for needle in [
        "note: async mode (202 Accepted) on POST /jobs/*",
        "max_pending 500",
        "8 dispatcher workers on this instance",
        "async operations live in this process only and are lost on restart",
        "max_attempts          5",
        "retry_backoff         1s",
    ] {
        assert!(stdout.contains(needle), "`{needle}` missing:\n{stdout}");
    }
}

#[test]
fn check_writes_durations_as_the_docs_do() {
    let out = idem()
        .args(["serve", "--check", "--upstream", "http://127.0.0.1:3000"])
        .output()
        .expect("run idem");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let retention = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("retention"))
        .unwrap_or_else(|| panic!("no retention row in:\n{stdout}"));
    // README and protocol §12 write the default retention `24h`, never `1d`.
    assert_eq!(retention.split_whitespace().nth(1), Some("24h"), "{stdout}");
}

/// A loopback address where nothing listens: a port the kernel just gave
/// out and took back.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("addr").port()
}

fn check_with_store(store: &str, extra: &[&str]) -> std::process::Output {
    idem()
        .args(["serve", "--check", "--upstream", "http://127.0.0.1:3000"])
        .args(["--store", store])
        .args(extra)
        .output()
        .expect("run idem")
}

#[test]
fn check_refuses_a_store_that_does_not_answer() {
    let port = closed_port();
    for store in [
        format!("redis://127.0.0.1:{port}"),
        format!("postgres://idem:hunter2@127.0.0.1:{port}/idem"),
    ] {
        let out = check_with_store(&store, &[]);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(1), "{store}: {stdout}\n{stderr}");
        assert!(!stdout.contains("configuration OK"), "{store}: {stdout}");
        assert!(stderr.contains("cannot use the store"), "{store}: {stderr}");
        assert!(stderr.contains("--no-store-check"), "{store}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{store}: {stderr}");
    }
}

#[test]
fn no_store_check_checks_the_configuration_alone() {
    let out = check_with_store(
        &format!("redis://127.0.0.1:{}", closed_port()),
        &["--no-store-check"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("store check: skipped"), "{stdout}");
    assert!(stdout.contains("configuration OK"), "{stdout}");

    // Only with --check.
    let out = idem()
        .args([
            "serve",
            "--upstream",
            "http://127.0.0.1:3000",
            "--no-store-check",
        ])
        .output()
        .expect("run idem");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--check"));
}

#[tokio::test]
async fn check_connects_to_a_store_that_answers() {
    let redis = match process::PrivateRedis::start().await {
        Ok(redis) => redis,
        Err(e) => {
            services::unavailable::<()>("redis-server (private)", "PATH", &e);
            return;
        }
    };
    let out = check_with_store(&redis.url(), &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("store check: {} answered", redis.url())),
        "{stdout}"
    );
    assert!(stdout.contains("configuration OK"), "{stdout}");
}

#[test]
fn logs_written_to_a_pipe_carry_no_colour_codes() {
    let mut child = idem()
        .args(["serve", "--upstream", "http://127.0.0.1:3000"])
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run idem");
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut seen = String::new();
    // Up to the start-up line (or the end, if it never comes).
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("idem gateway listening") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen.contains("idem gateway listening"), "{seen}");
    assert!(
        !seen.contains('\x1b'),
        "ANSI escape codes in logs written to a pipe: {seen:?}"
    );
}

#[test]
fn serve_help_names_the_variable_of_every_flag_that_has_one() {
    let out = idem().args(["serve", "--help"]).output().expect("run idem");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{help}");
    let line_of = |flag: &str| {
        help.lines()
            .find(|l| l.trim_start().starts_with(&format!("{flag} <")))
            .unwrap_or_else(|| panic!("no {flag} in:\n{help}"))
    };
    let with_vars = idem_cli::config::SETTINGS
        .iter()
        .map(|s| (s.flag, s.var))
        .chain([("--config", "IDEM_CONFIG")]);
    for (flag, var) in with_vars {
        let line = line_of(flag);
        assert!(line.contains(&format!("[env: {var}]")), "{line}");
    }
    for var in ["IDEM_ADMIN_TOKEN", "IDEM_LOG", "IDEM_LOG_FORMAT"] {
        assert!(help.contains(var), "{var} missing from:\n{help}");
    }
    assert!(help.contains("--no-store-check"), "{help}");
}

#[test]
fn idem_config_names_the_file() {
    let (path, mut file) = tempfile();
    writeln!(file, "upstream = \"http://127.0.0.1:3000\"").expect("write");
    let out = idem()
        .args(["serve", "--check"])
        .env("IDEM_CONFIG", &path)
        .output()
        .expect("run idem");
    let _ = std::fs::remove_file(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("config file:   {}", path.display())),
        "{stdout}"
    );
}

/// `--check` against PostgreSQL looks and creates nothing (before, it ran
/// the migration: checking a fresh database created the `idem` schema).
#[tokio::test]
async fn check_creates_nothing_in_postgres() {
    let url = services::database_url();
    let Ok(admin) = sqlx::PgPool::connect(&url).await else {
        services::unavailable::<()>("PostgreSQL", &url, &"connect failed");
        return;
    };
    // A database of its own, so the default schema name is free.
    let db = format!("idem_check_{:016x}", rand::random::<u64>());
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&admin)
        .await
        .expect("create database");
    let (base, query) = url
        .split_once('?')
        .map_or((url.as_str(), ""), |(b, q)| (b, q));
    let base = base.rsplit_once('/').map_or(base, |(b, _)| b);
    let store = if query.is_empty() {
        format!("{base}/{db}")
    } else {
        format!("{base}/{db}?{query}")
    };
    let out = check_with_store(&store, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let fresh = sqlx::PgPool::connect(&store)
        .await
        .expect("connect to the new database");
    let schemas: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.schemata WHERE schema_name = 'idem'",
    )
    .fetch_one(&fresh)
    .await
    .expect("query");
    fresh.close().await;
    let _ = sqlx::query(&format!("DROP DATABASE {db}"))
        .execute(&admin)
        .await;
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("store check:"), "{stdout}");
    assert_eq!(schemas, 0, "--check created the idem schema: {stdout}");
}
