//! Load run on the proxy's hit path, against minimal servers returning the same bytes.
//!
//! Two baselines: one that reads the request body and answers (the least any server answering
//! a POST does; the ratio the project is held to), and one that answers without reading it
//! (a lower bound, reported for honesty).
//!
//! The servers share one multi-thread runtime (as `llm-dedup serve` runs), the load generator
//! has a single-threaded one, and the servers are measured alike. Rounds
//! alternate (baseline, proxy, baseline, proxy, ...) so that noise on a shared machine falls on
//! both. Reports requests/s of each and the ratio proxy / baseline.
//!
//! `cargo bench --bench load` (settings: LOAD_SECS per round, default 5; LOAD_CONNS, default
//! 32; LOAD_ROUNDS, default 3; LOAD_ONLY=baseline or proxy to run one side alone).

mod support;

use std::net::SocketAddr;

use llm_dedup::Dedup;

fn main() {
    // `cargo bench` passes `--bench`; this harness takes its settings from the environment.
    let secs = support::setting("LOAD_SECS", 5);
    let conns = support::setting("LOAD_CONNS", 32);
    let rounds = support::setting("LOAD_ROUNDS", 3);
    let dir = tempfile::tempdir().expect("tempdir");

    // The servers run on tokio's default multi-thread runtime, as `llm-dedup serve` does.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (tx, rx) = std::sync::mpsc::channel::<(SocketAddr, SocketAddr, SocketAddr)>();
    let db = dir.path().join("load.sqlite3");
    let servers = std::thread::Builder::new()
        .name("servers".into())
        .spawn(move || {
            server_rt.block_on(async move {
                let upstream = support::serve(support::fixed_app()).await;
                let baseline = support::serve(support::reading_app()).await;
                let bare = support::serve(support::fixed_app()).await;
                let engine = Dedup::builder()
                    .upstream(format!("http://{upstream}"))
                    .database(db)
                    .build()
                    .expect("engine");
                let proxy = support::serve_proxy(engine).await;
                tx.send((baseline, bare, proxy)).expect("report addresses");
                std::future::pending::<()>().await;
            })
        })
        .expect("server thread");
    let (baseline, bare, proxy) = rx.recv().expect("servers start");
    let _ = servers;

    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    client_rt.block_on(async {
        // Prime the cache, then warm both servers up.
        support::load(proxy, 1, 1, false).await;
        support::load(baseline, conns, 1, false).await;
        let (mut base_runs, mut bare_runs, mut proxy_runs) = (Vec::new(), Vec::new(), Vec::new());
        // LOAD_ONLY=baseline or LOAD_ONLY=proxy runs one side alone (for profiling).
        let only = std::env::var("LOAD_ONLY").unwrap_or_default();
        let run = |side: &str| only.is_empty() || only == side;
        for round in 1..=rounds {
            let b = if run("baseline") { support::load(baseline, conns, secs, false).await } else { f64::NAN };
            let n = if run("baseline") { support::load(bare, conns, secs, false).await } else { f64::NAN };
            let p = if run("proxy") { support::load(proxy, conns, secs, true).await } else { f64::NAN };
            println!(
                "round {round}: reading baseline {b:>7.0} req/s | bare baseline {n:>7.0} req/s | \
                 proxy hit path {p:>7.0} req/s | ratio {:.3} (bare {:.3})",
                p / b,
                p / n
            );
            base_runs.push(b);
            bare_runs.push(n);
            proxy_runs.push(p);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (b, n, p) = (mean(&base_runs), mean(&bare_runs), mean(&proxy_runs));
        // Each round's ratio pairs measurements taken seconds apart; their median shrugs off a
        // round that a neighbour on this shared machine disturbed.
        let mut paired: Vec<f64> = proxy_runs.iter().zip(&base_runs).map(|(p, b)| p / b).collect();
        paired.sort_by(f64::total_cmp);
        let median = paired.get(paired.len() / 2).copied().unwrap_or(f64::NAN);
        println!(
            "mean over {rounds} rounds of {secs}s, {conns} connections: reading baseline {b:.0} req/s, \
             bare baseline {n:.0} req/s, proxy hit path {p:.0} req/s; \
             ratio {:.3} against the reading baseline (median of the rounds' ratios {median:.3}), \
             {:.3} against the bare one",
            p / b,
            p / n
        );
    });
}
