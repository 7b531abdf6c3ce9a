//! What a fleet of three replicas does on a shared Redis, whether one node or a cluster:
//! the scenarios `tests/fleet.rs` runs on a single `redis-server` and `tests/cluster.rs` on
//! a three-master cluster, and the helpers they share.

#![allow(dead_code)]

use std::time::Duration;

use tokio::task::JoinHandle;

use super::{Behaviour, FakeUpstream, Proxy, Seen, chat, client, post};

/// The fleet tests' own secret.
pub const SECRET: &str = "the fleet tests' own secret";

/// A replica of a fleet with a secret (as production should run), in front of `upstream`, on
/// `redis`.
pub fn member(upstream: &FakeUpstream, url: &str) -> llm_dedup::DedupBuilder {
    let secret = llm_dedup::FleetSecret::new(SECRET).expect("secret");
    upstream.engine().redis(url).fleet_secret(secret)
}

/// Three replicas of the proxy in front of `upstream`, sharing `redis` and a fleet secret.
pub async fn replicas(upstream: &FakeUpstream, url: &str) -> Vec<Proxy> {
    let mut all = Vec::new();
    for _ in 0..3 {
        all.push(Proxy::advertised(member(upstream, url)).await);
    }
    all
}

/// Stops the replicas, once each has checked that no call to Redis failed (on a cluster: no
/// `CROSSSLOT`, no `MOVED` left unfollowed).
pub async fn stop_clean(replicas: Vec<Proxy>) {
    for proxy in &replicas {
        let errors = super::figure(&proxy.engine, "llm_dedup_redis_errors_total").await;
        assert_eq!(errors, 0.0, "Redis calls failed on {}", proxy.addr);
    }
    stop(replicas).await;
}

/// Asks `proxy` for a streamed chat answer about `topic` as the holder of `key`
/// (`Authorization`), and returns once its first event has arrived (the stream it leads or
/// follows is live and passing events on), with the task that reads the rest: all that
/// arrived (a stream cut short ends where it was cut). Waiting for the first event matters:
/// a follower's answer starts (its headers) before it has read anything from Redis, and a
/// fault made then would find nothing passed on yet.
pub async fn ask_stream(proxy: &Proxy, topic: &str, key: &str) -> JoinHandle<String> {
    stream_from(proxy, topic, key, true).await
}

/// As [`ask_stream`], returning as soon as the answer's headers are in (for a stream whose
/// events come only after what the test does next).
pub async fn ask_stream_headers(proxy: &Proxy, topic: &str, key: &str) -> JoinHandle<String> {
    stream_from(proxy, topic, key, false).await
}

