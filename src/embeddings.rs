//! Embeddings, one input at a time.
//!
//! This module owns what is particular to `POST /v1/embeddings`: splitting a request's `input`
//! into its inputs, the limits a merged upstream call respects, sharing one call's usage among
//! its inputs, reading the provider's answer and writing the answers clients get. It is pure
//! (no I/O, no clock); the engine drives it.
//!
//! # One entry per input
//!
//! Each input is stored as the answer the provider would give to a request for that input
//! alone (`data` holding one embedding at `index` 0, `usage` its tokens). A request is answered
//! by putting the embeddings of its inputs back together in its order, each with its `index`,
//! their values written byte for byte as the provider sent them (they are never parsed as
//! numbers, so base64 and float spellings survive exactly).
//!
//! # Usage
//!
//! The `usage` of an answer counts every input of the request as the provider charges it, cached
//! or not, so a client's accounting does not change when the cache answers: a cached input
//! counts the tokens recorded when it was embedded; an input embedded in a merged call counts
//! its share of that call's `prompt_tokens`, split in proportion to the inputs' sizes (exact
//! for token arrays and single inputs, which is what the provider reports per input). An
//! upstream that reports no `usage` gets its inputs counted as zero, never guessed. What the
//! cache saved is reported by `llm-dedup stats`, not hidden in `usage`.

use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

/// Most inputs OpenAI accepts in one embeddings request.
pub const MAX_INPUTS: usize = 2048;
/// Most tokens OpenAI accepts in one embeddings request, summed over its inputs.
pub const MAX_TOKENS: u64 = 300_000;

/// How concurrent embedding requests are merged into upstream calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct EmbedSettings {
    /// How long the first input headed upstream waits for others (same model, options,
    /// `user` and credential) to share its call. Zero turns merging off: each request's
    /// missing inputs then go upstream in calls of their own.
    pub batch_window: Duration,
    /// Most inputs in one upstream call.
    pub max_inputs: usize,
    /// Most tokens in one upstream call. An input's size in bytes is counted as its tokens (a
    /// token is never shorter than a byte), so a merged call can never exceed the provider's
    /// bound; an input larger than the bound is sent alone.
    pub max_tokens: u64,
}

impl Default for EmbedSettings {
    /// A 5 ms window, and OpenAI's limits: 2048 inputs and 300,000 tokens per call.
    fn default() -> Self {
        EmbedSettings {
            batch_window: Duration::from_millis(5),
            max_inputs: MAX_INPUTS,
            max_tokens: MAX_TOKENS,
        }
    }
}

impl EmbedSettings {
    /// How long the first input headed upstream waits for others to share its call (zero:
    /// no merging, each request's inputs go in calls of their own).
    #[must_use]
    pub fn batch_window(mut self, window: Duration) -> Self {
        self.batch_window = window;
        self
    }

    /// Most inputs in one upstream call.
    #[must_use]
    pub fn max_inputs(mut self, inputs: usize) -> Self {
        self.max_inputs = inputs;
        self
    }

    /// Most tokens in one upstream call.
    #[must_use]
    pub fn max_tokens(mut self, tokens: u64) -> Self {
        self.max_tokens = tokens;
        self
    }
}

/// What an input is made of. The API takes a list of texts or a list of token arrays, never a
/// mix, so inputs of different kinds never share an upstream call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum InputKind {
    Text,
    Tokens,
}

/// Splits a request's `input` into its inputs, each as a request for it alone would carry it:
/// a string, or an array of token ids. `None` when `input` is missing, empty or of a shape the
/// API does not accept; such a request is sent as it is and the provider answers it.
pub(crate) fn split(input: Option<&Value>) -> Option<(InputKind, Vec<Value>)> {
    let is_token = |v: &Value| v.is_u64();
    let is_tokens = |v: &Value| {
        v.as_array()
            .is_some_and(|a| !a.is_empty() && a.iter().all(is_token))
    };
    let is_text = |v: &Value| v.as_str().is_some_and(|s| !s.is_empty());
    match input? {
        text @ Value::String(_) if is_text(text) => Some((InputKind::Text, vec![text.clone()])),
        tokens @ Value::Array(_) if is_tokens(tokens) => {
            Some((InputKind::Tokens, vec![tokens.clone()]))
        }
        Value::Array(items) if !items.is_empty() && items.iter().all(is_text) => {
            Some((InputKind::Text, items.clone()))
        }
        Value::Array(items) if !items.is_empty() && items.iter().all(is_tokens) => {
            Some((InputKind::Tokens, items.clone()))
        }
        _ => None,
    }
}

