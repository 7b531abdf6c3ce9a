//! Three replicas on one Redis, against local upstreams; every figure beside a baseline from
//! the same run.
//!
//! (a) 300 identical requests at once, round-robin over the replicas, upstream taking 500 ms:
//!     upstream calls, and latency p50/max against the same burst sent straight upstream.
//! (b) 60 distinct requests at once over the replicas, upstream allowing 10 a second:
//!     successes, client 429s, upstream 429s, wall time against the ideal 6 s.
//! (c) hit latency: from Redis (memory cold) against a memory hit and an SQLite hit.
//! (d) Redis memory per stored answer, chat (as it came) and streamed (deflated).
//!
//! `cargo bench --bench fleet` (needs `redis-server`).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;

fn request(content: &str) -> String {
    format!(r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{content}"}}]}}"#)
}

/// An upstream answering [`support::ANSWER`] after `delay`, counting its calls.
fn slow_app(delay: Duration) -> (Router, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let app = Router::new().fallback(move || {
        let seen = seen.clone();
        async move {
            seen.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                support::ANSWER,
            )
        }
    });
    (app, calls)
}

async fn replica(upstream: SocketAddr, redis: &str, db: Option<&std::path::Path>) -> SocketAddr {
    let mut builder = llm_dedup::Dedup::builder()
        .upstream(format!("http://{upstream}"))
        .redis(redis);
    if let Some(db) = db {
        builder = builder.database(db);
    }
    support::serve(llm_dedup::server::app(builder.build().expect("engine"))).await
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Fires `bodies[i]` at `urls[i % len]` all at once with API key `key`; (status, seconds) of
/// each.
async fn fire(
    client: &reqwest::Client,
    urls: &[String],
    key: &str,
    bodies: Vec<String>,
) -> Vec<(u16, f64)> {
    let authorization = format!("Bearer {key}");
    let tasks: Vec<_> = bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            let (client, url) = (client.clone(), urls[i % urls.len()].clone());
            let authorization = authorization.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let status = client
                    .post(&url)
                    .header("authorization", authorization)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .expect("sent");
                let code = status.status().as_u16();
                let _ = status.bytes().await;
                (code, started.elapsed().as_secs_f64())
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

/// Sends one chat request to `url` and returns its answer, head read.
async fn send_one(client: &reqwest::Client, url: &str, body: &str) -> reqwest::Response {
    client
        .post(url)
        .header("authorization", "Bearer sk-bench")
        .body(body.to_owned())
        .send()
        .await
        .expect("sent")
}

/// Sends `bodies` one by one to `url`, so that their answers are stored.
async fn store_all(client: &reqwest::Client, url: &str, bodies: &[String]) {
    for body in bodies {
        let _ = send_one(client, url, body).await.bytes().await;
    }
}

/// Sequential latencies (seconds, sorted) of `bodies` sent one by one to `url`.
async fn sequential(client: &reqwest::Client, url: &str, bodies: &[String]) -> Vec<f64> {
    let mut took = Vec::with_capacity(bodies.len());
    for body in bodies {
        let started = Instant::now();
        let r = send_one(client, url, body).await;
        assert!(r.headers()["llm-dedup-cache"] == "hit", "expected a hit");
        let _ = r.bytes().await;
        took.push(started.elapsed().as_secs_f64());
    }
    took.sort_by(f64::total_cmp);
    took
}

#[tokio::main]
async fn main() {
    let Some(redis) = support::RedisServer::start() else {
        return;
    };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(400)
        .build()
        .expect("client");

    // (a) One call for the fleet.
    let (app, calls) = slow_app(Duration::from_millis(500));
    let upstream = support::serve(app).await;
    let direct = fire(
        &client,
        &[format!("http://{upstream}/v1/chat/completions")],
        "sk-bench",
        vec![request("the same question"); 300],
    )
    .await;
    let direct_calls = calls.swap(0, Ordering::SeqCst);
    let mut urls = Vec::new();
    for _ in 0..3 {
        let r = replica(upstream, &redis.url(), None).await;
        urls.push(format!("http://{r}/v1/chat/completions"));
    }
    let fleet = fire(
        &client,
        &urls,
        "sk-bench",
        vec![request("the same question"); 300],
    )
    .await;
    let latencies = |seen: &[(u16, f64)]| {
        let mut l: Vec<f64> = seen.iter().map(|(_, s)| *s * 1000.0).collect();
        l.sort_by(f64::total_cmp);
        (percentile(&l, 0.5), l[l.len() - 1])
    };
    let ((dp50, dmax), (fp50, fmax)) = (latencies(&direct), latencies(&fleet));
    println!(
        "(a) 300 identical at once over 3 replicas: {} upstream call(s) (straight: {direct_calls}); \
         {} of 300 succeeded; latency p50 {fp50:.0} ms, max {fmax:.0} ms (straight: p50 {dp50:.0} \
         ms, max {dmax:.0} ms; ratio p50 {:.2})",
        calls.load(Ordering::SeqCst),
        fleet.iter().filter(|(s, _)| *s == 200).count(),
        fp50 / dp50
    );

    // (b) The fleet under one rate budget, against a bucket and against fixed windows: each
    // with a key of its own, as two providers' budgets would be (the fleet keeps what it
    // learned of a budget ten minutes).
    for limit in [support::Limit::Bucket, support::Limit::Window] {
        let (app, counters) = support::limited_app(10.0, limit);
        let limited = support::serve(app).await;
        let mut urls = Vec::new();
        for _ in 0..3 {
            let r = replica(limited, &redis.url(), None).await;
            urls.push(format!("http://{r}/v1/chat/completions"));
        }
        let started = Instant::now();
        let seen = fire(
            &client,
            &urls,
            &format!("sk-bench-{limit:?}"),
            (0..60)
                .map(|i| request(&format!("distinct {limit:?} {i}")))
                .collect(),
        )
        .await;
        let secs = started.elapsed().as_secs_f64();
        println!(
            "(b) 60 distinct at once over 3 replicas, upstream allowing 10/s ({limit:?}): {}/60 \
             succeeded, {} client 429s, {} upstream 429s in {} calls, {secs:.2} s (ideal 6 s: \
             ratio {:.2})",
            seen.iter().filter(|(s, _)| *s == 200).count(),
            seen.iter().filter(|(s, _)| *s == 429).count(),
            counters.1.load(Ordering::SeqCst),
            counters.0.load(Ordering::SeqCst),
            secs / 6.0
        );
    }

    // (c) Hit latency by tier, on a Redis of its own: the first replica there is the one with
    // the database, so the fleet's salt is its file's and the file's keys match.
    drop(redis);
    let Some(redis) = support::RedisServer::start() else {
        return;
    };
    let (app, _) = slow_app(Duration::ZERO);
    let fast = support::serve(app).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("bench.db");
    let writer = replica(fast, &redis.url(), Some(&db)).await;
    let bodies: Vec<String> = (0..1000).map(|i| request(&format!("hit {i}"))).collect();
    let writer_url = format!("http://{writer}/v1/chat/completions");
    store_all(&client, &writer_url, &bodies).await;
    let memory = sequential(&client, &writer_url, &bodies).await;
    let cold = replica(fast, &redis.url(), None).await;
    let from_redis = sequential(
        &client,
        &format!("http://{cold}/v1/chat/completions"),
        &bodies,
    )
    .await;
    // SQLite, memory cold and no Redis: a fresh engine on the writer's file.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let local = llm_dedup::Dedup::builder()
        .upstream(format!("http://{fast}"))
        .database(&db)
        .build()
        .expect("engine");
    let local = support::serve(llm_dedup::server::app(local)).await;
    let from_disk = sequential(
        &client,
        &format!("http://{local}/v1/chat/completions"),
        &bodies,
    )
    .await;
    let us = |l: &[f64]| percentile(l, 0.5) * 1e6;
    println!(
        "(c) hit latency p50 over 1000 sequential requests: memory {:.0} µs, Redis (memory cold) \
         {:.0} µs ({:.2} x memory), SQLite (memory cold) {:.0} µs ({:.2} x memory)",
        us(&memory),
        us(&from_redis),
        us(&from_redis) / us(&memory),
        us(&from_disk),
        us(&from_disk) / us(&memory)
    );

    // (d) Redis memory per answer: chat answers (short: written as they came) and streamed
    // answers (deflated), each against its body and against what deflate makes of it.
    let used = |info: String| -> f64 {
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let deflate_ratio = |body: &str| {
        use std::io::Write;
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(body.as_bytes()).expect("deflate");
        body.len() as f64 / e.finish().expect("deflate").len() as f64
    };
    let before = used(redis.command("INFO memory"));
    let more: Vec<String> = (0..2000).map(|i| request(&format!("memory {i}"))).collect();
    store_all(&client, &writer_url, &more).await;
    let after = used(redis.command("INFO memory"));
    println!(
        "(d) Redis memory: {:.0} bytes per stored chat answer over 2000 answers of {} bytes of \
         body ({:.2} x the body; stored as it came: deflate would make it {:.2} x smaller)",
        (after - before) / 2000.0,
        support::ANSWER.len(),
        (after - before) / 2000.0 / support::ANSWER.len() as f64,
        deflate_ratio(support::ANSWER)
    );
    // Streamed answers on a Redis of their own, so that every entry there is one of them.
    drop(redis);
    let Some(redis) = support::RedisServer::start() else {
        return;
    };
    let sse = support::sse_text(200);
    let streams = support::serve(support::fixed_stream_app(sse.clone())).await;
    let streamer = replica(streams, &redis.url(), None).await;
    let streamer_url = format!("http://{streamer}/v1/chat/completions");
    let streamed: Vec<String> = (0..500)
        .map(|i| {
            format!(
                r#"{{"model":"gpt-4o-mini","stream":true,"messages":[{{"role":"user","content":"stream {i}"}}]}}"#
            )
        })
        .collect();
    store_all(&client, &streamer_url, &streamed).await;
    // Each stored entry, and each live relay (kept a minute after its stream ended).
    let conn = redis::Client::open(redis.url().as_str())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let per_kind = |pattern: &'static str| {
        let mut conn = conn.clone();
        async move {
            let names: Vec<String> = redis::cmd("KEYS")
                .arg(pattern)
                .query_async(&mut conn)
                .await
                .expect("keys");
            let mut total = 0u64;
            for name in &names {
                let used: Option<u64> = redis::cmd("MEMORY")
                    .arg("USAGE")
                    .arg(name)
                    .query_async(&mut conn)
                    .await
                    .expect("memory usage");
                total += used.unwrap_or(0);
            }
            total as f64 / names.len().max(1) as f64
        }
    };
    let entry = per_kind("llm-dedup:*:e:*").await;
    let relay = per_kind("llm-dedup:*:s:*").await;
    println!(
        "(d) Redis memory per streamed answer of {} bytes (200 events): entry {entry:.0} bytes \
         ({:.1} x smaller than the body; deflate alone: {:.1} x); its live relay, kept a minute \
         after the stream ends, {relay:.0} bytes meanwhile",
        sse.len(),
        sse.len() as f64 / entry,
        deflate_ratio(&sse),
    );
}
