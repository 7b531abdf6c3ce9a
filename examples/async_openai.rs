//! async-openai's client answered by llm-dedup in process: a chat and a streamed chat, each
//! sent twice, the second time from the cache. async-openai's `middleware` feature takes a
//! tower service for its HTTP calls (`Client::with_http_service`); `ThroughDedup` (in
//! `shared/async_openai.rs`) is one that hands each request to a `Dedup`.
//!
//! `OPENAI_API_KEY=sk-... cargo run --example async_openai` (set `OPENAI_BASE_URL` for another
//! OpenAI-compatible upstream, e.g. `http://127.0.0.1:8080` for a local mock).

#[path = "shared/async_openai.rs"]
mod through;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs,
};
use futures_util::StreamExt;
use llm_dedup::Dedup;

fn question() -> Result<CreateChatCompletionRequest, Box<dyn std::error::Error>> {
    Ok(CreateChatCompletionRequestArgs::default()
        .model("gpt-4o-mini")
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("Say hi")
            .build()?
            .into()])
        .build()?)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // llm-dedup's reqwest has no crypto provider of its own (its engine configures rustls on
    // ring for itself): a program that builds reqwest clients installs one, unless its
    // reqwest has the default `rustls` feature (which brings aws-lc-rs).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let key = std::env::var("OPENAI_API_KEY").map_err(|_| "set OPENAI_API_KEY")?;
    let upstream =
        std::env::var("OPENAI_BASE_URL").unwrap_or_else(|_| "https://api.openai.com".into());
    let engine = Dedup::builder()
        .upstream(&upstream)
        .database("llm-dedup-example.sqlite3")
        .build()?;
    let config = OpenAIConfig::new()
        .with_api_key(key)
        .with_api_base(format!("{upstream}/v1"));
    let client =
        Client::with_config(config).with_http_service(through::ThroughDedup(engine.clone()));

    for attempt in 1..=2 {
        let answer = client.chat().create(question()?).await?;
        let text = answer.choices[0]
            .message
            .content
            .clone()
            .unwrap_or_default();
        println!("chat, attempt {attempt}: {text}");
    }
    for attempt in 1..=2 {
        let mut stream = client.chat().create_stream(question()?).await?;
        let mut text = String::new();
        while let Some(chunk) = stream.next().await {
            for choice in chunk?.choices {
                text.push_str(choice.delta.content.as_deref().unwrap_or_default());
            }
        }
        println!("streamed chat, attempt {attempt}: {text}");
    }
    engine.close().await?;
    Ok(())
}
