//! The stale-event guard on PostgreSQL (protocol §13): the table
//! `"<schema>".idem_versions`, one row per scoped entity (see
//! `sql/version_migrate.sql`, run by the store's migration), and
//! [`PostgresStore::transaction_if_newer`], which commits the caller's
//! writes and the entity's new version in ONE transaction.
//!
//! Every [`VersionStore`] step is ONE statement (`sql/version_*.sql`, each
//! with its `-- Atomicity:` note), timed with the DATABASE clock.

use std::time::Duration;

use sqlx::postgres::PgRow;
use sqlx::Row;
use tokio::time::Instant;

use super::transaction::{PgTransaction, TxFuture};
use super::{micros, store_error, PostgresStore};
use crate::error::Corruption;
use crate::key::StoreKey;
use crate::policy::{Concurrent, Rules};
use crate::record::Token;
use crate::store::{Fence, Lease, StoreError, VersionBegin, VersionStore};
use crate::version::{Applied, ApplyError, Version};

/// The table's DDL, appended to the store's migration.
pub(super) const MIGRATE: &str = include_str!("sql/version_migrate.sql");
const BEGIN: &str = include_str!("sql/version_begin.sql");
const COMMIT: &str = include_str!("sql/version_commit.sql");
const ABORT: &str = include_str!("sql/version_abort.sql");
const EXTEND: &str = include_str!("sql/version_extend.sql");
const GET: &str = include_str!("sql/version_get.sql");
const LOCK: &str = include_str!("sql/version_lock.sql");
const SET: &str = include_str!("sql/version_set.sql");

/// How long a transactional event waits for another transaction's row
/// lock on its entity before it answers `InProgress` (`reject`) or looks
/// again later with no connection in hand (`wait`).
const LOCK_WAIT: Duration = Duration::from_millis(10);
/// First pause of a `wait` caller between looks; doubles up to `MAX_PAUSE`.
const FIRST_PAUSE: Duration = Duration::from_millis(2);
const MAX_PAUSE: Duration = Duration::from_millis(100);

fn stored(row: &PgRow) -> Result<Option<Version>, StoreError> {
    let text: Option<String> = row
        .try_get("version")
        .map_err(|e| StoreError::Corrupt(Corruption::from_source(e)))?;
    text.map(|t| {
        Version::from_encoded(&t)
            .map_err(|_| StoreError::Corrupt(format!("stored version {t:?}").into()))
    })
    .transpose()
}

fn column<T>(row: &PgRow, name: &str) -> Result<T, StoreError>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(name)
        .map_err(|e| StoreError::Corrupt(Corruption::from_source(e)))
}

fn remaining(row: &PgRow) -> Result<Duration, StoreError> {
    let ms: Option<i64> = column(row, "remaining_ms")?;
    Ok(Duration::from_millis(
        ms.and_then(|m| u64::try_from(m).ok()).unwrap_or(0),
    ))
}

/// What an entity's row says about an event of `version` that did not get
/// it: another kind, stale, or (else) held.
fn refusal(current: Option<Version>, version: Version, held_for: Duration) -> VersionBegin {
    match current {
        Some(c) if c.kind() != version.kind() => VersionBegin::Mixed { current: c },
        Some(c) if version <= c => VersionBegin::Stale { current: c },
        _ => VersionBegin::InFlight {
            lease_remaining: held_for,
        },
    }
}

impl PostgresStore {
    fn version_sql(&self, sql: &str) -> String {
        // The schema name is validated (a-z, 0-9, _): quoting makes it an
        // identifier.
        sql.replace("{schema}", &format!("\"{}\"", self.shared.schema))
    }

