//! Cache keys: the pure function from a request to the name of its stored answer.
//!
//! This module owns the canonical form of a request body and the key derived from it. It is
//! pure: no I/O, no clock, no randomness, no async. The same bytes in give the same key out on
//! every machine, and any change to the canonical form below must bump [`KEY_VERSION`] (the
//! snapshot tests in this module exist to make such a change a reviewed diff).
//!
//! # The key
//!
//! `key = blake3(tag ‖ KEY_VERSION ‖ namespace ‖ upstream ‖ method ‖ path?query ‖ credential
//! fingerprint ‖ key headers ‖ canonical body [‖ exact body])`, every part prefixed with its
//! length as a little-endian `u64`, shown as 64 lowercase hex characters.
//!
//! - The **upstream** is its base URL as shown, and, when the URL carries credentials, their
//!   keyed hash under the salt (a gateway may route or bill by them).
//! - The **credential fingerprint** is a keyed blake3 hash of the credential headers
//!   ([`CREDENTIAL_HEADERS`]: `Authorization`, `x-api-key`, `api-key`,
//!   `Ocp-Apim-Subscription-Key`, `x-goog-api-key`, `Proxy-Authorization`; `Cookie` when none
//!   of those is present; any the operator adds; and, beside whichever of those came, the
//!   [`CONTEXT_HEADERS`] `OpenAI-Organization` and `OpenAI-Project`, which are no secret and
//!   never stand in for one; see [`CredentialHeaders`]) under a
//!   random 32-byte salt kept in the database. Only headers that are forwarded count (the
//!   engine computes the key from the forwarded header set), with `Proxy-Authorization`, which
//!   is addressed to this proxy. The credential itself never enters the key, and
//!   without the salt a fingerprint cannot be tested against guessed keys. With a shared cache
//!   the fingerprint is empty, except for a request whose answer belongs to its caller's
//!   organization ([`Traits::private`], [`bound_to_partition`]).
//! - **Key headers** are request headers that change the answer ([`KeyHeaders`]):
//!   `anthropic-version`, `anthropic-beta` (read as a set), `openai-beta`, `extra-parameters`,
//!   `azureml-model-deployment`, and those the operator adds. Transport headers,
//!   `User-Agent`, `x-stainless-*`, `traceparent` and request ids never enter the key.
//! - The **query** is part of the path (Azure's `api-version` changes the answer), its
//!   parameters in one order ([`canonical_path_and_query`]).
//! - The **exact body** is there only when a number of it may have lost digits in parsing
//!   ([`Traits::inexact`]).
//!
//! An **embedding input** is keyed on its own ([`CacheKey::of_input`]): `blake3(tag ‖
//! KEY_VERSION ‖ key of the request without its input ‖ canonical input)`, so a request of
//! many inputs is canonicalized once, and an input has one key alone or in a list.
//!
//! # The canonical body
//!
//! The body is parsed as JSON and written back in one form:
//!
//! - Top-level fields that do not change the answer are dropped (see [`KeyPolicy`]; by default
//!   `user`, `metadata`, `safety_identifier`, `prompt_cache_key`, `prompt_cache_retention`) —
//!   except, on the Responses API, the fields its answer echoes back ([`ECHOED_FIELDS`]):
//!   dropping those would replay one caller's values to another. A top-level field holding
//!   its documented default (`stream: false`, `n: 1`, Chat `store: false`, Responses `store:
//!   true`) is read as absent.
//! - Object keys are sorted by their UTF-8 bytes, **except** inside JSON schemas (every path
//!   of `SCHEMA_PATHS`: OpenAI's and Anthropic's structured output, function and tool
//!   parameters), where key order steers the order of the model's output and is kept as sent.
//! - Numbers are written in one form, after RFC 8785: integers as decimal integers; a
//!   fractional number, or an integral one beyond ±2^53, in the shortest form that reads back
//!   to the same `f64`; an integral float within ±2^53 as an integer, so `1`, `1.0` and `1e0`
//!   are one number; `-0` as `0`. Integers within 64 bits keep all their digits; one beyond
//!   (read as a float) makes the exact body part of the key, so two such seeds never merge.
//!   On top-level fields the providers type as integers (`INTEGER_FIELDS`), a float
//!   spelling is kept as a float (`100.0` is not `100`: OpenAI refuses it).
//! - Strings are written with JSON's minimal escaping; no whitespace anywhere.
//!
//! This file is longer than most on purpose: the canonical form is one thing, and about half
//! of it is the snapshot and property tests that pin that form, kept beside it.
//!
//! `stream` is an ordinary field and stays in the key: a streamed and a non-streamed request
//! never share an entry, because one stored form cannot yet be rendered both ways faithfully.

