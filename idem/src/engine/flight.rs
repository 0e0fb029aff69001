//! Single-flight waiting (protocol §5 `wait`): every waiter of a key in this
//! process shares ONE watcher, which subscribes to the key's changes and
//! polls the store (with backoff, and never later than the holder's lease
//! end) until the holder completes, releases or dies, or until its last
//! waiter is gone (timed out or dropped): a watcher nobody listens to stops.
//!
//! At most [`EngineConfig::max_watchers`](super::EngineConfig::max_watchers)
//! watchers live at once. A waiter that would need one more gets 409 at
//! once (as a `wait_timeout` of zero would), rather than polling on its own:
//! past the cap, every extra waiter would be one more poller of the store,
//! which is what the cap is there to bound.
//!
//! A std `Mutex` guards the map of watchers; it is never held across an
//! `.await`. Joining a watcher (subscribing) and a watcher's decision to
//! stop for want of waiters both happen under the shard's lock, so a waiter
//! never joins a watcher that has already decided to stop.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use super::Engine;
use crate::key::{KeyMap, StoreKey};
use crate::record::{CompletedRecord, Record};
use crate::store::Store;

/// What a key's single-flight watcher has seen.
#[derive(Debug, Clone)]
pub(super) enum FlightState {
    /// The holder is still running; its lease has this long left.
    Pending { lease_remaining: Duration },
    /// The holder stored this answer.
    Completed(Arc<CompletedRecord>),
    /// Released or lease expired: waiters try to reserve again.
    Vacant,
    /// The store failed while watching: waiters try to reserve again.
    Failed,
}

const FLIGHT_SHARDS: usize = 16;

/// A watcher's channel: the watcher sends, waiters subscribe.
type Watch = Arc<watch::Sender<FlightState>>;

/// The live watchers of this process, one per waited-on key, in shards so
/// that waiters of different keys rarely share a lock. The map holds each
/// watcher's sender (never a receiver: the watcher stops when the last
/// waiter's receiver is gone).
#[derive(Default)]
pub(super) struct Flights {
    shards: [Mutex<KeyMap<Watch>>; FLIGHT_SHARDS],
    /// Watchers running now (bounded by `max_watchers`).
    live: AtomicUsize,
}

impl Flights {
    fn shard(&self, key: &StoreKey) -> &Mutex<KeyMap<Watch>> {
        &self.shards[key.shard(FLIGHT_SHARDS)]
    }
}

impl<S: Store> Engine<S> {
    /// Joins the watcher of `key`, starting one if there is none: all
    /// waiters of a key in this process share ONE subscription and poll
    /// loop. `None` when a new watcher is needed and `max_watchers` are
    /// already running.
    pub(super) fn join_flight(&self, key: &StoreKey) -> Option<watch::Receiver<FlightState>> {
        let flights = &self.inner.flights;
        let mut map = flights
            .shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = map.get(key) {
            // Join only a watcher that has no verdict yet; one that is
            // finishing would hand back a stale verdict.
            if matches!(*tx.borrow(), FlightState::Pending { .. }) {
                return Some(tx.subscribe());
            }
        }
        let max = self.inner.config.max_watchers;
        let admitted = flights
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            return None;
        }
        let (tx, rx) = watch::channel(FlightState::Pending {
            lease_remaining: Duration::ZERO,
        });
        let tx = Arc::new(tx);
        map.insert(key.clone(), Arc::clone(&tx));
        drop(map);
        let m = &self.inner.metrics;
        m.watchers.fetch_add(1, Ordering::Relaxed);
        let engine = self.clone();
        let key = key.clone();
        tokio::spawn(async move {
            engine.watch_flight(&key, &tx).await;
            let flights = &engine.inner.flights;
            let mut map = flights
                .shard(&key)
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Remove our entry only: a newer watcher may have replaced it.
            if map.get(&key).is_some_and(|t| Arc::ptr_eq(t, &tx)) {
                map.remove(&key);
            }
            drop(map);
            flights.live.fetch_sub(1, Ordering::AcqRel);
            engine
                .inner
                .metrics
                .watchers
                .fetch_sub(1, Ordering::Relaxed);
        });
        Some(rx)
    }

    /// Whether the watcher of `key` has nobody left to tell; if so it is
    /// taken out of the map, under the same lock that waiters join under,
    /// so no waiter can join it afterwards.
    fn abandoned(&self, key: &StoreKey, tx: &Watch) -> bool {
        let mut map = self
            .inner
            .flights
            .shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if tx.receiver_count() > 0 {
            return false;
        }
        if map.get(key).is_some_and(|t| Arc::ptr_eq(t, tx)) {
            map.remove(key);
        }
        true
    }

    async fn watch_flight(&self, key: &StoreKey, tx: &Watch) {
        let store = &self.inner.store;
        let mut sub = match self.call(store.subscribe(key)).await {
            Ok(s) => Some(s),
            Err(error) => {
                tracing::debug!(key = %key.log_id(), %error, "subscribe failed; polling only");
                None
            }
        };
        let mut pause = Duration::from_millis(5);
        loop {
            if self.abandoned(key, tx) {
                return;
            }
            let state = match self.call(store.get(key)).await {
                Err(_) => FlightState::Failed,
                Ok(None) => FlightState::Vacant,
                Ok(Some(Record::Completed(r))) => FlightState::Completed(r),
                Ok(Some(Record::InFlight {
                    lease_remaining, ..
                })) if lease_remaining.is_zero() => FlightState::Vacant,
                Ok(Some(Record::InFlight {
                    lease_remaining, ..
                })) => FlightState::Pending { lease_remaining },
            };
            let FlightState::Pending { lease_remaining } = state else {
                tx.send_replace(state);
                return;
            };
            // Still pending: the fresher lease is stored without waking
            // anyone (a waiter reads it only when its wait times out).
            // Waking every waiter of the key on every poll, to find the
            // key still pending, cost one task wake-up per waiter per
            // poll: 500 waiters, 500 wake-ups, at 5, 15, 35 ms… while the
            // requests of the burst are still being read.
            tx.send_if_modified(|current| {
                *current = state;
                false
            });
            // Poll again soon, and no later than the lease's end; stop
            // as soon as the last waiter is gone.
            let sleep = pause.min(lease_remaining + Duration::from_millis(1));
            pause = (pause * 2).min(self.inner.config.poll_interval);
            tokio::select! {
                () = tx.closed() => {}
                () = tokio::time::sleep(sleep) => {}
                () = async {
                    match sub.as_mut() {
                        Some(s) => s.changed().await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
    }
}
