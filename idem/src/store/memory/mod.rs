//! The in-process store: the embedded default (protocol §7).
//!
//! State lives in shards, each a `std::sync::Mutex` around a map, held only
//! for the few instructions of one operation and never across an `.await`,
//! so each operation is atomic and no request waits on a global lock.
//!
//! Bounded by entries and bytes, for the store as a whole: a record's
//! weight is charged against the bounds *before* it is added, and when they
//! are reached the store evicts the oldest `Completed` record (of one shard
//! at a time, shards taking turns), never an `InFlight` one. If only
//! in-flight records are left, `reserve` fails with
//! [`StoreError::Capacity`]; a response larger than the whole byte bound is
//! refused up front by `complete`, evicting nobody. Expired records are
//! ignored on read and swept by a background task once a second. Every
//! index entry names the version (sequence number) of the record it was
//! made for, so a stale index entry can never delete a newer record.
//!
//! Async mode's queue (`queue.rs`, protocol §9.7) lives in the same shards:
//! an operation is the record of its key, indexed by when it is next due
//! instead of when it expires, and its request counts against the byte
//! bound from enqueue until it completes. Operations are never evicted nor
//! expired while pending or running.
//!
//! Everything is lost when the process exits, operations included.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use indexmap::map::raw_entry_v1::{RawEntryApiV1, RawEntryMut};
use indexmap::map::MutableKeys;
use indexmap::{Equivalent, IndexMap};
use tokio::time::Instant;

use super::{Attempts, Fence, Lease, Notifier, Reservation, Store, StoreError, Subscription};
use crate::fingerprint::Fingerprint;
use crate::key::{CarriedHash, StoreKey};
use crate::record::{CompletedRecord, Record, Token};

use job::Traces;
use packed::Packed;
use queue::{Op, Operations};

mod job;
mod packed;
mod queue;
mod version;

/// Bounds of a [`MemoryStore`], for the whole store (not per shard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLimits {
    /// Most records kept (in flight and completed).
    pub max_entries: usize,
    /// Most bytes of keys, stored responses and pending operations'
    /// requests kept (approximate per record, exact in sum). A single
    /// record larger than this is refused.
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
    notifier: Notifier,
    limits: MemoryLimits,
    usage: Usage,
    /// The shard the next eviction pass starts at, so shards take turns.
    evict_cursor: AtomicUsize,
    /// Async mode's books: the id index and the count of live operations.
    operations: Operations,
    /// Job traces (`job.rs`, protocol §13), beside the records.
    jobs: Traces,
    /// The stale-event guard's entities (`version.rs`).
    versions: version::Versions,
}

/// What the whole store holds, charged *before* a record is added, so the
/// bounds hold for the store as a whole however the keys spread over shards.
#[derive(Debug)]
struct Usage {
    bytes: AtomicU64,
    entries: AtomicUsize,
    max_bytes: u64,
    max_entries: usize,
}

