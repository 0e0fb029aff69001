//! The floor of `benches/load/redis-cpu.sh`: the least a reverse proxy on
//! the gateway's stack does, so that its CPU per request can be set beside
//! nginx's and the gateway's in the same run (BENCHMARKS.md, issue 9).
//!
//! ```text
//! cargo build --release -p idem-cli --example floor_proxy
//! target/release/examples/floor_proxy 127.0.0.1:8199 127.0.0.1:3190   # listen, upstream
//! ```
//!
//! The same runtime shape as `idem serve`: one current-thread Tokio
//! runtime per CPU, each accepting on the shared listening socket, and the
//! same allocator. Unlike the gateway it does nothing but relay: no route,
//! no key, no store, no trace context, no hop-by-hop headers removed, no
//! time-outs, no pool (each client connection gets its own upstream
//! connection, opened at its first request and kept for its life), the
//! bodies streamed through. Not a proxy to deploy: a measuring stick.

use std::error::Error;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Relay = Arc<Mutex<Option<SendRequest<Incoming>>>>;

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: floor_proxy LISTEN UPSTREAM (two host:port addresses)";
    let listen: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let upstream: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let mut handles = Vec::new();
    for _ in 0..threads {
        let listener = listener.try_clone()?;
        handles.push(std::thread::spawn(move || -> std::io::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(serve(listener, upstream))
        }));
    }
    for h in handles {
        h.join().map_err(|_| "a thread panicked")??;
    }
    Ok(())
}

async fn serve(listener: std::net::TcpListener, upstream: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let relay: Relay = Arc::new(Mutex::new(None));
            let service = service_fn(move |req| forward(Arc::clone(&relay), upstream, req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn forward(
    relay: Relay,
    upstream: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Incoming>, Box<dyn Error + Send + Sync>> {
    let taken = relay.lock().map_err(|_| "poisoned")?.take();
    let mut sender = match taken {
        Some(s) if s.is_ready() => s,
        _ => {
            let stream = TcpStream::connect(upstream).await?;
            stream.set_nodelay(true)?;
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            sender
        }
    };
    let answer = sender.send_request(req);
    *relay.lock().map_err(|_| "poisoned")? = Some(sender);
    Ok(answer.await?)
}
