//! What the embedded migration creates, and whether it is there:
//! [`PostgresStoreBuilder::check`] (for `idem serve --check`: connects,
//! creates nothing) and [`PostgresStore::schema_status`].

use std::fmt;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgRow};
use sqlx::Connection;

use super::row::flag;
use super::{bounded, PostgresStore, PostgresStoreBuilder};
use crate::error::StoreError;

const STATUS: &str = include_str!("sql/status.sql");

/// Whether what the migration creates (`sql/migrate.sql`: the schema, the
/// records table with its current columns, the clean-up index, the job
/// traces table) is in
/// place. See [`PostgresStoreBuilder::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SchemaStatus {
    /// The schema does not exist: the migration would create it and
    /// everything in it.
    NoSchema,
    /// The schema exists, the records table does not.
    NoTable,
    /// The table exists but lacks part of what this version's migration
    /// creates (a column added since, the clean-up index, the job traces
    /// table); store calls may
    /// fail until the migration runs.
    Outdated,
    /// Everything the migration creates is there.
    Ready,
}

impl SchemaStatus {
    /// Whether the store can work on this schema as it is.
    #[must_use]
    pub fn is_ready(self) -> bool {
        self == Self::Ready
    }
}

impl fmt::Display for SchemaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NoSchema => "the schema does not exist",
            Self::NoTable => "the schema exists, the records table does not",
            Self::Outdated => "the records table lacks part of the current layout",
            Self::Ready => "the schema and the records table are in place",
        })
    }
}

impl PostgresStoreBuilder {
    /// Checks the settings, that the server answers (on one connection,
    /// closed before this returns), and what is in place of what the
    /// migration creates. Creates nothing, starts nothing, whatever
    /// [`migrate`](Self::migrate) says: for a dry run such as
    /// `idem serve --check`.
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect): [`StoreError::Config`] for a
    /// malformed URL or schema name, [`StoreError::Unavailable`] (with the
    /// server's reason) or [`StoreError::Timeout`] when the database cannot
    /// be reached.
    pub async fn check(self) -> Result<SchemaStatus, StoreError> {
        let options = self.options()?;
        reach(&options, &self.schema, self.timeout).await
    }
}

impl PostgresStore {
    /// What is in place, now, of what the migration creates (with
    /// [`migrate`](PostgresStoreBuilder::migrate) off, someone else runs
    /// it).
    ///
    /// # Errors
    ///
    /// When the database cannot be reached in time.
    pub async fn schema_status(&self) -> Result<SchemaStatus, StoreError> {
        let row = self
            .call(
                sqlx::query(STATUS)
                    .bind(&self.shared.schema)
                    .fetch_one(&self.shared.pool),
            )
            .await?;
        decode(&row)
    }
}

/// Reaches the server on a connection of its own (so a wrong URL, password
/// or database fails with its reason: the pool would retry a refused
/// connection until its time-out), and reads the [`SchemaStatus`].
pub(super) async fn reach(
    options: &PgConnectOptions,
    schema: &str,
    timeout: Duration,
) -> Result<SchemaStatus, StoreError> {
    let row = bounded(timeout, async {
        let mut conn = PgConnection::connect_with(options).await?;
        let row = sqlx::query(STATUS).bind(schema).fetch_one(&mut conn).await;
        let closed = conn.close().await;
        let row = row?;
        closed?;
        Ok(row)
    })
    .await?;
    decode(&row)
}

fn decode(row: &PgRow) -> Result<SchemaStatus, StoreError> {
    Ok(if !flag(row, "has_schema")? {
        SchemaStatus::NoSchema
    } else if !flag(row, "has_table")? {
        SchemaStatus::NoTable
    } else if !(flag(row, "has_waiters")?
        && flag(row, "has_index")?
        && flag(row, "has_jobs")?
        && flag(row, "has_versions")?)
    {
        SchemaStatus::Outdated
    } else {
        SchemaStatus::Ready
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statement_says_why_it_is_atomic() {
        assert!(STATUS.contains("-- Atomicity:"));
        assert!(!STATUS.contains('{'), "status.sql takes the schema as $1");
    }
}
