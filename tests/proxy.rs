//! The proxy through HTTP, as a client sees it, against a fake OpenAI upstream.

mod common;

use std::time::Duration;

use common::{Behaviour, FakeUpstream, Proxy, chat, client, post};
use llm_dedup::Dedup;
use serde_json::json;

#[tokio::test]
async fn a_repeat_is_answered_from_the_cache_on_every_cacheable_route() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let proxy = Proxy::with_db(&upstream, &dir.path().join("c.db")).await;
    let c = client();
    let routes = [
        ("/v1/chat/completions", chat("hello")),
        (
            "/v1/completions",
            json!({"model": "m", "prompt": "hi"}).to_string(),
        ),
        (
            "/v1/embeddings",
            json!({"model": "e", "input": "hi"}).to_string(),
        ),
        (
            "/v1/responses",
            json!({"model": "m", "input": "hi"}).to_string(),
        ),
        ("/v1/moderations", json!({"input": "hi"}).to_string()),
    ];
    for (i, (path, body)) in routes.iter().enumerate() {
        let first = post(&c, &proxy.url(path), body.clone(), &[]).await;
        assert_eq!(first.status, 200, "{path}");
        assert_eq!(first.cache, "miss", "{path}");
        let second = post(&c, &proxy.url(path), body.clone(), &[]).await;
        assert_eq!(second.status, 200, "{path}");
        assert_eq!(second.cache, "hit", "{path}");
        assert_eq!(second.raw, first.raw, "{path}: same body, same id");
        assert_eq!(second.age, Some(0), "{path}: age on hits");
        let key = second.key.expect("key header");
        assert_eq!(key.len(), 64);
        assert_eq!(first.key.as_deref(), Some(key.as_str()));
        assert_eq!(upstream.calls(), i + 1, "{path}: the upstream saw one call");
        assert_eq!(
            second.headers["content-type"], "application/json",
            "{path}: content type replayed"
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn fifty_identical_concurrent_requests_make_one_upstream_call() {
    let upstream = FakeUpstream::with(Behaviour {
        delay: Duration::from_millis(300),
        ..Behaviour::default()
    })
    .await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move { post(&c, &url, chat("same question"), &[]).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.expect("task"));
    }
    assert_eq!(upstream.calls(), 1);
    let first_id = &outcomes[0].body["id"];
    for o in &outcomes {
        assert_eq!(o.status, 200);
        assert_eq!(&o.body["id"], first_id);
    }
    let misses = outcomes.iter().filter(|o| o.cache == "miss").count();
    let shared = outcomes
        .iter()
        .filter(|o| o.cache == "coalesced" || o.cache == "hit")
        .count();
    assert_eq!((misses, shared), (1, 49));
    proxy.stop().await;
}

#[tokio::test]
async fn entries_survive_a_restart_on_the_same_database() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("cache.sqlite3");
    let c = client();

    let proxy = Proxy::with_db(&upstream, &db).await;
    let url = proxy.url("/v1/chat/completions");
    let first = post(&c, &url, chat("persist me"), &[]).await;
    assert_eq!(first.cache, "miss");
    proxy.stop().await;

    let proxy = Proxy::with_db(&upstream, &db).await;
    let again = post(
        &c,
        &proxy.url("/v1/chat/completions"),
        chat("persist me"),
        &[],
    )
    .await;
    assert_eq!(again.cache, "hit");
    assert_eq!(again.raw, first.raw);
    assert_eq!(upstream.calls(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn equivalent_requests_share_an_entry_and_different_ones_never_do() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");
    let base =
        r#"{"model":"gpt-4o-mini","temperature":1,"messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(post(&c, &url, base, &[]).await.cache, "miss");

    let same = [
        r#"{ "messages" : [ { "content":"hi", "role":"user" } ],
             "temperature": 1.0, "model": "gpt-4o-mini" }"#,
        r#"{"model":"gpt-4o-mini","temperature":1e0,"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"gpt-4o-mini","temperature":1,"messages":[{"role":"user","content":"hi"}],
            "user":"alice","metadata":{"job":"7"},"store":false,"prompt_cache_key":"k",
            "safety_identifier":"s"}"#,
    ];
    for body in same {
        let s = post(&c, &url, body, &[]).await;
        assert_eq!(s.cache, "hit", "{body}");
    }
    assert_eq!(upstream.calls(), 1);

    let different = [
        r#"{"model":"gpt-4o","temperature":1,"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"gpt-4o-mini","temperature":1,"messages":[{"role":"user","content":"hi!"}]}"#,
        r#"{"model":"gpt-4o-mini","temperature":0.5,"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"gpt-4o-mini","temperature":1,"seed":7,"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"gpt-4o-mini","temperature":1,"messages":[{"role":"user","content":"hi"}],
            "tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]}"#,
    ];
    for (i, body) in different.iter().enumerate() {
        let s = post(&c, &url, *body, &[]).await;
        assert_eq!(s.cache, "miss", "{body}");
        assert_eq!(upstream.calls(), i + 2);
    }
    proxy.stop().await;
}