impl Usage {
    /// Takes `bytes` and `entries` if both fit under the bounds; else takes
    /// nothing.
    fn try_charge(&self, bytes: u64, entries: usize) -> bool {
        let max_bytes = self.max_bytes;
        if self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                b.checked_add(bytes).filter(|n| *n <= max_bytes)
            })
            .is_err()
        {
            return false;
        }
        let max_entries = self.max_entries;
        if entries > 0
            && self
                .entries
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |e| {
                    e.checked_add(entries).filter(|n| *n <= max_entries)
                })
                .is_err()
        {
            self.bytes.fetch_sub(bytes, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn refund(&self, bytes: u64, entries: usize) {
        if bytes > 0 {
            self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        }
        if entries > 0 {
            self.entries.fetch_sub(entries, Ordering::AcqRel);
        }
    }
}

#[derive(Debug, Default)]
struct Shard {
    /// The records. An `IndexMap` rather than a `HashMap`: its buckets
    /// hold an index (8 bytes) and the entries sit in one dense vector, so
    /// a table between growths (half to seven eighths full) does not cost
    /// a whole entry per empty bucket. Order is not used; removal swaps.
    map: IndexMap<ShardKey, Entry, CarriedHash>,
    /// When each entry stops counting: (deadline, seq, key). The seq makes
    /// the tuple unique, so keys are never compared, and ties an index
    /// entry to one version of the record: an index entry whose seq no
    /// longer matches the map's is stale and never deletes anything.
    ///
    /// Only for in-flight records and completed records *out of order*: a
    /// record that completes with a deadline no earlier than that of every
    /// completed record before it (`in_order_until`; the common case, one
    /// retention for all) expires from the front of `completed` instead,
    /// in completion order, which is then deadline order (`sweep`).
    expirations: BTreeSet<(Instant, u64, ShardKey)>,
    /// The latest deadline of a completed record left out of
    /// `expirations`. Completed records before any such record in
    /// `completed` expire no later than it; those after it expire no
    /// earlier, or are in `expirations`.
    in_order_until: Option<Instant>,
    /// Completed records by completion order, oldest first: eviction
    /// order, as (seq, index in `map`). Seqs are taken under the shard's
    /// lock, so pushing at the back keeps it sorted, and a record's entry
    /// is found by its seq (binary search) to follow it when removing
    /// another moves it in `map` (`remove_index`). No key: 16 bytes, and
    /// no hashing to find the record. A record that goes another way
    /// (expired, purged) leaves its entry behind, stale (the seq no longer
    /// matches the map's): eviction skips it, the sweep drops stale entries
    /// from the front, and the queue is compacted whenever stale entries
    /// outnumber live ones (`compact_completed`).
    completed: VecDeque<(u64, usize)>,
    /// How many completed records the map holds.
    completed_live: usize,
    /// Pending and running operations by when they are next claimable:
    /// (due, or lease end, seq, key). Operations are here *instead of* in
    /// `expirations`: they never expire.
    due: BTreeSet<(Instant, u64, ShardKey)>,
    /// Pending and running operations by seq, which an operation keeps from
    /// enqueue until it is done: oldest accepted first.
    operations: BTreeMap<u64, ShardKey>,
    next_seq: u64,
    /// What the entries' deadlines count from.
    epoch: Epoch,
}

/// A store key as a shard keeps it, in its map and its indexes: 16
/// bytes, where a [`StoreKey`] is 24 with its hash. For a record not
/// completed, a buffer of the key's text (and its length, at the end:
/// [`packed::put_key`]); for a completed record, the record's own packed
/// buffer, which ends with the same ([`Packed::buffer`]): the record and
/// its key are one allocation.
///
/// A lookup that starts from a shard key (expiry of records out of order,
/// the queue) hashes the text again, to the same hash as the
/// [`StoreKey`]'s; lookups by a [`StoreKey`] use its hash as it is.
/// Compared and ordered by the text alone, as store keys are.
#[derive(Debug, Clone)]
struct ShardKey(Arc<[u8]>);

impl ShardKey {
    fn new(key: &StoreKey) -> Self {
        Self(packed::key_buffer(key.as_str().as_bytes()))
    }

    /// The key of `record`, sharing its buffer.
    fn of(record: &Packed) -> Self {
        Self(Arc::clone(record.buffer()))
    }

    fn text(&self) -> packed::KeyText<'_> {
        packed::key_text(&self.0)
    }

    fn store_key(&self) -> StoreKey {
        StoreKey::from_text_of(&String::from_utf8_lossy(&self.text().text()))
    }
}

impl PartialEq for ShardKey {
    fn eq(&self, other: &Self) -> bool {
        self.text().same(other.text())
    }
}

impl Eq for ShardKey {}

impl PartialOrd for ShardKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ShardKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.text().order(other.text())
    }
}

impl Hash for ShardKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As `StoreKey` hashes: its text's hash, as one `u64`.
        state.write_u64(StoreKey::hash_of(&self.text().text()));
    }
}

impl Equivalent<ShardKey> for StoreKey {
    fn equivalent(&self, key: &ShardKey) -> bool {
        key.text().is(self.as_str().as_bytes())
    }
}

/// The instant a shard's deadlines count from, in nanoseconds: an entry
/// keeps its deadline in 8 bytes rather than an `Instant`'s 16. Deadlines
/// are clamped ([`Epoch::clamp`]) to what 8 bytes hold (from the store's
/// creation to 584 years after it) before they are used anywhere, so the
/// index entries, which keep `Instant`s, always agree with the entry's.
#[derive(Debug, Clone, Copy)]
struct Epoch(Instant);

impl Default for Epoch {
    fn default() -> Self {
        Self(Instant::now())
    }
}

impl Epoch {
    /// `t` in nanoseconds since the epoch, saturating at both ends.
    fn ticks(self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.0).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The instant `ticks` after the epoch.
    fn at(self, ticks: u64) -> Instant {
        self.0 + Duration::from_nanos(ticks)
    }

    /// `t` within what [`ticks`](Self::ticks) holds exactly.
    fn clamp(self, t: Instant) -> Instant {
        self.at(self.ticks(t))
    }
}

/// A record: 32 bytes in the map, its key beside it. Its weight (what it
/// is charged against the byte bound) is not kept but worked out from its
/// state and key when it is needed ([`Entry::weight`]), always the same.
#[derive(Debug)]
struct Entry {
    seq: u64,
    /// When the record expires; for an operation, when it is next
    /// claimable (its due time, or the end of its dispatcher's lease). In
    /// the shard's [`Epoch`] ticks.
    deadline: u64,
    state: State,
}

impl Entry {
    /// Whether the record reads as gone (or, for a lease, free to take),
    /// `now` in ticks. An operation never expires: its deadline only makes
    /// it claimable.
    fn expired(&self, now: u64) -> bool {
        self.deadline <= now && !self.is_operation()
    }

