//! The PostgreSQL store (protocol §7, feature `postgres`): many instances,
//! durability, and exactly-once *with* business data.
//!
//! [`PostgresStore::connect`] (or [`PostgresStore::builder`]) opens a pool,
//! runs the embedded migration (unless disabled), starts ONE listener
//! connection for notifications and a clean-up task. Everything it runs is
//! in `src/store/postgres/sql/*.sql`, one file per statement, each with an
//! `-- Atomicity:` note (sent without their comment lines); the statements
//! are plain strings checked by the tests, so building needs no database.
//!
//! This file holds the builder, the store and its [`Store`] calls; the
//! rest is split by concern: `row.rs` decodes rows into records,
//! `listener.rs` is the `LISTEN` connection, `transaction.rs` is
//! [`PostgresStore::transaction`], built on the same statements and rows,
//! `wait.rs` is how its duplicates wait for an open transaction, and
//! `queue.rs` (with `request.rs`, the stored form of a request) is async
//! mode's [`Queue`](super::Queue).
//!
//! # Table
//!
//! One table, `"<schema>".idem_records` (schema `idem` by default, see
//! [`PostgresStoreBuilder::schema`]), one row per scoped key:
//!
//! | column | type | meaning |
//! |---|---|---|
//! | `key` | `text COLLATE "C"` primary key | the [`StoreKey`], `hex(scope):key` |
//! | `state` | `smallint` | 1 = in flight, 2 = completed, 3 = pending operation, 4 = running operation |
//! | `token` | `bytea` | the holder's fencing token (16 bytes; empty while an operation is pending) |
//! | `fingerprint` | `bytea` | the request's fingerprint (32 bytes) |
//! | `started_at` | `timestamptz` | when the reservation was taken (an operation: accepted) |
//! | `expires_at` | `timestamptz`, indexed | end of the lease (in flight) or of retention (completed); `infinity` for a live operation |
//! | `completed_at` | `timestamptz` | when it completed |
//! | `status`, `header_names`, `header_values`, `body` | `integer`, `text[]`, `bytea[]`, `bytea` | the stored response, byte for byte |
//! | `waiters` | `boolean` | someone may wait: complete and release notify |
//! | `op_id` | `bytea`, unique partial index | an operation's id (16 bytes), kept until retention ends |
//! | `request` | `bytea` | a live operation's request (`request.rs`) |
//! | `attempts` | `integer` | an operation's upstream calls so far |
//! | `due_at` | `timestamptz`, partial index on states 3, 4 | when a live operation is next claimable: due (pending) or lease end (running) |
//! | `last_error` | `text` | why an operation's last attempt failed |
//!
//! A second table, `"<schema>".idem_jobs`, holds job traces (protocol §13,
//! `job.rs`): attempts counted by `Engine::once` / `once_job`, beside the
//! records and never read or written by `reserve` or `complete`.
//!
//! The migration is re-runnable (`IF NOT EXISTS` throughout) and takes a
//! transaction-scoped advisory lock, so any number of instances may start at
//! once. Turn it off with [`PostgresStoreBuilder::migrate`] when a DBA runs
//! `sql/migrate.sql` instead; [`PostgresStoreBuilder::check`] (a dry run,
//! for `idem serve --check`) and [`PostgresStore::schema_status`] say what
//! is in place ([`SchemaStatus`]) without creating anything.
//!
//! # Statements
//!
//! Every store call is ONE statement; leases and retention are measured with
//! the DATABASE clock (`statement_timestamp()`), never the client's, so
//! instances with skewed clocks agree.
//!
//! - `reserve`: `INSERT … ON CONFLICT (key) DO UPDATE SET <take over if
//!   expired, else write back unchanged> RETURNING …`. It always returns the
//!   row as it is after the statement, read under the row lock, so there is
//!   no second read and no read-then-write window; `token = $new` tells the
//!   caller it won.
//! - `complete`: `UPDATE … WHERE key = $1 AND token = $2` (a retry of a
//!   holder whose first answer was lost is acknowledged and changes nothing).
//! - `release`: `DELETE … WHERE key = $1 AND token = $2 AND state = 1`.
//! - `extend`: `UPDATE … SET expires_at = … WHERE key = $1 AND token = $2 AND
//!   state = 1`.
//! - `get`, `purge`: one `SELECT` / `DELETE` by key.
//!
//! # Async mode's queue
//!
//! An operation is its key's record in state 3 (pending) or 4 (running),
//! with `expires_at = 'infinity'`, so the statements above see it as a live
//! record and never take it over. Its queue steps are ONE statement each:
//!
//! - `enqueue`: `reserve`'s `INSERT … ON CONFLICT`, writing a pending
//!   operation, behind a gate that counts the live operations up to
//!   `max_pending` (a bound that concurrent enqueues can overshoot by their
//!   number minus one: see `enqueue.sql`).
//! - `claim`: `UPDATE … FROM (SELECT … WHERE state IN (3, 4) AND due_at <=
//!   now ORDER BY due_at LIMIT $n FOR UPDATE SKIP LOCKED)`, on the partial
//!   due index; `due_at` is the due time of a pending operation and the
//!   lease end of a running one, so expired claims are taken over by the
//!   same range scan.
//! - `retry`: `UPDATE … WHERE key = $1 AND token = $2 AND state = 4`.
//! - `operation`: one `SELECT` through the unique `op_id` index.
//!
//! `complete` turns a running operation into a completed record that keeps
//! its id (and always notifies); `extend` moves a running operation's
//! `due_at`; `release` deletes a running one.
//!
//! # Notifications
//!
//! `complete`, `release` and `purge` call `pg_notify('<schema>_idem_changed',
//! key)` in the same statement, so the notification is delivered when (and
//! only if) the change commits; the store also wakes the waiters of its
//! own process directly. Each store keeps ONE listener connection
//! (`LISTEN`) that feeds the crate's [`Notifier`]; [`Store::subscribe`] just
//! subscribes to that notifier, so a waiting duplicate holds no pooled
//! connection. The listener runs on the stores' shared background loop
//! (`store/background.rs`, as Redis's subscriber does): when its connection
//! is lost it reconnects (at once, then with pauses from 100 ms doubling to
//! 5 s, each attempt bounded by the time-out) and wakes every waiter
//! ([`Notifier::notify_all`]), since notifications may have been missed
//! meanwhile; waiters poll as well, so a lost notification only delays
//! them. [`PostgresStore::is_listening`] says whether it is up. `reserve` and `extend` notify nobody: no waiter waits
//! for them, and `NOTIFY` makes committing transactions queue on one lock.
//!
//! # Clean-up
//!
//! Expired rows already read as absent; a background task deletes them in
//! batches ([`PostgresStoreBuilder::cleanup_batch`], default 1000) every
//! [`PostgresStoreBuilder::cleanup_interval`] (default 60 s), walking the
//! `expires_at` index and skipping rows that are locked right now. Any
//! number of instances may run it. The task stops when the store is dropped.
//!
//! # Time-outs and errors
//!
//! Every call is bounded by [`PostgresStoreBuilder::timeout`] (default 2 s)
//! on the client, and the same `statement_timeout` is set on the server so
//! an abandoned statement stops there too: either way the caller gets
//! [`StoreError::Timeout`]. A server that cannot be reached shows as
//! [`StoreError::Unavailable`] with its reason at start-up, and as
//! `Timeout` later (the pool retries connecting until the time-out); a
//! statement the server refuses is `Unavailable`; rows that cannot be
//! decoded are [`StoreError::Corrupt`].
//!
//! # Round trips
//!
//! The request path's statements (reserve, complete, release, extend,
//! get) take a connection of the store's own pool (`hot.rs`, at most
//! [`PostgresStoreBuilder::max_connections`]), run (one round trip: sqlx
//! prepares each statement once per connection, then sends bind, execute
//! and sync together and reads until the server is ready again, so the
//! statement has committed when the call returns), and give the connection
//! back as it is. A connection idle for `RECHECK_AFTER` (1 s) or more is
//! pinged before a statement runs on it (a server restart or a dropped
//! connection is then found first); one whose statement did not finish
//! (time-out, or the caller went away) is closed, never reused. A fresh
//! request (reserve, complete) is two round trips, as `pgbench` running
//! the same two statements; under load, fewer: the reserves (and the
//! completes) waiting for a connection at the same moment go as one
//! statement, one round trip and one commit for all of them (group
//! commit, `batch.rs`; docs/postgres.md). Everything else (queues, jobs, versions,
//! transactions, clean-up) runs on sqlx's pool ([`PostgresStore::pool`]),
//! which pings each connection when it comes back (one more round trip, in
//! a task of its own, which sqlx does not let one turn off): that is why
//! the request path has a pool of its own. Each pool opens connections
//! when first needed, up to `max_connections` each.
//! The test `an_idle_connection_that_died_is_replaced_before_use`
//! (`tests/postgres.rs`) kills an idle pooled connection and checks that
//! the next call succeeds.
//!
//! # `plan_cache_mode`
//!
//! Every pooled connection sets `plan_cache_mode = force_custom_plan` when
//! it connects. sqlx prepares each statement once per connection, and after
//! five executions PostgreSQL may switch a prepared statement to a *generic*
//! plan, kept for the life of the connection; one chosen while the table was
//! empty can be a sequential scan (protocol §7 measured a 7× throughput drop).
//! Custom plans are re-planned with the actual key, which
//! costs a few microseconds and always uses the primary key index. The test
//! `guarded_statements_use_the_index_under_load` (`tests/postgres.rs`)
//! checks the setting, that no statement ever ran a generic plan over a
//! 50 000-row table, and the plans themselves.
//!
//! # Transactions: exactly once with business data
//!
//! [`PostgresStore::transaction`] reserves the key, runs the caller's writes
//! on the SAME transaction, stores the result and commits once: the business
//! effect and its idempotency record commit or roll back together. See its
//! docs for how duplicates behave: in `wait` mode they never wait on the
//! holder's row lock with a pooled connection in hand (a burst of them
//! would starve every other key), but roll back and wait like the engine's
//! waiters, one watcher per key (`wait.rs`).

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{
    PgArguments, PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow, Postgres,
};
use sqlx::query::Query;
use sqlx::Connection as _;

