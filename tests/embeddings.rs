//! Embeddings through the proxy: one cache entry per input, and small requests merged into
//! shared upstream calls, against a fake upstream that answers like OpenAI.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{
    Behaviour, EMBED_MAX_INPUT_TOKENS, FakeUpstream, Proxy, Seen, client, fake_embedding, post,
};
use llm_dedup::EmbedSettings;
use serde_json::value::RawValue;
use serde_json::{Value, json};

const MODEL: &str = "text-embedding-3-small";

async fn embed(c: &reqwest::Client, proxy: &Proxy, body: Value) -> Seen {
    post(c, &proxy.url("/v1/embeddings"), body.to_string(), &[]).await
}

/// A proxy in front of `upstream`, merging embeddings as `settings` say.
async fn proxy_with(upstream: &FakeUpstream, settings: EmbedSettings) -> Proxy {
    Proxy::start(upstream.engine().embeddings(settings)).await
}

/// A proxy whose calls wait 200 ms for other requests' inputs: long enough for requests
/// sent at once to share calls.
async fn merging_proxy(upstream: &FakeUpstream) -> Proxy {
    let window = EmbedSettings::default().batch_window(Duration::from_millis(200));
    proxy_with(upstream, window).await
}

/// Embedding inputs the upstream has received, over all calls.
fn inputs_received(upstream: &FakeUpstream) -> usize {
    upstream.state.embed_inputs.load(Ordering::SeqCst)
}

/// Sends every body at the same moment; the answers, in the same order.
async fn concurrently(proxy: &Proxy, bodies: Vec<Value>) -> Vec<Seen> {
    let c = client();
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|body| {
            let (c, url) = (c.clone(), proxy.url("/v1/embeddings"));
            tokio::spawn(async move { post(&c, &url, body.to_string(), &[]).await })
        })
        .collect();
    let mut answers = Vec::with_capacity(tasks.len());
    for task in tasks {
        answers.push(task.await.expect("task"));
    }
    answers
}

/// The embeddings of an answer, in `data` order, as the exact JSON text received.
fn embeddings_text(seen: &Seen) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct List<'a> {
        #[serde(borrow)]
        data: Vec<Item<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Item<'a> {
        #[serde(borrow)]
        embedding: &'a RawValue,
    }
    let list: List<'_> = serde_json::from_slice(&seen.raw).expect("an embeddings list");
    list.data
        .iter()
        .map(|i| i.embedding.get().to_owned())
        .collect()
}

/// What the answer should hold for `inputs`: each one's embedding as the provider spells it.
fn expected(inputs: &[Value], base64: bool) -> Vec<String> {
    inputs.iter().map(|i| fake_embedding(i, base64)).collect()
}

/// The `input` lists the upstream received, one per embeddings call.
fn sent(upstream: &FakeUpstream) -> Vec<Vec<Value>> {
    let bodies = upstream.state.bodies.lock().expect("lock");
    bodies
        .iter()
        .filter_map(|b| serde_json::from_slice::<Value>(b).ok())
        .map(|b| match &b["input"] {
            Value::Array(items) if items.iter().all(|i| !i.is_u64()) => items.clone(),
            other => vec![other.clone()],
        })
        .collect()
}

fn texts(words: &[&str]) -> Vec<Value> {
    words.iter().map(|w| Value::from(*w)).collect()
}