    /// What the record is charged against the byte bound, `key` being its
    /// key: what `reserve`, `enqueue` and `complete` charged for it.
    fn weight(&self, key_len: usize) -> u64 {
        key_weight(key_len)
            + match self.state.view() {
                View::InFlight(_) => 0,
                View::Operation(op) => op.weight(),
                View::Completed(packed) => record_weight(packed),
            }
    }

    fn is_operation(&self) -> bool {
        matches!(self.state.view(), View::Operation(_))
    }
}

/// Two variants, so the packed buffer's non-null pointer tells them apart
/// and a state is 32 bytes (three would take a tag: 40). Read it through
/// [`State::view`].
#[derive(Debug)]
enum State {
    /// In flight or an operation. Boxed: such records are few at any time,
    /// completed ones many, and every entry is as large as the largest
    /// state.
    Open(Box<Open>),
    /// The record packed in one buffer (`packed.rs`), with the token of
    /// the holder that completed it: a retried `complete` from that holder
    /// (its first answer lost in transit) is acknowledged; and the id of
    /// the operation it finished, if it was one, which stays resolvable for
    /// as long as the record lives.
    Completed(Packed),
}

/// A record not completed yet.
#[derive(Debug)]
enum Open {
    InFlight(Held),
    /// An async operation, pending or running (`queue.rs`).
    Operation(Op),
}

/// A [`State`] as seen through a reference, one variant per kind of record.
#[derive(Debug, Clone, Copy)]
enum View<'a> {
    InFlight(&'a Held),
    Operation(&'a Op),
    Completed(&'a Packed),
}

impl State {
    fn in_flight(held: Held) -> Self {
        Self::Open(Box::new(Open::InFlight(held)))
    }

    fn operation(op: Op) -> Self {
        Self::Open(Box::new(Open::Operation(op)))
    }

    fn view(&self) -> View<'_> {
        match self {
            Self::Open(open) => match &**open {
                Open::InFlight(held) => View::InFlight(held),
                Open::Operation(op) => View::Operation(op),
            },
            Self::Completed(packed) => View::Completed(packed),
        }
    }

    /// The operation, if the record is one (pending or running).
    fn operation_mut(&mut self) -> Option<&mut Op> {
        match self {
            Self::Open(open) => match &mut **open {
                Open::Operation(op) => Some(op),
                Open::InFlight(_) => None,
            },
            Self::Completed(_) => None,
        }
    }
}

/// A reservation's holder.
#[derive(Debug)]
struct Held {
    token: Token,
    fingerprint: Fingerprint,
    started_at: SystemTime,
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
        // Shards only spread lock contention; the bounds are store-wide.
        let n = (limits.max_entries / 4096).clamp(1, 64).next_power_of_two();
        let shards = (0..n).map(|_| Mutex::new(Shard::default())).collect();
        let shared = Arc::new(Shared {
            shards,
            notifier: Notifier::new(),
            limits,
            usage: Usage {
                bytes: AtomicU64::new(0),
                entries: AtomicUsize::new(0),
                max_bytes: limits.max_bytes,
                max_entries: limits.max_entries,
            },
            evict_cursor: AtomicUsize::new(0),
            operations: Operations::new(n),
            jobs: Traces::new(limits.max_entries, limits.max_bytes / 4),
            versions: version::Versions::default(),
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
        self.shared.usage.bytes.load(Ordering::Acquire)
    }

    fn shard(&self, key: &StoreKey) -> MutexGuard<'_, Shard> {
        lock(&self.shared.shards[self.shard_index(key)])
    }

    fn shard_index(&self, key: &StoreKey) -> usize {
        key.shard(self.shared.shards.len())
    }

    /// Charges `bytes` and `entries` against the store-wide bounds,
    /// evicting the oldest completed records, one shard at a time, until
    /// they fit. Never evicts an in-flight record. Must be called with no
    /// shard lock held (it takes them one by one).
    fn make_room(&self, bytes: u64, entries: usize) -> Result<(), StoreError> {
        let usage = &self.shared.usage;
        while !usage.try_charge(bytes, entries) {
            if !self.evict_one() {
                return Err(StoreError::Capacity(
                    "every slot holds an in-flight reservation",
                ));
            }
        }
        Ok(())
    }

    /// Frees at least one record (expired first, then the oldest completed
    /// record of the next shard that has one). False if nothing can go.
    fn evict_one(&self) -> bool {
        let shards = &self.shared.shards;
        let start = self.shared.evict_cursor.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        (0..shards.len()).any(|i| {
            let mut shard = lock(&shards[(start + i) & (shards.len() - 1)]);
            shard.sweep(now, &self.shared) > 0 || shard.evict_oldest(&self.shared)
        })
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
            lock(shard).sweep(now, &shared);
        }
    }
}

fn key_weight(key_len: usize) -> u64 {
    (key_len + 96) as u64
}

