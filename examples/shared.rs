//! One engine shared by many tasks: twenty workers embedding the same text at the same moment
//! make one upstream call between them.
//!
//! `OPENAI_API_KEY=sk-... cargo run --example shared`

use bytes::Bytes;
use http_body_util::Full;
use llm_dedup::{CacheStatus, Dedup};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let key = std::env::var("OPENAI_API_KEY").map_err(|_| "set OPENAI_API_KEY")?;
    let upstream =
        std::env::var("OPENAI_BASE_URL").unwrap_or_else(|_| "https://api.openai.com".into());
    // Cheap to clone: every clone shares the cache, the in-flight table and the database.
    let engine = Dedup::builder().upstream(upstream).build()?;

    let workers: Vec<_> = (0..20)
        .map(|_| {
            let (engine, key) = (engine.clone(), key.clone());
            tokio::spawn(async move {
                let request = http::Request::post("/v1/embeddings")
                    .header("authorization", format!("Bearer {key}"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(
                        br#"{"model": "text-embedding-3-small", "input": "the same chunk"}"#,
                    )))?;
                let answer = engine.send(request).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(answer.cache)
            })
        })
        .collect();
    let mut upstream_calls = 0;
    for worker in workers {
        if worker.await?? == CacheStatus::Miss {
            upstream_calls += 1;
        }
    }
    println!("20 workers, {upstream_calls} upstream call(s)");
    engine.close().await?;
    Ok(())
}
