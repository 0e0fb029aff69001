//! The Redis Cluster the cluster tests run against.
//!
//! With `IDEM_TEST_REDIS_CLUSTER_URLS` set (say
//! `redis://127.0.0.1:7000,7001,7002`, the cluster `.ci/redis-cluster`
//! starts), the tests share that cluster; when it is unreachable they skip
//! loudly, or fail under `IDEM_REQUIRE_SERVICES=1`.
//!
//! Without it, the test binary starts a cluster of its own on first use,
//! once: three masters (`redis-server --cluster-enabled yes`, no
//! persistence) on free ports, their files in a scratch directory, joined
//! the way `redis-cli --cluster create … --cluster-replicas 0` joins them
//! (`CLUSTER ADDSLOTS`, `SET-CONFIG-EPOCH`, `MEET`), but from here: no
//! other process to outlive the tests, and no `redis-cli` needed. Every test
//! of the binary shares it (each works under a random key prefix), so the
//! tests run in parallel, and each run gets a fresh cluster. Only a missing
//! `redis-server` skips the tests; a cluster that will not form fails them.
//!
//! The servers must go when the test binary goes, however it goes (a
//! `static` is never dropped, and a killed process runs no code). So each
//! node runs under a small `sh` script (the test's [`Child`]): it starts
//! `redis-server` as its own child, and a watcher that reads a pipe whose
//! write end only the test binary holds (Rust opens pipes close-on-exec, so
//! no other child inherits it). End of file means the test binary closed it
//! or is gone: the watcher SIGKILLs the server by its pid (`$!`), the script
//! reaps it, removes the node's files and exits. Nothing is ever killed by
//! name, and no `redis-server` outlives the test binary by more than a
//! moment.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::services;

/// Masters in a cluster of our own.
const MASTERS: usize = 3;
/// Hash slots in a Redis Cluster.
const SLOTS: u16 = 16384;
/// A node's cluster bus listens on its port + 10000 (`--cluster-port`,
/// which would let us choose, needs Redis 7).
const BUS_OFFSET: u16 = 10000;
/// Start-up attempts (another process may take a port we picked).
const ATTEMPTS: usize = 5;
/// How long the cluster may take to form on a loaded machine.
const FORM_TIMEOUT: Duration = Duration::from_secs(60);
/// Connect and read time-out of the start-up's own Redis commands.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs as `sh -c WATCHED sh <node dir> <redis-server arguments>…`, with
/// the test binary's pipe as stdin; exits with the server's status.
const WATCHED: &str = r#"
dir=$1; shift
# Ctrl-C reaches the server (its own handler) and the test binary; this
# script stays to clean up after them.
trap '' INT
# The pipe from the test binary becomes fd 3, for the watcher alone.
exec 3<&0 0</dev/null
redis-server "$@" 3<&- &
server=$!
(
  # Returns at end of file: the test binary closed the pipe, or is gone.
  while IFS= read -r _; do :; done
  kill -9 "$server" 2>/dev/null
) <&3 &
watcher=$!
exec 3<&-
wait "$server"
status=$?
# The server is reaped: the watcher must not signal its pid any more.
kill "$watcher" 2>/dev/null
wait "$watcher"
# Killed (128+), or shut down cleanly (0): remove its files. An error exit at
# start-up (a port taken, say) leaves its log to the test binary, which
# reports it and removes the directory.
if [ "$status" -eq 0 ] || [ "$status" -gt 128 ]; then
  rm -rf "$dir"
  rmdir "${dir%/*}" 2>/dev/null
fi
exit "$status"
"#;

/// The cluster a test connects to.
pub struct Cluster {
    urls: Vec<String>,
    /// `IDEM_TEST_REDIS_CLUSTER_URLS`, when the cluster is a shared one.
    shared: Option<String>,
}

impl Cluster {
    /// The shared cluster, or this binary's own (started on first call);
    /// `None` (skipped loudly) when it cannot be had.
    ///
    /// Panics when `redis-server` is there but the cluster does not form:
    /// that is a failure to look into, not a missing service.
    pub async fn get() -> Option<Self> {
        if let Some(spec) = services::shared_redis_cluster_urls() {
            return Some(Self {
                urls: services::expand_cluster_urls(&spec),
                shared: Some(spec),
            });
        }
        // Start-up blocks (processes, sleeps): off the runtime's threads.
        // Tests that ask meanwhile wait for the first one's cluster.
        let own = tokio::task::spawn_blocking(|| OWN.get_or_init(OwnCluster::start))
            .await
            .expect("the Redis Cluster start-up panicked");
        match own {
            Ok(own) => Some(Self {
                urls: own.urls(),
                shared: None,
            }),
            Err(StartError::Missing(e)) => {
                services::unavailable("Redis Cluster", "127.0.0.1 (one of its own)", e)
            }
            Err(StartError::Failed(e)) => panic!("could not start a Redis Cluster: {e}"),
        }
    }

