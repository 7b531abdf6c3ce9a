//! Money saved: what each hit or coalesced answer would have cost at the provider, from known
//! usage and a known price file, in the header, the counters, `/stats` and the metrics.

mod common;

use common::*;
use llm_dedup::PriceTable;
use serde_json::{Value, json};

/// Round prices, so every expected figure below can be checked by hand.
const PRICES: &str = r#"{
  "taken": "2026-11-30",
  "sources": {"test": "figures made up for the tests"},
  "models": {
    "test-chat":   {"source": "test", "input": "2", "cached_input": "1", "output": "8"},
    "test-claude": {"source": "test", "input": "3", "cached_input": "0.3", "cache_write": "3.75", "output": "15"},
    "test-embed":  {"source": "test", "input": "0.02"}
  }
}"#;

fn prices() -> PriceTable {
    PriceTable::with_overrides(PRICES, "test-prices.json").expect("test prices")
}

fn saved(seen: &Seen) -> Option<String> {
    seen.headers
        .get("llm-dedup-saved-usd")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Sends `body` to `path` twice; the second must be a hit. Returns the hit.
async fn miss_then_hit(proxy: &Proxy, path: &str, body: &Value) -> Seen {
    let c = client();
    let first = post(&c, &proxy.url(path), body.to_string(), &[]).await;
    assert_eq!(
        (first.status, first.cache.as_str()),
        (200, "miss"),
        "{path}"
    );
    assert_eq!(saved(&first), None, "a miss saved nothing");
    let again = post(&c, &proxy.url(path), body.to_string(), &[]).await;
    assert_eq!(again.cache, "hit", "{path}");
    again
}

async fn stats(proxy: &Proxy) -> Value {
    proxy.engine.flush().await.expect("flushed");
    // `/stats` answers from a cache at most a second old.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let answer = client()
        .get(proxy.url("/_llm-dedup/stats"))
        .send()
        .await
        .expect("stats");
    seen(answer).await.body
}

fn by_model<'a>(stats: &'a Value, model: &str) -> &'a Value {
    stats["by_model"]
        .as_array()
        .and_then(|groups| groups.iter().find(|g| g["name"] == model))
        .unwrap_or_else(|| panic!("no row for {model} in {stats}"))
}

