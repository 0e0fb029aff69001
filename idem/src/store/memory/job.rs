//! The memory store's job traces (protocol §13, `store/job.rs`): a map of
//! its own beside the record shards, behind one `std::sync::Mutex` held for
//! the few instructions of one step (never across an `.await`), so each
//! step is atomic. Only job runs write here, never the HTTP path.
//!
//! Bounded by the store's `max_entries`: when full, expired traces go
//! first, then the one that expires soonest (a lost trace only makes a
//! job's next run count from 1 again; the record, which is what guarantees
//! one execution, is never touched). Lost on restart, like the records.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::key::StoreKey;
use crate::store::{Attempts, Fence};

#[derive(Debug)]
pub(super) struct Traces {
    state: Mutex<State>,
    max: usize,
}

#[derive(Debug, Default)]
struct State {
    map: HashMap<StoreKey, Trace>,
    /// (expiry, seq, key), soonest first; the seq ties an entry to one
    /// version of the trace, so a stale entry never removes a newer one.
    expirations: BTreeSet<(Instant, u64, StoreKey)>,
    next_seq: u64,
}

#[derive(Debug)]
struct Trace {
    attempts: Attempts,
    expires: Instant,
    seq: u64,
}

impl Traces {
    pub(super) fn new(max: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            max: max.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every step leaves the map consistent before it could panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn begin(&self, key: &StoreKey, keep: Duration) -> u32 {
        let now = Instant::now();
        let mut s = self.lock();
        let (count, last_error) = match s.live(key, now) {
            Some(t) => (
                t.attempts.count.saturating_add(1),
                t.attempts.last_error.take(),
            ),
            None => (1, None),
        };
        s.put(
            key,
            Attempts {
                count,
                running: true,
                last_error,
            },
            now + keep,
            self.max,
        );
        count
    }

    pub(super) fn end(
        &self,
        key: &StoreKey,
        attempt: u32,
        error: Option<&str>,
        keep: Duration,
    ) -> Fence {
        let now = Instant::now();
        let mut s = self.lock();
        if s.live(key, now).is_none_or(|t| t.attempts.count != attempt) {
            return Fence::Lost;
        }
        let attempts = Attempts {
            count: attempt,
            running: false,
            last_error: error.map(str::to_owned),
        };
        s.put(key, attempts, now + keep, self.max);
        Fence::Held
    }

    pub(super) fn get(&self, key: &StoreKey) -> Option<Attempts> {
        let now = Instant::now();
        self.lock().live(key, now).map(|t| t.attempts.clone())
    }

    /// Deletes `key`'s trace; whether a live one was there.
    pub(super) fn forget(&self, key: &StoreKey) -> bool {
        let now = Instant::now();
        let mut s = self.lock();
        let Some(t) = s.map.remove(key) else {
            return false;
        };
        s.expirations.remove(&(t.expires, t.seq, key.clone()));
        t.expires > now
    }
}

impl State {
    /// The trace of `key` unless it has expired (an expired one is removed).
    fn live(&mut self, key: &StoreKey, now: Instant) -> Option<&mut Trace> {
        if self.map.get(key).is_some_and(|t| t.expires <= now) {
            if let Some(t) = self.map.remove(key) {
                self.expirations.remove(&(t.expires, t.seq, key.clone()));
            }
        }
        self.map.get_mut(key)
    }

    fn put(&mut self, key: &StoreKey, attempts: Attempts, expires: Instant, max: usize) {
        if let Some(old) = self.map.remove(key) {
            self.expirations
                .remove(&(old.expires, old.seq, key.clone()));
        }
        // Room: the soonest to expire goes first (expired ones are the
        // soonest of all).
        while self.map.len() >= max {
            let Some((_, seq, victim)) = self.expirations.pop_first() else {
                break;
            };
            if self.map.get(&victim).is_some_and(|t| t.seq == seq) {
                self.map.remove(&victim);
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.expirations.insert((expires, seq, key.clone()));
        self.map.insert(
            key.clone(),
            Trace {
                attempts,
                expires,
                seq,
            },
        );
    }
}
