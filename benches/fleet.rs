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
    sealed_replica(upstream, redis, db, None).await
}

/// A replica as [`replica`], with a fleet secret when `secret` is given.
async fn sealed_replica(
    upstream: SocketAddr,
    redis: &str,
    db: Option<&std::path::Path>,
    secret: Option<&str>,
) -> SocketAddr {
    let mut builder = llm_dedup::Dedup::builder()
        .upstream(format!("http://{upstream}"))
        .redis(redis);
    if let Some(db) = db {
        builder = builder.database(db);
    }
    if let Some(secret) = secret {
        builder = builder.fleet_secret(llm_dedup::FleetSecret::new(secret).expect("secret"));
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

/// Parts (a) to (c) against the fleet's Redis at `url` (one node or a cluster), each line
/// labelled `label`; (c), run first on a fresh Redis, times SQLite too when `disk`. Returns the fast upstream (c) used.
async fn parts_a_to_c(client: &reqwest::Client, url: &str, label: &str, disk: bool) -> SocketAddr {
    // (c) Hit latency by tier: memory, Redis with memory cold, and SQLite with memory cold
    // (a fresh engine on the file the first replica wrote). First, so that the fleet's salt
    // is the writer's file's.
    let (app, _) = slow_app(Duration::ZERO);
    let fast = support::serve(app).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("bench.db");
    let writer = replica(fast, url, disk.then_some(db.as_path())).await;
    let bodies: Vec<String> = (0..1000)
        .map(|i| request(&format!("hit {label} {i}")))
        .collect();
    let writer_url = format!("http://{writer}/v1/chat/completions");
    store_all(client, &writer_url, &bodies).await;
    let memory = sequential(client, &writer_url, &bodies).await;
    let cold = replica(fast, url, None).await;
    let from_redis = sequential(
        client,
        &format!("http://{cold}/v1/chat/completions"),
        &bodies,
    )
    .await;
    let us = |l: &[f64]| percentile(l, 0.5) * 1e6;
    let disk_figure = if disk {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let local = llm_dedup::Dedup::builder()
            .upstream(format!("http://{fast}"))
            .database(&db)
            .build()
            .expect("engine");
        let local = support::serve(llm_dedup::server::app(local)).await;
        let from_disk = sequential(
            client,
            &format!("http://{local}/v1/chat/completions"),
            &bodies,
        )
        .await;
        format!(
            ", SQLite (memory cold) {:.0} µs ({:.2} x memory)",
            us(&from_disk),
            us(&from_disk) / us(&memory)
        )
    } else {
        String::new()
    };
    println!(
        "{label} (c) hit latency p50 over 1000 sequential requests: memory {:.0} µs, Redis \
         (memory cold) {:.0} µs ({:.2} x memory){disk_figure}",
        us(&memory),
        us(&from_redis),
        us(&from_redis) / us(&memory),
    );
    // (a) One call for the fleet.
    let (app, calls) = slow_app(Duration::from_millis(500));
    let upstream = support::serve(app).await;
    let direct = fire(
        client,
        &[format!("http://{upstream}/v1/chat/completions")],
        "sk-bench",
        vec![request(&format!("the same question {label}")); 300],
    )
    .await;
    let direct_calls = calls.swap(0, Ordering::SeqCst);
    let mut urls = Vec::new();
    for _ in 0..3 {
        let r = replica(upstream, url, None).await;
        urls.push(format!("http://{r}/v1/chat/completions"));
    }
    let fleet = fire(
        client,
        &urls,
        "sk-bench",
        vec![request(&format!("the same question {label}")); 300],
    )
    .await;
    let latencies = |seen: &[(u16, f64)]| {
        let mut l: Vec<f64> = seen.iter().map(|(_, s)| *s * 1000.0).collect();
        l.sort_by(f64::total_cmp);
        (percentile(&l, 0.5), l[l.len() - 1])
    };
    let ((dp50, dmax), (fp50, fmax)) = (latencies(&direct), latencies(&fleet));
    println!(
        "{label} (a) 300 identical at once over 3 replicas: {} upstream call(s) (straight: {direct_calls}); \
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
            let r = replica(limited, url, None).await;
            urls.push(format!("http://{r}/v1/chat/completions"));
        }
        let started = Instant::now();
        let seen = fire(
            client,
            &urls,
            &format!("sk-bench-{label}-{limit:?}"),
            (0..60)
                .map(|i| request(&format!("distinct {label} {limit:?} {i}")))
                .collect(),
        )
        .await;
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{label} (b) 60 distinct at once over 3 replicas, upstream allowing 10/s ({limit:?}): {}/60 \
             succeeded, {} client 429s, {} upstream 429s in {} calls, {secs:.2} s (ideal 6 s: \
             ratio {:.2})",
            seen.iter().filter(|(s, _)| *s == 200).count(),
            seen.iter().filter(|(s, _)| *s == 429).count(),
            counters.1.load(Ordering::SeqCst),
            counters.0.load(Ordering::SeqCst),
            secs / 6.0
        );
    }

    fast
}