    async fn version_fenced(
        &self,
        sql: &str,
        entity: &StoreKey,
        token: Token,
        bind: impl FnOnce(
            sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
        )
            -> sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Fence, StoreError> {
        let sql = self.version_sql(sql);
        let q = sqlx::query(&sql)
            .bind(entity.as_str())
            .bind(token.as_u128().to_be_bytes());
        let row = self.call(bind(q).fetch_optional(&self.shared.pool)).await?;
        Ok(if row.is_some() {
            Fence::Held
        } else {
            Fence::Lost
        })
    }

    /// Runs `f` on a transaction only if `version` is newer than the
    /// highest version committed for `entity`, and commits `f`'s writes
    /// together with the entity's new version (protocol §13): the business
    /// write and the version commit together or not at all.
    ///
    /// In ONE transaction: lock the entity's row (`idem_versions`, created
    /// if new), compare, run `f`'s writes, store `version`, commit.
    ///
    /// - `version` ≤ the entity's version → [`Applied::Stale`], `f` does
    ///   not run, nothing is written.
    /// - `f` returns `Err` (or panics, or the call is cancelled):
    ///   everything rolls back; the error comes back as
    ///   [`ApplyError::Failed`].
    /// - another transaction holds the entity: under `reject` (the
    ///   default `rules.concurrent`) it waits 10 ms for it at most, then
    ///   answers [`ApplyError::InProgress`]; under `wait` it rolls back,
    ///   giving its connection back, and looks again (after 2 ms, doubling
    ///   to 100 ms) for `rules.wait_timeout`, then decides again (run, or
    ///   stale). An event held by the non-transactional guard
    ///   ([`Engine::apply_if_newer`](crate::Engine::apply_if_newer)) is
    ///   waited for or rejected the same way.
    /// - a version of the other kind (integer vs timestamp) →
    ///   [`ApplyError::Mixed`].
    /// - a failed `COMMIT` is [`ApplyError::Store`]; a redelivery finds
    ///   out safely: stale if it committed, run if it did not.
    ///
    /// To make the same event idempotent by its message id as well, nest
    /// nothing: a redelivery of an applied event is already
    /// `Stale { current: version }`.
    ///
    /// ```no_run
    /// # async fn demo(store: idem::store::postgres::PostgresStore) -> Result<(), Box<dyn std::error::Error>> {
    /// use idem::{Rules, Scope, StoreKey, Version};
    /// use idem::store::postgres::sqlx;
    ///
    /// let sub = StoreKey::new(&Scope::named("billing"), "subscription-7");
    /// let outcome = store
    ///     .transaction_if_newer(&sub, Version::Number(2), &Rules::wait(), |tx| {
    ///         Box::pin(async move {
    ///             sqlx::query("UPDATE subscriptions SET state = 'cancelled' WHERE id = 7")
    ///                 .execute(&mut **tx)
    ///                 .await?;
    ///             Ok::<_, sqlx::Error>(())
    ///         })
    ///     })
    ///     .await?;
    /// println!("{outcome:?}");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// See above.
    pub async fn transaction_if_newer<T, E, F>(
        &self,
        entity: &StoreKey,
        version: Version,
        rules: &Rules,
        f: F,
    ) -> Result<Applied<T>, ApplyError<E>>
    where
        T: Send,
        E: Send,
        F: for<'c> FnOnce(&'c mut PgTransaction) -> TxFuture<'c, T, E> + Send,
    {
        let deadline = Instant::now() + rules.wait_timeout;
        let mut pause = FIRST_PAUSE;
        let mut tx = loop {
            let (tx, begun) = self.lock_entity(entity).await.map_err(ApplyError::Store)?;
            let refused = match begun {
                Locked::Free(current) => match refusal(current, version, Duration::ZERO) {
                    // Newer than the entity's version: the row is ours.
                    VersionBegin::InFlight { .. } => break tx,
                    other => other,
                },
                Locked::Held(current, held_for) => refusal(current, version, held_for),
                Locked::Busy => VersionBegin::InFlight {
                    lease_remaining: Duration::from_secs(1),
                },
                Locked::Failed(e) => {
                    rollback(tx).await;
                    return Err(ApplyError::Store(e));
                }
            };
            rollback(tx).await;
            match refused {
                VersionBegin::Stale { current } => return Ok(Applied::Stale { current }),
                VersionBegin::Mixed { current } => return Err(ApplyError::Mixed { current }),
                VersionBegin::InFlight { lease_remaining }
                | VersionBegin::Acquired(Lease {
                    duration: lease_remaining,
                    ..
                }) => {
                    let now = Instant::now();
                    if rules.concurrent == Concurrent::Reject || now >= deadline {
                        return Err(ApplyError::InProgress {
                            retry_after: lease_remaining,
                        });
                    }
                    tokio::time::sleep(pause.min(deadline - now)).await;
                    pause = (pause * 2).min(MAX_PAUSE);
                }
            }
        };
        // `f` runs under the database's own settings, not the lock's bounds.
        let reset = self
            .call(sqlx::Executor::execute(
                &mut *tx,
                "SET LOCAL lock_timeout TO DEFAULT; SET LOCAL statement_timeout TO DEFAULT",
            ))
            .await;
        if let Err(e) = reset {
            rollback(tx).await;
            return Err(ApplyError::Store(e));
        }
        let value = match f(&mut tx).await {
            Ok(value) => value,
            Err(e) => {
                rollback(tx).await;
                return Err(ApplyError::Failed(e));
            }
        };
        let set = self.version_sql(SET);
        let stored = self
            .call(
                sqlx::query(&set)
                    .bind(entity.as_str())
                    .bind(version.encoded())
                    .execute(&mut *tx),
            )
            .await;
        if let Err(e) = stored {
            rollback(tx).await;
            return Err(ApplyError::Store(e));
        }
        self.call(tx.commit()).await.map_err(ApplyError::Store)?;
        Ok(Applied::Applied(value))
    }

