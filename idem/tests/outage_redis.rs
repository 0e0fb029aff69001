//! A real store outage in the middle of a request (issue 10, item 4; protocol
//! §6): the engine talks to the shared Redis through a TCP proxy of this
//! test's own, which the test cuts (every connection closed, new ones
//! refused) right after the operation's effect, and then restores. Redis
//! itself keeps running, so the reservation is still there afterwards.
//!
//! The caller must get its answer within `complete_retry` (not the lease),
//! and the key must stay held: the retry after the outage gets 409, not a
//! second execution.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

#[path = "conformance/services.rs"]
mod services;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem::store::redis::RedisStore;
use idem::{Engine, EngineConfig, Fingerprint, OnceError, Rules, Scope, StoreKey};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Forwards connections to Redis until [`down`](Outage::down).
struct Outage {
    port: u16,
    down: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Outage {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (d, c) = (Arc::clone(&down), Arc::clone(&conns));
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if d.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is closed at once
                }
                let Ok(mut server) = TcpStream::connect(upstream.as_str()).await else {
                    continue;
                };
                let pump = tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
                c.lock().unwrap().push(pump);
            }
        });
        Self {
            port,
            down,
            conns,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Closes every connection and refuses new ones.
    fn down(&self) {
        self.down.store(true, Ordering::SeqCst);
        for pump in self.conns.lock().unwrap().drain(..) {
            pump.abort();
        }
    }

    fn up(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        self.accept.abort();
        self.down();
    }
}

/// `host:port` of a `redis://host:port[/db]` URL.
fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

#[tokio::test]
async fn a_redis_outage_after_the_effect_answers_within_complete_retry_and_holds_the_key() {
    let upstream = services::redis_url();
    let proxy = Arc::new(Outage::start(host_port(&upstream)).await);
    let prefix = format!("idem-test-{:016x}:", rand::random::<u64>());
    let store = match RedisStore::builder()
        .prefix(prefix)
        .timeout(Duration::from_millis(500))
        .connect(&proxy.url())
        .await
    {
        Ok(s) => s,
        Err(e) => return services::unavailable("Redis", &upstream, &e).unwrap_or(()),
    };
    let budget = Duration::from_secs(1);
    let engine = Engine::with_config(
        store,
        EngineConfig {
            local_cache_bytes: 0,
            store_timeout: Duration::from_millis(500),
            complete_retry: budget,
            ..EngineConfig::default()
        },
    );
    let k = StoreKey::new(
        &Scope::named(&format!("outage-{:016x}", rand::random::<u64>())),
        "charge",
    );
    let (fp, rules) = (Fingerprint::of_bytes(b"charge 10 EUR"), Rules::default());
    let runs = AtomicUsize::new(0);
    let charge = || async {
        runs.fetch_add(1, Ordering::SeqCst);
        proxy.down(); // Redis is gone once the effect happened
        Ok::<_, std::io::Error>(7_u32)
    };
    let started = Instant::now();
    let answer = engine.once(&k, fp, &rules, charge).await;
    let waited = started.elapsed();
    assert!(
        matches!(answer, Ok(ref o) if o.value == 7),
        "the caller gets its answer anyway, got {answer:?}"
    );
    // One attempt may take the whole store time-out; then the budget.
    let bound = budget + Duration::from_millis(500) + Duration::from_millis(500);
    assert!(
        waited <= bound,
        "the caller waited {waited:?} for a dead store (complete_retry {budget:?})"
    );
    assert_eq!(engine.metrics().unstored.load(Ordering::Relaxed), 1);
    // Redis is reachable again and still holds the reservation.
    proxy.up();
    let deadline = Instant::now() + Duration::from_secs(10);
    let retry = loop {
        match engine.once(&k, fp, &rules, charge).await {
            Err(OnceError::Store(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => break other,
        }
    };
    assert!(
        matches!(retry, Err(OnceError::InProgress { .. })),
        "the retry must find the key held (409), got {retry:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the charge ran twice");
}
