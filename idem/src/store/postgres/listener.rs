//! The ONE `LISTEN` connection of a store: it turns `NOTIFY` from any
//! instance into wake-ups of this process's waiters, through the store's
//! [`Notifier`]. When its connection is lost it reconnects with backoff and
//! wakes every waiter, since notifications may have been missed meanwhile.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};

use super::bounded;
use crate::error::StoreError;
use crate::key::StoreKey;
use crate::store::Notifier;

/// The ONE `LISTEN` connection of a store, on a one-connection pool of its
/// own (so it never takes a slot from the calls).
pub(super) struct Listener {
    pool: PgPool,
    listener: PgListener,
    channel: String,
}

impl Listener {
    pub(super) async fn start(
        options: PgConnectOptions,
        channel: String,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(timeout)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_lazy_with(options);
        let listener = bounded(timeout, Self::listen(&pool, &channel)).await?;
        Ok(Self {
            pool,
            listener,
            channel,
        })
    }

    async fn listen(pool: &PgPool, channel: &str) -> Result<PgListener, sqlx::Error> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.ignore_pool_close_event(true);
        listener.listen(channel).await?;
        Ok(listener)
    }

    /// Feeds `notifier` until the store drops (the task is aborted).
    pub(super) async fn run(self, notifier: Notifier) {
        let Self {
            pool,
            mut listener,
            channel,
        } = self;
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => match StoreKey::from_stored(n.payload()) {
                    Ok(key) => notifier.notify(&key),
                    Err(error) => tracing::debug!(%error, "ignoring a foreign notification"),
                },
                // The connection was lost and is back (sqlx reconnects
                // eagerly): anything sent meanwhile is gone, wake everyone.
                Ok(None) => notifier.notify_all(),
                Err(error) => {
                    tracing::warn!(%error, %channel, "listener lost; reconnecting");
                    // Give the pool's one connection back before asking for
                    // a new one.
                    drop(listener);
                    listener = Self::reconnect(&pool, &channel).await;
                    notifier.notify_all();
                }
            }
        }
    }

    /// A new listener, retrying with backoff until it listens again.
    async fn reconnect(pool: &PgPool, channel: &str) -> PgListener {
        let mut pause = Duration::from_millis(100);
        loop {
            tokio::time::sleep(pause).await;
            match Self::listen(pool, channel).await {
                Ok(listener) => return listener,
                Err(error) => {
                    tracing::warn!(%error, ?pause, "listener reconnect failed");
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
