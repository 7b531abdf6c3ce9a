//! The governor against an upstream that enforces a rate limit with OpenAI's headers and
//! error bodies: requests are paced, refusals waited out, quota errors passed on at once.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Behaviour, FakeUpstream, Proxy, RetryStyle, chat, client, post};
use llm_dedup::GovernorSettings;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_sixty_succeeds_with_few_upstream_refusals() {
    let upstream = FakeUpstream::with(Behaviour {
        limit_per_sec: 10,
        ..Behaviour::default()
    })
    .await;
    burst_of_sixty(&upstream, 2).await;
}

/// One replica against fixed one-second windows of 10 on the wall clock's seconds, whose
/// headers say truthfully what remains and when the window ends: it spends what remains
/// before the reset and nothing more, so the upstream refuses at most once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_sixty_against_fixed_windows_draws_at_most_one_refusal() {
    let upstream = FakeUpstream::with(Behaviour {
        limit_window: true,
        limit_per_sec: 10,
        ..Behaviour::default()
    })
    .await;
    burst_of_sixty(&upstream, 1).await;
}

/// Sixty distinct requests at once: every one succeeds, and the upstream refuses at most
/// `refusals` of the calls made for them.
async fn burst_of_sixty(upstream: &FakeUpstream, refusals: usize) {
    let proxy = Proxy::over(upstream).await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move { post(&c, &url, chat(&format!("distinct {i}")), &[]).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        let r = t.await.expect("task");
        assert_eq!(r.status, 200, "the client never sees a 429: {:?}", r.body);
        ok += 1;
    }
    assert_eq!(ok, 60);
    assert_eq!(
        upstream.calls() - upstream.state.refusals.load(Ordering::SeqCst),
        60
    );
    let refused = upstream.state.refusals.load(Ordering::SeqCst);
    assert!(
        refused <= refusals,
        "the governor provoked {refused} refusals"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn quota_errors_are_passed_on_at_once_and_never_retried() {
    let upstream = FakeUpstream::with(Behaviour {
        quota_exhausted: true,
        ..Behaviour::default()
    })
    .await;
    let proxy = Proxy::over(&upstream).await;
    let r = post(
        &client(),
        &proxy.url("/v1/chat/completions"),
        chat("q"),
        &[],
    )
    .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.body["error"]["code"], "insufficient_quota");
    assert_eq!(r.headers["x-should-retry"], "false");
    assert_eq!(upstream.calls(), 1, "exactly one upstream call");
    proxy.stop().await;
}

#[tokio::test]
async fn refusals_are_waited_out_whatever_form_retry_after_takes() {
    for style in [
        RetryStyle::Millis,
        RetryStyle::Seconds,
        RetryStyle::HttpDate,
    ] {
        let upstream = FakeUpstream::with(Behaviour {
            retry_style: style,
            refuse_next: 1,
            ..Behaviour::default()
        })
        .await;
        let proxy = Proxy::over(&upstream).await;
        let r = post(
            &client(),
            &proxy.url("/v1/embeddings"),
            json!({"model": "e", "input": "r"}).to_string(),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "{style:?}: {:?}", r.body);
        assert_eq!(upstream.calls(), 2, "{style:?}: one refusal, one retry");
        proxy.stop().await;
    }
}

#[tokio::test]
async fn the_last_refusal_is_passed_on_when_the_retry_budget_is_spent() {
    let upstream = FakeUpstream::with(Behaviour {
        refuse_next: 100,
        ..Behaviour::default()
    })
    .await;
    let proxy = Proxy::start(
        upstream
            .engine()
            .governor(GovernorSettings::default().retry_budget(Duration::from_millis(700))),
    )
    .await;
    let r = post(
        &client(),
        &proxy.url("/v1/chat/completions"),
        chat("b"),
        &[],
    )
    .await;
    assert_eq!(r.status, 429);
    assert_eq!(
        r.body["error"]["code"], "rate_limit_exceeded",
        "as the upstream sent it"
    );
    // 300 ms per wait within a 700 ms budget: the first call and two retries.
    assert_eq!(upstream.calls(), 3);
    proxy.stop().await;
}

#[tokio::test]
async fn a_full_queue_answers_429_with_a_retry_after_the_sdks_honour() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::start(
        upstream.engine().governor(
            GovernorSettings::default()
                .rpm(Some(1))
                .max_queue_wait(Duration::from_millis(200)),
        ),
    )
    .await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");
    assert_eq!(post(&c, &url, chat("first"), &[]).await.status, 200);
    let r = post(&c, &url, chat("second"), &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.body["error"]["code"], "queue_full");
    let retry: u64 = r.headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(
        upstream.calls(),
        1,
        "the queued request never reached the upstream"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn hits_never_wait_on_the_governor_even_while_it_is_paused() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");
    assert_eq!(post(&c, &url, chat("cached"), &[]).await.cache, "miss");
    // The next distinct request is refused and told to wait a second: the budget pauses.
    upstream.behave(|b| b.retry_style = RetryStyle::Seconds);
    upstream.behave(|b| b.refuse_next = 1);
    let paused = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move { post(&c, &url, chat("paused"), &[]).await })
    };
    upstream.wait_for_calls(2).await;
    let started = std::time::Instant::now();
    let hit = post(&c, &url, chat("cached"), &[]).await;
    assert_eq!(hit.cache, "hit");
    assert!(
        !paused.is_finished(),
        "the refused request is still waiting out its pause"
    );
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "the hit did not wait"
    );
    assert_eq!(paused.await.expect("task").status, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn max_concurrency_caps_simultaneous_upstream_calls() {
    let upstream = FakeUpstream::with(Behaviour {
        delay: Duration::from_millis(150),
        ..Behaviour::default()
    })
    .await;
    let proxy = Proxy::start(
        upstream
            .engine()
            .governor(GovernorSettings::default().max_concurrency(Some(2))),
    )
    .await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move { post(&c, &url, chat(&format!("c{i}")), &[]).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("task").status, 200);
    }
    assert_eq!(upstream.calls(), 8);
    assert_eq!(upstream.state.peak_in_progress.load(Ordering::SeqCst), 2);
    proxy.stop().await;
}
