//! An existing reqwest client, made cached and deduplicated with one `.with(..)`.
//!
//! `OPENAI_API_KEY=sk-... cargo run --example middleware --features middleware`

use llm_dedup::Dedup;
use llm_dedup::middleware::DedupMiddleware;
use reqwest_middleware::ClientBuilder;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // llm-dedup's reqwest has no crypto provider of its own (its engine configures rustls on
    // ring for itself): a program that builds reqwest clients installs one, unless its
    // reqwest has the default `rustls` feature (which brings aws-lc-rs).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let key = std::env::var("OPENAI_API_KEY").map_err(|_| "set OPENAI_API_KEY")?;
    let upstream =
        std::env::var("OPENAI_BASE_URL").unwrap_or_else(|_| "https://api.openai.com".into());
    let engine = Dedup::builder().upstream(upstream.clone()).build()?;
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(DedupMiddleware::new(engine.clone()))
        .build();

    for attempt in 1..=2 {
        let response = client
            .post(format!("{upstream}/v1/embeddings"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(r#"{"model": "text-embedding-3-small", "input": "llm-dedup"}"#)
            .send()
            .await?;
        let cache = response
            .headers()
            .get("llm-dedup-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        let bytes = response.bytes().await?.len();
        println!("attempt {attempt}: {cache}, {bytes} bytes");
    }
    engine.close().await?;
    Ok(())
}
