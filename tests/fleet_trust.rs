//! Redis as a boundary: what a hostile Redis writer (or anyone who can publish on its channel)
//! can and cannot make a fleet do, and followers that wait on a healthy Redis however slow the
//! stream. Each test starts its own `redis-server` (see `tests/fleet.rs`).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use llm_dedup::FleetSecret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::{Behaviour, FakeUpstream, Proxy, RedisServer, chat, client, post};

fn secret(text: &str) -> FleetSecret {
    FleetSecret::new(text).expect("long enough")
}

/// The secret of the fleet under test.
fn ours() -> FleetSecret {
    secret("the fleet under test's own secret")
}

/// A replica of the fleet on `redis` in front of `upstream`, sealing with `secret` if given,
/// telling the others it is at its own address.
async fn replica(
    upstream: &FakeUpstream,
    redis: &RedisServer,
    secret: Option<FleetSecret>,
) -> Proxy {
    let mut builder = upstream.engine().redis(redis.url());
    if let Some(secret) = secret {
        builder = builder.fleet_secret(secret);
    }
    Proxy::advertised(builder).await
}

/// A streamed chat request about `topic`.
fn streamed(topic: &str) -> String {
    serde_json::json!({"model": "gpt-4o-mini", "stream": true,
        "messages": [{"role": "user", "content": topic}]})
    .to_string()
}

/// A listener that records every request it receives and answers `404`.
struct Capture {
    url: String,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Capture {
    async fn start() -> Capture {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let n = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or(0);
                    record
                        .lock()
                        .expect("lock")
                        .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                    let _ = conn
                        .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                });
            }
        });
        Capture { url, seen }
    }

    fn requests(&self) -> Vec<String> {
        self.seen.lock().expect("lock").clone()
    }
}

/// The one relayed stream's name in `redis`, once there is one.
async fn relayed_stream(redis: &RedisServer) -> String {
    let mut name = String::new();
    common::eventually(|| {
        let reply = redis.command("KEYS *:s:*");
        // `*1\r\n$N\r\nNAME\r\n`
        name = reply.lines().nth(2).unwrap_or_default().to_owned();
        !reply.starts_with("*0")
    })
    .await;
    name
}

/// Replaces the head of the stream `name` with the same fields and `peer` set to `url`, as a
/// hostile Redis writer can.
fn plant_peer(redis: &RedisServer, name: &str, url: &str) {
    let script = "local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1][2] \
                  local fields = {} \
                  for i = 1, #head, 2 do if head[i] ~= 'peer' then \
                    table.insert(fields, head[i]) table.insert(fields, head[i + 1]) end end \
                  table.insert(fields, 'peer') table.insert(fields, ARGV[1]) \
                  redis.call('DEL', KEYS[1]) \
                  return redis.call('XADD', KEYS[1], '*', unpack(fields))";
    let reply = redis.command(&format!("EVAL \"{script}\" 1 {name} {url}"));
    assert!(reply.starts_with('$'), "{reply}");
}

const ALICE: &str = "Bearer sk-alice-secret-key-0001";

