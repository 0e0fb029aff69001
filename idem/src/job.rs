//! Jobs (protocol §13): where a job stands ([`Engine::status`]) and the
//! caller's classification of a failed run ([`Engine::once_job`],
//! [`JobError`]).
//!
//! A job is a key run through [`Engine::once`] or [`Engine::once_job`]
//! (a queue message, a webhook, a scheduled task). Besides the key's record,
//! which guarantees one execution, the store keeps a small *trace* per job
//! (`store/job.rs`): how many runs of the closure have started, whether one
//! is running, and why the last transient failure happened. The trace lives
//! beside the record, never in it, so `release` (which deletes the record)
//! keeps the count, and the HTTP path (reserve, complete) never touches it.
//!
//! - Every run counts, the first included: the holder of the reservation
//!   counts its run in ONE atomic store step before calling the closure,
//!   and the closure of [`Engine::once_job`] is told its attempt number.
//! - A **transient** failure ([`JobError::Transient`], and every error of
//!   [`Engine::once`]) releases the key: the next delivery runs the closure
//!   again, as attempt n + 1; the error's text is kept in the trace.
//! - A **permanent** failure ([`JobError::Permanent`]) is stored as the
//!   key's answer, for the retention: every later delivery gets the same
//!   [`OnceError::Permanent`] without running the closure.
//!
//! The failure text is the error's `Display`, cut to
//! [`MAX_ERROR_BYTES`](crate::store::MAX_ERROR_BYTES): it is shown to
//! operators (admin inspect), so it must not carry secrets; idem never puts
//! the key, the scope or any header in it.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::engine::{Action, Engine, Finish, Outcome};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::policy::Rules;
use crate::record::Record;
use crate::store::job::bound_error;
use crate::store::{Attempts, Store, StoreError};
use crate::value::{decode_failure, decode_value, encode_failure, encode_value};

pub use crate::value::{JobFailure, Once, OnceError};

/// How a job's run failed, by the caller's classification (protocol §13):
/// what [`Engine::once_job`]'s closure returns as its error.
///
/// `?` on any `Result<_, E>` inside the closure gives a transient error
/// (`From<E>`); say `.map_err(JobError::Permanent)?` for a failure that
/// no redelivery can fix.
#[derive(Debug)]
pub enum JobError<E> {
    /// Worth another try (a timeout, a 503, a lost connection): the key is
    /// released, and the next delivery runs the closure again.
    Transient(E),
    /// No retry can succeed (invalid input, a refused card): the failure
    /// is stored, and every later delivery gets it without running the
    /// closure.
    Permanent(E),
}

impl<E> From<E> for JobError<E> {
    fn from(e: E) -> Self {
        Self::Transient(e)
    }
}

/// Where a job stands (protocol §13): what [`Engine::status`] answers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobStatus {
    /// No record and no trace: never run, or forgotten (retention over,
    /// purged).
    NotSeen,
    /// A run holds the key.
    Running {
        /// Its attempt number (1 for the first run).
        attempt: u32,
        /// When it took the key.
        since: SystemTime,
    },
    /// The last run failed transiently (or its holder died and its lease
    /// ran out) and released the key: the next delivery runs attempt
    /// `attempts + 1`.
    Released {
        /// Runs so far.
        attempts: u32,
        /// Why the last run failed, if it said so.
        last_error: Option<String>,
    },
    /// Done: the result is stored and replayed to every delivery.
    Done {
        /// When it completed.
        at: SystemTime,
    },
    /// Failed permanently: the failure is stored and replayed to every
    /// delivery.
    Failed {
        /// Runs, the failing one included.
        attempts: u32,
        /// The failure's text.
        last_error: String,
    },
}

impl JobStatus {
    /// The status that a key's record and its job trace (as the store
    /// returns them) add up to. A completed record decides alone; a live
    /// reservation is a run whose number is the trace's (or the next one,
    /// if the holder has not counted itself yet); with no record, the
    /// trace tells a released job from one never seen.
    #[must_use]
    pub fn from_parts(record: Option<&Record>, trace: Option<&Attempts>) -> Self {
        match record {
            Some(Record::Completed(done)) => match decode_failure(done) {
                Some(f) => Self::Failed {
                    attempts: f.attempts,
                    last_error: f.last_error,
                },
                None => Self::Done {
                    at: done.completed_at,
                },
            },
            Some(Record::InFlight {
                lease_remaining,
                started_at,
                ..
            }) if !lease_remaining.is_zero() => Self::Running {
                attempt: match trace {
                    Some(t) if t.running => t.count.max(1),
                    Some(t) => t.count.saturating_add(1),
                    None => 1,
                },
                since: *started_at,
            },
            _ => match trace {
                Some(t) if t.count > 0 => Self::Released {
                    attempts: t.count,
                    last_error: t.last_error.clone(),
                },
                _ => Self::NotSeen,
            },
        }
    }
}