/// What a completed record adds to its key's weight: its packed buffer and
/// the allocator's due on it. The id of the operation it finished, if it
/// was one, is not counted: it is packed in under the shard's lock, after
/// the weight was charged.
fn record_weight(record: &Packed) -> u64 {
    (record.record_len() + 16) as u64
}

impl Shard {
    /// The time index an entry belongs in: operations are claimable at
    /// their deadline, everything else expires at it.
    fn times(&mut self, operation: bool) -> &mut BTreeSet<(Instant, u64, ShardKey)> {
        if operation {
            &mut self.due
        } else {
            &mut self.expirations
        }
    }

    /// Removes the record under `key` with its index entries (its
    /// operation id included), and gives its weight back.
    fn remove<Q>(&mut self, key: &Q, shared: &Shared) -> Option<Entry>
    where
        Q: Hash + Equivalent<ShardKey> + ?Sized,
    {
        let index = self.map.get_index_of(key)?;
        self.remove_index(index, shared)
    }

    /// Removes the record at `index` of the map, as [`remove`](Self::remove).
    fn remove_index(&mut self, index: usize, shared: &Shared) -> Option<Entry> {
        let (key, entry) = self.map.swap_remove_index(index)?;
        // The last record took its place: its eviction entry follows it.
        if let Some((_, moved)) = self.map.get_index(index) {
            if matches!(moved.state, State::Completed(_)) {
                if let Ok(at) = self.completed.binary_search_by_key(&moved.seq, |(s, _)| *s) {
                    self.completed[at].1 = index;
                }
            }
        }
        let weight = entry.weight(key.text().len());
        let deadline = self.epoch.at(entry.deadline);
        match entry.state.view() {
            View::Operation(op) => {
                self.operations.remove(&entry.seq);
                shared.operations.forget(op.id, true);
            }
            View::Completed(packed) => {
                if let Some(id) = packed.operation() {
                    shared.operations.forget(id, false);
                }
                self.completed_live = self.completed_live.saturating_sub(1);
                self.compact_completed();
            }
            View::InFlight(_) => {}
        }
        self.times(entry.is_operation())
            .remove(&(deadline, entry.seq, key));
        shared.usage.refund(weight, 1);
        Some(entry)
    }

    /// Removes the record at `index` only if it is still the version an
    /// eviction entry named (`seq`): a stale entry deletes nothing.
    fn remove_at_version(&mut self, index: usize, seq: u64, shared: &Shared) -> bool {
        if self.is_version(index, seq) {
            self.remove_index(index, shared);
            true
        } else {
            false
        }
    }

    /// Whether the record at `index` is the version `seq`.
    fn is_version(&self, index: usize, seq: u64) -> bool {
        self.map.get_index(index).is_some_and(|(_, e)| e.seq == seq)
    }

    /// Removes the record under `key` only if it is still the version an
    /// index entry named (`seq`): a stale index entry deletes nothing.
    fn remove_version(&mut self, key: &ShardKey, seq: u64, shared: &Shared) -> bool {
        match self.map.get_full(key) {
            Some((index, _, e)) if e.seq == seq => {
                self.remove_index(index, shared);
                true
            }
            _ => false,
        }
    }

    /// Adds a record whose weight and entry the caller has already charged.
    fn insert(&mut self, store_key: &StoreKey, deadline: Instant, state: State) {
        let key = ShardKey::new(store_key);
        let deadline = self.epoch.clamp(deadline);
        let seq = self.next_seq;
        self.next_seq += 1;
        let completed = matches!(state, State::Completed(_));
        match state.view() {
            View::Completed(..) => {}
            View::Operation(_) => {
                self.due.insert((deadline, seq, key.clone()));
                self.operations.insert(seq, key.clone());
            }
            View::InFlight(_) => {
                self.expirations.insert((deadline, seq, key.clone()));
            }
        }
        let entry = Entry {
            seq,
            deadline: self.epoch.ticks(deadline),
            state,
        };
        // Hashed by the store key's own hash, not the text again.
        let hash = self.map.hasher().hash_one(store_key);
        let index = match self
            .map
            .raw_entry_mut_v1()
            .from_key_hashed_nocheck(hash, store_key)
        {
            RawEntryMut::Vacant(slot) => {
                slot.insert_hashed_nocheck(hash, key.clone(), entry);
                self.map.len() - 1
            }
            RawEntryMut::Occupied(mut slot) => {
                slot.insert(entry);
                slot.index()
            }
        };
        if completed {
            self.push_completed(seq, index, key, deadline);
        }
    }

    /// Moves the entry's deadline (and its index entry; the seq stays).
    fn set_deadline<Q>(&mut self, key: &Q, deadline: Instant)
    where
        Q: Hash + Equivalent<ShardKey> + ?Sized,
    {
        let epoch = self.epoch;
        let deadline = epoch.clamp(deadline);
        if let Some((k, e)) = self.map.get_key_value(key) {
            let old = (epoch.at(e.deadline), e.seq, k.clone());
            let times = self.times(e.is_operation());
            times.remove(&old);
            times.insert((deadline, old.1, old.2));
            if let Some(e) = self.map.get_mut(key) {
                e.deadline = epoch.ticks(deadline);
            }
        }
    }

