//! Prefixes the provider caches: requests that share a long, cold prompt prefix and arrive
//! together wait for the first one's first byte and read the prefix from the provider's cache
//! instead of each paying to write it; a warm prefix is never waited for.
//!
//! The fake upstream simulates OpenAI's prompt cache (a prefix of 1,024 tokens or more,
//! readable once an answer that wrote it has started, per organization; cached tokens prefill
//! ten times faster), as the facts sheet and OpenAI's guide describe it.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Behaviour, FakeUpstream, Proxy, Seen, client, post};

/// A system prompt of about 8,000 tokens, the same for every request of a test.
fn system() -> String {
    "You are a careful assistant for the accounting team. ".repeat(600)
}

fn ask(question: &str) -> String {
    serde_json::json!({"model": "gpt-4o-mini", "messages": [
        {"role": "system", "content": system()},
        {"role": "user", "content": question}]})
    .to_string()
}

/// A fake upstream whose prefill takes 100 ms per 1,000 uncached tokens (0.8 s for the
/// system prompt, a tenth of that once cached).
async fn provider() -> FakeUpstream {
    FakeUpstream::with(Behaviour {
        prefill_per_ktok: Some(Duration::from_millis(100)),
        ..Behaviour::default()
    })
    .await
}

/// Sends `n` distinct questions at once to `url` with `headers`, and returns their answers.
async fn together(url: &str, n: usize, topic: &str, headers: &[(&str, &str)]) -> Vec<Seen> {
    let bodies = (0..n).map(|i| ask(&format!("{topic} {i}?")));
    all_at_once(url, bodies.map(|body| (body, headers.to_vec())).collect()).await
}

/// Sends each `(body, headers)` to `url` at once, and returns their answers in order.
async fn all_at_once(url: &str, requests: Vec<(String, Vec<(&str, &str)>)>) -> Vec<Seen> {
    let c = client();
    let asked: Vec<_> = requests
        .into_iter()
        .map(|(body, headers)| {
            let (c, url) = (c.clone(), url.to_owned());
            let headers: Vec<(String, String)> = headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            tokio::spawn(async move {
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                post(&c, &url, body, &headers).await
            })
        })
        .collect();
    let mut seen = Vec::new();
    for one in asked {
        seen.push(one.await.expect("request"));
    }
    seen
}

/// The share of prompt tokens the provider read from its cache since `before`.
fn cached_share(upstream: &FakeUpstream, before: (usize, usize)) -> f64 {
    let prompt = upstream.state.prompt_tokens.load(Ordering::SeqCst) - before.0;
    let cached = upstream.state.cached_tokens.load(Ordering::SeqCst) - before.1;
    cached as f64 / prompt.max(1) as f64
}

fn tokens(upstream: &FakeUpstream) -> (usize, usize) {
    (
        upstream.state.prompt_tokens.load(Ordering::SeqCst),
        upstream.state.cached_tokens.load(Ordering::SeqCst),
    )
}

