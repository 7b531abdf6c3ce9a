//! The live page in a real browser: Debian's `chromium`, headless, loads `/_llm-dedup/` from a
//! proxy that has served traffic, runs its script, and the figures it shows must be those of
//! `/_llm-dedup/stats` and `/_llm-dedup/series`. Skipped (with a note) where no Chromium is
//! installed; `.ci/run` installs it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// The browser: `LLM_DEDUP_CHROMIUM`, or the first of Chromium's usual names on `PATH`.
fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("LLM_DEDUP_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// Runs the browser headless on `url` with `args`, giving the page's script 10 s of its own
/// (virtual) time, which covers its first refresh and a second one.
fn browse(browser: &Path, url: &str, args: &[&str]) -> std::process::Output {
    let profile = tempfile::tempdir().expect("profile dir");
    let output = Command::new(browser)
        .args([
            "--headless",
            // CI runs as root, where Chromium's sandbox cannot start.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The opening tag holding `attr` and the text right after it.
fn element<'a>(dom: &'a str, attr: &str) -> Option<(&'a str, &'a str)> {
    let at = dom.find(attr)?;
    let open = dom[..at].rfind('<')?;
    let close = at + dom[at..].find('>')?;
    let text_end = close + 1 + dom[close + 1..].find('<')?;
    Some((&dom[open..=close], &dom[close + 1..text_end]))
}

/// The value of `name="..."` in an opening tag.
fn attribute<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    Some(&tag[start..start + tag[start..].find('"')?])
}

/// What the page shows for the figure `name`: its text, and its raw `data-value`.
fn figure<'a>(dom: &'a str, name: &str) -> (&'a str, Option<&'a str>) {
    let (tag, text) = element(dom, &format!("data-figure=\"{name}\""))
        .unwrap_or_else(|| panic!("no figure {name} on the page"));
    (text, attribute(tag, "data-value"))
}

fn money(nanos: &Value) -> String {
    let nanos = nanos.as_u64().expect("integer nanodollars");
    format!("${}", llm_dedup::Usd::from_nanos(nanos))
}

async fn get_json(url: String) -> Value {
    seen(client().get(url).send().await.expect("sent"))
        .await
        .body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_shows_the_proxy_s_own_figures_and_draws_its_charts() {
    let Some(browser) = chromium() else {
        common::RedisServer::missing_component("chromium");
        return;
    };
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let proxy = Proxy::with_db(&upstream, &dir.path().join("c.db")).await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");

    // Traffic of every kind: 6 misses, 14 hits, a burst of 5 (a miss and 4 coalesced), 2
    // pass-throughs, 1 error, and a model with no price.
    for i in 0..20 {
        let seen = post(&c, &url, chat(&format!("question {}", i % 6)), &[]).await;
        assert_eq!(seen.status, 200);
    }
    upstream.behave(|b| b.delay = Duration::from_millis(300));
    let burst: Vec<_> = (0..5)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move { post(&c, &url, chat("burst"), &[]).await })
        })
        .collect();
    for answer in burst {
        assert_eq!(answer.await.expect("joined").status, 200);
    }
    upstream.behave(|b| b.delay = Duration::ZERO);
    for _ in 0..2 {
        let models = c.get(proxy.url("/v1/models")).send().await.expect("sent");
        assert_eq!(models.status(), 200);
    }
    upstream.behave(|b| b.fail_status = Some(400));
    assert_eq!(post(&c, &url, chat("refused"), &[]).await.status, 400);
    upstream.behave(|b| b.fail_status = None);
    let house = json!({"model": "house-model", "messages": [{"role": "user", "content": "x"}]});
    for _ in 0..2 {
        post(&c, &url, house.to_string(), &[]).await;
    }
    proxy.engine.flush().await.expect("flushed");

    let page = proxy.url("/_llm-dedup/");
    let dom = String::from_utf8(browse(&browser, &page, &["--dump-dom"]).stdout).expect("utf-8");
    let stats = get_json(proxy.url("/_llm-dedup/stats")).await;
    let series = get_json(proxy.url("/_llm-dedup/series")).await;
    let t = &stats["totals"];
    assert_eq!(t["requests"], 30, "the traffic above: {stats}");

    // The script ran, fetched both endpoints, and reported no problem.
    let (status_tag, status) = element(&dom, "id=\"status\"").expect("status line");
    assert!(status.starts_with("updated "), "{status_tag}{status}");
    assert!(
        attribute(&dom[dom.find("<body").expect("body")..], "data-refreshed").is_some(),
        "the page refreshed itself"
    );

    // Every figure is the one /stats gives.
    let n = |v: &Value| v.as_i64().expect("integer");
    let saved = n(&t["hits"]) + n(&t["coalesced"]);
    assert_eq!(figure(&dom, "requests"), ("30", Some("30")));
    let ratio = format!("{:.1}%", saved as f64 * 100.0 / 30.0);
    assert_eq!(figure(&dom, "hit_ratio").0, ratio);
    assert_eq!(
        figure(&dom, "calls_avoided").1,
        Some(saved.to_string().as_str())
    );
    let tokens = n(&t["saved_prompt_tokens"]) + n(&t["saved_completion_tokens"]);
    assert!(tokens > 0);
    assert_eq!(figure(&dom, "tokens_saved").0, tokens.to_string());
    assert_eq!(
        figure(&dom, "money_saved").0,
        money(&t["saved_nanodollars"])
    );
    assert!(n(&t["saved_nanodollars"]) > 0, "gpt-4o-mini has a price");
    assert_eq!(
        figure(&dom, "unpriced").0,
        "1 answer of models with no price"
    );
    assert_eq!(
        figure(&dom, "absorbed_429").0,
        t["upstream_429s"].to_string()
    );
    // The provider's own cache, beside llm-dedup's (the fake reports none here).
    assert_eq!(
        figure(&dom, "provider_read"),
        (
            format!("{} tokens read", t["provider_cache_read_tokens"]).as_str(),
            Some(t["provider_cache_read_tokens"].to_string().as_str())
        )
    );
    assert_eq!(figure(&dom, "in_flight").0, "0");
    let live = &stats["live"];
    assert_eq!(
        figure(&dom, "memory").1,
        Some(live["memory_bytes"].to_string().as_str())
    );
    assert_eq!(
        figure(&dom, "disk").1,
        Some(stats["entry_bytes"].to_string().as_str())
    );
    assert!(
        figure(&dom, "prices")
            .0
            .contains(stats["prices"]["taken"].as_str().expect("date"))
    );
    // By model: the priced row shows its money, the other says it has no price.
    let cell = |model: &str, name: &str| {
        let row = &dom[dom.find(&format!("data-model=\"{model}\"")).expect("row")..];
        element(row, &format!("data-cell=\"{name}\""))
            .map(|(_, text)| text.to_owned())
            .expect("cell")
    };
    let by_model = stats["by_model"].as_array().expect("by model");
    let mini = by_model
        .iter()
        .find(|g| g["name"] == "gpt-4o-mini")
        .expect("gpt-4o-mini");
    assert_eq!(
        cell("gpt-4o-mini", "saved_usd"),
        money(&mini["saved_nanodollars"])
    );
    assert_eq!(
        cell("gpt-4o-mini", "requests"),
        mini["requests"].to_string()
    );
    assert_eq!(cell("house-model", "saved_usd"), "no price");

    // Both charts have drawn every outcome, each line the sum /series gives for its span.
    for (chart, minutes) in [("hour", 60usize), ("day", 1440)] {
        let at = dom.find(&format!("data-chart=\"{chart}\"")).expect("chart");
        let svg = &dom[at..at + dom[at..].find("</svg>").expect("svg end")];
        assert!(
            svg.contains(&format!("data-points=\"{minutes}\"")),
            "{chart}"
        );
        for (name, points) in series["outcomes"]
            .as_array()
            .expect("outcomes")
            .iter()
            .map(|o| {
                (
                    o[0].as_str().expect("name"),
                    o[1].as_array().expect("points"),
                )
            })
        {
            let expected: u64 = points[points.len() - minutes..]
                .iter()
                .map(|p| p.as_u64().expect("count"))
                .sum();
            let (tag, _) = element(svg, &format!("data-series=\"{name}\"")).expect("line");
            assert_eq!(
                attribute(tag, "data-total"),
                Some(expected.to_string().as_str()),
                "{chart} {name}"
            );
            let drawn = attribute(tag, "points").expect("points").split(' ').count();
            assert_eq!(drawn, minutes, "{chart} {name}");
        }
    }
    let total = |name: &str| -> u64 {
        let o = series["outcomes"].as_array().expect("outcomes");
        let points = &o.iter().find(|o| o[0] == name).expect("outcome")[1];
        points
            .as_array()
            .expect("points")
            .iter()
            .filter_map(Value::as_u64)
            .sum()
    };
    assert_eq!(
        (
            total("hit"),
            total("coalesced"),
            total("bypass"),
            total("error")
        ),
        (n(&t["hits"]) as u64, 4, 2, 1)
    );

    // A screenshot, for the README (`LLM_DEDUP_SCREENSHOT=docs/page.png` keeps it).
    let shot = std::env::var_os("LLM_DEDUP_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join("page.png"));
    let shot = std::path::absolute(&shot).expect("absolute path");
    browse(
        &browser,
        &page,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,1180",
        ],
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    proxy.stop().await;
}
