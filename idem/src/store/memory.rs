//! The in-process store: the embedded default (SPEC §7).
//!
//! State lives in shards, each a `std::sync::Mutex` around a map, held only
//! for the few instructions of one operation and never across an `.await`,
//! so each operation is atomic and no request waits on a global lock.
//!
//! Bounded by entries and bytes: when full it evicts the oldest `Completed`
//! record first and never an `InFlight` one; if only in-flight records are
//! left, `reserve` fails with [`StoreError::Capacity`]. Expired records are
//! ignored on read and swept by a background task once a second.
//!
//! Everything is lost when the process exits.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::{Fence, Lease, Notifier, Reservation, Store, StoreError, Subscription};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::record::{CompletedRecord, Record, Token};

/// Bounds of a [`MemoryStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLimits {
    /// Most records kept (in flight and completed).
    pub max_entries: usize,
    /// Most bytes of keys and stored responses kept (approximate).
    pub max_bytes: u64,
}

impl Default for MemoryLimits {
    fn default() -> Self {
        Self {
            max_entries: 1_000_000,
            max_bytes: 512 * 1024 * 1024,
        }
    }
}

/// The in-memory store. Cheap to clone; clones share state.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    shards: Box<[Mutex<Shard>]>,
    hasher: std::collections::hash_map::RandomState,
    notifier: Notifier,
    limits: MemoryLimits,
}

#[derive(Debug)]
struct Shard {
    map: HashMap<StoreKey, Entry>,
    /// When each entry stops counting: (deadline, seq, key). The seq makes
    /// the tuple unique, so keys are never compared.
    expirations: BTreeSet<(Instant, u64, StoreKey)>,
    /// Completed records by completion order, oldest first: eviction order.
    completed: BTreeMap<u64, StoreKey>,
    next_seq: u64,
    bytes: u64,
    max_entries: usize,
    max_bytes: u64,
}

#[derive(Debug)]
struct Entry {
    seq: u64,
    deadline: Instant,
    weight: u64,
    state: State,
}

#[derive(Debug)]
enum State {
    InFlight {
        token: Token,
        fingerprint: Fingerprint,
        started_at: SystemTime,
    },
    /// The token of the holder that completed it: a retried `complete`
    /// from that holder (its first answer lost in transit) is acknowledged.
    Completed(Arc<CompletedRecord>, Token),
}

impl MemoryStore {
    /// A store with the default limits (1 000 000 entries, 512 MiB).
    #[must_use]
    pub fn new() -> Self {
        Self::with_limits(MemoryLimits::default())
    }

    /// A store with the given limits. If called inside a Tokio runtime, it
    /// starts the sweep task (which stops once the store is dropped).
    #[must_use]
    pub fn with_limits(limits: MemoryLimits) -> Self {
        // Few shards for small stores, so the bounds stay exact-ish.
        let n = (limits.max_entries / 4096).clamp(1, 64).next_power_of_two();
        let shards = (0..n)
            .map(|_| {
                Mutex::new(Shard {
                    map: HashMap::new(),
                    expirations: BTreeSet::new(),
                    completed: BTreeMap::new(),
                    next_seq: 0,
                    bytes: 0,
                    max_entries: limits.max_entries.div_ceil(n).max(1),
                    max_bytes: limits.max_bytes.div_ceil(n as u64).max(1),
                })
            })
            .collect();
        let shared = Arc::new(Shared {
            shards,
            hasher: std::collections::hash_map::RandomState::new(),
            notifier: Notifier::new(),
            limits,
        });
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(sweep(Arc::downgrade(&shared)));
        }
        Self { shared }
    }

    /// The configured limits.
    #[must_use]
    pub fn limits(&self) -> MemoryLimits {
        self.shared.limits
    }

    /// Records currently held (including expired ones not yet swept).
    #[must_use]
    pub fn len(&self) -> usize {
        self.shared.shards.iter().map(|s| lock(s).map.len()).sum()
    }

    /// Whether the store holds no record.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Approximate bytes held.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.shared.shards.iter().map(|s| lock(s).bytes).sum()
    }

    fn shard(&self, key: &StoreKey) -> MutexGuard<'_, Shard> {
        // Truncating the hash to pick a shard is intended.
        let i = (self.shared.hasher.hash_one(key) as usize) & (self.shared.shards.len() - 1);
        lock(&self.shared.shards[i])
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // Every operation leaves the shard consistent before it can panic, so a
    // poisoned lock still guards valid state.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sweeps expired entries once a second until the store is dropped.
