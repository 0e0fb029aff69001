//! PostgreSQL test stores: each in a fresh schema of its own, so tests run
//! in parallel and repeatedly on one shared server.
//!
//! Schemas are named `idem_t<unix seconds>_<random>`; tests drop theirs at
//! the end, and every new store drops those left over (by a failed or
//! killed run) for more than ten minutes.
#![allow(dead_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem::store::postgres::{sqlx, PostgresStore, PostgresStoreBuilder};

use super::services;

const PREFIX: &str = "idem_t";
const STALE_AFTER: Duration = Duration::from_secs(600);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A schema name no other test (or earlier run) uses.
pub fn fresh_schema() -> String {
    format!("{PREFIX}{}_{:08x}", now_secs(), rand::random::<u32>())
}

/// Settings for a test store in a fresh schema: few connections, and a
/// time-out generous enough for a loaded 2-core machine.
pub fn builder() -> PostgresStoreBuilder {
    PostgresStore::builder(services::database_url())
        .schema(fresh_schema())
        .max_connections(4)
        .timeout(Duration::from_secs(10))
}

/// Connects `builder`, or skips loudly (fails under IDEM_REQUIRE_SERVICES=1).
pub async fn connect(builder: PostgresStoreBuilder) -> Option<PostgresStore> {
    let url = services::database_url();
    match builder.connect().await {
        Ok(store) => {
            drop_stale(&store).await;
            Some(store)
        }
        Err(e) => services::unavailable("PostgreSQL", &url, &e),
    }
}

/// A store in a fresh schema, or `None` (skipped loudly).
pub async fn store() -> Option<PostgresStore> {
    connect(builder()).await
}

/// Drops the store's schema (call at the end of a test).
pub async fn drop_schema(store: &PostgresStore) {
    let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", store.schema());
    if let Err(e) = sqlx::raw_sql(&sql).execute(store.pool()).await {
        eprintln!("could not drop test schema {}: {e}", store.schema());
    }
}

/// Drops test schemas older than [`STALE_AFTER`], best effort.
async fn drop_stale(store: &PostgresStore) {
    let names: Vec<(String,)> =
        sqlx::query_as("SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname, $1)")
            .bind(PREFIX)
            .fetch_all(store.pool())
            .await
            .unwrap_or_default();
    let cutoff = now_secs().saturating_sub(STALE_AFTER.as_secs());
    for (name,) in names {
        let born = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|secs| secs.parse::<u64>().ok());
        if born.is_some_and(|b| b < cutoff) {
            let sql = format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE");
            // Another run may be dropping it at the same moment.
            let _ = sqlx::raw_sql(&sql).execute(store.pool()).await;
        }
    }
}
