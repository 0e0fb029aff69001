//! idem makes non-idempotent operations safe to retry and safe to race.
//!
//! A user double-clicks "Pay", a client retries after a time-out, a queue
//! redelivers a job, two tabs submit at once: whatever the timing and however
//! many instances serve the traffic, the side effect happens **once** and
//! every caller gets the **same answer**. idem does it with one atomic
//! reservation per key, a fenced completion, and replay of the stored answer.
//!
//! Sections cited as `protocol §N` throughout the code are those of
//! `docs/protocol.md`, the behaviour contract.
//!
//! # Layout
//!
//! Imports run downward only: [`layer`], [`once`], [`job`] and [`asyncop`] →
//! [`engine`] → [`store`] → everything below it. A backend never imports
//! the engine.
//!
//! - [`layer`]: a `tower::Layer` for axum and hyper services (feature `tower`).
//! - [`asyncop`]: async mode (protocol §9): [`accept`](asyncop::accept),
//!   [`status`](asyncop::status) and the [`Dispatcher`](asyncop::Dispatcher)
//!   pool in `asyncop/dispatcher.rs`, the [`Upstream`](asyncop::Upstream)
//!   it calls and the retry schedule in `asyncop/upstream.rs`, its
//!   counters in `asyncop/metrics.rs`.
//! - [`once`]: the function-level API, [`Engine::once`] (protocol §8).
//! - [`job`]: jobs (protocol §13): [`Engine::once_job`] with the caller's
//!   transient/permanent [`JobError`], and [`Engine::status`] →
//!   [`JobStatus`]; the attempt traces behind them are in `store/job.rs`
//!   and each backend's `job.rs`.
//! - [`apply`]: the stale-event guard, [`Engine::apply_if_newer`]: an update
//!   runs only if its version is newer than its entity's (protocol §13).
//! - [`engine`]: the algorithm (protocol §3, §5, §6): [`Engine::run`] and waiting
//!   in `engine/mod.rs`, single-flight waiters in `engine/flight.rs`, the
//!   lease guard, heartbeat and fenced completion in `engine/lease.rs`,
//!   counters in `engine/metrics.rs`.
//! - [`store`]: the atomic [`Store`] trait, [`Reservation`](store::Reservation)
//!   and the [`Decision`](store::Decision) it leads to, async mode's
//!   [`Queue`] in `store/queue.rs`, the
//!   [`MemoryStore`], (feature `redis`) the
//!   `RedisStore` and (feature `postgres`) the `PostgresStore` with its
//!   transactional API in `store/postgres/` (protocol §7).
//! - [`policy`]: per-route settings, the route table that picks them, and the
//!   per-call [`Rules`] (protocol §12).
//! - [`record`]: what the store keeps (protocol §2).
//! - [`key`]: the `Idempotency-Key` header, scopes and storage keys (protocol §3.2–3).
//! - [`version`]: event versions, integers or RFC 3339 instants (protocol §13).
//! - [`fingerprint`]: what makes a request *this* request (protocol §3.4).
//! - [`path`]: the one normal form of a request path (matching, fingerprint, forwarding).
//! - [`problem`]: the errors idem returns, as `application/problem+json` (protocol §4).
//! - [`error`]: [`StoreError`], the store failures, as types.
//! - `value.rs`: how the function-level APIs store a value (JSON) and their
//!   results, [`Once`] and [`OnceError`], shared by [`Engine::once`] and
//!   `PostgresStore::transaction`.
//! - `hash.rs`: the hashing both the key and the fingerprint use.
//!
//! # Example: run a job at most once
//!
//! A queue redelivers a job, or several workers pick it up at once: under
//! [`Rules::wait`] the one execution's result reaches every delivery.
//! (Under [`Rules::default`], `concurrent = reject`, a delivery racing the
//! first run gets [`OnceError::InProgress`] and must retry on its own.)
//!
//! ```
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use idem::{Engine, Fingerprint, MemoryStore, Rules, Scope, StoreKey};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let engine = Engine::new(MemoryStore::new());
//! let key = StoreKey::new(&Scope::named("tenant-42"), "order-1001");
//! let input = Fingerprint::of_bytes(b"charge 10 EUR");
//! let rules = Rules::wait(); // concurrent duplicates wait for the result
//! let charges = AtomicU32::new(0);
//!
//! let charge = || async {
//!     let n = charges.fetch_add(1, Ordering::SeqCst) + 1;
//!     tokio::time::sleep(std::time::Duration::from_millis(20)).await;
//!     Ok::<_, std::io::Error>(format!("charge #{n}"))
//! };
//! // Four deliveries of the same job, racing.
//! let (a, b, c, d) = tokio::join!(
//!     engine.once(&key, input, &rules, charge),
//!     engine.once(&key, input, &rules, charge),
//!     engine.once(&key, input, &rules, charge),
//!     engine.once(&key, input, &rules, charge),
//! );
//! assert_eq!(charges.load(Ordering::SeqCst), 1); // charged once
//! for delivery in [a, b, c, d] {
//!     assert_eq!(delivery.unwrap().value, "charge #1"); // the same answer
//! }
//! // A redelivery tomorrow replays the stored answer.
//! let again = engine.once(&key, input, &rules, charge).await.unwrap();
//! assert_eq!((again.value.as_str(), again.replayed), ("charge #1", true));
//! # }
//! ```
//!
//! Every other setting has a builder: [`RoutePolicy::builder`], then
//! `Rules::from(&policy)`.
//!
//! # Features
//!
//! - `memory` (default): the in-process [`MemoryStore`].
//! - `tower` (default): [`layer::IdempotencyLayer`].
//! - `redis`: [`RedisStore`](store::redis::RedisStore), for many instances
//!   sharing one Redis or Redis Cluster (needs Rust 1.88, the `redis` crate's
//!   minimum).
//! - `postgres`: `store::postgres::PostgresStore` (sqlx, Tokio):
//!   records in PostgreSQL, LISTEN/NOTIFY for waiters, and
//!   `PostgresStore::transaction`, which commits a business effect and its
//!   idempotency record in ONE transaction. See `docs/postgres.md`.
//! - `tls`: TLS to the stores with rustls (ring; never OpenSSL):
//!   `rediss://` URLs (standalone and Cluster) and PostgreSQL's `sslmode` /
//!   `sslrootcert` URL parameters, checked against the system's roots or a
//!   CA given with `ConnectOptions::tls_ca`. Without it, `rediss://` and
//!   `sslmode=require` fail to connect.
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

pub mod apply;
pub mod asyncop;
pub mod engine;
pub mod error;
pub mod fingerprint;
mod hash;
pub mod job;
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
pub mod version;

pub use engine::{Action, Engine, EngineConfig, Finish, Outcome};
pub use error::StoreError;
pub use fingerprint::Fingerprint;
pub use job::{JobError, JobFailure, JobStatus};
pub use key::{IdempotencyKey, LogId, Scope, StoreKey};
#[cfg(feature = "tower")]
pub use layer::IdempotencyLayer;
pub use once::{Once, OnceError};
pub use policy::{
    Ambiguous, Concurrent, FailMode, KeyPolicy, RoutePolicy, RoutePolicyBuilder, RouteTable, Rules,
};
pub use record::{CompletedRecord, Record, StoredResponse, Token};
#[cfg(feature = "memory")]
pub use store::memory::MemoryStore;
pub use store::{Queue, Store, VersionStore};
pub use version::Version;
