//! The memory store's queue (protocol §9.7): operations in the same shards as
//! the records, each step atomic under its shard's lock.
//!
//! An operation is the record of its key ([`Open::Operation`]). Beside
//! the map, each shard indexes its operations twice, by the same seq that
//! ties every index entry to one version of a record:
//!
//! - `due`: (next claimable instant, seq, key) — the due time of a pending
//!   operation, the lease end of a running one — so a claim takes the
//!   first entry at or before now;
//! - `operations`: seq → key, in order of acceptance, for the age of the
//!   oldest operation. An operation keeps its seq from enqueue until it is
//!   done (claim, retry and heartbeat only move its `due` entry).
//!
//! Store-wide, [`Operations`] keeps the id → key index (in shards of its
//! own, by id) and the count of live operations that `max_pending` bounds.
//! Lock order: a record shard, then an id shard; never the other way round
//! (`operation` reads the id shard, lets go, then locks the record shard
//! and checks that the record still carries that id).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::{key_weight, lock, Entry, Epoch, MemoryStore, Shard, State, View};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::record::Token;
use crate::store::{
    Claimed, Enqueued, Fence, Operation, OperationId, OperationRequest, OperationState, Queue,
    QueueStats, StoreError,
};

/// A pending or running operation: the record of its key.
#[derive(Debug)]
pub(super) struct Op {
    pub(super) id: OperationId,
    pub(super) fingerprint: Fingerprint,
    /// When it was accepted (wall clock, for `Record::InFlight`).
    pub(super) accepted_at: SystemTime,
    /// When it was accepted (for the age of the oldest operation).
    accepted: Instant,
    request: Arc<OperationRequest>,
    /// Upstream calls made so far, the running one included.
    attempts: u32,
    /// The token of the dispatcher that holds it; `None` while pending.
    pub(super) running: Option<Token>,
    /// Why the latest failed attempt failed ([`Queue::retry`]).
    last_error: Option<Box<str>>,
}

/// The least `lease_remaining` an operation shows to `get` and `reserve`:
/// it is never free to take over by a synchronous request, and waiters
/// must not poll it in a tight loop.
const OPERATION_REMAINING: Duration = Duration::from_secs(1);

/// What an operation's record shows as its lease: the time until it is
/// next claimable, at least [`OPERATION_REMAINING`].
pub(super) fn remaining(deadline: Instant, now: Instant) -> Duration {
    deadline
        .saturating_duration_since(now)
        .max(OPERATION_REMAINING)
}

/// Store-wide books of the queue.
#[derive(Debug)]
pub(super) struct Operations {
    /// Id → key, sharded by id. An entry is trusted only if the record under
    /// the key still carries the id.
    ids: Box<[Mutex<HashMap<OperationId, StoreKey>>]>,
    /// Operations pending or running.
    live: AtomicU64,
}

impl Operations {
    pub(super) fn new(shards: usize) -> Self {
        debug_assert!(shards.is_power_of_two());
        Self {
            ids: (0..shards).map(|_| Mutex::default()).collect(),
            live: AtomicU64::new(0),
        }
    }

    fn ids(&self, id: OperationId) -> MutexGuard<'_, HashMap<OperationId, StoreKey>> {
        // Ids are random: their low bits spread them evenly; truncation intended.
        let i = (id.as_u128() as usize) & (self.ids.len() - 1);
        // Each step leaves the map consistent before it can panic.
        self.ids[i].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes one of `max_pending` slots; false if all are taken.
    fn take_slot(&self, max_pending: u64) -> bool {
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max_pending).then_some(n + 1)
            })
            .is_ok()
    }

    /// An operation is done: its slot is free (its id stays).
    pub(super) fn finished(&self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
    }

    /// The record of operation `id` is gone; `live`: it was still pending or
    /// running, so its slot is free too.
    pub(super) fn forget(&self, id: OperationId, live: bool) {
        self.ids(id).remove(&id);
        if live {
            self.finished();
        }
    }
}

