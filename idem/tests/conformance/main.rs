//! Every store passes the SAME conformance suite (protocol §7).
//!
//! `conformance!(name, factory)` instantiates every property in `suite.rs`
//! for one store; `factory` is an async expression yielding
//! `Option<Arc<Store>>` (`None`: the service is unreachable and the test is
//! skipped loudly, unless `IDEM_REQUIRE_SERVICES=1`).
//!
//! `jobs_conformance!(name, factory)` runs `jobs.rs` (job status, protocol
//! §13) through an engine over the store.
//!
//! `queue_conformance!(name, factory)` does the same with `queue.rs` for a
//! store that implements async mode's `Queue` (protocol §9.7); its factory
//! must yield a store of the test's own (an empty queue).

#[cfg(feature = "redis")]
mod cluster;
mod counting;
mod jobs;
#[cfg(feature = "postgres")]
mod pg;
mod queue;
mod services;
mod suite;
mod version;

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

macro_rules! jobs_conformance {
    ($name:ident, $factory:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn status_follows_a_run() {
                let Some(s) = $factory.await else { return };
                jobs::status_follows_a_run(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn transient_failure_releases_and_counts() {
                let Some(s) = $factory.await else { return };
                jobs::transient_failure_releases_and_counts(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn permanent_failure_is_replayed_to_50_redeliveries() {
                let Some(s) = $factory.await else { return };
                jobs::permanent_failure_is_replayed(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn one_execution_of_100_racing_deliveries() {
                let Some(s) = $factory.await else { return };
                jobs::deliveries_race(s, 100).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn purge_forgets_the_trace() {
                let Some(s) = $factory.await else { return };
                jobs::purge_forgets_the_trace(s).await;
            }
        }
    };
}

jobs_conformance!(memory_jobs, async {
    Some(Arc::new(idem::store::memory::MemoryStore::new()))
});
// The same through `AnyStore`, which every backend's calls go through in
// the gateway.
jobs_conformance!(any_memory_jobs, async {
    Some(Arc::new(idem::store::AnyStore::Memory(
        idem::store::memory::MemoryStore::new(),
    )))
});

macro_rules! queue_conformance {
    ($name:ident, $factory:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn enqueue_then_repeat() {
                let Some(s) = $factory.await else { return };
                queue::enqueue_then_repeat(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn enqueue_meets_sync_records() {
                let Some(s) = $factory.await else { return };
                queue::enqueue_meets_sync_records(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn claim_due() {
                let Some(s) = $factory.await else { return };
                queue::claim_due(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn claim_order_and_batch() {
                let Some(s) = $factory.await else { return };
                queue::claim_order_and_batch(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn retry_schedule() {
                let Some(s) = $factory.await else { return };
                queue::retry_schedule(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn complete_makes_it_done() {
                let Some(s) = $factory.await else { return };
                queue::complete_makes_it_done(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn done_operation_lives_for_its_retention() {
                let Some(s) = $factory.await else { return };
                queue::done_operation_lives_for_its_retention(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn claim_expired() {
                let Some(s) = $factory.await else { return };
                queue::claim_expired(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn max_pending_is_full_and_writes_nothing() {
                let Some(s) = $factory.await else { return };
                queue::max_pending_is_full_and_writes_nothing(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn claim_is_exclusive_under_200_concurrent_tasks() {
                let Some(s) = $factory.await else { return };
                queue::claim_is_exclusive(s, 25).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn purge_and_release_remove_it() {
                let Some(s) = $factory.await else { return };
                queue::purge_and_release_remove_it(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn queue_stats_count_pending_and_running() {
                let Some(s) = $factory.await else { return };
                queue::queue_stats_count_pending_and_running(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn last_error_is_the_latest_failed_attempt() {
                let Some(s) = $factory.await else { return };
                queue::last_error_is_the_latest_failed_attempt(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn idle_dispatcher_claims_rarely_and_picks_up_promptly() {
                let Some(s) = $factory.await else { return };
                queue::idle_dispatcher_claims_rarely_and_picks_up_promptly(s).await;
            }
        }
    };
}

// PostgreSQL joins with its own line once it implements `Queue`.
queue_conformance!(memory_queue, async {
    Some(Arc::new(idem::store::memory::MemoryStore::new()))
});
// The same store with one shard (it shards by `max_entries / 4096`): every
// claimer contends for one lock and the same first operation.
queue_conformance!(memory_queue_one_shard, async {
    Some(Arc::new(idem::store::memory::MemoryStore::with_limits(
        idem::store::memory::MemoryLimits {
            max_entries: 8_000,
            ..Default::default()
        },
    )))
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
// Async mode's queue on Redis: each test gets a prefix of its own (its own
// 16 queue shards), on the shared server and on the Cluster.
#[cfg(feature = "redis")]
queue_conformance!(redis_queue, async {
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
#[cfg(feature = "redis")]
queue_conformance!(redis_cluster_queue, async {
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
#[cfg(feature = "redis")]
jobs_conformance!(redis_jobs, async {
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
#[cfg(feature = "redis")]
jobs_conformance!(redis_cluster_jobs, async {
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
#[cfg(feature = "postgres")]
jobs_conformance!(postgres_jobs, async { pg::store().await.map(Arc::new) });
#[cfg(feature = "postgres")]
queue_conformance!(postgres_queue, async { pg::store().await.map(Arc::new) });

// The stale-event guard (protocol §13), on every store.
macro_rules! version_conformance {
    ($name:ident, $factory:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn begin_commit_abort() {
                let Some(s) = $factory.await else { return };
                version::begin_commit_abort(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kinds_precision_and_isolation() {
                let Some(s) = $factory.await else { return };
                version::kinds_precision_and_isolation(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn lease_expiry_and_fencing() {
                let Some(s) = $factory.await else { return };
                version::lease_expiry_and_fencing(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn applies_in_increasing_order_under_200_concurrent_tasks() {
                let Some(s) = $factory.await else { return };
                version::applies_in_increasing_order(s, 200).await;
            }
        }
    };
}

version_conformance!(memory_version, async {
    Some(Arc::new(idem::store::memory::MemoryStore::new()))
});
#[cfg(feature = "redis")]
version_conformance!(redis_version, async {
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
#[cfg(feature = "redis")]
version_conformance!(redis_cluster_version, async {
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
#[cfg(feature = "postgres")]
version_conformance!(postgres_version, async { pg::store().await.map(Arc::new) });
