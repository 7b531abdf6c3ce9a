//! Streams: first-chunk latency of followers against the leader in a 100-way coalesced
//! stream, and replay throughput of a cached 2,000-chunk stream against a server writing the
//! same bytes from memory.
//!
//! `cargo bench --bench stream`

mod support;

use std::time::{Duration, Instant};

const REQUEST: &str =
    r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"bench"}]}"#;

async fn first_chunk(client: &reqwest::Client, url: &str) -> (String, Duration, usize) {
    let started = Instant::now();
    let mut resp = client
        .post(url)
        .header("authorization", "Bearer sk-bench")
        .body(REQUEST)
        .send()
        .await
        .expect("sent");
    let cache = resp.headers()["llm-dedup-cache"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let first = resp.chunk().await.expect("read").expect("first chunk");
    let latency = started.elapsed();
    let mut bytes = first.len();
    while let Some(c) = resp.chunk().await.expect("read") {
        bytes += c.len();
    }
    (cache, latency, bytes)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn replay_rate(
    client: &reqwest::Client,
    url: &str,
    body: &'static str,
    rounds: usize,
) -> f64 {
    let started = Instant::now();
    for _ in 0..rounds {
        let bytes = client
            .post(url)
            .header("authorization", "Bearer sk-bench")
            .body(body)
            .send()
            .await
            .expect("sent")
            .bytes()
            .await
            .expect("body");
        std::hint::black_box(bytes);
    }
    (rounds * 2_001) as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let client = support::client_builder()
        .pool_max_idle_per_host(200)
        .build()
        .expect("client");

    // 1. A 100-way coalesced stream: 50 ms to the first token, then 20 chunks 10 ms apart.
    let upstream = support::serve(support::streaming_app(
        20,
        Duration::from_millis(50),
        Duration::from_millis(10),
    ))
    .await;
    let proxy = support::proxy_for(upstream).await;
    let url = format!("http://{proxy}/v1/chat/completions");
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { first_chunk(&client, &url).await })
        })
        .collect();
    let mut leader = None;
    let mut followers = Vec::new();
    for t in tasks {
        let (cache, latency, _) = t.await.expect("task");
        if cache == "miss" {
            leader = Some(latency);
        } else {
            followers.push(latency);
        }
    }
    followers.sort();
    let leader = leader.expect("one leader");
    let (p50, p99, max) = (
        percentile(&followers, 0.5),
        percentile(&followers, 0.99),
        percentile(&followers, 1.0),
    );
    println!(
        "100-way coalesced stream: leader first chunk {leader:.1?}; {} followers: p50 {p50:.1?}, p99 {p99:.1?}, max {max:.1?} (p50 - leader {:+.1?} ms)",
        followers.len(),
        (p50.as_secs_f64() - leader.as_secs_f64()) * 1000.0,
    );

    // 2. Replay of a cached 2,000-chunk stream against the same bytes served from memory.
    let upstream = support::serve(support::streaming_app(
        2_000,
        Duration::ZERO,
        Duration::ZERO,
    ))
    .await;
    let proxy = support::proxy_for(upstream).await;
    let baseline = support::serve(support::fixed_stream_app(support::sse_text(2_000))).await;
    let proxy_url = format!("http://{proxy}/v1/chat/completions");
    let baseline_url = format!("http://{baseline}/v1/chat/completions");
    let (cache, _, bytes) = first_chunk(&client, &proxy_url).await;
    assert_eq!(cache, "miss");
    assert_eq!(bytes, support::sse_text(2_000).len());
    // Warm both up (connections, allocator) before measuring.
    replay_rate(&client, &baseline_url, REQUEST, 50).await;
    replay_rate(&client, &proxy_url, REQUEST, 50).await;
    let mut ratios = Vec::new();
    for round in 1..=3 {
        let b = replay_rate(&client, &baseline_url, REQUEST, 200).await;
        let p = replay_rate(&client, &proxy_url, REQUEST, 200).await;
        println!(
            "round {round}: replay of a cached 2,000-chunk stream {p:.0} chunks/s; same bytes from memory {b:.0} chunks/s; ratio {:.3}",
            p / b
        );
        ratios.push(p / b);
    }
    println!(
        "replay ratio, mean of 3 rounds: {:.3}",
        ratios.iter().sum::<f64>() / ratios.len() as f64
    );
}
