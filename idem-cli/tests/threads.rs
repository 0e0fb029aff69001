//! `[limits] threads`: the listener's threads, one runtime each. The only
//! test in its binary, so the threads it counts are its gateway's.

mod support;

use std::time::Duration;

use support::{client, gateway, send, Upstream};

/// The names of this process's threads.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|n| n.trim().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The listener threads running, once there are `n` of them (a thread
/// takes its name once it runs, and ends just after it says so), or after
/// a second.
async fn io_threads(n: usize) -> usize {
    let count = || {
        thread_names()
            .iter()
            .filter(|t| t.starts_with("idem-io-"))
            .count()
    };
    for _ in 0..50 {
        if count() == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    count()
}

#[tokio::test]
async fn threads_serve_connections_and_end_at_shutdown() {
    if !std::path::Path::new("/proc/self/task").exists() {
        eprintln!("SKIPPED: no /proc/self/task to count threads in");
        return;
    }
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "[limits]\nthreads = 3").await;
    assert_eq!(
        io_threads(3).await,
        3,
        "three listener threads: {:?}",
        thread_names()
    );
    let (c, a) = (client(), gw.local_addr());
    for i in 0..12 {
        let key = format!("t-{i}");
        let r = send(&c, a, "POST", "/orders", &[("idempotency-key", &key)], "{}").await;
        assert_eq!(r.status, 201);
    }
    gw.shutdown().await.expect("shutdown");
    assert_eq!(io_threads(0).await, 0, "shutdown ends its threads");
}
