//! Group commit on the request path (`batch.rs` in the store): reserves and
//! completes waiting for a connection at the same moment go as one
//! statement. Each caller must still get its own key's outcome, a key the
//! database refuses or an open transaction locks must not spoil or hold up
//! the others, and callers that leave mid-way must not break anyone.
//! A store of ONE request-path connection forces the batches.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use idem::store::postgres::PostgresStore;
use idem::store::{Fence, Reservation, Store};
use idem::{Scope, StoreKey, StoredResponse};
use tokio::sync::{oneshot, Barrier};

use super::{fp, key, kill_connections, named_builder, pg, record, wait_rules, LEASE, RETAIN};

/// Executions of the reserve statements on the store's one request-path
/// connection (`pg_prepared_statements` counts them): (all, batched).
async fn reserve_statements(store: &PostgresStore) -> (i64, i64) {
    let rows = store
        .request_path_rows(
            "SELECT coalesce(sum(custom_plans + generic_plans), 0)::bigint AS n \
             FROM pg_prepared_statements WHERE statement LIKE 'INSERT INTO%' \
             UNION ALL \
             SELECT coalesce(sum(custom_plans + generic_plans), 0)::bigint AS n \
             FROM pg_prepared_statements WHERE statement LIKE 'INSERT INTO%unnest(%'",
        )
        .await
        .unwrap();
    (sqlx_count(&rows[0]), sqlx_count(&rows[1]))
}

fn sqlx_count(row: &idem::store::postgres::sqlx::postgres::PgRow) -> i64 {
    use idem::store::postgres::sqlx::Row as _;
    row.get::<i64, _>("n")
}

fn response(i: usize) -> StoredResponse {
    StoredResponse {
        status: 200 + u16::try_from(i % 7).unwrap(),
        // 0, 1 or 2 headers: each record's own slice of the batch's headers.
        headers: (0..i % 3)
            .map(|h| (format!("x-h{h}"), Bytes::from(format!("{i}-{h}"))))
            .collect(),
        body: Bytes::from(format!("body of {i}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_reserves_and_completes_keep_each_keys_outcome() {
    const FRESH: usize = 40;
    const DUPLICATES: usize = 10;
    let Some(store) = pg::connect(pg::builder().max_connections(1)).await else {
        return;
    };
    let store = Arc::new(store);
    let before = reserve_statements(&store).await;

    // 40 fresh keys and 10 callers of one more key, all at once.
    let barrier = Arc::new(Barrier::new(FRESH + DUPLICATES));
    let tasks: Vec<_> = (0..FRESH + DUPLICATES)
        .map(|i| {
            let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
            let k = if i < FRESH {
                key(&format!("batch-{i}"))
            } else {
                key("batch-dup")
            };
            tokio::spawn(async move {
                barrier.wait().await;
                (k.clone(), store.reserve(&k, fp("f"), LEASE).await.unwrap())
            })
        })
        .collect();
    let mut acquired = Vec::new();
    let mut dup = (0, 0);
    for task in tasks {
        let (k, reservation) = task.await.unwrap();
        match reservation {
            Reservation::Acquired(lease) => {
                if k.as_str() == key("batch-dup").as_str() {
                    dup.0 += 1;
                }
                acquired.push((k, lease.token));
            }
            Reservation::InFlight { .. } if k.as_str() == key("batch-dup").as_str() => dup.1 += 1,
            other => panic!("{k:?}: {other:?}"),
        }
    }
    assert_eq!(
        dup,
        (1, DUPLICATES - 1),
        "one caller of the shared key holds it"
    );
    assert_eq!(acquired.len(), FRESH + 1);
    let after = reserve_statements(&store).await;
    let (statements, batched) = (after.0 - before.0, after.1 - before.1);
    assert!(
        0 < batched && statements < i64::try_from(FRESH + DUPLICATES).unwrap(),
        "{statements} statements ({batched} batched) for {} reserves: none was batched",
        FRESH + DUPLICATES
    );

    // Complete them all at once, each with its own answer, and five more
    // with a token that is not the holder's, on keys the holders complete
    // in the same moment: answers mixed up within a batch would show.
    const STRANGERS: usize = 5;
    let barrier = Arc::new(Barrier::new(acquired.len() + STRANGERS));
    let mut tasks: Vec<_> = acquired
        .iter()
        .enumerate()
        .map(|(i, (k, token))| {
            let (store, barrier, k, token) =
                (Arc::clone(&store), Arc::clone(&barrier), k.clone(), *token);
            tokio::spawn(async move {
                barrier.wait().await;
                store
                    .complete(&k, token, record(fp("f"), response(i)), RETAIN)
                    .await
                    .unwrap()
            })
        })
        .collect();
    for s in 0..STRANGERS {
        let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
        let k = acquired[s * 7].0.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let other = idem::Token::generate();
            store
                .complete(&k, other, record(fp("f"), response(999)), RETAIN)
                .await
                .unwrap()
        }));
    }
    let fences: Vec<Fence> = futures_join(tasks).await;
    let (holders, strangers) = fences.split_at(acquired.len());
    assert!(holders.iter().all(|f| *f == Fence::Held), "{holders:?}");
    assert!(
        strangers.iter().all(|f| *f == Fence::Lost),
        "a token not the holder's changes nothing: {strangers:?}"
    );

    // Every key replays its own answer, headers and body included.
    for (i, (k, _)) in acquired.iter().enumerate() {
        match store.reserve(k, fp("f"), LEASE).await.unwrap() {
            Reservation::Completed(done) => assert_eq!(done.response, response(i), "{k:?}"),
            other => panic!("{k:?}: {other:?}"),
        }
    }
    pg::drop_schema(&store).await;
}

