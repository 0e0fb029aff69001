//! A one-line progress bar on stderr, drawn only when stderr is a terminal.

use std::io::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

/// Cheap to clone; does nothing when disabled.
#[derive(Debug, Clone, Default)]
pub(crate) struct Progress {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    done: AtomicUsize,
    /// Phase label, total (0 = open-ended) and when the phase began. A std
    /// mutex: held for a copy, never across an await.
    phase: Mutex<(&'static str, usize, Instant)>,
    ticker: Mutex<Option<JoinHandle<()>>>,
}

const WIDTH: usize = 30;

impl Progress {
    /// A progress bar that draws every 100 ms while `enabled`.
    pub(crate) fn new(enabled: bool) -> Self {
        if !enabled {
            return Self::default();
        }
        let inner = Arc::new(Inner {
            done: AtomicUsize::new(0),
            phase: Mutex::new(("starting", 0, Instant::now())),
            ticker: Mutex::new(None),
        });
        let weak = Arc::downgrade(&inner);
        let ticker = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(inner) => inner.draw(),
                    None => break,
                }
            }
        });
        *inner.ticker.lock().unwrap_or_else(PoisonError::into_inner) = Some(ticker);
        Self { inner: Some(inner) }
    }

    /// Starts a phase: `total` steps, or open-ended when 0.
    pub(crate) fn phase(&self, label: &'static str, total: usize) {
        if let Some(inner) = &self.inner {
            *inner.phase.lock().unwrap_or_else(PoisonError::into_inner) =
                (label, total, Instant::now());
            inner.done.store(0, Ordering::Relaxed);
        }
    }

    /// One step done.
    pub(crate) fn inc(&self) {
        if let Some(inner) = &self.inner {
            inner.done.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Stops drawing and clears the line.
    pub(crate) fn finish(&self) {
        if let Some(inner) = &self.inner {
            if let Some(t) = inner
                .ticker
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
            {
                t.abort();
            }
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

impl Inner {
    fn draw(&self) {
        let (label, total, since) = *self.phase.lock().unwrap_or_else(PoisonError::into_inner);
        let done = self.done.load(Ordering::Relaxed);
        let line = match (done.min(total) * WIDTH).checked_div(total) {
            Some(filled) => format!(
                "{label:<10} [{}{}] {done}/{total}",
                "#".repeat(filled),
                "-".repeat(WIDTH - filled)
            ),
            // Open-ended (load mode).
            None => format!(
                "{label} {done} answered, {:.1} s",
                since.elapsed().as_secs_f64()
            ),
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{line}");
        let _ = err.flush();
    }
}
