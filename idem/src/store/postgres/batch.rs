//! Group commit on the request path: the reserves (and the completes)
//! that wait for a connection at the same moment go to the database as ONE
//! statement (`reserve_many.sql`, `complete_many.sql`): one round trip,
//! one commit (one WAL flush) and one wake-up of the server for the lot,
//! instead of one each.
//!
//! No timer: a statement is queued, and every caller whose statement is
//! queued also asks the pool for a connection. Whoever gets one takes what
//! is queued then (its own statement or not, oldest first, at most
//! [`MAX_ITEMS`], [`MAX_BYTES`] of bodies, one per key) and hands it, with
//! the connection, to a task of its own, which runs it and answers each
//! caller (a batch of the caller's own statement alone runs in the
//! caller); a caller whose statement was taken stops asking. A lone request
//! (a quiet store, or a free connection) therefore goes out at once, alone:
//! batches form only while every connection is busy, that is exactly when
//! waiting for a connection would have cost more than a batch.
//!
//! Each key's outcome is what its own statement would have given (the
//! statements are `reserve.sql` and `complete.sql` per element; a batch
//! of one that need not bound its lock wait is sent as those). The
//! batch's keys are distinct (`ON CONFLICT` cannot change a row twice) and
//! sorted. A batch waits at most [`LOCK_WAIT`] for a row lock; a part the
//! server refuses with an error of its own (that lock wait, a deadlock, a
//! value it rejects; not its `statement_timeout`, nor an error that ends
//! the connection) is split in halves on the same connection until the key
//! it refuses stands alone: that key's error is its own, and a key still
//! locked (an open transaction holds its row) runs alone, waiting as long
//! as a single statement would. An error of the connection, or the time-out,
//! is every unanswered caller's. Reserves lock their rows in the batch's
//! order; a batch of completes may lock in the table's order (the planner
//! may hash-join a large batch), so two batches sharing keys can deadlock:
//! the lock wait breaks it within [`LOCK_WAIT`], and the halves run again.
//!
//! The batch's task is bounded by the store's time-out. A caller that
//! leaves before its statement was taken is skipped (and its entry is
//! dropped as soon as a newer statement is queued behind it, so entries do
//! not pile up while the database hangs and no batch is taken); one whose connection
//! could not be had gives its error only if no batch took its statement
//! meanwhile (else the batch's outcome is its answer). If a batch's task
//! is dropped midway (its runtime shuts down), its callers queue their
//! statements again with the same token: a reserve or a complete that did
//! commit is then acknowledged as it was (both are idempotent for their
//! token).

use std::collections::VecDeque;
use std::future::Future;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::postgres::{PgConnection, PgRow};
use sqlx::Row as _;
use tokio::sync::oneshot;

use super::hot::{self, Pool};
use super::{micros, row, shared_store_error, statement_timed_out, store_error, Statements};
use crate::error::{Corruption, StoreError};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::record::{CompletedRecord, Token};
use crate::store::Reservation;

/// Most statements in one batch.
const MAX_ITEMS: usize = 64;
/// Most bytes of response bodies and headers in one batch (a first
/// statement of any size goes, alone if need be).
const MAX_BYTES: usize = 1 << 20;

/// A statement that can go in a batch.
pub(super) trait Item: Clone + Send + 'static {
    /// Its outcome.
    type Out: Send + 'static;
    /// The key it changes.
    fn key(&self) -> &str;
    /// Its bytes, against [`MAX_BYTES`].
    fn weight(&self) -> usize;
    /// Runs `items` as one statement of `sql`'s on `conn`, waiting at most
    /// `lock_wait` for a row lock (`None`: as the session does): each
    /// one's outcome, in order.
    fn run(
        conn: &mut PgConnection,
        sql: &Statements,
        items: &[Self],
        lock_wait: Option<&str>,
    ) -> impl Future<Output = Result<Vec<Answer<Self>>, sqlx::Error>> + Send;
}

/// One caller's outcome.
type Answer<T> = Result<<T as Item>::Out, StoreError>;

/// What a batch tells a caller.
enum Outcome<T: Item> {
    Answer(Answer<T>),
    /// Its key's row stayed locked past [`LOCK_WAIT`] (an open transaction
    /// holds it): run the statement alone, waiting as long as it takes.
    Alone,
}

/// How long a batch's statement waits for a row lock. Past it, the batch
/// runs again in halves, and a key still locked waits on its own.
const LOCK_WAIT: &str = "100ms";

