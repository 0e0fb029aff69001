//! Async mode's queue (protocol §9.7): operations that live in the store, next
//! to the records, so every instance sharing the store shares the queue.
//!
//! An async operation IS the idempotency record of its scoped key, in a
//! third shape beside in flight and completed: it carries the request to
//! send upstream, an [`OperationId`] that finds it again, an attempt count
//! and a due time. Its life:
//!
//! ```text
//! enqueue ─▶ Pending { attempts, due } ─claim─▶ Running { attempts, token, lease }
//!                 ▲                                 │
//!                 └──────────── retry(delay) ◀──────┤
//!                                                   └─ complete ─▶ Done (a Completed record)
//! ```
//!
//! A running operation whose lease ran out (its dispatcher died) is due
//! again: [`Queue::claim`] takes it over under a new token, so the dead
//! dispatcher's late `complete`, `retry` or `extend` is fenced out.
//!
//! Finishing an attempt uses the store's existing fenced
//! [`Store::complete`]: for an operation it also leaves the queue, keeps the
//! id resolvable until the retention ends (the operation reads as
//! [`OperationState::Done`] with the completed record), and wakes the key's
//! subscribers, so a status long-poll waits exactly like a `wait` duplicate
//! ([`Store::subscribe`]). [`Store::extend`] heartbeats a running
//! operation; [`Store::release`] deletes a running operation and its id;
//! [`Store::purge`] deletes any operation with its id and queue entry;
//! [`Store::get`] reads a pending or running operation as
//! [`Record::InFlight`](crate::record::Record::InFlight), and a
//! [`Store::reserve`] of its key as in flight (or a mismatch). A pending or
//! running operation never expires: it leaves the store only by
//! `complete`, `release` or `purge`.
//!
//! Which store does what, and how it stays atomic, is in each backend's
//! documentation; every one of them passes `tests/conformance/queue.rs`.

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{Fence, Store, StoreError};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::record::{CompletedRecord, Token};

/// An operation's id: 128 random bits, written as 32 lower-case hex digits
/// (`/_idem/operations/{id}`).
///
/// Unguessable, so knowing an id is needed to ask about an operation; the
/// status endpoint still checks that the asker's scope is the operation's
/// (protocol §9.3). [`FromStr`] accepts exactly 32 lower-case hex digits and
/// nothing else: a malformed id reads like an unknown one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct OperationId(u128);

impl OperationId {
    /// A fresh id from the thread-local cryptographically secure generator.
    #[must_use]
    pub fn generate() -> Self {
        Self(rand::random())
    }

    /// The id as a number (stores may persist it this way).
    #[must_use]
    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// Rebuilds an id a store persisted.
    #[must_use]
    pub fn from_u128(v: u128) -> Self {
        Self(v)
    }
}

impl fmt::Display for OperationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Why a text is not an [`OperationId`]: it is not exactly 32 lower-case
/// hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an operation id is 32 lower-case hex digits")]
pub struct InvalidOperationId;

impl FromStr for OperationId {
    type Err = InvalidOperationId;

    fn from_str(s: &str) -> Result<Self, InvalidOperationId> {
        // `u128::from_str_radix` alone would take a sign, upper case and
        // shorter texts: one id would have many spellings.
        let shaped = s.len() == 32 && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
        if !shaped {
            return Err(InvalidOperationId);
        }
        u128::from_str_radix(s, 16)
            .map(Self)
            .map_err(|_| InvalidOperationId)
    }
}

/// The request an operation sends upstream: what the gateway would have
/// forwarded in sync mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationRequest {
    /// The HTTP method.
    pub method: String,
    /// Path and query, as forwarded (already normalized by the gateway).
    pub uri: String,
    /// Header names (lower case) and raw values to forward, in order
    /// (including the accepting request's `idempotency-key` and
    /// `x-request-id`).
    pub headers: Vec<(String, Bytes)>,
    /// The body bytes.
    pub body: Bytes,
}

