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
