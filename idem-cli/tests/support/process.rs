//! Real processes for the multi-instance tests: `idem serve` gateways and a
//! private `redis-server`. Every child is killed through its own handle
//! (on drop at the latest), never by name, so tests run in parallel with
//! the rest of the suite and with each other.
#![allow(dead_code)]

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{client, try_send};

/// How long a gateway (or a private server) may take to come up on a
/// loaded machine before the test gives up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A scratch directory under the system temp dir, removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "idem-{tag}-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Ports that were free a moment ago, all different. Another process may
/// take one before the caller binds it: callers retry on a bind failure.
pub fn free_ports<const N: usize>() -> [u16; N] {
    // Hold every listener until all are picked, so the kernel cannot hand
    // out the same port twice.
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().expect("addr").port())
}

/// One `idem serve` process, SIGKILLed on drop.
pub struct GatewayProcess {
    child: Child,
    name: String,
    addr: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

enum Start {
    Ready,
    /// A port we picked was taken meanwhile: pick others.
    PortTaken,
}

impl GatewayProcess {
    /// Starts `idem serve --config <dir>/<name>.toml` in front of `upstream`
    /// with `store`, on free ports, with an admin listener, and returns once
    /// its admin listener says it is ready. `toml` holds the per-route
    /// settings. Logs go to `<dir>/<name>.log` (printed on failure).
    pub async fn start(dir: &Path, name: &str, upstream: &str, store: &str, toml: &str) -> Self {
        Self::start_logging(dir, name, upstream, store, toml, "info").await
    }

    /// [`start`](Self::start) with `IDEM_LOG` set to `filter`.
    pub async fn start_logging(
        dir: &Path,
        name: &str,
        upstream: &str,
        store: &str,
        toml: &str,
        filter: &str,
    ) -> Self {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, toml).expect("write gateway config");
        let log = dir.join(format!("{name}.log"));
        for _ in 0..5 {
            let [port, admin_port] = free_ports::<2>();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
            // A token of its own: a 200 from `/metrics` proves that the
            // admin port is THIS process's (it binds the main port first).
            let token = format!("{:032x}", rand::random::<u128>());
            let stderr = File::options()
                .create(true)
                .append(true)
                .open(&log)
                .expect("open gateway log");
            let child = Command::new(env!("CARGO_BIN_EXE_idem"))
                .arg("serve")
                .arg("--config")
                .arg(&config)
                .args(["--listen", &addr.to_string()])
                .args(["--admin-listen", &admin.to_string()])
                .args(["--upstream", upstream])
                .args(["--store", store])
                .env("IDEM_ADMIN_TOKEN", &token)
                .env("IDEM_LOG", filter)
                .env_remove("IDEM_LOG_FORMAT")
                .env_remove("IDEM_CONFIG")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("spawn idem serve");
            let mut gw = Self {
                child,
                name: name.to_owned(),
                addr,
                admin,
                log: log.clone(),
            };
            match gw.wait_started(&token).await {
                Start::Ready => return gw,
                Start::PortTaken => continue,
            }
        }
        panic!("gateway {name}: no free ports after 5 attempts");
    }

