//! Embeddings scenarios, against an upstream that takes 100 ms a call:
//!
//! 1. 200 clients each embed one sentence at the same moment: upstream calls and client
//!    latency (p50, max) with merging on (5 ms window), off, and straight to the upstream.
//! 2. A corpus of 10,000 chunks is indexed, then 10 % of the chunks change and it is indexed
//!    again: inputs sent upstream by each pass, in requests of 100 chunks, 4 at a time.
//! 3. Three clients at once each send 2,048 inputs beside a 4 MB field the API does not know
//!    (a hostile or careless client), while another repeats a cached request: the three
//!    requests' wall time, and the repeat's latency meanwhile against its latency alone.
//!
//! `cargo bench --bench embed`

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use llm_dedup::{Dedup, EmbedSettings};

const LATENCY: Duration = Duration::from_millis(100);

async fn proxy(upstream: SocketAddr, window: Duration, db: Option<&std::path::Path>) -> SocketAddr {
    let mut builder = Dedup::builder()
        .upstream(format!("http://{upstream}"))
        .embeddings(EmbedSettings::default().batch_window(window));
    if let Some(db) = db {
        builder = builder.database(db);
    }
    support::serve(llm_dedup::server::app(builder.build().expect("engine"))).await
}

fn client() -> reqwest::Client {
    support::client_builder()
        .pool_max_idle_per_host(256)
        .build()
        .expect("client")
}

async fn embed(client: &reqwest::Client, url: &str, input: serde_json::Value) -> Duration {
    let body = serde_json::json!({"model": "text-embedding-3-small", "input": input});
    let started = Instant::now();
    let response = client
        .post(url)
        .header("authorization", "Bearer sk-bench")
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    response.bytes().await.expect("body");
    started.elapsed()
}

