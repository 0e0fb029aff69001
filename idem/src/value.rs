//! The stored value of the function-level APIs (protocol §8) and their result
//! types, shared by [`Engine::once`](crate::Engine::once) and
//! `PostgresStore::transaction`.
//!
//! Both store a value the same way (JSON, as a 200 response), so a key
//! written by one replays through the other. This module sits below the
//! store and the engine, so a backend can use it without reaching up into
//! the algorithm.

use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::record::{CompletedRecord, StoredResponse};

/// A result of [`Engine::once`](crate::Engine::once) (and
/// `PostgresStore::transaction`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Once<T> {
    /// The value: computed now, or the stored one.
    pub value: T,
    /// `true` when `value` is the stored result of an earlier run.
    pub replayed: bool,
}

/// Why [`Engine::once`](crate::Engine::once) returned no value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OnceError<E> {
    /// The closure failed; the key was released so a retry runs it again.
    #[error("the operation failed")]
    Failed(#[source] E),
    /// Another run holds the key; retry after this long.
    #[error("another run of this key is in progress; retry in {retry_after:?}")]
    InProgress {
        /// Time until the holder's lease runs out.
        retry_after: Duration,
    },
    /// The key was used with a different input.
    #[error("the key was already used with a different input")]
    Mismatch,
    /// The store failed (and `fail = closed`).
    #[error(transparent)]
    Store(StoreError),
    /// The value could not be encoded or the stored one decoded.
    #[error("cannot encode or decode the stored value: {0}")]
    Encode(#[source] serde_json::Error),
    /// The job failed permanently, in this run or an earlier delivery's
    /// (the caller said so with `JobError::Permanent`): the failure is
    /// stored as the key's answer, and every delivery of the key gets this
    /// same error without running the closure (protocol §13).
    #[error(transparent)]
    Permanent(JobFailure),
}

/// A permanent job failure as stored (protocol §13): what every
/// redelivery of the job's key gets back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("the job failed permanently after {attempts} attempt(s): {last_error}")]
pub struct JobFailure {
    /// Runs of the closure, the failing one included (0 when the store
    /// keeps no count).
    pub attempts: u32,
    /// The error's text as the closure's error displayed it, at most
    /// [`MAX_ERROR_BYTES`](crate::store::MAX_ERROR_BYTES).
    pub last_error: String,
}

/// The header that marks a stored permanent failure.
const FAILURE_HEADER: &str = "idem-job";
const FAILURE_MARK: &[u8] = b"failed";

/// How a permanent failure is stored: its JSON, as a 500 response marked
/// with `idem-job: failed` (a value is a 200 without headers, so the two
/// never read as each other).
pub(crate) fn encode_failure(failure: &JobFailure) -> Result<StoredResponse, serde_json::Error> {
    Ok(StoredResponse {
        status: 500,
        headers: vec![(FAILURE_HEADER.to_owned(), Bytes::from_static(FAILURE_MARK))],
        body: serde_json::to_vec(failure)?.into(),
    })
}

/// The permanent failure stored in `record`, if it holds one.
#[must_use]
pub(crate) fn decode_failure(record: &CompletedRecord) -> Option<JobFailure> {
    let r = &record.response;
    let marked = r.status == 500
        && r.headers
            .iter()
            .any(|(n, v)| n == FAILURE_HEADER && v.as_ref() == FAILURE_MARK);
    if !marked {
        return None;
    }
    Some(
        serde_json::from_slice(&r.body).unwrap_or_else(|_| JobFailure {
            attempts: 0,
            last_error: String::from("(the stored failure could not be decoded)"),
        }),
    )
}

/// How the function-level APIs store a value: JSON, as a 200 response.
pub(crate) fn encode_value<T: Serialize>(value: &T) -> Result<StoredResponse, serde_json::Error> {
    Ok(StoredResponse {
        status: 200,
        headers: Vec::new(),
        body: serde_json::to_vec(value)?.into(),
    })
}

/// The stored value of a record written by [`encode_value`], as a replay.
pub(crate) fn decode_value<T: DeserializeOwned, E>(
    record: &CompletedRecord,
) -> Result<Once<T>, OnceError<E>> {
    if let Some(failure) = decode_failure(record) {
        return Err(OnceError::Permanent(failure));
    }
    serde_json::from_slice(&record.response.body)
        .map(|value| Once {
            value,
            replayed: true,
        })
        .map_err(OnceError::Encode)
}