/// Whoever can write to Redis plants its own address as the peer of a stream in flight: with
/// or without a fleet secret, no client credential, prompt or request ever reaches it. With a
/// secret the planted head fails its seal and is not followed (the follower gets the answer
/// once its leader stores it); without one, no replica reads a stream's rest from a peer.
#[tokio::test]
async fn a_planted_peer_address_never_receives_a_client_credential() {
    for sealed in [false, true] {
        let Some(redis) = RedisServer::start() else {
            return;
        };
        let upstream = FakeUpstream::with(Behaviour {
            hold: true,
            ..Behaviour::default()
        })
        .await;
        let capture = Capture::start().await;
        let secret = sealed.then(ours);
        let leader = replica(&upstream, &redis, secret.clone()).await;
        let follower = replica(&upstream, &redis, secret).await;
        let topic = "a prompt only alice may read";
        let first = common::fleet::ask_stream(&leader, topic, ALICE).await;
        let name = relayed_stream(&redis).await;
        plant_peer(&redis, &name, &capture.url);
        if sealed {
            // The planted head fails its seal: the follower does not follow it, and gets the
            // answer once the leader stores it.
            let second = tokio::spawn({
                let url = follower.url("/v1/chat/completions");
                async move {
                    let sent = client()
                        .post(url)
                        .header("content-type", "application/json")
                        .header("authorization", ALICE)
                        .body(streamed(topic))
                        .send()
                        .await
                        .expect("sent");
                    sent.text().await.unwrap_or_default()
                }
            });
            let rejected = r#"llm_dedup_redis_rejected_total{kind="stream"}"#;
            common::eventually_async(|| async {
                common::figure(&follower.engine, rejected).await >= 1.0
            })
            .await;
            upstream.state.release.notify_one();
            let answer = second.await.expect("follower");
            assert!(answer.ends_with("data: [DONE]\n\n"), "{answer}");
        } else {
            // The follower follows the planted head (which relays nothing); Redis going away
            // ends its read there.
            let second = common::fleet::ask_stream_headers(&follower, topic, ALICE).await;
            redis.kill();
            upstream.state.release.notify_one();
            let cut = second.await.expect("follower");
            assert!(!cut.contains("[DONE]"), "{cut}");
        }
        assert!(first.await.expect("leader").ends_with("data: [DONE]\n\n"));
        for request in capture.requests() {
            assert!(
                !request.contains("sk-alice"),
                "a credential leaked: {request}"
            );
            assert!(!request.contains(topic), "a prompt leaked: {request}");
        }
        assert!(capture.requests().is_empty(), "{:?}", capture.requests());
        leader.stop().await;
        follower.stop().await;
    }
}

/// With a fleet secret, a replica that lost Redis mid-stream asks the replica that named
/// itself in the stream's sealed head for the rest with a token of the fleet, and with
/// nothing of the client's: no credential, no prompt, no request body.
#[tokio::test]
async fn the_peer_read_back_carries_a_fleet_token_and_nothing_of_the_client() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = FakeUpstream::with(Behaviour {
        hold: true,
        ..Behaviour::default()
    })
    .await;
    let capture = Capture::start().await;
    let leader = Proxy::start(
        upstream
            .engine()
            .redis(redis.url())
            .fleet_secret(ours())
            .advertise(capture.url.clone()),
    )
    .await;
    let follower = replica(&upstream, &redis, Some(ours())).await;
    let topic = "another prompt only alice may read";
    let first = common::fleet::ask_stream(&leader, topic, ALICE).await;
    relayed_stream(&redis).await;
    let second = common::fleet::ask_stream(&follower, topic, ALICE).await;
    redis.kill();
    let cut = second.await.expect("follower");
    assert!(
        !cut.contains("[DONE]"),
        "the capture had no rest to give: {cut}"
    );
    let requests = capture.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let request = requests[0].to_ascii_lowercase();
    assert!(request.starts_with("get /_llm-dedup/peer/"), "{request}");
    assert!(request.contains("llm-dedup-peer-token: "), "{request}");
    assert!(
        !request.contains("sk-alice"),
        "a credential leaked: {request}"
    );
    assert!(!request.contains("authorization"), "{request}");
    assert!(
        !request.contains("another prompt"),
        "a prompt leaked: {request}"
    );
    upstream.state.release.notify_one();
    assert!(first.await.expect("leader").ends_with("data: [DONE]\n\n"));
    leader.stop().await;
    follower.stop().await;
}

/// A token from another fleet, an expired or malformed one, or none at all: the peer endpoint
/// answers `403` and gives nothing.
#[tokio::test]
async fn the_peer_endpoint_answers_only_a_token_of_its_fleet() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = FakeUpstream::start().await;
    let proxy = replica(&upstream, &redis, Some(ours())).await;
    let c = client();
    let url = proxy.url(&format!("/_llm-dedup/peer/{}", "ab".repeat(32)));
    for token in [
        None,
        Some(""),
        Some("x.y.z"),
        Some(&*format!("{}.1.{}", "00".repeat(32), "00".repeat(32))),
    ] {
        let mut request = c.get(&url);
        if let Some(token) = token {
            request = request.header("llm-dedup-peer-token", token);
        }
        let answer = request.send().await.expect("sent");
        assert_eq!(answer.status(), 403, "{token:?}");
    }
    let rejected = r#"llm_dedup_redis_rejected_total{kind="peer_token"}"#;
    assert!(common::figure(&proxy.engine, rejected).await >= 3.0);
    proxy.stop().await;
}