async fn futures_join<T: Send + 'static>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

/// A key the database refuses (text with a NUL byte) fails alone: its
/// batch is split in halves around it, and the others are reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_the_database_refuses_fails_alone() {
    const N: usize = 20;
    let Some(store) = pg::connect(pg::builder().max_connections(1)).await else {
        return;
    };
    let store = Arc::new(store);
    let bad = StoreKey::new(&Scope::named("pg-tests"), "nul\0key");
    let barrier = Arc::new(Barrier::new(N));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
            let k = if i == N / 2 {
                bad.clone()
            } else {
                key(&format!("refused-{i}"))
            };
            tokio::spawn(async move {
                barrier.wait().await;
                (i, store.reserve(&k, fp("f"), LEASE).await)
            })
        })
        .collect();
    for (i, result) in futures_join(tasks).await {
        if i == N / 2 {
            assert!(result.is_err(), "the refused key: {result:?}");
        } else {
            assert!(
                matches!(result, Ok(Reservation::Acquired(_))),
                "{i}: {result:?}"
            );
        }
    }
    pg::drop_schema(&store).await;
}

/// A plain reserve of a key whose row an open transaction locks waits for
/// that transaction, but the keys batched with it do not: they are served
/// long before the transaction ends. Then the waiting one gets the
/// transaction's result.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_locked_by_an_open_transaction_does_not_hold_up_its_batch() {
    const OTHERS: usize = 20;
    const HOLD: Duration = Duration::from_secs(4);
    let Some(store) = pg::connect(
        pg::builder()
            .max_connections(1)
            .timeout(Duration::from_secs(10)),
    )
    .await
    else {
        return;
    };
    let store = Arc::new(store);
    let a = key("locked");
    let (entered_tx, entered) = oneshot::channel();
    let holder = {
        let (store, a) = (Arc::clone(&store), a.clone());
        tokio::spawn(async move {
            store
                .transaction(&a, fp("a"), &wait_rules(), |_tx| {
                    Box::pin(async move {
                        let _ = entered_tx.send(());
                        tokio::time::sleep(HOLD).await;
                        Ok::<_, std::io::Error>(7_u32)
                    })
                })
                .await
        })
    };
    entered.await.unwrap();

    let start = Instant::now();
    let barrier = Arc::new(Barrier::new(OTHERS + 1));
    let tasks: Vec<_> = (0..=OTHERS)
        .map(|i| {
            let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
            let k = if i == 0 {
                a.clone()
            } else {
                key(&format!("beside-{i}"))
            };
            tokio::spawn(async move {
                barrier.wait().await;
                let result = store.reserve(&k, fp("a"), LEASE).await;
                (i, result, start.elapsed())
            })
        })
        .collect();
    for (i, result, took) in futures_join(tasks).await {
        if i == 0 {
            assert!(
                took >= HOLD / 2,
                "the locked key waited for the transaction: {took:?}"
            );
            assert!(
                matches!(result, Ok(Reservation::Completed(_))),
                "the locked key gets the transaction's result: {result:?}"
            );
        } else {
            assert!(
                matches!(result, Ok(Reservation::Acquired(_))),
                "{i}: {result:?}"
            );
            assert!(
                took < HOLD / 2,
                "key {i} was held up by another key's lock: {took:?}"
            );
        }
    }
    assert!(holder.await.unwrap().is_ok(), "the transaction committed");
    pg::drop_schema(&store).await;
}

