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

#[tokio::test]
async fn threads_serve_connections_and_end_at_shutdown() {
    if !std::path::Path::new("/proc/self/task").exists() {
        eprintln!("SKIPPED: no /proc/self/task to count threads in");
        return;
    }
    let up = Upstream::start().await;
    let gw = gateway(&up.url(), "[limits]\nthreads = 3").await;
    let io = |names: &[String]| names.iter().filter(|n| n.starts_with("idem-io-")).count();
    // A thread takes its name once it runs: give them a moment.
    let mut during = io(&thread_names());
    for _ in 0..50 {
        if during == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        during = io(&thread_names());
    }
    assert_eq!(during, 3, "three listener threads: {:?}", thread_names());
    let (c, a) = (client(), gw.local_addr());
    for i in 0..12 {
        let key = format!("t-{i}");
        let r = send(&c, a, "POST", "/orders", &[("idempotency-key", &key)], "{}").await;
        assert_eq!(r.status, 201);
    }
    gw.shutdown().await.expect("shutdown");
    // A thread ends just after it says so: give it a moment.
    let mut after = io(&thread_names());
    for _ in 0..50 {
        if after == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = io(&thread_names());
    }
    assert_eq!(after, 0, "shutdown ends its threads");
}