/// A stream whose events come 2 s apart (a reasoning model thinking) is followed through
/// Redis to its end, with no Redis error counted: silence on a healthy Redis is not a fault.
#[tokio::test]
async fn a_slow_stream_is_followed_through_a_healthy_redis() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = FakeUpstream::with(Behaviour {
        chunk_delay: Duration::from_secs(2),
        ..Behaviour::default()
    })
    .await;
    let leader = replica(&upstream, &redis, Some(ours())).await;
    let follower = replica(&upstream, &redis, Some(ours())).await;
    let topic = "think slowly";
    let first = common::fleet::ask_stream(&leader, topic, ALICE).await;
    relayed_stream(&redis).await;
    let second = common::fleet::ask_stream(&follower, topic, ALICE).await;
    let (first, second) = (
        first.await.expect("leader"),
        second.await.expect("follower"),
    );
    assert!(first.ends_with("data: [DONE]\n\n"), "{first}");
    assert_eq!(second, first, "the whole stream, through Redis");
    assert_eq!(upstream.calls(), 1);
    for proxy in [&leader, &follower] {
        let errors = common::figure(&proxy.engine, "llm_dedup_redis_errors_total").await;
        assert_eq!(errors, 0.0);
    }
    leader.stop().await;
    follower.stop().await;
}

/// Stores an answer on `a`, and checks `b` finds it in Redis.
async fn stored_everywhere(a: &Proxy, b: &Proxy, topic: &str) -> common::Seen {
    let c = client();
    let first = post(&c, &a.url("/v1/chat/completions"), chat(topic), &[]).await;
    assert_eq!(first.cache, "miss");
    let again = post(&c, &b.url("/v1/chat/completions"), chat(topic), &[]).await;
    assert_eq!(again.cache, "hit");
    first
}

/// A purge or a refresh published on the fleet's channel by a client without the secret, or
/// by an inspector holding another fleet's, changes nothing on the replicas; the fleet's own
/// inspector's purge is obeyed.
#[tokio::test]
async fn messages_from_outside_the_fleet_change_nothing() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = FakeUpstream::start().await;
    let a = replica(&upstream, &redis, Some(ours())).await;
    let b = replica(&upstream, &redis, Some(ours())).await;
    let first = stored_everywhere(&a, &b, "kept").await;
    let key = first.key.clone().expect("key");
    let channel = llm_dedup::unstable::FleetLayout::default().channel();
    for forged in [
        "inspector purge all".to_owned(),
        format!("x replaced {key}"),
        format!("x purge {key}"),
        format!("x purge all 1 {}", "00".repeat(32)),
    ] {
        let sent = redis.command(&format!("PUBLISH {channel} \"{forged}\""));
        assert!(sent.starts_with(':'), "{sent}");
    }
    let mut other = llm_dedup::inspect::FleetInspector::open(
        &redis.url(),
        Some(&secret("another fleet's secret entirely")),
    )
    .expect("inspector");
    let all = llm_dedup::inspect::Selection::default();
    other.purge(&all, true).expect("purge");
    common::eventually_async(|| async {
        common::figure(
            &a.engine,
            r#"llm_dedup_redis_rejected_total{kind="message"}"#,
        )
        .await
            >= 5.0
    })
    .await;
    let c = client();
    for proxy in [&a, &b] {
        let seen = post(&c, &proxy.url("/v1/chat/completions"), chat("kept"), &[]).await;
        assert_eq!(seen.cache, "hit", "kept by every replica");
        assert_eq!(seen.body["id"], first.body["id"]);
    }
    // The fleet's own inspector is obeyed, once: the same message published again by whoever
    // heard it changes nothing.
    let heard = overhear(&redis, &channel);
    let mut own =
        llm_dedup::inspect::FleetInspector::open(&redis.url(), Some(&ours())).expect("inspector");
    own.purge(&all, true).expect("purge");
    common::eventually_async(|| async {
        let seen = post(&c, &a.url("/v1/chat/completions"), chat("kept"), &[]).await;
        seen.cache == "miss"
    })
    .await;
    let sealed = heard.join().expect("overheard");
    // The request that found it purged stored a new answer.
    let second = post(&c, &a.url("/v1/chat/completions"), chat("kept"), &[]).await;
    assert_eq!(second.cache, "hit");
    assert_ne!(second.body["id"], first.body["id"]);
    let replayed = redis.command(&format!("PUBLISH {channel} \"{sealed}\""));
    assert!(replayed.starts_with(':'), "{replayed}");
    let messages = r#"llm_dedup_redis_rejected_total{kind="message"}"#;
    common::eventually_async(|| async { common::figure(&a.engine, messages).await >= 6.0 }).await;
    for proxy in [&a, &b] {
        let seen = post(&c, &proxy.url("/v1/chat/completions"), chat("kept"), &[]).await;
        assert_eq!(seen.cache, "hit", "kept after a replayed purge");
        assert_eq!(seen.body["id"], second.body["id"]);
    }
    a.stop().await;
    b.stop().await;
}