/// A queued statement and where its outcome goes.
struct Waiting<T: Item> {
    /// Its number in its queue ([`Queue::withdraw`]).
    id: u64,
    item: T,
    answer: oneshot::Sender<Outcome<T>>,
}

/// The statements of one kind waiting for a connection, oldest first.
pub(super) struct Queue<T: Item> {
    inner: Mutex<Inner<T>>,
}

struct Inner<T: Item> {
    next: u64,
    waiting: VecDeque<Waiting<T>>,
}

impl<T: Item> Default for Queue<T> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                next: 0,
                waiting: VecDeque::new(),
            }),
        }
    }
}

impl<T: Item> Queue<T> {
    fn push(&self, item: T) -> (u64, oneshot::Receiver<Outcome<T>>) {
        let (answer, outcome) = oneshot::channel();
        let mut inner = self.lock();
        // Statements whose callers left (their time-out fired) go now, not
        // at the next batch: while the database hangs no batch is taken,
        // and callers leave in the order they came.
        while inner.waiting.front().is_some_and(|w| w.answer.is_closed()) {
            inner.waiting.pop_front();
        }
        let id = inner.next;
        inner.next = id.wrapping_add(1);
        inner.waiting.push_back(Waiting { id, item, answer });
        (id, outcome)
    }

    /// Takes the statement `id` out of the queue; false if a batch took it
    /// already (its outcome then comes from that batch).
    fn withdraw(&self, id: u64) -> bool {
        let mut inner = self.lock();
        let at = inner.waiting.iter().position(|w| w.id == id);
        at.and_then(|at| inner.waiting.remove(at)).is_some()
    }