/// 200 concurrent single-sentence requests; returns (p50, max) latency.
async fn concurrent_singles(url: &str) -> (Duration, Duration) {
    let client = client();
    // Connections opened beforehand, as a running application's pool would have them.
    let warm: Vec<_> = (0..200)
        .map(|_| {
            let (client, url) = (client.clone(), url.to_owned());
            tokio::spawn(async move { client.get(url).send().await.map(|r| r.status()) })
        })
        .collect();
    for w in warm {
        let _ = w.await;
    }
    // One request first, so that the rate-limit budget is known (until then, the governor
    // sends one request to learn it and holds the others back).
    embed(&client, url, "warm-up".into()).await;
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (client, url) = (client.clone(), url.to_owned());
            tokio::spawn(async move {
                let sentence = format!("The quick brown fox number {i} jumps over the lazy dog.");
                embed(&client, &url, sentence.into()).await
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(200);
    for t in tasks {
        latencies.push(t.await.expect("task"));
    }
    latencies.sort();
    (
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
    )
}

/// Indexes `chunks` in requests of 100, 4 at a time; returns the wall time.
async fn index(url: &str, chunks: &[String]) -> Duration {
    let client = client();
    let started = Instant::now();
    let batches: Vec<Vec<String>> = chunks.chunks(100).map(<[String]>::to_vec).collect();
    for wave in batches.chunks(4) {
        let tasks: Vec<_> = wave
            .iter()
            .map(|batch| {
                let (client, url, batch) = (client.clone(), url.to_owned(), batch.clone());
                tokio::spawn(async move { embed(&client, &url, batch.into()).await })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
    }
    started.elapsed()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Latencies of cached single-input requests sent one after another until `stop` is set (at
/// least `at_least` of them); returns (p50, max, how many).
async fn hits_until(
    url: &str,
    stop: &std::sync::atomic::AtomicBool,
    at_least: usize,
) -> (Duration, Duration, usize) {
    let client = client();
    let mut latencies = Vec::new();
    while latencies.len() < at_least || !stop.load(Ordering::SeqCst) {
        latencies.push(embed(&client, url, "warm-up".into()).await);
    }
    latencies.sort();
    (
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
        latencies.len(),
    )
}

/// Scenario 3: three requests of 2,048 inputs beside a 4 MB unknown field, and a cached
/// request repeated meanwhile.
async fn heavy_requests_beside_hits() {
    println!(
        "3 requests of 2,048 inputs beside a 4 MB unknown field, and a cached request meanwhile:"
    );
    let (app, _) = support::embeddings_app(LATENCY);
    let upstream = support::serve(app).await;
    let addr = proxy(upstream, Duration::from_millis(5), None).await;
    let url = format!("http://{addr}/v1/embeddings");
    embed(&client(), &url, "warm-up".into()).await;
    let stop = std::sync::atomic::AtomicBool::new(true);
    let (idle_p50, idle_max, _) = hits_until(&url, &stop, 300).await;
    let filler = "x".repeat(4 << 20);
    let heavy: Vec<_> = (0..3)
        .map(|r| {
            let (url, filler) = (url.clone(), filler.clone());
            tokio::spawn(async move {
                let inputs: Vec<String> = (0..2048)
                    .map(|i| format!("request {r} input {i}"))
                    .collect();
                let body = serde_json::json!({"model": "text-embedding-3-small", "input": inputs,
                                              "x_unknown": filler});
                let started = Instant::now();
                let response = client()
                    .post(&url)
                    .header("authorization", "Bearer sk-bench")
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await
                    .expect("sent");
                let status = response.status();
                let body = response.bytes().await.expect("body");
                if !status.is_success() {
                    eprintln!("{}", String::from_utf8_lossy(&body[..body.len().min(300)]));
                }
                (status, started.elapsed())
            })
        })
        .collect();
    stop.store(false, Ordering::SeqCst);
    let started = Instant::now();
    let (during, heavy) = tokio::join!(hits_until(&url, &stop, 1), async {
        let mut done = Vec::new();
        for task in heavy {
            done.push(task.await.expect("task"));
        }
        stop.store(true, Ordering::SeqCst);
        done
    });
    let wall = started.elapsed();
    let statuses: Vec<u16> = heavy.iter().map(|(s, _)| s.as_u16()).collect();
    println!(
        "  the three requests: {:.2} s wall (statuses {statuses:?})",
        wall.as_secs_f64()
    );
    println!(
        "  cached request alone:     p50 {:.2} ms, max {:.2} ms",
        ms(idle_p50),
        ms(idle_max)
    );
    println!(
        "  cached request meanwhile: p50 {:.2} ms, max {:.2} ms ({:.1}× the max alone), {} sent",
        ms(during.0),
        ms(during.1),
        during.1.as_secs_f64() / idle_max.as_secs_f64(),
        during.2
    );
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "heavy") {
        heavy_requests_beside_hits().await;
        return;
    }
    println!("200 concurrent single-sentence requests, upstream latency {LATENCY:?}:");
    for (label, window) in [
        ("straight to the upstream", None),
        ("llm-dedup, merging off", Some(Duration::ZERO)),
        ("llm-dedup, 5 ms window", Some(Duration::from_millis(5))),
    ] {
        let (app, counters) = support::embeddings_app(LATENCY);
        let upstream = support::serve(app).await;
        let addr = match window {
            Some(window) => proxy(upstream, window, None).await,
            None => upstream,
        };
        let (p50, max) = concurrent_singles(&format!("http://{addr}/v1/embeddings")).await;
        // Less the warm-up request.
        let calls = counters.calls.load(Ordering::SeqCst) - 1;
        let inputs = counters.inputs.load(Ordering::SeqCst) - 1;
        println!(
            "  {label:<26} {calls:>3} embedding calls ({inputs} inputs), latency p50 {:.1} ms, max {:.1} ms",
            ms(p50),
            ms(max)
        );
    }

    println!("re-index of 10,000 chunks, 10 % changed (requests of 100 chunks, 4 at a time):");
    let (app, counters) = support::embeddings_app(LATENCY);
    let upstream = support::serve(app).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = proxy(
        upstream,
        Duration::from_millis(5),
        Some(&dir.path().join("c.db")),
    )
    .await;
    let url = format!("http://{addr}/v1/embeddings");
    let mut chunks: Vec<String> = (0..10_000)
        .map(|i| format!("Chunk {i} of the handbook: some paragraph of text worth retrieving."))
        .collect();
    for pass in ["first index", "re-index"] {
        let (calls, inputs) = (
            counters.calls.load(Ordering::SeqCst),
            counters.inputs.load(Ordering::SeqCst),
        );
        let took = index(&url, &chunks).await;
        println!(
            "  {pass:<12} {:>5} inputs sent upstream in {:>3} calls, {:.2} s",
            counters.inputs.load(Ordering::SeqCst) - inputs,
            counters.calls.load(Ordering::SeqCst) - calls,
            took.as_secs_f64()
        );
        for (i, chunk) in chunks.iter_mut().enumerate() {
            if i % 10 == 3 {
                chunk.push_str(" (edited)");
            }
        }
    }
    heavy_requests_beside_hits().await;
}
