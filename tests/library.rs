//! The engine as a library user drives it, against the fake OpenAI upstream.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::{Behaviour, FakeUpstream, Proxy, chat, client, post};
use http_body_util::Full;
use llm_dedup::{AnswerBody, CacheStatus, Dedup, ErrorKind, Origin};

fn request(path: &str, body: &str) -> http::Request<Full<Bytes>> {
    http::Request::post(path)
        .header("authorization", "Bearer sk-test-key-1")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .expect("valid request")
}

#[tokio::test]
async fn a_repeat_is_a_hit_with_the_same_body() {
    let upstream = FakeUpstream::start().await;
    let engine = upstream.engine().build().expect("engine");
    let first = engine
        .send(request("/v1/chat/completions", &chat("lib")))
        .await
        .expect("answer");
    assert_eq!(
        (first.status.as_u16(), first.cache),
        (200, CacheStatus::Miss)
    );
    let key = first.key.expect("a cacheable request has a key");
    let first = first.into_bytes().await.expect("body");
    let second = engine
        .send(request("/v1/chat/completions", &chat("lib")))
        .await
        .expect("answer");
    assert_eq!(second.cache, CacheStatus::Hit);
    assert_eq!(second.key, Some(key));
    assert!(matches!(second.body, AnswerBody::Full(_)));
    assert_eq!(second.into_bytes().await.expect("body"), first);
    assert_eq!(upstream.calls(), 1);
}

/// A repeat answered again and again from memory still sees a refresh at once.
#[tokio::test]
async fn a_refresh_replaces_what_repeats_get_next() {
    let upstream = FakeUpstream::start().await;
    let engine = upstream.engine().build().expect("engine");
    let ask = |cache_control: Option<&'static str>| {
        let mut r = request("/v1/chat/completions", &chat("refresh me"));
        if let Some(value) = cache_control {
            r.headers_mut()
                .insert("cache-control", value.parse().expect("value"));
        }
        let engine = engine.clone();
        async move {
            let a = engine.send(r).await.expect("answer");
            let cache = a.cache;
            let body: serde_json::Value =
                serde_json::from_slice(&a.into_bytes().await.expect("body")).expect("json");
            (cache, body["id"].as_str().expect("id").to_owned())
        }
    };
    let (_, first) = ask(None).await;
    for _ in 0..40 {
        assert_eq!(ask(None).await, (CacheStatus::Hit, first.clone()));
    }
    let (cache, fresh) = ask(Some("no-cache")).await;
    assert_eq!(cache, CacheStatus::Miss);
    assert_ne!(fresh, first);
    for _ in 0..40 {
        assert_eq!(ask(None).await, (CacheStatus::Hit, fresh.clone()));
    }
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn concurrent_identical_calls_share_one_upstream_call() {
    let upstream = FakeUpstream::with(Behaviour {
        delay: Duration::from_millis(200),
        ..Behaviour::default()
    })
    .await;
    let engine = upstream.engine().build().expect("engine");
    let tasks: Vec<_> = (0..30)
        .map(|_| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let a = engine
                    .send(request("/v1/embeddings", r#"{"model":"e","input":"x"}"#))
                    .await
                    .expect("answer");
                (a.cache, a.into_bytes().await.expect("body"))
            })
        })
        .collect();
    let mut bodies = Vec::new();
    let mut misses = 0;
    for t in tasks {
        let (cache, body) = t.await.expect("task");
        misses += usize::from(cache == CacheStatus::Miss);
        bodies.push(body);
    }
    assert_eq!(upstream.calls(), 1);
    assert_eq!(misses, 1);
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(engine.in_flight(), 0);
}

