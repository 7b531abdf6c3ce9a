//! llm-dedup ends duplicate LLM API traffic.
//!
//! It answers repeated requests from a two-tier cache (memory, then SQLite), merges identical
//! requests in flight at the same moment into one upstream call, and passes everything else
//! through unchanged. The same engine runs inside a Rust program ([`Dedup`]) and behind the
//! `llm-dedup serve` proxy ([`server`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), llm_dedup::Error> {
//! use llm_dedup::{CacheStatus, Dedup};
//!
//! let engine = Dedup::builder()
//!     .upstream("https://api.openai.com")
//!     .database("cache.sqlite3")
//!     .build()?;
//! let request = http::Request::post("/v1/embeddings")
//!     .header("authorization", "Bearer sk-...")
//!     .header("content-type", "application/json")
//!     .body(http_body_util::Full::new(bytes::Bytes::from_static(
//!         br#"{"model": "text-embedding-3-small", "input": "hello"}"#,
//!     )))
//!     .expect("a valid request");
//! let answer = engine.send(request).await?;
//! assert!(matches!(answer.cache, CacheStatus::Miss | CacheStatus::Hit | CacheStatus::Coalesced));
//! let body = answer.into_bytes().await?;
//! # let _ = body;
//! engine.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # An existing `reqwest` client (feature `middleware`)
//!
//! [`middleware::DedupMiddleware`] plugs the engine into a `reqwest-middleware` chain: every
//! request to the engine's upstream goes through the cache, everything else goes on down the
//! chain.
//!
#![cfg_attr(
    feature = "middleware",
    doc = r##"```no_run
# async fn demo() -> Result<(), Box<dyn std::error::Error>> {
let engine = llm_dedup::Dedup::builder().upstream("https://api.openai.com").build()?;
let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
    .with(llm_dedup::middleware::DedupMiddleware::new(engine.clone()))
    .build();
let answer = client
    .post("https://api.openai.com/v1/embeddings")
    .bearer_auth("sk-...")
    .body(r#"{"model": "text-embedding-3-small", "input": "hello"}"#)
    .send()
    .await?;
assert!(answer.headers().contains_key("llm-dedup-cache"));
# Ok(()) }
```"##
)]
//!
//! # Sharing and shutting down
//!
//! [`Dedup`] is cheap to clone; clones share the memory tier, the in-flight table and the
//! database writer, so one engine serves every task of a program. Two engines never share
//! anything, unless they are replicas on one Redis ([`DedupBuilder::redis`]). The
//! only state outside an engine is a small per-thread table of shortcuts to
//! answers in memory, each tagged with the engine it belongs to. Dropping the last handle lets
//! the writer commit what is queued in the background; [`Dedup::close`] waits for in-flight
//! upstream calls and for that commit.
//!
//! See `ARCHITECTURE.md` for the map of the modules and the invariants they keep.

// Leaves: they import nothing of the crate but each other (see ARCHITECTURE.md).
mod answer;
mod counts;
pub mod error;
#[cfg(test)]
mod fuzzing;
pub mod headers;
mod inflight;
pub mod key;
pub mod prices;
mod route;
mod series;
mod sse;
mod throttle;
mod usage;

// The engine and what it is made of.
mod controls;
pub mod embeddings;
mod engine;
mod entry;
mod fleet;
mod governor;
mod live;
mod memory;
mod metrics;
mod store;
mod upstream;

// The faces: the proxy, the inspector's queries, the reqwest middleware.
pub mod inspect;
#[cfg(feature = "middleware")]
pub mod middleware;
mod page;
pub mod server;

pub use answer::{Answer, AnswerBody, CacheStatus, Refusal};
pub use controls::MAX_TTL;
pub use counts::Counts;
pub use embeddings::EmbedSettings;
pub use engine::{DEFAULT_VERIFY_WINDOW, Dedup, DedupBuilder};
pub use error::{Error, ErrorKind, Origin};
pub use fleet::{Layout as FleetLayout, advertised_url};
pub use governor::{GovernorSettings, MAX_SETTING_WAIT};
pub use headers::{CACHE_HEADER, KEY_HEADER, NAMESPACE_HEADER, TTL_HEADER};
pub use key::{CacheKey, CredentialHeaders, KEY_VERSION, KeyPolicy, Partition};
pub use prices::{PriceTable, Usd};
pub use route::Route;
pub use series::SeriesSnapshot;
pub use upstream::Timeouts;
pub use usage::Usage;

#[cfg(test)]
mod architecture {
    /// The leaf modules and their sources. ARCHITECTURE.md's invariant: a leaf imports nothing
    /// of the crate but other leaves, so the modules everything uses never reach up.
    const LEAVES: &[(&str, &str)] = &[
        ("answer", include_str!("answer.rs")),
        ("counts", include_str!("counts.rs")),
        ("error", include_str!("error.rs")),
        ("fuzzing", include_str!("fuzzing.rs")),
        ("headers", include_str!("headers.rs")),
        ("inflight", include_str!("inflight.rs")),
        ("key", include_str!("key.rs")),
        ("prices", include_str!("prices.rs")),
        ("route", include_str!("route.rs")),
        ("series", include_str!("series.rs")),
        ("sse", include_str!("sse.rs")),
        ("throttle", include_str!("throttle.rs")),
        ("usage", include_str!("usage.rs")),
    ];

    #[test]
    fn leaves_import_nothing_but_leaves() {
        for (leaf, source) in LEAVES {
            for (at, _) in source.match_indices("crate::") {
                let module = source[at + "crate::".len()..]
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .next()
                    .unwrap_or_default();
                assert!(
                    LEAVES.iter().any(|(name, _)| *name == module),
                    "the leaf `{leaf}` reaches up to `crate::{module}`"
                );
            }
        }
    }
}
