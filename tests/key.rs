//! The key: no false hits, and fewer false misses.
//!
//! Each test is a finding of the key audit, through the proxy against the fake upstream,
//! asserting what a user checks: whether the second request was answered from the cache
//! (`llm-dedup-cache`) and with whose answer (its `id`).

mod common;

use common::{FakeUpstream, Proxy, Seen, client, seen};
use serde_json::{Value, json};

const ALICE: &str = "Bearer sk-alice-aaaa";
const BOB: &str = "Bearer sk-bob-bbbb";

/// A POST of `body` to `path` with exactly `headers`.
async fn ask(proxy: &Proxy, path: &str, body: &Value, headers: &[(&str, &str)]) -> Seen {
    let mut request = client()
        .post(proxy.url(path))
        .header("content-type", "application/json")
        .body(body.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    seen(request.send().await.expect("sent")).await
}

/// A proxy with a shared cache, with alice's and bob's keys verified by a call each.
async fn shared(upstream: &FakeUpstream) -> Proxy {
    let proxy = Proxy::start(upstream.engine().shared_cache(true)).await;
    for key in [ALICE, BOB] {
        let verified = ask(
            &proxy,
            "/v1/chat/completions",
            &json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": key}]}),
            &[("authorization", key)],
        )
        .await;
        assert_eq!(verified.status, 200);
    }
    proxy
}

/// With `--shared-cache`, a request that names an object one organization holds (a file, a
/// stored prompt, a container, a fine-tuned model) is answered only to its own partition: the
/// provider would refuse another organization.
#[tokio::test]
async fn private_objects_stay_with_their_owner_under_a_shared_cache() {
    let upstream = FakeUpstream::start().await;
    let proxy = shared(&upstream).await;
    let cases = [
        (
            "/v1/responses",
            json!({"model": "gpt-4o-mini", "store": false, "input": [{"role": "user", "content": [
                {"type": "input_text", "text": "summarize"},
                {"type": "input_file", "file_id": "file-orgAsecret"}]}]}),
        ),
        (
            "/v1/responses",
            json!({"model": "gpt-4o-mini", "store": false,
                   "prompt": {"id": "pmpt_orgA", "version": "3"}}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "ft:gpt-4o-mini:org-a::abc123",
                   "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [
                {"type": "file", "file": {"file_id": "file-orgA"}}]}]}),
        ),
        (
            "/v1/messages",
            json!({"model": "claude-sonnet-4-5", "max_tokens": 10, "container": "container_011a",
                   "messages": [{"role": "user", "content": "run it"}]}),
        ),
        (
            "/v1/messages",
            json!({"model": "claude-sonnet-4-5", "max_tokens": 10,
                   "messages": [{"role": "user", "content": [
                       {"type": "document", "source": {"type": "file", "file_id": "file_011a"}}]}]}),
        ),
    ];
    for (path, body) in &cases {
        let alice = ask(&proxy, path, body, &[("authorization", ALICE)]).await;
        assert_eq!(
            (alice.status, alice.cache.as_str()),
            (200, "miss"),
            "{body}"
        );
        let again = ask(&proxy, path, body, &[("authorization", ALICE)]).await;
        assert_eq!(again.cache, "hit", "its owner's repeat is a hit: {body}");
        let bob = ask(&proxy, path, body, &[("authorization", BOB)]).await;
        assert_eq!(
            bob.cache, "miss",
            "bob got alice's answer {}: {body}",
            bob.body["id"]
        );
        assert_ne!(bob.body["id"], alice.body["id"]);
    }
    // Without a private object, the same request is shared as before.
    let plain = json!({"model": "gpt-4o-mini", "store": false, "input": "summarize"});
    let alice = ask(&proxy, "/v1/responses", &plain, &[("authorization", ALICE)]).await;
    let bob = ask(&proxy, "/v1/responses", &plain, &[("authorization", BOB)]).await;
    assert_eq!((alice.cache.as_str(), bob.cache.as_str()), ("miss", "hit"));
    proxy.stop().await;
}

