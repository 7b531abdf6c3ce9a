//! Several replicas on one real Redis: shared answers, one upstream call per request across
//! the fleet, replaced answers forgotten everywhere, and Redis faults that fail no request.
//!
//! Each test starts its own `redis-server` on a free loopback port (persistence off) and
//! skips, saying so, when it is not installed.

mod common;

use std::time::Duration;

use common::fleet::{
    self, answers, assert_spent_within_budget, launch, learn_budget, member, replicas, stop,
};
use common::{Behaviour, FakeUpstream, Proxy, RedisServer, chat, client, post};

/// The credential the tests' requests carry (as `common::post` sends it).
const KEY: &str = "Bearer sk-test-key-1";

/// The name of the lease on the cache key `key` (64 hex digits) in the fleet's Redis.
fn lease_of(key: &str) -> String {
    let key = llm_dedup::CacheKey::from_hex(key).expect("a cache key");
    llm_dedup::unstable::FleetLayout::default().lease(&key)
}

/// The value of a counter in Prometheus text.
fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn an_answer_from_one_replica_is_a_hit_on_another() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    fleet::an_answer_is_a_hit_everywhere(&redis.url()).await;
}

#[tokio::test]
async fn identical_requests_on_three_replicas_make_one_upstream_call() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    fleet::identical_requests_make_one_call(&redis.url()).await;
}

/// An error answer reaches the followers of the same credential on other replicas, and is
/// never stored.
#[tokio::test]
async fn an_error_reaches_followers_on_other_replicas_and_is_not_stored() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = FakeUpstream::start().await;
    upstream.behave(|b| {
        b.refused_keys.push("Bearer sk-test-key-1".to_owned());
        b.delay = Duration::from_millis(500);
    });
    let fleet = replicas(&upstream, &redis.url()).await;
    let c = client();
    let calls = launch(&fleet, 6, |_| "refused".to_owned());
    for answer in answers(calls).await {
        assert_eq!(answer.status, 401);
        assert_eq!(answer.body["error"]["code"], "invalid_api_key");
    }
    assert_eq!(upstream.calls(), 1);
    upstream.behave(|b| b.refused_keys.clear());
    let later = post(
        &c,
        &fleet[1].url("/v1/chat/completions"),
        chat("refused"),
        &[],
    )
    .await;
    assert_eq!((later.status, later.cache.as_str()), (200, "miss"));
    stop(fleet).await;
}

/// A `no-cache` refresh on one replica replaces the answer everywhere: the others stop
/// serving the copy they hold in memory.
#[tokio::test]
async fn a_refresh_on_one_replica_reaches_the_others() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = FakeUpstream::start().await;
    let fleet = replicas(&upstream, &redis.url()).await;
    let c = client();
    let old = post(&c, &fleet[0].url("/v1/chat/completions"), chat("news"), &[]).await;
    let held = post(&c, &fleet[1].url("/v1/chat/completions"), chat("news"), &[]).await;
    assert_eq!((held.cache.as_str(), &held.body), ("hit", &old.body));
    let new = post(
        &c,
        &fleet[0].url("/v1/chat/completions"),
        chat("news"),
        &[("cache-control", "no-cache")],
    )
    .await;
    assert_ne!(new.body, old.body);
    // The other replica serves the new answer within a second.
    common::eventually_async(|| async {
        let now = post(&c, &fleet[1].url("/v1/chat/completions"), chat("news"), &[]).await;
        now.body == new.body
    })
    .await;
    let seen = post(&c, &fleet[1].url("/v1/chat/completions"), chat("news"), &[]).await;
    assert_eq!(seen.cache, "hit");
    assert_eq!(upstream.calls(), 2);
    stop(fleet).await;
}