#[tokio::main]
async fn main() {
    let client = support::client_builder()
        .pool_max_idle_per_host(400)
        .build()
        .expect("client");
    // (a) to (c) on one node, then on a three-master cluster, in this one run.
    let Some(redis) = support::RedisServer::start() else {
        return;
    };
    let fast = parts_a_to_c(&client, &redis.url(), "single node", true).await;
    if let Some(cluster) = support::RedisCluster::start() {
        parts_a_to_c(&client, &cluster.url(), "cluster", false).await;
    }
    // The file the (fresh) single node's writer filled, for (d).
    let writer = replica(fast, &redis.url(), None).await;
    let writer_url = format!("http://{writer}/v1/chat/completions");
    let us = |l: &[f64]| percentile(l, 0.5) * 1e6;

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

    drop(redis);

    // (e) What sealing costs (issue "Fleet trust"): the Redis hit's p50 and Redis memory per
    // entry with a fleet secret and without, rounds alternating on a fresh Redis each, in
    // this one run.
    let mut figures: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
    for round in 0..4 {
        let sealed = round % 2 == 1;
        let secret = sealed.then_some("the fleet bench's own secret");
        let Some(redis) = support::RedisServer::start() else {
            return;
        };
        let writer = sealed_replica(fast, &redis.url(), None, secret).await;
        let bodies: Vec<String> = (0..1000)
            .map(|i| request(&format!("sealed {round} {i}")))
            .collect();
        let before = used(redis.command("INFO memory"));
        store_all(
            &client,
            &format!("http://{writer}/v1/chat/completions"),
            &bodies,
        )
        .await;
        let per_entry = (used(redis.command("INFO memory")) - before) / 1000.0;
        let cold = sealed_replica(fast, &redis.url(), None, secret).await;
        let hits = sequential(
            &client,
            &format!("http://{cold}/v1/chat/completions"),
            &bodies,
        )
        .await;
        figures[usize::from(sealed)].push((us(&hits), per_entry));
    }
    let mean =
        |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| v.iter().map(f).sum::<f64>() / v.len() as f64;
    let (plain, sealed) = (&figures[0], &figures[1]);
    println!(
        "(e) sealing: Redis hit p50 {:.0} µs sealed vs {:.0} µs unsealed ({:.2} x; rounds {:?} vs \
         {:?}); Redis memory per entry {:.0} vs {:.0} bytes ({:.2} x)",
        mean(sealed, |f| f.0),
        mean(plain, |f| f.0),
        mean(sealed, |f| f.0) / mean(plain, |f| f.0),
        sealed.iter().map(|f| f.0.round()).collect::<Vec<_>>(),
        plain.iter().map(|f| f.0.round()).collect::<Vec<_>>(),
        mean(sealed, |f| f.1),
        mean(plain, |f| f.1),
        mean(sealed, |f| f.1) / mean(plain, |f| f.1),
    );
}
