//! RedisStore beyond the conformance suite: the record layout, corrupt
//! records, notifications across instances (standalone and Cluster), time-outs,
//! surviving a Redis restart, and async mode's queue (redis/queue.rs).
//!
//! The shared Redis (6379) is only touched under a random key prefix. The
//! Cluster tests run on a cluster this binary starts for itself, unless
//! `IDEM_TEST_REDIS_CLUSTER_URLS` names one (see conformance/cluster.rs).
//! Tests that stop or pause Redis start a private `redis-server` on a free
//! port and stop only that process, by its handle.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

#[path = "conformance/cluster.rs"]
mod cluster;
#[path = "conformance/services.rs"]
mod services;

#[path = "redis/cut.rs"]
mod cut;
#[path = "redis/private.rs"]
mod private;
#[path = "redis/queue.rs"]
mod queue;
#[path = "redis/reconnect.rs"]
mod reconnect;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use idem::record::Record;
use idem::store::redis::RedisStore;
use idem::store::{Fence, Reservation, Store, StoreError};
use idem::{CompletedRecord, Fingerprint, Scope, StoreKey, StoredResponse, Token};
use private::PrivateRedis;
use redis::AsyncCommands;

const LEASE: Duration = Duration::from_secs(30);
const RETAIN: Duration = Duration::from_secs(3600);

fn prefix() -> String {
    format!("idem-test-{:016x}:", rand::random::<u64>())
}

fn fresh_key(name: &str) -> StoreKey {
    let run: u64 = rand::random();
    StoreKey::new(&Scope::named(&format!("redis-{run:016x}")), name)
}

fn fp(s: &str) -> Fingerprint {
    Fingerprint::of_bytes(s.as_bytes())
}

fn record(body: Bytes) -> Arc<CompletedRecord> {
    let now = SystemTime::now();
    Arc::new(CompletedRecord {
        fingerprint: fp("a"),
        response: StoredResponse {
            status: 200,
            headers: vec![("x-bin".into(), Bytes::from_static(b"\x00\xff"))],
            body,
        },
        completed_at: now,
        expires_at: now + RETAIN,
    })
}

