//! The stale-event guard in memory (protocol §13): one map of entities
//! behind one `std::sync::Mutex`, held for the few instructions of one
//! step and never across an `.await`, so every step is atomic.
//!
//! Entities are bounded by the store's `max_entries` (a version is tiny, so
//! the byte bound does not count them); a new entity past it is refused
//! with [`StoreError::Capacity`]. A version is never evicted: forgetting
//! it would let an old event through.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::MemoryStore;
use crate::key::StoreKey;
use crate::record::Token;
use crate::store::{Fence, Lease, StoreError, VersionBegin, VersionStore};
use crate::version::Version;

/// Every entity's version and holder.
#[derive(Debug, Default)]
pub(super) struct Versions {
    map: Mutex<HashMap<StoreKey, Entity>>,
}

#[derive(Debug, Default)]
struct Entity {
    /// The highest completed version.
    current: Option<Version>,
    /// The event in flight and the end of its lease.
    holder: Option<(Token, Instant)>,
}

impl Versions {
    fn lock(&self) -> MutexGuard<'_, HashMap<StoreKey, Entity>> {
        // A poisoned map is still consistent: every step writes at its end.
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `f` to the entity's holder if it is `token`'s.
    fn fenced(&self, entity: &StoreKey, token: Token, f: impl FnOnce(&mut Entity)) -> Fence {
        let mut map = self.lock();
        match map.get_mut(entity) {
            Some(e) if e.holder.is_some_and(|(t, _)| t == token) => {
                f(e);
                Fence::Held
            }
            _ => Fence::Lost,
        }
    }
}

impl VersionStore for MemoryStore {
    async fn begin_version(
        &self,
        entity: &StoreKey,
        version: Version,
        lease: Duration,
    ) -> Result<VersionBegin, StoreError> {
        let now = Instant::now();
        let versions = &self.shared.versions;
        let mut map = versions.lock();
        if !map.contains_key(entity) && map.len() >= self.shared.limits.max_entries {
            return Err(StoreError::Capacity("too many entities with versions"));
        }
        let e = map.entry(entity.clone()).or_default();
        if let Some(current) = e.current {
            if current.kind() != version.kind() {
                return Ok(VersionBegin::Mixed { current });
            }
            if version <= current {
                return Ok(VersionBegin::Stale { current });
            }
        }
        if let Some((_, until)) = e.holder {
            if until > now {
                return Ok(VersionBegin::InFlight {
                    lease_remaining: until - now,
                });
            }
        }
        let token = Token::generate();
        e.holder = Some((token, now + lease));
        Ok(VersionBegin::Acquired(Lease {
            token,
            duration: lease,
        }))
    }

    async fn commit_version(
        &self,
        entity: &StoreKey,
        token: Token,
        version: Version,
    ) -> Result<Fence, StoreError> {
        Ok(self.shared.versions.fenced(entity, token, |e| {
            e.holder = None;
            e.current = Some(e.current.map_or(version, |c| c.max(version)));
        }))
    }

    async fn abort_version(&self, entity: &StoreKey, token: Token) -> Result<Fence, StoreError> {
        let versions = &self.shared.versions;
        let fence = versions.fenced(entity, token, |e| e.holder = None);
        // An entity that never completed an event holds nothing worth keeping.
        let mut map = versions.lock();
        if map
            .get(entity)
            .is_some_and(|e| e.current.is_none() && e.holder.is_none())
        {
            map.remove(entity);
        }
        Ok(fence)
    }

    async fn extend_version(
        &self,
        entity: &StoreKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        let until = Instant::now() + lease;
        Ok(self.shared.versions.fenced(entity, token, |e| {
            e.holder = Some((token, until));
        }))
    }

    async fn current_version(&self, entity: &StoreKey) -> Result<Option<Version>, StoreError> {
        Ok(self
            .shared
            .versions
            .lock()
            .get(entity)
            .and_then(|e| e.current))
    }
}
