//! Async mode's queue on Redis (protocol §9.7): [`Queue`] for [`RedisStore`].
//!
//! # Layout
//!
//! An operation IS the record of its key, at `{prefix}{<store key>}` like
//! any record, so a synchronous `reserve` and an `enqueue` of one key meet
//! in one script, in the key's own slot, and records keep spreading over
//! every slot of a Cluster. Its fields, beside `state`, `fp` and `token`:
//!
//! | field | pending | running | completed |
//! |---|---|---|---|
//! | `state` | `pending` | `running` | `completed` |
//! | `op` | the id, 32 hex digits | the same | the same (the id stays resolvable) |
//! | `token` | — | the claimer's token | the token that completed it |
//! | `accepted_at` | ms since the epoch | the same | — |
//! | `attempts` | upstream calls so far | the same, this one included | — |
//! | `due` | when it is claimable, ms | — | — |
//! | `lease_until` | — | when its lease runs out, ms | — |
//! | `last_error`, `retried_by` | after a retry: why, and the spent token | — | — |
//! | `method`, `uri`, `req_headers`, `req_body` | the request to send | the same | — |
//!
//! Times are Redis's clock (`TIME` inside the scripts). A pending or running
//! operation has no TTL: it never expires; its lease is `lease_until`, not
//! the key's TTL. Completed, it is an ordinary completed record (plus `op`)
//! with the retention as its TTL.
//!
//! The queue itself is keys under one hash tag of their own,
//! `{<prefix>queue}`, so one script changes them together:
//!
//! - `{prefix}{<prefix>queue}:due`, a sorted set: member `<id><store key>`,
//!   score the time (ms) the operation is next claimable: its due time while
//!   pending, the end of its lease while running;
//! - `{prefix}{<prefix>queue}:age`, a sorted set: the same member, scored by
//!   when it was accepted (the age of the oldest operation, for metrics);
//! - `{prefix}{<prefix>queue}:op:<id>`, a string: the store key, so an id
//!   alone finds its record. No TTL while the operation lives; the
//!   retention once done;
//! - `{prefix}{<prefix>queue}:take:<token>`, a list: the members one claim
//!   took, for one lease (see `take.lua`).
//!
//! # Why one slot for the queue
//!
//! The records — requests, answers, the bulk of the data and of the writes —
//! spread over every slot by key. The queue's entries (a hundred bytes or so
//! each) all live in one slot, as a BullMQ queue lives under one hash tag.
//! Entries spread over 16 shards (`{q<n>}`, n from the id) were built and
//! measured first: [`Queue::claim`] hands out the oldest due operations of
//! the whole store and `max_pending` bounds the whole store, so every claim
//! had to look at all 16 shards and every enqueue count them — sixteen calls
//! where one does, on every node. On a 3-master Cluster the conformance
//! race (25 rounds of 200 operations and 200 claimers) took 24–25 s with 16
//! shards and 6.3–6.6 s with one slot; the claims alone, ~30 ms a round
//! against 400–700 ms. Sharding would pay only if a claim could stop at the
//! first shard with work, which the oldest-first order forbids. One slot
//! also makes `max_pending` exact, and keeps one code path for standalone
//! Redis and a Cluster. The prefix is part of the tag, so stores with
//! different prefixes put their queues in different slots.
//!
//! # Steps
//!
//! The record and the queue are in two slots, so each operation is a
//! script on one, then a script (or one command) on the other. The record
//! is the authority: a claim takes an entry, then asks the record whether
//! the operation is claimable, and only the record's answer makes it
//! running. An entry is a hint that can be late, early or stale, and
//! whoever finds it so puts it right:
//!
//! - **enqueue**: `offer.lua` puts the entry in the queue if `max_pending`
//!   allows, scored a grace period ahead; `enqueue.lua` writes the record
//!   (or says what holds the key); then the entry is scheduled at its due
//!   time (`ZADD LT`). An entry whose record never came (the key was taken,
//!   or the caller died between the two) is taken out — by the enqueue
//!   itself, or by the first claim that takes it after the grace. An entry
//!   whose scheduling was lost runs after the grace (a repeat of the POST
//!   mends it at once).
//! - **claim**: `take.lua` takes the oldest due entries and scores them a
//!   lease ahead, so no other claimer takes them meanwhile (and notes them
//!   on a ticket, `{prefix}{<prefix>queue}:take:<token>`, for one lease, so
//!   that a retry after a lost reply gets the same ones); `start.lua`
//!   makes each record running under a new token, or answers that it is
//!   not claimable before some time (the entry moves there), done, or gone
//!   (the entry goes).
//! - **extend**, **retry**: the record first (fenced), then the entry moves
//!   to the new lease end or due time.
//! - **complete**, **release**, **purge**: the record first, then
//!   `forget.lua` takes the entry out and gives the id the record's
//!   retention (or deletes it).
//!
//! A second step that fails is logged, not returned: the record changed,
//! and the queue heals when a claim next meets the entry (at the latest one
//! lease, or the grace, later).
//!
//! In a Cluster the queue and a record may sit on nodes whose clocks
//! differ. Entries are compared with the queue node's clock and the record
//! with its own, and only the record's decides: a skew delays a claim, or
//! makes a claimer look again, but never starts an operation early or twice.

