//! The stale-event guard's store operations (protocol §13): an optional
//! ability next to [`Store`], like async mode's [`Queue`](super::Queue).
//!
//! Per scoped entity (a [`StoreKey`] whose key part names the entity), a
//! store keeps two things, apart from the idempotency records (an entity
//! and an idempotency key of the same name never meet):
//!
//! - the highest version *completed* (none before the first event), and
//! - at most one event in flight: a fencing token and a lease, as for a
//!   key's reservation.
//!
//! ```text
//! begin(v) ─▶ Acquired(lease) ── commit ─▶ highest = v, nobody in flight
//!    │                        └── abort ─▶ nobody in flight, highest unchanged
//!    ├─▶ Stale { current }     v ≤ highest: the event must not run
//!    ├─▶ InFlight { .. }       another event holds the entity (409 / wait)
//!    └─▶ Mixed { current }     v is not of the kind of the entity's versions
//! ```
//!
//! The stale check comes first: an event older than the highest completed
//! version is stale even while another event is in flight. A holder whose
//! lease ran out (it died) is taken over by the next `begin`, and its late
//! `commit` is fenced out. The highest version is kept for as long as the
//! store keeps its data (no retention: an expired version would let an old
//! event through).
//!
//! Which store does what, and why it is atomic, is in each backend's
//! `version.rs`; all of them pass `tests/conformance/version.rs`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::any::delegate;
use super::{AnyStore, Fence, Lease, Store, StoreError};
use crate::key::StoreKey;
use crate::record::Token;
use crate::version::Version;

/// The outcome of [`VersionStore::begin_version`] (ONE atomic step).
/// Protocol outcomes, not errors, like [`Reservation`](super::Reservation).
#[derive(Debug)]
pub enum VersionBegin {
    /// The event holds the entity: run it, then commit or abort.
    Acquired(Lease),
    /// The event's version is ≤ the entity's highest completed version:
    /// it must not run.
    Stale {
        /// The entity's highest completed version.
        current: Version,
    },
    /// Another event of this entity is in flight.
    InFlight {
        /// Time left on its lease.
        lease_remaining: Duration,
    },
    /// The event's version is not of the kind (integer or timestamp) of
    /// the entity's highest completed version: nothing was written.
    Mixed {
        /// The entity's highest completed version.
        current: Version,
    },
}

/// The stale-event guard's atomic store operations (protocol §13).
///
/// Every method is ONE atomic step in the backend; `commit`, `abort` and
/// `extend` are fenced on the token `begin` handed out. Implementations
/// must pass `tests/conformance/version.rs`.
pub trait VersionStore: Store {
    /// ONE atomic step: a kind other than the entity's → `Mixed`; `version`
    /// ≤ the highest completed → `Stale`; another live holder → `InFlight`;
    /// else the caller holds the entity for `lease` under a new token.
    fn begin_version(
        &self,
        entity: &StoreKey,
        version: Version,
        lease: Duration,
    ) -> impl Future<Output = Result<VersionBegin, StoreError>> + Send;

    /// Fenced: the entity's highest completed version becomes `version`
    /// (never lower than it was) and nobody holds it any more.
    fn commit_version(
        &self,
        entity: &StoreKey,
        token: Token,
        version: Version,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send;

    /// Fenced: nobody holds the entity any more; its version is unchanged
    /// (the event failed: a redelivery may run it again).
    fn abort_version(
        &self,
        entity: &StoreKey,
        token: Token,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send;

    /// Fenced heartbeat: the holder's lease now ends `lease` from now.
    fn extend_version(
        &self,
        entity: &StoreKey,
        token: Token,
        lease: Duration,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send;

    /// The entity's highest completed version (`None`: no event completed).
    fn current_version(
        &self,
        entity: &StoreKey,
    ) -> impl Future<Output = Result<Option<Version>, StoreError>> + Send;
}

impl<T: VersionStore> VersionStore for Arc<T> {
    fn begin_version(
        &self,
        entity: &StoreKey,
        version: Version,
        lease: Duration,
    ) -> impl Future<Output = Result<VersionBegin, StoreError>> + Send {
        (**self).begin_version(entity, version, lease)
    }
    fn commit_version(
        &self,
        entity: &StoreKey,
        token: Token,
        version: Version,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send {
        (**self).commit_version(entity, token, version)
    }
    fn abort_version(
        &self,
        entity: &StoreKey,
        token: Token,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send {
        (**self).abort_version(entity, token)
    }
    fn extend_version(
        &self,
        entity: &StoreKey,
        token: Token,
        lease: Duration,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send {
        (**self).extend_version(entity, token, lease)
    }
    fn current_version(
        &self,
        entity: &StoreKey,
    ) -> impl Future<Output = Result<Option<Version>, StoreError>> + Send {
        (**self).current_version(entity)
    }
}

impl VersionStore for AnyStore {
    async fn begin_version(
        &self,
        entity: &StoreKey,
        version: Version,
        lease: Duration,
    ) -> Result<VersionBegin, StoreError> {
        delegate!(self, s => s.begin_version(entity, version, lease))
    }
    async fn commit_version(
        &self,
        entity: &StoreKey,
        token: Token,
        version: Version,
    ) -> Result<Fence, StoreError> {
        delegate!(self, s => s.commit_version(entity, token, version))
    }
    async fn abort_version(&self, entity: &StoreKey, token: Token) -> Result<Fence, StoreError> {
        delegate!(self, s => s.abort_version(entity, token))
    }
    async fn extend_version(
        &self,
        entity: &StoreKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        delegate!(self, s => s.extend_version(entity, token, lease))
    }
    async fn current_version(&self, entity: &StoreKey) -> Result<Option<Version>, StoreError> {
        delegate!(self, s => s.current_version(entity))
    }
}
