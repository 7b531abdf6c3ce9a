//! A hung upstream traps no one: not its caller, not the requests that join it, not the next
//! identical request, not a stop. Each test runs against a fake upstream that accepts a call
//! and never answers it, or that goes silent in the middle of a stream.

mod common;

use std::time::{Duration, Instant};

use common::{Behaviour, FakeUpstream, Proxy, chat, client, post};
use llm_dedup::{GovernorSettings, Timeouts};

/// Upstream timeouts short enough for a test, and no retry (the retry budget is spent before
/// the first backoff): a timed-out call is passed on at once.
fn short(upstream: &FakeUpstream) -> llm_dedup::DedupBuilder {
    upstream
        .engine()
        .timeouts(
            Timeouts::default()
                .connect(Duration::from_secs(1))
                .first_byte(Duration::from_secs(2))
                .idle(Duration::from_secs(2)),
        )
        .governor(GovernorSettings::default().retry_budget(Duration::from_millis(10)))
}

/// An upstream that takes the call and never answers: the caller gets `504` once the upstream
/// timeout passes, saying which timeout fired; a request that joined the flight gets it too;
/// the flight leaves the table, and the next identical request makes a fresh call.
#[tokio::test]
async fn a_call_with_no_answer_fails_its_waiters_and_leaves_the_table() {
    let upstream = FakeUpstream::with(Behaviour {
        hang_calls: 1,
        ..Behaviour::default()
    })
    .await;
    let proxy = Proxy::start(short(&upstream)).await;
    let url = proxy.url("/v1/chat/completions");
    let c = client();
    let started = Instant::now();
    let (c1, u1) = (c.clone(), url.clone());
    let first = tokio::spawn(async move { post(&c1, &u1, chat("hung"), &[]).await });
    upstream.wait_for_calls(1).await;
    let second = post(&c, &url, chat("hung"), &[]).await;
    let first = first.await.expect("first");
    let took = started.elapsed();
    for seen in [&first, &second] {
        assert_eq!(seen.status, 504, "{}", seen.body);
        assert_eq!(seen.body["error"]["code"], "upstream_timeout");
        let message = seen.body["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains("--upstream-timeout"), "{message}");
    }
    assert_eq!(second.cache, "", "an error answer carries no cache header");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(upstream.calls(), 1, "the second joined the first's flight");
    assert_eq!(proxy.engine.in_flight(), 0, "the flight left the table");
    let metrics = proxy.engine.metrics_text().await;
    assert_eq!(
        common::sample(
            &metrics,
            "llm_dedup_upstream_timeouts_total{kind=\"first_byte\"}"
        ),
        1.0,
        "{metrics}"
    );
    // The upstream answers again: a fresh call, a whole answer, stored.
    let fresh = post(&c, &url, chat("hung"), &[]).await;
    assert_eq!((fresh.status, fresh.cache.as_str()), (200, "miss"));
    assert_eq!(upstream.calls(), 2);
    assert_eq!(post(&c, &url, chat("hung"), &[]).await.cache, "hit");
    proxy.stop().await;
}

/// A stream that goes silent after its first event: the caller's stream and a live
/// follower's end as cut (never with `[DONE]`), nothing is stored, and the next identical
/// request gets a whole fresh stream.
#[tokio::test]
async fn a_stream_that_goes_silent_is_cut_for_everyone_sharing_it() {
    let upstream = FakeUpstream::with(Behaviour {
        silent_streams: true,
        ..Behaviour::default()
    })
    .await;
    let proxy = Proxy::start(short(&upstream)).await;
    let url = proxy.url("/v1/chat/completions");
    let body = serde_json::json!({"model": "gpt-4o-mini", "stream": true,
        "messages": [{"role": "user", "content": "think hard"}]})
    .to_string();
    let c = client();
    let read = |response: reqwest::Response| async move {
        let status = response.status();
        let body = response.bytes().await;
        (status, body)
    };
    let leader = c
        .post(&url)
        .header("authorization", "Bearer sk-test-key-1")
        .body(body.clone())
        .send()
        .await
        .expect("sent");
    let follower = c
        .post(&url)
        .header("authorization", "Bearer sk-test-key-1")
        .body(body.clone())
        .send()
        .await
        .expect("sent");
    assert_eq!(
        follower.headers()["llm-dedup-cache"],
        "coalesced",
        "a live follower"
    );
    let started = Instant::now();
    for (status, body) in [read(leader).await, read(follower).await] {
        assert_eq!(status, 200, "the stream had started");
        match body {
            // Cut: the body ends with an error, never whole.
            Err(e) => assert!(e.is_body() || e.is_decode(), "{e}"),
            Ok(bytes) => panic!(
                "a silent stream ended as if whole: {}",
                String::from_utf8_lossy(&bytes)
            ),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(proxy.engine.in_flight(), 0);
    let metrics = proxy.engine.metrics_text().await;
    assert_eq!(
        common::sample(&metrics, "llm_dedup_upstream_timeouts_total{kind=\"idle\"}"),
        1.0,
        "{metrics}"
    );
    upstream.behave(|b| b.silent_streams = false);
    let fresh = post(&c, &url, body.clone(), &[]).await;
    assert_eq!(
        fresh.cache, "miss",
        "nothing of the silent stream was stored"
    );
    assert!(String::from_utf8_lossy(&fresh.raw).contains("[DONE]"));
    assert_eq!(upstream.calls(), 2);
    proxy.stop().await;
}

/// A request never waits on a flight that has already outlived the upstream timeout without
/// an answer (here one retrying an upstream that hangs): it makes a fresh call instead.
#[tokio::test]
async fn a_flight_older_than_the_upstream_timeout_is_not_joined() {
    let upstream = FakeUpstream::start().await;
    // Three calls hang; the flight retries them for a while.
    upstream.behave(|b| b.hang_calls = 3);
    let builder = short(&upstream)
        .timeouts(
            Timeouts::default()
                .connect(Duration::from_secs(1))
                .first_byte(Duration::from_secs(1))
                .idle(Duration::from_secs(1)),
        )
        .governor(GovernorSettings::default().retry_budget(Duration::from_secs(30)));
    let proxy = Proxy::start(builder).await;
    let url = proxy.url("/v1/chat/completions");
    let c = client();
    let (c1, u1) = (c.clone(), url.clone());
    let first = tokio::spawn(async move { post(&c1, &u1, chat("retried"), &[]).await });
    // Past the first attempt's timeout: the flight is still retrying.
    upstream.wait_for_calls(2).await;
    let late = post(&c, &url, chat("retried"), &[]).await;
    assert_eq!(late.status, 200, "{}", late.body);
    assert_eq!(
        late.cache, "miss",
        "it joined a flight older than the upstream timeout"
    );
    let first = first.await.expect("first");
    assert_eq!(first.status, 200, "the retried flight succeeds in the end");
    proxy.stop().await;
}
