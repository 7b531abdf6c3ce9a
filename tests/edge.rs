//! The proxy facing the open network: what a hostile or merely slow client can do at its edge.
//!
//! Each test is a finding of the edge review, reproduced as such a client would: a credential
//! "verified" by a health probe, callers merged by a shared organization header, a request
//! whose keying grows with the square of its size, slow headers and bodies, operator endpoints
//! reached through another `Host` or another spelling of their path, and a purge that an
//! answer queued before it survives.

mod common;

use common::{Behaviour, FakeUpstream, Proxy, Seen, chat, client, seen};

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
    let upstream = FakeUpstream::with(Behaviour {
        refused_keys: vec![MALLORY.to_owned()],
        ..Behaviour::default()
    })
    .await;
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
    upstream.behave(|b| b.hold = false);
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
    let upstream = FakeUpstream::with(Behaviour {
        unterminated_bytes: ENDLESS,
        hold: true,
        ..Behaviour::default()
    })
    .await;
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
    let upstream = FakeUpstream::with(Behaviour {
        padding_bytes: PADDING,
        hold: true,
        ..Behaviour::default()
    })
    .await;
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
    common::waiting(&proxy.engine, 2).await;
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

mod slow_clients {
    //! Clients that take their time: the edge bounds how long and how much.

    use std::time::{Duration, Instant};

    use llm_dedup::server::EdgeLimits;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::common::{self, FakeUpstream, Proxy, chat};

