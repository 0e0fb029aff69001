//! The function-level API (protocol §8): [`Engine::once`] runs a closure at
//! most once per key and input and returns its stored result on every
//! repeat.
//!
//! The value is stored as JSON (see `value.rs`, shared with
//! `PostgresStore::transaction`, so either API replays the other's keys).
//! [`Once`] and [`OnceError`] are defined below the store for the same
//! reason and re-exported here.

use std::future::Future;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::engine::Engine;
use crate::fingerprint::Fingerprint;
use crate::job::JobError;
use crate::key::StoreKey;
use crate::policy::Rules;
use crate::store::Store;

pub use crate::value::{Once, OnceError};

impl<S: Store> Engine<S> {
    /// Function-level API (protocol §8): runs `f` at most once per `key` and
    /// `fingerprint` and returns its stored result on every repeat.
    ///
    /// `Ok` results are stored (as JSON) for `rules.retention`; an `Err`
    /// releases the key so a retry runs `f` again. Every run is counted as
    /// a job attempt ([`Engine::status`]); to store a permanent failure
    /// instead of releasing, use [`Engine::once_job`].
    ///
    /// `rules.concurrent` decides what a call racing a run in progress
    /// gets: under [`Rules::wait`] (what queue consumers want) it waits for
    /// that run's result and returns it; under [`Rules::default`]
    /// (`reject`) it gets [`OnceError::InProgress`] at once.
    ///
    /// A call dropped while `f` runs (a caller's time-out or `select!`),
    /// or an `f` that panics, may have had its effect: the key is then
    /// held until `rules.lease` runs out (or released, if
    /// `rules.ambiguous` is `release`), never simply freed (protocol §3.8).
    ///
    /// ```
    /// use idem::{Engine, Fingerprint, MemoryStore, OnceError, Rules, Scope, StoreKey};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let engine = Engine::new(MemoryStore::new());
    /// let key = StoreKey::new(&Scope::named("jobs"), "job-7");
    /// let job = Fingerprint::of_bytes(b"send welcome mail to 7");
    /// let send = || async {
    ///     tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    ///     Ok::<_, std::io::Error>(String::from("sent"))
    /// };
    ///
    /// // Two deliveries racing, under `wait`: one send, one answer.
    /// let wait = Rules::wait();
    /// let (a, b) = tokio::join!(
    ///     engine.once(&key, job, &wait, send),
    ///     engine.once(&key, job, &wait, send),
    /// );
    /// assert!(a.unwrap().replayed != b.unwrap().replayed);
    ///
    /// // Under the default (`reject`), a racing delivery is turned away.
    /// let other = StoreKey::new(&Scope::named("jobs"), "job-8");
    /// let reject = Rules::default();
    /// let (a, b) = tokio::join!(
    ///     engine.once(&other, job, &reject, send),
    ///     engine.once(&other, job, &reject, send),
    /// );
    /// assert!(a.is_ok() && matches!(b, Err(OnceError::InProgress { .. })));
    /// # }
    /// ```
    pub async fn once<T, E, F, Fut>(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        rules: &Rules,
        f: F,
    ) -> Result<Once<T>, OnceError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.run_job(
            key,
            fingerprint,
            rules,
            |_: &E| None,
            move |_attempt| {
                let run = f();
                async move { run.await.map_err(JobError::Transient) }
            },
        )
        .await
    }
}
