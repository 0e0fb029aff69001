//! Connections, the barrier, the burst, load mode and the count URL.

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Barrier;
use tokio::task::JoinSet;

use super::progress::Progress;
use super::report::{Context, Sample};
use super::{Keys, Mode, Plan, RaceError, Target};
use crate::units::format_duration;

/// Connections opened at once while setting up (the listen backlog of the
/// other side is finite; SYNs beyond it are retried after a second).
const CONNECT_BATCH: usize = 256;

/// File descriptors kept free for everything else (stdio, the runtime, the
/// count URL).
const SPARE_FDS: usize = 64;

type Sender = SendRequest<Full<Bytes>>;

pub(super) async fn run(plan: &Plan) -> Result<super::Report, RaceError> {
    let connections = match plan.mode {
        Mode::Burst { requests } => requests,
        Mode::Load { concurrency, .. } => concurrency,
    };
    check_fd_limit(connections)?;
    let addr = resolve(&plan.target).await?;
    let count_addr = match &plan.count_url {
        Some(t) => Some((t, resolve(t).await?)),
        None => None,
    };
    let before = match count_addr {
        Some((t, a)) => Some(read_count(t, a, plan).await?),
        None => None,
    };
    let progress = Progress::new(plan.progress);
    let raced = match plan.mode {
        Mode::Burst { requests } => burst(plan, addr, requests, &progress).await,
        Mode::Load {
            duration,
            concurrency,
        } => load(plan, addr, duration, concurrency, &progress).await,
    };
    progress.finish();
    let (samples, load_elapsed) = raced?;
    let counts = match (count_addr, before) {
        (Some((t, a)), Some(before)) => Some((before, read_count(t, a, plan).await?)),
        _ => None,
    };
    let keys = match &plan.keys {
        Keys::One(_) => 1,
        Keys::None => 0,
        Keys::Unique { .. } => samples.len(),
    };
    Ok(super::Report::build(
        &samples,
        Context {
            keys,
            counts,
            load_elapsed,
        },
    ))
}

/// N requests, one fresh connection each, released by one barrier; the
/// connections are closed once the last answer is in.
async fn burst(
    plan: &Plan,
    addr: SocketAddr,
    n: usize,
    progress: &Progress,
) -> Result<(Vec<Sample>, Option<Duration>), RaceError> {
    // Everything is built before the start: after it, a task only sends.
    // (And before any task waits on the barrier, so no error path can leave
    // tasks parked on it forever.)
    let requests = (0..n)
        .map(|i| {
            let (key_id, key) = key_for(&plan.keys, i as u64, || i.to_string());
            build(plan, &plan.target, key.as_deref()).map(|r| (key_id, r))
        })
        .collect::<Result<Vec<_>, _>>()?;
    progress.phase("connecting", n);
    let senders = connect_all(addr, n, plan.connect_timeout, progress).await?;
    let barrier = Arc::new(Barrier::new(n + 1));
    let mut tasks = Vec::with_capacity(n);
    for (mut sender, (key_id, request)) in senders.into_iter().zip(requests) {
        let barrier = Arc::clone(&barrier);
        let timeout = plan.request_timeout;
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let sample = send(&mut sender, request, key_id, timeout).await;
            progress.inc();
            // The sender goes back with the sample: its connection stays
            // open until every request has its answer.
            (sample, sender)
        }));
    }
    progress.phase("racing", n);
    barrier.wait().await;
    let mut samples = Vec::with_capacity(n);
    let mut open = Vec::with_capacity(n);
    for task in tasks {
        match task.await {
            Ok((sample, sender)) => {
                samples.push(sample);
                open.push(sender);
            }
            Err(e) => samples.push(Sample::Failed(format!("request task failed: {e}"))),
        }
    }
    // Closed only now, all together: closing the connections of the first
    // answers (here and on the server) does not delay the last ones, so the
    // latencies are the requests' and not the closes' (as the connects are
    // done before the start).
    drop(open);
    Ok((samples, None))
}

/// `concurrency` connections, each sending back to back until `duration`
/// has passed since the common start.
async fn load(
    plan: &Plan,
    addr: SocketAddr,
    duration: Duration,
    concurrency: usize,
    progress: &Progress,
) -> Result<(Vec<Sample>, Option<Duration>), RaceError> {
    progress.phase("connecting", concurrency);
    let senders = connect_all(addr, concurrency, plan.connect_timeout, progress).await?;
    let barrier = Arc::new(Barrier::new(concurrency + 1));
    let plan = Arc::new(plan.clone());
    let mut tasks = Vec::with_capacity(concurrency);
    for (worker, sender) in senders.into_iter().enumerate() {
        let barrier = Arc::clone(&barrier);
        let plan = Arc::clone(&plan);
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let deadline = Instant::now() + duration;
            worker_loop(&plan, addr, worker as u64, sender, deadline, &progress).await
        }));
    }
    progress.phase("sending", 0);
    barrier.wait().await;
    let start = Instant::now();
    let mut samples = Vec::new();
    for task in tasks {
        match task.await {
            Ok(s) => samples.extend(s),
            Err(e) => samples.push(Sample::Failed(format!("load task failed: {e}"))),
        }
    }
    Ok((samples, Some(start.elapsed())))
}