impl OperationRequest {
    /// Approximate bytes this request occupies (for the memory store's
    /// byte bound), counted like
    /// [`StoredResponse::weight`](crate::record::StoredResponse::weight).
    #[must_use]
    pub fn weight(&self) -> usize {
        64 + self.method.len()
            + self.uri.len()
            + self.body.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + 32)
                .sum::<usize>()
    }
}

/// Where an operation is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OperationState {
    /// Waiting for a dispatcher.
    Pending {
        /// Upstream calls made so far (0 before the first).
        attempts: u32,
        /// Time until it is due (zero: due now).
        next_attempt_in: Duration,
    },
    /// A dispatcher holds it and is calling the upstream (or died doing
    /// so, and its lease has yet to run out).
    Running {
        /// Upstream calls made so far, the running one included.
        attempts: u32,
    },
    /// The final answer, stored: a completed record, replayed to repeats
    /// of the POST and to status requests.
    Done(Arc<CompletedRecord>),
}

/// An operation found by [`Queue::operation`] or [`Queue::enqueue`].
#[derive(Clone, Debug)]
pub struct Operation {
    /// Its id.
    pub id: OperationId,
    /// The scoped key it is the record of; its scope is the only one
    /// allowed to see it.
    pub key: StoreKey,
    /// Where it is.
    pub state: OperationState,
    /// Why its latest failed attempt failed (`HTTP 503`, `the connection
    /// was refused`, ...), as the dispatcher passed it to
    /// [`Queue::retry`]: a short text with no upstream address or error
    /// text. `None` before any attempt failed, and once it is done (the
    /// final answer, a stored 502 included, says how it ended).
    pub last_error: Option<String>,
}

/// The outcome of [`Queue::enqueue`] (ONE atomic store step). Protocol
/// outcomes, not errors, like [`Reservation`](super::Reservation).
#[derive(Debug)]
pub enum Enqueued {
    /// Fresh key: the record and its operation are durable in the store,
    /// due now, under the id the caller passed.
    Accepted(OperationId),
    /// Same key and fingerprint, an operation already pending or running:
    /// answer with its id.
    Existing(Operation),
    /// Same key and fingerprint, done: replay this answer.
    Completed(Arc<CompletedRecord>),
    /// The key holds a record for a different fingerprint (422).
    Mismatch,
    /// A synchronous execution holds the key with the same fingerprint (409).
    InFlight {
        /// Time left on the holder's lease.
        lease_remaining: Duration,
    },
    /// `max_pending` operations are already pending or running: nothing
    /// was stored (503).
    Full,
}

/// One claimed attempt: the dispatcher holds the operation under `token`
/// and heartbeats with [`Store::extend`]`(&key, token, lease)`.
///
/// Like a [`Lease`](super::Lease), a permit: neither `Copy` nor `Clone`.
/// It ends with [`Store::complete`] (the final answer) or [`Queue::retry`]
/// (another attempt later); dropped, the operation is claimed again once
/// the lease runs out.
#[derive(Debug)]
pub struct Claimed {
    /// The operation's id.
    pub id: OperationId,
    /// Its record's key.
    pub key: StoreKey,
    /// The fingerprint of the accepted request (for the completed record).
    pub fingerprint: Fingerprint,
    /// The fencing token of this attempt.
    pub token: Token,
    /// This attempt's number, 1-based (attempts so far, this one included).
    pub attempt: u32,
    /// What to send upstream.
    pub request: Arc<OperationRequest>,
}

/// The queue's size, for metrics (protocol §9.8).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Operations accepted and not yet done (pending or running): the
    /// number `max_pending` bounds.
    pub pending: u64,
    /// Time since the oldest of them was accepted; `None` when there is
    /// none.
    pub oldest_pending_age: Option<Duration>,
}

