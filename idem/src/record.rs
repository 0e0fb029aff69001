//! What the store keeps per scoped key (protocol §2): records, stored responses
//! and fencing tokens.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::fingerprint::Fingerprint;

/// The fencing token of the current holder of a reservation.
///
/// Random 128 bits: a stale holder cannot guess the token of the holder that
/// took its lease over, so its `complete`/`release`/`extend` are refused.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Token(u128);

impl Token {
    /// A fresh random token.
    #[must_use]
    pub fn generate() -> Self {
        Self(rand::random())
    }

    /// The token as a number (stores persist it this way).
    #[must_use]
    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// Rebuilds a token a store persisted.
    #[must_use]
    pub fn from_u128(v: u128) -> Self {
        Self(v)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({:08x}…)", (self.0 >> 96) as u32)
    }
}

/// A response exactly as first returned, minus hop-by-hop headers.
///
/// For the function-level API the body holds the serialized result and
/// `status` is 200.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResponse {
    /// HTTP status code.
    pub status: u16,
    /// Header names (lower case) and raw values, in their original order.
    pub headers: Vec<(String, Bytes)>,
    /// The body bytes.
    pub body: Bytes,
}

impl StoredResponse {
    /// Approximate bytes this response occupies (for memory bounds).
    #[must_use]
    pub fn weight(&self) -> usize {
        64 + self.body.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + 32)
                .sum::<usize>()
    }
}

/// An immutable completed record (protocol §2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletedRecord {
    /// Fingerprint of the request that produced the response.
    pub fingerprint: Fingerprint,
    /// The stored answer.
    pub response: StoredResponse,
    /// When it completed.
    pub completed_at: SystemTime,
    /// When it stops being replayed.
    pub expires_at: SystemTime,
}

impl CompletedRecord {
    /// How long the record is still replayed (zero once expired).
    #[must_use]
    pub fn remaining(&self) -> Duration {
        self.expires_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    }
}

/// What `Store::get` reports (protocol §2). Used by admin inspection and by
/// waiters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// An execution holds the key.
    InFlight {
        /// Fingerprint of the holder's request.
        fingerprint: Fingerprint,
        /// Time left on the lease (zero: expired, free to take over).
        lease_remaining: Duration,
        /// When the reservation was first taken.
        started_at: SystemTime,
    },
    /// The stored answer.
    Completed(Arc<CompletedRecord>),
}
