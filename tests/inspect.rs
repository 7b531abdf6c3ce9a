//! The inspector subcommands and operator endpoints, on a database filled by a running proxy
//! through HTTP, as an operator would use them.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{FakeUpstream, Proxy, chat, client, post, run_cli};
use serde_json::{Value, json};

fn cli_json(args: &[&str]) -> Value {
    let (code, out, err) = run_cli(args);
    assert_eq!(code, 0, "{args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

fn db_arg(db: &Path) -> &str {
    db.to_str().expect("utf8 path")
}

/// A proxy on `db` that has answered: one chat request twice (miss, hit), one embedding
/// (miss), one stateful Responses request (bypass). Returns the proxy and the chat key.
async fn filled(upstream: &FakeUpstream, db: &Path) -> (Proxy, String) {
    let proxy = Proxy::with_db(upstream, db).await;
    let c = client();
    let first = post(
        &c,
        &proxy.url("/v1/chat/completions"),
        chat("inspect me"),
        &[],
    )
    .await;
    let again = post(
        &c,
        &proxy.url("/v1/chat/completions"),
        chat("inspect me"),
        &[],
    )
    .await;
    assert_eq!(
        (first.cache.as_str(), again.cache.as_str()),
        ("miss", "hit")
    );
    let emb = json!({"model": "text-embedding-3-small", "input": "x"}).to_string();
    post(&c, &proxy.url("/v1/embeddings"), emb, &[]).await;
    let stateful =
        json!({"model": "gpt-4o-mini", "input": "s", "previous_response_id": "resp_0"}).to_string();
    let r = post(&c, &proxy.url("/v1/responses"), stateful, &[]).await;
    assert_eq!(r.cache, "bypass");
    proxy.engine.flush().await.expect("flush");
    (proxy, first.key.expect("key"))
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_list_and_show_report_what_the_proxy_did() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("c.db");
    let (proxy, chat_key) = filled(&upstream, &db).await;
    let db = db_arg(&db);

    let stats = cli_json(&["stats", "--db", db, "--json"]);
    assert_eq!(stats["entries"], 2);
    let totals = &stats["totals"];
    assert_eq!(
        (
            &totals["requests"],
            &totals["hits"],
            &totals["misses"],
            &totals["bypasses"]
        ),
        (&json!(4), &json!(1), &json!(2), &json!(1))
    );
    assert_eq!(totals["upstream_calls"], 3);
    // The hit saved the chat answer's usage (9 prompt, 12 completion in the fake upstream).
    assert_eq!(
        (
            &totals["saved_prompt_tokens"],
            &totals["saved_completion_tokens"]
        ),
        (&json!(9), &json!(12))
    );
    let chat_route = stats["by_route"]
        .as_array()
        .expect("routes")
        .iter()
        .find(|g| g["name"] == "chat.completions")
        .expect("chat route");
    assert_eq!(
        (&chat_route["requests"], &chat_route["upstream_calls"]),
        (&json!(2), &json!(1))
    );
    // The proxy's endpoint serves the same document.
    let served: Value = serde_json::from_slice(
        &client()
            .get(proxy.url("/_llm-dedup/stats"))
            .send()
            .await
            .expect("sent")
            .bytes()
            .await
            .expect("body"),
    )
    .expect("json");
    assert_eq!(served["totals"], stats["totals"]);

    let listed = cli_json(&["list", "--db", db, "--json"]);
    assert_eq!(listed.as_array().expect("array").len(), 2);
    let chats = cli_json(&["list", "--db", db, "--json", "--route", "chat.completions"]);
    assert_eq!(chats[0]["key"], chat_key.as_str());
    assert_eq!(chats[0]["hit_count"], 1);
    let by_model = cli_json(&[
        "list",
        "--db",
        db,
        "--json",
        "--model",
        "text-embedding-3-small",
    ]);
    assert_eq!(by_model[0]["route"], "embeddings");
    let one = cli_json(&[
        "list", "--db", db, "--json", "--sort", "size", "--limit", "1",
    ]);
    assert_eq!(one.as_array().expect("array").len(), 1);
    let none = cli_json(&["list", "--db", db, "--json", "--older-than", "1h"]);
    assert_eq!(none, json!([]));

    let shown = cli_json(&["show", "--db", db, "--json", &chat_key[..10]]);
    assert_eq!(shown["key"], chat_key.as_str());
    let body: Value = serde_json::from_str(shown["body"].as_str().expect("text")).expect("json");
    assert_eq!(body["id"], "chatcmpl-1");
    // Human output names the parts an operator looks for.
    let (code, text, _) = run_cli(&["show", "--db", db, &chat_key[..10]]);
    assert_eq!(code, 0);
    assert!(text.contains("chat.completions") && text.contains("\"id\": \"chatcmpl-1\""));
    let (code, table, _) = run_cli(&["stats", "--db", db]);
    assert_eq!(code, 0);
    assert!(table.contains("By model") && table.contains("text-embedding-3-small"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_while_the_proxy_serves_takes_effect() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("c.db");
    let (proxy, chat_key) = filled(&upstream, &db).await;
    let dbs = db_arg(&db);

    let removed = cli_json(&["purge", "--db", dbs, "--json", "--key", &chat_key[..8]]);
    assert_eq!(removed[0]["key"], chat_key.as_str());
    assert_eq!(
        cli_json(&["list", "--db", dbs, "--json"])
            .as_array()
            .expect("a")
            .len(),
        1
    );

    // The serving proxy notices within a second or so and stops answering from memory.
    let c = client();
    // (A purged answer kept being served otherwise.)
    common::eventually_async(|| async {
        let seen = post(
            &c,
            &proxy.url("/v1/chat/completions"),
            chat("inspect me"),
            &[],
        )
        .await;
        seen.cache == "miss"
    })
    .await;

    let (code, out, _) = run_cli(&["purge", "--db", dbs, "--all", "--yes"]);
    assert_eq!(code, 0);
    assert!(out.contains("removed 2 entries"), "{out}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn export_then_import_into_an_empty_database_round_trips() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("source.db");
    let (proxy, chat_key) = filled(&upstream, &source).await;
    proxy.stop().await;
    let export = dir.path().join("cache.jsonl");
    let (code, _, err) = run_cli(&[
        "export",
        "--db",
        db_arg(&source),
        "--output",
        db_arg(&export),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("exported 2 entries"), "{err}");

    let target = dir.path().join("target.db");
    let args = [
        "import",
        "--db",
        db_arg(&target),
        "--input",
        db_arg(&export),
        "--json",
    ];
    let report = cli_json(&args);
    assert_eq!(
        (&report["imported"], &report["skipped"]),
        (&json!(2), &json!(0))
    );
    let again = cli_json(&args);
    assert_eq!(
        (&again["imported"], &again["skipped"]),
        (&json!(0), &json!(2))
    );
    let listed = cli_json(&["list", "--db", db_arg(&source), "--json"]);
    let keys: Vec<&str> = listed
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["key"].as_str().expect("key"))
        .collect();
    assert!(keys.contains(&chat_key.as_str()));
    for key in keys {
        let a = cli_json(&["show", "--db", db_arg(&source), "--json", key]);
        let b = cli_json(&["show", "--db", db_arg(&target), "--json", key]);
        assert_eq!(a, b, "entry {key} changed in the round trip");
    }

    // The salt moved with the entries: a proxy on the new database answers from it.
    let proxy = Proxy::with_db(&upstream, &target).await;
    let calls = upstream.calls();
    let r = post(
        &client(),
        &proxy.url("/v1/chat/completions"),
        chat("inspect me"),
        &[],
    )
    .await;
    assert_eq!((r.cache.as_str(), upstream.calls()), ("hit", calls));
    proxy.stop().await;

    // A malformed line stops the import with its number.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"not\": \"an entry\"}\n").expect("write");
    let (code, _, err) = run_cli(&["import", "--db", db_arg(&target), "--input", db_arg(&bad)]);
    assert_ne!(code, 0);
    assert!(err.contains("line 1"), "{err}");
}

#[test]
fn bad_input_gets_a_clear_message_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.db");
    let (code, _, err) = run_cli(&["stats", "--db", db_arg(&missing)]);
    assert_ne!(code, 0);
    assert!(err.contains("no cache database at"), "{err}");
    assert!(!missing.exists(), "stats must not create a database");

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a database, just notes\n".repeat(50)).expect("write");
    let (code, _, err) = run_cli(&["list", "--db", db_arg(&text)]);
    assert_ne!(code, 0);
    assert!(err.contains("not an SQLite database"), "{err}");

    let future = dir.path().join("future.db");
    let conn = rusqlite::Connection::open(&future).expect("create");
    conn.pragma_update(None, "user_version", 99)
        .expect("version");
    drop(conn);
    let (code, _, err) = run_cli(&["stats", "--db", db_arg(&future)]);
    assert_ne!(code, 0);
    assert!(err.contains("newer llm-dedup"), "{err}");

    // A real, empty database for the key and duration errors.
    let db = dir.path().join("c.db");
    llm_dedup::inspect::Inspector::create_or_open(&db).expect("create");
    let db = db_arg(&db);
    for (args, words) in [
        (vec!["show", "--db", db, "abcd"], "no entry with key abcd"),
        (vec!["show", "--db", db, "xyz!"], "is not a cache key"),
        (
            vec!["purge", "--db", db, "--older-than", "soon"],
            "--older-than",
        ),
        (vec!["purge", "--db", db], "required"),
        (vec!["list", "--db", db, "--sort", "color"], "--sort"),
    ] {
        let (code, _, err) = run_cli(&args);
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains(words), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ambiguous_key_prefix_is_refused_with_its_matches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("c.db");
    let export = dir.path().join("in.jsonl");
    let entry = |key: String| {
        export_line(&key, |e| {
            e["route"] = json!("embeddings");
            e["model"] = json!("e");
        })
    };
    let lines = [
        entry(format!("abcd1{}", "0".repeat(59))),
        entry(format!("abcd2{}", "0".repeat(59))),
    ];
    std::fs::write(&export, lines.join("\n")).expect("write");
    cli_json(&[
        "import",
        "--db",
        db_arg(&db),
        "--input",
        db_arg(&export),
        "--json",
    ]);
    let (code, _, err) = run_cli(&["show", "--db", db_arg(&db), "abcd"]);
    assert_ne!(code, 0);
    assert!(err.contains("ambiguous") && err.contains("abcd1"), "{err}");
    let shown = cli_json(&["show", "--db", db_arg(&db), "--json", "abcd2"]);
    assert_eq!(shown["route"], "embeddings");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_metrics_endpoint_serves_parseable_prometheus_text() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (proxy, _) = filled(&upstream, &dir.path().join("c.db")).await;
    let resp = client()
        .get(proxy.url("/_llm-dedup/metrics"))
        .send()
        .await
        .expect("sent");
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .contains("openmetrics-text")
    );
    let text = resp.text().await.expect("text");
    let mut samples = std::collections::HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line.rsplit_once(' ').expect("name and value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad sample {line:?}"));
        samples.insert(name.to_owned(), value);
    }
    let get = |name: &str| {
        samples
            .get(name)
            .copied()
            .unwrap_or_else(|| panic!("{name} in\n{text}"))
    };
    assert_eq!(
        get(r#"llm_dedup_requests_total{route="chat.completions",cache="hit"}"#),
        1.0
    );
    assert_eq!(
        get(r#"llm_dedup_requests_total{route="responses",cache="bypass"}"#),
        1.0
    );
    assert_eq!(
        get(r#"llm_dedup_upstream_calls_total{route="embeddings",status="2xx"}"#),
        1.0
    );
    assert_eq!(
        get(r#"llm_dedup_tokens_saved_total{kind="completion"}"#),
        12.0
    );
    assert_eq!(get("llm_dedup_memory_tier_entries"), 2.0);
    assert!(get("llm_dedup_memory_tier_bytes") > 0.0);
    assert_eq!(get("llm_dedup_in_flight"), 0.0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sweep_removes_expired_entries_and_keeps_the_size_bound() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("c.db");
    let proxy = Proxy::start(
        upstream
            .engine()
            .database(&db)
            .max_disk(Some(1_200))
            .sweep_interval(Duration::from_millis(500)),
    )
    .await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");
    for i in 0..4 {
        post(&c, &url, chat(&format!("keeper {i}")), &[]).await;
    }
    // Stored last, so that the size bound never picks it: whether a sweep runs before or after
    // it expires, it can only go as expired.
    post(&c, &url, chat("short-lived"), &[("llm-dedup-ttl", "1")]).await;
    // Entries are ~500 bytes: four keepers do not fit in 1,200; the oldest go first. The
    // expiry and the sweep run on the wall clock, so only real time can pass them.
    let mut stats = Value::Null;
    common::eventually(|| {
        stats = cli_json(&["stats", "--db", db_arg(&db), "--json"]);
        stats["evicted_expired"] == 1 && stats["evicted_for_size"].as_u64() >= Some(1)
    })
    .await;
    assert_eq!(stats["evicted_expired"], 1, "{stats}");
    assert!(
        stats["entry_bytes"].as_u64().expect("bytes") <= 1_200,
        "{stats}"
    );
    assert_eq!(stats["max_disk_bytes"], 1_200);
    let kept = cli_json(&["list", "--db", db_arg(&db), "--json"]);
    let newest = chat("keeper 3");
    assert!(!kept.as_array().expect("array").is_empty());
    // The most recently stored keeper survived.
    let r = post(&c, &url, newest, &[("cache-control", "only-if-cached")]).await;
    assert_eq!(r.cache, "hit");
    proxy.stop().await;
}

#[test]
fn a_large_import_commits_in_chunks_and_keeps_what_came_before_a_bad_line() {
    use llm_dedup::inspect::{IMPORT_CHUNK, InspectError, Inspector};
    let dir = tempfile::tempdir().expect("tempdir");
    let total = IMPORT_CHUNK * 2 + 100;
    let bad_at = IMPORT_CHUNK + 50; // 1-based line number of the malformed line
    let mut lines = Vec::new();
    for i in 0..total {
        if i + 1 == bad_at {
            lines.push("{\"key\": \"truncated".to_owned());
            continue;
        }
        lines.push(export_line(&format!("{i:064x}"), |e| {
            e["route"] = json!("embeddings");
        }));
    }
    let mut inspector = Inspector::create_or_open(&dir.path().join("c.db")).expect("open");
    let mut seen = 0;
    let err = inspector
        .import(&mut lines.join("\n").as_bytes(), &mut |n| seen = n)
        .expect_err("the malformed line stops the import");
    assert!(
        matches!(err, InspectError::BadLine { line, .. } if line == bad_at),
        "{err}"
    );
    assert_eq!(inspector.entry_count().expect("count"), (bad_at - 1) as u64);
    assert_eq!(seen, (bad_at - 1) as u64);
}

/// An export line for an entry with `key`, as `export` writes it, with `change` applied.
fn export_line(key: &str, change: impl FnOnce(&mut Value)) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let mut entry = json!({
        "key": key, "namespace": "", "route": "chat.completions", "model": "gpt-4o-mini",
        "size": 300, "hit_count": 0, "created_at": now - 1_000, "expires_at": now + 3_600_000,
        "last_hit_at": null, "status": 200,
        "headers": [["content-type", "application/json"]],
        "body": "{\"id\":\"chatcmpl-1\",\"choices\":[]}",
        "prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3
    });
    change(&mut entry);
    entry.to_string()
}

#[test]
fn an_import_keeps_only_what_a_stored_answer_may_hold() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("c.db");
    let far = 4_102_444_800_000i64; // 2100-01-01
    let lines = [
        // Headers a hit must never replay are dropped; the answer itself is kept.
        export_line(&"a1".repeat(32), |e| {
            e["headers"] = json!([
                ["content-type", "application/json"],
                ["set-cookie", "session=theirs"],
                ["x-ratelimit-remaining-requests", "7"]
            ]);
        }),
        // Stored in the future: max-age could never reject it. Skipped.
        export_line(&"b2".repeat(32), |e| e["created_at"] = json!(far)),
        // Expired before it was stored. Skipped.
        export_line(&"c3".repeat(32), |e| {
            e["expires_at"] = e["created_at"].as_i64().map(|c| c - 1).into();
        }),
        // Times no clock can hold. Skipped.
        export_line(&"d4".repeat(32), |e| e["created_at"] = json!(i64::MIN)),
        export_line(&"e5".repeat(32), |e| e["expires_at"] = json!(i64::MAX)),
        // A fine entry after the skipped ones is imported.
        export_line(&"f6".repeat(32), |_| {}),
    ];
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, lines.join("\n")).expect("write");
    let args = [
        "import",
        "--db",
        db_arg(&db),
        "--input",
        db_arg(&input),
        "--json",
    ];
    let report = cli_json(&args);
    assert_eq!(
        (&report["imported"], &report["rejected"]),
        (&json!(2), &json!(4)),
        "{report}"
    );
    let shown = cli_json(&["show", "--db", db_arg(&db), "--json", &"a1".repeat(32)]);
    assert_eq!(
        shown["headers"],
        json!([["content-type", "application/json"]])
    );
    for skipped in ["b2", "c3", "d4", "e5"] {
        let (code, _, err) = run_cli(&["show", "--db", db_arg(&db), &skipped.repeat(32)]);
        assert_ne!(code, 0, "{skipped} was imported");
        assert!(err.contains("no entry"), "{err}");
    }
    // The human report says what was left out.
    let (code, out, _) = run_cli(&["import", "--db", db_arg(&db), "--input", db_arg(&input)]);
    assert_eq!(code, 0);
    assert!(out.contains("4 rejected"), "{out}");
}

#[test]
fn human_output_never_hands_the_terminal_an_escape_sequence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("c.db");
    let hostile = "gpt\u{1b}]0;pwned\u{7}\u{1b}[2J\u{9b}31m";
    let key = "ab".repeat(32);
    let line = export_line(&key, |e| {
        e["model"] = json!(hostile);
        e["body"] = json!(format!(
            "data: {{\"x\":\"\u{1b}[31mred\"}}\n\ndata: [DONE]\n\n"
        ));
    });
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, line).expect("write");
    cli_json(&[
        "import",
        "--db",
        db_arg(&db),
        "--input",
        db_arg(&input),
        "--json",
    ]);
    // No request can set such a namespace, nor can an import; a database edited by hand can.
    let conn = rusqlite::Connection::open(&db).expect("open");
    conn.execute("UPDATE entries SET namespace = ?1", ["ns\u{1b}[1m"])
        .expect("namespace");
    conn.execute(
        "INSERT INTO counters (route, model, requests) VALUES ('chat.completions', ?1, 1)",
        [hostile],
    )
    .expect("counted");
    drop(conn);
    for args in [
        vec!["stats", "--db", db_arg(&db)],
        vec!["list", "--db", db_arg(&db)],
        vec!["show", "--db", db_arg(&db), &key],
    ] {
        let (code, out, err) = run_cli(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(
            !out.chars().any(|c| c.is_control() && c != '\n'),
            "{args:?} printed a control character: {out:?}"
        );
        assert!(
            out.contains(r"gpt\u{1b}") || args[0] == "show" && out.contains("red"),
            "{out}"
        );
    }
}
