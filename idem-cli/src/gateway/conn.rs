//! The downstream edge: the listener's threads, accepting connections,
//! handing them the `max_connections` slots, and shutting down.
//!
//! `[limits] threads` threads (one per CPU by default) each run a
//! current-thread runtime with their own registration of the listening
//! socket and their own upstream pool ([`Proxy::with_own_pool`]): a
//! connection, its requests, their execution tasks and their upstream
//! connections stay on the thread that accepted it, as in nginx's worker
//! model. The slots, the silent connections, and the trackers shutdown
//! waits on are shared by all threads.
//!
//! A connection takes a slot only once its first byte arrives, so sockets
//! that connect and say nothing cannot keep real clients out. Until then it
//! waits, for at most `idle_timeout`, among at most `max_connections` other
//! silent ones; when one more arrives, the **oldest** silent one is closed.
//! An attacker's idle sockets so push out each other, not a client that
//! has just connected and is about to send its request.
//!
//! Each connection speaks HTTP/1.1 or HTTP/2 (hyper-util's auto builder
//! reads the first bytes: the HTTP/2 preface is prior knowledge, h2c), in
//! TLS when `tls_cert` and `tls_key` are set (ALPN offers `h2`, then
//! `http/1.1`). Both get the same limits: `max_header_bytes` (HTTP/2:
//! the header list size), `request_read_timeout` (HTTP/1.1: the head; the
//! TLS handshake; the body, on both, in [`super::body`]),
//! `max_connections`, and `max_concurrent_streams` per HTTP/2 connection.
//!
//! Shutdown stops accepting, closes the silent connections, lets the others
//! finish their requests (hyper's graceful shutdown), then waits for the
//! request tasks that outlived their client (see [`super`]), all within
//! `shutdown_grace`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper::rt::{Read, Write};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use idem::layer::Idempotency;
use idem::store::{AnyStore, ThreadPins};
use idem::Store;

use super::proxy::Proxy;
use super::tls::ListenerTls;
use super::{handle, Edge};
use crate::config::Limits;

/// hyper's parser keeps room for 100 headers unless told otherwise, and
/// answers 431 past that. Room for one header line per 256 bytes of
/// `max_header_bytes`, at least 100 (256 with the default 64 KiB), accepts
/// any real request (Envoy and Apache stop at 100 lines) while keeping the
/// parser cheap: hyper fills its header slots on every parse, and 2 048
/// slots (one per 32 bytes, as before) cost ~20k instructions per request,
/// 15–24 % of a proxied request (BENCHMARKS.md).
#[must_use]
pub fn max_headers(max_header_bytes: usize) -> usize {
    (max_header_bytes / 256).max(100)
}

/// Connections waiting for their first byte, oldest first, at most `cap`.
#[derive(Debug)]
struct Silent {
    cap: usize,
    inner: Mutex<SilentInner>,
}

#[derive(Debug, Default)]
struct SilentInner {
    next: u64,
    /// Dropping a sender tells its connection to close.
    by_age: BTreeMap<u64, oneshot::Sender<()>>,
}

/// A place among the silent connections; leaving it (drop) frees it.
struct Ticket {
    silent: Arc<Silent>,
    id: u64,
}

impl Silent {
    fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(1),
            inner: Mutex::new(SilentInner::default()),
        })
    }

    /// Joins the silent connections, closing the oldest if there are too
    /// many. The receiver completes when this one is shed.
    fn enter(self: &Arc<Self>) -> (Ticket, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let id = inner.next;
        inner.next += 1;
        inner.by_age.insert(id, tx);
        if inner.by_age.len() > self.cap {
            // Dropping its sender wakes the oldest, which closes.
            let _ = inner.by_age.pop_first();
        }
        drop(inner);
        let ticket = Ticket {
            silent: Arc::clone(self),
            id,
        };
        (ticket, rx)
    }

    /// Closes every silent connection (at shutdown).
    fn shed_all(&self) {
        let all = std::mem::take(
            &mut self
                .inner
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .by_age,
        );
        drop(all);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut inner = self
            .silent
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        inner.by_age.remove(&self.id);
    }
}

/// What every connection, on every thread, shares.
struct Shared {
    routes: Arc<idem::RouteTable>,
    edge: Arc<Edge>,
    http: auto::Builder<TokioExecutor>,
    /// TLS termination, when `tls_cert` and `tls_key` are set.
    tls: Option<ListenerTls>,
    /// Bound on the TLS handshake (`request_read_timeout`).
    handshake_timeout: Duration,
    slots: Arc<Semaphore>,
    silent: Arc<Silent>,
    idle_timeout: Duration,
    /// Every connection of every thread, which shutdown waits for.
    connections: TaskTracker,
    /// Graceful: finish what is under way, take nothing new.
    stop: CancellationToken,
    /// The grace is over: drop what is left.
    kill: CancellationToken,
}

/// One of the listener's threads before it starts: its own current-thread
/// runtime, the listening socket registered with that runtime, and the
/// service with its own upstream pool.
pub(super) struct Thread<S: Store> {
    runtime: tokio::runtime::Runtime,
    listener: TcpListener,
    service: Idempotency<Proxy, S>,
}

