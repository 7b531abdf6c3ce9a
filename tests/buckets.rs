//! Buckets: several answers under one key for sampled requests, filled, then served at
//! random; through every tier (memory, SQLite, the fleet's Redis), the inspector, export and
//! import, purge, counters and streams.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use common::fleet::{SECRET, member, stop_clean};
use common::{FakeUpstream, Proxy, RedisServer, Seen, client, post, run_cli};
use serde_json::{Value, json};

const CHAT: &str = "/v1/chat/completions";

/// A sampled chat request (no `temperature`: the provider's default, 1).
fn sampled(content: &str) -> String {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}).to_string()
}

/// A chat request with this `temperature`.
fn at_temperature(content: &str, temperature: f64) -> String {
    json!({"model": "gpt-4o-mini", "temperature": temperature,
           "messages": [{"role": "user", "content": content}]})
    .to_string()
}

/// The assistant's text in a chat answer.
fn text(seen: &Seen) -> String {
    seen.body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no answer text in {}", seen.body))
        .to_owned()
}

/// The `llm-dedup-bucket` response header.
fn place(seen: &Seen) -> Option<String> {
    seen.headers
        .get("llm-dedup-bucket")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The count of answers with this cache outcome in the engine's metrics.
async fn answered(proxy: &Proxy, cache: &str) -> f64 {
    let text = proxy.engine.metrics_text().await;
    text.lines()
        .filter(|l| l.starts_with("llm_dedup_requests_total{") && l.contains(cache))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// Sends `n` identical sampled requests about `content` into a bucket of `size` at once,
/// their calls held until all of them wait (so all are in flight together); their answers.
async fn all_at_once(
    proxy: &Proxy,
    upstream: &FakeUpstream,
    n: usize,
    content: &'static str,
    size: &'static str,
) -> Vec<Seen> {
    upstream.behave(|b| b.hold = true);
    let (c, url) = (client(), proxy.url(CHAT));
    let launched: Vec<_> = (0..n)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move {
                post(&c, &url, sampled(content), &[("llm-dedup-bucket", size)]).await
            })
        })
        .collect();
    common::waiting(&proxy.engine, n).await;
    release(upstream);
    let mut answers = Vec::new();
    for task in launched {
        let seen = task.await.expect("answered");
        assert_eq!(seen.status, 200);
        answers.push(seen);
    }
    answers
}

/// Lets the fake answer what it holds, and answer later calls at once.
fn release(upstream: &FakeUpstream) {
    upstream.behave(|b| b.hold = false);
    upstream.state.release.notify_waiters();
}

fn cli_json(args: &[&str]) -> Value {
    let (code, out, err) = run_cli(args);
    assert_eq!(code, 0, "{args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

fn arg(path: &Path) -> &str {
    path.to_str().expect("utf8 path")
}

#[tokio::test]
async fn nine_requests_into_a_bucket_of_three_make_three_calls_and_vary() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let bucket = [("llm-dedup-bucket", "3")];
    let mut fetched = Vec::new();
    for i in 1..=3 {
        let seen = post(&c, &proxy.url(CHAT), sampled("a poem"), &bucket).await;
        assert_eq!((seen.status, seen.cache.as_str()), (200, "miss"), "{i}");
        assert_eq!(place(&seen).as_deref(), Some(&*format!("{i}/3")));
        fetched.push(text(&seen));
    }
    assert_eq!(upstream.calls(), 3);
    let distinct: HashSet<&String> = fetched.iter().collect();
    assert_eq!(distinct.len(), 3, "{fetched:?}");
    let mut served = Vec::new();
    for _ in 0..6 {
        let seen = post(&c, &proxy.url(CHAT), sampled("a poem"), &bucket).await;
        assert_eq!(seen.cache, "hit");
        let answer = text(&seen);
        // The header names the answer served.
        let at: usize = place(&seen).expect("a place")[..1]
            .parse()
            .expect("a number");
        assert_eq!(answer, fetched[at - 1]);
        served.push(answer);
    }
    assert_eq!(upstream.calls(), 3, "a full bucket makes no call");
    assert!(
        served.iter().collect::<HashSet<_>>().len() > 1,
        "six repeats all got {:?}",
        served[0]
    );
    // A hit from a bucket is a hit.
    assert_eq!(answered(&proxy, "cache=\"hit\"").await, 6.0);
    assert_eq!(answered(&proxy, "cache=\"miss\"").await, 3.0);
    proxy.stop().await;
}

#[tokio::test]
async fn concurrent_requests_fetch_what_is_missing_and_coalesce_beyond() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    // Three into an empty bucket of three: three calls, three answers.
    let answers = all_at_once(&proxy, &upstream, 3, "a name", "3").await;
    let texts: HashSet<String> = answers.iter().map(text).collect();
    assert!(answers.iter().all(|seen| seen.cache == "miss"));
    assert_eq!((upstream.calls(), texts.len()), (3, 3), "{texts:?}");

    // Six into an empty bucket of two: two calls, the four others join them.
    let answers = all_at_once(&proxy, &upstream, 6, "a colour", "2").await;
    let texts: HashSet<String> = answers.iter().map(text).collect();
    let mut caches: Vec<&str> = answers.iter().map(|seen| seen.cache.as_str()).collect();
    assert_eq!(upstream.calls(), 5, "{caches:?}");
    assert_eq!(texts.len(), 2, "{texts:?}");
    caches.sort();
    assert_eq!(
        caches,
        [
            "coalesced",
            "coalesced",
            "coalesced",
            "coalesced",
            "miss",
            "miss"
        ]
    );
    proxy.stop().await;
}