/// How a run ended, inside [`Engine::run`]'s output.
enum Ended<E> {
    Transient(E),
    Permanent(JobFailure),
    Encode(serde_json::Error),
}

impl<S: Store> Engine<S> {
    /// Where the job under `key` stands (protocol §13), so a redelivery
    /// can exit early and an operator can see it.
    ///
    /// Two reads (the record, then the job's trace), each one atomic
    /// store call; never from the local cache.
    ///
    /// ```
    /// use idem::{Engine, Fingerprint, JobError, JobStatus, MemoryStore, OnceError, Rules, Scope, StoreKey};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let engine = Engine::new(MemoryStore::new());
    /// let key = StoreKey::new(&Scope::named("jobs"), "charge-42");
    /// let job = Fingerprint::of_bytes(b"charge order 42");
    /// let rules = Rules::wait();
    /// assert_eq!(engine.status(&key).await.unwrap(), JobStatus::NotSeen);
    ///
    /// // The gateway timed out: worth another delivery.
    /// let r = engine
    ///     .once_job(&key, job, &rules, |_attempt| async {
    ///         Err::<u32, _>(JobError::Transient("payment gateway timed out"))
    ///     })
    ///     .await;
    /// assert!(matches!(r, Err(OnceError::Failed(_))));
    /// assert!(matches!(
    ///     engine.status(&key).await.unwrap(),
    ///     JobStatus::Released { attempts: 1, last_error: Some(_) }
    /// ));
    ///
    /// // The next delivery is attempt 2, and it works.
    /// let r = engine
    ///     .once_job(&key, job, &rules, |attempt| async move {
    ///         assert_eq!(attempt, 2);
    ///         Ok::<u32, JobError<&str>>(4200)
    ///     })
    ///     .await;
    /// assert_eq!(r.unwrap().value, 4200);
    /// assert!(matches!(engine.status(&key).await.unwrap(), JobStatus::Done { .. }));
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// When the store fails or does not answer within the store time-out.
    pub async fn status(&self, key: &StoreKey) -> Result<JobStatus, StoreError> {
        let record = self.inspect(key).await?;
        let trace = bounded(self.config().store_timeout, self.store().attempts(key)).await?;
        Ok(JobStatus::from_parts(record.as_ref(), trace.as_ref()))
    }

    /// [`Engine::once`] for jobs (protocol §13): runs `f` at most once per
    /// `key` and `fingerprint`, telling it its attempt number, and takes
    /// its classification of a failure.
    ///
    /// - `Ok(value)`: stored and replayed, as with [`Engine::once`].
    /// - `Err(`[`JobError::Transient`]`(e))`: the key is released; this
    ///   call returns [`OnceError::Failed`]`(e)`, and the next delivery
    ///   runs `f` again as the next attempt. `e`'s text is kept for
    ///   [`Engine::status`].
    /// - `Err(`[`JobError::Permanent`]`(e))`: `e`'s text is stored as the
    ///   key's answer for `rules.retention`; this call and every later
    ///   delivery return [`OnceError::Permanent`] with the same
    ///   [`JobFailure`], and `f` never runs again for the key.
    ///
    /// Attempts are counted by ONE extra store call per run, before `f`
    /// (and one more after a transient failure). Counting is bookkeeping,
    /// not the guarantee: if that call fails, `f` still runs (under the
    /// reservation, which is what makes it run once) and is told attempt 0.
    /// (Under `fail = open` with the store down, `f` runs unprotected and
    /// only after the counting call has failed too.)
    ///
    /// ```
    /// use idem::{Engine, Fingerprint, JobError, MemoryStore, OnceError, Rules, Scope, StoreKey};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let engine = Engine::new(MemoryStore::new());
    /// let key = StoreKey::new(&Scope::named("jobs"), "import-9");
    /// let job = Fingerprint::of_bytes(b"import file 9");
    /// let import = |_attempt: u32| async {
    ///     let rows: Result<u32, String> = Err("line 3: not CSV".into());
    ///     // A malformed file stays malformed: no redelivery can fix it.
    ///     let rows = rows.map_err(JobError::Permanent)?;
    ///     Ok::<u32, JobError<String>>(rows)
    /// };
    /// let first = engine.once_job(&key, job, &Rules::wait(), import).await;
    /// let again = engine.once_job(&key, job, &Rules::wait(), import).await;
    /// match (first, again) {
    ///     (Err(OnceError::Permanent(a)), Err(OnceError::Permanent(b))) => {
    ///         assert_eq!(a, b);
    ///         assert_eq!((a.attempts, a.last_error.as_str()), (1, "line 3: not CSV"));
    ///     }
    ///     other => panic!("{other:?}"),
    /// }
    /// # }
    /// ```
    pub async fn once_job<T, E, F, Fut>(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        rules: &Rules,
        f: F,
    ) -> Result<Once<T>, OnceError<E>>
    where
        T: Serialize + DeserializeOwned,
        E: Display,
        F: FnOnce(u32) -> Fut,
        Fut: Future<Output = Result<T, JobError<E>>>,
    {
        self.run_job(key, fingerprint, rules, |e: &E| Some(e.to_string()), f)
            .await
    }