use std::sync::Arc;
use std::time::Duration;

use ::redis::{cmd, Script, Value};
use futures_util::future::join_all;

use super::invoke::{token_hex, Headers, Hex, Invocation};
use super::reply::{decode_headers, delay_ms, ttl_ms, Reply};
use super::RedisStore;
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::record::Token;
use crate::store::{
    Claimed, Enqueued, Fence, Operation, OperationId, OperationRequest, OperationState, Queue,
    QueueStats, StoreError,
};

/// Rounds of take and start one claim may go through when records refuse
/// entries (stale hints) before it answers with what it has.
const MAX_ROUNDS: usize = 8;
/// The least time an offered entry waits for its record (see `grace`).
const MIN_GRACE: Duration = Duration::from_secs(10);

/// The queue's scripts (one per step; see the module docs).
pub(super) struct Scripts {
    offer: Script,
    enqueue: Script,
    take: Script,
    start: Script,
    forget: Script,
    retry: Script,
    operation: Script,
    stats: Script,
}

impl Scripts {
    pub(super) fn load() -> Self {
        Self {
            offer: Script::new(include_str!("lua/offer.lua")),
            enqueue: Script::new(include_str!("lua/enqueue.lua")),
            take: Script::new(include_str!("lua/take.lua")),
            start: Script::new(include_str!("lua/start.lua")),
            forget: Script::new(include_str!("lua/forget.lua")),
            retry: Script::new(include_str!("lua/retry.lua")),
            operation: Script::new(include_str!("lua/operation.lua")),
            stats: Script::new(include_str!("lua/stats.lua")),
        }
    }
}

/// The second step, in the queue, of a fenced store call that held an
/// operation's record.
#[derive(Debug, Clone, Copy)]
pub(super) enum Follow {
    /// It left the queue (completed, released, purged); its id stays
    /// resolvable this long (zero: it goes now).
    Forget(Duration),
    /// Its entry moves to the time the script answered (a heartbeat's new
    /// lease end, a retry's due time).
    Schedule,
}

/// How [`RedisStore::schedule`] moves an entry.
#[derive(Debug, Clone, Copy)]
enum Move {
    /// Add it, or move it (`ZADD`).
    Set,
    /// Add it, or move it only earlier (`ZADD LT`): the due time of a
    /// record just written, never later than a lease a claim gave it.
    Earlier,
    /// Move it only if it is there (`ZADD XX`).
    Existing,
}

/// An entry's member in the queue's sorted sets: `<id><store key>`.
fn member(id: OperationId, key: &StoreKey) -> String {
    format!("{id}{}", key.as_str())
}

fn parse_member(member: &[u8]) -> Result<(OperationId, StoreKey), StoreError> {
    let corrupt = || StoreError::Corrupt("a queue entry is not <id><store key>".into());
    let text = std::str::from_utf8(member).map_err(|_| corrupt())?;
    let (id, key) = text.split_at_checked(32).ok_or_else(corrupt)?;
    let id = id.parse().map_err(|_| corrupt())?;
    let key = StoreKey::from_stored(key).map_err(|_| corrupt())?;
    Ok((id, key))
}

fn attempts(reply: &mut Reply) -> Result<u32, StoreError> {
    u32::try_from(reply.ms("attempts")?)
        .map_err(|_| StoreError::Corrupt("attempts: out of range".into()))
}