/// Prepares `count` threads accepting on `listener` (each registers its
/// own copy of the socket: the kernel wakes them in turn as connections
/// arrive, and each serves what it accepted to the end), each with the
/// service `service` makes.
pub(super) fn threads<S: Store>(
    listener: TcpListener,
    count: usize,
    mut service: impl FnMut() -> Idempotency<Proxy, S>,
) -> std::io::Result<Vec<Thread<S>>> {
    let listener = listener.into_std()?;
    (0..count.max(1))
        .map(|_| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let listener = {
                let _inside = runtime.enter();
                TcpListener::from_std(listener.try_clone()?)?
            };
            Ok(Thread {
                runtime,
                listener,
                service: service(),
            })
        })
        .collect()
}

/// The listener's threads, running; [`Running::finish`] shuts them down.
pub(super) struct Running {
    shared: Arc<Shared>,
    /// Completes (or fails, if its thread died) once a thread stopped accepting.
    accepting: Vec<oneshot::Receiver<()>>,
    /// Tells the threads to end their runtimes.
    release: CancellationToken,
    /// Completes once a thread's runtime is gone.
    exited: Vec<oneshot::Receiver<()>>,
    grace: Duration,
}

/// Starts `threads`, each accepting and serving connections until `stop`.
/// A thread that cannot be started stops the others and is an error.
pub(super) fn start<S: Store>(
    threads: Vec<Thread<S>>,
    routes: Arc<idem::RouteTable>,
    edge: Arc<Edge>,
    limits: &Limits,
    tls: Option<ListenerTls>,
    store: &AnyStore,
    stop: CancellationToken,
) -> std::io::Result<Running> {
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.request_read_timeout)
        // hyper refuses buffers under 8 KiB.
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(max_headers(limits.max_header_bytes))
        .keep_alive(true);
    http.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.max_concurrent_streams)
        // A peer that stops answering pings is gone: free its slot.
        .keep_alive_interval(limits.idle_timeout)
        .keep_alive_timeout(limits.request_read_timeout);
    let shared = Arc::new(Shared {
        routes,
        edge,
        http,
        tls,
        handshake_timeout: limits.request_read_timeout,
        slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
        silent: Silent::new(limits.max_connections),
        idle_timeout: limits.idle_timeout.min(limits.request_read_timeout),
        connections: TaskTracker::new(),
        stop,
        kill: CancellationToken::new(),
    });
    let mut running = Running {
        shared: Arc::clone(&shared),
        accepting: Vec::with_capacity(threads.len()),
        release: CancellationToken::new(),
        exited: Vec::with_capacity(threads.len()),
        grace: limits.shutdown_grace,
    };
    // The threads log where the caller logs (its subscriber may be this
    // thread's alone: an embedding's or a test's).
    let logs = tracing::dispatcher::get_default(Clone::clone);
    let count = threads.len();
    for (n, thread) in threads.into_iter().enumerate() {
        let (logs, store) = (logs.clone(), store.clone());
        let (accepting, stopped_accepting) = oneshot::channel();
        let (exited, gone) = oneshot::channel();
        let (shared, release) = (Arc::clone(&shared), running.release.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("idem-io-{n}"))
            .spawn(move || {
                let _logs = tracing::dispatcher::set_default(&logs);
                let Thread {
                    runtime,
                    listener,
                    service,
                } = thread;
                runtime.block_on(async move {
                    // Store calls made on this thread use its own
                    // connections, made on its runtime, when the store has
                    // any (standalone Redis; PostgreSQL's request path,
                    // the thread's share of its pool); until the thread ends.
                    let _pins = store.pin_to_thread(count).await.unwrap_or_else(|error| {
                        tracing::warn!(%error, "a listener thread uses the store's shared connection");
                        ThreadPins::default()
                    });
                    accept(&shared, listener, &service).await;
                    let _ = accepting.send(());
                    // Serve what was accepted until shutdown is over.
                    release.cancelled().await;
                });
                // Whatever is left (past the grace) is dropped here.
                drop(runtime);
                let _ = exited.send(());
            });
        if let Err(error) = spawned {
            running.abandon();
            return Err(error);
        }
        running.accepting.push(stopped_accepting);
        running.exited.push(gone);
    }
    Ok(running)
}

impl Running {
    /// Stops the threads already started, at once (a later one could not
    /// be started).
    fn abandon(&self) {
        self.shared.stop.cancel();
        self.shared.kill.cancel();
        self.release.cancel();
    }

