//! The proxy facing the open network: what a hostile or merely slow client can do at its edge.
//!
//! Each test is a finding of the edge review, reproduced as such a client would: a credential
//! "verified" by a health probe, callers merged by a shared organization header, a request
//! whose keying grows with the square of its size, slow headers and bodies, operator endpoints
//! reached through another `Host` or another spelling of their path, and a purge that an
//! answer queued before it survives.

mod common;

use common::{FakeUpstream, Proxy, Seen, chat, client, seen};

const ALICE: &str = "Bearer sk-alice-aaaa";
const MALLORY: &str = "Bearer sk-mallory-mmmm";

/// A POST of `body` to `url` with exactly `headers` (no default credential).
async fn post_as(c: &reqwest::Client, url: &str, body: String, headers: &[(&str, &str)]) -> Seen {
    let mut request = c
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    seen(request.send().await.expect("sent")).await
}

/// With `--shared-cache`, a credential is verified only by a 2xx answer to one of its own
/// cacheable calls. A health probe or a CORS preflight, which self-hosted servers answer to
/// anyone, proves nothing: a refused key stays unable to read what others stored.
#[tokio::test]
async fn only_a_cacheable_call_of_its_own_verifies_a_credential() {
    let upstream = FakeUpstream::start().await;
    upstream
        .state
        .refused_keys
        .lock()
        .expect("lock")
        .push(MALLORY.to_owned());
    let proxy = Proxy::start(upstream.engine().shared_cache(true)).await;
    let url = proxy.url("/v1/chat/completions");
    let c = client();
    let stored = post_as(&c, &url, chat("secret prompt"), &[("authorization", ALICE)]).await;
    assert_eq!((stored.status, stored.cache.as_str()), (200, "miss"));
    let probe = [
        ("authorization", MALLORY),
        ("cache-control", "only-if-cached"),
    ];
    let before = post_as(&c, &url, chat("secret prompt"), &probe).await;
    assert_eq!(before.status, 504, "{}", before.body);

    // What a self-hosted upstream answers to anyone.
    let health = c
        .get(proxy.url("/health"))
        .header("authorization", MALLORY)
        .send()
        .await
        .expect("sent");
    assert_eq!(health.status(), 200);
    let preflight = c
        .request(reqwest::Method::OPTIONS, &url)
        .header("authorization", MALLORY)
        .header("origin", "https://example.com")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .expect("sent");
    assert_eq!(preflight.status(), 204);

    let after = post_as(&c, &url, chat("secret prompt"), &probe).await;
    assert_eq!(
        after.status, 504,
        "a refused key read another tenant's answer ({}): {}",
        after.cache, after.body
    );
    proxy.stop().await;
}

/// Without an API key, the `Cookie` identifies the caller. An organization or project header
/// (not a secret: many callers send the same one) adds to the partition and never takes the
/// cookie's place.
#[tokio::test]
async fn an_organization_header_never_merges_two_cookie_callers() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let url = proxy.url("/v1/chat/completions");
    let c = client();
    let as_cookie = |session: &'static str| {
        [
            ("cookie", session),
            ("openai-organization", "org-shared"),
            ("openai-project", "proj_shared"),
        ]
    };
    let alice = post_as(&c, &url, chat("q"), &as_cookie("session=alice")).await;
    assert_eq!(alice.cache, "miss");
    let again = post_as(&c, &url, chat("q"), &as_cookie("session=alice")).await;
    assert_eq!(again.cache, "hit", "one caller's repeat is a hit");
    let bob = post_as(&c, &url, chat("q"), &as_cookie("session=bob")).await;
    assert_eq!(
        bob.cache, "miss",
        "bob got alice's answer {} through a shared organization header",
        bob.body["id"]
    );
    assert_ne!(bob.body["id"], alice.body["id"]);
    // The organization still tells callers apart where the cookie is the same.
    let other_org = [
        ("cookie", "session=alice"),
        ("openai-organization", "org-other"),
    ];
    assert_eq!(post_as(&c, &url, chat("q"), &other_org).await.cache, "miss");
    proxy.stop().await;
}