impl RedisStore {
    /// `{prefix}{<prefix>queue}:<what>`: the queue's keys, in one slot.
    fn queue_key(&self, what: &str) -> String {
        let prefix = &self.inner.prefix;
        format!("{prefix}{{{prefix}queue}}:{what}")
    }

    /// The key of operation `id`'s index entry.
    #[must_use]
    pub fn operation_index_key(&self, id: OperationId) -> String {
        self.queue_key(&format!("op:{id}"))
    }

    /// The keys of the queue's sorted sets: (due, age).
    #[must_use]
    pub fn queue_keys(&self) -> (String, String) {
        (self.queue_key("due"), self.queue_key("age"))
    }

    /// How long an offered entry waits for its record before a claim may
    /// take it: well past the bound on the record's call.
    fn grace(&self) -> Duration {
        (self.inner.timeout * 4).max(MIN_GRACE)
    }

    /// Does `follow` after a fenced call held operation `id`'s record. A
    /// failure is logged: the record changed, and the queue heals.
    pub(super) async fn follow(
        &self,
        key: &StoreKey,
        id: OperationId,
        at: Option<u64>,
        follow: Follow,
    ) {
        let result = match (follow, at) {
            (Follow::Forget(keep), _) => self.forget(id, key, keep).await,
            (Follow::Schedule, Some(at)) => self.schedule(id, key, at, Move::Set).await,
            (Follow::Schedule, None) => Ok(()),
        };
        healing(id, result);
    }

    /// Takes operation `id`'s entries out of the queue; its index entry
    /// lives `keep` more (zero: deleted).
    async fn forget(
        &self,
        id: OperationId,
        key: &StoreKey,
        keep: Duration,
    ) -> Result<(), StoreError> {
        let (due, age) = self.queue_keys();
        let mut inv = Invocation::new(&self.inner.scripts.queue.forget, 3);
        inv.key(due)
            .key(age)
            .key(self.operation_index_key(id))
            .arg(member(id, key))
            .arg(if keep.is_zero() { 0 } else { ttl_ms(keep) });
        self.eval(inv).await.map(drop)
    }

    /// Scores operation `id`'s due entry `at` (ms on Redis's clock). One
    /// `ZADD`, atomic by itself.
    async fn schedule(
        &self,
        id: OperationId,
        key: &StoreKey,
        at: u64,
        how: Move,
    ) -> Result<(), StoreError> {
        let mut c = cmd("ZADD");
        c.arg(self.queue_key("due"));
        match how {
            Move::Set => {}
            Move::Earlier => {
                c.arg("LT");
            }
            Move::Existing => {
                c.arg("XX");
            }
        }
        c.arg(at).arg(member(id, key));
        self.query(c).await.map(drop)
    }

    /// `offer.lua`: puts `id`'s entry in the queue unless `max_pending`
    /// operations are there already. False: full, nothing written.
    async fn offer(
        &self,
        id: OperationId,
        key: &StoreKey,
        max_pending: u64,
    ) -> Result<bool, StoreError> {
        let (due, age) = self.queue_keys();
        let mut inv = Invocation::new(&self.inner.scripts.queue.offer, 3);
        inv.key(due)
            .key(age)
            .key(self.operation_index_key(id))
            .arg(member(id, key))
            .arg(key.as_str())
            .arg(max_pending.to_string())
            .arg(ttl_ms(self.grace()));
        let mut reply = Reply::from_items(vec![self.eval(inv).await?]);
        match reply.tag()?.as_str() {
            "offered" => Ok(true),
            "full" => Ok(false),
            other => Err(reply.unexpected(other)),
        }
    }

