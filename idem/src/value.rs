//! The stored value of the function-level APIs (protocol §8) and their result
//! types, shared by [`Engine::once`](crate::Engine::once) and
//! `PostgresStore::transaction`.
//!
//! Both store a value the same way (JSON, as a 200 response), so a key
//! written by one replays through the other. This module sits below the
//! store and the engine, so a backend can use it without reaching up into
//! the algorithm.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

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
    serde_json::from_slice(&record.response.body)
        .map(|value| Once {
            value,
            replayed: true,
        })
        .map_err(OnceError::Encode)
}
