//! The canonical form of a request body, and what writing it learns of the request: the
//! specification is the module documentation of [`crate::key`].

use serde_json::{Map, Number, Value};

use super::KeyPolicy;
use crate::route::Route;

/// A request body in canonical form (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalBody(Vec<u8>);

impl CanonicalBody {
    /// Writes `body` in canonical form for `route` under `policy`.
    pub fn new(route: Route, body: &Value, policy: &KeyPolicy) -> CanonicalBody {
        CanonicalBody::with_traits(route, body, policy, 256).0
    }

    /// As [`CanonicalBody::new`], reserving `capacity` bytes up front (the size of the request
    /// body as sent is a good guess: the canonical form has no whitespace).
    pub fn with_capacity(
        route: Route,
        body: &Value,
        policy: &KeyPolicy,
        capacity: usize,
    ) -> CanonicalBody {
        CanonicalBody::with_traits(route, body, policy, capacity).0
    }

    /// As [`CanonicalBody::with_capacity`], with what the same pass over the body learned of
    /// the request ([`Traits`]).
    pub fn with_traits(
        route: Route,
        body: &Value,
        policy: &KeyPolicy,
        capacity: usize,
    ) -> (CanonicalBody, Traits) {
        let mut writer = Writer {
            out: Vec::with_capacity(capacity),
            traits: Traits::default(),
        };
        match body {
            Value::Object(map) => {
                writer.traits.note_top_level(route, map);
                let fields = map
                    .iter()
                    .filter(|(k, v)| !policy.ignores(route, k) && !is_default(route, k, v))
                    .collect();
                writer.write_fields(fields, SchemaMatcher::ROOT);
            }
            other => writer.write_value(other, SchemaMatcher::ROOT),
        }
        (CanonicalBody(writer.out), writer.traits)
    }

    /// The canonical bytes (valid, compact JSON).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// What the pass that writes a request's canonical form learns of it besides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traits {
    /// It names an object one organization holds (a file, a vector store, a stored prompt, a
    /// container, a fine-tuned model, a data source): another organization would be refused
    /// it, so its answer stays with the credential partition that asked, even with a shared
    /// cache.
    pub private: bool,
    /// Its answer follows state the provider can change (the latest version of a stored
    /// prompt, a vector store, the web, a remote MCP server, an Azure data source): cached only
    /// when the caller asks for a lifetime.
    pub mutable: bool,
    /// It holds a number that cannot be read exactly (an integer beyond the 64-bit range, a
    /// magnitude past 2^53): its exact bytes are part of the key too, so two such numbers
    /// never merge.
    pub inexact: bool,
}

/// Object keys that name an object one organization holds, wherever they are (outside JSON
/// schemas): OpenAI's file inputs (`file_id` in Chat `file` parts, Responses `input_file` and
/// `input_image`; `file_ids` of a code interpreter container), `vector_store_ids` (the
/// `file_search` tool), Anthropic's Files API (`source: {type: "file", file_id}`) and skills
/// (`skill_id`), and container ids.
const PRIVATE_KEYS: &[&str] = &[
    "file_id",
    "file_ids",
    "vector_store_ids",
    "container_id",
    "skill_id",
];

/// Tool types whose answer reads state the provider can change between two identical
/// requests (a prefix: versioned names like `web_search_20250305` count too).
const MUTABLE_TOOLS: &[&str] = &["file_search", "web_search", "web_fetch", "mcp"];

impl Traits {
    /// What the top-level fields of a request on `route` say of it.
    fn note_top_level(&mut self, route: Route, map: &Map<String, Value>) {
        let present = |field: &str| !matches!(map.get(field), None | Some(Value::Null));
        // A fine-tuned model is its organization's (`ft:gpt-4o-mini:org:suffix:id`).
        if map
            .get("model")
            .and_then(Value::as_str)
            .is_some_and(|m| m.starts_with("ft:"))
        {
            self.private = true;
        }
        // A stored prompt (Responses): its organization's; unversioned, it follows the latest.
        if let Some(prompt) = map.get("prompt").and_then(Value::as_object)
            && prompt.contains_key("id")
        {
            self.private = true;
            if matches!(prompt.get("version"), None | Some(Value::Null)) {
                self.mutable = true;
            }
        }
        // Azure On Your Data and Anthropic's remote MCP servers: the caller's own indexes and
        // servers (with their credentials), read as they are now.
        if present("data_sources") || present("mcp_servers") {
            self.private = true;
            self.mutable = true;
        }
        // Anthropic's code execution container, or a container of a Responses tool.
        if present("container") {
            self.private = true;
        }
        if let Some(tools) = map.get("tools").and_then(Value::as_array) {
            for tool in tools {
                let kind = tool.get("type").and_then(Value::as_str).unwrap_or("");
                if MUTABLE_TOOLS.iter().any(|t| kind.starts_with(t)) {
                    self.mutable = true;
                    if kind == "file_search" || kind.starts_with("mcp") {
                        self.private = true;
                    }
                }
                if tool.get("container").is_some_and(Value::is_string) {
                    self.private = true;
                }
            }
        }
        // A Responses input item stored by an earlier call.
        if route == Route::Responses
            && let Some(items) = map.get("input").and_then(Value::as_array)
            && items
                .iter()
                .any(|item| item.get("type").and_then(Value::as_str) == Some("item_reference"))
        {
            self.private = true;
        }
    }
}