impl Op {
    /// What the operation's request is charged against the byte bound,
    /// beside its key: what `enqueue` charged.
    pub(super) fn weight(&self) -> u64 {
        self.request.weight() as u64
    }

    fn last_error(&self) -> Option<String> {
        self.last_error.as_deref().map(str::to_owned)
    }

    fn state(&self, deadline: Instant, now: Instant) -> OperationState {
        match self.running {
            Some(_) => OperationState::Running {
                attempts: self.attempts,
            },
            None => OperationState::Pending {
                attempts: self.attempts,
                next_attempt_in: deadline.saturating_duration_since(now),
            },
        }
    }
}

impl Entry {
    /// This record as operation `id`, if it is that operation (pending,
    /// running or done).
    fn operation(
        &self,
        id: OperationId,
        key: &StoreKey,
        epoch: Epoch,
        now: Instant,
    ) -> Option<Operation> {
        let (state, last_error) = match self.state.view() {
            View::Operation(op) if op.id == id => {
                (op.state(epoch.at(self.deadline), now), op.last_error())
            }
            View::Completed(packed) if packed.operation() == Some(id) => {
                (OperationState::Done(packed.record()), None)
            }
            _ => return None,
        };
        Some(Operation {
            id,
            key: key.clone(),
            state,
            last_error,
        })
    }
}

impl Shard {
    /// Claims the first operation claimable at `now`, if any: running
    /// under a new token until `now + lease`, one attempt more.
    ///
    /// Atomicity: the caller holds this shard's lock from the look at the
    /// index to the new token, so no other claimer sees the operation
    /// claimable in between.
    fn claim_first(&mut self, now: Instant, lease: Duration) -> Option<Claimed> {
        loop {
            let (at, seq, key) = self.due.first().filter(|(at, ..)| *at <= now)?.clone();
            let at_ticks = self.epoch.ticks(at);
            let current = self
                .map
                .get(&key)
                .is_some_and(|e| e.seq == seq && e.deadline == at_ticks && e.is_operation());
            if !current {
                // Never expected (every change moves the index entry with
                // the record), but a stale entry must not block the queue.
                self.due.remove(&(at, seq, key));
                continue;
            }
            let token = Token::generate();
            self.set_deadline(&key, now + lease);
            let e = self.map.get_mut(&key)?;
            let op = e.state.operation_mut()?;
            op.running = Some(token);
            op.attempts = op.attempts.saturating_add(1);
            return Some(Claimed {
                id: op.id,
                key: key.store_key(),
                fingerprint: op.fingerprint,
                token,
                attempt: op.attempts,
                request: Arc::clone(&op.request),
            });
        }
    }

    /// When the first operation of this shard is claimable.
    fn first_due(&self) -> Option<Instant> {
        self.due.first().map(|(at, ..)| *at)
    }
}

