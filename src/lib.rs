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
//! See `ARCHITECTURE.md` for the map of the modules and the invariants they keep.

pub mod controls;
pub mod engine;
pub mod entry;
pub mod error;
pub mod inflight;
pub mod key;
pub mod memory;
pub mod route;
pub mod server;
pub mod store;
pub mod upstream;

pub use engine::{Answer, AnswerBody, CacheStatus, Dedup, DedupBuilder};
pub use error::{Error, ErrorKind, Origin};
pub use key::{CacheKey, KEY_VERSION, KeyPolicy};
pub use route::Route;