/// Chat `store: true` asks the provider to keep the completion (stored-completion listings,
/// evals, distillation): it is passed through every time, never answered from an earlier
/// `store: false` completion. `store: false` is the default written out.
#[tokio::test]
async fn a_stored_chat_completion_always_reaches_the_provider() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let base =
        json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "rate this"}]});
    let mut unstored = base.clone();
    unstored["store"] = json!(false);
    let first = ask(
        &proxy,
        "/v1/chat/completions",
        &unstored,
        &[("authorization", ALICE)],
    )
    .await;
    assert_eq!(first.cache, "miss");
    let omitted = ask(
        &proxy,
        "/v1/chat/completions",
        &base,
        &[("authorization", ALICE)],
    )
    .await;
    assert_eq!(
        omitted.cache, "hit",
        "store: false is the default written out"
    );
    let mut stored = base.clone();
    stored["store"] = json!(true);
    stored["metadata"] = json!({"eval": "run-7"});
    for _ in 0..2 {
        let calls = upstream.calls();
        let seen = ask(
            &proxy,
            "/v1/chat/completions",
            &stored,
            &[("authorization", ALICE)],
        )
        .await;
        assert_eq!(seen.cache, "bypass", "{}", seen.body);
        assert_ne!(seen.body["id"], first.body["id"]);
        assert_eq!(
            upstream.calls(),
            calls + 1,
            "each stored completion reaches the provider"
        );
    }
    proxy.stop().await;
}

/// Every field a Responses answer echoes is in the key: a hit never replays another caller's
/// value. The fields the facts sheet lists, and `prompt_cache_retention`.
#[tokio::test]
async fn every_field_a_responses_answer_echoes_splits_the_key() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let base = json!({"model": "gpt-4o-mini", "input": "hello", "store": false});
    let variants: [(&str, Value, Value); 9] = [
        ("metadata", json!({"run": "1"}), json!({"run": "2"})),
        ("user", json!("u1"), json!("u2")),
        ("safety_identifier", json!("s1"), json!("s2")),
        ("prompt_cache_key", json!("k1"), json!("k2")),
        ("prompt_cache_retention", json!("in_memory"), json!("24h")),
        ("store", json!(false), json!(true)),
        ("temperature", json!(0.2), json!(0.9)),
        ("instructions", json!("be brief"), json!("be long")),
        (
            "tools",
            json!([]),
            json!([{"type": "function", "name": "f", "parameters": {}}]),
        ),
    ];
    for (field, one, other) in variants {
        let mut a = base.clone();
        a[field] = one;
        let mut b = base.clone();
        b[field] = other;
        let first = ask(&proxy, "/v1/responses", &a, &[("authorization", ALICE)]).await;
        let second = ask(&proxy, "/v1/responses", &b, &[("authorization", ALICE)]).await;
        assert_eq!(
            second.cache, "miss",
            "{field}: {} then {}",
            a[field], b[field]
        );
        assert_ne!(second.body["id"], first.body["id"], "{field}");
        if second.body.get(field).is_some() && field != "tools" {
            assert_eq!(
                second.body[field], b[field],
                "{field} is the second caller's own"
            );
        }
    }
    proxy.stop().await;
}

/// Property order steers output order wherever a provider reads a schema, Anthropic's
/// structured output included.
#[tokio::test]
async fn schemas_keep_their_order_in_anthropic_structured_output() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let headers = [
        ("x-api-key", "sk-ant-1"),
        ("anthropic-version", "2023-06-01"),
    ];
    for field in ["output_format", "output_config"] {
        let with = |first: &str, second: &str| {
            let schema = json!({"type": "object",
                "properties": {first: {"type": "string"}, second: {"type": "string"}}});
            let format = json!({"type": "json_schema", "schema": schema});
            let mut body = json!({"model": "claude-sonnet-4-5", "max_tokens": 100,
                                  "messages": [{"role": "user", "content": "who?"}]});
            body[field] = if field == "output_config" {
                json!({"format": format})
            } else {
                format
            };
            body
        };
        let first = ask(&proxy, "/v1/messages", &with("name", "age"), &headers).await;
        assert_eq!(first.cache, "miss");
        let reordered = ask(&proxy, "/v1/messages", &with("age", "name"), &headers).await;
        assert_eq!(reordered.cache, "miss", "{field}: another property order");
        assert_ne!(reordered.body["id"], first.body["id"]);
    }
    proxy.stop().await;
}