    /// Books a record just completed (`seq` fresh) for eviction and for
    /// expiry: in `expirations` only if it expires before a completed
    /// record ahead of it.
    fn push_completed(&mut self, seq: u64, index: usize, key: ShardKey, deadline: Instant) {
        if self.completed_live == 0 {
            // No completed record ahead of it to be in order with.
            self.in_order_until = None;
        }
        if self.in_order_until.is_some_and(|last| deadline < last) {
            self.expirations.insert((deadline, seq, key));
        } else {
            self.in_order_until = Some(deadline);
        }
        self.completed.push_back((seq, index));
        self.completed_live += 1;
    }

    /// Drops every record whose deadline has passed; how many went.
    fn sweep(&mut self, now: Instant, shared: &Shared) -> usize {
        let mut freed = 0;
        let now_ticks = self.epoch.ticks(now);
        while self
            .expirations
            .first()
            .is_some_and(|(deadline, _, _)| *deadline <= now)
        {
            if let Some((_, seq, key)) = self.expirations.pop_first() {
                freed += usize::from(self.remove_version(&key, seq, shared));
            }
        }
        // Completed records in order expire from the front of `completed`.
        // The first live record not yet expired ends it: any record in
        // order after it expires no earlier than it does (if it is in
        // order itself), or than the record in order before it that it
        // came after (if it is not). Stale entries on the way are dropped.
        while let Some(&(seq, index)) = self.completed.front() {
            match self.map.get_index(index) {
                Some((_, e)) if e.seq == seq && e.deadline > now_ticks => break,
                Some((_, e)) if e.seq == seq => {
                    self.completed.pop_front();
                    freed += usize::from(self.remove_at_version(index, seq, shared));
                }
                _ => {
                    self.completed.pop_front();
                }
            }
        }
        freed
    }

    /// Drops the stale entries of `completed` once they outnumber the live
    /// ones (with some slack): amortized, a constant per removal.
    fn compact_completed(&mut self) {
        if self.completed.len() > 2 * self.completed_live + 64 {
            let map = &self.map;
            self.completed
                .retain(|&(seq, index)| map.get_index(index).is_some_and(|(_, e)| e.seq == seq));
        }
    }

    /// Evicts this shard's oldest completed record; false if it has none.
    fn evict_oldest(&mut self, shared: &Shared) -> bool {
        while let Some((seq, index)) = self.completed.pop_front() {
            if self.remove_at_version(index, seq, shared) {
                return true;
            }
        }
        false
    }

    /// The live entry under `key`, dropping it first if it has expired.
    fn live(&mut self, key: &StoreKey, now: Instant, shared: &Shared) -> Option<&mut Entry> {
        let now = self.epoch.ticks(now);
        if self.map.get(key).is_some_and(|e| e.expired(now)) {
            // An expired completed record is gone; an expired lease is free
            // to take over. Either way it reads as "no record".
            self.remove(key, shared);
        }
        self.map.get_mut(key)
    }

    /// The caller's in-flight entry (or running operation), if it still
    /// carries `token`.
    fn held(&mut self, key: &StoreKey, token: Token) -> Option<&mut Entry> {
        self.map.get_mut(key).filter(|e| match e.state.view() {
            View::InFlight(held) => held.token == token,
            View::Operation(op) => op.running == Some(token),
            View::Completed(..) => false,
        })
    }