/// A leader that died holds its lease no longer than the lease lasts: a waiter takes over.
#[tokio::test]
async fn a_lease_left_by_a_dead_leader_is_taken_over() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = FakeUpstream::start().await;
    let c = client();
    // With a shared cache the key holds no credential, so any engine computes it.
    let plain = Proxy::start(upstream.engine().shared_cache(true)).await;
    let key = post(&c, &plain.url("/v1/chat/completions"), chat("orphan"), &[])
        .await
        .key
        .expect("key");
    plain.stop().await;
    let replica = Proxy::start(upstream.engine().shared_cache(true).redis(redis.url())).await;
    // The caller's key is verified first (an unverified one makes its own call anyway).
    let warm = post(&c, &replica.url("/v1/chat/completions"), chat("warm"), &[]).await;
    assert_eq!(warm.status, 200);
    let calls = upstream.calls();
    let reply = redis.command(&format!("SET {} ghost PX 1500", lease_of(&key)));
    assert!(reply.starts_with("+OK"), "{reply}");
    let seen = post(
        &c,
        &replica.url("/v1/chat/completions"),
        chat("orphan"),
        &[],
    )
    .await;
    assert_eq!((seen.status, seen.cache.as_str()), (200, "miss"));
    assert_eq!(
        upstream.calls(),
        calls + 1,
        "the waiter made the call itself"
    );
    let left = redis.command(&format!("EXISTS {}", lease_of(&key)));
    assert!(
        left.starts_with(":0"),
        "the lease ends with the call: {left}"
    );
    replica.stop().await;
}

/// Redis killed, then restarted empty: no request fails, failures are counted, and sharing
/// resumes on its own.
#[tokio::test]
async fn redis_going_away_fails_no_request_and_sharing_resumes() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let port = redis.port;
    let upstream = FakeUpstream::start().await;
    let fleet = replicas(&upstream, &redis.url()).await;
    let c = client();
    assert_eq!(
        post(&c, &fleet[0].url("/v1/chat/completions"), chat("a"), &[])
            .await
            .status,
        200
    );
    redis.kill();
    for (i, replica) in fleet.iter().enumerate() {
        let seen = post(
            &c,
            &replica.url("/v1/chat/completions"),
            chat(&format!("b{i}")),
            &[],
        )
        .await;
        assert_eq!(seen.status, 200, "Redis down fails no request");
        let seen = post(&c, &replica.url("/v1/chat/completions"), chat("a"), &[]).await;
        assert_eq!(seen.status, 200);
    }
    let metrics = client()
        .get(fleet[1].url("/_llm-dedup/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        counter(&metrics, "llm_dedup_redis_errors_total") >= 1.0,
        "{metrics}"
    );

    let _restarted = RedisServer::on(port).expect("restart");
    // Sharing resumes once Redis is back (after the replicas' backoff).
    let attempt = std::sync::atomic::AtomicUsize::new(0);
    common::eventually_async(|| async {
        let n = attempt.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let prompt = chat(&format!("after {n}"));
        let first = post(
            &c,
            &fleet[0].url("/v1/chat/completions"),
            prompt.clone(),
            &[],
        )
        .await;
        let second = post(&c, &fleet[2].url("/v1/chat/completions"), prompt, &[]).await;
        assert_eq!((first.status, second.status), (200, 200));
        second.cache == "hit"
    })
    .await;
    stop(fleet).await;
}

/// The inspector reads the shared tier, and a purge through it reaches every replica within a
/// second: none serves the purged answer again.
#[tokio::test]
async fn the_inspector_reads_the_shared_tier_and_its_purge_reaches_every_replica() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    fleet::the_inspector_reads_and_purges_every_replica(&redis.url()).await;
}

/// Three replicas facing an upstream that allows 10 requests a second and says truthfully how
/// many remain: together they spend what remains and no more, so the upstream refuses almost
/// nothing and no client sees a 429.
#[tokio::test]
async fn replicas_share_the_upstreams_rate_budget() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = FakeUpstream::with(Behaviour {
        limit_per_sec: 10,
        ..Behaviour::default()
    })
    .await;
    let fleet = replicas(&upstream, &redis.url()).await;
    learn_budget(&fleet).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_spent_within_budget(&upstream, &fleet, 30, "distinct", 3).await;
    stop(fleet).await;
}