/// Async mode's queue (protocol §9.7): an optional ability, next to [`Store`].
///
/// Every method is ONE atomic step in the backend, like the [`Store`]
/// methods. Implementations must pass `tests/conformance/queue.rs`, and
/// must make [`Store::complete`], [`Store::extend`], [`Store::release`],
/// [`Store::get`], [`Store::reserve`] and [`Store::purge`] treat operation
/// records as the [module documentation](self) says.
pub trait Queue: Store {
    /// ONE atomic step: no record (or an expired lease of a synchronous
    /// execution) → write the pending operation (attempts 0, due now)
    /// under `id`; otherwise report what is there. `max_pending` counts the
    /// pending and running operations of this store; at it → `Full`, and
    /// nothing is written.
    fn enqueue(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        id: OperationId,
        request: &OperationRequest,
        max_pending: u64,
    ) -> impl Future<Output = Result<Enqueued, StoreError>> + Send;

    /// Atomically claims up to `max` operations that are due (pending with
    /// due ≤ now, or running with a lease that ran out), oldest due first:
    /// each becomes running under a fresh token for `lease`, its attempts
    /// one more. Two claimers never get the same operation at the same
    /// time.
    fn claim(
        &self,
        lease: Duration,
        max: usize,
    ) -> impl Future<Output = Result<Vec<Claimed>, StoreError>> + Send;

    /// Fenced by `token`: the running operation goes back to pending, due
    /// `delay` from now, with `last_error` kept for inspection
    /// ([`Operation::last_error`], until the next retry replaces it or the
    /// operation is done). `Lost` if
    /// another claimer holds it (or it is gone).
    fn retry(
        &self,
        key: &StoreKey,
        token: Token,
        delay: Duration,
        last_error: &str,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send;

    /// The operation by id (`None`: unknown, or its record expired or was
    /// purged). Not scope-checked: the caller compares the scope of
    /// [`Operation::key`] with the asker's.
    fn operation(
        &self,
        id: OperationId,
    ) -> impl Future<Output = Result<Option<Operation>, StoreError>> + Send;

    /// How many operations are pending or running, and the age of the
    /// oldest (metrics).
    fn queue_stats(&self) -> impl Future<Output = Result<QueueStats, StoreError>> + Send;
}

impl<T: Queue> Queue for Arc<T> {
    fn enqueue(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        id: OperationId,
        request: &OperationRequest,
        max_pending: u64,
    ) -> impl Future<Output = Result<Enqueued, StoreError>> + Send {
        (**self).enqueue(key, fingerprint, id, request, max_pending)
    }
    fn claim(
        &self,
        lease: Duration,
        max: usize,
    ) -> impl Future<Output = Result<Vec<Claimed>, StoreError>> + Send {
        (**self).claim(lease, max)
    }
    fn retry(
        &self,
        key: &StoreKey,
        token: Token,
        delay: Duration,
        last_error: &str,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send {
        (**self).retry(key, token, delay, last_error)
    }
    fn operation(
        &self,
        id: OperationId,
    ) -> impl Future<Output = Result<Option<Operation>, StoreError>> + Send {
        (**self).operation(id)
    }
    fn queue_stats(&self) -> impl Future<Output = Result<QueueStats, StoreError>> + Send {
        (**self).queue_stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_one_spelling() {
        let id = OperationId::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let text = id.to_string();
        assert_eq!(text, "0123456789abcdef0011223344556677");
        assert_eq!(text.parse::<OperationId>(), Ok(id));
        assert_eq!(
            OperationId::from_u128(1).to_string(),
            "00000000000000000000000000000001"
        );
        for bad in [
            "",
            "1",
            "0123456789ABCDEF0011223344556677",
            "+123456789abcdef0011223344556677",
            "0123456789abcdef00112233445566778",
            "0123456789abcdef001122334455667g",
            " 123456789abcdef0011223344556677",
        ] {
            assert_eq!(
                bad.parse::<OperationId>(),
                Err(InvalidOperationId),
                "{bad:?}"
            );
        }
        let (a, b) = (OperationId::generate(), OperationId::generate());
        assert_ne!(a, b);
        assert_eq!(a.to_string().parse::<OperationId>(), Ok(a));
    }
}