#[tokio::test]
async fn answers_persist_across_engines_on_one_database() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("lib.sqlite3");
    let build = || upstream.engine().database(&db).build().expect("engine");
    let engine = build();
    let first = engine
        .send(request("/v1/chat/completions", &chat("keep")))
        .await
        .expect("answer");
    assert_eq!(first.cache, CacheStatus::Miss);
    engine.close().await.expect("close");
    drop(engine);

    let engine = build();
    let again = engine
        .send(request("/v1/chat/completions", &chat("keep")))
        .await
        .expect("answer");
    assert_eq!(again.cache, CacheStatus::Hit);
    assert_eq!(upstream.calls(), 1);
    engine.close().await.expect("close");
}

#[tokio::test]
async fn dropping_the_last_handle_still_commits_what_was_stored() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("drop.sqlite3");
    let engine = upstream.engine().database(&db).build().expect("engine");
    let key = engine
        .send(request("/v1/chat/completions", &chat("dropped")))
        .await
        .expect("answer")
        .key
        .expect("key");
    drop(engine);
    // The writer commits in the background once the last handle is gone; `close` is the way
    // to wait for it, so here the test polls for the row, within a bound.
    let conn = rusqlite::Connection::open(&db).expect("open");
    common::eventually(|| {
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM entries WHERE key = ?1",
                [key.to_hex()],
                |r| r.get(0),
            )
            .expect("query");
        n == 1
    })
    .await;
}

#[tokio::test]
async fn two_engines_with_two_databases_do_not_interfere() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let a = upstream
        .engine()
        .database(dir.path().join("a.db"))
        .build()
        .expect("engine a");
    let b = upstream
        .engine()
        .database(dir.path().join("b.db"))
        .build()
        .expect("engine b");
    async fn ask(e: &Dedup) -> CacheStatus {
        let answer = e.send(request("/v1/chat/completions", &chat("twins")));
        answer.await.expect("answer").cache
    }
    assert_eq!(ask(&a).await, CacheStatus::Miss);
    assert_eq!(ask(&b).await, CacheStatus::Miss);
    a.close().await.expect("close a");
    // b keeps working, and its entry is its own.
    assert_eq!(ask(&b).await, CacheStatus::Hit);
    assert_eq!(upstream.calls(), 2);
    b.close().await.expect("close b");
}

#[tokio::test]
async fn the_proxy_and_the_library_compute_the_same_key() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("shared.sqlite3");
    let engine = upstream.engine().database(&db).build().expect("engine");
    let body = chat("one key");
    let lib_key = engine
        .send(request("/v1/chat/completions", &body))
        .await
        .expect("answer")
        .key
        .expect("key");
    engine.close().await.expect("close");
    drop(engine);

    // The key is partitioned by a salt kept in the database: same database, same key.
    let proxy = Proxy::with_db(&upstream, &db).await;
    let seen = post(&client(), &proxy.url("/v1/chat/completions"), body, &[]).await;
    assert_eq!(seen.key, Some(lib_key.to_hex()));
    assert_eq!(seen.cache, "hit");
    assert_eq!(upstream.calls(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn errors_say_whose_fault_they_are() {
    let upstream = FakeUpstream::start().await;
    let engine = upstream.engine().build().expect("engine");
    let e = engine
        .send(request("/v1/chat/completions", "{not json"))
        .await
        .expect_err("bad JSON");
    assert_eq!(
        (e.kind(), e.origin()),
        (ErrorKind::InvalidRequest, Origin::Request)
    );
    assert!(!e.is_retryable());

    let dead = Dedup::builder()
        .upstream("http://127.0.0.1:9")
        .governor(llm_dedup::GovernorSettings::default().retry_budget(Duration::ZERO))
        .build()
        .expect("engine");
    let e = dead
        .send(request("/v1/chat/completions", &chat("x")))
        .await
        .expect_err("nothing listens there");
    assert_eq!(
        (e.kind(), e.origin()),
        (ErrorKind::UpstreamUnreachable, Origin::Upstream)
    );
    assert!(e.is_retryable());

    let e = Dedup::builder()
        .upstream("not a url")
        .build()
        .expect_err("bad upstream");
    assert_eq!(e.origin(), Origin::Cache);
}

#[tokio::test]
async fn streamed_answers_come_back_as_a_byte_stream() {
    let upstream = FakeUpstream::start().await;
    let engine = upstream.engine().build().expect("engine");
    let body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"s"}]}"#;
    let answer = engine
        .send(request("/v1/chat/completions", body))
        .await
        .expect("answer");
    assert_eq!(answer.cache, CacheStatus::Miss);
    assert!(matches!(answer.body, AnswerBody::Stream(_)));
    let text = answer.into_bytes().await.expect("stream");
    assert!(text.ends_with(b"data: [DONE]\n\n"));
    let again = engine
        .send(request("/v1/chat/completions", body))
        .await
        .expect("answer");
    assert_eq!(again.cache, CacheStatus::Hit);
    assert_eq!(again.into_bytes().await.expect("replay"), text);
}

