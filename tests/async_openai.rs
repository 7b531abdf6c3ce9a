//! async-openai (its current release, through its `middleware` extension point) answered by
//! llm-dedup in process, against the fake OpenAI upstream: a repeat, streamed or not, never
//! reaches the upstream, and what the client reads is what the upstream said.

mod common;

#[path = "../examples/shared/async_openai.rs"]
mod through;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs,
};
use common::FakeUpstream;
use futures_util::StreamExt;

fn question(content: &str) -> CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model("gpt-4o-mini")
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content(content)
            .build()
            .expect("message")
            .into()])
        .build()
        .expect("request")
}

fn client(upstream: &FakeUpstream, engine: &llm_dedup::Dedup) -> Client<OpenAIConfig> {
    let config = OpenAIConfig::new()
        .with_api_key("sk-test-key-1")
        .with_api_base(format!("{}/v1", upstream.url()));
    Client::build(common::client(), config).with_http_service(through::ThroughDedup(engine.clone()))
}

#[tokio::test]
async fn async_openai_chat_and_streamed_chat_go_through_the_cache() {
    let upstream = FakeUpstream::start().await;
    let engine = upstream.engine().build().expect("engine");
    let client = client(&upstream, &engine);

    let mut texts = Vec::new();
    for _ in 0..2 {
        let answer = client
            .chat()
            .create(question("through async-openai"))
            .await
            .expect("chat answer");
        texts.push(answer.choices[0].message.content.clone().expect("text"));
    }
    assert_eq!(texts[0], texts[1]);
    assert_eq!(upstream.calls(), 1, "the repeat came from the cache");
    // The key the client set reached the upstream.
    let seen = upstream.state.last_headers.lock().expect("lock").clone();
    let auth = seen.expect("a call")["authorization"].clone();
    assert_eq!(auth, "Bearer sk-test-key-1");

    let mut streamed = Vec::new();
    for _ in 0..2 {
        let mut stream = client
            .chat()
            .create_stream(question("streamed through async-openai"))
            .await
            .expect("stream");
        let mut text = String::new();
        let mut chunks = 0;
        while let Some(chunk) = stream.next().await {
            chunks += 1;
            for choice in chunk.expect("a chunk").choices {
                text.push_str(choice.delta.content.as_deref().unwrap_or_default());
            }
        }
        assert!(chunks > 1, "{chunks} chunks");
        streamed.push(text);
    }
    assert!(!streamed[0].is_empty());
    assert_eq!(streamed[0], streamed[1]);
    assert_eq!(
        upstream.calls(),
        2,
        "the streamed repeat came from the cache"
    );
    engine.close().await.expect("closed");
}
