//! `PostgresStore::transaction_if_newer` (protocol §13): the business
//! write and the entity's version commit in ONE transaction. Each test
//! uses its own schema (see conformance/pg.rs) and drops it at the end.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

#[path = "conformance/pg.rs"]
mod pg;
#[path = "conformance/services.rs"]
mod services;

use std::sync::Arc;
use std::time::Duration;

use idem::apply::{Applied, ApplyError};
use idem::store::postgres::{sqlx, PgTransaction, PostgresStore, TxFuture};
use idem::store::VersionStore;
use idem::{Rules, Scope, StoreKey, Version};
use tokio::sync::Barrier;

/// A closure for `transaction_if_newer` that logs `v` in `table`.
fn insert(
    table: String,
    v: i64,
) -> impl for<'c> FnOnce(&'c mut PgTransaction) -> TxFuture<'c, (), sqlx::Error> + Send {
    move |tx| {
        Box::pin(async move {
            sqlx::query(&format!("INSERT INTO {table} (version) VALUES ($1)"))
                .bind(v)
                .execute(&mut **tx)
                .await
                .map(drop)
        })
    }
}

async fn with_log(store: &PostgresStore) -> String {
    let table = format!("\"{}\".applied", store.schema());
    sqlx::raw_sql(&format!(
        "CREATE TABLE {table} (seq bigserial PRIMARY KEY, version bigint NOT NULL)"
    ))
    .execute(store.pool())
    .await
    .expect("log table");
    table
}

/// 100 tasks at a barrier deliver random versions of one entity: the
/// versions committed (by the business write, in the same transaction)
/// are strictly increasing, end at the maximum, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raced_transactions_commit_in_increasing_order() {
    let Some(store) = pg::connect(pg::builder().max_connections(8)).await else {
        return;
    };
    let table = with_log(&store).await;
    let entity = StoreKey::new(&Scope::named("tx-versions"), "account-1");
    let rules = Rules {
        wait_timeout: Duration::from_secs(120),
        ..Rules::wait()
    };
    let versions: Vec<u64> = (0..100).map(|_| rand::random_range(1..=500)).collect();
    let max = versions.iter().copied().max().unwrap_or(0);
    let barrier = Arc::new(Barrier::new(versions.len()));
    let mut tasks = Vec::new();
    for v in versions {
        let (store, entity, rules, table, barrier) = (
            store.clone(),
            entity.clone(),
            rules.clone(),
            table.clone(),
            Arc::clone(&barrier),
        );
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let out = store
                .transaction_if_newer(&entity, Version::Number(v), &rules, |tx| {
                    Box::pin(async move {
                        sqlx::query(&format!("INSERT INTO {table} (version) VALUES ($1)"))
                            .bind(i64::try_from(v).unwrap_or(i64::MAX))
                            .execute(&mut **tx)
                            .await
                            .map(drop)
                    })
                })
                .await;
            match out {
                Ok(Applied::Applied(())) => {}
                Ok(Applied::Stale { current }) => assert!(current >= Version::Number(v)),
                Err(e) => panic!("version {v}: {e}"),
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let applied: Vec<(i64,)> = sqlx::query_as(&format!("SELECT version FROM {table} ORDER BY seq"))
        .fetch_all(store.pool())
        .await
        .expect("log");
    let applied: Vec<i64> = applied.into_iter().map(|(v,)| v).collect();
    assert!(
        applied.windows(2).all(|w| w[0] < w[1]),
        "committed out of order or twice: {applied:?}"
    );
    assert_eq!(applied.last().copied(), i64::try_from(max).ok());
    assert_eq!(
        store.current_version(&entity).await.expect("current"),
        Some(Version::Number(max))
    );
    pg::drop_schema(&store).await;
}

/// A failing closure rolls back its writes AND leaves the version; a stale
/// event writes nothing; another kind is refused; `reject` answers
/// `InProgress` while another transaction holds the entity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_roll_back_and_duplicates_are_rejected() {
    let Some(store) = pg::store().await else {
        return;
    };
    let table = with_log(&store).await;
    let entity = StoreKey::new(&Scope::named("tx-versions"), "account-2");
    let write = |v: i64| insert(table.clone(), v);
    let rules = Rules::default();
    let out = store
        .transaction_if_newer(&entity, Version::Number(5), &rules, write(5))
        .await;
    assert!(matches!(out, Ok(Applied::Applied(()))));
    // Fails after writing: both roll back.
    let table2 = table.clone();
    let out = store
        .transaction_if_newer(&entity, Version::Number(6), &rules, move |tx| {
            Box::pin(async move {
                sqlx::query(&format!("INSERT INTO {table2} (version) VALUES (6)"))
                    .execute(&mut **tx)
                    .await?;
                Err::<(), sqlx::Error>(sqlx::Error::RowNotFound)
            })
        })
        .await;
    assert!(matches!(out, Err(ApplyError::Failed(_))));
    assert_eq!(
        store.current_version(&entity).await.expect("current"),
        Some(Version::Number(5))
    );
    let out = store
        .transaction_if_newer(&entity, Version::Number(4), &rules, write(4))
        .await;
    assert!(matches!(out, Ok(Applied::Stale { current }) if current == Version::Number(5)));
    let ts: Version = "2026-12-02T05:00:00Z".parse().expect("timestamp");
    let out = store
        .transaction_if_newer(&entity, ts, &rules, write(0))
        .await;
    assert!(matches!(out, Err(ApplyError::Mixed { .. })));
    let (n,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(store.pool())
        .await
        .expect("count");
    assert_eq!(n, 1, "only v5's write committed");

    // A transaction holding the entity makes a `reject` duplicate answer
    // InProgress at once.
    let gate = Arc::new(tokio::sync::Notify::new());
    let holder = {
        let (store, entity, gate) = (store.clone(), entity.clone(), Arc::clone(&gate));
        tokio::spawn(async move {
            store
                .transaction_if_newer(&entity, Version::Number(7), &Rules::default(), move |_tx| {
                    Box::pin(async move {
                        gate.notified().await;
                        Ok::<_, sqlx::Error>(())
                    })
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = store
        .transaction_if_newer(&entity, Version::Number(8), &rules, write(8))
        .await;
    assert!(matches!(out, Err(ApplyError::InProgress { .. })), "{out:?}");
    gate.notify_one();
    assert!(matches!(
        holder.await.expect("holder"),
        Ok(Applied::Applied(()))
    ));
    assert_eq!(
        store.current_version(&entity).await.expect("current"),
        Some(Version::Number(7))
    );
    pg::drop_schema(&store).await;
}
