//! The stale-event guard's function-level API (protocol §13):
//! [`Engine::apply_if_newer`] runs an update only if its version is newer
//! than the entity's highest completed one, one update per entity at a
//! time.
//!
//! Shaped like [`Engine::once`](crate::Engine::once): the store decides in
//! ONE atomic step ([`VersionStore::begin_version`]), the closure runs
//! under a lease kept alive by a heartbeat, and the outcome is written
//! (fenced) before the call returns. Unlike `once`, nothing of the
//! closure's value is stored: what the entity keeps is its version.
//! [`Applied`] and [`ApplyError`] are defined below the store (in
//! `version.rs`, shared with `PostgresStore::transaction_if_newer`) and
//! re-exported here.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::engine::Engine;
use crate::key::StoreKey;
use crate::policy::{Ambiguous, Concurrent, FailMode, Rules};
use crate::record::Token;
use crate::store::{Fence, StoreError, VersionBegin, VersionStore};
use crate::version::Version;

pub use crate::version::{Applied, ApplyError};

/// First pause of a `wait` caller between two looks at a held entity;
/// it doubles up to the engine's `poll_interval`.
const FIRST_PAUSE: Duration = Duration::from_millis(2);

impl<S: VersionStore> Engine<S> {
    /// Runs `f` only if `version` is newer than the highest version
    /// completed for `entity` (protocol §13), and records `version` as the
    /// entity's once `f` succeeds.
    ///
    /// - `version` ≤ the entity's highest completed version →
    ///   [`Applied::Stale`], and `f` does not run.
    /// - another update of the entity is running → under [`Rules::wait`]
    ///   this call waits for it (looking again after 2 ms, doubling up to
    ///   the engine's `poll_interval`, for `rules.wait_timeout` at most) and
    ///   then decides again: its update runs if it is still the newest, or
    ///   is stale; under `reject` (the default) it gets
    ///   [`ApplyError::InProgress`] at once.
    /// - `f` returns `Ok` → the version is stored (fenced), then the value
    ///   comes back as [`Applied::Applied`]; `Err` → the entity is freed
    ///   with its version unchanged and the error comes back as
    ///   [`ApplyError::Failed`].
    ///
    /// Updates of one entity therefore run one at a time, in increasing
    /// version order; an older one arriving late is dropped. While `f`
    /// runs, a heartbeat extends the hold every third of `rules.lease`; a
    /// holder that died is taken over once its lease runs out. A call
    /// dropped while `f` runs (or an `f` that panics) may have had its
    /// effect: the entity stays held until the lease runs out (or is freed
    /// at once under `rules.ambiguous = release`); its version is not
    /// advanced. If the version cannot be stored after `f` succeeded (the
    /// store failed for the engine's `complete_retry`, or the lease was
    /// lost), `f`'s value is still returned and the failure logged: the
    /// effect happened.
    ///
    /// The store being unreachable answers [`ApplyError::Store`] under
    /// `fail = closed`; under `fail = open`, `f` runs unguarded (logged).
    ///
    /// ```
    /// use idem::{Engine, MemoryStore, Rules, Scope, StoreKey, Version};
    /// use idem::apply::Applied;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let engine = Engine::new(MemoryStore::new());
    /// let sub = StoreKey::new(&Scope::named("billing"), "subscription-7");
    /// let rules = Rules::wait();
    /// let set = |state: &'static str| move || async move { Ok::<_, std::io::Error>(state) };
    ///
    /// // "cancel" (v2) is processed first; the late "renew" (v1) is stale.
    /// let cancel = engine.apply_if_newer(&sub, Version::Number(2), &rules, set("cancelled")).await;
    /// assert_eq!(cancel.unwrap(), Applied::Applied("cancelled"));
    /// let renew = engine.apply_if_newer(&sub, Version::Number(1), &rules, set("active")).await;
    /// assert_eq!(renew.unwrap(), Applied::Stale { current: Version::Number(2) });
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// See above.
    pub async fn apply_if_newer<T, E, F, Fut>(
        &self,
        entity: &StoreKey,
        version: Version,
        rules: &Rules,
        f: F,
    ) -> Result<Applied<T>, ApplyError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let store = self.store();
        let deadline = Instant::now() + rules.wait_timeout;
        let mut pause = FIRST_PAUSE;
        let lease = loop {
            let begun = self
                .bounded(store.begin_version(entity, version, rules.lease))
                .await;
            match begun {
                Ok(VersionBegin::Acquired(lease)) => break lease,
                Ok(VersionBegin::Stale { current }) => return Ok(Applied::Stale { current }),
                Ok(VersionBegin::Mixed { current }) => return Err(ApplyError::Mixed { current }),
                Ok(VersionBegin::InFlight { lease_remaining }) => {
                    let now = Instant::now();
                    if rules.concurrent == Concurrent::Reject || now >= deadline {
                        return Err(ApplyError::InProgress {
                            retry_after: lease_remaining,
                        });
                    }
                    tokio::time::sleep(pause.min(deadline - now)).await;
                    pause = (pause * 2).min(self.config().poll_interval.max(FIRST_PAUSE));
                }
                Err(error) => {
                    return match rules.fail {
                        FailMode::Closed => {
                            tracing::warn!(entity = %entity.log_id(), %error, "store unavailable; failing closed");
                            Err(ApplyError::Store(error))
                        }
                        FailMode::Open => {
                            tracing::warn!(entity = %entity.log_id(), %error, "store unavailable; applying WITHOUT the stale guard (fail = open)");
                            f().await.map(Applied::Applied).map_err(ApplyError::Failed)
                        }
                    };
                }
            }
        };

