//! Async mode's queue on Redis beyond the conformance suite: an accepted
//! operation outlives the store that accepted it; the layout of an
//! operation's record and queue entries; stale entries heal; and every
//! queue step whose reply is lost with its connection is retried once and
//! finds its own work.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use idem::store::redis::RedisStore;
use idem::store::{Enqueued, Fence, OperationId, OperationRequest, OperationState, Queue, Store};
use idem::{StoreError, StoreKey};
use redis::AsyncCommands;

use super::cut::CutProxy;
use super::private::PrivateRedis;
use super::{cluster, fp, fresh_key, prefix, raw, record, shared, LEASE, RETAIN};

fn request(key: &StoreKey) -> OperationRequest {
    OperationRequest {
        method: "POST".into(),
        uri: "/payments?x=1".into(),
        headers: vec![
            (
                "idempotency-key".into(),
                Bytes::copy_from_slice(key.key().as_bytes()),
            ),
            ("x-bin".into(), Bytes::from_static(b"\x00\xff")),
        ],
        body: Bytes::from_static(b"{\"amount\":10}"),
    }
}

async fn accept(store: &RedisStore, key: &StoreKey) -> OperationId {
    let id = OperationId::generate();
    match store
        .enqueue(key, fp("a"), id, &request(key), 1000)
        .await
        .unwrap()
    {
        Enqueued::Accepted(got) => assert_eq!(got, id),
        other => panic!("expected Accepted, got {other:?}"),
    }
    id
}

fn member(id: OperationId, key: &StoreKey) -> String {
    format!("{id}{}", key.as_str())
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64
}

