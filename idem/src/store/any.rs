//! [`AnyStore`]: one type over every backend compiled in, chosen at run
//! time (by URL scheme in `idem serve`).

use std::sync::Arc;
use std::time::Duration;

use super::{Fence, Reservation, Store, StoreError, Subscription};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::record::{CompletedRecord, Record, Token};

/// Any store this build supports. Implements [`Store`] by delegation.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AnyStore {
    /// The in-process store.
    #[cfg(feature = "memory")]
    Memory(super::memory::MemoryStore),
    /// Redis or Redis Cluster.
    #[cfg(feature = "redis")]
    Redis(super::redis::RedisStore),
    /// PostgreSQL.
    #[cfg(feature = "postgres")]
    Postgres(super::postgres::PostgresStore),
}

impl AnyStore {
    /// A short name of the backend: `memory`, `redis` or `postgres`.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            #[cfg(feature = "memory")]
            Self::Memory(_) => "memory",
            #[cfg(feature = "redis")]
            Self::Redis(_) => "redis",
            #[cfg(feature = "postgres")]
            Self::Postgres(_) => "postgres",
        }
    }
}

/// Calls `$method` on whichever backend `$self` holds.
macro_rules! delegate {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            #[cfg(feature = "memory")]
            AnyStore::Memory($s) => $call,
            #[cfg(feature = "redis")]
            AnyStore::Redis($s) => $call,
            #[cfg(feature = "postgres")]
            AnyStore::Postgres($s) => $call,
        }
    };
}

impl Store for AnyStore {
    async fn reserve(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Reservation, StoreError> {
        delegate!(self, s => s.reserve(key, fingerprint, lease).await)
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: Token,
        record: Arc<CompletedRecord>,
        retention: Duration,
    ) -> Result<Fence, StoreError> {
        delegate!(self, s => s.complete(key, token, record, retention).await)
    }

    async fn release(&self, key: &StoreKey, token: Token) -> Result<Fence, StoreError> {
        delegate!(self, s => s.release(key, token).await)
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        delegate!(self, s => s.extend(key, token, lease).await)
    }

    async fn get(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        delegate!(self, s => s.get(key).await)
    }

    async fn purge(&self, key: &StoreKey) -> Result<bool, StoreError> {
        delegate!(self, s => s.purge(key).await)
    }

    async fn subscribe(&self, key: &StoreKey) -> Result<Subscription, StoreError> {
        delegate!(self, s => s.subscribe(key).await)
    }
}