#[tokio::test]
async fn api_keys_partition_the_cache_unless_it_is_shared() {
    let upstream = FakeUpstream::start().await;
    let c = client();
    let alice = [("authorization", "Bearer sk-alice-secret")];
    let bob = [("authorization", "Bearer sk-bob-secret")];

    let proxy = Proxy::over(&upstream).await;
    let url = proxy.url("/v1/chat/completions");
    let a = post(&c, &url, chat("q"), &alice).await;
    let b = post(&c, &url, chat("q"), &bob).await;
    assert_eq!((a.cache.as_str(), b.cache.as_str()), ("miss", "miss"));
    assert_ne!(a.key, b.key);
    assert_eq!(post(&c, &url, chat("q"), &alice).await.cache, "hit");
    assert_eq!(upstream.calls(), 2);
    // The credential reached the upstream as sent (the last upstream call was bob's; alice's
    // repeat was a hit).
    let seen = upstream.state.last_headers.lock().expect("lock").clone();
    assert_eq!(
        seen.expect("headers")["authorization"],
        "Bearer sk-bob-secret"
    );
    proxy.stop().await;

    let shared = Proxy::start(upstream.engine().shared_cache(true)).await;
    let url = shared.url("/v1/chat/completions");
    assert_eq!(post(&c, &url, chat("q2"), &alice).await.cache, "miss");
    // Bob's key is not known to the upstream yet: his first request is a call of his own...
    assert_eq!(post(&c, &url, chat("q2"), &bob).await.cache, "miss");
    // ...and once it was accepted, he shares alice's answers.
    assert_eq!(post(&c, &url, chat("q3"), &alice).await.cache, "miss");
    assert_eq!(post(&c, &url, chat("q3"), &bob).await.cache, "hit");
    shared.stop().await;
}

#[tokio::test]
async fn no_credential_reaches_the_database() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let proxy = Proxy::with_db(&upstream, &dir.path().join("c.db")).await;
    let c = client();
    let secret = "sk-proj-VERYSECRET0123456789";
    let auth = format!("Bearer {secret}");
    let headers = [
        ("authorization", auth.as_str()),
        ("x-api-key", secret),
        ("api-key", secret),
        ("openai-organization", "org-SECRETORG"),
    ];
    post(
        &c,
        &proxy.url("/v1/chat/completions"),
        chat("keep my key"),
        &headers,
    )
    .await;
    proxy.stop().await;
    for entry in std::fs::read_dir(dir.path()).expect("dir") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("read");
        for needle in [secret.as_bytes(), b"VERYSECRET", b"SECRETORG"] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "credential found on disk"
            );
        }
    }
}

