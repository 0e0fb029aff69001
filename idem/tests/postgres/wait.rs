//! Issue 10 item 16: transactional duplicates in `wait` mode must not park
//! on the holder's row lock while holding a pooled connection. A burst of
//! duplicates on one key would otherwise fill the pool, and every other
//! key's calls would time out (503s, lost leases, duplicates).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use idem::store::{Fence, Reservation, Store};
use idem::StoredResponse;
use tokio::sync::{oneshot, Barrier};

use super::{fp, key, pg, record, wait_rules, LEASE, RETAIN};

/// The pool: the holder takes one connection, 3 are left for 50 waiting
/// duplicates and everyone else.
const POOL: u32 = 4;
/// The store time-out, which also bounds a wait for a pooled connection.
const TIMEOUT: Duration = Duration::from_millis(1500);
/// How long the holder's transaction stays open: well past `TIMEOUT`.
const HOLD: Duration = Duration::from_secs(4);
const DUPLICATES: usize = 50;
const OTHERS: usize = 20;
const PLAIN: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiting_duplicates_leave_the_pool_to_other_keys() {
    let Some(store) = pg::connect(pg::builder().max_connections(POOL).timeout(TIMEOUT)).await
    else {
        return;
    };
    let store = Arc::new(store);
    let a = key("busy");
    let runs = Arc::new(AtomicUsize::new(0));

    // The holder: inside its transaction (row lock taken) for `HOLD`.
    let (entered_tx, entered) = oneshot::channel();
    let holder = {
        let (store, a, runs) = (Arc::clone(&store), a.clone(), Arc::clone(&runs));
        tokio::spawn(async move {
            store
                .transaction(&a, fp("a"), &wait_rules(), |_tx| {
                    Box::pin(async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let _ = entered_tx.send(());
                        tokio::time::sleep(HOLD).await;
                        Ok::<_, std::io::Error>(7_u32)
                    })
                })
                .await
        })
    };
    entered.await.unwrap();

    // Then, all at once: 50 duplicates of A, 20 transactions on other keys,
    // 10 engine-style reserve/extend/complete rounds on other keys.
    let barrier = Arc::new(Barrier::new(DUPLICATES + OTHERS + PLAIN));
    let duplicates: Vec<_> = (0..DUPLICATES)
        .map(|_| {
            let (store, a, runs, barrier) = (
                Arc::clone(&store),
                a.clone(),
                Arc::clone(&runs),
                Arc::clone(&barrier),
            );
            tokio::spawn(async move {
                barrier.wait().await;
                store
                    .transaction(&a, fp("a"), &wait_rules(), |_tx| {
                        Box::pin(async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, std::io::Error>(8_u32)
                        })
                    })
                    .await
            })
        })
        .collect();
    let others: Vec<_> = (0..OTHERS)
        .map(|i| {
            let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                let started = Instant::now();
                let k = key(&format!("other-{i}"));
                let r = store
                    .transaction(&k, fp("o"), &wait_rules(), |_tx| {
                        Box::pin(async move { Ok::<_, std::io::Error>(i) })
                    })
                    .await;
                (r, started.elapsed())
            })
        })
        .collect();
    let plain: Vec<_> = (0..PLAIN)
        .map(|i| {
            let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                let started = Instant::now();
                let k = key(&format!("plain-{i}"));
                let token = match store.reserve(&k, fp("p"), LEASE).await? {
                    Reservation::Acquired(lease) => lease.token,
                    other => panic!("a fresh key must be acquired, got {other:?}"),
                };
                let extended = store.extend(&k, token, LEASE).await?;
                let response = StoredResponse {
                    status: 201,
                    headers: vec![],
                    body: Bytes::from_static(b"done"),
                };
                let rec = record(fp("p"), response);
                let completed = store.complete(&k, token, rec, RETAIN).await?;
                Ok::<_, idem::StoreError>(((extended, completed), started.elapsed()))
            })
        })
        .collect();

    let mut slowest = Duration::ZERO;
    for (i, t) in others.into_iter().enumerate() {
        let (r, took) = t.await.unwrap();
        slowest = slowest.max(took);
        let once = r.unwrap_or_else(|e| {
            panic!("a transaction on another key failed while duplicates of A waited: {e:?}")
        });
        assert_eq!((once.value, once.replayed), (i, false));
        assert!(
            took < TIMEOUT,
            "a transaction on another key took {took:?}: the duplicates of A hog the pool"
        );
    }
    for t in plain {
        let (fences, took) = t.await.unwrap().unwrap_or_else(|e| {
            panic!("a store call on another key failed while duplicates of A waited: {e:?}")
        });
        slowest = slowest.max(took);
        assert_eq!(fences, (Fence::Held, Fence::Held));
        assert!(took < TIMEOUT, "reserve/extend/complete took {took:?}");
    }
    eprintln!("calls on other keys while 50 duplicates waited: slowest {slowest:?}");
    assert_eq!(holder.await.unwrap().unwrap().value, 7);
    for t in duplicates {
        let once = t.await.unwrap().unwrap_or_else(|e| {
            panic!("a waiting duplicate must get the holder's answer, got {e:?}")
        });
        assert_eq!((once.value, once.replayed), (7, true));
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the closure of A ran more than once"
    );
    pg::drop_schema(&store).await;
}