/// Top-level fields whose documented default value, written out, means what leaving them out
/// means: read as absent, so both spellings share an entry.
const DEFAULTS: &[(&[Route], &str, DefaultValue)] = &[
    // Every route that streams: not streamed unless asked.
    (
        &[
            Route::ChatCompletions,
            Route::Completions,
            Route::Responses,
            Route::AnthropicMessages,
        ],
        "stream",
        DefaultValue::Bool(false),
    ),
    // One choice unless asked for more.
    (
        &[Route::ChatCompletions, Route::Completions],
        "n",
        DefaultValue::Int(1),
    ),
    // Chat Completions stores a completion only when told `store: true`.
    (
        &[Route::ChatCompletions],
        "store",
        DefaultValue::Bool(false),
    ),
    // The Responses API stores a response unless told `store: false`.
    (&[Route::Responses], "store", DefaultValue::Bool(true)),
];

/// A documented default value.
#[derive(Clone, Copy)]
enum DefaultValue {
    Bool(bool),
    Int(u64),
}

/// Whether `field` of a request on `route` holds its documented default (see [`DEFAULTS`]). An
/// integer default matches only an integer spelling (`1`, not `1.0`).
fn is_default(route: Route, field: &str, value: &Value) -> bool {
    DEFAULTS.iter().any(|(routes, f, default)| {
        *f == field
            && routes.contains(&route)
            && match default {
                DefaultValue::Bool(b) => value.as_bool() == Some(*b),
                DefaultValue::Int(n) => value.as_u64() == Some(*n),
            }
    })
}

/// Top-level fields the providers type as integers: a number written with a fraction or an
/// exponent there (`100.0`, `1e2`) is another request (OpenAI refuses it with `400
/// invalid_type`), never answered with the integer's entry.
const INTEGER_FIELDS: &[&str] = &[
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "seed",
    "top_logprobs",
    "logprobs",
    "dimensions",
    "best_of",
    "top_k",
];

/// Whether the answer to a request on `route` with this `body` belongs to the credential
/// partition that asked, even with a shared cache: the provider keeps it for that caller's
/// organization, and what it names (the answer's id) means nothing to another's. A Responses
/// request is such a request unless it says `store: false`.
pub fn bound_to_partition(route: Route, body: &Value) -> bool {
    route == Route::Responses && body.get("store") != Some(&Value::Bool(false))
}

