//! One proxy, many tenants: what one caller's traffic can never hand another.
//!
//! Each test is a finding of the tenancy review, reproduced against the fake upstream as a
//! hostile or unlucky tenant would meet it: answers and errors shared across API keys through
//! a shared cache, hits served to callers with no valid key, a `Connection` header planting an
//! entry, credentials the proxy did not know to tell apart, and Responses answers echoing one
//! caller's fields to another.

mod common;

use axum::body::Body;
use common::{Behaviour, FakeUpstream, Proxy, Seen, chat, client, post, seen};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::time::Duration;
use tower::ServiceExt;

const ALICE: &str = "Bearer sk-alice-aaaa";
const BOB: &str = "Bearer sk-bob-bbbb";

/// Headers that describe one caller's exchange with the upstream, never the answer itself.
const CALLERS_OWN: &[&str] = &[
    "set-cookie",
    "openai-organization",
    "openai-project",
    "x-request-id",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "openai-processing-ms",
];

fn as_(key: &str) -> [(&'static str, &str); 1] {
    [("authorization", key)]
}

/// A POST with no credential at all.
async fn keyless(c: &reqwest::Client, url: &str, body: String) -> Seen {
    let request = c
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    seen(request.send().await.expect("sent")).await
}

/// Lets the upstream answer what it holds, and answer later calls at once.
fn release(upstream: &FakeUpstream) {
    upstream.behave(|b| b.hold = false);
    upstream.state.release.notify_waiters();
}

/// With `--shared-cache`, alice and bob wait on one flight. A 2xx answer reaches bob with only
/// the replayed headers (none of alice's cookie, organization, project, rate limits, request
/// id); a `401` meant for alice's revoked key never reaches bob, who gets his own answer.
#[tokio::test]
async fn a_shared_flight_gives_another_key_only_a_2xx_and_only_the_answers_headers() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::start(upstream.engine().shared_cache(true)).await;
    let url = proxy.url("/v1/chat/completions");
    let c = client();
    // Both keys are accepted by the upstream once.
    for key in [ALICE, BOB] {
        assert_eq!(post(&c, &url, chat(key), &as_(key)).await.status, 200);
    }
    let calls = upstream.calls();

    // A 2xx shared across keys.
    upstream.behave(|b| b.hold = true);
    let (c1, u1) = (c.clone(), url.clone());
    let alice = tokio::spawn(async move { post(&c1, &u1, chat("q"), &as_(ALICE)).await });
    upstream.wait_for_calls(calls + 1).await;
    let (c2, u2) = (c.clone(), url.clone());
    let bob = tokio::spawn(async move { post(&c2, &u2, chat("q"), &as_(BOB)).await });
    common::waiting(&proxy.engine, 2).await;
    release(&upstream);
    let (alice, bob) = (alice.await.expect("alice"), bob.await.expect("bob"));
    assert_eq!((alice.status, bob.status), (200, 200));
    assert_eq!(
        (alice.cache.as_str(), bob.cache.as_str()),
        ("miss", "coalesced")
    );
    assert_eq!(upstream.calls(), calls + 1, "one upstream call for both");
    assert_eq!(
        alice.headers["openai-organization"], "org-aaaa",
        "alice sees her own"
    );
    for name in CALLERS_OWN {
        assert!(
            !bob.headers.contains_key(*name),
            "{name} of alice's exchange reached bob: {:?}",
            bob.headers
        );
    }
    assert_eq!(bob.headers["content-type"], "application/json");
    assert_eq!(bob.body, alice.body, "the answer itself is shared");

    // Alice's key is revoked; her error must stay hers.
    upstream.behave(|b| {
        b.refused_keys.push(ALICE.to_owned());
        b.hold = true;
    });
    let (c1, u1) = (c.clone(), url.clone());
    let alice = tokio::spawn(async move { post(&c1, &u1, chat("q2"), &as_(ALICE)).await });
    upstream.wait_for_calls(calls + 2).await;
    let (c2, u2) = (c.clone(), url.clone());
    let bob = tokio::spawn(async move { post(&c2, &u2, chat("q2"), &as_(BOB)).await });
    common::waiting(&proxy.engine, 2).await;
    release(&upstream);
    let (alice, bob) = (alice.await.expect("alice"), bob.await.expect("bob"));
    assert_eq!(alice.status, 401);
    assert_eq!(alice.body["error"]["code"], "invalid_api_key");
    assert_eq!(bob.status, 200, "bob has a valid key: {}", bob.body);
    assert!(!bob.raw.windows(4).any(|w| w == b"aaaa"), "{}", bob.body);
    assert_eq!(upstream.calls(), calls + 3, "bob made a call of his own");
    // Revoked, alice is no longer answered from the shared cache.
    let again = post(&c, &url, chat("q"), &as_(ALICE)).await;
    assert_eq!(again.status, 401, "{}", again.body);
    proxy.stop().await;
}