/// The sqlx this store is built on, for writing [`PostgresStore::transaction`]
/// closures with the same version.
pub use sqlx;
pub use status::SchemaStatus;
pub use transaction::{PgTransaction, TxFuture};

use super::background::{self, AbortOnDrop, ChangeFeed, Listening};
use super::pin::{self, ThreadPin};
use super::{Fence, Notifier, Reservation, Store, StoreError, Subscription};
use crate::error::{ConfigError, Corruption};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::record::{CompletedRecord, Record, StoredResponse, Token};
use listener::Feed;
use row::{completed, fingerprint, flag, remaining, state, time, COMPLETED};
use wait::Watchers;

mod batch;
mod hot;
mod job;
mod listener;
mod queue;
mod request;
mod row;
mod status;
mod transaction;
mod version;
mod wait;

const MIGRATE: &str = include_str!("sql/migrate.sql");
const RESERVE: &str = include_str!("sql/reserve.sql");
const RESERVE_MANY: &str = include_str!("sql/reserve_many.sql");
const COMPLETE_MANY: &str = include_str!("sql/complete_many.sql");
const COMPLETE: &str = include_str!("sql/complete.sql");
const RELEASE: &str = include_str!("sql/release.sql");
const EXTEND: &str = include_str!("sql/extend.sql");
const GET: &str = include_str!("sql/get.sql");
const PURGE: &str = include_str!("sql/purge.sql");
const CLEANUP: &str = include_str!("sql/cleanup.sql");
const ENQUEUE: &str = include_str!("sql/enqueue.sql");
const CLAIM: &str = include_str!("sql/claim.sql");
const RETRY: &str = include_str!("sql/retry.sql");
const OPERATION: &str = include_str!("sql/operation.sql");
const QUEUE_STATS: &str = include_str!("sql/queue_stats.sql");

