//! [`PostgresStore::transaction`]: exactly once *with* business data
//! (protocol §7). The reservation, the caller's writes and the completed record
//! share ONE transaction, so they commit or roll back together.
//!
//! Built on the pieces the plain store uses: the same `reserve` and
//! `complete` statements (`Statements::reserve_one`,
//! `Statements::complete_one`), the same row decoding, the same
//! reading of a reservation ([`Reservation::decide`]) as the engine, and the
//! same stored value as `Engine::once` (`value.rs`). A duplicate that
//! meets an open transaction waits in `wait.rs`, holding no connection.

use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::postgres::{PgRow, Postgres};
use tokio::time::Instant;

use super::row::{flag, reservation};
use super::wait::{Seen, LOOK_LOCK_WAIT};
use super::{store_error, PostgresStore};
use crate::error::{Corruption, StoreError};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::policy::{Concurrent, Rules};
use crate::record::Token;
use crate::store::{Decision, Lease, Notifier, Reservation};
use crate::value::{decode_value, encode_value, Once, OnceError};

/// How long a transactional duplicate waits for the holder's row lock in
/// `reject` mode before it answers `InProgress`.
const REJECT_LOCK_WAIT: Duration = Duration::from_millis(10);
/// How long it waits for it in `wait` mode before it rolls back and waits
/// with no connection in hand (`wait.rs`).
const WAIT_LOCK_WAIT: Duration = LOOK_LOCK_WAIT;

/// Ends the reserve's bounds inside [`PostgresStore::transaction`].
const RESET: &str = "SET LOCAL lock_timeout TO DEFAULT; SET LOCAL statement_timeout TO DEFAULT";

/// The closure's future in [`PostgresStore::transaction`].
pub type TxFuture<'c, T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'c>>;

/// The transaction [`PostgresStore::transaction`] hands to its closure.
pub type PgTransaction = sqlx::Transaction<'static, Postgres>;

impl PostgresStore {
    /// Runs `f` at most once per `key` and `fingerprint`, on the same
    /// transaction as its idempotency record (protocol §7), and returns its
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
    /// - a concurrent duplicate meets the first transaction's row lock. In
    ///   `reject` mode (`rules.concurrent`) it waits for it 10 ms at most,
    ///   then answers [`OnceError::InProgress`] (`retry_after` 1 s). In
    ///   `wait` mode it waits 1 ms, then rolls back, giving its connection
    ///   back, and waits for the holder holding none (woken by this
    ///   process's holder, or by looking again: at most every 100 ms, once
    ///   per key whatever the number of waiters), for `rules.wait_timeout`
    ///   at most; then it replays the holder's value, or, if the holder
    ///   rolled back, tries again (one of the waiters takes the key and
    ///   runs `f`). Past `wait_timeout`: `InProgress`. A key held by a
    ///   non-transactional reservation ([`Engine`](crate::Engine) on this
    ///   store) answers `InProgress` with that lease's remaining time, in
    ///   either mode.
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
        let deadline = Instant::now() + rules.wait_timeout;
        let (mut tx, lease) = loop {
            match self.attempt(key, fingerprint, rules).await {
                Attempt::Execute(tx, lease) => break (tx, lease),
                Attempt::Answer(answer) => return answer,
                Attempt::Busy if rules.concurrent == Concurrent::Reject => {
                    return in_progress();
                }
                // Wait for the holder with no connection in hand (never on
                // its row lock), then try again.
                Attempt::Busy => match self.wait_for_holder(key, deadline).await {
                    None => return in_progress(),
                    Some(Seen::Completed(record)) if record.fingerprint == fingerprint => {
                        return decode_value(&record);
                    }
                    Some(Seen::Completed(_)) => return Err(OnceError::Mismatch),
                    Some(Seen::Held | Seen::Look) => {}
                },
            }
        };
        // From here on this call holds the key: however it ends (commit,
        // roll-back, error, panic, cancellation), this process's waiters
        // hear of it at once.
        let _wake = WakeOnDrop {
            notifier: &self.shared.notifier,
            key,
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
                self.shared
                    .sql
                    .complete_one(key, lease.token, &response, rules.retention)
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
        Ok(Once {
            value,
            replayed: false,
        })
    }
}