    /// The nodes' URLs.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Reports that a connection to the cluster failed: a skip (or, under
    /// `IDEM_REQUIRE_SERVICES=1`, a failure) for a shared cluster, a
    /// failure for our own, which was up a moment ago.
    pub fn unreachable<T>(&self, error: &dyn std::fmt::Display) -> Option<T> {
        match &self.shared {
            Some(spec) => services::unavailable("Redis Cluster", spec, error),
            None => panic!(
                "the Redis Cluster this test binary started ({:?}) refused a connection: {error}",
                self.urls
            ),
        }
    }
}

/// Why a cluster of our own could not be had.
#[derive(Debug)]
enum StartError {
    /// `redis-server` cannot be run: the service is absent.
    Missing(String),
    /// They can, but the cluster did not form.
    Failed(String),
}

/// One failed start-up attempt.
enum Attempt {
    /// A port we picked was taken meanwhile: pick others.
    PortTaken(String),
    /// Give up.
    Fatal(StartError),
}

impl From<StartError> for Attempt {
    fn from(e: StartError) -> Self {
        Attempt::Fatal(e)
    }
}

/// This binary's own cluster, started once and never dropped: its nodes go
/// when the process does (see the module docs).
static OWN: OnceLock<Result<OwnCluster, StartError>> = OnceLock::new();

struct OwnCluster {
    nodes: Vec<Node>,
}

impl OwnCluster {
    fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    fn start() -> Result<Self, StartError> {
        if let Err(e) = Command::new("redis-server").arg("--version").output() {
            return Err(StartError::Missing(format!(
                "cannot run redis-server (or set IDEM_TEST_REDIS_CLUSTER_URLS): {e}"
            )));
        }
        let mut last = String::new();
        for _ in 0..ATTEMPTS {
            let dir = std::env::temp_dir().join(format!(
                "idem-redis-cluster-{}-{:016x}",
                std::process::id(),
                rand::random::<u64>()
            ));
            let attempt = Self::start_in(&dir);
            if attempt.is_err() {
                let _ = std::fs::remove_dir_all(&dir);
            }
            match attempt {
                Ok(cluster) => return Ok(cluster),
                Err(Attempt::PortTaken(e)) => last = e,
                Err(Attempt::Fatal(e)) => return Err(e),
            }
        }
        Err(StartError::Failed(format!(
            "no node would start in {ATTEMPTS} attempts (ports taken?); last: {last}"
        )))
    }

    /// One attempt: on `Err`, every node it started is stopped again.
    fn start_in(dir: &Path) -> Result<Self, Attempt> {
        let ports = free_ports(MASTERS).map_err(StartError::Failed)?;
        let mut nodes = Vec::with_capacity(MASTERS);
        match form(dir, &ports, &mut nodes) {
            Ok(()) => Ok(Self { nodes }),
            Err(e) => {
                for node in &mut nodes {
                    node.stop();
                }
                Err(e)
            }
        }
    }
}

/// Starts a node on each of `ports` into `nodes`, and joins them.
fn form(dir: &Path, ports: &[u16], nodes: &mut Vec<Node>) -> Result<(), Attempt> {
    for &port in ports {
        nodes.push(Node::spawn(dir, port)?);
    }
    let deadline = Instant::now() + FORM_TIMEOUT;
    for node in nodes.iter_mut() {
        node.wait_up(deadline)?;
    }
    join(nodes)?;
    for node in nodes.iter() {
        node.wait_cluster_ok(deadline)?;
    }
    Ok(())
}

/// What `redis-cli --cluster create` does for masters only: an equal share
/// of the slots each, distinct config epochs (else the nodes must first
/// resolve the collision), then every node meets the first.
fn join(nodes: &[Node]) -> Result<(), Attempt> {
    let failed = |node: &Node, what: &str, e: redis::RedisError| {
        Attempt::Fatal(StartError::Failed(format!(
            "{what} on {}: {e}\n{}",
            node.addr(),
            node.log()
        )))
    };
    let share = SLOTS.div_ceil(MASTERS as u16);
    for (i, node) in nodes.iter().enumerate() {
        let first = i as u16 * share;
        let slots: Vec<u16> = (first..SLOTS.min(first + share)).collect();
        node.query::<()>(redis::cmd("CLUSTER").arg("ADDSLOTS").arg(slots))
            .map_err(|e| failed(node, "CLUSTER ADDSLOTS", e))?;
        node.query::<()>(redis::cmd("CLUSTER").arg("SET-CONFIG-EPOCH").arg(i + 1))
            .map_err(|e| failed(node, "CLUSTER SET-CONFIG-EPOCH", e))?;
    }
    let Some((first, others)) = nodes.split_first() else {
        return Ok(());
    };
    for node in others {
        first
            .query::<()>(
                redis::cmd("CLUSTER")
                    .arg("MEET")
                    .arg("127.0.0.1")
                    .arg(node.port),
            )
            .map_err(|e| failed(first, "CLUSTER MEET", e))?;
    }
    Ok(())
}