    /// Turns the caller's held entry into `record` (packed with the
    /// caller's token; the caller has charged any extra weight already). A
    /// running operation leaves the queue; its id stays, now naming the
    /// record.
    fn complete_held(
        &mut self,
        key: &StoreKey,
        deadline: Instant,
        record: Packed,
        shared: &Shared,
    ) {
        let epoch = self.epoch;
        let deadline = epoch.clamp(deadline);
        let seq = self.next_seq;
        self.next_seq += 1;
        let Some((index, k, e)) = self.map.get_full_mut2(key) else {
            return;
        };
        let old = (epoch.at(e.deadline), e.seq, k.clone());
        let id = match e.state.view() {
            View::Operation(op) => Some(op.id),
            View::InFlight(_) | View::Completed(..) => None,
        };
        // Packed without an id (outside the lock); an operation's record
        // is packed again with it, which is rare (async mode) and small.
        let record = match id {
            Some(id) => record.with_operation(id),
            None => record,
        };
        // The record's buffer is its key from now on (the same text).
        *k = ShardKey::of(&record);
        let key = k.clone();
        *e = Entry {
            seq,
            deadline: epoch.ticks(deadline),
            state: State::Completed(record),
        };
        if id.is_some() {
            self.due.remove(&old);
            self.operations.remove(&old.1);
            shared.operations.finished();
        } else {
            self.expirations.remove(&old);
        }
        self.push_completed(seq, index, key, deadline);
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
        let usage = &self.shared.usage;
        let weight = key_weight(key.as_str().len());
        let mut charged = false;
        loop {
            let mut shard = self.shard(key);
            let epoch = shard.epoch;
            if let Some(entry) = shard.live(key, now, &self.shared) {
                let deadline = epoch.at(entry.deadline);
                let found = match entry.state.view() {
                    View::InFlight(held) if held.fingerprint != fingerprint => {
                        Reservation::Mismatch
                    }
                    View::InFlight(_) => Reservation::InFlight {
                        lease_remaining: deadline - now,
                    },
                    View::Operation(op) if op.fingerprint != fingerprint => Reservation::Mismatch,
                    View::Operation(_) => Reservation::InFlight {
                        lease_remaining: queue::remaining(deadline, now),
                    },
                    View::Completed(p) if p.fingerprint() != fingerprint => Reservation::Mismatch,
                    View::Completed(p) => Reservation::Completed(p.record()),
                };
                if charged {
                    usage.refund(weight, 1);
                }
                return Ok(found);
            }
            if !charged && !usage.try_charge(weight, 1) {
                // Full: make room with this shard unlocked (eviction takes
                // shard locks one by one), then look again: someone may
                // have reserved the key meanwhile.
                drop(shard);
                self.make_room(weight, 1)?;
                charged = true;
                continue;
            }
            let token = Token::generate();
            shard.insert(
                key,
                now + lease,
                State::in_flight(Held {
                    token,
                    fingerprint,
                    started_at: SystemTime::now(),
                }),
            );
            return Ok(Reservation::Acquired(Lease {
                token,
                duration: lease,
            }));
        }
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: Token,
        record: Arc<CompletedRecord>,
        retention: Duration,
    ) -> Result<Fence, StoreError> {
        let usage = &self.shared.usage;
        let record = Packed::new(&record, token, key.as_str());
        let weight = key_weight(key.as_str().len()) + record_weight(&record);
        if weight > self.shared.limits.max_bytes {
            // Refused up front: making room for it would evict everyone
            // and still not fit. The reservation stays as it is.
            return Err(StoreError::Capacity(
                "the response is larger than the memory store's byte bound",
            ));
        }
        // Extra bytes charged for this record beyond the entry's weight.
        let mut charged = 0;
        let mut record = Some(record);
        loop {
            let mut shard = self.shard(key);
            let Some(held) = shard.held(key, token) else {
                usage.refund(charged, 0);
                let already = shard.map.get(key).is_some_and(
                    |e| matches!(e.state.view(), View::Completed(p) if p.token() == token),
                );
                return Ok(if already { Fence::Held } else { Fence::Lost });
            };
            let held_weight = held.weight(key.as_str().len());
            let need = weight.saturating_sub(held_weight);
            if charged < need && !usage.try_charge(need - charged, 0) {
                // Room is made with the shard unlocked, so the holder's own
                // entry is never touched by it (eviction spares in-flight
                // records); the entry is checked again after.
                drop(shard);
                if let Err(e) = self.make_room(need - charged, 0) {
                    usage.refund(charged, 0);
                    return Err(e);
                }
                charged = need;
                continue;
            }
            let surplus = (charged.max(need) - need) + held_weight.saturating_sub(weight);
            usage.refund(surplus, 0);
            let Some(record) = record.take() else {
                return Ok(Fence::Lost);
            };
            shard.complete_held(key, Instant::now() + retention, record, &self.shared);
            break;
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
            shard.remove(key, &self.shared);
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
        let epoch = shard.epoch;
        Ok(shard
            .live(key, now, &self.shared)
            .map(|e| match e.state.view() {
                View::InFlight(held) => Record::InFlight {
                    fingerprint: held.fingerprint,
                    lease_remaining: epoch.at(e.deadline) - now,
                    started_at: held.started_at,
                },
                View::Operation(op) => Record::InFlight {
                    fingerprint: op.fingerprint,
                    lease_remaining: queue::remaining(epoch.at(e.deadline), now),
                    started_at: op.accepted_at,
                },
                View::Completed(p) => Record::Completed(p.record()),
            }))
    }

    async fn purge(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let removed = self.shard(key).remove(key, &self.shared).is_some();
        let traced = self.shared.jobs.forget(key);
        if removed {
            self.shared.notifier.notify(key);
        }
        Ok(removed || traced)
    }

    async fn subscribe(&self, key: &StoreKey) -> Result<Subscription, StoreError> {
        Ok(self.shared.notifier.subscribe(key))
    }

    async fn begin_attempt(&self, key: &StoreKey, keep: Duration) -> Result<u32, StoreError> {
        Ok(self.shared.jobs.begin(key, keep))
    }

    async fn end_attempt(
        &self,
        key: &StoreKey,
        attempt: u32,
        error: Option<&str>,
        keep: Duration,
    ) -> Result<Fence, StoreError> {
        Ok(self.shared.jobs.end(key, attempt, error, keep))
    }

    async fn attempts(&self, key: &StoreKey) -> Result<Option<Attempts>, StoreError> {
        Ok(self.shared.jobs.get(key))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::key::Scope;
    use crate::record::StoredResponse;

    const FP: Fingerprint = Fingerprint([1; 32]);

    /// One shard (fewer than 4096 entries), so its books can be read.
    fn store() -> MemoryStore {
        MemoryStore::with_limits(MemoryLimits {
            max_entries: 1000,
            max_bytes: 1 << 20,
        })
    }

    async fn store_one(s: &MemoryStore, i: usize, retention: Duration) -> StoreKey {
        let k = StoreKey::new(&Scope::global(), &format!("k{i}"));
        let Ok(Reservation::Acquired(lease)) = s.reserve(&k, FP, Duration::from_secs(30)).await
        else {
            panic!("a fresh key is acquired");
        };
        let now = SystemTime::now();
        let record = Arc::new(CompletedRecord {
            fingerprint: FP,
            response: StoredResponse {
                status: 201,
                headers: vec![("content-type".into(), Bytes::from_static(b"text/plain"))],
                body: Bytes::from(format!("body {i}")),
            },
            completed_at: now,
            expires_at: now + retention,
        });
        let fence = s
            .complete(&k, lease.token, Arc::clone(&record), retention)
            .await;
        assert!(matches!(fence, Ok(Fence::Held)));
        match s.get(&k).await {
            Ok(Some(Record::Completed(r))) => assert_eq!(*r, *record, "read back as stored"),
            other => panic!("completed record expected: {other:?}"),
        }
        k
    }

    /// Keys spread over the shards and, within one, over its map: the
    /// shard is picked from the carried hash's high half, the map places
    /// by its low bits, and both key types hash to the same.
    #[test]
    fn keys_spread_over_shards_and_hash_as_their_store_keys() {
        let s = MemoryStore::with_limits(MemoryLimits {
            max_entries: 64 * 4096,
            max_bytes: 1 << 30,
        });
        let shards = s.shared.shards.len();
        assert_eq!(shards, 64);
        let n = 64_000;
        let mut per_shard = vec![0usize; shards];
        let mut low_bits = std::collections::HashSet::new();
        for i in 0..n {
            let k = StoreKey::new(&Scope::global(), &format!("order-{i}"));
            per_shard[s.shard_index(&k)] += 1;
            if s.shard_index(&k) == 0 {
                low_bits.insert(k.carried_hash() & 0xfff);
            }
            assert_eq!(
                CarriedHash.hash_one(&k),
                CarriedHash.hash_one(ShardKey::new(&k)),
            );
        }
        let mean = n / shards;
        for count in per_shard {
            assert!(
                count > mean / 2 && count < mean * 3 / 2,
                "{count} of ~{mean}"
            );
        }
        // The ~1 000 keys of shard 0 take most of 4 096 low-bit positions
        // (all in one would take one).
        assert!(low_bits.len() > 800, "{} positions", low_bits.len());
    }

    #[tokio::test(start_paused = true)]
    async fn purged_records_leave_few_stale_eviction_entries() {
        let s = store();
        let mut keys = Vec::new();
        for i in 0..500 {
            keys.push(store_one(&s, i, Duration::from_secs(600)).await);
        }
        for k in &keys[..450] {
            assert!(s.purge(k).await.expect("purge"));
        }
        let shard = lock(&s.shared.shards[0]);
        assert_eq!(shard.completed_live, 50);
        assert!(
            shard.completed.len() <= 2 * 50 + 64,
            "stale entries are compacted away: {}",
            shard.completed.len()
        );
        assert!(
            shard
                .completed
                .iter()
                .filter(|&&(seq, i)| shard.is_version(i, seq))
                .count()
                == 50,
            "every live record keeps its entry"
        );
    }

    /// Purges move records in the map (the last one takes the place of
    /// the one removed): eviction entries follow them, and eviction still
    /// goes oldest first.
    #[tokio::test(start_paused = true)]
    async fn eviction_entries_follow_records_moved_by_removals() {
        let s = store();
        let mut keys = Vec::new();
        for i in 0..300 {
            keys.push(store_one(&s, i, Duration::from_secs(600)).await);
        }
        for (i, k) in keys.iter().enumerate() {
            if i % 3 == 1 || i % 7 == 0 {
                assert!(s.purge(k).await.expect("purge"));
            }
        }
        let mut shard = lock(&s.shared.shards[0]);
        let live: Vec<_> = shard
            .completed
            .iter()
            .filter(|&&(seq, i)| shard.is_version(i, seq))
            .map(|&(seq, _)| seq)
            .collect();
        assert_eq!(live.len(), shard.completed_live);
        assert_eq!(live.len(), shard.map.len(), "every record has its entry");
        let mut order = Vec::new();
        loop {
            let before: Vec<_> = shard.map.keys().cloned().collect();
            if !shard.evict_oldest(&s.shared) {
                break;
            }
            let gone: Vec<_> = before
                .into_iter()
                .filter(|k| shard.map.get(k).is_none())
                .collect();
            assert_eq!(gone.len(), 1);
            order.push(gone[0].clone());
        }
        let expected: Vec<_> = keys
            .iter()
            .enumerate()
            .filter(|(i, _)| !(i % 3 == 1 || i % 7 == 0))
            .map(|(_, k)| ShardKey::new(k))
            .collect();
        assert_eq!(order, expected, "oldest first");
        assert!(shard.map.is_empty());
        drop(shard);
        assert_eq!(s.bytes(), 0);
    }

    /// Records kept for less time than one before them expire on time
    /// (from `expirations`), and records in order from `completed`.
    #[tokio::test(start_paused = true)]
    async fn records_out_of_completion_order_expire_on_time() {
        let s = store();
        let long = store_one(&s, 0, Duration::from_secs(60)).await;
        for i in 1..=10 {
            store_one(&s, i, Duration::from_secs(1)).await;
        }
        let later = store_one(&s, 11, Duration::from_secs(90)).await;
        {
            let shard = lock(&s.shared.shards[0]);
            assert_eq!(
                shard.expirations.len(),
                10,
                "the short ones are out of order"
            );
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        {
            let mut shard = lock(&s.shared.shards[0]);
            shard.sweep(Instant::now(), &s.shared);
            assert_eq!(shard.map.len(), 2, "the short ones went, on time");
            assert!(shard.expirations.is_empty());
        }
        assert!(s.get(&long).await.expect("get").is_some());
        tokio::time::advance(Duration::from_secs(59)).await;
        {
            let mut shard = lock(&s.shared.shards[0]);
            shard.sweep(Instant::now(), &s.shared);
            assert_eq!(shard.map.len(), 1, "the first long one went");
            assert_eq!(shard.completed.len(), 1);
        }
        assert!(s.get(&later).await.expect("get").is_some());
        tokio::time::advance(Duration::from_secs(30)).await;
        let mut shard = lock(&s.shared.shards[0]);
        shard.sweep(Instant::now(), &s.shared);
        assert_eq!(shard.map.len(), 0);
        assert!(shard.completed.is_empty());
    }

    #[test]
    fn an_entry_is_32_bytes_an_eviction_entry_16() {
        assert_eq!(std::mem::size_of::<Entry>(), 32);
        assert_eq!(std::mem::size_of::<(u64, usize)>(), 16, "an eviction entry");
    }

    /// Leases and retentions longer than an entry's deadline holds (584
    /// years) are clamped before anything is indexed: nothing is left in
    /// the indexes once the records are gone, and every byte is back.
    #[tokio::test(start_paused = true)]
    async fn deadlines_past_what_an_entry_holds_leave_no_index_entry_behind() {
        let s = store();
        let millennium = Duration::from_secs(1000 * 365 * 86_400);
        let k = StoreKey::new(&Scope::global(), "far");
        let Ok(Reservation::Acquired(lease)) = s.reserve(&k, FP, millennium).await else {
            panic!("a fresh key is acquired");
        };
        assert!(matches!(s.get(&k).await, Ok(Some(Record::InFlight { .. }))));
        assert!(matches!(s.release(&k, lease.token).await, Ok(Fence::Held)));
        let far = store_one(&s, 0, millennium).await;
        let near = store_one(&s, 1, Duration::from_secs(1)).await;
        assert_eq!(lock(&s.shared.shards[0]).expirations.len(), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            s.get(&near).await.expect("get").is_none(),
            "expired on time"
        );
        assert!(s.get(&far).await.expect("get").is_some());
        assert!(s.purge(&far).await.expect("purge"));
        let shard = lock(&s.shared.shards[0]);
        assert!(shard.map.is_empty());
        assert!(shard.expirations.is_empty());
        assert_eq!(s.bytes(), 0, "every byte is back");
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweep_drops_the_eviction_entries_of_what_expired() {
        let s = store();
        for i in 0..300 {
            store_one(&s, i, Duration::from_secs(1)).await;
        }
        store_one(&s, 300, Duration::from_secs(600)).await;
        tokio::time::advance(Duration::from_secs(2)).await;
        let mut shard = lock(&s.shared.shards[0]);
        // (The background sweep may have been first: either way.)
        shard.sweep(Instant::now(), &s.shared);
        assert_eq!(shard.map.len(), 1);
        assert_eq!(shard.completed_live, 1);
        assert_eq!(
            shard.completed.len(),
            1,
            "only the live record's entry is left"
        );
    }
}