    async fn wait_started(&mut self, token: &str) -> Start {
        let c = client();
        let bearer = format!("Bearer {token}");
        let auth = [("authorization", bearer.as_str())];
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                let log = self.log();
                if log.contains("cannot listen on") {
                    return Start::PortTaken;
                }
                panic!(
                    "gateway {} exited at start-up ({status}):\n{log}",
                    self.name
                );
            }
            if let Ok(r) = try_send(&c, self.admin, "GET", "/metrics", &auth, "").await {
                if r.status == 200 && self.readyz().await == Some(200) {
                    return Start::Ready;
                }
            }
            assert!(
                Instant::now() < deadline,
                "gateway {} not ready after {START_TIMEOUT:?}:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener's address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The status of `GET /readyz`, or `None` when the admin listener does
    /// not answer.
    pub async fn readyz(&self) -> Option<u16> {
        try_send(&client(), self.admin, "GET", "/readyz", &[], "")
            .await
            .ok()
            .map(|r| r.status)
    }

    /// Polls `/readyz` until it answers `status`.
    pub async fn wait_readyz(&self, status: u16, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let now = self.readyz().await;
            if now == Some(status) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gateway {}: /readyz is {now:?}, not {status}, after {within:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL (`Child::kill` on Unix): no shutdown, no clean-up, exactly
    /// like a crashed instance. Waits for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id (to send it a signal).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `redis-server` this test started on its own port; stopped (by its
/// handle) and restarted on the same port at will, killed on drop.
pub struct PrivateRedis {
    child: Option<Child>,
    port: u16,
}

impl PrivateRedis {
    /// Starts one on a free port; `Err` when redis-server cannot be run.
    pub async fn start() -> Result<Self, String> {
        let [port] = free_ports::<1>();
        let mut me = Self { child: None, port };
        me.restart().await?;
        Ok(me)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// (Re)starts the server on its port, empty (no persistence).
    pub async fn restart(&mut self) -> Result<(), String> {
        self.stop();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
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
        // Something answered: make sure it is ours, not a process that took
        // the port while ours was down.
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(status) = self.exited() {
            return Err(format!(
                "redis-server on port {} exited at start-up ({status}); port taken?",
                self.port
            ));
        }
        Ok(())
    }
}

impl PrivateRedis {
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A store server this test owns and may stop and restart under a running
/// gateway.
pub trait PrivateStore {
    /// The `--store` URL.
    fn url(&self) -> String;
    /// Stops the server abruptly; returns once it is gone.
    fn stop(&mut self);
    /// Starts it again on the same port.
    fn restart(&mut self) -> impl std::future::Future<Output = Result<(), String>>;
}

impl PrivateStore for PrivateRedis {
    fn url(&self) -> String {
        PrivateRedis::url(self)
    }
    fn stop(&mut self) {
        PrivateRedis::stop(self);
    }
    async fn restart(&mut self) -> Result<(), String> {
        PrivateRedis::restart(self).await
    }
}

/// A PostgreSQL cluster of its own: `initdb` into a scratch directory, then
/// `pg_ctl start` / `pg_ctl stop -m immediate` (a crash, as far as clients
/// can tell) on a free port. `pg_ctl` addresses the server by its data
/// directory, so only this server is ever stopped. As root, the binaries
/// run as the `postgres` user (PostgreSQL refuses to run as root).
pub struct PrivatePostgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    running: bool,
}

impl PrivatePostgres {
    /// `initdb` and start; `Err` when the PostgreSQL binaries are missing or
    /// fail.
    pub async fn start() -> Result<Self, String> {
        let bin = Self::bin_dir()?;
        let dir = std::env::temp_dir().join(format!(
            "idem-pg-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let [port] = free_ports::<1>();
        let mut me = Self {
            bin,
            dir,
            port,
            running: false,
        };
        if is_root() {
            run(Command::new("chown").arg("postgres:").arg(&me.dir))?;
        }
        let data = me.dir.join("data");
        run(me.command("initdb").arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]))?;
        me.restart().await?;
        Ok(me)
    }

    fn bin_dir() -> Result<PathBuf, String> {
        let root = Path::new("/usr/lib/postgresql");
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
            .map_err(|e| format!("{}: {e}", root.display()))?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let v = e.file_name().to_str()?.parse().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").exists().then_some((v, bin))
            })
            .collect();
        versions.sort();
        versions
            .pop()
            .map(|(_, bin)| bin)
            .ok_or_else(|| format!("no initdb under {}", root.display()))
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        cmd.stdin(Stdio::null());
        cmd
    }

    /// `pg_ctl -D <data dir>`: addresses this server only.
    fn pg_ctl(&self) -> Command {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D").arg(self.dir.join("data"));
        cmd
    }

    /// The server's log (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl PrivateStore for PrivatePostgres {
    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn stop(&mut self) {
        if self.running {
            self.running = false;
            let _ = run(self.pg_ctl().args(["-m", "immediate", "-w", "stop"]));
        }
    }

    async fn restart(&mut self) -> Result<(), String> {
        self.stop();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let started = run(self
            .pg_ctl()
            .args(["-o", &options])
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-w", "-t", "120", "start"]));
        // pg_ctl may have started it even when it reports a failure.
        self.running = true;
        started.map_err(|e| format!("{e}\n{}", self.log()))
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
