//! `idem serve` as a process, with chosen environment variables (the
//! tracing and dashboard tests). Killed through its own handle on drop.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One `idem serve`, memory store, killed on drop.
pub struct Serve {
    child: Child,
    /// The proxy's address.
    pub addr: SocketAddr,
    /// The admin listener's, if started with one.
    pub admin: Option<SocketAddr>,
    log: std::path::PathBuf,
}

impl Serve {
    /// Starts `idem serve` in front of `upstream` with `env` (and no other
    /// `OTEL_*` variable), with an admin listener if `admin_token` is
    /// given, and returns once it accepts connections.
    pub async fn start(upstream: &str, env: &[(&str, String)], admin_token: Option<&str>) -> Self {
        let log = std::env::temp_dir().join(format!(
            "idem-tracing-{}-{:016x}.log",
            std::process::id(),
            rand::random::<u64>()
        ));
        for _ in 0..5 {
            let port = {
                let l = StdListener::bind("127.0.0.1:0").expect("a free port");
                l.local_addr().expect("addr").port()
            };
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let admin = admin_token.map(|_| {
                let l = StdListener::bind("127.0.0.1:0").expect("a free port");
                l.local_addr().expect("addr")
            });
            let stderr = std::fs::File::create(&log).expect("log file");
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_idem"));
            cmd.args(["serve", "--store", "memory", "--upstream", upstream])
                .args(["--listen", &addr.to_string()])
                .env("IDEM_LOG", "info")
                .env_remove("IDEM_CONFIG")
                .env_remove("IDEM_ADMIN_LISTEN");
            for (k, _) in std::env::vars() {
                if k.starts_with("OTEL_") {
                    cmd.env_remove(k);
                }
            }
            if let (Some(admin), Some(token)) = (admin, admin_token) {
                cmd.args(["--admin-listen", &admin.to_string()])
                    .env("IDEM_ADMIN_TOKEN", token);
            }
            for (k, v) in env {
                cmd.env(k, v);
            }
            let child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("spawn idem serve");
            let mut s = Serve {
                child,
                addr,
                admin,
                log: log.clone(),
            };
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if s.child.try_wait().expect("try_wait").is_some() {
                    break;
                }
                // A connection, not a request: a request would reach the
                // upstream, whose calls the tests count.
                let admin_up = match admin {
                    Some(a) => tokio::net::TcpStream::connect(a).await.is_ok(),
                    None => true,
                };
                if admin_up && tokio::net::TcpStream::connect(addr).await.is_ok() {
                    return s;
                }
                assert!(Instant::now() < deadline, "not up:\n{}", s.log());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(
                s.log().contains("cannot listen on"),
                "idem serve exited:\n{}",
                s.log()
            );
        }
        panic!("no free port after 5 attempts");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM (a clean shutdown, which flushes the spans), then waits.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().expect("try_wait").is_none() {
            assert!(Instant::now() < deadline, "idem serve did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}
