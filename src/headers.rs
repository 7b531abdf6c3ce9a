//! Every HTTP header name llm-dedup reads or writes, in one place.
//!
//! This module owns the names and the lists of names that decide what crosses the proxy
//! (hop-by-hop headers), what enters the key (behaviour headers), what partitions the cache
//! (credential headers) and what a stored answer replays. It is a leaf: it imports nothing of
//! the crate, and holds names only, never a rule about what to do with them.

use http::HeaderName;

/// What every header of llm-dedup's own starts with: a header so named speaks to this proxy,
/// and is never one that could change an upstream answer.
pub const OWN_PREFIX: &str = "llm-dedup-";

/// Response header naming how the answer was produced (`hit`, `miss`, `coalesced`, ...).
pub const CACHE_HEADER: HeaderName = HeaderName::from_static("llm-dedup-cache");
/// Request header a replica presents to another of its fleet when it asks for the rest of a
/// stream (`/_llm-dedup/peer/{key}`): a token made with the fleet secret, never a client's
/// credential.
pub const PEER_TOKEN_HEADER: &str = "llm-dedup-peer-token";

/// Response header carrying the cache key.
pub const KEY_HEADER: HeaderName = HeaderName::from_static("llm-dedup-key");
/// Response header on a hit or a coalesced answer: what the provider would have charged for it,
/// in US dollars (`0.00045`); absent when the model has no price.
pub const SAVED_HEADER: HeaderName = HeaderName::from_static("llm-dedup-saved-usd");
/// Request header that sets the time to live, in seconds, of the answer this request stores.
pub const TTL_HEADER: &str = "llm-dedup-ttl";
/// Request header that selects a separate key space.
pub const NAMESPACE_HEADER: &str = "llm-dedup-namespace";
/// Request header that turns prefix holds off (`off`) or on (`on`, the default) for one
/// request.
pub const PREFIX_HEADER: &str = "llm-dedup-prefix";
/// Response header: how long the request waited while another wrote a prefix it shares, in
/// milliseconds.
pub const PREFIX_WAIT_HEADER: HeaderName = HeaderName::from_static("llm-dedup-prefix-wait");

/// Request header asking for a bucket of up to N answers under the request's key (1 to 20);
/// response header saying which answer of how many was served (`2/3`).
pub const BUCKET_HEADER: HeaderName = HeaderName::from_static("llm-dedup-bucket");

/// Tells the official SDKs whether to retry an answer (`true` / `false`).
pub const SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");
/// A wait in milliseconds, sent by OpenAI and Azure on 429s (`retry-after` is `http::header`'s).
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

/// Hop-by-hop headers (RFC 9110 §7.6.1, and the proxy authentication headers of RFC 9110
/// §11.7), never forwarded in either direction. Every header named by `Connection` is
/// hop-by-hop for its message too.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "trailer",
    "proxy-authenticate",
    PROXY_AUTHORIZATION,
];

/// The credential a client presents to this proxy (RFC 9110 §11.7.2): hop-by-hop, so never
/// forwarded, but it tells callers apart, so it partitions the cache like the credentials
/// that are forwarded.
pub const PROXY_AUTHORIZATION: &str = "proxy-authorization";

/// Request headers whose values change the answer, so they are part of the key: Anthropic's
/// API version and beta features, OpenAI's beta opt-ins, and Azure AI Model Inference's
/// `extra-parameters` (what the service does with parameters it does not know: pass, drop or
/// refuse them) and `azureml-model-deployment` (which deployment answers). `--key-header`
/// adds more.
pub const BEHAVIOUR_HEADERS: &[&str] = &[
    "anthropic-version",
    ANTHROPIC_BETA,
    "openai-beta",
    "extra-parameters",
    "azureml-model-deployment",
];

/// Anthropic's beta features: a comma-separated set (several header lines join into one).
pub const ANTHROPIC_BETA: &str = "anthropic-beta";

/// Request headers that carry a caller's secret by default; they partition the cache (hashed,
/// never stored). `--credential-header` adds more.
pub const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "x-api-key",
    "api-key",
    // Azure API Management in front of Azure OpenAI.
    "ocp-apim-subscription-key",
    // Google's OpenAI-compatible endpoint.
    "x-goog-api-key",
    PROXY_AUTHORIZATION,
];

/// Request headers that name the account a call is billed and limited under, but are no
/// secret (many callers send the same organization): they add to the partition of whatever
/// credential comes with them, and never stand in for one.
pub const CONTEXT_HEADERS: &[&str] = &["openai-organization", "openai-project"];

/// Request headers that identify the caller only when it presents none of
/// [`CREDENTIAL_HEADERS`]: a gateway that authenticates a session by cookie. A request that
/// carries an API key is that key's, whatever its cookies: the official SDKs keep and send
/// back the CDN cookies an API's answers set (Cloudflare's `__cf_bm` changes every half hour),
/// which must not split one key's cache. Naming `cookie` with `--credential-header` makes it
/// count always.
pub const FALLBACK_CREDENTIAL_HEADERS: &[&str] = &["cookie"];

/// Response headers kept with an entry and replayed on a hit, or handed to a coalesced caller
/// of another credential: what describes the answer itself. Everything else (cookies,
/// organization and project, rate-limit headers, request ids, dates, lengths, encodings)
/// describes the original exchange and its caller, not the answer.
pub const REPLAYED_HEADERS: &[&str] = &["content-type", "openai-model", "openai-version"];

/// The names of one provider's rate-limit headers for one kind of budget (requests or tokens).
#[derive(Debug, Clone, Copy)]
pub struct RateLimitNames {
    /// The size of the budget (absent on Azure).
    pub limit: &'static str,
    /// What is left of it.
    pub remaining: &'static str,
    /// When it is full again: a Go duration (OpenAI, Azure) or an RFC 3339 time (Anthropic).
    pub reset: &'static str,
}

/// OpenAI's and Azure's request budget.
pub const OPENAI_REQUESTS: RateLimitNames = RateLimitNames {
    limit: "x-ratelimit-limit-requests",
    remaining: "x-ratelimit-remaining-requests",
    reset: "x-ratelimit-reset-requests",
};
/// OpenAI's and Azure's token budget.
pub const OPENAI_TOKENS: RateLimitNames = RateLimitNames {
    limit: "x-ratelimit-limit-tokens",
    remaining: "x-ratelimit-remaining-tokens",
    reset: "x-ratelimit-reset-tokens",
};
/// Anthropic's request budget.
pub const ANTHROPIC_REQUESTS: RateLimitNames = RateLimitNames {
    limit: "anthropic-ratelimit-requests-limit",
    remaining: "anthropic-ratelimit-requests-remaining",
    reset: "anthropic-ratelimit-requests-reset",
};
/// Anthropic's token budget.
pub const ANTHROPIC_TOKENS: RateLimitNames = RateLimitNames {
    limit: "anthropic-ratelimit-tokens-limit",
    remaining: "anthropic-ratelimit-tokens-remaining",
    reset: "anthropic-ratelimit-tokens-reset",
};