/// An operation accepted by one store — which then goes away with all of
/// its connections — is claimed by a new store on the same prefix: the
/// queue lives in Redis, not in the store that accepted it.
async fn survives_a_new_store<F, Fut>(connect: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<RedisStore>>,
{
    let Some(first) = connect().await else {
        return;
    };
    let k = fresh_key("survivor");
    let id = accept(&first, &k).await;
    drop(first);

    let second = connect().await.unwrap();
    let mut claimed = second.claim(LEASE, 10).await.unwrap();
    assert_eq!(claimed.len(), 1, "the accepted operation is claimable");
    let c = claimed.remove(0);
    assert_eq!((c.id, &c.key, c.attempt), (id, &k, 1));
    assert_eq!(*c.request, request(&k), "the request comes back exactly");
    assert_eq!(
        second
            .complete(&k, c.token, record(Bytes::from_static(b"paid")), RETAIN)
            .await
            .unwrap(),
        Fence::Held
    );
    drop(second);

    let third = connect().await.unwrap();
    match third.operation(id).await.unwrap() {
        Some(op) => assert!(
            matches!(op.state, OperationState::Done(ref r) if r.response.body == "paid"),
            "{op:?}"
        ),
        None => panic!("the done operation is gone"),
    }
    assert!(third.purge(&k).await.unwrap());
    assert_eq!(third.queue_stats().await.unwrap().pending, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_operation_survives_a_reconnect() {
    let p = prefix();
    survives_a_new_store(|| shared(&p)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_operation_survives_a_reconnect_in_a_cluster() {
    let p = prefix();
    survives_a_new_store(|| cluster(&p)).await;
}

/// The record and queue entries of an operation through its life, as
/// docs/stores.md describes them.
#[tokio::test]
async fn operation_layout_and_queue_scores() {
    let Some(store) = shared(&prefix()).await else {
        return;
    };
    let mut c = raw().await;
    let p = store.prefix().to_owned();
    let (due, age) = store.queue_keys();
    assert_eq!(due, format!("{p}{{{p}queue}}:due"));
    assert_eq!(age, format!("{p}{{{p}queue}}:age"));

    let k = fresh_key("layout");
    let id = accept(&store, &k).await;
    let rk = store.record_key(&k);
    let m = member(id, &k);
    let index = store.operation_index_key(id);
    assert_eq!(index, format!("{p}{{{p}queue}}:op:{id}"));

    // Pending: a record without TTL, due now; its entry due now; its index.
    let fields: Vec<Option<String>> = redis::cmd("HMGET")
        .arg(&rk)
        .arg(&["state", "op", "attempts", "fp", "method", "uri"])
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(
        fields,
        [
            Some("pending".into()),
            Some(id.to_string()),
            Some("0".into()),
            Some(fp("a").to_hex()),
            Some("POST".into()),
            Some("/payments?x=1".into()),
        ]
    );
    let body: Vec<u8> = c.hget(&rk, "req_body").await.unwrap();
    assert_eq!(body, b"{\"amount\":10}", "the request body is kept raw");
    let ttl: i64 = c.pttl(&rk).await.unwrap();
    assert_eq!(ttl, -1, "a pending operation never expires");
    let score: f64 = c.zscore(&due, &m).await.unwrap();
    assert!((score - now_ms()).abs() < 5_000.0, "due now: {score}");
    let accepted: f64 = c.zscore(&age, &m).await.unwrap();
    assert!((accepted - now_ms()).abs() < 5_000.0, "{accepted}");
    let indexed: String = c.get(&index).await.unwrap();
    assert_eq!(indexed, k.as_str());
    let ttl: i64 = c.pttl(&index).await.unwrap();
    assert_eq!(ttl, -1, "the index of a live operation never expires");

    // Running: the entry scores the lease end; a heartbeat moves both.
    let claimed = store.claim(LEASE, 1).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let token = claimed[0].token;
    let state: String = c.hget(&rk, "state").await.unwrap();
    assert_eq!(state, "running");
    let lease_until: f64 = c.hget(&rk, "lease_until").await.unwrap();
    let score: f64 = c.zscore(&due, &m).await.unwrap();
    assert!(
        (score - lease_until).abs() < 2_000.0,
        "a running operation's entry scores its lease end: {score} vs {lease_until}"
    );
    assert_eq!(
        store.extend(&k, token, LEASE * 2).await.unwrap(),
        Fence::Held
    );
    let lease_until: f64 = c.hget(&rk, "lease_until").await.unwrap();
    let score: f64 = c.zscore(&due, &m).await.unwrap();
    assert_eq!(
        score, lease_until,
        "a heartbeat moves the entry to its lease"
    );
    assert!(lease_until > now_ms() + 50_000.0);

    // Retried: pending again, due later, the error kept.
    assert_eq!(
        store
            .retry(&k, token, Duration::from_secs(5), "HTTP 503")
            .await
            .unwrap(),
        Fence::Held
    );
    let fields: Vec<Option<String>> = redis::cmd("HMGET")
        .arg(&rk)
        .arg(&["state", "attempts", "last_error", "token"])
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(
        fields,
        [
            Some("pending".into()),
            Some("1".into()),
            Some("HTTP 503".into()),
            None
        ]
    );
    let due_at: f64 = c.hget(&rk, "due").await.unwrap();
    let score: f64 = c.zscore(&due, &m).await.unwrap();
    assert_eq!(score, due_at, "a retry moves the entry to its due time");
    assert!(store.claim(LEASE, 1).await.unwrap().is_empty());

    // Done: out of the queue; the id lives as long as the record.
    let ready = 0;
    let () = c.zadd(&due, &m, ready).await.unwrap();
    let () = c.hset(&rk, "due", ready).await.unwrap();
    let claimed = store.claim(LEASE, 1).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].attempt, 2);
    store
        .complete(
            &k,
            claimed[0].token,
            record(Bytes::from_static(b"ok")),
            RETAIN,
        )
        .await
        .unwrap();
    let gone: Option<f64> = c.zscore(&due, &m).await.unwrap();
    assert_eq!(gone, None);
    let gone: Option<f64> = c.zscore(&age, &m).await.unwrap();
    assert_eq!(gone, None);
    let op: String = c.hget(&rk, "op").await.unwrap();
    assert_eq!(op, id.to_string(), "a done operation's record keeps its id");
    let record_ttl: i64 = c.pttl(&rk).await.unwrap();
    let index_ttl: i64 = c.pttl(&index).await.unwrap();
    assert!(
        record_ttl > 3_000_000 && index_ttl > 3_000_000,
        "the retention: {record_ttl} / {index_ttl}"
    );
    assert!(store.purge(&k).await.unwrap());
    let exists: bool = c.exists(&index).await.unwrap();
    assert!(!exists, "purge forgets the id");
}

/// Entries are hints the records correct: whoever meets a stale one puts
/// it right, and nothing is lost or claimed twice.
#[tokio::test]
async fn stale_queue_entries_heal() {
    let Some(store) = shared(&prefix()).await else {
        return;
    };
    let mut c = raw().await;
    let (due, age) = store.queue_keys();

    // An offer whose record never came (its enqueue died in between):
    // counted until a claim meets it, which drops it with its id.
    let k = fresh_key("ghost");
    let ghost = OperationId::generate();
    let m = member(ghost, &k);
    let () = c.zadd(&due, &m, 0).await.unwrap();
    let () = c.zadd(&age, &m, 0).await.unwrap();
    let () = c
        .set(store.operation_index_key(ghost), k.as_str())
        .await
        .unwrap();
    assert_eq!(store.queue_stats().await.unwrap().pending, 1);
    assert!(store.operation(ghost).await.unwrap().is_none());
    assert!(store.claim(LEASE, 5).await.unwrap().is_empty());
    assert_eq!(store.queue_stats().await.unwrap().pending, 0);
    let exists: bool = c.exists(store.operation_index_key(ghost)).await.unwrap();
    assert!(!exists, "the ghost's id is forgotten");

    // A record whose scheduling was lost (the entry still in its grace), or
    // whose entry is gone: a repeat of the POST mends it.
    for lost in ["late", "missing"] {
        let k = fresh_key(lost);
        let id = accept(&store, &k).await;
        let m = member(id, &k);
        if lost == "late" {
            let () = c.zadd(&due, &m, now_ms() + 600_000.0).await.unwrap();
        } else {
            let _: i64 = c.zrem(&due, &m).await.unwrap();
        }
        assert!(store.claim(LEASE, 1).await.unwrap().is_empty());
        match store
            .enqueue(&k, fp("a"), OperationId::generate(), &request(&k), 1000)
            .await
            .unwrap()
        {
            Enqueued::Existing(op) => assert_eq!(op.id, id),
            other => panic!("expected Existing, got {other:?}"),
        }
        let claimed = store.claim(LEASE, 1).await.unwrap();
        assert_eq!(claimed.len(), 1, "{lost}: mended by the repeat");
        assert_eq!(claimed[0].id, id);
        assert!(store.purge(&k).await.unwrap());
    }

    // A heartbeat the entry missed: the entry says due, the record says
    // leased; the record wins and the entry moves to the lease end.
    let k = fresh_key("heartbeat");
    let id = accept(&store, &k).await;
    let first = store.claim(LEASE, 1).await.unwrap();
    assert_eq!(first.len(), 1);
    let m = member(id, &k);
    let () = c.zadd(&due, &m, 0).await.unwrap();
    assert!(
        store.claim(LEASE, 1).await.unwrap().is_empty(),
        "a live lease is never taken over, whatever the entry says"
    );
    let score: f64 = c.zscore(&due, &m).await.unwrap();
    assert!(
        score > now_ms() + 20_000.0,
        "moved to the lease end: {score}"
    );
    assert!(store.purge(&k).await.unwrap());

    // An index entry that is not a store key is corrupt, not unknown.
    let id = OperationId::generate();
    let () = c
        .set_ex(store.operation_index_key(id), "garbage", 60)
        .await
        .unwrap();
    assert!(matches!(
        store.operation(id).await,
        Err(StoreError::Corrupt(_))
    ));
    assert_eq!(store.queue_stats().await.unwrap().pending, 0);
}

/// Each queue step whose reply is lost with its connection (Redis applied
/// it) is sent once more and answers as the first call would have: the
/// house rule that makes the store's one retry safe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_replies_lost_with_the_connection_are_retried_once() {
    let Some(server) = PrivateRedis::start().await else {
        return;
    };
    let proxy = CutProxy::start(("127.0.0.1".into(), server.port())).await;
    let store = RedisStore::builder()
        .prefix(prefix())
        .connect(&proxy.url())
        .await
        .unwrap();
    // Load every script first, so a cut loses the reply of a call that
    // applied (not of a NOSCRIPT).
    let w = fresh_key("warm-up");
    accept(&store, &w).await;
    let c = store.claim(LEASE, 1).await.unwrap().remove(0);
    store.extend(&w, c.token, LEASE).await.unwrap();
    store.retry(&w, c.token, Duration::ZERO, "x").await.unwrap();
    let c = store.claim(LEASE, 1).await.unwrap().remove(0);
    store
        .complete(&w, c.token, record(Bytes::from_static(b"w")), RETAIN)
        .await
        .unwrap();
    store.operation(c.id).await.unwrap();
    store.queue_stats().await.unwrap();
    store.purge(&w).await.unwrap();
    let (due, _) = store.queue_keys();
    let mut cuts = 0;
    let mut cut = |marker: &[u8]| {
        proxy.cut_reply_to(marker);
        cuts += 1;
        cuts
    };

    // offer.lua (its request names the id's index entry).
    let k1 = fresh_key("lost-offer");
    let id1 = OperationId::generate();
    let n = cut(store.operation_index_key(id1).as_bytes());
    assert!(matches!(
        store.enqueue(&k1, fp("a"), id1, &request(&k1), 1000).await.unwrap(),
        Enqueued::Accepted(got) if got == id1
    ));
    assert_eq!(proxy.cuts(), n, "the proxy did not cut the offer");
    // enqueue.lua (its request names the record).
    let k2 = fresh_key("lost-enqueue");
    let id2 = OperationId::generate();
    let n = cut(store.record_key(&k2).as_bytes());
    assert!(matches!(
        store.enqueue(&k2, fp("a"), id2, &request(&k2), 1000).await.unwrap(),
        Enqueued::Accepted(got) if got == id2
    ));
    assert_eq!(proxy.cuts(), n, "the proxy did not cut the enqueue");
    assert_eq!(store.queue_stats().await.unwrap().pending, 2);

    // take.lua: the retry answers the entries the first call took.
    let n = cut(due.as_bytes());
    let claimed = store.claim(LEASE, 5).await.unwrap();
    assert_eq!(proxy.cuts(), n, "the proxy did not cut the take");
    // (Both were due within the same millisecond, maybe: any order.)
    let find = |id| claimed.iter().find(|c| c.id == id);
    let (Some(c1), Some(c2)) = (find(id1), find(id2)) else {
        panic!("a retried take gets what the lost one took: {claimed:?}");
    };

    // start.lua: the retry finds its own token, one attempt counted.
    let k3 = fresh_key("lost-start");
    let id3 = accept(&store, &k3).await;
    let n = cut(store.record_key(&k3).as_bytes());
    let mut claimed = store.claim(LEASE, 5).await.unwrap();
    assert_eq!(proxy.cuts(), n, "the proxy did not cut the start");
    assert_eq!(claimed.len(), 1);
    let c3 = claimed.remove(0);
    assert_eq!((c3.id, c3.attempt), (id3, 1));

    // retry.lua, extend.lua, complete.lua: held again.
    let n = cut(store.record_key(&k3).as_bytes());
    assert_eq!(
        store
            .retry(&k3, c3.token, Duration::from_secs(60), "HTTP 503")
            .await
            .unwrap(),
        Fence::Held
    );
    assert_eq!(proxy.cuts(), n, "the proxy did not cut the retry");
    match store.operation(id3).await.unwrap().map(|op| op.state) {
        Some(OperationState::Pending { attempts: 1, .. }) => {}
        other => panic!("expected pending after 1 attempt: {other:?}"),
    }
    let n = cut(store.record_key(&k1).as_bytes());
    assert_eq!(
        store.extend(&k1, c1.token, LEASE).await.unwrap(),
        Fence::Held
    );
    assert_eq!(proxy.cuts(), n, "the proxy did not cut the extend");
    let n = cut(store.record_key(&k2).as_bytes());
    assert_eq!(
        store
            .complete(&k2, c2.token, record(Bytes::from_static(b"done")), RETAIN)
            .await
            .unwrap(),
        Fence::Held
    );
    assert_eq!(proxy.cuts(), n, "the proxy did not cut the complete");
    assert!(matches!(
        store.operation(id2).await.unwrap().map(|op| op.state),
        Some(OperationState::Done(r)) if r.response.body == "done"
    ));
    assert_eq!(
        store.queue_stats().await.unwrap().pending,
        2,
        "the running and the retried operation"
    );
}