/// Run on every pooled connection when it connects; `$1` is the time-out in
/// ms. See the module docs on `plan_cache_mode` (protocol §7).
const SETUP: &str = "SELECT set_config('plan_cache_mode', 'force_custom_plan', false), \
                     set_config('statement_timeout', $1, false)";

/// Sets a new connection's session up (`SETUP`, `statement_timeout` in
/// ms): run on connect by both pools (sqlx's and `hot.rs`).
async fn set_up(conn: &mut PgConnection, statement_timeout: &str) -> Result<(), sqlx::Error> {
    sqlx::query(SETUP)
        .bind(statement_timeout)
        .execute(conn)
        .await
        .map(drop)
}

/// A pooled connection idle for this long is pinged before it is used
/// (see the module docs, Round trips).
const RECHECK_AFTER: Duration = Duration::from_secs(1);

/// Longest lease or retention written (100 years): keeps `now() + d` within
/// PostgreSQL's timestamp range.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// Longest schema name accepted, so the channel name fits in 63 bytes.
const MAX_SCHEMA_LEN: usize = 40;
/// What a valid schema name looks like (`MAX_SCHEMA_LEN` spelled out; a
/// test keeps the two in step).
const SCHEMA_RULE: &str = "use 1–40 characters of a-z, 0-9 and _, not starting with a digit";
/// The database URL, in configuration errors.
const URL: &str = "database URL";

/// Settings of a [`PostgresStore`]; finish with
/// [`PostgresStoreBuilder::connect`].
#[derive(Clone)]
#[must_use]
pub struct PostgresStoreBuilder {
    url: String,
    schema: String,
    max_connections: u32,
    timeout: Duration,
    migrate: bool,
    cleanup_interval: Option<Duration>,
    cleanup_batch: u32,
    /// PEM roots when the URL names no `sslrootcert` (feature `tls`).
    #[cfg(feature = "tls")]
    tls_ca: Option<Vec<u8>>,
}

impl fmt::Debug for PostgresStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry a password: never print it.
        f.debug_struct("PostgresStoreBuilder")
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .field("timeout", &self.timeout)
            .field("migrate", &self.migrate)
            .field("cleanup_interval", &self.cleanup_interval)
            .field("cleanup_batch", &self.cleanup_batch)
            .finish_non_exhaustive()
    }
}

