//! Async mode's queue on PostgreSQL (protocol §9.7): operations are rows of
//! the records table, in two more states (3 = pending, 4 = running), and
//! claims take them `FOR UPDATE SKIP LOCKED` from a partial index on their
//! due time, the River / Oban / Que pattern.
//!
//! Every call is ONE statement (`sql/enqueue.sql`, `claim.sql`,
//! `retry.sql`, `operation.sql`, `queue_stats.sql`), each with its
//! `-- Atomicity:` note. Finishing, heartbeats, release, reads and purges
//! are the [`Store`](crate::store::Store) statements, which know the two
//! states: see `migrate.sql` for the columns and the module docs of
//! [`postgres`](super) for the overview.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sqlx::postgres::PgRow;

use super::row::{
    column, completed, fingerprint, flag, remaining, state, COMPLETED, IN_FLIGHT, PENDING, RUNNING,
};
use super::{fence, micros, request, PostgresStore};
use crate::error::Corruption;
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::record::Token;
use crate::store::{
    Claimed, Enqueued, Fence, Operation, OperationId, OperationRequest, OperationState, Queue,
    QueueStats, StoreError,
};

/// Most operations one [`Queue::claim`] takes (it may take fewer).
const MAX_BATCH: usize = 1000;

impl Queue for PostgresStore {
    async fn enqueue(
        &self,
        key: &StoreKey,
        fingerprint_sent: Fingerprint,
        id: OperationId,
        request: &OperationRequest,
        max_pending: u64,
    ) -> Result<Enqueued, StoreError> {
        let stored = request::encode(request)?;
        let row = self
            .call(
                sqlx::query(&self.shared.sql.enqueue)
                    .bind(key.as_str())
                    .bind(fingerprint_sent.0)
                    .bind(id_bytes(id))
                    .bind(stored)
                    .bind(i64::try_from(max_pending).unwrap_or(i64::MAX))
                    .fetch_optional(&self.shared.pool),
            )
            .await?;
        let Some(row) = row else {
            return Ok(Enqueued::Full);
        };
        if flag(&row, "accepted")? {
            return Ok(Enqueued::Accepted(id));
        }
        let found = fingerprint(&row)?;
        if found != fingerprint_sent {
            return Ok(Enqueued::Mismatch);
        }
        Ok(match state(&row)? {
            IN_FLIGHT => Enqueued::InFlight {
                lease_remaining: remaining(&row)?,
            },
            COMPLETED => Enqueued::Completed(Arc::new(completed(&row, found)?)),
            s => Enqueued::Existing(Operation {
                id: op_id(&row)?,
                key: key.clone(),
                state: live_state(&row, s)?,
                last_error: column(&row, "last_error")?,
            }),
        })
    }