/// With `--shared-cache`, a request with no credential or a refused one gets no cached answer:
/// it goes upstream, which says what it thinks of it. A keyless upstream that answers a keyless
/// request still gets a shared cache from then on.
#[tokio::test]
async fn a_shared_cache_answers_no_one_the_upstream_has_not_accepted() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::start(upstream.engine().shared_cache(true)).await;
    let url = proxy.url("/v1/chat/completions");
    let c = client();
    let stored = post(&c, &url, chat("secret prompt"), &as_(ALICE)).await;
    assert_eq!(stored.cache, "miss");
    assert_eq!(
        post(&c, &url, chat("secret prompt"), &as_(ALICE))
            .await
            .cache,
        "hit"
    );

    let calls = upstream.calls();
    let guessed = keyless(&c, &url, chat("secret prompt")).await;
    assert_eq!(guessed.cache, "miss", "no hit without a credential");
    assert_eq!(upstream.calls(), calls + 1);

    let mallory = "Bearer sk-mallory-mmmm";
    upstream.behave(|b| b.refused_keys.push(mallory.to_owned()));
    let wrong = post(&c, &url, chat("secret prompt"), &as_(mallory)).await;
    assert_eq!(wrong.status, 401, "a wrong key gets the upstream's answer");
    assert_ne!(wrong.cache, "hit");
    assert_eq!(upstream.calls(), calls + 2);
    // only-if-cached cannot be used as an oracle either.
    let probe = c
        .post(&url)
        .header("content-type", "application/json")
        .header("authorization", mallory)
        .header("cache-control", "only-if-cached")
        .body(chat("secret prompt"))
        .send()
        .await
        .expect("sent");
    assert_eq!(probe.status(), 504);

    // The keyless request above was answered 2xx: keyless callers now share the cache.
    assert_eq!(
        keyless(&c, &url, chat("secret prompt")).await.cache,
        "hit",
        "a keyless upstream gets a shared cache once it answered a keyless request"
    );
    proxy.stop().await;
}

/// A header named in `Connection` is not forwarded, so it must not enter the key: a client
/// cannot store an answer made without `anthropic-beta` under the key of requests with it, nor
/// borrow another organization's partition by naming `openai-organization` hop-by-hop.
#[tokio::test]
async fn a_header_named_in_connection_cannot_plant_an_entry() {
    let upstream = FakeUpstream::start().await;
    let engine = upstream.engine().build().expect("engine");
    let send = |headers: Vec<(&'static str, &'static str)>| {
        let engine = engine.clone();
        async move {
            let mut request = axum::http::Request::post("/v1/messages")
                .header("content-type", "application/json")
                .header("x-api-key", "sk-ant-1")
                .header("anthropic-version", "2023-06-01");
            for (name, value) in headers {
                request = request.header(name, value);
            }
            let body = json!({"model": "claude-3-5-haiku-latest", "max_tokens": 10,
                              "messages": [{"role": "user", "content": "hi"}]});
            let request = request.body(Body::from(body.to_string())).expect("request");
            let response = llm_dedup::server::app(engine)
                .oneshot(request)
                .await
                .expect("answer");
            let cache = response.headers()["llm-dedup-cache"]
                .to_str()
                .expect("ascii")
                .to_owned();
            let key = response.headers()["llm-dedup-key"]
                .to_str()
                .expect("ascii")
                .to_owned();
            let _ = response.into_body().collect().await;
            (cache, key)
        }
    };
    let planted = send(vec![
        ("anthropic-beta", "prompt-caching-2024-07-31"),
        ("connection", "anthropic-beta"),
    ])
    .await;
    let seen = upstream.state.last_headers.lock().expect("lock").clone();
    assert!(
        !seen.expect("headers").contains_key("anthropic-beta"),
        "a Connection-listed header is not forwarded"
    );
    let honest = send(vec![("anthropic-beta", "prompt-caching-2024-07-31")]).await;
    assert_eq!(
        honest.0, "miss",
        "the honest request does not get the planted answer"
    );
    assert_ne!(honest.1, planted.1);
    let plain = send(vec![]).await;
    assert_eq!(
        plain,
        ("hit".to_owned(), planted.1.clone()),
        "what was sent without the beta is stored as what it is"
    );
    // The same for a credential header named in Connection: not forwarded, not partitioning.
    let borrowed = send(vec![
        ("openai-organization", "org-victim"),
        ("connection", "openai-organization"),
    ])
    .await;
    assert_eq!(borrowed.1, planted.1);
    let organization = send(vec![("openai-organization", "org-victim")]).await;
    assert_eq!(organization.0, "miss");
    assert_ne!(organization.1, planted.1);
}