impl PostgresStoreBuilder {
    /// Settings for the database at `url` (`postgres://user@host:port/db`
    /// or `postgresql://…`, the scheme in any case), with the defaults: schema `idem`, 10 connections, 2 s time-out,
    /// migration on, clean-up every 60 s in batches of 1000.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: "idem".into(),
            max_connections: 10,
            timeout: Duration::from_secs(2),
            migrate: true,
            cleanup_interval: Some(Duration::from_secs(60)),
            cleanup_batch: 1000,
            #[cfg(feature = "tls")]
            tls_ca: None,
        }
    }

    /// Trusts the certificates in `pem` (PEM `CERTIFICATE` blocks) when
    /// the URL names no `sslrootcert`. TLS itself is the URL's
    /// `sslmode` (`disable`, `prefer`, the default, `require`,
    /// `verify-ca`, `verify-full`), as with libpq. Feature `tls`.
    #[cfg(feature = "tls")]
    pub fn tls_ca(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_ca = Some(pem.into());
        self
    }

    /// The schema holding the table: 1–40 characters of `a-z`, `0-9` and
    /// `_`, not starting with a digit. Default `idem`.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Most pooled connections of each of the store's two pools: the
    /// request path's and sqlx's for everything else (module docs, Round
    /// trips); the listener has one more of its own. Default 10.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Bound of every store call, on the client and as the connections'
    /// `statement_timeout`. Default 2 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Whether [`connect`](Self::connect) runs the embedded migration.
    /// Default on. Off, `connect` creates nothing in the database: it
    /// checks that the server answers and warns (a log line) when the
    /// schema or table is not in place; [`check`](Self::check) says so
    /// without connecting a store, [`PostgresStore::schema_status`] with
    /// one.
    pub fn migrate(mut self, on: bool) -> Self {
        self.migrate = on;
        self
    }

    /// How often expired rows are deleted; `None` turns the task off (run
    /// [`PostgresStore::delete_expired`] yourself). Default 60 s.
    pub fn cleanup_interval(mut self, every: Option<Duration>) -> Self {
        self.cleanup_interval = every;
        self
    }

    /// Rows deleted per clean-up statement. Default 1000.
    pub fn cleanup_batch(mut self, rows: u32) -> Self {
        self.cleanup_batch = rows.max(1);
        self
    }

    /// The connection settings, once the URL and the schema name are
    /// checked.
    fn options(&self) -> Result<PgConnectOptions, StoreError> {
        if !valid_schema(&self.schema) {
            return Err(ConfigError::Name {
                what: "schema name",
                name: self.schema.clone(),
                rule: SCHEMA_RULE,
            }
            .into());
        }
        // sqlx's parser does not insist on the scheme (with some url
        // features it reads `mysql://…` as a host to look up): check it here.
        if !has_postgres_scheme(&self.url) {
            return Err(ConfigError::Scheme {
                what: URL,
                expected: "postgres:// or postgresql://",
            }
            .into());
        }
        let options = PgConnectOptions::from_str(&self.url).map_err(|e| {
            StoreError::from(ConfigError::Url {
                what: URL,
                source: Box::new(e),
            })
        })?;
        #[cfg(feature = "tls")]
        if let Some(pem) = &self.tls_ca {
            if !self.url.to_ascii_lowercase().contains("sslrootcert=") {
                return Ok(options.ssl_root_cert_from_pem(pem.clone()));
            }
        }
        Ok(options)
    }

    /// Connects, migrates (unless [disabled](Self::migrate)), and starts
    /// the listener and the clean-up task. To check the settings and the
    /// server without creating or starting anything, see
    /// [`check`](Self::check).
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] for a malformed URL or schema name;
    /// [`StoreError::Unavailable`] or [`StoreError::Timeout`] when the
    /// database cannot be reached or the migration fails.
    pub async fn connect(self) -> Result<PostgresStore, StoreError> {
        let options = self.options()?;
        let timeout = self.timeout;
        let sql = Statements::new(&self.schema);

        // protocol §7: a generic plan chosen while the table was empty stays a
        // sequential scan for the life of the connection; custom plans use
        // the index. See the module docs.
        let statement_timeout = timeout.as_millis().max(1).to_string();
        // Both pools are lazy: nothing is connected here.
        let hot = hot::pool(
            options.clone(),
            statement_timeout.clone(),
            self.max_connections,
        )
        .map(hot::Hot::new)
        .map_err(|e| store_error(e, timeout))?;
        let pool = PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(timeout)
            // sqlx pings a connection when it comes back to the pool; by
            // default it pings it again when it is taken out, one more
            // round trip per statement. Only a connection idle for a while
            // is checked again (module docs, Round trips).
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= RECHECK_AFTER {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .after_connect(move |conn, _meta| {
                let statement_timeout = statement_timeout.clone();
                Box::pin(async move { set_up(conn, &statement_timeout).await })
            })
            .connect_lazy_with(options.clone());
        // Reach the server once now, so a wrong URL, password or database
        // fails at start-up with its reason.
        let status = status::reach(&options, &self.schema, timeout).await?;
        if self.migrate {
            migrate(&pool, &sql, timeout).await?;
        } else if !status.is_ready() {
            tracing::warn!(
                schema = %self.schema,
                %status,
                "migration is off and the records table is not in place: store calls fail \
                 until it is (run sql/migrate.sql, or turn migration on)"
            );
        }

        // Listen before the store exists, so that construction fails with
        // the reason when it cannot.
        let notifier = Notifier::new();
        let mut feed = Feed::new(options, sql.channel.clone(), timeout);
        let first = feed.subscribe().await?;
        let listener =
            background::listen(feed, notifier.clone(), listener::backoff()).subscribed(first);
        let listening = listener.listening();
        let mut tasks = AbortOnDrop::new();
        tasks.spawn(listener.run());
        if let Some(every) = self.cleanup_interval {
            let cleaner = Cleaner {
                pool: pool.clone(),
                sql: vec![sql.cleanup.clone(), sql.jobs.cleanup.clone()],
                batch: i64::from(self.cleanup_batch),
                timeout,
            };
            tasks.spawn(cleaner.run(every));
        }
        Ok(PostgresStore {
            shared: Arc::new(Shared {
                pool,
                hot,
                id: pin::next_id(),
                sql: Arc::new(sql),
                schema: self.schema,
                timeout,
                cleanup_batch: i64::from(self.cleanup_batch),
                notifier,
                listening,
                watchers: Watchers::default(),
                _tasks: tasks,
            }),
        })
    }
}

/// The PostgreSQL store. Cheap to clone; clones share the pool, the
/// listener and the clean-up task, which stop when the last clone drops.
#[derive(Clone)]
pub struct PostgresStore {
    shared: Arc<Shared>,
}

