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
//! fingerprint ‖ behaviour headers ‖ canonical body)`, every part prefixed with its length as a
//! little-endian `u64`, shown as 64 lowercase hex characters.
//!
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
//!   the fingerprint is empty.
//! - **Behaviour headers** are request headers that change the answer: `anthropic-version`,
//!   `anthropic-beta`, `openai-beta`. Transport headers, `User-Agent`, `x-stainless-*`,
//!   `traceparent` and request ids never enter the key.
//! - The **query** is part of the path (Azure's `api-version` changes the answer).
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
//!   `user`, `metadata`, `safety_identifier`, `prompt_cache_key`, `prompt_cache_retention`, and
//!   `store` on chat completions) — except, on the Responses API, the fields its answer echoes
//!   back ([`ECHOED_FIELDS`]): dropping those would replay one caller's values to another.
//! - Object keys are sorted by their UTF-8 bytes, **except** inside JSON schemas
//!   (`response_format.json_schema.schema`, `text.format.schema`, `tools[].function.parameters`,
//!   `tools[].parameters`, `tools[].input_schema`, `functions[].parameters`), where key order
//!   steers the order of the model's output and is kept as sent.
//! - Numbers are written in one form, after RFC 8785: integers as decimal integers; a
//!   fractional number, or an integral one beyond ±2^53, in the shortest form that reads back
//!   to the same `f64`; an integral float within ±2^53 as an integer, so `1`, `1.0` and `1e0`
//!   are one number; `-0` as `0`. Integers that do not fit an `f64` exactly (large `seed`s) keep
//!   all their digits, so two such seeds are never merged.
//! - Strings are written with JSON's minimal escaping; no whitespace anywhere.
//!
//! This file is longer than most on purpose: the canonical form is one thing, and about half
//! of it is the snapshot and property tests that pin that form, kept beside it.
//!
//! `stream` is an ordinary field and stays in the key: a streamed and a non-streamed request
//! never share an entry, because one stored form cannot yet be rendered both ways faithfully.

use std::fmt;

use serde_json::{Map, Number, Value};

use crate::route::Route;

/// Version of the canonical form and key layout. Bump it on any change to either: old entries
/// then simply stop matching, which is the safe failure.
pub const KEY_VERSION: u32 = 2;

pub use crate::headers::{
    BEHAVIOUR_HEADERS, CONTEXT_HEADERS, CREDENTIAL_HEADERS, FALLBACK_CREDENTIAL_HEADERS,
};

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
/// never hands one caller another caller's `user`, `metadata`, `safety_identifier` or
/// `prompt_cache_key`. (Rewriting them in the replayed answer instead would need the stored
/// body parsed and written again on every hit, streamed answers included.)
pub const ECHOED_FIELDS: &[&str] = &["user", "metadata", "safety_identifier", "prompt_cache_key"];

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
    pub fn for_partition(&self, partition: &Partition) -> CacheKey {
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
    pub fn of_input(template: &CacheKey, input: &Value) -> CacheKey {
        let mut canonical = Vec::with_capacity(64);
        write_value(&mut canonical, input, SchemaMatcher::Outside);
        let mut preimage = Vec::with_capacity(canonical.len() + 96);
        put(&mut preimage, b"llm-dedup embedding input");
        put(&mut preimage, &KEY_VERSION.to_le_bytes());
        put(&mut preimage, &template.0);
        put(&mut preimage, &canonical);
        CacheKey(*blake3::hash(&preimage).as_bytes())
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
    /// [`DEFAULT_IGNORED_FIELDS`] on every route, plus `store` on chat completions.
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
    /// A policy that drops exactly `fields` (plus `store` on chat completions, which only asks
    /// the provider to keep a copy and never changes the answer).
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
        (route == Route::ChatCompletions && field == "store")
            || self.ignored.iter().any(|f| f == field)
    }
}

/// A request body in canonical form (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalBody(Vec<u8>);

impl CanonicalBody {
    /// Writes `body` in canonical form for `route` under `policy`.
    pub fn new(route: Route, body: &Value, policy: &KeyPolicy) -> CanonicalBody {
        CanonicalBody::with_capacity(route, body, policy, 256)
    }

