//! Prefixes the provider caches (issue "Prefix"): requests sharing a long prompt prefix sent
//! at once, straight to a provider and through the proxy, in one run.
//!
//! The upstream is the tests' fake, simulating OpenAI's prompt cache as its guide and the facts
//! sheet describe it: a prefix (the system message) of 1,024 tokens or more is readable once
//! the first byte of an answer that wrote it is out, per organization; prefill takes 50 ms per
//! 1,000 uncached prompt tokens and a tenth of that for cached ones. Each scenario runs under
//! an API key of its own (its own organization, so its own cache), and the proxy's governor
//! first learns the budget with one short request (otherwise its one-at-a-time probe of an
//! unknown budget would stagger the requests by itself).
//!
//! `cargo bench --bench prefix`

#[allow(dead_code)]
#[path = "../tests/common/fake.rs"]
mod fake;
#[path = "../tests/common/http.rs"]
mod http;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fake::{Behaviour, FakeUpstream};

/// About 15,000 tokens of system prompt.
fn system() -> String {
    "You are the support assistant of a large retailer; follow the policies below. ".repeat(760)
}

fn body(question: &str, stream: bool) -> String {
    serde_json::json!({"model": "gpt-4o-mini", "stream": stream, "messages": [
        {"role": "system", "content": system()},
        {"role": "user", "content": question}]})
    .to_string()
}

/// `n` distinct chat questions about `topic` sharing the system prompt.
fn questions(n: usize, stream: bool, topic: &str) -> Vec<String> {
    (0..n)
        .map(|i| body(&format!("{topic} question {i}?"), stream))
        .collect()
}

/// Sends `bodies` at once to `path` of `base` as `key`; returns the wall time until the last
/// answer was read whole.
async fn burst(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    path: &str,
    bodies: Vec<String>,
) -> Duration {
    let started = Instant::now();
    let asked: Vec<_> = bodies
        .into_iter()
        .map(|body| {
            let request = client
                .post(format!("{base}{path}"))
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {key}"))
                .body(body);
            tokio::spawn(async move {
                let response = request.send().await.expect("sent");
                assert_eq!(response.status(), 200);
                response.bytes().await.expect("read")
            })
        })
        .collect();
    for one in asked {
        one.await.expect("request");
    }
    started.elapsed()
}

/// The share of prompt tokens read from the provider's cache while `run` ran, and its time.
async fn measured(
    upstream: &FakeUpstream,
    run: impl std::future::Future<Output = Duration>,
) -> (f64, Duration) {
    let (p0, c0) = (
        upstream.state.prompt_tokens.load(Ordering::SeqCst),
        upstream.state.cached_tokens.load(Ordering::SeqCst),
    );
    let took = run.await;
    let prompt = upstream.state.prompt_tokens.load(Ordering::SeqCst) - p0;
    let cached = upstream.state.cached_tokens.load(Ordering::SeqCst) - c0;
    (cached as f64 / prompt.max(1) as f64, took)
}

async fn proxy(upstream: &FakeUpstream, wait: Duration) -> String {
    let engine = llm_dedup::Dedup::builder()
        .upstream(upstream.url())
        .prefix_wait(wait)
        .build()
        .expect("engine");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = llm_dedup::server::serve(
            listener,
            engine,
            llm_dedup::server::OperatorAccess::loopback_only(),
            llm_dedup::server::EdgeLimits::default(),
            std::future::pending(),
        )
        .await;
    });
    format!("http://{addr}")
}

async fn learn(client: &reqwest::Client, base: &str, key: &str) {
    let short = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(short)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
}

/// Where chat completions go.
const CHAT: &str = "/v1/chat/completions";

/// Sixteen chat questions on `topic` at once to `base` as `key`: the share of prompt tokens
/// read from the provider's cache, and the wall time.
async fn chat_burst(
    upstream: &FakeUpstream,
    client: &reqwest::Client,
    base: &str,
    key: &str,
    stream: bool,
    topic: &str,
) -> (f64, Duration) {
    measured(
        upstream,
        burst(client, base, key, CHAT, questions(16, stream, topic)),
    )
    .await
}

