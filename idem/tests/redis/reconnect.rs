//! Dropped connections and Redis restarts (issue 10, items 5 and 7): a call
//! whose reply was lost is retried once with the same token and finds its
//! own work; the first call after Redis comes back succeeds.

use std::time::{SystemTime, UNIX_EPOCH};

use redis::{AsyncCommands, Value};

use super::private::PrivateRedis;
use super::{fp, prefix};

async fn connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

fn tag(reply: &[Value]) -> String {
    match reply.first() {
        Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
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

    let first: Vec<Value> = reserve(&mine, 1_000).invoke_async(&mut c).await.unwrap();
    assert_eq!(tag(&first), "acquired");
    let again: Vec<Value> = reserve(&mine, 30_000).invoke_async(&mut c).await.unwrap();
    assert_eq!(
        tag(&again),
        "acquired",
        "a retried reserve must not be told its own reservation is in flight: {again:?}"
    );
    let pttl: i64 = c.pttl(&key).await.unwrap();
    assert!(pttl > 1_000, "the retry restarts the lease: PTTL {pttl}");
    let token: String = c.hget(&key, "token").await.unwrap();
    assert_eq!(token, mine);

    let theirs: Vec<Value> = reserve(&other, 30_000).invoke_async(&mut c).await.unwrap();
    assert_eq!(tag(&theirs), "in_flight", "{theirs:?}");
}
