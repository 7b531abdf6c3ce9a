//! Which requests the cache may answer.
//!
//! This module owns the list of cacheable API routes and the rules that send a request on a
//! cacheable route around the cache anyway (streams, stateful Responses requests). It is pure:
//! it looks at a method, a path and a parsed body, and does no I/O.

use http::Method;
use serde_json::Value;

/// An API route whose answers llm-dedup knows how to cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Route {
    /// `POST /v1/chat/completions` (and Azure's deployment form).
    ChatCompletions,
    /// `POST /v1/completions` (legacy completions).
    Completions,
    /// `POST /v1/embeddings`.
    Embeddings,
    /// `POST /v1/responses` (the Responses API).
    Responses,
    /// `POST /v1/moderations`.
    Moderations,
    /// `POST /v1/messages` (Anthropic Messages).
    AnthropicMessages,
}

impl Route {
    /// Classifies a request by method and path; `None` means "pass through, never cache".
    ///
    /// Accepted path forms, for each route suffix (`/chat/completions`, `/completions`,
    /// `/embeddings`, `/responses`, `/moderations`, `/messages`):
    /// `/v1/<suffix>`, `/<suffix>` (a client whose base URL already ends in `/v1` talking to an
    /// upstream configured with `/v1`), Azure's `/openai/deployments/<name>/<suffix>` and
    /// `/openai/v1/<suffix>`.
    pub fn classify(method: &Method, path: &str) -> Option<Route> {
        if method != Method::POST {
            return None;
        }
        let path = path.strip_suffix('/').unwrap_or(path);
        let suffix = if let Some(rest) = path.strip_prefix("/openai/deployments/") {
            // Skip the deployment name.
            &rest[rest.find('/')?..]
        } else if let Some(rest) = path.strip_prefix("/openai/v1") {
            rest
        } else if let Some(rest) = path.strip_prefix("/v1") {
            rest
        } else {
            path
        };
        match suffix {
            "/chat/completions" => Some(Route::ChatCompletions),
            "/completions" => Some(Route::Completions),
            "/embeddings" => Some(Route::Embeddings),
            "/responses" => Some(Route::Responses),
            "/moderations" => Some(Route::Moderations),
            "/messages" => Some(Route::AnthropicMessages),
            _ => None,
        }
    }

    /// A short stable name, as stored in the database and shown by the inspector.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::ChatCompletions => "chat.completions",
            Route::Completions => "completions",
            Route::Embeddings => "embeddings",
            Route::Responses => "responses",
            Route::Moderations => "moderations",
            Route::AnthropicMessages => "messages",
        }
    }

    /// Parses a name produced by [`Route::as_str`].
    pub fn from_name(name: &str) -> Option<Route> {
        [
            Route::ChatCompletions,
            Route::Completions,
            Route::Embeddings,
            Route::Responses,
            Route::Moderations,
            Route::AnthropicMessages,
        ]
        .into_iter()
        .find(|r| r.as_str() == name)
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request on a cacheable route goes around the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BypassReason {
    /// A Responses request that reads server-side state or runs on without the caller
    /// (`background`, `conversation`, `previous_response_id`).
    Stateful,
    /// A Chat Completions request with `store: true`: the provider keeps each such completion
    /// (for stored-completion listings, evals, distillation), which a cached answer would not.
    Stored,
    /// A request whose answer follows state the provider can change (an unversioned stored
    /// prompt, a vector store, the web, a remote MCP server, an Azure data source), sent
    /// without asking for a lifetime (`llm-dedup-ttl`, `Cache-Control: max-age`).
    Mutable,
    /// The client sent `Cache-Control: no-store`.
    NoStore,
    /// The route is not one llm-dedup caches.
    NotCacheable,
}

impl BypassReason {
    /// A short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            BypassReason::Stateful => "stateful",
            BypassReason::Stored => "stored",
            BypassReason::Mutable => "mutable",
            BypassReason::NoStore => "no-store",
            BypassReason::NotCacheable => "not-cacheable",
        }
    }
}