#[tokio::test]
async fn what_is_not_cacheable_passes_through_unstored() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();

    // GET and other paths.
    for _ in 0..2 {
        let r = common::seen(
            c.get(proxy.url("/v1/models?limit=5"))
                .send()
                .await
                .expect("sent"),
        )
        .await;
        assert_eq!((r.status, r.cache.as_str()), (200, "bypass"));
    }
    let upload = post(&c, &proxy.url("/v1/files"), vec![7u8; 100_000], &[]).await;
    assert_eq!(upload.cache, "bypass");
    assert_eq!(
        upload.body["received_bytes"], 100_000,
        "body forwarded whole"
    );
    assert_eq!(upstream.calls(), 3);

    // Stateful Responses requests.
    let stateful =
        json!({"model": "m", "input": "hi", "previous_response_id": "resp_1"}).to_string();
    for _ in 0..2 {
        let r = post(&c, &proxy.url("/v1/responses"), stateful.clone(), &[]).await;
        assert_eq!(r.cache, "bypass");
    }
    assert_eq!(upstream.calls(), 5);

    // Non-2xx answers reach the client as sent and are not stored.
    upstream.behave(|b| b.fail_status = Some(400));
    for _ in 0..2 {
        let r = post(&c, &proxy.url("/v1/chat/completions"), chat("bad"), &[]).await;
        assert_eq!(r.status, 400);
        assert_eq!(r.body["error"]["type"], "invalid_request_error");
        assert_eq!(r.cache, "miss");
    }
    assert_eq!(upstream.calls(), 7);
    upstream.behave(|b| b.fail_status = None);
    assert_eq!(
        post(&c, &proxy.url("/v1/chat/completions"), chat("bad"), &[])
            .await
            .cache,
        "miss"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_streamed_miss_reaches_the_client_event_by_event() {
    let upstream = FakeUpstream::with(Behaviour {
        hold: true,
        ..Behaviour::default()
    })
    .await;
    let proxy = Proxy::over(&upstream).await;
    let body = json!({"model": "gpt-4o-mini", "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let mut resp = client()
        .post(proxy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.headers()["llm-dedup-cache"], "miss");
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/event-stream")
    );
    // The upstream holds the rest of the stream until released: the first chunk must reach
    // the client before the stream has ended, or this waits forever (bounded by the timeout).
    let first = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
        .await
        .expect("first chunk arrives while the stream is still open")
        .expect("read")
        .expect("a chunk");
    assert!(first.starts_with(b"data: {"));
    assert!(String::from_utf8_lossy(&first).contains("Hel"));
    upstream.state.release.notify_waiters();
    let mut rest = Vec::new();
    while let Some(chunk) = resp.chunk().await.expect("read") {
        rest.extend_from_slice(&chunk);
    }
    assert!(rest.ends_with(b"data: [DONE]\n\n"));
    proxy.stop().await;
}

/// `only-if-cached` takes an answer already on its way: it joins a stream in flight (from
/// its first event), and never starts an upstream call of its own.
#[tokio::test]
async fn only_if_cached_joins_an_answer_in_flight_but_never_starts_one() {
    let upstream = FakeUpstream::with(Behaviour {
        hold: true,
        ..Behaviour::default()
    })
    .await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");
    let streamed = json!({"model": "gpt-4o-mini", "stream": true,
                          "messages": [{"role": "user", "content": "on its way"}]})
    .to_string();
    let only = [("cache-control", "only-if-cached")];
    let leader = {
        let (c, url, body) = (c.clone(), url.clone(), streamed.clone());
        tokio::spawn(async move { post(&c, &url, body, &[]).await })
    };
    upstream.wait_for_calls(1).await;
    // Its answer starts (the stream it joined is live) before the upstream goes on.
    let joined = c
        .post(&url)
        .header("authorization", "Bearer sk-test-key-1")
        .header("content-type", "application/json")
        .header(only[0].0, only[0].1)
        .body(streamed.clone())
        .send()
        .await
        .expect("sent");
    upstream.state.release.notify_waiters();
    let joined = common::seen(joined).await;
    let leader = leader.await.expect("leader");
    assert_eq!((joined.status, joined.cache.as_str()), (200, "coalesced"));
    assert_eq!(
        joined.raw, leader.raw,
        "the same stream, from its first event"
    );
    assert!(String::from_utf8_lossy(&joined.raw).ends_with("data: [DONE]\n\n"));
    // Nothing in flight and nothing stored: 504, and still one upstream call.
    let other = post(&c, &url, chat("not on its way"), &only).await;
    assert_eq!(other.status, 504);
    assert_eq!(upstream.calls(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn cache_control_directives_steer_reads_and_writes() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");

    // only-if-cached on a miss: 504 with an OpenAI-style error, no upstream call.
    let r = post(&c, &url, chat("cc"), &[("cache-control", "only-if-cached")]).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.body["error"]["code"], "not_cached");
    assert_eq!(upstream.calls(), 0);

    // no-store: goes upstream, stores nothing.
    let r = post(&c, &url, chat("cc"), &[("cache-control", "no-store")]).await;
    assert_eq!(r.cache, "bypass");
    let r = post(&c, &url, chat("cc"), &[("cache-control", "only-if-cached")]).await;
    assert_eq!(r.status, 504);

    let first = post(&c, &url, chat("cc"), &[]).await;
    assert_eq!(first.cache, "miss");
    let r = post(&c, &url, chat("cc"), &[("cache-control", "only-if-cached")]).await;
    assert_eq!((r.status, r.cache.as_str()), (200, "hit"));

    // no-cache: a fresh answer, which replaces the stored one.
    let fresh = post(&c, &url, chat("cc"), &[("cache-control", "no-cache")]).await;
    assert_eq!(fresh.cache, "miss");
    assert_ne!(fresh.body["id"], first.body["id"]);
    let after = post(&c, &url, chat("cc"), &[]).await;
    assert_eq!(
        (after.cache.as_str(), &after.body["id"]),
        ("hit", &fresh.body["id"])
    );

    // max-age: a young enough entry is used, an older one is refreshed.
    let r = post(&c, &url, chat("cc"), &[("cache-control", "max-age=3600")]).await;
    assert_eq!(r.cache, "hit");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = post(&c, &url, chat("cc"), &[]).await;
    assert_eq!(r.cache, "hit");
    assert!(
        r.age >= Some(1),
        "age counts the seconds since it was stored: {r:?}"
    );
    let r = post(&c, &url, chat("cc"), &[("cache-control", "max-age=0")]).await;
    assert_eq!(r.cache, "miss");
    let calls = upstream.calls();

    // Namespaces are separate key spaces.
    let r = post(&c, &url, chat("cc"), &[("llm-dedup-namespace", "team-b")]).await;
    assert_eq!(r.cache, "miss");
    let r = post(&c, &url, chat("cc"), &[("llm-dedup-namespace", "team-b")]).await;
    assert_eq!(r.cache, "hit");
    assert_eq!(upstream.calls(), calls + 1);
    proxy.stop().await;
}

#[tokio::test]
async fn a_per_request_ttl_expires_the_entry() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let proxy = Proxy::with_db(&upstream, &dir.path().join("c.db")).await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");
    let r = post(&c, &url, chat("ttl"), &[("llm-dedup-ttl", "1")]).await;
    assert_eq!(r.cache, "miss");
    assert_eq!(post(&c, &url, chat("ttl"), &[]).await.cache, "hit");
    // The TTL is wall-clock time stored with the entry, so only real time can pass it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(post(&c, &url, chat("ttl"), &[]).await.cache, "miss");
    assert_eq!(upstream.calls(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_loses_nothing() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let proxy = Proxy::start(
        upstream
            .engine()
            .database(dir.path().join("c.db"))
            .max_body(64 * 1024),
    )
    .await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");
    let stored = post(&c, &url, chat("precious"), &[]).await;
    assert_eq!(stored.cache, "miss");

    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{\"model\": ".to_vec(), 400, "not valid JSON"),
        (vec![0xff, 0xfe, b'{', b'}'], 400, "not valid JSON"),
        (b"[1, 2, 3]".to_vec(), 400, "JSON object"),
        (vec![b' '; 65 * 1024], 413, "larger than the limit"),
    ];
    for (body, status, words) in cases {
        let r = post(&c, &url, body, &[]).await;
        assert_eq!(r.status, status);
        let message = r.body["error"]["message"].as_str().expect("message");
        assert!(message.contains(words), "{message}");
        assert_eq!(r.body["error"]["type"], "invalid_request_error");
        assert_eq!(r.headers["content-type"], "application/json");
    }
    // A body over the limit without a Content-Length (chunked) is refused too.
    let chunks =
        futures_util::stream::iter((0..100).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1024])));
    let r = common::seen(
        c.post(&url)
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await
            .expect("sent"),
    )
    .await;
    assert_eq!(r.status, 413);

    let r = post(&c, &url, chat("x"), &[("llm-dedup-ttl", "soon")]).await;
    assert_eq!(r.status, 400);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("llm-dedup-ttl")
    );

    assert_eq!(upstream.calls(), 1, "no bad request reached the upstream");
    let again = post(&c, &url, chat("precious"), &[]).await;
    assert_eq!(
        (again.cache.as_str(), again.raw.clone()),
        ("hit", stored.raw)
    );
    proxy.stop().await;
}

