//! Token usage as providers report it in an answer's `usage`.
//!
//! This module owns reading `usage` in each provider's shape (OpenAI's `prompt_tokens` /
//! `completion_tokens`, the Responses API's and Anthropic's `input_tokens` / `output_tokens`)
//! and merging the partial reports of a stream. It is a leaf: it imports nothing of the crate.
//!
//! Counts are normalized to one meaning, the way providers bill them: `prompt_tokens` is every
//! input token, of which `cached_tokens` were read from the provider's prompt cache (billed at
//! the cached-input price) and `cache_write_tokens` were written to it (Anthropic, billed at
//! the cache-write price). OpenAI already counts cached tokens inside `prompt_tokens`
//! (`prompt_tokens_details.cached_tokens`, or `input_tokens_details.cached_tokens` on the
//! Responses API); Anthropic counts them beside `input_tokens` (`cache_read_input_tokens`,
//! `cache_creation_input_tokens`), so they are added in. Reasoning tokens are part of the
//! completion count in both.

use serde_json::Value;

/// The most tokens one answer is taken to report in one count (2^32, far beyond any model's
/// context).
pub const MAX_TOKENS: u64 = 1 << 32;

/// Token usage reported by the upstream in the answer's `usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt (input) tokens.
    pub prompt_tokens: Option<u64>,
    /// Completion (output) tokens.
    pub completion_tokens: Option<u64>,
    /// Total tokens.
    pub total_tokens: Option<u64>,
    /// Of the prompt tokens, those read from the provider's prompt cache.
    pub cached_tokens: Option<u64>,
    /// Of the prompt tokens, those written to the provider's prompt cache (Anthropic).
    pub cache_write_tokens: Option<u64>,
}

impl Usage {
    /// Reads `usage` from an answer body in the OpenAI (`prompt_tokens`/`completion_tokens`),
    /// Responses or Anthropic (`input_tokens`/`output_tokens`) shape.
    pub fn from_body(body: &[u8]) -> Usage {
        match serde_json::from_slice::<Value>(body) {
            Ok(root) => Usage::of_answer(&root),
            Err(_) => Usage::default(),
        }
    }

    /// Reads the `usage` of a parsed answer (nothing if it has none).
    pub(crate) fn of_answer(answer: &Value) -> Usage {
        answer.get("usage").map_or_else(Usage::default, Usage::read)
    }

    /// Reads a `usage` object in any provider's shape: `prompt_tokens` / `completion_tokens`
    /// (OpenAI) or `input_tokens` / `output_tokens` (Responses, Anthropic), with their prompt
    /// cache details (see the module docs). A count above `MAX_TOKENS` is read as that: no
    /// answer is that long, and sums of counts stay far from overflowing.
    pub(crate) fn read(usage: &Value) -> Usage {
        let count = |v: Option<&Value>| v?.as_u64().map(|n| n.min(MAX_TOKENS));
        let field = |names: &[&str]| names.iter().find_map(|n| count(usage.get(*n)));
        let cache_read = field(&["cache_read_input_tokens"]);
        let cache_write = field(&["cache_creation_input_tokens"]);
        let mut prompt = field(&["prompt_tokens", "input_tokens"]);
        let cached = if cache_read.is_some() || cache_write.is_some() {
            // Anthropic: `input_tokens` are only the uncached ones.
            prompt = Some(
                [prompt, cache_read, cache_write]
                    .into_iter()
                    .flatten()
                    .fold(0u64, u64::saturating_add),
            );
            cache_read
        } else {
            [
                "/prompt_tokens_details/cached_tokens",
                "/input_tokens_details/cached_tokens",
            ]
            .iter()
            .find_map(|p| count(usage.pointer(p)))
        };
        Usage {
            prompt_tokens: prompt,
            completion_tokens: field(&["completion_tokens", "output_tokens"]),
            total_tokens: field(&["total_tokens"]),
            cached_tokens: cached,
            cache_write_tokens: cache_write,
        }
        .with_total()
    }

