//! A `redis-server` of the test's own, on a free port and in a scratch
//! directory: stopped (SIGKILL, through its own handle) and restarted on
//! the same port at will, killed on drop. Only this process is ever
//! stopped; the shared servers are never touched.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::services;

const START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct PrivateRedis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl PrivateRedis {
    /// A port nobody listens on right now.
    pub fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    /// Starts one on a free port, or `None` (skipped loudly) when
    /// `redis-server` cannot be run.
    pub async fn start() -> Option<Self> {
        Self::start_on(Self::free_port()).await
    }

    /// Starts one on `port`, or `None` as [`start`](Self::start).
    pub async fn start_on(port: u16) -> Option<Self> {
        let dir =
            std::env::temp_dir().join(format!("idem-redis-{port}-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut me = Self {
            child: None,
            port,
            dir,
        };
        match me.restart().await {
            Ok(()) => Some(me),
            Err(e) => services::unavailable("redis-server (binary)", "PATH", &e),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// (Re)starts the server on its port, empty (no persistence), and
    /// returns once it accepts connections.
    pub async fn restart(&mut self) -> Result<(), String> {
        self.stop();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run redis-server: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            if let Some(status) = self.exited() {
                return Err(format!(
                    "redis-server on port {} exited at start-up ({status})",
                    self.port
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("redis-server on port {} did not start", self.port));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