    /// BEGIN and lock the entity's row, waiting at most [`LOCK_WAIT`] for
    /// another transaction's lock.
    async fn lock_entity(&self, entity: &StoreKey) -> Result<(PgTransaction, Locked), StoreError> {
        let begin = format!(
            "BEGIN; SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = {}",
            LOCK_WAIT.as_millis(),
            (LOCK_WAIT + self.shared.timeout).as_millis()
        );
        let mut tx = self.call(self.shared.pool.begin_with(begin)).await?;
        let sql = self.version_sql(LOCK);
        let bound = self.shared.timeout + LOCK_WAIT;
        let row = tokio::time::timeout(
            bound,
            sqlx::query(&sql).bind(entity.as_str()).fetch_one(&mut *tx),
        )
        .await;
        let locked = match row {
            Err(_) => Locked::Failed(StoreError::Timeout(bound)),
            Ok(Err(e)) if is_contention(&e) => Locked::Busy,
            Ok(Err(e)) => Locked::Failed(store_error(e, self.shared.timeout)),
            Ok(Ok(row)) => match (stored(&row), column::<bool>(&row, "held"), remaining(&row)) {
                (Ok(current), Ok(false), _) => Locked::Free(current),
                (Ok(current), Ok(true), Ok(left)) => Locked::Held(current, left),
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => Locked::Failed(e),
            },
        };
        Ok((tx, locked))
    }
}

/// What [`PostgresStore::lock_entity`] found.
enum Locked {
    /// The row is ours (locked) and no event holds it: its version.
    Free(Option<Version>),
    /// A non-transactional event holds it (its version, time left).
    Held(Option<Version>, Duration),
    /// Another transaction holds the row lock.
    Busy,
    /// The statement failed.
    Failed(StoreError),
}

async fn rollback(tx: PgTransaction) {
    if let Err(e) = tx.rollback().await {
        tracing::debug!(error = %e, "rollback failed; the connection is discarded");
    }
}

/// Another transaction's row lock outlasted `lock_timeout` (or, under a
/// stricter isolation level, a serialization failure or deadlock).
fn is_contention(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if matches!(db.code().as_deref(), Some("55P03" | "40001" | "40P01")))
}

impl VersionStore for PostgresStore {
    async fn begin_version(
        &self,
        entity: &StoreKey,
        version: Version,
        lease: Duration,
    ) -> Result<VersionBegin, StoreError> {
        let token = Token::generate();
        let sql = self.version_sql(BEGIN);
        let row = self
            .call(
                sqlx::query(&sql)
                    .bind(entity.as_str())
                    .bind(version.encoded())
                    .bind(token.as_u128().to_be_bytes())
                    .bind(micros(lease))
                    .fetch_one(&self.shared.pool),
            )
            .await?;
        if column::<bool>(&row, "acquired")? {
            return Ok(VersionBegin::Acquired(Lease {
                token,
                duration: lease,
            }));
        }
        Ok(refusal(stored(&row)?, version, remaining(&row)?))
    }

    async fn commit_version(
        &self,
        entity: &StoreKey,
        token: Token,
        version: Version,
    ) -> Result<Fence, StoreError> {
        self.version_fenced(COMMIT, entity, token, |q| q.bind(version.encoded()))
            .await
    }

    async fn abort_version(&self, entity: &StoreKey, token: Token) -> Result<Fence, StoreError> {
        self.version_fenced(ABORT, entity, token, |q| q).await
    }

    async fn extend_version(
        &self,
        entity: &StoreKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        self.version_fenced(EXTEND, entity, token, |q| q.bind(micros(lease)))
            .await
    }

    async fn current_version(&self, entity: &StoreKey) -> Result<Option<Version>, StoreError> {
        let sql = self.version_sql(GET);
        let row = self
            .call(
                sqlx::query(&sql)
                    .bind(entity.as_str())
                    .fetch_optional(&self.shared.pool),
            )
            .await?;
        match row {
            Some(row) => stored(&row),
            None => Ok(None),
        }
    }
}
