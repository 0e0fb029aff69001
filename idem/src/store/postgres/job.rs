//! The PostgreSQL store's job traces (protocol §13, `store/job.rs`).
//!
//! A table of their own, `"<schema>".idem_jobs` (created by the migration,
//! layout version 3), one row per job key: `attempts`, `running`,
//! `last_error` and `expires_at` (the retention's end, renewed by every
//! step). The records table and its statements are untouched, so
//! `reserve` and `complete` (the HTTP hot path) cost what they did, and a
//! trace outlives `release`, which deletes the record. Every step is ONE
//! statement (`sql/job_*.sql`); expired traces read as absent and the
//! clean-up task deletes them after the records.

use std::time::Duration;

use super::row::column;
use super::{micros, PostgresStore};
use crate::key::StoreKey;
use crate::store::{Attempts, Fence, StoreError};

const BEGIN: &str = include_str!("sql/job_begin.sql");
const END: &str = include_str!("sql/job_end.sql");
const GET: &str = include_str!("sql/job_get.sql");
const CLEANUP: &str = include_str!("sql/job_cleanup.sql");

/// The job statements, with the table filled in.
pub(super) struct Statements {
    begin: String,
    end: String,
    get: String,
    pub(super) cleanup: String,
}

impl Statements {
    pub(super) fn new(fill: impl Fn(&str) -> String) -> Self {
        Self {
            begin: fill(BEGIN),
            end: fill(END),
            get: fill(GET),
            cleanup: fill(CLEANUP),
        }
    }

    #[cfg(test)]
    pub(super) fn all(&self) -> [&String; 4] {
        [&self.begin, &self.end, &self.get, &self.cleanup]
    }

    /// The statements as written, comments included.
    #[cfg(test)]
    pub(super) const SOURCES: [&str; 4] = [BEGIN, END, GET, CLEANUP];
}

impl PostgresStore {
    pub(super) async fn job_begin(
        &self,
        key: &StoreKey,
        keep: Duration,
    ) -> Result<u32, StoreError> {
        let row = self
            .call(
                sqlx::query(&self.shared.sql.jobs.begin)
                    .bind(key.as_str())
                    .bind(micros(keep))
                    .fetch_one(&self.shared.pool),
            )
            .await?;
        let n: i32 = column(&row, "attempts")?;
        u32::try_from(n).map_err(|_| StoreError::Corrupt("job trace: attempts < 0".into()))
    }

    pub(super) async fn job_end(
        &self,
        key: &StoreKey,
        attempt: u32,
        error: Option<&str>,
        keep: Duration,
    ) -> Result<Fence, StoreError> {
        let attempt = i32::try_from(attempt).unwrap_or(i32::MAX);
        let done = self
            .call(
                sqlx::query(&self.shared.sql.jobs.end)
                    .bind(key.as_str())
                    .bind(attempt)
                    .bind(error)
                    .bind(micros(keep))
                    .execute(&self.shared.pool),
            )
            .await?;
        Ok(if done.rows_affected() > 0 {
            Fence::Held
        } else {
            Fence::Lost
        })
    }

    pub(super) async fn job_get(&self, key: &StoreKey) -> Result<Option<Attempts>, StoreError> {
        let row = self
            .call(
                sqlx::query(&self.shared.sql.jobs.get)
                    .bind(key.as_str())
                    .fetch_optional(&self.shared.pool),
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let count: i32 = column(&row, "attempts")?;
        Ok(Some(Attempts {
            count: u32::try_from(count)
                .map_err(|_| StoreError::Corrupt("job trace: attempts < 0".into()))?,
            running: column(&row, "running")?,
            last_error: column(&row, "last_error")?,
        }))
    }
}