#[tokio::test]
async fn only_inputs_not_cached_go_upstream_and_answers_keep_order_and_values() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let proxy = Proxy::with_db(&upstream, &dir.path().join("c.db")).await;
    let c = client();

    let first = texts(&["alpha beta", "gamma"]);
    let a = embed(&c, &proxy, json!({"model": MODEL, "input": first})).await;
    assert_eq!((a.status, a.cache.as_str()), (200, "miss"));
    assert_eq!(embeddings_text(&a), expected(&first, false));

    let second = texts(&["delta", "alpha beta", "epsilon zeta eta", "gamma"]);
    let b = embed(&c, &proxy, json!({"model": MODEL, "input": second})).await;
    assert_eq!((b.status, b.cache.as_str()), (200, "partial"));
    assert_eq!(
        sent(&upstream),
        vec![first.clone(), texts(&["delta", "epsilon zeta eta"])],
        "only the inputs not cached were sent"
    );
    assert_eq!(
        embeddings_text(&b),
        expected(&second, false),
        "byte for byte"
    );
    for (i, item) in b.body["data"].as_array().expect("data").iter().enumerate() {
        assert_eq!(item["index"], i);
        assert_eq!(item["object"], "embedding");
    }
    assert_eq!(b.body["object"], "list");
    assert_eq!(b.body["model"], MODEL);
    // Every input counted as the provider charges it: 1 + 2 + 3 + 1 words.
    assert_eq!(
        b.body["usage"],
        json!({"prompt_tokens": 7, "total_tokens": 7})
    );

    let again = embed(&c, &proxy, json!({"model": MODEL, "input": second})).await;
    assert_eq!(again.cache, "hit");
    assert_eq!(again.raw, b.raw, "a full hit is the same answer");
    assert_eq!(again.age, Some(0));
    assert_eq!(upstream.calls(), 2);

    // A single string is the same entry as that string in a list.
    let single = embed(&c, &proxy, json!({"model": MODEL, "input": "gamma"})).await;
    assert_eq!(single.cache, "hit");
    assert_eq!(
        embeddings_text(&single),
        expected(&texts(&["gamma"]), false)
    );
    assert_eq!(single.body["usage"]["prompt_tokens"], 1);
    assert!(single.key.is_some(), "one input, one entry: its key");
    assert_eq!(upstream.calls(), 2);

    // The inspector counts inputs and what was saved: 2 + 4 + 4 + 1 inputs, 2 + 4 + 1 saved.
    proxy.engine.flush().await.expect("flush");
    let stats = common::seen(
        c.get(proxy.url("/_llm-dedup/stats"))
            .send()
            .await
            .expect("stats"),
    )
    .await
    .body;
    let totals = &stats["totals"];
    assert_eq!(totals["inputs"], 11, "{stats}");
    assert_eq!(totals["inputs_saved"], 7, "{stats}");
    assert_eq!(totals["partials"], 1);
    assert_eq!(totals["hits"], 2);
    assert_eq!(totals["misses"], 1);
    assert_eq!(stats["entries"], 4, "one entry per distinct input");
    proxy.stop().await;
}