    async fn claim(&self, lease: Duration, max: usize) -> Result<Vec<Claimed>, StoreError> {
        let max = max.min(MAX_BATCH);
        if max == 0 {
            return Ok(Vec::new());
        }
        let tokens: Vec<Token> = (0..max).map(|_| Token::generate()).collect();
        let bound: Vec<[u8; 16]> = tokens.iter().map(|t| t.as_u128().to_be_bytes()).collect();
        let rows = self
            .call(
                sqlx::query(&self.shared.sql.claim)
                    .bind(i64::try_from(max).unwrap_or(i64::MAX))
                    .bind(micros(lease))
                    .bind(&bound)
                    .fetch_all(&self.shared.pool),
            )
            .await?;
        let mut claimed = rows
            .iter()
            .map(|row| {
                let n: i32 = column(row, "n")?;
                let token = usize::try_from(n)
                    .ok()
                    .and_then(|n| n.checked_sub(1))
                    .and_then(|i| tokens.get(i))
                    .ok_or_else(|| Corruption::new(format!("claim numbered a row {n}")))?;
                let attempts: i32 = column(row, "attempts")?;
                let stored: Vec<u8> = column(row, "request")?;
                Ok((
                    n,
                    Claimed {
                        id: op_id(row)?,
                        key: stored_key(row)?,
                        fingerprint: fingerprint(row)?,
                        token: *token,
                        attempt: attempts_of(attempts)?,
                        request: Arc::new(request::decode(Bytes::from(stored))?),
                    },
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        // RETURNING has no order: `n` is the place in due order.
        claimed.sort_unstable_by_key(|(n, _)| *n);
        Ok(claimed.into_iter().map(|(_, c)| c).collect())
    }

    async fn retry(
        &self,
        key: &StoreKey,
        token: Token,
        delay: Duration,
        last_error: &str,
    ) -> Result<Fence, StoreError> {
        let done = self
            .call(
                sqlx::query(&self.shared.sql.retry)
                    .bind(key.as_str())
                    .bind(token.as_u128().to_be_bytes())
                    .bind(micros(delay))
                    .bind(last_error)
                    .execute(&self.shared.pool),
            )
            .await?;
        fence(done.rows_affected() > 0)
    }

    async fn operation(&self, id: OperationId) -> Result<Option<Operation>, StoreError> {
        let row = self
            .call(
                sqlx::query(&self.shared.sql.operation)
                    .bind(id_bytes(id))
                    .fetch_optional(&self.shared.pool),
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let (state, last_error) = match state(&row)? {
            // The column outlives completion; a done operation's answer
            // says how it ended.
            COMPLETED => (
                OperationState::Done(Arc::new(completed(&row, fingerprint(&row)?)?)),
                None,
            ),
            // A synchronous reservation carries no id (reserve clears it
            // when it takes a row over); read one that does as unknown.
            IN_FLIGHT => return Ok(None),
            s => (live_state(&row, s)?, column(&row, "last_error")?),
        };
        Ok(Some(Operation {
            id,
            key: stored_key(&row)?,
            state,
            last_error,
        }))
    }

    async fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        let row = self
            .call(sqlx::query(&self.shared.sql.queue_stats).fetch_one(&self.shared.pool))
            .await?;
        let pending: i64 = column(&row, "pending")?;
        let oldest: Option<i64> = column(&row, "oldest_us")?;
        Ok(QueueStats {
            pending: u64::try_from(pending).unwrap_or(0),
            oldest_pending_age: oldest
                .map(|us| Duration::from_micros(u64::try_from(us).unwrap_or(0))),
        })
    }
}

/// An operation id as stored: 16 bytes, big endian (as tokens are).
fn id_bytes(id: OperationId) -> [u8; 16] {
    id.as_u128().to_be_bytes()
}

/// The row's `op_id`.
fn op_id(row: &PgRow) -> Result<OperationId, StoreError> {
    let bytes: &[u8] = column(row, "op_id")?;
    <[u8; 16]>::try_from(bytes)
        .map(|b| OperationId::from_u128(u128::from_be_bytes(b)))
        .map_err(|_| Corruption::new(format!("an operation id of {} bytes", bytes.len())).into())
}

/// The row's `key`.
fn stored_key(row: &PgRow) -> Result<StoreKey, StoreError> {
    let text: &str = column(row, "key")?;
    StoreKey::from_stored(text)
        .map_err(|e| Corruption::with_source(format!("key {text:?}"), e).into())
}

fn attempts_of(n: i32) -> Result<u32, StoreError> {
    u32::try_from(n).map_err(|_| Corruption::new(format!("attempts {n}")).into())
}

/// A pending or running operation's state (`s` is [`PENDING`] or
/// [`RUNNING`]).
fn live_state(row: &PgRow, s: i16) -> Result<OperationState, StoreError> {
    let attempts = attempts_of(column(row, "attempts")?)?;
    Ok(match s {
        PENDING => OperationState::Pending {
            attempts,
            next_attempt_in: remaining(row)?,
        },
        RUNNING => OperationState::Running { attempts },
        s => return Err(Corruption::new(format!("state {s} is not an operation's")).into()),
    })
}
