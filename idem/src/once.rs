//! The function-level API (SPEC §8): [`Engine::once`] runs a closure at
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

use crate::engine::{Action, Engine, Finish, Outcome};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::policy::Rules;
use crate::store::Store;
use crate::value::{decode_value, encode_value};

pub use crate::value::{Once, OnceError};

impl<S: Store> Engine<S> {
    /// Function-level API (SPEC §8): runs `f` at most once per `key` and
    /// `fingerprint` and returns its stored result on every repeat.
    ///
    /// `Ok` results are stored (as JSON) for `rules.retention`; an `Err`
    /// releases the key so a retry runs `f` again.
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
        let outcome = self
            .run(key, fingerprint, rules, || async {
                match f().await {
                    Ok(value) => match encode_value(&value) {
                        Ok(response) => Finish {
                            action: Action::Store(response),
                            output: Ok(value),
                        },
                        Err(e) => Finish {
                            output: Err(OnceError::Encode(e)),
                            action: Action::Release,
                        },
                    },
                    Err(e) => Finish {
                        output: Err(OnceError::Failed(e)),
                        action: Action::Release,
                    },
                }
            })
            .await;
        match outcome {
            Outcome::Executed(r) | Outcome::Bypassed(r) => r.map(|value| Once {
                value,
                replayed: false,
            }),
            Outcome::Replayed(record) => decode_value(&record),
            Outcome::InProgress { retry_after } => Err(OnceError::InProgress { retry_after }),
            Outcome::Mismatch => Err(OnceError::Mismatch),
            Outcome::StoreUnavailable { error } => Err(OnceError::Store(error)),
        }
    }
}
