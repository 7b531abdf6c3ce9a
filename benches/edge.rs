//! Slow clients against the proxy's hit path.
//!
//! The proxy is served as `llm-dedup serve` serves it (its edge on the default limits). Rounds
//! alternate: the hit path alone, then the same load while `SLOW_CONNS` (default 1,000) other
//! connections trickle, half of them their headers (a line a second, reconnecting when the
//! header timeout closes them), half their bodies (a byte a second of a declared 10,000).
//! Reports requests/s of each and the ratio with / without; the goal is at least 0.8.
//!
//! `cargo bench --bench edge` (settings: LOAD_SECS per round, default 12; LOAD_CONNS, default
//! 32; LOAD_ROUNDS, default 3; SLOW_CONNS, default 1000).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use llm_dedup::Dedup;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// What the trickling clients did.
#[derive(Default)]
struct Trickled {
    /// Connections opened (a header trickler reopens when cut off).
    opened: AtomicU64,
    /// Connections the proxy closed.
    closed: AtomicU64,
}

/// Keeps one connection trickling until `stop`: its header lines (`headers`) or its body.
async fn trickle(addr: SocketAddr, headers: bool, stop: Arc<AtomicBool>, seen: Arc<Trickled>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut conn) = TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        seen.opened.fetch_add(1, Ordering::Relaxed);
        let head = if headers {
            "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n".to_owned()
        } else {
            "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n\
             authorization: Bearer sk-slow\r\ncontent-type: application/json\r\n\
             content-length: 10000\r\n\r\n{"
                .to_owned()
        };
        if conn.write_all(head.as_bytes()).await.is_err() {
            continue;
        }
        let mut line = 0u64;
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            line += 1;
            let more = if headers {
                format!("x-slow-{line}: 1\r\n")
            } else {
                " ".to_owned()
            };
            if conn.write_all(more.as_bytes()).await.is_err() {
                seen.closed.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
}

fn main() {
    // Longer than the header timeout (10 s), so that header tricklers are cut off and come
    // back while the load runs.
    let secs = support::setting("LOAD_SECS", 12);
    let conns = support::setting("LOAD_CONNS", 32);
    let rounds = support::setting("LOAD_ROUNDS", 3);
    let slow = support::setting("SLOW_CONNS", 1000);

    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
    std::thread::Builder::new()
        .name("servers".into())
        .spawn(move || {
            server_rt.block_on(async move {
                let upstream = support::serve(support::fixed_app()).await;
                let engine = Dedup::builder()
                    .upstream(format!("http://{upstream}"))
                    .build()
                    .expect("engine");
                tx.send(support::serve_proxy(engine).await)
                    .expect("report address");
                std::future::pending::<()>().await;
            })
        })
        .expect("server thread");
    let proxy = rx.recv().expect("server starts");

    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    client_rt.block_on(async {
        support::load(proxy, 1, 1, false).await;
        support::load(proxy, conns, 1, true).await;
        let (mut alone, mut beside) = (Vec::new(), Vec::new());
        for round in 1..=rounds {
            let a = support::load(proxy, conns, secs, true).await;
            let stop = Arc::new(AtomicBool::new(false));
            let seen = Arc::new(Trickled::default());
            let tricklers: Vec<_> = (0..slow)
                .map(|i| tokio::spawn(trickle(proxy, i % 2 == 0, stop.clone(), seen.clone())))
                .collect();
            // Let them all connect and start trickling.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let b = support::load(proxy, conns, secs, true).await;
            stop.store(true, Ordering::Relaxed);
            for t in tricklers {
                let _ = t.await;
            }
            println!(
                "round {round}: hit path alone {a:>7.0} req/s | beside {slow} trickling \
                 connections {b:>7.0} req/s | ratio {:.3} ({} trickling connections opened, \
                 {} closed by the proxy)",
                b / a,
                seen.opened.load(Ordering::Relaxed),
                seen.closed.load(Ordering::Relaxed)
            );
            alone.push(a);
            beside.push(b);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (a, b) = (mean(&alone), mean(&beside));
        println!(
            "mean over {rounds} rounds of {secs}s, {conns} connections: alone {a:.0} req/s, \
             beside {slow} trickling connections {b:.0} req/s; ratio {:.3} (goal: at least 0.8)",
            b / a
        );
    });
}
