//! Shared by the benchmarks: an upstream that answers every request with the same bytes.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[path = "../../tests/common/http.rs"]
mod http;
#[path = "../../tests/common/redis_cluster.rs"]
mod redis_cluster;
#[path = "../../tests/common/redis_server.rs"]
mod redis_server;
#[allow(unused_imports)] // Not every bench builds clients of its own.
pub use http::client_builder;
#[allow(unused_imports)] // Only the fleet's bench starts one.
pub use redis_cluster::RedisCluster;
#[allow(unused_imports)] // Only the benches of the fleet start one.
pub use redis_server::RedisServer;

use axum::Router;
use axum::body::Bytes;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;

/// A chat completion answer as OpenAI sends it (about 600 bytes).
pub const ANSWER: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"The capital of France is Paris. It has been the country's capital for most of its history and is its largest city.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":14,"completion_tokens":25,"total_tokens":39,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}},"system_fingerprint":"fp_bench"}"#;

/// The request the benchmarks repeat.
pub const REQUEST: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"What is the capital of France?"}],"temperature":0}"#;

async fn fixed() -> impl IntoResponse {
    ([(CONTENT_TYPE, "application/json")], ANSWER)
}

async fn read_then_fixed(body: Bytes) -> impl IntoResponse {
    std::hint::black_box(body);
    ([(CONTENT_TYPE, "application/json")], ANSWER)
}

/// A server answering every request with [`ANSWER`] without reading the request body: the
/// fake upstream, and the lower-bound baseline.
pub fn fixed_app() -> Router {
    Router::new().fallback(fixed)
}

/// A server that reads the request body, then answers [`ANSWER`]: the least any server
/// answering a POST does, and the baseline the proxy's hit path is held to.
pub fn reading_app() -> Router {
    Router::new().fallback(read_then_fixed)
}

/// Serves the llm-dedup proxy, on its defaults and no database, in front of `upstream`.
pub async fn proxy_for(upstream: SocketAddr) -> SocketAddr {
    let engine = llm_dedup::Dedup::builder()
        .upstream(format!("http://{upstream}"))
        .build()
        .expect("engine");
    serve(llm_dedup::server::app(engine)).await
}

/// Serves `app` on a fresh port of 127.0.0.1 in the current runtime.
pub async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    // With the peer's address, as `llm-dedup serve` does: the operator endpoints answer
    // loopback clients.
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    addr
}

/// A setting of a scenario run, from the environment (`cargo bench` passes its own flags).
pub fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Serves `engine` as `llm-dedup serve` does (its edge on its default limits, operator
/// endpoints for loopback clients) on a fresh port of 127.0.0.1 in the current runtime.
pub async fn serve_proxy(engine: llm_dedup::Dedup) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(llm_dedup::server::serve(
        listener,
        engine,
        llm_dedup::server::OperatorAccess::loopback_only(),
        llm_dedup::server::EdgeLimits::default(),
        std::future::pending::<()>(),
    ));
    addr
}

