//! The governor's burst scenario: 60 distinct requests fired at once at an upstream that
//! allows 10 a second and answers 429 with `retry-after-ms` past that, counting either as a
//! bucket refilling continuously or in fixed one-second windows (whose headers say truthfully
//! what remains and when the window ends). Reports what clients saw and what the upstream saw,
//! through the proxy and (as a baseline in the same run) straight to the upstream, against
//! the ideal wall time of 6 s.
//!
//! `cargo bench --bench burst`

mod support;

use std::sync::atomic::Ordering;
use std::time::Instant;

async fn burst(url: String) -> (usize, usize, f64) {
    let client = support::client_builder()
        .pool_max_idle_per_host(100)
        .build()
        .expect("client");
    let started = Instant::now();
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                client
                    .post(&url)
                    .header("authorization", "Bearer sk-bench")
                    .body(format!(r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"distinct {i}"}}]}}"#))
                    .send()
                    .await
                    .expect("sent")
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match t.await.expect("task") {
            200 => ok += 1,
            429 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    (ok, refused, started.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() {
    for (label, through_proxy, limit) in [
        (
            "bucket, straight to the upstream",
            false,
            support::Limit::Bucket,
        ),
        ("bucket, through llm-dedup", true, support::Limit::Bucket),
        (
            "fixed window, straight to the upstream",
            false,
            support::Limit::Window,
        ),
        (
            "fixed window, through llm-dedup",
            true,
            support::Limit::Window,
        ),
    ] {
        let (app, counters) = support::limited_app(10.0, limit);
        let upstream = support::serve(app).await;
        let url = if through_proxy {
            let proxy = support::proxy_for(upstream).await;
            format!("http://{proxy}/v1/chat/completions")
        } else {
            format!("http://{upstream}/v1/chat/completions")
        };
        let (ok, client_429s, secs) = burst(url).await;
        println!(
            "{label}: {ok}/60 succeeded, {client_429s} client-visible 429s, {} upstream refusals, \
             {} upstream calls, {secs:.2} s wall time (ideal 6 s: ratio {:.2})",
            counters.1.load(Ordering::SeqCst),
            counters.0.load(Ordering::SeqCst),
            secs / 6.0
        );
    }
}