/// The first message published on `channel` from now on, as a Redis client that only
/// listens would hear it (a thread of its own, subscribed before this returns).
fn overhear(redis: &RedisServer, channel: &str) -> std::thread::JoinHandle<String> {
    use std::io::{Read, Write};
    let mut conn =
        std::net::TcpStream::connect(redis.url().trim_start_matches("redis://")).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    conn.write_all(format!("SUBSCRIBE {channel}\r\n").as_bytes())
        .expect("subscribe");
    let mut said = Vec::new();
    let mut buf = [0u8; 4096];
    // The subscription is confirmed before anything is published.
    while !String::from_utf8_lossy(&said).contains(":1\r\n") {
        let n = conn.read(&mut buf).expect("confirmation");
        said.extend_from_slice(&buf[..n]);
    }
    std::thread::spawn(move || {
        let mut said = Vec::new();
        loop {
            let text = String::from_utf8_lossy(&said).into_owned();
            let lines: Vec<&str> = text.split("\r\n").collect();
            if let Some(at) = lines.iter().position(|l| *l == "message")
                && lines.len() > at + 5
            {
                return lines[at + 4].to_owned();
            }
            let n = conn.read(&mut buf).expect("a message");
            said.extend_from_slice(&buf[..n]);
        }
    })
}

/// Under one key's name, a hostile writer plants another key's sealed entry, or an entry
/// without a seal: a replica of the fleet serves neither, calls the upstream, and counts
/// them.
#[tokio::test]
async fn a_forged_entry_is_not_served() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = FakeUpstream::start().await;
    let a = replica(&upstream, &redis, Some(ours())).await;
    let c = client();
    let one = post(&c, &a.url("/v1/chat/completions"), chat("one"), &[]).await;
    let two = post(&c, &a.url("/v1/chat/completions"), chat("two"), &[]).await;
    let three = post(&c, &a.url("/v1/chat/completions"), chat("three"), &[]).await;
    let layout = llm_dedup::unstable::FleetLayout::default();
    let name = |seen: &common::Seen| {
        let key = llm_dedup::CacheKey::from_hex(seen.key.as_deref().expect("key")).expect("key");
        layout.entry(&key)
    };
    // Another key's entry, moved; and an entry with its seal cut off.
    let moved = redis.command(&format!(
        "EVAL \"return redis.call('SET', KEYS[2], redis.call('GET', KEYS[1]), 'PX', 600000)\" 2 {} {}",
        name(&one),
        name(&two)
    ));
    assert!(moved.starts_with("+OK"), "{moved}");
    let cut = redis.command(&format!(
        "EVAL \"local v = redis.call('GET', KEYS[1]) return redis.call('SET', KEYS[2], string.sub(v, 1, #v - 32), 'PX', 600000)\" 2 {} {}",
        name(&one),
        name(&three)
    ));
    assert!(cut.starts_with("+OK"), "{cut}");
    // A replica that holds nothing of its own yet.
    let b = replica(&upstream, &redis, Some(ours())).await;
    let calls = upstream.calls();
    for (topic, before) in [("two", &two), ("three", &three)] {
        let seen = post(&c, &b.url("/v1/chat/completions"), chat(topic), &[]).await;
        assert_eq!(seen.cache, "miss", "{topic}: not served");
        assert_ne!(
            seen.body["id"], one.body["id"],
            "{topic}: never another's answer"
        );
        assert_ne!(seen.body["id"], before.body["id"]);
    }
    assert_eq!(upstream.calls(), calls + 2);
    let rejected = r#"llm_dedup_redis_rejected_total{kind="entry"}"#;
    assert!(common::figure(&b.engine, rejected).await >= 2.0);
    a.stop().await;
    b.stop().await;
}