/// A holder on one instance, waiters on another: they hear of its commit by
/// looking (its in-flight row is never committed, so nothing NOTIFYs them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_on_another_instance_replay_the_holders_answer() {
    let Some(a) = pg::connect(pg::builder().max_connections(2)).await else {
        return;
    };
    let b = Arc::new(
        pg::builder()
            .schema(a.schema())
            .max_connections(2)
            .connect()
            .await
            .unwrap(),
    );
    let k = key("across");
    let (entered_tx, entered) = oneshot::channel();
    let (go_tx, go) = oneshot::channel::<()>();
    let holder = {
        let (a, k) = (a.clone(), k.clone());
        tokio::spawn(async move {
            a.transaction(&k, fp("a"), &wait_rules(), |_tx| {
                Box::pin(async move {
                    let _ = entered_tx.send(());
                    let _ = go.await;
                    Ok::<_, std::io::Error>("first".to_owned())
                })
            })
            .await
        })
    };
    entered.await.unwrap();
    let waiters: Vec<_> = (0..10)
        .map(|_| {
            let (b, k) = (Arc::clone(&b), k.clone());
            tokio::spawn(async move {
                b.transaction(&k, fp("a"), &wait_rules(), |_tx| {
                    Box::pin(async { Ok::<_, std::io::Error>("second".to_owned()) })
                })
                .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Waiting, they hold none of B's connections: at most one is busy now
    // and then, the key's one watcher taking a look.
    for _ in 0..40 {
        let busy = b.pool().size() as usize - b.pool().num_idle();
        assert!(
            busy <= 1,
            "{busy} connections busy while 10 duplicates wait"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(waiters.iter().all(|w| !w.is_finished()), "they wait");
    let committed = Instant::now();
    go_tx.send(()).unwrap();
    assert_eq!(holder.await.unwrap().unwrap().value, "first");
    for w in waiters {
        let once = w.await.unwrap().unwrap();
        assert_eq!((once.value.as_str(), once.replayed), ("first", true));
    }
    let late = committed.elapsed();
    assert!(late < Duration::from_secs(1), "waiters were {late:?} late");
    pg::drop_schema(&a).await;
}

/// The holder rolls back: one waiter takes the key and runs, the others
/// replay its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_roll_back_one_waiter_runs() {
    let Some(store) = pg::connect(pg::builder().max_connections(3)).await else {
        return;
    };
    let store = Arc::new(store);
    let k = key("rolled-back");
    let runs = Arc::new(AtomicUsize::new(0));
    let (entered_tx, entered) = oneshot::channel();
    let (go_tx, go) = oneshot::channel::<()>();
    let holder = {
        let (store, k) = (Arc::clone(&store), k.clone());
        tokio::spawn(async move {
            store
                .transaction(&k, fp("a"), &wait_rules(), |_tx| {
                    Box::pin(async move {
                        let _ = entered_tx.send(());
                        let _ = go.await;
                        Err::<u32, _>(std::io::Error::other("declined"))
                    })
                })
                .await
        })
    };
    entered.await.unwrap();
    let waiters: Vec<_> = (0..20)
        .map(|i| {
            let (store, k, runs) = (Arc::clone(&store), k.clone(), Arc::clone(&runs));
            tokio::spawn(async move {
                store
                    .transaction(&k, fp("a"), &wait_rules(), |_tx| {
                        Box::pin(async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, std::io::Error>(i)
                        })
                    })
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    go_tx.send(()).unwrap();
    assert!(matches!(
        holder.await.unwrap(),
        Err(idem::OnceError::Failed(_))
    ));
    let mut values = Vec::new();
    let mut fresh = 0;
    for w in waiters {
        let once = w.await.unwrap().unwrap();
        fresh += usize::from(!once.replayed);
        values.push(once.value);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "exactly one waiter runs");
    assert_eq!(fresh, 1);
    assert!(values.iter().all(|v| *v == values[0]), "{values:?}");
    pg::drop_schema(&store).await;
}