use std::fmt;

use serde_json::Value;

use crate::route::Route;

mod canonical;
mod headers;
mod partition;

pub use canonical::{CanonicalBody, Traits, bound_to_partition};
pub use headers::{KeyHeaders, canonical_path_and_query};
pub use partition::{CredentialFingerprint, CredentialHeaders, Partition};

/// Version of the canonical form and key layout. Bump it on any change to either: old entries
/// then simply stop matching, which is the safe failure.
pub const KEY_VERSION: u32 = 2;

/// Most answers kept under one key for sampled requests (`llm-dedup-bucket`, `--bucket`).
pub const MAX_BUCKET: u8 = 20;

/// Whether a request on `route` asks for a sample, whose repeats may rightly differ: a
/// `temperature` absent (every provider's default is 1) or above 0, a `top_p` below 1, or
/// more than one choice (`n`). Only the generating routes sample; an embedding or a
/// moderation is a function of its input.
pub fn is_sampled(route: Route, body: &Value) -> bool {
    let generates = matches!(
        route,
        Route::ChatCompletions | Route::Completions | Route::Responses | Route::AnthropicMessages
    );
    if !generates {
        return false;
    }
    let number = |field: &str| body.get(field).and_then(Value::as_f64);
    let temperature = body.get("temperature").filter(|v| !v.is_null());
    temperature.is_none()
        || number("temperature").is_some_and(|t| t > 0.0)
        || number("top_p").is_some_and(|p| p < 1.0)
        || number("n").is_some_and(|n| n > 1.0)
}

/// Top-level request fields dropped from every cacheable route by default.
pub const DEFAULT_IGNORED_FIELDS: &[&str] = &[
    "user",
    "metadata",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
];

/// Fields that never change what the model says but that a Responses answer echoes back in
/// its response object: kept in the key on that route whatever the policy says, so that a hit
/// never hands one caller another caller's `user`, `metadata`, `safety_identifier`,
/// `prompt_cache_key` or `prompt_cache_retention`. (Rewriting them in the replayed answer instead would need the stored
/// body parsed and written again on every hit, streamed answers included.)
pub const ECHOED_FIELDS: &[&str] = &[
    "user",
    "metadata",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
];

