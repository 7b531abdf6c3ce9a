//! Load run on the proxy's hit path, against a minimal server returning the same bytes.
//!
//! Both servers run in one single-threaded runtime, the load generator in another, so each
//! side gets one core of a two-core machine and the two servers are measured alike. Rounds
//! alternate (baseline, proxy, baseline, proxy, ...) so that noise on a shared machine falls on
//! both. Reports requests/s of each and the ratio proxy / baseline.
//!
//! `cargo bench --bench load` (settings: LOAD_SECS per round, default 5; LOAD_CONNS, default
//! 32; LOAD_ROUNDS, default 3).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use llm_dedup::Dedup;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Requests per second that `conns` connections achieve against `url` for `secs`.
async fn load(url: String, conns: u64, secs: u64, expect_hit: bool) -> f64 {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(conns as usize)
        .build()
        .expect("client");
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let workers: Vec<_> = (0..conns)
        .map(|_| {
            let (client, url, done, stop) =
                (client.clone(), url.clone(), done.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let resp = client
                        .post(&url)
                        .header("authorization", "Bearer sk-bench")
                        .header("content-type", "application/json")
                        .body(support::REQUEST)
                        .send()
                        .await
                        .expect("sent");
                    assert!(resp.status().is_success());
                    if expect_hit {
                        assert_eq!(resp.headers()["llm-dedup-cache"], "hit");
                    }
                    let body = resp.bytes().await.expect("body");
                    assert_eq!(body.len(), support::ANSWER.len());
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

fn main() {
    // `cargo bench` passes `--bench`; this harness takes its settings from the environment.
    let secs = setting("LOAD_SECS", 5);
    let conns = setting("LOAD_CONNS", 32);
    let rounds = setting("LOAD_ROUNDS", 3);
    let dir = tempfile::tempdir().expect("tempdir");

    let server_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (tx, rx) = std::sync::mpsc::channel::<(SocketAddr, SocketAddr)>();
    let db = dir.path().join("load.sqlite3");
    let servers = std::thread::spawn(move || {
        server_rt.block_on(async move {
            let upstream = support::serve(support::fixed_app()).await;
            let baseline = support::serve(support::fixed_app()).await;
            let engine = Dedup::builder()
                .upstream(format!("http://{upstream}"))
                .database(db)
                .build()
                .expect("engine");
            let proxy = support::serve(llm_dedup::server::app(engine)).await;
            tx.send((baseline, proxy)).expect("report addresses");
            std::future::pending::<()>().await;
        })
    });
    let (baseline, proxy) = rx.recv().expect("servers start");
    let _ = servers;

    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    client_rt.block_on(async {
        let proxy_url = format!("http://{proxy}/v1/chat/completions");
        let baseline_url = format!("http://{baseline}/v1/chat/completions");
        // Prime the cache, then warm both servers up.
        load(proxy_url.clone(), 1, 1, false).await;
        load(baseline_url.clone(), conns, 1, false).await;
        let (mut base_runs, mut proxy_runs) = (Vec::new(), Vec::new());
        for round in 1..=rounds {
            let b = load(baseline_url.clone(), conns, secs, false).await;
            let p = load(proxy_url.clone(), conns, secs, true).await;
            println!(
                "round {round}: baseline {b:>9.0} req/s   proxy hit path {p:>9.0} req/s   ratio {:.3}",
                p / b
            );
            base_runs.push(b);
            proxy_runs.push(p);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (b, p) = (mean(&base_runs), mean(&proxy_runs));
        println!(
            "mean over {rounds} rounds of {secs}s, {conns} connections: baseline {b:.0} req/s, proxy hit path {p:.0} req/s, ratio {:.3}",
            p / b
        );
    });
}