        let mut guard = HoldGuard {
            engine: self,
            entity,
            token: Some(lease.token),
            release: rules.ambiguous == Ambiguous::Release,
        };
        let every = (lease.duration / 3).max(Duration::from_millis(1));
        let run = f();
        tokio::pin!(run);
        let out = loop {
            tokio::select! {
                biased;
                out = &mut run => break out,
                () = tokio::time::sleep(every) => {
                    let beat = self.bounded(store.extend_version(entity, lease.token, lease.duration)).await;
                    if let Ok(Fence::Lost) = beat {
                        tracing::warn!(entity = %entity.log_id(), "stale guard: the hold was taken over while the update ran");
                    }
                }
            }
        };
        guard.token = None;
        match out {
            Ok(value) => {
                self.commit(entity, lease.token, version, lease.duration)
                    .await;
                Ok(Applied::Applied(value))
            }
            Err(e) => {
                if let Err(error) = self.bounded(store.abort_version(entity, lease.token)).await {
                    tracing::warn!(entity = %entity.log_id(), %error, "stale guard: cannot free the entity after a failed update; it frees itself when the lease runs out");
                }
                Err(ApplyError::Failed(e))
            }
        }
    }

    /// The highest version completed for `entity` (`None`: none yet).
    ///
    /// # Errors
    ///
    /// When the store fails.
    pub async fn current_version(&self, entity: &StoreKey) -> Result<Option<Version>, StoreError> {
        self.bounded(self.store().current_version(entity)).await
    }

    /// Stores `version` for the holder `token`, retrying a failing store
    /// for `complete_retry` (never past the lease).
    async fn commit(&self, entity: &StoreKey, token: Token, version: Version, lease: Duration) {
        let give_up = Instant::now() + self.config().complete_retry.min(lease);
        let mut pause = Duration::from_millis(10);
        loop {
            match self
                .bounded(self.store().commit_version(entity, token, version))
                .await
            {
                Ok(Fence::Held) => return,
                Ok(Fence::Lost) => {
                    tracing::warn!(entity = %entity.log_id(), %version, "stale guard: fenced out; the update ran but its version was not stored");
                    return;
                }
                Err(error) if Instant::now() + pause >= give_up => {
                    tracing::warn!(entity = %entity.log_id(), %version, %error, "stale guard: cannot store the version; the entity frees itself when the lease runs out");
                    return;
                }
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
            }
        }
    }

    async fn bounded<T>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let timeout = self.config().store_timeout;
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(timeout)),
        }
    }
}

/// Settles a hold whose update ended without an answer (the call was
/// dropped, or `f` panicked): kept until its lease runs out, or freed in
/// the background under `ambiguous = release`.
struct HoldGuard<'a, S: VersionStore> {
    engine: &'a Engine<S>,
    entity: &'a StoreKey,
    token: Option<Token>,
    release: bool,
}

impl<S: VersionStore> Drop for HoldGuard<'_, S> {
    fn drop(&mut self) {
        let Some(token) = self.token.take() else {
            return;
        };
        if !self.release {
            tracing::warn!(entity = %self.entity.log_id(), "stale guard: update abandoned while running; the entity stays held until its lease runs out");
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let engine = self.engine.clone();
        let entity = self.entity.clone();
        handle.spawn(async move {
            let _ = engine
                .bounded(engine.store().abort_version(&entity, token))
                .await;
        });
    }
}