/// The 32-byte name of a stored answer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// 64 lowercase hex characters.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// A key naming this key as seen by one credential partition: for tables that must keep
    /// partitions apart even when the cache is shared (the flights of embedding inputs).
    pub(crate) fn for_partition(&self, partition: &Partition) -> CacheKey {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"llm-dedup key for partition");
        hasher.update(&self.0);
        hasher.update(partition.as_bytes());
        CacheKey(*hasher.finalize().as_bytes())
    }

    /// The key of one embedding input: derived from `template`, the key of its request with
    /// no `input` (which covers everything else: namespace, upstream, path, credential,
    /// behaviour headers, the other fields), and the input's canonical form. A request is
    /// canonicalized once however many inputs it carries, and an input has the same key alone
    /// or in a list.
    pub(crate) fn of_input(template: &CacheKey, input: &Value) -> CacheKey {
        let canonical = canonical::canonical_value(input);
        let mut preimage = Vec::with_capacity(canonical.len() + 96);
        put(&mut preimage, b"llm-dedup embedding input");
        put(&mut preimage, &KEY_VERSION.to_le_bytes());
        put(&mut preimage, &template.0);
        put(&mut preimage, &canonical);
        CacheKey(*blake3::hash(&preimage).as_bytes())
    }

    /// The key answer `index` (from 0) of this key's bucket is stored under: the key itself
    /// for the first, a key derived from it for each other. A bucket's size is not part of
    /// any key: a larger bucket adds answers beside those already stored.
    pub fn slot(&self, index: u8) -> CacheKey {
        if index == 0 {
            return *self;
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"llm-dedup bucket answer");
        hasher.update(&self.0);
        hasher.update(&[index]);
        CacheKey(*hasher.finalize().as_bytes())
    }

    /// Every key an answer of this key's bucket can be stored under, the key itself first
    /// ([`MAX_BUCKET`] of them): what removing "the answers of a key" removes.
    pub fn bucket_keys(&self) -> impl Iterator<Item = CacheKey> + '_ {
        (0..MAX_BUCKET).map(|index| self.slot(index))
    }

    /// The key of these raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> CacheKey {
        CacheKey(bytes)
    }

    /// Parses 64 hex characters (either case); `None` for anything else.
    pub fn from_hex(hex: &str) -> Option<CacheKey> {
        blake3::Hash::from_hex(hex)
            .ok()
            .map(|h| CacheKey(*h.as_bytes()))
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({})", self.to_hex())
    }
}

/// Which top-level request fields are left out of the key because they never change the answer.
#[derive(Debug, Clone)]
pub struct KeyPolicy {
    ignored: Vec<String>,
}

impl Default for KeyPolicy {
    /// [`DEFAULT_IGNORED_FIELDS`] on every route.
    fn default() -> Self {
        KeyPolicy {
            ignored: DEFAULT_IGNORED_FIELDS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
        }
    }
}

impl KeyPolicy {
    /// A policy that drops exactly `fields`.
    pub fn with_ignored_fields<I, S>(fields: I) -> KeyPolicy
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        KeyPolicy {
            ignored: fields.into_iter().map(Into::into).collect(),
        }
    }

    fn ignores(&self, route: Route, field: &str) -> bool {
        if route == Route::Responses && ECHOED_FIELDS.contains(&field) {
            return false;
        }
        self.ignored.iter().any(|f| f == field)
    }
}

/// Everything that names a stored answer.
#[derive(Debug, Clone, Copy)]
pub struct KeyParts<'a> {
    /// Separate key space chosen by the client (`llm-dedup-namespace`), `""` by default.
    pub namespace: &'a str,
    /// The upstream base URL, with a keyed hash of the credentials it carries, if any (see
    /// `Upstream::identity`).
    pub upstream: &'a str,
    /// The HTTP method.
    pub method: &'a str,
    /// Path and query, the query's parameters in one order ([`canonical_path_and_query`]).
    pub path_and_query: &'a str,
    /// The credential partition.
    pub credential: CredentialFingerprint,
    /// Key headers `(lowercase name, value)`, in one form ([`KeyHeaders::of`]).
    pub behaviour: &'a [(&'a str, &'a [u8])],
    /// The canonical request body.
    pub body: &'a CanonicalBody,
    /// The body exactly as sent, when its canonical form may have lost digits of a number
    /// ([`Traits::inexact`]).
    pub exact_body: Option<&'a [u8]>,
}

impl KeyParts<'_> {
    /// Hashes the parts into a key.
    pub fn key(&self) -> CacheKey {
        // One buffer hashed once: blake3 pays a fixed cost per `update`, and the parts are small.
        let mut preimage = Vec::with_capacity(self.body.as_bytes().len() + 256);
        let p = &mut preimage;
        put(p, b"llm-dedup cache key");
        put(p, &KEY_VERSION.to_le_bytes());
        put(p, self.namespace.as_bytes());
        put(p, self.upstream.as_bytes());
        put(p, self.method.as_bytes());
        put(p, self.path_and_query.as_bytes());
        match self.credential.partition() {
            Some(partition) => put(p, partition.as_bytes()),
            None => put(p, b""),
        }
        put(p, &(self.behaviour.len() as u64).to_le_bytes());
        for (name, value) in self.behaviour {
            put(p, name.as_bytes());
            put(p, value);
        }
        put(p, self.body.as_bytes());
        if let Some(exact) = self.exact_body {
            put(p, b"exact body");
            put(p, exact);
        }
        CacheKey(*blake3::hash(&preimage).as_bytes())
    }
}