    /// After `stop`: stops accepting, closes the silent connections, lets
    /// the others finish their requests (hyper's graceful shutdown), waits
    /// for the request tasks that outlived their client, all within
    /// `shutdown_grace`, then ends the threads.
    pub(super) async fn finish(self) {
        let Self {
            shared,
            accepting,
            release,
            exited,
            grace,
        } = self;
        shared.stop.cancelled().await;
        let deadline = Instant::now() + grace;
        // No thread spawns a connection once it stopped accepting.
        for thread in accepting {
            let _ = thread.await;
        }
        shared.silent.shed_all();
        let connections = &shared.connections;
        connections.close();
        tokio::select! {
            biased;
            () = connections.wait() => tracing::info!("all connections finished"),
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(?grace, "shutdown grace ran out; closing remaining connections");
                shared.kill.cancel();
            }
        }
        // Requests whose client hung up still run in their own tasks: the
        // upstream call, then storing its answer. Exiting between the two
        // would leave the key held and the answer lost.
        let requests = &shared.edge.requests;
        requests.close();
        tokio::select! {
            biased;
            () = requests.wait() => {}
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(
                    tasks = requests.len(),
                    "shutdown grace ran out with requests still running; \
                     their answers may not be stored (their keys stay held until their leases end)"
                );
            }
        }
        release.cancel();
        for thread in exited {
            let _ = thread.await;
        }
    }
}

/// One thread's accept loop, until `stop`.
async fn accept<S: Store>(
    shared: &Arc<Shared>,
    listener: TcpListener,
    service: &Idempotency<Proxy, S>,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shared.stop.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(error) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (ticket, shed) = shared.silent.enter();
        shared.connections.spawn(connection(
            Arc::clone(shared),
            service.clone(),
            stream,
            peer,
            ticket,
            shed,
        ));
    }
}

/// One connection: wait for its first byte (silent), then for a slot, then
/// the TLS handshake if any, then serve it with hyper.
async fn connection<S: Store>(
    shared: Arc<Shared>,
    service: Idempotency<Proxy, S>,
    stream: TcpStream,
    peer: SocketAddr,
    ticket: Ticket,
    shed: oneshot::Receiver<()>,
) {
    let mut first = [0u8; 1];
    let spoke = tokio::select! {
        r = stream.peek(&mut first) => matches!(r, Ok(n) if n > 0),
        () = tokio::time::sleep(shared.idle_timeout) => false,
        _ = shed => false,
        () = shared.stop.cancelled() => false,
    };
    drop(ticket);
    if !spoke {
        // Closed, silent for too long, the oldest of too many, or shutting down.
        return;
    }
    let permit = tokio::select! {
        p = Arc::clone(&shared.slots).acquire_owned() => match p {
            Ok(p) => p,
            Err(_) => return,
        },
        () = shared.stop.cancelled() => return,
    };
    let Some(tls) = &shared.tls else {
        serve_io(&shared, service, TokioIo::new(stream), peer).await;
        drop(permit);
        return;
    };
    let handshake = tokio::select! {
        r = tokio::time::timeout(shared.handshake_timeout, tls.acceptor().accept(stream)) => r,
        () = shared.stop.cancelled() => return,
    };
    match handshake {
        Ok(Ok(stream)) => serve_io(&shared, service, TokioIo::new(stream), peer).await,
        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
    drop(permit);
}

/// Serves one connection, HTTP/1.1 or HTTP/2, until it ends or shutdown.
async fn serve_io<S: Store, I>(
    shared: &Shared,
    service: Idempotency<Proxy, S>,
    io: I,
    peer: SocketAddr,
) where
    I: Read + Write + Unpin + Send + 'static,
{
    let routes = Arc::clone(&shared.routes);
    let edge = Arc::clone(&shared.edge);
    let conn = shared.http.serve_connection(
        io,
        service_fn(move |req| handle(service.clone(), Arc::clone(&routes), Arc::clone(&edge), req)),
    );
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => Some(r),
        () = shared.stop.cancelled() => None,
    };
    let ended = match ended {
        Some(r) => Some(r),
        None => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => Some(r),
                () = shared.kill.cancelled() => None,
            }
        }
    };
    if let Some(Err(error)) = ended {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_silent_connection_is_shed_first() {
        let silent = Silent::new(2);
        let (a, mut shed_a) = silent.enter();
        let (_b, mut shed_b) = silent.enter();
        assert!(shed_a
            .try_recv()
            .is_err_and(|e| e == oneshot::error::TryRecvError::Empty));
        let (_c, mut shed_c) = silent.enter();
        assert_eq!(
            shed_a.try_recv(),
            Err(oneshot::error::TryRecvError::Closed),
            "the oldest goes"
        );
        assert_eq!(shed_b.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        drop(a);
        // A ticket that left frees nothing twice.
        let (_d, _) = silent.enter();
        assert_eq!(shed_b.try_recv(), Err(oneshot::error::TryRecvError::Closed));
        assert_eq!(shed_c.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        silent.shed_all();
        assert_eq!(shed_c.try_recv(), Err(oneshot::error::TryRecvError::Closed));
    }

    #[test]
    fn room_for_headers_follows_the_byte_limit() {
        assert_eq!(max_headers(8 * 1024), 100);
        assert_eq!(max_headers(64 * 1024), 256);
        assert_eq!(max_headers(1024 * 1024), 4096);
        assert_eq!(max_headers(1024), 100);
    }
}
