//! The upstream of `benches/load/waiters.sh`: answers every `POST` with
//! `201 {"order":"created"}` after a fixed delay, and `GET /count` with
//! `{"count": n}`, the POSTs it got (what `idem race --count-url` reads).
//!
//! ```text
//! cargo build --release -p idem-cli --example waiters_upstream
//! target/release/examples/waiters_upstream 127.0.0.1:3300 200   # address, delay in ms
//! ```
//!
//! hyper on tokio, so that a burst sent straight to it measures the client
//! and the delay, not the upstream (the Python upstream of `waiters.py`
//! added tens of milliseconds to a 500-request burst by itself).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:3300".to_owned());
    let delay_ms = args
        .next()
        .map_or(Ok(200), |d| d.parse::<u64>())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let delay = Duration::from_millis(delay_ms);
    let listener = TcpListener::bind(&addr).await?;
    eprintln!(
        "waiters_upstream: http://{} (delay {delay_ms} ms)",
        listener.local_addr()?
    );
    let calls = Arc::new(AtomicU64::new(0));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: say so, keep serving.
                eprintln!("waiters_upstream: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let calls = Arc::clone(&calls);
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(Arc::clone(&calls), delay, req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    calls: Arc<AtomicU64>,
    delay: Duration,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let get = req.method() == Method::GET;
    let _ = req.into_body().collect().await;
    let (status, body) = if get {
        let n = calls.load(Ordering::SeqCst);
        (StatusCode::OK, Bytes::from(format!("{{\"count\":{n}}}")))
    } else {
        calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(delay).await;
        (
            StatusCode::CREATED,
            Bytes::from_static(b"{\"order\":\"created\"}"),
        )
    };
    let mut res = Response::new(Full::new(body));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(res)
}
