//! The ONE `LISTEN` connection of a store: it turns `NOTIFY` from any
//! instance into wake-ups of this process's waiters, through the store's
//! [`Notifier`].
//!
//! [`Feed`] knows how to `LISTEN` and how to read notifications;
//! reconnecting with backoff and waking every waiter after a loss is the
//! shared [`background::listen`](crate::store::background::listen) loop.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};

use super::{bounded, store_error};
use crate::error::StoreError;
use crate::key::StoreKey;
use crate::store::background::{Backoff, ChangeFeed};
use crate::store::Notifier;

/// The pauses between failed attempts to listen again.
pub(super) fn backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
}

/// `LISTEN`s on the store's channel, on a one-connection pool of its own
/// (so it never takes a slot from the calls).
pub(super) struct Feed {
    pool: PgPool,
    channel: String,
    /// Bounds each attempt to listen.
    timeout: Duration,
}

impl Feed {
    pub(super) fn new(options: PgConnectOptions, channel: String, timeout: Duration) -> Self {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(timeout)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_lazy_with(options);
        Self {
            pool,
            channel,
            timeout,
        }
    }
}

impl ChangeFeed for Feed {
    type Conn = PgListener;
    type Error = StoreError;
    const BACKEND: &'static str = "PostgreSQL";

    fn channel(&self) -> &str {
        &self.channel
    }

    async fn subscribe(&mut self) -> Result<PgListener, StoreError> {
        bounded(self.timeout, async {
            let mut listener = PgListener::connect_with(&self.pool).await?;
            listener.ignore_pool_close_event(true);
            listener.listen(&self.channel).await?;
            Ok(listener)
        })
        .await
    }

    async fn forward(
        &mut self,
        mut listener: PgListener,
        notifier: &Notifier,
    ) -> Result<(), StoreError> {
        // Returning drops `listener`, which gives the pool's one connection
        // back before the next `subscribe` asks for it.
        loop {
            match listener
                .try_recv()
                .await
                .map_err(|e| store_error(e, self.timeout))?
            {
                Some(n) => match StoreKey::from_stored(n.payload()) {
                    Ok(key) => notifier.notify(&key),
                    Err(error) => tracing::debug!(%error, "ignoring a foreign notification"),
                },
                // The connection was lost and sqlx has already connected
                // and listened again (it reconnects eagerly; had that
                // failed, this would be an error): anything sent meanwhile
                // is gone, so wake everyone.
                None => notifier.notify_all(),
            }
        }
    }
}
