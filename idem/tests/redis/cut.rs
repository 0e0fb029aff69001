//! A TCP proxy in front of Redis that can lose one reply: the request is
//! forwarded and applied, then the connection drops before its answer
//! reaches the client — the "dropped connection mid-call" of a real
//! network, on demand.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[derive(Default)]
struct Shared {
    /// Cut the reply to the next request whose bytes contain this.
    armed: Mutex<Option<Vec<u8>>>,
    /// Replies cut so far.
    cuts: AtomicUsize,
}

pub struct CutProxy {
    port: u16,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl CutProxy {
    /// Listens on a free port and forwards every connection to `upstream`.
    pub async fn start(upstream: (String, u16)) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared::default());
        let s = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect((upstream.0.as_str(), upstream.1)).await else {
                    continue;
                };
                tokio::spawn(pump(client, server, Arc::clone(&s)));
            }
        });
        Self { port, shared, task }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The next request containing `marker` reaches Redis, but its
    /// (successful) reply does not reach the client: the connection is
    /// closed instead.
    pub fn cut_reply_to(&self, marker: &[u8]) {
        *self.shared.armed.lock().unwrap() = Some(marker.to_vec());
    }

    /// How many replies were cut.
    pub fn cuts(&self) -> usize {
        self.shared.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards both ways until either side closes, or until the reply to an
/// armed request arrives, which is dropped with the connection. An error
/// reply (`-…`, e.g. NOSCRIPT: nothing applied) is forwarded and the
/// proxy stays armed for the client's next attempt.
async fn pump(mut client: TcpStream, mut server: TcpStream, shared: Arc<Shared>) {
    let (mut cbuf, mut sbuf) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let mut cutting: Option<Vec<u8>> = None;
    loop {
        tokio::select! {
            n = client.read(&mut cbuf) => {
                let Ok(n @ 1..) = n else { return };
                let chunk = &cbuf[..n];
                if cutting.is_none() {
                    let mut armed = shared.armed.lock().unwrap();
                    let hit = armed.as_deref().is_some_and(|m| contains(chunk, m));
                    if hit {
                        cutting = armed.take();
                    }
                }
                if server.write_all(chunk).await.is_err() {
                    return;
                }
            }
            n = server.read(&mut sbuf) => {
                let Ok(n @ 1..) = n else { return };
                if let Some(marker) = cutting.take() {
                    if sbuf[0] == b'-' {
                        *shared.armed.lock().unwrap() = Some(marker);
                    } else {
                        shared.cuts.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
                if client.write_all(&sbuf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}