/// An upper bound on an input's tokens: its token count, or a text's length in bytes.
pub(crate) fn token_bound(input: &Value) -> u64 {
    match input {
        Value::String(s) => s.len() as u64,
        Value::Array(a) => a.len() as u64,
        _ => 1,
    }
}

/// A rough token count for an input, used to pace it and to share a call's usage: a token
/// array's length, or about four bytes a token of text.
pub(crate) fn token_estimate(input: &Value) -> u64 {
    match input {
        Value::String(s) => (s.len() as u64).div_ceil(4),
        Value::Array(a) => a.len() as u64,
        _ => 1,
    }
    .max(1)
}

/// Splits `total` into integer parts proportional to `weights` that add up to `total` exactly
/// (each part is the difference of rounded running sums).
pub(crate) fn apportion(total: u64, weights: &[u64]) -> Vec<u64> {
    let sum: u128 = weights.iter().map(|w| u128::from(*w)).sum();
    if sum == 0 {
        let mut parts = vec![0; weights.len()];
        if let Some(first) = parts.first_mut() {
            *first = total;
        }
        return parts;
    }
    let mut parts = Vec::with_capacity(weights.len());
    let (mut running, mut given) = (0u128, 0u64);
    for w in weights {
        running += u128::from(*w);
        let upto = u64::try_from((u128::from(total) * running + sum / 2) / sum).unwrap_or(total);
        parts.push(upto - given);
        given = upto;
    }
    parts
}

/// An embeddings answer, read without parsing the embeddings themselves.
#[derive(Debug)]
pub(crate) struct EmbeddingList<'a> {
    /// The embeddings, by `index`, exactly as sent.
    pub embeddings: Vec<&'a RawValue>,
    /// The model the provider names.
    pub model: Option<String>,
    /// `usage.prompt_tokens`.
    pub prompt_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    data: Vec<WireItem<'a>>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireItem<'a> {
    index: usize,
    #[serde(borrow)]
    embedding: &'a RawValue,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
}