/// An upstream counting fixed one-second windows of 10 (on the wall clock's seconds), whose
/// headers say truthfully what remains and when the window ends, gives nothing back before a
/// window ends: the fleet spends each window's budget and no more. 60 distinct requests at
/// once over three replicas all succeed, and the upstream refuses at most 3. The fleet learns
/// the budget's shape and its windows from the answers themselves.
#[tokio::test]
async fn replicas_share_a_fixed_window_budget() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    fleet::replicas_share_a_window_budget(&redis.url()).await;
}

/// The fleet's pace (when its next turn comes), as the fleet's Redis holds it: it moves on
/// with each turn taken.
fn pace(redis: &RedisServer) -> String {
    redis.command(
        "EVAL \"local k = redis.call('KEYS', '*:rpm')[1] return k and redis.call('GET', k) or ''\" 0",
    )
}

/// Requests waiting for the fleet's budget (one a second, set with `--rpm 60`) on different
/// replicas reach the upstream in the order they arrived: the line is the fleet's, not each
/// replica's.
#[tokio::test]
async fn the_fleets_line_serves_requests_in_arrival_order() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = FakeUpstream::start().await;
    let settings = llm_dedup::GovernorSettings::default().rpm(Some(60));
    let mut fleet = Vec::new();
    for _ in 0..3 {
        let engine = upstream.engine().redis(redis.url()).governor(settings);
        fleet.push(Proxy::start(engine).await);
    }
    let c = client();
    let mut calls = Vec::new();
    for i in 0..6 {
        let (c, url) = (c.clone(), fleet[i % 3].url("/v1/chat/completions"));
        let body = chat(&format!("in line {i}"));
        let before = pace(&redis);
        calls.push(tokio::spawn(async move { post(&c, &url, body, &[]).await }));
        // The next is sent once this one has its turn in the fleet's line.
        common::eventually(|| pace(&redis) != before).await;
    }
    for seen in answers(calls).await {
        assert_eq!(seen.status, 200, "{}", seen.body);
    }
    let arrived: Vec<String> = upstream
        .state
        .bodies
        .lock()
        .expect("lock")
        .iter()
        .map(|body| {
            let body: serde_json::Value = serde_json::from_slice(body).expect("json");
            body["messages"][0]["content"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    let sent: Vec<String> = (0..6).map(|i| format!("in line {i}")).collect();
    assert_eq!(
        arrived, sent,
        "the upstream saw them in the order they arrived"
    );
    stop(fleet).await;
}

/// A paused Redis (a slow one: every call waits past its timeout): every client still gets
/// its answer, and nothing wrong is served.
#[tokio::test]
async fn a_slow_redis_fails_no_request() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = FakeUpstream::start().await;
    let fleet = replicas(&upstream, &redis.url()).await;
    let paused = redis.command("CLIENT PAUSE 3000 ALL");
    assert!(paused.starts_with("+OK"), "{paused}");
    let calls = launch(&fleet, 6, |_| "while slow".to_owned());
    for answer in answers(calls).await {
        assert_eq!(answer.status, 200);
        assert!(answer.body["choices"][0]["message"]["content"].is_string());
    }
    stop(fleet).await;
}

/// Redis killed while two replicas wait on a third's call: every client still gets its
/// answer, and nothing wrong is served.
#[tokio::test]
async fn a_dead_redis_mid_flight_fails_no_request() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = FakeUpstream::with(Behaviour {
        delay: Duration::from_millis(800),
        ..Behaviour::default()
    })
    .await;
    let fleet = replicas(&upstream, &redis.url()).await;
    let c = client();
    let first = {
        let (c, url) = (c.clone(), fleet[0].url("/v1/chat/completions"));
        tokio::spawn(async move { post(&c, &url, chat("mid-flight"), &[]).await })
    };
    // Replica 0 holds the call's lease before the others ask.
    common::eventually(|| !redis.command("KEYS *:lease:*").starts_with("*0")).await;
    let others = (1..3).map(|i| {
        let url = fleet[i].url("/v1/chat/completions");
        let c = c.clone();
        tokio::spawn(async move { post(&c, &url, chat("mid-flight"), &[]).await })
    });
    let others: Vec<_> = others.collect();
    for proxy in &fleet[1..] {
        common::waiting(&proxy.engine, 1).await;
    }
    redis.kill();
    let first = first.await.expect("first");
    assert_eq!(first.status, 200);
    for other in others {
        let other = other.await.expect("other");
        assert_eq!(other.status, 200, "{}", other.body);
        assert!(other.body["choices"][0]["message"]["content"].is_string());
    }
    stop(fleet).await;
}

