//! What a completed record costs the memory store, in resident memory.
//!
//! ```sh
//! cargo run --release -p idem --example memory_rss            # 1 000 000 records
//! cargo run --release -p idem --example memory_rss -- 200000  # fewer
//! ```
//!
//! Fills a [`MemoryStore`] with its default limits (1 000 000 entries,
//! 512 MiB) with `N` distinct keys, each reserved then completed with what
//! a gateway stores for a typical `POST`: status 201, `content-type` and
//! `location` headers, a 100-byte body, kept 10 minutes. The key is a
//! UUID in the global scope, as a client would send it. Then it does it
//! again with `N` new keys: once the store is full every new record evicts
//! the oldest, which is its steady state. Resident memory (`VmRSS` of
//! `/proc/self/status`) is read before and after each round; the figure is
//! the growth divided by the records held, beside the store's own byte
//! accounting (`MemoryStore::bytes`, what its `max_bytes` bound counts).
//!
//! Beside it: the record's *payload* and the target of issue #9, resident
//! bytes per record at most `2 × payload + 200`. The payload is what the
//! caller gave the store to keep for that record: the response body, each
//! stored header's name and value, the status (2 bytes) and the
//! idempotency key as the client sent it (36 bytes here). Not counted: the
//! 32-byte request fingerprint, the scope prefix of the store key (33
//! bytes of `hex(scope) ":"`), the times and the token, which the store
//! adds or derives (they are overhead). Here: 100 + 60 + 2 + 36 = 198
//! bytes, so the target is 596 bytes.
//!
//! Linux only (it reads `/proc`). Single-threaded, so the allocator keeps
//! one arena and the figure is not inflated by per-thread caches.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use idem::store::Reservation;
use idem::{CompletedRecord, Fingerprint, MemoryStore, Scope, Store, StoreKey, StoredResponse};

const BODY_LEN: usize = 100;
const RETENTION: Duration = Duration::from_secs(600);
const LEASE: Duration = Duration::from_secs(30);

/// Resident set size in bytes, from `/proc/self/status`.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A UUID-shaped client key (36 characters), distinct for each `n`.
fn client_key(round: u64, n: u64) -> String {
    let x = (round << 40) | n;
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (x >> 32) as u32,
        (x >> 16) as u16,
        x & 0xfff,
        (x >> 12) & 0xfff,
        x.wrapping_mul(0x9e37_79b9_7f4a_7c15) & 0xffff_ffff_ffff
    )
}

/// What the gateway stores for a `201 Created`: the response's headers
/// (hop-by-hop ones stripped) and its body, each copied out of the
/// connection's buffers.
fn record(n: u64, fingerprint: Fingerprint) -> Arc<CompletedRecord> {
    let mut body = format!(
        "{{\"id\":\"ord_{n:012}\",\"status\":\"accepted\",\"sku\":\"tea\",\"qty\":1,\"note\":\""
    );
    while body.len() < BODY_LEN - 2 {
        body.push('x');
    }
    body.push_str("\"}");
    let now = SystemTime::now();
    Arc::new(CompletedRecord {
        fingerprint,
        response: StoredResponse {
            status: 201,
            headers: vec![
                (
                    "content-type".to_owned(),
                    Bytes::copy_from_slice(b"application/json"),
                ),
                (
                    "location".to_owned(),
                    Bytes::copy_from_slice(format!("/orders/ord_{n:012}").as_bytes()),
                ),
            ],
            body: Bytes::copy_from_slice(body.as_bytes()),
        },
        completed_at: now,
        expires_at: now + RETENTION,
    })
}

/// The payload of a record (see the top): body, header names and values,
/// status and the client's key.
fn payload(client_key: &str, record: &CompletedRecord) -> u64 {
    let response = &record.response;
    let headers: usize = response
        .headers
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum();
    (response.body.len() + headers + 2 + client_key.len()) as u64
}

/// Fills the store with `count` fresh records; the sum of their payloads.
async fn fill(store: &MemoryStore, round: u64, count: u64) -> u64 {
    let scope = Scope::global();
    let mut payloads = 0;
    for n in 0..count {
        let client_key = client_key(round, n);
        let key = StoreKey::new(&scope, &client_key);
        let mut fp = [0u8; 32];
        fp[..8].copy_from_slice(&n.to_le_bytes());
        let fingerprint = Fingerprint(fp);
        let token = match store.reserve(&key, fingerprint, LEASE).await {
            Ok(Reservation::Acquired(lease)) => lease.token,
            other => {
                eprintln!("reserve of a fresh key answered {other:?}");
                std::process::exit(1);
            }
        };
        let record = record(n, fingerprint);
        payloads += payload(&client_key, &record);
        if let Err(e) = store.complete(&key, token, record, RETENTION).await {
            eprintln!("complete failed: {e}");
            std::process::exit(1);
        }
    }
    payloads
}

fn per_record(bytes: u64, records: usize) -> u64 {
    bytes / (records.max(1) as u64)
}

fn main() {
    let count: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.replace('_', "").parse().ok())
        .unwrap_or(1_000_000);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("no runtime: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(async {
        let store = MemoryStore::new();
        let base = rss();
        println!(
            "records: {count} per round, body {BODY_LEN} B, limits {:?}",
            store.limits()
        );
        println!("rss at start: {} KiB", base / 1024);
        for round in 1..=2 {
            let started = std::time::Instant::now();
            let payload = fill(&store, round, count).await / count.max(1);
            let elapsed = started.elapsed().as_secs_f64();
            let now = rss();
            let held = store.len();
            let resident = per_record(now.saturating_sub(base), held);
            let target = 2 * payload + 200;
            println!(
                "round {round}: {held} records held, {elapsed:.2} s; rss +{} MiB = {resident} B/record; \
                 store accounting {} B/record",
                (now - base) / (1024 * 1024),
                per_record(store.bytes(), held),
            );
            println!(
                "         payload {payload} B/record; target 2 x payload + 200 = {target} B/record: {}",
                if resident <= target { "met" } else { "not met" },
            );
        }
    });
}