/// A body that arrives in pieces (chunked, with pauses) is the same request as one sent whole.
#[tokio::test]
async fn a_body_sent_in_pieces_is_the_same_request() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");
    let body = chat("in pieces").into_bytes();
    let pieces: Vec<Vec<u8>> = body
        .chunks(body.len() / 3 + 1)
        .map(<[u8]>::to_vec)
        .collect();
    assert_eq!(pieces.len(), 3);
    let slowly = futures_util::stream::unfold(pieces.into_iter(), |mut rest| async move {
        let piece = rest.next()?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        Some((Ok::<_, std::io::Error>(piece), rest))
    });
    let first = post(&c, &url, reqwest::Body::wrap_stream(slowly), &[]).await;
    assert_eq!((first.status, first.cache.as_str()), (200, "miss"));
    let whole = post(&c, &url, body, &[]).await;
    assert_eq!((whole.cache.as_str(), whole.raw), ("hit", first.raw));
    assert_eq!(upstream.calls(), 1);
    proxy.stop().await;
}

/// Waiting out refusals for at most `ms` milliseconds, so failures surface quickly.
fn short_retries(ms: u64) -> llm_dedup::GovernorSettings {
    llm_dedup::GovernorSettings::default().retry_budget(Duration::from_millis(ms))
}

