//! The prefixes of a request that a provider caches on its side, as digests.
//!
//! Providers cache long prompt prefixes themselves and bill a read of one at a fraction of the
//! input price; a prefix becomes readable only once the request writing it has started to
//! answer. Requests that share a cold prefix and arrive together would each pay to write it;
//! the engine holds all but one of them until that one's first byte (`engine/prefixes.rs`).
//! This module only names the prefixes, computed once per distinct request beside its key:
//!
//! - **OpenAI** chat completions and Responses (and Azure's, which follow them): caching is
//!   automatic for prompts of [`OPENAI_MIN_TOKENS`] tokens or more, of the exact prefix; tools
//!   (and the output schema) count as part of it, and requests are routed by a hash of the
//!   prompt's first tokens with `prompt_cache_key` when sent
//!   (<https://platform.openai.com/docs/guides/prompt-caching>). A digest is taken at each
//!   whole-message (input item) boundary once the prefix reaches the minimum, the tokens
//!   estimated as the governor estimates them (four bytes a token). Caches are cleared after
//!   5–10 minutes without use: a prefix is taken as warm for [`SHORT_LIFE`] (an hour with
//!   `prompt_cache_retention: "24h"`).
//! - **Anthropic** Messages: caching is explicit, at `cache_control` breakpoints (up to four);
//!   the prefix is `tools`, then `system`, then `messages`, up to and including the marked
//!   block (<https://docs.anthropic.com/en/docs/build-with-claude/prompt-caching>). One digest a
//!   breakpoint whose prefix reaches the model's minimum ([`anthropic_min_tokens`]); its
//!   lifetime 5 minutes, or an hour with `"ttl": "1h"`.
//!
//! Each digest covers what the provider keys on besides the prefix: the route, the model,
//! `prompt_cache_key`, and the credential partition (provider caches are per organization).
//! Nothing else is held: other routes, and prefixes shorter than the minimum, have none.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::key::Partition;
use crate::route::Route;

/// The shortest prompt OpenAI caches, in tokens.
pub const OPENAI_MIN_TOKENS: u64 = 1024;
/// How long a written prefix is taken as readable: the providers' default lifetime (Anthropic's
/// 5 minutes; OpenAI's 5–10 minutes without use, taken at its shorter end).
pub const SHORT_LIFE: Duration = Duration::from_secs(5 * 60);
/// The lifetime of an Anthropic breakpoint with `"ttl": "1h"` (and of an OpenAI prefix with
/// extended retention, taken at an hour).
pub const LONG_LIFE: Duration = Duration::from_secs(60 * 60);
/// At most this many digests a request (its longest prefixes): an agent's history of hundreds
/// of messages needs only the boundaries near its end.
pub const MAX_DIGESTS: usize = 32;

/// A digest of one cacheable prefix of one partition's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrefixDigest(pub [u8; 32]);

/// The cacheable prefixes of a request, shortest first, each with how long the provider keeps
/// it once written.
#[derive(Debug, Clone, Default)]
pub struct Prefixes(Arc<[(PrefixDigest, Duration)]>);

impl Prefixes {
    /// Whether the request has no prefix worth holding for.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The prefixes, shortest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &(PrefixDigest, Duration)> {
        self.0.iter()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The prefixes of `body`, a request on `route` by `partition` whose JSON is about
    /// `body_len` bytes (see the module documentation); none for routes no provider caches
    /// this way, nor for a request too short to cache.
    pub fn of(route: Route, body: &Value, body_len: usize, partition: &Partition) -> Prefixes {
        let mut found = Vec::new();
        if (body_len as u64) / 4 < OPENAI_MIN_TOKENS.min(anthropic_min_tokens("")) {
            return Prefixes::default();
        }
        match route {
            Route::ChatCompletions => openai(route, body, partition, &mut found, |body| {
                (
                    [body.get("tools"), body.get("response_format")],
                    body.get("messages")
                        .and_then(Value::as_array)
                        .map(Vec::as_slice),
                    None,
                )
            }),
            Route::Responses => openai(route, body, partition, &mut found, |body| {
                (
                    [body.get("tools"), body.get("text")],
                    body.get("input")
                        .and_then(Value::as_array)
                        .map(Vec::as_slice),
                    body.get("instructions")
                        .or_else(|| body.get("input").filter(|i| i.is_string())),
                )
            }),
            Route::AnthropicMessages => anthropic(body, partition, &mut found),
            _ => {}
        }
        if found.len() > MAX_DIGESTS {
            found.drain(..found.len() - MAX_DIGESTS);
        }
        Prefixes(found.into())
    }
}