/// A streamed answer one replica receives is shared live with identical requests on the
/// others: one upstream stream, the same events everywhere, the answer's own headers only.
#[tokio::test]
async fn a_stream_is_shared_live_across_replicas() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    fleet::a_stream_is_shared_live(&redis.url()).await;
}

/// Redis killed while followers on other replicas receive a stream through it: the leader's
/// client gets the whole stream, and every follower still gets the same whole stream (never
/// one cut short, never events of two streams mixed): their replicas read the rest from the
/// leader's, at the address it advertised, where the stream is still arriving.
#[tokio::test]
async fn redis_killed_mid_stream_cuts_no_stream() {
    stream_through_a_redis_fault(Fault::Killed).await;
}

/// Redis stalled (`CLIENT PAUSE`) while followers on other replicas receive a stream through
/// it, and the stream ends meanwhile: the followers' replicas give up on Redis once a read
/// times out, and read the stream back from the leader's (in flight there, or just stored);
/// every client gets it whole.
#[tokio::test]
async fn a_redis_stalled_mid_stream_cuts_no_stream() {
    stream_through_a_redis_fault(Fault::Stalled).await;
}

/// What happens to the fleet's Redis while followers on other replicas receive a stream.
enum Fault {
    /// Killed before the stream's end arrives.
    Killed,
    /// Stalled for 3 s, the stream ending meanwhile.
    Stalled,
}

/// A fake upstream whose streams send their first event at once and the rest once released.
async fn holding_upstream() -> FakeUpstream {
    FakeUpstream::with(Behaviour {
        hold: true,
        ..Behaviour::default()
    })
    .await
}

/// Waits until a stream's relay is in the fleet's Redis, so that replicas asked next follow it.
async fn relay_started(redis: &RedisServer) {
    common::eventually(|| !redis.command("KEYS *:s:*").starts_with("*0")).await;
}

async fn stream_through_a_redis_fault(fault: Fault) {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = holding_upstream().await;
    let fleet = replicas(&upstream, &redis.url()).await;
    let topic = "a story, interrupted";
    let leader = fleet::ask_stream(&fleet[0], topic, KEY).await;
    relay_started(&redis).await;
    let mut followers = Vec::new();
    for proxy in &fleet[1..] {
        followers.push(fleet::ask_stream(proxy, topic, KEY).await);
    }
    let _stalled = match fault {
        Fault::Killed => {
            redis.kill();
            None
        }
        Fault::Stalled => {
            let paused = redis.command("CLIENT PAUSE 3000 ALL");
            assert!(paused.starts_with("+OK"), "{paused}");
            Some(redis)
        }
    };
    upstream.state.release.notify_one();
    let leader = leader.await.expect("leader");
    assert!(leader.ends_with("data: [DONE]\n\n"), "{leader}");
    for follower in followers {
        let follower = follower.await.expect("follower");
        assert!(
            follower.ends_with("data: [DONE]\n\n"),
            "a whole stream: {follower}"
        );
        assert_eq!(follower, leader, "the leader's stream, each event once");
        // One stream's events: each chunk names one completion id.
        let ids: std::collections::HashSet<&str> = follower
            .split("\"id\":\"")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .collect();
        assert_eq!(ids.len(), 1, "events of one stream: {ids:?}");
    }
    assert_eq!(upstream.calls(), 1, "no call of their own");
    stop(fleet).await;
}