/// Callers that give up at random moments (their futures dropped, maybe
/// while running a batch for others) leave everyone else an answer, and
/// the store serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callers_leaving_midway_leave_the_others_their_answers() {
    const N: usize = 60;
    let Some(store) = pg::connect(pg::builder().max_connections(1)).await else {
        return;
    };
    let store = Arc::new(store);
    let barrier = Arc::new(Barrier::new(N));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
            let k = key(&format!("leaving-{i}"));
            tokio::spawn(async move {
                barrier.wait().await;
                let reserve = store.reserve(&k, fp("f"), LEASE);
                if i % 2 == 0 {
                    // Gives up after 0–4 ms: before, during or after its batch.
                    let patience = Duration::from_micros(rand::random::<u64>() % 4000);
                    tokio::time::timeout(patience, reserve).await.ok()
                } else {
                    Some(reserve.await)
                }
            })
        })
        .collect();
    for (i, outcome) in futures_join(tasks).await.into_iter().enumerate() {
        match outcome {
            None => assert_eq!(i % 2, 0, "only the impatient give up"),
            Some(result) => {
                assert!(
                    matches!(result, Ok(Reservation::Acquired(_))),
                    "{i}: {result:?}"
                );
            }
        }
    }
    // A key of an impatient caller is either free or its own in flight.
    for i in (0..N).step_by(2) {
        let k = key(&format!("leaving-{i}"));
        let again = store.reserve(&k, fp("f"), LEASE).await.unwrap();
        assert!(
            matches!(
                again,
                Reservation::Acquired(_) | Reservation::InFlight { .. }
            ),
            "{i}: {again:?}"
        );
    }
    let fresh = key("after-the-leaving");
    assert!(matches!(
        store.reserve(&fresh, fp("f"), LEASE).await.unwrap(),
        Reservation::Acquired(_)
    ));
    pg::drop_schema(&store).await;
}

/// Bursts of duplicates on many keys at once: batches then carry one
/// caller of each key, and the others of the key meet its row in the
/// next batches. Exactly one caller per key holds it, round after round.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_bursts_on_many_keys_have_one_holder_per_key() {
    const KEYS: usize = 12;
    const CALLERS: usize = 15;
    let Some(store) = pg::connect(pg::builder().max_connections(2)).await else {
        return;
    };
    let store = Arc::new(store);
    for round in 0..5 {
        let barrier = Arc::new(Barrier::new(KEYS * CALLERS));
        let tasks: Vec<_> = (0..KEYS * CALLERS)
            .map(|i| {
                let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
                let k = key(&format!("burst-{round}-{}", i % KEYS));
                tokio::spawn(async move {
                    barrier.wait().await;
                    let held = matches!(
                        store.reserve(&k, fp("f"), LEASE).await.unwrap(),
                        Reservation::Acquired(_)
                    );
                    (i % KEYS, held)
                })
            })
            .collect();
        let mut holders = [0_usize; KEYS];
        for (k, held) in futures_join(tasks).await {
            holders[k] += usize::from(held);
        }
        assert_eq!(holders, [1; KEYS], "round {round}: holders per key");
    }
    pg::drop_schema(&store).await;
}

/// The database kills the request path's connections while batches run:
/// every caller gets an answer (its reservation or an error) within the
/// time-out, none hangs and none is told another key's outcome, and the
/// store serves again right after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_killed_mid_batch_leave_every_caller_an_answer() {
    const CALLERS: usize = 80;
    let (builder, name) = named_builder();
    let builder = builder.max_connections(2).timeout(Duration::from_secs(3));
    let Some(store) = pg::connect(builder).await else {
        return;
    };
    let store = Arc::new(store);
    let start = Instant::now();
    let tasks: Vec<_> = (0..CALLERS)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for round in 0..20 {
                    let k = key(&format!("killed-{i}-{round}"));
                    outcomes.push(store.reserve(&k, fp("f"), LEASE).await);
                }
                outcomes
            })
        })
        .collect();
    // Kill the store's connections (not the listener's) a few times while
    // the callers run.
    let mut killed = 0_i64;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        killed += kill_connections(&name).await;
    }
    let (mut acquired, mut failed) = (0, 0);
    for outcomes in futures_join(tasks).await {
        for outcome in outcomes {
            match outcome {
                Ok(Reservation::Acquired(_)) => acquired += 1,
                Err(_) => failed += 1,
                Ok(other) => panic!("a fresh key answered {other:?}"),
            }
        }
    }
    eprintln!("{killed} connections killed: {acquired} reserved, {failed} failed");
    assert!(killed > 0, "the store's connections were found and killed");
    assert!(acquired > 0);
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "callers hung: {:?}",
        start.elapsed()
    );
    // Serving again: a connection killed while idle may fail one call.
    let mut served = false;
    for attempt in 0..3 {
        let k = key(&format!("after-{attempt}"));
        if let Ok(Reservation::Acquired(_)) = store.reserve(&k, fp("f"), LEASE).await {
            served = true;
            break;
        }
    }
    assert!(served, "the store serves again after its connections died");
    // The other pool's connections were killed too: let it replace them.
    for _ in 0..3 {
        if idem::store::postgres::sqlx::query("SELECT 1")
            .execute(store.pool())
            .await
            .is_ok()
        {
            break;
        }
    }
    pg::drop_schema(&store).await;
}