/// One `redis-server` of our own cluster, under [`WATCHED`].
struct Node {
    port: u16,
    dir: PathBuf,
    /// The `sh` script the server runs under.
    child: Child,
    /// The watcher's pipe: closed, the server is killed.
    pipe: Option<ChildStdin>,
}

impl Node {
    fn spawn(cluster_dir: &Path, port: u16) -> Result<Self, StartError> {
        let dir = cluster_dir.join(port.to_string());
        std::fs::create_dir_all(&dir)
            .map_err(|e| StartError::Failed(format!("{}: {e}", dir.display())))?;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WATCHED)
            .arg("sh")
            .arg(&dir)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .arg("--cluster-config-file")
            .arg(Self::config_file(&dir))
            .args(["--cluster-node-timeout", "5000"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| StartError::Missing(format!("cannot run sh: {e}")))?;
        let pipe = child.stdin.take();
        Ok(Self {
            port,
            dir,
            child,
            pipe,
        })
    }

    /// The node's cluster config file: no other server has this path.
    fn config_file(dir: &Path) -> PathBuf {
        dir.join("nodes.conf")
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr())
    }

    /// The end of the server's log, for failure messages.
    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// Waits until the server answers on its port, and is ours: another
    /// process may have taken the port since we picked it.
    fn wait_up(&mut self, deadline: Instant) -> Result<(), Attempt> {
        let ours = Self::config_file(&self.dir).display().to_string();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(Attempt::PortTaken(format!(
                    "redis-server on {} exited at start-up ({status}):\n{}",
                    self.addr(),
                    self.log()
                )));
            }
            let reply = self
                .query::<Vec<String>>(redis::cmd("CONFIG").arg("GET").arg("cluster-config-file"));
            if let Ok(reply) = reply {
                if reply.get(1) == Some(&ours) {
                    return Ok(());
                }
                return Err(Attempt::PortTaken(format!(
                    "{} is another Redis (cluster-config-file {reply:?})",
                    self.addr()
                )));
            }
            if Instant::now() > deadline {
                return Err(Attempt::Fatal(StartError::Failed(format!(
                    "redis-server on {} did not answer within {FORM_TIMEOUT:?}:\n{}",
                    self.addr(),
                    self.log()
                ))));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until this node sees the cluster whole.
    fn wait_cluster_ok(&self, deadline: Instant) -> Result<(), Attempt> {
        loop {
            let info = self.query::<String>(redis::cmd("CLUSTER").arg("INFO"));
            if let Ok(info) = &info {
                if field(info, "cluster_state") == Some("ok")
                    && field(info, "cluster_known_nodes") == Some(&MASTERS.to_string())
                {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(Attempt::Fatal(StartError::Failed(format!(
                    "{} not cluster_state:ok within {FORM_TIMEOUT:?}: {info:?}\n{}",
                    self.addr(),
                    self.log()
                ))));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let client = redis::Client::open(self.url())?;
        let mut con = client.get_connection_with_timeout(COMMAND_TIMEOUT)?;
        con.set_read_timeout(Some(COMMAND_TIMEOUT))?;
        con.set_write_timeout(Some(COMMAND_TIMEOUT))?;
        cmd.query(&mut con)
    }

    /// Stops the server (a failed start-up) as the test binary's exit
    /// would: closes the pipe, then waits for the script, which has reaped
    /// the server by then.
    fn stop(&mut self) {
        drop(self.pipe.take());
        let _ = self.child.wait();
    }
}

/// `name:value` from an INFO-style reply.
fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// `n` ports that were free a moment ago, all different, each with its
/// cluster bus port (+ [`BUS_OFFSET`]) free as well. Another process may
/// take one before the server binds it: the caller retries.
fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    // Hold every listener until all are picked, so that the kernel cannot
    // hand out the same port twice.
    let mut held = Vec::new();
    let mut ports = Vec::with_capacity(n);
    for _ in 0..100 {
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind a free port: {e}"))?;
        let port = listener
            .local_addr()
            .map_err(|e| format!("a free port: {e}"))?
            .port();
        let bus = port
            .checked_add(BUS_OFFSET)
            .and_then(|bus| TcpListener::bind(("127.0.0.1", bus)).ok());
        held.push(listener);
        if let Some(bus) = bus {
            held.push(bus);
            ports.push(port);
            if ports.len() == n {
                return Ok(ports);
            }
        }
    }
    Err(format!(
        "no {n} free ports with their cluster bus ports free"
    ))
}