#[tokio::test]
async fn without_a_bucket_sampled_repeats_share_one_answer() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let first = post(&c, &proxy.url(CHAT), sampled("a joke"), &[]).await;
    for _ in 0..3 {
        let seen = post(&c, &proxy.url(CHAT), sampled("a joke"), &[]).await;
        assert_eq!((seen.cache.as_str(), text(&seen)), ("hit", text(&first)));
        assert_eq!(place(&seen), None);
    }
    assert_eq!(upstream.calls(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn the_flag_applies_to_sampled_requests_only_and_a_header_overrides_it() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::start(upstream.engine().bucket(3)).await;
    let c = client();
    for _ in 0..4 {
        let seen = post(&c, &proxy.url(CHAT), at_temperature("exact", 0.0), &[]).await;
        assert_eq!(seen.status, 200);
        assert_eq!(place(&seen), None, "temperature 0 is no sample");
    }
    assert_eq!(upstream.calls(), 1, "temperature 0 keeps one answer");

    for _ in 0..4 {
        post(&c, &proxy.url(CHAT), at_temperature("warm", 0.9), &[]).await;
    }
    assert_eq!(
        upstream.calls(),
        4,
        "three answers for a sampled request, then hits"
    );

    // A header of 1 asks for one answer, even of a sampled request; its bytes then must
    // not lead a request without the header past its bucket.
    let one = [("llm-dedup-bucket", "1")];
    let first = post(&c, &proxy.url(CHAT), sampled("one"), &one).await;
    let again = post(&c, &proxy.url(CHAT), sampled("one"), &one).await;
    assert_eq!((again.cache.as_str(), text(&again)), ("hit", text(&first)));
    assert_eq!(upstream.calls(), 5);
    let bucketed = post(&c, &proxy.url(CHAT), sampled("one"), &[]).await;
    assert_eq!(
        (bucketed.cache.as_str(), place(&bucketed).as_deref()),
        ("miss", Some("2/3")),
        "--bucket 3 fills the rest of the bucket"
    );
    // A header asks for a bucket of a request that does not sample.
    for _ in 0..2 {
        post(
            &c,
            &proxy.url(CHAT),
            at_temperature("asked", 0.0),
            &[("llm-dedup-bucket", "2")],
        )
        .await;
    }
    assert_eq!(upstream.calls(), 8);
    proxy.stop().await;
}

#[tokio::test]
async fn a_bad_bucket_header_is_refused_naming_it() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    for bad in ["0", "21", "-1", "two", "1.5"] {
        let seen = post(
            &c,
            &proxy.url(CHAT),
            sampled("x"),
            &[("llm-dedup-bucket", bad)],
        )
        .await;
        assert_eq!(seen.status, 400, "{bad}");
        let message = seen.body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("llm-dedup-bucket"), "{bad}: {message}");
    }
    assert_eq!(upstream.calls(), 0);
    // An engine is refused a bucket it cannot hold.
    let refused = upstream.engine().bucket(21).build();
    assert!(refused.is_err());
    let refused = upstream.engine().bucket(0).build();
    assert!(refused.is_err());
    let (code, _, err) = run_cli(&["serve", "--bucket", "21"]);
    assert_ne!(code, 0);
    assert!(err.contains("--bucket"), "{err}");
    proxy.stop().await;
}