struct Shared {
    pool: PgPool,
    /// The request path's statements (`hot.rs`), on threads without a pool
    /// of their own ([`PostgresStore::pin_to_thread`]).
    hot: Arc<hot::Hot>,
    /// This store's key in the threads' tables of their own pools.
    id: u64,
    /// Shared with the batches' tasks (`batch.rs`).
    sql: Arc<Statements>,
    schema: String,
    timeout: Duration,
    cleanup_batch: i64,
    notifier: Notifier,
    /// Whether the listener is up.
    listening: Listening,
    /// Transactional duplicates waiting for an open transaction (`wait.rs`).
    watchers: Watchers,
    /// The listener and the clean-up task, stopped with the store.
    _tasks: AbortOnDrop,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.shared.schema)
            .field("timeout", &self.shared.timeout)
            .finish_non_exhaustive()
    }
}

/// The statements, with the schema filled in.
struct Statements {
    migrate: String,
    reserve: String,
    complete: String,
    /// The request path's reserve and complete, batched (`batch.rs`).
    reserve_many: String,
    complete_many: String,
    release: String,
    extend: String,
    get: String,
    purge: String,
    cleanup: String,
    enqueue: String,
    claim: String,
    retry: String,
    operation: String,
    queue_stats: String,
    channel: String,
    /// Job traces (`job.rs`).
    jobs: job::Statements,
}

impl Statements {
    fn new(schema: &str) -> Self {
        // `schema` is validated (lowercase letters, digits, `_`), so quoting
        // it is enough to make it an identifier.
        let quoted = format!("\"{schema}\"");
        let table = format!("{quoted}.idem_records");
        let jobs = format!("{quoted}.idem_jobs");
        let fill = |sql: &str| {
            without_comments(
                &sql.replace("{schema}", &quoted)
                    .replace("{table}", &table)
                    .replace("{jobs}", &jobs),
            )
        };
        Self {
            migrate: format!("{}\n{}", fill(MIGRATE), fill(version::MIGRATE)),
            reserve: fill(RESERVE),
            reserve_many: fill(RESERVE_MANY),
            complete_many: fill(COMPLETE_MANY),
            complete: fill(COMPLETE),
            release: fill(RELEASE),
            extend: fill(EXTEND),
            get: fill(GET),
            purge: fill(PURGE),
            cleanup: fill(CLEANUP),
            enqueue: fill(ENQUEUE),
            claim: fill(CLAIM),
            retry: fill(RETRY),
            operation: fill(OPERATION),
            queue_stats: fill(QUEUE_STATS),
            channel: format!("{schema}_idem_changed"),
            jobs: job::Statements::new(fill),
        }
    }

    /// `reserve.sql` with its arguments: one key.
    fn reserve_one<'q>(
        &'q self,
        key: &'q StoreKey,
        token: Token,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Query<'q, Postgres, PgArguments> {
        sqlx::query(&self.reserve)
            .bind(key.as_str())
            .bind(token.as_u128().to_be_bytes())
            .bind(fingerprint.0)
            .bind(micros(lease))
    }

    /// `complete.sql` with its arguments: one key.
    fn complete_one<'q>(
        &'q self,
        key: &'q StoreKey,
        token: Token,
        response: &'q StoredResponse,
        retention: Duration,
    ) -> Query<'q, Postgres, PgArguments> {
        let names: Vec<&str> = response.headers.iter().map(|(n, _)| n.as_str()).collect();
        let values: Vec<&[u8]> = response.headers.iter().map(|(_, v)| &v[..]).collect();
        sqlx::query(&self.complete)
            .bind(key.as_str())
            .bind(token.as_u128().to_be_bytes())
            .bind(i32::from(response.status))
            .bind(names)
            .bind(values)
            .bind(&response.body[..])
            .bind(micros(retention))
            .bind(&self.channel)
    }
}