    /// Reads until the peer closes (or `within` passes); returns what was read and whether it
    /// closed.
    async fn read_to_close(conn: &mut TcpStream, within: Duration) -> (String, bool) {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, conn.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into(), true),
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Err(_) => return (String::from_utf8_lossy(&got).into(), false),
            }
        }
    }

    /// A request head for a chat completion of `length` body bytes.
    fn head(length: usize) -> String {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n\
             authorization: Bearer sk-slow\r\ncontent-type: application/json\r\n\
             content-length: {length}\r\n\r\n"
        )
    }

    /// A client sending one header line every half second is cut off once the header
    /// timeout has passed, whatever it keeps sending.
    #[tokio::test]
    async fn headers_that_trickle_are_cut_off() {
        let upstream = FakeUpstream::start().await;
        let limits = EdgeLimits::default().header_timeout(Duration::from_secs(1));
        let proxy = Proxy::start_with(upstream.engine(), limits).await;
        let mut conn = TcpStream::connect(proxy.addr).await.expect("connect");
        conn.write_all(b"POST /v1/chat/completions HTTP/1.1\r\n")
            .await
            .expect("sent");
        let started = Instant::now();
        let mut closed = false;
        for i in 0..20 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if conn
                .write_all(format!("x-slow-{i}: 1\r\n").as_bytes())
                .await
                .is_err()
            {
                closed = true;
                break;
            }
            let mut probe = [0u8; 1];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(1), conn.read(&mut probe)).await
            {
                closed = true;
                break;
            }
        }
        assert!(
            closed,
            "the connection was still open after {:?} of trickled headers",
            started.elapsed()
        );
        assert_eq!(upstream.calls(), 0);
        proxy.stop().await;
    }

    /// A connection that sends nothing, or only the start of the HTTP/2 preface, is closed
    /// once the header timeout has passed.
    #[tokio::test]
    async fn a_connection_that_says_nothing_is_closed() {
        let upstream = FakeUpstream::start().await;
        let limits = EdgeLimits::default().header_timeout(Duration::from_secs(1));
        let proxy = Proxy::start_with(upstream.engine(), limits).await;
        for first in [&b""[..], b"PRI * HTTP/2.0\r\n", b"P"] {
            let mut conn = TcpStream::connect(proxy.addr).await.expect("connect");
            conn.write_all(first).await.expect("sent");
            let (_, closed) = read_to_close(&mut conn, Duration::from_secs(10)).await;
            assert!(closed, "still open after sending {first:?}");
        }
        // HTTP/1.1 only: an HTTP/2 connection preface is refused, not served without bounds.
        let h2 = common::client_builder()
            .http2_prior_knowledge()
            .build()
            .expect("client");
        let refused = h2
            .post(proxy.url("/v1/chat/completions"))
            .header("authorization", super::ALICE)
            .body(chat("over h2"))
            .send()
            .await;
        assert!(refused.is_err(), "{refused:?}");
        proxy.stop().await;
    }

    /// A body that goes silent for longer than the body timeout gets `408`, and nothing is
    /// sent upstream.
    #[tokio::test]
    async fn a_body_that_stalls_gets_408() {
        let upstream = FakeUpstream::start().await;
        let limits = EdgeLimits::default().body_timeout(Duration::from_secs(1));
        let proxy = Proxy::start_with(upstream.engine(), limits).await;
        let body = chat("slow body");
        for path in ["/v1/chat/completions", "/v1/files"] {
            let mut conn = TcpStream::connect(proxy.addr).await.expect("connect");
            let head = head(body.len()).replace("/v1/chat/completions", path);
            conn.write_all(head.as_bytes()).await.expect("head");
            conn.write_all(&body.as_bytes()[..10]).await.expect("start");
            let (answer, closed) = read_to_close(&mut conn, Duration::from_secs(10)).await;
            assert!(answer.starts_with("HTTP/1.1 408"), "{path}: {answer}");
            assert!(answer.contains("request_timeout"), "{answer}");
            assert!(closed, "the connection is closed after a 408");
            if path == "/v1/chat/completions" {
                // A passed-through body is streamed: the upstream sees it begin, then cut.
                assert_eq!(upstream.calls(), 0, "a cached route reads the body first");
            }
        }
        proxy.stop().await;
    }

    /// A client that stops reading its answer is not waited for longer than the body timeout:
    /// its connection is closed, and the answer is not held for it.
    #[tokio::test]
    async fn a_client_that_stops_reading_is_cut_off() {
        let upstream = FakeUpstream::start().await;
        // About 16 MB of events: more than the sockets between the proxy and the client hold.
        upstream.behave(|b| b.extra_events = 500);
        upstream.behave(|b| b.big_event_bytes = 32 * 1024);
        let limits = EdgeLimits::default().body_timeout(Duration::from_secs(1));
        let proxy = Proxy::start_with(upstream.engine(), limits).await;
        let mut conn = TcpStream::connect(proxy.addr).await.expect("connect");
        let body = serde_json::json!({"model": "gpt-4o-mini", "stream": true,
            "messages": [{"role": "user", "content": "a long one"}]})
        .to_string();
        conn.write_all(format!("{}{body}", head(body.len())).as_bytes())
            .await
            .expect("sent");
        // Reads nothing for a while.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let (answer, closed) = read_to_close(&mut conn, Duration::from_secs(20)).await;
        assert!(closed);
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "{}",
            &answer[..answer.len().min(200)]
        );
        assert!(
            !answer.contains("[DONE]"),
            "the whole stream waited {} bytes for a client that did not read",
            answer.len()
        );
        proxy.stop().await;
    }

    /// Past `--max-connections`, a connection gets `503` with `Retry-After`, and the proxy
    /// keeps serving the ones it has.
    #[tokio::test]
    async fn connections_past_the_bound_get_503() {
        let upstream = FakeUpstream::start().await;
        let limits = EdgeLimits::default().max_connections(3);
        let proxy = Proxy::start_with(upstream.engine(), limits).await;
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut conn = TcpStream::connect(proxy.addr).await.expect("connect");
            conn.write_all(b"POST /v1/chat/completions HTTP/1.1\r\n")
                .await
                .expect("sent");
            held.push(conn);
        }
        common::figure_becomes(&proxy.engine, "llm_dedup_connections_open", 3.0).await;
        let mut extra = TcpStream::connect(proxy.addr).await.expect("connect");
        let body = chat("one too many");
        extra
            .write_all(format!("{}{body}", head(body.len())).as_bytes())
            .await
            .expect("sent");
        let (answer, closed) = read_to_close(&mut extra, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("retry-after: 1"),
            "{answer}"
        );
        assert!(answer.contains("too_many_connections"), "{answer}");
        assert!(closed);
        let refused = r#"llm_dedup_clients_refused_total{reason="max_connections"}"#;
        assert_eq!(common::figure(&proxy.engine, refused).await, 1.0);
        drop(held);
        // Once the others are gone, a new connection is served.
        common::figure_becomes(&proxy.engine, "llm_dedup_connections_open", 0.0).await;
        let c = super::client();
        let url = proxy.url("/v1/chat/completions");
        let later = super::post_as(&c, &url, chat("later"), &[("authorization", super::ALICE)]);
        assert_eq!(later.await.status, 200);
        proxy.stop().await;
    }

    /// Request bodies held at once are bounded: a request that would go past the bound gets
    /// `503` with `Retry-After` before its body is read.
    #[tokio::test]
    async fn request_bytes_held_at_once_are_bounded() {
        let upstream = FakeUpstream::start().await;
        let limits = EdgeLimits::default().max_buffered(1000);
        let proxy = Proxy::start_with(upstream.engine(), limits).await;
        // One request sends 800 bytes of a body of 900, then waits: they are held meanwhile
        // (what is held is what arrived: a declared length alone holds nothing).
        let mut slow = TcpStream::connect(proxy.addr).await.expect("connect");
        slow.write_all(head(900).as_bytes()).await.expect("head");
        slow.write_all(&[b' '; 800]).await.expect("start");
        let mut promised = TcpStream::connect(proxy.addr).await.expect("connect");
        promised
            .write_all(head(100_000).as_bytes())
            .await
            .expect("head");
        common::figure_becomes(&proxy.engine, "llm_dedup_request_bytes_held", 800.0).await;
        let mut second = TcpStream::connect(proxy.addr).await.expect("connect");
        let body = format!("{{\"model\":\"m\",\"pad\":\"{}\"}}", "x".repeat(500));
        second
            .write_all(format!("{}{body}", head(body.len())).as_bytes())
            .await
            .expect("sent");
        let (answer, _) = read_to_close(&mut second, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("retry-after: 1"),
            "{answer}"
        );
        assert!(answer.contains("too_many_request_bytes"), "{answer}");
        let refused = r#"llm_dedup_clients_refused_total{reason="max_buffered"}"#;
        assert_eq!(common::figure(&proxy.engine, refused).await, 1.0);
        drop((slow, promised));
        // The slow one's bytes are given back with its connection.
        common::figure_becomes(&proxy.engine, "llm_dedup_request_bytes_held", 0.0).await;
        let c = super::client();
        let url = proxy.url("/v1/chat/completions");
        let again = super::post_as(&c, &url, body, &[("authorization", super::ALICE)]);
        assert_eq!(again.await.status, 200);
        proxy.stop().await;
    }
}