#[tokio::test]
async fn embeddings_keep_one_answer_whatever_the_bucket() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::start(upstream.engine().bucket(3)).await;
    let c = client();
    let body = json!({"model": "text-embedding-3-small", "input": "same words"}).to_string();
    for _ in 0..3 {
        let seen = post(
            &c,
            &proxy.url("/v1/embeddings"),
            body.clone(),
            &[("llm-dedup-bucket", "3")],
        )
        .await;
        assert_eq!(seen.status, 200);
        assert_eq!(place(&seen), None);
    }
    assert_eq!(upstream.calls(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn each_streamed_answer_of_a_bucket_replays_byte_for_byte() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let body = json!({"model": "gpt-4o-mini", "stream": true,
                      "messages": [{"role": "user", "content": "a haiku"}]})
    .to_string();
    let bucket = [("llm-dedup-bucket", "2")];
    let mut fetched = Vec::new();
    for _ in 0..2 {
        let seen = post(&c, &proxy.url(CHAT), body.clone(), &bucket).await;
        assert_eq!(seen.cache, "miss");
        fetched.push(seen.raw);
    }
    assert_ne!(fetched[0], fetched[1]);
    assert!(fetched[0].ends_with(b"data: [DONE]\n\n"));
    let mut replayed = HashSet::new();
    for _ in 0..6 {
        let seen = post(&c, &proxy.url(CHAT), body.clone(), &bucket).await;
        assert_eq!(seen.cache, "hit");
        assert!(fetched.contains(&seen.raw), "a replay is one stream, whole");
        replayed.insert(seen.raw);
    }
    assert_eq!(replayed.len(), 2);
    assert_eq!(upstream.calls(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn each_answer_lives_its_own_time() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let short = [("llm-dedup-bucket", "2"), ("llm-dedup-ttl", "1")];
    let long = [("llm-dedup-bucket", "2"), ("llm-dedup-ttl", "600")];
    post(&c, &proxy.url(CHAT), sampled("brief"), &short).await;
    post(&c, &proxy.url(CHAT), sampled("brief"), &long).await;
    assert_eq!(upstream.calls(), 2);
    // The first answer's second passes: the bucket holds one answer, and fills again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let seen = post(&c, &proxy.url(CHAT), sampled("brief"), &long).await;
    assert_eq!(
        (seen.cache.as_str(), place(&seen).as_deref()),
        ("miss", Some("1/2"))
    );
    assert_eq!(upstream.calls(), 3);
    proxy.stop().await;
}

#[tokio::test]
async fn a_bucket_survives_a_restart_lists_shows_exports_and_purges_whole() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("cache.db");
    let c = client();
    let bucket = [("llm-dedup-bucket", "3")];
    let proxy = Proxy::with_db(&upstream, &db).await;
    let mut fetched = HashSet::new();
    let mut key = None;
    for _ in 0..3 {
        let seen = post(&c, &proxy.url(CHAT), sampled("a story"), &bucket).await;
        fetched.insert(text(&seen));
        // Every answer of a bucket names the request's key: the one `show` and `purge` take.
        assert!(
            key.is_none() || key == seen.key,
            "{:?} then {:?}",
            key,
            seen.key
        );
        key = seen.key.clone();
    }
    // An ordinary entry beside it.
    post(&c, &proxy.url(CHAT), sampled("plain"), &[]).await;
    proxy.stop().await;
    let key = key.expect("the first answer's key");

    // A restart serves the bucket from disk.
    let proxy = Proxy::with_db(&upstream, &db).await;
    let mut served = HashSet::new();
    for _ in 0..6 {
        let seen = post(&c, &proxy.url(CHAT), sampled("a story"), &bucket).await;
        assert_eq!(seen.cache, "hit");
        served.insert(text(&seen));
    }
    assert_eq!(upstream.calls(), 4);
    assert!(served.is_subset(&fetched) && served.len() > 1, "{served:?}");
    proxy.stop().await;

    // `list`: one row a key, saying how full; `show`: each answer.
    let listed = cli_json(&["list", "--db", arg(&db), "--json"]);
    let rows = listed.as_array().expect("rows");
    assert_eq!(rows.len(), 2, "{listed}");
    let row = rows
        .iter()
        .find(|r| r["key"] == key)
        .expect("the bucket's row");
    assert_eq!(row["answers"], 3, "{row}");
    let shown = cli_json(&["show", "--db", arg(&db), &key[..12], "--json"]);
    let others = shown["other_answers"].as_array().expect("other answers");
    assert_eq!(others.len(), 2, "{shown}");
    let slots: Vec<&Value> = others.iter().map(|o| &o["slot"]).collect();
    assert_eq!(slots, [&json!(1), &json!(2)]);
    assert!(others.iter().all(|o| o["bucket_of"] == key));
    let (code, out, err) = run_cli(&["show", "--db", arg(&db), &key[..12]]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("answer     3 of 3 in its bucket"), "{out}");

    // Export and import carry every answer, in its place.
    let export = dir.path().join("out.jsonl");
    let (code, _, err) = run_cli(&["export", "--db", arg(&db), "--output", arg(&export)]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("exported 4 entries"), "{err}");
    let copy = dir.path().join("copy.db");
    let report = cli_json(&[
        "import",
        "--db",
        arg(&copy),
        "--input",
        arg(&export),
        "--json",
    ]);
    assert_eq!(report["imported"], 4, "{report}");
    let proxy = Proxy::with_db(&upstream, &copy).await;
    for _ in 0..3 {
        let seen = post(&c, &proxy.url(CHAT), sampled("a story"), &bucket).await;
        assert_eq!(seen.cache, "hit");
    }
    assert_eq!(upstream.calls(), 4);
    proxy.stop().await;

    // An answer moved under a key that is not its place's is refused.
    let lines = std::fs::read_to_string(&export).expect("export");
    let mut forged: Vec<String> = Vec::new();
    for line in lines.lines() {
        let mut entry: Value = serde_json::from_str(line).expect("json");
        if entry["slot"] == 2 {
            entry["slot"] = json!(3);
        }
        forged.push(entry.to_string());
    }
    let forged_file = dir.path().join("forged.jsonl");
    std::fs::write(&forged_file, forged.join("\n")).expect("write");
    let (code, _, err) = run_cli(&[
        "import",
        "--db",
        arg(&dir.path().join("other.db")),
        "--input",
        arg(&forged_file),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("is not the key of answer 3"), "{err}");

    // A purge of the key removes every answer of its bucket, and nothing else.
    let removed = cli_json(&["purge", "--db", arg(&db), "--key", &key, "--json"]);
    assert_eq!(removed.as_array().map(Vec::len), Some(3), "{removed}");
    let listed = cli_json(&["list", "--db", arg(&db), "--json"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    let proxy = Proxy::with_db(&upstream, &db).await;
    let seen = post(&c, &proxy.url(CHAT), sampled("a story"), &bucket).await;
    assert_eq!(
        (seen.cache.as_str(), place(&seen).as_deref()),
        ("miss", Some("1/3"))
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_purge_while_running_empties_the_bucket_in_memory_too() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("cache.db");
    let c = client();
    let bucket = [("llm-dedup-bucket", "2")];
    let proxy = Proxy::with_db(&upstream, &db).await;
    let mut key = None;
    for _ in 0..2 {
        let seen = post(&c, &proxy.url(CHAT), sampled("live"), &bucket).await;
        key = key.or(seen.key);
    }
    proxy.engine.flush().await.expect("flushed");
    let key = key.expect("key");
    let (code, _, err) = run_cli(&["purge", "--db", arg(&db), "--key", &key, "--yes"]);
    assert_eq!(code, 0, "{err}");
    common::eventually_async(|| async {
        let seen = post(
            &c,
            &proxy.url(CHAT),
            sampled("live"),
            &[
                ("llm-dedup-bucket", "2"),
                ("cache-control", "only-if-cached"),
            ],
        )
        .await;
        seen.status == 504
    })
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn replicas_of_a_fleet_fill_and_share_one_bucket() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let url = redis.url();
    let upstream = FakeUpstream::start().await;
    let fleet = vec![
        Proxy::advertised(member(&upstream, &url)).await,
        Proxy::advertised(member(&upstream, &url)).await,
    ];
    let c = client();
    let bucket = [("llm-dedup-bucket", "3")];
    // Each replica adds what the bucket misses, and reads what the other added: three
    // answers in all, never more.
    for replica in fleet.iter().chain(&fleet).chain(&fleet) {
        let seen = post(&c, &replica.url(CHAT), sampled("shared"), &bucket).await;
        assert_eq!(seen.status, 200);
    }
    assert_eq!(upstream.calls(), 3);
    for replica in &fleet {
        for _ in 0..3 {
            let seen = post(&c, &replica.url(CHAT), sampled("shared"), &bucket).await;
            assert_eq!(seen.cache, "hit");
        }
    }
    assert_eq!(upstream.calls(), 3);

    let listed = cli_json(&["list", "--redis", &url, "--fleet-secret", SECRET, "--json"]);
    assert_eq!(listed[0]["answers"], 3, "{listed}");
    let key = listed[0]["key"].as_str().expect("key").to_owned();
    let shown = cli_json(&[
        "show",
        "--redis",
        &url,
        "--fleet-secret",
        SECRET,
        &key,
        "--json",
    ]);
    assert_eq!(shown["other_answers"].as_array().map(Vec::len), Some(2));
    let removed = cli_json(&[
        "purge",
        "--redis",
        &url,
        "--fleet-secret",
        SECRET,
        "--key",
        &key,
        "--json",
    ]);
    assert_eq!(removed.as_array().map(Vec::len), Some(3), "{removed}");
    // Every replica drops every answer of the bucket.
    common::eventually_async(|| async {
        let mut empty = 0;
        for replica in &fleet {
            let seen = post(
                &c,
                &replica.url(CHAT),
                sampled("shared"),
                &[
                    ("llm-dedup-bucket", "3"),
                    ("cache-control", "only-if-cached"),
                ],
            )
            .await;
            empty += usize::from(seen.status == 504);
        }
        empty == fleet.len()
    })
    .await;
    stop_clean(fleet).await;
}

#[tokio::test]
async fn a_bucket_whose_first_answer_is_gone_is_still_listed_shown_and_purged() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("cache.db");
    let c = client();
    let proxy = Proxy::with_db(&upstream, &db).await;
    let first = post(
        &c,
        &proxy.url(CHAT),
        sampled("fleeting"),
        &[("llm-dedup-bucket", "3"), ("llm-dedup-ttl", "1")],
    )
    .await;
    for _ in 0..2 {
        post(
            &c,
            &proxy.url(CHAT),
            sampled("fleeting"),
            &[("llm-dedup-bucket", "3")],
        )
        .await;
    }
    proxy.stop().await;
    let key = first.key.expect("key");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let removed = cli_json(&["purge", "--db", arg(&db), "--expired", "--json"]);
    assert_eq!(removed.as_array().map(Vec::len), Some(1), "{removed}");

    let listed = cli_json(&["list", "--db", arg(&db), "--json"]);
    assert_eq!(listed[0]["key"], key.as_str(), "{listed}");
    assert_eq!(listed[0]["answers"], 2, "{listed}");
    let shown = cli_json(&["show", "--db", arg(&db), &key[..12], "--json"]);
    assert_eq!(shown["slot"], 1, "{shown}");
    assert_eq!(shown["other_answers"].as_array().map(Vec::len), Some(1));
    let removed = cli_json(&["purge", "--db", arg(&db), "--key", &key[..12], "--json"]);
    assert_eq!(removed.as_array().map(Vec::len), Some(2), "{removed}");
    let listed = cli_json(&["list", "--db", arg(&db), "--json"]);
    assert_eq!(listed, json!([]));
}

#[tokio::test]
async fn a_refresh_takes_an_empty_place_and_max_age_counts_only_young_answers() {
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::over(&upstream).await;
    let c = client();
    let bucket = [("llm-dedup-bucket", "2")];
    post(&c, &proxy.url(CHAT), sampled("fresh"), &bucket).await;
    let refreshed = post(
        &c,
        &proxy.url(CHAT),
        sampled("fresh"),
        &[("llm-dedup-bucket", "2"), ("cache-control", "no-cache")],
    )
    .await;
    assert_eq!(
        (refreshed.cache.as_str(), place(&refreshed).as_deref()),
        ("miss", Some("2/2"))
    );
    assert_eq!(upstream.calls(), 2);
    // Full: repeats are hits; one asking for answers younger than they are fetches anew.
    let seen = post(&c, &proxy.url(CHAT), sampled("fresh"), &bucket).await;
    assert_eq!(seen.cache, "hit");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let young = post(
        &c,
        &proxy.url(CHAT),
        sampled("fresh"),
        &[("llm-dedup-bucket", "2"), ("cache-control", "max-age=1")],
    )
    .await;
    assert_eq!(young.cache, "miss");
    assert_eq!(upstream.calls(), 3);
    proxy.stop().await;
}
