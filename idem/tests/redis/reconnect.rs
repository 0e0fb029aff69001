//! Dropped connections and Redis restarts (issue 10, items 5 and 7): a call
//! whose reply was lost is retried once with the same token and finds its
//! own work; the first call after Redis comes back succeeds.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use idem::record::Record;
use idem::store::redis::RedisStore;
use idem::store::{Fence, Reservation, Store, StoreError};
use redis::{AsyncCommands, Value};

use super::cut::CutProxy;
use super::private::PrivateRedis;
use super::{acquire, fp, fresh_key, prefix, record, LEASE, RETAIN};

async fn connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The reply's tag: the script answers a bare `1` for `acquired` (the
/// answer of every fresh request, cheapest to read), an array led by its
/// tag otherwise.
fn tag(reply: &Value) -> String {
    match reply {
        Value::Int(1) => "acquired".to_owned(),
        Value::Array(items) => match items.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            other => panic!("no reply tag: {other:?}"),
        },
        other => panic!("no reply tag: {other:?}"),
    }
}

/// The script itself: a reserve that finds the in-flight record of its own
/// token (its earlier call applied, the reply was lost) is `acquired`, and
/// the lease restarts; any other token still finds it `in_flight`.
#[tokio::test]
async fn a_reserve_that_finds_its_own_token_is_acquired() {
    let Some(server) = PrivateRedis::start().await else {
        return;
    };
    let mut c = connection(&server.url()).await;
    let script = redis::Script::new(include_str!("../../src/store/redis/lua/reserve.lua"));
    let key = format!("{}{{own-token}}", prefix());
    let fingerprint = fp("a").to_hex();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    let mine = format!("{:032x}", rand::random::<u128>());
    let other = format!("{:032x}", rand::random::<u128>());
    let reserve = |token: &str, lease_ms: u64| {
        let mut inv = script.prepare_invoke();
        inv.key(&key)
            .arg(&fingerprint)
            .arg(token)
            .arg(lease_ms)
            .arg(&now);
        inv
    };

    let first: Value = reserve(&mine, 1_000).invoke_async(&mut c).await.unwrap();
    assert_eq!(tag(&first), "acquired");
    let again: Value = reserve(&mine, 30_000).invoke_async(&mut c).await.unwrap();
    assert_eq!(
        tag(&again),
        "acquired",
        "a retried reserve must not be told its own reservation is in flight: {again:?}"
    );
    let pttl: i64 = c.pttl(&key).await.unwrap();
    assert!(pttl > 1_000, "the retry restarts the lease: PTTL {pttl}");
    let token: String = c.hget(&key, "token").await.unwrap();
    assert_eq!(token, mine);

    let theirs: Value = reserve(&other, 30_000).invoke_async(&mut c).await.unwrap();
    assert_eq!(tag(&theirs), "in_flight", "{theirs:?}");
}

/// Through a proxy that applies a call, then drops the connection before
/// its reply: the store retries once, with the same arguments, and every
/// operation answers as if the reply had arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_lost_with_the_connection_is_retried_once() {
    let Some(server) = PrivateRedis::start().await else {
        return;
    };
    let proxy = CutProxy::start(("127.0.0.1".into(), server.port())).await;
    let store = RedisStore::builder()
        .prefix(prefix())
        .connect(&proxy.url())
        .await
        .unwrap();
    // A fresh Redis has no scripts: load each one, so that a cut below
    // loses the reply of a call that applied (not of a NOSCRIPT).
    let w = fresh_key("warm-up");
    let t = acquire(&store, &w).await;
    store.extend(&w, t, LEASE).await.unwrap();
    store.release(&w, t).await.unwrap();
    let t = acquire(&store, &w).await;
    store
        .complete(&w, t, record(Bytes::from_static(b"w")), RETAIN)
        .await
        .unwrap();
    store.get(&w).await.unwrap();
    store.purge(&w).await.unwrap();

    let k = fresh_key("lost-reply");
    let marker = store.record_key(&k).into_bytes();
    let mut raw = connection(&server.url()).await;

    proxy.cut_reply_to(&marker);
    let lease = match store.reserve(&k, fp("a"), LEASE).await {
        Ok(Reservation::Acquired(lease)) => lease,
        other => panic!(
            "a reserve whose reply was lost must be retried and find its own token, got {other:?}"
        ),
    };
    assert_eq!(proxy.cuts(), 1, "the proxy did not cut the reserve");
    let stored: String = raw.hget(store.record_key(&k), "token").await.unwrap();
    assert_eq!(
        stored,
        format!("{:032x}", lease.token.as_u128()),
        "the record is held by the token the caller was given"
    );

    proxy.cut_reply_to(&marker);
    assert_eq!(
        store.extend(&k, lease.token, LEASE).await.unwrap(),
        Fence::Held
    );
    assert_eq!(proxy.cuts(), 2, "the proxy did not cut the extend");

    proxy.cut_reply_to(&marker);
    assert_eq!(
        store
            .complete(&k, lease.token, record(Bytes::from_static(b"done")), RETAIN)
            .await
            .unwrap(),
        Fence::Held
    );
    assert_eq!(proxy.cuts(), 3, "the proxy did not cut the complete");
    assert!(matches!(
        store.get(&k).await.unwrap(),
        Some(Record::Completed(r)) if r.response.body == "done"
    ));

    // A retried release finds nothing left to delete: it may answer Lost,
    // but the key is free either way.
    let k = fresh_key("lost-release");
    let t = acquire(&store, &k).await;
    proxy.cut_reply_to(store.record_key(&k).as_bytes());
    store.release(&k, t).await.unwrap();
    assert_eq!(proxy.cuts(), 4, "the proxy did not cut the release");
    assert!(store.get(&k).await.unwrap().is_none());
}

fn down(e: &StoreError) -> bool {
    matches!(e, StoreError::Unavailable(_) | StoreError::Timeout(_))
}

/// Redis dies and comes back on the same port: calls fail (bounded by the
/// store time-out) while it is down, and the FIRST call once it is up
/// succeeds — whether calls failed meanwhile or the store sat idle, and for
/// `get` (what the gateway's `/readyz` probes with) as for `reserve`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_call_after_redis_comes_back_succeeds() {
    let Some(mut server) = PrivateRedis::start().await else {
        return;
    };
    let timeout = Duration::from_millis(500);
    let store = RedisStore::builder()
        .prefix(prefix())
        .timeout(timeout)
        .connect(&server.url())
        .await
        .unwrap();
    acquire(&store, &fresh_key("before")).await;

    for (round, calls_while_down) in [(0, true), (1, false), (2, true), (3, false)] {
        server.stop();
        if calls_while_down {
            for _ in 0..2 {
                let started = Instant::now();
                let e = store
                    .reserve(&fresh_key("down"), fp("a"), LEASE)
                    .await
                    .unwrap_err();
                assert!(down(&e), "round {round}: {e}");
                assert!(
                    started.elapsed() < timeout + Duration::from_millis(300),
                    "round {round}: a call to a stopped Redis took {:?}",
                    started.elapsed()
                );
            }
        }
        server.restart().await.unwrap();
        let k = fresh_key("after");
        if round < 2 {
            match store.reserve(&k, fp("a"), LEASE).await {
                Ok(Reservation::Acquired(_)) => {}
                other => {
                    panic!("round {round}: the first reserve after Redis came back: {other:?}")
                }
            }
        } else {
            match store.get(&k).await {
                Ok(None) => {}
                other => panic!("round {round}: the first get after Redis came back: {other:?}"),
            }
        }
    }
}
