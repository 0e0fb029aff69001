//! The store trait (protocol §7): atomic operations only.
//!
//! Every operation is ONE atomic step in the backend: there is no
//! read-then-write window between deciding and writing. Protocol outcomes
//! (in flight, completed, mismatch, fenced) are values; [`StoreError`] is for
//! failures (unreachable, timed out, full, corrupt).
//!
//! Waiters learn of a key's change through [`Store::subscribe`]; stores feed
//! a shared [`Notifier`] from their own notification channel (in-process for
//! memory, pub/sub for Redis, LISTEN/NOTIFY for PostgreSQL). A notification
//! may be lost; waiters always poll too, so a lost one delays but never hangs.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use crate::fingerprint::Fingerprint;
use crate::key::{KeyMap, StoreKey};
use crate::policy::Concurrent;
use crate::record::{CompletedRecord, Record, Token};

pub use crate::error::{BoxError, ConfigError, Corruption, StoreError};
pub use any::{AnyStore, ConnectOptions, StoreUrl, ThreadPins};
pub use job::{Attempts, MAX_ERROR_BYTES};
#[cfg(any(feature = "redis", feature = "postgres"))]
pub use pin::ThreadPin;
pub use queue::{
    Claimed, Enqueued, InvalidOperationId, Operation, OperationId, OperationRequest,
    OperationState, Queue, QueueStats,
};
pub use version::{VersionBegin, VersionStore};

mod any;
#[cfg(any(feature = "redis", feature = "postgres"))]
mod background;
pub mod job;
#[cfg(feature = "memory")]
pub mod memory;
#[cfg(any(feature = "redis", feature = "postgres"))]
mod pin;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod queue;
#[cfg(feature = "redis")]
pub mod redis;
pub mod version;

/// The outcome of [`Store::reserve`] (protocol §3.6).
///
/// Like pingora-cache's lock, acquiring hands back an outcome; the winner's
/// [`Lease`] is a permit it owns and hands back by value when it is done.
/// [`Reservation::decide`] says what the caller must do with each outcome.
#[derive(Debug)]
pub enum Reservation {
    /// The caller holds the key and must execute, then complete or release.
    Acquired(Lease),
    /// Another execution holds the key with the same fingerprint.
    InFlight {
        /// Time left on the holder's lease.
        lease_remaining: Duration,
    },
    /// The stored answer for the same fingerprint: replay it.
    Completed(Arc<CompletedRecord>),
    /// The key holds a record for a different fingerprint (422).
    Mismatch,
}

/// A held reservation: the fencing token and the lease it was granted with.
///
/// A permit, not a value to copy around: it is neither `Copy` nor `Clone`,
/// so one reservation has one owner, who completes or releases it (the
/// engine hands it back by value; a request cancelled while holding it
/// releases it in the background).
#[derive(Debug, PartialEq, Eq)]
pub struct Lease {
    /// The holder's fencing token.
    pub token: Token,
    /// How long the reservation lives without a heartbeat.
    pub duration: Duration,
}

/// What the caller of [`Store::reserve`] must do next (protocol §3.6, §5):
/// the one reading of a [`Reservation`] that the engine (`run`, `wait`)
/// and the transactional APIs share.
#[derive(Debug)]
pub enum Decision {
    /// Execute under this lease, then complete or release it.
    Execute(Lease),
    /// Replay this stored answer.
    Replay(Arc<CompletedRecord>),
    /// The key was used with a different request (422).
    Mismatch,
    /// Another execution holds the key and duplicates are rejected (409):
    /// retry after this long.
    Conflict {
        /// Time left on the holder's lease.
        retry_after: Duration,
    },
    /// Another execution holds the key and duplicates wait for it.
    Wait {
        /// Time left on the holder's lease.
        lease_remaining: Duration,
    },
}

impl Reservation {
    /// What to do with this outcome when concurrent duplicates are
    /// `concurrent` (protocol §5).
    #[must_use]
    pub fn decide(self, concurrent: Concurrent) -> Decision {
        match self {
            Self::Acquired(lease) => Decision::Execute(lease),
            Self::Completed(record) => Decision::Replay(record),
            Self::Mismatch => Decision::Mismatch,
            Self::InFlight { lease_remaining } => match concurrent {
                Concurrent::Reject => Decision::Conflict {
                    retry_after: lease_remaining,
                },
                Concurrent::Wait => Decision::Wait { lease_remaining },
            },
        }
    }
}