/// Paths (from the body's root) of subtrees whose key order is kept as sent: wherever a
/// provider reads a JSON schema.
const SCHEMA_PATHS: &[&[Seg<'static>]] = &[
    // OpenAI Chat Completions structured output.
    &[
        Seg::Key("response_format"),
        Seg::Key("json_schema"),
        Seg::Key("schema"),
    ],
    // OpenAI Responses structured output.
    &[Seg::Key("text"), Seg::Key("format"), Seg::Key("schema")],
    // Anthropic structured outputs (the beta's `output_format`, then `output_config.format`).
    &[Seg::Key("output_format"), Seg::Key("schema")],
    &[
        Seg::Key("output_config"),
        Seg::Key("format"),
        Seg::Key("schema"),
    ],
    // Function tools: Chat, Responses, Anthropic, legacy functions.
    &[
        Seg::Key("tools"),
        Seg::Index,
        Seg::Key("function"),
        Seg::Key("parameters"),
    ],
    &[Seg::Key("tools"), Seg::Index, Seg::Key("parameters")],
    &[Seg::Key("tools"), Seg::Index, Seg::Key("input_schema")],
    &[Seg::Key("functions"), Seg::Index, Seg::Key("parameters")],
    // vLLM's guided decoding (OpenAI-compatible servers).
    &[Seg::Key("guided_json")],
];

#[derive(Clone, Copy)]
enum Seg<'a> {
    Key(&'a str),
    Index,
}

/// Words of the bit set of [`SCHEMA_PATHS`]: as many as the list needs.
const PATH_WORDS: usize = SCHEMA_PATHS.len().div_ceil(64);

/// Tracks which [`SCHEMA_PATHS`] the current position may still lie on.
#[derive(Clone, Copy)]
enum SchemaMatcher {
    /// `live` is a bit set of candidate paths, `depth` how many segments have matched.
    Candidates {
        live: [u64; PATH_WORDS],
        depth: usize,
    },
    /// Inside a schema: keep key order.
    InSchema,
    /// On no schema path: sort keys, stop checking.
    Outside,
}

impl SchemaMatcher {
    const ROOT: SchemaMatcher = SchemaMatcher::Candidates {
        live: every_path(),
        depth: 0,
    };

    fn descend(self, seg: Seg<'_>) -> SchemaMatcher {
        let SchemaMatcher::Candidates { live, depth } = self else {
            return self;
        };
        let mut next = [0u64; PATH_WORDS];
        for (i, path) in SCHEMA_PATHS.iter().enumerate() {
            let (word, bit) = (i / 64, 1u64 << (i % 64));
            if live[word] & bit == 0 {
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
                next[word] |= bit;
            }
        }
        if next.iter().all(|w| *w == 0) {
            SchemaMatcher::Outside
        } else {
            SchemaMatcher::Candidates {
                live: next,
                depth: depth + 1,
            }
        }
    }
}

/// A bit set with one bit for each of [`SCHEMA_PATHS`].
const fn every_path() -> [u64; PATH_WORDS] {
    let mut live = [0u64; PATH_WORDS];
    let mut i = 0;
    while i < SCHEMA_PATHS.len() {
        live[i / 64] |= 1 << (i % 64);
        i += 1;
    }
    live
}

/// The canonical form of a value outside any schema (an embedding input).
pub(super) fn canonical_value(value: &Value) -> Vec<u8> {
    let mut writer = Writer {
        out: Vec::with_capacity(64),
        traits: Traits::default(),
    };
    writer.write_value(value, SchemaMatcher::Outside);
    writer.out
}

/// Writes the canonical form, noting [`Traits`] on the way.
struct Writer {
    out: Vec<u8>,
    traits: Traits,
}

impl Writer {
    fn write_value(&mut self, value: &Value, at: SchemaMatcher) {
        match value {
            Value::Null => self.out.extend_from_slice(b"null"),
            Value::Bool(true) => self.out.extend_from_slice(b"true"),
            Value::Bool(false) => self.out.extend_from_slice(b"false"),
            Value::Number(n) => self.write_number(n),
            Value::String(s) => write_string(&mut self.out, s),
            Value::Array(items) => {
                self.out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        self.out.push(b',');
                    }
                    self.write_value(item, at.descend(Seg::Index));
                }
                self.out.push(b']');
            }
            Value::Object(map) => self.write_fields(map.iter().collect(), at),
        }
    }

    fn write_fields(&mut self, mut fields: Vec<(&String, &Value)>, at: SchemaMatcher) {
        let in_schema = matches!(at, SchemaMatcher::InSchema);
        if !in_schema {
            fields.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        }
        let root = matches!(at, SchemaMatcher::Candidates { depth: 0, .. });
        self.out.push(b'{');
        for (i, (k, v)) in fields.into_iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            if !in_schema && (k.ends_with("_id") || k.ends_with("_ids")) {
                self.traits.private |= PRIVATE_KEYS.contains(&k.as_str()) && !v.is_null();
            }
            write_string(&mut self.out, k);
            self.out.push(b':');
            match v {
                Value::Number(n) if root && INTEGER_FIELDS.contains(&k.as_str()) && n.is_f64() => {
                    // A fraction or an exponent where an integer belongs: kept as written,
                    // apart from the integer of the same value.
                    let f = n.as_f64().unwrap_or(0.0);
                    self.traits.inexact |= f.abs() >= F64_EXACT_INT;
                    let _ = serde_json::to_writer(&mut self.out, &f);
                }
                v => self.write_value(v, at.descend(Seg::Key(k))),
            }
        }
        self.out.push(b'}');
    }

    fn write_number(&mut self, n: &Number) {
        let out = &mut self.out;
        if let Some(u) = n.as_u64() {
            out.extend_from_slice(u.to_string().as_bytes());
        } else if let Some(i) = n.as_i64() {
            out.extend_from_slice(i.to_string().as_bytes());
        } else if let Some(f) = n.as_f64() {
            // Read as a float, digits may be lost (an integer past the 64-bit range).
            self.traits.inexact |= f.abs() >= F64_EXACT_INT;
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
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    // serde_json's string escaping is deterministic and minimal; writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Largest magnitude below which every integer is exactly representable in an `f64`.
const F64_EXACT_INT: f64 = 9_007_199_254_740_992.0; // 2^53
