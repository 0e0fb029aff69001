//! idem makes non-idempotent operations safe to retry and safe to race.
//!
//! A user double-clicks "Pay", a client retries after a time-out, a queue
//! redelivers a job, two tabs submit at once: whatever the timing and however
//! many instances serve the traffic, the side effect happens **once** and
//! every caller gets the **same answer**. idem does it with one atomic
//! reservation per key, a fenced completion, and replay of the stored answer.
//!
//! # Layout
//!
//! Imports run downward only: [`layer`] and [`once`] → [`engine`] →
//! [`store`] → everything below it. A backend never imports the engine.
//!
//! - [`layer`]: a `tower::Layer` for axum and hyper services (feature `tower`).
//! - [`once`]: the function-level API, [`Engine::once`] (SPEC §8).
//! - [`engine`]: the algorithm (SPEC §3, §5, §6): [`Engine::run`] and waiting
//!   in `engine/mod.rs`, single-flight waiters in `engine/flight.rs`, the
//!   lease guard, heartbeat and fenced completion in `engine/lease.rs`,
//!   counters in `engine/metrics.rs`.
//! - [`store`]: the atomic [`Store`] trait, [`Reservation`](store::Reservation)
//!   and the [`Decision`](store::Decision) it leads to, the
//!   [`MemoryStore`](store::memory::MemoryStore), (feature `redis`) the
//!   `RedisStore` and (feature `postgres`) the `PostgresStore` with its
//!   transactional API in `store/postgres/` (SPEC §7).
//! - [`policy`]: per-route settings, the route table that picks them, and the
//!   per-call [`Rules`] (SPEC §12).
//! - [`record`]: what the store keeps (SPEC §2).
//! - [`key`]: the `Idempotency-Key` header, scopes and storage keys (SPEC §3.2–3).
//! - [`fingerprint`]: what makes a request *this* request (SPEC §3.4).
//! - [`path`]: the one normal form of a request path (matching, fingerprint, forwarding).
//! - [`problem`]: the errors idem returns, as `application/problem+json` (SPEC §4).
//! - [`error`]: [`StoreError`], the store failures, as types.
//! - `value.rs`: how the function-level APIs store a value (JSON) and their
//!   results, [`Once`] and [`OnceError`], shared by [`Engine::once`] and
//!   `PostgresStore::transaction`.
//! - `hash.rs`: the hashing both the key and the fingerprint use.
//!
//! # Example: run a job at most once
//!
//! ```
//! use idem::{Engine, Fingerprint, Rules, Scope, StoreKey, store::memory::MemoryStore};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let engine = Engine::new(MemoryStore::new());
//! let key = StoreKey::new(&Scope::named("tenant-42"), "order-1001");
//! let input = Fingerprint::of_bytes(b"charge 10 EUR");
//! let rules = Rules::default();
//!
//! let first = engine
//!     .once(&key, input, &rules, || async { Ok::<_, std::io::Error>(7_u32) })
//!     .await
//!     .unwrap();
//! let again = engine
//!     .once(&key, input, &rules, || async { Ok::<_, std::io::Error>(8_u32) })
//!     .await
//!     .unwrap();
//! assert_eq!((first.value, first.replayed), (7, false));
//! assert_eq!((again.value, again.replayed), (7, true)); // the closure did not run
//! # }
//! ```
//!
//! # Features
//!
//! - `memory` (default): the in-process [`MemoryStore`](store::memory::MemoryStore).
//! - `tower` (default): [`layer::IdempotencyLayer`].
//! - `redis`: [`RedisStore`](store::redis::RedisStore), for many instances
//!   sharing one Redis or Redis Cluster (needs Rust 1.88, the `redis` crate's
//!   minimum).
//! - `postgres`: `store::postgres::PostgresStore` (sqlx, Tokio; no TLS):
//!   records in PostgreSQL, LISTEN/NOTIFY for waiters, and
//!   `PostgresStore::transaction`, which commits a business effect and its
//!   idempotency record in ONE transaction. See `docs/postgres.md`.
//!
//! # Guarantees
//!
//! - Reservation is ONE atomic store operation: N concurrent identical calls
//!   run the operation once.
//! - The result is stored *before* the caller gets it (no fire-and-forget).
//! - `complete` and `release` are fenced by a random token: a holder whose
//!   lease was taken over cannot overwrite the new holder's record.
//! - A live operation keeps its lease by heartbeat; a dead holder's lease
//!   runs out and the key frees itself.

pub mod engine;
pub mod error;
pub mod fingerprint;
mod hash;
pub mod key;
#[cfg(feature = "tower")]
pub mod layer;
pub mod once;
pub mod path;
pub mod policy;
pub mod problem;
pub mod record;
pub mod store;
mod value;

pub use engine::{Action, Engine, EngineConfig, Finish, Outcome};
pub use error::StoreError;
pub use fingerprint::Fingerprint;
pub use key::{IdempotencyKey, LogId, Scope, StoreKey};
pub use once::{Once, OnceError};
pub use policy::{RoutePolicy, RouteTable, Rules};
pub use record::{CompletedRecord, Record, StoredResponse, Token};
pub use store::Store;
