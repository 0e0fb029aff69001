//! [`PostgresStore::transaction`]: exactly once *with* business data
//! (SPEC §7). The reservation, the caller's writes and the completed record
//! share ONE transaction, so they commit or roll back together.
//!
//! Built on the pieces the plain store uses: the same `reserve` and
//! `complete` statements ([`PostgresStore::reserve_query`],
//! [`PostgresStore::complete_query`]), the same row decoding, the same
//! reading of a reservation ([`Reservation::decide`]) as the engine, and the
//! same stored value as `Engine::once` (`value.rs`).

use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::postgres::Postgres;

use super::row::{flag, reservation};
use super::{store_error, PostgresStore};
use crate::error::{Corruption, StoreError};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::policy::{Concurrent, Rules};
use crate::record::Token;
use crate::store::{Decision, Lease, Reservation};
use crate::value::{decode_value, encode_value, Once, OnceError};

/// How long a transactional duplicate waits for the row lock in `reject` mode.
const REJECT_LOCK_WAIT: Duration = Duration::from_millis(10);

/// Ends the reserve's bounds inside [`PostgresStore::transaction`].
const RESET: &str = "SET LOCAL lock_timeout TO DEFAULT; SET LOCAL statement_timeout TO DEFAULT";

/// The closure's future in [`PostgresStore::transaction`].
pub type TxFuture<'c, T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'c>>;

/// The transaction [`PostgresStore::transaction`] hands to its closure.
pub type PgTransaction = sqlx::Transaction<'static, Postgres>;