    /// `take.lua`: up to `max` due entries, oldest first, hidden for `lease`.
    async fn take(
        &self,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<(OperationId, StoreKey)>, StoreError> {
        // A ticket of its own, so a retry after a lost reply answers the
        // same entries (take.lua).
        let ticket = format!("{:032x}", rand::random::<u128>());
        let mut inv = Invocation::new(&self.inner.scripts.queue.take, 2);
        inv.key(self.queue_key("due"))
            .key(self.queue_key(&format!("take:{ticket}")))
            .arg(max)
            .arg(ttl_ms(lease))
            .arg(&ticket);
        let Value::Array(items) = self.eval(inv).await? else {
            return Err(StoreError::Corrupt(
                "take.lua answered something other than entries".into(),
            ));
        };
        let mut reply = Reply::from_items(items);
        let mut taken = Vec::new();
        while !reply.is_empty() {
            taken.push(parse_member(&reply.bytes("queue member")?)?);
        }
        Ok(taken)
    }

    /// `start.lua` on a taken entry's record: the claim, or `None` when the
    /// record says no (and the entry is put right).
    async fn start(
        &self,
        (id, key): &(OperationId, StoreKey),
        lease: Duration,
    ) -> Result<Option<Claimed>, StoreError> {
        let token = Token::generate();
        let mut inv = Invocation::new(&self.inner.scripts.queue.start, 1);
        inv.key(self.record_arg(key))
            .arg(id.to_string())
            .arg(token_hex(token))
            .arg(ttl_ms(lease));
        let mut reply = Reply::new(self.eval(inv).await?)?;
        match reply.tag()?.as_str() {
            "claimed" => {
                let fingerprint = reply.fingerprint()?;
                let attempt = attempts(&mut reply)?;
                let method = reply.text("method")?;
                let uri = reply.text("uri")?;
                let headers = decode_headers(&reply.bytes("request headers")?)?;
                let body = reply.bytes("request body")?.into();
                Ok(Some(Claimed {
                    id: *id,
                    key: key.clone(),
                    fingerprint,
                    token,
                    attempt,
                    request: Arc::new(OperationRequest {
                        method,
                        uri,
                        headers,
                        body,
                    }),
                }))
            }
            "later" => {
                let at = reply.ms("claimable_at")?;
                healing(*id, self.schedule(*id, key, at, Move::Existing).await);
                Ok(None)
            }
            "done" => {
                let keep =
                    u64::try_from(reply.int("pttl")?).map_or(Duration::ZERO, Duration::from_millis);
                healing(*id, self.forget(*id, key, keep).await);
                Ok(None)
            }
            "gone" => {
                healing(*id, self.forget(*id, key, Duration::ZERO).await);
                Ok(None)
            }
            other => Err(reply.unexpected(other)),
        }
    }
}

/// Logs a second step that failed (see "Steps" in the module docs).
fn healing(id: OperationId, result: Result<(), StoreError>) {
    if let Err(e) = result {
        tracing::warn!(
            error = %e,
            operation = %id,
            "Redis queue entry not updated after its record; a later claim puts it right"
        );
    }
}

impl Queue for RedisStore {
    async fn enqueue(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        id: OperationId,
        request: &OperationRequest,
        max_pending: u64,
    ) -> Result<Enqueued, StoreError> {
        let offered = self.offer(id, key, max_pending).await?;
        let mut inv = Invocation::new(&self.inner.scripts.queue.enqueue, 1);
        inv.key(self.record_arg(key))
            .arg(Hex(fingerprint.0))
            .arg(id.to_string())
            .arg(&request.method)
            .arg(&request.uri)
            .arg(Headers(&request.headers))
            .arg(request.body.as_ref())
            .arg(if offered { "1" } else { "0" });
        // On an error the offer stays: the record may have been written (a
        // time-out after Redis applied it); a claim after the grace finds
        // out which.
        let mut reply = Reply::new(self.eval(inv).await?)?;
        let tag = reply.tag()?;
        if tag == "accepted" {
            let at = reply.ms("claimable_at")?;
            healing(id, self.schedule(id, key, at, Move::Earlier).await);
            return Ok(Enqueued::Accepted(id));
        }
        if offered {
            // Not accepted: the offer goes.
            healing(id, self.forget(id, key, Duration::ZERO).await);
        }
        match tag.as_str() {
            "free" => Ok(Enqueued::Full),
            "existing" => {
                let op = reply.operation_id()?;
                let state = reply.text("state")?;
                let attempts = attempts(&mut reply)?;
                let at = reply.ms("claimable_at")?;
                let now = reply.ms("now")?;
                let last_error = reply.optional_text("last error")?;
                // A repeat also mends the entry of an enqueue that died
                // between its record and its scheduling.
                healing(op, self.schedule(op, key, at, Move::Earlier).await);
                let state = if state == "pending" {
                    OperationState::Pending {
                        attempts,
                        next_attempt_in: Duration::from_millis(at.saturating_sub(now)),
                    }
                } else {
                    OperationState::Running { attempts }
                };
                Ok(Enqueued::Existing(Operation {
                    id: op,
                    key: key.clone(),
                    state,
                    last_error,
                }))
            }
            "in_flight" => Ok(Enqueued::InFlight {
                lease_remaining: reply.pttl()?,
            }),
            "mismatch" => Ok(Enqueued::Mismatch),
            "completed" => Ok(Enqueued::Completed(Arc::new(reply.completed()?))),
            other => Err(reply.unexpected(other)),
        }
    }

