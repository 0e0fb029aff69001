//! The connections the request path's statements run on (reserve,
//! complete, release, extend, get): a pool of plain connections that,
//! unlike sqlx's, does not ping a connection each time it comes back.
//!
//! sqlx's pool pings every connection given back to it, in a task of its
//! own, and that cannot be turned off: each statement then held its
//! connection for two round trips, and the pool served half the statements
//! per connection that `pgbench` does over the same connections (see the
//! module docs, Round trips; BENCHMARKS.md). Here a connection is given
//! back as it is, and checked when it is next taken out, only if it was
//! idle for `RECHECK_AFTER` or more (a ping, as before). A statement that
//! did not finish (its time-out fired, or the request went away
//! mid-statement) may leave its connection mid-protocol: such a connection
//! is marked and closed when next taken out, never used again. One that
//! failed with a broken connection is closed at once.
//!
//! The pool is `deadpool`'s (waiting, bounds, handing out); sqlx's pool
//! stays for everything else (queues, jobs, versions, transactions, and the
//! application's own queries through [`super::PostgresStore::pool`]).

use std::sync::Arc;

use deadpool::managed::{self, Metrics, Object, RecycleError, RecycleResult};
use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgRow};
use sqlx::query::Query;
use sqlx::{Connection, Postgres};

use super::batch::{Complete, Queue, Reserve};
use super::{set_up, RECHECK_AFTER};

/// Makes and checks the request path's connections.
#[derive(Debug, Clone)]
pub(super) struct Manager {
    options: PgConnectOptions,
    /// `statement_timeout`, in ms, set on every connection.
    statement_timeout: String,
}

/// One connection, and whether its last statement finished.
#[derive(Debug)]
pub(super) struct Conn {
    pub(super) raw: PgConnection,
    /// False from the start of a statement until its answer is read.
    pub(super) clean: bool,
}

impl managed::Manager for Manager {
    type Type = Conn;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<Conn, sqlx::Error> {
        let mut raw = PgConnection::connect_with(&self.options).await?;
        set_up(&mut raw, &self.statement_timeout).await?;
        Ok(Conn { raw, clean: true })
    }

    async fn recycle(&self, conn: &mut Conn, metrics: &Metrics) -> RecycleResult<sqlx::Error> {
        if !conn.clean {
            return Err(RecycleError::message(
                "a statement did not finish on this connection",
            ));
        }
        if metrics.last_used() >= RECHECK_AFTER {
            conn.raw.ping().await?;
        }
        Ok(())
    }
}

/// The request path's pool.
pub(super) type Pool = managed::Pool<Manager>;

/// A pool of at most `max` connections to `options`, each set up with the
/// server-side `statement_timeout` (ms). Connections are made when first
/// needed.
pub(super) fn pool(
    options: PgConnectOptions,
    statement_timeout: String,
    max: u32,
) -> Result<Pool, sqlx::Error> {
    let manager = Manager {
        options,
        statement_timeout,
    };
    Pool::builder(manager)
        .max_size(usize::try_from(max).unwrap_or(usize::MAX).max(1))
        .build()
        .map_err(|e| sqlx::Error::Configuration(e.into()))
}

/// The request path's pool, and the statements waiting for its
/// connections to go as one (`batch.rs`).
pub(super) struct Hot {
    pub(super) pool: Pool,
    pub(super) reserves: Queue<Reserve>,
    pub(super) completes: Queue<Complete>,
}

impl Hot {
    pub(super) fn new(pool: Pool) -> Arc<Self> {
        Arc::new(Self {
            pool,
            reserves: Queue::default(),
            completes: Queue::default(),
        })
    }

    /// A pool making connections as this one does, of at most `max` (a
    /// thread's own: [`super::PostgresStore::pin_to_thread`]). Lazy, as
    /// [`pool`]: its connections are made when first needed, on the
    /// runtime of the thread that needs them.
    pub(super) fn like(&self, max: usize) -> Result<Arc<Self>, sqlx::Error> {
        Pool::builder(self.pool.manager().clone())
            .max_size(max.max(1))
            .build()
            .map(Self::new)
            .map_err(|e| sqlx::Error::Configuration(e.into()))
    }
}

/// A connection taken out of a pool.
pub(super) type Taken = Object<Manager>;

/// A connection of `pool` (waiting for one if all are in use; bounded by
/// the caller's time-out).
pub(super) async fn take(pool: &Pool) -> Result<Taken, sqlx::Error> {
    pool.get().await.map_err(|e| match e {
        managed::PoolError::Backend(e) => e,
        managed::PoolError::Closed => sqlx::Error::PoolClosed,
        other => sqlx::Error::Io(std::io::Error::other(other.to_string())),
    })
}

/// A statement with its arguments bound.
pub(super) type Statement<'q> = Query<'q, Postgres, PgArguments>;

/// Runs `statement` on a connection of `pool`: marked unclean until it
/// answers, then given back or closed ([`finish`]).
pub(super) async fn on_connection<T>(
    pool: &Pool,
    statement: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
) -> Result<T, sqlx::Error> {
    let mut conn = take(pool).await?;
    conn.clean = false;
    let result = statement(&mut conn.raw).await;
    finish(conn, result)
}

/// Runs `query` on a connection of `pool` and reads its one row.
pub(super) async fn fetch_one(pool: &Pool, query: Statement<'_>) -> Result<PgRow, sqlx::Error> {
    on_connection(pool, async |conn| query.fetch_one(conn).await).await
}

/// Runs `query` on a connection of `pool` and reads its row, if any.
pub(super) async fn fetch_optional(
    pool: &Pool,
    query: Statement<'_>,
) -> Result<Option<PgRow>, sqlx::Error> {
    on_connection(pool, async |conn| query.fetch_optional(conn).await).await
}

/// Runs `query` on a connection of `pool` and reads all its rows.
pub(super) async fn fetch_all(
    pool: &Pool,
    query: Statement<'_>,
) -> Result<Vec<PgRow>, sqlx::Error> {
    on_connection(pool, async |conn| query.fetch_all(conn).await).await
}

/// Runs `query` on a connection of `pool`; how many rows it changed.
pub(super) async fn execute(pool: &Pool, query: Statement<'_>) -> Result<u64, sqlx::Error> {
    on_connection(pool, async |conn| {
        query.execute(conn).await.map(|done| done.rows_affected())
    })
    .await
}

/// Marks the connection clean once the server answered its statement
/// (rows, none, or an error of the server's own); closes it (takes it out
/// of the pool) on any other error: I/O, protocol, TLS, and whatever else
/// leaves its state in doubt.
fn finish<T>(conn: Taken, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
    if let Err(e) = &result {
        give_back(conn, e);
    } else {
        give_back_clean(conn);
    }
    result
}

/// Gives `conn` back after its statement failed with `error`: to the pool
/// if the server answered (an error of its own, not one that ends the
/// connection), else closed.
pub(super) fn give_back(conn: Taken, error: &sqlx::Error) {
    match error {
        sqlx::Error::Database(db) if !fatal(&**db) => give_back_clean(conn),
        sqlx::Error::RowNotFound => give_back_clean(conn),
        _ => drop(Object::take(conn)),
    }
}

/// Whether the server's error ends the connection: class 08 (connection
/// exception) or 57P (the server shutting down, crashed, or not accepting
/// connections yet).
pub(super) fn fatal(db: &dyn sqlx::error::DatabaseError) -> bool {
    db.code()
        .is_some_and(|code| code.starts_with("08") || code.starts_with("57P"))
}

/// Gives `conn` back to the pool: its statement was answered.
fn give_back_clean(mut conn: Taken) {
    conn.clean = true;
}