/// `sql` without its comment lines (those starting with `--`), as sent:
/// sqlx finds a connection's prepared statement by its text, hashing and
/// comparing it on every call, and the files' comments are most of it;
/// `pg_stat_activity` shows the first 1 KB (by default) of the statement
/// itself rather than of its comments.
fn without_comments(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    for line in sql.lines().filter(|l| !l.trim_start().starts_with("--")) {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Whether `url` starts with `postgres://` or `postgresql://`, in any case:
/// schemes are case-insensitive (RFC 3986 §3.1), and `AnyStore` accepts
/// them so.
fn has_postgres_scheme(url: &str) -> bool {
    ["postgres://", "postgresql://"].iter().any(|scheme| {
        url.get(..scheme.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
    })
}

fn valid_schema(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_SCHEMA_LEN
        && !b[0].is_ascii_digit()
        && b.iter()
            .all(|c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'_'))
}

async fn migrate(pool: &PgPool, sql: &Statements, timeout: Duration) -> Result<(), StoreError> {
    // One simple-query message: PostgreSQL runs its statements as ONE
    // implicit transaction, which holds the advisory lock to the end.
    bounded(timeout, sqlx::raw_sql(&sql.migrate).execute(pool))
        .await
        .map(drop)
}

impl PostgresStore {
    /// Connects to `url` with the default settings (see
    /// [`PostgresStoreBuilder::new`]).
    ///
    /// # Errors
    ///
    /// As [`PostgresStoreBuilder::connect`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder(url).connect().await
    }

    /// Settings for the database at `url`.
    pub fn builder(url: impl Into<String>) -> PostgresStoreBuilder {
        PostgresStoreBuilder::new(url)
    }

    /// Runs `sql` (no arguments) on one of the request path's connections
    /// (module docs, Round trips) and returns its rows, within the store's
    /// time-out: for looking at those connections' sessions
    /// (`SHOW plan_cache_mode`, `pg_prepared_statements`), which a
    /// connection of [`pool`](Self::pool) does not share.
    ///
    /// # Errors
    ///
    /// As any store call: [`StoreError::Timeout`],
    /// [`StoreError::Unavailable`].
    pub async fn request_path_rows(&self, sql: &str) -> Result<Vec<PgRow>, StoreError> {
        self.call(hot::fetch_all(&self.hot().pool, sqlx::query(sql)))
            .await
    }

    /// Gives the calling thread a request-path pool of its own (module docs,
    /// Round trips) of at most `max_connections`, its connections made on
    /// the calling thread's runtime, used by every statement of the request
    /// path (reserve, complete, release, extend, get) made on this thread
    /// while the returned pin lives; statements made elsewhere use the
    /// shared pool. For a thread that runs one current-thread runtime for
    /// its whole life, as each of the gateway's listener threads does: its
    /// statements then never wake another thread, and its pool is locked by
    /// no other (measured in BENCHMARKS.md). Drop the pin on its thread,
    /// before its runtime ends. A second pin of the same thread holds
    /// nothing. Nothing connects here: the pool is as lazy as the shared
    /// one.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] if the pool cannot be built.
    pub fn pin_to_thread(&self, max_connections: u32) -> Result<ThreadPin, StoreError> {
        if pin::has(self.shared.id) {
            return Ok(ThreadPin::none());
        }
        let max = usize::try_from(max_connections).unwrap_or(usize::MAX);
        let own = self
            .shared
            .hot
            .like(max)
            .map_err(|e| store_error(e, self.shared.timeout))?;
        Ok(pin::insert(self.shared.id, own))
    }

    /// The most connections of the request path's shared pool
    /// ([`PostgresStoreBuilder::max_connections`]).
    #[must_use]
    pub fn max_connections(&self) -> u32 {
        u32::try_from(self.shared.hot.pool.status().max_size).unwrap_or(u32::MAX)
    }

    /// The request path's pool of the calling thread: its own
    /// ([`Self::pin_to_thread`]) or the shared one.
    fn hot(&self) -> Arc<hot::Hot> {
        pin::get::<Arc<hot::Hot>>(self.shared.id).unwrap_or_else(|| Arc::clone(&self.shared.hot))
    }

    /// The connection pool (also usable for the application's own queries).
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.shared.pool
    }

    /// The schema holding the records table.
    #[must_use]
    pub fn schema(&self) -> &str {
        &self.shared.schema
    }

    /// The `NOTIFY` channel, `<schema>_idem_changed`.
    #[must_use]
    pub fn channel(&self) -> &str {
        &self.shared.sql.channel
    }

    /// Whether the listener connection is up right now. While it is down
    /// (it reconnects in the background), waiters still finish, by polling.
    #[must_use]
    pub fn is_listening(&self) -> bool {
        self.shared.listening.is_up()
    }

    /// Runs the embedded migration (again). Safe at any time, from any
    /// number of instances.
    ///
    /// # Errors
    ///
    /// When the database is unreachable or refuses the DDL.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        migrate(&self.shared.pool, &self.shared.sql, self.shared.timeout).await
    }

    /// Deletes every expired row now, in batches; returns how many. The
    /// background task does the same periodically.
    ///
    /// # Errors
    ///
    /// When a batch fails or times out (the rows deleted so far stay deleted).
    pub async fn delete_expired(&self) -> Result<u64, StoreError> {
        Cleaner {
            pool: self.shared.pool.clone(),
            sql: vec![
                self.shared.sql.cleanup.clone(),
                self.shared.sql.jobs.cleanup.clone(),
            ],
            batch: self.shared.cleanup_batch,
            timeout: self.shared.timeout,
        }
        .pass()
        .await
    }

    async fn call<T>(
        &self,
        fut: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        bounded(self.shared.timeout, fut).await
    }

    /// `fut`, a batched statement (`batch.rs`), within the store's
    /// time-out.
    async fn batched<T>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.shared.timeout, fut)
            .await
            .unwrap_or(Err(StoreError::Timeout(self.shared.timeout)))
    }

    /// The outcome of a fenced change. When it applied, waiters in this
    /// process are woken at once; other instances hear of it by NOTIFY.
    fn changed(&self, key: &StoreKey, held: bool) -> Result<Fence, StoreError> {
        if held {
            self.shared.notifier.notify(key);
        }
        fence(held)
    }

    /// Rolls back now, so row locks go at once; on failure the connection
    /// is dropped, which rolls back too.
    async fn rollback(&self, tx: PgTransaction) {
        if let Err(error) = self.call(tx.rollback()).await {
            tracing::debug!(%error, "rollback failed; the connection is discarded");
        }
    }
}