/// Azure API Management keys, Google keys, cookies, proxy credentials and headers the operator
/// names all tell callers apart: two values never share an entry.
#[tokio::test]
async fn every_kind_of_credential_partitions_the_cache() {
    let upstream = FakeUpstream::start().await;
    let builder = upstream.engine().credential_headers(
        llm_dedup::CredentialHeaders::with_extra(["X-Tenant-Id"]).expect("valid name"),
    );
    let proxy = Proxy::start(builder).await;
    let url = proxy.url("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
    let c = client();
    // Each alone, as a gateway authenticating that way sends it (no API key).
    let send = |header: &'static str, value: &'static str, prompt: String| {
        let request = c
            .post(&url)
            .header("content-type", "application/json")
            .header(header, value)
            .body(prompt);
        async move { seen(request.send().await.expect("sent")).await }
    };
    for header in [
        "ocp-apim-subscription-key",
        "x-goog-api-key",
        "cookie",
        "proxy-authorization",
        "x-tenant-id",
    ] {
        let prompt = chat(header);
        let one = send(header, "value-one", prompt.clone()).await;
        let two = send(header, "value-two", prompt.clone()).await;
        assert_eq!(
            (one.cache.as_str(), two.cache.as_str()),
            ("miss", "miss"),
            "{header}: two values, two entries"
        );
        assert_ne!(one.key, two.key, "{header}");
        let again = send(header, "value-one", prompt).await;
        assert_eq!(
            again.cache, "hit",
            "{header}: the same value finds its own entry"
        );
    }
    // A request with an API key is that key's whatever its cookies: the official SDKs send
    // back the CDN cookies an API sets, and those change every half hour.
    let keyed = [("authorization", ALICE), ("cookie", "__cf_bm=first")];
    assert_eq!(post(&c, &url, chat("cdn"), &keyed).await.cache, "miss");
    let rotated = [("authorization", ALICE), ("cookie", "__cf_bm=second")];
    assert_eq!(post(&c, &url, chat("cdn"), &rotated).await.cache, "hit");
    let seen = upstream.state.last_headers.lock().expect("lock").clone();
    assert!(
        !seen.expect("headers").contains_key("proxy-authorization"),
        "a proxy credential is this proxy's, never forwarded"
    );
    proxy.stop().await;
}

/// The Responses API echoes `metadata`, `user`, `safety_identifier` and `prompt_cache_key`: a
/// second caller sending other values gets an answer carrying its own, never the first's.
#[tokio::test]
async fn a_responses_answer_never_carries_another_callers_echoed_fields() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::start(upstream.engine().shared_cache(true)).await;
    let url = proxy.url("/v1/responses");
    let c = client();
    let ask = |metadata: Value, user: &str| {
        json!({"model": "gpt-4o-mini", "input": "hello", "store": false,
               "metadata": metadata, "user": user, "safety_identifier": user,
               "prompt_cache_key": user})
        .to_string()
    };
    let first = post(&c, &url, ask(json!({"end_user": "u1"}), "u1"), &as_(ALICE)).await;
    assert_eq!(first.body["metadata"], json!({"end_user": "u1"}));
    let second = post(&c, &url, ask(json!({"end_user": "u2"}), "u2"), &as_(ALICE)).await;
    assert_eq!(second.status, 200);
    for field in ["metadata", "user", "safety_identifier", "prompt_cache_key"] {
        assert_ne!(
            second.body[field], first.body[field],
            "{field} of the first caller reached the second"
        );
    }
    assert_eq!(second.body["metadata"], json!({"end_user": "u2"}));
    let repeat = post(&c, &url, ask(json!({"end_user": "u1"}), "u1"), &as_(ALICE)).await;
    assert_eq!(repeat.cache, "hit", "the same fields still share an entry");
    assert_eq!(repeat.body["metadata"], json!({"end_user": "u1"}));
    proxy.stop().await;
}

/// A shared live stream reaches a caller of another key with only the answer's headers.
#[tokio::test]
async fn a_shared_live_stream_gives_another_key_only_the_answers_headers() {
    let upstream = FakeUpstream::with(Behaviour {
        chunk_delay: Duration::from_millis(100),
        ..Behaviour::default()
    })
    .await;
    let proxy = Proxy::start(upstream.engine().shared_cache(true)).await;
    let url = proxy.url("/v1/chat/completions");
    let c = client();
    for key in [ALICE, BOB] {
        assert_eq!(post(&c, &url, chat(key), &as_(key)).await.status, 200);
    }
    let streamed = json!({"model": "gpt-4o-mini", "stream": true,
                          "messages": [{"role": "user", "content": "tell me"}]})
    .to_string();
    let calls = upstream.calls();
    let (c1, u1, b1) = (c.clone(), url.clone(), streamed.clone());
    let alice = tokio::spawn(async move { post(&c1, &u1, b1, &as_(ALICE)).await });
    upstream.wait_for_calls(calls + 1).await;
    let bob = post(&c, &url, streamed, &as_(BOB)).await;
    let alice = alice.await.expect("alice");
    assert_eq!(bob.cache, "coalesced");
    assert_eq!(bob.raw, alice.raw, "the same events");
    assert_eq!(
        alice.headers["set-cookie"],
        "__cf_bm=cookie-aaaa; path=/; HttpOnly"
    );
    for name in CALLERS_OWN {
        assert!(!bob.headers.contains_key(*name), "{name} reached bob");
    }
    proxy.stop().await;
}