/// The documented behaviour-changing headers of the supported APIs are in the key, and
/// `--key-header` adds more.
#[tokio::test]
async fn behaviour_headers_split_the_key() {
    let upstream = FakeUpstream::start().await;
    let key_headers = llm_dedup::KeyHeaders::with_extra(["x-gateway-tier"]).expect("valid");
    let proxy = Proxy::start(upstream.engine().key_headers(key_headers)).await;
    let body = json!({"model": "mistral-large", "messages": [{"role": "user", "content": "hi"}]});
    for (name, one, other) in [
        ("extra-parameters", "drop", "error"),
        ("azureml-model-deployment", "blue", "green"),
        ("x-gateway-tier", "fast", "slow"),
    ] {
        let first = ask(
            &proxy,
            "/chat/completions",
            &body,
            &[("api-key", "azure-key"), (name, one)],
        )
        .await;
        let second = ask(
            &proxy,
            "/chat/completions",
            &body,
            &[("api-key", "azure-key"), (name, other)],
        )
        .await;
        assert_eq!(second.cache, "miss", "{name}: {one} then {other}");
        assert_ne!(second.body["id"], first.body["id"]);
        let again = ask(
            &proxy,
            "/chat/completions",
            &body,
            &[("api-key", "azure-key"), (name, one)],
        )
        .await;
        assert_eq!(again.cache, "hit", "{name}");
    }
    proxy.stop().await;
}

/// Two upstream URLs that differ only in their credentials (a gateway that routes or bills by
/// them) never share entries, even on one database; the display form stays without them.
#[tokio::test]
async fn the_upstreams_credentials_are_in_the_key() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("c.db");
    let with_password = |password: &str| {
        let url = format!("http://gw:{password}@{}", upstream.addr);
        llm_dedup::Dedup::builder()
            .upstream(url)
            .database(&db)
            .build()
            .expect("engine")
    };
    let send = |engine: llm_dedup::Dedup| async move {
        let request = http::Request::post("/v1/chat/completions")
            .header("authorization", ALICE)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(common::chat(
                "q",
            ))))
            .expect("request");
        let answer = engine.send(request).await.expect("answered");
        let cache = answer.cache;
        let body = answer.into_bytes().await.expect("body");
        engine.close().await.expect("closed");
        (cache, serde_json::from_slice::<Value>(&body).expect("json"))
    };
    let first = with_password("p1");
    assert!(!first.upstream().contains("p1"), "{}", first.upstream());
    let (cache, one) = send(first).await;
    assert_eq!(cache, llm_dedup::CacheStatus::Miss);
    let (cache, two) = send(with_password("p2")).await;
    assert_eq!(
        cache,
        llm_dedup::CacheStatus::Miss,
        "another password shared p1's entry"
    );
    assert_ne!(one["id"], two["id"]);
    let (cache, again) = send(with_password("p1")).await;
    assert_eq!(cache, llm_dedup::CacheStatus::Hit);
    assert_eq!(again["id"], one["id"]);
}

