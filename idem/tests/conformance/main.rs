//! Every store passes the SAME conformance suite (SPEC §7).
//!
//! `conformance!(name, factory)` instantiates every property in `suite.rs`
//! for one store; `factory` is an async expression yielding
//! `Option<Arc<Store>>` (`None`: the service is unreachable and the test is
//! skipped loudly, unless `IDEM_REQUIRE_SERVICES=1`).

#[cfg(feature = "redis")]
mod cluster;
#[cfg(feature = "postgres")]
mod pg;
mod services;
mod suite;

use std::sync::Arc;

macro_rules! conformance {
    ($name:ident, $factory:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn reserve_is_exclusive_under_200_concurrent_tasks() {
                let Some(s) = $factory.await else { return };
                suite::reserve_is_exclusive(s, 50).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn complete_then_replay() {
                let Some(s) = $factory.await else { return };
                suite::complete_then_replay(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mismatch() {
                let Some(s) = $factory.await else { return };
                suite::mismatch(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn release_then_reserve() {
                let Some(s) = $factory.await else { return };
                suite::release_then_reserve(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn lease_expiry_and_fencing() {
                let Some(s) = $factory.await else { return };
                suite::lease_expiry_and_fencing(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn retention_expiry() {
                let Some(s) = $factory.await else { return };
                suite::retention_expiry(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn purge() {
                let Some(s) = $factory.await else { return };
                suite::purge(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_change_wakes_subscribers() {
                let Some(s) = $factory.await else { return };
                suite::a_change_wakes_subscribers(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn waiters_get_the_first_answer() {
                let Some(s) = $factory.await else { return };
                suite::waiters_finish(s, false).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn waiters_finish_by_polling_when_notifications_are_lost() {
                let Some(s) = $factory.await else { return };
                suite::waiters_finish(s, true).await;
            }
        }
    };
}

conformance!(memory, async {
    Some(Arc::new(idem::store::memory::MemoryStore::new()))
});

/// A prefix no other test (or earlier run) uses: tests isolate themselves
/// and never flush the shared server.
#[cfg(feature = "redis")]
fn redis_test_prefix() -> String {
    format!("idem-test-{:016x}:", rand::random::<u64>())
}

#[cfg(feature = "redis")]
conformance!(redis, async {
    let url = services::redis_url();
    match idem::store::redis::RedisStore::builder()
        .prefix(redis_test_prefix())
        .connect(&url)
        .await
    {
        Ok(store) => Some(Arc::new(store)),
        Err(e) => services::unavailable("Redis", &url, &e),
    }
});

// A cluster of the test binary's own unless IDEM_TEST_REDIS_CLUSTER_URLS
// names one (see cluster.rs).
#[cfg(feature = "redis")]
conformance!(redis_cluster, async {
    let cluster = cluster::Cluster::get().await?;
    match idem::store::redis::RedisStore::builder()
        .prefix(redis_test_prefix())
        .connect_cluster(cluster.urls())
        .await
    {
        Ok(store) => Some(Arc::new(store)),
        Err(e) => cluster.unreachable(&e),
    }
});
// Each test gets a store in a fresh schema (see pg.rs); stale schemas of
// earlier runs are dropped by later ones.
#[cfg(feature = "postgres")]
conformance!(postgres, async { pg::store().await.map(Arc::new) });