async fn stream_from(proxy: &Proxy, topic: &str, key: &str, first: bool) -> JoinHandle<String> {
    let body = serde_json::json!({"model": "gpt-4o-mini", "stream": true,
        "messages": [{"role": "user", "content": topic}]})
    .to_string();
    let mut response = client()
        .post(proxy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("authorization", key)
        .body(body)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    let mut raw = Vec::new();
    if first && let Ok(Some(chunk)) = response.chunk().await {
        raw.extend_from_slice(&chunk);
    }
    tokio::spawn(async move {
        while let Ok(Some(chunk)) = response.chunk().await {
            raw.extend_from_slice(&chunk);
        }
        String::from_utf8_lossy(&raw).into_owned()
    })
}

/// Posts `body` to `url` in a task of its own.
pub fn post_in_background(c: &reqwest::Client, url: String, body: String) -> JoinHandle<Seen> {
    let c = c.clone();
    tokio::spawn(async move { post(&c, &url, body, &[]).await })
}

pub async fn stop(replicas: Vec<Proxy>) {
    for proxy in replicas {
        proxy.stop().await;
    }
}

/// Sends `n` chat requests at once, round-robin over the replicas, the `i`th asking
/// `prompt(i)`; each runs in a task of its own.
pub fn launch(
    fleet: &[Proxy],
    n: usize,
    prompt: impl Fn(usize) -> String,
) -> Vec<tokio::task::JoinHandle<Seen>> {
    let c = client();
    (0..n)
        .map(|i| {
            let (c, url, body) = (
                c.clone(),
                fleet[i % fleet.len()].url("/v1/chat/completions"),
                chat(&prompt(i)),
            );
            tokio::spawn(async move { post(&c, &url, body, &[]).await })
        })
        .collect()
}

/// The answers of requests [`launch`]ed, in order.
pub async fn answers(launched: Vec<tokio::task::JoinHandle<Seen>>) -> Vec<Seen> {
    let mut out = Vec::with_capacity(launched.len());
    for request in launched {
        out.push(request.await.expect("request"));
    }
    out
}

/// Each replica learns the upstream's budget with one answer.
pub async fn learn_budget(fleet: &[Proxy]) {
    let c = client();
    for (i, replica) in fleet.iter().enumerate() {
        let url = replica.url("/v1/chat/completions");
        let seen = post(&c, &url, chat(&format!("learn {i}")), &[]).await;
        assert_eq!(seen.status, 200);
    }
}

/// Sends `n` distinct requests at once over the fleet: every one succeeds, and the upstream
/// refuses at most `most` of the calls the fleet makes for them.
pub async fn assert_spent_within_budget(
    upstream: &FakeUpstream,
    fleet: &[Proxy],
    n: usize,
    what: &str,
    most: usize,
) {
    let refusals = || {
        upstream
            .state
            .refusals
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let before = refusals();
    let answers = answers(launch(fleet, n, |i| format!("{what} {i}"))).await;
    let ok = answers.iter().filter(|a| a.status == 200).count();
    let refused = refusals() - before;
    assert_eq!(ok, n, "every request succeeds");
    assert!(
        refused <= most,
        "the upstream refused {refused} calls of the fleet"
    );
}

pub async fn an_answer_is_a_hit_everywhere(url: &str) {
    let upstream = FakeUpstream::start().await;
    let fleet = replicas(&upstream, url).await;
    let c = client();
    let first = post(&c, &fleet[0].url("/v1/chat/completions"), chat("q"), &[]).await;
    assert_eq!(first.cache, "miss");
    for replica in &fleet[1..] {
        let seen = post(&c, &replica.url("/v1/chat/completions"), chat("q"), &[]).await;
        assert_eq!(seen.cache, "hit", "memory cold, answered from Redis");
        assert_eq!(seen.body, first.body);
        assert_eq!(seen.key, first.key, "every replica computes the same key");
    }
    assert_eq!(upstream.calls(), 1);
    stop_clean(fleet).await;
}

pub async fn identical_requests_make_one_call(url: &str) {
    let upstream = FakeUpstream::with(Behaviour {
        delay: Duration::from_millis(500),
        ..Behaviour::default()
    })
    .await;
    let fleet = replicas(&upstream, url).await;
    let calls = launch(&fleet, 60, |_| "the same question".to_owned());
    let answers = answers(calls).await;
    assert_eq!(upstream.calls(), 1, "one upstream call for the whole fleet");
    for answer in &answers {
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, answers[0].body);
    }
    stop_clean(fleet).await;
}

/// The inspector reads the shared tier, and a purge through it reaches every replica within a
/// second: none serves the purged answer again.
pub async fn the_inspector_reads_and_purges_every_replica(url: &str) {
    let upstream = FakeUpstream::start().await;
    let fleet = replicas(&upstream, url).await;
    let c = client();
    for prompt in ["one", "two"] {
        for replica in &fleet {
            let seen = post(&c, &replica.url("/v1/chat/completions"), chat(prompt), &[]).await;
            assert_eq!(seen.status, 200);
        }
    }
    assert_eq!(upstream.calls(), 2);
    let (code, out, err) =
        super::run_cli(&["stats", "--redis", url, "--fleet-secret", SECRET, "--json"]);
    assert_eq!(code, 0, "{err}");
    let stats: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(stats["entries"], 2, "{out}");
    assert_eq!(stats["by_model"][0]["name"], "gpt-4o-mini", "{out}");
    let (code, out, err) =
        super::run_cli(&["list", "--redis", url, "--fleet-secret", SECRET, "--json"]);
    assert_eq!(code, 0, "{err}");
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).expect("json");
    assert_eq!(listed.len(), 2);
    let key = listed[0]["key"].as_str().expect("key").to_owned();
    let (code, out, err) =
        super::run_cli(&["show", "--redis", url, "--fleet-secret", SECRET, &key[..10]]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("chat.completions"), "{out}");

    let (code, _, err) = super::run_cli(&[
        "purge",
        "--redis",
        url,
        "--fleet-secret",
        SECRET,
        "--all",
        "--yes",
    ]);
    assert_eq!(code, 0, "{err}");
    // Every replica drops the purged answer.
    super::eventually_async(|| async {
        let mut misses = 0;
        for replica in &fleet {
            let seen = post(
                &c,
                &replica.url("/v1/chat/completions"),
                chat("one"),
                &[("cache-control", "only-if-cached")],
            )
            .await;
            if seen.status == 504 {
                misses += 1;
            }
        }
        misses == fleet.len()
    })
    .await;
    let (code, _, err) = super::run_cli(&["export", "--redis", url]);
    assert_ne!(code, 0);
    assert!(err.contains("database file"), "{err}");
    stop_clean(fleet).await;
}