/// Appends `part` to a hash preimage, prefixed with its length.
fn put(preimage: &mut Vec<u8>, part: &[u8]) {
    preimage.extend_from_slice(&(part.len() as u64).to_le_bytes());
    preimage.extend_from_slice(part);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn canon(body: &Value) -> String {
        let c = CanonicalBody::new(Route::ChatCompletions, body, &KeyPolicy::default());
        String::from_utf8(c.as_bytes().to_vec()).expect("canonical form is UTF-8")
    }

    fn key_of(body: &Value) -> CacheKey {
        let body = CanonicalBody::new(Route::ChatCompletions, body, &KeyPolicy::default());
        KeyParts {
            namespace: "",
            upstream: "https://api.openai.com",
            method: "POST",
            path_and_query: "/v1/chat/completions",
            credential: CredentialFingerprint::new(&[7; 32], [("authorization", &b"Bearer a"[..])]),
            behaviour: &[],
            body: &body,
            exact_body: None,
        }
        .key()
    }

    /// A cookie tells callers apart only when they present no key, unless the operator named
    /// it; a key's cache is not split by the CDN cookies its SDK sends back.
    #[test]
    fn cookies_identify_a_caller_only_without_a_key_unless_named() {
        let defaults = CredentialHeaders::default();
        let p = |set: &CredentialHeaders, headers: &[(&str, &str)]| {
            set.partition(&[3; 32], headers.iter().map(|(n, v)| (*n, v.as_bytes())))
        };
        let key = ("authorization", "Bearer sk-1");
        assert_eq!(
            p(&defaults, &[key, ("cookie", "__cf_bm=a")]),
            p(&defaults, &[key, ("cookie", "__cf_bm=b")])
        );
        assert_eq!(p(&defaults, &[key, ("cookie", "a")]), p(&defaults, &[key]));
        assert_ne!(
            p(&defaults, &[("cookie", "a")]),
            p(&defaults, &[("cookie", "b")])
        );
        assert_ne!(p(&defaults, &[("cookie", "a")]), p(&defaults, &[]));
        let named = CredentialHeaders::with_extra(["Cookie"]).expect("valid");
        assert_ne!(
            p(&named, &[key, ("cookie", "a")]),
            p(&named, &[key, ("cookie", "b")])
        );
        assert!(CredentialHeaders::with_extra(["te"]).is_err());
        assert!(CredentialHeaders::with_extra(["bad name"]).is_err());
    }

    #[test]
    fn snapshot_chat_request() {
        let body: Value = serde_json::from_str(
            r#"{ "model": "gpt-4o-mini", "user": "u-42", "store": true, "temperature": 1.0,
                 "metadata": {"run": 7}, "seed": 12345678901234567890, "top_p": 5e-1,
                 "messages": [{"role": "user", "content": "Hi \"there\"\n\u00e9"}],
                 "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                    "schema": {"type": "object", "properties": {"z": {"type": "string"},
                    "a": {"type": "number", "maximum": 1E2}}}}} }"#,
        )
        .expect("valid JSON");
        insta::assert_snapshot!(canon(&body));
    }

    #[test]
    fn snapshot_tools_and_numbers() {
        let body = json!({
            "tools": [{"type": "function", "function": {"name": "f", "parameters":
                {"type": "object", "properties": {"zeta": {}, "alpha": {}}, "required": ["zeta"]}}}],
            "numbers": [0, -0.0, 1, 1.5, -2.25, 1e21, 0.1, 1e-7, 9007199254740993u64, -9007199254740993i64],
            "model": "m"
        });
        insta::assert_snapshot!(canon(&body));
    }

    #[test]
    fn snapshot_defaults_integers_and_anthropic_schemas() {
        let body: Value = serde_json::from_str(
            r#"{"model": "m", "stream": false, "n": 1, "max_tokens": 100.0, "seed": 1e2,
                "top_p": 1.0, "output_format": {"type": "json_schema",
                "schema": {"properties": {"name": {}, "age": {}}}},
                "output_config": {"format": {"schema": {"properties": {"b": {}, "a": {}}}}}}"#,
        )
        .expect("valid JSON");
        insta::assert_snapshot!(canon(&body));
    }

    /// What the pass over a body notes: objects one organization holds, state the provider
    /// can change, numbers that cannot be read exactly.
    #[test]
    fn the_canonical_pass_notes_private_objects_mutable_state_and_inexact_numbers() {
        let traits = |route: Route, body: Value| {
            CanonicalBody::with_traits(route, &body, &KeyPolicy::default(), 64).1
        };
        let plain = Traits::default();
        let private = Traits {
            private: true,
            ..plain
        };
        let mutable = Traits {
            mutable: true,
            ..plain
        };
        let both = Traits {
            private: true,
            mutable: true,
            ..plain
        };
        let cases = [
            (Route::ChatCompletions, json!({"model": "gpt-4o"}), plain),
            (
                Route::ChatCompletions,
                json!({"model": "ft:gpt-4o-mini:acme::abc"}),
                private,
            ),
            (
                Route::ChatCompletions,
                json!({"messages": [{"role": "user", "content": [
                    {"type": "file", "file": {"file_id": "file-abc"}}]}]}),
                private,
            ),
            (
                Route::Responses,
                json!({"input": [{"role": "user", "content": [
                    {"type": "input_file", "file_id": "file-orgAsecret"}]}]}),
                private,
            ),
            (
                Route::Responses,
                json!({"prompt": {"id": "pmpt_1", "version": "2"}}),
                private,
            ),
            (Route::Responses, json!({"prompt": {"id": "pmpt_1"}}), both),
            (
                Route::Responses,
                json!({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}),
                both,
            ),
            (
                Route::Responses,
                json!({"tools": [{"type": "web_search_preview"}]}),
                mutable,
            ),
            (
                Route::AnthropicMessages,
                json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
                mutable,
            ),
            (
                Route::AnthropicMessages,
                json!({"container": "container_011"}),
                private,
            ),
            (
                Route::AnthropicMessages,
                json!({"messages": [{"role": "user", "content": [
                    {"type": "document", "source": {"type": "file", "file_id": "file_011"}}]}]}),
                private,
            ),
            (
                Route::ChatCompletions,
                json!({"data_sources": [{"type": "azure_search"}]}),
                both,
            ),
            (
                Route::Responses,
                json!({"input": [{"type": "item_reference", "id": "msg_1"}]}),
                private,
            ),
            // A schema that happens to name a property `file_id` names no file.
            (
                Route::ChatCompletions,
                json!({"tools": [{"type": "function", "function": {"name": "f",
                    "parameters": {"properties": {"file_id": {"type": "string"}}}}}]}),
                plain,
            ),
            // A tool call's id is the model's, not an object of the organization.
            (
                Route::ChatCompletions,
                json!({"messages": [{"role": "tool", "tool_call_id": "call_1", "content": "x"}]}),
                plain,
            ),
        ];
        for (route, body, want) in cases {
            assert_eq!(traits(route, body.clone()), want, "{route:?} {body}");
        }
        let big: Value = serde_json::from_str(r#"{"seed": 18446744073709551616}"#).expect("json");
        assert!(traits(Route::ChatCompletions, big).inexact);
        let exact: Value = serde_json::from_str(r#"{"seed": 18446744073709551615}"#).expect("json");
        assert!(!traits(Route::ChatCompletions, exact).inexact);
    }

    #[test]
    fn key_headers_are_read_in_one_form() {
        let set = KeyHeaders::with_extra(["X-Gateway-Route"]).expect("valid");
        let of = |headers: &[(&'static str, &'static str)]| {
            set.of(headers.iter().map(|(n, v)| (*n, v.as_bytes())))
        };
        assert_eq!(
            of(&[("anthropic-beta", "a,b")]),
            of(&[("anthropic-beta", " b , a,a")])
        );
        assert_eq!(
            of(&[("anthropic-beta", "a,b")]),
            of(&[("anthropic-beta", "b"), ("anthropic-beta", "a")])
        );
        assert_ne!(
            of(&[("anthropic-beta", "a")]),
            of(&[("anthropic-beta", "a,b")])
        );
        assert_eq!(
            of(&[
                ("x-gateway-route", "1"),
                ("anthropic-version", "2023-06-01")
            ]),
            of(&[
                ("anthropic-version", "2023-06-01"),
                ("x-gateway-route", "1")
            ])
        );
        assert!(of(&[("user-agent", "x")]).is_empty());
        assert_eq!(of(&[("extra-parameters", "drop")]).len(), 1);
        assert!(KeyHeaders::with_extra(["authorization"]).is_err());
        assert!(KeyHeaders::with_extra(["connection"]).is_err());
        assert!(KeyHeaders::with_extra(["bad name"]).is_err());
        assert_eq!(
            canonical_path_and_query("/v1/x?b=2&api-version=1&&a=1"),
            "/v1/x?a=1&api-version=1&b=2"
        );
        assert_eq!(canonical_path_and_query("/v1/x?"), "/v1/x");
    }

    #[test]
    fn key_is_64_hex_and_round_trips() {
        let k = key_of(&json!({"model": "m"}));
        let hex = k.to_hex();
        assert_eq!(hex.len(), 64);
        assert!(
            hex.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(CacheKey::from_hex(&hex), Some(k));
        assert_eq!(CacheKey::from_hex("xyz"), None);
    }

    #[test]
    fn a_bucket_has_twenty_distinct_keys_the_first_its_own() {
        let k = key_of(&json!({"model": "m"}));
        let keys: Vec<CacheKey> = k.bucket_keys().collect();
        assert_eq!(keys.len(), usize::from(MAX_BUCKET));
        assert_eq!(keys[0], k);
        assert_eq!(keys[2], k.slot(2));
        let distinct: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len());
        // Another key's bucket shares none of them.
        let other = key_of(&json!({"model": "n"}));
        assert!(other.bucket_keys().all(|o| !distinct.contains(&o)));
    }

    #[test]
    fn sampled_requests_are_those_that_may_differ() {
        let chat = Route::ChatCompletions;
        for sampled in [
            json!({"model": "m"}),
            json!({"temperature": 0.7}),
            json!({"temperature": null}),
            json!({"temperature": 0, "top_p": 0.9}),
            json!({"temperature": 0, "n": 3}),
        ] {
            assert!(is_sampled(chat, &sampled), "{sampled}");
            assert!(is_sampled(Route::AnthropicMessages, &sampled), "{sampled}");
        }
        for fixed in [
            json!({"temperature": 0}),
            json!({"temperature": 0.0, "top_p": 1, "n": 1}),
        ] {
            assert!(!is_sampled(chat, &fixed), "{fixed}");
        }
        assert!(!is_sampled(Route::Embeddings, &json!({"input": "x"})));
        assert!(!is_sampled(Route::Moderations, &json!({"input": "x"})));
    }

    #[test]
    fn number_spellings_share_a_key() {
        let a: Value = serde_json::from_str(r#"{"temperature": 1}"#).expect("json");
        let b: Value = serde_json::from_str(r#"{"temperature": 1.0}"#).expect("json");
        let c: Value = serde_json::from_str(r#"{"temperature": 1e0}"#).expect("json");
        assert_eq!(key_of(&a), key_of(&b));
        assert_eq!(key_of(&a), key_of(&c));
        let d: Value = serde_json::from_str(r#"{"temperature": 1.01}"#).expect("json");
        assert_ne!(key_of(&a), key_of(&d));
    }

    #[test]
    fn large_seeds_are_never_merged() {
        let a: Value = serde_json::from_str(r#"{"seed": 9007199254740993}"#).expect("json");
        let b: Value = serde_json::from_str(r#"{"seed": 9007199254740992}"#).expect("json");
        assert_ne!(key_of(&a), key_of(&b));
    }

    #[test]
    fn schema_key_order_is_kept_but_other_order_is_not() {
        let a = json!({"model": "m", "response_format": {"type": "json_schema", "json_schema":
            {"name": "s", "schema": {"properties": {"b": {}, "a": {}}}}}});
        let b = json!({"response_format": {"json_schema": {"schema": {"properties": {"b": {}, "a": {}}},
            "name": "s"}, "type": "json_schema"}, "model": "m"});
        let c = json!({"model": "m", "response_format": {"type": "json_schema", "json_schema":
            {"name": "s", "schema": {"properties": {"a": {}, "b": {}}}}}});
        assert_eq!(key_of(&a), key_of(&b));
        assert_ne!(key_of(&a), key_of(&c));
    }

    #[test]
    fn ignored_fields_do_not_matter_and_are_configurable() {
        let plain = json!({"model": "m"});
        let noisy = json!({"model": "m", "user": "u", "metadata": {"a": 1}, "store": false,
            "safety_identifier": "s", "prompt_cache_key": "p", "prompt_cache_retention": "24h"});
        assert_eq!(key_of(&plain), key_of(&noisy));
        let strict = KeyPolicy::with_ignored_fields(Vec::<String>::new());
        let a = CanonicalBody::new(Route::ChatCompletions, &json!({"user": "a"}), &strict);
        let b = CanonicalBody::new(Route::ChatCompletions, &json!({"user": "b"}), &strict);
        assert_ne!(a, b);
        // `store` matters on the Responses API (it is stateful there), and its default
        // (`true`) written out is the same request as leaving it out.
        let p = KeyPolicy::default();
        let a = CanonicalBody::new(Route::Responses, &json!({"store": false}), &p);
        let b = CanonicalBody::new(Route::Responses, &json!({}), &p);
        let c = CanonicalBody::new(Route::Responses, &json!({"store": true}), &p);
        assert_ne!(a, b);
        assert_eq!(b, c);
        assert!(bound_to_partition(Route::Responses, &json!({})));
        assert!(bound_to_partition(
            Route::Responses,
            &json!({"store": true})
        ));
        assert!(!bound_to_partition(
            Route::Responses,
            &json!({"store": false})
        ));
        assert!(!bound_to_partition(Route::ChatCompletions, &json!({})));
    }

    #[test]
    fn every_part_of_the_key_matters() {
        let body = CanonicalBody::new(
            Route::ChatCompletions,
            &json!({"model": "m"}),
            &KeyPolicy::default(),
        );
        let cred = CredentialFingerprint::new(&[1; 32], [("authorization", &b"Bearer a"[..])]);
        let base = KeyParts {
            namespace: "",
            upstream: "https://api.openai.com",
            method: "POST",
            path_and_query: "/v1/chat/completions",
            credential: cred,
            behaviour: &[],
            body: &body,
            exact_body: None,
        };
        let other_body = CanonicalBody::new(
            Route::ChatCompletions,
            &json!({"model": "n"}),
            &KeyPolicy::default(),
        );
        let variants = [
            KeyParts {
                namespace: "ns",
                ..base
            },
            KeyParts {
                upstream: "https://example.com",
                ..base
            },
            KeyParts {
                method: "PUT",
                ..base
            },
            KeyParts {
                path_and_query: "/v1/chat/completions?api-version=2",
                ..base
            },
            KeyParts {
                credential: CredentialFingerprint::new(
                    &[1; 32],
                    [("authorization", &b"Bearer b"[..])],
                ),
                ..base
            },
            KeyParts {
                credential: CredentialFingerprint::SHARED,
                ..base
            },
            KeyParts {
                behaviour: &[("anthropic-version", b"2023-06-01")],
                ..base
            },
            KeyParts {
                body: &other_body,
                ..base
            },
            KeyParts {
                exact_body: Some(b"{}"),
                ..base
            },
        ];
        let k = base.key();
        for v in variants {
            assert_ne!(v.key(), k, "{v:?}");
        }
    }

    #[test]
    fn fingerprint_depends_on_salt_and_ignores_other_headers() {
        let h = [
            ("authorization", &b"Bearer sk-1"[..]),
            ("user-agent", &b"x"[..]),
        ];
        let a = CredentialFingerprint::new(&[1; 32], h);
        let b = CredentialFingerprint::new(&[2; 32], h);
        assert_ne!(a, b);
        let c = CredentialFingerprint::new(&[1; 32], [("authorization", &b"Bearer sk-1"[..])]);
        assert_eq!(a, c);
    }

    /// Arbitrary JSON, with nesting bounded like serde_json's parser bounds it.
    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| json!(i)),
            any::<u64>().prop_map(|u| json!(u)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            ".{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(5, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((".{0,8}", inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// The same value with every object's keys in reverse order.
    fn reversed(v: &Value) -> Value {
        match v {
            Value::Array(a) => Value::Array(a.iter().map(reversed).collect()),
            Value::Object(m) => Value::Object(
                m.iter()
                    .rev()
                    .map(|(k, v)| (k.clone(), reversed(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    proptest! {
        #![proptest_config(crate::fuzzing::config())]

        /// Fuzz target (a): whatever bytes arrive, keying never panics, and what parses has
        /// one canonical form whatever its spelling.
        #[test]
        fn arbitrary_bytes_never_panic_and_parse_to_one_canonical_form(
            bytes in prop::collection::vec(any::<u8>(), 0..512),
            json in arb_json(),
        ) {
            // Arbitrary bytes, and arbitrary JSON with bytes spliced into its text.
            let mut spliced = serde_json::to_vec(&json).expect("serializable");
            let at = bytes.len() % (spliced.len() + 1);
            spliced.splice(at..at, bytes.iter().copied().take(8));
            for candidate in [&bytes, &spliced] {
                if let Ok(v) = serde_json::from_slice::<Value>(candidate) {
                    let c = CanonicalBody::new(Route::ChatCompletions, &v, &KeyPolicy::default());
                    let back: Value = serde_json::from_slice(c.as_bytes()).expect("valid JSON");
                    let again = CanonicalBody::new(Route::ChatCompletions, &back, &KeyPolicy::default());
                    prop_assert_eq!(&c, &again);
                    let _ = key_of(&v);
                }
            }
        }

        #[test]
        fn canonical_form_is_valid_json_and_a_fixed_point(v in arb_json()) {
            let c = CanonicalBody::new(Route::Embeddings, &v, &KeyPolicy::default());
            let back: Value = serde_json::from_slice(c.as_bytes()).expect("canonical form parses");
            let again = CanonicalBody::new(Route::Embeddings, &back, &KeyPolicy::default());
            prop_assert_eq!(c, again);
        }

        #[test]
        fn key_ignores_key_order_and_whitespace(v in arb_json()) {
            let pretty = serde_json::to_string_pretty(&v).expect("serializable");
            let reparsed: Value = serde_json::from_str(&pretty).expect("parses");
            prop_assert_eq!(key_of(&v), key_of(&reparsed));
            prop_assert_eq!(key_of(&v), key_of(&reversed(&v)));
        }

        #[test]
        fn key_changes_with_each_semantic_field(
            field in prop::sample::select(vec!["model", "messages", "temperature", "top_p", "n",
                "seed", "stop", "max_tokens", "tools", "tool_choice", "response_format",
                "logit_bias", "presence_penalty", "frequency_penalty", "input", "dimensions",
                "encoding_format", "reasoning_effort", "stream"]),
            a in arb_json(), b in arb_json())
        {
            prop_assume!(canon(&a) != canon(&b));
            let base = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
            let mut x = base.clone();
            let mut y = base;
            x[field] = a;
            y[field] = b;
            prop_assert_ne!(key_of(&x), key_of(&y));
        }
    }
}