/// Requests per second that `conns` keep-alive connections achieve against `addr` for `secs`.
///
/// Like wrk, each connection writes a prepared HTTP/1.1 request and reads just enough of the
/// answer to frame it (the header block, then `Content-Length` bytes), so the load generator
/// costs little and the server, not the client, is what is measured. Every answer must be a
/// 200 with the expected body length and, with `expect_hit`, carry `llm-dedup-cache: hit`.
pub async fn load(addr: SocketAddr, conns: u64, secs: u64, expect_hit: bool) -> f64 {
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer sk-bench\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
        REQUEST.len(),
        REQUEST
    );
    let request: Arc<[u8]> = request.into_bytes().into();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let workers: Vec<_> = (0..conns)
        .map(|_| {
            let (request, done, stop) = (request.clone(), done.clone(), stop.clone());
            tokio::spawn(async move {
                let mut conn = TcpStream::connect(addr).await.expect("connect");
                conn.set_nodelay(true).expect("nodelay");
                let mut buf = Vec::with_capacity(16 * 1024);
                while !stop.load(Ordering::Relaxed) {
                    conn.write_all(&request).await.expect("write");
                    let answer = read_answer(&mut conn, &mut buf).await;
                    assert!(answer.ok, "not a 200: {answer:?}");
                    assert!(!expect_hit || answer.hit, "not a hit: {answer:?}");
                    assert_eq!(answer.body_len, ANSWER.len());
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// A chat completion stream of `events` chunks, as the API frames it, ending in `[DONE]`.
pub fn sse_text(events: usize) -> String {
    let mut text = String::new();
    for i in 0..events {
        text.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token{i} \"}},\"finish_reason\":null}}]}}\n\n"
        ));
    }
    text.push_str("data: [DONE]\n\n");
    text
}

/// An upstream that streams `events` chunks, `gap` apart, after `first` of "thinking".
pub fn streaming_app(
    events: usize,
    first: std::time::Duration,
    gap: std::time::Duration,
) -> Router {
    let text = sse_text(events);
    let chunks: Vec<String> = text.split_inclusive("\n\n").map(str::to_owned).collect();
    Router::new().fallback(move || {
        let chunks = chunks.clone();
        async move {
            let stream = futures_util::stream::unfold(
                (chunks.into_iter(), true),
                move |(mut it, start)| async move {
                    tokio::time::sleep(if start { first } else { gap }).await;
                    it.next().map(|c| (Ok::<_, std::io::Error>(c), (it, false)))
                },
            );
            (
                [(CONTENT_TYPE, "text/event-stream")],
                axum::body::Body::from_stream(stream),
            )
        }
    })
}

/// A server answering every request with the same stream bytes, from memory (a shared
/// buffer, as the cache's own replay uses: no copy per request).
pub fn fixed_stream_app(text: String) -> Router {
    let text = Bytes::from(text);
    Router::new().fallback(move || {
        let text = text.clone();
        async move { ([(CONTENT_TYPE, "text/event-stream")], text) }
    })
}

/// How a rate-limited upstream counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// A bucket of `per_second` refilling continuously, as OpenAI describes its limits: the
    /// reset header is the time until the bucket is full again.
    Bucket,
    /// Fixed one-second windows of `per_second` requests: the headers say truthfully how many
    /// remain in this window and when it ends; nothing comes back before that.
    Window,
}

/// Calls and refusals an upstream made of `limited_app` saw.
pub type LimitCounters = std::sync::Arc<(
    std::sync::atomic::AtomicUsize,
    std::sync::atomic::AtomicUsize,
)>;

/// An upstream allowing `per_second` requests a second, counted as `limit` says, answering
/// 429 `rate_limit_exceeded` with `retry-after-ms` and `x-ratelimit-*` headers past it, as
/// OpenAI does. Returns the app and its counters: (calls, refusals).
pub fn limited_app(per_second: f64, limit: Limit) -> (Router, LimitCounters) {
    use std::sync::atomic::Ordering;
    let counters: LimitCounters = std::sync::Arc::new((
        std::sync::atomic::AtomicUsize::new(0),
        std::sync::atomic::AtomicUsize::new(0),
    ));
    let started = std::time::Instant::now();
    // Bucket: (tokens, last refill). Window: (used in the window, the window's start).
    let state = std::sync::Arc::new(std::sync::Mutex::new((0.0f64, started)));
    if limit == Limit::Bucket {
        state.lock().expect("lock").0 = per_second;
    }
    let seen = counters.clone();
    let app = Router::new().fallback(move || {
        let (seen, state) = (seen.clone(), state.clone());
        async move {
            seen.0.fetch_add(1, Ordering::SeqCst);
            let mut s = state.lock().expect("lock");
            let now = std::time::Instant::now();
            let ms = |secs: f64| format!("{}", (secs * 1000.0).ceil().max(1.0));
            // (allowed, remaining after this request, seconds until reset, seconds to wait)
            let (allowed, remaining, reset, wait) = match limit {
                Limit::Bucket => {
                    let tokens = (s.0 + now.duration_since(s.1).as_secs_f64() * per_second)
                        .min(per_second);
                    let allowed = tokens >= 1.0;
                    let after = if allowed { tokens - 1.0 } else { tokens };
                    *s = (after, now);
                    // Time until the bucket is full again, after this request.
                    let reset = (per_second - after.max(0.0)) / per_second;
                    (allowed, after, reset, (1.0 - tokens) / per_second)
                }
                Limit::Window => {
                    let elapsed = now.duration_since(started).as_secs_f64();
                    let window_start = elapsed.floor();
                    if started + std::time::Duration::from_secs_f64(window_start) != s.1 {
                        *s = (0.0, started + std::time::Duration::from_secs_f64(window_start));
                    }
                    let allowed = s.0 < per_second;
                    if allowed {
                        s.0 += 1.0;
                    }
                    let left = window_start + 1.0 - elapsed;
                    (allowed, per_second - s.0, left, left)
                }
            };
            let headers = [
                ("x-ratelimit-limit-requests", format!("{per_second}")),
                ("x-ratelimit-remaining-requests", format!("{}", remaining.max(0.0).floor())),
                ("x-ratelimit-reset-requests", format!("{}ms", ms(reset))),
            ];
            if !allowed {
                seen.1.fetch_add(1, Ordering::SeqCst);
                let body = r#"{"error":{"message":"Rate limit reached on requests per min (RPM).","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
                let mut r = (axum::http::StatusCode::TOO_MANY_REQUESTS, headers, body).into_response();
                r.headers_mut().insert("retry-after-ms", ms(wait).parse().expect("value"));
                return r;
            }
            ([(CONTENT_TYPE.as_str(), "application/json".to_owned())], headers, ANSWER).into_response()
        }
    });
    (app, counters)
}

/// What an embeddings upstream received: calls and inputs.
#[derive(Default)]
pub struct EmbedCounters {
    pub calls: std::sync::atomic::AtomicUsize,
    pub inputs: std::sync::atomic::AtomicUsize,
}

/// An embeddings upstream that takes `latency` to answer a call, as OpenAI does for small
/// batches, with one base64 embedding of 1536 dimensions (8 KiB, what the official SDKs ask
/// for) per input.
pub fn embeddings_app(latency: std::time::Duration) -> (Router, std::sync::Arc<EmbedCounters>) {
    use std::sync::atomic::Ordering;
    let counters = std::sync::Arc::new(EmbedCounters::default());
    let seen = counters.clone();
    // 1536 little-endian f32s in base64.
    let vector = format!("\"{}\"", "A".repeat(1536 * 4 / 3 * 4));
    let app = Router::new().fallback(move |body: Bytes| {
        let (seen, vector) = (seen.clone(), vector.clone());
        async move {
            let Ok(request) = serde_json::from_slice::<serde_json::Value>(&body) else {
                // Not an embeddings request (a connection warm-up): not counted.
                return ([(CONTENT_TYPE, "application/json")], "{}").into_response();
            };
            let n = match &request["input"] {
                serde_json::Value::Array(items) => items.len(),
                _ => 1,
            };
            seen.calls.fetch_add(1, Ordering::SeqCst);
            seen.inputs.fetch_add(n, Ordering::SeqCst);
            tokio::time::sleep(latency).await;
            let data: Vec<String> = (0..n)
                .map(|i| format!(r#"{{"object":"embedding","index":{i},"embedding":{vector}}}"#))
                .collect();
            let body = format!(
                r#"{{"object":"list","data":[{}],"model":"text-embedding-3-small","usage":{{"prompt_tokens":{},"total_tokens":{}}}}}"#,
                data.join(","),
                n * 8,
                n * 8
            );
            // Generous limits, as an account with headroom sees them.
            let headers = [
                (CONTENT_TYPE.as_str(), "application/json"),
                ("x-ratelimit-limit-requests", "10000"),
                ("x-ratelimit-remaining-requests", "9999"),
                ("x-ratelimit-reset-requests", "6ms"),
            ];
            (headers, body).into_response()
        }
    })
    // Requests of many inputs beside large fields are this upstream's to refuse, not axum's.
    .layer(axum::extract::DefaultBodyLimit::disable());
    (app, counters)
}

/// What the generator checks of an answer.
#[derive(Debug)]
pub struct Seen {
    pub ok: bool,
    pub hit: bool,
    pub body_len: usize,
}

/// Reads one answer off `conn`, its header block read in place: no copy, no allocation (the
/// longer header block of the proxy must not make the generator slower on its side).
pub async fn read_answer(conn: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Seen {
    let mut searched: usize = 0;
    loop {
        // Look for the blank line only in what has not been searched yet.
        let from = searched.saturating_sub(3);
        if let Some(at) = buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            let end = from + at;
            let mut seen = Seen {
                ok: buf.starts_with(b"HTTP/1.1 200"),
                hit: false,
                body_len: 0,
            };
            for line in buf[..end].split(|b| *b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let Some(colon) = line.iter().position(|b| *b == b':') else {
                    continue;
                };
                let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
                if name.eq_ignore_ascii_case(b"content-length") {
                    seen.body_len = std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .expect("content-length");
                } else if name.eq_ignore_ascii_case(b"llm-dedup-cache") {
                    seen.hit = value == b"hit";
                }
            }
            let total = end + 4 + seen.body_len;
            while buf.len() < total {
                read_more(conn, buf).await;
            }
            buf.drain(..total);
            return seen;
        }
        searched = buf.len();
        read_more(conn, buf).await;
    }
}

async fn read_more(conn: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) {
    // Straight into the buffer's spare room: nothing to zero, nothing to copy.
    buf.reserve(4096);
    let n = tokio::io::AsyncReadExt::read_buf(conn, buf)
        .await
        .expect("read");
    assert!(n > 0, "server closed the connection");
}