#[tokio::test]
async fn each_api_hit_saves_what_the_provider_would_have_charged() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("c.db");
    let proxy = Proxy::start(upstream.engine().database(&db).prices(prices())).await;
    let set_usage = |usage: Option<Value>| upstream.behave(|b| b.usage = usage);
    let chat = |content: &str| json!({"model": "test-chat", "messages": [{"role": "user", "content": content}]});

    // Chat, no cached input: 9 in at 2, 12 out at 8 per million = 114 microdollars.
    let hit = miss_then_hit(&proxy, "/v1/chat/completions", &chat("plain")).await;
    assert_eq!(saved(&hit).as_deref(), Some("0.000114"));

    // Chat with 800 of 1,000 input tokens cached: 200 x 2 + 800 x 1 + 100 x 8 = $0.002.
    set_usage(Some(
        json!({"prompt_tokens": 1000, "completion_tokens": 100,
        "total_tokens": 1100, "prompt_tokens_details": {"cached_tokens": 800},
        "completion_tokens_details": {"reasoning_tokens": 64}}),
    ));
    let hit = miss_then_hit(&proxy, "/v1/chat/completions", &chat("cached")).await;
    assert_eq!(saved(&hit).as_deref(), Some("0.002"));

    // Anthropic: 100 uncached at 3, 1,000 read at 0.30, 2,000 written at 3.75, 50 out at
    // 15 = 300 + 300 + 7,500 + 750 microdollars.
    set_usage(Some(
        json!({"input_tokens": 100, "cache_read_input_tokens": 1000,
        "cache_creation_input_tokens": 2000, "output_tokens": 50}),
    ));
    let message = json!({"model": "test-claude", "max_tokens": 64,
        "messages": [{"role": "user", "content": "hi"}]});
    let hit = miss_then_hit(&proxy, "/v1/messages", &message).await;
    assert_eq!(saved(&hit).as_deref(), Some("0.00885"));

    // Responses: 500 in of which 100 cached, 40 out (30 of them reasoning):
    // 400 x 2 + 100 x 1 + 40 x 8 = 1,220 microdollars.
    set_usage(Some(
        json!({"input_tokens": 500, "input_tokens_details": {"cached_tokens": 100},
        "output_tokens": 40, "output_tokens_details": {"reasoning_tokens": 30},
        "total_tokens": 540}),
    ));
    let response = json!({"model": "test-chat", "input": "hello", "store": false});
    let hit = miss_then_hit(&proxy, "/v1/responses", &response).await;
    assert_eq!(saved(&hit).as_deref(), Some("0.00122"));
    set_usage(None);

    // Embeddings: each input's share of the call's tokens, at 0.02 per million.
    let embed = json!({"model": "test-embed", "input": ["alpha", "beta gamma"]});
    let hit = miss_then_hit(&proxy, "/v1/embeddings", &embed).await;
    let tokens = hit.body["usage"]["prompt_tokens"].as_u64().expect("tokens");
    assert!(tokens > 0);
    let expected = llm_dedup::Usd::from_nanos(tokens * 20).to_string();
    assert_eq!(saved(&hit), Some(expected));

    // The counters add up exactly what the headers said, per model and in total.
    let s = stats(&proxy).await;
    let nanos = |v: &Value| v["saved_nanodollars"].as_i64().expect("integer");
    assert_eq!(
        nanos(by_model(&s, "test-chat")),
        114_000 + 2_000_000 + 1_220_000
    );
    assert_eq!(nanos(by_model(&s, "test-claude")), 8_850_000);
    assert_eq!(nanos(by_model(&s, "test-embed")), (tokens * 20) as i64);
    let total = 114_000 + 2_000_000 + 1_220_000 + 8_850_000 + tokens as i64 * 20;
    assert_eq!(nanos(&s["totals"]), total);
    assert_eq!(s["totals"]["saved_usd"], total as f64 / 1e9);
    assert_eq!(by_model(&s, "test-claude")["saved_usd"], 0.00885);
    assert_eq!(s["totals"]["saved_unpriced"], 0);
    // The price table's date, and the file that extends it.
    assert_eq!(s["prices"]["taken"], PriceTable::built_in().info().taken);
    assert_eq!(s["prices"]["overrides"]["taken"], "2026-11-30");
    assert_eq!(s["prices"]["overrides"]["models"], 3);

    // Prometheus: dollars by the model as priced.
    let metrics = proxy.engine.metrics_text().await;
    let line = |model: &str| {
        let name = format!("llm_dedup_cost_saved_usd_total{{model=\"{model}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name.as_str()))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    };
    assert_eq!(line("test-claude"), 0.00885);
    assert_eq!(line("test-chat"), 0.003334);
    assert!(metrics.contains("# TYPE llm_dedup_cost_saved_usd counter"));
    proxy.stop().await;
}

#[tokio::test]
async fn a_model_without_a_price_saves_tokens_and_no_money() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let proxy = Proxy::start(
        upstream
            .engine()
            .database(dir.path().join("c.db"))
            .prices(prices()),
    )
    .await;
    let body = json!({"model": "house-model-7b", "messages": [{"role": "user", "content": "x"}]});
    let hit = miss_then_hit(&proxy, "/v1/chat/completions", &body).await;
    assert_eq!(saved(&hit), None, "no price: no header, never a guess");
    let s = stats(&proxy).await;
    let row = by_model(&s, "house-model-7b");
    assert_eq!(row["saved_nanodollars"], 0);
    assert_eq!(row["saved_unpriced"], 1);
    assert_eq!(row["saved_prompt_tokens"], 9, "tokens are still saved");
    assert!(!proxy.engine.metrics_text().await.contains("house-model"));
    proxy.stop().await;
}

