//! Background work shared by the stores: tasks that stop with the store,
//! and the one listener that feeds a store's [`Notifier`] from its backend.
//!
//! - [`AbortOnDrop`] owns a store's background tasks (a change listener, a
//!   clean-up loop) and aborts them when dropped, so the tasks stop when the
//!   last clone of the store goes away. A task must never hold the store
//!   itself, or it would keep the store alive forever.
//! - [`ChangeFeed`] is what a backend knows: how to open one subscribed
//!   connection (Redis `SUBSCRIBE`, PostgreSQL `LISTEN`) and how to forward
//!   its messages to the notifier. [`listen`] does the rest, the same for
//!   every backend: it reconnects with [`Backoff`] whenever the connection is
//!   lost and then wakes every waiter ([`Notifier::notify_all`]), since any
//!   message sent meanwhile is gone. Waiters poll too, so while the feed is
//!   down they are late, never stuck.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::Notifier;

/// Background tasks that are aborted when this value is dropped.
///
/// Keep it in the store's shared state: the tasks then live exactly as long
/// as some clone of the store does.
#[derive(Debug, Default)]
pub(crate) struct AbortOnDrop(Vec<AbortHandle>);

impl AbortOnDrop {
    /// No tasks yet.
    #[must_use]
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Spawns `task` on the current Tokio runtime; it is aborted when `self`
    /// is dropped. Panics outside a runtime, like [`tokio::spawn`].
    pub(crate) fn spawn<F>(&mut self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.0.push(tokio::spawn(task).abort_handle());
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Exponential backoff between reconnection attempts: `min`, doubling up to
/// `max`, back to `min` after a success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Pauses from `min` doubling up to `max` (`max` below `min` counts as
    /// `min`).
    #[must_use]
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The pause before the next attempt; the one after it is twice as long
    /// (at most `max`).
    pub(crate) fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        pause
    }

    /// After a success: the next pause is `min` again.
    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

/// A backend's change channel, as seen by [`listen`].
///
/// Implementations hold what they need to connect (a client, a pool) but
/// never the store itself (see [`AbortOnDrop`]).
pub(crate) trait ChangeFeed: Send + 'static {
    /// One subscribed connection.
    type Conn: Send;
    /// Why subscribing or listening failed (logged, never returned).
    type Error: fmt::Display + Send;

    /// The backend's name (`Redis`, `PostgreSQL`), for logs.
    const BACKEND: &'static str;

    /// The channel's name, for logs.
    fn channel(&self) -> &str;

    /// Opens a connection and subscribes it to the channel. Bound it with a
    /// time-out: [`listen`] waits for it.
    fn subscribe(&mut self) -> impl Future<Output = Result<Self::Conn, Self::Error>> + Send;