/// The outcome of a fenced operation (`complete`, `release`, `extend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// The record still carried the caller's token: the operation applied.
    Held,
    /// Another holder took over (or the record is gone): nothing changed.
    Lost,
}

/// The atomic operations every store provides (protocol §7).
///
/// `complete`, `release` and `extend` are fenced: they apply only while the
/// record carries the caller's token. Implementations must pass the
/// conformance suite in `tests/conformance/`.
pub trait Store: Send + Sync + 'static {
    /// ONE atomic step: no record or an expired lease → write `InFlight`
    /// with a new token; otherwise report what is there.
    fn reserve(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Reservation, StoreError>> + Send;

    /// Replaces the caller's `InFlight` with `record`, kept for `retention`.
    ///
    /// Idempotent for its holder: if the record was already completed with
    /// this token (a retry after a lost reply), it answers `Held` and keeps
    /// the first record unchanged.
    fn complete(
        &self,
        key: &StoreKey,
        token: Token,
        record: Arc<CompletedRecord>,
        retention: Duration,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send;

    /// Deletes the caller's `InFlight` so the next request executes.
    fn release(
        &self,
        key: &StoreKey,
        token: Token,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send;

    /// Heartbeat: the caller's lease now ends `lease` from now.
    fn extend(
        &self,
        key: &StoreKey,
        token: Token,
        lease: Duration,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send;

    /// The record under `key`, if any (expired records read as `None`).
    fn get(
        &self,
        key: &StoreKey,
    ) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send;

    /// Deletes whatever is under `key`: the record and the job trace
    /// (`job.rs`). `true` when something was there.
    fn purge(&self, key: &StoreKey) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// A subscription that fires when `key` may have changed. Take it
    /// BEFORE reading the record, so no change slips between read and wait.
    ///
    /// Guaranteed for `complete`, `release` and `purge` of a record that a
    /// `reserve` found in flight (every waiter has done that first); a store
    /// may skip notifying changes nobody can be waiting for (PostgreSQL
    /// does: a NOTIFY serializes commits).
    fn subscribe(
        &self,
        key: &StoreKey,
    ) -> impl Future<Output = Result<Subscription, StoreError>> + Send;

    /// Job bookkeeping (protocol §13, `job.rs`): ONE atomic step that
    /// counts a new run of the job under `key` and marks it running;
    /// answers its number (1 for the first run; after a release, one more
    /// than the last). The trace is kept for `keep` from now.
    ///
    /// Called by the holder of `key`'s reservation only, so runs are
    /// counted in the order they start. The default keeps no trace and
    /// answers 0 ("not counted"); every store of this crate keeps one.
    fn begin_attempt(
        &self,
        key: &StoreKey,
        keep: Duration,
    ) -> impl Future<Output = Result<u32, StoreError>> + Send {
        let _ = (key, keep);
        std::future::ready(Ok(0))
    }

    /// Job bookkeeping: ONE atomic step that marks run `attempt` of `key`
    /// ended with `error` (bounded by the caller to
    /// [`MAX_ERROR_BYTES`]), keeping the trace for `keep`. Fenced on the
    /// attempt: if a later run has begun, nothing changes and it answers
    /// [`Fence::Lost`]. The default keeps nothing.
    fn end_attempt(
        &self,
        key: &StoreKey,
        attempt: u32,
        error: Option<&str>,
        keep: Duration,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send {
        let _ = (key, attempt, error, keep);
        std::future::ready(Ok(Fence::Lost))
    }

    /// Job bookkeeping: the trace of `key`, if one is kept and has not
    /// expired. The default keeps none.
    fn attempts(
        &self,
        key: &StoreKey,
    ) -> impl Future<Output = Result<Option<Attempts>, StoreError>> + Send {
        let _ = key;
        std::future::ready(Ok(None))
    }
}

impl<T: Store> Store for Arc<T> {
    fn reserve(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Reservation, StoreError>> + Send {
        (**self).reserve(key, fingerprint, lease)
    }
    fn complete(
        &self,
        key: &StoreKey,
        token: Token,
        record: Arc<CompletedRecord>,
        retention: Duration,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send {
        (**self).complete(key, token, record, retention)
    }
    fn release(
        &self,
        key: &StoreKey,
        token: Token,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send {
        (**self).release(key, token)
    }
    fn extend(
        &self,
        key: &StoreKey,
        token: Token,
        lease: Duration,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send {
        (**self).extend(key, token, lease)
    }
    fn get(
        &self,
        key: &StoreKey,
    ) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send {
        (**self).get(key)
    }
    fn purge(&self, key: &StoreKey) -> impl Future<Output = Result<bool, StoreError>> + Send {
        (**self).purge(key)
    }
    fn subscribe(
        &self,
        key: &StoreKey,
    ) -> impl Future<Output = Result<Subscription, StoreError>> + Send {
        (**self).subscribe(key)
    }
    fn begin_attempt(
        &self,
        key: &StoreKey,
        keep: Duration,
    ) -> impl Future<Output = Result<u32, StoreError>> + Send {
        (**self).begin_attempt(key, keep)
    }
    fn end_attempt(
        &self,
        key: &StoreKey,
        attempt: u32,
        error: Option<&str>,
        keep: Duration,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send {
        (**self).end_attempt(key, attempt, error, keep)
    }
    fn attempts(
        &self,
        key: &StoreKey,
    ) -> impl Future<Output = Result<Option<Attempts>, StoreError>> + Send {
        (**self).attempts(key)
    }
}

const NOTIFIER_SHARDS: usize = 16;

/// Per-key change notifications inside one process.
///
/// Stores call [`Notifier::notify`] when a key changes (or when their
/// backend tells them it did); waiters hold a [`Subscription`]. Keys nobody
/// watches cost one atomic load per notification.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    inner: Arc<NotifierInner>,
}

#[derive(Debug, Default)]
struct NotifierInner {
    watched: AtomicUsize,
    shards: [Mutex<KeyMap<watch::Sender<()>>>; NOTIFIER_SHARDS],
}

impl NotifierInner {
    fn shard(&self, key: &StoreKey) -> MutexGuard<'_, KeyMap<watch::Sender<()>>> {
        // A poisoned map is still a consistent map of senders.
        self.shards[key.shard(NOTIFIER_SHARDS)]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Notifier {
    /// A new, empty notifier.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether anybody in this process watches any key.
    #[must_use]
    pub fn has_watchers(&self) -> bool {
        self.inner.watched.load(Ordering::Acquire) > 0
    }

    /// Wakes every subscription of `key`.
    pub fn notify(&self, key: &StoreKey) {
        if !self.has_watchers() {
            return;
        }
        if let Some(tx) = self.inner.shard(key).get(key) {
            tx.send_replace(());
        }
    }

    /// Wakes every subscription of every key (used after a reconnect, when
    /// notifications may have been missed).
    pub fn notify_all(&self) {
        for shard in &self.inner.shards {
            for tx in shard
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
            {
                tx.send_replace(());
            }
        }
    }

    /// A subscription to `key`'s changes from now on.
    #[must_use]
    pub fn subscribe(&self, key: &StoreKey) -> Subscription {
        let rx = {
            let mut shard = self.inner.shard(key);
            let tx = shard
                .entry(key.clone())
                .or_insert_with(|| watch::channel(()).0);
            tx.subscribe()
        };
        self.inner.watched.fetch_add(1, Ordering::AcqRel);
        Subscription {
            rx,
            key: key.clone(),
            notifier: Some(self.clone()),
        }
    }
}

/// Fires when the subscribed key may have changed. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    rx: watch::Receiver<()>,
    key: StoreKey,
    notifier: Option<Notifier>,
}

impl Subscription {
    /// A subscription that never fires: waiters then rely on polling alone.
    #[must_use]
    pub fn never(key: &StoreKey) -> Self {
        Self {
            rx: watch::channel(()).1,
            key: key.clone(),
            notifier: None,
        }
    }

    /// Waits for the next change. Cancel-safe.
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            // The sender is gone (a `never` subscription): only polling wakes us.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let Some(notifier) = self.notifier.take() else {
            return;
        };
        notifier.inner.watched.fetch_sub(1, Ordering::AcqRel);
        let mut shard = notifier.inner.shard(&self.key);
        // Our receiver still counts until this function returns.
        if shard
            .get(&self.key)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            shard.remove(&self.key);
        }
    }
}