/// An answer that follows state the provider can change (the latest version of a stored
/// prompt, a vector store, the web, an Azure data source) is not cached unless the caller
/// asks for a lifetime.
#[tokio::test]
async fn answers_that_follow_mutable_state_are_cached_only_when_asked() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let cases = [
        (
            "/v1/responses",
            json!({"model": "gpt-4o-mini", "store": false, "prompt": {"id": "pmpt_1"}}),
        ),
        (
            "/v1/responses",
            json!({"model": "gpt-4o-mini", "store": false, "input": "news?",
                   "tools": [{"type": "web_search"}]}),
        ),
        (
            "/v1/responses",
            json!({"model": "gpt-4o-mini", "store": false, "input": "find it",
                   "tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}),
        ),
        (
            "/openai/deployments/gpt4o/chat/completions",
            json!({"messages": [{"role": "user", "content": "from my index"}],
                   "data_sources": [{"type": "azure_search", "parameters": {"index_name": "i"}}]}),
        ),
    ];
    for (path, body) in &cases {
        for _ in 0..2 {
            let seen = ask(&proxy, path, body, &[("authorization", ALICE)]).await;
            assert_eq!(
                (seen.status, seen.cache.as_str()),
                (200, "bypass"),
                "{body}"
            );
        }
        for control in [("llm-dedup-ttl", "60"), ("cache-control", "max-age=60")] {
            let headers = [("authorization", ALICE), control];
            let first = ask(&proxy, path, body, &headers).await;
            let second = ask(&proxy, path, body, &headers).await;
            assert_eq!(second.cache, "hit", "{control:?} asks for it: {body}");
            assert_eq!(second.body["id"], first.body["id"]);
        }
    }
    proxy.stop().await;
}

/// Integers of any size stay integers (two seeds past the 64-bit range never merge), and an
/// integer field written as a float (which OpenAI refuses) is not answered from the integer's
/// entry.
#[tokio::test]
async fn numbers_merge_only_when_the_provider_reads_them_alike() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let send = |raw: &'static str| {
        let proxy = &proxy;
        async move {
            let response = client()
                .post(proxy.url("/v1/chat/completions"))
                .header("authorization", ALICE)
                .header("content-type", "application/json")
                .body(raw)
                .send()
                .await
                .expect("sent");
            seen(response).await
        }
    };
    let a = send(r#"{"model": "m", "seed": 18446744073709551616, "messages": []}"#).await;
    let b = send(r#"{"model": "m", "seed": 18446744073709551617, "messages": []}"#).await;
    assert_eq!(b.cache, "miss", "two seeds past 2^64 merged");
    assert_ne!(a.body["id"], b.body["id"]);
    let again = send(r#"{"model": "m", "seed": 18446744073709551617, "messages": []}"#).await;
    assert_eq!(again.cache, "hit");
    let int = send(r#"{"model": "m", "max_tokens": 100, "messages": []}"#).await;
    let float = send(r#"{"model": "m", "max_tokens": 100.0, "messages": []}"#).await;
    assert_eq!(float.cache, "miss", "100.0 answered from 100's entry");
    assert_ne!(float.body["id"], int.body["id"]);
    // Where the provider reads a float, spellings of one number still share.
    let t1 = send(r#"{"model": "m", "temperature": 1, "messages": []}"#).await;
    let t2 = send(r#"{"model": "m", "temperature": 1.0, "messages": []}"#).await;
    assert_eq!((t1.cache.as_str(), t2.cache.as_str()), ("miss", "hit"));
    proxy.stop().await;
}

/// Fewer false misses where the provider documents the equivalence: `stream: false` and
/// `n: 1` read as absent, `anthropic-beta` as a set, query parameters in any order.
#[tokio::test]
async fn documented_equivalences_share_an_entry() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let auth = [("authorization", ALICE)];
    let plain = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    let first = ask(&proxy, "/v1/chat/completions", &plain, &auth).await;
    assert_eq!(first.cache, "miss");
    let mut spelled = plain.clone();
    spelled["stream"] = json!(false);
    spelled["n"] = json!(1);
    let second = ask(&proxy, "/v1/chat/completions", &spelled, &auth).await;
    assert_eq!(second.cache, "hit", "stream: false and n: 1 written out");
    assert_eq!(second.body["id"], first.body["id"]);

    let message = json!({"model": "claude-sonnet-4-5", "max_tokens": 10,
                         "messages": [{"role": "user", "content": "hi"}]});
    let ant = |beta: &'static str| {
        [
            ("x-api-key", "sk-ant-1"),
            ("anthropic-version", "2023-06-01"),
            ("anthropic-beta", beta),
        ]
    };
    let one = ask(&proxy, "/v1/messages", &message, &ant("a-2025,b-2025")).await;
    assert_eq!(one.cache, "miss");
    let other = ask(&proxy, "/v1/messages", &message, &ant("b-2025, a-2025")).await;
    assert_eq!(other.cache, "hit", "the same betas in another order");
    let lines = [
        ("x-api-key", "sk-ant-1"),
        ("anthropic-version", "2023-06-01"),
        ("anthropic-beta", "b-2025"),
        ("anthropic-beta", "a-2025"),
    ];
    let split = ask(&proxy, "/v1/messages", &message, &lines).await;
    assert_eq!(split.cache, "hit", "the same betas on two header lines");
    let fewer = ask(&proxy, "/v1/messages", &message, &ant("a-2025")).await;
    assert_eq!(fewer.cache, "miss", "another set of betas");

    let azure = json!({"messages": [{"role": "user", "content": "hi"}]});
    let path = "/openai/deployments/gpt4o/chat/completions";
    let q1 = ask(
        &proxy,
        &format!("{path}?api-version=2024-10-21&x=1"),
        &azure,
        &auth,
    )
    .await;
    assert_eq!(q1.cache, "miss");
    let q2 = ask(
        &proxy,
        &format!("{path}?x=1&api-version=2024-10-21"),
        &azure,
        &auth,
    )
    .await;
    assert_eq!(q2.cache, "hit", "the same query in another order");
    let q3 = ask(
        &proxy,
        &format!("{path}?api-version=2025-01-01&x=1"),
        &azure,
        &auth,
    )
    .await;
    assert_eq!(q3.cache, "miss", "another api-version");
    proxy.stop().await;
}