#[cfg(feature = "middleware")]
mod middleware {
    use super::*;
    use llm_dedup::middleware::DedupMiddleware;
    use reqwest_middleware::ClientBuilder;

    #[tokio::test]
    async fn a_reqwest_client_gains_the_cache_with_one_with() {
        let upstream = FakeUpstream::with(Behaviour {
            delay: Duration::from_millis(100),
            ..Behaviour::default()
        })
        .await;
        let engine = upstream.engine().build().expect("engine");
        let client = ClientBuilder::new(common::client_builder().build().expect("client"))
            .with(DedupMiddleware::new(engine.clone()))
            .build();
        let url = format!("{}/v1/embeddings", upstream.url());
        let send = || {
            client
                .post(&url)
                .bearer_auth("sk-mw")
                .header("content-type", "application/json")
                .body(r#"{"model":"e","input":"via middleware"}"#)
                .send()
        };
        // Concurrent identical calls coalesce, a later one hits.
        let (a, b) = tokio::join!(send(), send());
        let (a, b) = (a.expect("a"), b.expect("b"));
        let statuses = [&a, &b].map(|r| {
            r.headers()["llm-dedup-cache"]
                .to_str()
                .expect("ascii")
                .to_owned()
        });
        assert!(statuses.contains(&"miss".to_owned()), "{statuses:?}");
        let a_body = a.bytes().await.expect("body");
        assert_eq!(b.bytes().await.expect("body"), a_body);
        let c = send().await.expect("c");
        assert_eq!(c.headers()["llm-dedup-cache"], "hit");
        assert_eq!(c.bytes().await.expect("body"), a_body);
        assert_eq!(upstream.calls(), 1);

        // Another host goes down the chain untouched.
        let other = FakeUpstream::start().await;
        let r = client
            .post(format!("{}/v1/embeddings", other.url()))
            .body(r#"{"model":"e","input":"elsewhere"}"#)
            .send()
            .await
            .expect("passed on");
        assert!(r.headers().get("llm-dedup-cache").is_none());
        assert_eq!(other.calls(), 1);
    }

    /// A client whose API key is a default header: given to the middleware, the engine calls
    /// the upstream with it, so the key arrives, and another client's key never reads its
    /// answers.
    #[tokio::test]
    async fn the_callers_own_client_makes_the_upstream_call() {
        let upstream = FakeUpstream::start().await;
        let engine = upstream.engine().build().expect("engine");
        let with_key = |key: &str| {
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert(
                "authorization",
                format!("Bearer {key}").parse().expect("value"),
            );
            let own = common::client_builder()
                .default_headers(headers)
                .build()
                .expect("client");
            ClientBuilder::new(own.clone())
                .with(DedupMiddleware::with_client(engine.clone(), own))
                .build()
        };
        let url = format!("{}/v1/chat/completions", upstream.url());
        let ask = |client: reqwest_middleware::ClientWithMiddleware| {
            let url = url.clone();
            async move {
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(chat("a default key"))
                    .send()
                    .await
                    .expect("sent");
                let cache = r.headers()["llm-dedup-cache"]
                    .to_str()
                    .expect("ascii")
                    .to_owned();
                (r.status().as_u16(), cache)
            }
        };
        let alice = with_key("sk-alice-default");
        assert_eq!(ask(alice.clone()).await, (200, "miss".to_owned()));
        let seen = upstream.state.last_headers.lock().expect("lock").clone();
        assert_eq!(
            seen.expect("a call")["authorization"],
            "Bearer sk-alice-default"
        );
        assert_eq!(ask(alice).await, (200, "hit".to_owned()));
        assert_eq!(upstream.calls(), 1);
        // Another client, another key: a call of its own, never alice's answer.
        let bob = with_key("sk-bob-default");
        assert_eq!(ask(bob).await, (200, "miss".to_owned()));
        let seen = upstream.state.last_headers.lock().expect("lock").clone();
        assert_eq!(
            seen.expect("a call")["authorization"],
            "Bearer sk-bob-default"
        );
        assert_eq!(upstream.calls(), 2);

        // Callers of one client told apart by a cookie alone (a gateway's session) stay
        // apart: the client's identity adds to what their headers say.
        let gateway = common::client_builder().build().expect("client");
        let sessions = ClientBuilder::new(gateway.clone())
            .with(DedupMiddleware::with_client(engine.clone(), gateway))
            .build();
        let as_session = |session: &'static str| {
            let (sessions, url) = (sessions.clone(), url.clone());
            async move {
                let r = sessions
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("cookie", format!("session={session}"))
                    .body(chat("a session's question"))
                    .send()
                    .await
                    .expect("sent");
                r.headers()["llm-dedup-cache"]
                    .to_str()
                    .expect("ascii")
                    .to_owned()
            }
        };
        assert_eq!(as_session("alice").await, "miss");
        assert_eq!(as_session("bob").await, "miss", "bob is not alice");
        assert_eq!(as_session("alice").await, "hit");
        assert_eq!(upstream.calls(), 4);

        // The engine's own client, for contrast, does not know the key: none arrives.
        let own = common::client_builder()
            .default_headers(
                [(
                    reqwest::header::AUTHORIZATION,
                    "Bearer sk-carol-default".parse().expect("value"),
                )]
                .into_iter()
                .collect(),
            )
            .build()
            .expect("client");
        let carol = ClientBuilder::new(own)
            .with(DedupMiddleware::new(engine.clone()))
            .build();
        assert_eq!(ask(carol).await, (200, "miss".to_owned()));
        let seen = upstream.state.last_headers.lock().expect("lock").clone();
        assert!(!seen.expect("a call").contains_key("authorization"));
    }
}

#[tokio::test]
async fn embeddings_are_cached_per_input_through_the_library_too() {
    let upstream = FakeUpstream::start().await;
    let engine = upstream.engine().build().expect("engine");
    let embed = |inputs: &[&str]| {
        let body = serde_json::json!({"model": "text-embedding-3-small", "input": inputs});
        engine.send(request("/v1/embeddings", &body.to_string()))
    };
    let first = embed(&["one", "two"]).await.expect("answer");
    assert_eq!(first.cache, CacheStatus::Miss);
    assert!(
        first.key.is_none(),
        "two inputs, two entries: no single key"
    );
    let partial = embed(&["two", "three"]).await.expect("answer");
    assert_eq!(
        (partial.status.as_u16(), partial.cache),
        (200, CacheStatus::Partial)
    );
    assert_eq!(partial.headers["llm-dedup-cache"], "partial");
    let body: serde_json::Value =
        serde_json::from_slice(&partial.into_bytes().await.expect("body")).expect("JSON");
    assert_eq!(body["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(body["data"][1]["index"], 1);
    let one = embed(&["three"]).await.expect("answer");
    assert_eq!(one.cache, CacheStatus::Hit);
    assert!(one.key.is_some(), "one input, one entry");
    assert_eq!(upstream.calls(), 2);
    assert_eq!(upstream.state.embed_inputs.load(Ordering::SeqCst), 3);
    engine.close().await.expect("close");
}

/// With the governor off, nothing is held to learn the budget and a refusal is handed on at
/// once, not waited out: what a program whose client already paces and retries needs.
#[tokio::test]
async fn with_the_governor_off_calls_go_at_once_and_refusals_come_back_as_they_came() {
    let upstream = FakeUpstream::with(Behaviour {
        delay: Duration::from_millis(300),
        refuse_next: 1,
        ..Behaviour::default()
    })
    .await;
    let engine = upstream
        .engine()
        .governor(llm_dedup::GovernorSettings::off())
        .build()
        .expect("engine");
    let refused = engine
        .send(request("/v1/chat/completions", &chat("refused")))
        .await
        .expect("answer");
    assert_eq!(refused.status.as_u16(), 429, "handed on, not retried");
    assert_eq!(upstream.calls(), 1);
    // A budget nobody knows yet: with the governor on, the first call would go alone.
    let launched: Vec<_> = (0..3)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let r = request("/v1/chat/completions", &chat(&format!("at once {i}")));
                engine.send(r).await.expect("answer").status.as_u16()
            })
        })
        .collect();
    for task in launched {
        assert_eq!(task.await.expect("answered"), 200);
    }
    assert_eq!(upstream.state.peak_in_progress.load(Ordering::SeqCst), 3);

    // Off, with retries asked for: the refusal is waited out as its `retry-after-ms` (300)
    // says, by this request alone.
    let upstream = FakeUpstream::with(Behaviour {
        refuse_next: 1,
        ..Behaviour::default()
    })
    .await;
    let engine = upstream
        .engine()
        .governor(llm_dedup::GovernorSettings::off().retry_budget(Duration::from_secs(5)))
        .build()
        .expect("engine");
    let asked = std::time::Instant::now();
    let answer = engine
        .send(request("/v1/chat/completions", &chat("waited")))
        .await
        .expect("answer");
    assert_eq!((answer.status.as_u16(), upstream.calls()), (200, 2));
    assert!(
        asked.elapsed() >= Duration::from_millis(300),
        "retried at once"
    );

    // The default governor, for contrast: the refusal is waited out.
    let upstream = FakeUpstream::with(Behaviour {
        refuse_next: 1,
        ..Behaviour::default()
    })
    .await;
    let engine = upstream.engine().build().expect("engine");
    let answer = engine
        .send(request("/v1/chat/completions", &chat("retried")))
        .await
        .expect("answer");
    assert_eq!((answer.status.as_u16(), upstream.calls()), (200, 2));
}

