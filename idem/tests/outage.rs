//! The store failing in the middle of a request (issue 10, items 4, 17 and
//! the not-transient `Capacity`; SPEC §6): the caller gets its answer in a
//! bounded time, the key is held or released by a stated rule, and no log
//! line carries the client's key.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

#[path = "support/faulty.rs"]
mod faulty;

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use faulty::Faulty;
use idem::store::memory::MemoryStore;
use idem::{Engine, EngineConfig, Fingerprint, OnceError, Rules, Scope, StoreKey};

/// Everything a test's subscriber writes.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Every log line (all levels) of this thread goes to the returned buffer
/// until the guard drops. Tests using it run on a current-thread runtime,
/// so the engine's spawned tasks log here too.
fn capture_logs() -> (LogBuffer, tracing::subscriber::DefaultGuard) {
    let buffer = LogBuffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (buffer, tracing::subscriber::set_default(subscriber))
}

#[tokio::test]
async fn log_lines_never_carry_the_clients_key() {
    let (logs, _guard) = capture_logs();
    let store = Faulty::new(MemoryStore::new());
    let faults = Arc::clone(&store.faults);
    let engine = Engine::with_config(
        store,
        EngineConfig {
            local_cache_bytes: 0,
            ..EngineConfig::default()
        },
    );
    let k = StoreKey::new(&Scope::named("tenant"), "secret-key-123");
    let fp = Fingerprint::of_bytes(b"job");
    let rules = Rules::default();
    // Reserve fails (fail closed: a warning).
    faults.fail_reserve.store(true, Ordering::SeqCst);
    let refused = engine
        .once(&k, fp, &rules, || async { Ok::<_, io::Error>(1) })
        .await;
    assert!(
        matches!(refused, Err(OnceError::Store(_))),
        "got {refused:?}"
    );
    let text = logs.text();
    assert!(
        text.contains("store unavailable"),
        "the failure must be logged at all: {text}"
    );
    assert!(
        !text.contains("secret-key-123"),
        "a log line carries the client's key:\n{text}"
    );
    assert!(
        text.contains(&k.log_id().to_string()),
        "log lines name the key by its log id:\n{text}"
    );
}