/// An upstream counting fixed one-second windows of 10 (on the wall clock's seconds), whose
/// headers say truthfully what remains and when the window ends, gives nothing back before a
/// window ends: the fleet spends each window's budget and no more. 60 distinct requests at
/// once over three replicas all succeed, and the upstream refuses at most 3. The fleet learns
/// the budget's shape and its windows from the answers themselves.
pub async fn replicas_share_a_window_budget(url: &str) {
    let upstream = FakeUpstream::with(Behaviour {
        limit_window: true,
        limit_per_sec: 10,
        ..Behaviour::default()
    })
    .await;
    let fleet = replicas(&upstream, url).await;
    assert_spent_within_budget(&upstream, &fleet, 60, "window", 3).await;
    stop_clean(fleet).await;
}

/// A streamed answer one replica receives is shared live with identical requests on the
/// others: one upstream stream, the same events everywhere, the answer's own headers only.
pub async fn a_stream_is_shared_live(url: &str) {
    let upstream = FakeUpstream::with(Behaviour {
        chunk_delay: Duration::from_millis(150),
        ..Behaviour::default()
    })
    .await;
    let fleet = replicas(&upstream, url).await;
    let c = client();
    let streamed = serde_json::json!({"model": "gpt-4o-mini", "stream": true,
        "messages": [{"role": "user", "content": "tell me a story"}]})
    .to_string();
    let leader = post_in_background(&c, fleet[0].url("/v1/chat/completions"), streamed.clone());
    upstream.wait_for_calls(1).await;
    let followers = (1..3)
        .map(|i| post_in_background(&c, fleet[i].url("/v1/chat/completions"), streamed.clone()));
    let followers: Vec<_> = followers.collect();
    let leader = leader.await.expect("leader");
    assert_eq!(leader.status, 200);
    for follower in followers {
        let follower = follower.await.expect("follower");
        assert_eq!(follower.status, 200);
        assert_eq!(follower.raw, leader.raw, "the same events, byte for byte");
        assert_ne!(
            follower.cache, "hit",
            "joined live, not replayed once stored"
        );
        assert!(!follower.headers.contains_key("set-cookie"));
        assert!(!follower.headers.contains_key("x-request-id"));
    }
    assert_eq!(upstream.calls(), 1, "one upstream stream for the fleet");
    // Stored once complete: a later request anywhere replays it.
    let later = post(&c, &fleet[2].url("/v1/chat/completions"), streamed, &[]).await;
    assert_eq!((later.cache.as_str(), &later.raw), ("hit", &leader.raw));
    stop_clean(fleet).await;
}