impl PostgresStore {
    /// Runs `f` at most once per `key` and `fingerprint`, on the same
    /// transaction as its idempotency record (SPEC §7), and returns its
    /// stored result on every repeat.
    ///
    /// In ONE transaction: reserve the key, run `f`'s writes on that
    /// transaction, insert the completed record (the value as JSON, as
    /// [`Engine::once`](crate::Engine::once) stores it), commit. The
    /// business effect and its record commit together or not at all:
    ///
    /// - `f` returns `Err` (or panics, or the call is cancelled): everything
    ///   rolls back, the business writes AND the reservation; a retry runs
    ///   `f` again. The error comes back as [`OnceError::Failed`].
    /// - the key already holds a completed record for this fingerprint: the
    ///   stored value is returned with `replayed: true` and `f` does not run;
    ///   for another fingerprint, [`OnceError::Mismatch`].
    /// - a concurrent duplicate BLOCKS on the first transaction's row lock
    ///   and, once that commits, replays its value (or, if it rolled back,
    ///   takes the key and runs `f` itself). It waits at most
    ///   `rules.wait_timeout` when `rules.concurrent` is `wait`, and only
    ///   10 ms when it is `reject`; past that it gets
    ///   [`OnceError::InProgress`] (`retry_after` 1 s). A key held by a
    ///   non-transactional reservation ([`Engine`](crate::Engine) on this
    ///   store) answers `InProgress` with that lease's remaining time.
    /// - a failed `COMMIT` is [`OnceError::Store`]; whether it applied is
    ///   unknown, but a retry with the same key finds out safely: it replays
    ///   if the commit happened and runs `f` if it did not.
    ///
    /// No in-flight row is ever committed: a crashed caller leaves nothing
    /// behind. `rules.lease` and `rules.fail` do not apply (the reservation
    /// lives as long as the transaction, and the business data lives in the
    /// same database). The transaction runs at the database's default
    /// isolation level; `f`'s statements run under the database's default
    /// `statement_timeout`, not the store's, while the store's own steps
    /// are bounded by its time-out.
    ///
    /// ```no_run
    /// # async fn demo(store: idem::store::postgres::PostgresStore) -> Result<(), Box<dyn std::error::Error>> {
    /// use idem::{Fingerprint, Rules, Scope, StoreKey};
    /// use idem::store::postgres::sqlx;
    ///
    /// let key = StoreKey::new(&Scope::named("tenant-42"), "order-1001");
    /// let order = store
    ///     .transaction(&key, Fingerprint::of_bytes(b"2 x tea"), &Rules::default(), |tx| {
    ///         Box::pin(async move {
    ///             let (id,): (i64,) = sqlx::query_as("INSERT INTO orders (item) VALUES ('tea') RETURNING id")
    ///                 .fetch_one(&mut **tx)
    ///                 .await?;
    ///             Ok::<_, sqlx::Error>(id)
    ///         })
    ///     })
    ///     .await?;
    /// println!("order {} (replayed: {})", order.value, order.replayed);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// See above; [`OnceError::Encode`] when the value cannot be encoded or
    /// the stored one decoded.
    pub async fn transaction<T, E, F>(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        rules: &Rules,
        f: F,
    ) -> Result<Once<T>, OnceError<E>>
    where
        T: Serialize + DeserializeOwned + Send,
        E: Send,
        F: for<'c> FnOnce(&'c mut PgTransaction) -> TxFuture<'c, T, E> + Send,
    {
        let lock_wait = match rules.concurrent {
            Concurrent::Wait => rules.wait_timeout,
            Concurrent::Reject => REJECT_LOCK_WAIT,
        };
        // One round trip: BEGIN and bound the reserve's wait for a
        // duplicate's row lock (the statement may wait that long too).
        let begin = format!(
            "BEGIN; SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = {}",
            lock_wait.as_millis().max(1),
            (lock_wait + self.shared.timeout).as_millis()
        );
        let mut tx = self
            .call(self.shared.pool.begin_with(begin))
            .await
            .map_err(OnceError::Store)?;

        let token = Token::generate();
        let reserved = tokio::time::timeout(
            self.shared.timeout + lock_wait,
            self.reserve_query(key, token, fingerprint, rules.lease)
                .fetch_one(&mut *tx),
        )
        .await;
        let reservation = match reserved {
            Err(_) => Err(StoreError::Timeout(self.shared.timeout + lock_wait)),
            Ok(Err(e)) if is_contention(&e) => {
                self.rollback(tx).await;
                return Err(OnceError::InProgress {
                    retry_after: Duration::from_secs(1),
                });
            }
            Ok(Err(e)) => Err(store_error(e, self.shared.timeout)),
            Ok(Ok(row)) => reservation(&row, token, fingerprint, rules.lease),
        };
        let lease = match settle(reservation, rules.concurrent) {
            ControlFlow::Continue(lease) => lease,
            ControlFlow::Break(answer) => {
                // Nothing of ours to keep, and the row lock must go now.
                self.rollback(tx).await;
                return answer;
            }
        };

        // `f` (and the COMMIT, which may queue for the NOTIFY lock) run
        // under the database's own settings, not the reserve's bounds.
        let reset = self.call(sqlx::Executor::execute(&mut *tx, RESET)).await;
        if let Err(e) = reset {
            self.rollback(tx).await;
            return Err(OnceError::Store(e));
        }
        let value = match f(&mut tx).await {
            Ok(value) => value,
            Err(e) => {
                self.rollback(tx).await;
                return Err(OnceError::Failed(e));
            }
        };
        let response = match encode_value(&value) {
            Ok(response) => response,
            Err(e) => {
                self.rollback(tx).await;
                return Err(OnceError::Encode(e));
            }
        };
        let held = self
            .call(
                self.complete_query(key, lease.token, &response, rules.retention)
                    .fetch_one(&mut *tx),
            )
            .await
            .and_then(|row| flag(&row, "held"));
        match held {
            Ok(true) => {}
            Ok(false) => {
                self.rollback(tx).await;
                return Err(OnceError::Store(
                    Corruption::new("the reservation vanished inside its own transaction").into(),
                ));
            }
            Err(e) => {
                self.rollback(tx).await;
                return Err(OnceError::Store(e));
            }
        }
        self.call(tx.commit()).await.map_err(OnceError::Store)?;
        self.shared.notifier.notify(key);
        Ok(Once {
            value,
            replayed: false,
        })
    }
}

/// What a transactional call does after its reserve: go on under the lease,
/// or answer now (and roll back).
fn settle<T: DeserializeOwned, E>(
    reserved: Result<Reservation, StoreError>,
    concurrent: Concurrent,
) -> ControlFlow<Result<Once<T>, OnceError<E>>, Lease> {
    let decision = match reserved {
        Ok(r) => r.decide(concurrent),
        Err(e) => return ControlFlow::Break(Err(OnceError::Store(e))),
    };
    ControlFlow::Break(match decision {
        Decision::Execute(lease) => return ControlFlow::Continue(lease),
        Decision::Replay(record) => decode_value(&record),
        Decision::Mismatch => Err(OnceError::Mismatch),
        // Another transaction's row lock was waited for by the reserve
        // itself; what is left is a non-transactional holder, which commits
        // nothing this transaction could block on: answer at once, in
        // either mode.
        Decision::Conflict { retry_after }
        | Decision::Wait {
            lease_remaining: retry_after,
        } => Err(OnceError::InProgress { retry_after }),
    })
}

/// A transactional duplicate that met the first one's row lock: it timed
/// out waiting (`lock_timeout`) or, under a stricter isolation level than
/// READ COMMITTED, could not serialize.
fn is_contention(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if matches!(db.code().as_deref(), Some("55P03" | "40001" | "40P01")))
}