impl<'a> EmbeddingList<'a> {
    /// Reads an answer that must hold exactly one embedding for each of `inputs` inputs, each
    /// `index` once. Anything else is described in the error.
    pub fn read(body: &'a [u8], inputs: usize) -> Result<EmbeddingList<'a>, String> {
        let wire: Wire<'a> = serde_json::from_slice(body)
            .map_err(|e| format!("the embeddings answer is not in the expected shape: {e}"))?;
        if wire.data.len() != inputs {
            return Err(format!(
                "the embeddings answer holds {} embeddings for {inputs} inputs",
                wire.data.len()
            ));
        }
        let mut slots: Vec<Option<&'a RawValue>> = vec![None; inputs];
        for item in wire.data {
            match slots.get_mut(item.index) {
                Some(slot @ None) => *slot = Some(item.embedding),
                Some(Some(_)) => return Err(format!("index {} appears twice", item.index)),
                None => return Err(format!("index {} is out of range", item.index)),
            }
        }
        Ok(EmbeddingList {
            // Every slot is filled: `inputs` distinct indexes below `inputs`.
            embeddings: slots.into_iter().flatten().collect(),
            model: wire.model,
            prompt_tokens: wire.usage.and_then(|u| u.prompt_tokens.or(u.total_tokens)),
        })
    }
}

/// Writes an embeddings answer in the provider's shape: `parts` in order, each an embedding as
/// sent and the tokens it counts for.
pub(crate) fn write_answer(parts: &[(&RawValue, u64)], model: &str) -> Bytes {
    let values: usize = parts.iter().map(|(e, _)| e.get().len() + 48).sum();
    let mut out = Vec::with_capacity(values + model.len() + 96);
    out.extend_from_slice(br#"{"object":"list","data":["#);
    for (index, (embedding, _)) in parts.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        out.extend_from_slice(br#"{"object":"embedding","index":"#);
        out.extend_from_slice(index.to_string().as_bytes());
        out.extend_from_slice(br#","embedding":"#);
        out.extend_from_slice(embedding.get().as_bytes());
        out.push(b'}');
    }
    let tokens: u64 = parts.iter().map(|(_, t)| t).sum();
    out.extend_from_slice(br#"],"model":"#);
    out.extend_from_slice(Value::from(model).to_string().as_bytes());
    out.extend_from_slice(
        format!(r#","usage":{{"prompt_tokens":{tokens},"total_tokens":{tokens}}}}}"#).as_bytes(),
    );
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn splits_every_shape_the_api_accepts() {
        let split_of = |v: Value| split(Some(&v));
        assert_eq!(
            split_of(json!("one")),
            Some((InputKind::Text, vec![json!("one")]))
        );
        assert_eq!(
            split_of(json!(["a", "b", "a"])),
            Some((InputKind::Text, vec![json!("a"), json!("b"), json!("a")]))
        );
        // A list of integers is one input, not many.
        assert_eq!(
            split_of(json!([1234, 5678])),
            Some((InputKind::Tokens, vec![json!([1234, 5678])]))
        );
        assert_eq!(
            split_of(json!([[1, 2], [3]])),
            Some((InputKind::Tokens, vec![json!([1, 2]), json!([3])]))
        );
        for bad in [
            json!(""),
            json!([]),
            json!(["a", ""]),
            json!(["a", [1]]),
            json!([[1], []]),
            json!([1, "a"]),
            json!([-1]),
            json!(42),
            json!({"text": "a"}),
            json!(null),
        ] {
            assert_eq!(split_of(bad.clone()), None, "{bad}");
        }
        assert_eq!(split(None), None);
    }

    #[test]
    fn apportioned_parts_add_up() {
        assert_eq!(apportion(10, &[1, 1, 1]), vec![3, 4, 3]);
        assert_eq!(apportion(7, &[7]), vec![7]);
        assert_eq!(apportion(5, &[2, 3]), vec![2, 3]);
        assert_eq!(apportion(3, &[0, 0]), vec![3, 0]);
        for (total, weights) in [(1000u64, vec![3u64, 17, 1, 1, 80]), (1, vec![5, 5, 5])] {
            let parts = apportion(total, &weights);
            assert_eq!(parts.iter().sum::<u64>(), total);
            assert_eq!(parts.len(), weights.len());
        }
    }

    #[test]
    fn reads_embeddings_by_index_and_keeps_their_bytes() {
        let body = br#"{"object":"list","data":[
            {"object":"embedding","index":1,"embedding":"AAAAPw=="},
            {"object":"embedding","index":0,"embedding":[0.10, -2E-3]}],
            "model":"text-embedding-3-small","usage":{"prompt_tokens":9,"total_tokens":9}}"#;
        let list = EmbeddingList::read(body, 2).expect("valid");
        assert_eq!(list.embeddings[0].get(), "[0.10, -2E-3]");
        assert_eq!(list.embeddings[1].get(), r#""AAAAPw==""#);
        assert_eq!(list.model.as_deref(), Some("text-embedding-3-small"));
        assert_eq!(list.prompt_tokens, Some(9));

        assert!(EmbeddingList::read(body, 3).is_err(), "count must match");
        let twice = br#"{"data":[{"index":0,"embedding":[1]},{"index":0,"embedding":[2]}]}"#;
        assert!(EmbeddingList::read(twice, 2).is_err());
        let beyond = br#"{"data":[{"index":1,"embedding":[1]}]}"#;
        assert!(EmbeddingList::read(beyond, 1).is_err());
        assert!(EmbeddingList::read(b"{}", 1).is_err());
        assert!(EmbeddingList::read(b"not json", 1).is_err());
    }

    #[test]
    fn written_answers_read_back_the_same() {
        let a = RawValue::from_string("[0.10,-2E-3]".to_owned()).expect("raw");
        let b = RawValue::from_string(r#""AAAAPw==""#.to_owned()).expect("raw");
        let body = write_answer(&[(&a, 3), (&b, 4)], "m\"odel");
        let value: Value = serde_json::from_slice(&body).expect("valid JSON");
        assert_eq!(value["object"], "list");
        assert_eq!(value["data"][1]["index"], 1);
        assert_eq!(value["data"][1]["object"], "embedding");
        assert_eq!(value["model"], "m\"odel");
        assert_eq!(
            value["usage"],
            json!({"prompt_tokens": 7, "total_tokens": 7})
        );
        let back = EmbeddingList::read(&body, 2).expect("reads back");
        assert_eq!(back.embeddings[0].get(), "[0.10,-2E-3]");
        assert_eq!(back.embeddings[1].get(), r#""AAAAPw==""#);
        assert_eq!(back.prompt_tokens, Some(7));
    }
}
