//! Streamed answers: cached as their events, replayed byte for byte, shared live between
//! identical requests in flight, never stored when cut or failed.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Behaviour, FakeUpstream, Proxy, StreamEnd, client, stream_events};
use serde_json::{Value, json};

/// A streamed request body for `path`, in that API's shape.
fn streamed(path: &str, content: &str) -> String {
    match path {
        "/v1/responses" => json!({"model": "gpt-4o-mini", "input": content, "stream": true}),
        "/v1/messages" => json!({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": true,
                                 "messages": [{"role": "user", "content": content}]}),
        _ => json!({"model": "gpt-4o-mini", "stream": true,
                    "stream_options": {"include_usage": true},
                    "messages": [{"role": "user", "content": content}]}),
    }
    .to_string()
}

fn send(c: &reqwest::Client, url: &str, body: String) -> reqwest::RequestBuilder {
    c.post(url)
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-stream")
        .body(body)
}

/// Sends and reads the whole stream: (cache header, content type, bytes).
async fn read_all(c: &reqwest::Client, url: &str, body: String) -> (String, String, Bytes) {
    let resp = send(c, url, body).send().await.expect("sent");
    assert_eq!(resp.status(), 200);
    let cache = resp.headers()["llm-dedup-cache"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let ctype = resp.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .to_owned();
    (cache, ctype, resp.bytes().await.expect("whole stream"))
}

#[tokio::test]
async fn each_framing_is_replayed_byte_for_byte() {
    let upstream = FakeUpstream::with(Behaviour {
        chunk_delay: Duration::from_millis(5),
        ..Behaviour::default()
    })
    .await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    for (i, path) in ["/v1/chat/completions", "/v1/responses", "/v1/messages"]
        .into_iter()
        .enumerate()
    {
        let url = proxy.url(path);
        let (cache, ctype, first) = read_all(&c, &url, streamed(path, "replay")).await;
        assert_eq!(cache, "miss", "{path}");
        assert!(ctype.starts_with("text/event-stream"), "{path}: {ctype}");
        // What the client got is exactly what the upstream sent.
        let model = if path == "/v1/messages" {
            "claude-sonnet-4-5"
        } else {
            "gpt-4o-mini"
        };
        let usage = path == "/v1/chat/completions";
        let sent = stream_events(i + 1, path, model, usage).concat();
        assert_eq!(first, sent.as_bytes(), "{path}");
        let (cache, ctype, replay) = read_all(&c, &url, streamed(path, "replay")).await;
        assert_eq!(cache, "hit", "{path}");
        assert!(ctype.starts_with("text/event-stream"), "{path}");
        assert_eq!(
            replay, first,
            "{path}: the replay is the stream byte for byte"
        );
        assert_eq!(upstream.calls(), i + 1, "{path}");
    }
    // The chat replay still carries the usage chunk and ends with [DONE].
    let (_, _, replay) = read_all(
        &c,
        &proxy.url("/v1/chat/completions"),
        streamed("/v1/chat/completions", "replay"),
    )
    .await;
    let text = String::from_utf8(replay.to_vec()).expect("utf8");
    assert!(text.contains("\"usage\""));
    assert!(text.ends_with("data: [DONE]\n\n"));
    // Unknown event types are kept.
    let (_, _, replay) = read_all(
        &c,
        &proxy.url("/v1/responses"),
        streamed("/v1/responses", "replay"),
    )
    .await;
    assert!(String::from_utf8_lossy(&replay).contains("response.x_future_event"));
    proxy.stop().await;
}

#[tokio::test]
async fn ten_identical_streams_share_one_upstream_call_live() {
    let upstream = FakeUpstream::with(Behaviour {
        hold: true,
        ..Behaviour::default()
    })
    .await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");

    let mut responses = Vec::new();
    for _ in 0..10 {
        responses.push(send(&c, &url, streamed("/v1/chat/completions", "live")).send());
    }
    let mut responses: Vec<reqwest::Response> = futures_util::future::join_all(responses)
        .await
        .into_iter()
        .map(|r| r.expect("sent"))
        .collect();
    // The upstream holds everything after the first event: every one of the ten must get
    // that first event while the stream is still open (or this times out).
    let mut firsts = Vec::new();
    for r in &mut responses {
        let first = tokio::time::timeout(Duration::from_secs(10), r.chunk())
            .await
            .expect("first event before the stream ended")
            .expect("read")
            .expect("a chunk");
        firsts.push(first);
    }
    assert_eq!(upstream.calls(), 1);
    assert!(firsts.iter().all(|f| f == &firsts[0]));
    let mut statuses: Vec<String> = responses
        .iter()
        .map(|r| {
            r.headers()["llm-dedup-cache"]
                .to_str()
                .expect("ascii")
                .to_owned()
        })
        .collect();
    statuses.sort();
    assert_eq!(statuses[9], "miss");
    assert!(
        statuses[..9].iter().all(|s| s == "coalesced"),
        "{statuses:?}"
    );

    upstream.state.release.notify_waiters();
    let mut bodies = Vec::new();
    for (r, first) in responses.into_iter().zip(firsts) {
        let rest = r.bytes().await.expect("rest of the stream");
        bodies.push([first, rest].concat());
    }
    assert!(bodies.iter().all(|b| b == &bodies[0]));
    assert!(bodies[0].ends_with(b"data: [DONE]\n\n"));
    // And it was stored: the next one is a hit, with the same bytes.
    let (cache, _, replay) = read_all(&c, &url, streamed("/v1/chat/completions", "live")).await;
    assert_eq!((cache.as_str(), &replay[..]), ("hit", &bodies[0][..]));
    assert_eq!(upstream.calls(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn a_leader_hanging_up_mid_stream_cuts_nothing_for_its_followers() {
    let upstream = FakeUpstream::with(Behaviour {
        hold: true,
        ..Behaviour::default()
    })
    .await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let url = proxy.url("/v1/messages");
    let mut leader = send(&c, &url, streamed("/v1/messages", "hang up"))
        .send()
        .await
        .expect("sent");
    assert_eq!(leader.headers()["llm-dedup-cache"], "miss");
    leader.chunk().await.expect("read").expect("first event");
    let mut follower = send(&c, &url, streamed("/v1/messages", "hang up"))
        .send()
        .await
        .expect("sent");
    assert_eq!(follower.headers()["llm-dedup-cache"], "coalesced");
    drop(leader); // the leader's client goes away mid-stream
    upstream.state.release.notify_waiters();
    let mut got = Vec::new();
    while let Some(chunk) = follower
        .chunk()
        .await
        .expect("the follower's stream is whole")
    {
        got.extend_from_slice(&chunk);
    }
    assert!(
        String::from_utf8_lossy(&got)
            .ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")
    );
    let (cache, _, _) = read_all(&c, &url, streamed("/v1/messages", "hang up")).await;
    assert_eq!(cache, "hit", "the complete stream was stored");
    assert_eq!(upstream.calls(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn a_cut_stream_is_passed_on_as_it_came_and_never_stored() {
    let upstream = FakeUpstream::with(Behaviour {
        stream_end: StreamEnd::Cut,
        ..Behaviour::default()
    })
    .await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");
    let resp = send(&c, &url, streamed("/v1/chat/completions", "cut"))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    // The client sees the stream break, as it would have without the proxy.
    assert!(
        resp.bytes().await.is_err(),
        "a cut stream must not look complete"
    );
    upstream.behave(|b| b.stream_end = StreamEnd::Complete);
    let (cache, _, body) = read_all(&c, &url, streamed("/v1/chat/completions", "cut")).await;
    assert_eq!(cache, "miss", "nothing was stored");
    assert!(body.ends_with(b"data: [DONE]\n\n"));
    assert_eq!(upstream.calls(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn a_stream_with_an_error_event_is_never_stored() {
    let upstream = FakeUpstream::with(Behaviour {
        stream_end: StreamEnd::ErrorEvent,
        ..Behaviour::default()
    })
    .await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let url = proxy.url("/v1/responses");
    let (cache, _, body) = read_all(&c, &url, streamed("/v1/responses", "err")).await;
    assert_eq!(cache, "miss");
    assert!(
        String::from_utf8_lossy(&body).contains("event: error"),
        "passed on as it came"
    );
    let (cache, _, _) = read_all(&c, &url, streamed("/v1/responses", "err")).await;
    assert_eq!(cache, "miss", "a failed stream is not replayed");
    assert_eq!(upstream.calls(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn cache_controls_and_limits_apply_to_streams() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::start(upstream.engine().max_stream_bytes(200)).await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");
    let body = || streamed("/v1/chat/completions", "controls");

    // Longer than max_stream_bytes: passed on whole, not stored.
    let (cache, _, first) = read_all(&c, &url, body()).await;
    assert_eq!(cache, "miss");
    assert!(first.ends_with(b"data: [DONE]\n\n"));
    let (cache, _, _) = read_all(&c, &url, body()).await;
    assert_eq!(cache, "miss", "too large to store");
    proxy.stop().await;

    let proxy = Proxy::over(&upstream).await;
    let url = proxy.url("/v1/chat/completions");
    let r = send(&c, &url, body())
        .header("cache-control", "no-store")
        .send()
        .await
        .expect("sent");
    assert_eq!(r.headers()["llm-dedup-cache"], "bypass");
    r.bytes().await.expect("stream");
    let r = send(&c, &url, body())
        .header("cache-control", "only-if-cached")
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 504, "no-store stored nothing");
    let (cache, _, _) = read_all(&c, &url, body()).await;
    assert_eq!(cache, "miss");
    let r = send(&c, &url, body())
        .header("llm-dedup-namespace", "other")
        .send()
        .await
        .expect("sent");
    assert_eq!(
        r.headers()["llm-dedup-cache"],
        "miss",
        "namespaces apply to streams"
    );
    r.bytes().await.expect("stream");
    let (cache, _, _) = read_all(&c, &url, body()).await;
    assert_eq!(cache, "hit");
    // A streamed and a non-streamed request never share an entry.
    let plain: Value = {
        let mut v: Value = serde_json::from_str(&body()).expect("json");
        v["stream"] = json!(false);
        v
    };
    let r = send(&c, &url, plain.to_string())
        .send()
        .await
        .expect("sent");
    assert_eq!(r.headers()["llm-dedup-cache"], "miss");
    proxy.stop().await;
}