/// A malformed value under a hot key (bytes that are no entry, a value of another type under
/// its entry or its lease) is a miss for that key only: Redis stays on, and the replica's
/// other requests still find their answers there.
#[tokio::test]
async fn a_malformed_value_under_a_hot_key_leaves_redis_on() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = FakeUpstream::start().await;
    let a = replica(&upstream, &redis, None).await;
    let c = client();
    let hot = post(&c, &a.url("/v1/chat/completions"), chat("hot"), &[]).await;
    let cold = post(&c, &a.url("/v1/chat/completions"), chat("cold"), &[]).await;
    let key = llm_dedup::CacheKey::from_hex(hot.key.as_deref().expect("key")).expect("key");
    let layout = llm_dedup::unstable::FleetLayout::default();
    let (entry, lease) = (layout.entry(&key), layout.lease(&key));
    for plant in [
        format!("SET {entry} garbage"),
        format!("HSET {entry} field value"),
        format!("HSET {lease} field value"),
    ] {
        let _ = redis.command(&format!("DEL {entry} {lease}"));
        let planted = redis.command(&plant);
        assert!(!planted.starts_with('-'), "{plant}: {planted}");
        // A replica that holds nothing of its own yet reads the hot key: a miss, not a fault.
        let b = replica(&upstream, &redis, None).await;
        let seen = post(&c, &b.url("/v1/chat/completions"), chat("hot"), &[]).await;
        assert_eq!((seen.status, seen.cache.as_str()), (200, "miss"), "{plant}");
        let malformed = r#"llm_dedup_redis_rejected_total{kind="malformed"}"#;
        assert!(common::figure(&b.engine, malformed).await >= 1.0, "{plant}");
        let seen = post(&c, &b.url("/v1/chat/completions"), chat("cold"), &[]).await;
        assert_eq!(
            seen.cache, "hit",
            "{plant}: Redis is still on for other keys"
        );
        assert_eq!(seen.body["id"], cold.body["id"]);
        let errors = common::figure(&b.engine, "llm_dedup_redis_errors_total").await;
        assert_eq!(errors, 0.0, "{plant}");
        b.stop().await;
    }
    a.stop().await;
}

/// A lease planted under a key (nobody of the fleet calls): a replica with the secret calls at
/// once instead of waiting on it.
#[tokio::test]
async fn a_planted_lease_holds_no_request() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = FakeUpstream::start().await;
    let a = replica(&upstream, &redis, Some(ours())).await;
    let c = client();
    let stored = post(&c, &a.url("/v1/chat/completions"), chat("leased"), &[]).await;
    let key = llm_dedup::CacheKey::from_hex(stored.key.as_deref().expect("key")).expect("key");
    let layout = llm_dedup::unstable::FleetLayout::default();
    let planted = redis.command(&format!(
        "EVAL \"redis.call('DEL', KEYS[1]) return redis.call('SET', KEYS[2], 'someone', 'PX', 600000)\" 2 {} {}",
        layout.entry(&key),
        layout.lease(&key)
    ));
    assert!(planted.starts_with("+OK"), "{planted}");
    let b = replica(&upstream, &redis, Some(ours())).await;
    let seen = tokio::time::timeout(
        Duration::from_secs(30),
        post(&c, &b.url("/v1/chat/completions"), chat("leased"), &[]),
    )
    .await
    .expect("not held by the planted lease");
    assert_eq!((seen.status, seen.cache.as_str()), (200, "miss"));
    let rejected = r#"llm_dedup_redis_rejected_total{kind="lease"}"#;
    assert!(common::figure(&b.engine, rejected).await >= 1.0);
    a.stop().await;
    b.stop().await;
}