#[tokio::main]
async fn main() {
    let upstream = FakeUpstream::with(Behaviour {
        prefill_per_ktok: Some(Duration::from_millis(50)),
        ..Behaviour::default()
    })
    .await;
    let client = http::client_builder()
        .pool_max_idle_per_host(64)
        .build()
        .expect("client");
    let held = proxy(&upstream, llm_dedup::DEFAULT_PREFIX_WAIT).await;
    let unheld = proxy(&upstream, Duration::ZERO).await;
    let direct = upstream.url();
    println!(
        "16 requests at once sharing a ~15,000-token system prompt (50 ms of prefill per 1,000 uncached tokens):"
    );
    for stream in [false, true] {
        let kind = if stream { "streamed" } else { "not streamed" };
        let tag = |who: &str| format!("sk-{who}-{stream}");
        for (base, who) in [(&held, "held"), (&unheld, "unheld")] {
            learn(&client, base, &tag(who)).await;
        }
        let (d_share, d_time) =
            chat_burst(&upstream, &client, &direct, &tag("direct"), stream, "cold").await;
        let (h_share, h_time) =
            chat_burst(&upstream, &client, &held, &tag("held"), stream, "cold").await;
        let (u_share, u_time) =
            chat_burst(&upstream, &client, &unheld, &tag("unheld"), stream, "cold").await;
        println!(
            "  cold, {kind}: read from the provider's cache: direct {d_share:.2}, proxy {h_share:.2}, \
             proxy without holds {u_share:.2}; wall: direct {:.0} ms, proxy {:.0} ms ({:.2} x), \
             without holds {:.0} ms ({:.2} x)",
            d_time.as_secs_f64() * 1e3,
            h_time.as_secs_f64() * 1e3,
            h_time.as_secs_f64() / d_time.as_secs_f64(),
            u_time.as_secs_f64() * 1e3,
            u_time.as_secs_f64() / d_time.as_secs_f64(),
        );
        // The prefix is warm in each organization now.
        let (d_share, d_time) =
            chat_burst(&upstream, &client, &direct, &tag("direct"), stream, "warm").await;
        let (h_share, h_time) =
            chat_burst(&upstream, &client, &held, &tag("held"), stream, "warm").await;
        println!(
            "  warm, {kind}: read: direct {d_share:.2}, proxy {h_share:.2}; wall: direct {:.0} ms, \
             proxy {:.0} ms ({:.2} x)",
            d_time.as_secs_f64() * 1e3,
            h_time.as_secs_f64() * 1e3,
            h_time.as_secs_f64() / d_time.as_secs_f64(),
        );
    }

    // Anthropic: 12 parallel calls with one cache_control breakpoint on the system prompt.
    let message = |i: usize| {
        serde_json::json!({"model": "claude-sonnet-4-5", "max_tokens": 64,
            "system": [{"type": "text", "text": system(), "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": format!("question {i}?")}]})
        .to_string()
    };
    let writes = |upstream: &FakeUpstream| upstream.state.written_tokens.load(Ordering::SeqCst);
    let mut line = Vec::new();
    for (base, key) in [(&direct, "sk-ant-direct"), (&held, "sk-ant-held")] {
        if base == &held {
            learn(&client, base, key).await;
        }
        let before = writes(&upstream);
        burst(
            &client,
            base,
            key,
            "/v1/messages",
            (0..12).map(message).collect(),
        )
        .await;
        line.push(writes(&upstream) - before);
    }
    let per = line[0] as f64 / 12.0;
    println!(
        "Anthropic, 12 parallel calls with one breakpoint: the breakpoint written {:.0} times \
         straight, {:.0} through the proxy",
        line[0] as f64 / per,
        line[1] as f64 / per
    );
}