/// The engine as a tower service: `oneshot` a request, read an `http::Response`.
#[tokio::test]
async fn the_engine_is_a_tower_service() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    let upstream = FakeUpstream::start().await;
    let engine = upstream.engine().build().expect("engine");
    let mut bodies = Vec::new();
    for expected in ["miss", "hit"] {
        let response = engine
            .clone()
            .oneshot(request("/v1/chat/completions", &chat("tower")))
            .await
            .expect("response");
        assert_eq!(response.status(), http::StatusCode::OK);
        assert_eq!(response.headers()["llm-dedup-cache"], expected);
        let body = response.into_body().collect().await.expect("body");
        bodies.push(body.to_bytes());
    }
    assert_eq!(bodies[0], bodies[1]);
    assert_eq!(upstream.calls(), 1);

    // A stream comes through as frames, whole.
    let streamed = serde_json::json!({"model": "gpt-4o-mini", "stream": true,
        "messages": [{"role": "user", "content": "tower stream"}]})
    .to_string();
    let response = engine
        .clone()
        .oneshot(request("/v1/chat/completions", &streamed))
        .await
        .expect("response");
    assert!(
        response.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/event-stream")
    );
    let body = response.into_body().collect().await.expect("stream");
    assert!(body.to_bytes().ends_with(b"data: [DONE]\n\n"));

    // An error of the request is the service's error.
    let e = engine
        .clone()
        .oneshot(request("/v1/chat/completions", "{not json"))
        .await;
    let e = e.expect_err("malformed JSON is the caller's error");
    assert_eq!(e.kind(), ErrorKind::InvalidRequest);
    // A stack that needs a response for every request answers it as the proxy would.
    let response = http::Response::<llm_dedup::AnswerBody>::from(e);
    assert_eq!(response.status(), http::StatusCode::BAD_REQUEST);
    assert_eq!(response.headers()["x-should-retry"], "false");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(body["error"]["code"], "invalid_request", "{body}");
}