#[tokio::test]
async fn upstream_failures_are_clear_and_never_stored() {
    let c = client();
    // Down: nothing listens there. Retried within the retry budget, then a clear 502.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let proxy = Proxy::start(Dedup::builder().upstream(dead).governor(short_retries(300))).await;
    let r = post(&c, &proxy.url("/v1/chat/completions"), chat("x"), &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.body["error"]["code"], "upstream_unreachable");
    assert_eq!(r.headers["x-should-retry"], "true");
    proxy.stop().await;

    // Slow: past the first-byte timeout.
    let upstream = FakeUpstream::with(Behaviour {
        delay: Duration::from_millis(2_000),
        ..Behaviour::default()
    })
    .await;
    let proxy = Proxy::start(
        upstream.engine().governor(short_retries(0)).timeouts(
            llm_dedup::Timeouts::default()
                .connect(Duration::from_secs(1))
                .first_byte(Duration::from_millis(200)),
        ),
    )
    .await;
    let r = post(&c, &proxy.url("/v1/chat/completions"), chat("x"), &[]).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.body["error"]["code"], "upstream_timeout");
    proxy.stop().await;

    // Failing: the 500 is retried within the retry budget, then reaches the client as the
    // upstream sent it, and is not stored.
    let upstream = FakeUpstream::with(Behaviour {
        fail_status: Some(500),
        ..Behaviour::default()
    })
    .await;
    let proxy = Proxy::start(upstream.engine().governor(short_retries(1_200))).await;
    let url = proxy.url("/v1/chat/completions");
    let r = post(&c, &url, chat("x"), &[]).await;
    assert_eq!(r.status, 500);
    assert_eq!(r.body["error"]["type"], "server_error");
    let tried = upstream.calls();
    assert!(tried >= 2, "a 500 is worth retrying ({tried} calls)");
    upstream.behave(|b| b.fail_status = None);
    let r = post(&c, &url, chat("x"), &[]).await;
    assert_eq!((r.status, r.cache.as_str()), (200, "miss"));
    assert_eq!(upstream.calls(), tried + 1);
    proxy.stop().await;
}