impl Queue for MemoryStore {
    async fn enqueue(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        id: OperationId,
        request: &OperationRequest,
        max_pending: u64,
    ) -> Result<Enqueued, StoreError> {
        let now = Instant::now();
        let shared = &*self.shared;
        let weight = key_weight(key.as_str().len()) + request.weight() as u64;
        if weight > shared.limits.max_bytes {
            // As in `complete`: making room would evict everyone and still
            // not fit.
            return Err(StoreError::Capacity(
                "the request is larger than the memory store's byte bound",
            ));
        }
        let mut charged = false;
        let mut request = Some(request);
        loop {
            let mut shard = self.shard(key);
            let epoch = shard.epoch;
            if let Some(entry) = shard.live(key, now, shared) {
                let deadline = epoch.at(entry.deadline);
                let found = match entry.state.view() {
                    View::InFlight(held) if held.fingerprint != fingerprint => Enqueued::Mismatch,
                    View::Operation(op) if op.fingerprint != fingerprint => Enqueued::Mismatch,
                    View::InFlight(_) => Enqueued::InFlight {
                        lease_remaining: deadline - now,
                    },
                    View::Operation(op) => Enqueued::Existing(Operation {
                        id: op.id,
                        key: key.clone(),
                        state: op.state(deadline, now),
                        last_error: op.last_error(),
                    }),
                    View::Completed(p) if p.fingerprint() != fingerprint => Enqueued::Mismatch,
                    View::Completed(p) => Enqueued::Completed(p.record()),
                };
                if charged {
                    shared.usage.refund(weight, 1);
                }
                return Ok(found);
            }
            if !charged && !shared.usage.try_charge(weight, 1) {
                // Full: make room with this shard unlocked (as `reserve`
                // does), then look again.
                drop(shard);
                self.make_room(weight, 1)?;
                charged = true;
                continue;
            }
            // Atomicity: the slot is taken under the shard lock, after the
            // key was found free and before the record is written, so a
            // `Full` answer has written nothing and a fresh key can never be
            // written twice.
            if !shared.operations.take_slot(max_pending) {
                shared.usage.refund(weight, 1);
                return Ok(Enqueued::Full);
            }
            let Some(request) = request.take() else {
                return Err(StoreError::Capacity("enqueue looped after writing"));
            };
            shard.insert(
                key,
                now,
                State::operation(Op {
                    id,
                    fingerprint,
                    accepted_at: SystemTime::now(),
                    accepted: now,
                    request: Arc::new(request.clone()),
                    attempts: 0,
                    running: None,
                    last_error: None,
                }),
            );
            // Lock order: record shard, then id shard.
            shared.operations.ids(id).insert(id, key.clone());
            return Ok(Enqueued::Accepted(id));
        }
    }

    async fn claim(&self, lease: Duration, max: usize) -> Result<Vec<Claimed>, StoreError> {
        let now = Instant::now();
        let shards = &self.shared.shards;
        let mut claimed = Vec::new();
        while claimed.len() < max {
            // The shard whose first operation is due earliest. Only a hint:
            // the claim itself looks again under that shard's lock.
            let Some((_, i)) = shards
                .iter()
                .enumerate()
                .filter_map(|(i, s)| {
                    lock(s)
                        .first_due()
                        .filter(|at| *at <= now)
                        .map(|at| (at, i))
                })
                .min()
            else {
                break;
            };
            if let Some(c) = lock(&shards[i]).claim_first(now, lease) {
                claimed.push(c);
            }
        }
        Ok(claimed)
    }

    async fn retry(
        &self,
        key: &StoreKey,
        token: Token,
        delay: Duration,
        last_error: &str,
    ) -> Result<Fence, StoreError> {
        let mut shard = self.shard(key);
        let Some(entry) = shard.held(key, token) else {
            return Ok(Fence::Lost);
        };
        let Some(op) = entry.state.operation_mut() else {
            // A synchronous execution's token: not an operation to retry.
            return Ok(Fence::Lost);
        };
        op.running = None;
        op.last_error = Some(last_error.into());
        shard.set_deadline(key, Instant::now() + delay);
        Ok(Fence::Held)
    }

    async fn operation(&self, id: OperationId) -> Result<Option<Operation>, StoreError> {
        let Some(key) = self.shared.operations.ids(id).get(&id).cloned() else {
            return Ok(None);
        };
        let now = Instant::now();
        let mut shard = self.shard(&key);
        let epoch = shard.epoch;
        Ok(shard
            .live(&key, now, &self.shared)
            .and_then(|e| e.operation(id, &key, epoch, now)))
    }

    async fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        let now = Instant::now();
        let oldest = self
            .shared
            .shards
            .iter()
            .filter_map(|s| {
                let shard = lock(s);
                let (_, key) = shard.operations.first_key_value()?;
                match shard.map.get(key)?.state.view() {
                    View::Operation(op) => Some(op.accepted),
                    View::InFlight(_) | View::Completed(..) => None,
                }
            })
            .min();
        Ok(QueueStats {
            pending: self.shared.operations.live.load(Ordering::Acquire),
            oldest_pending_age: oldest.map(|at| now.saturating_duration_since(at)),
        })
    }
}