impl Store for PostgresStore {
    async fn reserve(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Reservation, StoreError> {
        let hot = self.hot();
        let reserve = batch::Reserve {
            key: key.clone(),
            token: Token::generate(),
            fingerprint,
            lease,
        };
        self.batched(batch::submit(
            &hot.pool,
            &hot.reserves,
            reserve,
            &self.shared.sql,
            self.shared.timeout,
        ))
        .await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: Token,
        record: Arc<CompletedRecord>,
        retention: Duration,
    ) -> Result<Fence, StoreError> {
        let hot = self.hot();
        let complete = batch::Complete {
            key: key.clone(),
            token,
            record,
            retention,
        };
        let held = self
            .batched(batch::submit(
                &hot.pool,
                &hot.completes,
                complete,
                &self.shared.sql,
                self.shared.timeout,
            ))
            .await?;
        self.changed(key, held)
    }

    async fn release(&self, key: &StoreKey, token: Token) -> Result<Fence, StoreError> {
        let row = self
            .call(hot::fetch_one(
                &self.hot().pool,
                sqlx::query(&self.shared.sql.release)
                    .bind(key.as_str())
                    .bind(token.as_u128().to_be_bytes())
                    .bind(&self.shared.sql.channel),
            ))
            .await?;
        self.changed(key, flag(&row, "held")?)
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        let changed = self
            .call(hot::execute(
                &self.hot().pool,
                sqlx::query(&self.shared.sql.extend)
                    .bind(key.as_str())
                    .bind(token.as_u128().to_be_bytes())
                    .bind(micros(lease)),
            ))
            .await?;
        fence(changed > 0)
    }

    async fn get(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        let row = self
            .call(hot::fetch_optional(
                &self.hot().pool,
                sqlx::query(&self.shared.sql.get).bind(key.as_str()),
            ))
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let fingerprint = fingerprint(&row)?;
        Ok(Some(match state(&row)? {
            COMPLETED => Record::Completed(Arc::new(completed(&row, fingerprint)?)),
            _ => Record::InFlight {
                fingerprint,
                lease_remaining: remaining(&row)?,
                started_at: time(&row, "started_at_us")?,
            },
        }))
    }

    async fn purge(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let row = self
            .call(
                sqlx::query(&self.shared.sql.purge)
                    .bind(key.as_str())
                    .bind(&self.shared.sql.channel)
                    .fetch_one(&self.shared.pool),
            )
            .await?;
        let purged = flag(&row, "purged")?;
        if purged {
            self.shared.notifier.notify(key);
        }
        Ok(purged)
    }

    async fn subscribe(&self, key: &StoreKey) -> Result<Subscription, StoreError> {
        // The listener connection feeds the notifier: a waiter holds no
        // pooled connection.
        Ok(self.shared.notifier.subscribe(key))
    }

    async fn begin_attempt(&self, key: &StoreKey, keep: Duration) -> Result<u32, StoreError> {
        self.job_begin(key, keep).await
    }

    async fn end_attempt(
        &self,
        key: &StoreKey,
        attempt: u32,
        error: Option<&str>,
        keep: Duration,
    ) -> Result<Fence, StoreError> {
        self.job_end(key, attempt, error, keep).await
    }

    async fn attempts(&self, key: &StoreKey) -> Result<Option<super::Attempts>, StoreError> {
        self.job_get(key).await
    }
}

/// Awaits `fut` for at most `timeout`, mapping sqlx's errors.
async fn bounded<T>(
    timeout: Duration,
    fut: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r.map_err(|e| store_error(e, timeout)),
        Err(_) => Err(StoreError::Timeout(timeout)),
    }
}

/// sqlx's error → a [`StoreError`], at the edge.
fn store_error(e: sqlx::Error, timeout: Duration) -> StoreError {
    match Kind::of(&e) {
        Kind::Timeout => StoreError::Timeout(timeout),
        Kind::Corrupt => Corruption::from_source(e).into(),
        Kind::Unavailable => StoreError::Unavailable(Box::new(e)),
    }
}

/// [`store_error`] for an error several callers share (a batch's,
/// `batch.rs`): each gets its own [`StoreError`] with the error as source.
fn shared_store_error(e: &Arc<sqlx::Error>, timeout: Duration) -> StoreError {
    match Kind::of(e) {
        Kind::Timeout => StoreError::Timeout(timeout),
        Kind::Corrupt => Corruption::from_source(SharedError(Arc::clone(e))).into(),
        Kind::Unavailable => StoreError::Unavailable(Box::new(SharedError(Arc::clone(e)))),
    }
}

/// What a sqlx error means to a caller.
enum Kind {
    Timeout,
    Corrupt,
    Unavailable,
}

impl Kind {
    fn of(e: &sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut => Self::Timeout,
            sqlx::Error::Database(db) if statement_timed_out(&**db) => Self::Timeout,
            sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::ColumnIndexOutOfBounds { .. }
            | sqlx::Error::TypeNotFound { .. } => Self::Corrupt,
            _ => Self::Unavailable,
        }
    }
}

/// Whether the server's `statement_timeout` cut the statement off
/// (`query_canceled`): the caller's time is up (a batch's keys are not run
/// again one part at a time, `batch.rs`).
fn statement_timed_out(db: &dyn sqlx::error::DatabaseError) -> bool {
    db.code().as_deref() == Some("57014")
}

/// An error several callers share.
#[derive(Debug)]
struct SharedError(Arc<sqlx::Error>);