/// Teaches `proxy`'s governor the upstream's budget with one short request: while nothing is
/// known of a budget, requests go one at a time (a probe), which by itself would let the
/// later ones read a prefix the first wrote; the holds are what is tested here.
async fn learn_budget(proxy: &Proxy) {
    let short = serde_json::json!({"model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let seen = post(&client(), &proxy.url("/v1/chat/completions"), short, &[]).await;
    assert_eq!(seen.status, 200);
}

fn held(seen: &Seen) -> Option<u64> {
    seen.headers
        .get("llm-dedup-prefix-wait")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Eight requests sharing a cold system prompt: sent straight to the provider, none reads it
/// from its cache; through the proxy, seven wait for the first one's first byte and read it.
/// Then the prefix is warm: eight more go at once, and all of them read it.
#[tokio::test]
async fn concurrent_requests_on_a_cold_prefix_read_it_instead_of_writing_it() {
    let upstream = provider().await;
    let direct = format!("{}/v1/chat/completions", upstream.url());
    // Straight to the provider, as another organization (its cache is its own).
    let before = tokens(&upstream);
    let seen = together(
        &direct,
        8,
        "direct",
        &[("authorization", "Bearer sk-direct")],
    )
    .await;
    assert!(seen.iter().all(|s| s.status == 200));
    assert_eq!(
        cached_share(&upstream, before),
        0.0,
        "each wrote the prefix"
    );

    let proxy = Proxy::start(upstream.engine()).await;
    learn_budget(&proxy).await;
    let url = proxy.url("/v1/chat/completions");
    let before = tokens(&upstream);
    let seen = together(&url, 8, "cold", &[]).await;
    assert!(seen.iter().all(|s| s.status == 200 && s.cache == "miss"));
    let waited: Vec<u64> = seen.iter().filter_map(held).collect();
    assert_eq!(waited.len(), 7, "all but the writer waited");
    let share = cached_share(&upstream, before);
    assert!(share > 0.8, "7 of 8 read the system prompt: {share}");
    let read = common::figure(
        &proxy.engine,
        r#"llm_dedup_provider_cache_tokens_total{kind="read"}"#,
    )
    .await;
    assert!(read > 0.0, "the provider's reads are counted");

    // Warm now: never held.
    let before = tokens(&upstream);
    let seen = together(&url, 8, "warm", &[]).await;
    assert!(seen.iter().all(|s| s.status == 200));
    assert!(
        seen.iter().all(|s| held(s).is_none()),
        "a warm prefix is never held"
    );
    assert!(cached_share(&upstream, before) > 0.9);
    proxy.stop().await;
}

/// `llm-dedup-prefix: off` turns the wait off for a request; `--prefix-wait 0` for all; a
/// malformed value is a 400 naming the header.
#[tokio::test]
async fn holds_can_be_turned_off() {
    let upstream = provider().await;
    let proxy = Proxy::start(upstream.engine()).await;
    learn_budget(&proxy).await;
    let url = proxy.url("/v1/chat/completions");
    let before = tokens(&upstream);
    let seen = together(&url, 4, "off", &[("llm-dedup-prefix", "off")]).await;
    assert!(seen.iter().all(|s| s.status == 200 && held(s).is_none()));
    assert_eq!(cached_share(&upstream, before), 0.0, "each wrote it");
    let bad = post(
        &client(),
        &url,
        ask("bad"),
        &[("llm-dedup-prefix", "sometimes")],
    )
    .await;
    assert_eq!(bad.status, 400);
    assert!(bad.raw.windows(16).any(|w| w == b"llm-dedup-prefix"));
    proxy.stop().await;

    let upstream = provider().await;
    let proxy = Proxy::start(upstream.engine().prefix_wait(Duration::ZERO)).await;
    learn_budget(&proxy).await;
    let url = proxy.url("/v1/chat/completions");
    let before = tokens(&upstream);
    let seen = together(&url, 4, "zero", &[]).await;
    assert!(seen.iter().all(|s| s.status == 200 && held(s).is_none()));
    assert_eq!(cached_share(&upstream, before), 0.0);
    proxy.stop().await;
}

/// A writer whose call fails lets those waiting go at once, as they came (no error of its
/// own reaches them, and nothing waits out the whole bound).
#[tokio::test]
async fn a_failed_writer_releases_those_waiting() {
    let upstream = FakeUpstream::with(Behaviour {
        prefill_per_ktok: Some(Duration::from_millis(100)),
        refuse_next: 1,
        ..Behaviour::default()
    })
    .await;
    let proxy = Proxy::start(upstream.engine().prefix_wait(Duration::from_secs(30))).await;
    let url = proxy.url("/v1/chat/completions");
    let started = std::time::Instant::now();
    let seen = together(&url, 4, "failing", &[]).await;
    assert!(seen.iter().all(|s| s.status == 200));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "nobody waited out the bound: {:?}",
        started.elapsed()
    );
    proxy.stop().await;
}

/// Different organizations never wait for each other: the provider's cache is per
/// organization.
#[tokio::test]
async fn other_organizations_never_wait_for_each_other() {
    let upstream = provider().await;
    let proxy = Proxy::start(upstream.engine()).await;
    let url = proxy.url("/v1/chat/completions");
    let keys: Vec<String> = (0..4).map(|i| format!("Bearer sk-org-{i}")).collect();
    let requests = keys
        .iter()
        .map(|key| (ask("same question?"), vec![("authorization", key.as_str())]))
        .collect();
    for seen in all_at_once(&url, requests).await {
        assert_eq!(seen.status, 200);
        assert!(held(&seen).is_none(), "waited for another organization");
    }
    proxy.stop().await;
}

/// The same for streamed requests: the writer's first event releases those waiting.
#[tokio::test]
async fn streamed_requests_wait_for_the_writers_first_event() {
    let upstream = provider().await;
    let proxy = Proxy::start(upstream.engine()).await;
    learn_budget(&proxy).await;
    let url = proxy.url("/v1/chat/completions");
    let before = tokens(&upstream);
    let requests = (0..6)
        .map(|i| {
            let mut body: serde_json::Value =
                serde_json::from_str(&ask(&format!("streamed {i}?"))).expect("json");
            body["stream"] = serde_json::Value::Bool(true);
            (body.to_string(), Vec::new())
        })
        .collect();
    let mut waited = 0;
    for seen in all_at_once(&url, requests).await {
        assert_eq!(seen.status, 200);
        assert!(seen.raw.ends_with(b"data: [DONE]\n\n"));
        waited += usize::from(held(&seen).is_some());
    }
    assert_eq!(waited, 5, "all but the writer waited");
    let share = cached_share(&upstream, before);
    assert!(share > 0.75, "5 of 6 read the system prompt: {share}");
    proxy.stop().await;
}

/// Across a fleet: requests sharing a cold prefix on two replicas wait for the one writer of
/// the whole fleet, not one writer a replica.
#[tokio::test]
async fn one_replica_writes_a_prefix_for_the_whole_fleet() {
    let Some(redis) = common::RedisServer::start() else {
        return;
    };
    let upstream = provider().await;
    let replica = || {
        let secret = llm_dedup::FleetSecret::new("the prefix tests' own secret").expect("secret");
        Proxy::start(upstream.engine().redis(redis.url()).fleet_secret(secret))
    };
    let (a, b) = (replica().await, replica().await);
    learn_budget(&a).await;
    learn_budget(&b).await;
    let before = tokens(&upstream);
    let (url_a, url_b) = (a.url("/v1/chat/completions"), b.url("/v1/chat/completions"));
    let (on_a, on_b) = tokio::join!(
        together(&url_a, 4, "fleet a", &[]),
        together(&url_b, 4, "fleet b", &[]),
    );
    let seen: Vec<&Seen> = on_a.iter().chain(&on_b).collect();
    assert!(seen.iter().all(|s| s.status == 200));
    let waited = seen.iter().filter(|s| held(s).is_some()).count();
    assert_eq!(waited, 7, "one writer for the fleet");
    let share = cached_share(&upstream, before);
    assert!(share > 0.8, "7 of 8 read the system prompt: {share}");
    a.stop().await;
    b.stop().await;
}

/// Anthropic: parallel requests with one `cache_control` breakpoint write it once through the
/// proxy (each wrote it, at 1.25 × the input price, sent straight).
#[tokio::test]
async fn an_anthropic_breakpoint_is_written_once() {
    let upstream = provider().await;
    let message = |i: usize| {
        serde_json::json!({"model": "claude-sonnet-4-5", "max_tokens": 64,
            "system": [{"type": "text", "text": system(), "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": format!("question {i}?")}]})
        .to_string()
    };
    let send = |base: String, key: &'static str| async move {
        let requests = (0..6)
            .map(|i| (message(i), vec![("authorization", key)]))
            .collect();
        all_at_once(&format!("{base}/v1/messages"), requests).await
    };
    let written = || upstream.state.written_tokens.load(Ordering::SeqCst);
    let before = written();
    let straight = send(upstream.url(), "Bearer sk-ant-direct").await;
    assert!(straight.iter().all(|s| s.status == 200));
    let per_write = (written() - before) / 6;
    assert!(per_write > 1024, "each wrote the breakpoint");

    let proxy = Proxy::start(upstream.engine()).await;
    // The governor learns the budget first (see learn_budget), with a short message.
    let short = r#"{"model":"claude-sonnet-4-5","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#;
    let url = proxy.url("/v1/messages");
    assert_eq!(post(&client(), &url, short, &[]).await.status, 200);
    let before = written();
    let seen = send(proxy.url(""), "Bearer sk-test-key-1").await;
    assert!(seen.iter().all(|s| s.status == 200));
    assert_eq!(written() - before, per_write, "written once");
    assert_eq!(seen.iter().filter(|s| held(s).is_some()).count(), 5);
    let written_counted = common::figure(
        &proxy.engine,
        r#"llm_dedup_provider_cache_tokens_total{kind="write"}"#,
    )
    .await;
    assert_eq!(written_counted as usize, per_write);
    proxy.stop().await;
}