/// A replica whose Redis went away mid-stream asks the address the stream's leader
/// advertised for the rest. Misconfigured to name a replica that follows the stream itself
/// (here: the follower's own, as a load balancer's address could), that replica does not
/// join its own followed stream (each would wait on the other): the stream ends at once as
/// cut, with nothing spliced on, and nothing calls the upstream again.
#[tokio::test]
async fn a_stream_is_never_read_back_from_a_replica_that_only_follows_it() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = holding_upstream().await;
    let follower_side = Proxy::advertised(member(&upstream, &redis.url())).await;
    let misnamed = follower_side.url("");
    let leader_side = Proxy::start(member(&upstream, &redis.url()).advertise(misnamed)).await;
    let topic = "a story, misdirected";
    let leader = fleet::ask_stream(&leader_side, topic, KEY).await;
    relay_started(&redis).await;
    let follower = fleet::ask_stream(&follower_side, topic, KEY).await;
    redis.kill();
    // Before the upstream sends the rest: a follower waiting on itself would never end.
    let cut = tokio::time::timeout(Duration::from_secs(30), follower)
        .await
        .expect("the follower's stream ends instead of waiting on itself")
        .expect("follower");
    assert!(
        cut.starts_with("data: {"),
        "the events relayed so far: {cut}"
    );
    assert!(!cut.contains("[DONE]"), "nothing spliced on: {cut}");
    upstream.state.release.notify_one();
    assert!(leader.await.expect("leader").ends_with("data: [DONE]\n\n"));
    assert_eq!(upstream.calls(), 1);
    stop(vec![leader_side, follower_side]).await;
}

/// Redis killed while requests wait for the fleet's budget: they go on under each replica's
/// own governor, and every one succeeds.
#[tokio::test]
async fn requests_queued_for_the_fleets_budget_survive_redis_going_away() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = FakeUpstream::with(Behaviour {
        limit_per_sec: 10,
        ..Behaviour::default()
    })
    .await;
    let fleet = replicas(&upstream, &redis.url()).await;
    learn_budget(&fleet).await;
    let calls = launch(&fleet, 40, |i| format!("queued {i}"));
    common::eventually(|| fleet.iter().map(|p| p.engine.waiting()).sum::<usize>() == 40).await;
    redis.kill();
    for seen in answers(calls).await {
        assert_eq!(seen.status, 200, "{}", seen.body);
    }
    stop(fleet).await;
}

/// A stream that failed leaves its relay in Redis for a while; the next flight of the same
/// request must not hand that old failure to its followers on other replicas.
#[tokio::test]
async fn an_old_failed_stream_is_not_followed_by_the_next_flight() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = FakeUpstream::start().await;
    let fleet = replicas(&upstream, &redis.url()).await;
    let c = client();
    let streamed = serde_json::json!({"model": "gpt-4o-mini", "stream": true,
        "messages": [{"role": "user", "content": "again"}]})
    .to_string();
    upstream.behave(|b| b.stream_end = common::StreamEnd::ErrorEvent);
    let failed = post(
        &c,
        &fleet[0].url("/v1/chat/completions"),
        streamed.clone(),
        &[],
    )
    .await;
    assert_eq!(failed.status, 200);
    assert!(String::from_utf8_lossy(&failed.raw).contains("overloaded_error"));
    // The failed flight must be over, lease and all: a request arriving before that joins it
    // (and gets its failure), as coalescing intends.
    let key = failed.key.clone().expect("key");
    let lease = format!("EXISTS {}", lease_of(&key));
    common::eventually(|| {
        fleet[0].engine.in_flight() == 0 && redis.command(&lease).starts_with(":0")
    })
    .await;
    upstream.behave(|b| b.stream_end = common::StreamEnd::Complete);
    upstream.behave(|b| b.chunk_delay = Duration::from_millis(150));
    let calls = upstream.calls();
    let leader =
        fleet::post_in_background(&c, fleet[0].url("/v1/chat/completions"), streamed.clone());
    upstream.wait_for_calls(calls + 1).await;
    let follower = post(&c, &fleet[1].url("/v1/chat/completions"), streamed, &[]).await;
    let leader = leader.await.expect("leader");
    assert!(!String::from_utf8_lossy(&follower.raw).contains("overloaded_error"));
    assert_eq!(
        follower.raw, leader.raw,
        "the follower got this flight's stream"
    );
    stop(fleet).await;
}