/// An embeddings request with more inputs than the provider takes in one request (OpenAI:
/// 2,048) is refused with a clear `400` before any work per input, and nothing goes upstream.
#[tokio::test]
async fn too_many_embedding_inputs_are_refused_before_any_work() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let url = proxy.url("/v1/embeddings");
    let c = client();
    let inputs: Vec<String> = (0..2049).map(|i| format!("chunk {i}")).collect();
    let body = serde_json::json!({"model": "text-embedding-3-small", "input": inputs});
    let refused = post_as(&c, &url, body.to_string(), &[("authorization", ALICE)]).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    let message = refused.body["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("2048") && message.contains("2049"),
        "{message}"
    );
    assert_eq!(upstream.calls(), 0);
    // A token array is one input, however long.
    let tokens: Vec<u32> = (0..3000).collect();
    let body = serde_json::json!({"model": "text-embedding-3-small", "input": tokens});
    let one = post_as(&c, &url, body.to_string(), &[("authorization", ALICE)]).await;
    assert_eq!(one.status, 200, "{}", one.body);
    proxy.stop().await;
}

/// Lets the fake answer what it holds, and answer later calls at once.
fn release(upstream: &FakeUpstream) {
    upstream
        .state
        .hold
        .store(false, std::sync::atomic::Ordering::SeqCst);
    upstream.state.release.notify_waiters();
}

/// An upstream that sends one event and never ends it (no blank line) is passed on as it
/// comes once it outgrows `--max-stream`: the proxy neither holds it whole nor rescans it,
/// and nothing of it is stored.
#[tokio::test]
async fn an_event_that_never_ends_is_passed_on_not_held() {
    use futures_util::StreamExt;
    const BOUND: usize = 256 * 1024;
    const ENDLESS: usize = 1024 * 1024;
    let upstream = FakeUpstream::start().await;
    let state = &upstream.state;
    state
        .unterminated_bytes
        .store(ENDLESS, std::sync::atomic::Ordering::SeqCst);
    state.hold.store(true, std::sync::atomic::Ordering::SeqCst);
    let proxy = Proxy::start(upstream.engine().max_stream_bytes(BOUND)).await;
    let url = proxy.url("/v1/chat/completions");
    let body = serde_json::json!({"model": "gpt-4o-mini", "stream": true,
                                  "messages": [{"role": "user", "content": "go on"}]})
    .to_string();
    let c = client();
    let response = c
        .post(&url)
        .header("authorization", ALICE)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut received = Vec::new();
    // The upstream holds the stream open: what arrives now was passed on, not held back.
    let got = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while received.len() < ENDLESS {
            match stream.next().await {
                Some(Ok(chunk)) => received.extend_from_slice(&chunk),
                _ => break,
            }
        }
    })
    .await;
    assert!(
        got.is_ok() && received.len() >= ENDLESS,
        "only {} bytes of an event growing past --max-stream reached the client while the \
         upstream kept it open",
        received.len()
    );
    release(&upstream);
    while let Some(Ok(chunk)) = stream.next().await {
        received.extend_from_slice(&chunk);
    }
    assert!(received.ends_with(&vec![b'x'; 1024]), "byte for byte");
    let again = post_as(&c, &url, body, &[("authorization", ALICE)]).await;
    assert_eq!(again.cache, "miss", "an unended stream is never stored");
    assert_eq!(upstream.calls(), 2);
    proxy.stop().await;
}