    /// These counts updated by a later report (a stream reports usage in parts): what the
    /// later one says wins, and the total is derived again unless it is reported.
    pub fn updated_by(self, later: Usage) -> Usage {
        Usage {
            prompt_tokens: later.prompt_tokens.or(self.prompt_tokens),
            completion_tokens: later.completion_tokens.or(self.completion_tokens),
            total_tokens: later.total_tokens,
            cached_tokens: later.cached_tokens.or(self.cached_tokens),
            cache_write_tokens: later.cache_write_tokens.or(self.cache_write_tokens),
        }
        .with_total()
    }

    /// Derives a missing total from the parts that are known.
    fn with_total(mut self) -> Usage {
        if self.total_tokens.is_none() {
            self.total_tokens = match (self.prompt_tokens, self.completion_tokens) {
                (Some(p), Some(c)) => Some(p.saturating_add(c)),
                (p, c) => p.or(c),
            };
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_in_each_provider_shape() {
        let openai = br#"{"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#;
        assert_eq!(
            Usage::from_body(openai),
            Usage {
                prompt_tokens: Some(3),
                completion_tokens: Some(5),
                total_tokens: Some(8),
                ..Usage::default()
            }
        );
        let anthropic = br#"{"usage":{"input_tokens":10,"output_tokens":2}}"#;
        assert_eq!(Usage::from_body(anthropic).total_tokens, Some(12));
        let embeddings = br#"{"usage":{"prompt_tokens":4,"total_tokens":4}}"#;
        assert_eq!(Usage::from_body(embeddings).completion_tokens, None);
        assert_eq!(Usage::from_body(b"not json"), Usage::default());
        // A hostile count is capped, so adding it up cannot overflow.
        let huge = format!(
            r#"{{"usage":{{"prompt_tokens":{},"completion_tokens":{}}}}}"#,
            u64::MAX,
            u64::MAX
        );
        let usage = Usage::from_body(huge.as_bytes());
        assert_eq!(usage.prompt_tokens, Some(MAX_TOKENS));
        assert_eq!(usage.total_tokens, Some(2 * MAX_TOKENS));
    }

    #[test]
    fn prompt_cache_details_in_each_provider_shape() {
        // OpenAI chat: cached tokens are part of `prompt_tokens`.
        let chat = br#"{"usage":{"prompt_tokens":2006,"completion_tokens":300,"total_tokens":2306,
            "prompt_tokens_details":{"cached_tokens":1920},
            "completion_tokens_details":{"reasoning_tokens":128}}}"#;
        let u = Usage::from_body(chat);
        assert_eq!(
            (u.prompt_tokens, u.cached_tokens, u.cache_write_tokens),
            (Some(2006), Some(1920), None)
        );
        assert_eq!(
            u.completion_tokens,
            Some(300),
            "reasoning is in the completion"
        );
        // Responses: the same, under other names.
        let responses = br#"{"usage":{"input_tokens":50,"output_tokens":7,"total_tokens":57,
            "input_tokens_details":{"cached_tokens":32},"output_tokens_details":{"reasoning_tokens":3}}}"#;
        let u = Usage::from_body(responses);
        assert_eq!((u.prompt_tokens, u.cached_tokens), (Some(50), Some(32)));
        // Anthropic: cache reads and writes are beside `input_tokens`, so they are added in.
        let anthropic = br#"{"usage":{"input_tokens":21,"cache_creation_input_tokens":188086,
            "cache_read_input_tokens":1000,"output_tokens":393}}"#;
        let u = Usage::from_body(anthropic);
        assert_eq!(
            (u.prompt_tokens, u.cached_tokens, u.cache_write_tokens),
            (Some(189_107), Some(1000), Some(188_086))
        );
        assert_eq!(u.total_tokens, Some(189_500));
        // A stream's final `message_delta` (output only) keeps what `message_start` said.
        let start = Usage::read(&serde_json::json!({
            "input_tokens": 10, "cache_read_input_tokens": 90, "output_tokens": 1
        }));
        let end = start.updated_by(Usage::read(&serde_json::json!({"output_tokens": 6})));
        assert_eq!(
            (end.prompt_tokens, end.cached_tokens, end.completion_tokens),
            (Some(100), Some(90), Some(6))
        );
    }
}
