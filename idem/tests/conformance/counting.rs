//! A store wrapper that counts [`Queue::claim`] calls and passes every call
//! through to the real store it wraps (no behaviour of its own): how the
//! idle cost of a dispatcher is measured on each store.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem::record::Record;
use idem::store::{
    Claimed, Enqueued, Fence, Operation, OperationId, OperationRequest, Queue, QueueStats,
    Reservation, Store, Subscription,
};
use idem::{CompletedRecord, Fingerprint, StoreError, StoreKey, Token};

/// `S`, with its claims counted.
pub struct Counting<S> {
    pub inner: Arc<S>,
    pub claims: AtomicUsize,
}

impl<S> Counting<S> {
    pub fn new(inner: Arc<S>) -> Self {
        Self {
            inner,
            claims: AtomicUsize::new(0),
        }
    }

    pub fn claims(&self) -> usize {
        self.claims.load(Ordering::SeqCst)
    }
}

impl<S: Store> Store for Counting<S> {
    fn reserve(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Reservation, StoreError>> + Send {
        self.inner.reserve(key, fingerprint, lease)
    }
    fn complete(
        &self,
        key: &StoreKey,
        token: Token,
        record: Arc<CompletedRecord>,
        retention: Duration,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send {
        self.inner.complete(key, token, record, retention)
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

impl<S: Queue> Queue for Counting<S> {
    fn enqueue(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        id: OperationId,
        request: &OperationRequest,
        max_pending: u64,
    ) -> impl Future<Output = Result<Enqueued, StoreError>> + Send {
        self.inner
            .enqueue(key, fingerprint, id, request, max_pending)
    }
    fn claim(
        &self,
        lease: Duration,
        max: usize,
    ) -> impl Future<Output = Result<Vec<Claimed>, StoreError>> + Send {
        self.claims.fetch_add(1, Ordering::SeqCst);
        self.inner.claim(lease, max)
    }
    fn retry(
        &self,
        key: &StoreKey,
        token: Token,
        delay: Duration,
        last_error: &str,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send {
        self.inner.retry(key, token, delay, last_error)
    }
    fn operation(
        &self,
        id: OperationId,
    ) -> impl Future<Output = Result<Option<Operation>, StoreError>> + Send {
        self.inner.operation(id)
    }
    fn queue_stats(&self) -> impl Future<Output = Result<QueueStats, StoreError>> + Send {
        self.inner.queue_stats()
    }
}