    async fn claim(&self, lease: Duration, max: usize) -> Result<Vec<Claimed>, StoreError> {
        let mut claimed = Vec::new();
        for _ in 0..MAX_ROUNDS {
            let want = max - claimed.len();
            if want == 0 {
                break;
            }
            let taken = self.take(want, lease).await?;
            let mut refused = false;
            // In the order taken: oldest due first.
            for started in join_all(taken.iter().map(|t| self.start(t, lease))).await {
                match started {
                    Ok(Some(c)) => claimed.push(c),
                    Ok(None) => refused = true,
                    // Claims made stay made (their holders must finish
                    // them), and the failed entry waits out the lease of
                    // its take; with none made, the failure is the answer.
                    Err(e) if claimed.is_empty() => return Err(e),
                    Err(e) => {
                        tracing::warn!(error = %e, "Redis claim: a taken operation could not be started");
                        return Ok(claimed);
                    }
                }
            }
            // Fewer than asked: no more were due. Only entries the records
            // refused (stale hints, now put right) call for another look.
            if taken.len() < want && !refused {
                break;
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
        let mut inv = Invocation::new(&self.inner.scripts.queue.retry, 1);
        inv.key(self.record_arg(key))
            .arg(token_hex(token))
            .arg(delay_ms(delay))
            .arg(last_error);
        self.fenced(key, inv, Follow::Schedule).await
    }

    async fn operation(&self, id: OperationId) -> Result<Option<Operation>, StoreError> {
        let mut get = cmd("GET");
        get.arg(self.operation_index_key(id));
        let key = match self.query(get).await? {
            Value::Nil => return Ok(None),
            Value::BulkString(b) => std::str::from_utf8(&b)
                .ok()
                .and_then(|s| StoreKey::from_stored(s).ok())
                .ok_or_else(|| {
                    StoreError::Corrupt("an operation's index entry is not a store key".into())
                })?,
            other => {
                return Err(StoreError::Corrupt(
                    format!("an operation's index entry is {other:?}").into(),
                ))
            }
        };
        let mut inv = Invocation::new(&self.inner.scripts.queue.operation, 1);
        inv.key(self.record_arg(&key)).arg(id.to_string());
        let mut reply = Reply::new(self.eval(inv).await?)?;
        let state = match reply.tag()?.as_str() {
            "none" => return Ok(None),
            "pending" => OperationState::Pending {
                attempts: attempts(&mut reply)?,
                next_attempt_in: Duration::from_millis(reply.ms("due in")?),
            },
            "running" => OperationState::Running {
                attempts: attempts(&mut reply)?,
            },
            "completed" => OperationState::Done(Arc::new(reply.completed()?)),
            other => return Err(reply.unexpected(other)),
        };
        let last_error = match state {
            OperationState::Done(_) => None,
            _ => reply.optional_text("last error")?,
        };
        Ok(Some(Operation {
            id,
            key,
            state,
            last_error,
        }))
    }

    async fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        let (due, age) = self.queue_keys();
        let mut inv = Invocation::new(&self.inner.scripts.queue.stats, 2);
        inv.key(due).key(age);
        let mut reply = Reply::new(self.eval(inv).await?)?;
        let pending = reply.ms("count")?;
        let oldest = u64::try_from(reply.int("oldest age")?).ok();
        Ok(QueueStats {
            pending,
            oldest_pending_age: oldest.map(Duration::from_millis),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::key::Scope;

    #[test]
    fn a_member_names_its_operation_and_key() {
        let id = OperationId::from_u128(0xa123_4567_89ab_cdef_0011_2233_4455_6677);
        // Keys may hold braces and colons: the id has a fixed width.
        let key = StoreKey::new(&Scope::named("t"), "order-{1}:x");
        let m = member(id, &key);
        assert_eq!(parse_member(m.as_bytes()).unwrap(), (id, key));
        for bad in [
            "",
            "a123",
            "zz23456789abcdef0011223344556677x:y",
            "a123456789abcdef0011223344556677nokey",
        ] {
            assert!(parse_member(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }
}