/// `rediss://` speaks TLS (rustls) to a Redis that requires it, trusting the system's
/// certificate store (here a test CA named by `SSL_CERT_FILE`), and refuses a server whose
/// certificate it cannot trust, saying so. Skips without `openssl` or a `redis-server`
/// built with TLS.
#[test]
fn rediss_speaks_tls_and_checks_the_servers_certificate() {
    let Some(dir) = common::tls::certificates() else {
        return;
    };
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let port = common::free_port();
    let Ok(mut server) = std::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--tls-cert-file",
            &path("server.pem"),
            "--tls-key-file",
            &path("server.key"),
        ])
        .args([
            "--tls-ca-cert-file",
            &path("ca.pem"),
            "--tls-auth-clients",
            "no",
        ])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        RedisServer::missing_component("redis-server");
        return;
    };
    let listening = common::poll_blocking(Duration::from_secs(10), || {
        if server.try_wait().ok().flatten().is_some() {
            return Some(false);
        }
        std::net::TcpStream::connect(("127.0.0.1", port))
            .is_ok()
            .then_some(true)
    });
    if listening != Some(true) {
        let _ = server.kill();
        RedisServer::missing_component("redis-server (built with TLS)");
        return;
    }
    let url = format!("rediss://localhost:{port}");
    let stats = |ca: Option<String>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_llm-dedup"));
        cmd.args(["stats", "--redis", &url]);
        if let Some(ca) = ca {
            cmd.env("SSL_CERT_FILE", ca);
        }
        cmd.output().expect("run llm-dedup")
    };
    let trusted = stats(Some(path("ca.pem")));
    let untrusted = stats(None);
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        trusted.status.success(),
        "{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    assert!(String::from_utf8_lossy(&trusted.stdout).contains(&format!("localhost:{port}")));
    assert!(!untrusted.status.success());
    let said = String::from_utf8_lossy(&untrusted.stderr);
    assert!(said.contains("certificate"), "{said}");
}

/// A lease that shows nothing (no answer, no stream) is waited for no longer than a call of
/// one's own would take: here one planted in Redis, as by a replica that hangs or by someone
/// who can write to Redis. The request is answered by a call of its own replica.
#[tokio::test]
async fn a_lease_that_shows_nothing_is_waited_for_no_longer_than_a_call() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = FakeUpstream::start().await;
    let timeouts = llm_dedup::Timeouts::default().first_byte(Duration::from_secs(1));
    let proxy = Proxy::advertised(upstream.engine().redis(redis.url()).timeouts(timeouts)).await;
    let url = proxy.url("/v1/chat/completions");
    let c = client();
    // The request's key, from the proxy's own refusal under only-if-cached.
    let probe = post(
        &c,
        &url,
        chat("planted"),
        &[("cache-control", "only-if-cached")],
    )
    .await;
    assert_eq!(probe.status, 504);
    let message = probe.body["error"]["message"].as_str().unwrap_or("");
    let key = message
        .split_whitespace()
        .find(|w| w.len() == 64)
        .unwrap_or_else(|| panic!("no key in {message:?}"));
    let planted = format!("SET {} some-other-replica PX 600000", lease_of(key));
    assert!(redis.command(&planted).starts_with("+OK"));
    let started = std::time::Instant::now();
    let seen = post(&c, &url, chat("planted"), &[]).await;
    assert_eq!(seen.status, 200, "{}", seen.body);
    assert_eq!(upstream.calls(), 1, "the replica called on its own");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "waited {:?} on a lease that showed nothing",
        started.elapsed()
    );
    proxy.stop().await;
}
