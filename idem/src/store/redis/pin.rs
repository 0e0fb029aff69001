//! A connection of the calling thread's own ([`RedisStore::pin_to_thread`]).
//!
//! A [`ConnectionManager`]'s I/O runs on a task of the runtime that made
//! it. Every call from another runtime's thread crosses threads twice (the
//! command to that task, its reply back), each crossing a wake-up of a
//! thread that may sleep in `epoll_wait`. A thread that runs its own
//! runtime for its whole life (one of the gateway's listener threads) asks
//! for a connection of its own, made on its runtime; calls made on that
//! thread use it, calls made anywhere else use the store's shared one.
//!
//! The connections live in a thread-local table keyed by the store's id (a
//! number no other store gets), and only while the [`ThreadPin`] lives: it
//! is dropped on its thread before that thread's runtime ends, so no call
//! finds a connection whose runtime is gone.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

use ::redis::aio::ConnectionManager;

thread_local! {
    /// This thread's own connections: (store id, connection).
    static PINNED: RefCell<Vec<(u64, ConnectionManager)>> = const { RefCell::new(Vec::new()) };
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A store id no other store of this process has.
pub(super) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// This thread's own connection to the store `id`, if it has one.
pub(super) fn get(id: u64) -> Option<ConnectionManager> {
    PINNED.with(|pinned| {
        pinned
            .borrow()
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, c)| c.clone())
    })
}

/// Whether this thread has a connection of its own to the store `id`.
pub(super) fn has(id: u64) -> bool {
    PINNED.with(|pinned| pinned.borrow().iter().any(|(i, _)| *i == id))
}

/// Gives this thread `conn` for the store `id` until the pin is dropped.
pub(super) fn insert(id: u64, conn: ConnectionManager) -> ThreadPin {
    PINNED.with(|pinned| pinned.borrow_mut().push((id, conn)));
    ThreadPin {
        id: Some(id),
        _thread: PhantomData,
    }
}

/// Keeps a thread's own store connection (see
/// [`RedisStore::pin_to_thread`](super::RedisStore::pin_to_thread));
/// dropping it gives the connection up, and the thread's calls go back to
/// the shared one. Tied to its thread (not `Send`): drop it there.
#[derive(Debug)]
#[must_use = "the thread keeps its connection only while the pin lives"]
pub struct ThreadPin {
    /// The store whose connection this is; `None`: nothing pinned.
    id: Option<u64>,
    _thread: PhantomData<*const ()>,
}

impl ThreadPin {
    /// A pin that holds nothing (the thread uses the shared connection).
    pub(super) fn none() -> Self {
        Self {
            id: None,
            _thread: PhantomData,
        }
    }

    /// Whether this pin holds a connection of the thread's own.
    #[must_use]
    pub fn is_pinned(&self) -> bool {
        self.id.is_some()
    }
}

impl Drop for ThreadPin {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            // `try_with`: at thread exit the table may already be gone.
            let _ = PINNED.try_with(|pinned| {
                let mut pinned = pinned.borrow_mut();
                if let Some(at) = pinned.iter().position(|(i, _)| *i == id) {
                    pinned.swap_remove(at);
                }
            });
        }
    }
}
