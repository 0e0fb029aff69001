//! TLS to the upstream and to the stores (protocol §14), with throwaway
//! certificates from a private CA made by each test.

#[path = "support/process.rs"]
mod process;
#[path = "../../idem/tests/conformance/services.rs"]
mod services;
mod support;

mod certs;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use certs::Pki;
use support::{client, gateway, send, Upstream};

/// The async tests of this binary run one at a time: one of them captures
/// the log of its own thread, and tracing caches each call site's interest
/// when it is first hit: a site first hit on another test's thread at the
/// wrong moment could be cached as "never" for the capturing one.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A TLS front for a plain server: terminates TLS with `pki`'s
/// certificate and copies the bytes to `target`.
async fn tls_front(pki: &Pki, target: SocketAddr) -> SocketAddr {
    let acceptor = pki.acceptor(&[b"http/1.1"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

/// Log lines written while the returned guard lives (this thread only: the
/// test runs on a current-thread runtime, so the gateway's tasks do too).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

fn key(tag: &str) -> String {
    format!("{tag}-{:016x}", rand::random::<u64>())
}

#[tokio::test(flavor = "current_thread")]
async fn an_https_upstream_with_a_private_ca_posts_and_replays_and_a_wrong_ca_is_a_502() {
    let _serial = SERIAL.lock().await;
    let (logs, _guard) = capture_logs();
    let pki = Pki::new("upstream");
    let up = Upstream::start().await;
    let front = tls_front(&pki, up.addr.expect("started")).await;
    let upstream = format!("https://127.0.0.1:{}", front.port());

    let gw = gateway(
        &upstream,
        &format!("upstream_ca = {:?}", pki.ca.display().to_string()),
    )
    .await;
    let (c, a) = (client(), gw.local_addr());
    let k = key("https");
    let h = [("idempotency-key", k.as_str())];
    let first = send(&c, a, "POST", "/orders", &h, "{}").await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    let again = send(&c, a, "POST", "/orders", &h, "{}").await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, first.body, "the replay is the stored answer");
    assert_eq!(up.count("POST", "/orders", &k), 1, "one execution");
    gw.shutdown().await.expect("shutdown");

    // Another CA: the upstream's certificate is not trusted.
    let other = Pki::new("other");
    let gw = gateway(
        &upstream,
        &format!("upstream_ca = {:?}", other.ca.display().to_string()),
    )
    .await;
    let a = gw.local_addr();
    let k = key("wrong-ca");
    let h = [("idempotency-key", k.as_str())];
    let refused = send(&c, a, "POST", "/orders", &h, "{}").await;
    refused.assert_problem(502, "upstream_unavailable");
    assert_eq!(up.count("POST", "/orders", &k), 0, "nothing was sent");
    let log = logs.text();
    let line = log
        .lines()
        .find(|l| l.contains("upstream refused the connection"))
        .unwrap_or_else(|| panic!("no log line for the refused upstream:\n{log}"));
    assert!(
        line.contains("certificate") && line.contains("UnknownIssuer"),
        "the log line says why: {line}"
    );
    gw.shutdown().await.expect("shutdown");
}

/// A `redis-server` with TLS only (`--port 0 --tls-port`), killed on drop.
struct TlsRedis {
    child: Child,
    port: u16,
}

impl TlsRedis {
    async fn start(pki: &Pki) -> Result<Self, String> {
        let [port] = process::free_ports::<1>();
        Self::start_on(pki, port, &[]).await
    }

    async fn start_on(pki: &Pki, port: u16, extra: &[String]) -> Result<Self, String> {
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--tls-cert-file")
            .arg(&pki.cert)
            .arg("--tls-key-file")
            .arg(&pki.key)
            .arg("--tls-ca-cert-file")
            .arg(&pki.ca)
            .args(["--tls-auth-clients", "no"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run redis-server: {e}"))?;
        let mut me = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Ok(Some(status)) = me.child.try_wait() {
                return Err(format!("redis-server --tls-port exited ({status})"));
            }
            if Instant::now() > deadline {
                return Err("redis-server --tls-port did not start".to_owned());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Ok(Some(status)) = me.child.try_wait() {
            return Err(format!(
                "redis-server --tls-port exited ({status}); built without TLS?"
            ));
        }
        me.port = port;
        Ok(me)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Through a gateway on `store`: reserve and complete (a first POST),
/// replay (the same again), and a waiter woken when the holder completes.
async fn store_round_trip(store: &str, extra: &str) {
    let up = Upstream::start().await;
    let gw = gateway(
        &up.url(),
        &format!("store = {store:?}\n{extra}\n[defaults]\nconcurrent = \"wait\"\n"),
    )
    .await;
    let (c, a) = (client(), gw.local_addr());
    let k = key("store-tls");
    let h = [("idempotency-key", k.as_str())];
    let first = send(&c, a, "POST", "/orders", &h, "{}").await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    let again = send(&c, a, "POST", "/orders", &h, "{}").await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, first.body);

    // The waiter: the second request arrives while the first holds the
    // key, waits, and gets the first one's answer when it completes.
    let k = key("store-tls-wait");
    let holder = {
        let (c, k) = (c.clone(), k.clone());
        tokio::spawn(async move {
            let h = [("idempotency-key", k.as_str())];
            send(&c, a, "POST", "/slow?slow_first_ms=800", &h, "{}").await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let h = [("idempotency-key", k.as_str())];
    let waiter = send(&c, a, "POST", "/slow?slow_first_ms=800", &h, "{}").await;
    let holder = holder.await.expect("holder");
    assert_eq!(holder.status, 201);
    assert_eq!(waiter.status, 201, "{:?}", waiter.body);
    assert_eq!(
        waiter.body, holder.body,
        "the waiter gets the holder's answer"
    );
    assert_eq!(up.count("POST", "/slow", &k), 1, "one execution");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the waiter was woken, not left to time out: {:?}",
        started.elapsed()
    );
    gw.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_rediss_store_with_store_ca_reserves_completes_replays_and_wakes_waiters() {
    let _serial = SERIAL.lock().await;
    let pki = Pki::new("redis");
    let redis = match TlsRedis::start(&pki).await {
        Ok(r) => r,
        Err(e) => {
            return services::unavailable("redis-server with TLS", "redis-server", &e).unwrap_or(())
        }
    };
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let ca = format!("store_ca = {:?}", pki.ca.display().to_string());
    store_round_trip(&url, &ca).await;

    // The same server as a one-node Cluster is not possible (not in
    // cluster mode); but a `rediss://` URL without the CA is refused at
    // start-up, by the system roots.
    let cfg = idem_cli::config::load_str(
        "test.toml",
        &format!("listen = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:9\"\nstore = {url:?}\n"),
        &|_| None,
        &idem_cli::config::Overrides::default(),
    )
    .expect("valid");
    let e = idem_cli::gateway::Gateway::start(cfg)
        .await
        .expect_err("an untrusted store certificate");
    assert!(
        matches!(e, idem_cli::gateway::GatewayError::Store { .. }),
        "{e:?}"
    );
}

/// `redis-cli` over TLS to `port`, trusting `pki`'s CA.
fn redis_cli(pki: &Pki, port: u16, args: &[&str]) -> Result<String, String> {
    let out = Command::new("redis-cli")
        .args(["--tls", "--cacert"])
        .arg(&pki.ca)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run redis-cli: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Three TLS-only masters formed into a Cluster (`tls-cluster yes`: the
/// bus is TLS too), in a scratch directory.
async fn tls_cluster(pki: &Pki) -> Result<(Vec<TlsRedis>, Vec<u16>), String> {
    let ports = process::free_ports::<3>();
    let mut nodes = Vec::new();
    for port in ports {
        let extra: Vec<String> = [
            "--cluster-enabled",
            "yes",
            "--tls-cluster",
            "yes",
            "--cluster-node-timeout",
            "5000",
            "--cluster-config-file",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .chain([pki
            .path(&format!("nodes-{port}.conf"))
            .display()
            .to_string()])
        .chain(["--dir".to_owned(), pki.dir.display().to_string()])
        .collect();
        nodes.push(TlsRedis::start_on(pki, port, &extra).await?);
    }
    let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut args = vec!["--cluster", "create"];
    args.extend(hosts.iter().map(String::as_str));
    args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
    redis_cli(pki, ports[0], &args)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = ports.iter().all(|p| {
            redis_cli(pki, *p, &["cluster", "info"])
                .is_ok_and(|info| info.contains("cluster_state:ok"))
        });
        if ok {
            return Ok((nodes, ports.to_vec()));
        }
        if Instant::now() > deadline {
            return Err("the TLS cluster did not reach cluster_state:ok".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_rediss_cluster_with_store_ca_reserves_completes_replays_and_wakes_waiters() {
    let _serial = SERIAL.lock().await;
    let pki = Pki::new("redis-cluster");
    let (_nodes, ports) = match tls_cluster(&pki).await {
        Ok(c) => c,
        Err(e) => {
            return services::unavailable("a Redis Cluster with TLS", "redis-server", &e)
                .unwrap_or(())
        }
    };
    let url = format!(
        "rediss://127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}",
        ports[0], ports[1], ports[2]
    );
    let ca = format!("store_ca = {:?}", pki.ca.display().to_string());
    store_round_trip(&url, &ca).await;
}

#[tokio::test]
async fn postgres_with_sslmode_require_reserves_completes_replays_and_wakes_waiters() {
    let _serial = SERIAL.lock().await;
    let base = services::database_url();
    if let Err(e) = sqlx::PgPool::connect(&base).await {
        return services::unavailable("PostgreSQL", &base, &e).unwrap_or(());
    }
    let sep = if base.contains('?') { '&' } else { '?' };
    store_round_trip(&format!("{base}{sep}sslmode=require"), "").await;
}

#[tokio::test]
async fn postgres_connections_under_sslmode_require_are_encrypted() {
    let _serial = SERIAL.lock().await;
    let base = services::database_url();
    let pool = match sqlx::PgPool::connect(&base).await {
        Ok(p) => p,
        Err(e) => return services::unavailable("PostgreSQL", &base, &e).unwrap_or(()),
    };
    let app = key("idem-tls-ssl");
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}sslmode=require&application_name={app}");
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), &format!("store = {url:?}")).await;
    let (c, a) = (client(), gw.local_addr());
    let k = key("pg-ssl");
    let first = send(&c, a, "POST", "/x", &[("idempotency-key", k.as_str())], "").await;
    assert_eq!(first.status, 201);
    let (n, all_ssl): (i64, Option<bool>) = sqlx::query_as(
        "SELECT count(*), bool_and(s.ssl) FROM pg_stat_activity a \
         JOIN pg_stat_ssl s ON s.pid = a.pid WHERE a.application_name = $1",
    )
    .bind(&app)
    .fetch_one(&pool)
    .await
    .expect("pg_stat_ssl");
    assert!(
        n >= 1,
        "the gateway's connections are found by application_name"
    );
    assert_eq!(all_ssl, Some(true), "every connection of the store is TLS");
    gw.shutdown().await.expect("shutdown");
}

#[test]
fn check_reads_the_tls_files_and_names_a_bad_one() {
    let pki = Pki::new("check");
    let run = |key: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_idem"))
            .args(["serve", "--check", "--upstream", "https://127.0.0.1:3000"])
            .arg("--tls-cert")
            .arg(&pki.cert)
            .arg("--tls-key")
            .arg(key)
            .arg("--upstream-ca")
            .arg(&pki.ca)
            .env_remove("IDEM_CONFIG")
            .output()
            .expect("run idem")
    };
    let out = run(&pki.key);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("h2 and HTTP/1.1 by ALPN"), "{stdout}");
    assert!(stdout.contains("match, valid until"), "{stdout}");
    assert!(stdout.contains("system roots + "), "{stdout}");

    let other = Pki::new("check-other");
    let out = run(&other.key);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("does not match the private key") && stderr.contains("key.pem"),
        "{stderr}"
    );
}

/// An HTTP/1.1 connection in TLS to `addr`, trusting only `ca`.
async fn tls_h1(
    addr: SocketAddr,
    ca: &std::path::Path,
) -> Result<hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let tls = certs::client_trusting(ca, &[b"http/1.1"])
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(send)
}

async fn post_on(
    send: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    key: &str,
) -> Result<u16, String> {
    let req = http::Request::post("/orders")
        .header("host", "localhost")
        .header("idempotency-key", key)
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
        .map_err(|e| e.to_string())?;
    send.ready().await.map_err(|e| e.to_string())?;
    let res = send.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(res.status().as_u16())
}

#[tokio::test]
async fn sighup_swaps_the_certificate_for_new_connections_and_keeps_open_ones() {
    let _serial = SERIAL.lock().await;
    let (a, b) = (Pki::new("reload-a"), Pki::new("reload-b"));
    let scratch = process::Scratch::new("tls-reload");
    let (cert_file, key_file) = (scratch.path().join("gw.pem"), scratch.path().join("gw.key"));
    std::fs::copy(&a.cert, &cert_file).expect("copy");
    std::fs::copy(&a.key, &key_file).expect("copy");
    let up = Upstream::start().await;
    let toml = format!(
        "tls_cert = {:?}\ntls_key = {:?}\n",
        cert_file.display().to_string(),
        key_file.display().to_string()
    );
    let gw =
        process::GatewayProcess::start(scratch.path(), "reload", &up.url(), "memory", &toml).await;
    let mut open = tls_h1(gw.addr(), &a.ca).await.expect("CA a is trusted");
    assert_eq!(post_on(&mut open, &key("before")).await, Ok(201));

    std::fs::copy(&b.cert, &cert_file).expect("copy");
    std::fs::copy(&b.key, &key_file).expect("copy");
    let status = Command::new("kill")
        .args(["-HUP", &gw.pid().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while tls_h1(gw.addr(), &b.ca).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the new certificate is not served after SIGHUP:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        tls_h1(gw.addr(), &a.ca).await.is_err(),
        "new connections get the new certificate"
    );
    assert_eq!(
        post_on(&mut open, &key("after")).await,
        Ok(201),
        "the connection opened before the reload still serves"
    );
    assert!(
        gw.log().contains("TLS certificate reloaded"),
        "{}",
        gw.log()
    );

    // A bad pair on the next SIGHUP: refused, logged, the old one stays.
    std::fs::write(&key_file, "not a key").expect("write");
    Command::new("kill")
        .args(["-HUP", &gw.pid().to_string()])
        .status()
        .expect("kill -HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.log().contains("TLS certificate not reloaded") {
        assert!(Instant::now() < deadline, "{}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        gw.log().contains("gw.key: no private key found"),
        "{}",
        gw.log()
    );
    tls_h1(gw.addr(), &b.ca)
        .await
        .expect("the previous certificate stays in use");
}