/// One try at a transactional call's reservation.
enum Attempt<T, E> {
    /// The key is ours: run `f` on this transaction, under this lease.
    Execute(PgTransaction, Lease),
    /// Another open transaction holds the key (it has been rolled back:
    /// no connection held).
    Busy,
    /// The call's answer, without running `f` (rolled back).
    Answer(Result<Once<T>, OnceError<E>>),
}

/// What a reserve inside [`PostgresStore::begin_reserve`] said.
pub(super) enum Reserved {
    /// The row as it is after the reserve.
    Row(PgRow),
    /// Another open transaction holds the row lock (past the lock wait).
    Busy,
    /// The reserve failed.
    Failed(StoreError),
}

impl PostgresStore {
    /// BEGIN and reserve on `key`, waiting at most the short lock wait of
    /// `rules.concurrent` for another transaction's row lock.
    async fn attempt<T: DeserializeOwned, E>(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        rules: &Rules,
    ) -> Attempt<T, E> {
        let lock_wait = match rules.concurrent {
            Concurrent::Wait => WAIT_LOCK_WAIT,
            Concurrent::Reject => REJECT_LOCK_WAIT,
        };
        let token = Token::generate();
        let (tx, reserved) = match self
            .begin_reserve(key, token, fingerprint, rules.lease, lock_wait)
            .await
        {
            Ok(begun) => begun,
            Err(e) => return Attempt::Answer(Err(OnceError::Store(e))),
        };
        let reservation = match reserved {
            Reserved::Row(row) => reservation(&row, token, fingerprint, rules.lease),
            Reserved::Failed(e) => Err(e),
            Reserved::Busy => {
                // The connection goes back to the pool before any waiting.
                self.rollback(tx).await;
                return Attempt::Busy;
            }
        };
        match settle(reservation, rules.concurrent) {
            ControlFlow::Continue(lease) => Attempt::Execute(tx, lease),
            ControlFlow::Break(answer) => {
                // Nothing of ours to keep, and the row lock must go now.
                self.rollback(tx).await;
                Attempt::Answer(answer)
            }
        }
    }

    /// Opens a transaction and runs `reserve.sql` on it, waiting at most
    /// `lock_wait` for another transaction's row lock. The caller commits
    /// or rolls back.
    ///
    /// # Errors
    ///
    /// When the transaction cannot begin.
    pub(super) async fn begin_reserve(
        &self,
        key: &StoreKey,
        token: Token,
        fingerprint: Fingerprint,
        lease: Duration,
        lock_wait: Duration,
    ) -> Result<(PgTransaction, Reserved), StoreError> {
        // One round trip: BEGIN and bound the reserve's wait for a
        // duplicate's row lock (the statement may wait that long too).
        let begin = format!(
            "BEGIN; SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = {}",
            lock_wait.as_millis().max(1),
            (lock_wait + self.shared.timeout).as_millis()
        );
        let mut tx = self.call(self.shared.pool.begin_with(begin)).await?;
        let bound = self.shared.timeout + lock_wait;
        let reserved = tokio::time::timeout(
            bound,
            self.shared
                .sql
                .reserve_one(key, token, fingerprint, lease)
                .fetch_one(&mut *tx),
        )
        .await;
        let reserved = match reserved {
            Err(_) => Reserved::Failed(StoreError::Timeout(bound)),
            Ok(Err(e)) if is_contention(&e) => Reserved::Busy,
            Ok(Err(e)) => Reserved::Failed(store_error(e, self.shared.timeout)),
            Ok(Ok(row)) => Reserved::Row(row),
        };
        Ok((tx, reserved))
    }
}

/// Wakes this process's waiters of `key` when dropped: the holder's
/// transaction has ended, one way or another.
struct WakeOnDrop<'a> {
    notifier: &'a Notifier,
    key: &'a StoreKey,
}

impl Drop for WakeOnDrop<'_> {
    fn drop(&mut self) {
        self.notifier.notify(self.key);
    }
}

/// A duplicate that gave up on an open transaction.
fn in_progress<T, E>() -> Result<Once<T>, OnceError<E>> {
    Err(OnceError::InProgress {
        retry_after: Duration::from_secs(1),
    })
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
        // An open transaction's row lock made the reserve fail (`Busy`,
        // which the caller waits for); what is left is a committed,
        // non-transactional holder (the engine's): answer at once with its
        // lease's remaining time, in either mode.
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