#[tokio::test]
async fn base64_and_float_answers_are_replayed_exactly_and_kept_apart() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let inputs = texts(&["one", "two"]);
    for base64 in [true, false] {
        let mut body = json!({"model": MODEL, "input": inputs});
        if base64 {
            body["encoding_format"] = json!("base64");
        }
        let miss = embed(&c, &proxy, body.clone()).await;
        assert_eq!(miss.cache, "miss", "base64: {base64}; a format of its own");
        let hit = embed(&c, &proxy, body).await;
        assert_eq!(hit.cache, "hit");
        assert_eq!(embeddings_text(&hit), expected(&inputs, base64));
        assert_eq!(hit.raw, miss.raw);
    }
    assert_eq!(upstream.calls(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn token_array_inputs_are_cached_one_by_one() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let one = embed(&c, &proxy, json!({"model": MODEL, "input": [1234, 5678]})).await;
    assert_eq!((one.status, one.cache.as_str()), (200, "miss"));
    assert_eq!(
        embeddings_text(&one),
        expected(&[json!([1234, 5678])], false)
    );
    assert_eq!(one.body["usage"]["prompt_tokens"], 2);

    let many = json!([[1234, 5678], [9, 10, 11]]);
    let seen = embed(&c, &proxy, json!({"model": MODEL, "input": many})).await;
    assert_eq!(seen.cache, "partial");
    assert_eq!(
        embeddings_text(&seen),
        expected(&[json!([1234, 5678]), json!([9, 10, 11])], false)
    );
    assert_eq!(seen.body["usage"]["prompt_tokens"], 5);
    assert_eq!(
        sent(&upstream).last(),
        Some(&vec![json!([9, 10, 11])]),
        "sent as a list of one token array"
    );
    assert_eq!(upstream.calls(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn repeated_inputs_in_a_request_are_sent_once() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let inputs = texts(&["same words", "other", "same words", "same words"]);
    let seen = embed(&c, &proxy, json!({"model": MODEL, "input": inputs})).await;
    assert_eq!((seen.status, seen.cache.as_str()), (200, "miss"));
    assert_eq!(sent(&upstream), vec![texts(&["same words", "other"])]);
    assert_eq!(embeddings_text(&seen), expected(&inputs, false));
    assert_eq!(seen.body["data"][3]["index"], 3);
    assert_eq!(
        seen.body["usage"]["prompt_tokens"], 7,
        "each position counts"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn two_hundred_concurrent_single_input_requests_share_a_few_calls() {
    let upstream = FakeUpstream::with(Behaviour {
        delay: Duration::from_millis(20),
        ..Behaviour::default()
    })
    .await;
    let proxy = Proxy::over(&upstream).await;
    // Ten callers ask for the same sentence as another one.
    let sentences: Vec<String> = (0..200)
        .map(|i| format!("sentence number {}", i % 190))
        .collect();
    let bodies = sentences
        .iter()
        .map(|s| json!({"model": MODEL, "input": s}))
        .collect();
    for (sentence, seen) in sentences.iter().zip(concurrently(&proxy, bodies).await) {
        assert_eq!(seen.status, 200);
        assert_eq!(embeddings_text(&seen), expected(&[json!(sentence)], false));
        assert_eq!(seen.body["data"][0]["index"], 0);
        assert_eq!(seen.body["usage"]["prompt_tokens"], 3);
    }
    let calls = upstream.calls();
    assert!(calls <= 20, "{calls} upstream calls for 200 requests");
    assert_eq!(
        inputs_received(&upstream),
        190,
        "each distinct sentence sent once"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn with_merging_off_each_request_makes_its_own_call() {
    let upstream = FakeUpstream::with(Behaviour {
        delay: Duration::from_millis(50),
        ..Behaviour::default()
    })
    .await;
    let settings = EmbedSettings::default().batch_window(Duration::ZERO);
    let proxy = proxy_with(&upstream, settings).await;
    let bodies = (0..20)
        .map(|i| json!({"model": MODEL, "input": [format!("s{i}"), "shared"]}))
        .collect();
    for seen in concurrently(&proxy, bodies).await {
        assert_eq!(seen.status, 200);
        assert_eq!(
            embeddings_text(&seen)[1],
            fake_embedding(&json!("shared"), false)
        );
    }
    assert_eq!(upstream.calls(), 20);
    assert_eq!(
        inputs_received(&upstream),
        21,
        "the shared input still goes upstream once"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn an_error_on_a_merged_call_reaches_exactly_its_callers_and_nothing_is_stored() {
    let upstream = FakeUpstream::with(Behaviour {
        delay: Duration::from_millis(20),
        ..Behaviour::default()
    })
    .await;
    let proxy = merging_proxy(&upstream).await;
    let c = client();
    let cached = embed(&c, &proxy, json!({"model": MODEL, "input": "cached"})).await;
    assert_eq!(cached.cache, "miss");

    // Six callers of an unknown model share one call, which fails 404; six of a good model
    // share another, which succeeds; one caller's only input is cached.
    let bodies = (0..13)
        .map(|i| match i {
            0..6 => json!({"model": "missing-model", "input": format!("m{i}")}),
            6..12 => json!({"model": MODEL, "input": [format!("g{i}"), "cached"]}),
            _ => json!({"model": MODEL, "input": "cached"}),
        })
        .collect();
    for (i, seen) in concurrently(&proxy, bodies).await.into_iter().enumerate() {
        match i {
            0..6 => {
                assert_eq!(seen.status, 404, "caller {i}");
                assert_eq!(seen.body["error"]["code"], "model_not_found");
                assert_eq!(
                    seen.headers["x-request-id"], "req_invalid",
                    "as the provider sent it"
                );
                assert_eq!(seen.headers["x-should-retry"], "false");
            }
            6..12 => {
                assert_eq!((seen.status, seen.cache.as_str()), (200, "partial"));
                assert_eq!(
                    embeddings_text(&seen)[0],
                    fake_embedding(&json!(format!("g{i}")), false)
                );
            }
            _ => assert_eq!((seen.status, seen.cache.as_str()), (200, "hit")),
        }
    }
    assert_eq!(
        upstream.calls(),
        3,
        "one call for each model, after the first"
    );

    // The provider's quota is gone: a 429 that waiting cannot fix is passed on at once, to
    // every caller of the call, and a caller whose inputs are cached does not notice.
    upstream.behave(|b| b.quota_exhausted = true);
    let inputs = ["q1", "q2", "cached"];
    let bodies = inputs
        .iter()
        .map(|input| json!({"model": MODEL, "input": input}))
        .collect();
    for (input, seen) in inputs.iter().zip(concurrently(&proxy, bodies).await) {
        if *input == "cached" {
            assert_eq!((seen.status, seen.cache.as_str()), (200, "hit"));
        } else {
            assert_eq!(seen.status, 429, "{input}");
            assert_eq!(seen.body["error"]["code"], "insufficient_quota");
            assert_eq!(seen.headers["x-should-retry"], "false");
        }
    }
    upstream.behave(|b| b.quota_exhausted = false);
    let calls = upstream.calls();
    let retry = embed(&c, &proxy, json!({"model": MODEL, "input": ["q1", "q2"]})).await;
    assert_eq!(
        (retry.status, retry.cache.as_str()),
        (200, "miss"),
        "nothing was stored"
    );
    assert_eq!(upstream.calls(), calls + 1);
    proxy.stop().await;
}

#[tokio::test]
async fn calls_respect_the_providers_limits_per_request() {
    let upstream = FakeUpstream::start().await;
    let settings = EmbedSettings::default().max_inputs(1000);
    let proxy = proxy_with(&upstream, settings).await;
    let c = client();
    // More inputs than one call may carry (but no more than the provider takes in one
    // request): split into calls of at most 1000, answered in order.
    let inputs: Vec<Value> = (0..common::EMBED_MAX_INPUTS)
        .map(|i| json!(format!("chunk {i}")))
        .collect();
    let seen = embed(&c, &proxy, json!({"model": MODEL, "input": inputs})).await;
    assert_eq!(seen.status, 200, "{}", seen.body);
    assert_eq!(embeddings_text(&seen), expected(&inputs, false));
    let calls = sent(&upstream);
    let sizes: Vec<usize> = calls.iter().map(Vec::len).collect();
    assert_eq!(sizes, [1000, 1000, 48]);
    assert_eq!(seen.body["usage"]["prompt_tokens"], 4096);

    // A token bound: inputs of 30 bytes, at most 100 tokens a call, so 3 inputs a call.
    let upstream = FakeUpstream::start().await;
    let settings = EmbedSettings::default().max_tokens(100);
    let proxy = proxy_with(&upstream, settings).await;
    let inputs: Vec<Value> = (0..10).map(|i| json!(format!("{i:030}"))).collect();
    let seen = embed(&c, &proxy, json!({"model": MODEL, "input": inputs})).await;
    assert_eq!(embeddings_text(&seen), expected(&inputs, false));
    let sizes: Vec<usize> = sent(&upstream).iter().map(Vec::len).collect();
    assert_eq!(sizes, [3, 3, 3, 1]);
    proxy.stop().await;
}

#[tokio::test]
async fn controls_apply_to_every_input() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let url = proxy.url("/v1/embeddings");
    embed(&c, &proxy, json!({"model": MODEL, "input": ["a", "b"]})).await;
    let body = json!({"model": MODEL, "input": ["a", "b", "c"]}).to_string();

    let only = post(
        &c,
        &url,
        body.clone(),
        &[("cache-control", "only-if-cached")],
    )
    .await;
    assert_eq!(only.status, 504);
    assert!(
        only.body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("1 of the 3")
    );
    let cached = json!({"model": MODEL, "input": ["b", "a"]}).to_string();
    let only = post(&c, &url, cached, &[("cache-control", "only-if-cached")]).await;
    assert_eq!((only.status, only.cache.as_str()), (200, "hit"));
    assert_eq!(upstream.calls(), 1);

    let fresh = post(&c, &url, body.clone(), &[("cache-control", "no-cache")]).await;
    assert_eq!((fresh.status, fresh.cache.as_str()), (200, "miss"));
    assert_eq!(
        sent(&upstream)[1],
        texts(&["a", "b", "c"]),
        "no-cache reads nothing"
    );

    let other = post(&c, &url, body, &[("llm-dedup-namespace", "elsewhere")]).await;
    assert_eq!(other.cache, "miss", "a namespace is a key space of its own");
    assert_eq!(upstream.calls(), 3);
    proxy.stop().await;
}

#[tokio::test]
async fn azure_deployments_and_inputs_the_api_rejects() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let url = proxy.url("/openai/deployments/emb/embeddings?api-version=2024-02-01");
    let azure = [("api-key", "azure-key")];
    let first = post(&c, &url, json!({"input": ["x", "y"]}).to_string(), &azure).await;
    assert_eq!((first.status, first.cache.as_str()), (200, "miss"));
    let second = post(&c, &url, json!({"input": ["y", "z"]}).to_string(), &azure).await;
    assert_eq!((second.status, second.cache.as_str()), (200, "partial"));
    assert_eq!(
        embeddings_text(&second),
        expected(&texts(&["y", "z"]), false)
    );

    // An input the API does not accept is sent as it came, and the provider's error comes back.
    for bad in [json!(""), json!([]), json!(["ok", ""]), json!(["a", [1]])] {
        let seen = embed(&c, &proxy, json!({"model": MODEL, "input": bad})).await;
        assert_eq!(seen.status, 400, "{bad}");
        assert!(
            seen.body["error"]["message"]
                .as_str()
                .expect("message")
                .contains("'$.input' is invalid")
        );
    }
    assert_eq!(upstream.calls(), 6);
    proxy.stop().await;
}

#[tokio::test]
async fn inputs_stored_on_disk_are_found_after_a_restart() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("c.db");
    let proxy = Proxy::with_db(&upstream, &db).await;
    let c = client();
    let inputs: Vec<Value> = (0..50).map(|i| json!(format!("doc {i}"))).collect();
    embed(&c, &proxy, json!({"model": MODEL, "input": inputs})).await;
    proxy.stop().await;

    let proxy = Proxy::with_db(&upstream, &db).await;
    let seen = embed(&c, &proxy, json!({"model": MODEL, "input": inputs})).await;
    assert_eq!(seen.cache, "hit");
    assert_eq!(embeddings_text(&seen), expected(&inputs, false));
    assert_eq!(upstream.calls(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn a_broken_answer_is_a_502_and_nothing_of_it_is_stored() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    upstream.behave(|b| b.embed_drop_last = true);
    let body = json!({"model": MODEL, "input": ["p", "q"]});
    let broken = embed(&c, &proxy, body.clone()).await;
    assert_eq!(broken.status, 502);
    assert_eq!(broken.body["error"]["code"], "upstream_invalid_answer");
    assert!(
        broken.body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("1 embeddings for 2 inputs")
    );
    upstream.behave(|b| b.embed_drop_last = false);
    let fixed = embed(&c, &proxy, body).await;
    assert_eq!((fixed.status, fixed.cache.as_str()), (200, "miss"));
    assert_eq!(
        embeddings_text(&fixed),
        expected(&texts(&["p", "q"]), false)
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_caller_that_hangs_up_cancels_nothing_others_wait_on() {
    let upstream = FakeUpstream::with(Behaviour {
        delay: Duration::from_millis(400),
        ..Behaviour::default()
    })
    .await;
    let proxy = Proxy::over(&upstream).await;
    let impatient = common::client_builder()
        .timeout(Duration::from_millis(100))
        .build()
        .expect("client");
    let url = proxy.url("/v1/embeddings");
    let body = json!({"model": MODEL, "input": ["shared", "mine"]}).to_string();
    let gone = tokio::spawn(async move {
        let request = impatient.post(url).bearer_auth("sk-test-key-1");
        request.body(body).send().await
    });
    upstream.wait_for_calls(1).await;
    // Joins the input in flight; its first caller hangs up meanwhile.
    let c = client();
    let other = embed(&c, &proxy, json!({"model": MODEL, "input": "shared"})).await;
    assert!(
        gone.await.expect("task").is_err(),
        "the first caller timed out"
    );
    assert_eq!((other.status, other.cache.as_str()), (200, "coalesced"));
    assert_eq!(
        embeddings_text(&other),
        expected(&texts(&["shared"]), false)
    );
    let later = embed(&c, &proxy, json!({"model": MODEL, "input": "mine"})).await;
    assert_eq!(
        later.cache, "hit",
        "the call finished and stored both inputs"
    );
    assert_eq!(upstream.calls(), 1);
    proxy.stop().await;
}

/// Merging must not change a request's verdict: an input the provider refuses fails the
/// request it came from, not the others that happened to share its call.
#[tokio::test]
async fn an_input_the_provider_refuses_fails_only_its_own_request() {
    let upstream = FakeUpstream::start().await;
    let proxy = merging_proxy(&upstream).await;
    let too_long = "word ".repeat(EMBED_MAX_INPUT_TOKENS + 1);
    let bodies = vec![
        json!({"model": MODEL, "input": ["alpha one", "alpha two"]}),
        json!({"model": MODEL, "input": ["beta", too_long]}),
        json!({"model": MODEL, "input": "gamma"}),
    ];
    let seen = concurrently(&proxy, bodies).await;
    let (alpha, beta, gamma) = (&seen[0], &seen[1], &seen[2]);
    assert_eq!((alpha.status, alpha.cache.as_str()), (200, "miss"));
    assert_eq!(
        embeddings_text(alpha),
        [
            fake_embedding(&json!("alpha one"), false),
            fake_embedding(&json!("alpha two"), false)
        ]
    );
    assert_eq!(beta.status, 400);
    assert_eq!(beta.body["error"]["type"], "invalid_request_error");
    assert!(
        beta.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("maximum context length")),
        "the provider's own message: {}",
        beta.body
    );
    assert_eq!((gamma.status, gamma.cache.as_str()), (200, "miss"));
    assert_eq!(
        embeddings_text(gamma),
        [fake_embedding(&json!("gamma"), false)]
    );
    // The merged call, then each request's inputs on their own.
    assert_eq!(upstream.calls(), 4);

    // What succeeded was stored; the refused request's inputs were not.
    let c = client();
    let again = embed(
        &c,
        &proxy,
        json!({"model": MODEL, "input": ["alpha one", "alpha two"]}),
    )
    .await;
    assert_eq!(again.cache, "hit");
    let again = embed(&c, &proxy, json!({"model": MODEL, "input": "beta"})).await;
    assert_eq!(again.cache, "miss");
    assert_eq!(upstream.calls(), 5);
    proxy.stop().await;
}

/// A call carries one `user`, which the provider's abuse monitoring reads: requests of
/// different end users never share a call, though they share the cache.
#[tokio::test]
async fn requests_of_different_end_users_are_not_merged() {
    let upstream = FakeUpstream::start().await;
    let proxy = merging_proxy(&upstream).await;
    let body = |input: &str, user: &str| json!({"model": MODEL, "input": input, "user": user});
    let bodies = vec![
        body("one", "alice"),
        body("two", "alice"),
        body("three", "bob"),
    ];
    for seen in concurrently(&proxy, bodies).await {
        assert_eq!((seen.status, seen.cache.as_str()), (200, "miss"));
    }
    assert_eq!(
        upstream.calls(),
        2,
        "alice's two inputs in one call, bob's in another"
    );

    let hit = embed(&client(), &proxy, body("three", "carol")).await;
    assert_eq!(hit.cache, "hit", "the user does not change an embedding");
    assert_eq!(upstream.calls(), 2);
    proxy.stop().await;
}
