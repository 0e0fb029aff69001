//! The `idem` binary: start-up validation and `--check`.

use std::io::Write;
use std::process::Command;

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
fn check_says_async_routes_are_served_synchronously() {
    let (_, out) = check_file(
        "upstream = \"http://127.0.0.1:3000\"\n[[route]]\nmatch = \"POST /jobs/*\"\nmode = \"async\"",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("note: route /jobs/*: mode = \"async\" is not available yet"),
        "{stdout}"
    );
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
    // README and SPEC §12 write the default retention `24h`, never `1d`.
    assert_eq!(retention.split_whitespace().nth(1), Some("24h"), "{stdout}");
}