/// `build_async` opens the database off the async threads (here a current-thread runtime,
/// which a blocking open would stall), and fails when the Redis it is given cannot be reached;
/// `build` starts anyway.
#[tokio::test(flavor = "current_thread")]
async fn an_async_build_says_when_redis_cannot_be_reached() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = upstream
        .engine()
        .database(dir.path().join("cache.db"))
        .build_async()
        .await
        .expect("engine");
    let first = engine
        .send(request("/v1/chat/completions", &chat("async build")))
        .await
        .expect("answer");
    assert_eq!(first.cache, CacheStatus::Miss);
    engine.close().await.expect("closed");

    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let unreachable = format!("redis://127.0.0.1:{port}");
    let e = upstream
        .engine()
        .redis(&unreachable)
        .build_async()
        .await
        .expect_err("Redis cannot be reached");
    assert_eq!(e.kind(), ErrorKind::Cache);
    assert!(e.to_string().contains("cannot be reached"), "{e}");
    assert!(upstream.engine().redis(&unreachable).build().is_ok());

    if let Some(redis) = common::RedisServer::start() {
        let engine = upstream
            .engine()
            .redis(redis.url())
            .build_async()
            .await
            .expect("a reachable Redis");
        engine.close().await.expect("closed");
    }
}

/// A `DedupLayer` over the caller's own tower service: what must go upstream goes through
/// that service (here it adds the API key, as a caller's stack would), and a repeat never
/// reaches it.
#[tokio::test]
async fn a_layer_sends_upstream_through_the_inner_service() {
    use http_body_util::BodyExt;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use tower::{Layer, ServiceExt};

    type BoxError = Box<dyn std::error::Error + Send + Sync>;
    let upstream = FakeUpstream::start().await;
    let engine = upstream.engine().build().expect("engine");
    let through = Arc::new(AtomicUsize::new(0));
    let forward = common::client_builder().build().expect("client");
    let counted = through.clone();
    let inner = tower::service_fn(move |request: http::Request<llm_dedup::UpstreamBody>| {
        let (counted, forward) = (counted.clone(), forward.clone());
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            let (mut head, body) = request.into_parts();
            head.headers.insert(
                "authorization",
                "Bearer sk-from-the-inner-service".parse().expect("value"),
            );
            let body = body.collect().await?.to_bytes();
            let answer = forward
                .request(head.method, head.uri.to_string())
                .headers(head.headers)
                .body(body)
                .send()
                .await?;
            let mut response = http::Response::new(Full::new(Bytes::new()));
            *response.status_mut() = answer.status();
            *response.headers_mut() = answer.headers().clone();
            let bytes = answer.bytes().await?;
            Ok::<_, BoxError>(response.map(|_| Full::new(bytes)))
        }
    });
    let service = llm_dedup::DedupLayer::new(engine.clone()).layer(inner);
    let mut bodies = Vec::new();
    for expected in ["miss", "hit"] {
        let ask = http::Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(chat("through the layer"))))
            .expect("request");
        let response = service.clone().oneshot(ask).await.expect("answer");
        assert_eq!(response.status(), http::StatusCode::OK);
        assert_eq!(response.headers()["llm-dedup-cache"], expected);
        bodies.push(
            response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes(),
        );
    }
    assert_eq!(bodies[0], bodies[1]);
    assert_eq!(
        through.load(Ordering::SeqCst),
        1,
        "the repeat never reached it"
    );
    let seen = upstream.state.last_headers.lock().expect("lock").clone();
    assert_eq!(
        seen.expect("a call")["authorization"],
        "Bearer sk-from-the-inner-service"
    );
}
