//! Soak run: a million distinct requests through the release proxy, its RSS sampled as it goes.
//!
//! The `llm-dedup` binary (built by `cargo bench` in release) runs as `serve` with a small
//! `--memory` and `--max-disk`, in front of an in-process upstream answering every request at
//! once with a ~600-byte chat completion. Connections send requests that never repeat, so
//! every one is a miss that fills the memory tier, the exact-request memo, the write queue and
//! the database: everything that grows with traffic. Every few seconds the run samples the
//! process's resident set (`/proc/PID/status`) and the memory tier's own figure (its
//! Prometheus gauge), and at the end reports the samples taken after the tier filled against
//! the target `RSS <= 1.25 x --memory + 40 MiB`, and their trend (a least-squares slope per
//! 100,000 requests: flat is what a bound looks like).
//!
//! `cargo bench --bench soak` (settings: SOAK_REQUESTS, default 1,000,000; SOAK_MEMORY in
//! MiB, default 64; SOAK_CONNS, default 32; SOAK_SAMPLE_SECS, default 5).

mod support;

use std::io::BufRead;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const MIB: f64 = 1024.0 * 1024.0;

/// One sample of the proxy's memory.
struct Sample {
    secs: f64,
    requests: u64,
    rss: f64,
    /// The part of `rss` that is the process's own heap and stacks (`RssAnon`); the rest is
    /// mapped files, SQLite's shared WAL index among them.
    anon: f64,
    tier: f64,
}

/// The resident set of process `pid` and its anonymous part, in bytes.
fn rss_of(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| -> f64 {
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"));
        kib * 1024.0
    };
    (field("VmRSS:"), field("RssAnon:"))
}

/// The memory tier's bytes, as the proxy's metrics report them.
async fn tier_of(client: &reqwest::Client, proxy: SocketAddr) -> f64 {
    let text = client
        .get(format!("http://{proxy}/_llm-dedup/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|l| l.strip_prefix("llm_dedup_memory_tier_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .expect("memory tier gauge")
}

/// Sends distinct requests on one keep-alive connection until `next` reaches `total`.
async fn drive(proxy: SocketAddr, next: Arc<AtomicU64>, total: u64) {
    let mut conn = TcpStream::connect(proxy).await.expect("connect");
    conn.set_nodelay(true).expect("nodelay");
    let mut buf = Vec::with_capacity(16 * 1024);
    loop {
        let n = next.fetch_add(1, Ordering::Relaxed);
        if n >= total {
            return;
        }
        let body = format!(
            r#"{{"model":"gpt-4o-mini","messages":[{{"role":"system","content":"You are terse."}},{{"role":"user","content":"Soak request {n}: what is the capital of France?"}}],"temperature":0}}"#
        );
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: {proxy}\r\nauthorization: Bearer sk-soak\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(request.as_bytes()).await.expect("write");
        let answer = support::read_answer(&mut conn, &mut buf).await;
        assert!(answer.ok && !answer.hit, "not a fresh 200: {answer:?}");
        assert_eq!(answer.body_len, support::ANSWER.len());
    }
}

fn main() {
    let total = setting("SOAK_REQUESTS", 1_000_000);
    let memory_mib = setting("SOAK_MEMORY", 64);
    let conns = setting("SOAK_CONNS", 32);
    let every = Duration::from_secs(setting("SOAK_SAMPLE_SECS", 5));
    let dir = tempfile::tempdir().expect("tempdir");

    let upstream_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let upstream = upstream_rt.block_on(support::serve(support::fixed_app()));

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_llm-dedup"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(["--upstream", &format!("http://{upstream}")])
        .arg("--db")
        .arg(dir.path().join("soak.sqlite3"))
        .args([
            "--memory",
            &format!("{memory_mib}MiB"),
            "--max-disk",
            "256MiB",
        ])
        .env("RUST_LOG", "llm_dedup=info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the release binary");
    let mut lines = std::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let ready = lines.next().expect("proxy starts").expect("log line");
    let proxy: SocketAddr = ready
        .split("listen=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {ready:?}"));
    // Keep draining the log so the proxy never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let pid = child.id();

    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let samples = client_rt.block_on(async {
        let next = Arc::new(AtomicU64::new(0));
        let drivers: Vec<_> = (0..conns)
            .map(|_| tokio::spawn(drive(proxy, next.clone(), total)))
            .collect();
        let client = support::client_builder().build().expect("client");
        let start = Instant::now();
        let mut samples = Vec::new();
        println!("  secs   requests    RSS MiB   anon MiB   tier MiB");
        loop {
            let finished = drivers.iter().all(|d| d.is_finished());
            let (rss, anon) = rss_of(pid);
            let sample = Sample {
                secs: start.elapsed().as_secs_f64(),
                requests: next.load(Ordering::Relaxed).min(total),
                rss,
                anon,
                tier: tier_of(&client, proxy).await,
            };
            println!(
                "{:>6.0} {:>10} {:>10.1} {:>10.1} {:>10.1}",
                sample.secs,
                sample.requests,
                sample.rss / MIB,
                sample.anon / MIB,
                sample.tier / MIB
            );
            samples.push(sample);
            if finished {
                break;
            }
            tokio::time::sleep(every).await;
        }
        for d in drivers {
            d.await.expect("driver");
        }
        samples
    });
    let _ = child.kill();
    let _ = child.wait();

    let bound = memory_mib as f64 * MIB;
    let target = 1.25 * bound + 40.0 * MIB;
    let filled: Vec<&Sample> = samples.iter().filter(|s| s.tier >= 0.9 * bound).collect();
    let Some(first) = filled.first() else {
        println!("the memory tier never filled: raise SOAK_REQUESTS");
        return;
    };
    let worst = filled.iter().map(|s| s.rss).fold(0.0, f64::max);
    // Least-squares slope of RSS against requests served, after the tier filled.
    let n = filled.len() as f64;
    let mx = filled.iter().map(|s| s.requests as f64).sum::<f64>() / n;
    let my = filled.iter().map(|s| s.rss).sum::<f64>() / n;
    let (sxy, sxx) = filled.iter().fold((0.0, 0.0), |(sxy, sxx), s| {
        let dx = s.requests as f64 - mx;
        (sxy + dx * (s.rss - my), sxx + dx * dx)
    });
    let slope = if sxx > 0.0 {
        sxy / sxx * 100_000.0
    } else {
        0.0
    };
    let last = samples.last().expect("a sample");
    let worst_anon = filled.iter().map(|s| s.anon).fold(0.0, f64::max);
    println!(
        "{total} distinct requests in {:.0} s ({:.0} req/s), --memory {memory_mib} MiB: tier filled \
         at {} requests; after that RSS {:.1}..{:.1} MiB over {} samples, worst {:.2} x --memory \
         (target {:.1} MiB = 1.25 x --memory + 40 MiB: {}), worst anonymous {:.1} MiB, trend {:+.2} \
         MiB per 100,000 requests",
        last.secs,
        last.requests as f64 / last.secs,
        first.requests,
        filled.iter().map(|s| s.rss).fold(f64::MAX, f64::min) / MIB,
        worst / MIB,
        filled.len(),
        worst / bound,
        target / MIB,
        if worst <= target { "met" } else { "MISSED" },
        worst_anon / MIB,
        slope / MIB,
    );
}
