//! Fuzz target (f), end to end: arbitrary mutated requests (method, path, headers, body)
//! through the engine against the fake upstream. A panic anywhere in the process (a request's
//! own task, a flight's task, the writer) fails the target, every request must end, and the
//! engine must still answer an ordinary request after each one.
//!
//! CI runs a few thousand cases; `FUZZ_CASES=N cargo test --test fuzz` runs a long one.

mod common;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{Behaviour, FakeUpstream};
use http_body_util::Full;
use llm_dedup::Dedup;
use proptest::prelude::*;
use serde_json::{Value, json};

/// Panics seen anywhere in the process since the target started.
static PANICS: AtomicUsize = AtomicUsize::new(0);

struct Target {
    runtime: tokio::runtime::Runtime,
    engine: Dedup,
    _upstream: FakeUpstream,
    _dir: tempfile::TempDir,
}

fn target() -> &'static Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    TARGET.get_or_init(|| {
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default_hook(info);
        }));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let (upstream, engine) = runtime.block_on(async {
            let upstream = FakeUpstream::with(Behaviour {
                forget_bodies: true,
                ..Behaviour::default()
            })
            .await;
            let engine = upstream
                .engine()
                .database(dir.path().join("fuzz.db"))
                .max_body(64 * 1024)
                .max_stream_bytes(4 * 1024)
                .build()
                .expect("engine");
            (upstream, engine)
        });
        Target {
            runtime,
            engine,
            _upstream: upstream,
            _dir: dir,
        }
    })
}

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000)
}

/// Arbitrary JSON, nesting bounded.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(("\\PC{0,6}", inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A body: a plausible API request with mutated fields, arbitrary JSON, or arbitrary bytes.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let field = prop::sample::select(vec![
        "model",
        "messages",
        "input",
        "stream",
        "n",
        "max_tokens",
        "temperature",
        "store",
        "background",
        "previous_response_id",
        "tools",
        "response_format",
        "user",
        "seed",
        "stream_options",
        "encoding_format",
        "dimensions",
    ]);
    let plausible = (
        prop::sample::select(vec![
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}),
            json!({"model": "gpt-4o-mini", "stream": true,
                   "messages": [{"role": "user", "content": "hi"}]}),
            json!({"model": "text-embedding-3-small", "input": ["a", "b", "a"]}),
            json!({"model": "text-embedding-3-small", "input": [[1, 2], [3]]}),
            json!({"model": "gpt-4o-mini", "input": "hi", "store": false}),
            json!({"model": "claude", "max_tokens": 5, "stream": true,
                   "messages": [{"role": "user", "content": "hi"}]}),
        ]),
        prop::collection::vec((field, json_value()), 0..3),
    )
        .prop_map(|(mut base, changes)| {
            for (field, value) in changes {
                base[field] = value;
            }
            serde_json::to_vec(&base).expect("serializable")
        });
    prop_oneof![
        4 => plausible,
        1 => json_value().prop_map(|v| serde_json::to_vec(&v).expect("serializable")),
        1 => prop::collection::vec(any::<u8>(), 0..256),
    ]
}

/// A request: method, path and query, control and credential headers, body.
fn request() -> impl Strategy<Value = http::Request<Full<Bytes>>> {
    let method = prop::sample::select(vec!["POST", "POST", "POST", "GET", "PUT", "DELETE", "FOO"]);
    let path = (
        prop::sample::select(vec![
            "/v1/chat/completions",
            "/v1/embeddings",
            "/v1/responses",
            "/v1/messages",
            "/v1/completions",
            "/v1/moderations",
            "/openai/deployments/dep/chat/completions",
            "/chat/completions/",
            "/v1/files",
            "/",
        ]),
        "[a-z0-9=&%?/.-]{0,12}",
    )
        .prop_map(|(path, tail)| format!("{path}{tail}"));
    let header = prop_oneof![
        prop::sample::select(vec![
            "no-store",
            "no-cache",
            "only-if-cached",
            "max-age=0",
            "max-age=99999999999999999999",
            "max-age=soon",
            "no-cache, max-age=5",
            "",
        ])
        .prop_map(str::to_owned),
        "\\PC{0,20}",
    ];
    (
        method,
        path,
        prop::option::of(header.clone()),
        prop::option::of(prop_oneof![
            Just("18446744073709551615".to_owned()),
            Just("60".to_owned()),
            "[0-9]{0,25}",
            "\\PC{0,8}",
        ]),
        prop::option::of("\\PC{0,20}"),
        prop::option::of("\\PC{0,30}"),
        prop::option::of(header),
        body(),
    )
        .prop_map(|(method, path, cache, ttl, namespace, auth, beta, body)| {
            let mut request = http::Request::builder().method(method).uri(path);
            let mut headers = vec![("content-type", Some("application/json".to_owned()))];
            headers.push(("cache-control", cache));
            headers.push(("llm-dedup-ttl", ttl));
            headers.push(("llm-dedup-namespace", namespace));
            headers.push(("authorization", auth));
            headers.push(("anthropic-beta", beta));
            for (name, value) in headers {
                if let Some(v) = value.and_then(|v| http::HeaderValue::from_str(&v).ok()) {
                    request = request.header(name, v);
                }
            }
            request
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_else(|_| ordinary())
        })
}

/// A request the engine must always answer.
fn ordinary() -> http::Request<Full<Bytes>> {
    http::Request::post("/v1/chat/completions")
        .header("authorization", "Bearer sk-test-key-1")
        .body(Full::new(Bytes::from(common::chat(
            "the fuzzer's control question",
        ))))
        .expect("request")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn mutated_requests_never_panic_and_the_engine_keeps_answering(request in request()) {
        let target = target();
        target.runtime.block_on(async {
            let answered = tokio::time::timeout(Duration::from_secs(20), async {
                if let Ok(answer) = target.engine.send(request).await {
                    let _ = answer.into_bytes().await;
                }
            })
            .await;
            prop_assert!(answered.is_ok(), "a request hung");
            let control = target.engine.send(ordinary()).await;
            let status = control.map(|a| a.status.as_u16());
            prop_assert_eq!(status.ok(), Some(200), "the engine stopped answering");
            Ok(())
        })?;
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");
    }
}
