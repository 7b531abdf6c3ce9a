//! The engine on its own: the same chat request twice, the second answered from the cache.
//!
//! `OPENAI_API_KEY=sk-... cargo run --example engine` (set `OPENAI_BASE_URL` for another
//! OpenAI-compatible upstream, e.g. `http://127.0.0.1:8080` for a local proxy or mock).

use bytes::Bytes;
use http_body_util::Full;
use llm_dedup::Dedup;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let key = std::env::var("OPENAI_API_KEY").map_err(|_| "set OPENAI_API_KEY")?;
    let upstream =
        std::env::var("OPENAI_BASE_URL").unwrap_or_else(|_| "https://api.openai.com".into());
    let engine = Dedup::builder()
        .upstream(upstream)
        .database("llm-dedup-example.sqlite3")
        .build()?;

    let body = r#"{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi"}]}"#;
    for attempt in 1..=2 {
        let request = http::Request::post("/v1/chat/completions")
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))?;
        let answer = engine.send(request).await?;
        let (status, cache) = (answer.status, answer.cache);
        let text = answer.into_bytes().await?;
        println!(
            "attempt {attempt}: {status} {cache:?}, {}",
            String::from_utf8_lossy(&text)
        );
    }
    // Waits for upstream calls in progress and commits the database.
    engine.close().await?;
    Ok(())
}