async fn sweep(shared: Weak<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let now = Instant::now();
        for shard in shared.shards.iter() {
            lock(shard).sweep(now);
        }
    }
}

impl Shard {
    fn key_weight(key: &StoreKey) -> u64 {
        (key.as_str().len() + 96) as u64
    }

    fn remove(&mut self, key: &StoreKey) -> Option<Entry> {
        let (key, entry) = self.map.remove_entry(key)?;
        self.expirations.remove(&(entry.deadline, entry.seq, key));
        self.completed.remove(&entry.seq);
        self.bytes = self.bytes.saturating_sub(entry.weight);
        Some(entry)
    }

    fn insert(&mut self, key: StoreKey, deadline: Instant, weight: u64, state: State) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.expirations.insert((deadline, seq, key.clone()));
        if matches!(state, State::Completed(..)) {
            self.completed.insert(seq, key.clone());
        }
        self.bytes += weight;
        self.map.insert(
            key,
            Entry {
                seq,
                deadline,
                weight,
                state,
            },
        );
    }

    fn set_deadline(&mut self, key: &StoreKey, deadline: Instant) {
        if let Some((k, e)) = self.map.get_key_value(key) {
            let old = (e.deadline, e.seq, k.clone());
            self.expirations.remove(&old);
            self.expirations.insert((deadline, old.1, old.2));
            if let Some(e) = self.map.get_mut(key) {
                e.deadline = deadline;
            }
        }
    }

    fn sweep(&mut self, now: Instant) {
        while self
            .expirations
            .first()
            .is_some_and(|(deadline, _, _)| *deadline <= now)
        {
            if let Some((_, _, key)) = self.expirations.pop_first() {
                if let Some(entry) = self.map.remove(&key) {
                    self.completed.remove(&entry.seq);
                    self.bytes = self.bytes.saturating_sub(entry.weight);
                }
            }
        }
    }

    /// Evicts the oldest completed records until `weight` more bytes and one
    /// more entry fit. Fails if only in-flight records are left.
    fn make_room(&mut self, weight: u64) -> Result<(), StoreError> {
        self.make_room_while(weight, 1)
    }

    /// Like `make_room`, for an entry that is already counted.
    fn make_room_for_bytes(&mut self, weight: u64) -> Result<(), StoreError> {
        self.make_room_while(weight, 0)
    }

    fn make_room_while(&mut self, weight: u64, entries: usize) -> Result<(), StoreError> {
        if self.map.len() + entries <= self.max_entries && self.bytes + weight <= self.max_bytes {
            return Ok(());
        }
        self.sweep(Instant::now());
        while self.map.len() + entries > self.max_entries || self.bytes + weight > self.max_bytes {
            let Some((_, key)) = self.completed.pop_first() else {
                return Err(StoreError::Capacity(
                    "every slot holds an in-flight reservation",
                ));
            };
            self.remove(&key);
        }
        Ok(())
    }

    /// The live entry under `key`, dropping it first if it has expired.
    fn live(&mut self, key: &StoreKey, now: Instant) -> Option<&mut Entry> {
        if self.map.get(key).is_some_and(|e| e.deadline <= now) {
            // An expired completed record is gone; an expired lease is free
            // to take over. Either way it reads as "no record".
            self.remove(key);
        }
        self.map.get_mut(key)
    }

    /// The caller's in-flight entry, if it still carries `token`.
    fn held(&mut self, key: &StoreKey, token: Token) -> Option<&mut Entry> {
        self.map
            .get_mut(key)
            .filter(|e| matches!(e.state, State::InFlight { token: t, .. } if t == token))
    }
}