    /// The one job runner behind [`Engine::once`] and [`Engine::once_job`];
    /// `describe` gives a failure's text (`once` has none: its errors need
    /// not be `Display`).
    pub(crate) async fn run_job<T, E, F, Fut>(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        rules: &Rules,
        describe: impl Fn(&E) -> Option<String>,
        f: F,
    ) -> Result<Once<T>, OnceError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(u32) -> Fut,
        Fut: Future<Output = Result<T, JobError<E>>>,
    {
        let keep = rules.retention;
        let outcome = self
            .run(key, fingerprint, rules, || async {
                let attempt = self.begin_attempt(key, keep).await;
                let (output, action) = match f(attempt).await {
                    Ok(value) => match encode_value(&value) {
                        Ok(response) => (Ok(value), Action::Store(response)),
                        Err(e) => (Err(Ended::Encode(e)), Action::Release),
                    },
                    Err(JobError::Transient(e)) => (Err(Ended::Transient(e)), Action::Release),
                    Err(JobError::Permanent(e)) => {
                        let failure = JobFailure {
                            attempts: attempt,
                            last_error: bound_error(&describe(&e).unwrap_or_default()),
                        };
                        match encode_failure(&failure) {
                            Ok(response) => {
                                (Err(Ended::Permanent(failure)), Action::Store(response))
                            }
                            Err(e) => (Err(Ended::Encode(e)), Action::Release),
                        }
                    }
                };
                Finish {
                    output: (attempt, output),
                    action,
                }
            })
            .await;
        let (name, attempt) = match &outcome {
            Outcome::Executed((attempt, Ok(_))) | Outcome::Bypassed((attempt, Ok(_))) => {
                (outcome.name(), Some(*attempt))
            }
            Outcome::Executed((attempt, Err(Ended::Permanent(_))))
            | Outcome::Bypassed((attempt, Err(Ended::Permanent(_)))) => {
                ("failed_permanently", Some(*attempt))
            }
            Outcome::Executed((attempt, Err(_))) | Outcome::Bypassed((attempt, Err(_))) => {
                ("failed", Some(*attempt))
            }
            other => (other.name(), None),
        };
        // The job's one line (protocol §13): the key as a short hash, never
        // itself; the caller's span carries its job id. `attempt` is absent
        // when this call ran nothing (a replay, a conflict, …).
        match attempt {
            Some(attempt) => tracing::info!(key = %key.log_id(), attempt, outcome = name, "job"),
            None => tracing::info!(key = %key.log_id(), outcome = name, "job"),
        }
        match outcome {
            Outcome::Executed((attempt, r)) | Outcome::Bypassed((attempt, r)) => match r {
                Ok(value) => Ok(Once {
                    value,
                    replayed: false,
                }),
                Err(Ended::Transient(e)) => {
                    let text = describe(&e).map(|t| bound_error(&t));
                    self.end_attempt(key, attempt, text.as_deref(), keep).await;
                    Err(OnceError::Failed(e))
                }
                Err(Ended::Encode(e)) => {
                    let text = bound_error(&format!("cannot encode the result: {e}"));
                    self.end_attempt(key, attempt, Some(&text), keep).await;
                    Err(OnceError::Encode(e))
                }
                Err(Ended::Permanent(failure)) => Err(OnceError::Permanent(failure)),
            },
            Outcome::Replayed(record) => decode_value(&record),
            Outcome::InProgress { retry_after } => Err(OnceError::InProgress { retry_after }),
            Outcome::Mismatch => Err(OnceError::Mismatch),
            Outcome::StoreUnavailable { error } => Err(OnceError::Store(error)),
        }
    }

    /// Counts a run (best effort: 0 when the count failed; logged).
    async fn begin_attempt(&self, key: &StoreKey, keep: Duration) -> u32 {
        let timeout = self.config().store_timeout;
        match bounded(timeout, self.store().begin_attempt(key, keep)).await {
            Ok(n) => n,
            Err(error) => {
                tracing::warn!(key = %key.log_id(), %error, "cannot count the job's attempt; running it uncounted");
                0
            }
        }
    }

    /// Marks run `attempt` ended (best effort; logged).
    async fn end_attempt(&self, key: &StoreKey, attempt: u32, error: Option<&str>, keep: Duration) {
        if attempt == 0 {
            return;
        }
        let timeout = self.config().store_timeout;
        if let Err(error) =
            bounded(timeout, self.store().end_attempt(key, attempt, error, keep)).await
        {
            tracing::warn!(key = %key.log_id(), %error, attempt, "cannot record the end of the job's attempt");
        }
    }
}

async fn bounded<T>(
    timeout: Duration,
    fut: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or(Err(StoreError::Timeout(timeout)))
}