#[tokio::test]
async fn snapshots_and_azure_deployments_are_priced_as_the_model_the_answer_reports() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // The built-in table: gpt-4o-mini at 0.15 in, 0.60 out per million.
    let proxy = Proxy::with_db(&upstream, &dir.path().join("c.db")).await;
    let mini = "0.00000855"; // 9 x 0.15 + 12 x 0.60 microdollars

    let dated =
        json!({"model": "gpt-4o-mini-2024-07-18", "messages": [{"role": "user", "content": "a"}]});
    let hit = miss_then_hit(&proxy, "/v1/chat/completions", &dated).await;
    assert_eq!(saved(&hit).as_deref(), Some(mini));

    // An Azure deployment named for nothing the table knows; the answer reports the model.
    upstream.behave(|b| b.reported_model = Some("gpt-4o-mini-2024-07-18".into()));
    let azure = json!({"messages": [{"role": "user", "content": "b"}]});
    let path = "/openai/deployments/support-bot/chat/completions?api-version=2024-10-21";
    let hit = miss_then_hit(&proxy, path, &azure).await;
    assert_eq!(saved(&hit).as_deref(), Some(mini));
    // After a restart the entry comes from disk, and is still priced as the answer says.
    let engine = proxy.engine.clone();
    proxy.stop().await;
    engine.close().await.expect("closed");
    let proxy = Proxy::with_db(&upstream, &dir.path().join("c.db")).await;
    let c = client();
    let from_disk = post(&c, &proxy.url(path), azure.to_string(), &[]).await;
    assert_eq!(from_disk.cache, "hit");
    assert_eq!(saved(&from_disk).as_deref(), Some(mini));
    let s = stats(&proxy).await;
    assert_eq!(by_model(&s, "support-bot")["saved_nanodollars"], 2 * 8_550);
    proxy.stop().await;
}

#[tokio::test]
async fn a_coalesced_answer_saved_what_a_hit_would_have() {
    let upstream = FakeUpstream::with(Behaviour {
        hold: true,
        ..Behaviour::default()
    })
    .await;
    let proxy = Proxy::start(upstream.engine().prices(prices())).await;
    let body = json!({"model": "test-chat", "messages": [{"role": "user", "content": "burst"}]});
    let url = proxy.url("/v1/chat/completions");
    let c = client();
    let leader = tokio::spawn({
        let (c, url, body) = (c.clone(), url.clone(), body.to_string());
        async move { post(&c, &url, body, &[]).await }
    });
    upstream.wait_for_calls(1).await;
    let follower = tokio::spawn({
        let (c, url, body) = (c.clone(), url.clone(), body.to_string());
        async move { post(&c, &url, body, &[]).await }
    });
    // The follower has joined the flight once two requests wait on it.
    common::waiting(&proxy.engine, 2).await;
    upstream.state.release.notify_waiters();
    let (leader, follower) = (
        leader.await.expect("leader"),
        follower.await.expect("follower"),
    );
    assert_eq!(
        (leader.cache.as_str(), follower.cache.as_str()),
        ("miss", "coalesced")
    );
    assert_eq!(saved(&leader), None);
    assert_eq!(saved(&follower).as_deref(), Some("0.000114"));
    assert_eq!(upstream.calls(), 1);
    proxy.stop().await;
}

#[test]
fn the_proxy_takes_a_price_file_and_refuses_a_bad_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"taken": "2026-11-30", "models": {"m": {"input": "free"}}}"#,
    )
    .expect("written");
    let (code, _, stderr) = run_cli(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--prices",
        bad.to_str().expect("utf-8"),
    ]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("is not a price file") && stderr.contains("models.m.input"),
        "{stderr}"
    );
    let missing = dir.path().join("missing.json");
    let (code, _, stderr) = run_cli(&["serve", "--prices", missing.to_str().expect("utf-8")]);
    assert_ne!(code, 0);
    assert!(stderr.contains("cannot read"), "{stderr}");

    // A good one is taken, and `stats` reports its date.
    let good = dir.path().join("prices.json");
    std::fs::write(&good, PRICES).expect("written");
    let db = dir.path().join("c.db");
    let running = start_proxy_with(
        &db,
        "http://127.0.0.1:9",
        &["--prices", good.to_str().expect("utf-8")],
    );
    let (code, _) = running.terminate();
    assert_eq!(code, 0);
    let (code, out, err) = run_cli(&[
        "stats",
        "--db",
        db.to_str().expect("utf-8"),
        "--prices",
        good.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Saved $0 at the prices of"), "{out}");
    assert!(out.contains("(2026-11-30, 3 models)"), "{out}");
}
