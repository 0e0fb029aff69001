//! Decoding the rows the statements return (`RETURNING …`, `get.sql`) into
//! records and reservations. A row this version never writes is
//! [`StoreError::Corrupt`], naming the column; sqlx's own decoding error is
//! kept as its source.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sqlx::postgres::{PgRow, Postgres};
use sqlx::Row;

use crate::error::{Corruption, StoreError};
use crate::fingerprint::Fingerprint;
use crate::record::{CompletedRecord, StoredResponse, Token};
use crate::store::{Lease, Reservation};

/// `state` of an in-flight row (a synchronous execution's reservation).
pub(super) const IN_FLIGHT: i16 = 1;
/// `state` of a completed row (a done operation's too).
pub(super) const COMPLETED: i16 = 2;
/// `state` of a pending operation (async mode).
pub(super) const PENDING: i16 = 3;
/// `state` of a running operation (async mode).
pub(super) const RUNNING: i16 = 4;

/// Column `name`, or [`StoreError::Corrupt`] naming it (with sqlx's reason).
pub(super) fn column<'r, T>(row: &'r PgRow, name: &str) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    row.try_get(name)
        .map_err(|e| Corruption::with_source(format!("column {name}"), e).into())
}

/// A boolean column (`acquired`, `held`, `purged`).
pub(super) fn flag(row: &PgRow, name: &str) -> Result<bool, StoreError> {
    column(row, name)
}

/// `state`: [`IN_FLIGHT`], [`COMPLETED`], [`PENDING`] or [`RUNNING`].
/// Everything but a completed row reads as in flight to the [`Store`]
/// calls (an operation is its key's record, protocol §9).
///
/// [`Store`]: crate::store::Store
pub(super) fn state(row: &PgRow) -> Result<i16, StoreError> {
    match column(row, "state")? {
        s @ (IN_FLIGHT | COMPLETED | PENDING | RUNNING) => Ok(s),
        s => Err(Corruption::new(format!("unknown state {s}")).into()),
    }
}

/// The 32-byte `fingerprint`.
pub(super) fn fingerprint(row: &PgRow) -> Result<Fingerprint, StoreError> {
    let bytes: &[u8] = column(row, "fingerprint")?;
    <[u8; 32]>::try_from(bytes)
        .map(Fingerprint)
        .map_err(|_| Corruption::new(format!("a fingerprint of {} bytes", bytes.len())).into())
}

/// `remaining_us`: time left on the lease or retention (an operation: until
/// it is next claimable), by the database clock.
pub(super) fn remaining(row: &PgRow) -> Result<Duration, StoreError> {
    let us: i64 = column(row, "remaining_us")?;
    Ok(Duration::from_micros(u64::try_from(us).unwrap_or(0)))
}

/// A timestamp column returned as µs since the epoch.
pub(super) fn time(row: &PgRow, name: &str) -> Result<SystemTime, StoreError> {
    let us: i64 = column(row, name)?;
    let since = Duration::from_micros(us.unsigned_abs());
    if us >= 0 {
        UNIX_EPOCH.checked_add(since)
    } else {
        UNIX_EPOCH.checked_sub(since)
    }
    .ok_or_else(|| Corruption::new(format!("{name} out of range")).into())
}

/// Decodes what `reserve.sql` returned; `token` is the one it tried to write.
pub(super) fn reservation(
    row: &PgRow,
    token: Token,
    fingerprint_sent: Fingerprint,
    lease: Duration,
) -> Result<Reservation, StoreError> {
    reservation_of(row, flag(row, "acquired")?, token, fingerprint_sent, lease)
}

/// Decodes a reserve's row (`reserve.sql`, `reserve_many.sql`) whose
/// `acquired` is known: the row carries `token`.
pub(super) fn reservation_of(
    row: &PgRow,
    acquired: bool,
    token: Token,
    fingerprint_sent: Fingerprint,
    lease: Duration,
) -> Result<Reservation, StoreError> {
    if acquired {
        return Ok(Reservation::Acquired(Lease {
            token,
            duration: lease,
        }));
    }
    let stored = fingerprint(row)?;
    if stored != fingerprint_sent {
        return Ok(Reservation::Mismatch);
    }
    Ok(match state(row)? {
        COMPLETED => Reservation::Completed(Arc::new(completed(row, stored)?)),
        _ => Reservation::InFlight {
            lease_remaining: remaining(row)?,
        },
    })
}

/// The completed record in `row`. Retention is measured by the database
/// clock and expressed on the local one: `expires_at` = local now + the
/// time the database says is left.
pub(super) fn completed(
    row: &PgRow,
    fingerprint: Fingerprint,
) -> Result<CompletedRecord, StoreError> {
    let status: i32 = column(row, "status")?;
    let status = u16::try_from(status)
        .map_err(|_| Corruption::new(format!("status {status} out of range")))?;
    let names: Vec<String> = column(row, "header_names")?;
    let values: Vec<Vec<u8>> = column(row, "header_values")?;
    if names.len() != values.len() {
        return Err(Corruption::new(format!(
            "{} header names for {} values",
            names.len(),
            values.len()
        ))
        .into());
    }
    let body: Vec<u8> = column(row, "body")?;
    Ok(CompletedRecord {
        fingerprint,
        response: StoredResponse {
            status,
            headers: names
                .into_iter()
                .zip(values.into_iter().map(Bytes::from))
                .collect(),
            body: Bytes::from(body),
        },
        completed_at: time(row, "completed_at_us")?,
        expires_at: SystemTime::now() + remaining(row)?,
    })
}