/// SIGTERM stops the proxy within its drain deadline whatever its clients and the upstream
/// do: here one client sends its body a byte every 300 ms (never silent long enough to be
/// cut), another has its headers half sent, and a third waits on an upstream call that never
/// answers. What was answered before the stop is on disk.
#[test]
fn sigterm_exits_within_the_drain_deadline_whatever_clients_do() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let upstream = runtime.block_on(FakeUpstream::start());
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("c.db");
    let running = common::start_proxy_with(
        &db,
        &upstream.url(),
        &["--listen", "127.0.0.1:0", "--drain-timeout", "2s"],
    );
    let addr = running.addr.clone();
    // One answer, acknowledged before the stop.
    let mut done = std::net::TcpStream::connect(&addr).expect("connect");
    let body = chat("answered before the stop");
    write!(
        done,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer sk-x\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("sent");
    let mut answer = String::new();
    done.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let trickling = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let Ok(mut conn) = std::net::TcpStream::connect(&addr) else {
                return;
            };
            let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n\
                        content-type: application/json\r\ncontent-length: 100000\r\n\r\n";
            if conn.write_all(head.as_bytes()).is_err() {
                return;
            }
            for _ in 0..1000 {
                std::thread::sleep(Duration::from_millis(300));
                if conn.write_all(b" ").is_err() {
                    return;
                }
            }
        })
    };
    let mut half = std::net::TcpStream::connect(&addr).expect("connect");
    half.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 1")
        .expect("sent");
    // And an upstream call that never answers, its client waiting.
    upstream.behave(|b| b.hold = true);
    let mut hung = std::net::TcpStream::connect(&addr).expect("connect");
    let body = chat("never answered");
    write!(
        hung,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer sk-x\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("sent");
    runtime.block_on(upstream.wait_for_calls(2));

    let mut child = running.child;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    let signalled = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signal");
    let exited = common::poll_blocking(Duration::from_secs(15), || child.try_wait().expect("wait"));
    let Some(status) = exited else {
        let _ = child.kill();
        panic!("still running 15 s after SIGTERM with a drain deadline of 2 s");
    };
    assert!(status.success(), "{status:?}");
    let took = signalled.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let _ = trickling.join();
    let conn = rusqlite::Connection::open(&db).expect("open");
    let stored: i64 = conn
        .query_row("SELECT count(*) FROM entries", [], |r| r.get(0))
        .expect("count");
    assert_eq!(
        stored, 1,
        "the answer acknowledged before the stop is on disk"
    );
}
