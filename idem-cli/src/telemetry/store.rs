//! One span per store call (protocol §14), at one place: a [`Store`] that
//! wraps the engine's.
//!
//! Each span is named `store.<call>` and carries the key's log id (never the
//! key) and the call's outcome (`acquired`, `in_flight`, `completed`,
//! `mismatch`, `held`, `lost`, `found`, `none`, `purged`, `subscribed`, or
//! `error`). Without export, a call goes straight to the inner store: no
//! span, no hash.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::either::Either;
use tracing::field::Empty;
use tracing::Instrument;

use idem::record::{CompletedRecord, Record, Token};
use idem::store::{
    Attempts, Fence, Reservation, Store, StoreError, Subscription, VersionBegin, VersionStore,
};
use idem::{Fingerprint, StoreKey, Version};

use super::exporting;

/// A [`Store`] whose calls are spans when traces are exported.
#[derive(Debug, Clone)]
pub struct TracedStore<S> {
    inner: S,
}

impl<S> TracedStore<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

/// `call`, inside a span when traces are exported. Not an `async fn`:
/// one would hold `call` twice (the argument, then the awaited copy),
/// doubling the size of every store call's future on the hot path.
fn traced<T>(
    name: &'static str,
    key: &StoreKey,
    call: impl Future<Output = Result<T, StoreError>> + Send,
    outcome: fn(&T) -> &'static str,
) -> impl Future<Output = Result<T, StoreError>> + Send {
    if !exporting() {
        return Either::Left(call);
    }
    let span = tracing::info_span!(
        "store",
        otel.name = name,
        key = %key.log_id(),
        outcome = Empty,
        otel.status_code = Empty,
        error = Empty,
    );
    Either::Right(Box::pin(async move {
        let r = call.instrument(span.clone()).await;
        match &r {
            Ok(v) => {
                span.record("outcome", outcome(v));
            }
            Err(e) => {
                span.record("outcome", "error");
                span.record("otel.status_code", "ERROR");
                span.record("error", tracing::field::display(e));
            }
        }
        r
    }))
}

fn fence(f: &Fence) -> &'static str {
    match f {
        Fence::Held => "held",
        Fence::Lost => "lost",
    }
}

impl<S: Store> Store for TracedStore<S> {
    fn reserve(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Reservation, StoreError>> + Send {
        traced(
            "store.reserve",
            key,
            self.inner.reserve(key, fingerprint, lease),
            |r| match r {
                Reservation::Acquired(_) => "acquired",
                Reservation::InFlight { .. } => "in_flight",
                Reservation::Completed(_) => "completed",
                Reservation::Mismatch => "mismatch",
            },
        )
    }

    fn complete(
        &self,
        key: &StoreKey,
        token: Token,
        record: Arc<CompletedRecord>,
        retention: Duration,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send {
        traced(
            "store.complete",
            key,
            self.inner.complete(key, token, record, retention),
            fence,
        )
    }

    fn release(
        &self,
        key: &StoreKey,
        token: Token,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send {
        traced("store.release", key, self.inner.release(key, token), fence)
    }

    fn extend(
        &self,
        key: &StoreKey,
        token: Token,
        lease: Duration,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send {
        traced(
            "store.extend",
            key,
            self.inner.extend(key, token, lease),
            fence,
        )
    }

    fn get(
        &self,
        key: &StoreKey,
    ) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send {
        traced("store.get", key, self.inner.get(key), |r| match r {
            Some(_) => "found",
            None => "none",
        })
    }

    fn purge(&self, key: &StoreKey) -> impl Future<Output = Result<bool, StoreError>> + Send {
        traced("store.purge", key, self.inner.purge(key), |purged| {
            if *purged {
                "purged"
            } else {
                "none"
            }
        })
    }

    fn subscribe(
        &self,
        key: &StoreKey,
    ) -> impl Future<Output = Result<Subscription, StoreError>> + Send {
        traced("store.subscribe", key, self.inner.subscribe(key), |_| {
            "subscribed"
        })
    }

    // The job bookkeeping has defaults that keep nothing: a wrapper must
    // forward it, or the admin listener would show no job's status.
    fn begin_attempt(
        &self,
        key: &StoreKey,
        keep: Duration,
    ) -> impl Future<Output = Result<u32, StoreError>> + Send {
        traced(
            "store.begin_attempt",
            key,
            self.inner.begin_attempt(key, keep),
            |_| "counted",
        )
    }

    fn end_attempt(
        &self,
        key: &StoreKey,
        attempt: u32,
        error: Option<&str>,
        keep: Duration,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send {
        traced(
            "store.end_attempt",
            key,
            self.inner.end_attempt(key, attempt, error, keep),
            fence,
        )
    }

    fn attempts(
        &self,
        key: &StoreKey,
    ) -> impl Future<Output = Result<Option<Attempts>, StoreError>> + Send {
        traced("store.attempts", key, self.inner.attempts(key), |a| {
            if a.is_some() {
                "found"
            } else {
                "none"
            }
        })
    }
}

impl<S: VersionStore> VersionStore for TracedStore<S> {
    fn begin_version(
        &self,
        entity: &StoreKey,
        version: Version,
        lease: Duration,
    ) -> impl Future<Output = Result<VersionBegin, StoreError>> + Send {
        traced(
            "store.begin_version",
            entity,
            self.inner.begin_version(entity, version, lease),
            |b| match b {
                VersionBegin::Acquired(_) => "acquired",
                VersionBegin::Stale { .. } => "stale",
                VersionBegin::InFlight { .. } => "in_flight",
                VersionBegin::Mixed { .. } => "mixed",
            },
        )
    }

    fn commit_version(
        &self,
        entity: &StoreKey,
        token: Token,
        version: Version,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send {
        traced(
            "store.commit_version",
            entity,
            self.inner.commit_version(entity, token, version),
            fence,
        )
    }

    fn abort_version(
        &self,
        entity: &StoreKey,
        token: Token,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send {
        traced(
            "store.abort_version",
            entity,
            self.inner.abort_version(entity, token),
            fence,
        )
    }

    fn extend_version(
        &self,
        entity: &StoreKey,
        token: Token,
        lease: Duration,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send {
        traced(
            "store.extend_version",
            entity,
            self.inner.extend_version(entity, token, lease),
            fence,
        )
    }

    fn current_version(
        &self,
        entity: &StoreKey,
    ) -> impl Future<Output = Result<Option<Version>, StoreError>> + Send {
        traced(
            "store.current_version",
            entity,
            self.inner.current_version(entity),
            |v| if v.is_some() { "found" } else { "none" },
        )
    }
}