/// Drops the shortest digests once there are twice as many as are kept: a request of millions
/// of tiny messages holds at most `2 × MAX_DIGESTS` at a time.
fn keep_longest(found: &mut Vec<(PrefixDigest, Duration)>) {
    if found.len() >= 2 * MAX_DIGESTS {
        found.drain(..found.len() - MAX_DIGESTS);
    }
}

/// A blake3 hasher that counts what is written into it (the estimate of tokens).
struct Counting {
    hasher: blake3::Hasher,
    bytes: u64,
}

impl Write for Counting {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.hasher.update(buf);
        self.bytes += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Counting {
    /// A hasher over what every prefix of this request shares: who asks, where, of what model.
    fn new(route: Route, body: &Value, partition: &Partition, key_field: &str) -> Counting {
        let mut hasher = blake3::Hasher::new_derive_key("llm-dedup 2026 provider prefix");
        hasher.update(partition.as_bytes());
        let mut part = |bytes: &[u8]| {
            hasher.update(&(bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        };
        part(route.as_str().as_bytes());
        part(
            body.get("model")
                .and_then(Value::as_str)
                .unwrap_or("")
                .as_bytes(),
        );
        part(
            body.get(key_field)
                .and_then(Value::as_str)
                .unwrap_or("")
                .as_bytes(),
        );
        Counting { hasher, bytes: 0 }
    }

    /// Adds one part of the prompt, delimited (so no two lists of parts hash alike).
    fn add(&mut self, value: &Value) {
        // Writing into a hasher cannot fail.
        let _ = serde_json::to_writer(&mut *self, value);
        let _ = self.write(b"\x1e");
    }

    fn tokens(&self) -> u64 {
        self.bytes / 4
    }

    fn digest(&self) -> PrefixDigest {
        PrefixDigest(*self.hasher.finalize().as_bytes())
    }
}

/// OpenAI's rule: a digest at each message boundary once the prefix is long enough. `parts`
/// gives what comes first (tools, the output format), the messages (or input items), and a
/// leading text (`instructions`, or an input given as one string).
fn openai<'a>(
    route: Route,
    body: &'a Value,
    partition: &Partition,
    found: &mut Vec<(PrefixDigest, Duration)>,
    parts: impl Fn(
        &'a Value,
    ) -> (
        [Option<&'a Value>; 2],
        Option<&'a [Value]>,
        Option<&'a Value>,
    ),
) {
    let (first, messages, leading) = parts(body);
    if messages.is_none() && leading.is_none() {
        return;
    }
    let life = match body.get("prompt_cache_retention").and_then(Value::as_str) {
        Some("24h") => LONG_LIFE,
        _ => SHORT_LIFE,
    };
    let mut prefix = Counting::new(route, body, partition, "prompt_cache_key");
    // A Responses request continuing a stored response or conversation has that before
    // everything it sends.
    for field in ["previous_response_id", "conversation"] {
        prefix.add(body.get(field).unwrap_or(&Value::Null));
    }
    for value in first.into_iter().flatten() {
        prefix.add(value);
    }
    for value in leading.into_iter().chain(messages.into_iter().flatten()) {
        prefix.add(value);
        if prefix.tokens() >= OPENAI_MIN_TOKENS {
            found.push((prefix.digest(), life));
            keep_longest(found);
        }
    }
}

/// The fewest tokens an Anthropic breakpoint must cover for `model` to cache it: 4,096 for
/// Claude Haiku 4.5 and Opus 4.5/4.6, 2,048 for older Haiku models, 1,024 for the others
/// (Anthropic's prompt-caching documentation, "Cache limitations").
pub fn anthropic_min_tokens(model: &str) -> u64 {
    let model = model.to_ascii_lowercase();
    if ["haiku-4-5", "opus-4-5", "opus-4-6"]
        .iter()
        .any(|m| model.contains(m))
    {
        4096
    } else if model.contains("haiku") {
        2048
    } else {
        1024
    }
}

/// Anthropic's rule: a digest at each `cache_control` breakpoint (tools, then system, then
/// messages' content blocks, in order) long enough for the model.
fn anthropic(body: &Value, partition: &Partition, found: &mut Vec<(PrefixDigest, Duration)>) {
    let tools = body.get("tools").and_then(Value::as_array);
    let system = body.get("system");
    let messages = body.get("messages").and_then(Value::as_array);
    let marked = |v: &Value| v.get("cache_control").is_some();
    // No breakpoint, nothing to hash.
    let any = tools.is_some_and(|t| t.iter().any(marked))
        || system
            .and_then(Value::as_array)
            .is_some_and(|s| s.iter().any(marked))
        || messages.is_some_and(|m| {
            m.iter().any(|message| match message.get("content") {
                Some(Value::Array(blocks)) => blocks.iter().any(marked),
                _ => false,
            })
        });
    if !any {
        return;
    }
    let model = body.get("model").and_then(Value::as_str).unwrap_or("");
    let least = anthropic_min_tokens(model);
    let mut prefix = Counting::new(Route::AnthropicMessages, body, partition, "");
    let mut visit = |block: &Value, prefix: &mut Counting| {
        prefix.add(block);
        if let Some(control) = block.get("cache_control")
            && prefix.tokens() >= least
        {
            let life = match control.get("ttl").and_then(Value::as_str) {
                Some("1h") => LONG_LIFE,
                _ => SHORT_LIFE,
            };
            found.push((prefix.digest(), life));
            keep_longest(found);
        }
    };
    for tool in tools.into_iter().flatten() {
        visit(tool, &mut prefix);
    }
    match system {
        Some(Value::Array(blocks)) => blocks.iter().for_each(|b| visit(b, &mut prefix)),
        Some(text) => prefix.add(text),
        None => {}
    }
    for message in messages.into_iter().flatten() {
        // The role is part of what the model reads.
        prefix.add(message.get("role").unwrap_or(&Value::Null));
        match message.get("content") {
            Some(Value::Array(blocks)) => blocks.iter().for_each(|b| visit(b, &mut prefix)),
            Some(text) => visit(text, &mut prefix),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn partition(b: u8) -> Partition {
        Partition::from_bytes([b; 32])
    }

    /// The prefixes of `body` asked by partition `by`.
    fn of(route: Route, body: &Value, by: u8) -> Prefixes {
        Prefixes::of(route, body, body.to_string().len(), &partition(by))
    }

    /// A system prompt of about `tokens` tokens.
    fn long(tokens: usize) -> String {
        "word ".repeat(tokens * 4 / 5)
    }

    fn chat(system: &str, question: &str) -> Value {
        json!({"model": "gpt-4o", "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question}]})
    }

    #[test]
    fn requests_sharing_a_long_system_prompt_share_its_prefix() {
        let system = long(2000);
        let a = of(Route::ChatCompletions, &chat(&system, "one?"), 1);
        let b = of(Route::ChatCompletions, &chat(&system, "two?"), 1);
        assert_eq!(
            a.len(),
            2,
            "after the system message, and after the question"
        );
        assert_eq!(
            a.iter().next(),
            b.iter().next(),
            "the system prompt's prefix"
        );
        assert_ne!(a.iter().last(), b.iter().last(), "the whole prompts differ");
        // Another organization's cache is its own.
        let c = of(Route::ChatCompletions, &chat(&system, "one?"), 2);
        assert_ne!(a.iter().next(), c.iter().next());
        // Another model, or another prompt_cache_key, is another cache.
        let mut other = chat(&system, "one?");
        other["model"] = json!("gpt-4o-mini");
        let d = of(Route::ChatCompletions, &other, 1);
        assert_ne!(a.iter().next(), d.iter().next());
        let mut keyed = chat(&system, "one?");
        keyed["prompt_cache_key"] = json!("tenant-7");
        let e = of(Route::ChatCompletions, &keyed, 1);
        assert_ne!(a.iter().next(), e.iter().next());
    }

    #[test]
    fn a_short_prompt_or_another_route_has_no_prefix() {
        let short = chat("be brief", "hi");
        assert!(of(Route::ChatCompletions, &short, 1).is_empty());
        let long = chat(&long(2000), "hi");
        assert!(of(Route::Embeddings, &long, 1).is_empty());
        assert!(of(Route::ChatCompletions, &json!({"model": 1}), 1).is_empty());
    }

    #[test]
    fn tools_are_part_of_an_openai_prefix() {
        let system = long(2000);
        let mut with_tools = chat(&system, "q");
        with_tools["tools"] = json!([{"type": "function", "function": {"name": "f"}}]);
        let a = of(Route::ChatCompletions, &with_tools, 1);
        let b = of(Route::ChatCompletions, &chat(&system, "q"), 1);
        assert_ne!(a.iter().next(), b.iter().next());
    }

    #[test]
    fn responses_instructions_and_items_make_prefixes() {
        let body = json!({"model": "gpt-4o", "instructions": long(2000),
            "input": [{"role": "user", "content": "q"}], "prompt_cache_retention": "24h"});
        let p = of(Route::Responses, &body, 1);
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(|(_, life)| *life == LONG_LIFE));
    }

    #[test]
    fn an_anthropic_prefix_ends_at_each_breakpoint_long_enough_for_the_model() {
        let body = |model: &str, question: &str| {
            json!({"model": model, "max_tokens": 10,
                "system": [{"type": "text", "text": long(3000),
                            "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
                "messages": [{"role": "user", "content": [{"type": "text", "text": question}]}]})
        };
        let a = of(Route::AnthropicMessages, &body("claude-sonnet-4-5", "a"), 1);
        let b = of(Route::AnthropicMessages, &body("claude-sonnet-4-5", "b"), 1);
        assert_eq!(a.len(), 1);
        assert_eq!(
            a.iter().next(),
            b.iter().next(),
            "the question is after the breakpoint"
        );
        assert_eq!(a.iter().next().map(|p| p.1), Some(LONG_LIFE));
        // Too short for Haiku 4.5's minimum.
        let haiku = of(Route::AnthropicMessages, &body("claude-haiku-4-5", "a"), 1);
        assert!(haiku.is_empty());
        // No breakpoint, no prefix.
        let plain = json!({"model": "claude-sonnet-4-5", "system": long(3000),
            "messages": [{"role": "user", "content": "q"}]});
        assert!(of(Route::AnthropicMessages, &plain, 1).is_empty());
    }

    #[test]
    fn a_long_history_keeps_its_longest_prefixes() {
        let mut messages = vec![json!({"role": "system", "content": long(1100)})];
        for i in 0..100 {
            messages.push(json!({"role": "user", "content": format!("turn {i}")}));
        }
        let body = json!({"model": "gpt-4o", "messages": messages});
        assert_eq!(of(Route::ChatCompletions, &body, 1).len(), MAX_DIGESTS);
    }
}