/// Decides, from the parsed body, whether a request on `route` may use the cache. Streamed
/// requests may: they are cached as their events.
pub fn bypass_reason(route: Route, body: &Value) -> Option<BypassReason> {
    let truthy = |field: &str| matches!(body.get(field), Some(Value::Bool(true)));
    let present = |field: &str| !matches!(body.get(field), None | Some(Value::Null));
    if route == Route::Responses
        && (truthy("background") || present("conversation") || present("previous_response_id"))
    {
        return Some(BypassReason::Stateful);
    }
    if route == Route::ChatCompletions && truthy("store") {
        return Some(BypassReason::Stored);
    }
    None
}

/// Longest model name kept: one that is longer (a client can send anything) is cut to this
/// many characters wherever it is counted, stored or shown.
pub const MAX_MODEL_CHARS: usize = 128;

/// The model a request names: the body's `model`, else an Azure deployment name; at most
/// [`MAX_MODEL_CHARS`] characters of it.
pub fn model_of(path: &str, body: &Value) -> Option<String> {
    let named = match body.get("model").and_then(Value::as_str) {
        Some(model) => model,
        None => {
            let rest = path.strip_prefix("/openai/deployments/")?;
            rest.split('/').next().filter(|n| !n.is_empty())?
        }
    };
    Some(match named.char_indices().nth(MAX_MODEL_CHARS) {
        Some((cut, _)) => named[..cut].to_owned(),
        None => named.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn classifies_openai_azure_and_anthropic_paths() {
        let cases = [
            ("/v1/chat/completions", Some(Route::ChatCompletions)),
            ("/chat/completions/", Some(Route::ChatCompletions)),
            (
                "/openai/deployments/gpt4o/embeddings",
                Some(Route::Embeddings),
            ),
            ("/openai/v1/responses", Some(Route::Responses)),
            ("/v1/messages", Some(Route::AnthropicMessages)),
            ("/v1/files", None),
            ("/openai/deployments/x", None),
        ];
        for (path, want) in cases {
            assert_eq!(Route::classify(&Method::POST, path), want, "{path}");
        }
        assert_eq!(Route::classify(&Method::GET, "/v1/chat/completions"), None);
    }

    #[test]
    fn names_round_trip() {
        for r in [
            Route::ChatCompletions,
            Route::Completions,
            Route::Embeddings,
            Route::Responses,
            Route::Moderations,
            Route::AnthropicMessages,
        ] {
            assert_eq!(Route::from_name(r.as_str()), Some(r));
        }
    }

    #[test]
    fn stateful_responses_bypass_and_streams_do_not() {
        let chat = Route::ChatCompletions;
        assert_eq!(bypass_reason(chat, &json!({"stream": true})), None);
        assert_eq!(bypass_reason(chat, &json!({"stream": false})), None);
        // `store: true` on chat completions asks the provider to keep each completion.
        assert_eq!(
            bypass_reason(chat, &json!({"store": true})),
            Some(BypassReason::Stored)
        );
        assert_eq!(bypass_reason(chat, &json!({"store": false})), None);
        let resp = Route::Responses;
        // A stored response (the API's default) is cached, within its caller's partition.
        assert_eq!(bypass_reason(resp, &json!({"store": true})), None);
        for body in [
            json!({"background": true}),
            json!({"conversation": "conv_1"}),
            json!({"previous_response_id": "resp_1"}),
        ] {
            assert_eq!(bypass_reason(resp, &body), Some(BypassReason::Stateful));
        }
        assert_eq!(
            bypass_reason(resp, &json!({"store": false, "previous_response_id": null})),
            None
        );
    }

    #[test]
    fn model_from_body_or_azure_deployment() {
        assert_eq!(
            model_of("/v1/chat/completions", &json!({"model": "gpt-4o"})).as_deref(),
            Some("gpt-4o")
        );
        assert_eq!(
            model_of("/openai/deployments/prod-4o/chat/completions", &json!({})).as_deref(),
            Some("prod-4o")
        );
        assert_eq!(model_of("/v1/embeddings", &json!({})), None);
        let long = "é".repeat(500);
        let kept = model_of("/v1/embeddings", &json!({"model": long})).expect("named");
        assert_eq!(kept.chars().count(), MAX_MODEL_CHARS);
    }
}