async fn worker_loop(
    plan: &Plan,
    addr: SocketAddr,
    worker: u64,
    mut sender: Sender,
    deadline: Instant,
    progress: &Progress,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut seq: u64 = 0;
    while Instant::now() < deadline {
        // The server may close a keep-alive connection: open another.
        if sender.ready().await.is_err() {
            let needed = match plan.mode {
                Mode::Load { concurrency, .. } => concurrency,
                Mode::Burst { requests } => requests,
            };
            match connect(addr, plan.connect_timeout, needed).await {
                Ok(s) => sender = s,
                Err(e) => {
                    // Do not spin on a dead server: record it, stop this worker.
                    samples.push(Sample::Failed(e.to_string()));
                    break;
                }
            }
        }
        let (key_id, key) = key_for(&plan.keys, (worker << 32) | seq, || {
            format!("{worker}-{seq}")
        });
        seq += 1;
        let sample = match build(plan, &plan.target, key.as_deref()) {
            Ok(request) => send(&mut sender, request, key_id, plan.request_timeout).await,
            Err(e) => Sample::Failed(e.to_string()),
        };
        samples.push(sample);
        progress.inc();
    }
    samples
}

/// The key id (for grouping answers) and the key header of request `id`.
fn key_for(keys: &Keys, id: u64, suffix: impl FnOnce() -> String) -> (u64, Option<String>) {
    match keys {
        Keys::One(k) => (0, Some(k.clone())),
        Keys::None => (0, None),
        Keys::Unique { prefix } => (id, Some(format!("{prefix}-{}", suffix()))),
    }
}

fn build(
    plan: &Plan,
    target: &Target,
    key: Option<&str>,
) -> Result<Request<Full<Bytes>>, RaceError> {
    let mut request = Request::builder()
        .method(plan.method.clone())
        .uri(target.path.clone())
        .body(Full::new(plan.body.clone()))
        .map_err(RaceError::Request)?;
    let headers = request.headers_mut();
    headers.insert(HOST, target.host.clone());
    for (name, value) in &plan.headers {
        headers.append(name, value.clone());
    }
    if let Some(key) = key {
        let value = HeaderValue::from_str(key).map_err(|_| RaceError::Key(key.to_owned()))?;
        headers.insert(plan.key_header.clone(), value);
    }
    Ok(request)
}

/// Sends one request on its connection and reads the answer to the end.
async fn send(
    sender: &mut Sender,
    request: Request<Full<Bytes>>,
    key: u64,
    timeout: Duration,
) -> Sample {
    let start = Instant::now();
    let exchange = async {
        let response = sender.send_request(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok::<_, hyper::Error>((parts, body))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok((parts, body))) => Sample::Answered {
            status: parts.status.as_u16(),
            latency: start.elapsed(),
            body: hash(&body),
            replayed: parts
                .headers
                .get(idem::layer::IDEMPOTENT_REPLAYED)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true")),
            key,
        },
        Ok(Err(e)) => Sample::Failed(describe(&e)),
        Err(_) => Sample::Failed(format!("no answer within {}", format_duration(timeout))),
    }
}

/// hyper's messages, in the words of someone racing a server.
fn describe(e: &hyper::Error) -> String {
    if e.is_canceled() {
        "the connection closed before the request was sent (a server idle timeout?)".into()
    } else if e.is_incomplete_message() {
        "the server closed the connection before answering".into()
    } else {
        e.to_string()
    }
}

fn hash(body: &[u8]) -> u64 {
    // SipHash with fixed keys: stable within a run, which is all we need.
    let mut h = std::hash::DefaultHasher::new();
    body.hash(&mut h);
    h.finish()
}

async fn resolve(target: &Target) -> Result<SocketAddr, RaceError> {
    let resolve_error = |reason: String| RaceError::Resolve {
        host: target.connect.clone(),
        reason,
    };
    tokio::net::lookup_host(&target.connect)
        .await
        .map_err(|e| resolve_error(e.to_string()))?
        .next()
        .ok_or_else(|| resolve_error("no address found".into()))
}