    /// The next batch: the oldest statements whose callers still wait, one
    /// per key, within [`MAX_ITEMS`] and [`MAX_BYTES`]; the rest stay
    /// queued, in order. Sorted by key.
    fn take(&self) -> Vec<Waiting<T>> {
        let mut inner = self.lock();
        let waiting = &mut inner.waiting;
        let mut batch: Vec<Waiting<T>> = Vec::new();
        let mut left = VecDeque::new();
        let mut bytes = 0;
        while let Some(next) = waiting.pop_front() {
            if next.answer.is_closed() {
                continue;
            }
            let full = batch.len() == MAX_ITEMS
                || (!batch.is_empty() && bytes + next.item.weight() > MAX_BYTES);
            if full || batch.iter().any(|w| w.item.key() == next.item.key()) {
                left.push_back(next);
                if full {
                    break;
                }
                continue;
            }
            bytes += next.item.weight();
            batch.push(next);
        }
        left.append(waiting);
        *waiting = left;
        drop(inner);
        batch.sort_unstable_by(|a, b| a.item.key().cmp(b.item.key()));
        batch
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<T>> {
        // Nothing panics while holding it; a poisoned queue is still whole.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Runs `item` in a batch of the statements queued with it (module docs),
/// a statement of `sql`'s. Not bounded in time: the caller bounds it.
pub(super) async fn submit<T: Item>(
    pool: &Pool,
    queue: &Queue<T>,
    item: T,
    sql: &Arc<Statements>,
    timeout: Duration,
) -> Answer<T> {
    loop {
        let (id, mut outcome) = queue.push(item.clone());
        let outcome = loop {
            tokio::select! {
                biased;
                outcome = &mut outcome => break outcome,
                conn = hot::take(pool) => match conn {
                    Ok(conn) => {
                        let batch = queue.take();
                        if batch.is_empty() {
                            // Another caller took this statement: its
                            // outcome comes from there.
                            drop(conn);
                            break (&mut outcome).await;
                        }
                        if batch.len() == 1 && batch[0].id == id {
                            // Its own statement alone: run here, no other
                            // caller depends on it.
                            run_batch(conn, batch, Arc::clone(sql), timeout).await;
                        } else {
                            // A task of its own: the batch is everyone's,
                            // and must not end when this caller leaves.
                            tokio::spawn(run_batch(conn, batch, Arc::clone(sql), timeout));
                        }
                    }
                    Err(e) => {
                        if queue.withdraw(id) {
                            return Err(store_error(e, timeout));
                        }
                        // A batch has it: its outcome is the answer.
                        break (&mut outcome).await;
                    }
                },
            }
        };
        match outcome {
            Ok(Outcome::Answer(answer)) => return answer,
            Ok(Outcome::Alone) => return run_alone(pool, &item, sql, timeout).await,
            // Its batch was dropped midway (its runtime is shutting down,
            // or it ran past the time-out): queue it again (module docs).
            Err(_) => {}
        }
    }
}

/// Runs `batch` on `conn`, within `timeout`, and answers its callers.
async fn run_batch<T: Item>(
    conn: hot::Taken,
    batch: Vec<Waiting<T>>,
    sql: Arc<Statements>,
    timeout: Duration,
) {
    // Past the time-out, every caller has given up; the connection, cut
    // off mid-statement, is closed when dropped (`hot.rs`).
    let _ = tokio::time::timeout(timeout, answer_batch(conn, batch, &sql, timeout)).await;
}

/// Runs `batch` on `conn` and answers its callers. A part the database
/// refuses with an error of its own is split in halves until the key
/// that it refuses stands alone.
async fn answer_batch<T: Item>(
    mut conn: hot::Taken,
    batch: Vec<Waiting<T>>,
    sql: &Statements,
    timeout: Duration,
) {
    let (items, mut answers): (Vec<T>, Vec<_>) =
        batch.into_iter().map(|w| (w.item, Some(w.answer))).unzip();
    let lock_wait = (items.len() > 1).then_some(LOCK_WAIT);
    let mut parts: Vec<Range<usize>> = Vec::with_capacity(8);
    parts.push(0..items.len());
    while let Some(part) = parts.pop() {
        conn.clean = false;
        let result = T::run(&mut conn.raw, sql, &items[part.clone()], lock_wait).await;
        match result {
            Ok(outs) => {
                conn.clean = true;
                for (answer, out) in answers[part].iter_mut().zip(outs) {
                    send(answer, Outcome::Answer(out));
                }
            }
            Err(sqlx::Error::Database(db)) if !statement_timed_out(&*db) && !hot::fatal(&*db) => {
                // The server answered: the connection is fine.
                conn.clean = true;
                if part.len() > 1 {
                    let mid = part.start + part.len() / 2;
                    parts.push(mid..part.end);
                    parts.push(part.start..mid);
                } else if db.code().as_deref() == Some(LOCK_NOT_AVAILABLE) {
                    send(&mut answers[part.start], Outcome::Alone);
                } else {
                    let e = sqlx::Error::Database(db);
                    send(
                        &mut answers[part.start],
                        Outcome::Answer(Err(store_error(e, timeout))),
                    );
                }
            }
            Err(e) => {
                // The connection's error (or the statement's time-out):
                // every caller not yet answered gets it.
                let e = Arc::new(e);
                for answer in &mut answers {
                    send(
                        answer,
                        Outcome::Answer(Err(shared_store_error(&e, timeout))),
                    );
                }
                hot::give_back(conn, &e);
                return;
            }
        }
    }
}

/// Answers a caller once (a caller that left is not told).
fn send<T: Item>(answer: &mut Option<oneshot::Sender<Outcome<T>>>, outcome: Outcome<T>) {
    if let Some(answer) = answer.take() {
        let _ = answer.send(outcome);
    }
}

/// Runs `item` alone on a connection of `pool`, waiting for row locks as
/// the session does.
async fn run_alone<T: Item>(
    pool: &Pool,
    item: &T,
    sql: &Statements,
    timeout: Duration,
) -> Answer<T> {
    let result = hot::on_connection(pool, async |conn| {
        T::run(conn, sql, std::slice::from_ref(item), None).await
    })
    .await;
    match result {
        Ok(mut outs) => outs
            .pop()
            .unwrap_or_else(|| Err(Corruption::new("a statement gave no outcome").into())),
        Err(e) => Err(store_error(e, timeout)),
    }
}

/// PostgreSQL's `lock_not_available`: the batch's `lock_timeout` fired.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// A reserve (protocol §3.6) waiting for its batch.
#[derive(Clone)]
pub(super) struct Reserve {
    pub(super) key: StoreKey,
    pub(super) token: Token,
    pub(super) fingerprint: Fingerprint,
    pub(super) lease: Duration,
}

impl Item for Reserve {
    type Out = Reservation;

    fn key(&self) -> &str {
        self.key.as_str()
    }

    fn weight(&self) -> usize {
        0
    }

    async fn run(
        conn: &mut PgConnection,
        sql: &Statements,
        items: &[Self],
        lock_wait: Option<&str>,
    ) -> Result<Vec<Answer<Self>>, sqlx::Error> {
        if let ([item], None) = (items, lock_wait) {
            // A batch of one: the single statement, cheaper to send,
            // plan and read than arrays of one.
            let row = sql
                .reserve_one(&item.key, item.token, item.fingerprint, item.lease)
                .fetch_one(conn)
                .await?;
            return Ok(vec![row::reservation(
                &row,
                item.token,
                item.fingerprint,
                item.lease,
            )]);
        }
        reserve(conn, &sql.reserve_many, items, lock_wait).await
    }
}

/// Runs `items` as `reserve_many.sql` (`sql`).
async fn reserve(
    conn: &mut PgConnection,
    sql: &str,
    items: &[Reserve],
    lock_wait: Option<&str>,
) -> Result<Vec<Answer<Reserve>>, sqlx::Error> {
    let tokens: Vec<[u8; 16]> = items
        .iter()
        .map(|i| i.token.as_u128().to_be_bytes())
        .collect();
    let rows = sqlx::query(sql)
        .bind(items.iter().map(Item::key).collect::<Vec<_>>())
        .bind(tokens.iter().map(|t| &t[..]).collect::<Vec<_>>())
        .bind(
            items
                .iter()
                .map(|i| &i.fingerprint.0[..])
                .collect::<Vec<_>>(),
        )
        .bind(items.iter().map(|i| micros(i.lease)).collect::<Vec<_>>())
        .bind(lock_wait)
        .fetch_all(conn)
        .await?;
    Ok(items
        .iter()
        .zip(&tokens)
        .map(|(item, token)| {
            let row = of_key(&rows, item.key())?
                .ok_or_else(|| Corruption::new("reserve returned no row for a key"))?;
            let stored: &[u8] = row::column(row, "token")?;
            row::reservation_of(
                row,
                stored == &token[..],
                item.token,
                item.fingerprint,
                item.lease,
            )
        })
        .collect())
}

/// A complete (protocol §3.9) waiting for its batch.
#[derive(Clone)]
pub(super) struct Complete {
    pub(super) key: StoreKey,
    pub(super) token: Token,
    pub(super) record: Arc<CompletedRecord>,
    pub(super) retention: Duration,
}

impl Item for Complete {
    /// Whether its guard held.
    type Out = bool;

    fn key(&self) -> &str {
        self.key.as_str()
    }

    fn weight(&self) -> usize {
        self.record.response.weight()
    }

    async fn run(
        conn: &mut PgConnection,
        sql: &Statements,
        items: &[Self],
        lock_wait: Option<&str>,
    ) -> Result<Vec<Answer<Self>>, sqlx::Error> {
        if let ([item], None) = (items, lock_wait) {
            // A batch of one: the single statement (see `Reserve`).
            let row = sql
                .complete_one(&item.key, item.token, &item.record.response, item.retention)
                .fetch_one(conn)
                .await?;
            return Ok(vec![row::flag(&row, "held")]);
        }
        complete(conn, &sql.complete_many, &sql.channel, items, lock_wait).await
    }
}

/// Runs `items` as `complete_many.sql` (`sql`), notifying on `channel`.
async fn complete(
    conn: &mut PgConnection,
    sql: &str,
    channel: &str,
    items: &[Complete],
    lock_wait: Option<&str>,
) -> Result<Vec<Answer<Complete>>, sqlx::Error> {
    let count =
        |n: usize| i32::try_from(n).map_err(|_| sqlx::Error::Protocol("over 2³¹ headers".into()));
    let mut names: Vec<&str> = Vec::new();
    let mut values: Vec<&[u8]> = Vec::new();
    let (mut first, mut counts) = (Vec::new(), Vec::new());
    for item in items {
        let headers = &item.record.response.headers;
        first.push(count(names.len() + 1)?);
        counts.push(count(headers.len())?);
        names.extend(headers.iter().map(|(n, _)| n.as_str()));
        values.extend(headers.iter().map(|(_, v)| &v[..]));
    }
    let tokens: Vec<[u8; 16]> = items
        .iter()
        .map(|i| i.token.as_u128().to_be_bytes())
        .collect();
    let rows = sqlx::query(sql)
        .bind(items.iter().map(Item::key).collect::<Vec<_>>())
        .bind(tokens.iter().map(|t| &t[..]).collect::<Vec<_>>())
        .bind(
            items
                .iter()
                .map(|i| i32::from(i.record.response.status))
                .collect::<Vec<_>>(),
        )
        .bind(first)
        .bind(counts)
        .bind(
            items
                .iter()
                .map(|i| &i.record.response.body[..])
                .collect::<Vec<_>>(),
        )
        .bind(
            items
                .iter()
                .map(|i| micros(i.retention))
                .collect::<Vec<_>>(),
        )
        .bind(names)
        .bind(values)
        .bind(channel)
        .bind(lock_wait)
        .fetch_all(conn)
        .await?;
    Ok(items
        .iter()
        .map(|item| Ok(of_key(&rows, item.key())?.is_some()))
        .collect())
}

/// The row of `rows` whose `key` is `key`.
fn of_key<'r>(rows: &'r [PgRow], key: &str) -> Result<Option<&'r PgRow>, StoreError> {
    for row in rows {
        let k: &str = row
            .try_get("key")
            .map_err(|e| Corruption::with_source("column key", e))?;
        if k == key {
            return Ok(Some(row));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A statement of the queue's tests: a key and a size.
    #[derive(Clone, Debug)]
    struct Probe(&'static str, usize);

    impl Item for Probe {
        type Out = ();

        fn key(&self) -> &str {
            self.0
        }

        fn weight(&self) -> usize {
            self.1
        }

        fn run(
            _: &mut PgConnection,
            _: &Statements,
            _: &[Self],
            _: Option<&str>,
        ) -> impl Future<Output = Result<Vec<Answer<Self>>, sqlx::Error>> + Send {
            std::future::ready(Ok(Vec::new()))
        }
    }

    fn keys(batch: &[Waiting<Probe>]) -> Vec<&'static str> {
        batch.iter().map(|w| w.item.0).collect()
    }

    #[test]
    fn a_batch_takes_one_statement_per_key_sorted_and_leaves_the_rest_in_order() {
        let queue = Queue::default();
        let _kept: Vec<_> = ["c", "a", "c", "b", "a", "d"]
            .into_iter()
            .map(|k| queue.push(Probe(k, 0)))
            .collect();
        assert_eq!(keys(&queue.take()), ["a", "b", "c", "d"]);
        assert_eq!(
            keys(&queue.take()),
            ["a", "c"],
            "the second of each key, next"
        );
        assert!(queue.take().is_empty());
    }

    #[test]
    fn a_batch_stops_at_its_bounds() {
        let queue = Queue::default();
        let names: Vec<&'static str> = (0..MAX_ITEMS + 3)
            .map(|i| &*Box::leak(format!("k{i:03}").into_boxed_str()))
            .collect();
        let _kept: Vec<_> = names.iter().map(|k| queue.push(Probe(k, 0))).collect();
        assert_eq!(queue.take().len(), MAX_ITEMS);
        assert_eq!(keys(&queue.take()), names[MAX_ITEMS..]);

        // Bytes: a first statement of any size goes, alone if need be.
        let _big = queue.push(Probe("big", MAX_BYTES + 1));
        let _small = queue.push(Probe("small", 1));
        assert_eq!(keys(&queue.take()), ["big"]);
        let _half = queue.push(Probe("half", MAX_BYTES / 2));
        let _other = queue.push(Probe("other", MAX_BYTES / 2 + 1));
        assert_eq!(keys(&queue.take()), ["half", "small"]);
        assert_eq!(keys(&queue.take()), ["other"]);
    }

    #[test]
    fn callers_that_left_are_skipped_and_a_taken_statement_cannot_be_withdrawn() {
        let queue = Queue::default();
        let (gone, outcome) = queue.push(Probe("gone", 0));
        drop(outcome);
        let (stays, _outcome) = queue.push(Probe("stays", 0));
        let (taken, _taken) = queue.push(Probe("taken", 0));
        assert!(queue.withdraw(stays), "still queued: withdrawn");
        assert!(!queue.withdraw(stays), "only once");
        assert_eq!(
            keys(&queue.take()),
            ["taken"],
            "the one that left is skipped"
        );
        assert!(!queue.withdraw(taken), "a batch has it");
        assert!(!queue.withdraw(gone));
        assert!(queue.take().is_empty());
    }

    #[test]
    fn statements_of_callers_that_left_do_not_pile_up_while_no_batch_is_taken() {
        let queue = Queue::default();
        for _ in 0..1000 {
            // Each caller gives up (its receiver dropped) before any batch.
            drop(queue.push(Probe("k", 100)));
        }
        assert_eq!(queue.lock().waiting.len(), 1, "only the newest is left");
        let (_, _waits) = queue.push(Probe("k", 100));
        assert_eq!(queue.lock().waiting.len(), 1);
        assert_eq!(keys(&queue.take()), ["k"]);
    }
}
