//! A thread's own store connections ([`ThreadPin`]): the Redis store's
//! connection and the PostgreSQL store's request-path pool of a thread that
//! asked for them (`pin_to_thread`).
//!
//! A network connection's I/O is driven by the runtime that made it. Every
//! call from another runtime's thread crosses threads (the command or
//! statement out, its answer back), each crossing a wake-up of a thread
//! that may sleep in `epoll_wait`. A thread that runs its own runtime for
//! its whole life (one of the gateway's listener threads) asks for
//! connections of its own, made on its runtime; calls made on that thread
//! use them, calls made anywhere else use the store's shared ones.
//!
//! The connections live in a thread-local table keyed by the store's id (a
//! number no other store gets), and only while the [`ThreadPin`] lives: it
//! is dropped on its thread before that thread's runtime ends, so no call
//! finds a connection whose runtime is gone.

use std::any::Any;
use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

thread_local! {
    /// This thread's own connections: (store id, connection).
    static PINNED: RefCell<Vec<(u64, Box<dyn Any>)>> = const { RefCell::new(Vec::new()) };
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A store id no other store of this process has.
pub(super) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// This thread's own connection (of type `T`) to the store `id`, if it has
/// one.
pub(super) fn get<T: Clone + 'static>(id: u64) -> Option<T> {
    PINNED.with(|pinned| {
        pinned
            .borrow()
            .iter()
            .find(|(i, _)| *i == id)
            .and_then(|(_, c)| c.downcast_ref::<T>().cloned())
    })
}

/// Whether this thread has a connection of its own to the store `id`.
pub(super) fn has(id: u64) -> bool {
    PINNED.with(|pinned| pinned.borrow().iter().any(|(i, _)| *i == id))
}

/// Gives this thread `conn` for the store `id` until the pin is dropped.
pub(super) fn insert<T: 'static>(id: u64, conn: T) -> ThreadPin {
    PINNED.with(|pinned| pinned.borrow_mut().push((id, Box::new(conn))));
    ThreadPin {
        id: Some(id),
        _thread: PhantomData,
    }
}

/// Keeps a thread's own store connections (see
/// [`AnyStore::pin_to_thread`](super::AnyStore::pin_to_thread)); dropping
/// it gives them up, and the thread's calls go back to the shared ones.
/// Tied to its thread (not `Send`): drop it there.
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
            // `try_with`: at thread exit the table may already be gone. The
            // connection is dropped outside the borrow: its drop may run
            // code of its own.
            let _gone = PINNED.try_with(|pinned| {
                let mut pinned = pinned.borrow_mut();
                pinned
                    .iter()
                    .position(|(i, _)| *i == id)
                    .map(|at| pinned.swap_remove(at))
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_lends_its_connection_to_its_thread_until_dropped() {
        let (a, b) = (next_id(), next_id());
        assert_ne!(a, b);
        let pin = insert(a, String::from("conn a"));
        assert!(pin.is_pinned());
        assert_eq!(get::<String>(a).as_deref(), Some("conn a"));
        assert!(has(a));
        assert!(!has(b), "another store has nothing pinned");
        assert_eq!(get::<u32>(a), None, "a connection of another type");
        let elsewhere = std::thread::spawn(move || has(a)).join().expect("thread");
        assert!(!elsewhere, "other threads do not see this thread's pin");
        drop(pin);
        assert!(!has(a));
        assert_eq!(get::<String>(a), None);
        assert!(!ThreadPin::none().is_pinned());
    }
}
