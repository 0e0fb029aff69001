//! Single-flight waiting (SPEC §5 `wait`): every waiter of a key in this
//! process shares ONE watcher, which subscribes to the key's changes and
//! polls the store (with backoff, and never later than the holder's lease
//! end) until the holder completes, releases or dies.
//!
//! A std `Mutex` guards the map of watchers; it is never held across an
//! `.await`.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use super::Engine;
use crate::key::StoreKey;
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

/// The live watchers of this process, one per waited-on key, in shards so
/// that waiters of different keys rarely share a lock.
#[derive(Default)]
pub(super) struct Flights {
    shards: [Mutex<HashMap<StoreKey, watch::Receiver<FlightState>>>; FLIGHT_SHARDS],
    hasher: std::collections::hash_map::RandomState,
}

impl Flights {
    fn shard(&self, key: &StoreKey) -> &Mutex<HashMap<StoreKey, watch::Receiver<FlightState>>> {
        // Truncating the hash to pick a shard is intended.
        &self.shards[(self.hasher.hash_one(key) % FLIGHT_SHARDS as u64) as usize]
    }
}

impl<S: Store> Engine<S> {
    /// Joins the watcher of `key`, starting one if there is none: all
    /// waiters of a key in this process share ONE subscription and poll loop.
    pub(super) fn join_flight(&self, key: &StoreKey) -> watch::Receiver<FlightState> {
        let shard = self.inner.flights.shard(key);
        let mut map = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(rx) = map.get(key) {
            // Join only a live watcher that has no verdict yet; one that is
            // finishing would hand back a stale verdict.
            if rx.has_changed().is_ok() && matches!(*rx.borrow(), FlightState::Pending { .. }) {
                return rx.clone();
            }
        }
        let (tx, rx) = watch::channel(FlightState::Pending {
            lease_remaining: Duration::ZERO,
        });
        map.insert(key.clone(), rx.clone());
        drop(map);
        let engine = self.clone();
        let key = key.clone();
        tokio::spawn(async move {
            engine.watch_flight(&key, &tx).await;
            let shard = engine.inner.flights.shard(&key);
            let mut map = shard.lock().unwrap_or_else(PoisonError::into_inner);
            // Remove our entry only: a newer watcher may have replaced it.
            if map
                .get(&key)
                .is_some_and(|rx| rx.same_channel(&tx.subscribe()))
            {
                map.remove(&key);
            }
        });
        rx
    }

    async fn watch_flight(&self, key: &StoreKey, tx: &watch::Sender<FlightState>) {
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
            tx.send_replace(state);
            // Poll again soon, and no later than the lease's end.
            let sleep = pause.min(lease_remaining + Duration::from_millis(1));
            pause = (pause * 2).min(self.inner.config.poll_interval);
            tokio::select! {
                () = tx.closed() => return,
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
