//! The memory store's job traces (protocol §13, `store/job.rs`): a map of
//! its own beside the record shards, behind one `std::sync::Mutex` held for
//! the few instructions of one step (never across an `.await`), so each
//! step is atomic. Only job runs write here, never the HTTP path.
//!
//! Bounded by the store's `max_entries` traces and a quarter of its
//! `max_bytes` (keys and failure texts), apart from the records' own
//! bounds: when full, the trace that expires soonest goes first (expired
//! ones are the soonest of all). A lost trace only makes a job's next run
//! count from 1 again; the record, which is what guarantees one execution,
//! is never touched. Lost on restart, like the records.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::key::StoreKey;
use crate::store::{Attempts, Fence};

#[derive(Debug)]
pub(super) struct Traces {
    state: Mutex<State>,
    max_entries: usize,
    max_bytes: u64,
}

#[derive(Debug, Default)]
struct State {
    map: HashMap<StoreKey, Trace>,
    /// (expiry, seq, key), soonest first; the seq makes entries unique.
    expirations: BTreeSet<(Instant, u64, StoreKey)>,
    next_seq: u64,
    /// Bytes held, by [`weight`].
    bytes: u64,
}

#[derive(Debug)]
struct Trace {
    attempts: Attempts,
    expires: Instant,
    seq: u64,
}

impl Traces {
    pub(super) fn new(max_entries: usize, max_bytes: u64) -> Self {
        Self {
            state: Mutex::new(State::default()),
            max_entries: max_entries.max(1),
            max_bytes,
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
                t.attempts.last_error.clone(),
            ),
            None => (1, None),
        };
        let attempts = Attempts {
            count,
            running: true,
            last_error,
        };
        s.put(key, attempts, now + keep, self);
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
        s.put(key, attempts, now + keep, self);
        Fence::Held
    }

    pub(super) fn get(&self, key: &StoreKey) -> Option<Attempts> {
        let now = Instant::now();
        self.lock().live(key, now).map(|t| t.attempts.clone())
    }

    /// Deletes `key`'s trace; whether a live one was there.
    pub(super) fn forget(&self, key: &StoreKey) -> bool {
        let now = Instant::now();
        self.lock().remove(key).is_some_and(|t| t.expires > now)
    }
}

impl State {
    /// The trace of `key` unless it has expired (an expired one is removed).
    fn live(&mut self, key: &StoreKey, now: Instant) -> Option<&mut Trace> {
        if self.map.get(key).is_some_and(|t| t.expires <= now) {
            self.remove(key);
        }
        self.map.get_mut(key)
    }

    fn remove(&mut self, key: &StoreKey) -> Option<Trace> {
        let t = self.map.remove(key)?;
        self.expirations.remove(&(t.expires, t.seq, key.clone()));
        self.bytes = self.bytes.saturating_sub(weight(key, &t.attempts));
        Some(t)
    }

    fn put(&mut self, key: &StoreKey, attempts: Attempts, expires: Instant, bounds: &Traces) {
        self.remove(key);
        let w = weight(key, &attempts);
        // Room: the soonest to expire goes first.
        while self.map.len() >= bounds.max_entries || self.bytes + w > bounds.max_bytes {
            let Some((_, _, victim)) = self.expirations.first().cloned() else {
                break;
            };
            self.remove(&victim);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += w;
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

/// Approximate bytes a trace holds.
fn weight(key: &StoreKey, attempts: &Attempts) -> u64 {
    let text = attempts.last_error.as_ref().map_or(0, String::len);
    u64::try_from(64 + key.as_str().len() + text).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Scope;

    #[tokio::test(start_paused = true)]
    async fn bounded_by_entries_and_bytes_soonest_expiry_first() {
        let k = |i: u32| StoreKey::new(&Scope::named("t"), &format!("job-{i}"));
        let traces = Traces::new(3, 1 << 20);
        for i in 0..4 {
            traces.begin(&k(i), Duration::from_secs(10 + u64::from(i)));
        }
        assert!(traces.get(&k(0)).is_none(), "the soonest to expire went");
        assert!((1..4).all(|i| traces.get(&k(i)).is_some()));

        let traces = Traces::new(100, 2_000);
        let long = "e".repeat(900);
        for i in 0..4 {
            let n = traces.begin(&k(i), Duration::from_secs(10 + u64::from(i)));
            traces.end(
                &k(i),
                n,
                Some(&long),
                Duration::from_secs(10 + u64::from(i)),
            );
        }
        assert!(traces.lock().bytes <= 2_000);
        assert!(traces.get(&k(3)).is_some() && traces.get(&k(0)).is_none());

        // Expiry: gone after `keep`, and the count starts again.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(traces.get(&k(3)).is_none());
        assert_eq!(traces.begin(&k(3), Duration::from_secs(1)), 1);
    }
}
