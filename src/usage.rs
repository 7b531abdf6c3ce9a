//! Token usage as providers report it in an answer's `usage`.
//!
//! This module owns reading `usage` in each provider's shape (OpenAI's `prompt_tokens` /
//! `completion_tokens`, the Responses API's and Anthropic's `input_tokens` / `output_tokens`)
//! and merging the partial reports of a stream. It is a leaf: it imports nothing of the crate.

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
    pub fn of_answer(answer: &Value) -> Usage {
        answer.get("usage").map_or_else(Usage::default, Usage::read)
    }

    /// Reads a `usage` object in any provider's shape: `prompt_tokens` / `completion_tokens`
    /// (OpenAI) or `input_tokens` / `output_tokens` (Responses, Anthropic). A count above
    /// `MAX_TOKENS` is read as that: no answer is that long, and sums of counts stay far
    /// from overflowing.
    pub fn read(usage: &Value) -> Usage {
        let field = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| usage.get(*n)?.as_u64())
                .map(|n| n.min(MAX_TOKENS))
        };
        Usage {
            prompt_tokens: field(&["prompt_tokens", "input_tokens"]),
            completion_tokens: field(&["completion_tokens", "output_tokens"]),
            total_tokens: field(&["total_tokens"]),
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
                total_tokens: Some(8)
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
}