/// Opens `n` connections, [`CONNECT_BATCH`] at a time; the first failure
/// aborts the others.
async fn connect_all(
    addr: SocketAddr,
    n: usize,
    timeout: Duration,
    progress: &Progress,
) -> Result<Vec<Sender>, RaceError> {
    let mut senders = Vec::with_capacity(n);
    while senders.len() < n {
        let batch = (n - senders.len()).min(CONNECT_BATCH);
        let mut set = JoinSet::new();
        for _ in 0..batch {
            set.spawn(connect(addr, timeout, n));
        }
        while let Some(joined) = set.join_next().await {
            senders.push(joined.map_err(|e| RaceError::Task(e.to_string()))??);
            progress.inc();
        }
    }
    Ok(senders)
}

/// One fresh connection, HTTP/1.1 handshake done, its driver spawned.
/// `needed` (connections wanted in all) only goes into the out-of-files error.
async fn connect(addr: SocketAddr, timeout: Duration, needed: usize) -> Result<Sender, RaceError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| RaceError::ConnectTimeout { addr, timeout })?
        .map_err(|source| {
            if is_out_of_files(&source) {
                RaceError::TooManyOpenFiles {
                    needed,
                    limit: fd_limit(),
                }
            } else {
                RaceError::Connect { addr, source }
            }
        })?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| RaceError::Handshake { addr, source })?;
    tokio::spawn(async move {
        // Ends when the sender is dropped or the server closes.
        let _ = connection.await;
    });
    Ok(sender)
}

/// EMFILE (this process) or ENFILE (the whole system).
fn is_out_of_files(e: &std::io::Error) -> bool {
    cfg!(unix) && matches!(e.raw_os_error(), Some(23 | 24))
}

/// Refuses up front a race that cannot get one descriptor per connection.
fn check_fd_limit(connections: usize) -> Result<(), RaceError> {
    match fd_limit() {
        Some(limit) if (connections + SPARE_FDS) as u64 > limit => {
            Err(RaceError::TooManyOpenFiles {
                needed: connections,
                limit: Some(limit),
            })
        }
        _ => Ok(()),
    }
}

/// The soft limit on open files, where the system says it without unsafe
/// code (Linux: /proc/self/limits). `None` = unknown or unlimited.
fn fd_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_fd_limit(&limits)
}

fn parse_fd_limit(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
}

/// GETs the count URL on a fresh connection: `{"count": n}` or a bare number.
async fn read_count(target: &Target, addr: SocketAddr, plan: &Plan) -> Result<u64, RaceError> {
    let fail = |reason: String| RaceError::CountUrl {
        url: target.url.clone(),
        reason,
    };
    let exchange = async {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let mut request = Request::get(target.path.clone())
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        request.headers_mut().insert(HOST, target.host.clone());
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((status, body))
    };
    let (status, body) = tokio::time::timeout(plan.request_timeout, exchange)
        .await
        .map_err(|_| {
            fail(format!(
                "no answer within {}",
                format_duration(plan.request_timeout)
            ))
        })?
        .map_err(|e| fail(format!("cannot read it: {e}")))?;
    if !status.is_success() {
        return Err(fail(format!(
            "answered {status}, not 2xx{}",
            if status == StatusCode::NOT_FOUND {
                " (wrong path?)"
            } else {
                ""
            }
        )));
    }
    parse_count(&body).map_err(fail)
}

/// `{"count": n}` or a bare non-negative integer.
pub(super) fn parse_count(body: &[u8]) -> Result<u64, String> {
    let shown = || String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|_| format!("expected {{\"count\": n}} or a number, got `{}`", shown()))?;
    let n = match &value {
        serde_json::Value::Object(map) => map.get("count"),
        other => Some(other),
    };
    n.and_then(serde_json::Value::as_u64).ok_or_else(|| {
        format!(
            "expected {{\"count\": n}} or a number (a non-negative integer), got `{}`",
            shown()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts() {
        assert_eq!(parse_count(b"{\"count\": 3}"), Ok(3));
        assert_eq!(parse_count(b"{\"orders\": 1, \"count\": 0}"), Ok(0));
        assert_eq!(parse_count(b"42\n"), Ok(42));
        for bad in [
            &b"{\"n\": 3}"[..],
            b"-1",
            b"1.5",
            b"three",
            b"",
            b"{\"count\": \"3\"}",
        ] {
            assert!(
                parse_count(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn fd_limits() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max cpu time              unlimited            unlimited            seconds\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(parse_fd_limit(limits), Some(1024));
        assert_eq!(
            parse_fd_limit("Max open files            unlimited            unlimited     files"),
            None
        );
        assert_eq!(parse_fd_limit(""), None);
    }

    #[test]
    fn keys_per_request() {
        let unique = Keys::Unique { prefix: "p".into() };
        assert_eq!(key_for(&unique, 7, || "7".into()), (7, Some("p-7".into())));
        assert_eq!(
            key_for(&Keys::One("k".into()), 7, String::new),
            (0, Some("k".into()))
        );
        assert_eq!(key_for(&Keys::None, 7, String::new), (0, None));
    }
}