    /// Forwards the channel's messages to `notifier` until the connection
    /// is lost: `Ok` when it closed, `Err` when it failed.
    fn forward(
        &mut self,
        conn: Self::Conn,
        notifier: &Notifier,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Whether a feed is subscribed right now; shared by the store and the
/// feed's task.
#[derive(Debug, Clone)]
pub(crate) struct Listening(Arc<watch::Sender<bool>>);

impl Listening {
    fn new() -> Self {
        Self(Arc::new(watch::Sender::new(false)))
    }

    /// Up while the feed is subscribed.
    #[must_use]
    pub(crate) fn is_up(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until the feed is subscribed (at once if it is now). Bound it
    /// with a time-out: a feed may never come up.
    #[cfg_attr(
        not(feature = "redis"),
        allow(
            dead_code,
            reason = "only the Redis store, which waits for its feed at start-up"
        )
    )]
    pub(crate) async fn up(&self) {
        // `self` holds a sender, so the channel cannot close under us.
        let _ = self.0.subscribe().wait_for(|up| *up).await;
    }

    fn set(&self, up: bool) {
        self.0.send_replace(up);
    }
}

/// A feed to start with [`Listener::run`] (spawn it into an
/// [`AbortOnDrop`]); [`Listener::listening`] lets the store watch it.
pub(crate) struct Listener<F: ChangeFeed> {
    feed: F,
    notifier: Notifier,
    backoff: Backoff,
    first: Option<F::Conn>,
    listening: Listening,
}

/// Makes a [`Listener`] that feeds `notifier` from `feed`, pausing between
/// failed attempts as `backoff` says.
pub(crate) fn listen<F: ChangeFeed>(feed: F, notifier: Notifier, backoff: Backoff) -> Listener<F> {
    Listener {
        feed,
        notifier,
        backoff,
        first: None,
        listening: Listening::new(),
    }
}

impl<F: ChangeFeed> Listener<F> {
    /// Starts from a connection the store already subscribed (to fail its
    /// construction with the reason when it cannot) instead of opening one.
    /// The feed is up from here, not from when its task first runs: the
    /// store it is handed to listens from the moment it exists.
    #[must_use]
    #[cfg_attr(
        not(feature = "postgres"),
        allow(
            dead_code,
            reason = "only the PostgreSQL listener, which subscribes before its store is built"
        )
    )]
    pub(crate) fn subscribed(mut self, conn: F::Conn) -> Self {
        self.first = Some(conn);
        self.listening.set(true);
        self
    }

    /// The feed's up/down state, to keep in the store.
    #[must_use]
    pub(crate) fn listening(&self) -> Listening {
        self.listening.clone()
    }

    /// Subscribes, forwards, and on every loss reconnects (with backoff
    /// while attempts fail) and wakes every waiter. Runs until aborted.
    pub(crate) async fn run(self) {
        let Self {
            mut feed,
            notifier,
            mut backoff,
            mut first,
            listening,
        } = self;
        loop {
            let conn = match first.take() {
                Some(conn) => conn,
                None => match feed.subscribe().await {
                    Ok(conn) => conn,
                    Err(error) => {
                        let pause = backoff.next_pause();
                        tracing::debug!(channel = %feed.channel(), %error, ?pause, "{} change subscription failed; retrying", F::BACKEND);
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                },
            };
            listening.set(true);
            backoff.reset();
            // Anything sent while we were not subscribed is lost: wake every
            // waiter so it reads the record again.
            notifier.notify_all();
            let outcome = feed.forward(conn, &notifier).await;
            listening.set(false);
            match outcome {
                Ok(()) => {
                    tracing::warn!(channel = %feed.channel(), "{} change subscription lost; reconnecting", F::BACKEND);
                }
                Err(error) => {
                    tracing::warn!(channel = %feed.channel(), %error, "{} change subscription lost; reconnecting", F::BACKEND);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use tokio::sync::mpsc;

    use super::*;
    use crate::key::StoreKey;

    #[test]
    fn backoff_doubles_up_to_max_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(50), ms(300));
        let pauses: Vec<_> = (0..5).map(|_| b.next_pause()).collect();
        assert_eq!(pauses, [ms(50), ms(100), ms(200), ms(300), ms(300)]);
        b.reset();
        assert_eq!(b.next_pause(), ms(50));
        let mut b = Backoff::new(ms(10), ms(1));
        assert_eq!([b.next_pause(), b.next_pause()], [ms(10), ms(10)]);
        let mut b = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!([b.next_pause(), b.next_pause()], [Duration::MAX; 2]);
    }

    /// Drops its sender when aborted, so the test sees the abort.
    async fn park(_alive: mpsc::Sender<()>) {
        std::future::pending::<()>().await;
    }

    #[tokio::test]
    async fn tasks_stop_when_dropped() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut tasks = AbortOnDrop::new();
        tasks.spawn(park(tx.clone()));
        tasks.spawn(park(tx));
        tokio::task::yield_now().await;
        assert!(rx.try_recv().is_err(), "the tasks are still running");
        drop(tasks);
        // `None` once both tasks (and their senders) are gone.
        assert!(rx.recv().await.is_none());
    }

    /// Answers to `subscribe`, in order: a connection's keys, or a refusal.
    type Script = Arc<Mutex<VecDeque<Result<Vec<&'static str>, &'static str>>>>;

    /// A scripted feed: each `subscribe` takes the next answer (`Err` =
    /// refused); each connection carries keys to forward, then closes.
    struct Scripted {
        answers: Script,
        subscribed: mpsc::UnboundedSender<()>,
    }

    impl ChangeFeed for Scripted {
        type Conn = Vec<&'static str>;
        type Error = &'static str;
        const BACKEND: &'static str = "test";

        fn channel(&self) -> &str {
            "test"
        }

        async fn subscribe(&mut self) -> Result<Self::Conn, Self::Error> {
            let next = self.answers.lock().unwrap().pop_front();
            match next {
                Some(answer) => {
                    if answer.is_ok() {
                        let _ = self.subscribed.send(());
                    }
                    answer
                }
                // Out of script: stay down.
                None => std::future::pending().await,
            }
        }

        async fn forward(
            &mut self,
            conn: Self::Conn,
            notifier: &Notifier,
        ) -> Result<(), &'static str> {
            // Messages come a moment after the subscription.
            tokio::time::sleep(Duration::from_millis(10)).await;
            for key in conn {
                notifier.notify(&key_of(key));
            }
            // Stay up a moment, so the test sees the feed listening.
            tokio::time::sleep(Duration::from_secs(1)).await;
            Err("closed")
        }
    }

    /// A store key named `k`: 32 hex digits of scope, then `:k`.
    fn key_of(k: &str) -> StoreKey {
        StoreKey::from_stored(&format!("{}:{k}", "0".repeat(32))).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn reconnects_with_backoff_and_wakes_every_waiter() {
        let notifier = Notifier::new();
        let (subscribed_tx, mut subscribed) = mpsc::unbounded_channel();
        let answers = Arc::new(Mutex::new(VecDeque::from([
            Err("refused"),
            Err("refused"),
            Ok(vec![]),
            Err("refused"),
            Ok(vec![]),
        ])));
        let feed = Scripted {
            answers: Arc::clone(&answers),
            subscribed: subscribed_tx,
        };
        let listener = listen(
            feed,
            notifier.clone(),
            Backoff::new(Duration::from_millis(100), Duration::from_secs(1)),
        );
        let listening = listener.listening();
        let mut watched = notifier.subscribe(&key_of("a"));
        let start = tokio::time::Instant::now();
        let mut tasks = AbortOnDrop::new();
        tasks.spawn(listener.run());

        listening.up().await;
        // Two refusals: pauses of 100 ms and 200 ms before the third try.
        assert_eq!(start.elapsed(), Duration::from_millis(300));
        assert!(listening.is_up());
        // Subscribing woke the waiter (it may have missed a message).
        tokio::time::timeout(Duration::ZERO, watched.changed())
            .await
            .unwrap();

        // The connection closes after 1.01 s; one refusal (the backoff was
        // reset by the success: 100 ms), then up again, and every waiter
        // is woken again.
        subscribed.recv().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1050)).await;
        assert!(!listening.is_up(), "down between the loss and the retry");
        subscribed.recv().await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(1410));
        assert!(listening.is_up());
        tokio::time::timeout(Duration::ZERO, watched.changed())
            .await
            .unwrap();
        assert!(answers.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn forwards_messages_and_starts_from_a_given_connection() {
        let notifier = Notifier::new();
        let (subscribed_tx, _subscribed) = mpsc::unbounded_channel();
        let feed = Scripted {
            answers: Arc::default(),
            subscribed: subscribed_tx,
        };
        let mut a = notifier.subscribe(&key_of("a"));
        let mut b = notifier.subscribe(&key_of("b"));
        let listener = listen(
            feed,
            notifier.clone(),
            Backoff::new(Duration::from_millis(1), Duration::from_millis(1)),
        )
        .subscribed(vec!["b"]);
        let listening = listener.listening();
        assert!(listening.is_up(), "up before its task first runs");
        let mut tasks = AbortOnDrop::new();
        tasks.spawn(listener.run());
        // The first subscription wakes everyone as the task starts; then
        // the message (10 ms later) wakes `b` alone.
        let start = Duration::from_millis(1);
        tokio::time::timeout(start, a.changed()).await.unwrap();
        tokio::time::timeout(start, b.changed()).await.unwrap();
        let soon = Duration::from_millis(50);
        tokio::time::timeout(soon, b.changed()).await.unwrap();
        assert!(
            tokio::time::timeout(soon, a.changed()).await.is_err(),
            "only `b` changed"
        );
        drop(tasks);
        tokio::task::yield_now().await;
    }
}