async fn acquire(s: &RedisStore, k: &StoreKey) -> Token {
    match s.reserve(k, fp("a"), LEASE).await.unwrap() {
        Reservation::Acquired(l) => l.token,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

async fn shared(prefix: &str) -> Option<RedisStore> {
    let url = services::redis_url();
    match RedisStore::builder().prefix(prefix).connect(&url).await {
        Ok(s) => Some(s),
        Err(e) => services::unavailable("Redis", &url, &e),
    }
}

async fn cluster(prefix: &str) -> Option<RedisStore> {
    let cluster = cluster::Cluster::get().await?;
    match RedisStore::builder()
        .prefix(prefix)
        .connect_cluster(cluster.urls())
        .await
    {
        Ok(s) => Some(s),
        Err(e) => cluster.unreachable(&e),
    }
}

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(services::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn record_layout_and_binary_bodies() {
    let Some(store) = shared(&prefix()).await else {
        return;
    };
    let k = fresh_key("layout");
    let rk = store.record_key(&k);
    assert_eq!(rk, format!("{}{{{}}}", store.prefix(), k.as_str()));
    let t = acquire(&store, &k).await;

    let mut c = raw().await;
    let state: String = c.hget(&rk, "state").await.unwrap();
    assert_eq!(state, "in_flight");
    let token: String = c.hget(&rk, "token").await.unwrap();
    assert_eq!(token.len(), 32);
    let ttl: i64 = c.pttl(&rk).await.unwrap();
    assert!(
        ttl > 0 && ttl <= 30_000,
        "the lease is the key's TTL: {ttl}"
    );

    // A 1 MiB body of every byte value survives as raw bytes.
    let body: Bytes = (0..1024 * 1024).map(|i| (i % 256) as u8).collect();
    assert_eq!(
        store
            .complete(&k, t, record(body.clone()), RETAIN)
            .await
            .unwrap(),
        Fence::Held
    );
    let stored: Vec<u8> = c.hget(&rk, "body").await.unwrap();
    assert_eq!(stored, body, "the body is kept raw, not encoded");
    let ttl: i64 = c.pttl(&rk).await.unwrap();
    assert!(ttl > 3_000_000, "the retention is the key's TTL: {ttl}");
    match store.get(&k).await.unwrap() {
        Some(Record::Completed(r)) => {
            assert_eq!(r.response.body, body);
            assert_eq!(r.response.headers, record(Bytes::new()).response.headers);
        }
        other => panic!("expected Completed, got {other:?}"),
    }
    assert!(store.purge(&k).await.unwrap());
}

#[tokio::test]
async fn corrupt_records_are_errors() {
    let Some(store) = shared(&prefix()).await else {
        return;
    };
    let mut c = raw().await;

    let k = fresh_key("not-a-hash");
    let () = c.set_ex(store.record_key(&k), "garbage", 60).await.unwrap();
    assert!(matches!(store.get(&k).await, Err(StoreError::Corrupt(_))));
    assert!(matches!(
        store.reserve(&k, fp("a"), LEASE).await,
        Err(StoreError::Corrupt(_))
    ));

    let k = fresh_key("bad-fields");
    let rk = store.record_key(&k);
    let () = c
        .hset_multiple(
            &rk,
            &[
                ("state", "completed"),
                ("fp", "zz"),
                ("status", "x"),
                ("headers", ""),
            ],
        )
        .await
        .unwrap();
    let _: bool = c.expire(&rk, 60).await.unwrap();
    assert!(matches!(store.get(&k).await, Err(StoreError::Corrupt(_))));

    let k = fresh_key("no-state");
    let rk = store.record_key(&k);
    let () = c.hset(&rk, "other", "1").await.unwrap();
    let _: bool = c.expire(&rk, 60).await.unwrap();
    assert!(matches!(
        store.reserve(&k, fp("a"), LEASE).await,
        Err(StoreError::Corrupt(_))
    ));
    // Purge clears whatever is there.
    assert!(store.purge(&k).await.unwrap());
}

/// A change made by one instance wakes the waiters of another (over pub/sub,
/// not in process), for keys spread over every slot of a Cluster.
async fn cross_instance_wake(a: RedisStore, b: RedisStore) {
    assert!(a.is_listening() && b.is_listening());
    for i in 0..12 {
        let k = fresh_key(&format!("cross-{i}"));
        let t = acquire(&b, &k).await;
        // A waiter first finds the key in flight (that is what makes it
        // wait); the store publishes a change only when one did.
        assert!(matches!(
            a.reserve(&k, fp("a"), LEASE).await.unwrap(),
            Reservation::InFlight { .. }
        ));
        let mut sub = a.subscribe(&k).await.unwrap();
        let waiter = tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(5), sub.changed()).await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        match i % 3 {
            0 => {
                b.complete(&k, t, record(Bytes::from_static(b"x")), RETAIN)
                    .await
                    .unwrap();
            }
            1 => {
                b.release(&k, t).await.unwrap();
            }
            _ => {
                b.purge(&k).await.unwrap();
            }
        }
        assert!(
            waiter.await.unwrap().is_ok(),
            "change {i} on instance B did not wake a waiter on instance A"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_cross_instances() {
    let p = prefix();
    let (Some(a), Some(b)) = (shared(&p).await, shared(&p).await) else {
        return;
    };
    cross_instance_wake(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_cross_instances_in_a_cluster() {
    let p = prefix();
    let (Some(a), Some(b)) = (cluster(&p).await, cluster(&p).await) else {
        return;
    };
    assert!(a.is_cluster());
    cross_instance_wake(a, b).await;
}

#[tokio::test]
async fn prefixes_isolate_stores() {
    let (Some(a), Some(b)) = (shared(&prefix()).await, shared(&prefix()).await) else {
        return;
    };
    let k = fresh_key("isolated");
    acquire(&a, &k).await;
    acquire(&b, &k).await;
    assert!(a.purge(&k).await.unwrap());
    assert!(b.purge(&k).await.unwrap());
}

#[tokio::test]
async fn bad_settings_are_refused() {
    for bad in ["a{b", "a}b"] {
        let e = RedisStore::builder()
            .prefix(bad)
            .connect(&services::redis_url())
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Config(_)), "{e}");
    }
    let e = RedisStore::connect("http://127.0.0.1:6379")
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Config(_)), "{e}");
    let none: [&str; 0] = [];
    let e = RedisStore::connect_cluster(&none).await.unwrap_err();
    assert!(matches!(e, StoreError::Config(_)), "{e}");
}

#[tokio::test]
async fn connecting_to_a_down_redis_is_an_error() {
    let port = PrivateRedis::free_port();
    let started = Instant::now();
    let e = RedisStore::builder()
        .connect_timeout(Duration::from_millis(500))
        .connect(&format!("redis://127.0.0.1:{port}"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, StoreError::Unavailable(_) | StoreError::Timeout(_)),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    let e = RedisStore::builder()
        .connect_timeout(Duration::from_millis(500))
        .connect_cluster(&[format!("redis://127.0.0.1:{port}")])
        .await
        .unwrap_err();
    assert!(
        matches!(e, StoreError::Unavailable(_) | StoreError::Timeout(_)),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_times_out() {
    let Some(server) = PrivateRedis::start().await else {
        return;
    };
    let timeout = Duration::from_millis(200);
    let store = RedisStore::builder()
        .timeout(timeout)
        .connect(&server.url())
        .await
        .unwrap();
    let k = fresh_key("slow");
    acquire(&store, &k).await;
    // Pause every client of the private server (never the shared one).
    let mut admin = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1500)
        .arg("ALL")
        .query_async(&mut admin)
        .await
        .unwrap();
    let started = Instant::now();
    let e = store.get(&k).await.unwrap_err();
    assert!(matches!(e, StoreError::Timeout(d) if d == timeout), "{e}");
    assert!(started.elapsed() < Duration::from_secs(1), "not bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_survives_a_redis_restart() {
    let Some(mut server) = PrivateRedis::start().await else {
        return;
    };
    let store = RedisStore::builder()
        .timeout(Duration::from_millis(500))
        .connect(&server.url())
        .await
        .unwrap();
    let k = fresh_key("restart");
    acquire(&store, &k).await;
    assert!(store.is_listening());

    server.stop();
    let started = Instant::now();
    let e = store.get(&k).await.unwrap_err();
    assert!(
        matches!(e, StoreError::Unavailable(_) | StoreError::Timeout(_)),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(2), "not bounded");

    // A waiter that subscribed while Redis was down is woken when the
    // subscriber reconnects (it may have missed notifications).
    let mut sub = store.subscribe(&k).await.unwrap();
    let woken =
        tokio::spawn(
            async move { tokio::time::timeout(Duration::from_secs(10), sub.changed()).await },
        );

    server.restart().await.unwrap();
    // The same store works again (its records are gone: no persistence).
    let deadline = Instant::now() + Duration::from_secs(10);
    let token = loop {
        match store.reserve(&k, fp("a"), LEASE).await {
            Ok(Reservation::Acquired(l)) => break l.token,
            Ok(other) => panic!("the restarted Redis is empty, got {other:?}"),
            Err(e) => {
                assert!(Instant::now() < deadline, "no recovery after restart: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(woken.await.unwrap().is_ok(), "reconnect must wake waiters");

    // Scripts were reloaded, and notifications flow again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !store.is_listening() {
        assert!(Instant::now() < deadline, "subscriber did not reconnect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A waiter finds the key in flight, then subscribes (the store
    // publishes a change only when a reserve found it in flight).
    assert!(matches!(
        store.reserve(&k, fp("a"), LEASE).await.unwrap(),
        Reservation::InFlight { .. }
    ));
    let mut sub = store.subscribe(&k).await.unwrap();
    let waiter =
        tokio::spawn(
            async move { tokio::time::timeout(Duration::from_secs(5), sub.changed()).await },
        );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        store
            .complete(&k, token, record(Bytes::from_static(b"after")), RETAIN)
            .await
            .unwrap(),
        Fence::Held
    );
    assert!(
        waiter.await.unwrap().is_ok(),
        "no notification after restart"
    );
}

/// `(id, last command)` of every connection of `server` but `inspector`'s.
async fn clients(inspector: &mut redis::aio::MultiplexedConnection) -> Vec<(u64, String)> {
    let me: u64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(inspector)
        .await
        .unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(inspector)
        .await
        .unwrap();
    let field = |line: &str, name: &str| {
        line.split(' ')
            .find_map(|f| f.strip_prefix(name).map(str::to_owned))
            .unwrap_or_default()
    };
    let mut out: Vec<(u64, String)> = list
        .lines()
        .map(|l| (field(l, "id=").parse().unwrap(), field(l, "cmd=")))
        .filter(|(id, _)| *id != me)
        .collect();
    out.sort_unstable();
    out
}

/// A thread that pins gets a connection of its own, used by its calls
/// while the pin lives; other threads keep the shared one, and the
/// thread's connection closes once its runtime ends. On a private Redis,
/// so every connection counted is this test's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_thread_calls_over_its_own_connection() {
    let Some(server) = PrivateRedis::start().await else {
        return;
    };
    let mut inspector = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let store = RedisStore::builder()
        .prefix(prefix())
        .connect(&server.url())
        .await
        .unwrap();
    let before = clients(&mut inspector).await;
    assert_eq!(before.len(), 2, "commands and subscription: {before:?}");
    assert!(before.iter().all(|(_, cmd)| cmd != "evalsha"), "{before:?}");

    let (reserved, seen) = std::sync::mpsc::channel::<()>();
    let (go_on, release) = std::sync::mpsc::channel::<()>();
    let on_thread = store.clone();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let pin = on_thread.pin_to_thread().await.unwrap();
            assert!(pin.is_pinned());
            let again = on_thread.pin_to_thread().await.unwrap();
            assert!(!again.is_pinned(), "one connection per thread");
            let k = fresh_key("pinned");
            assert!(matches!(
                on_thread.reserve(&k, fp("a"), LEASE).await.unwrap(),
                Reservation::Acquired(_)
            ));
            reserved.send(()).unwrap();
            release.recv().unwrap();
            drop(pin);
        });
    });
    tokio::task::spawn_blocking(move || seen.recv())
        .await
        .unwrap()
        .unwrap();
    let during = clients(&mut inspector).await;
    assert_eq!(during.len(), 3, "one more, the thread's: {during:?}");
    let evalsha: Vec<_> = during.iter().filter(|(_, cmd)| cmd == "evalsha").collect();
    assert_eq!(
        evalsha,
        [during.last().unwrap()],
        "the call went over the newest connection, the thread's: {during:?}"
    );
    go_on.send(()).unwrap();
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .unwrap()
        .unwrap();

    // This thread never pinned: the shared connection.
    let k = fresh_key("shared");
    assert!(matches!(
        store.reserve(&k, fp("a"), LEASE).await.unwrap(),
        Reservation::Acquired(_)
    ));
    let deadline = Instant::now() + Duration::from_secs(5);
    let after = loop {
        let after = clients(&mut inspector).await;
        if after.len() == 2 || Instant::now() > deadline {
            break after;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(after.len(), 2, "the thread's connection closed: {after:?}");
    assert_eq!(
        after.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        before.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        "the shared connections are the same"
    );
    assert!(
        after.iter().any(|(_, cmd)| cmd == "evalsha"),
        "the shared connection served the call: {after:?}"
    );
}