/// A non-streamed answer larger than `--max-stream` is passed on whole to its client and to
/// the identical requests waiting on it, but never held whole nor stored.
#[tokio::test]
async fn an_answer_past_the_bound_is_passed_on_to_every_waiter_and_not_stored() {
    const BOUND: usize = 64 * 1024;
    const PADDING: usize = 200 * 1024;
    let upstream = FakeUpstream::start().await;
    let state = &upstream.state;
    state
        .padding_bytes
        .store(PADDING, std::sync::atomic::Ordering::SeqCst);
    state.hold.store(true, std::sync::atomic::Ordering::SeqCst);
    let proxy = Proxy::start(upstream.engine().max_stream_bytes(BOUND)).await;
    let url = proxy.url("/v1/chat/completions");
    let c = client();
    let (c1, u1) = (c.clone(), url.clone());
    let first =
        tokio::spawn(
            async move { post_as(&c1, &u1, chat("big"), &[("authorization", ALICE)]).await },
        );
    upstream.wait_for_calls(1).await;
    let (c2, u2) = (c.clone(), url.clone());
    let second =
        tokio::spawn(
            async move { post_as(&c2, &u2, chat("big"), &[("authorization", ALICE)]).await },
        );
    // The second joins the flight in progress.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    release(&upstream);
    let (first, second) = (first.await.expect("first"), second.await.expect("second"));
    for seen in [&first, &second] {
        assert_eq!(seen.status, 200);
        assert_eq!(
            seen.body["padding"].as_str().map(str::len),
            Some(PADDING),
            "the whole answer, as one JSON document"
        );
    }
    assert_eq!(
        (first.cache.as_str(), second.cache.as_str()),
        ("miss", "coalesced")
    );
    assert_eq!(upstream.calls(), 1);
    let third = post_as(&c, &url, chat("big"), &[("authorization", ALICE)]).await;
    assert_eq!(
        third.cache, "miss",
        "an answer past the bound is never stored"
    );
    assert_eq!(third.body["padding"].as_str().map(str::len), Some(PADDING));
    assert_eq!(upstream.calls(), 2);
    proxy.stop().await;
}

/// The Responses API keeps a response unless told `store: false`, under the organization that
/// asked: its `resp_` id means nothing to another. With `--shared-cache`, such a request is
/// cached for its own caller only; with `store: false` it is shared. Leaving `store` out and
/// `store: true` are one request.
#[tokio::test]
async fn a_stored_response_is_never_shared_across_partitions() {
    const BOB: &str = "Bearer sk-bob-bbbb";
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::start(upstream.engine().shared_cache(true)).await;
    let c = client();
    let chat_url = proxy.url("/v1/chat/completions");
    for key in [ALICE, BOB] {
        // Each credential verified by a call of its own.
        let verified = post_as(&c, &chat_url, chat(key), &[("authorization", key)]).await;
        assert_eq!(verified.status, 200);
    }
    let url = proxy.url("/v1/responses");
    let ask = |store: Option<bool>| {
        let mut body = serde_json::json!({"model": "gpt-4o-mini", "input": "hello"});
        if let Some(store) = store {
            body["store"] = store.into();
        }
        body.to_string()
    };
    let alice = post_as(&c, &url, ask(None), &[("authorization", ALICE)]).await;
    assert_eq!((alice.status, alice.cache.as_str()), (200, "miss"));
    let bob = post_as(&c, &url, ask(None), &[("authorization", BOB)]).await;
    assert_eq!(
        bob.cache, "miss",
        "bob got alice's stored response {}",
        bob.body["id"]
    );
    assert_ne!(bob.body["id"], alice.body["id"]);
    let again = post_as(&c, &url, ask(Some(true)), &[("authorization", ALICE)]).await;
    assert_eq!(again.cache, "hit", "store: true is the default written out");
    assert_eq!(again.body["id"], alice.body["id"]);
    // Not stored by the provider: shared like any answer.
    let unstored = post_as(&c, &url, ask(Some(false)), &[("authorization", ALICE)]).await;
    assert_eq!(unstored.cache, "miss");
    let shared = post_as(&c, &url, ask(Some(false)), &[("authorization", BOB)]).await;
    assert_eq!(shared.cache, "hit");
    assert_eq!(shared.body["id"], unstored.body["id"]);
    proxy.stop().await;
}
