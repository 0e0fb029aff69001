//! How a transactional duplicate waits (issue 10, item 16): NOT on the
//! holder's row lock, which would keep a pooled connection for the whole
//! wait, so a burst of duplicates of one key would fill the pool and every
//! other key's calls would time out.
//!
//! A duplicate that meets an open transaction's row lock rolls back at once
//! (giving its connection back) and waits here, the way the engine's waiters
//! do (`engine/flight.rs`): every waiter of a key in this process shares ONE
//! watcher, which subscribes to the key's changes in the store's
//! [`Notifier`] and looks again with backoff (5 ms doubling to
//! [`POLL_MAX`]). A look is a rolled-back reserve that waits at most
//! [`LOOK_LOCK_WAIT`] for the row lock: a connection for a few round trips,
//! once per pause, per key, whatever the number of waiters.
//!
//! A holder in this process wakes the watcher the moment its transaction
//! ends (commit or roll-back). A holder in another instance cannot: its
//! in-flight row is never committed, so no reserve can mark it `waiters`
//! for its `complete` to `NOTIFY`, and notifying on every transactional
//! commit would serialize commits (see `migrate.sql`). Waiters there learn
//! of its end by looking, at most [`POLL_MAX`] late.
//!
//! A std `Mutex` guards the map of watchers; it is never held across an
//! `.await`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::row::{completed, fingerprint, flag, state, IN_FLIGHT};
use super::transaction::Reserved;
use super::PostgresStore;
use crate::fingerprint::Fingerprint;
use crate::key::{KeyMap, StoreKey};
use crate::record::{CompletedRecord, Token};

/// Longest pause between two looks at a key held by an open transaction.
pub(super) const POLL_MAX: Duration = Duration::from_millis(100);
/// First pause: the holder is often about to commit.
const POLL_MIN: Duration = Duration::from_millis(5);
/// How long a look waits for the holder's row lock before it counts the
/// key as still held.
pub(super) const LOOK_LOCK_WAIT: Duration = Duration::from_millis(1);
/// The lease a look writes (and rolls back): any value will do.
const LOOK_LEASE: Duration = Duration::from_secs(1);

/// What a key's watcher has seen.
#[derive(Debug, Clone)]
pub(super) enum Seen {
    /// The holder's transaction is still open.
    Held,
    /// The holder committed this answer (for whichever fingerprint: each
    /// waiter compares its own).
    Completed(Arc<CompletedRecord>),
    /// The key is free, held by a non-transactional reservation, or the
    /// look failed: each waiter tries again itself.
    Look,
}

const SHARDS: usize = 16;

/// The live watchers of a store, one per waited-on key, in shards so that
/// waiters of different keys rarely share a lock.
#[derive(Default)]
pub(super) struct Watchers {
    shards: [Mutex<KeyMap<Arc<watch::Sender<Seen>>>>; SHARDS],
}

impl Watchers {
    fn shard(&self, key: &StoreKey) -> &Mutex<KeyMap<Arc<watch::Sender<Seen>>>> {
        &self.shards[key.shard(SHARDS)]
    }
}

impl PostgresStore {
    /// Waits, holding no connection, until the open transaction that holds
    /// `key` ends, or until `deadline` (`None`).
    pub(super) async fn wait_for_holder(&self, key: &StoreKey, deadline: Instant) -> Option<Seen> {
        let mut rx = self.join_watcher(key);
        let seen = tokio::time::timeout_at(deadline, rx.wait_for(|s| !matches!(s, Seen::Held)))
            .await
            .map(|r| r.map(|seen| seen.clone()));
        match seen {
            Err(_) => None,
            Ok(Ok(seen)) => Some(seen),
            // The watcher is gone without a verdict: look again.
            Ok(Err(_)) => Some(Seen::Look),
        }
    }

    /// Joins the watcher of `key`, starting one if there is none.
    fn join_watcher(&self, key: &StoreKey) -> watch::Receiver<Seen> {
        let shard = self.shared.watchers.shard(key);
        let mut map = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = map.get(key) {
            // Join only a watcher that has no verdict yet; one that is
            // finishing would hand back a stale verdict. (One that is
            // stopping because its waiters left drops its sender, and the
            // joiner then looks again itself.)
            if matches!(*tx.borrow(), Seen::Held) {
                return tx.subscribe();
            }
        }
        // The map keeps the sender, not a receiver: with no receiver left
        // (every waiter gave up) `closed()` fires and the watcher stops.
        let (tx, rx) = watch::channel(Seen::Held);
        let tx = Arc::new(tx);
        map.insert(key.clone(), Arc::clone(&tx));
        drop(map);
        let (store, key) = (self.clone(), key.clone());
        tokio::spawn(async move {
            store.watch(&key, &tx).await;
            let shard = store.shared.watchers.shard(&key);
            let mut map = shard.lock().unwrap_or_else(PoisonError::into_inner);
            // Remove our entry only: a newer watcher may have replaced it.
            if map.get(&key).is_some_and(|t| Arc::ptr_eq(t, &tx)) {
                map.remove(&key);
            }
        });
        rx
    }

    /// Looks at `key` after each change notification or pause, until the
    /// holder is gone or every waiter left.
    async fn watch(&self, key: &StoreKey, tx: &watch::Sender<Seen>) {
        // Subscribed before the first look, so no change slips between.
        let mut changed = self.shared.notifier.subscribe(key);
        let mut pause = POLL_MIN;
        loop {
            // The waiter has just met the lock: first give the holder a moment.
            tokio::select! {
                () = tx.closed() => return,
                () = tokio::time::sleep(pause) => {}
                () = changed.changed() => {}
            }
            pause = (pause * 2).min(POLL_MAX);
            let seen = self.look(key).await;
            if !matches!(seen, Seen::Held) {
                tx.send_replace(seen);
                return;
            }
        }
    }

    /// One look: a reserve (waiting [`LOOK_LOCK_WAIT`] at most for the row
    /// lock), always rolled back.
    async fn look(&self, key: &StoreKey) -> Seen {
        let reserved = self
            .begin_reserve(
                key,
                Token::generate(),
                Fingerprint([0; 32]),
                LOOK_LEASE,
                LOOK_LOCK_WAIT,
            )
            .await;
        let (tx, row) = match reserved {
            Ok((tx, Reserved::Row(row))) => (tx, row),
            Ok((tx, Reserved::Busy)) => {
                self.rollback(tx).await;
                return Seen::Held;
            }
            Ok((tx, Reserved::Failed(error))) => {
                self.rollback(tx).await;
                tracing::debug!(key = %key.log_id(), %error, "looking at a held key failed");
                return Seen::Look;
            }
            Err(error) => {
                tracing::debug!(key = %key.log_id(), %error, "looking at a held key failed");
                return Seen::Look;
            }
        };
        self.rollback(tx).await;
        // Acquired (the key is free) or a committed reservation: the
        // waiters try again themselves. A completed record: hand it over.
        let completed = (|| {
            if flag(&row, "acquired")? || state(&row)? == IN_FLIGHT {
                return Ok(None);
            }
            let stored = fingerprint(&row)?;
            completed(&row, stored).map(Some)
        })();
        match completed {
            Ok(Some(record)) => Seen::Completed(Arc::new(record)),
            Ok(None) => Seen::Look,
            Err(error) => {
                tracing::debug!(key = %key.log_id(), %error, "looking at a held key failed");
                Seen::Look
            }
        }
    }
}