    /// As [`CanonicalBody::new`], reserving `capacity` bytes up front (the size of the request
    /// body as sent is a good guess: the canonical form has no whitespace).
    pub fn with_capacity(
        route: Route,
        body: &Value,
        policy: &KeyPolicy,
        capacity: usize,
    ) -> CanonicalBody {
        let mut out = Vec::with_capacity(capacity);
        match body {
            Value::Object(map) => write_fields(
                &mut out,
                map.iter()
                    .filter(|(k, v)| !policy.ignores(route, k) && !is_default(route, k, v))
                    .collect(),
                SchemaMatcher::ROOT,
            ),
            other => write_value(&mut out, other, SchemaMatcher::ROOT),
        }
        CanonicalBody(out)
    }

    /// The canonical bytes (valid, compact JSON).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Top-level fields whose documented default value, written out, means what leaving them out
/// means: read as absent, so both spellings share an entry.
const DEFAULTS: &[(Route, &str, &str)] = &[
    // The Responses API stores a response unless told `store: false`.
    (Route::Responses, "store", "true"),
];

/// Whether `field` of a request on `route` holds its documented default (see [`DEFAULTS`]).
fn is_default(route: Route, field: &str, value: &Value) -> bool {
    DEFAULTS.iter().any(|(r, f, default)| {
        *r == route
            && *f == field
            && serde_json::from_str::<Value>(default).is_ok_and(|d| d == *value)
    })
}

/// Whether the answer to a request on `route` with this `body` belongs to the credential
/// partition that asked, even with a shared cache: the provider keeps it for that caller's
/// organization, and what it names (the answer's id) means nothing to another's. A Responses
/// request is such a request unless it says `store: false`.
pub fn bound_to_partition(route: Route, body: &Value) -> bool {
    route == Route::Responses && body.get("store") != Some(&Value::Bool(false))
}

/// Paths (from the body's root) of subtrees whose key order is kept as sent.
const SCHEMA_PATHS: &[&[Seg<'static>]] = &[
    &[
        Seg::Key("response_format"),
        Seg::Key("json_schema"),
        Seg::Key("schema"),
    ],
    &[Seg::Key("text"), Seg::Key("format"), Seg::Key("schema")],
    &[
        Seg::Key("tools"),
        Seg::Index,
        Seg::Key("function"),
        Seg::Key("parameters"),
    ],
    &[Seg::Key("tools"), Seg::Index, Seg::Key("parameters")],
    &[Seg::Key("tools"), Seg::Index, Seg::Key("input_schema")],
    &[Seg::Key("functions"), Seg::Index, Seg::Key("parameters")],
];

#[derive(Clone, Copy)]
enum Seg<'a> {
    Key(&'a str),
    Index,
}

/// Tracks which [`SCHEMA_PATHS`] the current position may still lie on.
#[derive(Clone, Copy)]
enum SchemaMatcher {
    /// `live` is a bit set of candidate paths, `depth` how many segments have matched.
    Candidates { live: u8, depth: u8 },
    /// Inside a schema: keep key order.
    InSchema,
    /// On no schema path: sort keys, stop checking.
    Outside,
}

impl SchemaMatcher {
    const ROOT: SchemaMatcher = SchemaMatcher::Candidates {
        live: (1u8 << SCHEMA_PATHS.len()) - 1,
        depth: 0,
    };

    fn descend(self, seg: Seg<'_>) -> SchemaMatcher {
        let SchemaMatcher::Candidates { live, depth } = self else {
            return self;
        };
        let depth = usize::from(depth);
        let mut next = 0u8;
        for (i, path) in SCHEMA_PATHS.iter().enumerate() {
            if live & (1 << i) == 0 {
                continue;
            }
            let matches = match (path.get(depth), seg) {
                (Some(Seg::Key(want)), Seg::Key(got)) => *want == got,
                (Some(Seg::Index), Seg::Index) => true,
                _ => false,
            };
            if matches {
                if path.len() == depth + 1 {
                    return SchemaMatcher::InSchema;
                }
                next |= 1 << i;
            }
        }
        if next == 0 {
            SchemaMatcher::Outside
        } else {
            SchemaMatcher::Candidates {
                live: next,
                // SCHEMA_PATHS are at most 4 long, so this never overflows.
                depth: (depth + 1) as u8,
            }
        }
    }
}

fn write_value(out: &mut Vec<u8>, value: &Value, at: SchemaMatcher) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item, at.descend(Seg::Index));
            }
            out.push(b']');
        }
        Value::Object(map) => write_object(out, map, at),
    }
}