#[tokio::test]
async fn a_leader_that_hangs_up_does_not_fail_its_followers() {
    let upstream = FakeUpstream::with(Behaviour {
        hold: true,
        ..Behaviour::default()
    })
    .await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");

    let leader = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move { post(&c, &url, chat("slow"), &[]).await })
    };
    upstream.wait_for_calls(1).await;
    leader.abort(); // the leader's client hangs up mid-flight
    let _ = leader.await;
    common::eventually(|| proxy.engine.waiting() == 0).await;

    // The upstream still holds the answer, so the flight is in progress: this one follows it.
    let follower = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move { post(&c, &url, chat("slow"), &[]).await })
    };
    common::waiting(&proxy.engine, 1).await;
    upstream.state.release.notify_waiters();
    let f = follower.await.expect("follower");
    assert_eq!((f.status, f.cache.as_str()), (200, "coalesced"));
    assert_eq!(f.body["id"], "chatcmpl-1");
    assert_eq!(post(&c, &url, chat("slow"), &[]).await.cache, "hit");
    assert_eq!(upstream.calls(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn hop_by_hop_headers_do_not_reach_the_upstream() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    post(
        &c,
        &proxy.url("/v1/chat/completions"),
        chat("h"),
        &[
            ("connection", "x-private-hop"),
            ("x-private-hop", "1"),
            ("te", "trailers"),
            ("llm-dedup-namespace", "n"),
            ("x-stainless-retry-count", "0"),
        ],
    )
    .await;
    let seen = upstream
        .state
        .last_headers
        .lock()
        .expect("lock")
        .clone()
        .expect("headers");
    for gone in ["x-private-hop", "te", "llm-dedup-namespace"] {
        assert!(!seen.contains_key(gone), "{gone} was forwarded");
    }
    assert_eq!(seen["authorization"], "Bearer sk-test-key-1");
    assert_eq!(seen["x-stainless-retry-count"], "0");
    proxy.stop().await;
}

#[tokio::test]
async fn a_byte_identical_repeat_and_a_reformatted_one_get_the_same_key() {
    // The first repeat takes the exact-bytes shortcut, the reformatted one the full parse;
    // both must land on the one entry, and a changed body must not.
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let url = proxy.url("/v1/embeddings");
    let body = r#"{"model":"e","input":"same"}"#;
    let first = post(&c, &url, body, &[]).await;
    let exact = post(&c, &url, body, &[]).await;
    let spaced = post(&c, &url, r#"{ "input" : "same", "model" : "e" }"#, &[]).await;
    assert_eq!(
        (
            first.cache.as_str(),
            exact.cache.as_str(),
            spaced.cache.as_str()
        ),
        ("miss", "hit", "hit")
    );
    assert_eq!(first.key, exact.key);
    assert_eq!(first.key, spaced.key);
    // Same bytes under another credential or namespace are other entries.
    let other = post(&c, &url, body, &[("authorization", "Bearer sk-other")]).await;
    let ns = post(&c, &url, body, &[("llm-dedup-namespace", "x")]).await;
    assert_eq!((other.cache.as_str(), ns.cache.as_str()), ("miss", "miss"));
    assert_eq!(upstream.calls(), 3);
    proxy.stop().await;
}
