//! A [`Store`] for tests: a [`MemoryStore`] that counts its calls and fails
//! the ones it is told to, as an outage of the store would.
//!
//! Used where a real outage is costly to stage: the failure is exactly a
//! `StoreError::Unavailable`, which is what every backend reports when its
//! server is gone.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem::record::Record;
use idem::store::memory::MemoryStore;
use idem::store::{Fence, Reservation, Store, Subscription};
use idem::{CompletedRecord, Fingerprint, StoreError, StoreKey, Token};

/// Which calls fail, and how many of each were made.
#[derive(Debug, Default)]
pub struct Faults {
    pub fail_reserve: AtomicBool,
    pub fail_complete: AtomicBool,
    pub reserves: AtomicUsize,
    pub completes: AtomicUsize,
    pub gets: AtomicUsize,
}

#[derive(Clone)]
pub struct Faulty {
    inner: MemoryStore,
    pub faults: Arc<Faults>,
}

impl Faulty {
    pub fn new(inner: MemoryStore) -> Self {
        Self {
            inner,
            faults: Arc::default(),
        }
    }
}

fn down() -> StoreError {
    StoreError::Unavailable("connection refused (simulated outage)".into())
}

impl Store for Faulty {
    fn reserve(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Reservation, StoreError>> + Send {
        let f = Arc::clone(&self.faults);
        let inner = self.inner.clone();
        let key = key.clone();
        async move {
            f.reserves.fetch_add(1, Ordering::SeqCst);
            if f.fail_reserve.load(Ordering::SeqCst) {
                return Err(down());
            }
            inner.reserve(&key, fingerprint, lease).await
        }
    }

    fn complete(
        &self,
        key: &StoreKey,
        token: Token,
        record: Arc<CompletedRecord>,
        retention: Duration,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send {
        let f = Arc::clone(&self.faults);
        let inner = self.inner.clone();
        let key = key.clone();
        async move {
            f.completes.fetch_add(1, Ordering::SeqCst);
            if f.fail_complete.load(Ordering::SeqCst) {
                return Err(down());
            }
            inner.complete(&key, token, record, retention).await
        }
    }

    fn release(
        &self,
        key: &StoreKey,
        token: Token,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send {
        self.inner.release(key, token)
    }

    fn extend(
        &self,
        key: &StoreKey,
        token: Token,
        lease: Duration,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send {
        self.inner.extend(key, token, lease)
    }

    fn get(
        &self,
        key: &StoreKey,
    ) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send {
        self.faults.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get(key)
    }

    fn purge(&self, key: &StoreKey) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.inner.purge(key)
    }

    fn subscribe(
        &self,
        key: &StoreKey,
    ) -> impl Future<Output = Result<Subscription, StoreError>> + Send {
        self.inner.subscribe(key)
    }
}