impl fmt::Display for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.min(MAX_DURATION).as_micros()).unwrap_or(i64::MAX)
}

fn fence(held: bool) -> Result<Fence, StoreError> {
    Ok(if held { Fence::Held } else { Fence::Lost })
}

/// Deletes expired rows in batches: records, then job traces.
struct Cleaner {
    pool: PgPool,
    sql: Vec<String>,
    batch: i64,
    timeout: Duration,
}

impl Cleaner {
    async fn run(self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.pass().await {
                Ok(0) => {}
                Ok(rows) => tracing::debug!(rows, "deleted expired idempotency records"),
                Err(error) => tracing::warn!(%error, "clean-up of expired records failed"),
            }
        }
    }

    /// Batches until one comes back short.
    async fn pass(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        for sql in &self.sql {
            loop {
                let rows = bounded(
                    self.timeout,
                    sqlx::query(sql).bind(self.batch).execute(&self.pool),
                )
                .await?
                .rows_affected();
                total += rows;
                if rows < u64::try_from(self.batch).unwrap_or(u64::MAX) {
                    break;
                }
                // Let the calls have the pool between batches.
                tokio::task::yield_now().await;
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        for good in ["idem", "_x", "a1_b2", &"a".repeat(40)] {
            assert!(valid_schema(good), "{good}");
        }
        for bad in ["", "1a", "Idem", "a-b", "a\"b", "a b", &"a".repeat(41)] {
            assert!(!valid_schema(bad), "{bad}");
        }
    }

    #[test]
    fn statements_name_the_schema() {
        let s = Statements::new("t_1");
        assert!(s.reserve.contains("INSERT INTO \"t_1\".idem_records AS r"));
        assert!(s.migrate.contains("CREATE SCHEMA IF NOT EXISTS \"t_1\";"));
        assert_eq!(s.channel, "t_1_idem_changed");
        for sql in [
            &s.migrate,
            &s.reserve,
            &s.complete,
            &s.release,
            &s.extend,
            &s.get,
            &s.purge,
            &s.cleanup,
            &s.enqueue,
            &s.claim,
            &s.retry,
            &s.operation,
            &s.queue_stats,
        ]
        .into_iter()
        .chain(s.jobs.all())
        {
            assert!(!sql.contains('{'), "unfilled placeholder in {sql}");
            assert!(!sql.contains("\n--"), "a comment is sent in {sql}");
        }
        for sql in [
            MIGRATE,
            RESERVE,
            COMPLETE,
            RELEASE,
            EXTEND,
            GET,
            PURGE,
            CLEANUP,
            ENQUEUE,
            CLAIM,
            RETRY,
            OPERATION,
            QUEUE_STATS,
        ]
        .into_iter()
        .chain(job::Statements::SOURCES)
        {
            assert!(sql.contains("-- Atomicity:"), "no atomicity note in {sql}");
        }
    }

    #[test]
    fn comment_lines_are_dropped() {
        assert_eq!(
            without_comments("-- a\nSELECT 1 -- b\n  -- c\nFROM t\n"),
            "SELECT 1 -- b\nFROM t\n"
        );
        assert!(Statements::new("idem").reserve.starts_with("INSERT INTO"));
    }

    #[test]
    fn the_schema_rule_states_the_limit() {
        assert!(SCHEMA_RULE.contains(&format!("1–{MAX_SCHEMA_LEN} ")));
    }

    #[test]
    fn durations_are_clamped() {
        assert_eq!(micros(Duration::from_millis(1500)), 1_500_000);
        assert_eq!(
            micros(Duration::MAX),
            i64::try_from(MAX_DURATION.as_micros()).unwrap_or(0)
        );
    }

    /// Issue 10: `AnyStore` (and so `idem serve`) accepts the scheme in any
    /// case, as RFC 3986 says; the store must too.
    #[tokio::test]
    async fn the_scheme_is_case_insensitive() {
        for url in [
            "POSTGRES://x@127.0.0.1:1/db",
            "PostgreSQL://x@127.0.0.1:1/db",
            "Postgres://x@127.0.0.1:1/db",
        ] {
            // Nothing listens on port 1: refused, but not for its scheme.
            let e = PostgresStore::builder(url)
                .timeout(Duration::from_millis(500))
                .connect()
                .await
                .map(|_| ())
                .err();
            assert!(
                matches!(e, Some(StoreError::Unavailable(_) | StoreError::Timeout(_))),
                "{url}: {e:?}"
            );
        }
        for url in ["postgres:/x", "postgresq://x", "POSTGRES:", "Ｐostgres://x"] {
            let e = PostgresStore::connect(url).await.map(|_| ()).err();
            assert!(matches!(e, Some(StoreError::Config(_))), "{url}: {e:?}");
        }
    }

    #[tokio::test]
    async fn bad_configuration_is_refused_before_connecting() {
        let e = PostgresStore::builder("postgres://x@127.0.0.1:1/db")
            .schema("Bad-Name")
            .connect()
            .await
            .map(|_| ())
            .err();
        assert!(matches!(e, Some(StoreError::Config(_))), "{e:?}");
        let e = PostgresStore::connect("mysql://nope")
            .await
            .map(|_| ())
            .err();
        assert!(matches!(e, Some(StoreError::Config(_))), "{e:?}");
    }
}