impl Store for MemoryStore {
    async fn reserve(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Reservation, StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(key);
        if let Some(entry) = shard.live(key, now) {
            return Ok(match &entry.state {
                State::InFlight { fingerprint: f, .. } if *f != fingerprint => {
                    Reservation::Mismatch
                }
                State::InFlight { .. } => Reservation::InFlight {
                    lease_remaining: entry.deadline - now,
                },
                State::Completed(r, _) if r.fingerprint != fingerprint => Reservation::Mismatch,
                State::Completed(r, _) => Reservation::Completed(Arc::clone(r)),
            });
        }
        let weight = Shard::key_weight(key);
        shard.make_room(weight)?;
        let token = Token::generate();
        shard.insert(
            key.clone(),
            now + lease,
            weight,
            State::InFlight {
                token,
                fingerprint,
                started_at: SystemTime::now(),
            },
        );
        Ok(Reservation::Acquired(Lease {
            token,
            duration: lease,
        }))
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: Token,
        record: Arc<CompletedRecord>,
        retention: Duration,
    ) -> Result<Fence, StoreError> {
        let weight = Shard::key_weight(key) + record.response.weight() as u64;
        {
            let mut shard = self.shard(key);
            let Some(held) = shard.held(key, token) else {
                let already = shard
                    .map
                    .get(key)
                    .is_some_and(|e| matches!(e.state, State::Completed(_, t) if t == token));
                return Ok(if already { Fence::Held } else { Fence::Lost });
            };
            let (old_weight, old_deadline, old_seq) = (held.weight, held.deadline, held.seq);
            // Room for the response, evicting older completed records; on
            // failure the reservation stays until its lease runs out, so no
            // duplicate can execute meanwhile.
            shard.bytes -= old_weight.min(shard.bytes);
            let room = shard.make_room_for_bytes(weight);
            if let Err(e) = room {
                shard.bytes += old_weight;
                return Err(e);
            }
            let seq = shard.next_seq;
            shard.next_seq += 1;
            let deadline = Instant::now() + retention;
            shard
                .expirations
                .remove(&(old_deadline, old_seq, key.clone()));
            shard.expirations.insert((deadline, seq, key.clone()));
            shard.completed.insert(seq, key.clone());
            shard.bytes += weight;
            if let Some(e) = shard.map.get_mut(key) {
                *e = Entry {
                    seq,
                    deadline,
                    weight,
                    state: State::Completed(record, token),
                };
            }
        }
        self.shared.notifier.notify(key);
        Ok(Fence::Held)
    }

    async fn release(&self, key: &StoreKey, token: Token) -> Result<Fence, StoreError> {
        {
            let mut shard = self.shard(key);
            if shard.held(key, token).is_none() {
                return Ok(Fence::Lost);
            }
            shard.remove(key);
        }
        self.shared.notifier.notify(key);
        Ok(Fence::Held)
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        let mut shard = self.shard(key);
        if shard.held(key, token).is_none() {
            return Ok(Fence::Lost);
        }
        shard.set_deadline(key, Instant::now() + lease);
        Ok(Fence::Held)
    }

    async fn get(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(key);
        Ok(shard.live(key, now).map(|e| match &e.state {
            State::InFlight {
                fingerprint,
                started_at,
                ..
            } => Record::InFlight {
                fingerprint: *fingerprint,
                lease_remaining: e.deadline - now,
                started_at: *started_at,
            },
            State::Completed(r, _) => Record::Completed(Arc::clone(r)),
        }))
    }

    async fn purge(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let removed = self.shard(key).remove(key).is_some();
        if removed {
            self.shared.notifier.notify(key);
        }
        Ok(removed)
    }

    async fn subscribe(&self, key: &StoreKey) -> Result<Subscription, StoreError> {
        Ok(self.shared.notifier.subscribe(key))
    }
}