fn write_object(out: &mut Vec<u8>, map: &Map<String, Value>, at: SchemaMatcher) {
    write_fields(out, map.iter().collect(), at);
}

fn write_fields(out: &mut Vec<u8>, mut fields: Vec<(&String, &Value)>, at: SchemaMatcher) {
    if !matches!(at, SchemaMatcher::InSchema) {
        fields.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    }
    out.push(b'{');
    for (i, (k, v)) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(out, k);
        out.push(b':');
        write_value(out, v, at.descend(Seg::Key(k)));
    }
    out.push(b'}');
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    // serde_json's string escaping is deterministic and minimal; writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Largest magnitude below which every integer is exactly representable in an `f64`.
const F64_EXACT_INT: f64 = 9_007_199_254_740_992.0; // 2^53

fn write_number(out: &mut Vec<u8>, n: &Number) {
    if let Some(u) = n.as_u64() {
        out.extend_from_slice(u.to_string().as_bytes());
    } else if let Some(i) = n.as_i64() {
        out.extend_from_slice(i.to_string().as_bytes());
    } else if let Some(f) = n.as_f64() {
        if f == 0.0 {
            out.push(b'0');
        } else if f.fract() == 0.0 && f.abs() < F64_EXACT_INT {
            // Integral and exact: the integer form, so 1.0 and 1e0 equal 1.
            out.extend_from_slice((f as i64).to_string().as_bytes());
        } else {
            // Shortest round-trip form; the same f64 always prints the same way.
            let _ = serde_json::to_writer(&mut *out, &f);
        }
    }
}

/// The credential partition of a request: a keyed blake3 hash of its credential headers under
/// the database's salt. Rate budgets are kept per partition, and so is the cache unless it is
/// shared. It cannot be turned back into the credential, nor tested against a guessed one
/// without the salt.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition([u8; 32]);

impl Partition {
    /// The partition of the credential headers `(lowercase name, value)` under `salt`, with
    /// the default credential headers ([`CREDENTIAL_HEADERS`]); see [`CredentialHeaders`].
    pub fn new<'a, I>(salt: &[u8; 32], headers: I) -> Partition
    where
        I: IntoIterator<Item = (&'a str, &'a [u8])>,
    {
        CredentialHeaders::default().partition(salt, headers)
    }

    /// A partition from its raw bytes (as [`Partition::as_bytes`] gave them).
    pub fn from_bytes(bytes: [u8; 32]) -> Partition {
        Partition(bytes)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A prefix is enough to tell partitions apart in a log or a test failure.
        let hex = blake3::Hash::from_bytes(self.0).to_hex();
        write!(f, "Partition({}…)", &hex[..12])
    }
}

/// The request headers that identify a caller: [`CREDENTIAL_HEADERS`] (secrets), then, for a
/// request that presents none of those, [`FALLBACK_CREDENTIAL_HEADERS`] (`Cookie`); whatever
/// the operator adds (`--credential-header`) for a gateway that authenticates otherwise; and,
/// beside any of these, [`CONTEXT_HEADERS`] (organization, project), which tell apart callers
/// of one credential but never stand in for one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialHeaders {
    /// Secrets: headers that always count.
    always: Vec<String>,
    /// Headers that always count too, but are no secret: their presence does not make the
    /// fallbacks count less.
    context: Vec<String>,
    /// Headers that count when none of `always` is present.
    fallback: Vec<String>,
}

impl Default for CredentialHeaders {
    fn default() -> Self {
        let owned = |names: &[&str]| names.iter().map(|s| (*s).to_owned()).collect();
        CredentialHeaders {
            always: owned(CREDENTIAL_HEADERS),
            context: owned(CONTEXT_HEADERS),
            fallback: owned(FALLBACK_CREDENTIAL_HEADERS),
        }
    }
}

