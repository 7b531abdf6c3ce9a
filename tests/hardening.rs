//! What a hostile client or a broken upstream can send, and what the proxy must do with it:
//! answer clearly, keep serving, and let nothing grow without a bound. Each test here was
//! written against a finding reproduced on the code before it was fixed.

mod common;

use std::time::{Duration, Instant};

use common::{Behaviour, FakeUpstream, Proxy, chat, client, post};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A stream request body.
fn streamed(content: &str) -> String {
    json!({"model": "gpt-4o-mini", "stream": true,
           "messages": [{"role": "user", "content": content}]})
    .to_string()
}

#[tokio::test]
async fn a_ttl_beyond_any_clock_is_refused_before_the_upstream_is_called() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");
    for body in [chat("forever"), streamed("forever")] {
        for ttl in [
            "18446744073709551615",
            "99999999999999999999999",
            "315360001",
        ] {
            let r = post(&c, &url, body.clone(), &[("llm-dedup-ttl", ttl)]).await;
            assert_eq!(r.status, 400, "{ttl}: {:?}", r.body);
            let message = r.body["error"]["message"].as_str().expect("message");
            assert!(message.contains("llm-dedup-ttl"), "{message}");
        }
    }
    assert_eq!(upstream.calls(), 0, "nothing reached the upstream");
    // The largest TTL accepted (ten years) stores and serves.
    let ten_years = [("llm-dedup-ttl", "315360000")];
    assert_eq!(post(&c, &url, chat("long"), &ten_years).await.cache, "miss");
    assert_eq!(post(&c, &url, chat("long"), &ten_years).await.cache, "hit");
    // A max-age beyond what a number holds means "any age" (RFC 9111 says read it as 2^31).
    let any_age = [("cache-control", "max-age=99999999999999999999999")];
    assert_eq!(post(&c, &url, chat("long"), &any_age).await.cache, "hit");
    assert_eq!(upstream.calls(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn an_upstream_asking_for_absurd_waits_neither_crashes_nor_poisons_the_budget() {
    let upstream = FakeUpstream::with(Behaviour {
        absurd_refusals: 1,
        ..Behaviour::default()
    })
    .await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");
    // A wait longer than the retry budget is not waited out: the refusal is passed on.
    let refused = post(&c, &url, chat("first"), &[]).await;
    assert_eq!(refused.status, 429, "{:?}", refused.body);
    assert_eq!(upstream.calls(), 1, "not retried");
    // The same credential's next requests go through at the pace the headers allow (600 a
    // minute, none left: one every ~0.1 s), not after centuries, and not refused.
    let started = Instant::now();
    for i in 0..3 {
        let r = post(&c, &url, chat(&format!("next {i}")), &[]).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(upstream.calls(), 4);
    proxy.stop().await;
}

#[tokio::test]
async fn model_names_cannot_grow_the_counters_without_bound() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("c.db");
    let proxy = Proxy::with_db(&upstream, &db).await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");
    let long = "m".repeat(10_000);
    for i in 0..400 {
        let model = if i == 0 {
            long.clone()
        } else {
            format!("model-{i}")
        };
        let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(post(&c, &url, body.to_string(), &[]).await.status, 200);
    }
    proxy.stop().await;
    let conn = rusqlite::Connection::open(&db).expect("open");
    let (rows, longest, requests): (i64, i64, i64) = conn
        .query_row(
            "SELECT count(*), max(length(model)), sum(requests) FROM counters
             WHERE route = 'chat.completions'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("counters");
    assert!(rows <= 257, "{rows} counter rows for one route");
    assert!(
        longest <= 128,
        "a model name of {longest} characters was kept"
    );
    assert_eq!(requests, 400, "every request is still counted");
    let other: i64 = conn
        .query_row(
            "SELECT requests FROM counters WHERE route = 'chat.completions' AND model = '(other)'",
            [],
            |r| r.get(0),
        )
        .expect("the rest are counted as (other)");
    assert_eq!(other, 400 - 256);
}

#[tokio::test]
async fn a_stream_past_max_stream_is_passed_on_but_no_longer_held() {
    let upstream = FakeUpstream::start().await;
    // 60 events of 8 KiB, 25 ms apart: about 480 KiB over 1.5 s.
    upstream.behave(|b| b.extra_events = 60);
    upstream.behave(|b| b.big_event_bytes = 8 * 1024);
    upstream.behave(|b| b.chunk_delay = Duration::from_millis(25));
    let max_stream = 64 * 1024;
    let proxy = Proxy::start(upstream.engine().max_stream_bytes(max_stream)).await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");
    let first = tokio::spawn({
        let (c, url) = (c.clone(), url.clone());
        async move {
            let r = c
                .post(&url)
                .header("authorization", "Bearer sk-test-key-1")
                .body(streamed("long"))
                .send()
                .await
                .expect("sent");
            r.bytes().await.expect("the whole stream")
        }
    });
    // Well past the limit, the stream is still arriving.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let text = proxy.engine.metrics_text().await;
    let held = common::sample(&text, "llm_dedup_stream_buffer_bytes");
    assert!(
        held <= max_stream as f64,
        "{held} bytes held for one stream"
    );
    let (reserved, _) = proxy.engine.memory_usage();
    assert!(reserved < max_stream as u64, "{reserved} bytes reserved");
    // A request arriving now cannot be given the stream from its start: it makes its own
    // call instead of joining.
    let late = post(&c, &url, streamed("long"), &[]).await;
    assert_eq!(late.status, 200);
    assert!(
        late.raw.ends_with(b"data: [DONE]\n\n"),
        "the late stream is whole"
    );
    let body = first.await.expect("first");
    assert!(body.len() > 480 * 1024, "{} bytes", body.len());
    assert!(
        body.ends_with(b"data: [DONE]\n\n"),
        "the first stream is whole"
    );
    assert_eq!(upstream.calls(), 2);
    // Too long to store: the next request goes upstream again.
    assert_eq!(post(&c, &url, streamed("long"), &[]).await.cache, "miss");
    proxy.stop().await;
}

/// An upstream that answers every request `200` with a JSON body cut short, delimited by
/// closing the connection (no `Content-Length`, not chunked), as a broken server might.
async fn cut_json_upstream() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0; 64 * 1024];
                let _ = conn.read(&mut buf).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                            connection: close\r\n\r\n";
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn
                    .write_all(br#"{"id":"chatcmpl-1","choices":[{"mess"#)
                    .await;
                let _ = conn.shutdown().await;
            });
        }
    });
    (url, server)
}

#[tokio::test]
async fn a_json_answer_cut_short_is_passed_on_but_never_stored() {
    let (upstream, _server) = cut_json_upstream().await;
    let proxy = Proxy::start(llm_dedup::Dedup::builder().upstream(upstream)).await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");
    let first = post(&c, &url, chat("cut"), &[]).await;
    assert_eq!(first.status, 200);
    assert_eq!(&first.raw[..], br#"{"id":"chatcmpl-1","choices":[{"mess"#);
    let again = post(&c, &url, chat("cut"), &[]).await;
    assert_eq!(again.cache, "miss", "a cut answer is never a hit");
    proxy.stop().await;
}