impl CredentialHeaders {
    /// The default set and `extra` header names (any case), which always count (naming a
    /// fallback header such as `cookie` makes it count always). A name that is not a valid
    /// header name, or one that never reaches the upstream (hop-by-hop, `host`, llm-dedup's
    /// own controls), is an error naming it.
    pub fn with_extra<I, S>(extra: I) -> Result<CredentialHeaders, String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut set = CredentialHeaders::default();
        for name in extra {
            let name = name.as_ref().trim();
            let parsed = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{name:?} is not a header name"))?;
            let lower = parsed.as_str();
            let never_forwarded = crate::headers::HOP_BY_HOP.contains(&lower)
                && lower != crate::headers::PROXY_AUTHORIZATION;
            if never_forwarded
                || matches!(lower, "host" | "content-length" | "content-type")
                || lower.starts_with("llm-dedup-")
            {
                return Err(format!(
                    "{name:?} cannot identify a caller: it is a transport or control header"
                ));
            }
            set.fallback.retain(|n| n != lower);
            set.context.retain(|n| n != lower);
            if !set.always.iter().any(|n| n == lower) {
                set.always.push(lower.to_owned());
            }
        }
        Ok(set)
    }

    /// Whether `name` (lowercase) may identify a caller.
    #[inline]
    pub fn contains(&self, name: &str) -> bool {
        self.names().any(|n| n == name)
    }

    /// The names, lowercase: the secrets, the context headers, then the fallbacks.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.always
            .iter()
            .chain(&self.context)
            .chain(&self.fallback)
            .map(String::as_str)
    }

    /// The partition of a request's headers `(lowercase name, value)` under `salt`: a keyed
    /// hash of its credential headers (the fallbacks only when no secret is present) and its
    /// context headers. The order of `headers` does not matter; a request with none has the
    /// partition of "no credential".
    pub fn partition<'a, I>(&self, salt: &[u8; 32], headers: I) -> Partition
    where
        I: IntoIterator<Item = (&'a str, &'a [u8])>,
    {
        let mut found: Vec<(&str, &[u8])> = Vec::new();
        let mut fallback: Vec<(&str, &[u8])> = Vec::new();
        let mut context: Vec<(&str, &[u8])> = Vec::new();
        for (name, value) in headers {
            if self.always.iter().any(|n| n == name) {
                found.push((name, value));
            } else if self.context.iter().any(|n| n == name) {
                context.push((name, value));
            } else if self.fallback.iter().any(|n| n == name) {
                fallback.push((name, value));
            }
        }
        if found.is_empty() {
            found = fallback;
        }
        found.append(&mut context);
        found.sort_unstable();
        let mut preimage = Vec::with_capacity(128);
        for (name, value) in found {
            put(&mut preimage, name.as_bytes());
            put(&mut preimage, value);
        }
        Partition(*blake3::keyed_hash(salt, &preimage).as_bytes())
    }
}

/// What the key says about who asked: the credential partition, or nothing when the cache is
/// shared.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CredentialFingerprint(Option<Partition>);

impl CredentialFingerprint {
    /// The fingerprint used with a shared cache: every caller gets the same one.
    pub const SHARED: CredentialFingerprint = CredentialFingerprint(None);

    /// The fingerprint of a partition.
    pub fn of(partition: Partition) -> CredentialFingerprint {
        CredentialFingerprint(Some(partition))
    }

    /// Fingerprints the credential headers `(lowercase name, value)` under `salt` (see
    /// [`Partition::new`]).
    pub fn new<'a, I>(salt: &[u8; 32], headers: I) -> CredentialFingerprint
    where
        I: IntoIterator<Item = (&'a str, &'a [u8])>,
    {
        CredentialFingerprint::of(Partition::new(salt, headers))
    }
}

/// Everything that names a stored answer.
#[derive(Debug, Clone, Copy)]
pub struct KeyParts<'a> {
    /// Separate key space chosen by the client (`llm-dedup-namespace`), `""` by default.
    pub namespace: &'a str,
    /// The upstream base URL.
    pub upstream: &'a str,
    /// The HTTP method.
    pub method: &'a str,
    /// Path and query, as sent.
    pub path_and_query: &'a str,
    /// The credential partition.
    pub credential: CredentialFingerprint,
    /// Behaviour headers `(lowercase name, value)`, in a stable order (see [`BEHAVIOUR_HEADERS`]).
    pub behaviour: &'a [(&'a str, &'a [u8])],
    /// The canonical request body.
    pub body: &'a CanonicalBody,
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
        match &self.credential.0 {
            Some(partition) => put(p, partition.as_bytes()),
            None => put(p, b""),
        }
        put(p, &(self.behaviour.len() as u64).to_le_bytes());
        for (name, value) in self.behaviour {
            put(p, name.as_bytes());
            put(p, value);
        }
        put(p, self.body.as_bytes());
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
        let noisy = json!({"model": "m", "user": "u", "metadata": {"a": 1}, "store": true,
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
